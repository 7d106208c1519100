//! A node's way out of the fleet, against running processes (a hub, a
//! relay, nodes): `trellis node decommission` takes a node out of the views
//! without reporting it dead and its certificate is refused afterwards; a
//! node simply gone past `retention.dead_node` is reaped and reported once;
//! `trellis versions` shows which Trellis each site's members run.

use std::time::Duration;

use serde_json::Value;
use trellis_node::tls;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, run, serial};

/// The site's events (and gaps) at the hub, oldest first.
fn events(api: &str) -> Vec<Value> {
    get_json(&format!("{api}/api/v1/events?site=par&limit=10000"))
        .and_then(|e| e["records"].as_array().cloned())
        .unwrap_or_default()
}

/// How many events of `kind` name `node`.
fn count(events: &[Value], kind: &str, node: &str) -> usize {
    events
        .iter()
        .filter(|e| e["kind"] == kind)
        .filter(|e| {
            e["body"]["Event"]
                .as_object()
                .and_then(|o| o.values().next())
                .is_some_and(|v| v["node"] == node)
        })
        .count()
}

/// Whether `p` logged a line holding every one of `needles`.
fn logged(p: &Proc, needles: &[&str]) -> bool {
    p.log()
        .iter()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

fn counts(api: &str) -> Option<(u64, u64, u64)> {
    let (_, row) = fleet_site(api, "par")?;
    Some((
        row["nodes_total"].as_u64()?,
        row["nodes_alive"].as_u64()?,
        row["nodes_dead"].as_u64()?,
    ))
}

#[test]
fn a_decommissioned_node_leaves_the_views_is_not_counted_dead_and_is_refused() {
    let _serial = serial();
    tls::install_crypto_provider();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    for n in ["par-n1", "par-n2", "par-n3"] {
        mesh.issue("node", "eu", "par", n);
    }
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    let (_n1, _) = mesh.start_node("par-n1", &gossip, "");
    let (_n2, _) = mesh.start_node("par-n2", &gossip, "");
    let (mut n3, _) = mesh.start_node("par-n3", &gossip, "");
    assert!(
        eventually(Duration::from_secs(30), || counts(&api) == Some((3, 3, 0))),
        "the site never showed three nodes alive: {:?}",
        counts(&api)
    );

    // Every member says which Trellis it runs; the hub gathers it per site.
    let versions = run("trellis", &["versions", "--hub", &api, "--json"]);
    assert!(versions.status.success(), "{versions:?}");
    let versions: Value = serde_json::from_slice(&versions.stdout).unwrap();
    let here = trellis_node::upgrade::version();
    assert_eq!(versions["hub_version"], here, "{versions}");
    let par = &versions["sites"][0];
    assert_eq!(
        (&par["site"], &par["reachable"]),
        (&"par".into(), &true.into())
    );
    assert_eq!(
        par["versions"]["node"],
        serde_json::json!({ here: 3 }),
        "{versions}"
    );
    assert_eq!(
        par["versions"]["relay"],
        serde_json::json!({ here: 1 }),
        "{versions}"
    );
    let text = run("trellis", &["versions", "--hub", &api]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(&format!("eu/par  node 3× {here}")), "{text}");
    assert!(!text.contains("mixed"), "{text}");

    let ca = mesh.path().join("ca");
    let out = run(
        "trellis",
        &[
            "node",
            "decommission",
            "--dir",
            ca.to_str().unwrap(),
            "par-n3",
            "--reason",
            "hardware retired",
            "--hub",
            &api,
            "--json",
        ],
    );
    assert!(out.status.success(), "decommission: {out:?}");
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer[0]["kind"], "decommissioned", "{answer}");
    assert_eq!(answer[0]["identity"], "trellis://node/eu/par/par-n3");

    // Out of the site's counts, and never dead.
    let mut seen = Vec::new();
    let gone = eventually(Duration::from_secs(60), || {
        let c = counts(&api);
        seen.push(c);
        c == Some((2, 2, 0))
    });
    assert!(gone, "the site never dropped par-n3: {seen:?}");
    assert!(
        seen.iter().all(|c| c.is_none_or(|(_, _, dead)| dead == 0)),
        "par-n3 was counted dead on its way out: {seen:?}"
    );
    let evs = events(&api);
    assert_eq!(count(&evs, "node_left", "par-n3"), 1, "{evs:?}");
    assert_eq!(count(&evs, "node_died", "par-n3"), 0, "{evs:?}");

    // Gone from the site's node list, live from the relay.
    let nodes = run("trellis", &["nodes", "par", "--hub", &api, "--json"]);
    assert!(nodes.status.success(), "{nodes:?}");
    let nodes: Value = serde_json::from_slice(&nodes.stdout).unwrap();
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(!names.contains(&"par-n3"), "{names:?}");
    assert!(names.contains(&"par-n1"), "{names:?}");

    // Its history stays: earlier summaries still count it.
    let hist = get_json(&format!("{api}/api/v1/sites/par/history?limit=10000")).unwrap();
    assert!(
        hist["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["body"]["Summary"]["nodes_total"] == 3),
        "no summary from before the decommission"
    );
    // What the relay logs when it refuses par-n3.
    let cut_off = |p: &Proc| {
        p.log()
            .iter()
            .filter(|l| {
                l.contains("par-n3")
                    && (l.contains("certificate was revoked")
                        || l.contains("certificate is revoked"))
            })
            .count()
    };
    // The relay published the decommission before it refused the node
    // (a grace of a few seconds), so the node heard it and stopped by
    // itself, with the status a supervisor does not restart on failure.
    let stopped = eventually(Duration::from_secs(15), || !n3.is_running());
    assert!(stopped, "par-n3 did not stop: {}", n3.log().join("\n"));
    assert!(logged(&n3, &["decommissioned"]), "{}", n3.log().join("\n"));
    assert_eq!(n3.exit_status().and_then(|s| s.code()), Some(0));
    // It kept the list: started again, it refuses at once, with the status
    // a supervisor does not restart on.
    let config = mesh.path().join("par-n3.toml");
    let kept = mesh.path().join("par-n3/state/revocations");
    assert!(kept.exists(), "par-n3 did not keep the revocation list");
    let out = run("trellis-node", &["--config", config.to_str().unwrap()]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("decommissioned (hardware retired)"), "{said}");
    // Without the list (a machine restored from an old image), its peers
    // still refuse it, once the relay's grace is over.
    std::fs::remove_file(&kept).unwrap();
    let enforced = eventually(Duration::from_secs(15), || {
        logged(&relay, &["revocation list in force", "entries=1"])
    });
    assert!(enforced, "the relay never enforced the decommission");
    let before = cut_off(&relay);
    let (mut again, _) = mesh.start_node("par-n3", &gossip, "");
    let refused = eventually(Duration::from_secs(30), || cut_off(&relay) > before);
    assert!(
        refused,
        "the relay took par-n3 back: {}",
        relay.log().join("\n")
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(counts(&api), Some((2, 2, 0)));
    again.terminate(Duration::from_secs(10));
}

#[test]
fn a_node_dead_past_retention_is_reaped_and_reported_once() {
    let _serial = serial();
    tls::install_crypto_provider();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    mesh.issue("node", "eu", "par", "par-n1");
    mesh.issue("node", "eu", "par", "par-n2");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (_relay, gossip) =
        mesh.start_relay("par-relay", &uplink, "[retention]\ndead_node = \"10s\"\n");
    let (_n1, _) = mesh.start_node("par-n1", &gossip, "");
    let (mut n2, _) = mesh.start_node("par-n2", &gossip, "");
    assert!(
        eventually(Duration::from_secs(30), || counts(&api) == Some((2, 2, 0))),
        "the site never showed two nodes alive: {:?}",
        counts(&api)
    );

    n2.kill9();
    assert!(
        eventually(Duration::from_secs(30), || counts(&api) == Some((2, 1, 1))),
        "par-n2 never counted dead: {:?}",
        counts(&api)
    );
    assert!(
        eventually(Duration::from_secs(40), || counts(&api) == Some((1, 1, 0))),
        "par-n2 never reaped: {:?}",
        counts(&api)
    );
    // Reported once, however long it stays gone.
    std::thread::sleep(Duration::from_secs(12));
    let evs = events(&api);
    assert_eq!(count(&evs, "node_died", "par-n2"), 1, "{evs:?}");
    assert_eq!(count(&evs, "node_reaped", "par-n2"), 1, "{evs:?}");
    assert_eq!(counts(&api), Some((1, 1, 0)));
}
