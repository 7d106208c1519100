//! The QUIC endpoint's limit on connections per peer: one certificate may
//! hold [`MAX_CONNECTIONS_PER_PEER`] connections open to a member for one
//! protocol; the next is refused, others are not affected, and a closed
//! connection frees its place.

use std::time::Duration;

use trellis_node::authz::Protocol;
use trellis_node::endpoint::{MAX_CONNECTIONS_PER_PEER, MeshEndpoint, close};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::MeshMetrics;
use trellis_node::tls::{Credentials, MeshCa};

fn creds(ca: &MeshCa, role: Role, name: &str) -> Credentials {
    Credentials::issue(ca, &Identity::new(role, "eu", "par", name).unwrap()).unwrap()
}

fn bind(creds: Credentials, serve: &[Protocol]) -> (MeshEndpoint, trellis_node::endpoint::Routes) {
    MeshEndpoint::bind(
        creds,
        "127.0.0.1:0".parse().unwrap(),
        serve,
        MeshMetrics::default(),
    )
    .unwrap()
}

/// Whether the server refused `conn` (closed it with `REFUSED` within 2 s).
async fn refused(conn: &quinn::Connection) -> bool {
    match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => c.error_code == close::REFUSED,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_past_its_connection_limit_is_refused_and_others_are_not() {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let (relay, mut routes) = bind(creds(&ca, Role::Relay, "relay"), &[Protocol::Fetch]);
    let mut accepted = routes.take(Protocol::Fetch);
    let addr = relay.local_addr();
    let (greedy, _) = bind(creds(&ca, Role::Node, "greedy"), &[]);
    let (other, _) = bind(creds(&ca, Role::Node, "other"), &[]);

    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_PEER {
        let (conn, _) = greedy.connect(addr, Protocol::Fetch).await.unwrap();
        let server_side = tokio::time::timeout(Duration::from_secs(5), accepted.recv())
            .await
            .expect("accepted")
            .expect("the relay is up");
        held.push((conn, server_side));
    }
    let (extra, _) = greedy.connect(addr, Protocol::Fetch).await.unwrap();
    assert!(
        refused(&extra).await,
        "connection {} was accepted",
        MAX_CONNECTIONS_PER_PEER + 1
    );

    // Another node is not affected.
    let (theirs, _) = other.connect(addr, Protocol::Fetch).await.unwrap();
    assert!(!refused(&theirs).await, "another peer was refused");
    accepted.recv().await.expect("the other peer's connection");

    // Closing one frees its place.
    let (first, _) = held.remove(0);
    first.close(close::DONE, b"done");
    let mut again = false;
    for _ in 0..20 {
        let (conn, _) = greedy.connect(addr, Protocol::Fetch).await.unwrap();
        if !refused(&conn).await {
            again = true;
            break;
        }
    }
    assert!(again, "the peer's place was never freed");
}
