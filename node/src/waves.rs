//! Rollout waves: which nodes get a change in which order, and the health
//! gate a wave must pass before the next one starts. Pure functions; the
//! hub, the relays and the simulator all plan and judge with them, so they
//! agree without talking.
//!
//! # Wave specs
//! A rollout is written as a list such as `canary,1site,10%,100%`:
//! - `canary`: one node; only as the first wave.
//! - `Nsite` (`1site`, `2site`, …): every node not yet in a wave of the
//!   next N sites.
//! - `P%` (`10%`, `25%`, …, `100%`): enough nodes that P % of all nodes
//!   (rounded up) are in this wave or an earlier one. Percentages are
//!   cumulative, so they must increase, and the list must end at `100%`.
//!
//! # The plan
//! [`plan_waves`] is deterministic and depends only on the set of nodes,
//! not on the order they are given in:
//! 1. Nodes are ordered by BLAKE3(salt ‖ name), ties (same name in two
//!    sites) by region, site and name; a node listed twice counts once. The
//!    salt is the patch's id, so every rollout takes nodes in another order,
//!    and the same rollout always in the same one.
//! 2. Sites (a region and a site name) are ordered by their first node in
//!    that order.
//! 3. `canary` takes the first node not yet in a wave. `Nsite` takes every
//!    node not yet in a wave of the next N sites in site order that still
//!    have such nodes. `P%` brings the cumulative total to
//!    ceil(P × nodes / 100) by taking nodes round-robin across sites in site
//!    order, each site's nodes in node order, carrying on from the site
//!    after the one the previous `P%` wave took its last node from; so a
//!    percentage wave is spread over as many sites as it can be.
//! 4. If nodes are left after the last spec (only for a list
//!    [`parse_waves`] refuses), a final `100%` wave takes them. Each node is
//!    in exactly one wave; waves left empty are dropped, and the others
//!    numbered from 0.
//!
//! # The gate
//! [`gate`] compares the health of a wave's patched nodes with a baseline
//! (the nodes not patched): the wave passes when the patched nodes' failure
//! ratio is at most the baseline's plus a tolerated margin, so a fleet
//! already degraded for other reasons does not stop every rollout.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One wave of a rollout, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WaveSpec {
    /// One node.
    Canary,
    /// Every remaining node of the next N sites.
    Sites(u32),
    /// Up to this percentage (1 to 100) of all nodes, cumulative.
    Percent(u8),
}

impl fmt::Display for WaveSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaveSpec::Canary => f.write_str("canary"),
            WaveSpec::Sites(n) => write!(f, "{n}site"),
            WaveSpec::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// Why a list of waves was refused. Nothing is planned then.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaveError {
    /// The list is empty.
    #[error("no waves given: write them like canary,1site,10%,100%")]
    Empty,
    /// A wave is none of the three forms.
    #[error(
        "wave {position} {text:?} is not a wave: write canary, Nsite (like 1site, 2site) \
         or P% (like 10%, 100%)"
    )]
    Unknown { position: usize, text: String },
    /// `0site`.
    #[error("wave {position}: 0site takes no site; write 1site or more")]
    ZeroSites { position: usize },
    /// A percentage outside 1 to 100.
    #[error("wave {position}: {text} is not a percentage from 1% to 100%")]
    BadPercent { position: usize, text: String },
    /// `canary` after another wave.
    #[error("wave {position}: canary can only be the first wave")]
    CanaryNotFirst { position: usize },
    /// A percentage not above an earlier one.
    #[error(
        "wave {position}: {next}% after {previous}%: percentages count all the nodes patched \
         so far, so each must be larger than the one before"
    )]
    NotIncreasing {
        position: usize,
        previous: u8,
        next: u8,
    },
    /// The list does not end at `100%`.
    #[error("the last wave is {last}; end the list with 100% so that every node is patched")]
    NotEndingAt100 { last: WaveSpec },
}

impl FromStr for WaveSpec {
    type Err = WaveError;

    /// One wave on its own (reported as wave 1 in errors).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_one(1, s)
    }
}

fn parse_one(position: usize, text: &str) -> Result<WaveSpec, WaveError> {
    let text = text.trim();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if text == "canary" {
        return Ok(WaveSpec::Canary);
    }
    if let Some(n) = text.strip_suffix("site").filter(|n| digits(n)) {
        return match n.parse::<u32>() {
            Ok(0) => Err(WaveError::ZeroSites { position }),
            Ok(n) => Ok(WaveSpec::Sites(n)),
            // More sites than a u32 counts: every site.
            Err(_) => Ok(WaveSpec::Sites(u32::MAX)),
        };
    }
    if let Some(p) = text.strip_suffix('%').filter(|p| digits(p)) {
        return match p.parse::<u8>() {
            Ok(p @ 1..=100) => Ok(WaveSpec::Percent(p)),
            _ => Err(WaveError::BadPercent {
                position,
                text: text.to_owned(),
            }),
        };
    }
    Err(WaveError::Unknown {
        position,
        text: text.to_owned(),
    })
}

/// Parses a comma-separated list of waves and checks it: `canary` only
/// first, percentages increasing, the last wave `100%`. Spaces around a
/// wave are allowed.
pub fn parse_waves(text: &str) -> Result<Vec<WaveSpec>, WaveError> {
    if text.trim().is_empty() {
        return Err(WaveError::Empty);
    }
    let mut waves = Vec::new();
    let mut previous: Option<u8> = None;
    for (i, part) in text.split(',').enumerate() {
        let position = i + 1;
        let spec = parse_one(position, part)?;
        match spec {
            WaveSpec::Canary if i > 0 => return Err(WaveError::CanaryNotFirst { position }),
            WaveSpec::Percent(next) => {
                if let Some(previous) = previous.filter(|&p| p >= next) {
                    return Err(WaveError::NotIncreasing {
                        position,
                        previous,
                        next,
                    });
                }
                previous = Some(next);
            }
            _ => {}
        }
        waves.push(spec);
    }
    match waves.last() {
        Some(WaveSpec::Percent(100)) => Ok(waves),
        Some(&last) => Err(WaveError::NotEndingAt100 { last }),
        None => Err(WaveError::Empty),
    }
}

/// A node as far as planning waves goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeRef {
    pub name: String,
    pub region: String,
    pub site: String,
}

/// The nodes of one wave, in the order they were taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Position in the plan, from 0, with empty waves dropped.
    pub index: usize,
    pub spec: WaveSpec,
    pub nodes: Vec<NodeRef>,
}

/// One site's nodes in node order, and the first not yet in a wave.
struct SiteNodes {
    nodes: Vec<usize>,
    next: usize,
}

/// The state of a plan while waves are taken.
struct Planner<'a> {
    order: Vec<&'a NodeRef>,
    sites: Vec<SiteNodes>,
    taken: Vec<bool>,
    taken_count: usize,
    /// Next node of `order` the canary may be.
    canary_from: usize,
    /// Next site a `Nsite` wave may start at.
    site_from: usize,
    /// Next site a `P%` wave takes a node from.
    round_robin: usize,
}

impl<'a> Planner<'a> {
    fn new(nodes: &'a [NodeRef], salt: &[u8]) -> Self {
        let unique: BTreeSet<&NodeRef> = nodes.iter().collect();
        let mut keyed: Vec<([u8; 32], &NodeRef)> = unique
            .into_iter()
            .map(|n| {
                let mut h = blake3::Hasher::new();
                h.update(salt);
                h.update(n.name.as_bytes());
                (*h.finalize().as_bytes(), n)
            })
            .collect();
        keyed.sort_by(|a, b| {
            (a.0, &a.1.region, &a.1.site, &a.1.name).cmp(&(b.0, &b.1.region, &b.1.site, &b.1.name))
        });
        let order: Vec<&NodeRef> = keyed.into_iter().map(|(_, n)| n).collect();
        let mut index_of: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        let mut sites: Vec<SiteNodes> = Vec::new();
        for (i, n) in order.iter().enumerate() {
            let s = *index_of
                .entry((n.region.as_str(), n.site.as_str()))
                .or_insert_with(|| {
                    sites.push(SiteNodes {
                        nodes: Vec::new(),
                        next: 0,
                    });
                    sites.len() - 1
                });
            sites[s].nodes.push(i);
        }
        Planner {
            taken: vec![false; order.len()],
            order,
            sites,
            taken_count: 0,
            canary_from: 0,
            site_from: 0,
            round_robin: 0,
        }
    }

    fn take(&mut self, i: usize, into: &mut Vec<NodeRef>) {
        debug_assert!(!self.taken[i]);
        self.taken[i] = true;
        self.taken_count += 1;
        into.push(self.order[i].clone());
    }

    /// The next node of site `s` not yet in a wave.
    fn next_of_site(&mut self, s: usize) -> Option<usize> {
        let site = &mut self.sites[s];
        while let Some(&i) = site.nodes.get(site.next) {
            if !self.taken[i] {
                return Some(i);
            }
            site.next += 1;
        }
        None
    }

    fn canary(&mut self) -> Vec<NodeRef> {
        let mut out = Vec::new();
        while self.canary_from < self.order.len() {
            let i = self.canary_from;
            self.canary_from += 1;
            if !self.taken[i] {
                self.take(i, &mut out);
                break;
            }
        }
        out
    }

    fn sites(&mut self, count: u32) -> Vec<NodeRef> {
        let mut out = Vec::new();
        let mut left = count;
        while left > 0 && self.site_from < self.sites.len() {
            let s = self.site_from;
            self.site_from += 1;
            let mut any = false;
            while let Some(i) = self.next_of_site(s) {
                self.take(i, &mut out);
                any = true;
            }
            if any {
                left -= 1;
            }
        }
        out
    }

    fn percent(&mut self, percent: u8) -> Vec<NodeRef> {
        let total = self.order.len() as u128;
        let target = (u128::from(percent.min(100)) * total).div_ceil(100) as usize;
        let mut need = target.saturating_sub(self.taken_count);
        let mut out = Vec::new();
        // Every pass over the sites takes at least one node while any is
        // left, and `need` never exceeds what is left.
        while need > 0 && self.taken_count < self.order.len() {
            let s = self.round_robin;
            self.round_robin = (self.round_robin + 1) % self.sites.len();
            if let Some(i) = self.next_of_site(s) {
                self.take(i, &mut out);
                need -= 1;
            }
        }
        out
    }
}

/// Splits `nodes` into waves following `spec` (see the module's
/// documentation for the rules). `salt` is the patch's id.
pub fn plan_waves(spec: &[WaveSpec], nodes: &[NodeRef], salt: &[u8]) -> Vec<Wave> {
    let mut p = Planner::new(nodes, salt);
    let mut planned: Vec<(WaveSpec, Vec<NodeRef>)> = Vec::new();
    for &s in spec {
        let nodes = match s {
            WaveSpec::Canary => p.canary(),
            WaveSpec::Sites(n) => p.sites(n),
            WaveSpec::Percent(pc) => p.percent(pc),
        };
        planned.push((s, nodes));
    }
    if p.taken_count < p.order.len() {
        let rest = p.percent(100);
        planned.push((WaveSpec::Percent(100), rest));
    }
    debug_assert_eq!(p.taken_count, p.order.len());
    planned
        .into_iter()
        .filter(|(_, nodes)| !nodes.is_empty())
        .enumerate()
        .map(|(index, (spec, nodes))| Wave { index, spec, nodes })
        .collect()
}

/// How many nodes of a group are healthy, failed or not yet judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateCounts {
    pub healthy: u32,
    pub failed: u32,
    /// Patched but still baking, or not reporting yet.
    pub pending: u32,
}

impl GateCounts {
    /// Failed among the judged (healthy or failed) nodes; 0 when none is
    /// judged.
    pub fn failure_ratio(&self) -> f64 {
        let judged = u64::from(self.healthy) + u64::from(self.failed);
        if judged == 0 {
            0.0
        } else {
            self.failed as f64 / judged as f64
        }
    }
}

/// A wave's gate decision and the numbers behind it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateVerdict {
    /// `None` while any patched node is pending; then whether the wave
    /// passed.
    pub pass: Option<bool>,
    pub patched_failure_ratio: f64,
    pub baseline_failure_ratio: f64,
    /// The highest patched failure ratio that passes: the baseline's plus
    /// the margin.
    pub threshold: f64,
}

/// Slack in the comparison, so that a ratio exactly at the threshold
/// passes although its sum was rounded.
const GATE_EPSILON: f64 = 1e-9;

/// Judges a wave: it passes when the patched nodes' failure ratio is at
/// most the baseline's plus `max_failure` (a ratio from 0 to 1; a value
/// outside is clamped, and NaN is taken as 0, the strictest). Pending
/// nodes are not counted in either ratio; while a patched node is pending
/// there is no decision. An empty or unjudged baseline counts as no
/// failures.
pub fn gate(patched: GateCounts, baseline: GateCounts, max_failure: f64) -> GateVerdict {
    let margin = if max_failure.is_nan() {
        0.0
    } else {
        max_failure.clamp(0.0, 1.0)
    };
    let patched_failure_ratio = patched.failure_ratio();
    let baseline_failure_ratio = baseline.failure_ratio();
    let threshold = baseline_failure_ratio + margin;
    let pass = (patched.pending == 0).then_some(patched_failure_ratio <= threshold + GATE_EPSILON);
    GateVerdict {
        pass,
        patched_failure_ratio,
        baseline_failure_ratio,
        threshold,
    }
}

/// Judges a wave as it stands, so that a bad patch is stopped on the
/// first sign of harm rather than after the slowest node reports: like
/// [`gate`], but while nodes are pending the wave already fails when its
/// failures would exceed the threshold even if every pending node turned
/// out healthy. (It passes only once nothing is pending, as with `gate`.)
pub fn gate_now(patched: GateCounts, baseline: GateCounts, max_failure: f64) -> GateVerdict {
    let mut v = gate(patched, baseline, max_failure);
    if v.pass.is_none() {
        let all =
            u64::from(patched.healthy) + u64::from(patched.failed) + u64::from(patched.pending);
        if all > 0 && patched.failed as f64 / all as f64 > v.threshold + GATE_EPSILON {
            v.pass = Some(false);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn node(region: &str, site: &str, name: &str) -> NodeRef {
        NodeRef {
            name: name.into(),
            region: region.into(),
            site: site.into(),
        }
    }

    /// `sites` sites of `per_site` nodes each, in region `eu`.
    fn fleet(sites: usize, per_site: usize) -> Vec<NodeRef> {
        (0..sites)
            .flat_map(|s| {
                (0..per_site).map(move |n| node("eu", &format!("s{s}"), &format!("s{s}-n{n}")))
            })
            .collect()
    }

    fn spec(text: &str) -> Vec<WaveSpec> {
        parse_waves(text).unwrap()
    }

    fn sites_of(wave: &Wave) -> BTreeSet<&str> {
        wave.nodes.iter().map(|n| n.site.as_str()).collect()
    }

    fn sizes(plan: &[Wave]) -> Vec<usize> {
        plan.iter().map(|w| w.nodes.len()).collect()
    }

    #[test]
    fn a_wave_fails_at_once_when_pending_nodes_could_not_save_it() {
        let c = |healthy, failed, pending| GateCounts {
            healthy,
            failed,
            pending,
        };
        // One failure among two patched, one still baking: 1/2 > 0.05.
        let v = gate_now(c(0, 1, 1), c(10, 0, 0), 0.05);
        assert_eq!(v.pass, Some(false));
        assert_eq!(gate(c(0, 1, 1), c(10, 0, 0), 0.05).pass, None);
        // One failure among 100 with a 5 % margin: the rest may still pass.
        assert_eq!(gate_now(c(0, 1, 99), c(10, 0, 0), 0.05).pass, None);
        assert_eq!(gate_now(c(99, 1, 0), c(10, 0, 0), 0.05).pass, Some(true));
    }

    #[test]
    fn wave_lists_parse_in_all_three_forms() {
        assert_eq!(
            spec("canary,1site,10%,100%"),
            [
                WaveSpec::Canary,
                WaveSpec::Sites(1),
                WaveSpec::Percent(10),
                WaveSpec::Percent(100)
            ]
        );
        assert_eq!(
            spec(" 2site , 25% ,100%"),
            [
                WaveSpec::Sites(2),
                WaveSpec::Percent(25),
                WaveSpec::Percent(100)
            ]
        );
        assert_eq!(spec("100%"), [WaveSpec::Percent(100)]);
        let shown: Vec<String> = spec("canary,3site,5%,100%")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["canary", "3site", "5%", "100%"]);
        assert_eq!("7site".parse::<WaveSpec>(), Ok(WaveSpec::Sites(7)));
    }

    #[test]
    fn bad_wave_lists_are_refused_with_what_to_write() {
        let cases = [
            ("", WaveError::Empty),
            ("  ", WaveError::Empty),
            (
                "canary,site,100%",
                WaveError::Unknown {
                    position: 2,
                    text: "site".into(),
                },
            ),
            (
                "canary,,100%",
                WaveError::Unknown {
                    position: 2,
                    text: "".into(),
                },
            ),
            (
                "10 %,100%",
                WaveError::Unknown {
                    position: 1,
                    text: "10 %".into(),
                },
            ),
            (
                "-5%,100%",
                WaveError::Unknown {
                    position: 1,
                    text: "-5%".into(),
                },
            ),
            ("0site,100%", WaveError::ZeroSites { position: 1 }),
            (
                "0%,100%",
                WaveError::BadPercent {
                    position: 1,
                    text: "0%".into(),
                },
            ),
            (
                "10%,101%",
                WaveError::BadPercent {
                    position: 2,
                    text: "101%".into(),
                },
            ),
            (
                "10%,999%",
                WaveError::BadPercent {
                    position: 2,
                    text: "999%".into(),
                },
            ),
            (
                "1site,canary,100%",
                WaveError::CanaryNotFirst { position: 2 },
            ),
            (
                "canary,canary,100%",
                WaveError::CanaryNotFirst { position: 2 },
            ),
            (
                "50%,10%,100%",
                WaveError::NotIncreasing {
                    position: 2,
                    previous: 50,
                    next: 10,
                },
            ),
            (
                "10%,100%,100%",
                WaveError::NotIncreasing {
                    position: 3,
                    previous: 100,
                    next: 100,
                },
            ),
            (
                "canary,10%",
                WaveError::NotEndingAt100 {
                    last: WaveSpec::Percent(10),
                },
            ),
            (
                "canary,100%,1site",
                WaveError::NotEndingAt100 {
                    last: WaveSpec::Sites(1),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_waves(text), Err(want), "{text:?}");
        }
        let msg = parse_waves("canary,sites,100%").unwrap_err().to_string();
        assert!(
            msg.contains("canary, Nsite") && msg.contains("\"sites\""),
            "{msg}"
        );
        let msg = parse_waves("canary,10%").unwrap_err().to_string();
        assert!(msg.contains("end the list with 100%"), "{msg}");
    }

    #[test]
    fn the_same_salt_gives_the_same_plan_whatever_order_the_nodes_come_in() {
        let nodes = fleet(6, 7);
        let mut reversed = nodes.clone();
        reversed.reverse();
        let s = spec("canary,1site,10%,50%,100%");
        let plan = plan_waves(&s, &nodes, b"patch-1");
        assert_eq!(plan, plan_waves(&s, &reversed, b"patch-1"));
        assert_eq!(plan, plan_waves(&s, &nodes, b"patch-1"));
    }

    #[test]
    fn different_salts_choose_different_canaries() {
        let nodes = fleet(10, 10);
        let canaries: BTreeSet<String> = (0..20u8)
            .map(|salt| {
                plan_waves(&spec("canary,100%"), &nodes, &[salt])[0].nodes[0]
                    .name
                    .clone()
            })
            .collect();
        // 20 draws from 100 nodes: all alike would mean the salt is unused.
        assert!(canaries.len() >= 10, "{canaries:?}");
    }

    #[test]
    fn the_canary_is_one_node_first_in_hash_order() {
        let nodes = fleet(4, 5);
        let salt = b"id";
        let plan = plan_waves(&spec("canary,100%"), &nodes, salt);
        assert_eq!(sizes(&plan), [1, 19]);
        let first = nodes
            .iter()
            .min_by_key(|n| {
                let mut salted = salt.to_vec();
                salted.extend(n.name.as_bytes());
                *blake3::hash(&salted).as_bytes()
            })
            .unwrap();
        assert_eq!(plan[0].nodes, std::slice::from_ref(first));
        assert_eq!(plan[0].spec, WaveSpec::Canary);
    }

    #[test]
    fn a_site_wave_takes_a_whole_site_and_completes_the_canarys() {
        let nodes = fleet(5, 4);
        let plan = plan_waves(&spec("1site,100%"), &nodes, b"x");
        assert_eq!(sizes(&plan), [4, 16]);
        assert_eq!(sites_of(&plan[0]).len(), 1);
        assert!(
            plan[1]
                .nodes
                .iter()
                .all(|n| !sites_of(&plan[0]).contains(n.site.as_str()))
        );

        let plan = plan_waves(&spec("canary,1site,2site,100%"), &nodes, b"x");
        assert_eq!(sizes(&plan), [1, 3, 8, 8]);
        assert_eq!(sites_of(&plan[1]), sites_of(&plan[0]));
        assert_eq!(sites_of(&plan[2]).len(), 2);
        assert!(sites_of(&plan[2]).is_disjoint(&sites_of(&plan[1])));
    }

    #[test]
    fn a_ten_percent_wave_spreads_across_sites() {
        let nodes = fleet(10, 10);
        for salt in [&b"a"[..], b"b", b"c"] {
            let plan = plan_waves(&spec("canary,10%,100%"), &nodes, salt);
            assert_eq!(sizes(&plan), [1, 9, 90]);
            // One node from each of 9 sites, not 9 nodes of one site.
            assert_eq!(sites_of(&plan[1]).len(), 9, "{:?}", plan[1].nodes);
        }
        let plan = plan_waves(&spec("10%,100%"), &nodes, b"d");
        assert_eq!(sites_of(&plan[0]).len(), 10);
    }

    #[test]
    fn percentages_are_cumulative_and_round_up() {
        let nodes = fleet(3, 10);
        let plan = plan_waves(&spec("25%,50%,100%"), &nodes, b"s");
        // ceil(7.5) = 8, then 15, then 30.
        assert_eq!(sizes(&plan), [8, 7, 15]);
        let nodes = fleet(1, 3);
        let plan = plan_waves(&spec("1%,100%"), &nodes, b"s");
        assert_eq!(sizes(&plan), [1, 2]);
    }

    #[test]
    fn empty_waves_are_dropped_and_the_rest_numbered_from_zero() {
        // One site of 10: the site wave takes all but the canary.
        let nodes = fleet(1, 10);
        let plan = plan_waves(&spec("canary,1site,10%,100%"), &nodes, b"s");
        assert_eq!(sizes(&plan), [1, 9]);
        let index: Vec<usize> = plan.iter().map(|w| w.index).collect();
        assert_eq!(index, [0, 1]);
        assert_eq!(plan[1].spec, WaveSpec::Sites(1));
        assert!(plan_waves(&spec("canary,100%"), &[], b"s").is_empty());
    }

    #[test]
    fn a_list_that_stops_short_of_100_percent_still_places_every_node() {
        let nodes = fleet(2, 3);
        let plan = plan_waves(&[WaveSpec::Canary], &nodes, b"s");
        assert_eq!(sizes(&plan), [1, 5]);
        assert_eq!(plan[1].spec, WaveSpec::Percent(100));
        assert_eq!(sizes(&plan_waves(&[], &nodes, b"s")), [6]);
    }

    #[test]
    fn a_node_listed_twice_is_planned_once_and_same_names_in_two_sites_are_two_nodes() {
        let nodes = vec![
            node("eu", "a", "web1"),
            node("eu", "a", "web1"),
            node("eu", "b", "web1"),
        ];
        let plan = plan_waves(&spec("100%"), &nodes, b"s");
        assert_eq!(sizes(&plan), [2]);
    }

    #[test]
    fn the_gate_waits_while_any_patched_node_is_pending() {
        let v = gate(
            GateCounts {
                healthy: 9,
                failed: 0,
                pending: 1,
            },
            GateCounts::default(),
            0.1,
        );
        assert_eq!(v.pass, None);
        assert_eq!(v.patched_failure_ratio, 0.0);
    }

    #[test]
    fn a_failure_ratio_exactly_at_the_threshold_passes_and_above_it_fails() {
        let counts = |healthy, failed| GateCounts {
            healthy,
            failed,
            pending: 0,
        };
        // 2/10 against a baseline of 1/10 with a 0.1 margin.
        let v = gate(counts(8, 2), counts(9, 1), 0.1);
        assert_eq!(v.pass, Some(true));
        assert_eq!(v.patched_failure_ratio, 0.2);
        assert_eq!(v.baseline_failure_ratio, 0.1);
        assert!((v.threshold - 0.2).abs() < 1e-12);
        // 0.7 + 0.1 is 0.7999999999999999 in floating point: 8/10 is
        // still exactly at the threshold.
        assert_eq!(gate(counts(2, 8), counts(3, 7), 0.1).pass, Some(true));
        assert_eq!(gate(counts(7, 3), counts(9, 1), 0.1).pass, Some(false));
        assert_eq!(gate(counts(10, 0), counts(10, 0), 0.0).pass, Some(true));
        assert_eq!(gate(counts(99, 1), counts(10, 0), 0.0).pass, Some(false));
    }

    #[test]
    fn an_empty_baseline_counts_as_no_failures() {
        let patched = GateCounts {
            healthy: 4,
            failed: 1,
            pending: 0,
        };
        let v = gate(patched, GateCounts::default(), 0.2);
        assert_eq!(v.baseline_failure_ratio, 0.0);
        assert_eq!(v.threshold, 0.2);
        assert_eq!(v.pass, Some(true));
        assert_eq!(gate(patched, GateCounts::default(), 0.19).pass, Some(false));
        // Baseline nodes still pending are not judged either.
        let pending_only = GateCounts {
            healthy: 0,
            failed: 0,
            pending: 5,
        };
        assert_eq!(gate(patched, pending_only, 0.19).pass, Some(false));
    }

    #[test]
    fn a_margin_outside_zero_to_one_is_clamped_and_nan_is_strictest() {
        let patched = GateCounts {
            healthy: 1,
            failed: 1,
            pending: 0,
        };
        assert_eq!(
            gate(patched, GateCounts::default(), f64::NAN).threshold,
            0.0
        );
        assert_eq!(gate(patched, GateCounts::default(), -1.0).pass, Some(false));
        assert_eq!(gate(patched, GateCounts::default(), 7.0).threshold, 1.0);
    }

    fn arb_spec() -> impl Strategy<Value = WaveSpec> {
        prop_oneof![
            Just(WaveSpec::Canary),
            (0u32..4).prop_map(WaveSpec::Sites),
            (0u8..=120).prop_map(WaveSpec::Percent),
        ]
    }

    fn arb_node() -> impl Strategy<Value = NodeRef> {
        ("[ab]", "[a-d]", "n[0-9]{1,2}").prop_map(|(region, site, name)| NodeRef {
            name,
            region,
            site,
        })
    }

    proptest! {
        #[test]
        fn every_node_is_in_exactly_one_wave(
            specs in proptest::collection::vec(arb_spec(), 0..8),
            nodes in proptest::collection::vec(arb_node(), 0..60),
            salt in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let plan = plan_waves(&specs, &nodes, &salt);
            let mut seen: BTreeMap<&NodeRef, usize> = BTreeMap::new();
            for (i, wave) in plan.iter().enumerate() {
                prop_assert_eq!(wave.index, i);
                prop_assert!(!wave.nodes.is_empty());
                for n in &wave.nodes {
                    *seen.entry(n).or_default() += 1;
                }
            }
            let distinct: BTreeSet<&NodeRef> = nodes.iter().collect();
            prop_assert_eq!(seen.len(), distinct.len());
            prop_assert!(seen.values().all(|&c| c == 1));
            prop_assert!(distinct.iter().all(|n| seen.contains_key(n)));
        }

        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in ".{0,40}") {
            if let Ok(waves) = parse_waves(&text) {
                prop_assert_eq!(waves.last(), Some(&WaveSpec::Percent(100)));
            }
        }
    }
}
