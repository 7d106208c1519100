//! The uplink protocol between a relay and a hub (ALPN `trellis-uplink/1`).
//!
//! The relay connects and opens one bidirectional *control* stream:
//!
//! ```text
//! relay → hub   Hello { stream }
//! hub → relay   Welcome { hub, acked }      acked: last seq of `stream` the hub has applied
//! relay → hub   Record { seq, .. }          seq > acked, increasing
//! hub → relay   Ack { through }             cumulative, sent after the hub applied `through`
//! ```
//!
//! `stream` names the relay's record stream (its outage buffer); sequence
//! numbers count within it, so a relay that lost its buffer starts a new
//! stream instead of being mistaken for a replay. The hub applies each
//! `(relay, stream, seq)` at most once and acks only what it applied, so a
//! relay resends everything after `acked` on reconnect and duplicates have no
//! effect. Sequence numbers may skip (a relay may drop records when its
//! buffer is full); they never go back.
//!
//! The hub may open bidirectional streams of its own on the same connection
//! for requests ([`Request`] → [`Response`]), e.g. the node list of the site.
//! A configuration version is pushed on one such stream:
//!
//! ```text
//! hub → relay   Request::ConfigOffer(offer)
//! relay → hub   Response::ConfigWanted(bool)    false: it holds that or newer
//! hub → relay   Request::ConfigBundle(bundle)   only if wanted
//! relay → hub   Response::ConfigStored(offer)   after the bundle is on disk
//! ```
//!
//! Every message is one frame of [`trellis_node::wire`], version
//! [`UPLINK_VERSION`], at most [`MAX_UPLINK_FRAME`] bytes.

use serde::{Deserialize, Serialize};
use trellis_node::bundle::SignedBundle;
use trellis_node::distribute::{ConfigResult, DriftNote, Offer, Outcome};
use trellis_node::site::{MemberView, Status};

use crate::summary::SiteSummary;

pub const UPLINK_VERSION: u8 = 1;
/// Largest uplink frame; a summary is bounded far below this.
pub const MAX_UPLINK_FRAME: usize = 4 << 20;

/// Relay → hub on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayMsg {
    Hello { stream: u64 },
    Record(Box<Record>),
}

/// Hub → relay on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HubMsg {
    Welcome { hub: String, acked: u64 },
    Ack { through: u64 },
}

/// One entry of a relay's record stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// The relay's wall clock when the record was made (ms since epoch).
    pub at_ms: u64,
    pub body: RecordBody,
}

impl Record {
    /// The last sequence number this record accounts for: its own, or the
    /// end of the range a gap stands for.
    pub fn until(&self) -> u64 {
        match &self.body {
            RecordBody::Gap(g) => g.until.max(self.seq),
            _ => self.seq,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RecordBody {
    Summary(Box<SiteSummary>),
    Event(Event),
    /// Records the relay had to drop before delivering them. It takes the
    /// place of the dropped records in the sequence: it stands for every
    /// seq from its own to `until`.
    Gap(Gap),
}

impl RecordBody {
    pub fn kind(&self) -> &'static str {
        match self {
            RecordBody::Summary(_) => "summary",
            RecordBody::Event(e) => e.kind(),
            RecordBody::Gap(_) => "gap",
        }
    }
}

/// What a relay dropped from its outage buffer, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The last seq this gap stands for (the first is the record's own).
    pub until: u64,
    /// Older summaries thinned out to keep the buffer small.
    pub summaries_downsampled: u64,
    /// Summaries dropped because the buffer was full.
    pub summaries_dropped: u64,
    /// Events dropped because the buffer was full.
    pub events_dropped: u64,
    /// Dropped events by kind (`node_died`, `check_changed`, …).
    pub event_kinds: std::collections::BTreeMap<String, u64>,
    /// Records found unreadable in the buffer file.
    pub unreadable: u64,
    /// Records an earlier hub acknowledged (so the relay deleted them) that
    /// this hub says it does not have.
    pub acknowledged_before: u64,
    /// When the dropped records were made (relay clock, ms since epoch).
    pub from_ms: u64,
    pub to_ms: u64,
}

impl Gap {
    /// Adds another gap's counts (for adjacent gaps merged into one).
    pub fn absorb(&mut self, other: &Gap) {
        self.summaries_downsampled += other.summaries_downsampled;
        self.summaries_dropped += other.summaries_dropped;
        self.events_dropped += other.events_dropped;
        for (k, n) in &other.event_kinds {
            *self.event_kinds.entry(k.clone()).or_default() += n;
        }
        self.unreadable += other.unreadable;
        self.acknowledged_before += other.acknowledged_before;
        self.from_ms = if self.from_ms == 0 {
            other.from_ms
        } else {
            self.from_ms.min(other.from_ms)
        };
        self.to_ms = self.to_ms.max(other.to_ms);
        self.until = self.until.max(other.until);
    }

    /// Records dropped in all.
    pub fn dropped(&self) -> u64 {
        self.summaries_downsampled
            + self.summaries_dropped
            + self.events_dropped
            + self.unreadable
            + self.acknowledged_before
    }
}

/// Something that happened in a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    NodeJoined {
        node: String,
    },
    NodeDied {
        node: String,
    },
    NodeRecovered {
        node: String,
    },
    CheckChanged {
        node: String,
        check: String,
        from: Status,
        to: Status,
        detail: String,
    },
    /// A node tried a configuration version: applied, failed in part, or
    /// refused.
    ConfigResult {
        node: String,
        result: ConfigResult,
    },
    /// A node found a managed file changed by hand.
    ConfigDrift {
        node: String,
        drift: DriftNote,
    },
    /// A node's patch state changed (downloading, installing, baking,
    /// healthy, failed, rolling back, rolled back).
    PatchState {
        node: String,
        state: trellis_node::patchstate::NodePatch,
    },
    /// The relay rolled its site back by itself: the site's gate failed.
    PatchSiteRolledBack {
        run: u64,
        patch: [u8; 32],
        reason: String,
    },
    /// The node was decommissioned (`trellis node decommission`): it left
    /// the site's views on purpose and is not dead.
    NodeLeft {
        node: String,
    },
    /// The node was dead longer than the relay's `retention.dead_node` and
    /// is no longer counted; reported once. It comes back if it returns.
    NodeReaped {
        node: String,
        dead_for_s: u64,
    },
}

impl Event {
    /// One line about a patch event (`None` for other events): what the
    /// hub shows and notes in the audit trail.
    pub fn patch_text(&self) -> Option<String> {
        match self {
            Event::PatchState { node, state } if state.detail.is_empty() => {
                Some(format!("{node}: patch run {} {}", state.run, state.state))
            }
            Event::PatchState { node, state } => Some(format!(
                "{node}: patch run {} {}: {}",
                state.run, state.state, state.detail
            )),
            Event::PatchSiteRolledBack { run, reason, .. } => Some(format!(
                "site rolled back patch run {run} by itself: {reason}"
            )),
            _ => None,
        }
    }

    /// One line about a configuration event (`None` for other events):
    /// what the hub shows and notes in the audit trail.
    pub fn config_text(&self) -> Option<String> {
        let short = |h: &str| h.get(..12).unwrap_or(h).to_owned();
        match self {
            Event::ConfigResult { node, result } => Some(match result.outcome {
                Outcome::Ok => format!("{node}: configuration v{} applied", result.version),
                Outcome::Failed => format!(
                    "{node}: configuration v{} failed: {}",
                    result.version, result.detail
                ),
                Outcome::Refused => format!(
                    "{node}: configuration v{} refused: {}",
                    result.version, result.detail
                ),
            }),
            Event::ConfigDrift { node, drift } => Some(format!(
                "{node}: {} changed by hand ({}): sha256 {} → {}, {}",
                drift.path,
                drift.action.as_str(),
                short(&drift.expected),
                drift.found.as_deref().map_or("missing".to_owned(), short),
                drift
                    .size
                    .map_or("no file".to_owned(), |s| format!("{s} bytes")),
            )),
            _ => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Event::NodeJoined { .. } => "node_joined",
            Event::NodeDied { .. } => "node_died",
            Event::NodeRecovered { .. } => "node_recovered",
            Event::CheckChanged { .. } => "check_changed",
            Event::ConfigResult { .. } => "config_result",
            Event::ConfigDrift { .. } => "config_drift",
            Event::PatchState { .. } => "patch_state",
            Event::PatchSiteRolledBack { .. } => "patch_site_rolled_back",
            Event::NodeLeft { .. } => "node_left",
            Event::NodeReaped { .. } => "node_reaped",
        }
    }
}

/// Hub → relay request on a hub-opened stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Every current member of the site with its health.
    Nodes,
    /// The hub's newest configuration version.
    ConfigOffer(Offer),
    /// The bundle offered, after the relay said it wants it.
    ConfigBundle(Box<SignedBundle>),
    /// A patch to keep for the site: the relay fetches the chunks of its
    /// artifacts it lacks, from the hub (`RelayRequest::Chunk`).
    PatchStage(Box<trellis_node::patch::SignedPatch>),
    /// A rollout as far as the relay's site goes: the relay stages the
    /// patch, keeps the order and tells its nodes once it holds every
    /// chunk.
    RolloutOrder(Box<crate::rollout::SiteOrder>),
    /// Every revocation in force, as the CA signed them: the relay keeps
    /// them (durably), enforces them and publishes them to its site. Sent
    /// when the relay connects and whenever the set changes.
    Revocations(Vec<trellis_node::revocation::SignedRevocation>),
}

/// Relay → hub request on a relay-opened stream of the uplink connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayRequest {
    /// One chunk of a patch artifact, by BLAKE3.
    Chunk([u8; 32]),
    /// A machine of the relay's site asks for a certificate with a join
    /// token ([`trellis_node::enrol`]).
    Enrol(trellis_node::enrol::EnrolRequest),
    /// A node of the relay's site, which presented its current certificate
    /// (checked by the relay against the CA and the revocation list),
    /// asks for a new one over a new key (`csr`).
    Renew { name: String, csr: Vec<u8> },
}

/// Hub → relay answer to a [`RelayRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayResponse {
    Chunk(Vec<u8>),
    /// The hub does not hold that chunk (yet: hubs copy chunks from each
    /// other).
    NotHere,
    Error(String),
    /// The certificate an enrolment was given (PEM), and the labels its
    /// token gives the machine.
    Issued {
        cert_pem: String,
        labels: std::collections::BTreeMap<String, String>,
    },
    /// An enrolment refused for good, and why.
    Refused(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Nodes(Vec<MemberView>),
    Error(String),
    /// Whether the relay wants the bundle offered.
    ConfigWanted(bool),
    /// The bundle is cached (durably) and offered to the site.
    ConfigStored(Offer),
    /// The patch is kept; this many chunks are being fetched.
    PatchStaged {
        fetching: u64,
    },
    /// The relay keeps the order (durably). `ready`: it holds every chunk
    /// and has told its nodes; otherwise it is still fetching and the hub
    /// sends the order again later.
    RolloutTaken {
        run: u64,
        ready: bool,
    },
    /// The relay holds and enforces this set (its
    /// `RevocationSet::digest`).
    RevocationsTaken {
        entries: u64,
        digest: String,
    },
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use trellis_node::wire;

    use super::*;
    use crate::summary::tests::arb_summary;

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            any::<u64>(),
            any::<u64>(),
            arb_summary(),
            "[a-z]{1,8}",
            0u8..4,
        )
            .prop_map(|(seq, at_ms, s, node, k)| Record {
                seq,
                at_ms,
                body: match k {
                    0 => RecordBody::Summary(Box::new(s)),
                    1 => RecordBody::Event(Event::NodeDied { node }),
                    2 => RecordBody::Event(Event::CheckChanged {
                        node,
                        check: "c".into(),
                        from: Status::Passing,
                        to: Status::Critical,
                        detail: "exit 2".into(),
                    }),
                    _ => RecordBody::Event(Event::NodeJoined { node }),
                },
            })
    }

    proptest! {
        #[test]
        fn relay_messages_round_trip(r in arb_record(), stream in any::<u64>()) {
            for m in [RelayMsg::Hello { stream }, RelayMsg::Record(Box::new(r.clone()))] {
                let f = wire::encode(UPLINK_VERSION, &m, MAX_UPLINK_FRAME).unwrap();
                let (back, _): (RelayMsg, _) = wire::decode(&f, UPLINK_VERSION, MAX_UPLINK_FRAME).unwrap();
                prop_assert_eq!(back, m);
            }
        }

        #[test]
        fn truncated_relay_messages_are_rejected(r in arb_record(), cut in 0usize..64) {
            let f = wire::encode(UPLINK_VERSION, &RelayMsg::Record(Box::new(r)), MAX_UPLINK_FRAME).unwrap();
            let cut = cut.min(f.len() - 1);
            prop_assert!(wire::decode::<RelayMsg>(&f[..cut], UPLINK_VERSION, MAX_UPLINK_FRAME).is_err());
            // A frame whose body was cut but whose prefix was fixed up.
            let body = &f[4..f.len() - 1];
            prop_assert!(wire::decode_body::<RelayMsg>(body, UPLINK_VERSION).is_err());
        }

        #[test]
        fn garbage_never_panics_any_uplink_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = wire::decode_body::<RelayMsg>(&bytes, UPLINK_VERSION);
            let _ = wire::decode_body::<HubMsg>(&bytes, UPLINK_VERSION);
            let _ = wire::decode_body::<Request>(&bytes, UPLINK_VERSION);
            let _ = wire::decode_body::<Response>(&bytes, UPLINK_VERSION);
        }
    }
}
