//! The same scenario and seed give a byte-identical report; another seed
//! gives another; the schedule a run writes replays it. On a scenario of
//! 1,000 nodes with every kind of fault, each of which must really have
//! happened.

use trellis_sim::report::Report;
use trellis_sim::scenario::Scenario;
use trellis_sim::world::World;

const SCENARIO: &str = r#"
name = "determinism"
duration = "6m"
drain = "2m"
sample_every = "10s"

[topology]
regions = 2
hubs = 3
sites_per_region = 10
nodes_per_site = 50

[gossip]
health_changes_per_node_hour = 6.0

[[faults]]
kind = "wan_outage"
at = "1m"
duration = "2m"
fraction = 0.2

[[faults]]
kind = "hub_crash"
at = "1m30s"
duration = "1m"
hub = "hub-1"

[[faults]]
kind = "hub_partition"
at = "3m"
duration = "40s"
hubs = ["hub-2"]

[[faults]]
kind = "node_crash"
at = "2m"
duration = "1m"
regions = ["r2"]
share = 0.05

[[faults]]
kind = "relay_crash"
at = "2m30s"
duration = "20s"
sites = ["r2-s3"]

[[faults]]
kind = "loss_storm"
at = "4m"
duration = "1m"
class = "wan"
loss = 0.1

[[faults]]
kind = "disk_full"
at = "1m"
duration = "4m"
sites = ["r1-s1"]
max_bytes = 16384

[[faults]]
kind = "wan_outage"
at = "1m"
duration = "4m"
sites = ["r1-s1"]

[swarm]
wan_flaps_per_site_hour = 1.0
node_crashes_per_site_hour = 1.0
mean_duration = "20s"
"#;

fn run(text: &str, seed: u64) -> (Report, String, Scenario) {
    let sc = Scenario::parse(text, "determinism.toml").expect("scenario parses");
    let outcome = World::new(&sc, seed).expect("world builds").run(|_| {});
    let json = serde_json::to_string_pretty(&outcome.report).expect("serialises");
    (outcome.report, json, outcome.schedule)
}

fn digest(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_run_is_reproducible_from_its_seed_and_its_schedule_replays_it() {
    let (a, json_a, schedule) = run(SCENARIO, 7);
    let (_, json_b, _) = run(SCENARIO, 7);
    let (_, json_c, _) = run(SCENARIO, 8);
    println!(
        "seed 7: {} twice, seed 8: {}",
        digest(&json_a),
        digest(&json_c)
    );
    assert_eq!(digest(&json_a), digest(&json_b), "same seed, same report");
    assert_ne!(
        digest(&json_a),
        digest(&json_c),
        "another seed, another run"
    );

    // The run held its invariants…
    assert!(a.violations.is_empty(), "{:#?}", a.violations);
    assert_eq!(a.records.lost, 0);
    assert_eq!(a.records.duplicates_applied, 0);
    // …and every fault really happened and left its mark.
    assert_eq!(a.nodes, 1000);
    assert!(a.detection.latency.count > 0, "node crashes detected");
    assert!(a.buffers.drain.count > 0, "backlogs drained after outages");
    assert!(
        a.records.dropped_with_gap > 0,
        "the full disk dropped records"
    );
    assert!(a.records.duplicates_absorbed > 0, "failover resent records");
    for kind in [
        "wan_outage",
        "hub_crash",
        "hub_partition",
        "node_crash",
        "relay_crash",
        "loss_storm",
        "disk_full",
    ] {
        assert!(
            a.faults.iter().any(|f| f.kind == kind && f.targets > 0),
            "{kind} ran"
        );
    }
    assert!(
        a.faults.iter().filter(|f| f.kind == "wan_outage").count() > 2,
        "swarm faults were drawn"
    );

    // schedule.toml replays the same run.
    let text = toml::to_string(&schedule).expect("schedule serialises");
    let (replayed, _, _) = run(&text, 7);
    let same = Report {
        scenario: a.scenario.clone(),
        ..replayed
    };
    assert_eq!(same, a, "the schedule replays the run");
}
