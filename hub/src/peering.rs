//! The hub's dealings with the other hubs: its place in the federation's
//! gossip, answering their replication requests, pushing what it stores to
//! them, pulling what it lacks (anti-entropy), operator writes that are
//! acknowledged only once enough hubs hold them, and notes for the audit
//! trail, which are not waited for.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_node::clock::ticker;
use trellis_node::endpoint::{Accepted, close};
use trellis_node::gossip::Gossip;
use trellis_node::tls::{Credentials, Signer};
use trellis_node::wire::{self, WireError};

use crate::audit::origin_signer;
use crate::driver::{Input, MAX_NOTE_BYTES, NoteError, Shared};
use crate::federation::{self, PeerHub, Published};
use crate::log::{Op, SignedEntry};
use crate::replication::{
    MAX_REPL_FRAME, PULL_CHUNK, REPL_VERSION, ReplClient, ReplRequest, ReplResponse, missing,
};
use crate::store::StoredRecord;

/// How the hub deals with its peers, from `[federation]` and
/// `[replication]`.
#[derive(Debug, Clone)]
pub struct PeeringSettings {
    pub interval: Duration,
    pub anti_entropy_every: Duration,
    /// 0: 2 when the federation has two hubs or more, else 1.
    pub write_quorum: usize,
    pub write_timeout: Duration,
}

/// What the API and the replication server share about the peers.
#[derive(Clone)]
pub struct Peering {
    pub me: String,
    pub region: String,
    pub api: String,
    pub gossip: Arc<Gossip>,
    pub repl: ReplClient,
    pub creds: Credentials,
    pub peers: Arc<Mutex<Vec<PeerHub>>>,
    pub settings: PeeringSettings,
}

impl Peering {
    pub fn peers(&self) -> Vec<PeerHub> {
        self.peers.lock().expect("not poisoned").clone()
    }

    /// Hubs that must hold a write before it is acknowledged.
    pub fn write_quorum(&self) -> usize {
        match self.settings.write_quorum {
            0 if self.peers().is_empty() => 1,
            0 => 2,
            q => q,
        }
    }
}

/// Keeps the hub's gossip keys current, reads the others', tells the core
/// task what they serve and pulls from any peer that holds something this
/// hub lacks.
pub(crate) async fn federation_task(shared: Shared, peering: Peering, shutdown: CancellationToken) {
    let mut tick = ticker(peering.settings.interval);
    let mut last_sync = Instant::now() - peering.settings.anti_entropy_every;
    let syncing: Arc<Mutex<BTreeSet<(String, &'static str)>>> = Default::default();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(state) = shared.ask(|reply| Input::Federation { reply }).await else {
            break;
        };
        let kv = federation::encode(&Published {
            api: &peering.api,
            region: &peering.region,
            records_digest: state.records_digest,
            log_digest: state.log_digest,
            log_entries: state.log_entries,
            served: &state.served,
        });
        peering.gossip.set(kv, federation::keys::SERVES).await;
        let peers = federation::peers(peering.gossip.members().await, &peering.me);
        let served = federation::served_by_alive(&peers);
        let _ = shared.core.send(Input::Peers { served }).await;
        *peering.peers.lock().expect("not poisoned") = peers.clone();
        if last_sync.elapsed() < peering.settings.anti_entropy_every {
            continue;
        }
        last_sync = Instant::now();
        for p in peers.iter().filter(|p| p.alive) {
            for (what, differs) in [
                ("records", p.records_digest != state.records_digest),
                ("log", p.log_digest != state.log_digest),
            ] {
                let key = (p.name.clone(), what);
                if !differs || !syncing.lock().expect("not poisoned").insert(key.clone()) {
                    continue;
                }
                let (shared, peering, syncing, peer) =
                    (shared.clone(), peering.clone(), syncing.clone(), p.clone());
                tokio::spawn(async move {
                    match pull(&shared, &peering, &peer, what).await {
                        Ok(0) => {}
                        Ok(n) => info!(peer = %peer.name, what, n, "caught up from another hub"),
                        Err(error) => {
                            debug!(peer = %peer.name, what, %error, "anti-entropy failed")
                        }
                    }
                    syncing.lock().expect("not poisoned").remove(&key);
                });
            }
        }
    }
}

/// Copies the chunks of every published patch that this hub lacks from the
/// other hubs, every `anti_entropy_every`: a patch published at one hub
/// can be served by any. Each chunk is checked against its BLAKE3 before
/// it is stored; patches found complete are not looked at again.
pub(crate) async fn chunk_sync_task(shared: Shared, peering: Peering, shutdown: CancellationToken) {
    let mut tick = ticker(peering.settings.anti_entropy_every);
    let mut complete: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(state) = shared.ask(|reply| Input::LogState { reply }).await else {
            break;
        };
        for patch in state.patches {
            if complete.contains(&patch.id) {
                continue;
            }
            match sync_patch_chunks(&shared, &peering, &patch).await {
                Ok(true) => {
                    complete.insert(patch.id.clone());
                }
                Ok(false) => {}
                Err(error) => {
                    debug!(patch = %patch.name, %error, "cannot copy the patch's chunks yet")
                }
            }
        }
    }
}

/// One pass over one patch: whether every chunk is here afterwards.
async fn sync_patch_chunks(
    shared: &Shared,
    peering: &Peering,
    patch: &crate::log::PatchRecord,
) -> anyhow::Result<bool> {
    let reader = shared.store.clone();
    let store = shared.chunks.clone();
    let (origin, seq) = (patch.origin.clone(), patch.seq);
    let mut missing: Vec<[u8; 32]> = tokio::task::spawn_blocking(move || {
        let Some(crate::log::Entry {
            op: crate::log::Op::Patch { manifest, .. },
            ..
        }) = reader.log_entry(&origin, seq)?
        else {
            anyhow::bail!("the log entry holding the patch is unreadable");
        };
        let signed: trellis_node::patch::SignedPatch = postcard::from_bytes(&manifest)?;
        let m: trellis_node::patch::PatchManifest = postcard::from_bytes(&signed.manifest)?;
        let all: BTreeSet<[u8; 32]> = m.artifacts.iter().flat_map(|a| a.chunks.clone()).collect();
        Ok(all.into_iter().filter(|h| !store.has(h)).collect())
    })
    .await??;
    if missing.is_empty() {
        return Ok(true);
    }
    // The hub it was published at first, then the others.
    let mut peers: Vec<PeerHub> = peering.peers().into_iter().filter(|p| p.alive).collect();
    peers.sort_by_key(|p| p.name != patch.origin);
    let mut copied = 0usize;
    for peer in peers {
        while !missing.is_empty() {
            let ask: Vec<[u8; 32]> = missing
                .iter()
                .take(crate::replication::CHUNKS_PER_PULL)
                .copied()
                .collect();
            let ReplResponse::Chunks(chunks) = peering
                .repl
                .ask(peer.addr, &ReplRequest::Chunks(ask.clone()))
                .await?
            else {
                anyhow::bail!("unexpected answer to a chunk pull");
            };
            if chunks.is_empty() {
                break; // this peer has none of them: try the next
            }
            let store = shared.chunks.clone();
            let got: Vec<[u8; 32]> = tokio::task::spawn_blocking(move || {
                chunks
                    .into_iter()
                    .filter_map(|(h, bytes)| store.put(&h, &bytes).ok().map(|()| h))
                    .collect()
            })
            .await?;
            copied += got.len();
            missing.retain(|h| !got.contains(h));
            if got.len() < ask.len() {
                break;
            }
        }
    }
    if copied > 0 {
        info!(patch = %patch.name, version = %patch.version, chunks = copied, left = missing.len(), "copied patch chunks from other hubs");
    }
    Ok(missing.is_empty())
}

/// Asks the hub's core task, failing if it has shut down.
async fn ask_core<T>(
    shared: &Shared,
    make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Input,
) -> anyhow::Result<T> {
    shared
        .ask(make)
        .await
        .ok_or_else(|| anyhow::anyhow!("shutting down"))
}

/// Pulls what `peer` holds of `what` ("records" or "log") and this hub
/// lacks, a chunk at a time until the peer has no more (at most 1,000
/// chunks); returns how many arrived.
async fn pull(
    shared: &Shared,
    peering: &Peering,
    peer: &PeerHub,
    what: &str,
) -> anyhow::Result<usize> {
    let mut total = 0;
    for _ in 0..1000 {
        let (n, more) = if what == "records" {
            pull_records(shared, peering, peer).await?
        } else {
            pull_entries(shared, peering, peer).await?
        };
        total += n;
        if !more {
            break;
        }
    }
    Ok(total)
}

/// One chunk of the relay records `peer` holds and this hub lacks: how many
/// arrived, and whether the peer has more.
async fn pull_records(
    shared: &Shared,
    peering: &Peering,
    peer: &PeerHub,
) -> anyhow::Result<(usize, bool)> {
    let have = ask_core(shared, |reply| Input::Coverage { reply }).await?;
    let req = ReplRequest::PullRecords {
        have: have.into_iter().collect(),
        max: PULL_CHUNK,
    };
    let ReplResponse::Records { records, more } = peering.repl.ask(peer.addr, &req).await? else {
        anyhow::bail!("unexpected answer to a pull");
    };
    let n = records.len();
    if n > 0 {
        ask_core(shared, |reply| Input::Replicated { records, reply })
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    Ok((n, more))
}

/// One chunk of the log entries `peer` holds and this hub lacks.
async fn pull_entries(
    shared: &Shared,
    peering: &Peering,
    peer: &PeerHub,
) -> anyhow::Result<(usize, bool)> {
    let have = ask_core(shared, |reply| Input::LogState { reply })
        .await?
        .version_vector;
    let req = ReplRequest::PullEntries {
        have,
        max: PULL_CHUNK,
    };
    let ReplResponse::Entries { entries, more } = peering.repl.ask(peer.addr, &req).await? else {
        anyhow::bail!("unexpected answer to a pull");
    };
    let entries = verified(&peering.creds, entries);
    let n = entries.len();
    if n > 0 {
        ask_core(shared, |reply| Input::LogEntries { entries, reply })
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    Ok((n, more))
}

/// The entries whose signature is their origin hub's, by the mesh CA; the
/// others are logged and left out.
pub fn verified(creds: &Credentials, entries: Vec<SignedEntry>) -> Vec<SignedEntry> {
    // Entries from one origin carry the same certificate: it is checked
    // once per batch (keyed by borrowed bytes, not copies), each entry's
    // signature every time.
    let mut signers: HashMap<(&[u8], &str), Result<Signer, String>> = HashMap::new();
    let keep: Vec<bool> = entries
        .iter()
        .map(|e| {
            let origin = e.entry.origin.as_str();
            let signer = signers
                .entry((&e.cert, origin))
                .or_insert_with(|| origin_signer(creds, &e.cert, origin));
            let checked = match signer {
                Ok(s) => s
                    .verify(&e.entry.signing_bytes(), &e.signature)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            if let Err(error) = &checked {
                warn!(%origin, %error, "log entry not signed by its origin hub; ignored");
            }
            checked.is_ok()
        })
        .collect();
    entries
        .into_iter()
        .zip(keep)
        .filter_map(|(e, keep)| keep.then_some(e))
        .collect()
}

/// Bytes of log entries one pull answer carries, at most (one entry
/// larger than this, up to a bundle's limit, still goes alone).
const MAX_PULL_BYTES: usize = 8 << 20;

/// Pushes records this hub stored to every alive peer.
pub(crate) async fn push_task(
    peering: Peering,
    mut pushes: mpsc::Receiver<Vec<StoredRecord>>,
    shutdown: CancellationToken,
) {
    loop {
        let records = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = pushes.recv() => match r { Some(r) => r, None => break },
        };
        let req = Arc::new(ReplRequest::Records(records));
        for p in peering.peers().into_iter().filter(|p| p.alive) {
            let (repl, req) = (peering.repl.clone(), req.clone());
            tokio::spawn(async move {
                if let Err(error) = repl.ask(p.addr, &req).await {
                    debug!(peer = %p.name, %error, "push failed; anti-entropy will repair");
                }
            });
        }
    }
}

/// An operator's write: durable here, then pushed to the alive peers;
/// acknowledged once `write_quorum` hubs hold it.
pub(crate) async fn write(
    shared: &Shared,
    peering: &Peering,
    author: String,
    op: Op,
) -> Result<WriteOutcome, String> {
    let entry = shared
        .ask(|reply| Input::LogWrite {
            author,
            ops: vec![op],
            reply,
        })
        .await
        .ok_or("the hub is shutting down")??
        .remove(0);
    let quorum = peering.write_quorum();
    let mut durable_on = vec![peering.me.clone()];
    let req = Arc::new(ReplRequest::Entries(vec![entry.clone()]));
    let (tx, mut rx) = mpsc::channel(16);
    for p in peering.peers().into_iter().filter(|p| p.alive) {
        let (repl, req, tx) = (peering.repl.clone(), req.clone(), tx.clone());
        tokio::spawn(async move {
            let ok = matches!(repl.ask(p.addr, &req).await, Ok(ReplResponse::Stored));
            let _ = tx.send((p.name, ok)).await;
        });
    }
    drop(tx);
    let deadline = tokio::time::Instant::now() + peering.settings.write_timeout;
    while durable_on.len() < quorum {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some((hub, true))) => durable_on.push(hub),
            Ok(Some((_, false))) => {}
            Ok(None) | Err(_) => break,
        }
    }
    Ok(WriteOutcome {
        entry,
        durable_on,
        quorum,
    })
}

/// Notes for the audit trail, as consecutive entries of one commit:
/// durable here, then pushed to the alive peers without waiting for them
/// (anti-entropy repairs a lost push).
pub(crate) async fn notes(
    shared: &Shared,
    peering: &Peering,
    author: String,
    ops: Vec<Op>,
) -> Result<Vec<SignedEntry>, NoteError> {
    for op in &ops {
        if let Op::Note {
            kind,
            subject,
            detail,
        } = op
        {
            if kind.is_empty() {
                return Err(NoteError::NoKind);
            }
            let size = kind.len() + subject.len() + detail.len();
            if size > MAX_NOTE_BYTES {
                return Err(NoteError::TooLarge(size));
            }
        }
    }
    let entries = shared
        .ask(|reply| Input::LogWrite { author, ops, reply })
        .await
        .ok_or(NoteError::ShuttingDown)?
        .map_err(NoteError::NotRecorded)?;
    let req = Arc::new(ReplRequest::Entries(entries.clone()));
    for p in peering.peers().into_iter().filter(|p| p.alive) {
        let (repl, req) = (peering.repl.clone(), req.clone());
        tokio::spawn(async move {
            if let Err(error) = repl.ask(p.addr, &req).await {
                debug!(peer = %p.name, %error, "push of notes failed; anti-entropy will repair");
            }
        });
    }
    Ok(entries)
}

/// What became of a write.
pub struct WriteOutcome {
    pub entry: SignedEntry,
    pub durable_on: Vec<String>,
    pub quorum: usize,
}

impl WriteOutcome {
    pub fn acknowledged(&self) -> bool {
        self.durable_on.len() >= self.quorum
    }

    /// How a write route answers: 200 once a quorum holds the entry, 202
    /// when it is stored here but not yet acknowledged.
    pub fn http_status(&self) -> axum::http::StatusCode {
        if self.acknowledged() {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::ACCEPTED
        }
    }
}

/// Answers the replication requests of other hubs.
pub(crate) async fn serve_replication(
    shared: Shared,
    peering: Peering,
    mut accepted: mpsc::Receiver<Accepted>,
    shutdown: CancellationToken,
) {
    loop {
        let a = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            a = accepted.recv() => match a { Some(a) => a, None => break },
        };
        let (shared, peering, sd) = (shared.clone(), peering.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    biased;
                    _ = sd.cancelled() => break,
                    s = a.conn.accept_bi() => s,
                };
                let Ok((mut send, mut recv)) = stream else {
                    break;
                };
                let (shared, peering, conn, peer) = (
                    shared.clone(),
                    peering.clone(),
                    a.conn.clone(),
                    a.peer.clone(),
                );
                tokio::spawn(async move {
                    let req =
                        wire::read_msg::<ReplRequest>(&mut recv, REPL_VERSION, MAX_REPL_FRAME)
                            .await;
                    let req = match req {
                        Ok(Some(r)) => r,
                        Ok(None) => return,
                        Err(WireError::Stream(_)) => return,
                        Err(error) => {
                            warn!(%peer, %error, "closing replication connection: bad request");
                            conn.close(close::PROTOCOL_ERROR, error.to_string().as_bytes());
                            return;
                        }
                    };
                    let resp = answer(&shared, &peering, req).await;
                    if let Ok(frame) = wire::encode(REPL_VERSION, &resp, MAX_REPL_FRAME) {
                        let _ = wire::write_frame(&mut send, &frame).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}

async fn answer(shared: &Shared, peering: &Peering, req: ReplRequest) -> ReplResponse {
    let gone = || ReplResponse::Refused("the hub is shutting down".into());
    match req {
        ReplRequest::Chunks(hashes) => {
            let store = shared.chunks.clone();
            let found = tokio::task::spawn_blocking(move || {
                hashes
                    .iter()
                    .take(crate::replication::CHUNKS_PER_PULL)
                    .filter_map(|h| store.get(h).ok().flatten().map(|b| (*h, b)))
                    .collect()
            })
            .await;
            match found {
                Ok(chunks) => ReplResponse::Chunks(chunks),
                Err(e) => ReplResponse::Refused(e.to_string()),
            }
        }
        ReplRequest::Records(records) => {
            match shared
                .ask(|reply| Input::Replicated { records, reply })
                .await
            {
                Some(Ok(())) => ReplResponse::Stored,
                Some(Err(e)) => ReplResponse::Refused(e),
                None => gone(),
            }
        }
        ReplRequest::Entries(entries) => {
            let entries = verified(&peering.creds, entries);
            match shared
                .ask(|reply| Input::LogEntries { entries, reply })
                .await
            {
                Some(Ok(_)) => ReplResponse::Stored,
                Some(Err(e)) => ReplResponse::Refused(e),
                None => gone(),
            }
        }
        ReplRequest::PullRecords { have, max } => {
            let Some(mine) = shared.ask(|reply| Input::Coverage { reply }).await else {
                return gone();
            };
            let have: BTreeMap<_, _> = have.into_iter().collect();
            let gaps = missing(&mine, &have);
            let reader = shared.store.clone();
            let max = max.min(PULL_CHUNK) as usize;
            let found = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                for (relay, stream, after, until) in gaps {
                    if out.len() >= max {
                        return Ok::<_, crate::store::StoreError>((out, true));
                    }
                    let recs = reader.stream_after(&relay, stream, after, max - out.len())?;
                    out.extend(recs.into_iter().filter(|r| r.seq <= until));
                }
                let more = out.len() >= max;
                Ok((out, more))
            })
            .await;
            match found {
                Ok(Ok((records, more))) => ReplResponse::Records { records, more },
                Ok(Err(e)) => ReplResponse::Refused(e.to_string()),
                Err(e) => ReplResponse::Refused(e.to_string()),
            }
        }
        ReplRequest::PullEntries { have, max } => {
            let Some(missing) = shared.ask(|reply| Input::LogMissing { have, reply }).await else {
                return gone();
            };
            let reader = shared.store.clone();
            let max = max.min(PULL_CHUNK) as usize;
            let found = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                let mut bytes = 0usize;
                for (origin, after) in missing {
                    if out.len() >= max {
                        return Ok::<_, crate::store::StoreError>((out, true));
                    }
                    for e in reader.log_after(&origin, after, max - out.len())? {
                        // Entries holding configuration bundles are large:
                        // a chunk stays well within a frame whatever it holds.
                        let size = e.cert.len() + e.signature.len() + e.entry.approx_size();
                        if !out.is_empty() && bytes + size > MAX_PULL_BYTES {
                            return Ok((out, true));
                        }
                        bytes += size;
                        out.push(e);
                    }
                }
                let more = out.len() >= max;
                Ok((out, more))
            })
            .await;
            match found {
                Ok(Ok((entries, more))) => ReplResponse::Entries { entries, more },
                Ok(Err(e)) => ReplResponse::Refused(e.to_string()),
                Err(e) => ReplResponse::Refused(e.to_string()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_node::id::{Identity, Role};
    use trellis_node::tls::MeshCa;

    use super::*;
    use crate::log::{Entry, Hlc};

    fn entry(creds: &Credentials, origin: &str, seq: u64) -> SignedEntry {
        let entry = Entry {
            origin: origin.into(),
            seq,
            hlc: Hlc {
                ms: 1_000 + seq,
                counter: 0,
            },
            author: "alice".into(),
            op: Op::Put {
                key: format!("k{seq}"),
                value: "v".into(),
            },
            prev: crate::log::NO_PREV,
        };
        let signature = creds.sign(&entry.signing_bytes()).unwrap();
        SignedEntry {
            entry,
            cert: creds.cert_der().to_vec(),
            signature,
        }
    }

    #[test]
    fn only_entries_signed_by_their_origin_hub_of_the_mesh_survive() {
        let ca = MeshCa::generate("test").unwrap();
        let hub = |ca: &MeshCa, name: &str| {
            Credentials::issue(ca, &Identity::new(Role::Hub, "eu", "", name).unwrap()).unwrap()
        };
        let (a, b, me) = (hub(&ca, "hub-a"), hub(&ca, "hub-b"), hub(&ca, "hub-c"));
        let foreign = hub(&MeshCa::generate("foreign").unwrap(), "hub-a");
        let mut tampered = entry(&a, "hub-a", 3);
        tampered.entry.author = "mallory".into();
        let entries = vec![
            entry(&a, "hub-a", 1),
            entry(&a, "hub-a", 2),
            tampered,
            entry(&b, "hub-a", 4),
            entry(&foreign, "hub-a", 5),
            entry(&a, "hub-a", 6),
            entry(&b, "hub-b", 1),
        ];
        let kept: Vec<(String, u64)> = verified(&me, entries)
            .into_iter()
            .map(|e| (e.entry.origin, e.entry.seq))
            .collect();
        assert_eq!(
            kept,
            [
                ("hub-a".to_owned(), 1),
                ("hub-a".to_owned(), 2),
                ("hub-a".to_owned(), 6),
                ("hub-b".to_owned(), 1)
            ]
        );
    }
}
