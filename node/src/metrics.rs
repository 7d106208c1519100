//! Prometheus metrics: the counters every mesh member keeps, and a tiny
//! HTTP server for `/metrics`.
//!
//! Each role builds one [`Registry`], registers its metric groups into it
//! (this module's [`MeshMetrics`] first, then the role's own), freezes it in
//! an `Arc` and serves it with [`serve`] or mounts [`router`] into its API.

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The protocol asked for, or `unknown` when the handshake failed.
    pub protocol: String,
    /// `tls` (handshake failed: foreign CA, no certificate, expired…),
    /// `wrong_role`, `wrong_site`, `identity`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerErrorLabels {
    pub protocol: String,
    /// What was wrong with what the peer sent (see `WireError::kind`).
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `queue_full` (oldest message dropped for a slow peer),
    /// `unreachable` (no connection could be made), `inbox_full`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// `healed` (rewritten as applied) or `reported` (left as found:
    /// drift is only reported, or healing it failed).
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `failed` (applied in part) or `refused` (not applied).
    pub outcome: String,
}

/// Counters of the files Trellis manages on a node.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    pub drift: Family<DriftLabels, Counter>,
    pub results: Family<OutcomeLabels, Counter>,
    pub fetch_errors: Counter,
}

impl ConfigMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ConfigMetrics::default();
        registry.sub_registry_with_prefix("trellis").register(
            "config_drift",
            "Managed files found different from what was applied, by what was done about it",
            m.drift.clone(),
        );
        registry.sub_registry_with_prefix("trellis").register(
            "config_results",
            "Configuration versions this node tried, by how the attempt ended",
            m.results.clone(),
        );
        registry.sub_registry_with_prefix("trellis").register(
            "config_fetch_errors",
            "Fetches of an offered configuration bundle from the relay that failed",
            m.fetch_errors.clone(),
        );
        m
    }

    /// Counts one attempt at a version.
    pub fn result(&self, outcome: crate::distribute::Outcome) {
        self.results
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts one drifted file; `healed` says whether it was rewritten.
    pub fn drifted(&self, healed: bool) {
        let action = if healed { "healed" } else { "reported" };
        self.drift
            .get_or_create(&DriftLabels {
                action: action.to_owned(),
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchStateLabels {
    /// A [`crate::patchstate::PatchState`]: `downloading`, `installing`,
    /// `baking`, `healthy`, `failed`, `rolling-back`, `rolled-back`,
    /// `rollback-failed`.
    pub state: String,
}

/// Counters of the patches a node installs and rolls back.
#[derive(Clone, Default)]
pub struct PatchMetrics {
    pub states: Family<PatchStateLabels, Counter>,
}

impl PatchMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = PatchMetrics::default();
        registry.sub_registry_with_prefix("trellis").register(
            "node_patch_states",
            "Patch states this node entered, by state",
            m.states.clone(),
        );
        m
    }

    /// Counts one entry into `state`.
    pub fn entered(&self, state: crate::patchstate::PatchState) {
        self.states
            .get_or_create(&PatchStateLabels {
                state: state.as_str().to_owned(),
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// The check's `name` from `[[checks]]`.
    pub check: String,
}

/// Bucket bounds of check durations, in seconds: from a local TCP connect
/// (milliseconds) to a command that runs into a long timeout.
const CHECK_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn check_histogram() -> Histogram {
    Histogram::new(CHECK_BUCKETS)
}

/// How long the configured checks take: a check creeping towards its
/// timeout shows here before it turns critical.
#[derive(Clone)]
pub struct CheckMetrics {
    pub durations: Family<CheckLabels, Histogram, fn() -> Histogram>,
}

impl Default for CheckMetrics {
    fn default() -> Self {
        CheckMetrics {
            durations: Family::new_with_constructor(check_histogram),
        }
    }
}

impl CheckMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = CheckMetrics::default();
        registry
            .sub_registry_with_prefix("trellis_node")
            .register_with_unit(
                "check_duration",
                "Time each configured check took to run, timeouts included",
                prometheus_client::registry::Unit::Seconds,
                m.durations.clone(),
            );
        m
    }

    /// Records one run of `check` that took `took`.
    pub fn observe(&self, check: &str, took: std::time::Duration) {
        self.durations
            .get_or_create(&CheckLabels {
                check: check.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

/// Counters of the QUIC endpoint and the site gossip transport.
#[derive(Clone, Default)]
pub struct MeshMetrics {
    pub refusals: Family<RefusalLabels, Counter>,
    pub peer_errors: Family<PeerErrorLabels, Counter>,
    pub connections_accepted: Counter,
    pub quic_lost_packets: Family<ProtocolLabels, Counter>,
    pub quic_congestion_events: Family<ProtocolLabels, Counter>,
    pub gossip_messages_sent: Counter,
    pub gossip_bytes_sent: Counter,
    pub gossip_messages_received: Counter,
    pub gossip_bytes_received: Counter,
    pub gossip_dropped: Family<DropLabels, Counter>,
    pub gossip_members_alive: Gauge,
    pub gossip_members_dead: Gauge,
}

impl MeshMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = MeshMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis");
        r.register(
            "connection_refusals",
            "Connections refused at the handshake or by authorisation",
            m.refusals.clone(),
        );
        r.register(
            "peer_protocol_errors",
            "Connections closed because the peer sent malformed or oversized data",
            m.peer_errors.clone(),
        );
        r.register(
            "connections_accepted",
            "Connections accepted after authentication and authorisation",
            m.connections_accepted.clone(),
        );
        r.register(
            "quic_lost_packets",
            "Packets QUIC declared lost (and sent again if they carried data) on mesh \
             connections, counted when a connection closes",
            m.quic_lost_packets.clone(),
        );
        r.register(
            "quic_congestion_events",
            "Times QUIC cut its congestion window after a loss on mesh connections, counted \
             when a connection closes",
            m.quic_congestion_events.clone(),
        );
        r.register(
            "gossip_messages_sent",
            "Gossip messages written to peers",
            m.gossip_messages_sent.clone(),
        );
        r.register(
            "gossip_sent_bytes",
            "Gossip bytes written to peers (frames, before QUIC overhead)",
            m.gossip_bytes_sent.clone(),
        );
        r.register(
            "gossip_messages_received",
            "Gossip messages received from peers",
            m.gossip_messages_received.clone(),
        );
        r.register(
            "gossip_received_bytes",
            "Gossip bytes received from peers (frames)",
            m.gossip_bytes_received.clone(),
        );
        r.register(
            "gossip_dropped",
            "Gossip messages dropped instead of stalling the gossip loop",
            m.gossip_dropped.clone(),
        );
        r.register(
            "gossip_members_alive",
            "Site members the failure detector considers alive (including self)",
            m.gossip_members_alive.clone(),
        );
        r.register(
            "gossip_members_dead",
            "Site members the failure detector considers dead",
            m.gossip_members_dead.clone(),
        );
        m
    }

    pub fn refused(&self, protocol: &str, reason: &str) {
        self.refusals
            .get_or_create(&RefusalLabels {
                protocol: protocol.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Adds what a mesh connection of `protocol` lost over its life.
    pub fn connection_closed(&self, protocol: &str, stats: &quinn::ConnectionStats) {
        let labels = ProtocolLabels {
            protocol: protocol.to_owned(),
        };
        self.quic_lost_packets
            .get_or_create(&labels)
            .inc_by(stats.path.lost_packets);
        self.quic_congestion_events
            .get_or_create(&labels)
            .inc_by(stats.path.congestion_events);
    }

    pub fn peer_error(&self, protocol: &str, kind: &str) {
        self.peer_errors
            .get_or_create(&PeerErrorLabels {
                protocol: protocol.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn gossip_drop(&self, reason: &str) {
        self.gossip_dropped
            .get_or_create(&DropLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Renders a registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A router serving `GET /metrics` from `registry`.
pub fn router<S: Clone + Send + Sync + 'static>(registry: Arc<Registry>) -> Router<S> {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&registry)).into_response() }
        }),
    )
}

/// Serves `/metrics` on an already bound listener until `shutdown`, with
/// the limits of [`crate::http`].
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let limits = crate::http::Limits::metrics();
    crate::http::serve(
        listener,
        router::<()>(registry),
        limits,
        "metrics",
        shutdown,
    )
    .await
}
