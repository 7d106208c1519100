//! The command lines as a user meets them: `trellis up` then `trellis
//! status`, the CA commands, and what each binary says about bad input.

use std::time::Duration;

use trellis_tests::{Mesh, Proc, eventually, run, serial};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn trellis_up_then_trellis_status_shows_three_sites_of_ten_nodes_alive() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut up = Proc::spawn(
        "up",
        "trellis",
        &[
            "up",
            "--api",
            "127.0.0.1:0",
            "--dir",
            dir.path().to_str().unwrap(),
        ],
        &dir.path().join("up.log"),
    );
    let api_line = up
        .wait_line("API:", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("up never printed its API: {:?}", up.log()));
    let api = api_line.split_whitespace().last().unwrap().to_owned();
    assert!(api.starts_with("http://127.0.0.1:"), "{api_line}");
    assert!(
        up.wait_line("all 30 nodes alive at the hub", Duration::from_secs(60))
            .is_some(),
        "{:?}",
        up.log()
    );

    // `trellis up` keeps the default disk thresholds, so on a machine whose
    // fullest disk is past 90 % its sites are rightly degraded (or critical)
    // by the disk check alone; anything else failing is a fault.
    let host_disk = trellis_node::health::ResourceSampler::new()
        .sample()
        .disk_pct;
    let disk_full = host_disk.is_some_and(|pct| pct >= 85);
    let mut report = serde_json::Value::Null;
    let converged = eventually(Duration::from_secs(30), || {
        let o = run("trellis", &["status", "--hub", &api, "--json"]);
        if !o.status.success() {
            return false;
        }
        report = serde_json::from_slice(&o.stdout).unwrap();
        let sites = report["sites"].as_array().unwrap();
        sites.len() == 3
            && sites.iter().all(|s| {
                let only_disk = s["failing_checks"]
                    .as_object()
                    .is_some_and(|c| c.keys().all(|k| k == "disk"));
                s["nodes_alive"] == 10
                    && s["nodes_total"] == 10
                    && (s["status"] == "healthy" || (disk_full && only_disk))
            })
    });
    assert!(converged, "host disk {host_disk:?} %: {report:#}");
    assert_eq!(report["totals"]["nodes_alive"], 30);

    let o = run("trellis", &["status", "--hub", &api]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("3 sites, 30/30 nodes alive, 0 dead"),
        "{text}"
    );
    for site in ["site-1", "site-2", "site-3"] {
        assert!(text.contains(site), "{text}");
    }
    assert!(!text.contains('\x1b'), "no colour when not on a terminal");

    let o = run("trellis", &["nodes", "site-2", "--hub", &api]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("site-2-n10"), "{text}");
    assert!(text.contains("site-2-relay"), "{text}");

    // Ctrl-C (SIGTERM here) stops it cleanly.
    let status = up
        .terminate(Duration::from_secs(20))
        .expect("up stopped after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(up.log().iter().any(|l| l == "stopped"), "{:?}", up.log());
    // The CA stayed in --dir for reuse.
    assert!(dir.path().join("ca.crt").exists());
}

#[test]
fn ca_commands_issue_usable_certificates_and_refuse_bad_input() {
    let mesh = Mesh::new();
    let ca = mesh.path().join("ca");
    let ca = ca.to_str().unwrap();

    let again = run("trellis", &["ca", "init", "--dir", ca]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );

    let no_site = run(
        "trellis",
        &[
            "ca", "issue", "--dir", ca, "--role", "node", "--region", "eu", "--name", "n1",
        ],
    );
    assert_eq!(no_site.status.code(), Some(2));
    assert!(
        stderr(&no_site).contains("needs a site"),
        "{}",
        stderr(&no_site)
    );

    let bad_name = run(
        "trellis",
        &[
            "ca", "issue", "--dir", ca, "--role", "hub", "--region", "eu", "--name", "Hub One",
        ],
    );
    assert_eq!(bad_name.status.code(), Some(2));
    assert!(
        stderr(&bad_name).contains("invalid name"),
        "{}",
        stderr(&bad_name)
    );

    let bad_role = run(
        "trellis",
        &["ca", "issue", "--dir", ca, "--role", "king", "--name", "x"],
    );
    assert_eq!(bad_role.status.code(), Some(2));

    let no_ca = run(
        "trellis",
        &[
            "ca",
            "issue",
            "--dir",
            "/nonexistent",
            "--role",
            "operator",
            "--name",
            "alice",
        ],
    );
    assert_eq!(no_ca.status.code(), Some(2));
    assert!(
        stderr(&no_ca).contains("trellis ca init"),
        "{}",
        stderr(&no_ca)
    );

    // In JSON: who was issued, and where the files are.
    let issued = run(
        "trellis",
        &[
            "ca", "issue", "--dir", ca, "--role", "node", "--region", "eu", "--site", "par",
            "--name", "n0", "--json",
        ],
    );
    assert!(issued.status.success(), "{issued:?}");
    let answer: serde_json::Value = serde_json::from_slice(&issued.stdout).expect("JSON");
    assert_eq!(answer["identity"], "node n0 (site eu/par)", "{answer}");
    assert!(std::path::Path::new(answer["cert"].as_str().unwrap()).exists());

    mesh.issue("node", "eu", "par", "n1");
    let key = mesh.path().join("certs/n1.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "private keys are private");
    let twice = run(
        "trellis",
        &[
            "ca",
            "issue",
            "--dir",
            ca,
            "--out",
            mesh.path().join("certs").to_str().unwrap(),
            "--role",
            "node",
            "--region",
            "eu",
            "--site",
            "par",
            "--name",
            "n1",
        ],
    );
    assert_eq!(twice.status.code(), Some(2), "no silent overwrite");

    let cfg = mesh.write_config("n1", &mesh.identity_toml("n1"), "");
    let ok = run(
        "trellis-node",
        &["--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(
        stdout(&ok).contains("node n1 (site eu/par)"),
        "{}",
        stdout(&ok)
    );

    // A node certificate does not make a relay.
    let as_relay = run(
        "trellis-relay",
        &["--config", cfg.to_str().unwrap(), "--check-config"],
    );
    assert_eq!(as_relay.status.code(), Some(2));
    assert!(
        stderr(&as_relay).contains("--role relay"),
        "{}",
        stderr(&as_relay)
    );
}

#[test]
fn configuration_errors_name_the_file_and_the_key_and_exit_2() {
    let mesh = Mesh::new();
    for (bin, text, expect) in [
        (
            "trellis-node",
            "[gossip]\nintervall = \"1s\"\n",
            "intervall",
        ),
        ("trellis-node", "[[checks]]\nname = \"web\"\n", "checks[0]"),
        ("trellis-relay", "[uplink]\nhubs = []\n", "uplink.hubs"),
        (
            "trellis-hub",
            "[api]\nlisten = \"0.0.0.0:7800\"\n",
            "api.tokens",
        ),
        ("trellis-hub", "not toml at all", "TOML parse error"),
    ] {
        let path = mesh.write_config("bad", "", "");
        std::fs::write(&path, text).unwrap();
        let o = run(bin, &["--config", path.to_str().unwrap(), "--check-config"]);
        assert_eq!(o.status.code(), Some(2), "{bin} {text:?}: {o:?}");
        let err = stderr(&o);
        assert!(err.contains("bad.toml"), "{bin}: {err}");
        assert!(err.contains(expect), "{bin}: {err}");
    }
    let missing = run("trellis-node", &["--config", "/nonexistent/node.toml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("/nonexistent/node.toml"));
}

#[test]
fn status_without_a_hub_says_what_to_do_and_exits_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = run(
        "trellis",
        &["status", "--hub", &format!("127.0.0.1:{port}")],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot reach"), "{err}");
    assert!(err.contains("trellis up"), "{err}");
}

#[test]
fn every_binary_explains_itself() {
    for (bin, needle) in [
        ("trellis", "trellis up"),
        ("trellis-node", "[[checks]]"),
        ("trellis-relay", "[uplink]"),
        ("trellis-hub", "stale_after"),
    ] {
        let o = run(bin, &["--help"]);
        assert!(o.status.success());
        assert!(stdout(&o).contains(needle), "{bin} --help lacks {needle:?}");
    }
}

#[test]
fn a_reader_that_stops_early_ends_the_cli_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    // `trellis completions zsh` writes about 100 KB, more than a pipe
    // holds: reading 10 bytes and closing makes its next write fail.
    let mut child = std::process::Command::new(trellis_tests::bin("trellis"))
        .args(["completions", "zsh"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start trellis");
    let mut head = [0u8; 10];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut head)
        .expect("some output");
    let out = child.wait_with_output().expect("trellis ends");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert_eq!(
        out.status.signal(),
        Some(13), // SIGPIPE
        "ended by the closed pipe, as cat or grep are: {:?}",
        out.status
    );
}
