//! The node's runbook task: drives [`crate::runbook::Engine`] with the
//! node's published checks and the runbooks of the configuration it
//! applied, takes leases from the site's relay, runs actions, publishes
//! each rule's `runbook:NAME` check, and keeps the engine's states and an
//! audit file of every run in the node's state directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::endpoint::MeshEndpoint;
use crate::gossip::Gossip;
use crate::runbook::{ActionOutcome, Engine, LeaseAnswer, RuleState, RunRecord, Runbook, Step};
use crate::site::Health;

/// The engine's states, in the node's state directory.
pub fn states_path(state_dir: &Path) -> PathBuf {
    state_dir.join("runbooks.json")
}

/// The audit file of runs, in the node's state directory: one JSON
/// [`RunRecord`] per line, with the action's output.
pub fn audit_path(state_dir: &Path) -> PathBuf {
    state_dir.join("runbook-runs.jsonl")
}

/// The audit file is moved to `.1` (replacing the one before) past this.
pub const AUDIT_ROTATE_BYTES: u64 = 1 << 20;

/// How often the rules are looked at against the checks.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// A lease request or release gets this long.
const LEASE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    pub rule: String,
    /// `fixed`, `failed`, `not-recovered`, `would-run`, `blocked`,
    /// `tripped`, `reset`.
    pub result: String,
}

/// Counters of the node's runbooks.
#[derive(Clone, Default)]
pub struct RunbookMetrics {
    pub runs: Family<RunLabels, Counter>,
    pub active: Gauge,
}

impl RunbookMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = RunbookMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis");
        r.register(
            "runbook_records",
            "What the node's runbooks did, by rule and result (runs, dry runs, refusals by the rails, breaker trips and resets)",
            m.runs.clone(),
        );
        r.register(
            "runbook_active",
            "Runbooks remediating on this node now (taking a lease, running or verifying)",
            m.active.clone(),
        );
        m
    }
}

/// What a step done in the background answers.
enum Done {
    Leased {
        rule: String,
        answer: Result<(), String>,
    },
    Ran {
        rule: String,
        outcome: ActionOutcome,
    },
}

/// The runbook task of a node.
pub struct RunbookTask {
    pub gossip: Arc<Gossip>,
    pub endpoint: MeshEndpoint,
    /// The health the node last published.
    pub health: watch::Receiver<Health>,
    /// The runbooks of the configuration applied.
    pub rules: watch::Receiver<Vec<Runbook>>,
    /// Where the `runbook:NAME` checks go to be published.
    pub extra: crate::agent::ExtraChecks,
    pub state_dir: PathBuf,
    pub metrics: RunbookMetrics,
}

impl RunbookTask {
    /// Runs until `shutdown`. An action running then is killed; its lease
    /// expires at the relay.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut engine = Engine::new();
        match load_states(&states_path(&self.state_dir)) {
            Ok(states) => engine.restore(states),
            Err(error) => {
                warn!(%error, "runbook states unreadable; rate limits and breakers start afresh")
            }
        }
        let (done_tx, mut done_rx) = mpsc::channel::<Done>(32);
        let mut steps = engine.set_rules(self.rules.borrow_and_update().clone());
        let mut tick = crate::clock::ticker(LOOK_EVERY);
        let actions = CancellationToken::new();
        loop {
            self.act(std::mem::take(&mut steps), &done_tx, &actions);
            self.publish(&mut engine);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                changed = self.rules.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let rules = self.rules.borrow_and_update().clone();
                    info!(rules = rules.len(), "runbooks of the applied configuration");
                    steps = engine.set_rules(rules);
                }
                Some(done) = done_rx.recv() => {
                    let now = crate::clock::unix_ms();
                    steps = match done {
                        Done::Leased { rule, answer } => engine.leased(now, &rule, answer),
                        Done::Ran { rule, outcome } => engine.ran(now, &rule, outcome),
                    };
                }
                _ = tick.tick() => {
                    let checks = self.health.borrow().checks.clone();
                    steps = engine.observe(crate::clock::unix_ms(), &checks);
                }
            }
        }
        actions.cancel();
        self.publish(&mut engine);
    }

    /// Publishes the rules' checks, and saves states and records.
    fn publish(&self, engine: &mut Engine) {
        *self.extra.lock().unwrap_or_else(|p| p.into_inner()) = engine.checks();
        self.metrics.active.set(engine.active() as i64);
        let records = engine.take_records();
        for r in &records {
            self.metrics
                .runs
                .get_or_create(&RunLabels {
                    rule: r.rule.clone(),
                    result: serde_json::to_value(r.result)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                })
                .inc();
            let output = r.outcome.as_ref().map(|o| o.output.as_str()).unwrap_or("");
            info!(rule = %r.rule, result = ?r.result, run = r.run, dry_run = r.dry_run, note = %r.note, output, "runbook");
        }
        if !records.is_empty()
            && let Err(error) = append_records(&audit_path(&self.state_dir), &records)
        {
            warn!(%error, "cannot write the runbook audit file");
        }
        if engine.take_changed()
            && let Err(error) = save_states(&states_path(&self.state_dir), &engine.states())
        {
            warn!(%error, "cannot save the runbook states");
        }
    }

    /// Does `steps` in the background; their answers come back on `done`.
    fn act(&self, steps: Vec<Step>, done: &mpsc::Sender<Done>, actions: &CancellationToken) {
        for step in steps {
            let done = done.clone();
            let endpoint = self.endpoint.clone();
            let gossip = self.gossip.clone();
            match step {
                Step::AskLease { rule, max, ttl } => {
                    tokio::spawn(async move {
                        let answer = ask_lease(&gossip, &endpoint, &rule, max, ttl).await;
                        let _ = done.send(Done::Leased { rule, answer }).await;
                    });
                }
                Step::Release { rule } => {
                    tokio::spawn(async move {
                        let Some(relay) = site_relay(&gossip).await else {
                            return;
                        };
                        let released = tokio::time::timeout(
                            LEASE_TIMEOUT,
                            crate::distribute::release_lease(&endpoint, relay, &rule),
                        )
                        .await;
                        if !matches!(released, Ok(Ok(()))) {
                            warn!(%rule, %relay, "cannot give the runbook lease back; it expires by itself");
                        }
                    });
                }
                Step::Run {
                    rule,
                    check,
                    command,
                    timeout,
                } => {
                    let cancel = actions.clone();
                    let node = endpoint.identity().name.clone();
                    tokio::spawn(async move {
                        info!(%rule, %command, "runbook action starting");
                        let env: [(&str, &std::ffi::OsStr); 3] = [
                            ("TRELLIS_NODE_NAME", node.as_ref()),
                            ("TRELLIS_RUNBOOK", rule.as_ref()),
                            ("TRELLIS_CHECK", check.as_ref()),
                        ];
                        let run = crate::apply::run_command(
                            &command,
                            Some(Path::new("/")),
                            &env,
                            timeout,
                        );
                        let o = tokio::select! {
                            biased;
                            _ = cancel.cancelled() => return,
                            o = run => o,
                        };
                        let outcome = ActionOutcome {
                            exit_code: o.exit_code,
                            timed_out: o.timed_out,
                            output: o.output,
                            duration_ms: o.duration_ms,
                        };
                        let _ = done.send(Done::Ran { rule, outcome }).await;
                    });
                }
            }
        }
    }
}

/// The relay leases are asked of: the alive relay of the site with the
/// smallest name, so that every node of the site asks the same one.
async fn site_relay(gossip: &Gossip) -> Option<std::net::SocketAddr> {
    let view = gossip.view().await;
    view.current_members()
        .into_iter()
        .filter(|m| m.alive && m.is_relay())
        .min_by(|a, b| a.name.cmp(&b.name))
        .map(|m| m.gossip_addr)
}

async fn ask_lease(
    gossip: &Gossip,
    endpoint: &MeshEndpoint,
    rule: &str,
    max: u32,
    ttl: Duration,
) -> Result<(), String> {
    let Some(relay) = site_relay(gossip).await else {
        return Err("no relay of the site is alive to grant a lease".to_owned());
    };
    let asked = tokio::time::timeout(
        LEASE_TIMEOUT,
        crate::distribute::ask_lease(endpoint, relay, rule, max, ttl),
    )
    .await;
    match asked {
        Ok(Ok(LeaseAnswer::Granted { .. })) => Ok(()),
        Ok(Ok(LeaseAnswer::Busy { holders, max })) => Err(format!(
            "{} of {max} allowed at the site already remediate: {}",
            holders.len(),
            holders.join(", ")
        )),
        Ok(Err(e)) => Err(format!("no lease from the relay: {e}")),
        Err(_) => Err(format!(
            "no lease: the relay at {relay} did not answer within {}s",
            LEASE_TIMEOUT.as_secs()
        )),
    }
}

/// The states kept at `path`; none when there is no file.
pub fn load_states(path: &Path) -> Result<BTreeMap<String, RuleState>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn save_states(path: &Path, states: &BTreeMap<String, RuleState>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(states).map_err(std::io::Error::other)?;
    crate::apply::write_atomic(path, &bytes, 0o600)
}

/// Appends `records` to the audit file at `path` (and fsyncs it), moving
/// it to `.1` first once it is past [`AUDIT_ROTATE_BYTES`].
pub fn append_records(path: &Path, records: &[RunRecord]) -> std::io::Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() > AUDIT_ROTATE_BYTES) {
        std::fs::rename(path, path.with_extension("jsonl.1"))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut buf = Vec::new();
    for r in records {
        serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
        buf.push(b'\n');
    }
    f.write_all(&buf)?;
    f.sync_data()
}

/// Reads the audit file at `path` (the rotated one first), skipping lines
/// it cannot read.
pub fn read_records(path: &Path) -> std::io::Result<Vec<RunRecord>> {
    let mut out = Vec::new();
    for p in [path.with_extension("jsonl.1"), path.to_owned()] {
        match std::fs::read_to_string(&p) {
            Ok(text) => out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
