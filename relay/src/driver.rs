//! The relay process: a gossip member of its site, the task that owns the
//! [`RelayCore`], the outage buffer's thread, the uplink to a hub, and the
//! local read API that keeps the site visible through a WAN outage.
//!
//! Tasks and what they own:
//! - the core task owns the core; it samples the site's gossip, asks the
//!   buffer thread to persist what the core made, and hands what the core
//!   says to send to the current connection's writer;
//! - the buffer thread owns the SQLite buffer; every call on it blocks, so
//!   nothing else ever waits for the disk;
//! - the uplink task connects to a hub (trying each in turn, waiting a
//!   random time up to an exponentially growing bound between attempts),
//!   says hello and starts, per connection, a writer (live records first,
//!   the backlog paced at `uplink.replay_bytes_per_s`), a reader (acks) and
//!   a responder (the hub's requests);
//! - the API task serves `/api/v1/site` and `/api/v1/site/nodes`;
//! - the fetch task serves the cached configuration bundle to the site's
//!   nodes (`trellis-fetch/1`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use std::sync::atomic::AtomicU64;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trellis_node::agent::{SiteMember, StartError, serve_metrics};
use trellis_node::authz::Protocol;
use trellis_node::bundle::SignedBundle;
use trellis_node::clock::{ticker, unix_ms};
use trellis_node::distribute::{Offer, hex32};
use trellis_node::endpoint::{MeshEndpoint, close};
use trellis_node::gossip::Gossip;
use trellis_node::id::Role;
use trellis_node::metrics::Registry;
use trellis_node::patchstate::keys;
use trellis_node::tls::Credentials;
use trellis_node::wire::{self, WireError};

use crate::api::{ApiState, LocalState, api_router};
use crate::artifacts::{ArtifactCache, ArtifactMetrics, patches_dir};
use crate::buffer::{BufferError, BufferStats, NewRecord, OutageBuffer};
use crate::config::RelayConfig;
use crate::configcache;
use crate::core::{RelayCore, Transmit};
use crate::failover::{HubChoice, full_jitter, next_attempt};
use crate::pace::TokenBucket;
use crate::revocations::RevocationStore;
use crate::rollout::{SiteOrder, SiteRollout};
use crate::uplink::{
    Gap, HubMsg, MAX_UPLINK_FRAME, Record, RelayMsg, Request, Response, UPLINK_VERSION,
};

/// Largest request a hub may send on a request stream: a rollout order
/// carries a patch manifest (at most 256 KiB) and the site's node names.
/// A configuration bundle, which may be larger, comes as a second frame.
const MAX_REQUEST: usize = 1 << 20;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a configuration bundle (at most a few MiB) to arrive
/// over a slow WAN once the relay said it wants it.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the buffer is checked against its bounds.
const COMPACT_EVERY: Duration = Duration::from_secs(1);
/// Backlog is read from the buffer in chunks of at most this many records.
const BACKLOG_CHUNK_ROWS: usize = 512;

/// The relay's own metrics.
#[derive(Clone, Default)]
struct RelayMetrics {
    connected: Gauge,
    records_made: Counter,
    persisted_through: Gauge,
    acked_through: Gauge,
    buffer_records: Gauge,
    buffer_bytes: Gauge,
    buffer_fsyncs: Gauge,
    buffer_errors: Counter,
    dropped: Counter,
    backlog_left: Gauge,
    /// Backlog records written to a hub: its rate is the replay rate.
    backlog_sent: Counter,
    buffer_oldest_age: Gauge<f64, AtomicU64>,
    requests: Counter,
}

impl RelayMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = RelayMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis_relay");
        r.register(
            "uplink_connected",
            "1 while a hub connection is up",
            m.connected.clone(),
        );
        r.register(
            "records_made",
            "Summaries and events recorded",
            m.records_made.clone(),
        );
        r.register(
            "persisted_through",
            "Highest sequence number made durable in the outage buffer",
            m.persisted_through.clone(),
        );
        r.register(
            "acked_through",
            "Highest sequence number a hub acknowledged",
            m.acked_through.clone(),
        );
        r.register(
            "buffer_records",
            "Records in the outage buffer",
            m.buffer_records.clone(),
        );
        r.register(
            "buffer_bytes",
            "Bytes counted against buffer.max_bytes",
            m.buffer_bytes.clone(),
        );
        r.register(
            "buffer_fsyncs",
            "Transactions committed (each one fsync) since start",
            m.buffer_fsyncs.clone(),
        );
        r.register(
            "buffer_errors",
            "Outage buffer operations that failed",
            m.buffer_errors.clone(),
        );
        r.register(
            "records_dropped",
            "Records downsampled or dropped to keep the buffer within its bounds",
            m.dropped.clone(),
        );
        r.register(
            "backlog_records",
            "Backlog still to send on the current connection (by sequence span)",
            m.backlog_left.clone(),
        );
        r.register(
            "backlog_records_sent",
            "Backlog records (kept through an outage) written to a hub; its rate is the replay rate",
            m.backlog_sent.clone(),
        );
        r.register_with_unit(
            "buffer_oldest_age",
            "Age of the oldest record no hub has acknowledged (0 when none waits)",
            prometheus_client::registry::Unit::Seconds,
            m.buffer_oldest_age.clone(),
        );
        r.register(
            "hub_requests",
            "Requests answered for hubs",
            m.requests.clone(),
        );
        m
    }
}

/// The result of an append: the records with their seqs, or the error and
/// the batch back (to retry).
type Appended = Result<Vec<Record>, (BufferError, Vec<NewRecord>)>;

/// Work for the buffer thread.
enum BufferCmd {
    Append {
        batch: Vec<NewRecord>,
        reply: oneshot::Sender<Appended>,
    },
    Read {
        after: u64,
        through: u64,
        max_bytes: usize,
        reply: oneshot::Sender<Result<Vec<Record>, BufferError>>,
    },
    Delete {
        through: u64,
    },
    Compact {
        now_ms: u64,
        movable: std::ops::RangeInclusive<u64>,
        reply: oneshot::Sender<Result<Option<Gap>, BufferError>>,
    },
    /// When the oldest record after `acked` was made.
    Oldest {
        acked: u64,
        reply: oneshot::Sender<Result<Option<u64>, BufferError>>,
    },
}

/// Runs the buffer on a thread of its own until every sender is gone.
fn spawn_buffer_thread(
    mut buffer: OutageBuffer,
    stats: Arc<Mutex<BufferStats>>,
) -> std::sync::mpsc::Sender<BufferCmd> {
    let (tx, rx) = std::sync::mpsc::channel::<BufferCmd>();
    std::thread::Builder::new()
        .name("outage-buffer".into())
        .spawn(move || {
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    BufferCmd::Append { batch, reply } => {
                        let result = buffer.append(batch.clone()).map_err(|e| (e, batch));
                        let _ = reply.send(result);
                    }
                    BufferCmd::Read {
                        after,
                        through,
                        max_bytes,
                        reply,
                    } => {
                        let result = buffer
                            .read_after(after, BACKLOG_CHUNK_ROWS, max_bytes)
                            .map(|v| v.into_iter().filter(|r| r.seq <= through).collect());
                        let _ = reply.send(result);
                    }
                    BufferCmd::Delete { through } => {
                        if let Err(error) = buffer.delete_through(through) {
                            warn!(%error, "cannot delete acknowledged records; will retry");
                        }
                    }
                    BufferCmd::Compact {
                        now_ms,
                        movable,
                        reply,
                    } => {
                        let _ = reply.send(buffer.compact(now_ms, movable));
                    }
                    BufferCmd::Oldest { acked, reply } => {
                        let _ = reply.send(buffer.oldest_after(acked));
                    }
                }
                *stats.lock().expect("not poisoned") = buffer.stats();
            }
        })
        .expect("spawn the buffer thread");
    tx
}

/// News for the core task. `conn` numbers connections so that news from a
/// connection already replaced is ignored.
enum Input {
    Connected {
        conn: u64,
        hub: String,
        acked: u64,
        writer: Writer,
    },
    Ack {
        conn: u64,
        through: u64,
    },
    BacklogSent {
        conn: u64,
        through: u64,
    },
    Disconnected {
        conn: u64,
    },
    /// A hub's rollout order, with whether the relay holds every chunk of
    /// the patch; answered once the order is kept on disk.
    Order {
        order: Box<SiteOrder>,
        ready: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The core task's handle on a connection's writer.
struct Writer {
    live: mpsc::UnboundedSender<Record>,
    backlog: mpsc::UnboundedSender<(Vec<Record>, u64)>,
    cancel: CancellationToken,
}

struct Current {
    id: u64,
    hub: String,
    writer: Writer,
}

/// Events for the core task from the buffer thread.
enum Done {
    Persisted(Appended),
    Read {
        conn: u64,
        through: u64,
        result: Result<Vec<Record>, BufferError>,
    },
    Compacted(Result<Option<Gap>, BufferError>),
    Oldest(Result<Option<u64>, BufferError>),
}

struct CoreTask {
    core: RelayCore,
    gossip: Arc<Gossip>,
    buffer: std::sync::mpsc::Sender<BufferCmd>,
    done_tx: mpsc::UnboundedSender<Done>,
    metrics: RelayMetrics,
    local: watch::Sender<LocalState>,
    current: Option<Current>,
    appending: bool,
    compacting: bool,
    seen_made: u64,
    /// Acknowledged seqs and when, to delete once `keep_acked` has passed.
    to_delete: std::collections::VecDeque<(Instant, u64)>,
    keep_acked: Duration,
    /// Where the site's rollout is kept.
    rollout_path: PathBuf,
    /// The newest run whose patch the relay holds whole: its install
    /// order may be told to the nodes.
    ready_run: Option<u64>,
    /// The revocation list in force, for the site's decommissioned members.
    revocations: trellis_node::revocation::Revocations,
    /// The digest of the list the departed members were last taken from.
    departed_from: Option<String>,
    region: String,
    site: String,
    /// Where the reaped nodes are kept.
    reaped_path: PathBuf,
}

impl CoreTask {
    async fn run(
        mut self,
        sample_interval: Duration,
        mut inputs: mpsc::Receiver<Input>,
        mut done: mpsc::UnboundedReceiver<Done>,
        shutdown: CancellationToken,
    ) {
        let mut sample = ticker(sample_interval);
        let mut compact = ticker(COMPACT_EVERY);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                d = done.recv() => match d {
                    Some(d) => self.on_done(d, &mut retry_at),
                    None => break,
                },
                i = inputs.recv() => match i {
                    Some(Input::Order { order, ready, reply }) => {
                        let newly_ready = ready && self.ready_run < Some(order.run);
                        if newly_ready {
                            self.ready_run = Some(order.run);
                        }
                        self.core.handle_order(*order);
                        if newly_ready {
                            // The order may be the same as before; what
                            // changed is that the nodes may now be told.
                            self.core.rollout_unsaved();
                        }
                        let kept = self.keep_rollout().await;
                        let _ = reply.send(kept);
                    }
                    Some(i) => self.on_input(i),
                    None => break,
                },
                _ = sample.tick() => {
                    let view = self.gossip.view().await;
                    let now = Instant::now();
                    self.delete_old_acked(now);
                    self.follow_departures();
                    self.core.handle_view(now, unix_ms(), &view);
                    self.keep_reaped();
                    // A failure is logged, and tried again on the next look.
                    let _ = self.keep_rollout().await;
                    if self.current.is_some() && self.core.ack_overdue(now) {
                        warn!("hub stopped acknowledging records; reconnecting");
                        self.drop_connection();
                    }
                    let (reply, rx) = oneshot::channel();
                    let acked = self.core.stats().acked_through;
                    self.to_buffer(BufferCmd::Oldest { acked, reply }, rx, Done::Oldest);
                }
                _ = compact.tick(), if !self.compacting => {
                    self.compacting = true;
                    let (reply, rx) = oneshot::channel();
                    let cmd = BufferCmd::Compact {
                        now_ms: unix_ms(),
                        movable: self.core.compactable(),
                        reply,
                    };
                    self.to_buffer(cmd, rx, Done::Compacted);
                }
                _ = sleep_until(retry_at) => retry_at = None,
            }
            self.flush(retry_at.is_none());
        }
        self.drop_connection();
    }

    /// Keeps the rollout on disk if it changed, then tells the nodes: to
    /// roll back at once; to install only once the relay holds the whole
    /// patch (until then the nodes keep the order they had).
    /// Takes the site's decommissioned members from the revocation list
    /// when it changed.
    fn follow_departures(&mut self) {
        let set = self.revocations.current();
        let digest = set.digest();
        if self.departed_from.as_ref() == Some(&digest) {
            return;
        }
        let departed = crate::departures::decommissioned_in(&set, &self.region, &self.site);
        if !departed.is_empty() {
            info!(members = ?departed, "decommissioned members left out of the site's views");
        }
        self.core.set_departed(departed);
        self.departed_from = Some(digest);
    }

    /// Keeps the reaped nodes on disk when they changed; a failure is
    /// logged and tried again on the next look.
    fn keep_reaped(&mut self) {
        if let Some(reaped) = self.core.take_reaped_change()
            && let Err(error) = crate::departures::save_reaped(&self.reaped_path, &reaped)
        {
            error!(%error, "cannot keep the reaped nodes; trying again");
            self.core.restore_reaped_unsaved();
        }
    }

    async fn keep_rollout(&mut self) -> Result<(), String> {
        let Some(r) = self.core.take_rollout_change() else {
            return Ok(());
        };
        if let Err(error) = crate::rollout::save(&self.rollout_path, &r) {
            error!(%error, "cannot keep the site's rollout; the nodes are not told");
            self.core.rollout_unsaved();
            return Err(error);
        }
        self.publish_order(&r).await;
        if let Some(reason) = &r.local {
            warn!(run = r.order.run, %reason, "site rolled back by its relay");
        }
        Ok(())
    }

    async fn publish_order(&self, r: &SiteRollout) {
        if !r.rolling_back() && self.ready_run < Some(r.order.run) {
            info!(
                run = r.order.run,
                "rollout kept; nodes are told once the patch is here whole"
            );
            return;
        }
        let order = r.gossip_order();
        info!(
            run = order.run,
            action = order.action.as_str(),
            nodes = order.nodes.len(),
            "telling the site's nodes"
        );
        self.gossip
            .set(vec![(keys::ORDER.to_owned(), order.encode())], keys::ORDER)
            .await;
    }

    /// Sends a command to the buffer thread; its reply comes back as a
    /// `Done`.
    fn to_buffer<T: Send + 'static>(
        &self,
        cmd: BufferCmd,
        rx: oneshot::Receiver<T>,
        wrap: impl FnOnce(T) -> Done + Send + 'static,
    ) {
        if self.buffer.send(cmd).is_err() {
            error!("the outage buffer thread is gone");
            return;
        }
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            if let Ok(v) = rx.await {
                let _ = done.send(wrap(v));
            }
        });
    }

    fn on_done(&mut self, d: Done, retry_at: &mut Option<tokio::time::Instant>) {
        match d {
            Done::Persisted(Ok(records)) => {
                self.appending = false;
                self.core.handle_persisted(records);
            }
            Done::Persisted(Err((error, batch))) => {
                self.appending = false;
                self.metrics.buffer_errors.inc();
                error!(%error, records = batch.len(), "cannot persist records; retrying in 1 s (they are kept in memory meanwhile)");
                self.core.restore_unpersisted(batch);
                *retry_at = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            Done::Read {
                conn,
                through,
                result,
            } => match (result, &self.current) {
                (Ok(records), Some(c)) if c.id == conn => {
                    let _ = c.writer.backlog.send((records, through));
                }
                (Err(error), Some(c)) if c.id == conn => {
                    self.metrics.buffer_errors.inc();
                    error!(%error, "cannot read the backlog; reconnecting to retry");
                    self.drop_connection();
                }
                _ => {}
            },
            Done::Oldest(Ok(at_ms)) => {
                let age = at_ms.map_or(0.0, |at| age_s(unix_ms(), at));
                self.metrics.buffer_oldest_age.set(age);
            }
            Done::Oldest(Err(error)) => {
                self.metrics.buffer_errors.inc();
                warn!(%error, "cannot read the oldest unacknowledged record; will look again");
            }
            Done::Compacted(result) => {
                self.compacting = false;
                match result {
                    Ok(Some(gap)) => {
                        self.metrics.dropped.inc_by(gap.dropped());
                        warn!(
                            downsampled = gap.summaries_downsampled,
                            summaries_dropped = gap.summaries_dropped,
                            events_dropped = gap.events_dropped,
                            "outage buffer near its bound; thinned out older records (the hub is told by a gap record)"
                        );
                    }
                    Ok(None) => {}
                    Err(error) => {
                        self.metrics.buffer_errors.inc();
                        error!(%error, "cannot compact the outage buffer");
                    }
                }
            }
        }
    }

    fn on_input(&mut self, input: Input) {
        let is_current = |c: &Option<Current>, id| c.as_ref().is_some_and(|c| c.id == id);
        match input {
            Input::Connected {
                conn,
                hub,
                acked,
                writer,
            } => {
                self.core.handle_connected(acked);
                if let Some(old) = self.current.replace(Current {
                    id: conn,
                    hub,
                    writer,
                }) {
                    old.writer.cancel.cancel();
                }
            }
            Input::Ack { conn, through } if is_current(&self.current, conn) => {
                match self.core.handle_ack(Instant::now(), through) {
                    Ok(Some(t)) => self.to_delete.push_back((Instant::now(), t)),
                    Ok(None) => {}
                    Err(error) => {
                        warn!(%error, "hub broke the uplink protocol; reconnecting");
                        self.drop_connection();
                    }
                }
            }
            Input::BacklogSent { conn, through } if is_current(&self.current, conn) => {
                self.core.handle_backlog_sent(through);
            }
            Input::Disconnected { conn } if is_current(&self.current, conn) => {
                self.drop_connection();
            }
            _ => {} // news from a connection already replaced
        }
    }

    /// Deletes what was acknowledged more than `keep_acked` ago.
    fn delete_old_acked(&mut self, now: Instant) {
        let mut through = None;
        while let Some(&(at, t)) = self.to_delete.front() {
            if now.saturating_duration_since(at) < self.keep_acked {
                break;
            }
            through = Some(t);
            self.to_delete.pop_front();
        }
        if let Some(t) = through {
            let _ = self.buffer.send(BufferCmd::Delete { through: t });
            self.core.handle_deleted(t);
        }
    }

    fn drop_connection(&mut self) {
        if let Some(c) = self.current.take() {
            c.writer.cancel.cancel();
        }
        self.core.handle_disconnected();
    }

    /// Hands the core's output to the buffer and the writer, and publishes
    /// figures.
    fn flush(&mut self, may_append: bool) {
        if may_append && !self.appending {
            let batch = self.core.poll_persist();
            if !batch.is_empty() {
                self.appending = true;
                let (reply, rx) = oneshot::channel();
                self.to_buffer(BufferCmd::Append { batch, reply }, rx, Done::Persisted);
            }
        }
        let now = Instant::now();
        while let Some(t) = self.core.poll_transmit(now) {
            let Some(c) = &self.current else { break };
            match t {
                Transmit::Record(r) => {
                    let _ = c.writer.live.send(r);
                }
                Transmit::Backlog { after, through } => {
                    let (reply, rx) = oneshot::channel();
                    let conn = c.id;
                    let cmd = BufferCmd::Read {
                        after,
                        through,
                        max_bytes: 64 * 1024,
                        reply,
                    };
                    self.to_buffer(cmd, rx, move |result| Done::Read {
                        conn,
                        through,
                        result,
                    });
                }
            }
        }
        let s = self.core.stats();
        self.metrics
            .records_made
            .inc_by(s.records_made - self.seen_made);
        self.seen_made = s.records_made;
        self.metrics
            .persisted_through
            .set(s.persisted_through as i64);
        self.metrics.acked_through.set(s.acked_through as i64);
        self.metrics.backlog_left.set(s.backlog_left as i64);
        self.metrics
            .connected
            .set(i64::from(self.current.is_some()));
        let summary = self.core.last_summary_at();
        let hub = self.current.as_ref().map(|c| c.hub.clone());
        self.local.send_if_modified(|l| {
            let next = LocalState {
                summary: summary.clone(),
                hub: hub.clone(),
                persisted_through: s.persisted_through,
                acked_through: s.acked_through,
                hidden: self.core.hidden().clone(),
            };
            let changed = l.hub != next.hub
                || l.hidden != next.hidden
                || l.persisted_through != next.persisted_through
                || l.acked_through != next.acked_through
                || l.summary.as_ref().map(|(_, t)| *t) != next.summary.as_ref().map(|(_, t)| *t);
            *l = next;
            changed
        });
    }
}

/// Seconds from `at_ms` to `now_ms`; 0 for a time ahead of the clock (it
/// moved back), so that a gauge never goes negative.
fn age_s(now_ms: u64, at_ms: u64) -> f64 {
    now_ms.saturating_sub(at_ms) as f64 / 1000.0
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How the uplink behaves, from `[uplink]`.
#[derive(Clone)]
struct UplinkSettings {
    hubs: Vec<String>,
    stream: u64,
    max_backoff: Duration,
    replay_bytes_per_s: u64,
    failover_after: Duration,
    failback_every: Duration,
    /// What the core task says; the members it leaves out of the views
    /// are left out of what the hub is told too.
    local: watch::Receiver<LocalState>,
}

/// How a session ended.
enum Ended {
    /// The connection ended (or never came up); the hub last answered at
    /// `last_heard` on it, if it did.
    Lost { last_heard: Option<Instant> },
    /// An earlier hub in the list answers again: go back to it.
    FailBack(usize),
}

/// Keeps a connection to the preferred reachable hub, forever (until
/// shutdown).
#[allow(clippy::too_many_arguments)]
async fn uplink_task(
    endpoint: MeshEndpoint,
    settings: UplinkSettings,
    inputs: mpsc::Sender<Input>,
    gossip: Arc<Gossip>,
    config: Arc<ConfigCache>,
    artifacts: Arc<ArtifactCache>,
    revocations: Arc<RevocationStore>,
    uplink_conn: watch::Sender<Option<quinn::Connection>>,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    let hubs = &settings.hubs;
    let mut choice = HubChoice::new(
        hubs.len(),
        settings.failover_after,
        settings.failback_every,
        Instant::now(),
    );
    let mut attempt = 0u32;
    let mut conn_id = 0u64;
    let mut previous = 0usize;
    while !shutdown.is_cancelled() {
        let index = choice.next(Instant::now());
        if index != previous {
            warn!(
                from = %hubs[previous],
                to = %hubs[index],
                after = ?settings.failover_after,
                "hub unreachable; failing over to the next one"
            );
            previous = index;
            attempt = 0;
        }
        conn_id += 1;
        let tried = Instant::now();
        let failback: Vec<(usize, String)> = (0..index).map(|i| (i, hubs[i].clone())).collect();
        let s = Session {
            endpoint: &endpoint,
            stream: settings.stream,
            conn_id,
            replay_bytes_per_s: settings.replay_bytes_per_s,
            failback_every: settings.failback_every,
            inputs: &inputs,
            gossip: &gossip,
            config: &config,
            artifacts: &artifacts,
            revocations: &revocations,
            local: &settings.local,
            uplink_conn: &uplink_conn,
            metrics: &metrics,
            shutdown: &shutdown,
        };
        let hub = &hubs[index];
        let ended = s.run(hub, failback).await;
        let _ = inputs.send(Input::Disconnected { conn: conn_id }).await;
        match ended {
            Ok(Ended::FailBack(i)) => {
                info!(from = %hub, to = %hubs[i], "an earlier hub answers again; going back to it");
                choice.fail_back(i, Instant::now());
                previous = i;
                attempt = 0;
                continue;
            }
            Ok(Ended::Lost { last_heard }) => {
                info!(%hub, "uplink closed");
                choice.handle_ended(last_heard, tried);
                attempt = next_attempt(attempt, last_heard, tried);
            }
            Err(error) => {
                warn!(%hub, %error, "uplink failed");
                choice.handle_ended(None, tried);
                attempt = attempt.saturating_add(1);
            }
        }
        let wait = full_jitter(attempt, settings.max_backoff, rand::random::<f64>());
        debug!(?wait, "waiting before the next connection attempt");
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

struct Session<'a> {
    endpoint: &'a MeshEndpoint,
    stream: u64,
    conn_id: u64,
    replay_bytes_per_s: u64,
    failback_every: Duration,
    inputs: &'a mpsc::Sender<Input>,
    gossip: &'a Arc<Gossip>,
    config: &'a Arc<ConfigCache>,
    artifacts: &'a Arc<ArtifactCache>,
    revocations: &'a Arc<RevocationStore>,
    local: &'a watch::Receiver<LocalState>,
    /// The connection of the session, for the artifact fetches.
    uplink_conn: &'a watch::Sender<Option<quinn::Connection>>,
    metrics: &'a RelayMetrics,
    shutdown: &'a CancellationToken,
}

async fn resolve(hub: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(hub)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{hub} resolves to no address"))
}

impl Session<'_> {
    /// Connects to `hub` and speaks until the connection ends, or until one
    /// of the `failback` hubs (earlier in the list) answers a look.
    async fn run(&self, hub: &str, failback: Vec<(usize, String)>) -> anyhow::Result<Ended> {
        let addr = resolve(hub).await?;
        let (conn, peer) = self.endpoint.connect(addr, Protocol::Uplink).await?;
        let cancel = self.shutdown.child_token();
        let heard = Arc::new(Mutex::new(None));
        let back = Arc::new(Mutex::new(None));
        if !failback.is_empty() {
            tokio::spawn(look_for_earlier_hubs(
                self.endpoint.clone(),
                failback,
                self.failback_every,
                back.clone(),
                cancel.clone(),
            ));
        }
        self.uplink_conn.send_replace(Some(conn.clone()));
        let result = self.speak(&conn, addr, &peer.name, &heard, &cancel).await;
        self.uplink_conn.send_replace(None);
        cancel.cancel();
        conn.close(close::DONE, b"bye");
        let last_heard = *heard.lock().expect("not poisoned");
        if let Some(i) = *back.lock().expect("not poisoned") {
            return Ok(Ended::FailBack(i));
        }
        match result {
            Ok(()) => Ok(Ended::Lost { last_heard }),
            Err(e) if last_heard.is_some() => {
                debug!(error = %e, "uplink ended");
                Ok(Ended::Lost { last_heard })
            }
            Err(e) => Err(e),
        }
    }

    async fn speak(
        &self,
        conn: &quinn::Connection,
        addr: SocketAddr,
        hub_name: &str,
        heard: &Arc<Mutex<Option<Instant>>>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = RelayMsg::Hello {
            stream: self.stream,
        };
        wire::write_msg(&mut send, UPLINK_VERSION, &hello, MAX_UPLINK_FRAME).await?;
        let welcome = tokio::time::timeout(
            IO_TIMEOUT,
            wire::read_msg::<HubMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no welcome from the hub within {IO_TIMEOUT:?}"))??;
        let Some(HubMsg::Welcome { hub, acked }) = welcome else {
            anyhow::bail!("hub did not start with a welcome: {welcome:?}");
        };
        info!(%hub, %addr, certificate = %hub_name, resume_after = acked, "uplink connected");
        *heard.lock().expect("not poisoned") = Some(Instant::now());
        let (live_tx, live_rx) = mpsc::unbounded_channel();
        let (backlog_tx, backlog_rx) = mpsc::unbounded_channel();
        self.inputs
            .send(Input::Connected {
                conn: self.conn_id,
                hub,
                acked,
                writer: Writer {
                    live: live_tx,
                    backlog: backlog_tx,
                    cancel: cancel.clone(),
                },
            })
            .await?;
        tokio::spawn(read_acks(
            recv,
            self.conn_id,
            self.inputs.clone(),
            heard.clone(),
            cancel.clone(),
        ));
        tokio::spawn(answer_requests(
            conn.clone(),
            self.gossip.clone(),
            self.config.clone(),
            self.artifacts.clone(),
            self.revocations.clone(),
            self.local.clone(),
            self.inputs.clone(),
            self.metrics.clone(),
            cancel.clone(),
        ));
        write_records(
            send,
            live_rx,
            backlog_rx,
            self.replay_bytes_per_s,
            self.conn_id,
            self.inputs.clone(),
            self.metrics.backlog_sent.clone(),
            cancel.clone(),
        )
        .await
    }
}

/// Writes live records at once and backlog chunks paced by a token bucket,
/// counting the backlog records written in `backlog_sent`.
#[allow(clippy::too_many_arguments)]
async fn write_records(
    mut send: quinn::SendStream,
    mut live: mpsc::UnboundedReceiver<Record>,
    mut backlog: mpsc::UnboundedReceiver<(Vec<Record>, u64)>,
    bytes_per_s: u64,
    conn: u64,
    inputs: mpsc::Sender<Input>,
    backlog_sent: Counter,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let mut bucket = TokenBucket::new(bytes_per_s, Instant::now());
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            r = live.recv() => {
                let Some(r) = r else { return Ok(()) };
                write_record(&mut send, r, &cancel).await?;
            }
            chunk = backlog.recv() => {
                let Some((records, through)) = chunk else { return Ok(()) };
                let mut last = through;
                for r in records {
                    // Live records jump the queue between backlog records.
                    while let Ok(l) = live.try_recv() {
                        write_record(&mut send, l, &cancel).await?;
                    }
                    let frame = frame_of(r.clone())?;
                    let wait = bucket.take(frame.len() as u64, Instant::now());
                    if !wait.is_zero() {
                        tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                    last = r.until().min(through);
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        w = wire::write_frame(&mut send, &frame) => w?,
                    }
                    backlog_sent.inc();
                }
                // An empty chunk means nothing is left up to `through`.
                inputs.send(Input::BacklogSent { conn, through: last }).await?;
            }
        }
    }
}

fn frame_of(r: Record) -> Result<Vec<u8>, WireError> {
    wire::encode(
        UPLINK_VERSION,
        &RelayMsg::Record(Box::new(r)),
        MAX_UPLINK_FRAME,
    )
}

async fn write_record(
    send: &mut quinn::SendStream,
    r: Record,
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let frame = frame_of(r)?;
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Ok(()),
        w = wire::write_frame(send, &frame) => Ok(w?),
    }
}

/// Every `every`, tries the hubs earlier in the list (best first); the
/// first that completes a handshake ends the session so the relay goes
/// back to it.
async fn look_for_earlier_hubs(
    endpoint: MeshEndpoint,
    hubs: Vec<(usize, String)>,
    every: Duration,
    found: Arc<Mutex<Option<usize>>>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        for (i, hub) in &hubs {
            let Ok(addr) = resolve(hub).await else {
                continue;
            };
            let probe = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                p = endpoint.connect(addr, Protocol::Uplink) => p,
            };
            if let Ok((conn, _)) = probe {
                conn.close(close::DONE, b"just looking");
                *found.lock().expect("not poisoned") = Some(*i);
                cancel.cancel();
                return;
            }
        }
    }
}

async fn read_acks(
    mut recv: quinn::RecvStream,
    conn: u64,
    inputs: mpsc::Sender<Input>,
    heard: Arc<Mutex<Option<Instant>>>,
    cancel: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            m = wire::read_msg::<HubMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME) => m,
        };
        match msg {
            Ok(Some(HubMsg::Ack { through })) => {
                *heard.lock().expect("not poisoned") = Some(Instant::now());
                if inputs.send(Input::Ack { conn, through }).await.is_err() {
                    break;
                }
            }
            Ok(Some(other)) => {
                warn!(msg = ?other, "unexpected message from the hub; reconnecting");
                break;
            }
            Ok(None) => break,
            Err(error) => {
                debug!(%error, "uplink read ended");
                break;
            }
        }
    }
    cancel.cancel();
}

/// The relay's configuration bundle: on disk, served to the site, offered
/// in gossip.
struct ConfigCache {
    path: std::path::PathBuf,
    trust: Credentials,
    served: watch::Sender<trellis_node::distribute::Served>,
    /// One push stored at a time.
    storing: tokio::sync::Mutex<()>,
}

impl ConfigCache {
    fn current(&self) -> Option<Offer> {
        self.served.borrow().as_ref().map(|c| c.0)
    }

    /// Checks, stores durably, serves and announces a bundle the hub
    /// pushed as `offer`.
    async fn take(
        &self,
        offer: Offer,
        signed: SignedBundle,
        gossip: &Gossip,
    ) -> Result<(), String> {
        let _one = self.storing.lock().await;
        let checked = configcache::offer_of(&self.trust, &signed)
            .map_err(|e| format!("refused the pushed bundle: {e}"))?;
        if checked != offer {
            return Err(format!(
                "the pushed bundle is version {} ({}), not the version {} offered",
                checked.version,
                &hex32(&checked.digest)[..16],
                offer.version
            ));
        }
        if !configcache::takes(self.current().as_ref(), &offer) {
            return Ok(());
        }
        let path = self.path.clone();
        let to_store = signed.clone();
        tokio::task::spawn_blocking(move || configcache::store(&path, &to_store))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.served.send_replace(Some(Arc::new((offer, signed))));
        announce(gossip, Some(offer)).await;
        info!(version = offer.version, digest = %&hex32(&offer.digest)[..16], "configuration cached; offering it to the site");
        Ok(())
    }
}

async fn announce(gossip: &Gossip, offer: Option<Offer>) {
    let kv = offer
        .map(|o| (trellis_node::distribute::keys::OFFER.to_owned(), o.encode()))
        .into_iter()
        .collect();
    gossip.set(kv, trellis_node::distribute::keys::OFFER).await;
}

/// Stages a rollout's patch (fetching what is missing) and hands the
/// order to the core task, which keeps it on disk before this answers.
async fn take_order(
    artifacts: &Arc<ArtifactCache>,
    inputs: &mpsc::Sender<Input>,
    order: SiteOrder,
) -> Result<Response, String> {
    let run = order.run;
    let missing = artifacts.stage((*order.patch).clone()).await?;
    let ready = missing == 0;
    let (reply, rx) = oneshot::channel();
    inputs
        .send(Input::Order {
            order: Box::new(order),
            ready,
            reply,
        })
        .await
        .map_err(|_| "the relay is shutting down".to_owned())?;
    rx.await
        .map_err(|_| "the relay is shutting down".to_owned())??;
    Ok(Response::RolloutTaken { run, ready })
}

#[allow(clippy::too_many_arguments)]
async fn answer_requests(
    conn: quinn::Connection,
    gossip: Arc<Gossip>,
    config: Arc<ConfigCache>,
    artifacts: Arc<ArtifactCache>,
    revocations: Arc<RevocationStore>,
    local: watch::Receiver<LocalState>,
    inputs: mpsc::Sender<Input>,
    metrics: RelayMetrics,
    cancel: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            s = conn.accept_bi() => s,
        };
        let Ok((mut send, mut recv)) = stream else {
            break;
        };
        let gossip = gossip.clone();
        let metrics = metrics.clone();
        let config = config.clone();
        let artifacts = artifacts.clone();
        let revocations = revocations.clone();
        let local = local.clone();
        let inputs = inputs.clone();
        tokio::spawn(async move {
            let request = tokio::time::timeout(
                IO_TIMEOUT,
                wire::read_msg::<Request>(&mut recv, UPLINK_VERSION, MAX_REQUEST),
            )
            .await
            .unwrap_or(Err(WireError::Stream("timed out".into())));
            let response = match request {
                Ok(Some(Request::Nodes)) => {
                    metrics.requests.inc();
                    let view = gossip.view().await;
                    let hidden = local.borrow().hidden.clone();
                    Response::Nodes(
                        view.current_members()
                            .into_iter()
                            .filter(|m| !hidden.contains(&m.name))
                            .cloned()
                            .collect(),
                    )
                }
                Ok(Some(Request::ConfigOffer(offer))) => {
                    let wanted = configcache::takes(config.current().as_ref(), &offer);
                    let said = wire::write_msg(
                        &mut send,
                        UPLINK_VERSION,
                        &Response::ConfigWanted(wanted),
                        MAX_UPLINK_FRAME,
                    )
                    .await;
                    if !wanted || said.is_err() {
                        let _ = send.finish();
                        return;
                    }
                    let pushed = tokio::time::timeout(
                        PUSH_TIMEOUT,
                        wire::read_msg::<Request>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
                    )
                    .await
                    .unwrap_or(Err(WireError::Stream("timed out".into())));
                    match pushed {
                        Ok(Some(Request::ConfigBundle(b))) => {
                            match config.take(offer, *b, &gossip).await {
                                Ok(()) => Response::ConfigStored(offer),
                                Err(reason) => {
                                    warn!(version = offer.version, %reason, "configuration push not taken");
                                    Response::Error(reason)
                                }
                            }
                        }
                        Ok(other) => Response::Error(format!(
                            "expected the configuration bundle, got {other:?}"
                        )),
                        Err(error) => {
                            warn!(%error, "bad configuration push from the hub");
                            Response::Error(format!("bad bundle frame: {error}"))
                        }
                    }
                }
                Ok(Some(Request::PatchStage(signed))) => match artifacts.stage(*signed).await {
                    Ok(fetching) => Response::PatchStaged { fetching },
                    Err(reason) => {
                        warn!(%reason, "patch not staged");
                        Response::Error(reason)
                    }
                },
                Ok(Some(Request::RolloutOrder(order))) => {
                    match take_order(&artifacts, &inputs, *order).await {
                        Ok(r) => r,
                        Err(reason) => {
                            warn!(%reason, "rollout order not taken");
                            Response::Error(reason)
                        }
                    }
                }
                Ok(Some(Request::ConfigBundle(_))) => {
                    Response::Error("a configuration bundle must follow an offer".into())
                }
                Ok(Some(Request::Revocations(list))) => match revocations.take(list).await {
                    Ok((entries, digest)) => Response::RevocationsTaken { entries, digest },
                    Err(reason) => {
                        error!(%reason, "revocation list not taken");
                        Response::Error(reason)
                    }
                },
                Ok(None) => return,
                Err(error) => {
                    warn!(%error, "bad request from the hub");
                    Response::Error(format!("bad request: {error}"))
                }
            };
            let frame = wire::encode(UPLINK_VERSION, &response, MAX_UPLINK_FRAME).or_else(|e| {
                wire::encode(
                    UPLINK_VERSION,
                    &Response::Error(format!("response too large: {e}")),
                    MAX_UPLINK_FRAME,
                )
            });
            if let Ok(frame) = frame {
                let _ = wire::write_frame(&mut send, &frame).await;
                let _ = send.finish();
            }
        });
    }
}

/// A running relay.
pub struct Relay {
    member: SiteMember,
    metrics_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay (with `cfg.buffer.path` taken as is: relative to the
    /// working directory). Returns once everything is bound; runs until
    /// `shutdown` is cancelled.
    pub async fn start(
        creds: Credentials,
        cfg: RelayConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        if creds.identity.role != Role::Relay {
            return Err(StartError::Other(format!(
                "{} holds a {} certificate; a relay needs one issued with --role relay",
                creds.identity.name, creds.identity.role
            )));
        }
        let (buffer, notes) = tokio::task::spawn_blocking({
            let cfg = cfg.buffer.clone();
            move || OutageBuffer::open(&cfg.path, cfg.max_bytes, cfg.downsample)
        })
        .await
        .expect("buffer open does not panic")
        .map_err(|e| StartError::Other(format!("{e}; check [buffer] path")))?;
        for note in &notes {
            match note {
                crate::buffer::OpenNote::MovedAside { .. } => error!("{note}"),
                _ => info!("{note}"),
            }
        }
        let identity = creds.identity.clone();
        let mut registry = Registry::default();
        let trust = creds.clone();
        let mut member = SiteMember::start(
            creds,
            &Default::default(),
            &cfg.gossip,
            &cfg.health,
            &cfg.checks,
            &mut registry,
            &shutdown,
        )
        .await?;
        let relay_metrics = RelayMetrics::register(&mut registry);
        let artifact_metrics = ArtifactMetrics::register(&mut registry);
        let gossip = member.gossip.clone();
        let cache_path = configcache::cache_path(&cfg.buffer.path);
        let cached = {
            let (path, trust) = (cache_path.clone(), trust.clone());
            tokio::task::spawn_blocking(move || configcache::load(&path, &trust))
                .await
                .expect("cache load does not panic")
        };
        let cached = match cached {
            Ok(c) => c,
            Err(error) => {
                error!(%error, "configuration cache not used");
                None
            }
        };
        if let Some((offer, _)) = &cached {
            info!(version = offer.version, path = %cache_path.display(), "offering the cached configuration to the site");
        }
        announce(&gossip, cached.as_ref().map(|c| c.0)).await;
        let (served_tx, served_rx) = watch::channel(cached.map(Arc::new));
        let (uplink_conn_tx, uplink_conn_rx) = watch::channel(None);
        let enrol_addr = match cfg.enrol.listen {
            Some(listen) => {
                let queue = crate::enrolment::EnrolQueue::open(
                    crate::enrolment::queue_dir(&cfg.buffer.path),
                    uplink_conn_rx.clone(),
                )
                .map_err(StartError::Other)?;
                let site = (identity.region.clone(), identity.site.clone());
                Some(
                    crate::enrolment::serve(
                        listen,
                        &trust,
                        site,
                        Arc::new(queue),
                        shutdown.child_token(),
                    )
                    .map_err(StartError::Other)?,
                )
            }
            None => None,
        };
        if let Some(hub) = cfg.renewal.hub.clone() {
            tokio::spawn(trellis_node::agent::renew_certificate(
                trellis_node::agent::RenewFrom::Hub(hub),
                trust.clone(),
                cfg.identity.files(),
                cfg.renewal.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(mut addr) = enrol_addr {
            // Where the site's nodes renew their certificates (at the
            // address they reach the relay's gossip on, if bound to all).
            if addr.ip().is_unspecified() {
                addr.set_ip(gossip.advertise_addr().ip());
            }
            gossip
                .set(
                    vec![(trellis_node::enrol::GOSSIP_KEY.to_owned(), addr.to_string())],
                    trellis_node::enrol::GOSSIP_KEY,
                )
                .await;
        }

        let artifacts = Arc::new(
            ArtifactCache::open(
                &patches_dir(&cfg.buffer.path),
                trust.clone(),
                uplink_conn_rx,
                artifact_metrics,
                shutdown.child_token(),
            )
            .map_err(|e| StartError::Other(format!("{e}; check [buffer] path")))?,
        );
        // The site's nodes fetch the manifests and chunks from the same store.
        let fetch_chunks = Arc::new(artifacts.files());
        // The site's runbook leases: at most so many nodes remediate at once.
        let leases = Arc::new(
            trellis_node::distribute::LeaseBook::open(&runbook_leases_path(&cfg.buffer.path))
                .map_err(StartError::Other)?,
        );
        let config = Arc::new(ConfigCache {
            path: cache_path,
            trust: trust.clone(),
            served: served_tx,
            storing: tokio::sync::Mutex::new(()),
        });
        let metrics_addr =
            serve_metrics(&cfg.metrics, Arc::new(registry), shutdown.child_token()).await?;

        let stream = buffer.stream();
        let latest = buffer
            .latest_summary()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let deleted = buffer
            .first_seq()
            .map_err(|e| StartError::Other(e.to_string()))?
            .map_or(buffer.last_seq(), |f| f - 1);
        let mut core = RelayCore::new(
            identity.name.clone(),
            cfg.core(),
            deleted,
            buffer.last_seq(),
            latest,
        );
        let revocations = Arc::new(
            RevocationStore::open(
                crate::revocations::path(&cfg.buffer.path),
                trust.clone(),
                gossip.clone(),
            )
            .await
            .map_err(StartError::Other)?,
        );
        let rollout_path = crate::rollout::rollout_path(&cfg.buffer.path);
        let rollout = crate::rollout::load(&rollout_path).map_err(StartError::Other)?;
        let ready_run = rollout
            .as_ref()
            .filter(|r| artifacts.holds_whole(&r.order.patch))
            .map(|r| r.order.run);
        if let Some(r) = &rollout {
            info!(
                run = r.order.run,
                rolling_back = r.rolling_back(),
                ready = ready_run.is_some(),
                "site rollout taken back from disk"
            );
        }
        core.restore_rollout(rollout.clone());
        let reaped_path = crate::departures::reaped_path(&cfg.buffer.path);
        core.restore_reaped(
            crate::departures::load_reaped(&reaped_path).map_err(StartError::Other)?,
        );
        let stats = Arc::new(Mutex::new(buffer.stats()));
        {
            let s = buffer.stats();
            relay_metrics.buffer_records.set(s.rows as i64);
            relay_metrics.buffer_bytes.set(s.bytes as i64);
        }
        let buffer_tx = spawn_buffer_thread(buffer, stats.clone());
        let (local_tx, local_rx) = watch::channel(LocalState::default());
        let (input_tx, input_rx) = mpsc::channel(256);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let task = CoreTask {
            core,
            gossip: gossip.clone(),
            buffer: buffer_tx,
            done_tx,
            metrics: relay_metrics.clone(),
            local: local_tx,
            current: None,
            appending: false,
            compacting: false,
            seen_made: 0,
            to_delete: std::collections::VecDeque::new(),
            keep_acked: cfg.buffer.keep_acked,
            rollout_path,
            ready_run,
            // The list as published, not as enforced: a decommissioned
            // node leaves the views at once, before its grace ends.
            revocations: revocations.published(),
            departed_from: None,
            region: identity.region.clone(),
            site: identity.site.clone(),
            reaped_path,
        };
        if let Some(r) = &rollout {
            task.publish_order(r).await;
        }
        let mut tasks = vec![
            tokio::spawn(task.run(
                cfg.uplink.sample_interval,
                input_rx,
                done_rx,
                shutdown.child_token(),
            )),
            tokio::spawn(uplink_task(
                member.endpoint.clone(),
                UplinkSettings {
                    hubs: cfg.uplink.hubs.clone(),
                    stream,
                    max_backoff: cfg.uplink.max_backoff,
                    replay_bytes_per_s: cfg.uplink.replay_bytes_per_s,
                    failover_after: cfg.uplink.failover_after,
                    failback_every: cfg.uplink.failback_every,
                    local: local_rx.clone(),
                },
                input_tx,
                gossip.clone(),
                config,
                artifacts,
                revocations,
                uplink_conn_tx,
                relay_metrics.clone(),
                shutdown.child_token(),
            )),
            tokio::spawn(trellis_node::distribute::serve(
                member.routes.take(Protocol::Fetch),
                served_rx,
                Some(fetch_chunks),
                Some(leases),
                member.endpoint.metrics().clone(),
                shutdown.child_token(),
            )),
        ];
        // Buffer figures for /metrics, refreshed once a second.
        {
            let (stats, m, sd) = (stats.clone(), relay_metrics, shutdown.child_token());
            tasks.push(tokio::spawn(async move {
                let mut tick = ticker(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        biased;
                        _ = sd.cancelled() => break,
                        _ = tick.tick() => {
                            let s = *stats.lock().expect("not poisoned");
                            m.buffer_records.set(s.rows as i64);
                            m.buffer_bytes.set(s.bytes as i64);
                            m.buffer_fsyncs.set(s.fsyncs as i64);
                        }
                    }
                }
            }));
        }
        let api_addr = if cfg.api.enabled {
            let listener = tokio::net::TcpListener::bind(cfg.api.listen)
                .await
                .map_err(|e| {
                    StartError::Other(format!(
                        "cannot serve the relay API on {}: {e} (set [api] listen, or enabled = false)",
                        cfg.api.listen
                    ))
                })?;
            let addr = listener
                .local_addr()
                .map_err(|e| StartError::Other(e.to_string()))?;
            let app = api_router(ApiState {
                name: identity.name.clone(),
                region: identity.region.clone(),
                site: identity.site.clone(),
                gossip: gossip.clone(),
                local: local_rx,
                buffer: stats,
            });
            let sd = shutdown.child_token();
            tasks.push(tokio::spawn(async move {
                let limits = trellis_node::http::Limits::api();
                if let Err(error) =
                    trellis_node::http::serve(listener, app, limits, "api", sd).await
                {
                    warn!(%error, "relay API stopped");
                }
            }));
            Some(addr)
        } else {
            None
        };
        info!(
            %identity,
            gossip = %member.gossip.advertise_addr(),
            hubs = ?cfg.uplink.hubs,
            stream,
            api = %api_addr.map_or("off".to_owned(), |a| format!("http://{a}")),
            metrics = %metrics_addr.map_or("off".to_owned(), |a| a.to_string()),
            enrol = %enrol_addr.map_or("off".to_owned(), |a| a.to_string()),
            "relay ready"
        );
        Ok(Relay {
            member,
            metrics_addr,
            api_addr,
            tasks,
        })
    }

    /// The address the site reaches this relay at (nodes' seed).
    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.gossip.advertise_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    pub fn gossip(&self) -> &Gossip {
        &self.member.gossip
    }

    /// Waits for the relay's tasks to end after shutdown, then leaves
    /// gossip and closes the endpoint.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        self.member.stopped().await;
    }
}

impl trellis_node::cli::Running for Relay {
    async fn stopped(self) {
        Relay::stopped(self).await
    }
}

/// Where the relay keeps the site's runbook leases: next to its buffer.
pub fn runbook_leases_path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("runbook-leases.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::backoff_bound;

    #[test]
    fn a_record_age_is_in_seconds_and_never_negative() {
        assert_eq!(age_s(10_500, 1_000), 9.5);
        assert_eq!(age_s(1_000, 1_000), 0.0);
        // The wall clock went back: the record is not from the future.
        assert_eq!(age_s(1_000, 5_000), 0.0);
    }

    #[test]
    fn backoff_is_random_below_a_bound_that_doubles_up_to_the_maximum() {
        let max = Duration::from_secs(30);
        let wait = |attempt| full_jitter(attempt, max, rand::random::<f64>());
        for attempt in 0..20 {
            for _ in 0..50 {
                assert!(wait(attempt) <= backoff_bound(attempt, max));
            }
        }
        // Random: a thousand relays do not all pick the same wait.
        let waits: std::collections::BTreeSet<_> = (0..100).map(|_| wait(10)).collect();
        assert!(waits.len() > 50, "{waits:?}");
    }
}
