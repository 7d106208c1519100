//! Enrolment: a machine with no certificate joins the fleet with a join
//! token. It makes its key and a certificate signing request locally (the
//! key never leaves it), sends the request with the token to its site's
//! relay on the relay's enrolment endpoint (`trellis-enrol/1`, the only
//! protocol served to clients without a certificate), and the relay
//! forwards it to a hub over its uplink, or keeps it on disk while its WAN
//! link is down and forwards it when the link returns. The hub checks the
//! token (the relay's site, uses left, expiry) and signs a certificate for
//! that site.
//!
//! This module holds what the three tiers share: the token's format and
//! record, the request and its answers, and the machine's side.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::id::Role;

/// The enrolment protocol.
pub const ENROL_ALPN: &[u8] = b"trellis-enrol/1";
/// Version byte of enrolment frames.
pub const ENROL_VERSION: u8 = 1;
/// Largest enrolment frame: a request (token, name, CSR) or an answer
/// (a certificate).
pub const MAX_ENROL_FRAME: usize = 16 * 1024;
/// What every join token starts with.
pub const TOKEN_PREFIX: &str = "trellis-join-";
/// The gossip key under which a relay publishes its enrolment address, so
/// that its nodes find where to renew their certificates.
pub const GOSSIP_KEY: &str = "enrol";

/// What a machine asks a relay's enrolment endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrolAsk {
    /// A first certificate, with a join token.
    Enrol(EnrolRequest),
    /// A new certificate for the identity of the (still valid, unrevoked)
    /// certificate the machine presents on the connection, over a new key:
    /// `csr` is a signing request over that key (DER).
    Renew { csr: Vec<u8> },
}

/// A machine's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolRequest {
    /// The whole join token.
    pub token: String,
    /// The name the machine asks for (its hostname by default).
    pub name: String,
    /// A certificate signing request over the machine's new key (DER).
    pub csr: Vec<u8>,
}

impl EnrolRequest {
    /// Names the request: the same request sent again is the same one.
    pub fn id(&self) -> String {
        let bytes = postcard::to_stdvec(self).expect("requests serialise");
        blake3::hash(&bytes).to_hex()[..32].to_owned()
    }
}

/// The answer to an [`EnrolRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrolResponse {
    /// The certificate (PEM), signed by the mesh CA.
    Issued {
        cert_pem: String,
        /// Labels the token gives the machine (merged under its
        /// configuration's `[node] labels`).
        labels: BTreeMap<String, String>,
    },
    /// Kept by the relay; ask again later with the same request.
    Pending { why: String, retry_after_s: u32 },
    /// Refused for good; the reason says what to do.
    Refused { reason: String },
}

/// A join token split into its id (public: names the token in the log and
/// the audit trail) and its secret (only its BLAKE3 is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret: String,
}

impl JoinToken {
    /// A new random token.
    pub fn generate() -> JoinToken {
        use ring::rand::SecureRandom;
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; 8];
        let mut secret = [0u8; 32];
        rng.fill(&mut id).expect("the system's random numbers");
        rng.fill(&mut secret).expect("the system's random numbers");
        JoinToken {
            id: crate::apply::hex(&id),
            secret: crate::apply::hex(&secret),
        }
    }

    /// Reads `trellis-join-ID.SECRET`.
    pub fn parse(s: &str) -> Result<JoinToken, String> {
        let bad = || {
            format!(
                "not a join token: expected {TOKEN_PREFIX}<16 hex>.<64 hex> (from `trellis token create`)"
            )
        };
        let rest = s.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
        let (id, secret) = rest.split_once('.').ok_or_else(bad)?;
        let hex = |v: &str, n: usize| v.len() == n && v.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(id, 16) || !hex(secret, 64) {
            return Err(bad());
        }
        Ok(JoinToken {
            id: id.to_ascii_lowercase(),
            secret: secret.to_ascii_lowercase(),
        })
    }

    /// BLAKE3 of the secret, hex: what the hubs keep.
    pub fn secret_hash(&self) -> String {
        blake3::hash(self.secret.as_bytes()).to_hex().to_string()
    }

    /// Whether `hash` is this token's [`JoinToken::secret_hash`], compared
    /// in constant time.
    pub fn matches(&self, hash: &str) -> bool {
        let mine = self.secret_hash();
        mine.len() == hash.len()
            && mine
                .bytes()
                .zip(hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{TOKEN_PREFIX}{}.{}", self.id, self.secret)
    }
}

/// A join token as the hubs keep it (in the replicated log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    /// [`JoinToken::secret_hash`].
    pub secret_blake3: String,
    pub region: String,
    pub site: String,
    pub role: Role,
    /// Labels the machines enrolled with it get.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// How many machines may enrol with it.
    pub uses: u32,
    /// Unix milliseconds after which it is refused.
    pub expires_ms: u64,
    pub created_ms: u64,
    pub created_by: String,
}

/// Why a token does not admit a request from a relay of `region`/`site`
/// at `now_ms` after `used` enrolments, or nothing if it does.
pub fn check_token(
    record: &TokenRecord,
    region: &str,
    site: &str,
    used: u32,
    now_ms: u64,
) -> Result<(), String> {
    if record.region != region || record.site != site {
        return Err(format!(
            "this token is for site {}/{}, not {region}/{site}: use a token created for this site",
            record.region, record.site
        ));
    }
    if now_ms >= record.expires_ms {
        return Err(format!(
            "this token expired {} s ago: create a new one with `trellis token create`",
            (now_ms - record.expires_ms) / 1000
        ));
    }
    if used >= record.uses {
        return Err(format!(
            "this token was used up ({} of {} uses): create a new one with `trellis token create`",
            used, record.uses
        ));
    }
    Ok(())
}

/// The member a machine of `role` enrols through: a node through its
/// site's relay, a relay through a hub.
pub fn enrols_through(role: Role) -> Role {
    match role {
        Role::Node => Role::Relay,
        _ => Role::Hub,
    }
}

/// Sends `ask` once to the enrolment endpoint at `relay`, which must be a
/// `expect` (a relay, or a hub), with `config` (trusting the mesh CA;
/// presenting the machine's certificate for a renewal), and returns its
/// answer.
pub async fn ask_endpoint(
    relay: SocketAddr,
    expect: Role,
    config: quinn::ClientConfig,
    ask: &EnrolAsk,
) -> Result<EnrolResponse, String> {
    let bind: SocketAddr = if relay.is_ipv4() {
        "0.0.0.0:0".parse().expect("address")
    } else {
        "[::]:0".parse().expect("address")
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(|e| format!("cannot bind: {e}"))?;
    endpoint.set_default_client_config(config);
    let exchange = async {
        let conn = endpoint
            .connect(relay, crate::tls::MESH_SERVER_NAME)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("cannot reach the {expect} at {relay}: {e}"))?;
        let who = crate::tls::peer_identity(&conn).map_err(|e| e.to_string())?;
        if who.role != expect {
            return Err(format!("{relay} is {who}, not a {expect}"));
        }
        let answer =
            crate::wire::ask::<_, EnrolResponse>(&conn, ENROL_VERSION, ask, MAX_ENROL_FRAME)
                .await?
                .ok_or("the stream was closed without an answer")?;
        conn.close(0u32.into(), b"done");
        Ok(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from the {expect} at {relay} within 20 s"
            ))
        });
    endpoint.wait_idle().await;
    answer
}

/// Where a machine's identity lives: the mesh CA's certificate (read),
/// and its own certificate and key (written by [`enrol`]).
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// How long a client of an enrolment endpoint may take over each step.
pub const ENDPOINT_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the enrolment protocol on `listen` until `shutdown` (a relay's
/// `[enrol] listen`, a hub's `[enrolment] listen`): one request per
/// connection, `at_once` connections answered at a time (more are
/// refused), each answered by `answer` (given the connection, whose peer
/// certificate it may read). Returns the bound address.
pub fn serve<A, F>(
    listen: SocketAddr,
    creds: &crate::tls::Credentials,
    at_once: usize,
    shutdown: tokio_util::sync::CancellationToken,
    answer: A,
) -> Result<SocketAddr, String>
where
    A: Fn(EnrolAsk, quinn::Connection) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = EnrolResponse> + Send,
{
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            Duration::from_secs(20).try_into().expect("a short timeout"),
        ))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    let config = creds
        .enrolment_server_config(ENROL_ALPN, Arc::new(transport))
        .map_err(|e| e.to_string())?;
    let endpoint = quinn::Endpoint::server(config, listen)
        .map_err(|e| format!("cannot listen for enrolments on {listen}: {e}"))?;
    let addr = endpoint.local_addr().map_err(|e| e.to_string())?;
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        let limit = Arc::new(tokio::sync::Semaphore::new(at_once));
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(error) = answer_one(incoming, &*answer).await {
                    tracing::warn!(%error, "enrolment connection ended");
                }
            });
        }
        endpoint.close(0u32.into(), b"stopping");
    });
    Ok(addr)
}

async fn answer_one<A, F>(incoming: quinn::Incoming, answer: &A) -> Result<(), String>
where
    A: Fn(EnrolAsk, quinn::Connection) -> F,
    F: std::future::Future<Output = EnrolResponse>,
{
    let late = |what: &str| format!("{what} took longer than {ENDPOINT_IO_TIMEOUT:?}");
    let conn = tokio::time::timeout(ENDPOINT_IO_TIMEOUT, incoming)
        .await
        .map_err(|_| late("the handshake"))?
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = tokio::time::timeout(ENDPOINT_IO_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| late("opening a stream"))?
        .map_err(|e| e.to_string())?;
    let ask = tokio::time::timeout(
        ENDPOINT_IO_TIMEOUT,
        crate::wire::read_msg::<EnrolAsk>(&mut recv, ENROL_VERSION, MAX_ENROL_FRAME),
    )
    .await
    .map_err(|_| late("the request"))?;
    let response = match ask {
        Ok(Some(ask)) => answer(ask, conn.clone()).await,
        Ok(None) => return Ok(()),
        Err(e) => EnrolResponse::Refused {
            reason: format!("not an enrolment request: {e}"),
        },
    };
    crate::wire::write_msg(&mut send, ENROL_VERSION, &response, MAX_ENROL_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    // Until the client has read the answer and closed.
    let _ = tokio::time::timeout(ENDPOINT_IO_TIMEOUT, conn.closed()).await;
    Ok(())
}

/// The identity of the member certificate `conn`'s client presented, and
/// its fingerprint, if it presented one (checked against the mesh CA in the
/// handshake).
pub fn client_certificate(conn: &quinn::Connection) -> Option<(crate::id::Identity, [u8; 32])> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let first = certs.first()?;
    let identity = crate::tls::identity_of(first).ok()?;
    Some((identity, crate::revocation::fingerprint(first)))
}

/// What [`enrol`] wrote.
#[derive(Debug)]
pub struct Enrolled {
    pub identity: crate::id::Identity,
}

/// Enrols this machine: a new key and a request naming `name`, sent to
/// `relay` until it is answered for good or `wait` is over (`progress`
/// hears every pending answer). Writes the key (0600) and the certificate
/// atomically where the configuration says; refuses to overwrite an
/// existing certificate.
pub async fn enrol(
    relay: SocketAddr,
    role: Role,
    token: &str,
    name: &str,
    files: &IdentityFiles,
    wait: Duration,
    mut progress: impl FnMut(&str),
) -> Result<Enrolled, String> {
    let (ca_path, cert_path, key_path) = (&files.ca, &files.cert, &files.key);
    JoinToken::parse(token)?;
    crate::id::validate_name("name", name).map_err(|e| format!("--name {name}: {e}"))?;
    if cert_path.exists() {
        return Err(format!(
            "{} already exists: this machine is enrolled (remove it to enrol again)",
            cert_path.display()
        ));
    }
    let ca_pem = std::fs::read(ca_path).map_err(|e| {
        format!(
            "cannot read the mesh CA's certificate {}: {e} (copy ca.crt from the CA, never ca.key)",
            ca_path.display()
        )
    })?;
    // The key and the request are kept until the certificate comes, so
    // that running the command again asks for the same request (which the
    // relay may hold) rather than a second one that takes another use.
    let (pending_key, pending_request) = (
        with_suffix(key_path, ".pending"),
        with_suffix(cert_path, ".request"),
    );
    let kept = std::fs::read_to_string(&pending_key).ok().zip(
        std::fs::read(&pending_request)
            .ok()
            .and_then(|b| postcard::from_bytes::<EnrolRequest>(&b).ok()),
    );
    let (key_pem, request) = match kept {
        Some((key, req)) if req.token == token.trim() && req.name == name => {
            progress("asking again with the request made before");
            (key, req)
        }
        _ => {
            let (key_pem, csr) =
                crate::tls::signing_request(role, name).map_err(|e| e.to_string())?;
            let req = EnrolRequest {
                token: token.trim().to_owned(),
                name: name.to_owned(),
                csr,
            };
            crate::apply::write_atomic(&pending_key, key_pem.as_bytes(), 0o600)
                .map_err(|e| format!("cannot write {}: {e}", pending_key.display()))?;
            let bytes = postcard::to_stdvec(&req).expect("requests serialise");
            crate::apply::write_atomic(&pending_request, &bytes, 0o600)
                .map_err(|e| format!("cannot write {}: {e}", pending_request.display()))?;
            (key_pem, req)
        }
    };
    let request = EnrolAsk::Enrol(request);
    let config =
        crate::tls::enrolment_client_config(&ca_pem, ENROL_ALPN).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let (cert_pem, labels) = loop {
        let answer = ask_endpoint(relay, enrols_through(role), config.clone(), &request).await;
        let retry = match answer {
            Ok(EnrolResponse::Issued { cert_pem, labels }) => break (cert_pem, labels),
            Ok(EnrolResponse::Refused { reason }) => {
                return Err(format!("enrolment refused: {reason}"));
            }
            Ok(EnrolResponse::Pending { why, retry_after_s }) => {
                progress(&format!("pending: {why}"));
                Duration::from_secs(retry_after_s.clamp(1, 60).into())
            }
            Err(e) => {
                progress(&e);
                Duration::from_secs(2)
            }
        };
        if started.elapsed() + retry > wait {
            return Err(format!(
                "not enrolled after {} s; run the same command again to go on waiting (the relay keeps the request)",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(retry).await;
    };
    let identity = crate::tls::identity_of_pem(&cert_pem).map_err(|e| e.to_string())?;
    if identity.name != name || identity.role != role {
        return Err(format!(
            "the certificate issued names {identity}, not {role} {name}"
        ));
    }
    crate::apply::write_atomic(key_path, key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
    let labels_file = labels_path(cert_path);
    if labels.is_empty() {
        let _ = std::fs::remove_file(&labels_file);
    } else {
        let json = serde_json::to_vec_pretty(&labels).expect("labels serialise");
        crate::apply::write_atomic(&labels_file, &json, 0o644)
            .map_err(|e| format!("cannot write {}: {e}", labels_file.display()))?;
    }
    crate::apply::write_atomic(cert_path, cert_pem.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", cert_path.display()))?;
    let _ = std::fs::remove_file(&pending_request);
    let _ = std::fs::remove_file(&pending_key);
    Ok(Enrolled { identity })
}

/// Where the labels a token gave the machine are kept: beside its
/// certificate.
pub fn labels_path(cert: &std::path::Path) -> std::path::PathBuf {
    with_suffix(cert, ".labels.json")
}

/// The labels a token gave the machine whose certificate is at `cert`
/// (none if it was not enrolled with labels). A damaged file is an error.
pub fn enrolled_labels(cert: &std::path::Path) -> Result<BTreeMap<String, String>, String> {
    let path = labels_path(cert);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            format!(
                "{} is damaged ({e}); remove it, or enrol again",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `path` with `suffix` added to its file name.
fn with_suffix(path: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    std::path::PathBuf::from(s)
}

/// When the certificate (DER) expires, in Unix seconds.
pub fn not_after(cert_der: &[u8]) -> Result<i64, String> {
    use x509_parser::prelude::*;
    let (_, x509) = X509Certificate::from_der(cert_der).map_err(|e| e.to_string())?;
    Ok(x509.validity().not_after.timestamp())
}

/// When the certificate (PEM) expires, in Unix seconds.
pub fn not_after_pem(cert_pem: &str) -> Result<i64, String> {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| e.to_string())?;
    not_after(&der)
}

/// Renews this member's certificate through the relay at `relay`: a new
/// key and a request naming the same member, sent over a connection that
/// presents the current certificate. The new key and certificate are
/// written beside the old ones and then renamed over them (key first).
/// Returns the new certificate's expiry (Unix seconds).
pub async fn renew(
    relay: SocketAddr,
    creds: &crate::tls::Credentials,
    files: &IdentityFiles,
) -> Result<i64, String> {
    let me = &creds.identity;
    let (key_pem, csr) =
        crate::tls::signing_request(me.role, &me.name).map_err(|e| e.to_string())?;
    let config = creds
        .client_config(
            &[ENROL_ALPN.to_vec()],
            Arc::new(quinn::TransportConfig::default()),
        )
        .map_err(|e| e.to_string())?;
    let through = enrols_through(me.role);
    let cert_pem = match ask_endpoint(relay, through, config, &EnrolAsk::Renew { csr }).await? {
        EnrolResponse::Issued { cert_pem, .. } => cert_pem,
        EnrolResponse::Refused { reason } => return Err(format!("renewal refused: {reason}")),
        EnrolResponse::Pending { why, .. } => return Err(format!("not renewed yet: {why}")),
    };
    let identity = crate::tls::identity_of_pem(&cert_pem).map_err(|e| e.to_string())?;
    if &identity != me {
        return Err(format!("the certificate issued names {identity}, not {me}"));
    }
    let expires = not_after_pem(&cert_pem)?;
    let next = |p: &std::path::Path| with_suffix(p, ".next");
    crate::apply::write_atomic(&next(&files.key), key_pem.as_bytes(), 0o600)
        .map_err(|e| format!("cannot write {}: {e}", files.key.display()))?;
    crate::apply::write_atomic(&next(&files.cert), cert_pem.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", files.cert.display()))?;
    for p in [&files.key, &files.cert] {
        std::fs::rename(next(p), p).map_err(|e| format!("cannot replace {}: {e}", p.display()))?;
    }
    Ok(expires)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_its_secret_is_matched_by_its_hash_only() {
        let t = JoinToken::generate();
        let text = t.to_string();
        assert!(text.starts_with(TOKEN_PREFIX));
        let back = JoinToken::parse(&format!(" {text}\n")).unwrap();
        assert_eq!(back, t);
        assert!(back.matches(&t.secret_hash()));
        let other = JoinToken::generate();
        assert!(!back.matches(&other.secret_hash()));
        for bad in [
            "",
            "trellis-join-",
            "trellis-join-abc.def",
            "join-0123456789abcdef.00",
        ] {
            assert!(
                JoinToken::parse(bad)
                    .unwrap_err()
                    .contains("not a join token"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_token_admits_only_its_site_before_expiry_and_within_its_uses() {
        let r = TokenRecord {
            id: "0123456789abcdef".into(),
            secret_blake3: String::new(),
            region: "eu".into(),
            site: "par".into(),
            role: Role::Node,
            labels: BTreeMap::new(),
            uses: 2,
            expires_ms: 10_000,
            created_ms: 0,
            created_by: "alice".into(),
        };
        assert_eq!(check_token(&r, "eu", "par", 1, 9_999), Ok(()));
        assert!(
            check_token(&r, "eu", "ber", 0, 0)
                .unwrap_err()
                .contains("for site eu/par, not eu/ber")
        );
        assert!(
            check_token(&r, "eu", "par", 0, 12_000)
                .unwrap_err()
                .contains("expired 2 s ago")
        );
        assert!(
            check_token(&r, "eu", "par", 2, 0)
                .unwrap_err()
                .contains("used up (2 of 2 uses)")
        );
    }

    #[test]
    fn the_ca_signs_a_request_for_the_key_in_it_with_its_own_names() {
        use crate::id::Identity;
        let ca = crate::tls::MeshCa::generate("t").unwrap();
        let (key_pem, csr) = crate::tls::signing_request(Role::Node, "web-01").unwrap();
        let id = Identity::new(Role::Node, "eu", "par", "web-01").unwrap();
        let cert = ca.sign_request(&csr, &id, 30).unwrap();
        assert_eq!(crate::tls::identity_of_pem(&cert).unwrap(), id);
        // The key and the certificate make working credentials.
        let dir = tempfile::tempdir().unwrap();
        let (c, k, a) = (
            dir.path().join("c"),
            dir.path().join("k"),
            dir.path().join("a"),
        );
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key_pem).unwrap();
        std::fs::write(&a, ca.cert_pem()).unwrap();
        let creds = crate::tls::Credentials::load(&a, &c, &k).unwrap();
        assert_eq!(creds.identity, id);
        // A damaged request, or a key of the wrong kind, is refused.
        let mut bad = csr.clone();
        let n = bad.len();
        bad[n - 5] ^= 1;
        assert!(ca.sign_request(&bad, &id, 30).is_err());
        let (_, op) = crate::tls::signing_request(Role::Operator, "alice").unwrap();
        assert!(
            ca.sign_request(&op, &id, 30)
                .unwrap_err()
                .to_string()
                .contains("not of the kind")
        );
    }
}
