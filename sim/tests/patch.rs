//! Patch rollouts through the whole simulated mesh on small topologies: a
//! good patch through every wave, a bad one stopped early and rolled back,
//! a site cut off during a bad wave that rolls itself back, the same seed
//! giving the same report, and the errors a bad action gets.

use trellis_sim::patch::{PatchSpec, RolloutSpec, patches, plan, rollouts};
use trellis_sim::report::{Report, RolloutOutcome};
use trellis_sim::scenario::Scenario;
use trellis_sim::world::World;

/// Two regions of three sites of ten nodes; hub-1 serves r1, hub-2 r2.
const BASE: &str = r#"
name = "patch-test"
duration = "12m"
drain = "1m"

[topology]
regions = 2
hubs = 2
sites_per_region = 3
nodes_per_site = 10
"#;

/// A 3 MiB and 1 byte patch (four chunks, the last of one byte) with a
/// short install and bake.
fn publish(failure_probability: f64) -> String {
    format!(
        r#"
[[actions]]
kind = "publish_patch"
at = "30s"
name = "fix"
artifact_bytes = 3145729
failure_probability = {failure_probability}
install_time = "5s"
bake = "40s"
rollback_time = "10s"
"#
    )
}

const ROLLOUT: &str = r#"
[[actions]]
kind = "rollout"
at = "1m"
patch = "fix"
"#;

fn scenario(extra: &str) -> Scenario {
    Scenario::parse(&format!("{BASE}{extra}"), "patch-test.toml").expect("scenario parses")
}

fn run(sc: &Scenario, seed: u64) -> Report {
    let outcome = World::new(sc, seed).expect("world builds").run(|_| {});
    assert!(
        outcome.report.violations.is_empty(),
        "{:#?}",
        outcome.report.violations
    );
    outcome.report
}

fn only_rollout(r: &Report) -> &RolloutOutcome {
    assert_eq!(r.rollouts.len(), 1, "{:#?}", r.rollouts);
    &r.rollouts[0]
}

fn specs(sc: &Scenario) -> (PatchSpec, RolloutSpec) {
    let p = patches(sc);
    let r = rollouts(sc, &p);
    (p[0].clone(), r[0].clone())
}

#[test]
fn a_good_patch_reaches_every_node_through_all_waves_and_each_sites_wan_carries_it_once() {
    // 10% of 60 nodes is fewer than the first two waves take: 25%.
    let rollout = ROLLOUT.replace(
        "patch = \"fix\"",
        "patch = \"fix\"\nwaves = \"canary,1site,25%,100%\"",
    );
    let sc = scenario(&format!("{}{rollout}", publish(0.0)));
    let r = run(&sc, 1);
    let ro = only_rollout(&r);
    assert_eq!(ro.state, "completed", "{ro:#?}");
    assert!(ro.halted_by.is_none());
    let specs: Vec<&str> = ro.waves.iter().map(|w| w.spec.as_str()).collect();
    // 60 nodes: the canary, the rest of its site, up to 15 nodes, the rest.
    assert_eq!(specs, ["canary", "1site", "25%", "100%"]);
    let sizes: Vec<u64> = ro.waves.iter().map(|w| w.nodes).collect();
    assert_eq!(sizes, [1, 9, 5, 45]);
    let mut last_end = 60.0;
    for w in &ro.waves {
        assert_eq!(w.verdict, "passed", "{w:#?}");
        assert_eq!((w.healthy as u64, w.failed, w.pending), (w.nodes, 0, 0));
        assert_eq!(w.patched_failure_ratio, Some(0.0));
        assert_eq!(w.threshold, Some(0.05));
        let (start, end) = (w.started_s.unwrap(), w.ended_s.unwrap());
        assert_eq!(start, last_end, "each wave starts as the one before passes");
        // Install and bake take 45 s; the first fetch and gossip a little.
        assert!(end - start >= 45.0 && end - start < 60.0, "{w:#?}");
        last_end = end;
    }
    assert_eq!(ro.nodes_touched, 60);
    assert_eq!(ro.nodes_left_patched, 60);
    assert_eq!((ro.nodes_failed, ro.nodes_rolled_back), (0, 0));
    assert!(ro.rollback_s.is_none() && ro.local_rollbacks.is_empty());
    // Each site's WAN carried one artifact's bytes, no more, no less.
    assert_eq!(ro.wan.len(), 6);
    for t in &ro.wan {
        assert_eq!(t.bytes, 3_145_729, "{}", t.site);
        assert_eq!(t.installed_nodes, 10, "{}", t.site);
    }
    assert_eq!(ro.wan_bytes, 6 * 3_145_729);
    // The patched nodes show over time.
    assert!(
        r.traffic.lan.bytes > 60 * 3_145_729,
        "nodes fetched over the LAN"
    );
}

#[test]
fn a_bad_patch_is_stopped_at_the_canary_or_first_site_wave_and_every_touched_node_rolled_back() {
    let sc = scenario(&format!("{}{ROLLOUT}", publish(0.5)));
    let (patch, rollout) = specs(&sc);
    let plan = plan(&sc, &rollout.waves, &patch.name);
    let first_two = (plan[0].nodes.len() + plan[1].nodes.len()) as u64;
    let mut stopped_at = Vec::new();
    for seed in 1..=4 {
        let r = run(&sc, seed);
        let ro = only_rollout(&r);
        assert_eq!(ro.state, "halted", "seed {seed}: {ro:#?}");
        let failed: Vec<&str> = ro
            .waves
            .iter()
            .filter(|w| w.verdict == "failed" || w.verdict == "halted")
            .map(|w| w.spec.as_str())
            .collect();
        assert_eq!(failed.len(), 1, "seed {seed}: {ro:#?}");
        assert!(["canary", "1site"].contains(&failed[0]), "seed {seed}");
        stopped_at.push(failed[0].to_owned());
        assert!(
            ro.waves[2..].iter().all(|w| w.started_s.is_none()),
            "seed {seed}: no later wave started"
        );
        assert!(ro.nodes_touched >= 1 && ro.nodes_touched <= first_two);
        assert!(ro.nodes_failed >= 1);
        assert_eq!(ro.nodes_left_patched, 0, "seed {seed}: none left patched");
        assert_eq!(ro.nodes_rolled_back, ro.nodes_touched, "seed {seed}");
        let first = ro.first_failure_s.expect("a node failed");
        let last = ro.last_rolled_back_s.expect("nodes rolled back");
        // Each figure is rounded to the millisecond on its own, so the
        // rounded difference may be a millisecond off the difference of
        // the rounded ends.
        let rollback = ro.rollback_s.expect("a rollback time");
        assert!(
            (rollback - (last - first)).abs() <= 0.0011,
            "seed {seed}: rollback {rollback} s, from {first} to {last}"
        );
        // Gossip, the rollback order and a 10 s rollback: well under a bake.
        assert!(ro.rollback_s.unwrap() >= 10.0 && ro.rollback_s.unwrap() < 40.0);
        // Only the canary's site fetched the artifact, once.
        assert_eq!(ro.wan.len(), 1, "seed {seed}");
        assert_eq!(ro.wan[0].bytes, 3_145_729);
    }
    // Both ways of stopping happen among these seeds.
    assert!(stopped_at.iter().any(|s| s == "canary"), "{stopped_at:?}");
    assert!(stopped_at.iter().any(|s| s == "1site"), "{stopped_at:?}");
}

#[test]
fn a_site_cut_off_during_a_bad_wave_rolls_itself_back_and_the_hub_learns_after_the_heal() {
    // Every node the patch touches breaks; the first wave is one site.
    // Installing takes 30 s, so no node fails before the link goes down.
    let actions = format!(
        "{}{}",
        publish(1.0).replace("install_time = \"5s\"", "install_time = \"30s\""),
        r#"
[[actions]]
kind = "rollout"
at = "1m"
patch = "fix"
waves = "1site,100%"
"#
    );
    let sc = scenario(&actions);
    let (patch, rollout) = specs(&sc);
    let plan = plan(&sc, &rollout.waves, &patch.name);
    let site = sc.site_names()[plan[0].nodes[0].0].clone();
    // Cut off 15 s into the rollout (the artifact has arrived, nodes are
    // installing) for five minutes: the whole bake and rollback.
    let sc = scenario(&format!(
        r#"{actions}
[[faults]]
kind = "wan_outage"
at = "75s"
duration = "5m"
sites = ["{site}"]
"#
    ));
    let heal = 375.0;
    let r = run(&sc, 1);
    let ro = only_rollout(&r);
    assert_eq!(ro.state, "halted", "{ro:#?}");
    assert_eq!(ro.local_rollbacks.len(), 1, "{ro:#?}");
    let l = &ro.local_rollbacks[0];
    assert_eq!(l.site, site);
    assert!(l.cut_off, "the outage really cut it off at the trip");
    assert!(l.tripped_s > 75.0 && l.tripped_s < heal);
    let done = l.done_s.expect("the site rolled back");
    assert!(done < heal, "rolled back at {done} s, before the heal");
    let learnt = l.hub_learnt_s.expect("the hub learnt it");
    assert!(
        learnt > heal,
        "the report arrived at {learnt} s, after the heal"
    );
    assert!(learnt < heal + 60.0, "within a reconnect of the heal");
    // The hub judged the wave only with the report: its rolled-back nodes
    // count as failed.
    assert_eq!(ro.halted_by.as_deref(), Some("wave 0 failed its gate"));
    let w = &ro.waves[0];
    assert_eq!(w.verdict, "failed");
    assert!(w.ended_s.is_some_and(|t| t >= learnt), "{w:#?}");
    assert_eq!((w.healthy, w.failed, w.pending), (0, 10, 0));
    assert!(ro.waves[1].started_s.is_none(), "no new wave started");
    // Every node of the site installed and rolled back, most before the
    // patch had broken them.
    assert_eq!(ro.nodes_touched, 10);
    assert!((1..10).contains(&ro.nodes_failed), "{}", ro.nodes_failed);
    assert_eq!(ro.nodes_rolled_back, 10);
    assert_eq!(ro.nodes_left_patched, 0);
}

#[test]
fn the_same_seed_gives_the_same_report_and_another_seed_another() {
    let sc = scenario(&format!("{}{ROLLOUT}", publish(0.5)));
    let json = |seed| serde_json::to_string(&run(&sc, seed)).unwrap();
    let a = json(3);
    assert!(a.contains("\"rollouts\""));
    assert_eq!(a, json(3));
    assert_ne!(a, json(4));
}

#[test]
fn bad_patch_actions_are_refused_naming_the_action_and_the_field() {
    let good = format!("{}{ROLLOUT}", publish(0.0));
    let with = |from: &str, to: &str| {
        assert!(good.contains(from), "{from}");
        format!("{BASE}{}", good.replacen(from, to, 1))
    };
    for (bad, needles) in [
        (
            with("patch = \"fix\"", "patch = \"fixx\""),
            vec![
                "actions[1] (rollout)",
                "`patch` \"fixx\" is never published; published: fix",
            ],
        ),
        (
            with("patch = \"fix\"", "patch = \"fix\"\nwaves = \"canary,10%\""),
            vec!["actions[1] (rollout): `waves`:", "end the list with 100%"],
        ),
        (
            with(
                "patch = \"fix\"",
                "patch = \"fix\"\nwaves = \"canary,2sites,100%\"",
            ),
            vec!["actions[1] (rollout): `waves`: wave 2 \"2sites\" is not a wave"],
        ),
        (
            with("failure_probability = 0", "failure_probability = 1.5"),
            vec!["actions[0] (publish_patch): `failure_probability` must be in [0, 1]"],
        ),
        (
            with("patch = \"fix\"", "patch = \"fix\"\nmax_failure = 2.0"),
            vec!["actions[1] (rollout): `max_failure` must be in [0, 1]"],
        ),
        (
            with("at = \"1m\"", "at = \"10s\""),
            vec![
                "actions[1] (rollout): patch \"fix\" is published at 30s, after this rollout at 10s",
            ],
        ),
        (
            with("name = \"fix\"", "name = \"Fix!\""),
            vec!["actions[0] (publish_patch): `name`: invalid patch name \"Fix!\""],
        ),
        (
            with("name = \"fix\"\n", ""),
            vec!["actions[0] (publish_patch): needs `name`"],
        ),
        (
            with("artifact_bytes = 3145729", "artifact_bytes = 0"),
            vec!["actions[0] (publish_patch): `artifact_bytes` must be between 1 and"],
        ),
        (
            with("bake = \"40s\"", "bake = \"25h\""),
            vec!["actions[0] (publish_patch): `bake` must be at most 1day"],
        ),
        (
            with("install_time = \"5s\"", "bundle_bytes = 100"),
            vec!["actions[0] (publish_patch): `bundle_bytes` does not apply to publish_patch"],
        ),
        (
            with("patch = \"fix\"", "patch = \"fix\"\nbake = \"1m\""),
            vec!["actions[1] (rollout): `bake` does not apply to rollout"],
        ),
        (
            format!("{BASE}{good}{}", publish(0.0)),
            vec!["patch \"fix\" is published 2 times"],
        ),
        (
            format!("{BASE}{good}{ROLLOUT}"),
            vec!["actions[2] (rollout): patch \"fix\" is rolled out twice"],
        ),
        (
            with("patch = \"fix\"\n", ""),
            vec!["actions[1] (rollout): needs `patch`"],
        ),
    ] {
        let err = Scenario::parse(&bad, "x.toml").unwrap_err().to_string();
        for needle in needles {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
    }
}
