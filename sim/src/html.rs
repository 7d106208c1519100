//! `report.html`: one page per run that a person can read in any browser,
//! offline, and print.
//!
//! Everything is inline (CSS, SVG charts, tables) and nothing runs: reports
//! get archived, attached and opened on machines without network access
//! long after the run, so the page may depend on nothing but itself. It is
//! drawn from [`Report`] and [`Timeseries`] alone, and every number is
//! written with a fixed precision, so the same run gives the same bytes.
//!
//! # Layout
//! - [`render`]: the page: the verdict and key figures, charts over virtual
//!   time with the fault windows shaded, latency distributions, tables,
//!   how sites converged on each configuration change, patch rollouts, and
//!   foresight and runbooks (forecasts' lead times, anomalies flagged,
//!   false alarms, remediations and what the rails refused).
//! - [`Chart`]: an SVG line chart of several [`Line`]s (solid or dashed),
//!   shaded [`Band`]s and vertical [`Marker`]s, with axes in human [`Unit`]s.
//! - [`downsample`]: at most [`MAX_POINTS`] points a line, so a long run at
//!   fine resolution still makes a small page.
//! - [`escape`], [`bytes`], [`duration`], [`clock`]: text as the page
//!   writes it.

use std::fmt::Write as _;

use crate::report::{
    ConfigChangeOutcome, ConvergenceTimes, FaultOutcome, ForesightOutcome, Latency, Report, Spread,
    Timeseries,
};

/// The most points one line is drawn with. A chart is about a thousand
/// pixels wide, so more points add bytes but no detail.
pub const MAX_POINTS: usize = 1000;

/// Appends formatted text to a `String`. Writing to a `String` cannot fail,
/// so the `fmt::Result` carries nothing worth handling.
macro_rules! out {
    ($dst:expr, $($arg:tt)*) => {{
        let _ = write!($dst, $($arg)*);
    }};
}

/// Line colours, one per region (cycling past ten): distinct hues that stay
/// apart when printed.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

fn palette(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

/// Sites listed per configuration change; the rest are in `report.json`.
pub const MAX_SITE_ROWS: usize = 50;

/// How many regions still fit one chart; past this, each region gets its
/// own small chart, because ten pairs of overlapping lines cannot be told
/// apart.
const REGIONS_IN_ONE_CHART: usize = 4;

// ---------------------------------------------------------------------------
// Text

/// `s` with `&`, `<`, `>` and both quotes escaped, safe in text and in
/// attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// `v` with exactly `decimals` decimals. Non-finite values print as 0 and
/// `-0` as `0`, so equal pictures are equal bytes.
fn fixed(v: f64, decimals: usize) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.bytes().all(|b| b == b'0' || b == b'.') => rest.to_string(),
        _ => s,
    }
}

/// A coordinate: a tenth of a pixel is finer than any screen or printer
/// resolves at these sizes.
fn px(v: f64) -> String {
    fixed(v, 1)
}

/// `v` with `decimals` decimals and thousands separated by commas.
fn grouped(v: f64, decimals: usize) -> String {
    let s = fixed(v, decimals);
    let (sign, s) = match s.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", s.as_str()),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut o = String::from(sign);
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            o.push(',');
        }
        o.push(c);
    }
    if !frac.is_empty() {
        o.push('.');
        o.push_str(frac);
    }
    o
}

fn count(n: u64) -> String {
    grouped(n as f64, 0)
}

const BYTE_UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];

/// The binary unit `v` bytes read best in: the largest whose multiple is
/// at most `v`.
fn byte_unit(v: f64) -> usize {
    let mut k = 0;
    while k + 1 < BYTE_UNITS.len() && v >= 1024f64.powi(k as i32 + 1) {
        k += 1;
    }
    k
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `12.3 MiB`.
pub fn bytes(b: f64) -> String {
    let k = byte_unit(b.abs());
    if k == 0 {
        format!("{} B", fixed(b, 0))
    } else {
        format!("{} {}", fixed(b / 1024f64.powi(k as i32), 1), BYTE_UNITS[k])
    }
}

/// A length of time: `850 ms`, `1.25 s`, `4 s`, `12.3 s`, `4 min 05 s`,
/// `2 h 03 min`, `1 d 02 h`.
pub fn duration(s: f64) -> String {
    if !s.is_finite() {
        return "–".to_string();
    }
    if s < 0.0 {
        return format!("-{}", duration(-s));
    }
    if s < 1.0 {
        return format!("{} ms", fixed(s * 1000.0, 0));
    }
    if s < 59.95 {
        // Trailing zeros go: a sample interval reads `10 s`, not `10.00 s`.
        let f = fixed(s, if s < 10.0 { 2 } else { 1 });
        let f = f.trim_end_matches('0').trim_end_matches('.');
        return format!("{f} s");
    }
    let t = s.round() as u64;
    if t < 3600 {
        format!("{} min {:02} s", t / 60, t % 60)
    } else if t < 86_400 {
        format!("{} h {:02} min", t / 3600, t % 3600 / 60)
    } else {
        format!("{} d {:02} h", t / 86_400, t % 86_400 / 3600)
    }
}

/// A point in virtual time as `h:mm:ss` since the start of the run.
pub fn clock(s: f64) -> String {
    if !s.is_finite() {
        return "–".to_string();
    }
    let sign = if s < 0.0 { "-" } else { "" };
    let t = s.abs().round() as u64;
    format!("{sign}{}:{:02}:{:02}", t / 3600, t % 3600 / 60, t % 60)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{} {}", count(n as u64), if n == 1 { one } else { many })
}

// ---------------------------------------------------------------------------
// Downsampling

/// At most `max` points (at least 4) of `points`, in order: the first, the
/// last, and the lowest and highest of each bucket in between. Keeping the
/// extremes rather than averages means a one-sample spike (a buffer peak, a
/// dip in alive nodes) still shows.
pub fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    let max = max.max(4);
    if points.len() <= max {
        return points.to_vec();
    }
    let inner = &points[1..points.len() - 1];
    let buckets = (max - 2) / 2;
    let mut out = Vec::with_capacity(max);
    out.push(points[0]);
    for b in 0..buckets {
        let chunk = &inner[b * inner.len() / buckets..(b + 1) * inner.len() / buckets];
        if chunk.is_empty() {
            continue;
        }
        let (mut lo, mut hi) = (0, 0);
        for (i, p) in chunk.iter().enumerate() {
            if p.1 < chunk[lo].1 {
                lo = i;
            }
            if p.1 > chunk[hi].1 {
                hi = i;
            }
        }
        out.push(chunk[lo.min(hi)]);
        if lo != hi {
            out.push(chunk[lo.max(hi)]);
        }
    }
    out.push(points[points.len() - 1]);
    out
}

// ---------------------------------------------------------------------------
// Axes

/// What an axis measures, which decides its tick steps and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds, labelled in ms, s, min, h or d as the step suits.
    Seconds,
    /// Bytes, labelled in B, KiB, MiB, GiB or TiB after the largest value.
    Bytes,
    /// Things (nodes, records, relays): whole steps, thousands separated.
    Count,
    /// 0 to 100.
    Percent,
}

/// An axis after choosing its ticks.
struct Scale {
    lo: f64,
    hi: f64,
    ticks: Vec<(f64, String)>,
}

/// The smallest step of 1, 2, 2.5 or 5 times a power of ten that is at
/// least `raw`.
fn nice_step(raw: f64) -> f64 {
    if raw.is_nan() || raw <= 0.0 || raw.is_infinite() {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// Steps that read well on a clock: whole seconds, minutes and hours.
const TIME_STEPS: [f64; 18] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    10_800.0, 21_600.0, 43_200.0, 86_400.0,
];

fn time_step(raw: f64) -> f64 {
    if raw < 1.0 {
        return nice_step(raw);
    }
    TIME_STEPS
        .into_iter()
        .find(|&s| s >= raw)
        .unwrap_or_else(|| nice_step(raw / 86_400.0) * 86_400.0)
}

/// The fewest decimals (up to 6) that write `step` exactly.
fn decimals(step: f64) -> usize {
    (0..6)
        .find(|&d| {
            let s = step * 10f64.powi(d as i32);
            (s - s.round()).abs() < 1e-6 * s.abs().max(1.0)
        })
        .unwrap_or(6)
}

impl Unit {
    /// Ticks for `lo..hi` about `target` apart; with `nice`, the range
    /// widens to whole steps.
    fn scale(self, lo: f64, hi: f64, target: usize, nice: bool) -> Scale {
        let raw = (hi - lo) / target.max(1) as f64;
        // The byte unit comes from the data, before any widening, so the
        // steps are round numbers in the unit the labels use.
        let unit = 1024f64.powi(byte_unit(hi.abs().max(lo.abs())) as i32);
        let step = match self {
            Unit::Seconds => time_step(raw),
            Unit::Bytes => (nice_step(raw / unit) * unit).max(1.0),
            Unit::Count => nice_step(raw).max(1.0),
            Unit::Percent => nice_step(raw),
        };
        let (lo, hi) = if nice {
            ((lo / step).floor() * step, (hi / step).ceil() * step)
        } else {
            (lo, hi)
        };
        let first = (lo / step - 1e-9).ceil() as i64;
        let last = (hi / step + 1e-9).floor() as i64;
        let ticks = (first..=last)
            .take(60)
            .map(|k| {
                let v = k as f64 * step;
                (v, self.label(v, step, unit, hi))
            })
            .collect();
        Scale { lo, hi, ticks }
    }

    fn label(self, v: f64, step: f64, unit: f64, hi: f64) -> String {
        match self {
            Unit::Seconds => {
                if step < 1.0 && hi < 1.0 {
                    format!("{} ms", fixed(v * 1000.0, decimals(step * 1000.0)))
                } else if step < 60.0 {
                    format!("{} s", fixed(v, decimals(step)))
                } else if step < 3600.0 {
                    format!("{} min", fixed(v / 60.0, decimals(step / 60.0)))
                } else if step < 86_400.0 {
                    format!("{} h", fixed(v / 3600.0, decimals(step / 3600.0)))
                } else {
                    format!("{} d", fixed(v / 86_400.0, decimals(step / 86_400.0)))
                }
            }
            Unit::Bytes => {
                let k = byte_unit(unit);
                format!(
                    "{} {}",
                    grouped(v / unit, decimals(step / unit)),
                    BYTE_UNITS[k]
                )
            }
            Unit::Count => grouped(v, decimals(step)),
            Unit::Percent => format!("{}%", fixed(v, decimals(step))),
        }
    }
}

/// The smallest and largest finite value, if any.
fn extent(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((a, b)) => Some((a.min(v), b.max(v))),
        })
}

// ---------------------------------------------------------------------------
// Charts

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    /// A CSS colour.
    pub colour: String,
    pub dashed: bool,
    /// `(x, y)` in the axes' units; non-finite points are left out.
    pub points: Vec<(f64, f64)>,
}

impl Line {
    pub fn new(name: impl Into<String>, colour: &str, points: Vec<(f64, f64)>) -> Line {
        Line {
            name: name.into(),
            colour: colour.to_string(),
            dashed: false,
            points,
        }
    }

    pub fn dashed(mut self) -> Line {
        self.dashed = true;
        self
    }
}

/// A shaded stretch of the x axis, such as a fault's window.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub from: f64,
    pub to: f64,
    /// Written above the band when there is room.
    pub label: String,
    pub colour: String,
    /// Shown on hover, and the only text when the label does not fit.
    pub detail: String,
}

/// A vertical line at `x`, with a dot where it meets the curve at `y`.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub y: Option<f64>,
    pub label: String,
    pub colour: String,
}

/// An SVG line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_unit: Unit,
    /// Written under the x axis.
    pub x_label: String,
    pub y_unit: Unit,
    pub lines: Vec<Line>,
    pub bands: Vec<Band>,
    pub markers: Vec<Marker>,
    /// Size in CSS pixels; the chart scales down to narrower pages.
    pub width: f64,
    pub height: f64,
    /// The x range; by default the data's.
    pub x_range: Option<(f64, f64)>,
    /// The y range; by default the data's, widened to include 0.
    pub y_range: Option<(f64, f64)>,
    /// Widen the x range to whole tick steps (the y range always is).
    pub x_nice: bool,
    /// List the lines under the chart.
    pub legend: bool,
    /// Write band labels above the plot; small charts next to a labelled
    /// one leave them out and keep only the shading.
    pub band_labels: bool,
}

/// Room for the y labels on the left, the x labels and axis title below.
const MARGIN_LEFT: f64 = 84.0;
const MARGIN_RIGHT: f64 = 22.0;
const MARGIN_BOTTOM: f64 = 42.0;
/// Height of one row of band labels above the plot.
const LABEL_ROW: f64 = 13.0;
/// Band labels stack in at most this many rows; one that fits none keeps
/// only its hover text.
const LABEL_ROWS: usize = 3;
/// Space between the top of the y range and the top of the plot, so that a
/// line at its maximum (all nodes alive) does not merge with the edge.
const HEADROOM: f64 = 8.0;

impl Chart {
    pub fn new(title: impl Into<String>, x_unit: Unit, y_unit: Unit) -> Chart {
        Chart {
            title: title.into(),
            x_unit,
            x_label: String::new(),
            y_unit,
            lines: Vec::new(),
            bands: Vec::new(),
            markers: Vec::new(),
            width: 960.0,
            height: 300.0,
            x_range: None,
            y_range: None,
            x_nice: false,
            legend: true,
            band_labels: true,
        }
    }

    pub fn line(mut self, line: Line) -> Chart {
        self.lines.push(line);
        self
    }

    /// The chart as a `<figure>`: caption, SVG and legend.
    pub fn to_html(&self) -> String {
        let mut s = String::new();
        out!(
            s,
            "<figure>\n<figcaption>{}</figcaption>\n",
            escape(&self.title)
        );
        s.push_str(&self.svg());
        if self.legend {
            s.push_str(&legend(
                self.lines
                    .iter()
                    .filter(|l| l.points.iter().any(|p| p.0.is_finite() && p.1.is_finite()))
                    .map(|l| (l.name.as_str(), l.colour.as_str(), l.dashed)),
            ));
        }
        s.push_str("</figure>\n");
        s
    }

    /// The chart alone: one `<path>` per line that has points, and no
    /// other paths.
    pub fn svg(&self) -> String {
        let (w, h) = (self.width.max(200.0), self.height.max(120.0));
        let lines: Vec<(&Line, Vec<(f64, f64)>)> = self
            .lines
            .iter()
            .map(|l| {
                let pts = l
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
                    .collect();
                (l, pts)
            })
            .filter(|(_, pts): &(&Line, Vec<(f64, f64)>)| !pts.is_empty())
            .collect();

        let (mut xlo, mut xhi) = self
            .x_range
            .or_else(|| extent(lines.iter().flat_map(|(_, p)| p.iter().map(|p| p.0))))
            .unwrap_or((0.0, 1.0));
        if !(xlo.is_finite() && xhi.is_finite()) {
            (xlo, xhi) = (0.0, 1.0);
        }
        if xhi <= xlo {
            xhi = xlo + 1.0;
        }
        let (mut ylo, mut yhi) = self.y_range.unwrap_or_else(|| {
            let (a, b) =
                extent(lines.iter().flat_map(|(_, p)| p.iter().map(|p| p.1))).unwrap_or((0.0, 1.0));
            (a.min(0.0), b)
        });
        if !(ylo.is_finite() && yhi.is_finite()) {
            (ylo, yhi) = (0.0, 1.0);
        }
        if yhi <= ylo {
            yhi = ylo + 1.0;
        }

        let pw = w - MARGIN_LEFT - MARGIN_RIGHT;
        let x_target = ((pw / 95.0).round() as usize).clamp(2, 12);
        let xs = self.x_unit.scale(xlo, xhi, x_target, self.x_nice);
        let sx = |x: f64| MARGIN_LEFT + (x - xs.lo) / (xs.hi - xs.lo) * pw;

        // Bands, clipped to the plot, and the row each label goes in.
        let mut bands = Vec::new();
        let mut row_end = [f64::NEG_INFINITY; LABEL_ROWS];
        let mut order: Vec<usize> = (0..self.bands.len()).collect();
        order.sort_by(|&a, &b| self.bands[a].from.total_cmp(&self.bands[b].from));
        for i in order {
            let b = &self.bands[i];
            if !(b.from.is_finite() && b.to.is_finite()) || b.to < xs.lo || b.from > xs.hi {
                continue;
            }
            let x0 = sx(b.from.max(xs.lo));
            let x1 = sx(b.to.min(xs.hi)).max(x0 + 1.0);
            let label_w = 6.2 * b.label.chars().count() as f64 + 6.0;
            let lx = (x0 + 2.0).min(w - MARGIN_RIGHT - label_w).max(MARGIN_LEFT);
            let row = (0..LABEL_ROWS).find(|&r| self.band_labels && row_end[r] <= lx);
            if let Some(r) = row {
                row_end[r] = lx + label_w;
            }
            bands.push((b, x0, x1, lx, row));
        }
        let rows = bands.iter().filter_map(|b| b.4).max().map_or(0, |r| r + 1);
        let top = 10.0 + LABEL_ROW * rows as f64;
        let ph = h - top - MARGIN_BOTTOM;
        let y_target = ((ph / 45.0).round() as usize).clamp(2, 10);
        let ys = self.y_unit.scale(ylo, yhi, y_target, true);
        let sy = |y: f64| top + ph - (y - ys.lo) / (ys.hi - ys.lo) * (ph - HEADROOM);
        let bottom = top + ph;

        let mut s = String::new();
        out!(
            s,
            "<svg class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" \
             role=\"img\" aria-label=\"{t}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <title>{t}</title>\n",
            w = px(w),
            h = px(h),
            t = escape(&self.title)
        );

        for (b, x0, x1, lx, row) in &bands {
            out!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\" fill-opacity=\"0.16\">\
                 <title>{}</title></rect>\n",
                px(*x0),
                px(top),
                px(x1 - x0),
                px(ph),
                escape(&b.colour),
                escape(&b.detail)
            );
            if let Some(r) = row {
                let ly = top - 4.0 - LABEL_ROW * (rows - 1 - r) as f64;
                out!(
                    s,
                    "<text x=\"{}\" y=\"{}\" font-size=\"10\" fill=\"#333\">\
                     <tspan fill=\"{}\">\u{25A0}</tspan> {}</text>\n",
                    px(*lx),
                    px(ly),
                    escape(&b.colour),
                    escape(&b.label)
                );
            }
        }

        for (v, label) in &ys.ticks {
            let y = px(sy(*v));
            out!(
                s,
                "<line x1=\"{l}\" x2=\"{r}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#e3e3e3\"/>\
                 <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" fill=\"#444\">{label}</text>\n",
                l = px(MARGIN_LEFT),
                r = px(MARGIN_LEFT + pw),
                tx = px(MARGIN_LEFT - 6.0),
                ty = px(sy(*v) + 4.0),
                label = escape(label)
            );
        }
        for (v, label) in &xs.ticks {
            let x = px(sx(*v));
            out!(
                s,
                "<line x1=\"{x}\" x2=\"{x}\" y1=\"{t}\" y2=\"{b}\" stroke=\"#efefef\"/>\
                 <line x1=\"{x}\" x2=\"{x}\" y1=\"{b}\" y2=\"{b5}\" stroke=\"#666\"/>\
                 <text x=\"{x}\" y=\"{ty}\" text-anchor=\"middle\" fill=\"#444\">{label}</text>\n",
                t = px(top),
                b = px(bottom),
                b5 = px(bottom + 5.0),
                ty = px(bottom + 17.0),
                label = escape(label)
            );
        }
        out!(
            s,
            "<line x1=\"{l}\" x2=\"{l}\" y1=\"{t}\" y2=\"{b}\" stroke=\"#666\"/>\
             <line x1=\"{l}\" x2=\"{r}\" y1=\"{b}\" y2=\"{b}\" stroke=\"#666\"/>\n",
            l = px(MARGIN_LEFT),
            r = px(MARGIN_LEFT + pw),
            t = px(top),
            b = px(bottom)
        );
        if !self.x_label.is_empty() {
            out!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#444\">{}</text>\n",
                px(MARGIN_LEFT + pw / 2.0),
                px(h - 6.0),
                escape(&self.x_label)
            );
        }

        let max_points = MAX_POINTS.min((2.0 * pw) as usize);
        for (line, pts) in &lines {
            let pts = downsample(pts, max_points);
            let dash = if line.dashed {
                " stroke-dasharray=\"6 4\""
            } else {
                ""
            };
            out!(
                s,
                "<path d=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.8\" \
                 stroke-linejoin=\"round\" stroke-linecap=\"round\"{dash}><title>{}</title></path>\n",
                path_data(&pts, &sx, &sy),
                escape(&line.colour),
                escape(&line.name)
            );
        }

        for (i, m) in self.markers.iter().enumerate() {
            if !m.x.is_finite() || m.x < xs.lo || m.x > xs.hi {
                continue;
            }
            let x = sx(m.x);
            out!(
                s,
                "<line x1=\"{x}\" x2=\"{x}\" y1=\"{t}\" y2=\"{b}\" stroke=\"{c}\" stroke-dasharray=\"3 3\"/>\n",
                x = px(x),
                t = px(top),
                b = px(bottom),
                c = escape(&m.colour)
            );
            if let Some(y) = m.y.filter(|y| y.is_finite() && *y >= ys.lo && *y <= ys.hi) {
                out!(
                    s,
                    "<circle cx=\"{}\" cy=\"{}\" r=\"3.5\" fill=\"{}\"/>\n",
                    px(x),
                    px(sy(y)),
                    escape(&m.colour)
                );
            }
            // Labels go right of the line unless that runs off the chart,
            // one row apart so that close markers stay legible.
            let label_w = 6.2 * m.label.chars().count() as f64;
            let (lx, anchor) = if x + 5.0 + label_w > w - MARGIN_RIGHT {
                (x - 5.0, "end")
            } else {
                (x + 5.0, "start")
            };
            out!(
                s,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" fill=\"{}\">{}</text>\n",
                px(lx),
                px(top + 14.0 + 14.0 * i as f64),
                escape(&m.colour),
                escape(&m.label)
            );
        }

        s.push_str("</svg>\n");
        s
    }
}

/// SVG path data through `pts`. Repeated points and the inner points of
/// level runs are left out: they change nothing drawn, and counts such as
/// alive nodes are level most of the time.
fn path_data(pts: &[(f64, f64)], sx: &impl Fn(f64) -> f64, sy: &impl Fn(f64) -> f64) -> String {
    let pts: Vec<(String, String)> = pts.iter().map(|&(x, y)| (px(sx(x)), px(sy(y)))).collect();
    let mut d = String::new();
    let mut last: Option<&(String, String)> = None;
    for (i, p) in pts.iter().enumerate() {
        if last == Some(p) {
            continue;
        }
        let level = i > 0 && i + 1 < pts.len() && pts[i - 1].1 == p.1 && pts[i + 1].1 == p.1;
        if level && last.is_some() {
            continue;
        }
        out!(
            d,
            "{}{} {}",
            if last.is_none() { "M" } else { "L" },
            p.0,
            p.1
        );
        last = Some(p);
    }
    if pts.len() == 1 {
        // A lone sample: a short stub with round caps shows as a dot.
        d.push_str("h0.1");
    }
    d
}

/// A legend: a swatch of each line's colour and dash, and its name.
fn legend<'a>(entries: impl Iterator<Item = (&'a str, &'a str, bool)>) -> String {
    let mut s = String::from("<div class=\"legend\">");
    let mut any = false;
    for (name, colour, dashed) in entries {
        any = true;
        out!(
            s,
            "<span><svg width=\"28\" height=\"10\" aria-hidden=\"true\"><line x1=\"1\" y1=\"5\" x2=\"27\" y2=\"5\" \
             stroke=\"{}\" stroke-width=\"2.2\"{}/></svg>{}</span>",
            escape(colour),
            if dashed {
                " stroke-dasharray=\"5 3\""
            } else {
                ""
            },
            escape(name)
        );
    }
    s.push_str("</div>\n");
    if any { s } else { String::new() }
}

// ---------------------------------------------------------------------------
// The page

/// The whole `report.html` page for a run.
pub fn render(report: &Report, series: &Timeseries) -> String {
    let title = if report.scenario.is_empty() {
        "Trellis simulation".to_string()
    } else {
        format!("Trellis simulation: {}", report.scenario)
    };
    let mut page = String::with_capacity(128 * 1024);
    out!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n",
        escape(&title)
    );
    header(&mut page, report, &title);
    page.push_str(
        "<nav><a href=\"#time\">Over time</a> · <a href=\"#latency\">Latency</a> · \
         <a href=\"#faults\">Faults</a> · ",
    );
    if !report.config_changes.is_empty() {
        page.push_str("<a href=\"#config\">Config</a> · ");
    }
    if !report.rollouts.is_empty() {
        page.push_str("<a href=\"#patches\">Patches</a> · ");
    }
    if report.foresight.is_some() {
        page.push_str("<a href=\"#foresight\">Foresight</a> · ");
    }
    page.push_str(
        "<a href=\"#traffic\">Traffic</a> · \
         <a href=\"#buffers\">Buffers</a> · <a href=\"#detection\">Detection</a> · \
         <a href=\"#records\">Records</a></nav>\n",
    );
    time_charts(&mut page, report, series);
    latency_charts(&mut page, report);
    faults_table(&mut page, report);
    config_section(&mut page, report);
    rollouts_section(&mut page, report);
    foresight_section(&mut page, report);
    traffic_table(&mut page, report);
    buffers_tables(&mut page, report);
    detection_table(&mut page, report);
    records_table(&mut page, report);
    page.push_str("</body>\n</html>\n");
    page
}

/// Screen and print styles. Print keeps the shading (browsers drop
/// backgrounds by default) and keeps each chart and table on one sheet.
const STYLE: &str = "\
body { font: 14px/1.45 system-ui, -apple-system, \"Segoe UI\", Roboto, Helvetica, Arial, sans-serif;
  color: #222; background: #fff; max-width: 1000px; margin: 0 auto; padding: 20px 24px 60px; }
h1 { font-size: 24px; margin: 8px 0 12px; }
h2 { font-size: 19px; margin: 34px 0 8px; padding-bottom: 4px; border-bottom: 2px solid #ddd; }
h3 { font-size: 15px; margin: 22px 0 4px; }
p.note { color: #555; margin: 4px 0 8px; }
nav { margin: 14px 0; color: #888; }
nav a { color: #1a5fb4; text-decoration: none; }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
.verdict { padding: 12px 16px; border-left: 8px solid; border-radius: 4px; margin: 10px 0 14px; font-size: 16px; }
.verdict strong { font-size: 22px; letter-spacing: 1px; margin-right: 8px; }
.verdict ul { margin: 6px 0 0; font-size: 14px; }
.pass { background: #e6f4ea; border-color: #1e8e3e; }
.pass strong { color: #137333; }
.fail { background: #fce8e6; border-color: #d93025; }
.fail strong { color: #b31412; }
.tiles { display: flex; flex-wrap: wrap; gap: 10px; margin: 12px 0; }
.tile { border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 118px; flex: 1 1 118px; }
.tile .k { color: #555; font-size: 12.5px; }
.tile .v { font-size: 22px; font-weight: 600; font-variant-numeric: tabular-nums; }
.tile .n { color: #666; font-size: 12px; }
.tile.bad { border-color: #d93025; background: #fce8e6; }
.tile.bad .v { color: #b31412; }
.tile.good .v { color: #137333; }
.tile.warn { border-color: #e37400; background: #fef7e0; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.meta dt { color: #555; }
dl.meta dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e2e2e2; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num, th.num { text-align: right; white-space: nowrap; }
td.bad { color: #b31412; font-weight: 600; }
td.names { font-size: 12.5px; color: #444; max-width: 420px; }
td.kind, .nw { white-space: nowrap; }
figure { margin: 16px 0 8px; }
figcaption { font-weight: 600; margin-bottom: 2px; }
svg.chart { max-width: 100%; height: auto; display: block; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 16px; font-size: 12.5px; color: #333; margin: 2px 0 0 84px; }
.legend span { display: inline-flex; align-items: center; gap: 5px; }
.key { font-size: 12.5px; color: #444; }
.key span { display: inline-block; margin-right: 12px; }
.key i { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; opacity: 0.45; }
.panels { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 0 18px; }
.panels figure { margin: 8px 0; }
.panels .legend { margin-left: 0; }
@page { margin: 14mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 12px; }
  nav { display: none; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  figure, table, .verdict, .tiles, .panels figure { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
}
";

fn header(page: &mut String, r: &Report, title: &str) {
    out!(page, "<header>\n<h1>{}</h1>\n", escape(title));
    if r.violations.is_empty() {
        page.push_str(
            "<div class=\"verdict pass\"><strong>PASS</strong>every invariant held.</div>\n",
        );
    } else {
        out!(
            page,
            "<div class=\"verdict fail\"><strong>FAIL</strong>{} violated:<ul>\n",
            plural(r.violations.len(), "invariant", "invariants")
        );
        for v in &r.violations {
            out!(page, "<li>{}</li>\n", escape(v));
        }
        page.push_str("</ul></div>\n");
    }

    let rec = &r.records;
    page.push_str("<div class=\"tiles\">\n");
    tile(
        page,
        "Records lost",
        &count(rec.lost),
        "must be 0",
        if rec.lost == 0 { Mood::Good } else { Mood::Bad },
    );
    tile(
        page,
        "Duplicates applied",
        &count(rec.duplicates_applied),
        "must be 0",
        if rec.duplicates_applied == 0 {
            Mood::Good
        } else {
            Mood::Bad
        },
    );
    tile(
        page,
        "Records delivered",
        &count(rec.delivered),
        &format!("of {} persisted", count(rec.persisted)),
        Mood::Plain,
    );
    let det = &r.detection;
    tile(
        page,
        "Detection p99",
        &if det.latency.count == 0 {
            "–".to_string()
        } else {
            duration(det.latency.p99_s)
        },
        &format!(
            "{}, {} undetected",
            plural(det.latency.count as usize, "crash", "crashes"),
            count(det.undetected)
        ),
        if det.undetected == 0 {
            Mood::Plain
        } else {
            Mood::Warn
        },
    );
    let converged = r
        .faults
        .iter()
        .filter(|f| f.converged_after_s.is_some())
        .count();
    tile(
        page,
        "Faults converged",
        &format!(
            "{} / {}",
            count(converged as u64),
            count(r.faults.len() as u64)
        ),
        "settled before the end",
        if converged == r.faults.len() {
            Mood::Plain
        } else {
            Mood::Warn
        },
    );
    tile(
        page,
        "Largest relay buffer",
        &bytes(r.buffers.peak_bytes_max as f64),
        "peak of any relay",
        Mood::Plain,
    );
    if let Some(c) = r.config_changes.last() {
        tile(
            page,
            "Sites on the last config",
            &format!("{} / {}", count(c.converged), count(c.sites)),
            &if c.all.count == 0 {
                format!("version {}", c.version)
            } else {
                format!("version {}, p99 {}", c.version, duration(c.all.p99_s))
            },
            if c.converged == c.sites {
                Mood::Plain
            } else {
                Mood::Warn
            },
        );
    }
    if let Some(f) = &r.foresight
        && let Some(worst) = f.runbooks.iter().max_by_key(|b| {
            (
                i64::from(b.max_concurrent) - i64::from(b.max_per_site),
                b.max_concurrent,
            )
        })
    {
        let over = worst.max_concurrent > worst.max_per_site;
        tile(
            page,
            "Remediating at once",
            &format!("{} / {}", worst.max_concurrent, worst.max_per_site),
            &format!("most at a site / max_per_site ({})", worst.name),
            if over { Mood::Bad } else { Mood::Good },
        );
    }
    page.push_str("</div>\n");

    page.push_str("<dl class=\"meta\">\n");
    let mut meta = |k: &str, v: String| {
        out!(page, "<dt>{}</dt><dd>{}</dd>\n", k, v);
    };
    meta("Scenario", escape(&r.scenario));
    meta("Seed", format!("<span class=\"mono\">{}</span>", r.seed));
    meta(
        "Scenario SHA-256",
        format!("<span class=\"mono\">{}</span>", escape(&r.scenario_sha256)),
    );
    meta(
        "Virtual time",
        format!(
            "{} ({} s)",
            duration(r.virtual_seconds),
            grouped(r.virtual_seconds, 1)
        ),
    );
    let mut topo = format!(
        "{} · {} · {} · {}",
        plural(r.regions as usize, "region", "regions"),
        plural(r.sites as usize, "site", "sites"),
        plural(r.nodes as usize, "node", "nodes"),
        plural(r.hubs as usize, "hub", "hubs"),
    );
    if r.real_gossip_sites > 0 {
        out!(
            topo,
            " ({} on real chitchat)",
            plural(r.real_gossip_sites as usize, "site", "sites")
        );
    }
    meta("Topology", topo);
    meta("Events processed", count(r.events));
    page.push_str("</dl>\n</header>\n");
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mood {
    Plain,
    Good,
    Warn,
    Bad,
}

fn tile(page: &mut String, key: &str, value: &str, note: &str, mood: Mood) {
    let class = match mood {
        Mood::Plain => "tile",
        Mood::Good => "tile good",
        Mood::Warn => "tile warn",
        Mood::Bad => "tile bad",
    };
    out!(
        page,
        "<div class=\"{class}\"><div class=\"k\">{}</div><div class=\"v\">{}</div>\
         <div class=\"n\">{}</div></div>\n",
        escape(key),
        escape(value),
        escape(note)
    );
}

/// A shading colour per fault kind. Kinds are matched loosely
/// (`wan_outage`, `WanOutage`) so the page does not depend on how the
/// kind was spelled into the report.
fn fault_colour(kind: &str) -> &'static str {
    let k: String = kind
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match k.as_str() {
        "wanoutage" => "#d62728",
        "hubpartition" => "#9467bd",
        "hubcrash" => "#8c564b",
        "relaycrash" => "#ff7f0e",
        "nodecrash" => "#bcbd22",
        "lossstorm" => "#17becf",
        "diskfull" => "#1f77b4",
        _ => "#888888",
    }
}

/// The targets of a fault: the names listed, and how many more there were.
fn targets(f: &FaultOutcome) -> String {
    let mut s = f.named.join(", ");
    let more = f.targets.saturating_sub(f.named.len() as u64);
    if more > 0 {
        out!(
            s,
            "{}… and {} more",
            if s.is_empty() { "" } else { " " },
            count(more)
        );
    }
    s
}

/// [`targets`] for a table cell: a name never breaks at its hyphens.
fn targets_html(f: &FaultOutcome) -> String {
    let s: Vec<String> = f
        .named
        .iter()
        .map(|n| format!("<span class=\"nw\">{}</span>", escape(n)))
        .collect();
    let mut s = s.join(", ");
    let more = f.targets.saturating_sub(f.named.len() as u64);
    if more > 0 {
        out!(s, " … and {} more", count(more));
    }
    s
}

fn fault_bands(faults: &[FaultOutcome]) -> Vec<Band> {
    faults
        .iter()
        .map(|f| Band {
            from: f.at_s,
            to: f.healed_s,
            label: f.kind.clone(),
            colour: fault_colour(&f.kind).to_string(),
            detail: format!(
                "{} {}–{}: {}",
                f.kind,
                clock(f.at_s),
                clock(f.healed_s),
                targets(f)
            ),
        })
        .collect()
}

/// The time series by column name, paired with `t_s`.
struct Columns<'a> {
    series: &'a Timeseries,
    t: usize,
    range: (f64, f64),
}

impl<'a> Columns<'a> {
    fn new(series: &'a Timeseries) -> Option<Self> {
        let t = series.columns.iter().position(|c| c == "t_s")?;
        let (lo, hi) = extent(series.rows.iter().filter_map(|r| r.get(t).copied()))?;
        Some(Columns {
            series,
            t,
            range: (lo.min(0.0), hi),
        })
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.series.columns.iter().position(|c| c == name)
    }

    fn points(&self, name: &str) -> Option<Vec<(f64, f64)>> {
        let i = self.index(name)?;
        Some(
            self.series
                .rows
                .iter()
                .filter_map(|r| Some((*r.get(self.t)?, *r.get(i)?)))
                .collect(),
        )
    }

    /// The sum over `names` at each sample, if any of them is present.
    fn sum(&self, names: &[String]) -> Option<Vec<(f64, f64)>> {
        let idx: Vec<usize> = names.iter().filter_map(|n| self.index(n)).collect();
        if idx.is_empty() {
            return None;
        }
        Some(
            self.series
                .rows
                .iter()
                .filter_map(|r| {
                    let t = *r.get(self.t)?;
                    Some((t, idx.iter().filter_map(|&i| r.get(i)).sum()))
                })
                .collect(),
        )
    }

    /// Regions, in column order, that have an `alive:` or `seen_alive:`
    /// column.
    fn regions(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.series.columns {
            let r = c
                .strip_prefix("alive:")
                .or_else(|| c.strip_prefix("seen_alive:"));
            if let Some(r) = r
                && !out.iter().any(|o| o == r)
            {
                out.push(r.to_string());
            }
        }
        out
    }

    /// The typical time between samples: the median step.
    fn interval(&self) -> Option<f64> {
        let ts: Vec<f64> = self
            .series
            .rows
            .iter()
            .filter_map(|r| r.get(self.t).copied())
            .collect();
        let mut steps: Vec<f64> = ts
            .windows(2)
            .map(|w| w[1] - w[0])
            .filter(|d| d.is_finite() && *d > 0.0)
            .collect();
        steps.sort_by(f64::total_cmp);
        steps.get(steps.len() / 2).copied()
    }

    /// An empty chart over the run's time axis, with the fault windows.
    fn chart(&self, title: &str, y: Unit, bands: &[Band]) -> Chart {
        let mut c = Chart::new(title, Unit::Seconds, y);
        c.x_label = "virtual time".to_string();
        c.x_range = Some(self.range);
        c.bands = bands.to_vec();
        c
    }
}

/// Adds `Line::new(name, colour, column)` if the column exists.
fn with_column(chart: &mut Chart, cols: &Columns, column: &str, name: &str, colour: &str) {
    if let Some(p) = cols.points(column) {
        chart.lines.push(Line::new(name, colour, p));
    }
}

fn time_charts(page: &mut String, r: &Report, series: &Timeseries) {
    page.push_str("<section id=\"time\">\n<h2>Over virtual time</h2>\n");
    let Some(cols) = Columns::new(series) else {
        page.push_str(
            "<p class=\"note\">No time series was recorded for this run.</p>\n</section>\n",
        );
        return;
    };
    let bands = fault_bands(&r.faults);
    fault_key(page, &r.faults);

    alive_charts(page, &cols, &bands);

    let mut config = cols.chart(
        "Running nodes that have applied the newest configuration change",
        Unit::Count,
        &bands,
    );
    with_column(
        &mut config,
        &cols,
        Timeseries::CONFIG_CURRENT,
        "nodes on the newest version",
        palette(2),
    );
    if !config.lines.is_empty() {
        config.markers = r
            .config_changes
            .iter()
            .map(|c| Marker {
                x: c.at_s,
                y: None,
                label: format!("v{}", c.version),
                colour: "#137333".to_string(),
            })
            .collect();
        page.push_str("<h3>Configuration</h3>\n");
        page.push_str(&config.to_html());
    }

    let mut patched = cols.chart("Nodes with a patch installed", Unit::Count, &bands);
    with_column(
        &mut patched,
        &cols,
        Timeseries::PATCH_INSTALLED,
        "nodes patched",
        palette(3),
    );
    if !patched.lines.is_empty() {
        patched.markers = r
            .rollouts
            .iter()
            .map(|ro| Marker {
                x: ro.at_s,
                y: None,
                label: ro.patch.clone(),
                colour: "#1a5fb4".to_string(),
            })
            .collect();
        page.push_str("<h3>Patches</h3>\n");
        page.push_str(&patched.to_html());
    }

    let mut fs = cols.chart(
        "Modelled disks full, and nodes remediating",
        Unit::Count,
        &bands,
    );
    with_column(
        &mut fs,
        &cols,
        Timeseries::DISKS_FULL,
        "disks full",
        palette(3),
    );
    with_column(
        &mut fs,
        &cols,
        Timeseries::REMEDIATING,
        "nodes remediating",
        palette(2),
    );
    if !fs.lines.is_empty() {
        page.push_str("<h3>Foresight and runbooks</h3>\n");
        page.push_str(&fs.to_html());
    }

    let mut hub = cols.chart(
        "Relays connected and sites unreachable, as a hub reports them",
        Unit::Count,
        &bands,
    );
    with_column(
        &mut hub,
        &cols,
        "relays_connected",
        "relays connected",
        palette(0),
    );
    with_column(
        &mut hub,
        &cols,
        "sites_unreachable",
        "sites unreachable",
        palette(3),
    );
    if !hub.lines.is_empty() {
        page.push_str("<h3>The hub's view of the sites</h3>\n");
        page.push_str(&hub.to_html());
    }

    let mut records = cols.chart(
        "Records not yet acknowledged, summed over relays",
        Unit::Count,
        &bands,
    );
    with_column(
        &mut records,
        &cols,
        "buffer_records",
        "records buffered",
        palette(4),
    );
    let mut buf_bytes = cols.chart("Relay buffer bytes", Unit::Bytes, &bands);
    with_column(
        &mut buf_bytes,
        &cols,
        "buffer_bytes",
        "all relays",
        palette(4),
    );
    with_column(
        &mut buf_bytes,
        &cols,
        "buffer_bytes_max",
        "largest single relay",
        palette(1),
    );
    if !records.lines.is_empty() || !buf_bytes.lines.is_empty() {
        page.push_str("<h3>Relay outage buffers</h3>\n");
        for c in [records, buf_bytes] {
            if !c.lines.is_empty() {
                page.push_str(&c.to_html());
            }
        }
    }

    let per = cols.interval().map_or_else(
        || "sample interval".to_string(),
        |i| format!("{} interval", duration(i)),
    );
    let mut wan = cols.chart(
        &format!("WAN and hub-to-hub bytes per {per}"),
        Unit::Bytes,
        &bands,
    );
    with_column(
        &mut wan,
        &cols,
        "wan_bytes",
        "WAN (relay ↔ hub)",
        palette(0),
    );
    with_column(&mut wan, &cols, "hub_bytes", "hub ↔ hub", palette(3));
    // LAN traffic is usually far larger than WAN; on one axis it would
    // flatten the WAN line, so it gets its own chart.
    let mut lan = cols.chart(
        &format!("LAN bytes per {per}, inside sites"),
        Unit::Bytes,
        &bands,
    );
    with_column(
        &mut lan,
        &cols,
        "lan_bytes",
        "LAN (gossip inside sites)",
        palette(2),
    );
    if !wan.lines.is_empty() || !lan.lines.is_empty() {
        page.push_str("<h3>Traffic</h3>\n");
        for c in [wan, lan] {
            if !c.lines.is_empty() {
                page.push_str(&c.to_html());
            }
        }
    }
    page.push_str("</section>\n");
}

/// What the shading means: one swatch per fault kind in the run.
fn fault_key(page: &mut String, faults: &[FaultOutcome]) {
    let mut kinds: Vec<&str> = Vec::new();
    for f in faults {
        if !kinds.contains(&f.kind.as_str()) {
            kinds.push(&f.kind);
        }
    }
    if kinds.is_empty() {
        page.push_str("<p class=\"note\">No faults were injected.</p>\n");
        return;
    }
    page.push_str("<p class=\"key\">Shaded: fault windows, from injection to heal. ");
    for k in kinds {
        out!(
            page,
            "<span><i style=\"background:{}\"></i>{}</span>",
            fault_colour(k),
            escape(k)
        );
    }
    page.push_str("</p>\n");
}

fn alive_charts(page: &mut String, cols: &Columns, bands: &[Band]) {
    let regions = cols.regions();
    if regions.is_empty() {
        return;
    }
    page.push_str(
        "<h3>Nodes alive per region</h3>\n<p class=\"note\">Solid: nodes whose process runs \
         (the truth). Dashed: nodes alive in a hub's fleet view.</p>\n",
    );
    let alive = |r: &str| format!("alive:{r}");
    let seen = |r: &str| format!("seen_alive:{r}");
    if regions.len() <= REGIONS_IN_ONE_CHART {
        let mut c = cols.chart("Nodes alive per region", Unit::Count, bands);
        for (i, r) in regions.iter().enumerate() {
            with_column(&mut c, cols, &alive(r), &format!("{r} running"), palette(i));
            if let Some(p) = cols.points(&seen(r)) {
                c.lines
                    .push(Line::new(format!("{r} in hub's view"), palette(i), p).dashed());
            }
        }
        page.push_str(&c.to_html());
        return;
    }

    // Many regions: the fleet as a whole, then one small chart per region
    // on a shared y axis so their heights compare.
    let panel = |title: &str,
                 colour: &str,
                 truth: Option<Vec<(f64, f64)>>,
                 view: Option<Vec<(f64, f64)>>| {
        let mut c = cols.chart(title, Unit::Count, bands);
        c.width = 470.0;
        c.height = 210.0;
        c.legend = false;
        c.band_labels = false;
        if let Some(p) = truth {
            c.lines.push(Line::new("running", colour, p));
        }
        if let Some(p) = view {
            c.lines.push(Line::new("in hub's view", colour, p).dashed());
        }
        c
    };
    page.push_str(&legend(
        [("running", "#444", false), ("in hub's view", "#444", true)].into_iter(),
    ));
    let all_alive: Vec<String> = regions.iter().map(|r| alive(r)).collect();
    let all_seen: Vec<String> = regions.iter().map(|r| seen(r)).collect();
    let mut fleet = panel(
        "All regions",
        "#222",
        cols.sum(&all_alive),
        cols.sum(&all_seen),
    );
    fleet.width = 960.0;
    fleet.height = 260.0;
    page.push_str(&fleet.to_html());

    let per_region: Vec<_> = regions
        .iter()
        .map(|r| (cols.points(&alive(r)), cols.points(&seen(r))))
        .collect();
    let y_max = extent(
        per_region
            .iter()
            .flat_map(|(a, s)| a.iter().chain(s.iter()))
            .flat_map(|p| p.iter().map(|p| p.1)),
    )
    .map_or(1.0, |(_, hi)| hi.max(1.0));
    page.push_str("<div class=\"panels\">\n");
    for (i, (r, (truth, view))) in regions.iter().zip(per_region).enumerate() {
        let mut c = panel(&format!("Region {r}"), palette(i), truth, view);
        c.y_range = Some((0.0, y_max));
        page.push_str(&c.to_html());
    }
    page.push_str("</div>\n");
}

/// A latency distribution as a chart, with p50 and p99 marked; `None`
/// when there is no distribution.
fn cdf_chart(title: &str, lat: &Latency, colour: &str, x_label: &str) -> Option<Chart> {
    if lat.cdf.is_empty() {
        return None;
    }
    let last = (lat.cdf.len() - 1).max(1) as f64;
    let pts = lat
        .cdf
        .iter()
        .enumerate()
        .map(|(i, &x)| (x, i as f64 * 100.0 / last))
        .collect();
    let hi = extent(lat.cdf.iter().copied()).map_or(1.0, |(_, hi)| hi);
    let mut c = Chart::new(title, Unit::Seconds, Unit::Percent).line(Line::new(
        format!("{} samples", count(lat.count)),
        colour,
        pts,
    ));
    c.x_label = x_label.to_string();
    c.x_range = Some((0.0, if hi > 0.0 { hi } else { 1.0 }));
    c.x_nice = true;
    c.y_range = Some((0.0, 100.0));
    c.height = 280.0;
    c.markers = vec![
        Marker {
            x: lat.p50_s,
            y: Some(50.0),
            label: format!("p50 {}", duration(lat.p50_s)),
            colour: "#137333".to_string(),
        },
        Marker {
            x: lat.p99_s,
            y: Some(99.0),
            label: format!("p99 {}", duration(lat.p99_s)),
            colour: "#b31412".to_string(),
        },
    ];
    Some(c)
}

fn latency_charts(page: &mut String, r: &Report) {
    page.push_str("<section id=\"latency\">\n<h2>Latency distributions</h2>\n");
    match cdf_chart(
        "Failure detection: share of crashes a relay called dead within x",
        &r.detection.latency,
        palette(3),
        "seconds from crash to the relay calling the node dead",
    ) {
        Some(c) => page.push_str(&c.to_html()),
        None => page.push_str(
            "<p class=\"note\">No crash was detected in this run, so there is no detection \
             latency to draw.</p>\n",
        ),
    }
    if let Some(c) = cdf_chart(
        "Dissemination: share of health changes held by the whole site within x",
        &r.detection.dissemination,
        palette(0),
        "seconds from a health change to every member of the site holding it",
    ) {
        page.push_str(&c.to_html());
    }
    if let Some(c) = cdf_chart(
        "Buffer drains: share of backlogs acknowledged within x of the link coming back",
        &r.buffers.drain,
        palette(4),
        "seconds from the link coming back to the backlog acknowledged",
    ) {
        page.push_str(&c.to_html());
    }
    page.push_str("</section>\n");
}

/// Table header cells: a leading `#` marks a numeric (right-aligned)
/// column.
fn thead(page: &mut String, heads: &[&str]) {
    page.push_str("<table>\n<thead><tr>");
    for h in heads {
        match h.strip_prefix('#') {
            Some(h) => out!(page, "<th class=\"num\">{}</th>", escape(h)),
            None => out!(page, "<th>{}</th>", escape(h)),
        }
    }
    page.push_str("</tr></thead>\n<tbody>\n");
}

fn faults_table(page: &mut String, r: &Report) {
    page.push_str("<section id=\"faults\">\n<h2>Faults</h2>\n");
    if r.faults.is_empty() {
        page.push_str("<p class=\"note\">No faults were injected.</p>\n</section>\n");
        return;
    }
    page.push_str(
        "<p class=\"note\">Converged: from the heal until every relay's records were \
         acknowledged, every hub held every stream alike and the hubs' views agreed with the \
         truth. Times are h:mm:ss of virtual time.</p>\n",
    );
    thead(
        page,
        &[
            "Kind",
            "#At",
            "#Healed",
            "#Lasted",
            "#Targets",
            "Named",
            "#Converged after",
        ],
    );
    for f in &r.faults {
        let converged = match f.converged_after_s {
            Some(s) => format!("<td class=\"num\">{}</td>", duration(s)),
            None => "<td class=\"num bad\">not by the end</td>".to_string(),
        };
        out!(
            page,
            "<tr><td class=\"kind\"><i class=\"swatch\" style=\"display:inline-block;width:10px;height:10px;\
             margin-right:6px;background:{}\"></i>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"names\">{}</td>{converged}</tr>\n",
            fault_colour(&f.kind),
            escape(&f.kind),
            clock(f.at_s),
            clock(f.healed_s),
            duration(f.healed_s - f.at_s),
            count(f.targets),
            targets_html(f),
        );
    }
    page.push_str("</tbody></table>\n</section>\n");
}

/// A share-of-sites curve of a group's convergence: the y value is the
/// share of *all* the group's sites, so that sites which never converged
/// keep the curve below 100%.
fn convergence_line(name: &str, colour: &str, t: &ConvergenceTimes, sites: u64) -> Option<Line> {
    if t.cdf.is_empty() || sites == 0 {
        return None;
    }
    let last = (t.cdf.len() - 1).max(1) as f64;
    let share = t.count as f64 / sites as f64;
    let pts = t
        .cdf
        .iter()
        .enumerate()
        .map(|(i, &x)| (x, i as f64 * 100.0 / last * share))
        .collect();
    Some(Line::new(
        format!("{name} ({} of {})", count(t.count), count(sites)),
        colour,
        pts,
    ))
}

fn convergence_chart(c: &ConfigChangeOutcome) -> Option<Chart> {
    let connected = c.sites - c.sites_cut_off;
    let lines: Vec<Line> = [
        convergence_line(
            "connected at the change",
            palette(0),
            &c.connected,
            connected,
        ),
        convergence_line(
            "cut off at the change",
            palette(3),
            &c.cut_off,
            c.sites_cut_off,
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    if lines.is_empty() {
        return None;
    }
    let hi = c.all.max_s;
    let mut chart = Chart::new(
        format!(
            "Version {}: share of sites converged within x of the change",
            c.version
        ),
        Unit::Seconds,
        Unit::Percent,
    );
    chart.lines = lines;
    chart.x_label =
        "seconds from the change to every running node of the site applying it".to_string();
    chart.x_range = Some((0.0, if hi > 0.0 { hi } else { 1.0 }));
    chart.x_nice = true;
    chart.y_range = Some((0.0, 100.0));
    chart.height = 280.0;
    Some(chart)
}

fn convergence_cells(t: &ConvergenceTimes, sites: u64) -> String {
    let mut s = format!(
        "<td class=\"num\">{}</td><td class=\"num{}\">{}</td>",
        count(sites),
        if t.count < sites { " bad" } else { "" },
        count(t.count)
    );
    if t.count == 0 {
        s.push_str(
            "<td class=\"num\">–</td><td class=\"num\">–</td><td class=\"num\">–</td>\
             <td class=\"num\">–</td>",
        );
    } else {
        out!(
            s,
            "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td>",
            duration(t.p50_s),
            duration(t.p90_s),
            duration(t.p99_s),
            duration(t.max_s)
        );
    }
    s
}

fn after_cell(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("<td class=\"num\">{}</td>", duration(t)),
        None => "<td class=\"num bad\">not by the end</td>".to_string(),
    }
}

fn config_section(page: &mut String, r: &Report) {
    if r.config_changes.is_empty() {
        return;
    }
    page.push_str(
        "<section id=\"config\">\n<h2>Configuration changes</h2>\n<p class=\"note\">\
         A site converged when every node running there had applied the change (or a \
         later one). Cut off: its WAN link was down when the change was made. All nodes: \
         including those that were down when the site converged and applied it after their \
         restart. Superseded: a later change was made before this one converged there.</p>\n",
    );
    for c in &r.config_changes {
        out!(
            page,
            "<h3>Version {}: applied at {} at {}</h3>\n<p>Bundle {}, applied in {} on each \
             node. Held by ",
            c.version,
            escape(&c.hub),
            clock(c.at_s),
            bytes(c.bundle_bytes as f64),
            duration(c.apply_time_s)
        );
        let hubs: Vec<String> = c
            .hubs
            .iter()
            .map(|h| match h.after_s {
                Some(t) => format!("{} after {}", escape(&h.hub), duration(t)),
                None => format!("<strong>not {}</strong>", escape(&h.hub)),
            })
            .collect();
        out!(page, "{}.</p>\n", hubs.join(", "));
        thead(
            page,
            &[
                "Sites",
                "#Sites",
                "#Converged",
                "#p50",
                "#p90",
                "#p99",
                "#Max",
            ],
        );
        let connected = c.sites - c.sites_cut_off;
        for (name, t, n) in [
            ("all", &c.all, c.sites),
            ("connected at the change", &c.connected, connected),
            ("cut off at the change", &c.cut_off, c.sites_cut_off),
        ] {
            out!(
                page,
                "<tr><td>{name}</td>{}</tr>\n",
                convergence_cells(t, n)
            );
        }
        page.push_str("</tbody></table>\n");
        if !c.not_converged.is_empty() {
            let shown: Vec<String> = c
                .not_converged
                .iter()
                .take(20)
                .map(|n| format!("<span class=\"nw\">{}</span>", escape(n)))
                .collect();
            out!(
                page,
                "<p><strong>Not converged by the end:</strong> {}{}.</p>\n",
                shown.join(", "),
                if c.not_converged.len() > 20 {
                    format!(" … and {} more", count(c.not_converged.len() as u64 - 20))
                } else {
                    String::new()
                }
            );
        }
        if let Some(chart) = convergence_chart(c) {
            page.push_str(&chart.to_html());
        }
        let listed = c.per_site.len().min(MAX_SITE_ROWS);
        out!(
            page,
            "<p class=\"note\">Slowest sites first: {} of {} listed; every site is in \
             report.json.</p>\n",
            count(listed as u64),
            count(c.per_site.len() as u64)
        );
        thead(
            page,
            &[
                "Site",
                "Cut off",
                "#Relay had it",
                "#Converged",
                "#All nodes",
                "Superseded",
            ],
        );
        for p in c.per_site.iter().take(MAX_SITE_ROWS) {
            out!(
                page,
                "<tr><td class=\"nw\">{}</td><td>{}</td>{}{}{}<td>{}</td></tr>\n",
                escape(&p.site),
                if p.cut_off { "yes" } else { "" },
                after_cell(p.relay_s),
                after_cell(p.converged_s),
                after_cell(p.all_nodes_s),
                if p.superseded { "yes" } else { "" },
            );
        }
        out!(
            page,
            "<tr><th>Totals: {}</th><th>{} cut off</th><th></th><th class=\"num\">{} \
             converged</th><th></th><th></th></tr>\n</tbody></table>\n",
            plural(c.per_site.len(), "site", "sites"),
            count(c.sites_cut_off),
            count(c.converged)
        );
    }
    page.push_str("</section>\n");
}

fn traffic_table(page: &mut String, r: &Report) {
    page.push_str("<section id=\"traffic\">\n<h2>Traffic per link class</h2>\n");
    let t = &r.traffic;
    let total = (t.lan.bytes + t.wan.bytes + t.hub.bytes) as f64;
    thead(
        page,
        &[
            "Link class",
            "#Bytes",
            "#Messages",
            "#Bytes / message",
            "#Share of bytes",
            "#Mean rate",
        ],
    );
    for (name, what, tr) in [
        ("LAN", "inside sites", t.lan),
        ("WAN", "relay ↔ hub", t.wan),
        ("Hub", "hub ↔ hub", t.hub),
    ] {
        let per_msg = if tr.messages == 0 {
            "–".to_string()
        } else {
            bytes(tr.bytes as f64 / tr.messages as f64)
        };
        let share = if total > 0.0 {
            format!("{}%", fixed(100.0 * tr.bytes as f64 / total, 1))
        } else {
            "–".to_string()
        };
        let rate = if r.virtual_seconds > 0.0 {
            format!("{}/s", bytes(tr.bytes as f64 / r.virtual_seconds))
        } else {
            "–".to_string()
        };
        out!(
            page,
            "<tr><td>{name} <span class=\"note\">({what})</span></td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{per_msg}</td><td class=\"num\">{share}</td>\
             <td class=\"num\">{rate}</td></tr>\n",
            bytes(tr.bytes as f64),
            count(tr.messages),
        );
    }
    page.push_str(
        "</tbody></table>\n<p class=\"note\">LAN traffic of sites running the gossip model is \
         estimated from the digests and deltas exchanged; sites on real chitchat count what it \
         sent.",
    );
    if !r.config_changes.is_empty() {
        page.push_str(" Nodes fetching configuration bundles from their relay count too.");
    }
    page.push_str("</p>\n</section>\n");
}

fn ratio(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| fixed(v, 3))
}

fn at_cell(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("<td class=\"num\">{}</td>", clock(t)),
        None => "<td class=\"num\">–</td>".to_string(),
    }
}

fn rollouts_section(page: &mut String, r: &Report) {
    if r.rollouts.is_empty() {
        return;
    }
    page.push_str(
        "<section id=\"patches\">\n<h2>Patch rollouts</h2>\n<p class=\"note\">\
         Each wave's counts are the hub's, from the relays' reports, when it judged the wave. \
         Unreachable: pending nodes of sites the hub could not reach, left out of its gate. \
         Touched: nodes that ran <code>install</code>. Rollback time: from the first node \
         whose checks failed to the last node rolled back.</p>\n",
    );
    for ro in &r.rollouts {
        let good = ro.state == "completed" || ro.nodes_failed == 0;
        out!(
            page,
            "<h3>{}: {}</h3>\n<p>Published at {}; rollout at {} in waves <code>{}</code>, \
             max failure {}{}. Artifact {}, failure probability {}.{}</p>\n",
            escape(&ro.patch),
            escape(&ro.state),
            escape(&ro.hub),
            clock(ro.at_s),
            escape(&ro.waves_spec),
            fixed(ro.max_failure, 3),
            if ro.auto_rollback {
                ""
            } else {
                ", no automatic rollback"
            },
            bytes(ro.artifact_bytes as f64),
            ro.failure_probability,
            ro.halted_by
                .as_ref()
                .map(|h| format!(" <strong>Halted: {}.</strong>", escape(h)))
                .unwrap_or_default()
        );
        page.push_str("<div class=\"tiles\">");
        tile(
            page,
            "Nodes touched",
            &count(ro.nodes_touched),
            &format!("{} failed their checks", count(ro.nodes_failed)),
            if good { Mood::Plain } else { Mood::Warn },
        );
        tile(
            page,
            "Rolled back",
            &count(ro.nodes_rolled_back),
            &format!("{} left patched", count(ro.nodes_left_patched)),
            Mood::Plain,
        );
        tile(
            page,
            "Rollback time",
            &ro.rollback_s.map_or("–".to_string(), duration),
            "first failure to last rollback",
            Mood::Plain,
        );
        tile(
            page,
            "Artifact over the WAN",
            &bytes(ro.wan_bytes as f64),
            &format!("to {}", plural(ro.wan.len(), "site", "sites")),
            Mood::Plain,
        );
        page.push_str("</div>\n");
        thead(
            page,
            &[
                "#Wave",
                "Spec",
                "#Nodes",
                "#Sites",
                "#Start",
                "#End",
                "#Healthy",
                "#Failed",
                "#Pending",
                "#Unreachable",
                "#Failure ratio",
                "#Baseline",
                "#Threshold",
                "Verdict",
            ],
        );
        for w in &ro.waves {
            out!(
                page,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td>{}{}<td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td{}>{}</td></tr>\n",
                w.index,
                escape(&w.spec),
                count(w.nodes),
                count(w.sites),
                at_cell(w.started_s),
                at_cell(w.ended_s),
                count(u64::from(w.healthy)),
                count(u64::from(w.failed)),
                count(u64::from(w.pending)),
                count(u64::from(w.unreachable)),
                ratio(w.patched_failure_ratio),
                ratio(w.baseline_failure_ratio),
                ratio(w.threshold),
                if w.verdict == "failed" || w.verdict == "halted" {
                    " class=\"bad\""
                } else {
                    ""
                },
                escape(&w.verdict),
            );
        }
        page.push_str("</tbody></table>\n");
        if !ro.local_rollbacks.is_empty() {
            page.push_str(
                "<p class=\"note\">Sites whose relay rolled them back on its own \
                 (its local gate), and when the hub learnt it.</p>\n",
            );
            thead(
                page,
                &["Site", "Cut off", "#Tripped", "#Rolled back", "#Hub learnt"],
            );
            for l in ro.local_rollbacks.iter().take(MAX_SITE_ROWS) {
                out!(
                    page,
                    "<tr><td class=\"nw\">{}</td><td>{}</td>{}{}{}</tr>\n",
                    escape(&l.site),
                    if l.cut_off { "yes" } else { "" },
                    at_cell(Some(l.tripped_s)),
                    at_cell(l.done_s),
                    at_cell(l.hub_learnt_s),
                );
            }
            page.push_str("</tbody></table>\n");
        }
        let listed = ro.wan.len().min(MAX_SITE_ROWS);
        out!(
            page,
            "<p class=\"note\">Artifact bytes each site's WAN carried ({} of {} sites \
             listed; one artifact is {}).</p>\n",
            count(listed as u64),
            count(ro.wan.len() as u64),
            bytes(ro.artifact_bytes as f64),
        );
        thead(page, &["Site", "#WAN bytes", "#Nodes installed"]);
        for t in ro.wan.iter().take(MAX_SITE_ROWS) {
            out!(
                page,
                "<tr><td class=\"nw\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td></tr>\n",
                escape(&t.site),
                count(t.bytes),
                count(t.installed_nodes),
            );
        }
        page.push_str("</tbody></table>\n");
    }
    page.push_str("</section>\n");
}

/// `p50 (min – max)` of a spread of durations, or a dash.
fn spread_cell(s: &Spread) -> String {
    if s.count == 0 {
        "<td class=\"num\">–</td>".to_string()
    } else {
        format!(
            "<td class=\"num\">{} ({} – {})</td>",
            duration(s.p50_s),
            duration(s.min_s),
            duration(s.max_s)
        )
    }
}

fn opt_duration_cell(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("<td class=\"num\">{}</td>", duration(t)),
        None => "<td class=\"num\">–</td>".to_string(),
    }
}

fn names_line(page: &mut String, what: &str, names: &[String], total: u64) {
    if total == 0 {
        return;
    }
    let shown: Vec<String> = names.iter().map(|n| escape(n)).collect();
    out!(
        page,
        "<p class=\"note\">{what} ({}): <span class=\"mono\">{}</span>{}</p>\n",
        count(total),
        shown.join(", "),
        if (names.len() as u64) < total {
            format!(" … and {} more", count(total - names.len() as u64))
        } else {
            String::new()
        }
    );
}

fn foresight_section(page: &mut String, r: &Report) {
    let Some(f) = &r.foresight else {
        return;
    };
    out!(
        page,
        "<section id=\"foresight\">\n<h2>Foresight and runbooks</h2>\n<p class=\"note\">\
         {} nodes ran the mesh's <code>Foresight</code> on modelled figures sampled every {}: \
         {} given a disk that fills, {} an anomaly, and {} control nodes given nothing. A forecast \
         needs {} of history. Lead: from a disk's first forecast (warning or critical) to the \
         moment it was first full. Times are h:mm:ss of virtual time.</p>\n",
        count(f.nodes_modelled),
        duration(f.sample_every_s),
        count(f.trend_nodes),
        count(f.anomaly_nodes),
        count(f.control_nodes),
        duration(f.forecast_min_span_s),
    );
    let d = &f.disks;
    let a = &f.anomalies;
    let fa = &f.false_alarms;
    page.push_str("<div class=\"tiles\">");
    if d.disks > 0 {
        tile(
            page,
            "Full disks forecast before",
            &format!("{} / {}", count(d.predicted_before_full), count(d.filled)),
            &format!("{} filling disks", count(d.disks)),
            if d.predicted_before_full == d.filled {
                Mood::Plain
            } else {
                Mood::Warn
            },
        );
        tile(
            page,
            "Lead time p50",
            &if d.lead_warning.count == 0 {
                "–".to_string()
            } else {
                duration(d.lead_warning.p50_s)
            },
            &if d.lead_warning.count == 0 {
                "no disk forecast before full".to_string()
            } else {
                format!(
                    "{} – {}",
                    duration(d.lead_warning.min_s),
                    duration(d.lead_warning.max_s)
                )
            },
            Mood::Plain,
        );
        tile(
            page,
            "Cleaned, never full",
            &count(d.averted),
            "by a runbook",
            Mood::Plain,
        );
    }
    if a.injected > 0 {
        tile(
            page,
            "Anomalies flagged",
            &format!("{} / {}", count(a.flagged), count(a.injected)),
            &if a.delay.count == 0 {
                "none flagged".to_string()
            } else {
                format!("delay p50 {}", duration(a.delay.p50_s))
            },
            if a.flagged == a.injected {
                Mood::Plain
            } else {
                Mood::Warn
            },
        );
    }
    tile(
        page,
        "False alarms on controls",
        &count(fa.on_controls),
        &format!(
            "{} control nodes, {} node-hours",
            count(fa.control_nodes),
            grouped(fa.control_node_hours, 0)
        ),
        if fa.on_controls == 0 {
            Mood::Plain
        } else {
            Mood::Warn
        },
    );
    page.push_str("</div>\n");

    if d.disks > 0 {
        page.push_str("<h3>Disks filling</h3>\n");
        thead(
            page,
            &[
                "#Trend",
                "Mount",
                "Rate",
                "#Starts",
                "#Disks",
                "#Forecast",
                "#Full",
                "#Forecast before full",
                "#Lead p50 (min – max)",
                "#Lead from critical",
                "#Start to full",
                "#Cleaned, never full",
            ],
        );
        for t in &d.per_trend {
            out!(
                page,
                "<tr><td class=\"num\">{}</td><td class=\"mono\">{}</td><td class=\"nw\">{}</td>\
                 {}<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num{}\">{}</td>{}{}{}<td class=\"num\">{}</td></tr>\n",
                t.index,
                escape(&t.mount),
                escape(&t.rate),
                at_cell(Some(t.at_s)),
                count(t.disks),
                count(t.forecast),
                count(t.filled),
                if t.predicted_before_full < t.filled {
                    " bad"
                } else {
                    ""
                },
                count(t.predicted_before_full),
                spread_cell(&t.lead_warning),
                spread_cell(&t.lead_critical),
                spread_cell(&t.time_to_full),
                count(t.averted),
            );
        }
        page.push_str("</tbody></table>\n");
        names_line(
            page,
            "Full without a forecast before",
            &d.not_predicted,
            d.not_predicted_total,
        );
        let listed = d.nodes.len().min(MAX_SITE_ROWS);
        out!(
            page,
            "<p class=\"note\">Disks ({} of {} listed: those full first, the least warned \
             first).</p>\n",
            count(listed as u64),
            count(d.disks)
        );
        thead(
            page,
            &[
                "Node",
                "Mount",
                "#Trend",
                "#Forecast",
                "#Critical",
                "#Full",
                "#Lead",
                "#Times full",
                "#Cleaned",
                "#First cleaned",
            ],
        );
        for n in d.nodes.iter().take(MAX_SITE_ROWS) {
            out!(
                page,
                "<tr><td class=\"nw\">{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td>\
                 {}{}{}{}<td class=\"num\">{}</td><td class=\"num\">{}</td>{}</tr>\n",
                escape(&n.node),
                escape(&n.mount),
                n.trend,
                at_cell(n.forecast_s),
                at_cell(n.critical_s),
                at_cell(n.full_s),
                opt_duration_cell(n.lead_s),
                count(n.times_full),
                count(n.fixes),
                at_cell(n.cleaned_s),
            );
        }
        page.push_str("</tbody></table>\n");
    }

    if a.injected > 0 {
        page.push_str(
            "<h3>Anomalies</h3>\n<p class=\"note\">Flagged: the node's \
             <code>anomaly:cpu</code> raised while the anomaly lasted. Delay: from its start. \
             Cleared: from its end to the finding passing again.</p>\n",
        );
        thead(
            page,
            &[
                "#Anomaly",
                "Metric",
                "#Value",
                "#Starts",
                "#Lasts",
                "#Nodes",
                "#Flagged",
                "#Delay p50 (min – max)",
            ],
        );
        for x in &a.per_anomaly {
            out!(
                page,
                "<tr><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}%</td>{}\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num{}\">{}</td>{}</tr>\n",
                x.index,
                escape(&x.metric),
                fixed(x.value, 1),
                at_cell(Some(x.at_s)),
                duration(x.duration_s),
                count(x.nodes),
                if x.flagged < x.nodes { " bad" } else { "" },
                count(x.flagged),
                spread_cell(&x.delay),
            );
        }
        page.push_str("</tbody></table>\n");
        if a.cleared_after_end.count > 0 {
            out!(
                page,
                "<p class=\"note\">Cleared after the anomaly ended: p50 {} (min {}, max {}).</p>\n",
                duration(a.cleared_after_end.p50_s),
                duration(a.cleared_after_end.min_s),
                duration(a.cleared_after_end.max_s),
            );
        }
        names_line(page, "Not flagged", &a.missed, a.missed_total);
    }

    out!(
        page,
        "<h3>False alarms</h3>\n<p class=\"note\">A finding raised without a cause: a forecast \
         of a disk with no trend (or before its trend started), an anomaly of a figure nothing \
         was injected into. On control nodes: {} in {} node-hours ({} nodes); on nodes given a \
         trend or an anomaly: {}.</p>\n",
        count(fa.on_controls),
        grouped(fa.control_node_hours, 0),
        count(fa.controls_alarmed),
        count(fa.elsewhere),
    );
    if !fa.first.is_empty() {
        thead(page, &["Node", "Given", "Check", "#At"]);
        for x in &fa.first {
            out!(
                page,
                "<tr><td class=\"nw\">{}</td><td>{}</td><td class=\"mono\">{}</td>{}</tr>\n",
                escape(&x.node),
                escape(&x.class),
                escape(&x.check),
                at_cell(Some(x.at_s)),
            );
        }
        page.push_str("</tbody></table>\n");
    }

    runbooks_tables(page, f);
    page.push_str("</section>\n");
}

fn runbooks_tables(page: &mut String, f: &ForesightOutcome) {
    if f.runbooks.is_empty() {
        return;
    }
    page.push_str(
        "<h3>Runbooks</h3>\n<p class=\"note\">The mesh's runbook engine on each modelled node \
         the rule applies to, leases from the site's relay. Runs end fixed, failed (the action \
         failed or timed out) or not recovered (the check still bad after <code>verify</code>). \
         Refused: lease requests the relay turned down at the site's limit (and the nodes \
         refused), episodes the node's rate limit held back, requests no relay answered. At \
         once: the most nodes of one site running or verifying the rule's action together, \
         which must never be more than <code>max_per_site</code>.</p>\n",
    );
    thead(
        page,
        &[
            "Rule",
            "Check",
            "#Max per site",
            "#Nodes",
            "#Runs",
            "#Fixed",
            "#Failed",
            "#Not recovered",
            "#Refused: site limit",
            "#Rate limit",
            "#No relay",
            "#Breaker trips",
            "#At once",
        ],
    );
    for b in &f.runbooks {
        out!(
            page,
            "<tr><td class=\"nw\">{}</td><td class=\"mono\">{} {}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{} ({} nodes)</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num{}\">{}{}</td></tr>\n",
            escape(&b.name),
            escape(&b.check),
            escape(&b.when),
            b.max_per_site,
            count(b.nodes),
            count(b.runs),
            count(b.fixed),
            count(b.failed),
            count(b.not_recovered),
            count(b.blocked_site_limit),
            count(b.nodes_blocked_site_limit),
            count(b.blocked_rate_limit),
            count(b.blocked_no_relay),
            count(b.breaker_trips),
            if b.max_concurrent > b.max_per_site {
                " bad"
            } else {
                ""
            },
            b.max_concurrent,
            b.max_concurrent_site
                .as_ref()
                .map(|s| format!(" ({})", escape(s)))
                .unwrap_or_default(),
        );
    }
    page.push_str("</tbody></table>\n");
    for b in &f.runbooks {
        if b.sites.is_empty() && b.trips.is_empty() {
            continue;
        }
        out!(
            page,
            "<p class=\"note\"><code>{}</code>: its action runs {} and {}; at most one run per \
             {} on a node; {} failed runs within {} open its breaker.</p>\n",
            escape(&b.name),
            duration(b.action_s),
            if b.fixes {
                "removes the cause"
            } else {
                "changes nothing"
            },
            duration(b.min_interval_s),
            b.breaker_failures,
            duration(b.breaker_window_s),
        );
        if !b.sites.is_empty() {
            thead(page, &["Site", "#Runs", "#Fixed", "#Refused", "#At once"]);
            for s in b.sites.iter().take(20) {
                out!(
                    page,
                    "<tr><td class=\"nw\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{}</td><td class=\"num{}\">{}</td></tr>\n",
                    escape(&s.site),
                    count(s.runs),
                    count(s.fixed),
                    count(s.busy),
                    if s.max_concurrent > b.max_per_site {
                        " bad"
                    } else {
                        ""
                    },
                    s.max_concurrent,
                );
            }
            page.push_str("</tbody></table>\n");
        }
        if !b.trips.is_empty() {
            thead(page, &["Breaker tripped on", "#At", "Why"]);
            for t in b.trips.iter().take(20) {
                out!(
                    page,
                    "<tr><td class=\"nw\">{}</td>{}<td class=\"names\">{}</td></tr>\n",
                    escape(&t.node),
                    at_cell(Some(t.at_s)),
                    escape(&t.note),
                );
            }
            page.push_str("</tbody></table>\n");
        }
    }
}

fn latency_cells(l: &Latency) -> String {
    if l.count == 0 {
        return "<td class=\"num\">0</td><td class=\"num\">–</td><td class=\"num\">–</td>\
                <td class=\"num\">–</td>"
            .to_string();
    }
    format!(
        "<td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
         <td class=\"num\">{}</td>",
        count(l.count),
        duration(l.p50_s),
        duration(l.p99_s),
        duration(l.max_s)
    )
}

fn buffers_tables(page: &mut String, r: &Report) {
    let b = &r.buffers;
    page.push_str("<section id=\"buffers\">\n<h2>Relay buffers</h2>\n");
    out!(
        page,
        "<p>Largest peak of any relay: <strong>{}</strong>.</p>\n",
        bytes(b.peak_bytes_max as f64)
    );
    thead(page, &["Drains", "#Count", "#p50", "#p99", "#Max"]);
    out!(
        page,
        "<tr><td>link back → backlog acknowledged</td>{}</tr>\n</tbody></table>\n",
        latency_cells(&b.drain)
    );
    if !b.top_peaks.is_empty() {
        out!(
            page,
            "<h3>Largest peaks ({})</h3>\n",
            plural(b.top_peaks.len(), "relay", "relays")
        );
        thead(page, &["Relay", "#Peak bytes", "#Peak records"]);
        for p in &b.top_peaks {
            out!(
                page,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>\n",
                escape(&p.relay),
                bytes(p.bytes as f64),
                count(p.records)
            );
        }
        page.push_str("</tbody></table>\n");
    }
    if !b.drains.is_empty() {
        out!(
            page,
            "<h3>Drains, longest first ({} listed)</h3>\n",
            count(b.drains.len() as u64)
        );
        thead(
            page,
            &[
                "Relay",
                "#Link back at",
                "#Backlog (records)",
                "#Drained after",
            ],
        );
        for d in &b.drains {
            let drained = match d.drain_s {
                Some(s) => format!("<td class=\"num\">{}</td>", duration(s)),
                None => "<td class=\"num bad\">not by the end</td>".to_string(),
            };
            out!(
                page,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>{drained}</tr>\n",
                escape(&d.relay),
                clock(d.healed_s),
                count(d.backlog)
            );
        }
        page.push_str("</tbody></table>\n");
    }
    page.push_str("</section>\n");
}

fn detection_table(page: &mut String, r: &Report) {
    let d = &r.detection;
    page.push_str("<section id=\"detection\">\n<h2>Failure detection</h2>\n");
    thead(page, &["Latency", "#Count", "#p50", "#p99", "#Max"]);
    out!(
        page,
        "<tr><td>crash → relay calls the node dead</td>{}</tr>\n\
         <tr><td>health change → every member of the site holds it</td>{}</tr>\n\
         </tbody></table>\n",
        latency_cells(&d.latency),
        latency_cells(&d.dissemination)
    );
    thead(page, &["Mistakes", "#Count"]);
    out!(
        page,
        "<tr><td>false suspicions (called dead while running)</td><td class=\"num\">{}</td></tr>\n\
         <tr><td>undetected crashes (not called dead before restart or the end)</td>\
         <td class=\"num\">{}</td></tr>\n</tbody></table>\n</section>\n",
        count(d.false_suspicions),
        count(d.undetected)
    );
}

fn records_table(page: &mut String, r: &Report) {
    let rec = &r.records;
    page.push_str("<section id=\"records\">\n<h2>Record accounting</h2>\n");
    thead(page, &["Records", "#Count", "Meaning"]);
    let rows: [(&str, u64, &str, bool); 7] = [
        (
            "persisted",
            rec.persisted,
            "made durable by the relays",
            false,
        ),
        (
            "delivered",
            rec.delivered,
            "of those, held by at least one hub at the end (a gap counts for the records it replaces)",
            false,
        ),
        (
            "dropped with gap",
            rec.dropped_with_gap,
            "dropped at a full buffer and told to the hubs by a gap",
            false,
        ),
        (
            "lost",
            rec.lost,
            "durable, yet held by no hub and buffered by no relay: must be 0",
            rec.lost > 0,
        ),
        (
            "duplicates applied",
            rec.duplicates_applied,
            "applied twice by some hub: must be 0",
            rec.duplicates_applied > 0,
        ),
        (
            "duplicates absorbed",
            rec.duplicates_absorbed,
            "copies that arrived again and were absorbed by the (relay, seq) rule",
            false,
        ),
        (
            "still buffered",
            rec.still_buffered,
            "durable at a relay but not yet drained when the run ended",
            false,
        ),
    ];
    for (name, n, meaning, bad) in rows {
        out!(
            page,
            "<tr><td>{name}</td><td class=\"num{}\">{}</td><td>{}</td></tr>\n",
            if bad { " bad" } else { "" },
            count(n),
            escape(meaning)
        );
    }
    page.push_str("</tbody></table>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{BufferPeak, Drain, HubReach, SiteConvergence, Traffic};

    /// A run of 10 regions over an hour with a few overlapping faults.
    fn sample() -> (Report, Timeseries) {
        let regions = 10;
        let columns = Timeseries::run_columns(regions);
        let mut series = Timeseries::new(columns);
        let outage = |t: f64| (600.0..1200.0).contains(&t);
        let crash = |t: f64| (2400.0..2700.0).contains(&t);
        for i in 0..=420 {
            let t = i as f64 * 10.0;
            let mut row = vec![t];
            for r in 1..=regions {
                let alive = if r == 7 && crash(t) {
                    9_000.0
                } else {
                    10_000.0
                };
                let seen = if r == 3 && outage(t) {
                    5_000.0
                } else if r == 7 && (2410.0..2730.0).contains(&t) {
                    9_000.0
                } else {
                    10_000.0
                };
                row.push(alive);
                row.push(seen);
            }
            let backlog = if outage(t) {
                (t - 600.0) * 50.0
            } else if (1200.0..1500.0).contains(&t) {
                (1500.0 - t) * 100.0
            } else {
                0.0
            };
            row.push(backlog);
            row.push(backlog * 420.0);
            row.push(backlog * 420.0 / 50.0);
            row.push(
                2.0e6
                    + 1.0e5 * (t / 97.0).sin()
                    + if (1200.0..1500.0).contains(&t) {
                        6.0e6
                    } else {
                        0.0
                    },
            );
            row.push(3.0e5 + 2.0e4 * (t / 41.0).cos());
            row.push(4.0e8 + 1.0e7 * (t / 61.0).sin());
            row.push(if outage(t) { 450.0 } else { 500.0 });
            row.push(if outage(t) { 50.0 } else { 0.0 });
            series.push(row);
        }
        let samples: Vec<f64> = (0..1000)
            .map(|i| 3.0 + (i as f64 / 100.0).powi(2) * 0.2)
            .collect();
        let report = Report {
            scenario: "wan-outage-r3 <ten regions> & \"friends\"".to_string(),
            scenario_sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
                .to_string(),
            seed: 42,
            virtual_seconds: 4200.0,
            regions: 10,
            sites: 500,
            nodes: 100_000,
            hubs: 3,
            real_gossip_sites: 2,
            events: 123_456_789,
            detection: crate::report::Detection {
                latency: Latency::of(&samples, true),
                false_suspicions: 3,
                undetected: 0,
                dissemination: Latency::of(
                    &samples.iter().map(|s| s / 8.0).collect::<Vec<_>>(),
                    true,
                ),
            },
            faults: vec![
                FaultOutcome {
                    kind: "wan_outage".into(),
                    at_s: 600.0,
                    healed_s: 1200.0,
                    targets: 50,
                    named: (1..=20).map(|i| format!("r3-s{i}")).collect(),
                    converged_after_s: Some(312.5),
                },
                FaultOutcome {
                    kind: "hub_crash".into(),
                    at_s: 900.0,
                    healed_s: 1000.0,
                    targets: 1,
                    named: vec!["hub-2".into()],
                    converged_after_s: Some(20.0),
                },
                FaultOutcome {
                    kind: "loss_storm".into(),
                    at_s: 950.0,
                    healed_s: 1100.0,
                    targets: 1,
                    named: vec!["wan".into()],
                    converged_after_s: Some(4.0),
                },
                FaultOutcome {
                    kind: "node_crash".into(),
                    at_s: 2400.0,
                    healed_s: 2700.0,
                    targets: 50,
                    named: vec!["r7-s1".into()],
                    converged_after_s: None,
                },
            ],
            traffic: crate::report::LinkTraffic {
                lan: Traffic {
                    bytes: 170_000_000_000,
                    messages: 900_000_000,
                },
                wan: Traffic {
                    bytes: 900_000_000,
                    messages: 3_000_000,
                },
                hub: Traffic {
                    bytes: 120_000_000,
                    messages: 400_000,
                },
            },
            buffers: crate::report::Buffers {
                peak_bytes_max: 25_000_000,
                top_peaks: (1..=10)
                    .map(|i| BufferPeak {
                        relay: format!("r3-s{i}-relay"),
                        bytes: 25_000_000 - i * 100_000,
                        records: 60_000 - i * 200,
                    })
                    .collect(),
                drain: Latency::of(&[40.0, 55.0, 61.0, 90.0, 120.0], true),
                drains: (1..=5)
                    .map(|i| Drain {
                        relay: format!("r3-s{i}-relay"),
                        healed_s: 1200.0,
                        backlog: 30_000,
                        drain_s: if i == 5 {
                            None
                        } else {
                            Some(40.0 + i as f64 * 10.0)
                        },
                    })
                    .collect(),
            },
            records: crate::report::Records {
                persisted: 5_000_000,
                delivered: 4_990_000,
                dropped_with_gap: 10_000,
                lost: 0,
                duplicates_applied: 0,
                duplicates_absorbed: 1234,
                still_buffered: 0,
            },
            config_changes: Vec::new(),
            rollouts: Vec::new(),
            foresight: None,
            violations: Vec::new(),
        };
        (report, series)
    }

    /// A configuration change over 120 sites, 12 of them cut off, 2 of
    /// which never converged.
    fn change() -> ConfigChangeOutcome {
        let per_site: Vec<SiteConvergence> = (1..=120)
            .map(|i| {
                let cut_off = i > 108;
                let converged = if i > 118 {
                    None
                } else if cut_off {
                    Some(300.0 + i as f64)
                } else {
                    Some(1.0 + i as f64 / 100.0)
                };
                SiteConvergence {
                    site: format!("r1-s{i}"),
                    cut_off,
                    relay_s: converged.map(|c| c - 0.5),
                    converged_s: converged,
                    all_nodes_s: converged,
                    superseded: false,
                }
            })
            .rev()
            .collect();
        let times = |cut: bool| -> Vec<f64> {
            per_site
                .iter()
                .filter(|p| p.cut_off == cut)
                .filter_map(|p| p.converged_s)
                .collect()
        };
        let all: Vec<f64> = per_site.iter().filter_map(|p| p.converged_s).collect();
        ConfigChangeOutcome {
            version: 1,
            at_s: 300.0,
            hub: "hub-1".into(),
            bundle_bytes: 16384,
            apply_time_s: 0.2,
            hubs: vec![
                HubReach {
                    hub: "hub-1".into(),
                    after_s: Some(0.0),
                },
                HubReach {
                    hub: "hub-<2>".into(),
                    after_s: None,
                },
            ],
            sites: 120,
            sites_cut_off: 12,
            converged: 118,
            all: ConvergenceTimes::of(&all),
            connected: ConvergenceTimes::of(&times(false)),
            cut_off: ConvergenceTimes::of(&times(true)),
            not_converged: vec!["r1-s119".into(), "r1-s120".into()],
            per_site,
        }
    }

    #[test]
    fn configuration_changes_get_a_section_with_the_slowest_sites_first_and_capped() {
        let (mut report, mut series) = sample();
        report.config_changes = vec![change()];
        series.columns.push(Timeseries::CONFIG_CURRENT.into());
        for row in &mut series.rows {
            let t = row[0];
            row.push(if t < 300.0 { 0.0 } else { 99_000.0 });
        }
        let page = render(&report, &series);
        assert!(page.contains("<a href=\"#config\">Config</a>"));
        assert!(page.contains("<section id=\"config\">"));
        assert!(page.contains("<h3>Version 1: applied at hub-1 at 0:05:00</h3>"));
        assert!(
            page.contains("<strong>not hub-&lt;2&gt;</strong>"),
            "escaped"
        );
        assert!(page.contains("Not converged by the end:</strong> <span class=\"nw\">r1-s119"));
        assert!(page.contains("50 of 120 listed"));
        let section = page.split("<section id=\"config\">").nth(1).unwrap();
        let section = section.split("</section>").next().unwrap();
        // Rows: three summary rows, then the capped site rows and a total.
        let rows = section.matches("<tr><td class=\"nw\">").count();
        assert_eq!(rows, MAX_SITE_ROWS);
        assert!(section.contains("Totals: 120 sites"));
        let first = section.find("r1-s120").unwrap();
        let later = section.find("r1-s110").unwrap();
        assert!(first < later, "slowest first");
        assert!(!section.contains(">r1-s1<"), "the fastest are left out");
        // The chart draws both groups.
        assert!(section.contains("connected at the change (108 of 108)"));
        assert!(section.contains("cut off at the change (10 of 12)"));
        assert_eq!(section.matches("<path").count(), 2);
        // The time chart and the tile.
        assert!(page.contains("Running nodes that have applied the newest configuration change"));
        assert!(page.contains("Sites on the last config"));
        assert!(page.contains("118 / 120"));
    }

    /// A rollout halted at its canary wave: one site rolled itself back
    /// while cut off.
    fn rollout() -> crate::report::RolloutOutcome {
        use crate::report::{ArtifactTransfer, LocalRollback, RolloutOutcome, WaveOutcome};
        let wave = |index: u64, spec: &str, verdict: &str, started: Option<f64>| WaveOutcome {
            index,
            spec: spec.into(),
            nodes: if index == 0 { 1 } else { 99 },
            sites: 1,
            first_sites: vec!["r1-s<7>".into()],
            started_s: started,
            ended_s: started.map(|t| t + 200.0),
            healthy: 0,
            failed: u32::from(index == 0),
            pending: 0,
            unreachable: 0,
            patched_failure_ratio: started.map(|_| 1.0),
            baseline_failure_ratio: started.map(|_| 0.0),
            threshold: started.map(|_| 0.05),
            verdict: verdict.into(),
        };
        RolloutOutcome {
            patch: "kernel-hotfix".into(),
            hub: "hub-1".into(),
            at_s: 120.0,
            started_s: Some(120.0),
            waves_spec: "canary,1site,10%,100%".into(),
            max_failure: 0.05,
            auto_rollback: true,
            artifact_bytes: 52_428_800,
            failure_probability: 0.5,
            state: "halted".into(),
            ended_s: Some(320.0),
            halted_by: Some("wave 0 failed its gate".into()),
            nodes_touched: 1,
            nodes_failed: 1,
            nodes_rolled_back: 1,
            nodes_left_patched: 0,
            first_failure_s: Some(250.0),
            last_rolled_back_s: Some(272.5),
            rollback_s: Some(22.5),
            local_rollbacks: vec![LocalRollback {
                site: "r1-s<7>".into(),
                tripped_s: 252.0,
                done_s: Some(272.5),
                hub_learnt_s: Some(400.0),
                cut_off: true,
            }],
            wan_bytes: 52_428_800,
            wan: vec![ArtifactTransfer {
                site: "r1-s<7>".into(),
                bytes: 52_428_800,
                installed_nodes: 1,
            }],
            waves: vec![
                wave(0, "canary", "failed", Some(120.0)),
                wave(1, "1site", "not started", None),
            ],
        }
    }

    #[test]
    fn rollouts_get_a_section_with_their_waves_rollbacks_and_wan_bytes() {
        let (mut report, series) = sample();
        assert!(!render(&report, &series).contains("id=\"patches\""));
        report.rollouts = vec![rollout()];
        let page = render(&report, &series);
        assert!(page.contains("<a href=\"#patches\">Patches</a>"));
        let start = page.find("<section id=\"patches\">").expect("a section");
        let section = &page[start..];
        let section = &section[..section.find("</section>").unwrap()];
        assert!(section.contains("<h3>kernel-hotfix: halted</h3>"));
        assert!(section.contains("<strong>Halted: wave 0 failed its gate.</strong>"));
        assert!(section.contains("<td class=\"bad\">failed</td>"));
        assert!(section.contains("<td>not started</td>"));
        assert!(section.contains("r1-s&lt;7&gt;"), "escaped");
        assert!(!section.contains("r1-s<7>"));
        assert!(section.contains("52,428,800"));
        // Ratios of the judged wave, dashes for the one not started.
        assert!(section.contains("<td class=\"num\">1.000</td>"));
        assert!(section.contains("<td class=\"num\">–</td>"));
        assert!(section.contains("Rollback time"));
    }

    #[test]
    fn a_run_without_configuration_changes_has_no_config_section() {
        let (report, series) = sample();
        let page = render(&report, &series);
        for needle in [
            "id=\"config\"",
            "#config",
            "configuration",
            "Sites on the last config",
        ] {
            assert!(!page.contains(needle), "{needle}");
        }
    }

    #[test]
    fn the_page_is_self_contained() {
        let (report, series) = sample();
        let page = render(&report, &series);
        for needle in [
            "http://", "https://", "<script", "<link", "<img", "@import", "url(",
        ] {
            assert!(!page.contains(needle), "page contains {needle}");
        }
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.ends_with("</html>\n"));
    }

    #[test]
    fn names_are_escaped() {
        let (mut report, mut series) = sample();
        report.scenario = "<b>x</b> & 'y' \"z\"".into();
        report.violations = vec!["relay <r1-s1-relay> lost 3 records".into()];
        report.faults[0].kind = "<kind>".into();
        report.buffers.top_peaks[0].relay = "a<b".into();
        series.columns[1] = "alive:<r1>".into();
        let page = render(&report, &series);
        assert!(page.contains("&lt;b&gt;x&lt;/b&gt; &amp; &#39;y&#39; &quot;z&quot;"));
        assert!(page.contains("relay &lt;r1-s1-relay&gt; lost"));
        assert!(page.contains("&lt;kind&gt;"));
        assert!(page.contains("a&lt;b"));
        assert!(page.contains("&lt;r1&gt;"));
        for raw in ["<b>", "<kind>", "<r1-s1-relay>", "<r1>", "a<b"] {
            assert!(!page.contains(raw), "unescaped {raw}");
        }
    }

    #[test]
    fn an_empty_report_and_series_render_without_panicking() {
        let page = render(&Report::default(), &Timeseries::default());
        assert!(page.contains("PASS"));
        assert!(page.contains("No time series was recorded"));
        assert!(!page.contains("<path"));

        // Columns but no rows, rows shorter than the columns, and a single
        // sample are all drawable or skipped.
        let mut s = Timeseries::new(vec!["t_s".into(), "alive:r1".into(), "wan_bytes".into()]);
        render(&Report::default(), &s);
        s.rows.push(vec![0.0]);
        s.rows.push(vec![10.0, 5.0, f64::NAN]);
        let page = render(&Report::default(), &s);
        assert!(page.contains("Nodes alive per region"));
    }

    #[test]
    fn a_failing_report_shows_fail_and_its_violations() {
        let (mut report, series) = sample();
        report.records.lost = 7;
        report.violations = vec![
            "7 records lost".into(),
            "hub-2 applied r1-s1-relay #9 twice".into(),
        ];
        let page = render(&report, &series);
        assert!(page.contains("<strong>FAIL</strong>"));
        assert!(!page.contains("PASS"));
        assert!(page.contains("<li>7 records lost</li>"));
        assert!(page.contains("<li>hub-2 applied r1-s1-relay #9 twice</li>"));
        assert!(page.contains("tile bad"));

        let (good, series) = sample();
        let page = render(&good, &series);
        assert!(page.contains("<strong>PASS</strong>"));
        assert!(!page.contains("FAIL"));
    }

    #[test]
    fn a_chart_contains_one_path_per_series() {
        let pts = |k: f64| {
            (0..50)
                .map(|i| (i as f64, k * i as f64))
                .collect::<Vec<_>>()
        };
        let chart = Chart::new("three", Unit::Seconds, Unit::Bytes)
            .line(Line::new("a", "#000", pts(1.0)))
            .line(Line::new("b", "#111", pts(2.0)).dashed())
            .line(Line::new("c", "#222", pts(3.0)));
        let svg = chart.svg();
        assert_eq!(svg.matches("<path").count(), 3);
        assert_eq!(svg.matches("stroke-dasharray=\"6 4\"").count(), 1);
        let html = chart.to_html();
        assert_eq!(
            html.matches("<path").count(),
            3,
            "the legend draws no paths"
        );
    }

    #[test]
    fn long_series_are_downsampled() {
        let long: Vec<(f64, f64)> = (0..100_000)
            .map(|i| (i as f64, (i as f64 / 7.0).sin()))
            .collect();
        let d = downsample(&long, MAX_POINTS);
        assert!(d.len() <= MAX_POINTS);
        assert_eq!(d.first(), long.first());
        assert_eq!(d.last(), long.last());

        let svg = Chart::new("long", Unit::Seconds, Unit::Count)
            .line(Line::new("x", "#000", long))
            .svg();
        let path = svg
            .split("<path d=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let points = path.matches(['M', 'L']).count();
        assert!(points <= MAX_POINTS, "{points} points drawn");
        assert!(points > 100, "{points} points is too coarse");
    }

    #[test]
    fn downsampling_keeps_a_one_sample_spike() {
        let mut pts: Vec<(f64, f64)> = (0..10_000).map(|i| (i as f64, 1.0)).collect();
        pts[4321].1 = 99.0;
        assert!(downsample(&pts, 100).contains(&(4321.0, 99.0)));
    }

    #[test]
    fn the_same_input_gives_the_same_bytes() {
        let (report, series) = sample();
        assert_eq!(render(&report, &series), render(&report, &series));
    }

    #[test]
    fn units_read_as_people_write_them() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(duration(0.25), "250 ms");
        assert_eq!(duration(1.5), "1.5 s");
        assert_eq!(duration(1.25), "1.25 s");
        assert_eq!(duration(10.0), "10 s");
        assert_eq!(duration(245.0), "4 min 05 s");
        assert_eq!(duration(7380.0), "2 h 03 min");
        assert_eq!(clock(3725.0), "1:02:05");
        assert_eq!(grouped(1234567.0, 0), "1,234,567");
        assert_eq!(grouped(-1234.5, 1), "-1,234.5");
        assert_eq!(fixed(-0.0001, 1), "0.0");
    }

    #[test]
    fn time_ticks_fall_on_round_clock_values() {
        let s = Unit::Seconds.scale(0.0, 4200.0, 8, false);
        let labels: Vec<&str> = s.ticks.iter().map(|t| t.1.as_str()).collect();
        assert_eq!(
            labels,
            [
                "0 min", "10 min", "20 min", "30 min", "40 min", "50 min", "60 min", "70 min"
            ]
        );
        let s = Unit::Bytes.scale(0.0, 3.0 * 1024.0 * 1024.0, 5, true);
        assert_eq!(s.ticks.last().unwrap().1, "3 MiB");
    }

    #[test]
    fn many_regions_get_a_chart_each() {
        let (report, series) = sample();
        let page = render(&report, &series);
        for r in 1..=10 {
            assert!(page.contains(&format!("<figcaption>Region r{r}</figcaption>")));
        }
        assert!(page.contains("<figcaption>All regions</figcaption>"));
    }

    /// Writes the sample page to look at: `TRELLIS_SAMPLE_HTML=/tmp/x.html
    /// cargo test -p trellis-sim html -- --ignored`.
    #[test]
    #[ignore = "writes a file for a person to look at"]
    fn writes_a_sample_page() {
        let path = std::env::var("TRELLIS_SAMPLE_HTML").unwrap_or_else(|_| {
            std::env::temp_dir()
                .join("sample-report.html")
                .display()
                .to_string()
        });
        let (report, series) = sample();
        std::fs::write(&path, render(&report, &series)).unwrap();
    }
}
