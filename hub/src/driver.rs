//! The hub process: the QUIC endpoint relays connect to, the task that owns
//! the [`HubCore`], the store's writer thread, and the HTTP API.
//!
//! Each relay connection has a reader task (frames → channel) and a task
//! that takes whatever records have arrived, asks the core task to apply
//! them and writes the ack it returns. The core task gathers the records of
//! every connection that are waiting, takes the new ones, has the store
//! commit them in one transaction, and only then applies them to the fleet
//! view and answers with acks (persist, then acknowledge).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trellis_node::agent::StartError;
use trellis_node::authz::Protocol;
use trellis_node::clock::{ticker, unix_ms};
use trellis_node::endpoint::{Accepted, MeshEndpoint, close};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::{MeshMetrics, Registry};
use trellis_node::site::MemberView;
use trellis_node::tls::Credentials;
use trellis_node::wire::{self, WireError};
use trellis_relay::report::FleetReport;
use trellis_relay::summary::SiteKey;
use trellis_relay::uplink::{
    HubMsg, MAX_UPLINK_FRAME, Record, RelayMsg, Request, Response, UPLINK_VERSION,
};

use crate::api;
use crate::config::HubConfig;
use crate::core::{Fresh, HubCore, RecordError};
use crate::store::{Batch, HubStore, StoreError, StoreReader, stored};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
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
        reply: oneshot::Sender<u64>,
    },
    Records {
        relay: Identity,
        records: Vec<Record>,
        reply: oneshot::Sender<Result<u64, ApplyError>>,
    },
    Disconnected {
        relay: Identity,
    },
    Fleet {
        reply: oneshot::Sender<FleetReport>,
    },
}

enum StoreCmd {
    Commit {
        batch: Batch,
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

async fn core_task(
    mut core: HubCore,
    store: std::sync::mpsc::Sender<StoreCmd>,
    mut inputs: mpsc::Receiver<Input>,
    metrics: HubMetrics,
    shutdown: CancellationToken,
) {
    let mut seen = core.stats();
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
        let mut work: Vec<(Fresh, oneshot::Sender<Result<u64, ApplyError>>)> = Vec::new();
        for input in pending {
            match input {
                Input::Hello {
                    relay,
                    stream,
                    reply,
                } => {
                    let _ = reply.send(core.handle_hello(now, &relay, stream));
                }
                Input::Records {
                    relay,
                    records,
                    reply,
                } => match core.take_fresh(&relay, records) {
                    Ok(fresh) => work.push((fresh, reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                },
                Input::Disconnected { relay } => core.handle_disconnected(now, &relay),
                Input::Fleet { reply } => {
                    let _ = reply.send(core.fleet(now));
                }
            }
        }
        if !work.is_empty() {
            let received_ms = unix_ms();
            let mut batch = Batch {
                records: Vec::new(),
                streams: Vec::new(),
            };
            for (f, _) in &work {
                let id = &f.relay;
                batch.records.extend(
                    f.records
                        .iter()
                        .map(|r| stored(&id.name, f.stream, &id.region, &id.site, r, received_ms)),
                );
                batch.streams.push((
                    id.name.clone(),
                    f.stream,
                    id.region.clone(),
                    id.site.clone(),
                    core.applied(&id.name, f.stream),
                ));
            }
            let committed = if batch.records.is_empty() {
                Ok(())
            } else {
                let (reply, rx) = oneshot::channel();
                if store.send(StoreCmd::Commit { batch, reply }).is_err() {
                    Err("the store thread is gone".to_owned())
                } else {
                    rx.await
                        .map_err(|_| "the store thread is gone".to_owned())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                }
            };
            match committed {
                Ok(()) => {
                    metrics.commits.inc();
                    let now = Instant::now();
                    for (fresh, reply) in work {
                        core.handle_committed(now, &fresh);
                        let _ = reply.send(Ok(core.applied(&fresh.relay.name, fresh.stream)));
                    }
                }
                Err(e) => {
                    metrics.store_errors.inc();
                    error!(error = %e, "cannot store relay records; nothing acknowledged, relays will resend");
                    for (fresh, reply) in work.into_iter().rev() {
                        core.undo(fresh);
                        let _ = reply.send(Err(ApplyError::Store(e.clone())));
                    }
                }
            }
        }
        let s = core.stats();
        metrics
            .records_applied
            .inc_by(s.records_applied - seen.records_applied);
        metrics.duplicates.inc_by(s.duplicates - seen.duplicates);
        metrics.rejected.inc_by(s.rejected - seen.rejected);
        seen = s;
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
}

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
    let _ = shared.core.send(Input::Disconnected { relay: peer }).await;
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
        .map_err(|_| ServeError::Gone("no control stream".into()))?
        .map_err(|e| gone(&e))?;
    let (tx, mut frames) = mpsc::channel(MAX_RECORDS_PER_INPUT);
    let reader = tokio::spawn(read_frames(recv, tx));
    let _stop_reader = AbortOnDrop(reader);
    let stream = match tokio::time::timeout(IO_TIMEOUT, frames.recv())
        .await
        .map_err(|_| ServeError::Gone("no hello".into()))?
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
        let now_ms = unix_ms();
        let restored_sites = summaries.len();
        let summaries = summaries
            .into_iter()
            .map(|s| {
                let age = Duration::from_millis(now_ms.saturating_sub(s.generated_ms));
                (s, age)
            })
            .collect();
        let mut core = HubCore::new(name.clone(), cfg.fleet.stale_after);
        core.restore(Instant::now(), streams, summaries);
        let store_tx = spawn_store_thread(store);

        let mut registry = Registry::default();
        let mesh_metrics = MeshMetrics::register(&mut registry);
        let hub_metrics = HubMetrics::register(&mut registry);
        let (endpoint, mut routes) = MeshEndpoint::bind(
            creds,
            cfg.uplink.listen,
            &[Protocol::Uplink],
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
        let shared = Shared {
            core: core_tx,
            relays: Arc::new(Mutex::new(HashMap::new())),
            registry: Arc::new(registry),
            store: reader,
        };
        let mut tasks = vec![tokio::spawn(core_task(
            core,
            store_tx.clone(),
            core_rx,
            hub_metrics.clone(),
            shutdown.child_token(),
        ))];
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
        let app = api::router(shared.clone());
        let sd = shutdown.child_token();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await
            {
                warn!(%error, "API server stopped");
            }
        }));
        info!(
            hub = %name,
            uplink = %endpoint.local_addr(),
            api = %format!("http://{api_addr}"),
            store = %cfg.store.path.display(),
            restored_sites,
            "hub ready"
        );
        Ok(Hub {
            endpoint,
            api_addr,
            shared,
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

    /// Waits for the hub's tasks to end after shutdown, then closes the
    /// endpoint.
    pub async fn stopped(self) {
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint.shutdown().await;
    }
}

impl trellis_node::cli::Running for Hub {
    async fn stopped(self) {
        Hub::stopped(self).await
    }
}
