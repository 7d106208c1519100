//! The fleet as Prometheus gauges: nodes by status per site, sites by
//! status, the newest patch rollout's progress and each relay's uplink lag.
//!
//! The hub's counters say what the hub did; these say what the fleet looks
//! like, so that alerts and dashboards need not poll the JSON API.
//! [`FleetSample::of`] is pure: the fleet view, the sites' summaries, the
//! rollouts and the wall clock in, the values out. [`FleetMetrics::set`]
//! writes a sample into the gauges and removes the series of sites, relays
//! and states the sample no longer has (a site gone from the fleet must not
//! keep reporting its last counts). [`fleet_metrics_task`] takes a sample
//! from the core task every [`FLEET_METRICS_EVERY`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Unit;
use tokio_util::sync::CancellationToken;
use trellis_node::clock::{ticker, unix_ms};
use trellis_node::metrics::Registry;
use trellis_relay::report::FleetReport;
use trellis_relay::summary::{SiteStatus, SiteSummary};

use crate::driver::{Input, Shared};
use crate::patchrollout::{RolloutRecord, progress};

/// How often the gauges are refreshed from the fleet view: a few scrapes
/// in a row may show the same values, none shows values older than this.
pub const FLEET_METRICS_EVERY: Duration = Duration::from_secs(2);

/// Every site status, so that a status no site has shows 0 rather than
/// vanishing from a dashboard.
const SITE_STATUSES: [SiteStatus; 5] = [
    SiteStatus::Healthy,
    SiteStatus::Degraded,
    SiteStatus::Critical,
    SiteStatus::Empty,
    SiteStatus::Unreachable,
];

/// The state of a planned node whose wave has not started.
pub const NOT_STARTED: &str = "not-started";

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct SiteNodesLabels {
    pub region: String,
    pub site: String,
    /// `passing`, `warning`, `critical`, `unknown` (alive nodes by their
    /// health) or `dead`.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct StatusLabels {
    /// A site status: `healthy`, `degraded`, `critical`, `empty`,
    /// `unreachable`.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct StateLabels {
    /// A patch state as the site's relay reported it (`installing`,
    /// `healthy`, `rolled-back`…), `waiting` for a patched node whose relay
    /// has not reported yet, or [`NOT_STARTED`].
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RelayLabels {
    /// The relay's name (from its certificate).
    pub relay: String,
}

/// The newest rollout's progress.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutSample {
    pub run: u64,
    pub waves_started: u64,
    pub waves_total: u64,
    /// Planned nodes by state.
    pub nodes: BTreeMap<String, u64>,
}

/// What the gauges show at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FleetSample {
    pub site_nodes: BTreeMap<SiteNodesLabels, u64>,
    /// Sites by status (every status, 0 included).
    pub sites: BTreeMap<String, u64>,
    /// `None` when no rollout was ever started.
    pub rollout: Option<RolloutSample>,
    /// Seconds by relay.
    pub uplink_lag_s: BTreeMap<String, f64>,
}

impl FleetSample {
    /// The sample of `fleet` (the hub's fleet view), `summaries` (the latest
    /// summary of every site) and `rollouts` (every rollout's newest
    /// record) at wall clock `now_ms`.
    ///
    /// A relay's uplink lag is the age of the newest summary it made, by
    /// the summary's own time (how old the hub's picture of the site is);
    /// for a relay whose summary is not at hand, the time since the hub
    /// last heard from its site.
    pub fn of(
        fleet: &FleetReport,
        summaries: &[SiteSummary],
        rollouts: &[RolloutRecord],
        now_ms: u64,
    ) -> FleetSample {
        let mut site_nodes = BTreeMap::new();
        for row in &fleet.sites {
            let b = &row.by_status;
            for (status, n) in [
                ("passing", b.passing),
                ("warning", b.warning),
                ("critical", b.critical),
                ("unknown", b.unknown),
                ("dead", row.nodes_dead),
            ] {
                let labels = SiteNodesLabels {
                    region: row.region.clone(),
                    site: row.site.clone(),
                    status: status.to_owned(),
                };
                site_nodes.insert(labels, u64::from(n));
            }
        }
        let mut sites: BTreeMap<String, u64> = SITE_STATUSES
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for row in &fleet.sites {
            *sites.entry(row.status.as_str().to_owned()).or_default() += 1;
        }
        let mut newest_ms: BTreeMap<&str, u64> = BTreeMap::new();
        for s in summaries {
            let t = newest_ms.entry(s.relay.as_str()).or_default();
            *t = (*t).max(s.generated_ms);
        }
        let mut uplink_lag_s: BTreeMap<String, f64> = newest_ms
            .iter()
            .map(|(relay, at)| ((*relay).to_owned(), age_s(now_ms, *at)))
            .collect();
        for row in &fleet.sites {
            uplink_lag_s
                .entry(row.relay.clone())
                .or_insert(row.last_seen_s as f64);
        }
        let rollout = rollouts
            .iter()
            .max_by_key(|r| r.run)
            .map(|r| rollout_sample(r, summaries));
        FleetSample {
            site_nodes,
            sites,
            rollout,
            uplink_lag_s,
        }
    }
}

fn rollout_sample(r: &RolloutRecord, summaries: &[SiteSummary]) -> RolloutSample {
    let (_, per_site) = progress(r, summaries);
    let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
    for p in &per_site {
        for (state, n) in &p.states {
            *nodes.entry(state.clone()).or_default() += u64::from(*n);
        }
        let unpatched = p.planned.saturating_sub(p.patched);
        if unpatched > 0 {
            *nodes.entry(NOT_STARTED.to_owned()).or_default() += u64::from(unpatched);
        }
    }
    RolloutSample {
        run: r.run,
        waves_started: r.started as u64,
        waves_total: r.waves.len() as u64,
        nodes,
    }
}

/// Seconds from `at_ms` to `now_ms`; 0 for a time ahead of the clock (the
/// relay's clock runs ahead of the hub's).
fn age_s(now_ms: u64, at_ms: u64) -> f64 {
    now_ms.saturating_sub(at_ms) as f64 / 1000.0
}

/// The gauges, with the last sample written (to know which series to
/// remove).
pub struct FleetMetrics {
    site_nodes: Family<SiteNodesLabels, Gauge>,
    sites: Family<StatusLabels, Gauge>,
    rollout_run: Gauge,
    waves_started: Gauge,
    waves_total: Gauge,
    rollout_nodes: Family<StateLabels, Gauge>,
    uplink_lag: Family<RelayLabels, Gauge<f64, AtomicU64>>,
    last: FleetSample,
}

impl FleetMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = FleetMetrics {
            site_nodes: Family::default(),
            sites: Family::default(),
            rollout_run: Gauge::default(),
            waves_started: Gauge::default(),
            waves_total: Gauge::default(),
            rollout_nodes: Family::default(),
            uplink_lag: Family::default(),
            last: FleetSample::default(),
        };
        let r = registry.sub_registry_with_prefix("trellis_hub");
        r.register(
            "site_nodes",
            "Nodes of each site: alive ones by health status, and dead ones",
            m.site_nodes.clone(),
        );
        r.register("sites", "Sites by status", m.sites.clone());
        r.register(
            "rollout_run",
            "Run number of the newest patch rollout (0 when none was started)",
            m.rollout_run.clone(),
        );
        r.register(
            "rollout_waves_started",
            "Waves of the newest patch rollout started so far",
            m.waves_started.clone(),
        );
        r.register(
            "rollout_waves_total",
            "Waves planned for the newest patch rollout",
            m.waves_total.clone(),
        );
        r.register(
            "rollout_nodes",
            "Nodes planned for the newest patch rollout, by patch state",
            m.rollout_nodes.clone(),
        );
        r.register_with_unit(
            "uplink_lag",
            "Age of the newest summary received from each relay",
            Unit::Seconds,
            m.uplink_lag.clone(),
        );
        m
    }

    /// Writes `sample` into the gauges; series the previous sample had and
    /// this one lacks are removed.
    pub fn set(&mut self, sample: FleetSample) {
        for (labels, n) in &sample.site_nodes {
            self.site_nodes.get_or_create(labels).set(as_i64(*n));
        }
        for gone in self.last.site_nodes.keys() {
            if !sample.site_nodes.contains_key(gone) {
                self.site_nodes.remove(gone);
            }
        }
        for (status, n) in &sample.sites {
            let labels = StatusLabels {
                status: status.clone(),
            };
            self.sites.get_or_create(&labels).set(as_i64(*n));
        }
        let rollout = sample.rollout.clone().unwrap_or_default();
        self.rollout_run.set(as_i64(rollout.run));
        self.waves_started.set(as_i64(rollout.waves_started));
        self.waves_total.set(as_i64(rollout.waves_total));
        for (state, n) in &rollout.nodes {
            let labels = StateLabels {
                state: state.clone(),
            };
            self.rollout_nodes.get_or_create(&labels).set(as_i64(*n));
        }
        let before: BTreeSet<&String> = self
            .last
            .rollout
            .iter()
            .flat_map(|r| r.nodes.keys())
            .collect();
        for gone in before {
            if !rollout.nodes.contains_key(gone) {
                self.rollout_nodes.remove(&StateLabels {
                    state: gone.clone(),
                });
            }
        }
        for (relay, lag) in &sample.uplink_lag_s {
            let labels = RelayLabels {
                relay: relay.clone(),
            };
            self.uplink_lag.get_or_create(&labels).set(*lag);
        }
        for gone in self.last.uplink_lag_s.keys() {
            if !sample.uplink_lag_s.contains_key(gone) {
                self.uplink_lag.remove(&RelayLabels {
                    relay: gone.clone(),
                });
            }
        }
        self.last = sample;
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Refreshes `metrics` from the core task every [`FLEET_METRICS_EVERY`]
/// until `shutdown`. A rollout record that does not parse is left out (the
/// rollout API reports it).
pub(crate) async fn fleet_metrics_task(
    shared: Shared,
    mut metrics: FleetMetrics,
    shutdown: CancellationToken,
) {
    let mut tick = ticker(FLEET_METRICS_EVERY);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(fleet) = shared.fleet().await else {
            break;
        };
        let Some(summaries) = shared.ask(|reply| Input::Summaries { reply }).await else {
            break;
        };
        let Some(entries) = shared.ask(|reply| Input::Rollouts { reply }).await else {
            break;
        };
        let rollouts: Vec<RolloutRecord> = entries
            .iter()
            .filter_map(|e| serde_json::from_str(&e.record).ok())
            .collect();
        metrics.set(FleetSample::of(&fleet, &summaries, &rollouts, unix_ms()));
    }
}

#[cfg(test)]
mod tests {
    use trellis_node::patchstate::PatchState;
    use trellis_node::waves::{NodeRef, parse_waves, plan_waves};
    use trellis_relay::report::{FleetTotals, SiteRow};
    use trellis_relay::summary::PatchTally;

    use super::*;

    fn summary(site: &str, relay: &str, at_ms: u64) -> SiteSummary {
        let mut s = SiteSummary::empty("eu", site, relay, at_ms);
        s.nodes_total = 4;
        s.nodes_alive = 3;
        s.nodes_dead = 1;
        s.by_status.passing = 2;
        s.by_status.critical = 1;
        s
    }

    fn fleet(rows: &[(&SiteSummary, SiteStatus, u64)]) -> FleetReport {
        let sites: Vec<SiteRow> = rows
            .iter()
            .map(|(s, status, seen)| SiteRow::new(s, *status, *seen, true))
            .collect();
        FleetReport {
            hub: "hub-1".into(),
            totals: FleetTotals::of(&sites),
            sites,
            relay: None,
        }
    }

    fn nodes(sample: &FleetSample, site: &str, status: &str) -> Option<u64> {
        sample
            .site_nodes
            .get(&SiteNodesLabels {
                region: "eu".into(),
                site: site.into(),
                status: status.into(),
            })
            .copied()
    }

    #[test]
    fn nodes_are_counted_by_status_per_site_with_the_dead_apart() {
        let par = summary("par", "relay-par", 1_000);
        let f = fleet(&[(&par, SiteStatus::Degraded, 0)]);
        let s = FleetSample::of(&f, std::slice::from_ref(&par), &[], 1_000);
        assert_eq!(nodes(&s, "par", "passing"), Some(2));
        assert_eq!(nodes(&s, "par", "critical"), Some(1));
        assert_eq!(nodes(&s, "par", "warning"), Some(0));
        assert_eq!(nodes(&s, "par", "unknown"), Some(0));
        assert_eq!(nodes(&s, "par", "dead"), Some(1));
        assert_eq!(s.site_nodes.len(), 5);
    }

    #[test]
    fn every_site_status_is_counted_even_when_no_site_has_it() {
        let (par, lon) = (summary("par", "r1", 0), summary("lon", "r2", 0));
        let f = fleet(&[
            (&par, SiteStatus::Healthy, 0),
            (&lon, SiteStatus::Unreachable, 90),
        ]);
        let s = FleetSample::of(&f, &[par, lon], &[], 0);
        let expected: BTreeMap<String, u64> = [
            ("critical", 0),
            ("degraded", 0),
            ("empty", 0),
            ("healthy", 1),
            ("unreachable", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(s.sites, expected);
    }

    #[test]
    fn uplink_lag_is_the_age_of_the_newest_summary_of_each_relay() {
        let old = summary("par", "relay-par", 10_000);
        let ahead = summary("lon", "relay-lon", 70_000);
        let f = fleet(&[
            (&old, SiteStatus::Healthy, 0),
            (&ahead, SiteStatus::Healthy, 0),
        ]);
        let s = FleetSample::of(&f, &[old, ahead], &[], 62_500);
        assert_eq!(s.uplink_lag_s["relay-par"], 52.5);
        // A relay clock ahead of the hub's does not make a negative lag.
        assert_eq!(s.uplink_lag_s["relay-lon"], 0.0);
    }

    #[test]
    fn a_relay_without_a_summary_at_hand_lags_by_the_time_since_it_was_heard() {
        let par = summary("par", "relay-par", 0);
        let f = fleet(&[(&par, SiteStatus::Unreachable, 42)]);
        let s = FleetSample::of(&f, &[], &[], 1_000_000);
        assert_eq!(s.uplink_lag_s["relay-par"], 42.0);
    }

    fn rollout(run: u64) -> RolloutRecord {
        let fleet: Vec<NodeRef> = (0..4)
            .map(|n| NodeRef {
                name: format!("par-n{n}"),
                region: "eu".into(),
                site: "par".into(),
            })
            .collect();
        let spec = "canary,100%";
        let waves = plan_waves(&parse_waves(spec).unwrap(), &fleet, b"salt");
        RolloutRecord::start(
            run,
            (&"ab".repeat(32), "fix", "1"),
            spec,
            waves,
            1_000,
            0.0,
            true,
            "alice",
            "hub-1",
            0,
        )
    }

    #[test]
    fn the_newest_rollout_shows_its_waves_and_its_nodes_by_state() {
        let (older, newer) = (rollout(1), rollout(2));
        let canary = newer.waves[0].nodes[0].name.clone();
        let mut par = summary("par", "relay-par", 0);
        par.patch = Some(PatchTally {
            run: 2,
            patch: [0xab; 32],
            action: newer.action(),
            started: 1,
            states: [(canary, (PatchState::Installing, false))].into(),
            baseline_healthy: 3,
            baseline_failed: 0,
            local: None,
        });
        let f = fleet(&[(&par, SiteStatus::Healthy, 0)]);
        let s = FleetSample::of(&f, &[par], &[newer, older], 0);
        let r = s.rollout.unwrap();
        assert_eq!((r.run, r.waves_started, r.waves_total), (2, 1, 2));
        let expected: BTreeMap<String, u64> =
            [("installing".to_owned(), 1), (NOT_STARTED.to_owned(), 3)].into();
        assert_eq!(r.nodes, expected);
    }

    #[test]
    fn no_rollout_means_no_rollout_sample() {
        let s = FleetSample::of(&fleet(&[]), &[], &[], 0);
        assert_eq!(s.rollout, None);
        assert!(s.site_nodes.is_empty() && s.uplink_lag_s.is_empty());
    }

    fn rendered(registry: &Registry) -> String {
        trellis_node::metrics::render(registry)
    }

    #[test]
    fn series_of_a_site_no_longer_known_are_removed() {
        let mut registry = Registry::default();
        let mut m = FleetMetrics::register(&mut registry);
        let (par, lon) = (
            summary("par", "relay-par", 0),
            summary("lon", "relay-lon", 0),
        );
        let both = fleet(&[
            (&par, SiteStatus::Healthy, 0),
            (&lon, SiteStatus::Healthy, 0),
        ]);
        m.set(FleetSample::of(&both, &[par.clone(), lon.clone()], &[], 0));
        let text = rendered(&registry);
        assert!(
            text.contains(
                "trellis_hub_site_nodes{region=\"eu\",site=\"lon\",status=\"passing\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("trellis_hub_uplink_lag_seconds{relay=\"relay-lon\"} 0"));
        assert!(text.contains("trellis_hub_sites{status=\"healthy\"} 2"));
        let one = fleet(&[(&par, SiteStatus::Healthy, 0)]);
        m.set(FleetSample::of(&one, &[par], &[], 3_000));
        let text = rendered(&registry);
        assert!(!text.contains("site=\"lon\""), "{text}");
        assert!(!text.contains("relay-lon"), "{text}");
        assert!(
            text.contains("trellis_hub_site_nodes{region=\"eu\",site=\"par\",status=\"dead\"} 1")
        );
        assert!(text.contains("trellis_hub_uplink_lag_seconds{relay=\"relay-par\"} 3.0"));
        assert!(text.contains("trellis_hub_sites{status=\"healthy\"} 1"));
        assert!(text.contains("trellis_hub_rollout_waves_total 0"));
    }

    #[test]
    fn rollout_states_no_longer_held_are_removed() {
        let mut registry = Registry::default();
        let mut m = FleetMetrics::register(&mut registry);
        let mut sample = FleetSample {
            rollout: Some(RolloutSample {
                run: 3,
                waves_started: 1,
                waves_total: 2,
                nodes: [("installing".to_owned(), 1), (NOT_STARTED.to_owned(), 3)].into(),
            }),
            ..FleetSample::default()
        };
        m.set(sample.clone());
        let text = rendered(&registry);
        assert!(
            text.contains("trellis_hub_rollout_nodes{state=\"installing\"} 1"),
            "{text}"
        );
        assert!(text.contains("trellis_hub_rollout_waves_started 1"));
        assert!(text.contains("trellis_hub_rollout_run 3"));
        sample.rollout.as_mut().unwrap().nodes = [("healthy".to_owned(), 4)].into();
        m.set(sample);
        let text = rendered(&registry);
        assert!(!text.contains("installing"), "{text}");
        assert!(!text.contains(NOT_STARTED), "{text}");
        assert!(text.contains("trellis_hub_rollout_nodes{state=\"healthy\"} 4"));
    }
}
