//! Foresight through a real mesh: a node whose certificate runs out
//! without being renewed forecasts it itself (`forecast:cert`, a check of
//! its own), its relay reports the check's change, and the hub opens one
//! `resource-forecast` incident, critical, with its score, ranked first by
//! `trellis incidents`. The node's own status stays passing: a finding is
//! reported, not judged. And a site far from the other sites of its region
//! is one `site-anomaly` incident, found at the hub.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Mesh, eventually, get_json, run, serial};

#[test]
fn a_certificate_about_to_expire_is_forecast_by_its_node_and_becomes_a_ranked_incident() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    // Expires tomorrow: critical (within 3 days), score 14 days / 1 day.
    mesh.issue_with("node", "eu", "par", "par-n1", &["--days", "1"]);
    mesh.issue("node", "eu", "par", "par-n2");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (_relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    // Not renewed: its renewal only starts an hour before expiry.
    let (_n1, _) = mesh.start_node("par-n1", &gossip, "[renewal]\nrenew_before = \"1h\"\n");
    let (_n2, _) = mesh.start_node("par-n2", &gossip, "");

    let forecast = |v: &Value| -> Option<Value> {
        v["incidents"]
            .as_array()?
            .iter()
            .find(|i| i["kind"] == "resource-forecast" && i["resolved_ms"].is_null())
            .cloned()
    };
    let mut found = None;
    let opened = eventually(Duration::from_secs(40), || {
        found = get_json(&format!("{api}/api/v1/incidents")).and_then(|v| forecast(&v));
        found.is_some()
    });
    assert!(opened, "no resource-forecast incident opened");
    let i = found.unwrap();
    assert_eq!(i["severity"], "critical", "{i}");
    assert_eq!(i["check"], "forecast:cert", "{i}");
    assert_eq!(i["scope"]["node"], "par-n1", "{i}");
    let score = i["score"].as_f64().expect("a score");
    assert!((13.9..=14.2).contains(&score), "{i}");
    let detail = i["detail"].as_str().unwrap();
    assert!(detail.contains("expires in"), "{i}");
    // One incident, not one per sample, and none for the other node.
    let all = get_json(&format!("{api}/api/v1/incidents?state=all")).unwrap();
    let forecasts = all["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == "resource-forecast")
        .count();
    assert_eq!(forecasts, 1, "{all}");

    // The node reports the finding as a check and stays passing.
    let nodes = get_json(&format!("{api}/api/v1/sites/par/nodes")).expect("the site's nodes");
    let n1 = nodes["nodes"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "par-n1"))
        .cloned()
        .unwrap_or_else(|| panic!("par-n1 in {nodes}"));
    assert_eq!(n1["status"], "passing", "{n1}");
    let cert = n1["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "forecast:cert"))
        .unwrap_or_else(|| panic!("forecast:cert in {n1}"));
    assert_eq!(cert["status"], "critical", "{n1}");

    // `trellis incidents` ranks it first and shows its score.
    let out = run("trellis", &["incidents", "--hub", &api]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .lines()
        .find(|l| l.contains("resource-forecast") || l.contains("node-"))
        .unwrap_or_default();
    assert!(first.contains("resource-forecast"), "{text}");
    assert!(first.contains("14"), "{text}");
}

/// Four sites of one region, one of them with its node warning: the hub
/// finds that site unusual among its region's sites (its `unhealthy`
/// share far above theirs), opens one `site-anomaly` incident for it,
/// shown by `trellis incidents`, and resolves it once the site is like the
/// others again. A warning opens no incident of its own, so this one is
/// what tells the operator.
#[test]
fn a_site_unusual_among_its_region_is_one_site_anomaly_incident() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    // Only the unhealthy share: the sites' nodes all run on this one
    // machine, and a CPU burst at one of them is not what this is about.
    let (_hub, uplink, api) = mesh.start_hub(
        "hub-1",
        "[fleet]\nstale_after = \"3s\"\n\
         [outliers]\nmetrics = [\"unhealthy\"]\nhold_for = \"2s\"\n",
    );
    let fixed = mesh.path().join("fixed");
    let mut procs = Vec::new();
    for site in ["par", "ber", "mad", "lis"] {
        let relay = format!("{site}-relay");
        let node = format!("{site}-n1");
        mesh.issue("relay", "eu", site, &relay);
        mesh.issue("node", "eu", site, &node);
        let (r, gossip) =
            mesh.start_relay(&relay, &uplink, "[uplink]\nsummary_interval = \"1s\"\n");
        // par's node warns (exit 1) until `fixed` exists.
        let check = if site == "par" {
            format!(
                "[[checks]]\nname = \"svc\"\ninterval = \"1s\"\ntimeout = \"1s\"\n\
                 command = [\"sh\", \"-c\", \"test -f '{}' || exit 1\"]\n",
                fixed.display()
            )
        } else {
            String::new()
        };
        let (n, _) = mesh.start_node(&node, &gossip, &check);
        procs.push((r, n));
    }

    let anomaly = |state: &str| -> Vec<Value> {
        get_json(&format!("{api}/api/v1/incidents?state={state}"))
            .and_then(|v| v["incidents"].as_array().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|i| i["kind"] == "site-anomaly")
            .collect()
    };
    let opened = eventually(Duration::from_secs(60), || !anomaly("open").is_empty());
    assert!(
        opened,
        "no site-anomaly incident opened: {:?}",
        get_json(&format!("{api}/api/v1/incidents?state=all"))
    );
    let open = anomaly("open");
    assert_eq!(open.len(), 1, "{open:?}");
    let i = &open[0];
    assert_eq!(i["scope"]["site"], "par", "{i}");
    assert_eq!(i["scope"]["node"], Value::Null, "{i}");
    assert_eq!(i["severity"], "warning", "{i}");
    assert_eq!(i["title"], "site eu/par unusual in its region", "{i}");
    // 100 % of its nodes against 0 % at the others, who are all alike.
    assert_eq!(i["score"].as_f64(), Some(100.0), "{i}");
    assert!(
        i["detail"]
            .as_str()
            .unwrap()
            .contains("unhealthy 100% (of 1 node) against a median of 0%"),
        "{i}"
    );
    let out = run("trellis", &["incidents", "--hub", &api]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("site-anomaly") && l.contains("eu/par")),
        "{text}"
    );

    // Fixed: like the others again, it resolves (after hold_for).
    std::fs::write(&fixed, b"").unwrap();
    let resolved = eventually(Duration::from_secs(60), || anomaly("open").is_empty());
    assert!(resolved, "the incident stayed open: {:?}", anomaly("all"));
    assert_eq!(anomaly("all").len(), 1, "one incident, not one per look");
}
