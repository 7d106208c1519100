//! The relay's configuration file.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use trellis_node::config::{
    CheckConfig, GossipConfig, HealthConfig, IdentityConfig, MetricsConfig, Problems, Validate,
    validate_checks,
};

use crate::core::CoreConfig;

/// Default UDP port of a relay's gossip endpoint.
pub const RELAY_GOSSIP_PORT: u16 = 7901;
/// Default TCP port of a relay's `/metrics`.
pub const RELAY_METRICS_PORT: u16 = 7911;
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
    /// A hub that leaves records unacknowledged this long is dropped.
    #[serde(with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// Records kept for the hub before the oldest are dropped.
    pub max_outbox: usize,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        let core = CoreConfig::default();
        UplinkConfig {
            hubs: vec![format!("127.0.0.1:{HUB_UPLINK_PORT}")],
            summary_interval: core.summary_interval,
            sample_interval: Duration::from_secs(1),
            ack_timeout: core.ack_timeout,
            max_outbox: core.max_outbox,
        }
    }
}

impl UplinkConfig {
    pub fn core(&self) -> CoreConfig {
        CoreConfig {
            summary_interval: self.summary_interval,
            max_outbox: self.max_outbox,
            ack_timeout: self.ack_timeout,
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
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    /// The relay's own checks; none by default.
    pub checks: Vec<CheckConfig>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            identity: IdentityConfig::for_name("relay"),
            gossip: GossipConfig::with_listen(([127, 0, 0, 1], RELAY_GOSSIP_PORT).into()),
            uplink: UplinkConfig::default(),
            health: HealthConfig::default(),
            metrics: MetricsConfig::with_listen(([127, 0, 0, 1], RELAY_METRICS_PORT).into()),
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
            u.max_outbox >= 10,
            "uplink.max_outbox",
            "must be at least 10",
        );
    }
}

impl trellis_node::cli::MemberConfig for RelayConfig {
    fn identity(&self) -> &IdentityConfig {
        &self.identity
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
