//! Who may call the hub's API, and as what.
//!
//! Callers present a bearer token (`Authorization: Bearer TOKEN`; the
//! `trellis` CLI sends `--token` or `TRELLIS_TOKEN`). The hub's
//! configuration lists each token's SHA-256 with a name and a role
//! (`[[api.tokens]]`, made with `trellis api token`); the token itself is
//! never stored. Roles are ordered, each allowing what the one before it
//! does:
//!
//! - `viewer`: every read (`GET`): the fleet, history, the log and audit
//!   trail, `/metrics`, the dashboard;
//! - `operator`: changes to desired state: keys, configuration, patches and
//!   their chunks, rollouts;
//! - `admin`: revocations (the routes that change the mesh's trust).
//!
//! A hub bound beyond loopback requires a token on every request; one on
//! loopback only when `api.require_token` is set, and otherwise treats a
//! request without a token as the local administrator (`local`). A write
//! made with a token is attributed to the token's name in the management
//! log, whatever author the request names; every change is logged with
//! its caller.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::api::error;

/// What an API caller may do; each role allows what the ones before it do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    Viewer,
    Operator,
    Admin,
}

impl ApiRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiRole::Viewer => "viewer",
            ApiRole::Operator => "operator",
            ApiRole::Admin => "admin",
        }
    }
}

impl std::str::FromStr for ApiRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(ApiRole::Viewer),
            "operator" => Ok(ApiRole::Operator),
            "admin" => Ok(ApiRole::Admin),
            other => Err(format!(
                "{other:?} is not an API role: viewer, operator or admin"
            )),
        }
    }
}

/// `[[api.tokens]]`: one caller of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    /// Who holds it: what the management log records as the author of
    /// the changes made with it.
    pub name: String,
    pub role: ApiRole,
    /// SHA-256 of the token, 64 hex digits.
    pub sha256: String,
}

/// SHA-256 of a token, hex: what the configuration holds.
pub fn token_hash(token: &str) -> String {
    trellis_node::apply::hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// A new random token (32 bytes, hex) and its entry for the configuration.
pub fn new_token(name: &str, role: ApiRole) -> (String, ApiToken) {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source works");
    let token = format!("trellis_{}", trellis_node::apply::hex(&bytes));
    let entry = ApiToken {
        name: name.to_owned(),
        role,
        sha256: token_hash(&token),
    };
    (token, entry)
}

/// The caller of a request, as the auth layer established it; handlers
/// that write read it from the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: ApiRole,
    /// Identified by a token (its name is then the author of what it
    /// writes), as opposed to the local administrator of a loopback hub.
    pub by_token: bool,
}

impl Caller {
    /// The author to record for a write: the token's name, or the name
    /// the request gives when the local administrator makes it.
    pub fn author(&self, claimed: Option<String>) -> String {
        if self.by_token {
            self.name.clone()
        } else {
            claimed.unwrap_or_else(|| "anonymous".into())
        }
    }
}

/// The hub's API access rules.
#[derive(Debug)]
pub struct ApiAuth {
    /// Whether a request without a token is refused.
    pub required: bool,
    by_hash: HashMap<String, (String, ApiRole)>,
    rate: RateLimit,
}

/// Requests per second each caller may make (a token by its name, a
/// caller without one by its address), after a burst of twice that.
#[derive(Debug)]
pub struct RateLimit {
    per_s: f64,
    buckets: std::sync::Mutex<HashMap<String, (f64, std::time::Instant)>>,
}

/// Callers remembered at most; past this, those idle for a minute are
/// forgotten (they start again with a full burst).
const MAX_BUCKETS: usize = 10_000;

impl RateLimit {
    /// `per_s` = 0 means no limit.
    pub fn new(per_s: u32) -> Self {
        RateLimit {
            per_s: f64::from(per_s),
            buckets: Default::default(),
        }
    }

    /// Takes one request for `key` at `now`: `Err(wait)` if it is over
    /// its rate, with how long until it may ask again.
    pub fn take(&self, key: &str, now: std::time::Instant) -> Result<(), std::time::Duration> {
        if self.per_s <= 0.0 {
            return Ok(());
        }
        let burst = 2.0 * self.per_s;
        let mut buckets = self.buckets.lock().expect("not poisoned");
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            buckets.retain(|_, (_, at)| now.saturating_duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((burst, now));
        *tokens =
            (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_s).min(burst);
        *at = (*at).max(now);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - *tokens) / self.per_s,
            ))
        }
    }
}

impl ApiAuth {
    /// Access rules from the hub's `[api]` settings: whether a token is
    /// required, the tokens, and each caller's request rate (0: none).
    pub fn new(required: bool, tokens: &[ApiToken], requests_per_s: u32) -> Self {
        ApiAuth {
            required,
            by_hash: tokens
                .iter()
                .map(|t| (t.sha256.to_ascii_lowercase(), (t.name.clone(), t.role)))
                .collect(),
            rate: RateLimit::new(requests_per_s),
        }
    }

    /// Who presents `token` (or none); `Err` is the refusal's status and
    /// message.
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, (StatusCode, String)> {
        match token {
            Some(t) => match self.by_hash.get(&token_hash(t)) {
                Some((name, role)) => Ok(Caller {
                    name: name.clone(),
                    role: *role,
                    by_token: true,
                }),
                None => Err((
                    StatusCode::UNAUTHORIZED,
                    "unknown API token (this hub's [[api.tokens]] do not hold it)".into(),
                )),
            },
            None if self.required => Err((
                StatusCode::UNAUTHORIZED,
                "this hub's API needs a token: pass --token or set TRELLIS_TOKEN \
                 (an administrator makes one with `trellis api token`)"
                    .into(),
            )),
            None => Ok(Caller {
                name: "local".into(),
                role: ApiRole::Admin,
                by_token: false,
            }),
        }
    }
}

/// The role a request needs: reads need `viewer`, revocations and join
/// tokens `admin`, every other change `operator`.
pub fn required_role(method: &Method, path: &str) -> ApiRole {
    if method == Method::GET || method == Method::HEAD {
        ApiRole::Viewer
    } else if path.starts_with("/api/v1/revocations") || path.starts_with("/api/v1/tokens") {
        ApiRole::Admin
    } else {
        ApiRole::Operator
    }
}

/// Every route of the hub's API (method, path), in the order
/// docs/SECURITY.md lists them; `{…}` is a path parameter.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/api/v1"),
    ("GET", "/api/v1/fleet"),
    ("GET", "/api/v1/sites/{site}/nodes"),
    ("GET", "/api/v1/sites/{site}/history"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/hubs"),
    ("GET", "/api/v1/versions"),
    ("GET", "/api/v1/incidents"),
    ("GET", "/api/v1/desired"),
    ("GET", "/api/v1/config"),
    ("GET", "/api/v1/config/status"),
    ("GET", "/api/v1/config/{version}"),
    ("GET", "/api/v1/chunks/{hash}"),
    ("GET", "/api/v1/patches"),
    ("GET", "/api/v1/patches/{name}"),
    ("GET", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts/{run}"),
    ("GET", "/api/v1/log"),
    ("GET", "/api/v1/audit"),
    ("GET", "/api/v1/audit/verify"),
    ("GET", "/api/v1/revocations"),
    ("GET", "/api/v1/tokens"),
    ("GET", "/metrics"),
    ("PUT", "/api/v1/desired/{key}"),
    ("DELETE", "/api/v1/desired/{key}"),
    ("POST", "/api/v1/config"),
    ("POST", "/api/v1/chunks/missing"),
    ("PUT", "/api/v1/chunks/{hash}"),
    ("POST", "/api/v1/patches"),
    ("POST", "/api/v1/patches/{name}/stage"),
    ("POST", "/api/v1/rollouts"),
    ("POST", "/api/v1/rollouts/{run}/control"),
    ("POST", "/api/v1/revocations"),
    ("POST", "/api/v1/tokens"),
];

/// The API part of docs/SECURITY.md's authorisation tables, rendered
/// from [`ROUTES`] and [`required_role`].
pub fn routes_markdown() -> String {
    let mut out =
        String::from("| method | route | viewer | operator | admin |\n|---|---|---|---|---|\n");
    for (method, path) in ROUTES {
        let needed = required_role(&method.parse().expect("a method"), path);
        let cell = |r: ApiRole| if r >= needed { "allowed" } else { "role" };
        out.push_str(&format!(
            "| {method} | `{path}` | {} | {} | {} |\n",
            cell(ApiRole::Viewer),
            cell(ApiRole::Operator),
            cell(ApiRole::Admin)
        ));
    }
    out
}

/// The bearer token of a request, if it has one.
fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The auth layer: establishes the caller, refuses what its role does not
/// allow, logs every change with its caller.
pub async fn layer(State(auth): State<Arc<ApiAuth>>, mut req: Request, next: Next) -> Response {
    let remote = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let caller = match auth.caller(bearer(&req)) {
        Ok(c) => c,
        Err((status, message)) => return error(status, message),
    };
    let key = if caller.by_token {
        format!("token {}", caller.name)
    } else {
        format!("address {remote}")
    };
    if let Err(wait) = auth.rate.take(&key, std::time::Instant::now()) {
        let secs = wait.as_secs() + 1;
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests from {key}: at most {} a second; retry in {secs} s",
                auth.rate.per_s
            ),
        );
        if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        return response;
    }
    let needed = required_role(req.method(), req.uri().path());
    if caller.role < needed {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "{} holds the {} role; {} {} needs {}",
                caller.name,
                caller.role.as_str(),
                req.method(),
                req.uri().path(),
                needed.as_str()
            ),
        );
    }
    let write = needed > ApiRole::Viewer;
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    req.extensions_mut().insert(caller.clone());
    let response = next.run(req).await;
    if write {
        info!(caller = %caller.name, role = caller.role.as_str(), %method, %path, status = response.status().as_u16(), "API change");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_gets_its_rate_after_a_burst_of_twice_that() {
        let limit = RateLimit::new(10);
        let t0 = std::time::Instant::now();
        for _ in 0..20 {
            limit.take("a", t0).unwrap();
        }
        let wait = limit.take("a", t0).unwrap_err();
        assert!(wait <= std::time::Duration::from_millis(100), "{wait:?}");
        limit.take("b", t0).unwrap();
        let later = t0 + std::time::Duration::from_millis(250);
        for _ in 0..2 {
            limit.take("a", later).unwrap();
        }
        assert!(limit.take("a", later).is_err(), "2.5 tokens came back");
        let none = RateLimit::new(0);
        for _ in 0..1000 {
            none.take("a", t0).unwrap();
        }
    }

    #[test]
    fn the_documented_api_table_is_the_one_enforced() {
        let doc =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/SECURITY.md"))
                .unwrap();
        let begin = "<!-- api-routes: begin (rendered by apiauth::routes_markdown) -->\n";
        let start = doc.find(begin).expect("the begin marker") + begin.len();
        let end = doc
            .find("<!-- api-routes: end -->")
            .expect("the end marker");
        assert_eq!(
            &doc[start..end],
            routes_markdown(),
            "docs/SECURITY.md's API table differs from the code; paste routes_markdown()"
        );
    }

    #[test]
    fn roles_allow_what_the_ones_before_them_do() {
        let (viewer, v) = new_token("vera", ApiRole::Viewer);
        let (operator, o) = new_token("olga", ApiRole::Operator);
        let auth = ApiAuth::new(true, &[v, o], 0);
        assert_eq!(auth.caller(Some(&viewer)).unwrap().role, ApiRole::Viewer);
        assert_eq!(auth.caller(Some(&operator)).unwrap().name, "olga");
        assert_eq!(
            auth.caller(Some("trellis_00")).unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(auth.caller(None).unwrap_err().0, StatusCode::UNAUTHORIZED);
        let open = ApiAuth::new(false, &[], 0);
        let local = open.caller(None).unwrap();
        assert_eq!((local.role, local.by_token), (ApiRole::Admin, false));
        assert_eq!(local.author(Some("alice".into())), "alice");
        let olga = auth.caller(Some(&operator)).unwrap();
        assert_eq!(olga.author(Some("mallory".into())), "olga");

        assert_eq!(
            required_role(&Method::GET, "/api/v1/fleet"),
            ApiRole::Viewer
        );
        assert_eq!(
            required_role(&Method::GET, "/api/v1/revocations"),
            ApiRole::Viewer
        );
        assert_eq!(
            required_role(&Method::PUT, "/api/v1/desired/k"),
            ApiRole::Operator
        );
        assert_eq!(
            required_role(&Method::POST, "/api/v1/config"),
            ApiRole::Operator
        );
        assert_eq!(
            required_role(&Method::POST, "/api/v1/revocations"),
            ApiRole::Admin
        );
        assert!(ApiRole::Viewer < ApiRole::Operator && ApiRole::Operator < ApiRole::Admin);
    }
}
