//! Configuration changes: the versions an operator applies at a hub, what
//! each relay and node holds of them, and the books that time how long
//! each site takes to converge.
//!
//! The world moves the versions (hub to hub, hub to relay over the uplink,
//! relay to nodes through gossip and a fetch); this module only keeps
//! state and counts, with the time passed in, so its rules are tested on
//! their own.
//!
//! A version *converges* at a site when every node that is running there
//! has applied it or a later one: bundles are whole configurations, so a
//! later version carries everything an earlier one did. Nodes that are down
//! at that moment catch up when they restart; `all_nodes_s` times that.

use crate::net::Pipe;
use crate::report::{ConfigChangeOutcome, ConvergenceTimes, HubReach, SiteConvergence, ms};
use crate::scenario::{ActionKind, Scenario};

/// One configuration change of a run, with its version.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// 1, 2, … in the order the changes happen.
    pub version: u64,
    /// Virtual time (s) the operator applies it.
    pub at: f64,
    /// Index of the hub it is applied at.
    pub hub: usize,
    pub bundle_bytes: u64,
    /// Seconds a node takes to apply it once it has the bundle.
    pub apply_time: f64,
}

/// The configuration changes of `sc`, numbered in time order (file order
/// for equal times). Hub names were checked when the scenario was read;
/// an unnamed hub is the first.
pub fn changes(sc: &Scenario) -> Vec<Change> {
    let mut actions: Vec<_> = sc
        .actions
        .iter()
        .filter(|a| a.kind == ActionKind::ConfigChange)
        .collect();
    // A stable sort keeps file order among equal times.
    actions.sort_by_key(|a| a.at);
    actions
        .into_iter()
        .enumerate()
        .map(|(i, a)| Change {
            version: i as u64 + 1,
            at: a.at.as_secs_f64(),
            hub: a
                .hub
                .as_deref()
                .and_then(|h| h.strip_prefix("hub-"))
                .and_then(|n| n.parse::<usize>().ok())
                .map_or(0, |n| n.saturating_sub(1)),
            bundle_bytes: a.bundle_bytes(),
            apply_time: a.apply_time().as_secs_f64(),
        })
        .collect()
}

/// The value a relay announces in its site's gossip for `version`:
/// `VERSION:DIGEST`, the digest as long as a SHA-256 in hex, so that the
/// key costs in gossip what the real one does.
pub fn announcement(version: u64) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("trellis-sim bundle {version}").as_bytes(),
    );
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{version}:{hex}")
}

/// The gossip key the relay announces its configuration under.
pub const ANNOUNCE_KEY: &str = "config";

/// One node's configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeConfig {
    /// The newest version applied (recorded on disk: survives a crash).
    pub applied: u64,
    /// The newest version seen announced (in memory: lost at a crash).
    pub wanted: u64,
    /// A fetch or an apply is under way.
    pub busy: bool,
    /// Bumped at each crash, so that a fetch or apply an earlier run of
    /// the node started is void.
    pub epoch: u64,
}

impl NodeConfig {
    /// The node crashed: what it was doing and what it had seen are gone.
    pub fn crash(&mut self) {
        self.epoch += 1;
        self.busy = false;
        self.wanted = self.applied;
    }

    /// Whether the node should start fetching now.
    pub fn should_fetch(&self) -> bool {
        !self.busy && self.wanted > self.applied
    }
}

/// A site's configuration: its relay's cache and its nodes.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    /// The newest version the relay holds (its cache is on disk: survives
    /// a crash).
    pub relay: u64,
    /// The version the relay announces in gossip (0: none yet).
    pub announced: u64,
    /// Sites on real chitchat: arrivals of the announced value handled so
    /// far.
    pub arrivals_seen: usize,
    /// Member 0, the relay, has an entry that stays unused.
    pub nodes: Vec<NodeConfig>,
    /// The relay's side of the LAN, which every fetch shares.
    pub serve: Pipe,
}

impl SiteConfig {
    /// A site of `members` (the relay included) with nothing applied.
    pub fn new(members: usize) -> Self {
        SiteConfig {
            relay: 0,
            announced: 0,
            arrivals_seen: 0,
            nodes: vec![NodeConfig::default(); members],
            serve: Pipe::default(),
        }
    }
}

/// What the books know of one change made.
#[derive(Debug, Clone)]
struct Made {
    at: f64,
    cut_off: Vec<bool>,
    hubs: Vec<Option<f64>>,
    relays: Vec<Option<f64>>,
    converged: Vec<Option<f64>>,
    all_nodes: Vec<Option<f64>>,
}

/// When each change reached each hub, relay and site.
#[derive(Debug, Clone)]
pub struct Books {
    changes: Vec<Change>,
    /// By version − 1; `None` until the change is made.
    made: Vec<Option<Made>>,
    sites: usize,
    hubs: usize,
}

impl Books {
    pub fn new(changes: Vec<Change>, sites: usize, hubs: usize) -> Self {
        Books {
            made: vec![None; changes.len()],
            changes,
            sites,
            hubs,
        }
    }

    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// Change `version`, if there is one.
    pub fn change(&self, version: u64) -> Option<&Change> {
        self.changes
            .get(usize::try_from(version.checked_sub(1)?).ok()?)
    }

    /// The newest version made so far (0: none).
    pub fn newest(&self) -> u64 {
        self.made.iter().take_while(|m| m.is_some()).count() as u64
    }

    /// The operator made change `version` at `now`; `cut_off` says, per
    /// site, whether its WAN link was down.
    pub fn made(&mut self, version: u64, now: f64, cut_off: Vec<bool>) {
        let Some(slot) = version
            .checked_sub(1)
            .and_then(|i| self.made.get_mut(usize::try_from(i).ok()?))
        else {
            return;
        };
        *slot = Some(Made {
            at: now,
            cut_off,
            hubs: vec![None; self.hubs],
            relays: vec![None; self.sites],
            converged: vec![None; self.sites],
            all_nodes: vec![None; self.sites],
        });
    }

    /// Made changes up to `version`, oldest first.
    fn up_to(&mut self, version: u64) -> impl Iterator<Item = &mut Made> {
        self.made
            .iter_mut()
            .take(version as usize)
            .filter_map(Option::as_mut)
    }

    /// Hub `hub` holds `version` (and so everything before it) from `now`.
    pub fn hub_holds(&mut self, hub: usize, version: u64, now: f64) {
        for m in self.up_to(version) {
            m.hubs[hub].get_or_insert(now);
        }
    }

    /// Site `site`'s relay holds `version` from `now`.
    pub fn relay_holds(&mut self, site: usize, version: u64, now: f64) {
        for m in self.up_to(version) {
            m.relays[site].get_or_insert(now);
        }
    }

    /// Site `site`'s nodes changed at `now` (one applied a version,
    /// crashed or restarted): marks the changes it has converged on.
    /// `up(j)` says whether node `j` runs; member 0 (the relay) does not
    /// count.
    pub fn nodes_changed(
        &mut self,
        site: usize,
        now: f64,
        nodes: &[NodeConfig],
        up: impl Fn(usize) -> bool,
    ) {
        let mut live: Option<u64> = None;
        let mut all = u64::MAX;
        for (j, n) in nodes.iter().enumerate().skip(1) {
            all = all.min(n.applied);
            if up(j) {
                live = Some(live.map_or(n.applied, |l| l.min(n.applied)));
            }
        }
        let Some(live) = live else {
            // No node runs: nothing to have converged.
            return;
        };
        for (i, m) in self.made.iter_mut().enumerate() {
            let Some(m) = m else { continue };
            let v = i as u64 + 1;
            if live >= v {
                m.converged[site].get_or_insert(now);
            }
            if all >= v {
                m.all_nodes[site].get_or_insert(now);
            }
        }
    }

    /// Whether every made change has converged at every site (nothing
    /// more can happen to the figures but catch-ups after restarts).
    pub fn all_converged(&self) -> bool {
        self.made
            .iter()
            .flatten()
            .all(|m| m.converged.iter().all(Option::is_some))
    }

    /// The figures of every change made, in version order. `sites` and
    /// `hubs` are the names, in index order.
    pub fn outcomes(&self, sites: &[String], hubs: &[String]) -> Vec<ConfigChangeOutcome> {
        let mut out = Vec::new();
        for (i, (c, m)) in self.changes.iter().zip(&self.made).enumerate() {
            let Some(m) = m else { continue };
            let next_made = self.made.get(i + 1).and_then(|n| n.as_ref()).map(|n| n.at);
            let after = |t: Option<f64>| t.map(|t| ms(t - m.at));
            let mut per_site: Vec<SiteConvergence> = (0..self.sites)
                .map(|s| SiteConvergence {
                    site: sites.get(s).cloned().unwrap_or_default(),
                    cut_off: m.cut_off[s],
                    relay_s: after(m.relays[s]),
                    converged_s: after(m.converged[s]),
                    all_nodes_s: after(m.all_nodes[s]),
                    superseded: next_made.is_some_and(|n| m.converged[s].is_none_or(|t| n <= t)),
                })
                .collect();
            let times = |cut: Option<bool>| -> Vec<f64> {
                per_site
                    .iter()
                    .filter(|p| cut.is_none_or(|c| p.cut_off == c))
                    .filter_map(|p| p.converged_s)
                    .collect()
            };
            let all = ConvergenceTimes::of(&times(None));
            let connected = ConvergenceTimes::of(&times(Some(false)));
            let cut_off = ConvergenceTimes::of(&times(Some(true)));
            let not_converged: Vec<String> = per_site
                .iter()
                .filter(|p| p.converged_s.is_none())
                .map(|p| p.site.clone())
                .collect();
            // Slowest first; those that never converged before all.
            per_site.sort_by(|a, b| {
                b.converged_s
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&a.converged_s.unwrap_or(f64::INFINITY))
                    .then_with(|| a.site.cmp(&b.site))
            });
            out.push(ConfigChangeOutcome {
                version: c.version,
                at_s: ms(m.at),
                hub: hubs.get(c.hub).cloned().unwrap_or_default(),
                bundle_bytes: c.bundle_bytes,
                apply_time_s: ms(c.apply_time),
                hubs: m
                    .hubs
                    .iter()
                    .enumerate()
                    .map(|(h, t)| HubReach {
                        hub: hubs.get(h).cloned().unwrap_or_default(),
                        after_s: after(*t),
                    })
                    .collect(),
                sites: self.sites as u64,
                sites_cut_off: m.cut_off.iter().filter(|c| **c).count() as u64,
                converged: all.count,
                all,
                connected,
                cut_off,
                not_converged,
                per_site,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scenario::Action;

    fn node(applied: u64) -> NodeConfig {
        NodeConfig {
            applied,
            ..NodeConfig::default()
        }
    }

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("{prefix}{i}")).collect()
    }

    #[test]
    fn changes_are_numbered_in_time_order_and_name_their_hub() {
        let text = r#"
            name = "c"
            duration = "10m"
            [topology]
            regions = 1
            hubs = 3
            sites_per_region = 1
            nodes_per_site = 1
            [[actions]]
            kind = "config_change"
            at = "5m"
            hub = "hub-3"
            [[actions]]
            kind = "config_change"
            at = "1m"
            [[actions]]
            kind = "config_change"
            at = "5m"
            apply_time = "1s"
        "#;
        let sc = Scenario::parse(text, "c.toml").unwrap();
        let c = changes(&sc);
        let got: Vec<(u64, f64, usize, f64)> = c
            .iter()
            .map(|c| (c.version, c.at, c.hub, c.apply_time))
            .collect();
        assert_eq!(
            got,
            [(1, 60.0, 0, 0.2), (2, 300.0, 2, 0.2), (3, 300.0, 0, 1.0)]
        );
        assert_eq!(
            c[0].bundle_bytes,
            Action::config_change(Duration::ZERO).bundle_bytes()
        );
    }

    #[test]
    fn an_announcement_names_the_version_and_a_digest() {
        let a = announcement(7);
        let (v, d) = a.split_once(':').unwrap();
        assert_eq!(v, "7");
        assert_eq!(d.len(), 64);
        assert_ne!(announcement(8), a);
    }

    #[test]
    fn a_crashed_node_forgets_what_it_saw_but_keeps_what_it_applied() {
        let mut n = NodeConfig {
            applied: 1,
            wanted: 3,
            busy: true,
            epoch: 4,
        };
        assert!(!n.should_fetch(), "busy");
        n.crash();
        assert_eq!(
            n,
            NodeConfig {
                applied: 1,
                wanted: 1,
                busy: false,
                epoch: 5,
            }
        );
        assert!(!n.should_fetch(), "it has applied all it knows of");
        n.wanted = 2;
        assert!(n.should_fetch());
    }

    fn books() -> Books {
        let change = |version, at| Change {
            version,
            at,
            hub: 0,
            bundle_bytes: 100,
            apply_time: 0.2,
        };
        Books::new(vec![change(1, 10.0), change(2, 50.0)], 2, 2)
    }

    #[test]
    fn a_site_converges_when_every_running_node_applied_and_waits_for_no_crashed_one() {
        let mut b = books();
        b.made(1, 10.0, vec![false, true]);
        assert_eq!(b.newest(), 1);
        let up = |down: usize| move |j: usize| j != down;
        // Site 0: node 2 lags.
        b.nodes_changed(0, 12.0, &[node(0), node(1), node(0), node(1)], up(99));
        assert!(!b.all_converged());
        // Node 2 crashes: the running ones all have it.
        b.nodes_changed(0, 13.0, &[node(0), node(1), node(0), node(1)], up(2));
        // Node 2 restarts and applies.
        b.nodes_changed(0, 40.0, &[node(0), node(1), node(1), node(1)], up(99));
        // Site 1, cut off, converges later.
        b.nodes_changed(1, 30.0, &[node(0), node(1), node(1), node(1)], up(99));
        assert!(b.all_converged());
        let o = &b.outcomes(&names("s", 2), &names("hub-", 2))[0];
        assert_eq!(o.converged, 2);
        assert_eq!(o.sites_cut_off, 1);
        let s0 = o.per_site.iter().find(|p| p.site == "s1").unwrap();
        assert_eq!((s0.converged_s, s0.all_nodes_s), (Some(3.0), Some(30.0)));
        let s1 = o.per_site.iter().find(|p| p.site == "s2").unwrap();
        assert_eq!((s1.converged_s, s1.cut_off), (Some(20.0), true));
        assert_eq!(o.per_site[0].site, "s2", "slowest first");
        assert_eq!((o.connected.count, o.connected.max_s), (1, 3.0));
        assert_eq!((o.cut_off.count, o.cut_off.max_s), (1, 20.0));
        assert!(o.not_converged.is_empty());
    }

    #[test]
    fn a_later_version_counts_for_an_earlier_one_and_marks_it_superseded() {
        let mut b = books();
        b.made(1, 10.0, vec![false, true]);
        b.hub_holds(0, 1, 10.0);
        b.nodes_changed(0, 11.0, &[node(0), node(1)], |_| true);
        b.made(2, 50.0, vec![false, true]);
        b.hub_holds(1, 2, 51.0);
        b.relay_holds(1, 2, 80.0);
        // Site 1 goes straight from nothing to version 2.
        b.nodes_changed(1, 82.0, &[node(0), node(2)], |_| true);
        let o = b.outcomes(&names("s", 2), &names("hub-", 2));
        assert_eq!(o.len(), 2);
        let v1 = &o[0];
        let s2 = v1.per_site.iter().find(|p| p.site == "s2").unwrap();
        assert_eq!(
            (s2.relay_s, s2.converged_s, s2.superseded),
            (Some(70.0), Some(72.0), true)
        );
        let s1 = v1.per_site.iter().find(|p| p.site == "s1").unwrap();
        assert!(!s1.superseded, "converged before version 2 was made");
        assert_eq!(
            v1.hubs.iter().map(|h| h.after_s).collect::<Vec<_>>(),
            [Some(0.0), Some(41.0)]
        );
        // Version 2 has not reached site 0's nodes.
        let v2 = &o[1];
        assert_eq!(v2.not_converged, ["s1"]);
        assert_eq!(v2.converged, 1);
        assert_eq!(v2.per_site[0].site, "s1", "not converged comes first");
        assert!(!b.all_converged());
    }

    #[test]
    fn a_change_not_yet_made_has_no_figures() {
        let mut b = books();
        // Versions that do not exist are ignored.
        b.made(0, 1.0, vec![true, true]);
        b.made(3, 1.0, vec![true, true]);
        assert_eq!(b.newest(), 0);
        assert!(b.change(0).is_none() && b.change(3).is_none());
        assert_eq!(b.change(2).map(|c| c.at), Some(50.0));
        b.made(1, 10.0, vec![false, false]);
        b.nodes_changed(0, 11.0, &[node(0), node(2)], |_| true);
        let o = b.outcomes(&names("s", 2), &names("hub-", 2));
        assert_eq!(o.len(), 1);
        assert_eq!(b.newest(), 1);
    }
}
