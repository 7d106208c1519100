//! One QUIC endpoint per member: mutual TLS on every connection,
//! authorisation by [`crate::authz`], and routing of accepted connections to
//! the task that serves their protocol (ALPN).
//!
//! The same UDP socket is used for connections we accept and for those we
//! open, so a peer's `remote_address()` is the address it listens on; the
//! gossip transport relies on that to answer a peer on the connection it
//! came in on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::authz::{
    self, OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION, PeerStreams, Protocol, Refusal, Side,
};
use crate::id::Identity;
use crate::metrics::MeshMetrics;
use crate::revocation::{Revocation, RevocationSet};
use crate::tls::{self, Credentials, MESH_SERVER_NAME, TlsError};

/// Application close codes, shared by all protocols.
pub mod close {
    use quinn::VarInt;
    /// Normal end of a conversation.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The peer is not allowed to speak this protocol with us.
    pub const REFUSED: VarInt = VarInt::from_u32(1);
    /// The peer sent malformed, oversized or unexpected data.
    pub const PROTOCOL_ERROR: VarInt = VarInt::from_u32(2);
    /// We are shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(3);
}

/// Time allowed for a handshake, ours or a peer's: long enough for a few
/// retransmissions over a slow, lossy WAN link.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An authenticated, authorised connection handed to a protocol's server.
pub struct Accepted {
    pub conn: quinn::Connection,
    pub peer: Identity,
}

/// Why an outgoing connection could not be used. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot start a connection to {addr}: {source}")]
    Start {
        addr: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("no handshake with {addr} within {HANDSHAKE_TIMEOUT:?}")]
    Timeout { addr: SocketAddr },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("{addr} presented an unusable certificate: {source}")]
    Identity { addr: SocketAddr, source: TlsError },
    #[error("refused {addr}: {source}")]
    Refused { addr: SocketAddr, source: Refusal },
    #[error(
        "{addr} speaks no version of {protocol} that this member speaks \
         ({OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}): upgrade the older of the two"
    )]
    NoCommonVersion {
        addr: SocketAddr,
        protocol: Protocol,
    },
}

/// The protocol version a connection settled on (from its ALPN).
pub fn negotiated_version(conn: &quinn::Connection) -> Option<u16> {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .and_then(|alpn| Protocol::from_alpn(&alpn))
        .map(|(_, version)| version)
}

/// Why an endpoint could not be created.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot bind QUIC endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The receive and send buffer a mesh endpoint asks the kernel for on its
/// UDP socket, each.
///
/// At Linux's default (208 KiB) a relay serving a 100 MiB artifact to ten
/// nodes three times had the kernel drop 2,700 to 4,600 batches arriving at
/// nodes busy writing, and its QUIC declared 27,000 to 46,000 packets lost
/// and cut its congestion window about 1,000 times; with 4 MiB, 160 to 340
/// lost and once (`bench-artifact`, docs/BENCHMARKS.md, "Socket
/// buffers"). The buffer is a ceiling on
/// queued datagrams, not memory set aside: an idle member costs nothing
/// more. The kernel grants at most `net.core.rmem_max` (and `wmem_max`);
/// where that is lower, the endpoint says so once in its log.
pub const UDP_BUFFER: usize = 4 << 20;

/// The largest datagram a connection searches for: as large as the path
/// takes for bulk data, an Ethernet path's otherwise.
fn largest_payload(bulk: bool) -> u16 {
    if bulk {
        tls::MAX_UDP_PAYLOAD
    } else {
        tls::ETHERNET_UDP_PAYLOAD
    }
}

/// Asks for `want` bytes of receive and send buffer on `socket`; returns
/// what the kernel granted, as it reports it (Linux reports twice what it
/// allows for data, the rest being its bookkeeping), or `None` if it could
/// not be read. A grant short of `want` is logged once per process.
pub fn size_udp_buffers(socket: &std::net::UdpSocket, want: usize) -> Option<(usize, usize)> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        let want_c = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let mut granted = [0usize; 2];
        for (slot, opt) in granted.iter_mut().zip([libc::SO_RCVBUF, libc::SO_SNDBUF]) {
            // SAFETY: `fd` is an open socket for the duration of the calls
            // and both pointers point to a c_int of the length given.
            let got = unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const want_c).cast(), len);
                let mut v: libc::c_int = 0;
                let mut l = len;
                (libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&raw mut v).cast(), &mut l) == 0)
                    .then_some(v)
            };
            *slot = usize::try_from(got?).ok()?;
        }
        static SHORT: std::sync::Once = std::sync::Once::new();
        if granted.iter().any(|&g| g < want) {
            SHORT.call_once(|| {
                info!(
                    asked_kib = want >> 10,
                    receive_kib = granted[0] >> 10,
                    send_kib = granted[1] >> 10,
                    "the kernel grants smaller UDP buffers than asked for; bursts (an artifact \
                     download) may be dropped and sent again: raise net.core.rmem_max and \
                     net.core.wmem_max to at least {want}"
                );
            });
        }
        Some((granted[0], granted[1]))
    }
    #[cfg(not(unix))]
    {
        let _ = (socket, want);
        None
    }
}

struct Inner {
    endpoint: quinn::Endpoint,
    creds: Credentials,
    clients: HashMap<Protocol, quinn::ClientConfig>,
    metrics: MeshMetrics,
    /// Accepted connections still open, per peer and protocol.
    open: std::sync::Mutex<HashMap<(Identity, Protocol), usize>>,
    /// Every open connection, accepted or opened, by `stable_id`: what a
    /// new revocation is checked against.
    live: std::sync::Mutex<HashMap<usize, Live>>,
}

struct Live {
    peer: Identity,
    fingerprint: [u8; 32],
    protocol: Protocol,
    conn: quinn::Connection,
}

/// Connections one peer (one certificate) may hold open to a member for
/// one protocol. A member keeps one per peer and protocol (two for a
/// moment when both ends connect at once, or while a fetch and a chunk
/// download overlap); past this, a new one is refused with `REFUSED`.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// A member's QUIC endpoint. Cheap to clone.
#[derive(Clone)]
pub struct MeshEndpoint {
    inner: Arc<Inner>,
}

/// Accepted connections, one channel per protocol the endpoint serves.
pub struct Routes(HashMap<Protocol, mpsc::Receiver<Accepted>>);

impl Routes {
    /// The channel of accepted connections for `protocol`.
    ///
    /// # Panics
    /// If the endpoint was not built to serve `protocol`, or it was taken
    /// already: both are programming errors.
    pub fn take(&mut self, protocol: Protocol) -> mpsc::Receiver<Accepted> {
        self.0
            .remove(&protocol)
            .unwrap_or_else(|| panic!("endpoint does not serve {protocol}"))
    }
}

impl MeshEndpoint {
    /// Binds an endpoint on `addr` that serves `serve` and can connect with
    /// any protocol, and starts accepting. Must run inside a tokio runtime.
    ///
    /// `keep_alive` lists protocols whose outgoing connections send QUIC
    /// keep-alives (long-lived uplinks through NATs).
    pub fn bind(
        creds: Credentials,
        addr: SocketAddr,
        serve: &[Protocol],
        metrics: MeshMetrics,
    ) -> Result<(Self, Routes), EndpointError> {
        Self::bind_speaking(creds, addr, serve, metrics, authz::spoken_versions())
    }

    /// [`MeshEndpoint::bind`] speaking the protocol versions `versions`
    /// (this build's are [`authz::spoken_versions`]; tests try others).
    /// Every connection settles on the newest version both ends speak
    /// ([`negotiated_version`]); with none in common the handshake fails.
    pub fn bind_speaking(
        creds: Credentials,
        addr: SocketAddr,
        serve: &[Protocol],
        metrics: MeshMetrics,
        versions: std::ops::RangeInclusive<u16>,
    ) -> Result<(Self, Routes), EndpointError> {
        let alpns: Vec<Vec<u8>> = serve.iter().flat_map(|p| p.alpns(&versions)).collect();
        let server = if serve.is_empty() {
            None
        } else {
            Some(creds.server_config(
                &alpns,
                tls::transport_config_with_streams(
                    None,
                    tls::GOSSIP_IDLE_TIMEOUT,
                    PeerStreams::enough_for(serve),
                    largest_payload(serve.iter().any(|p| p.carries_bulk())),
                ),
            )?)
        };
        let mut clients = HashMap::new();
        for p in Protocol::ALL {
            let keep_alive = (p == Protocol::Uplink).then_some(Duration::from_secs(5));
            let idle = match p {
                Protocol::Gossip | Protocol::Federation => tls::GOSSIP_IDLE_TIMEOUT,
                _ => tls::IDLE_TIMEOUT,
            };
            clients.insert(
                p,
                creds.client_config(
                    &p.alpns(&versions),
                    tls::transport_config_with_streams(
                        keep_alive,
                        idle,
                        p.peer_streams(),
                        largest_payload(p.carries_bulk()),
                    ),
                )?,
            );
        }
        let bind = |source| EndpointError::Bind { addr, source };
        let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
        size_udp_buffers(&socket, UDP_BUFFER);
        // What this endpoint tells its peers it accepts; quinn also sizes
        // its receive batches by it (untouched pages cost nothing).
        let mut config = quinn::EndpointConfig::default();
        config
            .max_udp_payload_size(tls::MAX_UDP_PAYLOAD)
            .expect("a UDP payload size QUIC allows");
        let endpoint = quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
            .map_err(bind)?;
        let mut senders = HashMap::new();
        let mut receivers = HashMap::new();
        for &p in serve {
            let (tx, rx) = mpsc::channel(64);
            senders.insert(p, tx);
            receivers.insert(p, rx);
        }
        let this = MeshEndpoint {
            inner: Arc::new(Inner {
                endpoint,
                creds,
                clients,
                metrics,
                open: Default::default(),
                live: Default::default(),
            }),
        };
        tokio::spawn(watch_revocations(
            Arc::downgrade(&this.inner),
            this.inner.creds.revocations().subscribe(),
        ));
        if !serve.is_empty() {
            tokio::spawn(this.clone().accept_loop(senders));
        }
        Ok((this, Routes(receivers)))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    pub fn identity(&self) -> &Identity {
        &self.inner.creds.identity
    }

    pub fn metrics(&self) -> &MeshMetrics {
        &self.inner.metrics
    }

    /// Connects to `addr` for `protocol`, then checks the server's identity.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> Result<(quinn::Connection, Identity), ConnectError> {
        let config = self.inner.clients[&protocol].clone();
        let connecting = self
            .inner
            .endpoint
            .connect_with(config, addr, MESH_SERVER_NAME)
            .map_err(|source| ConnectError::Start { addr, source })?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| ConnectError::Timeout { addr })?
            .map_err(|source| {
                if no_common_version(&source) {
                    self.inner.metrics.refused(protocol.as_str(), "version");
                    warn!(%addr, %protocol, "refused server: no protocol version in common (it runs a Trellis too old or too new for this one)");
                    return ConnectError::NoCommonVersion { addr, protocol };
                }
                if is_tls_failure(&source) {
                    self.inner.metrics.refused(protocol.as_str(), "tls");
                    warn!(%addr, %protocol, error = %source, "refused server: TLS handshake failed");
                }
                ConnectError::Handshake { addr, source }
            })?;
        let (peer, fingerprint) = tls::peer_certificate(&conn).map_err(|source| {
            self.inner.metrics.refused(protocol.as_str(), "identity");
            conn.close(close::REFUSED, b"no trellis identity");
            ConnectError::Identity { addr, source }
        })?;
        if let Some(r) = self.revoked(&fingerprint) {
            self.inner.metrics.refused(protocol.as_str(), "revoked");
            warn!(%addr, %peer, %protocol, revoked_at = r.at, reason = %r.reason, "refused server: its certificate is revoked");
            conn.close(close::REFUSED, b"certificate revoked");
            return Err(ConnectError::Refused {
                addr,
                source: Refusal::Revoked(Box::new(peer)),
            });
        }
        if let Err(refusal) = authz::authorize(protocol, Side::Client, self.identity(), &peer) {
            self.inner
                .metrics
                .refused(protocol.as_str(), refusal.kind());
            warn!(%addr, %refusal, "refused server");
            conn.close(close::REFUSED, refusal.to_string().as_bytes());
            return Err(ConnectError::Refused {
                addr,
                source: refusal,
            });
        }
        self.track(&conn, &peer, fingerprint, protocol, false);
        Ok((conn, peer))
    }

    /// The revocation that refuses a certificate, if it is revoked.
    fn revoked(&self, fingerprint: &[u8; 32]) -> Option<Revocation> {
        self.inner
            .creds
            .revocations()
            .current()
            .revoked(fingerprint)
            .cloned()
    }

    /// Keeps an open connection where a new revocation finds it, until it
    /// closes; an accepted one (`counted`) also gives its place in the
    /// peer's connection limit back then. What the connection lost is
    /// added to the metrics when it closes.
    fn track(
        &self,
        conn: &quinn::Connection,
        peer: &Identity,
        fingerprint: [u8; 32],
        protocol: Protocol,
        counted: bool,
    ) {
        let id = conn.stable_id();
        self.inner.live.lock().expect("not poisoned").insert(
            id,
            Live {
                peer: peer.clone(),
                fingerprint,
                protocol,
                conn: conn.clone(),
            },
        );
        let (inner, closing) = (Arc::downgrade(&self.inner), conn.clone());
        let metrics = self.inner.metrics.clone();
        let key = (peer.clone(), protocol);
        tokio::spawn(async move {
            closing.closed().await;
            metrics.connection_closed(protocol.as_str(), &closing.stats());
            let Some(inner) = inner.upgrade() else {
                return;
            };
            inner.live.lock().expect("not poisoned").remove(&id);
            if counted {
                let mut open = inner.open.lock().expect("not poisoned");
                if let Some(n) = open.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        open.remove(&key);
                    }
                }
            }
        });
    }

    /// Stops accepting, closes every connection and waits briefly for the
    /// peers to be told.
    pub async fn shutdown(&self) {
        self.inner.endpoint.close(close::SHUTDOWN, b"shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    async fn accept_loop(self, routes: HashMap<Protocol, mpsc::Sender<Accepted>>) {
        let routes = Arc::new(routes);
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let this = self.clone();
            let routes = routes.clone();
            tokio::spawn(async move { this.admit(incoming, &routes).await });
        }
        debug!("endpoint closed; accept loop ends");
    }

    async fn admit(
        &self,
        incoming: quinn::Incoming,
        routes: &HashMap<Protocol, mpsc::Sender<Accepted>>,
    ) {
        let remote = incoming.remote_address();
        let metrics = &self.inner.metrics;
        let conn = match incoming.accept() {
            Ok(connecting) => tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await,
            Err(e) => Ok(Err(e)),
        };
        let conn = match conn {
            Ok(Ok(conn)) => conn,
            Ok(Err(error)) if no_common_version(&error) => {
                metrics.refused("unknown", "version");
                warn!(%remote, "refused connection: no protocol version in common (the peer runs a Trellis too old or too new for this one)");
                return;
            }
            Ok(Err(error)) => {
                metrics.refused("unknown", "tls");
                warn!(%remote, %error, "refused connection: TLS handshake failed");
                return;
            }
            Err(_) => {
                metrics.refused("unknown", "tls");
                warn!(%remote, "refused connection: handshake timed out");
                return;
            }
        };
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        let Some((protocol, version)) = alpn.as_deref().and_then(Protocol::from_alpn) else {
            metrics.refused("unknown", "protocol");
            warn!(%remote, "refused connection: no supported protocol negotiated");
            conn.close(close::REFUSED, b"unsupported protocol");
            return;
        };
        let (peer, fingerprint) = match tls::peer_certificate(&conn) {
            Ok(peer) => peer,
            Err(error) => {
                metrics.refused(protocol.as_str(), "identity");
                warn!(%remote, %protocol, %error, "refused connection");
                conn.close(close::REFUSED, b"no trellis identity");
                return;
            }
        };
        if let Some(r) = self.revoked(&fingerprint) {
            metrics.refused(protocol.as_str(), "revoked");
            warn!(%remote, %peer, %protocol, revoked_at = r.at, reason = %r.reason, "refused connection: the peer's certificate is revoked");
            conn.close(close::REFUSED, b"certificate revoked");
            return;
        }
        if let Err(refusal) = authz::authorize(protocol, Side::Server, self.identity(), &peer) {
            metrics.refused(protocol.as_str(), refusal.kind());
            warn!(%remote, %refusal, "refused connection");
            conn.close(close::REFUSED, refusal.to_string().as_bytes());
            return;
        }
        let key = (peer.clone(), protocol);
        {
            let mut open = self.inner.open.lock().expect("not poisoned");
            let n = open.entry(key.clone()).or_default();
            if *n >= MAX_CONNECTIONS_PER_PEER {
                metrics.refused(protocol.as_str(), "too_many");
                warn!(%remote, %peer, %protocol, limit = MAX_CONNECTIONS_PER_PEER, "refused connection: the peer already holds as many as allowed");
                conn.close(close::REFUSED, b"too many connections");
                return;
            }
            *n += 1;
        }
        self.track(&conn, &peer, fingerprint, protocol, true);
        metrics.connections_accepted.inc();
        debug!(%remote, %peer, %protocol, version, "accepted connection");
        let Some(route) = routes.get(&protocol) else {
            conn.close(close::REFUSED, b"protocol not served here");
            return;
        };
        if route.send(Accepted { conn, peer }).await.is_err() {
            info!(%remote, %protocol, "connection arrived while shutting down");
        }
    }
}

/// Closes every open connection whose peer a new revocation set refuses,
/// each time the member's set changes, for as long as the endpoint lives.
async fn watch_revocations(
    inner: std::sync::Weak<Inner>,
    mut changes: tokio::sync::watch::Receiver<Arc<RevocationSet>>,
) {
    while changes.changed().await.is_ok() {
        let set = changes.borrow_and_update().clone();
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let own = crate::revocation::fingerprint(inner.creds.cert_der());
        if let Some(r) = set.revoked(&own) {
            error!(revoked_at = r.at, reason = %r.reason, "this member's own certificate is revoked: peers refuse it; issue a new one");
        }
        let doomed: Vec<Live> = {
            let mut live = inner.live.lock().expect("not poisoned");
            let ids: Vec<usize> = live
                .iter()
                .filter(|(_, l)| set.revoked(&l.fingerprint).is_some())
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| live.remove(&id)).collect()
        };
        for l in doomed {
            inner.metrics.refused(l.protocol.as_str(), "revoked");
            warn!(peer = %l.peer, protocol = %l.protocol, remote = %l.conn.remote_address(), "closing connection: the peer's certificate was revoked");
            l.conn.close(close::REFUSED, b"certificate revoked");
        }
        info!(entries = set.len(), digest = %set.digest(), "revocation list in force");
    }
}

/// Whether a handshake failure was the TLS layer refusing the certificate
/// (ours or theirs), as opposed to a timeout or a reset.
/// TLS's `no_application_protocol` alert (120), as QUIC reports it: the
/// two ends offered no ALPN in common, which between members means no
/// protocol version in common.
fn no_common_version(e: &quinn::ConnectionError) -> bool {
    let code = quinn::TransportErrorCode::crypto(120);
    match e {
        quinn::ConnectionError::TransportError(t) => t.code == code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code == code,
        _ => false,
    }
}

fn is_tls_failure(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::TransportError(t) => t.code.to_string().contains("crypto"),
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code.to_string().contains("crypto"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;
    use crate::tls::MeshCa;

    #[cfg(target_os = "linux")]
    #[test]
    fn udp_buffers_are_what_was_asked_for_up_to_the_kernels_ceiling() {
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (rmax, wmax) = (limit("rmem_max"), limit("wmem_max"));
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Asking for nothing gets the kernel's minimum.
        let least = size_udp_buffers(&socket, 0).unwrap();
        // Linux keeps twice the figure allowed, for its bookkeeping, and
        // never less than its minimum.
        for want in [64 << 10, UDP_BUFFER] {
            let (r, w) = size_udp_buffers(&socket, want).unwrap();
            assert_eq!(r, 2 * want.min(rmax), "receive buffer for {want}");
            assert_eq!(w, 2 * want.min(wmax), "send buffer for {want}");
        }
        assert!(least.0 < 2 * (64 << 10), "{least:?}");
    }

    fn node(ca: &MeshCa, name: &str) -> Credentials {
        tls::install_crypto_provider();
        let id = Identity::new(Role::Node, "eu", "s1", name).unwrap();
        Credentials::issue(ca, &id).unwrap()
    }

    fn local() -> SocketAddr {
        ([127, 0, 0, 1], 0).into()
    }

    /// A bulk transfer over loopback (a 65,536-byte MTU) finds datagrams
    /// of up to [`tls::MAX_UDP_PAYLOAD`] and loses none of them: the
    /// batches quinn hands the kernel stay within what one `sendmsg` takes.
    /// With quinn's default bound the MTU stays at 1,452; with a bound of
    /// 8,952 packets were lost (batches refused with `EMSGSIZE`) and quinn
    /// fell back to 1,200. Gossip keeps to 1,452.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bulk_transfers_use_datagrams_as_large_as_the_path_takes_and_lose_none() {
        let ca = MeshCa::generate("t").unwrap();
        let relay = Identity::new(Role::Relay, "eu", "s1", "r1").unwrap();
        let relay = Credentials::issue(&ca, &relay).unwrap();
        let (server, mut routes) =
            MeshEndpoint::bind(relay, local(), &[Protocol::Fetch], Default::default()).unwrap();
        let mut accepted = routes.take(Protocol::Fetch);
        let (client, _) =
            MeshEndpoint::bind(node(&ca, "n1"), local(), &[], Default::default()).unwrap();
        let (conn, _) = client
            .connect(server.local_addr(), Protocol::Fetch)
            .await
            .unwrap();
        const BLOCK: usize = 1 << 20;
        const BLOCKS: usize = 32;
        let serve = tokio::spawn(async move {
            let there = accepted.recv().await.unwrap().conn;
            let (mut send, mut recv) = there.accept_bi().await.unwrap();
            recv.read_to_end(16).await.unwrap();
            let block = bytes::Bytes::from(vec![7u8; BLOCK]);
            for _ in 0..BLOCKS {
                send.write_chunk(block.clone()).await.unwrap();
            }
            send.finish().unwrap();
            send.stopped().await.unwrap();
            there
        });
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"go").await.unwrap();
        send.finish().unwrap();
        let got = recv.read_to_end(BLOCKS * BLOCK).await.unwrap();
        assert_eq!(got.len(), BLOCKS * BLOCK);
        assert!(got.iter().all(|&b| b == 7));
        let there = serve.await.unwrap();
        let path = there.stats().path;
        // Discovery stops within its minimum step (20 bytes) of the bound.
        assert!(
            path.current_mtu > tls::MAX_UDP_PAYLOAD - 20
                && path.current_mtu <= tls::MAX_UDP_PAYLOAD,
            "{path:?}"
        );
        assert!(
            path.lost_packets * 100 < path.sent_packets,
            "more than 1% lost: {path:?}"
        );
        drop(conn);

        // Gossip exchanges small messages with every peer and keeps to an
        // Ethernet path's datagrams, even for a large message.
        let (peer, mut routes) = MeshEndpoint::bind(
            node(&ca, "n2"),
            local(),
            &[Protocol::Gossip],
            Default::default(),
        )
        .unwrap();
        let mut accepted = routes.take(Protocol::Gossip);
        let (conn, _) = client
            .connect(peer.local_addr(), Protocol::Gossip)
            .await
            .unwrap();
        let read = tokio::spawn(async move {
            let there = accepted.recv().await.unwrap().conn;
            let mut recv = there.accept_uni().await.unwrap();
            recv.read_to_end(BLOCKS * BLOCK).await.unwrap().len()
        });
        let mut send = conn.open_uni().await.unwrap();
        send.write_all(&vec![7u8; 4 * BLOCK]).await.unwrap();
        send.finish().unwrap();
        assert_eq!(read.await.unwrap(), 4 * BLOCK);
        let path = conn.stats().path;
        assert!(path.current_mtu <= tls::ETHERNET_UDP_PAYLOAD, "{path:?}");
        drop(conn);
        client.shutdown().await;
        peer.shutdown().await;
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_settle_on_the_newest_version_both_speak_and_none_in_common_is_refused() {
        let ca = MeshCa::generate("t").unwrap();
        let (server, mut routes) = MeshEndpoint::bind_speaking(
            node(&ca, "a"),
            local(),
            &[Protocol::Gossip],
            Default::default(),
            1..=2,
        )
        .unwrap();
        let mut accepted = routes.take(Protocol::Gossip);
        for (versions, settled) in [(1..=1, 1), (1..=3, 2), (2..=2, 2)] {
            let (client, _) = MeshEndpoint::bind_speaking(
                node(&ca, "b"),
                local(),
                &[],
                Default::default(),
                versions.clone(),
            )
            .unwrap();
            let (conn, _) = client
                .connect(server.local_addr(), Protocol::Gossip)
                .await
                .unwrap();
            assert_eq!(negotiated_version(&conn), Some(settled), "{versions:?}");
            let there = accepted.recv().await.unwrap();
            assert_eq!(negotiated_version(&there.conn), Some(settled));
            client.shutdown().await;
        }
        let (newer, _) =
            MeshEndpoint::bind_speaking(node(&ca, "c"), local(), &[], Default::default(), 3..=4)
                .unwrap();
        match newer.connect(server.local_addr(), Protocol::Gossip).await {
            Err(e @ ConnectError::NoCommonVersion { .. }) => {
                assert!(e.to_string().contains("upgrade the older"), "{e}");
            }
            Err(other) => panic!("expected no common version, got {other}"),
            Ok(_) => panic!("connected with no version in common"),
        }
        newer.shutdown().await;
        server.shutdown().await;
        // Every closed connection added its losses (none, on loopback);
        // the server learns of the last close a moment after it happens.
        let gossip = crate::metrics::ProtocolLabels {
            protocol: Protocol::Gossip.as_str().to_owned(),
        };
        let lost = || {
            let m = server.metrics();
            let lost = m.quic_lost_packets.get(&gossip).map(|c| c.get());
            let cut = m.quic_congestion_events.get(&gossip).map(|c| c.get());
            (lost, cut)
        };
        for _ in 0..500 {
            if lost().0.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(lost(), (Some(0), Some(0)));
    }
}
