//! The site as gossip sees it: the seam between chitchat and Trellis.
//!
//! A member publishes its [`Health`] as a handful of short key-values
//! ([`Health::to_kv`]); any observer turns the gossip state back into a
//! [`SiteView`] ([`Health::from_kv`]). The relay's summariser and the
//! simulator consume `SiteView`s and never see chitchat. Parsing is lenient:
//! a value a peer garbled becomes "unknown", never an error that would hide
//! the rest of the site.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::id::Role;

/// Gossip keys. Short, because every key travels in every delta.
pub mod keys {
    pub const ROLE: &str = "role";
    pub const STATUS: &str = "status";
    pub const CPU: &str = "cpu";
    pub const MEM: &str = "mem";
    pub const DISK: &str = "disk";
    pub const LOAD: &str = "load";
    pub const CHECK_PREFIX: &str = "check:";
    /// A label from the member's configuration (`[node] labels`).
    pub const LABEL_PREFIX: &str = "label:";
    /// A fact about the member's machine (hostname, OS, architecture).
    pub const FACT_PREFIX: &str = "fact:";
}

/// The key-values that describe a member (its labels and facts), published
/// once when it joins; they select which configuration applies to it.
pub fn descriptor_kv(
    labels: &BTreeMap<String, String>,
    facts: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    labels
        .iter()
        .map(|(k, v)| (format!("{}{k}", keys::LABEL_PREFIX), v.clone()))
        .chain(
            facts
                .iter()
                .map(|(k, v)| (format!("{}{k}", keys::FACT_PREFIX), v.clone())),
        )
        .collect()
}

/// Reads labels and facts back from a member's key-values.
pub fn descriptors_of<'a>(
    kv: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let (mut labels, mut facts) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in kv {
        if let Some(name) = k.strip_prefix(keys::LABEL_PREFIX) {
            labels.insert(name.to_owned(), v.to_owned());
        } else if let Some(name) = k.strip_prefix(keys::FACT_PREFIX) {
            facts.insert(name.to_owned(), v.to_owned());
        }
    }
    (labels, facts)
}

/// Longest check detail published in gossip; the rest is cut.
pub const MAX_DETAIL_LEN: usize = 120;

/// Health of a check, a node or a site, from best to worst.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Passing,
    /// Not known yet, or the peer published something unreadable.
    Unknown,
    Warning,
    Critical,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Passing,
        Status::Unknown,
        Status::Warning,
        Status::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Unknown => "unknown",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// Status of a command check from its exit code (Nagios convention).
    pub fn from_exit_code(code: i32) -> Status {
        match code {
            0 => Status::Passing,
            1 => Status::Warning,
            _ => Status::Critical,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Status::ALL.into_iter().find(|x| x.as_str() == s).ok_or(())
    }
}

/// The outcome of one user check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckResult {
    pub status: Status,
    /// A short human explanation ("exit 2: disk full", "HTTP 503").
    pub detail: String,
}

impl CheckResult {
    pub fn new(status: Status, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        if detail.len() > MAX_DETAIL_LEN {
            let mut cut = MAX_DETAIL_LEN;
            while !detail.is_char_boundary(cut) {
                cut -= 1;
            }
            detail.truncate(cut);
        }
        CheckResult { status, detail }
    }

    fn encode(&self) -> String {
        if self.detail.is_empty() {
            self.status.to_string()
        } else {
            format!("{}: {}", self.status, self.detail)
        }
    }

    fn decode(value: &str) -> Self {
        let (status, detail) = value.split_once(": ").unwrap_or((value, ""));
        CheckResult::new(status.parse().unwrap_or(Status::Unknown), detail)
    }
}

/// What a member publishes about itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub role: Option<Role>,
    /// The worst of the checks and the resource thresholds.
    pub status: Status,
    /// Percent of CPU time busy, all cores, averaged over about a minute.
    pub cpu_pct: Option<u8>,
    /// Percent of memory in use.
    pub mem_pct: Option<u8>,
    /// Percent used of the fullest local disk.
    pub disk_pct: Option<u8>,
    /// One-minute load average.
    pub load1: Option<f32>,
    pub checks: BTreeMap<String, CheckResult>,
}

impl Health {
    /// The key-values to publish in gossip.
    pub fn to_kv(&self) -> Vec<(String, String)> {
        let mut kv = vec![(keys::STATUS.to_owned(), self.status.to_string())];
        if let Some(role) = self.role {
            kv.push((keys::ROLE.to_owned(), role.to_string()));
        }
        for (key, value) in [
            (keys::CPU, self.cpu_pct),
            (keys::MEM, self.mem_pct),
            (keys::DISK, self.disk_pct),
        ] {
            if let Some(v) = value {
                kv.push((key.to_owned(), v.to_string()));
            }
        }
        if let Some(load) = self.load1 {
            kv.push((keys::LOAD.to_owned(), format!("{load:.2}")));
        }
        for (name, result) in &self.checks {
            kv.push((format!("{}{name}", keys::CHECK_PREFIX), result.encode()));
        }
        kv
    }

    /// Reads health back from gossip key-values; unreadable values become
    /// `None` or [`Status::Unknown`].
    pub fn from_kv<'a>(kv: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut h = Health {
            status: Status::Unknown,
            ..Health::default()
        };
        let pct = |v: &str| v.parse::<u8>().ok().filter(|p| *p <= 100);
        for (key, value) in kv {
            match key {
                keys::ROLE => h.role = value.parse().ok(),
                keys::STATUS => h.status = value.parse().unwrap_or(Status::Unknown),
                keys::CPU => h.cpu_pct = pct(value),
                keys::MEM => h.mem_pct = pct(value),
                keys::DISK => h.disk_pct = pct(value),
                keys::LOAD => {
                    h.load1 = value
                        .parse::<f32>()
                        .ok()
                        .filter(|l| l.is_finite() && *l >= 0.0)
                }
                _ => {
                    if let Some(name) = key.strip_prefix(keys::CHECK_PREFIX) {
                        h.checks.insert(name.to_owned(), CheckResult::decode(value));
                    }
                }
            }
        }
        h
    }

    /// Names of the checks that are not passing.
    pub fn failing_checks(&self) -> impl Iterator<Item = (&str, &CheckResult)> {
        self.checks
            .iter()
            .filter(|(_, r)| r.status != Status::Passing)
            .map(|(n, r)| (n.as_str(), r))
    }
}

/// One member of a site as seen by an observer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberView {
    pub name: String,
    /// Incremented each time the member restarts.
    pub generation: u64,
    pub gossip_addr: std::net::SocketAddr,
    /// The failure detector's verdict (always true for the observer itself).
    pub alive: bool,
    pub health: Health,
    /// The member's labels (`[node] labels` in its configuration). Always
    /// serialised: this travels in postcard, which is not self-describing.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Facts about its machine: `hostname`, `os`, `arch`.
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
    /// What it says about configuration: a relay's offer, a node's applied
    /// version, last result and last drift.
    #[serde(default)]
    pub config: crate::distribute::MemberConfig,
    /// What it says about patches: a relay's order, a node's state.
    #[serde(default)]
    pub patch: crate::patchstate::MemberPatch,
}

impl MemberView {
    pub fn is_relay(&self) -> bool {
        self.health.role == Some(Role::Relay)
    }
}

/// A site's membership and health at one moment, as one member sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SiteView {
    pub region: String,
    pub site: String,
    /// Every known incarnation of every member. A member that restarted
    /// appears once per generation until the old one is forgotten; use
    /// [`SiteView::current_members`].
    pub members: Vec<MemberView>,
}

impl SiteView {
    /// The latest generation of each member, sorted by name.
    pub fn current_members(&self) -> Vec<&MemberView> {
        let mut latest: BTreeMap<&str, &MemberView> = BTreeMap::new();
        for m in &self.members {
            let entry = latest.entry(&m.name).or_insert(m);
            if m.generation > entry.generation {
                *entry = m;
            }
        }
        latest.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Health {
        let mut checks = BTreeMap::new();
        checks.insert("sshd".into(), CheckResult::new(Status::Passing, ""));
        checks.insert(
            "disk-io".into(),
            CheckResult::new(Status::Critical, "exit 2: i/o error"),
        );
        Health {
            role: Some(Role::Node),
            status: Status::Critical,
            cpu_pct: Some(12),
            mem_pct: Some(40),
            disk_pct: Some(97),
            load1: Some(0.5),
            checks,
        }
    }

    #[test]
    fn health_survives_gossip_key_values() {
        let h = sample();
        let kv = h.to_kv();
        let back = Health::from_kv(kv.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(back, h);
    }

    #[test]
    fn unreadable_values_become_unknown_instead_of_failing() {
        let back = Health::from_kv([
            ("status", "on fire"),
            ("cpu", "250"),
            ("mem", "-1"),
            ("load", "NaN"),
            ("check:x", "maybe: who knows"),
            ("unrelated", "ignored"),
        ]);
        assert_eq!(back.status, Status::Unknown);
        assert_eq!(back.cpu_pct, None);
        assert_eq!(back.mem_pct, None);
        assert_eq!(back.load1, None);
        assert_eq!(back.checks["x"].status, Status::Unknown);
        assert_eq!(back.checks["x"].detail, "who knows");
    }

    #[test]
    fn labels_and_facts_survive_gossip_key_values_apart_from_health() {
        let labels: BTreeMap<String, String> = [("role".to_owned(), "web".to_owned())].into();
        let facts: BTreeMap<String, String> = [("os".to_owned(), "linux".to_owned())].into();
        let mut kv = sample().to_kv();
        kv.extend(descriptor_kv(&labels, &facts));
        let pairs = || kv.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        assert_eq!(descriptors_of(pairs()), (labels, facts));
        assert_eq!(
            Health::from_kv(pairs()),
            sample(),
            "health is not disturbed"
        );
    }

    #[test]
    fn long_details_are_cut_on_a_character_boundary() {
        let r = CheckResult::new(Status::Warning, "é".repeat(100));
        assert!(r.detail.len() <= MAX_DETAIL_LEN);
        assert!(r.detail.chars().all(|c| c == 'é'));
    }

    #[test]
    fn current_members_keep_only_the_latest_generation() {
        let addr = "127.0.0.1:1".parse().unwrap();
        let m = |name: &str, generation, alive| MemberView {
            name: name.into(),
            generation,
            gossip_addr: addr,
            alive,
            health: Health::default(),
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: Default::default(),
        };
        let view = SiteView {
            region: "r".into(),
            site: "s".into(),
            members: vec![m("b", 1, false), m("a", 5, true), m("b", 2, true)],
        };
        let cur = view.current_members();
        assert_eq!(cur.len(), 2);
        assert_eq!((cur[0].name.as_str(), cur[0].generation), ("a", 5));
        assert_eq!((cur[1].name.as_str(), cur[1].alive), ("b", true));
    }
}
