//! `--log-format json` and `TRELLIS_LOG_FORMAT=json`: every line a member
//! binary writes to stderr is one JSON object, from the first log record to
//! the error it stops on; human lines stay the default.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Mesh, bin, run, serial};

/// Each line of `stderr` parsed as JSON; panics naming the first line that
/// is not.
fn json_lines(stderr: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(stderr);
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}")))
        .collect()
}

#[test]
fn members_stopping_on_a_bad_config_say_why_in_json_when_asked() {
    for member in ["trellis-node", "trellis-relay", "trellis-hub"] {
        let out = run(
            member,
            &[
                "--log-format",
                "json",
                "--config",
                "/nonexistent/trellis.toml",
            ],
        );
        assert_eq!(out.status.code(), Some(2), "{member}: {out:?}");
        let lines = json_lines(&out.stderr);
        assert_eq!(lines.len(), 1, "{member}: {lines:?}");
        assert_eq!(lines[0]["level"], "ERROR", "{member}: {lines:?}");
        let error = lines[0]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("/nonexistent/trellis.toml"),
            "{member}: {lines:?}"
        );
    }
}

#[test]
fn the_log_format_can_come_from_the_environment() {
    let out = Command::new(bin("trellis-node"))
        .args(["--config", "/nonexistent/trellis.toml"])
        .env("TRELLIS_LOG_FORMAT", "json")
        .output()
        .expect("run trellis-node");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = json_lines(&out.stderr);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["exit_code"], 2);
}

#[test]
fn human_lines_are_the_default() {
    let out = run("trellis-node", &["--config", "/nonexistent/trellis.toml"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(serde_json::from_str::<Value>(stderr.trim()).is_err());
}

#[test]
fn a_running_node_logs_one_json_object_per_line_with_its_fields() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("node", "eu", "par", "par-n0");
    let cfg = format!(
        "{}\n[gossip]\nlisten = \"127.0.0.1:0\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n[patch]\ndir = \"par-n0/patches\"\n",
        mesh.identity_toml("par-n0")
    );
    let config = mesh.write_config("par-n0", &cfg, "");
    let mut child = Command::new(bin("trellis-node"))
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .env("TRELLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start trellis-node");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
                lines.push(line);
                if v["message"] == "node ready" {
                    break Some(v);
                }
            }
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let ready = ready.unwrap_or_else(|| panic!("no \"node ready\" record in:\n{lines:#?}"));
    assert_eq!(ready["level"], "INFO");
    assert!(ready["timestamp"].is_string(), "{ready}");
    let metrics = ready["metrics"].as_str().unwrap_or_default();
    assert!(metrics.starts_with("127.0.0.1:"), "{ready}");
    // The trellis CLI takes the option too.
    let out = run("trellis", &["--log-format", "json", "completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
}
