//! Benchmarks of the relay's durable outage buffer and of replay after an
//! outage:
//!
//! 1. durable append throughput of `OutageBuffer::append` at 1 KiB records,
//!    against a raw append-only file with one `write` + `fdatasync` per
//!    record, measured in the same run in the same directory;
//! 2. the rate at which a real relay drains a backlog to a real hub (QUIC on
//!    127.0.0.1, both in this process), against the rate at which a
//!    1,000-node site produces records;
//! 3. the time to drain a one-hour outage of such a site.
//!
//! Beside (1), in the same rounds and on the same disk, NATS JetStream
//! makes the same promise (a record is on disk before its append returns):
//! a `nats-server` started here with file storage and `sync_interval:
//! always`, publishes of the same size one at a time and with 16, 64 and
//! 256 in flight, and reading the records back in order against the
//! buffer's `read_after`.
//!
//! ```text
//! cargo run --release -p trellis-tests --bin bench-buffer -- [--quick]
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use trellis_hub::config::{ApiConfig, HubConfig, HubUplinkConfig, StoreConfig};
use trellis_hub::driver::Hub;
use trellis_hub::store::StoreReader;
use trellis_node::clock::unix_ms;
use trellis_node::config::{GossipConfig, MetricsConfig};
use trellis_node::id::{Identity, Role};
use trellis_node::site::Status;
use trellis_node::tls::{Credentials, MeshCa};
use trellis_node::wire;
use trellis_relay::buffer::{NewRecord, OutageBuffer, default_downsample};
use trellis_relay::config::RelayConfig;
use trellis_relay::driver::Relay;
use trellis_relay::summary::{CheckCounts, Histogram, NodeBrief, SiteSummary, StatusCounts};
use trellis_relay::uplink::{
    Event, MAX_UPLINK_FRAME, Record, RecordBody, RelayMsg, UPLINK_VERSION,
};
use trellis_tests::report::{thousands, utc_now};

mod jetstream;

use jetstream::JetStream;

const REGION: &str = "bench";
const SITE: &str = "site-1";
const RELAY: &str = "site-1-relay";
/// Nodes of the modelled site.
const SITE_NODES: u32 = 1000;
/// Check changes per minute in the modelled site (1 % of its nodes).
const CHURN_PER_MIN: u64 = 10;
/// Body of a record in the append benchmark.
const RECORD_BYTES: usize = 1024;
/// Records per append when pre-filling a relay's buffer.
const PREFILL_BATCH: usize = 256;
/// Rows per read when reading the buffer back, as the relay's replay.
const READ_ROWS: usize = 512;
/// Bytes per read when reading the buffer back, as the relay's replay.
const READ_BYTES: usize = 64 * 1024;
/// How often drain progress is sampled.
const POLL: Duration = Duration::from_millis(5);
/// `uplink.replay_bytes_per_s` with the limit lifted.
const UNLIMITED: u64 = 1 << 30;

/// Benchmarks of the relay's durable outage buffer and of replay to a hub.
///
/// Everything runs in this process: the buffer on the disk of `--dir`, and
/// for replay a real relay and a real hub speaking QUIC on 127.0.0.1 with
/// their files in the same directory.
#[derive(Parser, Debug)]
#[command(name = "bench-buffer", version)]
struct Args {
    /// Fewer records, one round of the append benchmark and shorter
    /// backlogs with the limit lifted: quicker, noisier figures.
    #[arg(long)]
    quick: bool,
    /// Directory in which the temporary directory is made (its disk is
    /// the one measured); the system's temp dir by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only the append benchmark (1); only it with NATS JetStream
    /// beside it and the read-back comparison; or only the replay ones
    /// (2, 3). By default everything runs.
    #[arg(long, value_parser = ["append", "jetstream", "replay"])]
    only: Option<String>,
    /// The `nats-server` (2.10 or newer) for the JetStream rows; by default
    /// the first recent enough one on PATH or where pip installs scripts.
    #[arg(long, value_name = "PATH")]
    nats_server: Option<PathBuf>,
    /// Backlogs, in hours of the modelled site's records, drained with the
    /// replay limit lifted (default 1,8,24, or 1,2 with --quick). The
    /// one-hour backlog is always drained, at the default rate and lifted.
    #[arg(long, value_delimiter = ',')]
    ceiling_hours: Option<Vec<u64>>,
    /// Also drain a backlog of this many hours at the default replay rate
    /// (at least 12 s per hour of backlog).
    #[arg(long)]
    long_outage_hours: Option<u64>,
    /// Rounds of the append benchmark (default 5, or 1 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Log the relay's and the hub's messages to stderr (level from
    /// TRELLIS_LOG, info by default).
    #[arg(long)]
    log: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.log {
        trellis_node::cli::init_logging(trellis_node::cli::LogFormat::Human);
    }
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("trellis-bench-buffer-");
    let tmp = match &args.dir {
        Some(d) => tmp.tempdir_in(d),
        None => tmp.tempdir(),
    }
    .context("cannot make the temporary directory")?;
    println!(
        "bench-buffer: {} UTC; {} CPUs; files in {}{}",
        utc_now(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        tmp.path().display(),
        if args.quick { "; --quick" } else { "" }
    );
    if args.only.as_deref() != Some("replay") {
        let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 5 });
        anyhow::ensure!(
            (1..=20).contains(&rounds),
            "--rounds must be between 1 and 20"
        );
        let mut js = if matches!(args.only.as_deref(), None | Some("jetstream")) {
            start_jetstream(args.nats_server.as_deref(), tmp.path())?
        } else {
            None
        };
        append_bench(tmp.path(), args.quick, rounds, js.as_mut())?;
        if js.is_some() || args.only.as_deref() == Some("jetstream") {
            read_bench(tmp.path(), args.quick, rounds, js.as_mut())?;
        }
        // Stops the server before its files are removed with the rest.
        drop(js);
    }
    if matches!(args.only.as_deref(), None | Some("replay")) {
        let mut ceiling = args.ceiling_hours.clone().unwrap_or(if args.quick {
            vec![1, 2]
        } else {
            vec![1, 8, 24]
        });
        ceiling.push(1);
        ceiling.sort_unstable();
        ceiling.dedup();
        anyhow::ensure!(
            ceiling
                .iter()
                .chain(&args.long_outage_hours)
                .all(|h| (1..=48).contains(h)),
            "backlogs must be between 1 and 48 hours"
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        rt.block_on(replay_bench(tmp.path(), &ceiling, args.long_outage_hours))?;
    }
    tmp.close()
        .context("cannot remove the temporary directory")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Durable append throughput

struct Measured {
    records: u64,
    elapsed: Duration,
    fsyncs: u64,
}

impl Measured {
    fn per_s(&self, n: u64) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }
}

/// A record whose postcard body is exactly `RECORD_BYTES` long: a check
/// change with a long detail.
fn kib_body() -> RecordBody {
    let make = |pad: usize| {
        RecordBody::Event(Event::CheckChanged {
            node: "site-1-n0421".into(),
            check: "http-api".into(),
            from: Status::Passing,
            to: Status::Critical,
            detail: "x".repeat(pad),
        })
    };
    let mut pad = RECORD_BYTES;
    for _ in 0..8 {
        let len = body_len(&make(pad));
        if len == RECORD_BYTES {
            break;
        }
        pad = (pad + RECORD_BYTES).saturating_sub(len);
    }
    let body = make(pad);
    assert_eq!(body_len(&body), RECORD_BYTES, "a 1 KiB record body");
    body
}

fn body_len(body: &RecordBody) -> usize {
    postcard::to_stdvec(body).expect("records serialise").len()
}

/// The disk's durable limit per record: append 1 KiB and `fdatasync`.
fn raw_baseline(dir: &Path, n: u64) -> anyhow::Result<Measured> {
    let path = dir.join("raw-append.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let block = vec![0x5au8; RECORD_BYTES];
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&block)?;
        f.sync_data()?;
    }
    let elapsed = start.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Measured {
        records: n,
        elapsed,
        fsyncs: n,
    })
}

fn buffer_append(dir: &Path, n: u64, batch: usize) -> anyhow::Result<Measured> {
    let path = dir.join(format!("append-{batch}.db"));
    let (mut buffer, _) = OutageBuffer::open(&path, 1 << 30, default_downsample())?;
    let body = kib_body();
    let base_ms = unix_ms();
    let batches = n.div_ceil(batch as u64);
    let before = buffer.stats().fsyncs;
    let start = Instant::now();
    let mut appended = 0u64;
    for b in 0..batches {
        let take = (n - appended).min(batch as u64);
        let records: Vec<NewRecord> = (0..take)
            .map(|i| NewRecord {
                at_ms: base_ms + b * batch as u64 + i,
                body: body.clone(),
            })
            .collect();
        appended += buffer.append(records)?.len() as u64;
    }
    let elapsed = start.elapsed();
    let fsyncs = buffer.stats().fsyncs - before;
    anyhow::ensure!(buffer.last_seq() == n, "every record appended");
    drop(buffer);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(Measured {
        records: appended,
        elapsed,
        fsyncs,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, lowest and highest of a line's per-round rates.
fn spread(rates: &[f64]) -> (f64, f64, f64) {
    let mut v = rates.to_vec();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(0.0, f64::max);
    (median(&mut v), lo, hi)
}

fn min_max(lo: f64, hi: f64) -> String {
    format!(
        "{}-{}",
        thousands(lo.round() as u64),
        thousands(hi.round() as u64)
    )
}

/// Starts the JetStream baseline, or says why it is left out.
fn start_jetstream(explicit: Option<&Path>, dir: &Path) -> anyhow::Result<Option<JetStream>> {
    let skip = |why: String| {
        println!();
        println!("NATS JetStream rows skipped: {why}");
        Ok(None)
    };
    let bin = match jetstream::find_server(explicit) {
        Ok(bin) => bin,
        Err(why) => return skip(why),
    };
    let server = match jetstream::start_server(&bin, dir) {
        Ok(s) => s,
        Err(e) => return skip(format!("{e:#}")),
    };
    Ok(Some(JetStream::connect(server)?))
}

fn append_bench(
    dir: &Path,
    quick: bool,
    rounds: usize,
    mut js: Option<&mut JetStream>,
) -> anyhow::Result<()> {
    let (n_single, n_batched) = if quick {
        (500, 10_000)
    } else {
        (2_000, 50_000)
    };
    println!();
    println!(
        "1. durable append throughput, {RECORD_BYTES} B records (postcard body): {} records one per \
         commit, {} batched; {rounds} round(s), each round runs every line once, in table order{}",
        thousands(n_single),
        thousands(n_batched),
        if js.is_some() {
            " (each buffer line followed by its JetStream line of 1b)"
        } else {
            ""
        }
    );
    const BATCHES: [usize; 4] = [1, 16, 64, 256];
    let n_of = |batch: usize| if batch == 1 { n_single } else { n_batched };
    // Per line: records/s and fsyncs/s of each round.
    let mut rates: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 1 + BATCHES.len()];
    // Per in-flight size: acks/s of each round.
    let mut js_rates: Vec<Vec<f64>> = vec![Vec::new(); BATCHES.len()];
    for _ in 0..rounds {
        let raw = raw_baseline(dir, n_single)?;
        rates[0].push((raw.per_s(raw.records), raw.per_s(raw.fsyncs)));
        for (i, batch) in BATCHES.into_iter().enumerate() {
            let n = n_of(batch);
            let m = buffer_append(dir, n, batch)?;
            rates[i + 1].push((m.per_s(m.records), m.per_s(m.fsyncs)));
            // Right after its Trellis line, so both see the disk alike.
            if let Some(js) = js.as_deref_mut() {
                let took = js.append(n, batch as u64, RECORD_BYTES)?;
                js_rates[i].push(n as f64 / took.as_secs_f64());
            }
        }
    }
    let labels: Vec<(String, u64)> = std::iter::once((
        "raw file: write 1 KiB + fdatasync (baseline)".to_owned(),
        n_single,
    ))
    .chain(
        BATCHES
            .into_iter()
            .map(|b| (format!("OutageBuffer::append, {b} per append"), n_of(b))),
    )
    .collect();
    let med: Vec<(f64, f64, f64, f64)> = rates
        .iter()
        .map(|r| {
            let rec: Vec<f64> = r.iter().map(|x| x.0).collect();
            let mut fs: Vec<f64> = r.iter().map(|x| x.1).collect();
            let (m, lo, hi) = spread(&rec);
            (m, median(&mut fs), lo, hi)
        })
        .collect();
    let raw_rate = med[0].0;
    println!();
    println!(
        "{:<44} {:>8} {:>11} {:>19} {:>10} {:>13}",
        "", "records", "records/s", "min-max records/s", "fsyncs/s", "ratio vs raw"
    );
    for ((label, n), (rec, fs, lo, hi)) in labels.iter().zip(&med) {
        println!(
            "{:<44} {:>8} {:>11} {:>19} {:>10} {:>13}",
            label,
            thousands(*n),
            thousands(rec.round() as u64),
            min_max(*lo, *hi),
            thousands(fs.round() as u64),
            format!("{:.2}x", rec / raw_rate),
        );
    }
    println!();
    println!(
        "records/s, fsyncs/s: median of the rounds. ratio: buffer records/s / raw records/s. fsyncs/s for \
         the buffer: its commits/s, each one fsync of the WAL by the buffer's own count (SQLite's \
         checkpoints add a few more)."
    );
    let Some(js) = js else {
        return Ok(());
    };
    println!();
    println!(
        "1b. the same appends against NATS JetStream {} ({}): file storage on the same disk, \
         sync_interval: always (its /varz says sync_always: true: each publish fsynced before its ack), \
         one client connection on 127.0.0.1, {RECORD_BYTES} B payloads, each ack checked; measured in \
         the rounds of 1",
        js.server.version,
        js.server.path.display()
    );
    println!();
    println!(
        "{:<44} {:>8} {:>17} {:>16} {:>19} {:>17}",
        "Trellis records per append vs JetStream",
        "records",
        "Trellis records/s",
        "JetStream acks/s",
        "JetStream min-max",
        "Trellis/JetStream"
    );
    for (i, batch) in BATCHES.into_iter().enumerate() {
        let (rate, lo, hi) = spread(&js_rates[i]);
        println!(
            "{:<44} {:>8} {:>17} {:>16} {:>19} {:>17}",
            format!(
                "{batch} per append vs {batch} in flight{}",
                if batch == 1 { " (ack awaited)" } else { "" }
            ),
            thousands(n_of(batch)),
            thousands(med[i + 1].0.round() as u64),
            thousands(rate.round() as u64),
            min_max(lo, hi),
            format!("{:.2}x", med[i + 1].0 / rate),
        );
    }
    println!(
        "{:<44} {:>8} {:>17}",
        "raw file: write 1 KiB + fdatasync (baseline)",
        thousands(n_single),
        thousands(raw_rate.round() as u64),
    );
    println!();
    println!(
        "Trellis records/s: the median of 1's line. JetStream acks/s: records whose ack arrived / time \
         from the first publish to the last ack, median of the rounds; N in flight: up to N publishes \
         sent and not yet acked, one sent for each ack. Each JetStream line publishes to a new stream, \
         deleted after it."
    );
    Ok(())
}

/// Reads a buffer back from the start the way the relay's replay does, and
/// checks that every record comes, in order.
fn buffer_read(dir: &Path, n: u64) -> anyhow::Result<Duration> {
    let path = dir.join("read-back.db");
    let (mut buffer, _) = OutageBuffer::open(&path, 1 << 30, default_downsample())?;
    let body = kib_body();
    let base_ms = unix_ms();
    let mut appended = 0u64;
    while appended < n {
        let take = (n - appended).min(PREFILL_BATCH as u64);
        let records = (appended..appended + take)
            .map(|i| NewRecord {
                at_ms: base_ms + i,
                body: body.clone(),
            })
            .collect();
        appended += buffer.append(records)?.len() as u64;
    }
    let start = Instant::now();
    let mut after = 0u64;
    while after < n {
        let chunk = buffer.read_after(after, READ_ROWS, READ_BYTES)?;
        anyhow::ensure!(!chunk.is_empty(), "the buffer ends at {after} of {n}");
        for r in &chunk {
            anyhow::ensure!(
                r.seq == after + 1 && matches!(r.body, RecordBody::Event(_)),
                "record {} read where {} was due",
                r.seq,
                after + 1
            );
            after = r.seq;
        }
    }
    let elapsed = start.elapsed();
    drop(buffer);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    Ok(elapsed)
}

fn read_bench(
    dir: &Path,
    quick: bool,
    rounds: usize,
    mut js: Option<&mut JetStream>,
) -> anyhow::Result<()> {
    let n: u64 = if quick { 10_000 } else { 50_000 };
    let mut trellis = Vec::new();
    let mut nats = Vec::new();
    for _ in 0..rounds {
        trellis.push(n as f64 / buffer_read(dir, n)?.as_secs_f64());
        if let Some(js) = js.as_deref_mut() {
            nats.push(n as f64 / js.read_back(n, RECORD_BYTES)?.as_secs_f64());
        }
    }
    println!();
    println!(
        "1c. reading {} records of {RECORD_BYTES} B back in order, just after writing them \
         ({} per append / 256 in flight); {rounds} round(s)",
        thousands(n),
        PREFILL_BATCH
    );
    println!();
    println!(
        "{:<10} {:>17} {:>19} {:>19} {:>19} {:>17}",
        "records",
        "Trellis records/s",
        "Trellis min-max",
        "JetStream records/s",
        "JetStream min-max",
        "Trellis/JetStream"
    );
    let (t, t_lo, t_hi) = spread(&trellis);
    let [j_rate, j_spread, j_ratio] = if nats.is_empty() {
        ["n/a".to_owned(), "n/a".to_owned(), "n/a".to_owned()]
    } else {
        let (j, lo, hi) = spread(&nats);
        [
            thousands(j.round() as u64),
            min_max(lo, hi),
            format!("{:.2}x", t / j),
        ]
    };
    println!(
        "{:<10} {:>17} {:>19} {:>19} {:>19} {:>17}",
        thousands(n),
        thousands(t.round() as u64),
        min_max(t_lo, t_hi),
        j_rate,
        j_spread,
        j_ratio,
    );
    println!();
    println!(
        "Trellis: OutageBuffer::read_after from seq 0 in chunks of {READ_ROWS} rows / {} KiB (as the \
         relay's replay reads), bodies decoded. JetStream: an ephemeral pull consumer (deliver all, \
         no acks), $JS.API.CONSUMER.MSG.NEXT with batch 1000 and no_wait until all are read. Both \
         check that every record comes, in order; median of the rounds.",
        READ_BYTES / 1024
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The modelled site

fn node_name(i: u32) -> String {
    format!("{SITE}-n{:04}", i % SITE_NODES + 1)
}

fn check_name(i: usize) -> String {
    const KINDS: [&str; 8] = [
        "http-api",
        "disk-root",
        "ntp-sync",
        "systemd-unit",
        "tcp-port",
        "mem-pressure",
        "cert-expiry",
        "dns-resolve",
    ];
    format!("{}-{:02}", KINDS[i % KINDS.len()], i / KINDS.len())
}

fn histogram(alive: u32, shape: [u32; 10]) -> Histogram {
    let total: u32 = shape.iter().sum();
    let known = alive - 5;
    let mut buckets = shape.map(|w| w * known / total);
    buckets[0] += known - buckets.iter().sum::<u32>();
    Histogram {
        buckets,
        unknown: 5,
    }
}

/// A summary of a degraded 1,000-node site with every list at its bound:
/// 32 dead nodes listed (of 40), 64 distinct failing checks, 10 worst
/// nodes with 5 failing checks each. `turn` varies the counts a little
/// from one summary to the next, as check changes would.
fn site_summary(at_ms: u64, turn: u64) -> SiteSummary {
    let mut s = SiteSummary::empty(REGION, SITE, RELAY, at_ms);
    let dead = 40u32;
    s.nodes_total = SITE_NODES;
    s.nodes_dead = dead;
    s.nodes_alive = SITE_NODES - dead;
    let flip = (turn % 2) as u32;
    s.by_status = StatusCounts {
        passing: s.nodes_alive - 80 - flip,
        unknown: 10,
        warning: 40,
        critical: 30 + flip,
    };
    s.dead = (0..dead).map(|i| node_name(i * 23 + 7)).collect();
    s.dead.sort();
    s.dead.truncate(trellis_relay::summary::MAX_DEAD_LISTED);
    for i in 0..trellis_relay::summary::MAX_FAILING_CHECKS {
        let n = i as u32;
        s.failing_checks.insert(
            check_name(i),
            CheckCounts {
                unknown: n % 3,
                warning: n % 5,
                critical: 1 + n % 4 + if i == turn as usize % 64 { flip } else { 0 },
            },
        );
    }
    s.cpu = histogram(s.nodes_alive, [30, 25, 15, 10, 6, 5, 4, 2, 2, 1]);
    s.mem = histogram(s.nodes_alive, [2, 5, 10, 20, 25, 18, 10, 6, 3, 1]);
    s.disk = histogram(s.nodes_alive, [1, 3, 8, 15, 20, 20, 15, 10, 6, 2]);
    s.worst = (0..trellis_relay::summary::MAX_WORST)
        .map(|i| {
            let alive = i >= 4;
            NodeBrief {
                name: if alive {
                    node_name(i as u32 * 97 + 3)
                } else {
                    s.dead[i].clone()
                },
                alive,
                status: Status::Critical,
                failing: (0..trellis_relay::summary::MAX_FAILING_PER_NODE)
                    .map(|c| check_name(i * 5 + c))
                    .collect(),
                cpu_pct: alive.then_some(90 + i as u8),
                mem_pct: alive.then_some(70),
                disk_pct: alive.then_some(95),
            }
        })
        .collect();
    s
}

/// A healthy 1,000-node site: counts and histograms only.
fn healthy_summary(at_ms: u64) -> SiteSummary {
    let mut s = SiteSummary::empty(REGION, SITE, RELAY, at_ms);
    s.nodes_total = SITE_NODES;
    s.nodes_alive = SITE_NODES;
    s.by_status.passing = SITE_NODES;
    s.cpu = histogram(SITE_NODES, [30, 25, 15, 10, 6, 5, 4, 2, 2, 1]);
    s.mem = histogram(SITE_NODES, [2, 5, 10, 20, 25, 18, 10, 6, 3, 1]);
    s.disk = histogram(SITE_NODES, [1, 3, 8, 15, 20, 20, 15, 10, 6, 2]);
    s
}

fn check_event(k: u64) -> Event {
    let failing = k.is_multiple_of(2);
    Event::CheckChanged {
        node: node_name((k * 37 % 1000) as u32),
        check: check_name((k % 64) as usize),
        from: if failing {
            Status::Passing
        } else {
            Status::Critical
        },
        to: if failing {
            Status::Critical
        } else {
            Status::Passing
        },
        detail: if failing {
            "HTTP 503 Service Unavailable from http://127.0.0.1:8080/healthz".into()
        } else {
            "HTTP 200 OK".into()
        },
    }
}

/// What the relay of the modelled site records over `seconds` from
/// `start_ms`, by the relay's own rule at its default settings: it looks at
/// the site every `uplink.sample_interval` (1 s) and makes a summary when
/// the site's state changed or `uplink.summary_interval` (5 s) after the
/// last one. Each check change is an event and changes the state. With
/// `churn_per_min` check changes a minute, evenly spaced.
fn site_records(start_ms: u64, seconds: u64, churn_per_min: u64) -> Vec<NewRecord> {
    let uplink = RelayConfig::default().uplink;
    let sample_ms = (uplink.sample_interval.as_millis() as u64).max(1);
    let summary_ms = uplink.summary_interval.as_millis() as u64;
    let every_ms = (churn_per_min > 0).then(|| 60_000 / churn_per_min);
    let mut next_event = every_ms.map(|e| e / 2);
    let mut out = Vec::new();
    let mut last_summary: Option<u64> = None;
    let mut turn = 0u64;
    for t in (0..seconds * 1000).step_by(sample_ms as usize) {
        let at_ms = start_ms + t;
        let mut changed = false;
        while let (Some(e), Some(every)) = (next_event, every_ms)
            && e <= t
        {
            out.push(NewRecord {
                at_ms,
                body: RecordBody::Event(check_event(turn)),
            });
            turn += 1;
            changed = true;
            next_event = Some(e + every);
        }
        if changed || last_summary.is_none_or(|l| t - l >= summary_ms) {
            out.push(NewRecord {
                at_ms,
                body: RecordBody::Summary(Box::new(site_summary(at_ms, turn))),
            });
            last_summary = Some(t);
        }
    }
    out
}

/// Bytes of a record on the uplink: the frame the relay writes (and its
/// replay limit counts).
fn frame_len(r: &Record) -> usize {
    wire::encode(
        UPLINK_VERSION,
        &RelayMsg::Record(Box::new(r.clone())),
        MAX_UPLINK_FRAME,
    )
    .expect("records frame")
    .len()
}

fn new_frame_len(r: &NewRecord, seq: u64) -> usize {
    frame_len(&Record {
        seq,
        at_ms: r.at_ms,
        body: r.body.clone(),
    })
}

struct Mix {
    summaries: u64,
    events: u64,
    frame_bytes: u64,
    body_bytes: u64,
}

fn mix(records: &[NewRecord]) -> Mix {
    let mut m = Mix {
        summaries: 0,
        events: 0,
        frame_bytes: 0,
        body_bytes: 0,
    };
    for (i, r) in records.iter().enumerate() {
        match r.body {
            RecordBody::Summary(_) => m.summaries += 1,
            _ => m.events += 1,
        }
        // Sequence numbers of a one-hour stream fit in two varint bytes.
        m.frame_bytes += new_frame_len(r, 1000 + i as u64) as u64;
        m.body_bytes += body_len(&r.body) as u64;
    }
    m
}

// ---------------------------------------------------------------------------
// 2, 3. Replay to a hub

struct Creds {
    hub: Credentials,
    relay: Credentials,
}

fn credentials() -> anyhow::Result<Creds> {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("bench")?;
    Ok(Creds {
        hub: Credentials::issue(&ca, &Identity::new(Role::Hub, REGION, "", "hub-1")?)?,
        relay: Credentials::issue(&ca, &Identity::new(Role::Relay, REGION, SITE, RELAY)?)?,
    })
}

fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

struct Drain {
    records: u64,
    frame_bytes: u64,
    buffer_bytes: u64,
    /// From `Relay::start` until the hub has stored every backlog record
    /// (it acknowledges right after).
    hub_all: Duration,
    /// Until the relay has taken the hub's acknowledgement of all of them
    /// (its `trellis_relay_acked_through`).
    relay_acked: Duration,
    /// Frame bytes/s and records/s between 10 % and 90 % of the backlog.
    steady_bytes_per_s: f64,
    steady_records_per_s: f64,
    hub_commits: Option<f64>,
    relay_commits: Option<f64>,
    /// The hub's counts: records applied, duplicates ignored, refused.
    hub_applied: Option<f64>,
    hub_duplicates: Option<f64>,
    hub_rejected: Option<f64>,
    /// CPU time of the process from `Relay::start` to the empty buffer.
    cpu: Option<Duration>,
}

/// Pre-fills a relay's buffer with `records`, starts a hub and the relay
/// with `rate` and measures how the backlog drains.
async fn drain(
    creds: &Creds,
    dir: &Path,
    records: &[NewRecord],
    rate: u64,
) -> anyhow::Result<Drain> {
    std::fs::create_dir_all(dir)?;
    let buffer_path = dir.join("relay").join("outage.db");
    let hub_db = dir.join("hub").join("hub.db");

    // The backlog, and each record's frame size by seq.
    let (stream, last, buffer_bytes, cum) = {
        let path = buffer_path.clone();
        let records = records.to_vec();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let (mut buffer, _) = OutageBuffer::open(&path, 1 << 30, default_downsample())?;
            let mut cum = vec![0u64];
            for chunk in records.chunks(PREFILL_BATCH) {
                for r in buffer.append(chunk.to_vec())? {
                    let prev = *cum.last().expect("starts at zero");
                    cum.push(prev + frame_len(&r) as u64);
                }
            }
            let s = buffer.stats();
            Ok((buffer.stream(), buffer.last_seq(), s.bytes, cum))
        })
        .await??
    };
    anyhow::ensure!(last as usize == records.len(), "a fresh buffer");
    let frame_bytes = cum[last as usize];

    let shutdown = CancellationToken::new();
    let hub_cfg = HubConfig {
        uplink: HubUplinkConfig {
            listen: loopback(),
            ..Default::default()
        },
        api: ApiConfig {
            listen: loopback(),
            ..Default::default()
        },
        store: StoreConfig {
            path: hub_db.clone(),
            ..Default::default()
        },
        ..HubConfig::default()
    };
    let hub = Hub::start(creds.hub.clone(), hub_cfg, shutdown.clone()).await?;
    let mut relay_cfg = RelayConfig {
        gossip: GossipConfig::with_listen(loopback()),
        metrics: MetricsConfig::with_listen(loopback()),
        ..RelayConfig::default()
    };
    relay_cfg.api.enabled = false;
    relay_cfg.uplink.hubs = vec![hub.uplink_addr().to_string()];
    relay_cfg.uplink.replay_bytes_per_s = rate;
    relay_cfg.buffer.path = buffer_path.clone();

    let limit = Duration::from_secs_f64(frame_bytes as f64 / rate as f64 * 3.0 + 120.0);
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let relay = match Relay::start(creds.relay.clone(), relay_cfg, shutdown.clone()).await {
        Ok(r) => r,
        Err(e) => {
            shutdown.cancel();
            hub.stopped().await;
            bail!("relay did not start: {e}");
        }
    };
    let watched =
        tokio::task::spawn_blocking(move || watch_hub(t0, limit, &hub_db, stream, last)).await?;
    let acked = match (&watched, relay.metrics_addr()) {
        (Ok(_), Some(addr)) => watch_acked(t0, limit, addr, last).await,
        (Ok(_), None) => Err(anyhow::anyhow!("the relay serves no metrics")),
        (Err(_), _) => Ok(Duration::ZERO),
    };
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));

    // The relay refreshes its buffer figures once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let hub_commits = scrape(hub.api_addr(), "trellis_hub_store_commits_total").await;
    let hub_applied = scrape(hub.api_addr(), "trellis_hub_records_applied_total").await;
    let hub_duplicates = scrape(hub.api_addr(), "trellis_hub_duplicate_records_total").await;
    let hub_rejected = scrape(hub.api_addr(), "trellis_hub_rejected_records_total").await;
    let relay_commits = match relay.metrics_addr() {
        Some(a) => scrape(a, "trellis_relay_buffer_fsyncs").await,
        None => None,
    };
    shutdown.cancel();
    relay.stopped().await;
    hub.stopped().await;
    let (samples, hub_all) = watched?;
    let relay_acked = acked?;

    let at = |frac: f64| {
        samples
            .iter()
            .find(|(_, seq)| cum[*seq as usize] as f64 >= frac * frame_bytes as f64)
            .copied()
    };
    let (steady_bytes_per_s, steady_records_per_s) = match (at(0.1), at(0.9)) {
        (Some((t1, s1)), Some((t2, s2))) if t2 > t1 && s2 > s1 => {
            let dt = (t2 - t1).as_secs_f64();
            (
                (cum[s2 as usize] - cum[s1 as usize]) as f64 / dt,
                (s2 - s1) as f64 / dt,
            )
        }
        // Too fast to sample: the whole drain.
        _ => (
            frame_bytes as f64 / hub_all.as_secs_f64(),
            last as f64 / hub_all.as_secs_f64(),
        ),
    };
    Ok(Drain {
        records: last,
        frame_bytes,
        buffer_bytes,
        hub_all,
        relay_acked,
        steady_bytes_per_s,
        steady_records_per_s,
        hub_commits,
        relay_commits,
        hub_applied,
        hub_duplicates,
        hub_rejected,
        cpu,
    })
}

type Samples = Vec<(Duration, u64)>;

/// Polls the hub's store until it has applied the relay's stream through
/// `last`.
fn watch_hub(
    t0: Instant,
    limit: Duration,
    hub_db: &Path,
    stream: u64,
    last: u64,
) -> anyhow::Result<(Samples, Duration)> {
    let reader = StoreReader::new(hub_db);
    let mut samples = Vec::new();
    loop {
        let t = t0.elapsed();
        let applied = reader.applied_through(RELAY, stream)?.unwrap_or(0);
        // The relay's own new records come after the backlog.
        samples.push((t, applied.min(last)));
        if applied >= last {
            return Ok((samples, t));
        }
        if t > limit {
            bail!("the hub stored only {applied} of {last} records within {limit:?}");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls the relay's metrics until it has taken an acknowledgement through
/// `last`.
async fn watch_acked(
    t0: Instant,
    limit: Duration,
    metrics: SocketAddr,
    last: u64,
) -> anyhow::Result<Duration> {
    loop {
        let t = t0.elapsed();
        let acked = scrape(metrics, "trellis_relay_acked_through").await;
        if acked.is_some_and(|a| a >= last as f64) {
            return Ok(t);
        }
        if t > limit {
            bail!("the relay has acknowledgements through {acked:?} of {last} after {limit:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One value from a Prometheus text page on 127.0.0.1.
async fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    let page = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let page = tokio::time::timeout(Duration::from_secs(5), page)
        .await
        .ok()?
        .ok()?;
    page.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok()).flatten()
    })
}

async fn replay_bench(
    dir: &Path,
    ceiling_hours: &[u64],
    long_outage_hours: Option<u64>,
) -> anyhow::Result<()> {
    let creds = credentials()?;
    let now = unix_ms();
    let hour = 3600u64;

    // Live ingest: what the relay of the modelled site makes per second.
    let quiet = site_records(now - hour * 1000, hour, 0);
    let busy = site_records(now - hour * 1000, hour, CHURN_PER_MIN);
    let (quiet_mix, busy_mix) = (mix(&quiet), mix(&busy));
    let live_quiet = quiet_mix.frame_bytes as f64 / hour as f64;
    let live = busy_mix.frame_bytes as f64 / hour as f64;
    let full = site_summary(now, 0);
    let full_record = NewRecord {
        at_ms: now,
        body: RecordBody::Summary(Box::new(full.clone())),
    };
    let healthy_record = NewRecord {
        at_ms: now,
        body: RecordBody::Summary(Box::new(healthy_summary(now))),
    };
    let event_record = NewRecord {
        at_ms: now,
        body: RecordBody::Event(check_event(0)),
    };
    println!();
    let nodes = thousands(u64::from(SITE_NODES));
    println!("2. replay drain rate vs live ingest rate of a {nodes}-node site");
    println!();
    println!(
        "record sizes (postcard body / uplink frame): summary of a degraded site, every list at its bound \
         ({} dead listed, {} failing checks, {} worst nodes): {} / {} B; healthy-site summary: {} / {} B; \
         check-change event: {} / {} B",
        full.dead.len(),
        full.failing_checks.len(),
        full.worst.len(),
        body_len(&full_record.body),
        new_frame_len(&full_record, 1000),
        body_len(&healthy_record.body),
        new_frame_len(&healthy_record, 1000),
        body_len(&event_record.body),
        new_frame_len(&event_record, 1000),
    );
    println!();
    println!(
        "{:<70} {:>10} {:>8} {:>10}",
        "live ingest (bound-size summaries)", "summ./h", "events/h", "frame B/s"
    );
    println!(
        "{:<70} {:>10} {:>8} {:>10}",
        "quiet site: a summary every 5 s",
        thousands(quiet_mix.summaries),
        thousands(quiet_mix.events),
        thousands(live_quiet.round() as u64)
    );
    println!(
        "{:<70} {:>10} {:>8} {:>10}",
        format!("churning site: {CHURN_PER_MIN} check changes/min, each an event + a summary"),
        thousands(busy_mix.summaries),
        thousands(busy_mix.events),
        thousands(live.round() as u64)
    );

    // Runs: the one-hour outage at the default rate, then backlogs of
    // several sizes with the limit lifted (the one-hour one among them).
    let default_rate = RelayConfig::default().uplink.replay_bytes_per_s;
    let mut plan: Vec<(u64, u64)> = vec![(1, default_rate)];
    plan.extend(ceiling_hours.iter().map(|&h| (h, UNLIMITED)));
    if let Some(h) = long_outage_hours.filter(|&h| h > 1) {
        plan.push((h, default_rate));
    }
    let mut results: Vec<(u64, u64, Drain)> = Vec::new();
    for (i, &(hours, rate)) in plan.iter().enumerate() {
        let records = if hours == 1 {
            busy.clone()
        } else {
            site_records(now - hours * hour * 1000, hours * hour, CHURN_PER_MIN)
        };
        let run_dir = dir.join(format!("drain-{i}"));
        let d = drain(&creds, &run_dir, &records, rate).await?;
        std::fs::remove_dir_all(&run_dir)?;
        results.push((hours, rate, d));
    }
    let rate_name = |rate: u64| {
        if rate == default_rate {
            format!("{} B/s (default)", thousands(rate))
        } else {
            "limit lifted".to_owned()
        }
    };
    let opt = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| thousands(v as u64));

    println!();
    println!(
        "{:<42} {:>11} {:>11} {:>8} {:>10} {:>10} {:>11}",
        "replay to a hub, QUIC on 127.0.0.1",
        "backlog B",
        "drain B/s",
        "KiB/s",
        "records/s",
        "CPU cores",
        "drain/live"
    );
    for (hours, rate, d) in &results {
        println!(
            "{:<42} {:>11} {:>11} {:>8} {:>10} {:>10} {:>11}",
            format!("{}, {hours} h backlog", rate_name(*rate)),
            thousands(d.frame_bytes),
            thousands(d.steady_bytes_per_s.round() as u64),
            thousands((d.steady_bytes_per_s / 1024.0).round() as u64),
            thousands(d.steady_records_per_s.round() as u64),
            d.cpu.map_or("n/a".to_owned(), |c| format!(
                "{:.2}",
                c.as_secs_f64() / d.relay_acked.as_secs_f64()
            )),
            ratio(d.steady_bytes_per_s / live),
        );
    }
    println!();
    println!(
        "bytes: uplink frames (what the replay limit counts). drain: bytes the hub stored between 10 % and \
         90 % of the backlog / that time (the whole drain if it was too quick to sample). live: {} frame \
         B/s (churning site). CPU cores: CPU time of this process (relay, hub, poller) / drain time.",
        thousands(live.round() as u64)
    );

    let (_, _, first) = &results[0];
    println!();
    println!(
        "3. time to drain an outage of a {nodes}-node site; one hour = {} records ({} summaries, {} \
         events, {CHURN_PER_MIN} check changes/min), {} B of frames, {} B counted in the buffer",
        thousands(first.records),
        thousands(busy_mix.summaries),
        thousands(busy_mix.events),
        thousands(first.frame_bytes),
        thousands(first.buffer_bytes),
    );
    println!();
    println!(
        "{:<38} {:>11} {:>12} {:>12} {:>12} {:>10} {:>11} {:>13}",
        "",
        "backlog B",
        "hub has all",
        "relay acked",
        "outage/drain",
        "mean B/s",
        "hub commits",
        "relay commits"
    );
    let mut shown: Vec<&(u64, u64, Drain)> = results.iter().filter(|(h, ..)| *h == 1).collect();
    shown.extend(
        results
            .iter()
            .filter(|(h, r, _)| *h > 1 && *r == default_rate),
    );
    for (hours, rate, d) in shown {
        println!(
            "{:<38} {:>11} {:>12} {:>12} {:>12} {:>10} {:>11} {:>13}",
            format!("{hours} h outage, {}", rate_name(*rate)),
            thousands(d.frame_bytes),
            format!("{:.2} s", d.hub_all.as_secs_f64()),
            format!("{:.2} s", d.relay_acked.as_secs_f64()),
            format!(
                "{}x",
                thousands(((*hours * hour) as f64 / d.relay_acked.as_secs_f64()).round() as u64)
            ),
            thousands((d.frame_bytes as f64 / d.hub_all.as_secs_f64()).round() as u64),
            opt(d.hub_commits),
            opt(d.relay_commits),
        );
    }
    println!();
    println!(
        "times from Relay::start (buffer open, QUIC handshake included). hub has all: the hub's store \
         has applied the stream through the last backlog record. relay acked: the relay holds the hub's \
         acknowledgement of the last one (acked through = persisted through the backlog). commits: the \
         hub's store transactions and the relay's buffer transactions (appends of its own new \
         summaries, deletions of acknowledged records) until 1 s after the drain, each one fsync."
    );
    println!();
    for (hours, rate, d) in &results {
        println!(
            "check, {hours} h at {}: backlog {} records; the hub applied {} (the backlog and the relay's own \
             new records), ignored {} duplicates, refused {}",
            rate_name(*rate),
            thousands(d.records),
            opt(d.hub_applied),
            opt(d.hub_duplicates),
            opt(d.hub_rejected),
        );
    }
    Ok(())
}

/// CPU time of this process so far (user + system), from /proc at the
/// kernel's usual 100 ticks a second.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

// ---------------------------------------------------------------------------

/// A ratio, with decimals only while they say something.
fn ratio(x: f64) -> String {
    if x >= 100.0 {
        format!("{}x", thousands(x.round() as u64))
    } else {
        format!("{x:.1}x")
    }
}
