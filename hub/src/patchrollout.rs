//! Patch rollouts at the hubs: the plan, its state, and the decision to
//! start the next wave, halt or roll back. Pure: the driver feeds it the
//! sites' tallies and the time, and writes what it returns to the log.
//!
//! # A rollout's life
//! `trellis rollout start` hands a hub the patch, the wave list and the
//! nodes the patch's selector picks; the hub plans the waves
//! ([`trellis_node::waves::plan_waves`], salted with the patch's id, so the
//! same rollout always takes the same nodes in the same order) and writes
//! revision 0 of the [`RolloutRecord`] to the replicated log, naming itself
//! the rollout's driver. Every hub sends each relay it serves the part of
//! the plan that concerns its site ([`site_order`]); relays stage the
//! patch at once, so artifacts cross the WAN before their wave starts.
//!
//! The driver hub then looks at the sites' tallies every second
//! ([`step`]):
//! - **Running**: the current wave's gate compares the patched nodes (every
//!   node of the waves started so far) with the baseline (every alive node
//!   not patched; critical is a failure). It fails as soon as the patched
//!   failures exceed the baseline's ratio plus `max_failure` even if every
//!   pending node turned out healthy ([`trellis_node::waves::gate_now`]);
//!   it passes once no patched node is pending and the wave has run for the
//!   bake time. A pass starts the next wave, or ends the rollout as done.
//!   A failed gate, or a site that rolled itself back, halts the rollout,
//!   and with automatic rollback turns it to rolling back.
//! - **RollingBack**: relays tell every patched node to roll back; once no
//!   patched node holds the patch any more the rollout is rolled back.
//! - **Paused**, **Halted**, **Done**, **RolledBack**: nothing moves.
//!
//! Each change is a new revision of the record in the log, so every hub
//! shows the same status and tells its relays the same thing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use trellis_node::patchstate::{OrderAction, PatchState, judged};
use trellis_node::waves::{GateCounts, GateVerdict, NodeRef, Wave, WaveSpec, gate_now};
use trellis_relay::summary::{PatchTally, SiteKey, SiteSummary};

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    /// An operator paused it: the current wave's nodes carry on, no new
    /// wave starts.
    Paused,
    /// A gate failed with automatic rollback off: nothing moves until an
    /// operator aborts (rolls back) or resumes.
    Halted,
    /// Every patched node is told to roll back.
    RollingBack,
    /// Every patched node rolled back (or never got the patch).
    RolledBack,
    /// Every wave passed its gate.
    Done,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Halted => "halted",
            RunState::RollingBack => "rolling-back",
            RunState::RolledBack => "rolled-back",
            RunState::Done => "done",
        }
    }

    /// Whether the rollout may still change nodes (so no other may start).
    pub fn active(self) -> bool {
        matches!(
            self,
            RunState::Running | RunState::Paused | RunState::Halted | RunState::RollingBack
        )
    }
}

/// A gate's numbers, as kept and shown.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateNumbers {
    pub wave: usize,
    pub patched: GateCounts,
    pub baseline: GateCounts,
    pub verdict: GateVerdict,
}

impl GateNumbers {
    /// One line: `2 of 3 patched nodes failed (66.7 %); threshold 5.0 %
    /// (baseline 0.0 % + margin)`.
    pub fn describe(&self) -> String {
        let p = self.patched;
        format!(
            "{} of {} patched nodes failed ({:.1} %), {} pending; threshold {:.1} % (baseline {:.1} % of {} unpatched nodes + margin)",
            p.failed,
            p.healthy + p.failed + p.pending,
            self.verdict.patched_failure_ratio * 100.0,
            p.pending,
            self.verdict.threshold * 100.0,
            self.verdict.baseline_failure_ratio * 100.0,
            self.baseline.healthy + self.baseline.failed,
        )
    }
}

/// A rollout as the log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub run: u64,
    pub revision: u64,
    /// The patch's id (hex), name and version.
    pub patch: String,
    pub name: String,
    pub version: String,
    /// The wave list as given (`canary,1site,10%,100%`).
    pub spec: String,
    pub waves: Vec<Wave>,
    /// How long a wave runs before its gate may pass, in ms.
    pub bake_ms: u64,
    /// The gate's margin (0 to 1).
    pub max_failure: f64,
    pub auto_rollback: bool,
    /// The operator who started it.
    pub started_by: String,
    /// The hub that advances it.
    pub driver: String,
    pub started_ms: u64,
    pub state: RunState,
    /// Waves started (the nodes of `waves[..started]` are patched).
    pub started: usize,
    /// When each started wave started, and when each passed (ms).
    pub wave_started_ms: Vec<u64>,
    pub wave_passed_ms: Vec<u64>,
    /// Why it halted or rolls back.
    pub reason: Option<String>,
    /// The numbers of the gate that failed, if one did.
    pub failed_gate: Option<GateNumbers>,
    /// When it reached its state (ms).
    pub changed_ms: u64,
}

/// What an operator asks of a running rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Control {
    Pause,
    Resume,
    /// Stop and roll back every patched node.
    Abort,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Pause => "pause",
            Control::Resume => "resume",
            Control::Abort => "abort",
        }
    }
}

/// Why a control was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("rollout {run} is {state}; only a running rollout can be paused")]
    NotRunning { run: u64, state: &'static str },
    #[error("rollout {run} is {state}; only a paused or halted rollout can be resumed")]
    NotPaused { run: u64, state: &'static str },
    #[error("rollout {run} is {state}: it changes no node any more")]
    Over { run: u64, state: &'static str },
}

impl RolloutRecord {
    /// The first revision of a rollout.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        run: u64,
        patch: (&str, &str, &str),
        spec: &str,
        waves: Vec<Wave>,
        bake_ms: u64,
        max_failure: f64,
        auto_rollback: bool,
        started_by: &str,
        driver: &str,
        now_ms: u64,
    ) -> Self {
        let (id, name, version) = patch;
        RolloutRecord {
            run,
            revision: 0,
            patch: id.to_owned(),
            name: name.to_owned(),
            version: version.to_owned(),
            spec: spec.to_owned(),
            state: if waves.is_empty() {
                RunState::Done
            } else {
                RunState::Running
            },
            started: usize::from(!waves.is_empty()),
            wave_started_ms: if waves.is_empty() {
                Vec::new()
            } else {
                vec![now_ms]
            },
            waves,
            bake_ms,
            max_failure,
            auto_rollback,
            started_by: started_by.to_owned(),
            driver: driver.to_owned(),
            started_ms: now_ms,
            wave_passed_ms: Vec::new(),
            reason: None,
            failed_gate: None,
            changed_ms: now_ms,
        }
    }

    /// What relays tell their nodes.
    pub fn action(&self) -> OrderAction {
        match self.state {
            RunState::RollingBack | RunState::RolledBack => OrderAction::Rollback,
            _ => OrderAction::Install,
        }
    }

    /// Every node of the started waves.
    pub fn patched(&self) -> impl Iterator<Item = &NodeRef> {
        self.waves.iter().take(self.started).flat_map(|w| &w.nodes)
    }

    /// The sites the plan touches.
    pub fn sites(&self) -> BTreeSet<SiteKey> {
        self.waves
            .iter()
            .flat_map(|w| &w.nodes)
            .map(|n| (n.region.clone(), n.site.clone()))
            .collect()
    }

    fn next(&self, now_ms: u64) -> RolloutRecord {
        let mut r = self.clone();
        r.revision += 1;
        r.changed_ms = now_ms;
        r
    }

    /// The record after an operator's control.
    pub fn control(&self, c: Control, who: &str, now_ms: u64) -> Result<Self, ControlError> {
        let (run, state) = (self.run, self.state.as_str());
        let mut r = self.next(now_ms);
        match c {
            Control::Pause if self.state == RunState::Running => r.state = RunState::Paused,
            Control::Pause => return Err(ControlError::NotRunning { run, state }),
            Control::Resume if matches!(self.state, RunState::Paused | RunState::Halted) => {
                r.state = RunState::Running;
                r.reason = None;
                r.failed_gate = None;
            }
            Control::Resume => return Err(ControlError::NotPaused { run, state }),
            Control::Abort if self.state.active() && self.state != RunState::RollingBack => {
                r.state = RunState::RollingBack;
                r.reason = Some(format!("aborted by {who}"));
            }
            Control::Abort => return Err(ControlError::Over { run, state }),
        }
        Ok(r)
    }
}

/// The part of `r` that concerns one site: its nodes per wave. `None`
/// when the plan has none of its nodes.
pub fn site_waves(r: &RolloutRecord, region: &str, site: &str) -> Option<Vec<Vec<String>>> {
    let waves: Vec<Vec<String>> = r
        .waves
        .iter()
        .map(|w| {
            w.nodes
                .iter()
                .filter(|n| n.region == region && n.site == site)
                .map(|n| n.name.clone())
                .collect()
        })
        .collect();
    waves.iter().any(|w| !w.is_empty()).then_some(waves)
}

/// A site's latest tally of this run, if its summary carries one.
fn tally_of<'a>(r: &RolloutRecord, s: &'a SiteSummary) -> Option<&'a PatchTally> {
    s.patch
        .as_ref()
        .filter(|t| t.run == r.run && crate::log::hex(&t.patch) == r.patch)
}

/// The gate of the rollout's current wave over every site's summary.
pub fn judge(r: &RolloutRecord, sites: &[SiteSummary]) -> GateNumbers {
    let by_site: BTreeMap<SiteKey, &SiteSummary> = sites
        .iter()
        .map(|s| ((s.region.clone(), s.site.clone()), s))
        .collect();
    let mut patched = GateCounts::default();
    for n in r.patched() {
        let state = by_site
            .get(&(n.region.clone(), n.site.clone()))
            .and_then(|s| tally_of(r, s))
            .and_then(|t| t.states.get(&n.name));
        match state.and_then(|&(state, failed)| judged(state, failed)) {
            Some(true) => patched.healthy += 1,
            Some(false) => patched.failed += 1,
            None => patched.pending += 1,
        }
    }
    let mut patched_at: BTreeMap<SiteKey, u32> = BTreeMap::new();
    for n in r.patched() {
        *patched_at
            .entry((n.region.clone(), n.site.clone()))
            .or_default() += 1;
    }
    let mut baseline = GateCounts::default();
    for s in sites {
        match tally_of(r, s) {
            Some(t) => {
                baseline.healthy += t.baseline_healthy;
                baseline.failed += t.baseline_failed;
            }
            None => {
                // The relay has not reported on this run yet: its alive
                // nodes less those the plan patched, all counted healthy
                // unless critical.
                let key = (s.region.clone(), s.site.clone());
                let patched = patched_at.get(&key).copied().unwrap_or(0);
                baseline.failed += s.by_status.critical;
                baseline.healthy += s
                    .nodes_alive
                    .saturating_sub(s.by_status.critical)
                    .saturating_sub(patched);
            }
        }
    }
    GateNumbers {
        wave: r.started.saturating_sub(1),
        patched,
        baseline,
        verdict: gate_now(patched, baseline, r.max_failure),
    }
}

/// The driver's decision: the next revision of the rollout, or `None` when
/// nothing changes. `sites` are the latest summaries of every site the hub
/// knows; a site whose relay rolled it back by itself halts the rollout
/// like a failed gate.
pub fn step(r: &RolloutRecord, sites: &[SiteSummary], now_ms: u64) -> Option<RolloutRecord> {
    match r.state {
        RunState::Running => {}
        RunState::RollingBack => {
            let holding = r.patched().any(|n| {
                sites
                    .iter()
                    .find(|s| s.region == n.region && s.site == n.site)
                    .and_then(|s| tally_of(r, s))
                    .and_then(|t| t.states.get(&n.name))
                    .is_some_and(|&(state, _)| {
                        !matches!(state, PatchState::RolledBack | PatchState::RollbackFailed)
                    })
            });
            if holding {
                return None;
            }
            let mut next = r.next(now_ms);
            next.state = RunState::RolledBack;
            return Some(next);
        }
        _ => return None,
    }
    let local = sites.iter().find_map(|s| {
        tally_of(r, s)
            .and_then(|t| t.local.as_ref())
            .map(|why| format!("site {}/{} rolled itself back: {why}", s.region, s.site))
    });
    let gate = judge(r, sites);
    if local.is_some() || gate.verdict.pass == Some(false) {
        let mut next = r.next(now_ms);
        next.failed_gate = Some(gate);
        let reason = local.unwrap_or_else(|| {
            format!(
                "wave {} ({}) failed its gate: {}",
                gate.wave,
                spec_name(r.waves[gate.wave].spec),
                gate.describe()
            )
        });
        next.reason = Some(reason);
        next.state = if r.auto_rollback {
            RunState::RollingBack
        } else {
            RunState::Halted
        };
        return Some(next);
    }
    let started_ms = r.wave_started_ms.last().copied().unwrap_or(r.started_ms);
    if gate.verdict.pass == Some(true) && now_ms.saturating_sub(started_ms) >= r.bake_ms {
        let mut next = r.next(now_ms);
        next.wave_passed_ms.push(now_ms);
        if r.started < r.waves.len() {
            next.started += 1;
            next.wave_started_ms.push(now_ms);
        } else {
            next.state = RunState::Done;
        }
        return Some(next);
    }
    None
}

/// A wave spec as written.
pub fn spec_name(s: WaveSpec) -> String {
    match s {
        WaveSpec::Canary => "canary".to_owned(),
        WaveSpec::Sites(n) => format!("{n}site"),
        WaveSpec::Percent(p) => format!("{p}%"),
    }
}

/// One wave's progress, for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveProgress {
    pub index: usize,
    pub spec: String,
    pub nodes: u32,
    pub sites: u32,
    /// `pending`, `running`, `passed`.
    pub phase: String,
    pub counts: GateCounts,
    pub rolled_back: u32,
}

/// One site's progress, for status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteProgress {
    pub region: String,
    pub site: String,
    /// Nodes of the plan at the site, and of them patched so far.
    pub planned: u32,
    pub patched: u32,
    /// Patched nodes by state (as the site's relay last reported).
    pub states: BTreeMap<String, u32>,
    /// What the relay does: `install` or `rollback`; `None` if it has not
    /// reported this run.
    pub action: Option<OrderAction>,
    /// Why the relay rolled the site back by itself.
    pub local: Option<String>,
}

/// The waves' and sites' progress from the sites' summaries.
pub fn progress(
    r: &RolloutRecord,
    sites: &[SiteSummary],
) -> (Vec<WaveProgress>, Vec<SiteProgress>) {
    let by_site: BTreeMap<SiteKey, &SiteSummary> = sites
        .iter()
        .map(|s| ((s.region.clone(), s.site.clone()), s))
        .collect();
    let state_of = |n: &NodeRef| {
        by_site
            .get(&(n.region.clone(), n.site.clone()))
            .and_then(|s| tally_of(r, s))
            .and_then(|t| t.states.get(&n.name).copied())
    };
    let waves = r
        .waves
        .iter()
        .map(|w| {
            let mut counts = GateCounts::default();
            let mut rolled_back = 0;
            for n in &w.nodes {
                let st = state_of(n);
                if matches!(st, Some((PatchState::RolledBack, _))) {
                    rolled_back += 1;
                }
                match st.and_then(|(s, f)| judged(s, f)) {
                    Some(true) => counts.healthy += 1,
                    Some(false) => counts.failed += 1,
                    None => counts.pending += 1,
                }
            }
            let sites: BTreeSet<(&str, &str)> = w
                .nodes
                .iter()
                .map(|n| (n.region.as_str(), n.site.as_str()))
                .collect();
            WaveProgress {
                index: w.index,
                spec: spec_name(w.spec),
                nodes: w.nodes.len() as u32,
                sites: sites.len() as u32,
                phase: if w.index < r.wave_passed_ms.len() {
                    "passed"
                } else if w.index < r.started {
                    "running"
                } else {
                    "pending"
                }
                .to_owned(),
                counts,
                rolled_back,
            }
        })
        .collect();
    let patched: BTreeSet<&NodeRef> = r.patched().collect();
    let mut per_site: BTreeMap<SiteKey, SiteProgress> = BTreeMap::new();
    for n in r.waves.iter().flat_map(|w| &w.nodes) {
        let key = (n.region.clone(), n.site.clone());
        let tally = by_site.get(&key).and_then(|s| tally_of(r, s));
        let p = per_site.entry(key).or_insert_with(|| SiteProgress {
            region: n.region.clone(),
            site: n.site.clone(),
            planned: 0,
            patched: 0,
            states: BTreeMap::new(),
            action: tally.map(|t| t.action),
            local: tally.and_then(|t| t.local.clone()),
        });
        p.planned += 1;
        if patched.contains(n) {
            p.patched += 1;
            let st = state_of(n).map_or("waiting", |(s, _)| s.as_str());
            *p.states.entry(st.to_owned()).or_default() += 1;
        }
    }
    (waves, per_site.into_values().collect())
}

#[cfg(test)]
mod tests {
    use trellis_node::waves::{parse_waves, plan_waves};

    use super::*;

    fn fleet() -> Vec<NodeRef> {
        (0..3)
            .flat_map(|s| {
                (0..2).map(move |n| NodeRef {
                    name: format!("s{s}-n{n}"),
                    region: "eu".into(),
                    site: format!("s{s}"),
                })
            })
            .collect()
    }

    fn record(auto: bool) -> RolloutRecord {
        let spec = "canary,1site,100%";
        let waves = plan_waves(&parse_waves(spec).unwrap(), &fleet(), b"salt");
        RolloutRecord::start(
            1,
            (&"ab".repeat(32), "fix", "1"),
            spec,
            waves,
            1_000,
            0.0,
            auto,
            "alice",
            "hub-1",
            0,
        )
    }

    /// Summaries of the three sites where the nodes in `states` report
    /// those states for `r`'s run.
    fn sites(r: &RolloutRecord, states: &[(&str, PatchState, bool)]) -> Vec<SiteSummary> {
        (0..3)
            .map(|s| {
                let site = format!("s{s}");
                let mut sum = SiteSummary::empty("eu", &site, "relay", 1);
                sum.nodes_alive = 2;
                sum.nodes_total = 2;
                let mut t = PatchTally {
                    run: r.run,
                    patch: [0xab; 32],
                    action: r.action(),
                    started: r.started as u32,
                    states: BTreeMap::new(),
                    baseline_healthy: 0,
                    baseline_failed: 0,
                    local: None,
                };
                for (n, st, f) in states {
                    if n.starts_with(&format!("{site}-")) {
                        t.states.insert((*n).to_owned(), (*st, *f));
                    }
                }
                sum.patch = Some(t);
                sum
            })
            .collect()
    }

    #[test]
    fn a_healthy_canary_starts_the_next_wave_only_after_the_bake_time() {
        let r = record(true);
        let canary = r.waves[0].nodes[0].name.clone();
        let healthy = sites(&r, &[(&canary, PatchState::Healthy, false)]);
        assert_eq!(step(&r, &healthy, 500), None, "still baking");
        let next = step(&r, &healthy, 1_000).unwrap();
        assert_eq!(next.started, 2);
        assert_eq!(next.revision, 1);
        assert_eq!(next.wave_passed_ms, [1_000]);
        assert_eq!(next.state, RunState::Running);
        // The first-site wave is pending until its nodes report.
        assert_eq!(step(&next, &healthy, 5_000), None);
    }

    #[test]
    fn a_failed_canary_rolls_back_and_says_why_with_the_numbers() {
        let r = record(true);
        let canary = r.waves[0].nodes[0].name.clone();
        let bad = sites(&r, &[(&canary, PatchState::Failed, true)]);
        let next = step(&r, &bad, 10).unwrap();
        assert_eq!(next.state, RunState::RollingBack);
        assert_eq!(next.action(), OrderAction::Rollback);
        let why = next.reason.clone().unwrap();
        assert!(why.contains("wave 0 (canary) failed its gate"), "{why}");
        assert!(
            why.contains("1 of 1 patched nodes failed (100.0 %)"),
            "{why}"
        );
        let gate = next.failed_gate.unwrap();
        assert_eq!(gate.patched.failed, 1);
        assert_eq!(gate.verdict.pass, Some(false));
        // Rolled back once the canary says so.
        assert_eq!(step(&next, &bad, 20), None);
        let back = sites(&r, &[(&canary, PatchState::RolledBack, true)]);
        assert_eq!(step(&next, &back, 30).unwrap().state, RunState::RolledBack);
    }

    #[test]
    fn without_automatic_rollback_a_failed_gate_only_halts() {
        let r = record(false);
        let canary = r.waves[0].nodes[0].name.clone();
        let bad = sites(&r, &[(&canary, PatchState::Failed, true)]);
        let next = step(&r, &bad, 10).unwrap();
        assert_eq!(next.state, RunState::Halted);
        assert_eq!(next.action(), OrderAction::Install);
        assert_eq!(step(&next, &bad, 20), None);
        let aborted = next.control(Control::Abort, "alice", 30).unwrap();
        assert_eq!(aborted.state, RunState::RollingBack);
        assert_eq!(aborted.reason.as_deref(), Some("aborted by alice"));
    }

    #[test]
    fn a_site_that_rolled_itself_back_halts_the_rollout() {
        let r = record(true);
        let mut s = sites(&r, &[]);
        s[1].patch.as_mut().unwrap().local = Some("site gate failed".into());
        let next = step(&r, &s, 10).unwrap();
        assert_eq!(next.state, RunState::RollingBack);
        assert!(
            next.reason
                .unwrap()
                .contains("site eu/s1 rolled itself back")
        );
    }

    #[test]
    fn a_site_not_reporting_yet_counts_its_unpatched_alive_nodes_as_baseline() {
        let r = record(true);
        let canary_site = r.waves[0].nodes[0].site.clone();
        let mut s = sites(&r, &[]);
        for sum in &mut s {
            sum.patch = None;
            sum.by_status.critical = u32::from(sum.site != canary_site);
        }
        let g = judge(&r, &s);
        // Six alive nodes, the canary patched, one critical in each other site.
        assert_eq!(g.baseline.failed, 2);
        assert_eq!(g.baseline.healthy, 3);
        assert_eq!(g.patched.pending, 1);
    }

    #[test]
    fn controls_follow_the_state() {
        let r = record(true);
        let paused = r.control(Control::Pause, "alice", 1).unwrap();
        assert_eq!(paused.state, RunState::Paused);
        assert_eq!(step(&paused, &sites(&r, &[]), 10_000), None);
        assert!(matches!(
            paused.control(Control::Pause, "alice", 2),
            Err(ControlError::NotRunning { .. })
        ));
        let resumed = paused.control(Control::Resume, "alice", 3).unwrap();
        assert_eq!(resumed.state, RunState::Running);
        assert_eq!(resumed.revision, 2);
        let mut done = resumed.clone();
        done.state = RunState::Done;
        assert!(matches!(
            done.control(Control::Abort, "alice", 4),
            Err(ControlError::Over { .. })
        ));
    }

    #[test]
    fn every_wave_passed_ends_the_rollout_and_progress_counts_each_site() {
        let mut r = record(true);
        let all: Vec<(String, PatchState, bool)> = fleet()
            .into_iter()
            .map(|n| (n.name, PatchState::Healthy, false))
            .collect();
        let refs: Vec<(&str, PatchState, bool)> =
            all.iter().map(|(n, s, f)| (n.as_str(), *s, *f)).collect();
        let s = sites(&r, &refs);
        let mut t = 0;
        while r.state == RunState::Running {
            t += 1_000;
            r = step(&r, &s, t).unwrap();
        }
        assert_eq!(r.state, RunState::Done);
        assert_eq!(r.started, r.waves.len());
        assert_eq!(r.wave_passed_ms.len(), r.waves.len());
        let (waves, per_site) = progress(&r, &s);
        assert!(waves.iter().all(|w| w.phase == "passed"));
        assert_eq!(waves.iter().map(|w| w.counts.healthy).sum::<u32>(), 6);
        assert_eq!(per_site.len(), 3);
        assert!(
            per_site
                .iter()
                .all(|p| p.patched == 2 && p.states["healthy"] == 2)
        );
        assert_eq!(site_waves(&r, "eu", "s9"), None);
        assert_eq!(
            site_waves(&r, "eu", "s0").unwrap().concat().len(),
            2,
            "both nodes of s0, each in one wave"
        );
    }
}
