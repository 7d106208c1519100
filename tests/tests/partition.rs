//! A hub cut off from the other two keeps accepting writes (it cannot
//! acknowledge them: no quorum); when the partition heals, every hub holds
//! every entry and derives the same desired state, by the documented rule:
//! for each key the entry with the greatest (hybrid clock, origin, seq)
//! wins. The hubs run in two network namespaces joined by a veth pair whose
//! link is set down; the test says why and passes without running when it
//! lacks CAP_NET_ADMIN.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::netns::NetPair;
use trellis_tests::{Mesh, eventually, run_in, serial};

fn desired(ns: &str, api: &str) -> Option<Value> {
    let o = run_in(
        Some(ns),
        "trellis",
        &["desired", "get", "--hub", api, "--json"],
    );
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

fn alive_hubs(ns: &str, api: &str) -> Option<usize> {
    let o = run_in(Some(ns), "trellis", &["hubs", "--hub", api, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    Some(
        v["hubs"]
            .as_array()?
            .iter()
            .filter(|h| h["alive"] == true)
            .count(),
    )
}

#[test]
fn both_sides_of_a_partition_keep_writing_and_converge_by_the_clock_when_it_heals() {
    let _serial = serial();
    let Some(pair) = NetPair::for_test() else {
        return;
    };
    let mesh = Mesh::new();
    let mut hubs = Vec::new();
    let mut first = String::new();
    for (h, ns, addr) in [
        (1, &pair.a, pair.addr_a),
        (2, &pair.a, pair.addr_a),
        (3, &pair.b, pair.addr_b),
    ] {
        let name = format!("hub-{h}");
        mesh.issue("hub", "eu", "", &name);
        mesh.set_netns(Some(ns));
        let peers = if first.is_empty() {
            String::new()
        } else {
            format!("\"{first}\"")
        };
        let (p, uplink, api) = mesh.start_hub(
            &name,
            &format!(
                "[uplink]\nlisten = \"0.0.0.0:0\"\n[federation]\nadvertise = \"{addr}:0\"\npeers = [{peers}]\n[replication]\nanti_entropy_every = \"1s\"\nwrite_timeout = \"2s\"\n"
            ),
        );
        if first.is_empty() {
            first = format!("{addr}:{}", uplink.rsplit(':').next().unwrap());
        }
        hubs.push((p, ns.clone(), api));
    }
    let all = eventually(Duration::from_secs(30), || {
        hubs.iter()
            .all(|(_, ns, api)| alive_hubs(ns, api) == Some(3))
    });
    assert!(all, "the three hubs never saw each other");

    pair.link_b(false);
    let split = eventually(Duration::from_secs(40), || {
        alive_hubs(&hubs[0].1, &hubs[0].2) == Some(2)
            && alive_hubs(&hubs[2].1, &hubs[2].2) == Some(1)
    });
    assert!(split, "the partition was never seen");

    // The majority side acknowledges; the lone hub keeps the write but
    // cannot acknowledge it.
    let set = |i: usize, value: &str| {
        let (_, ns, api) = &hubs[i];
        run_in(
            Some(ns),
            "trellis",
            &[
                "desired", "set", "mode", value, "--as", "test", "--hub", api,
            ],
        )
    };
    let o = set(0, "majority");
    assert!(o.status.success(), "{o:?}");
    std::thread::sleep(Duration::from_millis(50));
    let o = set(2, "minority");
    assert_eq!(o.status.code(), Some(1), "no quorum on the lone hub: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not acknowledged"), "{err}");
    let lone = desired(&hubs[2].1, &hubs[2].2).unwrap();
    assert_eq!(
        lone["keys"]["mode"]["value"], "minority",
        "kept on the lone hub"
    );
    let majority = desired(&hubs[1].1, &hubs[1].2).unwrap();
    assert_eq!(majority["keys"]["mode"]["value"], "majority");

    pair.link_b(true);
    let mut states: Vec<Value> = Vec::new();
    let converged = eventually(Duration::from_secs(60), || {
        states = hubs
            .iter()
            .filter_map(|(_, ns, api)| desired(ns, api))
            .collect();
        states.len() == 3
            && states.iter().all(|s| s["log_entries"] == 2)
            && states.windows(2).all(|w| w[0]["keys"] == w[1]["keys"])
            && states
                .windows(2)
                .all(|w| w[0]["version_vector"] == w[1]["version_vector"])
    });
    assert!(converged, "the hubs never converged: {states:#?}");
    // The documented rule: the greatest (hlc, origin, seq) wins. The lone
    // hub wrote later, so its clock is ahead.
    let winner = &states[0]["keys"]["mode"];
    assert_eq!(winner["value"], "minority", "{winner}");
    assert_eq!(winner["origin"], "hub-3");
    let (maj, min) = (&majority["keys"]["mode"], &lone["keys"]["mode"]);
    let rank = |w: &Value| {
        (
            w["hlc"]["ms"].as_u64().unwrap(),
            w["hlc"]["counter"].as_u64().unwrap(),
            w["origin"].as_str().unwrap().to_owned(),
            w["seq"].as_u64().unwrap(),
        )
    };
    assert!(rank(min) > rank(maj), "{min} vs {maj}");
}
