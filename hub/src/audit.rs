//! Checking the management log as a hub stores it: is every entry its
//! origin's, unaltered, in place, and does every origin's chain hold?
//!
//! The store reads its `log` rows, readable columns and all, and hands
//! them here with the origins' certificates; [`verify`] reports every
//! problem with the origin and seq it concerns. Pure apart from checking
//! certificates against the mesh CA.
//!
//! What a check can and cannot show is spelled out in
//! `docs/ARCHITECTURE.md` (Federation, the management log).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_node::id::Role;
use trellis_node::tls::{Credentials, Signer};

use crate::log::{Entry, EntryHash, NO_PREV, Op, entry_hash, hex};

/// One row of the store's `log` table as read, every column taken as it
/// is: `None` where a column does not hold the type it should (someone
/// edited the file).
#[derive(Debug, Clone, Default)]
pub struct AuditRow {
    pub origin: String,
    pub seq: u64,
    pub hlc_ms: Option<i64>,
    pub author: Option<String>,
    pub op: Option<String>,
    pub prev: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
    /// The signed entry ([`Entry::signing_bytes`]).
    pub entry: Option<Vec<u8>>,
    pub signature: Option<Vec<u8>>,
}

/// What is wrong with a stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditFault {
    /// The row's entry is not a log entry: the row was damaged or replaced.
    Undecodable,
    /// The row's origin or seq is not the signed entry's: rows were
    /// renumbered, moved or swapped.
    Misplaced {
        signed_origin: String,
        signed_seq: u64,
    },
    /// A readable column disagrees with the signed entry: the row was
    /// edited.
    Column {
        column: String,
        stored: String,
        signed: String,
    },
    /// The signature does not match the entry and the origin's
    /// certificate: the entry was altered.
    Signature,
    /// The origin's certificate is missing, not from the mesh CA, or names
    /// another hub: its entries' signatures were not checked.
    Certificate { reason: String },
    /// Seqs `from..=to` are absent: entries were removed.
    Missing { from: u64, to: u64 },
    /// `prev` is not the hash of the entry before: an earlier entry was
    /// altered, removed or reordered (or, at seq 1, `prev` is not zero).
    Chain,
    /// The log could not be read at all (the problem's origin is then the
    /// store's path): nothing was checked.
    Unreadable { reason: String },
}

/// A problem, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditProblem {
    pub origin: String,
    /// The seq of the row concerned (for [`AuditFault::Missing`], the first
    /// seq missing).
    pub seq: u64,
    pub what: AuditFault,
}

impl std::fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (o, s) = (&self.origin, self.seq);
        match &self.what {
            AuditFault::Undecodable => write!(
                f,
                "{o} seq {s}: the stored entry does not decode — the row was damaged or replaced"
            ),
            AuditFault::Misplaced {
                signed_origin,
                signed_seq,
            } => write!(
                f,
                "{o} seq {s}: the row holds the entry signed as {signed_origin} seq {signed_seq} — rows were renumbered, moved or swapped"
            ),
            AuditFault::Column {
                column,
                stored,
                signed,
            } => write!(
                f,
                "{o} seq {s}: column {column} says {stored:?} but the signed entry says {signed:?} — the row was edited"
            ),
            AuditFault::Signature => write!(
                f,
                "{o} seq {s}: signature does not match — the entry was altered"
            ),
            AuditFault::Certificate { reason } => write!(
                f,
                "{o}: its certificate cannot be used ({reason}); its entries' signatures were not checked"
            ),
            AuditFault::Missing { from, to } => {
                let what = if from == to {
                    format!("seq {from}")
                } else {
                    format!("seqs {from}–{to}")
                };
                if *from <= 1 {
                    write!(f, "{o}: {what} missing before {} — removed", to + 1)
                } else {
                    write!(
                        f,
                        "{o}: {what} missing between {} and {} — removed",
                        from - 1,
                        to + 1
                    )
                }
            }
            AuditFault::Chain if s <= 1 => write!(
                f,
                "{o} seq {s}: the first entry does not start the chain (its prev is not zero)"
            ),
            AuditFault::Chain => write!(
                f,
                "{o} seq {s}: prev does not match the hash of seq {} — an earlier entry was altered, removed or reordered",
                s - 1
            ),
            AuditFault::Unreadable { reason } => {
                write!(f, "{o}: the management log cannot be read: {reason}")
            }
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// Rows checked, per origin.
    pub checked: BTreeMap<String, u64>,
    /// Every problem found, by origin and seq.
    pub problems: Vec<AuditProblem>,
}

impl AuditVerdict {
    /// Whether the log is intact.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One entry as `GET /api/v1/audit` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub origin: String,
    pub seq: u64,
    pub hlc_ms: u64,
    pub author: String,
    /// The short human form (`put key=value`).
    pub op_text: String,
    /// The operation (a configuration's bundle bytes left out).
    pub op: Op,
    /// This entry's hash, hex.
    pub hash: String,
    /// The hash of the origin's entry before it, hex.
    pub prev: String,
}

impl AuditEntry {
    /// An entry as shown, from its signed bytes' decoding and signature.
    pub fn new(entry: Entry, signature: &[u8]) -> Self {
        let hash = entry_hash(&entry.signing_bytes(), signature);
        AuditEntry {
            op_text: entry.op.to_string(),
            hash: hex(&hash),
            prev: hex(&entry.prev),
            origin: entry.origin,
            seq: entry.seq,
            hlc_ms: entry.hlc.ms,
            author: entry.author,
            op: entry.op.without_bundle(),
        }
    }
}

/// The signer of `origin`'s log entries, if `cert` may be it: a hub
/// certificate of the mesh CA (by `trust`) naming `origin`. The one rule for
/// entries arriving from peers and for entries checked in the store.
pub fn origin_signer(trust: &Credentials, cert: &[u8], origin: &str) -> Result<Signer, String> {
    let signer = trust.verify_signer(cert).map_err(|e| e.to_string())?;
    if signer.identity.role != Role::Hub || signer.identity.name != origin {
        return Err(format!("the certificate is {}'s", signer.identity));
    }
    Ok(signer)
}

/// The certificate of each origin, checked once.
fn signers(
    certs: &BTreeMap<String, Vec<u8>>,
    trust: &Credentials,
    origin: &str,
) -> Result<Signer, String> {
    let der = certs
        .get(origin)
        .ok_or_else(|| "no certificate stored for it".to_owned())?;
    origin_signer(trust, der, origin)
}

/// Checks the rows of the `log` table, which must come in (origin, seq)
/// order, against themselves, their signatures (with `certs`, each
/// origin's certificate, checked against `trust`'s mesh CA) and their
/// origin's chain.
pub fn verify(
    rows: impl IntoIterator<Item = AuditRow>,
    certs: &BTreeMap<String, Vec<u8>>,
    trust: &Credentials,
) -> AuditVerdict {
    let mut verdict = AuditVerdict::default();
    let mut origin: Option<String> = None;
    let mut signer: Option<Signer> = None;
    let mut next_seq = 1;
    // The hash the next entry must carry as `prev`; `None` when it cannot
    // be known (after a hole, or a row that is not the entry it should be).
    let mut head: Option<EntryHash> = None;
    for row in rows {
        let problem = |what| AuditProblem {
            origin: row.origin.clone(),
            seq: row.seq,
            what,
        };
        if origin.as_deref() != Some(row.origin.as_str()) {
            origin = Some(row.origin.clone());
            next_seq = 1;
            head = Some(NO_PREV);
            signer = match signers(certs, trust, &row.origin) {
                Ok(s) => Some(s),
                Err(reason) => {
                    verdict
                        .problems
                        .push(problem(AuditFault::Certificate { reason }));
                    None
                }
            };
        }
        *verdict.checked.entry(row.origin.clone()).or_insert(0) += 1;
        if row.seq > next_seq {
            verdict.problems.push(AuditProblem {
                origin: row.origin.clone(),
                seq: next_seq,
                what: AuditFault::Missing {
                    from: next_seq,
                    to: row.seq - 1,
                },
            });
            head = None;
        }
        next_seq = next_seq.max(row.seq + 1);
        let entry = row
            .entry
            .as_deref()
            .and_then(|b| postcard::from_bytes::<Entry>(b).ok());
        let (Some(entry), Some(signature)) = (entry, row.signature.as_deref()) else {
            verdict.problems.push(problem(AuditFault::Undecodable));
            head = None;
            continue;
        };
        let signed_bytes = entry.signing_bytes();
        let hash = entry_hash(&signed_bytes, signature);
        let in_place = entry.origin == row.origin && entry.seq == row.seq;
        if !in_place {
            verdict.problems.push(problem(AuditFault::Misplaced {
                signed_origin: entry.origin.clone(),
                signed_seq: entry.seq,
            }));
        }
        if let Some(s) = &signer
            && s.verify(&signed_bytes, signature).is_err()
        {
            verdict.problems.push(problem(AuditFault::Signature));
        }
        let show_i64 = |v: Option<i64>| v.map_or("(not a number)".to_owned(), |v| v.to_string());
        let show_text = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not text)".to_owned());
        let show_hash = |v: &Option<Vec<u8>>| v.as_deref().map_or("(not bytes)".to_owned(), hex);
        let columns = [
            (
                "hlc_ms",
                row.hlc_ms == i64::try_from(entry.hlc.ms).ok(),
                show_i64(row.hlc_ms),
                entry.hlc.ms.to_string(),
            ),
            (
                "author",
                row.author.as_deref() == Some(entry.author.as_str()),
                show_text(&row.author),
                entry.author.clone(),
            ),
            (
                "op",
                row.op.as_deref() == Some(entry.op.to_string().as_str()),
                show_text(&row.op),
                entry.op.to_string(),
            ),
            (
                "prev",
                row.prev.as_deref() == Some(entry.prev.as_slice()),
                show_hash(&row.prev),
                hex(&entry.prev),
            ),
            (
                "hash",
                row.hash.as_deref() == Some(hash.as_slice()),
                show_hash(&row.hash),
                hex(&hash),
            ),
        ];
        for (column, same, stored, signed) in columns {
            if !same {
                verdict.problems.push(problem(AuditFault::Column {
                    column: column.to_owned(),
                    stored,
                    signed,
                }));
            }
        }
        if in_place
            && let Some(expected) = head
            && entry.prev != expected
        {
            verdict.problems.push(problem(AuditFault::Chain));
        }
        head = in_place.then_some(hash);
    }
    verdict
}

#[cfg(test)]
mod tests {
    use trellis_node::id::Identity;
    use trellis_node::tls::MeshCa;

    use super::*;
    use crate::log::{Hlc, SignedEntry};

    fn hub(ca: &MeshCa, name: &str) -> Credentials {
        Credentials::issue(ca, &Identity::new(Role::Hub, "eu", "", name).unwrap()).unwrap()
    }

    /// Rows of `n` chained entries signed by `creds`, as the store writes them.
    fn rows(creds: &Credentials, n: u64) -> Vec<AuditRow> {
        let mut prev = NO_PREV;
        (1..=n)
            .map(|seq| {
                let entry = Entry {
                    origin: creds.identity.name.clone(),
                    seq,
                    hlc: Hlc {
                        ms: 1_000 + seq,
                        counter: 0,
                    },
                    author: "alice".into(),
                    op: Op::Put {
                        key: "k".into(),
                        value: format!("v{seq}"),
                    },
                    prev,
                };
                let signature = creds.sign(&entry.signing_bytes()).unwrap();
                let signed = SignedEntry {
                    entry,
                    cert: creds.cert_der().to_vec(),
                    signature,
                };
                prev = signed.hash();
                AuditRow {
                    origin: signed.entry.origin.clone(),
                    seq,
                    hlc_ms: Some(signed.entry.hlc.ms as i64),
                    author: Some(signed.entry.author.clone()),
                    op: Some(signed.entry.op.to_string()),
                    prev: Some(signed.entry.prev.to_vec()),
                    hash: Some(prev.to_vec()),
                    entry: Some(signed.entry.signing_bytes()),
                    signature: Some(signed.signature),
                }
            })
            .collect()
    }

    #[test]
    fn a_certificate_for_another_hub_or_from_another_ca_is_reported_once() {
        let ca = MeshCa::generate("test").unwrap();
        let a = hub(&ca, "hub-a");
        let certs = BTreeMap::from([("hub-a".to_owned(), hub(&ca, "hub-b").cert_der().to_vec())]);
        let v = verify(rows(&a, 3), &certs, &a);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        assert!(matches!(v.problems[0].what, AuditFault::Certificate { .. }));
        assert_eq!(v.checked["hub-a"], 3);
        let foreign = hub(&MeshCa::generate("other").unwrap(), "hub-a");
        let certs = BTreeMap::from([("hub-a".to_owned(), foreign.cert_der().to_vec())]);
        let v = verify(rows(&foreign, 2), &certs, &a);
        assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
        let v = verify(rows(&a, 2), &BTreeMap::new(), &a);
        assert_eq!(
            v.problems.len(),
            1,
            "no certificate at all: {:?}",
            v.problems
        );
    }

    #[test]
    fn a_chain_that_does_not_start_at_zero_is_reported_at_seq_1() {
        let ca = MeshCa::generate("test").unwrap();
        let a = hub(&ca, "hub-a");
        let certs = BTreeMap::from([("hub-a".to_owned(), a.cert_der().to_vec())]);
        // The origin itself signed a first entry that follows something.
        let mut r = rows(&a, 2);
        let mut e: Entry = postcard::from_bytes(r[0].entry.as_deref().unwrap()).unwrap();
        e.prev = [9; 32];
        let signature = a.sign(&e.signing_bytes()).unwrap();
        r[0].prev = Some(e.prev.to_vec());
        r[0].hash = Some(entry_hash(&e.signing_bytes(), &signature).to_vec());
        r[0].entry = Some(e.signing_bytes());
        r[0].signature = Some(signature);
        let v = verify(r, &certs, &a);
        let got: Vec<(u64, &AuditFault)> = v.problems.iter().map(|p| (p.seq, &p.what)).collect();
        assert_eq!(got, vec![(1, &AuditFault::Chain), (2, &AuditFault::Chain)]);
        assert_eq!(
            v.problems[0].to_string(),
            "hub-a seq 1: the first entry does not start the chain (its prev is not zero)"
        );
    }

    #[test]
    fn problems_read_as_what_happened_and_where() {
        let p = |seq, what| AuditProblem {
            origin: "hub-a".into(),
            seq,
            what,
        };
        assert_eq!(
            p(17, AuditFault::Signature).to_string(),
            "hub-a seq 17: signature does not match — the entry was altered"
        );
        assert_eq!(
            p(17, AuditFault::Missing { from: 17, to: 17 }).to_string(),
            "hub-a: seq 17 missing between 16 and 18 — removed"
        );
        assert_eq!(
            p(1, AuditFault::Missing { from: 1, to: 2 }).to_string(),
            "hub-a: seqs 1–2 missing before 3 — removed"
        );
        assert_eq!(
            p(5, AuditFault::Chain).to_string(),
            "hub-a seq 5: prev does not match the hash of seq 4 — an earlier entry was altered, removed or reordered"
        );
        let json = serde_json::to_value(p(3, AuditFault::Missing { from: 3, to: 4 })).unwrap();
        assert_eq!(json["what"]["kind"], "missing");
        assert_eq!(
            serde_json::from_value::<AuditProblem>(json).unwrap(),
            p(3, AuditFault::Missing { from: 3, to: 4 })
        );
    }
}
