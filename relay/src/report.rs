//! The JSON shapes of the read APIs, shared by the hub (the fleet) and the
//! relay (its own site, served locally through a WAN outage), so that one
//! client and one renderer serve both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use trellis_node::id::Role;
use trellis_node::site::{MemberView, Status};

use crate::summary::{CheckCounts, ConfigTally, SiteStatus, SiteSummary, StatusCounts};

/// One site in a fleet view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteRow {
    pub site: String,
    pub region: String,
    pub relay: String,
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    pub status: SiteStatus,
    /// Seconds since the site's relay was last heard from (at a hub) or
    /// since the summary was made (at the relay).
    pub last_seen_s: u64,
    /// Whether the relay's uplink is connected (to a hub of the
    /// federation, or at the relay: to any hub).
    pub connected: bool,
    /// The hub the relay is connected to, if any.
    #[serde(default)]
    pub hub: Option<String>,
    pub by_status: StatusCounts,
    pub dead: Vec<String>,
    pub failing_checks: BTreeMap<String, CheckCounts>,
    /// Where the site's nodes stand with the fleet's configuration.
    #[serde(default)]
    pub config: ConfigTally,
}

impl SiteRow {
    pub fn new(s: &SiteSummary, status: SiteStatus, last_seen_s: u64, connected: bool) -> Self {
        SiteRow {
            site: s.site.clone(),
            region: s.region.clone(),
            relay: s.relay.clone(),
            nodes_total: s.nodes_total,
            nodes_alive: s.nodes_alive,
            nodes_dead: s.nodes_dead,
            status,
            last_seen_s,
            connected,
            hub: None,
            by_status: s.by_status,
            dead: s.dead.clone(),
            failing_checks: s.failing_checks.clone(),
            config: s.config.clone(),
        }
    }
}

/// Sums over the sites of a report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetTotals {
    pub sites: u32,
    pub sites_by_status: BTreeMap<SiteStatus, u32>,
    pub nodes_total: u32,
    pub nodes_alive: u32,
    pub nodes_dead: u32,
    pub by_status: StatusCounts,
}

impl FleetTotals {
    pub fn of(rows: &[SiteRow]) -> Self {
        let mut t = FleetTotals::default();
        for r in rows {
            t.sites += 1;
            *t.sites_by_status.entry(r.status).or_default() += 1;
            t.nodes_total += r.nodes_total;
            t.nodes_alive += r.nodes_alive;
            t.nodes_dead += r.nodes_dead;
            t.by_status.sum(&r.by_status);
        }
        t
    }
}

/// What a relay says about itself in its local API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub uplink_connected: bool,
    /// The hub it is connected to, if any.
    pub hub: Option<String>,
    /// Records in the outage buffer, waiting for a hub's acknowledgement.
    pub buffered_records: u64,
    pub buffered_bytes: u64,
    pub buffer_max_bytes: u64,
    pub persisted_through: u64,
    pub acked_through: u64,
}

/// `GET /api/v1/fleet` at a hub; `GET /api/v1/site` at a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetReport {
    /// The hub (or relay) that answered.
    pub hub: String,
    pub sites: Vec<SiteRow>,
    pub totals: FleetTotals,
    /// Present when a relay answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayStatus>,
}

/// One check of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRow {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

/// One member of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRow {
    pub name: String,
    pub role: Option<Role>,
    pub alive: bool,
    pub status: Status,
    pub cpu_pct: Option<u8>,
    pub mem_pct: Option<u8>,
    pub disk_pct: Option<u8>,
    pub load1: Option<f32>,
    pub generation: u64,
    pub gossip_addr: String,
    pub checks: Vec<CheckRow>,
    /// The node's labels (`[node] labels`), which configuration selects on.
    /// Always serialised: the report travels in postcard too.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Facts about its machine: `hostname`, `os`, `arch`.
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
}

impl From<MemberView> for NodeRow {
    fn from(m: MemberView) -> Self {
        NodeRow {
            name: m.name,
            role: m.health.role,
            alive: m.alive,
            status: m.health.status,
            cpu_pct: m.health.cpu_pct,
            mem_pct: m.health.mem_pct,
            disk_pct: m.health.disk_pct,
            load1: m.health.load1,
            generation: m.generation,
            gossip_addr: m.gossip_addr.to_string(),
            checks: m
                .health
                .checks
                .into_iter()
                .map(|(name, r)| CheckRow {
                    name,
                    status: r.status,
                    detail: r.detail,
                })
                .collect(),
            labels: m.labels,
            facts: m.facts,
        }
    }
}

/// `GET /api/v1/sites/{site}/nodes` at a hub; `GET /api/v1/site/nodes` at
/// a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodesReport {
    pub region: String,
    pub site: String,
    pub relay: String,
    pub nodes: Vec<NodeRow>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
