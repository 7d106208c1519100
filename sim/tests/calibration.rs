//! The gossip model against real chitchat.
//!
//! The same sites — 30 members, Trellis's production gossip settings — go
//! through the same crashes, restarts and health changes twice: once as
//! [`SiteModel`], once as [`RealSite`] (every member a real chitchat on a
//! paused tokio clock). The model must match real chitchat within 15% on
//! the median and 99th percentile of
//!
//! - failure detection: a member crashes → the relay calls it dead;
//! - dissemination: a member publishes new health → every member has it;
//!
//! and on the LAN traffic it estimates. Real chitchat seeds its own RNG,
//! so its figures move from run to run; the sample counts keep that
//! sampling noise to a few percent, well inside the tolerance. Nothing
//! here reads the wall clock, so machine load does not change a figure.

use std::thread;

use trellis_node::config::GossipConfig;
use trellis_node::gossip::GossipSettings;
use trellis_node::site::{CheckResult, Health, Status};
use trellis_sim::model::{SiteModel, WireShape};
use trellis_sim::real::RealSite;
use trellis_sim::rng::SimRng;

const SEED: u64 = 0x7e11_15ca_11b8;
/// Members per site, the relay included.
const MEMBERS: usize = 30;
/// Independent sites (each with its own phases and schedule), run two at a
/// time. Many short sites rather than a few long ones: every restart leaves
/// a dead incarnation in every digest for hours, which makes a long-lived
/// site's messages, and simulating them, ever more expensive.
const SITES: usize = 8;
/// Virtual seconds before the first event, for every member to be seen.
const WARM_S: f64 = 30.0;
/// Virtual seconds of events per site.
const RUN_S: f64 = 500.0;
/// Mean time between crashes in a site; a crashed member restarts 12 to 20
/// seconds later, and at most `MAX_DOWN` are down at once.
const CRASH_EVERY_S: f64 = 4.0;
const MAX_DOWN: usize = 4;
/// Mean time between health changes in a site.
const CHANGE_EVERY_S: f64 = 1.0;
const TOLERANCE: f64 = 0.15;

const CHECK: &str = "check:app";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    Crash(usize),
    Restart(usize),
    /// The member publishes new health (the `k`-th change of the site).
    Change(usize, usize),
}

/// One site's events, in time order, and when each member was down.
struct Schedule {
    events: Vec<(f64, Event)>,
    down: Vec<Vec<(f64, f64)>>,
}

impl Schedule {
    /// Crashes (of members that have been up a while), restarts, and health
    /// changes by members that stay up long enough to be measured.
    fn new(site: usize) -> Self {
        let mut rng = SimRng::derive(SEED, "calibration-schedule", site as u64);
        let end = WARM_S + RUN_S;
        let ms = |t: f64| (t * 1000.0).round() / 1000.0;
        let mut down: Vec<Vec<(f64, f64)>> = vec![Vec::new(); MEMBERS];
        let mut up_since = vec![0.0; MEMBERS];
        let mut down_until = vec![0.0_f64; MEMBERS];
        let mut events = Vec::new();
        let mut t = WARM_S;
        loop {
            t = ms(t + rng.exp(CRASH_EVERY_S));
            if t >= end - 30.0 {
                break;
            }
            let down_now = (1..MEMBERS).filter(|j| down_until[*j] > t).count();
            if down_now >= MAX_DOWN {
                continue;
            }
            // Up, and up long enough for the relay to have it alive.
            let candidates: Vec<usize> = (1..MEMBERS)
                .filter(|j| down_until[*j] <= t && t - up_since[*j] >= 15.0)
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let j = candidates[rng.below(candidates.len() as u64) as usize];
            let back = ms(t + 12.0 + 8.0 * rng.f64());
            down[j].push((t, back));
            down_until[j] = back;
            up_since[j] = back;
            events.push((t, Event::Crash(j)));
            events.push((back, Event::Restart(j)));
        }
        let mut s = Schedule { events, down };
        let mut t = WARM_S;
        let mut k = 0;
        loop {
            t = ms(t + rng.exp(CHANGE_EVERY_S));
            if t >= end - 20.0 {
                break;
            }
            // The owner stays up until it is measured, and was up for a
            // while (so that everyone knows its incarnation).
            let owners: Vec<usize> = (1..MEMBERS)
                .filter(|j| s.up_throughout(*j, t - 15.0, t + 20.0))
                .collect();
            if owners.is_empty() {
                continue;
            }
            let j = owners[rng.below(owners.len() as u64) as usize];
            s.events.push((t, Event::Change(j, k)));
            k += 1;
        }
        s.events.sort_by(|a, b| a.0.total_cmp(&b.0));
        s
    }

    fn up_throughout(&self, j: usize, from: f64, to: f64) -> bool {
        self.down[j].iter().all(|(c, r)| *r <= from || *c >= to)
    }

    fn up_at(&self, j: usize, t: f64) -> bool {
        self.down[j].iter().all(|(c, r)| t < *c || t >= *r)
    }

    fn crashes(&self) -> impl Iterator<Item = (usize, f64, f64)> + '_ {
        self.down
            .iter()
            .enumerate()
            .flat_map(|(j, d)| d.iter().map(move |(c, r)| (j, *c, *r)))
    }
}

fn name(j: usize) -> String {
    if j == 0 {
        "r1-s1-relay".to_owned()
    } else {
        format!("r1-s1-n{j}")
    }
}

/// Health as a Trellis node publishes it; `k` makes the check's detail
/// unique so that its arrival can be recognised.
fn health(k: Option<usize>) -> Vec<(String, String)> {
    let (status, detail) = match k {
        None => (Status::Passing, String::new()),
        Some(k) if k % 2 == 0 => (Status::Warning, format!("probe {k}")),
        Some(k) => (Status::Passing, format!("probe {k}")),
    };
    Health {
        role: Some(trellis_node::id::Role::Node),
        status,
        cpu_pct: Some(37),
        mem_pct: Some(52),
        disk_pct: Some(61),
        load1: None,
        checks: [("app".to_owned(), CheckResult::new(status, &detail))]
            .into_iter()
            .collect(),
    }
    .to_kv()
}

fn check_value(k: usize) -> String {
    health(Some(k))
        .into_iter()
        .find(|(key, _)| key == CHECK)
        .map(|(_, v)| v)
        .expect("health has the check")
}

/// What one run of one site measured.
#[derive(Default)]
struct Figures {
    detection: Vec<f64>,
    recovery: Vec<f64>,
    dissemination: Vec<f64>,
    undetected: usize,
    false_suspicions: usize,
    /// Bytes and messages sent after the warm-up.
    bytes: u64,
    messages: u64,
}

impl Figures {
    fn merge(&mut self, o: Figures) {
        self.detection.extend(o.detection);
        self.recovery.extend(o.recovery);
        self.dissemination.extend(o.dissemination);
        self.undetected += o.undetected;
        self.false_suspicions += o.false_suspicions;
        self.bytes += o.bytes;
        self.messages += o.messages;
    }
}

fn settings() -> GossipSettings {
    // Production defaults: 1.5 s interval, phi threshold 5.5.
    GossipConfig::default().settings()
}

/// Detection, recovery and false suspicions from the relay's verdicts
/// `(time, member, alive)` of the current incarnations.
fn verdicts(s: &Schedule, changes: &[(f64, usize, bool)], f: &mut Figures) {
    for (j, crashed, back) in s.crashes() {
        match changes
            .iter()
            .find(|(t, m, alive)| *m == j && !alive && *t >= crashed && *t < back)
        {
            Some((t, _, _)) => f.detection.push(t - crashed),
            None => f.undetected += 1,
        }
        if let Some((t, _, _)) = changes
            .iter()
            .find(|(t, m, alive)| *m == j && *alive && *t >= back)
        {
            f.recovery.push(t - back);
        }
    }
    f.false_suspicions += changes
        .iter()
        .filter(|(t, j, alive)| !alive && s.up_throughout(*j, t - 5.0, *t))
        .count();
}

fn run_model(site: usize, s: &Schedule) -> Figures {
    let interval = settings().interval.as_secs_f64();
    let shape = WireShape {
        name_bytes: (0..MEMBERS).map(|j| name(j).len()).sum::<usize>() / MEMBERS,
        cluster_id_bytes: "trellis/r1/r1-s1".len(),
        keys: health(None).len(),
        keys_per_version: 2,
        kv_bytes: 30,
    };
    let mut m = SiteModel::new(
        MEMBERS,
        interval,
        settings().phi_threshold,
        0,
        SimRng::derive(SEED, "calibration-model", site as u64),
    )
    .with_wire_shape(shape);
    let mut changes = Vec::new();
    let mut clock = 0.0;
    let mut advance = |m: &mut SiteModel, to: f64| {
        m.run(clock, to, |t, j, alive| changes.push((t, j, alive)));
        clock = to;
    };
    advance(&mut m, WARM_S);
    let start = m.traffic();
    for &(t, e) in &s.events {
        advance(&mut m, t);
        match e {
            Event::Crash(j) => m.crash(j),
            Event::Restart(j) => m.restart(j, (t * 1000.0).round() as u64),
            Event::Change(j, _) => m.bump_and_watch(j, t),
        }
    }
    advance(&mut m, WARM_S + RUN_S);
    let mut f = Figures {
        dissemination: std::mem::take(&mut m.disseminations),
        ..Figures::default()
    };
    let end = m.traffic();
    (f.bytes, f.messages) = (end.0 - start.0, end.1 - start.1);
    verdicts(s, &changes, &mut f);
    f
}

fn run_real(site: usize, s: &Schedule) -> Figures {
    let members = (0..MEMBERS).map(|j| (name(j), health(None))).collect();
    let mut r = RealSite::new(
        "r1",
        "r1-s1",
        members,
        &settings(),
        0,
        SimRng::derive(SEED, "calibration-real", site as u64),
    )
    .expect("the site starts");
    r.watch_key(CHECK);
    r.advance_to(WARM_S);
    let start = r.traffic();
    let mut generations: Vec<u64> = (0..MEMBERS).map(|j| r.generation(j)).collect();
    let mut changes = Vec::new();
    // The relay's verdicts on current incarnations only.
    let mut collect = |r: &mut RealSite, generations: &[u64]| {
        for c in r.take_liveness_changes() {
            if c.generation == generations[c.member] {
                changes.push((c.at, c.member, c.alive));
            }
        }
    };
    let mut probes = Vec::new();
    for &(t, e) in &s.events {
        r.advance_to(t);
        collect(&mut r, &generations);
        match e {
            Event::Crash(j) => r.crash(j),
            Event::Restart(j) => {
                r.restart(j, health(None)).expect("the member restarts");
                generations[j] = r.generation(j);
            }
            Event::Change(j, k) => {
                r.set(j, health(Some(k)));
                probes.push((t, j, k));
            }
        }
    }
    r.advance_to(WARM_S + RUN_S);
    collect(&mut r, &generations);
    let end = r.traffic();
    let mut f = Figures {
        bytes: end.0 - start.0,
        messages: end.1 - start.1,
        ..Figures::default()
    };
    for (p, &(t0, j, k)) in probes.iter().enumerate() {
        // chitchat sends only a key's latest value: a member that gets a
        // later change of the same member first has this one too.
        let arrivals: Vec<(usize, f64)> = probes[p..]
            .iter()
            .filter(|later| later.1 == j)
            .flat_map(|later| r.arrivals(j, CHECK, &check_value(later.2)))
            .collect();
        let mut last = t0;
        for m in (0..MEMBERS).filter(|m| s.up_at(*m, t0)) {
            let first = arrivals
                .iter()
                .filter(|(o, _)| *o == m)
                .map(|(_, at)| *at)
                .min_by(f64::total_cmp);
            match first {
                Some(at) if s.up_throughout(m, t0, at) => last = last.max(at),
                // A member that goes down before the change reaches it
                // does not count, as in the model.
                _ => assert!(
                    !s.up_throughout(m, t0, WARM_S + RUN_S),
                    "change {k} of member {j} never reached member {m}"
                ),
            }
        }
        f.dissemination.push(last - t0);
    }
    verdicts(s, &changes, &mut f);
    f
}

fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[test]
fn the_gossip_model_matches_real_chitchat_within_fifteen_percent() {
    let schedules: Vec<Schedule> = (0..SITES).map(Schedule::new).collect();
    let mut model = Figures::default();
    for (i, s) in schedules.iter().enumerate() {
        model.merge(run_model(i, s));
    }
    // Real sites, two at a time (each on its own current-thread runtime).
    let mut real = Figures::default();
    let halves: Vec<Vec<Figures>> = thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let schedules = &schedules;
                scope.spawn(move || {
                    (0..SITES)
                        .filter(|i| i % 2 == w)
                        .map(|i| run_real(i, &schedules[i]))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a real site panicked"))
            .collect()
    });
    for f in halves.into_iter().flatten() {
        real.merge(f);
    }

    // Every fault fired, and was seen.
    let crashes: usize = schedules.iter().map(|s| s.crashes().count()).sum();
    assert!(crashes >= 500, "only {crashes} crashes");
    assert_eq!(
        real.detection.len(),
        crashes,
        "real chitchat missed crashes"
    );
    assert_eq!(model.detection.len(), crashes, "the model missed crashes");
    assert_eq!((real.false_suspicions, model.false_suspicions), (0, 0));

    let seconds = (SITES as f64) * RUN_S;
    let rows = [
        (
            "detection p50 (s)",
            quantile(&model.detection, 0.5),
            quantile(&real.detection, 0.5),
            true,
        ),
        (
            "detection p99 (s)",
            quantile(&model.detection, 0.99),
            quantile(&real.detection, 0.99),
            true,
        ),
        (
            "dissemination p50 (s)",
            quantile(&model.dissemination, 0.5),
            quantile(&real.dissemination, 0.5),
            true,
        ),
        (
            "dissemination p99 (s)",
            quantile(&model.dissemination, 0.99),
            quantile(&real.dissemination, 0.99),
            true,
        ),
        (
            "recovery p50 (s)",
            quantile(&model.recovery, 0.5),
            quantile(&real.recovery, 0.5),
            false,
        ),
        (
            "recovery p99 (s)",
            quantile(&model.recovery, 0.99),
            quantile(&real.recovery, 0.99),
            false,
        ),
        (
            "bytes/s per site",
            model.bytes as f64 / seconds,
            real.bytes as f64 / seconds,
            true,
        ),
        (
            "messages/s per site",
            model.messages as f64 / seconds,
            real.messages as f64 / seconds,
            true,
        ),
    ];
    println!(
        "{SITES} sites of {MEMBERS} for {RUN_S} s: {crashes} crashes, {} / {} changes (model / real)",
        model.dissemination.len(),
        real.dissemination.len()
    );
    println!(
        "{:<24} {:>10} {:>10} {:>8}",
        "figure", "model", "real", "diff"
    );
    let mut off = Vec::new();
    for (what, m, r, checked) in rows {
        let diff = (m - r) / r;
        println!(
            "CALIBRATION {what:<24} {m:>10.3} {r:>10.3} {:>+7.1}%{}",
            diff * 100.0,
            if checked { "" } else { "  (not checked)" }
        );
        if checked && diff.abs() > TOLERANCE {
            off.push(what);
        }
    }
    assert!(
        off.is_empty(),
        "the model is more than 15% off real chitchat on {off:?}"
    );
}
