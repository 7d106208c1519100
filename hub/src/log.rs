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
//! trail (who wrote what, when, through which hub).
//!
//! Pure: time is passed in; signing and storing belong to the driver.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

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
    Put { key: String, value: String },
    Delete { key: String },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
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
}

impl Entry {
    /// The bytes the origin signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries serialise")
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

/// The desired state derived from the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    keys: BTreeMap<String, Winner>,
}

impl DesiredState {
    /// Applies one entry (in any order relative to the others).
    pub fn apply(&mut self, e: &Entry) {
        let wins = self
            .keys
            .get(e.op.key())
            .is_none_or(|w| e.rank() > (w.hlc, w.origin.as_str(), w.seq));
        if wins {
            self.keys.insert(
                e.op.key().to_owned(),
                Winner {
                    value: match &e.op {
                        Op::Put { value, .. } => Some(value.clone()),
                        Op::Delete { .. } => None,
                    },
                    hlc: e.hlc,
                    origin: e.origin.clone(),
                    seq: e.seq,
                    author: e.author.clone(),
                },
            );
        }
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
}

/// The log's state at one hub, without the entries themselves (they are in
/// the store).
#[derive(Debug, Clone)]
pub struct LogCore {
    me: String,
    clock: Clock,
    vv: VersionVector,
    state: DesiredState,
    entries: u64,
}

impl LogCore {
    pub fn new(me: impl Into<String>) -> Self {
        LogCore {
            me: me.into(),
            clock: Clock::default(),
            vv: VersionVector::new(),
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

    /// A new entry for a local write. Apply it with [`LogCore::apply`] once
    /// stored.
    pub fn write(&mut self, now_ms: u64, author: &str, op: Op) -> Entry {
        Entry {
            origin: self.me.clone(),
            seq: self.vv.get(&self.me).copied().unwrap_or(0) + 1,
            hlc: self.clock.tick(now_ms),
            author: author.to_owned(),
            op,
        }
    }

    /// Among entries received from another hub, those that extend what this
    /// hub holds without leaving a hole, in order. (Entries beyond a hole
    /// wait for the next exchange.)
    pub fn fresh<'a>(&self, entries: &'a [SignedEntry]) -> Vec<&'a SignedEntry> {
        let mut sorted: Vec<&SignedEntry> = entries.iter().collect();
        sorted.sort_by(|a, b| (&a.entry.origin, a.entry.seq).cmp(&(&b.entry.origin, b.entry.seq)));
        let mut next: BTreeMap<&str, u64> = BTreeMap::new();
        let mut out = Vec::new();
        for e in sorted {
            let want = next
                .entry(&e.entry.origin)
                .or_insert_with(|| self.vv.get(&e.entry.origin).copied().unwrap_or(0) + 1);
            if e.entry.seq == *want {
                *want += 1;
                out.push(e);
            }
        }
        out
    }

    /// A stored entry: count it and fold it into the state.
    pub fn apply(&mut self, e: &Entry) {
        let held = self.vv.entry(e.origin.clone()).or_insert(0);
        if e.seq != *held + 1 {
            return; // already held, or beyond a hole: not stored in order
        }
        *held = e.seq;
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
        }
    }

    fn signed(e: Entry) -> SignedEntry {
        SignedEntry {
            entry: e,
            cert: vec![],
            signature: vec![],
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
        let mut log = LogCore::new("me");
        log.apply(&put("a", 1, 1, "k", "v"));
        let got = vec![
            signed(put("a", 3, 3, "k", "v")),
            signed(put("a", 2, 2, "k", "v")),
            signed(put("a", 1, 1, "k", "v")),
            signed(put("b", 2, 2, "k", "v")),
        ];
        let fresh: Vec<(String, u64)> = log
            .fresh(&got)
            .iter()
            .map(|e| (e.entry.origin.clone(), e.entry.seq))
            .collect();
        assert_eq!(fresh, vec![("a".into(), 2), ("a".into(), 3)]);
    }

    #[test]
    fn what_another_hub_lacks_is_found_from_its_version_vector() {
        let mut log = LogCore::new("me");
        for seq in 1..=5 {
            log.apply(&put("a", seq, seq, "k", "v"));
        }
        log.apply(&put("b", 1, 1, "k", "v"));
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
