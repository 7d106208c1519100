//! A patch rollout as one site's relay sees it, and the site's own gate.
//!
//! The hubs send each relay the part of a rollout that concerns its site
//! ([`SiteOrder`]): the signed patch, the site's nodes of each wave, how
//! many waves have started, the gate's margin and whether to roll back on
//! a failed gate. The relay keeps it on disk (`rollout.state` next to the
//! outage buffer), tells its nodes in gossip what to do
//! ([`SiteRollout::gossip_order`]) and judges its patched nodes itself on
//! every look at the site ([`SiteRollout::judge`]): when the site's gate
//! fails and automatic rollback is on, it rolls its own site back at once,
//! whether or not a hub can be reached, and reports that as an event when
//! the uplink allows. A relay never starts a wave by itself: only an
//! order from a hub adds nodes to the install list, so a site cut off
//! mid-wave finishes that wave or rolls it back, and nothing more.
//!
//! A local rollback is final for that run: a later order of the same run
//! cannot make the site install again (a new run can).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trellis_node::patch::SignedPatch;
use trellis_node::patchstate::{NodePatch, OrderAction, PatchOrder};
use trellis_node::site::{SiteView, Status};
use trellis_node::waves::{GateCounts, GateVerdict, gate_now};

use crate::summarise::is_node;
use crate::summary::PatchTally;

/// Hub → relay: a rollout as far as one site goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteOrder {
    /// The rollout's number at the hubs.
    pub run: u64,
    pub patch: Box<SignedPatch>,
    /// The site's nodes in each wave of the plan, by wave index (empty
    /// where a wave has none of them).
    pub waves: Vec<Vec<String>>,
    /// Waves started so far: the nodes of `waves[..started]` install.
    pub started: usize,
    pub action: OrderAction,
    /// The gate's margin over the baseline's failure ratio (0 to 1).
    pub max_failure: f64,
    /// Roll the site back when its gate fails (else only stop).
    pub auto_rollback: bool,
}

/// The rollout a relay holds, and what it decided on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRollout {
    pub order: SiteOrder,
    /// Why the relay rolled its site back by itself, if it did.
    pub local: Option<String>,
}

impl SiteRollout {
    /// The patch's id (what nodes fetch).
    pub fn patch_id(&self) -> [u8; 32] {
        self.order.patch.id()
    }

    /// Takes a hub's order. A newer run replaces what is held; the same
    /// run updates the started waves and the action, except that a site
    /// rolled back (locally or by an earlier order) stays rolled back; an
    /// older run is ignored. Returns whether anything changed.
    pub fn take(held: &mut Option<SiteRollout>, order: SiteOrder) -> bool {
        match held {
            Some(h) if order.run < h.order.run => false,
            Some(h) if order.run == h.order.run => {
                let mut next = order;
                if h.order.action == OrderAction::Rollback || h.local.is_some() {
                    next.action = OrderAction::Rollback;
                }
                next.started = next.started.max(h.order.started);
                if next == h.order {
                    return false;
                }
                h.order = next;
                true
            }
            _ => {
                *held = Some(SiteRollout { order, local: None });
                true
            }
        }
    }

    /// Whether the site is told to roll back (by a hub or by itself).
    pub fn rolling_back(&self) -> bool {
        self.order.action == OrderAction::Rollback || self.local.is_some()
    }

    /// The site's nodes whose wave has started.
    pub fn patched(&self) -> BTreeSet<&str> {
        self.order
            .waves
            .iter()
            .take(self.order.started)
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// What the relay publishes to its nodes.
    pub fn gossip_order(&self) -> PatchOrder {
        let rollback = self.rolling_back();
        PatchOrder {
            run: self.order.run,
            patch: self.patch_id(),
            action: if rollback {
                OrderAction::Rollback
            } else {
                OrderAction::Install
            },
            nodes: if rollback {
                Vec::new()
            } else {
                self.patched().into_iter().map(str::to_owned).collect()
            },
        }
    }

    /// The site's patched nodes as the gate counts them, the baseline (the
    /// site's other alive nodes: critical is a failure) and the site's
    /// gate verdict.
    pub fn judge(&self, view: &SiteView, relay: &str) -> (PatchTally, GateVerdict) {
        let patched = self.patched();
        let id = self.patch_id();
        let mut states = BTreeMap::new();
        let mut counts = GateCounts::default();
        let mut baseline = GateCounts::default();
        for m in view.current_members() {
            if !is_node(m, relay) {
                continue;
            }
            let mine = m
                .patch
                .state
                .as_ref()
                .filter(|s| s.run == self.order.run && s.patch == id);
            if patched.contains(m.name.as_str()) {
                match mine.and_then(NodePatch::judged) {
                    Some(true) => counts.healthy += 1,
                    Some(false) => counts.failed += 1,
                    None => counts.pending += 1,
                }
            } else if m.alive {
                if m.health.status == Status::Critical {
                    baseline.failed += 1;
                } else {
                    baseline.healthy += 1;
                }
            }
            if let Some(s) = mine {
                states.insert(m.name.clone(), (s.state, s.failed));
            }
        }
        // Patched nodes the site does not list (gone, or not joined yet)
        // are pending: nothing is known of them.
        let listed = u32::try_from(patched.len()).unwrap_or(u32::MAX);
        let seen = counts.healthy + counts.failed + counts.pending;
        counts.pending += listed.saturating_sub(seen);
        let verdict = gate_now(counts, baseline, self.order.max_failure);
        let tally = PatchTally {
            run: self.order.run,
            patch: id,
            action: if self.rolling_back() {
                OrderAction::Rollback
            } else {
                OrderAction::Install
            },
            started: u32::try_from(self.order.started).unwrap_or(u32::MAX),
            states,
            baseline_healthy: baseline.healthy,
            baseline_failed: baseline.failed,
            local: self.local.clone(),
        };
        (tally, verdict)
    }

    /// Applies the site's gate: when it fails while the site is installing
    /// and automatic rollback is on, the site rolls back and the reason is
    /// returned (to report). Otherwise nothing changes.
    pub fn enforce(&mut self, verdict: &GateVerdict, patched: &GateCounts) -> Option<String> {
        if self.rolling_back() || !self.order.auto_rollback || verdict.pass != Some(false) {
            return None;
        }
        let reason = format!(
            "site gate failed: {} of {} patched nodes failed ({:.1} %), over the threshold of {:.1} % (baseline {:.1} % + margin)",
            patched.failed,
            patched.healthy + patched.failed + patched.pending,
            verdict.patched_failure_ratio * 100.0,
            verdict.threshold * 100.0,
            verdict.baseline_failure_ratio * 100.0,
        );
        self.local = Some(reason.clone());
        Some(reason)
    }
}

/// Gate counts of a tally's patched nodes: those in `patched`, judged by
/// their state; a patched node with no state is pending.
pub fn counts_of(tally: &PatchTally, patched: &BTreeSet<&str>) -> GateCounts {
    let mut c = GateCounts::default();
    for name in patched {
        match tally
            .states
            .get(*name)
            .and_then(|&(state, failed)| trellis_node::patchstate::judged(state, failed))
        {
            Some(true) => c.healthy += 1,
            Some(false) => c.failed += 1,
            None => c.pending += 1,
        }
    }
    c
}

/// Where a relay keeps its rollout: next to its outage buffer.
pub fn rollout_path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("rollout.state")
}

/// The rollout kept at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<SiteRollout>, String> {
    match std::fs::read(path) {
        Ok(bytes) => postcard::from_bytes(&bytes).map(Some).map_err(|e| {
            format!(
                "{} is not a rollout this relay can read: {e}; move it away to start without it",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Keeps `rollout` at `path` durably (written aside, then renamed).
pub fn save(path: &Path, rollout: &SiteRollout) -> Result<(), String> {
    let bytes = postcard::to_stdvec(rollout).expect("rollouts serialise");
    trellis_node::apply::write_atomic(path, &bytes, 0o600)
        .map_err(|e| format!("cannot keep the rollout in {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use trellis_node::patch::SignedPatch;
    use trellis_node::patchstate::PatchState;

    use super::*;
    use crate::summarise::tests::member;

    fn order(run: u64, started: usize, action: OrderAction) -> SiteOrder {
        SiteOrder {
            run,
            patch: Box::new(SignedPatch {
                manifest: vec![1, 2, 3],
                signature: vec![],
                operator_cert: vec![],
            }),
            waves: vec![vec!["n0".into()], vec!["n1".into(), "n2".into()], vec![]],
            started,
            action,
            max_failure: 0.0,
            auto_rollback: true,
        }
    }

    fn view(r: &SiteRollout, states: &[(&str, PatchState, bool)]) -> SiteView {
        let members = ["n0", "n1", "n2", "n3"]
            .iter()
            .map(|n| {
                let mut m = member(n, true, Status::Passing, &[]);
                if let Some((_, s, f)) = states.iter().find(|(name, _, _)| name == n) {
                    m.patch.state = Some(NodePatch {
                        run: r.order.run,
                        patch: r.patch_id(),
                        state: *s,
                        failed: *f,
                        detail: String::new(),
                    });
                }
                m
            })
            .collect();
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    #[test]
    fn only_the_started_waves_nodes_are_told_to_install() {
        let mut held = None;
        assert!(SiteRollout::take(
            &mut held,
            order(1, 1, OrderAction::Install)
        ));
        let r = held.as_ref().unwrap();
        assert_eq!(r.gossip_order().nodes, ["n0"]);
        assert!(SiteRollout::take(
            &mut held,
            order(1, 2, OrderAction::Install)
        ));
        assert_eq!(
            held.as_ref().unwrap().gossip_order().nodes,
            ["n0", "n1", "n2"]
        );
        // The same order again changes nothing; an older run is ignored.
        assert!(!SiteRollout::take(
            &mut held,
            order(1, 2, OrderAction::Install)
        ));
        assert!(!SiteRollout::take(
            &mut held,
            order(0, 3, OrderAction::Install)
        ));
    }

    #[test]
    fn a_failed_site_gate_rolls_the_site_back_for_good_in_that_run() {
        let mut held = None;
        SiteRollout::take(&mut held, order(1, 2, OrderAction::Install));
        let mut r = held.take().unwrap();
        let v = view(
            &r,
            &[
                ("n0", PatchState::Healthy, false),
                ("n1", PatchState::Baking, false),
            ],
        );
        let (tally, verdict) = r.judge(&v, "relay");
        let counts = counts_of(&tally, &r.patched());
        assert_eq!((counts.healthy, counts.failed, counts.pending), (1, 0, 2));
        assert_eq!(tally.baseline_healthy, 1, "n3 is not patched");
        assert_eq!(r.enforce(&verdict, &counts), None, "nothing failed yet");

        let v = view(
            &r,
            &[
                ("n0", PatchState::Healthy, false),
                ("n1", PatchState::Failed, true),
            ],
        );
        let (tally, verdict) = r.judge(&v, "relay");
        let counts = counts_of(&tally, &r.patched());
        let why = r.enforce(&verdict, &counts).expect("the gate failed");
        assert!(why.contains("1 of 3 patched nodes failed"), "{why}");
        assert_eq!(r.gossip_order().action, OrderAction::Rollback);
        assert!(r.gossip_order().nodes.is_empty());
        // A hub's later order of the same run cannot undo it.
        let mut held = Some(r);
        SiteRollout::take(&mut held, order(1, 3, OrderAction::Install));
        assert!(held.as_ref().unwrap().rolling_back());
        // A new run starts afresh.
        SiteRollout::take(&mut held, order(2, 1, OrderAction::Install));
        assert!(!held.as_ref().unwrap().rolling_back());
    }

    #[test]
    fn without_automatic_rollback_the_site_only_reports() {
        let mut held = None;
        let mut o = order(1, 1, OrderAction::Install);
        o.auto_rollback = false;
        SiteRollout::take(&mut held, o);
        let mut r = held.unwrap();
        let v = view(&r, &[("n0", PatchState::Failed, true)]);
        let (tally, verdict) = r.judge(&v, "relay");
        assert_eq!(verdict.pass, Some(false));
        let counts = counts_of(&tally, &r.patched());
        assert_eq!(r.enforce(&verdict, &counts), None);
        assert!(!r.rolling_back());
    }

    #[test]
    fn a_rollout_survives_a_restart_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = rollout_path(&dir.path().join("buffer.db"));
        assert_eq!(load(&path).unwrap(), None);
        let mut held = None;
        SiteRollout::take(&mut held, order(3, 1, OrderAction::Install));
        save(&path, held.as_ref().unwrap()).unwrap();
        assert_eq!(load(&path).unwrap(), held);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path).unwrap_err().contains("move it away"));
    }
}
