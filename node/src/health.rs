//! A member's own health: resources read from the OS and user checks.
//!
//! [`assess`] is the pure part: resources + check results + thresholds →
//! [`Health`]. [`ResourceSampler`] reads CPU, memory, disk and load with
//! `sysinfo`; [`run_check`] runs one command, HTTP or TCP check with a
//! timeout; [`Checks`] runs every configured check on its own interval and
//! keeps the latest results.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{DiskRefreshKind, Disks, System};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::{CheckConfig, CheckKind, HealthConfig};
use crate::foresight::Observation;
use crate::id::Role;
use crate::metrics::CheckMetrics;
use crate::site::{CheckResult, Health, Status};

/// One sample of the machine's resources. `None` when the OS did not say.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    pub cpu_pct: Option<u8>,
    pub mem_pct: Option<u8>,
    pub disk_pct: Option<u8>,
    pub load1: Option<f32>,
}

/// Published resource figures move in steps, so that a busy machine's
/// jitter does not become gossip traffic: every changed key travels to
/// every member of the site, and at a 2 s interval an exact CPU figure
/// changes nearly every time. A changed key also moves the member's
/// version, which costs its entry in every digest several bytes instead of
/// one (see `gossip_codec`) on each stream until that stream's next digest,
/// some 16 s later at 100 members. A figure is republished at once when it
/// enters another threshold band (so a status never waits on a step); one
/// that moved by its step waits until [`FIGURE_HOLD`] has passed since
/// figures last moved that way, and then goes with every other that did;
/// all of them are republished every [`STEADY_REFRESH`].
#[derive(Debug, Default)]
pub struct Steady {
    last: Option<Published>,
}

/// What [`Steady`] last published.
#[derive(Debug, Clone, Copy)]
struct Published {
    figures: Resources,
    /// When all of them last were.
    refreshed: std::time::Instant,
    /// When figures last moved by their step (or were all refreshed).
    stepped: std::time::Instant,
}

/// CPU percentage points a published figure must move by.
pub const CPU_STEP: u8 = 10;
/// Memory percentage points a published figure must move by.
pub const MEM_STEP: u8 = 2;
/// Disk percentage points a published figure must move by.
pub const DISK_STEP: u8 = 1;
/// Every figure is republished at least this often, however little it
/// moved. Between refreshes a figure is off by less than its step, or was
/// within it at most [`FIGURE_HOLD`] ago.
pub const STEADY_REFRESH: Duration = Duration::from_secs(300);
/// Figures that moved by their step are republished at most this often
/// (all together): a machine's load or CPU can cross a step every few
/// seconds, and each time is a change every member of the site receives.
/// A band change, and so a status, never waits for it.
pub const FIGURE_HOLD: Duration = Duration::from_secs(60);
/// Time constant of the published CPU figure's average: a minute, as for
/// `load1`. A 2 s sample of a shared machine swings by tens of points.
pub const CPU_AVERAGE: Duration = Duration::from_secs(60);

/// The CPU figure's exponentially weighted average over [`CPU_AVERAGE`],
/// each sample weighted by the time since the previous one, so the average
/// does not depend on the sampling interval.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuAverage {
    last: Option<(f64, std::time::Instant)>,
}

impl CpuAverage {
    /// Adds the percentage busy since the previous sample, measured at
    /// `now`, and returns the average.
    pub fn add(&mut self, pct: f64, now: std::time::Instant) -> f64 {
        let avg = match self.last {
            None => pct,
            Some((avg, at)) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                let weight = 1.0 - (-dt / CPU_AVERAGE.as_secs_f64()).exp();
                avg + (pct - avg) * weight
            }
        };
        self.last = Some((avg, now));
        avg
    }
}

impl Steady {
    /// The figures to publish at `now`, given the `fresh` sample.
    pub fn damp(
        &mut self,
        fresh: &Resources,
        now: std::time::Instant,
        cfg: &HealthConfig,
    ) -> Resources {
        let last = match self.last {
            Some(last) if now.saturating_duration_since(last.refreshed) < STEADY_REFRESH => last,
            _ => {
                // The first figures, or a refresh: all of them, as they are.
                self.last = Some(Published {
                    figures: *fresh,
                    refreshed: now,
                    stepped: now,
                });
                return *fresh;
            }
        };
        let may_step = now.saturating_duration_since(last.stepped) >= FIGURE_HOLD;
        let mut stepped = false;
        let band = |v: u8, warn: u8, crit: u8| (v >= warn) as u8 + (v >= crit) as u8;
        let mut pct =
            |old: Option<u8>, new: Option<u8>, step: u8, warn: u8, crit: u8| match (old, new) {
                (Some(o), Some(n)) if band(o, warn, crit) == band(n, warn, crit) => {
                    if o.abs_diff(n) < step || !may_step {
                        Some(o)
                    } else {
                        stepped = true;
                        new
                    }
                }
                _ => new,
            };
        let old = last.figures;
        let out = Resources {
            cpu_pct: pct(old.cpu_pct, fresh.cpu_pct, CPU_STEP, u8::MAX, u8::MAX),
            mem_pct: pct(
                old.mem_pct,
                fresh.mem_pct,
                MEM_STEP,
                cfg.memory_warning_pct,
                cfg.memory_critical_pct,
            ),
            disk_pct: pct(
                old.disk_pct,
                fresh.disk_pct,
                DISK_STEP,
                cfg.disk_warning_pct,
                cfg.disk_critical_pct,
            ),
            load1: match (old.load1, fresh.load1) {
                (Some(o), Some(n)) if (n - o).abs() < (0.25 * o).max(0.5) || !may_step => Some(o),
                (Some(_), Some(_)) => {
                    stepped = true;
                    fresh.load1
                }
                _ => fresh.load1,
            },
        };
        self.last = Some(Published {
            figures: out,
            stepped: if stepped { now } else { last.stepped },
            ..last
        });
        out
    }
}

fn threshold_check(what: &str, value: Option<u8>, warn: u8, crit: u8) -> CheckResult {
    match value {
        None => CheckResult::new(Status::Unknown, format!("{what} use unknown")),
        Some(v) if v >= crit => CheckResult::new(Status::Critical, format!("{v}% used")),
        Some(v) if v >= warn => CheckResult::new(Status::Warning, format!("{v}% used")),
        Some(_) => CheckResult::new(Status::Passing, ""),
    }
}

/// Combines resources and user check results into what a member publishes.
/// The member's status is the worst of its checks, including the built-in
/// `disk` and `memory` threshold checks.
pub fn assess(
    role: Role,
    resources: &Resources,
    checks: &BTreeMap<String, CheckResult>,
    cfg: &HealthConfig,
) -> Health {
    let mut all = checks.clone();
    all.insert(
        "disk".into(),
        threshold_check(
            "disk",
            resources.disk_pct,
            cfg.disk_warning_pct,
            cfg.disk_critical_pct,
        ),
    );
    all.insert(
        "memory".into(),
        threshold_check(
            "memory",
            resources.mem_pct,
            cfg.memory_warning_pct,
            cfg.memory_critical_pct,
        ),
    );
    // Findings (anomalies, forecasts) are reported, not judged: they do
    // not make the member warning or critical, so a burst of work never
    // fails a rollout's health gate.
    let status = all
        .iter()
        .filter(|(name, _)| !crate::foresight::is_finding(name))
        .map(|(_, c)| c.status)
        .max()
        .unwrap_or(Status::Passing);
    Health {
        role: Some(role),
        status,
        cpu_pct: resources.cpu_pct,
        mem_pct: resources.mem_pct,
        disk_pct: resources.disk_pct,
        load1: resources.load1,
        checks: all,
    }
}

fn pct(used: u64, total: u64) -> Option<u8> {
    (total > 0).then(|| {
        ((used as f64 / total as f64) * 100.0)
            .round()
            .clamp(0.0, 100.0) as u8
    })
}

/// Reads the machine's resources. CPU usage is measured between two
/// consecutive samples, so the first sample has none, and published as its
/// one-minute average ([`CpuAverage`]).
pub struct ResourceSampler {
    system: Option<System>,
    disks: Option<Disks>,
    primed: bool,
    cpu: CpuAverage,
}

impl Default for ResourceSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ResourceSampler {
    pub fn new() -> Self {
        let system = System::new()
            .map_err(|e| info!(error = %e, "cannot read CPU and memory; they will be reported as unknown"))
            .ok();
        let disks = Disks::new()
            .map_err(
                |e| info!(error = %e, "cannot read disks; disk use will be reported as unknown"),
            )
            .ok();
        ResourceSampler {
            system,
            disks,
            primed: false,
            cpu: CpuAverage::default(),
        }
    }

    pub fn sample(&mut self) -> Resources {
        self.observe().0
    }

    /// Samples the resources, as published and as [`crate::foresight`]
    /// reads them (exact figures, bytes, every disk by mount point).
    pub fn observe(&mut self) -> (Resources, Observation) {
        let mut r = Resources::default();
        let mut o = Observation::default();
        if let Some(sys) = &mut self.system {
            sys.refresh_cpu_usage();
            sys.refresh_memory();
            if self.primed {
                let busy = f64::from(sys.global_cpu_usage());
                let avg = self.cpu.add(busy, std::time::Instant::now());
                r.cpu_pct = Some(avg.round().clamp(0.0, 100.0) as u8);
                o.cpu_pct = Some(avg.clamp(0.0, 100.0));
            }
            self.primed = true;
            let used = sys.total_memory().saturating_sub(sys.available_memory());
            r.mem_pct = pct(used, sys.total_memory());
            o.mem = (sys.total_memory() > 0).then_some((used, sys.total_memory()));
        }
        if let Some(disks) = &mut self.disks {
            disks.refresh_specifics(true, DiskRefreshKind::nothing().with_storage());
            for d in disks.iter().filter(|d| d.total_space() > 0) {
                let used = d.total_space().saturating_sub(d.available_space());
                r.disk_pct = r.disk_pct.max(pct(used, d.total_space()));
                let mount = d.mount_point().to_string_lossy().into_owned();
                if !o.disks.iter().any(|(m, _, _)| *m == mount) {
                    o.disks.push((mount, used, d.total_space()));
                }
            }
            o.disks.sort();
        }
        r.load1 = System::load_average().ok().map(|l| l.one as f32);
        o.load1 = r.load1.map(f64::from);
        (r, o)
    }
}

/// Runs one check once, never taking longer than `timeout`.
pub async fn run_check(kind: &CheckKind, timeout: Duration, http: &reqwest::Client) -> CheckResult {
    let run = async {
        match kind {
            CheckKind::Command(argv) => command_check(argv).await,
            CheckKind::Http(url) => http_check(http, url, timeout).await,
            CheckKind::Tcp(addr) => match tokio::net::TcpStream::connect(addr.as_str()).await {
                Ok(_) => CheckResult::new(Status::Passing, ""),
                Err(e) => CheckResult::new(Status::Critical, format!("connect {addr}: {e}")),
            },
        }
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => CheckResult::new(
            Status::Critical,
            format!("timed out after {}", humantime::format_duration(timeout)),
        ),
    }
}

async fn command_check(argv: &[String]) -> CheckResult {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match cmd.output().await {
        Err(e) => CheckResult::new(Status::Critical, format!("cannot run {}: {e}", argv[0])),
        Ok(out) => {
            let code = out.status.code().unwrap_or(-1);
            let text = if out.stdout.iter().any(|b| !b.is_ascii_whitespace()) {
                &out.stdout
            } else {
                &out.stderr
            };
            let first_line = String::from_utf8_lossy(text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_owned();
            let status = match out.status.code() {
                Some(c) => Status::from_exit_code(c),
                None => Status::Critical,
            };
            let detail = match (status, first_line.is_empty()) {
                (Status::Passing, _) => first_line,
                (_, true) => format!("exit {code}"),
                (_, false) => format!("exit {code}: {first_line}"),
            };
            CheckResult::new(status, detail)
        }
    }
}

async fn http_check(http: &reqwest::Client, url: &str, timeout: Duration) -> CheckResult {
    match http.get(url).timeout(timeout).send().await {
        Err(e) => CheckResult::new(Status::Critical, format!("GET failed: {}", root_cause(&e))),
        Ok(resp) => {
            let code = resp.status();
            let status = if code.is_success() {
                Status::Passing
            } else if code.as_u16() == 429 {
                Status::Warning
            } else {
                Status::Critical
            };
            let detail = if status == Status::Passing {
                String::new()
            } else {
                format!("HTTP {}", code.as_u16())
            };
            CheckResult::new(status, detail)
        }
    }
}

/// The innermost cause of an error: the part that says what happened.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The HTTP client used by HTTP checks.
pub fn http_client() -> reqwest::Client {
    crate::tls::install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(concat!("trellis-node/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("HTTP client with default settings")
}

/// The configured user checks, each running on its own interval.
#[derive(Clone, Default)]
pub struct Checks {
    results: Arc<Mutex<BTreeMap<String, CheckResult>>>,
}

impl Checks {
    /// Starts one task per check. Results start as unknown until the first
    /// run completes; each run's duration goes to `metrics`.
    pub fn start(
        configs: &[CheckConfig],
        metrics: CheckMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let checks = Checks::default();
        let http = http_client();
        for c in configs {
            checks.results.lock().expect("not poisoned").insert(
                c.name.clone(),
                CheckResult::new(Status::Unknown, "not run yet"),
            );
            let (name, kind, interval, timeout) = (c.name.clone(), c.kind(), c.interval, c.timeout);
            let results = checks.results.clone();
            let shutdown = shutdown.clone();
            let http = http.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut tick = crate::clock::ticker(interval);
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let started = tokio::time::Instant::now();
                    let result = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => break,
                        r = run_check(&kind, timeout, &http) => r,
                    };
                    metrics.observe(&name, started.elapsed());
                    debug!(check = %name, status = %result.status, detail = %result.detail, "check ran");
                    results
                        .lock()
                        .expect("not poisoned")
                        .insert(name.clone(), result);
                }
            });
        }
        checks
    }

    /// The latest result of every check.
    pub fn results(&self) -> BTreeMap<String, CheckResult> {
        self.results.lock().expect("not poisoned").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(cpu: u8, mem: u8, disk: u8, load: f32) -> Resources {
        Resources {
            cpu_pct: Some(cpu),
            mem_pct: Some(mem),
            disk_pct: Some(disk),
            load1: Some(load),
        }
    }

    #[test]
    fn published_figures_hold_until_they_move_by_a_step() {
        let cfg = HealthConfig::default();
        let t0 = std::time::Instant::now();
        let mut steady = Steady::default();
        assert_eq!(
            steady.damp(&figures(40, 50, 30, 1.0), t0, &cfg),
            figures(40, 50, 30, 1.0)
        );
        let t = t0 + Duration::from_secs(2);
        assert_eq!(
            steady.damp(&figures(47, 51, 30, 1.2), t, &cfg),
            figures(40, 50, 30, 1.0)
        );
        // Drift is measured from what was published, not the last sample;
        // figures that moved by their step wait out the hold, then all go.
        let t = t0 + Duration::from_secs(4);
        assert_eq!(
            steady.damp(&figures(50, 52, 31, 1.6), t, &cfg),
            figures(40, 50, 30, 1.0)
        );
        let t = t0 + FIGURE_HOLD;
        assert_eq!(
            steady.damp(&figures(50, 52, 31, 1.6), t, &cfg),
            figures(50, 52, 31, 1.6)
        );
    }

    #[test]
    fn figures_that_step_are_published_at_most_once_a_hold() {
        let cfg = HealthConfig::default();
        let t0 = std::time::Instant::now();
        let mut steady = Steady::default();
        steady.damp(&figures(40, 50, 30, 1.0), t0, &cfg);
        // A load that swings past its step every sample.
        let mut published = Vec::new();
        for i in 1..=90u64 {
            let load = if i % 2 == 0 { 1.0 } else { 2.0 };
            let now = t0 + Duration::from_secs(2 * i);
            published.push((
                2 * i,
                steady.damp(&figures(40, 50, 30, load), now, &cfg).load1,
            ));
        }
        let changes: Vec<u64> = published
            .windows(2)
            .filter(|w| w[0].1 != w[1].1)
            .map(|w| w[1].0)
            .collect();
        // At the first sample past the first hold that differs, then no
        // sooner than a hold after each change: twice in 180 s, not 89
        // times.
        assert_eq!(changes, [62, 124], "{published:?}");
        // A figure entering another band does not wait for the hold.
        let now = t0 + Duration::from_secs(182);
        let got = steady.damp(&figures(40, 95, 30, 2.0), now, &cfg);
        assert_eq!(got.mem_pct, Some(95));
    }

    #[test]
    fn a_figure_entering_a_threshold_band_is_published_at_once() {
        let cfg = HealthConfig::default();
        let t0 = std::time::Instant::now();
        let mut steady = Steady::default();
        steady.damp(&figures(10, 94, 30, 0.1), t0, &cfg);
        let got = steady.damp(&figures(10, 95, 30, 0.1), t0 + Duration::from_secs(2), &cfg);
        assert_eq!(got.mem_pct, Some(95));
        let h = assess(Role::Node, &got, &BTreeMap::new(), &cfg);
        assert_eq!(h.status, Status::Warning);
    }

    #[test]
    fn every_figure_is_republished_after_the_refresh_interval() {
        let cfg = HealthConfig::default();
        let t0 = std::time::Instant::now();
        let mut steady = Steady::default();
        steady.damp(&figures(40, 50, 30, 1.0), t0, &cfg);
        let t = t0 + STEADY_REFRESH - Duration::from_secs(1);
        assert_eq!(
            steady.damp(&figures(41, 51, 30, 1.1), t, &cfg),
            figures(40, 50, 30, 1.0)
        );
        let t = t0 + STEADY_REFRESH;
        assert_eq!(
            steady.damp(&figures(41, 51, 30, 1.1), t, &cfg),
            figures(41, 51, 30, 1.1)
        );
    }

    #[test]
    fn the_cpu_average_follows_a_minute_whatever_the_sampling_interval() {
        let t0 = std::time::Instant::now();
        for every in [1u64, 2, 10] {
            let mut avg = CpuAverage::default();
            assert_eq!(avg.add(0.0, t0), 0.0);
            let mut last = 0.0;
            for i in 1..=60 / every {
                last = avg.add(100.0, t0 + Duration::from_secs(i * every));
            }
            // A step from idle to busy is 1 - 1/e of the way after a minute.
            assert!((last - 63.2).abs() < 0.1, "every {every} s: {last}");
        }
    }

    #[test]
    fn a_jittery_cpu_does_not_move_the_published_figure() {
        let cfg = HealthConfig::default();
        let t0 = std::time::Instant::now();
        let (mut avg, mut steady) = (CpuAverage::default(), Steady::default());
        avg.add(40.0, t0);
        steady.damp(&figures(40, 50, 30, 1.0), t0, &cfg);
        let mut published = Vec::new();
        // Two-second samples of a machine busy 40 % on average, each one
        // 30 points off, for four minutes.
        for i in 1..120u64 {
            let busy = if i % 2 == 0 { 10.0 } else { 70.0 };
            let now = t0 + Duration::from_secs(2 * i);
            let cpu = avg.add(busy, now).round() as u8;
            let out = steady.damp(&figures(cpu, 50, 30, 1.0), now, &cfg);
            published.push(out.cpu_pct.unwrap());
        }
        published.dedup();
        assert_eq!(published, [40]);
        // A sustained change still shows, within about a minute.
        let mut last = 0;
        for i in 120..160u64 {
            let now = t0 + Duration::from_secs(2 * i);
            let cpu = avg.add(95.0, now).round() as u8;
            last = steady
                .damp(&figures(cpu, 50, 30, 1.0), now, &cfg)
                .cpu_pct
                .unwrap();
        }
        assert!(last >= 70, "published {last} after 80 s at 95 %");
    }

    fn res(disk: u8, mem: u8) -> Resources {
        Resources {
            cpu_pct: Some(5),
            mem_pct: Some(mem),
            disk_pct: Some(disk),
            load1: Some(0.1),
        }
    }

    #[test]
    fn a_member_is_as_healthy_as_its_worst_check() {
        let cfg = HealthConfig::default();
        let mut checks = BTreeMap::new();
        checks.insert("a".into(), CheckResult::new(Status::Passing, ""));
        assert_eq!(
            assess(Role::Node, &res(10, 10), &checks, &cfg).status,
            Status::Passing
        );
        checks.insert("b".into(), CheckResult::new(Status::Warning, "slow"));
        assert_eq!(
            assess(Role::Node, &res(10, 10), &checks, &cfg).status,
            Status::Warning
        );
        checks.insert("c".into(), CheckResult::new(Status::Critical, "down"));
        assert_eq!(
            assess(Role::Node, &res(10, 10), &checks, &cfg).status,
            Status::Critical
        );
    }

    #[test]
    fn resource_thresholds_become_builtin_checks() {
        let cfg = HealthConfig::default();
        let h = assess(Role::Node, &res(92, 10), &BTreeMap::new(), &cfg);
        assert_eq!(h.status, Status::Warning);
        assert_eq!(h.checks["disk"].detail, "92% used");
        let h = assess(Role::Node, &res(10, 99), &BTreeMap::new(), &cfg);
        assert_eq!(h.status, Status::Critical);
        assert_eq!(h.checks["memory"].status, Status::Critical);
    }

    #[test]
    fn the_sampler_reads_this_machine() {
        let mut s = ResourceSampler::new();
        let first = s.sample();
        assert!(first.cpu_pct.is_none(), "no CPU figure before two samples");
        let second = s.sample();
        assert!(second.mem_pct.is_some_and(|m| m <= 100));
        assert!(second.cpu_pct.is_some());
        assert!(second.load1.is_some());
    }

    #[tokio::test]
    async fn command_checks_follow_exit_codes() {
        let http = http_client();
        let t = Duration::from_secs(5);
        let sh = |s: &str| CheckKind::Command(vec!["sh".into(), "-c".into(), s.into()]);
        assert_eq!(
            run_check(&sh("exit 0"), t, &http).await.status,
            Status::Passing
        );
        let warn = run_check(&sh("echo degraded; exit 1"), t, &http).await;
        assert_eq!(warn.status, Status::Warning);
        assert_eq!(warn.detail, "exit 1: degraded");
        let crit = run_check(&sh("echo broken >&2; exit 2"), t, &http).await;
        assert_eq!(
            (crit.status, crit.detail.as_str()),
            (Status::Critical, "exit 2: broken")
        );
        let missing = CheckKind::Command(vec!["/nonexistent/trellis-check".into()]);
        let r = run_check(&missing, t, &http).await;
        assert_eq!(r.status, Status::Critical);
        assert!(r.detail.starts_with("cannot run"), "{}", r.detail);
    }

    #[tokio::test]
    async fn a_check_that_hangs_is_critical_after_its_timeout() {
        let http = http_client();
        let hang = CheckKind::Command(vec!["sleep".into(), "30".into()]);
        let start = std::time::Instant::now();
        let r = run_check(&hang, Duration::from_millis(200), &http).await;
        assert_eq!(r.status, Status::Critical);
        assert!(r.detail.contains("timed out"), "{}", r.detail);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    /// The `value` of the first `series` line in `registry`'s text.
    fn sample(registry: &crate::metrics::Registry, series: &str) -> Option<f64> {
        crate::metrics::render(registry)
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[tokio::test]
    async fn every_check_run_is_timed_under_its_name() {
        let mut registry = crate::metrics::Registry::default();
        let metrics = CheckMetrics::register(&mut registry);
        let check = |name: &str, argv: &[&str], timeout_ms: u64| CheckConfig {
            name: name.into(),
            command: Some(argv.iter().map(|a| a.to_string()).collect()),
            http: None,
            tcp: None,
            interval: Duration::from_secs(3600),
            timeout: Duration::from_millis(timeout_ms),
        };
        let configs = [
            check("quick", &["true"], 5000),
            check("hangs", &["sleep", "30"], 200),
        ];
        let shutdown = CancellationToken::new();
        let checks = Checks::start(&configs, metrics, shutdown.clone());
        let count = |c: &str| {
            sample(
                &registry,
                &format!("trellis_node_check_duration_seconds_count{{check=\"{c}\"}}"),
            )
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while (count("quick").is_none() || count("hangs").is_none())
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        assert_eq!(count("quick"), Some(1.0));
        assert_eq!(count("hangs"), Some(1.0));
        assert_eq!(checks.results()["hangs"].status, Status::Critical);
        // The hung check ran into its 200 ms timeout, never less.
        let sum = sample(
            &registry,
            "trellis_node_check_duration_seconds_sum{check=\"hangs\"}",
        )
        .unwrap();
        assert!((0.2..10.0).contains(&sum), "{sum}");
        assert_eq!(
            sample(
                &registry,
                "trellis_node_check_duration_seconds_bucket{le=\"0.1\",check=\"hangs\"}",
            ),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn tcp_and_http_checks_reach_real_sockets() {
        let http = http_client();
        let t = Duration::from_secs(5);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for reply in ["200 OK", "503 Service Unavailable"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let resp =
                    format!("HTTP/1.1 {reply}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let url = format!("http://{addr}/healthz");
        assert_eq!(
            run_check(&CheckKind::Http(url.clone()), t, &http)
                .await
                .status,
            Status::Passing
        );
        let r = run_check(&CheckKind::Http(url), t, &http).await;
        assert_eq!(
            (r.status, r.detail.as_str()),
            (Status::Critical, "HTTP 503")
        );
        server.await.unwrap();
        // The listener is gone: nothing accepts on that port now.
        let r = run_check(&CheckKind::Tcp(addr.to_string()), t, &http).await;
        assert_eq!(r.status, Status::Critical);
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let r = run_check(
            &CheckKind::Tcp(open.local_addr().unwrap().to_string()),
            t,
            &http,
        )
        .await;
        assert_eq!(r.status, Status::Passing);
    }
}
