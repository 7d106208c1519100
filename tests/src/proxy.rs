//! A user-space UDP proxy that injects faults between a client and one
//! upstream, so whole-mesh tests can put loss, delay, reordering or a full
//! partition on a single QUIC link without root, `tc` or network namespaces.
//!
//! [`UdpProxy`] listens on 127.0.0.1 and forwards each client's datagrams to
//! the upstream and the upstream's replies back to that client. Every client
//! address gets its own upstream-facing socket, so the upstream sees as many
//! sources as there are clients: a relay that restarts on a new port is a new
//! QUIC peer to the hub, just as without the proxy.
//!
//! The proxy runs on its own thread with a current-thread tokio runtime, so
//! it fits plain `#[test]` functions that drive processes with std threads,
//! and async tests alike. Dropping the handle stops it.
//!
//! # Faults
//! Faults can be changed at any time, from any thread, through `&self`. Each
//! datagram is judged once, when it arrives: a datagram already delayed or
//! held for reordering is still sent if a blackhole starts afterwards, and a
//! datagram dropped stays dropped if the fault is lifted. This keeps each
//! datagram's fate a function of the settings at one instant, which is what
//! a test reasons about.
//!
//! Order of judgement: blackhole, then loss, then delay (± jitter), then
//! reordering. Jitter can itself reorder datagrams, as on a real network.
//!
//! Randomness comes from a seeded RNG per direction ([`UdpProxy::with_seed`]),
//! so with the same datagrams arriving in the same order the same ones are
//! lost or held back.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A client that has sent nothing and received nothing for this long loses
/// its upstream-facing socket; its next datagram gets a fresh one. Longer
/// than QUIC's idle timeout in the mesh, so a live connection never moves.
pub const FLOW_IDLE: Duration = Duration::from_secs(90);

/// A datagram held back for reordering goes out after the next one of its
/// flow, or after this long if no other comes, so reordering never turns
/// into loss.
pub const REORDER_HOLD: Duration = Duration::from_millis(100);

/// Seed used by [`UdpProxy::start`], so runs are reproducible by default.
pub const DEFAULT_SEED: u64 = 0x7E11_1500_5EED;

/// Longest delay applied, so an absurd setting cannot overflow a timer.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// How long dropping a proxy waits for its thread before leaving it behind.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Large enough for any UDP datagram, so none is truncated.
const MAX_DATAGRAM: usize = 65_536;

/// Which way a datagram travels through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// What the proxy has done so far; every counter only grows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Datagrams sent to the upstream.
    pub forwarded_up: u64,
    /// Datagrams sent back to clients.
    pub forwarded_down: u64,
    /// Datagrams dropped because a blackhole was on when they arrived.
    pub dropped_blackhole: u64,
    /// Datagrams dropped by random loss.
    pub dropped_loss: u64,
    /// Datagrams held for a non-zero delay before forwarding.
    pub delayed: u64,
    /// Datagrams actually sent after one that arrived later than them.
    pub reordered: u64,
    /// Sends that failed, and refusals the kernel reported for earlier
    /// sends (an upstream that is down). Never fatal.
    pub send_errors: u64,
}

/// The fault settings; see the module docs for how they combine.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    blackhole: [bool; 2],
    loss: f64,
    delay: Duration,
    jitter: Duration,
    reorder: f64,
}

/// Settings and RNGs live together so one short lock judges a datagram.
struct State {
    faults: Faults,
    rng: [StdRng; 2],
}

#[derive(Default)]
struct Counters {
    forwarded_up: AtomicU64,
    forwarded_down: AtomicU64,
    dropped_blackhole: AtomicU64,
    dropped_loss: AtomicU64,
    delayed: AtomicU64,
    reordered: AtomicU64,
    send_errors: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ProxyStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ProxyStats {
            forwarded_up: get(&self.forwarded_up),
            forwarded_down: get(&self.forwarded_down),
            dropped_blackhole: get(&self.dropped_blackhole),
            dropped_loss: get(&self.dropped_loss),
            delayed: get(&self.delayed),
            reordered: get(&self.reordered),
            send_errors: get(&self.send_errors),
        }
    }
}

struct Shared {
    // A std mutex: it is only ever held to read or change settings and draw
    // random numbers, never across an await.
    state: Mutex<State>,
    counters: Counters,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the settings half
        // written (each setter writes one field), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Decides a datagram's fate at arrival: `None` if it is dropped, else
    /// when to send it and whether to hold it back for reordering.
    fn judge(&self, dir: Direction) -> Option<(Instant, bool)> {
        let now = Instant::now();
        let mut state = self.state();
        let faults = state.faults;
        let rng = &mut state.rng[dir.index()];
        if faults.blackhole[dir.index()] {
            Counters::bump(&self.counters.dropped_blackhole);
            return None;
        }
        if faults.loss > 0.0 && rng.random_bool(faults.loss) {
            Counters::bump(&self.counters.dropped_loss);
            return None;
        }
        let mut wait = faults.delay;
        if !faults.jitter.is_zero() {
            let j = u64::try_from(faults.jitter.min(MAX_DELAY).as_nanos()).unwrap_or(u64::MAX);
            let offset = rng.random_range(0..=2 * j);
            wait = if offset >= j {
                wait.saturating_add(Duration::from_nanos(offset - j))
            } else {
                wait.saturating_sub(Duration::from_nanos(j - offset))
            };
        }
        if !wait.is_zero() {
            Counters::bump(&self.counters.delayed);
        }
        let hold = faults.reorder > 0.0 && rng.random_bool(faults.reorder);
        Some((now + wait.min(MAX_DELAY), hold))
    }
}

/// A UDP proxy with fault injection between clients on loopback and one
/// upstream. Stops when dropped.
pub struct UdpProxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
    stopped: std::sync::mpsc::Receiver<()>,
}

impl UdpProxy {
    /// Starts a proxy to `upstream` on 127.0.0.1 (or ::1 for an IPv6
    /// upstream), seeded with [`DEFAULT_SEED`]. Needs no runtime: the proxy
    /// runs on its own thread.
    pub fn start(upstream: SocketAddr) -> io::Result<UdpProxy> {
        Self::with_seed(upstream, DEFAULT_SEED)
    }

    /// Like [`UdpProxy::start`], with the random faults seeded by `seed`.
    pub fn with_seed(upstream: SocketAddr, seed: u64) -> io::Result<UdpProxy> {
        // Bind here rather than on the proxy thread so the caller gets bind
        // errors and knows the address before any datagram is sent.
        let listen = std::net::UdpSocket::bind(SocketAddr::new(loopback_for(upstream), 0))?;
        listen.set_nonblocking(true)?;
        let listen_addr = listen.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let listen = {
            // Registering with the reactor needs the runtime's context.
            let _context = runtime.enter();
            Arc::new(UdpSocket::from_std(listen)?)
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                faults: Faults::default(),
                // Distinct streams per direction, so traffic one way does not
                // change which datagrams are lost the other way.
                rng: [StdRng::seed_from_u64(seed), StdRng::seed_from_u64(!seed)],
            }),
            counters: Counters::default(),
        });
        let stop = CancellationToken::new();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("udp-proxy-{}", listen_addr.port()))
                .spawn(move || {
                    runtime.block_on(async {
                        tokio::select! {
                            () = stop.cancelled() => {}
                            () = serve(listen, upstream, shared) => {}
                        }
                    });
                    // Dropping the runtime drops every task and socket it
                    // owns; only then is the proxy really gone.
                    drop(runtime);
                    let _ = stopped_tx.send(());
                })?
        };
        Ok(UdpProxy {
            listen: listen_addr,
            upstream,
            seed,
            shared,
            stop,
            thread: Some(thread),
            stopped,
        })
    }

    /// The address clients send to.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where datagrams are forwarded.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The seed of the random faults, to reproduce a run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Drops every datagram, both ways, while `on`.
    pub fn blackhole(&self, on: bool) {
        self.shared.state().faults.blackhole = [on, on];
    }

    /// Drops every datagram travelling `dir` while `on`: a one-way
    /// partition. The other direction keeps its setting.
    pub fn blackhole_direction(&self, dir: Direction, on: bool) {
        self.shared.state().faults.blackhole[dir.index()] = on;
    }

    /// Drops each datagram, independently in each direction, with
    /// `probability` (0.0 ..= 1.0).
    ///
    /// # Panics
    /// If `probability` is outside 0.0 ..= 1.0 (a percentage such as 30.0
    /// is a mistake worth failing on).
    pub fn set_loss(&self, probability: f64) {
        check_probability("loss", probability);
        self.shared.state().faults.loss = probability;
    }

    /// Holds each datagram for `delay` (± the jitter, at most [`MAX_DELAY`])
    /// before forwarding.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.state().faults.delay = delay;
    }

    /// Varies the delay of each datagram uniformly within ± `jitter`
    /// (never below zero).
    pub fn set_jitter(&self, jitter: Duration) {
        self.shared.state().faults.jitter = jitter;
    }

    /// Holds back each datagram with `probability` (0.0 ..= 1.0) and sends
    /// it after the next one of the same client and direction, or after
    /// [`REORDER_HOLD`] if none comes.
    ///
    /// # Panics
    /// If `probability` is outside 0.0 ..= 1.0.
    pub fn set_reorder(&self, probability: f64) {
        check_probability("reorder", probability);
        self.shared.state().faults.reorder = probability;
    }

    /// Removes every fault. Datagrams already delayed or held still go out.
    pub fn clear(&self) {
        self.shared.state().faults = Faults::default();
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        self.shared.counters.snapshot()
    }
}

impl fmt::Debug for UdpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpProxy")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("seed", &self.seed)
            .field("faults", &self.shared.state().faults)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        // Bounded: a proxy thread that does not stop in time is left
        // behind rather than hanging the test that dropped it.
        match self.stopped.recv_timeout(STOP_WAIT) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join();
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}

fn check_probability(what: &str, p: f64) {
    assert!(
        (0.0..=1.0).contains(&p),
        "{what} probability must be within 0.0..=1.0, got {p}"
    );
}

fn loopback_for(addr: SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    }
}

/// Errors after which a socket is still usable: mostly the kernel telling
/// us, on a later call, that an earlier datagram found no listener.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Where a datagram goes once released.
enum Out {
    /// Through a client's upstream-facing socket, connected to the upstream.
    Up(Arc<UdpSocket>),
    /// Through the listening socket, to the client.
    Down,
}

/// One datagram on its way through the timer queue.
struct Job {
    client: SocketAddr,
    dir: Direction,
    out: Out,
    at: Instant,
    hold: bool,
    data: Vec<u8>,
}

/// A client's upstream-facing socket and the task reading its replies.
struct Flow {
    socket: Arc<UdpSocket>,
    last_seen: Arc<Mutex<Instant>>,
    replies: tokio::task::JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Receives from clients, creates and expires flows, and feeds the timer
/// queue. Returns only if the listening socket fails for good.
async fn serve(listen: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let (jobs, queue) = mpsc::unbounded_channel();
    let scheduler = tokio::spawn(schedule(queue, listen.clone(), shared.clone()));
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut sweep = tokio::time::interval(FLOW_IDLE / 4);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = listen.recv_from(&mut buf) => {
                let (n, client) = match r {
                    Ok(r) => r,
                    Err(e) if transient(&e) => continue,
                    Err(_) => break,
                };
                let flow = match flows.get(&client) {
                    Some(flow) => flow,
                    None => match open_flow(client, upstream, &shared, &jobs).await {
                        Ok(flow) => flows.entry(client).or_insert(flow),
                        Err(_) => {
                            Counters::bump(&shared.counters.send_errors);
                            continue;
                        }
                    },
                };
                *flow.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                if let Some((at, hold)) = shared.judge(Direction::Up) {
                    let job = Job {
                        client,
                        dir: Direction::Up,
                        out: Out::Up(flow.socket.clone()),
                        at,
                        hold,
                        data: buf[..n].to_vec(),
                    };
                    if jobs.send(job).is_err() {
                        break;
                    }
                }
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                flows.retain(|_, flow| {
                    let last = *flow.last_seen.lock().unwrap_or_else(|p| p.into_inner());
                    now.duration_since(last) < FLOW_IDLE
                });
            }
        }
    }
    scheduler.abort();
}

/// Binds a client's upstream-facing socket and starts relaying replies.
async fn open_flow(
    client: SocketAddr,
    upstream: SocketAddr,
    shared: &Arc<Shared>,
    jobs: &mpsc::UnboundedSender<Job>,
) -> io::Result<Flow> {
    let socket = UdpSocket::bind(SocketAddr::new(loopback_for(upstream), 0)).await?;
    // Connected, so only the upstream's datagrams are accepted and the
    // kernel reports an upstream that is down on this socket.
    socket.connect(upstream).await?;
    let socket = Arc::new(socket);
    let last_seen = Arc::new(Mutex::new(Instant::now()));
    let replies = tokio::spawn(relay_replies(
        client,
        socket.clone(),
        last_seen.clone(),
        shared.clone(),
        jobs.clone(),
    ));
    Ok(Flow {
        socket,
        last_seen,
        replies,
    })
}

/// Reads the upstream's replies to one client. Ends when the flow expires,
/// the proxy stops, or the socket fails for good.
async fn relay_replies(
    client: SocketAddr,
    socket: Arc<UdpSocket>,
    last_seen: Arc<Mutex<Instant>>,
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if transient(&e) => {
                // The refusal is the outcome of an earlier send upstream.
                if e.kind() == io::ErrorKind::ConnectionRefused {
                    Counters::bump(&shared.counters.send_errors);
                }
                continue;
            }
            Err(_) => return,
        };
        *last_seen.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if let Some((at, hold)) = shared.judge(Direction::Down) {
            let job = Job {
                client,
                dir: Direction::Down,
                out: Out::Down,
                at,
                hold,
                data: buf[..n].to_vec(),
            };
            if jobs.send(job).is_err() {
                return;
            }
        }
    }
}

/// The timer queue: sends each datagram at its time, in arrival order among
/// equal times, and performs reordering. Ends when every sender is gone.
async fn schedule(
    mut queue: mpsc::UnboundedReceiver<Job>,
    listen: Arc<UdpSocket>,
    shared: Arc<Shared>,
) {
    // Keyed by (send time, arrival sequence): the first entry is next due.
    let mut due: BTreeMap<(Instant, u64), Job> = BTreeMap::new();
    // At most one held datagram per flow, with the time it goes out anyway.
    let mut held: HashMap<(Direction, SocketAddr), (Job, Instant)> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let next = due
            .keys()
            .next()
            .map(|&(at, _)| at)
            .into_iter()
            .chain(held.values().map(|&(_, flush)| flush))
            .min();
        tokio::select! {
            job = queue.recv() => {
                let Some(job) = job else { return };
                let flow = (job.dir, job.client);
                if let Some((earlier, _)) = held.remove(&flow) {
                    // The held datagram goes right after this one.
                    let at = earlier.at.max(job.at);
                    due.insert((job.at, seq), job);
                    due.insert((at, seq + 1), earlier);
                    seq += 2;
                    Counters::bump(&shared.counters.reordered);
                } else if job.hold {
                    let flush = job.at + REORDER_HOLD;
                    held.insert(flow, (job, flush));
                } else {
                    due.insert((job.at, seq), job);
                    seq += 1;
                }
            }
            () = sleep_until(next), if next.is_some() => {
                let now = Instant::now();
                let expired: Vec<_> = held
                    .iter()
                    .filter(|(_, (_, flush))| *flush <= now)
                    .map(|(flow, _)| *flow)
                    .collect();
                for flow in expired {
                    if let Some((job, _)) = held.remove(&flow) {
                        due.insert((job.at, seq), job);
                        seq += 1;
                    }
                }
                while let Some(entry) = due.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    send(entry.remove(), &listen, &shared).await;
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

async fn send(job: Job, listen: &UdpSocket, shared: &Shared) {
    let (sent, counter) = match &job.out {
        Out::Up(socket) => (socket.send(&job.data).await, &shared.counters.forwarded_up),
        Out::Down => (
            listen.send_to(&job.data, job.client).await,
            &shared.counters.forwarded_down,
        ),
    };
    match sent {
        Ok(_) => Counters::bump(counter),
        Err(_) => Counters::bump(&shared.counters.send_errors),
    }
}
