//! The hub's durable state: every record relays sent, and how far each
//! relay's record stream is applied, in SQLite (WAL, `synchronous = FULL`).
//!
//! A batch of records from any number of relays is one transaction; the hub
//! acknowledges records only after it committed. `(relay, stream, seq)` is
//! the primary key, so a record stored twice is stored once. The writer
//! lives on a thread of its own; queries open their own read connections
//! (WAL lets them read while the writer writes).
//!
//! The management log's table keeps, next to each signed entry, readable
//! columns (`hlc_ms`, `author`, `op`, `prev`, `hash`) so that an operator
//! can read it with `sqlite3`; [`HubStore::verify_audit`] checks them
//! against the signed entries. The schema's version is SQLite's
//! `user_version`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use trellis_relay::summary::SiteSummary;
use trellis_relay::uplink::{Record, RecordBody};

use crate::audit::{self, AuditEntry, AuditRow, AuditVerdict};
use crate::log::{Entry, EntryHash, SignedEntry, entry_hash};
use trellis_node::tls::Credentials;

/// The store's schema version (`PRAGMA user_version`). 0: before the
/// management log was hash-chained (no version was set); 1: chained, with
/// readable columns.
pub const SCHEMA_VERSION: i64 = 1;

/// Why the store failed. A failed commit stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed; a failed transaction changed nothing.
    #[error("hub store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The store's directory could not be created.
    #[error("hub store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The store holds log entries written before entries were chained;
    /// it was left as it is.
    #[error(
        "hub store {path} predates the audit chain: its management log holds {entries} \
         entries without hashes, which this hub cannot verify or extend. Move the file aside \
         (with its -wal and -shm files, e.g. to {path}.pre-audit) and start the hub again: \
         it pulls the log and the relay records from the other hubs (a hub without peers \
         starts with an empty desired state)"
    )]
    PredatesAuditChain { path: PathBuf, entries: u64 },
    /// The store was written by a newer Trellis; it was left as it is.
    #[error(
        "hub store {path} has schema version {found}, newer than this hub's ({SCHEMA_VERSION}); \
         run the newer trellis-hub, or point [store] path at another file"
    )]
    TooNew { path: PathBuf, found: i64 },
}

/// A record with where it came from, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub relay: String,
    pub stream: u64,
    pub region: String,
    pub site: String,
    pub seq: u64,
    /// The last seq the record stands for (its own, or a gap's end).
    pub until: u64,
    pub kind: String,
    /// The relay's clock when the record was made (ms since epoch).
    pub at_ms: u64,
    /// The hub's clock when it was stored.
    pub received_ms: u64,
    pub body: RecordBody,
}

/// One relay's stream as stored: applied through `applied_through`, plus
/// the ranges applied beyond it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRow {
    pub relay: String,
    pub stream: u64,
    pub region: String,
    pub site: String,
    pub applied_through: u64,
    pub above: BTreeMap<u64, u64>,
}

/// What to write in one commit.
#[derive(Debug, Clone)]
pub struct Batch {
    pub records: Vec<StoredRecord>,
    /// New `applied_through` of each stream touched.
    pub streams: Vec<(String, u64, String, String, u64)>,
}

/// A filter for [`StoreReader::records`].
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub region: Option<String>,
    pub site: Option<String>,
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    /// Only these kinds (`summary`, `gap`, `node_died`, …); all if empty.
    pub kinds: Vec<String>,
    /// Everything but summaries (events and gaps).
    pub no_summaries: bool,
    /// The newest `limit` records (still returned newest first) instead
    /// of the oldest.
    pub newest_first: bool,
    pub limit: usize,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

/// The writer's side of the store.
pub struct HubStore {
    conn: Connection,
    path: PathBuf,
    commits: u64,
}

impl HubStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: path.to_owned(),
                source,
            })?;
        }
        let err = sqlite_err(path);
        let mut conn = Connection::open(path).map_err(err)?;
        configure(&conn).map_err(err)?;
        upgrade(&mut conn, path)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS streams (
                 relay TEXT NOT NULL,
                 stream INTEGER NOT NULL,
                 region TEXT NOT NULL,
                 site TEXT NOT NULL,
                 applied_through INTEGER NOT NULL,
                 PRIMARY KEY (relay, stream));
             CREATE TABLE IF NOT EXISTS records (
                 relay TEXT NOT NULL,
                 stream INTEGER NOT NULL,
                 seq INTEGER NOT NULL,
                 until_seq INTEGER NOT NULL,
                 region TEXT NOT NULL,
                 site TEXT NOT NULL,
                 kind TEXT NOT NULL,
                 at_ms INTEGER NOT NULL,
                 received_ms INTEGER NOT NULL,
                 body BLOB NOT NULL,
                 PRIMARY KEY (relay, stream, seq));
             CREATE INDEX IF NOT EXISTS records_by_site ON records (region, site, at_ms);
             CREATE INDEX IF NOT EXISTS records_by_time ON records (at_ms);
             -- Events without summaries (GET /api/v1/events, the
             -- dashboard): without it, finding the oldest events walks
             -- every summary before them, which grows with the history.
             CREATE INDEX IF NOT EXISTS records_events
                 ON records (at_ms, relay, stream, seq) WHERE kind != 'summary';
             CREATE TABLE IF NOT EXISTS log (
                 origin TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 hlc_ms INTEGER NOT NULL,
                 author TEXT NOT NULL,
                 op TEXT NOT NULL,
                 prev BLOB NOT NULL,
                 hash BLOB NOT NULL,
                 entry BLOB NOT NULL,
                 signature BLOB NOT NULL,
                 PRIMARY KEY (origin, seq));
             CREATE INDEX IF NOT EXISTS log_by_time ON log (hlc_ms);
             CREATE TABLE IF NOT EXISTS certs (
                 origin TEXT PRIMARY KEY,
                 der BLOB NOT NULL);",
        )
        .map_err(err)?;
        Ok(HubStore {
            conn,
            path: path.to_owned(),
            commits: 0,
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        sqlite_err(&self.path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits made since open.
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Writes a batch in one transaction (one fsync).
    pub fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO records
                     (relay, stream, seq, until_seq, region, site, kind, at_ms, received_ms, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(err)?;
            for r in &batch.records {
                let body = postcard::to_stdvec(&r.body).expect("records serialise");
                insert
                    .execute(params![
                        r.relay,
                        r.stream as i64,
                        r.seq as i64,
                        r.until as i64,
                        r.region,
                        r.site,
                        r.kind,
                        r.at_ms as i64,
                        r.received_ms as i64,
                        body
                    ])
                    .map_err(err)?;
            }
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO streams (relay, stream, region, site, applied_through)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (relay, stream) DO UPDATE SET applied_through = excluded.applied_through",
                )
                .map_err(err)?;
            for (relay, stream, region, site, through) in &batch.streams {
                upsert
                    .execute(params![
                        relay,
                        *stream as i64,
                        region,
                        site,
                        *through as i64
                    ])
                    .map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        self.commits += 1;
        Ok(())
    }

    /// Appends log entries (in one transaction). The origin's certificate
    /// is kept once per origin.
    pub fn commit_log(&mut self, entries: &[SignedEntry]) -> Result<(), StoreError> {
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO log
                     (origin, seq, hlc_ms, author, op, prev, hash, entry, signature)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .map_err(err)?;
            let mut cert = tx
                .prepare_cached("INSERT OR REPLACE INTO certs (origin, der) VALUES (?1, ?2)")
                .map_err(err)?;
            for e in entries {
                let signed = e.entry.signing_bytes();
                insert
                    .execute(params![
                        e.entry.origin,
                        e.entry.seq as i64,
                        e.entry.hlc.ms as i64,
                        e.entry.author,
                        e.entry.op.to_string(),
                        e.entry.prev.as_slice(),
                        entry_hash(&signed, &e.signature).as_slice(),
                        signed,
                        e.signature
                    ])
                    .map_err(err)?;
                cert.execute(params![e.entry.origin, e.cert]).map_err(err)?;
            }
        }
        tx.commit().map_err(err)?;
        self.commits += 1;
        Ok(())
    }

    /// Every log entry with its hash, in (origin, seq) order (to rebuild
    /// the log's state at start). The hash is computed from the signed
    /// entry and signature, not read from the `hash` column.
    pub fn log_entries(&self) -> Result<Vec<(Entry, EntryHash)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT entry, signature FROM log ORDER BY origin, seq")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (entry, signature) = row.map_err(self.err())?;
            if let Ok(e) = postcard::from_bytes::<Entry>(&entry) {
                let hash = entry_hash(&e.signing_bytes(), &signature);
                out.push((e, hash));
            }
        }
        Ok(out)
    }

    /// Checks the management log as stored in the file — every row, read
    /// afresh from the database in (origin, seq) order — against its
    /// signatures, its readable columns and each origin's hash chain;
    /// `trust` holds the mesh CA the origins' certificates must chain to.
    pub fn verify_audit(&self, trust: &Credentials) -> AuditVerdict {
        verify_audit_on(&self.conn, &self.path, trust)
    }

    /// Every stream, with the ranges applied beyond its watermark.
    pub fn streams(&self) -> Result<Vec<StreamRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT relay, stream, region, site, applied_through FROM streams")
            .map_err(self.err())?;
        let mut rows: Vec<StreamRow> = stmt
            .query_map([], |r| {
                Ok(StreamRow {
                    relay: r.get(0)?,
                    stream: r.get::<_, i64>(1)? as u64,
                    region: r.get(2)?,
                    site: r.get(3)?,
                    applied_through: r.get::<_, i64>(4)? as u64,
                    above: BTreeMap::new(),
                })
            })
            .map_err(self.err())?
            .collect::<Result<_, _>>()
            .map_err(self.err())?;
        let mut above = self
            .conn
            .prepare(
                "SELECT seq, until_seq FROM records WHERE relay = ?1 AND stream = ?2 AND seq > ?3",
            )
            .map_err(self.err())?;
        for row in &mut rows {
            let ranges = above
                .query_map(
                    params![row.relay, row.stream as i64, row.applied_through as i64],
                    |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
                )
                .map_err(self.err())?;
            for range in ranges {
                let (a, b) = range.map_err(self.err())?;
                row.above.insert(a, b);
            }
        }
        Ok(rows)
    }

    /// The newest summary of every site (by the relays' clocks).
    pub fn latest_summaries(&self) -> Result<Vec<SiteSummary>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT body FROM records AS r WHERE kind = 'summary' AND at_ms = (
                     SELECT max(at_ms) FROM records
                     WHERE kind = 'summary' AND region = r.region AND site = r.site)",
            )
            .map_err(self.err())?;
        let bodies = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for b in bodies {
            if let Ok(RecordBody::Summary(s)) = postcard::from_bytes(&b.map_err(self.err())?) {
                out.push(*s);
            }
        }
        Ok(out)
    }

    /// Deletes records made before `before_ms`, except each site's newest
    /// summary. Returns how many went.
    pub fn prune(&mut self, before_ms: u64) -> Result<u64, StoreError> {
        let n = self
            .conn
            .execute(
                "DELETE FROM records WHERE at_ms < ?1 AND NOT (kind = 'summary' AND at_ms = (
                     SELECT max(at_ms) FROM records AS s
                     WHERE s.kind = 'summary' AND s.region = records.region AND s.site = records.site))",
                [before_ms as i64],
            )
            .map_err(self.err())?;
        Ok(n as u64)
    }
}

/// Read-only access for the API, one connection per query.
#[derive(Clone)]
pub struct StoreReader {
    path: PathBuf,
}

impl StoreReader {
    pub fn new(path: &Path) -> Self {
        StoreReader {
            path: path.to_owned(),
        }
    }

    /// Records matching `q`, oldest first (by the relays' clocks, then
    /// relay, stream and seq).
    pub fn records(&self, q: &Query) -> Result<Vec<StoredRecord>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = self.open().map_err(err)?;
        let (sql, args) = records_sql(q);
        let mut stmt = conn.prepare(&sql).map_err(err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args), row_to_record)
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(r) = row.map_err(err)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Log entries of `origin` after `after`, in order, at most `limit`.
    pub fn log_after(
        &self,
        origin: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SignedEntry>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = self.open().map_err(err)?;
        let cert: Vec<u8> = conn
            .query_row("SELECT der FROM certs WHERE origin = ?1", [origin], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?
            .unwrap_or_default();
        let mut stmt = conn
            .prepare(
                "SELECT entry, signature FROM log WHERE origin = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(params![origin, after as i64, limit as i64], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (entry, signature) = row.map_err(err)?;
            if let Ok(entry) = postcard::from_bytes::<Entry>(&entry) {
                out.push(SignedEntry {
                    entry,
                    cert: cert.clone(),
                    signature,
                });
            }
        }
        Ok(out)
    }

    /// One log entry, if held and readable.
    pub fn log_entry(&self, origin: &str, seq: u64) -> Result<Option<Entry>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = self.open().map_err(err)?;
        let blob: Option<Vec<u8>> = conn
            .query_row(
                "SELECT entry FROM log WHERE origin = ?1 AND seq = ?2",
                params![origin, seq as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)?;
        Ok(blob.and_then(|b| postcard::from_bytes::<Entry>(&b).ok()))
    }

    /// Log entries oldest first (by their hybrid clock, then origin and
    /// seq): from `since_ms` on, of `origin` only if given, at most
    /// `limit`. Rows whose entry does not decode are left out
    /// ([`StoreReader::verify_audit`] reports them).
    pub fn audit(
        &self,
        since_ms: Option<u64>,
        origin: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = self.open().map_err(err)?;
        let mut stmt = conn
            .prepare(
                "SELECT entry, signature FROM log
                 WHERE hlc_ms >= ?1 AND (?2 IS NULL OR origin = ?2)
                 ORDER BY hlc_ms, origin, seq LIMIT ?3",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(
                params![
                    since_ms.unwrap_or(0).min(i64::MAX as u64) as i64,
                    origin,
                    limit.min(i64::MAX as usize) as i64
                ],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            let (entry, signature) = row.map_err(err)?;
            if let Ok(entry) = postcard::from_bytes::<Entry>(&entry) {
                out.push(AuditEntry::new(entry, &signature));
            }
        }
        Ok(out)
    }

    /// [`HubStore::verify_audit`] on a read connection of its own, so that
    /// the writer goes on committing meanwhile.
    pub fn verify_audit(&self, trust: &Credentials) -> Result<AuditVerdict, StoreError> {
        let conn = self.open().map_err(sqlite_err(&self.path))?;
        Ok(verify_audit_on(&conn, &self.path, trust))
    }

    /// Records of one relay stream with seq after `after`, in order, at
    /// most `limit`.
    pub fn stream_after(
        &self,
        relay: &str,
        stream: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = self.open().map_err(err)?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT relay, stream, region, site, seq, until_seq, kind, at_ms, received_ms, body
                 FROM records WHERE relay = ?1 AND stream = ?2 AND seq > ?3 ORDER BY seq LIMIT ?4",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map(
                params![relay, stream as i64, after as i64, limit as i64],
                row_to_record,
            )
            .map_err(err)?;
        let mut out = Vec::new();
        for row in rows {
            if let Some(r) = row.map_err(err)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// The stored state of one relay stream, if any.
    pub fn applied_through(&self, relay: &str, stream: u64) -> Result<Option<u64>, StoreError> {
        let err = sqlite_err(&self.path);
        let conn = Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(err)?;
        conn.query_row(
            "SELECT applied_through FROM streams WHERE relay = ?1 AND stream = ?2",
            params![relay, stream as i64],
            |r| r.get::<_, i64>(0),
        )
        .optional()
        .map(|v| v.map(|v| v as u64))
        .map_err(err)
    }
}

/// Turns SQLite's errors into [`StoreError::Sqlite`] naming the file.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    |source| StoreError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// Brings a store of an older schema to [`SCHEMA_VERSION`], or refuses it.
fn upgrade(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = sqlite_err(path);
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
        });
    }
    // Version 0: a new file, or one from before the chain. Its log table,
    // if any, has no readable columns and its entries no `prev`: an empty
    // one is replaced, one with entries cannot be carried over.
    let tx = conn.transaction().map_err(err)?;
    let old_log: bool = tx
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'log'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(err)?
        > 0;
    if old_log {
        let entries: i64 = tx
            .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
            .map_err(err)?;
        if entries > 0 {
            return Err(StoreError::PredatesAuditChain {
                path: path.to_owned(),
                entries: entries as u64,
            });
        }
        tx.execute_batch("DROP TABLE log; DROP TABLE IF EXISTS certs;")
            .map_err(err)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(err)?;
    tx.commit().map_err(err)
}

/// Reads every `log` row, and the origins' certificates, in one read
/// transaction, and checks them. A database error (the file unreadable,
/// the table gone) is reported as a problem rather than failing: the
/// verdict is then not ok.
fn verify_audit_on(conn: &Connection, path: &Path, trust: &Credentials) -> AuditVerdict {
    let read = || -> rusqlite::Result<AuditVerdict> {
        conn.execute_batch("BEGIN")?;
        let certs = {
            let mut stmt = conn.prepare("SELECT origin, der FROM certs")?;
            stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<rusqlite::Result<BTreeMap<_, _>>>()?
        };
        let mut stmt = conn.prepare(
            "SELECT origin, seq, hlc_ms, author, op, prev, hash, entry, signature
             FROM log ORDER BY origin, seq",
        )?;
        let rows = stmt
            .query_map([], |r| {
                use rusqlite::types::Value;
                let v = |i| r.get::<_, Value>(i);
                let text = |x: Value| match x {
                    Value::Text(t) => Some(t),
                    _ => None,
                };
                let blob = |x: Value| match x {
                    Value::Blob(b) => Some(b),
                    _ => None,
                };
                let int = |x: Value| match x {
                    Value::Integer(i) => Some(i),
                    _ => None,
                };
                Ok(AuditRow {
                    origin: match v(0)? {
                        Value::Text(t) => t,
                        other => format!("{other:?}"),
                    },
                    seq: int(v(1)?).map_or(0, |s| s.max(0) as u64),
                    hlc_ms: int(v(2)?),
                    author: text(v(3)?),
                    op: text(v(4)?),
                    prev: blob(v(5)?),
                    hash: blob(v(6)?),
                    entry: blob(v(7)?),
                    signature: blob(v(8)?),
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        drop(stmt);
        conn.execute_batch("COMMIT")?;
        Ok(audit::verify(rows, &certs, trust))
    };
    read().unwrap_or_else(|e| {
        let _ = conn.execute_batch("ROLLBACK");
        AuditVerdict {
            checked: BTreeMap::new(),
            problems: vec![audit::AuditProblem {
                origin: path.display().to_string(),
                seq: 0,
                what: audit::AuditFault::Unreadable {
                    reason: e.to_string(),
                },
            }],
        }
    })
}

/// Reads a `records` row (in the column order the queries use); `None`
/// for a body that does not decode.
fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<StoredRecord>> {
    let body: Vec<u8> = r.get(9)?;
    let Ok(body) = postcard::from_bytes(&body) else {
        return Ok(None);
    };
    Ok(Some(StoredRecord {
        relay: r.get(0)?,
        stream: r.get::<_, i64>(1)? as u64,
        region: r.get(2)?,
        site: r.get(3)?,
        seq: r.get::<_, i64>(4)? as u64,
        until: r.get::<_, i64>(5)? as u64,
        kind: r.get(6)?,
        at_ms: r.get::<_, i64>(7)? as u64,
        received_ms: r.get::<_, i64>(8)? as u64,
        body,
    }))
}

/// A record as the store keeps it.
pub fn stored(
    relay: &str,
    stream: u64,
    region: &str,
    site: &str,
    record: &Record,
    received_ms: u64,
) -> StoredRecord {
    StoredRecord {
        relay: relay.to_owned(),
        stream,
        region: region.to_owned(),
        site: site.to_owned(),
        seq: record.seq,
        until: record.until(),
        kind: record.body.kind().to_owned(),
        at_ms: record.at_ms,
        received_ms,
        body: record.body.clone(),
    }
}

/// The SQL of a records query, and its arguments.
fn records_sql(q: &Query) -> (String, Vec<rusqlite::types::Value>) {
    let mut sql = String::from(
        "SELECT relay, stream, region, site, seq, until_seq, kind, at_ms, received_ms, body
         FROM records WHERE 1 = 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, v: rusqlite::types::Value| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} ?{}", args.len()));
    };
    if let Some(r) = &q.region {
        arg(&mut sql, "region =", r.clone().into());
    }
    if let Some(s) = &q.site {
        arg(&mut sql, "site =", s.clone().into());
    }
    if let Some(f) = q.from_ms {
        arg(&mut sql, "at_ms >=", (f as i64).into());
    }
    if let Some(t) = q.to_ms {
        arg(&mut sql, "at_ms <=", (t as i64).into());
    }
    // Said outright when the kinds asked for leave summaries out, too:
    // SQLite uses the partial index `records_events` only for a query
    // that states its condition.
    if q.no_summaries || (!q.kinds.is_empty() && !q.kinds.iter().any(|k| k == "summary")) {
        sql.push_str(" AND kind != 'summary'");
    }
    if !q.kinds.is_empty() {
        let marks: Vec<String> = q
            .kinds
            .iter()
            .map(|k| {
                args.push(k.clone().into());
                format!("?{}", args.len())
            })
            .collect();
        sql.push_str(&format!(" AND kind IN ({})", marks.join(", ")));
    }
    args.push((q.limit.max(1) as i64).into());
    let order = if q.newest_first {
        "at_ms DESC, relay DESC, stream DESC, seq DESC"
    } else {
        "at_ms, relay, stream, seq"
    };
    sql.push_str(&format!(" ORDER BY {order} LIMIT ?{}", args.len()));
    (sql, args)
}

#[cfg(test)]
mod tests {
    use trellis_node::id::{Identity, Role};
    use trellis_node::tls::MeshCa;
    use trellis_relay::uplink::{Event, Gap};

    use super::*;
    use crate::audit::{AuditFault, AuditProblem};
    use crate::log::{LogCore, NO_PREV, Op};

    fn rec(seq: u64, at_ms: u64, body: RecordBody) -> StoredRecord {
        stored(
            "par-relay",
            7,
            "eu",
            "par",
            &Record { seq, at_ms, body },
            at_ms,
        )
    }

    fn summary(at_ms: u64, dead: u32) -> RecordBody {
        RecordBody::Summary(Box::new(SiteSummary {
            nodes_dead: dead,
            ..SiteSummary::empty("eu", "par", "par-relay", at_ms)
        }))
    }

    #[test]
    fn committed_records_and_watermarks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        {
            let mut s = HubStore::open(&path).unwrap();
            let batch = Batch {
                records: vec![
                    rec(1, 10, summary(10, 0)),
                    rec(
                        2,
                        11,
                        RecordBody::Event(Event::NodeDied { node: "n1".into() }),
                    ),
                    rec(
                        5,
                        12,
                        RecordBody::Gap(Gap {
                            until: 6,
                            events_dropped: 2,
                            ..Gap::default()
                        }),
                    ),
                ],
                streams: vec![("par-relay".into(), 7, "eu".into(), "par".into(), 2)],
            };
            s.commit(&batch).unwrap();
            // Stored again: nothing changes.
            s.commit(&batch).unwrap();
        }
        let s = HubStore::open(&path).unwrap();
        let streams = s.streams().unwrap();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].applied_through, 2);
        assert_eq!(streams[0].above, BTreeMap::from([(5, 6)]));
        let all = StoreReader::new(&path)
            .records(&Query {
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 5]);
        assert_eq!(all[2].until, 6);
    }

    #[test]
    fn queries_filter_by_site_time_and_kind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let mut s = HubStore::open(&path).unwrap();
        let mut records: Vec<StoredRecord> = (1..=10)
            .map(|i| rec(i, i * 100, summary(i * 100, 0)))
            .collect();
        records.push(rec(
            11,
            550,
            RecordBody::Event(Event::NodeJoined { node: "x".into() }),
        ));
        s.commit(&Batch {
            records,
            streams: vec![],
        })
        .unwrap();
        let r = StoreReader::new(&path);
        let window = r
            .records(&Query {
                site: Some("par".into()),
                from_ms: Some(300),
                to_ms: Some(600),
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(
            window.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![3, 4, 5, 11, 6],
            "ordered by the relay's clock"
        );
        let events = r
            .records(&Query {
                no_summaries: true,
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert_eq!(events.len(), 1);
        let none = r
            .records(&Query {
                site: Some("ber".into()),
                limit: 100,
                ..Query::default()
            })
            .unwrap();
        assert!(none.is_empty());
        let latest = s.latest_summaries().unwrap();
        assert_eq!(latest.len(), 1);
        assert_eq!(latest[0].generated_ms, 1000);
    }

    #[test]
    fn pruning_keeps_each_sites_newest_summary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let mut s = HubStore::open(&path).unwrap();
        s.commit(&Batch {
            records: (1..=5)
                .map(|i| rec(i, i * 100, summary(i * 100, 0)))
                .collect(),
            streams: vec![],
        })
        .unwrap();
        assert_eq!(s.prune(10_000).unwrap(), 4);
        assert_eq!(s.latest_summaries().unwrap()[0].generated_ms, 500);
    }

    fn hub(ca: &MeshCa, name: &str) -> Credentials {
        Credentials::issue(ca, &Identity::new(Role::Hub, "eu", "", name).unwrap()).unwrap()
    }

    /// `n` writes of `creds`'s hub, made and signed the way the hub does.
    fn writes(creds: &Credentials, n: u64, start_ms: u64) -> Vec<SignedEntry> {
        let mut log = LogCore::new(creds.identity.name.clone());
        (1..=n)
            .map(|i| {
                let entry = log.write(
                    start_ms + i * 1000,
                    "alice",
                    Op::Put {
                        key: format!("k{i}"),
                        value: format!("v{i}"),
                    },
                );
                let signature = creds.sign(&entry.signing_bytes()).unwrap();
                let signed = SignedEntry {
                    entry,
                    cert: creds.cert_der().to_vec(),
                    signature,
                };
                log.apply(&signed.entry, signed.hash());
                signed
            })
            .collect()
    }

    /// A store holding 4 entries of hub-a and 2 of hub-b, and a hub of the
    /// same mesh to check them with.
    fn audited() -> (tempfile::TempDir, HubStore, Credentials, Vec<SignedEntry>) {
        let ca = MeshCa::generate("test").unwrap();
        let (a, b) = (hub(&ca, "hub-a"), hub(&ca, "hub-b"));
        let dir = tempfile::tempdir().unwrap();
        let mut s = HubStore::open(&dir.path().join("hub.db")).unwrap();
        let of_a = writes(&a, 4, 10_000);
        s.commit_log(&of_a).unwrap();
        s.commit_log(&writes(&b, 2, 20_000)).unwrap();
        (dir, s, hub(&ca, "hub-c"), of_a)
    }

    /// What an operator with sqlite3 could do to the file.
    fn tamper(s: &HubStore, sql: &str) {
        let conn = Connection::open(s.path()).unwrap();
        conn.execute_batch(sql).unwrap();
    }

    fn faults(problems: &[AuditProblem]) -> Vec<(&str, u64, &AuditFault)> {
        problems
            .iter()
            .map(|p| (p.origin.as_str(), p.seq, &p.what))
            .collect()
    }

    #[test]
    fn an_intact_log_verifies_from_the_file_and_counts_each_origin() {
        let (_dir, s, trust, of_a) = audited();
        let v = s.verify_audit(&trust);
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(
            v.checked,
            BTreeMap::from([("hub-a".to_owned(), 4), ("hub-b".to_owned(), 2)])
        );
        assert_eq!(StoreReader::new(s.path()).verify_audit(&trust).unwrap(), v);
        // The readable columns say what the entries say.
        let conn = Connection::open(s.path()).unwrap();
        let (hlc_ms, author, op, prev, hash): (i64, String, String, Vec<u8>, Vec<u8>) = conn
            .query_row(
                "SELECT hlc_ms, author, op, prev, hash FROM log WHERE origin = 'hub-a' AND seq = 2",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!(hlc_ms, 12_000);
        assert_eq!(author, "alice");
        assert_eq!(op, "put k2=v2");
        assert_eq!(prev, of_a[0].hash());
        assert_eq!(hash, of_a[1].hash());
        assert_eq!(of_a[0].entry.prev, NO_PREV);
    }

    #[test]
    fn an_edited_readable_column_is_reported_at_its_row() {
        let (_dir, s, trust, _) = audited();
        tamper(
            &s,
            "UPDATE log SET op = 'put k2=evil' WHERE origin = 'hub-a' AND seq = 2",
        );
        let v = s.verify_audit(&trust);
        assert_eq!(
            faults(&v.problems),
            vec![(
                "hub-a",
                2,
                &AuditFault::Column {
                    column: "op".into(),
                    stored: "put k2=evil".into(),
                    signed: "put k2=v2".into()
                }
            )]
        );
    }

    #[test]
    fn an_entry_altered_inside_its_blob_fails_its_signature_and_breaks_the_chain() {
        let (_dir, s, trust, of_a) = audited();
        // Rewrite the signed entry and every readable column to match, as
        // a careful forger would; only the origin's key is out of reach.
        let mut forged = of_a[1].entry.clone();
        forged.author = "mallory".into();
        let bytes = forged.signing_bytes();
        let hash = entry_hash(&bytes, &of_a[1].signature);
        let conn = Connection::open(s.path()).unwrap();
        conn.execute(
            "UPDATE log SET entry = ?1, author = 'mallory', hash = ?2 WHERE origin = 'hub-a' AND seq = 2",
            params![bytes, hash.as_slice()],
        )
        .unwrap();
        let v = s.verify_audit(&trust);
        assert_eq!(
            faults(&v.problems),
            vec![
                ("hub-a", 2, &AuditFault::Signature),
                ("hub-a", 3, &AuditFault::Chain)
            ]
        );
        assert_eq!(
            v.problems[0].to_string(),
            "hub-a seq 2: signature does not match — the entry was altered"
        );
    }

    #[test]
    fn a_deleted_row_is_reported_missing_where_it_was() {
        let (_dir, s, trust, _) = audited();
        tamper(&s, "DELETE FROM log WHERE origin = 'hub-a' AND seq = 3");
        let v = s.verify_audit(&trust);
        assert_eq!(
            faults(&v.problems),
            vec![("hub-a", 3, &AuditFault::Missing { from: 3, to: 3 })]
        );
        assert_eq!(
            v.problems[0].to_string(),
            "hub-a: seq 3 missing between 2 and 4 — removed"
        );
        assert_eq!(v.checked["hub-a"], 3);
    }

    #[test]
    fn two_rows_whose_seqs_were_swapped_are_reported() {
        let (_dir, s, trust, _) = audited();
        tamper(
            &s,
            "UPDATE log SET seq = -1 WHERE origin = 'hub-a' AND seq = 2;
             UPDATE log SET seq = 2 WHERE origin = 'hub-a' AND seq = 3;
             UPDATE log SET seq = 3 WHERE origin = 'hub-a' AND seq = -1;",
        );
        let v = s.verify_audit(&trust);
        assert_eq!(
            faults(&v.problems),
            vec![
                (
                    "hub-a",
                    2,
                    &AuditFault::Misplaced {
                        signed_origin: "hub-a".into(),
                        signed_seq: 3
                    }
                ),
                (
                    "hub-a",
                    3,
                    &AuditFault::Misplaced {
                        signed_origin: "hub-a".into(),
                        signed_seq: 2
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_row_that_does_not_decode_is_reported_and_the_next_is_not_blamed() {
        let (_dir, s, trust, _) = audited();
        tamper(
            &s,
            "UPDATE log SET entry = x'ff' WHERE origin = 'hub-b' AND seq = 1;
             UPDATE log SET hlc_ms = 'yesterday' WHERE origin = 'hub-a' AND seq = 4;",
        );
        let v = s.verify_audit(&trust);
        assert_eq!(
            faults(&v.problems),
            vec![
                (
                    "hub-a",
                    4,
                    &AuditFault::Column {
                        column: "hlc_ms".into(),
                        stored: "(not a number)".into(),
                        signed: "14000".into()
                    }
                ),
                ("hub-b", 1, &AuditFault::Undecodable),
            ]
        );
    }

    #[test]
    fn the_audit_trail_is_oldest_first_and_filters_by_time_and_origin() {
        let (_dir, s, _, of_a) = audited();
        let r = StoreReader::new(s.path());
        let all = r.audit(None, None, 100).unwrap();
        let order: Vec<(String, u64)> = all.iter().map(|e| (e.origin.clone(), e.seq)).collect();
        assert_eq!(
            order,
            [
                ("hub-a", 1),
                ("hub-a", 2),
                ("hub-a", 3),
                ("hub-a", 4),
                ("hub-b", 1),
                ("hub-b", 2)
            ]
            .map(|(o, s)| (o.to_owned(), s))
        );
        assert_eq!(all[1].op_text, "put k2=v2");
        assert_eq!(all[1].hash, crate::log::hex(&of_a[1].hash()));
        assert_eq!(all[1].prev, all[0].hash);
        let recent = r.audit(Some(13_000), None, 100).unwrap();
        assert_eq!(recent.len(), 4, "hub-a 3 and 4, and hub-b's");
        let b = r.audit(None, Some("hub-b"), 1).unwrap();
        assert_eq!((b.len(), b[0].origin.as_str(), b[0].seq), (1, "hub-b", 1));
    }

    /// The store's tables as they were before the log was chained.
    const SCHEMA_0: &str = "CREATE TABLE streams (relay TEXT NOT NULL, stream INTEGER NOT NULL,
             region TEXT NOT NULL, site TEXT NOT NULL, applied_through INTEGER NOT NULL,
             PRIMARY KEY (relay, stream));
         CREATE TABLE log (origin TEXT NOT NULL, seq INTEGER NOT NULL, entry BLOB NOT NULL,
             signature BLOB NOT NULL, PRIMARY KEY (origin, seq));
         CREATE TABLE certs (origin TEXT PRIMARY KEY, der BLOB NOT NULL);
         INSERT INTO streams VALUES ('par-relay', 7, 'eu', 'par', 12);";

    #[test]
    fn a_store_from_before_the_chain_with_entries_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA_0).unwrap();
        old.execute_batch("INSERT INTO log VALUES ('hub-a', 1, x'00', x'00')")
            .unwrap();
        let err = HubStore::open(&path).err().expect("refused");
        assert!(
            matches!(err, StoreError::PredatesAuditChain { entries: 1, .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("predates the audit chain"), "{text}");
        assert!(text.contains("Move the file aside"), "{text}");
        let version: i64 = old
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        let rows: i64 = old
            .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
            .unwrap();
        assert_eq!((version, rows), (0, 1), "nothing changed");
    }

    #[test]
    fn an_empty_store_from_before_the_chain_is_upgraded_keeping_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(SCHEMA_0)
            .unwrap();
        let mut s = HubStore::open(&path).unwrap();
        assert_eq!(s.streams().unwrap()[0].applied_through, 12);
        let version: i64 = s
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let ca = MeshCa::generate("test").unwrap();
        let a = hub(&ca, "hub-a");
        s.commit_log(&writes(&a, 2, 1_000)).unwrap();
        drop(s);
        let s = HubStore::open(&path).unwrap();
        assert_eq!(s.log_entries().unwrap().len(), 2);
        assert!(s.verify_audit(&a).ok());
    }

    #[test]
    fn a_store_from_a_newer_trellis_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        let err = HubStore::open(&path).err().expect("refused");
        assert!(matches!(err, StoreError::TooNew { found: 9, .. }), "{err}");
    }

    #[test]
    fn finding_events_does_not_walk_the_summaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        drop(HubStore::open(&path).unwrap());
        let conn = rusqlite::Connection::open(&path).unwrap();
        let q = Query {
            region: None,
            site: None,
            from_ms: None,
            to_ms: None,
            kinds: Vec::new(),
            no_summaries: true,
            newest_first: false,
            limit: 50,
        };
        // The dashboard's feed, and the newest configuration events of
        // `GET /api/v1/config/status`.
        let recent = Query {
            kinds: vec!["config_result".into(), "config_drift".into()],
            no_summaries: false,
            newest_first: true,
            ..q.clone()
        };
        for q in [q, recent] {
            let (sql, args) = records_sql(&q);
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let plan: Vec<String> = stmt
                .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|p| p.contains("records_events")),
                "{sql}: {plan:?}"
            );
            assert!(!plan.iter().any(|p| p.contains("TEMP B-TREE")), "{plan:?}");
        }
    }
}
