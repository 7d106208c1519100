//! Site gossip: chitchat running over the member's QUIC endpoint.
//!
//! [`QuicTransport`] implements chitchat's `Transport`/`Socket` on quinn.
//! Each chitchat message travels as one frame (see [`crate::wire`]). A
//! member sends all its messages to one peer on one unidirectional stream
//! per connection, in order, so that each digest can be sent as its
//! difference from the previous one on that stream
//! ([`crate::gossip_codec`]); the receiver reads every stream a peer opens,
//! each with its own decoder. Frames of the older forms (one message per
//! stream, versions 1 and 2) are still read. Sending never waits on the
//! network: `send` puts the message in the peer's small queue (dropping the
//! oldest when full) and a per-peer task connects, reconnects with backoff
//! and writes. A dead or slow peer therefore costs the gossip loop nothing.
//!
//! Connections are cached per peer address in both directions: a message
//! that arrives on a connection the peer opened is answered on that same
//! connection. Any message that fails to decode or exceeds
//! [`MAX_GOSSIP_FRAME`] closes its connection with
//! [`close::PROTOCOL_ERROR`]; the member keeps serving everyone else.
//!
//! [`Gossip`] owns the chitchat instance and turns its state into a
//! [`SiteView`]. It also logs what the member's failure detector concludes
//! (a member became unreachable, or came back) the moment chitchat does, so
//! an operator reading one member's log sees when it lost sight of another;
//! the gossip benchmark times failure detection from those lines.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, Serializable, spawn_chitchat,
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::authz::Protocol;
use crate::endpoint::{Accepted, MeshEndpoint, close};
use crate::gossip_codec::{IdTable, StreamDecoder, StreamEncoder};
use crate::site::{Health, MemberView, SiteView, descriptors_of, keys};
use crate::wire::{self, WireError};

/// Version byte of gossip frames whose body is chitchat's own encoding.
/// Sent when compressing would not make a message smaller; always read.
pub const GOSSIP_VERSION_PLAIN: u8 = 1;
/// Version byte of gossip frames whose body is chitchat's encoding
/// compressed with zstd, one message per stream. Still read; no longer sent.
pub const GOSSIP_VERSION_ZSTD: u8 = 2;
/// Version byte of gossip frames on a stream that carries many: a flag byte
/// (`FLAG_ZSTD` or 0), then the message coded by [`StreamEncoder`] against
/// the previous one on the same stream, compressed with zstd unless that
/// would not make it smaller. chitchat sends every member's digest (name,
/// generation, address and three fixed-width counters, ~51 B a member) in
/// every Syn and SynAck; coded against the previous digest an entry takes
/// about 4 bytes.
pub const GOSSIP_VERSION: u8 = 3;
/// Flag of a version-3 frame whose coded message is compressed.
const FLAG_ZSTD: u8 = 1;
/// zstd level of gossip frames: the fastest, since a member sends about
/// ten a second and the digest compresses well even so.
const ZSTD_LEVEL: i32 = 1;
/// Largest gossip frame accepted. chitchat caps its messages at one UDP
/// datagram (64 KiB); anything larger is not a chitchat message.
pub const MAX_GOSSIP_FRAME: usize = 80 * 1024;
/// Messages kept per peer while its connection is being made.
const PEER_QUEUE: usize = 8;
/// Messages received and not yet taken by the gossip loop.
const INBOX: usize = 1024;
/// A peer task with nothing to send for this long ends (and its stream
/// with it): as long as the connection may idle.
const PEER_IDLE: Duration = crate::tls::GOSSIP_IDLE_TIMEOUT;
/// Time allowed to write one message or read one stream.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(8);

fn malformed() -> WireError {
    WireError::Malformed(postcard::Error::DeserializeBadEncoding)
}

/// Decodes one gossip frame body (version byte, then the message) read from
/// the stream `decoder` belongs to. Versions 1 and 2 (plain or compressed
/// chitchat bytes, from members of older releases) leave the decoder as it
/// is. A body that would inflate past [`MAX_GOSSIP_FRAME`] is refused
/// before it is expanded further.
pub fn decode_frame(
    decoder: &mut StreamDecoder,
    body: &[u8],
) -> Result<ChitchatMessage, WireError> {
    let inflated;
    let mut payload = match body.split_first() {
        Some((&GOSSIP_VERSION, rest)) => {
            let (&flag, coded) = rest.split_first().ok_or_else(malformed)?;
            let unpacked;
            let coded = match flag {
                FLAG_ZSTD => {
                    unpacked = inflate(coded)?;
                    &unpacked[..]
                }
                0 => coded,
                _ => return Err(malformed()),
            };
            inflated = decoder
                .decode(coded, MAX_GOSSIP_FRAME)
                .map_err(|_| malformed())?;
            &inflated[..]
        }
        Some((&GOSSIP_VERSION_ZSTD, packed)) => {
            inflated = inflate(packed)?;
            &inflated[..]
        }
        _ => wire::payload(body, GOSSIP_VERSION_PLAIN)?,
    };
    let msg = ChitchatMessage::deserialize(&mut payload).map_err(|_| malformed())?;
    if !payload.is_empty() {
        return Err(malformed());
    }
    Ok(msg)
}

/// Whether `msg` tells its receiver anything. chitchat answers every
/// SynAck with an Ack carrying what the SynAck's sender lacks, and in a
/// settled site that is nothing: a third of a member's messages. Handling
/// an empty Ack changes nothing at the receiver but its own heartbeat,
/// which moves once a round anyway, and chitchat already lives with lost
/// Acks (it was built for UDP), so an empty one is not sent.
pub fn worth_sending(msg: &ChitchatMessage) -> bool {
    match msg {
        ChitchatMessage::Ack { .. } => {
            let empty = ChitchatMessage::Ack {
                delta: Default::default(),
            };
            msg.serialized_len() > empty.serialized_len()
        }
        _ => true,
    }
}

/// zstd contexts, kept by each thread that codes gossip frames: making
/// and freeing one for every message (about ten a second each way) cost
/// more than compressing the message.
#[derive(Default)]
struct Zstd {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
}

impl Zstd {
    fn compressor(&mut self) -> std::io::Result<&mut zstd::bulk::Compressor<'static>> {
        if self.compressor.is_none() {
            self.compressor = Some(zstd::bulk::Compressor::new(ZSTD_LEVEL)?);
        }
        Ok(self.compressor.as_mut().expect("just made"))
    }

    fn decompressor(&mut self) -> std::io::Result<&mut zstd::bulk::Decompressor<'static>> {
        if self.decompressor.is_none() {
            self.decompressor = Some(zstd::bulk::Decompressor::new()?);
        }
        Ok(self.decompressor.as_mut().expect("just made"))
    }
}

thread_local! {
    static ZSTD: std::cell::RefCell<Zstd> = std::cell::RefCell::new(Zstd::default());
}

/// Inflates a zstd frame of at most [`MAX_GOSSIP_FRAME`] bytes, into a
/// buffer of the size its header declares (a frame declaring more is
/// refused unread; one declaring less than it holds fails to inflate).
fn inflate(packed: &[u8]) -> Result<Vec<u8>, WireError> {
    let capacity = match zstd::zstd_safe::get_frame_content_size(packed) {
        Ok(Some(n)) if n <= MAX_GOSSIP_FRAME as u64 => n as usize,
        Ok(Some(_)) => return Err(malformed()),
        _ => MAX_GOSSIP_FRAME,
    };
    ZSTD.with(|z| z.borrow_mut().decompressor()?.decompress(packed, capacity))
        .map_err(|_| malformed())
}

/// Encodes one chitchat message (chitchat's own bytes) as the next frame of
/// the stream `encoder` belongs to. If this fails the stream must not be
/// used again: the encoder has already taken the message as its base.
pub fn encode_frame(encoder: &mut StreamEncoder, plain: &[u8]) -> Result<Vec<u8>, WireError> {
    let coded = encoder.encode(plain);
    let mut body = Vec::with_capacity(coded.len() + 1);
    match ZSTD.with(|z| z.borrow_mut().compressor()?.compress(&coded)) {
        Ok(packed) if packed.len() < coded.len() => {
            body.push(FLAG_ZSTD);
            body.extend_from_slice(&packed);
        }
        _ => {
            body.push(0);
            body.extend_from_slice(&coded);
        }
    }
    wire::encode_raw(GOSSIP_VERSION, &body, MAX_GOSSIP_FRAME)
}

/// The stream a peer task writes its messages on, while its connection is
/// the cached one.
struct Outgoing {
    conn: usize,
    send: quinn::SendStream,
    encoder: StreamEncoder,
}

struct PeerQueue {
    frames: Mutex<VecDeque<Vec<u8>>>,
    notify: Notify,
}

struct Shared {
    endpoint: MeshEndpoint,
    protocol: Protocol,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
    peers: Mutex<HashMap<SocketAddr, Arc<PeerQueue>>>,
    /// The member ids every stream's coder keeps, once for all of them.
    ids: IdTable,
    inbox: mpsc::Sender<(SocketAddr, ChitchatMessage)>,
    shutdown: CancellationToken,
}

/// chitchat's transport over the member's QUIC endpoint.
pub struct QuicTransport {
    shared: Arc<Shared>,
    inbox: Mutex<Option<mpsc::Receiver<(SocketAddr, ChitchatMessage)>>>,
}

impl QuicTransport {
    /// Starts serving gossip connections arriving on `accepted` (the
    /// endpoint's route for `protocol`: site gossip or hub federation).
    pub fn start(
        endpoint: MeshEndpoint,
        protocol: Protocol,
        mut accepted: mpsc::Receiver<Accepted>,
        shutdown: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel(INBOX);
        let shared = Arc::new(Shared {
            endpoint,
            protocol,
            conns: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            ids: IdTable::default(),
            inbox: tx,
            shutdown,
        });
        let s = shared.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = s.shutdown.cancelled() => break,
                    a = accepted.recv() => match a {
                        Some(a) => s.adopt(a.conn),
                        None => break,
                    },
                }
            }
        });
        QuicTransport {
            shared,
            inbox: Mutex::new(Some(rx)),
        }
    }
}

#[async_trait]
impl Transport for QuicTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let local = self.shared.endpoint.local_addr();
        anyhow::ensure!(
            listen_addr == local,
            "gossip listens on the endpoint's address {local}, not {listen_addr}"
        );
        let inbox = self
            .inbox
            .lock()
            .expect("not poisoned")
            .take()
            .ok_or_else(|| anyhow::anyhow!("the QUIC gossip transport is already open"))?;
        Ok(Box::new(QuicSocket {
            shared: self.shared.clone(),
            inbox,
        }))
    }
}

struct QuicSocket {
    shared: Arc<Shared>,
    inbox: mpsc::Receiver<(SocketAddr, ChitchatMessage)>,
}

#[async_trait]
impl Socket for QuicSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        if worth_sending(&msg) {
            self.shared.enqueue(to, &msg);
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        // Ending here also ends chitchat's loop if nobody shut it down.
        tokio::select! {
            biased;
            _ = self.shared.shutdown.cancelled() => Err(anyhow::anyhow!("gossip transport shut down")),
            m = self.inbox.recv() => m.ok_or_else(|| anyhow::anyhow!("gossip transport shut down")),
        }
    }
}

impl Shared {
    fn metrics(&self) -> &crate::metrics::MeshMetrics {
        self.endpoint.metrics()
    }

    /// Caches a connection (ours or the peer's) and reads messages from it.
    fn adopt(self: &Arc<Self>, conn: quinn::Connection) {
        let addr = conn.remote_address();
        self.conns
            .lock()
            .expect("not poisoned")
            .insert(addr, conn.clone());
        let this = self.clone();
        tokio::spawn(async move { this.read_loop(conn).await });
    }

    /// Reads every stream the peer opens on `conn`, each in a task of its
    /// own (a stream carries many messages).
    async fn read_loop(self: Arc<Self>, conn: quinn::Connection) {
        let addr = conn.remote_address();
        loop {
            let stream = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                s = conn.accept_uni() => s,
            };
            let Ok(recv) = stream else { break };
            let this = self.clone();
            let conn = conn.clone();
            tokio::spawn(async move {
                tokio::select! {
                    biased;
                    _ = this.shutdown.cancelled() => {}
                    _ = this.read_stream(&conn, recv) => {}
                }
            });
        }
        self.forget(addr, &conn);
    }

    /// Reads the messages of one stream until it ends. A frame may be
    /// awaited for as long as the connection lives, but once its length has
    /// arrived the rest must follow within [`IO_TIMEOUT`].
    async fn read_stream(&self, conn: &quinn::Connection, mut recv: quinn::RecvStream) {
        let addr = conn.remote_address();
        let mut decoder = StreamDecoder::sharing(&self.ids);
        loop {
            let frame = match wire::read_len(&mut recv, MAX_GOSSIP_FRAME).await {
                Ok(Some(len)) => tokio::time::timeout(IO_TIMEOUT, wire::read_body(&mut recv, len))
                    .await
                    .unwrap_or(Err(WireError::Stream("timed out reading a message".into()))),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let msg = frame.and_then(|body| {
                self.metrics()
                    .gossip_bytes_received
                    .inc_by(body.len() as u64 + 4);
                decode_frame(&mut decoder, &body)
            });
            match msg {
                Ok(msg) => {
                    self.metrics().gossip_messages_received.inc();
                    if self.inbox.try_send((addr, msg)).is_err() {
                        self.metrics().gossip_drop("inbox_full");
                    }
                }
                Err(WireError::Stream(error)) => {
                    debug!(peer = %addr, %error, "gossip stream failed");
                    return;
                }
                Err(error) => {
                    self.metrics()
                        .peer_error(Protocol::Gossip.as_str(), error.kind());
                    warn!(peer = %addr, %error, "closing gossip connection: peer sent a bad message");
                    conn.close(close::PROTOCOL_ERROR, error.to_string().as_bytes());
                    return;
                }
            }
        }
    }

    /// Drops `conn` from the cache if it is still the cached one.
    fn forget(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let mut conns = self.conns.lock().expect("not poisoned");
        if conns.get(&addr).map(|c| c.stable_id()) == Some(conn.stable_id()) {
            conns.remove(&addr);
        }
    }

    fn enqueue(self: &Arc<Self>, to: SocketAddr, msg: &ChitchatMessage) {
        // chitchat's own bytes; each peer task codes them for its stream.
        let plain = msg.serialize_to_vec();
        if plain.len() > MAX_GOSSIP_FRAME - wire::HEADER_LEN - 1 {
            warn!(peer = %to, bytes = plain.len(), "not sending an oversized gossip message");
            return;
        }
        let mut peers = self.peers.lock().expect("not poisoned");
        let queue = peers.entry(to).or_insert_with(|| {
            let q = Arc::new(PeerQueue {
                frames: Mutex::new(VecDeque::with_capacity(PEER_QUEUE)),
                notify: Notify::new(),
            });
            let this = self.clone();
            let q2 = q.clone();
            tokio::spawn(async move { this.peer_loop(to, q2).await });
            q
        });
        let mut frames = queue.frames.lock().expect("not poisoned");
        if frames.len() >= PEER_QUEUE {
            frames.pop_front();
            self.metrics().gossip_drop("queue_full");
        }
        frames.push_back(plain);
        drop(frames);
        queue.notify.notify_one();
    }

    /// Sends `to`'s queued messages, one task per peer, on one stream per
    /// connection.
    async fn peer_loop(self: Arc<Self>, to: SocketAddr, queue: Arc<PeerQueue>) {
        let mut backoff = Duration::ZERO;
        let mut out: Option<Outgoing> = None;
        loop {
            let next = queue.frames.lock().expect("not poisoned").pop_front();
            let Some(plain) = next else {
                tokio::select! {
                    biased;
                    _ = self.shutdown.cancelled() => return,
                    _ = queue.notify.notified() => continue,
                    _ = tokio::time::sleep(PEER_IDLE) => {
                        let mut peers = self.peers.lock().expect("not poisoned");
                        if queue.frames.lock().expect("not poisoned").is_empty() {
                            peers.remove(&to);
                            if let Some(mut o) = out.take() {
                                let _ = o.send.finish();
                            }
                            return;
                        }
                        continue;
                    }
                }
            };
            let conn = match self.connection(to).await {
                Ok(conn) => {
                    backoff = Duration::ZERO;
                    conn
                }
                Err(error) => {
                    debug!(peer = %to, %error, "gossip peer unreachable");
                    let dropped = {
                        let mut frames = queue.frames.lock().expect("not poisoned");
                        let n = frames.len() + 1;
                        frames.clear();
                        n
                    };
                    for _ in 0..dropped {
                        self.metrics().gossip_drop("unreachable");
                    }
                    backoff = (backoff * 2).clamp(Duration::from_millis(250), MAX_BACKOFF);
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            let sent = tokio::time::timeout(IO_TIMEOUT, async {
                if out.as_ref().map(|o| o.conn) != Some(conn.stable_id()) {
                    // A new connection (or none yet): a new stream, coded
                    // from nothing, in what the connection's version reads.
                    let version = crate::endpoint::negotiated_version(&conn)
                        .unwrap_or(crate::authz::OLDEST_PROTOCOL_VERSION);
                    out = Some(Outgoing {
                        conn: conn.stable_id(),
                        send: conn.open_uni().await?,
                        encoder: StreamEncoder::speaking(version).sharing(&self.ids),
                    });
                }
                let o = out.as_mut().expect("just set");
                let frame = encode_frame(&mut o.encoder, &plain)?;
                o.send.write_all(&frame).await?;
                anyhow::Ok(frame.len())
            })
            .await;
            match sent {
                Ok(Ok(len)) => {
                    self.metrics().gossip_messages_sent.inc();
                    self.metrics().gossip_bytes_sent.inc_by(len as u64);
                }
                _ => {
                    // Whatever the stream's decoder holds now is unknown:
                    // end it, and start the next message on a new one.
                    if let Some(mut o) = out.take() {
                        let _ = o.send.reset(close::DONE);
                    }
                    self.metrics().gossip_drop("unreachable");
                    self.forget(to, &conn);
                }
            }
        }
    }

    async fn connection(self: &Arc<Self>, to: SocketAddr) -> anyhow::Result<quinn::Connection> {
        let cached = self.conns.lock().expect("not poisoned").get(&to).cloned();
        if let Some(conn) = cached {
            if conn.close_reason().is_none() {
                return Ok(conn);
            }
            self.forget(to, &conn);
        }
        let (conn, _peer) = self.endpoint.connect(to, self.protocol).await?;
        self.adopt(conn.clone());
        Ok(conn)
    }
}

/// How long chitchat keeps a deleted key's tombstone.
pub const MARKED_FOR_DELETION_GRACE: Duration = Duration::from_secs(2 * 3600);

/// chitchat's failure detector as a member runs it; only the interval,
/// threshold and dead-node grace come from the configuration. The
/// simulator's real-chitchat sites use the same.
pub fn failure_detector(settings: &GossipSettings) -> FailureDetectorConfig {
    FailureDetectorConfig {
        phi_threshold: settings.phi_threshold,
        // The default window (1,000) costs ~8 KB per peer and
        // adapts slowly; 100 samples is plenty at second-scale intervals.
        sampling_window_size: 100,
        max_interval: Duration::from_secs(10),
        // Start from the configured interval, not chitchat's 5 s,
        // so that failures right after a join are seen as quickly.
        initial_interval: settings.interval,
        dead_node_grace_period: settings.dead_node_grace,
    }
}

/// Gossip settings, from the member's configuration.
#[derive(Debug, Clone)]
pub struct GossipSettings {
    pub interval: Duration,
    pub phi_threshold: f64,
    /// How long a dead member stays listed before it is forgotten.
    pub dead_node_grace: Duration,
    pub seeds: Vec<SocketAddr>,
    /// The address other members reach this one at, when it is not the
    /// address the endpoint is bound to (a wildcard bind, NAT). Port 0
    /// means the bound port.
    pub advertise: Option<SocketAddr>,
}

/// The address a member bound to `listen` announces.
pub fn advertised(listen: SocketAddr, advertise: Option<SocketAddr>) -> SocketAddr {
    match advertise {
        Some(a) if a.port() == 0 => SocketAddr::new(a.ip(), listen.port()),
        Some(a) => a,
        None => listen,
    }
}

/// The site as a chitchat instance sees it (the seam: chitchat in,
/// [`SiteView`] out).
pub fn site_view_of(c: &chitchat::Chitchat, region: &str, site: &str) -> SiteView {
    let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
    let members = c
        .node_states()
        .iter()
        .map(|(id, state)| {
            let (labels, facts) = descriptors_of(state.key_values());
            MemberView {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr,
                alive: live.contains(id),
                health: Health::from_kv(state.key_values()),
                labels,
                facts,
                config: crate::distribute::MemberConfig::from_kv(state.key_values()),
                patch: crate::patchstate::MemberPatch::from_kv(state.key_values()),
            }
        })
        .collect();
    SiteView {
        region: region.to_owned(),
        site: site.to_owned(),
        members,
    }
}

/// What a [`SiteView`] is built from, in 64 bits: every member's identity,
/// the version of its last key change (chitchat's `max_version`, which a
/// heartbeat does not move) and whether it is live. Equal keys mean equal
/// views.
fn view_key(c: &chitchat::Chitchat) -> u64 {
    use std::hash::{Hash, Hasher};
    let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let states = c.node_states();
    states.len().hash(&mut h);
    for (id, state) in states {
        id.hash(&mut h);
        state.max_version().hash(&mut h);
        live.contains(id).hash(&mut h);
    }
    h.finish()
}

/// Which gossip cluster to join: a site's, or the hubs' federation.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub protocol: Protocol,
    /// chitchat refuses messages from another cluster id: a second fence
    /// behind the certificate check.
    pub cluster_id: String,
}

impl Cluster {
    /// The gossip of `id`'s site.
    pub fn site(id: &crate::id::Identity) -> Self {
        Cluster {
            protocol: Protocol::Gossip,
            cluster_id: format!("trellis/{}/{}", id.region, id.site),
        }
    }

    /// The hubs' federation.
    pub fn hubs() -> Self {
        Cluster {
            protocol: Protocol::Federation,
            cluster_id: "trellis/hubs".to_owned(),
        }
    }
}

/// One member of a gossip cluster as raw key-values.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub generation: u64,
    pub addr: SocketAddr,
    pub alive: bool,
    pub kv: std::collections::BTreeMap<String, String>,
}

/// A member's place in a gossip cluster (its site's, or the hubs').
pub struct Gossip {
    handle: ChitchatHandle,
    advertise: SocketAddr,
    region: String,
    site: String,
    /// Keeps the status-change listener registered while gossip runs.
    _status_listener: chitchat::ListenerHandle,
    last_view: Mutex<Option<LastView>>,
}

/// The last view built, and the [`view_key`] of the state it was built
/// from.
type LastView = (u64, Arc<SiteView>);

/// How the set of live members changed between two views of it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LivenessChange {
    /// Members live now that were never seen live before.
    pub joined: Vec<ChitchatId>,
    /// Members live now that had been seen live, then not.
    pub returned: Vec<ChitchatId>,
    /// Members live before and not now.
    pub lost: Vec<ChitchatId>,
}

/// Compares the live members `before` and `now`; `ever` holds every member
/// ever seen live and is updated, so a return is told apart from a join.
pub fn liveness_change(
    before: &std::collections::BTreeSet<ChitchatId>,
    now: &std::collections::BTreeSet<ChitchatId>,
    ever: &mut std::collections::BTreeSet<ChitchatId>,
) -> LivenessChange {
    let mut change = LivenessChange::default();
    for id in now.difference(before) {
        if ever.insert(id.clone()) {
            change.joined.push(id.clone());
        } else {
            change.returned.push(id.clone());
        }
    }
    change.lost = before.difference(now).cloned().collect();
    change
}

/// Logs each change of the live members seen by this member until the
/// watch ends (when chitchat stops). A member lost is logged at info level
/// with the failure detector's verdict; joins are debug, because a starting
/// site would otherwise log every member at every member.
async fn log_liveness(
    mut live: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<ChitchatId, chitchat::NodeState>,
    >,
    me: ChitchatId,
) {
    let mut before = std::collections::BTreeSet::new();
    let mut ever = std::collections::BTreeSet::new();
    while live.changed().await.is_ok() {
        let now: std::collections::BTreeSet<ChitchatId> = live
            .borrow_and_update()
            .keys()
            .filter(|id| **id != me)
            .cloned()
            .collect();
        let change = liveness_change(&before, &now, &mut ever);
        for id in &change.joined {
            debug!(member = %id.node_id, generation = id.generation_id, "site member joined");
        }
        for id in &change.returned {
            info!(member = %id.node_id, generation = id.generation_id, "site member is reachable again");
        }
        for id in &change.lost {
            info!(member = %id.node_id, generation = id.generation_id, "site member is unreachable: its heartbeats stopped");
        }
        before = now;
    }
}

impl Gossip {
    /// Joins the site's gossip on the endpoint. `accepted` is the endpoint's
    /// gossip route; `health` is published at once.
    pub async fn start(
        endpoint: MeshEndpoint,
        accepted: mpsc::Receiver<Accepted>,
        settings: &GossipSettings,
        health: &Health,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let cluster = Cluster::site(endpoint.identity());
        Self::join(
            endpoint,
            cluster,
            accepted,
            settings,
            health.to_kv(),
            shutdown,
        )
        .await
    }

    /// Joins `cluster` on the endpoint, publishing `initial` at once.
    pub async fn join(
        endpoint: MeshEndpoint,
        cluster: Cluster,
        accepted: mpsc::Receiver<Accepted>,
        settings: &GossipSettings,
        initial: Vec<(String, String)>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let id = endpoint.identity().clone();
        let listen = endpoint.local_addr();
        let advertise = advertised(listen, settings.advertise);
        // chitchat requires generations to grow across restarts.
        let generation = crate::clock::unix_ms();
        let transport = QuicTransport::start(endpoint, cluster.protocol, accepted, shutdown);
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(id.name.clone(), generation, advertise),
            cluster_id: cluster.cluster_id,
            gossip_interval: settings.interval,
            listen_addr: listen,
            seed_nodes: settings
                .seeds
                .iter()
                .filter(|s| **s != listen && **s != advertise)
                .map(|s| s.to_string())
                .collect(),
            failure_detector_config: failure_detector(settings),
            marked_for_deletion_grace_period: MARKED_FOR_DELETION_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let me = config.chitchat_id.clone();
        let handle = spawn_chitchat(config, initial, &transport).await?;
        let (live, status_listener) = handle
            .with_chitchat(|c| {
                let listener = c.subscribe_event(keys::STATUS, |event| {
                    debug!(member = %event.node.node_id, status = event.value, "site member's status seen changed");
                });
                (c.live_nodes_watcher(), listener)
            })
            .await;
        tokio::spawn(log_liveness(live, me));
        Ok(Gossip {
            handle,
            advertise,
            region: id.region,
            site: id.site,
            _status_listener: status_listener,
            last_view: Mutex::new(None),
        })
    }

    /// Sets this member's keys to `kv`, deleting those with `prefix` that
    /// are no longer in it (so a key can disappear as well as change).
    pub async fn set(&self, kv: Vec<(String, String)>, prefix: &str) {
        self.handle
            .with_chitchat(|c| {
                let state = c.self_node_state();
                let stale: Vec<String> = state
                    .key_values()
                    .filter(|(k, _)| {
                        !prefix.is_empty()
                            && k.starts_with(prefix)
                            && !kv.iter().any(|(key, _)| key == k)
                    })
                    .map(|(k, _)| k.to_owned())
                    .collect();
                for k in stale {
                    state.delete(&k);
                }
                for (k, v) in &kv {
                    if state.get(k) != Some(v.as_str()) {
                        state.set(k, v);
                    }
                }
            })
            .await;
    }

    /// Every known member (every incarnation) with its key-values.
    pub async fn members(&self) -> Vec<Member> {
        self.handle
            .with_chitchat(|c| {
                let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
                c.node_states()
                    .iter()
                    .map(|(id, state)| Member {
                        name: id.node_id.to_string(),
                        generation: id.generation_id,
                        addr: id.gossip_advertise_addr,
                        alive: live.contains(id),
                        kv: state
                            .key_values()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                    })
                    .collect()
            })
            .await
    }

    /// The values other members publish under `key` (every incarnation
    /// known, in no particular order).
    pub async fn values(&self, key: &str) -> Vec<String> {
        self.handle
            .with_chitchat(|c| {
                let me = c.self_chitchat_id().clone();
                c.node_states()
                    .iter()
                    .filter(|(id, _)| **id != me)
                    .filter_map(|(_, state)| state.get(key).map(str::to_owned))
                    .collect()
            })
            .await
    }

    /// The address this member announces to the site.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.advertise
    }

    /// Publishes new health, removing check keys that are gone.
    pub async fn publish(&self, health: &Health) {
        self.set(health.to_kv(), keys::CHECK_PREFIX).await;
    }

    /// The site as this member sees it now. Several tasks ask for it every
    /// second; it is built again (every member's keys parsed) only when a
    /// member's keys or liveness changed since the last one, which
    /// heartbeats alone do not do.
    pub async fn view(&self) -> Arc<SiteView> {
        self.handle
            .with_chitchat(|c| {
                let key = view_key(c);
                let mut last = self.last_view.lock().expect("not poisoned");
                match last.as_ref() {
                    Some((k, view)) if *k == key => view.clone(),
                    _ => {
                        let view = Arc::new(site_view_of(c, &self.region, &self.site));
                        *last = Some((key, view.clone()));
                        view
                    }
                }
            })
            .await
    }

    /// Leaves the gossip: stops the chitchat loop.
    pub async fn shutdown(self) {
        if let Err(error) = self.handle.shutdown().await {
            debug!(%error, "gossip loop ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn garbage_gossip_frames_are_rejected_without_panicking(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048)
        ) {
            let mut decoder = StreamDecoder::default();
            let _ = decode_frame(&mut decoder, &bytes);
            for head in [
                vec![GOSSIP_VERSION_ZSTD],
                vec![GOSSIP_VERSION, 0],
                vec![GOSSIP_VERSION, FLAG_ZSTD],
            ] {
                let mut framed = head;
                framed.extend_from_slice(&bytes);
                let _ = decode_frame(&mut decoder, &framed);
            }
        }
    }

    #[test]
    fn a_member_lost_then_back_is_a_return_not_a_second_join() {
        let id = |n: &str| ChitchatId::new(n.to_owned(), 1, "127.0.0.1:1".parse().unwrap());
        let set = |ns: &[&str]| {
            ns.iter()
                .map(|n| id(n))
                .collect::<std::collections::BTreeSet<_>>()
        };
        let mut ever = std::collections::BTreeSet::new();
        let c = liveness_change(&set(&[]), &set(&["a", "b"]), &mut ever);
        assert_eq!(c.joined, vec![id("a"), id("b")]);
        assert!(c.returned.is_empty() && c.lost.is_empty());
        let c = liveness_change(&set(&["a", "b"]), &set(&["a"]), &mut ever);
        assert_eq!(c.lost, vec![id("b")]);
        assert!(c.joined.is_empty() && c.returned.is_empty());
        let c = liveness_change(&set(&["a"]), &set(&["a", "b", "c"]), &mut ever);
        assert_eq!(c.returned, vec![id("b")]);
        assert_eq!(c.joined, vec![id("c")]);
        assert!(c.lost.is_empty());
    }

    /// A Syn carrying a digest of `members` members, their heartbeats
    /// `round` further on.
    fn syn_of(members: usize, round: u64) -> ChitchatMessage {
        let names: Vec<String> = (0..members).map(|i| format!("site-1-n{i:03}")).collect();
        let entries: Vec<(&str, u64, u64, u64)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), 1_000 + 7 * i as u64 + round, 0, 40 + i as u64))
            .collect();
        let syn = crate::gossip_codec::tests::message(0, &entries);
        ChitchatMessage::deserialize(&mut &syn[..]).expect("a well-formed Syn")
    }

    #[test]
    fn a_large_digest_travels_compressed_and_the_next_as_a_difference() {
        let (mut enc, mut dec) = (StreamEncoder::default(), StreamDecoder::default());
        let msg = syn_of(100, 0);
        let plain = msg.serialize_to_vec();
        let frame = encode_frame(&mut enc, &plain).unwrap();
        assert_eq!(frame[4], GOSSIP_VERSION);
        assert!(
            frame.len() * 2 < plain.len(),
            "{} of {} bytes",
            frame.len(),
            plain.len()
        );
        assert_eq!(decode_frame(&mut dec, &frame[4..]).unwrap(), msg);
        // The next digest on the same stream: every heartbeat moved on.
        let next = syn_of(100, 33);
        let frame = encode_frame(&mut enc, &next.serialize_to_vec()).unwrap();
        assert!(
            frame.len() * 20 < plain.len(),
            "{} of {} bytes",
            frame.len(),
            plain.len()
        );
        assert_eq!(decode_frame(&mut dec, &frame[4..]).unwrap(), next);
    }

    #[test]
    fn frames_of_older_members_one_message_a_stream_are_still_read() {
        let mut dec = StreamDecoder::default();
        let msg = syn_of(3, 0);
        let plain = msg.serialize_to_vec();
        let v1 = wire::encode_raw(GOSSIP_VERSION_PLAIN, &plain, MAX_GOSSIP_FRAME).unwrap();
        assert_eq!(decode_frame(&mut dec, &v1[4..]).unwrap(), msg);
        let packed = zstd::bulk::compress(&plain, 1).unwrap();
        let v2 = wire::encode_raw(GOSSIP_VERSION_ZSTD, &packed, MAX_GOSSIP_FRAME).unwrap();
        assert_eq!(decode_frame(&mut dec, &v2[4..]).unwrap(), msg);
    }

    #[test]
    fn a_compressed_frame_that_would_inflate_past_the_limit_is_refused() {
        let bomb = zstd::bulk::compress(&vec![0u8; MAX_GOSSIP_FRAME + 1], 1).unwrap();
        assert!(bomb.len() < 1024);
        for head in [vec![GOSSIP_VERSION_ZSTD], vec![GOSSIP_VERSION, FLAG_ZSTD]] {
            let mut body = head;
            body.extend_from_slice(&bomb);
            assert!(matches!(
                decode_frame(&mut StreamDecoder::default(), &body),
                Err(WireError::Malformed(_))
            ));
        }
    }

    type Inbox = mpsc::UnboundedSender<(SocketAddr, ChitchatMessage)>;

    /// chitchat's own messages between two members, delivered in memory
    /// the way [`QuicSocket`] delivers them, each one recorded.
    #[derive(Clone, Default)]
    struct Recorded {
        inboxes: Arc<Mutex<HashMap<SocketAddr, Inbox>>>,
        /// Each message sent: whether it was an Ack, and worth sending.
        sent: Arc<Mutex<Vec<(bool, bool)>>>,
    }

    struct RecordedSocket {
        net: Recorded,
        addr: SocketAddr,
        inbox: mpsc::UnboundedReceiver<(SocketAddr, ChitchatMessage)>,
    }

    #[async_trait]
    impl Transport for Recorded {
        async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
            let (tx, inbox) = mpsc::unbounded_channel();
            self.inboxes.lock().unwrap().insert(addr, tx);
            Ok(Box::new(RecordedSocket {
                net: self.clone(),
                addr,
                inbox,
            }))
        }
    }

    #[async_trait]
    impl Socket for RecordedSocket {
        async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
            let worth = worth_sending(&msg);
            let ack = matches!(msg, ChitchatMessage::Ack { .. });
            self.net.sent.lock().unwrap().push((ack, worth));
            if worth && let Some(inbox) = self.net.inboxes.lock().unwrap().get(&to) {
                let _ = inbox.send((self.addr, msg));
            }
            Ok(())
        }

        async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
            self.inbox
                .recv()
                .await
                .ok_or_else(|| anyhow::anyhow!("gone"))
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn an_ack_goes_when_it_carries_keys_and_not_when_it_is_empty() {
        let net = Recorded::default();
        let settings = crate::config::GossipConfig::default().settings();
        let mut handles = Vec::new();
        for (i, key) in ["a", "b"].into_iter().enumerate() {
            let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16));
            let config = ChitchatConfig {
                chitchat_id: ChitchatId::new(format!("n{i}"), 1, addr),
                cluster_id: "eu/s1".into(),
                gossip_interval: settings.interval,
                listen_addr: addr,
                seed_nodes: vec!["127.0.0.1:7000".into()],
                failure_detector_config: failure_detector(&settings),
                marked_for_deletion_grace_period: MARKED_FOR_DELETION_GRACE,
                catchup_callback: None,
                extra_liveness_predicate: None,
            };
            let kv = vec![(key.to_owned(), "1".to_owned())];
            handles.push(spawn_chitchat(config, kv, &net).await.unwrap());
        }
        tokio::time::sleep(settings.interval * 20).await;
        // Each member holds the other's key, though no empty Ack was sent.
        for (h, key) in handles.iter().zip(["b", "a"]) {
            let seen = h
                .with_chitchat(move |c| c.node_states().values().any(|s| s.get(key).is_some()))
                .await;
            assert!(seen, "the other member's key {key:?} never arrived");
        }
        let sent = net.sent.lock().unwrap().clone();
        let acks: Vec<bool> = sent.iter().filter(|m| m.0).map(|m| m.1).collect();
        // The first exchange's Ack carries the initiator's key; a settled
        // pair's carry nothing and stay home.
        assert!(acks.iter().any(|&w| w), "no Ack with keys: {acks:?}");
        assert!(acks.iter().filter(|&&w| !w).count() > 10, "{acks:?}");
        assert!(sent.iter().filter(|m| !m.0).all(|m| m.1));
        for h in handles {
            let _ = h.shutdown().await;
        }
    }

    #[test]
    fn a_chitchat_message_round_trips_through_a_frame() {
        let msg = ChitchatMessage::BadCluster;
        let frame = encode_frame(&mut StreamEncoder::default(), &msg.serialize_to_vec()).unwrap();
        assert_eq!(
            decode_frame(&mut StreamDecoder::default(), &frame[4..]).unwrap(),
            msg
        );
    }
}
