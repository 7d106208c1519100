//! Foresight: what is unusual in a member's own figures, and what is about
//! to run out. Pure: the health loop passes each resource sample in with
//! its time, and publishes what [`Foresight::checks`] returns.
//!
//! # Anomalies
//! Each figure (CPU, memory, load, fullest disk) has a robust baseline: an
//! exponentially weighted median of its recent history and the weighted
//! median absolute deviation (MAD) around it. The history holds one point
//! per [`ForesightConfig::step`] (the median of the samples in that step,
//! so one odd sample does not move it) for [`HISTORY`] steps, each weighted
//! by `2^(-age / half_life)`. A sample's score is its distance from the
//! median in robust standard deviations (`1.4826 × MAD`, but never less
//! than the figure's floor, so a flat figure does not make every wobble
//! infinitely unusual). A figure is anomalous once `persist` samples in a
//! row score at least `threshold`, and normal again once `persist` samples
//! in a row score under half of it. Nothing is scored before the history
//! covers `warmup`. A level that persists becomes the baseline: the
//! weighted median follows it within about one half-life.
//!
//! # Forecasts
//! Disks (by mount point) and memory, in bytes, keep one point per
//! [`ForesightConfig::forecast_step`] over `forecast_window`. Their trend is
//! a Theil–Sen estimate over long pairs ([`theil_sen`]): the median of the
//! slopes between points at least half the history apart, robust to the
//! spikes and drops of a real disk (a log rotated, a cache cleared), with
//! the 5th to 95th percentile of those slopes as its interval. The time
//! until the resource is full is `(total − used now) / slope`, and its
//! interval comes from the slope's. Nothing is forecast before the history
//! covers `forecast_min_span` (2 h), so that a disk's routine clean-ups are
//! in it. A forecast is raised when the slope's whole interval is above
//! zero and the estimate is within `forecast_warning` (critical within
//! `forecast_critical`), for two evaluations in a row; it clears when the
//! estimate is beyond 1.5 × `forecast_warning` or the rise is no longer
//! clear, twice in a row. The certificate's expiry needs no estimate.
//!
//! # As checks
//! Findings are published as checks with reserved names (user check names
//! cannot hold `:`): `anomaly:cpu`, `anomaly:mem`, `anomaly:load`,
//! `anomaly:disk`, `forecast:disk:MOUNT`, `forecast:mem`, `forecast:cert`.
//! Their detail starts with `score N: `, which the hub ranks incidents by.
//! A check appears only once it was raised (and stays, passing, after it
//! clears, so the relay and the hub see the change), so a healthy member
//! gossips no extra key. Findings do not change the member's status.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::site::{CheckResult, Status};

/// Points of a figure's baseline history.
pub const HISTORY: usize = 480;
/// Points a forecast regresses at most (older ones are thinned out).
pub const FORECAST_POINTS: usize = 120;
/// Disks followed at most (the first by mount point).
pub const MAX_DISKS: usize = 16;
/// Prefix of a check that reports an anomaly.
pub const ANOMALY_PREFIX: &str = "anomaly:";
/// Prefix of a check that reports a forecast.
pub const FORECAST_PREFIX: &str = "forecast:";

/// Whether a check name is a finding (of this module, or a relay's peer
/// comparison) rather than a check a person configured.
pub fn is_finding(check: &str) -> bool {
    check.contains(':')
}

/// The score a finding's detail starts with (`score N: ...`, N digits
/// with at most one decimal point).
pub fn score_of(detail: &str) -> Option<f64> {
    let (n, _) = detail.strip_prefix("score ")?.split_once(':')?;
    let plain = n.bytes().any(|b| b.is_ascii_digit())
        && n.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && n.bytes().filter(|b| *b == b'.').count() <= 1;
    plain.then(|| n.parse::<f64>().ok()).flatten()
}

/// How far a finding's score must rise, as a factor, before its new
/// detail is published (or reported upwards) with an unchanged status.
pub const SCORE_MOVE: f64 = 1.25;

/// What to say of a finding now, given what was said (`said`) and what it
/// is (`now`): `now` when its status changed or its score rose by
/// [`SCORE_MOVE`], else what was said. A finding's figures move with every
/// sample; repeating each move would be gossip and events without news. A
/// falling score is not news either: the finding clears soon, and until
/// then it is ranked by how unusual it got.
pub fn settle(said: Option<&CheckResult>, now: CheckResult) -> CheckResult {
    match said {
        Some(said) if said.status == now.status => {
            let (a, b) = (
                score_of(&said.detail).unwrap_or(0.0),
                score_of(&now.detail).unwrap_or(0.0),
            );
            if now.status != Status::Passing && b > a * SCORE_MOVE {
                now
            } else {
                said.clone()
            }
        }
        _ => now,
    }
}

/// `[health.foresight]`: anomaly detection and forecasts on a member's own
/// figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForesightConfig {
    pub enabled: bool,
    /// No figure is scored before its history covers this long.
    #[serde(with = "humantime_serde")]
    pub warmup: Duration,
    /// One baseline point per step: the median of the step's samples.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// Weight of a baseline point halves with each half-life of age.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
    /// Robust standard deviations from the median that make a sample
    /// unusual.
    pub threshold: f64,
    /// Samples in a row that raise (and clear) an anomaly.
    pub persist: u32,
    /// One forecast point per step.
    #[serde(with = "humantime_serde")]
    pub forecast_step: Duration,
    /// How far back a forecast looks.
    #[serde(with = "humantime_serde")]
    pub forecast_window: Duration,
    /// A forecast needs at least this much history.
    #[serde(with = "humantime_serde")]
    pub forecast_min_span: Duration,
    /// Running out within this long: a warning.
    #[serde(with = "humantime_serde")]
    pub forecast_warning: Duration,
    /// Running out within this long: critical.
    #[serde(with = "humantime_serde")]
    pub forecast_critical: Duration,
    /// The certificate expiring within this long: a warning (renewal
    /// normally replaces it 30 days before).
    #[serde(with = "humantime_serde")]
    pub cert_warning: Duration,
    /// The certificate expiring within this long: critical.
    #[serde(with = "humantime_serde")]
    pub cert_critical: Duration,
}

impl Default for ForesightConfig {
    fn default() -> Self {
        ForesightConfig {
            enabled: true,
            warmup: Duration::from_secs(30 * 60),
            step: Duration::from_secs(30),
            half_life: Duration::from_secs(3600),
            threshold: 6.0,
            persist: 3,
            forecast_step: Duration::from_secs(60),
            forecast_window: Duration::from_secs(6 * 3600),
            forecast_min_span: Duration::from_secs(2 * 3600),
            forecast_warning: Duration::from_secs(24 * 3600),
            forecast_critical: Duration::from_secs(2 * 3600),
            cert_warning: Duration::from_secs(14 * 86400),
            cert_critical: Duration::from_secs(3 * 86400),
        }
    }
}

impl ForesightConfig {
    /// What is wrong with these settings, as (field, problem).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut check = |ok: bool, field: &'static str, problem: &str| {
            if !ok {
                out.push((field, problem.to_owned()));
            }
        };
        check(
            self.threshold.is_finite() && self.threshold >= 1.0,
            "health.foresight.threshold",
            "must be a number of at least 1",
        );
        check(
            (1..=100).contains(&self.persist),
            "health.foresight.persist",
            "must be between 1 and 100 samples",
        );
        for (field, d) in [
            ("health.foresight.step", self.step),
            ("health.foresight.half_life", self.half_life),
            ("health.foresight.forecast_step", self.forecast_step),
        ] {
            check(
                d >= Duration::from_millis(100),
                field,
                "must be at least 100ms",
            );
        }
        check(
            self.forecast_window >= self.forecast_min_span,
            "health.foresight.forecast_window",
            "must be at least `forecast_min_span`",
        );
        check(
            self.forecast_critical <= self.forecast_warning,
            "health.foresight.forecast_critical",
            "must be at most `forecast_warning`",
        );
        check(
            self.cert_critical <= self.cert_warning,
            "health.foresight.cert_critical",
            "must be at most `cert_warning`",
        );
        out
    }
}

/// One look at the machine, in the units foresight needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Percent busy (the one-minute average).
    pub cpu_pct: Option<f64>,
    /// Memory in use and in all, bytes.
    pub mem: Option<(u64, u64)>,
    pub load1: Option<f64>,
    /// Mount point, bytes used, bytes in all.
    pub disks: Vec<(String, u64, u64)>,
}

impl Observation {
    fn fullest_disk_pct(&self) -> Option<f64> {
        self.disks
            .iter()
            .filter(|(_, _, total)| *total > 0)
            .map(|(_, used, total)| *used as f64 * 100.0 / *total as f64)
            .max_by(f64::total_cmp)
    }
}

/// The weighted median of `(value, weight)` pairs.
fn weighted_median(points: &mut [(f64, f64)]) -> Option<f64> {
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: f64 = points.iter().map(|p| p.1).sum();
    if points.is_empty() || total <= 0.0 {
        return None;
    }
    let mut acc = 0.0;
    for (v, w) in points.iter() {
        acc += w;
        if acc >= total / 2.0 {
            return Some(*v);
        }
    }
    points.last().map(|p| p.0)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// A figure's robust baseline: exponentially weighted median and MAD over
/// a history of step medians.
#[derive(Debug, Clone)]
pub struct Baseline {
    step_ms: u64,
    half_life_ms: f64,
    /// (end of step, step median)
    history: VecDeque<(u64, f64)>,
    /// The step being filled: its start and samples.
    current: Option<(u64, Vec<f64>)>,
    /// Median and MAD as of the last closed step.
    cached: Option<(f64, f64)>,
}

impl Baseline {
    pub fn new(step: Duration, half_life: Duration) -> Self {
        Baseline {
            step_ms: (step.as_millis() as u64).max(1),
            half_life_ms: half_life.as_millis().max(1) as f64,
            history: VecDeque::new(),
            current: None,
            cached: None,
        }
    }

    /// Adds a sample taken at `now_ms`.
    pub fn add(&mut self, now_ms: u64, value: f64) {
        if !value.is_finite() {
            return;
        }
        match &mut self.current {
            Some((start, samples)) if now_ms < *start + self.step_ms => samples.push(value),
            _ => {
                if let Some((_, mut samples)) = self.current.take()
                    && let Some(m) = median(&mut samples)
                {
                    self.history.push_back((now_ms, m));
                    if self.history.len() > HISTORY {
                        self.history.pop_front();
                    }
                    self.cached = self.compute(now_ms);
                }
                self.current = Some((now_ms, vec![value]));
            }
        }
    }

    /// How long the history covers at `now_ms`.
    pub fn span_ms(&self, now_ms: u64) -> u64 {
        self.history
            .front()
            .map_or(0, |(t, _)| now_ms.saturating_sub(*t))
    }

    pub fn points(&self) -> usize {
        self.history.len()
    }

    /// The weighted median and MAD (not scaled).
    pub fn median_mad(&self) -> Option<(f64, f64)> {
        self.cached
    }

    fn compute(&self, now_ms: u64) -> Option<(f64, f64)> {
        let weight = |t: u64| (-(now_ms.saturating_sub(t) as f64) / self.half_life_ms).exp2();
        let mut points: Vec<(f64, f64)> =
            self.history.iter().map(|(t, v)| (*v, weight(*t))).collect();
        let m = weighted_median(&mut points)?;
        let mut dev: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|(t, v)| ((v - m).abs(), weight(*t)))
            .collect();
        let mad = weighted_median(&mut dev)?;
        Some((m, mad))
    }
}

/// Which way of unusual counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sides {
    /// Only above the baseline (memory, disk: lower is never a problem).
    High,
    /// Above or below (CPU, load: a service that stopped working shows
    /// as a drop).
    Both,
}

/// One figure's detector: baseline, score and persistence.
#[derive(Debug, Clone)]
pub struct Detector {
    baseline: Baseline,
    /// The smallest robust standard deviation used to score.
    floor: f64,
    sides: Sides,
    /// Consecutive samples over the threshold (while normal) or under half
    /// of it (while raised).
    run: u32,
    raised: bool,
    /// The last score and value, for the detail.
    last: Option<(f64, f64)>,
    /// The highest score since the anomaly was raised.
    peak: f64,
}

/// What a detector says about one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    /// Robust standard deviations from the median (`None` in warm-up).
    pub score: Option<f64>,
    /// Whether the figure is anomalous after this sample.
    pub raised: bool,
}

impl Detector {
    pub fn new(cfg: &ForesightConfig, floor: f64, sides: Sides) -> Self {
        Detector {
            baseline: Baseline::new(cfg.step, cfg.half_life),
            floor,
            sides,
            run: 0,
            raised: false,
            last: None,
            peak: 0.0,
        }
    }

    /// Scores `value` against the baseline as it was, then adds it.
    pub fn observe(&mut self, cfg: &ForesightConfig, now_ms: u64, value: f64) -> Verdict {
        let warm = self.baseline.span_ms(now_ms) >= cfg.warmup.as_millis() as u64
            && self.baseline.points() >= 8;
        let score = match (warm, self.baseline.median_mad()) {
            (true, Some((m, mad))) => {
                let sigma = (1.4826 * mad).max(self.floor);
                let d = match self.sides {
                    Sides::High => value - m,
                    Sides::Both => (value - m).abs(),
                };
                Some((d / sigma).max(0.0))
            }
            _ => None,
        };
        if let Some(s) = score {
            self.last = Some((s, value));
            let counts = if self.raised {
                s < cfg.threshold / 2.0
            } else {
                s >= cfg.threshold
            };
            self.run = if counts { self.run + 1 } else { 0 };
            if self.run >= cfg.persist {
                self.raised = !self.raised;
                self.run = 0;
                self.peak = 0.0;
            }
            if self.raised {
                self.peak = self.peak.max(s);
            }
        }
        self.baseline.add(now_ms, value);
        Verdict {
            score,
            raised: self.raised,
        }
    }

    pub fn raised(&self) -> bool {
        self.raised
    }

    pub fn baseline(&self) -> &Baseline {
        &self.baseline
    }

    /// The detail of the finding: score, value and baseline.
    fn detail(&self, what: &str, unit: &str) -> String {
        let (m, mad) = self.baseline.median_mad().unwrap_or((0.0, 0.0));
        let (score, value) = self.last.unwrap_or((0.0, 0.0));
        let spread = (1.4826 * mad).max(self.floor);
        if self.raised {
            format!(
                "score {score:.1}: {what} {value:.1}{unit} against a usual {m:.1}{unit} (±{spread:.1})"
            )
        } else {
            format!("score {score:.1}: {what} {value:.1}{unit}, back near its usual {m:.1}{unit}")
        }
    }
}

/// A trend estimate: the slope and its interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Units per second.
    pub slope: f64,
    pub slope_low: f64,
    pub slope_high: f64,
    /// The fitted value at the last point's time.
    pub now: f64,
}

/// The trend of `points` (seconds, value), oldest first; `None` with fewer
/// than 3 points or no spread in time.
///
/// A Theil–Sen estimate over long pairs: the slope is the median of the
/// slopes between every two points at least half the points' span apart
/// (all pairs when that leaves fewer than 10). Short pairs would see the
/// fill between two clean-ups and miss the clean-ups; long pairs average
/// over them. The interval is the 5th to 95th percentile of those slopes,
/// which widens with whatever makes the series irregular.
pub fn theil_sen(points: &[(f64, f64)]) -> Option<Trend> {
    let n = points.len();
    if n < 3 {
        return None;
    }
    let span = points[n - 1].0 - points[0].0;
    let slopes_over = |min_dt: f64| {
        let mut slopes = Vec::with_capacity(n * (n - 1) / 2);
        for i in 0..n {
            for j in i + 1..n {
                let dt = points[j].0 - points[i].0;
                if dt > 0.0 && dt >= min_dt {
                    slopes.push((points[j].1 - points[i].1) / dt);
                }
            }
        }
        slopes
    };
    let mut slopes = slopes_over(span / 2.0);
    if slopes.len() < 10 {
        slopes = slopes_over(0.0);
    }
    if slopes.is_empty() {
        return None;
    }
    slopes.sort_by(f64::total_cmp);
    let slope = median(&mut slopes)?;
    let at = |q: f64| slopes[((slopes.len() - 1) as f64 * q).round() as usize];
    let mut residual: Vec<f64> = points.iter().map(|(t, v)| v - slope * t).collect();
    let intercept = median(&mut residual)?;
    let t_last = points[n - 1].0;
    Some(Trend {
        slope,
        slope_low: at(0.05),
        slope_high: at(0.95),
        now: intercept + slope * t_last,
    })
}

/// When a resource runs out, from its trend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exhaustion {
    /// Seconds until full, on the estimated slope.
    pub eta_s: f64,
    /// On the steepest slope of the interval.
    pub eta_low_s: f64,
    /// On the gentlest (infinite when the interval reaches zero).
    pub eta_high_s: f64,
    /// Units per second.
    pub slope: f64,
}

/// When `trend` reaches `limit`; `None` unless it is significantly rising.
pub fn exhaustion(trend: &Trend, limit: f64) -> Option<Exhaustion> {
    if trend.slope <= 0.0 || trend.slope_low <= 0.0 {
        return None;
    }
    let left = (limit - trend.now).max(0.0);
    Some(Exhaustion {
        eta_s: left / trend.slope,
        eta_low_s: left / trend.slope_high,
        eta_high_s: left / trend.slope_low,
        slope: trend.slope,
    })
}

/// A resource's forecast: its points, and whether it is raised.
#[derive(Debug, Clone, Default)]
struct Forecaster {
    /// (ms, used)
    points: VecDeque<(u64, f64)>,
    limit: f64,
    last_point_ms: Option<u64>,
    /// Consecutive evaluations that would raise (while clear) or clear
    /// (while raised).
    run: u32,
    raised: Option<Status>,
    last: Option<Exhaustion>,
}

/// Evaluations in a row that raise or clear a forecast.
const FORECAST_PERSIST: u32 = 2;

impl Forecaster {
    /// Adds a sample; returns true when a point was taken (and the forecast
    /// evaluated).
    fn add(&mut self, cfg: &ForesightConfig, now_ms: u64, used: f64, limit: f64) -> bool {
        self.limit = limit;
        let step = cfg.forecast_step.as_millis() as u64;
        if self
            .last_point_ms
            .is_some_and(|t| now_ms < t.saturating_add(step))
        {
            return false;
        }
        self.last_point_ms = Some(now_ms);
        self.points.push_back((now_ms, used));
        let window = cfg.forecast_window.as_millis() as u64;
        while self
            .points
            .front()
            .is_some_and(|(t, _)| now_ms.saturating_sub(*t) > window)
        {
            self.points.pop_front();
        }
        self.evaluate(cfg, now_ms);
        true
    }

    fn estimate(&self, cfg: &ForesightConfig, now_ms: u64) -> Option<Exhaustion> {
        let span = self
            .points
            .front()
            .map_or(0, |(t, _)| now_ms.saturating_sub(*t));
        if span < cfg.forecast_min_span.as_millis() as u64 || self.points.len() < 10 {
            return None;
        }
        let fit = |from: u64| {
            let pts = thinned(self.points.iter().filter(|(t, _)| *t >= from));
            theil_sen(&pts).filter(|_| pts.len() >= 10)
        };
        // The rise goes on: over the newest half of the span fitted, and
        // over its newest quarter, the slope is at least a quarter of the
        // fitted one. A one-off jump (a restore, an image copied in) makes
        // the long pairs rise only while it sits near the middle of the
        // span, and then what follows it, the newest quarter, is flat; a
        // fill that started inside the span rises in both.
        let goes_on = |from: u64, trend: &Trend| {
            let len = now_ms.saturating_sub(from);
            let rises = |from| fit(from).is_some_and(|h| h.slope >= trend.slope / 4.0);
            rises(now_ms - len / 2) && rises(now_ms - len / 4)
        };
        let oldest = self.points.front().map_or(now_ms, |(t, _)| *t);
        let mut trend = (oldest, fit(oldest)?);
        // A fill that started inside the window: the whole window's slope
        // mixes the steady part with the rise and is too gentle until the
        // rise fills most of it. The newest `forecast_min_span` on its own
        // is taken instead when its slope is clearly steeper: its whole
        // interval above the whole window's.
        let min_span = cfg.forecast_min_span.as_millis() as u64;
        if span >= 2 * min_span {
            let from = now_ms.saturating_sub(min_span);
            if let Some(r) = fit(from).filter(|r| r.slope_low > trend.1.slope_high) {
                trend = (from, r);
            }
        }
        let e = exhaustion(&trend.1, self.limit)?;
        // Only an estimate that raises or keeps a forecast needs the check.
        if e.eta_s > 1.5 * cfg.forecast_warning.as_secs_f64() || goes_on(trend.0, &trend.1) {
            Some(e)
        } else {
            None
        }
    }

    fn evaluate(&mut self, cfg: &ForesightConfig, now_ms: u64) {
        let est = self.estimate(cfg, now_ms);
        self.last = est;
        let warn = cfg.forecast_warning.as_secs_f64();
        let want = est.and_then(|e| {
            if e.eta_s <= cfg.forecast_critical.as_secs_f64() {
                Some(Status::Critical)
            } else if e.eta_s <= warn {
                Some(Status::Warning)
            } else {
                None
            }
        });
        match self.raised {
            None => {
                self.run = if want.is_some() { self.run + 1 } else { 0 };
                if self.run >= FORECAST_PERSIST {
                    self.raised = want;
                    self.run = 0;
                }
            }
            Some(_) => {
                let clear = est.is_none_or(|e| e.eta_s > 1.5 * warn);
                self.run = if clear { self.run + 1 } else { 0 };
                if self.run >= FORECAST_PERSIST {
                    self.raised = None;
                    self.run = 0;
                } else if let Some(s) = want {
                    // Escalates (or eases) at once while raised.
                    self.raised = Some(s);
                }
            }
        }
    }
}

/// `points` (ms, value), oldest first, thinned out evenly to at most
/// [`FORECAST_POINTS`] keeping the newest, as (seconds since the first
/// kept, value).
fn thinned<'a>(points: impl DoubleEndedIterator<Item = &'a (u64, f64)> + Clone) -> Vec<(f64, f64)> {
    let n = points.clone().count();
    let every = n.div_ceil(FORECAST_POINTS).max(1);
    let mut pts: Vec<(u64, f64)> = points.rev().step_by(every).copied().collect();
    pts.reverse();
    let origin = pts.first().map_or(0, |(t, _)| *t);
    pts.into_iter()
        .map(|(t, v)| ((t - origin) as f64 / 1000.0, v))
        .collect()
}

/// Seconds as a short human figure: `45 min`, `6 h`, `3.5 d`.
pub fn human_eta(s: f64) -> String {
    if !s.is_finite() {
        return "never".to_owned();
    }
    if s < 3600.0 {
        format!("{:.0} min", (s / 60.0).max(1.0))
    } else if s < 48.0 * 3600.0 {
        let h = s / 3600.0;
        if h < 10.0 {
            format!("{h:.1} h")
        } else {
            format!("{h:.0} h")
        }
    } else {
        format!("{:.1} d", s / 86400.0)
    }
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = b.abs();
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    format!("{}{v:.1} {}", if b < 0.0 { "-" } else { "" }, UNITS[i])
}

/// A member's foresight: a detector per figure, a forecaster per disk and
/// for memory, and the certificate's expiry.
#[derive(Debug, Clone)]
pub struct Foresight {
    cfg: ForesightConfig,
    cpu: Detector,
    mem: Detector,
    load: Detector,
    disk: Detector,
    disks: BTreeMap<String, Forecaster>,
    memory: Forecaster,
    /// The certificate's expiry, seconds since the epoch.
    cert_not_after: Option<i64>,
    /// Every finding ever raised, with its latest result: a raised one
    /// stays published (passing) after it clears.
    published: BTreeMap<String, CheckResult>,
}

impl Foresight {
    pub fn new(cfg: ForesightConfig, cert_not_after: Option<i64>) -> Self {
        Foresight {
            cpu: Detector::new(&cfg, 5.0, Sides::Both),
            mem: Detector::new(&cfg, 2.0, Sides::High),
            load: Detector::new(&cfg, 0.5, Sides::Both),
            disk: Detector::new(&cfg, 1.0, Sides::High),
            disks: BTreeMap::new(),
            memory: Forecaster::default(),
            cert_not_after,
            published: BTreeMap::new(),
            cfg,
        }
    }

    /// Takes one observation made at `now_ms` (wall clock, ms since the
    /// epoch) and updates the findings.
    pub fn observe(&mut self, now_ms: u64, o: &Observation) {
        if !self.cfg.enabled {
            return;
        }
        let cfg = &self.cfg;
        let figures: [(&str, &str, &mut Detector, Option<f64>); 4] = [
            ("cpu", "%", &mut self.cpu, o.cpu_pct),
            (
                "mem",
                "%",
                &mut self.mem,
                o.mem
                    .filter(|(_, total)| *total > 0)
                    .map(|(used, total)| used as f64 * 100.0 / total as f64),
            ),
            ("load", "", &mut self.load, o.load1),
            ("disk", "%", &mut self.disk, o.fullest_disk_pct()),
        ];
        let mut found = Vec::new();
        for (name, unit, det, value) in figures {
            let Some(v) = value else { continue };
            let was = det.raised();
            det.observe(cfg, now_ms, v);
            let what = if name == "disk" { "fullest disk" } else { name };
            if det.raised() || was {
                let status = if det.raised() {
                    Status::Warning
                } else {
                    Status::Passing
                };
                found.push((
                    format!("{ANOMALY_PREFIX}{name}"),
                    CheckResult::new(status, det.detail(what, unit)),
                ));
            }
        }

        for (mount, used, total) in o.disks.iter().take(MAX_DISKS) {
            if *total == 0 {
                continue;
            }
            let f = self.disks.entry(mount.clone()).or_default();
            if f.add(cfg, now_ms, *used as f64, *total as f64)
                && let Some(r) = forecast_result(f, &format!("disk {mount}"), cfg)
            {
                found.push((format!("{FORECAST_PREFIX}disk:{mount}"), r));
            }
        }
        // Disks gone from the machine: forget them (a published finding
        // passes).
        let present: Vec<&String> = o.disks.iter().map(|d| &d.0).collect();
        self.disks.retain(|m, _| present.contains(&m));
        if let Some((used, total)) = o.mem.filter(|(_, t)| *t > 0)
            && self.memory.add(cfg, now_ms, used as f64, total as f64)
            && let Some(r) = forecast_result(&self.memory, "memory", cfg)
        {
            found.push((format!("{FORECAST_PREFIX}mem"), r));
        }
        if let Some(r) = self.cert_result(now_ms) {
            found.push((format!("{FORECAST_PREFIX}cert"), r));
        }

        for (name, result) in found {
            let said = self.published.get(&name);
            if result.status != Status::Passing || said.is_some() {
                let result = settle(said, result);
                self.published.insert(name, result);
            }
        }
        for (name, result) in self.published.iter_mut() {
            if let Some(mount) = name
                .strip_prefix(FORECAST_PREFIX)
                .and_then(|n| n.strip_prefix("disk:"))
                && !self.disks.contains_key(mount)
                && result.status != Status::Passing
            {
                *result = CheckResult::new(
                    Status::Passing,
                    format!("score 0: disk {mount} no longer mounted"),
                );
            }
        }
    }

    fn cert_result(&self, now_ms: u64) -> Option<CheckResult> {
        let not_after = self.cert_not_after?;
        let left = not_after as f64 - now_ms as f64 / 1000.0;
        let warn = self.cfg.cert_warning.as_secs_f64();
        let score = if left > 0.0 { warn / left } else { 99.0 };
        let status = if left <= self.cfg.cert_critical.as_secs_f64() {
            Status::Critical
        } else if left <= warn {
            Status::Warning
        } else {
            Status::Passing
        };
        let detail = if left <= 0.0 {
            format!("score {score:.1}: the certificate has expired")
        } else if status == Status::Passing {
            format!("score 0: the certificate expires in {}", human_eta(left))
        } else {
            format!(
                "score {score:.1}: the certificate expires in {} and was not renewed",
                human_eta(left)
            )
        };
        Some(CheckResult::new(status, detail))
    }

    /// The findings to publish as checks: every one raised since the
    /// member started, with its current result.
    pub fn checks(&self) -> &BTreeMap<String, CheckResult> {
        &self.published
    }

    /// The detectors, for tests and metrics: cpu, mem, load, disk.
    pub fn detector(&self, name: &str) -> Option<&Detector> {
        match name {
            "cpu" => Some(&self.cpu),
            "mem" => Some(&self.mem),
            "load" => Some(&self.load),
            "disk" => Some(&self.disk),
            _ => None,
        }
    }
}

fn forecast_result(f: &Forecaster, what: &str, cfg: &ForesightConfig) -> Option<CheckResult> {
    let warn = cfg.forecast_warning.as_secs_f64();
    let (status, e) = match (f.raised, f.last) {
        (None, _) => {
            return Some(CheckResult::new(
                Status::Passing,
                format!(
                    "score 0: {what} no longer forecast to run out within {}",
                    human_eta(warn)
                ),
            ));
        }
        // Raised, and this evaluation had no estimate: say what was said.
        (Some(_), None) => return None,
        (Some(s), Some(e)) => (s, e),
    };
    let score = warn / e.eta_s.max(1.0);
    let plus = (e.eta_high_s - e.eta_s).max(e.eta_s - e.eta_low_s);
    let detail = format!(
        "score {score:.1}: {what} full in ~{} (±{}) at {}/h",
        human_eta(e.eta_s),
        human_eta(plus),
        human_bytes(e.slope * 3600.0)
    );
    Some(CheckResult::new(status, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so every series is
    /// the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        /// A standard normal sample (Box–Muller).
        fn normal(&mut self) -> f64 {
            let u = self.next().max(1e-12);
            let v = self.next();
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    const SAMPLE_MS: u64 = 2_000;
    const HOUR_MS: u64 = 3_600_000;

    /// A noisy but normal CPU figure: a daily swing, Gaussian noise and a
    /// short burst now and then (a cron job), as a one-minute average
    /// smooths them.
    fn normal_cpu(rng: &mut Rng, t_ms: u64, base: f64) -> f64 {
        let day = (t_ms as f64 / (24.0 * HOUR_MS as f64)) * std::f64::consts::TAU;
        let burst = if rng.next() < 0.002 { 15.0 } else { 0.0 };
        (base + 8.0 * day.sin() + 2.5 * rng.normal() + burst).clamp(0.0, 100.0)
    }

    /// Counts how often `cpu` is raised over `hours` of `series`.
    fn raises(f: &mut Foresight, hours: u64, mut series: impl FnMut(u64) -> f64) -> usize {
        let mut raised = 0;
        let mut was = false;
        let mut t = 0;
        while t < hours * HOUR_MS {
            f.observe(
                t,
                &Observation {
                    cpu_pct: Some(series(t)),
                    ..Observation::default()
                },
            );
            let now = f.detector("cpu").unwrap().raised();
            if now && !was {
                raised += 1;
            }
            was = now;
            t += SAMPLE_MS;
        }
        raised
    }

    #[test]
    fn quiet_on_noisy_normal_data() {
        // 20 members, 24 hours each: the false-alarm rate documented in
        // docs/ARCHITECTURE.md ("Foresight").
        let mut alarms = 0;
        for seed in 1..=20u64 {
            let mut rng = Rng(seed * 7919);
            let base = 10.0 + seed as f64 * 2.0;
            let mut f = Foresight::new(ForesightConfig::default(), None);
            alarms += raises(&mut f, 24, |t| normal_cpu(&mut rng, t, base));
        }
        println!("false alarms: {alarms} in 20 member-days");
        assert_eq!(alarms, 0, "false alarms on normal data");
    }

    #[test]
    fn an_injected_jump_is_flagged_within_its_persistence_and_clears_after() {
        let mut rng = Rng(42);
        let mut f = Foresight::new(ForesightConfig::default(), None);
        // Two hours normal, then 10 minutes at 85 %, then normal again.
        let (start, end) = (2 * HOUR_MS, 2 * HOUR_MS + 600_000);
        let mut first_raised = None;
        let mut cleared = None;
        let mut t = 0;
        while t < 3 * HOUR_MS {
            let cpu = if (start..end).contains(&t) {
                85.0 + rng.normal()
            } else {
                normal_cpu(&mut rng, t, 20.0)
            };
            f.observe(
                t,
                &Observation {
                    cpu_pct: Some(cpu),
                    ..Observation::default()
                },
            );
            let raised = f.detector("cpu").unwrap().raised();
            if raised && first_raised.is_none() {
                first_raised = Some(t);
            }
            if !raised && first_raised.is_some() && cleared.is_none() {
                cleared = Some(t);
            }
            t += SAMPLE_MS;
        }
        let first = first_raised.expect("the jump is flagged");
        assert_eq!(first, start + 2 * SAMPLE_MS, "flagged on the third sample");
        let cleared = cleared.expect("the anomaly clears");
        assert!(
            cleared > end && cleared <= end + 10 * SAMPLE_MS,
            "{cleared}"
        );
        let check = &f.checks()["anomaly:cpu"];
        assert_eq!(check.status, Status::Passing);
        // It was published while raised, with its score first.
        assert!(check.detail.starts_with("score "), "{}", check.detail);
    }

    #[test]
    fn the_finding_is_a_warning_check_with_its_score_while_raised() {
        let mut f = Foresight::new(ForesightConfig::default(), None);
        let mut rng = Rng(3);
        let mut t = 0;
        while t < HOUR_MS {
            let o = Observation {
                cpu_pct: Some(normal_cpu(&mut rng, t, 15.0)),
                ..Observation::default()
            };
            f.observe(t, &o);
            t += SAMPLE_MS;
        }
        assert!(f.checks().is_empty(), "nothing published while normal");
        for _ in 0..3 {
            let o = Observation {
                cpu_pct: Some(95.0),
                ..Observation::default()
            };
            f.observe(t, &o);
            t += SAMPLE_MS;
        }
        let check = &f.checks()["anomaly:cpu"];
        assert_eq!(check.status, Status::Warning);
        let score = score_of(&check.detail).expect("a score");
        assert!(score >= 6.0, "{}", check.detail);
        assert!(check.detail.contains("cpu 95.0%"), "{}", check.detail);
        assert!(check.detail.len() <= crate::site::MAX_DETAIL_LEN);
    }

    #[test]
    fn nothing_is_scored_during_warm_up() {
        let mut f = Foresight::new(ForesightConfig::default(), None);
        let mut t = 0;
        // Ten minutes flat, then a wild swing: still warming up (30 min).
        while t < 12 * 60_000 {
            let cpu = if t < 600_000 { 5.0 } else { 99.0 };
            f.observe(
                t,
                &Observation {
                    cpu_pct: Some(cpu),
                    ..Observation::default()
                },
            );
            t += SAMPLE_MS;
        }
        assert!(f.checks().is_empty());
    }

    #[test]
    fn memory_only_counts_upwards_cpu_both_ways() {
        let cfg = ForesightConfig::default();
        let mut mem = Detector::new(&cfg, 2.0, Sides::High);
        let mut cpu = Detector::new(&cfg, 5.0, Sides::Both);
        let mut t = 0;
        while t < HOUR_MS {
            mem.observe(&cfg, t, 60.0 + (t / SAMPLE_MS % 3) as f64);
            cpu.observe(&cfg, t, 60.0 + (t / SAMPLE_MS % 3) as f64);
            t += SAMPLE_MS;
        }
        for _ in 0..5 {
            mem.observe(&cfg, t, 5.0);
            cpu.observe(&cfg, t, 5.0);
            t += SAMPLE_MS;
        }
        assert!(!mem.raised(), "less memory used is not a problem");
        assert!(cpu.raised(), "a CPU that went quiet is unusual");
    }

    #[test]
    fn a_lasting_new_level_becomes_the_baseline() {
        let cfg = ForesightConfig::default();
        let mut cpu = Detector::new(&cfg, 5.0, Sides::Both);
        let mut rng = Rng(11);
        let mut t = 0;
        while t < 2 * HOUR_MS {
            cpu.observe(&cfg, t, 20.0 + rng.normal());
            t += SAMPLE_MS;
        }
        let mut raised_at = None;
        let mut cleared_at = None;
        while t < 6 * HOUR_MS {
            cpu.observe(&cfg, t, 60.0 + rng.normal());
            if cpu.raised() && raised_at.is_none() {
                raised_at = Some(t);
            }
            if !cpu.raised() && raised_at.is_some() && cleared_at.is_none() {
                cleared_at = Some(t);
            }
            t += SAMPLE_MS;
        }
        let took = cleared_at.expect("the new level is accepted") - raised_at.unwrap();
        // Within about one half-life (1 h) and a bit.
        assert!(took <= 90 * 60_000, "{took} ms");
    }

    #[test]
    fn theil_sen_finds_the_slope_of_a_line_and_ignores_outliers() {
        let mut pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        let t = theil_sen(&pts).unwrap();
        assert!((t.slope - 2.0).abs() < 1e-9);
        assert!((t.now - 101.0).abs() < 1e-9);
        // A tenth of the points far off: the slope barely moves.
        for p in pts.iter_mut().step_by(10) {
            p.1 += 500.0;
        }
        let t = theil_sen(&pts).unwrap();
        assert!((t.slope - 2.0).abs() < 0.05, "{t:?}");
        assert!(t.slope_low <= t.slope && t.slope <= t.slope_high);
    }

    /// A disk filling at `rate` bytes per second from `used0`, with noise
    /// and an hourly log rotation that frees a little, sampled every 2 s.
    /// Returns the first forecast raised: (time, its exhaustion), and the
    /// true time the disk fills up.
    fn fill(seed: u64, rate: f64, used0: f64, total: f64) -> (u64, Exhaustion, f64) {
        let mut rng = Rng(seed);
        let cfg = ForesightConfig::default();
        let mut f = Foresight::new(cfg, None);
        let rotation = rate * 600.0; // frees 10 minutes' worth each hour
        let used_at = |t: u64| {
            let s = t as f64 / 1000.0;
            used0 + rate * s - rotation * (t / HOUR_MS) as f64
        };
        let mut t = 0;
        loop {
            let used = used_at(t) + 20e6 * rng.normal();
            f.observe(
                t,
                &Observation {
                    disks: vec![("/var".to_owned(), used as u64, total as u64)],
                    ..Observation::default()
                },
            );
            if let Some(r) = f.checks().get("forecast:disk:/var") {
                assert_eq!(r.status, Status::Warning, "{}", r.detail);
                let e = f.disks["/var"].last.unwrap();
                // When the series itself reaches the disk's size.
                let mut full = t;
                while used_at(full) < total {
                    full += 10_000;
                }
                return (t, e, (full - t) as f64 / 1000.0);
            }
            t += SAMPLE_MS;
            assert!(t < 48 * HOUR_MS, "never forecast");
        }
    }

    #[test]
    fn a_filling_disk_is_forecast_within_its_stated_error() {
        // 100 GB disks, 40 to 55 GB used, filling at 2 to 6 GB an hour:
        // full in 8 to 30 hours. The documented error (docs/ARCHITECTURE.md,
        // "Foresight") comes from this test.
        let mut within = 0;
        let mut errors = Vec::new();
        let runs = 30;
        for seed in 1..=runs {
            let rate = (2.0 + (seed % 5) as f64) * 1e9 / 3600.0;
            let used0 = (40.0 + (seed % 4) as f64 * 5.0) * 1e9;
            let (at, e, truth) = fill(seed, rate, used0, 100e9);
            assert!(e.eta_s <= 24.0 * 3600.0);
            if (e.eta_low_s..=e.eta_high_s).contains(&truth) {
                within += 1;
            }
            errors.push((e.eta_s - truth).abs() / truth);
            assert!(at >= 2 * HOUR_MS, "not before the minimum span");
        }
        errors.sort_by(f64::total_cmp);
        let median = errors[errors.len() / 2];
        let worst = errors[errors.len() - 1];
        println!(
            "disk forecasts: {within}/{runs} within their interval; \
             error median {:.1} %, worst {:.1} %",
            median * 100.0,
            worst * 100.0
        );
        assert!(
            within * 10 >= runs * 9,
            "{within}/{runs} within the interval"
        );
        assert!(worst < 0.25, "worst relative error {worst}");
    }

    #[test]
    fn a_fill_that_starts_after_steady_hours_turns_critical_near_its_true_two_hours() {
        // Steady at 60 % for 6 hours, then 15 GB/h with an hourly clean-up
        // of a fifth of what was written (12 GB/h on average): full 3.3 h
        // after the fill starts. The whole window's slope mixes the steady
        // hours in; the newest two hours, clearly steeper, are used.
        let mut rng = Rng(11);
        let mut f = Foresight::new(ForesightConfig::default(), None);
        let total = 100e9;
        let start = 6 * HOUR_MS;
        let rate = 15e9 / 3600.0;
        let used_at = |t: u64| {
            if t < start {
                return 60e9;
            }
            let s = (t - start) as f64 / 1000.0;
            60e9 + rate * s - 0.2 * rate * 3600.0 * ((t - start) / HOUR_MS) as f64
        };
        let mut t = 0;
        let mut warned = None;
        let mut critical = None;
        while used_at(t) < total {
            let used = used_at(t) + 20e6 * rng.normal();
            f.observe(
                t,
                &Observation {
                    disks: vec![("/var".to_owned(), used as u64, total as u64)],
                    ..Observation::default()
                },
            );
            match f.checks().get("forecast:disk:/var").map(|r| r.status) {
                Some(Status::Warning) if warned.is_none() => warned = Some(t),
                Some(Status::Critical) if critical.is_none() => critical = Some(t),
                _ => {}
            }
            t += SAMPLE_MS;
        }
        let full = t;
        let (warned, critical) = (warned.expect("warned"), critical.expect("critical"));
        let min = |ms: u64| ms / 60_000;
        println!(
            "fill after steady hours: warned {} min after it started, critical {} min \
             before full",
            min(warned - start),
            min(full - critical)
        );
        // Critical is meant 2 h before full: within half an hour of it
        // (it came 38 min before full with the whole window's slope).
        assert!(full - critical >= 90 * 60_000, "{}", min(full - critical));
        assert!(full - critical <= 150 * 60_000, "{}", min(full - critical));
    }

    #[test]
    fn a_one_off_jump_on_a_steady_disk_is_never_forecast() {
        // 12 GB copied in at once (a restore, an image) on a steady disk,
        // at every phase of the forecast's evaluation: it does not
        // continue, so it is no fill.
        for offset_min in (0..120).step_by(5) {
            let mut rng = Rng(offset_min);
            let mut f = Foresight::new(ForesightConfig::default(), None);
            let jump = 6 * HOUR_MS + offset_min * 60_000;
            let mut t = 0;
            while t < 12 * HOUR_MS {
                let used = 60e9 + if t >= jump { 12e9 } else { 0.0 } + 20e6 * rng.normal();
                f.observe(
                    t,
                    &Observation {
                        disks: vec![("/srv".to_owned(), used as u64, 100e9 as u64)],
                        ..Observation::default()
                    },
                );
                // (The jump itself is an anomaly, rightly.)
                assert!(
                    !f.checks().contains_key("forecast:disk:/srv"),
                    "jump at +{offset_min} min, {} min after it: {:?}",
                    (t.saturating_sub(jump)) / 60_000,
                    f.checks()
                );
                t += SAMPLE_MS;
            }
        }
    }

    #[test]
    fn a_steady_disk_or_one_that_only_wobbles_is_never_forecast() {
        let mut rng = Rng(5);
        let mut f = Foresight::new(ForesightConfig::default(), None);
        let mut t = 0;
        while t < 12 * HOUR_MS {
            let used = 70e9 + 200e6 * rng.normal() + 1e9 * ((t / HOUR_MS) % 2) as f64;
            f.observe(
                t,
                &Observation {
                    disks: vec![("/".to_owned(), used as u64, 100e9 as u64)],
                    mem: Some(((4e9 + 1e8 * rng.normal()) as u64, 8e9 as u64)),
                    ..Observation::default()
                },
            );
            t += SAMPLE_MS;
        }
        assert!(f.checks().is_empty(), "{:?}", f.checks());
    }

    #[test]
    fn a_forecast_escalates_to_critical_and_passes_once_the_disk_is_cleaned() {
        let mut f = Foresight::new(ForesightConfig::default(), None);
        let total = 100e9;
        let rate = 5e9 / 3600.0; // 5 GB an hour
        let mut used = 30e9;
        let mut t = 0;
        let mut seen = Vec::new();
        while used < total * 0.98 {
            f.observe(
                t,
                &Observation {
                    disks: vec![("/data".to_owned(), used as u64, total as u64)],
                    ..Observation::default()
                },
            );
            if let Some(r) = f.checks().get("forecast:disk:/data")
                && seen.last() != Some(&r.status)
            {
                seen.push(r.status);
            }
            t += SAMPLE_MS;
            used += rate * SAMPLE_MS as f64 / 1000.0;
        }
        assert_eq!(seen, vec![Status::Warning, Status::Critical]);
        // Cleaned up: flat at 20 %.
        let end = t + 8 * HOUR_MS;
        while t < end {
            f.observe(
                t,
                &Observation {
                    disks: vec![("/data".to_owned(), 20e9 as u64, total as u64)],
                    ..Observation::default()
                },
            );
            t += SAMPLE_MS;
        }
        assert_eq!(f.checks()["forecast:disk:/data"].status, Status::Passing);
    }

    #[test]
    fn the_certificate_is_a_warning_then_critical_as_expiry_nears() {
        let day = 86_400_000u64;
        let not_after = (100 * day / 1000) as i64;
        let mut f = Foresight::new(ForesightConfig::default(), Some(not_after));
        f.observe(50 * day, &Observation::default());
        assert!(f.checks().is_empty());
        f.observe(90 * day, &Observation::default());
        let c = &f.checks()["forecast:cert"];
        assert_eq!(c.status, Status::Warning);
        assert!(c.detail.contains("expires in 10.0 d"), "{}", c.detail);
        f.observe(98 * day, &Observation::default());
        assert_eq!(f.checks()["forecast:cert"].status, Status::Critical);
    }

    #[test]
    fn scores_are_read_back_from_details() {
        assert_eq!(score_of("score 27.5: cpu 93%"), Some(27.5));
        assert_eq!(score_of("score 0: fine"), Some(0.0));
        assert_eq!(score_of("exit 2: broken"), None);
        assert_eq!(score_of("score NaN: x"), None);
        assert!(is_finding("anomaly:cpu") && !is_finding("web"));
    }

    #[test]
    fn a_finding_is_said_again_only_when_its_status_changes_or_its_score_rises_a_quarter() {
        let r = |status, score: f64| CheckResult::new(status, format!("score {score}: x"));
        let said = r(Status::Warning, 8.0);
        assert_eq!(settle(Some(&said), r(Status::Warning, 9.5)), said);
        assert_eq!(settle(Some(&said), r(Status::Warning, 6.5)), said);
        assert_eq!(
            settle(Some(&said), r(Status::Warning, 10.5)),
            r(Status::Warning, 10.5)
        );
        assert_eq!(settle(Some(&said), r(Status::Warning, 2.0)), said);
        assert_eq!(
            settle(Some(&said), r(Status::Critical, 8.0)),
            r(Status::Critical, 8.0)
        );
        assert_eq!(
            settle(None, r(Status::Warning, 1.0)),
            r(Status::Warning, 1.0)
        );
        // Once passing, a finding stays as it was said.
        let cleared = r(Status::Passing, 2.0);
        assert_eq!(settle(Some(&cleared), r(Status::Passing, 0.5)), cleared);
    }

    #[test]
    fn disabled_finds_nothing() {
        let cfg = ForesightConfig {
            enabled: false,
            ..ForesightConfig::default()
        };
        let mut f = Foresight::new(cfg, Some(0));
        f.observe(1_000, &Observation::default());
        assert!(f.checks().is_empty());
    }
}
