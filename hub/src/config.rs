//! The hub's configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::config::{IdentityConfig, Problems, Validate};
use trellis_relay::config::HUB_UPLINK_PORT;

/// Default address of the HTTP API (and `/metrics`).
pub const DEFAULT_API: &str = "127.0.0.1:7800";

/// `[uplink]`: where relays connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubUplinkConfig {
    /// UDP address of the hub's QUIC endpoint.
    pub listen: SocketAddr,
    /// A relay that sends nothing for this long is disconnected (relays
    /// summarise at least every `uplink.summary_interval`, 5 s by default).
    /// On a lossy link, leave room for QUIC's retransmission timer, which
    /// doubles each time the same packet is lost again: a record delayed
    /// by retransmission is not silence.
    #[serde(with = "humantime_serde")]
    pub silence_timeout: Duration,
}

impl Default for HubUplinkConfig {
    fn default() -> Self {
        HubUplinkConfig {
            listen: ([127, 0, 0, 1], HUB_UPLINK_PORT).into(),
            silence_timeout: Duration::from_secs(20),
        }
    }
}

/// `[api]`: the HTTP API, `/metrics` included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Serve the API beyond loopback with no token required (the hub
    /// refuses to otherwise): for a hub behind a proxy that authenticates.
    pub allow_remote_unauthenticated: bool,
    /// Require a token even on loopback (beyond loopback one is always
    /// required, unless `allow_remote_unauthenticated`).
    pub require_token: bool,
    /// Who may call the API, with which role (`trellis api token` makes
    /// an entry).
    pub tokens: Vec<crate::apiauth::ApiToken>,
    /// Requests a second each caller may make (a token, or an address
    /// without one), after a burst of twice that; past it, `429` with
    /// `Retry-After`. 0: no limit.
    pub requests_per_s: u32,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_API.parse().expect("valid default"),
            allow_remote_unauthenticated: false,
            require_token: false,
            tokens: Vec::new(),
            requests_per_s: DEFAULT_API_REQUESTS_PER_S,
        }
    }
}

/// Default of `api.requests_per_s`: far above what the CLI, the dashboard
/// (a request a second or two per open page) and Prometheus ask for.
pub const DEFAULT_API_REQUESTS_PER_S: u32 = 200;

impl ApiConfig {
    /// Whether a request must carry a token.
    pub fn token_required(&self) -> bool {
        self.require_token
            || (!self.listen.ip().is_loopback() && !self.allow_remote_unauthenticated)
    }
}

/// `[fleet]`: how the fleet view is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// A site not heard from for this long is shown as unreachable (with
    /// its last known state).
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            stale_after: Duration::from_secs(30),
        }
    }
}

/// `[store]`: the hub's durable state (records from relays, history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The SQLite file (relative to the configuration file).
    pub path: PathBuf,
    /// History older than this is deleted (each site's newest summary is
    /// always kept).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("hub-data/hub.db"),
            retention: Duration::from_secs(30 * 86400),
        }
    }
}

/// `[federation]`: the other hubs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {
    /// Other hubs' endpoints (their `uplink.listen`), to join the
    /// federation through; any one that answers is enough.
    pub peers: Vec<SocketAddr>,
    /// The address other hubs reach this one at, when `uplink.listen` is a
    /// wildcard or behind NAT; port 0 means the bound port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<SocketAddr>,
    /// Time between gossip rounds among hubs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for FederationConfig {
    fn default() -> Self {
        FederationConfig {
            peers: Vec::new(),
            advertise: None,
            interval: Duration::from_secs(1),
        }
    }
}

/// `[replication]`: how hubs share relay records and the management log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Hubs that must hold an operator's write before it is acknowledged;
    /// 0 means 2 when the federation has two hubs or more, else 1.
    pub write_quorum: usize,
    /// How long a write waits for the quorum.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How often hubs compare what they hold and pull what they lack.
    #[serde(with = "humantime_serde")]
    pub anti_entropy_every: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            write_quorum: 0,
            write_timeout: Duration::from_secs(5),
            anti_entropy_every: Duration::from_secs(2),
        }
    }
}

/// `[incidents]`: how events are correlated into incidents, and who hears
/// of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IncidentsConfig {
    /// URLs (http or https) that get a JSON POST when an incident opens or
    /// resolves: `{"event": "opened"|"resolved", "incident": {...}}`.
    pub webhooks: Vec<String>,
    /// Nodes of one site failing the same check that make one incident for
    /// the site rather than one per node.
    pub site_check_nodes: usize,
    /// A node whose checks or liveness change more than this many times
    /// within `flap_window` is flapping: one incident, not one per change.
    pub flap_changes: usize,
    #[serde(with = "humantime_serde")]
    pub flap_window: Duration,
    /// A flapping node's incident resolves after this long without change.
    #[serde(with = "humantime_serde")]
    pub flap_quiet: Duration,
    /// Resolved incidents kept for `trellis incidents --all`.
    pub keep_resolved: usize,
}

impl Default for IncidentsConfig {
    fn default() -> Self {
        IncidentsConfig {
            webhooks: Vec::new(),
            site_check_nodes: 2,
            flap_changes: 4,
            flap_window: Duration::from_secs(300),
            flap_quiet: Duration::from_secs(300),
            keep_resolved: 1000,
        }
    }
}

impl IncidentsConfig {
    /// The engine's settings.
    pub fn settings(&self) -> crate::incidents::IncidentSettings {
        crate::incidents::IncidentSettings {
            site_check_nodes: self.site_check_nodes,
            flap_changes: self.flap_changes,
            flap_window_ms: self.flap_window.as_millis() as u64,
            flap_quiet_ms: self.flap_quiet.as_millis() as u64,
            keep_resolved: self.keep_resolved,
        }
    }
}

/// Why a webhook URL is refused (`None`: it is fine).
fn webhook_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url) {
        Err(e) => Some(format!("{url:?} is not a URL ({e})")),
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Some(format!(
            "{url:?} is a {} URL; webhooks are POSTed over http or https",
            u.scheme()
        )),
        Ok(u) if u.host_str().is_none_or(str::is_empty) => Some(format!("{url:?} names no host")),
        Ok(_) => None,
    }
}

/// `[enrolment]`: signing certificates for machines that enrol with a
/// join token.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrolmentConfig {
    /// The mesh CA's directory (`ca.crt`, `ca.key`), relative to this
    /// file. Without it this hub refuses enrolments (another hub that has
    /// it signs them, if the relay is connected there).
    pub ca_dir: Option<std::path::PathBuf>,
    /// Where relays enrol with relay tokens (UDP, QUIC); off when unset.
    /// Only the enrolment protocol is served there. Nodes enrol through
    /// their relay, not here.
    pub listen: Option<std::net::SocketAddr>,
    /// How long an enrolled machine's certificate is valid.
    pub cert_days: Option<u32>,
}

/// Days a certificate issued at enrolment is valid unless
/// `[enrolment] cert_days` says otherwise.
pub const ENROLLED_CERT_DAYS: u32 = 365;

impl EnrolmentConfig {
    pub fn cert_days(&self) -> u32 {
        self.cert_days.unwrap_or(ENROLLED_CERT_DAYS)
    }
}

/// The hub's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    pub identity: IdentityConfig,
    pub uplink: HubUplinkConfig,
    pub api: ApiConfig,
    pub fleet: FleetConfig,
    pub store: StoreConfig,
    pub federation: FederationConfig,
    pub replication: ReplicationConfig,
    pub incidents: IncidentsConfig,
    pub outliers: crate::outliers::RegionOutliersConfig,
    pub baselines: crate::baselines::RegionBaselinesConfig,
    pub enrolment: EnrolmentConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            identity: IdentityConfig::for_name("hub"),
            uplink: HubUplinkConfig::default(),
            api: ApiConfig::default(),
            fleet: FleetConfig::default(),
            store: StoreConfig::default(),
            federation: FederationConfig::default(),
            replication: ReplicationConfig::default(),
            incidents: IncidentsConfig::default(),
            outliers: crate::outliers::RegionOutliersConfig::default(),
            baselines: crate::baselines::RegionBaselinesConfig::default(),
            enrolment: EnrolmentConfig::default(),
        }
    }
}

impl Validate for HubConfig {
    fn normalize(&mut self) {
        self.identity = std::mem::take(&mut self.identity).or(IdentityConfig::for_name("hub"));
    }

    fn validate(&self, p: &mut Problems<'_>) {
        p.check(
            self.enrolment
                .cert_days
                .is_none_or(|d| (1..=3650).contains(&d)),
            "enrolment.cert_days",
            "must be 1 to 3650 days",
        );
        p.check(
            !self.api.token_required() || !self.api.tokens.is_empty(),
            "api.tokens",
            format!(
                "is empty, and the API on {} requires a token{}: add [[api.tokens]] entries \
                 (`trellis api token --name NAME --role admin` makes one), bind the API to \
                 127.0.0.1, or set api.allow_remote_unauthenticated = true if a proxy in front \
                 authenticates",
                self.api.listen,
                if self.api.require_token {
                    " (api.require_token)"
                } else {
                    ", not being on loopback"
                }
            ),
        );
        for (i, t) in self.api.tokens.iter().enumerate() {
            p.check(
                t.sha256.len() == 64 && t.sha256.bytes().all(|b| b.is_ascii_hexdigit()),
                "api.tokens",
                format!("entry {} ({}): sha256 must be 64 hex digits", i + 1, t.name),
            );
            p.check(
                !t.name.is_empty() && t.name.len() <= 64,
                "api.tokens",
                format!("entry {}: name must be 1 to 64 bytes", i + 1),
            );
            p.check(
                !self.api.tokens[..i]
                    .iter()
                    .any(|o| o.sha256.eq_ignore_ascii_case(&t.sha256)),
                "api.tokens",
                format!(
                    "entry {} ({}): the same token is listed twice",
                    i + 1,
                    t.name
                ),
            );
        }
        for (field, what) in self
            .outliers
            .problems()
            .into_iter()
            .chain(self.baselines.problems())
        {
            p.check(false, field, what);
        }
        p.check(
            self.uplink.silence_timeout >= Duration::from_secs(1),
            "uplink.silence_timeout",
            "must be at least 1s",
        );
        p.check(
            !self.uplink.listen.ip().is_unspecified() || self.federation.advertise.is_some(),
            "uplink.listen",
            format!(
                "is {}, a wildcard; set federation.advertise to the address other hubs reach this one at",
                self.uplink.listen
            ),
        );
        p.check(
            self.federation.interval >= Duration::from_millis(50),
            "federation.interval",
            "must be at least 50ms",
        );
        p.check(
            self.replication.write_timeout >= Duration::from_millis(100),
            "replication.write_timeout",
            "must be at least 100ms",
        );
        p.check(
            self.replication.anti_entropy_every >= Duration::from_millis(100),
            "replication.anti_entropy_every",
            "must be at least 100ms",
        );
        p.check(
            self.store.retention >= Duration::from_secs(3600),
            "store.retention",
            "must be at least 1h",
        );
        p.check(
            self.fleet.stale_after >= Duration::from_secs(2),
            "fleet.stale_after",
            "must be at least 2s (relays summarise every few seconds)",
        );
        for url in &self.incidents.webhooks {
            if let Some(problem) = webhook_problem(url) {
                p.check(false, "incidents.webhooks", problem);
            }
        }
        p.check(
            self.incidents.site_check_nodes >= 2,
            "incidents.site_check_nodes",
            "must be at least 2 (one node failing a check is a node's incident)",
        );
        p.check(
            self.incidents.flap_changes >= 2,
            "incidents.flap_changes",
            "must be at least 2",
        );
        p.check(
            self.incidents.flap_window >= Duration::from_secs(1)
                && self.incidents.flap_quiet >= Duration::from_secs(1),
            "incidents.flap_window",
            "flap_window and flap_quiet must be at least 1s",
        );
        p.check(
            (1..=100_000).contains(&self.incidents.keep_resolved),
            "incidents.keep_resolved",
            "must be between 1 and 100000",
        );
    }
}

impl trellis_node::cli::MemberConfig for HubConfig {
    fn identity(&self) -> &IdentityConfig {
        &self.identity
    }

    fn resolve_paths(&mut self, base: &std::path::Path) {
        if self.store.path.is_relative() {
            self.store.path = base.join(&self.store.path);
        }
        if let Some(dir) = self.enrolment.ca_dir.as_mut().filter(|d| d.is_relative()) {
            *dir = base.join(&*dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use trellis_node::config::parse;

    use super::*;

    fn check(text: &str) -> Result<HubConfig, String> {
        let path = Path::new("hub.toml");
        let mut c: HubConfig = parse(text, path).map_err(|e| e.to_string())?;
        c.normalize();
        let mut p = Problems::new(path);
        c.validate(&mut p);
        p.finish().map(|()| c).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_serve_the_api_on_loopback_7800() {
        let c = check("").unwrap();
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:7800");
        assert_eq!(c.uplink.listen.port(), 7700);
    }

    #[test]
    fn an_api_beyond_loopback_needs_tokens_or_an_explicit_opt_in() {
        let err = check("[api]\nlisten = \"0.0.0.0:7800\"\n").unwrap_err();
        assert!(err.contains("api.tokens"), "{err}");
        let c = check("[api]\nlisten = \"0.0.0.0:7800\"\nallow_remote_unauthenticated = true\n")
            .unwrap();
        assert!(!c.api.token_required());
        let sha = "ab".repeat(32);
        let c = check(&format!(
            "[api]\nlisten = \"0.0.0.0:7800\"\n[[api.tokens]]\nname = \"ada\"\nrole = \"admin\"\nsha256 = \"{sha}\"\n"
        ))
        .unwrap();
        assert!(c.api.token_required());
        assert!(
            !check("").unwrap().api.token_required(),
            "loopback: optional"
        );
        let err = check("[api]\nrequire_token = true\n").unwrap_err();
        assert!(err.contains("api.require_token"), "{err}");
        let err = check(&format!(
            "[api]\n[[api.tokens]]\nname = \"a\"\nrole = \"admin\"\nsha256 = \"{sha}\"\n\
             [[api.tokens]]\nname = \"b\"\nrole = \"viewer\"\nsha256 = \"{sha}\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("listed twice"), "{err}");
        let err = check("[api]\n[[api.tokens]]\nname = \"a\"\nrole = \"root\"\nsha256 = \"00\"\n")
            .unwrap_err();
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn incident_webhooks_must_be_http_or_https_urls() {
        let c = check(
            "[incidents]\nwebhooks = [\"http://127.0.0.1:9000/hook\", \"https://pager.example/x\"]\n",
        )
        .unwrap();
        assert_eq!(c.incidents.webhooks.len(), 2);
        for bad in ["ftp://pager.example/x", "pager.example/x", "http://"] {
            let err = check(&format!("[incidents]\nwebhooks = [{bad:?}]\n")).unwrap_err();
            assert!(err.contains("incidents.webhooks"), "{bad}: {err}");
        }
        let err = check("[incidents]\nsite_check_nodes = 1\n").unwrap_err();
        assert!(err.contains("incidents.site_check_nodes"), "{err}");
    }

    #[test]
    fn region_outliers_are_checked_field_by_field() {
        let c =
            check("[outliers]\nmetrics = [\"cpu\", \"unhealthy\"]\nhold_for = \"2m\"\n").unwrap();
        assert_eq!(c.outliers.hold_for, Duration::from_secs(120));
        assert_eq!(c.outliers.threshold, 6.0);
        for (bad, field) in [
            ("threshold = 0", "outliers.threshold"),
            ("min_gap_pct = 101", "outliers.min_gap_pct"),
            ("min_peers = 0", "outliers.min_peers"),
        ] {
            let err = check(&format!("[outliers]\n{bad}\n")).unwrap_err();
            assert!(err.contains(field), "{bad}: {err}");
        }
        let err = check("[outliers]\nmetrics = [\"load\"]\n").unwrap_err();
        assert!(err.contains("load"), "{err}");
        let c = check("[baselines]\nthreshold = 8\nwarmup = \"1h\"\n").unwrap();
        assert_eq!(c.baselines.threshold, 8.0);
        for (bad, field) in [
            ("threshold = -1", "baselines.threshold"),
            ("persist = 0", "baselines.persist"),
            ("half_life = \"10s\"", "baselines.half_life"),
        ] {
            let err = check(&format!("[baselines]\n{bad}\n")).unwrap_err();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }
}
