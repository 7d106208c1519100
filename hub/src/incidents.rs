//! Incidents: what an operator is paged about, correlated from the events
//! relays send and from the hub's fleet view, so that one fault is one
//! incident rather than a storm of alerts. Pure: the driver passes the time
//! and the inputs in, and sends on the changes this returns (audit notes,
//! webhooks).
//!
//! # Correlation
//! - A site the hub cannot reach is one *site unreachable* incident. While
//!   it is open, no node incident opens at that site: what would have
//!   opened one (a node reported dead, a check failing) is listed in the
//!   site's incident instead. Node incidents already open there stay as
//!   they are until their own condition clears.
//! - Several nodes of a site failing the same check (critical) are one
//!   *check failing at a site* incident listing the nodes, kept up to date
//!   as nodes start and stop failing; it stays until no node fails the
//!   check. A node incident for that check already open becomes that
//!   incident (same id, same opening time), so the page that came first
//!   stays the page.
//! - A node whose checks or liveness change more than a few times in a
//!   window is *flapping*: one incident, open until the node has been quiet
//!   for a while, instead of one per change.
//! - An incident that opens at a site the newest rollout touches, within a
//!   wave's bake time or while the rollout rolls back, names the rollout
//!   as its likely cause.
//!
//! # Foresight findings
//! Checks with a reserved name (user check names cannot contain `:`) carry
//! what members and relays foresee rather than what failed:
//! `anomaly:METRIC` (a node's metric far outside its own baseline),
//! `outlier:METRIC` (a node far above its same-labelled peers in the site)
//! and `forecast:WHAT` (a resource predicted to run out). They never open
//! a check failing incident. A node's raised anomalies and outliers are one
//! *node anomaly* incident; each raised forecast is one *resource forecast*
//! incident, critical while its check is. Their detail starts with
//! `score N: `; the score ranks them (see [`rank`]).
//!
//! The hub's own finding, a site far from the other sites of its region
//! ([`crate::outliers`]), comes through [`IncidentEngine::handle_regions`]:
//! one *site anomaly* incident per site, scored by its highest figure. A
//! region far from its own usual figures ([`crate::baselines`]) comes
//! through [`IncidentEngine::handle_region_baselines`]: one *region
//! anomaly* incident per region, with no site in its scope.
//!
//! Incidents are built again from what arrives after a hub starts; the
//! newest resolved ones are kept (bounded), for the record.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use trellis_node::patchstate::PatchState;
use trellis_node::site::Status;
use trellis_relay::report::SiteRow;
use trellis_relay::summary::{SiteKey, SiteStatus};
use trellis_relay::uplink::Event;

use crate::patchrollout::{RolloutRecord, RunState};

/// How the engine correlates; see `[incidents]` in the hub's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentSettings {
    /// Nodes of one site failing the same check that make one site-wide
    /// incident (at least 2).
    pub site_check_nodes: usize,
    /// A node changing more than this many times within `flap_window_ms`
    /// is flapping.
    pub flap_changes: usize,
    pub flap_window_ms: u64,
    /// A flapping node's incident resolves after this long without change.
    pub flap_quiet_ms: u64,
    /// Resolved incidents kept, newest first.
    pub keep_resolved: usize,
}

impl Default for IncidentSettings {
    fn default() -> Self {
        IncidentSettings {
            site_check_nodes: 2,
            flap_changes: 4,
            flap_window_ms: 5 * 60_000,
            flap_quiet_ms: 5 * 60_000,
            keep_resolved: 1000,
        }
    }
}

/// What an incident is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IncidentKind {
    /// The hub cannot reach the site's relay.
    SiteUnreachable,
    /// Several nodes of a site fail the same check.
    SiteCheckFailing,
    /// One node fails a check.
    NodeCheckFailing,
    /// One node is reported dead.
    NodeDown,
    /// One node keeps changing; its changes are damped into this.
    NodeFlapping,
    /// A patch failed on one node (or its rollback did).
    PatchFailed,
    /// One node's metrics are far from its own baseline or from its peers'
    /// (its raised `anomaly:*` and `outlier:*` checks).
    NodeAnomaly,
    /// A resource of one node is forecast to run out (a raised
    /// `forecast:*` check).
    ResourceForecast,
    /// A site's figures are far from the other sites of its region (see
    /// [`crate::outliers`]).
    SiteAnomaly,
    /// A region's figures are far from their own usual level (see
    /// [`crate::baselines`]).
    RegionAnomaly,
}

impl IncidentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IncidentKind::SiteUnreachable => "site-unreachable",
            IncidentKind::SiteCheckFailing => "site-check-failing",
            IncidentKind::NodeCheckFailing => "node-check-failing",
            IncidentKind::NodeDown => "node-down",
            IncidentKind::NodeFlapping => "node-flapping",
            IncidentKind::PatchFailed => "patch-failed",
            IncidentKind::NodeAnomaly => "node-anomaly",
            IncidentKind::ResourceForecast => "resource-forecast",
            IncidentKind::SiteAnomaly => "site-anomaly",
            IncidentKind::RegionAnomaly => "region-anomaly",
        }
    }
}

/// How urgent an incident is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Where an incident is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub region: String,
    pub site: String,
    /// Set for an incident about one node.
    pub node: Option<String>,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A region's own incident has no site.
        if self.site.is_empty() {
            return write!(f, "{}", self.region);
        }
        write!(f, "{}/{}", self.region, self.site)?;
        if let Some(n) = &self.node {
            write!(f, "/{n}")?;
        }
        Ok(())
    }
}

/// How unusual a foresight finding is, from the `score N: ` its check's
/// detail starts with: robust standard deviations (or times the peer
/// median) away for an anomaly or an outlier, higher the sooner for a
/// forecast. Held in tenths, so that it compares exactly; in JSON it is
/// the number itself (`27`, `4.5`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Score(u32);

impl Score {
    pub const ZERO: Score = Score(0);

    pub fn from_tenths(tenths: u32) -> Self {
        Score(tenths)
    }

    pub fn tenths(self) -> u32 {
        self.0
    }

    /// `n` (finite, not negative) rounded to a tenth.
    pub fn from_f64(n: f64) -> Option<Self> {
        // `as` saturates: a huge score is the largest one.
        (n.is_finite() && n >= 0.0).then(|| Score((n * 10.0).round() as u32))
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / 10.0
    }

    /// The score a finding's detail starts with (`score 27: ...`,
    /// `score 4.5: ...`); `None` if it does not.
    pub fn of_detail(detail: &str) -> Option<Self> {
        trellis_node::foresight::score_of(detail).and_then(Score::from_f64)
    }
}

impl std::fmt::Display for Score {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_multiple_of(10) {
            write!(f, "{}", self.0 / 10)
        } else {
            write!(f, "{}.{}", self.0 / 10, self.0 % 10)
        }
    }
}

impl Serialize for Score {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_multiple_of(10) {
            s.serialize_u32(self.0 / 10)
        } else {
            s.serialize_f64(self.as_f64())
        }
    }
}

impl<'de> Deserialize<'de> for Score {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = f64::deserialize(d)?;
        Score::from_f64(n)
            .ok_or_else(|| serde::de::Error::custom(format!("score {n} is not a number >= 0")))
    }
}

/// What a check with a reserved name (one with a `:`) foresees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foresight {
    /// `anomaly:METRIC`: a node's metric far outside its own baseline.
    Anomaly,
    /// `outlier:METRIC`: a node far above its same-labelled peers.
    Outlier,
    /// `forecast:WHAT`: a resource predicted to run out.
    Forecast,
}

impl Foresight {
    /// What the check named `check` is, if it is a foresight finding.
    /// Other names, reserved or not, are ordinary checks here.
    pub fn of_check(check: &str) -> Option<Self> {
        use trellis_node::foresight::{ANOMALY_PREFIX, FORECAST_PREFIX};
        if check.starts_with(ANOMALY_PREFIX) {
            Some(Foresight::Anomaly)
        } else if check.starts_with(trellis_relay::outliers::CHECK_PREFIX) {
            Some(Foresight::Outlier)
        } else if check.starts_with(FORECAST_PREFIX) {
            Some(Foresight::Forecast)
        } else {
            None
        }
    }
}

/// The rollout an incident is likely due to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCause {
    pub run: u64,
    /// The patch's id (hex), name and version.
    pub patch: String,
    pub name: String,
    pub version: String,
    /// The wave (from 0) baking when the incident opened, or the last
    /// started wave of a rollout rolling back.
    pub wave: usize,
    /// `bake` or `rolling-back`.
    pub phase: String,
}

/// One incident, open or resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incident {
    /// Increasing from 1 at each hub.
    pub id: u64,
    pub kind: IncidentKind,
    pub severity: Severity,
    pub scope: Scope,
    /// The check, for a check incident or a resource forecast.
    pub check: Option<String>,
    pub title: String,
    pub detail: String,
    /// Hub wall clock, ms since the Unix epoch.
    pub opened_ms: u64,
    pub updated_ms: u64,
    pub resolved_ms: Option<u64>,
    /// The nodes involved (those failing the check, the node itself, or
    /// for an unreachable site those reported meanwhile as dead, failing,
    /// unusual or running out).
    pub nodes: Vec<String>,
    pub cause: Option<RolloutCause>,
    /// How unusual it is, for `node-anomaly` (its highest finding's) and
    /// `resource-forecast` (its finding's), a finding whose detail gives no
    /// score counting 0; `None` (JSON `null`, or absent from an older hub's
    /// JSON) for the other kinds. See [`rank`].
    #[serde(default)]
    pub score: Option<Score>,
}

/// An incident that opened or resolved: what the driver notes and sends
/// to webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Opened(Incident),
    Resolved(Incident),
}

type NodeKey = (String, String, String);

/// The condition an open incident stands for: at most one incident per key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Site(SiteKey),
    SiteCheck(SiteKey, String),
    NodeCheck(NodeKey, String),
    NodeDown(NodeKey),
    Flapping(NodeKey),
    PatchFailed(NodeKey),
    Anomaly(NodeKey),
    Forecast(NodeKey, String),
    SiteAnomaly(SiteKey),
    /// A region (its site key's site is empty).
    RegionAnomaly(String),
}

impl Key {
    fn site(&self) -> SiteKey {
        match self {
            Key::Site(s) | Key::SiteCheck(s, _) | Key::SiteAnomaly(s) => s.clone(),
            Key::RegionAnomaly(r) => (r.clone(), String::new()),
            Key::NodeCheck(n, _)
            | Key::NodeDown(n)
            | Key::Flapping(n)
            | Key::PatchFailed(n)
            | Key::Anomaly(n)
            | Key::Forecast(n, _) => (n.0.clone(), n.1.clone()),
        }
    }

    fn node(&self) -> Option<&NodeKey> {
        match self {
            Key::Site(_) | Key::SiteCheck(..) | Key::SiteAnomaly(_) | Key::RegionAnomaly(_) => None,
            Key::NodeCheck(n, _)
            | Key::NodeDown(n)
            | Key::Flapping(n)
            | Key::PatchFailed(n)
            | Key::Anomaly(n)
            | Key::Forecast(n, _) => Some(n),
        }
    }
}

/// What an incident should say now.
struct Want {
    nodes: Vec<String>,
    detail: String,
    /// For a kind whose severity follows its condition; `None` keeps the
    /// one it opened with.
    severity: Option<Severity>,
    score: Option<Score>,
}

impl Want {
    fn new(nodes: Vec<String>, detail: String) -> Self {
        Want {
            nodes,
            detail,
            severity: None,
            score: None,
        }
    }
}

/// A raised foresight finding of a node.
struct Finding {
    status: Status,
    detail: String,
    score: Score,
}

/// What is known of an unreachable site when it became so.
struct Unreachable {
    relay: String,
    last_seen_s: u64,
    nodes_total: u32,
}

/// Correlates events and the fleet view into incidents.
pub struct IncidentEngine {
    settings: IncidentSettings,
    unreachable: BTreeMap<SiteKey, Unreachable>,
    dead: BTreeSet<NodeKey>,
    /// Nodes failing each check (critical), with the check's last detail.
    failing: BTreeMap<(SiteKey, String), BTreeMap<String, String>>,
    patch_failed: BTreeMap<NodeKey, String>,
    /// Raised foresight findings (warning or critical) per node, by check.
    findings: BTreeMap<NodeKey, BTreeMap<String, Finding>>,
    /// Sites raised as outliers of their region: detail and score.
    site_findings: BTreeMap<SiteKey, (String, Score)>,
    /// Regions raised as far from their usual figures: detail and score.
    region_findings: BTreeMap<String, (String, Score)>,
    /// Recent changes per node, for flap detection.
    changes: BTreeMap<NodeKey, VecDeque<u64>>,
    /// Flapping nodes and their last change.
    flapping: BTreeMap<NodeKey, u64>,
    rollout: Option<RolloutRecord>,
    keys: BTreeMap<Key, u64>,
    open: BTreeMap<u64, Incident>,
    resolved: VecDeque<Incident>,
    next_id: u64,
}

impl IncidentEngine {
    pub fn new(settings: IncidentSettings) -> Self {
        IncidentEngine {
            settings,
            unreachable: BTreeMap::new(),
            dead: BTreeSet::new(),
            failing: BTreeMap::new(),
            patch_failed: BTreeMap::new(),
            findings: BTreeMap::new(),
            site_findings: BTreeMap::new(),
            region_findings: BTreeMap::new(),
            changes: BTreeMap::new(),
            flapping: BTreeMap::new(),
            rollout: None,
            keys: BTreeMap::new(),
            open: BTreeMap::new(),
            resolved: VecDeque::new(),
            next_id: 1,
        }
    }

    /// An event of site `region/site` arrived at `now_ms`.
    pub fn handle_event(
        &mut self,
        now_ms: u64,
        region: &str,
        site: &str,
        e: &Event,
    ) -> Vec<Change> {
        let key = |node: &str| (region.to_owned(), site.to_owned(), node.to_owned());
        match e {
            Event::NodeDied { node } => {
                if self.dead.insert(key(node)) {
                    self.changed(now_ms, key(node));
                }
            }
            Event::NodeRecovered { node } | Event::NodeJoined { node } => {
                if self.dead.remove(&key(node)) {
                    self.changed(now_ms, key(node));
                }
            }
            // Gone from the fleet on purpose, or dead past retention: what
            // it was reported for is no longer anyone's problem.
            Event::NodeLeft { node } | Event::NodeReaped { node, .. } => {
                self.dead.remove(&key(node));
                self.patch_failed.remove(&key(node));
                self.findings.remove(&key(node));
                self.flapping.remove(&key(node));
                self.changes.remove(&key(node));
                let here = (region.to_owned(), site.to_owned());
                self.failing.retain(|(s, _), nodes| {
                    if *s == here {
                        nodes.remove(node);
                    }
                    !nodes.is_empty()
                });
            }
            Event::CheckChanged {
                node,
                check,
                from,
                to,
                detail,
            } if Foresight::of_check(check).is_some() => {
                let findings = self.findings.entry(key(node)).or_default();
                if matches!(to, Status::Warning | Status::Critical) {
                    let finding = Finding {
                        status: *to,
                        detail: detail.clone(),
                        score: Score::of_detail(detail).unwrap_or(Score::ZERO),
                    };
                    findings.insert(check.clone(), finding);
                } else {
                    findings.remove(check);
                }
                if findings.is_empty() {
                    self.findings.remove(&key(node));
                }
                if from != to {
                    self.changed(now_ms, key(node));
                }
            }
            Event::CheckChanged {
                node,
                check,
                from,
                to,
                detail,
            } => {
                let failing = self
                    .failing
                    .entry(((region.to_owned(), site.to_owned()), check.clone()))
                    .or_default();
                if *to == Status::Critical {
                    failing.insert(node.clone(), detail.clone());
                } else {
                    failing.remove(node);
                }
                if failing.is_empty() {
                    self.failing
                        .remove(&((region.to_owned(), site.to_owned()), check.clone()));
                }
                if from != to {
                    self.changed(now_ms, key(node));
                }
            }
            Event::PatchState { node, state } => match state.state {
                PatchState::Failed | PatchState::RollbackFailed => {
                    let what = if state.state == PatchState::RollbackFailed {
                        "rollback failed, the node needs a person"
                    } else {
                        "patch failed"
                    };
                    let detail = if state.detail.is_empty() {
                        format!("{what} (rollout {})", state.run)
                    } else {
                        format!("{what} (rollout {}): {}", state.run, state.detail)
                    };
                    self.patch_failed.insert(key(node), detail);
                }
                _ => {
                    self.patch_failed.remove(&key(node));
                }
            },
            _ => return Vec::new(),
        }
        self.reconcile(now_ms)
    }

    /// The hub's fleet view at `now_ms`: which sites are unreachable.
    pub fn handle_fleet(&mut self, now_ms: u64, sites: &[SiteRow]) -> Vec<Change> {
        let down: BTreeMap<SiteKey, &SiteRow> = sites
            .iter()
            .filter(|s| s.status == SiteStatus::Unreachable)
            .map(|s| ((s.region.clone(), s.site.clone()), s))
            .collect();
        self.unreachable.retain(|k, _| down.contains_key(k));
        for (k, row) in down {
            self.unreachable.entry(k).or_insert_with(|| Unreachable {
                relay: row.relay.clone(),
                last_seen_s: row.last_seen_s,
                nodes_total: row.nodes_total,
            });
        }
        self.reconcile(now_ms)
    }

    /// The sites raised now as outliers of their region (what
    /// [`crate::outliers::RegionOutliers::assess`] returned), at `now_ms`.
    pub fn handle_regions(&mut self, now_ms: u64, raised: &crate::outliers::Raised) -> Vec<Change> {
        self.site_findings = raised
            .iter()
            .filter_map(|(site, findings)| {
                let found = scored(findings.iter().map(|f| (f.score, f.detail.as_str())))?;
                Some((site.clone(), found))
            })
            .collect();
        self.reconcile(now_ms)
    }

    /// The regions raised now as far from their usual figures (what
    /// [`crate::baselines::RegionBaselines::observe`] returned), at
    /// `now_ms`.
    pub fn handle_region_baselines(
        &mut self,
        now_ms: u64,
        raised: &crate::baselines::RaisedRegions,
    ) -> Vec<Change> {
        self.region_findings = raised
            .iter()
            .filter_map(|(region, findings)| {
                let found = scored(findings.iter().map(|f| (f.score, f.detail.as_str())))?;
                Some((region.clone(), found))
            })
            .collect();
        self.reconcile(now_ms)
    }

    /// The newest rollout (its newest revision), to name as a cause.
    pub fn handle_rollout(&mut self, rollout: Option<RolloutRecord>) {
        self.rollout = rollout;
    }

    /// Lets time pass: flapping nodes quiet long enough resolve.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Change> {
        self.reconcile(now_ms)
    }

    /// Open incidents, newest first.
    pub fn open(&self) -> impl Iterator<Item = &Incident> {
        self.open.values().rev()
    }

    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// Open incidents, ranked (see [`rank`]): most severe and most unusual
    /// first.
    pub fn ranked(&self) -> Vec<Incident> {
        let mut open: Vec<Incident> = self.open.values().cloned().collect();
        rank(&mut open);
        open
    }

    /// Every incident kept (open and resolved), newest first.
    pub fn all(&self) -> Vec<Incident> {
        let mut all: Vec<Incident> = self
            .open
            .values()
            .chain(self.resolved.iter())
            .cloned()
            .collect();
        all.sort_by_key(|i| std::cmp::Reverse(i.id));
        all
    }

    /// Notes a change of a node for flap detection.
    fn changed(&mut self, now_ms: u64, node: NodeKey) {
        let window = self.settings.flap_window_ms;
        let times = self.changes.entry(node.clone()).or_default();
        times.push_back(now_ms);
        while times
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) > window)
        {
            times.pop_front();
        }
        if times.len() > self.settings.flap_changes || self.flapping.contains_key(&node) {
            self.flapping.insert(node, now_ms);
        }
    }

    /// The incidents the facts call for now.
    fn wanted(&mut self, now_ms: u64) -> BTreeMap<Key, Want> {
        let quiet = self.settings.flap_quiet_ms;
        self.flapping
            .retain(|_, last| now_ms.saturating_sub(*last) < quiet);
        let window = self.settings.flap_window_ms;
        self.changes.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now_ms.saturating_sub(*t) <= window)
        });

        let mut node_level: BTreeMap<Key, Want> = BTreeMap::new();
        for ((site, check), nodes) in &self.failing {
            let steady: Vec<(&String, &String)> = nodes
                .iter()
                .filter(|(n, _)| {
                    !self
                        .flapping
                        .contains_key(&(site.0.clone(), site.1.clone(), (*n).clone()))
                })
                .collect();
            let Some((_, detail)) = steady.first() else {
                continue;
            };
            let site_wide = Key::SiteCheck(site.clone(), check.clone());
            if self.keys.contains_key(&site_wide) || steady.len() >= self.settings.site_check_nodes
            {
                node_level.insert(
                    site_wide,
                    Want::new(
                        steady.iter().map(|(n, _)| (*n).clone()).collect(),
                        format!(
                            "{} node(s) report check {check} critical; last said: {detail}",
                            steady.len()
                        ),
                    ),
                );
            } else {
                for (n, detail) in steady {
                    node_level.insert(
                        Key::NodeCheck((site.0.clone(), site.1.clone(), n.clone()), check.clone()),
                        Want::new(vec![n.clone()], detail.clone()),
                    );
                }
            }
        }
        for n in self.dead.iter().filter(|n| !self.flapping.contains_key(*n)) {
            node_level.insert(
                Key::NodeDown(n.clone()),
                Want::new(
                    vec![n.2.clone()],
                    "the site's relay reports the node dead (no gossip heartbeat)".to_owned(),
                ),
            );
        }
        for (n, detail) in &self.patch_failed {
            node_level.insert(
                Key::PatchFailed(n.clone()),
                Want::new(vec![n.2.clone()], detail.clone()),
            );
        }
        for (n, findings) in self
            .findings
            .iter()
            .filter(|(n, _)| !self.flapping.contains_key(*n))
        {
            let mut unusual: Vec<(&String, &Finding)> = findings
                .iter()
                .filter(|(c, _)| Foresight::of_check(c) != Some(Foresight::Forecast))
                .collect();
            if !unusual.is_empty() {
                // Highest score first, then by name.
                unusual.sort_by_key(|(c, f)| (std::cmp::Reverse(f.score), *c));
                let detail = unusual
                    .iter()
                    .map(|(c, f)| format!("{c}: {}", f.detail))
                    .collect::<Vec<_>>()
                    .join("; ");
                node_level.insert(
                    Key::Anomaly(n.clone()),
                    Want {
                        nodes: vec![n.2.clone()],
                        detail,
                        severity: Some(Severity::Warning),
                        score: Some(unusual[0].1.score),
                    },
                );
            }
            for (c, f) in findings
                .iter()
                .filter(|(c, _)| Foresight::of_check(c) == Some(Foresight::Forecast))
            {
                node_level.insert(
                    Key::Forecast(n.clone(), c.clone()),
                    Want {
                        nodes: vec![n.2.clone()],
                        detail: f.detail.clone(),
                        severity: Some(if f.status == Status::Critical {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        }),
                        score: Some(f.score),
                    },
                );
            }
        }
        for (site, (detail, score)) in &self.site_findings {
            node_level.insert(
                Key::SiteAnomaly(site.clone()),
                Want {
                    nodes: Vec::new(),
                    detail: detail.clone(),
                    severity: Some(Severity::Warning),
                    score: Some(*score),
                },
            );
        }
        for (region, (detail, score)) in &self.region_findings {
            node_level.insert(
                Key::RegionAnomaly(region.clone()),
                Want {
                    nodes: Vec::new(),
                    detail: detail.clone(),
                    severity: Some(Severity::Warning),
                    score: Some(*score),
                },
            );
        }
        for (n, last) in &self.flapping {
            let changes = self.changes.get(n).map_or(0, VecDeque::len);
            node_level.insert(
                Key::Flapping(n.clone()),
                Want::new(
                    vec![n.2.clone()],
                    format!(
                        "{changes} changes of its checks or liveness in the last {}; \
                         resolves after {} without change (last change at {last} ms)",
                        human_ms(self.settings.flap_window_ms),
                        human_ms(quiet)
                    ),
                ),
            );
        }

        let mut wanted: BTreeMap<Key, Want> = BTreeMap::new();
        let mut folded: BTreeMap<SiteKey, BTreeSet<String>> = BTreeMap::new();
        for (key, want) in node_level {
            let site = key.site();
            // At an unreachable site, nothing new opens: it is folded into
            // the site's incident. What is open stays while it holds.
            if self.unreachable.contains_key(&site) && !self.keys.contains_key(&key) {
                folded.entry(site).or_default().extend(want.nodes);
                continue;
            }
            wanted.insert(key, want);
        }
        for (site, u) in &self.unreachable {
            let nodes: Vec<String> = folded
                .remove(site)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default();
            let mut detail = format!(
                "the hub has not heard from relay {} for {}s or its uplink is down; \
                 {} node(s) were known there; what it reported last is shown",
                u.relay, u.last_seen_s, u.nodes_total
            );
            if !nodes.is_empty() {
                detail.push_str(&format!(
                    "; reported meanwhile as dead, failing, unusual or running out: {}",
                    nodes.join(", ")
                ));
            }
            wanted.insert(Key::Site(site.clone()), Want::new(nodes, detail));
        }
        wanted
    }

    /// Brings the incidents in line with the facts: opens, updates and
    /// resolves; returns what opened and resolved.
    fn reconcile(&mut self, now_ms: u64) -> Vec<Change> {
        let wanted = self.wanted(now_ms);
        // A check failing on more nodes takes over the oldest open node
        // incident of that check at that site.
        for key in wanted.keys() {
            let Key::SiteCheck(site, check) = key else {
                continue;
            };
            if self.keys.contains_key(key) {
                continue;
            }
            let first = self
                .keys
                .iter()
                .filter(|(k, _)| {
                    matches!(k, Key::NodeCheck(n, c) if c == check && n.0 == site.0 && n.1 == site.1)
                })
                .min_by_key(|(_, id)| **id)
                .map(|(k, id)| (k.clone(), *id));
            if let Some((old, id)) = first {
                self.keys.remove(&old);
                self.keys.insert(key.clone(), id);
                let i = self
                    .open
                    .get_mut(&id)
                    .expect("keys point at open incidents");
                i.kind = IncidentKind::SiteCheckFailing;
                i.severity = Severity::Critical;
                i.scope.node = None;
                i.title = format!("check {check} critical on several nodes of {}", i.scope);
                i.updated_ms = now_ms;
            }
        }

        let mut changes = Vec::new();
        for (key, want) in &wanted {
            if let Some(id) = self.keys.get(key) {
                let i = self.open.get_mut(id).expect("keys point at open incidents");
                let severity = want.severity.unwrap_or(i.severity);
                if i.nodes != want.nodes
                    || i.detail != want.detail
                    || i.severity != severity
                    || i.score != want.score
                {
                    i.nodes = want.nodes.clone();
                    i.detail = want.detail.clone();
                    i.severity = severity;
                    i.score = want.score;
                    i.updated_ms = now_ms;
                }
                continue;
            }
            let incident = self.new_incident(now_ms, key, want);
            self.keys.insert(key.clone(), incident.id);
            self.open.insert(incident.id, incident.clone());
            changes.push(Change::Opened(incident));
        }
        let gone: Vec<(Key, u64)> = self
            .keys
            .iter()
            .filter(|(k, _)| !wanted.contains_key(k))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        for (key, id) in gone {
            self.keys.remove(&key);
            let mut i = self.open.remove(&id).expect("keys point at open incidents");
            i.resolved_ms = Some(now_ms);
            i.updated_ms = now_ms;
            if let Some(into) = self.folded_into(&key) {
                i.detail.push_str(&format!("; folded into incident {into}"));
            }
            self.resolved.push_front(i.clone());
            self.resolved.truncate(self.settings.keep_resolved);
            changes.push(Change::Resolved(i));
        }
        changes
    }

    /// The open incident that took over what `key` stood for, if any.
    fn folded_into(&self, key: &Key) -> Option<u64> {
        let node = key.node()?;
        if matches!(key, Key::Flapping(_)) {
            return None;
        }
        if let Some(id) = self.keys.get(&Key::Flapping(node.clone())) {
            return Some(*id);
        }
        if let Key::NodeCheck(n, check) = key {
            let site = (n.0.clone(), n.1.clone());
            if let Some(id) = self.keys.get(&Key::SiteCheck(site, check.clone())) {
                return Some(*id);
            }
        }
        None
    }

    fn new_incident(&mut self, now_ms: u64, key: &Key, want: &Want) -> Incident {
        let site = key.site();
        let node = key.node().map(|n| n.2.clone());
        let scope = Scope {
            region: site.0.clone(),
            site: site.1.clone(),
            node,
        };
        let (kind, severity, check, title) = match key {
            Key::Site(_) => (
                IncidentKind::SiteUnreachable,
                Severity::Critical,
                None,
                format!("site {scope} unreachable"),
            ),
            Key::SiteCheck(_, c) => (
                IncidentKind::SiteCheckFailing,
                Severity::Critical,
                Some(c.clone()),
                format!(
                    "check {c} critical on {} nodes of {scope}",
                    want.nodes.len()
                ),
            ),
            Key::NodeCheck(_, c) => (
                IncidentKind::NodeCheckFailing,
                Severity::Warning,
                Some(c.clone()),
                format!("check {c} critical on {scope}"),
            ),
            Key::NodeDown(_) => (
                IncidentKind::NodeDown,
                Severity::Warning,
                None,
                format!("node {scope} down"),
            ),
            Key::Flapping(_) => (
                IncidentKind::NodeFlapping,
                Severity::Warning,
                None,
                format!("node {scope} flapping"),
            ),
            Key::PatchFailed(n) => (
                IncidentKind::PatchFailed,
                if self
                    .patch_failed
                    .get(n)
                    .is_some_and(|d| d.starts_with("rollback"))
                {
                    Severity::Critical
                } else {
                    Severity::Warning
                },
                None,
                format!("patch failed on {scope}"),
            ),
            Key::Anomaly(_) => (
                IncidentKind::NodeAnomaly,
                Severity::Warning,
                None,
                format!("node {scope} unusual"),
            ),
            Key::Forecast(_, c) => (
                IncidentKind::ResourceForecast,
                Severity::Warning,
                Some(c.clone()),
                match c.strip_prefix("forecast:").unwrap_or(c) {
                    "cert" => format!("certificate of {scope} expiring"),
                    "mem" => format!("memory of {scope} forecast to run out"),
                    what => format!(
                        "{} of {scope} forecast to fill up",
                        what.replacen(':', " ", 1)
                    ),
                },
            ),
            Key::SiteAnomaly(_) => (
                IncidentKind::SiteAnomaly,
                Severity::Warning,
                None,
                format!("site {scope} unusual in its region"),
            ),
            Key::RegionAnomaly(_) => (
                IncidentKind::RegionAnomaly,
                Severity::Warning,
                None,
                format!("region {scope} far from its usual figures"),
            ),
        };
        let severity = want.severity.unwrap_or(severity);
        let id = self.next_id;
        self.next_id += 1;
        Incident {
            id,
            kind,
            severity,
            scope,
            check,
            title,
            detail: want.detail.clone(),
            opened_ms: now_ms,
            updated_ms: now_ms,
            resolved_ms: None,
            nodes: want.nodes.clone(),
            cause: self
                .rollout
                .as_ref()
                .and_then(|r| rollout_cause(r, &site, now_ms)),
            score: want.score,
        }
    }
}

/// Findings (score, detail), highest first, as one incident's detail
/// (`score N: DETAIL`, separated by `; `) and score (the first's); `None`
/// without any.
fn scored<'a>(mut findings: impl Iterator<Item = (f64, &'a str)>) -> Option<(String, Score)> {
    let (top, detail) = findings.next()?;
    let mut text = format!("score {top:.1}: {detail}");
    for (score, detail) in findings {
        text.push_str(&format!("; score {score:.1}: {detail}"));
    }
    Some((text, Score::from_f64(top).unwrap_or(Score::ZERO)))
}

/// Orders incidents for a person to read: open ones first, by severity
/// (critical first), then score (highest first; none counts as 0), then
/// newest first (opened, then id); resolved ones after them, newest first
/// (by id).
pub fn rank(incidents: &mut [Incident]) {
    incidents.sort_by(rank_order);
}

/// The order of [`rank`].
pub fn rank_order(a: &Incident, b: &Incident) -> std::cmp::Ordering {
    use std::cmp::Reverse;
    let key = |i: &Incident| {
        let open = i.resolved_ms.is_none();
        (
            Reverse(open),
            Reverse(open.then_some(i.severity)),
            Reverse(open.then(|| i.score.unwrap_or(Score::ZERO))),
            Reverse(open.then_some(i.opened_ms)),
            Reverse(i.id),
        )
    };
    key(a).cmp(&key(b))
}

/// The rollout as the likely cause of something starting at `site` at
/// `now_ms`: it touches the site and one of its waves is baking, or it is
/// rolling back. A wave bakes from its start for the bake time, and on
/// until its gate passes: nodes install before their bake starts, so a
/// wave not yet passed is still on trial however long it has run.
pub fn rollout_cause(r: &RolloutRecord, site: &SiteKey, now_ms: u64) -> Option<RolloutCause> {
    if !r.sites().contains(site) {
        return None;
    }
    let cause = |wave: usize, phase: &str| RolloutCause {
        run: r.run,
        patch: r.patch.clone(),
        name: r.name.clone(),
        version: r.version.clone(),
        wave,
        phase: phase.to_owned(),
    };
    if r.state == RunState::RollingBack {
        return Some(cause(r.started.saturating_sub(1), "rolling-back"));
    }
    let on_trial = matches!(
        r.state,
        RunState::Running | RunState::Paused | RunState::Halted
    );
    r.wave_started_ms
        .iter()
        .enumerate()
        .rev()
        .find(|(wave, start)| {
            let baked = start.saturating_add(r.bake_ms);
            let until = match r.wave_passed_ms.get(*wave) {
                Some(passed) => baked.max(*passed),
                None if on_trial => u64::MAX,
                None => baked,
            };
            now_ms >= **start && now_ms <= until
        })
        .map(|(wave, _)| cause(wave, "bake"))
}

fn human_ms(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use trellis_node::waves::{NodeRef, Wave, WaveSpec};
    use trellis_relay::summary::{ConfigTally, StatusCounts};

    use super::*;

    fn engine() -> IncidentEngine {
        IncidentEngine::new(IncidentSettings::default())
    }

    fn check(node: &str, to: Status) -> Event {
        Event::CheckChanged {
            node: node.to_owned(),
            check: "web".to_owned(),
            from: if to == Status::Critical {
                Status::Passing
            } else {
                Status::Critical
            },
            to,
            detail: "exit 2".to_owned(),
        }
    }

    fn row(site: &str, status: SiteStatus) -> SiteRow {
        SiteRow {
            site: site.to_owned(),
            region: "eu".to_owned(),
            relay: format!("{site}-relay"),
            nodes_total: 3,
            nodes_alive: 3,
            nodes_dead: 0,
            status,
            last_seen_s: 40,
            connected: false,
            hub: None,
            by_status: StatusCounts::default(),
            dead: Vec::new(),
            failing_checks: BTreeMap::new(),
            config: ConfigTally::default(),
        }
    }

    fn kinds(e: &IncidentEngine) -> Vec<(IncidentKind, String)> {
        e.open().map(|i| (i.kind, i.scope.to_string())).collect()
    }

    #[test]
    fn a_whole_site_down_is_one_incident_and_node_deaths_meanwhile_are_folded_in() {
        let mut e = engine();
        let opened = e.handle_fleet(
            1_000,
            &[
                row("par", SiteStatus::Unreachable),
                row("ber", SiteStatus::Healthy),
            ],
        );
        assert_eq!(opened.len(), 1);
        let Change::Opened(site) = &opened[0] else {
            panic!("{opened:?}")
        };
        assert_eq!(site.kind, IncidentKind::SiteUnreachable);
        assert_eq!(site.severity, Severity::Critical);
        assert_eq!(site.title, "site eu/par unreachable");
        for n in ["par-n0", "par-n1", "par-n2"] {
            let c = e.handle_event(2_000, "eu", "par", &Event::NodeDied { node: n.to_owned() });
            assert!(c.is_empty(), "{c:?}");
        }
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::SiteUnreachable, "eu/par".to_owned())]
        );
        let open: Vec<&Incident> = e.open().collect();
        assert_eq!(open[0].nodes, vec!["par-n0", "par-n1", "par-n2"]);
        assert_eq!(open[0].updated_ms, 2_000);
        // The same look again changes nothing.
        assert!(
            e.handle_fleet(3_000, &[row("par", SiteStatus::Unreachable)])
                .is_empty()
        );
        assert_eq!(e.open_count(), 1);
    }

    #[test]
    fn a_site_reachable_again_resolves_its_incident_and_what_still_holds_opens() {
        let mut e = engine();
        e.handle_fleet(1_000, &[row("par", SiteStatus::Unreachable)]);
        e.handle_event(
            2_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n0".into(),
            },
        );
        let changes = e.handle_fleet(5_000, &[row("par", SiteStatus::Degraded)]);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(
            matches!(&changes[0], Change::Opened(i) if i.kind == IncidentKind::NodeDown && i.id == 2)
        );
        assert!(
            matches!(&changes[1], Change::Resolved(i) if i.id == 1 && i.resolved_ms == Some(5_000))
        );
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeDown, "eu/par/par-n0".to_owned())]
        );
        e.handle_event(
            6_000,
            "eu",
            "par",
            &Event::NodeRecovered {
                node: "par-n0".into(),
            },
        );
        assert_eq!(e.open_count(), 0);
        let all = e.all();
        assert_eq!(all.iter().map(|i| i.id).collect::<Vec<_>>(), vec![2, 1]);
        assert!(all.iter().all(|i| i.resolved_ms.is_some()));
    }

    #[test]
    fn a_node_that_left_or_was_reaped_takes_its_incidents_with_it() {
        let mut e = engine();
        let died = Event::NodeDied {
            node: "par-n0".into(),
        };
        let c = e.handle_event(1_000, "eu", "par", &died);
        assert!(matches!(&c[..], [Change::Opened(i)] if i.kind == IncidentKind::NodeDown));
        e.handle_event(1_000, "eu", "par", &check("par-n1", Status::Critical));
        assert_eq!(e.open_count(), 2);
        let left = Event::NodeLeft {
            node: "par-n0".into(),
        };
        let c = e.handle_event(2_000, "eu", "par", &left);
        assert!(matches!(&c[..], [Change::Resolved(i)] if i.kind == IncidentKind::NodeDown));
        let reaped = Event::NodeReaped {
            node: "par-n1".into(),
            dead_for_s: 600,
        };
        e.handle_event(3_000, "eu", "par", &reaped);
        assert_eq!(e.open_count(), 0);
    }

    #[test]
    fn many_nodes_failing_the_same_check_in_a_site_are_one_incident() {
        let mut e = engine();
        let c = e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        assert!(matches!(&c[..], [Change::Opened(i)] if i.kind == IncidentKind::NodeCheckFailing));
        // The second node turns the node incident into the site's.
        let c = e.handle_event(2_000, "eu", "par", &check("par-n1", Status::Critical));
        assert!(c.is_empty(), "{c:?}");
        e.handle_event(3_000, "eu", "par", &check("par-n2", Status::Critical));
        let open: Vec<&Incident> = e.open().collect();
        assert_eq!(open.len(), 1, "{open:?}");
        let i = open[0];
        assert_eq!((i.id, i.kind), (1, IncidentKind::SiteCheckFailing));
        assert_eq!(i.check.as_deref(), Some("web"));
        assert_eq!(i.scope.node, None);
        assert_eq!(i.nodes, vec!["par-n0", "par-n1", "par-n2"]);
        assert_eq!((i.opened_ms, i.updated_ms), (1_000, 3_000));
        // Nodes leave it as they pass again; it resolves with the last.
        e.handle_event(4_000, "eu", "par", &check("par-n0", Status::Passing));
        e.handle_event(4_100, "eu", "par", &check("par-n1", Status::Passing));
        assert_eq!(e.open().next().unwrap().nodes, vec!["par-n2"]);
        let c = e.handle_event(5_000, "eu", "par", &check("par-n2", Status::Passing));
        assert!(matches!(&c[..], [Change::Resolved(i)] if i.id == 1));
        // Another site's node failing the same check is its own incident.
        e.handle_event(6_000, "eu", "ber", &check("ber-n0", Status::Critical));
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeCheckFailing, "eu/ber/ber-n0".to_owned())]
        );
    }

    #[test]
    fn a_single_node_failing_a_check_or_dying_is_a_node_incident() {
        let mut e = engine();
        e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        e.handle_event(
            1_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n1".into(),
            },
        );
        let mut k = kinds(&e);
        k.sort();
        assert_eq!(
            k,
            vec![
                (IncidentKind::NodeCheckFailing, "eu/par/par-n0".to_owned()),
                (IncidentKind::NodeDown, "eu/par/par-n1".to_owned()),
            ]
        );
        // A warning is not a failure.
        e.handle_event(2_000, "eu", "par", &check("par-n0", Status::Warning));
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeDown, "eu/par/par-n1".to_owned())]
        );
    }

    #[test]
    fn flapping_is_damped_into_one_incident_that_resolves_after_a_quiet_period() {
        let mut e = engine();
        let mut opened = 0;
        let mut t = 0;
        for _ in 0..10 {
            for ev in [
                Event::NodeDied {
                    node: "par-n0".into(),
                },
                Event::NodeRecovered {
                    node: "par-n0".into(),
                },
            ] {
                t += 10_000;
                opened += e
                    .handle_event(t, "eu", "par", &ev)
                    .iter()
                    .filter(|c| matches!(c, Change::Opened(_)))
                    .count();
            }
        }
        // Two node-down incidents before the fifth change, then one
        // flapping incident for the other eighteen changes.
        assert_eq!(opened, 3);
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeFlapping, "eu/par/par-n0".to_owned())]
        );
        // Dead again while flapping: still the one incident.
        t += 10_000;
        assert!(
            e.handle_event(
                t,
                "eu",
                "par",
                &Event::NodeDied {
                    node: "par-n0".into()
                }
            )
            .is_empty()
        );
        assert!(e.tick(t + 299_999).is_empty());
        // Quiet for five minutes: it resolves, and the node, dead, is a
        // node incident again.
        let c = e.tick(t + 300_000);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(matches!(&c[0], Change::Opened(i) if i.kind == IncidentKind::NodeDown));
        assert!(matches!(&c[1], Change::Resolved(i) if i.kind == IncidentKind::NodeFlapping));
    }

    #[test]
    fn a_node_incident_open_when_flapping_starts_is_folded_into_the_flapping_one() {
        let mut e = IncidentEngine::new(IncidentSettings {
            flap_changes: 2,
            ..IncidentSettings::default()
        });
        e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        e.handle_event(2_000, "eu", "par", &check("par-n0", Status::Passing));
        let c = e.handle_event(3_000, "eu", "par", &check("par-n0", Status::Critical));
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeFlapping, "eu/par/par-n0".to_owned())]
        );
        assert!(
            matches!(&c[..], [Change::Opened(i)] if i.kind == IncidentKind::NodeFlapping),
            "{c:?}"
        );
    }

    fn rollout(state: RunState) -> RolloutRecord {
        let node = |n: &str, site: &str| NodeRef {
            name: n.to_owned(),
            region: "eu".to_owned(),
            site: site.to_owned(),
        };
        let mut r = RolloutRecord::start(
            1,
            ("ab12", "web-fix", "2.0"),
            "canary,100%",
            vec![
                Wave {
                    index: 0,
                    spec: WaveSpec::Canary,
                    nodes: vec![node("par-n0", "par")],
                },
                Wave {
                    index: 1,
                    spec: WaveSpec::Percent(100),
                    nodes: vec![node("par-n1", "par")],
                },
            ],
            60_000,
            0.05,
            true,
            "alice",
            "hub-1",
            100_000,
        );
        r.state = state;
        r
    }

    #[test]
    fn an_incident_during_a_waves_bake_names_the_rollout() {
        let mut e = engine();
        e.handle_rollout(Some(rollout(RunState::Running)));
        e.handle_event(130_000, "eu", "par", &check("par-n0", Status::Critical));
        let i = e.open().next().unwrap().clone();
        assert_eq!(
            i.cause,
            Some(RolloutCause {
                run: 1,
                patch: "ab12".into(),
                name: "web-fix".into(),
                version: "2.0".into(),
                wave: 0,
                phase: "bake".into(),
            })
        );
        // A wave not passed yet is on trial past its bake time.
        e.handle_event(
            170_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n4".into(),
            },
        );
        assert_eq!(
            e.open().next().unwrap().cause.as_ref().map(|c| c.wave),
            Some(0)
        );
        // Past a passed wave's bake time, or at a site the rollout does not
        // touch, nothing is blamed on it.
        let mut passed = rollout(RunState::Done);
        passed.started = 2;
        passed.wave_started_ms = vec![100_000, 165_000];
        passed.wave_passed_ms = vec![165_000, 230_000];
        e.handle_rollout(Some(passed.clone()));
        e.handle_event(
            231_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n2".into(),
            },
        );
        e.handle_event(
            130_000,
            "eu",
            "ber",
            &Event::NodeDied {
                node: "ber-n0".into(),
            },
        );
        assert_eq!(
            rollout_cause(&passed, &("eu".into(), "par".into()), 200_000).map(|c| c.wave),
            Some(1)
        );
        assert!(
            e.open()
                .filter(|i| !matches!(i.id, 1 | 2))
                .all(|i| i.cause.is_none())
        );
        // Rolling back, whenever it is.
        e.handle_rollout(Some(rollout(RunState::RollingBack)));
        e.handle_event(900_000, "eu", "par", &check("par-n1", Status::Critical));
        let newest = e
            .all()
            .into_iter()
            .find(|i| i.scope.node.is_none())
            .unwrap();
        assert_eq!(newest.kind, IncidentKind::SiteCheckFailing);
        // The site's incident took over the first, which kept its cause.
        assert_eq!(
            newest.cause.map(|c| (c.wave, c.phase)),
            Some((0, "bake".to_owned()))
        );
        e.handle_event(
            900_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n3".into(),
            },
        );
        let last = e.open().next().unwrap();
        assert_eq!(
            last.cause.as_ref().map(|c| c.phase.as_str()),
            Some("rolling-back")
        );
    }

    #[test]
    fn a_failed_patch_is_a_node_incident_until_the_node_rolls_back() {
        use trellis_node::patchstate::NodePatch;
        let mut e = engine();
        let state = |s: PatchState| Event::PatchState {
            node: "par-n0".into(),
            state: NodePatch {
                run: 1,
                patch: [0; 32],
                state: s,
                failed: true,
                detail: "install.sh exited 1".into(),
            },
        };
        e.handle_event(1_000, "eu", "par", &state(PatchState::Failed));
        let i = e.open().next().unwrap();
        assert_eq!(i.kind, IncidentKind::PatchFailed);
        assert_eq!(i.detail, "patch failed (rollout 1): install.sh exited 1");
        e.handle_event(2_000, "eu", "par", &state(PatchState::RollingBack));
        assert_eq!(e.open_count(), 0);
        e.handle_event(3_000, "eu", "par", &state(PatchState::RollbackFailed));
        assert_eq!(e.open().next().unwrap().severity, Severity::Critical);
    }

    fn finding(node: &str, check: &str, to: Status, detail: &str) -> Event {
        Event::CheckChanged {
            node: node.to_owned(),
            check: check.to_owned(),
            from: if to == Status::Passing {
                Status::Warning
            } else {
                Status::Passing
            },
            to,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn a_score_is_read_from_the_start_of_a_findings_detail() {
        let s = |d: &str| Score::of_detail(d).map(Score::tenths);
        assert_eq!(s("score 27: cpu 93% against a usual 12% (±3)"), Some(270));
        assert_eq!(s("score 4.5: disk /var full in ~6 h"), Some(45));
        assert_eq!(s("score 0.04: barely"), Some(0));
        assert_eq!(s("score 1.25: rounds"), Some(13));
        for none in [
            "cpu high",
            "score -1: no",
            "score : no",
            "score .: no",
            "score 1e3: no",
        ] {
            assert_eq!(s(none), None, "{none}");
        }
        assert_eq!(Score::from_tenths(270).to_string(), "27");
        assert_eq!(Score::from_tenths(45).to_string(), "4.5");
        assert_eq!(
            serde_json::to_string(&Score::from_tenths(270)).unwrap(),
            "27"
        );
        assert_eq!(
            serde_json::to_string(&Score::from_tenths(45)).unwrap(),
            "4.5"
        );
        assert_eq!(serde_json::from_str::<Score>("4.5").unwrap().tenths(), 45);
        assert!(serde_json::from_str::<Score>("-1").is_err());
        assert_eq!(Foresight::of_check("anomaly:cpu"), Some(Foresight::Anomaly));
        assert_eq!(Foresight::of_check("outlier:cpu"), Some(Foresight::Outlier));
        assert_eq!(
            Foresight::of_check("forecast:disk:/var"),
            Some(Foresight::Forecast)
        );
        assert_eq!(Foresight::of_check("web"), None);
    }

    fn raised(site: &str, score: f64) -> crate::outliers::Raised {
        use crate::outliers::{SiteFinding, SiteMetric};
        [(
            ("eu".to_owned(), site.to_owned()),
            vec![
                SiteFinding {
                    metric: SiteMetric::Cpu,
                    score,
                    detail: "cpu 85% (...)".to_owned(),
                },
                SiteFinding {
                    metric: SiteMetric::Unhealthy,
                    score: 7.0,
                    detail: "unhealthy 40% (...)".to_owned(),
                },
            ],
        )]
        .into()
    }

    #[test]
    fn a_site_unusual_in_its_region_is_one_incident_until_it_is_no_longer() {
        let mut e = engine();
        let c = e.handle_regions(1_000, &raised("par", 12.04));
        let [Change::Opened(i)] = c.as_slice() else {
            panic!("{c:?}")
        };
        assert_eq!(i.kind, IncidentKind::SiteAnomaly);
        assert_eq!(i.severity, Severity::Warning);
        assert_eq!(i.title, "site eu/par unusual in its region");
        assert_eq!(i.scope.node, None);
        assert_eq!(i.score, Some(Score::from_tenths(120)));
        assert_eq!(
            i.detail,
            "score 12.0: cpu 85% (...); score 7.0: unhealthy 40% (...)"
        );
        // Looked at again, scored higher: the same incident, updated.
        assert!(e.handle_regions(11_000, &raised("par", 30.0)).is_empty());
        let i = e.open().next().unwrap();
        assert_eq!((i.id, i.score), (1, Some(Score::from_tenths(300))));
        assert_eq!(i.updated_ms, 11_000);
        // Node incidents of the site are their own.
        e.handle_event(12_000, "eu", "par", &check("par-n0", Status::Critical));
        assert_eq!(e.open_count(), 2);
        let c = e.handle_regions(21_000, &crate::outliers::Raised::new());
        let [Change::Resolved(i)] = c.as_slice() else {
            panic!("{c:?}")
        };
        assert_eq!((i.id, i.kind), (1, IncidentKind::SiteAnomaly));
        assert_eq!(e.open_count(), 1);
    }

    #[test]
    fn a_region_far_from_its_usual_figures_is_one_region_incident() {
        use crate::baselines::RegionFinding;
        use crate::outliers::SiteMetric;
        let raised: crate::baselines::RaisedRegions = [(
            "eu".to_owned(),
            vec![RegionFinding {
                metric: SiteMetric::Unhealthy,
                score: 12.5,
                detail: "unhealthy 26% over 160 nodes of 8 sites against a usual 3% (±2.0)"
                    .to_owned(),
            }],
        )]
        .into();
        let mut e = engine();
        let c = e.handle_region_baselines(1_000, &raised);
        let [Change::Opened(i)] = c.as_slice() else {
            panic!("{c:?}")
        };
        assert_eq!(i.kind, IncidentKind::RegionAnomaly);
        assert_eq!(i.kind.as_str(), "region-anomaly");
        assert_eq!(i.title, "region eu far from its usual figures");
        assert_eq!(
            (i.scope.site.as_str(), i.scope.to_string()),
            ("", "eu".into())
        );
        assert_eq!(i.score, Some(Score::from_tenths(125)));
        assert!(
            i.detail.starts_with("score 12.5: unhealthy 26%"),
            "{}",
            i.detail
        );
        // A site of it unreachable changes nothing for the region's.
        e.handle_fleet(2_000, &[row("par", SiteStatus::Unreachable)]);
        assert_eq!(e.open_count(), 2);
        let c = e.handle_region_baselines(3_000, &Default::default());
        assert!(
            matches!(c.as_slice(), [Change::Resolved(i)] if i.kind == IncidentKind::RegionAnomaly),
            "{c:?}"
        );
    }

    #[test]
    fn an_incident_without_a_score_reads_as_before() {
        let mut e = engine();
        e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        let i = e.open().next().unwrap().clone();
        assert_eq!(i.score, None);
        let mut json = serde_json::to_value(&i).unwrap();
        assert_eq!(json["score"], serde_json::Value::Null);
        json.as_object_mut().unwrap().remove("score");
        assert_eq!(serde_json::from_value::<Incident>(json).unwrap(), i);
    }

    #[test]
    fn anomalies_of_a_node_are_one_incident_scored_by_the_highest() {
        let mut e = engine();
        let c = e.handle_event(
            1_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "anomaly:cpu",
                Status::Warning,
                "score 7: cpu 40% against a usual 12% (±3)",
            ),
        );
        let [Change::Opened(i)] = &c[..] else {
            panic!("{c:?}")
        };
        assert_eq!(i.kind, IncidentKind::NodeAnomaly);
        assert_eq!(i.kind.as_str(), "node-anomaly");
        assert_eq!(i.severity, Severity::Warning);
        assert_eq!(i.scope.to_string(), "eu/par/par-n0");
        assert_eq!(i.score, Some(Score::from_tenths(70)));
        assert_eq!(i.title, "node eu/par/par-n0 unusual");
        let id = i.id;
        // An outlier of the same node folds into it, and scores higher.
        let c = e.handle_event(
            2_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "outlier:cpu",
                Status::Warning,
                "score 12.5: cpu 40% against a peer median of 3%",
            ),
        );
        assert!(c.is_empty(), "{c:?}");
        let open: Vec<&Incident> = e.open().collect();
        assert_eq!(open.len(), 1, "{open:?}");
        let i = open[0];
        assert_eq!((i.id, i.updated_ms), (id, 2_000));
        assert_eq!(i.score, Some(Score::from_tenths(125)));
        assert_eq!(
            i.detail,
            "outlier:cpu: score 12.5: cpu 40% against a peer median of 3%; \
             anomaly:cpu: score 7: cpu 40% against a usual 12% (±3)"
        );
        // A score that changes updates it in place.
        let c = e.handle_event(
            3_000,
            "eu",
            "par",
            &Event::CheckChanged {
                node: "par-n0".into(),
                check: "anomaly:cpu".into(),
                from: Status::Warning,
                to: Status::Warning,
                detail: "score 27: cpu 93% against a usual 12% (±3)".into(),
            },
        );
        assert!(c.is_empty(), "{c:?}");
        let i = e.open().next().unwrap();
        assert_eq!(
            (i.id, i.updated_ms, i.score),
            (id, 3_000, Some(Score::from_tenths(270)))
        );
        assert!(
            i.detail.starts_with("anomaly:cpu: score 27: "),
            "{}",
            i.detail
        );
        // It stays while one finding is raised and resolves with the last.
        let c = e.handle_event(
            4_000,
            "eu",
            "par",
            &finding("par-n0", "anomaly:cpu", Status::Passing, "score 0: usual"),
        );
        assert!(c.is_empty(), "{c:?}");
        assert_eq!(
            e.open().next().unwrap().score,
            Some(Score::from_tenths(125))
        );
        let c = e.handle_event(
            5_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "outlier:cpu",
                Status::Passing,
                "in line with peers",
            ),
        );
        assert!(
            matches!(&c[..], [Change::Resolved(i)] if i.id == id && i.resolved_ms == Some(5_000)),
            "{c:?}"
        );
        assert_eq!(e.open_count(), 0);
    }

    #[test]
    fn a_finding_without_a_score_counts_as_zero() {
        let mut e = engine();
        e.handle_event(
            1_000,
            "eu",
            "par",
            &finding("par-n0", "anomaly:load", Status::Warning, "load 40"),
        );
        let i = e.open().next().unwrap();
        assert_eq!(i.score, Some(Score::ZERO));
        assert_eq!(i.detail, "anomaly:load: load 40");
    }

    #[test]
    fn a_critical_forecast_is_a_resource_forecast_not_a_failing_check() {
        let mut e = engine();
        let c = e.handle_event(
            1_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "forecast:disk:/var",
                Status::Critical,
                "score 20: disk /var full in ~1 h (±10 min) at 2.1 GB/h",
            ),
        );
        let [Change::Opened(i)] = &c[..] else {
            panic!("{c:?}")
        };
        assert_eq!(i.kind, IncidentKind::ResourceForecast);
        assert_eq!(i.kind.as_str(), "resource-forecast");
        assert_eq!(i.severity, Severity::Critical);
        assert_eq!(i.check.as_deref(), Some("forecast:disk:/var"));
        assert_eq!(i.score, Some(Score::from_tenths(200)));
        assert_eq!(i.title, "disk /var of eu/par/par-n0 forecast to fill up");
        // A second node with the same forecast is its own incident, never
        // a site's check failing.
        e.handle_event(
            1_000,
            "eu",
            "par",
            &finding(
                "par-n1",
                "forecast:disk:/var",
                Status::Critical,
                "score 19: soon",
            ),
        );
        let mut k = kinds(&e);
        k.sort();
        assert_eq!(
            k,
            vec![
                (IncidentKind::ResourceForecast, "eu/par/par-n0".to_owned()),
                (IncidentKind::ResourceForecast, "eu/par/par-n1".to_owned()),
            ]
        );
        // Each forecast of a node is its own incident.
        e.handle_event(
            2_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "forecast:mem",
                Status::Warning,
                "score 3: mem full in ~20 h",
            ),
        );
        assert_eq!(e.open_count(), 3);
        let c = e.handle_event(
            3_000,
            "eu",
            "par",
            &finding(
                "par-n0",
                "forecast:disk:/var",
                Status::Passing,
                "score 0: fine",
            ),
        );
        assert!(
            matches!(&c[..], [Change::Resolved(i)] if i.check.as_deref() == Some("forecast:disk:/var")),
            "{c:?}"
        );
        assert_eq!(e.open_count(), 2);
    }

    #[test]
    fn a_forecast_escalates_and_eases_in_place() {
        let mut e = engine();
        let forecast = |to: Status, detail: &str| Event::CheckChanged {
            node: "par-n0".into(),
            check: "forecast:mem".into(),
            from: Status::Warning,
            to,
            detail: detail.into(),
        };
        e.handle_event(
            1_000,
            "eu",
            "par",
            &forecast(Status::Warning, "score 3: mem full in ~20 h"),
        );
        let id = e.open().next().unwrap().id;
        let c = e.handle_event(
            2_000,
            "eu",
            "par",
            &forecast(Status::Critical, "score 15: mem full in ~1 h"),
        );
        assert!(c.is_empty(), "{c:?}");
        let i = e.open().next().unwrap();
        assert_eq!(
            (i.id, i.severity, i.score, i.updated_ms, i.opened_ms),
            (
                id,
                Severity::Critical,
                Some(Score::from_tenths(150)),
                2_000,
                1_000
            )
        );
        assert_eq!(i.detail, "score 15: mem full in ~1 h");
        let c = e.handle_event(
            3_000,
            "eu",
            "par",
            &forecast(Status::Warning, "score 2: mem full in ~22 h"),
        );
        assert!(c.is_empty(), "{c:?}");
        let i = e.open().next().unwrap();
        assert_eq!((i.id, i.severity), (id, Severity::Warning));
        assert_eq!(e.open_count(), 1);
    }

    #[test]
    fn a_user_check_critical_next_to_findings_still_fails_the_check() {
        let mut e = engine();
        e.handle_event(
            1_000,
            "eu",
            "par",
            &finding("par-n0", "anomaly:cpu", Status::Warning, "score 9: cpu"),
        );
        e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        let mut k = kinds(&e);
        k.sort();
        assert_eq!(
            k,
            vec![
                (IncidentKind::NodeCheckFailing, "eu/par/par-n0".to_owned()),
                (IncidentKind::NodeAnomaly, "eu/par/par-n0".to_owned()),
            ]
        );
        let failing = e
            .open()
            .find(|i| i.kind == IncidentKind::NodeCheckFailing)
            .unwrap();
        assert_eq!(failing.check.as_deref(), Some("web"));
        assert_eq!(failing.score, None);
    }

    #[test]
    fn findings_follow_the_correlation_rules() {
        // At an unreachable site they fold into the site's incident.
        let mut e = engine();
        e.handle_fleet(1_000, &[row("par", SiteStatus::Unreachable)]);
        let c = e.handle_event(
            2_000,
            "eu",
            "par",
            &finding("par-n0", "forecast:mem", Status::Critical, "score 15: soon"),
        );
        assert!(c.is_empty(), "{c:?}");
        let site = e.open().next().unwrap();
        assert_eq!(site.kind, IncidentKind::SiteUnreachable);
        assert_eq!(site.nodes, vec!["par-n0"]);
        // Reachable again, the forecast that still holds opens.
        let c = e.handle_fleet(3_000, &[row("par", SiteStatus::Healthy)]);
        assert!(
            matches!(&c[0], Change::Opened(i) if i.kind == IncidentKind::ResourceForecast),
            "{c:?}"
        );
        // A node that left takes its findings with it.
        e.handle_event(
            3_000,
            "eu",
            "par",
            &finding("par-n0", "anomaly:cpu", Status::Warning, "score 9: cpu"),
        );
        assert_eq!(e.open_count(), 2);
        e.handle_event(
            4_000,
            "eu",
            "par",
            &Event::NodeLeft {
                node: "par-n0".into(),
            },
        );
        assert_eq!(e.open_count(), 0);

        // A flapping node's findings open nothing of their own, and count
        // as its changes.
        let mut e = IncidentEngine::new(IncidentSettings {
            flap_changes: 2,
            ..IncidentSettings::default()
        });
        let mut t = 0;
        for (check, to) in [
            ("anomaly:cpu", Status::Warning),
            ("anomaly:load", Status::Warning),
            ("anomaly:load", Status::Passing),
        ] {
            t += 1_000;
            e.handle_event(
                t,
                "eu",
                "par",
                &finding("par-n0", check, to, "score 9: high"),
            );
        }
        assert_eq!(
            kinds(&e),
            vec![(IncidentKind::NodeFlapping, "eu/par/par-n0".to_owned())]
        );
        let folded = e
            .all()
            .into_iter()
            .find(|i| i.kind == IncidentKind::NodeAnomaly);
        assert!(
            folded.is_some_and(|i| i.detail.ends_with("; folded into incident 2")),
            "{:?}",
            e.all()
        );
        // Quiet again, it opens.
        let c = e.tick(t + 300_000);
        assert!(
            matches!(&c[0], Change::Opened(i) if i.kind == IncidentKind::NodeAnomaly),
            "{c:?}"
        );
    }

    #[test]
    fn a_finding_during_a_waves_bake_names_the_rollout() {
        let mut e = engine();
        e.handle_rollout(Some(rollout(RunState::Running)));
        e.handle_event(
            130_000,
            "eu",
            "par",
            &finding("par-n0", "anomaly:mem", Status::Warning, "score 6: mem"),
        );
        let i = e.open().next().unwrap();
        assert_eq!(i.kind, IncidentKind::NodeAnomaly);
        assert_eq!(i.cause.as_ref().map(|c| (c.run, c.wave)), Some((1, 0)));
    }

    #[test]
    fn incidents_rank_by_severity_then_score_then_newest() {
        let mut e = engine();
        // 1: critical node-check-failing (no score).
        e.handle_event(1_000, "eu", "par", &check("par-n0", Status::Critical));
        // 2: warning anomaly, score 27.
        e.handle_event(
            2_000,
            "eu",
            "par",
            &finding("par-n1", "anomaly:cpu", Status::Warning, "score 27: cpu"),
        );
        // 3: critical forecast, score 4.5.
        e.handle_event(
            3_000,
            "eu",
            "par",
            &finding(
                "par-n2",
                "forecast:disk:/var",
                Status::Critical,
                "score 4.5: disk",
            ),
        );
        // 4: warning anomaly, score 3.
        e.handle_event(
            4_000,
            "eu",
            "par",
            &finding("par-n3", "outlier:cpu", Status::Warning, "score 3: cpu"),
        );
        // 5: warning node-down (no score), newest.
        e.handle_event(
            5_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n4".into(),
            },
        );
        // 6: warning node-down, resolved.
        e.handle_event(
            6_000,
            "eu",
            "par",
            &Event::NodeDied {
                node: "par-n5".into(),
            },
        );
        e.handle_event(
            7_000,
            "eu",
            "par",
            &Event::NodeRecovered {
                node: "par-n5".into(),
            },
        );
        // 1 is a warning (one node's failing check) and 3 is critical.
        let ids = |v: &[Incident]| v.iter().map(|i| i.id).collect::<Vec<_>>();
        assert_eq!(ids(&e.ranked()), vec![3, 2, 4, 5, 1]);
        let mut all = e.all();
        rank(&mut all);
        assert_eq!(ids(&all), vec![3, 2, 4, 5, 1, 6]);
    }

    #[test]
    fn resolved_incidents_are_kept_up_to_the_bound() {
        let mut e = IncidentEngine::new(IncidentSettings {
            keep_resolved: 3,
            flap_changes: 100,
            ..IncidentSettings::default()
        });
        for t in 0..5u64 {
            e.handle_event(t * 10, "eu", "par", &Event::NodeDied { node: "n".into() });
            e.handle_event(
                t * 10 + 1,
                "eu",
                "par",
                &Event::NodeRecovered { node: "n".into() },
            );
        }
        assert_eq!(
            e.all().iter().map(|i| i.id).collect::<Vec<_>>(),
            vec![5, 4, 3]
        );
    }
}
