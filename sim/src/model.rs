//! The gossip model: what chitchat does in a site, cut down to what the
//! rest of the mesh sees, fast enough for 100,000 nodes.
//!
//! It follows chitchat's mechanics rather than fitting its numbers. Every
//! member ticks once per gossip interval (at its own phase) and exchanges
//! digests and deltas with up to three members it believes alive (and, now
//! and then, one it believes dead). An exchange leaves both sides with the
//! newer of each member's heartbeat and health version; each side's own
//! heartbeat grows with every message it handles, as in chitchat. The
//! relay (member 0) runs chitchat's phi-accrual failure detector on the
//! heartbeat updates it sees: a window of 100 intervals, an additive prior
//! of five intervals of one gossip period, and a member is dead when the
//! time since its last update exceeds `phi_threshold` mean intervals. What
//! the relay believes — alive or dead, and the health version it has — is
//! the site's [`SiteView`](trellis_node::site::SiteView).
//!
//! Simplifications: members pick peers from the relay's belief instead of
//! keeping a failure detector each; messages inside a site take no time; a
//! delta always fits in one message.

use std::collections::VecDeque;

use crate::rng::SimRng;

/// Intervals kept by the failure detector (as configured by Trellis).
pub const WINDOW: usize = 100;
/// Heartbeat intervals longer than this are not sampled (chitchat's
/// `max_interval`).
pub const MAX_INTERVAL_S: f64 = 10.0;
/// Weight of the prior in the mean interval (chitchat's additive smoothing).
pub const PRIOR_WEIGHT: f64 = 5.0;
/// Peers a member gossips with per round.
pub const FANOUT: usize = 3;

/// The relay's failure detector state for one member.
#[derive(Debug, Clone)]
struct Detector {
    last: Option<f64>,
    intervals: VecDeque<f64>,
    sum: f64,
    alive: bool,
}

impl Detector {
    fn new() -> Self {
        Detector {
            last: None,
            intervals: VecDeque::with_capacity(WINDOW),
            sum: 0.0,
            alive: false,
        }
    }

    fn report(&mut self, t: f64) {
        if let Some(last) = self.last {
            let i = t - last;
            if i <= MAX_INTERVAL_S {
                if self.intervals.len() == WINDOW {
                    self.sum -= self.intervals.pop_front().unwrap_or(0.0);
                }
                self.intervals.push_back(i);
                self.sum += i;
            }
        }
        self.last = Some(t);
    }

    /// chitchat's `update_node_liveness`.
    fn update(&mut self, t: f64, prior: f64, threshold: f64) -> bool {
        let alive = match (self.intervals.len(), self.last) {
            (0, _) | (_, None) => false,
            (n, Some(last)) => {
                let mean = (self.sum + PRIOR_WEIGHT * prior) / (n as f64 + PRIOR_WEIGHT);
                (t - last) / mean <= threshold
            }
        };
        if !alive {
            // chitchat forgets the samples of a node it calls dead.
            self.intervals.clear();
            self.sum = 0.0;
        }
        self.alive = alive;
        alive
    }
}

/// A change being watched until every alive member has it (to measure
/// dissemination).
#[derive(Debug, Clone)]
struct Probe {
    member: usize,
    version: u64,
    since: f64,
    reached: Vec<bool>,
}

/// One site's gossip.
#[derive(Debug, Clone)]
pub struct SiteModel {
    n: usize,
    /// Whether each member's process runs.
    pub up: Vec<bool>,
    /// Each member's start time (ms), chitchat's generation.
    pub generation: Vec<u64>,
    hb: Vec<u64>,
    known_hb: Vec<u64>,
    ver: Vec<u64>,
    known_ver: Vec<u64>,
    detectors: Vec<Detector>,
    /// Members in the order they tick within a round, and their phase (s).
    order: Vec<(f64, usize)>,
    interval: f64,
    threshold: f64,
    rng: SimRng,
    probes: Vec<Probe>,
    /// Finished dissemination measurements (seconds).
    pub disseminations: Vec<f64>,
    peers: Vec<usize>,
    /// Members the relay believes alive, and those it believes dead, kept
    /// current at the relay's ticks (members pick their peers from them).
    believed: Vec<usize>,
    doubted: Vec<usize>,
    scratch: Vec<usize>,
}

/// Both slices become their elementwise maximum.
fn merge_max(a: &mut [u64], b: &mut [u64]) {
    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
        let m = (*x).max(*y);
        *x = m;
        *y = m;
    }
}

/// Two distinct rows of an n × n matrix, mutably.
fn rows(m: &mut [u64], n: usize, i: usize, j: usize) -> (&mut [u64], &mut [u64]) {
    if i < j {
        let (lo, hi) = m.split_at_mut(j * n);
        (&mut lo[i * n..(i + 1) * n], &mut hi[..n])
    } else {
        let (lo, hi) = m.split_at_mut(i * n);
        let (b, a) = (&mut lo[j * n..(j + 1) * n], &mut hi[..n]);
        (a, b)
    }
}

impl SiteModel {
    /// A site of `n` members (member 0 is the relay), all started at
    /// `start_ms` and knowing of each other.
    pub fn new(n: usize, interval_s: f64, threshold: f64, start_ms: u64, mut rng: SimRng) -> Self {
        let mut order: Vec<(f64, usize)> = (0..n).map(|i| (rng.f64() * interval_s, i)).collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0));
        SiteModel {
            n,
            up: vec![true; n],
            generation: vec![start_ms; n],
            hb: vec![1; n],
            known_hb: vec![0; n * n],
            ver: vec![1; n],
            known_ver: vec![0; n * n],
            detectors: (0..n).map(|_| Detector::new()).collect(),
            order,
            interval: interval_s,
            threshold,
            rng,
            probes: Vec::new(),
            disseminations: Vec::new(),
            peers: Vec::new(),
            // At first every member is a candidate, as chitchat picks among
            // every known node before any is live.
            believed: (0..n).collect(),
            doubted: Vec::new(),
            scratch: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Whether the relay believes member `j` alive (the relay itself is).
    pub fn believed_alive(&self, j: usize) -> bool {
        j == 0 || self.detectors[j].alive
    }

    /// The health version of member `j` the relay has.
    pub fn relay_version(&self, j: usize) -> u64 {
        if j == 0 {
            self.ver[0]
        } else {
            self.known_ver[j]
        }
    }

    /// Member `j`'s own health version.
    pub fn version(&self, j: usize) -> u64 {
        self.ver[j]
    }

    /// Member `j` publishes new health.
    pub fn bump(&mut self, j: usize) -> u64 {
        self.ver[j] += 1;
        self.known_ver[j * self.n + j] = self.ver[j];
        self.ver[j]
    }

    /// Member `j` publishes new health at `t` and the model records how
    /// long it takes to reach every member alive.
    pub fn bump_and_watch(&mut self, j: usize, t: f64) {
        let v = self.bump(j);
        let reached = (0..self.n)
            .map(|m| !self.up[m] || self.known_ver[m * self.n + j] >= v)
            .collect();
        self.probes.push(Probe {
            member: j,
            version: v,
            since: t,
            reached,
        });
    }

    /// Member `j`'s process stops.
    pub fn crash(&mut self, j: usize) {
        self.up[j] = false;
    }

    /// Member `j` starts again at `now_ms` (a new generation).
    pub fn restart(&mut self, j: usize, now_ms: u64) {
        self.up[j] = true;
        self.generation[j] = now_ms;
        self.hb[j] += 1;
        self.known_hb[j * self.n + j] = self.hb[j];
    }

    /// The relay's view restarts (the relay crashed and came back): it
    /// forgets what it knew of the others.
    pub fn reset_relay(&mut self) {
        for j in 1..self.n {
            self.known_hb[j] = 0;
            self.known_ver[j] = 0;
            self.detectors[j] = Detector::new();
        }
    }

    /// One gossip round starting at `t0` (seconds): every running member
    /// ticks at its phase. Returns the times (s) the relay's failure
    /// detector ran, with the members whose liveness changed then.
    pub fn round(&mut self, t0: f64, mut changed: impl FnMut(f64, usize, bool)) {
        let prior = self.interval;
        for k in 0..self.order.len() {
            let (phase, i) = self.order[k];
            if !self.up[i] {
                continue;
            }
            let t = t0 + phase;
            self.tick(i, t);
            if i == 0 {
                for j in 1..self.n {
                    let before = self.detectors[j].alive;
                    let after = self.detectors[j].update(t, prior, self.threshold);
                    if before != after {
                        changed(t, j, after);
                    }
                }
                self.refresh_belief();
            }
        }
    }

    /// Rebuilds the believed-alive and believed-dead lists from the
    /// relay's detectors.
    fn refresh_belief(&mut self) {
        self.believed.clear();
        self.doubted.clear();
        for j in 0..self.n {
            if self.believed_alive(j) {
                self.believed.push(j);
            } else {
                self.doubted.push(j);
            }
        }
        if self.believed.len() <= 1 {
            // Nothing live yet: everyone is a candidate.
            self.believed = (0..self.n).collect();
            self.doubted.clear();
        }
    }

    fn tick(&mut self, i: usize, t: f64) {
        self.hb[i] += 1;
        self.known_hb[i * self.n + i] = self.hb[i];
        let mut peers = std::mem::take(&mut self.peers);
        let mut scratch = std::mem::take(&mut self.scratch);
        // FANOUT peers among those believed alive, other than itself.
        self.rng
            .sample(self.believed.len(), FANOUT + 1, &mut scratch);
        peers.clear();
        peers.extend(
            scratch
                .iter()
                .map(|&x| self.believed[x])
                .filter(|j| *j != i)
                .take(FANOUT),
        );
        // Now and then, a node believed dead (it may be back).
        let (live, dead) = (self.believed.len(), self.doubted.len());
        if dead > 0 && self.rng.chance(dead as f64 / (live + 1) as f64) {
            let j = self.doubted[self.rng.below(dead as u64) as usize];
            if j != i {
                peers.push(j);
            }
        }
        for &j in &peers {
            if self.up[j] {
                self.exchange(i, j, t);
            }
        }
        self.peers = peers;
        self.scratch = scratch;
    }

    /// Syn, SynAck, Ack between `i` and `j`: both end with the newer of
    /// everything.
    fn exchange(&mut self, i: usize, j: usize, t: f64) {
        let n = self.n;
        self.hb[i] += 2; // handles SynAck, then its own heartbeat moves on
        self.hb[j] += 2; // handles Syn and Ack
        self.known_hb[i * n + i] = self.hb[i];
        self.known_hb[j * n + j] = self.hb[j];
        if i == 0 || j == 0 {
            // The relay's view of x grows: a heartbeat sample.
            let other = if i == 0 { j } else { i };
            for x in 1..n {
                if self.known_hb[other * n + x] > self.known_hb[x] {
                    self.detectors[x].report(t);
                }
            }
        }
        let (a, b) = rows(&mut self.known_hb, n, i, j);
        merge_max(a, b);
        let (a, b) = rows(&mut self.known_ver, n, i, j);
        merge_max(a, b);
        if !self.probes.is_empty() {
            self.check_probes(t);
        }
    }

    fn check_probes(&mut self, t: f64) {
        let n = self.n;
        let mut done = Vec::new();
        for (k, p) in self.probes.iter_mut().enumerate() {
            let mut all = true;
            for m in 0..n {
                if !p.reached[m] {
                    if !self.up[m] || self.known_ver[m * n + p.member] >= p.version {
                        p.reached[m] = true;
                    } else {
                        all = false;
                    }
                }
            }
            if all {
                done.push(k);
                self.disseminations.push(t - p.since);
            }
        }
        for k in done.into_iter().rev() {
            self.probes.remove(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(n: usize) -> SiteModel {
        SiteModel::new(n, 1.0, 8.0, 0, SimRng::new(42))
    }

    fn run(m: &mut SiteModel, from: u64, to: u64) -> Vec<(f64, usize, bool)> {
        let mut changes = Vec::new();
        for r in from..to {
            m.round(r as f64, |t, j, alive| changes.push((t, j, alive)));
        }
        changes
    }

    #[test]
    fn every_member_is_seen_alive_within_a_few_rounds() {
        let mut m = site(30);
        run(&mut m, 0, 5);
        assert!((0..30).all(|j| m.believed_alive(j)));
    }

    #[test]
    fn a_crashed_member_is_detected_dead_after_some_seconds_and_no_one_else_is() {
        let mut m = site(30);
        run(&mut m, 0, 60);
        m.crash(7);
        let changes = run(&mut m, 60, 120);
        let deaths: Vec<&(f64, usize, bool)> = changes.iter().filter(|c| !c.2).collect();
        assert_eq!(deaths.len(), 1, "{changes:?}");
        let (t, j, _) = deaths[0];
        assert_eq!(*j, 7);
        let latency = t - 60.0;
        assert!(latency > 1.0 && latency < 20.0, "{latency}");
    }

    #[test]
    fn a_restarted_member_comes_back_alive() {
        let mut m = site(20);
        run(&mut m, 0, 30);
        m.crash(3);
        run(&mut m, 30, 60);
        assert!(!m.believed_alive(3));
        m.restart(3, 60_000);
        run(&mut m, 60, 70);
        assert!(m.believed_alive(3));
    }

    #[test]
    fn a_change_reaches_everyone_in_a_few_rounds() {
        let mut m = site(50);
        run(&mut m, 0, 20);
        m.bump_and_watch(9, 20.0);
        run(&mut m, 20, 40);
        assert_eq!(m.disseminations.len(), 1);
        let d = m.disseminations[0];
        assert!(d > 0.0 && d < 10.0, "{d}");
        assert_eq!(m.relay_version(9), m.version(9));
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        let go = || {
            let mut m = site(25);
            run(&mut m, 0, 30);
            m.crash(4);
            run(&mut m, 30, 60)
        };
        assert_eq!(go(), go());
    }
}
