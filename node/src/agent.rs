//! The node agent: binds the endpoint, joins the site's gossip, and
//! publishes its health on every tick until shut down.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::authz::Protocol;
use crate::config::{CheckConfig, GossipConfig, HealthConfig, MetricsConfig, NodeConfig};
use crate::endpoint::MeshEndpoint;
use crate::gossip::Gossip;
use crate::health::{self, Checks, ResourceSampler};
use crate::metrics::{self, MeshMetrics, Registry};
use crate::tls::Credentials;

/// Why a member could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    #[error("cannot serve metrics on {addr}: {source} (set [metrics] listen, or enabled = false)")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot join gossip: {0}")]
    Gossip(anyhow::Error),
    #[error("{0}")]
    Other(String),
}

/// Binds `/metrics` if enabled and serves `registry` until `shutdown`.
pub async fn serve_metrics(
    cfg: &MetricsConfig,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, StartError> {
    if !cfg.enabled {
        return Ok(None);
    }
    let want = cfg.listen_addr();
    let listener = tokio::net::TcpListener::bind(want)
        .await
        .map_err(|source| StartError::Metrics { addr: want, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Metrics { addr: want, source })?;
    tokio::spawn(async move {
        if let Err(error) = metrics::serve(listener, registry, shutdown.cancelled_owned()).await {
            warn!(%error, "metrics server stopped");
        }
    });
    Ok(Some(addr))
}

/// Samples health and publishes it in gossip every `cfg.interval` until
/// `shutdown`; keeps the membership gauges current.
pub async fn publish_health_loop(
    gossip: Arc<Gossip>,
    role: crate::id::Role,
    cfg: HealthConfig,
    checks: Checks,
    metrics: MeshMetrics,
    shutdown: CancellationToken,
) {
    let mut sampler = ResourceSampler::new();
    let mut tick = crate::clock::ticker(cfg.interval);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // sysinfo reads /proc synchronously; keep it off the async threads.
        let (s, resources) = tokio::task::spawn_blocking(move || {
            let r = sampler.sample();
            (sampler, r)
        })
        .await
        .expect("sampler does not panic");
        sampler = s;
        let health = health::assess(role, &resources, &checks.results(), &cfg);
        gossip.publish(&health).await;
        let view = gossip.view().await;
        let current = view.current_members();
        let alive = current.iter().filter(|m| m.alive).count();
        metrics.gossip_members_alive.set(alive as i64);
        metrics
            .gossip_members_dead
            .set((current.len() - alive) as i64);
    }
}

/// What every member of a site's gossip runs, nodes and relays alike: the
/// endpoint (serving gossip), the user checks, the gossip itself and the
/// task that publishes health.
pub struct SiteMember {
    pub endpoint: MeshEndpoint,
    pub gossip: Arc<Gossip>,
    health_task: JoinHandle<()>,
}

impl SiteMember {
    /// Binds the endpoint, starts the checks, joins gossip and starts
    /// publishing health. Registers the mesh metrics into `registry`.
    pub async fn start(
        creds: Credentials,
        gossip: &GossipConfig,
        health_cfg: &HealthConfig,
        checks: &[CheckConfig],
        registry: &mut Registry,
        shutdown: &CancellationToken,
    ) -> Result<Self, StartError> {
        let role = creds.identity.role;
        let mesh_metrics = MeshMetrics::register(registry);
        let (endpoint, mut routes) = MeshEndpoint::bind(
            creds,
            gossip.listen_addr(),
            &[Protocol::Gossip],
            mesh_metrics.clone(),
        )?;
        let checks = Checks::start(checks, shutdown.child_token());
        let first = health::assess(role, &Default::default(), &checks.results(), health_cfg);
        let site_gossip = Gossip::start(
            endpoint.clone(),
            routes.take(Protocol::Gossip),
            &gossip.settings(),
            &first,
            shutdown.child_token(),
        )
        .await
        .map_err(StartError::Gossip)?;
        let site_gossip = Arc::new(site_gossip);
        let health_task = tokio::spawn(publish_health_loop(
            site_gossip.clone(),
            role,
            health_cfg.clone(),
            checks,
            mesh_metrics,
            shutdown.child_token(),
        ));
        Ok(SiteMember {
            endpoint,
            gossip: site_gossip,
            health_task,
        })
    }

    /// Waits for the health task to end (after shutdown), then leaves
    /// gossip and closes the endpoint.
    pub async fn stopped(self) {
        let _ = self.health_task.await;
        if let Ok(gossip) = Arc::try_unwrap(self.gossip) {
            gossip.shutdown().await;
        }
        self.endpoint.shutdown().await;
    }
}

/// A running node agent.
pub struct NodeAgent {
    member: SiteMember,
    metrics_addr: Option<SocketAddr>,
}

impl NodeAgent {
    /// Starts the agent: endpoint, gossip, checks, metrics. Returns once
    /// everything is bound; runs until `shutdown` is cancelled.
    pub async fn start(
        creds: Credentials,
        cfg: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
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
        let metrics_addr =
            serve_metrics(&cfg.metrics, Arc::new(registry), shutdown.child_token()).await?;
        info!(
            identity = %member.endpoint.identity(),
            gossip = %member.gossip.advertise_addr(),
            metrics = %metrics_addr.map_or("off".to_owned(), |a| a.to_string()),
            "node ready"
        );
        Ok(NodeAgent {
            member,
            metrics_addr,
        })
    }

    /// The address the site reaches this node at.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.gossip.advertise_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn gossip(&self) -> &Gossip {
        &self.member.gossip
    }

    /// Waits for the agent to stop (after `shutdown` was cancelled).
    pub async fn stopped(self) {
        self.member.stopped().await;
    }
}

impl crate::cli::Running for NodeAgent {
    async fn stopped(self) {
        NodeAgent::stopped(self).await
    }
}
