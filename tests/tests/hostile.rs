//! Malformed and oversized frames on the gossip and uplink protocols: the
//! receiver closes that connection, logs why, and keeps serving everyone
//! else. The attacker holds valid certificates, so these bytes get past TLS
//! and authorisation and reach the decoders.

use std::time::Duration;

use trellis_node::authz::Protocol;
use trellis_node::endpoint::{MeshEndpoint, close};
use trellis_node::metrics::MeshMetrics;
use trellis_tests::{Mesh, eventually, fleet_site, get_json, serial};

/// A frame whose length prefix claims 64 MiB.
fn oversized() -> Vec<u8> {
    let mut f = (64u32 << 20).to_be_bytes().to_vec();
    f.push(1);
    f.extend_from_slice(&[0xAB; 512]);
    f
}

/// A well-sized frame of the right version holding random junk.
fn garbage() -> Vec<u8> {
    let body: Vec<u8> = (0..200u32).map(|i| (i * 7919 % 251) as u8).collect();
    let mut f = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    f.push(1);
    f.extend_from_slice(&body);
    f
}

/// Connects, writes `bytes` on a new stream and returns how the peer closed
/// the connection.
async fn send_and_wait_close(
    endpoint: &MeshEndpoint,
    addr: std::net::SocketAddr,
    protocol: Protocol,
    bytes: &[u8],
) -> quinn::ConnectionError {
    let (conn, _) = endpoint.connect(addr, protocol).await.unwrap();
    // Gossip (site and federation) reads unidirectional streams; the
    // other protocols start with a bidirectional one.
    if matches!(protocol, Protocol::Gossip | Protocol::Federation) {
        let mut s = conn.open_uni().await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
    } else {
        let (mut s, _r) = conn.open_bi().await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the peer closed the connection")
}

fn closed_for_protocol_error(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close::PROTOCOL_ERROR)
}

#[test]
fn garbage_and_oversized_frames_close_the_connection_and_the_process_keeps_serving() {
    let _serial = serial();
    trellis_node::tls::install_crypto_provider();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    mesh.issue("node", "eu", "par", "par-n1");
    mesh.issue("node", "eu", "par", "par-prober");
    mesh.issue("relay", "eu", "par", "par-relay-prober");
    let (mut hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (mut relay, gossip) = mesh.start_relay("par-relay", &uplink, "");
    let (mut node, _) = mesh.start_node("par-n1", &gossip, "");
    let healthy = || {
        fleet_site(&api, "par").is_some_and(|(_, r)| {
            r["nodes_alive"] == 1
                && r["status"] == "healthy"
                && r["last_seen_s"].as_u64() < Some(10)
        })
    };
    assert!(
        eventually(Duration::from_secs(30), healthy),
        "mesh never became healthy"
    );

    let gossip_addr = gossip.parse().unwrap();
    let uplink_addr = uplink.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let local = "127.0.0.1:0".parse().unwrap();
        let (as_node, _) =
            MeshEndpoint::bind(mesh.creds("par-prober"), local, &[], MeshMetrics::default())
                .unwrap();
        let (as_relay, _) = MeshEndpoint::bind(
            mesh.creds("par-relay-prober"),
            local,
            &[],
            MeshMetrics::default(),
        )
        .unwrap();
        for (name, bytes) in [("garbage", garbage()), ("oversized", oversized())] {
            let e = send_and_wait_close(&as_node, gossip_addr, Protocol::Gossip, &bytes).await;
            assert!(closed_for_protocol_error(&e), "gossip {name}: {e}");
            let e = send_and_wait_close(&as_relay, uplink_addr, Protocol::Uplink, &bytes).await;
            assert!(closed_for_protocol_error(&e), "uplink {name}: {e}");
        }
        as_node.shutdown().await;
        as_relay.shutdown().await;
    });

    // Each receiver said why it closed the connection.
    let relay_log = relay.log().join("\n");
    assert_eq!(
        relay_log
            .matches("closing gossip connection: peer sent a bad message")
            .count(),
        2,
        "{relay_log}"
    );
    assert!(relay_log.contains("exceeds the limit"), "{relay_log}");
    let hub_log = hub.log().join("\n");
    assert_eq!(
        hub_log
            .matches("closing uplink: relay sent a bad message")
            .count(),
        2,
        "{hub_log}"
    );
    // And everyone keeps serving: processes up, the site healthy and fresh,
    // drill-down through the relay still answered.
    assert!(hub.is_running() && relay.is_running() && node.is_running());
    std::thread::sleep(Duration::from_secs(6));
    assert!(healthy(), "{:?}", fleet_site(&api, "par"));
    let nodes = get_json(&format!("{api}/api/v1/sites/par/nodes")).unwrap();
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 2, "{nodes}");
    let metrics = trellis_tests::http_get(&format!("{api}/metrics"))
        .unwrap()
        .1;
    assert!(
        metrics.contains(
            r#"trellis_peer_protocol_errors_total{protocol="uplink",kind="too_large"} 1"#
        ),
        "{metrics}"
    );
}

/// Slow clients (slowloris): connections to the hub's API that send
/// nothing, or a header line now and then, and a relay that opens its
/// uplink and trickles its hello a byte at a time. The hub closes each of
/// them once its time is up, logs why, and keeps serving the API and the
/// real relay meanwhile.
#[test]
fn slow_clients_on_the_api_and_the_uplink_are_closed_and_the_hub_keeps_serving() {
    use std::io::{Read, Write};
    let _serial = serial();
    trellis_node::tls::install_crypto_provider();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    mesh.issue("relay", "eu", "ber", "ber-relay-slow");
    let (mut hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (relay, _gossip) = mesh.start_relay("par-relay", &uplink, "");
    let connected =
        || fleet_site(&api, "par").is_some_and(|(_, r)| r["last_seen_s"].as_u64() < Some(10));
    assert!(
        eventually(Duration::from_secs(30), connected),
        "the relay never reported"
    );

    // 100 slow API clients: half send nothing, half a header line a second.
    let api_addr: std::net::SocketAddr = api.trim_start_matches("http://").parse().unwrap();
    let mut slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(api_addr).unwrap())
        .collect();
    for s in slow.iter_mut().skip(50) {
        s.write_all(b"GET /api/v1/fleet HTTP/1.1\r\nhost: x\r\n")
            .unwrap();
    }
    // The uplink: a relay's certificate, its control stream, the first
    // bytes of a hello and then one byte a second.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let uplink_addr = uplink.parse().unwrap();
    let trickle = rt.spawn({
        let creds = mesh.creds("ber-relay-slow");
        async move {
            let (endpoint, _) = MeshEndpoint::bind(
                creds,
                "127.0.0.1:0".parse().unwrap(),
                &[],
                MeshMetrics::default(),
            )
            .unwrap();
            let (conn, _) = endpoint
                .connect(uplink_addr, Protocol::Uplink)
                .await
                .unwrap();
            let (mut send, _recv) = conn.open_bi().await.unwrap();
            let started = std::time::Instant::now();
            let mut sent = 0;
            for byte in [
                0u8, 0, 0, 40, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ] {
                if conn.close_reason().is_some() || send.write_all(&[byte]).await.is_err() {
                    break;
                }
                sent += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
            (closed, started.elapsed(), sent)
        }
    });

    // Meanwhile the API answers, again and again.
    for _ in 0..5 {
        let answer = trellis_tests::http_get(&format!("{api}/api/v1/fleet"));
        assert_eq!(
            answer.map(|(code, _)| code),
            Some(200),
            "the API stopped answering"
        );
        for s in slow.iter_mut().skip(50) {
            let _ = s.write_all(b"x-slow: 1\r\n");
        }
        std::thread::sleep(Duration::from_secs(1));
    }

    // The uplink's slow starter is closed within the hub's 5 s, having
    // sent only part of its hello.
    let (closed, after, sent) = rt.block_on(trickle).unwrap();
    let closed = closed.expect("the hub never closed the trickling uplink");
    assert!(closed_for_protocol_error(&closed), "{closed}");
    assert!(
        sent < 20,
        "the whole hello went through ({sent} bytes in {after:?})"
    );
    assert!(
        hub.wait_line(
            "closing uplink: relay too slow to start",
            Duration::from_secs(5)
        )
        .is_some(),
        "the hub did not say why it closed the uplink"
    );

    // Every slow API client is closed within the 10 s header timeout (and
    // a few seconds of slack), the trickling ones still trickling.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for (i, s) in slow.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        if i >= 50 {
            let _ = s.write_all(b"x-slow: 1\r\n");
        }
        let mut buf = [0u8; 512];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "slow API client {i} was still open after 20 s");
    }
    assert_eq!(
        trellis_tests::http_get(&format!("{api}/api/v1/fleet")).map(|(code, _)| code),
        Some(200)
    );
    assert!(connected(), "the real relay lost its uplink");
    drop(relay);
    assert!(hub.is_running());
}
