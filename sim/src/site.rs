//! One site in the world: its gossip (the model or real chitchat), the
//! truth about its members, and its relay (the real [`RelayCore`] on a
//! [`VirtualBuffer`], with the uplink's session state).
//!
//! [`Site::step`] is the part of a gossip interval that touches nothing
//! but the site, so the world runs it for all sites in parallel; what it
//! produces (liveness changes, records to persist) the world handles
//! afterwards, in site order.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_node::id::{Identity, Role};
use trellis_node::site::{CheckResult, Health, MemberView, SiteView, Status};
use trellis_relay::core::RelayCore;
use trellis_relay::failover::HubChoice;
use trellis_relay::pace::TokenBucket;
use trellis_relay::uplink::Record;

use crate::disk::VirtualBuffer;
use crate::model::SiteModel;
use crate::net::Pipe;
use crate::real::RealSite;
use crate::rng::SimRng;

/// A site's gossip, at one of two fidelities.
// Nearly every site is modelled: boxing the model would cost an allocation
// and an indirection per site to save bytes on the few real ones.
#[allow(clippy::large_enum_variant)]
pub enum Gossip {
    Model(SiteModel),
    /// Real chitchat; `believed` is what the relay believed at the last
    /// step, to notice changes. Real sites run `offset` seconds ahead of the
    /// world (their warm-up).
    Real {
        site: Box<RealSite>,
        believed: Vec<bool>,
        versions: Vec<u64>,
        offset: f64,
    },
}

/// What an uplink session is doing.
pub enum Session {
    /// The relay process is not running.
    Down,
    /// Waiting out the backoff; `token` matches the retry event.
    Waiting {
        token: u64,
    },
    Connecting {
        conn: u64,
        index: usize,
        hub: usize,
        tried: f64,
    },
    Connected(Box<Connected>),
}

pub struct Connected {
    pub conn: u64,
    pub index: usize,
    pub hub: usize,
    pub tried: f64,
    pub last_heard: f64,
    /// Relay → hub and hub → relay.
    pub up: Pipe,
    pub down: Pipe,
    /// A message was lost on a link that went down: QUIC would stall and
    /// the connection die, so nothing more gets through on it.
    pub broken: bool,
    pub backlog: Option<Backlog>,
    pub bucket: TokenBucket,
    /// The newest configuration version the hub sent on this connection.
    pub config_sent: u64,
}

/// A chunk of the backlog being replayed at the paced rate.
pub struct Backlog {
    pub queue: VecDeque<(Record, u64)>,
    pub through: u64,
    pub last: u64,
    /// The front record's tokens are taken; it goes out at this time.
    pub ready_at: Option<f64>,
}

/// The relay of a site.
pub struct Relay {
    pub id: Identity,
    pub up: bool,
    /// Bumped at each crash, so events of an earlier run are ignored.
    pub epoch: u64,
    pub core: RelayCore,
    pub disk: VirtualBuffer,
    pub choice: HubChoice,
    pub attempt: u32,
    pub previous: usize,
    /// Hubs in order of preference.
    pub hubs: Vec<usize>,
    pub rng: SimRng,
    pub session: Session,
    /// A batch waiting for its fsync.
    pub appending: Option<Vec<trellis_relay::buffer::NewRecord>>,
    pub to_delete: VecDeque<(f64, u64)>,
    pub next_sample: f64,
    pub next_compact: f64,
    pub peak_bytes: u64,
    pub peak_records: u64,
    /// Records dropped at the cap (told by gaps).
    pub dropped: u64,
    /// Hash of the last view handed to the core, to skip unchanged ones.
    pub fingerprint: u64,
    /// Until when members may be joining (views are taken every sample).
    pub joining_until: f64,
}

/// Figures the world needs from the site after a step.
#[derive(Default)]
pub struct StepOut {
    /// Liveness changes at the relay: (time, member, alive).
    pub changes: Vec<(f64, usize, bool)>,
    pub sampled: bool,
}

/// Settings the step reads.
pub struct StepCtx {
    pub t: f64,
    pub interval: f64,
    pub sample_interval: f64,
    pub keep_acked: f64,
    pub base: Instant,
    pub start_ms: u64,
    pub flap_rate: f64,
}

impl StepCtx {
    pub fn inst(&self, t: f64) -> Instant {
        inst(self.base, t)
    }
    pub fn wall_ms(&self, t: f64) -> u64 {
        wall_ms(self.start_ms, t)
    }
}

pub fn inst(base: Instant, t: f64) -> Instant {
    base + Duration::from_secs_f64(t.max(0.0))
}

pub fn wall_ms(start_ms: u64, t: f64) -> u64 {
    start_ms + (t.max(0.0) * 1000.0).round() as u64
}

pub struct Site {
    pub index: usize,
    pub region: usize,
    pub region_name: String,
    pub name: String,
    /// Member names; 0 is the relay.
    pub members: Vec<String>,
    pub gossip: Gossip,
    /// Crash faults holding each member down (0: running).
    pub down: Vec<u32>,
    pub crash_at: Vec<Option<f64>>,
    pub flaps: SimRng,
    pub next_flap: f64,
    pub relay: Relay,
    /// Outages holding the site's WAN link down.
    pub wan_down: u32,
    pub out: StepOut,
}

/// Resource figures every simulated node reports (they do not change).
const CPU: u8 = 25;
const MEM: u8 = 40;
const DISK: u8 = 55;

/// A node's health at health version `v`: odd versions pass, even ones
/// have the `app` check warning.
pub fn health_of(v: u64) -> Health {
    let passing = v % 2 == 1;
    let status = if passing {
        Status::Passing
    } else {
        Status::Warning
    };
    let detail = if passing { "" } else { "slow responses" };
    Health {
        role: Some(Role::Node),
        status,
        cpu_pct: Some(CPU),
        mem_pct: Some(MEM),
        disk_pct: Some(DISK),
        load1: None,
        checks: [("app".to_owned(), CheckResult::new(status, detail))]
            .into_iter()
            .collect(),
    }
}

pub fn relay_health() -> Health {
    Health {
        role: Some(Role::Relay),
        status: Status::Passing,
        ..Health::default()
    }
}

const ADDR: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

fn fnv(h: &mut u64, v: u64) {
    for b in v.to_le_bytes() {
        *h ^= u64::from(b);
        *h = h.wrapping_mul(0x0100_0000_01b3);
    }
}

impl Site {
    /// Whether the site runs real chitchat rather than the gossip model.
    pub fn is_real(&self) -> bool {
        matches!(self.gossip, Gossip::Real { .. })
    }

    pub fn is_up(&self, j: usize) -> bool {
        self.down[j] == 0
    }

    /// Whether the relay believes member `j` alive.
    pub fn believed_alive(&self, j: usize) -> bool {
        match &self.gossip {
            Gossip::Model(m) => m.believed_alive(j),
            Gossip::Real { believed, .. } => believed[j],
        }
    }

    /// The site as the relay sees it now.
    fn view(&self, templates: &[Health; 3]) -> SiteView {
        match &self.gossip {
            Gossip::Real { site, .. } => site.view(),
            Gossip::Model(m) => {
                let mut members = Vec::with_capacity(self.members.len());
                for (j, name) in self.members.iter().enumerate() {
                    let v = m.relay_version(j);
                    if j > 0 && v == 0 {
                        // Not heard of yet (the relay just restarted).
                        continue;
                    }
                    let health = if j == 0 {
                        templates[2].clone()
                    } else {
                        templates[(v % 2) as usize].clone()
                    };
                    members.push(MemberView {
                        name: name.clone(),
                        generation: m.generation[j],
                        gossip_addr: ADDR,
                        alive: m.believed_alive(j),
                        health,
                        labels: Default::default(),
                        facts: Default::default(),
                        config: Default::default(),
                        patch: Default::default(),
                    });
                }
                SiteView {
                    region: self.region_name.clone(),
                    site: self.name.clone(),
                    members,
                }
            }
        }
    }

    fn view_fingerprint(&self) -> Option<u64> {
        let Gossip::Model(m) = &self.gossip else {
            return None;
        };
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for j in 0..self.members.len() {
            fnv(&mut h, u64::from(m.believed_alive(j)));
            fnv(&mut h, m.relay_version(j));
            fnv(&mut h, m.generation[j]);
        }
        Some(h)
    }

    /// One gossip interval from `ctx.t`: the relay's periodic work (delete
    /// what was acknowledged long enough ago, look at the site), health
    /// changes, then the gossip round.
    pub fn step(&mut self, ctx: &StepCtx, templates: &[Health; 3]) {
        self.out.changes.clear();
        self.out.sampled = false;
        let t = ctx.t;
        if self.relay.up && t >= self.relay.next_sample {
            self.relay.next_sample = t + ctx.sample_interval;
            self.out.sampled = true;
            self.delete_old_acked(ctx);
            let now = ctx.inst(t);
            let fp = self.view_fingerprint();
            let due = self.relay.core.poll_timeout().is_none_or(|at| at <= now);
            let changed = fp.is_none_or(|fp| fp != self.relay.fingerprint);
            if changed || due || t < self.relay.joining_until {
                let view = self.view(templates);
                self.relay.core.handle_view(now, ctx.wall_ms(t), &view);
                if let Some(fp) = fp {
                    self.relay.fingerprint = fp;
                }
            }
        }
        if self.relay.up && t >= self.relay.next_compact {
            // As often as the relay compacts (every second).
            self.relay.next_compact = t + 1.0;
            let movable = self.relay.core.compactable();
            if let Some(gap) = self.relay.disk.compact(ctx.wall_ms(t), movable) {
                self.relay.dropped += gap.dropped();
            }
        }
        self.flap(ctx);
        match &mut self.gossip {
            Gossip::Model(m) => {
                let out = &mut self.out.changes;
                m.round(t, |at, j, alive| out.push((at, j, alive)));
            }
            Gossip::Real {
                site,
                believed,
                offset,
                ..
            } => {
                site.advance_to(t + ctx.interval + *offset);
                for c in site.take_liveness_changes() {
                    if c.member == 0 || c.generation != site.generation(c.member) {
                        continue;
                    }
                    believed[c.member] = c.alive;
                    self.out.changes.push((c.at - *offset, c.member, c.alive));
                }
            }
        }
    }

    /// Health changes due in this interval (Poisson, per site), each
    /// flipping one running node's `app` check.
    fn flap(&mut self, ctx: &StepCtx) {
        let n = self.members.len();
        if ctx.flap_rate <= 0.0 || n < 2 {
            return;
        }
        let rate = ctx.flap_rate * (n - 1) as f64;
        let end = ctx.t + ctx.interval;
        while self.next_flap < end {
            let j = 1 + self.flaps.below((n - 1) as u64) as usize;
            self.next_flap += self.flaps.exp(1.0 / rate);
            if !self.is_up(j) {
                continue;
            }
            match &mut self.gossip {
                Gossip::Model(m) => m.bump_and_watch(j, ctx.t),
                Gossip::Real { site, versions, .. } => {
                    versions[j] += 1;
                    site.set(j, health_of(versions[j]).to_kv());
                }
            }
        }
    }

    /// Deletes what was acknowledged more than `keep_acked` ago.
    fn delete_old_acked(&mut self, ctx: &StepCtx) {
        let r = &mut self.relay;
        let mut through = None;
        while let Some(&(at, seq)) = r.to_delete.front() {
            if ctx.t - at < ctx.keep_acked {
                break;
            }
            through = Some(seq);
            r.to_delete.pop_front();
        }
        if let Some(seq) = through {
            r.disk.delete_through(seq);
            r.core.handle_deleted(seq);
        }
    }
}

/// The three health templates: passing node, warning node, relay.
pub fn templates() -> [Health; 3] {
    [health_of(2), health_of(1), relay_health()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_alternates_between_passing_and_warning_by_version() {
        assert_eq!(health_of(1).status, Status::Passing);
        assert_eq!(health_of(2).status, Status::Warning);
        assert_eq!(health_of(2).failing_checks().count(), 1);
        let t = templates();
        assert_eq!(t[1], health_of(3), "odd versions use the passing template");
        assert_eq!(t[0], health_of(4));
    }
}
