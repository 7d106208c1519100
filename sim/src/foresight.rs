//! Foresight and runbooks: which nodes are modelled, their figures (a disk
//! that fills, CPU that jumps), and the books the report is made from.
//!
//! Only the nodes given a trend or an anomaly, and as many control nodes
//! with nothing injected, are modelled: each runs the mesh's real
//! [`Foresight`] (a few tens of KB of history) on figures sampled every
//! `[foresight] sample_every`, and, where a rule applies, the real
//! runbook [`Engine`]; the world moves their lease requests and actions
//! ([`world`](crate::world)). Every other node keeps the fixed figures of
//! its health template and costs nothing here.
//!
//! Figures are exact functions of time (a disk's use grows at its rate,
//! less its clean-ups; it is full at the exact moment its use reaches its
//! size), with noise from each node's own stream added when a sample is
//! taken.

use std::collections::{BTreeMap, BTreeSet};

use trellis_node::foresight::Foresight;
use trellis_node::runbook::{Engine, RuleState, RunRecord, RunResult};
use trellis_node::site::Status;

use crate::report::{
    AnomalyDetection, AnomalyOutcome, DiskForecasts, DiskOutcome, FalseAlarm, FalseAlarms,
    ForesightOutcome, RunbookOutcome, SiteRemediation, Spread, TrendOutcome, Trip, ms,
};
use crate::rng::SimRng;
use crate::scenario::{Scenario, Selection, locate_node, region_name};

/// Rows of a list in the report, at most.
pub const LISTED: usize = 50;

/// A trend as the world runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendSpec {
    pub index: usize,
    pub mount: String,
    pub size: f64,
    /// Bytes in use at the start.
    pub used: f64,
    /// Bytes per second.
    pub rate: f64,
    pub rate_text: String,
    /// Seconds of the run.
    pub at: f64,
    pub cleanup_every: Option<f64>,
    pub cleanup_fraction: f64,
}

/// The trends of `sc`, in file order.
pub fn trends(sc: &Scenario) -> Vec<TrendSpec> {
    let f = &sc.foresight;
    sc.trends
        .iter()
        .enumerate()
        .map(|(index, t)| {
            let size = t.size.unwrap_or(f.disk_size).0 as f64;
            TrendSpec {
                index,
                mount: t.mount.clone().unwrap_or_else(|| f.mount.clone()),
                size,
                used: size * t.used.unwrap_or(f.disk_used),
                rate: t.rate.bytes_per_s,
                rate_text: t.rate.text.clone(),
                at: t.at.as_secs_f64(),
                cleanup_every: t.cleanup_every.map(|d| d.as_secs_f64()),
                cleanup_fraction: t.cleanup_fraction.unwrap_or(0.0),
            }
        })
        .collect()
}

/// The nodes `sel` picks, as (site index, member from 1), sorted. The
/// `fraction` is drawn from the stream `label`/`index` of `seed`.
pub fn pick(
    sc: &Scenario,
    seed: u64,
    label: &str,
    index: usize,
    sel: Selection<'_>,
) -> Vec<(usize, usize)> {
    let t = &sc.topology;
    let names = sc.site_names();
    let mut out: BTreeSet<(usize, usize)> = BTreeSet::new();
    let pooled = !sel.sites.is_empty() || !sel.regions.is_empty();
    if pooled || sel.fraction.is_some() {
        let mut pool = Vec::new();
        for (s, name) in names.iter().enumerate() {
            let region = region_name(s / t.sites_per_region + 1);
            if !pooled || sel.sites.contains(name) || sel.regions.contains(&region) {
                pool.extend((1..=t.nodes_per_site).map(|k| (s, k)));
            }
        }
        match sel.fraction {
            Some(fr) => {
                let k = ((pool.len() as f64 * fr).round() as usize)
                    .max(usize::from(fr > 0.0))
                    .min(pool.len());
                let mut rng = SimRng::derive(seed, label, index as u64);
                let mut picked = Vec::new();
                rng.sample(pool.len(), k, &mut picked);
                out.extend(picked.into_iter().map(|p| pool[p]));
            }
            None => out.extend(pool),
        }
    }
    out.extend(sel.nodes.iter().filter_map(|n| locate_node(sc, n)));
    out.into_iter().collect()
}

/// A standard normal draw (Box–Muller).
pub fn normal(rng: &mut SimRng) -> f64 {
    let u1 = rng.f64();
    let u2 = rng.f64();
    (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A modelled disk: its use as an exact function of time.
#[derive(Debug, Clone, PartialEq)]
pub struct Disk {
    pub mount: String,
    pub size: f64,
    pub used: f64,
    /// The time `used` is for.
    pub t: f64,
    /// The trend filling it (its index), if any.
    pub trend: Option<usize>,
    /// From when it fills, and at what rate (bytes per second).
    pub from: f64,
    pub rate: f64,
    pub cleanup_every: Option<f64>,
    pub cleanup_fraction: f64,
    pub next_cleanup: f64,
    /// Bytes written since the last clean-up.
    pub written: f64,
    /// When it became full, each time.
    pub fills: Vec<f64>,
}

impl Disk {
    /// A disk holding `used` of `size` that never changes.
    pub fn steady(mount: &str, size: f64, used: f64) -> Disk {
        Disk {
            mount: mount.to_owned(),
            size,
            used,
            t: 0.0,
            trend: None,
            from: f64::INFINITY,
            rate: 0.0,
            cleanup_every: None,
            cleanup_fraction: 0.0,
            next_cleanup: f64::INFINITY,
            written: 0.0,
            fills: Vec::new(),
        }
    }

    /// A disk that `trend` fills.
    pub fn filling(trend: &TrendSpec) -> Disk {
        Disk {
            trend: Some(trend.index),
            from: trend.at,
            rate: trend.rate,
            cleanup_every: trend.cleanup_every,
            cleanup_fraction: trend.cleanup_fraction,
            next_cleanup: trend.cleanup_every.map_or(f64::INFINITY, |e| trend.at + e),
            ..Disk::steady(&trend.mount, trend.size, trend.used)
        }
    }

    pub fn full(&self) -> bool {
        self.used >= self.size
    }

    pub fn pct(&self) -> f64 {
        self.used * 100.0 / self.size
    }

    /// Moves the disk to time `to`: it fills at its rate from `from`
    /// (nothing is written once it is full), loses `cleanup_fraction` of
    /// what was written at each clean-up, and each moment it becomes full
    /// is recorded.
    pub fn advance(&mut self, to: f64) {
        while self.t < to {
            if self.rate <= 0.0 || to <= self.from {
                self.t = to;
                return;
            }
            if self.t < self.from {
                self.t = self.from;
            }
            let until = to.min(self.next_cleanup);
            let dt = until - self.t;
            if dt > 0.0 && !self.full() {
                let room = self.size - self.used;
                let add = self.rate * dt;
                if add >= room {
                    self.fills.push(self.t + room / self.rate);
                    self.used = self.size;
                    self.written += room;
                } else {
                    self.used += add;
                    self.written += add;
                }
            }
            self.t = until;
            if until >= self.next_cleanup {
                self.used = (self.used - self.written * self.cleanup_fraction).max(0.0);
                self.written = 0.0;
                self.next_cleanup += self.cleanup_every.unwrap_or(f64::INFINITY);
            }
        }
    }

    /// A clean-up by a runbook at `now`: use down to `used_after` of the
    /// size (never up).
    pub fn free(&mut self, now: f64, used_after: f64) {
        self.advance(now);
        self.used = self.used.min(self.size * used_after);
        self.written = 0.0;
    }
}

/// An anomaly injected into a node: its index, start, end (moved earlier
/// when a runbook fixes it) and value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Injected {
    pub index: usize,
    pub start: f64,
    pub end: f64,
    pub value: f64,
}

/// What a modelled node was picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Given a trend (and maybe an anomaly).
    Trend,
    /// Given an anomaly only.
    Anomaly,
    /// Nothing injected: counts false alarms.
    Control,
}

impl Class {
    pub fn word(self) -> &'static str {
        match self {
            Class::Trend => "trend",
            Class::Anomaly => "anomaly",
            Class::Control => "control",
        }
    }
}

/// A modelled node.
pub struct FsNode {
    pub site: usize,
    pub member: usize,
    pub name: String,
    pub class: Class,
    /// By mount point.
    pub disks: Vec<Disk>,
    pub anomalies: Vec<Injected>,
    pub rng: SimRng,
    pub foresight: Foresight,
    /// The runbooks that apply here (indexes into the rules), and the
    /// engine running them.
    pub rules: Vec<usize>,
    pub engine: Option<Engine>,
    /// What the engine saved when the node crashed, for its restart.
    pub saved: BTreeMap<String, RuleState>,
    /// Bumped at each crash, so events of an earlier run are ignored.
    pub epoch: u64,
    /// The last status of each finding, to see changes.
    pub said: BTreeMap<String, Status>,
    /// Rules whose action runs or is being verified (counted in the books).
    pub remediating: Vec<usize>,
}

impl FsNode {
    /// CPU busy at `t` without noise: the anomaly's value while one runs.
    pub fn cpu_at(&self, t: f64, base: f64) -> f64 {
        self.anomalies
            .iter()
            .find(|a| a.start <= t && t < a.end)
            .map_or(base, |a| a.value)
    }

    /// The fullest disk's percentage (as the node's resource sampler
    /// reports it: the highest, rounded).
    pub fn disk_pct(&self) -> u8 {
        self.disks
            .iter()
            .map(|d| d.pct().round().clamp(0.0, 100.0) as u8)
            .max()
            .unwrap_or(0)
    }
}

/// Per disk given a trend: when it was forecast, when it filled.
#[derive(Debug, Clone, Default)]
pub struct DiskBook {
    pub node: usize,
    pub disk: usize,
    /// First `forecast:disk:MOUNT` warning or critical after the trend
    /// started, first critical, first fix by a runbook, and fixes.
    pub warned: Option<f64>,
    pub critical: Option<f64>,
    pub fixed: Option<f64>,
    pub fixes: u64,
}

/// Per injected anomaly and node.
#[derive(Debug, Clone, Default)]
pub struct AnomalyBook {
    pub node: usize,
    pub injected: usize,
    pub flagged: Option<f64>,
    pub cleared: Option<f64>,
}

/// Per rule: what the engines did and what the rails refused.
#[derive(Debug, Clone, Default)]
pub struct RuleBook {
    pub nodes: u64,
    pub runs: u64,
    pub fixed: u64,
    pub failed: u64,
    pub not_recovered: u64,
    pub timed_out: u64,
    pub dry_runs: u64,
    pub lease_requests: u64,
    pub busy: u64,
    pub busy_nodes: BTreeSet<usize>,
    pub no_relay: u64,
    pub rate_limited: u64,
    pub tripped: u64,
    pub reset: u64,
    pub max_concurrent: u32,
    pub max_at: Option<(usize, f64)>,
    /// Per site: runs, fixed, busy answers, most at once.
    pub sites: BTreeMap<usize, [u64; 4]>,
    pub trips: Vec<(usize, f64, String)>,
}

/// The books of a run.
#[derive(Default)]
pub struct Books {
    pub disks: Vec<DiskBook>,
    pub anomalies: Vec<AnomalyBook>,
    /// (node, check, time) of findings raised without a cause.
    pub false_alarms: Vec<(usize, String, f64)>,
    pub rules: Vec<RuleBook>,
    /// Nodes remediating now, per (site, rule).
    pub running: BTreeMap<(usize, usize), u32>,
}

impl Books {
    /// A node of `site` starts its action of `rule` (allowed `max` at
    /// once): counts it, and says so if that is one too many.
    pub fn start(&mut self, site: usize, rule: usize, max: u32, now: f64) -> Option<u32> {
        let n = self.running.entry((site, rule)).or_default();
        *n += 1;
        let n = *n;
        let b = &mut self.rules[rule];
        let entry = b.sites.entry(site).or_default();
        entry[0] += 1;
        entry[3] = entry[3].max(u64::from(n));
        if n > b.max_concurrent {
            b.max_concurrent = n;
            b.max_at = Some((site, now));
        }
        (n > max).then_some(n)
    }

    pub fn stop(&mut self, site: usize, rule: usize) {
        if let Some(n) = self.running.get_mut(&(site, rule)) {
            *n = n.saturating_sub(1);
        }
    }

    pub fn remediating(&self) -> u64 {
        self.running.values().map(|n| u64::from(*n)).sum()
    }

    /// Counts what a node's engine recorded.
    pub fn records(
        &mut self,
        node: usize,
        site: usize,
        rule: usize,
        records: &[RunRecord],
        now: f64,
    ) {
        let b = &mut self.rules[rule];
        for r in records {
            match r.result {
                RunResult::Fixed => {
                    b.runs += 1;
                    b.fixed += 1;
                    b.sites.entry(site).or_default()[1] += 1;
                }
                RunResult::Failed => {
                    b.runs += 1;
                    b.failed += 1;
                    if r.outcome.as_ref().is_some_and(|o| o.timed_out) {
                        b.timed_out += 1;
                    }
                }
                RunResult::NotRecovered => {
                    b.runs += 1;
                    b.not_recovered += 1;
                }
                RunResult::WouldRun => b.dry_runs += 1,
                RunResult::Blocked => {
                    if r.note.contains("at most one run per") {
                        b.rate_limited += 1;
                    }
                }
                RunResult::Tripped => {
                    b.tripped += 1;
                    if b.trips.len() < LISTED {
                        b.trips.push((node, now, r.note.clone()));
                    }
                }
                RunResult::Reset => b.reset += 1,
            }
        }
    }
}

/// A [`Spread`] of seconds.
pub fn spread(samples: &[f64]) -> Spread {
    Spread::of(samples)
}

/// Everything the report says, from the books and the nodes at the end.
pub struct Summary<'a> {
    pub sc: &'a Scenario,
    pub nodes: &'a [FsNode],
    pub trends: &'a [TrendSpec],
    pub books: &'a Books,
    pub site_names: &'a [String],
    pub end: f64,
}

impl Summary<'_> {
    pub fn outcome(&self) -> ForesightOutcome {
        let count = |c: Class| self.nodes.iter().filter(|n| n.class == c).count() as u64;
        let controls = count(Class::Control);
        ForesightOutcome {
            sample_every_s: ms(self.sc.foresight.sample_every.as_secs_f64()),
            forecast_min_span_s: ms(self.sc.foresight.node.forecast_min_span.as_secs_f64()),
            nodes_modelled: self.nodes.len() as u64,
            trend_nodes: count(Class::Trend),
            anomaly_nodes: self
                .nodes
                .iter()
                .filter(|n| !n.anomalies.is_empty())
                .count() as u64,
            control_nodes: controls,
            disks: self.disks(),
            anomalies: self.anomalies(),
            false_alarms: self.false_alarms(controls),
            runbooks: self.runbooks(),
        }
    }

    fn disk_outcome(&self, b: &DiskBook) -> DiskOutcome {
        let n = &self.nodes[b.node];
        let d = &n.disks[b.disk];
        let full = d.fills.first().copied();
        let lead = match (b.warned, full) {
            (Some(w), Some(f)) if w <= f => Some(ms(f - w)),
            _ => None,
        };
        DiskOutcome {
            node: n.name.clone(),
            mount: d.mount.clone(),
            trend: d.trend.unwrap_or(0) as u64,
            started_s: ms(d.from),
            forecast_s: b.warned.map(ms),
            critical_s: b.critical.map(ms),
            full_s: full.map(ms),
            lead_s: lead,
            times_full: d.fills.len() as u64,
            fixes: b.fixes,
            cleaned_s: b.fixed.map(ms),
        }
    }

    fn disks(&self) -> DiskForecasts {
        let all: Vec<DiskOutcome> = self
            .books
            .disks
            .iter()
            .map(|b| self.disk_outcome(b))
            .collect();
        let tally = |rows: &[&DiskOutcome]| {
            let filled: Vec<&&DiskOutcome> = rows.iter().filter(|d| d.full_s.is_some()).collect();
            let warn: Vec<f64> = filled.iter().filter_map(|d| d.lead_s).collect();
            let crit: Vec<f64> = filled
                .iter()
                .filter_map(|d| match (d.critical_s, d.full_s) {
                    (Some(c), Some(f)) if c <= f => Some(f - c),
                    _ => None,
                })
                .collect();
            let fill: Vec<f64> = filled
                .iter()
                .filter_map(|d| d.full_s.map(|f| f - d.started_s))
                .collect();
            let averted = rows
                .iter()
                .filter(|d| d.full_s.is_none() && d.fixes > 0)
                .count() as u64;
            (filled.len() as u64, warn, crit, fill, averted)
        };
        let rows: Vec<&DiskOutcome> = all.iter().collect();
        let (filled, warn, crit, _, averted) = tally(&rows);
        let not_predicted: Vec<String> = all
            .iter()
            .filter(|d| d.full_s.is_some() && d.lead_s.is_none())
            .map(|d| format!("{}:{}", d.node, d.mount))
            .collect();
        let per_trend = self
            .trends
            .iter()
            .map(|t| {
                let rows: Vec<&DiskOutcome> =
                    all.iter().filter(|d| d.trend == t.index as u64).collect();
                let (filled, warn, crit, fill, averted) = tally(&rows);
                TrendOutcome {
                    index: t.index as u64,
                    mount: t.mount.clone(),
                    rate: t.rate_text.clone(),
                    at_s: ms(t.at),
                    disks: rows.len() as u64,
                    forecast: rows.iter().filter(|d| d.forecast_s.is_some()).count() as u64,
                    filled,
                    predicted_before_full: warn.len() as u64,
                    lead_warning: spread(&warn),
                    lead_critical: spread(&crit),
                    time_to_full: spread(&fill),
                    averted,
                }
            })
            .collect();
        // Listed: those that filled first (least warned first), then the rest.
        let mut listed: Vec<DiskOutcome> = all.clone();
        listed.sort_by(|a, b| {
            (a.full_s.is_none(), a.lead_s.unwrap_or(-1.0), &a.node)
                .partial_cmp(&(b.full_s.is_none(), b.lead_s.unwrap_or(-1.0), &b.node))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        listed.truncate(LISTED * 4);
        DiskForecasts {
            disks: all.len() as u64,
            forecast: all.iter().filter(|d| d.forecast_s.is_some()).count() as u64,
            filled,
            predicted_before_full: warn.len() as u64,
            not_predicted_total: not_predicted.len() as u64,
            not_predicted: not_predicted.into_iter().take(LISTED).collect(),
            lead_warning: spread(&warn),
            lead_critical: spread(&crit),
            averted,
            per_trend,
            nodes: listed,
        }
    }

    fn anomalies(&self) -> AnomalyDetection {
        let b = &self.books.anomalies;
        let flagged: Vec<&AnomalyBook> = b.iter().filter(|a| a.flagged.is_some()).collect();
        let injected = |a: &AnomalyBook| {
            self.nodes[a.node]
                .anomalies
                .iter()
                .find(|x| x.index == a.injected)
                .copied()
        };
        let delays = |rows: &[&AnomalyBook]| -> Vec<f64> {
            rows.iter()
                .filter_map(|a| Some(a.flagged? - injected(a)?.start))
                .collect()
        };
        let cleared: Vec<f64> = flagged
            .iter()
            .filter_map(|a| Some(a.cleared? - injected(a)?.end))
            .collect();
        let missed: Vec<String> = b
            .iter()
            .filter(|a| a.flagged.is_none())
            .map(|a| self.nodes[a.node].name.clone())
            .collect();
        let per_anomaly = self
            .sc
            .anomalies
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let rows: Vec<&AnomalyBook> = b.iter().filter(|a| a.injected == i).collect();
                let hit: Vec<&AnomalyBook> = rows
                    .iter()
                    .copied()
                    .filter(|a| a.flagged.is_some())
                    .collect();
                AnomalyOutcome {
                    index: i as u64,
                    metric: "cpu".to_owned(),
                    value: spec.value,
                    at_s: ms(spec.at.as_secs_f64()),
                    duration_s: ms(spec.duration.as_secs_f64()),
                    nodes: rows.len() as u64,
                    flagged: hit.len() as u64,
                    delay: spread(&delays(&hit)),
                }
            })
            .collect();
        AnomalyDetection {
            injected: b.len() as u64,
            flagged: flagged.len() as u64,
            missed_total: missed.len() as u64,
            missed: missed.into_iter().take(LISTED).collect(),
            delay: spread(&delays(&flagged)),
            cleared_after_end: spread(&cleared),
            per_anomaly,
        }
    }

    fn false_alarms(&self, controls: u64) -> FalseAlarms {
        let fa = &self.books.false_alarms;
        let on = |c: Class| fa.iter().filter(move |(n, _, _)| self.nodes[*n].class == c);
        let on_controls = on(Class::Control).count() as u64;
        let alarmed: BTreeSet<usize> = on(Class::Control).map(|(n, _, _)| *n).collect();
        let hours = controls as f64 * self.end / 3600.0;
        FalseAlarms {
            control_nodes: controls,
            control_node_hours: ms(hours),
            on_controls,
            controls_alarmed: alarmed.len() as u64,
            per_control_node_hour: if hours > 0.0 {
                on_controls as f64 / hours
            } else {
                0.0
            },
            elsewhere: fa.len() as u64 - on_controls,
            first: fa
                .iter()
                .take(LISTED)
                .map(|(n, check, at)| FalseAlarm {
                    node: self.nodes[*n].name.clone(),
                    class: self.nodes[*n].class.word().to_owned(),
                    check: check.clone(),
                    at_s: ms(*at),
                })
                .collect(),
        }
    }

    fn runbooks(&self) -> Vec<RunbookOutcome> {
        self.sc
            .runbooks
            .iter()
            .zip(&self.books.rules)
            .map(|(spec, b)| {
                let r = &spec.rule;
                let refusals: u64 = self
                    .nodes
                    .iter()
                    .filter_map(|n| n.engine.as_ref())
                    .filter_map(|e| e.states().remove(&r.name))
                    .map(|s| s.blocked)
                    .sum::<u64>()
                    + self
                        .nodes
                        .iter()
                        .filter(|n| n.engine.is_none())
                        .filter_map(|n| n.saved.get(&r.name))
                        .map(|s| s.blocked)
                        .sum::<u64>();
                let mut sites: Vec<SiteRemediation> = b
                    .sites
                    .iter()
                    .map(|(s, [runs, fixed, busy, most])| SiteRemediation {
                        site: self.site_names[*s].clone(),
                        runs: *runs,
                        fixed: *fixed,
                        busy: *busy,
                        max_concurrent: *most as u32,
                    })
                    .collect();
                sites.sort_by(|a, b| {
                    (b.max_concurrent, b.busy, b.runs)
                        .cmp(&(a.max_concurrent, a.busy, a.runs))
                        .then(a.site.cmp(&b.site))
                });
                sites.truncate(LISTED);
                RunbookOutcome {
                    name: r.name.clone(),
                    check: r.check.clone(),
                    when: r.when.to_string(),
                    after_s: ms(r.after.as_secs_f64()),
                    max_per_site: r.max_per_site,
                    min_interval_s: ms(r.min_interval.as_secs_f64()),
                    breaker_failures: r.breaker_failures,
                    breaker_window_s: ms(r.breaker_window.as_secs_f64()),
                    dry_run: r.dry_run,
                    fixes: spec.fixes,
                    action_s: ms(spec.duration.as_secs_f64()),
                    nodes: b.nodes,
                    runs: b.runs,
                    fixed: b.fixed,
                    failed: b.failed,
                    not_recovered: b.not_recovered,
                    timed_out: b.timed_out,
                    dry_runs: b.dry_runs,
                    lease_requests: b.lease_requests,
                    blocked_site_limit: b.busy,
                    nodes_blocked_site_limit: b.busy_nodes.len() as u64,
                    blocked_rate_limit: b.rate_limited,
                    blocked_no_relay: b.no_relay,
                    refusals,
                    breaker_trips: b.tripped,
                    breaker_resets: b.reset,
                    max_concurrent: b.max_concurrent,
                    max_concurrent_site: b.max_at.map(|(s, _)| self.site_names[s].clone()),
                    max_concurrent_s: b.max_at.map(|(_, t)| ms(t)),
                    sites,
                    trips: b
                        .trips
                        .iter()
                        .map(|(n, at, note)| Trip {
                            node: self.nodes[*n].name.clone(),
                            at_s: ms(*at),
                            note: note.clone(),
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trend(rate: f64, cleanup: Option<(f64, f64)>) -> TrendSpec {
        TrendSpec {
            index: 0,
            mount: "/var".into(),
            size: 100.0,
            used: 50.0,
            rate,
            rate_text: String::new(),
            at: 10.0,
            cleanup_every: cleanup.map(|c| c.0),
            cleanup_fraction: cleanup.map_or(0.0, |c| c.1),
        }
    }

    #[test]
    fn a_disk_fills_from_its_start_and_is_full_at_the_exact_moment() {
        let mut d = Disk::filling(&trend(1.0, None));
        d.advance(5.0);
        assert_eq!(d.used, 50.0, "nothing before the trend starts");
        d.advance(30.0);
        assert_eq!(d.used, 70.0);
        // Looked at in uneven steps, it is full at 10 + 50 s all the same.
        for t in [33.3, 47.1, 59.99, 61.0, 200.0] {
            d.advance(t);
        }
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
        };
        assert!(close(&d.fills, &[60.0]), "{:?}", d.fills);
        assert!(d.full());
        d.free(210.0, 0.4);
        assert_eq!(d.used, 40.0);
        d.advance(280.0);
        assert!(
            close(&d.fills, &[60.0, 270.0]),
            "it fills again: {:?}",
            d.fills
        );
    }

    #[test]
    fn clean_ups_remove_their_share_of_what_was_written_since_the_last() {
        // 1 byte/s from 10 s, a clean-up every 10 s removing half.
        let mut d = Disk::filling(&trend(1.0, Some((10.0, 0.5))));
        d.advance(20.0);
        assert_eq!(d.used, 55.0);
        d.advance(40.0);
        assert_eq!(d.used, 65.0, "three clean-ups of 5 bytes by now");
        // After the clean-up at 90 s it holds 90 bytes and fills the rest
        // in 10 s, before the next one.
        d.advance(500.0);
        assert!((d.fills[0] - 100.0).abs() < 1e-9, "{:?}", d.fills);
        // Full, each clean-up frees half of what got written since the one
        // before, and the disk fills again before the next.
        assert!((d.fills[1] - 105.0).abs() < 1e-9, "{:?}", d.fills);
        assert!((d.fills[2] - 112.5).abs() < 1e-9, "{:?}", d.fills);
    }

    #[test]
    fn picks_are_reproducible_and_stay_in_their_pool() {
        let sc = Scenario::parse(
            r#"
            name = "t"
            duration = "1h"
            [topology]
            regions = 2
            hubs = 1
            sites_per_region = 3
            nodes_per_site = 10
            "#,
            "t.toml",
        )
        .unwrap();
        let sites = vec!["r2-s1".to_owned()];
        let nodes = vec!["r1-s1-n4".to_owned()];
        let sel = Selection {
            sites: &sites,
            regions: &[],
            nodes: &nodes,
            fraction: Some(0.5),
        };
        let a = pick(&sc, 3, "x", 0, sel);
        assert_eq!(a, pick(&sc, 3, "x", 0, sel));
        assert_ne!(a, pick(&sc, 4, "x", 0, sel));
        assert_eq!(a.len(), 6, "half of r2-s1 and the node named");
        assert!(a.contains(&(0, 4)));
        assert!(
            a.iter()
                .all(|&(s, k)| (s == 3 || (s, k) == (0, 4)) && k >= 1)
        );
        let everything = Selection {
            sites: &[],
            regions: &[],
            nodes: &[],
            fraction: Some(0.1),
        };
        assert_eq!(pick(&sc, 1, "x", 0, everything).len(), 6);
    }

    #[test]
    fn the_books_say_when_a_site_runs_a_rule_on_more_nodes_than_allowed() {
        let mut b = Books {
            rules: vec![RuleBook::default()],
            ..Books::default()
        };
        assert_eq!(b.start(3, 0, 2, 10.0), None);
        assert_eq!(b.start(3, 0, 2, 11.0), None);
        assert_eq!(
            b.start(4, 0, 2, 12.0),
            None,
            "another site has its own places"
        );
        assert_eq!(
            b.start(3, 0, 2, 13.0),
            Some(3),
            "a third at once is one too many"
        );
        b.stop(3, 0);
        b.stop(3, 0);
        assert_eq!(b.start(3, 0, 2, 14.0), None);
        assert_eq!(b.remediating(), 3);
        let r = &b.rules[0];
        assert_eq!((r.max_concurrent, r.max_at), (3, Some((3, 13.0))));
        assert_eq!(r.sites[&3], [4, 0, 0, 3]);
    }

    #[test]
    fn noise_is_standard_normal() {
        let mut rng = SimRng::new(9);
        let xs: Vec<f64> = (0..20_000).map(|_| normal(&mut rng)).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.05,
            "{mean} {var}"
        );
    }
}
