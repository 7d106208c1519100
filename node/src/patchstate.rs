//! How a patch rollout speaks inside a site: the relay's order to its
//! nodes, and each node's state, both in gossip.
//!
//! The relay publishes one order ([`keys::ORDER`]) for the rollout its
//! site takes part in: which patch, which run of it, and either `install`
//! with the names of the site's nodes whose wave has started, or
//! `rollback`. A node named in an `install` order fetches the patch from
//! the relay and installs it; every node that installed the patch in that
//! run rolls it back when the order says `rollback`. Each node publishes
//! the state of its last run ([`keys::STATE`]); the relay tallies those
//! for its local gate and its summary, and turns changes into events.
//!
//! Gossip keeps only the latest value of a key, so both are states, not a
//! queue, and a member that restarts or joins late acts on the current
//! one. Values are short text, parsed leniently: a value that cannot be
//! read is taken as absent.

use serde::{Deserialize, Serialize};

use crate::distribute::{MAX_RESULT_DETAIL, hex32, parse_hex32};

/// The gossip keys of patch rollouts.
pub mod keys {
    /// A relay's order: `RUN ID ACTION NAMES` (see [`super::PatchOrder`]).
    pub const ORDER: &str = "patch:order";
    /// A node's last run: `RUN ID STATE DETAIL…` (see
    /// [`super::NodePatch`]).
    pub const STATE: &str = "patch:state";
}

/// What the relay tells its site's nodes to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderAction {
    /// The named nodes install the patch (a node that already did, or
    /// rolled it back in this run, does nothing).
    Install,
    /// Every node that installed the patch in this run rolls it back.
    Rollback,
}

impl OrderAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderAction::Install => "install",
            OrderAction::Rollback => "rollback",
        }
    }
}

/// A relay's order to its site (`patch:order`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchOrder {
    /// The rollout's number at the hubs: a patch rolled out again after a
    /// rollback is a new run, so nodes install it again.
    pub run: u64,
    /// [`crate::patch::SignedPatch::id`]: what to fetch from the relay.
    pub patch: [u8; 32],
    pub action: OrderAction,
    /// For `install`: the site's nodes whose wave has started. Empty for
    /// `rollback`.
    pub nodes: Vec<String>,
}

impl PatchOrder {
    /// `RUN ID ACTION NAMES`, NAMES comma-separated or `-`.
    pub fn encode(&self) -> String {
        let names = if self.nodes.is_empty() {
            "-".to_owned()
        } else {
            self.nodes.join(",")
        };
        format!(
            "{} {} {} {names}",
            self.run,
            hex32(&self.patch),
            self.action.as_str()
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.splitn(4, ' ');
        let run = it.next()?.parse().ok()?;
        let patch = parse_hex32(it.next()?)?;
        let action = match it.next()? {
            "install" => OrderAction::Install,
            "rollback" => OrderAction::Rollback,
            _ => return None,
        };
        let names = it.next().unwrap_or("-");
        let nodes = if names == "-" || names.is_empty() {
            Vec::new()
        } else {
            names.split(',').map(str::to_owned).collect()
        };
        Some(PatchOrder {
            run,
            patch,
            action,
            nodes,
        })
    }

    /// Whether `node` is told to install.
    pub fn installs(&self, node: &str) -> bool {
        self.action == OrderAction::Install && self.nodes.iter().any(|n| n == node)
    }
}

/// Where a node is with a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchState {
    /// Fetching the manifest or the artifacts from the relay.
    Downloading,
    /// Running the `install` commands.
    Installing,
    /// Installed; the declared checks must stay passing until the bake
    /// time is over.
    Baking,
    /// Installed, and the checks passed for the whole bake time.
    Healthy,
    /// The download, the signature, an install command or a check failed.
    Failed,
    /// Running the `rollback` commands.
    RollingBack,
    /// Rolled back: the `rollback` commands succeeded.
    RolledBack,
    /// A `rollback` command failed: the machine needs a person.
    RollbackFailed,
}

impl PatchState {
    pub const ALL: [PatchState; 8] = [
        PatchState::Downloading,
        PatchState::Installing,
        PatchState::Baking,
        PatchState::Healthy,
        PatchState::Failed,
        PatchState::RollingBack,
        PatchState::RolledBack,
        PatchState::RollbackFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PatchState::Downloading => "downloading",
            PatchState::Installing => "installing",
            PatchState::Baking => "baking",
            PatchState::Healthy => "healthy",
            PatchState::Failed => "failed",
            PatchState::RollingBack => "rolling-back",
            PatchState::RolledBack => "rolled-back",
            PatchState::RollbackFailed => "rollback-failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        PatchState::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// How a gate counts a node in this state alone: `Some(true)`
    /// healthy, `Some(false)` failed, `None` pending. Rolling back or
    /// rolled back counts as healthy here; [`NodePatch::judged`] counts it
    /// as failed when the patch failed on the node first.
    pub fn judged(self) -> Option<bool> {
        match self {
            PatchState::Downloading | PatchState::Installing | PatchState::Baking => None,
            PatchState::Healthy => Some(true),
            PatchState::Failed | PatchState::RollbackFailed => Some(false),
            PatchState::RollingBack | PatchState::RolledBack => Some(true),
        }
    }
}

impl std::fmt::Display for PatchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's last run of a patch (`patch:state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePatch {
    pub run: u64,
    pub patch: [u8; 32],
    pub state: PatchState,
    /// Whether the patch failed on this node at some point in this run
    /// (stays set through the rollback that follows).
    pub failed: bool,
    /// Why it failed, or what a command said; at most
    /// [`MAX_RESULT_DETAIL`] bytes.
    pub detail: String,
}

impl NodePatch {
    /// `RUN ID STATE FAILED DETAIL…`, FAILED `0` or `1`.
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.run,
            hex32(&self.patch),
            self.state.as_str(),
            u8::from(self.failed),
            crate::distribute::cut(&self.detail, MAX_RESULT_DETAIL)
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.splitn(5, ' ');
        let run = it.next()?.parse().ok()?;
        let patch = parse_hex32(it.next()?)?;
        let state = PatchState::parse(it.next()?)?;
        let failed = match it.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let detail = crate::distribute::cut(it.next().unwrap_or(""), MAX_RESULT_DETAIL).to_owned();
        Some(NodePatch {
            run,
            patch,
            state,
            failed,
            detail,
        })
    }

    /// How a gate counts the node: `Some(true)` healthy, `Some(false)`
    /// failed, `None` still pending. A node whose patch failed counts as
    /// failed through its rollback; one rolled back only because others
    /// failed does not.
    pub fn judged(&self) -> Option<bool> {
        judged(self.state, self.failed)
    }
}

/// How a gate counts a node in `state` whose patch `failed` (or not) in
/// this run: see [`NodePatch::judged`].
pub fn judged(state: PatchState, failed: bool) -> Option<bool> {
    if failed {
        return Some(false);
    }
    state.judged()
}

/// What a member says about patches: a relay's order, a node's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberPatch {
    pub order: Option<PatchOrder>,
    pub state: Option<NodePatch>,
}

impl MemberPatch {
    pub fn from_kv<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut m = MemberPatch::default();
        for (k, v) in kv {
            match k {
                keys::ORDER => m.order = PatchOrder::parse(v),
                keys::STATE => m.state = NodePatch::parse(v),
                _ => {}
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn an_order_reads_back_as_written() {
        let o = PatchOrder {
            run: 3,
            patch: [7; 32],
            action: OrderAction::Install,
            nodes: vec!["web-1".into(), "web-2".into()],
        };
        assert_eq!(PatchOrder::parse(&o.encode()), Some(o.clone()));
        assert!(o.installs("web-2"));
        assert!(!o.installs("web-3"));
        let r = PatchOrder {
            action: OrderAction::Rollback,
            nodes: vec![],
            ..o
        };
        assert!(r.encode().ends_with(" rollback -"));
        assert_eq!(PatchOrder::parse(&r.encode()), Some(r.clone()));
        assert!(!r.installs("web-1"));
        for bad in [
            "",
            "3",
            "x 00 install a",
            &format!("3 {} burn a", "00".repeat(32)),
        ] {
            assert_eq!(PatchOrder::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_state_keeps_its_detail_and_counts_for_the_gate() {
        let s = NodePatch {
            run: 1,
            patch: [9; 32],
            state: PatchState::Failed,
            failed: true,
            detail: "check web critical: exit 2".into(),
        };
        assert_eq!(NodePatch::parse(&s.encode()), Some(s.clone()));
        assert_eq!(s.judged(), Some(false));
        let rolled = NodePatch {
            state: PatchState::RolledBack,
            ..s.clone()
        };
        assert_eq!(rolled.judged(), Some(false), "a failure stays a failure");
        let innocent = NodePatch {
            failed: false,
            ..rolled
        };
        assert_eq!(innocent.judged(), Some(true));
        let baking = NodePatch {
            state: PatchState::Baking,
            failed: false,
            ..s
        };
        assert_eq!(baking.judged(), None);
        for st in PatchState::ALL {
            assert_eq!(PatchState::parse(st.as_str()), Some(st));
        }
    }

    proptest! {
        #[test]
        fn no_value_makes_the_parsers_panic(s in ".{0,200}") {
            let _ = MemberPatch::from_kv([(keys::ORDER, s.as_str()), (keys::STATE, s.as_str())]);
        }
    }
}
