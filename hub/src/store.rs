//! The hub's durable state: every record relays sent, and how far each
//! relay's record stream is applied, in SQLite (WAL, `synchronous = FULL`).
//!
//! A batch of records from any number of relays is one transaction; the hub
//! acknowledges records only after it committed. `(relay, stream, seq)` is
//! the primary key, so a record stored twice is stored once. The writer
//! lives on a thread of its own; queries open their own read connections
//! (WAL lets them read while the writer writes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use trellis_relay::summary::SiteSummary;
use trellis_relay::uplink::{Record, RecordBody};

use crate::log::{Entry, SignedEntry};

/// Why the store failed. A failed commit stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub store {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("hub store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
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
        let err = |source| StoreError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        configure(&conn).map_err(err)?;
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
             CREATE TABLE IF NOT EXISTS log (
                 origin TEXT NOT NULL,
                 seq INTEGER NOT NULL,
                 entry BLOB NOT NULL,
                 signature BLOB NOT NULL,
                 PRIMARY KEY (origin, seq));
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
        |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        }
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
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
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
        let path = self.path.clone();
        let err = |source| StoreError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO log (origin, seq, entry, signature) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            let mut cert = tx
                .prepare_cached("INSERT OR REPLACE INTO certs (origin, der) VALUES (?1, ?2)")
                .map_err(err)?;
            for e in entries {
                insert
                    .execute(params![
                        e.entry.origin,
                        e.entry.seq as i64,
                        e.entry.signing_bytes(),
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

    /// Every log entry, in (origin, seq) order, without signatures (to
    /// rebuild the log's state at start).
    pub fn log_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT entry FROM log ORDER BY origin, seq")
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(e) = postcard::from_bytes::<Entry>(&row.map_err(self.err())?) {
                out.push(e);
            }
        }
        Ok(out)
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
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let conn = self.open().map_err(err)?;
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
        if q.no_summaries {
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
        sql.push_str(&format!(
            " ORDER BY at_ms, relay, stream, seq LIMIT ?{}",
            args.len()
        ));
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
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
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

    /// Records of one relay stream with seq after `after`, in order, at
    /// most `limit`.
    pub fn stream_after(
        &self,
        relay: &str,
        stream: u64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
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
        let err = |source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        };
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

#[cfg(test)]
mod tests {
    use trellis_relay::uplink::{Event, Gap};

    use super::*;

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
}
