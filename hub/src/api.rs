//! The hub's HTTP API: JSON under `/api/v1`, Prometheus text at `/metrics`.
//! The response shapes live in [`trellis_relay::report`] (shared with the
//! relay's local API) and [`crate::store::StoredRecord`].

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
pub use trellis_relay::report::{ApiError, CheckRow, NodeRow, NodesReport};

use crate::driver::{DrillError, Shared};
use crate::store::{self, StoredRecord};

/// Records returned by one history or events request, at most.
pub const MAX_LIMIT: usize = 10_000;

/// `GET /api/v1/sites/{site}/history` and `GET /api/v1/events`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordsReport {
    pub records: Vec<StoredRecord>,
    /// Whether `limit` cut the list (ask again from the last `at_ms`).
    pub truncated: bool,
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
        .route("/api/v1/sites/{site}/history", get(history))
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
        "GET /api/v1/fleet                           every site: counts, status, last heard\n",
        "GET /api/v1/sites/{site}/nodes[?region=R]   a site's nodes, live from its relay\n",
        "GET /api/v1/sites/{site}/history            a site's records (summaries, events, gaps)\n",
        "    [?region=R&from=MS&to=MS&kind=K&limit=N]    times in ms since the Unix epoch\n",
        "GET /api/v1/events[?site=S&region=R&since=MS&limit=N]   events and gaps, oldest first\n",
        "GET /metrics                                Prometheus metrics\n",
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

/// Finds a site's region from the fleet view.
async fn locate(
    shared: &Shared,
    site: &str,
    region: Option<&str>,
) -> Result<(String, String), Response> {
    let fleet = shared.fleet().await.map_err(|e| e.into_response())?;
    let regions: Vec<String> = fleet
        .sites
        .iter()
        .filter(|s| s.site == site && region.is_none_or(|r| r == s.region))
        .map(|s| s.region.clone())
        .collect();
    match regions.as_slice() {
        [] => Err(error(
            StatusCode::NOT_FOUND,
            format!("no site {site:?} has reported to this hub; see GET /api/v1/fleet"),
        )),
        [one] => Ok((one.clone(), site.to_owned())),
        many => Err(error(
            StatusCode::CONFLICT,
            format!(
                "site {site:?} exists in regions {}; add ?region=",
                many.join(", ")
            ),
        )),
    }
}

async fn site_nodes(
    State(shared): State<Shared>,
    Path(site): Path<String>,
    Query(q): Query<SiteQuery>,
) -> Response {
    let key = match locate(&shared, &site, q.region.as_deref()).await {
        Ok(k) => k,
        Err(r) => return r,
    };
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
struct HistoryQuery {
    region: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
    /// Comma-separated kinds: `summary`, `gap`, `node_died`, …
    kind: Option<String>,
    limit: Option<usize>,
}

async fn run_query(shared: &Shared, q: store::Query) -> Response {
    let limit = q.limit;
    let reader = shared.store.clone();
    let mut asked = q;
    asked.limit = limit + 1;
    match tokio::task::spawn_blocking(move || reader.records(&asked)).await {
        Ok(Ok(mut records)) => {
            let truncated = records.len() > limit;
            records.truncate(limit);
            axum::Json(RecordsReport { records, truncated }).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn history(
    State(shared): State<Shared>,
    Path(site): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Response {
    let (region, site) = match locate(&shared, &site, q.region.as_deref()).await {
        Ok(k) => k,
        Err(r) => return r,
    };
    let query = store::Query {
        region: Some(region),
        site: Some(site),
        from_ms: q.from,
        to_ms: q.to,
        kinds: q
            .kind
            .map(|k| k.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_default(),
        no_summaries: false,
        limit: q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT),
    };
    run_query(&shared, query).await
}

#[derive(Deserialize)]
struct EventsQuery {
    site: Option<String>,
    region: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(shared): State<Shared>, Query(q): Query<EventsQuery>) -> Response {
    let query = store::Query {
        region: q.region,
        site: q.site,
        from_ms: q.since,
        to_ms: None,
        kinds: Vec::new(),
        no_summaries: true,
        limit: q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT),
    };
    run_query(&shared, query).await
}
