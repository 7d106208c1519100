//! Configuration rollouts through a real mesh: `trellis config apply`
//! signs a fleet directory with the operator's key, the hub stores it and
//! pushes it to the relay, the relay keeps it and offers it to its site,
//! and every node fetches it over QUIC, checks the signature, writes its
//! own files and reports back through the relay to the hub.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::proxy::UdpProxy;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, run, serial};

const REGION: &str = "eu";
const SITE: &str = "par";
const ROLES: [&str; 4] = ["web", "web", "db", "db"];

struct Site {
    mesh: Mesh,
    api: String,
    proxy: UdpProxy,
    _procs: Vec<Proc>,
}

fn node_name(i: usize) -> String {
    format!("par-n{i}")
}

impl Site {
    /// A hub, a relay whose uplink goes through a proxy (to cut the WAN),
    /// and four nodes labelled web, web, db, db, each writing its managed
    /// files under its own root and checking for drift every second.
    fn start() -> Site {
        let mesh = Mesh::new();
        mesh.issue("hub", REGION, "", "hub-1");
        mesh.issue("relay", REGION, SITE, "par-relay");
        mesh.issue("operator", "", "", "alice");
        let (hub, uplink, api) = mesh.start_hub("hub-1", "");
        let proxy = UdpProxy::with_seed(uplink.parse().unwrap(), 11).unwrap();
        let (relay, relay_gossip) = mesh.start_relay(
            "par-relay",
            &proxy.listen_addr().to_string(),
            "[uplink]\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
        );
        let mut procs = vec![hub, relay];
        for (i, role) in ROLES.iter().enumerate() {
            let name = node_name(i);
            mesh.issue("node", REGION, SITE, &name);
            let state = mesh.path().join(format!("{name}/state"));
            let root = mesh.path().join(format!("root/{name}"));
            let extra = format!(
                "[node]\nlabels = {{ role = \"{role}\" }}\n\
                 [config]\nstate_dir = {state:?}\nroot = {root:?}\ndrift_interval = \"1s\"\n"
            );
            procs.push(mesh.start_node(&name, &relay_gossip, &extra).0);
        }
        let all_alive = eventually(Duration::from_secs(30), || {
            fleet_site(&api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == ROLES.len())
        });
        assert!(all_alive, "the site never showed every node alive");
        Site {
            mesh,
            api,
            proxy,
            _procs: procs,
        }
    }

    fn fleet(&self) -> PathBuf {
        self.mesh.path().join("fleet")
    }

    fn write_manifest(&self, name: &str, text: &str) {
        std::fs::create_dir_all(self.fleet()).unwrap();
        std::fs::write(self.fleet().join(name), text).unwrap();
    }

    /// The file `path` (as the manifests name it) on node `i`.
    fn file(&self, i: usize, path: &str) -> PathBuf {
        self.mesh
            .path()
            .join(format!("root/{}", node_name(i)))
            .join(path.trim_start_matches('/'))
    }

    fn operator_args(&self) -> Vec<String> {
        let p = self.mesh.path();
        [
            "--cert",
            p.join("certs/alice.crt").to_str().unwrap(),
            "--key",
            p.join("certs/alice.key").to_str().unwrap(),
            "--ca",
            p.join("ca/ca.crt").to_str().unwrap(),
            "--hub",
            &self.api,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// `trellis config SUB ARGS… --cert … --hub …`.
    fn config(&self, sub: &str, args: &[&str]) -> Output {
        let mut all = vec!["config", sub];
        all.extend_from_slice(args);
        let op = self.operator_args();
        all.extend(op.iter().map(String::as_str));
        run("trellis", &all)
    }

    fn status(&self) -> Value {
        get_json(&format!("{}/api/v1/config/status", self.api)).expect("config status")
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// The nodes the plan changes.
fn planned_changes(plan: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for site in plan["sites"].as_array().expect("sites") {
        for group in site["groups"].as_array().expect("groups") {
            if group["change"]["outcome"] == "changes" {
                for n in group["nodes"].as_array().expect("nodes") {
                    out.insert(n.as_str().unwrap().to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn a_change_for_a_label_subset_reaches_exactly_those_nodes_and_a_hand_edit_is_healed_and_audited() {
    let _serial = serial();
    let site = Site::start();
    let fleet = site.fleet();
    let fleet = fleet.to_str().unwrap();

    // v1: the same motd everywhere.
    site.write_manifest(
        "base.toml",
        "[[file]]\npath = \"/etc/motd\"\ncontent = \"managed by trellis\\n\"\n",
    );
    let out = site.config(
        "apply",
        &[fleet, "-m", "motd everywhere", "--timeout", "60s"],
    );
    assert!(out.status.success(), "apply v1: {out:?}");
    assert!(text(&out.stdout).contains("every alive node"), "{out:?}");
    for i in 0..ROLES.len() {
        assert_eq!(
            read(&site.file(i, "/etc/motd")).as_deref(),
            Some("managed by trellis\n"),
            "node {i}"
        );
    }
    let motd_before: Vec<_> = (0..ROLES.len())
        .map(|i| {
            std::fs::metadata(site.file(i, "/etc/motd"))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();

    // v2 adds a file for the web nodes only. The plan says which nodes
    // change, against v1.
    site.write_manifest(
        "web.toml",
        "[[file]]\npath = \"/etc/web.conf\"\ncontent = \"listen 8080 on {{node.name}}\\n\"\n\
         reload = [\"true\"]\nselector = { labels = { role = \"web\" } }\n",
    );
    let out = run(
        "trellis",
        &["config", "plan", fleet, "--hub", &site.api, "--json"],
    );
    assert!(out.status.success(), "plan: {out:?}");
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["compared_with"], 1, "{plan}");
    let predicted = planned_changes(&plan["plan"]);
    assert_eq!(
        predicted,
        BTreeSet::from([node_name(0), node_name(1)]),
        "{plan}"
    );

    let out = site.config("apply", &[fleet, "--timeout", "60s"]);
    assert!(out.status.success(), "apply v2: {out:?}");
    let mut changed = BTreeSet::new();
    for i in 0..ROLES.len() {
        match read(&site.file(i, "/etc/web.conf")) {
            Some(content) => {
                assert_eq!(content, format!("listen 8080 on {}\n", node_name(i)));
                changed.insert(node_name(i));
            }
            None => assert_eq!(ROLES[i], "db", "web node {i} lacks web.conf"),
        }
        // Untouched: same content, not even rewritten.
        assert_eq!(
            read(&site.file(i, "/etc/motd")).as_deref(),
            Some("managed by trellis\n")
        );
        let mtime = std::fs::metadata(site.file(i, "/etc/motd"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(mtime, motd_before[i], "node {i}'s motd was rewritten");
    }
    assert_eq!(
        changed, predicted,
        "the plan predicted the nodes that changed"
    );
    let status = site.status();
    assert_eq!(status["latest"]["version"], 2, "{status}");
    assert_eq!(status["at_latest"], 4, "{status}");
    assert_eq!(status["latest"]["author"], "alice", "{status}");

    // A hand edit is put back within the drift interval, and the hub hears
    // of it: which file, on which node.
    let motd = site.file(2, "/etc/motd");
    std::fs::write(&motd, "hacked\n").unwrap();
    let healed = eventually(Duration::from_secs(15), || {
        read(&motd).as_deref() == Some("managed by trellis\n")
    });
    assert!(healed, "the hand edit was not healed: {:?}", read(&motd));
    let reported = eventually(Duration::from_secs(30), || {
        site.status()["recent"].as_array().is_some_and(|r| {
            r.iter().any(|e| {
                let d = &e["body"]["Event"]["ConfigDrift"];
                d["node"] == node_name(2)
                    && d["drift"]["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with("/etc/motd"))
                    && d["drift"]["action"] == "healed"
                    && d["drift"]["size"] == 7
            })
        })
    });
    assert!(reported, "no drift event at the hub: {}", site.status());
    let noted = eventually(Duration::from_secs(15), || {
        let out = run("trellis", &["audit", "log", "--hub", &site.api]);
        let t = text(&out.stdout);
        t.contains("config.drift eu/par/par-n2") && t.contains("config v2")
    });
    assert!(noted, "the drift is not in the audit log");

    // History, show, and a rollback to v1 as v3.
    let out = run("trellis", &["config", "history", "--hub", &site.api]);
    let t = text(&out.stdout);
    assert!(
        out.status.success() && t.contains("v2") && t.contains("motd everywhere"),
        "{t}"
    );
    let out = run("trellis", &["config", "show", "1", "--hub", &site.api]);
    let t = text(&out.stdout);
    assert!(t.contains("base.toml") && !t.contains("web.toml"), "{t}");
    let out = site.config("rollback", &["1", "--timeout", "60s"]);
    assert!(out.status.success(), "rollback: {out:?}");
    let status = site.status();
    assert_eq!(status["latest"]["version"], 3, "{status}");
    assert_eq!(status["latest"]["comment"], "rollback to v1", "{status}");
    assert_eq!(status["at_latest"], 4, "{status}");
    let out = run("trellis", &["config", "show", "7", "--hub", &site.api]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn a_site_whose_wan_is_cut_during_apply_converges_when_the_link_returns() {
    let _serial = serial();
    let site = Site::start();
    let fleet = site.fleet();
    let fleet = fleet.to_str().unwrap();
    site.write_manifest(
        "base.toml",
        "[[file]]\npath = \"/etc/motd\"\ncontent = \"v1\\n\"\n",
    );
    let out = site.config("apply", &[fleet, "--timeout", "60s"]);
    assert!(out.status.success(), "apply v1: {out:?}");

    site.proxy.blackhole(true);
    site.write_manifest(
        "base.toml",
        "[[file]]\npath = \"/etc/motd\"\ncontent = \"v2\\n\"\n",
    );
    let out = site.config("apply", &[fleet, "--no-wait"]);
    assert!(out.status.success(), "apply v2: {out:?}");
    std::thread::sleep(Duration::from_secs(5));
    for i in 0..ROLES.len() {
        assert_eq!(
            read(&site.file(i, "/etc/motd")).as_deref(),
            Some("v1\n"),
            "node {i} got v2 through a cut link"
        );
    }
    site.proxy.blackhole(false);
    let converged = eventually(Duration::from_secs(90), || {
        (0..ROLES.len()).all(|i| read(&site.file(i, "/etc/motd")).as_deref() == Some("v2\n"))
    });
    assert!(
        converged,
        "the site did not converge after the link returned"
    );
    let reported = eventually(Duration::from_secs(30), || site.status()["at_latest"] == 4);
    assert!(reported, "{}", site.status());
}
