//! Whole-mesh tests with real processes: `trellis-hub`, `trellis-relay`
//! and several `trellis-node`s on 127.0.0.1, certificates from `trellis ca`.

use std::time::{Duration, Instant};

use trellis_tests::{Mesh, Proc, eventually, fleet_site, get_json, http_get, serial};

const REGION: &str = "eu";
const SITE: &str = "par";

/// A hub, a relay and `n` nodes of site `par`, all alive at the hub.
struct Site {
    mesh: Mesh,
    hub: Proc,
    api: String,
    uplink: String,
    relay: Proc,
    relay_gossip: String,
    relay_metrics: String,
    nodes: Vec<Proc>,
}

fn node_name(i: usize) -> String {
    format!("par-n{i}")
}

fn start_site(n: usize) -> Site {
    start_site_with(n, "", "")
}

fn start_site_with(n: usize, hub_extra: &str, relay_extra: &str) -> Site {
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    mesh.issue("relay", REGION, SITE, "par-relay");
    for i in 0..n {
        mesh.issue("node", REGION, SITE, &node_name(i));
    }
    let (hub, uplink, api) = mesh.start_hub("hub-1", hub_extra);
    let (mut relay, relay_gossip) = mesh.start_relay("par-relay", &uplink, relay_extra);
    let relay_metrics = relay.wait_field("relay ready", "metrics", Duration::from_secs(5));
    let nodes = (0..n)
        .map(|i| mesh.start_node(&node_name(i), &relay_gossip, "").0)
        .collect();
    let site = Site {
        mesh,
        hub,
        api,
        uplink,
        relay,
        relay_gossip,
        relay_metrics,
        nodes,
    };
    let all_alive = eventually(Duration::from_secs(30), || {
        site.row().is_some_and(|(_, r)| {
            r["nodes_alive"] == n && r["nodes_dead"] == 0 && r["status"] == "healthy"
        })
    });
    assert!(
        all_alive,
        "the hub never saw {n} nodes alive: {:?}",
        get_json(&format!("{}/api/v1/fleet", site.api))
    );
    site
}

impl Site {
    fn row(&self) -> Option<(serde_json::Value, serde_json::Value)> {
        fleet_site(&self.api, SITE)
    }

    fn metric(&self, addr: &str, line_start: &str) -> Option<f64> {
        let (_, body) = http_get(&format!("http://{addr}/metrics"))?;
        body.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

#[test]
fn a_killed_node_is_dead_at_the_hub_within_15s_and_alive_again_after_restart() {
    let _serial = serial();
    let mut site = start_site(4);
    let victim = 2;
    let port = site.nodes[victim].wait_field("node ready", "gossip", Duration::from_secs(1));

    let status = site.nodes[victim].kill9();
    let killed_at = Instant::now();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "the node really died of SIGKILL"
    );

    let seen_dead = eventually(Duration::from_secs(20), || {
        site.row().is_some_and(|(_, r)| {
            r["nodes_dead"] == 1 && r["dead"][0] == node_name(victim).as_str()
        })
    });
    let detection = killed_at.elapsed();
    assert!(seen_dead, "the hub never saw the node dead");
    eprintln!("killed node dead at the hub after {detection:?}");
    assert!(
        detection <= Duration::from_secs(15),
        "dead at the hub only after {detection:?}"
    );
    let (totals, row) = site.row().unwrap();
    assert_eq!(row["status"], "degraded");
    assert_eq!(row["nodes_alive"], 3);
    assert_eq!(totals["nodes_dead"], 1);
    // The event log says so too.
    let events = get_json(&format!("{}/api/v1/events?site={SITE}", site.api)).unwrap();
    assert!(
        events["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "node_died"
                && e["body"]["Event"]["NodeDied"]["node"] == node_name(victim).as_str()),
        "{events}"
    );

    // Same name, same certificate, same address: a new process where the
    // old one was, as a supervisor would restart it.
    let (again, _) = site.mesh.start_node(
        &node_name(victim),
        &site.relay_gossip,
        &format!("[gossip]\nlisten = \"{port}\"\n"),
    );
    let restarted = Instant::now();
    site.nodes[victim] = again;
    let back = eventually(Duration::from_secs(20), || {
        site.row().is_some_and(|(_, r)| {
            r["nodes_alive"] == 4 && r["nodes_dead"] == 0 && r["status"] == "healthy"
        })
    });
    assert!(back, "the restarted node never came back: {:?}", site.row());
    eprintln!(
        "restarted node alive at the hub after {:?}",
        restarted.elapsed()
    );
    assert!(site.hub.is_running() && site.relay.is_running());
}

#[test]
fn certificates_of_another_site_or_another_ca_cannot_join_the_sites_gossip() {
    let _serial = serial();
    let site = start_site(2);
    // A node of another site, from the same CA.
    site.mesh.issue("node", REGION, "ber", "ber-n1");
    let (mut other_site, _) = site.mesh.start_node("ber-n1", &site.relay_gossip, "");
    // A node of this site, but from a CA of its own.
    let foreign = Mesh::new();
    foreign.issue("node", REGION, SITE, "par-impostor");
    let (mut impostor, _) = foreign.start_node("par-impostor", &site.relay_gossip, "");

    let refused = eventually(Duration::from_secs(20), || {
        let wrong_site = site.metric(
            &site.relay_metrics,
            r#"trellis_connection_refusals_total{protocol="gossip",reason="wrong_site"}"#,
        );
        let tls = site.metric(
            &site.relay_metrics,
            r#"trellis_connection_refusals_total{protocol="unknown",reason="tls"}"#,
        );
        wrong_site.is_some_and(|v| v >= 1.0) && tls.is_some_and(|v| v >= 1.0)
    });
    assert!(refused, "the relay never counted both refusals");
    // The relay logged why.
    let log = site.relay.log().join("\n");
    assert!(log.contains("refused connection"), "{log}");
    assert!(log.contains("is not in the site of"), "{log}");
    // Give them a few more gossip rounds, then check nobody got in.
    std::thread::sleep(Duration::from_secs(3));
    let (_, row) = site.row().unwrap();
    assert_eq!(row["nodes_total"], 2, "{row}");
    let nodes = get_json(&format!("{}/api/v1/sites/{SITE}/nodes", site.api)).unwrap();
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert!(
        !names.contains(&"ber-n1") && !names.contains(&"par-impostor"),
        "{names:?}"
    );
    // The intruders are still trying, not crashed: the refusals were real.
    assert!(other_site.is_running() && impostor.is_running());
}

#[test]
fn drill_down_lists_the_sites_nodes_live_from_the_relay() {
    let _serial = serial();
    let site = start_site(3);
    let nodes = get_json(&format!("{}/api/v1/sites/{SITE}/nodes", site.api)).unwrap();
    assert_eq!(nodes["relay"], "par-relay");
    let list = nodes["nodes"].as_array().unwrap();
    assert_eq!(list.len(), 4, "3 nodes and the relay: {nodes}");
    for n in list {
        assert_eq!(n["alive"], true);
        assert!(n["mem_pct"].as_u64().is_some(), "{n}");
        assert!(
            n["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["name"] == "disk")
        );
    }
    let (status, body) = http_get(&format!("{}/api/v1/sites/nowhere/nodes", site.api)).unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no site"), "{body}");
    let _ = &site.uplink;
}

#[test]
fn a_relay_that_is_gone_makes_drill_down_fail_clearly_and_the_site_unreachable() {
    let _serial = serial();
    let mut site = start_site_with(
        1,
        "[uplink]\nsilence_timeout = \"3s\"\n[fleet]\nstale_after = \"3s\"\n",
        "[uplink]\nsummary_interval = \"1s\"\n",
    );
    // Summaries every second keep a healthy site fresh under a 3 s limit.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(site.row().unwrap().1["status"], "healthy");

    site.relay.kill9();
    let killed = Instant::now();
    let mut last = None;
    let unreachable = eventually(Duration::from_secs(20), || {
        last = http_get(&format!("{}/api/v1/sites/{SITE}/nodes", site.api));
        last.as_ref()
            .is_some_and(|(status, body)| *status == 503 && body.contains("not connected"))
    });
    assert!(
        unreachable,
        "drill-down never said the relay is gone: {last:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    let (_, row) = site.row().unwrap();
    assert_eq!(row["status"], "unreachable", "{row}");
    // One site-level condition with the last known state: no node reported
    // dead because its relay went away.
    assert_eq!(row["nodes_dead"], 0, "{row}");
    assert_eq!(row["nodes_alive"], 1, "{row}");
    assert_eq!(row["connected"], false, "{row}");
    assert!(site.hub.log().join("\n").contains("relay went silent"));
    assert!(site.hub.is_running());
}
