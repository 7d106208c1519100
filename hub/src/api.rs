//! The hub's HTTP API (JSON under `/api/v1`, Prometheus text at `/metrics`)
//! and the types it returns, shared with the CLI.

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use trellis_node::id::Role;
use trellis_node::site::{MemberView, Status};

use crate::core::StoredEvent;
use crate::driver::{DrillError, Input, Shared};

/// One check of a node, in `GET /api/v1/sites/{site}/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRow {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// One member of a site, in `GET /api/v1/sites/{site}/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub name: String,
    pub role: Option<Role>,
    pub alive: bool,
    pub status: Status,
    pub cpu_pct: Option<u8>,
    pub mem_pct: Option<u8>,
    pub disk_pct: Option<u8>,
    pub load1: Option<f32>,
    pub generation: u64,
    pub gossip_addr: String,
    pub checks: Vec<CheckRow>,
}

impl From<MemberView> for NodeRow {
    fn from(m: MemberView) -> Self {
        NodeRow {
            name: m.name,
            role: m.health.role,
            alive: m.alive,
            status: m.health.status,
            cpu_pct: m.health.cpu_pct,
            mem_pct: m.health.mem_pct,
            disk_pct: m.health.disk_pct,
            load1: m.health.load1,
            generation: m.generation,
            gossip_addr: m.gossip_addr.to_string(),
            checks: m
                .health
                .checks
                .into_iter()
                .map(|(name, r)| CheckRow {
                    name,
                    status: r.status,
                    detail: r.detail,
                })
                .collect(),
        }
    }
}

/// `GET /api/v1/sites/{site}/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodesReport {
    pub region: String,
    pub site: String,
    pub relay: String,
    pub nodes: Vec<NodeRow>,
}

/// `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsReport {
    pub events: Vec<StoredEvent>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(ApiError {
            error: message.into(),
        }),
    )
        .into_response()
}

impl IntoResponse for DrillError {
    fn into_response(self) -> Response {
        let status = match self {
            DrillError::NotConnected(_) | DrillError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            DrillError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            DrillError::Relay { .. } => StatusCode::BAD_GATEWAY,
        };
        error(status, self.to_string())
    }
}

pub(crate) fn router(shared: Shared) -> Router {
    let metrics = trellis_node::metrics::router(shared.registry.clone());
    Router::new()
        .route("/", get(index))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/sites/{site}/nodes", get(site_nodes))
        .route("/api/v1/events", get(events))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see GET /") })
        .with_state(shared)
        .merge(metrics)
}

async fn index() -> &'static str {
    concat!(
        "Trellis hub ",
        env!("CARGO_PKG_VERSION"),
        "\n\n",
        "GET /api/v1/fleet                      every site: counts, status, last heard\n",
        "GET /api/v1/sites/{site}/nodes[?region=R]  a site's nodes, live from its relay\n",
        "GET /api/v1/events[?limit=N]           recent node and check events\n",
        "GET /metrics                           Prometheus metrics\n",
    )
}

async fn fleet(State(shared): State<Shared>) -> Response {
    match shared.fleet().await {
        Ok(f) => axum::Json(f).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct SiteQuery {
    region: Option<String>,
}

async fn site_nodes(
    State(shared): State<Shared>,
    Path(site): Path<String>,
    Query(q): Query<SiteQuery>,
) -> Response {
    let fleet = match shared.fleet().await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let matches: Vec<_> = fleet
        .sites
        .iter()
        .filter(|s| s.site == site && q.region.as_ref().is_none_or(|r| *r == s.region))
        .collect();
    let row = match matches.as_slice() {
        [] => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no site {site:?} has reported to this hub; see GET /api/v1/fleet"),
            );
        }
        [one] => *one,
        many => {
            let regions: Vec<&str> = many.iter().map(|s| s.region.as_str()).collect();
            return error(
                StatusCode::CONFLICT,
                format!(
                    "site {site:?} exists in regions {}; add ?region=",
                    regions.join(", ")
                ),
            );
        }
    };
    let key = (row.region.clone(), row.site.clone());
    match shared.site_nodes(&key).await {
        Ok((relay, members)) => axum::Json(NodesReport {
            region: key.0,
            site: key.1,
            relay,
            nodes: members.into_iter().map(NodeRow::from).collect(),
        })
        .into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn events(State(shared): State<Shared>, Query(q): Query<EventsQuery>) -> Response {
    let limit = q.limit.unwrap_or(100).min(crate::core::MAX_EVENTS);
    match shared.ask(|reply| Input::Events { limit, reply }).await {
        Some(events) => axum::Json(EventsReport { events }).into_response(),
        None => DrillError::ShuttingDown.into_response(),
    }
}
