//! trellis-sim: the mesh's cores on a virtual clock.
//!
//! Runs the sans-IO cores of relays and hubs, and site gossip (a calibrated
//! model, or real chitchat), on a virtual network and disk, for what-if
//! runs at 100k nodes that a seed reproduces. See `docs/ARCHITECTURE.md`,
//! "Simulator".
//!
//! # Layout
//! - [`EventQueue`]: events ordered by `(virtual time, insertion sequence)`,
//!   so that equal times are delivered in the order they were scheduled and
//!   a run is reproducible.
//! - [`rng`]: one root seed, an independent stream per named consumer.
//! - [`scenario`]: scenario files; [`schedule`]: the faults they expand to.
//! - [`config`]: configuration changes: what each relay and node holds, and
//!   the books that time each site's convergence.
//! - [`patch`]: patch rollouts: the published patches, each rollout's
//!   waves, what hubs, relays and nodes hold and do of them, and the books.
//! - [`foresight`]: trends, anomalies and runbooks on the nodes given
//!   them: their figures, which nodes are modelled, and the books.
//! - [`model`]: the gossip model of a site; [`real`]: real chitchat on an
//!   in-memory transport under paused tokio time; [`site`]: a site, its
//!   gossip and its relay.
//! - [`net`]: links and their messages; [`disk`]: a relay's buffer on a
//!   virtual disk.
//! - [`world`]: everything on one clock, and the books that check the
//!   invariants; [`report`] and [`html`]: what a run writes.

pub mod config;
pub mod disk;
pub mod foresight;
pub mod html;
pub mod model;
pub mod net;
pub mod patch;
pub mod real;
pub mod report;
pub mod rng;
pub mod scenario;
pub mod schedule;
pub mod site;
pub mod world;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Virtual time since the start of a run.
pub type VirtualTime = Duration;

struct Entry<E> {
    at: VirtualTime,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// A priority queue of events by `(time, sequence)`.
pub struct EventQueue<E> {
    heap: BinaryHeap<Reverse<Entry<E>>>,
    now: VirtualTime,
    next_seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            heap: BinaryHeap::new(),
            now: Duration::ZERO,
            next_seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The time of the last event popped.
    pub fn now(&self) -> VirtualTime {
        self.now
    }

    /// Schedules `event` at `at` (not before now).
    pub fn schedule_at(&mut self, at: VirtualTime, event: E) {
        let at = at.max(self.now);
        self.heap.push(Reverse(Entry {
            at,
            seq: self.next_seq,
            event,
        }));
        self.next_seq += 1;
    }

    /// Schedules `event` after `delay` from now.
    pub fn schedule(&mut self, delay: Duration, event: E) {
        let at = self.now + delay;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.next_seq,
            event,
        }));
        self.next_seq += 1;
    }

    /// The next event and its time; advances the clock to it.
    pub fn pop(&mut self) -> Option<(VirtualTime, E)> {
        let Reverse(e) = self.heap.pop()?;
        self.now = e.at;
        Some((e.at, e.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_time_order_and_ties_in_scheduling_order() {
        let mut q = EventQueue::new();
        q.schedule(Duration::from_secs(2), "c");
        q.schedule(Duration::from_secs(1), "a");
        q.schedule(Duration::from_secs(1), "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(order, ["a", "b", "c"]);
        assert_eq!(q.now(), Duration::from_secs(2));
    }

    #[test]
    fn delays_count_from_the_current_virtual_time() {
        let mut q = EventQueue::new();
        q.schedule(Duration::from_secs(5), 1);
        let (t, _) = q.pop().unwrap();
        q.schedule(Duration::from_secs(1), 2);
        assert_eq!(q.pop().unwrap().0, t + Duration::from_secs(1));
        assert!(q.is_empty());
    }
}
