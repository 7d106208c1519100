//! `trellis-sim`: what-if runs of a whole Trellis mesh on a virtual clock.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use trellis_node::cli::{EXIT_FAILED, EXIT_USAGE};
use trellis_sim::scenario::Scenario;
use trellis_sim::world::Progress;

/// trellis-sim: the Trellis mesh at fleet scale, on a virtual clock,
/// reproducible from a seed.
///
/// It runs the real cores of relays and hubs (the same state machines the
/// daemons run) on a virtual network and virtual disks, with site gossip
/// either modelled (fast enough for 100,000 nodes) or run as real chitchat
/// for a sample of sites. A scenario file gives the topology, the links,
/// a timeline of faults and one of operator actions (configuration
/// changes, patches published and rolled out), and resource trends,
/// anomalies and remediation runbooks on chosen nodes; the run writes a
/// report and charts.
///
/// Try it:
///   trellis-sim run sim/scenarios/wan-outage.toml --seed 1
///   trellis-sim check sim/scenarios/scale-100k.toml
///
/// The same scenario and seed always give a byte-identical report.json
/// (for scenarios without real-chitchat sites). A run whose invariants
/// fail (records lost or applied twice, more nodes of a site remediating
/// at once than a runbook allows) exits 1 and prints the command that
/// replays it.
///
/// Exit codes: 0 ok, 1 an invariant failed, 2 bad usage or input.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario and write report.json, timeseries.csv, schedule.toml
    /// and report.html.
    ///
    /// schedule.toml is the scenario with every fault made explicit (sites
    /// picked by fraction named, random swarm faults listed): running it
    /// with the same seed replays the run.
    Run {
        /// The scenario file (TOML); see sim/scenarios/ for examples.
        scenario: PathBuf,
        /// Root seed: every site, relay, link and fault draws from it.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where to write the outputs (created if missing). Default:
        /// sim-runs/<scenario file name>-seed<N>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress display.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Read and validate a scenario, and say what it would run.
    Check {
        scenario: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        Command::Run {
            scenario,
            seed,
            out,
            quiet,
        } => run(&scenario, seed, out, quiet),
        Command::Check { scenario, seed } => check(&scenario, seed),
    }
}

fn load(path: &Path) -> Result<(Scenario, String), ExitCode> {
    Scenario::load(path).map_err(|e| {
        eprintln!("trellis-sim: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn check(path: &Path, seed: u64) -> ExitCode {
    let (sc, _) = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let t = &sc.topology;
    let faults = trellis_sim::schedule::expand(&sc, seed);
    if sc.description.trim().is_empty() {
        println!("{}", sc.name);
    } else {
        println!("{}: {}", sc.name, sc.description.trim());
    }
    let real = sc
        .site_names()
        .iter()
        .enumerate()
        .filter(|(i, n)| sc.real_gossip(*i, n))
        .count();
    println!(
        "  {} regions × {} sites × {} nodes = {} nodes, {} relays, {} hubs ({} with real chitchat)",
        t.regions,
        t.sites_per_region,
        t.nodes_per_site,
        sc.total_nodes(),
        t.regions * t.sites_per_region,
        t.hubs,
        if real == 1 {
            "1 site".to_owned()
        } else {
            format!("{real} sites")
        },
    );
    println!(
        "  {} of virtual time, then {} to drain; {} fault{} with seed {seed}",
        humantime::format_duration(sc.duration),
        humantime::format_duration(sc.drain),
        faults.len(),
        if faults.len() == 1 { "" } else { "s" },
    );
    for f in faults.iter().take(20) {
        let what = if !f.sites.is_empty() {
            format!("{} sites", f.sites.len())
        } else if let Some(h) = &f.hub {
            h.clone()
        } else if !f.hubs.is_empty() {
            f.hubs.join(", ")
        } else {
            f.class.clone().unwrap_or_default()
        };
        println!(
            "    {:>8} +{:<8} {} on {what}",
            humantime::format_duration(f.at).to_string(),
            humantime::format_duration(f.duration).to_string(),
            f.kind.name(),
        );
    }
    if faults.len() > 20 {
        println!(
            "    … and {} more (all listed in schedule.toml after a run)",
            faults.len() - 20
        );
    }
    let changes = trellis_sim::config::changes(&sc);
    if !changes.is_empty() {
        println!(
            "  {} configuration change{}:",
            changes.len(),
            if changes.len() == 1 { "" } else { "s" }
        );
    }
    for c in &changes {
        println!(
            "    {:>8} version {} at {}, {} bytes, {} to apply",
            humantime::format_duration(std::time::Duration::from_secs_f64(c.at)).to_string(),
            c.version,
            trellis_sim::scenario::hub_name(c.hub + 1),
            c.bundle_bytes,
            humantime::format_duration(std::time::Duration::from_secs_f64(c.apply_time)),
        );
    }
    let patches = trellis_sim::patch::patches(&sc);
    let secs = |s: f64| humantime::format_duration(std::time::Duration::from_secs_f64(s));
    for p in &patches {
        println!(
            "  {:>8} publish patch {} at {}: {} MiB, failure probability {}, install {}, bake {}, rollback {}",
            secs(p.at).to_string(),
            p.name,
            trellis_sim::scenario::hub_name(p.hub + 1),
            p.artifact_bytes as f64 / 1048576.0,
            p.failure_probability,
            secs(p.install_time),
            secs(p.bake),
            secs(p.rollback_time),
        );
    }
    for r in trellis_sim::patch::rollouts(&sc, &patches) {
        let plan = trellis_sim::patch::plan(&sc, &r.waves, &patches[r.patch].name);
        let sizes: Vec<String> = plan
            .iter()
            .map(|w| format!("{} {}", w.spec, w.nodes.len()))
            .collect();
        println!(
            "  {:>8} roll out {} in waves {} (nodes: {}), max failure {}{}",
            secs(r.at).to_string(),
            patches[r.patch].name,
            r.waves_text,
            sizes.join(", "),
            r.max_failure,
            if r.auto_rollback {
                ""
            } else {
                ", no automatic rollback"
            },
        );
    }
    print_foresight_plan(&sc, seed);
    ExitCode::SUCCESS
}

/// What `check` says of trends, anomalies and runbooks.
fn print_foresight_plan(sc: &Scenario, seed: u64) {
    if !sc.has_foresight() {
        return;
    }
    let secs = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let f = &sc.foresight;
    println!(
        "  foresight: modelled nodes sample every {}{}; forecasts need {} of history",
        secs(f.sample_every),
        if f.history.is_zero() {
            ", starting empty".to_owned()
        } else {
            format!(", with {} of history before the start", secs(f.history))
        },
        secs(f.node.forecast_min_span),
    );
    for (i, t) in sc.trends.iter().enumerate() {
        let n = trellis_sim::foresight::pick(sc, seed, "trend-nodes", i, t.selection()).len();
        println!(
            "    {:>8} disk fill on {n} node{} at {}{}",
            secs(t.at),
            if n == 1 { "" } else { "s" },
            t.rate,
            t.cleanup_every
                .map(|e| format!(
                    ", a clean-up every {} removing {}",
                    secs(e),
                    t.cleanup_fraction.unwrap_or(0.0)
                ))
                .unwrap_or_default(),
        );
    }
    for (i, a) in sc.anomalies.iter().enumerate() {
        let n = trellis_sim::foresight::pick(sc, seed, "anomaly-nodes", i, a.selection()).len();
        println!(
            "    {:>8} cpu at {}% for {} on {n} node{}",
            secs(a.at),
            a.value,
            secs(a.duration),
            if n == 1 { "" } else { "s" },
        );
    }
    for r in &sc.runbooks {
        println!(
            "    runbook {}: when {} is {} for {}, run for {} ({}), at most {} per site{}",
            r.rule.name,
            r.rule.check,
            r.rule.when,
            secs(r.rule.after),
            secs(r.duration),
            if r.fixes { "fixes" } else { "fixes nothing" },
            r.rule.max_per_site,
            if r.sites.is_empty() && r.regions.is_empty() {
                String::new()
            } else {
                format!(
                    " on {}",
                    [r.sites.clone(), r.regions.clone()].concat().join(", ")
                )
            },
        );
    }
}

fn run(path: &Path, seed: u64, out: Option<PathBuf>, quiet: bool) -> ExitCode {
    let (sc, text) = match load(path) {
        Ok(s) => s,
        Err(c) => return c,
    };
    let out = out.unwrap_or_else(|| {
        let stem = path
            .file_stem()
            .map_or("run".into(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("sim-runs").join(format!("{stem}-seed{seed}"))
    });
    if let Err(e) = std::fs::create_dir_all(&out) {
        eprintln!("trellis-sim: cannot create {}: {e}", out.display());
        return ExitCode::from(EXIT_USAGE);
    }
    let started = Instant::now();
    if !quiet {
        eprintln!(
            "trellis-sim: {} — {} nodes in {} sites, {} hubs; seed {seed}",
            sc.name,
            sc.total_nodes(),
            sc.topology.regions * sc.topology.sites_per_region,
            sc.topology.hubs
        );
    }
    let world = match trellis_sim::world::World::new(&sc, seed) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("trellis-sim: cannot build the world: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut bar = Bar::new(quiet);
    let outcome = world.run(|p| bar.show(p, started));
    bar.done();
    let mut report = outcome.report;
    report.scenario_sha256 = sha256_hex(text.as_bytes());
    let written = (|| -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(&report).map_err(std::io::Error::other)?;
        std::fs::write(out.join("report.json"), json + "\n")?;
        std::fs::write(out.join("timeseries.csv"), outcome.series.to_csv())?;
        let schedule = toml::to_string(&outcome.schedule).map_err(std::io::Error::other)?;
        let header = format!(
            "# The exact faults of a run of {} with seed {seed}.\n# Replay: trellis-sim run {} --seed {seed}\n\n",
            path.display(),
            out.join("schedule.toml").display()
        );
        std::fs::write(out.join("schedule.toml"), header + &schedule)?;
        std::fs::write(
            out.join("report.html"),
            trellis_sim::html::render(&report, &outcome.series),
        )?;
        Ok(())
    })();
    if let Err(e) = written {
        eprintln!(
            "trellis-sim: cannot write the outputs to {}: {e}",
            out.display()
        );
        return ExitCode::from(EXIT_USAGE);
    }
    let wall = started.elapsed().as_secs_f64();
    let r = &report;
    let d = &r.detection.latency;
    println!(
        "{}: {:.0} virtual s in {wall:.1} s ({:.0}× real time), {} events ({:.0}/s)",
        r.scenario,
        r.virtual_seconds,
        r.virtual_seconds / wall.max(1e-9),
        r.events,
        r.events as f64 / wall.max(1e-9)
    );
    if d.count == 0 {
        println!(
            "  detection: no node crashed; {} false suspicions",
            r.detection.false_suspicions
        );
    } else {
        println!(
            "  detection p50 {:.1} s, p99 {:.1} s, max {:.1} s over {} crashes; {} false suspicions",
            d.p50_s, d.p99_s, d.max_s, d.count, r.detection.false_suspicions
        );
    }
    println!(
        "  records: {} durable, {} delivered, {} lost, {} applied twice, {} duplicates absorbed, {} dropped with a gap",
        r.records.persisted,
        r.records.delivered,
        r.records.lost,
        r.records.duplicates_applied,
        r.records.duplicates_absorbed,
        r.records.dropped_with_gap
    );
    if r.buffers.drain.count > 0 {
        println!(
            "  backlog drains: {} relays, p50 {:.1} s, max {:.1} s; largest buffer {} KiB",
            r.buffers.drain.count,
            r.buffers.drain.p50_s,
            r.buffers.drain.max_s,
            r.buffers.peak_bytes_max / 1024
        );
    }
    for f in &r.faults {
        match f.converged_after_s {
            Some(c) => println!(
                "  {} at {:.0} s healed at {:.0} s, settled {c:.1} s later",
                f.kind, f.at_s, f.healed_s
            ),
            None => println!(
                "  {} at {:.0} s healed at {:.0} s, not settled by the end",
                f.kind, f.at_s, f.healed_s
            ),
        }
        if r.faults.len() > 12 {
            println!("  … {} faults in all (report.json)", r.faults.len());
            break;
        }
    }
    for c in &r.config_changes {
        println!(
            "  config version {} at {:.0} s ({}): {}/{} sites converged",
            c.version, c.at_s, c.hub, c.converged, c.sites
        );
        for (name, t, n) in [
            ("connected", &c.connected, c.sites - c.sites_cut_off),
            ("cut off", &c.cut_off, c.sites_cut_off),
        ] {
            if n == 0 {
                continue;
            }
            if t.count == 0 {
                println!("    {name} at the change: none of {n} converged");
            } else {
                println!(
                    "    {name} at the change: {}/{n}, p50 {:.1} s, p90 {:.1} s, p99 {:.1} s, max {:.1} s",
                    t.count, t.p50_s, t.p90_s, t.p99_s, t.max_s
                );
            }
        }
        if !c.not_converged.is_empty() {
            let shown: Vec<&str> = c.not_converged.iter().take(5).map(String::as_str).collect();
            println!(
                "    not converged by the end: {}{}",
                shown.join(", "),
                if c.not_converged.len() > 5 {
                    format!(" … and {} more (report.json)", c.not_converged.len() - 5)
                } else {
                    String::new()
                }
            );
        }
    }
    for ro in &r.rollouts {
        println!(
            "  rollout of {} ({}) at {:.0} s: {}{}",
            ro.patch,
            ro.waves_spec,
            ro.at_s,
            ro.state,
            ro.halted_by
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        );
        for w in ro.waves.iter().filter(|w| w.started_s.is_some()) {
            println!(
                "    wave {} {}: {} nodes in {} sites, {} healthy, {} failed, {} pending, {} unreachable: {}{}",
                w.index,
                w.spec,
                w.nodes,
                w.sites,
                w.healthy,
                w.failed,
                w.pending,
                w.unreachable,
                w.verdict,
                match (
                    w.patched_failure_ratio,
                    w.baseline_failure_ratio,
                    w.threshold
                ) {
                    (Some(p), Some(b), Some(t)) => format!(
                        " (failure ratio {:.3}, baseline {:.3}, threshold {:.3})",
                        p, b, t
                    ),
                    _ => String::new(),
                }
            );
        }
        println!(
            "    nodes touched {}, failed {}, rolled back {}, left patched {}; artifact over the WAN: {} MiB to {} sites",
            ro.nodes_touched,
            ro.nodes_failed,
            ro.nodes_rolled_back,
            ro.nodes_left_patched,
            ro.wan_bytes as f64 / 1048576.0,
            ro.wan.len(),
        );
        if let Some(t) = ro.rollback_s {
            println!("    rollback: {t:.1} s from the first failure to the last node rolled back");
        }
        for l in &ro.local_rollbacks {
            println!(
                "    {} rolled itself back at {:.0} s{}{}",
                l.site,
                l.tripped_s,
                if l.cut_off { " while cut off" } else { "" },
                l.hub_learnt_s
                    .map(|t| format!("; the hub learnt it at {t:.0} s"))
                    .unwrap_or_else(|| "; the hub never learnt it".to_owned()),
            );
        }
    }
    if let Some(f) = &r.foresight {
        print_foresight(f);
    }
    println!("  wrote {}", out.join("report.html").display());
    if !r.violations.is_empty() {
        eprintln!(
            "trellis-sim: INVARIANT VIOLATED in {} with seed {seed}:",
            r.scenario
        );
        for v in r.violations.iter().take(20) {
            eprintln!("  {v}");
        }
        eprintln!(
            "replay: trellis-sim run {} --seed {seed}",
            out.join("schedule.toml").display()
        );
        return ExitCode::from(EXIT_FAILED);
    }
    ExitCode::SUCCESS
}

fn print_foresight(f: &trellis_sim::report::ForesightOutcome) {
    let h = |s: f64| {
        if s >= 3600.0 {
            format!("{:.1} h", s / 3600.0)
        } else if s >= 60.0 {
            format!("{:.0} min", s / 60.0)
        } else {
            format!("{s:.0} s")
        }
    };
    let spread = |s: &trellis_sim::report::Spread| {
        if s.count == 0 {
            "–".to_owned()
        } else {
            format!("p50 {}, min {}, max {}", h(s.p50_s), h(s.min_s), h(s.max_s))
        }
    };
    println!(
        "  foresight: {} nodes modelled ({} with a trend, {} with an anomaly, {} controls), sampled every {}",
        f.nodes_modelled,
        f.trend_nodes,
        f.anomaly_nodes,
        f.control_nodes,
        h(f.sample_every_s)
    );
    let d = &f.disks;
    if d.disks > 0 {
        println!(
            "    disks: {} filling, {} forecast; {} full, {} of them forecast before (lead {}; critical {}); {} full unforecast; {} cleaned by a runbook and never full",
            d.disks,
            d.forecast,
            d.filled,
            d.predicted_before_full,
            spread(&d.lead_warning),
            spread(&d.lead_critical),
            d.not_predicted_total,
            d.averted
        );
    }
    let a = &f.anomalies;
    if a.injected > 0 {
        println!(
            "    anomalies: {} injected, {} flagged (delay {}), {} missed",
            a.injected,
            a.flagged,
            spread(&a.delay),
            a.missed_total
        );
    }
    let fa = &f.false_alarms;
    println!(
        "    false alarms: {} on {} control nodes ({:.0} node-hours), {} on other nodes",
        fa.on_controls, fa.control_nodes, fa.control_node_hours, fa.elsewhere
    );
    for r in &f.runbooks {
        println!(
            "    runbook {} ({} {}, at most {} per site): {} runs, {} fixed, {} failed, {} not recovered; refused {}× by the site limit ({} nodes), {} episodes by the rate limit, {}× without a relay; {} breaker trips; at most {} at once at a site{}",
            r.name,
            r.check,
            r.when,
            r.max_per_site,
            r.runs,
            r.fixed,
            r.failed,
            r.not_recovered,
            r.blocked_site_limit,
            r.nodes_blocked_site_limit,
            r.blocked_rate_limit,
            r.blocked_no_relay,
            r.breaker_trips,
            r.max_concurrent,
            r.max_concurrent_site
                .as_ref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default(),
        );
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The progress display: a bar on a terminal, a line every tenth
/// otherwise.
struct Bar {
    quiet: bool,
    tty: bool,
    last_draw: Option<Instant>,
    last_tenth: u64,
    drawn: bool,
}

impl Bar {
    fn new(quiet: bool) -> Self {
        Bar {
            quiet,
            tty: std::io::stderr().is_terminal(),
            last_draw: None,
            last_tenth: 0,
            drawn: false,
        }
    }

    fn show(&mut self, p: &Progress, started: Instant) {
        if self.quiet {
            return;
        }
        let wall = started.elapsed().as_secs_f64().max(1e-6);
        let frac = (p.virtual_s / p.total_s).clamp(0.0, 1.0);
        let rate = p.events as f64 / wall;
        let eta = if frac > 0.0 {
            wall * (1.0 - frac) / frac
        } else {
            0.0
        };
        let mut err = std::io::stderr();
        if self.tty {
            if self
                .last_draw
                .is_some_and(|t| t.elapsed().as_millis() < 200)
            {
                return;
            }
            self.last_draw = Some(Instant::now());
            let width = 30;
            let filled = (frac * width as f64) as usize;
            let _ = write!(
                err,
                "\r  [{}{}] {:>6.0}/{:.0} virtual s · {:>7} events/s · eta {:>4.0} s ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                p.virtual_s,
                p.total_s,
                human(rate),
                eta
            );
            self.drawn = true;
        } else {
            let tenth = (frac * 10.0) as u64;
            if tenth > self.last_tenth {
                self.last_tenth = tenth;
                let _ = writeln!(
                    err,
                    "  {:>3}%: {:.0}/{:.0} virtual s, {} events/s, {:.0} s so far",
                    tenth * 10,
                    p.virtual_s,
                    p.total_s,
                    human(rate),
                    wall
                );
            }
        }
    }

    fn done(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

/// 950, 12.3k, 4.56M.
fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
