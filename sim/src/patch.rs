//! Patch rollouts: the patches an operator publishes, the rollouts that
//! take them wave by wave through the fleet, what each hub, relay and node
//! holds and does of them, and the books that the report is made from.
//!
//! The waves and the gate are the mesh's own ([`plan_waves`] and [`gate`]
//! from `trellis_node::waves`); this module adds the state a run keeps and
//! the counts the gates are fed with, with the time passed in, so its
//! rules are tested on their own. The world moves things: artifacts hub to
//! relay in chunks over the WAN, wave orders and reports between the hub
//! and the relays, announcements and health through site gossip.
//!
//! A node is *touched* once it starts installing. A relay rolls its site
//! back on its own (the local gate) as soon as its patched nodes fail more
//! than the gate allows even if every node still baking turned out
//! healthy; the hub does the same for a wave, and otherwise waits for every
//! node of the wave in a reachable site to be judged.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::patch::CHUNK_SIZE;
use trellis_node::waves::{GateCounts, GateVerdict, NodeRef, WaveSpec, plan_waves};

use crate::report::{ArtifactTransfer, LocalRollback, RolloutOutcome, WaveOutcome, ms};
use crate::rng::SimRng;
use crate::scenario::{
    ActionKind, DEFAULT_ARTIFACT_BYTES, DEFAULT_BAKE, DEFAULT_INSTALL_TIME, DEFAULT_MAX_FAILURE,
    DEFAULT_ROLLBACK_TIME, DEFAULT_WAVES, Scenario,
};

/// A published patch.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchSpec {
    pub name: String,
    /// Virtual time (s) the operator publishes it.
    pub at: f64,
    /// Index of the hub it is published at.
    pub hub: usize,
    pub artifact_bytes: u64,
    pub failure_probability: f64,
    /// Seconds.
    pub install_time: f64,
    pub bake: f64,
    pub rollback_time: f64,
}

impl PatchSpec {
    /// How many chunks its artifacts cross a link in.
    pub fn chunks(&self) -> u64 {
        self.artifact_bytes.div_ceil(CHUNK_SIZE as u64)
    }

    /// The size of chunk `k` (the last one shorter).
    pub fn chunk_bytes(&self, k: u64) -> u64 {
        let size = CHUNK_SIZE as u64;
        (self.artifact_bytes - k.min(self.chunks()) * size).min(size)
    }
}

/// A rollout of a published patch.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    /// Index of the patch in [`patches`]' order.
    pub patch: usize,
    /// Virtual time (s) the operator starts it.
    pub at: f64,
    /// The waves as written, and parsed.
    pub waves_text: String,
    pub waves: Vec<WaveSpec>,
    pub max_failure: f64,
    pub auto_rollback: bool,
}

fn hub_index(hub: Option<&str>) -> usize {
    hub.and_then(|h| h.strip_prefix("hub-"))
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(0, |n| n.saturating_sub(1))
}

/// The patches `sc` publishes, in file order. The scenario was validated:
/// names are unique and present.
pub fn patches(sc: &Scenario) -> Vec<PatchSpec> {
    let secs = |d: Option<Duration>, default: Duration| d.unwrap_or(default).as_secs_f64();
    sc.actions
        .iter()
        .filter(|a| a.kind == ActionKind::PublishPatch)
        .map(|a| PatchSpec {
            name: a.name.clone().unwrap_or_default(),
            at: a.at.as_secs_f64(),
            hub: hub_index(a.hub.as_deref()),
            artifact_bytes: a.artifact_bytes.unwrap_or(DEFAULT_ARTIFACT_BYTES),
            failure_probability: a.failure_probability.unwrap_or(0.0),
            install_time: secs(a.install_time, DEFAULT_INSTALL_TIME),
            bake: secs(a.bake, DEFAULT_BAKE),
            rollback_time: secs(a.rollback_time, DEFAULT_ROLLBACK_TIME),
        })
        .collect()
}

/// The rollouts of `sc`, in time order (file order for equal times).
/// Rollouts of patches `patches` does not hold, or with waves that do not
/// parse, are left out (validation refuses them first).
pub fn rollouts(sc: &Scenario, patches: &[PatchSpec]) -> Vec<RolloutSpec> {
    let mut actions: Vec<_> = sc
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::Rollout)
        .collect();
    actions.sort_by_key(|a| a.at);
    actions
        .into_iter()
        .filter_map(|a| {
            let name = a.patch.as_deref()?;
            let patch = patches.iter().position(|p| p.name == name)?;
            let waves_text = a.waves.clone().unwrap_or_else(|| DEFAULT_WAVES.to_owned());
            let waves = trellis_node::waves::parse_waves(&waves_text).ok()?;
            Some(RolloutSpec {
                patch,
                at: a.at.as_secs_f64(),
                waves_text,
                waves,
                max_failure: a.max_failure.unwrap_or(DEFAULT_MAX_FAILURE),
                auto_rollback: a.auto_rollback.unwrap_or(true),
            })
        })
        .collect()
}

/// One wave of a plan, its nodes as `(site index, member index)` (members
/// from 1; 0 is the relay), sorted.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedWave {
    pub spec: WaveSpec,
    pub nodes: Vec<(usize, usize)>,
}

/// The waves a rollout of `patch` takes through the fleet of `sc`: the
/// mesh's [`plan_waves`] over every node, salted with the patch's name.
pub fn plan(sc: &Scenario, waves: &[WaveSpec], patch: &str) -> Vec<PlannedWave> {
    let t = &sc.topology;
    let names = sc.site_names();
    let mut refs = Vec::with_capacity(sc.total_nodes());
    for (s, site) in names.iter().enumerate() {
        let region = format!("r{}", s / t.sites_per_region + 1);
        for k in 1..=t.nodes_per_site {
            refs.push(NodeRef {
                name: format!("{site}-n{k}"),
                region: region.clone(),
                site: site.clone(),
            });
        }
    }
    plan_waves(waves, &refs, patch.as_bytes())
        .into_iter()
        .map(|w| {
            let mut nodes: Vec<(usize, usize)> =
                w.nodes.iter().filter_map(|n| locate(sc, n)).collect();
            nodes.sort_unstable();
            PlannedWave {
                spec: w.spec,
                nodes,
            }
        })
        .collect()
}

/// Where a node named as the scenario names them is: `r2-s3-n7` is member
/// 7 of the third site of the second region.
fn locate(sc: &Scenario, n: &NodeRef) -> Option<(usize, usize)> {
    let t = &sc.topology;
    let rest = n.name.strip_prefix('r')?;
    let (r, rest) = rest.split_once("-s")?;
    let (s, k) = rest.split_once("-n")?;
    let (r, s, k): (usize, usize, usize) = (r.parse().ok()?, s.parse().ok()?, k.parse().ok()?);
    let ok = (1..=t.regions).contains(&r)
        && (1..=t.sites_per_region).contains(&s)
        && (1..=t.nodes_per_site).contains(&k);
    ok.then(|| ((r - 1) * t.sites_per_region + s - 1, k))
}

/// Whether installing `patch` breaks node `member` of site `site`, drawn
/// from the seed: the fraction of the bake after which its checks fail, or
/// `None` for a node the patch leaves healthy. The same node draws the
/// same every time it installs.
pub fn failure_at(seed: u64, patch: &PatchSpec, site: usize, member: usize) -> Option<f64> {
    if patch.failure_probability <= 0.0 {
        return None;
    }
    let index = ((site as u64) << 20) | member as u64;
    let mut rng = SimRng::derive(seed, &format!("patch/{}", patch.name), index);
    rng.chance(patch.failure_probability).then(|| rng.f64())
}

/// What a node is doing with a rollout's patch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stage {
    /// Nothing (not ordered, not yet seen, or done).
    #[default]
    Idle,
    Fetching,
    Installing,
    Baking,
    Healthy,
    /// Its checks failed.
    Failed,
    RollingBack,
}

/// One node's part in a rollout: the truth, which only the node knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PatchNode {
    pub stage: Stage,
    /// The patch is installed (on disk: survives a crash).
    pub installed: bool,
    /// It ran `install` at least once.
    pub touched: bool,
    /// Its checks failed at least once.
    pub failed: bool,
    /// Bumped at each crash, so that what an earlier run of the node
    /// started is void.
    pub epoch: u64,
    /// Status publications so far, to tell them apart in gossip.
    pub published: u64,
}

impl PatchNode {
    /// The node crashed: a fetch or an install under way is lost (it comes
    /// back unpatched); an installed patch stays.
    pub fn crash(&mut self) {
        self.epoch += 1;
        self.stage = Stage::Idle;
    }
}

/// What a relay has learnt through gossip of a node's patch status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Seen {
    /// Nothing yet: ordered and pending, or not ordered.
    #[default]
    Nothing,
    Healthy,
    Failed,
    RolledBack,
}

impl Seen {
    /// The word a node publishes in gossip.
    pub fn word(self) -> &'static str {
        match self {
            Seen::Nothing => "pending",
            Seen::Healthy => "healthy",
            Seen::Failed => "failed",
            Seen::RolledBack => "rolled-back",
        }
    }
}

/// A status a node published that the relay has not seen yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Awaiting {
    pub member: usize,
    /// The node's gossip version carrying it (modelled sites), or the
    /// value's counter (real chitchat).
    pub version: u64,
    pub seen: Seen,
}

/// The counts a gate judges a group of nodes by: `patched` are the ordered
/// members (not rolled back), `baseline` the others; `alive` says whether
/// the relay believes a member alive. A patched node that is down is
/// pending (it is judged when it is back); an unpatched one that is down
/// fails the baseline, as its checks do not pass.
pub fn site_counts(
    ordered: &[bool],
    seen: &[Seen],
    alive: impl Fn(usize) -> bool,
) -> (GateCounts, GateCounts) {
    let mut patched = GateCounts::default();
    let mut baseline = GateCounts::default();
    for j in 1..ordered.len() {
        if ordered[j] && seen[j] != Seen::RolledBack {
            match seen[j] {
                Seen::Healthy => patched.healthy += 1,
                Seen::Failed => patched.failed += 1,
                _ => patched.pending += 1,
            }
        } else if alive(j) {
            baseline.healthy += 1;
        } else {
            baseline.failed += 1;
        }
    }
    (patched, baseline)
}

/// Whether the gate fails already, before the pending nodes are judged:
/// even if every one of them turned out healthy the failure ratio would
/// be too high. The mesh's hubs and relays stop early by the same rule
/// ([`trellis_node::waves::gate_now`]).
pub fn fails_early(patched: GateCounts, baseline: GateCounts, max_failure: f64) -> bool {
    trellis_node::waves::gate_now(patched, baseline, max_failure).pass == Some(false)
}

/// The hub's side of one site in a rollout: the orders it gives the relay
/// and the last report it has from it.
#[derive(Debug, Clone, Default)]
pub struct HubSite {
    /// Bumped at every change of the orders.
    pub order_seq: u64,
    /// Members ordered to install so far.
    pub ordered: Vec<bool>,
    pub rollback: bool,
    /// The orders on their way, and when they were sent.
    pub sending: Option<(u64, f64)>,
    /// The relay's last report, and its sequence number.
    pub seen: Vec<Seen>,
    pub report_seq: u64,
    /// The relay has reported that it rolled its site back on its own.
    pub tripped: bool,
}

/// The relay's side of one site in a rollout. Kept across a relay crash:
/// the relay keeps its orders, what it saw and the artifact's chunks on
/// disk.
#[derive(Debug, Clone, Default)]
pub struct RelaySite {
    /// The newest orders it holds.
    pub order_seq: u64,
    pub ordered: Vec<bool>,
    pub rollback: bool,
    /// When its local gate rolled the site back.
    pub tripped_at: Option<f64>,
    /// Chunks of the artifact held (a prefix: they arrive in order).
    pub chunks_held: u64,
    /// The next chunk to ask for on the fetch under way.
    pub requested: u64,
    /// The connection a fetch of the rest is under way on.
    pub fetching: Option<u64>,
    pub seen: Vec<Seen>,
    /// Bumped whenever what it would report changes.
    pub seq: u64,
    /// The newest report delivered, and when the one on its way was sent.
    pub reported: u64,
    pub reporting: Option<f64>,
    pub awaiting: Vec<Awaiting>,
    /// Patch announcements made in the site's gossip.
    pub announced: u64,
    /// Sites on real chitchat: arrivals of the announced value handled.
    pub arrivals_seen: usize,
}

impl RelaySite {
    /// Whether the relay holds the whole artifact.
    pub fn cached(&self, patch: &PatchSpec) -> bool {
        self.chunks_held >= patch.chunks()
    }

    /// Whether it has anything for its nodes to act on.
    pub fn active(&self) -> bool {
        self.announced > 0
    }
}

/// One site in one rollout.
#[derive(Debug, Clone, Default)]
pub struct SiteRollout {
    pub hub: HubSite,
    pub relay: RelaySite,
    pub nodes: Vec<PatchNode>,
    /// Artifact bytes its WAN carried (chunks the hub sent).
    pub wan_bytes: u64,
    /// The relay rolled back on its own; when it finished, and when the
    /// hub learnt it.
    pub local_done: Option<f64>,
    pub hub_learnt: Option<f64>,
    /// Its WAN was down when the relay rolled back.
    pub cut_off_at_trip: bool,
}

impl SiteRollout {
    pub fn new(members: usize) -> Self {
        SiteRollout {
            hub: HubSite {
                ordered: vec![false; members],
                seen: vec![Seen::Nothing; members],
                ..HubSite::default()
            },
            relay: RelaySite {
                ordered: vec![false; members],
                seen: vec![Seen::Nothing; members],
                ..RelaySite::default()
            },
            nodes: vec![PatchNode::default(); members],
            ..SiteRollout::default()
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started (its time has not come, or its hub is down or does not
    /// hold the patch yet).
    Waiting,
    /// Wave `n` is out.
    Wave(usize),
    Completed,
    Halted,
}

/// What the books know of one wave.
#[derive(Debug, Clone, Default)]
pub struct WaveBook {
    pub started: Option<f64>,
    pub ended: Option<f64>,
    pub counts: GateCounts,
    /// Nodes of the wave pending in sites the hub could not reach when it
    /// judged.
    pub unreachable: u32,
    pub verdict: Option<GateVerdict>,
    /// "passed", "failed", or why it stopped otherwise.
    pub outcome: Option<String>,
}

/// One rollout in a run.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub spec: RolloutSpec,
    pub plan: Vec<PlannedWave>,
    pub phase: Phase,
    pub sites: Vec<SiteRollout>,
    pub waves: Vec<WaveBook>,
    pub started: Option<f64>,
    pub ended: Option<f64>,
    pub halted_by: Option<String>,
    /// When the first node's checks failed, and when the last node rolled
    /// back.
    pub first_failure: Option<f64>,
    pub last_rolled_back: Option<f64>,
    pub rolled_back: u64,
    pub failed_nodes: u64,
}

impl Rollout {
    /// A rollout of `spec` through the sites of `sc` (each of `members`
    /// members, the relay included).
    pub fn new(sc: &Scenario, spec: RolloutSpec, patch: &PatchSpec, members: usize) -> Self {
        let plan = plan(sc, &spec.waves, &patch.name);
        let sites = sc.site_names().len();
        Rollout {
            waves: vec![WaveBook::default(); plan.len()],
            plan,
            spec,
            phase: Phase::Waiting,
            sites: vec![SiteRollout::new(members); sites],
            started: None,
            ended: None,
            halted_by: None,
            first_failure: None,
            last_rolled_back: None,
            rolled_back: 0,
            failed_nodes: 0,
        }
    }

    /// The hub's counts for wave `w` from the relays' reports: pending
    /// nodes of sites `reachable` says it cannot reach are left out and
    /// counted apart. Baselines are per site, from the reports where there
    /// are some and from `fleet` (alive, dead) otherwise.
    pub fn hub_counts(
        &self,
        w: usize,
        reachable: impl Fn(usize) -> bool,
        fleet: impl Fn(usize) -> (u32, u32),
    ) -> (GateCounts, GateCounts, u32) {
        let mut patched = GateCounts::default();
        let mut unreachable = 0;
        for &(s, j) in &self.plan[w].nodes {
            match self.sites[s].hub.seen[j] {
                Seen::Healthy => patched.healthy += 1,
                Seen::Failed | Seen::RolledBack => patched.failed += 1,
                Seen::Nothing if reachable(s) => patched.pending += 1,
                Seen::Nothing => unreachable += 1,
            }
        }
        let mut baseline = GateCounts::default();
        for (s, site) in self.sites.iter().enumerate() {
            if !reachable(s) {
                continue;
            }
            let ordered = site.hub.ordered.iter().filter(|o| **o).count() as u32;
            let (alive, dead) = fleet(s);
            // Unpatched nodes are the site's nodes less the ordered ones,
            // which are taken from the alive first.
            baseline.healthy += alive.saturating_sub(ordered);
            baseline.failed += dead.saturating_sub(ordered.saturating_sub(alive));
        }
        (patched, baseline, unreachable)
    }

    /// Running nodes with the patch installed, in every site.
    pub fn installed(&self) -> u64 {
        self.sites
            .iter()
            .map(|s| s.nodes.iter().filter(|n| n.installed).count() as u64)
            .sum()
    }

    pub fn touched(&self) -> u64 {
        self.sites
            .iter()
            .map(|s| s.nodes.iter().filter(|n| n.touched).count() as u64)
            .sum()
    }

    /// The figures of the report. `sites` are the names, in index order.
    pub fn outcome(&self, patch: &PatchSpec, hub: &str, sites: &[String]) -> RolloutOutcome {
        let name = |s: usize| sites.get(s).cloned().unwrap_or_default();
        let waves = self
            .plan
            .iter()
            .zip(&self.waves)
            .enumerate()
            .map(|(i, (p, b))| {
                let mut site_names: Vec<usize> = p.nodes.iter().map(|(s, _)| *s).collect();
                site_names.dedup();
                WaveOutcome {
                    index: i as u64,
                    spec: p.spec.to_string(),
                    nodes: p.nodes.len() as u64,
                    sites: site_names.len() as u64,
                    first_sites: site_names.iter().take(20).map(|s| name(*s)).collect(),
                    started_s: b.started.map(ms),
                    ended_s: b.ended.map(ms),
                    healthy: b.counts.healthy,
                    failed: b.counts.failed,
                    pending: b.counts.pending,
                    unreachable: b.unreachable,
                    patched_failure_ratio: b.verdict.map(|v| v.patched_failure_ratio),
                    baseline_failure_ratio: b.verdict.map(|v| v.baseline_failure_ratio),
                    threshold: b.verdict.map(|v| v.threshold),
                    verdict: b.outcome.clone().unwrap_or_else(|| {
                        if b.started.is_some() {
                            "unfinished".to_owned()
                        } else {
                            "not started".to_owned()
                        }
                    }),
                }
            })
            .collect();
        let wan: Vec<ArtifactTransfer> = self
            .sites
            .iter()
            .enumerate()
            .filter(|(_, s)| s.wan_bytes > 0)
            .map(|(i, s)| ArtifactTransfer {
                site: name(i),
                bytes: s.wan_bytes,
                installed_nodes: s.nodes.iter().filter(|n| n.touched).count() as u64,
            })
            .collect();
        let local_rollbacks = self
            .sites
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                Some(LocalRollback {
                    site: name(i),
                    tripped_s: ms(s.relay.tripped_at?),
                    done_s: s.local_done.map(ms),
                    hub_learnt_s: s.hub_learnt.map(ms),
                    cut_off: s.cut_off_at_trip,
                })
            })
            .collect();
        let state = match self.phase {
            Phase::Completed => "completed",
            Phase::Halted => "halted",
            Phase::Waiting if self.started.is_none() => "not started",
            _ => "unfinished",
        };
        RolloutOutcome {
            patch: patch.name.clone(),
            hub: hub.to_owned(),
            at_s: ms(self.spec.at),
            started_s: self.started.map(ms),
            waves_spec: self.spec.waves_text.clone(),
            max_failure: self.spec.max_failure,
            auto_rollback: self.spec.auto_rollback,
            artifact_bytes: patch.artifact_bytes,
            failure_probability: patch.failure_probability,
            state: state.to_owned(),
            ended_s: self.ended.map(ms),
            halted_by: self.halted_by.clone(),
            nodes_touched: self.touched(),
            nodes_failed: self.failed_nodes,
            nodes_rolled_back: self.rolled_back,
            nodes_left_patched: self.installed(),
            first_failure_s: self.first_failure.map(ms),
            last_rolled_back_s: self.last_rolled_back.map(ms),
            rollback_s: match (self.first_failure, self.last_rolled_back) {
                (Some(a), Some(b)) if b >= a => Some(ms(b - a)),
                _ => None,
            },
            local_rollbacks,
            wan_bytes: wan.iter().map(|w| w.bytes).sum(),
            wan,
            waves,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SC: &str = r#"
        name = "p"
        duration = "30m"
        [topology]
        regions = 2
        hubs = 2
        sites_per_region = 3
        nodes_per_site = 5
        [[actions]]
        kind = "publish_patch"
        at = "1m"
        name = "fix"
        artifact_bytes = 3145729
        failure_probability = 0.5
        bake = "2m"
        hub = "hub-2"
        [[actions]]
        kind = "rollout"
        at = "2m"
        patch = "fix"
    "#;

    fn scenario() -> Scenario {
        Scenario::parse(SC, "p.toml").unwrap()
    }

    #[test]
    fn a_patch_and_its_rollout_take_the_defaults_they_do_not_set() {
        let sc = scenario();
        let p = patches(&sc);
        assert_eq!(p.len(), 1);
        assert_eq!(
            (p[0].hub, p[0].install_time, p[0].bake, p[0].rollback_time),
            (1, 30.0, 120.0, 20.0)
        );
        // 3 MiB and a byte: four chunks, the last of one byte.
        assert_eq!(p[0].chunks(), 4);
        assert_eq!(
            (0..4).map(|k| p[0].chunk_bytes(k)).collect::<Vec<_>>(),
            [1 << 20, 1 << 20, 1 << 20, 1]
        );
        let r = rollouts(&sc, &p);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].waves_text, DEFAULT_WAVES);
        assert_eq!((r[0].patch, r[0].at, r[0].auto_rollback), (0, 120.0, true));
        assert_eq!(r[0].max_failure, DEFAULT_MAX_FAILURE);
    }

    #[test]
    fn the_plan_places_every_node_once_canary_first_then_the_canarys_site() {
        let sc = scenario();
        let r = &rollouts(&sc, &patches(&sc))[0];
        let plan = plan(&sc, &r.waves, "fix");
        let sizes: Vec<usize> = plan.iter().map(|w| w.nodes.len()).collect();
        // 30 nodes: the canary, the rest of its site, then 10% (3) asks
        // for none more and is dropped, and the rest.
        assert_eq!(sizes, [1, 4, 25]);
        let mut all: Vec<(usize, usize)> = plan.iter().flat_map(|w| w.nodes.clone()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 30);
        assert!(all.iter().all(|&(s, j)| s < 6 && (1..=5).contains(&j)));
        let canary_site = plan[0].nodes[0].0;
        assert!(plan[1].nodes.iter().all(|(s, _)| *s == canary_site));
        assert_eq!(plan, super::plan(&sc, &r.waves, "fix"), "deterministic");
        let salted = ["a", "b", "c"]
            .iter()
            .any(|name| super::plan(&sc, &r.waves, name) != plan);
        assert!(salted, "another patch name takes nodes in another order");
    }

    #[test]
    fn a_nodes_draw_is_the_same_every_time_and_about_the_probability() {
        let sc = scenario();
        let p = &patches(&sc)[0];
        let draws: Vec<Option<f64>> = (0..1000).map(|j| failure_at(7, p, 1, j)).collect();
        let again: Vec<Option<f64>> = (0..1000).map(|j| failure_at(7, p, 1, j)).collect();
        assert_eq!(draws, again);
        let bad = draws.iter().filter(|d| d.is_some()).count();
        assert!((400..600).contains(&bad), "{bad}");
        assert!(draws.iter().flatten().all(|f| (0.0..1.0).contains(f)));
        let good = PatchSpec {
            failure_probability: 0.0,
            ..p.clone()
        };
        assert!((0..100).all(|j| failure_at(7, &good, 1, j).is_none()));
    }

    #[test]
    fn site_counts_split_ordered_nodes_from_the_baseline() {
        use Seen::*;
        let ordered = [false, true, true, true, false, false];
        let seen = [Nothing, Healthy, Failed, Nothing, Nothing, RolledBack];
        let (p, b) = site_counts(&ordered, &seen, |j| j != 5);
        assert_eq!((p.healthy, p.failed, p.pending), (1, 1, 1));
        assert_eq!((b.healthy, b.failed, b.pending), (1, 1, 0));
    }

    #[test]
    fn a_gate_fails_early_only_when_pending_nodes_could_not_save_it() {
        let c = |healthy, failed, pending| GateCounts {
            healthy,
            failed,
            pending,
        };
        let none = GateCounts::default();
        // 1 of 20 is 5%: within a 5% margin even if the rest pass.
        assert!(!fails_early(c(0, 1, 19), none, 0.05));
        // 2 of 20 is 10%: too many whatever the rest do.
        assert!(fails_early(c(0, 2, 18), none, 0.05));
        // A degraded baseline raises the bar.
        assert!(!fails_early(c(0, 2, 18), c(9, 1, 0), 0.05));
        // No failure, no early verdict.
        assert!(!fails_early(c(0, 0, 20), none, 0.0));
    }

    #[test]
    fn hub_counts_leave_out_pending_nodes_of_unreachable_sites() {
        let sc = scenario();
        let p = &patches(&sc)[0];
        let r = rollouts(&sc, &patches(&sc)).remove(0);
        let mut ro = Rollout::new(&sc, r, p, 6);
        let wave: Vec<(usize, usize)> = ro.plan[2].nodes.clone();
        let (s0, j0) = wave[0];
        ro.sites[s0].hub.seen[j0] = Seen::Healthy;
        let (s1, j1) = wave[1];
        ro.sites[s1].hub.seen[j1] = Seen::RolledBack;
        for &(s, j) in &wave {
            ro.sites[s].hub.ordered[j] = true;
        }
        let far = wave.iter().map(|(s, _)| *s).find(|s| *s != s0 && *s != s1);
        let (patched, baseline, unreachable) = ro.hub_counts(2, |s| Some(s) != far, |_| (5, 0));
        let in_far = wave.iter().filter(|(s, _)| Some(*s) == far).count() as u32;
        assert_eq!(patched.healthy, 1);
        assert_eq!(patched.failed, 1, "a rolled-back node failed");
        assert_eq!(unreachable, in_far);
        assert_eq!(patched.pending, wave.len() as u32 - 2 - in_far);
        // Every reachable site's five nodes, less those ordered.
        let ordered_reachable = wave.iter().filter(|(s, _)| Some(*s) != far).count() as u32;
        let reachable_sites = 6 - u32::from(far.is_some());
        assert_eq!(baseline.healthy, reachable_sites * 5 - ordered_reachable);
        assert_eq!(baseline.failed, 0);
    }

    #[test]
    fn a_crashed_node_loses_what_it_was_doing_but_keeps_an_installed_patch() {
        let mut n = PatchNode {
            stage: Stage::Installing,
            installed: false,
            touched: true,
            failed: false,
            epoch: 2,
            published: 1,
        };
        n.crash();
        assert_eq!((n.stage, n.installed, n.epoch), (Stage::Idle, false, 3));
        n.stage = Stage::Baking;
        n.installed = true;
        n.crash();
        assert_eq!((n.stage, n.installed, n.epoch), (Stage::Idle, true, 4));
    }
}
