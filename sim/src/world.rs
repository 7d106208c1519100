//! The world: every site, relay and hub of a scenario on one virtual clock
//! and one event queue.
//!
//! Relays run [`RelayCore`] with the relay's own failover
//! ([`HubChoice`], full-jitter backoff) and pacing; hubs run [`HubCore`]
//! with group commit on a virtual disk, push replication and anti-entropy
//! (the hub's own [`missing`]); sites run the gossip model or real
//! chitchat. Messages cross [`net`](crate::net) links. Nothing reads a
//! clock: the cores get `Instant`s made from a fixed origin plus the
//! virtual time, and wall-clock milliseconds from a fixed epoch.
//!
//! The engine also keeps its own books, independent of the cores, to check
//! the invariants: which `(relay, seq)` each hub made durable (a second
//! apply is a duplicate), that every acknowledgement covers only what the
//! acknowledging hub holds, and at the end that every durable record is at
//! some hub or still in its relay's buffer.
//!
//! Configuration changes an operator makes at a hub travel as the mesh
//! carries them: pushed to the hubs the origin believes alive, pulled by
//! anti-entropy by the others, pushed by each hub to the relays connected
//! to it (and offered to a relay when its session opens), announced by the
//! relay in its site's gossip, fetched by each node from its relay and
//! applied; [`config`](crate::config) keeps the state and the books.
//!
//! Patch rollouts ([`rollout`], with the state and books in
//! [`patch`](crate::patch)) go the same ways: the artifact hub to hub and,
//! in chunks, hub to relay; wave orders from the rollout's hub to the
//! relays and their reports back; announcements and node health through
//! site gossip.
//!
//! Nodes given a disk that fills or an anomaly, and control nodes, run the
//! mesh's `Foresight` and runbook `Engine` (`world/foresight.rs`, with the
//! models and books in [`crate::foresight`]): their lease requests cross
//! the LAN to the site relay's `Leases`, and the books check that no site
//! runs a rule on more nodes at once than it allows.

mod foresight;
mod rollout;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_hub::core::{Coverage, Fresh, HubCore, Served};
use trellis_hub::federation::{self, Published};
use trellis_hub::replication::{PULL_CHUNK, missing};
use trellis_hub::store::{StoredRecord, StreamRow, stored};
use trellis_node::endpoint::HANDSHAKE_TIMEOUT;
use trellis_node::id::{Identity, Role};
use trellis_relay::buffer::default_downsample;
use trellis_relay::core::{CoreConfig, RelayCore, Transmit};
use trellis_relay::failover::{HubChoice, full_jitter, next_attempt};
use trellis_relay::pace::TokenBucket;
use trellis_relay::summary::{SiteKey, SiteStatus, SiteSummary};
use trellis_relay::uplink::{Record, RecordBody};

use crate::config::{self, ANNOUNCE_KEY, Books, SiteConfig, announcement};
use crate::disk::{VirtualBuffer, body_len};
use crate::model::SiteModel;
use crate::net::{Counter, HANDSHAKE_BYTES, Params, Pipe};
use crate::patch::{PatchSpec, Rollout, Seen};
use crate::real::RealSite;
use crate::report::{
    BufferPeak, Buffers, Detection, Drain, FaultOutcome, Latency, LinkTraffic, Records, Report,
    Timeseries, Traffic, ms,
};
use crate::rng::SimRng;
use crate::scenario::{Fault, FaultKind, Scenario, hub_name, region_name, site_name};
use crate::site::{
    Backlog, Connected, Gossip, Relay, Session, Site, StepCtx, health_of, inst, relay_health,
    templates, wall_ms,
};
use crate::{EventQueue, schedule};

/// The wall clock at virtual time zero (ms since the epoch): a fixed
/// date, so that runs do not depend on when they ran.
pub const START_MS: u64 = 1_800_000_000_000;
/// Virtual seconds of gossip before the run starts, so sites begin
/// converged (a running fleet, not one booting).
const WARM_UP_ROUNDS: usize = 10;
/// How many bytes of backlog the relay reads per chunk.
const BACKLOG_CHUNK: u64 = 64 * 1024;
/// A pull from another hub that has not answered in this long is given up.
const PULL_TIMEOUT: f64 = 10.0;

enum Ev {
    Tick,
    HubTick,
    Sample,
    FaultStart(usize),
    FaultEnd(usize),
    Fsynced {
        site: usize,
        epoch: u64,
    },
    Retry {
        site: usize,
        token: u64,
    },
    ConnectTimeout {
        site: usize,
        conn: u64,
    },
    Hello {
        hub: usize,
        site: usize,
        conn: u64,
    },
    Welcome {
        site: usize,
        conn: u64,
        acked: u64,
    },
    RecordArrives {
        hub: usize,
        site: usize,
        conn: u64,
        record: Box<Record>,
    },
    AckArrives {
        hub: usize,
        site: usize,
        conn: u64,
        through: u64,
    },
    RelayClose {
        hub: usize,
        conn: u64,
    },
    HubClose {
        site: usize,
        conn: u64,
    },
    BacklogSend {
        site: usize,
        conn: u64,
    },
    FailbackLook {
        site: usize,
        conn: u64,
    },
    FailbackAnswer {
        site: usize,
        conn: u64,
        index: usize,
    },
    HubProcess {
        hub: usize,
        epoch: u64,
    },
    HubCommitted {
        hub: usize,
        epoch: u64,
    },
    Replicated {
        to: usize,
        records: Vec<StoredRecord>,
    },
    PullRequest {
        to: usize,
        from: usize,
        have: Arc<BTreeMap<(String, u64), Coverage>>,
    },
    PullResponse {
        to: usize,
        from: usize,
        records: Vec<StoredRecord>,
        more: bool,
    },
    Gossip {
        to: usize,
        from: usize,
        served: Arc<Vec<(SiteKey, Served)>>,
        digest: u64,
        config: u64,
        patches: u64,
    },
    /// The operator applies configuration change `version`.
    ConfigChange(u64),
    /// Hub `from`'s configuration, pushed or pulled, reaches hub `to`.
    ConfigReplicated {
        to: usize,
        from: usize,
        version: u64,
    },
    /// Hub `from` asks hub `to` for its configuration.
    ConfigPull {
        to: usize,
        from: usize,
    },
    /// A hub's push of a configuration bundle reaches the relay.
    ConfigToRelay {
        site: usize,
        conn: u64,
        version: u64,
    },
    /// A node sees its relay announce `version` in gossip.
    ConfigSeen {
        site: usize,
        node: usize,
        epoch: u64,
        version: u64,
    },
    /// A node has fetched `version`'s bundle from its relay (if the relay
    /// ran throughout).
    ConfigFetched {
        site: usize,
        node: usize,
        epoch: u64,
        relay_epoch: u64,
        version: u64,
    },
    /// A node has written the files and run the reloads of `version`.
    ConfigApplied {
        site: usize,
        node: usize,
        epoch: u64,
        version: u64,
    },
    /// The operator publishes patch `p` at its hub.
    PublishPatch(usize),
    /// The operator starts rollout `r`.
    RolloutStart(usize),
    /// Hub `from`'s copy of patch `patch`, pushed or pulled, reaches hub
    /// `to`.
    PatchReplicated {
        to: usize,
        from: usize,
        patch: usize,
    },
    /// Hub `from` asks hub `to` for patch `patch`.
    PatchPull {
        to: usize,
        from: usize,
        patch: usize,
    },
    /// A rollout's orders for a site (a snapshot: the nodes ordered so
    /// far, and whether to roll back) reach its relay.
    PatchOrders {
        site: usize,
        conn: u64,
        rollout: usize,
        seq: u64,
        ordered: Arc<Vec<bool>>,
        rollback: bool,
    },
    /// Chunk `chunk` of a rollout's artifact reaches a relay.
    ArtifactChunk {
        site: usize,
        conn: u64,
        rollout: usize,
        chunk: u64,
    },
    /// A relay's report (what it saw of its nodes, whether it rolled the
    /// site back) reaches the rollout's hub through hub `via`.
    PatchReport {
        site: usize,
        via: usize,
        rollout: usize,
        seq: u64,
        seen: Vec<Seen>,
        tripped: bool,
    },
    /// A node sees its relay's patch announcement in gossip.
    PatchSeen {
        site: usize,
        node: usize,
        epoch: u64,
        rollout: usize,
    },
    /// A node has the artifact from its relay (if the relay ran
    /// throughout).
    PatchFetched {
        site: usize,
        node: usize,
        epoch: u64,
        relay_epoch: u64,
        rollout: usize,
    },
    /// A node's `install` is done; it starts to bake.
    PatchInstalled {
        site: usize,
        node: usize,
        epoch: u64,
        rollout: usize,
    },
    /// A node the patch broke: its checks fail.
    PatchChecksFail {
        site: usize,
        node: usize,
        epoch: u64,
        rollout: usize,
    },
    /// A node's bake is over with its checks passing.
    PatchBaked {
        site: usize,
        node: usize,
        epoch: u64,
        rollout: usize,
    },
    /// A node's `rollback` is done.
    PatchRolledBack {
        site: usize,
        node: usize,
        epoch: u64,
        rollout: usize,
    },
    /// Foresight and runbooks on the modelled nodes.
    Foresight(foresight::FsEv),
    End,
}

enum Inbound {
    Records {
        site: usize,
        conn: u64,
        records: Vec<Record>,
    },
    Replicated(Vec<StoredRecord>),
}

struct Work {
    fresh: Fresh,
    reply: Option<(usize, u64)>,
}

struct PeerState {
    last_heard: f64,
    served: Arc<Vec<(SiteKey, Served)>>,
    digest: u64,
    /// The newest configuration version the peer holds.
    config: u64,
    /// The patches it holds, a bit each.
    patches: u64,
}

/// Which seqs of a relay stream a hub made durable: the engine's own
/// books, not the core's.
#[derive(Default, Clone)]
struct Applied {
    bits: Vec<u64>,
    /// Every seq up to here is set (acks are checked from here on).
    verified: u64,
}

impl Applied {
    fn get(&self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.bits.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Sets `a..=b`; returns whether any was set already.
    fn set(&mut self, a: u64, b: u64) -> bool {
        let mut dup = false;
        for seq in a..=b {
            let (w, bit) = ((seq / 64) as usize, seq % 64);
            if self.bits.len() <= w {
                self.bits.resize(w + 1, 0);
            }
            dup |= self.bits[w] & (1 << bit) != 0;
            self.bits[w] |= 1 << bit;
        }
        dup
    }

    /// Whether every seq up to `through` is set.
    fn covers_through(&mut self, through: u64) -> bool {
        while self.verified < through && self.get(self.verified + 1) {
            self.verified += 1;
        }
        self.verified >= through
    }
}

struct Hub {
    name: String,
    region: String,
    up: bool,
    epoch: u64,
    core: HubCore,
    /// The virtual store: per site and stream, the records by seq, with
    /// when the first hub received them.
    store: BTreeMap<(usize, u64), BTreeMap<u64, (Record, u64)>>,
    inbox: Vec<Inbound>,
    wake: bool,
    committing: Option<Vec<Work>>,
    /// Open uplink connections: conn → (site, last frame).
    conns: BTreeMap<u64, (usize, f64)>,
    peers: Vec<Option<PeerState>>,
    pulling: Vec<Option<f64>>,
    published: BTreeMap<String, String>,
    next_anti_entropy: f64,
    applied: Vec<Applied>,
    /// Duplicates absorbed by earlier runs of this hub (before crashes).
    absorbed_before: u64,
    pipes: Vec<Pipe>,
    /// The newest configuration version it holds (durable: survives a
    /// crash).
    config: u64,
    /// When it last asked each peer for its configuration.
    config_pulling: Vec<Option<f64>>,
    /// Changes an operator applied while it was down: the operator retries
    /// until it answers.
    operator_waiting: Vec<u64>,
    /// The patches it holds, a bit each (durable).
    patches: u64,
    /// When it last asked each peer for a patch.
    patch_pulling: Vec<Option<f64>>,
}

/// A fault whose heal is being watched.
struct Watch {
    fault: usize,
    healed: f64,
    /// Sites and what each relay had persisted at the heal.
    sites: Vec<(usize, u64)>,
}

struct DrainWatch {
    site: usize,
    healed: f64,
    target: u64,
    backlog: u64,
}

/// Where a run is, for progress display.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub virtual_s: f64,
    pub total_s: f64,
    pub events: u64,
}

/// What a run produced.
pub struct Outcome {
    pub report: Report,
    pub series: Timeseries,
    /// The exact faults, as a scenario that replays the run.
    pub schedule: Scenario,
}

pub struct World {
    sc: Scenario,
    seed: u64,
    q: EventQueue<Ev>,
    now: f64,
    base: Instant,
    sites: Vec<Site>,
    hubs: Vec<Hub>,
    relay_index: BTreeMap<String, usize>,
    faults: Vec<Fault>,
    fault_sites: Vec<Vec<usize>>,
    outcomes: Vec<FaultOutcome>,
    watches: Vec<Watch>,
    drains: Vec<DrainWatch>,
    drained: Vec<Drain>,
    links: [Params; 3],
    storm: [f64; 3],
    /// Partitions separating each pair of hubs.
    cut: Vec<Vec<u32>>,
    net: SimRng,
    traffic: [Counter; 3],
    detect: Vec<f64>,
    disseminate: Vec<f64>,
    false_suspicions: u64,
    undetected: u64,
    alive: Vec<u64>,
    next_conn: u64,
    events: u64,
    series: Timeseries,
    last_bytes: [u64; 3],
    /// LAN bytes of the warm-up, left out of the totals.
    lan_base: u64,
    lan_messages_base: u64,
    violations: Vec<String>,
    duplicates_applied: u64,
    disk_caps: Vec<Vec<u64>>,
    /// Each site's configuration: its relay's cache and its nodes.
    configs: Vec<SiteConfig>,
    books: Books,
    patches: Vec<PatchSpec>,
    /// When each patch was published (its hub was up to take it).
    published: Vec<Option<f64>>,
    rollouts: Vec<Rollout>,
    /// The nodes modelled for foresight and runbooks (none without trends,
    /// anomalies and runbooks).
    fs: Option<Box<foresight::Fs>>,
    threads: usize,
    end: f64,
}

const LAN: usize = 0;
const WAN: usize = 1;
const HUB: usize = 2;

fn secs(t: f64) -> Duration {
    Duration::from_secs_f64(t.max(0.0))
}

impl World {
    /// Builds the world of `sc` under `seed`, its sites warmed up.
    pub fn new(sc: &Scenario, seed: u64) -> anyhow::Result<World> {
        let topo = &sc.topology;
        let interval = sc.gossip.interval.as_secs_f64();
        let base = Instant::now();
        let faults = schedule::expand(sc, seed);
        let mut relay_index = BTreeMap::new();
        let mut sites = Vec::new();
        let n = topo.nodes_per_site + 1;
        for r in 0..topo.regions {
            for s in 0..topo.sites_per_region {
                let index = sites.len();
                let name = site_name(r + 1, s + 1);
                let region = region_name(r + 1);
                let relay_name = format!("{name}-relay");
                let mut members = vec![relay_name.clone()];
                members.extend((1..n).map(|k| format!("{name}-n{k}")));
                let gossip = if sc.real_gossip(index, &name) {
                    let initial = members
                        .iter()
                        .enumerate()
                        .map(|(j, name)| {
                            let kv = if j == 0 {
                                relay_health().to_kv()
                            } else {
                                health_of(1).to_kv()
                            };
                            (name.clone(), kv)
                        })
                        .collect();
                    let warm = WARM_UP_ROUNDS as f64 * interval;
                    let settings = trellis_node::gossip::GossipSettings {
                        interval: sc.gossip.interval,
                        phi_threshold: sc.gossip.phi_threshold,
                        ..trellis_node::config::GossipConfig::default().settings()
                    };
                    let mut site = RealSite::new(
                        &region,
                        &name,
                        initial,
                        &settings,
                        START_MS - (warm * 1000.0) as u64,
                        SimRng::derive(seed, "site-gossip", index as u64),
                    )?;
                    site.advance_to(warm);
                    site.take_liveness_changes();
                    let believed = (0..n).map(|j| j == 0 || site.believed_alive(j)).collect();
                    Gossip::Real {
                        site: Box::new(site),
                        believed,
                        versions: vec![1; n],
                        offset: warm,
                    }
                } else {
                    let warm = WARM_UP_ROUNDS as f64 * interval;
                    let mut m = SiteModel::new(
                        n,
                        interval,
                        sc.gossip.phi_threshold,
                        START_MS - (warm * 1000.0) as u64,
                        SimRng::derive(seed, "site-gossip", index as u64),
                    );
                    for k in 0..WARM_UP_ROUNDS {
                        m.round(-warm + k as f64 * interval, |_, _, _| {});
                    }
                    m.disseminations.clear();
                    Gossip::Model(m)
                };
                let id = Identity::new(
                    Role::Relay,
                    region.clone(),
                    name.clone(),
                    relay_name.clone(),
                )?;
                relay_index.insert(relay_name.clone(), index);
                let hubs = preference(r, topo.regions, topo.hubs);
                let stream = SimRng::derive(seed, "stream", index as u64).next_u64() >> 1;
                let cfg = CoreConfig {
                    summary_interval: sc.relay.summary_interval,
                    ack_timeout: sc.relay.ack_timeout,
                    ..CoreConfig::default()
                };
                let relay = Relay {
                    id,
                    up: true,
                    epoch: 0,
                    core: RelayCore::new(relay_name, cfg, 0, 0, None),
                    disk: VirtualBuffer::new(
                        stream,
                        sc.relay.buffer_max_bytes,
                        default_downsample(),
                    ),
                    choice: HubChoice::new(
                        hubs.len(),
                        sc.relay.failover_after,
                        sc.relay.failback_every,
                        base,
                    ),
                    attempt: 0,
                    previous: 0,
                    hubs,
                    rng: SimRng::derive(seed, "relay", index as u64),
                    session: Session::Waiting { token: 0 },
                    appending: None,
                    to_delete: VecDeque::new(),
                    next_sample: 0.0,
                    next_compact: 0.0,
                    peak_bytes: 0,
                    peak_records: 0,
                    dropped: 0,
                    fingerprint: 0,
                    joining_until: 0.0,
                };
                let mut flaps = SimRng::derive(seed, "health", index as u64);
                let rate = sc.gossip.health_changes_per_node_hour / 3600.0 * (n - 1) as f64;
                let next_flap = if rate > 0.0 {
                    flaps.exp(1.0 / rate)
                } else {
                    f64::MAX
                };
                sites.push(Site {
                    index,
                    region: r,
                    region_name: region,
                    name,
                    down: vec![0; n],
                    crash_at: vec![None; n],
                    members,
                    gossip,
                    flaps,
                    next_flap,
                    relay,
                    wan_down: 0,
                    out: Default::default(),
                });
            }
        }
        let nsites = sites.len();
        let hubs = (0..topo.hubs)
            .map(|h| Hub {
                name: hub_name(h + 1),
                region: region_name(h % topo.regions + 1),
                up: true,
                epoch: 0,
                core: HubCore::new(hub_name(h + 1), sc.hub.stale_after),
                store: BTreeMap::new(),
                inbox: Vec::new(),
                wake: false,
                committing: None,
                conns: BTreeMap::new(),
                peers: (0..topo.hubs).map(|_| None).collect(),
                pulling: vec![None; topo.hubs],
                published: BTreeMap::new(),
                next_anti_entropy: 0.0,
                applied: vec![Applied::default(); nsites],
                absorbed_before: 0,
                pipes: vec![Pipe::default(); topo.hubs],
                config: 0,
                config_pulling: vec![None; topo.hubs],
                operator_waiting: Vec::new(),
                patches: 0,
                patch_pulling: vec![None; topo.hubs],
            })
            .collect();
        let names = sc.site_names();
        let by_name: BTreeMap<&String, usize> =
            names.iter().enumerate().map(|(i, n)| (n, i)).collect();
        let fault_sites = faults
            .iter()
            .map(|f| {
                f.sites
                    .iter()
                    .filter_map(|s| by_name.get(s).copied())
                    .collect()
            })
            .collect();
        let changes = config::changes(sc);
        let mut columns = Timeseries::run_columns(topo.regions);
        if !changes.is_empty() {
            columns.push(Timeseries::CONFIG_CURRENT.to_owned());
            for s in &mut sites {
                if let Gossip::Real { site, .. } = &mut s.gossip {
                    site.watch_key(ANNOUNCE_KEY);
                }
            }
        }
        let configs = sites
            .iter()
            .map(|s| SiteConfig::new(s.members.len()))
            .collect();
        let books = Books::new(changes, nsites, topo.hubs);
        let patches = crate::patch::patches(sc);
        let rollouts: Vec<Rollout> = crate::patch::rollouts(sc, &patches)
            .into_iter()
            .map(|r| {
                let p = &patches[r.patch];
                Rollout::new(sc, r, p, n)
            })
            .collect();
        if !rollouts.is_empty() {
            columns.push(Timeseries::PATCH_INSTALLED.to_owned());
            for s in &mut sites {
                if let Gossip::Real { site, .. } = &mut s.gossip {
                    for r in &rollouts {
                        site.watch_key(&rollout::announce_key(&patches[r.spec.patch]));
                    }
                }
            }
        }
        let fs = sc.has_foresight().then(|| {
            let names: Vec<Vec<String>> = sites.iter().map(|s| s.members.clone()).collect();
            Box::new(foresight::Fs::new(sc, seed, &names))
        });
        if fs.is_some() {
            columns.push(Timeseries::DISKS_FULL.to_owned());
            columns.push(Timeseries::REMEDIATING.to_owned());
        }
        let end = (sc.duration + sc.drain).as_secs_f64();
        let mut w = World {
            seed,
            q: EventQueue::new(),
            now: 0.0,
            base,
            relay_index,
            fault_sites,
            outcomes: Vec::new(),
            watches: Vec::new(),
            drains: Vec::new(),
            drained: Vec::new(),
            links: [
                Params::of(&sc.links.lan),
                Params::of(&sc.links.wan),
                Params::of(&sc.links.hub),
            ],
            storm: [0.0; 3],
            cut: vec![vec![0; topo.hubs]; topo.hubs],
            net: SimRng::derive(seed, "net", 0),
            traffic: [Counter::default(); 3],
            detect: Vec::new(),
            disseminate: Vec::new(),
            false_suspicions: 0,
            undetected: 0,
            alive: vec![(topo.sites_per_region * topo.nodes_per_site) as u64; topo.regions],
            next_conn: 1,
            events: 0,
            series: Timeseries::new(columns),
            last_bytes: [0; 3],
            lan_base: 0,
            lan_messages_base: 0,
            violations: Vec::new(),
            duplicates_applied: 0,
            disk_caps: vec![Vec::new(); nsites],
            configs,
            books,
            published: vec![None; patches.len()],
            patches,
            rollouts,
            fs,
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(8),
            end,
            sites,
            hubs,
            faults,
            sc: sc.clone(),
        };
        // Traffic counts from here, not from the warm-up.
        w.last_bytes[LAN] = w.lan_bytes();
        w.lan_base = w.last_bytes[LAN];
        w.lan_messages_base = w.lan_messages();
        w.q.schedule_at(Duration::ZERO, Ev::Tick);
        w.q.schedule_at(Duration::ZERO, Ev::HubTick);
        w.q.schedule_at(Duration::ZERO, Ev::Sample);
        for s in 0..nsites {
            w.q.schedule_at(Duration::ZERO, Ev::Retry { site: s, token: 0 });
        }
        let duration = sc.duration.as_secs_f64();
        for (i, f) in w.faults.iter().enumerate() {
            let at = f.at.as_secs_f64().min(duration);
            let until = (f.at + f.duration).as_secs_f64().min(duration);
            w.q.schedule_at(secs(at), Ev::FaultStart(i));
            w.q.schedule_at(secs(until), Ev::FaultEnd(i));
            w.outcomes.push(FaultOutcome {
                kind: f.kind.name().to_owned(),
                at_s: ms(at),
                healed_s: ms(until),
                targets: 0,
                named: Vec::new(),
                converged_after_s: None,
            });
        }
        for c in w.books.changes() {
            w.q.schedule_at(secs(c.at), Ev::ConfigChange(c.version));
        }
        for (i, p) in w.patches.iter().enumerate() {
            w.q.schedule_at(secs(p.at), Ev::PublishPatch(i));
        }
        for (i, r) in w.rollouts.iter().enumerate() {
            w.q.schedule_at(secs(r.spec.at), Ev::RolloutStart(i));
        }
        if w.fs.is_some() {
            w.q.schedule_at(Duration::ZERO, foresight::ev(foresight::FsEv::Sample));
        }
        w.q.schedule_at(secs(end), Ev::End);
        Ok(w)
    }

    /// Runs to the end; `progress` is called every gossip interval.
    pub fn run(mut self, mut progress: impl FnMut(&Progress)) -> Outcome {
        let total = self.end;
        while let Some((at, ev)) = self.q.pop() {
            self.now = at.as_secs_f64();
            self.events += 1;
            match ev {
                Ev::End => break,
                Ev::Tick => {
                    self.tick();
                    progress(&Progress {
                        virtual_s: self.now,
                        total_s: total,
                        events: self.events,
                    });
                }
                ev => self.handle(ev),
            }
        }
        self.finish()
    }

    fn at(&mut self, t: f64, ev: Ev) {
        self.q.schedule_at(secs(t), ev);
    }

    fn inst(&self, t: f64) -> Instant {
        inst(self.base, t)
    }

    fn wall_ms(&self) -> u64 {
        wall_ms(START_MS, self.now)
    }

    fn path_up(&self, site: usize, hub: usize) -> bool {
        self.sites[site].wan_down == 0 && self.hubs[hub].up
    }

    fn hubs_linked(&self, a: usize, b: usize) -> bool {
        self.cut[a][b] == 0 && self.hubs[a].up && self.hubs[b].up
    }

    // ---- sites -------------------------------------------------------

    /// One gossip interval of every site (in parallel), then what each
    /// produced, in site order.
    fn tick(&mut self) {
        let interval = self.sc.gossip.interval.as_secs_f64();
        let t = self.now;
        let ctx = StepCtx {
            t,
            interval,
            sample_interval: self.sc.relay.sample_interval.as_secs_f64(),
            keep_acked: self.sc.relay.keep_acked.as_secs_f64(),
            base: self.base,
            start_ms: START_MS,
            flap_rate: self.sc.gossip.health_changes_per_node_hour / 3600.0,
        };
        let tpl = templates();
        // Real chitchat sites run on their own runtimes, one at a time; the
        // modelled ones in parallel (each site's step touches only itself).
        let mut rest = Vec::with_capacity(self.sites.len());
        for s in &mut self.sites {
            if s.is_real() {
                s.step(&ctx, &tpl);
            } else {
                rest.push(s);
            }
        }
        let chunk = rest.len().div_ceil(self.threads).max(1);
        if self.threads > 1 && rest.len() > 64 {
            std::thread::scope(|scope| {
                for part in rest.chunks_mut(chunk) {
                    let (ctx, tpl) = (&ctx, &tpl);
                    scope.spawn(move || {
                        for s in part {
                            s.step(ctx, tpl);
                        }
                    });
                }
            });
        } else {
            for s in rest {
                s.step(&ctx, &tpl);
            }
        }
        self.events += self.sites.len() as u64;
        for i in 0..self.sites.len() {
            self.after_step(i);
        }
        if t + interval < self.end {
            self.at(t + interval, Ev::Tick);
        }
    }

    fn after_step(&mut self, i: usize) {
        let changes = std::mem::take(&mut self.sites[i].out.changes);
        for &(t, j, alive) in &changes {
            let s = &mut self.sites[i];
            if alive {
                continue;
            }
            if s.is_up(j) {
                self.false_suspicions += 1;
            } else if let Some(c) = s.crash_at[j].take() {
                self.detect.push(t - c);
            }
        }
        self.sites[i].out.changes = changes;
        if let Gossip::Model(m) = &mut self.sites[i].gossip {
            self.disseminate.append(&mut m.disseminations);
        }
        let arrivals = match &mut self.sites[i].gossip {
            Gossip::Model(m) => m.take_arrivals(),
            Gossip::Real { .. } => Vec::new(),
        };
        self.config_arrivals(i, &arrivals);
        self.patch_arrivals(i, &arrivals);
        self.patch_detect(i);
        let now = self.inst(self.now);
        let s = &mut self.sites[i];
        if s.out.sampled
            && matches!(s.relay.session, Session::Connected(_))
            && s.relay.core.ack_overdue(now)
        {
            self.end_session(i, true);
        }
        self.flush(i);
    }

    /// Hands the relay core's output to the disk and the uplink.
    fn flush(&mut self, i: usize) {
        let now = self.now;
        let at = self.inst(now);
        let fsync = self.sc.relay.fsync.as_secs_f64();
        let r = &mut self.sites[i].relay;
        if !r.up {
            return;
        }
        if r.appending.is_none() {
            let batch = r.core.poll_persist();
            if !batch.is_empty() {
                r.appending = Some(batch);
                let epoch = r.epoch;
                self.at(now + fsync, Ev::Fsynced { site: i, epoch });
            }
        }
        while let Some(t) = self.sites[i].relay.core.poll_transmit(at) {
            match t {
                Transmit::Record(rec) => self.send_record(i, rec),
                Transmit::Backlog { after, through } => {
                    let r = &mut self.sites[i].relay;
                    let queue: VecDeque<(Record, u64)> = r
                        .disk
                        .read_after(after, BACKLOG_CHUNK)
                        .into_iter()
                        .filter(|(rec, _)| rec.seq <= through)
                        .collect();
                    if let Session::Connected(c) = &mut r.session {
                        c.backlog = Some(Backlog {
                            queue,
                            through,
                            last: through,
                            ready_at: None,
                        });
                        let conn = c.conn;
                        self.at(now, Ev::BacklogSend { site: i, conn });
                    }
                }
            }
        }
        let r = &mut self.sites[i].relay;
        r.peak_bytes = r.peak_bytes.max(r.disk.bytes());
        r.peak_records = r.peak_records.max(r.disk.rows());
    }

    fn send_record(&mut self, i: usize, rec: Record) {
        let bytes = body_len(&rec.body) + 16;
        let now = self.now;
        self.traffic[WAN].add(bytes);
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let Session::Connected(c) = &self.sites[i].relay.session else {
            return;
        };
        let hub = c.hub;
        let up = self.path_up(i, hub);
        let Session::Connected(c) = &mut self.sites[i].relay.session else {
            return;
        };
        if c.broken || !up {
            c.broken = true;
            return;
        }
        let arrival = c.up.send(now, bytes, &wan, storm, &mut self.net);
        let conn = c.conn;
        self.at(
            arrival,
            Ev::RecordArrives {
                hub,
                site: i,
                conn,
                record: Box::new(rec),
            },
        );
    }

    /// The relay's session ends; it backs off, then tries again.
    fn end_session(&mut self, i: usize, notify: bool) {
        let now = self.now;
        let max_backoff = self.sc.relay.max_backoff;
        let (conn, hub, tried, last_heard) = match &self.sites[i].relay.session {
            Session::Connected(c) => (c.conn, c.hub, c.tried, Some(c.last_heard)),
            Session::Connecting {
                conn, hub, tried, ..
            } => (*conn, *hub, *tried, None),
            _ => return,
        };
        if notify && self.path_up(i, hub) {
            let d = self.links[WAN].one_way(&mut self.net);
            self.traffic[WAN].add(0);
            self.at(now + d, Ev::RelayClose { hub, conn });
        }
        let base = self.base;
        let r = &mut self.sites[i].relay;
        r.core.handle_disconnected();
        let heard = last_heard.map(|t| inst(base, t));
        r.choice.handle_ended(heard, inst(base, tried));
        r.attempt = next_attempt(r.attempt, heard, inst(base, tried));
        let wait = full_jitter(r.attempt, max_backoff, r.rng.f64()).as_secs_f64();
        let token = self.next_conn;
        self.next_conn += 1;
        r.session = Session::Waiting { token };
        self.at(now + wait, Ev::Retry { site: i, token });
    }

    fn connect(&mut self, i: usize) {
        let now = self.now;
        let at = self.inst(now);
        let r = &mut self.sites[i].relay;
        let index = r.choice.next(at);
        if index != r.previous {
            r.previous = index;
            r.attempt = 0;
        }
        let hub = r.hubs[index];
        let conn = self.next_conn;
        self.next_conn += 1;
        r.session = Session::Connecting {
            conn,
            index,
            hub,
            tried: now,
        };
        self.traffic[WAN].add(HANDSHAKE_BYTES);
        if self.path_up(i, hub) {
            // The QUIC handshake (a round trip), then the hello.
            let d = (0..3)
                .map(|_| self.links[WAN].one_way(&mut self.net))
                .sum::<f64>();
            self.at(now + d, Ev::Hello { hub, site: i, conn });
        }
        self.at(
            now + HANDSHAKE_TIMEOUT.as_secs_f64(),
            Ev::ConnectTimeout { site: i, conn },
        );
    }

    // ---- events ------------------------------------------------------

    fn handle(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Tick | Ev::End => {}
            Ev::HubTick => self.hub_tick(),
            Ev::Sample => self.sample(),
            Ev::FaultStart(f) => self.fault(f, true),
            Ev::FaultEnd(f) => self.fault(f, false),
            Ev::Fsynced { site, epoch } => {
                let r = &mut self.sites[site].relay;
                if r.epoch != epoch || !r.up {
                    return;
                }
                if let Some(batch) = r.appending.take() {
                    let records = r.disk.append(batch);
                    r.core.handle_persisted(records);
                }
                self.flush(site);
            }
            Ev::Retry { site, token } => {
                let r = &self.sites[site].relay;
                if r.up && matches!(r.session, Session::Waiting { token: t } if t == token) {
                    self.connect(site);
                }
            }
            Ev::ConnectTimeout { site, conn } => {
                if matches!(self.sites[site].relay.session, Session::Connecting { conn: c, .. } if c == conn)
                {
                    self.end_session(site, false);
                }
            }
            Ev::Hello { hub, site, conn } => {
                if !self.path_up(site, hub) {
                    return;
                }
                let at = self.inst(now);
                let r = &self.sites[site].relay;
                let acked = self.hubs[hub]
                    .core
                    .handle_hello(at, &r.id, r.disk.stream, conn);
                self.hubs[hub].conns.insert(conn, (site, now));
                self.traffic[WAN].add(24);
                let d = self.links[WAN].one_way(&mut self.net);
                self.at(now + d, Ev::Welcome { site, conn, acked });
            }
            Ev::Welcome { site, conn, acked } => {
                let (index, hub, tried) = match &self.sites[site].relay.session {
                    Session::Connecting {
                        conn: c,
                        index,
                        hub,
                        tried,
                    } if *c == conn => (*index, *hub, *tried),
                    _ => return,
                };
                if !self.path_up(site, hub) {
                    return;
                }
                let at = self.inst(now);
                let rate = self.sc.relay.replay_bytes_per_s;
                let r = &mut self.sites[site].relay;
                r.session = Session::Connected(Box::new(Connected {
                    conn,
                    index,
                    hub,
                    tried,
                    last_heard: now,
                    up: Pipe::default(),
                    down: Pipe::default(),
                    broken: false,
                    backlog: None,
                    bucket: TokenBucket::new(rate, at),
                    config_sent: 0,
                }));
                r.core.handle_connected(acked);
                if index > 0 {
                    let every = self.sc.relay.failback_every.as_secs_f64();
                    self.at(now + every, Ev::FailbackLook { site, conn });
                }
                self.flush(site);
                // The hub offers its configuration as the session opens.
                self.push_config(site);
            }
            Ev::RecordArrives {
                hub,
                site,
                conn,
                record,
            } => {
                if !self.path_up(site, hub) {
                    if let Session::Connected(c) = &mut self.sites[site].relay.session
                        && c.conn == conn
                    {
                        c.broken = true;
                    }
                    return;
                }
                let h = &mut self.hubs[hub];
                let Some(open) = h.conns.get_mut(&conn) else {
                    return;
                };
                open.1 = now;
                match h.inbox.last_mut() {
                    Some(Inbound::Records {
                        site: s,
                        conn: c,
                        records,
                    }) if *s == site && *c == conn => records.push(*record),
                    _ => h.inbox.push(Inbound::Records {
                        site,
                        conn,
                        records: vec![*record],
                    }),
                }
                self.wake(hub);
            }
            Ev::AckArrives {
                hub,
                site,
                conn,
                through,
            } => self.ack_arrives(hub, site, conn, through),
            Ev::RelayClose { hub, conn } => {
                let at = self.inst(now);
                let h = &mut self.hubs[hub];
                if let Some((site, _)) = h.conns.remove(&conn) {
                    h.core
                        .handle_disconnected(at, &self.sites[site].relay.id, conn);
                }
            }
            Ev::HubClose { site, conn } => {
                if matches!(&self.sites[site].relay.session, Session::Connected(c) if c.conn == conn)
                {
                    self.end_session(site, false);
                }
            }
            Ev::BacklogSend { site, conn } => self.backlog_send(site, conn),
            Ev::FailbackLook { site, conn } => {
                let Session::Connected(c) = &self.sites[site].relay.session else {
                    return;
                };
                if c.conn != conn {
                    return;
                }
                let index = c.index;
                let hubs = self.sites[site].relay.hubs.clone();
                for (k, &hub) in hubs.iter().enumerate().take(index) {
                    self.traffic[WAN].add(HANDSHAKE_BYTES);
                    if self.path_up(site, hub) {
                        let d = self.links[WAN].one_way(&mut self.net) * 2.0;
                        self.at(
                            now + d,
                            Ev::FailbackAnswer {
                                site,
                                conn,
                                index: k,
                            },
                        );
                        break;
                    }
                }
                let every = self.sc.relay.failback_every.as_secs_f64();
                self.at(now + every, Ev::FailbackLook { site, conn });
            }
            Ev::FailbackAnswer { site, conn, index } => {
                if !matches!(&self.sites[site].relay.session, Session::Connected(c) if c.conn == conn)
                {
                    return;
                }
                let hub = match &self.sites[site].relay.session {
                    Session::Connected(c) => c.hub,
                    _ => return,
                };
                if self.path_up(site, hub) {
                    let d = self.links[WAN].one_way(&mut self.net);
                    self.at(now + d, Ev::RelayClose { hub, conn });
                }
                let at = self.inst(now);
                let r = &mut self.sites[site].relay;
                r.core.handle_disconnected();
                r.choice.fail_back(index, at);
                r.previous = index;
                r.attempt = 0;
                self.connect(site);
            }
            Ev::HubProcess { hub, epoch } => self.hub_process(hub, epoch),
            Ev::HubCommitted { hub, epoch } => self.hub_committed(hub, epoch),
            Ev::Replicated { to, records } => {
                if self.hubs[to].up {
                    self.hubs[to].inbox.push(Inbound::Replicated(records));
                    self.wake(to);
                }
            }
            Ev::PullRequest { to, from, have } => {
                if !self.hubs_linked(to, from) {
                    return;
                }
                let mut records = Vec::new();
                let mut more = false;
                let p = &self.hubs[to];
                'ranges: for (relay, stream, after, until) in missing(p.core.coverage(), &have) {
                    let Some(&site) = self.relay_index.get(&relay) else {
                        continue;
                    };
                    let Some(rows) = p.store.get(&(site, stream)) else {
                        continue;
                    };
                    for (rec, received) in rows.range(after + 1..=until).map(|(_, v)| v) {
                        if records.len() >= PULL_CHUNK as usize {
                            more = true;
                            break 'ranges;
                        }
                        records.push(self.stored(site, stream, rec, *received));
                    }
                }
                let bytes: u64 = records.iter().map(|r| body_len(&r.body) + 64).sum();
                self.traffic[HUB].add(bytes);
                let (links, storm) = (self.links[HUB], self.storm[HUB]);
                let arrival =
                    self.hubs[to].pipes[from].send(now, bytes, &links, storm, &mut self.net);
                self.at(
                    arrival,
                    Ev::PullResponse {
                        to: from,
                        from: to,
                        records,
                        more,
                    },
                );
            }
            Ev::PullResponse {
                to,
                from,
                records,
                more,
            } => {
                if !self.hubs_linked(to, from) {
                    return;
                }
                self.hubs[to].pulling[from] = None;
                if !records.is_empty() {
                    self.hubs[to].inbox.push(Inbound::Replicated(records));
                    self.wake(to);
                }
                if more {
                    self.pull(to, from);
                }
            }
            Ev::Gossip {
                to,
                from,
                served,
                digest,
                config,
                patches,
            } => {
                if self.hubs_linked(to, from) {
                    self.hubs[to].peers[from] = Some(PeerState {
                        last_heard: now,
                        served,
                        digest,
                        config,
                        patches,
                    });
                }
            }
            Ev::ConfigChange(version) => self.config_change(version),
            Ev::ConfigReplicated { to, from, version } => {
                if !self.hubs_linked(to, from) {
                    return;
                }
                self.hubs[to].config_pulling[from] = None;
                self.hub_gets_config(to, version, false);
            }
            Ev::ConfigPull { to, from } => {
                if !self.hubs_linked(to, from) {
                    return;
                }
                let version = self.hubs[to].config;
                if version == 0 {
                    return;
                }
                let bytes = self.bundle_bytes(version) + 64;
                self.traffic[HUB].add(bytes);
                let (links, storm) = (self.links[HUB], self.storm[HUB]);
                let arrival =
                    self.hubs[to].pipes[from].send(now, bytes, &links, storm, &mut self.net);
                self.at(
                    arrival,
                    Ev::ConfigReplicated {
                        to: from,
                        from: to,
                        version,
                    },
                );
            }
            Ev::ConfigToRelay {
                site,
                conn,
                version,
            } => {
                let wan_down = self.sites[site].wan_down;
                let Session::Connected(c) = &mut self.sites[site].relay.session else {
                    return;
                };
                if c.conn != conn || c.broken {
                    return;
                }
                if wan_down > 0 {
                    c.broken = true;
                    return;
                }
                self.relay_gets_config(site, version);
            }
            Ev::ConfigSeen {
                site,
                node,
                epoch,
                version,
            } => {
                if !self.sites[site].is_up(node) {
                    return;
                }
                let n = &mut self.configs[site].nodes[node];
                if n.epoch != epoch {
                    return;
                }
                n.wanted = n.wanted.max(version);
                if n.should_fetch() {
                    self.start_fetch(site, node);
                }
            }
            Ev::ConfigFetched {
                site,
                node,
                epoch,
                relay_epoch,
                version,
            } => {
                if !self.sites[site].is_up(node) || self.configs[site].nodes[node].epoch != epoch {
                    return;
                }
                let r = &self.sites[site].relay;
                if !r.up || r.epoch != relay_epoch {
                    // The relay went away during the fetch. If it is back,
                    // its new announcement may have come while the node was
                    // busy, so the node tries again; if not, it will see the
                    // announcement when the relay restarts.
                    let up = r.up;
                    self.configs[site].nodes[node].busy = false;
                    if up {
                        self.start_fetch(site, node);
                    }
                    return;
                }
                let apply = self.apply_time(version);
                self.at(
                    now + apply,
                    Ev::ConfigApplied {
                        site,
                        node,
                        epoch,
                        version,
                    },
                );
            }
            ev @ (Ev::PublishPatch(_)
            | Ev::RolloutStart(_)
            | Ev::PatchReplicated { .. }
            | Ev::PatchPull { .. }
            | Ev::PatchOrders { .. }
            | Ev::ArtifactChunk { .. }
            | Ev::PatchReport { .. }
            | Ev::PatchSeen { .. }
            | Ev::PatchFetched { .. }
            | Ev::PatchInstalled { .. }
            | Ev::PatchChecksFail { .. }
            | Ev::PatchBaked { .. }
            | Ev::PatchRolledBack { .. }) => self.handle_patch(ev),
            Ev::Foresight(ev) => self.handle_foresight(ev),
            Ev::ConfigApplied {
                site,
                node,
                epoch,
                version,
            } => {
                if !self.sites[site].is_up(node) || self.configs[site].nodes[node].epoch != epoch {
                    return;
                }
                let n = &mut self.configs[site].nodes[node];
                n.applied = n.applied.max(version);
                n.busy = false;
                let again = n.should_fetch();
                self.config_nodes_changed(site);
                if again {
                    self.start_fetch(site, node);
                }
            }
        }
    }

    fn stored(&self, site: usize, stream: u64, rec: &Record, received: u64) -> StoredRecord {
        let s = &self.sites[site];
        stored(
            &s.relay.id.name,
            stream,
            &s.region_name,
            &s.name,
            rec,
            received,
        )
    }

    fn backlog_send(&mut self, i: usize, conn: u64) {
        let now = self.now;
        let at = self.inst(now);
        loop {
            let Session::Connected(c) = &mut self.sites[i].relay.session else {
                return;
            };
            if c.conn != conn {
                return;
            }
            let Some(b) = c.backlog.as_mut() else {
                return;
            };
            if let Some(ready) = b.ready_at {
                if ready > now {
                    self.at(ready, Ev::BacklogSend { site: i, conn });
                    return;
                }
                b.ready_at = None;
                let (rec, _) = b.queue.pop_front().expect("a record is waiting");
                b.last = rec.until().min(b.through);
                self.send_record(i, rec);
                continue;
            }
            match b.queue.front() {
                None => {
                    let last = b.last;
                    c.backlog = None;
                    self.sites[i].relay.core.handle_backlog_sent(last);
                    self.flush(i);
                    return;
                }
                Some((_, len)) => {
                    let wait = c.bucket.take(len + 16, at);
                    b.ready_at = Some(now + wait.as_secs_f64());
                }
            }
        }
    }

    fn ack_arrives(&mut self, hub: usize, site: usize, conn: u64, through: u64) {
        let now = self.now;
        let wan_down = self.sites[site].wan_down;
        let Session::Connected(c) = &mut self.sites[site].relay.session else {
            return;
        };
        if c.conn != conn || c.hub != hub || c.broken {
            return;
        }
        if wan_down > 0 {
            c.broken = true;
            return;
        }
        c.last_heard = now;
        if !self.hubs[hub].applied[site].covers_through(through) {
            self.violations.push(format!(
                "{} acknowledged {} through seq {through} before holding all of it durably",
                self.hubs[hub].name, self.sites[site].relay.id.name
            ));
        }
        let at = self.inst(now);
        let r = &mut self.sites[site].relay;
        match r.core.handle_ack(at, through) {
            Ok(Some(t)) => r.to_delete.push_back((now, t)),
            Ok(None) => {}
            Err(e) => {
                self.violations
                    .push(format!("{}: hub broke the uplink protocol: {e}", r.id.name));
                self.end_session(site, true);
                return;
            }
        }
        self.flush(site);
    }

    // ---- hubs --------------------------------------------------------

    fn wake(&mut self, hub: usize) {
        let h = &mut self.hubs[hub];
        if h.up && !h.wake && h.committing.is_none() {
            h.wake = true;
            let epoch = h.epoch;
            let now = self.now;
            self.at(now, Ev::HubProcess { hub, epoch });
        }
    }

    /// Takes what arrived since the last commit and commits it in one go.
    fn hub_process(&mut self, hub: usize, epoch: u64) {
        let h = &mut self.hubs[hub];
        if h.epoch != epoch || !h.up {
            return;
        }
        h.wake = false;
        if h.committing.is_some() || h.inbox.is_empty() {
            return;
        }
        let mut work = Vec::new();
        for input in std::mem::take(&mut h.inbox) {
            match input {
                Inbound::Records {
                    site,
                    conn,
                    records,
                } => match h.core.take_fresh(&self.sites[site].relay.id, records) {
                    Ok(fresh) => work.push(Work {
                        fresh,
                        reply: Some((site, conn)),
                    }),
                    Err(e) => self
                        .violations
                        .push(format!("{} refused records: {e}", h.name)),
                },
                Inbound::Replicated(records) => {
                    for fresh in h.core.take_replicated(records) {
                        work.push(Work { fresh, reply: None });
                    }
                }
            }
        }
        if work.iter().all(|w| w.fresh.records.is_empty()) {
            // Nothing new: acknowledge at once, as the hub does.
            self.hubs[hub].committing = Some(work);
            self.hub_committed(hub, epoch);
            return;
        }
        h.committing = Some(work);
        let fsync = self.sc.hub.fsync.as_secs_f64();
        let now = self.now;
        self.at(now + fsync, Ev::HubCommitted { hub, epoch });
    }

    fn hub_committed(&mut self, hub: usize, epoch: u64) {
        let now = self.now;
        let now_ms = self.wall_ms();
        let h = &self.hubs[hub];
        if h.epoch != epoch || !h.up {
            return;
        }
        let Some(work) = self.hubs[hub].committing.take() else {
            return;
        };
        let mut pushed = Vec::new();
        let mut acks = Vec::new();
        for w in work {
            let site = self.relay_index[&w.fresh.relay.name];
            let stream = w.fresh.stream;
            let received = if w.fresh.received_ms > 0 {
                w.fresh.received_ms
            } else {
                now_ms
            };
            for r in &w.fresh.records {
                if self.hubs[hub].applied[site].set(r.seq, r.until()) {
                    self.duplicates_applied += 1;
                    self.violations.push(format!(
                        "{} applied {} seq {} twice",
                        self.hubs[hub].name, w.fresh.relay.name, r.seq
                    ));
                }
                if w.reply.is_some() {
                    // Only what came straight from a relay is pushed on.
                    pushed.push(self.stored(site, stream, r, received));
                }
            }
            let h = &mut self.hubs[hub];
            let rows = h.store.entry((site, stream)).or_default();
            for r in &w.fresh.records {
                rows.insert(r.seq, (r.clone(), received));
            }
            h.core.handle_committed(received, &w.fresh);
            if let Some((s, conn)) = w.reply {
                let through = h.core.applied(&w.fresh.relay.name, stream);
                acks.push((s, conn, through));
            }
        }
        for (site, conn, through) in acks {
            self.send_ack(hub, site, conn, through);
        }
        if !pushed.is_empty() {
            let bytes: u64 = pushed.iter().map(|r| body_len(&r.body) + 64).sum();
            for g in 0..self.hubs.len() {
                if g == hub || !self.believes_alive(hub, g) {
                    continue;
                }
                self.traffic[HUB].add(bytes);
                if !self.hubs_linked(hub, g) {
                    continue;
                }
                let (links, storm) = (self.links[HUB], self.storm[HUB]);
                let arrival =
                    self.hubs[hub].pipes[g].send(now, bytes, &links, storm, &mut self.net);
                self.at(
                    arrival,
                    Ev::Replicated {
                        to: g,
                        records: pushed.clone(),
                    },
                );
            }
        }
        if !self.hubs[hub].inbox.is_empty() {
            self.wake(hub);
        }
    }

    fn send_ack(&mut self, hub: usize, site: usize, conn: u64, through: u64) {
        if !self.hubs[hub].conns.contains_key(&conn) {
            return;
        }
        self.traffic[WAN].add(16);
        if !self.path_up(site, hub) {
            return;
        }
        let now = self.now;
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let Session::Connected(c) = &mut self.sites[site].relay.session else {
            return;
        };
        if c.conn != conn {
            return;
        }
        let arrival = c.down.send(now, 16, &wan, storm, &mut self.net);
        self.at(
            arrival,
            Ev::AckArrives {
                hub,
                site,
                conn,
                through,
            },
        );
    }

    /// Whether hub `h`'s federation gossip believes `g` alive: heard from
    /// within `phi_threshold` gossip intervals (chitchat's detector with a
    /// steady heartbeat).
    fn believes_alive(&self, h: usize, g: usize) -> bool {
        let dead_after = self.sc.gossip.phi_threshold * self.sc.gossip.interval.as_secs_f64();
        self.hubs[h].peers[g]
            .as_ref()
            .is_some_and(|p| self.now - p.last_heard <= dead_after)
    }

    fn pull(&mut self, from: usize, to: usize) {
        let now = self.now;
        let have = Arc::new(self.hubs[from].core.coverage().clone());
        let bytes = have.len() as u64 * 40;
        self.traffic[HUB].add(bytes);
        self.hubs[from].pulling[to] = Some(now);
        if !self.hubs_linked(from, to) {
            return;
        }
        let (links, storm) = (self.links[HUB], self.storm[HUB]);
        let arrival = self.hubs[from].pipes[to].send(now, bytes, &links, storm, &mut self.net);
        self.at(arrival, Ev::PullRequest { to, from, have });
    }

    /// Every gossip interval: federation gossip, the hubs' view of each
    /// other, silent relays, anti-entropy, and the watches.
    fn hub_tick(&mut self) {
        let now = self.now;
        let at = self.inst(now);
        let n = self.hubs.len();
        for h in 0..n {
            if !self.hubs[h].up {
                continue;
            }
            let served = self.hubs[h].core.served();
            let digest = self.hubs[h].core.records_digest();
            let kv = federation::encode(&Published {
                api: "",
                region: &self.hubs[h].region,
                records_digest: digest,
                log_digest: 0,
                log_entries: 0,
                served: &served,
            });
            let kv: BTreeMap<String, String> = kv.into_iter().collect();
            let delta: u64 = kv
                .iter()
                .filter(|(k, v)| self.hubs[h].published.get(*k) != Some(*v))
                .map(|(k, v)| (k.len() + v.len() + 8) as u64)
                .sum();
            self.hubs[h].published = kv;
            let served = Arc::new(served);
            for g in 0..n {
                if g == h {
                    continue;
                }
                // Digests and heartbeats, plus what changed.
                self.traffic[HUB].add(64 * n as u64 + delta);
                if self.hubs_linked(h, g) {
                    let d = self.links[HUB].one_way(&mut self.net);
                    self.at(
                        now + d,
                        Ev::Gossip {
                            to: g,
                            from: h,
                            served: served.clone(),
                            digest,
                            config: self.hubs[h].config,
                            patches: self.hubs[h].patches,
                        },
                    );
                }
            }
        }
        let silence = self.sc.hub.silence_timeout.as_secs_f64();
        for h in 0..n {
            if !self.hubs[h].up {
                continue;
            }
            let mut remote = Vec::new();
            for g in 0..n {
                if g != h
                    && self.believes_alive(h, g)
                    && let Some(p) = &self.hubs[h].peers[g]
                {
                    remote.extend(p.served.iter().cloned());
                }
            }
            self.hubs[h].core.handle_peers(remote);
            let silent: Vec<(u64, usize)> = self.hubs[h]
                .conns
                .iter()
                .filter(|(_, (_, last))| now - last > silence)
                .map(|(c, (s, _))| (*c, *s))
                .collect();
            for (conn, site) in silent {
                self.hubs[h].conns.remove(&conn);
                self.hubs[h]
                    .core
                    .handle_disconnected(at, &self.sites[site].relay.id, conn);
                if self.path_up(site, h) {
                    let d = self.links[WAN].one_way(&mut self.net);
                    self.at(now + d, Ev::HubClose { site, conn });
                }
            }
            if now >= self.hubs[h].next_anti_entropy {
                self.hubs[h].next_anti_entropy = now + self.sc.hub.anti_entropy_every.as_secs_f64();
                let mine = self.hubs[h].core.records_digest();
                for g in 0..n {
                    if g == h || !self.believes_alive(h, g) {
                        continue;
                    }
                    let differs = self.hubs[h].peers[g]
                        .as_ref()
                        .is_some_and(|p| p.digest != mine);
                    let busy =
                        self.hubs[h].pulling[g].is_some_and(|since| now - since < PULL_TIMEOUT);
                    if differs && !busy {
                        self.pull(h, g);
                    }
                    let newer = self.hubs[h].peers[g]
                        .as_ref()
                        .is_some_and(|p| p.config > self.hubs[h].config);
                    let asked = self.hubs[h].config_pulling[g]
                        .is_some_and(|since| now - since < PULL_TIMEOUT);
                    if newer && !asked {
                        self.pull_config(h, g);
                    }
                    self.pull_patches(h, g);
                }
            }
        }
        self.patch_tick();
        self.check_watches();
        let interval = self.sc.gossip.interval.as_secs_f64();
        if now + interval < self.end {
            self.at(now + interval, Ev::HubTick);
        }
    }

    // ---- faults ------------------------------------------------------

    fn fault(&mut self, i: usize, start: bool) {
        let f = self.faults[i].clone();
        let now = self.now;
        let targets = self.fault_sites[i].clone();
        match f.kind {
            FaultKind::WanOutage => {
                for &s in &targets {
                    if start {
                        self.sites[s].wan_down += 1;
                    } else {
                        self.sites[s].wan_down -= 1;
                        if self.sites[s].wan_down == 0 {
                            self.watch_drain(s);
                        }
                    }
                }
            }
            FaultKind::RelayCrash => {
                for &s in &targets {
                    if start {
                        self.sites[s].down[0] += 1;
                        if self.sites[s].down[0] == 1 {
                            self.crash_relay(s);
                        }
                    } else {
                        self.sites[s].down[0] -= 1;
                        if self.sites[s].down[0] == 0 {
                            self.restart_relay(s);
                        }
                    }
                }
            }
            FaultKind::NodeCrash => {
                let share = f.share.unwrap_or(0.0);
                for &s in &targets {
                    let n = self.sites[s].members.len() - 1;
                    let k = ((n as f64 * share).round() as usize)
                        .max(usize::from(share > 0.0))
                        .min(n);
                    let label = format!("node-crash/{}/{}", self.sites[s].name, f.at.as_millis());
                    let mut rng = SimRng::derive(self.seed, &label, 0);
                    let mut picked = Vec::new();
                    rng.sample(n, k, &mut picked);
                    picked.sort_unstable();
                    for p in picked {
                        let j = p + 1;
                        if start {
                            self.crash_node(s, j);
                        } else {
                            self.restart_node(s, j);
                        }
                    }
                }
            }
            FaultKind::DiskFull => {
                let cap = f.max_bytes.unwrap_or(u64::MAX);
                for &s in &targets {
                    if start {
                        self.disk_caps[s].push(cap);
                    } else if let Some(p) = self.disk_caps[s].iter().position(|c| *c == cap) {
                        self.disk_caps[s].remove(p);
                    }
                    let max = self.disk_caps[s]
                        .iter()
                        .copied()
                        .min()
                        .unwrap_or(self.sc.relay.buffer_max_bytes);
                    self.sites[s].relay.disk.max_bytes = max;
                }
            }
            FaultKind::LossStorm => {
                let class = match f.class.as_deref() {
                    Some("lan") => LAN,
                    Some("hub") => HUB,
                    _ => WAN,
                };
                let loss = f.loss.unwrap_or(0.0);
                self.storm[class] = (self.storm[class] + if start { loss } else { -loss }).max(0.0);
                if class == LAN {
                    let total = self.storm[LAN];
                    for s in &mut self.sites {
                        if let Gossip::Model(m) = &mut s.gossip {
                            m.set_loss(total);
                        }
                    }
                }
            }
            FaultKind::HubCrash => {
                let h = f
                    .hub
                    .as_ref()
                    .and_then(|n| self.hubs.iter().position(|x| &x.name == n))
                    .unwrap_or(0);
                if start {
                    self.crash_hub(h);
                } else {
                    self.restart_hub(h);
                }
            }
            FaultKind::HubPartition => {
                let inside: Vec<usize> = f
                    .hubs
                    .iter()
                    .filter_map(|n| self.hubs.iter().position(|x| &x.name == n))
                    .collect();
                for a in 0..self.hubs.len() {
                    for b in 0..self.hubs.len() {
                        if inside.contains(&a) != inside.contains(&b) {
                            if start {
                                self.cut[a][b] += 1;
                            } else {
                                self.cut[a][b] -= 1;
                            }
                        }
                    }
                }
            }
        }
        if start {
            let named: Vec<String> = match f.kind {
                FaultKind::HubCrash => f.hub.iter().cloned().collect(),
                FaultKind::HubPartition => f.hubs.clone(),
                FaultKind::LossStorm => f.class.iter().cloned().collect(),
                _ => f.sites.clone(),
            };
            let o = &mut self.outcomes[i];
            o.targets = named.len() as u64;
            o.named = named.into_iter().take(20).collect();
        } else {
            // Watch the sites it hit (all of them for hub and link faults).
            let sites: Vec<usize> = if f.targets_sites() {
                targets
            } else {
                (0..self.sites.len()).collect()
            };
            let sites = sites
                .into_iter()
                .map(|s| (s, self.sites[s].relay.core.stats().persisted_through))
                .collect();
            self.watches.push(Watch {
                fault: i,
                healed: now,
                sites,
            });
        }
    }

    fn watch_drain(&mut self, s: usize) {
        let st = self.sites[s].relay.core.stats();
        if !self.sites[s].relay.up {
            return;
        }
        self.drains.push(DrainWatch {
            site: s,
            healed: self.now,
            target: st.persisted_through,
            backlog: st.persisted_through.saturating_sub(st.acked_through),
        });
    }

    fn crash_node(&mut self, s: usize, j: usize) {
        let now = self.now;
        let site = &mut self.sites[s];
        site.down[j] += 1;
        if site.down[j] > 1 {
            return;
        }
        self.alive[site.region] -= 1;
        // Measured only if the relay runs to see it.
        site.crash_at[j] = site.relay.up.then_some(now);
        match &mut site.gossip {
            Gossip::Model(m) => m.crash(j),
            Gossip::Real { site, .. } => site.crash(j),
        }
        self.configs[s].nodes[j].crash();
        // The nodes still running may now all have the newest version.
        self.config_nodes_changed(s);
        self.patch_node_crashed(s, j);
        self.fs_node_crashed(s, j);
    }

    fn restart_node(&mut self, s: usize, j: usize) {
        let now_ms = self.wall_ms();
        let site = &mut self.sites[s];
        if site.down[j] == 0 {
            return;
        }
        site.down[j] -= 1;
        if site.down[j] > 0 {
            return;
        }
        self.alive[site.region] += 1;
        if site.crash_at[j].take().is_some() {
            self.undetected += 1;
        }
        site.relay.joining_until = self.now + trellis_relay::core::JOIN_GRACE.as_secs_f64() + 1.0;
        match &mut site.gossip {
            Gossip::Model(m) => m.restart(j, now_ms),
            Gossip::Real { site, versions, .. } => {
                let _ = site.restart(j, health_of(versions[j]).to_kv());
            }
        }
        self.patch_node_restarted(s, j);
        self.fs_node_restarted(s, j);
    }

    fn crash_relay(&mut self, s: usize) {
        if matches!(
            self.sites[s].relay.session,
            Session::Connected(_) | Session::Connecting { .. }
        ) {
            // No goodbye: the process is gone.
            let r = &mut self.sites[s].relay;
            r.core.handle_disconnected();
        }
        let site = &mut self.sites[s];
        let r = &mut site.relay;
        r.up = false;
        r.epoch += 1;
        // What was not yet fsynced is lost; it was never sent.
        r.appending = None;
        r.to_delete.clear();
        r.session = Session::Down;
        // Crashes it was timing can no longer be seen.
        for c in &mut site.crash_at {
            *c = None;
        }
        match &mut site.gossip {
            Gossip::Model(m) => m.crash(0),
            Gossip::Real { site, .. } => site.crash(0),
        }
    }

    fn restart_relay(&mut self, s: usize) {
        let now = self.now;
        let now_ms = self.wall_ms();
        let at = self.inst(now);
        // The relay announces the patch orders it holds again as it starts.
        let patch_kv = self.patch_announcements(s);
        let sc = &self.sc;
        let site = &mut self.sites[s];
        let r = &mut site.relay;
        let deleted = r.disk.first_seq().map_or(r.disk.last_seq(), |f| f - 1);
        r.core = RelayCore::new(
            r.id.name.clone(),
            CoreConfig {
                summary_interval: sc.relay.summary_interval,
                ack_timeout: sc.relay.ack_timeout,
                ..CoreConfig::default()
            },
            deleted,
            r.disk.last_seq(),
            r.disk.latest_summary(),
        );
        r.choice = HubChoice::new(
            r.hubs.len(),
            sc.relay.failover_after,
            sc.relay.failback_every,
            at,
        );
        r.attempt = 0;
        r.previous = 0;
        r.up = true;
        r.next_sample = now;
        r.fingerprint = 0;
        r.joining_until = now + trellis_relay::core::JOIN_GRACE.as_secs_f64() + 1.0;
        let token = self.next_conn;
        self.next_conn += 1;
        r.session = Session::Waiting { token };
        // The relay announces the configuration it has cached, if any, as
        // it starts.
        let cached = self.configs[s].relay;
        match &mut site.gossip {
            Gossip::Model(m) => {
                m.restart(0, now_ms);
                m.reset_relay();
                if cached > 0 || !patch_kv.is_empty() {
                    let v = m.version(0);
                    m.watch(0, v);
                }
            }
            Gossip::Real { site, .. } => {
                let mut kv = relay_health().to_kv();
                if cached > 0 {
                    kv.push((ANNOUNCE_KEY.to_owned(), announcement(cached)));
                }
                kv.extend(patch_kv);
                let _ = site.restart(0, kv);
            }
        }
        self.at(now, Ev::Retry { site: s, token });
        self.watch_drain(s);
    }

    fn crash_hub(&mut self, h: usize) {
        let hub = &mut self.hubs[h];
        hub.up = false;
        hub.epoch += 1;
        hub.absorbed_before += hub.core.stats().duplicates;
        hub.inbox.clear();
        hub.committing = None;
        hub.wake = false;
        hub.conns.clear();
        for p in &mut hub.peers {
            *p = None;
        }
        hub.pulling.iter_mut().for_each(|p| *p = None);
        hub.config_pulling.iter_mut().for_each(|p| *p = None);
        hub.patch_pulling.iter_mut().for_each(|p| *p = None);
        hub.published.clear();
    }

    fn restart_hub(&mut self, h: usize) {
        let mut streams = Vec::new();
        let mut summaries = Vec::new();
        for ((site, stream), rows) in &self.hubs[h].store {
            let s = &self.sites[*site];
            let mut cov = Coverage::default();
            let mut latest: Option<&SiteSummary> = None;
            for (rec, _) in rows.values() {
                cov.add(rec.seq, rec.until());
                if let RecordBody::Summary(sum) = &rec.body {
                    latest = Some(sum);
                }
            }
            streams.push(StreamRow {
                relay: s.relay.id.name.clone(),
                stream: *stream,
                region: s.region_name.clone(),
                site: s.name.clone(),
                applied_through: cov.applied,
                above: cov.above,
            });
            if let Some(sum) = latest {
                let mut sum = sum.clone();
                sum.relay = s.relay.id.name.clone();
                summaries.push(sum);
            }
        }
        let hub = &mut self.hubs[h];
        hub.core = HubCore::new(hub.name.clone(), self.sc.hub.stale_after);
        hub.core.restore(streams, summaries);
        hub.up = true;
        hub.next_anti_entropy = self.now;
        for version in std::mem::take(&mut hub.operator_waiting) {
            self.hub_gets_config(h, version, true);
        }
    }

    // ---- configuration -----------------------------------------------

    fn bundle_bytes(&self, version: u64) -> u64 {
        self.books.change(version).map_or(0, |c| c.bundle_bytes)
    }

    fn apply_time(&self, version: u64) -> f64 {
        self.books.change(version).map_or(0.0, |c| c.apply_time)
    }

    /// The operator applies change `version` at its hub; if the hub is
    /// down, the operator retries until it is back.
    fn config_change(&mut self, version: u64) {
        let now = self.now;
        let cut_off = self.sites.iter().map(|s| s.wan_down > 0).collect();
        self.books.made(version, now, cut_off);
        let Some(h) = self.books.change(version).map(|c| c.hub) else {
            return;
        };
        if self.hubs[h].up {
            self.hub_gets_config(h, version, true);
        } else {
            self.hubs[h].operator_waiting.push(version);
        }
    }

    /// Hub `h` holds `version` from now: as the origin of a change it
    /// pushes it to the hubs it believes alive (the others pull it by
    /// anti-entropy), and it pushes it to every relay connected to it.
    fn hub_gets_config(&mut self, h: usize, version: u64, origin: bool) {
        let now = self.now;
        if !self.hubs[h].up || version <= self.hubs[h].config {
            return;
        }
        self.hubs[h].config = version;
        self.books.hub_holds(h, version, now);
        if origin {
            let bytes = self.bundle_bytes(version) + 64;
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
                    Ev::ConfigReplicated {
                        to: g,
                        from: h,
                        version,
                    },
                );
            }
        }
        for s in 0..self.sites.len() {
            if matches!(&self.sites[s].relay.session, Session::Connected(c) if c.hub == h) {
                self.push_config(s);
            }
        }
    }

    /// Hub `from` asks hub `to` for its configuration (a peer's gossip
    /// shows a newer one).
    fn pull_config(&mut self, from: usize, to: usize) {
        let now = self.now;
        self.traffic[HUB].add(16);
        self.hubs[from].config_pulling[to] = Some(now);
        if !self.hubs_linked(from, to) {
            return;
        }
        let (links, storm) = (self.links[HUB], self.storm[HUB]);
        let arrival = self.hubs[from].pipes[to].send(now, 16, &links, storm, &mut self.net);
        self.at(arrival, Ev::ConfigPull { to, from });
    }

    /// The relay's hub sends it its configuration, if newer than what the
    /// relay holds and not already sent on this connection.
    fn push_config(&mut self, s: usize) {
        let now = self.now;
        let Session::Connected(c) = &self.sites[s].relay.session else {
            return;
        };
        let (hub, conn) = (c.hub, c.conn);
        let version = self.hubs[hub].config;
        if version <= self.configs[s].relay
            || version <= c.config_sent
            || !self.hubs[hub].conns.contains_key(&conn)
        {
            return;
        }
        let bytes = self.bundle_bytes(version) + 16;
        self.traffic[WAN].add(bytes);
        let up = self.path_up(s, hub);
        let (wan, storm) = (self.links[WAN], self.storm[WAN]);
        let Session::Connected(c) = &mut self.sites[s].relay.session else {
            return;
        };
        c.config_sent = version;
        if c.broken || !up {
            c.broken = true;
            return;
        }
        let arrival = c.down.send(now, bytes, &wan, storm, &mut self.net);
        self.at(
            arrival,
            Ev::ConfigToRelay {
                site: s,
                conn,
                version,
            },
        );
    }

    /// Site `s`'s relay has `version`: it caches it and, if newer than what
    /// it had, announces it in the site's gossip.
    fn relay_gets_config(&mut self, s: usize, version: u64) {
        let now = self.now;
        if version <= self.configs[s].relay || !self.sites[s].relay.up {
            return;
        }
        self.configs[s].relay = version;
        self.books.relay_holds(s, version, now);
        let cfg = &mut self.configs[s];
        cfg.announced = version;
        match &mut self.sites[s].gossip {
            Gossip::Model(m) => {
                let v = m.bump(0);
                m.watch(0, v);
            }
            Gossip::Real { site, .. } => {
                cfg.arrivals_seen = 0;
                site.set(0, vec![(ANNOUNCE_KEY.to_owned(), announcement(version))]);
            }
        }
    }

    /// The nodes of site `i` that came to see the relay's announcement in
    /// the gossip step just run, each at the moment it did.
    /// `model` are the arrivals of the relay's state a modelled site
    /// recorded (one watch serves configuration and patches).
    fn config_arrivals(&mut self, i: usize, model: &[(usize, f64)]) {
        let cfg = &mut self.configs[i];
        if cfg.announced == 0 {
            return;
        }
        let version = cfg.announced;
        let arrivals: Vec<(usize, f64)> = match &mut self.sites[i].gossip {
            Gossip::Model(_) => model.to_vec(),
            Gossip::Real { site, offset, .. } => {
                let all = site.arrivals(0, ANNOUNCE_KEY, &announcement(version));
                let fresh = all
                    .iter()
                    .skip(cfg.arrivals_seen)
                    .map(|&(j, t)| (j, t - *offset))
                    .collect();
                cfg.arrivals_seen = all.len();
                fresh
            }
        };
        for (node, t) in arrivals {
            if node == 0 {
                continue;
            }
            let epoch = cfg.nodes[node].epoch;
            self.q.schedule_at(
                secs(t),
                Ev::ConfigSeen {
                    site: i,
                    node,
                    epoch,
                    version,
                },
            );
        }
    }

    /// Node `j` of site `s` fetches the bundle from its relay: a request,
    /// then the bundle over the relay's side of the LAN, which the site's
    /// fetches share.
    fn start_fetch(&mut self, s: usize, j: usize) {
        let now = self.now;
        let r = &self.sites[s].relay;
        let version = self.configs[s].relay;
        if !r.up || version == 0 {
            // Nothing answers; the node fetches when it next sees the
            // relay announce.
            return;
        }
        let relay_epoch = r.epoch;
        let bytes = self.bundle_bytes(version) + 64;
        self.traffic[LAN].add(64);
        self.traffic[LAN].add(bytes);
        let (lan, storm) = (self.links[LAN], self.storm[LAN]);
        let request = lan.one_way(&mut self.net);
        let cfg = &mut self.configs[s];
        let node = &mut cfg.nodes[j];
        node.busy = true;
        let epoch = node.epoch;
        let done = cfg
            .serve
            .send(now + request, bytes, &lan, storm, &mut self.net);
        self.at(
            done,
            Ev::ConfigFetched {
                site: s,
                node: j,
                epoch,
                relay_epoch,
                version,
            },
        );
    }

    fn config_nodes_changed(&mut self, s: usize) {
        if self.books.newest() == 0 {
            return;
        }
        let site = &self.sites[s];
        self.books
            .nodes_changed(s, self.now, &self.configs[s].nodes, |j| site.is_up(j));
    }

    /// Running nodes that have applied the newest change made so far.
    fn nodes_current(&self) -> u64 {
        let newest = self.books.newest();
        if newest == 0 {
            return 0;
        }
        self.sites
            .iter()
            .zip(&self.configs)
            .map(|(site, cfg)| {
                cfg.nodes
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter(|(j, n)| site.is_up(*j) && n.applied >= newest)
                    .count() as u64
            })
            .sum()
    }

    // ---- measurements ------------------------------------------------

    fn check_watches(&mut self) {
        let now = self.now;
        let mut i = 0;
        while i < self.watches.len() {
            if self.settled(&self.watches[i]) {
                let w = self.watches.swap_remove(i);
                self.outcomes[w.fault].converged_after_s = Some(ms(now - w.healed));
            } else {
                i += 1;
            }
        }
        let mut i = 0;
        while i < self.drains.len() {
            let d = &self.drains[i];
            let st = self.sites[d.site].relay.core.stats();
            if st.acked_through >= d.target && self.sites[d.site].relay.up {
                let d = self.drains.swap_remove(i);
                self.drained.push(Drain {
                    relay: self.sites[d.site].relay.id.name.clone(),
                    healed_s: ms(d.healed),
                    backlog: d.backlog,
                    drain_s: Some(ms(now - d.healed)),
                });
            } else {
                i += 1;
            }
        }
    }

    /// Whether the sites of a healed fault are whole again: relays up and
    /// connected with everything up to the heal acknowledged, every hub
    /// holding it, and each relay's view of its nodes true.
    fn settled(&self, w: &Watch) -> bool {
        w.sites.iter().all(|&(s, target)| {
            let site = &self.sites[s];
            let r = &site.relay;
            r.up && matches!(r.session, Session::Connected(_))
                && r.core.stats().acked_through >= target
                && self
                    .hubs
                    .iter()
                    .filter(|h| h.up)
                    .all(|h| h.core.applied(&r.id.name, r.disk.stream) >= target)
                && (1..site.members.len()).all(|j| site.believed_alive(j) == site.is_up(j))
        })
    }

    fn sample(&mut self) {
        let now = self.now;
        let mut row = vec![ms(now)];
        let view = self
            .hubs
            .iter()
            .find(|h| h.up)
            .map(|h| h.core.fleet(self.inst(now), self.wall_ms()));
        let regions = self.sc.topology.regions;
        let mut seen = vec![0u64; regions];
        let mut unreachable = self.sites.len() as u64;
        if let Some(f) = &view {
            unreachable = self.sites.len() as u64 - f.sites.len() as u64;
            for s in &f.sites {
                if s.status == SiteStatus::Unreachable {
                    unreachable += 1;
                } else if let Some(r) = s
                    .region
                    .strip_prefix('r')
                    .and_then(|r| r.parse::<usize>().ok())
                    && (1..=regions).contains(&r)
                {
                    seen[r - 1] += u64::from(s.nodes_alive);
                }
            }
        }
        for (alive, seen) in self.alive.iter().zip(&seen) {
            row.push(*alive as f64);
            row.push(*seen as f64);
        }
        let (mut recs, mut bytes, mut max, mut connected) = (0u64, 0u64, 0u64, 0u64);
        for s in &self.sites {
            let st = s.relay.core.stats();
            if s.relay.up {
                recs += st.persisted_through.saturating_sub(st.acked_through);
            }
            bytes += s.relay.disk.bytes();
            max = max.max(s.relay.disk.bytes());
            connected += u64::from(matches!(s.relay.session, Session::Connected(_)));
        }
        let lan = self.lan_bytes();
        let totals = [lan, self.traffic[WAN].bytes, self.traffic[HUB].bytes];
        row.push(recs as f64);
        row.push(bytes as f64);
        row.push(max as f64);
        row.push((totals[WAN] - self.last_bytes[WAN]) as f64);
        row.push((totals[HUB] - self.last_bytes[HUB]) as f64);
        row.push((totals[LAN] - self.last_bytes[LAN]) as f64);
        row.push(connected as f64);
        row.push(unreachable as f64);
        if !self.books.changes().is_empty() {
            row.push(self.nodes_current() as f64);
        }
        if !self.rollouts.is_empty() {
            let installed: u64 = self.rollouts.iter().map(Rollout::installed).sum();
            row.push(installed as f64);
        }
        if let Some(fs) = self.fs.as_mut() {
            let (full, remediating) = fs.gauges(now);
            row.push(full as f64);
            row.push(remediating as f64);
        }
        self.last_bytes = totals;
        self.series.push(row);
        let every = self.sc.sample_every.as_secs_f64();
        if now + every <= self.end {
            self.at(now + every, Ev::Sample);
        }
    }

    /// Gossip inside the sites, and configuration fetches.
    fn lan_bytes(&self) -> u64 {
        self.sites
            .iter()
            .map(|s| match &s.gossip {
                Gossip::Model(m) => m.traffic().0,
                Gossip::Real { site, .. } => site.traffic().0,
            })
            .sum::<u64>()
            + self.traffic[LAN].bytes
    }

    fn lan_messages(&self) -> u64 {
        self.sites
            .iter()
            .map(|s| match &s.gossip {
                Gossip::Model(m) => m.traffic().1,
                Gossip::Real { site, .. } => site.traffic().1,
            })
            .sum::<u64>()
            + self.traffic[LAN].messages
    }

    fn finish(mut self) -> Outcome {
        // Drains that did not finish.
        for d in std::mem::take(&mut self.drains) {
            self.drained.push(Drain {
                relay: self.sites[d.site].relay.id.name.clone(),
                healed_s: ms(d.healed),
                backlog: d.backlog,
                drain_s: None,
            });
        }
        let records = self.account();
        if records.lost > 0 {
            self.violations.push(format!(
                "{} durable records lost (no hub holds them, no relay buffers them)",
                records.lost
            ));
        }
        let drain_times: Vec<f64> = self.drained.iter().filter_map(|d| d.drain_s).collect();
        let mut drains = self.drained.clone();
        drains.sort_by(|a, b| {
            b.drain_s
                .unwrap_or(f64::INFINITY)
                .total_cmp(&a.drain_s.unwrap_or(f64::INFINITY))
                .then(a.relay.cmp(&b.relay))
        });
        drains.truncate(50);
        let mut peaks: Vec<BufferPeak> = self
            .sites
            .iter()
            .map(|s| BufferPeak {
                relay: s.relay.id.name.clone(),
                bytes: s.relay.peak_bytes,
                records: s.relay.peak_records,
            })
            .collect();
        peaks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.relay.cmp(&b.relay)));
        peaks.truncate(10);
        let foresight = self.foresight_outcome();
        let topo = &self.sc.topology;
        let lan = Traffic {
            bytes: self.lan_bytes() - self.lan_base,
            messages: self.lan_messages() - self.lan_messages_base,
        };
        let report = Report {
            scenario: self.sc.name.clone(),
            scenario_sha256: String::new(),
            seed: self.seed,
            virtual_seconds: ms(self.end),
            regions: topo.regions as u64,
            sites: self.sites.len() as u64,
            nodes: (self.sites.len() * topo.nodes_per_site) as u64,
            hubs: topo.hubs as u64,
            real_gossip_sites: self.sites.iter().filter(|s| s.is_real()).count() as u64,
            events: self.events,
            detection: Detection {
                latency: Latency::of(&self.detect, true),
                false_suspicions: self.false_suspicions,
                undetected: self.undetected,
                dissemination: Latency::of(&self.disseminate, false),
            },
            faults: self.outcomes.clone(),
            traffic: LinkTraffic {
                lan,
                wan: Traffic {
                    bytes: self.traffic[WAN].bytes,
                    messages: self.traffic[WAN].messages,
                },
                hub: Traffic {
                    bytes: self.traffic[HUB].bytes,
                    messages: self.traffic[HUB].messages,
                },
            },
            buffers: Buffers {
                peak_bytes_max: peaks.first().map_or(0, |p| p.bytes),
                top_peaks: peaks,
                drain: Latency::of(&drain_times, false),
                drains,
            },
            records,
            config_changes: self.books.outcomes(
                &self.sc.site_names(),
                &self.hubs.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
            ),
            rollouts: self.rollout_outcomes(),
            foresight,
            violations: self.violations.clone(),
        };
        let schedule = self.foresight_schedule(schedule::replayable(&self.sc, &self.faults));
        Outcome {
            report,
            series: self.series,
            schedule,
        }
    }

    /// The record books at the end: every durable record is at a hub, or
    /// still buffered, or it is lost.
    fn account(&self) -> Records {
        let mut r = Records::default();
        for (i, s) in self.sites.iter().enumerate() {
            let last = s.relay.disk.last_seq();
            let first = s.relay.disk.first_seq().unwrap_or(last + 1);
            r.persisted += last;
            r.dropped_with_gap += s.relay.dropped;
            for seq in 1..=last {
                if self.hubs.iter().any(|h| h.applied[i].get(seq)) {
                    r.delivered += 1;
                } else if seq >= first || in_gap(&s.relay.disk, seq) {
                    r.still_buffered += 1;
                } else {
                    r.lost += 1;
                }
            }
        }
        r.duplicates_applied = self.duplicates_applied;
        r.duplicates_absorbed = self
            .hubs
            .iter()
            .map(|h| h.absorbed_before + h.core.stats().duplicates)
            .sum();
        r
    }
}

/// Whether a gap row of the buffer still stands for `seq`.
fn in_gap(disk: &VirtualBuffer, seq: u64) -> bool {
    disk.read_after(seq.saturating_sub(1), 0)
        .first()
        .is_some_and(|(r, _)| r.seq <= seq && r.until() >= seq)
}

/// A relay's hubs in order of preference: those of its own region first,
/// then the others, each list in hub order from the region's first.
fn preference(region: usize, regions: usize, hubs: usize) -> Vec<usize> {
    let home = |h: usize| h % regions == region;
    let mut order: Vec<usize> = (0..hubs).filter(|h| home(*h)).collect();
    if order.is_empty() {
        // No hub in the region: spread regions over the hubs.
        let first = region % hubs;
        order.extend((0..hubs).map(|k| (first + k) % hubs));
    } else {
        let first = region % hubs;
        order.extend((0..hubs).map(|k| (first + k) % hubs).filter(|h| !home(*h)));
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_prefer_their_regions_hubs_then_the_rest() {
        assert_eq!(preference(0, 2, 4), vec![0, 2, 1, 3]);
        assert_eq!(
            preference(1, 2, 4),
            vec![1, 3, 2, 0],
            "the rest from the region's own turn"
        );
        assert_eq!(preference(3, 4, 2), vec![1, 0], "no hub in region 4");
        assert_eq!(preference(0, 1, 1), vec![0]);
    }

    #[test]
    fn the_books_notice_a_second_apply() {
        let mut a = Applied::default();
        assert!(!a.set(1, 3));
        assert!(a.set(3, 4));
        assert!(a.covers_through(4));
        assert!(!a.covers_through(5));
    }
}
