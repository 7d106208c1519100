//! The relay process: a gossip member of its site, the task that owns the
//! [`RelayCore`], and the uplink to a hub.
//!
//! Tasks and what they own:
//! - the core task owns the core; it samples the site's gossip, feeds the
//!   core and hands records to the current connection's writer;
//! - the uplink task connects to a hub (trying each in turn, with backoff),
//!   says hello, then writes records and forwards acks to the core task; a
//!   reader task per connection reads acks, a responder task answers the
//!   hub's requests;
//! - the health task publishes the relay's own health in gossip.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_node::agent::{SiteMember, StartError, serve_metrics};
use trellis_node::authz::Protocol;
use trellis_node::clock::unix_ms;
use trellis_node::endpoint::{MeshEndpoint, close};
use trellis_node::gossip::SiteGossip;
use trellis_node::id::Role;
use trellis_node::metrics::Registry;
use trellis_node::tls::Credentials;
use trellis_node::wire::{self, WireError};

use crate::config::RelayConfig;
use crate::core::RelayCore;
use crate::uplink::{
    HubMsg, MAX_UPLINK_FRAME, Record, RelayMsg, Request, Response, UPLINK_VERSION,
};

/// Largest request a hub may send on a request stream.
const MAX_REQUEST: usize = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The relay's own metrics.
#[derive(Clone, Default)]
struct RelayMetrics {
    connected: Gauge,
    records_made: Counter,
    records_dropped: Counter,
    acked_through: Gauge,
    outbox: Gauge,
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
            "records_dropped",
            "Records dropped unacknowledged because the outbox was full",
            m.records_dropped.clone(),
        );
        r.register(
            "acked_through",
            "Highest sequence number a hub acknowledged",
            m.acked_through.clone(),
        );
        r.register(
            "outbox_records",
            "Records waiting for a hub's acknowledgement",
            m.outbox.clone(),
        );
        r.register(
            "hub_requests",
            "Requests answered for hubs",
            m.requests.clone(),
        );
        m
    }
}

/// What the uplink tells the core task. `conn` numbers connections so that
/// news from a connection already replaced is ignored.
enum Input {
    Connected {
        conn: u64,
        acked: u64,
        records: mpsc::Sender<Record>,
        cancel: CancellationToken,
    },
    Ack {
        conn: u64,
        through: u64,
    },
    Disconnected {
        conn: u64,
    },
}

struct Current {
    id: u64,
    records: mpsc::Sender<Record>,
    cancel: CancellationToken,
}

async fn core_task(
    mut core: RelayCore,
    gossip: Arc<SiteGossip>,
    sample_interval: Duration,
    mut inputs: mpsc::Receiver<Input>,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    let mut current: Option<Current> = None;
    let mut tick = trellis_node::clock::ticker(sample_interval);
    let mut seen = core.stats();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            input = inputs.recv() => match input {
                None => break,
                Some(Input::Connected { conn, acked, records, cancel }) => {
                    core.handle_connected(acked);
                    if let Some(old) = current.replace(Current { id: conn, records, cancel }) {
                        old.cancel.cancel();
                    }
                }
                Some(Input::Ack { conn, through }) if current.as_ref().is_some_and(|c| c.id == conn) => {
                    if let Err(error) = core.handle_ack(Instant::now(), through) {
                        warn!(%error, "hub broke the uplink protocol; reconnecting");
                        drop_connection(&mut core, &mut current);
                    }
                }
                Some(Input::Disconnected { conn }) if current.as_ref().is_some_and(|c| c.id == conn) => {
                    drop_connection(&mut core, &mut current);
                }
                Some(_) => {} // news from a connection already replaced
            },
            _ = tick.tick() => {
                let view = gossip.view().await;
                let now = Instant::now();
                core.handle_view(now, unix_ms(), &view);
                if current.is_some() && core.ack_overdue(now) {
                    warn!("hub stopped acknowledging records; reconnecting");
                    drop_connection(&mut core, &mut current);
                }
            }
        }
        if let Some(c) = &current {
            while let Ok(permit) = c.records.try_reserve() {
                match core.poll_transmit(Instant::now()) {
                    Some(record) => permit.send(record),
                    None => break,
                }
            }
        }
        let stats = core.stats();
        metrics
            .records_made
            .inc_by(stats.records_made - seen.records_made);
        metrics
            .records_dropped
            .inc_by(stats.records_dropped - seen.records_dropped);
        metrics.acked_through.set(stats.acked_through as i64);
        metrics.outbox.set(stats.outbox_len as i64);
        metrics.connected.set(i64::from(current.is_some()));
        seen = stats;
    }
}

fn drop_connection(core: &mut RelayCore, current: &mut Option<Current>) {
    if let Some(c) = current.take() {
        c.cancel.cancel();
    }
    core.handle_disconnected();
}

/// Connects to the hubs in turn, forever (until shutdown).
async fn uplink_task(
    endpoint: MeshEndpoint,
    hubs: Vec<String>,
    stream: u64,
    inputs: mpsc::Sender<Input>,
    gossip: Arc<SiteGossip>,
    metrics: RelayMetrics,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::ZERO;
    let mut conn_id = 0u64;
    for hub in hubs.iter().cycle() {
        if shutdown.is_cancelled() {
            break;
        }
        conn_id += 1;
        let started = Instant::now();
        match session(
            &endpoint, hub, stream, conn_id, &inputs, &gossip, &metrics, &shutdown,
        )
        .await
        {
            Ok(()) => info!(%hub, "uplink closed"),
            Err(error) => warn!(%hub, %error, "uplink failed"),
        }
        let _ = inputs.send(Input::Disconnected { conn: conn_id }).await;
        // A session that lasted a while resets the backoff.
        backoff = if started.elapsed() > Duration::from_secs(30) {
            Duration::from_millis(250)
        } else {
            (backoff * 2).clamp(Duration::from_millis(250), MAX_BACKOFF)
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    endpoint: &MeshEndpoint,
    hub: &str,
    stream: u64,
    conn_id: u64,
    inputs: &mpsc::Sender<Input>,
    gossip: &Arc<SiteGossip>,
    metrics: &RelayMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let addr: SocketAddr = tokio::net::lookup_host(hub)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{hub} resolves to no address"))?;
    let (conn, peer) = endpoint.connect(addr, Protocol::Uplink).await?;
    let cancel = shutdown.child_token();
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        wire::write_msg(
            &mut send,
            UPLINK_VERSION,
            &RelayMsg::Hello { stream },
            MAX_UPLINK_FRAME,
        )
        .await?;
        let welcome = tokio::time::timeout(
            IO_TIMEOUT,
            wire::read_msg::<HubMsg>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no welcome from the hub within {IO_TIMEOUT:?}"))??;
        let Some(HubMsg::Welcome {
            hub: hub_name,
            acked,
        }) = welcome
        else {
            anyhow::bail!("hub did not start with a welcome: {welcome:?}");
        };
        info!(hub = %hub_name, %addr, %peer, resume_after = acked, "uplink connected");
        let (tx, mut rx) = mpsc::channel::<Record>(64);
        inputs
            .send(Input::Connected {
                conn: conn_id,
                acked,
                records: tx,
                cancel: cancel.clone(),
            })
            .await?;
        tokio::spawn(read_acks(recv, conn_id, inputs.clone(), cancel.clone()));
        tokio::spawn(answer_requests(
            conn.clone(),
            gossip.clone(),
            metrics.clone(),
            cancel.clone(),
        ));
        loop {
            let record = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = rx.recv() => match r { Some(r) => r, None => break },
            };
            let frame = wire::encode(UPLINK_VERSION, &RelayMsg::Record(record), MAX_UPLINK_FRAME)?;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = wire::write_frame(&mut send, &frame) => r?,
            }
        }
        anyhow::Ok(())
    }
    .await;
    cancel.cancel();
    conn.close(close::DONE, b"bye");
    result
}

async fn read_acks(
    mut recv: quinn::RecvStream,
    conn: u64,
    inputs: mpsc::Sender<Input>,
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

async fn answer_requests(
    conn: quinn::Connection,
    gossip: Arc<SiteGossip>,
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
                    Response::Nodes(view.current_members().into_iter().cloned().collect())
                }
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
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Starts the relay. Returns once everything is bound; runs until
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
        let identity = creds.identity.clone();
        let mut registry = Registry::default();
        let member = SiteMember::start(
            creds,
            &cfg.gossip,
            &cfg.health,
            &cfg.checks,
            &mut registry,
            &shutdown,
        )
        .await?;
        let relay_metrics = RelayMetrics::register(&mut registry);
        let gossip = member.gossip.clone();
        let metrics_addr =
            serve_metrics(&cfg.metrics, Arc::new(registry), shutdown.child_token()).await?;
        // A new record stream per start: nothing is kept across restarts
        // yet, so a hub must not take our seq 1 for a replay.
        let stream = rand::random::<u64>();
        let core = RelayCore::new(identity.name.clone(), stream, cfg.uplink.core());
        let (tx, rx) = mpsc::channel(64);
        let tasks = vec![
            tokio::spawn(core_task(
                core,
                gossip.clone(),
                cfg.uplink.sample_interval,
                rx,
                relay_metrics.clone(),
                shutdown.child_token(),
            )),
            tokio::spawn(uplink_task(
                member.endpoint.clone(),
                cfg.uplink.hubs.clone(),
                stream,
                tx,
                gossip,
                relay_metrics,
                shutdown.child_token(),
            )),
        ];
        info!(
            %identity,
            gossip = %member.endpoint.local_addr(),
            hubs = ?cfg.uplink.hubs,
            metrics = %metrics_addr.map_or("off".to_owned(), |a| a.to_string()),
            "relay ready"
        );
        Ok(Relay {
            member,
            metrics_addr,
            tasks,
        })
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.endpoint.local_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn gossip(&self) -> &SiteGossip {
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
