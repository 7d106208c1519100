//! Foresight and runbooks through the whole simulated mesh on small
//! topologies: the same seed giving the same report (and the schedule
//! replaying it), filling disks forecast before they are full, no false
//! alarm on control nodes, a whole site remediating within its rails, a
//! breaker that trips, nothing modelled when nothing is asked for, the
//! errors a bad entry gets, and the shipped scenario doing what its
//! comment says.
//!
//! The test scenarios sample every minute rather than every 30 s, to stay
//! quick in a debug build.

use std::path::Path;

use trellis_sim::report::{ForesightOutcome, Report, RunbookOutcome, Timeseries};
use trellis_sim::scenario::Scenario;
use trellis_sim::world::{Outcome, World};

/// Three sites of eight nodes; gossip and summaries slowed down, as the
/// runs last hours.
const BASE: &str = r#"
name = "foresight-test"
duration = "4h"
drain = "5m"
sample_every = "1m"

[topology]
regions = 1
hubs = 1
sites_per_region = 3
nodes_per_site = 8

[gossip]
interval = "10s"
health_changes_per_node_hour = 0.0

[relay]
summary_interval = "1m"
"#;

fn scenario(text: &str) -> Scenario {
    Scenario::parse(text, "foresight-test.toml").expect("scenario parses")
}

fn run_outcome(sc: &Scenario, seed: u64) -> Outcome {
    let outcome = World::new(sc, seed).expect("world builds").run(|_| {});
    assert!(
        outcome.report.violations.is_empty(),
        "{:#?}",
        outcome.report.violations
    );
    outcome
}

fn run(sc: &Scenario, seed: u64) -> Report {
    run_outcome(sc, seed).report
}

fn foresight(r: &Report) -> &ForesightOutcome {
    r.foresight.as_ref().expect("the run modelled nodes")
}

fn rule<'a>(f: &'a ForesightOutcome, name: &str) -> &'a RunbookOutcome {
    f.runbooks
        .iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no runbook {name}: {:#?}", f.runbooks))
}

#[test]
fn a_run_is_the_same_twice_for_a_seed_and_its_schedule_replays_it() {
    // Everything at once, with a node crash and a relay crash on top.
    let text = format!(
        r#"{BASE}
[foresight]
sample_every = "1m"
control_nodes = 4

[[faults]]
kind = "node_crash"
at = "1h30m"
duration = "10m"
sites = ["r1-s2"]
share = 0.5

[[faults]]
kind = "relay_crash"
at = "2h40m"
duration = "5m"
sites = ["r1-s1"]

[[trends]]
kind = "disk_fill"
at = "10m"
fraction = 0.25
rate = "25GB/h"
used = 0.45

[[anomalies]]
at = "1h"
duration = "15m"
fraction = 0.1
metric = "cpu"
value = 85

[[runbooks]]
name = "clean"
check = "disk"
when = "warning"
run = "logrotate -f /etc/logrotate.conf"
max_per_site = 1
duration = "40s"
"#
    );
    let sc = scenario(&text);
    let a = run_outcome(&sc, 3);
    let b = run(&sc, 3);
    let json = |r: &Report| serde_json::to_string_pretty(r).unwrap();
    assert_eq!(json(&a.report), json(&b), "same seed, same bytes");
    let f = foresight(&a.report);
    assert_eq!(f.trend_nodes, 6, "a quarter of 24 nodes");
    assert!(f.disks.filled + f.disks.averted > 0, "{:#?}", f.disks);
    assert!(rule(f, "clean").runs > 0);
    let other = run(&sc, 4);
    assert_ne!(
        foresight(&other).disks.nodes,
        f.disks.nodes,
        "another seed picks others"
    );

    // schedule.toml names the nodes picked, and replays the same run.
    let schedule = toml::to_string(&a.schedule).expect("the schedule serialises");
    assert!(!schedule.contains("fraction"), "{schedule}");
    let replayed = run(&Scenario::parse(&schedule, "schedule.toml").unwrap(), 3);
    let same = Report {
        scenario: a.report.scenario.clone(),
        ..replayed
    };
    assert_eq!(json(&same), json(&a.report), "the schedule replays the run");
}

#[test]
fn every_disk_filling_for_longer_than_a_forecast_needs_is_forecast_before_it_is_full() {
    // Nodes that have sampled steady figures for 6 hours (a full forecast
    // window): the hardest case, as the flat history weighs against a new
    // rise. Fills from 2.5 h to 4 h long at 8 to 30 GB/h, one with hourly
    // clean-ups; and one of an hour, shorter than a forecast needs.
    let fill = |node: &str, at: &str, rate: &str, used: f64, extra: &str| {
        format!(
            "[[trends]]\nkind = \"disk_fill\"\nat = \"{at}\"\nnodes = [\"{node}\"]\n\
             rate = \"{rate}\"\nused = {used}\n{extra}\n"
        )
    };
    let text = format!(
        "{}\n[foresight]\nsample_every = \"1m\"\nhistory = \"6h\"\ncontrol_nodes = 0\n\n{}{}{}{}{}{}",
        BASE.replace("duration = \"4h\"", "duration = \"5h\""),
        fill("r1-s1-n1", "30m", "10GB/h", 0.6, ""),
        fill("r1-s1-n2", "30m", "20GB/h", 0.5, ""),
        fill("r1-s2-n1", "1h", "30GB/h", 0.25, ""),
        fill(
            "r1-s2-n2",
            "20m",
            "12GB/h",
            0.6,
            "cleanup_every = \"1h\"\ncleanup_fraction = 0.2"
        ),
        fill("r1-s3-n1", "1h", "8GB/h", 0.76, ""),
        fill("r1-s3-n2", "2h", "40GB/h", 0.6, ""),
    );
    let sc = scenario(&text);
    let r = run(&sc, 1);
    let f = foresight(&r);
    let span = f.forecast_min_span_s;
    println!("node         fill      forecast after start  lead");
    for d in &f.disks.nodes {
        let full = d.full_s.expect("every disk fills in the run");
        let fill = full - d.started_s;
        println!(
            "{:<12} {:>5.2} h   {:>8}   {:>8}",
            d.node,
            fill / 3600.0,
            d.forecast_s.map_or("never".into(), |t| format!(
                "{:.2} h",
                (t - d.started_s) / 3600.0
            )),
            d.lead_s
                .map_or("–".into(), |l| format!("{:.2} h", l / 3600.0)),
        );
        if fill >= span + 1800.0 {
            let lead = d
                .lead_s
                .unwrap_or_else(|| panic!("{d:#?} not forecast before full"));
            // Not before the fill covers half the newest forecast span
            // (the newest span's slope is taken once clearly steeper).
            assert!(lead > 0.0 && lead < fill - span / 2.0, "{d:#?}");
        } else {
            assert!(
                d.lead_s.is_none(),
                "an hour's fill is too short to see: {d:#?}"
            );
        }
    }
    assert_eq!(f.disks.filled, 6);
    assert_eq!(f.disks.predicted_before_full, 5);
    assert_eq!(f.disks.not_predicted, ["r1-s3-n2:/var"]);
    assert!(f.disks.lead_warning.min_s > 0.0);
    assert_eq!(f.false_alarms.first, [], "nothing raised without a cause");
}

#[test]
fn control_nodes_raise_no_false_alarm_while_injected_anomalies_are_flagged() {
    let text = format!(
        r#"{}
[foresight]
sample_every = "1m"
history = "1h"
control_nodes = 16
cpu_noise = 4.0

[[anomalies]]
at = "1h"
duration = "20m"
nodes = ["r1-s1-n1", "r1-s2-n1", "r1-s3-n1"]
metric = "cpu"
value = 90

[[anomalies]]
at = "3h"
duration = "10m"
nodes = ["r1-s1-n1"]
metric = "cpu"
value = 70

[[trends]]
kind = "disk_fill"
at = "30m"
nodes = ["r1-s1-n2", "r1-s2-n2"]
rate = "5GB/h"
used = 0.4
cleanup_every = "30m"
cleanup_fraction = 0.3
"#,
        BASE.replace("duration = \"4h\"", "duration = \"5h\"")
    );
    let r = run(&scenario(&text), 2);
    let f = foresight(&r);
    assert_eq!(f.control_nodes, 16);
    assert_eq!((f.anomaly_nodes, f.trend_nodes), (3, 2));
    let fa = &f.false_alarms;
    assert_eq!(fa.first, [], "{fa:#?}");
    assert_eq!(
        (fa.on_controls, fa.elsewhere, fa.controls_alarmed),
        (0, 0, 0)
    );
    assert!(
        (fa.control_node_hours - 16.0 * 5.0833).abs() < 0.1,
        "{fa:#?}"
    );
    // Each anomaly raised on the third sample at or after its start
    // (`persist` = 3 at 1 minute), and cleared as soon after its end.
    let a = &f.anomalies;
    assert_eq!((a.injected, a.flagged, a.missed_total), (4, 4, 0), "{a:#?}");
    assert_eq!((a.delay.min_s, a.delay.max_s), (120.0, 120.0));
    assert_eq!(a.cleared_after_end.max_s, 120.0);
    // The slow fills were forecast, and are not false alarms.
    assert_eq!(f.disks.forecast, 2, "{:#?}", f.disks);
}

#[test]
fn a_whole_site_remediates_at_most_max_per_site_at_once_while_the_others_wait() {
    // Every node of r1-s1 crosses the disk check's 90% within minutes; the
    // site's relay crashes for three minutes in the middle of it.
    let text = format!(
        r#"{}
[foresight]
sample_every = "1m"
control_nodes = 4

[[faults]]
kind = "relay_crash"
at = "25m"
duration = "3m"
sites = ["r1-s1"]

[[trends]]
kind = "disk_fill"
at = "10m"
sites = ["r1-s1"]
rate = "30GB/h"
used = 0.85

[[runbooks]]
name = "clean-logs"
check = "disk"
when = "warning"
after = "1m"
run = "logrotate -f /etc/logrotate.conf"
timeout = "2m"
max_per_site = 2
duration = "1m"
used_after = 0.5
"#,
        BASE.replace("duration = \"4h\"", "duration = \"1h10m\"")
            .replace("nodes_per_site = 8", "nodes_per_site = 12")
    );
    let sc = scenario(&text);
    let out = run_outcome(&sc, 5);
    let f = foresight(&out.report);
    let c = rule(f, "clean-logs");
    assert_eq!(c.nodes, 16, "12 filling and 4 controls");
    assert_eq!((c.runs, c.fixed), (12, 12), "{c:#?}");
    assert_eq!(c.max_concurrent, 2, "{c:#?}");
    assert_eq!(c.max_concurrent_site.as_deref(), Some("r1-s1"));
    assert!(
        c.blocked_site_limit >= 20 && c.nodes_blocked_site_limit >= 9,
        "most nodes had to wait their turn: {c:#?}"
    );
    assert!(
        c.blocked_no_relay > 0,
        "requests while the relay was down: {c:#?}"
    );
    assert_eq!(f.disks.averted, 12, "each was cleaned before it was full");
    assert_eq!(f.disks.filled, 0);
    // The time series agrees: never more than 2 remediating.
    let remediating = out
        .series
        .column(Timeseries::REMEDIATING)
        .expect("the column is there");
    assert_eq!(remediating.iter().copied().fold(0.0, f64::max), 2.0);
}

#[test]
fn a_rule_whose_action_never_fixes_trips_its_breaker_after_its_failures() {
    let text = format!(
        r#"{}
[foresight]
sample_every = "1m"
control_nodes = 0

[[trends]]
kind = "disk_fill"
at = "5m"
nodes = ["r1-s1-n1", "r1-s2-n1", "r1-s3-n1"]
rate = "30GB/h"
used = 0.88

[[runbooks]]
name = "useless"
check = "disk"
when = "warning"
after = "1m"
run = "true"
verify = "1m"
min_interval = "3m"
breaker_failures = 3
breaker_window = "1h"
fixes = false
duration = "10s"
"#,
        BASE.replace("duration = \"4h\"", "duration = \"1h\"")
    );
    let r = run(&scenario(&text), 1);
    let f = foresight(&r);
    let u = rule(f, "useless");
    assert_eq!(u.breaker_trips, 3, "{u:#?}");
    assert_eq!(u.trips.len(), 3);
    assert!(
        u.trips
            .iter()
            .all(|t| t.note.starts_with("tripped: 3 failed runs"))
    );
    // Three runs each, none fixed, then nothing: the breaker stays open.
    assert_eq!((u.runs, u.fixed, u.not_recovered), (9, 0, 9), "{u:#?}");
    assert!(u.refusals > 0, "the rate limit held runs back between them");
    assert_eq!(f.disks.filled, 3, "nothing cleaned them");
}

#[test]
fn without_trends_anomalies_or_runbooks_no_node_is_modelled() {
    let sc = scenario(&BASE.replace("duration = \"4h\"", "duration = \"5m\""));
    assert!(!sc.has_foresight());
    let out = run_outcome(&sc, 1);
    assert!(out.report.foresight.is_none());
    assert!(out.series.column(Timeseries::DISKS_FULL).is_none());
    assert!(out.series.column(Timeseries::REMEDIATING).is_none());
    let json = serde_json::to_string(&out.report).unwrap();
    assert!(!json.contains("\"foresight\":"), "{json}");
    let schedule = toml::to_string(&out.schedule).unwrap();
    for key in ["[foresight", "[[trends]]", "[[anomalies]]", "[[runbooks]]"] {
        assert!(!schedule.contains(key), "{schedule}");
    }
}

#[test]
fn bad_trends_anomalies_and_runbooks_are_refused_naming_the_entry_and_the_field() {
    let trend = "[[trends]]\nkind = \"disk_fill\"\nat = \"1h\"\nfraction = 0.1\nrate = \"2GB/h\"\n";
    let anomaly = "[[anomalies]]\nat = \"1h\"\nduration = \"5m\"\nfraction = 0.1\nmetric = \"cpu\"\nvalue = 90\n";
    let runbook = "[[runbooks]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\n";
    for (extra, needle) in [
        (
            trend.replace("2GB/h", "2GB"),
            "is not a rate; write it like \"2GB/h\"",
        ),
        (trend.replace("2GB/h", "2XB/h"), "is not a rate"),
        (
            trend.replace("\"1h\"", "\"5h\""),
            "trends[0] (disk_fill): `at` = 5h is after the scenario ends (duration 4h)",
        ),
        (
            trend.replace("fraction = 0.1", "nodes = [\"r1-s1-n9\"]"),
            "trends[0] (disk_fill): `nodes`: no node \"r1-s1-n9\"",
        ),
        (
            trend.replace("fraction = 0.1", "sites = [\"r9-s1\"]"),
            "trends[0] (disk_fill): `sites`: no site \"r9-s1\"",
        ),
        (
            trend.replace("fraction = 0.1\n", ""),
            "trends[0] (disk_fill): pick nodes with `sites`, `regions`, `nodes` or a `fraction`",
        ),
        (
            trend.replace("fraction = 0.1", "fraction = 1.5"),
            "`fraction` must be more than 0 and at most 1",
        ),
        (
            format!("{trend}used = 1.0\n"),
            "`used` is the share of the disk in use at the start, in [0, 1)",
        ),
        (
            format!("{trend}cleanup_every = \"1h\"\n"),
            "set both `cleanup_every` and `cleanup_fraction`, or neither",
        ),
        (
            format!("{trend}size = \"lots\"\n"),
            "\"lots\" is not a size",
        ),
        (
            trend.replace("disk_fill", "mem_leak"),
            "unknown variant `mem_leak`, expected `disk_fill`",
        ),
        (
            anomaly.replace("cpu", "mem"),
            "unknown variant `mem`, expected `cpu`",
        ),
        (
            anomaly.replace("90", "190"),
            "anomalies[0] (cpu): `value` is CPU busy in percent, in [0, 100]",
        ),
        (
            anomaly.replace("\"5m\"", "\"0s\""),
            "anomalies[0] (cpu): `duration` must be more than 0",
        ),
        (
            runbook.replace("\"disk\"", "\"app\""),
            "runbooks[0] (clean): `check` \"app\" is not one a modelled node has",
        ),
        (
            runbook.replace("\"disk\"", "\"forecast:disk:/data\""),
            "runbooks[0] (clean): `check`: no modelled node has a disk at \"/data\"; disks: /var",
        ),
        (
            format!("{runbook}max_per_site = 0\n"),
            "runbooks[0] (clean): runbook clean: `max_per_site` must be at least 1",
        ),
        (
            format!("{runbook}used_after = 2\n"),
            "runbooks[0] (clean): `used_after` is the share of the disk in use after a fix",
        ),
        (
            format!("{runbook}duration = \"0s\"\n"),
            "`duration` (how long the action runs) must be more than 0",
        ),
        (
            format!("{runbook}regions = [\"r7\"]\n"),
            "runbooks[0] (clean): `regions`: no region \"r7\"",
        ),
        (
            format!("{runbook}frobnicate = true\n"),
            "runbook \"clean\": unknown field `frobnicate`",
        ),
        (
            runbook.replace("run = \"true\"\n", ""),
            "runbook \"clean\": missing field `run`",
        ),
        (
            format!("{runbook}{runbook}"),
            "runbooks[1] (clean): two runbooks are named \"clean\"",
        ),
        (
            "[foresight]\nsample_every = \"0s\"\n".to_owned(),
            "foresight.sample_every must be between 1s and 10m",
        ),
        (
            "[foresight.node]\npersist = 0\n".to_owned(),
            "foresight.node.persist: must be between 1 and 100 samples",
        ),
        (
            "[foresight]\ndisk_used = 1.5\n".to_owned(),
            "foresight.disk_size must be more than 0 and foresight.disk_used in [0, 1)",
        ),
    ] {
        let err = Scenario::parse(&format!("{BASE}{extra}"), "bad.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{needle:?} not in: {err}");
        assert!(err.contains("bad.toml"), "{err}");
    }
}

/// `sim/scenarios/foresight.toml` as shipped (it runs in well under a
/// minute in a debug build): what its comment says to expect.
#[test]
fn the_shipped_scenario_does_what_its_comment_says() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/foresight.toml");
    let (sc, _) = Scenario::load(&path).expect("the shipped scenario loads");
    let r = run(&sc, 1);
    let f = foresight(&r);
    let per = &f.disks.per_trend;
    // r1's slow fills: every one forecast before it was full, hours ahead.
    assert_eq!(per[0].filled, per[0].disks);
    assert_eq!(per[0].predicted_before_full, per[0].disks);
    assert!(per[0].lead_warning.min_s > 3600.0, "{:#?}", per[0]);
    // r1's short fills: full before a forecast could see them.
    assert_eq!(per[1].filled, per[1].disks);
    assert_eq!(per[1].predicted_before_full, 0);
    // r2's slow fills: cleaned before they were full.
    assert_eq!(per[2].filled, 0);
    assert_eq!(per[2].averted, per[2].disks);
    assert!(rule(f, "clean-before-full").fixed >= per[2].disks);
    // r2-s4: all 25 at once, at most 2 at a time, all cleaned in time.
    assert_eq!((per[3].disks, per[3].averted), (25, 25));
    let logs = rule(f, "clean-logs");
    assert_eq!(logs.max_concurrent, 2);
    assert_eq!(logs.max_concurrent_site.as_deref(), Some("r2-s4"));
    assert!(logs.nodes_blocked_site_limit >= 20, "{logs:#?}");
    // Every anomaly flagged; nothing raised on the control nodes.
    assert_eq!(f.anomalies.flagged, f.anomalies.injected);
    assert_eq!(f.false_alarms.on_controls, 0);
    // restart-app fixes nothing: its breaker trips on every node it ran on.
    let restart = rule(f, "restart-app");
    assert_eq!(restart.fixed, 0);
    assert!(restart.breaker_trips > 0);
    assert_eq!(restart.runs, 2 * restart.breaker_trips, "{restart:#?}");
}
