//! What a run reports: `report.json` (figures and invariants), the time
//! series behind `timeseries.csv`, and the data the charts of
//! `report.html` are drawn from.
//!
//! Everything here is computed from the run alone, in a fixed order, so
//! the same scenario and seed serialise to the same bytes.

use serde::{Deserialize, Serialize};

/// Latency figures (seconds).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    /// The distribution: the value at each percentile 0, 1, …, 100 (empty
    /// when there are no samples).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<f64>,
}

impl Latency {
    /// Figures of `samples` (seconds), rounded to the millisecond.
    pub fn of(samples: &[f64], with_cdf: bool) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((s.len() - 1) as f64 * q).round() as usize;
            ms(s[i])
        };
        Latency {
            count: s.len() as u64,
            p50_s: at(0.5),
            p99_s: at(0.99),
            max_s: ms(s[s.len() - 1]),
            cdf: if with_cdf {
                (0..=100).map(|p| at(p as f64 / 100.0)).collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// Seconds rounded to the millisecond (so reports do not carry float
/// noise).
pub fn ms(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

/// Failure detection at the relays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    /// From a node's crash to its relay calling it dead.
    pub latency: Latency,
    /// Nodes called dead while their process ran.
    pub false_suspicions: u64,
    /// Crashes not detected before the node restarted or the run ended.
    pub undetected: u64,
    /// From a health change to every member of the site holding it.
    pub dissemination: Latency,
}

/// One fault as it ran, and how long the mesh took to settle after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultOutcome {
    pub kind: String,
    pub at_s: f64,
    pub healed_s: f64,
    /// What it hit: sites, hubs or a link class, by name (at most 20
    /// listed; `targets` counts them all).
    pub targets: u64,
    pub named: Vec<String>,
    /// Seconds from the heal until every relay's records were acknowledged,
    /// every hub held every stream alike and the hubs' views agreed with
    /// the truth; `None` when that did not happen before the run ended.
    pub converged_after_s: Option<f64>,
}

/// Traffic of one link class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    pub bytes: u64,
    pub messages: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkTraffic {
    /// Inside sites. For sites running the gossip model this is an
    /// estimate from the digests and deltas exchanged; for sites running
    /// real chitchat it is what chitchat sent.
    pub lan: Traffic,
    /// Relay ↔ hub: records, acknowledgements, handshakes.
    pub wan: Traffic,
    /// Hub ↔ hub: replication and federation gossip.
    pub hub: Traffic,
}

/// A relay buffer's biggest moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferPeak {
    pub relay: String,
    pub bytes: u64,
    pub records: u64,
}

/// How long a relay took to empty its backlog after its link came back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Drain {
    pub relay: String,
    pub healed_s: f64,
    /// Records not yet acknowledged when the link came back.
    pub backlog: u64,
    /// Seconds until all of them were acknowledged (`None`: not by the end).
    pub drain_s: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Buffers {
    /// The largest peak of any relay (bytes).
    pub peak_bytes_max: u64,
    /// The ten relays with the largest peaks, largest first.
    pub top_peaks: Vec<BufferPeak>,
    pub drain: Latency,
    /// Individual drains (at most 50 listed, longest first).
    pub drains: Vec<Drain>,
}

/// Record accounting, checked at the end of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    /// Records the relays made durable.
    pub persisted: u64,
    /// Of those, held by at least one hub at the end (a gap stands for the
    /// records it replaces).
    pub delivered: u64,
    /// Records dropped at a full buffer and told to the hubs by a gap.
    pub dropped_with_gap: u64,
    /// Durable records no hub holds and no relay still buffers: must be 0.
    pub lost: u64,
    /// Records some hub applied twice: must be 0.
    pub duplicates_applied: u64,
    /// Copies that arrived again and were absorbed by the `(relay, seq)`
    /// rule.
    pub duplicates_absorbed: u64,
    /// Records durable at a relay but still buffered at the end (the run
    /// ended before they drained).
    pub still_buffered: u64,
}

/// The whole report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// SHA-256 of the scenario file as given.
    pub scenario_sha256: String,
    pub seed: u64,
    pub virtual_seconds: f64,
    pub regions: u64,
    pub sites: u64,
    pub nodes: u64,
    pub hubs: u64,
    pub real_gossip_sites: u64,
    /// Events the engine processed (sites count one per gossip round).
    pub events: u64,
    pub detection: Detection,
    pub faults: Vec<FaultOutcome>,
    pub traffic: LinkTraffic,
    pub buffers: Buffers,
    pub records: Records,
    /// Configuration changes, in version order (absent from runs without
    /// any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_changes: Vec<ConfigChangeOutcome>,
    /// Patch rollouts, in the order they were started (absent from runs
    /// without any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutOutcome>,
    /// Disk forecasts, anomalies, false alarms and remediations (absent
    /// from runs without trends, anomalies or runbooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foresight: Option<ForesightOutcome>,
    /// Invariant violations; empty on a good run.
    pub violations: Vec<String>,
}

/// How long a set of sites took to converge on a configuration change
/// (seconds; sites that did not converge are not among them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConvergenceTimes {
    pub count: u64,
    pub p50_s: f64,
    pub p90_s: f64,
    pub p99_s: f64,
    pub max_s: f64,
    /// The value at each percentile 0, 1, …, 100 (empty when there are no
    /// samples).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf: Vec<f64>,
}

impl ConvergenceTimes {
    /// Figures of `samples` (seconds), rounded to the millisecond, taken
    /// as [`Latency::of`] takes them.
    pub fn of(samples: &[f64]) -> ConvergenceTimes {
        let l = Latency::of(samples, true);
        let at = |p: usize| l.cdf.get(p).copied().unwrap_or(0.0);
        ConvergenceTimes {
            count: l.count,
            p50_s: l.p50_s,
            p90_s: at(90),
            p99_s: l.p99_s,
            max_s: l.max_s,
            cdf: l.cdf,
        }
    }
}

/// When a hub came to hold a configuration change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubReach {
    pub hub: String,
    /// Seconds after the change (`None`: not by the end).
    pub after_s: Option<f64>,
}

/// One site's part in a configuration change (seconds after the change;
/// `None`: not by the end).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteConvergence {
    pub site: String,
    /// Its WAN link was down when the change was made.
    pub cut_off: bool,
    /// Until its relay held the change (or a later one).
    pub relay_s: Option<f64>,
    /// Until every node running at the site had applied it (or a later
    /// one): the site converged.
    pub converged_s: Option<f64>,
    /// Until every node of the site had, those that were down when it
    /// converged included (they apply it after their restart).
    pub all_nodes_s: Option<f64>,
    /// A later change was made before this one converged here, so its
    /// nodes may have gone straight to the later one.
    pub superseded: bool,
}

/// A configuration change and how the fleet converged on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigChangeOutcome {
    pub version: u64,
    /// When the operator applied it, and at which hub.
    pub at_s: f64,
    pub hub: String,
    pub bundle_bytes: u64,
    pub apply_time_s: f64,
    /// When each hub held it, in hub order.
    pub hubs: Vec<HubReach>,
    pub sites: u64,
    /// Sites whose WAN link was down when it was made.
    pub sites_cut_off: u64,
    /// Sites that converged by the end.
    pub converged: u64,
    /// Convergence times of every site, of those connected when the change
    /// was made, and of those cut off.
    pub all: ConvergenceTimes,
    pub connected: ConvergenceTimes,
    pub cut_off: ConvergenceTimes,
    /// Sites that had not converged by the end, by name.
    pub not_converged: Vec<String>,
    /// Every site, slowest first (those that did not converge first).
    pub per_site: Vec<SiteConvergence>,
}

/// One wave in the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveOutcome {
    pub index: u64,
    /// As written: `canary`, `1site`, `10%`…
    pub spec: String,
    pub nodes: u64,
    pub sites: u64,
    /// Up to 20 of its sites, in index order.
    pub first_sites: Vec<String>,
    pub started_s: Option<f64>,
    pub ended_s: Option<f64>,
    /// The hub's counts when it judged the wave (or at the end).
    pub healthy: u32,
    pub failed: u32,
    pub pending: u32,
    /// Pending in sites the hub could not reach, left out of the gate.
    pub unreachable: u32,
    pub patched_failure_ratio: Option<f64>,
    pub baseline_failure_ratio: Option<f64>,
    pub threshold: Option<f64>,
    /// `passed`, `failed`, `halted` (another site's relay rolled back),
    /// `unfinished` or `not started`.
    pub verdict: String,
}

/// The artifact's bytes one site's WAN carried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactTransfer {
    pub site: String,
    pub bytes: u64,
    /// Nodes of the site that installed it.
    pub installed_nodes: u64,
}

/// A site whose relay rolled it back on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalRollback {
    pub site: String,
    pub tripped_s: f64,
    /// When its last patched node finished rolling back.
    pub done_s: Option<f64>,
    /// When the hub got the relay's report of it.
    pub hub_learnt_s: Option<f64>,
    /// Its WAN link was down when it tripped.
    pub cut_off: bool,
}

/// A rollout in the report (times in seconds of the run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutOutcome {
    pub patch: String,
    pub hub: String,
    pub at_s: f64,
    pub started_s: Option<f64>,
    pub waves_spec: String,
    pub max_failure: f64,
    pub auto_rollback: bool,
    pub artifact_bytes: u64,
    pub failure_probability: f64,
    /// `completed`, `halted`, `unfinished` or `not started`.
    pub state: String,
    pub ended_s: Option<f64>,
    pub halted_by: Option<String>,
    /// Nodes that ran `install`.
    pub nodes_touched: u64,
    /// Nodes whose checks failed after installing.
    pub nodes_failed: u64,
    pub nodes_rolled_back: u64,
    /// Nodes with the patch installed at the end.
    pub nodes_left_patched: u64,
    pub first_failure_s: Option<f64>,
    pub last_rolled_back_s: Option<f64>,
    /// From the first failure to the last node rolled back.
    pub rollback_s: Option<f64>,
    pub local_rollbacks: Vec<LocalRollback>,
    /// Artifact bytes over the WAN, all sites, then per site.
    pub wan_bytes: u64,
    pub wan: Vec<ArtifactTransfer>,
    pub waves: Vec<WaveOutcome>,
}

/// The least, the median and the most of a set of durations (seconds,
/// rounded to the millisecond; all 0 when there are none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub count: u64,
    pub min_s: f64,
    pub p50_s: f64,
    pub max_s: f64,
}

impl Spread {
    pub fn of(samples: &[f64]) -> Spread {
        let l = Latency::of(samples, false);
        Spread {
            count: l.count,
            min_s: samples
                .iter()
                .copied()
                .min_by(f64::total_cmp)
                .map_or(0.0, ms),
            p50_s: l.p50_s,
            max_s: l.max_s,
        }
    }
}

/// Foresight and runbooks in a run: the modelled nodes (those given a
/// trend or an anomaly, and the control nodes), what their `Foresight`s
/// raised and when, and what their runbooks did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ForesightOutcome {
    /// How often the modelled nodes sampled their figures.
    pub sample_every_s: f64,
    /// History a forecast needs (`forecast_min_span`).
    pub forecast_min_span_s: f64,
    pub nodes_modelled: u64,
    pub trend_nodes: u64,
    pub anomaly_nodes: u64,
    /// Nodes with nothing injected, modelled to count false alarms.
    pub control_nodes: u64,
    pub disks: DiskForecasts,
    pub anomalies: AnomalyDetection,
    pub false_alarms: FalseAlarms,
    /// Per rule, in file order.
    pub runbooks: Vec<RunbookOutcome>,
}

/// Disks given a trend: were they forecast before they filled, and how
/// long before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskForecasts {
    pub disks: u64,
    /// Forecast (`forecast:disk:MOUNT` warning or critical) at least once
    /// after their trend started.
    pub forecast: u64,
    /// Full at least once.
    pub filled: u64,
    /// Of those, forecast before they were first full.
    pub predicted_before_full: u64,
    /// Full with no forecast before (`node:mount`; at most 50 listed).
    pub not_predicted_total: u64,
    pub not_predicted: Vec<String>,
    /// From the first forecast (warning or critical), and from the first
    /// critical one, to the moment the disk was first full.
    pub lead_warning: Spread,
    pub lead_critical: Spread,
    /// Cleaned by a runbook and never full.
    pub averted: u64,
    pub per_trend: Vec<TrendOutcome>,
    /// Per disk (at most 200: those full first, least warned first).
    pub nodes: Vec<DiskOutcome>,
}

/// One `[[trends]]` entry's disks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrendOutcome {
    pub index: u64,
    pub mount: String,
    pub rate: String,
    pub at_s: f64,
    pub disks: u64,
    pub forecast: u64,
    pub filled: u64,
    pub predicted_before_full: u64,
    pub lead_warning: Spread,
    pub lead_critical: Spread,
    /// From the trend's start to the disk first full, of those that filled.
    pub time_to_full: Spread,
    pub averted: u64,
}

/// One disk given a trend (times in seconds of the run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskOutcome {
    pub node: String,
    pub mount: String,
    pub trend: u64,
    pub started_s: f64,
    /// First forecast (warning or critical), first critical one.
    pub forecast_s: Option<f64>,
    pub critical_s: Option<f64>,
    /// First full.
    pub full_s: Option<f64>,
    /// From the first forecast to full, when forecast before.
    pub lead_s: Option<f64>,
    pub times_full: u64,
    /// Runbook actions that cleaned it, and when the first one did.
    pub fixes: u64,
    pub cleaned_s: Option<f64>,
}

/// Injected anomalies: flagged (`anomaly:METRIC` raised while it lasted),
/// how soon, and how soon the finding cleared after it ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyDetection {
    /// Node × anomaly.
    pub injected: u64,
    pub flagged: u64,
    pub missed_total: u64,
    /// Nodes whose anomaly was not flagged (at most 50 listed).
    pub missed: Vec<String>,
    /// From the anomaly's start to its finding.
    pub delay: Spread,
    /// From the anomaly's end to its finding passing again.
    pub cleared_after_end: Spread,
    pub per_anomaly: Vec<AnomalyOutcome>,
}

/// One `[[anomalies]]` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnomalyOutcome {
    pub index: u64,
    pub metric: String,
    pub value: f64,
    pub at_s: f64,
    pub duration_s: f64,
    pub nodes: u64,
    pub flagged: u64,
    pub delay: Spread,
}

/// Findings raised without a cause: a forecast on a disk with no trend
/// (or before its trend started), an anomaly of a figure nothing was
/// injected into.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FalseAlarms {
    pub control_nodes: u64,
    pub control_node_hours: f64,
    /// Findings raised on control nodes, and the control nodes with one.
    pub on_controls: u64,
    pub controls_alarmed: u64,
    pub per_control_node_hour: f64,
    /// Findings without a cause on nodes given a trend or an anomaly.
    pub elsewhere: u64,
    /// The first 50, in time order.
    pub first: Vec<FalseAlarm>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FalseAlarm {
    pub node: String,
    /// `control`, `trend` or `anomaly`: what the node was given.
    pub class: String,
    pub check: String,
    pub at_s: f64,
}

/// One runbook: what its engines ran and what the rails refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunbookOutcome {
    pub name: String,
    pub check: String,
    pub when: String,
    pub after_s: f64,
    pub max_per_site: u32,
    pub min_interval_s: f64,
    pub breaker_failures: u32,
    pub breaker_window_s: f64,
    pub dry_run: bool,
    /// What the modelled action does: removes the cause or not, and how
    /// long it runs.
    pub fixes: bool,
    pub action_s: f64,
    /// Modelled nodes the rule applies to.
    pub nodes: u64,
    /// Actions run, and how they ended: fixed, failed (the action failed
    /// or timed out), not recovered (the check still bad after `verify`).
    pub runs: u64,
    pub fixed: u64,
    pub failed: u64,
    pub not_recovered: u64,
    pub timed_out: u64,
    pub dry_runs: u64,
    pub lease_requests: u64,
    /// Lease requests the site's relay refused (the site's limit), and the
    /// nodes refused at least once.
    pub blocked_site_limit: u64,
    pub nodes_blocked_site_limit: u64,
    /// Episodes (a check going bad) a node's rate limit refused.
    pub blocked_rate_limit: u64,
    /// Lease requests no relay answered.
    pub blocked_no_relay: u64,
    /// The engines' own count of refusals by the rails.
    pub refusals: u64,
    pub breaker_trips: u64,
    pub breaker_resets: u64,
    /// The most nodes of one site remediating at once (from the action's
    /// start to the end of its verification), where and when first: must
    /// never be more than `max_per_site`.
    pub max_concurrent: u32,
    pub max_concurrent_site: Option<String>,
    pub max_concurrent_s: Option<f64>,
    /// Sites with any remediation (at most 50, most concurrent first).
    pub sites: Vec<SiteRemediation>,
    /// Breaker trips (at most 50).
    pub trips: Vec<Trip>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteRemediation {
    pub site: String,
    pub runs: u64,
    pub fixed: u64,
    /// Lease requests refused by the site's limit.
    pub busy: u64,
    pub max_concurrent: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    pub node: String,
    pub at_s: f64,
    pub note: String,
}

/// Samples taken every `sample_every` of virtual time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeseries {
    /// Column names; the first is `t_s`.
    pub columns: Vec<String>,
    pub rows: Vec<Vec<f64>>,
}

impl Timeseries {
    /// The columns a run records for `regions` regions (named `r1`, `r2`,
    /// …): time, then alive and seen-alive nodes per region, then the
    /// fleet-wide figures. `report.html` reads them by these names.
    pub fn run_columns(regions: usize) -> Vec<String> {
        let mut columns = vec!["t_s".to_owned()];
        for r in 1..=regions {
            columns.push(format!("alive:r{r}"));
            columns.push(format!("seen_alive:r{r}"));
        }
        for c in [
            "buffer_records",
            "buffer_bytes",
            "buffer_bytes_max",
            "wan_bytes",
            "hub_bytes",
            "lan_bytes",
            "relays_connected",
            "sites_unreachable",
        ] {
            columns.push(c.to_owned());
        }
        columns
    }

    /// The column a run with configuration changes adds: running nodes
    /// that have applied the newest change made so far.
    pub const CONFIG_CURRENT: &str = "config_current";

    /// The column a run with patch rollouts adds: nodes with a patch
    /// installed (all rollouts together).
    pub const PATCH_INSTALLED: &str = "patch_installed";

    /// The columns a run with trends, anomalies or runbooks adds: modelled
    /// disks full, and nodes remediating (an action running or being
    /// verified).
    pub const DISKS_FULL: &str = "disks_full";
    pub const REMEDIATING: &str = "remediating";

    pub fn new(columns: Vec<String>) -> Self {
        Timeseries {
            columns,
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<f64>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// The values of column `name`, if there is one.
    pub fn column(&self, name: &str) -> Option<Vec<f64>> {
        let i = self.columns.iter().position(|c| c == name)?;
        Some(self.rows.iter().map(|r| r[i]).collect())
    }

    /// CSV with a header line; numbers as Rust prints them (shortest
    /// representation that reads back the same).
    pub fn to_csv(&self) -> String {
        let mut out = self.columns.join(",");
        out.push('\n');
        for r in &self.rows {
            let line: Vec<String> = r.iter().map(|v| format!("{v}")).collect();
            out.push_str(&line.join(","));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_come_from_the_sorted_samples() {
        let l = Latency::of(&[3.0, 1.0, 2.0, 10.0], true);
        assert_eq!(l.count, 4);
        assert_eq!(l.p50_s, 3.0, "index round(1.5) = 2");
        assert_eq!(l.max_s, 10.0);
        assert_eq!(l.cdf.len(), 101);
        assert_eq!(l.cdf[0], 1.0);
        assert_eq!(Latency::of(&[], true), Latency::default());
    }

    #[test]
    fn convergence_times_add_the_90th_percentile_to_the_latency_figures() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let c = ConvergenceTimes::of(&samples);
        let l = Latency::of(&samples, true);
        assert_eq!(
            (c.count, c.p50_s, c.p99_s, c.max_s),
            (l.count, l.p50_s, l.p99_s, l.max_s)
        );
        assert_eq!(c.p90_s, 90.0, "index round(99 × 0.9) = 89");
        assert_eq!(ConvergenceTimes::of(&[]), ConvergenceTimes::default());
    }

    #[test]
    fn a_report_without_configuration_changes_keeps_its_shape() {
        let json = serde_json::to_string(&Report::default()).unwrap();
        assert!(!json.contains("config_changes"), "{json}");
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Report::default());
    }

    #[test]
    fn csv_has_a_header_and_a_line_per_sample() {
        let mut t = Timeseries::new(vec!["t_s".into(), "x".into()]);
        t.push(vec![0.0, 1.5]);
        t.push(vec![10.0, 2.0]);
        assert_eq!(t.to_csv(), "t_s,x\n0,1.5\n10,2\n");
        assert_eq!(t.column("x"), Some(vec![1.5, 2.0]));
    }
}
