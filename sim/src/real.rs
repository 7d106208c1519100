//! Real chitchat for a site: every member a real chitchat instance, talking
//! through chitchat's in-memory transport, on a tokio runtime whose clock is
//! paused and moved forward by the simulation. The relay's view comes from
//! its chitchat exactly as in production ([`site_view_of`]).
//!
//! This is the reference the gossip model ([`crate::model`]) is calibrated
//! against (`tests/calibration.rs`), and a slower, truer fidelity for runs
//! of a few sites.
//!
//! Nothing here reads the wall clock: chitchat's timers, its failure
//! detector and the times recorded here all use tokio's paused clock, so a
//! run gives the same figures on a loaded machine as on an idle one.
//! chitchat draws its peers from an RNG it seeds itself and iterates hash
//! sets, so sites run this way are not bit-for-bit reproducible; runs with
//! only the gossip model are.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitchat::transport::ChannelTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, spawn_chitchat};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use trellis_node::gossip::{
    GossipSettings, MARKED_FOR_DELETION_GRACE, failure_detector, site_view_of,
};
use trellis_node::site::SiteView;

use crate::rng::SimRng;

/// chitchat's largest message (one UDP datagram), which the in-memory
/// transport enforces as the real one would.
const MTU: usize = 65_507;

/// The relay's verdict on one incarnation of a member changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LivenessChange {
    /// Virtual time (s).
    pub at: f64,
    pub member: usize,
    pub generation: u64,
    pub alive: bool,
}

/// What the site's observers record, written from inside chitchat's tasks.
#[derive(Default)]
struct Log {
    changes: Vec<LivenessChange>,
    /// For each watched `(owner, key, value)`: the members that received it
    /// and when (s).
    arrivals: HashMap<(usize, String, String), Vec<(usize, f64)>>,
}

/// A member's initial key-values.
type KeyValues = Vec<(String, String)>;

/// A site of real chitchat instances; member 0 is the relay.
pub struct RealSite {
    rt: tokio::runtime::Runtime,
    transport: ChannelTransport,
    handles: Vec<Option<ChitchatHandle>>,
    names: Vec<String>,
    index: Arc<HashMap<String, usize>>,
    addrs: Vec<SocketAddr>,
    generation: Vec<u64>,
    zero: Instant,
    settings: GossipSettings,
    start_ms: u64,
    region: String,
    site: String,
    watched: Vec<String>,
    log: Arc<Mutex<Log>>,
    /// The task recording the relay's liveness verdicts.
    watcher: Option<JoinHandle<()>>,
    /// Virtual time reached (s).
    now: f64,
}

impl RealSite {
    /// Starts one member per `(name, initial key-values)` (the first is the
    /// relay; the others have it as their seed), as trellis-node configures
    /// chitchat with `settings` (its seeds and advertised address are not
    /// used). Virtual time 0 is `start_ms` on the generation clock. Each
    /// member starts at a random moment of the first interval, drawn from
    /// `rng`, so that members tick at their own phase as in a real site
    /// rather than all at once.
    pub fn new(
        region: &str,
        site: &str,
        members: Vec<(String, Vec<(String, String)>)>,
        settings: &GossipSettings,
        start_ms: u64,
        mut rng: SimRng,
    ) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()?;
        let zero = rt.block_on(async { Instant::now() });
        let n = members.len();
        let addrs: Vec<SocketAddr> = (0..n)
            .map(|i| SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7900)))
            .collect();
        let names: Vec<String> = members.iter().map(|(name, _)| name.clone()).collect();
        let index = Arc::new(
            names
                .iter()
                .enumerate()
                .map(|(i, name)| (name.clone(), i))
                .collect::<HashMap<_, _>>(),
        );
        anyhow::ensure!(index.len() == n, "member names must be distinct");
        let mut s = RealSite {
            rt,
            transport: ChannelTransport::with_mtu(MTU),
            handles: (0..n).map(|_| None).collect(),
            names,
            index,
            addrs,
            generation: vec![start_ms; n],
            zero,
            settings: settings.clone(),
            start_ms,
            region: region.to_owned(),
            site: site.to_owned(),
            watched: Vec::new(),
            log: Arc::default(),
            watcher: None,
            now: 0.0,
        };
        let interval = settings.interval.as_secs_f64();
        let mut starts: Vec<(f64, usize, KeyValues)> = members
            .into_iter()
            .enumerate()
            .map(|(i, (_, kv))| (rng.f64() * interval, i, kv))
            .collect();
        starts.sort_by(|a, b| a.0.total_cmp(&b.0));
        for (at, i, kv) in starts {
            s.advance_to(at);
            // The generation is the start time, as trellis-node's is.
            s.generation[i] = start_ms + (at * 1000.0) as u64;
            s.spawn(i, kv)?;
        }
        Ok(s)
    }

    /// Records, from now on, when each member receives each value of `key`
    /// (see [`RealSite::arrivals`]). Applies to members started afterwards,
    /// so call it before the members it should observe start.
    pub fn watch_key(&mut self, key: &str) {
        self.watched.push(key.to_owned());
        for i in 0..self.len() {
            if let Some(h) = &self.handles[i] {
                let chitchat = h.chitchat();
                let (log, index, zero, key) = (
                    self.log.clone(),
                    self.index.clone(),
                    self.zero,
                    key.to_owned(),
                );
                self.rt.block_on(async move {
                    subscribe(&*chitchat.lock().await, i, &key, log, index, zero);
                });
            }
        }
    }

    fn spawn(&mut self, i: usize, kv: Vec<(String, String)>) -> anyhow::Result<()> {
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new(self.names[i].clone(), self.generation[i], self.addrs[i]),
            cluster_id: format!("trellis/{}/{}", self.region, self.site),
            gossip_interval: self.settings.interval,
            listen_addr: self.addrs[i],
            seed_nodes: if i == 0 {
                Vec::new()
            } else {
                vec![self.addrs[0].to_string()]
            },
            failure_detector_config: failure_detector(&self.settings),
            marked_for_deletion_grace_period: MARKED_FOR_DELETION_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let transport = self.transport.clone();
        let (log, index, zero, watched) = (
            self.log.clone(),
            self.index.clone(),
            self.zero,
            self.watched.clone(),
        );
        let (handle, watcher) = self.rt.block_on(async move {
            let handle = spawn_chitchat(config, Vec::new(), &transport).await?;
            let chitchat = handle.chitchat();
            let mut c = chitchat.lock().await;
            // Subscribe before the initial values are set so that the
            // member's own arrival is recorded too.
            for key in &watched {
                subscribe(&c, i, key, log.clone(), index.clone(), zero);
            }
            let state = c.self_node_state();
            for (k, v) in kv {
                state.set(k, v);
            }
            let watcher = (i == 0).then(|| {
                let rx = c.live_nodes_watcher();
                let me = c.self_chitchat_id().clone();
                tokio::spawn(watch_liveness(rx, me, index, log, zero))
            });
            drop(c);
            anyhow::Ok((handle, watcher))
        })?;
        self.handles[i] = Some(handle);
        if let Some(w) = watcher {
            self.watcher = Some(w);
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Virtual time reached (s).
    pub fn now(&self) -> f64 {
        self.now
    }

    /// Member `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Member `i`'s current generation (its start time, ms).
    pub fn generation(&self, i: usize) -> u64 {
        self.generation[i]
    }

    /// Whether member `i`'s process runs.
    pub fn is_up(&self, i: usize) -> bool {
        self.handles[i].is_some()
    }

    /// Runs the site up to virtual time `t` (s): timers fire in order and
    /// every member's loop runs in between, as on a real clock.
    pub fn advance_to(&mut self, t: f64) {
        if t <= self.now {
            return;
        }
        let target = self.zero + Duration::from_secs_f64(t);
        self.rt.block_on(async move {
            tokio::time::sleep_until(target).await;
        });
        self.now = t;
    }

    pub fn with<T>(&self, i: usize, f: impl FnOnce(&mut chitchat::Chitchat) -> T) -> Option<T> {
        let h = self.handles[i].as_ref()?;
        let chitchat = h.chitchat();
        Some(self.rt.block_on(async move {
            let mut c = chitchat.lock().await;
            f(&mut c)
        }))
    }

    /// The site as the relay sees it (empty while the relay is down).
    pub fn view(&self) -> SiteView {
        let (region, site) = (self.region.clone(), self.site.clone());
        self.with(0, move |c| site_view_of(c, &region, &site))
            .unwrap_or_else(|| SiteView {
                region: self.region.clone(),
                site: self.site.clone(),
                members: Vec::new(),
            })
    }

    /// Whether the relay believes member `j` (its latest generation) alive.
    pub fn believed_alive(&self, j: usize) -> bool {
        let id = self.id(j);
        self.with(0, move |c| c.live_nodes().any(|l| *l == id))
            .unwrap_or(false)
    }

    pub fn id(&self, j: usize) -> ChitchatId {
        ChitchatId::new(self.names[j].clone(), self.generation[j], self.addrs[j])
    }

    /// Member `j` sets gossip keys (a no-op while it is down).
    pub fn set(&self, j: usize, kv: Vec<(String, String)>) {
        self.with(j, move |c| {
            let s = c.self_node_state();
            for (k, v) in kv {
                s.set(k, v);
            }
        });
    }

    /// Whether every running member holds `key = value` for member `j`
    /// (its latest generation).
    pub fn all_have(&self, j: usize, key: &str, value: &str) -> bool {
        let id = self.id(j);
        (0..self.len()).filter(|i| self.is_up(*i)).all(|i| {
            let (id, key, value) = (id.clone(), key.to_owned(), value.to_owned());
            self.with(i, move |c| {
                c.node_state(&id)
                    .is_some_and(|s| s.get(&key) == Some(value.as_str()))
            })
            .unwrap_or(true)
        })
    }

    /// The members that received member `owner`'s `key = value`, each with
    /// the virtual time (s) it did, for a key given to
    /// [`RealSite::watch_key`]. The owner itself is among them, at the time
    /// it set the value.
    pub fn arrivals(&self, owner: usize, key: &str, value: &str) -> Vec<(usize, f64)> {
        let log = self.log.lock().expect("not poisoned");
        log.arrivals
            .get(&(owner, key.to_owned(), value.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    /// The relay's liveness verdicts since the last call, in time order:
    /// each time an incarnation of a member joined or left the relay's live
    /// set.
    pub fn take_liveness_changes(&mut self) -> Vec<LivenessChange> {
        std::mem::take(&mut self.log.lock().expect("not poisoned").changes)
    }

    /// Member `j`'s process stops: its chitchat loop ends and its address
    /// stops receiving.
    pub fn crash(&mut self, j: usize) {
        let Some(h) = self.handles[j].take() else {
            return;
        };
        h.abort();
        if j == 0
            && let Some(w) = self.watcher.take()
        {
            w.abort();
        }
        // Wait until the aborted task is dropped, and with it its socket, so
        // that a restart can take the address again.
        let ended = h.termination_watcher();
        let _ = self.rt.block_on(ended);
    }

    /// Member `j` starts again now, publishing `kv`: a new generation (its
    /// start time on the generation clock, [`RealSite::now_ms`]) that knows
    /// only its seed, as a restarted process does.
    pub fn restart(&mut self, j: usize, kv: Vec<(String, String)>) -> anyhow::Result<()> {
        self.crash(j);
        // chitchat requires generations to grow across restarts.
        self.generation[j] = self.now_ms().max(self.generation[j] + 1);
        self.spawn(j, kv)
    }

    /// The generation clock now (ms): `start_ms` plus the virtual time.
    pub fn now_ms(&self) -> u64 {
        self.start_ms + (self.now * 1000.0).round() as u64
    }

    /// Bytes and messages chitchat sent in this site so far (messages to a
    /// member that is down count: they were sent).
    pub fn traffic(&self) -> (u64, u64) {
        let s = self.transport.statistics();
        (s.num_bytes_total, s.num_messages_total)
    }

    /// Names to index.
    pub fn index(&self) -> &HashMap<String, usize> {
        &self.index
    }
}

impl Drop for RealSite {
    fn drop(&mut self) {
        for h in self.handles.iter_mut().filter_map(Option::take) {
            h.abort();
        }
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

/// Records when member `observer` receives each value of `key`.
fn subscribe(
    c: &chitchat::Chitchat,
    observer: usize,
    key: &str,
    log: Arc<Mutex<Log>>,
    index: Arc<HashMap<String, usize>>,
    zero: Instant,
) {
    let key = key.to_owned();
    let k = key.clone();
    c.subscribe_event(key, move |event| {
        // Prefix subscription: only the key itself, not longer ones.
        if !event.key.is_empty() {
            return;
        }
        let Some(&owner) = index.get(&*event.node.node_id) else {
            return;
        };
        let at = (Instant::now() - zero).as_secs_f64();
        log.lock()
            .expect("not poisoned")
            .arrivals
            .entry((owner, k.clone(), event.value.to_owned()))
            .or_default()
            .push((observer, at));
    })
    // The listener lives as long as this chitchat instance.
    .forever();
}

/// Turns the relay's live-set updates into [`LivenessChange`]s, stamped
/// with the virtual time they were published (the same instant: the paused
/// clock does not move while a task is ready).
async fn watch_liveness(
    mut rx: tokio::sync::watch::Receiver<
        std::collections::BTreeMap<ChitchatId, chitchat::NodeState>,
    >,
    me: ChitchatId,
    index: Arc<HashMap<String, usize>>,
    log: Arc<Mutex<Log>>,
    zero: Instant,
) {
    let mut live: BTreeSet<(usize, u64)> = BTreeSet::new();
    loop {
        let now: BTreeSet<(usize, u64)> = rx
            .borrow_and_update()
            .keys()
            .filter(|id| **id != me)
            .filter_map(|id| Some((*index.get(&*id.node_id)?, id.generation_id)))
            .collect();
        let at = (Instant::now() - zero).as_secs_f64();
        {
            let mut log = log.lock().expect("not poisoned");
            for &(member, generation) in live.difference(&now) {
                log.changes.push(LivenessChange {
                    at,
                    member,
                    generation,
                    alive: false,
                });
            }
            for &(member, generation) in now.difference(&live) {
                log.changes.push(LivenessChange {
                    at,
                    member,
                    generation,
                    alive: true,
                });
            }
        }
        live = now;
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_node::config::GossipConfig;

    use super::*;

    fn site(n: usize) -> RealSite {
        let members = (0..n)
            .map(|i| {
                (
                    format!("m{i:02}"),
                    vec![("status".into(), "passing".into())],
                )
            })
            .collect();
        RealSite::new(
            "r",
            "s",
            members,
            &GossipConfig::default().settings(),
            1_000_000,
            SimRng::new(3),
        )
        .unwrap()
    }

    #[test]
    fn every_member_is_seen_alive_by_the_relay_after_a_few_seconds() {
        let mut s = site(10);
        s.advance_to(10.0);
        assert!((1..10).all(|j| s.believed_alive(j)));
        let view = s.view();
        assert_eq!(view.members.len(), 10);
        assert!(view.members.iter().all(|m| m.alive));
        let changes = s.take_liveness_changes();
        assert_eq!(changes.len(), 9, "{changes:?}");
        assert!(changes.iter().all(|c| c.alive && c.at > 0.0 && c.at < 10.0));
    }

    #[test]
    fn a_crash_is_detected_by_the_relay_and_a_restart_comes_back_as_a_new_generation() {
        let mut s = site(10);
        s.advance_to(30.0);
        s.take_liveness_changes();
        s.crash(4);
        assert!(!s.is_up(4));
        s.advance_to(60.0);
        let changes = s.take_liveness_changes();
        assert_eq!(changes.len(), 1, "{changes:?}");
        let dead = changes[0];
        assert_eq!((dead.member, dead.alive), (4, false));
        assert!(dead.at > 31.0 && dead.at < 40.0, "{dead:?}");
        assert!(!s.believed_alive(4));

        let old = s.generation(4);
        s.restart(4, vec![("status".into(), "passing".into())])
            .unwrap();
        assert!(s.generation(4) > old);
        s.advance_to(70.0);
        assert!(s.believed_alive(4));
        let back = s.take_liveness_changes();
        assert!(
            back.iter()
                .any(|c| c.member == 4 && c.alive && c.generation == s.generation(4)),
            "{back:?}"
        );
    }

    #[test]
    fn a_value_set_by_one_member_reaches_every_member_and_its_arrivals_are_recorded() {
        let mut s = site(10);
        s.watch_key("check:x");
        s.advance_to(20.0);
        s.set(3, vec![("check:x".into(), "1".into())]);
        assert!(!s.all_have(3, "check:x", "1"));
        s.advance_to(30.0);
        assert!(s.all_have(3, "check:x", "1"));
        let arrivals = s.arrivals(3, "check:x", "1");
        assert_eq!(arrivals.len(), 10, "{arrivals:?}");
        assert!(arrivals.contains(&(3, 20.0)), "{arrivals:?}");
        assert!(arrivals.iter().all(|(_, t)| (20.0..30.0).contains(t)));
    }

    #[test]
    fn traffic_is_counted_and_grows_with_time() {
        let mut s = site(5);
        s.advance_to(5.0);
        let (b1, m1) = s.traffic();
        s.advance_to(10.0);
        let (b2, m2) = s.traffic();
        assert!(m1 > 0 && b1 > 0);
        assert!(m2 > m1 && b2 > b1);
    }
}
