//! Federated hubs with real processes: a hub dies while its site streams,
//! the relay fails over and nothing is lost or doubled; the dead hub comes
//! back and catches up; only hubs of the mesh CA may federate.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_tests::{Mesh, Proc, eventually, get_json, http_get, metric, serial};

const SITES: [&str; 3] = ["par", "ber", "lon"];

struct Hub {
    proc: Proc,
    uplink: String,
    api: String,
    extra: String,
}

struct Fed {
    mesh: Mesh,
    hubs: Vec<Hub>,
    relays: Vec<(Proc, String)>,
    _nodes: Vec<Proc>,
}

/// A check that flips every second: a steady stream of events.
const FLAPPING: &str = "[health]\ninterval = \"500ms\"\n[[checks]]\nname = \"flap\"\ncommand = [\"sh\", \"-c\", \"test $(( $(date +%s) % 2 )) -eq 0\"]\ninterval = \"500ms\"\ntimeout = \"400ms\"\n";

fn hub_extra(peers: &[String]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[federation]\npeers = [{}]\n[replication]\nanti_entropy_every = \"1s\"\n[fleet]\nstale_after = \"10s\"\n",
        peers.join(", ")
    )
}

fn start_hub(mesh: &Mesh, name: &str, extra: &str) -> Hub {
    let (mut proc, uplink, api) = mesh.start_hub(name, extra);
    let federation = proc.wait_field("hub ready", "federation", Duration::from_secs(5));
    assert_eq!(federation, uplink, "one endpoint for uplink and federation");
    Hub {
        proc,
        uplink,
        api,
        extra: extra.to_owned(),
    }
}

/// Three hubs, three sites (site i prefers hub i), two nodes each.
fn federation() -> Fed {
    let mesh = Mesh::new();
    for h in 1..=3 {
        mesh.issue("hub", "eu", "", &format!("hub-{h}"));
    }
    let mut hubs: Vec<Hub> = Vec::new();
    for h in 1..=3 {
        let peers: Vec<String> = hubs.iter().map(|x| x.uplink.clone()).collect();
        let hub = start_hub(&mesh, &format!("hub-{h}"), &hub_extra(&peers));
        hubs.push(hub);
    }
    let mut relays = Vec::new();
    let mut nodes = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let relay = format!("{site}-relay");
        mesh.issue("relay", "eu", site, &relay);
        let prefs: Vec<String> = (0..3)
            .map(|k| format!("\"{}\"", hubs[(i + k) % 3].uplink))
            .collect();
        let extra = format!(
            "[uplink]\nhubs = [{}]\nsummary_interval = \"1s\"\nack_timeout = \"5s\"\nmax_backoff = \"1s\"\n",
            prefs.join(", ")
        );
        let (mut p, gossip) = mesh.start_relay(&relay, &hubs[i].uplink, &extra);
        let metrics = p.wait_field("relay ready", "metrics", Duration::from_secs(5));
        for n in 0..2 {
            let name = format!("{site}-n{n}");
            mesh.issue("node", "eu", site, &name);
            nodes.push(mesh.start_node(&name, &gossip, FLAPPING).0);
        }
        relays.push((p, metrics));
    }
    let fed = Fed {
        mesh,
        hubs,
        relays,
        _nodes: nodes,
    };
    for h in 0..3 {
        let all = eventually(Duration::from_secs(60), || fed.sees_all(h, 2));
        assert!(
            all,
            "hub-{} never saw every site: {:?}",
            h + 1,
            fed.fleet(h)
        );
    }
    fed
}

impl Fed {
    fn fleet(&self, h: usize) -> Option<Value> {
        get_json(&format!("{}/api/v1/fleet", self.hubs[h].api))
    }

    fn row(&self, h: usize, site: &str) -> Option<Value> {
        self.fleet(h)?["sites"]
            .as_array()?
            .iter()
            .find(|s| s["site"] == site)
            .cloned()
    }

    /// Hub `h` shows every site with `alive` nodes each, served.
    fn sees_all(&self, h: usize, alive: u64) -> bool {
        SITES.iter().all(|s| {
            self.row(h, s)
                .is_some_and(|r| r["nodes_alive"] == alive && r["connected"] == true)
        })
    }

    fn relay_metric(&self, i: usize, name: &str) -> Option<u64> {
        metric(&self.relays[i].1, name).map(|v| v as u64)
    }

    /// Waits until relay `i`'s hub acknowledged all it persisted.
    fn drained(&self, i: usize) -> u64 {
        let mut last = (None, None);
        let ok = eventually(Duration::from_secs(60), || {
            let p = self.relay_metric(i, "trellis_relay_persisted_through");
            let a = self.relay_metric(i, "trellis_relay_acked_through");
            last = (p, a);
            p.is_some() && p == a
        });
        assert!(ok, "relay {i} never drained: {last:?}");
        last.0.unwrap()
    }

    fn write(&self, h: usize, key: &str, value: &str) -> (u16, String) {
        let body = format!("{{\"value\": \"{value}\", \"author\": \"test\"}}");
        http_put(&format!("{}/api/v1/desired/{key}", self.hubs[h].api), &body)
            .unwrap_or((0, String::new()))
    }

    fn log(&self, h: usize) -> Option<Vec<Value>> {
        let l = get_json(&format!("{}/api/v1/log", self.hubs[h].api))?;
        Some(l["entries"].as_array()?.clone())
    }
}

/// The operators' writes among log entries: hubs also note incidents in
/// the log, as they happen, so the count of all entries varies.
fn writes(log: &[Value]) -> usize {
    log.iter()
        .filter(|e| e["entry"]["op"].get("Note").is_none())
        .count()
}

/// A minimal blocking HTTP PUT with a JSON body.
fn http_put(url: &str, body: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/')?;
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    write!(
        s,
        "PUT /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_owned(),
    ))
}

/// The relay's records at hub `h`, by seq, for the newest stream.
fn records_at(fed: &Fed, h: usize, site: &str) -> Vec<(u64, u64)> {
    let hist = get_json(&format!(
        "{}/api/v1/sites/{site}/history?limit=10000",
        fed.hubs[h].api
    ))
    .unwrap();
    assert_eq!(hist["truncated"], false);
    let recs = hist["records"].as_array().unwrap();
    let newest = recs
        .iter()
        .map(|r| r["stream"].as_u64().unwrap())
        .max()
        .unwrap();
    let mut seqs: Vec<(u64, u64)> = recs
        .iter()
        .filter(|r| r["stream"] == newest)
        .map(|r| (r["seq"].as_u64().unwrap(), r["until"].as_u64().unwrap()))
        .collect();
    seqs.sort();
    seqs
}

/// Whether `seqs` holds every seq from 1 to at least `through` once.
fn is_complete(seqs: &[(u64, u64)], through: u64) -> bool {
    let mut next = 1;
    for (seq, until) in seqs {
        if *seq != next {
            return false;
        }
        next = until + 1;
    }
    next > through
}

/// Every seq from 1 to at least `through` once, without a hole. The site
/// keeps sending while the test reads, so a hub may hold a few newer
/// records than `through` was measured at; those must follow on too.
fn assert_complete(seqs: &[(u64, u64)], through: u64, what: &str) {
    let mut next = 1;
    for (seq, until) in seqs {
        assert_eq!(*seq, next, "{what}: hole or duplicate at {seq}");
        next = until + 1;
    }
    assert!(
        next > through,
        "{what}: has up to {} of {through}",
        next - 1
    );
}

#[test]
fn a_hub_that_dies_is_failed_over_without_loss_and_catches_up_when_back() {
    let _serial = serial();
    let mut fed = federation();
    // Some desired state before anything breaks.
    let (status, body) = fed.write(0, "motd", "hello");
    assert_eq!(status, 200, "{body}");

    // hub-2 serves ber; kill it while ber streams.
    assert_eq!(
        fed.row(0, "ber").unwrap()["hub"],
        "hub-2",
        "ber prefers hub-2"
    );
    let status = fed.hubs[1].proc.kill9();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let killed = Instant::now();
    let failed_over = eventually(Duration::from_secs(40), || {
        fed.row(0, "ber")
            .is_some_and(|r| r["connected"] == true && r["hub"] != "hub-2")
    });
    let took = killed.elapsed();
    assert!(
        failed_over,
        "ber never failed over: {:?}",
        fed.row(0, "ber")
    );
    assert!(
        took <= Duration::from_secs(30),
        "failed over after {took:?}"
    );
    eprintln!("ber failed over {took:?} after its hub died");
    assert!(
        fed.relays[1]
            .0
            .log()
            .iter()
            .any(|l| l.contains("failing over")),
        "the relay says it failed over"
    );
    // Every hub alive still shows every site.
    for h in [0, 2] {
        assert!(
            eventually(Duration::from_secs(20), || fed.sees_all(h, 2)),
            "hub-{} lost a site: {:?}",
            h + 1,
            fed.fleet(h)
        );
    }
    // A write while hub-2 is down: quorum 2 of the 2 left.
    let (status, body) = fed.write(2, "color", "blue");
    assert_eq!(status, 200, "{body}");

    // The site's history has no hole and no duplicate across the failover,
    // on both hubs still alive.
    let through = fed.drained(1);
    for h in [0, 2] {
        // Live pushes bring the newest records at once; anti-entropy
        // fills what a lost push left out: wait for the whole run.
        let complete = eventually(Duration::from_secs(20), || {
            is_complete(&records_at(&fed, h, "ber"), through)
        });
        assert!(complete, "hub-{} never got all of ber", h + 1);
        assert_complete(
            &records_at(&fed, h, "ber"),
            through,
            &format!("hub-{}", h + 1),
        );
    }

    // hub-2 comes back (same store): within 30 s it shows the same fleet
    // and holds the same log, entry by entry.
    let extra = fed.hubs[1].extra.clone();
    let back = start_hub(&fed.mesh, "hub-2", &extra);
    let restarted = Instant::now();
    let old_api = std::mem::replace(&mut fed.hubs[1], back);
    drop(old_api);
    let caught_up = eventually(Duration::from_secs(30), || {
        fed.sees_all(1, 2) && fed.log(1).is_some_and(|l| writes(&l) == 2)
    });
    assert!(
        caught_up,
        "hub-2 did not catch up: {:?} {:?}",
        fed.fleet(1),
        fed.log(1)
    );
    eprintln!(
        "hub-2 caught up {:?} after its restart",
        restarted.elapsed()
    );
    // Hubs keep noting incidents as they open and close, so the logs are
    // compared once the notes in flight have been exchanged.
    let same = eventually(Duration::from_secs(30), || {
        let logs: Vec<Option<Vec<Value>>> = (0..3).map(|h| fed.log(h)).collect();
        logs[0].is_some() && logs[0] == logs[1] && logs[0] == logs[2]
    });
    let logs: Vec<Vec<Value>> = (0..3).map(|h| fed.log(h).unwrap_or_default()).collect();
    assert!(same, "the hubs never held the same log: {logs:?}");
    let desired = get_json(&format!("{}/api/v1/desired", fed.hubs[1].api)).unwrap();
    assert_eq!(desired["keys"]["color"]["value"], "blue");
    assert_eq!(desired["keys"]["motd"]["value"], "hello");
    // And its copy of ber's history is whole too.
    let through = fed.drained(1);
    // What was made while it was down comes by anti-entropy, after the
    // live pushes of newer records: wait until nothing is missing.
    let whole = eventually(Duration::from_secs(30), || {
        is_complete(&records_at(&fed, 1, "ber"), through)
    });
    assert!(whole, "hub-2 never caught up ber's history");
    assert_complete(
        &records_at(&fed, 1, "ber"),
        through,
        "hub-2 after its restart",
    );
    // The hubs agree all three are alive. hub-2 came back on a new port as
    // a new gossip incarnation: hub-1's failure detector calls it alive once
    // it has heard a few heartbeats of it, which may come after the log
    // pulls above, so this is waited for, not sampled once.
    let mut last = Value::Null;
    let all_alive = eventually(Duration::from_secs(30), || {
        let Some(hubs) = get_json(&format!("{}/api/v1/hubs", fed.hubs[0].api)) else {
            return false;
        };
        let states: BTreeMap<String, bool> = hubs["hubs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["name"].as_str().unwrap().to_owned(), h["alive"] == true))
            .collect();
        last = hubs;
        states.len() == 3 && states.values().all(|a| *a)
    });
    assert!(all_alive, "hub-1 does not see all three hubs alive: {last}");
}

#[test]
fn only_hubs_of_the_mesh_ca_federate() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    let hub = start_hub(&mesh, "hub-1", &hub_extra(&[]));
    // A relay certificate tries to join the federation.
    mesh.issue("relay", "eu", "par", "par-relay");
    let relay_as_hub = format!(
        "{}\n[uplink]\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\n[store]\npath = \"intruder/hub.db\"\n[federation]\npeers = [\"{}\"]\n",
        mesh.identity_toml("par-relay"),
        hub.uplink
    );
    let path = mesh.write_config("intruder", &relay_as_hub, "");
    let o = trellis_tests::run(
        "trellis-hub",
        &["--config", path.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "a relay certificate is no hub: {o:?}"
    );
    // So it talks federation itself, from a relay endpoint.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        trellis_node::tls::install_crypto_provider();
        let p = mesh.path();
        let creds = trellis_node::tls::Credentials::load(
            &p.join("ca/ca.crt"),
            &p.join("certs/par-relay.crt"),
            &p.join("certs/par-relay.key"),
        )
        .unwrap();
        let (ep, _) = trellis_node::endpoint::MeshEndpoint::bind(
            creds,
            "127.0.0.1:0".parse().unwrap(),
            &[],
            trellis_node::metrics::MeshMetrics::default(),
        )
        .unwrap();
        let r = ep
            .connect(
                hub.uplink.parse().unwrap(),
                trellis_node::authz::Protocol::Federation,
            )
            .await;
        ep.shutdown().await;
        r.is_err()
    });
    assert!(refused, "a relay was let into the federation");
    // A hub of another CA.
    let foreign = Mesh::new();
    foreign.issue("hub", "eu", "", "hub-x");
    let x = start_hub(
        &foreign,
        "hub-x",
        &hub_extra(std::slice::from_ref(&hub.uplink)),
    );
    let counted = eventually(Duration::from_secs(20), || {
        let (_, body) = http_get(&format!("{}/metrics", hub.api)).unwrap_or_default();
        body.contains(
            r#"trellis_connection_refusals_total{protocol="federation",reason="wrong_role"}"#,
        ) && body.contains(r#"reason="tls""#)
    });
    assert!(counted, "{:?}", http_get(&format!("{}/metrics", hub.api)));
    std::thread::sleep(Duration::from_secs(3));
    let hubs = get_json(&format!("{}/api/v1/hubs", hub.api)).unwrap();
    assert_eq!(hubs["hubs"].as_array().unwrap().len(), 1, "{hubs}");
    let xs = get_json(&format!("{}/api/v1/hubs", x.api)).unwrap();
    assert_eq!(xs["hubs"].as_array().unwrap().len(), 1, "{xs}");
}
