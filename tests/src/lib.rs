//! Harness for whole-mesh tests: real `trellis-*` processes on 127.0.0.1,
//! real certificates from the real `trellis ca` commands, real temp dirs.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! the test command in the README does); [`bin`] finds them next to the
//! test executable and says what to run if they are missing.
//!
//! # Layout
//! - [`bin`], [`run`]: locate and run the binaries.
//! - [`Proc`]: a spawned member with its log captured line by line.
//! - [`Mesh`]: a CA directory plus helpers to write configs and start
//!   hubs, relays and nodes.
//! - [`eventually`]: bounded polling.
//! - [`nats`]: a small NATS client, for the JetStream baseline of the
//!   buffer benchmark.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod nats;
pub mod netns;
pub mod proxy;
pub mod report;

/// Whole-mesh tests share two cores; running them one at a time keeps
/// failure detection timings meaningful.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Path of a workspace binary, built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Runs a binary to completion.
pub fn run(name: &str, args: &[&str]) -> Output {
    run_in(None, name, args)
}

/// A command for `bin`, inside network namespace `netns` if given.
fn command(netns: Option<&str>, bin_name: &str) -> Command {
    match netns {
        None => Command::new(bin(bin_name)),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin(bin_name));
            c
        }
    }
}

/// Runs a binary to completion, inside network namespace `netns` if given.
pub fn run_in(netns: Option<&str>, name: &str, args: &[&str]) -> Output {
    command(netns, name)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// Polls `cond` every 200 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A running member process whose stderr is captured.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `bin` with `args`, logging to `log` as well as memory.
    pub fn spawn(name: &str, bin_name: &str, args: &[&str], log: &Path) -> Proc {
        Self::spawn_in(None, name, bin_name, args, log)
    }

    /// Like [`Proc::spawn`], inside network namespace `netns` if given
    /// (`ip netns exec` runs the binary itself, so signals reach it).
    pub fn spawn_in(
        netns: Option<&str>,
        name: &str,
        bin_name: &str,
        args: &[&str],
        log: &Path,
    ) -> Proc {
        let mut child = command(netns, bin_name)
            .args(args)
            .env("TRELLIS_LOG", "info,quinn=warn,chitchat=error")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin_name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let file = Arc::new(Mutex::new(file));
        for pipe in [
            Box::new(child.stderr.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("piped")),
        ] {
            let (lines, file) = (lines.clone(), file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(file.lock().expect("log"), "{line}");
                    lines.lock().expect("lines").push(line);
                }
            });
        }
        Proc {
            name: name.to_owned(),
            child,
            lines,
        }
    }

    /// Every line logged so far.
    pub fn log(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// The first logged line containing `needle`, waiting up to `limit`.
    pub fn wait_line(&mut self, needle: &str, limit: Duration) -> Option<String> {
        let mut found = None;
        eventually(limit, || {
            found = self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .find(|l| l.contains(needle))
                .cloned();
            found.is_some() || self.child.try_wait().ok().flatten().is_some()
        });
        found
    }

    /// The value of `key=value` in the first line containing `needle`.
    pub fn wait_field(&mut self, needle: &str, key: &str, limit: Duration) -> String {
        let line = self.wait_line(needle, limit).unwrap_or_else(|| {
            panic!(
                "{} never logged {needle:?}; its log:\n{}",
                self.name,
                self.log().join("\n")
            )
        });
        field(&line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// How the process ended, if it has.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("wait")
    }

    /// SIGTERM, then wait up to `limit` for a clean exit.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let mut status = None;
        eventually(limit, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` (unquoted, up to whitespace) in a log line.
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&pat))
        .map(|v| v.trim_matches('"').to_owned())
}

/// A test mesh: a temp dir with a CA made by `trellis ca init`.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    netns: std::cell::RefCell<Option<String>>,
}

impl Default for Mesh {
    fn default() -> Self {
        Self::new()
    }
}

impl Mesh {
    pub fn new() -> Mesh {
        let dir = tempfile::Builder::new()
            .prefix("trellis-test-")
            .tempdir()
            .expect("temp dir");
        let ca = dir.path().join("ca");
        let out = run("trellis", &["ca", "init", "--dir", ca.to_str().unwrap()]);
        assert!(out.status.success(), "ca init: {out:?}");
        Mesh {
            dir,
            netns: std::cell::RefCell::new(None),
        }
    }

    /// Members started from now on run in network namespace `ns` (or in
    /// the test's own with `None`).
    pub fn set_netns(&self, ns: Option<&str>) {
        *self.netns.borrow_mut() = ns.map(str::to_owned);
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The credentials of a member issued with [`Mesh::issue`], for a test
    /// that speaks the mesh protocols itself.
    pub fn creds(&self, name: &str) -> trellis_node::tls::Credentials {
        let p = self.path();
        trellis_node::tls::Credentials::load(
            &p.join("ca/ca.crt"),
            &p.join(format!("certs/{name}.crt")),
            &p.join(format!("certs/{name}.key")),
        )
        .expect("credentials issued by Mesh::issue")
    }

    /// Issues a certificate with `trellis ca issue` into `certs/`.
    pub fn issue(&self, role: &str, region: &str, site: &str, name: &str) {
        self.issue_with(role, region, site, name, &[]);
    }

    /// Issues a certificate with `trellis ca issue` and `extra` arguments
    /// (`--days 1`) into `certs/`; returns its path.
    pub fn issue_with(
        &self,
        role: &str,
        region: &str,
        site: &str,
        name: &str,
        extra: &[&str],
    ) -> PathBuf {
        let ca = self.path().join("ca");
        let out = self.path().join("certs");
        let mut args = vec![
            "ca",
            "issue",
            "--dir",
            ca.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--role",
            role,
            "--name",
            name,
        ];
        if !region.is_empty() {
            args.extend(["--region", region]);
        }
        if !site.is_empty() {
            args.extend(["--site", site]);
        }
        args.extend(extra);
        let o = run("trellis", &args);
        assert!(o.status.success(), "ca issue {name}: {o:?}");
        self.path().join(format!("certs/{name}.crt"))
    }

    /// The `[identity]` section for a member issued with [`Mesh::issue`].
    pub fn identity_toml(&self, name: &str) -> String {
        let p = self.path();
        format!(
            "[identity]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            p.join("ca/ca.crt"),
            p.join(format!("certs/{name}.crt")),
            p.join(format!("certs/{name}.key")),
        )
    }

    /// Writes `NAME.toml` (`base` with `extra` merged over it) and returns
    /// its path.
    pub fn write_config(&self, name: &str, base: &str, extra: &str) -> PathBuf {
        let path = self.path().join(format!("{name}.toml"));
        std::fs::write(&path, merge_toml(base, extra)).expect("write config");
        path
    }

    fn spawn(&self, name: &str, bin_name: &str, config: &Path) -> Proc {
        Proc::spawn_in(
            self.netns.borrow().as_deref(),
            name,
            bin_name,
            &["--config", config.to_str().unwrap()],
            &self.path().join(format!("{name}.log")),
        )
    }

    /// Starts a hub on ephemeral ports; returns it with its uplink address
    /// and API URL.
    pub fn start_hub(&self, name: &str, extra: &str) -> (Proc, String, String) {
        let cfg = format!(
            "{}\n[uplink]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"{name}/hub.db\"\n",
            self.identity_toml(name)
        );
        let path = self.write_config(name, &cfg, extra);
        let mut p = self.spawn(name, "trellis-hub", &path);
        let uplink = p.wait_field("hub ready", "uplink", Duration::from_secs(20));
        let api = p.wait_field("hub ready", "api", Duration::from_secs(20));
        (p, uplink, api)
    }

    /// Starts a relay uplinking to `hub`; returns it with its gossip address.
    /// Like a node's ([`Mesh::start_node`]), its disk check warns only at 100 %.
    pub fn start_relay(&self, name: &str, hub: &str, extra: &str) -> (Proc, String) {
        let cfg = format!(
            "{}\n[gossip]\nlisten = \"127.0.0.1:0\"\n[uplink]\nhubs = [\"{hub}\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[buffer]\npath = \"{name}/outage.db\"\n[health]\ndisk_warning_pct = 100\ndisk_critical_pct = 100\n",
            self.identity_toml(name)
        );
        let path = self.write_config(name, &cfg, extra);
        let mut p = self.spawn(name, "trellis-relay", &path);
        let gossip = p.wait_field("relay ready", "gossip", Duration::from_secs(20));
        (p, gossip)
    }

    /// Starts a node seeded with `seed`; returns it with its metrics address.
    /// It keeps its patches in `<mesh dir>/<name>/patches` and its state in
    /// `<mesh dir>/<name>/state` unless `extra` sets `[patch] dir` or
    /// `[config] state_dir`.
    ///
    /// Its disk check warns only at 100 % unless `extra` says otherwise: the
    /// tests run on shared machines whose disks may be over the default 90 %,
    /// and what they check is the mesh, not the machine's disk.
    pub fn start_node(&self, name: &str, seed: &str, extra: &str) -> (Proc, String) {
        let cfg = format!(
            "{}\n[gossip]\nlisten = \"127.0.0.1:0\"\nseeds = [\"{seed}\"]\n[metrics]\nlisten = \"127.0.0.1:0\"\n[patch]\ndir = \"{name}/patches\"\n[config]\nstate_dir = \"{name}/state\"\n[health]\ndisk_warning_pct = 100\ndisk_critical_pct = 100\n",
            self.identity_toml(name)
        );
        let path = self.write_config(name, &cfg, extra);
        let mut p = self.spawn(name, "trellis-node", &path);
        let metrics = p.wait_field("node ready", "metrics", Duration::from_secs(20));
        (p, metrics)
    }
}

/// Merges the tables of `extra` over those of `base` (both TOML).
pub fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let mut a: toml::Table = base.parse().expect("base config is TOML");
    let b: toml::Table = extra.parse().expect("extra config is TOML");
    merge(&mut a, b);
    toml::to_string(&a).expect("serialisable")
}

/// GETs a URL and parses JSON; `None` if unreachable or not JSON.
pub fn get_json(url: &str) -> Option<Value> {
    http_get(url).and_then(|(_, body)| serde_json::from_str(&body).ok())
}

/// A minimal blocking HTTP/1.1 GET over a TCP socket (status, body).
pub fn http_get(url: &str) -> Option<(u16, String)> {
    http_request("GET", url, &[], "")
}

/// A minimal blocking HTTP/1.1 request over a TCP socket, with extra
/// headers and a body (status, body).
pub fn http_request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<(u16, String)> {
    use std::io::Read;
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    write!(s, "{head}\r\n{body}").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((status, body))
}

/// The body of a chunked HTTP/1.1 response, its chunks joined.
pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The fleet totals and the named site's row from `GET /api/v1/fleet`.
pub fn fleet_site(api: &str, site: &str) -> Option<(Value, Value)> {
    let f = get_json(&format!("{api}/api/v1/fleet"))?;
    let row = f["sites"]
        .as_array()?
        .iter()
        .find(|s| s["site"] == site)?
        .clone();
    Some((f["totals"].clone(), row))
}

/// A sample from a member's `/metrics` at `addr`: the first line starting
/// with `series` (a metric name, with its labels if any).
pub fn metric(addr: &str, series: &str) -> Option<f64> {
    let (_, body) = http_get(&format!("http://{addr}/metrics"))?;
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The last `lines` lines of every process log (`*.log`) in `dir`, each
/// under its file name: what a test prints when a wait fails, to say why.
pub fn log_tails(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "log"));
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        out.push_str(&format!("--- {}\n", f.display()));
        for l in &all[all.len().saturating_sub(lines)..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
