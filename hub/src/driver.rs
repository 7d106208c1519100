//! The hub process: the QUIC endpoint relays connect to, the task that owns
//! the [`HubCore`], and the HTTP API.
//!
//! Each relay connection has its own task: it reads the control stream,
//! asks the core task to apply each record and writes the ack the core
//! returns. The API asks the core task for snapshots and, for drill-down,
//! opens a request stream on the site's relay connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_node::agent::StartError;
use trellis_node::authz::Protocol;
use trellis_node::endpoint::{Accepted, MeshEndpoint, close};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::{MeshMetrics, Registry};
use trellis_node::site::MemberView;
use trellis_node::tls::Credentials;
use trellis_node::wire::{self, WireError};
use trellis_relay::summary::SiteKey;
use trellis_relay::uplink::{
    HubMsg, MAX_UPLINK_FRAME, Record, RelayMsg, Request, Response, UPLINK_VERSION,
};

use crate::api;
use crate::config::HubConfig;
use crate::core::{FleetReport, HubCore, RecordError, StoredEvent};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The hub's own metrics.
#[derive(Clone, Default)]
struct HubMetrics {
    relays_connected: Gauge,
    records_applied: Counter,
    duplicates: Counter,
    rejected: Counter,
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
            "Relay records applied",
            m.records_applied.clone(),
        );
        r.register(
            "duplicate_records",
            "Relay records received again and ignored",
            m.duplicates.clone(),
        );
        r.register(
            "rejected_records",
            "Relay records refused (wrong site, no hello)",
            m.rejected.clone(),
        );
        m
    }
}

/// Requests to the core task.
pub(crate) enum Input {
    Hello {
        relay: Identity,
        stream: u64,
        reply: oneshot::Sender<u64>,
    },
    Record {
        relay: Identity,
        record: Record,
        reply: oneshot::Sender<Result<u64, RecordError>>,
    },
    Disconnected {
        relay: Identity,
    },
    Fleet {
        reply: oneshot::Sender<FleetReport>,
    },
    Events {
        limit: usize,
        reply: oneshot::Sender<Vec<StoredEvent>>,
    },
}

async fn core_task(
    mut core: HubCore,
    mut inputs: mpsc::Receiver<Input>,
    metrics: HubMetrics,
    shutdown: CancellationToken,
) {
    let mut seen = core.stats();
    loop {
        let input = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            i = inputs.recv() => match i { Some(i) => i, None => break },
        };
        let now = Instant::now();
        match input {
            Input::Hello {
                relay,
                stream,
                reply,
            } => {
                let _ = reply.send(core.handle_hello(now, &relay, stream));
            }
            Input::Record {
                relay,
                record,
                reply,
            } => {
                let _ = reply.send(core.handle_record(now, &relay, record));
            }
            Input::Disconnected { relay } => core.handle_disconnected(&relay),
            Input::Fleet { reply } => {
                let _ = reply.send(core.fleet(now));
            }
            Input::Events { limit, reply } => {
                let _ = reply.send(core.events(limit));
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
        Err(ServeError::Silent) => {
            warn!(relay = %peer, %remote, ?silence, "relay went silent; closing its uplink");
            conn.close(close::DONE, b"silent too long");
        }
        Ok(()) => debug!(relay = %peer, "uplink ended"),
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

async fn read(recv: &mut quinn::RecvStream) -> Result<Option<RelayMsg>, ServeError> {
    match wire::read_msg::<RelayMsg>(recv, UPLINK_VERSION, MAX_UPLINK_FRAME).await {
        Err(WireError::Stream(e)) => Err(ServeError::Gone(e)),
        Err(e) => Err(ServeError::Peer(e)),
        Ok(m) => Ok(m),
    }
}

enum ServeError {
    /// The relay sent something malformed.
    Peer(WireError),
    /// The relay sent a well-formed message out of place.
    Unexpected(&'static str),
    Refused(RecordError),
    /// The connection or the hub went away.
    Gone(String),
    /// Nothing arrived for longer than the silence timeout.
    Silent,
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
    let (mut send, mut recv) = tokio::time::timeout(IO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| ServeError::Gone("no control stream".into()))?
        .map_err(|e| gone(&e))?;
    let stream = match tokio::time::timeout(IO_TIMEOUT, read(&mut recv))
        .await
        .map_err(|_| ServeError::Gone("no hello".into()))??
    {
        Some(RelayMsg::Hello { stream }) => stream,
        Some(RelayMsg::Record(_)) => return Err(ServeError::Unexpected("record before hello")),
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
    info!(relay = %peer, remote = %conn.remote_address(), resume_after = acked, "relay connected");
    loop {
        // Dropping a half-read frame is fine here: shutdown closes the
        // connection anyway.
        let msg = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(silence) => return Err(ServeError::Silent),
            m = read(&mut recv) => m?,
        };
        let record = match msg {
            None => return Ok(()),
            Some(RelayMsg::Record(r)) => r,
            Some(RelayMsg::Hello { .. }) => {
                return Err(ServeError::Unexpected("second hello on the control stream"));
            }
        };
        let ack = shared
            .ask(|reply| Input::Record {
                relay: peer.clone(),
                record,
                reply,
            })
            .await
            .ok_or_else(|| ServeError::Gone("hub shutting down".into()))?
            .map_err(ServeError::Refused)?;
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

/// A running hub.
pub struct Hub {
    endpoint: MeshEndpoint,
    api_addr: SocketAddr,
    shared: Shared,
    tasks: Vec<JoinHandle<()>>,
}

impl Hub {
    /// Starts the hub. Returns once the endpoint and the API are bound; runs
    /// until `shutdown` is cancelled.
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
        let (core_tx, core_rx) = mpsc::channel(1024);
        let shared = Shared {
            core: core_tx,
            relays: Arc::new(Mutex::new(HashMap::new())),
            registry: Arc::new(registry),
        };
        let core = HubCore::new(name.clone(), cfg.fleet.stale_after);
        let mut tasks = vec![tokio::spawn(core_task(
            core,
            core_rx,
            hub_metrics.clone(),
            shutdown.child_token(),
        ))];
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
