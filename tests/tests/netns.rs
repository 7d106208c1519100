//! The WAN link between a relay and its hub really goes down: the hub runs
//! in one network namespace, the site (relay and nodes) in another, joined
//! by a veth pair whose link is set down and up. Needs CAP_NET_ADMIN; the
//! test says why and passes without running when it does not have it.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::netns::NetPair;
use trellis_tests::{Mesh, eventually, run_in, serial};

const SITE: &str = "par";

fn fleet(ns: &str, api: &str) -> Option<Value> {
    let o = run_in(Some(ns), "trellis", &["status", "--hub", api, "--json"]);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn site_row(ns: &str, api: &str) -> Option<Value> {
    fleet(ns, api)?["sites"]
        .as_array()?
        .iter()
        .find(|s| s["site"] == SITE)
        .cloned()
}

/// The relay's buffer, read straight from its file (the relay's own API is
/// on the far side of the link the test cuts).
fn buffer_state(path: &std::path::Path) -> Option<(u64, u64)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    let next: i64 = conn
        .query_row("SELECT value FROM meta WHERE key = 'next_seq'", [], |r| {
            r.get(0)
        })
        .ok()?;
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
        .ok()?;
    Some((next as u64 - 1, rows as u64))
}

#[test]
fn a_site_behind_a_link_that_goes_down_catches_up_completely_when_it_returns() {
    let _serial = serial();
    let Some(pair) = NetPair::for_test() else {
        return;
    };
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", SITE, "par-relay");
    for i in 0..3 {
        mesh.issue("node", "eu", SITE, &format!("par-n{i}"));
    }
    mesh.set_netns(Some(&pair.a));
    let (_hub, uplink, api) = mesh.start_hub(
        "hub-1",
        &format!(
            "[uplink]\nlisten = \"{}:0\"\nsilence_timeout = \"3s\"\n[fleet]\nstale_after = \"5s\"\n",
            pair.addr_a
        ),
    );
    assert!(uplink.starts_with(&pair.addr_a.to_string()), "{uplink}");
    mesh.set_netns(Some(&pair.b));
    let (relay, gossip) = mesh.start_relay(
        "par-relay",
        &uplink,
        // One endpoint for the site (loopback) and the WAN (the veth): a
        // wildcard bind, announcing the loopback address to the site.
        "[gossip]\nlisten = \"0.0.0.0:0\"\nadvertise = \"127.0.0.1:0\"\n[uplink]\nsummary_interval = \"1s\"\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n[buffer]\nkeep_acked = \"0s\"\n",
    );
    let mut nodes: Vec<_> = (0..3)
        .map(|i| mesh.start_node(&format!("par-n{i}"), &gossip, "").0)
        .collect();
    let alive = eventually(Duration::from_secs(60), || {
        site_row(&pair.a, &api).is_some_and(|r| r["nodes_alive"] == 3 && r["nodes_dead"] == 0)
    });
    assert!(
        alive,
        "{:?}\n{:?}\nrelay: {}\nhub: {}",
        site_row(&pair.a, &api),
        run_in(
            Some(&pair.a),
            "trellis",
            &["status", "--hub", &api, "--json"]
        ),
        relay.log().join("\n"),
        _hub.log().join("\n")
    );

    pair.link_b(false);
    let cut = eventually(Duration::from_secs(20), || {
        site_row(&pair.a, &api).is_some_and(|r| r["status"] == "unreachable")
    });
    assert!(cut, "the hub never saw the site cut off");
    nodes[1].kill9();
    let buffer = mesh.path().join("par-relay/outage.db");
    let piled_up = eventually(Duration::from_secs(30), || {
        buffer_state(&buffer).is_some_and(|(_, rows)| rows > 10)
    });
    assert!(
        piled_up,
        "records piled up in the relay's buffer during the outage"
    );

    pair.link_b(true);
    let current = eventually(Duration::from_secs(30), || {
        site_row(&pair.a, &api).is_some_and(|r| r["nodes_dead"] == 1 && r["status"] == "degraded")
    });
    assert!(current, "{:?}", site_row(&pair.a, &api));
    let mut last = None;
    let drained = eventually(Duration::from_secs(30), || {
        last = buffer_state(&buffer);
        last.is_some_and(|(_, rows)| rows == 0)
    });
    assert!(drained, "the relay still holds records: {last:?}");
    let (through, _) = last.unwrap();

    let o = run_in(
        Some(&pair.a),
        "trellis",
        &[
            "history", SITE, "--hub", &api, "--since", "1h", "--limit", "10000", "--json",
        ],
    );
    assert!(o.status.success(), "{o:?}");
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut seqs: Vec<(u64, u64)> = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["until"].as_u64().unwrap()))
        .collect();
    seqs.sort();
    let mut next = 1;
    for (seq, until) in &seqs {
        assert_eq!(*seq, next, "hole or duplicate at {seq}");
        next = until + 1;
    }
    assert_eq!(
        next - 1,
        through,
        "the hub has every record the relay persisted"
    );
    let died = h["records"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["body"]["Event"]["NodeDied"]["node"] == "par-n1");
    assert!(died, "the death during the outage reached the hub");
}
