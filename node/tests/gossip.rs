//! Site gossip over real QUIC on 127.0.0.1: members of a site find each
//! other; certificates of another site or another CA are refused.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trellis_node::agent::NodeAgent;
use trellis_node::config::{GossipConfig, MetricsConfig, NodeConfig};
use trellis_node::id::{Identity, Role};
use trellis_node::tls::{Credentials, MeshCa};

mod common;
use common::{eventually, metrics_text};

fn node_config(seeds: Vec<std::net::SocketAddr>) -> NodeConfig {
    let mut gossip = GossipConfig::with_listen("127.0.0.1:0".parse().unwrap());
    gossip.seeds = seeds;
    gossip.interval = Duration::from_millis(200);
    NodeConfig {
        gossip,
        metrics: MetricsConfig::with_listen("127.0.0.1:0".parse().unwrap()),
        ..NodeConfig::default()
    }
}

fn creds(ca: &MeshCa, site: &str, name: &str) -> Credentials {
    Credentials::issue(ca, &Identity::new(Role::Node, "eu", site, name).unwrap()).unwrap()
}

async fn alive_names(agent: &NodeAgent) -> Vec<String> {
    let view = agent.gossip().view().await;
    view.current_members()
        .into_iter()
        .filter(|m| m.alive)
        .map(|m| m.name.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_site_see_each_other_alive() {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let shutdown = CancellationToken::new();
    let first = NodeAgent::start(
        creds(&ca, "par", "n0"),
        node_config(vec![]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let seed = first.gossip_addr();
    let mut agents = vec![first];
    for i in 1..4 {
        agents.push(
            NodeAgent::start(
                creds(&ca, "par", &format!("n{i}")),
                node_config(vec![seed]),
                shutdown.clone(),
            )
            .await
            .unwrap(),
        );
    }
    let all_see_all = eventually(Duration::from_secs(15), || async {
        for a in &agents {
            if alive_names(a).await.len() != 4 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(all_see_all, "members did not converge");
    let text = metrics_text(&agents[1]).await;
    assert!(text.contains("trellis_gossip_sent_bytes_total"), "{text}");
    shutdown.cancel();
    for a in agents {
        a.stopped().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_site_view_is_reused_until_a_key_changes_and_never_stale() {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let shutdown = CancellationToken::new();
    let agent = NodeAgent::start(
        creds(&ca, "par", "n0"),
        node_config(vec![]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let gossip = agent.gossip();
    // Two views with no key change in between are one (the member's own
    // health may change a key at any moment, hence the retries).
    let reused = eventually(Duration::from_secs(10), || async {
        let (a, b) = (gossip.view().await, gossip.view().await);
        std::sync::Arc::ptr_eq(&a, &b)
    })
    .await;
    assert!(reused, "the view was built again with nothing changed");
    // A key set is in the very next view.
    for value in ["blue", "green"] {
        let before = gossip.view().await;
        gossip
            .set(vec![("label:colour".into(), value.into())], "")
            .await;
        let after = gossip.view().await;
        assert!(!std::sync::Arc::ptr_eq(&before, &after));
        let me = after.members.iter().find(|m| m.name == "n0").unwrap();
        assert_eq!(me.labels.get("colour").map(String::as_str), Some(value));
    }
    shutdown.cancel();
    agent.stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sites_certificate_and_a_foreign_ca_are_refused() {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let foreign = MeshCa::generate("foreign").unwrap();
    let shutdown = CancellationToken::new();
    let member = NodeAgent::start(
        creds(&ca, "par", "n0"),
        node_config(vec![]),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let seed = member.gossip_addr();
    let intruders = [
        NodeAgent::start(
            creds(&ca, "ber", "x1"),
            node_config(vec![seed]),
            shutdown.clone(),
        )
        .await
        .unwrap(),
        NodeAgent::start(
            creds(&foreign, "par", "x2"),
            node_config(vec![seed]),
            shutdown.clone(),
        )
        .await
        .unwrap(),
    ];
    // Both intruders keep trying every round; wait until the member has
    // refused each kind at least once, then check nobody got in.
    let refused = eventually(Duration::from_secs(15), || async {
        let text = metrics_text(&member).await;
        text.contains(r#"trellis_connection_refusals_total{protocol="gossip",reason="wrong_site"}"#)
            && text
                .contains(r#"trellis_connection_refusals_total{protocol="unknown",reason="tls"}"#)
    })
    .await;
    assert!(refused, "{}", metrics_text(&member).await);
    assert_eq!(alive_names(&member).await, vec!["n0".to_owned()]);
    for i in &intruders {
        let names: Vec<String> = i
            .gossip()
            .view()
            .await
            .members
            .iter()
            .map(|m| m.name.clone())
            .collect();
        assert!(
            !names.contains(&"n0".to_owned()),
            "intruder learned {names:?}"
        );
    }
    shutdown.cancel();
    member.stopped().await;
    for i in intruders {
        i.stopped().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_a_dead_peer_returns_at_once_and_drops_the_oldest() {
    use chitchat::ChitchatMessage;
    use chitchat::transport::Transport;
    use trellis_node::authz::Protocol;
    use trellis_node::endpoint::MeshEndpoint;
    use trellis_node::gossip::QuicTransport;
    use trellis_node::metrics::{DropLabels, MeshMetrics};

    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let metrics = MeshMetrics::default();
    let (endpoint, mut routes) = MeshEndpoint::bind(
        creds(&ca, "par", "n0"),
        "127.0.0.1:0".parse().unwrap(),
        &[Protocol::Gossip],
        metrics.clone(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let transport = QuicTransport::start(
        endpoint.clone(),
        Protocol::Gossip,
        routes.take(Protocol::Gossip),
        shutdown.clone(),
    );
    let mut socket = transport.open(endpoint.local_addr()).await.unwrap();
    // A socket that never answers: a handshake with it can only time out
    // (after HANDSHAKE_TIMEOUT, 10 s), so a send that waited for it could not
    // finish 1,000 times.
    let blackhole = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dead = blackhole.local_addr().unwrap();
    let sends = async {
        for _ in 0..1000 {
            socket
                .send(dead, ChitchatMessage::BadCluster)
                .await
                .unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(4), sends)
        .await
        .expect("sends returned without waiting for the peer");
    let dropped = metrics
        .gossip_dropped
        .get_or_create(&DropLabels {
            reason: "queue_full".into(),
        })
        .get();
    assert!(dropped >= 1000 - 8 - 1, "only {dropped} dropped");
    assert_eq!(metrics.gossip_messages_sent.get(), 0);
    shutdown.cancel();
    endpoint.shutdown().await;
}

/// chitchat's bytes of a Syn whose digest names `n` members, each at
/// heartbeat `hb` and max version `max(i)`.
fn syn(n: usize, hb: u64, max: impl Fn(usize) -> u64) -> chitchat::ChitchatMessage {
    use chitchat::{ChitchatId, ChitchatMessage, Deserializable, Serializable};
    let mut buf = ChitchatMessage::BadCluster.serialize_to_vec();
    buf.pop();
    buf.push(0); // Syn
    (n as u16).serialize(&mut buf);
    for i in 0..n {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 40_000 + i as u16));
        ChitchatId::new(format!("site-1-n{i:03}"), 1_763_800_000_000, addr).serialize(&mut buf);
        for v in [hb + i as u64 % 3, 0, max(i)] {
            v.serialize(&mut buf);
        }
    }
    "eu/par".to_owned().serialize(&mut buf);
    ChitchatMessage::deserialize(&mut &buf[..]).expect("a well-formed Syn")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_two_protocol_versions_gossip_each_in_what_the_other_reads() {
    use chitchat::transport::Transport;
    use chitchat::{ChitchatMessage, Deserializable, Serializable};
    use trellis_node::authz::{PROTOCOL_VERSION, Protocol};
    use trellis_node::endpoint::MeshEndpoint;
    use trellis_node::gossip::QuicTransport;
    use trellis_node::metrics::MeshMetrics;

    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let shutdown = CancellationToken::new();
    // An older member that speaks only version 1, and two of this build.
    let mut members = Vec::new();
    for (name, versions) in [
        ("old", 1..=1),
        ("new1", 1..=PROTOCOL_VERSION),
        ("new2", 1..=PROTOCOL_VERSION),
    ] {
        let metrics = MeshMetrics::default();
        let (endpoint, mut routes) = MeshEndpoint::bind_speaking(
            creds(&ca, "par", name),
            "127.0.0.1:0".parse().unwrap(),
            &[Protocol::Gossip],
            metrics.clone(),
            versions,
        )
        .unwrap();
        let transport = QuicTransport::start(
            endpoint.clone(),
            Protocol::Gossip,
            routes.take(Protocol::Gossip),
            shutdown.clone(),
        );
        let socket = transport.open(endpoint.local_addr()).await.unwrap();
        members.push((endpoint, socket, metrics));
    }
    let addrs: Vec<_> = members.iter().map(|m| m.0.local_addr()).collect();
    let (old, new1) = (addrs[0], addrs[1]);
    // The same digests, a third of whose members change keys between
    // rounds, from new1 to the old member, then from new2 to new1.
    let rounds: Vec<_> = (0..6u64)
        .map(|r| {
            syn(60, 1_000 + 25 * r, move |i| 40 + r * u64::from(i % 3 == 0)).serialize_to_vec()
        })
        .collect();
    let mut sent_bytes = Vec::new();
    for (from, to) in [(1, old), (2, new1)] {
        let before = members[from].2.gossip_bytes_sent.get();
        let receiver = addrs.iter().position(|a| *a == to).unwrap();
        for msg in &rounds {
            let message = ChitchatMessage::deserialize(&mut &msg[..]).unwrap();
            members[from].1.send(to, message).await.unwrap();
            let (got_from, got) =
                tokio::time::timeout(Duration::from_secs(10), members[receiver].1.recv())
                    .await
                    .expect("the message arrives")
                    .unwrap();
            assert_eq!(got_from, addrs[from]);
            assert_eq!(&got.serialize_to_vec(), msg);
        }
        sent_bytes.push(members[from].2.gossip_bytes_sent.get() - before);
    }
    // Between two members of this build the changed entries are coded
    // smaller; the old member was sent what it reads (it decoded all).
    assert!(
        sent_bytes[1] < sent_bytes[0],
        "version 2 sent {} B, version 1 {} B",
        sent_bytes[1],
        sent_bytes[0]
    );
    shutdown.cancel();
    for (endpoint, _, _) in members {
        endpoint.shutdown().await;
    }
}
