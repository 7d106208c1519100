//! `trellis up`: a real local mesh in one process.
//!
//! Every member is the production code path: its own QUIC endpoint on
//! 127.0.0.1, its own certificate from a fresh (or given) mesh CA, real
//! gossip, real relay uplinks to real hubs serving the real API. With
//! several hubs they federate, and the sites are spread over them (each
//! relay prefers one hub and fails over to the others).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use trellis_node::agent::NodeAgent;
use trellis_node::config::{GossipConfig, MetricsConfig, NodeConfig};
use trellis_node::id::{Identity, Role};
use trellis_node::tls::{CA_CERT_FILE, Credentials, MeshCa};
use trellis_relay::config::RelayConfig;
use trellis_relay::driver::Relay;

use crate::config::HubConfig;
use crate::driver::Hub;

/// Region of every site of a local mesh.
pub const REGION: &str = "local";

/// What to start.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub sites: usize,
    pub nodes: usize,
    pub hubs: usize,
    pub api: SocketAddr,
    /// Keep the CA and the members' state here (reused if present); a
    /// temporary directory otherwise.
    pub dir: Option<PathBuf>,
    pub gossip_interval: Duration,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            sites: 3,
            nodes: 10,
            hubs: 1,
            api: crate::config::DEFAULT_API.parse().expect("valid default"),
            dir: None,
            gossip_interval: trellis_node::config::DEFAULT_GOSSIP_INTERVAL,
        }
    }
}

/// A running local mesh.
pub struct LocalMesh {
    /// The hubs; the first serves the API at `--api`.
    pub hubs: Vec<Hub>,
    pub relays: Vec<Relay>,
    pub nodes: Vec<NodeAgent>,
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    expected_nodes: u32,
}

/// The operator `trellis up` issues a certificate for (`DIR/operator.crt`).
pub const OPERATOR: &str = "operator";

pub fn site_name(i: usize) -> String {
    format!("site-{}", i + 1)
}

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

impl LocalMesh {
    /// Starts the hubs, then each site's relay, then its nodes.
    pub async fn start(opts: &UpOptions, shutdown: CancellationToken) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=100).contains(&opts.sites),
            "--sites must be between 1 and 100"
        );
        anyhow::ensure!(
            (1..=200).contains(&opts.nodes),
            "--nodes must be between 1 and 200"
        );
        trellis_node::tls::install_crypto_provider();
        let (dir, tmp) = match &opts.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new().prefix("trellis-up-").tempdir()?;
                (t.path().to_owned(), Some(t))
            }
        };
        let ca = load_or_create_ca(&dir)?;
        // An operator's certificate, to sign configuration versions with.
        ca.issue(
            &Identity::new(Role::Operator, "", "", OPERATOR)?,
            trellis_node::tls::DEFAULT_CERT_DAYS,
        )?
        .save(&dir, true)?;
        // Every member's certificate is recorded in the CA directory, so
        // that `trellis ca revoke --dir DIR NAME` works on the local mesh.
        let issue = |role, site: &str, name: &str| -> anyhow::Result<Credentials> {
            let region = if role == Role::Operator { "" } else { REGION };
            let identity = Identity::new(role, region, site, name)?;
            let issued = ca.issue(&identity, trellis_node::tls::DEFAULT_CERT_DAYS)?;
            trellis_node::tls::IssuedRecord::of(&identity, &issued.cert_pem)?.append(&dir)?;
            Ok(Credentials::from_pem(
                ca.cert_pem(),
                &issued.cert_pem,
                &issued.key_pem,
            )?)
        };

        anyhow::ensure!(
            (1..=5).contains(&opts.hubs),
            "--hubs must be between 1 and 5"
        );
        let mut hubs: Vec<Hub> = Vec::new();
        for h in 0..opts.hubs {
            let name = format!("hub-{}", h + 1);
            let hub_cfg = HubConfig {
                uplink: crate::config::HubUplinkConfig {
                    listen: local(),
                    ..Default::default()
                },
                api: crate::config::ApiConfig {
                    listen: if h == 0 { opts.api } else { local() },
                    ..Default::default()
                },
                store: crate::config::StoreConfig {
                    path: dir.join(&name).join("hub.db"),
                    ..Default::default()
                },
                federation: crate::config::FederationConfig {
                    peers: hubs.iter().map(|h| h.federation_addr()).collect(),
                    ..Default::default()
                },
                ..HubConfig::default()
            };
            hubs.push(Hub::start(issue(Role::Hub, "", &name)?, hub_cfg, shutdown.clone()).await?);
        }
        let gossip = |seeds: Vec<SocketAddr>| GossipConfig {
            seeds,
            interval: opts.gossip_interval,
            ..GossipConfig::with_listen(local())
        };
        let width = opts.nodes.to_string().len().max(2);
        let mut relays = Vec::new();
        let mut nodes = Vec::new();
        for s in 0..opts.sites {
            let site = site_name(s);
            let relay_name = format!("{site}-relay");
            let mut relay_cfg = RelayConfig {
                gossip: gossip(vec![]),
                metrics: MetricsConfig::off(),
                ..RelayConfig::default()
            };
            // Site i prefers hub i (round the list), then the others.
            relay_cfg.uplink.hubs = (0..hubs.len())
                .map(|k| hubs[(s + k) % hubs.len()].uplink_addr().to_string())
                .collect();
            relay_cfg.buffer.path = dir.join(&relay_name).join("outage.db");
            relay_cfg.api.listen = local().to_string().parse().expect("an address");
            let relay = Relay::start(
                issue(Role::Relay, &site, &relay_name)?,
                relay_cfg,
                shutdown.clone(),
            )
            .await?;
            let seed = relay.gossip_addr();
            relays.push(relay);
            for n in 0..opts.nodes {
                let name = format!("{site}-n{:0width$}", n + 1);
                let mut cfg = NodeConfig {
                    gossip: gossip(vec![seed]),
                    metrics: MetricsConfig::off(),
                    ..NodeConfig::default()
                };
                // Each node keeps what it applied and its patches apart, as
                // on its own machine.
                cfg.config.state_dir = dir.join(&name).join("config");
                cfg.patch.dir = dir.join(&name).join("patches");
                // And writes its managed files under its own root, not
                // over this machine's /etc.
                cfg.config.root = Some(dir.join(&name).join("root"));
                cfg.config.drift_interval = Duration::from_secs(10);
                // Something for configuration selectors to pick: odd nodes
                // are web servers, even ones databases.
                let role = if n % 2 == 0 { "web" } else { "db" };
                cfg.node.labels.insert("role".to_owned(), role.to_owned());
                nodes.push(
                    NodeAgent::start(issue(Role::Node, &site, &name)?, cfg, shutdown.clone())
                        .await?,
                );
            }
        }
        Ok(LocalMesh {
            hubs,
            relays,
            nodes,
            dir,
            _tmp: tmp,
            expected_nodes: (opts.sites * opts.nodes) as u32,
        })
    }

    /// Where the CA is kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn expected_nodes(&self) -> u32 {
        self.expected_nodes
    }

    /// Waits until the hub sees every node alive, reporting progress;
    /// returns how long it took, or `None` after `limit`.
    pub async fn wait_all_alive(
        &self,
        limit: Duration,
        mut progress: impl FnMut(u32, u32),
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(f) = self.hubs[0].fleet().await {
                progress(f.totals.nodes_alive, self.expected_nodes);
                if f.totals.nodes_alive == self.expected_nodes && f.totals.nodes_dead == 0 {
                    return Some(start.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Waits for every member to stop (after the shutdown token was
    /// cancelled).
    pub async fn stopped(self) {
        for n in self.nodes {
            n.stopped().await;
        }
        for r in self.relays {
            r.stopped().await;
        }
        for h in self.hubs {
            h.stopped().await;
        }
    }
}

fn load_or_create_ca(dir: &Path) -> anyhow::Result<MeshCa> {
    if dir.join(CA_CERT_FILE).exists() {
        return Ok(MeshCa::load(dir)?);
    }
    let ca = MeshCa::generate("trellis-up")?;
    ca.save(dir)?;
    Ok(ca)
}
