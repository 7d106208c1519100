//! The gossip model: what chitchat does in a site, cut down to what the
//! rest of the mesh sees, fast enough for 100,000 nodes.
//!
//! It follows chitchat's mechanics (0.11, `server.rs`, `lib.rs`,
//! `failure_detector.rs`) rather than fitting its numbers, and is checked
//! against real chitchat by `tests/calibration.rs`:
//!
//! - **Ticks.** Every running member ticks once per gossip interval at its
//!   own phase; a restarted member's phase starts again when it does (a
//!   fresh `tokio::time::interval` fires at once).
//! - **Peers.** At a tick a member picks [`FANOUT`] peers it believes alive;
//!   with probability `dead / (live + 1)` one address among those with a dead
//!   incarnation (a crashed member, or one whose earlier incarnation is still
//!   listed dead, which reaches the running one); and, if none of its peers
//!   was the seed (the relay), the relay with probability
//!   `1 / (live + dead)`, or always while it knows no one alive.
//! - **Exchanges.** Syn (the initiator's digest), SynAck (the receiver's
//!   digest and the delta the initiator lacks), Ack (the delta the receiver
//!   lacks). Digests carry heartbeats, so both sides end with the newer of
//!   each heartbeat; deltas carry versions. A member's own heartbeat grows
//!   at its tick and with every message it handles. Each message is lost
//!   with the site's LAN loss.
//! - **Failure detector.** Only the relay's (member 0) is kept. A heartbeat
//!   sample is a digest, received by the relay, that carries a newer
//!   heartbeat for a member; the first heartbeat of an incarnation is not a
//!   sample. Intervals longer than [`MAX_INTERVAL_S`] are not kept, the
//!   window holds [`WINDOW`] of them, and the mean has an additive prior of
//!   [`PRIOR_WEIGHT`] intervals of one gossip period. The detector runs at
//!   the relay's tick, after it sent its Syns and before their answers: a
//!   member is dead when the time since its last sample exceeds the
//!   threshold times that mean, and a dead member's samples are forgotten.
//!   What the relay believes — alive or dead, and the version it has — is
//!   the site's [`SiteView`](trellis_node::site::SiteView).
//! - **Restarts.** A restarted member is a new incarnation: no one knows it
//!   and it knows no one, its first heartbeat seen by the relay is not a
//!   sample, and its earlier incarnation stays listed dead (for the dead
//!   node grace period) on the same address.
//!
//! Simplifications:
//! - Members pick their peers from the relay's belief instead of keeping a
//!   failure detector each. Their own detectors see fewer exchanges than the
//!   relay's and call a crash a little later, so for a second or two after a
//!   crash real members still spend Syns on the dead member.
//! - Messages inside a site take no time, and a delta always fits in one
//!   message (chitchat's limit is 64 KiB).
//! - A version is one health publication; the keys it changes and their
//!   sizes come from [`WireShape`] and only matter for [`SiteModel::traffic`].
//! - An incarnation replaced by a restart is treated as already dead (in
//!   chitchat it stays alive at the relay until detected, if the restart was
//!   quicker than detection).

use std::collections::VecDeque;

use crate::rng::SimRng;

/// Intervals kept by the failure detector (as configured by Trellis).
pub const WINDOW: usize = 100;
/// Heartbeat intervals longer than this are not sampled (chitchat's
/// `max_interval`, as configured by Trellis).
pub const MAX_INTERVAL_S: f64 = 10.0;
/// Weight of the prior in the mean interval (chitchat's additive smoothing).
pub const PRIOR_WEIGHT: f64 = 5.0;
/// Peers a member gossips with per round (chitchat's `GOSSIP_COUNT`).
pub const FANOUT: usize = 3;
/// How long a dead incarnation stays listed (Trellis's default
/// `gossip.dead_node_grace`). It leaves digests after half of it.
pub const DEAD_NODE_GRACE_S: f64 = 24.0 * 3600.0;

/// The sizes [`SiteModel::traffic`] assumes for what chitchat sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireShape {
    /// Length of a member's name.
    pub name_bytes: usize,
    /// Length of the cluster id (`trellis/<region>/<site>`).
    pub cluster_id_bytes: usize,
    /// Keys a member publishes.
    pub keys: usize,
    /// Keys one health publication changes (each is a chitchat version).
    pub keys_per_version: usize,
    /// Average serialised key-value mutation: tag, key, value, version,
    /// status.
    pub kv_bytes: usize,
}

impl Default for WireShape {
    /// A Trellis node: `r1-s1-n42`, publishing role, status, cpu, mem,
    /// disk and one check, a change flipping the status and the check.
    fn default() -> Self {
        WireShape {
            name_bytes: 9,
            cluster_id_bytes: 16,
            keys: 6,
            keys_per_version: 2,
            kv_bytes: 26,
        }
    }
}

impl WireShape {
    /// A chitchat id: name, generation, IPv4 socket address.
    fn id_bytes(&self) -> u64 {
        (2 + self.name_bytes + 8 + 7) as u64
    }

    /// A digest of `entries` incarnations.
    fn digest_bytes(&self, entries: u64) -> u64 {
        2 + entries * (self.id_bytes() + 24)
    }

    /// A delta of `nodes` stale incarnations carrying `kvs` mutations.
    fn delta_bytes(&self, nodes: u64, kvs: u64) -> u64 {
        if nodes == 0 {
            // The end-of-stream tag alone.
            1
        } else {
            // One block (header and end tag), a node op per incarnation.
            4 + nodes * (1 + self.id_bytes() + 16) + kvs * self.kv_bytes as u64
        }
    }
}

/// chitchat's message header: magic, protocol version, message type.
const HEADER: u64 = 4;

/// The relay's failure detector state for one member's current
/// incarnation.
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

    /// chitchat's `SamplingWindow::report_heartbeat`.
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
            // chitchat forgets the samples of a node it calls dead (but not
            // when it last heard of it).
            self.intervals.clear();
            self.sum = 0.0;
        }
        self.alive = alive;
        alive
    }
}

/// A change being watched until every member has it or has been down (to
/// measure dissemination).
#[derive(Debug, Clone)]
struct Probe {
    member: usize,
    version: u64,
    since: f64,
    reached: Vec<bool>,
    pending: usize,
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
    /// `known_hb[m * n + x]`: the heartbeat of x's current incarnation that
    /// m has (0: m does not know that incarnation).
    known_hb: Vec<u64>,
    ver: Vec<u64>,
    known_ver: Vec<u64>,
    /// Incarnations each member knows (its digest's length, without the
    /// dead ones of earlier generations).
    known: Vec<u64>,
    detectors: Vec<Detector>,
    /// Each member's tick phase in `[0, interval)` (s), and the members in
    /// phase order.
    phase: Vec<f64>,
    order: Vec<usize>,
    interval: f64,
    threshold: f64,
    start_ms: u64,
    /// The time of the first round: `start_ms` on the generation clock.
    origin: Option<f64>,
    /// Ticks before this time have run.
    clock: f64,
    rng: SimRng,
    loss: f64,
    probes: Vec<Probe>,
    /// Finished dissemination measurements (seconds).
    pub disseminations: Vec<f64>,
    /// A member's version whose arrivals are recorded, and the arrivals
    /// since they were last taken: (member, time).
    watch: Option<(usize, u64)>,
    arrivals: Vec<(usize, f64)>,
    peers: Vec<usize>,
    scratch: Vec<usize>,
    sent: Vec<u64>,
    heard: Vec<bool>,
    pool: Vec<usize>,
    /// Digests each member heard since it started (up to 3), whether its
    /// own detector sees anyone alive, and how many nodes it lists dead
    /// while it does not.
    news: Vec<u8>,
    sees_live: Vec<bool>,
    listed: Vec<usize>,
    /// Members the relay believes alive (itself included), and addresses
    /// with an incarnation it lists dead, kept current at the relay's ticks
    /// (members pick their peers from them).
    believed: Vec<usize>,
    dead: Vec<usize>,
    /// Until when an earlier incarnation of each member stays listed dead.
    listed_until: Vec<f64>,
    /// When earlier incarnations leave digests (in order).
    ghosts: VecDeque<f64>,
    shape: WireShape,
    bytes: u64,
    messages: u64,
}

impl SiteModel {
    /// A site of `n` members (member 0 is the relay), all started at
    /// `start_ms` on the generation clock and knowing of each other. That
    /// moment is taken to be the start of the first round run, so that
    /// [`SiteModel::restart`] can place a restart in time.
    pub fn new(n: usize, interval_s: f64, threshold: f64, start_ms: u64, mut rng: SimRng) -> Self {
        let phase: Vec<f64> = (0..n).map(|_| rng.f64() * interval_s).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| phase[*a].total_cmp(&phase[*b]));
        let mut known_hb = vec![0; n * n];
        let mut known_ver = vec![0; n * n];
        for i in 0..n {
            known_hb[i * n + i] = 1;
            known_ver[i * n + i] = 1;
        }
        SiteModel {
            n,
            up: vec![true; n],
            generation: vec![start_ms; n],
            hb: vec![1; n],
            known_hb,
            ver: vec![1; n],
            known_ver,
            known: vec![1; n],
            detectors: (0..n).map(|_| Detector::new()).collect(),
            phase,
            order,
            interval: interval_s,
            threshold,
            start_ms,
            origin: None,
            clock: f64::NEG_INFINITY,
            rng,
            loss: 0.0,
            probes: Vec::new(),
            disseminations: Vec::new(),
            watch: None,
            arrivals: Vec::new(),
            peers: Vec::new(),
            scratch: Vec::new(),
            sent: Vec::new(),
            heard: Vec::new(),
            pool: Vec::new(),
            news: vec![0; n],
            sees_live: vec![false; n],
            listed: vec![0; n],
            believed: vec![0],
            dead: Vec::new(),
            listed_until: vec![f64::NEG_INFINITY; n],
            ghosts: VecDeque::new(),
            shape: WireShape::default(),
            bytes: 0,
            messages: 0,
        }
    }

    /// The sizes used by [`SiteModel::traffic`].
    pub fn with_wire_shape(mut self, shape: WireShape) -> Self {
        self.shape = shape;
        self
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Every gossip message inside the site is lost with probability `p`
    /// from now on.
    pub fn set_loss(&mut self, p: f64) {
        self.loss = p.clamp(0.0, 1.0);
    }

    /// An estimate of the LAN bytes and messages chitchat would have sent
    /// for the exchanges run so far: digests sized by the incarnations each
    /// sender knows, deltas by the versions the receiver lacks, with the
    /// sizes of [`WireShape`]. Syns to a member that is down count, as they
    /// are sent. Compression of large deltas is ignored. Checked against the
    /// in-memory transport's statistics by `tests/calibration.rs`.
    pub fn traffic(&self) -> (u64, u64) {
        (self.bytes, self.messages)
    }

    pub fn heartbeat(&self, j: usize) -> u64 {
        self.hb[j]
    }

    /// Whether the relay believes member `j` alive (the relay itself is).
    pub fn believed_alive(&self, j: usize) -> bool {
        j == 0 || self.detectors[j].alive
    }

    /// The health version of member `j` the relay has (0: it does not know
    /// `j`'s current incarnation).
    pub fn relay_version(&self, j: usize) -> u64 {
        self.known_ver[j]
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
    /// long it takes to reach every member (a member that is down, or goes
    /// down meanwhile, does not count).
    pub fn bump_and_watch(&mut self, j: usize, t: f64) {
        let v = self.bump(j);
        let reached: Vec<bool> = (0..self.n)
            .map(|m| !self.up[m] || self.known_ver[m * self.n + j] >= v)
            .collect();
        let pending = reached.iter().filter(|r| !**r).count();
        self.probes.push(Probe {
            member: j,
            version: v,
            since: t,
            reached,
            pending,
        });
    }

    /// From now on, records when each member comes to hold member `j`'s
    /// `version` or a later one, as a node watching a key of the relay
    /// would see it change. A member that restarts forgets it and is
    /// recorded again when it learns it anew. Replaces the previous watch.
    pub fn watch(&mut self, j: usize, version: u64) {
        self.watch = Some((j, version));
    }

    /// Members that came to hold the watched version since the last call,
    /// with the time (s) they did, in time order.
    pub fn take_arrivals(&mut self) -> Vec<(usize, f64)> {
        std::mem::take(&mut self.arrivals)
    }

    /// Member `j`'s process stops.
    pub fn crash(&mut self, j: usize) {
        self.up[j] = false;
        for p in &mut self.probes {
            if !p.reached[j] {
                p.reached[j] = true;
                p.pending -= 1;
            }
        }
    }

    /// Member `j` starts again at `now_ms` on the generation clock, as a new
    /// incarnation that knows only itself and that no one knows yet. It
    /// ticks at once (at `now_ms`, or at the first moment not yet run if
    /// that is later) and then every interval. The relay restarting forgets
    /// its failure detector too.
    pub fn restart(&mut self, j: usize, now_ms: u64) {
        let n = self.n;
        let origin = self.origin.unwrap_or(0.0);
        let at = origin + now_ms.saturating_sub(self.start_ms) as f64 / 1000.0;
        let at = if self.clock.is_finite() {
            at.max(self.clock)
        } else {
            at
        };
        self.up[j] = true;
        self.generation[j] = now_ms.max(self.generation[j] + 1);
        self.phase[j] = at.rem_euclid(self.interval);
        self.order
            .sort_by(|a, b| self.phase[*a].total_cmp(&self.phase[*b]));
        // The old incarnation stays listed dead, and in digests for half
        // that time.
        self.listed_until[j] = at + DEAD_NODE_GRACE_S;
        self.ghosts.push_back(at + DEAD_NODE_GRACE_S / 2.0);
        // No one knows the new incarnation...
        for m in 0..n {
            if self.known_hb[m * n + j] != 0 {
                self.known[m] -= 1;
            }
            self.known_hb[m * n + j] = 0;
            self.known_ver[m * n + j] = 0;
        }
        // ...and it knows only itself.
        for x in 0..n {
            self.known_hb[j * n + x] = 0;
            self.known_ver[j * n + x] = 0;
        }
        self.hb[j] = 1;
        self.ver[j] += 1;
        self.known_hb[j * n + j] = 1;
        self.known_ver[j * n + j] = self.ver[j];
        self.known[j] = 1;
        self.news[j] = 0;
        self.sees_live[j] = false;
        self.listed[j] = 0;
        if j == 0 {
            self.reset_relay();
        } else {
            self.detectors[j] = Detector::new();
        }
    }

    /// The relay's view restarts (the relay crashed and came back): it
    /// forgets what it knew of the others and its failure detector.
    pub fn reset_relay(&mut self) {
        for j in 1..self.n {
            if self.known_hb[j] != 0 {
                self.known[0] -= 1;
            }
            self.known_hb[j] = 0;
            self.known_ver[j] = 0;
            self.detectors[j] = Detector::new();
        }
        self.refresh_belief(self.clock);
    }

    /// One gossip round starting at `t0` (seconds): every running member
    /// ticks once, at its phase. `changed` gets the relay's liveness
    /// verdicts that changed, with the time of the relay's tick.
    pub fn round(&mut self, t0: f64, changed: impl FnMut(f64, usize, bool)) {
        self.run(t0, t0 + self.interval, changed);
    }

    /// Runs every tick due in `[from, to)` (seconds), in time order; see
    /// [`SiteModel::round`].
    pub fn run(&mut self, from: f64, to: f64, mut changed: impl FnMut(f64, usize, bool)) {
        self.origin.get_or_insert(from);
        while self.ghosts.front().is_some_and(|g| *g <= from) {
            self.ghosts.pop_front();
        }
        let first = (from / self.interval).floor() as i64;
        let last = (to / self.interval).ceil() as i64;
        for r in first..=last {
            let base = r as f64 * self.interval;
            for k in 0..self.n {
                let i = self.order[k];
                let t = base + self.phase[i];
                if t < from {
                    continue;
                }
                if t >= to {
                    break;
                }
                if self.up[i] {
                    self.tick(i, t, &mut changed);
                }
            }
        }
        self.clock = self.clock.max(to);
    }

    /// Rebuilds the relay's live and dead lists from its detectors.
    fn refresh_belief(&mut self, t: f64) {
        self.believed.clear();
        self.dead.clear();
        for j in 0..self.n {
            if self.believed_alive(j) {
                self.believed.push(j);
                if self.listed_until[j] > t {
                    self.dead.push(j);
                }
            } else if self.known_hb[j] != 0 || self.listed_until[j] > t {
                self.dead.push(j);
            }
        }
    }

    fn tick<F: FnMut(f64, usize, bool)>(&mut self, i: usize, t: f64, changed: &mut F) {
        let n = self.n;
        let mut peers = std::mem::take(&mut self.peers);
        let mut scratch = std::mem::take(&mut self.scratch);
        let mut pool = std::mem::take(&mut self.pool);
        peers.clear();
        // chitchat's `select_nodes_for_gossip`, from the relay's belief once
        // `i`'s own detector would see anyone alive.
        let own = i == 0 || self.sees_live[i];
        let live = if own {
            self.believed.len() - usize::from(self.believed_alive(i))
        } else {
            0
        };
        let dead;
        if live > 0 {
            dead = self.dead.len();
            self.rng
                .sample(self.believed.len(), FANOUT + 1, &mut scratch);
            peers.extend(
                scratch
                    .iter()
                    .map(|&x| self.believed[x])
                    .filter(|j| *j != i)
                    .take(FANOUT),
            );
        } else {
            // No one alive yet: the candidates are all the nodes `i` knows,
            // and its detector has listed those it knew at its previous
            // tick as dead.
            dead = self.listed[i];
            pool.clear();
            pool.extend((0..n).filter(|m| *m != i && self.known_hb[i * n + m] != 0));
            self.rng.sample(pool.len(), FANOUT, &mut scratch);
            peers.extend(scratch.iter().map(|&x| pool[x]));
        }
        let with_seed = peers.contains(&0);
        if dead > 0 && self.rng.chance(dead as f64 / (live + 1) as f64) {
            let j = if live > 0 {
                self.dead[self.rng.below(dead as u64) as usize]
            } else {
                pool[self.rng.below(pool.len() as u64) as usize]
            };
            if j != i {
                peers.push(j);
            }
        }
        if i != 0 && !with_seed {
            let p = if live == 0 {
                1.0
            } else {
                1.0 / (live + dead) as f64
            };
            if self.rng.chance(p) {
                peers.push(0);
            }
        }
        self.pool = pool;
        self.hb[i] += 1;
        self.known_hb[i * self.n + i] = self.hb[i];
        if i == 0 {
            // After sending its Syns, before their answers.
            let prior = self.interval;
            for j in 1..self.n {
                let before = self.detectors[j].alive;
                let after = self.detectors[j].update(t, prior, self.threshold);
                if before != after {
                    changed(t, j, after);
                }
            }
            self.refresh_belief(t);
        } else {
            // Its detector has a sample of the others once it has heard
            // three digests (the first heartbeat is not a sample).
            self.sees_live[i] = self.news[i] >= 3;
        }
        self.listed[i] = self.known[i] as usize - 1;
        self.exchanges(i, &peers, t);
        self.peers = peers;
        self.scratch = scratch;
    }

    fn lost(&mut self) -> bool {
        self.loss > 0.0 && self.rng.chance(self.loss)
    }

    fn send(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.messages += 1;
    }

    /// Incarnations in member `m`'s digest.
    fn digest_entries(&self, m: usize) -> u64 {
        self.known[m] + self.ghosts.len() as u64
    }

    /// `to` learns the heartbeats in `from`'s digest; the relay samples the
    /// newer ones.
    fn take_digest(&mut self, from: usize, to: usize, t: f64) {
        let n = self.n;
        if to == 0 {
            for x in 1..n {
                let (theirs, mine) = (self.known_hb[from * n + x], self.known_hb[x]);
                // The first heartbeat of an incarnation is not a sample.
                if theirs > mine && mine != 0 {
                    self.detectors[x].report(t);
                }
            }
        }
        if self.news[to] < 3 {
            self.news[to] += 1;
        }
        let (src, dst) = rows(&mut self.known_hb, n, from, to);
        let mut learnt = 0;
        for (d, s) in dst.iter_mut().zip(src.iter()) {
            learnt += u64::from(*d == 0 && *s != 0);
            *d = (*d).max(*s);
        }
        self.known[to] += learnt;
    }

    /// `to` applies the versions `from` has, at `t`.
    fn take_delta(&mut self, from: usize, to: usize, t: f64) {
        let n = self.n;
        let (src, dst) = rows(&mut self.known_ver, n, from, to);
        if let Some((j, v)) = self.watch
            && dst[j] < v
            && src[j] >= v
        {
            self.arrivals.push((to, t));
        }
        for (d, s) in dst.iter_mut().zip(src.iter()) {
            *d = (*d).max(*s);
        }
    }

    /// `i`'s exchanges with `peers`, as chitchat runs them: the Syns all
    /// leave at once, each with the digest `i` has at its tick, so a peer
    /// does not hear through `i` what another peer of the same tick told
    /// it; the answers come back one by one, and each Ack carries what `i`
    /// has learnt so far. Each message may be lost.
    fn exchanges(&mut self, i: usize, peers: &[usize], t: f64) {
        let n = self.n;
        let shape = self.shape;
        let syn =
            HEADER + 2 + shape.cluster_id_bytes as u64 + shape.digest_bytes(self.digest_entries(i));
        // The versions in the Syns' digest, which the SynAcks' deltas answer.
        let mut sent = std::mem::take(&mut self.sent);
        sent.clear();
        sent.extend_from_slice(&self.known_ver[i * n..i * n + n]);
        let mut heard = std::mem::take(&mut self.heard);
        heard.clear();
        for &j in peers {
            self.send(syn);
            let delivered = self.up[j] && !self.lost();
            if delivered {
                self.hb[j] += 1;
                self.known_hb[j * n + j] = self.hb[j];
                self.take_digest(i, j, t);
            }
            heard.push(delivered);
        }
        for (&j, _) in peers.iter().zip(&heard).filter(|(_, d)| **d) {
            let (nodes, kvs) = stale(&self.known_ver[j * n..j * n + n], &sent, &shape);
            self.send(
                HEADER + shape.digest_bytes(self.digest_entries(j)) + shape.delta_bytes(nodes, kvs),
            );
            if self.lost() {
                continue;
            }
            self.hb[i] += 1;
            self.known_hb[i * n + i] = self.hb[i];
            self.take_digest(j, i, t);
            if nodes > 0 {
                self.take_delta(j, i, t);
            }
            let (nodes, kvs) = stale(
                &self.known_ver[i * n..i * n + n],
                &self.known_ver[j * n..j * n + n],
                &shape,
            );
            self.send(HEADER + shape.delta_bytes(nodes, kvs));
            if !self.lost() {
                self.hb[j] += 1;
                self.known_hb[j * n + j] = self.hb[j];
                if nodes > 0 {
                    self.take_delta(i, j, t);
                }
            }
            if !self.probes.is_empty() {
                self.check_probes(i, j, t);
            }
        }
        self.sent = sent;
        self.heard = heard;
    }

    fn check_probes(&mut self, i: usize, j: usize, t: f64) {
        let n = self.n;
        let known_ver = &self.known_ver;
        let disseminations = &mut self.disseminations;
        self.probes.retain_mut(|p| {
            for m in [i, j] {
                if !p.reached[m] && known_ver[m * n + p.member] >= p.version {
                    p.reached[m] = true;
                    p.pending -= 1;
                }
            }
            if p.pending == 0 {
                disseminations.push(t - p.since);
                false
            } else {
                true
            }
        });
    }
}

/// The delta a member with versions `have` sends one with `lacks`: the
/// incarnations it is newer on, and their key-values.
fn stale(have: &[u64], lacks: &[u64], shape: &WireShape) -> (u64, u64) {
    let (mut nodes, mut kvs) = (0u64, 0u64);
    for (x, y) in have.iter().zip(lacks) {
        if x > y {
            nodes += 1;
            kvs += if *y == 0 {
                shape.keys as u64
            } else {
                ((x - y) * shape.keys_per_version as u64).min(shape.keys as u64)
            };
        }
    }
    (nodes, kvs)
}

/// Rows `a` (shared) and `b` (mutable) of an n × n matrix (`a != b`).
fn rows(m: &mut [u64], n: usize, a: usize, b: usize) -> (&[u64], &mut [u64]) {
    if a < b {
        let (lo, hi) = m.split_at_mut(b * n);
        (&lo[a * n..(a + 1) * n], &mut hi[..n])
    } else {
        let (lo, hi) = m.split_at_mut(a * n);
        (&hi[..n], &mut lo[b * n..(b + 1) * n])
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
    fn a_restarted_member_comes_back_alive_as_a_new_incarnation() {
        let mut m = site(20);
        run(&mut m, 0, 30);
        m.crash(3);
        run(&mut m, 30, 60);
        assert!(!m.believed_alive(3));
        let before = m.version(3);
        m.restart(3, 60_000);
        assert!(m.generation[3] == 60_000 && m.version(3) > before);
        // The relay does not know the new incarnation yet.
        assert_eq!(m.relay_version(3), 0);
        run(&mut m, 60, 70);
        assert!(m.believed_alive(3));
        assert_eq!(m.relay_version(3), m.version(3));
    }

    #[test]
    fn a_restarted_member_ticks_at_once() {
        let mut m = site(5);
        run(&mut m, 0, 10);
        m.crash(2);
        run(&mut m, 10, 20);
        m.restart(2, 20_000);
        let (_, before) = m.traffic();
        m.run(20.0, 20.0 + 1e-9, |_, _, _| {});
        let (_, after) = m.traffic();
        assert!(after > before, "member 2 did not tick at its restart");
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
    fn a_watched_version_is_recorded_once_per_member_and_again_after_a_restart() {
        let mut m = site(20);
        run(&mut m, 0, 20);
        let v = m.bump(0);
        m.watch(0, v);
        run(&mut m, 20, 40);
        let first = m.take_arrivals();
        let mut members: Vec<usize> = first.iter().map(|a| a.0).collect();
        members.sort_unstable();
        assert_eq!(members, (1..20).collect::<Vec<_>>(), "each member once");
        assert!(first.windows(2).all(|w| w[0].1 <= w[1].1), "in time order");
        assert!(
            first.iter().all(|a| (20.0..30.0).contains(&a.1)),
            "{first:?}"
        );

        // A member that restarts learns it anew; no one else is recorded.
        m.crash(5);
        run(&mut m, 40, 50);
        assert!(m.take_arrivals().is_empty());
        m.restart(5, 50_000);
        run(&mut m, 50, 70);
        let again = m.take_arrivals();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].0, 5);
        assert!(again[0].1 >= 50.0);
    }

    #[test]
    fn running_in_pieces_is_the_same_as_running_whole_rounds() {
        let go = |pieces: &[f64]| {
            let mut m = site(15);
            let mut changes = Vec::new();
            for w in pieces.windows(2) {
                m.run(w[0], w[1], |t, j, a| changes.push((t, j, a)));
            }
            (changes, m.traffic())
        };
        let whole: Vec<f64> = (0..=20).map(f64::from).collect();
        let cut: Vec<f64> = (0..=40).map(|k| f64::from(k) * 0.5).collect();
        assert_eq!(go(&whole), go(&cut));
    }

    #[test]
    fn with_total_loss_no_one_is_ever_seen_alive() {
        let mut m = site(10);
        m.set_loss(1.0);
        run(&mut m, 0, 20);
        assert!((1..10).all(|j| !m.believed_alive(j)));
        let (_, messages) = m.traffic();
        assert!(messages > 0);
    }

    #[test]
    fn traffic_grows_with_the_site() {
        let per_round = |n: usize| {
            let mut m = site(n);
            run(&mut m, 0, 30);
            let (b0, m0) = m.traffic();
            run(&mut m, 30, 40);
            let (b1, m1) = m.traffic();
            ((b1 - b0) as f64 / 10.0, (m1 - m0) as f64 / 10.0)
        };
        let (b10, m10) = per_round(10);
        let (b40, m40) = per_round(40);
        // Messages grow with the members, bytes also with the digests.
        assert!(m40 / m10 > 3.0 && m40 / m10 < 5.0, "{m10} {m40}");
        assert!(b40 / b10 > 10.0, "{b10} {b40}");
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
