//! The relay's sans-IO core: turns site views into records, decides what
//! to send on a hub connection and when, and what may be deleted.
//!
//! Inputs are `handle_*` calls with the time passed in; outputs are
//! [`RelayCore::poll_persist`] (records to make durable),
//! [`RelayCore::poll_transmit`] (what to send next) and
//! [`RelayCore::poll_timeout`] (when to call back). The driver owns the
//! sockets and the outage buffer; the core never blocks, never reads a
//! clock and never touches the disk.
//!
//! Persist, then send: a record is sent only after the buffer reported it
//! durable ([`RelayCore::handle_persisted`]). On a connection, records
//! go out on two lanes. The *live* lane carries the newest summary first
//! (so the hub is current at once) and then every record persisted while
//! connected. The *backlog* lane carries, in order, whatever the hub had not
//! acknowledged when the connection came up; the driver reads it from the
//! buffer in chunks at a limited rate. The hub applies each sequence number
//! once whichever lane brings it, and acknowledges cumulatively.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use trellis_node::distribute::{ConfigResult, DriftNote};
use trellis_node::foresight;
use trellis_node::patchstate::NodePatch;
use trellis_node::site::{CheckResult, SiteView, Status};

use crate::buffer::NewRecord;
use crate::outliers::{Outliers, OutliersConfig};
use crate::rollout::{SiteOrder, SiteRollout};
use crate::summarise::{is_node, summarise};
use crate::summary::SiteSummary;
use crate::uplink::{Event, Gap, Record, RecordBody};

/// Tuning of the core, from the relay's configuration.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Longest time between two summaries when nothing changes.
    pub summary_interval: Duration,
    /// A hub that sends no acknowledgement this long while records are
    /// outstanding is presumed gone; the driver reconnects.
    pub ack_timeout: Duration,
    /// A node dead this long is reaped: reported once
    /// ([`Event::NodeReaped`]) and no longer counted (`retention.dead_node`).
    pub reap_dead_after: Duration,
    /// Peer outliers (`[outliers]`), reported as `outlier:METRIC` checks.
    pub outliers: OutliersConfig,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            summary_interval: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(15),
            reap_dead_after: Duration::from_secs(3 * 86400),
            outliers: OutliersConfig::default(),
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
    #[error("acknowledgement without a connection")]
    NotConnected,
}

/// What to send next on the current connection.
#[derive(Debug, Clone, PartialEq)]
pub enum Transmit {
    /// Send this record now.
    Record(Record),
    /// Read the buffer's records after `after` (up to `through`) and send
    /// them, then report with [`RelayCore::handle_backlog_sent`].
    Backlog { after: u64, through: u64 },
}

#[derive(Debug, Clone, PartialEq)]
struct NodeState {
    alive: bool,
    checks: BTreeMap<String, Status>,
    /// Its findings (anomalies, forecasts, outliers) as last reported: a
    /// finding whose score rises by a quarter is reported again with its
    /// status unchanged, so the hub ranks it by how unusual it got.
    findings: BTreeMap<String, CheckResult>,
    /// Its last configuration attempt.
    result: Option<ConfigResult>,
    /// Its last drift of each file, by path.
    drift: BTreeMap<String, DriftNote>,
    /// Its last patch state.
    patch: Option<NodePatch>,
}

#[derive(Debug)]
struct Conn {
    /// Records from this seq on were persisted while connected: live lane.
    live_from: u64,
    first: Option<Record>,
    live: VecDeque<Record>,
    /// Highest backlog seq sent.
    backlog_sent: u64,
    backlog_end: u64,
    backlog_reading: bool,
    /// Highest seq sent on either lane.
    sent_max: u64,
    /// Since when records have been outstanding without any acknowledgement.
    waiting_since: Option<Instant>,
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreStats {
    pub records_made: u64,
    pub persisted_through: u64,
    pub acked_through: u64,
    pub connected: bool,
    /// Backlog records still to send on this connection (by seq span).
    pub backlog_left: u64,
}

pub struct RelayCore {
    relay: String,
    cfg: CoreConfig,
    to_persist: Vec<NewRecord>,
    persisted: u64,
    /// What the current (or last) hub acknowledged.
    acked: u64,
    /// Records up to here are no longer in the buffer.
    deleted: u64,
    latest_summary: Option<Record>,
    conn: Option<Conn>,
    last_summary: Option<(Instant, SiteSummary)>,
    nodes: Option<BTreeMap<String, NodeState>>,
    seen_alive: BTreeSet<(String, u64)>,
    records_made: u64,
    /// The patch rollout the site takes part in.
    rollout: Option<SiteRollout>,
    /// Whether `rollout` changed since the driver last took it.
    rollout_changed: bool,
    /// Decommissioned members ([`RelayCore::set_departed`]): left out of
    /// every view.
    departed: BTreeSet<String>,
    /// Since when (wall ms) each dead node, by name and generation, has
    /// been seen dead.
    dead_since: BTreeMap<(String, u64), u64>,
    /// Reaped nodes and the generation that was reaped.
    reaped: BTreeMap<String, u64>,
    reaped_changed: bool,
    hidden: BTreeSet<String>,
    /// Peer outliers, added to the nodes' checks at each look.
    outliers: Outliers,
}

/// How long a new member may take to be seen alive before it counts as
/// dead.
pub const JOIN_GRACE: Duration = Duration::from_secs(30);

impl RelayCore {
    /// A core for relay `relay` whose buffer holds the records after
    /// `deleted` up to `persisted`, the newest summary among them being
    /// `latest_summary`.
    pub fn new(
        relay: impl Into<String>,
        cfg: CoreConfig,
        deleted: u64,
        persisted: u64,
        latest_summary: Option<Record>,
    ) -> Self {
        RelayCore {
            relay: relay.into(),
            outliers: Outliers::new(cfg.outliers.clone()),
            cfg,
            to_persist: Vec::new(),
            persisted,
            acked: deleted,
            deleted,
            latest_summary,
            conn: None,
            last_summary: None,
            nodes: None,
            seen_alive: BTreeSet::new(),
            records_made: 0,
            rollout: None,
            rollout_changed: false,
            departed: BTreeSet::new(),
            dead_since: BTreeMap::new(),
            reaped: BTreeMap::new(),
            reaped_changed: false,
            hidden: BTreeSet::new(),
        }
    }

    /// The members decommissioned (by name): from the next look on they
    /// are left out of the site's views, with one [`Event::NodeLeft`] each
    /// for a node that was counted.
    pub fn set_departed(&mut self, names: BTreeSet<String>) {
        self.departed = names;
    }

    /// Takes back the reaped nodes the relay kept on disk (name →
    /// generation), so that a restart neither counts them again nor
    /// reports them twice.
    pub fn restore_reaped(&mut self, reaped: BTreeMap<String, u64>) {
        self.reaped = reaped;
    }

    /// The reaped nodes, if they changed since the last call: the driver
    /// keeps them on disk.
    pub fn take_reaped_change(&mut self) -> Option<BTreeMap<String, u64>> {
        std::mem::take(&mut self.reaped_changed).then(|| self.reaped.clone())
    }

    /// The reaped nodes could not be kept: hand them out again at the
    /// next [`RelayCore::take_reaped_change`].
    pub fn restore_reaped_unsaved(&mut self) {
        self.reaped_changed = true;
    }

    /// The members left out of the last view: decommissioned, or reaped
    /// and not back since. The relay's own API leaves them out too.
    pub fn hidden(&self) -> &BTreeSet<String> {
        &self.hidden
    }

    /// The view without decommissioned and reaped members. Reaps nodes
    /// dead for [`CoreConfig::reap_dead_after`] (one event each), and
    /// forgets a reaped node that came back.
    fn without_gone(&mut self, wall_ms: u64, view: &SiteView) -> SiteView {
        let reap_after = self.cfg.reap_dead_after.as_millis() as u64;
        let mut hidden = BTreeSet::new();
        let mut dead = BTreeSet::new();
        for m in view.current_members() {
            if !is_node(m, &self.relay) {
                continue;
            }
            if self.departed.contains(&m.name) {
                hidden.insert(m.name.clone());
                continue;
            }
            if m.alive {
                if self.reaped.remove(&m.name).is_some() {
                    self.reaped_changed = true;
                }
                continue;
            }
            if self.reaped.get(&m.name).is_some_and(|g| *g >= m.generation) {
                hidden.insert(m.name.clone());
                continue;
            }
            let key = (m.name.clone(), m.generation);
            let since = *self.dead_since.entry(key.clone()).or_insert(wall_ms);
            dead.insert(key);
            let dead_for = wall_ms.saturating_sub(since);
            if dead_for >= reap_after {
                self.reaped.insert(m.name.clone(), m.generation);
                self.reaped_changed = true;
                hidden.insert(m.name.clone());
                self.push(
                    wall_ms,
                    RecordBody::Event(Event::NodeReaped {
                        node: m.name.clone(),
                        dead_for_s: dead_for / 1000,
                    }),
                );
            }
        }
        self.dead_since.retain(|k, _| dead.contains(k));
        let out = SiteView {
            region: view.region.clone(),
            site: view.site.clone(),
            // Every generation of a hidden member goes: an older one must
            // not stand in for it.
            members: view
                .members
                .iter()
                .filter(|m| !hidden.contains(&m.name))
                .cloned()
                .collect(),
        };
        self.hidden = hidden;
        out
    }

    pub fn stats(&self) -> CoreStats {
        CoreStats {
            records_made: self.records_made,
            persisted_through: self.persisted,
            acked_through: self.acked,
            connected: self.conn.is_some(),
            backlog_left: self
                .conn
                .as_ref()
                .map_or(0, |c| c.backlog_end - c.backlog_sent),
        }
    }

    /// Takes back the rollout the relay kept on disk.
    pub fn restore_rollout(&mut self, rollout: Option<SiteRollout>) {
        self.rollout = rollout;
    }

    /// Takes a hub's order for the site (see [`SiteRollout::take`]);
    /// returns whether the rollout changed (then the driver keeps it and
    /// tells the nodes).
    pub fn handle_order(&mut self, order: SiteOrder) -> bool {
        let changed = SiteRollout::take(&mut self.rollout, order);
        self.rollout_changed |= changed;
        changed
    }

    pub fn rollout(&self) -> Option<&SiteRollout> {
        self.rollout.as_ref()
    }

    /// The rollout, if it changed since the last call (a hub's order, or
    /// the site's gate rolling the site back): the driver keeps it on disk
    /// and tells the nodes.
    pub fn take_rollout_change(&mut self) -> Option<SiteRollout> {
        if std::mem::take(&mut self.rollout_changed) {
            self.rollout.clone()
        } else {
            None
        }
    }

    /// Hands the rollout out again at the next
    /// [`RelayCore::take_rollout_change`]: it could not be kept, or the
    /// nodes may be told now what they could not be before.
    pub fn rollout_unsaved(&mut self) {
        self.rollout_changed = true;
    }

    /// The latest summary made, if any.
    pub fn last_summary(&self) -> Option<&SiteSummary> {
        self.last_summary.as_ref().map(|(_, s)| s)
    }

    /// The latest summary made and when.
    pub fn last_summary_at(&self) -> Option<(SiteSummary, Instant)> {
        self.last_summary.as_ref().map(|(at, s)| (s.clone(), *at))
    }

    fn push(&mut self, at_ms: u64, body: RecordBody) {
        self.records_made += 1;
        self.to_persist.push(NewRecord { at_ms, body });
    }

    /// Takes a fresh look at the site: records events for what changed and
    /// a summary if the site's state changed or one is due.
    pub fn handle_view(&mut self, now: Instant, wall_ms: u64, view: &SiteView) {
        let view = &self.without_joining(wall_ms, view);
        let mut view = self.without_gone(wall_ms, view);
        self.add_outliers(now, &mut view);
        let view = &view;
        let reported = |node: &str, check: &str| {
            self.nodes
                .as_ref()
                .and_then(|n| n.get(node))
                .and_then(|n| n.findings.get(check))
        };
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
                let findings = m
                    .health
                    .checks
                    .iter()
                    .filter(|(n, _)| foresight::is_finding(n))
                    .map(|(n, r)| {
                        // A runbook's every new word is reported (it is
                        // the audit of a run); a finding's when it rose.
                        let settled = if n.starts_with(trellis_node::runbook::CHECK_PREFIX) {
                            r.clone()
                        } else {
                            foresight::settle(reported(&m.name, n), r.clone())
                        };
                        (n.clone(), settled)
                    })
                    .collect();
                (
                    m.name.clone(),
                    NodeState {
                        alive: m.alive,
                        checks,
                        findings,
                        result: m.config.result.clone(),
                        patch: m.patch.state.clone(),
                        drift: m.config.drift.clone(),
                    },
                )
            })
            .collect();
        // The first look only sets the baseline: a relay (re)starting does
        // not report the whole site as news.
        if let Some(prev) = self.nodes.take() {
            for event in diff(&prev, &current, view, &self.departed, &self.reaped) {
                self.push(wall_ms, RecordBody::Event(event));
            }
        }
        self.nodes = Some(current);

        let mut summary = summarise(view, &self.relay, wall_ms);
        if let Some(r) = self.rollout.as_mut() {
            let (mut tally, verdict) = r.judge(view, &self.relay);
            let counts = crate::rollout::counts_of(&tally, &r.patched());
            if let Some(reason) = r.enforce(&verdict, &counts) {
                self.rollout_changed = true;
                let (t, _) = r.judge(view, &self.relay);
                tally = t;
                let (run, patch) = (r.order.run, r.patch_id());
                self.push(
                    wall_ms,
                    RecordBody::Event(Event::PatchSiteRolledBack { run, patch, reason }),
                );
            }
            summary.patch = Some(tally);
        }
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

    /// Adds the peer outliers' checks (`outlier:METRIC`) to the current
    /// generation of the nodes they concern, so that they become
    /// `CheckChanged` events and count in the summary like any check.
    /// Checks with that prefix the nodes published themselves are dropped:
    /// the names are the relay's.
    fn add_outliers(&mut self, now: Instant, view: &mut SiteView) {
        if !self.outliers.enabled() {
            return;
        }
        let mut found = self.outliers.assess(now, view, &self.relay);
        let current: BTreeMap<String, u64> = if found.is_empty() {
            BTreeMap::new()
        } else {
            view.current_members()
                .into_iter()
                .map(|m| (m.name.clone(), m.generation))
                .collect()
        };
        for m in &mut view.members {
            if !is_node(m, &self.relay) {
                continue;
            }
            crate::outliers::strip(&mut m.health.checks);
            if current.get(&m.name) == Some(&m.generation)
                && let Some(checks) = found.remove(&m.name)
            {
                m.health.checks.extend(checks);
            }
        }
    }

    /// The view without members that are still joining: a member the
    /// failure detector does not call alive yet, that started less than
    /// [`JOIN_GRACE`] ago (by its generation, its start time in ms) and was
    /// never seen alive. They are not dead, just new; after the grace they
    /// count as dead.
    fn without_joining(&mut self, wall_ms: u64, view: &SiteView) -> SiteView {
        let grace = JOIN_GRACE.as_millis() as u64;
        for m in &view.members {
            if m.alive {
                self.seen_alive.insert((m.name.clone(), m.generation));
            }
        }
        self.seen_alive.retain(|(name, generation)| {
            view.members
                .iter()
                .any(|m| &m.name == name && m.generation == *generation)
        });
        let seen = &self.seen_alive;
        SiteView {
            region: view.region.clone(),
            site: view.site.clone(),
            members: view
                .members
                .iter()
                .filter(|m| {
                    m.alive
                        || seen.contains(&(m.name.clone(), m.generation))
                        || wall_ms.saturating_sub(m.generation) >= grace
                })
                .cloned()
                .collect(),
        }
    }

    /// Records to append to the buffer, in order.
    pub fn poll_persist(&mut self) -> Vec<NewRecord> {
        std::mem::take(&mut self.to_persist)
    }

    /// The buffer could not store `batch`: keep it, first in line, for the
    /// next attempt.
    pub fn restore_unpersisted(&mut self, mut batch: Vec<NewRecord>) {
        batch.append(&mut self.to_persist);
        self.to_persist = batch;
    }

    /// The buffer made these records durable (in seq order).
    pub fn handle_persisted(&mut self, records: Vec<Record>) {
        for r in records {
            self.persisted = self.persisted.max(r.until());
            if matches!(r.body, RecordBody::Summary(_)) {
                self.latest_summary = Some(r.clone());
            }
            if let Some(c) = &mut self.conn
                && r.seq >= c.live_from
            {
                c.live.push_back(r);
            }
        }
    }

    /// A connection to a hub is up and the hub has applied up to `acked`.
    /// (A hub taking over from another may be behind what the other
    /// acknowledged; what the buffer still holds is sent again.)
    pub fn handle_connected(&mut self, acked: u64) {
        let acked = acked.min(self.persisted);
        self.acked = acked;
        let mut first = None;
        let mut backlog_sent = acked;
        // Records already deleted here that this hub does not have: a gap
        // stands for them, or its watermark could never move on.
        if acked < self.deleted {
            first = Some(Record {
                seq: acked + 1,
                at_ms: 0,
                body: RecordBody::Gap(Gap {
                    until: self.deleted,
                    acknowledged_before: self.deleted - acked,
                    ..Gap::default()
                }),
            });
            backlog_sent = self.deleted;
        }
        if first.is_none() {
            first = self.latest_summary.clone().filter(|s| s.seq > backlog_sent);
        }
        self.conn = Some(Conn {
            live_from: self.persisted + 1,
            first,
            live: VecDeque::new(),
            backlog_sent,
            backlog_end: self.persisted,
            backlog_reading: false,
            sent_max: backlog_sent,
            waiting_since: None,
        });
    }

    /// The buffer deleted every record up to `through` (acknowledged, and
    /// kept a while in case another hub takes over).
    pub fn handle_deleted(&mut self, through: u64) {
        self.deleted = self.deleted.max(through.min(self.acked));
    }

    /// The connection is gone; what was not acknowledged is sent again on
    /// the next one.
    pub fn handle_disconnected(&mut self) {
        self.conn = None;
    }

    /// What to send next, if anything.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        let c = self.conn.as_mut()?;
        let next = if let Some(r) = c.first.take().or_else(|| c.live.pop_front()) {
            c.sent_max = c.sent_max.max(r.until());
            Transmit::Record(r)
        } else if c.backlog_sent < c.backlog_end && !c.backlog_reading {
            c.backlog_reading = true;
            Transmit::Backlog {
                after: c.backlog_sent,
                through: c.backlog_end,
            }
        } else {
            return None;
        };
        c.waiting_since.get_or_insert(now);
        Some(next)
    }

    /// The backlog up to `through` was sent.
    pub fn handle_backlog_sent(&mut self, through: u64) {
        if let Some(c) = &mut self.conn {
            c.backlog_reading = false;
            c.backlog_sent = c.backlog_sent.max(through.min(c.backlog_end));
            c.sent_max = c.sent_max.max(c.backlog_sent);
        }
    }

    /// The hub applied every record up to `through`. Returns how far the
    /// buffer may now delete, if that moved.
    pub fn handle_ack(&mut self, now: Instant, through: u64) -> Result<Option<u64>, AckError> {
        let c = self.conn.as_mut().ok_or(AckError::NotConnected)?;
        if through > c.sent_max {
            return Err(AckError::Unsent {
                through,
                sent: c.sent_max,
            });
        }
        if through < self.acked {
            return Err(AckError::Backwards {
                through,
                acked: self.acked,
            });
        }
        c.waiting_since = (through < c.sent_max).then_some(now);
        let moved = through > self.acked;
        self.acked = through;
        Ok(moved.then_some(through))
    }

    /// Whether the hub has sent no acknowledgement for too long while
    /// records are outstanding.
    pub fn ack_overdue(&self, now: Instant) -> bool {
        self.conn
            .as_ref()
            .and_then(|c| c.waiting_since)
            .is_some_and(|t| now.duration_since(t) >= self.cfg.ack_timeout)
    }

    /// The sequence numbers the buffer may compact: none a hub may hold
    /// already (sent on this connection), none at or below what it acked.
    pub fn compactable(&self) -> RangeInclusive<u64> {
        match &self.conn {
            Some(c) => (c.backlog_sent + 1)..=(c.live_from - 1),
            None => (self.acked + 1)..=u64::MAX,
        }
    }

    /// When the core next needs `handle_view` or an overdue check.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let summary = self
            .last_summary
            .as_ref()
            .map(|(at, _)| *at + self.cfg.summary_interval);
        let ack = self
            .conn
            .as_ref()
            .and_then(|c| c.waiting_since)
            .map(|t| t + self.cfg.ack_timeout);
        [summary, ack].into_iter().flatten().min()
    }
}

fn diff(
    prev: &BTreeMap<String, NodeState>,
    cur: &BTreeMap<String, NodeState>,
    view: &SiteView,
    departed: &BTreeSet<String>,
    reaped: &BTreeMap<String, u64>,
) -> Vec<Event> {
    let mut events = Vec::new();
    for (name, now) in cur {
        let node = name.clone();
        // Configuration reports are states in gossip: a new one is one
        // that differs from what was seen before (or that a node newly
        // seen already carries).
        let before = prev.get(name);
        if now.result.is_some() && before.and_then(|b| b.result.as_ref()) != now.result.as_ref() {
            events.push(Event::ConfigResult {
                node: node.clone(),
                result: now.result.clone().expect("checked"),
            });
        }
        if now.patch.is_some() && before.and_then(|b| b.patch.as_ref()) != now.patch.as_ref() {
            events.push(Event::PatchState {
                node: node.clone(),
                state: now.patch.clone().expect("checked"),
            });
        }
        for (path, d) in &now.drift {
            if before.and_then(|b| b.drift.get(path)) != Some(d) {
                events.push(Event::ConfigDrift {
                    node: node.clone(),
                    drift: d.clone(),
                });
            }
        }
        match prev.get(name) {
            None if now.alive => {
                events.push(Event::NodeJoined { node: node.clone() });
                // What it joins with is news too: a check already failing,
                // a finding already raised.
                for (check, &to) in &now.checks {
                    if matches!(to, Status::Warning | Status::Critical) {
                        events.push(Event::CheckChanged {
                            node: node.clone(),
                            check: check.clone(),
                            from: Status::Unknown,
                            to,
                            detail: detail_of(view, name, check),
                        });
                    }
                }
            }
            // Past its join grace without ever being alive.
            None => events.push(Event::NodeDied { node }),
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
                        } else if let Some(f) = now.findings.get(check)
                            && before.findings.get(check) != Some(f)
                        {
                            // Same status, a score that rose: said again.
                            events.push(Event::CheckChanged {
                                node: node.clone(),
                                check: check.clone(),
                                from,
                                to,
                                detail: f.detail.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    for (name, before) in prev {
        if cur.contains_key(name) || reaped.contains_key(name) {
            // A reaped node was reported as it was reaped.
            continue;
        }
        if departed.contains(name) {
            events.push(Event::NodeLeft { node: name.clone() });
        } else if before.alive {
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
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: Default::default(),
        }
    }

    fn view(members: Vec<MemberView>) -> SiteView {
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    /// Stands in for the buffer: numbers what the core asks to persist.
    struct Disk {
        next: u64,
        all: Vec<Record>,
    }

    impl Disk {
        fn new() -> Self {
            Disk {
                next: 1,
                all: Vec::new(),
            }
        }

        fn persist(&mut self, core: &mut RelayCore) -> Vec<u64> {
            let recs: Vec<Record> = core
                .poll_persist()
                .into_iter()
                .map(|n| {
                    let r = Record {
                        seq: self.next,
                        at_ms: n.at_ms,
                        body: n.body,
                    };
                    self.next += 1;
                    r
                })
                .collect();
            let seqs = recs.iter().map(|r| r.seq).collect();
            self.all.extend(recs.clone());
            core.handle_persisted(recs);
            seqs
        }

        /// Everything the core sends now, backlog read from "disk".
        fn drain(&self, core: &mut RelayCore, now: Instant) -> Vec<u64> {
            let mut sent = Vec::new();
            while let Some(t) = core.poll_transmit(now) {
                match t {
                    Transmit::Record(r) => sent.push(r.seq),
                    Transmit::Backlog { after, through } => {
                        let chunk: Vec<u64> = self
                            .all
                            .iter()
                            .filter(|r| r.seq > after && r.seq <= through)
                            .map(|r| r.seq)
                            .take(2)
                            .collect();
                        sent.extend(&chunk);
                        core.handle_backlog_sent(*chunk.last().unwrap_or(&through));
                    }
                }
            }
            sent
        }
    }

    fn core() -> RelayCore {
        RelayCore::new("relay", CoreConfig::default(), 0, 0, None)
    }

    #[test]
    fn a_new_member_not_yet_alive_is_joining_not_dead() {
        let t0 = Instant::now();
        let mut core = core();
        let started = 1_000_000;
        let mut newcomer = member("b", false, Status::Passing);
        newcomer.generation = started;
        let a = member("a", true, Status::Passing);
        core.handle_view(t0, started + 100, &view(vec![a.clone()]));
        let _ = core.poll_persist();
        core.handle_view(t0, started + 500, &view(vec![a.clone(), newcomer.clone()]));
        assert!(core.poll_persist().is_empty(), "nothing to report yet");
        assert_eq!(core.last_summary().unwrap().nodes_total, 1);
        newcomer.alive = true;
        core.handle_view(t0, started + 2000, &view(vec![a.clone(), newcomer.clone()]));
        let made = core.poll_persist();
        assert_eq!(
            made[0].body,
            RecordBody::Event(Event::NodeJoined { node: "b".into() })
        );
        // One that never comes alive is dead once its grace is over.
        let mut stuck = member("c", false, Status::Passing);
        stuck.generation = started;
        let grace = JOIN_GRACE.as_millis() as u64;
        core.handle_view(
            t0,
            started + grace - 1,
            &view(vec![a.clone(), newcomer.clone(), stuck.clone()]),
        );
        assert_eq!(core.last_summary().unwrap().nodes_dead, 0);
        core.handle_view(t0, started + grace, &view(vec![a, newcomer, stuck]));
        let made: Vec<RecordBody> = core.poll_persist().into_iter().map(|r| r.body).collect();
        assert!(made.contains(&RecordBody::Event(Event::NodeDied { node: "c".into() })));
        assert_eq!(core.last_summary().unwrap().nodes_dead, 1);
    }

    fn events(core: &mut RelayCore) -> Vec<Event> {
        core.poll_persist()
            .into_iter()
            .filter_map(|r| match r.body {
                RecordBody::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_decommissioned_node_leaves_the_views_without_dying() {
        let t0 = Instant::now();
        let mut core = core();
        let (a, b) = (
            member("a", true, Status::Passing),
            member("b", true, Status::Critical),
        );
        core.handle_view(t0, 1, &view(vec![a.clone(), b.clone()]));
        let _ = core.poll_persist();
        core.set_departed(BTreeSet::from(["b".to_owned()]));
        core.handle_view(t0, 2, &view(vec![a.clone(), b.clone()]));
        assert_eq!(
            events(&mut core),
            vec![Event::NodeLeft { node: "b".into() }]
        );
        let s = core.last_summary().unwrap();
        assert_eq!((s.nodes_total, s.nodes_alive, s.nodes_dead), (1, 1, 0));
        assert!(s.worst.iter().all(|n| n.name != "b"), "{:?}", s.worst);
        assert_eq!(core.hidden(), &BTreeSet::from(["b".to_owned()]));
        // Its gossip state going dead afterwards is nobody's news.
        let gone = member("b", false, Status::Passing);
        core.handle_view(t0, 3, &view(vec![a, gone]));
        assert!(events(&mut core).is_empty());
        assert_eq!(core.last_summary().unwrap().nodes_dead, 0);
    }

    #[test]
    fn a_node_dead_past_retention_is_reaped_once_and_comes_back_if_it_returns() {
        let t0 = Instant::now();
        let mut core = RelayCore::new(
            "relay",
            CoreConfig {
                reap_dead_after: Duration::from_secs(60),
                ..CoreConfig::default()
            },
            0,
            0,
            None,
        );
        let a = member("a", true, Status::Passing);
        let b = member("b", true, Status::Passing);
        core.handle_view(t0, 1_000, &view(vec![a.clone(), b.clone()]));
        let _ = core.poll_persist();
        let dead = member("b", false, Status::Passing);
        core.handle_view(t0, 2_000, &view(vec![a.clone(), dead.clone()]));
        assert_eq!(
            events(&mut core),
            vec![Event::NodeDied { node: "b".into() }]
        );
        core.handle_view(t0, 61_999, &view(vec![a.clone(), dead.clone()]));
        assert!(events(&mut core).is_empty(), "not yet");
        assert_eq!(core.last_summary().unwrap().nodes_dead, 1);
        core.handle_view(t0, 62_000, &view(vec![a.clone(), dead.clone()]));
        assert_eq!(
            events(&mut core),
            vec![Event::NodeReaped {
                node: "b".into(),
                dead_for_s: 60
            }]
        );
        let s = core.last_summary().unwrap();
        assert_eq!((s.nodes_total, s.nodes_dead), (1, 0));
        let kept = core.take_reaped_change().expect("to keep on disk");
        assert_eq!(kept, BTreeMap::from([("b".to_owned(), 1)]));

        // After a restart with what was kept: not counted, not reported.
        let mut again = core_restored(kept);
        again.handle_view(t0, 100_000, &view(vec![a.clone(), dead.clone()]));
        assert!(events(&mut again).is_empty());
        again.handle_view(t0, 500_000, &view(vec![a.clone(), dead]));
        assert!(events(&mut again).is_empty(), "reported once only");
        assert_eq!(again.last_summary().unwrap().nodes_total, 1);

        // Back alive (a new generation): counted again, and forgotten as
        // reaped.
        let mut back = member("b", true, Status::Passing);
        back.generation = 2;
        again.handle_view(t0, 600_000, &view(vec![a, back]));
        assert_eq!(
            events(&mut again),
            vec![Event::NodeJoined { node: "b".into() }]
        );
        assert_eq!(again.last_summary().unwrap().nodes_alive, 2);
        assert_eq!(again.take_reaped_change(), Some(BTreeMap::new()));
    }

    fn core_restored(reaped: BTreeMap<String, u64>) -> RelayCore {
        let mut c = core();
        c.restore_reaped(reaped);
        c
    }

    #[test]
    fn nothing_is_sent_before_it_is_persisted() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        assert!(core.poll_transmit(t0).is_none(), "made but not persisted");
        let mut disk = Disk::new();
        disk.persist(&mut core);
        assert_eq!(disk.drain(&mut core, t0), vec![1]);
    }

    #[test]
    fn a_death_is_an_event_and_an_immediate_summary() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        let _ = core.poll_persist();
        let t1 = t0 + Duration::from_millis(500);
        core.handle_view(t1, 2, &view(vec![member("a", false, Status::Passing)]));
        let made = core.poll_persist();
        assert_eq!(
            made[0].body,
            RecordBody::Event(Event::NodeDied { node: "a".into() })
        );
        match &made[1].body {
            RecordBody::Summary(s) => assert_eq!(s.nodes_dead, 1),
            other => panic!("expected a summary, got {other:?}"),
        }
    }

    #[test]
    fn an_unchanged_site_is_summarised_once_per_interval() {
        let t0 = Instant::now();
        let cfg = CoreConfig::default();
        let interval = cfg.summary_interval;
        let mut core = RelayCore::new("relay", cfg, 0, 0, None);
        let v = view(vec![member("a", true, Status::Passing)]);
        core.handle_view(t0, 1, &v);
        core.handle_view(t0 + interval / 2, 2, &v);
        assert_eq!(core.poll_persist().len(), 1);
        assert_eq!(core.poll_timeout(), Some(t0 + interval));
        core.handle_view(t0 + interval, 3, &v);
        assert_eq!(core.poll_persist().len(), 1);
    }

    #[test]
    fn a_node_that_joins_with_a_failing_check_reports_it() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        let v = view(vec![
            member("a", true, Status::Passing),
            member("b", true, Status::Critical),
            member("c", true, Status::Passing),
        ]);
        core.handle_view(t0, 2, &v);
        assert_eq!(
            events(&mut core),
            vec![
                Event::NodeJoined { node: "b".into() },
                Event::CheckChanged {
                    node: "b".into(),
                    check: "web".into(),
                    from: Status::Unknown,
                    to: Status::Critical,
                    detail: "x".into(),
                },
                Event::NodeJoined { node: "c".into() },
            ]
        );
    }

    #[test]
    fn check_changes_become_events_with_their_detail() {
        let t0 = Instant::now();
        let mut core = core();
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        core.handle_view(t0, 2, &view(vec![member("a", true, Status::Critical)]));
        let made: Vec<RecordBody> = core.poll_persist().into_iter().map(|r| r.body).collect();
        assert!(made.contains(&RecordBody::Event(Event::CheckChanged {
            node: "a".into(),
            check: "web".into(),
            from: Status::Passing,
            to: Status::Critical,
            detail: "x".into(),
        })));
    }

    #[test]
    fn a_peer_outlier_becomes_a_check_changed_event_and_counts_in_the_summary() {
        let cfg = CoreConfig::default();
        let hold = cfg.outliers.hold_for;
        let mut core = RelayCore::new("relay", cfg, 0, 0, None);
        let site = |hot_cpu: u8| {
            let mut members: Vec<MemberView> = (0..9)
                .map(|i| {
                    let mut m = member(&format!("web-{i}"), true, Status::Passing);
                    m.health.cpu_pct = Some(10 + i as u8);
                    m.labels.insert("role".into(), "web".into());
                    m
                })
                .collect();
            let mut hot = member("web-hot", true, Status::Passing);
            hot.health.cpu_pct = Some(hot_cpu);
            hot.labels.insert("role".into(), "web".into());
            members.push(hot);
            view(members)
        };
        let outlier_events = |core: &mut RelayCore| -> Vec<Event> {
            events(core)
                .into_iter()
                .filter(|e| matches!(e, Event::CheckChanged { check, .. } if check.starts_with("outlier:")))
                .collect()
        };
        let t0 = Instant::now();
        let mut t = t0;
        let mut wall = 1_000;
        let mut look = |core: &mut RelayCore, v: &SiteView, until: Instant, t: &mut Instant| {
            while *t <= until {
                core.handle_view(*t, wall, v);
                wall += 1_000;
                *t += Duration::from_secs(1);
            }
        };
        look(
            &mut core,
            &site(87),
            t0 + hold - Duration::from_secs(1),
            &mut t,
        );
        assert!(outlier_events(&mut core).is_empty(), "not yet");
        look(&mut core, &site(87), t0 + hold, &mut t);
        assert_eq!(
            outlier_events(&mut core),
            vec![Event::CheckChanged {
                node: "web-hot".into(),
                check: "outlier:cpu".into(),
                from: Status::Unknown,
                to: Status::Warning,
                detail:
                    "score 6.2: cpu 87% against a median of 14% among 9 peers labelled role=web"
                        .into(),
            }]
        );
        let s = core.last_summary().unwrap();
        assert_eq!(s.failing_checks["outlier:cpu"].warning, 1);
        assert_eq!(s.by_status.passing, 10, "statuses are the nodes' own");
        // Back among its peers: passing once that held for hold_for.
        let back = t + hold;
        look(&mut core, &site(15), back, &mut t);
        let events = outlier_events(&mut core);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(matches!(
            &events[0],
            Event::CheckChanged { node, from: Status::Warning, to: Status::Passing, detail, .. }
                if node == "web-hot" && detail.starts_with("score 1.1: cpu 15% ")
        ));
        assert!(
            !core
                .last_summary()
                .unwrap()
                .failing_checks
                .contains_key("outlier:cpu")
        );
    }

    #[test]
    fn a_findings_score_that_rises_a_quarter_is_reported_again_with_its_status() {
        let t0 = Instant::now();
        let mut core = core();
        let with_score = |score: u32| {
            let mut m = member("a", true, Status::Passing);
            m.health.checks.insert(
                "anomaly:cpu".into(),
                CheckResult::new(Status::Warning, format!("score {score}: cpu")),
            );
            view(vec![m])
        };
        let findings = |core: &mut RelayCore| -> Vec<(Status, Status, String)> {
            events(core)
                .into_iter()
                .filter_map(|e| match e {
                    Event::CheckChanged {
                        check,
                        from,
                        to,
                        detail,
                        ..
                    } if check == "anomaly:cpu" => Some((from, to, detail)),
                    _ => None,
                })
                .collect()
        };
        core.handle_view(t0, 1_000, &view(vec![member("a", true, Status::Passing)]));
        core.handle_view(t0, 2_000, &with_score(8));
        let w = Status::Warning;
        assert_eq!(
            findings(&mut core),
            vec![(Status::Unknown, w, "score 8: cpu".to_owned())]
        );
        // 9 is within a quarter of 8: nothing new.
        core.handle_view(t0, 3_000, &with_score(9));
        assert!(findings(&mut core).is_empty());
        // 9, then 10, then 11: each within a quarter of the last look, but
        // 11 is more than a quarter above what was reported (8).
        core.handle_view(t0, 4_000, &with_score(10));
        assert!(findings(&mut core).is_empty());
        core.handle_view(t0, 5_000, &with_score(11));
        assert_eq!(
            findings(&mut core),
            vec![(w, w, "score 11: cpu".to_owned())]
        );
    }

    #[test]
    fn a_nodes_configuration_result_and_each_new_drift_become_one_event_each() {
        use trellis_node::distribute::{ConfigResult, DriftAction, DriftNote, Outcome};
        let t0 = Instant::now();
        let mut core = core();
        let mut a = member("a", true, Status::Passing);
        core.handle_view(t0, 1, &view(vec![a.clone()]));
        let _ = core.poll_persist();
        let result = ConfigResult {
            version: 3,
            outcome: Outcome::Refused,
            detail: "bundle signed by an unknown key".into(),
        };
        a.config.result = Some(result.clone());
        let drift = DriftNote {
            n: 1,
            action: DriftAction::Healed,
            path: "/etc/motd".into(),
            expected: "aa".into(),
            found: Some("bb".into()),
            size: Some(7),
        };
        a.config.drift.insert(drift.path.clone(), drift.clone());
        core.handle_view(t0, 2, &view(vec![a.clone()]));
        let events = |core: &mut RelayCore| -> Vec<RecordBody> {
            core.poll_persist()
                .into_iter()
                .map(|r| r.body)
                .filter(|b| matches!(b, RecordBody::Event(_)))
                .collect()
        };
        assert_eq!(
            events(&mut core),
            vec![
                RecordBody::Event(Event::ConfigResult {
                    node: "a".into(),
                    result
                }),
                RecordBody::Event(Event::ConfigDrift {
                    node: "a".into(),
                    drift: drift.clone()
                }),
            ]
        );
        // Seen again unchanged: nothing new.
        core.handle_view(t0, 3, &view(vec![a.clone()]));
        assert!(events(&mut core).is_empty());
        // The same file drifting again is a new note (n counts up).
        let again = DriftNote { n: 2, ..drift };
        a.config.drift.insert(again.path.clone(), again.clone());
        core.handle_view(t0, 4, &view(vec![a]));
        assert_eq!(
            events(&mut core),
            vec![RecordBody::Event(Event::ConfigDrift {
                node: "a".into(),
                drift: again
            })]
        );
    }

    #[test]
    fn after_an_outage_the_newest_summary_goes_first_then_live_records_and_the_backlog_in_order() {
        let t0 = Instant::now();
        let mut core = core();
        let mut disk = Disk::new();
        // An outage: six records pile up (summaries and events).
        for i in 0..3 {
            let alive = i % 2 == 0;
            core.handle_view(t0, i, &view(vec![member("a", alive, Status::Passing)]));
            disk.persist(&mut core);
        }
        assert_eq!(disk.next - 1, 5);
        let newest_summary = disk
            .all
            .iter()
            .rev()
            .find(|r| matches!(r.body, RecordBody::Summary(_)))
            .unwrap()
            .seq;
        core.handle_connected(0);
        // A record made right after the link came back.
        core.handle_view(t0, 9, &view(vec![member("a", true, Status::Critical)]));
        let live = disk.persist(&mut core);
        let sent = disk.drain(&mut core, t0);
        assert_eq!(sent[0], newest_summary, "newest summary first: {sent:?}");
        assert_eq!(&sent[1..1 + live.len()], &live[..], "then live records");
        let backlog: Vec<u64> = sent[1 + live.len()..].to_vec();
        assert_eq!(backlog, vec![1, 2, 3, 4, 5], "then the backlog, in order");
        assert_eq!(core.stats().backlog_left, 0);
    }

    #[test]
    fn unacknowledged_records_are_resent_on_the_next_connection() {
        let t0 = Instant::now();
        let mut core = core();
        let mut disk = Disk::new();
        core.handle_connected(0);
        for i in 0..3 {
            core.handle_view(t0, i, &view(vec![member("a", i % 2 == 0, Status::Passing)]));
            disk.persist(&mut core);
        }
        assert_eq!(disk.drain(&mut core, t0), vec![1, 2, 3, 4, 5]);
        assert_eq!(core.handle_ack(t0, 2), Ok(Some(2)));
        core.handle_disconnected();
        assert!(core.poll_transmit(t0).is_none());
        // The next hub has applied up to 3 (the previous one told it).
        core.handle_connected(3);
        let again = disk.drain(&mut core, t0);
        assert_eq!(again, vec![5, 4, 5], "newest summary, then the backlog");
    }

    #[test]
    fn acks_for_unsent_or_earlier_records_are_refused_without_effect() {
        let t0 = Instant::now();
        let mut core = core();
        let mut disk = Disk::new();
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        disk.persist(&mut core);
        let _ = core.poll_transmit(t0);
        assert_eq!(
            core.handle_ack(t0, 5),
            Err(AckError::Unsent {
                through: 5,
                sent: 1
            })
        );
        assert_eq!(core.handle_ack(t0, 1), Ok(Some(1)));
        assert_eq!(
            core.handle_ack(t0, 0),
            Err(AckError::Backwards {
                through: 0,
                acked: 1
            })
        );
        assert_eq!(
            core.handle_ack(t0, 1),
            Ok(None),
            "no news, nothing to delete"
        );
        assert_eq!(core.stats().acked_through, 1);
    }

    #[test]
    fn a_silent_hub_is_noticed_after_the_ack_timeout() {
        let t0 = Instant::now();
        let cfg = CoreConfig::default();
        let timeout = cfg.ack_timeout;
        let mut core = RelayCore::new("relay", cfg, 0, 0, None);
        let mut disk = Disk::new();
        core.handle_connected(0);
        core.handle_view(t0, 1, &view(vec![member("a", true, Status::Passing)]));
        disk.persist(&mut core);
        let _ = core.poll_transmit(t0);
        assert!(!core.ack_overdue(t0 + timeout / 2));
        assert!(core.ack_overdue(t0 + timeout));
        core.handle_ack(t0 + timeout / 2, 1).unwrap();
        assert!(!core.ack_overdue(t0 + timeout * 3));
    }

    #[test]
    fn records_a_hub_may_hold_are_never_compacted() {
        let t0 = Instant::now();
        let mut core = core();
        let mut disk = Disk::new();
        for i in 0..5 {
            core.handle_view(t0, i, &view(vec![member("a", i % 2 == 0, Status::Passing)]));
            disk.persist(&mut core);
        }
        let last = disk.next - 1;
        assert_eq!(
            core.compactable(),
            1..=u64::MAX,
            "disconnected: all unacked"
        );
        core.handle_connected(0);
        // Newest summary sent first (it lies in the backlog) and one chunk.
        let _ = core.poll_transmit(t0);
        if let Some(Transmit::Backlog { .. }) = core.poll_transmit(t0) {
            core.handle_backlog_sent(2);
        }
        assert_eq!(core.compactable(), 3..=last);
    }

    #[test]
    fn a_hub_behind_another_gets_what_is_still_kept_and_a_gap_for_what_is_gone() {
        let t0 = Instant::now();
        let mut core = core();
        let mut disk = Disk::new();
        core.handle_connected(0);
        for i in 0..3 {
            core.handle_view(t0, i, &view(vec![member("a", i % 2 == 0, Status::Passing)]));
            disk.persist(&mut core);
        }
        disk.drain(&mut core, t0);
        core.handle_ack(t0, 4).unwrap();
        // Still kept: a hub that has nothing gets it all again.
        core.handle_disconnected();
        core.handle_connected(0);
        let again = disk.drain(&mut core, t0);
        assert_eq!(again, vec![5, 1, 2, 3, 4, 5], "newest summary, then all");
        core.handle_ack(t0, 4).unwrap();
        // Once deleted, a hub behind gets a gap for what is gone.
        core.handle_deleted(4);
        core.handle_disconnected();
        core.handle_connected(2);
        let Some(Transmit::Record(r)) = core.poll_transmit(t0) else {
            panic!("a gap first");
        };
        assert_eq!(r.seq, 3);
        assert!(
            matches!(&r.body, RecordBody::Gap(g) if g.until == 4 && g.acknowledged_before == 2)
        );
        let rest = disk.drain(&mut core, t0);
        assert_eq!(rest, vec![5]);
    }
}
