//! A node agent follows a relay's patch orders over real QUIC on
//! 127.0.0.1: it fetches and verifies the patch, runs its install commands
//! next to the artifacts, bakes, reports each state in gossip, and rolls
//! back when told. The relay here is a site member serving the fetch
//! protocol from a patch store, and publishing orders by hand.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use trellis_node::agent::{NodeAgent, SiteMember};
use trellis_node::authz::Protocol;
use trellis_node::config::{GossipConfig, HealthConfig, MetricsConfig, NodeConfig};
use trellis_node::distribute::{self, hex32};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::Registry;
use trellis_node::patch::{ChunkStore, Patch, PatchFiles, SignedPatch};
use trellis_node::patchstate::{NodePatch, OrderAction, PatchOrder, PatchState, keys};
use trellis_node::tls::{Credentials, MeshCa};

mod common;
use common::{eventually, metrics_text};

const PATCH_TOML: &str = r#"
name = "tool-fix"
version = "1.2.3"
install = ["sh install.sh"]
rollback = ["sh rollback.sh"]
bake = "1s"
artifacts = ["install.sh", "rollback.sh"]
"#;

/// Signs the patch in `src` with `operator` and stages it in `store` as a
/// relay keeps it: the manifest by id, the artifacts' chunks.
fn stage(src: &Path, operator: &Credentials, store: &Path) -> (SignedPatch, PatchFiles) {
    let patch = Patch::load(src).unwrap();
    let signed = trellis_node::patch::sign(operator, &patch.manifest).unwrap();
    let chunks = ChunkStore::open(&store.join("chunks")).unwrap();
    for a in &patch.manifest.artifacts {
        let bytes = std::fs::read(patch.artifact_path(a)).unwrap();
        for (hash, chunk) in a.chunks.iter().zip(bytes.chunks(1 << 20)) {
            chunks.put(hash, chunk).unwrap();
        }
    }
    std::fs::write(
        PatchFiles::manifest_path(store, &signed.id()),
        postcard::to_stdvec(&signed).unwrap(),
    )
    .unwrap();
    let files = PatchFiles {
        dir: store.to_owned(),
        chunks,
    };
    (signed, files)
}

fn gossip_cfg(seeds: Vec<std::net::SocketAddr>) -> GossipConfig {
    let mut g = GossipConfig::with_listen("127.0.0.1:0".parse().unwrap());
    g.seeds = seeds;
    g.interval = Duration::from_millis(200);
    g
}

async fn node_state(relay: &SiteMember, node: &str) -> Option<NodePatch> {
    relay
        .gossip
        .view()
        .await
        .current_members()
        .into_iter()
        .find(|m| m.name == node)
        .and_then(|m| m.patch.state.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_installs_bakes_and_rolls_back_the_patch_its_relay_orders() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = MeshCa::generate("t").unwrap();
    let issue = |role, region: &str, site: &str, name: &str| {
        Credentials::issue(&ca, &Identity::new(role, region, site, name).unwrap()).unwrap()
    };
    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("patch.toml"), PATCH_TOML).unwrap();
    std::fs::write(src.join("install.sh"), "echo 1.2.3 > installed\n").unwrap();
    std::fs::write(src.join("rollback.sh"), "rm installed\n").unwrap();
    let (signed, files) = stage(
        &src,
        &issue(Role::Operator, "", "", "alice"),
        &tmp.path().join("relay"),
    );
    let id = signed.id();

    let shutdown = CancellationToken::new();
    let mut registry = Registry::default();
    let mut relay = SiteMember::start(
        issue(Role::Relay, "eu", "par", "relay"),
        &BTreeMap::new(),
        &gossip_cfg(vec![]),
        &HealthConfig::default(),
        &[],
        &mut registry,
        &shutdown,
    )
    .await
    .unwrap();
    let (_tx, served) = tokio::sync::watch::channel(None);
    tokio::spawn(distribute::serve(
        relay.routes.take(Protocol::Fetch),
        served,
        Some(Arc::new(files)),
        None,
        Default::default(),
        shutdown.child_token(),
    ));

    let patches = tmp.path().join("n1/patches");
    let mut cfg = NodeConfig {
        gossip: gossip_cfg(vec![relay.gossip.advertise_addr()]),
        metrics: MetricsConfig::with_listen("127.0.0.1:0".parse().unwrap()),
        ..NodeConfig::default()
    };
    cfg.config.state_dir = tmp.path().join("n1/config");
    cfg.patch.dir = patches.clone();
    let node = NodeAgent::start(issue(Role::Node, "eu", "par", "n1"), cfg, shutdown.clone())
        .await
        .unwrap();

    let order = |action, nodes: &[&str]| PatchOrder {
        run: 1,
        patch: id,
        action,
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
    };
    let publish = |o: PatchOrder| {
        let g = relay.gossip.clone();
        async move { g.set(vec![(keys::ORDER.to_owned(), o.encode())], "").await }
    };
    // An order naming another node: nothing happens.
    publish(order(OrderAction::Install, &["n2"])).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node_state(&relay, "n1").await, None);
    assert!(
        !patches.exists(),
        "nothing fetched for an order naming others"
    );

    publish(order(OrderAction::Install, &["n1", "n2"])).await;
    let healthy = eventually(Duration::from_secs(30), || async {
        node_state(&relay, "n1")
            .await
            .is_some_and(|s| s.state == PatchState::Healthy)
    })
    .await;
    assert!(healthy, "{:?}", node_state(&relay, "n1").await);
    let s = node_state(&relay, "n1").await.unwrap();
    assert_eq!((s.run, s.patch, s.failed), (1, id, false));
    let artifacts = patches.join(hex32(&id));
    assert_eq!(
        std::fs::read_to_string(artifacts.join("installed")).unwrap(),
        "1.2.3\n"
    );
    assert!(artifacts.join("rollback.sh").is_file());
    let record = std::fs::read_to_string(patches.join("state")).unwrap();
    assert!(record.contains("\"healthy\""), "{record}");

    publish(order(OrderAction::Rollback, &[])).await;
    let rolled_back = eventually(Duration::from_secs(30), || async {
        node_state(&relay, "n1")
            .await
            .is_some_and(|s| s.state == PatchState::RolledBack)
    })
    .await;
    assert!(rolled_back, "{:?}", node_state(&relay, "n1").await);
    assert!(!artifacts.join("installed").exists(), "rollback ran");

    // The same run ordered again is not installed again.
    publish(order(OrderAction::Install, &["n1"])).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        node_state(&relay, "n1").await.unwrap().state,
        PatchState::RolledBack
    );
    assert!(!artifacts.join("installed").exists());

    let metrics = metrics_text(&node).await;
    for state in [
        "downloading",
        "installing",
        "baking",
        "healthy",
        "rolling-back",
        "rolled-back",
    ] {
        let line = format!("trellis_node_patch_states_total{{state=\"{state}\"}} 1");
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }
    assert!(!metrics.contains("state=\"failed\""), "{metrics}");

    shutdown.cancel();
    node.stopped().await;
    relay.stopped().await;
}
