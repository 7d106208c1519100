//! Region outliers: a site far from the other sites of its region, on
//! what the site summaries carry. Pure: the incidents task calls
//! [`RegionOutliers::assess`] with the time and the latest summaries, and
//! hands what is raised to the incident engine, which makes each site one
//! *site anomaly* incident.
//!
//! The node finds what is unusual for itself (`anomaly:*`), the relay what
//! is unusual in its site (`outlier:*`); the hub is where the sites of a
//! region meet, so this is where a site unusual among them is found.
//!
//! # The figures
//! From each site's summary: the mean `cpu`, `mem` and `disk` use of its
//! alive nodes that report one (from the summary's ten-point histograms,
//! each bucket counted at its middle: 5 %, 15 %, ... 95 %), and
//! `unhealthy`, the share of its nodes dead or not passing (warning or
//! critical). A figure is taken only from a site whose hub sees it
//! reachable and that has at least one node with the figure.
//!
//! # The rule
//! A site's *peers* are the other sites of its region with the figure. A
//! site is assessed for a figure only when it has it and at least
//! `min_peers` peers. With `m` and `MAD` the median and the median
//! absolute deviation of the figure over the region's sites that have it
//! (the site among them: both shrug off a minority of outliers), the
//! robust spread `σ = max(1.4826 × MAD, 1)` points, and `v` the site's own
//! figure:
//! - it *is an outlier* when `v − m ≥ threshold × σ` and
//!   `v − m ≥ min_gap_pct`;
//! - a raised outlier *still holds* while `v − m` is at least half of both,
//!   so a figure hovering at the threshold does not flap.
//!
//! A ratio to the median, as the relay uses for nodes, does not suit
//! percentages that are already high: a site at 85 % CPU among sites at
//! 35 % is plainly unusual and not 3× anything. The spread makes a region
//! of alike sites sensitive and a region of sites doing different work
//! tolerant; the gap keeps quiet regions quiet (5 % against 1 % is many σ
//! of an idle region, and nothing). Only figures above the region's are
//! flagged: for all four, more is worse. A finding is raised once it has
//! been an outlier at every look for `hold_for`, and cleared once it has
//! not held (or could not be assessed) at every look for `hold_for`:
//! summaries come every few seconds and the figures in them move slower,
//! so time is what counts, not a number of looks. Its score is
//! `(v − m) / σ`, how many robust σ above the region it is, to one
//! decimal: the unit the members' own anomalies are scored in.
//!
//! State is kept only for sites with a finding or a pending one; a hub
//! restart forgets it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_relay::summary::{Histogram, SiteKey, SiteSummary};

/// A figure sites are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteMetric {
    /// Mean CPU use of the site's nodes, percent.
    Cpu,
    /// Mean memory use, percent.
    Mem,
    /// Mean use of each node's fullest disk, percent.
    Disk,
    /// Nodes dead or not passing, percent of the site's nodes.
    Unhealthy,
}

impl SiteMetric {
    pub const ALL: [SiteMetric; 4] = [
        SiteMetric::Cpu,
        SiteMetric::Mem,
        SiteMetric::Disk,
        SiteMetric::Unhealthy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SiteMetric::Cpu => "cpu",
            SiteMetric::Mem => "mem",
            SiteMetric::Disk => "disk",
            SiteMetric::Unhealthy => "unhealthy",
        }
    }

    /// The site's figure and how many nodes it is taken over.
    pub fn value(self, s: &SiteSummary) -> Option<(f64, u32)> {
        match self {
            SiteMetric::Cpu => mean(&s.cpu),
            SiteMetric::Mem => mean(&s.mem),
            SiteMetric::Disk => mean(&s.disk),
            SiteMetric::Unhealthy => {
                let bad = s.nodes_dead + s.by_status.warning + s.by_status.critical;
                (s.nodes_total > 0).then(|| {
                    (
                        100.0 * f64::from(bad.min(s.nodes_total)) / f64::from(s.nodes_total),
                        s.nodes_total,
                    )
                })
            }
        }
    }
}

/// The mean of a ten-point histogram, each bucket at its middle, and how
/// many known values it is over.
pub(crate) fn mean(h: &Histogram) -> Option<(f64, u32)> {
    let known: u32 = h.buckets.iter().sum();
    if known == 0 {
        return None;
    }
    let sum: f64 = h
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| f64::from(*n) * (10.0 * i as f64 + 5.0))
        .sum();
    Some((sum / f64::from(known), known))
}

/// `[outliers]`: sites far from the other sites of their region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionOutliersConfig {
    pub enabled: bool,
    /// The figures compared.
    pub metrics: Vec<SiteMetric>,
    /// How many robust σ above the region's median a figure must be.
    pub threshold: f64,
    /// Fewest other sites of the region with the figure to compare with.
    pub min_peers: usize,
    /// Least difference from the median, in percentage points.
    pub min_gap_pct: f64,
    /// How long a site must be an outlier at every look before it is
    /// raised, and not be one before it is cleared.
    #[serde(with = "humantime_serde")]
    pub hold_for: Duration,
}

impl Default for RegionOutliersConfig {
    fn default() -> Self {
        RegionOutliersConfig {
            enabled: true,
            metrics: SiteMetric::ALL.to_vec(),
            threshold: 6.0,
            min_peers: 3,
            min_gap_pct: 20.0,
            hold_for: Duration::from_secs(600),
        }
    }
}

impl RegionOutliersConfig {
    /// What is wrong with it, field by field.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            out.push(("outliers.threshold", "must be a number above 0"));
        }
        if !(self.min_gap_pct.is_finite() && (0.0..=100.0).contains(&self.min_gap_pct)) {
            out.push(("outliers.min_gap_pct", "must be 0 to 100"));
        }
        if self.min_peers == 0 {
            out.push(("outliers.min_peers", "must be at least 1"));
        }
        out
    }
}

/// A site's standing on one figure at one look.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Standing {
    pub value: f64,
    /// Nodes the site's figure is over.
    pub nodes: u32,
    /// The region's median and robust spread (σ) of the figure.
    pub median: f64,
    pub spread: f64,
    pub peers: usize,
}

impl Standing {
    fn is_outlier(&self, cfg: &RegionOutliersConfig) -> bool {
        let above = self.value - self.median;
        above >= cfg.threshold * self.spread && above >= cfg.min_gap_pct
    }

    fn still_holds(&self, cfg: &RegionOutliersConfig) -> bool {
        let above = self.value - self.median;
        above >= cfg.threshold / 2.0 * self.spread && above >= cfg.min_gap_pct / 2.0
    }

    /// Robust σ above the region's median.
    pub fn score(&self) -> f64 {
        (self.value - self.median) / self.spread
    }
}

/// The smallest spread, in percentage points: sites all alike do not make
/// every small difference many σ.
const MIN_SPREAD: f64 = 1.0;

/// The median and robust spread (`max(1.4826 × MAD, MIN_SPREAD)`) of
/// `sorted` (ascending, not empty).
fn median_and_spread(sorted: &[f64]) -> (f64, f64) {
    let median = median_of(sorted);
    let mut dev: Vec<f64> = sorted.iter().map(|v| (v - median).abs()).collect();
    dev.sort_by(f64::total_cmp);
    (median, (1.4826 * median_of(&dev)).max(MIN_SPREAD))
}

fn median_of(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A raised finding of a site on one figure.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteFinding {
    pub metric: SiteMetric,
    /// The score it was raised or last assessed with.
    pub score: f64,
    /// What it is: `cpu 62% (mean of 20 nodes) against a median of 15%
    /// among 5 sites`, or why it could not be assessed at this look.
    pub detail: String,
}

/// Raised findings, by site, highest score first.
pub type Raised = BTreeMap<SiteKey, Vec<SiteFinding>>;

#[derive(Debug, Clone, Default)]
struct Track {
    raised: bool,
    /// Since when (ms) the opposite of `raised` has held at every look.
    since: Option<u64>,
    last: Option<Standing>,
}

/// Region outliers, look after look.
#[derive(Debug)]
pub struct RegionOutliers {
    cfg: RegionOutliersConfig,
    state: BTreeMap<(SiteKey, SiteMetric), Track>,
}

impl RegionOutliers {
    pub fn new(cfg: RegionOutliersConfig) -> Self {
        RegionOutliers {
            cfg,
            state: BTreeMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled && !self.cfg.metrics.is_empty()
    }

    /// Sites and figures with state kept (raised, or pending).
    pub fn tracked(&self) -> usize {
        self.state.len()
    }

    /// Takes a look at the latest `summaries` at `now_ms`; `unreachable`
    /// sites are left out (what they said last is stale). Returns what is
    /// raised now.
    pub fn assess(
        &mut self,
        now_ms: u64,
        summaries: &[SiteSummary],
        unreachable: &BTreeSet<SiteKey>,
    ) -> Raised {
        let mut out = Raised::new();
        if !self.enabled() {
            self.state.clear();
            return out;
        }
        let cfg = &self.cfg;
        let mut regions: BTreeMap<&str, Vec<&SiteSummary>> = BTreeMap::new();
        for s in summaries {
            if !unreachable.contains(&(s.region.clone(), s.site.clone())) {
                regions.entry(s.region.as_str()).or_default().push(s);
            }
        }
        let mut standings: BTreeMap<(SiteKey, SiteMetric), Standing> = BTreeMap::new();
        let mut values: Vec<(f64, u32, &SiteSummary)> = Vec::new();
        for sites in regions.values() {
            for &metric in &cfg.metrics {
                values.clear();
                values.extend(
                    sites
                        .iter()
                        .filter_map(|s| metric.value(s).map(|(v, n)| (v, n, *s))),
                );
                let peers = values.len().saturating_sub(1);
                if peers == 0 || peers < cfg.min_peers {
                    continue;
                }
                values.sort_by(|a, b| a.0.total_cmp(&b.0));
                let sorted: Vec<f64> = values.iter().map(|v| v.0).collect();
                let (median, spread) = median_and_spread(&sorted);
                for &(value, nodes, s) in &values {
                    let key = ((s.region.clone(), s.site.clone()), metric);
                    let st = Standing {
                        value,
                        nodes,
                        median,
                        spread,
                        peers,
                    };
                    if st.is_outlier(cfg) || self.state.contains_key(&key) {
                        standings.insert(key, st);
                    }
                }
            }
        }

        for (key, st) in &standings {
            if st.is_outlier(cfg) {
                self.state.entry(key.clone()).or_default();
            }
        }
        for (key, t) in &mut self.state {
            let st = standings.get(key);
            let against = match st {
                Some(st) if t.raised => !st.still_holds(cfg),
                Some(st) => st.is_outlier(cfg),
                // Not assessed: no evidence it still is one.
                None => t.raised,
            };
            if against {
                let since = *t.since.get_or_insert(now_ms);
                if now_ms.saturating_sub(since) >= cfg.hold_for.as_millis() as u64 {
                    t.raised = !t.raised;
                    t.since = None;
                }
            } else {
                t.since = None;
            }
            if let Some(st) = st {
                t.last = Some(*st);
            }
            if t.raised {
                let metric = key.1;
                let last = t.last.expect("raised after an assessment");
                let detail = match st {
                    Some(st) => format!(
                        "{} {:.0}% ({} {} node{}) against a median of {:.0}% (σ {:.1}) \
                         over the region's {} sites",
                        metric.name(),
                        st.value,
                        if metric == SiteMetric::Unhealthy {
                            "of"
                        } else {
                            "mean of"
                        },
                        st.nodes,
                        if st.nodes == 1 { "" } else { "s" },
                        st.median,
                        st.spread,
                        st.peers + 1
                    ),
                    None => format!(
                        "{} not assessed now (no figure, or fewer than {} other sites with one); \
                         last {:.0}% against {:.0}%",
                        metric.name(),
                        cfg.min_peers,
                        last.value,
                        last.median
                    ),
                };
                out.entry(key.0.clone()).or_default().push(SiteFinding {
                    metric,
                    score: last.score(),
                    detail,
                });
            }
        }
        self.state.retain(|_, t| t.raised || t.since.is_some());
        for findings in out.values_mut() {
            findings.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.metric.cmp(&b.metric)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use trellis_relay::summary::StatusCounts;

    use super::*;

    const MINUTE: u64 = 60_000;

    /// A site of `n` alive, passing nodes all at `cpu` percent.
    fn site(region: &str, name: &str, n: u32, cpu: u8) -> SiteSummary {
        let mut s = SiteSummary::empty(region, name, &format!("{name}-relay"), 0);
        s.nodes_total = n;
        s.nodes_alive = n;
        s.by_status = StatusCounts {
            passing: n,
            ..Default::default()
        };
        for _ in 0..n {
            s.cpu.add(Some(cpu));
            s.mem.add(Some(30));
            s.disk.add(None);
        }
        s
    }

    fn cfg() -> RegionOutliersConfig {
        RegionOutliersConfig {
            hold_for: Duration::from_secs(300),
            ..Default::default()
        }
    }

    fn region(busy: u8) -> Vec<SiteSummary> {
        let mut sites: Vec<SiteSummary> = (0..5)
            .map(|i| site("eu", &format!("s{i}"), 10, 10 + i as u8))
            .collect();
        sites.push(site("eu", "hot", 10, busy));
        // Another region's sites are never its peers.
        sites.extend((0..4).map(|i| site("us", &format!("u{i}"), 10, 90)));
        sites
    }

    #[test]
    fn a_site_far_above_its_region_is_raised_after_hold_for_and_cleared_after_it() {
        let mut o = RegionOutliers::new(cfg());
        let none = BTreeSet::new();
        let mut first = None;
        let mut t = 0;
        while t <= 10 * MINUTE {
            let raised = o.assess(t, &region(80), &none);
            if first.is_none() && !raised.is_empty() {
                first = Some(t);
                let f = &raised[&("eu".to_owned(), "hot".to_owned())];
                assert_eq!(f.len(), 1, "{f:?}");
                assert_eq!(f[0].metric, SiteMetric::Cpu);
                // 85 % (the 80s bucket) against a median of 15 %, the
                // others all alike: the smallest spread, 1 point.
                assert_eq!(f[0].score, 70.0, "{f:?}");
                assert_eq!(
                    f[0].detail,
                    "cpu 85% (mean of 10 nodes) against a median of 15% (σ 1.0) \
                     over the region's 6 sites"
                );
                assert_eq!(raised.len(), 1, "only the hot site: {raised:?}");
            }
            t += 10_000;
        }
        assert_eq!(first, Some(5 * MINUTE));
        // Back to normal: it stays raised for hold_for, then clears.
        let back = t;
        let mut cleared = None;
        while t <= back + 10 * MINUTE {
            if cleared.is_none() && o.assess(t, &region(15), &none).is_empty() {
                cleared = Some(t - back);
            }
            t += 10_000;
        }
        assert_eq!(cleared, Some(5 * MINUTE));
        assert_eq!(o.tracked(), 0);
    }

    #[test]
    fn a_spike_shorter_than_hold_for_raises_nothing() {
        let mut o = RegionOutliers::new(cfg());
        let none = BTreeSet::new();
        for i in 0..100u64 {
            let busy = if i % 20 < 10 { 80 } else { 15 };
            assert!(o.assess(i * 10_000, &region(busy), &none).is_empty());
        }
    }

    #[test]
    fn a_raised_site_hovering_near_the_threshold_does_not_flap() {
        let mut o = RegionOutliers::new(cfg());
        let none = BTreeSet::new();
        let mut t = 0;
        for _ in 0..40 {
            o.assess(t, &region(80), &none);
            t += 10_000;
        }
        // 25 % against 15 %: under the 20-point gap, not under half of it.
        for _ in 0..100 {
            assert_eq!(o.assess(t, &region(20), &none).len(), 1);
            t += 10_000;
        }
    }

    #[test]
    fn quiet_regions_few_peers_and_unreachable_sites_raise_nothing() {
        let none = BTreeSet::new();
        // 5 % against 1 %: many times, but under the gap.
        let mut o = RegionOutliers::new(cfg());
        let quiet: Vec<SiteSummary> = (0..5)
            .map(|i| site("eu", &format!("s{i}"), 4, 0))
            .chain([site("eu", "hot", 4, 15)])
            .collect();
        // Only two peers.
        let few = vec![
            site("eu", "a", 5, 10),
            site("eu", "b", 5, 10),
            site("eu", "hot", 5, 90),
        ];
        for t in 0..100 {
            assert!(o.assess(t * 10_000, &quiet, &none).is_empty());
        }
        let mut o = RegionOutliers::new(cfg());
        for t in 0..100 {
            assert!(o.assess(t * 10_000, &few, &none).is_empty());
        }
        let mut o = RegionOutliers::new(cfg());
        let down: BTreeSet<SiteKey> = [("eu".to_owned(), "hot".to_owned())].into();
        for t in 0..100 {
            assert!(o.assess(t * 10_000, &region(90), &down).is_empty());
        }
        assert_eq!(o.tracked(), 0);
    }

    #[test]
    fn a_site_with_many_nodes_failing_is_unhealthy_among_healthy_peers() {
        let mut o = RegionOutliers::new(cfg());
        let none = BTreeSet::new();
        let mut sites = region(15);
        let hot = sites.iter_mut().find(|s| s.site == "hot").unwrap();
        hot.nodes_dead = 2;
        hot.nodes_alive = 8;
        hot.by_status = StatusCounts {
            passing: 5,
            warning: 2,
            critical: 1,
            unknown: 0,
        };
        let mut raised = Raised::new();
        for t in 0..=30 {
            raised = o.assess(t * 10_000, &sites, &none);
        }
        let f = &raised[&("eu".to_owned(), "hot".to_owned())];
        assert_eq!(f[0].metric, SiteMetric::Unhealthy);
        // 50 % against 0, the others all alike.
        assert_eq!(f[0].score, 50.0);
    }

    #[test]
    fn a_raised_site_that_loses_its_peers_keeps_its_last_figures_until_hold_for() {
        let mut o = RegionOutliers::new(cfg());
        let none = BTreeSet::new();
        let mut t = 0;
        for _ in 0..=30 {
            o.assess(t, &region(80), &none);
            t += 10_000;
        }
        let alone = vec![site("eu", "hot", 10, 80)];
        let raised = o.assess(t, &alone, &none);
        let f = &raised[&("eu".to_owned(), "hot".to_owned())][0];
        assert!(f.detail.starts_with("cpu not assessed now"), "{}", f.detail);
        assert_eq!(f.score, 70.0);
        t += 5 * MINUTE;
        assert!(o.assess(t, &alone, &none).is_empty());
    }

    /// A day of a region of 12 sites of 20 nodes, looked at every 10 s:
    /// every node's CPU wandering on its own from 5 % to 60 %, memory and
    /// disk too, a node or none warning in each site, and now and then a
    /// whole site busy for one look. Site `s0` runs at 85 % over the looks
    /// in `hot`. Returns the looks at which each site was raised.
    fn noisy_day(
        cfg: RegionOutliersConfig,
        hot: std::ops::Range<u64>,
    ) -> BTreeMap<String, Vec<u64>> {
        let mut o = RegionOutliers::new(cfg);
        let none = BTreeSet::new();
        let mut seed: u64 = 7;
        let mut rnd = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut raised: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for look in 0..(24 * 360) {
            let sites: Vec<SiteSummary> = (0..12)
                .map(|i| {
                    let mut s = site("eu", &format!("s{i}"), 0, 0);
                    s.nodes_total = 20;
                    s.nodes_alive = 20;
                    s.by_status.passing = 20 - rnd(2) as u32;
                    s.by_status.warning = 20 - s.by_status.passing;
                    let burst = rnd(200) == 0;
                    for _ in 0..20 {
                        let cpu = if i == 0 && hot.contains(&look) {
                            80 + rnd(10) as u8
                        } else if burst {
                            95
                        } else {
                            5 + rnd(56) as u8
                        };
                        s.cpu.add(Some(cpu));
                        s.mem.add(Some(20 + rnd(40) as u8));
                        s.disk.add(Some(30 + rnd(30) as u8));
                    }
                    s
                })
                .collect();
            for (site, _) in o.assess(look * 10_000, &sites, &none) {
                raised.entry(site.1).or_default().push(look);
            }
        }
        raised
    }

    #[test]
    fn no_false_alarms_over_a_day_of_noisy_regions() {
        let raised = noisy_day(RegionOutliersConfig::default(), 0..0);
        assert!(raised.is_empty(), "{raised:?}");
        // Without the hold, the bursts alone would raise sites.
        let bare = noisy_day(
            RegionOutliersConfig {
                hold_for: Duration::ZERO,
                ..Default::default()
            },
            0..0,
        );
        let looks: usize = bare.values().map(Vec::len).sum();
        println!("noisy region, 12 sites x 8640 looks: 0 raised; {looks} without the hold");
        assert!(looks > 0, "the bursts should be outliers for a look");
    }

    #[test]
    fn a_hot_site_in_a_noisy_region_is_raised_within_hold_for_and_only_it() {
        // Hot for an hour from noon.
        let noon = 12 * 360;
        let raised = noisy_day(RegionOutliersConfig::default(), noon..noon + 360);
        assert_eq!(raised.keys().collect::<Vec<_>>(), ["s0"], "{raised:?}");
        let looks = &raised["s0"];
        // Raised after 10 min of looks (60), without a gap, and cleared 10
        // min after it cooled (a burst of its own meanwhile, which holds,
        // starts that wait again).
        assert_eq!(looks.first(), Some(&(noon + 60)));
        let last = *looks.last().unwrap();
        assert!(
            (noon + 360 + 59..noon + 360 + 120).contains(&last),
            "{last}"
        );
        assert_eq!(looks.len() as u64, last - (noon + 60) + 1);
        println!(
            "hot site in a noisy region: raised {} min after it got hot, cleared {} min after \
             it cooled",
            (looks[0] - noon) / 6,
            (last + 1 - (noon + 360)) / 6
        );
    }
}
