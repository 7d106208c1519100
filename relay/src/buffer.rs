//! The relay's durable outage buffer: every record the relay sends up is
//! appended here, with its sequence number, and made durable before it may
//! be sent; it is deleted only once a hub has acknowledged it.
//!
//! SQLite (WAL, `synchronous = FULL`) holds one row per record. A batch of
//! records is one transaction, so many records share one fsync (group
//! commit). The buffer is bounded by `max_bytes` (the bytes of the records'
//! bodies plus a fixed overhead per row): past half of it, older summaries
//! are thinned out by the downsampling rules; past all of it, the oldest
//! records are dropped. Whatever is dropped is replaced, in place, by a gap
//! record that stands for the dropped sequence numbers and says what they
//! were, so the hub is told about every hole.
//!
//! Every call blocks on the disk; the driver runs the buffer on a thread of
//! its own so gossip and the relay's API never wait for it.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::uplink::{Gap, Record, RecordBody};

/// Bytes counted per row on top of its body (key, kind, time).
pub const ROW_OVERHEAD: u64 = 32;
/// Downsampling starts when the buffer holds more than this share of
/// `max_bytes`.
pub const SOFT_LIMIT: f64 = 0.5;
/// Dropping at the hard cap goes down to this share of `max_bytes`, so the
/// next few appends do not trigger another round at once.
pub const AFTER_DROP: f64 = 0.9;

const SCHEMA_VERSION: i64 = 1;

/// Keep one summary per `keep_every` among those older than `after`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownsampleRule {
    #[serde(with = "humantime_serde")]
    pub after: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_every: Duration,
}

/// The default rules: every summary of the last hour, one a minute up to a
/// day old, one per ten minutes beyond.
pub fn default_downsample() -> Vec<DownsampleRule> {
    vec![
        DownsampleRule {
            after: Duration::from_secs(3600),
            keep_every: Duration::from_secs(60),
        },
        DownsampleRule {
            after: Duration::from_secs(24 * 3600),
            keep_every: Duration::from_secs(600),
        },
    ]
}

/// Why the buffer failed. The records of the failed call were not stored.
#[derive(Debug, thiserror::Error)]
pub enum BufferError {
    #[error("outage buffer {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("outage buffer {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A record to append; its sequence number is given by the buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    pub at_ms: u64,
    pub body: RecordBody,
}

/// Something worth logging that happened while opening the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenNote {
    /// The previous process did not close the buffer; SQLite replayed its
    /// write-ahead log and rolled back an unfinished last transaction, if
    /// any (those records had never been sent).
    RecoveredUncleanStop { records: u64, last_seq: u64 },
    /// The file could not be used and was renamed; a new buffer (and a new
    /// record stream) starts.
    MovedAside { to: PathBuf, reason: String },
    /// A new buffer was created.
    Created { stream: u64 },
}

impl std::fmt::Display for OpenNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenNote::RecoveredUncleanStop { records, last_seq } => write!(
                f,
                "outage buffer was not closed cleanly; recovered it: {records} records kept, \
                 last seq {last_seq} (an unfinished last write, never sent, was rolled back)"
            ),
            OpenNote::MovedAside { to, reason } => write!(
                f,
                "outage buffer unusable ({reason}); moved it aside to {} and started a new one",
                to.display()
            ),
            OpenNote::Created { stream } => {
                write!(f, "created a new outage buffer, stream {stream}")
            }
        }
    }
}

/// Figures for metrics and the local API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferStats {
    pub rows: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub last_seq: u64,
    pub fsyncs: u64,
}

/// The relay's outage buffer.
pub struct OutageBuffer {
    conn: Connection,
    path: PathBuf,
    stream: u64,
    next_seq: u64,
    rows: u64,
    bytes: u64,
    fsyncs: u64,
    max_bytes: u64,
    rules: Vec<DownsampleRule>,
}

fn kind_of(body: &RecordBody) -> &'static str {
    body.kind()
}

impl OutageBuffer {
    /// Opens (or creates) the buffer at `path`. A file that SQLite finds
    /// corrupt, or that is not a Trellis buffer, is moved aside and a new
    /// one started; the notes say what happened.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        rules: Vec<DownsampleRule>,
    ) -> Result<(Self, Vec<OpenNote>), BufferError> {
        let io = |source| BufferError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut notes = Vec::new();
        let wal = wal_path(path);
        let unclean = std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0);
        let opened = match Self::open_existing(path, max_bytes, rules.clone()) {
            Ok(b) => b,
            Err(reason) => {
                let to = path.with_extension(format!("corrupt-{}", unix_ms_now()));
                for (from, suffix) in [
                    (path.to_owned(), ""),
                    (wal.clone(), "-wal"),
                    (shm_path(path), "-shm"),
                ] {
                    if from.exists() {
                        let dest = PathBuf::from(format!("{}{suffix}", to.display()));
                        std::fs::rename(&from, &dest).map_err(io)?;
                    }
                }
                notes.push(OpenNote::MovedAside { to, reason });
                None
            }
        };
        let buffer = match opened {
            Some(b) => {
                if unclean {
                    notes.push(OpenNote::RecoveredUncleanStop {
                        records: b.rows,
                        last_seq: b.next_seq - 1,
                    });
                }
                b
            }
            None => {
                let b = Self::create(path, max_bytes, rules)?;
                notes.push(OpenNote::Created { stream: b.stream });
                b
            }
        };
        Ok((buffer, notes))
    }

    /// Opens an existing buffer: `Ok(None)` if there is none, `Err(reason)`
    /// if there is one but it cannot be used.
    fn open_existing(
        path: &Path,
        max_bytes: u64,
        rules: Vec<DownsampleRule>,
    ) -> Result<Option<Self>, String> {
        if !path.exists() {
            return Ok(None);
        }
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        configure(&conn).map_err(|e| e.to_string())?;
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| e.to_string())?;
        if check != "ok" {
            return Err(format!("integrity check failed: {check}"));
        }
        let meta = |key: &str| -> Result<Option<i64>, String> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
                .map_err(|e| format!("not a trellis outage buffer: {e}"))
        };
        let version = meta("schema_version")?;
        if version != Some(SCHEMA_VERSION) {
            return Err(format!(
                "not a trellis outage buffer of schema {SCHEMA_VERSION} (found {version:?})"
            ));
        }
        let stream = meta("stream")?.ok_or("no stream id")? as u64;
        let next_seq = meta("next_seq")?.ok_or("no next seq")? as u64;
        let (rows, bytes, max_seq): (i64, i64, Option<i64>) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(body)), 0), max(until_seq) FROM records",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| e.to_string())?;
        // `meta.next_seq` is written only when rows are removed (an
        // acknowledgement or a compaction), not by every append: that saves
        // a page per commit. The next seq is whichever is higher, the last
        // row's plus one or what was written when rows last went away, so
        // a sequence number is never handed out twice, even once every
        // record has been acknowledged and deleted.
        let next_seq = next_seq.max(max_seq.map_or(0, |m| m as u64 + 1));
        Ok(Some(OutageBuffer {
            conn,
            path: path.to_owned(),
            stream,
            next_seq,
            rows: rows as u64,
            bytes: bytes as u64 + rows as u64 * ROW_OVERHEAD,
            fsyncs: 0,
            max_bytes,
            rules,
        }))
    }

    fn create(
        path: &Path,
        max_bytes: u64,
        rules: Vec<DownsampleRule>,
    ) -> Result<Self, BufferError> {
        let err = |source| BufferError::Sqlite {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        configure(&conn).map_err(err)?;
        // Streams need only be unique per relay; a random 63-bit id also
        // stays positive in SQLite's signed integers.
        let stream = rand::random::<u64>() >> 1;
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS records (
                 seq INTEGER PRIMARY KEY,
                 until_seq INTEGER NOT NULL,
                 kind TEXT NOT NULL,
                 at_ms INTEGER NOT NULL,
                 body BLOB NOT NULL);",
        )
        .map_err(err)?;
        for (k, v) in [
            ("schema_version", SCHEMA_VERSION),
            ("stream", stream as i64),
            ("next_seq", 1),
        ] {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        Ok(OutageBuffer {
            conn,
            path: path.to_owned(),
            stream,
            next_seq: 1,
            rows: 0,
            bytes: 0,
            fsyncs: 1,
            max_bytes,
            rules,
        })
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> BufferError + '_ {
        sqlite_err(&self.path)
    }

    /// The record stream this buffer holds.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// The lowest sequence number still held, if any.
    pub fn first_seq(&self) -> Result<Option<u64>, BufferError> {
        self.conn
            .query_row("SELECT min(seq) FROM records", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.map(|v| v as u64))
            .map_err(self.err())
    }

    /// The highest sequence number ever appended (0 if none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn stats(&self) -> BufferStats {
        BufferStats {
            rows: self.rows,
            bytes: self.bytes,
            max_bytes: self.max_bytes,
            last_seq: self.last_seq(),
            fsyncs: self.fsyncs,
        }
    }

    /// Appends a batch in one transaction (one fsync) and returns the
    /// records with their sequence numbers. Nothing of the batch is stored
    /// if it fails.
    pub fn append(&mut self, batch: Vec<NewRecord>) -> Result<Vec<Record>, BufferError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let err = sqlite_err(&self.path);
        let mut out = Vec::with_capacity(batch.len());
        let mut added = 0u64;
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO records (seq, until_seq, kind, at_ms, body) VALUES (?1, ?1, ?2, ?3, ?4)",
                )
                .map_err(err)?;
            // No `meta` update here: the open derives the next seq from the
            // last row (see `open_existing`), so a commit writes the records'
            // pages and nothing else.
            for (seq, r) in (self.next_seq..).zip(batch) {
                let body = postcard::to_stdvec(&r.body).expect("records serialise");
                insert
                    .execute(params![seq as i64, kind_of(&r.body), r.at_ms as i64, body])
                    .map_err(err)?;
                added += body.len() as u64 + ROW_OVERHEAD;
                out.push(Record {
                    seq,
                    at_ms: r.at_ms,
                    body: r.body,
                });
            }
        }
        tx.commit().map_err(err)?;
        self.fsyncs += 1;
        self.next_seq += out.len() as u64;
        self.rows += out.len() as u64;
        self.bytes += added;
        Ok(out)
    }

    /// Up to `max_rows` records (and about `max_bytes` bytes, at least one
    /// record) that come after `after`, in order. A row that cannot be
    /// decoded is returned as a gap standing for it.
    pub fn read_after(
        &self,
        after: u64,
        max_rows: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, BufferError> {
        // Both queries walk the primary key from `after`: the read costs
        // what it returns, however much sent-but-kept history lies before.
        let row = |r: &rusqlite::Row<'_>| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, Vec<u8>>(3)?,
            ))
        };
        // A gap row that starts at or before `after` and reaches past it.
        let spanning = self
            .conn
            .prepare_cached(
                "SELECT seq, until_seq, at_ms, body FROM records WHERE seq <= ?1 ORDER BY seq DESC LIMIT 1",
            )
            .map_err(self.err())?
            .query_row([after as i64], row)
            .optional()
            .map_err(self.err())?
            .filter(|(_, until, _, _)| *until > after);
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, until_seq, at_ms, body FROM records WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![after as i64, max_rows as i64], row)
            .map_err(self.err())?;
        let rows = spanning.into_iter().map(Ok).chain(rows);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for row in rows {
            let (seq, until, at_ms, body) = row.map_err(self.err())?;
            if !out.is_empty() && bytes + body.len() > max_bytes {
                break;
            }
            bytes += body.len();
            out.push(decode_row(seq, until, at_ms, &body));
        }
        Ok(out)
    }

    /// The most recent summary still in the buffer.
    pub fn latest_summary(&self) -> Result<Option<Record>, BufferError> {
        self.conn
            .query_row(
                "SELECT seq, until_seq, at_ms, body FROM records WHERE kind = 'summary' ORDER BY seq DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u64,
                        r.get::<_, i64>(2)? as u64,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(self.err())
            .map(|row| row.map(|(seq, until, at, body)| decode_row(seq, until, at, &body)))
    }

    /// When the oldest record a hub has not acknowledged (the first after
    /// `acked`) was made, in ms since the Unix epoch; `None` when a hub
    /// holds everything. It says how far behind the hubs' view of the site
    /// is, which a count of records or bytes does not.
    pub fn oldest_after(&self, acked: u64) -> Result<Option<u64>, BufferError> {
        Ok(self.read_after(acked, 1, 0)?.first().map(|r| r.at_ms))
    }

    /// Deletes every record a hub acknowledged (up to `through`).
    pub fn delete_through(&mut self, through: u64) -> Result<u64, BufferError> {
        // `seq <= ?1` lets SQLite walk the primary key instead of the table.
        let (rows, bytes): (i64, i64) = self
            .conn
            .query_row(
                "SELECT count(*), coalesce(sum(length(body)), 0) FROM records
                 WHERE seq <= ?1 AND until_seq <= ?1",
                [through as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.err())?;
        if rows == 0 {
            return Ok(0);
        }
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        // The last rows may be the ones deleted: keep the next seq.
        save_next_seq(&tx, self.next_seq).map_err(err)?;
        tx.execute(
            "DELETE FROM records WHERE seq <= ?1 AND until_seq <= ?1",
            [through as i64],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        self.fsyncs += 1;
        self.rows -= rows as u64;
        self.bytes -= bytes as u64 + rows as u64 * ROW_OVERHEAD;
        Ok(rows as u64)
    }

    /// Keeps the buffer within its bounds: above half of `max_bytes` older
    /// summaries are downsampled; above `max_bytes` the oldest records are
    /// dropped. Only records whose seq is in `movable` are touched (the
    /// driver excludes those a hub may hold already). Returns what was
    /// dropped, if anything.
    pub fn compact(
        &mut self,
        now_ms: u64,
        movable: RangeInclusive<u64>,
    ) -> Result<Option<Gap>, BufferError> {
        let soft = (self.max_bytes as f64 * SOFT_LIMIT) as u64;
        if self.bytes <= soft || movable.is_empty() {
            return Ok(None);
        }
        let rows = self.row_meta(&movable)?;
        let plan = plan_compaction(&rows, now_ms, &self.rules, self.bytes, self.max_bytes);
        if plan.runs.is_empty() {
            return Ok(None);
        }
        // Existing gap rows absorbed into a run need their counts.
        let mut old_gaps: HashMap<u64, Gap> = HashMap::new();
        for run in &plan.runs {
            for &i in &run.rows {
                if rows[i].kind == "gap" {
                    old_gaps.insert(rows[i].seq, self.read_gap(rows[i].seq)?);
                }
            }
        }
        let (gaps, total) = gap_rows(&rows, &plan, |seq| {
            old_gaps.remove(&seq).unwrap_or_default()
        });
        let err = sqlite_err(&self.path);
        let tx = self.conn.transaction().map_err(err)?;
        save_next_seq(&tx, self.next_seq).map_err(err)?;
        let mut freed = 0u64;
        let mut removed = 0u64;
        for run in &plan.runs {
            for &i in &run.rows {
                let r = &rows[i];
                tx.execute("DELETE FROM records WHERE seq = ?1", [r.seq as i64])
                    .map_err(err)?;
                freed += r.len + ROW_OVERHEAD;
                removed += 1;
            }
        }
        let mut added_bytes = 0u64;
        for g in &gaps {
            let bytes = postcard::to_stdvec(&g.body).expect("records serialise");
            tx.execute(
                "INSERT INTO records (seq, until_seq, kind, at_ms, body) VALUES (?1, ?2, 'gap', ?3, ?4)",
                params![g.seq as i64, g.until() as i64, g.at_ms as i64, bytes],
            )
            .map_err(err)?;
            added_bytes += bytes.len() as u64 + ROW_OVERHEAD;
        }
        tx.commit().map_err(err)?;
        self.fsyncs += 1;
        self.rows = self.rows - removed + gaps.len() as u64;
        self.bytes = self.bytes - freed + added_bytes;
        Ok(Some(total))
    }

    fn row_meta(&self, movable: &RangeInclusive<u64>) -> Result<Vec<RowMeta>, BufferError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, until_seq, kind, at_ms, length(body) FROM records
                 WHERE seq >= ?1 AND until_seq <= ?2 ORDER BY seq",
            )
            .map_err(self.err())?;
        let hi = (*movable.end()).min(i64::MAX as u64);
        let rows = stmt
            .query_map(params![*movable.start() as i64, hi as i64], |r| {
                Ok(RowMeta {
                    seq: r.get::<_, i64>(0)? as u64,
                    until: r.get::<_, i64>(1)? as u64,
                    kind: r.get(2)?,
                    at_ms: r.get::<_, i64>(3)? as u64,
                    len: r.get::<_, i64>(4)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<_, _>>().map_err(self.err())
    }

    fn read_gap(&self, seq: u64) -> Result<Gap, BufferError> {
        let body: Vec<u8> = self
            .conn
            .query_row(
                "SELECT body FROM records WHERE seq = ?1",
                [seq as i64],
                |r| r.get(0),
            )
            .map_err(self.err())?;
        Ok(match postcard::from_bytes::<RecordBody>(&body) {
            Ok(RecordBody::Gap(g)) => g,
            _ => Gap {
                unreadable: 1,
                ..Gap::default()
            },
        })
    }
}

/// Names the buffer's file in an SQLite error. Borrowing only the path lets
/// a method hold the error mapping while its transaction borrows the
/// connection.
fn sqlite_err(path: &Path) -> impl Fn(rusqlite::Error) -> BufferError + Copy + '_ {
    move |source| BufferError::Sqlite {
        path: path.to_owned(),
        source,
    }
}

/// Writes the next sequence number to `meta`, in a transaction that
/// removes rows (appends leave it alone; see `open_existing`).
fn save_next_seq(tx: &rusqlite::Transaction<'_>, next_seq: u64) -> rusqlite::Result<()> {
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'next_seq'",
        [next_seq as i64],
    )
    .map(drop)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL with FULL sync: a commit is on disk when it returns.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

fn wal_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", path.display()))
}

fn shm_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-shm", path.display()))
}

fn unix_ms_now() -> u64 {
    trellis_node::clock::unix_ms()
}

fn decode_row(seq: u64, until: u64, at_ms: u64, body: &[u8]) -> Record {
    let body = match postcard::from_bytes::<RecordBody>(body) {
        Ok(b) => b,
        Err(_) => RecordBody::Gap(Gap {
            until,
            unreadable: until - seq + 1,
            from_ms: at_ms,
            to_ms: at_ms,
            ..Gap::default()
        }),
    };
    Record { seq, at_ms, body }
}

/// What the planner needs to know of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowMeta {
    pub seq: u64,
    pub until: u64,
    /// `summary`, `gap`, or the event's kind.
    pub kind: String,
    pub at_ms: u64,
    /// Bytes of the body.
    pub len: u64,
}

/// Consecutive rows to replace by one gap row; `fresh` counts what is newly
/// dropped (absorbed old gaps are added when writing).
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// Indexes into the rows given to [`plan_compaction`].
    pub rows: Vec<usize>,
    pub fresh: Gap,
}

/// What a compaction does.
#[derive(Debug, Default)]
pub struct Plan {
    pub runs: Vec<Run>,
}

/// The gap records that replace each run of `plan` (absorbing the old gap
/// rows in it, whose counts `old_gap` gives by seq), and the total newly
/// dropped. Pure.
pub fn gap_rows(
    rows: &[RowMeta],
    plan: &Plan,
    mut old_gap: impl FnMut(u64) -> Gap,
) -> (Vec<Record>, Gap) {
    let mut total = Gap::default();
    let mut out = Vec::new();
    for run in &plan.runs {
        let mut gap = run.fresh.clone();
        total.absorb(&run.fresh);
        for &i in &run.rows {
            if rows[i].kind == "gap" {
                gap.absorb(&old_gap(rows[i].seq));
            }
        }
        let first = &rows[run.rows[0]];
        let last = &rows[*run.rows.last().expect("runs are not empty")];
        gap.until = last.until;
        out.push(Record {
            seq: first.seq,
            at_ms: gap.from_ms,
            body: RecordBody::Gap(gap),
        });
    }
    (out, total)
}

#[derive(Clone, Copy, PartialEq)]
enum Fate {
    Keep,
    Downsampled,
    Dropped,
}

/// Decides what to drop. Pure, so it is tested without a database (and
/// the simulator runs it on its virtual disks).
pub fn plan_compaction(
    rows: &[RowMeta],
    now_ms: u64,
    rules: &[DownsampleRule],
    bytes: u64,
    max_bytes: u64,
) -> Plan {
    let mut fate = vec![Fate::Keep; rows.len()];
    let mut left = bytes;
    // Downsampling: for each summary, the rule with the largest `after`
    // that applies decides its bucket; the first summary of a bucket stays.
    let mut rules: Vec<&DownsampleRule> = rules.iter().collect();
    rules.sort_by_key(|r| std::cmp::Reverse(r.after));
    let mut kept: BTreeMap<(usize, u64), ()> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        if r.kind != "summary" {
            continue;
        }
        let age = now_ms.saturating_sub(r.at_ms);
        let Some((ri, rule)) = rules
            .iter()
            .enumerate()
            .find(|(_, rule)| age >= rule.after.as_millis() as u64)
        else {
            continue;
        };
        let every = (rule.keep_every.as_millis() as u64).max(1);
        if kept.insert((ri, r.at_ms / every), ()).is_some() {
            fate[i] = Fate::Downsampled;
            left = left.saturating_sub(r.len + ROW_OVERHEAD);
        }
    }
    // The hard cap: drop the oldest records, whatever they are.
    if left > max_bytes {
        let target = (max_bytes as f64 * AFTER_DROP) as u64;
        for (i, r) in rows.iter().enumerate() {
            if left <= target {
                break;
            }
            if fate[i] == Fate::Keep && r.kind != "gap" {
                fate[i] = Fate::Dropped;
                left = left.saturating_sub(r.len + ROW_OVERHEAD);
            }
        }
    }
    // Runs of consecutive dropped rows, with the gap rows next to them.
    let mut plan = Plan::default();
    let mut run: Option<Run> = None;
    let mut run_has_drop = false;
    let close = |run: &mut Option<Run>, has: &mut bool, plan: &mut Plan| {
        if let Some(r) = run.take().filter(|_| *has) {
            plan.runs.push(r);
        }
        *has = false;
    };
    for (i, r) in rows.iter().enumerate() {
        let is_gap = r.kind == "gap";
        if fate[i] == Fate::Keep && !is_gap {
            close(&mut run, &mut run_has_drop, &mut plan);
            continue;
        }
        let cur = run.get_or_insert_with(|| Run {
            rows: Vec::new(),
            fresh: Gap::default(),
        });
        cur.rows.push(i);
        if fate[i] != Fate::Keep {
            run_has_drop = true;
            let g = &mut cur.fresh;
            match (fate[i], r.kind.as_str()) {
                (Fate::Downsampled, _) => g.summaries_downsampled += 1,
                (_, "summary") => g.summaries_dropped += 1,
                (_, kind) => {
                    g.events_dropped += 1;
                    *g.event_kinds.entry(kind.to_owned()).or_default() += 1;
                }
            }
            g.from_ms = if g.from_ms == 0 {
                r.at_ms
            } else {
                g.from_ms.min(r.at_ms)
            };
            g.to_ms = g.to_ms.max(r.at_ms);
        }
    }
    close(&mut run, &mut run_has_drop, &mut plan);
    plan
}

#[cfg(test)]
mod tests {
    use trellis_node::site::Status;

    use super::*;
    use crate::summary::SiteSummary;
    use crate::uplink::Event;

    fn summary(at_ms: u64) -> NewRecord {
        NewRecord {
            at_ms,
            body: RecordBody::Summary(Box::new(SiteSummary::empty("eu", "par", "r", at_ms))),
        }
    }

    fn event(at_ms: u64) -> NewRecord {
        NewRecord {
            at_ms,
            body: RecordBody::Event(Event::CheckChanged {
                node: "n1".into(),
                check: "web".into(),
                from: Status::Passing,
                to: Status::Critical,
                detail: "HTTP 503".into(),
            }),
        }
    }

    fn open(dir: &Path, max: u64) -> OutageBuffer {
        OutageBuffer::open(&dir.join("buffer.db"), max, default_downsample())
            .unwrap()
            .0
    }

    /// Every seq from `from` on is accounted for exactly once.
    fn assert_contiguous(records: &[Record], from: u64) {
        let mut next = from;
        for r in records {
            assert_eq!(r.seq, next, "hole or overlap before {r:?}");
            next = r.until() + 1;
        }
    }

    #[test]
    fn appended_records_survive_a_reopen_with_their_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (stream, seqs) = {
            let mut b = open(dir.path(), 1 << 30);
            let out = b.append(vec![summary(1), event(2), summary(3)]).unwrap();
            (b.stream(), out.iter().map(|r| r.seq).collect::<Vec<_>>())
        };
        assert_eq!(seqs, vec![1, 2, 3]);
        let (b, notes) =
            OutageBuffer::open(&dir.path().join("buffer.db"), 1 << 30, default_downsample())
                .unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(b.stream(), stream);
        assert_eq!(b.last_seq(), 3);
        let back = b.read_after(0, 100, 1 << 20).unwrap();
        assert_eq!(back.len(), 3);
        assert!(matches!(back[1].body, RecordBody::Event(_)));
        assert_eq!(b.latest_summary().unwrap().unwrap().seq, 3);
    }

    #[test]
    fn the_oldest_unacknowledged_record_is_the_first_after_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path(), 1 << 30);
        assert_eq!(b.oldest_after(0).unwrap(), None);
        b.append(vec![summary(1_000), event(2_000), summary(3_000)])
            .unwrap();
        assert_eq!(b.oldest_after(0).unwrap(), Some(1_000));
        assert_eq!(b.oldest_after(1).unwrap(), Some(2_000));
        assert_eq!(b.oldest_after(2).unwrap(), Some(3_000));
        assert_eq!(b.oldest_after(3).unwrap(), None);
        // Acknowledged and deleted: the answer is the same.
        b.delete_through(2).unwrap();
        assert_eq!(b.oldest_after(2).unwrap(), Some(3_000));
    }

    #[test]
    fn acknowledged_records_are_deleted_and_sequence_numbers_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path(), 1 << 30);
        b.append(vec![summary(1), summary(2), summary(3)]).unwrap();
        assert_eq!(b.delete_through(2).unwrap(), 2);
        assert_eq!(b.stats().rows, 1);
        drop(b);
        let mut b = open(dir.path(), 1 << 30);
        let out = b.append(vec![event(4)]).unwrap();
        assert_eq!(out[0].seq, 4);
        let left: Vec<u64> = b
            .read_after(0, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, vec![3, 4]);
    }

    #[test]
    fn sequence_numbers_go_on_after_every_record_was_acknowledged_and_reopened() {
        // Appends do not write the next seq; the open derives it from the
        // last row, and a delete that takes the last row writes it first.
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path(), 1 << 30);
        b.append(vec![summary(1), summary(2)]).unwrap();
        b.append(vec![event(3)]).unwrap();
        drop(b);
        let mut b = open(dir.path(), 1 << 30);
        assert_eq!(b.last_seq(), 3, "derived from the last row");
        assert_eq!(b.delete_through(3).unwrap(), 3);
        drop(b);
        let mut b = open(dir.path(), 1 << 30);
        assert_eq!(b.stats().rows, 0);
        assert_eq!(b.last_seq(), 3, "kept although no row is left");
        assert_eq!(b.append(vec![event(4)]).unwrap()[0].seq, 4);
    }

    #[test]
    fn reading_after_a_seq_inside_a_gap_starts_with_that_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = OutageBuffer::open(&dir.path().join("b.db"), 4_000, vec![])
            .unwrap()
            .0;
        b.append((0..100).map(event).collect()).unwrap();
        b.compact(1000, 1..=u64::MAX).unwrap().unwrap();
        let all = b.read_after(0, 1000, 1 << 30).unwrap();
        let gap_end = all[0].until();
        assert!(gap_end > 2);
        let from_inside = b.read_after(1, 10, 1 << 30).unwrap();
        assert_eq!(from_inside[0].seq, 1, "the gap spanning seq 2");
        assert_eq!(from_inside[1].seq, gap_end + 1);
        let after_gap = b.read_after(gap_end, 10, 1 << 30).unwrap();
        assert_eq!(after_gap[0].seq, gap_end + 1);
    }

    #[test]
    fn reading_stops_at_the_byte_budget_but_returns_at_least_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path(), 1 << 30);
        b.append((0..10).map(summary).collect()).unwrap();
        assert_eq!(b.read_after(0, 100, 1).unwrap().len(), 1);
        assert_eq!(b.read_after(4, 3, 1 << 20).unwrap()[0].seq, 5);
    }

    #[test]
    fn old_summaries_are_downsampled_before_anything_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rules = vec![DownsampleRule {
            after: Duration::from_secs(60),
            keep_every: Duration::from_secs(10),
        }];
        let path = dir.path().join("b.db");
        // 120 summaries one second apart, two minutes old to now, and events.
        let now = 1_000_000u64;
        let mut batch: Vec<NewRecord> = (0..120)
            .map(|i| summary(now - 120_000 + i * 1000))
            .collect();
        batch.push(event(now - 90_000));
        let bytes = {
            let mut b = OutageBuffer::open(&path, 1 << 30, vec![]).unwrap().0;
            b.append(batch).unwrap();
            b.stats().bytes
        };
        // Reopened with a cap just above what it holds: past the soft
        // limit, below the hard one.
        let mut b = OutageBuffer::open(&path, bytes + 500, rules).unwrap().0;
        let before = b.stats();
        let gap = b.compact(now, 1..=u64::MAX).unwrap().unwrap();
        // Summaries older than 60 s (the first 60) keep one per 10 s.
        assert_eq!(gap.summaries_downsampled, 54);
        assert_eq!(gap.events_dropped + gap.summaries_dropped, 0);
        let all = b.read_after(0, 1000, 1 << 30).unwrap();
        assert_contiguous(&all, 1);
        assert!(all.iter().any(|r| matches!(r.body, RecordBody::Event(_))));
        assert!(b.stats().bytes < before.bytes);
    }

    #[test]
    fn at_the_hard_cap_the_oldest_records_are_dropped_and_a_gap_says_exactly_what() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = OutageBuffer::open(&dir.path().join("b.db"), 8_000, vec![])
            .unwrap()
            .0;
        let now = 1_000_000u64;
        let batch: Vec<NewRecord> = (0..200)
            .map(|i| {
                if i % 4 == 0 {
                    summary(now + i)
                } else {
                    event(now + i)
                }
            })
            .collect();
        b.append(batch).unwrap();
        let gap = b.compact(now + 200, 1..=u64::MAX).unwrap().unwrap();
        assert!(b.stats().bytes <= 8_000 * 9 / 10 + 200, "{:?}", b.stats());
        let all = b.read_after(0, 1000, 1 << 30).unwrap();
        assert_contiguous(&all, 1);
        let RecordBody::Gap(stored) = &all[0].body else {
            panic!("the oldest records became a gap: {:?}", all[0]);
        };
        let dropped = stored.until;
        // Exactly the dropped records: one in four a summary.
        assert_eq!(stored.summaries_dropped + stored.events_dropped, dropped);
        assert_eq!(stored.summaries_dropped, dropped.div_ceil(4));
        assert_eq!(stored.event_kinds["check_changed"], stored.events_dropped);
        assert_eq!((stored.from_ms, stored.to_ms), (now, now + dropped - 1));
        assert_eq!(gap.summaries_dropped, stored.summaries_dropped);
    }

    #[test]
    fn records_outside_the_movable_range_are_never_touched() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = OutageBuffer::open(&dir.path().join("b.db"), 4_000, vec![])
            .unwrap()
            .0;
        b.append((0..100).map(event).collect()).unwrap();
        let gap = b.compact(1000, 51..=u64::MAX).unwrap().unwrap();
        let all = b.read_after(0, 1000, 1 << 30).unwrap();
        assert_contiguous(&all, 1);
        for r in &all[..50] {
            assert!(matches!(r.body, RecordBody::Event(_)), "{r:?}");
        }
        assert!(gap.events_dropped > 0);
    }

    #[test]
    fn repeated_compactions_merge_neighbouring_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = OutageBuffer::open(&dir.path().join("b.db"), 6_000, vec![])
            .unwrap()
            .0;
        for round in 0..5u64 {
            b.append((0..40).map(|i| event(round * 100 + i)).collect())
                .unwrap();
            b.compact(10_000, 1..=u64::MAX).unwrap();
        }
        let all = b.read_after(0, 1000, 1 << 30).unwrap();
        assert_contiguous(&all, 1);
        let gaps: Vec<&Record> = all
            .iter()
            .filter(|r| matches!(r.body, RecordBody::Gap(_)))
            .collect();
        assert_eq!(gaps.len(), 1, "one merged gap: {gaps:?}");
        let RecordBody::Gap(g) = &gaps[0].body else {
            unreachable!()
        };
        assert_eq!(g.events_dropped, g.until, "counts add up over the merges");
    }

    #[test]
    fn a_corrupt_file_is_moved_aside_and_a_new_buffer_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        std::fs::write(
            &path,
            b"this is not a database, it is a poem about databases",
        )
        .unwrap();
        let (b, notes) = OutageBuffer::open(&path, 1 << 20, vec![]).unwrap();
        assert_eq!(b.last_seq(), 0);
        let OpenNote::MovedAside { to, .. } = &notes[0] else {
            panic!("{notes:?}");
        };
        assert!(to.exists());
        assert!(notes.iter().any(|n| matches!(n, OpenNote::Created { .. })));
        assert!(notes[0].to_string().contains("moved it aside"));
    }

    #[test]
    fn another_sqlite_database_is_not_taken_for_a_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("buffer.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE songs (title TEXT);")
            .unwrap();
        let (_, notes) = OutageBuffer::open(&path, 1 << 20, vec![]).unwrap();
        assert!(matches!(notes[0], OpenNote::MovedAside { .. }), "{notes:?}");
    }

    #[test]
    fn an_unreadable_row_is_delivered_as_a_gap_standing_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = open(dir.path(), 1 << 20);
        b.append(vec![summary(1), summary(2)]).unwrap();
        b.conn
            .execute("UPDATE records SET body = x'ffffffff' WHERE seq = 1", [])
            .unwrap();
        let all = b.read_after(0, 10, 1 << 20).unwrap();
        assert_contiguous(&all, 1);
        assert!(matches!(&all[0].body, RecordBody::Gap(g) if g.unreadable == 1));
    }
}
