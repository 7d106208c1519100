//! A site's gossip bytes on the wire against chitchat's own encoding, in
//! one run: every member a real chitchat instance, every message it sends
//! coded and compressed as trellis-node sends it (`gossip::encode_frame`,
//! one coded stream each way between two members), decoded at the other
//! end (`gossip::decode_frame`) and handed to the receiver, all on a paused
//! tokio clock, so the figures do not depend on the machine's load (the
//! whole-process benchmark, `tests/bench/gossip.py`, moves by a quarter
//! between runs at 100 members). chitchat's own encoding is what its UDP
//! transport would send: one datagram of `serialize_to_vec` a message.
//!
//! It prints the bytes a member sends a second over a window of an idle
//! site, by message type, and how long every other member took to see a
//! member gone as failed. `TRELLIS_CODING_MEMBERS` sets the site's size
//! (default 50):
//!
//! ```text
//! TRELLIS_CODING_MEMBERS=100 cargo test --release -p trellis-node --test gossip_coding -- --nocapture
//! ```

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Serializable, spawn_chitchat,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use trellis_node::authz::PROTOCOL_VERSION;
use trellis_node::config::GossipConfig;
use trellis_node::gossip::{
    MARKED_FOR_DELETION_GRACE, decode_frame, encode_frame, failure_detector, worth_sending,
};
use trellis_node::gossip_codec::{StreamDecoder, StreamEncoder};

const WARMUP: Duration = Duration::from_secs(60);
const WINDOW: Duration = Duration::from_secs(60);
const KILLS: usize = 3;

/// The site's network: one coded stream each way between two members.
struct Net {
    inboxes: Mutex<HashMap<SocketAddr, mpsc::UnboundedSender<(SocketAddr, ChitchatMessage)>>>,
    streams: Mutex<HashMap<(SocketAddr, SocketAddr), (StreamEncoder, StreamDecoder)>>,
    down: Mutex<HashSet<SocketAddr>>,
    /// Per message type (Syn, SynAck, Ack, other): messages, chitchat's
    /// bytes, Trellis's frame bytes; while counting.
    counts: Mutex<[[u64; 3]; 4]>,
    counting: AtomicBool,
}

struct NetTransport(Arc<Net>);

struct NetSocket {
    net: Arc<Net>,
    addr: SocketAddr,
    inbox: mpsc::UnboundedReceiver<(SocketAddr, ChitchatMessage)>,
}

#[async_trait]
impl Transport for NetTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.0.inboxes.lock().unwrap().insert(listen_addr, tx);
        Ok(Box::new(NetSocket {
            net: self.0.clone(),
            addr: listen_addr,
            inbox: rx,
        }))
    }
}

#[async_trait]
impl Socket for NetSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let net = &self.net;
        {
            let down = net.down.lock().unwrap();
            if down.contains(&self.addr) || down.contains(&to) {
                return Ok(());
            }
        }
        if !worth_sending(&msg) {
            return Ok(());
        }
        let plain = msg.serialize_to_vec();
        let delivered = {
            let mut streams = net.streams.lock().unwrap();
            let (enc, dec) = streams.entry((self.addr, to)).or_insert_with(|| {
                (
                    StreamEncoder::speaking(PROTOCOL_VERSION),
                    StreamDecoder::default(),
                )
            });
            let frame = encode_frame(enc, &plain)?;
            if net.counting.load(Ordering::Relaxed) {
                let kind = match &msg {
                    ChitchatMessage::Syn { .. } => 0,
                    ChitchatMessage::SynAck { .. } => 1,
                    ChitchatMessage::Ack { .. } => 2,
                    _ => 3,
                };
                let c = &mut net.counts.lock().unwrap()[kind];
                c[0] += 1;
                c[1] += plain.len() as u64;
                c[2] += frame.len() as u64;
            }
            decode_frame(dec, &frame[4..])?
        };
        if let Some(inbox) = net.inboxes.lock().unwrap().get(&to) {
            let _ = inbox.send((self.addr, delivered));
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        self.inbox
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("network gone"))
    }
}

/// A small deterministic generator for start phases.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

struct Figures {
    /// As `Net::counts`, over the window.
    counts: [[u64; 3]; 4],
    /// From a member cut off until every other member had it failed.
    detection_s: Vec<f64>,
}

/// One idle site of `n` members: its gossip over a window, then the time
/// to see each of a few members gone.
async fn run(n: usize) -> Figures {
    let net = Arc::new(Net {
        inboxes: Mutex::default(),
        streams: Mutex::default(),
        down: Mutex::default(),
        counts: Mutex::default(),
        counting: AtomicBool::new(false),
    });
    // A member's default gossip settings (1.5 s interval, threshold 5.5).
    let mut settings = GossipConfig::default().settings();
    if let Some(ms) = env_number("TRELLIS_CODING_INTERVAL_MS") {
        settings.interval = Duration::from_millis(ms as u64);
    }
    if let Some(phi) = env_number("TRELLIS_CODING_PHI") {
        settings.phi_threshold = phi;
    }
    let transport = NetTransport(net.clone());
    let addr = |i: usize| SocketAddr::from(([127, 0, (i >> 8) as u8, i as u8], 7900));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut handles: Vec<ChitchatHandle> = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        // Members join one after another, a random 1 ms to 1,000/n ms
        // apart (about half an interval in all), so that they do not all
        // tick at the same moment.
        let phase = next(&mut seed) % 1_000;
        tokio::time::sleep(Duration::from_millis(phase / n as u64 + 1)).await;
        let id = ChitchatId::new(format!("eu-s1-n{i:03}"), 1_763_800_000_000, addr(i));
        let config = ChitchatConfig {
            chitchat_id: id.clone(),
            cluster_id: "eu/s1".into(),
            gossip_interval: settings.interval,
            listen_addr: addr(i),
            seed_nodes: if i == 0 {
                vec![]
            } else {
                vec![addr(0).to_string()]
            },
            failure_detector_config: failure_detector(&settings),
            marked_for_deletion_grace_period: MARKED_FOR_DELETION_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let kv = vec![
            ("status".to_owned(), "healthy".to_owned()),
            ("cpu".to_owned(), format!("{}", 10 + i % 7)),
        ];
        handles.push(spawn_chitchat(config, kv, &transport).await.unwrap());
        ids.push(id);
    }
    tokio::time::sleep(WARMUP).await;
    net.counting.store(true, Ordering::Relaxed);
    tokio::time::sleep(WINDOW).await;
    net.counting.store(false, Ordering::Relaxed);
    let counts = *net.counts.lock().unwrap();

    let mut detection_s = Vec::new();
    for k in 0..KILLS {
        let victim = 1 + k * (n - 1) / KILLS;
        net.down.lock().unwrap().insert(addr(victim));
        let killed = Instant::now();
        let mut gone = false;
        while killed.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut all = true;
            for (j, h) in handles.iter().enumerate() {
                if j == victim || net.down.lock().unwrap().contains(&addr(j)) {
                    continue;
                }
                let id = ids[victim].clone();
                if h.with_chitchat(move |c| c.live_nodes().any(|m| *m == id))
                    .await
                {
                    all = false;
                    break;
                }
            }
            if all {
                gone = true;
                break;
            }
        }
        assert!(gone, "member {victim} was never seen failed by all");
        detection_s.push(killed.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    for h in handles {
        let _ = h.shutdown().await;
    }
    Figures {
        counts,
        detection_s,
    }
}

/// A number from the environment variable `name`, if set.
fn env_number(name: &str) -> Option<f64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}"))
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_sites_gossip_travels_in_under_a_tenth_of_chitchats_own_bytes() {
    let n: usize = std::env::var("TRELLIS_CODING_MEMBERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let f = run(n).await;
    let per_s = |bytes: u64| bytes as f64 / n as f64 / WINDOW.as_secs_f64();
    println!(
        "{n} members, idle, {} s window after {} s, paused clock",
        WINDOW.as_secs(),
        WARMUP.as_secs()
    );
    println!(
        "{:<8} {:>10} {:>16} {:>16} {:>14} {:>14}",
        "message", "per s", "chitchat B/s", "Trellis B/s", "chitchat B", "Trellis B"
    );
    let mut total = [0u64; 3];
    for (kind, c) in ["Syn", "SynAck", "Ack", "other"].iter().zip(&f.counts) {
        if c[0] == 0 {
            continue;
        }
        for (t, v) in total.iter_mut().zip(c) {
            *t += v;
        }
        println!(
            "{kind:<8} {:>10.2} {:>16.0} {:>16.0} {:>14.0} {:>14.1}",
            per_s(c[0]),
            per_s(c[1]),
            per_s(c[2]),
            c[1] as f64 / c[0] as f64,
            c[2] as f64 / c[0] as f64
        );
    }
    let ratio = total[2] as f64 / total[1] as f64;
    println!(
        "all      {:>10.2} {:>16.0} {:>16.0}   Trellis / chitchat: {ratio:.3}",
        per_s(total[0]),
        per_s(total[1]),
        per_s(total[2])
    );
    let detection: Vec<String> = f.detection_s.iter().map(|s| format!("{s:.1}")).collect();
    println!(
        "a member cut off, seen failed by all after (s): {}",
        detection.join(" ")
    );
    assert!(total[0] > 0, "no gossip in the window");
    // Digest coding and compression together; zstd of chitchat's bytes
    // alone made about a quarter (docs/BENCHMARKS.md).
    assert!(ratio < 0.1, "Trellis sent {ratio:.3} of chitchat's bytes");
}
