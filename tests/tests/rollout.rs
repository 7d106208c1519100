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
    relay_gossip: String,
    procs: Vec<Proc>,
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
        let mut site = Site {
            mesh,
            api,
            proxy,
            relay_gossip,
            procs: vec![hub, relay],
        };
        for (i, role) in ROLES.iter().enumerate() {
            site.start_node(i, role);
        }
        let all_alive = eventually(Duration::from_secs(30), || {
            fleet_site(&site.api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == ROLES.len())
        });
        assert!(all_alive, "the site never showed every node alive");
        site
    }

    /// Starts node `i` labelled `role`, writing under its own root and
    /// checking for drift every second.
    fn start_node(&mut self, i: usize, role: &str) {
        let name = node_name(i);
        self.mesh.issue("node", REGION, SITE, &name);
        let state = self.mesh.path().join(format!("{name}/state"));
        let root = self.mesh.path().join(format!("root/{name}"));
        let extra = format!(
            "[node]\nlabels = {{ role = \"{role}\" }}\n\
             [config]\nstate_dir = {state:?}\nroot = {root:?}\ndrift_interval = \"1s\"\n"
        );
        let p = self.mesh.start_node(&name, &self.relay_gossip, &extra).0;
        self.procs.push(p);
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

    // In JSON this time: what was stored, and where the rollout ended.
    let out = site.config("apply", &[fleet, "--timeout", "60s", "--json"]);
    assert!(out.status.success(), "apply v2: {out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).expect("apply --json prints JSON");
    assert_eq!(answer["stored"]["version"], 2, "{answer}");
    assert_eq!(answer["rollout"]["version"], 2, "{answer}");
    assert_eq!(answer["rollout"]["holding"], ROLES.len(), "{answer}");
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

    // The hub stores only what an operator of this mesh signed, and only
    // as a newer version.
    {
        use trellis_hub::client::{ApiClient, ClientError};
        use trellis_node::bundle::{Bundle, sign};
        let p = site.mesh.path();
        let alice = trellis_node::tls::Credentials::load(
            &p.join("ca/ca.crt"),
            &p.join("certs/alice.crt"),
            &p.join("certs/alice.key"),
        )
        .unwrap();
        let bundle = |version| Bundle {
            version,
            created_ms: 1,
            comment: String::new(),
            fleet: trellis_node::desired::Fleet::load(&site.fleet()).unwrap(),
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let client = ApiClient::new(&site.api).unwrap();
        let mut altered = sign(&alice, &bundle(3)).unwrap();
        let last = altered.bundle.len() - 1;
        altered.bundle[last] ^= 1;
        for (signed, status, says) in [
            (altered, 403, "bad signature"),
            (sign(&alice, &bundle(2)).unwrap(), 409, "not newer"),
        ] {
            match rt.block_on(client.config_apply(&signed)) {
                Err(ClientError::Api { status: s, message }) => {
                    assert_eq!(s, status, "{message}");
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("stored a bundle it should refuse: {other:?}"),
            }
        }
        assert_eq!(site.status()["latest"]["version"], 2);
    }

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
    let mut site = Site::start();
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
    // A node joining the cut-off site gets the version its relay has.
    let newcomer = ROLES.len();
    site.start_node(newcomer, "db");
    let served = eventually(Duration::from_secs(30), || {
        read(&site.file(newcomer, "/etc/motd")).as_deref() == Some("v1\n")
    });
    assert!(served, "a node joining during the outage did not get v1");
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..ROLES.len() {
        assert_eq!(
            read(&site.file(i, "/etc/motd")).as_deref(),
            Some("v1\n"),
            "node {i} got v2 through a cut link"
        );
    }
    site.proxy.blackhole(false);
    let converged = eventually(Duration::from_secs(90), || {
        (0..=newcomer).all(|i| read(&site.file(i, "/etc/motd")).as_deref() == Some("v2\n"))
    });
    assert!(
        converged,
        "the site did not converge after the link returned"
    );
    let reported = eventually(Duration::from_secs(30), || site.status()["at_latest"] == 5);
    assert!(reported, "{}", site.status());

    // A reload command that fails: the files stay, the apply says so, and
    // the command's output reaches the hub.
    site.write_manifest(
        "base.toml",
        "[[file]]\npath = \"/etc/motd\"\ncontent = \"v3\\n\"\n\
         reload = [\"echo 'motd: bad directive' >&2; exit 3\"]\n",
    );
    let out = site.config("apply", &[fleet, "--timeout", "60s"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stdout).contains("failed or refused v3"),
        "{out:?}"
    );
    assert_eq!(read(&site.file(0, "/etc/motd")).as_deref(), Some("v3\n"));
    let events = site.status()["recent"].clone();
    let failed = events.as_array().unwrap().iter().find(|e| {
        let r = &e["body"]["Event"]["ConfigResult"]["result"];
        r["version"] == 3 && r["outcome"] == "failed"
    });
    let detail = failed.expect("a failed result at the hub")["body"]["Event"]["ConfigResult"]
        ["result"]["detail"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(detail.contains("motd: bad directive"), "{detail}");
    assert!(detail.contains("exited with status 3"), "{detail}");
}

/// A relay with a valid certificate for the site that offers bundles it
/// was never given by a hub (a compromised relay): built from the relay's
/// own parts, speaking real gossip and the real fetch protocol.
struct HostileRelay {
    member: trellis_node::agent::SiteMember,
    served: tokio::sync::watch::Sender<trellis_node::distribute::Served>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl HostileRelay {
    async fn start(creds: trellis_node::tls::Credentials) -> HostileRelay {
        use trellis_node::authz::Protocol;
        let shutdown = tokio_util::sync::CancellationToken::new();
        let gossip = trellis_node::config::GossipConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            interval: Duration::from_millis(300),
            ..Default::default()
        };
        let mut member = trellis_node::agent::SiteMember::start(
            creds,
            &Default::default(),
            &gossip,
            &Default::default(),
            &[],
            &mut Default::default(),
            &shutdown,
        )
        .await
        .expect("start the relay's gossip");
        let (served, rx) = tokio::sync::watch::channel(None);
        tokio::spawn(trellis_node::distribute::serve(
            member.routes.take(Protocol::Fetch),
            rx,
            None,
            None,
            member.endpoint.metrics().clone(),
            shutdown.child_token(),
        ));
        HostileRelay {
            member,
            served,
            shutdown,
        }
    }

    async fn offer(&self, version: u64, signed: trellis_node::bundle::SignedBundle) {
        use trellis_node::distribute::{Offer, keys};
        let offer = Offer::of(version, &signed);
        self.served
            .send_replace(Some(std::sync::Arc::new((offer, signed))));
        self.member
            .gossip
            .set(vec![(keys::OFFER.to_owned(), offer.encode())], keys::OFFER)
            .await;
    }

    /// The node's last configuration result, as the site's gossip shows it.
    async fn result_of(&self, node: &str) -> Option<trellis_node::distribute::ConfigResult> {
        let view = self.member.gossip.view().await;
        view.current_members()
            .into_iter()
            .find(|m| m.name == node)
            .and_then(|m| m.config.result.clone())
    }
}

#[test]
fn bundles_signed_by_an_unknown_key_or_altered_after_signing_are_refused_and_nothing_is_written() {
    use trellis_node::bundle::{Bundle, sign};
    use trellis_node::desired::Fleet;
    use trellis_node::distribute::Outcome;
    use trellis_node::id::{Identity, Role};
    use trellis_node::tls::{Credentials, MeshCa};

    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("relay", REGION, SITE, "par-relay");
    mesh.issue("operator", "", "", "alice");
    mesh.issue("node", REGION, SITE, "par-n0");
    let p = mesh.path().to_owned();
    let load = |name: &str| {
        Credentials::load(
            &p.join("ca/ca.crt"),
            &p.join(format!("certs/{name}.crt")),
            &p.join(format!("certs/{name}.key")),
        )
        .expect("credentials")
    };
    let fleet_dir = p.join("fleet");
    std::fs::create_dir_all(&fleet_dir).unwrap();
    std::fs::write(
        fleet_dir.join("base.toml"),
        "[[file]]\npath = \"/etc/motd\"\ncontent = \"hello from trellis\\n\"\n",
    )
    .unwrap();
    let fleet = Fleet::load(&fleet_dir).unwrap();
    let bundle = |version| Bundle {
        version,
        created_ms: 1,
        comment: String::new(),
        fleet: fleet.clone(),
    };
    // An operator of another mesh.
    let other = MeshCa::generate("elsewhere").unwrap();
    let mallory = Credentials::issue(
        &other,
        &Identity::new(Role::Operator, "", "", "mallory").unwrap(),
    )
    .unwrap();
    let unknown = sign(&mallory, &bundle(1)).unwrap();
    // The mesh's own operator, but the content changed after signing.
    let mut altered = sign(&load("alice"), &bundle(2)).unwrap();
    let at = altered
        .bundle
        .windows(5)
        .position(|w| w == b"hello")
        .expect("content in the bundle");
    altered.bundle[at] = b'j';

    let rt = tokio::runtime::Runtime::new().unwrap();
    let relay = rt.block_on(HostileRelay::start(load("par-relay")));
    let root = p.join("root/par-n0");
    let state = p.join("par-n0/state");
    let extra = format!("[config]\nstate_dir = {state:?}\nroot = {root:?}\n");
    let seed = relay.member.gossip.advertise_addr().to_string();
    let (_node, node_metrics) = mesh.start_node("par-n0", &seed, &extra);

    for (version, signed, reason) in [(1, unknown, "unknown key"), (2, altered, "bad signature")] {
        rt.block_on(relay.offer(version, signed));
        let mut seen = None;
        let refused = eventually(Duration::from_secs(30), || {
            seen = rt.block_on(relay.result_of("par-n0"));
            seen.as_ref().is_some_and(|r| r.version == version)
        });
        assert!(refused, "no result for v{version}: {seen:?}");
        let r = seen.unwrap();
        assert_eq!(r.outcome, Outcome::Refused, "{r:?}");
        assert!(r.detail.contains(reason), "v{version}: {r:?}");
        assert!(!root.exists(), "something was written under {root:?}");
        assert!(
            !state.join("applied.json").exists(),
            "a refused bundle was recorded as applied"
        );
    }
    let refusals = trellis_tests::metric(
        &node_metrics,
        "trellis_config_results_total{outcome=\"refused\"}",
    );
    assert_eq!(refusals, Some(2.0));
    relay.shutdown.cancel();
}
