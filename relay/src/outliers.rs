//! Peer outliers: a node that uses far more than the other nodes of its
//! site carrying the same labels. Pure: the relay core calls
//! [`Outliers::assess`] at each look at the site with the time of the look,
//! and merges what it returns into the nodes' checks.
//!
//! # The rule
//! A node's *peers* are the site's other current, alive nodes (never a
//! relay) with exactly the same label map and a figure for the metric. A
//! node is assessed for a metric only when it is alive, has the figure and
//! has at least `min_peers` peers. With `m` the median of its peers'
//! figures and `v` its own:
//! - it *is an outlier* when `v ≥ ratio × m` and `v − m ≥ min_gap`;
//! - a raised outlier *still holds* while `v ≥ (1 + (ratio − 1) / 2) × m`
//!   and `v − m ≥ min_gap / 2` (half the margins: 3× and 10 points by
//!   default), so a figure hovering at the threshold does not flap.
//!
//! The gap rule keeps idle groups quiet (5 % against 1 % is five times, and
//! nothing) and makes a median of 0 harmless. An outlier is raised once it
//! has been one at every look for `hold_for`, and cleared once it has not
//! held (or could not be assessed) at every look for `hold_for`. Time, not
//! a number of looks: the relay looks every `uplink.sample_interval`
//! (configurable, and later when the core task is busy), while the figures
//! move on a minute's scale (CPU is a one-minute average published in
//! steps).
//!
//! # As checks
//! A finding is a check with a reserved name (user check names cannot hold
//! `:`): `outlier:cpu`, `outlier:mem`, `outlier:load`. It is `warning`
//! while raised and `passing` after it cleared; it appears only once it
//! was raised, so the hub sees both transitions and a node never an outlier
//! carries no such check. Its detail starts with `score N: `, `N` the
//! node's figure over the peers' median to one decimal (a median below the
//! metric's [`Metric::floor`] counts as the floor), e.g. `score 6.2: cpu
//! 87% against a median of 14% among 9 peers labelled role=web`. A node
//! not assessed at a look keeps the last score it had. The node's status
//! is left as it published it.
//!
//! State is kept only for nodes with a finding or a pending one, and
//! forgotten when the node leaves the view; a relay restart forgets it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use trellis_node::site::{CheckResult, MAX_DETAIL_LEN, MemberView, SiteView, Status};

use crate::summarise::is_node;

/// Prefix of the checks the relay adds for peer outliers.
pub const CHECK_PREFIX: &str = "outlier:";

/// A figure nodes are compared on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// `cpu_pct`, percent.
    Cpu,
    /// `mem_pct`, percent.
    Mem,
    /// `load1`, the one-minute load average.
    Load,
}

impl Metric {
    pub const ALL: [Metric; 3] = [Metric::Cpu, Metric::Mem, Metric::Load];

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cpu => "cpu",
            Metric::Mem => "mem",
            Metric::Load => "load",
        }
    }

    /// The check that reports it: `outlier:cpu`, ...
    pub fn check(self) -> &'static str {
        match self {
            Metric::Cpu => "outlier:cpu",
            Metric::Mem => "outlier:mem",
            Metric::Load => "outlier:load",
        }
    }

    /// The smallest median a score is taken against: one percentage point,
    /// or 0.1 of load.
    pub fn floor(self) -> f64 {
        match self {
            Metric::Cpu | Metric::Mem => 1.0,
            Metric::Load => 0.1,
        }
    }

    fn value(self, m: &MemberView) -> Option<f64> {
        match self {
            Metric::Cpu => m.health.cpu_pct.map(f64::from),
            Metric::Mem => m.health.mem_pct.map(f64::from),
            Metric::Load => m.health.load1.map(f64::from).filter(|l| l.is_finite()),
        }
    }

    fn min_gap(self, cfg: &OutliersConfig) -> f64 {
        match self {
            Metric::Cpu | Metric::Mem => cfg.min_gap_pct,
            Metric::Load => cfg.min_gap_load,
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Metric::Cpu | Metric::Mem if v.fract() == 0.0 => format!("{v:.0}%"),
            Metric::Cpu | Metric::Mem => format!("{v:.1}%"),
            Metric::Load => format!("{v:.2}"),
        }
    }
}

/// `[outliers]`: nodes far above their same-labelled peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutliersConfig {
    pub enabled: bool,
    /// The figures compared.
    pub metrics: Vec<Metric>,
    /// How many times the peers' median a figure must be (more than 1).
    pub ratio: f64,
    /// Fewest peers (same labels, alive, other than the node) to compare
    /// with.
    pub min_peers: usize,
    /// Least difference from the median, in percentage points, for `cpu`
    /// and `mem`.
    pub min_gap_pct: f64,
    /// Least difference from the median for `load`.
    pub min_gap_load: f64,
    /// How long a node must be an outlier at every look before it is
    /// raised, and not be one before it is cleared.
    #[serde(with = "humantime_serde")]
    pub hold_for: Duration,
}

impl Default for OutliersConfig {
    fn default() -> Self {
        OutliersConfig {
            enabled: true,
            metrics: Metric::ALL.to_vec(),
            ratio: 5.0,
            min_peers: 3,
            min_gap_pct: 20.0,
            min_gap_load: 2.0,
            hold_for: Duration::from_secs(300),
        }
    }
}

/// Checks to add, by node and by check name.
pub type Findings = BTreeMap<String, BTreeMap<String, CheckResult>>;

/// One node's standing on one metric at one look.
#[derive(Debug, Clone, Copy)]
struct Assessment<'a> {
    value: f64,
    median: f64,
    peers: usize,
    labels: &'a BTreeMap<String, String>,
}

impl Assessment<'_> {
    fn is_outlier(&self, metric: Metric, cfg: &OutliersConfig) -> bool {
        self.value >= cfg.ratio * self.median && self.value - self.median >= metric.min_gap(cfg)
    }

    fn still_holds(&self, metric: Metric, cfg: &OutliersConfig) -> bool {
        let ratio = 1.0 + (cfg.ratio - 1.0) / 2.0;
        self.value >= ratio * self.median && self.value - self.median >= metric.min_gap(cfg) / 2.0
    }

    fn score(&self, metric: Metric) -> f64 {
        self.value / self.median.max(metric.floor())
    }

    fn detail(&self, metric: Metric) -> String {
        let head = format!(
            "score {:.1}: {} {} against a median of {} among {} peers ",
            self.score(metric),
            metric.name(),
            metric.show(self.value),
            metric.show(self.median),
            self.peers,
        );
        with_labels(head, self.labels)
    }
}

/// `head` followed by what the peers are labelled, cut to fit in a check's
/// detail.
fn with_labels(mut head: String, labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        head.push_str("with no labels");
        return head;
    }
    head.push_str("labelled ");
    let mut text = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        let _ = write!(text, "{}{k}={v}", if i == 0 { "" } else { "," });
    }
    let room = MAX_DETAIL_LEN.saturating_sub(head.len());
    if text.len() > room {
        let mut cut = room.saturating_sub(3);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    head.push_str(&text);
    head
}

/// One node's finding on one metric.
#[derive(Debug, Clone, Copy, Default)]
struct Track {
    raised: bool,
    /// Raised at least once: reported from then on.
    reported: bool,
    /// Since when the opposite of `raised` has held at every look.
    since: Option<Instant>,
    /// The score at the last look that assessed the node.
    last_score: f64,
}

/// Peer outliers of a site, look after look.
#[derive(Debug)]
pub struct Outliers {
    cfg: OutliersConfig,
    state: BTreeMap<String, BTreeMap<Metric, Track>>,
}

impl Outliers {
    pub fn new(cfg: OutliersConfig) -> Self {
        Outliers {
            cfg,
            state: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &OutliersConfig {
        &self.cfg
    }

    /// Whether any finding may be made.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled && !self.cfg.metrics.is_empty()
    }

    /// Nodes with state kept (a finding raised once, or one pending).
    pub fn tracked(&self) -> usize {
        self.state.len()
    }

    /// Takes a look at `view` (as seen by `relay`) at `now`: the checks of
    /// every node with a finding raised now or before, by node.
    pub fn assess(&mut self, now: Instant, view: &SiteView, relay: &str) -> Findings {
        let mut out = Findings::new();
        if !self.enabled() {
            self.state.clear();
            return out;
        }
        let cfg = &self.cfg;
        let nodes: BTreeMap<&str, &MemberView> = view
            .current_members()
            .into_iter()
            .filter(|m| is_node(m, relay))
            .map(|m| (m.name.as_str(), m))
            .collect();
        let mut groups: BTreeMap<&BTreeMap<String, String>, Vec<&MemberView>> = BTreeMap::new();
        for m in nodes.values().filter(|m| m.alive) {
            groups.entry(&m.labels).or_default().push(m);
        }

        // Assessments that matter: an outlier now, or a node with state.
        let mut assessed: BTreeMap<(&str, Metric), Assessment<'_>> = BTreeMap::new();
        let mut values: Vec<(f64, &str)> = Vec::new();
        for (labels, group) in &groups {
            for &metric in &cfg.metrics {
                values.clear();
                values.extend(
                    group
                        .iter()
                        .filter_map(|m| Some((metric.value(m)?, m.name.as_str()))),
                );
                let peers = values.len().saturating_sub(1);
                if peers == 0 || peers < cfg.min_peers {
                    continue;
                }
                values.sort_by(|a, b| a.0.total_cmp(&b.0));
                for (i, &(value, name)) in values.iter().enumerate() {
                    let a = Assessment {
                        value,
                        median: median_without(&values, i),
                        peers,
                        labels,
                    };
                    let tracked = self
                        .state
                        .get(name)
                        .is_some_and(|t| t.contains_key(&metric));
                    if tracked || a.is_outlier(metric, cfg) {
                        assessed.insert((name, metric), a);
                    }
                }
            }
        }

        self.state
            .retain(|name, _| nodes.contains_key(name.as_str()));
        for (&(name, metric), a) in &assessed {
            if a.is_outlier(metric, cfg) {
                self.state
                    .entry(name.to_owned())
                    .or_default()
                    .entry(metric)
                    .or_default();
            }
        }
        for (name, tracks) in &mut self.state {
            for (&metric, t) in tracks.iter_mut() {
                let a = assessed.get(&(name.as_str(), metric));
                let against = match a {
                    Some(a) if t.raised => !a.still_holds(metric, cfg),
                    Some(a) => a.is_outlier(metric, cfg),
                    // Not assessed: no evidence it still is one.
                    None => t.raised,
                };
                if against {
                    let since = *t.since.get_or_insert(now);
                    if now.saturating_duration_since(since) >= cfg.hold_for {
                        t.raised = !t.raised;
                        t.reported = true;
                        t.since = None;
                    }
                } else {
                    t.since = None;
                }
                if let Some(a) = a {
                    t.last_score = a.score(metric);
                }
                if t.reported {
                    let detail = match a {
                        Some(a) => a.detail(metric),
                        None => {
                            let m = nodes[name.as_str()];
                            unassessed(metric, t.last_score, m, cfg)
                        }
                    };
                    let status = if t.raised {
                        Status::Warning
                    } else {
                        Status::Passing
                    };
                    out.entry(name.clone())
                        .or_default()
                        .insert(metric.check().to_owned(), CheckResult::new(status, detail));
                }
            }
            tracks.retain(|_, t| t.reported || t.since.is_some());
        }
        self.state.retain(|_, tracks| !tracks.is_empty());
        out
    }
}

/// The detail of a finding not assessed at this look.
fn unassessed(metric: Metric, last_score: f64, m: &MemberView, cfg: &OutliersConfig) -> String {
    let head = format!("score {last_score:.1}: {} not assessed: ", metric.name());
    if !m.alive {
        format!("{head}node not alive")
    } else if metric.value(m).is_none() {
        format!("{head}no figure")
    } else {
        with_labels(
            format!("{head}fewer than {} peers ", cfg.min_peers.max(1)),
            &m.labels,
        )
    }
}

/// The median of `sorted` (ascending, at least two values) without the
/// value at `skip`.
fn median_without(sorted: &[(f64, &str)], skip: usize) -> f64 {
    let k = sorted.len() - 1;
    let at = |j: usize| sorted[if j < skip { j } else { j + 1 }].0;
    if k % 2 == 1 {
        at(k / 2)
    } else {
        (at(k / 2 - 1) + at(k / 2)) / 2.0
    }
}

/// Removes the checks with the reserved [`CHECK_PREFIX`] from `checks`
/// (only the relay makes them).
pub fn strip(checks: &mut BTreeMap<String, CheckResult>) {
    if checks.keys().any(|k| k.starts_with(CHECK_PREFIX)) {
        checks.retain(|k, _| !k.starts_with(CHECK_PREFIX));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use trellis_node::id::Role;
    use trellis_node::site::Health;

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn node(name: &str, labels: &[(&str, &str)], cpu: u8) -> MemberView {
        MemberView {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:1".parse().unwrap(),
            alive: true,
            health: Health {
                role: Some(Role::Node),
                status: Status::Passing,
                cpu_pct: Some(cpu),
                mem_pct: Some(40),
                disk_pct: Some(50),
                load1: Some(0.5),
                checks: BTreeMap::new(),
            },
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: Default::default(),
        }
    }

    fn relay() -> MemberView {
        let mut r = node("relay", &[("role", "web")], 99);
        r.health.role = Some(Role::Relay);
        r
    }

    fn view(members: Vec<MemberView>) -> SiteView {
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    const WEB: &[(&str, &str)] = &[("role", "web")];

    /// Ten web nodes at 10-15 % CPU, `web-hot` at `hot`, and the relay.
    fn web_site(hot: u8) -> SiteView {
        let mut members: Vec<MemberView> = (0..10)
            .map(|i| node(&format!("web-{i}"), WEB, 10 + (i % 6) as u8))
            .collect();
        members.push(node("web-hot", WEB, hot));
        members.push(relay());
        view(members)
    }

    fn cpu_only() -> OutliersConfig {
        OutliersConfig {
            metrics: vec![Metric::Cpu],
            ..OutliersConfig::default()
        }
    }

    /// Looks at `view` every second from `*t` for `span` (both ends
    /// included); `*t` ends at the last look.
    fn look_for(o: &mut Outliers, t: &mut Instant, span: Duration, v: &SiteView) -> Findings {
        let end = *t + span;
        let mut last = o.assess(*t, v, "relay");
        while *t < end {
            *t += SECOND;
            last = o.assess(*t, v, "relay");
        }
        last
    }

    #[test]
    fn a_node_far_above_its_peers_is_raised_once_it_held_for_hold_for() {
        let cfg = OutliersConfig::default();
        let hold = cfg.hold_for;
        let mut o = Outliers::new(cfg);
        let v = web_site(80);
        let mut t = Instant::now();
        let f = look_for(&mut o, &mut t, hold - SECOND, &v);
        assert!(f.is_empty(), "not yet: {f:?}");
        t += SECOND;
        let f = o.assess(t, &v, "relay");
        assert_eq!(f.keys().collect::<Vec<_>>(), vec!["web-hot"], "{f:?}");
        let checks = &f["web-hot"];
        assert_eq!(checks.keys().collect::<Vec<_>>(), vec!["outlier:cpu"]);
        let r = &checks["outlier:cpu"];
        assert_eq!(r.status, Status::Warning);
        // Others: 10 11 12 13 14 15 10 11 12 13 → median 12.
        assert_eq!(
            r.detail,
            "score 6.7: cpu 80% against a median of 12% among 10 peers labelled role=web"
        );
        assert!(r.detail.len() <= MAX_DETAIL_LEN);
        assert_eq!(o.tracked(), 1);
    }

    #[test]
    fn nodes_with_other_labels_are_not_compared() {
        let mut o = Outliers::new(cpu_only());
        let mut v = web_site(13);
        // Busy by trade, alone of its kind: not an outlier of the web nodes.
        v.members.push(node("db-1", &[("role", "db")], 90));
        // The same label plus another is another group too.
        v.members
            .push(node("web-batch", &[("role", "web"), ("tier", "batch")], 95));
        let mut t = Instant::now();
        let f = look_for(&mut o, &mut t, Duration::from_secs(600), &v);
        assert!(f.is_empty(), "{f:?}");
        assert_eq!(o.tracked(), 0);
    }

    #[test]
    fn fewer_peers_than_min_peers_is_nothing() {
        let mut o = Outliers::new(cpu_only());
        let v = view(vec![
            node("a", WEB, 5),
            node("b", WEB, 5),
            node("hot", WEB, 90),
            relay(),
        ]);
        let mut t = Instant::now();
        assert!(look_for(&mut o, &mut t, Duration::from_secs(600), &v).is_empty());
        // A third peer, and it is one.
        let mut more = v.clone();
        more.members.push(node("c", WEB, 5));
        let f = look_for(&mut o, &mut t, Duration::from_secs(300), &more);
        assert_eq!(f["hot"]["outlier:cpu"].status, Status::Warning);
        // Dead peers do not count.
        let mut dead = more.clone();
        dead.members
            .iter_mut()
            .find(|m| m.name == "c")
            .unwrap()
            .alive = false;
        let mut fresh = Outliers::new(cpu_only());
        assert!(look_for(&mut fresh, &mut t, Duration::from_secs(600), &dead).is_empty());
    }

    fn one_against(value: u8, peers_at: u8) -> Findings {
        let mut members: Vec<MemberView> = (0..5)
            .map(|i| node(&format!("n{i}"), WEB, peers_at))
            .collect();
        members.push(node("x", WEB, value));
        let mut o = Outliers::new(cpu_only());
        let mut t = Instant::now();
        look_for(&mut o, &mut t, Duration::from_secs(300), &view(members))
    }

    #[test]
    fn both_the_ratio_and_the_gap_must_hold() {
        // Ratio 6, gap 25: raised.
        let f = one_against(30, 5);
        assert_eq!(f["x"]["outlier:cpu"].status, Status::Warning);
        assert!(f["x"]["outlier:cpu"].detail.starts_with("score 6.0: "));
        // Ratio 6.7, gap 17: not.
        assert!(one_against(20, 3).is_empty());
        // Gap 40, ratio 2: not.
        assert!(one_against(80, 40).is_empty());
        // A median of 0 is fine: the gap decides, the score takes 1 %.
        let f = one_against(25, 0);
        assert!(
            f["x"]["outlier:cpu"]
                .detail
                .starts_with("score 25.0: cpu 25% against a median of 0%"),
            "{f:?}"
        );
        assert!(one_against(19, 0).is_empty());
    }

    #[test]
    fn a_node_back_among_its_peers_is_passing_once_it_held_for_hold_for() {
        let cfg = cpu_only();
        let hold = cfg.hold_for;
        let mut o = Outliers::new(cfg);
        let mut t = Instant::now();
        let f = look_for(&mut o, &mut t, hold, &web_site(80));
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Warning);
        // Between the raise and the clear margins (3x and 10 points): it
        // stays raised however long.
        let f = look_for(&mut o, &mut t, hold * 3, &web_site(40));
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Warning);
        // Back to normal: still raised until it held for hold_for.
        t += SECOND;
        let normal = web_site(14);
        let f = look_for(&mut o, &mut t, hold - SECOND, &normal);
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Warning);
        t += SECOND;
        let f = o.assess(t, &normal, "relay");
        let r = &f["web-hot"]["outlier:cpu"];
        assert_eq!(r.status, Status::Passing);
        assert!(r.detail.starts_with("score 1.2: cpu 14% "), "{r:?}");
        // It stays, passing, so the change is seen; others never get one.
        let f = look_for(&mut o, &mut t, hold * 2, &normal);
        assert_eq!(f.len(), 1);
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Passing);
    }

    #[test]
    fn a_brief_excursion_is_not_raised_and_a_brief_dip_does_not_clear() {
        let cfg = cpu_only();
        let hold = cfg.hold_for;
        let mut o = Outliers::new(cfg);
        let mut t = Instant::now();
        // Hot for almost hold_for, then one normal look, then hot again:
        // the wait starts over.
        look_for(&mut o, &mut t, hold - SECOND, &web_site(80));
        t += SECOND;
        o.assess(t, &web_site(12), "relay");
        t += SECOND;
        let f = look_for(&mut o, &mut t, hold - SECOND, &web_site(80));
        assert!(f.is_empty(), "{f:?}");
        t += SECOND;
        let f = o.assess(t, &web_site(80), "relay");
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Warning);
        // Raised: a short dip does not clear it.
        t += SECOND;
        look_for(&mut o, &mut t, hold - SECOND * 2, &web_site(12));
        t += SECOND;
        let f = look_for(&mut o, &mut t, hold, &web_site(80));
        assert_eq!(f["web-hot"]["outlier:cpu"].status, Status::Warning);
    }

    #[test]
    fn every_metric_has_its_check_and_its_own_gap() {
        let mut o = Outliers::new(OutliersConfig::default());
        let mut members: Vec<MemberView> = (0..4)
            .map(|i| {
                let mut n = node(&format!("n{i}"), WEB, 10);
                n.health.mem_pct = Some(8);
                n.health.load1 = Some(0.3);
                n
            })
            .collect();
        let mut x = node("x", WEB, 10);
        x.health.mem_pct = Some(45);
        x.health.load1 = Some(2.5);
        let mut y = node("y", WEB, 10);
        y.health.mem_pct = Some(8);
        y.health.load1 = Some(1.9); // ratio 6.3, gap 1.6 < 2
        members.extend([x, y]);
        let mut t = Instant::now();
        let f = look_for(&mut o, &mut t, Duration::from_secs(300), &view(members));
        assert_eq!(f.keys().collect::<Vec<_>>(), vec!["x"]);
        let x = &f["x"];
        assert_eq!(
            x.keys().collect::<Vec<_>>(),
            vec!["outlier:load", "outlier:mem"]
        );
        assert_eq!(
            x["outlier:mem"].detail,
            "score 5.6: mem 45% against a median of 8% among 5 peers labelled role=web"
        );
        assert_eq!(
            x["outlier:load"].detail,
            "score 8.3: load 2.50 against a median of 0.30 among 5 peers labelled role=web"
        );
    }

    #[test]
    fn a_node_that_leaves_the_view_is_forgotten_and_one_not_assessed_clears() {
        let cfg = cpu_only();
        let hold = cfg.hold_for;
        let mut o = Outliers::new(cfg);
        let mut t = Instant::now();
        look_for(&mut o, &mut t, hold, &web_site(80));
        assert_eq!(o.tracked(), 1);
        // Dead: no longer assessed, cleared after hold_for, with the last
        // score kept.
        let mut dead = web_site(80);
        dead.members
            .iter_mut()
            .find(|m| m.name == "web-hot")
            .unwrap()
            .alive = false;
        t += SECOND;
        let f = look_for(&mut o, &mut t, hold, &dead);
        let r = &f["web-hot"]["outlier:cpu"];
        assert_eq!(r.status, Status::Passing);
        assert_eq!(r.detail, "score 6.7: cpu not assessed: node not alive");
        // Gone from the view: forgotten.
        t += SECOND;
        let gone = web_site(12);
        let gone = view(
            gone.members
                .into_iter()
                .filter(|m| m.name != "web-hot")
                .collect(),
        );
        assert!(o.assess(t, &gone, "relay").is_empty());
        assert_eq!(o.tracked(), 0);
    }

    #[test]
    fn long_labels_are_cut_to_fit_a_detail() {
        let long = "x".repeat(200);
        let labels: &[(&str, &str)] = &[("role", "web"), ("zone", &long)];
        let mut members: Vec<MemberView> =
            (0..5).map(|i| node(&format!("n{i}"), labels, 5)).collect();
        members.push(node("x", labels, 90));
        let mut o = Outliers::new(cpu_only());
        let mut t = Instant::now();
        let f = look_for(&mut o, &mut t, Duration::from_secs(300), &view(members));
        let d = &f["x"]["outlier:cpu"].detail;
        assert!(d.len() <= MAX_DETAIL_LEN, "{}", d.len());
        assert!(d.starts_with("score 18.0: cpu 90% "), "{d}");
        assert!(d.contains("labelled role=web,zone=xxx"), "{d}");
        assert!(d.ends_with("x..."), "{d}");
    }

    #[test]
    fn disabled_finds_nothing() {
        let mut o = Outliers::new(OutliersConfig {
            enabled: false,
            ..OutliersConfig::default()
        });
        let mut t = Instant::now();
        assert!(look_for(&mut o, &mut t, Duration::from_secs(600), &web_site(90)).is_empty());
    }

    /// splitmix64: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in `lo..=hi`.
        fn between(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo + 1)
        }
    }

    /// Looks `looks` times a second apart at 12 web nodes whose figures
    /// `figures` sets before each look (node index, node); returns how
    /// many findings were raised.
    fn false_alarms(
        cfg: OutliersConfig,
        looks: usize,
        mut figures: impl FnMut(usize, &mut MemberView),
    ) -> usize {
        let mut o = Outliers::new(cfg);
        let mut t = Instant::now();
        let mut members: Vec<MemberView> =
            (0..12).map(|i| node(&format!("web-{i}"), WEB, 0)).collect();
        members.push(relay());
        let mut before: BTreeSet<(String, String)> = BTreeSet::new();
        let mut raised_count = 0;
        for _ in 0..looks {
            for (i, m) in members.iter_mut().enumerate() {
                if m.name != "relay" {
                    figures(i, m);
                }
            }
            let f = o.assess(t, &view(members.clone()), "relay");
            let now: BTreeSet<(String, String)> = f
                .iter()
                .flat_map(|(n, checks)| {
                    checks
                        .iter()
                        .filter(|(_, r)| r.status == Status::Warning)
                        .map(|(c, _)| (n.clone(), c.clone()))
                })
                .collect();
            raised_count += now.difference(&before).count();
            before = now;
            t += SECOND;
        }
        raised_count
    }

    /// Every node's figures drawn afresh at each look: CPU 5-40 %, memory
    /// 20-60 %, load 0-4.
    fn noisy(rng: &mut Rng) -> impl FnMut(usize, &mut MemberView) + '_ {
        |_, m| {
            m.health.cpu_pct = Some(rng.between(5, 40) as u8);
            m.health.mem_pct = Some(rng.between(20, 60) as u8);
            m.health.load1 = Some(rng.between(0, 400) as f32 / 100.0);
        }
    }

    /// An idle site (CPU 0-8 %, memory 3-9 %, load 0-0.3) whose nodes each
    /// jump to 30-95 % CPU one look in twenty: far above the median, never
    /// for long.
    fn spiky(rng: &mut Rng) -> impl FnMut(usize, &mut MemberView) + '_ {
        |_, m| {
            let cpu = if rng.between(1, 20) == 1 {
                rng.between(30, 95)
            } else {
                rng.between(0, 8)
            };
            m.health.cpu_pct = Some(cpu as u8);
            m.health.mem_pct = Some(rng.between(3, 9) as u8);
            m.health.load1 = Some(rng.between(0, 30) as f32 / 100.0);
        }
    }

    /// The idle site, whose nodes each start a job one look in 300 that
    /// holds CPU at 60-95 % and load at 2.5-4 for 10 s to 2 min.
    fn bursty(rng: &mut Rng) -> impl FnMut(usize, &mut MemberView) + '_ {
        let mut left = [0u64; 13];
        move |i, m| {
            if left[i] == 0 && rng.between(1, 300) == 1 {
                left[i] = rng.between(10, 120);
            }
            let busy = left[i] > 0;
            left[i] = left[i].saturating_sub(1);
            let (cpu, load) = if busy {
                (rng.between(60, 95), rng.between(250, 400))
            } else {
                (rng.between(0, 8), rng.between(0, 30))
            };
            m.health.cpu_pct = Some(cpu as u8);
            m.health.mem_pct = Some(rng.between(3, 9) as u8);
            m.health.load1 = Some(load as f32 / 100.0);
        }
    }

    #[test]
    fn noisy_normal_sites_raise_nothing() {
        type Site = fn(&mut Rng) -> Box<dyn FnMut(usize, &mut MemberView) + '_>;
        let sites: [(&str, Site); 3] = [
            ("noisy", |r| Box::new(noisy(r))),
            ("idle with spikes", |r| Box::new(spiky(r))),
            ("idle with jobs", |r| Box::new(bursty(r))),
        ];
        let unheld = OutliersConfig {
            hold_for: Duration::ZERO,
            ..OutliersConfig::default()
        };
        for (name, site) in sites {
            let mut rng = Rng(7);
            let alarms = false_alarms(OutliersConfig::default(), 1000, site(&mut rng));
            // The same figures with no hold, for comparison.
            let mut rng = Rng(7);
            let without_hold = false_alarms(unheld.clone(), 1000, site(&mut rng));
            println!(
                "{name} site, 12 nodes, 1000 looks: {alarms} false alarms \
                 ({without_hold} with no hold)"
            );
            assert_eq!(alarms, 0, "{name}");
        }
    }

    #[test]
    fn the_median_without_one_value() {
        let v: Vec<(f64, &str)> = [1.0, 2.0, 3.0, 10.0].into_iter().map(|x| (x, "")).collect();
        assert_eq!(median_without(&v, 3), 2.0);
        assert_eq!(median_without(&v, 0), 3.0);
        assert_eq!(median_without(&v, 1), 3.0);
        let v5: Vec<(f64, &str)> = [1.0, 2.0, 3.0, 4.0, 10.0]
            .into_iter()
            .map(|x| (x, ""))
            .collect();
        assert_eq!(median_without(&v5, 4), 2.5);
        assert_eq!(median_without(&v5, 0), 3.5);
        assert_eq!(median_without(&v5[..2], 0), 2.0);
    }
}
