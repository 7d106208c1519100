//! Region baselines: a region's own figures far outside their usual
//! level. Pure: the incidents task calls [`RegionBaselines::observe`] with
//! the time and the latest summaries at each of its region looks, and
//! hands what is raised to the incident engine, which makes each region
//! one *region anomaly* incident.
//!
//! Where [`crate::outliers`] compares a site with the other sites of its
//! region at one moment, this compares a region with itself over time: a
//! fault that reaches every site of a region at once (a bad configuration
//! pushed to all of them, an upstream outage) leaves no site unusual among
//! its peers, but moves the region.
//!
//! # The figures
//! Per region, over its sites the hub sees reachable: `cpu`, `mem` and
//! `disk`, the mean use of all their alive nodes that report one (the
//! sites' histograms added up, each bucket counted at its middle), and
//! `unhealthy`, the share of all their nodes dead or not passing.
//!
//! # The rule
//! Each figure has the detector a member has for its own figures
//! ([`trellis_node::foresight::Detector`]): an exponentially weighted
//! median and MAD over 30 s step medians (half-life `half_life`), nothing
//! scored before `warmup`, a sample scored in robust σ (the MAD scaled by
//! 1.4826, at least the figure's floor), raised after `persist` looks in a
//! row at `threshold` σ or more and cleared after `persist` under half of
//! it. `cpu` counts both ways (a region gone quiet lost its work), the
//! others only upwards. A level that lasts becomes the baseline, and the
//! finding clears: a region given more work is not an incident for ever.
//!
//! State lives in memory; a hub that restarts warms up again.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::foresight::{Detector, ForesightConfig, Sides};
use trellis_relay::summary::{Histogram, SiteSummary};

use crate::outliers::{SiteMetric, mean};

/// `[baselines]`: regions far outside their own usual figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionBaselinesConfig {
    pub enabled: bool,
    /// The figures watched.
    pub metrics: Vec<SiteMetric>,
    /// Robust standard deviations from the usual level that make a look
    /// unusual.
    pub threshold: f64,
    /// Looks in a row that raise (and clear) a finding.
    pub persist: u32,
    /// History needed before anything is scored.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// A point's weight halves with each half-life of age.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
}

impl Default for RegionBaselinesConfig {
    fn default() -> Self {
        let node = ForesightConfig::default();
        RegionBaselinesConfig {
            enabled: true,
            metrics: SiteMetric::ALL.to_vec(),
            threshold: node.threshold,
            persist: node.persist,
            warmup: node.warmup,
            half_life: node.half_life,
        }
    }
}

impl RegionBaselinesConfig {
    /// What is wrong with it, field by field.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            out.push(("baselines.threshold", "must be a number above 0"));
        }
        if self.persist == 0 {
            out.push(("baselines.persist", "must be at least 1"));
        }
        if self.half_life < Duration::from_secs(60) {
            out.push(("baselines.half_life", "must be at least 1m"));
        }
        out
    }

    /// The detector settings: the node's, with these.
    fn detector(&self) -> ForesightConfig {
        ForesightConfig {
            threshold: self.threshold,
            persist: self.persist,
            warmup: self.warmup,
            half_life: self.half_life,
            ..ForesightConfig::default()
        }
    }
}

/// The smallest robust σ a figure is scored with, in percentage points:
/// a region's means hardly move, and a region whose CPU goes from 20 % to
/// 23 % is not an incident.
fn floor(metric: SiteMetric) -> f64 {
    match metric {
        SiteMetric::Cpu => 5.0,
        SiteMetric::Mem | SiteMetric::Unhealthy => 2.0,
        SiteMetric::Disk => 1.0,
    }
}

fn sides(metric: SiteMetric) -> Sides {
    match metric {
        SiteMetric::Cpu => Sides::Both,
        _ => Sides::High,
    }
}

/// A region's figure over `sites`, and how many nodes it is over.
pub fn region_value(metric: SiteMetric, sites: &[&SiteSummary]) -> Option<(f64, u32)> {
    let added = |pick: fn(&SiteSummary) -> &Histogram| {
        let mut h = Histogram::default();
        for s in sites {
            h.sum(pick(s));
        }
        mean(&h)
    };
    match metric {
        SiteMetric::Cpu => added(|s| &s.cpu),
        SiteMetric::Mem => added(|s| &s.mem),
        SiteMetric::Disk => added(|s| &s.disk),
        SiteMetric::Unhealthy => {
            let mut all = SiteSummary::empty("", "", "", 0);
            for s in sites {
                all.nodes_total += s.nodes_total;
                all.nodes_dead += s.nodes_dead;
                all.by_status.warning += s.by_status.warning;
                all.by_status.critical += s.by_status.critical;
            }
            metric.value(&all)
        }
    }
}

/// A raised finding of a region on one figure.
#[derive(Debug, Clone, PartialEq)]
pub struct RegionFinding {
    pub metric: SiteMetric,
    /// Robust σ from the usual level at the last look.
    pub score: f64,
    /// `cpu 71% over 240 nodes of 12 sites against a usual 22% (±5.0)`.
    pub detail: String,
}

/// Raised findings, by region, highest score first.
pub type RaisedRegions = BTreeMap<String, Vec<RegionFinding>>;

/// Every region's detectors, look after look.
pub struct RegionBaselines {
    cfg: RegionBaselinesConfig,
    detectors: ForesightConfig,
    state: BTreeMap<(String, SiteMetric), Watch>,
}

struct Watch {
    detector: Detector,
    /// The last look's figure, score and what it was over.
    last: Option<(f64, f64, u32, usize)>,
    /// The last look it was assessed at, to forget regions gone.
    seen_ms: u64,
}

impl RegionBaselines {
    pub fn new(cfg: RegionBaselinesConfig) -> Self {
        RegionBaselines {
            detectors: cfg.detector(),
            cfg,
            state: BTreeMap::new(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled && !self.cfg.metrics.is_empty()
    }

    /// Regions and figures watched.
    pub fn watched(&self) -> usize {
        self.state.len()
    }

    /// A look at the latest `summaries` at `now_ms`, without the sites in
    /// `unreachable`. Returns what is raised now. A region or figure not
    /// seen for a day is forgotten.
    pub fn observe(
        &mut self,
        now_ms: u64,
        summaries: &[SiteSummary],
        unreachable: &std::collections::BTreeSet<trellis_relay::summary::SiteKey>,
    ) -> RaisedRegions {
        let mut out = RaisedRegions::new();
        if !self.enabled() {
            self.state.clear();
            return out;
        }
        let mut regions: BTreeMap<&str, Vec<&SiteSummary>> = BTreeMap::new();
        for s in summaries {
            if !unreachable.contains(&(s.region.clone(), s.site.clone())) {
                regions.entry(s.region.as_str()).or_default().push(s);
            }
        }
        for (region, sites) in &regions {
            for &metric in &self.cfg.metrics {
                let Some((value, nodes)) = region_value(metric, sites) else {
                    continue;
                };
                let w = self
                    .state
                    .entry(((*region).to_owned(), metric))
                    .or_insert_with(|| Watch {
                        detector: Detector::new(&self.detectors, floor(metric), sides(metric)),
                        last: None,
                        seen_ms: now_ms,
                    });
                let v = w.detector.observe(&self.detectors, now_ms, value);
                w.seen_ms = now_ms;
                if let Some(score) = v.score {
                    w.last = Some((value, score, nodes, sites.len()));
                }
            }
        }
        self.state
            .retain(|_, w| now_ms.saturating_sub(w.seen_ms) < 86_400_000);
        for ((region, metric), w) in &self.state {
            if !w.detector.raised() {
                continue;
            }
            let Some((value, score, nodes, sites)) = w.last else {
                continue;
            };
            let (m, mad) = w.detector.baseline().median_mad().unwrap_or((0.0, 0.0));
            let spread = (1.4826 * mad).max(floor(*metric));
            out.entry(region.clone()).or_default().push(RegionFinding {
                metric: *metric,
                score,
                detail: format!(
                    "{} {value:.0}% over {nodes} node{} of {sites} site{} against a usual \
                     {m:.0}% (±{spread:.1})",
                    metric.name(),
                    if nodes == 1 { "" } else { "s" },
                    if sites == 1 { "" } else { "s" },
                ),
            });
        }
        for findings in out.values_mut() {
            findings.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.metric.cmp(&b.metric)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use trellis_relay::summary::StatusCounts;

    use super::*;

    const LOOK_MS: u64 = 10_000;
    const HOUR_MS: u64 = 3_600_000;

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// A region of 8 sites of 20 nodes: each node's CPU wandering from 5 %
    /// to 60 % on its own (`busy` adds to every node), memory and disk too,
    /// a node or none warning per site, `failing` more warning per site.
    fn region(rng: &mut Rng, busy: u64, failing: u32) -> Vec<SiteSummary> {
        (0..8)
            .map(|i| {
                let mut s = SiteSummary::empty("eu", &format!("s{i}"), "r", 0);
                s.nodes_total = 20;
                s.nodes_alive = 20;
                let warn = (rng.below(2) as u32 + failing).min(20);
                s.by_status = StatusCounts {
                    passing: 20 - warn,
                    warning: warn,
                    ..Default::default()
                };
                for _ in 0..20 {
                    s.cpu.add(Some((5 + rng.below(56) + busy).min(100) as u8));
                    s.mem.add(Some(20 + rng.below(40) as u8));
                    s.disk.add(Some(30 + rng.below(30) as u8));
                }
                s
            })
            .collect()
    }

    /// Looks every 10 s for `hours`, with `at(look)` saying (busy, failing);
    /// returns the looks at which the region was raised, by figure.
    fn run(hours: u64, mut at: impl FnMut(u64) -> (u64, u32)) -> BTreeMap<SiteMetric, Vec<u64>> {
        let mut b = RegionBaselines::new(RegionBaselinesConfig::default());
        let mut rng = Rng(3);
        let none = BTreeSet::new();
        let mut raised: BTreeMap<SiteMetric, Vec<u64>> = BTreeMap::new();
        for look in 0..hours * HOUR_MS / LOOK_MS {
            let (busy, failing) = at(look);
            let sites = region(&mut rng, busy, failing);
            for (_, findings) in b.observe(look * LOOK_MS, &sites, &none) {
                for f in findings {
                    raised.entry(f.metric).or_default().push(look);
                }
            }
        }
        raised
    }

    #[test]
    fn a_day_of_a_noisy_region_raises_nothing() {
        let raised = run(24, |_| (0, 0));
        assert!(raised.is_empty(), "{raised:?}");
        // With a daily swing of ±15 points of CPU on every node.
        let day = (24 * HOUR_MS / LOOK_MS) as f64;
        let raised = run(24, |look| {
            let phase = std::f64::consts::TAU * look as f64 / day;
            ((15.0 + 15.0 * phase.sin()).round() as u64, 0)
        });
        assert!(raised.is_empty(), "{raised:?}");
    }

    #[test]
    fn sites_dropping_out_of_reach_now_and_then_raise_nothing() {
        let mut b = RegionBaselines::new(RegionBaselinesConfig::default());
        let mut rng = Rng(9);
        let mut raised = 0;
        for look in 0..(24 * HOUR_MS / LOOK_MS) {
            let sites = region(&mut rng, 0, 0);
            // For 10 minutes of every hour, one site after another is
            // out of reach.
            let mut gone = BTreeSet::new();
            if look % 360 < 60 {
                gone.insert(("eu".to_owned(), format!("s{}", (look / 360) % 8)));
            }
            raised += b.observe(look * LOOK_MS, &sites, &gone).len();
        }
        assert_eq!(raised, 0);
    }

    #[test]
    fn a_fault_across_every_site_of_a_region_is_raised_on_its_third_look() {
        // From hour 3, a quarter of every site's nodes warn (a bad
        // configuration everywhere): no site is unusual among the others.
        let from = 3 * HOUR_MS / LOOK_MS;
        let raised = run(4, |look| (0, if look >= from { 5 } else { 0 }));
        let looks = &raised[&SiteMetric::Unhealthy];
        assert_eq!(looks.first(), Some(&(from + 2)), "{raised:?}");
        assert_eq!(raised.len(), 1, "only unhealthy: {raised:?}");
    }

    #[test]
    fn a_lasting_new_level_becomes_the_usual_one() {
        // Every node 40 points busier from hour 2, for good.
        let from = 2 * HOUR_MS / LOOK_MS;
        let raised = run(6, |look| (if look >= from { 40 } else { 0 }, 0));
        let looks = &raised[&SiteMetric::Cpu];
        assert_eq!(looks[0], from + 2);
        let last = *looks.last().unwrap();
        assert!(
            last < from + 2 * HOUR_MS / LOOK_MS,
            "still raised at {last}"
        );
        println!(
            "region 40 points busier for good: raised on look {}, cleared after {} min",
            looks[0] - from + 1,
            (last + 1 - from) * LOOK_MS / 60_000
        );
    }

    #[test]
    fn nothing_is_scored_in_warm_up_and_a_region_gone_is_forgotten() {
        let mut b = RegionBaselines::new(RegionBaselinesConfig::default());
        let mut rng = Rng(1);
        let none = BTreeSet::new();
        // A region on fire from the first look: nothing before warm-up.
        for look in 0..(29 * 60_000 / LOOK_MS) {
            let sites = region(&mut rng, 60, 15);
            assert!(b.observe(look * LOOK_MS, &sites, &none).is_empty());
        }
        assert_eq!(b.watched(), 4);
        b.observe(2 * 86_400_000, &[], &none);
        assert_eq!(b.watched(), 0);
    }

    #[test]
    fn a_region_figure_counts_every_node_of_its_sites() {
        let mut a = SiteSummary::empty("eu", "a", "r", 0);
        let mut b = SiteSummary::empty("eu", "b", "r", 0);
        a.cpu.add(Some(10)); // counted at 15
        b.cpu.add(Some(50)); // 55
        b.cpu.add(Some(50));
        b.cpu.add(None);
        a.nodes_total = 4;
        a.nodes_dead = 1;
        b.nodes_total = 6;
        b.by_status.critical = 1;
        b.by_status.warning = 1;
        assert_eq!(
            region_value(SiteMetric::Cpu, &[&a, &b]),
            Some(((15.0 + 55.0 + 55.0) / 3.0, 3))
        );
        assert_eq!(
            region_value(SiteMetric::Unhealthy, &[&a, &b]),
            Some((30.0, 10))
        );
        assert_eq!(region_value(SiteMetric::Disk, &[&a, &b]), None);
    }
}
