//! A configuration rollout as the operator follows it: where the fleet
//! stands with one version, from what `GET /api/v1/config/status` says.
//! Pure, so that `trellis config apply`'s waiting and its progress bar are
//! tested without a mesh.

use serde::{Deserialize, Serialize};

use crate::api::ConfigStatus;

/// Where the fleet stands with one configuration version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub version: u64,
    /// A newer version was stored since: this one will not be rolled out
    /// further.
    pub superseded_by: Option<u64>,
    /// Alive nodes of the sites the hubs hear from.
    pub nodes_alive: u32,
    /// Of them, those holding this version (or a newer one).
    pub holding: u32,
    /// Of them, those that tried this version and do not hold it (they
    /// refused it, or a file could not be written).
    pub stuck: u32,
    /// Nodes whose last attempt at this version failed or was refused,
    /// as `region/site/node` (at most the names the summaries carry).
    pub failing: Vec<String>,
    /// Sites the hubs do not hear from now (`region/site`): they get the
    /// version when their link returns, without anyone doing anything.
    pub unreachable: Vec<String>,
}

impl Rollout {
    pub fn of(status: &ConfigStatus, version: u64) -> Self {
        let mut r = Rollout {
            version,
            superseded_by: status
                .latest
                .as_ref()
                .map(|l| l.version)
                .filter(|&v| v > version),
            ..Rollout::default()
        };
        for s in &status.sites {
            let name = format!("{}/{}", s.region, s.site);
            if !s.reachable {
                r.unreachable.push(name);
                continue;
            }
            r.nodes_alive += s.nodes_alive;
            r.holding += s.config.at_least(version);
            r.stuck += s.config.stuck.get(&version).copied().unwrap_or(0);
            r.failing.extend(
                s.config
                    .failing
                    .iter()
                    .filter(|(_, v)| *v == version)
                    .map(|(node, _)| format!("{name}/{node}")),
            );
        }
        r
    }

    /// Every alive node of every reachable site holds the version or is
    /// stuck on it, or a newer version took over.
    pub fn settled(&self) -> bool {
        self.superseded_by.is_some() || self.holding + self.stuck >= self.nodes_alive
    }

    /// Settled with every node holding the version.
    pub fn succeeded(&self) -> bool {
        self.superseded_by.is_none() && self.stuck == 0 && self.failing.is_empty() && self.settled()
    }

    /// One line: a bar `width` wide and the figures.
    pub fn line(&self, width: usize) -> String {
        let total = self.nodes_alive.max(1) as usize;
        let done = (self.holding as usize * width / total).min(width);
        let stuck = (self.stuck as usize * width / total).min(width - done);
        let mut out = format!(
            "[{}{}{}] {}/{} nodes hold v{}",
            "#".repeat(done),
            "x".repeat(stuck),
            "-".repeat(width - done - stuck),
            self.holding,
            self.nodes_alive,
            self.version
        );
        if self.stuck > 0 {
            out.push_str(&format!(", {} stuck", self.stuck));
        }
        if !self.failing.is_empty() && self.stuck == 0 {
            out.push_str(&format!(", {} with failed reloads", self.failing.len()));
        }
        if !self.unreachable.is_empty() {
            out.push_str(&format!(
                " · {} site{} unreachable",
                self.unreachable.len(),
                if self.unreachable.len() == 1 { "" } else { "s" }
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_relay::summary::ConfigTally;

    use super::*;
    use crate::api::SiteConfigRow;
    use crate::log::{ConfigVersion, Hlc};

    fn site(name: &str, reachable: bool, alive: u32, versions: &[(u64, u32)]) -> SiteConfigRow {
        SiteConfigRow {
            region: "eu".into(),
            site: name.into(),
            reachable,
            nodes_alive: alive,
            at_latest: 0,
            config: ConfigTally {
                versions: versions.iter().copied().collect(),
                ..ConfigTally::default()
            },
        }
    }

    fn status(latest: u64, sites: Vec<SiteConfigRow>) -> ConfigStatus {
        ConfigStatus {
            latest: Some(ConfigVersion {
                version: latest,
                digest: "d".into(),
                comment: String::new(),
                author: "alice".into(),
                hlc: Hlc::default(),
                origin: "hub-1".into(),
                seq: 1,
            }),
            sites,
            nodes_alive: 0,
            at_latest: 0,
            sites_unreachable: 0,
            drifted: 0,
            failing: 0,
            recent: Vec::new(),
        }
    }

    #[test]
    fn a_rollout_settles_when_every_reachable_node_holds_the_version() {
        let mut s = status(
            3,
            vec![
                site("a", true, 4, &[(3, 4)]),
                site("b", true, 2, &[(2, 1), (3, 1)]),
                site("c", false, 5, &[(2, 5)]),
            ],
        );
        let r = Rollout::of(&s, 3);
        assert_eq!((r.nodes_alive, r.holding), (6, 5));
        assert_eq!(r.unreachable, vec!["eu/c"]);
        assert!(!r.settled());
        assert_eq!(
            r.line(10),
            "[########--] 5/6 nodes hold v3 · 1 site unreachable"
        );
        s.sites[1].config.versions = BTreeMap::from([(3, 2)]);
        let r = Rollout::of(&s, 3);
        assert!(r.settled() && r.succeeded());
    }

    #[test]
    fn nodes_that_refused_settle_the_rollout_but_not_as_a_success() {
        let mut b = site("b", true, 2, &[(2, 1), (3, 1)]);
        b.config.stuck = BTreeMap::from([(3, 1)]);
        b.config.failing = vec![("n2".into(), 3), ("n9".into(), 2)];
        let r = Rollout::of(&status(3, vec![b]), 3);
        assert!(r.settled());
        assert!(!r.succeeded());
        assert_eq!(r.failing, vec!["eu/b/n2"]);
        assert_eq!(r.line(4), "[##xx] 1/2 nodes hold v3, 1 stuck");
    }

    #[test]
    fn a_newer_version_ends_the_wait_for_an_older_one() {
        let r = Rollout::of(&status(5, vec![site("a", true, 3, &[(2, 3)])]), 4);
        assert_eq!(r.superseded_by, Some(5));
        assert!(r.settled() && !r.succeeded());
        // Holding a newer version counts as holding this one.
        let r = Rollout::of(&status(5, vec![site("a", true, 3, &[(5, 3)])]), 4);
        assert_eq!(r.holding, 3);
    }
}
