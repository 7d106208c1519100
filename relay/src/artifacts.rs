//! Patch artifacts a relay keeps for its site.
//!
//! A hub stages a patch at a relay (`Request::PatchStage`); the relay
//! checks the operator's signature, keeps the manifest, and fetches the
//! chunks of its artifacts it does not hold from the hub over the uplink
//! connection, one at a time (`RelayRequest::Chunk`), so an artifact
//! crosses the site's WAN link once whatever the number of nodes. Chunks
//! go into a content-addressed [`ChunkStore`] (`patches/chunks/` next to
//! the outage buffer), each checked against its BLAKE3 before it is kept:
//! a fetch cut short resumes with the chunks still missing, and a chunk
//! found damaged on disk is fetched again. The pacing, retries and give-up
//! are [`Download`]'s.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trellis_node::metrics::Registry;
use trellis_node::patch::{ChunkStore, Download, PatchFiles, PatchManifest, SignedPatch, verify};
use trellis_node::tls::Credentials;
use trellis_node::wire;

use crate::uplink::{MAX_UPLINK_FRAME, RelayRequest, RelayResponse, UPLINK_VERSION};

/// Failures of one chunk before a fetch gives up (it starts again at the
/// next staging).
const MAX_ATTEMPTS: u32 = 8;
/// Time allowed for one chunk (1 MiB) over a slow WAN.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// Counters of artifact fetches.
#[derive(Clone, Default)]
pub struct ArtifactMetrics {
    pub chunks_fetched: Counter,
    pub bytes_fetched: Counter,
    pub chunks_refetched: Counter,
    pub fetch_failures: Counter,
}

impl ArtifactMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ArtifactMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis_relay");
        r.register(
            "patch_chunks_fetched",
            "Patch artifact chunks fetched from a hub and kept",
            m.chunks_fetched.clone(),
        );
        r.register(
            "patch_bytes_fetched",
            "Bytes of patch artifact chunks fetched from a hub and kept",
            m.bytes_fetched.clone(),
        );
        r.register(
            "patch_chunks_refetched",
            "Chunks fetched again because what arrived did not match its hash",
            m.chunks_refetched.clone(),
        );
        r.register(
            "patch_fetch_failures",
            "Chunk requests that failed (no uplink, timeout, hub without the chunk)",
            m.fetch_failures.clone(),
        );
        m
    }
}

/// The relay's patches and their chunks.
pub struct ArtifactCache {
    dir: PathBuf,
    chunks: ChunkStore,
    trust: Credentials,
    /// The current uplink connection, if any.
    uplink: watch::Receiver<Option<quinn::Connection>>,
    metrics: ArtifactMetrics,
    /// Patches being fetched now, by id.
    fetching: Mutex<BTreeSet<[u8; 32]>>,
    shutdown: CancellationToken,
}

/// Where a relay keeps patches: next to its outage buffer.
pub fn patches_dir(buffer: &Path) -> PathBuf {
    buffer.with_file_name("patches")
}

impl ArtifactCache {
    pub fn open(
        dir: &Path,
        trust: Credentials,
        uplink: watch::Receiver<Option<quinn::Connection>>,
        metrics: ArtifactMetrics,
        shutdown: CancellationToken,
    ) -> Result<Self, String> {
        let chunks = ChunkStore::open(&dir.join("chunks")).map_err(|e| e.to_string())?;
        Ok(ArtifactCache {
            dir: dir.to_owned(),
            chunks,
            trust,
            uplink,
            metrics,
            fetching: Mutex::new(BTreeSet::new()),
            shutdown,
        })
    }

    /// The manifests and chunks the site's nodes fetch.
    pub fn files(&self) -> PatchFiles {
        PatchFiles {
            dir: self.dir.clone(),
            chunks: self.chunks.clone(),
        }
    }

    /// A staged patch's manifest, if kept.
    pub fn manifest(&self, id: &[u8; 32]) -> Option<SignedPatch> {
        self.files().manifest(id)
    }

    /// Whether every chunk of the patch's artifacts is held (each read
    /// and checked: run it once, not on every look).
    pub fn holds_whole(&self, signed: &SignedPatch) -> bool {
        let Ok(manifest) = postcard::from_bytes::<PatchManifest>(&signed.manifest) else {
            return false;
        };
        manifest
            .artifacts
            .iter()
            .all(|a| self.chunks.missing(a).is_empty())
    }

    /// Keeps a patch a hub staged and starts fetching what of it is
    /// missing; returns how many chunks that is.
    pub async fn stage(self: &Arc<Self>, signed: SignedPatch) -> Result<u64, String> {
        let (manifest, signer) =
            verify(&self.trust, &signed).map_err(|e| format!("patch refused: {e}"))?;
        let id = signed.id();
        let this = self.clone();
        let m = manifest.clone();
        let missing = tokio::task::spawn_blocking(move || {
            let path = PatchFiles::manifest_path(&this.dir, &id);
            let bytes = postcard::to_stdvec(&signed).expect("patches serialise");
            trellis_node::apply::write_atomic(&path, &bytes, 0o600)
                .map_err(|e| format!("cannot keep the patch in {}: {e}", path.display()))?;
            Ok::<_, String>(
                m.artifacts
                    .iter()
                    .map(|a| this.chunks.missing(a).len() as u64)
                    .sum::<u64>(),
            )
        })
        .await
        .map_err(|e| e.to_string())??;
        info!(patch = %manifest.name, version = %manifest.version, %signer, missing, "patch staged for the site");
        if missing > 0 && self.fetching.lock().expect("not poisoned").insert(id) {
            let this = self.clone();
            tokio::spawn(async move {
                let result = this.fetch(&manifest).await;
                this.fetching.lock().expect("not poisoned").remove(&id);
                match result {
                    Ok(()) => {
                        info!(patch = %manifest.name, version = %manifest.version, "patch artifacts complete at the relay")
                    }
                    Err(error) => {
                        warn!(patch = %manifest.name, %error, "patch artifacts not fetched; staging the patch again resumes")
                    }
                }
            });
        }
        Ok(missing)
    }

    /// Fetches every missing chunk of the patch's artifacts.
    async fn fetch(&self, manifest: &PatchManifest) -> Result<(), String> {
        for artifact in &manifest.artifacts {
            let missing = {
                let (store, a) = (self.chunks.clone(), artifact.clone());
                tokio::task::spawn_blocking(move || store.missing(&a))
                    .await
                    .map_err(|e| e.to_string())?
            };
            let held: Vec<u32> = (0..artifact.chunks.len() as u32)
                .filter(|i| !missing.contains(i))
                .collect();
            let mut d = Download::new(artifact, &held, MAX_ATTEMPTS);
            while !d.done() {
                if let Some(e) = d.error() {
                    return Err(e.to_string());
                }
                let Some(index) = d.next_requests(Instant::now(), 1).first().copied() else {
                    let wait = d.poll_timeout().map_or(Duration::from_secs(1), |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Err("shutting down".into()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                };
                let hash = artifact.chunks[index as usize];
                let got = tokio::select! {
                    _ = self.shutdown.cancelled() => return Err("shutting down".into()),
                    g = self.fetch_chunk(hash) => g,
                };
                match got {
                    Ok(bytes) => match d.on_chunk(Instant::now(), index, &bytes) {
                        trellis_node::patch::ChunkOutcome::Verified => {
                            let store = self.chunks.clone();
                            let len = bytes.len() as u64;
                            tokio::task::spawn_blocking(move || store.put(&hash, &bytes))
                                .await
                                .map_err(|e| e.to_string())?
                                .map_err(|e| e.to_string())?;
                            self.metrics.chunks_fetched.inc();
                            self.metrics.bytes_fetched.inc_by(len);
                        }
                        trellis_node::patch::ChunkOutcome::Corrupt => {
                            self.metrics.chunks_refetched.inc();
                        }
                        trellis_node::patch::ChunkOutcome::Ignored => {}
                    },
                    Err(reason) => {
                        self.metrics.fetch_failures.inc();
                        d.on_failure(Instant::now(), index, &reason);
                    }
                }
            }
        }
        Ok(())
    }

    /// One chunk from the hub the relay is connected to.
    async fn fetch_chunk(&self, hash: [u8; 32]) -> Result<Vec<u8>, String> {
        let Some(conn) = self.uplink.borrow().clone() else {
            return Err("no uplink connection".into());
        };
        let ask = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            wire::write_msg(
                &mut send,
                UPLINK_VERSION,
                &RelayRequest::Chunk(hash),
                MAX_UPLINK_FRAME,
            )
            .await
            .map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            wire::read_msg::<RelayResponse>(&mut recv, UPLINK_VERSION, MAX_UPLINK_FRAME)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(CHUNK_TIMEOUT, ask).await {
            Err(_) => Err(format!("no chunk within {CHUNK_TIMEOUT:?}")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Some(RelayResponse::Chunk(bytes)))) => Ok(bytes),
            Ok(Ok(Some(RelayResponse::NotHere))) => Err("the hub does not hold the chunk".into()),
            Ok(Ok(Some(RelayResponse::Error(e)))) => Err(e),
            Ok(Ok(Some(other))) => Err(format!("unexpected answer to a chunk request: {other:?}")),
            Ok(Ok(None)) => Err("the hub closed the stream".into()),
        }
    }
}
