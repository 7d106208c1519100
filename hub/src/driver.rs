//! The hub process: the QUIC endpoint relays connect to, the task that owns
//! the [`HubCore`], the store's writer thread, and the HTTP API.
//!
//! Each relay connection has a reader task (frames → channel) and a task
//! that takes whatever records have arrived, asks the core task to apply
//! them and writes the ack it returns. The core task gathers the records of
//! every connection that are waiting, takes the new ones, has the store
//! commit them in one transaction, and only then applies them to the fleet
//! view and answers with acks (persist, then acknowledge).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trellis_node::agent::StartError;
use trellis_node::authz::Protocol;
use trellis_node::bundle::SignedBundle;
use trellis_node::clock::{ticker, unix_ms};
use trellis_node::distribute::{Offer, Served as ConfigHead, hex32};
use trellis_node::endpoint::{Accepted, MeshEndpoint, close};
use trellis_node::gossip::{Cluster, Gossip};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::{MeshMetrics, Registry};
use trellis_node::site::MemberView;
use trellis_node::tls::Credentials;
use trellis_node::wire::{self, WireError};
use trellis_relay::report::FleetReport;
use trellis_relay::summary::{SiteKey, SiteSummary};
use trellis_relay::uplink::{
    HubMsg, MAX_UPLINK_FRAME, Record, RelayMsg, Request, Response, UPLINK_VERSION,
};

use crate::api;
use crate::config::HubConfig;
use crate::core::{Coverage, Fresh, HubCore, RecordError, Served};
use crate::log::{Entry, LogCore, Op, SignedEntry, VersionVector, Winner, hex};
use crate::peering::{Peering, PeeringSettings, federation_task, push_task, serve_replication};
use crate::replication::ReplClient;
use crate::store::{Batch, HubStore, StoreError, StoreReader, StoredRecord, stored};

pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a relay to take a pushed configuration bundle (a few
/// MiB over a slow WAN, then an fsync).
pub(crate) const PUSH_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait between attempts to push a configuration to a relay.
const MAX_PUSH_BACKOFF: Duration = Duration::from_secs(30);
/// Audit notes waiting to be written, at most (past it, notes are dropped
/// and logged: the events themselves stay in the store).
const NOTES_QUEUE: usize = 65_536;
/// Records a connection hands to the core task at once, at most.
const MAX_RECORDS_PER_INPUT: usize = 256;
/// Inputs the core task gathers into one commit, at most.
const MAX_INPUTS_PER_COMMIT: usize = 512;

/// The hub's own metrics.
#[derive(Clone, Default)]
struct HubMetrics {
    relays_connected: Gauge,
    records_applied: Counter,
    duplicates: Counter,
    rejected: Counter,
    commits: Counter,
    store_errors: Counter,
}

impl HubMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = HubMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis_hub");
        r.register(
            "relays_connected",
            "Relay uplinks connected now",
            m.relays_connected.clone(),
        );
        r.register(
            "records_applied",
            "Relay records stored and applied",
            m.records_applied.clone(),
        );
        r.register(
            "duplicate_records",
            "Relay records received again and ignored",
            m.duplicates.clone(),
        );
        r.register(
            "rejected_records",
            "Relay records refused (wrong site, no hello, bad seq)",
            m.rejected.clone(),
        );
        r.register(
            "store_commits",
            "Transactions committed to the store (each one fsync)",
            m.commits.clone(),
        );
        r.register(
            "store_errors",
            "Commits that failed (nothing was acknowledged)",
            m.store_errors.clone(),
        );
        m
    }
}

/// Why records were not acknowledged.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApplyError {
    #[error(transparent)]
    Refused(#[from] RecordError),
    #[error("the hub cannot store records: {0}")]
    Store(String),
}

/// Requests to the core task.
pub(crate) enum Input {
    Hello {
        relay: Identity,
        stream: u64,
        conn: u64,
        reply: oneshot::Sender<u64>,
    },
    Records {
        relay: Identity,
        records: Vec<Record>,
        reply: oneshot::Sender<Result<u64, ApplyError>>,
    },
    /// Records another hub stored; answered once they are durable here.
    Replicated {
        records: Vec<StoredRecord>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Disconnected {
        relay: Identity,
        conn: u64,
    },
    Fleet {
        reply: oneshot::Sender<FleetReport>,
    },
    /// What the other hubs say they serve.
    Peers {
        served: Vec<(SiteKey, Served)>,
    },
    /// What this hub publishes to the federation.
    Federation {
        reply: oneshot::Sender<FederationState>,
    },
    Coverage {
        reply: oneshot::Sender<BTreeMap<(String, u64), Coverage>>,
    },
    /// Writes (an operator's, or notes): answered with the entries once
    /// durable here, all stored in one commit.
    LogWrite {
        author: String,
        ops: Vec<Op>,
        reply: oneshot::Sender<Result<Vec<SignedEntry>, String>>,
    },
    /// Entries from another hub (signatures verified): answered with how
    /// many were new, once durable.
    LogEntries {
        entries: Vec<SignedEntry>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    LogMissing {
        have: VersionVector,
        reply: oneshot::Sender<Vec<(String, u64)>>,
    },
    LogState {
        reply: oneshot::Sender<LogSnapshot>,
    },
    /// The latest summary of every site known.
    Summaries {
        reply: oneshot::Sender<Vec<SiteSummary>>,
    },
    /// Every rollout's newest state.
    Rollouts {
        reply: oneshot::Sender<Vec<crate::log::RolloutEntry>>,
    },
}

/// What a hub publishes about itself in federation gossip.
#[derive(Clone)]
pub(crate) struct FederationState {
    pub served: Vec<(SiteKey, Served)>,
    pub records_digest: u64,
    pub log_digest: u64,
    pub log_entries: u64,
}

/// The desired state and the log's extent.
#[derive(Clone)]
pub(crate) struct LogSnapshot {
    pub version_vector: VersionVector,
    pub entries: u64,
    pub desired: Vec<(String, Winner)>,
    /// Every configuration version, oldest first.
    pub configs: Vec<crate::log::ConfigVersion>,
    /// Every published patch, oldest first.
    pub patches: Vec<crate::log::PatchRecord>,
}

enum StoreCmd {
    Commit {
        batch: Batch,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    CommitLog {
        entries: Vec<SignedEntry>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Prune {
        before_ms: u64,
    },
}

fn spawn_store_thread(mut store: HubStore) -> std::sync::mpsc::Sender<StoreCmd> {
    let (tx, rx) = std::sync::mpsc::channel::<StoreCmd>();
    std::thread::Builder::new()
        .name("hub-store".into())
        .spawn(move || {
            while let Ok(cmd) = rx.recv() {
                match cmd {
                    StoreCmd::Commit { batch, reply } => {
                        let _ = reply.send(store.commit(&batch));
                    }
                    StoreCmd::CommitLog { entries, reply } => {
                        let _ = reply.send(store.commit_log(&entries));
                    }
                    StoreCmd::Prune { before_ms } => match store.prune(before_ms) {
                        Ok(0) => {}
                        Ok(n) => info!(records = n, "pruned history past its retention"),
                        Err(error) => warn!(%error, "cannot prune history"),
                    },
                }
            }
        })
        .expect("spawn the store thread");
    tx
}

/// Sends a command to the store thread and waits for its answer.
async fn store_call<T>(
    store: &std::sync::mpsc::Sender<StoreCmd>,
    make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> StoreCmd,
) -> Result<T, String> {
    let (reply, rx) = oneshot::channel();
    store
        .send(make(reply))
        .map_err(|_| "the store thread is gone".to_owned())?;
    rx.await
        .map_err(|_| "the store thread is gone".to_owned())?
        .map_err(|e| e.to_string())
}

/// What the core task owns.
struct CoreTask {
    core: HubCore,
    log: LogCore,
    creds: Credentials,
    store: std::sync::mpsc::Sender<StoreCmd>,
    /// Records stored here, to push to the other hubs.
    pushes: mpsc::Sender<Vec<StoredRecord>>,
    /// The newest configuration version, with its bundle.
    config_head: watch::Sender<ConfigHead>,
    /// Audit notes of configuration events relays sent to this hub.
    notes: mpsc::Sender<(String, Op)>,
    /// Events, for the incidents task to correlate.
    incidents: mpsc::Sender<crate::incidentdriver::SiteEvent>,
    incident_events_dropped: Counter,
    metrics: HubMetrics,
}

type RecordWork = (Fresh, Option<oneshot::Sender<Result<u64, ApplyError>>>);

impl CoreTask {
    async fn run(mut self, mut inputs: mpsc::Receiver<Input>, shutdown: CancellationToken) {
        let mut seen = self.core.stats();
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                i = inputs.recv() => match i { Some(i) => i, None => break },
            };
            let mut pending = vec![first];
            while pending.len() < MAX_INPUTS_PER_COMMIT {
                match inputs.try_recv() {
                    Ok(i) => pending.push(i),
                    Err(_) => break,
                }
            }
            let now = Instant::now();
            let mut work: Vec<RecordWork> = Vec::new();
            let mut replicated: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
            let mut log_work = Vec::new();
            for input in pending {
                match input {
                    Input::Hello {
                        relay,
                        stream,
                        conn,
                        reply,
                    } => {
                        let _ = reply.send(self.core.handle_hello(now, &relay, stream, conn));
                    }
                    Input::Records {
                        relay,
                        records,
                        reply,
                    } => match self.core.take_fresh(&relay, records) {
                        Ok(fresh) => work.push((fresh, Some(reply))),
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    },
                    Input::Replicated { records, reply } => {
                        for fresh in self.core.take_replicated(records) {
                            work.push((fresh, None));
                        }
                        replicated.push(reply);
                    }
                    Input::Disconnected { relay, conn } => {
                        self.core.handle_disconnected(now, &relay, conn)
                    }
                    Input::Fleet { reply } => {
                        let _ = reply.send(self.core.fleet(now, unix_ms()));
                    }
                    Input::Peers { served } => self.core.handle_peers(served),
                    Input::Federation { reply } => {
                        let _ = reply.send(FederationState {
                            served: self.core.served(),
                            records_digest: self.core.records_digest(),
                            log_digest: self.log.digest(),
                            log_entries: self.log.len(),
                        });
                    }
                    Input::Coverage { reply } => {
                        let _ = reply.send(self.core.coverage().clone());
                    }
                    Input::LogMissing { have, reply } => {
                        let _ = reply.send(self.log.missing_for(&have));
                    }
                    Input::LogState { reply } => {
                        let _ = reply.send(LogSnapshot {
                            version_vector: self.log.version_vector().clone(),
                            entries: self.log.len(),
                            desired: self
                                .log
                                .state()
                                .values()
                                .map(|(k, w)| (k.to_owned(), w.clone()))
                                .collect(),
                            configs: self.log.state().configs().cloned().collect(),
                            patches: self.log.state().patches().into_iter().cloned().collect(),
                        });
                    }
                    Input::Summaries { reply } => {
                        let _ = reply.send(self.core.summaries());
                    }
                    Input::Rollouts { reply } => {
                        let _ = reply.send(self.log.state().rollouts().cloned().collect());
                    }
                    other @ (Input::LogWrite { .. } | Input::LogEntries { .. }) => {
                        log_work.push(other)
                    }
                }
            }
            if !work.is_empty() {
                let stored = self.commit_records(work).await;
                for r in replicated {
                    let _ = r.send(stored.clone());
                }
            } else {
                for r in replicated {
                    let _ = r.send(Ok(()));
                }
            }
            for input in log_work {
                self.log_input(input).await;
            }
            let s = self.core.stats();
            self.metrics
                .records_applied
                .inc_by(s.records_applied - seen.records_applied);
            self.metrics
                .duplicates
                .inc_by(s.duplicates - seen.duplicates);
            self.metrics.rejected.inc_by(s.rejected - seen.rejected);
            seen = s;
        }
    }

    /// Stores new records in one transaction, then applies them and
    /// acknowledges; on failure, takes them back.
    async fn commit_records(&mut self, work: Vec<RecordWork>) -> Result<(), String> {
        let now_ms = unix_ms();
        let mut batch = Batch {
            records: Vec::new(),
            streams: Vec::new(),
        };
        let received = |f: &Fresh| {
            if f.received_ms > 0 {
                f.received_ms
            } else {
                now_ms
            }
        };
        // Only what came straight from relays is pushed: a hub that pushed
        // what it was itself pushed would send every record around the
        // federation again, once per hub (anti-entropy repairs a push
        // that is lost).
        let mut records: Vec<StoredRecord> = Vec::new();
        for (f, reply) in &work {
            let id = &f.relay;
            let at = received(f);
            let start = batch.records.len();
            batch.records.extend(
                f.records
                    .iter()
                    .map(|r| stored(&id.name, f.stream, &id.region, &id.site, r, at)),
            );
            if reply.is_some() {
                records.extend_from_slice(&batch.records[start..]);
            }
            batch.streams.push((
                id.name.clone(),
                f.stream,
                id.region.clone(),
                id.site.clone(),
                self.core.applied(&id.name, f.stream),
            ));
        }
        let committed = if batch.records.is_empty() {
            Ok(())
        } else {
            store_call(&self.store, |reply| StoreCmd::Commit { batch, reply }).await
        };
        match committed {
            Ok(()) => {
                self.metrics.commits.inc();
                self.note_config_events(&records);
                self.forward_events(&work);
                for (fresh, reply) in work {
                    self.core.handle_committed(received(&fresh), &fresh);
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(self.core.applied(&fresh.relay.name, fresh.stream)));
                    }
                }
                // The others get them at once; anti-entropy repairs a push
                // that is dropped here for lack of room.
                if !records.is_empty() {
                    let _ = self.pushes.try_send(records);
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                error!(error = %e, "cannot store relay records; nothing acknowledged, relays will resend");
                for (fresh, reply) in work.into_iter().rev() {
                    self.core.undo(fresh);
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(ApplyError::Store(e.clone())));
                    }
                }
                Err(e)
            }
        }
    }

    /// Queues an audit note for each configuration event among `records`
    /// (those that came straight from relays: the hub that received an
    /// event notes it, once; replicas do not).
    fn note_config_events(&self, records: &[StoredRecord]) {
        use trellis_relay::uplink::{Event, RecordBody};
        for r in records {
            let RecordBody::Event(e) = &r.body else {
                continue;
            };
            let kind = match e {
                Event::ConfigResult { result, .. } => match result.outcome {
                    trellis_node::distribute::Outcome::Ok => "config.applied".to_owned(),
                    o => format!("config.{o}"),
                },
                Event::ConfigDrift { .. } => "config.drift".to_owned(),
                Event::PatchState { state, .. } => format!("patch.{}", state.state),
                Event::PatchSiteRolledBack { .. } => "patch.site-rolled-back".to_owned(),
                Event::CheckChanged { check, detail, .. }
                    if check.starts_with(trellis_node::runbook::CHECK_PREFIX) =>
                {
                    runbook_note_kind(detail)
                }
                _ => continue,
            };
            let subject = match e {
                Event::ConfigResult { node, .. }
                | Event::ConfigDrift { node, .. }
                | Event::PatchState { node, .. }
                | Event::CheckChanged { node, .. } => format!("{}/{}/{node}", r.region, r.site),
                Event::PatchSiteRolledBack { .. } => format!("{}/{}", r.region, r.site),
                _ => continue,
            };
            let op = Op::Note {
                kind,
                subject,
                detail: match e {
                    Event::CheckChanged { check, detail, .. } => format!(
                        "{}: {detail}",
                        check.trim_start_matches(trellis_node::runbook::CHECK_PREFIX)
                    ),
                    _ => e
                        .config_text()
                        .or_else(|| e.patch_text())
                        .unwrap_or_default(),
                },
            };
            if self.notes.try_send((self.log_me(), op)).is_err() {
                warn!(relay = %r.relay, "audit notes queue full; a configuration event is in the store but not in the audit log");
            }
        }
    }

    /// Hands every event among the stored records (from relays or other
    /// hubs) to the incidents task, never waiting: past its queue's room,
    /// an event is counted and left to the store.
    fn forward_events(&self, work: &[RecordWork]) {
        use trellis_relay::uplink::RecordBody;
        for (f, _) in work {
            for r in &f.records {
                let RecordBody::Event(e) = &r.body else {
                    continue;
                };
                let event = crate::incidentdriver::SiteEvent {
                    region: f.relay.region.clone(),
                    site: f.relay.site.clone(),
                    event: e.clone(),
                };
                if self.incidents.try_send(event).is_err() {
                    self.incident_events_dropped.inc();
                }
            }
        }
    }

    fn log_me(&self) -> String {
        self.creds.identity.name.clone()
    }

    /// After `e` was applied to the log: if it holds the newest
    /// configuration version, that is now what relays are offered.
    fn follow_config(&self, e: &Entry) {
        let latest = self.log.state().latest_config();
        if latest.is_some_and(|c| c.origin == e.origin && c.seq == e.seq)
            && let Some(head) = config_head_of(e)
        {
            info!(version = head.0.version, digest = %&hex32(&head.0.digest)[..16], "newest configuration version; offering it to relays");
            self.config_head.send_replace(Some(Arc::new(head)));
        }
    }

    /// After entries were applied to the log: if any was a revocation,
    /// the hub enforces the new set (and its relays are sent it).
    fn follow_revocations<'a>(&self, entries: impl IntoIterator<Item = &'a Entry>) {
        if entries
            .into_iter()
            .any(|e| matches!(e.op, Op::Revoke { .. }))
        {
            enforce_revocations(&self.creds, self.log.state());
        }
    }

    async fn log_input(&mut self, input: Input) {
        match input {
            Input::LogWrite { author, ops, reply } => {
                let now_ms = unix_ms();
                let mut entries: Vec<SignedEntry> = Vec::with_capacity(ops.len());
                for op in ops {
                    let entry = self.log.write_after(now_ms, &author, op, entries.last());
                    match self.creds.sign(&entry.signing_bytes()) {
                        Ok(signature) => entries.push(SignedEntry {
                            entry,
                            cert: self.creds.cert_der().to_vec(),
                            signature,
                        }),
                        Err(e) => {
                            let _ = reply.send(Err(e.to_string()));
                            return;
                        }
                    }
                }
                let to_store = entries.clone();
                let result = store_call(&self.store, |reply| StoreCmd::CommitLog {
                    entries: to_store,
                    reply,
                })
                .await;
                if result.is_ok() {
                    for e in &entries {
                        self.log.apply(&e.entry, e.hash());
                        self.follow_config(&e.entry);
                    }
                    self.follow_revocations(entries.iter().map(|e| &e.entry));
                }
                let _ = reply.send(result.map(|()| entries));
            }
            Input::LogEntries { entries, reply } => {
                let received = self.log.receive(&entries);
                for b in &received.broken {
                    warn!(
                        origin = %b.origin,
                        seq = b.seq,
                        prev = %hex(&b.found),
                        expected = %hex(&b.expected),
                        "log entry does not follow its origin's entry before it (prev is not that entry's hash); ignored"
                    );
                }
                let fresh: Vec<SignedEntry> = received.fresh.into_iter().cloned().collect();
                if fresh.is_empty() {
                    let _ = reply.send(Ok(0));
                    return;
                }
                let to_store = fresh.clone();
                let result = store_call(&self.store, |reply| StoreCmd::CommitLog {
                    entries: to_store,
                    reply,
                })
                .await;
                if result.is_ok() {
                    for e in &fresh {
                        self.log.apply(&e.entry, e.hash());
                        self.follow_config(&e.entry);
                    }
                    self.follow_revocations(fresh.iter().map(|e| &e.entry));
                }
                let _ = reply.send(result.map(|()| fresh.len()));
            }
            _ => {}
        }
    }
}

/// Makes the revocations in the desired state the set `creds` enforce:
/// each entry's CA signature is checked (one that fails is logged and left
/// out), and entries for expired certificates are dropped.
fn enforce_revocations(creds: &Credentials, state: &crate::log::DesiredState) {
    let signed = state.revocations();
    let (set, errors) = trellis_node::revocation::RevocationSet::verified(
        creds.ca_der(),
        &signed,
        (unix_ms() / 1000) as i64,
    );
    for error in errors {
        error!(%error, "revocation in the desired state ignored");
    }
    let (entries, digest) = (set.len(), set.digest());
    if creds.revocations().replace(set) {
        info!(entries, %digest, "revocation list changed; enforcing it and sending it to relays");
    }
}

/// Sends the revocation list to one relay when it connects (unless it is
/// empty) and at every change, until the connection ends; a failed send
/// is retried with a growing delay.
async fn push_revocations(
    conn: quinn::Connection,
    relay: Identity,
    mut changes: watch::Receiver<Arc<trellis_node::revocation::RevocationSet>>,
) {
    // Nothing revoked, nothing to send (a relay's list only ever held
    // entries the hubs had): most meshes never pay for a stream per
    // relay at connect.
    if changes.borrow_and_update().is_empty() && changes.changed().await.is_err() {
        return;
    }
    loop {
        let set = changes.borrow_and_update().clone();
        let mut delay = Duration::from_secs(1);
        loop {
            match send_revocations(&conn, &set).await {
                Ok(()) => {
                    debug!(relay = %relay, entries = set.len(), digest = %set.digest(), "revocation list sent to the relay");
                    break;
                }
                Err(error) => {
                    if conn.close_reason().is_some() {
                        return;
                    }
                    warn!(relay = %relay, %error, retry_in = ?delay, "cannot send the revocation list to the relay");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            if changes.has_changed().unwrap_or(false) {
                break;
            }
            delay = (delay * 2).min(MAX_PUSH_BACKOFF);
        }
        if !changes.has_changed().unwrap_or(false) && changes.changed().await.is_err() {
            return;
        }
    }
}

/// One revocation list on its own stream; `Ok` once the relay holds it.
async fn send_revocations(
    conn: &quinn::Connection,
    set: &trellis_node::revocation::RevocationSet,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    wire::write_msg(
        &mut send,
        UPLINK_VERSION,
        &Request::Revocations(set.signed()),
        MAX_UPLINK_FRAME,
    )
    .await
    .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let answer = tokio::time::timeout(
        PUSH_TIMEOUT,
        wire::read_msg::<Response>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
    )
    .await
    .map_err(|_| format!("no answer within {PUSH_TIMEOUT:?}"))?
    .map_err(|e| e.to_string())?;
    match answer {
        Some(Response::RevocationsTaken { digest, .. }) if digest == set.digest() => Ok(()),
        Some(Response::RevocationsTaken { digest, .. }) => Err(format!(
            "the relay holds revocation list {digest}, not {}",
            set.digest()
        )),
        Some(Response::Error(reason)) => Err(format!("the relay refused the list: {reason}")),
        other => Err(format!("unexpected answer: {other:?}")),
    }
}

/// The configuration version an entry holds, with its bundle; `None` for
/// other entries (or a bundle that does not decode, which the hub that
/// accepted it would not have let in).
fn config_head_of(e: &Entry) -> Option<(Offer, SignedBundle)> {
    let Op::Config {
        version, bundle, ..
    } = &e.op
    else {
        return None;
    };
    let signed: SignedBundle = postcard::from_bytes(bundle).ok()?;
    Some((Offer::of(*version, &signed), signed))
}

/// Offers the newest configuration to one relay, and pushes the bundle if
/// it wants it; again whenever a newer one comes, until the connection
/// ends. Failed pushes are retried with a growing delay.
async fn push_config(
    conn: quinn::Connection,
    relay: Identity,
    mut head: watch::Receiver<ConfigHead>,
) {
    loop {
        let current = head.borrow_and_update().clone();
        if let Some(c) = current {
            let mut delay = Duration::from_secs(1);
            loop {
                match offer_config(&conn, &c).await {
                    Ok(true) => {
                        info!(relay = %relay, version = c.0.version, "configuration pushed to the relay");
                        break;
                    }
                    Ok(false) => break,
                    Err(error) => {
                        if conn.close_reason().is_some() {
                            return;
                        }
                        warn!(relay = %relay, version = c.0.version, %error, retry_in = ?delay, "cannot push configuration to the relay");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    changed = head.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        break;
                    }
                }
                delay = (delay * 2).min(MAX_PUSH_BACKOFF);
            }
            if head.has_changed().unwrap_or(false) {
                continue;
            }
        }
        if head.changed().await.is_err() {
            return;
        }
    }
}

/// One offer on its own stream: `Ok(true)` if the relay took the bundle,
/// `Ok(false)` if it holds that version or a newer one.
async fn offer_config(conn: &quinn::Connection, c: &(Offer, SignedBundle)) -> Result<bool, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let e = |e: WireError| e.to_string();
    wire::write_msg(
        &mut send,
        UPLINK_VERSION,
        &Request::ConfigOffer(c.0),
        MAX_UPLINK_FRAME,
    )
    .await
    .map_err(e)?;
    let wanted = tokio::time::timeout(
        IO_TIMEOUT,
        wire::read_msg::<Response>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
    )
    .await
    .map_err(|_| format!("no answer to the offer within {IO_TIMEOUT:?}"))?
    .map_err(e)?;
    match wanted {
        Some(Response::ConfigWanted(true)) => {}
        Some(Response::ConfigWanted(false)) => {
            let _ = send.finish();
            return Ok(false);
        }
        other => return Err(format!("unexpected answer to the offer: {other:?}")),
    }
    wire::write_msg(
        &mut send,
        UPLINK_VERSION,
        &Request::ConfigBundle(Box::new(c.1.clone())),
        MAX_UPLINK_FRAME,
    )
    .await
    .map_err(e)?;
    let _ = send.finish();
    let stored = tokio::time::timeout(
        PUSH_TIMEOUT,
        wire::read_msg::<Response>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
    )
    .await
    .map_err(|_| format!("the relay did not confirm the bundle within {PUSH_TIMEOUT:?}"))?
    .map_err(e)?;
    match stored {
        Some(Response::ConfigStored(o)) if o == c.0 => Ok(true),
        Some(Response::Error(reason)) => Err(format!("the relay refused the bundle: {reason}")),
        other => Err(format!("unexpected answer to the bundle: {other:?}")),
    }
}

/// Answers a relay's requests (streams the relay opens on its uplink
/// connection: chunks, enrolments) until the connection ends.
async fn serve_relay_requests(conn: quinn::Connection, relay: Identity, shared: Shared) {
    use trellis_relay::uplink::{RelayRequest, RelayResponse};
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let store = shared.chunks.clone();
        let (shared, relay) = (shared.clone(), relay.clone());
        tokio::spawn(async move {
            let request = tokio::time::timeout(
                IO_TIMEOUT,
                wire::read_msg::<RelayRequest>(
                    &mut recv,
                    UPLINK_VERSION,
                    trellis_node::enrol::MAX_ENROL_FRAME + 1024,
                ),
            )
            .await;
            let response = match request {
                Ok(Ok(Some(RelayRequest::Enrol(req)))) => {
                    crate::enrolapi::enrol(&shared, Some(&relay), req).await
                }
                Ok(Ok(Some(RelayRequest::Renew { name, csr }))) => {
                    crate::enrolapi::renew(&shared, &relay, &name, &csr).await
                }
                Ok(Ok(Some(RelayRequest::Chunk(hash)))) => {
                    match tokio::task::spawn_blocking(move || store.get(&hash)).await {
                        Ok(Ok(Some(bytes))) => RelayResponse::Chunk(bytes),
                        Ok(Ok(None)) => RelayResponse::NotHere,
                        Ok(Err(e)) => RelayResponse::Error(e.to_string()),
                        Err(e) => RelayResponse::Error(e.to_string()),
                    }
                }
                Ok(Ok(None)) => return,
                Ok(Err(e)) => RelayResponse::Error(format!("bad request: {e}")),
                Err(_) => return,
            };
            if let Ok(frame) = wire::encode(UPLINK_VERSION, &response, MAX_UPLINK_FRAME) {
                let _ = wire::write_frame(&mut send, &frame).await;
                let _ = send.finish();
            }
        });
    }
}

/// One request to a relay on its own hub-opened stream, and its answer,
/// within [`PUSH_TIMEOUT`]; `Err` says why there is none.
pub(crate) async fn ask_relay(
    conn: &quinn::Connection,
    request: &Request,
) -> Result<Response, String> {
    let ask = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        wire::write_msg(&mut send, UPLINK_VERSION, request, MAX_UPLINK_FRAME)
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        wire::read_msg::<Response>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(PUSH_TIMEOUT, ask).await {
        Err(_) => Err(format!("no answer within {PUSH_TIMEOUT:?}")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(None)) => Err("the relay closed the stream without answering".to_owned()),
        Ok(Ok(Some(r))) => Ok(r),
    }
}

/// Stages a patch at the relay of a site: `Ok(chunks it is fetching)`.
pub(crate) async fn stage_patch(
    conn: &quinn::Connection,
    signed: &trellis_node::patch::SignedPatch,
) -> Result<u64, String> {
    match ask_relay(conn, &Request::PatchStage(Box::new(signed.clone()))).await? {
        Response::PatchStaged { fetching } => Ok(fetching),
        Response::Error(e) => Err(e),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Writes the audit notes the core task queued, one at a time (each is
/// durable here, then pushed to the other hubs).
/// Audit notes written in one commit at most.
const NOTES_PER_COMMIT: usize = 512;

/// Writes the audit notes the core task queued: whatever has gathered, up
/// to [`NOTES_PER_COMMIT`], as consecutive entries in one commit (durable
/// here, then pushed to the other hubs), so a rollout to thousands of
/// nodes costs a few commits, not one per node.
async fn notes_task(
    shared: Shared,
    mut notes: mpsc::Receiver<(String, Op)>,
    shutdown: CancellationToken,
) {
    loop {
        let (author, op) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            n = notes.recv() => match n { Some(n) => n, None => break },
        };
        let mut ops = vec![op];
        while ops.len() < NOTES_PER_COMMIT {
            match notes.try_recv() {
                // Every queued note is the hub's own.
                Ok((_, op)) => ops.push(op),
                Err(_) => break,
            }
        }
        let Some(peering) = shared.peering.get() else {
            continue;
        };
        let n = ops.len();
        if let Err(error) = crate::peering::notes(&shared, peering, author, ops).await {
            warn!(%error, notes = n, "configuration events not noted in the audit log");
        }
    }
}

/// The live uplink of a site's relay, for drill-down requests.
#[derive(Clone)]
pub(crate) struct RelayConn {
    pub relay: String,
    pub conn: quinn::Connection,
}

/// What the API handlers share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub core: mpsc::Sender<Input>,
    pub relays: Arc<Mutex<HashMap<SiteKey, RelayConn>>>,
    pub registry: Arc<Registry>,
    pub store: StoreReader,
    /// Filled in once the federation is joined.
    pub peering: Arc<std::sync::OnceLock<Peering>>,
    /// The newest configuration version, with its bundle.
    pub config_head: watch::Receiver<ConfigHead>,
    /// Patch artifacts' chunks, by BLAKE3.
    pub chunks: Arc<trellis_node::patch::ChunkStore>,
    /// The newest rollout, with its patch: what relays are told.
    pub rollout_head: watch::Receiver<crate::patchdriver::RolloutHead>,
    /// Every incident kept, newest first.
    pub incidents: watch::Receiver<crate::incidentdriver::IncidentList>,
    /// The revocations this hub enforces (its credentials' set).
    pub revocations: trellis_node::revocation::Revocations,
    /// Whether and how this hub signs certificates for enrolments.
    pub enrolment: crate::config::EnrolmentConfig,
}

/// Why a note was not recorded. Nothing was appended to the log.
#[derive(Debug, thiserror::Error)]
pub enum NoteError {
    /// The hub is stopping.
    #[error("the hub is shutting down; the note was not recorded")]
    ShuttingDown,
    /// The note is larger than a log entry may be.
    #[error(
        "a note's kind, subject and detail take {0} bytes, more than {MAX_NOTE_BYTES}; \
         shorten the detail (store large reports elsewhere and note a reference)"
    )]
    TooLarge(usize),
    /// The note has no kind.
    #[error("a note needs a kind (e.g. config.applied)")]
    NoKind,
    /// The entry could not be signed or stored.
    #[error("the note was not recorded: {0}")]
    NotRecorded(String),
}

/// The largest note (kind, subject and detail together): a pull of
/// `PULL_CHUNK` entries must stay well within a replication frame.
pub const MAX_NOTE_BYTES: usize = 4096;

/// Why a drill-down request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DrillError {
    #[error("the relay of site {0} is not connected to this hub")]
    NotConnected(String),
    #[error("the relay of site {site} did not answer within {IO_TIMEOUT:?}")]
    Timeout { site: String },
    #[error("the relay of site {site} failed: {reason}")]
    Relay { site: String, reason: String },
    #[error("the hub is shutting down")]
    ShuttingDown,
}

impl Shared {
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.core.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn fleet(&self) -> Result<FleetReport, DrillError> {
        self.ask(|reply| Input::Fleet { reply })
            .await
            .ok_or(DrillError::ShuttingDown)
    }

    /// Asks a site's relay for its members.
    pub async fn site_nodes(&self, key: &SiteKey) -> Result<(String, Vec<MemberView>), DrillError> {
        let site = format!("{}/{}", key.0, key.1);
        let rc = self
            .relays
            .lock()
            .expect("not poisoned")
            .get(key)
            .cloned()
            .ok_or_else(|| DrillError::NotConnected(site.clone()))?;
        let ask = async {
            let (mut send, mut recv) = rc.conn.open_bi().await.map_err(|e| e.to_string())?;
            wire::write_msg(&mut send, UPLINK_VERSION, &Request::Nodes, MAX_UPLINK_FRAME)
                .await
                .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            wire::read_msg::<Response>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(IO_TIMEOUT, ask).await {
            Err(_) => Err(DrillError::Timeout { site }),
            Ok(Err(reason)) => Err(DrillError::Relay { site, reason }),
            Ok(Ok(Some(Response::Nodes(nodes)))) => Ok((rc.relay, nodes)),
            Ok(Ok(Some(Response::Error(reason)))) => Err(DrillError::Relay { site, reason }),
            Ok(Ok(Some(other))) => Err(DrillError::Relay {
                site,
                reason: format!("unexpected answer {other:?}"),
            }),
            Ok(Ok(None)) => Err(DrillError::Relay {
                site,
                reason: "no answer".into(),
            }),
        }
    }
}

enum ServeError {
    /// The relay sent something malformed.
    Peer(WireError),
    /// The relay sent a well-formed message out of place.
    Unexpected(&'static str),
    Refused(RecordError),
    /// The hub could not store what the relay sent.
    Store(String),
    /// The connection or the hub went away.
    Gone(String),
    /// Nothing arrived for longer than the silence timeout.
    Silent,
    /// The relay did not open its control stream, or send its hello,
    /// within [`IO_TIMEOUT`]: a slow client holding a connection.
    TooSlow(&'static str),
}

/// Serves one relay's uplink connection until it ends.
async fn serve_relay(
    accepted: Accepted,
    hub_name: String,
    silence: Duration,
    shared: Shared,
    mesh: MeshMetrics,
    shutdown: CancellationToken,
) {
    let Accepted { conn, peer } = accepted;
    let remote = conn.remote_address();
    let result = serve_relay_inner(&conn, &peer, &hub_name, silence, &shared, &shutdown).await;
    match result {
        Ok(()) => debug!(relay = %peer, "uplink ended"),
        Err(ServeError::Silent) => {
            warn!(relay = %peer, %remote, ?silence, "relay went silent; closing its uplink");
            conn.close(close::DONE, b"silent too long");
        }
        Err(ServeError::Peer(error)) => {
            mesh.peer_error(Protocol::Uplink.as_str(), error.kind());
            warn!(relay = %peer, %remote, %error, "closing uplink: relay sent a bad message");
            conn.close(close::PROTOCOL_ERROR, error.to_string().as_bytes());
        }
        Err(ServeError::Unexpected(what)) => {
            mesh.peer_error(Protocol::Uplink.as_str(), "unexpected");
            warn!(relay = %peer, %remote, error = what, "closing uplink: relay broke the protocol");
            conn.close(close::PROTOCOL_ERROR, what.as_bytes());
        }
        Err(ServeError::Refused(error)) => {
            mesh.peer_error(Protocol::Uplink.as_str(), "refused_record");
            warn!(relay = %peer, %remote, %error, "closing uplink: record refused");
            conn.close(close::PROTOCOL_ERROR, error.to_string().as_bytes());
        }
        Err(ServeError::Store(error)) => {
            warn!(relay = %peer, %remote, %error, "closing uplink: records could not be stored");
            conn.close(close::DONE, b"hub cannot store records now");
        }
        Err(ServeError::TooSlow(what)) => {
            mesh.peer_error(Protocol::Uplink.as_str(), "too_slow");
            warn!(relay = %peer, %remote, missing = what, timeout = ?IO_TIMEOUT, "closing uplink: relay too slow to start");
            conn.close(close::PROTOCOL_ERROR, what.as_bytes());
        }
        Err(ServeError::Gone(reason)) => debug!(relay = %peer, %reason, "uplink lost"),
    }
    let key = (peer.region.clone(), peer.site.clone());
    {
        let mut relays = shared.relays.lock().expect("not poisoned");
        if relays
            .get(&key)
            .is_some_and(|r| r.conn.stable_id() == conn.stable_id())
        {
            relays.remove(&key);
        }
    }
    let conn = conn.stable_id() as u64;
    let _ = shared
        .core
        .send(Input::Disconnected { relay: peer, conn })
        .await;
}

/// Reads frames off the control stream into a channel, so that records can
/// be taken in batches without cancelling a read halfway.
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Result<RelayMsg, ServeError>>) {
    loop {
        let msg =
            match wire::read_msg::<RelayMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break,
                Err(WireError::Stream(e)) => Err(ServeError::Gone(e)),
                Err(e) => Err(ServeError::Peer(e)),
            };
        let stop = msg.is_err();
        if tx.send(msg).await.is_err() || stop {
            break;
        }
    }
}

async fn serve_relay_inner(
    conn: &quinn::Connection,
    peer: &Identity,
    hub_name: &str,
    silence: Duration,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> Result<(), ServeError> {
    let gone = |e: &dyn std::fmt::Display| ServeError::Gone(e.to_string());
    let (mut send, recv) = tokio::time::timeout(IO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| ServeError::TooSlow("no control stream"))?
        .map_err(|e| gone(&e))?;
    let (tx, mut frames) = mpsc::channel(MAX_RECORDS_PER_INPUT);
    let reader = tokio::spawn(read_frames(recv, tx));
    let _stop_reader = AbortOnDrop(reader);
    let stream = match tokio::time::timeout(IO_TIMEOUT, frames.recv())
        .await
        .map_err(|_| ServeError::TooSlow("no hello"))?
    {
        Some(Ok(RelayMsg::Hello { stream })) => stream,
        Some(Ok(RelayMsg::Record(_))) => return Err(ServeError::Unexpected("record before hello")),
        Some(Err(e)) => return Err(e),
        None => return Ok(()),
    };
    let acked = shared
        .ask(|reply| Input::Hello {
            relay: peer.clone(),
            stream,
            conn: conn.stable_id() as u64,
            reply,
        })
        .await
        .ok_or_else(|| ServeError::Gone("hub shutting down".into()))?;
    let welcome = HubMsg::Welcome {
        hub: hub_name.to_owned(),
        acked,
    };
    wire::write_msg(&mut send, UPLINK_VERSION, &welcome, MAX_UPLINK_FRAME)
        .await
        .map_err(|e| gone(&e))?;
    shared.relays.lock().expect("not poisoned").insert(
        (peer.region.clone(), peer.site.clone()),
        RelayConn {
            relay: peer.name.clone(),
            conn: conn.clone(),
        },
    );
    info!(relay = %peer, remote = %conn.remote_address(), stream, resume_after = acked, "relay connected");
    let _push = AbortOnDrop(tokio::spawn(push_config(
        conn.clone(),
        peer.clone(),
        shared.config_head.clone(),
    )));
    let _revocations = AbortOnDrop(tokio::spawn(push_revocations(
        conn.clone(),
        peer.clone(),
        shared.revocations.subscribe(),
    )));
    let _rollout = AbortOnDrop(tokio::spawn(crate::patchdriver::push_rollout(
        conn.clone(),
        peer.clone(),
        shared.rollout_head.clone(),
    )));
    let _requests = AbortOnDrop(tokio::spawn(serve_relay_requests(
        conn.clone(),
        peer.clone(),
        shared.clone(),
    )));
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(silence) => return Err(ServeError::Silent),
            m = frames.recv() => m,
        };
        let mut records = Vec::new();
        let mut next = first;
        loop {
            match next {
                None => {
                    if records.is_empty() {
                        return Ok(());
                    }
                    break;
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(RelayMsg::Record(r))) => records.push(*r),
                Some(Ok(RelayMsg::Hello { .. })) => {
                    return Err(ServeError::Unexpected("second hello on the control stream"));
                }
            }
            if records.len() >= MAX_RECORDS_PER_INPUT {
                break;
            }
            match frames.try_recv() {
                Ok(m) => next = Some(m),
                Err(_) => break,
            }
        }
        let ack = shared
            .ask(|reply| Input::Records {
                relay: peer.clone(),
                records,
                reply,
            })
            .await
            .ok_or_else(|| ServeError::Gone("hub shutting down".into()))?
            .map_err(|e| match e {
                ApplyError::Refused(r) => ServeError::Refused(r),
                ApplyError::Store(s) => ServeError::Store(s),
            })?;
        wire::write_msg(
            &mut send,
            UPLINK_VERSION,
            &HubMsg::Ack { through: ack },
            MAX_UPLINK_FRAME,
        )
        .await
        .map_err(|e| gone(&e))?;
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running hub.
pub struct Hub {
    endpoint: MeshEndpoint,
    api_addr: SocketAddr,
    shared: Shared,
    gossip: Arc<Gossip>,
    tasks: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Starts the hub (with `cfg.store.path` taken as is: relative to the
    /// working directory). Returns once the store is open and the endpoint
    /// and the API are bound; runs until `shutdown` is cancelled.
    pub async fn start(
        creds: Credentials,
        cfg: HubConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        if creds.identity.role != Role::Hub {
            return Err(StartError::Other(format!(
                "{} holds a {} certificate; a hub needs one issued with --role hub",
                creds.identity.name, creds.identity.role
            )));
        }
        let name = creds.identity.name.clone();
        let path = cfg.store.path.clone();
        let (store, streams, summaries) = tokio::task::spawn_blocking(move || {
            let store = HubStore::open(&path)?;
            let streams = store.streams()?;
            let summaries = store.latest_summaries()?;
            Ok::<_, StoreError>((store, streams, summaries))
        })
        .await
        .expect("store open does not panic")
        .map_err(|e| StartError::Other(format!("{e}; check [store] path")))?;
        let reader = StoreReader::new(store.path());
        let chunks_dir = cfg
            .store
            .path
            .parent()
            .map_or_else(|| std::path::PathBuf::from("chunks"), |d| d.join("chunks"));
        let chunks = trellis_node::patch::ChunkStore::open(&chunks_dir)
            .map_err(|e| StartError::Other(format!("{e}; check [store] path")))?;
        let restored_sites = summaries.len();
        let mut core = HubCore::new(name.clone(), cfg.fleet.stale_after);
        core.restore(streams, summaries);
        let log_entries = {
            let path = cfg.store.path.clone();
            tokio::task::spawn_blocking(move || HubStore::open(&path)?.log_entries())
                .await
                .expect("log load does not panic")
                .map_err(|e| StartError::Other(e.to_string()))?
        };
        let mut log = LogCore::new(name.clone());
        for (e, hash) in &log_entries {
            log.apply(e, *hash);
        }
        let head = log.state().latest_config().and_then(|c| {
            log_entries
                .iter()
                .find(|(e, _)| e.origin == c.origin && e.seq == c.seq)
                .and_then(|(e, _)| config_head_of(e))
        });
        drop(log_entries);
        enforce_revocations(&creds, log.state());
        let (config_head_tx, config_head_rx) = watch::channel(head.map(Arc::new));
        let store_tx = spawn_store_thread(store);

        let mut registry = Registry::default();
        let mesh_metrics = MeshMetrics::register(&mut registry);
        let hub_metrics = HubMetrics::register(&mut registry);
        let fleet_metrics = crate::fleetmetrics::FleetMetrics::register(&mut registry);
        let incident_metrics = crate::incidentdriver::IncidentMetrics::register(&mut registry);
        let region = creds.identity.region.clone();
        let (endpoint, mut routes) = MeshEndpoint::bind(
            creds.clone(),
            cfg.uplink.listen,
            trellis_node::authz::served_by(trellis_node::id::Role::Hub),
            mesh_metrics.clone(),
        )?;
        let listener = tokio::net::TcpListener::bind(cfg.api.listen)
            .await
            .map_err(|e| {
                StartError::Other(format!(
                    "cannot serve the API on {}: {e} (set [api] listen, or `trellis up --api`)",
                    cfg.api.listen
                ))
            })?;
        let api_addr = listener
            .local_addr()
            .map_err(|e| StartError::Other(e.to_string()))?;
        let (core_tx, core_rx) = mpsc::channel(4096);
        let (rollout_head_tx, rollout_head_rx) = watch::channel(None);
        let (incidents_tx, incidents_rx) = watch::channel(Arc::new(Vec::new()));
        let (incident_events_tx, incident_events_rx) =
            mpsc::channel(crate::incidentdriver::EVENTS_QUEUE);
        let shared = Shared {
            core: core_tx,
            relays: Arc::new(Mutex::new(HashMap::new())),
            registry: Arc::new(registry),
            store: reader,
            peering: Arc::new(std::sync::OnceLock::new()),
            config_head: config_head_rx,
            chunks: Arc::new(chunks),
            rollout_head: rollout_head_rx,
            incidents: incidents_rx,
            revocations: creds.revocations().clone(),
            enrolment: cfg.enrolment.clone(),
        };
        let (push_tx, push_rx) = mpsc::channel(1024);
        let (notes_tx, notes_rx) = mpsc::channel(NOTES_QUEUE);
        let core_task = CoreTask {
            core,
            log,
            creds: creds.clone(),
            store: store_tx.clone(),
            pushes: push_tx,
            config_head: config_head_tx,
            notes: notes_tx.clone(),
            incidents: incident_events_tx,
            incident_events_dropped: incident_metrics.events_dropped.clone(),
            metrics: hub_metrics.clone(),
        };
        let mut tasks = vec![
            tokio::spawn(core_task.run(core_rx, shutdown.child_token())),
            tokio::spawn(notes_task(shared.clone(), notes_rx, shutdown.child_token())),
            tokio::spawn(crate::fleetmetrics::fleet_metrics_task(
                shared.clone(),
                fleet_metrics,
                shutdown.child_token(),
            )),
        ];
        // The federation: gossip among hubs, replication.
        let gossip_settings = trellis_node::gossip::GossipSettings {
            interval: cfg.federation.interval,
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(24 * 3600),
            seeds: cfg.federation.peers.clone(),
            advertise: cfg.federation.advertise,
        };
        let gossip = Gossip::join(
            endpoint.clone(),
            Cluster::hubs(),
            routes.take(Protocol::Federation),
            &gossip_settings,
            Vec::new(),
            shutdown.child_token(),
        )
        .await
        .map_err(StartError::Gossip)?;
        let peering = Peering {
            me: name.clone(),
            region,
            api: format!("http://{api_addr}"),
            gossip: Arc::new(gossip),
            repl: ReplClient::new(endpoint.clone()),
            creds: creds.clone(),
            peers: Arc::new(Mutex::new(Vec::new())),
            settings: PeeringSettings {
                interval: cfg.federation.interval,
                anti_entropy_every: cfg.replication.anti_entropy_every,
                write_quorum: cfg.replication.write_quorum,
                write_timeout: cfg.replication.write_timeout,
            },
        };
        let _ = shared.peering.set(peering.clone());
        tasks.push(tokio::spawn(federation_task(
            shared.clone(),
            peering.clone(),
            shutdown.child_token(),
        )));
        tasks.push(tokio::spawn(crate::patchdriver::rollout_task(
            shared.clone(),
            peering.clone(),
            rollout_head_tx,
            shutdown.child_token(),
        )));
        tasks.push(tokio::spawn(crate::incidentdriver::incidents_task(
            shared.clone(),
            cfg.incidents.clone(),
            cfg.outliers.clone(),
            cfg.baselines.clone(),
            name.clone(),
            cfg.fleet.stale_after,
            incident_events_rx,
            notes_tx,
            incidents_tx,
            incident_metrics,
            shutdown.child_token(),
        )));
        tasks.push(tokio::spawn(crate::peering::chunk_sync_task(
            shared.clone(),
            peering.clone(),
            shutdown.child_token(),
        )));
        tasks.push(tokio::spawn(push_task(
            peering.clone(),
            push_rx,
            shutdown.child_token(),
        )));
        tasks.push(tokio::spawn(serve_replication(
            shared.clone(),
            peering.clone(),
            routes.take(Protocol::Replication),
            shutdown.child_token(),
        )));
        // Retention: prune once an hour (and once at start).
        {
            let (retention, sd) = (cfg.store.retention, shutdown.child_token());
            tasks.push(tokio::spawn(async move {
                let mut tick = ticker(Duration::from_secs(3600));
                loop {
                    tokio::select! {
                        biased;
                        _ = sd.cancelled() => break,
                        _ = tick.tick() => {
                            let before_ms = unix_ms().saturating_sub(retention.as_millis() as u64);
                            if store_tx.send(StoreCmd::Prune { before_ms }).is_err() {
                                break;
                            }
                        }
                    }
                }
            }));
        }
        let mut uplinks = routes.take(Protocol::Uplink);
        let (s, sd, hub_name) = (shared.clone(), shutdown.child_token(), name.clone());
        let silence = cfg.uplink.silence_timeout;
        tasks.push(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    biased;
                    _ = sd.cancelled() => break,
                    a = uplinks.recv() => match a { Some(a) => a, None => break },
                };
                hub_metrics.relays_connected.inc();
                let (s, sd, m, n, g) = (
                    s.clone(),
                    sd.clone(),
                    mesh_metrics.clone(),
                    hub_name.clone(),
                    hub_metrics.relays_connected.clone(),
                );
                tokio::spawn(async move {
                    serve_relay(accepted, n, silence, s, m, sd).await;
                    g.dec();
                });
            }
        }));
        let enrol_addr = match cfg.enrolment.listen {
            Some(listen) => Some(
                crate::enrolapi::serve(listen, &creds, shared.clone(), shutdown.child_token())
                    .map_err(StartError::Other)?,
            ),
            None => None,
        };
        let app = api::router(
            shared.clone(),
            crate::apiauth::ApiAuth::new(
                cfg.api.token_required(),
                &cfg.api.tokens,
                cfg.api.requests_per_s,
            ),
        );
        let sd = shutdown.child_token();
        tasks.push(tokio::spawn(async move {
            let limits = trellis_node::http::Limits::api();
            if let Err(error) = trellis_node::http::serve(listener, app, limits, "api", sd).await {
                warn!(%error, "API server stopped");
            }
        }));
        info!(
            hub = %name,
            uplink = %endpoint.local_addr(),
            federation = %peering.gossip.advertise_addr(),
            api = %format!("http://{api_addr}"),
            store = %cfg.store.path.display(),
            restored_sites,
            enrol = %enrol_addr.map_or("off".to_owned(), |a| a.to_string()),
            "hub ready"
        );
        Ok(Hub {
            endpoint,
            api_addr,
            shared,
            gossip: peering.gossip.clone(),
            tasks,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    pub fn uplink_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// The fleet as the hub sees it now.
    pub async fn fleet(&self) -> Option<FleetReport> {
        self.shared.fleet().await.ok()
    }

    /// The address other hubs reach this one at.
    pub fn federation_addr(&self) -> SocketAddr {
        self.gossip.advertise_addr()
    }

    /// Records something for the audit trail that does not change the
    /// desired state (a configuration applied on a node, a drift found):
    /// appended to the log as an entry of this hub, signed and replicated
    /// like an operator's write, but without waiting for other hubs.
    pub async fn note(
        &self,
        author: &str,
        kind: &str,
        subject: &str,
        detail: &str,
    ) -> Result<SignedEntry, NoteError> {
        let peering = self.shared.peering.get().ok_or(NoteError::ShuttingDown)?;
        let mut entries = crate::peering::notes(
            &self.shared,
            peering,
            author.to_owned(),
            vec![Op::Note {
                kind: kind.to_owned(),
                subject: subject.to_owned(),
                detail: detail.to_owned(),
            }],
        )
        .await?;
        Ok(entries.remove(0))
    }

    /// Waits for the hub's tasks to end after shutdown, then leaves the
    /// federation and closes the endpoint.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.shared);
        if let Ok(gossip) = Arc::try_unwrap(self.gossip) {
            gossip.shutdown().await;
        }
        self.endpoint.shutdown().await;
    }
}

impl trellis_node::cli::Running for Hub {
    async fn stopped(self) {
        Hub::stopped(self).await
    }
}

/// The audit note kind of a runbook's check change: `runbook.` and the
/// word its detail starts with (`ran`, `running`, `failed`, `blocked`,
/// `dry-run`, `tripped`, `reset`).
fn runbook_note_kind(detail: &str) -> String {
    let word = detail.split_once(':').map_or("", |(w, _)| w);
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') {
        format!("runbook.{word}")
    } else {
        "runbook.changed".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use trellis_node::tls::MeshCa;

    use super::*;
    use crate::client::ApiClient;
    use crate::config::{
        ApiConfig, FederationConfig, HubUplinkConfig, ReplicationConfig, StoreConfig,
    };

    fn config(dir: &Path, name: &str, peers: Vec<SocketAddr>) -> HubConfig {
        let local: SocketAddr = ([127, 0, 0, 1], 0).into();
        HubConfig {
            uplink: HubUplinkConfig {
                listen: local,
                ..Default::default()
            },
            api: ApiConfig {
                listen: local,
                ..Default::default()
            },
            store: StoreConfig {
                path: dir.join(name).join("hub.db"),
                ..Default::default()
            },
            federation: FederationConfig {
                peers,
                interval: Duration::from_millis(200),
                ..Default::default()
            },
            replication: ReplicationConfig {
                anti_entropy_every: Duration::from_millis(500),
                ..Default::default()
            },
            ..HubConfig::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_note_replicates_to_another_hub_and_leaves_the_desired_state_alone() {
        trellis_node::tls::install_crypto_provider();
        let ca = MeshCa::generate("test").unwrap();
        let creds = |name: &str| {
            Credentials::issue(&ca, &Identity::new(Role::Hub, "eu", "", name).unwrap()).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let a = Hub::start(
            creds("hub-a"),
            config(dir.path(), "hub-a", vec![]),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let b = Hub::start(
            creds("hub-b"),
            config(dir.path(), "hub-b", vec![a.federation_addr()]),
            shutdown.clone(),
        )
        .await
        .unwrap();

        let note = a
            .note("hub-a", "config.applied", "web-01", "sha256 ab12")
            .await
            .unwrap();
        assert_eq!((note.entry.origin.as_str(), note.entry.seq), ("hub-a", 1));
        assert!(matches!(
            a.note("hub-a", "", "web-01", "").await,
            Err(NoteError::NoKind)
        ));
        let huge = "x".repeat(MAX_NOTE_BYTES);
        assert!(matches!(
            a.note("hub-a", "drift.found", "web-01", &huge).await,
            Err(NoteError::TooLarge(_))
        ));

        // hub-b gets it, by push or by anti-entropy.
        let at_b = ApiClient::new(&format!("http://{}", b.api_addr())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let trail = loop {
            let trail = at_b.audit(None, None, 10).await.unwrap();
            if !trail.entries.is_empty() || Instant::now() > deadline {
                break trail;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(trail.entries.len(), 1, "hub-b never got the note");
        let e = &trail.entries[0];
        assert_eq!((e.origin.as_str(), e.seq), ("hub-a", 1));
        assert_eq!(e.op_text, "note config.applied web-01: sha256 ab12");
        assert_eq!(e.hash, hex(&note.hash()));
        let desired = at_b.desired().await.unwrap();
        assert!(desired.keys.is_empty(), "{:?}", desired.keys);
        assert_eq!(
            desired.version_vector,
            VersionVector::from([("hub-a".to_owned(), 1)])
        );
        let verdict = at_b.audit_verify().await.unwrap();
        assert!(verdict.ok, "{:?}", verdict.problems);
        assert_eq!(verdict.hub, "hub-b");
        assert_eq!(verdict.checked.get("hub-a"), Some(&1));

        shutdown.cancel();
        a.stopped().await;
        b.stopped().await;
    }
}
