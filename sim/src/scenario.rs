//! Scenario files (TOML): the topology, the links, the production settings
//! the cores run with, a fault timeline, an operator's timeline of actions
//! (configuration changes), random fault rates, and resource trends,
//! anomalies and remediation rules on chosen nodes ([`ForesightSettings`],
//! [`Trend`], [`Anomaly`], [`RunbookSpec`]).
//!
//! Names are derived from the topology: regions `r1`, `r2`…, sites
//! `r1-s1`…, nodes `r1-s1-n1`…, the site's relay `r1-s1-relay`, hubs
//! `hub-1`… (hub *h* in region ((h − 1) mod regions) + 1).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod foresight;
pub use foresight::{
    Anomaly, AnomalyMetric, Bytes, DEFAULT_ACTION_TIME, DEFAULT_USED_AFTER, ForesightSettings,
    MAX_ACTION_TIME, Rate, RunbookSpec, Selection, Trend, TrendKind, locate_node, parse_bytes,
    parse_rate, watchable,
};

/// The largest signed bundle a node accepts (bytes).
const MAX_BUNDLE_BYTES: u64 = trellis_node::bundle::MAX_BUNDLE_BYTES as u64;

/// Why a scenario could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Virtual time the faults play out in.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Extra time with every fault healed, for backlogs to drain before
    /// the invariants are checked.
    #[serde(default = "default_drain", with = "humantime_serde")]
    pub drain: Duration,
    /// Resolution of `timeseries.csv`.
    #[serde(default = "default_sample", with = "humantime_serde")]
    pub sample_every: Duration,
    pub topology: Topology,
    #[serde(default)]
    pub gossip: GossipSettings,
    #[serde(default)]
    pub relay: RelaySettings,
    #[serde(default)]
    pub hub: HubSettings,
    #[serde(default)]
    pub links: Links,
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// What operators do during the run, in any order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<Action>,
    #[serde(default)]
    pub swarm: Swarm,
    /// How the nodes given a trend or an anomaly (and their control nodes)
    /// are modelled.
    #[serde(default, skip_serializing_if = "ForesightSettings::is_default")]
    pub foresight: ForesightSettings,
    /// Resource trends on chosen nodes: disks that fill.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trends: Vec<Trend>,
    /// Anomalies injected into chosen nodes' figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<Anomaly>,
    /// Remediation rules the modelled nodes run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runbooks: Vec<RunbookSpec>,
}

fn default_drain() -> Duration {
    Duration::from_secs(300)
}

fn default_sample() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub regions: usize,
    pub hubs: usize,
    pub sites_per_region: usize,
    pub nodes_per_site: usize,
    /// How many sites (the first ones, in name order) run real chitchat
    /// instead of the gossip model: a sample of the fleet.
    #[serde(default)]
    pub real_gossip_sites: usize,
    /// Sites, by name, that run real chitchat (in addition to the sample).
    #[serde(default)]
    pub real_gossip: Vec<String>,
}

/// Site gossip, as the nodes are configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipSettings {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub phi_threshold: f64,
    /// How often a node's health changes (a check flips between passing
    /// and warning), per node and virtual hour.
    pub health_changes_per_node_hour: f64,
}

/// Defaults are the daemons' own: a scenario that sets nothing simulates
/// a mesh as shipped.
impl Default for GossipSettings {
    fn default() -> Self {
        let node = trellis_node::config::GossipConfig::default();
        GossipSettings {
            interval: node.interval,
            phi_threshold: node.phi_threshold,
            health_changes_per_node_hour: 1.0,
        }
    }
}

/// The relays' settings (as in `trellis-relay`'s configuration, whose
/// defaults they take).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelaySettings {
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub failover_after: Duration,
    #[serde(with = "humantime_serde")]
    pub failback_every: Duration,
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    pub replay_bytes_per_s: u64,
    pub buffer_max_bytes: u64,
    #[serde(with = "humantime_serde")]
    pub keep_acked: Duration,
    /// Time for the virtual disk to make an append durable.
    #[serde(with = "humantime_serde")]
    pub fsync: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        let uplink = trellis_relay::config::UplinkConfig::default();
        let buffer = trellis_relay::config::BufferConfig::default();
        RelaySettings {
            summary_interval: uplink.summary_interval,
            sample_interval: uplink.sample_interval,
            ack_timeout: uplink.ack_timeout,
            failover_after: uplink.failover_after,
            failback_every: uplink.failback_every,
            max_backoff: uplink.max_backoff,
            replay_bytes_per_s: uplink.replay_bytes_per_s,
            buffer_max_bytes: buffer.max_bytes,
            keep_acked: buffer.keep_acked,
            fsync: Duration::from_millis(2),
        }
    }
}

/// The hubs' settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubSettings {
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    #[serde(with = "humantime_serde")]
    pub silence_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub anti_entropy_every: Duration,
    #[serde(with = "humantime_serde")]
    pub fsync: Duration,
}

impl Default for HubSettings {
    fn default() -> Self {
        let hub = trellis_hub::config::HubConfig::default();
        HubSettings {
            stale_after: hub.fleet.stale_after,
            silence_timeout: hub.uplink.silence_timeout,
            anti_entropy_every: hub.replication.anti_entropy_every,
            fsync: Duration::from_millis(2),
        }
    }
}

/// A class of links.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkClass {
    /// One-way latency.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// Uniform extra latency in [0, jitter).
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Share of packets lost (each loss costs a retransmission).
    pub loss: f64,
    /// Bytes per second.
    pub bandwidth: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Links {
    /// Inside a site (node ↔ node, node ↔ relay).
    pub lan: LinkClass,
    /// Relay ↔ hub.
    pub wan: LinkClass,
    /// Hub ↔ hub.
    pub hub: LinkClass,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            lan: LinkClass {
                latency: Duration::from_micros(300),
                jitter: Duration::from_micros(200),
                loss: 0.0,
                bandwidth: 125_000_000,
            },
            wan: LinkClass {
                latency: Duration::from_millis(40),
                jitter: Duration::from_millis(10),
                loss: 0.0,
                bandwidth: 1_250_000,
            },
            hub: LinkClass {
                latency: Duration::from_millis(10),
                jitter: Duration::from_millis(2),
                loss: 0.0,
                bandwidth: 12_500_000,
            },
        }
    }
}

impl Default for LinkClass {
    fn default() -> Self {
        Links::default().wan
    }
}

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The targeted sites' WAN links go down.
    WanOutage,
    /// `hubs` are cut off from the other hubs (hub ↔ hub links only).
    HubPartition,
    /// `hub` crashes, and restarts when the fault ends.
    HubCrash,
    /// The targeted sites' relays crash (losing what was not yet durable)
    /// and restart when the fault ends.
    RelayCrash,
    /// A `share` of the targeted sites' nodes crash, and restart when the
    /// fault ends.
    NodeCrash,
    /// `loss` on the links of `class` (lan, wan, hub).
    LossStorm,
    /// The targeted sites' relay buffers shrink to `max_bytes`.
    DiskFull,
}

impl FaultKind {
    /// The name scenario files use.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::WanOutage => "wan_outage",
            FaultKind::HubPartition => "hub_partition",
            FaultKind::HubCrash => "hub_crash",
            FaultKind::RelayCrash => "relay_crash",
            FaultKind::NodeCrash => "node_crash",
            FaultKind::LossStorm => "loss_storm",
            FaultKind::DiskFull => "disk_full",
        }
    }
}

/// One fault of the timeline. Sites are targeted by name (`sites`), by
/// region (`regions`), and/or by a `fraction` of them picked from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub kind: FaultKind,
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hubs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

impl Fault {
    /// A fault of `kind` on exactly these sites.
    pub fn on_sites(kind: FaultKind, at: Duration, duration: Duration, sites: Vec<String>) -> Self {
        Fault {
            kind,
            at,
            duration,
            sites,
            regions: Vec::new(),
            fraction: None,
            hubs: Vec::new(),
            hub: None,
            share: None,
            class: None,
            loss: None,
            max_bytes: None,
        }
    }

    pub fn targets_sites(&self) -> bool {
        matches!(
            self.kind,
            FaultKind::WanOutage
                | FaultKind::RelayCrash
                | FaultKind::NodeCrash
                | FaultKind::DiskFull
        )
    }
}

/// What an operator action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// A new configuration version is applied at `hub`; it spreads to the
    /// other hubs, the relays and the nodes.
    ConfigChange,
    /// A signed patch `name` is published at `hub`, which replicates it to
    /// the other hubs; nothing is installed until a rollout.
    PublishPatch,
    /// The hub the patch was published at rolls it out wave by wave.
    Rollout,
}

impl ActionKind {
    /// The name scenario files use.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::ConfigChange => "config_change",
            ActionKind::PublishPatch => "publish_patch",
            ActionKind::Rollout => "rollout",
        }
    }
}

/// The size of a configuration bundle when the scenario does not say: a
/// few dozen managed files.
pub const DEFAULT_BUNDLE_BYTES: u64 = 16 * 1024;
/// How long a node takes to apply a bundle (write its files, run its
/// reload commands) when the scenario does not say.
pub const DEFAULT_APPLY_TIME: Duration = Duration::from_millis(200);
/// The longest apply a scenario may ask for: a reload that takes longer
/// is a hung one, which the node kills at its reload timeout.
pub const MAX_APPLY_TIME: Duration = Duration::from_secs(3600);

/// A patch's artifacts together when the scenario does not say: a package
/// and its scripts.
pub const DEFAULT_ARTIFACT_BYTES: u64 = 50 * 1024 * 1024;
/// The most a patch may carry, as `trellis_node::patch` allows.
pub const MAX_ARTIFACT_BYTES: u64 = 1 << 30;
/// How long a node runs a patch's `install` commands by default.
pub const DEFAULT_INSTALL_TIME: Duration = Duration::from_secs(30);
/// How long a patched node's checks must keep passing by default.
pub const DEFAULT_BAKE: Duration = Duration::from_secs(300);
/// How long a node runs a patch's `rollback` commands by default.
pub const DEFAULT_ROLLBACK_TIME: Duration = Duration::from_secs(20);
/// The longest bake a patch may declare (`trellis_node::patch`'s limit);
/// install and rollback times are held to it too.
pub const MAX_PATCH_TIME: Duration = Duration::from_secs(24 * 3600);
/// The waves of a rollout that does not name them.
pub const DEFAULT_WAVES: &str = "canary,1site,10%,100%";
/// How much worse than the unpatched nodes a wave may fare by default.
pub const DEFAULT_MAX_FAILURE: f64 = 0.05;
/// At most this many patches per scenario: hubs gossip the set they hold
/// as a 64-bit mask.
pub const MAX_PATCHES: usize = 64;

/// One operator action of the timeline. Configuration changes are
/// numbered 1, 2, … in the order they happen (file order for equal
/// times); each supersedes the ones before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    pub kind: ActionKind,
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// The hub the operator applies the change, or publishes the patch, at
    /// (default: the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    /// `config_change`: the signed bundle's size, what relays and nodes
    /// download (default [`DEFAULT_BUNDLE_BYTES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_bytes: Option<u64>,
    /// `config_change`: how long a node takes from having the bundle to
    /// having applied it (default [`DEFAULT_APPLY_TIME`]).
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub apply_time: Option<Duration>,
    /// `publish_patch`: the patch's name, which rollouts refer to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `publish_patch`: its artifacts' bytes together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_bytes: Option<u64>,
    /// `publish_patch`: the chance, drawn per node from the seed, that
    /// installing makes the node's checks fail (0: a good patch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_probability: Option<f64>,
    /// `publish_patch`: how long `install` runs on a node.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub install_time: Option<Duration>,
    /// `publish_patch`: how long a patched node's checks must keep passing.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub bake: Option<Duration>,
    /// `publish_patch`: how long `rollback` runs on a node.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub rollback_time: Option<Duration>,
    /// `rollout`: the name of the patch to roll out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    /// `rollout`: the waves, as `trellis_node::waves::parse_waves` reads
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<String>,
    /// `rollout`: how much the patched nodes' failure ratio may exceed the
    /// unpatched ones'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failure: Option<f64>,
    /// `rollout`: whether a failed gate rolls the patched nodes back (else
    /// it only halts the rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_rollback: Option<bool>,
}

impl Action {
    /// An action of `kind` at `at` with every optional field unset.
    pub fn new(kind: ActionKind, at: Duration) -> Self {
        Action {
            kind,
            at,
            hub: None,
            bundle_bytes: None,
            apply_time: None,
            name: None,
            artifact_bytes: None,
            failure_probability: None,
            install_time: None,
            bake: None,
            rollback_time: None,
            patch: None,
            waves: None,
            max_failure: None,
            auto_rollback: None,
        }
    }

    /// A configuration change at `at`, applied at the first hub, with the
    /// default bundle size and apply time.
    pub fn config_change(at: Duration) -> Self {
        Action::new(ActionKind::ConfigChange, at)
    }

    /// The bundle's size, the default if unset.
    pub fn bundle_bytes(&self) -> u64 {
        self.bundle_bytes.unwrap_or(DEFAULT_BUNDLE_BYTES)
    }

    /// The apply time, the default if unset.
    pub fn apply_time(&self) -> Duration {
        self.apply_time.unwrap_or(DEFAULT_APPLY_TIME)
    }

    /// Which fields each kind reads: any other one set is refused.
    fn fields(&self) -> [(&'static str, bool, &'static [ActionKind]); 13] {
        use ActionKind::{ConfigChange as C, PublishPatch as P, Rollout as R};
        [
            ("hub", self.hub.is_some(), &[C, P]),
            ("bundle_bytes", self.bundle_bytes.is_some(), &[C]),
            ("apply_time", self.apply_time.is_some(), &[C]),
            ("name", self.name.is_some(), &[P]),
            ("artifact_bytes", self.artifact_bytes.is_some(), &[P]),
            (
                "failure_probability",
                self.failure_probability.is_some(),
                &[P],
            ),
            ("install_time", self.install_time.is_some(), &[P]),
            ("bake", self.bake.is_some(), &[P]),
            ("rollback_time", self.rollback_time.is_some(), &[P]),
            ("patch", self.patch.is_some(), &[R]),
            ("waves", self.waves.is_some(), &[R]),
            ("max_failure", self.max_failure.is_some(), &[R]),
            ("auto_rollback", self.auto_rollback.is_some(), &[R]),
        ]
    }
}

/// Random faults, per site and virtual hour, drawn from the seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Swarm {
    pub wan_flaps_per_site_hour: f64,
    pub relay_crashes_per_site_hour: f64,
    pub node_crashes_per_site_hour: f64,
    /// Mean length of a random fault.
    #[serde(with = "humantime_serde")]
    pub mean_duration: Duration,
}

impl Default for Swarm {
    fn default() -> Self {
        Swarm {
            wan_flaps_per_site_hour: 0.0,
            relay_crashes_per_site_hour: 0.0,
            node_crashes_per_site_hour: 0.0,
            mean_duration: Duration::from_secs(60),
        }
    }
}

impl Scenario {
    /// Reads, parses and validates a scenario file.
    pub fn load(path: &Path) -> Result<(Scenario, String), ScenarioError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: shown.clone(),
            source,
        })?;
        let s = Self::parse(&text, &shown)?;
        Ok((s, text))
    }

    pub fn parse(text: &str, path: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        s.validate().map_err(|message| ScenarioError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.topology;
        let ok = |c: bool, m: &str| if c { Ok(()) } else { Err(m.to_owned()) };
        ok(t.regions >= 1, "topology.regions must be at least 1")?;
        ok(
            t.hubs >= 1 && t.hubs <= 64,
            "topology.hubs must be between 1 and 64",
        )?;
        ok(
            t.sites_per_region >= 1,
            "topology.sites_per_region must be at least 1",
        )?;
        ok(
            (1..=10_000).contains(&t.nodes_per_site),
            "topology.nodes_per_site must be between 1 and 10000",
        )?;
        ok(
            t.real_gossip_sites <= t.regions * t.sites_per_region,
            "topology.real_gossip_sites is more than there are sites",
        )?;
        let names = self.site_names();
        for site in &t.real_gossip {
            ok(
                names.contains(site),
                &format!(
                    "topology.real_gossip: there is no site {site:?} (sites are named r1-s1, r1-s2, ...)"
                ),
            )?;
        }
        ok(
            self.duration > Duration::ZERO,
            "duration must be more than zero",
        )?;
        ok(
            self.sample_every >= Duration::from_millis(100),
            "sample_every must be at least 100ms",
        )?;
        ok(
            self.gossip.interval >= Duration::from_millis(10),
            "gossip.interval must be at least 10ms",
        )?;
        ok(
            (0.0..=3600.0).contains(&self.gossip.health_changes_per_node_hour),
            "gossip.health_changes_per_node_hour must be in [0, 3600]",
        )?;
        ok(
            self.relay.sample_interval >= Duration::from_millis(10),
            "relay.sample_interval must be at least 10ms",
        )?;
        ok(
            self.relay.replay_bytes_per_s >= 1024,
            "relay.replay_bytes_per_s must be at least 1024",
        )?;
        for (name, c) in [
            ("lan", &self.links.lan),
            ("wan", &self.links.wan),
            ("hub", &self.links.hub),
        ] {
            ok(
                (0.0..1.0).contains(&c.loss),
                &format!("links.{name}.loss must be in [0, 1)"),
            )?;
            ok(
                c.bandwidth > 0,
                &format!("links.{name}.bandwidth must be more than zero"),
            )?;
        }
        let hubs: Vec<String> = (1..=t.hubs).map(hub_name).collect();
        let sites = self.site_names();
        for (i, f) in self.faults.iter().enumerate() {
            let at = format!("faults[{i}] ({})", f.kind.name());
            if f.targets_sites() {
                for s in &f.sites {
                    ok(sites.contains(s), &format!("{at}: no site {s:?}"))?;
                }
                for r in &f.regions {
                    ok(
                        (1..=t.regions).any(|n| region_name(n) == *r),
                        &format!("{at}: no region {r:?}"),
                    )?;
                }
                if let Some(fr) = f.fraction {
                    ok(
                        (0.0..=1.0).contains(&fr),
                        &format!("{at}: fraction must be in [0, 1]"),
                    )?;
                }
                ok(
                    !f.sites.is_empty() || !f.regions.is_empty() || f.fraction.is_some(),
                    &format!("{at}: name sites, regions or a fraction"),
                )?;
            }
            match f.kind {
                FaultKind::NodeCrash => ok(
                    f.share.is_some_and(|s| (0.0..=1.0).contains(&s)),
                    &format!("{at}: needs share in [0, 1]"),
                )?,
                FaultKind::DiskFull => ok(
                    f.max_bytes.is_some_and(|b| b >= 16 * 1024),
                    &format!("{at}: needs max_bytes of at least 16384"),
                )?,
                FaultKind::HubPartition => {
                    ok(!f.hubs.is_empty(), &format!("{at}: needs hubs"))?;
                    for h in &f.hubs {
                        ok(hubs.contains(h), &format!("{at}: no hub {h:?}"))?;
                    }
                }
                FaultKind::HubCrash => ok(
                    f.hub.as_ref().is_some_and(|h| hubs.contains(h)),
                    &format!("{at}: needs hub, one of {}", hubs.join(", ")),
                )?,
                FaultKind::LossStorm => {
                    ok(
                        f.class
                            .as_deref()
                            .is_some_and(|c| ["lan", "wan", "hub"].contains(&c)),
                        &format!("{at}: class must be lan, wan or hub"),
                    )?;
                    ok(
                        f.loss.is_some_and(|l| (0.0..1.0).contains(&l)),
                        &format!("{at}: loss must be in [0, 1)"),
                    )?;
                }
                FaultKind::WanOutage | FaultKind::RelayCrash => {}
            }
            // A field the kind does not use is a mistake, not a no-op.
            let k = f.kind;
            let site_kind = f.targets_sites();
            for (field, set, used) in [
                ("sites", !f.sites.is_empty(), site_kind),
                ("regions", !f.regions.is_empty(), site_kind),
                ("fraction", f.fraction.is_some(), site_kind),
                ("share", f.share.is_some(), k == FaultKind::NodeCrash),
                ("max_bytes", f.max_bytes.is_some(), k == FaultKind::DiskFull),
                ("hubs", !f.hubs.is_empty(), k == FaultKind::HubPartition),
                ("hub", f.hub.is_some(), k == FaultKind::HubCrash),
                ("class", f.class.is_some(), k == FaultKind::LossStorm),
                ("loss", f.loss.is_some(), k == FaultKind::LossStorm),
            ] {
                ok(
                    !set || used,
                    &format!("{at}: `{field}` does not apply to this kind of fault"),
                )?;
            }
            ok(
                f.at <= self.duration,
                &format!("{at}: starts after the scenario ends"),
            )?;
        }
        for (i, a) in self.actions.iter().enumerate() {
            let at = format!("actions[{i}] ({})", a.kind.name());
            ok(
                a.at <= self.duration,
                &format!(
                    "{at}: `at` = {} is after the scenario ends (duration {}); \
                     make it at most the duration",
                    humantime::format_duration(a.at),
                    humantime::format_duration(self.duration)
                ),
            )?;
            if let Some(h) = &a.hub {
                ok(
                    hubs.contains(h),
                    &format!("{at}: `hub`: no hub {h:?}; use one of {}", hubs.join(", ")),
                )?;
            }
            // A field the kind does not read is a mistake, not a no-op.
            for (field, set, kinds) in a.fields() {
                ok(
                    !set || kinds.contains(&a.kind),
                    &format!(
                        "{at}: `{field}` does not apply to {}; remove it",
                        a.kind.name()
                    ),
                )?;
            }
            match a.kind {
                ActionKind::ConfigChange => {
                    ok(
                        (1..=MAX_BUNDLE_BYTES).contains(&a.bundle_bytes()),
                        &format!(
                            "{at}: `bundle_bytes` must be between 1 and {MAX_BUNDLE_BYTES} \
                             (the largest bundle a node accepts)"
                        ),
                    )?;
                    ok(
                        a.apply_time() <= MAX_APPLY_TIME,
                        &format!(
                            "{at}: `apply_time` must be at most {}",
                            humantime::format_duration(MAX_APPLY_TIME)
                        ),
                    )?;
                }
                ActionKind::PublishPatch => self.validate_publish(&at, a)?,
                ActionKind::Rollout => self.validate_rollout(&at, i, a)?,
            }
        }
        let published = self
            .actions
            .iter()
            .filter(|a| a.kind == ActionKind::PublishPatch)
            .count();
        ok(
            published <= MAX_PATCHES,
            &format!("at most {MAX_PATCHES} publish_patch actions; this scenario has {published}"),
        )?;
        self.validate_foresight()?;
        Ok(())
    }

    fn validate_publish(&self, at: &str, a: &Action) -> Result<(), String> {
        let ok = |c: bool, m: String| if c { Ok(()) } else { Err(m) };
        let name = a
            .name
            .as_deref()
            .ok_or_else(|| format!("{at}: needs `name`, the patch's name that rollouts use"))?;
        trellis_node::id::validate_name("patch name", name)
            .map_err(|e| format!("{at}: `name`: {e}"))?;
        let again = self
            .actions
            .iter()
            .filter(|b| b.kind == ActionKind::PublishPatch && b.name.as_deref() == Some(name))
            .count();
        ok(
            again == 1,
            format!(
                "{at}: patch {name:?} is published {again} times; give each patch its own name"
            ),
        )?;
        let bytes = a.artifact_bytes.unwrap_or(DEFAULT_ARTIFACT_BYTES);
        ok(
            (1..=MAX_ARTIFACT_BYTES).contains(&bytes),
            format!(
                "{at}: `artifact_bytes` must be between 1 and {MAX_ARTIFACT_BYTES} \
                 (the most a patch may carry)"
            ),
        )?;
        let p = a.failure_probability.unwrap_or(0.0);
        ok(
            (0.0..=1.0).contains(&p),
            format!("{at}: `failure_probability` must be in [0, 1]; 0 is a good patch"),
        )?;
        for (field, d) in [
            ("install_time", a.install_time),
            ("bake", a.bake),
            ("rollback_time", a.rollback_time),
        ] {
            ok(
                d.is_none_or(|d| d <= MAX_PATCH_TIME),
                format!(
                    "{at}: `{field}` must be at most {}",
                    humantime::format_duration(MAX_PATCH_TIME)
                ),
            )?;
        }
        Ok(())
    }

    fn validate_rollout(&self, at: &str, i: usize, a: &Action) -> Result<(), String> {
        let ok = |c: bool, m: String| if c { Ok(()) } else { Err(m) };
        let name = a
            .patch
            .as_deref()
            .ok_or_else(|| format!("{at}: needs `patch`, the name of a published patch"))?;
        let published = self
            .actions
            .iter()
            .find(|b| b.kind == ActionKind::PublishPatch && b.name.as_deref() == Some(name));
        let Some(p) = published else {
            let names: Vec<&str> = self
                .actions
                .iter()
                .filter(|b| b.kind == ActionKind::PublishPatch)
                .filter_map(|b| b.name.as_deref())
                .collect();
            return Err(if names.is_empty() {
                format!("{at}: `patch` {name:?} is never published; add a publish_patch action")
            } else {
                format!(
                    "{at}: `patch` {name:?} is never published; published: {}",
                    names.join(", ")
                )
            });
        };
        ok(
            p.at <= a.at,
            format!(
                "{at}: patch {name:?} is published at {}, after this rollout at {}; \
                 roll it out once it is published",
                humantime::format_duration(p.at),
                humantime::format_duration(a.at)
            ),
        )?;
        let twice = self.actions[..i]
            .iter()
            .any(|b| b.kind == ActionKind::Rollout && b.patch.as_deref() == Some(name));
        ok(
            !twice,
            format!("{at}: patch {name:?} is rolled out twice; a patch rolls out once"),
        )?;
        trellis_node::waves::parse_waves(a.waves.as_deref().unwrap_or(DEFAULT_WAVES))
            .map_err(|e| format!("{at}: `waves`: {e}"))?;
        let m = a.max_failure.unwrap_or(DEFAULT_MAX_FAILURE);
        ok(
            (0.0..=1.0).contains(&m),
            format!("{at}: `max_failure` must be in [0, 1] (a failure ratio)"),
        )?;
        Ok(())
    }

    /// Every site's name, in order.
    pub fn site_names(&self) -> Vec<String> {
        let t = &self.topology;
        (1..=t.regions)
            .flat_map(|r| (1..=t.sites_per_region).map(move |s| site_name(r, s)))
            .collect()
    }

    /// Whether the site at `index` (in [`Scenario::site_names`] order)
    /// runs real chitchat.
    pub fn real_gossip(&self, index: usize, name: &str) -> bool {
        index < self.topology.real_gossip_sites
            || self.topology.real_gossip.iter().any(|s| s == name)
    }

    pub fn total_nodes(&self) -> usize {
        self.topology.regions * self.topology.sites_per_region * self.topology.nodes_per_site
    }
}

pub fn region_name(r: usize) -> String {
    format!("r{r}")
}

pub fn site_name(r: usize, s: usize) -> String {
    format!("r{r}-s{s}")
}

pub fn hub_name(h: usize) -> String {
    format!("hub-{h}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
        name = "small"
        duration = "2m"
        [topology]
        regions = 2
        hubs = 2
        sites_per_region = 3
        nodes_per_site = 10
        [[faults]]
        kind = "wan_outage"
        at = "30s"
        duration = "40s"
        sites = ["r1-s2"]
        [[faults]]
        kind = "hub_crash"
        at = "1m"
        duration = "20s"
        hub = "hub-2"
    "#;

    #[test]
    fn a_scenario_parses_with_defaults_and_names_its_sites() {
        let s = Scenario::parse(SMALL, "small.toml").unwrap();
        assert_eq!(s.site_names().len(), 6);
        assert_eq!(s.total_nodes(), 60);
        assert_eq!(s.relay.summary_interval, Duration::from_secs(5));
        assert_eq!(s.faults.len(), 2);
    }

    #[test]
    fn sites_run_real_chitchat_by_name_or_as_the_first_n() {
        let sc = Scenario::parse(
            &SMALL.replace(
                "nodes_per_site = 10",
                "nodes_per_site = 10\nreal_gossip_sites = 1\nreal_gossip = [\"r2-s3\"]",
            ),
            "x.toml",
        )
        .unwrap();
        let real: Vec<String> = sc
            .site_names()
            .into_iter()
            .enumerate()
            .filter(|(i, n)| sc.real_gossip(*i, n))
            .map(|(_, n)| n)
            .collect();
        assert_eq!(real, ["r1-s1", "r2-s3"]);
    }

    #[test]
    fn faults_that_name_nothing_real_are_refused() {
        for (bad, needle) in [
            (SMALL.replace("r1-s2", "r9-s9"), "no site"),
            (
                SMALL.replace("hub = \"hub-2\"", "hub = \"hub-7\""),
                "needs hub",
            ),
            (SMALL.replace("hubs = 2", "hubs = 0"), "topology.hubs"),
            (
                SMALL.replace(
                    "kind = \"wan_outage\"",
                    "kind = \"wan_outage\"\nshare = 0.5",
                ),
                "`share` does not apply",
            ),
            (
                SMALL.replace(
                    "nodes_per_site = 10",
                    "nodes_per_site = 10\nreal_gossip = [\"r9-s1\"]",
                ),
                "no site \"r9-s1\"",
            ),
        ] {
            let err = Scenario::parse(&bad, "x.toml").unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = Scenario::parse("name = 1", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml"), "{err}");
    }

    const ACTIONS: &str = r#"
        [[actions]]
        kind = "config_change"
        at = "1m"
        [[actions]]
        kind = "config_change"
        at = "90s"
        hub = "hub-2"
        bundle_bytes = 1048576
        apply_time = "2s"
    "#;

    #[test]
    fn config_changes_parse_with_their_defaults_and_name_a_hub() {
        let s = Scenario::parse(&format!("{SMALL}{ACTIONS}"), "x.toml").unwrap();
        assert_eq!(
            s.actions,
            vec![
                Action::config_change(Duration::from_secs(60)),
                Action {
                    hub: Some("hub-2".into()),
                    bundle_bytes: Some(1 << 20),
                    apply_time: Some(Duration::from_secs(2)),
                    ..Action::config_change(Duration::from_secs(90))
                },
            ]
        );
        // Written back (as schedule.toml is), they read the same.
        let back = Scenario::parse(&toml::to_string(&s).unwrap(), "back.toml").unwrap();
        assert_eq!(back.actions, s.actions);
        // Without actions, nothing about them is written.
        let plain = Scenario::parse(SMALL, "x.toml").unwrap();
        assert!(!toml::to_string(&plain).unwrap().contains("actions"));
    }

    #[test]
    fn bad_actions_are_refused_naming_the_action_and_the_field() {
        let with = |a: &str| format!("{SMALL}{a}");
        for (bad, needles) in [
            (
                with("[[actions]]\nkind = \"reboot\"\nat = \"1m\"\n"),
                vec!["x.toml", "unknown variant `reboot`", "config_change"],
            ),
            (
                with(&ACTIONS.replace("at = \"90s\"", "at = \"3m\"")),
                vec![
                    "actions[1] (config_change)",
                    "`at` = 3m is after the scenario ends (duration 2m)",
                ],
            ),
            (
                with(&ACTIONS.replace("hub-2", "h1")),
                vec![
                    "actions[1] (config_change)",
                    "no hub \"h1\"; use one of hub-1, hub-2",
                ],
            ),
            (
                with(&ACTIONS.replace("1048576", "0")),
                vec!["actions[1] (config_change): `bundle_bytes` must be between 1"],
            ),
            (
                with(&ACTIONS.replace("\"2s\"", "\"2h\"")),
                vec!["actions[1] (config_change): `apply_time` must be at most 1h"],
            ),
            (
                with(&ACTIONS.replace("hub = \"hub-2\"", "sites = [\"r1-s1\"]")),
                vec!["unknown field `sites`"],
            ),
            (
                with("[[actions]]\nkind = \"config_change\"\n"),
                vec!["missing field `at`"],
            ),
        ] {
            let err = Scenario::parse(&bad, "x.toml").unwrap_err().to_string();
            for needle in needles {
                assert!(err.contains(needle), "{needle:?} not in: {err}");
            }
        }
    }
}
