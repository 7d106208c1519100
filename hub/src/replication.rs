//! Hub ↔ hub replication (ALPN `trellis-replication/1`): relay records and
//! management log entries, pushed when they are new and pulled to repair
//! whatever a push missed (anti-entropy).
//!
//! Every exchange is one request and one response on a bidirectional
//! stream opened by the asking hub:
//!
//! ```text
//! Records(records)          → Stored          pushed records are durable here
//! PullRecords { have, max } → Records { .. }  what the asker's coverage lacks
//! Entries(entries)          → Stored          pushed entries are durable here
//! PullEntries { have, max } → Entries { .. }  what the asker's version vector lacks
//! ```
//!
//! Pulls are answered in chunks of at most `max`, with `more` set when
//! there is more; the asker asks again.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::authz::Protocol;
use trellis_node::endpoint::MeshEndpoint;
use trellis_node::wire;

use crate::core::Coverage;
use crate::log::{SignedEntry, VersionVector};
use crate::store::StoredRecord;

/// 2: log entries carry `prev` (the hash chain); a hub of version 1 and
/// one of version 2 refuse each other's frames rather than misread them.
pub const REPL_VERSION: u8 = 2;
/// Largest replication frame; pulls are chunked well below it.
pub const MAX_REPL_FRAME: usize = 16 << 20;
/// Records or entries per pull response, at most.
pub const PULL_CHUNK: u32 = 2000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// A hub's question to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplRequest {
    Records(Vec<StoredRecord>),
    PullRecords {
        have: Vec<((String, u64), Coverage)>,
        max: u32,
    },
    Entries(Vec<SignedEntry>),
    PullEntries {
        have: VersionVector,
        max: u32,
    },
    /// Patch artifact chunks by BLAKE3 (at most [`CHUNKS_PER_PULL`]).
    Chunks(Vec<[u8; 32]>),
}

/// Chunks one answer carries, at most: 8 MiB, well within a frame.
pub const CHUNKS_PER_PULL: usize = 8;

/// The answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplResponse {
    /// What was pushed is durable here (or was already).
    Stored,
    Records {
        records: Vec<StoredRecord>,
        more: bool,
    },
    Entries {
        entries: Vec<SignedEntry>,
        more: bool,
    },
    Refused(String),
    /// The chunks asked for that this hub holds intact, with their bytes.
    Chunks(Vec<([u8; 32], Vec<u8>)>),
}

/// For a pull: the seq ranges of `mine` the asker lacks, per stream, as
/// `(relay, stream, after, until)` — records with seq in `after+1..=until`
/// that the asker's coverage does not hold. Pure.
pub fn missing(
    mine: &BTreeMap<(String, u64), Coverage>,
    have: &BTreeMap<(String, u64), Coverage>,
) -> Vec<(String, u64, u64, u64)> {
    let mut out = Vec::new();
    let empty = Coverage::default();
    // Range arithmetic, not seq by seq: a long stream costs what its ranges
    // cost.
    let ranges = |c: &Coverage| -> Vec<(u64, u64)> {
        let mut r = Vec::with_capacity(c.above.len() + 1);
        if c.applied > 0 {
            r.push((1, c.applied));
        }
        r.extend(c.above.iter().map(|(a, b)| (*a, *b)));
        r
    };
    for (key, cov) in mine {
        let theirs = ranges(have.get(key).unwrap_or(&empty));
        for (a, b) in ranges(cov) {
            // Parts of a..=b outside every range of theirs (sorted, disjoint).
            let mut s = a;
            for &(ta, tb) in &theirs {
                if tb < s {
                    continue;
                }
                if ta > b {
                    break;
                }
                if ta > s {
                    out.push((key.0.clone(), key.1, s - 1, ta - 1));
                }
                s = tb.saturating_add(1);
                if s > b {
                    break;
                }
            }
            if s <= b {
                out.push((key.0.clone(), key.1, s - 1, b));
            }
        }
    }
    out
}

/// Connections to other hubs for replication, one per address, opened on
/// first use and reopened after a failure.
#[derive(Clone)]
pub struct ReplClient {
    endpoint: MeshEndpoint,
    conns: Arc<Mutex<HashMap<SocketAddr, quinn::Connection>>>,
}

impl ReplClient {
    pub fn new(endpoint: MeshEndpoint) -> Self {
        ReplClient {
            endpoint,
            conns: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Sends `req` to the hub at `addr` and waits for its answer.
    pub async fn ask(&self, addr: SocketAddr, req: &ReplRequest) -> anyhow::Result<ReplResponse> {
        let frame = wire::encode(REPL_VERSION, req, MAX_REPL_FRAME)?;
        let conn = self.connection(addr).await?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            wire::write_frame(&mut send, &frame).await?;
            send.finish()?;
            wire::read_msg::<ReplResponse>(&mut recv, REPL_VERSION, MAX_REPL_FRAME)
                .await?
                .ok_or_else(|| anyhow::anyhow!("no answer"))
        };
        match tokio::time::timeout(TIMEOUT, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.forget(addr, &conn);
                Err(e)
            }
            Err(_) => {
                self.forget(addr, &conn);
                anyhow::bail!("no answer from {addr} within {TIMEOUT:?}")
            }
        }
    }

    async fn connection(&self, addr: SocketAddr) -> anyhow::Result<quinn::Connection> {
        let cached = self.conns.lock().expect("not poisoned").get(&addr).cloned();
        if let Some(c) = cached.filter(|c| c.close_reason().is_none()) {
            return Ok(c);
        }
        let (conn, _) = self.endpoint.connect(addr, Protocol::Replication).await?;
        self.conns
            .lock()
            .expect("not poisoned")
            .insert(addr, conn.clone());
        Ok(conn)
    }

    fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().expect("not poisoned");
        if conns.get(&addr).map(|c| c.stable_id()) == Some(conn.stable_id()) {
            conns.remove(&addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn cov(applied: u64, above: &[(u64, u64)]) -> Coverage {
        Coverage {
            applied,
            above: above.iter().copied().collect(),
        }
    }

    #[test]
    fn a_pull_asks_for_exactly_what_the_other_lacks() {
        let key = ("r".to_owned(), 7u64);
        let mine = BTreeMap::from([(key.clone(), cov(10, &[(15, 20)]))]);
        let have = BTreeMap::from([(key.clone(), cov(4, &[(6, 8), (16, 16)]))]);
        assert_eq!(
            missing(&mine, &have),
            vec![
                ("r".into(), 7, 4, 5),
                ("r".into(), 7, 8, 10),
                ("r".into(), 7, 14, 15),
                ("r".into(), 7, 16, 20),
            ]
        );
        let nothing = BTreeMap::new();
        assert_eq!(missing(&mine, &nothing)[0], ("r".into(), 7, 0, 10));
        assert!(missing(&mine, &mine).is_empty());
    }

    proptest! {
        #[test]
        fn what_is_missing_is_exactly_what_the_asker_lacks(
            a in proptest::collection::vec((1u64..40, 0u64..3), 0..12),
            b in proptest::collection::vec((1u64..40, 0u64..3), 0..12),
        ) {
            let key = ("r".to_owned(), 1u64);
            let mut mine = Coverage::default();
            for (s, l) in a { mine.add(s, s + l); }
            let mut theirs = Coverage::default();
            for (s, l) in b { theirs.add(s, s + l); }
            let gaps = missing(
                &BTreeMap::from([(key.clone(), mine.clone())]),
                &BTreeMap::from([(key.clone(), theirs.clone())]),
            );
            let mut after = theirs.clone();
            for (_, _, from, until) in &gaps {
                prop_assert!(from < until);
                // Nothing asked for that the asker holds or this hub lacks.
                for s in from + 1..=*until {
                    prop_assert!(!theirs.covers(s, s) && mine.covers(s, s), "seq {} asked for", s);
                }
                after.add(from + 1, *until);
            }
            for s in 1..50 {
                if mine.covers(s, s) {
                    prop_assert!(after.covers(s, s), "seq {} still missing", s);
                }
            }
        }
    }
}
