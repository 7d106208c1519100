//! Enrolment through a real mesh: `trellis token create` at the hub, then
//! `trellis-node enroll` on a machine with no certificate, through its
//! site's relay, which forwards the request to the hub (or keeps it while
//! its WAN link is cut); the node then starts with the certificate and
//! joins its site. Tokens for another site, used up or expired are refused
//! with a message that says so.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::proxy::UdpProxy;
use trellis_tests::{Mesh, Proc, eventually, fleet_site, metric, run, serial};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Issues `name` a certificate that expires in a day, into `certs/`.
fn issue_for_a_day(mesh: &Mesh, role: &str, site: &str, name: &str) -> PathBuf {
    mesh.issue_with(role, "eu", site, name, &["--days", "1"])
}

/// When the certificate at `path` expires (Unix seconds).
fn expiry(path: &std::path::Path) -> i64 {
    trellis_node::enrol::not_after_pem(&std::fs::read_to_string(path).unwrap()).unwrap()
}

struct Site {
    mesh: Mesh,
    api: String,
    gossip: String,
    enrol: String,
    relay_metrics: String,
    proxy: UdpProxy,
    procs: Vec<Proc>,
}

impl Site {
    fn start() -> Site {
        let mesh = Mesh::new();
        mesh.issue("hub", "eu", "", "hub-1");
        mesh.issue("relay", "eu", "par", "par-relay");
        mesh.issue("node", "eu", "par", "par-n1");
        let ca_dir = mesh.path().join("ca");
        let (hub, uplink, api) =
            mesh.start_hub("hub-1", &format!("[enrolment]\nca_dir = {:?}\n", ca_dir));
        let proxy = UdpProxy::with_seed(uplink.parse().unwrap(), 11).unwrap();
        let (mut relay, gossip) = mesh.start_relay(
            "par-relay",
            &proxy.listen_addr().to_string(),
            "[enrol]\nlisten = \"127.0.0.1:0\"\n[uplink]\nack_timeout = \"3s\"\nmax_backoff = \"1s\"\n",
        );
        let enrol = relay.wait_field("relay ready", "enrol", Duration::from_secs(10));
        let relay_metrics = relay.wait_field("relay ready", "metrics", Duration::from_secs(10));
        let (n1, _) = mesh.start_node("par-n1", &gossip, "");
        let site = Site {
            mesh,
            api,
            gossip,
            enrol,
            relay_metrics,
            proxy,
            procs: vec![hub, relay, n1],
        };
        site.wait_alive(1);
        site
    }

    fn wait_alive(&self, n: u64) {
        let alive = eventually(Duration::from_secs(40), || {
            fleet_site(&self.api, "par").is_some_and(|(_, r)| r["nodes_alive"] == n)
        });
        assert!(alive, "the site never showed {n} nodes alive");
    }

    /// A token for `site`.
    fn token(&self, site: &str, uses: u32, ttl: &str) -> String {
        self.token_with(site, uses, ttl, &[])
    }

    fn token_with(&self, site: &str, uses: u32, ttl: &str, extra: &[&str]) -> String {
        let uses = uses.to_string();
        let mut args = vec![
            "token", "create", "--region", "eu", "--site", site, "--uses", &uses, "--ttl", ttl,
            "--hub", &self.api, "--json",
        ];
        args.extend(extra);
        let out = run("trellis", &args);
        assert!(out.status.success(), "token create: {out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_owned()
    }

    /// A configuration for `name` whose identity is where `start_node`
    /// looks for it; nothing is there yet but the CA's certificate.
    fn config(&self, name: &str) -> PathBuf {
        let path = self.mesh.path().join(format!("enrol-{name}.toml"));
        std::fs::write(&path, self.mesh.identity_toml(name)).unwrap();
        path
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.mesh.path().join(format!("certs/{name}.crt"))
    }

    fn enroll_args(&self, name: &str, token: &str, wait: &str) -> Vec<String> {
        let config = self.config(name);
        [
            "enroll",
            "--config",
            config.to_str().unwrap(),
            "--relay",
            &self.enrol,
            "--token",
            token,
            "--name",
            name,
            "--wait",
            wait,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn enroll(&self, name: &str, token: &str) -> std::process::Output {
        let args = self.enroll_args(name, token, "30s");
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run("trellis-node", &refs)
    }
}

#[test]
fn a_machine_enrols_with_a_token_and_joins_and_bad_tokens_are_refused_with_the_reason() {
    let _serial = serial();
    let mut s = Site::start();

    // Enrol, then start with the certificate: the site counts two nodes.
    let token = s.token_with("par", 1, "1h", &["--labels", "role=web,rack=r7"]);
    assert!(token.starts_with("trellis-join-"), "{token}");
    let out = s.enroll("par-new", &token);
    assert!(out.status.success(), "enroll: {out:?}");
    assert!(
        text(&out.stdout).contains("enrolled: node par-new (site eu/par)"),
        "{out:?}"
    );
    let key = s.mesh.path().join("certs/par-new.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Its own configuration's labels win over the token's.
    let (new, _) = s
        .mesh
        .start_node("par-new", &s.gossip, "[node]\nlabels = { rack = \"r9\" }\n");
    s.procs.push(new);
    s.wait_alive(2);
    let labelled = eventually(Duration::from_secs(20), || {
        let out = run("trellis", &["nodes", "par", "--hub", &s.api, "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["nodes"].as_array().is_some_and(|nodes| {
            nodes.iter().any(|n| {
                n["name"] == "par-new"
                    && n["labels"]["role"] == "web"
                    && n["labels"]["rack"] == "r9"
            })
        })
    });
    assert!(
        labelled,
        "par-new does not carry role=web and its own rack=r9"
    );

    // The token was for one machine.
    let out = s.enroll("par-second", &token);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("used up (1 of 1 uses)"),
        "{out:?}"
    );
    assert!(!s.cert("par-second").exists());
    // Another site's token is refused at this site's relay.
    let ber = s.token("ber", 5, "1h");
    let out = s.enroll("par-third", &ber);
    assert!(
        text(&out.stderr).contains("this token is for site eu/ber, not eu/par"),
        "{out:?}"
    );
    // An expired one too.
    let brief = s.token("par", 5, "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let out = s.enroll("par-fourth", &brief);
    assert!(text(&out.stderr).contains("this token expired"), "{out:?}");
    // And one that is not a token at all, before anything is sent.
    let out = s.enroll("par-fifth", "trellis-join-nonsense");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not a join token"), "{out:?}");
    // The same name twice is refused even with a fresh token.
    let fresh = s.token("par", 1, "1h");
    std::fs::remove_file(s.cert("par-new")).unwrap();
    let out = s.enroll("par-new", &fresh);
    assert!(
        text(&out.stderr).contains("already enrolled as par-new"),
        "{out:?}"
    );

    // The hub lists the tokens with their uses, never their secrets.
    let out = run("trellis", &["token", "list", "--hub", &s.api, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let used: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["used"].as_u64().unwrap())
        .collect();
    assert_eq!(used.iter().sum::<u64>(), 1, "{list}");
    assert!(!text(&out.stdout).contains(&token[token.len() - 64..]));
    // Creating a token and each enrolment are in the audit trail.
    let audit = text(&run("trellis", &["audit", "log", "--hub", &s.api]).stdout);
    assert!(audit.contains("enrol/token/"), "{audit}");
    assert!(audit.contains("enrol/used/"), "{audit}");
    // Enrolment keys are not writable through the generic desired state.
    let out = run(
        "trellis",
        &["desired", "set", "enrol/token/x", "{}", "--hub", &s.api],
    );
    assert!(!out.status.success(), "{out:?}");

    // With the WAN link cut, the relay keeps the request; the machine waits
    // and gets its certificate once the link returns.
    let token = s.token("par", 1, "1h");
    s.proxy.blackhole(true);
    let down = eventually(Duration::from_secs(30), || {
        metric(&s.relay_metrics, "trellis_relay_uplink_connected") == Some(0.0)
    });
    assert!(down, "the relay never noticed its uplink was cut");
    // Given up after a while, then run again: the same request is asked
    // for, so the relay holds one, not two.
    let args = s.enroll_args("par-late", &token, "3s");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("trellis-node", &refs);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("run the same command again"),
        "{out:?}"
    );
    let args = s.enroll_args("par-late", &token, "120s");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut late = Proc::spawn(
        "par-late-enroll",
        "trellis-node",
        &refs,
        &s.mesh.path().join("par-late-enroll.log"),
    );
    let waiting = late.wait_line("link to the hubs is down", Duration::from_secs(20));
    assert!(waiting.is_some(), "{}", late.log().join("\n"));
    assert!(
        late.log()
            .iter()
            .any(|l| l.contains("the request made before")),
        "{}",
        late.log().join("\n")
    );
    let kept = s.mesh.path().join("par-relay/enrol");
    let queued = std::fs::read_dir(&kept)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "req"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(
        queued,
        1,
        "the relay did not keep the request in {}",
        kept.display()
    );
    assert!(!s.cert("par-late").exists());
    s.proxy.blackhole(false);
    let done = eventually(Duration::from_secs(60), || !late.is_running());
    assert!(done, "{}", late.log().join("\n"));
    assert_eq!(
        late.exit_status().and_then(|e| e.code()),
        Some(0),
        "{}",
        late.log().join("\n")
    );
    let (n, _) = s.mesh.start_node("par-late", &s.gossip, "");
    s.procs.push(n);
    s.wait_alive(3);

    // A machine built from an image with the token in its configuration
    // enrols when the agent first starts, then runs.
    let token = s.token("par", 1, "1h");
    let (n, _) = s.mesh.start_node(
        "par-image",
        &s.gossip,
        &format!("[join]\nrelay = \"{}\"\ntoken = \"{token}\"\n", s.enrol),
    );
    assert!(
        n.log()
            .iter()
            .any(|l| l.contains("enrolled with the join token")),
        "{}",
        n.log().join("\n")
    );
    s.procs.push(n);
    s.wait_alive(4);
}

#[test]
fn a_node_renews_its_certificate_before_it_expires_and_starts_again_on_it() {
    let _serial = serial();
    let s = Site::start();
    // A node whose certificate expires tomorrow.
    let cert = issue_for_a_day(&s.mesh, "node", "par", "par-short");
    let before = expiry(&cert);
    let (mut node, _) = s.mesh.start_node(
        "par-short",
        &s.gossip,
        "[renewal]\nrenew_before = \"2d\"\ncheck_every = \"1s\"\n",
    );

    // It renews through its relay, then starts again (the same process)
    // on the new certificate, and stays in its site.
    let renewed = node.wait_line("certificate renewed", Duration::from_secs(30));
    assert!(renewed.is_some(), "{}", node.log().join("\n"));
    let again = eventually(Duration::from_secs(20), || {
        node.log()
            .iter()
            .filter(|l| l.contains("node ready"))
            .count()
            == 2
    });
    assert!(again, "{}", node.log().join("\n"));
    assert!(node.is_running());
    let after = expiry(&cert);
    assert!(
        after - before > 300 * 86400,
        "the new certificate runs to {after}, the old to {before}"
    );
    s.wait_alive(2);
    // Renewed once: the new certificate is far from its end.
    std::thread::sleep(Duration::from_secs(3));
    let times = node
        .log()
        .iter()
        .filter(|l| l.contains("certificate renewed"))
        .count();
    assert_eq!(times, 1, "{}", node.log().join("\n"));
    let audit = run("trellis", &["audit", "log", "--hub", &s.api]);
    assert!(text(&audit.stdout).contains("node.renewed"), "{audit:?}");
}

#[test]
fn a_relay_enrols_with_a_hub_using_a_relay_token_and_serves_its_site() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    let ca_dir = mesh.path().join("ca");
    let (mut hub, uplink, api) = mesh.start_hub(
        "hub-1",
        &format!("[enrolment]\nca_dir = {ca_dir:?}\nlisten = \"127.0.0.1:0\"\n"),
    );
    let enrol = hub.wait_field("hub ready", "enrol", Duration::from_secs(10));
    let token = |role: &str| {
        let out = run(
            "trellis",
            &[
                "token", "create", "--role", role, "--region", "eu", "--site", "lyon", "--hub",
                &api, "--json",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let config = mesh.path().join("enrol-lyon-relay.toml");
    std::fs::write(
        &config,
        format!(
            "{}[uplink]\nhubs = [\"{uplink}\"]\n",
            mesh.identity_toml("lyon-relay")
        ),
    )
    .unwrap();
    let enroll = |token: &str| {
        run(
            "trellis-relay",
            &[
                "enroll",
                "--config",
                config.to_str().unwrap(),
                "--hub",
                &enrol,
                "--token",
                token,
                "--name",
                "lyon-relay",
            ],
        )
    };
    // A node token is for a relay to take to the hub, not the other way.
    let out = enroll(&token("node"));
    assert!(
        text(&out.stderr).contains("this is a node token"),
        "{out:?}"
    );
    let out = enroll(&token("relay"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        text(&out.stdout).contains("enrolled: relay lyon-relay (site eu/lyon)"),
        "{out:?}"
    );
    // It connects to the hub with that certificate and serves its site.
    let (_relay, _) = mesh.start_relay("lyon-relay", &uplink, "");
    let serving = eventually(Duration::from_secs(30), || {
        fleet_site(&api, "lyon").is_some()
    });
    assert!(serving, "the hub never heard from lyon's relay");
}

#[test]
fn a_relay_renews_its_certificate_at_a_hub_and_starts_again_on_it() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    let ca = mesh.path().join("ca");
    let (mut hub, uplink, api) = mesh.start_hub(
        "hub-1",
        &format!("[enrolment]\nca_dir = {ca:?}\nlisten = \"127.0.0.1:0\"\n"),
    );
    let enrol = hub.wait_field("hub ready", "enrol", Duration::from_secs(10));
    let cert = issue_for_a_day(&mesh, "relay", "lyon", "lyon-relay");
    let before = expiry(&cert);
    let (mut relay, _) = mesh.start_relay(
        "lyon-relay",
        &uplink,
        &format!("[renewal]\nhub = \"{enrol}\"\nrenew_before = \"2d\"\ncheck_every = \"1s\"\n"),
    );
    let renewed = relay.wait_line("certificate renewed", Duration::from_secs(30));
    assert!(renewed.is_some(), "{}", relay.log().join("\n"));
    let again = eventually(Duration::from_secs(20), || {
        relay
            .log()
            .iter()
            .filter(|l| l.contains("relay ready"))
            .count()
            == 2
    });
    assert!(again, "{}", relay.log().join("\n"));
    assert!(expiry(&cert) - before > 300 * 86400);
    let serving = eventually(Duration::from_secs(30), || {
        fleet_site(&api, "lyon").is_some()
    });
    assert!(serving, "the hub never heard from lyon's relay");
    let audit = run("trellis", &["audit", "log", "--hub", &api]);
    assert!(text(&audit.stdout).contains("relay.renewed"), "{audit:?}");
}
