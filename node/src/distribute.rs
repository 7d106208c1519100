//! How a configuration version moves inside a site, and how its members
//! say what they did with it.
//!
//! The relay caches the newest signed bundle its hub pushed and announces
//! it in the site's gossip ([`keys::OFFER`] = `VERSION DIGEST`). A node that
//! sees an offer newer than what it applied fetches the bundle from the
//! relay (ALPN `trellis-fetch/1`, [`fetch`]), checks the operator's
//! signature, resolves its own files from the fleet and applies them. It
//! then publishes, in gossip, what it holds ([`keys::APPLIED`]), how its
//! last attempt ended ([`keys::RESULT`]) and the last drift of each file
//! ([`keys::DRIFT_PREFIX`]); the relay turns changes of those into events for the
//! hub. Gossip carries only the latest value of each key, so reports are
//! states (numbered where two in a row could look alike), not a queue.
//!
//! Values are short text, parsed leniently: a value a member cannot read
//! is taken as absent, never as a reason to fail.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::authz::Protocol;
use crate::bundle::{MAX_BUNDLE_BYTES, SignedBundle};
use crate::endpoint::{Accepted, MeshEndpoint, close};
use crate::patch::DIRECT_ALIGN;
use crate::wire::{self, WireError};

/// The gossip keys of configuration.
pub mod keys {
    /// A relay's cached bundle: `VERSION DIGEST` (digest: 64 hex digits).
    pub const OFFER: &str = "config:offer";
    /// What a node holds: `VERSION HASH` (hash of its managed state, hex).
    pub const APPLIED: &str = "config:applied";
    /// A node's last attempt: `VERSION OUTCOME DETAIL…` where OUTCOME is
    /// `ok`, `failed` or `refused`.
    pub const RESULT: &str = "config:result";
    /// A node's last drift of one file, one key per file
    /// (`config:drift:PATH`): `N ACTION EXPECTED FOUND SIZE PATH` where N
    /// counts drifts since the node started, ACTION is `healed`,
    /// `reported` or `unhealed`, FOUND and SIZE are `-` for a missing file.
    /// A file found as applied again after a drift that stayed open has
    /// its key removed.
    pub const DRIFT_PREFIX: &str = "config:drift:";
}

/// Longest detail (a reload's output, a refusal's reason) carried in
/// gossip; the full text is in the node's log.
pub const MAX_RESULT_DETAIL: usize = 600;

/// Hex of 32 bytes.
pub fn hex32(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from 64 hex digits.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A configuration version as a relay announces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Offer {
    pub version: u64,
    /// [`SignedBundle::digest`].
    pub digest: [u8; 32],
}

impl Offer {
    pub fn of(version: u64, bundle: &SignedBundle) -> Self {
        Offer {
            version,
            digest: bundle.digest(),
        }
    }

    pub fn encode(&self) -> String {
        format!("{} {}", self.version, hex32(&self.digest))
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (v, d) = s.split_once(' ')?;
        Some(Offer {
            version: v.parse().ok()?,
            digest: parse_hex32(d)?,
        })
    }
}

/// How a node's last attempt at a version ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Every file written, every reload command succeeded.
    Ok,
    /// Applied in part: a write or a reload command failed.
    Failed,
    /// Not applied at all: the bundle's signature, signer or content was
    /// not acceptable, or the node's files could not be resolved from it.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A node's last attempt at a configuration version.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ConfigResult {
    pub version: u64,
    pub outcome: Outcome,
    /// Empty when ok; otherwise what went wrong (at most
    /// [`MAX_RESULT_DETAIL`] bytes).
    pub detail: String,
}

impl ConfigResult {
    pub fn encode(&self) -> String {
        format!(
            "{} {} {}",
            self.version,
            self.outcome,
            cut(&self.detail, MAX_RESULT_DETAIL)
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.splitn(3, ' ');
        let version = parts.next()?.parse().ok()?;
        let outcome = match parts.next()? {
            "ok" => Outcome::Ok,
            "failed" => Outcome::Failed,
            "refused" => Outcome::Refused,
            _ => return None,
        };
        Some(ConfigResult {
            version,
            outcome,
            detail: parts.next().unwrap_or("").to_owned(),
        })
    }
}

/// What was done about a drifted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftAction {
    /// Rewritten as applied.
    Healed,
    /// Left as found (`drift = "report"`).
    Reported,
    /// Healing was attempted and failed.
    Unhealed,
}

impl DriftAction {
    pub fn as_str(self) -> &'static str {
        match self {
            DriftAction::Healed => "healed",
            DriftAction::Reported => "reported",
            DriftAction::Unhealed => "unhealed",
        }
    }
}

/// The last drift a node found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DriftNote {
    /// Drifts found since the node started: tells two drifts of the same
    /// file apart.
    pub n: u64,
    pub action: DriftAction,
    pub path: String,
    /// SHA-256 of the applied content (hex).
    pub expected: String,
    /// SHA-256 of what was found; `None`: the file was missing.
    pub found: Option<String>,
    /// Size of what was found.
    pub size: Option<u64>,
}

impl DriftNote {
    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.n,
            self.action.as_str(),
            self.expected,
            self.found.as_deref().unwrap_or("-"),
            self.size.map_or("-".to_owned(), |s| s.to_string()),
            self.path
        )
    }

    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.splitn(6, ' ');
        let n = parts.next()?.parse().ok()?;
        let action = match parts.next()? {
            "healed" => DriftAction::Healed,
            "reported" => DriftAction::Reported,
            "unhealed" => DriftAction::Unhealed,
            _ => return None,
        };
        let expected = parts.next()?.to_owned();
        let found = Some(parts.next()?).filter(|f| *f != "-").map(str::to_owned);
        let size = match parts.next()? {
            "-" => None,
            n => Some(n.parse().ok()?),
        };
        let path = parts.next().filter(|p| !p.is_empty())?.to_owned();
        Some(DriftNote {
            n,
            action,
            path,
            expected,
            found,
            size,
        })
    }

    /// Whether the file is still not as applied.
    pub fn open(&self) -> bool {
        self.action != DriftAction::Healed
    }
}

/// What a member says about configuration in gossip.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberConfig {
    /// A relay's cached version.
    pub offer: Option<Offer>,
    /// A node's applied version and the hash of its managed state (hex).
    pub applied: Option<(u64, String)>,
    pub result: Option<ConfigResult>,
    /// A node's last drift of each file, by path.
    pub drift: std::collections::BTreeMap<String, DriftNote>,
}

impl MemberConfig {
    /// Whether some managed file is known not to be as applied.
    pub fn drifted(&self) -> bool {
        self.drift.values().any(DriftNote::open)
    }

    /// Reads a member's configuration keys; unreadable values are absent.
    pub fn from_kv<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut c = MemberConfig::default();
        for (k, v) in kv {
            match k {
                keys::OFFER => c.offer = Offer::parse(v),
                keys::APPLIED => {
                    c.applied = v
                        .split_once(' ')
                        .and_then(|(ver, h)| Some((ver.parse().ok()?, h.to_owned())))
                }
                keys::RESULT => c.result = ConfigResult::parse(v),
                _ => {
                    if k.starts_with(keys::DRIFT_PREFIX)
                        && let Some(d) = DriftNote::parse(v)
                    {
                        c.drift.insert(d.path.clone(), d);
                    }
                }
            }
        }
        c
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Frame version of the fetch protocol.
pub const FETCH_VERSION: u8 = 1;
/// Largest fetch request.
pub const MAX_FETCH_REQUEST: usize = 256;
/// Largest fetch response: a bundle with its signature and certificate.
pub const MAX_FETCH_FRAME: usize = MAX_BUNDLE_BYTES + (64 << 10);
/// Time allowed for one fetch, connection included: a bundle is at most a
/// few MiB over the site's LAN.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// node → relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchRequest {
    /// The configuration version it saw offered.
    Bundle { want: Offer },
    /// One chunk of a patch artifact the relay keeps, by BLAKE3.
    Chunk([u8; 32]),
    /// A signed patch manifest the relay keeps, by
    /// [`crate::patch::SignedPatch::id`].
    Patch([u8; 32]),
    /// A lease to remediate with runbook `rule` ([`crate::runbook`]): at
    /// most `max` nodes of the site hold one at once, each for `ttl_ms`.
    /// The holder is the asking node's certificate name.
    Lease { rule: String, max: u32, ttl_ms: u64 },
    /// The lease on `rule` is given back.
    Release { rule: String },
}

/// relay → node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchResponse {
    Bundle(Box<SignedBundle>),
    /// The relay holds another version now (it moved on since it
    /// announced the one asked for); `None`: it holds nothing.
    NotHere {
        have: Option<Offer>,
    },
    Chunk(#[serde(with = "wire::bytes")] Vec<u8>),
    /// The relay does not hold that chunk.
    NoChunk,
    Patch(Box<crate::patch::SignedPatch>),
    /// The relay does not hold that patch.
    NoPatch,
    Lease(crate::runbook::LeaseAnswer),
    Released,
    /// This relay keeps no leases.
    NoLeases,
}

/// Why a fetch failed. Nothing was applied.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Connect(#[from] crate::endpoint::ConnectError),
    #[error("fetch from {addr}: {source}")]
    Wire { addr: SocketAddr, source: WireError },
    #[error("fetch from {addr}: {reason}")]
    Stream { addr: SocketAddr, reason: String },
    #[error("no answer from {addr} within {FETCH_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("{addr} no longer holds version {want}; it holds {have}")]
    NotHere {
        addr: SocketAddr,
        want: u64,
        have: String,
    },
    /// The relay answered with bytes whose digest is not the one it
    /// announced: altered on the way, or a confused relay.
    #[error("{addr} sent a bundle whose digest is not the one announced for version {want}")]
    WrongDigest { addr: SocketAddr, want: u64 },
    /// The relay does not hold the patch asked for (not staged there, or
    /// removed since it ordered it).
    #[error("{addr} does not hold patch {id}; stage it for the site (`trellis patch stage`)")]
    NoPatch { addr: SocketAddr, id: String },
    /// The relay answered with another manifest than the one asked for: a
    /// confused relay, or one altered on the way.
    #[error("{addr} sent another manifest than patch {id}")]
    WrongPatch { addr: SocketAddr, id: String },
}

/// Sends one request on a stream of its own on `conn` (to the relay at
/// `addr`) and reads the answer (`None`: the relay closed the stream
/// without one). The caller bounds the time.
async fn exchange(
    conn: &quinn::Connection,
    addr: SocketAddr,
    request: &FetchRequest,
) -> Result<Option<FetchResponse>, FetchError> {
    match exchange_body(conn, addr, request).await? {
        None => Ok(None),
        Some(body) => wire::decode_body(&body, FETCH_VERSION)
            .map(Some)
            .map_err(|source| FetchError::Wire { addr, source }),
    }
}

/// [`exchange`], up to the answer's frame body (version byte on), not
/// decoded.
async fn exchange_body(
    conn: &quinn::Connection,
    addr: SocketAddr,
    request: &FetchRequest,
) -> Result<Option<Vec<u8>>, FetchError> {
    let mut recv = send_request(conn, addr, request).await?;
    wire::read_frame(&mut recv, MAX_FETCH_FRAME)
        .await
        .map_err(|source| FetchError::Wire { addr, source })
}

/// Sends `request` on a stream of its own and returns the stream's
/// receiving half, where the answer comes.
async fn send_request(
    conn: &quinn::Connection,
    addr: SocketAddr,
    request: &FetchRequest,
) -> Result<quinn::RecvStream, FetchError> {
    let stream_err = |e: &dyn std::fmt::Display| FetchError::Stream {
        addr,
        reason: e.to_string(),
    };
    let (mut send, recv) = conn.open_bi().await.map_err(|e| stream_err(&e))?;
    wire::write_msg(&mut send, FETCH_VERSION, request, MAX_FETCH_REQUEST)
        .await
        .map_err(|source| FetchError::Wire { addr, source })?;
    send.finish().map_err(|e| stream_err(&e))?;
    Ok(recv)
}

/// Sends one request to the relay at `addr` on a connection of its own
/// and reads the answer, all within [`FETCH_TIMEOUT`].
async fn ask(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    request: &FetchRequest,
) -> Result<Option<FetchResponse>, FetchError> {
    let run = async {
        let (conn, _) = endpoint.connect(addr, Protocol::Fetch).await?;
        let answer = exchange(&conn, addr, request).await?;
        conn.close(close::DONE, b"fetched");
        Ok(answer)
    };
    tokio::time::timeout(FETCH_TIMEOUT, run)
        .await
        .map_err(|_| FetchError::Timeout { addr })?
}

/// An answer that is not one the request allows.
fn unexpected(addr: SocketAddr, answer: Option<FetchResponse>) -> FetchError {
    FetchError::Stream {
        addr,
        reason: match answer {
            Some(other) => format!("unexpected answer {other:?}"),
            None => "the relay closed the stream without answering".to_owned(),
        },
    }
}

/// Fetches the bundle `want` from the relay at `addr`.
pub async fn fetch(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    want: Offer,
) -> Result<SignedBundle, FetchError> {
    match ask(endpoint, addr, &FetchRequest::Bundle { want }).await? {
        Some(FetchResponse::Bundle(b)) if b.digest() == want.digest => Ok(*b),
        Some(FetchResponse::Bundle(_)) => Err(FetchError::WrongDigest {
            addr,
            want: want.version,
        }),
        Some(FetchResponse::NotHere { have }) => Err(FetchError::NotHere {
            addr,
            want: want.version,
            have: have.map_or("nothing".to_owned(), |o| format!("version {}", o.version)),
        }),
        other => Err(unexpected(addr, other)),
    }
}

/// Asks the relay at `addr` for a lease on runbook `rule`.
pub async fn ask_lease(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    rule: &str,
    max: u32,
    ttl: Duration,
) -> Result<crate::runbook::LeaseAnswer, FetchError> {
    let request = FetchRequest::Lease {
        rule: rule.to_owned(),
        max,
        ttl_ms: ttl.as_millis() as u64,
    };
    match ask(endpoint, addr, &request).await? {
        Some(FetchResponse::Lease(a)) => Ok(a),
        Some(FetchResponse::NoLeases) => Err(FetchError::Stream {
            addr,
            reason: "the relay keeps no leases".to_owned(),
        }),
        other => Err(unexpected(addr, other)),
    }
}

/// Gives the lease on runbook `rule` back to the relay at `addr`.
pub async fn release_lease(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    rule: &str,
) -> Result<(), FetchError> {
    let request = FetchRequest::Release {
        rule: rule.to_owned(),
    };
    match ask(endpoint, addr, &request).await? {
        Some(FetchResponse::Released | FetchResponse::NoLeases) => Ok(()),
        other => Err(unexpected(addr, other)),
    }
}

/// A relay's runbook leases ([`crate::runbook::Leases`]), kept in a file:
/// a grant is on disk before the node hears of it, so a relay that restarts
/// does not grant the same places twice.
pub struct LeaseBook {
    path: std::path::PathBuf,
    leases: std::sync::Mutex<crate::runbook::Leases>,
    /// Nothing is granted before this (wall clock ms): the file was
    /// unreadable, and the places it held are unknown until every lease it
    /// could hold has expired.
    grant_from_ms: u64,
}

impl LeaseBook {
    /// The book kept at `path`; empty when there is none. An unreadable
    /// file is moved aside (`.bad`) and nothing is granted for
    /// [`crate::runbook::MAX_LEASE`]: starting empty at once could grant
    /// places still held.
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        let mut grant_from_ms = 0;
        let leases = match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(l) => l,
                Err(e) => {
                    let aside = path.with_extension("json.bad");
                    std::fs::rename(path, &aside)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    grant_from_ms =
                        crate::clock::unix_ms() + crate::runbook::MAX_LEASE.as_millis() as u64;
                    tracing::error!(
                        path = %path.display(),
                        moved_to = %aside.display(),
                        error = %e,
                        "runbook leases unreadable; no lease is granted for an hour, until every lease it may have held expired"
                    );
                    Default::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(LeaseBook {
            path: path.to_owned(),
            leases: std::sync::Mutex::new(leases),
            grant_from_ms,
        })
    }

    fn save(&self, leases: &crate::runbook::Leases) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(leases).map_err(std::io::Error::other)?;
        crate::apply::write_atomic(&self.path, &bytes, 0o600)
    }

    /// Answers `node`'s request for a lease (blocking: it writes the file).
    pub fn ask(
        &self,
        now_ms: u64,
        rule: &str,
        node: &str,
        max: u32,
        ttl: Duration,
    ) -> Result<crate::runbook::LeaseAnswer, String> {
        if now_ms < self.grant_from_ms {
            return Ok(crate::runbook::LeaseAnswer::Busy {
                holders: vec!["(unknown: the relay's lease file was unreadable)".to_owned()],
                max,
            });
        }
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        let before = leases.clone();
        let answer = leases.ask(now_ms, rule, node, max, ttl);
        if *leases != before
            && let Err(e) = self.save(&leases)
        {
            *leases = before;
            return Err(format!("cannot keep the lease: {e}"));
        }
        Ok(answer)
    }

    /// Takes `node`'s lease on `rule` back (blocking: it writes the file).
    pub fn release(&self, rule: &str, node: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if leases.release(rule, node)
            && let Err(error) = self.save(&leases)
        {
            warn!(%error, rule, node, "cannot write the runbook leases; the lease expires by itself");
        }
    }

    /// Leases held now.
    pub fn held(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).held()
    }
}

/// Fetches the signed manifest of patch `id` from the relay at `addr`.
/// The signature is not checked here ([`crate::patch::verify`] does);
/// only that the manifest is the one asked for.
pub async fn fetch_patch(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    id: [u8; 32],
) -> Result<crate::patch::SignedPatch, FetchError> {
    match ask(endpoint, addr, &FetchRequest::Patch(id)).await? {
        Some(FetchResponse::Patch(p)) if p.id() == id => Ok(*p),
        Some(FetchResponse::Patch(_)) => Err(FetchError::WrongPatch {
            addr,
            id: hex32(&id),
        }),
        Some(FetchResponse::NoPatch) => Err(FetchError::NoPatch {
            addr,
            id: hex32(&id),
        }),
        other => Err(unexpected(addr, other)),
    }
}

/// What fetching an artifact from a relay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArtifactFetch {
    /// Chunks the partial file of an earlier attempt held already (not
    /// asked for).
    pub held: u64,
    /// Chunks written to the disk with direct I/O, not through the page
    /// cache (none where the file system does not allow it).
    pub direct: u64,
    pub stats: crate::patch::DownloadStats,
}

/// Chunk requests one artifact download keeps outstanding on its
/// connection, chunks being written counted in: one request at a time
/// leaves the link idle while each answer is checked and stored, and the
/// relay idle while it travels. Eight keep a LAN busy; a node then holds
/// at most 8 MiB of chunks in memory, and a relay reads at most this many
/// chunks at once for one node.
pub const CHUNKS_IN_FLIGHT: usize = 8;

/// Fetches `artifact` from the relay at `addr` into `dest`: the chunks
/// its partial file ([`crate::patch::PartialArtifact`], left by an earlier
/// attempt) lacks, over one connection, one chunk per stream with
/// [`CHUNKS_IN_FLIGHT`] streams at a time, each chunk checked against its
/// BLAKE3 before it is written in place ([`crate::patch::Download`] paces,
/// retries and gives up after `max_attempts` failures of one chunk); then
/// the file is flushed and renamed to `dest`. Hashing and disk work
/// run on tokio's blocking threads.
pub async fn fetch_artifact(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    artifact: &crate::patch::ArtifactRef,
    dest: &std::path::Path,
    max_attempts: u32,
) -> Result<ArtifactFetch, String> {
    use crate::patch::{ChunkOutcome, Download, HashedChunk, PartialArtifact};
    let blocking = |e: tokio::task::JoinError| format!("a file task failed: {e}");
    let (partial, held) = {
        let (a, dest) = (artifact.clone(), dest.to_owned());
        tokio::task::spawn_blocking(move || PartialArtifact::open(&a, &dest))
            .await
            .map_err(blocking)?
            .map_err(|e| e.to_string())?
    };
    let partial = Arc::new(partial);
    let mut d = Download::new(artifact, &held, max_attempts);
    let bufs = Arc::new(ChunkBufs::default());
    let mut conn: Option<quinn::Connection> = None;
    // Dropping these (an early return) cancels the requests.
    let mut asking: JoinSet<(u32, Result<HashedChunk, String>)> = JoinSet::new();
    let mut storing: JoinSet<Result<(), crate::patch::PatchError>> = JoinSet::new();
    loop {
        if let Some(e) = d.error() {
            // What was verified is kept: the next attempt resumes from it.
            while storing.join_next().await.is_some() {}
            return Err(e.to_string());
        }
        if d.done() && storing.is_empty() {
            break;
        }
        let now = std::time::Instant::now();
        let budget = CHUNKS_IN_FLIGHT.saturating_sub(storing.len());
        let requests = d.next_requests(now, budget);
        if !requests.is_empty() {
            match fetch_connection(endpoint, addr, &mut conn).await {
                Ok(c) => {
                    for index in requests {
                        let (c, hash) = (c.clone(), artifact.chunks[index as usize]);
                        let bufs = bufs.clone();
                        asking.spawn(async move {
                            let got = match ask_chunk(&c, hash, &bufs).await {
                                Ok(bytes) => {
                                    tokio::task::spawn_blocking(move || HashedChunk::new(bytes))
                                        .await
                                        .map_err(|e| e.to_string())
                                }
                                Err(reason) => Err(reason),
                            };
                            (index, got)
                        });
                    }
                }
                Err(reason) => {
                    for index in requests {
                        d.on_failure(std::time::Instant::now(), index, &reason);
                    }
                }
            }
            continue;
        }
        let wake = d.poll_timeout().unwrap_or(now + Duration::from_millis(100));
        tokio::select! {
            Some(asked) = asking.join_next(), if !asking.is_empty() => {
                let (index, got) = asked.map_err(|e| format!("a chunk request failed: {e}"))?;
                match got {
                    Ok(chunk) => {
                        if d.on_hashed(std::time::Instant::now(), index, &chunk)
                            == ChunkOutcome::Verified
                        {
                            let partial = partial.clone();
                            storing.spawn_blocking(move || partial.write(index, &chunk));
                        }
                    }
                    Err(reason) => d.on_failure(std::time::Instant::now(), index, &reason),
                }
            }
            Some(stored) = storing.join_next(), if !storing.is_empty() => {
                stored.map_err(blocking)?.map_err(|e| e.to_string())?;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    if let Some(c) = conn {
        c.close(close::DONE, b"fetched");
    }
    // Every write has ended: this is the only reference.
    let partial = Arc::try_unwrap(partial).map_err(|_| "a chunk write is still running")?;
    let direct = u64::from(partial.direct_writes());
    tokio::task::spawn_blocking(move || partial.finish())
        .await
        .map_err(blocking)?
        .map_err(|e| e.to_string())?;
    Ok(ArtifactFetch {
        held: held.len() as u64,
        direct,
        stats: d.stats(),
    })
}

/// The fetch connection to `addr`: the open one, or a new one.
async fn fetch_connection(
    endpoint: &MeshEndpoint,
    addr: SocketAddr,
    conn: &mut Option<quinn::Connection>,
) -> Result<quinn::Connection, String> {
    if let Some(c) = conn.as_ref().filter(|c| c.close_reason().is_none()) {
        return Ok(c.clone());
    }
    let (c, _) = endpoint
        .connect(addr, Protocol::Fetch)
        .await
        .map_err(|e| e.to_string())?;
    *conn = Some(c.clone());
    Ok(c)
}

/// One chunk, on a stream of its own, within [`FETCH_TIMEOUT`], read
/// into one of `bufs`.
async fn ask_chunk(
    conn: &quinn::Connection,
    hash: [u8; 32],
    bufs: &Arc<ChunkBufs>,
) -> Result<bytes::Bytes, String> {
    let ask = async {
        let addr = conn.remote_address();
        let answer = exchange_chunk(conn, addr, hash, bufs)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!("fetch from {addr}: the relay closed the stream without an answer")
            })?;
        match answer {
            Ok(bytes) => Ok(bytes),
            Err(FetchResponse::NoChunk) => Err("the relay does not hold the chunk".to_owned()),
            Err(other) => Err(format!("unexpected answer {other:?}")),
        }
    };
    tokio::time::timeout(FETCH_TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no chunk within {FETCH_TIMEOUT:?}")))
}

/// Asks for chunk `hash` on a stream of its own and reads the answer's
/// frame into one of `bufs`, placed so that the chunk's first byte falls
/// on a [`DIRECT_ALIGN`] boundary: [`PartialArtifact::write`] can then
/// hand it to the disk without a copy through the page cache. A chunk
/// answer comes back as a view of that buffer, which returns to `bufs`
/// when the last view of it is dropped; any other answer decoded.
///
/// [`PartialArtifact::write`]: crate::patch::PartialArtifact::write
async fn exchange_chunk(
    conn: &quinn::Connection,
    addr: SocketAddr,
    hash: [u8; 32],
    bufs: &Arc<ChunkBufs>,
) -> Result<Option<Result<bytes::Bytes, FetchResponse>>, FetchError> {
    let wire_err = |source| FetchError::Wire { addr, source };
    let mut recv = send_request(conn, addr, &FetchRequest::Chunk(hash)).await?;
    let Some(len) = wire::read_len(&mut recv, MAX_FETCH_FRAME)
        .await
        .map_err(wire_err)?
    else {
        return Ok(None);
    };
    let mut buf = bufs.take(len + DIRECT_ALIGN);
    let head = chunk_head_len(len).unwrap_or(0);
    let pad = (DIRECT_ALIGN - (buf.as_ptr() as usize + head) % DIRECT_ALIGN) % DIRECT_ALIGN;
    // Within the capacity `take` made sure of: no reallocation moves the
    // buffer after `pad` was worked out, and a reused buffer is not
    // zeroed again.
    if buf.len() < pad + len {
        buf.resize(pad + len, 0);
    }
    let body = pad..pad + len;
    let read = wire::read_body_into(&mut recv, &mut buf[body.clone()]).await;
    if let Err(source) = read {
        bufs.give(buf);
        return Err(wire_err(source));
    }
    match chunk_offset(&buf[body.clone()]) {
        Some(at) => Ok(Some(Ok(bytes::Bytes::from_owner(PooledChunk {
            buf,
            range: pad + at..body.end,
            bufs: bufs.clone(),
        })))),
        None => {
            let answer = wire::decode_body(&buf[body], FETCH_VERSION);
            bufs.give(buf);
            answer.map(|a| Some(Err(a))).map_err(wire_err)
        }
    }
}

/// Buffers for chunk answers, reused from one chunk of a download to the
/// next: a fresh megabyte for each chunk costs the kernel a page fault
/// for every 4 KiB of it.
#[derive(Debug, Default)]
struct ChunkBufs {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// Free buffers a [`ChunkBufs`] keeps; more are dropped. A download holds
/// at most [`CHUNKS_IN_FLIGHT`] answers being read or written, so this
/// many cover the buffers that come back between two chunks.
const CHUNK_BUFS_KEPT: usize = CHUNKS_IN_FLIGHT;

impl ChunkBufs {
    /// A buffer with room for at least `capacity` bytes.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let mut buf = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        if buf.capacity() < capacity {
            buf.reserve_exact(capacity - buf.len());
        }
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < CHUNK_BUFS_KEPT {
            free.push(buf);
        }
    }
}

/// The bytes of a chunk inside a [`ChunkBufs`] buffer, which goes back to
/// the pool when the last [`bytes::Bytes`] viewing it is dropped.
struct PooledChunk {
    buf: Vec<u8>,
    range: std::ops::Range<usize>,
    bufs: Arc<ChunkBufs>,
}

impl AsRef<[u8]> for PooledChunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.range.clone()]
    }
}

impl Drop for PooledChunk {
    fn drop(&mut self) {
        self.bufs.give(std::mem::take(&mut self.buf));
    }
}

/// postcard's variant index of [`FetchResponse::Chunk`].
const CHUNK_TAG: u8 = 2;

/// Where the chunk starts in a chunk answer's body of `len` bytes: after
/// the version, the variant and the chunk's length, a varint as long as
/// postcard makes it for `len` less that head. `None` for a length no
/// chunk answer has (then the body is read as any other answer).
fn chunk_head_len(len: usize) -> Option<usize> {
    (1..=5).map(|n| 2 + n).find(|&head| {
        len.checked_sub(head)
            .is_some_and(|chunk| varint_len(chunk) == head - 2)
    })
}

/// Bytes of `n` as a LEB128 varint.
fn varint_len(n: usize) -> usize {
    let bits = usize::BITS - n.leading_zeros();
    (bits.max(1) as usize).div_ceil(7)
}

/// The chunk a chunk answer's frame body (version byte on) carries, as a
/// view of the body, not a copy; any other answer decoded. Public for the
/// fetch protocol's fuzz target.
pub fn chunk_answer(body: Vec<u8>) -> Result<Result<bytes::Bytes, FetchResponse>, WireError> {
    if let Some(at) = chunk_offset(&body) {
        return Ok(Ok(bytes::Bytes::from(body).slice(at..)));
    }
    wire::decode_body(&body, FETCH_VERSION).map(Err)
}

/// Where the bytes of a [`FetchResponse::Chunk`] start in `body`, if it
/// is one: the version, the variant, the length (a LEB128 varint, as
/// postcard writes it) and exactly that many bytes.
fn chunk_offset(body: &[u8]) -> Option<usize> {
    let rest = body.strip_prefix(&[FETCH_VERSION, CHUNK_TAG])?;
    let mut len = 0usize;
    for (i, &b) in rest.iter().take(4).enumerate() {
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            let at = 2 + i + 1;
            return (body.len() - at == len).then_some(at);
        }
    }
    None
}

/// What a relay serves: its cached bundle and the offer naming it.
pub type Served = Option<Arc<(Offer, SignedBundle)>>;

/// Chunks a relay reads and hands to its connections at once, whatever
/// the number of nodes fetching: bounds the relay's memory (a megabyte
/// each) when a whole site fetches together.
pub const CHUNKS_SERVING: usize = 64;

/// Chunk answers a relay keeps encoded in memory, the most recently asked
/// for: the nodes of a site fetch the same artifact at about the same time
/// and in the same order, so a chunk read from disk and checked once is
/// sent to all of them from memory (32 MiB at most).
pub const CHUNKS_CACHED: usize = 32;

/// The relay's [`CHUNKS_CACHED`] most recently asked for chunks, as the
/// frames that answer them. A chunk is read from the store and checked
/// against its hash once, however many peers ask for it at once; what is
/// in the cache was checked when it was read, so a later change of the
/// file on disk does not reach a peer (a damaged file is found by the next
/// read after the chunk left the cache).
struct ChunkCache {
    slots: std::sync::Mutex<Vec<CacheSlot>>,
    /// Bumped on every lookup: the slot with the smallest `used` goes first.
    clock: std::sync::atomic::AtomicU64,
}

struct CacheSlot {
    hash: [u8; 32],
    /// Filled by the first asker; the others wait for it.
    frame: Arc<tokio::sync::OnceCell<bytes::Bytes>>,
    used: u64,
}

impl ChunkCache {
    fn new() -> Self {
        ChunkCache {
            slots: std::sync::Mutex::new(Vec::with_capacity(CHUNKS_CACHED)),
            clock: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The frame answering a request for chunk `hash`: from the cache, or
    /// read from `files` (`None`: the store does not hold it intact, which
    /// is not remembered).
    async fn frame(
        &self,
        files: &Arc<crate::patch::PatchFiles>,
        hash: [u8; 32],
    ) -> Option<bytes::Bytes> {
        let cell = self.slot(hash);
        let files = files.clone();
        let got = cell
            .get_or_try_init(|| async move {
                let chunk = tokio::task::spawn_blocking(move || files.chunks.get(&hash))
                    .await
                    .map_err(|_| ())?
                    .ok()
                    .flatten()
                    .ok_or(())?;
                wire::encode(FETCH_VERSION, &FetchResponse::Chunk(chunk), MAX_FETCH_FRAME)
                    .map(bytes::Bytes::from)
                    .map_err(|_| ())
            })
            .await
            .ok()
            .cloned();
        if got.is_none() {
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|s| !Arc::ptr_eq(&s.frame, &cell));
        }
        got
    }

    /// The cell for `hash`, made (in place of the least recently used one
    /// when the cache is full) if there is none.
    fn slot(&self, hash: [u8; 32]) -> Arc<tokio::sync::OnceCell<bytes::Bytes>> {
        let now = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slots.iter_mut().find(|s| s.hash == hash) {
            s.used = now;
            return s.frame.clone();
        }
        if slots.len() >= CHUNKS_CACHED
            && let Some(oldest) = (0..slots.len()).min_by_key(|&i| slots[i].used)
        {
            slots.swap_remove(oldest);
        }
        let frame = Arc::new(tokio::sync::OnceCell::new());
        slots.push(CacheSlot {
            hash,
            frame: frame.clone(),
            used: now,
        });
        frame
    }
}

/// Serves fetches on the connections `accepted` until `shutdown`: each
/// stream gets the bundle `served` holds if it is the one asked for, or a
/// patch manifest or chunk from `chunks`, or a runbook lease from `leases`. The streams of one connection
/// are answered concurrently, at most [`CHUNKS_IN_FLIGHT`] at a time (a
/// peer that opens more waits), and at most [`CHUNKS_SERVING`] chunks are
/// being read and written for all connections together. A peer that sends
/// a bad request has its connection closed.
pub async fn serve(
    mut accepted: mpsc::Receiver<Accepted>,
    served: watch::Receiver<Served>,
    chunks: Option<Arc<crate::patch::PatchFiles>>,
    leases: Option<Arc<LeaseBook>>,
    metrics: crate::metrics::MeshMetrics,
    shutdown: CancellationToken,
) {
    let serving = Arc::new(Semaphore::new(CHUNKS_SERVING));
    let cache = Arc::new(ChunkCache::new());
    loop {
        let a = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = accepted.recv() => match a { Some(a) => a, None => break },
        };
        let server = Arc::new(FetchServer {
            peer: a.peer,
            conn: a.conn,
            served: served.clone(),
            chunks: chunks.clone(),
            leases: leases.clone(),
            metrics: metrics.clone(),
            serving: serving.clone(),
            cache: cache.clone(),
        });
        tokio::spawn(async move {
            let streams = Arc::new(Semaphore::new(CHUNKS_IN_FLIGHT));
            loop {
                let Ok(permit) = streams.clone().acquire_owned().await else {
                    return;
                };
                let Ok((send, recv)) = server.conn.accept_bi().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    server.answer(send, recv).await;
                    drop(permit);
                });
            }
        });
    }
}

/// One peer's fetch connection and what it may be given.
struct FetchServer {
    peer: crate::id::Identity,
    conn: quinn::Connection,
    served: watch::Receiver<Served>,
    chunks: Option<Arc<crate::patch::PatchFiles>>,
    leases: Option<Arc<LeaseBook>>,
    metrics: crate::metrics::MeshMetrics,
    /// Shared by every connection: [`CHUNKS_SERVING`] permits.
    serving: Arc<Semaphore>,
    /// Shared by every connection.
    cache: Arc<ChunkCache>,
}

impl FetchServer {
    /// Reads one request from the stream and answers it.
    async fn answer(&self, send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let request = tokio::time::timeout(
            FETCH_TIMEOUT,
            wire::read_msg::<FetchRequest>(&mut recv, FETCH_VERSION, MAX_FETCH_REQUEST),
        )
        .await
        .unwrap_or(Err(WireError::Stream("timed out".into())));
        // Held from reading a chunk until quinn has taken it.
        let mut permit = None;
        let response = match request {
            Ok(Some(FetchRequest::Chunk(hash))) => {
                permit = self.serving.clone().acquire_owned().await.ok();
                let found = match &self.chunks {
                    Some(files) => self.cache.frame(files, hash).await,
                    None => None,
                };
                match found {
                    Some(frame) => {
                        self.send(send, frame).await;
                        return;
                    }
                    None => FetchResponse::NoChunk,
                }
            }
            Ok(Some(FetchRequest::Patch(id))) => {
                let found = match self.chunks.clone() {
                    Some(files) => tokio::task::spawn_blocking(move || files.manifest(&id))
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                };
                found.map_or(FetchResponse::NoPatch, |p| {
                    FetchResponse::Patch(Box::new(p))
                })
            }
            Ok(Some(FetchRequest::Lease { rule, max, ttl_ms })) => match self.leases.clone() {
                None => FetchResponse::NoLeases,
                Some(book) => {
                    let node = self.peer.name.clone();
                    let ttl = Duration::from_millis(ttl_ms);
                    let asked = tokio::task::spawn_blocking(move || {
                        let answer = book.ask(crate::clock::unix_ms(), &rule, &node, max, ttl);
                        (answer, rule, node)
                    })
                    .await;
                    match asked {
                        Ok((Ok(answer), rule, node)) => {
                            tracing::info!(%node, %rule, max, ?answer, "runbook lease asked");
                            FetchResponse::Lease(answer)
                        }
                        Ok((Err(error), rule, node)) => {
                            warn!(%node, %rule, %error, "runbook lease not granted");
                            FetchResponse::NoLeases
                        }
                        Err(_) => FetchResponse::NoLeases,
                    }
                }
            },
            Ok(Some(FetchRequest::Release { rule })) => match self.leases.clone() {
                None => FetchResponse::NoLeases,
                Some(book) => {
                    let node = self.peer.name.clone();
                    let _ = tokio::task::spawn_blocking(move || book.release(&rule, &node)).await;
                    FetchResponse::Released
                }
            },
            Ok(Some(FetchRequest::Bundle { want })) => {
                let current = self.served.borrow().clone();
                match current {
                    Some(c) if c.0 == want => FetchResponse::Bundle(Box::new(c.1.clone())),
                    other => FetchResponse::NotHere {
                        have: other.map(|c| c.0),
                    },
                }
            }
            Ok(None) => return,
            Err(WireError::Stream(e)) => {
                debug!(peer = %self.peer, error = %e, "fetch stream ended");
                return;
            }
            Err(error) => {
                self.metrics
                    .peer_error(Protocol::Fetch.as_str(), error.kind());
                warn!(peer = %self.peer, %error, "closing fetch connection: bad request");
                self.conn
                    .close(close::PROTOCOL_ERROR, error.to_string().as_bytes());
                return;
            }
        };
        if let Ok(frame) = wire::encode(FETCH_VERSION, &response, MAX_FETCH_FRAME) {
            drop(response);
            self.send(send, frame.into()).await;
        }
        drop(permit);
    }

    /// Writes the answer `frame` (shared with other streams, not copied)
    /// and finishes the stream. A peer that stops reading gets no answer
    /// after [`FETCH_TIMEOUT`], and the caller's permit is given back.
    async fn send(&self, mut send: quinn::SendStream, frame: bytes::Bytes) {
        match tokio::time::timeout(FETCH_TIMEOUT, send.write_chunk(frame)).await {
            Ok(Ok(())) => {
                let _ = send.finish();
            }
            Ok(Err(e)) => debug!(peer = %self.peer, error = %e, "fetch stream ended"),
            Err(_) => {
                let _ = send.reset(quinn::VarInt::from_u32(0));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_relays_leases_survive_its_restart_and_an_unreadable_file_grants_nothing_for_an_hour() {
        use crate::runbook::LeaseAnswer;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runbook-leases.json");
        let now = crate::clock::unix_ms();
        let ttl = Duration::from_secs(60);
        let book = LeaseBook::open(&path).unwrap();
        assert!(matches!(
            book.ask(now, "fix", "a", 1, ttl),
            Ok(LeaseAnswer::Granted { .. })
        ));
        // Started again: the place is still taken.
        let book = LeaseBook::open(&path).unwrap();
        assert!(matches!(
            book.ask(now, "fix", "b", 1, ttl),
            Ok(LeaseAnswer::Busy { .. })
        ));
        book.release("fix", "a");
        let book = LeaseBook::open(&path).unwrap();
        assert_eq!(book.held(), 0);
        // A damaged file is moved aside, the relay still starts, and it
        // grants nothing until any lease it held has run out.
        std::fs::write(&path, b"{not json").unwrap();
        let book = LeaseBook::open(&path).unwrap();
        assert!(path.with_extension("json.bad").exists());
        assert!(matches!(
            book.ask(now, "fix", "b", 1, ttl),
            Ok(LeaseAnswer::Busy { .. })
        ));
        let later = now + crate::runbook::MAX_LEASE.as_millis() as u64 + 1_000;
        assert!(matches!(
            book.ask(later, "fix", "b", 1, ttl),
            Ok(LeaseAnswer::Granted { .. })
        ));
    }

    #[test]
    fn an_offer_reads_back_as_written_and_garbage_reads_as_nothing() {
        let o = Offer {
            version: 12,
            digest: [0xab; 32],
        };
        assert_eq!(Offer::parse(&o.encode()), Some(o));
        for bad in [
            "",
            "12",
            "x abab",
            "12 abab",
            &format!("12 {}", "zz".repeat(32)),
        ] {
            assert_eq!(Offer::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_result_keeps_its_detail_with_spaces_and_cuts_it_at_the_limit() {
        let r = ConfigResult {
            version: 3,
            outcome: Outcome::Failed,
            detail: "reload `systemctl reload nginx` exited 1: bad config".into(),
        };
        assert_eq!(ConfigResult::parse(&r.encode()), Some(r));
        let long = ConfigResult {
            version: 4,
            outcome: Outcome::Refused,
            detail: "é".repeat(MAX_RESULT_DETAIL),
        };
        let back = ConfigResult::parse(&long.encode()).unwrap();
        assert!(back.detail.len() <= MAX_RESULT_DETAIL);
        assert!(back.detail.starts_with("éé"));
        assert_eq!(ConfigResult::parse("5 ok ").unwrap().outcome, Outcome::Ok);
        assert_eq!(ConfigResult::parse("5 maybe x"), None);
    }

    #[test]
    fn a_drift_note_keeps_a_path_with_spaces_and_a_missing_file() {
        let d = DriftNote {
            n: 2,
            action: DriftAction::Healed,
            path: "/etc/my app/conf".into(),
            expected: "aa".into(),
            found: None,
            size: None,
        };
        assert_eq!(DriftNote::parse(&d.encode()), Some(d.clone()));
        assert!(!d.open());
        let r = DriftNote {
            action: DriftAction::Reported,
            found: Some("bb".into()),
            size: Some(10),
            ..d
        };
        assert_eq!(DriftNote::parse(&r.encode()), Some(r.clone()));
        assert!(r.open());
    }

    #[test]
    fn a_members_configuration_keys_are_read_and_others_ignored() {
        let offer = Offer {
            version: 9,
            digest: [1; 32],
        }
        .encode();
        let c = MemberConfig::from_kv([
            (keys::OFFER, offer.as_str()),
            (keys::APPLIED, "8 cafe"),
            (keys::RESULT, "9 refused bad signature"),
            ("status", "passing"),
        ]);
        assert_eq!(c.offer.unwrap().version, 9);
        assert_eq!(c.applied, Some((8, "cafe".into())));
        assert_eq!(c.result.as_ref().unwrap().outcome, Outcome::Refused);
        assert!(c.drift.is_empty());
        assert!(!c.drifted());
        let d = DriftNote {
            n: 1,
            action: DriftAction::Reported,
            path: "/etc/a".into(),
            expected: "aa".into(),
            found: Some("bb".into()),
            size: Some(3),
        };
        let key = format!("{}{}", keys::DRIFT_PREFIX, d.path);
        let c = MemberConfig::from_kv([(key.as_str(), d.encode().as_str())]);
        assert_eq!(c.drift.get("/etc/a"), Some(&d));
        assert!(c.drifted());
    }

    proptest! {
        #[test]
        fn no_value_makes_the_parsers_panic(s in ".{0,200}") {
            let _ = MemberConfig::from_kv([
                (keys::OFFER, s.as_str()),
                (keys::APPLIED, s.as_str()),
                (keys::RESULT, s.as_str()),
                ("config:drift:/x", s.as_str()),
            ]);
        }

        #[test]
        fn fetch_messages_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = wire::decode_body::<FetchRequest>(&bytes, FETCH_VERSION);
            let _ = wire::decode_body::<FetchResponse>(&bytes, FETCH_VERSION);
        }
    }

    /// The body of the frame `wire::encode` makes of `r` (what follows
    /// the length prefix).
    fn body_of(r: &FetchResponse) -> Vec<u8> {
        wire::encode(FETCH_VERSION, r, MAX_FETCH_FRAME).unwrap()[4..].to_vec()
    }

    #[test]
    fn a_chunk_buffer_comes_back_when_its_last_view_is_dropped() {
        let bufs = Arc::new(ChunkBufs::default());
        let mut buf = bufs.take(100);
        assert!(buf.capacity() >= 100);
        buf.extend_from_slice(&[7; 100]);
        let at = buf.as_ptr();
        let chunk = bytes::Bytes::from_owner(PooledChunk {
            buf,
            range: 10..100,
            bufs: bufs.clone(),
        });
        let view = chunk.slice(5..);
        assert_eq!(chunk.len(), 90);
        drop(chunk);
        assert!(
            bufs.free.lock().unwrap().is_empty(),
            "a view is still alive"
        );
        assert_eq!(view.len(), 85);
        drop(view);
        // The same memory, not zeroed again, is the next one handed out.
        let again = bufs.take(100);
        assert_eq!((again.as_ptr(), again.len()), (at, 100));
        // No more than CHUNK_BUFS_KEPT are kept.
        for _ in 0..CHUNK_BUFS_KEPT + 3 {
            bufs.give(vec![0; 10]);
        }
        assert_eq!(bufs.free.lock().unwrap().len(), CHUNK_BUFS_KEPT);
    }

    #[test]
    fn the_head_of_a_chunk_answer_is_known_from_its_length() {
        for len in [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152] {
            let body = body_of(&FetchResponse::Chunk(vec![0; len]));
            assert_eq!(chunk_head_len(body.len()), chunk_offset(&body), "{len}");
        }
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(usize::MAX), 10);
        // Too short for a version, a tag and a length.
        assert_eq!(chunk_head_len(2), None);
    }

    #[test]
    fn a_chunk_answer_is_taken_from_its_frame_as_postcard_wrote_it() {
        // Lengths whose varint takes one, two and three bytes.
        for len in [0, 1, 127, 128, 16_383, 16_384, CHUNK_SIZE as usize] {
            let chunk: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let body = body_of(&FetchResponse::Chunk(chunk.clone()));
            assert_eq!(body[1], CHUNK_TAG);
            let got = chunk_answer(body).unwrap().unwrap();
            assert_eq!(&got[..], &chunk[..], "{len}");
        }
        // Other answers are decoded as usual.
        let got = chunk_answer(body_of(&FetchResponse::NoChunk)).unwrap();
        assert_eq!(got, Err(FetchResponse::NoChunk));
        // A chunk answer with a byte too many or too few is refused.
        let mut long = body_of(&FetchResponse::Chunk(vec![7; 300]));
        long.push(0);
        assert!(chunk_answer(long).is_err());
        let mut short = body_of(&FetchResponse::Chunk(vec![7; 300]));
        short.pop();
        assert!(chunk_answer(short).is_err());
        let mut other_version = body_of(&FetchResponse::Chunk(vec![7; 3]));
        other_version[0] ^= 1;
        assert!(matches!(
            chunk_answer(other_version),
            Err(WireError::Version { .. })
        ));
    }

    // -- artifacts over QUIC ---------------------------------------------------

    use crate::id::{Identity, Role};
    use crate::patch::{ArtifactRef, CHUNK_SIZE, ChunkStore, PartialArtifact, PatchFiles};
    use crate::tls::{Credentials, MeshCa};

    struct Site {
        relay: Credentials,
        node: Credentials,
    }

    fn site() -> Site {
        crate::tls::install_crypto_provider();
        let ca = MeshCa::generate("test").unwrap();
        let issue = |role, name: &str| {
            Credentials::issue(&ca, &Identity::new(role, "eu", "par", name).unwrap()).unwrap()
        };
        Site {
            relay: issue(Role::Relay, "relay"),
            node: issue(Role::Node, "n1"),
        }
    }

    /// An artifact of `chunks` chunks (the last one short), no two alike.
    fn artifact(chunks: usize) -> (Vec<u8>, ArtifactRef) {
        let len = (chunks - 1) * CHUNK_SIZE as usize + 1000;
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i >> 20) as u8)
            .collect();
        let a = ArtifactRef::read("pkg.bin", &bytes[..]).unwrap();
        assert_eq!(a.chunks.len(), chunks);
        (bytes, a)
    }

    fn chunk_of(bytes: &[u8], i: usize) -> &[u8] {
        let size = CHUNK_SIZE as usize;
        &bytes[i * size..((i + 1) * size).min(bytes.len())]
    }

    fn loopback() -> SocketAddr {
        ([127, 0, 0, 1], 0).into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_download_keeps_several_chunks_in_flight_and_refetches_a_damaged_one() {
        let s = site();
        let chunks = CHUNKS_IN_FLIGHT + 4;
        let (bytes, a) = artifact(chunks);
        let (relay, mut routes) =
            MeshEndpoint::bind(s.relay, loopback(), &[Protocol::Fetch], Default::default())
                .unwrap();
        let mut accepted = routes.take(Protocol::Fetch);
        // A relay that holds its first CHUNKS_IN_FLIGHT answers until that
        // many requests are open at once (a client asking one at a time
        // would wait 30 s there and fail the peak below), answers the rest
        // at once, and damages chunk 1 the first time it sends it. Only
        // the count is waited for, never a short timer, so a slow machine
        // cannot release the first requests early.
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let relay_task = {
            let (bytes, a, peak) = (bytes.clone(), a.clone(), peak.clone());
            tokio::spawn(async move {
                let conn = accepted.recv().await.unwrap().conn;
                let open = Arc::new(tokio::sync::watch::channel(0usize).0);
                let damaged = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                // Set once CHUNKS_IN_FLIGHT are open, and never unset: a
                // request released early must not hold the others back by
                // bringing the count down before they look.
                let release = Arc::new(tokio::sync::watch::channel(false).0);
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let (bytes, a, peak, open, damaged, arrived, release) = (
                        bytes.clone(),
                        a.clone(),
                        peak.clone(),
                        open.clone(),
                        damaged.clone(),
                        arrived.clone(),
                        release.clone(),
                    );
                    tokio::spawn(async move {
                        let Ok(Some(FetchRequest::Chunk(hash))) = wire::read_msg::<FetchRequest>(
                            &mut recv,
                            FETCH_VERSION,
                            MAX_FETCH_REQUEST,
                        )
                        .await
                        else {
                            panic!("not a chunk request");
                        };
                        let i = a.chunks.iter().position(|h| *h == hash).unwrap();
                        open.send_modify(|n| *n += 1);
                        peak.fetch_max(*open.borrow(), std::sync::atomic::Ordering::SeqCst);
                        let first_wave = arrived.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            < CHUNKS_IN_FLIGHT;
                        if *open.borrow() >= CHUNKS_IN_FLIGHT {
                            release.send_replace(true);
                        }
                        if first_wave {
                            let mut rx = release.subscribe();
                            let _ =
                                tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| *r))
                                    .await;
                        }
                        let mut chunk = chunk_of(&bytes, i).to_vec();
                        if i == 1 && !damaged.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            chunk[10] ^= 1;
                        }
                        open.send_modify(|n| *n -= 1);
                        wire::write_msg(
                            &mut send,
                            FETCH_VERSION,
                            &FetchResponse::Chunk(chunk),
                            MAX_FETCH_FRAME,
                        )
                        .await
                        .unwrap();
                        send.finish().unwrap();
                    });
                }
            })
        };
        let (node, _) = MeshEndpoint::bind(s.node, loopback(), &[], Default::default()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("out/pkg.bin");
        let got = fetch_artifact(&node, relay.local_addr(), &a, &dest, 3)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), bytes);
        assert_eq!(got.held, 0);
        // Every whole chunk went from the buffer it was read into straight
        // to the disk; the last, shorter one through the page cache.
        let direct = crate::patch::direct_io_in(tmp.path());
        assert_eq!(got.direct, if direct { chunks as u64 - 1 } else { 0 });
        assert_eq!(
            (
                got.stats.requested,
                got.stats.fetched,
                got.stats.refetched,
                got.stats.failures
            ),
            (chunks as u64 + 1, chunks as u64, 1, 0)
        );
        assert_eq!(
            peak.load(std::sync::atomic::Ordering::SeqCst),
            CHUNKS_IN_FLIGHT,
            "requests in flight at once"
        );
        assert!(!PartialArtifact::path_for(&dest).exists());
        node.shutdown().await;
        relay.shutdown().await;
        relay_task.await.unwrap();
    }

    /// A relay serving, from a chunk store under `dir`, every chunk of `a`
    /// but chunk `lacking`; cancel the token to stop it.
    fn serving_relay(
        creds: Credentials,
        dir: &std::path::Path,
        bytes: &[u8],
        a: &ArtifactRef,
        lacking: usize,
    ) -> (MeshEndpoint, ChunkStore, CancellationToken) {
        let files = PatchFiles {
            dir: dir.join("relay"),
            chunks: ChunkStore::open(&dir.join("relay/chunks")).unwrap(),
        };
        for (i, h) in a.chunks.iter().enumerate().filter(|(i, _)| *i != lacking) {
            files.chunks.put(h, chunk_of(bytes, i)).unwrap();
        }
        let store = files.chunks.clone();
        let (relay, mut routes) =
            MeshEndpoint::bind(creds, loopback(), &[Protocol::Fetch], Default::default()).unwrap();
        let shutdown = CancellationToken::new();
        let (_tx, served) = watch::channel(None);
        tokio::spawn(serve(
            routes.take(Protocol::Fetch),
            served,
            Some(Arc::new(files)),
            None,
            Default::default(),
            shutdown.clone(),
        ));
        (relay, store, shutdown)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunk_the_relay_lacks_ends_the_download_after_max_attempts_keeping_the_rest() {
        let s = site();
        let (bytes, a) = artifact(4);
        let tmp = tempfile::tempdir().unwrap();
        let (relay, _store, shutdown) = serving_relay(s.relay, tmp.path(), &bytes, &a, 2);
        let (node, _) = MeshEndpoint::bind(s.node, loopback(), &[], Default::default()).unwrap();
        let dest = tmp.path().join("node/pkg.bin");
        let started = std::time::Instant::now();
        let err = fetch_artifact(&node, relay.local_addr(), &a, &dest, 2)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "artifact pkg.bin: chunk 2 failed 2 times (last: the relay does not hold the \
             chunk); the download stopped: check the source, then start it again"
        );
        // One retry, after the first delay.
        assert!(started.elapsed() >= crate::patch::RETRY_FIRST);
        assert!(!dest.exists());
        // What arrived is kept for the next attempt.
        let (_, held) = PartialArtifact::open(&a, &dest).unwrap();
        assert_eq!(held, [0, 1, 3]);
        shutdown.cancel();
        node.shutdown().await;
        relay.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_reads_a_chunk_once_for_every_node_that_asks_and_never_remembers_a_miss() {
        let s = site();
        let (bytes, a) = artifact(3);
        let tmp = tempfile::tempdir().unwrap();
        let (relay, store, shutdown) = serving_relay(s.relay, tmp.path(), &bytes, &a, 2);
        let (node, _) = MeshEndpoint::bind(s.node, loopback(), &[], Default::default()).unwrap();
        // An artifact made of the first two chunks: read into the cache.
        let front = ArtifactRef::read("front.bin", &bytes[..2 * CHUNK_SIZE as usize]).unwrap();
        assert_eq!(front.chunks, a.chunks[..2]);
        fetch_artifact(
            &node,
            relay.local_addr(),
            &front,
            &tmp.path().join("n1/front.bin"),
            1,
        )
        .await
        .unwrap();
        // Chunk 2 is missing.
        fetch_artifact(
            &node,
            relay.local_addr(),
            &a,
            &tmp.path().join("n1/pkg.bin"),
            1,
        )
        .await
        .unwrap_err();
        // The relay is given chunk 2 and loses the files of 0 and 1: what
        // it read once it still serves; the miss was not remembered.
        store.put(&a.chunks[2], chunk_of(&bytes, 2)).unwrap();
        for h in &a.chunks[..2] {
            std::fs::remove_file(store.path_of(h)).unwrap();
        }
        let second = tmp.path().join("n2/pkg.bin");
        let got = fetch_artifact(&node, relay.local_addr(), &a, &second, 1)
            .await
            .unwrap();
        assert_eq!(got.stats.fetched, 3);
        assert_eq!(std::fs::read(&second).unwrap(), bytes);
        shutdown.cancel();
        node.shutdown().await;
        relay.shutdown().await;
    }
}
