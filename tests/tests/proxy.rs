//! The fault-injection UDP proxy, with real sockets on 127.0.0.1: each fault
//! does what it says, the counters show it fired, and QUIC still gets
//! through a lossy, slow link.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use trellis_node::authz::Protocol;
use trellis_node::endpoint::{Accepted, MeshEndpoint, close};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::MeshMetrics;
use trellis_node::tls::{Credentials, MeshCa, install_crypto_provider};
use trellis_tests::eventually;
use trellis_tests::proxy::{Direction, UdpProxy};

/// Largest UDP payload over IPv4.
const MAX_PAYLOAD: usize = 65_507;

/// An upstream that echoes every datagram and remembers who sent it.
struct Echo {
    addr: SocketAddr,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        Echo::on("127.0.0.1:0".parse().unwrap())
    }

    fn on(addr: SocketAddr) -> Echo {
        let socket = UdpSocket::bind(addr).expect("bind echo");
        // Short reads so the thread notices the stop flag promptly.
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let sources = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sources, stop) = (sources.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        sources.lock().unwrap().push(from);
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Echo {
            addr,
            sources,
            stop,
            thread: Some(thread),
        }
    }

    fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client socket whose reads give up after `timeout`.
fn socket(timeout: Duration) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s
}

/// Sends `msg` to `to` and waits for one datagram back.
fn roundtrip(client: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    client.send_to(msg, to).unwrap();
    let mut buf = vec![0u8; 65_536];
    client.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
}

/// Every datagram `socket` receives until none comes for its read timeout
/// or `limit` passes.
fn drain(socket: &UdpSocket, limit: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => got.push(buf[..n].to_vec()),
            Err(_) => break,
        }
    }
    got
}

/// Collects what `socket` receives on a thread of its own, so it reads
/// while the test sends; see [`drain`] for when it stops.
fn drain_in_background(socket: UdpSocket, limit: Duration) -> JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || drain(&socket, limit))
}

/// Sends `count` datagrams numbered from 0 (big-endian u32), pausing now
/// and then so no kernel buffer on loopback overflows: any loss the test
/// sees is then the proxy's.
fn send_numbered(client: &UdpSocket, to: SocketAddr, count: u32) {
    for i in 0..count {
        client.send_to(&i.to_be_bytes(), to).unwrap();
        if i % 10 == 9 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn number(d: &[u8]) -> u32 {
    u32::from_be_bytes(d.try_into().expect("a numbered datagram"))
}

#[test]
fn datagrams_and_replies_pass_both_ways_through_the_proxy() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    let client = socket(Duration::from_secs(2));

    assert_eq!(
        roundtrip(&client, proxy.listen_addr(), b"hello").as_deref(),
        Some(&b"hello"[..])
    );
    let big: Vec<u8> = (0..MAX_PAYLOAD).map(|i| (i % 251) as u8).collect();
    assert_eq!(roundtrip(&client, proxy.listen_addr(), &big), Some(big));

    let stats = proxy.stats();
    assert_eq!((stats.forwarded_up, stats.forwarded_down), (2, 2));
    let sources = echo.sources();
    assert_eq!(sources.len(), 2);
    assert_eq!(sources[0], sources[1], "one upstream socket per client");
    assert_ne!(sources[0], client.local_addr().unwrap());
}

#[test]
fn a_blackholed_link_delivers_nothing_until_restored() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    let client = socket(Duration::from_millis(300));
    assert!(roundtrip(&client, proxy.listen_addr(), b"before").is_some());

    proxy.blackhole(true);
    for _ in 0..5 {
        client.send_to(b"lost", proxy.listen_addr()).unwrap();
    }
    assert!(drain(&client, Duration::from_secs(1)).is_empty());
    assert!(eventually(Duration::from_secs(5), || proxy
        .stats()
        .dropped_blackhole
        == 5));
    assert!(echo.sources().len() == 1, "nothing reached the upstream");

    proxy.blackhole(false);
    let client = socket(Duration::from_secs(2));
    assert_eq!(
        roundtrip(&client, proxy.listen_addr(), b"after").as_deref(),
        Some(&b"after"[..])
    );
}

#[test]
fn a_one_way_blackhole_lets_requests_through_and_drops_the_replies() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    proxy.blackhole_direction(Direction::Down, true);
    let client = socket(Duration::from_millis(500));

    assert_eq!(roundtrip(&client, proxy.listen_addr(), b"ping"), None);
    assert!(eventually(Duration::from_secs(5), || proxy
        .stats()
        .dropped_blackhole
        == 1));
    assert_eq!(echo.sources().len(), 1, "the request got through");
    assert_eq!(proxy.stats().forwarded_up, 1);
    assert_eq!(proxy.stats().forwarded_down, 0);
}

#[test]
fn thirty_percent_loss_drops_about_thirty_percent_of_datagrams() {
    let sink = socket(Duration::from_secs(1));
    let proxy = UdpProxy::with_seed(sink.local_addr().unwrap(), 42).unwrap();
    proxy.set_loss(0.3);
    let client = socket(Duration::from_secs(1));

    let received = drain_in_background(sink, Duration::from_secs(20));
    send_numbered(&client, proxy.listen_addr(), 2000);
    let got = received.join().unwrap();

    let stats = proxy.stats();
    assert_eq!(
        stats.forwarded_up + stats.dropped_loss,
        2000,
        "the proxy judged every datagram: {stats:?}"
    );
    assert!(
        (400..=800).contains(&stats.dropped_loss),
        "dropped {} of 2000",
        stats.dropped_loss
    );
    assert_eq!(got.len() as u64, stats.forwarded_up);
}

#[test]
fn the_same_seed_loses_the_same_datagrams() {
    let through = |seed| {
        let sink = socket(Duration::from_secs(1));
        let proxy = UdpProxy::with_seed(sink.local_addr().unwrap(), seed).unwrap();
        proxy.set_loss(0.5);
        let received = drain_in_background(sink, Duration::from_secs(10));
        send_numbered(&socket(Duration::from_secs(1)), proxy.listen_addr(), 200);
        let got: BTreeSet<u32> = received.join().unwrap().iter().map(|d| number(d)).collect();
        assert!(proxy.stats().dropped_loss > 0);
        got
    };
    let first = through(7);
    assert_eq!(first, through(7));
    assert_ne!(first, through(8));
}

#[test]
fn delayed_datagrams_arrive_no_earlier_than_the_delay() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    let delay = Duration::from_millis(300);
    proxy.set_delay(delay);
    proxy.set_jitter(Duration::from_millis(50));
    let client = socket(Duration::from_secs(10));

    let start = Instant::now();
    assert!(roundtrip(&client, proxy.listen_addr(), b"slow").is_some());
    let took = start.elapsed();

    // Both directions are delayed by at least delay - jitter.
    assert!(took >= 2 * (delay - Duration::from_millis(50)), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(proxy.stats().delayed, 2);
}

#[test]
fn full_reordering_delivers_every_datagram_some_out_of_order() {
    let sink = socket(Duration::from_secs(1));
    let proxy = UdpProxy::start(sink.local_addr().unwrap()).unwrap();
    proxy.set_reorder(1.0);
    let client = socket(Duration::from_secs(1));

    // An odd count, so the last one has no successor and must come out
    // when its hold runs out.
    let received = drain_in_background(sink, Duration::from_secs(10));
    send_numbered(&client, proxy.listen_addr(), 21);
    let got: Vec<u32> = received.join().unwrap().iter().map(|d| number(d)).collect();

    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..21).collect::<Vec<_>>(), "none lost: {got:?}");
    assert_ne!(got, sorted, "some out of order");
    let stats = proxy.stats();
    assert!(stats.reordered > 0, "{stats:?}");
    assert_eq!(stats.forwarded_up, 21);
}

#[test]
fn two_clients_at_once_each_get_their_own_replies() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    let (a, b) = (
        socket(Duration::from_secs(2)),
        socket(Duration::from_secs(2)),
    );

    // Interleaved, so both flows are open at the same time.
    for i in 0..5u8 {
        a.send_to(&[b'a', i], proxy.listen_addr()).unwrap();
        b.send_to(&[b'b', i], proxy.listen_addr()).unwrap();
    }
    for (client, tag) in [(&a, b'a'), (&b, b'b')] {
        let mut buf = [0u8; 16];
        for i in 0..5u8 {
            let n = client.recv(&mut buf).expect("a reply");
            assert_eq!(&buf[..n], &[tag, i]);
        }
    }

    let distinct: BTreeSet<_> = echo.sources().into_iter().collect();
    assert_eq!(distinct.len(), 2, "the upstream sees one source per client");
    assert_eq!(proxy.stats().forwarded_down, 10);
}

#[test]
fn an_upstream_that_is_down_counts_errors_and_the_proxy_keeps_working() {
    let addr = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = UdpProxy::start(addr).unwrap();
    let client = socket(Duration::from_millis(200));

    assert!(eventually(Duration::from_secs(5), || {
        client.send_to(b"anyone?", proxy.listen_addr()).unwrap();
        proxy.stats().send_errors > 0
    }));

    // The upstream comes back on the same address, like a restarted hub.
    // A datagram sent just before may be echoed first; wait for ours.
    let echo = Echo::on(addr);
    assert!(eventually(Duration::from_secs(5), || {
        roundtrip(&client, proxy.listen_addr(), b"back?").as_deref() == Some(&b"back?"[..])
    }));
    assert!(proxy.stats().forwarded_down > 0);
    drop(echo);
}

#[test]
fn dropping_the_proxy_stops_it_promptly() {
    let echo = Echo::start();
    let proxy = UdpProxy::start(echo.addr).unwrap();
    let listen = proxy.listen_addr();
    let client = socket(Duration::from_millis(300));
    assert!(roundtrip(&client, listen, b"up").is_some());

    let start = Instant::now();
    drop(proxy);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(roundtrip(&client, listen, b"gone?"), None);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connects through the proxy and echoes `payload` on one stream.
async fn echo_through(
    relay: &MeshEndpoint,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, BoxError> {
    let (conn, _) = relay.connect(addr, Protocol::Uplink).await?;
    let echoed = tokio::time::timeout(Duration::from_secs(60), async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(payload).await?;
        send.finish()?;
        Ok::<_, BoxError>(recv.read_to_end(1 << 20).await?)
    })
    .await??;
    conn.close(close::DONE, b"done");
    Ok(echoed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_stream_echo_completes_through_thirty_percent_loss_and_delay() {
    install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let hub_id = Identity::new(Role::Hub, "eu", "", "h").unwrap();
    let relay_id = Identity::new(Role::Relay, "eu", "par", "r").unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();

    let (hub, mut routes) = MeshEndpoint::bind(
        Credentials::issue(&ca, &hub_id).unwrap(),
        any,
        &[Protocol::Uplink],
        MeshMetrics::default(),
    )
    .unwrap();
    let mut accepted = routes.take(Protocol::Uplink);
    let server = tokio::spawn(async move {
        while let Some(Accepted { conn, .. }) = accepted.recv().await {
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(data) = recv.read_to_end(1 << 20).await else {
                        break;
                    };
                    if send.write_all(&data).await.is_err() || send.finish().is_err() {
                        break;
                    }
                }
            });
        }
    });

    let proxy = UdpProxy::with_seed(hub.local_addr(), 3).unwrap();
    proxy.set_loss(0.3);
    proxy.set_delay(Duration::from_millis(200));
    let (relay, _) = MeshEndpoint::bind(
        Credentials::issue(&ca, &relay_id).unwrap(),
        any,
        &[],
        MeshMetrics::default(),
    )
    .unwrap();

    let payload: Vec<u8> = (0..4_096u32).map(|i| (i % 251) as u8).collect();
    // A whole attempt may fail: the hub gives a handshake 5 s, and with
    // this much loss its last flight can go unanswered that long, so it
    // drops a connection the relay already believes is up.
    let mut failures = Vec::new();
    let echoed = loop {
        match echo_through(&relay, proxy.listen_addr(), &payload).await {
            Ok(echoed) => break echoed,
            Err(e) => failures.push(e.to_string()),
        }
        assert!(
            failures.len() < 6,
            "no echo through the proxy: {failures:#?}"
        );
    };
    if !failures.is_empty() {
        eprintln!("echo needed {} retries: {failures:?}", failures.len());
    }
    assert_eq!(echoed, payload);

    let stats = proxy.stats();
    assert!(stats.dropped_loss > 0, "{stats:?}");
    assert!(stats.delayed > 0, "{stats:?}");

    proxy.clear();
    relay.shutdown().await;
    hub.shutdown().await;
    server.abort();
}
