//! The fleet's nodes as configuration sees them: name, region, site,
//! labels and facts, gathered live from every site's relay through a hub.
//!
//! `trellis config plan` resolves the fleet's manifests against this list,
//! so the plan names the nodes that exist now.

use serde::Serialize;
use tokio::task::JoinSet;
use trellis_node::desired::NodeFacts;
use trellis_node::id::Role;
use trellis_relay::report::NodesReport;

use crate::client::{ApiClient, ClientError};

/// Sites asked at once.
const AT_ONCE: usize = 16;

/// A site whose nodes could not be listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unlisted {
    pub region: String,
    pub site: String,
    pub reason: String,
}

/// What a hub could tell of the fleet's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Every node (not relays) of the sites that answered, by site.
    pub nodes: Vec<NodeFacts>,
    /// Sites whose relays did not answer (cut off, or down): their nodes
    /// are not in `nodes`.
    pub unlisted: Vec<Unlisted>,
}

/// The nodes of one site's report, as configuration sees them.
pub fn facts_of(report: &NodesReport) -> Vec<NodeFacts> {
    report
        .nodes
        .iter()
        .filter(|n| n.role == Some(Role::Node))
        .map(|n| NodeFacts {
            name: n.name.clone(),
            region: report.region.clone(),
            site: report.site.clone(),
            labels: n.labels.clone(),
            facts: n.facts.clone(),
        })
        .collect()
}

/// Asks the hub for the fleet, then every site's relay (through the hub)
/// for its nodes, a few sites at a time. Fails only if the hub itself
/// cannot be asked.
pub async fn inventory(client: &ApiClient) -> Result<Inventory, ClientError> {
    let fleet = client.fleet().await?;
    let mut sites: Vec<(String, String)> = fleet
        .sites
        .iter()
        .map(|s| (s.region.clone(), s.site.clone()))
        .collect();
    sites.sort();
    let mut inv = Inventory::default();
    for chunk in sites.chunks(AT_ONCE) {
        let mut asks = JoinSet::new();
        for (region, site) in chunk.iter().cloned() {
            let client = client.clone();
            asks.spawn(async move {
                let answer = client.nodes(&site, Some(&region)).await;
                (region, site, answer)
            });
        }
        while let Some(done) = asks.join_next().await {
            let (region, site, answer) = done.expect("the ask does not panic");
            match answer {
                Ok(report) => inv.nodes.extend(facts_of(&report)),
                Err(e) => inv.unlisted.push(Unlisted {
                    region,
                    site,
                    reason: e.to_string(),
                }),
            }
        }
    }
    // The same order whatever order the answers came in.
    inv.nodes
        .sort_by(|a, b| (&a.region, &a.site, &a.name).cmp(&(&b.region, &b.site, &b.name)));
    inv.unlisted
        .sort_by(|a, b| (&a.region, &a.site).cmp(&(&b.region, &b.site)));
    Ok(inv)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_node::site::Status;
    use trellis_relay::report::NodeRow;

    use super::*;

    fn row(name: &str, role: Role, labels: &[(&str, &str)]) -> NodeRow {
        NodeRow {
            name: name.into(),
            role: Some(role),
            alive: true,
            status: Status::Passing,
            cpu_pct: None,
            mem_pct: None,
            disk_pct: None,
            load1: None,
            generation: 1,
            gossip_addr: "127.0.0.1:1".into(),
            checks: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            facts: BTreeMap::from([("os".to_owned(), "linux".to_owned())]),
        }
    }

    #[test]
    fn a_sites_nodes_carry_its_region_and_site_and_relays_are_left_out() {
        let report = NodesReport {
            region: "eu".into(),
            site: "par-1".into(),
            relay: "par-1-relay".into(),
            nodes: vec![
                row("par-1-relay", Role::Relay, &[]),
                row("web-1", Role::Node, &[("role", "web")]),
                row("db-1", Role::Node, &[]),
            ],
        };
        let facts = facts_of(&report);
        assert_eq!(
            facts.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
            ["web-1", "db-1"]
        );
        assert_eq!(
            (facts[0].region.as_str(), facts[0].site.as_str()),
            ("eu", "par-1")
        );
        assert_eq!(facts[0].labels["role"], "web");
        assert_eq!(facts[1].facts["os"], "linux");
    }
}
