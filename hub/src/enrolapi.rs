//! Join tokens and enrolment at the hub ([`trellis_node::enrol`]).
//!
//! `POST /api/v1/tokens` (admin) makes a token for one site and writes its
//! record into the replicated log under `enrol/token/ID` (the secret only
//! as its BLAKE3); `GET /api/v1/tokens` lists them with their uses. A relay
//! forwards a machine's request (`RelayRequest::Enrol`); the hub checks the
//! token against the relay's own site, its expiry and its uses, signs a
//! certificate over the request's key with the mesh CA (`[enrolment]
//! ca_dir`) and records the use under `enrol/used/ID/NAME` (with the
//! certificate, so that the same request asked again gets the same answer)
//! before answering. Keys under `enrol/` are written only here: the generic
//! desired-state routes refuse them.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_node::enrol::{EnrolRequest, JoinToken, TokenRecord, check_token};
use trellis_node::id::{Identity, Role};
use trellis_relay::uplink::RelayResponse;

use crate::api::{WriteReport, error};
use crate::driver::{Input, Shared};
use crate::log::Op;

/// Keys under this prefix are written by token creation and enrolment only.
pub const RESERVED_PREFIX: &str = "enrol/";
const TOKEN_PREFIX: &str = "enrol/token/";
const USED_PREFIX: &str = "enrol/used/";
/// The longest a token may be valid.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);
/// The most machines one token may enrol.
pub const MAX_TOKEN_USES: u32 = 100_000;

/// The body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRequest {
    pub region: String,
    pub site: String,
    /// Who enrols with it: `node` (through the site's relay, the default)
    /// or `relay` (with a hub).
    #[serde(default)]
    pub role: Option<Role>,
    /// Labels the machines enrolled with it get (merged under their own
    /// configuration's `[node] labels`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// How many machines may enrol with it (default 1).
    #[serde(default)]
    pub uses: Option<u32>,
    /// How long it is valid, like "1h" (default 1h, at most 30 days).
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub author: Option<String>,
}

/// The answer to `POST /api/v1/tokens`: the only time the token is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    #[serde(flatten)]
    pub record: TokenView,
    pub write: WriteReport,
}

/// A token as listed (without its secret's hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenView {
    pub id: String,
    pub region: String,
    pub site: String,
    pub role: Role,
    pub labels: std::collections::BTreeMap<String, String>,
    pub uses: u32,
    pub used: u32,
    pub expires_ms: u64,
    pub created_ms: u64,
    pub created_by: String,
}

/// One enrolment as the log keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UseRecord {
    request: String,
    identity: String,
    cert_pem: String,
    at_ms: u64,
}

/// Tokens and their uses, from the log's desired state.
struct Tokens {
    records: Vec<TokenRecord>,
    /// (token id, name, record) of every enrolment.
    uses: Vec<(String, String, UseRecord)>,
}

impl Tokens {
    fn used(&self, id: &str) -> u32 {
        self.uses.iter().filter(|(t, _, _)| t == id).count() as u32
    }
}

async fn tokens(shared: &Shared) -> Option<Tokens> {
    let state = shared.ask(|reply| Input::LogState { reply }).await?;
    let mut out = Tokens {
        records: Vec::new(),
        uses: Vec::new(),
    };
    for (key, w) in state.desired {
        let Some(value) = w.value else { continue };
        if key.starts_with(TOKEN_PREFIX) {
            if let Ok(r) = serde_json::from_str::<TokenRecord>(&value) {
                out.records.push(r);
            }
        } else if let Some(rest) = key.strip_prefix(USED_PREFIX)
            && let Some((id, name)) = rest.split_once('/')
            && let Ok(u) = serde_json::from_str::<UseRecord>(&value)
        {
            out.uses.push((id.to_owned(), name.to_owned(), u));
        }
    }
    Some(out)
}

fn view(r: &TokenRecord, used: u32) -> TokenView {
    TokenView {
        id: r.id.clone(),
        region: r.region.clone(),
        site: r.site.clone(),
        role: r.role,
        labels: r.labels.clone(),
        uses: r.uses,
        used,
        expires_ms: r.expires_ms,
        created_ms: r.created_ms,
        created_by: r.created_by.clone(),
    }
}

pub(crate) async fn list(State(shared): State<Shared>) -> Response {
    let Some(t) = tokens(&shared).await else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is shutting down");
    };
    let mut all: Vec<TokenView> = t.records.iter().map(|r| view(r, t.used(&r.id))).collect();
    all.sort_by_key(|v| std::cmp::Reverse(v.created_ms));
    axum::Json(all).into_response()
}

pub(crate) async fn create(
    State(shared): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::apiauth::Caller>,
    axum::Json(body): axum::Json<TokenRequest>,
) -> Response {
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let role = body.role.unwrap_or(Role::Node);
    if !matches!(role, Role::Node | Role::Relay) {
        return error(
            StatusCode::BAD_REQUEST,
            "role: node or relay (hubs and operators are issued with `trellis ca issue`)",
        );
    }
    if let Err(e) = Identity::new(role, &body.region, &body.site, "probe") {
        return error(StatusCode::BAD_REQUEST, format!("region and site: {e}"));
    }
    if body.labels.len() > trellis_node::config::MAX_LABELS {
        return error(
            StatusCode::BAD_REQUEST,
            format!("labels: at most {}", trellis_node::config::MAX_LABELS),
        );
    }
    if let Some((k, v)) = body.labels.iter().find(|(k, v)| {
        !trellis_node::config::valid_label_part(k) || !trellis_node::config::valid_label_part(v)
    }) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("labels: {k}={v}: keys and values are 1 to 63 characters of A-Z a-z 0-9 . _ -"),
        );
    }
    let uses = body.uses.unwrap_or(1);
    if uses == 0 || uses > MAX_TOKEN_USES {
        return error(
            StatusCode::BAD_REQUEST,
            format!("uses: 1 to {MAX_TOKEN_USES}"),
        );
    }
    let ttl = match body.ttl.as_deref().map(humantime::parse_duration) {
        None => Duration::from_secs(3600),
        Some(Ok(d)) if !d.is_zero() && d <= MAX_TOKEN_TTL => d,
        Some(Ok(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "ttl: more than nothing and at most 30 days",
            );
        }
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e} (like 1h)")),
    };
    let author = caller.author(body.author);
    if author.is_empty() || author.len() > 64 {
        return error(StatusCode::BAD_REQUEST, "author: 1 to 64 bytes");
    }
    let token = JoinToken::generate();
    let now = trellis_node::clock::unix_ms();
    let record = TokenRecord {
        id: token.id.clone(),
        secret_blake3: token.secret_hash(),
        region: body.region,
        site: body.site,
        role,
        labels: body.labels,
        uses,
        expires_ms: now + ttl.as_millis() as u64,
        created_ms: now,
        created_by: author.clone(),
    };
    let op = Op::Put {
        key: format!("{TOKEN_PREFIX}{}", token.id),
        value: serde_json::to_string(&record).expect("records serialise"),
    };
    match crate::peering::write(&shared, peering, author, op).await {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(w) => {
            let status = w.http_status();
            let created = TokenCreated {
                token: token.to_string(),
                record: view(&record, 0),
                write: WriteReport::of(&w),
            };
            (status, axum::Json(created)).into_response()
        }
    }
}

/// One enrolment at a time on this hub, so two requests with one token
/// cannot both take its last use here.
static ENROLLING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Answers a machine's request that the relay `relay` forwarded (a node
/// token, for the relay's own site), or, with no relay, one a relay made
/// at this hub's enrolment endpoint (a relay token): `Issued`, `Refused`
/// for good, or `Error` for a failure worth trying again (the relay keeps
/// the request).
pub(crate) async fn enrol(
    shared: &Shared,
    relay: Option<&Identity>,
    req: EnrolRequest,
) -> RelayResponse {
    let via = relay.map_or("this hub's enrolment endpoint".to_owned(), |r| {
        r.to_string()
    });
    let refused = |reason: String| {
        tracing::warn!(via = %via, name = %req.name, %reason, "enrolment refused");
        RelayResponse::Refused(reason)
    };
    let Some(ca_dir) = shared.enrolment.ca_dir.as_ref() else {
        return RelayResponse::Error(
            "this hub cannot sign certificates ([enrolment] ca_dir is not set)".into(),
        );
    };
    let token = match JoinToken::parse(&req.token) {
        Ok(t) => t,
        Err(e) => return refused(e),
    };
    let Some(peering) = shared.peering.get() else {
        return RelayResponse::Error("the hub is starting".into());
    };
    let _one = ENROLLING.lock().await;
    let Some(known) = tokens(shared).await else {
        return RelayResponse::Error("the hub is shutting down".into());
    };
    let Some(record) = known
        .records
        .iter()
        .find(|r| r.id == token.id && token.matches(&r.secret_blake3))
    else {
        return refused(
            "unknown token: check it was copied whole, or create one with `trellis token create`"
                .into(),
        );
    };
    let request_id = req.id();
    // The same request asked again (its answer was lost): the same answer.
    if let Some((_, _, u)) = known.uses.iter().find(|(_, _, u)| u.request == request_id) {
        return RelayResponse::Issued {
            cert_pem: u.cert_pem.clone(),
            labels: record.labels.clone(),
        };
    }
    let (region, site) = match (relay, record.role) {
        (Some(r), Role::Node) => (&r.region, &r.site),
        (None, Role::Relay) => (&record.region, &record.site),
        (Some(_), _) => {
            return refused(format!(
                "this is a {} token: a relay enrols with a hub (`trellis-relay enroll --hub`)",
                record.role
            ));
        }
        (None, _) => {
            return refused(format!(
                "this is a {} token: a node enrols through its site's relay (`trellis-node enroll --relay`)",
                record.role
            ));
        }
    };
    if let Err(reason) = check_token(
        record,
        region,
        site,
        known.used(&record.id),
        trellis_node::clock::unix_ms(),
    ) {
        return refused(reason);
    }
    let identity = match Identity::new(record.role, region, site, &req.name) {
        Ok(i) => i,
        Err(e) => return refused(format!("name {:?}: {e}", req.name)),
    };
    let uri = identity.to_uri();
    if known.uses.iter().any(|(_, _, u)| u.identity == uri) {
        return refused(format!(
            "a machine already enrolled as {} in {}/{}: choose another --name, or decommission \
             that one first",
            identity.name, identity.region, identity.site
        ));
    }
    let ca = match trellis_node::tls::MeshCa::load(ca_dir) {
        Ok(ca) => ca,
        Err(e) => return RelayResponse::Error(format!("cannot load the mesh CA: {e}")),
    };
    let cert_pem = match ca.sign_request(&req.csr, &identity, shared.enrolment.cert_days()) {
        Ok(c) => c,
        Err(e) => return refused(format!("the certificate request is unusable: {e}")),
    };
    let used = UseRecord {
        request: request_id,
        identity: uri.clone(),
        cert_pem: cert_pem.clone(),
        at_ms: trellis_node::clock::unix_ms(),
    };
    let op = Op::Put {
        key: format!("{USED_PREFIX}{}/{}", record.id, identity.name),
        value: serde_json::to_string(&used).expect("records serialise"),
    };
    let author = format!("token:{}", record.id);
    match crate::peering::write(shared, peering, author, op).await {
        Ok(_) => {
            tracing::info!(identity = %uri, token = %record.id, via = %via, "machine enrolled");
            RelayResponse::Issued {
                cert_pem,
                labels: record.labels.clone(),
            }
        }
        Err(e) => RelayResponse::Error(format!("the enrolment was not recorded: {e}")),
    }
}

/// Answers a renewal the relay `relay` forwarded for its node `name`,
/// which presented its current certificate to the relay (checked there
/// against the CA and the revocation list): a new certificate for the same
/// identity over the request's key, unless the node was decommissioned.
/// Recorded as a `node.renewed` note.
pub(crate) async fn renew(
    shared: &Shared,
    relay: &Identity,
    name: &str,
    csr: &[u8],
) -> RelayResponse {
    let identity = match Identity::new(Role::Node, &relay.region, &relay.site, name) {
        Ok(i) => i,
        Err(e) => return RelayResponse::Refused(format!("name {name:?}: {e}")),
    };
    renew_identity(shared, identity, &format!("relay {}", relay.name), csr).await
}

/// A new certificate for `identity` over the request's key, unless it was
/// decommissioned; recorded as a `node.renewed` (or `relay.renewed`) note.
async fn renew_identity(
    shared: &Shared,
    identity: Identity,
    via: &str,
    csr: &[u8],
) -> RelayResponse {
    let Some(ca_dir) = shared.enrolment.ca_dir.as_ref() else {
        return RelayResponse::Error(
            "this hub cannot sign certificates ([enrolment] ca_dir is not set)".into(),
        );
    };
    let Some(peering) = shared.peering.get() else {
        return RelayResponse::Error("the hub is starting".into());
    };
    let uri = identity.to_uri();
    if shared
        .revocations
        .current()
        .decommissioned()
        .any(|d| d == uri)
    {
        return RelayResponse::Refused(format!("{identity} was decommissioned: not renewed"));
    }
    let ca = match trellis_node::tls::MeshCa::load(ca_dir) {
        Ok(ca) => ca,
        Err(e) => return RelayResponse::Error(format!("cannot load the mesh CA: {e}")),
    };
    let cert_pem = match ca.sign_request(csr, &identity, shared.enrolment.cert_days()) {
        Ok(c) => c,
        Err(e) => {
            return RelayResponse::Refused(format!("the certificate request is unusable: {e}"));
        }
    };
    let op = Op::Note {
        kind: format!("{}.renewed", identity.role),
        subject: uri.clone(),
        detail: format!("through {via}"),
    };
    let author = format!("{}:{}", identity.role, identity.name);
    match crate::peering::write(shared, peering, author, op).await {
        Ok(_) => {
            tracing::info!(identity = %uri, via, "certificate renewed");
            RelayResponse::Issued {
                cert_pem,
                labels: Default::default(),
            }
        }
        Err(e) => RelayResponse::Error(format!("the renewal was not recorded: {e}")),
    }
}

/// Relays enrolling at once on the hub's endpoint.
const ENROLLING_AT_ONCE: usize = 8;

/// Serves the enrolment protocol for relays on `listen` (`[enrolment]
/// listen`) until `shutdown`: a relay with a relay token gets its
/// certificate here, answered at once. Returns the bound address.
pub(crate) fn serve(
    listen: std::net::SocketAddr,
    creds: &trellis_node::tls::Credentials,
    shared: Shared,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<std::net::SocketAddr, String> {
    use trellis_node::enrol::{EnrolAsk, EnrolResponse};
    trellis_node::enrol::serve(
        listen,
        creds,
        ENROLLING_AT_ONCE,
        shutdown,
        move |ask, conn| {
            let shared = shared.clone();
            async move {
                match ask {
                    EnrolAsk::Enrol(req) => match enrol(&shared, None, req).await {
                        RelayResponse::Issued { cert_pem, labels } => {
                            EnrolResponse::Issued { cert_pem, labels }
                        }
                        RelayResponse::Refused(reason) => EnrolResponse::Refused { reason },
                        RelayResponse::Error(why) => EnrolResponse::Pending {
                            why,
                            retry_after_s: 10,
                        },
                        other => EnrolResponse::Pending {
                            why: format!("unexpected: {other:?}"),
                            retry_after_s: 10,
                        },
                    },
                    EnrolAsk::Renew { csr } => {
                        let relay = trellis_node::enrol::client_certificate(&conn)
                            .filter(|(id, _)| id.role == Role::Relay);
                        let Some((relay, fingerprint)) = relay else {
                            return EnrolResponse::Refused {
                                reason: "a renewal here needs the relay's current certificate on \
                                     the connection"
                                    .into(),
                            };
                        };
                        if let Some(r) = shared.revocations.current().revoked(&fingerprint) {
                            return EnrolResponse::Refused {
                                reason: format!("{relay}'s certificate is {}", r.kind.as_str()),
                            };
                        }
                        match renew_identity(&shared, relay, "the hub's enrolment endpoint", &csr)
                            .await
                        {
                            RelayResponse::Issued { cert_pem, labels } => {
                                EnrolResponse::Issued { cert_pem, labels }
                            }
                            RelayResponse::Refused(reason) => EnrolResponse::Refused { reason },
                            other => EnrolResponse::Pending {
                                why: format!("{other:?}"),
                                retry_after_s: 60,
                            },
                        }
                    }
                }
            }
        },
    )
}
