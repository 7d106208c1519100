//! Remediation runbooks through a real mesh: a `[[runbook]]` in the fleet's
//! configuration, applied through hub and relay, runs on each node whose
//! check fails, with the site's WAN link cut (the relay inside the site
//! grants the leases), at most `max_per_site` at once; the check recovers,
//! the node's audit file holds the run with its output, and the hub's
//! audit log has it once the link is back. A runbook whose action keeps
//! failing trips its breaker and opens an incident.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::proxy::UdpProxy;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, run, serial};

const REGION: &str = "eu";
const SITE: &str = "par";

struct Site {
    mesh: Mesh,
    api: String,
    proxy: UdpProxy,
    procs: Vec<Proc>,
}

fn node_name(i: usize) -> String {
    format!("par-n{i}")
}

impl Site {
    /// A hub, a relay whose uplink goes through a proxy, and `n` nodes, each
    /// with a check `svc` that is critical unless its flag file exists.
    fn start(n: usize) -> Site {
        let mesh = Mesh::new();
        mesh.issue("hub", REGION, "", "hub-1");
        mesh.issue("relay", REGION, SITE, "par-relay");
        mesh.issue("operator", "", "", "alice");
        let (hub, uplink, api) = mesh.start_hub("hub-1", "");
        let proxy = UdpProxy::with_seed(uplink.parse().unwrap(), 7).unwrap();
        let (relay, gossip) = mesh.start_relay(
            "par-relay",
            &proxy.listen_addr().to_string(),
            "[uplink]\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
        );
        let mut procs = vec![hub, relay];
        std::fs::create_dir_all(mesh.path().join("flags")).unwrap();
        for i in 0..n {
            let name = node_name(i);
            mesh.issue("node", REGION, SITE, &name);
            std::fs::write(mesh.path().join(format!("flags/{name}")), "ok").unwrap();
            let flag = mesh.path().join(format!("flags/{name}"));
            let extra = format!(
                "[node]\nlabels = {{ role = \"web\" }}\n\
                 [config]\nstate_dir = {:?}\n\
                 [[checks]]\nname = \"svc\"\ninterval = \"1s\"\ntimeout = \"1s\"\n\
                 command = [\"sh\", \"-c\", \"test -f {} || exit 2\"]\n",
                mesh.path().join(format!("{name}/state")),
                flag.display()
            );
            procs.push(mesh.start_node(&name, &gossip, &extra).0);
        }
        let site = Site {
            mesh,
            api,
            proxy,
            procs,
        };
        let alive = eventually(Duration::from_secs(40), || {
            fleet_site(&site.api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == n)
        });
        assert!(alive, "the site never showed {n} nodes alive");
        site
    }

    fn flag(&self, i: usize) -> PathBuf {
        self.mesh.path().join(format!("flags/{}", node_name(i)))
    }

    /// Signs and applies the fleet directory holding `manifest`, waiting
    /// for every node.
    fn apply(&self, manifest: &str) -> Output {
        let p = self.mesh.path();
        let fleet = p.join("fleet");
        std::fs::create_dir_all(&fleet).unwrap();
        std::fs::write(fleet.join("runbooks.toml"), manifest).unwrap();
        run(
            "trellis",
            &[
                "config",
                "apply",
                fleet.to_str().unwrap(),
                "-m",
                "runbooks",
                "--timeout",
                "60s",
                "--cert",
                p.join("certs/alice.crt").to_str().unwrap(),
                "--key",
                p.join("certs/alice.key").to_str().unwrap(),
                "--ca",
                p.join("ca/ca.crt").to_str().unwrap(),
                "--hub",
                &self.api,
            ],
        )
    }

    fn audit_file(&self, i: usize) -> PathBuf {
        self.mesh
            .path()
            .join(format!("{}/state/runbook-runs.jsonl", node_name(i)))
    }

    fn hub_audit(&self) -> String {
        let out = run("trellis", &["audit", "log", "--hub", &self.api]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The most actions that ran at once, from `start NODE T` / `end NODE T`
/// lines, and the nodes that started one.
fn concurrency(log: &str) -> (usize, Vec<String>) {
    let mut events: Vec<(u128, i32, String)> = Vec::new();
    for line in log.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        if let [what, node, t] = parts[..] {
            let t: u128 = t.parse().expect("a time");
            events.push((t, if what == "start" { 1 } else { -1 }, node.to_owned()));
        }
    }
    // Ends before starts at the same instant.
    events.sort_by_key(|(t, d, _)| (*t, *d));
    let (mut now, mut most) = (0i32, 0i32);
    let mut started = Vec::new();
    for (_, d, node) in events {
        now += d;
        most = most.max(now);
        if d == 1 {
            started.push(node);
        }
    }
    started.sort();
    (most as usize, started)
}

#[test]
fn a_failing_check_is_remediated_on_each_node_at_most_two_at_once_while_the_site_is_cut_off() {
    let _serial = serial();
    let site = Site::start(4);
    let log = site.mesh.path().join("actions.log");
    let flags = site.mesh.path().join("flags");
    // The action notes when it starts and ends, takes 2 s, and fixes the
    // check by putting the node's flag back.
    let action = format!(
        "echo start $TRELLIS_NODE_NAME $(date +%s%N) >> {log}; sleep 2; \
         echo restored $TRELLIS_NODE_NAME; \
         echo end $TRELLIS_NODE_NAME $(date +%s%N) >> {log}; \
         echo ok > {flags}/$TRELLIS_NODE_NAME",
        log = log.display(),
        flags = flags.display()
    );
    let manifest = format!(
        "[[runbook]]\nname = \"restore-svc\"\ncheck = \"svc\"\nafter = \"2s\"\n\
         run = {action:?}\ntimeout = \"20s\"\nverify = \"15s\"\nmax_per_site = 2\n\
         min_interval = \"1m\"\nselector = {{ labels = {{ role = \"web\" }} }}\n"
    );
    let out = site.apply(&manifest);
    assert!(out.status.success(), "apply: {out:?}");

    // The WAN goes; then the service fails on every node of the site.
    site.proxy.blackhole(true);
    for i in 0..4 {
        std::fs::remove_file(site.flag(i)).unwrap();
    }
    let all_back = eventually(Duration::from_secs(60), || {
        (0..4).all(|i| site.flag(i).exists())
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(all_back, "not every node was remediated: {text}");
    let (most, started) = concurrency(&text);
    assert_eq!(
        started,
        (0..4).map(node_name).collect::<Vec<_>>(),
        "one run per node: {text}"
    );
    assert_eq!(
        most, 2,
        "at most max_per_site at once, and the limit used: {text}"
    );

    // Each node's audit file has its run, fixed, with the action's output.
    for i in 0..4 {
        let fixed = eventually(Duration::from_secs(20), || {
            records(&site.audit_file(i))
                .iter()
                .any(|r| r["result"] == "fixed")
        });
        let all = records(&site.audit_file(i));
        assert!(fixed, "node {i}: {all:?}");
        let run = all.iter().find(|r| r["result"] == "fixed").unwrap();
        assert_eq!(run["rule"], "restore-svc");
        let output = run["outcome"]["output"].as_str().unwrap();
        assert!(
            output.contains(&format!("restored {}", node_name(i))),
            "{run}"
        );
    }
    // The node says so itself, from its state directory.
    let config = site.mesh.path().join("par-n0.toml");
    let out = run(
        "trellis-node",
        &["runbooks", "--config", config.to_str().unwrap()],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(said.contains("restore-svc: 1 run(s)"), "{said}");
    assert!(said.contains("breaker closed"), "{said}");
    assert!(said.contains("| restored par-n0"), "{said}");

    // Two of them waited for a place: blocked, then ran.
    let blocked: usize = (0..4)
        .map(|i| {
            records(&site.audit_file(i))
                .iter()
                .filter(|r| r["result"] == "blocked")
                .count()
        })
        .sum();
    assert!(blocked >= 2, "the nodes that waited said so");

    // The link comes back: the hub's audit log shows every run.
    site.proxy.blackhole(false);
    let audited = eventually(Duration::from_secs(60), || {
        let audit = site.hub_audit();
        (0..4).all(|i| {
            audit.lines().any(|l| {
                l.contains("runbook.ran") && l.contains(&format!("{SITE}/{}", node_name(i)))
            })
        })
    });
    assert!(audited, "{}", site.hub_audit());
    let mut site = site;
    assert!(site.procs.iter_mut().all(|p| p.is_running()));
}

#[test]
fn a_runbook_that_keeps_failing_trips_its_breaker_and_opens_an_incident() {
    let _serial = serial();
    let site = Site::start(1);
    let manifest = "[[runbook]]\nname = \"hopeless\"\ncheck = \"svc\"\nafter = \"1s\"\n\
         run = \"echo cannot fix this; exit 3\"\nmax_per_site = 1\nmin_interval = \"1s\"\n\
         breaker_failures = 2\nbreaker_window = \"1h\"\n";
    let out = site.apply(manifest);
    assert!(out.status.success(), "apply: {out:?}");
    std::fs::remove_file(site.flag(0)).unwrap();

    let incident = |v: &Value| -> Option<Value> {
        v["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["check"] == "runbook:hopeless" && i["resolved_ms"].is_null())
            .cloned()
    };
    let mut found = None;
    let opened = eventually(Duration::from_secs(60), || {
        found = get_json(&format!("{}/api/v1/incidents", site.api)).and_then(|v| incident(&v));
        found.is_some()
    });
    let records = records(&site.audit_file(0));
    assert!(opened, "no incident for the tripped breaker: {records:?}");
    let i = found.unwrap();
    assert_eq!(i["kind"], "node-check-failing", "{i}");
    let detail = i["detail"].as_str().unwrap();
    assert!(detail.starts_with("tripped: 2 failed runs"), "{i}");
    assert!(detail.contains("cannot fix this"), "{i}");
    let results: Vec<&str> = records
        .iter()
        .filter_map(|r| r["result"].as_str())
        .collect();
    assert_eq!(
        results.iter().filter(|r| **r == "failed").count(),
        2,
        "{results:?}"
    );
    assert!(results.contains(&"tripped"), "{results:?}");
    // Open: it runs no more, however long the check stays bad.
    std::thread::sleep(Duration::from_secs(4));
    let again = self::records(&site.audit_file(0));
    assert_eq!(
        again.iter().filter(|r| r["result"] == "failed").count(),
        2,
        "{again:?}"
    );
    let audit = site.hub_audit();
    assert!(audit.contains("runbook.tripped"), "{audit}");
}
