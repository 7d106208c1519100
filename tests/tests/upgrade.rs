//! Trellis upgrades its own node agent the way it patches anything else: a
//! build of `trellis-node` published as a patch, rolled out in waves behind
//! health gates. Each node restarts into the new build (the same process,
//! replaced by `exec`) and reports its version; a build that dies at start
//! is given up when the agent is started again, as the packaged unit's
//! `Restart=on-failure` does, and the rollout rolls it back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Mesh, Proc, bin, eventually, fleet_site, get_json, run, serial};

const REGION: &str = "eu";
const SITE: &str = "par";
const NODES: usize = 3;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The build's own version with its last number raised by one.
fn bumped(version: &str) -> String {
    let (head, last) = version.rsplit_once('.').expect("a dotted version");
    let n: u64 = last.parse().expect("a numeric last part");
    format!("{head}.{}", n + 1)
}

/// A self-upgrade patch named `trellis-node` whose artifact is `build`.
fn write_upgrade(root: &Path, dir: &str, version: &str, build: &[u8]) -> PathBuf {
    let dir = root.join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("patch.toml"),
        format!(
            "name = \"trellis-node\"\nversion = \"{version}\"\n\
             install = ['\"$TRELLIS_NODE\" upgrade install trellis-node']\n\
             rollback = ['\"$TRELLIS_NODE\" upgrade revert trellis-node']\n\
             bake = \"2s\"\nartifacts = [\"trellis-node\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("trellis-node"), build).unwrap();
    dir
}

struct Fleet {
    mesh: Mesh,
    api: String,
    gossip: String,
    _others: Vec<Proc>,
    nodes: Vec<Proc>,
    /// Nodes started again after their process ended, with what that
    /// process logged.
    restarts: Vec<(String, String)>,
}

impl Fleet {
    fn start() -> Fleet {
        let mesh = Mesh::new();
        mesh.issue("hub", REGION, "", "hub-1");
        mesh.issue("operator", "", "", "alice");
        let (hub, uplink, api) = mesh.start_hub("hub-1", "");
        let relay = format!("{SITE}-relay");
        mesh.issue("relay", REGION, SITE, &relay);
        let (relay, gossip) = mesh.start_relay(&relay, &uplink, "");
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let name = format!("{SITE}-n{i}");
            mesh.issue("node", REGION, SITE, &name);
            nodes.push(mesh.start_node(&name, &gossip, "").0);
        }
        let alive = eventually(Duration::from_secs(40), || {
            fleet_site(&api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == NODES)
        });
        assert!(alive, "the site never showed its nodes alive");
        Fleet {
            mesh,
            api,
            gossip,
            _others: vec![hub, relay],
            nodes,
            restarts: Vec::new(),
        }
    }

    /// What a service manager does for the agents: starts again, with the
    /// same configuration, any whose process ended.
    fn supervise(&mut self) {
        for i in 0..self.nodes.len() {
            if !self.nodes[i].is_running() {
                let name = self.nodes[i].name.clone();
                self.restarts
                    .push((name.clone(), self.nodes[i].log().join("\n")));
                self.nodes[i] = self.mesh.start_node(&name, &self.gossip, "").0;
            }
        }
    }

    /// Runs `trellis ARGS`, as the operator alice if `signed`.
    fn trellis(&self, args: &[&str], signed: bool) -> std::process::Output {
        let p = self.mesh.path();
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let operator = [
            ("--cert", p.join("certs/alice.crt")),
            ("--key", p.join("certs/alice.key")),
            ("--ca", p.join("ca/ca.crt")),
        ];
        for (flag, value) in operator.iter().filter(|_| signed) {
            all.push(flag.to_string());
            all.push(value.to_str().unwrap().to_owned());
        }
        all.extend(["--hub".to_owned(), self.api.clone()]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run("trellis", &refs)
    }

    fn publish_and_roll_out(&self, dir: &Path) {
        let out = self.trellis(&["patch", "publish", dir.to_str().unwrap()], true);
        assert!(out.status.success(), "publish: {out:?}");
        let out = self.trellis(
            &[
                "rollout",
                "start",
                "trellis-node",
                "--waves",
                "canary,100%",
                "--bake",
                "2s",
            ],
            true,
        );
        assert!(out.status.success(), "rollout start: {out:?}");
    }

    fn rollout(&self) -> Value {
        get_json(&format!("{}/api/v1/rollouts/latest", self.api)).unwrap_or(Value::Null)
    }

    /// Waits (supervising the agents) for the newest rollout to reach
    /// `state`, calling `watch` on every look.
    fn wait_rollout(&mut self, state: &str, mut watch: impl FnMut(&Fleet)) -> Value {
        let reached = eventually(Duration::from_secs(150), || {
            self.supervise();
            watch(self);
            self.rollout()["record"]["state"] == state
        });
        let status = self.rollout();
        assert!(
            reached,
            "the rollout never reached {state}: {}\n{}",
            serde_json::to_string_pretty(&status).unwrap(),
            trellis_tests::log_tails(self.mesh.path(), 30)
        );
        status
    }

    /// How many of the site's nodes report each version.
    fn node_versions(&self) -> Value {
        get_json(&format!("{}/api/v1/versions", self.api))
            .map(|v| v["sites"][0]["versions"]["node"].clone())
            .unwrap_or(Value::Null)
    }

    fn wait_versions(&self, want: Value) {
        let seen = eventually(Duration::from_secs(30), || self.node_versions() == want);
        assert!(seen, "nodes report {} not {want}", self.node_versions());
    }
}

#[test]
fn a_new_build_of_the_agent_rolls_out_in_waves_and_a_build_that_dies_at_start_is_rolled_back() {
    let _serial = serial();
    let mut f = Fleet::start();
    let here = trellis_node::upgrade::version().to_owned();
    f.wait_versions(serde_json::json!({ here.clone(): NODES }));

    // The same build, stamped one version up: what a rebuild with a bumped
    // version produces, without a second build of the workspace.
    let next = bumped(&here);
    let build = std::fs::read(bin("trellis-node")).unwrap();
    let build = trellis_node::upgrade::restamp(&build, &next).unwrap();
    let dir = write_upgrade(f.mesh.path(), "upgrade-next", &next, &build);
    f.publish_and_roll_out(&dir);
    // Between the waves, the canary on the new build and the others on the
    // old one share the site.
    let mut mixed = None;
    let done = f.wait_rollout("done", |f| {
        let v = f.node_versions();
        if v[&here] == NODES - 1 && v[&next] == 1 {
            mixed = Some(text(&f.trellis(&["versions"], false).stdout));
        }
    });
    let mixed = mixed.expect("the site never ran two versions side by side");
    assert!(mixed.contains("mixed"), "{mixed}");
    let waves = done["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 2, "{done}");
    assert!(waves.iter().all(|w| w["phase"] == "passed"), "{done}");
    // Each agent replaced itself: the same processes, now the new build.
    assert!(f.restarts.is_empty(), "agents ended: {:?}", f.restarts);
    f.wait_versions(serde_json::json!({ next.clone(): NODES }));
    for node in &f.nodes {
        let log = node.log().join("\n");
        assert!(
            log.contains("restarting into another build of trellis-node"),
            "{}: {log}",
            node.name
        );
    }

    // A build that answers its version but dies at start.
    let broken_version = bumped(&next);
    let broken = format!(
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'trellis-node {broken_version}'; exit 0; fi\n\
         echo 'this build cannot start' >&2\nexit 1\n"
    );
    let dir = write_upgrade(
        f.mesh.path(),
        "upgrade-broken",
        &broken_version,
        broken.as_bytes(),
    );
    f.publish_and_roll_out(&dir);
    let status = f.wait_rollout("rolled-back", |_| {});
    let why = status["record"]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("1 of 1 patched nodes failed"),
        "{why}\n{status}"
    );
    // Only the canary ran it, died, and was started again, which went back
    // to the build before.
    let ended: Vec<&String> = f.restarts.iter().map(|(n, _)| n).collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    let (name, before) = &f.restarts[0];
    assert!(before.contains("this build cannot start"), "{before}");
    let canary = f
        .nodes
        .iter()
        .find(|n| &n.name == name)
        .expect("the canary");
    let after = canary.log().join("\n");
    assert!(
        after.contains(&format!(
            "trellis-node {broken_version} did not come up healthy"
        )),
        "{after}"
    );
    f.wait_versions(serde_json::json!({ next.clone(): NODES }));
    let out = f.trellis(&["rollout", "status"], false);
    assert!(text(&out.stdout).contains("rolled-back"), "{out:?}");
    // The failed start is the run's failure, as the site reported it.
    let mut audit = String::new();
    let noted = eventually(Duration::from_secs(30), || {
        audit = text(&f.trellis(&["audit", "log"], false).stdout);
        audit.contains("did not come up healthy")
    });
    assert!(noted, "{audit}");
}
