//! The relay's configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::config::{
    CheckConfig, GossipConfig, HealthConfig, IdentityConfig, MetricsConfig, Problems, Validate,
    validate_checks,
};

use crate::buffer::{DownsampleRule, default_downsample};
use crate::core::CoreConfig;
use crate::outliers::OutliersConfig;

/// Default UDP port of a relay's gossip endpoint.
pub const RELAY_GOSSIP_PORT: u16 = 7901;
/// Default TCP port of a relay's `/metrics`.
pub const RELAY_METRICS_PORT: u16 = 7911;
/// Default TCP port of a relay's local read API.
pub const RELAY_API_PORT: u16 = 7801;
/// Default UDP port of a hub's uplink endpoint.
pub const HUB_UPLINK_PORT: u16 = 7700;

/// `[uplink]`: how the relay reaches its hubs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UplinkConfig {
    /// Hubs as `host:port` (UDP), tried in order.
    pub hubs: Vec<String>,
    /// Longest time between two summaries when nothing changes.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
    /// How often the site's gossip state is looked at.
    #[serde(with = "humantime_serde")]
    pub sample_interval: Duration,
    /// A hub that sends no acknowledgement this long while records are
    /// outstanding is dropped and reconnected.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Longest wait between two connection attempts (the wait before each
    /// attempt is random up to an exponentially growing bound, so that
    /// many relays do not all reconnect at once).
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Pace of the backlog after an outage, in bytes per second; records
    /// made meanwhile are sent at once.
    pub replay_bytes_per_s: u64,
    /// A hub unreachable this long (no acknowledgement, no connection) is
    /// left for the next one in `hubs`.
    #[serde(with = "humantime_serde")]
    pub failover_after: Duration,
    /// While on a hub other than the first, how often to look whether a
    /// hub earlier in `hubs` is back (and go back to it).
    #[serde(with = "humantime_serde")]
    pub failback_every: Duration,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        UplinkConfig {
            hubs: vec![format!("127.0.0.1:{HUB_UPLINK_PORT}")],
            summary_interval: core.summary_interval,
            sample_interval: Duration::from_secs(1),
            ack_timeout: core.ack_timeout,
            max_backoff: Duration::from_secs(30),
            replay_bytes_per_s: 256 * 1024,
            failover_after: Duration::from_secs(15),
            failback_every: Duration::from_secs(60),
        }
    }
}

/// `[retention]`: how long the relay keeps counting what is gone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// A node dead this long is reaped: reported once (a `node_reaped`
    /// event) and no longer counted in the site, alive or dead. Its
    /// history stays at the hub; it comes back if it returns.
    #[serde(with = "humantime_serde")]
    pub dead_node: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            dead_node: CoreConfig::default().reap_dead_after,
        }
    }
}

/// `[buffer]`: the durable outage buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BufferConfig {
    /// The SQLite file (relative to the configuration file).
    pub path: PathBuf,
    /// Bound on the buffered records' bytes. Past half of it older
    /// summaries are downsampled; past all of it the oldest records are
    /// dropped and a gap record tells the hub what.
    pub max_bytes: u64,
    /// Among summaries older than `after`, keep one per `keep_every`.
    pub downsample: Vec<DownsampleRule>,
    /// Acknowledged records are kept this long before they are deleted, so
    /// that a hub taking over from one that died before replicating them
    /// can still get them.
    #[serde(with = "humantime_serde")]
    pub keep_acked: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            path: PathBuf::from("buffer/outage.db"),
            max_bytes: 1 << 30,
            downsample: default_downsample(),
            keep_acked: Duration::from_secs(300),
        }
    }
}

/// `[enrol]`: the endpoint machines without a certificate enrol on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnrolConfig {
    /// Where to listen (UDP, QUIC); off when unset. Only the enrolment
    /// protocol is served there.
    pub listen: Option<SocketAddr>,
}

/// `[api]`: the relay's local read API (the site, its nodes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayApiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
}

impl Default for RelayApiConfig {
    fn default() -> Self {
        RelayApiConfig {
            enabled: true,
            listen: ([127, 0, 0, 1], RELAY_API_PORT).into(),
        }
    }
}

/// The relay's configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    pub identity: IdentityConfig,
    pub gossip: GossipConfig,
    pub uplink: UplinkConfig,
    pub buffer: BufferConfig,
    pub api: RelayApiConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub retention: RetentionConfig,
    pub enrol: EnrolConfig,
    pub renewal: trellis_node::config::RenewalConfig,
    /// Nodes far above their same-labelled peers (`outlier:METRIC` checks).
    pub outliers: OutliersConfig,
    /// The relay's own checks; none by default.
    pub checks: Vec<CheckConfig>,
}

impl RelayConfig {
    /// The core's tuning.
    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            summary_interval: self.uplink.summary_interval,
            ack_timeout: self.uplink.ack_timeout,
            reap_dead_after: self.retention.dead_node,
            outliers: self.outliers.clone(),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            identity: IdentityConfig::for_name("relay"),
            gossip: GossipConfig::with_listen(([127, 0, 0, 1], RELAY_GOSSIP_PORT).into()),
            uplink: UplinkConfig::default(),
            buffer: BufferConfig::default(),
            api: RelayApiConfig::default(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::with_listen(([127, 0, 0, 1], RELAY_METRICS_PORT).into()),
            retention: RetentionConfig::default(),
            enrol: EnrolConfig::default(),
            renewal: Default::default(),
            outliers: OutliersConfig::default(),
            checks: Vec::new(),
        }
    }
}

impl Validate for RelayConfig {
    fn normalize(&mut self) {
        let d = RelayConfig::default();
        self.identity = std::mem::take(&mut self.identity).or(d.identity);
        self.gossip.listen = self.gossip.listen.or(d.gossip.listen);
        self.metrics.listen = self.metrics.listen.or(d.metrics.listen);
    }

    fn validate(&self, p: &mut Problems<'_>) {
        self.gossip.validate(p);
        self.health.validate(p);
        validate_checks(&self.checks, p);
        let u = &self.uplink;
        p.check(
            !u.hubs.is_empty(),
            "uplink.hubs",
            "is empty; list at least one hub as \"host:port\"",
        );
        for (i, hub) in u.hubs.iter().enumerate() {
            p.check(
                hub.rsplit_once(':')
                    .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()),
                &format!("uplink.hubs[{i}]"),
                format!("{hub:?} is not host:port"),
            );
        }
        p.check(
            u.sample_interval >= Duration::from_millis(50),
            "uplink.sample_interval",
            "must be at least 50ms",
        );
        p.check(
            u.summary_interval >= u.sample_interval,
            "uplink.summary_interval",
            "must be at least uplink.sample_interval",
        );
        p.check(
            u.ack_timeout >= Duration::from_secs(1),
            "uplink.ack_timeout",
            "must be at least 1s",
        );
        p.check(
            u.max_backoff >= Duration::from_millis(100),
            "uplink.max_backoff",
            "must be at least 100ms",
        );
        p.check(
            u.failover_after >= Duration::from_secs(1),
            "uplink.failover_after",
            "must be at least 1s",
        );
        p.check(
            u.failback_every >= Duration::from_secs(1),
            "uplink.failback_every",
            "must be at least 1s",
        );
        p.check(
            u.replay_bytes_per_s >= 1024,
            "uplink.replay_bytes_per_s",
            "must be at least 1024",
        );
        p.check(
            self.retention.dead_node >= Duration::from_secs(10),
            "retention.dead_node",
            "must be at least 10s",
        );
        let o = &self.outliers;
        p.check(
            o.ratio.is_finite() && o.ratio > 1.0,
            "outliers.ratio",
            format!("is {}; must be more than 1 (default 5)", o.ratio),
        );
        p.check(
            o.min_peers >= 2,
            "outliers.min_peers",
            format!("is {}; must be at least 2 (default 3)", o.min_peers),
        );
        p.check(
            o.min_gap_pct > 0.0 && o.min_gap_pct <= 100.0,
            "outliers.min_gap_pct",
            format!(
                "is {}; must be more than 0 and at most 100 (default 20)",
                o.min_gap_pct
            ),
        );
        p.check(
            o.min_gap_load.is_finite() && o.min_gap_load > 0.0,
            "outliers.min_gap_load",
            format!("is {}; must be more than 0 (default 2)", o.min_gap_load),
        );
        p.check(
            !o.enabled || !o.metrics.is_empty(),
            "outliers.metrics",
            "is empty; list some of \"cpu\", \"mem\", \"load\", or set enabled = false",
        );
        let distinct: std::collections::BTreeSet<_> = o.metrics.iter().collect();
        p.check(
            distinct.len() == o.metrics.len(),
            "outliers.metrics",
            "lists a metric twice",
        );
        p.check(
            o.hold_for <= Duration::from_secs(86400),
            "outliers.hold_for",
            "must be at most 1d",
        );
        let b = &self.buffer;
        p.check(
            b.max_bytes >= 16 * 1024,
            "buffer.max_bytes",
            format!("is {}; use at least 16384 (default 1 GiB)", b.max_bytes),
        );
        for (i, r) in b.downsample.iter().enumerate() {
            p.check(
                !r.keep_every.is_zero(),
                &format!("buffer.downsample[{i}].keep_every"),
                "must be more than zero",
            );
        }
    }
}

impl trellis_node::cli::MemberConfig for RelayConfig {
    fn identity(&self) -> &IdentityConfig {
        &self.identity
    }

    fn resolve_paths(&mut self, base: &std::path::Path) {
        if self.buffer.path.is_relative() {
            self.buffer.path = base.join(&self.buffer.path);
        }
        // The relay rewrites its certificate and key when it renews them.
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
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use trellis_node::config::parse;

    use super::*;

    fn check(text: &str) -> Result<RelayConfig, String> {
        let path = Path::new("relay.toml");
        let mut c: RelayConfig = parse(text, path).map_err(|e| e.to_string())?;
        c.normalize();
        let mut p = Problems::new(path);
        c.validate(&mut p);
        p.finish().map(|()| c).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_point_at_a_local_hub() {
        let c = check("").unwrap();
        assert_eq!(c.uplink.hubs, vec!["127.0.0.1:7700".to_owned()]);
        assert_eq!(c.gossip.listen_addr().port(), RELAY_GOSSIP_PORT);
    }

    #[test]
    fn a_partial_gossip_section_keeps_the_relay_port() {
        let c = check("[gossip]\ninterval = \"2s\"\n").unwrap();
        assert_eq!(c.gossip.listen_addr().port(), RELAY_GOSSIP_PORT);
        assert_eq!(c.metrics.listen_addr().port(), RELAY_METRICS_PORT);
    }

    #[test]
    fn outliers_are_on_by_default_and_reach_the_core() {
        let c = check("").unwrap();
        assert_eq!(c.outliers, OutliersConfig::default());
        assert!(c.core().outliers.enabled);
        let c = check(
            "[outliers]\nmetrics = [\"cpu\"]\nratio = 4\nmin_peers = 5\nmin_gap_pct = 30\nhold_for = \"10m\"\n",
        )
        .unwrap();
        let o = c.core().outliers;
        assert_eq!(o.metrics, vec![crate::outliers::Metric::Cpu]);
        assert_eq!((o.ratio, o.min_peers, o.min_gap_pct), (4.0, 5, 30.0));
        assert_eq!(o.hold_for, Duration::from_secs(600));
        assert_eq!(o.min_gap_load, 2.0);
        assert!(check("[outliers]\nenabled = false\nmetrics = []\n").is_ok());
    }

    #[test]
    fn bad_outlier_settings_are_rejected() {
        for (text, field) in [
            ("ratio = 1", "outliers.ratio"),
            ("min_peers = 1", "outliers.min_peers"),
            ("min_gap_pct = 0", "outliers.min_gap_pct"),
            ("min_gap_pct = 101", "outliers.min_gap_pct"),
            ("min_gap_load = -1", "outliers.min_gap_load"),
            ("metrics = []", "outliers.metrics"),
            ("metrics = [\"cpu\", \"cpu\"]", "outliers.metrics"),
            ("hold_for = \"2d\"", "outliers.hold_for"),
        ] {
            let err = check(&format!("[outliers]\n{text}\n")).unwrap_err();
            assert!(err.contains(field), "{text}: {err}");
        }
        for text in ["metrics = [\"disk\"]", "persist = 3"] {
            assert!(check(&format!("[outliers]\n{text}\n")).is_err(), "{text}");
        }
    }

    #[test]
    fn bad_hub_lists_are_rejected() {
        assert!(
            check("[uplink]\nhubs = []\n")
                .unwrap_err()
                .contains("uplink.hubs")
        );
        assert!(
            check("[uplink]\nhubs = [\"nope\"]\n")
                .unwrap_err()
                .contains("uplink.hubs[0]")
        );
    }
}
