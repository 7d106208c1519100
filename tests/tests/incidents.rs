//! Incidents through a real mesh: a site cut off from its hub is one
//! incident (not one per node), posted to a webhook as it opens and
//! resolves; a patch that breaks a node's check during a rollout opens an
//! incident that names the rollout.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use trellis_tests::proxy::UdpProxy;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, run, serial};

const REGION: &str = "eu";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A webhook endpoint: answers every POST with 200 and keeps its body.
struct Webhook {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Webhook {
    fn start() -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_ok()
                    && let Ok(v) = serde_json::from_slice(&body)
                {
                    keep.lock().unwrap().push(v);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Webhook { url, bodies }
    }

    /// The bodies received with `event` for incidents of `kind`.
    fn received(&self, event: &str, kind: &str) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["event"] == event && b["incident"]["kind"] == kind)
            .cloned()
            .collect()
    }
}

fn incidents(api: &str, state: &str) -> Vec<Value> {
    get_json(&format!("{api}/api/v1/incidents?state={state}"))
        .and_then(|v| v["incidents"].as_array().cloned())
        .unwrap_or_default()
}

/// The end of every process's log, to say why a wait failed.
fn logs(dir: &Path) -> String {
    trellis_tests::log_tails(dir, 15)
}

#[test]
fn a_site_cut_off_is_one_incident_posted_to_the_webhook_and_resolved_when_it_is_back() {
    let _serial = serial();
    let hook = Webhook::start();
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    let (_hub, uplink, api) = mesh.start_hub(
        "hub-1",
        &format!(
            "[uplink]\nsilence_timeout = \"3s\"\n[fleet]\nstale_after = \"3s\"\n\
             [incidents]\nwebhooks = [\"{}\"]\n",
            hook.url
        ),
    );
    mesh.issue("relay", REGION, "par", "par-relay");
    let proxy = UdpProxy::start(uplink.parse().unwrap()).unwrap();
    let (_relay, gossip) = mesh.start_relay(
        "par-relay",
        &proxy.listen_addr().to_string(),
        "[uplink]\nsummary_interval = \"1s\"\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
    );
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..3 {
        let name = format!("par-n{i}");
        mesh.issue("node", REGION, "par", &name);
        procs.push(mesh.start_node(&name, &gossip, "").0);
    }
    let alive = eventually(Duration::from_secs(40), || {
        fleet_site(&api, "par").is_some_and(|(_, r)| r["nodes_alive"] == 3)
    });
    assert!(
        alive,
        "the site never showed its nodes alive\n{}",
        logs(mesh.path())
    );
    assert_eq!(
        incidents(&api, "all"),
        Vec::<Value>::new(),
        "a healthy site has no incident"
    );

    // Cut the uplink until the hub shows the site unreachable.
    proxy.blackhole(true);
    let unreachable = eventually(Duration::from_secs(20), || {
        fleet_site(&api, "par").is_some_and(|(_, r)| r["status"] == "unreachable")
    });
    assert!(unreachable, "the hub never showed the site unreachable");
    let opened = eventually(Duration::from_secs(10), || {
        !incidents(&api, "open").is_empty()
    });
    assert!(opened, "no incident opened\n{}", logs(mesh.path()));
    // Exactly one incident, for the site, and none for its nodes.
    std::thread::sleep(Duration::from_secs(3));
    let all = incidents(&api, "all");
    assert_eq!(all.len(), 1, "{all:#?}");
    let site = &all[0];
    assert_eq!(site["kind"], "site-unreachable");
    assert_eq!(site["severity"], "critical");
    assert_eq!(site["scope"]["region"], REGION);
    assert_eq!(site["scope"]["site"], "par");
    assert_eq!(site["scope"]["node"], Value::Null);
    assert_eq!(site["resolved_ms"], Value::Null);
    let id = site["id"].clone();
    assert!(
        proxy.stats().dropped_blackhole > 0,
        "the blackhole dropped nothing: {:?}",
        proxy.stats()
    );

    // The webhook got it as it opened.
    let posted = eventually(Duration::from_secs(10), || {
        !hook.received("opened", "site-unreachable").is_empty()
    });
    assert!(
        posted,
        "the webhook never got the incident\n{}",
        logs(mesh.path())
    );
    let body = &hook.received("opened", "site-unreachable")[0];
    assert_eq!(body["incident"]["id"], id);
    assert_eq!(body["incident"]["scope"]["site"], "par");

    // The CLI shows it.
    let out = run("trellis", &["incidents", "--hub", &api]);
    assert!(out.status.success(), "{out:?}");
    let shown = text(&out.stdout);
    assert!(shown.contains("site-unreachable"), "{shown}");
    assert!(shown.contains("site eu/par unreachable"), "{shown}");
    assert!(shown.contains("1 incident open"), "{shown}");

    // Restored: it resolves, and the webhook hears of that too.
    proxy.blackhole(false);
    let resolved = eventually(Duration::from_secs(30), || {
        incidents(&api, "open").is_empty()
            && incidents(&api, "all")
                .first()
                .is_some_and(|i| i["id"] == id && i["resolved_ms"].is_u64())
    });
    assert!(
        resolved,
        "the incident never resolved: {:#?}",
        incidents(&api, "all")
    );
    assert_eq!(
        fleet_site(&api, "par").map(|(_, r)| r["status"].clone()),
        Some(Value::from("healthy"))
    );
    let all = incidents(&api, "all");
    assert_eq!(
        all.len(),
        1,
        "no node incident after the site came back: {all:#?}"
    );
    let posted = eventually(Duration::from_secs(10), || {
        !hook.received("resolved", "site-unreachable").is_empty()
    });
    assert!(posted, "the webhook never heard the incident resolved");
    // Both are in the audit trail.
    let noted = eventually(Duration::from_secs(10), || {
        let out = run("trellis", &["audit", "log", "--hub", &api]);
        let t = text(&out.stdout);
        t.contains("incident.opened") && t.contains("incident.resolved")
    });
    assert!(noted, "the incident is not in the audit trail");
}

/// A patch whose install breaks the node's `web` check (see
/// tests/tests/patchrollout.rs for the layout it relies on).
fn write_patch(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("patch.toml"),
        format!(
            "name = \"{name}\"\nversion = \"2.0\"\ninstall = [\"sh install.sh\"]\n\
             rollback = [\"sh rollback.sh\"]\nchecks = [\"web\"]\nbake = \"5s\"\n\
             artifacts = [\"install.sh\", \"rollback.sh\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("install.sh"),
        "set -e\necho 2.0 > ../../version\ntouch ../../broken\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("rollback.sh"),
        "rm -f ../../version ../../broken\necho 1 > ../../rolled-back\n",
    )
    .unwrap();
    dir
}

#[test]
fn a_check_broken_by_a_rollouts_canary_is_an_incident_that_names_the_rollout() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    mesh.issue("operator", "", "", "alice");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    mesh.issue("relay", REGION, "par", "par-relay");
    let (_relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    let mut procs: Vec<Proc> = Vec::new();
    for i in 0..2 {
        let name = format!("par-n{i}");
        mesh.issue("node", REGION, "par", &name);
        let home = mesh.path().join(&name);
        std::fs::create_dir_all(&home).unwrap();
        let extra = format!(
            "[patch]\ndir = {:?}\n[[checks]]\nname = \"web\"\n\
             command = [\"sh\", \"-c\", \"test ! -f '{}' || exit 2\"]\ninterval = \"1s\"\ntimeout = \"1s\"\n",
            home.join("patches"),
            home.join("broken").display()
        );
        procs.push(mesh.start_node(&name, &gossip, &extra).0);
    }
    let alive = eventually(Duration::from_secs(40), || {
        fleet_site(&api, "par").is_some_and(|(_, r)| r["nodes_alive"] == 2)
    });
    assert!(
        alive,
        "the site never showed its nodes alive\n{}",
        logs(mesh.path())
    );

    let p = mesh.path();
    let operator: Vec<String> = [
        "--cert",
        p.join("certs/alice.crt").to_str().unwrap(),
        "--key",
        p.join("certs/alice.key").to_str().unwrap(),
        "--ca",
        p.join("ca/ca.crt").to_str().unwrap(),
        "--hub",
        &api,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let trellis = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(operator.iter().map(String::as_str));
        run("trellis", &all)
    };
    let dir = write_patch(p, "bad-fix");
    let out = trellis(&["patch", "publish", dir.to_str().unwrap()]);
    assert!(out.status.success(), "publish: {out:?}");
    let out = trellis(&["rollout", "start", "bad-fix", "--waves", "canary,100%"]);
    assert!(out.status.success(), "start: {out:?}");

    let named = eventually(Duration::from_secs(45), || {
        incidents(&api, "all")
            .iter()
            .any(|i| i["cause"]["run"] == 1 && i["cause"]["wave"] == 0)
    });
    let all = incidents(&api, "all");
    assert!(
        named,
        "no incident names the rollout: {all:#?}\n{}",
        logs(p)
    );
    let blamed: Vec<&Value> = all.iter().filter(|i| i["cause"]["run"] == 1).collect();
    for i in &blamed {
        assert_eq!(i["scope"]["site"], "par", "{i:#}");
        assert_eq!(i["cause"]["name"], "bad-fix", "{i:#}");
        assert_eq!(i["cause"]["version"], "2.0", "{i:#}");
    }
    // The canary really broke: its check failed, or its patch did.
    assert!(
        blamed
            .iter()
            .any(|i| i["kind"] == "node-check-failing" || i["kind"] == "patch-failed"),
        "{blamed:#?}"
    );
    let canary = blamed
        .iter()
        .find_map(|i| i["scope"]["node"].as_str())
        .expect("a node incident");
    assert!(
        mesh.path().join(canary).join("version").exists()
            || mesh.path().join(canary).join("rolled-back").exists(),
        "{canary} was never patched"
    );
    let out = run("trellis", &["incidents", "--all", "--hub", &api]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("likely cause: rollout 1 of bad-fix 2.0 (wave 0"),
        "{shown}"
    );
}
