//! The replicated management log: an append-only log of signed entries
//! that every hub holds, from which the desired state is derived.
//!
//! Each hub numbers the entries it originates (`origin`, `seq`), so what a
//! hub holds is summed up by a version vector (per origin, the highest seq
//! held, always contiguous). Hubs reconcile by exchanging version vectors
//! and sending each other what the other lacks.
//!
//! The desired state is a fold over the entries in any order: for each key,
//! the entry with the greatest `(hlc, origin, seq)` wins — a later hybrid
//! logical clock first, then the origin hub's name, then its seq. So the
//! same set of entries gives the same state on every hub, whatever order
//! they arrived in. Every entry stays in the log: it is also the audit
//! trail (who wrote what, when, through which hub), and notes that change
//! nothing ([`Op::Note`]) record what else happened.
//!
//! Each origin's entries form a hash chain: an entry carries `prev`, the
//! [`entry_hash`] of the origin's entry before it (all zeros for seq 1),
//! under the origin's signature. Altering, removing or reordering an entry
//! therefore breaks the chain at the entry after it, even where the
//! altered entry itself is not checked; a hub refuses entries from another
//! hub that do not follow the entry before them ([`LogCore::receive`]).
//!
//! Pure: time is passed in; signing and storing belong to the driver.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};
use trellis_node::revocation::SignedRevocation;

/// A hybrid logical clock reading: wall-clock milliseconds, and a counter
/// that orders events within a millisecond or when a clock lags another.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub ms: u64,
    pub counter: u32,
}

/// A hub's hybrid logical clock.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    /// A reading for a new local event: never earlier than anything seen.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.ms {
            Hlc {
                ms: now_ms,
                counter: 0,
            }
        } else {
            Hlc {
                ms: self.last.ms,
                counter: self.last.counter + 1,
            }
        };
        self.last
    }

    /// Takes another hub's reading into account.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen);
    }
}

/// What an entry does to the desired state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// A record for the audit trail only (a configuration applied on a
    /// node, a drift found): the desired state ignores it.
    Note {
        /// What happened, dotted (`config.applied`).
        kind: String,
        /// What it happened to (a node's name).
        subject: String,
        detail: String,
    },
    /// A configuration version, as the operator signed it.
    Config {
        version: u64,
        /// SHA-256 of the signed bundle bytes, hex.
        digest: String,
        /// The operator's note about the change.
        comment: String,
        /// The postcard encoding of the `SignedBundle`.
        bundle: Vec<u8>,
    },
    /// A patch, as the operator signed its manifest (its artifacts are in
    /// the hubs' chunk stores).
    Patch {
        /// BLAKE3 of the manifest bytes, hex.
        id: String,
        name: String,
        version: String,
        /// The postcard encoding of the `SignedPatch`.
        manifest: Vec<u8>,
    },
    /// A patch rollout as it stands: written when it starts and at each
    /// change (a wave started, a gate failed, paused by an operator). The
    /// highest revision of a run wins; equal revisions written by two hubs
    /// at once are ordered like keys.
    Rollout {
        run: u64,
        revision: u64,
        /// The rollout's state as JSON (`patchrollout::RolloutRecord`).
        record: String,
    },
    /// A certificate revoked, or an operator key retired, as the mesh CA
    /// signed it (`trellis ca revoke`, `trellis ca rotate`).
    Revoke {
        /// The postcard encoding of the
        /// `trellis_node::revocation::SignedRevocation`.
        revocation: Vec<u8>,
    },
}

impl Op {
    /// The operation as listings show it: a configuration's bundle bytes
    /// left out (`GET /api/v1/config/{version}` serves them).
    pub fn without_bundle(self) -> Op {
        match self {
            Op::Config {
                version,
                digest,
                comment,
                ..
            } => Op::Config {
                version,
                digest,
                comment,
                bundle: Vec::new(),
            },
            Op::Patch {
                id, name, version, ..
            } => Op::Patch {
                id,
                name,
                version,
                manifest: Vec::new(),
            },
            other => other,
        }
    }

    /// The desired-state key the operation changes; notes change none.
    pub fn key(&self) -> Option<&str> {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => Some(key),
            Op::Note { .. }
            | Op::Config { .. }
            | Op::Patch { .. }
            | Op::Rollout { .. }
            | Op::Revoke { .. } => None,
        }
    }
}

/// The short human form stored next to each entry and shown by
/// `trellis audit log`: `put key=value`, `delete key`,
/// `note kind subject: detail`, `config vN DIGEST16: comment`,
/// `patch NAME VERSION ID16`.
impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Put { key, value } => write!(f, "put {key}={value}"),
            Op::Delete { key } => write!(f, "delete {key}"),
            Op::Note {
                kind,
                subject,
                detail,
            } if detail.is_empty() => write!(f, "note {kind} {subject}"),
            Op::Note {
                kind,
                subject,
                detail,
            } => write!(f, "note {kind} {subject}: {detail}"),
            Op::Config {
                version,
                digest,
                comment,
                ..
            } => {
                let short = digest.get(..16).unwrap_or(digest);
                if comment.is_empty() {
                    write!(f, "config v{version} {short}")
                } else {
                    write!(f, "config v{version} {short}: {comment}")
                }
            }
            Op::Patch {
                id, name, version, ..
            } => write!(f, "patch {name} {version} {}", id.get(..16).unwrap_or(id)),
            Op::Rollout {
                run,
                revision,
                record,
            } => {
                let state = serde_json::from_str::<serde_json::Value>(record)
                    .ok()
                    .and_then(|v| v.get("state").and_then(|s| s.as_str().map(str::to_owned)))
                    .unwrap_or_default();
                write!(f, "rollout {run} revision {revision} {state}")
            }
            Op::Revoke { revocation } => {
                let decoded = postcard::from_bytes::<SignedRevocation>(revocation)
                    .ok()
                    .and_then(|s| trellis_node::revocation::decode(&s.entry).ok());
                match decoded {
                    Some(r) => write!(
                        f,
                        "{} {} {}: {}",
                        r.kind.as_str(),
                        r.identity,
                        &hex(&r.fingerprint)[..16],
                        r.reason
                    ),
                    None => write!(f, "revoke (unreadable entry)"),
                }
            }
        }
    }
}

/// The SHA-256 of a log entry: what the next entry of the same origin
/// carries as `prev`.
pub type EntryHash = [u8; 32];

/// `prev` of an origin's first entry.
pub const NO_PREV: EntryHash = [0; 32];

/// SHA-256 over the entry's signed bytes ([`Entry::signing_bytes`])
/// followed by the origin's signature of them. postcard is
/// self-delimiting, so the two parts cannot be shifted into one another;
/// the signature is included so that the chain commits to the entry
/// exactly as the origin issued it.
pub fn entry_hash(signing_bytes: &[u8], signature: &[u8]) -> EntryHash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(signing_bytes);
    ctx.update(signature);
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Lower-case hex of a hash (as shown to operators and in JSON).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes as hex strings in JSON and as 32 raw bytes in postcard.
mod hash_serde {
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    use super::EntryHash;

    pub fn serialize<S: Serializer>(h: &EntryHash, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&super::hex(h))
        } else {
            serde::Serialize::serialize(h, s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EntryHash, D::Error> {
        if !d.is_human_readable() {
            return <EntryHash>::deserialize(d);
        }
        let text = String::deserialize(d)?;
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(D::Error::custom("a hash is 64 hex digits"));
        }
        let digit = |c: u8| {
            (c as char)
                .to_digit(16)
                .ok_or_else(|| D::Error::custom("a hash is 64 hex digits"))
        };
        let mut out = [0; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            out[i] = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
        }
        Ok(out)
    }
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// The hub that accepted the write.
    pub origin: String,
    /// The origin's number for it: 1, 2, 3, … without holes.
    pub seq: u64,
    pub hlc: Hlc,
    /// Who asked for it (an operator, or the hub itself).
    pub author: String,
    pub op: Op,
    /// The hash of the origin's entry `seq - 1` ([`NO_PREV`] for seq 1).
    #[serde(with = "hash_serde")]
    pub prev: EntryHash,
}

impl Entry {
    /// The bytes the origin signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries serialise")
    }

    /// Roughly the bytes it takes on the wire: what varies is the
    /// operation's text and a configuration's bundle.
    pub fn approx_size(&self) -> usize {
        let op = match &self.op {
            Op::Put { key, value } => key.len() + value.len(),
            Op::Delete { key } => key.len(),
            Op::Note {
                kind,
                subject,
                detail,
            } => kind.len() + subject.len() + detail.len(),
            Op::Config {
                digest,
                comment,
                bundle,
                ..
            } => digest.len() + comment.len() + bundle.len(),
            Op::Patch {
                id,
                name,
                version,
                manifest,
            } => id.len() + name.len() + version.len() + manifest.len(),
            Op::Rollout { record, .. } => 16 + record.len(),
            Op::Revoke { revocation } => revocation.len(),
        };
        128 + self.origin.len() + self.author.len() + op
    }

    fn rank(&self) -> (Hlc, &str, u64) {
        (self.hlc, &self.origin, self.seq)
    }
}

/// An entry with its origin's certificate and signature over
/// [`Entry::signing_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEntry {
    pub entry: Entry,
    /// The origin hub's certificate (DER), to verify against the mesh CA.
    pub cert: Vec<u8>,
    pub signature: Vec<u8>,
}

impl SignedEntry {
    /// This entry's link in its origin's chain.
    pub fn hash(&self) -> EntryHash {
        entry_hash(&self.entry.signing_bytes(), &self.signature)
    }
}

/// An entry from another hub whose `prev` is not the hash of the entry
/// before it (held here, or earlier in the same batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub origin: String,
    pub seq: u64,
    /// The hash of the entry `seq - 1` this hub has.
    pub expected: EntryHash,
    /// The entry's `prev`.
    pub found: EntryHash,
}

/// What [`LogCore::receive`] makes of a batch of entries from another hub.
#[derive(Debug, Default)]
pub struct Received<'a> {
    /// Entries that extend the log without a hole and follow the chain,
    /// in order: the ones to store.
    pub fresh: Vec<&'a SignedEntry>,
    /// Entries refused because they break their origin's chain.
    pub broken: Vec<ChainBreak>,
}

/// Per origin, the highest seq held (all lower ones are held too).
pub type VersionVector = BTreeMap<String, u64>;

/// A key's current value and the entry that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Winner {
    /// `None` when the winning entry deleted the key.
    pub value: Option<String>,
    pub hlc: Hlc,
    pub origin: String,
    pub seq: u64,
    pub author: String,
}

/// A configuration version and the entry that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub version: u64,
    pub digest: String,
    pub comment: String,
    /// The operator who signed it (the certificate's name).
    pub author: String,
    pub hlc: Hlc,
    pub origin: String,
    pub seq: u64,
}

/// The desired state derived from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    keys: BTreeMap<String, Winner>,
    /// Configuration versions. Two hubs cut off from each other may each
    /// accept a bundle with the same version number; like a key, the
    /// entry with the greatest `(hlc, origin, seq)` wins everywhere.
    configs: BTreeMap<u64, ConfigVersion>,
    /// Published patches by id (content-derived: the same manifest
    /// published twice is one patch, the first entry keeps it).
    patches: BTreeMap<String, PatchRecord>,
    /// Patch rollouts by run: the highest revision, then the greatest
    /// `(hlc, origin, seq)`.
    rollouts: BTreeMap<u64, RolloutEntry>,
    /// Revocations as the CA signed them, each once (a set: every hub
    /// ends with the union, whatever the order entries came in). Members
    /// check each signature before believing it.
    revocations: BTreeSet<Vec<u8>>,
}

/// A rollout's newest state and the entry that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEntry {
    pub run: u64,
    pub revision: u64,
    /// JSON (`patchrollout::RolloutRecord`).
    pub record: String,
    pub author: String,
    pub hlc: Hlc,
    pub origin: String,
    pub seq: u64,
}

/// A published patch and the entry that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub id: String,
    pub name: String,
    pub version: String,
    /// The operator who signed it.
    pub author: String,
    pub hlc: Hlc,
    pub origin: String,
    pub seq: u64,
}

impl DesiredState {
    /// Applies one entry (in any order relative to the others).
    /// Notes change nothing.
    pub fn apply(&mut self, e: &Entry) {
        if let Op::Revoke { revocation } = &e.op {
            self.revocations.insert(revocation.clone());
            return;
        }
        if let Op::Rollout {
            run,
            revision,
            record,
        } = &e.op
        {
            let wins = self.rollouts.get(run).is_none_or(|r| {
                (*revision, e.hlc, e.origin.as_str(), e.seq)
                    > (r.revision, r.hlc, r.origin.as_str(), r.seq)
            });
            if wins {
                self.rollouts.insert(
                    *run,
                    RolloutEntry {
                        run: *run,
                        revision: *revision,
                        record: record.clone(),
                        author: e.author.clone(),
                        hlc: e.hlc,
                        origin: e.origin.clone(),
                        seq: e.seq,
                    },
                );
            }
            return;
        }
        if let Op::Patch {
            id, name, version, ..
        } = &e.op
        {
            let first = self.patches.get(id).is_none_or(|p| {
                (e.hlc, e.origin.as_str(), e.seq) < (p.hlc, p.origin.as_str(), p.seq)
            });
            if first {
                self.patches.insert(
                    id.clone(),
                    PatchRecord {
                        id: id.clone(),
                        name: name.clone(),
                        version: version.clone(),
                        author: e.author.clone(),
                        hlc: e.hlc,
                        origin: e.origin.clone(),
                        seq: e.seq,
                    },
                );
            }
            return;
        }
        if let Op::Config {
            version,
            digest,
            comment,
            ..
        } = &e.op
        {
            let wins = self
                .configs
                .get(version)
                .is_none_or(|c| e.rank() > (c.hlc, c.origin.as_str(), c.seq));
            if wins {
                self.configs.insert(
                    *version,
                    ConfigVersion {
                        version: *version,
                        digest: digest.clone(),
                        comment: comment.clone(),
                        author: e.author.clone(),
                        hlc: e.hlc,
                        origin: e.origin.clone(),
                        seq: e.seq,
                    },
                );
            }
            return;
        }
        let Some(key) = e.op.key() else {
            return;
        };
        let wins = self
            .keys
            .get(key)
            .is_none_or(|w| e.rank() > (w.hlc, w.origin.as_str(), w.seq));
        if wins {
            self.keys.insert(
                key.to_owned(),
                Winner {
                    value: match &e.op {
                        Op::Put { value, .. } => Some(value.clone()),
                        Op::Delete { .. }
                        | Op::Note { .. }
                        | Op::Config { .. }
                        | Op::Patch { .. }
                        | Op::Rollout { .. }
                        | Op::Revoke { .. } => None,
                    },
                    hlc: e.hlc,
                    origin: e.origin.clone(),
                    seq: e.seq,
                    author: e.author.clone(),
                },
            );
        }
    }

    /// Every revocation written, as signed (entries that do not decode
    /// left out: the hub that wrote them checked them).
    pub fn revocations(&self) -> Vec<SignedRevocation> {
        self.revocations
            .iter()
            .filter_map(|b| postcard::from_bytes(b).ok())
            .collect()
    }

    /// Keys with a value (deleted keys left out).
    pub fn values(&self) -> impl Iterator<Item = (&str, &Winner)> {
        self.keys
            .iter()
            .filter(|(_, w)| w.value.is_some())
            .map(|(k, w)| (k.as_str(), w))
    }

    pub fn get(&self, key: &str) -> Option<&Winner> {
        self.keys.get(key).filter(|w| w.value.is_some())
    }

    /// Every configuration version, oldest first.
    pub fn configs(&self) -> impl DoubleEndedIterator<Item = &ConfigVersion> {
        self.configs.values()
    }

    /// The newest configuration version.
    pub fn latest_config(&self) -> Option<&ConfigVersion> {
        self.configs.values().next_back()
    }

    pub fn config(&self, version: u64) -> Option<&ConfigVersion> {
        self.configs.get(&version)
    }

    /// Every rollout's newest state, by run.
    pub fn rollouts(&self) -> impl DoubleEndedIterator<Item = &RolloutEntry> {
        self.rollouts.values()
    }

    /// Every published patch, oldest first.
    pub fn patches(&self) -> Vec<&PatchRecord> {
        let mut all: Vec<&PatchRecord> = self.patches.values().collect();
        all.sort_by(|a, b| (a.hlc, &a.origin, a.seq).cmp(&(b.hlc, &b.origin, b.seq)));
        all
    }
}

/// The log's state at one hub, without the entries themselves (they are in
/// the store).
#[derive(Debug, Clone)]
pub struct LogCore {
    me: String,
    clock: Clock,
    vv: VersionVector,
    /// Per origin, the hash of the highest entry held: what its next
    /// entry must carry as `prev`.
    heads: BTreeMap<String, EntryHash>,
    state: DesiredState,
    entries: u64,
}

impl LogCore {
    pub fn new(me: impl Into<String>) -> Self {
        LogCore {
            me: me.into(),
            clock: Clock::default(),
            vv: VersionVector::new(),
            heads: BTreeMap::new(),
            state: DesiredState::default(),
            entries: 0,
        }
    }

    pub fn version_vector(&self) -> &VersionVector {
        &self.vv
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Entries held.
    pub fn len(&self) -> u64 {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// A short fingerprint of the version vector, published in gossip so
    /// hubs see at a glance whether they hold the same log.
    pub fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.vv.hash(&mut h);
        h.finish()
    }

    /// A new entry for a local write, chained to this hub's previous one.
    /// Apply it with [`LogCore::apply`] once stored.
    pub fn write(&mut self, now_ms: u64, author: &str, op: Op) -> Entry {
        self.write_after(now_ms, author, op, None)
    }

    /// A new entry chained to `after` (an entry of this hub written but not
    /// applied yet: several writes stored in one commit), or to this hub's
    /// last applied entry.
    pub fn write_after(
        &mut self,
        now_ms: u64,
        author: &str,
        op: Op,
        after: Option<&SignedEntry>,
    ) -> Entry {
        let (seq, prev) = match after {
            Some(a) => (a.entry.seq + 1, a.hash()),
            None => (
                self.vv.get(&self.me).copied().unwrap_or(0) + 1,
                self.heads.get(&self.me).copied().unwrap_or(NO_PREV),
            ),
        };
        Entry {
            origin: self.me.clone(),
            seq,
            hlc: self.clock.tick(now_ms),
            author: author.to_owned(),
            op,
            prev,
        }
    }

    /// Sorts out entries received from another hub (signatures already
    /// checked): those that extend what this hub holds without leaving a
    /// hole and whose `prev` is the hash of the entry before them, in
    /// order, are fresh. An entry that breaks the chain is refused, and so
    /// are its origin's later entries in the batch (they would follow a
    /// hole). Entries beyond a hole wait for the next exchange.
    pub fn receive<'a>(&self, entries: &'a [SignedEntry]) -> Received<'a> {
        let mut sorted: Vec<&SignedEntry> = entries.iter().collect();
        sorted.sort_by(|a, b| (&a.entry.origin, a.entry.seq).cmp(&(&b.entry.origin, b.entry.seq)));
        // Per origin: the seq wanted next and the hash it must follow.
        let mut next: BTreeMap<&str, (u64, EntryHash)> = BTreeMap::new();
        let mut out = Received::default();
        for e in sorted {
            let origin = e.entry.origin.as_str();
            let (want, head) = next.entry(origin).or_insert_with(|| {
                (
                    self.vv.get(origin).copied().unwrap_or(0) + 1,
                    self.heads.get(origin).copied().unwrap_or(NO_PREV),
                )
            });
            if e.entry.seq != *want {
                continue;
            }
            if e.entry.prev != *head {
                out.broken.push(ChainBreak {
                    origin: origin.to_owned(),
                    seq: e.entry.seq,
                    expected: *head,
                    found: e.entry.prev,
                });
                continue;
            }
            *want += 1;
            *head = e.hash();
            out.fresh.push(e);
        }
        out
    }

    /// A stored entry, with its [`entry_hash`]: count it and fold it into
    /// the state.
    pub fn apply(&mut self, e: &Entry, hash: EntryHash) {
        let held = self.vv.entry(e.origin.clone()).or_insert(0);
        if e.seq != *held + 1 {
            return; // already held, or beyond a hole: not stored in order
        }
        *held = e.seq;
        self.heads.insert(e.origin.clone(), hash);
        self.entries += 1;
        self.clock.observe(e.hlc);
        self.state.apply(e);
    }

    /// For each origin, the seq after which `have` lacks entries this hub
    /// holds.
    pub fn missing_for(&self, have: &VersionVector) -> Vec<(String, u64)> {
        self.vv
            .iter()
            .filter_map(|(origin, &mine)| {
                let theirs = have.get(origin).copied().unwrap_or(0);
                (mine > theirs).then(|| (origin.clone(), theirs))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn put(origin: &str, seq: u64, ms: u64, key: &str, value: &str) -> Entry {
        Entry {
            origin: origin.into(),
            seq,
            hlc: Hlc { ms, counter: 0 },
            author: "alice".into(),
            op: Op::Put {
                key: key.into(),
                value: value.into(),
            },
            prev: NO_PREV,
        }
    }

    fn config(origin: &str, seq: u64, ms: u64, version: u64, digest: &str) -> Entry {
        Entry {
            op: Op::Config {
                version,
                digest: digest.into(),
                comment: "c".into(),
                bundle: vec![1, 2, 3],
            },
            ..put(origin, seq, ms, "unused", "")
        }
    }

    #[test]
    fn two_hubs_accepting_the_same_version_settle_on_one_in_any_order() {
        let a = config("hub-a", 1, 100, 4, "aaaa");
        let b = config("hub-b", 1, 200, 4, "bbbb");
        let older = config("hub-a", 2, 300, 3, "cccc");
        for order in [[&a, &b, &older], [&older, &b, &a], [&b, &older, &a]] {
            let mut s = DesiredState::default();
            for e in order {
                s.apply(e);
            }
            let latest = s.latest_config().unwrap();
            assert_eq!((latest.version, latest.digest.as_str()), (4, "bbbb"));
            let versions: Vec<u64> = s.configs().map(|c| c.version).collect();
            assert_eq!(versions, vec![3, 4]);
            // Configurations are not keys of the desired state.
            assert_eq!(s.values().count(), 0);
        }
        assert_eq!(a.op.to_string(), "config v4 aaaa: c");
        let listed = a.op.clone().without_bundle();
        assert!(matches!(listed, Op::Config { ref bundle, .. } if bundle.is_empty()));
        assert!(a.approx_size() > 3);
    }

    fn signed(e: Entry) -> SignedEntry {
        SignedEntry {
            entry: e,
            cert: vec![],
            // Stands for a signature: the chain hashes it whatever it is.
            signature: vec![e_sig(0)],
        }
    }

    fn e_sig(n: u8) -> u8 {
        0xa0 + n
    }

    /// `n` entries of `origin`, each chained to the one before.
    fn chain(origin: &str, n: u64) -> Vec<SignedEntry> {
        let mut out: Vec<SignedEntry> = Vec::new();
        for seq in 1..=n {
            let mut e = put(origin, seq, seq * 10, "k", &format!("v{seq}"));
            e.prev = out.last().map_or(NO_PREV, SignedEntry::hash);
            out.push(signed(e));
        }
        out
    }

    fn apply_all(log: &mut LogCore, entries: &[SignedEntry]) {
        for e in entries {
            log.apply(&e.entry, e.hash());
        }
    }

    #[test]
    fn the_later_clock_wins_and_ties_go_to_the_greater_origin_name() {
        let mut s = DesiredState::default();
        s.apply(&put("hub-a", 1, 100, "k", "from a"));
        s.apply(&put("hub-b", 1, 90, "k", "from b, older"));
        assert_eq!(s.get("k").unwrap().value.as_deref(), Some("from a"));
        s.apply(&put("hub-b", 2, 100, "k", "from b, same ms"));
        assert_eq!(
            s.get("k").unwrap().value.as_deref(),
            Some("from b, same ms"),
            "hub-b > hub-a"
        );
    }

    #[test]
    fn a_delete_wins_like_a_write_and_hides_the_key() {
        let mut s = DesiredState::default();
        s.apply(&put("a", 1, 100, "k", "v"));
        s.apply(&Entry {
            op: Op::Delete { key: "k".into() },
            ..put("a", 2, 200, "k", "")
        });
        assert!(s.get("k").is_none());
        assert_eq!(s.values().count(), 0);
    }

    #[test]
    fn the_clock_never_goes_back_and_follows_what_it_sees() {
        let mut c = Clock::default();
        let a = c.tick(100);
        let b = c.tick(90);
        assert!(b > a, "a clock step back still moves forward");
        c.observe(Hlc {
            ms: 500,
            counter: 3,
        });
        assert!(
            c.tick(200)
                > Hlc {
                    ms: 500,
                    counter: 3
                }
        );
    }

    #[test]
    fn only_entries_that_extend_the_log_without_a_hole_are_taken() {
        let a = chain("a", 3);
        let b = chain("b", 2);
        let mut log = LogCore::new("me");
        apply_all(&mut log, &a[..1]);
        let got = vec![a[2].clone(), a[1].clone(), a[0].clone(), b[1].clone()];
        let received = log.receive(&got);
        let fresh: Vec<(String, u64)> = received
            .fresh
            .iter()
            .map(|e| (e.entry.origin.clone(), e.entry.seq))
            .collect();
        assert_eq!(fresh, vec![("a".into(), 2), ("a".into(), 3)]);
        assert!(received.broken.is_empty());
    }

    #[test]
    fn writes_chained_in_one_batch_follow_each_other_and_another_hub_takes_them() {
        let mut hub = LogCore::new("h");
        let first = signed(hub.write(10, "h", Op::Delete { key: "x".into() }));
        apply_all(&mut hub, std::slice::from_ref(&first));
        let mut batch: Vec<SignedEntry> = Vec::new();
        for i in 0..3 {
            let op = Op::Note {
                kind: "config.applied".into(),
                subject: format!("n{i}"),
                detail: String::new(),
            };
            let e = hub.write_after(20, "h", op, batch.last());
            batch.push(signed(e));
        }
        let seqs: Vec<u64> = batch.iter().map(|e| e.entry.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        // Another hub holding h/1 takes all three, in order.
        let mut other = LogCore::new("o");
        apply_all(&mut other, &[first]);
        let received = other.receive(&batch);
        assert!(received.broken.is_empty(), "{:?}", received.broken);
        assert_eq!(received.fresh.len(), 3);
        apply_all(&mut hub, &batch);
        assert_eq!(hub.version_vector().get("h"), Some(&4));
    }

    #[test]
    fn an_entry_whose_prev_is_not_the_hash_of_the_entry_before_it_is_refused() {
        let a = chain("a", 4);
        let b = chain("b", 2);
        let mut log = LogCore::new("me");
        apply_all(&mut log, &a[..1]);
        // a/3 claims to follow another a/2 than the one in the batch.
        let mut forged = a[2].clone();
        forged.entry.prev = [7; 32];
        let got = vec![
            a[1].clone(),
            forged,
            a[3].clone(),
            b[0].clone(),
            b[1].clone(),
        ];
        let received = log.receive(&got);
        let fresh: Vec<(String, u64)> = received
            .fresh
            .iter()
            .map(|e| (e.entry.origin.clone(), e.entry.seq))
            .collect();
        assert_eq!(
            fresh,
            vec![("a".into(), 2), ("b".into(), 1), ("b".into(), 2)],
            "a/3 breaks the chain, so a/4 follows a hole; b is unaffected"
        );
        assert_eq!(
            received.broken,
            vec![ChainBreak {
                origin: "a".into(),
                seq: 3,
                expected: a[1].hash(),
                found: [7; 32],
            }]
        );
        // The first entry received must follow what this hub holds.
        let mut other = LogCore::new("me");
        apply_all(&mut other, &chain("a", 1));
        let mut rewritten = a[1].clone();
        rewritten.entry.prev = NO_PREV;
        let received = other.receive(std::slice::from_ref(&rewritten));
        assert!(received.fresh.is_empty());
        assert_eq!(received.broken[0].seq, 2);
        assert_eq!(received.broken[0].expected, a[0].hash());
    }

    #[test]
    fn a_chain_hash_covers_the_entry_and_its_signature() {
        let a = chain("a", 2);
        assert_eq!(a[0].entry.prev, NO_PREV);
        assert_eq!(a[1].entry.prev, a[0].hash());
        let h = a[0].hash();
        let mut other_author = a[0].clone();
        other_author.entry.author = "mallory".into();
        assert_ne!(other_author.hash(), h);
        let mut other_signature = a[0].clone();
        other_signature.signature = vec![e_sig(1)];
        assert_ne!(other_signature.hash(), h);
        // The certificate is not part of the entry.
        let mut other_cert = a[0].clone();
        other_cert.cert = vec![1, 2, 3];
        assert_eq!(other_cert.hash(), h);
        // SHA-256 of the signed bytes followed by the signature.
        let mut bytes = a[0].entry.signing_bytes();
        bytes.extend_from_slice(&a[0].signature);
        assert_eq!(
            h.as_slice(),
            ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref()
        );
    }

    #[test]
    fn a_local_write_follows_the_hubs_own_last_entry() {
        let mut log = LogCore::new("me");
        let first = log.write(10, "alice", Op::Delete { key: "k".into() });
        assert_eq!((first.seq, first.prev), (1, NO_PREV));
        let stored = signed(first);
        log.apply(&stored.entry, stored.hash());
        let second = log.write(20, "alice", Op::Delete { key: "k".into() });
        assert_eq!((second.seq, second.prev), (2, stored.hash()));
    }

    #[test]
    fn notes_leave_the_desired_state_as_it_was() {
        let mut log = LogCore::new("me");
        apply_all(&mut log, &chain("a", 1));
        let before = log.state().clone();
        let note = log.write(
            100,
            "hub-a",
            Op::Note {
                kind: "config.applied".into(),
                subject: "web-01".into(),
                detail: "sha256 ab12".into(),
            },
        );
        assert_eq!(
            note.op.to_string(),
            "note config.applied web-01: sha256 ab12"
        );
        let note = signed(note);
        log.apply(&note.entry, note.hash());
        assert_eq!(log.state(), &before);
        assert_eq!(log.len(), 2, "the note is in the log");
    }

    #[test]
    fn hashes_are_hex_in_json_and_raw_bytes_in_postcard() {
        let e = chain("a", 2).pop().unwrap().entry;
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["prev"], hex(&e.prev));
        assert_eq!(serde_json::from_value::<Entry>(json).unwrap(), e);
        let bytes = e.signing_bytes();
        assert!(bytes.windows(32).any(|w| w == e.prev), "32 raw bytes");
        assert_eq!(postcard::from_bytes::<Entry>(&bytes).unwrap(), e);
        assert!(
            serde_json::from_value::<Entry>(serde_json::json!({
                "origin": "a", "seq": 1, "hlc": {"ms": 1, "counter": 0}, "author": "x",
                "op": {"Delete": {"key": "k"}}, "prev": "zz"
            }))
            .is_err()
        );
    }

    #[test]
    fn what_another_hub_lacks_is_found_from_its_version_vector() {
        let mut log = LogCore::new("me");
        apply_all(&mut log, &chain("a", 5));
        apply_all(&mut log, &chain("b", 1));
        let have = VersionVector::from([("a".into(), 3), ("c".into(), 9)]);
        assert_eq!(
            log.missing_for(&have),
            vec![("a".into(), 3), ("b".into(), 0)]
        );
        let w = log.write(10, "alice", Op::Delete { key: "k".into() });
        assert_eq!((w.origin.as_str(), w.seq), ("me", 1));
    }

    fn arb_entries() -> impl Strategy<Value = Vec<Entry>> {
        proptest::collection::vec((0usize..3, 0u64..20, 0usize..4, any::<bool>()), 1..30).prop_map(
            |v| {
                let mut next = [0u64; 3];
                v.into_iter()
                    .map(|(o, ms, k, del)| {
                        next[o] += 1;
                        let key = format!("k{k}");
                        Entry {
                            origin: format!("hub-{o}"),
                            seq: next[o],
                            hlc: Hlc { ms, counter: 0 },
                            author: "x".into(),
                            op: if del {
                                Op::Delete { key }
                            } else {
                                Op::Put {
                                    key,
                                    value: format!("{o}/{}", next[o]),
                                }
                            },
                            prev: NO_PREV,
                        }
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn the_same_entries_give_the_same_state_in_any_order(
            entries in arb_entries(),
            seed in any::<u64>(),
        ) {
            let mut a = DesiredState::default();
            for e in &entries { a.apply(e); }
            let mut shuffled = entries.clone();
            // A deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut b = DesiredState::default();
            for e in &shuffled { b.apply(e); }
            // Applying twice changes nothing.
            for e in &entries { b.apply(e); }
            prop_assert_eq!(a, b);
        }
    }
}
