//! The audit trail with real hub processes: operator writes are chained
//! and verify on every hub; a store tampered with while its hub is stopped
//! fails `trellis audit verify` with each hub and seq concerned, the hub
//! refuses to take back entries that do not follow what it holds, and the
//! other hub still verifies and keeps the originals.

use std::time::Duration;

use serde_json::Value;
use trellis_hub::log::{Entry, entry_hash};
use trellis_tests::{Mesh, eventually, field, run, serial};

fn extra(peers: &[&str]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[federation]\npeers = [{}]\ninterval = \"200ms\"\n[replication]\nanti_entropy_every = \"1s\"\n",
        peers.join(", ")
    )
}

fn json(args: &[&str]) -> Option<Value> {
    let o = run("trellis", args);
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn alive_hubs(api: &str) -> usize {
    json(&["hubs", "--hub", api, "--json"]).map_or(0, |v| {
        v["hubs"]
            .as_array()
            .map_or(0, |h| h.iter().filter(|h| h["alive"] == true).count())
    })
}

fn trail(api: &str, origin: Option<&str>) -> Vec<Value> {
    let mut args = vec!["audit", "log", "--hub", api, "--json"];
    if let Some(o) = origin {
        args.extend(["--origin", o]);
    }
    json(&args)
        .and_then(|v| v["entries"].as_array().cloned())
        .unwrap_or_default()
}

fn set(api: &str, key: &str, value: &str) {
    let o = run(
        "trellis",
        &["desired", "set", key, value, "--as", "test", "--hub", api],
    );
    assert!(o.status.success(), "desired set {key}: {o:?}");
}

/// `(origin, seq, kind)` of each problem `trellis audit verify --json`
/// reports, and its exit code.
fn problems(api: &str) -> (Option<i32>, Vec<(String, u64, String)>) {
    let o = run("trellis", &["audit", "verify", "--hub", api, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("audit verify --json: {e}: {o:?}"));
    let found = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["origin"].as_str().unwrap().to_owned(),
                p["seq"].as_u64().unwrap(),
                p["what"]["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (o.status.code(), found)
}

#[test]
fn trellis_audit_verify_names_each_entry_tampered_with_in_a_stopped_hubs_store() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("hub", "eu", "", "hub-2");
    let (mut hub1, uplink1, api1) = mesh.start_hub("hub-1", &extra(&[]));
    let (_hub2, uplink2, api2) = mesh.start_hub("hub-2", &extra(&[&uplink1]));
    assert!(
        eventually(Duration::from_secs(20), || alive_hubs(&api1) == 2
            && alive_hubs(&api2) == 2),
        "the hubs never saw each other"
    );

    // Three writes through hub-1, one through hub-2, each acknowledged by
    // both hubs.
    for (key, value) in [("motd", "hello"), ("color", "blue"), ("size", "3")] {
        set(&api1, key, value);
    }
    set(&api2, "motd", "bonjour");
    for api in [&api1, &api2] {
        assert!(
            eventually(Duration::from_secs(20), || trail(api, None).len() == 4),
            "{api} never held the 4 entries: {:?}",
            trail(api, None)
        );
        let o = run("trellis", &["audit", "verify", "--hub", api]);
        assert_eq!(o.status.code(), Some(0), "{o:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("the management log is intact: 4 entries (hub-1 3, hub-2 1)"),
            "{out}"
        );
    }
    let original = trail(&api2, Some("hub-1"));

    // Stop hub-1 and tamper with its store as someone with sqlite3 would.
    let status = hub1.terminate(Duration::from_secs(10));
    assert!(status.is_some(), "hub-1 did not stop");
    let db = mesh.path().join("hub-1/hub.db");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        // 1. A readable column of hub-2's entry.
        let edited = conn
            .execute(
                "UPDATE log SET op = 'put motd=pwned' WHERE origin = 'hub-2' AND seq = 1",
                [],
            )
            .unwrap();
        // 2. hub-1's first entry rewritten inside the signed bytes, with
        //    its author and hash columns made to match.
        let (blob, signature): (Vec<u8>, Vec<u8>) = conn
            .query_row(
                "SELECT entry, signature FROM log WHERE origin = 'hub-1' AND seq = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let mut entry: Entry = postcard::from_bytes(&blob).unwrap();
        assert_eq!(entry.author, "test");
        entry.author = "mallory".into();
        let forged = entry.signing_bytes();
        let hash = entry_hash(&forged, &signature);
        let rewritten = conn
            .execute(
                "UPDATE log SET entry = ?1, author = 'mallory', hash = ?2
                 WHERE origin = 'hub-1' AND seq = 1",
                rusqlite::params![forged, hash.as_slice()],
            )
            .unwrap();
        // 3. hub-1's second entry removed.
        let deleted = conn
            .execute("DELETE FROM log WHERE origin = 'hub-1' AND seq = 2", [])
            .unwrap();
        assert_eq!(
            (edited, rewritten, deleted),
            (1, 1, 1),
            "the store was tampered with"
        );
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3);
    }

    // hub-1 starts again on the tampered store (on new ports: it finds
    // hub-2 through its address).
    let (mut hub1, _, api1) = mesh.start_hub("hub-1", &extra(&[&uplink2]));
    // hub-2 holds hub-1's entry 2, but it follows the original entry 1, not
    // the forged one: hub-1 refuses it rather than patch over the forgery.
    let refused = hub1
        .wait_line("does not follow", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("hub-1 never refused an entry: {}", hub1.log().join("\n")));
    assert_eq!(
        field(&refused, "origin").as_deref(),
        Some("hub-1"),
        "{refused}"
    );
    assert_eq!(field(&refused, "seq").as_deref(), Some("2"), "{refused}");

    let o = run("trellis", &["audit", "verify", "--hub", &api1]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    for line in [
        "hub-1 seq 1: signature does not match — the entry was altered",
        "hub-1: seq 2 missing between 1 and 3 — removed",
        "hub-2 seq 1: column op says \"put motd=pwned\" but the signed entry says \"put motd=bonjour\"",
        "hub-1: 3 problems",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    let (code, found) = problems(&api1);
    assert_eq!(code, Some(1));
    assert_eq!(
        found,
        [
            ("hub-1", 1, "signature"),
            ("hub-1", 2, "missing"),
            ("hub-2", 1, "column")
        ]
        .map(|(o, s, k)| (o.to_owned(), s, k.to_owned()))
    );

    // The other hub is intact and still holds the originals.
    let (code, found) = problems(&api2);
    assert_eq!((code, found), (Some(0), vec![]));
    assert_eq!(trail(&api2, Some("hub-1")), original);
    assert_eq!(original[0]["author"], "test");
    assert_eq!(original[1]["seq"], 2);
}
