//! Patch rollouts in the world: how a patch and a rollout's orders, the
//! artifact's chunks, announcements, node health and the relays' reports
//! move, and when each gate is judged. The state and the counting rules
//! are in [`patch`](crate::patch).
//!
//! - *Publish.* The patch is stored at its hub at `at` (the operator
//!   retries while the hub is down), pushed to the hubs it believes alive
//!   and pulled at anti-entropy by the others, artifact bytes and all.
//! - *Orders.* The rollout's hub plans the waves with `plan_waves` and, at
//!   each wave, gives the relays of the wave's sites their orders: the
//!   nodes ordered so far and whether to roll back. Orders travel from the
//!   rollout's hub, through the hub the relay is connected to (a hub-link
//!   hop), over the relay's uplink; a relay that is cut off gets them
//!   after its session opens again. They are sent again every
//!   [`RESEND_AFTER`] until delivered.
//! - *Artifact.* A relay with orders fetches the artifact from the hub it
//!   is connected to, once that hub holds it: chunks of
//!   `trellis_node::patch::CHUNK_SIZE`, [`WINDOW`] in flight, over the
//!   uplink's hub → relay pipe. Chunks it holds survive a lost connection
//!   and a crash, so a fetch resumes where it stopped.
//! - *Nodes.* With the artifact cached, the relay announces the orders in
//!   its site's gossip; a node that sees it (the gossip model's arrivals,
//!   or the key's in real chitchat) fetches the artifact over the LAN,
//!   installs, bakes, and publishes `healthy` or, if the patch broke it,
//!   `failed` during the bake. The relay learns a status when it reaches it
//!   through gossip (checked after each gossip step).
//! - *Gates.* The relay rolls its site back at once when its patched nodes
//!   fail more than the gate allows; the hub judges the current wave every
//!   hub tick from the relays' reports and its fleet view (pending nodes of
//!   unreachable sites left out), halts on a failed gate or a relay's
//!   report that it rolled back, and then orders every relay with patched
//!   nodes to roll back (with `auto_rollback`).

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_node::waves::gate;
use trellis_relay::summary::SiteStatus;

use super::{Ev, HUB, LAN, Session, WAN, World};
use crate::patch::{Awaiting, PatchSpec, Phase, Seen, Stage, fails_early, failure_at, site_counts};
use crate::report::RolloutOutcome;
use crate::site::Gossip;

/// Chunks a relay has in flight while it fetches an artifact.
pub const WINDOW: u64 = 8;
/// Orders or a report not delivered after this long are sent again.
pub const RESEND_AFTER: f64 = 10.0;
/// Bytes of a patch's signed manifest, which travels with its artifact.
const MANIFEST_BYTES: u64 = 4 * 1024;

/// The gossip key a relay announces a rollout's orders under (real
/// chitchat sites; modelled ones use a new version of the relay's state).
pub fn announce_key(patch: &PatchSpec) -> String {
    format!("patch:{}", patch.name)
}

/// The gossip key a node publishes its status for a patch under.
fn status_key(patch: &PatchSpec) -> String {
    format!("patch:{}:status", patch.name)
}

impl World {
    fn holds_patch(&self, h: usize, p: usize) -> bool {
        self.hubs[h].patches & (1 << p) != 0
    }

    /// The hub a rollout is driven from: the one its patch was published
    /// at.
    fn rollout_hub(&self, r: usize) -> usize {
        self.patches[self.rollouts[r].spec.patch].hub
    }

    pub(super) fn handle_patch(&mut self, ev: Ev) {
        match ev {
            Ev::PublishPatch(p) => self.publish_patch(p),
            Ev::RolloutStart(r) => self.rollout_tick(r),
            Ev::PatchReplicated { to, from, patch } if self.hubs_linked(to, from) => {
                self.hubs[to].patch_pulling[from] = None;
                self.hub_gets_patch(to, patch, false);
            }
            Ev::PatchPull { to, from, patch } => {
                if !self.hubs_linked(to, from) || !self.holds_patch(to, patch) {
                    return;
                }
                let now = self.now;
                let bytes = self.patches[patch].artifact_bytes + MANIFEST_BYTES;
                self.traffic[HUB].add(bytes);
                let (links, storm) = (self.links[HUB], self.storm[HUB]);
                let arrival =
                    self.hubs[to].pipes[from].send(now, bytes, &links, storm, &mut self.net);
                self.at(
                    arrival,
                    Ev::PatchReplicated {
                        to: from,
                        from: to,
                        patch,
                    },
                );
            }
            Ev::PatchOrders {
                site,
                conn,
                rollout,
                seq,
                ordered,
                rollback,
            } => {
                if !self.uplink_delivers(site, conn) {
                    return;
                }
                self.relay_gets_orders(rollout, site, seq, &ordered, rollback);
            }
            Ev::ArtifactChunk {
                site,
                conn,
                rollout,
                chunk,
            } => {
                if !self.uplink_delivers(site, conn) {
                    return;
                }
                self.relay_gets_chunk(rollout, site, conn, chunk);
            }
            Ev::PatchReport {
                site,
                via,
                rollout,
                seq,
                seen,
                tripped,
            } => {
                let h = self.rollout_hub(rollout);
                if !self.path_up(site, via) || !(via == h || self.hubs_linked(via, h)) {
                    return;
                }
                self.hub_gets_report(rollout, site, seq, seen, tripped);
            }
            Ev::PatchSeen {
                site,
                node,
                epoch,
                rollout,
            } if self.node_current(rollout, site, node, epoch) => {
                self.node_sees_orders(rollout, site, node);
            }
            Ev::PatchFetched {
                site,
                node,
                epoch,
                relay_epoch,
                rollout,
            } => {
                if !self.node_current(rollout, site, node, epoch) {
                    return;
                }
                let r = &self.sites[site].relay;
                let relay_back = r.up;
                let sr = &mut self.rollouts[rollout].sites[site];
                let rolling_back = sr.relay.rollback;
                let n = &mut sr.nodes[node];
                if !r.up || r.epoch != relay_epoch {
                    // The relay went away during the fetch: fetch again
                    // from the restarted relay, or when it announces.
                    n.stage = Stage::Idle;
                    if relay_back {
                        self.node_sees_orders(rollout, site, node);
                    }
                    return;
                }
                if rolling_back {
                    n.stage = Stage::Idle;
                    return;
                }
                n.stage = Stage::Installing;
                n.touched = true;
                let install = self.patches[self.rollouts[rollout].spec.patch].install_time;
                let now = self.now;
                self.at(
                    now + install,
                    Ev::PatchInstalled {
                        site,
                        node,
                        epoch,
                        rollout,
                    },
                );
            }
            Ev::PatchInstalled {
                site,
                node,
                epoch,
                rollout,
            } => {
                if !self.node_current(rollout, site, node, epoch) {
                    return;
                }
                self.rollouts[rollout].sites[site].nodes[node].installed = true;
                if self.rollouts[rollout].sites[site].relay.rollback {
                    self.start_rollback(rollout, site, node);
                } else {
                    self.start_bake(rollout, site, node);
                }
            }
            Ev::PatchChecksFail {
                site,
                node,
                epoch,
                rollout,
            } => {
                if !self.node_current(rollout, site, node, epoch) {
                    return;
                }
                let now = self.now;
                let ro = &mut self.rollouts[rollout];
                let n = &mut ro.sites[site].nodes[node];
                if n.stage != Stage::Baking {
                    return;
                }
                n.stage = Stage::Failed;
                if !n.failed {
                    n.failed = true;
                    ro.failed_nodes += 1;
                }
                ro.first_failure.get_or_insert(now);
                self.publish_status(rollout, site, node, Seen::Failed);
            }
            Ev::PatchBaked {
                site,
                node,
                epoch,
                rollout,
            } => {
                if !self.node_current(rollout, site, node, epoch) {
                    return;
                }
                let n = &mut self.rollouts[rollout].sites[site].nodes[node];
                if n.stage != Stage::Baking {
                    return;
                }
                n.stage = Stage::Healthy;
                self.publish_status(rollout, site, node, Seen::Healthy);
            }
            Ev::PatchRolledBack {
                site,
                node,
                epoch,
                rollout,
            } => {
                if !self.node_current(rollout, site, node, epoch) {
                    return;
                }
                let now = self.now;
                let ro = &mut self.rollouts[rollout];
                let sr = &mut ro.sites[site];
                let n = &mut sr.nodes[node];
                n.installed = false;
                n.stage = Stage::Idle;
                ro.rolled_back += 1;
                ro.last_rolled_back = Some(ro.last_rolled_back.map_or(now, |t| t.max(now)));
                if sr.relay.tripped_at.is_some()
                    && sr.local_done.is_none()
                    && !sr
                        .nodes
                        .iter()
                        .any(|n| n.installed || n.stage == Stage::Installing)
                {
                    sr.local_done = Some(now);
                }
                self.publish_status(rollout, site, node, Seen::RolledBack);
            }
            _ => {}
        }
    }

    /// Whether the node runs and the event is from its current run.
    fn node_current(&self, rollout: usize, site: usize, node: usize, epoch: u64) -> bool {
        self.sites[site].is_up(node)
            && self.rollouts[rollout].sites[site].nodes[node].epoch == epoch
    }

    /// Whether a message on the relay's uplink session `conn` gets through
    /// (if not, the connection is done for, as with any QUIC stream).
    fn uplink_delivers(&mut self, site: usize, conn: u64) -> bool {
        let wan_down = self.sites[site].wan_down;
        let hub_up = match &self.sites[site].relay.session {
            Session::Connected(c) => self.hubs[c.hub].up,
            _ => return false,
        };
        let Session::Connected(c) = &mut self.sites[site].relay.session else {
            return false;
        };
        if c.conn != conn || c.broken {
            return false;
        }
        if wan_down > 0 || !hub_up {
            c.broken = true;
            return false;
        }
        true
    }

    // ---- hubs --------------------------------------------------------

    /// The operator publishes patch `p` at its hub; while the hub is down
    /// it retries (each hub tick).
    fn publish_patch(&mut self, p: usize) {
        let h = self.patches[p].hub;
        if self.published[p].is_some() || !self.hubs[h].up {
            return;
        }
        self.published[p] = Some(self.now);
        self.hub_gets_patch(h, p, true);
    }

    /// Hub `h` holds patch `p` from now; as its origin it pushes it to the
    /// hubs it believes alive (the others pull it at anti-entropy).
    fn hub_gets_patch(&mut self, h: usize, p: usize, origin: bool) {
        let now = self.now;
        if !self.hubs[h].up || self.holds_patch(h, p) {
            return;
        }
        self.hubs[h].patches |= 1 << p;
        if !origin {
            return;
        }
        let bytes = self.patches[p].artifact_bytes + MANIFEST_BYTES;
        for g in 0..self.hubs.len() {
            if g == h || !self.believes_alive(h, g) {
                continue;
            }
            self.traffic[HUB].add(bytes);
            if !self.hubs_linked(h, g) {
                continue;
            }
            let (links, storm) = (self.links[HUB], self.storm[HUB]);
            let arrival = self.hubs[h].pipes[g].send(now, bytes, &links, storm, &mut self.net);
            self.at(
                arrival,
                Ev::PatchReplicated {
                    to: g,
                    from: h,
                    patch: p,
                },
            );
        }
    }

    /// At anti-entropy, hub `h` asks peer `g` for the first patch `g`'s
    /// gossip shows that `h` lacks.
    pub(super) fn pull_patches(&mut self, h: usize, g: usize) {
        let now = self.now;
        let theirs = self.hubs[h].peers[g].as_ref().map_or(0, |p| p.patches);
        let missing = theirs & !self.hubs[h].patches;
        let asked = self.hubs[h].patch_pulling[g].is_some_and(|t| now - t < super::PULL_TIMEOUT);
        if missing == 0 || asked {
            return;
        }
        let patch = missing.trailing_zeros() as usize;
        self.traffic[HUB].add(16);
        self.hubs[h].patch_pulling[g] = Some(now);
        if !self.hubs_linked(h, g) {
            return;
        }
        let (links, storm) = (self.links[HUB], self.storm[HUB]);
        let arrival = self.hubs[h].pipes[g].send(now, 16, &links, storm, &mut self.net);
        self.at(
            arrival,
            Ev::PatchPull {
                to: g,
                from: h,
                patch,
            },
        );
    }

    /// Every hub tick: patches the operator is still trying to publish,
    /// rollouts whose time has come, orders, fetches and reports due, and
    /// the gates.
    pub(super) fn patch_tick(&mut self) {
        for p in 0..self.patches.len() {
            if self.published[p].is_none() && self.now >= self.patches[p].at {
                self.publish_patch(p);
            }
        }
        for r in 0..self.rollouts.len() {
            self.rollout_tick(r);
        }
    }

    fn rollout_tick(&mut self, r: usize) {
        let now = self.now;
        let h = self.rollout_hub(r);
        let patch = self.rollouts[r].spec.patch;
        let ro = &self.rollouts[r];
        if ro.started.is_none() {
            if now < ro.spec.at || !self.hubs[h].up || !self.holds_patch(h, patch) {
                return;
            }
            self.rollouts[r].started = Some(now);
            if self.rollouts[r].plan.is_empty() {
                self.rollouts[r].phase = Phase::Completed;
                self.rollouts[r].ended = Some(now);
                return;
            }
            self.start_wave(r, 0);
        }
        for s in 0..self.sites.len() {
            let sr = &self.rollouts[r].sites[s];
            if sr.hub.order_seq == 0 {
                continue;
            }
            self.send_orders(r, s);
            self.try_fetch(r, s);
            self.send_report(r, s);
        }
        if let Phase::Wave(w) = self.rollouts[r].phase
            && self.hubs[h].up
        {
            self.judge(r, w);
        }
    }

    /// The rollout's hub orders wave `w`'s nodes to install.
    fn start_wave(&mut self, r: usize, w: usize) {
        let now = self.now;
        let ro = &mut self.rollouts[r];
        ro.phase = Phase::Wave(w);
        ro.waves[w].started = Some(now);
        let nodes = ro.plan[w].nodes.clone();
        let mut last = usize::MAX;
        for (s, j) in nodes {
            let hs = &mut ro.sites[s].hub;
            hs.ordered[j] = true;
            if s != last {
                hs.order_seq += 1;
                last = s;
            }
        }
    }

    /// Sends a site's relay its orders if it lacks the newest and none are
    /// on their way: through the hub the relay is connected to, which must
    /// be linked to the rollout's hub.
    fn send_orders(&mut self, r: usize, s: usize) {
        let now = self.now;
        let h = self.rollout_hub(r);
        let hs = &self.rollouts[r].sites[s].hub;
        let relay_has = self.rollouts[r].sites[s].relay.order_seq;
        if hs.order_seq <= relay_has || hs.sending.is_some_and(|(_, t)| now - t < RESEND_AFTER) {
            return;
        }
        let Session::Connected(c) = &self.sites[s].relay.session else {
            return;
        };
        let (g, conn) = (c.hub, c.conn);
        if !self.hubs[h].up
            || !self.hubs[g].conns.contains_key(&conn)
            || !(g == h || self.hubs_linked(g, h))
        {
            return;
        }
        let hop = if g == h {
            0.0
        } else {
            self.links[HUB].one_way(&mut self.net)
        };
        let hs = &mut self.rollouts[r].sites[s].hub;
        let seq = hs.order_seq;
        hs.sending = Some((seq, now));
        let ordered = Arc::new(hs.ordered.clone());
        let rollback = hs.rollback;
        let count = ordered.iter().filter(|o| **o).count() as u64;
        // A node name and a flag per ordered node, and a header.
        let bytes = 64 + 24 * count;
        self.traffic[WAN].add(bytes);
        if g != h {
            self.traffic[HUB].add(bytes);
        }
        let up = self.path_up(s, g);
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let Session::Connected(c) = &mut self.sites[s].relay.session else {
            return;
        };
        if c.broken || !up {
            c.broken = true;
            return;
        }
        let arrival = c.down.send(now + hop, bytes, &wan, storm, &mut self.net);
        self.at(
            arrival,
            Ev::PatchOrders {
                site: s,
                conn,
                rollout: r,
                seq,
                ordered,
                rollback,
            },
        );
    }

    /// The rollout's hub gets a relay's report.
    fn hub_gets_report(&mut self, r: usize, s: usize, seq: u64, seen: Vec<Seen>, tripped: bool) {
        let now = self.now;
        let h = self.rollout_hub(r);
        if !self.hubs[h].up {
            return;
        }
        let sr = &mut self.rollouts[r].sites[s];
        // Delivered: the relay's stream got it through.
        sr.relay.reporting = None;
        sr.relay.reported = sr.relay.reported.max(seq);
        if seq <= sr.hub.report_seq {
            return;
        }
        sr.hub.report_seq = seq;
        sr.hub.seen = seen;
        if tripped && !sr.hub.tripped {
            sr.hub.tripped = true;
            sr.hub_learnt = Some(now);
        }
    }

    /// Judges wave `w` of rollout `r` at its hub.
    fn judge(&mut self, r: usize, w: usize) {
        let now = self.now;
        let h = self.rollout_hub(r);
        let fleet = self.hubs[h].core.fleet(self.inst(now), self.wall_ms());
        let index: BTreeMap<&str, usize> = self
            .sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut reach = vec![None; self.sites.len()];
        for row in &fleet.sites {
            if let Some(&i) = index.get(row.site.as_str())
                && row.status != SiteStatus::Unreachable
            {
                reach[i] = Some((row.nodes_alive, row.nodes_dead));
            }
        }
        let ro = &self.rollouts[r];
        let max_failure = ro.spec.max_failure;
        let (patched, baseline, unreachable) =
            ro.hub_counts(w, |s| reach[s].is_some(), |s| reach[s].unwrap_or((0, 0)));
        let verdict = gate(patched, baseline, max_failure);
        let tripped = ro.sites.iter().position(|s| s.hub.tripped);
        let judged = patched.healthy + patched.failed;
        // The wave's own gate first; a relay's rollback halts it otherwise.
        let failed = fails_early(patched, baseline, max_failure) || verdict.pass == Some(false);
        let outcome = if failed {
            Some((false, format!("wave {w} failed its gate")))
        } else if let Some(s) = tripped {
            Some((
                false,
                format!("{}'s relay rolled its site back", self.sites[s].name),
            ))
        } else if verdict.pass == Some(true) && judged > 0 {
            Some((true, String::new()))
        } else {
            None
        };
        let ro = &mut self.rollouts[r];
        let book = &mut ro.waves[w];
        book.counts = patched;
        book.unreachable = unreachable;
        book.verdict = Some(verdict);
        let Some((pass, why)) = outcome else {
            return;
        };
        book.ended = Some(now);
        if pass {
            book.outcome = Some("passed".to_owned());
            if w + 1 < ro.plan.len() {
                self.start_wave(r, w + 1);
            } else {
                ro.phase = Phase::Completed;
                ro.ended = Some(now);
            }
            return;
        }
        book.outcome = Some(if failed { "failed" } else { "halted" }.to_owned());
        ro.phase = Phase::Halted;
        ro.ended = Some(now);
        ro.halted_by = Some(why);
        if ro.spec.auto_rollback {
            for sr in &mut ro.sites {
                if sr.hub.ordered.iter().any(|o| *o) && !sr.hub.rollback {
                    sr.hub.rollback = true;
                    sr.hub.order_seq += 1;
                }
            }
        }
    }

    // ---- relays ------------------------------------------------------

    /// A relay takes orders newer than those it holds.
    fn relay_gets_orders(
        &mut self,
        r: usize,
        s: usize,
        seq: u64,
        ordered: &[bool],
        rollback: bool,
    ) {
        let patch = &self.patches[self.rollouts[r].spec.patch];
        let sr = &mut self.rollouts[r].sites[s];
        if sr.hub.sending.is_some_and(|(q, _)| q == seq) {
            sr.hub.sending = None;
        }
        let rl = &mut sr.relay;
        if seq <= rl.order_seq {
            return;
        }
        rl.order_seq = seq;
        rl.ordered = ordered.to_vec();
        let newly_rolling_back = rollback && !rl.rollback;
        rl.rollback |= rollback;
        rl.seq += 1;
        let cached = rl.cached(patch);
        if newly_rolling_back || cached {
            self.announce(r, s);
        } else {
            self.try_fetch(r, s);
        }
    }

    /// Starts or resumes the relay's fetch of the artifact from the hub it
    /// is connected to, if it needs it and that hub holds it.
    fn try_fetch(&mut self, r: usize, s: usize) {
        let now = self.now;
        let p = self.rollouts[r].spec.patch;
        let patch = &self.patches[p];
        let total = patch.chunks();
        let rl = &self.rollouts[r].sites[s].relay;
        let wanted = rl.ordered.iter().any(|o| *o) && !rl.rollback && !rl.cached(patch);
        if !wanted || !self.sites[s].relay.up {
            return;
        }
        let Session::Connected(c) = &self.sites[s].relay.session else {
            return;
        };
        let (g, conn) = (c.hub, c.conn);
        if rl.fetching == Some(conn) || !self.holds_patch(g, p) || !self.path_up(s, g) {
            return;
        }
        let from = rl.chunks_held;
        let rl = &mut self.rollouts[r].sites[s].relay;
        rl.fetching = Some(conn);
        rl.requested = from;
        // The request crosses to the hub, then the chunks come back.
        let ask = self.links[WAN].one_way(&mut self.net);
        self.traffic[WAN].add(64);
        for _ in 0..WINDOW.min(total - from) {
            self.send_chunk(r, s, now + ask);
        }
    }

    /// The hub sends the next chunk the relay asked for.
    fn send_chunk(&mut self, r: usize, s: usize, at: f64) {
        let p = self.rollouts[r].spec.patch;
        let sr = &mut self.rollouts[r].sites[s];
        let chunk = sr.relay.requested;
        if chunk >= self.patches[p].chunks() {
            return;
        }
        sr.relay.requested += 1;
        let bytes = self.patches[p].chunk_bytes(chunk);
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let hub = match &self.sites[s].relay.session {
            Session::Connected(c) => c.hub,
            _ => return,
        };
        let up = self.path_up(s, hub);
        let Session::Connected(c) = &mut self.sites[s].relay.session else {
            return;
        };
        if c.broken || !up {
            // Nothing leaves a hub whose connection is gone.
            c.broken = true;
            return;
        }
        self.rollouts[r].sites[s].wan_bytes += bytes;
        self.traffic[WAN].add(bytes + 32);
        let conn = c.conn;
        let arrival = c.down.send(at, bytes + 32, &wan, storm, &mut self.net);
        self.at(
            arrival,
            Ev::ArtifactChunk {
                site: s,
                conn,
                rollout: r,
                chunk,
            },
        );
    }

    fn relay_gets_chunk(&mut self, r: usize, s: usize, conn: u64, chunk: u64) {
        let now = self.now;
        let p = self.rollouts[r].spec.patch;
        let rl = &mut self.rollouts[r].sites[s].relay;
        if rl.fetching != Some(conn) || chunk != rl.chunks_held {
            return;
        }
        rl.chunks_held += 1;
        if rl.cached(&self.patches[p]) {
            rl.fetching = None;
            if !rl.rollback {
                self.announce(r, s);
            }
            return;
        }
        // Asking for the next one as each arrives keeps the window full.
        self.send_chunk(r, s, now);
    }

    /// The relay announces its orders in its site's gossip.
    fn announce(&mut self, r: usize, s: usize) {
        if !self.sites[s].relay.up {
            return;
        }
        let key = announce_key(&self.patches[self.rollouts[r].spec.patch]);
        let rl = &mut self.rollouts[r].sites[s].relay;
        rl.announced += 1;
        match &mut self.sites[s].gossip {
            Gossip::Model(m) => {
                let v = m.bump(0);
                m.watch(0, v);
            }
            Gossip::Real { site, .. } => {
                rl.arrivals_seen = 0;
                site.set(0, vec![(key, rl.announced.to_string())]);
            }
        }
    }

    /// What a restarting relay publishes again for real chitchat: each
    /// rollout's announcement it had made.
    pub(super) fn patch_announcements(&mut self, s: usize) -> Vec<(String, String)> {
        let mut kv = Vec::new();
        for ro in &mut self.rollouts {
            let rl = &mut ro.sites[s].relay;
            if rl.active() {
                rl.arrivals_seen = 0;
                kv.push((
                    announce_key(&self.patches[ro.spec.patch]),
                    rl.announced.to_string(),
                ));
            }
        }
        kv
    }

    /// The relay sends its report if the hub lacks the newest and none is
    /// on its way.
    fn send_report(&mut self, r: usize, s: usize) {
        let now = self.now;
        let h = self.rollout_hub(r);
        let rl = &self.rollouts[r].sites[s].relay;
        if rl.seq <= rl.reported
            || rl.reporting.is_some_and(|t| now - t < RESEND_AFTER)
            || !self.sites[s].relay.up
        {
            return;
        }
        let Session::Connected(c) = &self.sites[s].relay.session else {
            return;
        };
        let g = c.hub;
        if !(g == h || self.hubs_linked(g, h)) {
            return;
        }
        let hop = if g == h {
            0.0
        } else {
            self.links[HUB].one_way(&mut self.net)
        };
        let rl = &mut self.rollouts[r].sites[s].relay;
        rl.reporting = Some(now);
        let (seq, seen, tripped) = (rl.seq, rl.seen.clone(), rl.tripped_at.is_some());
        let bytes = 64 + 4 * seen.len() as u64;
        self.traffic[WAN].add(bytes);
        if g != h {
            self.traffic[HUB].add(bytes);
        }
        let up = self.path_up(s, g);
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let Session::Connected(c) = &mut self.sites[s].relay.session else {
            return;
        };
        if c.broken || !up {
            c.broken = true;
            return;
        }
        let arrival = c.up.send(now, bytes, &wan, storm, &mut self.net) + hop;
        self.at(
            arrival,
            Ev::PatchReport {
                site: s,
                via: g,
                rollout: r,
                seq,
                seen,
                tripped,
            },
        );
    }

    /// The relay learnt node `j`'s status: it reports it, and its local
    /// gate rolls the site back if its patched nodes fail too much.
    fn relay_learns(&mut self, r: usize, s: usize, j: usize, seen: Seen) {
        let now = self.now;
        let wan_down = self.sites[s].wan_down > 0;
        let site = &self.sites[s];
        let ro = &mut self.rollouts[r];
        let (max_failure, auto) = (ro.spec.max_failure, ro.spec.auto_rollback);
        let sr = &mut ro.sites[s];
        let rl = &mut sr.relay;
        if rl.seen[j] == seen {
            return;
        }
        rl.seen[j] = seen;
        rl.seq += 1;
        if rl.rollback || !auto || seen != Seen::Failed {
            return;
        }
        let (patched, baseline) = site_counts(&rl.ordered, &rl.seen, |k| site.believed_alive(k));
        if fails_early(patched, baseline, max_failure) {
            rl.tripped_at = Some(now);
            rl.rollback = true;
            sr.cut_off_at_trip = wan_down;
            self.announce(r, s);
        }
    }

    // ---- nodes -------------------------------------------------------

    /// Modelled sites: the nodes that came to hold the relay's newest
    /// state (`model`, shared with configuration); real chitchat sites:
    /// the arrivals of each rollout's key. Each is a node seeing the
    /// relay's orders, at the moment it did.
    pub(super) fn patch_arrivals(&mut self, i: usize, model: &[(usize, f64)]) {
        for r in 0..self.rollouts.len() {
            if !self.rollouts[r].sites[i].relay.active() {
                continue;
            }
            let key = announce_key(&self.patches[self.rollouts[r].spec.patch]);
            let rl = &mut self.rollouts[r].sites[i].relay;
            let arrivals: Vec<(usize, f64)> = match &self.sites[i].gossip {
                Gossip::Model(_) => model.to_vec(),
                Gossip::Real { site, offset, .. } => {
                    let all = site.arrivals(0, &key, &rl.announced.to_string());
                    let fresh = all
                        .iter()
                        .skip(rl.arrivals_seen)
                        .map(|&(j, t)| (j, t - *offset))
                        .collect();
                    rl.arrivals_seen = all.len();
                    fresh
                }
            };
            for (node, t) in arrivals {
                if node == 0 {
                    continue;
                }
                let epoch = self.rollouts[r].sites[i].nodes[node].epoch;
                self.at(
                    t,
                    Ev::PatchSeen {
                        site: i,
                        node,
                        epoch,
                        rollout: r,
                    },
                );
            }
        }
    }

    /// After a gossip step: the statuses that reached the relay.
    pub(super) fn patch_detect(&mut self, i: usize) {
        if !self.sites[i].relay.up {
            return;
        }
        for r in 0..self.rollouts.len() {
            if self.rollouts[r].sites[i].relay.awaiting.is_empty() {
                continue;
            }
            let key = status_key(&self.patches[self.rollouts[r].spec.patch]);
            let site = &self.sites[i];
            let mut reached = Vec::new();
            self.rollouts[r].sites[i].relay.awaiting.retain(|a| {
                let there = match &site.gossip {
                    Gossip::Model(m) => m.relay_version(a.member) >= a.version,
                    Gossip::Real { site, .. } => {
                        let id = site.id(a.member);
                        let want = format!("{}:{}", a.seen.word(), a.version);
                        let key = key.clone();
                        site.with(0, move |c| {
                            c.node_state(&id)
                                .is_some_and(|st| st.get(&key) == Some(want.as_str()))
                        })
                        .unwrap_or(false)
                    }
                };
                if there {
                    reached.push((a.member, a.seen));
                }
                !there
            });
            for (j, seen) in reached {
                self.relay_learns(r, i, j, seen);
            }
        }
    }

    /// Node `j` publishes its status in gossip; the relay learns it when it
    /// gets there.
    fn publish_status(&mut self, r: usize, s: usize, j: usize, seen: Seen) {
        let key = status_key(&self.patches[self.rollouts[r].spec.patch]);
        let sr = &mut self.rollouts[r].sites[s];
        let n = &mut sr.nodes[j];
        n.published += 1;
        let version = match &mut self.sites[s].gossip {
            Gossip::Model(m) => {
                // Two versions, so that the `app` check's state (which the
                // version's parity stands for) is unchanged.
                m.bump(j);
                m.bump(j)
            }
            Gossip::Real { site, .. } => {
                site.set(j, vec![(key, format!("{}:{}", seen.word(), n.published))]);
                n.published
            }
        };
        let awaiting = &mut sr.relay.awaiting;
        awaiting.retain(|a| a.member != j);
        awaiting.push(Awaiting {
            member: j,
            version,
            seen,
        });
    }

    /// Node `j` saw the relay's orders: it fetches the artifact if it is
    /// ordered to install, or rolls back if it is told to.
    fn node_sees_orders(&mut self, r: usize, s: usize, j: usize) {
        let now = self.now;
        let sr = &self.rollouts[r].sites[s];
        let n = &sr.nodes[j];
        let rl = &sr.relay;
        let patch = &self.patches[self.rollouts[r].spec.patch];
        if rl.rollback {
            if n.installed && matches!(n.stage, Stage::Baking | Stage::Healthy | Stage::Failed) {
                self.start_rollback(r, s, j);
            }
            return;
        }
        if !rl.ordered[j] || n.installed || n.stage != Stage::Idle || !rl.cached(patch) {
            return;
        }
        let relay = &self.sites[s].relay;
        if !relay.up {
            return;
        }
        let relay_epoch = relay.epoch;
        let bytes = patch.artifact_bytes + 64;
        self.traffic[LAN].add(64);
        self.traffic[LAN].add(bytes);
        let (lan, storm) = (self.links[LAN], self.storm[LAN]);
        let request = lan.one_way(&mut self.net);
        let n = &mut self.rollouts[r].sites[s].nodes[j];
        n.stage = Stage::Fetching;
        let epoch = n.epoch;
        let done = self.configs[s]
            .serve
            .send(now + request, bytes, &lan, storm, &mut self.net);
        self.at(
            done,
            Ev::PatchFetched {
                site: s,
                node: j,
                epoch,
                relay_epoch,
                rollout: r,
            },
        );
    }

    /// Node `j` has the patch installed and bakes it; if the patch broke
    /// it, its checks fail at its drawn moment of the bake.
    fn start_bake(&mut self, r: usize, s: usize, j: usize) {
        let now = self.now;
        let p = &self.patches[self.rollouts[r].spec.patch];
        let (bake, fails) = (p.bake, failure_at(self.seed, p, s, j));
        let n = &mut self.rollouts[r].sites[s].nodes[j];
        n.stage = Stage::Baking;
        let epoch = n.epoch;
        if let Some(f) = fails {
            self.at(
                now + f * bake,
                Ev::PatchChecksFail {
                    site: s,
                    node: j,
                    epoch,
                    rollout: r,
                },
            );
        }
        self.at(
            now + bake,
            Ev::PatchBaked {
                site: s,
                node: j,
                epoch,
                rollout: r,
            },
        );
    }

    fn start_rollback(&mut self, r: usize, s: usize, j: usize) {
        let now = self.now;
        let time = self.patches[self.rollouts[r].spec.patch].rollback_time;
        let n = &mut self.rollouts[r].sites[s].nodes[j];
        n.stage = Stage::RollingBack;
        let epoch = n.epoch;
        self.at(
            now + time,
            Ev::PatchRolledBack {
                site: s,
                node: j,
                epoch,
                rollout: r,
            },
        );
    }

    /// Node `j` crashed: what it was doing is lost, and statuses it had not
    /// spread yet with it.
    pub(super) fn patch_node_crashed(&mut self, s: usize, j: usize) {
        for ro in &mut self.rollouts {
            let sr = &mut ro.sites[s];
            sr.nodes[j].crash();
            sr.relay.awaiting.retain(|a| a.member != j);
        }
    }

    /// Node `j` restarted: with the patch installed it bakes again (and a
    /// node the patch broke fails again); otherwise it waits to see the
    /// relay's orders, which gossip brings its new incarnation.
    pub(super) fn patch_node_restarted(&mut self, s: usize, j: usize) {
        for r in 0..self.rollouts.len() {
            if self.rollouts[r].sites[s].nodes[j].installed {
                self.start_bake(r, s, j);
            }
        }
    }

    // ---- report ------------------------------------------------------

    pub(super) fn rollout_outcomes(&self) -> Vec<RolloutOutcome> {
        let names = self.sc.site_names();
        self.rollouts
            .iter()
            .map(|ro| {
                let p = &self.patches[ro.spec.patch];
                ro.outcome(p, &self.hubs[p.hub].name, &names)
            })
            .collect()
    }
}
