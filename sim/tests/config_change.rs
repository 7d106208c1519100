//! Configuration changes through the whole simulated mesh: hub to hub, hub
//! to relay over the uplink, relay to nodes through gossip and a fetch, on
//! small topologies and around the faults that hold them up. Every test
//! checks that its fault really held the change back.

use std::path::Path;
use std::process::Command;

use trellis_sim::report::{ConfigChangeOutcome, Report, SiteConvergence};
use trellis_sim::scenario::Scenario;
use trellis_sim::world::World;

/// Two regions of four sites of six nodes; hub-1 serves r1, hub-2 r2.
const BASE: &str = r#"
name = "config-change-test"
duration = "4m"
drain = "1m"

[topology]
regions = 2
hubs = 2
sites_per_region = 4
nodes_per_site = 6
"#;

fn run_with(extra: &str, seed: u64) -> (Report, Scenario) {
    let text = format!("{BASE}{extra}");
    let sc = Scenario::parse(&text, "config-change-test.toml").expect("scenario parses");
    let outcome = World::new(&sc, seed).expect("world builds").run(|_| {});
    assert!(
        outcome.report.violations.is_empty(),
        "{:#?}",
        outcome.report.violations
    );
    (outcome.report, outcome.schedule)
}

fn run(extra: &str) -> Report {
    run_with(extra, 1).0
}

fn site<'a>(c: &'a ConfigChangeOutcome, name: &str) -> &'a SiteConvergence {
    c.per_site
        .iter()
        .find(|p| p.site == name)
        .unwrap_or_else(|| panic!("no site {name}"))
}

fn converged(c: &ConfigChangeOutcome, name: &str) -> f64 {
    site(c, name)
        .converged_s
        .unwrap_or_else(|| panic!("{name} did not converge: {c:#?}"))
}

const OUTAGE: &str = r#"
[[faults]]
kind = "wan_outage"
at = "30s"
duration = "2m"
sites = ["r1-s2", "r2-s3"]

[[actions]]
kind = "config_change"
at = "1m"
"#;

#[test]
fn a_cut_off_site_converges_only_after_its_link_returns_while_connected_ones_take_seconds() {
    let r = run(OUTAGE);
    assert_eq!(r.config_changes.len(), 1);
    let c = &r.config_changes[0];
    assert_eq!((c.version, c.at_s, c.hub.as_str()), (1, 60.0, "hub-1"));
    assert_eq!(c.sites, 8);
    assert_eq!(c.sites_cut_off, 2);
    // The link comes back 90 s after the change.
    let heal = 150.0 - 60.0;
    for name in ["r1-s2", "r2-s3"] {
        let s = site(c, name);
        assert!(s.cut_off, "{name} was cut off");
        let relay = s.relay_s.expect("the relay got it");
        assert!(relay >= heal, "{name}'s relay had it at {relay} s");
        let t = converged(c, name);
        assert!(t >= heal && t < heal + 60.0, "{name} converged at {t} s");
    }
    for p in c.per_site.iter().filter(|p| !p.cut_off) {
        let t = p.converged_s.expect("connected sites converge");
        assert!(t > 0.0 && t < 5.0, "{} converged at {t} s", p.site);
        assert!(!p.superseded);
    }
    // Every site converged by the end; the figures split as they should.
    assert_eq!(c.converged, 8);
    assert!(c.not_converged.is_empty());
    assert_eq!((c.connected.count, c.cut_off.count), (6, 2));
    assert!(c.connected.max_s < 5.0 && c.cut_off.p50_s >= heal);
    assert!(c.connected.p50_s <= c.connected.p90_s && c.connected.p90_s <= c.connected.p99_s);
    assert_eq!(c.all.max_s, c.cut_off.max_s);
    // The other hub got it from the origin at once.
    assert_eq!(c.hubs.len(), 2);
    assert_eq!(c.hubs[0].after_s, Some(0.0));
    assert!(c.hubs[1].after_s.is_some_and(|t| t < 1.0), "{:?}", c.hubs);
    // Slowest first: the two cut-off sites lead the list.
    assert!(c.per_site[..2].iter().all(|p| p.cut_off));
    // Nodes fetched the bundles over the LAN, relays over the WAN.
    assert!(r.traffic.lan.bytes > 48 * 16 * 1024);
}

#[test]
fn a_push_cut_by_the_link_going_down_is_sent_again_after_the_reconnect() {
    // r1-s1's link goes down as the change is made, r1-s2's while the
    // bundle is on its way (a WAN crossing takes 40 ms or more); both
    // sessions still look open when the hub pushes.
    let r = run(r#"
[[faults]]
kind = "wan_outage"
at = "1m"
duration = "1m"
sites = ["r1-s1"]

[[faults]]
kind = "wan_outage"
at = "1m 30ms"
duration = "1m"
sites = ["r1-s2"]

[[actions]]
kind = "config_change"
at = "1m"
"#);
    let c = &r.config_changes[0];
    let (a, b) = (site(c, "r1-s1"), site(c, "r1-s2"));
    assert!(a.cut_off && !b.cut_off, "{a:?} {b:?}");
    for s in [a, b] {
        let relay = s.relay_s.expect("the relay got it in the end");
        assert!((60.0..100.0).contains(&relay), "{s:?}");
        assert!(s.converged_s.unwrap() > relay);
    }
    assert!(converged(c, "r1-s3") < 5.0);
}

#[test]
fn the_same_seed_gives_the_same_convergence_and_the_schedule_replays_it() {
    let (a, schedule) = run_with(OUTAGE, 3);
    let (b, _) = run_with(OUTAGE, 3);
    let (other, _) = run_with(OUTAGE, 4);
    assert_eq!(a.config_changes, b.config_changes);
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        serde_json::to_string(&b).unwrap()
    );
    assert_ne!(
        a.config_changes[0].per_site, other.config_changes[0].per_site,
        "another seed, other timings"
    );
    // schedule.toml keeps the actions, and replays the same convergence.
    let text = toml::to_string(&schedule).unwrap();
    assert!(text.contains("config_change"), "{text}");
    let sc = Scenario::parse(&text, "schedule.toml").unwrap();
    let replayed = World::new(&sc, 3).unwrap().run(|_| {}).report;
    assert_eq!(replayed.config_changes, a.config_changes);
}

#[test]
fn a_node_crashed_at_the_change_applies_it_after_its_restart() {
    let r = run(r#"
[[faults]]
kind = "node_crash"
at = "40s"
duration = "1m"
sites = ["r1-s1"]
share = 0.5

[[actions]]
kind = "config_change"
at = "1m"
"#);
    let c = &r.config_changes[0];
    let s = site(c, "r1-s1");
    // The running half converges at once…
    let live = s.converged_s.expect("converged");
    assert!(live < 5.0, "{live}");
    // …the crashed half restarts 40 s after the change and catches up.
    let all = s.all_nodes_s.expect("every node applied it");
    assert!((40.0..55.0).contains(&all), "{all}");
    // Elsewhere every node was up, so the two figures agree.
    let other = site(c, "r1-s2");
    assert_eq!(other.converged_s, other.all_nodes_s);
    assert!(r.detection.latency.count > 0, "the crashes happened");
}

#[test]
fn a_hub_partitioned_from_the_origin_gets_the_change_after_the_heal_and_so_do_its_sites() {
    let r = run(r#"
[[faults]]
kind = "hub_partition"
at = "30s"
duration = "2m"
hubs = ["hub-2"]

[[actions]]
kind = "config_change"
at = "1m"
hub = "hub-1"
"#);
    let c = &r.config_changes[0];
    let heal = 90.0;
    let hub2 = c.hubs[1].after_s.expect("hub-2 got it");
    assert!(hub2 >= heal && hub2 < heal + 10.0, "{hub2}");
    for i in 1..=4 {
        let r1 = converged(c, &format!("r1-s{i}"));
        assert!(r1 < 5.0, "r1-s{i}: {r1}");
        let r2 = converged(c, &format!("r2-s{i}"));
        assert!(r2 >= hub2 && r2 < hub2 + 10.0, "r2-s{i}: {r2}");
        assert!(!site(c, &format!("r2-s{i}")).cut_off, "not cut off");
    }
}

#[test]
fn a_change_at_a_crashed_hub_waits_for_its_restart() {
    let r = run(r#"
[[faults]]
kind = "hub_crash"
at = "50s"
duration = "1m"
hub = "hub-1"

[[actions]]
kind = "config_change"
at = "1m"
hub = "hub-1"
"#);
    let c = &r.config_changes[0];
    // hub-1 restarts 50 s after the change.
    let hub1 = c.hubs[0].after_s.expect("hub-1 got it");
    assert_eq!(hub1, 50.0);
    let hub2 = c.hubs[1].after_s.expect("hub-2 got it");
    assert!(hub2 >= 50.0, "{hub2}");
    assert_eq!(c.converged, 8);
    assert!(c.all.p50_s >= 50.0, "{:?}", c.all);
}

#[test]
fn a_relay_that_crashed_serves_the_change_after_its_restart() {
    let r = run(r#"
[[faults]]
kind = "relay_crash"
at = "50s"
duration = "40s"
sites = ["r2-s1"]

[[actions]]
kind = "config_change"
at = "1m"
"#);
    let c = &r.config_changes[0];
    let s = site(c, "r2-s1");
    // The relay restarts 30 s after the change, reconnects and fetches.
    assert!(s.relay_s.is_some_and(|t| t >= 30.0), "{s:?}");
    let t = converged(c, "r2-s1");
    assert!((30.0..40.0).contains(&t), "{t}");
    assert!(converged(c, "r2-s2") < 5.0);
}

#[test]
fn a_later_change_supersedes_one_that_has_not_converged_yet() {
    let r = run(r#"
[[faults]]
kind = "wan_outage"
at = "30s"
duration = "2m"
sites = ["r1-s2"]

[[actions]]
kind = "config_change"
at = "1m"

[[actions]]
kind = "config_change"
at = "1m30s"
bundle_bytes = 65536
"#);
    let [v1, v2] = &r.config_changes[..] else {
        panic!("two changes: {:#?}", r.config_changes)
    };
    assert_eq!((v1.version, v2.version), (1, 2));
    assert_eq!(v2.bundle_bytes, 65536);
    // The cut-off site's relay only ever got version 2, and its nodes
    // went straight to it: both converge at the same moment.
    let (a, b) = (site(v1, "r1-s2"), site(v2, "r1-s2"));
    assert!(a.superseded && !b.superseded);
    let (ta, tb) = (a.converged_s.unwrap(), b.converged_s.unwrap());
    assert!(ta >= 90.0, "{ta}");
    assert!((ta - (tb + 30.0)).abs() < 1e-6, "{ta} vs {tb} + 30");
    assert_eq!(a.relay_s.unwrap(), b.relay_s.unwrap() + 30.0);
    // A connected site applied version 1 within seconds, then version 2.
    let (a, b) = (site(v1, "r1-s1"), site(v2, "r1-s1"));
    assert!(!a.superseded && a.converged_s.unwrap() < 5.0);
    assert!(b.converged_s.unwrap() < 5.0);
    assert_eq!((v1.converged, v2.converged), (8, 8));
}

#[test]
fn a_site_on_real_chitchat_converges_through_its_gossip_too() {
    let text = format!("{BASE}\n[[actions]]\nkind = \"config_change\"\nat = \"1m\"\n").replace(
        "nodes_per_site = 6",
        "nodes_per_site = 6\nreal_gossip_sites = 1",
    );
    let sc = Scenario::parse(&text, "real.toml").unwrap();
    let report = World::new(&sc, 1).unwrap().run(|_| {}).report;
    assert_eq!(report.real_gossip_sites, 1);
    let c = &report.config_changes[0];
    let t = converged(c, "r1-s1");
    assert!(t > 0.0 && t < 10.0, "{t}");
    assert_eq!(c.converged, 8);
}

/// `sim/scenarios/config-change.toml` with 50 sites instead of 1,000, so
/// that it runs in seconds in a debug build: the same timeline, and what
/// its comment says to expect.
#[test]
fn the_shipped_scenario_scaled_down_does_what_its_comment_says() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/config-change.toml");
    let (mut sc, _) = Scenario::load(&path).expect("the shipped scenario loads");
    assert_eq!(sc.topology.regions * sc.topology.sites_per_region, 1000);
    sc.topology.sites_per_region = 25;
    let r = World::new(&sc, 1).unwrap().run(|_| {}).report;
    assert!(r.violations.is_empty(), "{:#?}", r.violations);
    let c = &r.config_changes[0];
    assert_eq!((c.sites, c.sites_cut_off, c.converged), (50, 5, 50));
    assert!(c.hubs[1].after_s.is_some_and(|t| t < 0.1), "{:?}", c.hubs);
    assert!(c.connected.max_s < 5.0, "{:?}", c.connected);
    // The links return 180 s after the change; relays reconnect within
    // their 30 s backoff, and their nodes take a few seconds more.
    let cut: Vec<f64> = c
        .per_site
        .iter()
        .filter(|p| p.cut_off)
        .map(|p| p.converged_s.unwrap())
        .collect();
    assert_eq!(cut.len(), 5);
    assert!(cut.iter().all(|t| (180.0..215.0).contains(t)), "{cut:?}");
}

#[test]
fn the_command_line_refuses_a_bad_action_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    for (action, needle) in [
        (
            "kind = \"reboot\"\nat = \"1m\"",
            "unknown variant `reboot`, expected one of `config_change`, `publish_patch`, `rollout`",
        ),
        (
            "kind = \"config_change\"\nat = \"10m\"",
            "actions[0] (config_change): `at` = 10m is after the scenario ends (duration 4m)",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{BASE}\n[[actions]]\n{action}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_trellis-sim"))
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{needle:?} not in: {err}");
        assert!(err.contains("bad.toml"), "{err}");
    }
}
