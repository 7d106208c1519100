//! The rollout endpoints of the hub's API: start a patch rollout, follow
//! it, pause, resume or abort it.
//!
//! Starting and steering a rollout changes machines, so these requests
//! are signed by an operator ([`SignedRequest`], the same key and rules as
//! configuration bundles and patches) and carry their time: a request
//! older or newer than [`MAX_REQUEST_SKEW`] is refused, so a captured one
//! cannot be played again later.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_node::clock::unix_ms;
use trellis_node::desired::NodeFacts;
use trellis_node::id::Identity;
use trellis_node::tls::Credentials;
use trellis_node::waves::{NodeRef, parse_waves, plan_waves};

use crate::api::{WriteReport, error};
use crate::driver::{Input, Shared};
use crate::log::Op;
use crate::patchrollout::{
    Control, GateNumbers, RolloutRecord, SiteProgress, WaveProgress, judge, progress,
};

/// A request an operator signed: `body` is JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    pub body: Vec<u8>,
    /// Ed25519 over `body`.
    pub signature: Vec<u8>,
    /// The operator's certificate (DER).
    pub cert: Vec<u8>,
}

impl SignedRequest {
    /// Signs `body` (serialised as JSON) with an operator's key.
    pub fn sign(operator: &Credentials, body: &impl Serialize) -> Result<Self, String> {
        trellis_node::signature::check_operator_credentials(operator).map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(body).expect("requests serialise");
        let signature = operator.sign(&body).map_err(|e| e.to_string())?;
        Ok(SignedRequest {
            body,
            signature,
            cert: operator.cert_der().to_vec(),
        })
    }
}

/// How far a signed request's time may be from the hub's clock.
pub const MAX_REQUEST_SKEW: Duration = Duration::from_secs(600);
/// Largest signed request: a start carries the fleet's node list.
pub const MAX_ROLLOUT_BODY: usize = 64 << 20;

/// `POST /api/v1/rollouts`, signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartRollout {
    /// The patch: a name (its newest version) or an id (64 hex digits).
    pub patch: String,
    /// Wave list, e.g. `canary,1site,10%,100%`.
    pub waves: String,
    /// How long each wave runs before its gate may pass; the patch's bake
    /// time when absent.
    pub bake_ms: Option<u64>,
    /// The gate's margin over the baseline failure ratio (0 to 1).
    pub max_failure: f64,
    pub auto_rollback: bool,
    /// The fleet's nodes (from the relays, as `trellis config plan` lists
    /// them); the hub keeps those the patch's selector picks.
    pub nodes: Vec<NodeFacts>,
    /// When the operator signed it (ms since the Unix epoch).
    pub at_ms: u64,
}

/// `POST /api/v1/rollouts/{run}/control`, signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlRollout {
    pub control: Control,
    pub at_ms: u64,
}

/// A rollout with its live progress: `GET /api/v1/rollouts/{run}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    pub record: RolloutRecord,
    /// The current wave's gate as the sites report now.
    pub gate: GateNumbers,
    pub waves: Vec<WaveProgress>,
    pub sites: Vec<SiteProgress>,
    /// Set on the answer to a start or a control: where it was written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<WriteReport>,
}

/// One rollout in `GET /api/v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRow {
    pub run: u64,
    pub name: String,
    pub version: String,
    pub state: String,
    pub spec: String,
    pub started: usize,
    pub waves: usize,
    pub started_by: String,
    pub started_ms: u64,
    pub changed_ms: u64,
    pub reason: Option<String>,
}

/// `GET /api/v1/rollouts`: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutList {
    pub rollouts: Vec<RolloutRow>,
}

/// Checks a signed request and decodes its body: who signed it, and what.
fn open<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    bytes: &[u8],
    at: impl Fn(&T) -> u64,
) -> Result<(Identity, T), Box<Response>> {
    let Some(peering) = shared.peering.get() else {
        return Err(Box::new(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub is starting",
        )));
    };
    let req: SignedRequest = postcard::from_bytes(bytes).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a signed request ({e}); use `trellis rollout`"),
        ))
    })?;
    let who = trellis_node::signature::verify_operator_signature(
        &peering.creds,
        &req.cert,
        &req.body,
        &req.signature,
    )
    .and_then(|who| {
        trellis_node::signature::check_current_key(&peering.creds, &req.cert, &who).map(|()| who)
    })
    .map_err(|e| {
        Box::new(error(
            StatusCode::FORBIDDEN,
            format!("request refused: {e}"),
        ))
    })?;
    let body: T = serde_json::from_slice(&req.body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, format!("bad request: {e}"))))?;
    let skew = unix_ms().abs_diff(at(&body));
    if skew > MAX_REQUEST_SKEW.as_millis() as u64 {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            format!(
                "request refused: signed {} s away from this hub's clock (at most {} s); check the clocks",
                skew / 1000,
                MAX_REQUEST_SKEW.as_secs()
            ),
        )));
    }
    Ok((who, body))
}

/// Every rollout, oldest first.
async fn records(shared: &Shared) -> Result<Vec<RolloutRecord>, Response> {
    let entries = shared
        .ask(|reply| Input::Rollouts { reply })
        .await
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "the hub is shutting down"))?;
    Ok(entries
        .iter()
        .filter_map(|e| serde_json::from_str(&e.record).ok())
        .collect())
}

async fn view(shared: &Shared, record: RolloutRecord) -> Result<RolloutView, Response> {
    let sites = shared
        .ask(|reply| Input::Summaries { reply })
        .await
        .ok_or_else(|| error(StatusCode::SERVICE_UNAVAILABLE, "the hub is shutting down"))?;
    let gate = judge(&record, &sites);
    let (waves, sites) = progress(&record, &sites);
    Ok(RolloutView {
        record,
        gate,
        waves,
        sites,
        write: None,
    })
}

async fn write(
    shared: &Shared,
    author: String,
    record: &RolloutRecord,
) -> Result<WriteReport, Response> {
    let Some(peering) = shared.peering.get() else {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the hub is starting",
        ));
    };
    let op = Op::Rollout {
        run: record.run,
        revision: record.revision,
        record: serde_json::to_string(record).expect("rollouts serialise"),
    };
    let w = crate::peering::write(shared, peering, author, op)
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(WriteReport::of(&w))
}

pub(crate) async fn rollout_start(
    State(shared): State<Shared>,
    body: axum::body::Bytes,
) -> Response {
    let (who, req) = match open::<StartRollout>(&shared, &body, |r| r.at_ms) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let spec = match parse_waves(&req.waves) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("--waves {:?}: {e}", req.waves),
            );
        }
    };
    if !(0.0..=1.0).contains(&req.max_failure) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("max_failure {} is not a ratio from 0 to 1", req.max_failure),
        );
    }
    let by_id = trellis_node::distribute::parse_hex32(&req.patch).is_some();
    let wanted = req.patch.clone();
    let found = crate::patchdriver::signed_patch(&shared, |p| {
        if by_id {
            p.id == wanted
        } else {
            p.name == wanted
        }
    })
    .await;
    let (patch, signed) = match found {
        Ok(Some(p)) => p,
        Ok(None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no patch {:?} (see `trellis patch list`)", req.patch),
            );
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let manifest =
        match postcard::from_bytes::<trellis_node::patch::PatchManifest>(&signed.manifest) {
            Ok(m) => m,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    let all = match records(&shared).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    if let Some(busy) = all.iter().find(|r| r.state.active()) {
        return error(
            StatusCode::CONFLICT,
            format!(
                "rollout {} ({} {}) is {}; one rollout at a time: wait for it, or `trellis rollout abort {}`",
                busy.run,
                busy.name,
                busy.version,
                busy.state.as_str(),
                busy.run
            ),
        );
    }
    let nodes: Vec<NodeRef> = req
        .nodes
        .iter()
        .filter(|n| manifest.selector.matches(n))
        .map(|n| NodeRef {
            name: n.name.clone(),
            region: n.region.clone(),
            site: n.site.clone(),
        })
        .collect();
    if nodes.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "none of the {} nodes listed matches the patch's selector; nothing to roll out",
                req.nodes.len()
            ),
        );
    }
    let waves = plan_waves(&spec, &nodes, &signed.id());
    let run = all.iter().map(|r| r.run).max().unwrap_or(0) + 1;
    let me = shared
        .peering
        .get()
        .map(|p| p.me.clone())
        .unwrap_or_default();
    let record = RolloutRecord::start(
        run,
        (&patch.id, &patch.name, &patch.version),
        &req.waves,
        waves,
        req.bake_ms.unwrap_or(manifest.bake.as_millis() as u64),
        req.max_failure,
        req.auto_rollback,
        &who.name,
        &me,
        unix_ms(),
    );
    let written = match write(&shared, who.name.clone(), &record).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match view(&shared, record).await {
        Ok(mut v) => {
            v.write = Some(written);
            axum::Json(v).into_response()
        }
        Err(r) => r,
    }
}

pub(crate) async fn rollout_list(State(shared): State<Shared>) -> Response {
    match records(&shared).await {
        Ok(all) => axum::Json(RolloutList {
            rollouts: all
                .into_iter()
                .rev()
                .map(|r| RolloutRow {
                    run: r.run,
                    name: r.name,
                    version: r.version,
                    state: r.state.as_str().to_owned(),
                    spec: r.spec,
                    started: r.started,
                    waves: r.waves.len(),
                    started_by: r.started_by,
                    started_ms: r.started_ms,
                    changed_ms: r.changed_ms,
                    reason: r.reason,
                })
                .collect(),
        })
        .into_response(),
        Err(r) => r,
    }
}

/// The rollout `run` (a number, or `latest`).
async fn find(shared: &Shared, run: &str) -> Result<RolloutRecord, Response> {
    let all = records(shared).await?;
    let found = if run == "latest" {
        all.into_iter().last()
    } else {
        let n: u64 = run.parse().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{run:?} is not a rollout number (or `latest`)"),
            )
        })?;
        all.into_iter().find(|r| r.run == n)
    };
    found.ok_or_else(|| {
        error(
            StatusCode::NOT_FOUND,
            format!("no rollout {run} (see GET /api/v1/rollouts)"),
        )
    })
}

pub(crate) async fn rollout_show(
    State(shared): State<Shared>,
    Path(run): Path<String>,
) -> Response {
    let record = match find(&shared, &run).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    match view(&shared, record).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

pub(crate) async fn rollout_control(
    State(shared): State<Shared>,
    Path(run): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let (who, req) = match open::<ControlRollout>(&shared, &body, |r| r.at_ms) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let record = match find(&shared, &run).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let next = match record.control(req.control, &who.name, unix_ms()) {
        Ok(n) => n,
        Err(e) => return error(StatusCode::CONFLICT, e.to_string()),
    };
    let written = match write(&shared, who.name.clone(), &next).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    match view(&shared, next).await {
        Ok(mut v) => {
            v.write = Some(written);
            axum::Json(v).into_response()
        }
        Err(r) => r,
    }
}
