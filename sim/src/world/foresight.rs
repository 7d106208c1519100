//! Foresight and runbooks in the world: the modelled nodes' samples, their
//! runbook engines' lease requests to the site's relay, their actions, and
//! the books that check the site limit (the state and the counting rules
//! are in [`foresight`](crate::foresight)).
//!
//! - *Samples.* Every `[foresight] sample_every` each modelled node that
//!   is running takes its figures (exact, plus noise from its own stream)
//!   and hands them to its `Foresight`; the samples of all nodes are taken
//!   in parallel (each touches only its node), what they raised is booked
//!   in node order.
//! - *Looks.* A node's runbook engine looks at its checks (the
//!   `Foresight`'s findings as of its last sample, and the built-in `disk`
//!   check, `trellis_node::health::assess` on the fullest disk now) at
//!   every sample, when an answer or an action comes back, when a refused
//!   lease may be asked again (`LEASE_RETRY`) and when a verification
//!   ends.
//! - *Leases.* A request crosses the LAN to the relay, which answers from
//!   the site's `Leases` (the relay's own table; it survives a relay crash,
//!   as the relay keeps it on disk); a relay that is down does not answer
//!   and the node gives up after `LEASE_TIMEOUT`. A release crosses the LAN
//!   too, and is lost if the relay is down (the lease then expires).
//! - *Actions.* An action runs for its `duration` (killed at the rule's
//!   `timeout`: a failure); when it ends, one that `fixes` frees the disk
//!   or ends the CPU anomaly, and the engine is told how it ended.
//! - *Books.* Nodes remediating at once per site and rule, counted from an
//!   action's start to its lease's release (or the node's crash),
//!   independently of the relay's table: more than `max_per_site` is a
//!   violation, and so is an action that starts without the node holding
//!   a lease at the relay.

use std::collections::BTreeMap;
use std::time::Duration;

use trellis_node::config::HealthConfig;
use trellis_node::foresight::{Foresight, ForesightConfig, Observation};
use trellis_node::health::{Resources, assess};
use trellis_node::id::Role;
use trellis_node::runbook::{ActionOutcome, Engine, LEASE_RETRY, LeaseAnswer, Leases, Step};
use trellis_node::site::Status;

use super::{Ev, LAN, START_MS, World};
use crate::foresight::{
    AnomalyBook, Books, Class, Disk, DiskBook, FsNode, Injected, RuleBook, Summary, TrendSpec,
    normal, pick, trends,
};
use crate::report::ForesightOutcome;
use crate::rng::SimRng;
use crate::scenario::{ForesightSettings, Scenario};

/// How long a node waits for its relay's answer to a lease request (the
/// node's runbook task's `LEASE_TIMEOUT`).
pub const LEASE_TIMEOUT: f64 = 10.0;
/// Bytes of a lease request, answer or release on the LAN (a QUIC stream
/// with a small message).
const LEASE_BYTES: u64 = 256;
/// A look due at a time the engine compares with is made this much after
/// it, so the wall-clock millisecond it gets is not before.
const NUDGE: f64 = 0.001;
/// Violations of one kind listed, at most.
const MAX_VIOLATIONS: usize = 20;

pub(super) enum FsEv {
    /// The modelled nodes sample their figures.
    Sample,
    /// A node's engine looks at its checks.
    Look { node: usize, epoch: u64 },
    /// A lease request reaches the site's relay.
    LeaseAsk {
        node: usize,
        epoch: u64,
        rule: usize,
        max: u32,
        ttl: Duration,
        sent: f64,
    },
    /// The relay's answer (or the node's giving up) reaches the node.
    LeaseAnswer {
        node: usize,
        epoch: u64,
        rule: usize,
        answer: Result<(), String>,
    },
    /// A node's action ends.
    ActionDone {
        node: usize,
        epoch: u64,
        rule: usize,
        timed_out: bool,
        ran_for: f64,
    },
    /// A node's release reaches the relay.
    Release { node: usize, rule: usize },
}

/// The world's event for `e` (no bigger than the world's other events,
/// so the queue's entries keep their size).
pub(super) fn ev(e: FsEv) -> Ev {
    Ev::Foresight(e)
}

/// The modelled nodes, the sites' lease tables and the books.
pub(super) struct Fs {
    settings: ForesightSettings,
    cfg: ForesightConfig,
    health: HealthConfig,
    every: f64,
    trends: Vec<TrendSpec>,
    /// The nodes each trend and anomaly picked, for the schedule.
    trend_picks: Vec<Vec<(usize, usize)>>,
    anomaly_picks: Vec<Vec<(usize, usize)>>,
    nodes: Vec<FsNode>,
    /// (node, disk) → its book; (node, injected index) → its book.
    disk_books: BTreeMap<(usize, usize), usize>,
    anomaly_books: BTreeMap<(usize, usize), usize>,
    /// (site, member) → node.
    index: BTreeMap<(usize, usize), usize>,
    /// Each site's relay's lease table.
    leases: Vec<Leases>,
    books: Books,
    /// LAN latency of lease messages.
    lan: SimRng,
    violations: usize,
    /// The history before time 0 was fed.
    fed: bool,
}

impl Fs {
    /// The modelled nodes of `sc` under `seed`: those its trends and
    /// anomalies pick, and the control nodes.
    pub(super) fn new(sc: &Scenario, seed: u64, names: &[Vec<String>]) -> Fs {
        let settings = sc.foresight.clone();
        let trends = trends(sc);
        let t = &sc.topology;
        let mut picked: BTreeMap<(usize, usize), (Vec<Disk>, Vec<Injected>)> = BTreeMap::new();
        let mut trend_picks = Vec::new();
        for (i, spec) in trends.iter().enumerate() {
            let nodes = pick(sc, seed, "trend-nodes", i, sc.trends[i].selection());
            for &n in &nodes {
                let (disks, _) = picked.entry(n).or_default();
                disks.retain(|d| d.mount != spec.mount);
                disks.push(Disk::filling(spec));
            }
            trend_picks.push(nodes);
        }
        let mut anomaly_picks = Vec::new();
        for (i, a) in sc.anomalies.iter().enumerate() {
            let nodes = pick(sc, seed, "anomaly-nodes", i, a.selection());
            let start = a.at.as_secs_f64();
            for &n in &nodes {
                picked.entry(n).or_default().1.push(Injected {
                    index: i,
                    start,
                    end: start + a.duration.as_secs_f64(),
                    value: a.value,
                });
            }
            anomaly_picks.push(nodes);
        }
        // Control nodes: from the seed, among the nodes given nothing.
        let others: Vec<(usize, usize)> = (0..t.regions * t.sites_per_region)
            .flat_map(|s| (1..=t.nodes_per_site).map(move |k| (s, k)))
            .filter(|n| !picked.contains_key(n))
            .collect();
        let k = settings
            .control_nodes
            .unwrap_or(picked.len())
            .min(others.len());
        let mut rng = SimRng::derive(seed, "control-nodes", 0);
        let mut chosen = Vec::new();
        rng.sample(others.len(), k, &mut chosen);
        for c in chosen {
            picked.entry(others[c]).or_default();
        }

        let cfg = settings.node.clone();
        let size = settings.disk_size.0 as f64;
        let mut nodes = Vec::with_capacity(picked.len());
        let mut index = BTreeMap::new();
        let mut books = Books {
            rules: vec![RuleBook::default(); sc.runbooks.len()],
            ..Books::default()
        };
        let mut disk_books = BTreeMap::new();
        let mut anomaly_books = BTreeMap::new();
        let names_of_sites = sc.site_names();
        for ((s, k), (trended, anomalies)) in picked {
            let i = nodes.len();
            let mut disks = vec![Disk::steady(
                &settings.mount,
                size,
                size * settings.disk_used,
            )];
            for d in trended {
                disks.retain(|x| x.mount != d.mount);
                disks.push(d);
            }
            disks.sort_by(|a, b| a.mount.cmp(&b.mount));
            for (di, d) in disks.iter().enumerate() {
                if d.trend.is_some() {
                    disk_books.insert((i, di), books.disks.len());
                    books.disks.push(DiskBook {
                        node: i,
                        disk: di,
                        ..DiskBook::default()
                    });
                }
            }
            for a in &anomalies {
                anomaly_books.insert((i, a.index), books.anomalies.len());
                books.anomalies.push(AnomalyBook {
                    node: i,
                    injected: a.index,
                    ..AnomalyBook::default()
                });
            }
            let class = if disks.iter().any(|d| d.trend.is_some()) {
                Class::Trend
            } else if !anomalies.is_empty() {
                Class::Anomaly
            } else {
                Class::Control
            };
            let region = crate::scenario::region_name(s / t.sites_per_region + 1);
            let rules: Vec<usize> = sc
                .runbooks
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    (r.sites.is_empty() && r.regions.is_empty())
                        || r.sites.contains(&names_of_sites[s])
                        || r.regions.contains(&region)
                })
                .map(|(ri, _)| ri)
                .collect();
            for &ri in &rules {
                books.rules[ri].nodes += 1;
            }
            let engine = (!rules.is_empty()).then(|| {
                let mut e = Engine::new();
                e.set_rules(
                    rules
                        .iter()
                        .map(|&ri| sc.runbooks[ri].rule.clone())
                        .collect(),
                );
                e
            });
            let global = s * t.nodes_per_site + (k - 1);
            index.insert((s, k), i);
            nodes.push(FsNode {
                site: s,
                member: k,
                name: names[s][k].clone(),
                class,
                disks,
                anomalies,
                rng: SimRng::derive(seed, "foresight-figures", global as u64),
                foresight: Foresight::new(cfg.clone(), None),
                rules,
                engine,
                saved: BTreeMap::new(),
                epoch: 0,
                said: BTreeMap::new(),
                remediating: Vec::new(),
            });
        }
        Fs {
            every: settings.sample_every.as_secs_f64(),
            settings,
            cfg,
            health: HealthConfig::default(),
            trends,
            trend_picks,
            anomaly_picks,
            nodes,
            disk_books,
            anomaly_books,
            index,
            leases: vec![Leases::default(); names.len()],
            books,
            lan: SimRng::derive(seed, "runbook-lan", 0),
            violations: 0,
            fed: false,
        }
    }

    /// Modelled disks full now, and nodes remediating now.
    pub(super) fn gauges(&mut self, now: f64) -> (u64, u64) {
        let mut full = 0;
        for n in &mut self.nodes {
            for d in &mut n.disks {
                d.advance(now);
                full += u64::from(d.full());
            }
        }
        (full, self.books.remediating())
    }
}

/// Runs `f` on every node that is up: in parallel (each touches only its
/// node) when there are enough of them.
fn each_up(nodes: &mut [FsNode], up: &[bool], threads: usize, f: impl Fn(&mut FsNode) + Sync) {
    if threads > 1 && nodes.len() >= 16 {
        let chunk = nodes.len().div_ceil(threads);
        let f = &f;
        std::thread::scope(|scope| {
            for (part, up) in nodes.chunks_mut(chunk).zip(up.chunks(chunk)) {
                scope.spawn(move || {
                    for (n, up) in part.iter_mut().zip(up) {
                        if *up {
                            f(n);
                        }
                    }
                });
            }
        });
    } else {
        for (n, up) in nodes.iter_mut().zip(up) {
            if *up {
                f(n);
            }
        }
    }
}

/// One sample of a node's figures, handed to its `Foresight`.
fn observe(n: &mut FsNode, now: f64, now_ms: u64, s: &ForesightSettings) {
    let cpu = (n.cpu_at(now, s.cpu_pct) + s.cpu_noise * normal(&mut n.rng)).clamp(0.0, 100.0);
    let sigma = s.disk_noise.0 as f64;
    let mut disks = Vec::with_capacity(n.disks.len());
    for d in &mut n.disks {
        d.advance(now);
        let noise = sigma * normal(&mut n.rng);
        let used = if d.full() {
            d.size
        } else {
            (d.used + noise).clamp(0.0, d.size)
        };
        disks.push((d.mount.clone(), used as u64, d.size as u64));
    }
    n.foresight.observe(
        now_ms,
        &Observation {
            cpu_pct: Some(cpu),
            mem: None,
            load1: None,
            disks,
        },
    );
}

impl World {
    pub(super) fn handle_foresight(&mut self, event: FsEv) {
        let Some(mut fs) = self.fs.take() else {
            return;
        };
        match event {
            FsEv::Sample => self.fs_sample(&mut fs),
            FsEv::Look { node, epoch } => {
                if fs.nodes[node].epoch == epoch {
                    self.fs_look(&mut fs, node);
                }
            }
            FsEv::LeaseAsk {
                node,
                epoch,
                rule,
                max,
                ttl,
                sent,
            } => self.fs_lease_ask(&mut fs, node, epoch, rule, max, ttl, sent),
            FsEv::LeaseAnswer {
                node,
                epoch,
                rule,
                answer,
            } => {
                let n = &mut fs.nodes[node];
                if n.epoch != epoch || !self.sites[n.site].is_up(n.member) {
                    // Crashed meanwhile: a granted lease expires at the relay.
                } else if let Some(e) = n.engine.as_mut() {
                    let refused = answer.is_err();
                    let name = self.sc.runbooks[rule].rule.name.clone();
                    let steps = e.leased(self.wall_ms(), &name, answer);
                    if refused {
                        let t = self.now + LEASE_RETRY.as_secs_f64() + NUDGE;
                        self.at(t, ev(FsEv::Look { node, epoch }));
                    }
                    self.fs_steps(&mut fs, node, steps);
                }
            }
            FsEv::ActionDone {
                node,
                epoch,
                rule,
                timed_out,
                ran_for,
            } => self.fs_action_done(&mut fs, node, epoch, rule, timed_out, ran_for),
            FsEv::Release { node, rule } => {
                let site = fs.nodes[node].site;
                if self.sites[site].relay.up {
                    let name = &self.sc.runbooks[rule].rule.name;
                    fs.leases[site].release(name, &fs.nodes[node].name);
                }
            }
        }
        self.fs = Some(fs);
    }

    fn fs_sample(&mut self, fs: &mut Fs) {
        let now = self.now;
        let now_ms = self.wall_ms();
        let up: Vec<bool> = fs
            .nodes
            .iter()
            .map(|n| self.sites[n.site].is_up(n.member))
            .collect();
        let settings = &fs.settings;
        let threads = self.threads;
        if !fs.fed {
            // Before the first sample, the history the nodes have already
            // sampled: steady figures (trends and anomalies start at 0 or
            // later). What it raised is not the run's to count.
            fs.fed = true;
            let h = settings.history.as_secs_f64();
            let steps = (h / fs.every).floor() as u64;
            let history: Vec<(f64, u64)> = (0..steps)
                .map(|k| {
                    let t = k as f64 * fs.every - h;
                    (t, START_MS - ((-t) * 1000.0).round() as u64)
                })
                .collect();
            if !history.is_empty() {
                each_up(&mut fs.nodes, &up, threads, |n| {
                    for &(t, t_ms) in &history {
                        observe(n, t, t_ms, settings);
                    }
                });
            }
            for n in &mut fs.nodes {
                n.said = n
                    .foresight
                    .checks()
                    .iter()
                    .map(|(k, c)| (k.clone(), c.status))
                    .collect();
            }
        }
        each_up(&mut fs.nodes, &up, threads, |n| {
            observe(n, now, now_ms, settings)
        });
        for (i, _) in up.iter().enumerate().filter(|(_, up)| **up) {
            fs_note(fs, i, now);
            self.fs_look(fs, i);
        }
        if now + fs.every <= self.end {
            self.at(now + fs.every, ev(FsEv::Sample));
        }
    }

    /// The node's engine looks at its checks now.
    fn fs_look(&mut self, fs: &mut Fs, i: usize) {
        let now = self.now;
        let now_ms = self.wall_ms();
        let n = &mut fs.nodes[i];
        if n.engine.is_none() || !self.sites[n.site].is_up(n.member) {
            return;
        }
        for d in &mut n.disks {
            d.advance(now);
        }
        let mut checks = n.foresight.checks().clone();
        let resources = Resources {
            disk_pct: Some(n.disk_pct()),
            ..Resources::default()
        };
        if let Some(disk) = assess(Role::Node, &resources, &BTreeMap::new(), &fs.health)
            .checks
            .remove("disk")
        {
            checks.insert("disk".to_owned(), disk);
        }
        let Some(e) = n.engine.as_mut() else {
            return;
        };
        let steps = e.observe(now_ms, &checks);
        self.fs_steps(fs, i, steps);
    }

    /// Does what a node's engine asked, and books what it recorded.
    fn fs_steps(&mut self, fs: &mut Fs, i: usize, steps: Vec<Step>) {
        let now = self.now;
        let now_ms = self.wall_ms();
        let (site, epoch) = (fs.nodes[i].site, fs.nodes[i].epoch);
        let rule_of = |sc: &Scenario, name: &str| {
            sc.runbooks
                .iter()
                .position(|r| r.rule.name == name)
                .unwrap_or(0)
        };
        for step in steps {
            match step {
                Step::AskLease { rule, max, ttl } => {
                    let rule = rule_of(&self.sc, &rule);
                    fs.books.rules[rule].lease_requests += 1;
                    self.traffic[LAN].add(LEASE_BYTES);
                    let d = self.links[LAN].one_way(&mut fs.lan);
                    self.at(
                        now + d,
                        ev(FsEv::LeaseAsk {
                            node: i,
                            epoch,
                            rule,
                            max,
                            ttl,
                            sent: now,
                        }),
                    );
                }
                Step::Run { rule, timeout, .. } => {
                    let r = rule_of(&self.sc, &rule);
                    let max = self.sc.runbooks[r].rule.max_per_site;
                    let wanted = self.sc.runbooks[r].duration.as_secs_f64();
                    if let Some(n) = fs.books.start(site, r, max, now) {
                        self.fs_violation(
                            fs,
                            format!(
                                "runbook {rule}: {n} nodes of {} remediating at once at {now:.3} s \
                                 (max_per_site {max})",
                                self.sites[site].name
                            ),
                        );
                    }
                    fs.leases[site].expire(now_ms);
                    let name = fs.nodes[i].name.clone();
                    if !fs.leases[site].holders(&rule).contains(&name) {
                        self.fs_violation(
                            fs,
                            format!(
                                "runbook {rule}: {name} started its action at {now:.3} s without \
                                 holding a lease at its relay"
                            ),
                        );
                    }
                    fs.nodes[i].remediating.push(r);
                    let timed_out = wanted > timeout.as_secs_f64();
                    let ran_for = if timed_out {
                        timeout.as_secs_f64()
                    } else {
                        wanted
                    };
                    self.at(
                        now + ran_for,
                        ev(FsEv::ActionDone {
                            node: i,
                            epoch,
                            rule: r,
                            timed_out,
                            ran_for,
                        }),
                    );
                }
                Step::Release { rule } => {
                    let r = rule_of(&self.sc, &rule);
                    let n = &mut fs.nodes[i];
                    if let Some(p) = n.remediating.iter().position(|x| *x == r) {
                        n.remediating.remove(p);
                        fs.books.stop(site, r);
                    }
                    self.traffic[LAN].add(LEASE_BYTES);
                    let d = self.links[LAN].one_way(&mut fs.lan);
                    self.at(now + d, ev(FsEv::Release { node: i, rule: r }));
                }
            }
        }
        let records = match fs.nodes[i].engine.as_mut() {
            Some(e) => e.take_records(),
            None => Vec::new(),
        };
        for r in records {
            let rule = rule_of(&self.sc, &r.rule);
            fs.books
                .records(i, site, rule, std::slice::from_ref(&r), now);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn fs_lease_ask(
        &mut self,
        fs: &mut Fs,
        node: usize,
        epoch: u64,
        rule: usize,
        max: u32,
        ttl: Duration,
        sent: f64,
    ) {
        let now = self.now;
        let site = fs.nodes[node].site;
        if !self.sites[site].relay.up {
            fs.books.rules[rule].no_relay += 1;
            let answer = Err(format!(
                "no lease: the relay did not answer within {}s",
                LEASE_TIMEOUT
            ));
            self.at(
                sent + LEASE_TIMEOUT,
                ev(FsEv::LeaseAnswer {
                    node,
                    epoch,
                    rule,
                    answer,
                }),
            );
            return;
        }
        let name = &self.sc.runbooks[rule].rule.name;
        let answer = match fs.leases[site].ask(self.wall_ms(), name, &fs.nodes[node].name, max, ttl)
        {
            LeaseAnswer::Granted { .. } => Ok(()),
            LeaseAnswer::Busy { holders, max } => {
                let b = &mut fs.books.rules[rule];
                b.busy += 1;
                b.busy_nodes.insert(node);
                b.sites.entry(site).or_default()[2] += 1;
                Err(format!(
                    "{} of {max} allowed at the site already remediate: {}",
                    holders.len(),
                    holders.join(", ")
                ))
            }
        };
        self.traffic[LAN].add(LEASE_BYTES);
        let d = self.links[LAN].one_way(&mut fs.lan);
        self.at(
            now + d,
            ev(FsEv::LeaseAnswer {
                node,
                epoch,
                rule,
                answer,
            }),
        );
    }

    fn fs_action_done(
        &mut self,
        fs: &mut Fs,
        node: usize,
        epoch: u64,
        rule: usize,
        timed_out: bool,
        ran_for: f64,
    ) {
        let now = self.now;
        let n = &mut fs.nodes[node];
        if n.epoch != epoch || !self.sites[n.site].is_up(n.member) {
            return;
        }
        let spec = &self.sc.runbooks[rule];
        let mut output = "changed nothing".to_owned();
        if spec.fixes && !timed_out {
            let check = spec.rule.check.as_str();
            if check == "anomaly:cpu" {
                for a in n.anomalies.iter_mut() {
                    if a.start <= now && now < a.end {
                        a.end = now;
                        output = "restarted the busy service".to_owned();
                    }
                }
            } else {
                for d in &mut n.disks {
                    d.advance(now);
                }
                let which = match check.strip_prefix("forecast:disk:") {
                    Some(m) => n.disks.iter().position(|d| d.mount == m),
                    None => (0..n.disks.len()).max_by(|&a, &b| {
                        n.disks[a]
                            .pct()
                            .total_cmp(&n.disks[b].pct())
                            .then(b.cmp(&a))
                    }),
                };
                if let Some(di) = which {
                    let before = n.disks[di].used;
                    n.disks[di].free(now, spec.used_after);
                    output = format!(
                        "freed {:.1} GB on {}",
                        (before - n.disks[di].used) / 1e9,
                        n.disks[di].mount
                    );
                    if let Some(&b) = fs.disk_books.get(&(node, di)) {
                        let b = &mut fs.books.disks[b];
                        b.fixed.get_or_insert(now);
                        b.fixes += 1;
                    }
                }
            }
        }
        let outcome = ActionOutcome {
            exit_code: (!timed_out).then_some(0),
            timed_out,
            output,
            duration_ms: (ran_for * 1000.0).round() as u64,
        };
        let name = spec.rule.name.clone();
        let verify = spec.rule.verify.as_secs_f64();
        let Some(e) = fs.nodes[node].engine.as_mut() else {
            return;
        };
        let steps = e.ran(self.wall_ms(), &name, outcome);
        self.fs_steps(fs, node, steps);
        // It verifies: at once (the `disk` check follows the disk), and
        // when its verification is over.
        self.fs_look(fs, node);
        self.at(now + verify + NUDGE, ev(FsEv::Look { node, epoch }));
    }

    fn fs_violation(&mut self, fs: &mut Fs, v: String) {
        fs.violations += 1;
        if fs.violations <= MAX_VIOLATIONS {
            self.violations.push(v);
        }
    }

    pub(super) fn fs_node_crashed(&mut self, s: usize, j: usize) {
        let Some(fs) = self.fs.as_mut() else {
            return;
        };
        let Some(&i) = fs.index.get(&(s, j)) else {
            return;
        };
        let n = &mut fs.nodes[i];
        n.epoch += 1;
        for r in std::mem::take(&mut n.remediating) {
            fs.books.stop(s, r);
        }
        if let Some(mut e) = n.engine.take() {
            let records = e.take_records();
            n.saved = e.states();
            for r in records {
                if let Some(rule) = self.sc.runbooks.iter().position(|x| x.rule.name == r.rule) {
                    fs.books
                        .records(i, s, rule, std::slice::from_ref(&r), self.now);
                }
            }
        }
    }

    /// A restarted node starts its baselines again (an empty `Foresight`)
    /// and its engine from the states it saved.
    pub(super) fn fs_node_restarted(&mut self, s: usize, j: usize) {
        let Some(fs) = self.fs.as_mut() else {
            return;
        };
        let Some(&i) = fs.index.get(&(s, j)) else {
            return;
        };
        let n = &mut fs.nodes[i];
        n.foresight = Foresight::new(fs.cfg.clone(), None);
        n.said.clear();
        if !n.rules.is_empty() {
            let mut e = Engine::new();
            e.restore(std::mem::take(&mut n.saved));
            e.set_rules(
                n.rules
                    .iter()
                    .map(|&r| self.sc.runbooks[r].rule.clone())
                    .collect(),
            );
            n.engine = Some(e);
        }
    }

    /// The report's section, with every disk moved to the end.
    pub(super) fn foresight_outcome(&mut self) -> Option<ForesightOutcome> {
        let end = self.end;
        let fs = self.fs.as_mut()?;
        fs.gauges(end);
        let names = self.sc.site_names();
        Some(
            Summary {
                sc: &self.sc,
                nodes: &fs.nodes,
                trends: &fs.trends,
                books: &fs.books,
                site_names: &names,
                end,
            }
            .outcome(),
        )
    }

    /// The schedule names the nodes each trend and anomaly picked.
    pub(super) fn foresight_schedule(&self, mut s: Scenario) -> Scenario {
        let Some(fs) = self.fs.as_ref() else {
            return s;
        };
        let name = |&(site, k): &(usize, usize)| self.sites[site].members[k].clone();
        for (t, picks) in s.trends.iter_mut().zip(&fs.trend_picks) {
            t.sites.clear();
            t.regions.clear();
            t.fraction = None;
            t.nodes = picks.iter().map(name).collect();
        }
        for (a, picks) in s.anomalies.iter_mut().zip(&fs.anomaly_picks) {
            a.sites.clear();
            a.regions.clear();
            a.fraction = None;
            a.nodes = picks.iter().map(name).collect();
        }
        s
    }
}

/// Books what node `i`'s `Foresight` raised or cleared since its last
/// sample.
fn fs_note(fs: &mut Fs, i: usize, now: f64) {
    let n = &mut fs.nodes[i];
    let mut changes = Vec::new();
    for (name, r) in n.foresight.checks() {
        let prev = n.said.get(name).copied();
        if prev != Some(r.status) {
            changes.push((name.clone(), prev, r.status));
        }
    }
    let raised = |s: Option<Status>| matches!(s, Some(Status::Warning | Status::Critical));
    for (name, prev, status) in changes {
        n.said.insert(name.clone(), status);
        let (up, was) = (raised(Some(status)), raised(prev));
        let mut cause = true;
        if let Some(m) = name.strip_prefix("forecast:disk:") {
            match n
                .disks
                .iter()
                .position(|d| d.mount == m && d.trend.is_some() && now >= d.from)
            {
                Some(di) if up => {
                    if let Some(&b) = fs.disk_books.get(&(i, di)) {
                        let b = &mut fs.books.disks[b];
                        b.warned.get_or_insert(now);
                        if status == Status::Critical {
                            b.critical.get_or_insert(now);
                        }
                    }
                }
                Some(_) => {}
                None => cause = false,
            }
        } else if name == "anomaly:cpu" {
            let every = fs.every;
            let hit = n
                .anomalies
                .iter()
                .find(|a| a.start <= now && now <= a.end + every);
            match hit {
                Some(a) if up => {
                    if let Some(&b) = fs.anomaly_books.get(&(i, a.index)) {
                        fs.books.anomalies[b].flagged.get_or_insert(now);
                    }
                }
                Some(_) => {}
                None => cause = false,
            }
            if !up && was {
                for a in &n.anomalies {
                    if let Some(&b) = fs.anomaly_books.get(&(i, a.index)) {
                        let b = &mut fs.books.anomalies[b];
                        if b.flagged.is_some() && b.cleared.is_none() && now >= a.end {
                            b.cleared = Some(now);
                        }
                    }
                }
            }
        } else if name == "anomaly:disk" {
            cause = n.disks.iter().any(|d| d.trend.is_some() && now >= d.from);
        } else {
            cause = false;
        }
        if up && !was && !cause {
            fs.books.false_alarms.push((i, name, now));
        }
    }
}
