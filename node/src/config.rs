//! Configuration files (TOML) for the node agent, and the sections relays
//! and hubs share with it.
//!
//! Every section has defaults that work on one machine, unknown keys are
//! rejected (a typo is an error, not a silently ignored setting), durations
//! are human (`"1s"`, `"500ms"`, `"24h"`), and [`Validate::validate`] rejects
//! values that parse but make no sense. Relative paths are taken relative to
//! the directory of the configuration file.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::apply::DriftMode;
use crate::gossip::GossipSettings;
use crate::tls::{Credentials, TlsError};

/// Why a configuration could not be used. Nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: `{field}` {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path}: {source}")]
    Credentials { path: PathBuf, source: TlsError },
}

/// Collects problems found while validating, with the file they came from.
pub struct Problems<'a> {
    path: &'a Path,
    first: Option<ConfigError>,
}

impl<'a> Problems<'a> {
    pub fn new(path: &'a Path) -> Self {
        Problems { path, first: None }
    }

    /// Records a problem with `field` unless `ok`.
    pub fn check(&mut self, ok: bool, field: &str, problem: impl Display) {
        if !ok && self.first.is_none() {
            self.first = Some(ConfigError::Invalid {
                path: self.path.to_owned(),
                field: field.to_owned(),
                problem: problem.to_string(),
            });
        }
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        self.first.map_or(Ok(()), Err)
    }
}

/// Semantic checks beyond what the types enforce.
pub trait Validate {
    /// Fills in role-dependent defaults a partial section left unset.
    fn normalize(&mut self) {}
    fn validate(&self, problems: &mut Problems<'_>);
}

/// A configuration file read, parsed and validated, with the directory its
/// relative paths are taken from.
pub struct Loaded<T> {
    pub config: T,
    pub path: PathBuf,
    pub base_dir: PathBuf,
}

impl<T> Loaded<T> {
    /// Resolves a path from the configuration against its directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// Reads `path` (or takes every default when `None`), parses and validates.
pub fn load<T: DeserializeOwned + Default + Validate>(
    path: Option<&Path>,
) -> Result<Loaded<T>, ConfigError> {
    let (config, path, base_dir) = match path {
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            (T::default(), PathBuf::from("<defaults>"), cwd)
        }
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let config = parse::<T>(&text, path)?;
            let base = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_owned();
            (config, path.to_owned(), base)
        }
    };
    let mut config = config;
    config.normalize();
    let mut problems = Problems::new(&path);
    config.validate(&mut problems);
    problems.finish()?;
    Ok(Loaded {
        config,
        path,
        base_dir,
    })
}

/// Parses TOML text; `path` is only used in messages.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    })
}

/// `[identity]`: where the member's certificate, key and the mesh CA are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// The mesh CA certificate (`ca.crt` from `trellis ca init`).
    pub ca: Option<PathBuf>,
    /// This member's certificate (`NAME.crt` from `trellis ca issue`).
    pub cert: Option<PathBuf>,
    /// This member's private key (`NAME.key`).
    pub key: Option<PathBuf>,
}

impl IdentityConfig {
    /// Defaults: `tls/ca.crt`, `tls/NAME.crt`, `tls/NAME.key`.
    pub fn for_name(name: &str) -> Self {
        IdentityConfig {
            ca: Some(PathBuf::from("tls/ca.crt")),
            cert: Some(PathBuf::from(format!("tls/{name}.crt"))),
            key: Some(PathBuf::from(format!("tls/{name}.key"))),
        }
    }

    /// Fills the paths left unset from `defaults`.
    pub fn or(self, defaults: IdentityConfig) -> Self {
        IdentityConfig {
            ca: self.ca.or(defaults.ca),
            cert: self.cert.or(defaults.cert),
            key: self.key.or(defaults.key),
        }
    }

    /// The paths as they are (resolved by the member's configuration
    /// loader), for enrolment and renewal; unset ones are empty.
    pub fn files(&self) -> crate::enrol::IdentityFiles {
        crate::enrol::IdentityFiles {
            ca: self.ca.clone().unwrap_or_default(),
            cert: self.cert.clone().unwrap_or_default(),
            key: self.key.clone().unwrap_or_default(),
        }
    }

    /// The certificate path (after [`Validate::normalize`]).
    pub fn cert_path(&self) -> &Path {
        self.cert.as_deref().unwrap_or(Path::new("tls/member.crt"))
    }

    /// Loads the credentials, with paths resolved against the config file.
    /// Call after [`Validate::normalize`] filled in the role's defaults.
    pub fn load<T>(&self, loaded: &Loaded<T>) -> Result<Credentials, ConfigError> {
        let p = |x: &Option<PathBuf>, what: &str| {
            x.as_deref()
                .map(|x| loaded.resolve(x))
                .ok_or_else(|| ConfigError::Invalid {
                    path: loaded.path.clone(),
                    field: format!("identity.{what}"),
                    problem: "is not set".into(),
                })
        };
        Credentials::load(
            &p(&self.ca, "ca")?,
            &p(&self.cert, "cert")?,
            &p(&self.key, "key")?,
        )
        .map_err(|source| ConfigError::Credentials {
            path: loaded.path.clone(),
            source,
        })
    }
}

/// Time between a member's gossip rounds unless configured. At 1 s a
/// member of a 100-member site sent about 780 B/s of gossip; at 1.5 s (and
/// the threshold lowered to keep the time to a failure verdict) about a
/// quarter less, with a changed value taking 2.6 to 3.1 s instead of
/// 1.2 s to reach everyone (docs/BENCHMARKS.md).
pub const DEFAULT_GOSSIP_INTERVAL: Duration = Duration::from_millis(1500);

/// Failure detector threshold unless configured: at
/// [`DEFAULT_GOSSIP_INTERVAL`], about 8 s of silence to a verdict.
pub const DEFAULT_PHI_THRESHOLD: f64 = 5.5;

/// `[gossip]`: the site's chitchat cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// UDP address of this member's QUIC endpoint (default depends on the
    /// role: 7900 for nodes, 7901 for relays, on 127.0.0.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// The address other members reach this one at. Needed when `listen`
    /// is a wildcard (0.0.0.0) or behind NAT; port 0 means the bound port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Members to contact first (usually the site's relay).
    pub seeds: Vec<SocketAddr>,
    /// Time between gossip rounds. A member's bytes and CPU for gossip
    /// go with the number of rounds; a changed value reaches the whole
    /// site in one to three rounds.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Failure detector threshold (phi): a member is declared failed
    /// after about this many times the usual gap between news of its
    /// heartbeat (about a gossip interval) passes without any. Higher is
    /// slower but surer. The defaults, 5.5 at 1.5 s, declare a member
    /// failed about 8 s after it falls silent.
    pub phi_threshold: f64,
    /// How long a dead member stays listed before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub dead_node_grace: Duration,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig {
            listen: None,
            advertise: None,
            seeds: Vec::new(),
            interval: DEFAULT_GOSSIP_INTERVAL,
            phi_threshold: DEFAULT_PHI_THRESHOLD,
            dead_node_grace: Duration::from_secs(24 * 3600),
        }
    }
}

impl GossipConfig {
    pub fn with_listen(listen: SocketAddr) -> Self {
        GossipConfig {
            listen: Some(listen),
            ..GossipConfig::default()
        }
    }

    /// The listen address (after [`Validate::normalize`]).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or(([127, 0, 0, 1], NODE_GOSSIP_PORT).into())
    }

    pub fn settings(&self) -> GossipSettings {
        GossipSettings {
            interval: self.interval,
            phi_threshold: self.phi_threshold,
            dead_node_grace: self.dead_node_grace,
            seeds: self.seeds.clone(),
            advertise: self.advertise,
        }
    }
}

impl Validate for GossipConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        p.check(
            !self.listen_addr().ip().is_unspecified() || self.advertise.is_some(),
            "gossip.listen",
            format!(
                "is {}, a wildcard; set gossip.advertise to the address the site's other members reach this one at",
                self.listen_addr()
            ),
        );
        p.check(
            self.advertise.is_none_or(|a| !a.ip().is_unspecified()),
            "gossip.advertise",
            "must be an address others can reach, not a wildcard",
        );
        p.check(
            self.interval >= Duration::from_millis(50) && self.interval <= Duration::from_secs(60),
            "gossip.interval",
            format!(
                "is {:?}; use between 50ms and 60s (1500ms is the default)",
                self.interval
            ),
        );
        p.check(
            self.phi_threshold.is_finite() && (1.0..=64.0).contains(&self.phi_threshold),
            "gossip.phi_threshold",
            format!(
                "is {}; use between 1 and 64 ({DEFAULT_PHI_THRESHOLD} at the default interval, about 8 s to a verdict)",
                self.phi_threshold
            ),
        );
        p.check(
            self.dead_node_grace >= Duration::from_secs(60),
            "gossip.dead_node_grace",
            "must be at least 60s so dead members are reported before being forgotten",
        );
    }
}

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// TCP address of the Prometheus endpoint (default depends on the
    /// role: 7910 for nodes, 7911 for relays, on 127.0.0.1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            listen: None,
        }
    }
}

impl MetricsConfig {
    pub fn with_listen(listen: SocketAddr) -> Self {
        MetricsConfig {
            enabled: true,
            listen: Some(listen),
        }
    }

    /// Metrics switched off.
    pub fn off() -> Self {
        MetricsConfig {
            enabled: false,
            listen: None,
        }
    }

    /// The listen address (after [`Validate::normalize`]).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
            .unwrap_or(([127, 0, 0, 1], NODE_METRICS_PORT).into())
    }
}

/// `[health]`: how often resources are sampled and when they are a problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between resource samples (and health publications).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Fullest disk at or above this percentage: warning.
    pub disk_warning_pct: u8,
    /// Fullest disk at or above this percentage: critical.
    pub disk_critical_pct: u8,
    /// Memory use at or above this percentage: warning.
    pub memory_warning_pct: u8,
    /// Memory use at or above this percentage: critical.
    pub memory_critical_pct: u8,
    /// Anomalies and forecasts on this member's own figures.
    pub foresight: crate::foresight::ForesightConfig,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval: Duration::from_secs(2),
            disk_warning_pct: 90,
            disk_critical_pct: 97,
            memory_warning_pct: 95,
            memory_critical_pct: 99,
            foresight: Default::default(),
        }
    }
}

impl Validate for HealthConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        for (field, problem) in self.foresight.problems() {
            p.check(false, field, problem);
        }
        p.check(
            self.interval >= Duration::from_millis(100),
            "health.interval",
            "must be at least 100ms",
        );
        for (field, warn, crit) in [
            ("disk", self.disk_warning_pct, self.disk_critical_pct),
            ("memory", self.memory_warning_pct, self.memory_critical_pct),
        ] {
            p.check(
                (1..=100).contains(&warn) && (1..=100).contains(&crit) && warn <= crit,
                &format!("health.{field}_warning_pct"),
                format!(
                    "and `health.{field}_critical_pct` must be percentages (1-100) with warning <= critical, got {warn} and {crit}"
                ),
            );
        }
    }
}

/// Built-in checks derived from resource thresholds; user checks may not
/// take these names.
pub const RESERVED_CHECK_NAMES: [&str; 2] = ["disk", "memory"];

/// `[[checks]]`: one user check. Exactly one of `command`, `http`, `tcp`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub name: String,
    /// Program and arguments; exit 0 passing, 1 warning, anything else critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// URL to GET; 2xx passing, 429 warning, anything else critical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// `host:port` to connect to; connected is passing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What a check does.
#[derive(Debug, Clone, PartialEq)]
pub enum CheckKind {
    Command(Vec<String>),
    Http(String),
    Tcp(String),
}

impl CheckConfig {
    /// The check's kind; only meaningful after validation.
    pub fn kind(&self) -> CheckKind {
        match (&self.command, &self.http, &self.tcp) {
            (Some(c), _, _) => CheckKind::Command(c.clone()),
            (_, Some(u), _) => CheckKind::Http(u.clone()),
            (_, _, Some(a)) => CheckKind::Tcp(a.clone()),
            _ => unreachable!("validated: exactly one kind"),
        }
    }
}

/// Validates a list of checks (`checks[i]` in messages).
pub fn validate_checks(checks: &[CheckConfig], p: &mut Problems<'_>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, c) in checks.iter().enumerate() {
        let field = format!("checks[{i}]");
        p.check(
            crate::id::validate_name("check name", &c.name).is_ok(),
            &format!("{field}.name"),
            format!("{:?} is not a valid name (a-z, 0-9, '-', '_', '.')", c.name),
        );
        p.check(
            !RESERVED_CHECK_NAMES.contains(&c.name.as_str()),
            &format!("{field}.name"),
            format!("{:?} is reserved for the built-in resource check", c.name),
        );
        p.check(
            seen.insert(c.name.as_str()),
            &format!("{field}.name"),
            format!("{:?} is used by an earlier check", c.name),
        );
        let kinds = [c.command.is_some(), c.http.is_some(), c.tcp.is_some()];
        p.check(
            kinds.iter().filter(|k| **k).count() == 1,
            &field,
            "needs exactly one of `command`, `http` or `tcp`",
        );
        if let Some(cmd) = &c.command {
            p.check(
                cmd.first().is_some_and(|p| !p.is_empty()),
                &format!("{field}.command"),
                "must name a program, e.g. [\"systemctl\", \"is-active\", \"sshd\"]",
            );
        }
        if let Some(url) = &c.http {
            p.check(
                url.starts_with("http://") || url.starts_with("https://"),
                &format!("{field}.http"),
                format!("{url:?} is not an http:// or https:// URL"),
            );
        }
        if let Some(addr) = &c.tcp {
            p.check(
                addr.rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()),
                &format!("{field}.tcp"),
                format!("{addr:?} is not host:port"),
            );
        }
        p.check(
            c.interval >= Duration::from_millis(100),
            &format!("{field}.interval"),
            "must be at least 100ms",
        );
        p.check(
            !c.timeout.is_zero() && c.timeout <= c.interval,
            &format!("{field}.timeout"),
            "must be more than zero and at most the interval",
        );
    }
}

/// Most labels a node may carry.
pub const MAX_LABELS: usize = 64;

/// `[node]`: what the node says about itself beyond its certificate.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// Labels describing this node (`role = "web"`, `rack = "r12"`), so
    /// that it can be picked by more than its region, site and name.
    pub labels: BTreeMap<String, String>,
}

/// Whether `s` may be a label key or value: 1 to 63 characters of
/// `A-Z a-z 0-9 . _ -`, so labels read the same in TOML, URLs and metrics.
pub fn valid_label_part(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Validate for NodeSection {
    fn validate(&self, p: &mut Problems<'_>) {
        p.check(
            self.labels.len() <= MAX_LABELS,
            "node.labels",
            format!(
                "has {} labels; at most {MAX_LABELS} are allowed",
                self.labels.len()
            ),
        );
        for (key, value) in &self.labels {
            p.check(
                valid_label_part(key),
                "node.labels",
                format!("key {key:?} must be 1 to 63 characters of A-Z, a-z, 0-9, '.', '_', '-'"),
            );
            p.check(
                valid_label_part(value),
                &format!("node.labels.{key}"),
                format!("{value:?} must be 1 to 63 characters of A-Z, a-z, 0-9, '.', '_', '-'"),
            );
        }
    }
}

/// Where a node keeps what it applied when the configuration does not say;
/// the node has no other data directory to put it under.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/trellis/config";

/// `[config]`: the files Trellis manages on this node: where what was
/// applied is remembered, and what is done about drift.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApplyConfig {
    /// Directory for the last applied state (created on the first apply).
    pub state_dir: PathBuf,
    /// Time between two looks at the managed files.
    #[serde(with = "humantime_serde")]
    pub drift_interval: Duration,
    /// `heal`: rewrite a drifted file and run its reload commands;
    /// `report`: log and count it only.
    pub drift: DriftMode,
    /// Longest a reload command may run before it is killed.
    #[serde(with = "humantime_serde")]
    pub reload_timeout: Duration,
    /// Write managed files under this directory instead of `/` (a path
    /// `/etc/motd` becomes `ROOT/etc/motd`): for several nodes on one
    /// machine, or a node in a container with the host's files mounted
    /// elsewhere. Unset: the paths as the manifests give them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            drift_interval: Duration::from_secs(60),
            drift: DriftMode::Heal,
            reload_timeout: Duration::from_secs(30),
            root: None,
        }
    }
}

impl Validate for ApplyConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        p.check(
            !self.state_dir.as_os_str().is_empty(),
            "config.state_dir",
            format!("must name a directory (default {DEFAULT_STATE_DIR})"),
        );
        p.check(
            self.drift_interval >= Duration::from_secs(1),
            "config.drift_interval",
            format!(
                "is {:?}; use at least 1s (60s is a good default)",
                self.drift_interval
            ),
        );
        p.check(
            self.root.as_ref().is_none_or(|r| !r.as_os_str().is_empty()),
            "config.root",
            "must name a directory, or be left out to write managed files where the manifests say",
        );
        p.check(
            self.reload_timeout >= Duration::from_secs(1)
                && self.reload_timeout <= Duration::from_secs(600),
            "config.reload_timeout",
            format!(
                "is {:?}; use between 1s and 10m (30s is a good default)",
                self.reload_timeout
            ),
        );
    }
}

/// Where a node keeps patches when the configuration does not say.
pub const DEFAULT_PATCH_DIR: &str = "/var/lib/trellis/patches";

/// `[join]`: enrolment at the agent's first start, for machines built from
/// an image with the token in their configuration: with no certificate
/// yet, the agent enrols through `relay` with `token` (as `trellis-node
/// enroll` does), waiting as long as it takes, then starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JoinConfig {
    /// The site relay's enrolment address (its `[enrol] listen`).
    pub relay: Option<String>,
    /// The join token (`trellis token create`).
    pub token: Option<String>,
    /// This machine's name in the fleet (default: its hostname).
    pub name: Option<String>,
}

/// `[renewal]`: renewing the node's certificate before it expires, through
/// its relay's enrolment endpoint ([`crate::enrol`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenewalConfig {
    /// Renew once the certificate expires within this long.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    /// How often the certificate's expiry is looked at.
    #[serde(with = "humantime_serde")]
    pub check_every: Duration,
    /// For a relay: the hub enrolment endpoint it renews at (the hub's
    /// `[enrolment] listen`, host:port); unset, it is not renewed. Nodes
    /// renew through their site's relay and leave this unset.
    pub hub: Option<String>,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            renew_before: Duration::from_secs(30 * 86400),
            check_every: Duration::from_secs(3600),
            hub: None,
        }
    }
}

/// `[patch]`: how the node installs the patches its relay orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchConfig {
    /// Directory for the node's last patch run (`state`), the chunks it
    /// fetched (`chunks/`) and each patch's artifacts (`ID/`, where its
    /// commands run).
    pub dir: PathBuf,
    /// Longest an `install` or `rollback` command may run before it is
    /// killed (and counts as failed).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
}

impl Default for PatchConfig {
    fn default() -> Self {
        PatchConfig {
            dir: PathBuf::from(DEFAULT_PATCH_DIR),
            command_timeout: Duration::from_secs(600),
        }
    }
}

impl Validate for PatchConfig {
    fn validate(&self, p: &mut Problems<'_>) {
        p.check(
            !self.dir.as_os_str().is_empty(),
            "patch.dir",
            format!("must name a directory (default {DEFAULT_PATCH_DIR})"),
        );
        p.check(
            !self.command_timeout.is_zero(),
            "patch.command_timeout",
            "must be longer than 0s; give install commands the time they need (10m is the default)",
        );
    }
}

/// The node agent's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    pub identity: IdentityConfig,
    pub node: NodeSection,
    pub gossip: GossipConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub config: ApplyConfig,
    pub patch: PatchConfig,
    pub renewal: RenewalConfig,
    pub join: JoinConfig,
    pub checks: Vec<CheckConfig>,
}

/// Default UDP port of a node's gossip endpoint.
pub const NODE_GOSSIP_PORT: u16 = 7900;
/// Default TCP port of a node's `/metrics`.
pub const NODE_METRICS_PORT: u16 = 7910;

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            identity: IdentityConfig::for_name("node"),
            node: NodeSection::default(),
            gossip: GossipConfig::with_listen(([127, 0, 0, 1], NODE_GOSSIP_PORT).into()),
            health: HealthConfig::default(),
            metrics: MetricsConfig::with_listen(([127, 0, 0, 1], NODE_METRICS_PORT).into()),
            config: ApplyConfig::default(),
            patch: PatchConfig::default(),
            renewal: RenewalConfig::default(),
            join: JoinConfig::default(),
            checks: Vec::new(),
        }
    }
}

impl Validate for NodeConfig {
    fn normalize(&mut self) {
        let d = NodeConfig::default();
        self.identity = std::mem::take(&mut self.identity).or(d.identity);
        self.gossip.listen = self.gossip.listen.or(d.gossip.listen);
        self.metrics.listen = self.metrics.listen.or(d.metrics.listen);
    }

    fn validate(&self, p: &mut Problems<'_>) {
        self.node.validate(p);
        self.gossip.validate(p);
        self.health.validate(p);
        self.config.validate(p);
        self.patch.validate(p);
        p.check(
            self.join.token.is_none() || self.join.relay.is_some(),
            "join.relay",
            "is not set: a join token needs the relay's enrolment address (host:port)",
        );
        p.check(
            self.renewal.check_every >= Duration::from_secs(1),
            "renewal.check_every",
            "must be at least 1s",
        );
        validate_checks(&self.checks, p);
    }
}

impl crate::cli::MemberConfig for NodeConfig {
    fn identity(&self) -> &IdentityConfig {
        &self.identity
    }

    fn resolve_paths(&mut self, base: &Path) {
        if self.config.state_dir.is_relative() {
            self.config.state_dir = base.join(&self.config.state_dir);
        }
        if let Some(root) = self.config.root.as_mut().filter(|r| r.is_relative()) {
            *root = base.join(&*root);
        }
        if self.patch.dir.is_relative() {
            self.patch.dir = base.join(&self.patch.dir);
        }
        // The agent rewrites its certificate and key when it renews them.
        for p in [
            &mut self.identity.ca,
            &mut self.identity.cert,
            &mut self.identity.key,
        ] {
            if let Some(path) = p.as_mut().filter(|x| x.is_relative()) {
                *path = base.join(&*path);
            }
        }
    }

    fn before_start(&self) {
        crate::upgrade::launch(&self.patch.dir);
    }

    fn enrol_first(&self) -> Result<(), String> {
        let (Some(relay), Some(token)) = (&self.join.relay, &self.join.token) else {
            return Ok(());
        };
        let (Some(ca), Some(cert), Some(key)) =
            (&self.identity.ca, &self.identity.cert, &self.identity.key)
        else {
            return Ok(());
        };
        if cert.exists() {
            return Ok(());
        }
        let files = crate::enrol::IdentityFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        crate::cli::enrol_now(
            crate::id::Role::Node,
            &files,
            relay,
            token,
            self.join.name.clone(),
            Duration::from_secs(365 * 86400),
            |what| tracing::info!(%what, "enrolling: waiting"),
        )
        .map(|done| tracing::info!(identity = %done.identity, "enrolled with the join token in the configuration"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_node(text: &str) -> Result<NodeConfig, ConfigError> {
        let path = Path::new("node.toml");
        let mut c: NodeConfig = parse(text, path)?;
        c.normalize();
        let mut p = Problems::new(path);
        c.validate(&mut p);
        p.finish().map(|()| c)
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse_node("").unwrap(), NodeConfig::default());
    }

    #[test]
    fn a_typo_is_an_error_that_names_the_key() {
        let err = parse_node("[gossip]\nintervall = \"1s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("intervall"), "{err}");
    }

    #[test]
    fn checks_need_exactly_one_kind() {
        let err = parse_node("[[checks]]\nname = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one of"), "{err}");
        let err = parse_node("[[checks]]\nname = \"x\"\ntcp = \"a:1\"\nhttp = \"http://a\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one of"), "{err}");
    }

    #[test]
    fn every_kind_of_check_parses() {
        let c = parse_node(
            r#"
            [[checks]]
            name = "sshd"
            command = ["true"]
            interval = "5s"
            timeout = "1s"
            [[checks]]
            name = "web"
            http = "http://127.0.0.1:8080/healthz"
            [[checks]]
            name = "db"
            tcp = "127.0.0.1:5432"
            "#,
        )
        .unwrap();
        assert_eq!(c.checks.len(), 3);
        assert_eq!(c.checks[0].kind(), CheckKind::Command(vec!["true".into()]));
        assert_eq!(c.checks[2].interval, Duration::from_secs(10));
    }

    #[test]
    fn nonsense_values_are_rejected_with_the_field_name() {
        for (text, field) in [
            ("[gossip]\ninterval = \"0s\"\n", "gossip.interval"),
            ("[gossip]\nphi_threshold = 0.0\n", "gossip.phi_threshold"),
            (
                "[health]\ndisk_warning_pct = 99\ndisk_critical_pct = 90\n",
                "health.disk_warning_pct",
            ),
            (
                "[[checks]]\nname = \"disk\"\ntcp = \"a:1\"\n",
                "checks[0].name",
            ),
            (
                "[[checks]]\nname = \"a\"\ntcp = \"nope\"\n",
                "checks[0].tcp",
            ),
            (
                "[[checks]]\nname = \"a\"\ntcp = \"a:1\"\n[[checks]]\nname = \"a\"\ntcp = \"a:2\"\n",
                "checks[1].name",
            ),
            (
                "[[checks]]\nname = \"a\"\ntcp = \"a:1\"\ninterval = \"1s\"\ntimeout = \"2s\"\n",
                "checks[0].timeout",
            ),
        ] {
            let err = parse_node(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err}");
        }
    }

    #[test]
    fn a_wildcard_listen_address_needs_an_advertised_one() {
        let err = parse_node("[gossip]\nlisten = \"0.0.0.0:7900\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gossip.advertise"), "{err}");
        let c = parse_node("[gossip]\nlisten = \"0.0.0.0:7900\"\nadvertise = \"10.0.0.5:0\"\n")
            .unwrap();
        assert_eq!(
            crate::gossip::advertised(c.gossip.listen_addr(), c.gossip.advertise).to_string(),
            "10.0.0.5:7900"
        );
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "").unwrap();
        let loaded = load::<NodeConfig>(Some(&path)).unwrap();
        assert_eq!(
            loaded.resolve(loaded.config.identity.cert_path()),
            dir.path().join("tls/node.crt")
        );
    }

    #[test]
    fn the_config_and_node_sections_have_working_defaults() {
        let c = parse_node("").unwrap();
        assert_eq!(c.config.state_dir, PathBuf::from("/var/lib/trellis/config"));
        assert_eq!(c.config.drift_interval, Duration::from_secs(60));
        assert_eq!(c.config.drift, DriftMode::Heal);
        assert_eq!(c.config.reload_timeout, Duration::from_secs(30));
        assert!(c.node.labels.is_empty());
    }

    #[test]
    fn the_config_and_node_sections_parse() {
        let c = parse_node(
            r#"
            [node]
            labels = { role = "web", "rack.id" = "r-12_a" }
            [config]
            state_dir = "state"
            drift_interval = "5m"
            drift = "report"
            reload_timeout = "1m"
            "#,
        )
        .unwrap();
        assert_eq!(
            c.node.labels,
            BTreeMap::from([
                ("rack.id".to_owned(), "r-12_a".to_owned()),
                ("role".to_owned(), "web".to_owned()),
            ])
        );
        assert_eq!(c.config.state_dir, PathBuf::from("state"));
        assert_eq!(c.config.drift_interval, Duration::from_secs(300));
        assert_eq!(c.config.drift, DriftMode::Report);
        assert_eq!(c.config.reload_timeout, Duration::from_secs(60));
        let err = parse_node("[config]\ndrift = \"fix\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("heal") && err.contains("report"), "{err}");
    }

    #[test]
    fn bad_labels_are_rejected_with_the_field_name() {
        for (text, field) in [
            ("[node]\nlabels = { \"\" = \"x\" }\n", "`node.labels`"),
            ("[node]\nlabels = { \"a b\" = \"x\" }\n", "`node.labels`"),
            ("[node]\nlabels = { role = \"\" }\n", "`node.labels.role`"),
            (
                "[node]\nlabels = { role = \"web/1\" }\n",
                "`node.labels.role`",
            ),
        ] {
            let err = parse_node(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err}");
            assert!(err.contains("1 to 63 characters"), "{text:?} gave {err}");
        }
        let long = "x".repeat(64);
        let err = parse_node(&format!("[node]\nlabels = {{ role = \"{long}\" }}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`node.labels.role`"), "{err}");
        let ok = "x".repeat(63);
        assert!(parse_node(&format!("[node]\nlabels = {{ {ok} = \"{ok}\" }}\n")).is_ok());

        let labels = |n: usize| {
            let pairs: Vec<String> = (0..n).map(|i| format!("k{i} = \"v\"")).collect();
            format!("[node]\nlabels = {{ {} }}\n", pairs.join(", "))
        };
        assert_eq!(parse_node(&labels(64)).unwrap().node.labels.len(), 64);
        let err = parse_node(&labels(65)).unwrap_err().to_string();
        assert!(err.contains("has 65 labels; at most 64"), "{err}");
    }

    #[test]
    fn bad_drift_and_reload_durations_are_rejected_with_the_field_name() {
        for (text, field) in [
            (
                "[config]\ndrift_interval = \"999ms\"\n",
                "`config.drift_interval`",
            ),
            (
                "[config]\nreload_timeout = \"500ms\"\n",
                "`config.reload_timeout`",
            ),
            (
                "[config]\nreload_timeout = \"11m\"\n",
                "`config.reload_timeout`",
            ),
            ("[config]\nstate_dir = \"\"\n", "`config.state_dir`"),
        ] {
            let err = parse_node(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err}");
        }
        let c =
            parse_node("[config]\ndrift_interval = \"1s\"\nreload_timeout = \"10m\"\n").unwrap();
        assert_eq!(c.config.drift_interval, Duration::from_secs(1));
        assert_eq!(c.config.reload_timeout, Duration::from_secs(600));
        let err = parse_node("[config]\ndrift_interval = \"often\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("drift_interval"), "{err}");
    }

    #[test]
    fn a_relative_state_dir_is_taken_from_the_config_directory_and_printed_so() {
        use crate::cli::MemberConfig;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "[node]\nlabels = { role = \"web\" }\n[config]\nstate_dir = \"state\"\ndrift = \"report\"\n",
        )
        .unwrap();
        let mut loaded = load::<NodeConfig>(Some(&path)).unwrap();
        let base = loaded.base_dir.clone();
        loaded.config.resolve_paths(&base);
        assert_eq!(loaded.config.config.state_dir, dir.path().join("state"));
        // What --print-config prints reads back as the same configuration.
        let printed = toml::to_string(&loaded.config).unwrap();
        assert!(printed.contains("[config]"), "{printed}");
        assert!(printed.contains("drift = \"report\""), "{printed}");
        assert!(printed.contains("role = \"web\""), "{printed}");
        assert_eq!(parse_node(&printed).unwrap(), loaded.config);
    }

    #[test]
    fn the_patch_section_has_working_defaults_and_parses() {
        let c = parse_node("").unwrap();
        assert_eq!(c.patch.dir, PathBuf::from("/var/lib/trellis/patches"));
        assert_eq!(c.patch.command_timeout, Duration::from_secs(600));
        let c = parse_node("[patch]\ndir = \"p\"\ncommand_timeout = \"90s\"\n").unwrap();
        assert_eq!(c.patch.dir, PathBuf::from("p"));
        assert_eq!(c.patch.command_timeout, Duration::from_secs(90));
    }

    #[test]
    fn an_empty_patch_dir_or_a_zero_command_timeout_is_rejected_with_the_field_name() {
        for (text, field) in [
            ("[patch]\ndir = \"\"\n", "`patch.dir`"),
            (
                "[patch]\ncommand_timeout = \"0s\"\n",
                "`patch.command_timeout`",
            ),
        ] {
            let err = parse_node(text).unwrap_err().to_string();
            assert!(err.contains(field), "{text:?} gave {err}");
        }
    }

    #[test]
    fn a_relative_patch_dir_is_taken_from_the_config_directory() {
        use crate::cli::MemberConfig;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "[patch]\ndir = \"n1/patches\"\n").unwrap();
        let mut loaded = load::<NodeConfig>(Some(&path)).unwrap();
        let base = loaded.base_dir.clone();
        loaded.config.resolve_paths(&base);
        assert_eq!(loaded.config.patch.dir, dir.path().join("n1/patches"));
        let mut absolute = NodeConfig::default();
        absolute.resolve_paths(dir.path());
        assert_eq!(absolute.patch.dir, PathBuf::from(DEFAULT_PATCH_DIR));
    }

    #[test]
    fn a_missing_file_is_a_clear_error() {
        let err = load::<NodeConfig>(Some(Path::new("/nonexistent/node.toml")))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/nonexistent/node.toml"), "{err}");
    }
}
