//! The hub's sans-IO core: decides which records of a relay are new (each
//! `(relay, stream, seq)` is applied once, whatever order and however often
//! it arrives), keeps the fleet view and answers questions about it.
//!
//! Persist, then acknowledge: [`HubCore::take_fresh`] marks records as
//! covered and returns those to store; the driver commits them, then calls
//! [`HubCore::handle_committed`] (which updates the fleet view) and only
//! then acknowledges. If the commit fails it calls [`HubCore::undo`].
//!
//! Time is passed in; the core does no I/O.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use trellis_node::id::{Identity, Role};
use trellis_relay::report::{FleetReport, FleetTotals, SiteRow};
use trellis_relay::summary::{Rollup, SiteKey, SiteStatus, SiteSummary};
use trellis_relay::uplink::{Record, RecordBody};

use crate::store::{StoredRecord, StreamRow};

/// A relay whose uplink has been down this long makes its site unreachable,
/// even before it goes stale (a relay reconnecting at once does not).
pub const DISCONNECT_GRACE: Duration = Duration::from_secs(5);

/// A relay sent something it may not. Nothing was applied; the driver
/// closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("{relay} sent a record before saying hello")]
    NoHello { relay: String },
    #[error("{relay} is not a relay")]
    NotARelay { relay: String },
    #[error("{relay} of site {own} sent a summary for site {claimed}")]
    WrongSite {
        relay: String,
        own: String,
        claimed: String,
    },
    #[error("{relay} sent a record with seq 0 or a gap ending before it starts")]
    BadSeq { relay: String },
}

/// What is applied of one relay's record stream: everything up to
/// `applied`, and the disjoint ranges in `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    pub applied: u64,
    pub above: BTreeMap<u64, u64>,
}

impl Coverage {
    /// Whether every seq in `a..=b` is applied.
    pub fn covers(&self, a: u64, b: u64) -> bool {
        if b <= self.applied {
            return true;
        }
        let a = a.max(self.applied + 1);
        self.above
            .range(..=a)
            .next_back()
            .is_some_and(|(_, &end)| end >= b)
    }

    /// Marks `a..=b` applied.
    pub fn add(&mut self, a: u64, b: u64) {
        if b <= self.applied {
            return;
        }
        let (mut a, mut b) = (a.max(self.applied + 1), b);
        // Merge with every range that overlaps or touches.
        let touching: Vec<(u64, u64)> = self
            .above
            .range(..=b.saturating_add(1))
            .filter(|(_, end)| **end + 1 >= a)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.above.remove(&s);
            a = a.min(s);
            b = b.max(e);
        }
        self.above.insert(a, b);
        while let Some((&s, &e)) = self.above.first_key_value() {
            if s > self.applied + 1 {
                break;
            }
            self.applied = self.applied.max(e);
            self.above.remove(&s);
        }
    }
}

#[derive(Debug, Clone)]
struct Link {
    region: String,
    site: String,
    stream: u64,
    connected: bool,
    since: Instant,
    /// The connection the link is on (the driver's id for it): the end of
    /// an older connection, noticed late, does not disconnect a newer one.
    conn: u64,
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub records_applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

/// Records of one relay taken for storing, and how to take them back.
#[derive(Debug, Clone)]
pub struct Fresh {
    pub relay: Identity,
    pub stream: u64,
    pub records: Vec<Record>,
    /// When the first hub received them, for replicated records (0 for
    /// records straight from the relay: received now).
    pub received_ms: u64,
    before: Coverage,
}

/// What another hub says (in federation gossip) about a site it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub hub: String,
    pub relay: String,
    /// When that hub last heard from the relay (its clock, ms).
    pub heard_ms: u64,
    /// The site's latest counts there, for a site this hub has no summary
    /// of yet.
    pub summary: SiteSummary,
}

pub struct HubCore {
    name: String,
    stale_after: Duration,
    streams: BTreeMap<(String, u64), Coverage>,
    links: BTreeMap<String, Link>,
    rollup: Rollup,
    /// When a record of the site was last received by any hub (wall ms).
    heard_ms: BTreeMap<SiteKey, u64>,
    /// Sites other hubs serve now (alive hubs only).
    remote: BTreeMap<SiteKey, Served>,
    /// The latest counts other hubs gossiped per site, kept after they stop
    /// serving it: the last known state of a site no record of which has
    /// reached this hub yet.
    gossiped: BTreeMap<SiteKey, SiteSummary>,
    stats: HubStats,
}

impl HubCore {
    pub fn new(name: impl Into<String>, stale_after: Duration) -> Self {
        HubCore {
            name: name.into(),
            stale_after,
            streams: BTreeMap::new(),
            links: BTreeMap::new(),
            rollup: Rollup::new(),
            heard_ms: BTreeMap::new(),
            remote: BTreeMap::new(),
            gossiped: BTreeMap::new(),
            stats: HubStats::default(),
        }
    }

    /// Takes back what the store holds after a restart. Sites count as
    /// last heard when their newest summary was made.
    pub fn restore(&mut self, streams: Vec<StreamRow>, summaries: Vec<SiteSummary>) {
        for s in streams {
            self.streams.insert(
                (s.relay, s.stream),
                Coverage {
                    applied: s.applied_through,
                    above: s.above,
                },
            );
        }
        for summary in summaries {
            self.heard_ms.insert(
                (summary.region.clone(), summary.site.clone()),
                summary.generated_ms,
            );
            self.rollup.insert(summary);
        }
    }

    pub fn stats(&self) -> HubStats {
        self.stats
    }

    pub fn rollup(&self) -> &Rollup {
        &self.rollup
    }

    /// How far `relay`'s `stream` is applied.
    pub fn applied(&self, relay: &str, stream: u64) -> u64 {
        self.streams
            .get(&(relay.to_owned(), stream))
            .map_or(0, |c| c.applied)
    }

    /// A relay connected on connection `conn` and announced its record
    /// stream. Returns the last seq of that stream applied without a hole
    /// (0 for a new stream).
    pub fn handle_hello(&mut self, now: Instant, relay: &Identity, stream: u64, conn: u64) -> u64 {
        self.links.insert(
            relay.name.clone(),
            Link {
                region: relay.region.clone(),
                site: relay.site.clone(),
                stream,
                connected: true,
                since: now,
                conn,
            },
        );
        self.streams
            .entry((relay.name.clone(), stream))
            .or_default()
            .applied
    }

    /// The relay's connection `conn` ended. (A relay that reconnected in
    /// the meantime stays connected.)
    pub fn handle_disconnected(&mut self, now: Instant, relay: &Identity, conn: u64) {
        if let Some(l) = self.links.get_mut(&relay.name).filter(|l| l.conn == conn) {
            l.connected = false;
            l.since = now;
        }
    }

    /// Marks the records of `relay` that are new as covered and returns
    /// them for storing; duplicates are left out.
    pub fn take_fresh(
        &mut self,
        relay: &Identity,
        records: Vec<Record>,
    ) -> Result<Fresh, RecordError> {
        let reject = |e: RecordError, stats: &mut HubStats| {
            stats.rejected += 1;
            Err(e)
        };
        if relay.role != Role::Relay {
            return reject(
                RecordError::NotARelay {
                    relay: relay.to_string(),
                },
                &mut self.stats,
            );
        }
        let Some(link) = self.links.get(&relay.name).filter(|l| l.connected) else {
            return reject(
                RecordError::NoHello {
                    relay: relay.name.clone(),
                },
                &mut self.stats,
            );
        };
        let stream = link.stream;
        for r in &records {
            if r.seq == 0 || r.until() < r.seq {
                return reject(
                    RecordError::BadSeq {
                        relay: relay.name.clone(),
                    },
                    &mut self.stats,
                );
            }
            if let RecordBody::Summary(s) = &r.body
                && (s.region != relay.region || s.site != relay.site)
            {
                return reject(
                    RecordError::WrongSite {
                        relay: relay.name.clone(),
                        own: format!("{}/{}", relay.region, relay.site),
                        claimed: format!("{}/{}", s.region, s.site),
                    },
                    &mut self.stats,
                );
            }
        }
        Ok(self.cover(relay.clone(), stream, records))
    }

    /// Marks records another hub stored as covered and returns those that
    /// are new here, grouped per relay stream. Records whose relay name,
    /// region or site is not a valid identity are left out.
    pub fn take_replicated(&mut self, records: Vec<StoredRecord>) -> Vec<Fresh> {
        type Group = (Vec<Record>, u64);
        let mut groups: BTreeMap<(String, u64, String, String), Group> = BTreeMap::new();
        for r in records {
            if r.seq == 0 || r.until < r.seq {
                self.stats.rejected += 1;
                continue;
            }
            let g = groups
                .entry((r.relay, r.stream, r.region, r.site))
                .or_default();
            g.1 = g.1.max(r.received_ms);
            g.0.push(Record {
                seq: r.seq,
                at_ms: r.at_ms,
                body: r.body,
            });
        }
        let mut out = Vec::new();
        for ((relay, stream, region, site), (records, received_ms)) in groups {
            let Ok(id) = Identity::new(Role::Relay, region, site, relay) else {
                self.stats.rejected += records.len() as u64;
                continue;
            };
            let mut fresh = self.cover(id, stream, records);
            fresh.received_ms = received_ms;
            if !fresh.records.is_empty() {
                out.push(fresh);
            }
        }
        out
    }

    fn cover(&mut self, relay: Identity, stream: u64, records: Vec<Record>) -> Fresh {
        let cov = self
            .streams
            .entry((relay.name.clone(), stream))
            .or_default();
        let before = cov.clone();
        let mut fresh = Vec::new();
        for r in records {
            if cov.covers(r.seq, r.until()) {
                self.stats.duplicates += 1;
                continue;
            }
            cov.add(r.seq, r.until());
            fresh.push(r);
        }
        Fresh {
            relay,
            stream,
            records: fresh,
            received_ms: 0,
            before,
        }
    }

    /// The store failed: forget that `fresh` was taken.
    pub fn undo(&mut self, fresh: Fresh) {
        self.streams
            .insert((fresh.relay.name.clone(), fresh.stream), fresh.before);
    }

    /// `fresh` is durable: apply it to the fleet view. `received_ms` is
    /// when the first hub received it (now, for records from a relay).
    pub fn handle_committed(&mut self, received_ms: u64, fresh: &Fresh) {
        let relay = &fresh.relay;
        for r in &fresh.records {
            if let RecordBody::Summary(s) = &r.body {
                let mut s = (**s).clone();
                s.relay = relay.name.clone();
                self.rollup.insert(s);
            }
        }
        self.stats.records_applied += fresh.records.len() as u64;
        let heard = self
            .heard_ms
            .entry((relay.region.clone(), relay.site.clone()))
            .or_default();
        *heard = (*heard).max(received_ms);
    }

    /// What the alive hubs of the federation say they serve now.
    pub fn handle_peers(&mut self, served: Vec<(SiteKey, Served)>) {
        self.remote = served.into_iter().collect();
        for (key, s) in &self.remote {
            let heard = self.heard_ms.entry(key.clone()).or_default();
            *heard = (*heard).max(s.heard_ms);
            let known = self
                .gossiped
                .entry(key.clone())
                .or_insert_with(|| s.summary.clone());
            if s.summary.generated_ms >= known.generated_ms {
                *known = s.summary.clone();
            }
        }
    }

    /// The sites whose relay is connected to this hub now, with what the
    /// federation is told about them.
    pub fn served(&self) -> Vec<(SiteKey, Served)> {
        self.links
            .iter()
            .filter(|(_, l)| l.connected)
            .map(|(relay, l)| {
                let key = (l.region.clone(), l.site.clone());
                let summary = self
                    .rollup
                    .get(&l.region, &l.site)
                    .cloned()
                    .unwrap_or_else(|| SiteSummary::empty(&l.region, &l.site, relay, 0));
                let served = Served {
                    hub: self.name.clone(),
                    relay: relay.clone(),
                    heard_ms: self.heard_ms.get(&key).copied().unwrap_or(0),
                    summary,
                };
                (key, served)
            })
            .collect()
    }

    /// A fingerprint of what this hub holds of the relays' streams; equal
    /// fingerprints mean nothing to exchange.
    pub fn records_digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.streams.hash(&mut h);
        h.finish()
    }

    /// What this hub holds of each relay stream.
    pub fn coverage(&self) -> &BTreeMap<(String, u64), Coverage> {
        &self.streams
    }

    /// The latest summary of every site this hub knows: from its records,
    /// or else from another hub's gossip.
    pub fn summaries(&self) -> Vec<SiteSummary> {
        let mut rollup = self.rollup.clone();
        for s in self.gossiped.values() {
            if rollup.get(&s.region, &s.site).is_none() {
                rollup.insert(s.clone());
            }
        }
        rollup.sites().cloned().collect()
    }

    /// The fleet as this hub knows it, sites in (region, site) order. `now_ms`
    /// is the wall clock, to age what other hubs heard.
    pub fn fleet(&self, now: Instant, now_ms: u64) -> FleetReport {
        let mut rollup = self.rollup.clone();
        // Sites known only from another hub's gossip so far.
        for s in self.gossiped.values() {
            if rollup.get(&s.region, &s.site).is_none() {
                rollup.insert(s.clone());
            }
        }
        let mut sites = Vec::new();
        for s in rollup.sites() {
            let key = (s.region.clone(), s.site.clone());
            let age_ms = self
                .heard_ms
                .get(&key)
                .map_or(u64::MAX, |h| now_ms.saturating_sub(*h));
            let local = self
                .links
                .values()
                .filter(|l| l.region == s.region && l.site == s.site)
                .max_by_key(|l| (l.connected, l.since));
            let (hub, connected) = match (local, self.remote.get(&key)) {
                (Some(l), _) if l.connected => (Some(self.name.clone()), true),
                (_, Some(r)) => (Some(r.hub.clone()), true),
                _ => (None, false),
            };
            // Nobody serves it, and not just for a moment (a relay that
            // reconnects at once does not make its site unreachable).
            let down_long = !connected
                && local.is_none_or(|l| now.saturating_duration_since(l.since) > DISCONNECT_GRACE)
                && age_ms > DISCONNECT_GRACE.as_millis() as u64;
            let status = if age_ms > self.stale_after.as_millis() as u64 || down_long {
                SiteStatus::Unreachable
            } else {
                s.status()
            };
            let mut row = SiteRow::new(s, status, (age_ms / 1000).min(u32::MAX as u64), connected);
            row.hub = hub;
            sites.push(row);
        }
        FleetReport {
            hub: self.name.clone(),
            totals: FleetTotals::of(&sites),
            sites,
            relay: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use trellis_relay::summary::StatusCounts;
    use trellis_relay::uplink::{Event, Gap};

    use super::*;

    fn relay(site: &str) -> Identity {
        Identity::new(Role::Relay, "eu", site, format!("{site}-relay")).unwrap()
    }

    fn summary(site: &str, ms: u64, alive: u32, dead: u32) -> SiteSummary {
        SiteSummary {
            nodes_total: alive + dead,
            nodes_alive: alive,
            nodes_dead: dead,
            by_status: StatusCounts {
                passing: alive,
                ..Default::default()
            },
            ..SiteSummary::empty("eu", site, "whoever", ms)
        }
    }

    fn rec(seq: u64, body: RecordBody) -> Record {
        Record {
            seq,
            at_ms: seq,
            body,
        }
    }

    fn summarised(seq: u64, summary: SiteSummary) -> Record {
        rec(seq, RecordBody::Summary(Box::new(summary)))
    }

    fn died(seq: u64) -> Record {
        rec(
            seq,
            RecordBody::Event(Event::NodeDied { node: "n1".into() }),
        )
    }

    /// The wall clock (ms) at `t0` in these tests.
    const T0_MS: u64 = 1_000_000;

    fn ms(t0: Instant, t: Instant) -> u64 {
        T0_MS + t.duration_since(t0).as_millis() as u64
    }

    fn apply(hub: &mut HubCore, received_ms: u64, r: &Identity, records: Vec<Record>) -> Vec<u64> {
        let fresh = hub.take_fresh(r, records).unwrap();
        hub.handle_committed(received_ms, &fresh);
        fresh.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn a_record_applied_twice_has_effect_once_whatever_the_order() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        assert_eq!(hub.handle_hello(t, &r, 9, 1), 0);
        // The newest first, then the backlog in order, then all again.
        assert_eq!(apply(&mut hub, T0_MS, &r, vec![died(3)]), vec![3]);
        assert_eq!(hub.applied("par-relay", 9), 0, "1 and 2 still missing");
        assert_eq!(
            apply(&mut hub, T0_MS, &r, vec![died(1), died(2), died(3)]),
            vec![1, 2]
        );
        assert_eq!(hub.applied("par-relay", 9), 3);
        assert!(apply(&mut hub, T0_MS, &r, vec![died(1), died(2), died(3)]).is_empty());
        assert_eq!(hub.stats().duplicates, 4);
        // A reconnect with the same stream resumes after what was applied.
        hub.handle_disconnected(t, &r, 1);
        assert_eq!(hub.handle_hello(t, &r, 9, 1), 3);
        // A new stream starts over.
        assert_eq!(hub.handle_hello(t, &r, 10, 1), 0);
    }

    #[test]
    fn an_old_connection_ending_late_does_not_disconnect_a_newer_one() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 9, 1);
        // The relay gave up on connection 1 and came back on 2; the hub
        // notices the end of 1 only later (its silence timeout).
        hub.handle_hello(t + Duration::from_secs(20), &r, 9, 2);
        hub.handle_disconnected(t + Duration::from_secs(40), &r, 1);
        assert_eq!(hub.served().len(), 1, "still served on connection 2");
        assert!(apply(&mut hub, T0_MS, &r, vec![died(1)]) == vec![1]);
        hub.handle_disconnected(t + Duration::from_secs(50), &r, 2);
        assert!(hub.served().is_empty());
    }

    #[test]
    fn a_gap_stands_for_every_seq_it_covers() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1, 1);
        let gap = rec(
            2,
            RecordBody::Gap(Gap {
                until: 6,
                events_dropped: 5,
                ..Gap::default()
            }),
        );
        apply(&mut hub, T0_MS, &r, vec![died(1), gap, died(7)]);
        assert_eq!(hub.applied("par-relay", 1), 7);
    }

    #[test]
    fn a_failed_commit_is_undone() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1, 1);
        let fresh = hub.take_fresh(&r, vec![died(1)]).unwrap();
        hub.undo(fresh);
        assert_eq!(hub.applied("par-relay", 1), 0);
        assert_eq!(
            apply(&mut hub, T0_MS, &r, vec![died(1)]),
            vec![1],
            "taken again"
        );
    }

    #[test]
    fn a_relay_cannot_report_for_another_site() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1, 1);
        let err = hub
            .take_fresh(&r, vec![summarised(1, summary("ber", 1, 1, 0))])
            .unwrap_err();
        assert!(matches!(err, RecordError::WrongSite { .. }));
        assert!(hub.fleet(t, ms(t, t)).sites.is_empty());
        assert_eq!(hub.stats().rejected, 1);
        assert_eq!(hub.applied("par-relay", 1), 0);
    }

    #[test]
    fn records_before_hello_and_seq_zero_are_refused() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        assert!(matches!(
            hub.take_fresh(&r, vec![died(1)]),
            Err(RecordError::NoHello { .. })
        ));
        hub.handle_hello(t, &r, 1, 1);
        assert!(matches!(
            hub.take_fresh(&r, vec![died(0)]),
            Err(RecordError::BadSeq { .. })
        ));
    }

    #[test]
    fn the_fleet_shows_each_site_with_its_age_and_an_unreachable_one_as_one_condition() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        for (i, site) in ["par", "ber"].into_iter().enumerate() {
            let r = relay(site);
            hub.handle_hello(t, &r, 1, 1);
            apply(
                &mut hub,
                T0_MS,
                &r,
                vec![summarised(1, summary(site, 1, 9, i as u32))],
            );
        }
        let f = hub.fleet(
            t + Duration::from_secs(3),
            ms(t, t + Duration::from_secs(3)),
        );
        assert_eq!(f.sites[0].site, "ber", "sorted by region then site");
        assert_eq!(f.sites[0].status, SiteStatus::Degraded);
        assert_eq!(f.sites[0].relay, "ber-relay");
        assert_eq!(f.sites[1].status, SiteStatus::Healthy);
        assert_eq!(f.sites[1].last_seen_s, 3);
        assert_eq!(f.totals.nodes_total, 19);
        // The relay of par drops off: past the grace, par is unreachable
        // with its last-known state; nothing says its nodes died.
        hub.handle_disconnected(t + Duration::from_secs(3), &relay("par"), 1);
        let f = hub.fleet(
            t + Duration::from_secs(4),
            ms(t, t + Duration::from_secs(4)),
        );
        assert_eq!(f.sites[1].status, SiteStatus::Healthy, "within the grace");
        let f = hub.fleet(
            t + Duration::from_secs(10),
            ms(t, t + Duration::from_secs(10)),
        );
        assert_eq!(f.sites[1].status, SiteStatus::Unreachable);
        assert_eq!(f.sites[1].nodes_alive, 9);
        assert_eq!(f.sites[1].nodes_dead, 0);
        assert!(!f.sites[1].connected);
        let later = hub.fleet(
            t + Duration::from_secs(31),
            ms(t, t + Duration::from_secs(31)),
        );
        assert!(
            later
                .sites
                .iter()
                .all(|s| s.status == SiteStatus::Unreachable)
        );
    }

    #[test]
    fn the_newest_summary_wins_even_when_older_ones_arrive_after_it() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1, 1);
        apply(
            &mut hub,
            T0_MS,
            &r,
            vec![summarised(5, summary("par", 500, 4, 1))],
        );
        apply(
            &mut hub,
            T0_MS,
            &r,
            vec![summarised(1, summary("par", 100, 5, 0))],
        );
        assert_eq!(hub.fleet(t, ms(t, t)).sites[0].nodes_dead, 1);
    }

    #[test]
    fn records_from_another_hub_are_taken_once_and_join_the_same_coverage() {
        let t = Instant::now();
        let mut hub = HubCore::new("h2", Duration::from_secs(30));
        let r = relay("par");
        let stored = |seq: u64| crate::store::stored(&r.name, 9, "eu", "par", &died(seq), T0_MS);
        let fresh = hub.take_replicated(vec![stored(1), stored(2)]);
        assert_eq!(fresh.len(), 1);
        for f in &fresh {
            hub.handle_committed(T0_MS, f);
        }
        assert!(
            hub.take_replicated(vec![stored(2)]).is_empty(),
            "a duplicate"
        );
        // The relay fails over to this hub: it resumes after what was
        // replicated, and what it resends is absorbed.
        assert_eq!(hub.handle_hello(t, &r, 9, 1), 2);
        assert_eq!(apply(&mut hub, T0_MS, &r, vec![died(2), died(3)]), vec![3]);
        let bad = crate::store::stored("Not A Name", 9, "eu", "par", &died(1), T0_MS);
        assert!(hub.take_replicated(vec![bad]).is_empty());
    }

    #[test]
    fn a_site_another_hub_serves_is_shown_with_that_hub_and_its_freshness() {
        let t = Instant::now();
        let mut hub = HubCore::new("h1", Duration::from_secs(30));
        let served = Served {
            hub: "h2".into(),
            relay: "ber-relay".into(),
            heard_ms: T0_MS,
            summary: summary("ber", T0_MS, 7, 1),
        };
        hub.handle_peers(vec![(("eu".into(), "ber".into()), served)]);
        let f = hub.fleet(t, T0_MS + 2000);
        assert_eq!(f.sites.len(), 1, "known from gossip before any record");
        let row = &f.sites[0];
        assert_eq!(row.hub.as_deref(), Some("h2"));
        assert!(row.connected);
        assert_eq!(row.last_seen_s, 2);
        assert_eq!((row.nodes_alive, row.nodes_dead), (7, 1));
        assert_eq!(row.status, SiteStatus::Degraded);
        // The serving hub goes away: after the grace the site is unreachable.
        hub.handle_peers(vec![]);
        assert_eq!(
            hub.fleet(t, T0_MS + 10_000).sites[0].status,
            SiteStatus::Unreachable
        );
    }

    #[test]
    fn a_hub_tells_the_federation_which_sites_it_serves() {
        let t = Instant::now();
        let mut hub = HubCore::new("h1", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1, 1);
        apply(
            &mut hub,
            T0_MS,
            &r,
            vec![summarised(1, summary("par", 5, 3, 0))],
        );
        let served = hub.served();
        assert_eq!(served.len(), 1);
        assert_eq!(served[0].1.relay, "par-relay");
        assert_eq!(served[0].1.summary.nodes_alive, 3);
        let d = hub.records_digest();
        apply(&mut hub, T0_MS, &r, vec![died(2)]);
        assert_ne!(
            hub.records_digest(),
            d,
            "the fingerprint follows the coverage"
        );
        hub.handle_disconnected(t, &r, 1);
        assert!(hub.served().is_empty());
    }

    proptest! {
        #[test]
        fn coverage_equals_the_union_of_what_was_added(
            ranges in proptest::collection::vec((1u64..60, 0u64..4), 0..40)
        ) {
            let mut cov = Coverage::default();
            let mut set = std::collections::BTreeSet::new();
            for (a, len) in ranges {
                cov.add(a, a + len);
                set.extend(a..=a + len);
            }
            let mut applied = 0;
            while set.contains(&(applied + 1)) {
                applied += 1;
            }
            prop_assert_eq!(cov.applied, applied);
            for s in 1..70 {
                prop_assert_eq!(cov.covers(s, s), set.contains(&s), "seq {}", s);
            }
            // Ranges stay disjoint and apart.
            let v: Vec<(u64, u64)> = cov.above.iter().map(|(a, b)| (*a, *b)).collect();
            for w in v.windows(2) {
                prop_assert!(w[0].1 + 1 < w[1].0);
            }
        }
    }
}
