//! The CLI's client for the hub API.

use std::time::Duration;

use serde::de::DeserializeOwned;

use trellis_relay::report::FleetReport;
use trellis_relay::report::{ApiError, NodesReport};

use crate::api::RecordsReport;

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0:?} is not a hub URL; use e.g. http://127.0.0.1:7800")]
    BadUrl(String),
    #[error(
        "cannot reach {url}: {reason}\n\
         Is a hub (or, with --relay, a relay) running there? Start a local mesh \
         with `trellis up`, or point --hub (or TRELLIS_HUB) at your hub."
    )]
    Unreachable { url: String, reason: String },
    #[error("the hub answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

/// A client for one hub's API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
    /// Sent as `Authorization: Bearer …` when set.
    token: Option<String>,
}

/// How often a request the hub answered `429` is sent again.
const MAX_BUSY_RETRIES: u32 = 5;

/// The token every client made afterwards sends (the CLI's `--token`).
static DEFAULT_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the API token that clients made from now on send, unless the
/// process set one already.
pub fn set_default_token(token: String) {
    let _ = DEFAULT_TOKEN.set(token);
}

impl ApiClient {
    /// `base` is the hub's URL (`http://host:port`); a bare `host:port`
    /// means `http://host:port`.
    pub fn new(base: &str) -> Result<Self, ClientError> {
        let raw = base.trim();
        let full = if raw.contains("://") {
            raw.to_owned()
        } else {
            format!("http://{raw}")
        };
        let parsed = reqwest::Url::parse(&full).map_err(|_| ClientError::BadUrl(raw.to_owned()))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
            return Err(ClientError::BadUrl(raw.to_owned()));
        }
        let base = full.trim_end_matches('/').to_owned();
        trellis_node::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("trellis/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ClientError::BadUrl(e.to_string()))?;
        let token = DEFAULT_TOKEN
            .get()
            .cloned()
            .or_else(|| std::env::var("TRELLIS_TOKEN").ok())
            .filter(|t| !t.is_empty());
        Ok(ApiClient { base, http, token })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.send(self.http.get(&url)).await?;
        self.decode(url, resp).await
    }

    /// Sends a request; the hub being unreachable is the error. A `429`
    /// (the hub's per-caller rate) is retried after the `Retry-After` the
    /// hub gives, a few times.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let mut retries = 0;
        let mut next = Some(req);
        loop {
            let current = next.take().expect("a request to send");
            // None for a streamed body, which is then not sent again.
            next = current.try_clone();
            let resp = current.send().await.map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                reason: root_cause(&e),
            })?;
            let busy = resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS;
            if !busy || retries >= MAX_BUSY_RETRIES || next.is_none() {
                return Ok(resp);
            }
            let wait = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 10);
            retries += 1;
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        url: String,
        resp: reqwest::Response,
    ) -> Result<T, ClientError> {
        let body = self.body(resp).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    /// The body of a successful answer; the API's error otherwise.
    async fn body(&self, resp: reqwest::Response) -> Result<bytes::Bytes, ClientError> {
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            reason: root_cause(&e),
        })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(body)
    }

    /// Events and gaps (`GET /api/v1/events`).
    pub async fn events(
        &self,
        site: Option<&str>,
        since_ms: Option<u64>,
        limit: usize,
    ) -> Result<RecordsReport, ClientError> {
        let mut path = format!("/api/v1/events?limit={limit}");
        if let Some(s) = site {
            path.push_str(&format!("&site={}", urlencode(s)));
        }
        if let Some(t) = since_ms {
            path.push_str(&format!("&since={t}"));
        }
        self.get(&path).await
    }

    /// A site's records (`GET /api/v1/sites/{site}/history`).
    pub async fn history(
        &self,
        site: &str,
        region: Option<&str>,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        limit: usize,
    ) -> Result<RecordsReport, ClientError> {
        let mut path = format!("/api/v1/sites/{}/history?limit={limit}", urlencode(site));
        if let Some(r) = region {
            path.push_str(&format!("&region={}", urlencode(r)));
        }
        if let Some(t) = from_ms {
            path.push_str(&format!("&from={t}"));
        }
        if let Some(t) = to_ms {
            path.push_str(&format!("&to={t}"));
        }
        self.get(&path).await
    }

    pub async fn hubs(&self) -> Result<crate::federation::HubsReport, ClientError> {
        self.get("/api/v1/hubs").await
    }

    /// Trellis versions per site, live from the relays.
    pub async fn versions(&self) -> Result<crate::api::VersionsReport, ClientError> {
        self.get("/api/v1/versions").await
    }

    pub async fn desired(&self) -> Result<crate::api::DesiredReport, ClientError> {
        self.get("/api/v1/desired").await
    }

    /// Writes (`Some(value)`) or deletes (`None`) a desired-state key.
    pub async fn write_desired(
        &self,
        key: &str,
        value: Option<&str>,
        author: &str,
    ) -> Result<crate::api::WriteReport, ClientError> {
        let url = format!("{}/api/v1/desired/{}", self.base, urlencode(key));
        let req = match value {
            Some(v) => self.http.put(&url).json(&crate::api::PutBody {
                value: v.to_owned(),
                author: Some(author.to_owned()),
            }),
            None => self
                .http
                .delete(format!("{url}?author={}", urlencode(author))),
        };
        let resp = self.send(req).await?;
        self.decode(url, resp).await
    }

    /// Stores a signed configuration bundle as a new version
    /// (`POST /api/v1/config`).
    pub async fn config_apply(
        &self,
        signed: &trellis_node::bundle::SignedBundle,
    ) -> Result<crate::api::ConfigApplied, ClientError> {
        self.post_postcard("/api/v1/config", signed).await
    }

    /// POSTs `msg` postcard-encoded (a signed bundle or manifest: the exact
    /// bytes the operator signed travel as they are) and decodes the JSON
    /// answer.
    async fn post_postcard<T: DeserializeOwned>(
        &self,
        path: &str,
        msg: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let body = postcard::to_stdvec(msg).expect("signed messages serialise");
        let req = self
            .http
            .post(&url)
            .header("content-type", "application/octet-stream")
            .body(body);
        let resp = self.send(req).await?;
        self.decode(url, resp).await
    }

    /// Writes a revocation the CA signed into the desired state
    /// (`POST /api/v1/revocations`).
    pub async fn revoke(
        &self,
        signed: &trellis_node::revocation::SignedRevocation,
        author: &str,
    ) -> Result<crate::revokeapi::Revoked, ClientError> {
        self.post_postcard(
            &format!("/api/v1/revocations?author={}", urlencode(author)),
            signed,
        )
        .await
    }

    /// Creates a join token (`POST /api/v1/tokens`).
    pub async fn token_create(
        &self,
        request: &crate::enrolapi::TokenRequest,
    ) -> Result<crate::enrolapi::TokenCreated, ClientError> {
        let url = format!("{}/api/v1/tokens", self.base);
        let resp = self.send(self.http.post(&url).json(request)).await?;
        self.decode(url, resp).await
    }

    /// Every join token and its uses (`GET /api/v1/tokens`).
    pub async fn tokens(&self) -> Result<Vec<crate::enrolapi::TokenView>, ClientError> {
        self.get("/api/v1/tokens").await
    }

    /// The revocations the hub enforces (`GET /api/v1/revocations`).
    pub async fn revocations(&self) -> Result<crate::revokeapi::RevocationList, ClientError> {
        self.get("/api/v1/revocations").await
    }

    /// Every configuration version, newest first (`GET /api/v1/config`).
    pub async fn config_history(&self) -> Result<crate::api::ConfigHistory, ClientError> {
        self.get("/api/v1/config").await
    }

    /// One configuration version's manifests.
    pub async fn config_show(&self, version: u64) -> Result<crate::api::ConfigShow, ClientError> {
        self.get(&format!("/api/v1/config/{version}")).await
    }

    /// One configuration version's signed bundle, as stored.
    pub async fn config_bundle(
        &self,
        version: u64,
    ) -> Result<trellis_node::bundle::SignedBundle, ClientError> {
        let url = format!("{}/api/v1/config/{version}?format=bundle", self.base);
        let resp = self.send(self.http.get(&url)).await?;
        let body = self.body(resp).await?;
        postcard::from_bytes(&body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    /// Where every site stands with the newest configuration
    /// (`GET /api/v1/config/status`).
    pub async fn config_status(&self) -> Result<crate::api::ConfigStatus, ClientError> {
        self.get("/api/v1/config/status").await
    }

    /// Which of `chunks` (BLAKE3 hex) the hub lacks.
    pub async fn chunks_missing(&self, chunks: Vec<String>) -> Result<Vec<String>, ClientError> {
        let url = format!("{}/api/v1/chunks/missing", self.base);
        let resp = self
            .send(self.http.post(&url).json(&crate::api::ChunkList { chunks }))
            .await?;
        let list: crate::api::ChunkList = self.decode(url, resp).await?;
        Ok(list.chunks)
    }

    /// Uploads one chunk (`PUT /api/v1/chunks/{hash}`).
    pub async fn chunk_put(&self, hash: &str, bytes: Vec<u8>) -> Result<(), ClientError> {
        let url = format!("{}/api/v1/chunks/{hash}", self.base);
        let resp = self
            .send(
                self.http
                    .put(&url)
                    .header("content-type", "application/octet-stream")
                    .body(bytes),
            )
            .await?;
        self.body(resp).await.map(|_| ())
    }

    /// One chunk's bytes (`GET /api/v1/chunks/{hash}`).
    pub async fn chunk_get(&self, hash: &str) -> Result<Vec<u8>, ClientError> {
        let url = format!("{}/api/v1/chunks/{hash}", self.base);
        let resp = self.send(self.http.get(&url)).await?;
        self.body(resp).await.map(|b| b.to_vec())
    }

    /// Publishes a signed patch whose chunks the hub holds
    /// (`POST /api/v1/patches`).
    pub async fn patch_publish(
        &self,
        signed: &trellis_node::patch::SignedPatch,
    ) -> Result<crate::api::PatchPublished, ClientError> {
        self.post_postcard("/api/v1/patches", signed).await
    }

    /// Has the relays (of `site` only, if given) fetch a patch's artifacts.
    pub async fn patch_stage(
        &self,
        name: &str,
        site: Option<&str>,
    ) -> Result<crate::api::StageReport, ClientError> {
        let mut url = format!("{}/api/v1/patches/{}/stage", self.base, urlencode(name));
        if let Some(s) = site {
            url.push_str(&format!("?site={}", urlencode(s)));
        }
        let resp = self.send(self.http.post(&url)).await?;
        self.decode(url, resp).await
    }

    /// Every published patch, newest first.
    pub async fn patch_list(&self) -> Result<crate::api::PatchList, ClientError> {
        self.get("/api/v1/patches").await
    }

    /// Every version of one patch.
    pub async fn patch_show(&self, name: &str) -> Result<crate::api::PatchVersions, ClientError> {
        self.get(&format!("/api/v1/patches/{}", urlencode(name)))
            .await
    }

    /// Starts a patch rollout (`POST /api/v1/rollouts`, signed).
    pub async fn rollout_start(
        &self,
        signed: &crate::rolloutapi::SignedRequest,
    ) -> Result<crate::rolloutapi::RolloutView, ClientError> {
        self.post_postcard("/api/v1/rollouts", signed).await
    }

    /// Every rollout, newest first.
    pub async fn rollouts(&self) -> Result<crate::rolloutapi::RolloutList, ClientError> {
        self.get("/api/v1/rollouts").await
    }

    /// One rollout (`run` a number or `latest`) with its live progress.
    pub async fn rollout(&self, run: &str) -> Result<crate::rolloutapi::RolloutView, ClientError> {
        self.get(&format!("/api/v1/rollouts/{}", urlencode(run)))
            .await
    }

    /// Pauses, resumes or aborts a rollout (signed).
    pub async fn rollout_control(
        &self,
        run: &str,
        signed: &crate::rolloutapi::SignedRequest,
    ) -> Result<crate::rolloutapi::RolloutView, ClientError> {
        self.post_postcard(
            &format!("/api/v1/rollouts/{}/control", urlencode(run)),
            signed,
        )
        .await
    }

    /// The management log as an audit trail (`GET /api/v1/audit`).
    pub async fn audit(
        &self,
        since_ms: Option<u64>,
        origin: Option<&str>,
        limit: usize,
    ) -> Result<crate::api::AuditReport, ClientError> {
        let mut path = format!("/api/v1/audit?limit={limit}");
        if let Some(t) = since_ms {
            path.push_str(&format!("&since={t}"));
        }
        if let Some(o) = origin {
            path.push_str(&format!("&origin={}", urlencode(o)));
        }
        self.get(&path).await
    }

    /// The hub's check of its stored log (`GET /api/v1/audit/verify`).
    pub async fn audit_verify(&self) -> Result<crate::api::AuditVerifyReport, ClientError> {
        self.get("/api/v1/audit/verify").await
    }

    /// Incidents, newest first: the open ones, or with `all` the resolved
    /// ones kept too (`GET /api/v1/incidents`).
    pub async fn incidents(
        &self,
        all: bool,
    ) -> Result<crate::incidentdriver::IncidentsReport, ClientError> {
        let state = if all { "all" } else { "open" };
        self.get(&format!("/api/v1/incidents?state={state}")).await
    }

    pub async fn fleet(&self) -> Result<FleetReport, ClientError> {
        self.get("/api/v1/fleet").await
    }

    /// A relay's own site (`GET /api/v1/site` on the relay's API).
    pub async fn relay_site(&self) -> Result<FleetReport, ClientError> {
        self.get("/api/v1/site").await
    }

    /// A relay's site's nodes (`GET /api/v1/site/nodes` on the relay's API).
    pub async fn relay_nodes(&self) -> Result<NodesReport, ClientError> {
        self.get("/api/v1/site/nodes").await
    }

    pub async fn nodes(
        &self,
        site: &str,
        region: Option<&str>,
    ) -> Result<NodesReport, ClientError> {
        let mut path = format!("/api/v1/sites/{}/nodes", urlencode(site));
        if let Some(r) = region {
            path.push_str(&format!("?region={}", urlencode(r)));
        }
        self.get(&path).await
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The innermost cause of an error, which is the one that says what
/// happened ("Connection refused"), not where.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_means_http() {
        assert_eq!(
            ApiClient::new("127.0.0.1:7800").unwrap().base(),
            "http://127.0.0.1:7800"
        );
        assert_eq!(ApiClient::new("http://h:1/").unwrap().base(), "http://h:1");
        assert!(ApiClient::new("ftp://h:1").is_err());
        assert!(ApiClient::new("http://").is_err());
    }

    #[tokio::test]
    async fn an_unreachable_hub_is_explained() {
        // Bind and drop to find a port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = ApiClient::new(&format!("127.0.0.1:{port}")).unwrap();
        let err = c.fleet().await.unwrap_err().to_string();
        assert!(err.contains("cannot reach"), "{err}");
        assert!(err.contains("trellis up"), "{err}");
    }
}
