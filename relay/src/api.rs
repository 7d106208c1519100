//! The relay's local read API: the site and its nodes, in the same shapes
//! as the hub's, served from the relay itself so the site stays visible
//! through a WAN outage (`trellis status --relay URL`).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;
use trellis_node::gossip::Gossip;

use crate::buffer::BufferStats;
use crate::report::{FleetReport, FleetTotals, NodeRow, NodesReport, RelayStatus, SiteRow};
use crate::summary::SiteSummary;

/// What the core task tells the API about the relay.
#[derive(Clone, Default)]
pub(crate) struct LocalState {
    pub summary: Option<(SiteSummary, Instant)>,
    pub hub: Option<String>,
    pub persisted_through: u64,
    pub acked_through: u64,
    /// Members left out of the site's views (decommissioned, reaped).
    pub hidden: std::collections::BTreeSet<String>,
}

/// What the local API handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub name: String,
    pub region: String,
    pub site: String,
    pub gossip: Arc<Gossip>,
    pub local: watch::Receiver<LocalState>,
    pub buffer: Arc<Mutex<BufferStats>>,
}

pub(crate) fn api_router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/site", get(api_site))
        .route("/api/v1/site/nodes", get(api_nodes))
        .with_state(state)
}

async fn api_site(State(s): State<ApiState>) -> Response {
    let local = s.local.borrow().clone();
    let buffer = *s.buffer.lock().expect("not poisoned");
    let connected = local.hub.is_some();
    let sites: Vec<SiteRow> = local
        .summary
        .iter()
        .map(|(summary, at)| {
            SiteRow::new(summary, summary.status(), at.elapsed().as_secs(), connected)
        })
        .collect();
    axum::Json(FleetReport {
        hub: s.name.clone(),
        totals: FleetTotals::of(&sites),
        sites,
        relay: Some(RelayStatus {
            uplink_connected: connected,
            hub: local.hub,
            buffered_records: buffer.rows,
            buffered_bytes: buffer.bytes,
            buffer_max_bytes: buffer.max_bytes,
            persisted_through: local.persisted_through,
            acked_through: local.acked_through,
        }),
    })
    .into_response()
}

async fn api_nodes(State(s): State<ApiState>) -> Response {
    let view = s.gossip.view().await;
    let hidden = s.local.borrow().hidden.clone();
    axum::Json(NodesReport {
        region: s.region,
        site: s.site,
        relay: s.name,
        nodes: view
            .current_members()
            .into_iter()
            .filter(|m| !hidden.contains(&m.name))
            .cloned()
            .map(NodeRow::from)
            .collect(),
    })
    .into_response()
}
