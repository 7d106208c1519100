//! How much faster than real time one site of real chitchat runs in the
//! simulator, against the gossip model running the same site in the same
//! run.
//!
//! A site of 100 nodes and its relay, Trellis's production gossip settings,
//! each node changing health about once an hour and one node crashing and
//! coming back every 30 s, for ten virtual minutes.
//!
//! ```text
//! cargo run --release -p trellis-sim --example real_gossip_speed [-- NODES VIRTUAL_SECONDS]
//! ```

use std::time::Instant;

use trellis_node::config::GossipConfig;
use trellis_sim::model::SiteModel;
use trellis_sim::real::RealSite;
use trellis_sim::rng::SimRng;
use trellis_sim::site::health_of;

const SEED: u64 = 1;

#[derive(Clone, Copy)]
enum Event {
    Crash(usize),
    Restart(usize),
    Change(usize),
}

/// Health as the simulator's sites publish it (odd versions passing, even
/// ones warning).
fn health(version: u64) -> Vec<(String, String)> {
    health_of(version).to_kv()
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let nodes: usize = match args.next() {
        Some(a) => a.parse().map_err(|e| anyhow::anyhow!("NODES: {e}"))?,
        None => 100,
    };
    let seconds: f64 = match args.next() {
        Some(a) => a
            .parse()
            .map_err(|e| anyhow::anyhow!("VIRTUAL_SECONDS: {e}"))?,
        None => 600.0,
    };
    anyhow::ensure!((2..=2000).contains(&nodes), "NODES: between 2 and 2000");
    anyhow::ensure!(
        (10.0..=86_400.0).contains(&seconds),
        "VIRTUAL_SECONDS: between 10 and 86400"
    );
    let n = nodes + 1;
    let settings = GossipConfig::default().settings();
    let interval = settings.interval.as_secs_f64();

    // The same events for both fidelities.
    let mut rng = SimRng::derive(SEED, "speed-schedule", 0);
    let mut events: Vec<(f64, Event)> = Vec::new();
    let mut t = 30.0;
    while t + 20.0 < seconds {
        let j = 1 + rng.below(nodes as u64) as usize;
        events.push((t, Event::Crash(j)));
        events.push((t + 15.0, Event::Restart(j)));
        t += 30.0;
    }
    let mut t = 0.0;
    loop {
        t += rng.exp(3600.0 / nodes as f64);
        if t >= seconds {
            break;
        }
        events.push((t, Event::Change(1 + rng.below(nodes as u64) as usize)));
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!(
        "a site of {nodes} nodes and its relay, {seconds} virtual s, {} crashes, {} health changes",
        events
            .iter()
            .filter(|e| matches!(e.1, Event::Crash(_)))
            .count(),
        events
            .iter()
            .filter(|e| matches!(e.1, Event::Change(_)))
            .count()
    );

    let started = Instant::now();
    let mut m = SiteModel::new(
        n,
        interval,
        settings.phi_threshold,
        0,
        SimRng::derive(SEED, "speed-model", 0),
    );
    let mut clock = 0.0;
    let mut verdicts = 0usize;
    for &(t, e) in &events {
        m.run(clock, t, |_, _, _| verdicts += 1);
        clock = t;
        match e {
            Event::Crash(j) => m.crash(j),
            Event::Restart(j) => m.restart(j, (t * 1000.0) as u64),
            Event::Change(j) => {
                m.bump(j);
            }
        }
    }
    m.run(clock, seconds, |_, _, _| verdicts += 1);
    let model_wall = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let members = (0..n).map(|j| (format!("r1-s1-n{j}"), health(1))).collect();
    let mut r = RealSite::new(
        "r1",
        "r1-s1",
        members,
        &settings,
        0,
        SimRng::derive(SEED, "speed-real", 0),
    )?;
    let mut versions = vec![1u64; n];
    for &(t, e) in &events {
        r.advance_to(t);
        match e {
            Event::Crash(j) => r.crash(j),
            Event::Restart(j) => r.restart(j, health(versions[j]))?,
            Event::Change(j) => {
                versions[j] += 1;
                r.set(j, health(versions[j]));
            }
        }
    }
    r.advance_to(seconds);
    let real_verdicts = r.take_liveness_changes().len();
    let (bytes, messages) = r.traffic();
    let real_wall = started.elapsed().as_secs_f64();

    println!(
        "model:          {model_wall:>8.3} s wall, {:>9.0}x real time ({verdicts} liveness verdicts)",
        seconds / model_wall
    );
    println!(
        "real chitchat:  {real_wall:>8.3} s wall, {:>9.1}x real time ({real_verdicts} liveness verdicts, {messages} messages, {} MB)",
        seconds / real_wall,
        bytes / 1_000_000
    );
    println!(
        "ratio: the model runs this site {:.0}x faster than real chitchat",
        real_wall / model_wall
    );
    Ok(())
}
