//! The hub's sans-IO core: applies what relays send, at most once per
//! `(relay, stream, seq)`, and answers questions about the fleet.
//!
//! Time is passed in. The driver owns connections, the API and (later) the
//! disk; it acks a record only after [`HubCore::handle_record`] returned.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trellis_node::id::{Identity, Role};
use trellis_relay::summary::{Rollup, SiteKey, SiteStatus, SiteSummary, StatusCounts};
use trellis_relay::uplink::{Event, Record, RecordBody};

/// Events kept for `GET /api/v1/events`.
pub const MAX_EVENTS: usize = 1000;

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
}

#[derive(Debug, Clone)]
struct RelayState {
    stream: u64,
    applied_through: u64,
    connected: bool,
}

#[derive(Debug, Clone)]
struct Heard {
    relay: String,
    at: Instant,
}

/// An event as stored by the hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub region: String,
    pub site: String,
    pub relay: String,
    pub seq: u64,
    /// The relay's wall clock when it happened (ms since epoch).
    pub at_ms: u64,
    pub kind: String,
    pub event: Event,
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    pub records_applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

/// One site in the fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRow {
    pub site: String,
    pub region: String,
    pub relay: String,
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    pub status: SiteStatus,
    /// Seconds since the hub last heard from the site's relay.
    pub last_seen_s: u64,
    /// Whether the relay's uplink is connected to this hub now.
    pub connected: bool,
    pub by_status: StatusCounts,
    pub dead: Vec<String>,
    pub failing_checks: BTreeMap<String, trellis_relay::summary::CheckCounts>,
}

/// Sums over the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetTotals {
    pub sites: u32,
    pub sites_by_status: BTreeMap<SiteStatus, u32>,
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    pub by_status: StatusCounts,
}

/// `GET /api/v1/fleet`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    pub hub: String,
    pub sites: Vec<SiteRow>,
    pub totals: FleetTotals,
}

pub struct HubCore {
    name: String,
    stale_after: Duration,
    relays: BTreeMap<String, RelayState>,
    rollup: Rollup,
    heard: BTreeMap<SiteKey, Heard>,
    events: VecDeque<StoredEvent>,
    stats: HubStats,
}

impl HubCore {
    pub fn new(name: impl Into<String>, stale_after: Duration) -> Self {
        HubCore {
            name: name.into(),
            stale_after,
            relays: BTreeMap::new(),
            rollup: Rollup::new(),
            heard: BTreeMap::new(),
            events: VecDeque::new(),
            stats: HubStats::default(),
        }
    }

    pub fn stats(&self) -> HubStats {
        self.stats
    }

    pub fn rollup(&self) -> &Rollup {
        &self.rollup
    }

    /// A relay connected and announced its record stream. Returns the last
    /// seq of that stream already applied (0 for a stream never seen).
    pub fn handle_hello(&mut self, now: Instant, relay: &Identity, stream: u64) -> u64 {
        let state = self.relays.entry(relay.name.clone()).or_insert(RelayState {
            stream,
            applied_through: 0,
            connected: true,
        });
        if state.stream != stream {
            // The relay lost its buffer (or is new): its old stream is done.
            state.stream = stream;
            state.applied_through = 0;
        }
        state.connected = true;
        let applied = state.applied_through;
        self.touch(now, relay);
        applied
    }

    /// The relay's connection ended.
    pub fn handle_disconnected(&mut self, relay: &Identity) {
        if let Some(s) = self.relays.get_mut(&relay.name) {
            s.connected = false;
        }
    }

    /// Applies a record unless it was applied before. Returns the seq to
    /// acknowledge (everything up to it is applied).
    pub fn handle_record(
        &mut self,
        now: Instant,
        relay: &Identity,
        record: Record,
    ) -> Result<u64, RecordError> {
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
        let Some(state) = self.relays.get(&relay.name) else {
            return reject(
                RecordError::NoHello {
                    relay: relay.name.clone(),
                },
                &mut self.stats,
            );
        };
        if record.seq <= state.applied_through {
            self.stats.duplicates += 1;
            return Ok(state.applied_through);
        }
        match record.body {
            RecordBody::Summary(mut summary) => {
                if summary.region != relay.region || summary.site != relay.site {
                    return reject(
                        RecordError::WrongSite {
                            relay: relay.name.clone(),
                            own: format!("{}/{}", relay.region, relay.site),
                            claimed: format!("{}/{}", summary.region, summary.site),
                        },
                        &mut self.stats,
                    );
                }
                summary.relay = relay.name.clone();
                self.apply_summary(*summary);
            }
            RecordBody::Event(event) => {
                self.events.push_back(StoredEvent {
                    region: relay.region.clone(),
                    site: relay.site.clone(),
                    relay: relay.name.clone(),
                    seq: record.seq,
                    at_ms: record.at_ms,
                    kind: event.kind().to_owned(),
                    event,
                });
                while self.events.len() > MAX_EVENTS {
                    self.events.pop_front();
                }
            }
        }
        let state = self.relays.get_mut(&relay.name).expect("checked above");
        state.applied_through = record.seq;
        self.stats.records_applied += 1;
        self.touch(now, relay);
        Ok(record.seq)
    }

    fn apply_summary(&mut self, summary: SiteSummary) {
        // Records of one relay arrive in seq order, which is authoritative
        // even if the relay's clock stepped back; across relays (and hubs)
        // the later summary wins.
        let same_relay_older = self
            .rollup
            .get(&summary.region, &summary.site)
            .is_some_and(|cur| {
                cur.relay == summary.relay && cur.generated_ms > summary.generated_ms
            });
        if same_relay_older {
            self.rollup.replace(summary);
        } else {
            self.rollup.insert(summary);
        }
    }

    fn touch(&mut self, now: Instant, relay: &Identity) {
        self.heard.insert(
            (relay.region.clone(), relay.site.clone()),
            Heard {
                relay: relay.name.clone(),
                at: now,
            },
        );
    }

    /// The fleet as this hub knows it, sites in (region, site) order.
    pub fn fleet(&self, now: Instant) -> FleetReport {
        let mut sites = Vec::new();
        let mut totals = FleetTotals::default();
        for s in self.rollup.sites() {
            let heard = self.heard.get(&(s.region.clone(), s.site.clone()));
            let age = heard.map_or(Duration::MAX, |h| now.saturating_duration_since(h.at));
            let connected = heard
                .and_then(|h| self.relays.get(&h.relay))
                .is_some_and(|r| r.connected);
            let status = if age > self.stale_after {
                SiteStatus::Stale
            } else {
                s.status()
            };
            totals.sites += 1;
            *totals.sites_by_status.entry(status).or_default() += 1;
            totals.nodes_total += s.nodes_total;
            totals.nodes_alive += s.nodes_alive;
            totals.nodes_dead += s.nodes_dead;
            totals.by_status.sum(&s.by_status);
            sites.push(SiteRow {
                site: s.site.clone(),
                region: s.region.clone(),
                relay: s.relay.clone(),
                nodes_total: s.nodes_total,
                nodes_alive: s.nodes_alive,
                nodes_dead: s.nodes_dead,
                status,
                last_seen_s: age.as_secs(),
                connected,
                by_status: s.by_status,
                dead: s.dead.clone(),
                failing_checks: s.failing_checks.clone(),
            });
        }
        FleetReport {
            hub: self.name.clone(),
            sites,
            totals,
        }
    }

    /// The most recent events, newest last.
    pub fn events(&self, limit: usize) -> Vec<StoredEvent> {
        let skip = self.events.len().saturating_sub(limit);
        self.events.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn a_record_applied_twice_has_effect_once() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        assert_eq!(hub.handle_hello(t, &r, 9), 0);
        let died = RecordBody::Event(Event::NodeDied { node: "n1".into() });
        assert_eq!(hub.handle_record(t, &r, rec(1, died.clone())), Ok(1));
        assert_eq!(hub.handle_record(t, &r, rec(1, died)), Ok(1));
        assert_eq!(hub.events(10).len(), 1);
        assert_eq!(hub.stats().duplicates, 1);
        // A reconnect with the same stream resumes after what was applied.
        hub.handle_disconnected(&r);
        assert_eq!(hub.handle_hello(t, &r, 9), 1);
        // A new stream starts over.
        assert_eq!(hub.handle_hello(t, &r, 10), 0);
    }

    #[test]
    fn a_relay_cannot_report_for_another_site() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1);
        let err = hub
            .handle_record(
                t,
                &r,
                rec(1, RecordBody::Summary(Box::new(summary("ber", 1, 1, 0)))),
            )
            .unwrap_err();
        assert!(matches!(err, RecordError::WrongSite { .. }));
        assert!(hub.fleet(t).sites.is_empty());
        assert_eq!(hub.stats().rejected, 1);
    }

    #[test]
    fn records_before_hello_are_refused() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let err = hub
            .handle_record(
                t,
                &relay("par"),
                rec(1, RecordBody::Summary(Box::new(summary("par", 1, 1, 0)))),
            )
            .unwrap_err();
        assert!(matches!(err, RecordError::NoHello { .. }));
    }

    #[test]
    fn the_fleet_shows_each_site_with_its_age_and_goes_stale() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        for (i, site) in ["par", "ber"].into_iter().enumerate() {
            let r = relay(site);
            hub.handle_hello(t, &r, 1);
            hub.handle_record(
                t,
                &r,
                rec(
                    1,
                    RecordBody::Summary(Box::new(summary(site, 1, 9, i as u32))),
                ),
            )
            .unwrap();
        }
        let f = hub.fleet(t + Duration::from_secs(3));
        assert_eq!(f.sites.len(), 2);
        assert_eq!(f.sites[0].site, "ber", "sorted by region then site");
        assert_eq!(f.sites[0].status, SiteStatus::Degraded);
        assert_eq!(f.sites[0].relay, "ber-relay");
        assert_eq!(f.sites[1].status, SiteStatus::Healthy);
        assert_eq!(f.sites[1].last_seen_s, 3);
        assert_eq!(f.totals.nodes_total, 19);
        assert_eq!(f.totals.nodes_dead, 1);
        let later = hub.fleet(t + Duration::from_secs(31));
        assert!(later.sites.iter().all(|s| s.status == SiteStatus::Stale));
    }

    #[test]
    fn a_relay_whose_clock_stepped_back_still_updates_its_site() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1);
        hub.handle_record(
            t,
            &r,
            rec(1, RecordBody::Summary(Box::new(summary("par", 1000, 5, 0)))),
        )
        .unwrap();
        hub.handle_record(
            t,
            &r,
            rec(2, RecordBody::Summary(Box::new(summary("par", 10, 4, 1)))),
        )
        .unwrap();
        assert_eq!(hub.fleet(t).sites[0].nodes_dead, 1);
    }

    #[test]
    fn only_the_latest_events_are_kept() {
        let t = Instant::now();
        let mut hub = HubCore::new("h", Duration::from_secs(30));
        let r = relay("par");
        hub.handle_hello(t, &r, 1);
        for seq in 1..=(MAX_EVENTS as u64 + 5) {
            let e = RecordBody::Event(Event::NodeJoined {
                node: format!("n{seq}"),
            });
            hub.handle_record(t, &r, rec(seq, e)).unwrap();
        }
        let ev = hub.events(usize::MAX);
        assert_eq!(ev.len(), MAX_EVENTS);
        assert_eq!(ev.last().unwrap().seq, MAX_EVENTS as u64 + 5);
        assert_eq!(hub.events(2).len(), 2);
    }
}
