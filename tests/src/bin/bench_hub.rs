//! Benchmarks of the hub:
//!
//! 1. ingest: a real `trellis-hub` process, and in this process a load
//!    generator that plays N relays, each its own QUIC connection with its
//!    own certificate, speaking the uplink protocol (hello, welcome, records
//!    of a ~100-node site's summary, acks). Summaries acknowledged per
//!    second, against `HubStore::commit` called directly with batches of the
//!    size the hub reached (the store's own ceiling), measured in the same
//!    run;
//! 2. log catch-up: the time a new, empty hub takes to pull a management
//!    log of 100,000 signed entries from another hub, against inserting the
//!    same entries into a fresh store with `HubStore::commit_log` in
//!    pull-sized chunks, measured in the same run.
//!
//! 3. soak (`--only soak`, not part of the default run): one hub, N
//!    emulated relays sending a summary every `uplink.summary_interval`
//!    as relays do, and API clients reading (and writing a desired key)
//!    at a steady pace, for `--soak-secs`; the hub's RSS sampled every
//!    30 s, every API request's latency and every error kept.
//!
//! ```text
//! cargo build --release -p trellis-hub -p trellis-tests --bins
//! target/release/bench-hub [--quick]
//! target/release/bench-hub --only soak --relays 1000 --soak-secs 600
//! ```

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use trellis_hub::log::{Entry, Hlc, NO_PREV, Op, SignedEntry};
use trellis_hub::peering::verified;
use trellis_hub::replication::PULL_CHUNK;
use trellis_hub::store::{Batch, HubStore, stored};
use trellis_node::authz::Protocol;
use trellis_node::clock::unix_ms;
use trellis_node::endpoint::close;
use trellis_node::id::{Identity, Role};
use trellis_node::site::Status;
use trellis_node::tls::{self, Credentials, IssuedCert, MESH_SERVER_NAME, MeshCa};
use trellis_node::wire;
use trellis_relay::config::RelayConfig;
use trellis_relay::summary::{CheckCounts, Histogram, NodeBrief, SiteSummary, StatusCounts};
use trellis_relay::uplink::{
    HubMsg, MAX_UPLINK_FRAME, Record, RecordBody, RelayMsg, UPLINK_VERSION,
};
use trellis_tests::report::{thousands, utc_now};
use trellis_tests::{field, get_json, metric};

const REGION: &str = "bench";
/// Nodes of each emulated relay's site.
const SITE_NODES: u32 = 100;
/// Distinct keys the log's entries write.
const LOG_KEYS: u64 = 5000;
/// Handshakes (with hello and welcome) in progress at once.
const HANDSHAKES_AT_ONCE: usize = 64;
/// How long a hub may take to log that it is ready.
const READY_LIMIT: Duration = Duration::from_secs(120);
/// How long an emulated relay waits for the hub's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);
/// How long the catch-up may take at most.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(900);

/// Benchmarks of the hub: ingest from many relays, and a new hub catching
/// up the management log.
///
/// The hubs are real `trellis-hub` processes (so their CPU and memory are
/// theirs alone) with their files in a temporary directory; the emulated
/// relays and the baselines run in this process. Everything is on
/// 127.0.0.1.
#[derive(Parser, Debug)]
#[command(name = "bench-hub", version)]
struct Args {
    /// Fewer relays, shorter windows and a shorter log: quicker, noisier
    /// figures.
    #[arg(long)]
    quick: bool,
    /// Directory in which the temporary directory is made (its disk is the
    /// one measured); the system's temp dir by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only the ingest benchmark (1), only the log catch-up (2), or
    /// the soak (3, only when asked for).
    #[arg(long, value_parser = ["ingest", "catchup", "soak"])]
    only: Option<String>,
    /// Seconds the soak runs (after every relay connected).
    #[arg(long, default_value_t = 600)]
    soak_secs: u64,
    /// API clients during the soak, each making 20 requests a second.
    #[arg(long, default_value_t = 8)]
    api_clients: usize,
    /// Relays to emulate, one ingest run for each count (default
    /// 1000,10000, or 100,1000 with --quick).
    #[arg(long, value_delimiter = ',')]
    relays: Option<Vec<usize>>,
    /// Seconds measured in each ingest run (default 20, or 5 with --quick).
    #[arg(long)]
    window: Option<u64>,
    /// Seconds of full load before the window (default 5, or 2 with
    /// --quick).
    #[arg(long)]
    warmup: Option<u64>,
    /// Records each emulated relay keeps unacknowledged, at most.
    #[arg(long, default_value_t = 8)]
    in_flight: u64,
    /// Client QUIC endpoints (UDP sockets) the emulated relays are spread
    /// over.
    #[arg(long, default_value_t = 16)]
    endpoints: usize,
    /// Management-log entries the first hub holds for the catch-up
    /// (default 100000, or 20000 with --quick).
    #[arg(long)]
    entries: Option<u64>,
    /// The `trellis-hub` binary; by default the one next to this program
    /// (build both with `cargo build --release -p trellis-hub -p
    /// trellis-tests --bins`).
    #[arg(long)]
    hub_bin: Option<PathBuf>,
    /// Copy the hubs' log lines to stderr.
    #[arg(long)]
    log: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tls::install_crypto_provider();
    let hub_bin = match &args.hub_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("this program's directory")?
            .join("trellis-hub"),
    };
    anyhow::ensure!(
        hub_bin.exists(),
        "{} is missing: build it with `cargo build --release -p trellis-hub -p trellis-tests --bins` \
         (into the same target directory), or give --hub-bin",
        hub_bin.display()
    );
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("trellis-bench-hub-");
    let tmp = match &args.dir {
        Some(d) => tmp.tempdir_in(d),
        None => tmp.tempdir(),
    }
    .context("cannot make the temporary directory")?;
    println!(
        "bench-hub: {} UTC; {} CPUs; load average {}; files in {}; hub binary {}{}",
        utc_now(),
        cpus(),
        loadavg(),
        tmp.path().display(),
        hub_bin.display(),
        if args.quick { "; --quick" } else { "" }
    );
    let ca = MeshCa::generate("bench-hub")?;
    let env = Env {
        dir: tmp.path().to_owned(),
        hub_bin,
        ca,
        echo: args.log,
    };
    if args.only.as_deref() == Some("soak") {
        let n = args
            .relays
            .as_ref()
            .and_then(|r| r.first().copied())
            .unwrap_or(1000);
        anyhow::ensure!((1..=20_000).contains(&n), "--relays: between 1 and 20000");
        anyhow::ensure!(
            (60..=86_400).contains(&args.soak_secs) && (1..=64).contains(&args.api_clients),
            "--soak-secs: 60 to 86400; --api-clients: 1 to 64"
        );
        soak(
            &env,
            n,
            Duration::from_secs(args.soak_secs),
            args.api_clients,
            args.endpoints,
        )?;
        println!();
        println!("done: {} UTC; load average {}", utc_now(), loadavg());
        return Ok(());
    }
    if args.only.as_deref() != Some("catchup") {
        let relays = args.relays.clone().unwrap_or(if args.quick {
            vec![100, 1000]
        } else {
            vec![1000, 10_000]
        });
        anyhow::ensure!(
            relays.iter().all(|n| (1..=20_000).contains(n)),
            "--relays: between 1 and 20000 each"
        );
        let opts = IngestOpts {
            window: Duration::from_secs(args.window.unwrap_or(if args.quick { 5 } else { 20 })),
            warmup: Duration::from_secs(args.warmup.unwrap_or(if args.quick { 2 } else { 5 })),
            in_flight: args.in_flight,
            endpoints: args.endpoints,
        };
        anyhow::ensure!(
            (1..=600).contains(&opts.window.as_secs()) && opts.warmup.as_secs() <= 600,
            "--window: 1 to 600 s; --warmup: at most 600 s"
        );
        anyhow::ensure!(
            (1..=64).contains(&opts.in_flight) && (1..=256).contains(&opts.endpoints),
            "--in-flight: 1 to 64; --endpoints: 1 to 256"
        );
        ingest_bench(&env, &relays, &opts)?;
    }
    if args.only.as_deref() != Some("ingest") {
        let entries = args
            .entries
            .unwrap_or(if args.quick { 20_000 } else { 100_000 });
        anyhow::ensure!(
            (1..=1_000_000).contains(&entries),
            "--entries: 1 to 1000000"
        );
        catchup_bench(&env, entries)?;
    }
    println!();
    println!("done: {} UTC; load average {}", utc_now(), loadavg());
    tmp.close()
        .context("cannot remove the temporary directory")?;
    Ok(())
}

struct Env {
    dir: PathBuf,
    hub_bin: PathBuf,
    ca: MeshCa,
    echo: bool,
}

// ---------------------------------------------------------------------------
// A hub process

struct HubProc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    /// From spawn to its "hub ready" line.
    ready_after: Duration,
    uplink: SocketAddr,
    federation: SocketAddr,
    /// `host:port` of the HTTP API.
    api: String,
}

/// A hub's certificate, and the same as in-memory credentials.
fn issue_hub(ca: &MeshCa, name: &str) -> anyhow::Result<(IssuedCert, Credentials)> {
    let issued = ca.issue(&Identity::new(Role::Hub, REGION, "", name)?, 30)?;
    let creds = Credentials::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem)?;
    Ok((issued, creds))
}

impl HubProc {
    /// Writes the hub's certificate and configuration into `dir` (its store
    /// is `dir/hub.db`), starts it and waits for it to be ready.
    fn start(
        env: &Env,
        dir: &Path,
        cert: &IssuedCert,
        peers: &[SocketAddr],
    ) -> anyhow::Result<HubProc> {
        let name = cert.identity.name.clone();
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), env.ca.cert_pem())?;
        cert.save(dir, true)?;
        let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
        let config = format!(
            "[identity]\nca = \"ca.crt\"\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\n\n\
             [uplink]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n\
             [store]\npath = \"hub.db\"\n\n[federation]\npeers = [{}]\n",
            peers.join(", ")
        );
        let path = dir.join("hub.toml");
        std::fs::write(&path, config)?;
        let t0 = Instant::now();
        let mut child = Command::new(&env.hub_bin)
            .arg("--config")
            .arg(&path)
            .env(
                "TRELLIS_LOG",
                "info,quinn=warn,quinn_proto=warn,chitchat=error",
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", env.hub_bin.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(String, Duration)>();
        for pipe in [
            Box::new(child.stderr.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("piped")),
        ] {
            let (lines, ready_tx, echo, who) =
                (lines.clone(), ready_tx.clone(), env.echo, name.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("[{who}] {line}");
                    }
                    if line.contains("hub ready") {
                        let _ = ready_tx.send((line.clone(), t0.elapsed()));
                    }
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        drop(ready_tx);
        let mut hub = HubProc {
            name,
            child,
            lines,
            ready_after: Duration::ZERO,
            uplink: ([127, 0, 0, 1], 0).into(),
            federation: ([127, 0, 0, 1], 0).into(),
            api: String::new(),
        };
        let (line, after) = match ready_rx.recv_timeout(READY_LIMIT) {
            Ok(r) => r,
            Err(_) => {
                let log = hub.lines.lock().expect("lines").join("\n");
                bail!(
                    "{} did not get ready within {READY_LIMIT:?}; its log:\n{log}",
                    hub.name
                );
            }
        };
        let get = |key: &str| field(&line, key).with_context(|| format!("no {key}= in {line:?}"));
        hub.ready_after = after;
        hub.uplink = get("uplink")?.parse()?;
        hub.federation = get("federation")?.parse()?;
        hub.api = get("api")?.trim_start_matches("http://").to_owned();
        Ok(hub)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    fn metric(&self, name: &str) -> Option<f64> {
        metric(&self.api, name)
    }

    /// Its warnings and errors so far: how many, and the first few.
    fn complaints(&self) -> (usize, Vec<String>) {
        let lines = self.lines.lock().expect("lines");
        let bad: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        (
            bad.len(),
            bad.iter().take(3).map(|l| (*l).clone()).collect(),
        )
    }

    /// SIGTERM, and a clean exit within 20 s (else SIGKILL and an error).
    fn stop(&mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "{} exited with {status}", self.name);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("{} did not stop within 20 s of SIGTERM; killed", self.name)
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// /proc

/// CPU time (user + system) of a process, at the kernel's usual 100 ticks
/// a second.
fn proc_cpu(pid: u32) -> Option<Duration> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn stat_cpu(stat: &str) -> Option<Duration> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// CPU time of a process's threads, summed by thread name.
fn thread_cpu(pid: u32) -> BTreeMap<String, Duration> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("?".to_owned(), |(n, _)| n.to_owned());
        if let Some(cpu) = stat_cpu(&stat) {
            *out.entry(name).or_insert(Duration::ZERO) += cpu;
        }
    }
    out
}

/// Time a process's threads spent runnable but waiting for a CPU (the
/// second field of `/proc/PID/task/TID/schedstat`), summed.
fn proc_wait(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    tasks
        .flatten()
        .filter_map(|t| {
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            s.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(Duration::from_nanos)
        .sum()
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn proc_mem(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(key)?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}

/// Datagrams the kernel dropped for lack of room in the receive buffers of
/// the IPv4 UDP sockets bound to `ports` (the `drops` column of
/// `/proc/net/udp`).
fn udp_drops(ports: &[u16]) -> u64 {
    let Ok(table) = std::fs::read_to_string("/proc/net/udp") else {
        return 0;
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(cols.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let drops = cols.last()?.parse::<u64>().ok()?;
            ports.contains(&port).then_some(drops)
        })
        .sum()
}

// ---------------------------------------------------------------------------
// 1. Ingest

struct IngestOpts {
    window: Duration,
    warmup: Duration,
    in_flight: u64,
    endpoints: usize,
}

/// An emulated relay: its identity and its client configuration (its own
/// certificate).
struct RelayId {
    id: Identity,
    client: quinn::ClientConfig,
}

/// Runs `f(0..n)` over every core.
fn par_map<T: Send>(
    n: usize,
    f: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let threads = cpus().max(1);
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let f = &f;
                s.spawn(move || {
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(f)
                        .collect::<anyhow::Result<Vec<T>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        for h in handles {
            out.extend(h.join().expect("a worker thread does not panic")?);
        }
        Ok(out)
    })
}

fn issue_relays(ca: &MeshCa, n: usize) -> anyhow::Result<Vec<RelayId>> {
    let transport = tls::transport_config(Some(Duration::from_secs(5)), tls::IDLE_TIMEOUT);
    par_map(n, |i| {
        let site = format!("site-{}", i + 1);
        let id = Identity::new(Role::Relay, REGION, site.clone(), format!("{site}-relay"))?;
        let creds = Credentials::issue(ca, &id)?;
        let client = creds.client_config(&[Protocol::Uplink.alpn()], transport.clone())?;
        Ok(RelayId { id, client })
    })
}

/// The summary of a ~100-node site in an ordinary bad moment: 3 nodes dead,
/// 9 not passing over 6 distinct checks, 10 worst nodes listed.
fn site_summary(id: &Identity, at_ms: u64) -> SiteSummary {
    let mut s = SiteSummary::empty(&id.region, &id.site, &id.name, at_ms);
    let node = |k: u32| format!("{}-n{:03}", id.site, k % SITE_NODES + 1);
    let dead = 3;
    s.nodes_total = SITE_NODES;
    s.nodes_dead = dead;
    s.nodes_alive = SITE_NODES - dead;
    s.by_status = StatusCounts {
        passing: s.nodes_alive - 9,
        unknown: 2,
        warning: 4,
        critical: 3,
    };
    s.dead = (0..dead).map(|k| node(17 + 29 * k)).collect();
    s.dead.sort();
    const CHECKS: [&str; 6] = [
        "http-api",
        "disk-root",
        "ntp-sync",
        "systemd-unit",
        "tcp-port",
        "cert-expiry",
    ];
    for (k, c) in CHECKS.iter().enumerate() {
        let k = k as u32;
        s.failing_checks.insert(
            (*c).to_owned(),
            CheckCounts {
                unknown: k % 2,
                warning: 1 + k % 3,
                critical: k % 2,
            },
        );
    }
    let hist = |shape: [u32; 10]| {
        let total: u32 = shape.iter().sum();
        let mut buckets = shape.map(|w| w * s.nodes_alive / total);
        buckets[0] += s.nodes_alive - buckets.iter().sum::<u32>();
        Histogram {
            buckets,
            unknown: 0,
        }
    };
    s.cpu = hist([30, 25, 15, 10, 6, 5, 4, 2, 2, 1]);
    s.mem = hist([2, 5, 10, 20, 25, 18, 10, 6, 3, 1]);
    s.disk = hist([1, 3, 8, 15, 20, 20, 15, 10, 6, 2]);
    s.worst = (0..10u32)
        .map(|k| {
            let alive = k >= dead;
            NodeBrief {
                name: if alive {
                    node(40 + 7 * k)
                } else {
                    s.dead[k as usize].clone()
                },
                alive,
                status: if alive && k > 5 {
                    Status::Warning
                } else {
                    Status::Critical
                },
                failing: (0..1 + k as usize % 3)
                    .map(|c| CHECKS[(k as usize + c) % CHECKS.len()].to_owned())
                    .collect(),
                cpu_pct: alive.then_some(60 + k as u8 * 3),
                mem_pct: alive.then_some(55),
                disk_pct: alive.then_some(70 + k as u8),
            }
        })
        .collect();
    s
}

fn summary_record(seq: u64, summary: SiteSummary) -> Record {
    Record {
        seq,
        at_ms: summary.generated_ms,
        body: RecordBody::Summary(Box::new(summary)),
    }
}

/// What the emulated relays share with the main thread.
struct Load {
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Records acknowledged, in all and per relay.
    acked: AtomicU64,
    per_relay: Vec<AtomicU64>,
    /// Full load from now on.
    start: CancellationToken,
    /// Stop sending, close.
    stop: CancellationToken,
    errors: Mutex<Vec<String>>,
}

/// One emulated relay: connects, says hello, sends a summary every
/// `idle_every` until `start`, then keeps `in_flight` records
/// unacknowledged until `stop`.
#[allow(clippy::too_many_arguments)]
async fn relay_task(
    i: usize,
    relay: Arc<RelayId>,
    endpoint: quinn::Endpoint,
    hub: SocketAddr,
    load: Arc<Load>,
    handshakes: Arc<Semaphore>,
    in_flight: u64,
    idle_every: Duration,
) {
    if let Err(e) = relay_inner(
        i,
        &relay,
        &endpoint,
        hub,
        &load,
        &handshakes,
        in_flight,
        idle_every,
    )
    .await
    {
        load.failed.fetch_add(1, Ordering::Relaxed);
        let mut errors = load.errors.lock().expect("errors");
        if errors.len() < 5 {
            errors.push(format!("{}: {e:#}", relay.id.name));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_inner(
    i: usize,
    relay: &RelayId,
    endpoint: &quinn::Endpoint,
    hub: SocketAddr,
    load: &Arc<Load>,
    handshakes: &Semaphore,
    in_flight: u64,
    idle_every: Duration,
) -> anyhow::Result<()> {
    let permit = handshakes.acquire().await?;
    let connecting = endpoint.connect_with(relay.client.clone(), hub, MESH_SERVER_NAME)?;
    let conn = tokio::time::timeout(ANSWER_LIMIT, connecting)
        .await
        .context("handshake timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    let stream: u64 = rand::random();
    wire::write_msg(
        &mut send,
        UPLINK_VERSION,
        &RelayMsg::Hello { stream },
        MAX_UPLINK_FRAME,
    )
    .await?;
    let welcome = tokio::time::timeout(
        ANSWER_LIMIT,
        wire::read_msg::<HubMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
    )
    .await
    .context("no welcome")??;
    match welcome {
        Some(HubMsg::Welcome { acked: 0, .. }) => {}
        other => bail!("expected a welcome for a new stream, got {other:?}"),
    }
    drop(permit);
    load.connected.fetch_add(1, Ordering::Relaxed);

    // Acks are read by a task of their own, as a relay does, so that
    // sending never waits in the middle of a read.
    let (ack_tx, mut acks) = tokio::sync::watch::channel(0u64);
    let reader: tokio::task::JoinHandle<anyhow::Result<()>> = {
        let load = load.clone();
        tokio::spawn(async move {
            let mut acked = 0;
            loop {
                match wire::read_msg::<HubMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME).await {
                    Ok(Some(HubMsg::Ack { through })) if through > acked => {
                        load.acked.fetch_add(through - acked, Ordering::Relaxed);
                        load.per_relay[i].fetch_add(through - acked, Ordering::Relaxed);
                        acked = through;
                        let _ = ack_tx.send(acked);
                    }
                    Ok(Some(HubMsg::Ack { .. })) => {}
                    Ok(other) => return Err(anyhow::anyhow!("expected an ack, got {other:?}")),
                    Err(e) => return Err(e.into()),
                }
            }
        })
    };
    let result = async {
        let mut summary = site_summary(&relay.id, unix_ms());
        let mut frame = |seq: u64| {
            summary.generated_ms = unix_ms().max(summary.generated_ms + 1);
            let msg = RelayMsg::Record(Box::new(summary_record(seq, summary.clone())));
            wire::encode(UPLINK_VERSION, &msg, MAX_UPLINK_FRAME)
        };
        let mut seq = 0u64;
        // Until the load starts: a summary every `idle_every`, as a relay
        // sends by default, so that the hub does not find it silent.
        let mut next = tokio::time::Instant::now() + idle_every.mul_f64(rand::random::<f64>());
        loop {
            tokio::select! {
                biased;
                _ = load.start.cancelled() => break,
                _ = load.stop.cancelled() => break,
                changed = acks.changed() => {
                    changed.context("the ack reader ended")?;
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            seq += 1;
            wire::write_frame(&mut send, &frame(seq)?).await?;
            next += idle_every;
        }
        // Full load: as fast as acknowledgements allow.
        while !load.stop.is_cancelled() {
            while seq - *acks.borrow_and_update() < in_flight {
                seq += 1;
                wire::write_frame(&mut send, &frame(seq)?).await?;
            }
            tokio::select! {
                biased;
                _ = load.stop.cancelled() => break,
                changed = tokio::time::timeout(ANSWER_LIMIT, acks.changed()) => {
                    changed.context("no ack")?.context("the ack reader ended")?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    let result = match result {
        // The reader's error says why.
        Err(e) if reader.is_finished() => match reader.await {
            Ok(Err(why)) => Err(why.context(e.to_string())),
            _ => Err(e),
        },
        other => {
            reader.abort();
            other
        }
    };
    let _ = send.finish();
    conn.close(close::DONE, b"benchmark over");
    result
}

/// What is read at both ends of the window.
struct Snapshot {
    at: Instant,
    acked: u64,
    per_relay: Vec<u64>,
    hub_cpu: Duration,
    hub_threads: BTreeMap<String, Duration>,
    own_cpu: Duration,
    commits: f64,
    applied: f64,
    hub_drops: u64,
    own_drops: u64,
    hub_wait: Duration,
    own_wait: Duration,
}

fn snapshot(hub: &HubProc, load: &Load, own_ports: &[u16]) -> Snapshot {
    let at = Instant::now();
    let acked = load.acked.load(Ordering::Relaxed);
    let per_relay = load
        .per_relay
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .collect();
    let hub_cpu = proc_cpu(hub.pid()).unwrap_or_default();
    let hub_threads = thread_cpu(hub.pid());
    let own_cpu = proc_cpu(std::process::id()).unwrap_or_default();
    let commits = hub
        .metric("trellis_hub_store_commits_total")
        .unwrap_or(f64::NAN);
    let applied = hub
        .metric("trellis_hub_records_applied_total")
        .unwrap_or(f64::NAN);
    Snapshot {
        at,
        acked,
        per_relay,
        hub_cpu,
        hub_threads,
        own_cpu,
        commits,
        applied,
        hub_drops: udp_drops(&[hub.uplink.port()]),
        own_drops: udp_drops(own_ports),
        hub_wait: proc_wait(hub.pid()),
        own_wait: proc_wait(std::process::id()),
    }
}

struct Ingest {
    relays: usize,
    connect: Duration,
    secs: f64,
    acked: u64,
    per_relay: Vec<f64>,
    commits: f64,
    applied_before: f64,
    applied: f64,
    hub_cores: f64,
    store_cores: f64,
    own_cores: f64,
    /// Cores' worth of time the hub's and this process's threads were
    /// runnable but waited for a CPU, in the window.
    waits: (f64, f64),
    /// The hub's CPU cores while the relays connected.
    connect_cores: f64,
    rss: (f64, f64),
    /// Datagrams dropped in the window: at the hub's socket, at the load
    /// generator's.
    drops: (u64, u64),
    complaints: (usize, Vec<String>),
    failed: usize,
    errors: Vec<String>,
    ceiling: Option<Ceiling>,
}

struct Ceiling {
    batch: usize,
    records: u64,
    per_s: f64,
    commits_per_s: f64,
}

fn ingest_bench(env: &Env, counts: &[usize], opts: &IngestOpts) -> anyhow::Result<()> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let idle_every = RelayConfig::default().uplink.summary_interval;
    let probe = Identity::new(Role::Relay, REGION, "site-10000", "site-10000-relay")?;
    let sample = summary_record(1_000_000, site_summary(&probe, unix_ms()));
    let body = postcard::to_stdvec(&sample.body)?.len();
    let frame = wire::encode(
        UPLINK_VERSION,
        &RelayMsg::Record(Box::new(sample)),
        MAX_UPLINK_FRAME,
    )?
    .len();
    println!();
    println!(
        "1. hub ingest: emulated relays, each its own QUIC connection and certificate; {} in flight per \
         relay; {} client endpoints; window {} s after {} s of full load",
        opts.in_flight,
        opts.endpoints,
        opts.window.as_secs(),
        opts.warmup.as_secs()
    );
    println!(
        "record: the summary of a {SITE_NODES}-node site (3 dead, 9 failing, 6 distinct checks, 10 worst \
         nodes), {body} B body / {frame} B uplink frame"
    );
    let t = Instant::now();
    let relays: Vec<Arc<RelayId>> = issue_relays(&env.ca, max)?
        .into_iter()
        .map(Arc::new)
        .collect();
    println!(
        "issued {} relay certificates in {:.1} s (before any timing)",
        thousands(max as u64),
        t.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for (k, &n) in counts.iter().enumerate() {
        let dir = env.dir.join(format!("ingest-{k}"));
        let mut r = ingest_run(env, &rt, &dir, &relays[..n], opts, idle_every)?;
        // The store's ceiling at the hub's records per commit.
        if r.commits > 0.0 && r.acked > 0 {
            let batch = ((r.acked as f64 / r.commits).round() as usize).max(1);
            let prefill = if r.applied_before.is_finite() {
                r.applied_before as u64
            } else {
                0
            };
            r.ceiling = Some(store_ceiling(
                &dir.join("ceiling.db"),
                &relays[..n],
                batch,
                prefill,
                r.acked,
            )?);
        }
        std::fs::remove_dir_all(&dir)?;
        results.push(r);
    }
    rt.shutdown_timeout(Duration::from_secs(5));

    println!();
    println!(
        "{:>7} {:>12} {:>21} {:>10} {:>9} {:>10} {:>11} {:>13} {:>14}",
        "relays",
        "summaries/s",
        "per relay/s min-max",
        "needed/s",
        "headroom",
        "commits/s",
        "rec/commit",
        "store ceiling",
        "ingest/ceiling"
    );
    for r in &results {
        let rate = r.acked as f64 / r.secs;
        let needed = r.relays as f64 / idle_every.as_secs_f64();
        let (lo, hi) = r
            .per_relay
            .iter()
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        println!(
            "{:>7} {:>12} {:>21} {:>10} {:>9} {:>10} {:>11} {:>13} {:>14}",
            thousands(r.relays as u64),
            thousands(rate.round() as u64),
            format!("{:.2} ({:.2}-{:.2})", rate / r.relays as f64, lo, hi),
            thousands(needed.round() as u64),
            format!("{:.1}x", rate / needed),
            thousands((r.commits / r.secs).round() as u64),
            format!("{:.0}", r.acked as f64 / r.commits),
            r.ceiling
                .as_ref()
                .map_or("n/a".to_owned(), |c| thousands(c.per_s.round() as u64)),
            r.ceiling
                .as_ref()
                .map_or("n/a".to_owned(), |c| format!("{:.2}x", rate / c.per_s)),
        );
    }
    println!();
    println!(
        "{:>7} {:>17} {:>9} {:>12} {:>12} {:>11} {:>14} {:>12} {:>17}",
        "relays",
        "connect all (hub)",
        "hub CPU",
        "store thread",
        "hub waiting",
        "load gen CPU",
        "load gen waiting",
        "hub RSS MiB",
        "UDP drops hub/gen"
    );
    for r in &results {
        println!(
            "{:>7} {:>17} {:>9} {:>12} {:>12} {:>11} {:>14} {:>12} {:>17}",
            thousands(r.relays as u64),
            format!("{:.1} s ({:.2})", r.connect.as_secs_f64(), r.connect_cores),
            format!("{:.2}", r.hub_cores),
            format!("{:.2}", r.store_cores),
            format!("{:.2}", r.waits.0),
            format!("{:.2}", r.own_cores),
            format!("{:.2}", r.waits.1),
            format!("{:.0} / {:.0}", r.rss.0, r.rss.1),
            format!("{} / {}", thousands(r.drops.0), thousands(r.drops.1)),
        );
    }
    println!();
    println!(
        "summaries/s: records the hub acknowledged in the window (it acks after its store committed them) / \
         window. per relay: mean (min-max over relays). needed: a summary every {} s from each relay \
         (the relay's default), headroom = summaries/s / needed. commits/s: the hub's \
         trellis_hub_store_commits_total (one fsync each). store ceiling: HubStore::commit called \
         directly in this process, on a fresh file with the hub's records before the window already in \
         it, with batches of the hub's records per commit, one record per relay in a batch (records/s \
         of the commit calls alone). CPU: cores, CPU time in the window / window; the hub's is its \
         process alone (its store thread separately); the load generator is this process. waiting: \
         cores' worth of time their threads were runnable but waited for a CPU (schedstat), in the \
         window. hub RSS: VmRSS at the end of the window / VmHWM. UDP drops: \
         datagrams the kernel dropped in the window for lack of room in the receive buffer of the hub's \
         socket / of the load generator's sockets (/proc/net/udp). The handshakes (connect all, with the hub's \
         CPU cores meanwhile) are before the window, {HANDSHAKES_AT_ONCE} at a time.",
        idle_every.as_secs()
    );
    for r in &results {
        if let Some(c) = &r.ceiling {
            println!(
                "check, {} relays: the hub applied {} records in the window, acknowledged {}; {} relays \
                 failed; store ceiling run: {} records in batches of {}, {} commits/s; hub warnings: {}",
                thousands(r.relays as u64),
                thousands((r.applied - r.applied_before).max(0.0) as u64),
                thousands(r.acked),
                r.failed,
                thousands(c.records),
                thousands(c.batch as u64),
                thousands(c.commits_per_s.round() as u64),
                thousands(r.complaints.0 as u64),
            );
        }
        for e in &r.errors {
            println!("  relay error: {e}");
        }
        for w in &r.complaints.1 {
            println!("  hub warnings: {w}");
        }
    }
    Ok(())
}

/// Emulated relays at work: their counters, client endpoints and tasks.
type Relays = (
    Arc<Load>,
    Vec<quinn::Endpoint>,
    Vec<tokio::task::JoinHandle<()>>,
);

/// Starts one task per emulated relay, spread over `endpoints_n` client
/// endpoints, connecting to the hub's uplink at `hub`.
fn spawn_relays(
    rt: &tokio::runtime::Runtime,
    relays: &[Arc<RelayId>],
    hub: SocketAddr,
    endpoints_n: usize,
    in_flight: u64,
    idle_every: Duration,
) -> anyhow::Result<Relays> {
    let load = Arc::new(Load {
        connected: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        acked: AtomicU64::new(0),
        per_relay: (0..relays.len()).map(|_| AtomicU64::new(0)).collect(),
        start: CancellationToken::new(),
        stop: CancellationToken::new(),
        errors: Mutex::new(Vec::new()),
    });
    let endpoints: Vec<quinn::Endpoint> = {
        let _rt = rt.enter();
        (0..endpoints_n)
            .map(|_| quinn::Endpoint::client(([127, 0, 0, 1], 0).into()))
            .collect::<Result<_, _>>()?
    };
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_AT_ONCE));
    let tasks = relays
        .iter()
        .enumerate()
        .map(|(i, r)| {
            rt.spawn(relay_task(
                i,
                r.clone(),
                endpoints[i % endpoints.len()].clone(),
                hub,
                load.clone(),
                handshakes.clone(),
                in_flight,
                idle_every,
            ))
        })
        .collect();
    Ok((load, endpoints, tasks))
}

fn ingest_run(
    env: &Env,
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    relays: &[Arc<RelayId>],
    opts: &IngestOpts,
    idle_every: Duration,
) -> anyhow::Result<Ingest> {
    let n = relays.len();
    let (cert, _) = issue_hub(&env.ca, "hub-1")?;
    let mut hub = HubProc::start(env, dir, &cert, &[])?;
    let cpu0 = proc_cpu(hub.pid()).unwrap_or_default();
    let t0 = Instant::now();
    let (load, endpoints, tasks) = spawn_relays(
        rt,
        relays,
        hub.uplink,
        opts.endpoints,
        opts.in_flight,
        idle_every,
    )?;
    let own_ports: Vec<u16> = endpoints
        .iter()
        .map(|e| e.local_addr().map_or(0, |a| a.port()))
        .collect();
    let result = (|| {
        let limit = Duration::from_secs(60) + Duration::from_millis(50) * n as u32;
        loop {
            let (c, f) = (
                load.connected.load(Ordering::Relaxed),
                load.failed.load(Ordering::Relaxed),
            );
            if c + f == n && f * 100 <= n {
                break;
            }
            if f * 100 > n || t0.elapsed() > limit {
                bail!(
                    "{c} of {n} relays connected, {f} failed after {:.1} s: {:?}; the hub's warnings: {:?}",
                    t0.elapsed().as_secs_f64(),
                    load.errors.lock().expect("errors"),
                    hub.complaints()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let connect = t0.elapsed();
        let connect_cpu = proc_cpu(hub.pid()).unwrap_or_default().saturating_sub(cpu0);
        load.start.cancel();
        std::thread::sleep(opts.warmup);
        let a = snapshot(&hub, &load, &own_ports);
        std::thread::sleep(opts.window);
        let b = snapshot(&hub, &load, &own_ports);
        let rss = proc_mem(hub.pid()).unwrap_or((f64::NAN, f64::NAN));
        Ok((connect, connect_cpu, a, b, rss))
    })();
    load.stop.cancel();
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(ANSWER_LIMIT, t).await;
        }
        for e in &endpoints {
            e.close(close::DONE, b"benchmark over");
        }
        for e in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(2), e.wait_idle()).await;
        }
    });
    drop(endpoints);
    let complaints = hub.complaints();
    let stopped = hub.stop();
    let (connect, connect_cpu, a, b, rss) = result?;
    stopped?;
    let secs = (b.at - a.at).as_secs_f64();
    let cores = |x: Duration, y: Duration| y.saturating_sub(x).as_secs_f64() / secs;
    let store = |s: &Snapshot| s.hub_threads.get("hub-store").copied().unwrap_or_default();
    let errors = load.errors.lock().expect("errors").clone();
    Ok(Ingest {
        relays: n,
        connect,
        secs,
        acked: b.acked - a.acked,
        per_relay: a
            .per_relay
            .iter()
            .zip(&b.per_relay)
            .map(|(x, y)| (y - x) as f64 / secs)
            .collect(),
        commits: b.commits - a.commits,
        applied_before: a.applied,
        applied: b.applied,
        hub_cores: cores(a.hub_cpu, b.hub_cpu),
        store_cores: cores(store(&a), store(&b)),
        own_cores: cores(a.own_cpu, b.own_cpu),
        waits: (cores(a.hub_wait, b.hub_wait), cores(a.own_wait, b.own_wait)),
        connect_cores: connect_cpu.as_secs_f64() / connect.as_secs_f64(),
        rss,
        drops: (
            b.hub_drops.saturating_sub(a.hub_drops),
            b.own_drops.saturating_sub(a.own_drops),
        ),
        complaints,
        failed: load.failed.load(Ordering::Relaxed),
        errors,
        ceiling: None,
    })
}

// ---------------------------------------------------------------------------
// 3. Soak

/// Requests each API client makes per second.
const SOAK_REQUESTS_PER_S: u64 = 20;
/// The routes API clients read, in turn.
const SOAK_READS: &[&str] = &[
    "/api/v1/fleet",
    "/api/v1/events?limit=50",
    "/api/v1/desired",
    "/api/v1/log?limit=50",
    "/api/v1/hubs",
    "/api/v1/incidents",
    "/api/v1/config/status",
    "/metrics",
];

/// What the API clients saw.
#[derive(Default)]
struct ApiLoad {
    latencies: Vec<Duration>,
    /// Per route: (seconds into the soak, latency).
    per_route: BTreeMap<&'static str, Vec<(u64, Duration)>>,
    errors: u64,
    first_errors: Vec<String>,
}

fn soak(
    env: &Env,
    n: usize,
    length: Duration,
    clients: usize,
    endpoints_n: usize,
) -> anyhow::Result<()> {
    let idle_every = RelayConfig::default().uplink.summary_interval;
    println!();
    println!(
        "3. soak: {n} emulated relays (a summary every {} s each), {clients} API clients at \
         {SOAK_REQUESTS_PER_S} requests/s each (reads of {} routes in turn, and a desired-state write \
         every 2 s from client 0), for {} s",
        idle_every.as_secs(),
        SOAK_READS.len(),
        length.as_secs()
    );
    let relays: Vec<Arc<RelayId>> = issue_relays(&env.ca, n)?
        .into_iter()
        .map(Arc::new)
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let dir = env.dir.join("soak");
    let (cert, _) = issue_hub(&env.ca, "hub-1")?;
    let mut hub = HubProc::start(env, &dir, &cert, &[])?;
    let t0 = Instant::now();
    let (load, endpoints, tasks) =
        spawn_relays(&rt, &relays, hub.uplink, endpoints_n, 1, idle_every)?;
    let limit = Duration::from_secs(60) + Duration::from_millis(50) * n as u32;
    while load.connected.load(Ordering::Relaxed) + load.failed.load(Ordering::Relaxed) < n {
        anyhow::ensure!(
            t0.elapsed() < limit,
            "only {} of {n} relays connected",
            load.connected.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{} relays connected in {:.1} s ({} failed)",
        load.connected.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
        load.failed.load(Ordering::Relaxed)
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let api_load = Arc::new(Mutex::new(ApiLoad::default()));
    let soak_start = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, api_load, base) = (
                stop.clone(),
                api_load.clone(),
                format!("http://{}", hub.api),
            );
            std::thread::spawn(move || {
                let every = Duration::from_millis(1000 / SOAK_REQUESTS_PER_S);
                let mut next = Instant::now();
                let mut k = c;
                let mut mine = ApiLoad::default();
                while !stop.load(Ordering::Relaxed) {
                    let write = c == 0 && k % (2 * SOAK_REQUESTS_PER_S as usize) == 0;
                    let started = Instant::now();
                    let answer = if write {
                        trellis_tests::http_request(
                            "PUT",
                            &format!("{base}/api/v1/desired/soak.counter"),
                            &[("content-type", "application/json")],
                            &format!("{{\"value\": \"{k}\", \"author\": \"soak\"}}"),
                        )
                    } else {
                        trellis_tests::http_get(&format!(
                            "{base}{}",
                            SOAK_READS[k % SOAK_READS.len()]
                        ))
                    };
                    mine.latencies.push(started.elapsed());
                    let route = if write {
                        "PUT /api/v1/desired/{key}"
                    } else {
                        SOAK_READS[k % SOAK_READS.len()]
                    };
                    mine.per_route
                        .entry(route)
                        .or_default()
                        .push((soak_start.elapsed().as_secs(), started.elapsed()));
                    match answer {
                        Some((status, _)) if (200..300).contains(&status) => {}
                        other => {
                            mine.errors += 1;
                            if mine.first_errors.len() < 3 {
                                mine.first_errors.push(format!(
                                    "{}: {:?}",
                                    if write {
                                        "PUT desired"
                                    } else {
                                        SOAK_READS[k % SOAK_READS.len()]
                                    },
                                    other
                                        .map(|(s, b)| (s, b.chars().take(200).collect::<String>()))
                                ));
                            }
                        }
                    }
                    k += 1;
                    next += every;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    } else {
                        next = Instant::now();
                    }
                }
                let mut all = api_load.lock().expect("api load");
                all.latencies.extend(mine.latencies);
                for (route, l) in mine.per_route {
                    all.per_route.entry(route).or_default().extend(l);
                }
                all.errors += mine.errors;
                all.first_errors.extend(mine.first_errors);
            })
        })
        .collect();
    println!();
    println!(
        "{:>6} {:>12} {:>12} {:>16} {:>15}",
        "t s", "hub RSS MiB", "hub CPU", "summaries acked", "relays failed"
    );
    let started = Instant::now();
    let mut samples: Vec<(u64, f64)> = Vec::new();
    let mut cpu_before = proc_cpu(hub.pid()).unwrap_or_default();
    let mut at_before = Instant::now();
    let acked0 = load.acked.load(Ordering::Relaxed);
    while started.elapsed() < length {
        std::thread::sleep(Duration::from_secs(30).min(length.saturating_sub(started.elapsed())));
        let rss = proc_mem(hub.pid()).map_or(f64::NAN, |m| m.0);
        let cpu = proc_cpu(hub.pid()).unwrap_or_default();
        let cores =
            cpu.saturating_sub(cpu_before).as_secs_f64() / at_before.elapsed().as_secs_f64();
        (cpu_before, at_before) = (cpu, Instant::now());
        let t = started.elapsed().as_secs();
        samples.push((t, rss));
        println!(
            "{:>6} {:>12.1} {:>12} {:>16} {:>15}",
            t,
            rss,
            format!("{:.2} cores", cores),
            thousands(load.acked.load(Ordering::Relaxed) - acked0),
            load.failed.load(Ordering::Relaxed)
        );
        anyhow::ensure!(
            hub.child.try_wait()?.is_none(),
            "the hub exited during the soak"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let secs = started.elapsed().as_secs_f64();
    let acked = load.acked.load(Ordering::Relaxed) - acked0;
    load.stop.cancel();
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(ANSWER_LIMIT, t).await;
        }
        for e in &endpoints {
            e.close(close::DONE, b"soak over");
        }
    });
    drop(endpoints);
    let complaints = hub.complaints();
    hub.stop()?;
    rt.shutdown_timeout(Duration::from_secs(5));

    let api = api_load.lock().expect("api load");
    let mut lat = api.latencies.clone();
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    // Memory: the first sample after the first minute against the last.
    let early = samples
        .iter()
        .find(|(t, _)| *t >= 60)
        .or(samples.first())
        .map_or(f64::NAN, |s| s.1);
    let last = samples.last().map_or(f64::NAN, |s| s.1);
    println!();
    println!(
        "{:>7} {:>14} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>22} {:>12}",
        "relays",
        "summaries/s",
        "API req",
        "API req/s",
        "p50",
        "p99",
        "max",
        "errors",
        "RSS at 1 min -> end",
        "end/1 min"
    );
    println!(
        "{:>7} {:>14} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10} {:>22} {:>12}",
        thousands(n as u64),
        format!("{:.0}", acked as f64 / secs),
        thousands(lat.len() as u64),
        format!("{:.0}", lat.len() as f64 / secs),
        ms(q(0.5)),
        ms(q(0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        api.errors + load.failed.load(Ordering::Relaxed) as u64,
        format!("{early:.1} -> {last:.1} MiB"),
        format!("{:.2}x", last / early),
    );
    println!(
        "needed: {:.0} summaries/s ({n} relays / {} s); the hub's warnings: {}",
        n as f64 / idle_every.as_secs_f64(),
        idle_every.as_secs(),
        complaints.0
    );
    println!();
    println!(
        "{:<28} {:>8} {:>16} {:>16}",
        "route", "requests", "p99 first minute", "p99 last minute"
    );
    let end = secs as u64;
    for (route, l) in &api.per_route {
        let p99 = |from: u64, to: u64| {
            let mut v: Vec<Duration> = l
                .iter()
                .filter(|(t, _)| (from..to).contains(t))
                .map(|(_, d)| *d)
                .collect();
            v.sort();
            v.get(((v.len() as f64 - 1.0) * 0.99).round() as usize)
                .map_or("-".to_owned(), |d| ms(*d))
        };
        println!(
            "{:<28} {:>8} {:>16} {:>16}",
            route,
            thousands(l.len() as u64),
            p99(0, 60),
            p99(end.saturating_sub(60), end + 1)
        );
    }
    for e in api
        .first_errors
        .iter()
        .chain(load.errors.lock().expect("errors").iter())
    {
        println!("  error: {e}");
    }
    for c in complaints.1.iter().take(5) {
        println!("  hub: {c}");
    }
    Ok(())
}

/// `HubStore::commit` of `count` summaries in batches of `batch`, after
/// `prefill` untimed ones; one record per relay in a batch, relays in
/// turn. Only the commit calls are timed.
fn store_ceiling(
    path: &Path,
    relays: &[Arc<RelayId>],
    batch: usize,
    prefill: u64,
    count: u64,
) -> anyhow::Result<Ceiling> {
    let mut store = HubStore::open(path)?;
    let n = relays.len() as u64;
    let base_ms = unix_ms();
    let templates: Vec<SiteSummary> = relays
        .iter()
        .map(|r| site_summary(&r.id, base_ms))
        .collect();
    let make = |k: u64, size: u64| {
        let mut b = Batch {
            records: Vec::with_capacity(size as usize),
            streams: Vec::new(),
        };
        let mut through: BTreeMap<usize, u64> = BTreeMap::new();
        for j in k..k + size {
            let r = (j % n) as usize;
            let seq = j / n + 1;
            let mut s = templates[r].clone();
            s.generated_ms = base_ms + j;
            let id = &relays[r].id;
            b.records.push(stored(
                &id.name,
                7,
                &id.region,
                &id.site,
                &summary_record(seq, s),
                base_ms + j,
            ));
            through.insert(r, seq);
        }
        for (r, seq) in through {
            let id = &relays[r].id;
            b.streams
                .push((id.name.clone(), 7, id.region.clone(), id.site.clone(), seq));
        }
        b
    };
    let mut k = 0;
    while k < prefill {
        let size = (prefill - k).min(2048);
        store.commit(&make(k, size))?;
        k += size;
    }
    let commits0 = store.commits();
    let mut timed = Duration::ZERO;
    let end = prefill + count;
    while k < end {
        let size = (end - k).min(batch as u64);
        let b = make(k, size);
        let t = Instant::now();
        store.commit(&b)?;
        timed += t.elapsed();
        k += size;
    }
    let commits = store.commits() - commits0;
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(Ceiling {
        batch,
        records: count,
        per_s: count as f64 / timed.as_secs_f64(),
        commits_per_s: commits as f64 / timed.as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------
// 2. Log catch-up

/// A value of about 100 bytes, as an operator would set.
fn log_value(i: u64) -> String {
    format!(
        "{{\"image\":\"registry.example/agent:2.{}.{}\",\"replicas\":{},\"window\":\"02:00-04:00\",\"owner\":\"ops-{:02}\"}}",
        i % 40,
        i % 7,
        1 + i % 5,
        i % 13
    )
}

/// `n` entries of `origin`, signed with its credentials, each chained to
/// the one before (so signed one after the other: an entry's `prev` is the
/// hash of the previous entry and its signature).
fn signed_entries(creds: &Credentials, n: u64) -> anyhow::Result<Vec<SignedEntry>> {
    let origin = creds.identity.name.clone();
    let base_ms = unix_ms() - 3_600_000;
    let cert = creds.cert_der().to_vec();
    let mut out: Vec<SignedEntry> = Vec::with_capacity(n as usize);
    let mut prev = NO_PREV;
    for seq in 1..=n {
        let entry = Entry {
            origin: origin.clone(),
            seq,
            hlc: Hlc {
                ms: base_ms + seq * 10,
                counter: 0,
            },
            author: format!("operator-{}", seq % 4),
            op: Op::Put {
                key: format!("key-{}", seq % LOG_KEYS),
                value: log_value(seq),
            },
            prev,
        };
        let signature = creds.sign(&entry.signing_bytes())?;
        let signed = SignedEntry {
            entry,
            cert: cert.clone(),
            signature,
        };
        prev = signed.hash();
        out.push(signed);
    }
    Ok(out)
}

/// `commit_log` of every entry in chunks of `PULL_CHUNK` into a fresh
/// store at `path`, checking signatures first if `creds` is given.
fn local_insert(
    path: &Path,
    entries: &[SignedEntry],
    verify: Option<&Credentials>,
) -> anyhow::Result<Duration> {
    let mut store = HubStore::open(path)?;
    let t = Instant::now();
    for chunk in entries.chunks(PULL_CHUNK as usize) {
        match verify {
            Some(creds) => {
                let ok = verified(creds, chunk.to_vec());
                anyhow::ensure!(ok.len() == chunk.len(), "every signature verifies");
                store.commit_log(&ok)?;
            }
            None => store.commit_log(chunk)?,
        }
    }
    let elapsed = t.elapsed();
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(elapsed)
}

/// This hub's row of `GET /api/v1/hubs`: its log entries.
fn log_entries(hub: &HubProc) -> Option<u64> {
    let v = get_json(&hub.url("/api/v1/hubs"))?;
    v["hubs"]
        .as_array()?
        .iter()
        .find(|h| h["this"] == Value::Bool(true))?["log_entries"]
        .as_u64()
}

fn catchup_bench(env: &Env, n: u64) -> anyhow::Result<()> {
    let (cert_a, creds_a) = issue_hub(&env.ca, "hub-a")?;
    let (cert_b, creds_b) = issue_hub(&env.ca, "hub-b")?;
    let t = Instant::now();
    let entries = signed_entries(&creds_a, n)?;
    let signing = t.elapsed();
    let entry_bytes: usize = entries.iter().map(|e| e.entry.signing_bytes().len()).sum();
    let wire_bytes: usize = entries
        .iter()
        .map(|e| postcard::to_stdvec(e).map_or(0, |v| v.len()))
        .sum();
    println!();
    println!(
        "2. log catch-up: a new hub pulls {} management-log entries from another (origin hub-a, \
         {} keys, ~100 B values); entry {:.0} B as signed, {:.0} B with signature and certificate as sent; \
         signed in {:.1} s before any timing",
        thousands(n),
        thousands(LOG_KEYS),
        entry_bytes as f64 / n as f64,
        wire_bytes as f64 / n as f64,
        signing.as_secs_f64()
    );

    // Baselines: the same entries into a fresh store, without the network;
    // the median of 3 rounds. Then once with the signature checks a hub
    // makes on entries it pulls.
    let base_dir = env.dir.join("catchup-baseline");
    std::fs::create_dir_all(&base_dir)?;
    let mut rounds: Vec<Duration> = (0..3)
        .map(|r| local_insert(&base_dir.join(format!("plain-{r}.db")), &entries, None))
        .collect::<anyhow::Result<_>>()?;
    rounds.sort();
    let plain = rounds[1];
    let checked = local_insert(&base_dir.join("verified.db"), &entries, Some(&creds_b))?;
    std::fs::remove_dir_all(&base_dir)?;

    // Hub A with the log already in its store.
    let dir_a = env.dir.join("hub-a");
    std::fs::create_dir_all(&dir_a)?;
    {
        let mut store = HubStore::open(&dir_a.join("hub.db"))?;
        for chunk in entries.chunks(PULL_CHUNK as usize) {
            store.commit_log(chunk)?;
        }
    }
    let mut a = HubProc::start(env, &dir_a, &cert_a, &[])?;
    let a_entries = log_entries(&a);
    anyhow::ensure!(
        a_entries == Some(n),
        "hub-a holds {a_entries:?} entries, not {n}"
    );
    let a_cpu0 = proc_cpu(a.pid()).unwrap_or_default();

    // Hub B, empty, with A as its federation peer.
    let dir_b = env.dir.join("hub-b");
    let t0 = Instant::now();
    let mut b = HubProc::start(env, &dir_b, &cert_b, &[a.federation])?;
    let b_ready = b.ready_after;
    let mut first = None;
    let mut samples: Vec<(Duration, u64)> = Vec::new();
    let all = loop {
        let t = t0.elapsed();
        let held = log_entries(&b).unwrap_or(0);
        if held > 0 && first.is_none() {
            first = Some(t);
        }
        samples.push((t, held));
        if held >= n {
            break t;
        }
        if t > CATCH_UP_LIMIT {
            let _ = a.stop();
            let _ = b.stop();
            bail!("hub-b holds {held} of {n} entries after {CATCH_UP_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let b_cpu = proc_cpu(b.pid()).unwrap_or_default();
    let a_cpu = proc_cpu(a.pid()).unwrap_or_default().saturating_sub(a_cpu0);
    let b_threads = thread_cpu(b.pid());
    let b_rss = proc_mem(b.pid()).unwrap_or((f64::NAN, f64::NAN));
    let a_rss = proc_mem(a.pid()).unwrap_or((f64::NAN, f64::NAN));
    // Same desired state on both.
    let desired_a = get_json(&a.url("/api/v1/desired"));
    let desired_b = get_json(&b.url("/api/v1/desired"));
    let same = match (&desired_a, &desired_b) {
        (Some(x), Some(y)) => x["keys"] == y["keys"] && x["version_vector"] == y["version_vector"],
        _ => false,
    };
    let keys = desired_b
        .as_ref()
        .and_then(|d| d["keys"].as_object().map(|k| k.len()))
        .unwrap_or(0);
    let complaints = (a.complaints(), b.complaints());
    let stopped = (a.stop(), b.stop());
    stopped.0?;
    stopped.1?;
    std::fs::remove_dir_all(&dir_a)?;
    std::fs::remove_dir_all(&dir_b)?;

    let first = first.unwrap_or(all);
    // The steady rate: between 10 % and 90 % of the entries.
    let at = |frac: f64| {
        samples
            .iter()
            .find(|(_, h)| *h as f64 >= frac * n as f64)
            .copied()
    };
    let steady = match (at(0.1), at(0.9)) {
        (Some((t1, h1)), Some((t2, h2))) if t2 > t1 && h2 > h1 => {
            (h2 - h1) as f64 / (t2 - t1).as_secs_f64()
        }
        _ => n as f64 / (all - first).as_secs_f64().max(1e-3),
    };
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!();
    println!(
        "{:<66} {:>9} {:>10} {:>11}",
        "", "time", "entries/s", "time ratio"
    );
    let row = |label: &str, d: Duration, entries_per_s: f64| {
        println!(
            "{:<66} {:>9} {:>10} {:>11}",
            label,
            format!("{:.2} s", d.as_secs_f64()),
            thousands(entries_per_s.round() as u64),
            format!("{:.1}x", d.as_secs_f64() / plain.as_secs_f64()),
        );
    };
    row(
        &format!(
            "commit_log into a fresh store, chunks of {} (baseline)",
            thousands(u64::from(PULL_CHUNK))
        ),
        plain,
        rate(plain),
    );
    row(
        "the same after checking every signature (peering::verified)",
        checked,
        rate(checked),
    );
    row(
        "hub-b holds every entry, from the start of its process",
        all,
        rate(all),
    );
    row(
        "hub-b from its first entry to its last",
        all - first,
        rate(all - first),
    );
    println!();
    println!(
        "hub-b: ready {:.2} s after its start, first entries at {:.2} s, all at {:.2} s; steady rate (10 % to \
         90 % of the entries) {} entries/s",
        b_ready.as_secs_f64(),
        first.as_secs_f64(),
        all.as_secs_f64(),
        thousands(steady.round() as u64)
    );
    println!(
        "CPU over the catch-up: hub-b {:.2} cores (store thread {:.2} s of {:.2} s), hub-a {:.2} cores; \
         RSS after it: hub-b {:.0} MiB, hub-a {:.0} MiB (peak {:.0}); hub-a took {:.2} s from start to \
         ready with the {} entries in its store",
        b_cpu.as_secs_f64() / all.as_secs_f64(),
        b_threads
            .get("hub-store")
            .copied()
            .unwrap_or_default()
            .as_secs_f64(),
        b_cpu.as_secs_f64(),
        a_cpu.as_secs_f64() / all.as_secs_f64(),
        b_rss.0,
        a_rss.0,
        a_rss.1,
        a.ready_after.as_secs_f64(),
        thousands(n),
    );
    println!(
        "time ratio: time / the baseline's ({:.2} s, median of 3 rounds). The hubs find each other by \
         federation gossip (interval 1 s) and pull on anti-entropy (every 2 s), {} entries per request.",
        plain.as_secs_f64(),
        thousands(u64::from(PULL_CHUNK))
    );
    println!(
        "check: hub-b's desired state ({} keys) and version vector {} hub-a's; warnings logged: hub-a {}, \
         hub-b {}",
        thousands(keys as u64),
        if same { "equal" } else { "DIFFER FROM" },
        complaints.0.0,
        complaints.1.0
    );
    for w in complaints.0.1.iter().chain(&complaints.1.1) {
        println!("  hub warnings: {w}");
    }
    anyhow::ensure!(same, "hub-b's desired state differs from hub-a's");
    Ok(())
}

// ---------------------------------------------------------------------------

/// The 1-minute load average, from /proc/loadavg.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "n/a".to_owned())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
