//! Site summaries and how they roll up.
//!
//! A [`SiteSummary`] is what a relay says about its site at one moment:
//! counts by status, dead nodes, failing checks, resource histograms and the
//! worst nodes, all bounded in size whatever the size of the site.
//!
//! A [`Rollup`] holds the latest summary of each site and merges with other
//! rollups as a last-writer-wins map keyed by site: merge is associative,
//! commutative and idempotent, so hubs can combine what they hear in any
//! order, any number of times. Region and fleet [`Totals`] are derived from
//! a rollup, never stored.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_node::site::Status;

/// Most dead nodes listed by name in a summary.
pub const MAX_DEAD_LISTED: usize = 32;
/// Most nodes in a summary's or a rollup's worst-nodes list.
pub const MAX_WORST: usize = 10;
/// Most failing check names kept per worst node.
pub const MAX_FAILING_PER_NODE: usize = 5;
/// Most distinct failing check names in a summary.
pub const MAX_FAILING_CHECKS: usize = 64;
/// Most nodes listed by name in a summary's configuration lists.
pub const MAX_CONFIG_LISTED: usize = 32;

/// Nodes by status.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct StatusCounts {
    pub passing: u32,
    pub unknown: u32,
    pub warning: u32,
    pub critical: u32,
}

impl StatusCounts {
    pub fn add(&mut self, status: Status) {
        *self.slot(status) += 1;
    }

    fn slot(&mut self, status: Status) -> &mut u32 {
        match status {
            Status::Passing => &mut self.passing,
            Status::Unknown => &mut self.unknown,
            Status::Warning => &mut self.warning,
            Status::Critical => &mut self.critical,
        }
    }

    pub fn sum(&mut self, other: &StatusCounts) {
        self.passing += other.passing;
        self.unknown += other.unknown;
        self.warning += other.warning;
        self.critical += other.critical;
    }

    pub fn total(&self) -> u32 {
        self.passing + self.unknown + self.warning + self.critical
    }
}

/// How many nodes fail a check, by status.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct CheckCounts {
    pub unknown: u32,
    pub warning: u32,
    pub critical: u32,
}

impl CheckCounts {
    pub fn add(&mut self, status: Status) {
        match status {
            Status::Passing => {}
            Status::Unknown => self.unknown += 1,
            Status::Warning => self.warning += 1,
            Status::Critical => self.critical += 1,
        }
    }

    pub fn sum(&mut self, other: &CheckCounts) {
        self.unknown += other.unknown;
        self.warning += other.warning;
        self.critical += other.critical;
    }

    pub fn total(&self) -> u32 {
        self.unknown + self.warning + self.critical
    }
}

/// A percentage histogram in ten fixed buckets (0–9, 10–19, …, 90–100),
/// plus the nodes that did not report the value.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Histogram {
    pub buckets: [u32; 10],
    pub unknown: u32,
}

impl Histogram {
    pub fn add(&mut self, pct: Option<u8>) {
        match pct {
            Some(p) => self.buckets[usize::from(p.min(100) / 10).min(9)] += 1,
            None => self.unknown += 1,
        }
    }

    pub fn sum(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.unknown += other.unknown;
    }

    pub fn count(&self) -> u32 {
        self.buckets.iter().sum::<u32>() + self.unknown
    }
}

/// One of the worst nodes of a site, in brief.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeBrief {
    pub name: String,
    pub alive: bool,
    pub status: Status,
    /// Names of its failing checks (at most [`MAX_FAILING_PER_NODE`]).
    pub failing: Vec<String>,
    pub cpu_pct: Option<u8>,
    pub mem_pct: Option<u8>,
    pub disk_pct: Option<u8>,
}

impl NodeBrief {
    /// Badness order: dead first, then by status, number of failing checks,
    /// fullest disk; the name breaks ties so the order is total.
    pub fn worse_first(a: &NodeBrief, b: &NodeBrief) -> Ordering {
        a.alive
            .cmp(&b.alive)
            .then(b.status.cmp(&a.status))
            .then(b.failing.len().cmp(&a.failing.len()))
            .then(b.disk_pct.cmp(&a.disk_pct))
            .then(b.cpu_pct.cmp(&a.cpu_pct))
            .then(a.name.cmp(&b.name))
    }

    /// Whether this node is worth listing at all.
    pub fn is_notable(&self) -> bool {
        !self.alive || self.status != Status::Passing
    }
}

/// Where a site's nodes stand with the fleet's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigTally {
    /// The version the relay holds and offers to the site.
    pub offered: Option<u64>,
    /// Alive nodes by the version they hold (0: nothing applied yet).
    pub versions: BTreeMap<u64, u32>,
    /// Alive nodes with a managed file not as applied (drift left as
    /// found, or healing failed), sorted; at most [`MAX_CONFIG_LISTED`].
    pub drifted: Vec<String>,
    pub drifted_count: u32,
    /// Alive nodes whose last attempt failed or was refused, with the
    /// version, sorted; at most [`MAX_CONFIG_LISTED`].
    pub failing: Vec<(String, u64)>,
    pub failing_count: u32,
    /// Per version tried, alive nodes that tried it and do not hold it
    /// (refused, or a file could not be written): they will not get there
    /// without a new version.
    pub stuck: BTreeMap<u64, u32>,
}

impl ConfigTally {
    /// Alive nodes that hold `version` or a newer one.
    pub fn at_least(&self, version: u64) -> u32 {
        self.versions.range(version..).map(|(_, n)| n).sum()
    }
}

/// Where a site's nodes stand with the rollout its relay holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PatchTally {
    /// The rollout's number.
    pub run: u64,
    /// The patch's id.
    pub patch: [u8; 32],
    /// What the site is doing: installing its started waves, or rolling
    /// back.
    pub action: trellis_node::patchstate::OrderAction,
    /// Waves started at the site.
    pub started: u32,
    /// Each node that reported on this run: its state, and whether the
    /// patch failed on it.
    pub states: BTreeMap<String, (trellis_node::patchstate::PatchState, bool)>,
    /// The site's alive nodes not patched: passing or warning, critical.
    pub baseline_healthy: u32,
    pub baseline_failed: u32,
    /// Why the relay rolled the site back by itself, if it did.
    pub local: Option<String>,
}

/// A site's state as its relay summarised it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SiteSummary {
    pub region: String,
    pub site: String,
    /// The relay that produced it.
    pub relay: String,
    /// The relay's wall clock when it was made (ms since the Unix epoch);
    /// later summaries of a site replace earlier ones.
    pub generated_ms: u64,
    /// Nodes (not relays) known to the site's gossip, alive or dead.
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    /// Alive nodes by status.
    pub by_status: StatusCounts,
    /// Dead nodes by name, sorted (at most [`MAX_DEAD_LISTED`]).
    pub dead: Vec<String>,
    /// Alive nodes failing each check.
    pub failing_checks: BTreeMap<String, CheckCounts>,
    pub cpu: Histogram,
    pub mem: Histogram,
    pub disk: Histogram,
    /// The worst nodes, worst first (at most [`MAX_WORST`]).
    pub worst: Vec<NodeBrief>,
    pub config: ConfigTally,
    /// The patch rollout the site takes part in, if any.
    pub patch: Option<PatchTally>,
}

/// A site's health at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteStatus {
    /// Every node alive and passing.
    Healthy,
    /// Some node dead or not passing.
    Degraded,
    /// At least half the nodes dead or critical.
    Critical,
    /// No nodes known.
    Empty,
    /// The hub cannot reach the site's relay (it has not heard from it for
    /// too long, or its uplink is down): the state shown is the last known.
    /// Assigned by the hub, never by the relay.
    Unreachable,
}

impl SiteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteStatus::Healthy => "healthy",
            SiteStatus::Degraded => "degraded",
            SiteStatus::Critical => "critical",
            SiteStatus::Empty => "empty",
            SiteStatus::Unreachable => "unreachable",
        }
    }
}

impl std::fmt::Display for SiteStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl SiteSummary {
    /// A summary of a site with no nodes.
    pub fn empty(region: &str, site: &str, relay: &str, generated_ms: u64) -> Self {
        SiteSummary {
            region: region.to_owned(),
            site: site.to_owned(),
            relay: relay.to_owned(),
            generated_ms,
            nodes_total: 0,
            nodes_alive: 0,
            nodes_dead: 0,
            by_status: StatusCounts::default(),
            dead: Vec::new(),
            failing_checks: BTreeMap::new(),
            cpu: Histogram::default(),
            mem: Histogram::default(),
            disk: Histogram::default(),
            worst: Vec::new(),
            config: ConfigTally::default(),
            patch: None,
        }
    }

    /// The site's status from its counts.
    pub fn status(&self) -> SiteStatus {
        if self.nodes_total == 0 {
            return SiteStatus::Empty;
        }
        let bad = self.nodes_dead + self.by_status.critical;
        if bad * 2 >= self.nodes_total {
            SiteStatus::Critical
        } else if self.nodes_dead > 0 || self.by_status.passing < self.nodes_alive {
            SiteStatus::Degraded
        } else {
            SiteStatus::Healthy
        }
    }

    /// Whether `other` says something different about the site's health
    /// (ignoring resource histograms, figures and time), i.e. whether it is
    /// worth sending before the next periodic summary.
    pub fn same_state(&self, other: &SiteSummary) -> bool {
        let brief = |s: &SiteSummary| -> Vec<(String, bool, Status)> {
            s.worst
                .iter()
                .map(|n| (n.name.clone(), n.alive, n.status))
                .collect()
        };
        self.nodes_total == other.nodes_total
            && self.nodes_alive == other.nodes_alive
            && self.by_status == other.by_status
            && self.dead == other.dead
            && self.failing_checks == other.failing_checks
            && brief(self) == brief(other)
            && self.config == other.config
            && self.patch == other.patch
    }

    /// Whether `self` supersedes `other` (same site): later generation
    /// first, then a total order on content so merges are deterministic.
    fn supersedes(&self, other: &SiteSummary) -> bool {
        (self.generated_ms, self) > (other.generated_ms, other)
    }
}

/// Region and site, the key of a rollup.
pub type SiteKey = (String, String);

/// The latest summary of each site; a last-writer-wins map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollup {
    sites: BTreeMap<SiteKey, SiteSummary>,
}

impl Rollup {
    pub fn new() -> Self {
        Rollup::default()
    }

    /// Keeps `summary` if it is newer than what the rollup has for its site.
    /// Returns whether it was kept.
    pub fn insert(&mut self, summary: SiteSummary) -> bool {
        let key = (summary.region.clone(), summary.site.clone());
        match self.sites.get(&key) {
            Some(cur) if !summary.supersedes(cur) => false,
            _ => {
                self.sites.insert(key, summary);
                true
            }
        }
    }

    /// Sets the site's summary whatever it had (for a relay's own records,
    /// which arrive in sequence order).
    pub fn replace(&mut self, summary: SiteSummary) {
        let key = (summary.region.clone(), summary.site.clone());
        self.sites.insert(key, summary);
    }

    /// Merges another rollup into this one (a join: associative,
    /// commutative, idempotent).
    pub fn merge(&mut self, other: &Rollup) {
        for s in other.sites.values() {
            self.insert(s.clone());
        }
    }

    pub fn get(&self, region: &str, site: &str) -> Option<&SiteSummary> {
        self.sites.get(&(region.to_owned(), site.to_owned()))
    }

    /// Sites in (region, site) order.
    pub fn sites(&self) -> impl Iterator<Item = &SiteSummary> {
        self.sites.values()
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// The sites of one region.
    pub fn region(&self, region: &str) -> Rollup {
        Rollup {
            sites: self
                .sites
                .iter()
                .filter(|((r, _), _)| r == region)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Sums over every site.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        let mut worst: Vec<(String, NodeBrief)> = Vec::new();
        for s in self.sites.values() {
            t.sites += 1;
            *t.sites_by_status.entry(s.status()).or_default() += 1;
            t.nodes_total += s.nodes_total;
            t.nodes_alive += s.nodes_alive;
            t.nodes_dead += s.nodes_dead;
            t.by_status.sum(&s.by_status);
            for (name, c) in &s.failing_checks {
                t.failing_checks.entry(name.clone()).or_default().sum(c);
            }
            t.cpu.sum(&s.cpu);
            t.mem.sum(&s.mem);
            t.disk.sum(&s.disk);
            worst.extend(s.worst.iter().map(|n| (s.site.clone(), n.clone())));
        }
        worst.sort_by(|a, b| NodeBrief::worse_first(&a.1, &b.1).then(a.0.cmp(&b.0)));
        worst.truncate(MAX_WORST);
        t.worst = worst;
        t
    }
}

/// Sums over a set of sites (a region or the fleet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub sites: u32,
    pub sites_by_status: BTreeMap<SiteStatus, u32>,
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    pub by_status: StatusCounts,
    pub failing_checks: BTreeMap<String, CheckCounts>,
    pub cpu: Histogram,
    pub mem: Histogram,
    pub disk: Histogram,
    /// The worst nodes across the sites, with their site.
    pub worst: Vec<(String, NodeBrief)>,
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;

    pub fn arb_summary() -> impl Strategy<Value = SiteSummary> {
        (
            (0u8..3, 0u8..4, "r[0-2]", 0u64..5),
            (0u32..50, 0u32..10, any::<[u8; 4]>()),
            proptest::collection::vec("[a-c]", 0..3),
        )
            .prop_map(|((region, site, relay, ms), (alive, dead, raw), checks)| {
                let mut by_status = StatusCounts::default();
                for (i, s) in Status::ALL.iter().enumerate() {
                    for _ in 0..(raw[i] % 4) {
                        by_status.add(*s);
                    }
                }
                let mut failing_checks = BTreeMap::new();
                for c in checks {
                    failing_checks
                        .entry(c)
                        .or_insert_with(CheckCounts::default)
                        .add(Status::Critical);
                }
                let mut cpu = Histogram::default();
                cpu.add(Some(raw[0] % 101));
                SiteSummary {
                    region: format!("reg{region}"),
                    site: format!("site{site}"),
                    relay,
                    generated_ms: ms,
                    nodes_total: alive + dead,
                    nodes_alive: alive,
                    nodes_dead: dead,
                    by_status,
                    dead: (0..dead.min(3)).map(|i| format!("n{i}")).collect(),
                    failing_checks,
                    cpu,
                    mem: Histogram::default(),
                    disk: Histogram::default(),
                    worst: Vec::new(),
                    config: ConfigTally {
                        offered: Some(u64::from(raw[1] % 3)),
                        versions: BTreeMap::from([(u64::from(raw[2] % 3), alive)]),
                        ..ConfigTally::default()
                    },
                    patch: None,
                }
            })
    }

    fn arb_rollup() -> impl Strategy<Value = Rollup> {
        proptest::collection::vec(arb_summary(), 0..8).prop_map(|v| {
            let mut r = Rollup::new();
            for s in v {
                r.insert(s);
            }
            r
        })
    }

    fn merged(a: &Rollup, b: &Rollup) -> Rollup {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #[test]
        fn rollup_merge_is_commutative(a in arb_rollup(), b in arb_rollup()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn rollup_merge_is_associative(a in arb_rollup(), b in arb_rollup(), c in arb_rollup()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn rollup_merge_is_idempotent(a in arb_rollup(), b in arb_rollup()) {
            prop_assert_eq!(merged(&a, &a), a.clone());
            let ab = merged(&a, &b);
            prop_assert_eq!(merged(&ab, &b), ab.clone());
        }

        #[test]
        fn insertion_order_does_not_matter(mut v in proptest::collection::vec(arb_summary(), 0..10)) {
            let mut fwd = Rollup::new();
            for s in v.iter().cloned() { fwd.insert(s); }
            v.reverse();
            let mut back = Rollup::new();
            for s in v { back.insert(s); }
            prop_assert_eq!(fwd, back);
        }

        #[test]
        fn totals_are_the_sum_of_the_sites(r in arb_rollup()) {
            let t = r.totals();
            prop_assert_eq!(t.sites as usize, r.len());
            prop_assert_eq!(t.nodes_total, r.sites().map(|s| s.nodes_total).sum::<u32>());
            prop_assert_eq!(t.by_status.total(), r.sites().map(|s| s.by_status.total()).sum::<u32>());
            prop_assert_eq!(t.sites_by_status.values().sum::<u32>(), t.sites);
        }

        #[test]
        fn regions_partition_the_rollup(r in arb_rollup()) {
            let mut again = Rollup::new();
            for region in ["reg0", "reg1", "reg2"] {
                again.merge(&r.region(region));
            }
            prop_assert_eq!(again, r);
        }
    }

    #[test]
    fn a_later_summary_replaces_an_earlier_one_and_not_the_reverse() {
        let mut s = arb_summary_fixed();
        let mut r = Rollup::new();
        s.generated_ms = 10;
        assert!(r.insert(s.clone()));
        let mut older = s.clone();
        older.generated_ms = 5;
        older.nodes_dead = 7;
        assert!(!r.insert(older));
        assert_eq!(r.get(&s.region, &s.site).unwrap().generated_ms, 10);
    }

    fn arb_summary_fixed() -> SiteSummary {
        SiteSummary {
            nodes_total: 4,
            nodes_alive: 4,
            by_status: StatusCounts {
                passing: 4,
                ..Default::default()
            },
            ..SiteSummary::empty("eu", "par", "r", 0)
        }
    }

    #[test]
    fn site_status_follows_the_counts() {
        let mut s = arb_summary_fixed();
        assert_eq!(s.status(), SiteStatus::Healthy);
        s.nodes_alive = 3;
        s.nodes_dead = 1;
        s.by_status.passing = 3;
        assert_eq!(s.status(), SiteStatus::Degraded);
        s.nodes_alive = 2;
        s.nodes_dead = 2;
        s.by_status.passing = 2;
        assert_eq!(s.status(), SiteStatus::Critical);
        s.nodes_total = 0;
        assert_eq!(s.status(), SiteStatus::Empty);
    }

    #[test]
    fn histogram_buckets_cover_zero_to_a_hundred() {
        let mut h = Histogram::default();
        for p in [0, 9, 10, 99, 100] {
            h.add(Some(p));
        }
        h.add(None);
        assert_eq!(h.buckets[0], 2);
        assert_eq!(h.buckets[1], 1);
        assert_eq!(h.buckets[9], 2);
        assert_eq!(h.unknown, 1);
        assert_eq!(h.count(), 6);
    }
}
