//! Patch rollouts through a real mesh: `trellis rollout start` plans waves
//! at the hub, each relay fetches the patch once for its site and tells its
//! nodes to install it, nodes install, bake and report in gossip, and the
//! hub advances wave by wave through health gates — or halts and rolls back
//! every patched node, as does a relay cut off from its hub on its own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use trellis_node::patch::{CHUNK_SIZE, Patch};
use trellis_tests::proxy::UdpProxy;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, metric, run, serial};

const REGION: &str = "eu";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A patch directory under `root`. Its install writes `version` in the
/// node's directory (two levels above the artifact directory a node runs
/// the commands in) and, where the node has a `bad-node` marker, `broken`,
/// which fails the node's `web` check. Rollback removes both and leaves
/// `rolled-back`. The package spans `chunks` chunks.
fn write_patch(root: &Path, name: &str, bake: &str, install_delay: u32, chunks: usize) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("patch.toml"),
        format!(
            "name = \"{name}\"\nversion = \"2.0\"\ninstall = [\"sh install.sh\"]\n\
             rollback = [\"sh rollback.sh\"]\nchecks = [\"web\"]\nbake = \"{bake}\"\n\
             artifacts = [\"install.sh\", \"rollback.sh\", \"pkg.bin\"]\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("install.sh"),
        format!(
            "set -e\nsleep {install_delay}\ncmp -s pkg.bin pkg.bin\necho 2.0 > ../../version\n\
             if [ -f ../../bad-node ]; then touch ../../broken; fi\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("rollback.sh"),
        "rm -f ../../version ../../broken\necho 1 > ../../rolled-back\n",
    )
    .unwrap();
    let pkg: Vec<u8> = (0..chunks * CHUNK_SIZE as usize - 1000)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    std::fs::write(dir.join("pkg.bin"), pkg).unwrap();
    dir
}

struct Fleet {
    mesh: Mesh,
    api: String,
    /// Each site's relay metrics address, and the proxy its uplink goes
    /// through.
    relays: Vec<(String, String, UdpProxy)>,
    procs: Vec<Proc>,
}

impl Fleet {
    /// A hub and `sites` sites of `per_site` nodes; each relay's uplink
    /// goes through a proxy. Every node has a `web` check that fails
    /// (critical) while the file `broken` is in its directory.
    fn start(sites: &[&str], per_site: usize, bad: &[&str]) -> Fleet {
        let mesh = Mesh::new();
        mesh.issue("hub", REGION, "", "hub-1");
        mesh.issue("operator", "", "", "alice");
        let (hub, uplink, api) = mesh.start_hub("hub-1", "");
        let mut f = Fleet {
            mesh,
            api,
            relays: Vec::new(),
            procs: vec![hub],
        };
        for site in sites {
            let relay = format!("{site}-relay");
            f.mesh.issue("relay", REGION, site, &relay);
            let proxy = UdpProxy::with_seed(uplink.parse().unwrap(), 7).unwrap();
            let (mut p, gossip) = f.mesh.start_relay(
                &relay,
                &proxy.listen_addr().to_string(),
                "[uplink]\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
            );
            let metrics = p.wait_field("relay ready", "metrics", Duration::from_secs(10));
            f.procs.push(p);
            for i in 0..per_site {
                let name = format!("{site}-n{i}");
                f.mesh.issue("node", REGION, site, &name);
                let home = f.mesh.path().join(&name);
                std::fs::create_dir_all(&home).unwrap();
                if bad.contains(&name.as_str()) {
                    std::fs::write(home.join("bad-node"), "").unwrap();
                }
                let broken = home.join("broken");
                let extra = format!(
                    "[patch]\ndir = {:?}\n[[checks]]\nname = \"web\"\n\
                     command = [\"sh\", \"-c\", \"test ! -f '{}' || exit 2\"]\ninterval = \"1s\"\ntimeout = \"1s\"\n",
                    home.join("patches"),
                    broken.display()
                );
                f.procs.push(f.mesh.start_node(&name, &gossip, &extra).0);
            }
            f.relays.push((site.to_string(), metrics, proxy));
        }
        for site in sites {
            let alive = eventually(Duration::from_secs(40), || {
                fleet_site(&f.api, site).is_some_and(|(_, r)| r["nodes_alive"] == per_site)
            });
            assert!(alive, "site {site} never showed its nodes alive");
        }
        f
    }

    fn home(&self, node: &str) -> PathBuf {
        self.mesh.path().join(node)
    }

    fn operator(&self) -> Vec<String> {
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
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn trellis(&self, args: &[&str], signed: bool) -> std::process::Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if signed {
            all.extend(self.operator());
        } else {
            all.extend(["--hub".to_owned(), self.api.clone()]);
        }
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run("trellis", &refs)
    }

    fn publish(&self, dir: &Path) {
        let out = self.trellis(&["patch", "publish", dir.to_str().unwrap()], true);
        assert!(out.status.success(), "publish: {out:?}");
    }

    fn status(&self) -> Option<Value> {
        get_json(&format!("{}/api/v1/rollouts/latest", self.api))
    }

    fn state(&self) -> String {
        self.status()
            .and_then(|v| v["record"]["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Waits for the newest rollout to reach `state`.
    fn wait_state(&self, state: &str, limit: Duration) -> Value {
        let reached = eventually(limit, || self.state() == state);
        let status = self.status().unwrap_or(Value::Null);
        assert!(
            reached,
            "rollout never reached {state}: {}\n{}",
            serde_json::to_string_pretty(&status).unwrap(),
            self.logs()
        );
        status
    }

    /// The end of every process's log, to say why a wait failed.
    fn logs(&self) -> String {
        trellis_tests::log_tails(self.mesh.path(), 25)
    }
}

#[test]
fn a_good_patch_reaches_every_node_wave_by_wave_and_crosses_each_uplink_once_even_when_cut_halfway()
{
    let _serial = serial();
    let sites = ["par", "ber"];
    let f = Fleet::start(&sites, 2, &[]);
    let dir = write_patch(f.mesh.path(), "web-fix", "1s", 0, 6);
    f.publish(&dir);
    let manifest = Patch::load(&dir).unwrap().manifest;
    let total_bytes: u64 = manifest.artifacts.iter().map(|a| a.size).sum();
    let total_chunks: usize = manifest.artifacts.iter().map(|a| a.chunks.len()).sum();

    // Slow par's WAN so its fetch can be cut halfway.
    f.relays[0].2.set_delay(Duration::from_millis(100));
    let out = f.trellis(
        &[
            "rollout",
            "start",
            "web-fix",
            "--waves",
            "canary,1site,100%",
            "--bake",
            "1s",
        ],
        true,
    );
    assert!(out.status.success(), "start: {out:?}");
    let shown = text(&out.stdout);
    assert!(shown.contains("rollout 1: web-fix 2.0"), "{shown}");
    assert!(shown.contains("canary"), "{shown}");

    // Cut par's uplink once part of the patch is there, then restore it.
    let (_, par_metrics, par_proxy) = &f.relays[0];
    let partway = eventually(Duration::from_secs(60), || {
        metric(par_metrics, "trellis_relay_patch_chunks_fetched_total").unwrap_or(0.0) >= 1.0
    });
    assert!(partway, "par's relay never started fetching");
    par_proxy.blackhole(true);
    let cut_at = metric(par_metrics, "trellis_relay_patch_chunks_fetched_total").unwrap_or(0.0);
    // Until the relay gives the connection up (the fetch in flight with it).
    let dropped = eventually(Duration::from_secs(30), || {
        metric(par_metrics, "trellis_relay_uplink_connected") == Some(0.0)
    });
    assert!(dropped, "the relay never noticed its uplink was cut");
    par_proxy.blackhole(false);
    par_proxy.set_delay(Duration::ZERO);

    let done = f.wait_state("done", Duration::from_secs(120));
    let waves = done["waves"].as_array().unwrap();
    assert_eq!(waves.len(), 3, "{done}");
    assert!(waves.iter().all(|w| w["phase"] == "passed"), "{done}");
    assert_eq!(
        done["record"]["wave_passed_ms"].as_array().unwrap().len(),
        3
    );

    // Every node installed it: the file is on disk, nothing was rolled back.
    for site in sites {
        for i in 0..2 {
            let home = f.home(&format!("{site}-n{i}"));
            assert_eq!(
                std::fs::read_to_string(home.join("version")).unwrap_or_default(),
                "2.0\n",
                "{}",
                home.display()
            );
            assert!(!home.join("rolled-back").exists());
        }
    }
    // par's fetch was cut halfway: requests failed while it was.
    assert!(
        cut_at < total_chunks as f64,
        "the fetch was over before the cut"
    );
    assert!(
        metric(par_metrics, "trellis_relay_patch_fetch_failures_total").unwrap_or(0.0) >= 1.0,
        "no request failed while the uplink was cut"
    );
    // The artifacts crossed each relay's uplink once: every chunk fetched
    // exactly once, though par's fetch was cut.
    for (site, metrics, _) in &f.relays {
        assert_eq!(
            metric(metrics, "trellis_relay_patch_chunks_fetched_total"),
            Some(total_chunks as f64),
            "{site}"
        );
        assert_eq!(
            metric(metrics, "trellis_relay_patch_bytes_fetched_total"),
            Some(total_bytes as f64),
            "{site}"
        );
    }
    let out = f.trellis(&["rollout", "status"], false);
    let shown = text(&out.stdout);
    assert!(shown.contains("done"), "{shown}");
    assert!(
        shown.contains("[####################] 1/1 healthy"),
        "{shown}"
    );
}

#[test]
fn a_bad_patch_is_stopped_at_the_canary_and_rolled_back_with_the_gates_numbers() {
    let _serial = serial();
    let sites = ["par", "ber"];
    let all: Vec<String> = sites
        .iter()
        .flat_map(|s| (0..2).map(move |i| format!("{s}-n{i}")))
        .collect();
    let bad: Vec<&str> = all.iter().map(String::as_str).collect();
    let f = Fleet::start(&sites, 2, &bad);
    let dir = write_patch(f.mesh.path(), "bad-fix", "5s", 0, 1);
    f.publish(&dir);
    let out = f.trellis(
        &[
            "rollout",
            "start",
            "bad-fix",
            "--waves",
            "canary,1site,100%",
            "--max-failure",
            "5%",
        ],
        true,
    );
    assert!(out.status.success(), "start: {out:?}");
    let status = f.wait_state("rolled-back", Duration::from_secs(90));
    let why = status["record"]["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains("1 of 1 patched nodes failed (100.0 %)"),
        "{why}"
    );
    let gate = &status["record"]["failed_gate"];
    assert_eq!(gate["wave"], 0, "{status}");
    assert_eq!(gate["patched"]["failed"], 1, "{status}");
    assert_eq!(gate["verdict"]["pass"], false, "{status}");

    // Only the canary was touched, and it is back as it was.
    let touched: Vec<&String> = all
        .iter()
        .filter(|n| f.home(n).join("rolled-back").exists())
        .collect();
    assert_eq!(
        touched.len(),
        1,
        "exactly the canary was patched: {touched:?}"
    );
    let canary = f.home(touched[0]);
    assert!(!canary.join("version").exists());
    assert!(!canary.join("broken").exists());
    for n in all.iter().filter(|n| *n != touched[0]) {
        assert!(!f.home(n).join("version").exists(), "{n} was patched");
    }
    let out = f.trellis(&["rollout", "status"], false);
    let shown = text(&out.stdout);
    assert!(shown.contains("rolled-back"), "{shown}");
    assert!(shown.contains("why:"), "{shown}");
    assert!(shown.contains("FAILED"), "{shown}");
    // A second rollout may start now that this one is over, but not while
    // one is active (checked by starting twice).
    let again = f.trellis(&["rollout", "start", "bad-fix", "--waves", "100%"], true);
    assert!(again.status.success(), "{again:?}");
    let busy = f.trellis(&["rollout", "start", "bad-fix", "--waves", "100%"], true);
    assert!(!busy.status.success());
    assert!(
        text(&busy.stderr).contains("one rollout at a time"),
        "{busy:?}"
    );
    let out = f.trellis(&["rollout", "abort"], true);
    assert!(out.status.success(), "abort: {out:?}");
    assert!(text(&out.stdout).contains("aborted by alice"), "{out:?}");
}

#[test]
fn a_site_cut_off_during_a_bad_wave_rolls_itself_back_and_the_hub_learns_of_it_later() {
    let _serial = serial();
    let f = Fleet::start(&["par"], 2, &["par-n0", "par-n1"]);
    // Installing takes 4 s: the uplink is cut before any node fails.
    let dir = write_patch(f.mesh.path(), "slow-bad", "30s", 4, 1);
    f.publish(&dir);
    let out = f.trellis(&["rollout", "start", "slow-bad", "--waves", "100%"], true);
    assert!(out.status.success(), "start: {out:?}");
    // Once the relay told its nodes (it reports installing), cut it off.
    let told = eventually(Duration::from_secs(30), || {
        f.status().is_some_and(|s| {
            s["sites"][0]["action"] == "install"
                && s["sites"][0]["states"]
                    .as_object()
                    .is_some_and(|m| m.contains_key("installing"))
        })
    });
    assert!(told, "the site never started installing: {:?}", f.status());
    f.relays[0].2.blackhole(true);

    // Cut off, the site's own gate rolls both nodes back.
    let rolled = eventually(Duration::from_secs(60), || {
        ["par-n0", "par-n1"]
            .iter()
            .all(|n| f.home(n).join("rolled-back").exists())
    });
    assert!(rolled, "the site did not roll itself back");
    for n in ["par-n0", "par-n1"] {
        assert!(!f.home(n).join("broken").exists(), "{n}");
    }
    // The hub has not heard: to it the rollout still runs.
    assert_eq!(f.state(), "running");

    f.relays[0].2.blackhole(false);
    let status = f.wait_state("rolled-back", Duration::from_secs(60));
    let why = status["record"]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("site eu/par rolled itself back"), "{why}");
    assert!(why.contains("site gate failed"), "{why}");
    // What the relay did reached the audit trail too.
    let learned = eventually(Duration::from_secs(30), || {
        let out = f.trellis(&["audit", "log"], false);
        text(&out.stdout).contains("patch.site-rolled-back")
    });
    assert!(learned, "the local rollback never reached the audit trail");
}
