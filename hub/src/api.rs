//! The hub's HTTP API: JSON under `/api/v1`, Prometheus text at `/metrics`,
//! a plain-text list of the routes at `/api`, and the web dashboard
//! ([`crate::dashboard`]) at `/`.
//! The response shapes live in [`trellis_relay::report`] (shared with the
//! relay's local API) and [`crate::store::StoredRecord`].

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
pub use trellis_relay::report::{ApiError, CheckRow, NodeRow, NodesReport};

use crate::audit::{AuditEntry, AuditProblem};
use crate::driver::{DrillError, Input, Shared};
use crate::federation::{HubRow, HubsReport};
use crate::log::{ConfigVersion, Op, VersionVector, Winner};
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

pub(crate) fn error(status: StatusCode, message: impl Into<String>) -> Response {
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

pub(crate) fn router(shared: Shared, auth: crate::apiauth::ApiAuth) -> Router {
    let metrics = trellis_node::metrics::router(shared.registry.clone());
    let auth = std::sync::Arc::new(auth);
    Router::new()
        .route("/api", get(index))
        .route("/api/v1", get(index))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/sites/{site}/nodes", get(site_nodes))
        .route("/api/v1/sites/{site}/history", get(history))
        .route("/api/v1/events", get(events))
        .route("/api/v1/hubs", get(hubs))
        .route("/api/v1/versions", get(versions))
        .route(
            "/api/v1/incidents",
            get(crate::incidentdriver::incidents_route),
        )
        .route("/api/v1/desired", get(desired))
        .route(
            "/api/v1/desired/{key}",
            axum::routing::put(put_desired).delete(delete_desired),
        )
        .route(
            "/api/v1/config",
            get(config_history)
                .post(config_apply)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_CONFIG_BODY)),
        )
        .route("/api/v1/config/status", get(config_status))
        .route(
            "/api/v1/chunks/missing",
            axum::routing::post(chunks_missing),
        )
        .route(
            "/api/v1/chunks/{hash}",
            get(chunk_get)
                .put(chunk_put)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_CHUNK_BODY)),
        )
        .route(
            "/api/v1/patches",
            get(patch_list)
                .post(patch_publish)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_PATCH_BODY)),
        )
        .route("/api/v1/patches/{name}", get(patch_show))
        .route(
            "/api/v1/patches/{name}/stage",
            axum::routing::post(patch_stage),
        )
        .route(
            "/api/v1/rollouts",
            get(crate::rolloutapi::rollout_list)
                .post(crate::rolloutapi::rollout_start)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::rolloutapi::MAX_ROLLOUT_BODY,
                )),
        )
        .route(
            "/api/v1/rollouts/{run}",
            get(crate::rolloutapi::rollout_show),
        )
        .route(
            "/api/v1/rollouts/{run}/control",
            axum::routing::post(crate::rolloutapi::rollout_control),
        )
        .route(
            "/api/v1/revocations",
            get(crate::revokeapi::list)
                .post(crate::revokeapi::revoke)
                .layer(axum::extract::DefaultBodyLimit::max(
                    crate::revokeapi::MAX_REVOCATION_BODY,
                )),
        )
        .route(
            "/api/v1/tokens",
            get(crate::enrolapi::list).post(crate::enrolapi::create),
        )
        .route("/api/v1/config/{version}", get(config_show))
        .route("/api/v1/log", get(log))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/audit/verify", get(audit_verify))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see GET /api") })
        .merge(crate::dashboard::routes())
        .with_state(shared)
        .merge(metrics)
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::apiauth::layer,
        ))
}

async fn index() -> &'static str {
    concat!(
        "Trellis hub ",
        env!("CARGO_PKG_VERSION"),
        "\n\n",
        "GET /                                       the web dashboard\n",
        "GET /api/v1/fleet                           every site: counts, status, last heard\n",
        "GET /api/v1/sites/{site}/nodes[?region=R]   a site's nodes, live from its relay\n",
        "GET /api/v1/sites/{site}/history            a site's records (summaries, events, gaps)\n",
        "    [?region=R&from=MS&to=MS&kind=K&limit=N]    times in ms since the Unix epoch\n",
        "GET /api/v1/events[?site=S&region=R&since=MS&limit=N]   events and gaps, oldest first\n",
        "GET /api/v1/hubs                            the federation's hubs and their state\n",
        "GET /api/v1/versions                        Trellis versions per site, live from the relays\n",
        "GET /api/v1/incidents[?state=open|all]      incidents (correlated faults), newest first\n",
        "GET /api/v1/desired                         the desired state (from the replicated log)\n",
        "PUT /api/v1/desired/{key}  {\"value\": V}     write; acknowledged once on write_quorum hubs\n",
        "DELETE /api/v1/desired/{key}                delete, likewise\n",
        "POST /api/v1/config   (a signed bundle)     store a new configuration version\n",
        "GET /api/v1/config                          every configuration version, newest first\n",
        "GET /api/v1/config/{version}[?format=bundle]   one version: manifests, or the signed bundle\n",
        "GET /api/v1/config/status                   per site: versions held, drift, failures\n",
        "POST /api/v1/chunks/missing {\"chunks\": [H]}  which of these chunks this hub lacks\n",
        "PUT /api/v1/chunks/{blake3}                 store a chunk (checked against its hash)\n",
        "GET /api/v1/chunks/{blake3}                 a chunk's bytes\n",
        "POST /api/v1/patches   (a signed manifest)  publish a patch whose chunks are all here\n",
        "GET /api/v1/patches                         every published patch, newest first\n",
        "GET /api/v1/patches/{name}                  a patch's versions: commands, checks, artifacts\n",
        "POST /api/v1/patches/{name}/stage[?site=S]  relays fetch its newest version's artifacts now\n",
        "POST /api/v1/rollouts   (signed)            start a patch rollout in waves\n",
        "GET /api/v1/rollouts                        every rollout, newest first\n",
        "GET /api/v1/rollouts/{run|latest}           one rollout: waves, sites, the gate's numbers\n",
        "POST /api/v1/rollouts/{run}/control (signed)   pause, resume or abort (abort rolls back)\n",
        "GET /api/v1/log[?limit=N]                   the replicated log, by (origin, seq)\n",
        "GET /api/v1/audit[?since=MS&origin=O&limit=N]   the log as an audit trail, oldest first\n",
        "GET /api/v1/audit/verify                    check this hub's stored log: signatures, chain\n",
        "GET /metrics                                Prometheus metrics\n",
    )
}

async fn fleet(State(shared): State<Shared>) -> Response {
    match shared.fleet().await {
        Ok(f) => axum::Json(f).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /api/v1/versions`: which Trellis versions run where.
#[derive(Debug, Serialize, Deserialize)]
pub struct VersionsReport {
    /// The hub that answered, and its version.
    pub hub: String,
    pub hub_version: String,
    pub sites: Vec<SiteVersions>,
}

/// One site's members by role and Trellis version (`unknown` for a member
/// that does not say), live from its relay.
#[derive(Debug, Serialize, Deserialize)]
pub struct SiteVersions {
    pub region: String,
    pub site: String,
    /// Whether the site's relay answered; if not, `error` says why and
    /// `versions` is empty.
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub versions: BTreeMap<String, BTreeMap<String, u32>>,
}

/// Relays asked at once for [`versions`].
const VERSION_ASKS_AT_ONCE: usize = 16;

async fn versions(State(shared): State<Shared>) -> Response {
    let fleet = match shared.fleet().await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let mut keys = fleet
        .sites
        .iter()
        .map(|s| (s.region.clone(), s.site.clone()));
    let mut asking = tokio::task::JoinSet::new();
    let mut sites = Vec::new();
    loop {
        while asking.len() < VERSION_ASKS_AT_ONCE {
            let Some(key) = keys.next() else { break };
            let shared = shared.clone();
            asking.spawn(async move {
                let asked = shared.site_nodes(&key).await;
                site_versions(key, asked)
            });
        }
        match asking.join_next().await {
            Some(Ok(v)) => sites.push(v),
            Some(Err(e)) => {
                return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
            }
            None => break,
        }
    }
    sites.sort_by(|a, b| (&a.region, &a.site).cmp(&(&b.region, &b.site)));
    axum::Json(VersionsReport {
        hub: fleet.hub,
        hub_version: trellis_node::upgrade::version().to_owned(),
        sites,
    })
    .into_response()
}

fn site_versions(
    (region, site): (String, String),
    asked: Result<(String, Vec<trellis_node::site::MemberView>), DrillError>,
) -> SiteVersions {
    match asked {
        Ok((_, members)) => {
            let mut versions: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
            for m in members {
                let role = m.health.role.map_or("unknown", |r| r.as_str());
                let version = m
                    .facts
                    .get(trellis_node::agent::VERSION_FACT)
                    .map_or("unknown", String::as_str);
                *versions
                    .entry(role.to_owned())
                    .or_default()
                    .entry(version.to_owned())
                    .or_default() += 1;
            }
            SiteVersions {
                region,
                site,
                reachable: true,
                error: None,
                versions,
            }
        }
        Err(e) => SiteVersions {
            region,
            site,
            reachable: false,
            error: Some(e.to_string()),
            versions: BTreeMap::new(),
        },
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
        newest_first: false,
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
        newest_first: false,
        limit: q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT),
    };
    run_query(&shared, query).await
}

async fn hubs(State(shared): State<Shared>) -> Response {
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let Some(me) = shared.ask(|reply| Input::Federation { reply }).await else {
        return DrillError::ShuttingDown.into_response();
    };
    let mut rows = vec![HubRow {
        name: peering.me.clone(),
        region: peering.region.clone(),
        addr: peering.gossip.advertise_addr().to_string(),
        api: peering.api.clone(),
        this: true,
        alive: true,
        sites_served: me.served.len(),
        log_entries: me.log_entries,
        in_sync: true,
    }];
    for p in peering.peers() {
        rows.push(HubRow {
            in_sync: p.records_digest == me.records_digest && p.log_digest == me.log_digest,
            name: p.name,
            region: p.region,
            addr: p.addr.to_string(),
            api: p.api,
            this: false,
            alive: p.alive,
            sites_served: p.sites_served,
            log_entries: p.log_entries,
        });
    }
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    axum::Json(HubsReport { hubs: rows }).into_response()
}

/// `GET /api/v1/desired`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredReport {
    pub keys: std::collections::BTreeMap<String, Winner>,
    /// Per origin hub, the highest log entry held.
    pub version_vector: VersionVector,
    pub log_entries: u64,
}

async fn desired(State(shared): State<Shared>) -> Response {
    match shared.ask(|reply| Input::LogState { reply }).await {
        Some(s) => axum::Json(DesiredReport {
            keys: s.desired.into_iter().collect(),
            version_vector: s.version_vector,
            log_entries: s.entries,
        })
        .into_response(),
        None => DrillError::ShuttingDown.into_response(),
    }
}

/// The body of `PUT /api/v1/desired/{key}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PutBody {
    pub value: String,
    /// Who asks (until the API authenticates operators).
    #[serde(default)]
    pub author: Option<String>,
}

/// The answer to a write.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WriteReport {
    pub origin: String,
    pub seq: u64,
    pub hlc: crate::log::Hlc,
    /// Hubs that hold the entry durably.
    pub durable_on: Vec<String>,
    pub write_quorum: usize,
}

impl WriteReport {
    /// The report of a write as the federation took it.
    pub fn of(w: &crate::peering::WriteOutcome) -> Self {
        WriteReport {
            origin: w.entry.entry.origin.clone(),
            seq: w.entry.entry.seq,
            hlc: w.entry.entry.hlc,
            durable_on: w.durable_on.clone(),
            write_quorum: w.quorum,
        }
    }
}

async fn put_desired(
    State(shared): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::apiauth::Caller>,
    Path(key): Path<String>,
    axum::Json(body): axum::Json<PutBody>,
) -> Response {
    if key.starts_with(crate::enrolapi::RESERVED_PREFIX) {
        return reserved_key(&key);
    }
    let author = caller.author(body.author);
    write_op(
        &shared,
        author,
        Op::Put {
            key,
            value: body.value,
        },
    )
    .await
}

#[derive(Deserialize)]
struct DeleteQuery {
    author: Option<String>,
}

async fn delete_desired(
    State(shared): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::apiauth::Caller>,
    Path(key): Path<String>,
    Query(q): Query<DeleteQuery>,
) -> Response {
    if key.starts_with(crate::enrolapi::RESERVED_PREFIX) {
        return reserved_key(&key);
    }
    let author = caller.author(q.author);
    write_op(&shared, author, Op::Delete { key }).await
}

/// Keys that only token creation and enrolment write.
fn reserved_key(key: &str) -> Response {
    error(
        StatusCode::FORBIDDEN,
        format!(
            "{key}: keys under {} are written by `trellis token create` and enrolment only",
            crate::enrolapi::RESERVED_PREFIX
        ),
    )
}

async fn write_op(shared: &Shared, author: String, op: Op) -> Response {
    if let Some(Err(e)) = op.key().map(|k| trellis_node::id::validate_name("key", k)) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    match crate::peering::write(shared, peering, author, op).await {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(w) => {
            let report = WriteReport::of(&w);
            if w.acknowledged() {
                axum::Json(report).into_response()
            } else {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not acknowledged: entry {}/{} is durable on {} of the {} hubs required ({}). \
                         It stays in this hub's log and replicates when the other hubs are reachable; \
                         until then another hub may not show it.",
                        report.origin,
                        report.seq,
                        report.durable_on.len(),
                        report.write_quorum,
                        report.durable_on.join(", ")
                    ),
                )
            }
        }
    }
}

/// Largest `POST /api/v1/config` body: a signed bundle.
pub const MAX_CONFIG_BODY: usize = trellis_node::bundle::MAX_BUNDLE_BYTES + (64 << 10);

/// `GET /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigHistory {
    /// Newest first.
    pub versions: Vec<ConfigVersion>,
}

/// `GET /api/v1/config/{version}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigShow {
    #[serde(flatten)]
    pub version: ConfigVersion,
    /// When the operator signed it, ms since the Unix epoch.
    pub created_ms: u64,
    pub fleet: trellis_node::desired::Fleet,
}

/// The answer to `POST /api/v1/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigApplied {
    pub version: u64,
    pub digest: String,
    /// Who signed it.
    pub operator: String,
    #[serde(flatten)]
    pub write: WriteReport,
}

/// One site in `GET /api/v1/config/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteConfigRow {
    pub region: String,
    pub site: String,
    /// Whether the hubs hear from the site now; an unreachable site's
    /// figures are as last heard.
    pub reachable: bool,
    pub nodes_alive: u32,
    /// Alive nodes holding the newest version (or a newer one).
    pub at_latest: u32,
    pub config: trellis_relay::summary::ConfigTally,
}

/// `GET /api/v1/config/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    pub latest: Option<ConfigVersion>,
    pub sites: Vec<SiteConfigRow>,
    /// Over reachable sites: alive nodes, and those holding the newest
    /// version.
    pub nodes_alive: u32,
    pub at_latest: u32,
    pub sites_unreachable: u32,
    /// Alive nodes with a file not as applied, and whose last attempt
    /// failed or was refused (all sites).
    pub drifted: u32,
    pub failing: u32,
    /// The latest configuration events (results and drift), newest last.
    pub recent: Vec<StoredRecord>,
}

impl ConfigStatus {
    /// Whether every alive node of every reachable site holds the newest
    /// version.
    pub fn converged(&self) -> bool {
        self.at_latest >= self.nodes_alive
    }
}

async fn config_snapshot(shared: &Shared) -> Result<crate::driver::LogSnapshot, Response> {
    shared
        .ask(|reply| Input::LogState { reply })
        .await
        .ok_or_else(|| DrillError::ShuttingDown.into_response())
}

async fn config_history(State(shared): State<Shared>) -> Response {
    match config_snapshot(&shared).await {
        Ok(s) => axum::Json(ConfigHistory {
            versions: s.configs.into_iter().rev().collect(),
        })
        .into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ShowQuery {
    format: Option<String>,
}

async fn config_show(
    State(shared): State<Shared>,
    Path(version): Path<String>,
    Query(q): Query<ShowQuery>,
) -> Response {
    let Ok(version) = version.parse::<u64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{version:?} is not a configuration version (a number, see GET /api/v1/config)"
            ),
        );
    };
    let snapshot = match config_snapshot(&shared).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(v) = snapshot.configs.into_iter().find(|c| c.version == version) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no configuration version {version} (see GET /api/v1/config)"),
        );
    };
    let reader = shared.store.clone();
    let (origin, seq) = (v.origin.clone(), v.seq);
    let entry = tokio::task::spawn_blocking(move || reader.log_entry(&origin, seq)).await;
    let bytes = match entry {
        Ok(Ok(Some(crate::log::Entry {
            op: Op::Config { bundle, .. },
            ..
        }))) => bundle,
        Ok(Ok(_)) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "the log entry {}/{} holding version {version} is unreadable; run `trellis audit verify`",
                    v.origin, v.seq
                ),
            );
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if q.format.as_deref() == Some("bundle") {
        return (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response();
    }
    let decoded = postcard::from_bytes::<trellis_node::bundle::SignedBundle>(&bytes)
        .ok()
        .and_then(|sb| postcard::from_bytes::<trellis_node::bundle::Bundle>(&sb.bundle).ok());
    match decoded {
        Some(b) => axum::Json(ConfigShow {
            version: v,
            created_ms: b.created_ms,
            fleet: b.fleet,
        })
        .into_response(),
        None => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("version {version}'s bundle does not decode"),
        ),
    }
}

async fn config_apply(State(shared): State<Shared>, body: axum::body::Bytes) -> Response {
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let signed = match postcard::from_bytes::<trellis_node::bundle::SignedBundle>(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not a signed configuration bundle ({e}); use `trellis config apply`"
                ),
            );
        }
    };
    let (bundle, operator) = match trellis_node::bundle::verify(&peering.creds, &signed) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::FORBIDDEN, format!("bundle refused: {e}")),
    };
    if let Err(e) =
        trellis_node::signature::check_current_key(&peering.creds, &signed.operator_cert, &operator)
    {
        return error(StatusCode::FORBIDDEN, format!("bundle refused: {e}"));
    }
    let snapshot = match config_snapshot(&shared).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let latest = snapshot.configs.last().map_or(0, |c| c.version);
    if bundle.version <= latest {
        return error(
            StatusCode::CONFLICT,
            format!(
                "version {} is not newer than the newest version, {latest}: sign the bundle as version {}                  (`trellis config apply` does this; to go back, `trellis config rollback VERSION`)",
                bundle.version,
                latest + 1
            ),
        );
    }
    let digest = trellis_node::distribute::hex32(&signed.digest());
    let op = Op::Config {
        version: bundle.version,
        digest: digest.clone(),
        comment: bundle.comment.clone(),
        bundle: body.to_vec(),
    };
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    match crate::peering::write(&shared, peering, operator.name.clone(), op).await {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(w) => {
            let report = ConfigApplied {
                version: bundle.version,
                digest,
                operator: operator.name.clone(),
                write: WriteReport::of(&w),
            };
            // Stored here either way; not acknowledged unless on a quorum.
            let status = w.http_status();
            (status, axum::Json(report)).into_response()
        }
    }
}

/// Largest `PUT /api/v1/chunks/{hash}` body: one chunk.
pub const MAX_CHUNK_BODY: usize = trellis_node::patch::CHUNK_SIZE as usize + 1024;
/// Largest `POST /api/v1/patches` body: a signed manifest.
pub const MAX_PATCH_BODY: usize = trellis_node::patch::MAX_MANIFEST_BYTES + (64 << 10);

/// A chunk hash from its hex, or the error answer for it.
fn parse_chunk_hash(hash: &str) -> Result<[u8; 32], Box<Response>> {
    trellis_node::distribute::parse_hex32(hash).ok_or_else(|| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("{hash:?} is not a chunk hash (64 hex digits of BLAKE3)"),
        ))
    })
}

/// The body of `POST /api/v1/chunks/missing` and its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkList {
    /// BLAKE3 hashes, hex.
    pub chunks: Vec<String>,
}

async fn chunks_missing(
    State(shared): State<Shared>,
    axum::Json(body): axum::Json<ChunkList>,
) -> Response {
    let mut hashes = Vec::with_capacity(body.chunks.len());
    for h in &body.chunks {
        match parse_chunk_hash(h) {
            Ok(x) => hashes.push(x),
            Err(r) => return *r,
        }
    }
    let store = shared.chunks.clone();
    let missing = tokio::task::spawn_blocking(move || {
        hashes
            .iter()
            .filter(|h| !matches!(store.get(h), Ok(Some(_))))
            .map(trellis_node::distribute::hex32)
            .collect::<Vec<_>>()
    })
    .await;
    match missing {
        Ok(chunks) => axum::Json(ChunkList { chunks }).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn chunk_put(
    State(shared): State<Shared>,
    Path(hash): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let hash = match parse_chunk_hash(&hash) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let store = shared.chunks.clone();
    match tokio::task::spawn_blocking(move || store.put(&hash, &body)).await {
        Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(
            e @ (trellis_node::patch::PatchError::ChunkMismatch { .. }
            | trellis_node::patch::PatchError::ChunkTooLarge(_)),
        )) => error(StatusCode::BAD_REQUEST, e.to_string()),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn chunk_get(State(shared): State<Shared>, Path(hash): Path<String>) -> Response {
    let hash = match parse_chunk_hash(&hash) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let store = shared.chunks.clone();
    match tokio::task::spawn_blocking(move || store.get(&hash)).await {
        Ok(Ok(Some(bytes))) => (
            [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
            bytes,
        )
            .into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "this hub does not hold that chunk"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/patches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchList {
    /// Newest first.
    pub patches: Vec<crate::log::PatchRecord>,
}

/// One version of a patch in `GET /api/v1/patches/{name}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchShow {
    #[serde(flatten)]
    pub record: crate::log::PatchRecord,
    pub manifest: trellis_node::patch::PatchManifest,
    /// Chunks of its artifacts this hub holds intact, of all.
    pub chunks_here: u64,
    pub chunks_total: u64,
}

/// `GET /api/v1/patches/{name}`: every version published under the name,
/// newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchVersions {
    pub versions: Vec<PatchShow>,
}

/// The answer to `POST /api/v1/patches`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchPublished {
    pub id: String,
    pub name: String,
    pub version: String,
    pub operator: String,
    /// Already published before (same manifest): nothing was written.
    pub already: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<WriteReport>,
}

async fn patch_list(State(shared): State<Shared>) -> Response {
    match config_snapshot(&shared).await {
        Ok(s) => axum::Json(PatchList {
            patches: s.patches.into_iter().rev().collect(),
        })
        .into_response(),
        Err(r) => r,
    }
}

async fn patch_publish(State(shared): State<Shared>, body: axum::body::Bytes) -> Response {
    use trellis_node::patch::{SignedPatch, verify};
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let signed = match postcard::from_bytes::<SignedPatch>(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not a signed patch ({e}); use `trellis patch publish`"),
            );
        }
    };
    let (manifest, operator) = match verify(&peering.creds, &signed) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::FORBIDDEN, format!("patch refused: {e}")),
    };
    if let Err(e) =
        trellis_node::signature::check_current_key(&peering.creds, &signed.operator_cert, &operator)
    {
        return error(StatusCode::FORBIDDEN, format!("patch refused: {e}"));
    }
    let id = trellis_node::distribute::hex32(&signed.id());
    let snapshot = match config_snapshot(&shared).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    if snapshot.patches.iter().any(|p| p.id == id) {
        return axum::Json(PatchPublished {
            id,
            name: manifest.name,
            version: manifest.version,
            operator: operator.name,
            already: true,
            write: None,
        })
        .into_response();
    }
    // Every chunk must be here first: a published patch can be served.
    // And the chunks must make the files the manifest names: this is the
    // one place a whole artifact is hashed (nodes check each chunk
    // against the signed list and no more, see `ChunkStore::check`).
    let store = shared.chunks.clone();
    let artifacts = manifest.artifacts.clone();
    let checked = tokio::task::spawn_blocking(move || {
        artifacts.iter().try_fold(0usize, |missing, a| {
            store.check(a).map(|m| missing + m.len())
        })
    })
    .await;
    let missing = match checked {
        Ok(Ok(missing)) => missing,
        Ok(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("patch refused: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if missing > 0 {
        return error(
            StatusCode::CONFLICT,
            format!(
                "{missing} chunks of the patch's artifacts are not at this hub; upload them first                  (`trellis patch publish` does, and resumes where it stopped)"
            ),
        );
    }
    let op = Op::Patch {
        id: id.clone(),
        name: manifest.name.clone(),
        version: manifest.version.clone(),
        manifest: body.to_vec(),
    };
    match crate::peering::write(&shared, peering, operator.name.clone(), op).await {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(w) => {
            let status = w.http_status();
            let report = PatchPublished {
                id,
                name: manifest.name,
                version: manifest.version,
                operator: operator.name,
                already: false,
                write: Some(WriteReport::of(&w)),
            };
            (status, axum::Json(report)).into_response()
        }
    }
}

async fn patch_show(State(shared): State<Shared>, Path(name): Path<String>) -> Response {
    let snapshot = match config_snapshot(&shared).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let records: Vec<crate::log::PatchRecord> = snapshot
        .patches
        .into_iter()
        .rev()
        .filter(|p| p.name == name)
        .collect();
    if records.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no patch named {name:?} (see GET /api/v1/patches)"),
        );
    }
    let reader = shared.store.clone();
    let store = shared.chunks.clone();
    let shown = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for r in records {
            let Some(crate::log::Entry {
                op: Op::Patch { manifest, .. },
                ..
            }) = reader.log_entry(&r.origin, r.seq)?
            else {
                continue;
            };
            let Some(m) = postcard::from_bytes::<trellis_node::patch::SignedPatch>(&manifest)
                .ok()
                .and_then(|sp| {
                    postcard::from_bytes::<trellis_node::patch::PatchManifest>(&sp.manifest).ok()
                })
            else {
                continue;
            };
            let total: u64 = m.artifacts.iter().map(|a| a.chunks.len() as u64).sum();
            let missing: u64 = m
                .artifacts
                .iter()
                .map(|a| store.missing(a).len() as u64)
                .sum();
            out.push(PatchShow {
                record: r,
                manifest: m,
                chunks_here: total - missing,
                chunks_total: total,
            });
        }
        Ok::<_, crate::store::StoreError>(out)
    })
    .await;
    match shown {
        Ok(Ok(versions)) => axum::Json(PatchVersions { versions }).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One site in the answer to `POST /api/v1/patches/{name}/stage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedAt {
    pub region: String,
    pub site: String,
    /// Chunks the relay is fetching (0: it holds them all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetching: Option<u64>,
    /// Why the relay could not be asked or refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer to `POST /api/v1/patches/{name}/stage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub id: String,
    pub version: String,
    /// The sites whose relay is connected to this hub.
    pub sites: Vec<StagedAt>,
}

#[derive(Deserialize)]
struct StageQuery {
    site: Option<String>,
}

/// Has the relays connected to this hub (of `?site=` only, if given)
/// fetch the newest version of the patch's artifacts.
async fn patch_stage(
    State(shared): State<Shared>,
    Path(name): Path<String>,
    Query(q): Query<StageQuery>,
) -> Response {
    let (record, signed) = match crate::patchdriver::signed_patch(&shared, |p| p.name == name).await
    {
        Ok(Some(found)) => found,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no patch named {name:?} (see GET /api/v1/patches)"),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let relays: Vec<(crate::driver::RelayConn, String, String)> = shared
        .relays
        .lock()
        .expect("not poisoned")
        .iter()
        .filter(|((_, site), _)| q.site.as_deref().is_none_or(|s| s == site))
        .map(|((region, site), rc)| (rc.clone(), region.clone(), site.clone()))
        .collect();
    let mut sites = Vec::new();
    for (rc, region, site) in relays {
        let staged = crate::driver::stage_patch(&rc.conn, &signed).await;
        sites.push(StagedAt {
            region,
            site,
            fetching: staged.as_ref().ok().copied(),
            error: staged.err(),
        });
    }
    if sites.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            match q.site {
                Some(s) => format!("the relay of site {s:?} is not connected to this hub"),
                None => "no relay is connected to this hub".to_owned(),
            },
        );
    }
    axum::Json(StageReport {
        id: record.id,
        version: record.version,
        sites,
    })
    .into_response()
}

/// Configuration events kept in `ConfigStatus::recent`, at most.
const RECENT_CONFIG_EVENTS: usize = 50;

async fn config_status(State(shared): State<Shared>) -> Response {
    let snapshot = match config_snapshot(&shared).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let fleet = match shared.fleet().await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let latest = snapshot.configs.last().cloned();
    let newest = latest.as_ref().map_or(0, |c| c.version);
    let mut status = ConfigStatus {
        latest,
        sites: Vec::new(),
        nodes_alive: 0,
        at_latest: 0,
        sites_unreachable: 0,
        drifted: 0,
        failing: 0,
        recent: Vec::new(),
    };
    for row in fleet.sites {
        let reachable = row.status != trellis_relay::summary::SiteStatus::Unreachable;
        let at_latest = row.config.at_least(newest);
        if reachable {
            status.nodes_alive += row.nodes_alive;
            status.at_latest += at_latest;
        } else {
            status.sites_unreachable += 1;
        }
        status.drifted += row.config.drifted_count;
        status.failing += row.config.failing_count;
        status.sites.push(SiteConfigRow {
            region: row.region,
            site: row.site,
            reachable,
            nodes_alive: row.nodes_alive,
            at_latest,
            config: row.config,
        });
    }
    let reader = shared.store.clone();
    let recent = tokio::task::spawn_blocking(move || {
        reader.records(&store::Query {
            kinds: vec!["config_result".into(), "config_drift".into()],
            newest_first: true,
            limit: RECENT_CONFIG_EVENTS,
            ..Default::default()
        })
    })
    .await;
    if let Ok(Ok(mut r)) = recent {
        r.reverse();
        status.recent = r;
    }
    axum::Json(status).into_response()
}

/// One entry in `GET /api/v1/log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRow {
    /// The entry (a configuration's bundle bytes left out, so the
    /// signature does not verify over it as shown).
    pub entry: crate::log::Entry,
    /// The origin's signature, hex.
    pub signature: String,
}

/// `GET /api/v1/log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogReport {
    pub entries: Vec<LogRow>,
    pub truncated: bool,
}

#[derive(Deserialize)]
struct LogQuery {
    limit: Option<usize>,
}

async fn log(State(shared): State<Shared>, Query(q): Query<LogQuery>) -> Response {
    let Some(state) = shared.ask(|reply| Input::LogState { reply }).await else {
        return DrillError::ShuttingDown.into_response();
    };
    let limit = q.limit.unwrap_or(10_000).clamp(1, 100_000);
    let reader = shared.store.clone();
    let vv = state.version_vector;
    let rows = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for origin in vv.keys() {
            if out.len() > limit {
                break;
            }
            out.extend(reader.log_after(origin, 0, limit + 1 - out.len())?);
        }
        Ok::<_, crate::store::StoreError>(out)
    })
    .await;
    match rows {
        Ok(Ok(mut entries)) => {
            let truncated = entries.len() > limit;
            entries.truncate(limit);
            axum::Json(LogReport {
                entries: entries
                    .into_iter()
                    .map(|e| LogRow {
                        signature: crate::log::hex(&e.signature),
                        entry: crate::log::Entry {
                            op: e.entry.op.without_bundle(),
                            ..e.entry
                        },
                    })
                    .collect(),
                truncated,
            })
            .into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/audit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    /// Oldest first, by hybrid clock, then origin and seq.
    pub entries: Vec<AuditEntry>,
    /// Whether `limit` cut the list (ask again with a later `since`).
    pub truncated: bool,
}

#[derive(Deserialize)]
struct AuditQuery {
    since: Option<u64>,
    origin: Option<String>,
    limit: Option<usize>,
}

async fn audit(State(shared): State<Shared>, Query(q): Query<AuditQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).clamp(1, MAX_LIMIT);
    let reader = shared.store.clone();
    let found =
        tokio::task::spawn_blocking(move || reader.audit(q.since, q.origin.as_deref(), limit + 1))
            .await;
    match found {
        Ok(Ok(mut entries)) => {
            let truncated = entries.len() > limit;
            entries.truncate(limit);
            axum::Json(AuditReport { entries, truncated }).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/v1/audit/verify`: the hub's check of its own store file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditVerifyReport {
    /// The hub that checked its store.
    pub hub: String,
    /// No problem found.
    pub ok: bool,
    /// Entries checked, per origin hub.
    pub checked: std::collections::BTreeMap<String, u64>,
    pub problems: Vec<AuditProblem>,
}

async fn audit_verify(State(shared): State<Shared>) -> Response {
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let (reader, creds, hub) = (
        shared.store.clone(),
        peering.creds.clone(),
        peering.me.clone(),
    );
    match tokio::task::spawn_blocking(move || reader.verify_audit(&creds)).await {
        Ok(Ok(v)) => axum::Json(AuditVerifyReport {
            hub,
            ok: v.ok(),
            checked: v.checked,
            problems: v.problems,
        })
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
