//! chitchat messages on one ordered stream between two members, with the
//! digest sent as its difference from the previous digest on that stream.
//!
//! chitchat puts every site member's digest entry (its id: name, generation
//! and address, then three 8-byte counters: heartbeat, last GC version, max
//! version; ~51 B) in every Syn and SynAck, and a member sends about six of
//! those a second. Between two digests sent to the same peer the ids hardly
//! ever change, the GC and max versions rarely do, and every live member's
//! heartbeat has moved on by about the same amount (one a gossip interval).
//! So the digest carries that common heartbeat step once, and an entry that
//! follows its predecessor's match in the previous digest and differs only
//! in its heartbeat is one byte: how far its heartbeat step is from the
//! common one. Other entries say what changed. A digest of 100 members is
//! about 100 bytes instead of ~5,100, before compression, which squeezes
//! the runs of identical bytes further.
//!
//! Sans-IO: [`StreamEncoder`] and [`StreamDecoder`] turn chitchat's own
//! encoding into the coded form and back, byte for byte. Each side keeps the
//! last digest of its stream; the stream is reliable and ordered (one QUIC
//! stream), so both hold the same one. A new stream starts from nothing.
//! A member holds an encoder and a decoder per peer, and every one of them
//! names the same members: the ids are kept once, in an [`IdTable`] the
//! member's streams share, and a stream's digest is a slot number and three
//! counters per entry (28 bytes).
//!
//! Coded form (before the frame's compression):
//! ```text
//! 0, chitchat bytes                          a message without a digest
//! 1, head[4], count, step, entry * count, tail   a Syn or SynAck
//! entry: b < 0x80                            the entry after the previous
//!                                            match, same GC and max versions,
//!                                            heartbeat + step + (b - 64)
//!        0x80, id_len, id, hb, gc, max       a new id, values in full
//!        0x81, ref, dhb, dgc, dmax           the (ref-1)th entry after the
//!                                            previous match, differences
//!
//! 2, head[4], count, step, mode, bits_len, bits[bits_len], escape*, [tail]
//!    (mesh protocol 2) the same digest with the entries in a bit section,
//!    most significant bit first, zero-padded to a byte:
//!    0, rice(dev)                            the entry after the previous
//!                                            match, same GC and max versions
//!    10, gamma(moved), rice(dev)             the same, max version + moved
//!    11                                      the next escape, a 0x80 or 0x81
//!                                            record as in kind 1
//!    dev is the zigzag of the heartbeat's deviation from the step;
//!    rice(z) is z >> k in unary (ones, then a zero; at most 24) and the
//!    low k bits of z, k = mode & 0x7f (at most 40, chosen per digest);
//!    gamma(v) is Elias gamma (v from 1 to 2^24). Mode bit 0x80: the tail
//!    is the previous Syn's on this stream (a Syn's cluster id), not sent.
//! ```
//! `head` is chitchat's magic, protocol version and message type; `tail` is
//! the rest of the message (a Syn's cluster id, a SynAck's delta). Counts,
//! lengths and refs are LEB128 varints; `step` and differences are zigzag
//! varints of the wrapping difference, so any values round-trip.
//!
//! Why kind 2. A heartbeat moves once a gossip round and once per message
//! its member handles, so its deviation from the step spreads over a few
//! dozen values: a byte in kind 1, about 7 bits as a Rice code. A member
//! whose keys changed since the stream's previous digest (a health figure,
//! a check) has moved its max version; at 100 members, with figures
//! changing about once a minute each, a third of a digest's entries have,
//! and each took 5 or 6 bytes as a "changed" record; kind 2 codes it in
//! about 10 bits. Older members cannot read kind 2, so a stream uses it
//! only on a connection that settled on mesh protocol version 2 or later
//! ([`StreamEncoder::speaking`]); the decoder reads both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// chitchat's magic number and protocol version 0, as it writes them.
const CHITCHAT_MAGIC: [u8; 2] = 45_139u16.to_le_bytes();
const CHITCHAT_V0: u8 = 0;
const TYPE_SYN: u8 = 0;
const TYPE_SYN_ACK: u8 = 1;
const HEAD_LEN: usize = 4;

const KIND_PLAIN: u8 = 0;
const KIND_DIGEST: u8 = 1;
const KIND_DIGEST_BITS: u8 = 2;
/// The first mesh protocol version whose members read [`KIND_DIGEST_BITS`].
pub const BITS_SINCE_VERSION: u16 = 2;

/// Entry ops (see the module's documentation); below `OP_NEW` the byte is
/// the next entry's heartbeat deviation from the step, plus `SHORT_BIAS`.
const OP_NEW: u8 = 0x80;
const OP_CHANGED: u8 = 0x81;
const SHORT_BIAS: i64 = 64;
/// Kind 2: the mode byte's flag saying a Syn's tail (its cluster id) is
/// the previous Syn's on the stream; the low bits are the Rice parameter.
const MODE_SAME_TAIL: u8 = 0x80;
const MAX_RICE: u8 = 40;
/// Kind 2: longest unary part of a Rice code, and largest max-version move
/// coded in the bit section; beyond either an entry is an escape.
const MAX_UNARY: u64 = 24;
const MAX_MOVED: u64 = 1 << 24;
/// Longest Syn tail (cluster id) either end keeps to code the next against.
const MAX_KEPT_TAIL: usize = 256;

/// Longest member id accepted in a coded digest (chitchat's own limit on
/// the name is its u16 length; no real member comes near this).
const MAX_ID_LEN: usize = 1024;

/// Why a coded message could not be turned back into chitchat's bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("coded gossip message ends early")]
    Truncated,
    #[error("coded gossip message is malformed: {0}")]
    Malformed(&'static str),
    #[error("decoded gossip message would exceed {0} bytes")]
    TooLarge(usize),
}

/// A digest entry as parsed from chitchat's bytes.
#[derive(Debug, Clone, Copy)]
struct Entry<'a> {
    /// chitchat's bytes of the member's id (name, generation, address).
    id: &'a [u8],
    c: Counters,
}

/// A digest entry's counters, which both ends keep per stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Counters {
    heartbeat: u64,
    gc: u64,
    max: u64,
}

/// The member ids a member's streams name, each kept once however many
/// streams' digests hold it, and forgotten when none does. Cloning shares
/// the table. Slots are counted references: a slot a stream holds is never
/// given to another id, so two entries with the same slot have the same id.
#[derive(Debug, Clone, Default)]
pub struct IdTable(Arc<Mutex<Ids>>);

#[derive(Debug, Default)]
struct Ids {
    /// An id's bytes and how many digest entries hold its slot.
    slots: Vec<Option<(Arc<[u8]>, u32)>>,
    free: Vec<u32>,
    index: HashMap<Arc<[u8]>, u32>,
}

impl IdTable {
    fn lock(&self) -> MutexGuard<'_, Ids> {
        // The table is consistent between calls: nothing in it panics
        // half-way through a change.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many distinct ids the streams sharing this table hold.
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ids {
    /// The slot of `id`, taken once more.
    fn acquire(&mut self, id: &[u8]) -> u32 {
        if let Some(&slot) = self.index.get(id) {
            self.retain(slot);
            return slot;
        }
        let id: Arc<[u8]> = id.into();
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some((id.clone(), 1));
                slot
            }
            None => {
                self.slots.push(Some((id.clone(), 1)));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        slot
    }

    fn retain(&mut self, slot: u32) {
        if let Some((_, refs)) = &mut self.slots[slot as usize] {
            *refs += 1;
        }
    }

    fn release(&mut self, slot: u32) {
        let entry = &mut self.slots[slot as usize];
        if let Some((id, refs)) = entry {
            *refs -= 1;
            if *refs == 0 {
                self.index.remove(&**id);
                *entry = None;
                self.free.push(slot);
            }
        }
    }

    fn id(&self, slot: u32) -> &[u8] {
        self.slots[slot as usize].as_ref().map_or(&[], |(id, _)| id)
    }

    fn release_all(&mut self, kept: &[Kept]) {
        for k in kept {
            self.release(k.slot);
        }
    }
}

/// A digest entry as a stream keeps it: its id's slot in the [`IdTable`]
/// and its counters, 28 bytes.
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct Kept {
    slot: u32,
    c: Counters,
}

/// The sending side of one stream. It keeps the previous digest as the
/// slot of each id and its counters: a member holds one of these per peer.
/// [`Default`] codes for mesh protocol 1 with a table of its own;
/// [`StreamEncoder::speaking`] for a given version, and
/// [`StreamEncoder::sharing`] with the member's table.
#[derive(Debug, Default)]
pub struct StreamEncoder {
    table: IdTable,
    prev: Vec<Kept>,
    /// Whether the peer reads kind 2 (the bit-coded digest).
    bit_coded: bool,
    /// Kind 2: the previous Syn's tail (its cluster id), if short.
    prev_syn_tail: Option<Box<[u8]>>,
}

/// An entry of a digest being coded, against the previous digest.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// The entry after the previous match, same GC version, max version
    /// moved by `moved`, heartbeat `off` from the common step.
    Next {
        moved: u64,
        off: i64,
        p: Counters,
    },
    /// The `r`th entry after the previous match (1: the next), otherwise.
    Changed {
        r: u64,
        p: Counters,
    },
    New,
}

/// An entry's op as read: the next entry after the previous match (same GC
/// version, max version moved by `moved`, heartbeat `off` from the common
/// step), or a byte op ("new" or "changed").
enum Got {
    Next { moved: u64, off: i64 },
    Byte(u8),
}

/// The receiving side of one stream. It keeps the previous digest as the
/// slot of each id and its counters, as [`StreamEncoder`] does.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    table: IdTable,
    prev: Vec<Kept>,
    /// Kind 2: the previous Syn's tail (its cluster id), if short.
    prev_syn_tail: Option<Box<[u8]>>,
}

impl StreamEncoder {
    /// An encoder for a stream to a peer on a connection that settled on
    /// mesh protocol `version`: it codes what that version reads.
    pub fn speaking(version: u16) -> Self {
        StreamEncoder {
            table: IdTable::default(),
            prev: Vec::new(),
            bit_coded: version >= BITS_SINCE_VERSION,
            prev_syn_tail: None,
        }
    }

    /// The same encoder, keeping its ids in `table` (before any message).
    pub fn sharing(mut self, table: &IdTable) -> Self {
        self.table.lock().release_all(&self.prev);
        self.prev.clear();
        self.table = table.clone();
        self
    }
}

impl StreamDecoder {
    /// A decoder keeping its ids in `table`.
    pub fn sharing(table: &IdTable) -> Self {
        StreamDecoder {
            table: table.clone(),
            prev: Vec::new(),
            prev_syn_tail: None,
        }
    }
}

impl Drop for StreamEncoder {
    fn drop(&mut self) {
        self.table.lock().release_all(&self.prev);
    }
}

impl Drop for StreamDecoder {
    fn drop(&mut self) {
        self.table.lock().release_all(&self.prev);
    }
}

impl StreamEncoder {
    /// Codes one chitchat message (its own encoding). A message this does
    /// not recognise travels as it is.
    pub fn encode(&mut self, plain: &[u8]) -> Vec<u8> {
        let Some((entries, tail_at)) = parse_digest(plain) else {
            let mut out = Vec::with_capacity(plain.len() + 1);
            out.push(KIND_PLAIN);
            out.extend_from_slice(plain);
            return out;
        };
        let mut ids = self.table.lock();
        // Every id's slot, taken for this digest before the previous one's
        // are given back: a slot both hold stays the same id throughout.
        let slots: Vec<u32> = entries.iter().map(|e| ids.acquire(e.id)).collect();
        let index: HashMap<u32, usize> = self
            .prev
            .iter()
            .enumerate()
            .map(|(i, k)| (k.slot, i))
            .collect();
        let matched: Vec<Option<usize>> = slots.iter().map(|s| index.get(s).copied()).collect();
        let prev_c = |i: usize| -> Counters { self.prev[i].c };
        // The common heartbeat step: the median of the matched entries'.
        let mut steps: Vec<i64> = entries
            .iter()
            .zip(&matched)
            .filter_map(|(e, m)| m.map(|i| e.c.heartbeat.wrapping_sub(prev_c(i).heartbeat) as i64))
            .collect();
        steps.sort_unstable();
        let step = steps.get(steps.len() / 2).copied().unwrap_or(0);
        // What each entry is against the previous digest.
        let mut ops = Vec::with_capacity(entries.len());
        let mut cursor = 0usize;
        for (e, m) in entries.iter().zip(&matched) {
            ops.push(match *m {
                Some(i) if i >= cursor => {
                    let p = prev_c(i);
                    let r = (i - cursor + 1) as u64;
                    cursor = i + 1;
                    let moved = e.c.max.wrapping_sub(p.max);
                    if r == 1 && e.c.gc == p.gc && moved <= MAX_MOVED {
                        let off =
                            (e.c.heartbeat.wrapping_sub(p.heartbeat) as i64).wrapping_sub(step);
                        Op::Next { moved, off, p }
                    } else {
                        Op::Changed { r, p }
                    }
                }
                _ => Op::New,
            });
        }
        let tail = &plain[tail_at..];
        let mut out = Vec::with_capacity(24 + entries.len() * 2 + tail.len());
        out.push(if self.bit_coded {
            KIND_DIGEST_BITS
        } else {
            KIND_DIGEST
        });
        out.extend_from_slice(&plain[..HEAD_LEN]);
        put_varint(&mut out, entries.len() as u64);
        put_zigzag(&mut out, step);
        if self.bit_coded {
            let k = rice_parameter(&ops);
            let is_syn = plain[3] == TYPE_SYN;
            let same_tail = is_syn && self.prev_syn_tail.as_deref() == Some(tail);
            out.push(k | if same_tail { MODE_SAME_TAIL } else { 0 });
            let mut bits = BitWriter::default();
            let mut escapes = Vec::new();
            for (e, op) in entries.iter().zip(&ops) {
                match *op {
                    Op::Next { moved, off, .. } if zigzag(off) >> k <= MAX_UNARY => {
                        if moved == 0 {
                            bits.put(0, 1);
                        } else {
                            bits.put(0b10, 2);
                            bits.gamma(moved);
                        }
                        bits.rice(zigzag(off), k);
                    }
                    _ => {
                        bits.put(0b11, 2);
                        put_record(&mut escapes, e, *op);
                    }
                }
            }
            let bits = bits.finish();
            put_varint(&mut out, bits.len() as u64);
            out.extend_from_slice(&bits);
            out.extend_from_slice(&escapes);
            if !same_tail {
                out.extend_from_slice(tail);
            }
            if is_syn {
                self.prev_syn_tail = (tail.len() <= MAX_KEPT_TAIL).then(|| tail.into());
            }
        } else {
            for (e, op) in entries.iter().zip(&ops) {
                match *op {
                    Op::Next { moved: 0, off, .. } if (-SHORT_BIAS..SHORT_BIAS).contains(&off) => {
                        out.push((off + SHORT_BIAS) as u8)
                    }
                    _ => put_record(&mut out, e, *op),
                }
            }
            out.extend_from_slice(tail);
        }
        ids.release_all(&self.prev);
        self.prev = slots
            .into_iter()
            .zip(&entries)
            .map(|(slot, e)| Kept { slot, c: e.c })
            .collect();
        out
    }
}

impl StreamDecoder {
    /// chitchat's bytes of one coded message, at most `limit` of them. On
    /// error the stream's state is unchanged (and the stream should end).
    pub fn decode(&mut self, coded: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
        let (&kind, rest) = coded.split_first().ok_or(CodecError::Truncated)?;
        match kind {
            KIND_PLAIN => {
                if rest.len() > limit {
                    return Err(CodecError::TooLarge(limit));
                }
                Ok(rest.to_vec())
            }
            KIND_DIGEST => self.decode_digest(rest, limit, false),
            KIND_DIGEST_BITS => self.decode_digest(rest, limit, true),
            _ => Err(CodecError::Malformed("unknown kind")),
        }
    }

    fn decode_digest(
        &mut self,
        coded: &[u8],
        limit: usize,
        bits_kind: bool,
    ) -> Result<Vec<u8>, CodecError> {
        let mut ids = self.table.lock();
        let mut prev = Vec::new();
        match self.decode_entries(&mut ids, &mut prev, coded, limit, bits_kind) {
            Ok((out, syn_tail)) => {
                ids.release_all(&self.prev);
                self.prev = prev;
                if let Some(kept) = syn_tail {
                    self.prev_syn_tail = kept;
                }
                Ok(out)
            }
            Err(e) => {
                // The stream's state is unchanged: give back what this
                // digest took.
                ids.release_all(&prev);
                Err(e)
            }
        }
    }

    /// Decodes a digest into chitchat's bytes, its entries into `prev`
    /// (each slot taken once, also on error), and says what the stream's
    /// kept Syn tail becomes, if it changes.
    #[allow(clippy::type_complexity)]
    fn decode_entries(
        &self,
        ids: &mut Ids,
        prev: &mut Vec<Kept>,
        coded: &[u8],
        limit: usize,
        bits_kind: bool,
    ) -> Result<(Vec<u8>, Option<Option<Box<[u8]>>>), CodecError> {
        let mut r = Reader(coded);
        let head = r.take(HEAD_LEN)?;
        if head[..2] != CHITCHAT_MAGIC || head[2] != CHITCHAT_V0 {
            return Err(CodecError::Malformed("not a chitchat message"));
        }
        if head[3] != TYPE_SYN && head[3] != TYPE_SYN_ACK {
            return Err(CodecError::Malformed("a digest in a message without one"));
        }
        let is_syn = head[3] == TYPE_SYN;
        let count = r.varint()?;
        let count = u16::try_from(count).map_err(|_| CodecError::Malformed("too many entries"))?;
        let mut out = Vec::with_capacity(HEAD_LEN + 2 + count as usize * 51);
        out.extend_from_slice(head);
        out.extend_from_slice(&count.to_le_bytes());
        let step = r.zigzag()?;
        // Kind 2: the mode, then the bit section; escapes follow it.
        let mut bits = None;
        let mut same_tail = false;
        if bits_kind {
            let mode = r.byte()?;
            let k = mode & !MODE_SAME_TAIL;
            if k > MAX_RICE {
                return Err(CodecError::Malformed("Rice parameter out of range"));
            }
            same_tail = mode & MODE_SAME_TAIL != 0;
            if same_tail && (!is_syn || self.prev_syn_tail.is_none()) {
                return Err(CodecError::Malformed("no previous cluster id to repeat"));
            }
            let len = usize::try_from(r.varint()?).map_err(|_| CodecError::Truncated)?;
            bits = Some((BitReader::new(r.take(len)?), k));
        }
        prev.reserve_exact(count as usize);
        let mut cursor = 0usize;
        let past = || CodecError::Malformed("reference past the previous digest");
        for _ in 0..count {
            // The entry's op: kind 1's byte, or kind 2's bit code (whose
            // escapes are kind 1's "new" and "changed" records).
            let op = match bits.as_mut() {
                None => match r.byte()? {
                    short if short < OP_NEW => Got::Next {
                        moved: 0,
                        off: i64::from(short) - SHORT_BIAS,
                    },
                    op => Got::Byte(op),
                },
                Some((b, k)) => {
                    if b.bit()? == 0 {
                        let off = unzigzag(b.rice(*k)?);
                        Got::Next { moved: 0, off }
                    } else if b.bit()? == 0 {
                        let moved = b.gamma()?;
                        let off = unzigzag(b.rice(*k)?);
                        Got::Next { moved, off }
                    } else {
                        match r.byte()? {
                            op @ (OP_NEW | OP_CHANGED) => Got::Byte(op),
                            _ => return Err(CodecError::Malformed("unknown escape op")),
                        }
                    }
                }
            };
            let (slot, c) = match op {
                Got::Next { moved, off } => {
                    let i = cursor;
                    let k = *self.prev.get(i).ok_or_else(past)?;
                    let p = k.c;
                    cursor += 1;
                    let c = Counters {
                        heartbeat: p.heartbeat.wrapping_add(step.wrapping_add(off) as u64),
                        max: p.max.wrapping_add(moved),
                        ..p
                    };
                    ids.retain(k.slot);
                    (k.slot, c)
                }
                Got::Byte(OP_NEW) => {
                    let len = r.varint()? as usize;
                    if len > MAX_ID_LEN {
                        return Err(CodecError::Malformed("member id too long"));
                    }
                    let id = r.take(len)?;
                    let c = Counters {
                        heartbeat: r.varint()?,
                        gc: r.varint()?,
                        max: r.varint()?,
                    };
                    (ids.acquire(id), c)
                }
                Got::Byte(OP_CHANGED) => {
                    let k = r.varint()?;
                    let i = usize::try_from(k)
                        .ok()
                        .filter(|&k| k > 0)
                        .and_then(|k| cursor.checked_add(k - 1))
                        .filter(|&i| i < self.prev.len())
                        .ok_or_else(past)?;
                    let k = self.prev[i];
                    let p = k.c;
                    cursor = i + 1;
                    let c = Counters {
                        heartbeat: r.diff(p.heartbeat)?,
                        gc: r.diff(p.gc)?,
                        max: r.diff(p.max)?,
                    };
                    ids.retain(k.slot);
                    (k.slot, c)
                }
                Got::Byte(_) => return Err(CodecError::Malformed("unknown entry op")),
            };
            prev.push(Kept { slot, c });
            let id = ids.id(slot);
            if out.len() + id.len() + 24 > limit {
                return Err(CodecError::TooLarge(limit));
            }
            out.extend_from_slice(id);
            for v in [c.heartbeat, c.gc, c.max] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        if let Some((b, _)) = bits {
            b.finish()?;
        }
        let tail = if same_tail {
            if !r.0.is_empty() {
                return Err(CodecError::Malformed("bytes after a repeated cluster id"));
            }
            self.prev_syn_tail.as_deref().expect("checked above")
        } else {
            r.0
        };
        if out.len() + tail.len() > limit {
            return Err(CodecError::TooLarge(limit));
        }
        out.extend_from_slice(tail);
        let syn_tail =
            (bits_kind && is_syn).then(|| (tail.len() <= MAX_KEPT_TAIL).then(|| tail.into()));
        Ok((out, syn_tail))
    }
}

/// The digest entries of a Syn or SynAck in chitchat's encoding, and where
/// the rest of the message starts; `None` for any other message (or bytes
/// that do not parse, which then travel as they are).
fn parse_digest(plain: &[u8]) -> Option<(Vec<Entry<'_>>, usize)> {
    let head = plain.get(..HEAD_LEN)?;
    if head[..2] != CHITCHAT_MAGIC || head[2] != CHITCHAT_V0 {
        return None;
    }
    if head[3] != TYPE_SYN && head[3] != TYPE_SYN_ACK {
        return None;
    }
    let mut r = Reader(&plain[HEAD_LEN..]);
    let count = u16::from_le_bytes(r.take(2).ok()?.try_into().ok()?);
    let mut entries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let start = r.0;
        let name_len = u16::from_le_bytes(r.take(2).ok()?.try_into().ok()?) as usize;
        r.take(name_len).ok()?;
        r.take(8).ok()?; // generation
        let ip_len = match r.take(1).ok()?[0] {
            4 => 4,
            6 => 16,
            _ => return None,
        };
        r.take(ip_len + 2).ok()?; // address and port
        let id_len = start.len() - r.0.len();
        if id_len > MAX_ID_LEN {
            return None;
        }
        let mut counter = || Some(u64::from_le_bytes(r.take(8).ok()?.try_into().ok()?));
        let c = Counters {
            heartbeat: counter()?,
            gc: counter()?,
            max: counter()?,
        };
        entries.push(Entry {
            id: &start[..id_len],
            c,
        });
    }
    Some((entries, plain.len() - r.0.len()))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let &b = self.0.first().ok_or(CodecError::Truncated)?;
            self.0 = &self.0[1..];
            if shift == 63 && b > 1 {
                return Err(CodecError::Malformed("varint overflows"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(CodecError::Malformed("varint too long"))
    }

    fn byte(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn zigzag(&mut self) -> Result<i64, CodecError> {
        Ok(unzigzag(self.varint()?))
    }

    fn diff(&mut self, base: u64) -> Result<u64, CodecError> {
        Ok(base.wrapping_add(self.zigzag()? as u64))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_zigzag(out: &mut Vec<u8>, d: i64) {
    put_varint(out, zigzag(d));
}

fn put_diff(out: &mut Vec<u8>, new: u64, old: u64) {
    put_zigzag(out, new.wrapping_sub(old) as i64);
}

fn zigzag(d: i64) -> u64 {
    ((d << 1) ^ (d >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

/// Entry `e` as a byte record: "new" (the id and counters in full) or
/// "changed" (which entry after the previous match, and differences from
/// its previous counters), as kind 1 codes it and kind 2 escapes to.
fn put_record(out: &mut Vec<u8>, e: &Entry<'_>, op: Op) {
    let (r, p) = match op {
        Op::Next { p, .. } => (1, p),
        Op::Changed { r, p } => (r, p),
        Op::New => {
            out.push(OP_NEW);
            put_varint(out, e.id.len() as u64);
            out.extend_from_slice(e.id);
            for v in [e.c.heartbeat, e.c.gc, e.c.max] {
                put_varint(out, v);
            }
            return;
        }
    };
    out.push(OP_CHANGED);
    put_varint(out, r);
    put_diff(out, e.c.heartbeat, p.heartbeat);
    put_diff(out, e.c.gc, p.gc);
    put_diff(out, e.c.max, p.max);
}

/// The Rice parameter that codes the heartbeat deviations of `ops` in the
/// fewest bits (entries whose code would be too long become escapes).
fn rice_parameter(ops: &[Op]) -> u8 {
    let zs: Vec<u64> = ops
        .iter()
        .filter_map(|op| match *op {
            Op::Next { off, .. } => Some(zigzag(off)),
            _ => None,
        })
        .collect();
    (0..=MAX_RICE)
        .min_by_key(|&k| {
            zs.iter()
                .map(|z| match z >> k {
                    q if q <= MAX_UNARY => q + 1 + u64::from(k),
                    _ => 8 * 12, // an escape: a "changed" record
                })
                .sum::<u64>()
        })
        .unwrap_or(0)
}

/// Bits written most significant first, then padded with zeros to a byte.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// The low `n` bits of `v` (`n` at most 56: the accumulator keeps
    /// fewer than 8 bits between calls).
    fn put(&mut self, v: u64, n: u32) {
        debug_assert!(n <= 56);
        self.acc = (self.acc << n) | (v & ((1u64 << n) - 1));
        self.n += n;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
    }

    /// `z` as a Rice code with parameter `k`: `z >> k` (at most
    /// [`MAX_UNARY`]) in unary, ones then a zero, then the low `k` bits.
    fn rice(&mut self, z: u64, k: u8) {
        let q = (z >> k) as u32;
        debug_assert!(u64::from(q) <= MAX_UNARY);
        self.put(((1u64 << q) - 1) << 1, q + 1);
        self.put(z, u32::from(k));
    }

    /// `v` (1 to [`MAX_MOVED`]) as an Elias gamma code: as many zeros as
    /// it has bits after its top one, then its bits.
    fn gamma(&mut self, v: u64) {
        let n = 64 - v.leading_zeros();
        self.put(0, n - 1);
        self.put(v, n);
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.put(0, 8 - self.n);
        }
        self.out
    }
}

/// Reads what [`BitWriter`] wrote; every read is bounded by the section.
struct BitReader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, pos: 0 }
    }

    fn bit(&mut self) -> Result<u8, CodecError> {
        let byte = self.bytes.get(self.pos / 8).ok_or(CodecError::Truncated)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Ok(b)
    }

    fn bits(&mut self, n: u32) -> Result<u64, CodecError> {
        let mut v = 0u64;
        for _ in 0..n {
            v = (v << 1) | u64::from(self.bit()?);
        }
        Ok(v)
    }

    fn rice(&mut self, k: u8) -> Result<u64, CodecError> {
        let mut q = 0u64;
        while self.bit()? == 1 {
            q += 1;
            if q > MAX_UNARY {
                return Err(CodecError::Malformed("Rice code too long"));
            }
        }
        Ok((q << k) | self.bits(u32::from(k))?)
    }

    fn gamma(&mut self) -> Result<u64, CodecError> {
        let mut zeros = 0u32;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > MAX_MOVED.ilog2() {
                return Err(CodecError::Malformed("gamma code too long"));
            }
        }
        Ok((1u64 << zeros) | self.bits(zeros)?)
    }

    /// The section must end here, padded with zero bits to its last byte.
    fn finish(mut self) -> Result<(), CodecError> {
        let padding = self.bytes.len() * 8 - self.pos;
        if padding >= 8 || self.bits(padding as u32)? != 0 {
            return Err(CodecError::Malformed("bits left over in a digest"));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeSet;

    use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable};
    use proptest::prelude::*;

    use super::*;

    /// chitchat's bytes of a Syn (type 0) or SynAck (type 1, with an empty
    /// delta) whose digest holds `members` as (name, heartbeat, gc, max).
    pub(crate) fn message(kind: u8, members: &[(&str, u64, u64, u64)]) -> Vec<u8> {
        let mut buf = ChitchatMessage::BadCluster.serialize_to_vec();
        buf.pop();
        buf.push(kind);
        (members.len() as u16).serialize(&mut buf);
        for (i, &(name, hb, gc, max)) in members.iter().enumerate() {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16));
            ChitchatId::new(name.to_owned(), 1_763_800_000_000, addr).serialize(&mut buf);
            for v in [hb, gc, max] {
                v.serialize(&mut buf);
            }
        }
        if kind == TYPE_SYN {
            "bench/site-1".to_owned().serialize(&mut buf);
        } else {
            // An empty delta, as chitchat writes it.
            let ack = ChitchatMessage::Ack {
                delta: Default::default(),
            }
            .serialize_to_vec();
            buf.extend_from_slice(&ack[HEAD_LEN..]);
        }
        // chitchat must read what this builds, or the test proves nothing.
        ChitchatMessage::deserialize(&mut &buf[..]).expect("a well-formed message");
        buf
    }

    fn site(n: usize, round: u64) -> Vec<(String, u64, u64, u64)> {
        (0..n)
            .map(|i| (format!("site-1-n{i:03}"), 1_000 + round, 0, 40 + i as u64))
            .collect()
    }

    fn refs(v: &[(String, u64, u64, u64)]) -> Vec<(&str, u64, u64, u64)> {
        v.iter()
            .map(|(n, a, b, c)| (n.as_str(), *a, *b, *c))
            .collect()
    }

    /// An encoder for each mesh protocol version this build speaks.
    fn encoders() -> Vec<StreamEncoder> {
        crate::authz::spoken_versions()
            .map(StreamEncoder::speaking)
            .collect()
    }

    #[test]
    fn every_message_of_a_stream_decodes_to_chitchats_exact_bytes() {
        for mut enc in encoders() {
            every_message_decodes_with(&mut enc);
        }
    }

    fn every_message_decodes_with(enc: &mut StreamEncoder) {
        let mut dec = StreamDecoder::default();
        let ack = ChitchatMessage::Ack {
            delta: Default::default(),
        }
        .serialize_to_vec();
        let mut third = site(30, 2);
        third.remove(7); // a member gone
        third.push(("site-1-n999".into(), 1, 0, 1)); // one new
        third[3].3 += 5; // a member's state changed
        third[4].3 += MAX_MOVED + 1; // by more than kind 2's bit code says
        third[6].1 += 1 << 40; // a heartbeat far off the step
        third[5].2 += 1; // its GC version too
        let stream = [
            message(TYPE_SYN, &refs(&site(30, 0))),
            ack.clone(),
            message(TYPE_SYN_ACK, &refs(&site(30, 1))),
            message(TYPE_SYN, &refs(&third)),
            ChitchatMessage::BadCluster.serialize_to_vec(),
            message(TYPE_SYN, &[]),
            message(TYPE_SYN_ACK, &refs(&site(3, 9))),
        ];
        for plain in &stream {
            let coded = enc.encode(plain);
            assert_eq!(&dec.decode(&coded, 1 << 20).unwrap(), plain);
        }
    }

    #[test]
    fn a_digest_after_the_first_costs_a_few_bytes_a_member() {
        let mut enc = StreamEncoder::default();
        let first = message(TYPE_SYN, &refs(&site(100, 0)));
        let second = message(TYPE_SYN, &refs(&site(100, 33)));
        let a = enc.encode(&first).len();
        let b = enc.encode(&second).len();
        assert!(a > 100 * 30, "the first carries every id: {a} B");
        assert!(b <= 100 + 40, "{b} B for 100 members of {} B", second.len());
    }

    #[test]
    fn entries_whose_keys_changed_cost_a_few_bits_from_protocol_2() {
        let first = message(TYPE_SYN, &refs(&site(100, 0)));
        let mut moved = site(100, 33);
        for m in moved.iter_mut().step_by(3) {
            m.3 += 2; // a third of the members changed a key or two
        }
        let second = message(TYPE_SYN, &refs(&moved));
        let mut sizes = Vec::new();
        for version in [1, 2] {
            let (mut enc, mut dec) = (StreamEncoder::speaking(version), StreamDecoder::default());
            dec.decode(&enc.encode(&first), 1 << 20).unwrap();
            let coded = enc.encode(&second);
            // Version 1's members cannot read kind 2: it is never sent them.
            assert_eq!(
                coded[0],
                [KIND_DIGEST, KIND_DIGEST_BITS][version as usize - 1]
            );
            assert_eq!(dec.decode(&coded, 1 << 20).unwrap(), second);
            sizes.push(coded.len());
        }
        // 66 entries of 1 byte and 34 of 5 (6 once heartbeats have moved
        // by 64 or more); then, every heartbeat on the step, 2 bits and 6
        // (10, gamma(2), rice(0) with k = 0). The head and a Syn's cluster
        // id take about 20 bytes, less in kind 2.
        assert!(sizes[0] >= 66 + 34 * 5 + 16, "{sizes:?}");
        assert!(sizes[1] <= (66 * 2 + 34 * 6) / 8 + 24, "{sizes:?}");
    }

    #[test]
    fn a_syn_repeats_the_previous_cluster_id_by_a_flag() {
        let (mut enc, mut dec) = (StreamEncoder::speaking(2), StreamDecoder::default());
        let syn = message(TYPE_SYN, &refs(&site(10, 0)));
        let first = enc.encode(&syn);
        let second = enc.encode(&syn);
        let cluster_id = 2 + "bench/site-1".len();
        assert!(
            second.len() + cluster_id <= first.len(),
            "{first:?} {second:?}"
        );
        assert_eq!(dec.decode(&first, 1 << 20).unwrap(), syn);
        assert_eq!(dec.decode(&second, 1 << 20).unwrap(), syn);
        // A stream's first Syn cannot say "the same cluster id".
        assert_eq!(
            StreamDecoder::default().decode(&second, 1 << 20),
            Err(CodecError::Malformed("no previous cluster id to repeat"))
        );
    }

    #[test]
    fn the_state_kept_per_stream_is_small() {
        // A member keeps one encoder and one decoder per peer.
        assert_eq!(std::mem::size_of::<Kept>(), 28);
    }

    #[test]
    fn streams_sharing_a_table_keep_each_id_once_and_forget_it_with_the_last_holder() {
        // A member with 10 peers: its encoders share one table, and the
        // peers' decoders (one member's view of them) another.
        let (sending, receiving) = (IdTable::default(), IdTable::default());
        let mut streams: Vec<(StreamEncoder, StreamDecoder)> = (0..10)
            .map(|_| {
                (
                    StreamEncoder::speaking(BITS_SINCE_VERSION).sharing(&sending),
                    StreamDecoder::sharing(&receiving),
                )
            })
            .collect();
        let mut members = site(100, 0);
        for round in 0..3u64 {
            if round == 2 {
                // Five members restart: new ids, the old ones gone.
                for m in &mut members[..5] {
                    m.0.push('x');
                }
            }
            for (i, (enc, dec)) in streams.iter_mut().enumerate() {
                for m in &mut members {
                    m.1 += 1;
                }
                let plain = message(TYPE_SYN, &refs(&members));
                assert_eq!(dec.decode(&enc.encode(&plain), 1 << 20).unwrap(), plain);
                if round == 2 && i < 9 {
                    // Streams not yet sent the new digest still hold the
                    // restarted members' old ids.
                    assert_eq!((sending.len(), receiving.len()), (105, 105));
                }
            }
            assert_eq!((sending.len(), receiving.len()), (100, 100));
        }
        // A bad message leaves the stream and the table as they were.
        let (enc, dec) = &mut streams[0];
        let mut bad = enc.encode(&message(TYPE_SYN, &refs(&site(120, 9))));
        bad.truncate(bad.len() - 3);
        assert!(dec.decode(&bad, 1 << 20).is_err());
        assert_eq!(receiving.len(), 100);
        let plain = message(TYPE_SYN, &refs(&members));
        let mut fresh = StreamEncoder::speaking(BITS_SINCE_VERSION);
        assert!(dec.decode(&fresh.encode(&plain), 1 << 20).is_ok());
        drop(streams);
        assert!(sending.is_empty() && receiving.is_empty());
        drop(fresh);
    }

    #[test]
    fn references_beyond_the_previous_digest_are_refused() {
        let mut dec = StreamDecoder::default();
        let mut coded = vec![KIND_DIGEST];
        coded.extend_from_slice(&CHITCHAT_MAGIC);
        // One entry, step 0, "the next entry after the match": there is none.
        coded.extend_from_slice(&[CHITCHAT_V0, TYPE_SYN, 1, 0, 64]);
        assert_eq!(
            dec.decode(&coded, 1 << 20),
            Err(CodecError::Malformed("reference past the previous digest"))
        );
    }

    #[test]
    fn a_digest_decoding_past_the_limit_is_refused() {
        let (mut enc, mut dec) = (StreamEncoder::default(), StreamDecoder::default());
        let plain = message(TYPE_SYN, &refs(&site(200, 0)));
        let coded = enc.encode(&plain);
        assert!(matches!(
            dec.decode(&coded, plain.len() - 1),
            Err(CodecError::TooLarge(_))
        ));
        // Refused without taking the digest as the base for the next one.
        assert!(dec.prev.is_empty());
    }

    proptest! {
        #[test]
        fn garbage_is_refused_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            let mut dec = StreamDecoder::default();
            let _ = dec.decode(&bytes, 1 << 16);
            for kind in [KIND_DIGEST, KIND_DIGEST_BITS] {
                let mut digest = vec![kind];
                digest.extend_from_slice(&bytes);
                let _ = dec.decode(&digest, 1 << 16);
            }
        }

        #[test]
        fn any_digests_round_trip_in_sequence(
            rounds in proptest::collection::vec(
                proptest::collection::btree_map(0u16..64, (any::<u64>(), any::<u64>(), any::<u64>()), 0..40),
                1..6,
            ),
            version in 1u16..=3,
        ) {
            let (mut enc, mut dec) = (StreamEncoder::speaking(version), StreamDecoder::default());
            for round in rounds {
                let names: Vec<(String, u64, u64, u64)> = round
                    .iter()
                    .map(|(n, &(a, b, c))| (format!("m{n:05}"), a, b, c))
                    .collect();
                let plain = message(TYPE_SYN_ACK, &refs(&names));
                let coded = enc.encode(&plain);
                prop_assert_eq!(dec.decode(&coded, 1 << 20).unwrap(), plain);
            }
        }

        #[test]
        fn streams_sharing_tables_round_trip_in_any_order_and_leave_nothing_behind(
            sends in proptest::collection::vec(
                (0usize..4, proptest::collection::btree_set(0u16..48, 0..30), any::<u64>()),
                1..40,
            ),
        ) {
            let (sending, receiving) = (IdTable::default(), IdTable::default());
            let mut streams: Vec<(StreamEncoder, StreamDecoder)> = (0..4)
                .map(|i| {
                    (
                        StreamEncoder::speaking(1 + i as u16 % 2).sharing(&sending),
                        StreamDecoder::sharing(&receiving),
                    )
                })
                .collect();
            // The ids each stream's last digest holds: a member's id is
            // its name and its address, which `message` takes from its place.
            let mut held: Vec<BTreeSet<(u16, usize)>> = vec![BTreeSet::new(); 4];
            for (to, names, hb) in sends {
                let members: Vec<(String, u64, u64, u64)> = names
                    .iter()
                    .map(|&n| (format!("m{n:03}"), hb.wrapping_add(u64::from(n)), 0, u64::from(n)))
                    .collect();
                let plain = message(TYPE_SYN_ACK, &refs(&members));
                let (enc, dec) = &mut streams[to];
                prop_assert_eq!(dec.decode(&enc.encode(&plain), 1 << 20).unwrap(), plain);
                held[to] = names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
                // Each id held by some stream is kept, once; no other is.
                let distinct = held.iter().flatten().collect::<BTreeSet<_>>().len();
                prop_assert_eq!((sending.len(), receiving.len()), (distinct, distinct));
            }
            drop(streams);
            prop_assert!(sending.is_empty() && receiving.is_empty());
        }

        #[test]
        fn heartbeats_near_the_common_step_round_trip(
            rounds in proptest::collection::vec(
                (0u64..40, proptest::collection::vec((-140i64..140, 0u64..130, any::<bool>()), 30)),
                1..6,
            ),
            version in 1u16..=3,
        ) {
            let (mut enc, mut dec) = (StreamEncoder::speaking(version), StreamDecoder::default());
            let mut members: Vec<(String, u64, u64, u64)> =
                (0..30).map(|i| (format!("site-1-n{i:03}"), 1_000, 0, 40)).collect();
            for (step, noise) in rounds {
                for (m, (off, dmax, present)) in members.iter_mut().zip(&noise) {
                    m.1 = m.1.wrapping_add(step).wrapping_add(*off as u64);
                    m.3 += dmax;
                    if !present {
                        m.0.push('x'); // a new id (a restarted member)
                    }
                }
                let plain = message(TYPE_SYN, &refs(&members));
                let coded = enc.encode(&plain);
                prop_assert_eq!(dec.decode(&coded, 1 << 20).unwrap(), plain);
            }
        }
    }
}
