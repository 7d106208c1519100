//! A relay's outage buffer on a virtual disk: the same bookkeeping as
//! [`OutageBuffer`](trellis_relay::buffer::OutageBuffer) — sequence
//! numbers, sizes as postcard encodes them, downsampling and gaps planned by
//! the relay's own [`plan_compaction`] and [`gap_rows`] — kept in memory.
//! What is in here is durable: a crash keeps it. Appends become durable
//! only when the world's fsync for them completes; a crash before then
//! loses them (they were never sent, so nothing acknowledged is lost).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use trellis_relay::buffer::{
    DownsampleRule, NewRecord, ROW_OVERHEAD, RowMeta, SOFT_LIMIT, gap_rows, plan_compaction,
};
use trellis_relay::uplink::{Gap, Record, RecordBody};

struct Row {
    record: Record,
    len: u64,
}

/// The virtual outage buffer of one relay.
pub struct VirtualBuffer {
    rows: BTreeMap<u64, Row>,
    next_seq: u64,
    bytes: u64,
    pub max_bytes: u64,
    rules: Vec<DownsampleRule>,
    pub stream: u64,
}

fn kind_of(body: &RecordBody) -> String {
    match body {
        RecordBody::Summary(_) => "summary".to_owned(),
        RecordBody::Gap(_) => "gap".to_owned(),
        RecordBody::Event(e) => e.kind().to_owned(),
    }
}

/// Bytes of a record's body as the buffer stores it.
pub fn body_len(body: &RecordBody) -> u64 {
    postcard::to_stdvec(body).map_or(0, |b| b.len() as u64)
}

impl VirtualBuffer {
    pub fn new(stream: u64, max_bytes: u64, rules: Vec<DownsampleRule>) -> Self {
        VirtualBuffer {
            rows: BTreeMap::new(),
            next_seq: 1,
            bytes: 0,
            max_bytes,
            rules,
            stream,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn rows(&self) -> u64 {
        self.rows.len() as u64
    }

    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn first_seq(&self) -> Option<u64> {
        self.rows.keys().next().copied()
    }

    /// Makes a batch durable (the caller has waited for the fsync).
    pub fn append(&mut self, batch: Vec<NewRecord>) -> Vec<Record> {
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            let len = body_len(&r.body);
            let record = Record {
                seq: self.next_seq,
                at_ms: r.at_ms,
                body: r.body,
            };
            self.bytes += len + ROW_OVERHEAD;
            self.rows.insert(
                record.seq,
                Row {
                    record: record.clone(),
                    len,
                },
            );
            out.push(record);
            self.next_seq += 1;
        }
        out
    }

    /// About `max_bytes` of records after `after` (at least one), with a
    /// gap row that spans `after` first, as the real buffer reads them.
    pub fn read_after(&self, after: u64, max_bytes: u64) -> Vec<(Record, u64)> {
        let spanning = self
            .rows
            .range(..=after)
            .next_back()
            .filter(|(_, r)| r.record.until() > after);
        let mut out = Vec::new();
        let mut bytes = 0;
        for (_, r) in spanning.into_iter().chain(self.rows.range(after + 1..)) {
            if !out.is_empty() && bytes + r.len > max_bytes {
                break;
            }
            bytes += r.len;
            out.push((r.record.clone(), r.len));
        }
        out
    }

    /// The newest summary held.
    pub fn latest_summary(&self) -> Option<Record> {
        self.rows
            .values()
            .rev()
            .find(|r| matches!(r.record.body, RecordBody::Summary(_)))
            .map(|r| r.record.clone())
    }

    /// Deletes every record up to `through`.
    pub fn delete_through(&mut self, through: u64) {
        let keep = self.rows.split_off(&(through + 1));
        let gone = std::mem::replace(&mut self.rows, keep);
        for (seq, r) in gone {
            if r.record.until() > through {
                // A gap reaching past `through` stays, as in SQLite.
                self.rows.insert(seq, r);
            } else {
                self.bytes -= r.len + ROW_OVERHEAD;
            }
        }
    }

    /// Keeps the buffer within its bounds, as `OutageBuffer::compact`
    /// does. Returns what was dropped, if anything.
    pub fn compact(&mut self, now_ms: u64, movable: RangeInclusive<u64>) -> Option<Gap> {
        let soft = (self.max_bytes as f64 * SOFT_LIMIT) as u64;
        if self.bytes <= soft || movable.is_empty() {
            return None;
        }
        let metas: Vec<RowMeta> = self
            .rows
            .range(*movable.start()..)
            .filter(|(_, r)| r.record.until() <= *movable.end())
            .map(|(_, r)| RowMeta {
                seq: r.record.seq,
                until: r.record.until(),
                kind: kind_of(&r.record.body),
                at_ms: r.record.at_ms,
                len: r.len,
            })
            .collect();
        let plan = plan_compaction(&metas, now_ms, &self.rules, self.bytes, self.max_bytes);
        if plan.runs.is_empty() {
            return None;
        }
        let rows = &self.rows;
        let (gaps, total) = gap_rows(&metas, &plan, |seq| match rows.get(&seq) {
            Some(Row {
                record:
                    Record {
                        body: RecordBody::Gap(g),
                        ..
                    },
                ..
            }) => g.clone(),
            _ => Gap::default(),
        });
        for run in &plan.runs {
            for &i in &run.rows {
                if let Some(r) = self.rows.remove(&metas[i].seq) {
                    self.bytes -= r.len + ROW_OVERHEAD;
                }
            }
        }
        for g in gaps {
            let len = body_len(&g.body);
            self.bytes += len + ROW_OVERHEAD;
            self.rows.insert(g.seq, Row { record: g, len });
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use trellis_relay::summary::SiteSummary;
    use trellis_relay::uplink::Event;

    use super::*;

    fn summary(at_ms: u64) -> NewRecord {
        NewRecord {
            at_ms,
            body: RecordBody::Summary(Box::new(SiteSummary::empty("r1", "s", "relay", at_ms))),
        }
    }

    fn died(at_ms: u64) -> NewRecord {
        NewRecord {
            at_ms,
            body: RecordBody::Event(Event::NodeDied { node: "n".into() }),
        }
    }

    #[test]
    fn appends_number_records_and_deletes_free_their_bytes() {
        let mut b = VirtualBuffer::new(7, 1 << 20, Vec::new());
        let r = b.append(vec![summary(1), died(2), died(3)]);
        assert_eq!(r.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(b.bytes() > 3 * ROW_OVERHEAD);
        assert_eq!(b.read_after(1, 1 << 20).len(), 2);
        assert_eq!(b.latest_summary().unwrap().seq, 1);
        b.delete_through(3);
        assert_eq!((b.rows(), b.bytes(), b.first_seq()), (0, 0, None));
        assert_eq!(b.last_seq(), 3);
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_events_for_a_gap_that_counts_them() {
        let mut b = VirtualBuffer::new(7, 16 * 1024, Vec::new());
        b.append((0..2000).map(died).collect());
        let before = b.bytes();
        let gap = b.compact(10_000, 1..=u64::MAX).expect("over the cap");
        assert!(b.bytes() < before && b.bytes() <= 16 * 1024);
        assert!(gap.events_dropped > 0);
        // The gap stands where the dropped records were: nothing vanishes
        // from the sequence.
        let first = b.read_after(0, u64::MAX);
        assert_eq!(first[0].0.seq, 1);
        assert_eq!(first[0].0.until() as usize, gap.events_dropped as usize);
    }
}
