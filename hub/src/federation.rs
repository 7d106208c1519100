//! Hub federation: what a hub tells the others in their gossip cluster, and
//! reading it back.
//!
//! Each hub publishes a few keys: its API URL and region, fingerprints of
//! what it holds (relay records, management log), and one compact key per
//! site it serves — the relay connected to it, when it last heard from it,
//! and the site's counts. Every hub therefore knows which hub serves which
//! site and how fresh that is, and sees at a glance which peer holds
//! something it does not (different fingerprints) and should be pulled
//! from. Parsing is lenient: a key another hub garbled is skipped.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use trellis_node::gossip::Member;
use trellis_relay::summary::{SiteKey, SiteStatus, SiteSummary, StatusCounts};

use crate::core::Served;

/// Gossip keys of a hub.
pub mod keys {
    pub const API: &str = "api";
    pub const REGION: &str = "region";
    pub const RECORDS: &str = "records";
    pub const LOG: &str = "log";
    pub const SERVES: &str = "serves:";
}

/// Another hub as the federation sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerHub {
    pub name: String,
    pub region: String,
    /// Its endpoint (uplink, federation and replication).
    pub addr: SocketAddr,
    pub api: String,
    /// The failure detector's verdict.
    pub alive: bool,
    pub records_digest: u64,
    pub log_digest: u64,
    pub log_entries: u64,
    #[serde(skip)]
    pub serves: Vec<(SiteKey, Served)>,
    pub sites_served: usize,
}

/// What a hub publishes.
pub struct Published<'a> {
    pub api: &'a str,
    pub region: &'a str,
    pub records_digest: u64,
    pub log_digest: u64,
    pub log_entries: u64,
    pub served: &'a [(SiteKey, Served)],
}

/// The key-values a hub publishes in federation gossip.
pub fn encode(p: &Published<'_>) -> Vec<(String, String)> {
    let mut kv = vec![
        (keys::API.to_owned(), p.api.to_owned()),
        (keys::REGION.to_owned(), p.region.to_owned()),
        (keys::RECORDS.to_owned(), p.records_digest.to_string()),
        (
            keys::LOG.to_owned(),
            format!("{} {}", p.log_digest, p.log_entries),
        ),
    ];
    for ((region, site), s) in p.served {
        let c = &s.summary;
        kv.push((
            format!("{}{region}/{site}", keys::SERVES),
            format!(
                "relay={} heard={} gen={} total={} alive={} dead={} passing={} unknown={} warning={} critical={}",
                s.relay,
                s.heard_ms,
                c.generated_ms,
                c.nodes_total,
                c.nodes_alive,
                c.nodes_dead,
                c.by_status.passing,
                c.by_status.unknown,
                c.by_status.warning,
                c.by_status.critical,
            ),
        ));
    }
    kv
}

/// Reads a `serves:REGION/SITE` key of hub `hub`.
pub fn decode_served(hub: &str, key: &str, value: &str) -> Option<(SiteKey, Served)> {
    let (region, site) = key.strip_prefix(keys::SERVES)?.split_once('/')?;
    let fields: BTreeMap<&str, &str> = value.split(' ').filter_map(|f| f.split_once('=')).collect();
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let n32 = |k: &str| num(k).and_then(|v| u32::try_from(v).ok());
    let relay = (*fields.get("relay")?).to_owned();
    let summary = SiteSummary {
        nodes_total: n32("total")?,
        nodes_alive: n32("alive")?,
        nodes_dead: n32("dead")?,
        by_status: StatusCounts {
            passing: n32("passing")?,
            unknown: n32("unknown")?,
            warning: n32("warning")?,
            critical: n32("critical")?,
        },
        ..SiteSummary::empty(region, site, &relay, num("gen")?)
    };
    Some((
        (region.to_owned(), site.to_owned()),
        Served {
            hub: hub.to_owned(),
            relay,
            heard_ms: num("heard")?,
            summary,
        },
    ))
}

/// The other hubs, from the federation's members (the latest incarnation
/// of each name; `me` left out).
pub fn peers(members: Vec<Member>, me: &str) -> Vec<PeerHub> {
    let mut latest: BTreeMap<String, Member> = BTreeMap::new();
    for m in members {
        if m.name == me {
            continue;
        }
        match latest.get(&m.name) {
            Some(cur) if cur.generation >= m.generation => {}
            _ => {
                latest.insert(m.name.clone(), m);
            }
        }
    }
    latest
        .into_values()
        .map(|m| {
            let serves: Vec<(SiteKey, Served)> =
                m.kv.iter()
                    .filter_map(|(k, v)| decode_served(&m.name, k, v))
                    .collect();
            let (log_digest, log_entries) =
                m.kv.get(keys::LOG)
                    .and_then(|v| v.split_once(' '))
                    .map(|(d, n)| (d.parse().unwrap_or(0), n.parse().unwrap_or(0)))
                    .unwrap_or((0, 0));
            PeerHub {
                region: m.kv.get(keys::REGION).cloned().unwrap_or_default(),
                api: m.kv.get(keys::API).cloned().unwrap_or_default(),
                records_digest: m
                    .kv
                    .get(keys::RECORDS)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                log_digest,
                log_entries,
                sites_served: serves.len(),
                serves,
                addr: m.addr,
                alive: m.alive,
                name: m.name,
            }
        })
        .collect()
}

/// Sites the alive peers serve, for the fleet view.
pub fn served_by_alive(peers: &[PeerHub]) -> Vec<(SiteKey, Served)> {
    peers
        .iter()
        .filter(|p| p.alive)
        .flat_map(|p| p.serves.iter().cloned())
        .collect()
}

/// One hub in `GET /api/v1/hubs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubRow {
    pub name: String,
    pub region: String,
    pub addr: String,
    pub api: String,
    /// Whether this is the hub that answered.
    pub this: bool,
    pub alive: bool,
    pub sites_served: usize,
    pub log_entries: u64,
    /// Whether it holds the same relay records and log as the hub that
    /// answered (equal fingerprints).
    pub in_sync: bool,
}

/// `GET /api/v1/hubs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubsReport {
    pub hubs: Vec<HubRow>,
}

/// A site's status when only its serving hub's gossip is known.
pub fn status_of(s: &Served) -> SiteStatus {
    s.summary.status()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served() -> Served {
        Served {
            hub: "h1".into(),
            relay: "par-relay".into(),
            heard_ms: 1234,
            summary: SiteSummary {
                nodes_total: 10,
                nodes_alive: 9,
                nodes_dead: 1,
                by_status: StatusCounts {
                    passing: 8,
                    unknown: 0,
                    warning: 1,
                    critical: 0,
                },
                ..SiteSummary::empty("eu", "par", "par-relay", 999)
            },
        }
    }

    #[test]
    fn what_a_hub_publishes_reads_back() {
        let s = served();
        let key = ("eu".to_owned(), "par".to_owned());
        let kv = encode(&Published {
            api: "http://127.0.0.1:7800",
            region: "eu",
            records_digest: 42,
            log_digest: 7,
            log_entries: 3,
            served: &[(key.clone(), s.clone())],
        });
        let member = Member {
            name: "h1".into(),
            generation: 5,
            addr: "127.0.0.1:7700".parse().unwrap(),
            alive: true,
            kv: kv.into_iter().collect(),
        };
        let ps = peers(vec![member], "h2");
        assert_eq!(ps.len(), 1);
        let p = &ps[0];
        assert_eq!((p.records_digest, p.log_digest, p.log_entries), (42, 7, 3));
        assert_eq!(p.api, "http://127.0.0.1:7800");
        assert_eq!(p.serves, vec![(key, s)]);
        assert_eq!(served_by_alive(&ps).len(), 1);
    }

    #[test]
    fn garbled_keys_are_skipped_and_the_latest_incarnation_counts() {
        assert!(decode_served("h", "serves:nosite", "relay=r").is_none());
        assert!(decode_served("h", "serves:eu/par", "relay=r heard=x").is_none());
        let old = Member {
            name: "h1".into(),
            generation: 1,
            addr: "127.0.0.1:1".parse().unwrap(),
            alive: false,
            kv: BTreeMap::new(),
        };
        let new = Member {
            generation: 2,
            addr: "127.0.0.1:2".parse().unwrap(),
            alive: true,
            ..old.clone()
        };
        let ps = peers(vec![old.clone(), new, old], "me");
        assert_eq!(ps.len(), 1);
        assert!(ps[0].alive);
        assert_eq!(ps[0].addr.port(), 2);
    }
}
