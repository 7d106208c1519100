//! From what gossip shows ([`SiteView`]) to what the hub needs
//! ([`SiteSummary`]). Pure: no clock, no I/O.

use trellis_node::site::{MemberView, SiteView, Status};

use trellis_node::distribute::Outcome;

use crate::summary::{
    MAX_CONFIG_LISTED, MAX_DEAD_LISTED, MAX_FAILING_CHECKS, MAX_FAILING_PER_NODE, MAX_WORST,
    NodeBrief, SiteSummary,
};

/// Whether a member counts as a node of the site (relays do not).
pub fn is_node(m: &MemberView, relay: &str) -> bool {
    m.name != relay && !m.is_relay()
}

/// Summarises `view` as seen by `relay` at wall-clock `generated_ms`.
pub fn summarise(view: &SiteView, relay: &str, generated_ms: u64) -> SiteSummary {
    let mut s = SiteSummary::empty(&view.region, &view.site, relay, generated_ms);
    let mut worst: Vec<NodeBrief> = Vec::new();
    for m in view.current_members() {
        if m.name == relay {
            s.config.offered = m.config.offer.map(|o| o.version);
        }
        if !is_node(m, relay) {
            continue;
        }
        s.nodes_total += 1;
        let failing: Vec<String> = m
            .health
            .failing_checks()
            .map(|(n, _)| n.to_owned())
            .collect();
        if m.alive {
            s.nodes_alive += 1;
            s.by_status.add(m.health.status);
            for (name, r) in m.health.failing_checks() {
                let known = s.failing_checks.len() < MAX_FAILING_CHECKS
                    || s.failing_checks.contains_key(name);
                if known {
                    s.failing_checks
                        .entry(name.to_owned())
                        .or_default()
                        .add(r.status);
                }
            }
            let c = &mut s.config;
            *c.versions
                .entry(m.config.applied.as_ref().map_or(0, |a| a.0))
                .or_default() += 1;
            if m.config.drifted() {
                c.drifted_count += 1;
                c.drifted.push(m.name.clone());
            }
            if let Some(r) = m
                .config
                .result
                .as_ref()
                .filter(|r| r.outcome != Outcome::Ok)
            {
                // Only while nothing newer was applied since.
                let held = m.config.applied.as_ref().map_or(0, |a| a.0);
                if held <= r.version {
                    c.failing_count += 1;
                    c.failing.push((m.name.clone(), r.version));
                }
                if held < r.version {
                    *c.stuck.entry(r.version).or_default() += 1;
                }
            }
            s.cpu.add(m.health.cpu_pct);
            s.mem.add(m.health.mem_pct);
            s.disk.add(m.health.disk_pct);
        } else {
            s.nodes_dead += 1;
            s.dead.push(m.name.clone());
        }
        let brief = NodeBrief {
            name: m.name.clone(),
            alive: m.alive,
            status: if m.alive {
                m.health.status
            } else {
                Status::Critical
            },
            failing: failing.into_iter().take(MAX_FAILING_PER_NODE).collect(),
            cpu_pct: m.health.cpu_pct,
            mem_pct: m.health.mem_pct,
            disk_pct: m.health.disk_pct,
        };
        if brief.is_notable() {
            worst.push(brief);
        }
    }
    s.dead.sort();
    s.dead.truncate(MAX_DEAD_LISTED);
    s.config.drifted.sort();
    s.config.drifted.truncate(MAX_CONFIG_LISTED);
    s.config.failing.sort();
    s.config.failing.truncate(MAX_CONFIG_LISTED);
    worst.sort_by(NodeBrief::worse_first);
    worst.truncate(MAX_WORST);
    s.worst = worst;
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use trellis_node::id::Role;
    use trellis_node::site::{CheckResult, Health};

    use super::*;
    use crate::summary::SiteStatus;

    pub fn member(name: &str, alive: bool, status: Status, failing: &[&str]) -> MemberView {
        let mut checks = BTreeMap::new();
        for c in failing {
            checks.insert((*c).to_owned(), CheckResult::new(status, "bad"));
        }
        checks.insert("ok".into(), CheckResult::new(Status::Passing, ""));
        MemberView {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            alive,
            health: Health {
                role: Some(Role::Node),
                status,
                cpu_pct: Some(20),
                mem_pct: Some(50),
                disk_pct: Some(70),
                load1: Some(0.3),
                checks,
            },
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: Default::default(),
        }
    }

    fn view(members: Vec<MemberView>) -> SiteView {
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    #[test]
    fn a_healthy_site_counts_every_node_passing() {
        let v = view(
            (0..10)
                .map(|i| member(&format!("n{i}"), true, Status::Passing, &[]))
                .collect(),
        );
        let s = summarise(&v, "relay", 1);
        assert_eq!((s.nodes_total, s.nodes_alive, s.nodes_dead), (10, 10, 0));
        assert_eq!(s.by_status.passing, 10);
        assert_eq!(s.cpu.buckets[2], 10);
        assert!(s.worst.is_empty());
        assert_eq!(s.status(), SiteStatus::Healthy);
    }

    #[test]
    fn the_summary_counts_versions_held_and_names_drifted_and_stuck_nodes() {
        use trellis_node::distribute::{ConfigResult, DriftAction, DriftNote, Offer, Outcome};
        let mut relay = member("r", true, Status::Passing, &[]);
        relay.health.role = Some(Role::Relay);
        relay.config.offer = Some(Offer {
            version: 3,
            digest: [0; 32],
        });
        let at = |name: &str, v: u64| {
            let mut m = member(name, true, Status::Passing, &[]);
            m.config.applied = Some((v, "h".into()));
            m
        };
        let mut drifted = at("b", 3);
        drifted.config.drift.insert(
            "/etc/x".into(),
            DriftNote {
                n: 1,
                action: DriftAction::Reported,
                path: "/etc/x".into(),
                expected: "aa".into(),
                found: Some("bb".into()),
                size: Some(1),
            },
        );
        let mut refused = at("c", 2);
        refused.config.result = Some(ConfigResult {
            version: 3,
            outcome: Outcome::Refused,
            detail: "bad signature".into(),
        });
        let mut reload_failed = at("d", 3);
        reload_failed.config.result = Some(ConfigResult {
            version: 3,
            outcome: Outcome::Failed,
            detail: "exit 1".into(),
        });
        let fresh = member("e", true, Status::Passing, &[]);
        let v = SiteView {
            region: "eu".into(),
            site: "par".into(),
            members: vec![relay, at("a", 3), drifted, refused, reload_failed, fresh],
        };
        let c = summarise(&v, "r", 1).config;
        assert_eq!(c.offered, Some(3));
        assert_eq!(c.versions, BTreeMap::from([(0, 1), (2, 1), (3, 3)]));
        assert_eq!(c.at_least(3), 3);
        assert_eq!((c.drifted_count, c.drifted), (1, vec!["b".to_owned()]));
        assert_eq!(c.failing_count, 2);
        assert_eq!(c.failing, vec![("c".to_owned(), 3), ("d".to_owned(), 3)]);
        // Only the node that does not hold v3 is stuck on it.
        assert_eq!(c.stuck, BTreeMap::from([(3, 1)]));
    }

    #[test]
    fn relays_are_not_counted_as_nodes() {
        let mut r = member("other-relay", true, Status::Passing, &[]);
        r.health.role = Some(Role::Relay);
        let v = view(vec![
            member("n1", true, Status::Passing, &[]),
            member("relay", true, Status::Passing, &[]),
            r,
        ]);
        assert_eq!(summarise(&v, "relay", 1).nodes_total, 1);
    }

    #[test]
    fn dead_and_failing_nodes_are_counted_named_and_ranked() {
        let v = view(vec![
            member("a", true, Status::Passing, &[]),
            member("b", true, Status::Warning, &["ntp"]),
            member("c", true, Status::Critical, &["ntp", "disk"]),
            member("d", false, Status::Passing, &[]),
        ]);
        let s = summarise(&v, "relay", 1);
        assert_eq!((s.nodes_alive, s.nodes_dead), (3, 1));
        assert_eq!(s.dead, vec!["d".to_owned()]);
        assert_eq!(s.failing_checks["ntp"].warning, 1);
        assert_eq!(s.failing_checks["ntp"].critical, 1);
        assert_eq!(s.failing_checks["disk"].critical, 1);
        let order: Vec<&str> = s.worst.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(order, ["d", "c", "b"]);
        assert_eq!(s.status(), SiteStatus::Critical, "1 dead + 1 critical of 4");
    }

    #[test]
    fn a_restarted_node_counts_once_as_its_latest_generation() {
        let mut old = member("a", false, Status::Passing, &[]);
        old.generation = 1;
        let mut new = member("a", true, Status::Passing, &[]);
        new.generation = 2;
        let s = summarise(&view(vec![old, new]), "relay", 1);
        assert_eq!((s.nodes_total, s.nodes_alive, s.nodes_dead), (1, 1, 0));
    }

    #[test]
    fn summaries_stay_bounded_in_a_huge_broken_site() {
        let v = view(
            (0..5000)
                .map(|i| member(&format!("n{i:04}"), i % 2 == 0, Status::Critical, &["x"]))
                .collect(),
        );
        let s = summarise(&v, "relay", 1);
        assert_eq!(s.nodes_total, 5000);
        assert_eq!(s.dead.len(), MAX_DEAD_LISTED);
        assert_eq!(s.worst.len(), MAX_WORST);
        assert!(s.worst.iter().all(|n| !n.alive), "dead nodes rank first");
    }
}
