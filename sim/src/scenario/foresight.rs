//! Scenario fields for foresight and runbooks: `[foresight]` (how the
//! modelled nodes sample and what their figures are when nothing is
//! injected), `[[trends]]` (disks that fill), `[[anomalies]]` (figures that
//! jump) and `[[runbooks]]` (the mesh's remediation rules, with what their
//! action does in the simulation).
//!
//! Sizes are written `100GB`, `512MiB` or as a number of bytes; rates
//! `2GB/h`, `500MB/min` or `1MB/s` (decimal units: 1 GB = 10^9 bytes;
//! binary ones with `i`: 1 GiB = 2^30).

use std::fmt;
use std::time::Duration;

use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use trellis_node::foresight::ForesightConfig;
use trellis_node::runbook::Runbook;

use super::{Scenario, region_name};

/// A number of bytes, as written (`100GB`) and as a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bytes(pub u64);

/// A rate in bytes per second, kept as written so a scenario writes back
/// the same.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub text: String,
    pub bytes_per_s: f64,
}

const UNITS: [(&str, f64); 9] = [
    ("TiB", 1_099_511_627_776.0),
    ("GiB", 1_073_741_824.0),
    ("MiB", 1_048_576.0),
    ("KiB", 1024.0),
    ("TB", 1e12),
    ("GB", 1e9),
    ("MB", 1e6),
    ("KB", 1e3),
    ("B", 1.0),
];

/// Bytes of `text`: a number followed by an optional unit.
pub fn parse_bytes(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let (number, factor) = UNITS
        .iter()
        .find_map(|(u, f)| t.strip_suffix(u).map(|n| (n.trim(), *f)))
        .unwrap_or((t, 1.0));
    let v: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size; write it like \"100GB\", \"512MiB\" or a number of bytes")
    })?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{text:?} is not a size: it must be 0 or more"));
    }
    Ok(v * factor)
}

/// Bytes per second of `text`, `SIZE/UNIT` with a unit of time `s`, `min`
/// (or `m`), `h` or `d`.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let bad =
        || format!("{text:?} is not a rate; write it like \"2GB/h\", \"500MB/min\" or \"1MB/s\"");
    let (size, per) = text.split_once('/').ok_or_else(bad)?;
    let seconds = match per.trim() {
        "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        _ => return Err(bad()),
    };
    let bytes = parse_bytes(size).map_err(|_| bad())?;
    Ok(bytes / seconds)
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(Bytes(n)),
            Raw::Text(t) => parse_bytes(&t)
                .map(|b| Bytes(b.round() as u64))
                .map_err(D::Error::custom),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes_per_s = parse_rate(&text).map_err(D::Error::custom)?;
        Ok(Rate { text, bytes_per_s })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// `[foresight]`: how the modelled nodes sample, and their figures when
/// nothing is injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForesightSettings {
    /// How often a modelled node samples its figures and hands them to its
    /// `Foresight` (a node does every `health.interval`, 2 s).
    #[serde(with = "humantime_serde")]
    pub sample_every: Duration,
    /// How long each modelled node has been sampling its steady figures
    /// before the run starts (fed to its `Foresight` before time 0, so the
    /// run starts with baselines and forecast history; 0: it starts empty,
    /// as on a node that has just started).
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// Nodes with nothing injected that run a `Foresight` too, to count
    /// false alarms (default: as many as the nodes given a trend or an
    /// anomaly, or all the others if there are fewer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_nodes: Option<usize>,
    /// CPU busy, percent, and the standard deviation of its noise.
    pub cpu_pct: f64,
    pub cpu_noise: f64,
    /// Every modelled node's disk: its mount point, size, the share of it
    /// in use, and the standard deviation of the noise on its use.
    pub mount: String,
    pub disk_size: Bytes,
    pub disk_used: f64,
    pub disk_noise: Bytes,
    /// The nodes' `[health.foresight]` (`trellis_node::foresight`'s
    /// defaults unless set).
    pub node: ForesightConfig,
}

impl Default for ForesightSettings {
    fn default() -> Self {
        ForesightSettings {
            sample_every: Duration::from_secs(30),
            history: Duration::ZERO,
            control_nodes: None,
            cpu_pct: 20.0,
            cpu_noise: 2.5,
            mount: "/var".to_owned(),
            disk_size: Bytes(100_000_000_000),
            disk_used: 0.5,
            disk_noise: Bytes(20_000_000),
            node: ForesightConfig::default(),
        }
    }
}

impl ForesightSettings {
    pub fn is_default(&self) -> bool {
        *self == ForesightSettings::default()
    }
}

/// What a trend does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrendKind {
    /// A disk fills at `rate` from `at` until it is full.
    DiskFill,
}

/// One `[[trends]]` entry: which nodes, from when, how fast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trend {
    pub kind: TrendKind,
    /// When the disk starts to fill (before, it holds its `used` share).
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Share of the nodes of `sites` and `regions` (of the fleet if none)
    /// to pick from the seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Bytes written per unit of time (`2GB/h`).
    pub rate: Rate,
    /// The disk's mount point (default `[foresight] mount`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Its size (default `[foresight] disk_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
    /// Share of it in use at the start (default `[foresight] disk_used`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<f64>,
    /// Every so often a clean-up (a log rotated, a cache trimmed) removes
    /// `cleanup_fraction` of what was written since the one before.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub cleanup_every: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleanup_fraction: Option<f64>,
}

/// The figure an anomaly changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyMetric {
    /// CPU busy, percent.
    Cpu,
}

/// One `[[anomalies]]` entry: which nodes' figure jumps to what, when and
/// for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anomaly {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    pub metric: AnomalyMetric,
    /// The figure while the anomaly lasts (noise added).
    pub value: f64,
}

/// Which nodes an entry picks: the nodes of `sites` and `regions` (the
/// fleet when neither is given), a `fraction` of them from the seed (all
/// of them without one), and the `nodes` named.
#[derive(Debug, Clone, Copy)]
pub struct Selection<'a> {
    pub sites: &'a [String],
    pub regions: &'a [String],
    pub nodes: &'a [String],
    pub fraction: Option<f64>,
}

impl Trend {
    pub fn selection(&self) -> Selection<'_> {
        Selection {
            sites: &self.sites,
            regions: &self.regions,
            nodes: &self.nodes,
            fraction: self.fraction,
        }
    }
}

impl Anomaly {
    pub fn selection(&self) -> Selection<'_> {
        Selection {
            sites: &self.sites,
            regions: &self.regions,
            nodes: &self.nodes,
            fraction: self.fraction,
        }
    }
}

/// How long a modelled action runs when the rule does not say.
pub const DEFAULT_ACTION_TIME: Duration = Duration::from_secs(30);
/// The share of a disk in use after a clean-up, when the rule does not
/// say.
pub const DEFAULT_USED_AFTER: f64 = 0.5;

/// One `[[runbooks]]` entry: a rule exactly as the mesh's
/// `trellis_node::runbook::Runbook` reads it (`name`, `check`, `when`,
/// `after`, `run`, `timeout`, `verify`, `max_per_site`, `min_interval`,
/// `breaker_failures`, `breaker_window`, `dry_run`), plus what the action
/// does here (`fixes`, `duration`, `used_after`) and where the rule
/// applies (`sites`, `regions`; everywhere by default).
#[derive(Debug, Clone, PartialEq)]
pub struct RunbookSpec {
    pub rule: Runbook,
    /// Whether the action removes the cause: frees the disk (to
    /// `used_after` of its size) or ends the CPU anomaly. Without, it exits
    /// 0 and changes nothing.
    pub fixes: bool,
    /// How long the action runs (past the rule's `timeout` it is killed, a
    /// failure, and changes nothing).
    pub duration: Duration,
    pub used_after: f64,
    pub sites: Vec<String>,
    pub regions: Vec<String>,
}

/// The keys of a `[[runbooks]]` entry that are the simulator's, not the
/// rule's.
const SIM_KEYS: [&str; 5] = ["fixes", "duration", "used_after", "sites", "regions"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimKeys {
    #[serde(default = "yes")]
    fixes: bool,
    #[serde(default = "action_time", with = "humantime_serde")]
    duration: Duration,
    #[serde(default = "used_after")]
    used_after: f64,
    #[serde(default)]
    sites: Vec<String>,
    #[serde(default)]
    regions: Vec<String>,
}

fn yes() -> bool {
    true
}
fn action_time() -> Duration {
    DEFAULT_ACTION_TIME
}
fn used_after() -> f64 {
    DEFAULT_USED_AFTER
}

impl<'de> Deserialize<'de> for RunbookSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(d)?;
        let mut sim = toml::Table::new();
        for k in SIM_KEYS {
            if let Some(v) = table.remove(k) {
                sim.insert(k.to_owned(), v);
            }
        }
        let name = table
            .get("name")
            .and_then(|n| n.as_str())
            .map(|n| format!(" {n:?}"))
            .unwrap_or_default();
        let rule: Runbook =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| {
                    D::Error::custom(format!("runbook{name}: {}", e.message()))
                })?;
        let sim: SimKeys = toml::Value::Table(sim)
            .try_into()
            .map_err(|e: toml::de::Error| {
                D::Error::custom(format!("runbook{name}: {}", e.message()))
            })?;
        Ok(RunbookSpec {
            rule,
            fixes: sim.fixes,
            duration: sim.duration,
            used_after: sim.used_after,
            sites: sim.sites,
            regions: sim.regions,
        })
    }
}

impl Serialize for RunbookSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = toml::Table::try_from(&self.rule).map_err(S::Error::custom)?;
        t.insert("fixes".into(), toml::Value::Boolean(self.fixes));
        t.insert(
            "duration".into(),
            toml::Value::String(humantime::format_duration(self.duration).to_string()),
        );
        t.insert("used_after".into(), toml::Value::Float(self.used_after));
        for (key, list) in [("sites", &self.sites), ("regions", &self.regions)] {
            if !list.is_empty() {
                t.insert(
                    key.into(),
                    toml::Value::Array(list.iter().cloned().map(toml::Value::String).collect()),
                );
            }
        }
        t.serialize(s)
    }
}

/// The longest action a rule may model.
pub const MAX_ACTION_TIME: Duration = Duration::from_secs(24 * 3600);

/// Where a modelled node is: `r2-s3-n7` is member 7 (from 1) of the third
/// site of the second region, as (site index, member).
pub fn locate_node(sc: &Scenario, name: &str) -> Option<(usize, usize)> {
    let t = &sc.topology;
    let rest = name.strip_prefix('r')?;
    let (r, rest) = rest.split_once("-s")?;
    let (s, k) = rest.split_once("-n")?;
    let (r, s, k): (usize, usize, usize) = (r.parse().ok()?, s.parse().ok()?, k.parse().ok()?);
    let ok = (1..=t.regions).contains(&r)
        && (1..=t.sites_per_region).contains(&s)
        && (1..=t.nodes_per_site).contains(&k)
        && name == format!("r{r}-s{s}-n{k}");
    ok.then(|| ((r - 1) * t.sites_per_region + s - 1, k))
}

/// The checks a modelled node has that a rule can watch.
pub fn watchable(check: &str) -> bool {
    matches!(check, "disk" | "anomaly:cpu" | "anomaly:disk")
        || check
            .strip_prefix("forecast:disk:")
            .is_some_and(|m| !m.is_empty())
}

impl Scenario {
    /// Whether anything of foresight or runbooks runs: without trends,
    /// anomalies and runbooks no node is modelled and nothing is scheduled.
    pub fn has_foresight(&self) -> bool {
        !self.trends.is_empty() || !self.anomalies.is_empty() || !self.runbooks.is_empty()
    }

    fn validate_selection(&self, at: &str, sel: Selection<'_>) -> Result<(), String> {
        let ok = |c: bool, m: String| if c { Ok(()) } else { Err(m) };
        let sites = self.site_names();
        for s in sel.sites {
            ok(
                sites.contains(s),
                format!("{at}: `sites`: no site {s:?} (sites are named r1-s1, r1-s2, ...)"),
            )?;
        }
        for r in sel.regions {
            ok(
                (1..=self.topology.regions).any(|n| region_name(n) == *r),
                format!("{at}: `regions`: no region {r:?}"),
            )?;
        }
        for n in sel.nodes {
            ok(
                locate_node(self, n).is_some(),
                format!(
                    "{at}: `nodes`: no node {n:?} (nodes are named r1-s1-n1 to r1-s1-n{})",
                    self.topology.nodes_per_site
                ),
            )?;
        }
        if let Some(f) = sel.fraction {
            ok(
                f > 0.0 && f <= 1.0,
                format!("{at}: `fraction` must be more than 0 and at most 1"),
            )?;
        }
        ok(
            !sel.sites.is_empty()
                || !sel.regions.is_empty()
                || !sel.nodes.is_empty()
                || sel.fraction.is_some(),
            format!("{at}: pick nodes with `sites`, `regions`, `nodes` or a `fraction`"),
        )
    }

    pub(super) fn validate_foresight(&self) -> Result<(), String> {
        let ok = |c: bool, m: String| if c { Ok(()) } else { Err(m) };
        let f = &self.foresight;
        let end = humantime::format_duration(self.duration);
        ok(
            f.sample_every >= Duration::from_secs(1) && f.sample_every <= Duration::from_secs(600),
            "foresight.sample_every must be between 1s and 10m".to_owned(),
        )?;
        ok(
            f.history <= Duration::from_secs(7 * 86_400),
            "foresight.history must be at most 7 days".to_owned(),
        )?;
        ok(
            (0.0..=100.0).contains(&f.cpu_pct) && f.cpu_noise >= 0.0 && f.cpu_noise <= 50.0,
            "foresight.cpu_pct must be in [0, 100] and foresight.cpu_noise in [0, 50]".to_owned(),
        )?;
        ok(
            f.mount.starts_with('/'),
            format!(
                "foresight.mount {:?} must be a path starting with /",
                f.mount
            ),
        )?;
        ok(
            f.disk_size.0 > 0 && (0.0..1.0).contains(&f.disk_used),
            "foresight.disk_size must be more than 0 and foresight.disk_used in [0, 1)".to_owned(),
        )?;
        ok(
            f.control_nodes.is_none_or(|n| n <= self.total_nodes()),
            format!(
                "foresight.control_nodes is more than the {} nodes of the scenario",
                self.total_nodes()
            ),
        )?;
        if let Some((field, problem)) = f.node.problems().into_iter().next() {
            return Err(format!(
                "foresight.node.{}: {problem}",
                field.trim_start_matches("health.foresight.")
            ));
        }
        let mut mounts = vec![f.mount.clone()];
        for (i, t) in self.trends.iter().enumerate() {
            let at = format!("trends[{i}] (disk_fill)");
            ok(
                t.at <= self.duration,
                format!(
                    "{at}: `at` = {} is after the scenario ends (duration {end})",
                    humantime::format_duration(t.at)
                ),
            )?;
            self.validate_selection(&at, t.selection())?;
            ok(
                t.rate.bytes_per_s > 0.0,
                format!("{at}: `rate` must be more than 0"),
            )?;
            ok(
                t.size.is_none_or(|s| s.0 > 0),
                format!("{at}: `size` must be more than 0"),
            )?;
            ok(
                t.used.is_none_or(|u| (0.0..1.0).contains(&u)),
                format!("{at}: `used` is the share of the disk in use at the start, in [0, 1)"),
            )?;
            if let Some(m) = &t.mount {
                ok(
                    m.starts_with('/'),
                    format!("{at}: `mount` {m:?} must be a path starting with /"),
                )?;
                mounts.push(m.clone());
            }
            ok(
                t.cleanup_every.is_some() == t.cleanup_fraction.is_some(),
                format!("{at}: set both `cleanup_every` and `cleanup_fraction`, or neither"),
            )?;
            ok(
                t.cleanup_every.is_none_or(|e| e >= Duration::from_secs(1)),
                format!("{at}: `cleanup_every` must be at least 1s"),
            )?;
            ok(
                t.cleanup_fraction.is_none_or(|c| (0.0..1.0).contains(&c)),
                format!(
                    "{at}: `cleanup_fraction` is the share of what was written since the last \
                     clean-up that a clean-up removes, in [0, 1)"
                ),
            )?;
        }
        for (i, a) in self.anomalies.iter().enumerate() {
            let at = format!("anomalies[{i}] (cpu)");
            ok(
                a.at <= self.duration,
                format!(
                    "{at}: `at` = {} is after the scenario ends (duration {end})",
                    humantime::format_duration(a.at)
                ),
            )?;
            ok(
                a.duration > Duration::ZERO,
                format!("{at}: `duration` must be more than 0"),
            )?;
            self.validate_selection(&at, a.selection())?;
            ok(
                (0.0..=100.0).contains(&a.value),
                format!("{at}: `value` is CPU busy in percent, in [0, 100]"),
            )?;
        }
        for (i, r) in self.runbooks.iter().enumerate() {
            let name = &r.rule.name;
            let at = format!("runbooks[{i}] ({name})");
            if let Some(p) = r.rule.problems().into_iter().next() {
                return Err(format!("{at}: {p}"));
            }
            ok(
                self.runbooks[..i].iter().all(|o| o.rule.name != *name),
                format!("{at}: two runbooks are named {name:?}"),
            )?;
            ok(
                watchable(&r.rule.check),
                format!(
                    "{at}: `check` {:?} is not one a modelled node has; use disk, \
                     forecast:disk:MOUNT, anomaly:cpu or anomaly:disk",
                    r.rule.check
                ),
            )?;
            if let Some(m) = r.rule.check.strip_prefix("forecast:disk:") {
                ok(
                    mounts.iter().any(|x| x == m),
                    format!(
                        "{at}: `check`: no modelled node has a disk at {m:?}; disks: {}",
                        mounts.join(", ")
                    ),
                )?;
            }
            ok(
                r.duration > Duration::ZERO && r.duration <= MAX_ACTION_TIME,
                format!(
                    "{at}: `duration` (how long the action runs) must be more than 0 and at most {}",
                    humantime::format_duration(MAX_ACTION_TIME)
                ),
            )?;
            ok(
                (0.0..1.0).contains(&r.used_after),
                format!(
                    "{at}: `used_after` is the share of the disk in use after a fix, in [0, 1)"
                ),
            )?;
            let sel = Selection {
                sites: &r.sites,
                regions: &r.regions,
                nodes: &[],
                fraction: Some(1.0),
            };
            self.validate_selection(&at, sel)?;
        }
        Ok(())
    }
}
