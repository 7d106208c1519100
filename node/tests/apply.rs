//! The node agent keeps the files it applied: a state handed to a running
//! agent is written, and a hand edit is healed on the next drift check and
//! counted in `/metrics`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trellis_node::agent::NodeAgent;
use trellis_node::apply::DriftMode;
use trellis_node::config::{GossipConfig, MetricsConfig, NodeConfig};
use trellis_node::id::{Identity, Role};
use trellis_node::managed::{ManagedFile, ManagedState};
use trellis_node::tls::{Credentials, MeshCa};

mod common;
use common::{eventually, metrics_text};

async fn start(dir: &std::path::Path, drift: DriftMode, shutdown: &CancellationToken) -> NodeAgent {
    let ca = MeshCa::generate("t").unwrap();
    let creds =
        Credentials::issue(&ca, &Identity::new(Role::Node, "eu", "par", "n0").unwrap()).unwrap();
    let mut cfg = NodeConfig {
        gossip: GossipConfig::with_listen("127.0.0.1:0".parse().unwrap()),
        metrics: MetricsConfig::with_listen("127.0.0.1:0".parse().unwrap()),
        ..NodeConfig::default()
    };
    cfg.config.state_dir = dir.join("state");
    cfg.config.drift_interval = Duration::from_secs(1);
    cfg.config.drift = drift;
    NodeAgent::start(creds, cfg, shutdown.clone())
        .await
        .unwrap()
}

fn one_file(path: &std::path::Path, content: &str, reload: String) -> ManagedState {
    let path = path.to_string_lossy().into_owned();
    ManagedState {
        version: 4,
        files: BTreeMap::from([(
            path.clone(),
            ManagedFile {
                path,
                content: content.into(),
                mode: 0o640,
                reload: vec![reload],
            },
        )]),
        ..ManagedState::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_heals_a_hand_edited_file_and_counts_it() {
    trellis_node::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let agent = start(dir.path(), DriftMode::Heal, &shutdown).await;
    let file = dir.path().join("etc/app.conf");
    let log = dir.path().join("reloads");
    let state = one_file(&file, "port = 1\n", format!("echo r >> {}", log.display()));

    let report = agent.apply_handle().apply(state).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "port = 1\n");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "r\n");

    // Edited in one step (write aside, rename), so that a drift check
    // cannot see it half-done and count two drifts.
    let edit = dir.path().join("edit");
    std::fs::write(&edit, "port = 2\n").unwrap();
    std::fs::rename(&edit, &file).unwrap();
    let healed = eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(&file).unwrap() == "port = 1\n"
    })
    .await;
    assert!(healed, "the edit was not undone");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o7777,
        0o640
    );
    let counted = eventually(Duration::from_secs(5), || async {
        metrics_text(&agent)
            .await
            .contains(r#"trellis_config_drift_total{action="healed"} 1"#)
    })
    .await;
    assert!(counted, "{}", metrics_text(&agent).await);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "r\nr\n");
    shutdown.cancel();
    agent.stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_in_report_mode_counts_drift_and_leaves_the_file() {
    trellis_node::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let agent = start(dir.path(), DriftMode::Report, &shutdown).await;
    let file = dir.path().join("app.conf");
    let report = agent
        .apply_handle()
        .apply(one_file(&file, "a\n", "true".into()))
        .await
        .unwrap();
    assert!(report.ok, "{report:?}");

    std::fs::write(&file, "b\n").unwrap();
    let counted = eventually(Duration::from_secs(10), || async {
        metrics_text(&agent)
            .await
            .contains(r#"trellis_config_drift_total{action="reported"}"#)
    })
    .await;
    assert!(counted, "{}", metrics_text(&agent).await);
    assert!(!metrics_text(&agent).await.contains(r#"action="healed""#));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "b\n");
    shutdown.cancel();
    agent.stopped().await;
}
