//! The relay's sans-IO core: turns site views into records, keeps them until
//! a hub acknowledges them, and says what to send next.
//!
//! Inputs are `handle_*` calls with the time passed in; outputs are
//! [`RelayCore::poll_transmit`] (the next record to send) and
//! [`RelayCore::poll_timeout`] (when to call back). The driver owns the
//! sockets; the core never blocks and never reads a clock.
//!
//! Records wait in the outbox until a hub acknowledges them. On reconnect the
//! hub says what it has (`Welcome { acked }`) and sending resumes after that.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use trellis_node::site::{SiteView, Status};

use crate::summarise::{is_node, summarise};
use crate::summary::SiteSummary;
use crate::uplink::{Event, Record, RecordBody};

/// Tuning of the core, from the relay's configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Longest time between two summaries when nothing changes.
    pub summary_interval: Duration,
    /// Records kept for the hub before the oldest are dropped.
    pub max_outbox: usize,
    /// A hub that leaves sent records unacknowledged this long is presumed
    /// gone; the driver reconnects.
    pub ack_timeout: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            summary_interval: Duration::from_secs(5),
            max_outbox: 10_000,
            ack_timeout: Duration::from_secs(15),
        }
    }
}

/// The hub broke the protocol. The driver drops the connection; the core's
/// state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("hub acknowledged seq {through}, but only {sent} was sent")]
    Unsent { through: u64, sent: u64 },
    #[error("hub acknowledgement went back from {acked} to {through}")]
    Backwards { through: u64, acked: u64 },
}

#[derive(Debug, Clone, PartialEq)]
struct NodeState {
    alive: bool,
    checks: BTreeMap<String, Status>,
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub records_made: u64,
    pub records_dropped: u64,
    pub acked_through: u64,
    pub outbox_len: usize,
}

pub struct RelayCore {
    relay: String,
    cfg: CoreConfig,
    stream: u64,
    next_seq: u64,
    outbox: VecDeque<Record>,
    /// Highest seq handed to the connection, if connected.
    sent_through: Option<u64>,
    acked_through: u64,
    /// When the oldest unacknowledged send happened.
    waiting_since: Option<Instant>,
    last_summary: Option<(Instant, SiteSummary)>,
    nodes: Option<BTreeMap<String, NodeState>>,
    stats: CoreStats,
}

impl RelayCore {
    /// A core for relay `relay` writing record stream `stream`.
    pub fn new(relay: impl Into<String>, stream: u64, cfg: CoreConfig) -> Self {
        RelayCore {
            relay: relay.into(),
            cfg,
            stream,
            next_seq: 1,
            outbox: VecDeque::new(),
            sent_through: None,
            acked_through: 0,
            waiting_since: None,
            last_summary: None,
            nodes: None,
            stats: CoreStats::default(),
        }
    }

    pub fn stream(&self) -> u64 {
        self.stream
    }

    pub fn stats(&self) -> CoreStats {
        CoreStats {
            acked_through: self.acked_through,
            outbox_len: self.outbox.len(),
            ..self.stats
        }
    }

    /// The latest summary made, if any.
    pub fn last_summary(&self) -> Option<&SiteSummary> {
        self.last_summary.as_ref().map(|(_, s)| s)
    }

    fn push(&mut self, at_ms: u64, body: RecordBody) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.records_made += 1;
        self.outbox.push_back(Record { seq, at_ms, body });
        while self.outbox.len() > self.cfg.max_outbox {
            self.outbox.pop_front();
            self.stats.records_dropped += 1;
        }
    }

    /// Takes a fresh look at the site: records events for what changed and
    /// a summary if the site's state changed or one is due.
    pub fn handle_view(&mut self, now: Instant, wall_ms: u64, view: &SiteView) {
        let current: BTreeMap<String, NodeState> = view
            .current_members()
            .into_iter()
            .filter(|m| is_node(m, &self.relay))
            .map(|m| {
                let checks = m
                    .health
                    .checks
                    .iter()
                    .map(|(n, r)| (n.clone(), r.status))
                    .collect();
                (
                    m.name.clone(),
                    NodeState {
                        alive: m.alive,
                        checks,
                    },
                )
            })
            .collect();
        // The first look only sets the baseline: a relay (re)starting does
        // not report the whole site as news.
        if let Some(prev) = self.nodes.take() {
            for event in diff(&prev, &current, view) {
                self.push(wall_ms, RecordBody::Event(event));
            }
        }
        self.nodes = Some(current);

        let summary = summarise(view, &self.relay, wall_ms);
        let due = match &self.last_summary {
            None => true,
            Some((at, last)) => {
                !last.same_state(&summary) || now.duration_since(*at) >= self.cfg.summary_interval
            }
        };
        if due {
            self.push(wall_ms, RecordBody::Summary(Box::new(summary.clone())));
            self.last_summary = Some((now, summary));
        }
    }

    /// A connection to a hub is up and the hub has applied up to `acked`.
    pub fn handle_connected(&mut self, acked: u64) {
        self.ack_to(acked.min(self.next_seq - 1));
        self.sent_through = Some(self.acked_through);
        self.waiting_since = None;
    }

    /// The connection is gone; records not acknowledged will be resent.
    pub fn handle_disconnected(&mut self) {
        self.sent_through = None;
        self.waiting_since = None;
    }

    /// The hub applied every record up to `through`.
    pub fn handle_ack(&mut self, now: Instant, through: u64) -> Result<(), AckError> {
        let sent = self.sent_through.unwrap_or(self.acked_through);
        if through > sent {
            return Err(AckError::Unsent { through, sent });
        }
        if through < self.acked_through {
            return Err(AckError::Backwards {
                through,
                acked: self.acked_through,
            });
        }
        self.ack_to(through);
        self.waiting_since = (self.acked_through < sent).then_some(now);
        Ok(())
    }

    fn ack_to(&mut self, through: u64) {
        self.acked_through = self.acked_through.max(through);
        while self
            .outbox
            .front()
            .is_some_and(|r| r.seq <= self.acked_through)
        {
            self.outbox.pop_front();
        }
    }

    /// The next record to send on the current connection, if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Record> {
        let sent = self.sent_through?;
        let next = self.outbox.iter().find(|r| r.seq > sent)?.clone();
        self.sent_through = Some(next.seq);
        self.waiting_since.get_or_insert(now);
        Some(next)
    }

    /// Whether the hub has left records unacknowledged for too long.
    pub fn ack_overdue(&self, now: Instant) -> bool {
        self.waiting_since
            .is_some_and(|t| now.duration_since(t) >= self.cfg.ack_timeout)
    }

    /// When the core next needs `handle_view` or an overdue check.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let summary = self
            .last_summary
            .as_ref()
            .map(|(at, _)| *at + self.cfg.summary_interval);
        let ack = self.waiting_since.map(|t| t + self.cfg.ack_timeout);
        [summary, ack].into_iter().flatten().min()
    }
}

fn diff(
    prev: &BTreeMap<String, NodeState>,
    cur: &BTreeMap<String, NodeState>,
    view: &SiteView,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (name, now) in cur {
        let node = name.clone();
        match prev.get(name) {
            None if now.alive => events.push(Event::NodeJoined { node }),
            None => {}
            Some(before) => {
                match (before.alive, now.alive) {
                    (true, false) => events.push(Event::NodeDied { node: node.clone() }),
                    (false, true) => events.push(Event::NodeRecovered { node: node.clone() }),
                    _ => {}
                }
                if now.alive {
                    for (check, &to) in &now.checks {
                        let from = before.checks.get(check).copied().unwrap_or(Status::Unknown);
                        if from != to {
                            events.push(Event::CheckChanged {
                                node: node.clone(),
                                check: check.clone(),
                                from,
                                to,
                                detail: detail_of(view, name, check),
                            });
                        }
                    }
                }
            }
        }
    }
    for (name, before) in prev {
        if before.alive && !cur.contains_key(name) {
            events.push(Event::NodeDied { node: name.clone() });
        }
    }
    events
}

fn detail_of(view: &SiteView, node: &str, check: &str) -> String {
    view.current_members()
        .into_iter()
        .find(|m| m.name == node)
        .and_then(|m| m.health.checks.get(check))
        .map(|r| r.detail.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_node::id::Role;
    use trellis_node::site::{CheckResult, Health, MemberView};

    use super::*;

    fn member(name: &str, alive: bool, check: Status) -> MemberView {
        let mut checks = BTreeMap::new();
        checks.insert("web".to_owned(), CheckResult::new(check, "x"));
        MemberView {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            alive,
            health: Health {
                role: Some(Role::Node),
                status: check,
                checks,
                ..Health::default()
            },
        }
    }

    fn view(members: Vec<MemberView>) -> SiteView {
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    fn bodies(core: &mut RelayCore, now: Instant) -> Vec<RecordBody> {
        std::iter::from_fn(|| core.poll_transmit(now))
            .map(|r| r.body)
            .collect()
    }

    #[test]
    fn nothing_is_sent_until_a_hub_is_connected() {
        let t0 = Instant::now();
        let mut core = RelayCore::new("relay", 7, CoreConfig::default());
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        assert!(core.poll_transmit(t0).is_none());
        core.handle_connected(0);
        let sent = bodies(&mut core, t0);
        assert_eq!(sent.len(), 1);
        assert!(matches!(sent[0], RecordBody::Summary(_)));
    }

    #[test]
    fn a_death_is_an_event_and_an_immediate_summary() {
        let t0 = Instant::now();
        let mut core = RelayCore::new("relay", 7, CoreConfig::default());
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        let _ = bodies(&mut core, t0);
        let t1 = t0 + Duration::from_millis(500);
        core.handle_view(t1, 2, &view(vec![member("a", false, Status::Passing)]));
        let sent = bodies(&mut core, t1);
        assert_eq!(
            sent[0],
            RecordBody::Event(Event::NodeDied { node: "a".into() })
        );
        match &sent[1] {
            RecordBody::Summary(s) => assert_eq!(s.nodes_dead, 1),
            other => panic!("expected a summary, got {other:?}"),
        }
    }

    #[test]
    fn an_unchanged_site_is_summarised_once_per_interval() {
        let t0 = Instant::now();
        let cfg = CoreConfig::default();
        let interval = cfg.summary_interval;
        let mut core = RelayCore::new("relay", 7, cfg);
        core.handle_connected(0);
        let v = view(vec![member("a", true, Status::Passing)]);
        core.handle_view(t0, 1, &v);
        core.handle_view(t0 + interval / 2, 2, &v);
        assert_eq!(bodies(&mut core, t0).len(), 1);
        assert_eq!(core.poll_timeout(), Some(t0 + interval));
        core.handle_view(t0 + interval, 3, &v);
        assert_eq!(bodies(&mut core, t0 + interval).len(), 1);
    }

    #[test]
    fn check_changes_become_events_with_their_detail() {
        let t0 = Instant::now();
        let mut core = RelayCore::new("relay", 7, CoreConfig::default());
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        core.handle_view(t0, 2, &view(vec![member("a", true, Status::Critical)]));
        let sent = bodies(&mut core, t0);
        assert!(sent.contains(&RecordBody::Event(Event::CheckChanged {
            node: "a".into(),
            check: "web".into(),
            from: Status::Passing,
            to: Status::Critical,
            detail: "x".into(),
        })));
    }

    #[test]
    fn unacknowledged_records_are_resent_after_a_reconnect() {
        let t0 = Instant::now();
        let mut core = RelayCore::new("relay", 7, CoreConfig::default());
        core.handle_connected(0);
        for i in 0..3 {
            let alive = i % 2 == 0;
            core.handle_view(t0, i, &view(vec![member("a", alive, Status::Passing)]));
        }
        let first: Vec<u64> = std::iter::from_fn(|| core.poll_transmit(t0))
            .map(|r| r.seq)
            .collect();
        assert_eq!(first, vec![1, 2, 3, 4, 5]);
        core.handle_ack(t0, 2).unwrap();
        core.handle_disconnected();
        assert!(core.poll_transmit(t0).is_none());
        // The next hub has applied up to 3 (a previous hub told it).
        core.handle_connected(3);
        let again: Vec<u64> = std::iter::from_fn(|| core.poll_transmit(t0))
            .map(|r| r.seq)
            .collect();
        assert_eq!(again, vec![4, 5]);
    }

    #[test]
    fn acks_for_unsent_or_earlier_records_are_refused_without_effect() {
        let t0 = Instant::now();
        let mut core = RelayCore::new("relay", 7, CoreConfig::default());
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        core.handle_view(t0, 1, &view(vec![member("a", false, Status::Passing)]));
        let _ = core.poll_transmit(t0);
        assert_eq!(
            core.handle_ack(t0, 5),
            Err(AckError::Unsent {
                through: 5,
                sent: 1
            })
        );
        core.handle_ack(t0, 1).unwrap();
        assert_eq!(
            core.handle_ack(t0, 0),
            Err(AckError::Backwards {
                through: 0,
                acked: 1
            })
        );
        assert_eq!(core.stats().acked_through, 1);
    }

    #[test]
    fn a_silent_hub_is_noticed_after_the_ack_timeout() {
        let t0 = Instant::now();
        let cfg = CoreConfig::default();
        let timeout = cfg.ack_timeout;
        let mut core = RelayCore::new("relay", 7, cfg);
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        let _ = core.poll_transmit(t0);
        assert!(!core.ack_overdue(t0 + timeout / 2));
        assert!(core.ack_overdue(t0 + timeout));
        core.handle_ack(t0 + timeout / 2, 1).unwrap();
        assert!(!core.ack_overdue(t0 + timeout * 3));
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_records() {
        let t0 = Instant::now();
        let cfg = CoreConfig {
            max_outbox: 3,
            ..CoreConfig::default()
        };
        let mut core = RelayCore::new("relay", 7, cfg);
        for i in 0..10 {
            core.handle_view(t0, i, &view(vec![member("a", i % 2 == 0, Status::Passing)]));
        }
        let s = core.stats();
        assert_eq!(s.outbox_len, 3);
        assert_eq!(s.records_dropped, s.records_made - 3);
        core.handle_connected(0);
        let seqs: Vec<u64> = std::iter::from_fn(|| core.poll_transmit(t0))
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs.len(), 3);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    }
}
