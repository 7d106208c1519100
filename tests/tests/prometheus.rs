//! A real Prometheus scrapes a real mesh: a hub, a relay and two nodes on
//! 127.0.0.1, each `/metrics` a static target. Proves that what the members
//! serve is what Prometheus accepts (format, content type, names) and that
//! the hub's fleet gauges carry the fleet.
//!
//! Needs the `prometheus` binary (Debian: `apt-get install prometheus`).
//! Without it the test fails when `CI` is set and is skipped otherwise.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Mesh, eventually, get_json, serial};

const REGION: &str = "eu";
const SITE: &str = "par";

/// Whether `prometheus` can run; `None` (after saying why) when the test
/// should be skipped.
fn prometheus_available() -> Option<()> {
    let found = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some(());
    }
    let why =
        "the `prometheus` binary is not on PATH; install it (Debian: apt-get install prometheus)";
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("skipping the Prometheus scrape test: {why}");
    None
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port with `config`, keeping its
    /// data under `dir` and its log in `dir/prometheus.log`.
    fn start(config: &Path, dir: &Path) -> Prometheus {
        // Free now; Prometheus binds it a moment later.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// The samples of an instant query: (labels, value).
    fn query(&self, promql: &str) -> Vec<(Value, f64)> {
        let url = format!("{}/api/v1/query?query={}", self.url, url_encode(promql));
        let Some(answer) = get_json(&url) else {
            return Vec::new();
        };
        answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let v = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].clone(), v))
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn prometheus_scrapes_every_member_and_sees_the_fleet() {
    if prometheus_available().is_none() {
        return;
    }
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    mesh.issue("relay", REGION, SITE, "par-relay");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (mut relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    let relay_metrics = relay.wait_field("relay ready", "metrics", Duration::from_secs(5));
    // A check on each node, so that check durations have something to show.
    let check =
        "[[checks]]\nname = \"ok\"\ncommand = [\"true\"]\ninterval = \"1s\"\ntimeout = \"500ms\"\n";
    let mut nodes = Vec::new();
    let mut node_metrics = Vec::new();
    for i in 0..2 {
        let name = format!("par-n{i}");
        mesh.issue("node", REGION, SITE, &name);
        let (p, metrics) = mesh.start_node(&name, &gossip, check);
        nodes.push(p);
        node_metrics.push(metrics);
    }
    let hub_target = api.strip_prefix("http://").expect("an http:// API URL");
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let node_targets: Vec<&str> = node_metrics.iter().map(String::as_str).collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
         scrape_configs:\n\
         \x20 - job_name: hub\n    static_configs:\n      - targets: [{}]\n\
         \x20 - job_name: relay\n    static_configs:\n      - targets: [{}]\n\
         \x20 - job_name: node\n    static_configs:\n      - targets: [{}]\n",
        quoted(&[hub_target]),
        quoted(&[&relay_metrics]),
        quoted(&node_targets),
    );
    let dir = mesh.path().join("prometheus");
    std::fs::create_dir_all(&dir).expect("prometheus dir");
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).expect("write prometheus.yml");
    let prom = Prometheus::start(&config_path, &dir);

    let mut passing = Vec::new();
    let mut up = Vec::new();
    let mut checks = Vec::new();
    let mut lag = Vec::new();
    let mut oldest = Vec::new();
    let seen = eventually(Duration::from_secs(90), || {
        passing = prom.query("trellis_hub_site_nodes{status=\"passing\"}");
        up = prom.query("up");
        checks = prom.query("trellis_node_check_duration_seconds_count{check=\"ok\"} > 0");
        lag = prom.query("trellis_hub_uplink_lag_seconds");
        oldest = prom.query("trellis_relay_buffer_oldest_age_seconds");
        passing.len() == 1
            && passing[0].1 == 2.0
            && up.len() == 4
            && up.iter().all(|(_, v)| *v == 1.0)
            && checks.len() == 2
            && lag.len() == 1
            && oldest.len() == 1
    });
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    assert!(
        seen,
        "Prometheus never saw the mesh:\n passing {passing:?}\n up {up:?}\n checks {checks:?}\n \
         lag {lag:?}\n oldest {oldest:?}\nits log:\n{log}"
    );
    let labels = &passing[0].0;
    assert_eq!(
        (labels["region"].as_str(), labels["site"].as_str()),
        (Some(REGION), Some(SITE))
    );
    let jobs: std::collections::BTreeSet<&str> =
        up.iter().filter_map(|(l, _)| l["job"].as_str()).collect();
    assert_eq!(jobs, ["hub", "node", "relay"].into());
    assert_eq!(lag[0].0["relay"], "par-relay");
    assert!(lag[0].1 < 60.0, "the relay's summaries are fresh: {lag:?}");
    let healthy = prom.query("trellis_hub_sites{status=\"healthy\"}");
    assert_eq!(healthy.len(), 1, "{healthy:?}");
    assert_eq!(healthy[0].1, 1.0);
    drop(prom);
    drop(nodes);
}
