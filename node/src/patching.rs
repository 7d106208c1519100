//! The node's patch engine: installs the patch its relay orders, bakes
//! it against the node's own health checks, rolls it back when told, and
//! says where it is in gossip ([`crate::patchstate`]).
//!
//! # States
//! A run of a patch on a node goes
//! `downloading → installing → baking → healthy`, or stops at `failed`
//! (fetching the manifest or an artifact failed, the operator's signature
//! is not good, an install command failed, or a declared check went
//! critical or was not passing at the end of the bake). From `installing`,
//! `baking`, `healthy` or `failed`, a `rollback` order for the same run
//! leads to `rolling-back → rolled-back`, or `rollback-failed` when a
//! rollback command fails (the machine then needs a person).
//!
//! # Rules
//! - The order acted on is the one of an alive relay of the site; with
//!   several, the one with the highest run (a `rollback` wins a tie).
//! - A node installs when the order is `install`, names it, and it has no
//!   record of that run of that patch: it never installs the same run
//!   twice (once rolled back it stays so), while a later run of the same
//!   patch installs again.
//! - A node never rolls back on its own: a failure is reported, and the
//!   relay's order decides (so a rollout without automatic rollback leaves
//!   the node as it is for a person to look at).
//! - A rollback order for a run in which no install command ran (the
//!   download or the signature failed) has nothing to undo: the run is
//!   recorded as `rolled-back` without running a command, and the detail
//!   says so.
//! - Baking: the bake lasts the manifest's `bake`, but at least as long as
//!   a declared check takes to be evaluated again after the install (its
//!   interval and timeout, plus the health publication interval), because
//!   a check result in gossip carries no time: a result only counts once
//!   that long has passed since the install. From then on a declared check
//!   that is `critical` fails the run at once; at the end every declared
//!   check must be `passing`. A declared check this node does not have
//!   fails the run before the bake starts.
//!
//! # On disk
//! In `[patch] dir`: `state` (the last run, JSON, written atomically
//! before each state is published), `ID.patch` (the signed manifest, for a
//! rollback after a restart) and `ID/` (the artifacts, each fetched into
//! `.NAME.partial` first, kept between attempts so a download resumes;
//! the commands run there). After a restart, a run left in
//! `installing` is reported `failed` (an install command was
//! interrupted), one left in `rolling-back` is rolled back again, one left
//! in `baking` bakes again from the start, and one left in `downloading`
//! starts over if the order still names the node.
//!
//! # Layout
//! The core ([`current_order`], [`decide`], [`recover`], [`check_bounds`],
//! [`bake_time`], [`judge_bake`]) is pure; [`PatchEngine`] is the driver
//! (gossip, fetches, commands, the state file).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apply::{ReloadOutcome, run_command, write_atomic};
use crate::config::{CheckConfig, NodeConfig, PatchConfig, RESERVED_CHECK_NAMES};
use crate::distribute::{MAX_RESULT_DETAIL, fetch_artifact, fetch_patch, hex32};
use crate::endpoint::MeshEndpoint;
use crate::gossip::Gossip;
use crate::metrics::PatchMetrics;
use crate::patch::{PatchManifest, SignedPatch, retry_delay, verify};
use crate::patchstate::{NodePatch, OrderAction, PatchOrder, PatchState, keys};
use crate::site::{CheckResult, SiteView, Status};
use crate::tls::Credentials;
use crate::upgrade;

/// The node's last run, in the patch directory.
pub const STATE_FILE: &str = "state";
/// Where releases before partial artifact files kept a node's fetched
/// chunks, in the patch directory; removed when a download starts.
pub const OLD_CHUNKS_DIR: &str = "chunks";
/// Failed attempts at one chunk of an artifact before the run fails.
pub const ARTIFACT_ATTEMPTS: u32 = 8;
/// Attempts at fetching the manifest before the run fails.
pub const MANIFEST_ATTEMPTS: u32 = 3;
/// How often the engine looks at the site's gossip (orders, and its own
/// checks while baking).
const TICK: Duration = Duration::from_secs(1);

/// Why the patch engine could not start. Nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum PatchingError {
    /// The patch directory or its state file could not be read.
    #[error("{path}: {source} (check `[patch] dir` and its permissions)")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------
// Core

/// What a node remembers of its last run of a patch, and publishes (as a
/// [`NodePatch`]) after each change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub run: u64,
    /// [`SignedPatch::id`], in hex in the file.
    #[serde(with = "hex_id")]
    pub patch: [u8; 32],
    /// The manifest's name and version, once it was fetched (for logs).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    pub state: PatchState,
    /// The run failed on this node at some point (kept through the
    /// rollback that follows).
    pub failed: bool,
    /// An install command was started in this run: a rollback has
    /// something to undo.
    pub installed: bool,
    pub detail: String,
}

impl PatchRecord {
    /// A run that starts: downloading, nothing installed.
    pub fn start(run: u64, patch: [u8; 32]) -> Self {
        PatchRecord {
            run,
            patch,
            name: String::new(),
            version: String::new(),
            state: PatchState::Downloading,
            failed: false,
            installed: false,
            detail: String::new(),
        }
    }

    /// The same run in `state`, with `detail`.
    pub fn to(&self, state: PatchState, detail: impl Into<String>) -> Self {
        PatchRecord {
            state,
            failed: self.failed || state == PatchState::Failed,
            detail: detail.into(),
            ..self.clone()
        }
    }

    /// What the node publishes in gossip.
    pub fn published(&self) -> NodePatch {
        NodePatch {
            run: self.run,
            patch: self.patch,
            state: self.state,
            failed: self.failed,
            detail: crate::distribute::cut(&self.detail, MAX_RESULT_DETAIL).to_owned(),
        }
    }

    fn is(&self, run: u64, patch: &[u8; 32]) -> bool {
        self.run == run && self.patch == *patch
    }
}

mod hex_id {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::distribute::hex32(id))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        crate::distribute::parse_hex32(&s)
            .ok_or_else(|| serde::de::Error::custom("a patch id is 64 hex digits"))
    }
}

/// What the node does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Fetch the patch from the relay at `relay` and install it.
    Install {
        run: u64,
        patch: [u8; 32],
        relay: SocketAddr,
    },
    /// Run the patch's rollback commands.
    RollBack {
        run: u64,
        patch: [u8; 32],
    },
    /// Nothing was installed in this run: record it as rolled back without
    /// running a command.
    Discard {
        run: u64,
        patch: [u8; 32],
    },
}

/// The order the site's nodes follow: the one of an alive relay with the
/// highest run (a `rollback` before an `install` of the same run: two
/// relays that disagree err on the safe side), with that relay's address.
pub fn current_order(view: &SiteView) -> Option<(PatchOrder, SocketAddr)> {
    view.current_members()
        .into_iter()
        .filter(|m| m.alive && m.is_relay())
        .filter_map(|m| m.patch.order.clone().map(|o| (o, m.gossip_addr)))
        .max_by_key(|(o, addr)| (o.run, o.action == OrderAction::Rollback, *addr))
}

/// What node `me`, whose last run is `record`, does about `order` (see
/// the module's rules).
pub fn decide(
    order: Option<&(PatchOrder, SocketAddr)>,
    me: &str,
    record: Option<&PatchRecord>,
) -> Step {
    let Some((order, relay)) = order else {
        return Step::Nothing;
    };
    let (run, patch) = (order.run, order.patch);
    let this_run = record.filter(|r| r.is(run, &patch));
    match order.action {
        OrderAction::Install => {
            // A download cut short (by a restart) starts over.
            let done = this_run.is_some_and(|r| r.state != PatchState::Downloading);
            if order.installs(me) && !done {
                Step::Install {
                    run,
                    patch,
                    relay: *relay,
                }
            } else {
                Step::Nothing
            }
        }
        OrderAction::Rollback => match this_run {
            Some(r) if undoable(r.state) => {
                if r.installed {
                    Step::RollBack { run, patch }
                } else {
                    Step::Discard { run, patch }
                }
            }
            _ => Step::Nothing,
        },
    }
}

/// States a rollback order applies to.
fn undoable(state: PatchState) -> bool {
    matches!(
        state,
        PatchState::Downloading
            | PatchState::Installing
            | PatchState::Baking
            | PatchState::Healthy
            | PatchState::Failed
    )
}

/// What the engine does first about the record it found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Publish the record and wait for orders.
    Publish,
    /// Bake again from the start.
    Bake,
    /// Run the rollback commands again.
    RollBack,
}

/// The record to publish after a restart, and what to do about it: a run
/// interrupted while installing failed (what the command did is unknown),
/// one interrupted while rolling back is rolled back again, one
/// interrupted while baking bakes again.
pub fn recover(record: PatchRecord) -> (PatchRecord, Resume) {
    match record.state {
        PatchState::Installing => {
            let detail =
                "interrupted during install: the node stopped while an install command ran";
            (record.to(PatchState::Failed, detail), Resume::Publish)
        }
        PatchState::RollingBack => (record, Resume::RollBack),
        PatchState::Baking => (record, Resume::Bake),
        _ => (record, Resume::Publish),
    }
}

/// How long after the install each declared check's published result can
/// be trusted to have been evaluated after it: a user check's interval
/// plus its timeout, plus `health_interval` (how often results are
/// published); the built-in `disk` and `memory` checks are evaluated at
/// each publication. A declared check the node does not have is an error,
/// worded for the detail.
pub fn check_bounds(
    declared: &[String],
    checks: &[CheckConfig],
    health_interval: Duration,
) -> Result<BTreeMap<String, Duration>, String> {
    declared
        .iter()
        .map(|name| {
            let bound = if let Some(c) = checks.iter().find(|c| &c.name == name) {
                c.interval + c.timeout + health_interval
            } else if RESERVED_CHECK_NAMES.contains(&name.as_str()) {
                health_interval
            } else {
                return Err(format!(
                    "the patch needs check {name:?}, but this node has no such check; \
                     add it to the node's [[checks]] or remove it from the patch"
                ));
            };
            Ok((name.clone(), bound))
        })
        .collect()
}

/// How long the bake lasts: the manifest's `bake`, or longer if a declared
/// check needs longer to be evaluated after the install.
pub fn bake_time(bake: Duration, bounds: &BTreeMap<String, Duration>) -> Duration {
    bounds.values().copied().fold(bake, Duration::max)
}

/// How a bake stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bake {
    /// Not over yet.
    Wait,
    /// Over, and every declared check passing.
    Healthy,
    /// Why the patch failed.
    Failed(String),
}

/// Judges a bake `elapsed` into `bake` (from [`bake_time`]) from the
/// node's own published check results (`None`: the node is not in its
/// own view yet). Only results older than their bound count.
pub fn judge_bake(
    bounds: &BTreeMap<String, Duration>,
    published: Option<&BTreeMap<String, CheckResult>>,
    elapsed: Duration,
    bake: Duration,
) -> Bake {
    let result = |name: &str| published.and_then(|p| p.get(name));
    for (name, bound) in bounds {
        if elapsed >= *bound
            && let Some(r) = result(name).filter(|r| r.status == Status::Critical)
        {
            return Bake::Failed(format!("check {name} is critical: {}", r.detail));
        }
    }
    if elapsed < bake {
        return Bake::Wait;
    }
    for name in bounds.keys() {
        match result(name) {
            Some(r) if r.status == Status::Passing => {}
            Some(r) => {
                return Bake::Failed(format!(
                    "check {name} is {} at the end of the bake: {}",
                    r.status, r.detail
                ));
            }
            None => {
                return Bake::Failed(format!(
                    "check {name} has no published result at the end of the bake"
                ));
            }
        }
    }
    Bake::Healthy
}

/// What the node says about a command that failed: which, how it ended,
/// and the end of its output, within [`MAX_RESULT_DETAIL`].
pub fn command_failure(o: &ReloadOutcome) -> String {
    let how = if o.timed_out {
        "timed out and was killed".to_owned()
    } else {
        match o.exit_code {
            Some(code) => format!("exited with status {code}"),
            None => "did not exit by itself".to_owned(),
        }
    };
    let head = format!("`{}` {how}", o.command);
    let output = o.output.trim();
    if output.is_empty() {
        return crate::distribute::cut(&head, MAX_RESULT_DETAIL).to_owned();
    }
    let room = MAX_RESULT_DETAIL.saturating_sub(head.len() + 2).max(80);
    let mut start = output.len().saturating_sub(room);
    while !output.is_char_boundary(start) {
        start += 1;
    }
    let detail = format!("{head}: {}", &output[start..]);
    crate::distribute::cut(&detail, MAX_RESULT_DETAIL).to_owned()
}

// ---------------------------------------------------------------------------
// Driver: files and commands

/// Where the artifacts of patch `id` go, and its commands run.
pub fn artifact_dir(dir: &Path, id: &[u8; 32]) -> PathBuf {
    dir.join(hex32(id))
}

/// Removes the chunk store an earlier release kept in the patch
/// directory `dir` (its chunks are no longer read; the space is the
/// node's). A failure is logged, not fatal.
fn remove_old_chunk_store(dir: &Path) {
    let old = dir.join(OLD_CHUNKS_DIR);
    match std::fs::remove_dir_all(&old) {
        Ok(()) => info!(dir = %old.display(), "removed the chunk store of an earlier release"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(dir = %old.display(), error = %e, "cannot remove the chunk store of an earlier release")
        }
    }
}

/// Where the signed manifest of patch `id` is kept.
pub fn manifest_path(dir: &Path, id: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.patch", hex32(id)))
}

/// Reads the last run from `dir`. A missing directory or file: no run. A
/// file that cannot be decoded is moved aside (`state.corrupt-<unix ms>`)
/// and logged as an error; the node starts as if it had no run (the
/// relay's current order then decides again).
pub fn load_record(dir: &Path) -> Result<Option<PatchRecord>, PatchingError> {
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PatchingError::Io { path, source }),
    };
    match serde_json::from_slice::<PatchRecord>(&bytes) {
        Ok(r) => Ok(Some(r)),
        Err(problem) => {
            let aside = dir.join(format!("{STATE_FILE}.corrupt-{}", crate::clock::unix_ms()));
            std::fs::rename(&path, &aside).map_err(|source| PatchingError::Io {
                path: path.clone(),
                source,
            })?;
            error!(
                path = %path.display(),
                moved_to = %aside.display(),
                %problem,
                "the patch state file is unreadable; moved it aside and start with no patch run"
            );
            Ok(None)
        }
    }
}

/// Writes the run to `dir` atomically.
pub fn save_record(dir: &Path, record: &PatchRecord) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    write_atomic(&dir.join(STATE_FILE), &json, 0o600)
}

/// Runs `commands` in order in `dir`, each killed after `timeout`; stops
/// at the first that fails and says why ([`command_failure`]). The full
/// output of a failed command is logged.
pub async fn run_commands(
    commands: &[String],
    dir: &Path,
    env: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> Result<(), String> {
    for cmd in commands {
        let outcome = run_command(cmd, Some(dir), env, timeout).await;
        if !outcome.succeeded() {
            warn!(
                command = %outcome.command,
                exit_code = ?outcome.exit_code,
                timed_out = outcome.timed_out,
                output = %outcome.output,
                "patch command failed"
            );
            return Err(command_failure(&outcome));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Driver: the task

/// The task that follows the relay's patch orders on a node.
pub struct PatchEngine {
    gossip: Arc<Gossip>,
    endpoint: MeshEndpoint,
    /// Holds the mesh CA that operators' certificates must chain to.
    trust: Credentials,
    me: String,
    cfg: PatchConfig,
    checks: Vec<CheckConfig>,
    health_interval: Duration,
    metrics: PatchMetrics,
    record: Option<PatchRecord>,
    /// Cancelled to stop the whole agent when it restarts into another
    /// build of itself ([`upgrade`]); none where it may not.
    restart: Option<CancellationToken>,
}

impl PatchEngine {
    /// The engine of a node configured by `cfg`, whose last run is
    /// `record` ([`load_record`] from `[patch] dir`; nothing is created
    /// there until the first install).
    pub fn new(
        gossip: Arc<Gossip>,
        endpoint: MeshEndpoint,
        trust: Credentials,
        cfg: &NodeConfig,
        metrics: PatchMetrics,
        record: Option<PatchRecord>,
    ) -> Self {
        PatchEngine {
            me: trust.identity.name.clone(),
            gossip,
            endpoint,
            trust,
            cfg: cfg.patch.clone(),
            checks: cfg.checks.clone(),
            health_interval: cfg.health.interval,
            metrics,
            record,
            restart: None,
        }
    }

    /// Lets the engine stop the agent (`agent`, its root shutdown token)
    /// to restart it into a build of itself that a patch selected.
    pub fn with_restart(mut self, agent: CancellationToken) -> Self {
        self.restart = Some(agent);
        self
    }

    /// What a patch command finds in its environment: the agent's own
    /// binary (`TRELLIS_NODE`) and its patch directory
    /// (`TRELLIS_PATCH_DIR`), for `"$TRELLIS_NODE" upgrade install FILE`.
    async fn run_step(&self, commands: &[String], dir: &Path) -> Result<(), String> {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("trellis-node"));
        let env = [
            (upgrade::ENV_NODE, exe.as_os_str()),
            (upgrade::ENV_PATCH_DIR, self.cfg.dir.as_os_str()),
        ];
        run_commands(commands, dir, &env, self.cfg.command_timeout).await
    }

    /// After a run's commands: if they selected another build of the agent,
    /// stops the agent so that it replaces itself with that build, and
    /// returns true. Where the agent may not restart, the run ends in
    /// `otherwise` instead.
    async fn restart_if_selected(&mut self, otherwise: PatchState) -> bool {
        let Ok(running) = std::env::current_exe() else {
            return false;
        };
        if !upgrade::restart_needed(&self.cfg.dir, &running) {
            return false;
        }
        match &self.restart {
            Some(agent) if upgrade::restart_allowed() => {
                info!(dir = %self.cfg.dir.display(), "the patch selected another build of trellis-node; restarting into it");
                upgrade::request_restart(&self.cfg.dir);
                agent.cancel();
            }
            _ => {
                let detail = "the patch selected another build of trellis-node, but this agent \
                              runs inside another process and cannot restart into it";
                self.to(otherwise, detail).await;
            }
        }
        true
    }

    /// The last run, as read at start or since changed.
    pub fn record(&self) -> Option<&PatchRecord> {
        self.record.as_ref()
    }

    /// Publishes the last run, resumes what a restart interrupted, then
    /// every second acts on the site's current order until `shutdown`. A
    /// command in progress finishes before shutdown is seen; a download or
    /// a bake stops at once (and starts over after a restart).
    pub async fn run(mut self, shutdown: CancellationToken) {
        // A build of the agent a patch installed that did not start.
        let failed_start = upgrade::take_failed_start(&self.cfg.dir).unwrap_or_else(|e| {
            error!(error = %e, "cannot read the agent's build selection");
            None
        });
        if let Some(found) = self.record.clone() {
            let (record, resume) = recover(found.clone());
            let changed = record.state != found.state;
            self.enter(record, changed).await;
            match (resume, failed_start) {
                (Resume::Bake, Some(why)) => self.to(PatchState::Failed, why).await,
                (Resume::Bake, None) => self.bake(&shutdown).await,
                (Resume::RollBack, _) => self.roll_back(None).await,
                (Resume::Publish, why) => {
                    if let Some(why) = why {
                        warn!(%why, "a build of trellis-node was given up at start");
                    }
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            let view = self.gossip.view().await;
            let order = current_order(&view);
            match decide(order.as_ref(), &self.me, self.record.as_ref()) {
                Step::Nothing => {}
                Step::Install { run, patch, relay } => {
                    self.install(run, patch, relay, &shutdown).await
                }
                Step::RollBack { .. } => self.roll_back(order.map(|(_, a)| a)).await,
                Step::Discard { .. } => {
                    if let Some(r) = &self.record {
                        let detail = if r.failed {
                            format!(
                                "nothing was installed, nothing to undo (failed: {})",
                                r.detail
                            )
                        } else {
                            "rolled back before anything was installed; nothing to undo".to_owned()
                        };
                        let next = r.to(PatchState::RolledBack, detail);
                        self.enter(next, true).await;
                    }
                }
            }
        }
    }

    /// Persists `record`, then publishes it and logs it; counts it if it is
    /// a `transition` (not a restart publishing the state it found).
    async fn enter(&mut self, record: PatchRecord, transition: bool) {
        if let Err(error) = save_record(&self.cfg.dir, &record) {
            error!(dir = %self.cfg.dir.display(), %error, "cannot record the patch state; a restart may repeat this step");
        }
        let value = record.published().encode();
        self.gossip
            .set(vec![(keys::STATE.to_owned(), value)], "")
            .await;
        if transition {
            self.metrics.entered(record.state);
        }
        let r = &record;
        let id = &hex32(&r.patch)[..16];
        match r.state {
            PatchState::Failed | PatchState::RollbackFailed => warn!(
                patch = %r.name, version = %r.version, id, run = r.run, state = %r.state,
                detail = %r.detail, "patch state"
            ),
            _ => info!(
                patch = %r.name, version = %r.version, id, run = r.run, state = %r.state,
                failed = r.failed, detail = %r.detail, "patch state"
            ),
        }
        self.record = Some(record);
    }

    /// Moves the current run to `state` with `detail`.
    async fn to(&mut self, state: PatchState, detail: impl Into<String>) {
        if let Some(r) = self.record.clone() {
            self.enter(r.to(state, detail), true).await;
        }
    }

    /// Downloads, verifies, installs and bakes run `run` of `patch`.
    async fn install(
        &mut self,
        run: u64,
        patch: [u8; 32],
        relay: SocketAddr,
        shutdown: &CancellationToken,
    ) {
        let mut started = PatchRecord::start(run, patch);
        if let Some(r) = self.record.as_ref().filter(|r| r.is(run, &patch)) {
            // Starting over a download a restart cut short: same run.
            started.name = r.name.clone();
            started.version = r.version.clone();
        }
        self.enter(started, true).await;
        let fetched = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            f = self.download(patch, relay) => f,
        };
        let manifest = match fetched {
            Ok(m) => m,
            Err(detail) => return self.to(PatchState::Failed, detail).await,
        };
        // The relay may have ordered a rollback while the node downloaded.
        let view = self.gossip.view().await;
        if let Some((o, _)) = current_order(&view)
            && o.run == run
            && o.patch == patch
            && o.action == OrderAction::Rollback
        {
            return self
                .to(
                    PatchState::RolledBack,
                    "rollback ordered before the install began; nothing installed",
                )
                .await;
        }
        // A check the node lacks fails the run before anything is run.
        if let Err(detail) = check_bounds(&manifest.checks, &self.checks, self.health_interval) {
            return self.to(PatchState::Failed, detail).await;
        }
        if let Some(r) = self.record.as_mut() {
            r.installed = true;
        }
        self.to(PatchState::Installing, "").await;
        let dir = artifact_dir(&self.cfg.dir, &patch);
        if let Err(detail) = self.run_step(&manifest.install, &dir).await {
            return self.to(PatchState::Failed, detail).await;
        }
        self.to(PatchState::Baking, "").await;
        // A self-upgrade: the new build bakes the run again from its start.
        if self.restart_if_selected(PatchState::Failed).await {
            return;
        }
        self.bake(shutdown).await;
    }

    /// Fetches and verifies the manifest, keeps it, and fetches every
    /// artifact into the patch's directory. The error is the detail to
    /// publish.
    async fn download(&mut self, id: [u8; 32], relay: SocketAddr) -> Result<PatchManifest, String> {
        let mut attempt = 0;
        let signed = loop {
            match fetch_patch(&self.endpoint, relay, id).await {
                Ok(s) => break s,
                Err(e) => {
                    attempt += 1;
                    if attempt >= MANIFEST_ATTEMPTS {
                        return Err(format!("cannot fetch the patch from {relay}: {e}"));
                    }
                    warn!(%relay, error = %e, "cannot fetch the patch manifest; will retry");
                    tokio::time::sleep(retry_delay(attempt)).await;
                }
            }
        };
        let (manifest, signer) = verify(&self.trust, &signed).map_err(|e| e.to_string())?;
        if let Some(r) = self.record.as_mut() {
            r.name = manifest.name.clone();
            r.version = manifest.version.clone();
        }
        info!(patch = %manifest.name, version = %manifest.version, %signer, artifacts = manifest.artifacts.len(), "fetching patch artifacts");
        let dir = self.cfg.dir.clone();
        let kept = manifest_path(&dir, &id);
        let bytes = postcard::to_stdvec(&signed).map_err(|e| e.to_string())?;
        write_atomic(&kept, &bytes, 0o600)
            .map_err(|e| format!("cannot keep the manifest at {}: {e}", kept.display()))?;
        remove_old_chunk_store(&dir);
        let into = artifact_dir(&dir, &id);
        for a in &manifest.artifacts {
            fetch_artifact(
                &self.endpoint,
                relay,
                a,
                &into.join(&a.name),
                ARTIFACT_ATTEMPTS,
            )
            .await
            .map_err(|e| format!("cannot fetch artifact {}: {e}", a.name))?;
        }
        Ok(manifest)
    }

    /// The manifest of the current run: the one kept on disk, checked
    /// again, or fetched again from `relay`.
    async fn manifest(&self, relay: Option<SocketAddr>) -> Result<PatchManifest, String> {
        let r = self.record.as_ref().ok_or("no patch run")?;
        let path = manifest_path(&self.cfg.dir, &r.patch);
        let kept = std::fs::read(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|b| {
                postcard::from_bytes::<SignedPatch>(&b)
                    .map_err(|e| format!("{} is damaged: {e}", path.display()))
            })
            .and_then(|s| {
                if s.id() == r.patch {
                    Ok(s)
                } else {
                    Err(format!("{} holds another patch", path.display()))
                }
            });
        let signed = match (kept, relay) {
            (Ok(s), _) => s,
            (Err(e), Some(relay)) => {
                warn!(error = %e, %relay, "the kept patch manifest is unusable; fetching it again");
                fetch_patch(&self.endpoint, relay, r.patch)
                    .await
                    .map_err(|f| format!("{e}; and {f}"))?
            }
            (Err(e), None) => return Err(e),
        };
        verify(&self.trust, &signed)
            .map(|(m, _)| m)
            .map_err(|e| e.to_string())
    }

    /// Bakes the current run: `healthy` or `failed`, or returns early on
    /// shutdown or a rollback order (left `baking` for the main loop, or a
    /// restart, to act on).
    async fn bake(&mut self, shutdown: &CancellationToken) {
        let manifest = match self.manifest(None).await {
            Ok(m) => m,
            Err(e) => {
                let detail = format!("cannot bake: the installed patch's manifest: {e}");
                return self.to(PatchState::Failed, detail).await;
            }
        };
        let bounds = match check_bounds(&manifest.checks, &self.checks, self.health_interval) {
            Ok(b) => b,
            Err(detail) => return self.to(PatchState::Failed, detail).await,
        };
        let bake = bake_time(manifest.bake, &bounds);
        let started = Instant::now();
        loop {
            let view = self.gossip.view().await;
            let order = current_order(&view);
            if let Step::RollBack { .. } = decide(order.as_ref(), &self.me, self.record.as_ref()) {
                return;
            }
            let own = view
                .current_members()
                .into_iter()
                .find(|m| m.name == self.me)
                .map(|m| m.health.checks.clone());
            match judge_bake(&bounds, own.as_ref(), started.elapsed(), bake) {
                Bake::Wait => {}
                Bake::Healthy => {
                    // A build of the agent on trial has proved itself.
                    if let Err(error) = upgrade::confirm(&self.cfg.dir) {
                        error!(%error, "cannot record that this build of trellis-node runs healthy");
                    }
                    return self.to(PatchState::Healthy, "").await;
                }
                Bake::Failed(detail) => return self.to(PatchState::Failed, detail).await,
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// Rolls the current run back (the manifest fetched again from `relay`
    /// if the kept one is unusable).
    async fn roll_back(&mut self, relay: Option<SocketAddr>) {
        // Why the run failed stays in the detail through the rollback.
        let before = self
            .record
            .as_ref()
            .filter(|r| r.failed)
            .map(|r| r.detail.clone());
        self.to(PatchState::RollingBack, before.clone().unwrap_or_default())
            .await;
        let manifest = match self.manifest(relay).await {
            Ok(m) => m,
            Err(e) => {
                let detail = format!("cannot roll back: the patch's manifest: {e}");
                return self.to(PatchState::RollbackFailed, detail).await;
            }
        };
        let Some(id) = self.record.as_ref().map(|r| r.patch) else {
            return;
        };
        let dir = artifact_dir(&self.cfg.dir, &id);
        match self.run_step(&manifest.rollback, &dir).await {
            Ok(()) => {
                let detail = before.map_or(String::new(), |d| format!("after: {d}"));
                self.to(PatchState::RolledBack, detail).await;
                // A self-upgrade undone: back to the build that ran before.
                self.restart_if_selected(PatchState::RollbackFailed).await;
            }
            Err(detail) => self.to(PatchState::RollbackFailed, detail).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;
    use crate::patchstate::MemberPatch;
    use crate::site::{Health, MemberView};

    const P: [u8; 32] = [7; 32];
    const Q: [u8; 32] = [8; 32];

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, i], 7901))
    }

    fn relay(name: &str, i: u8, alive: bool, order: Option<PatchOrder>) -> MemberView {
        MemberView {
            name: name.into(),
            generation: 1,
            gossip_addr: addr(i),
            alive,
            health: Health {
                role: Some(Role::Relay),
                ..Health::default()
            },
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: MemberPatch { order, state: None },
        }
    }

    fn order(run: u64, action: OrderAction, nodes: &[&str]) -> PatchOrder {
        PatchOrder {
            run,
            patch: P,
            action,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn install(run: u64, nodes: &[&str]) -> Option<(PatchOrder, SocketAddr)> {
        Some((order(run, OrderAction::Install, nodes), addr(1)))
    }

    fn rollback(run: u64) -> Option<(PatchOrder, SocketAddr)> {
        Some((order(run, OrderAction::Rollback, &[]), addr(1)))
    }

    fn record(run: u64, state: PatchState, installed: bool) -> PatchRecord {
        PatchRecord {
            state,
            installed,
            ..PatchRecord::start(run, P)
        }
    }

    #[test]
    fn the_order_followed_is_the_highest_run_of_an_alive_relay() {
        let mut node = relay("n1", 9, true, Some(order(9, OrderAction::Install, &["n1"])));
        node.health.role = Some(Role::Node);
        let view = SiteView {
            region: "eu".into(),
            site: "par".into(),
            members: vec![
                relay("r1", 1, true, Some(order(3, OrderAction::Install, &["n1"]))),
                relay("r2", 2, true, Some(order(4, OrderAction::Install, &["n1"]))),
                relay(
                    "r3",
                    3,
                    false,
                    Some(order(8, OrderAction::Install, &["n1"])),
                ),
                relay("r4", 4, true, None),
                node,
            ],
        };
        let (o, a) = current_order(&view).unwrap();
        assert_eq!((o.run, a), (4, addr(2)));
        assert_eq!(current_order(&SiteView::default()), None);
    }

    #[test]
    fn a_rollback_wins_over_an_install_of_the_same_run() {
        let view = SiteView {
            region: "eu".into(),
            site: "par".into(),
            members: vec![
                relay("r1", 1, true, Some(order(4, OrderAction::Install, &["n1"]))),
                relay("r2", 2, true, Some(order(4, OrderAction::Rollback, &[]))),
            ],
        };
        let (o, a) = current_order(&view).unwrap();
        assert_eq!((o.action, a), (OrderAction::Rollback, addr(2)));
    }

    #[test]
    fn a_node_named_in_an_install_order_installs_once_per_run() {
        let step = decide(install(3, &["n1", "n2"]).as_ref(), "n1", None);
        assert_eq!(
            step,
            Step::Install {
                run: 3,
                patch: P,
                relay: addr(1)
            }
        );
        assert_eq!(
            decide(install(3, &["n2"]).as_ref(), "n1", None),
            Step::Nothing
        );
        for state in PatchState::ALL {
            if state == PatchState::Downloading {
                continue;
            }
            let r = record(3, state, true);
            assert_eq!(
                decide(install(3, &["n1"]).as_ref(), "n1", Some(&r)),
                Step::Nothing,
                "{state}"
            );
        }
        assert_eq!(decide(None, "n1", None), Step::Nothing);
    }

    #[test]
    fn a_rolled_back_patch_installs_again_in_a_later_run_and_another_patch_too() {
        let r = record(3, PatchState::RolledBack, true);
        assert!(matches!(
            decide(install(4, &["n1"]).as_ref(), "n1", Some(&r)),
            Step::Install { run: 4, .. }
        ));
        let other = Some((
            PatchOrder {
                patch: Q,
                ..order(3, OrderAction::Install, &["n1"])
            },
            addr(1),
        ));
        assert!(matches!(
            decide(other.as_ref(), "n1", Some(&r)),
            Step::Install { patch: Q, .. }
        ));
    }

    #[test]
    fn a_download_cut_short_by_a_restart_starts_over() {
        let r = record(3, PatchState::Downloading, false);
        assert!(matches!(
            decide(install(3, &["n1"]).as_ref(), "n1", Some(&r)),
            Step::Install { run: 3, .. }
        ));
    }

    #[test]
    fn a_rollback_order_rolls_back_what_was_installed_in_that_run() {
        for state in [
            PatchState::Installing,
            PatchState::Baking,
            PatchState::Healthy,
            PatchState::Failed,
        ] {
            let r = record(3, state, true);
            assert_eq!(
                decide(rollback(3).as_ref(), "n1", Some(&r)),
                Step::RollBack { run: 3, patch: P },
                "{state}"
            );
        }
    }

    #[test]
    fn a_rollback_order_does_nothing_when_already_rolled_back_or_for_another_run() {
        for state in [
            PatchState::RollingBack,
            PatchState::RolledBack,
            PatchState::RollbackFailed,
        ] {
            let r = record(3, state, true);
            assert_eq!(
                decide(rollback(3).as_ref(), "n1", Some(&r)),
                Step::Nothing,
                "{state}"
            );
        }
        let r = record(3, PatchState::Healthy, true);
        assert_eq!(decide(rollback(4).as_ref(), "n1", Some(&r)), Step::Nothing);
        assert_eq!(decide(rollback(2).as_ref(), "n1", Some(&r)), Step::Nothing);
        assert_eq!(
            decide(rollback(3).as_ref(), "n1", None),
            Step::Nothing,
            "never installed"
        );
        let other = PatchRecord { patch: Q, ..r };
        assert_eq!(
            decide(rollback(3).as_ref(), "n1", Some(&other)),
            Step::Nothing
        );
    }

    #[test]
    fn a_run_that_failed_before_installing_is_discarded_without_commands() {
        let failed = PatchRecord {
            failed: true,
            detail: "bad signature".into(),
            ..record(3, PatchState::Failed, false)
        };
        assert_eq!(
            decide(rollback(3).as_ref(), "n1", Some(&failed)),
            Step::Discard { run: 3, patch: P }
        );
        let downloading = record(3, PatchState::Downloading, false);
        assert_eq!(
            decide(rollback(3).as_ref(), "n1", Some(&downloading)),
            Step::Discard { run: 3, patch: P }
        );
    }

    #[test]
    fn a_restart_turns_an_interrupted_install_into_a_failure_and_resumes_the_rest() {
        let (r, resume) = recover(record(3, PatchState::Installing, true));
        assert_eq!(resume, Resume::Publish);
        assert_eq!(r.state, PatchState::Failed);
        assert!(r.failed && r.installed);
        assert!(
            r.detail.contains("interrupted during install"),
            "{}",
            r.detail
        );
        let rolling = PatchRecord {
            failed: true,
            ..record(3, PatchState::RollingBack, true)
        };
        assert_eq!(recover(rolling.clone()), (rolling, Resume::RollBack));
        let baking = record(3, PatchState::Baking, true);
        assert_eq!(recover(baking.clone()), (baking, Resume::Bake));
        for state in [
            PatchState::Downloading,
            PatchState::Healthy,
            PatchState::Failed,
            PatchState::RolledBack,
            PatchState::RollbackFailed,
        ] {
            let r = record(3, state, true);
            assert_eq!(recover(r.clone()), (r, Resume::Publish), "{state}");
        }
    }

    #[test]
    fn a_failure_stays_a_failure_through_the_rollback() {
        let r = record(3, PatchState::Baking, true).to(PatchState::Failed, "check web is critical");
        assert!(r.failed);
        let back = r
            .to(PatchState::RollingBack, "")
            .to(PatchState::RolledBack, "");
        assert!(back.failed);
        assert_eq!(back.published().judged(), Some(false));
        let innocent = record(3, PatchState::Healthy, true).to(PatchState::RolledBack, "");
        assert!(!innocent.failed);
        let published = innocent.published();
        assert_eq!(
            (published.run, published.patch, published.state),
            (3, P, PatchState::RolledBack)
        );
    }

    fn check(name: &str, interval: u64, timeout: u64) -> CheckConfig {
        CheckConfig {
            name: name.into(),
            command: Some(vec!["true".into()]),
            http: None,
            tcp: None,
            interval: Duration::from_secs(interval),
            timeout: Duration::from_secs(timeout),
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_check_counts_after_its_interval_timeout_and_one_publication() {
        let b = check_bounds(
            &["web".into(), "disk".into()],
            &[check("web", 10, 5), check("db", 30, 5)],
            secs(2),
        )
        .unwrap();
        assert_eq!(
            b,
            BTreeMap::from([("disk".into(), secs(2)), ("web".into(), secs(17))])
        );
        assert_eq!(bake_time(secs(5), &b), secs(17), "at least one evaluation");
        assert_eq!(bake_time(secs(300), &b), secs(300));
        assert_eq!(bake_time(secs(0), &BTreeMap::new()), secs(0));
    }

    #[test]
    fn a_declared_check_the_node_lacks_is_named_in_the_failure() {
        let err = check_bounds(&["web".into()], &[check("db", 10, 5)], secs(2)).unwrap_err();
        assert!(
            err.contains("\"web\"") && err.contains("no such check"),
            "{err}"
        );
    }

    fn published(pairs: &[(&str, Status, &str)]) -> BTreeMap<String, CheckResult> {
        pairs
            .iter()
            .map(|(n, s, d)| (n.to_string(), CheckResult::new(*s, *d)))
            .collect()
    }

    #[test]
    fn a_bake_waits_then_is_healthy_when_every_declared_check_passes() {
        let b = BTreeMap::from([("web".to_owned(), secs(17))]);
        let ok = published(&[
            ("web", Status::Passing, ""),
            ("db", Status::Critical, "down"),
        ]);
        assert_eq!(judge_bake(&b, Some(&ok), secs(10), secs(60)), Bake::Wait);
        assert_eq!(judge_bake(&b, Some(&ok), secs(60), secs(60)), Bake::Healthy);
    }

    #[test]
    fn a_critical_check_fails_the_bake_at_once_but_only_once_its_result_is_fresh() {
        let b = BTreeMap::from([("web".to_owned(), secs(17))]);
        let bad = published(&[("web", Status::Critical, "HTTP 503")]);
        assert_eq!(
            judge_bake(&b, Some(&bad), secs(16), secs(300)),
            Bake::Wait,
            "may be from before the install"
        );
        assert_eq!(
            judge_bake(&b, Some(&bad), secs(17), secs(300)),
            Bake::Failed("check web is critical: HTTP 503".into())
        );
    }

    #[test]
    fn a_check_not_passing_at_the_end_of_the_bake_fails_it() {
        let b = BTreeMap::from([("web".to_owned(), secs(2))]);
        let warn = published(&[("web", Status::Warning, "slow")]);
        assert_eq!(judge_bake(&b, Some(&warn), secs(30), secs(60)), Bake::Wait);
        assert_eq!(
            judge_bake(&b, Some(&warn), secs(60), secs(60)),
            Bake::Failed("check web is warning at the end of the bake: slow".into())
        );
        assert_eq!(
            judge_bake(&b, Some(&BTreeMap::new()), secs(60), secs(60)),
            Bake::Failed("check web has no published result at the end of the bake".into())
        );
        assert_eq!(
            judge_bake(&b, None, secs(60), secs(60)),
            Bake::Failed("check web has no published result at the end of the bake".into())
        );
    }

    #[test]
    fn a_failed_command_is_reported_with_its_status_and_the_end_of_its_output() {
        let o = ReloadOutcome {
            command: "sh install.sh".into(),
            exit_code: Some(3),
            timed_out: false,
            output: format!("{}dpkg: error: broken package\n", "x".repeat(3000)),
            duration_ms: 5,
        };
        let d = command_failure(&o);
        assert!(
            d.starts_with("`sh install.sh` exited with status 3: "),
            "{d}"
        );
        assert!(d.ends_with("dpkg: error: broken package"), "{d}");
        assert!(d.len() <= MAX_RESULT_DETAIL, "{}", d.len());
        let t = ReloadOutcome {
            timed_out: true,
            exit_code: None,
            output: String::new(),
            ..o
        };
        assert_eq!(
            command_failure(&t),
            "`sh install.sh` timed out and was killed"
        );
    }

    #[test]
    fn the_record_survives_the_state_file_and_a_damaged_one_is_moved_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("patches");
        assert_eq!(load_record(&dir).unwrap(), None, "no directory yet");
        let r = PatchRecord {
            name: "openssl-fix".into(),
            version: "3.0.13-2".into(),
            failed: true,
            detail: "`sh install.sh` exited with status 1".into(),
            ..record(5, PatchState::Failed, true)
        };
        save_record(&dir, &r).unwrap();
        assert_eq!(load_record(&dir).unwrap(), Some(r));
        let text = std::fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains(&hex32(&P)), "{text}");
        std::fs::write(dir.join(STATE_FILE), b"{\"run\": 5, \"pat").unwrap();
        assert_eq!(load_record(&dir).unwrap(), None);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("state.corrupt-"), "{names:?}");
    }

    #[tokio::test]
    async fn commands_run_in_order_in_the_artifact_directory_and_stop_at_the_first_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("install.sh"), "echo installed > marker\n").unwrap();
        let cmds = vec![
            "sh install.sh".to_owned(),
            "echo second \"$TRELLIS_NODE\" >> marker".to_owned(),
        ];
        let env = [(
            upgrade::ENV_NODE,
            std::ffi::OsStr::new("/usr/bin/trellis-node"),
        )];
        run_commands(&cmds, dir, &env, secs(10)).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("marker")).unwrap(),
            "installed\nsecond /usr/bin/trellis-node\n"
        );
        let failing = vec![
            "rm marker".to_owned(),
            "echo cannot stop service >&2; exit 4".to_owned(),
            "touch never".to_owned(),
        ];
        let err = run_commands(&failing, dir, &[], secs(10))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            "`echo cannot stop service >&2; exit 4` exited with status 4: cannot stop service"
        );
        assert!(!dir.join("marker").exists(), "the first command ran");
        assert!(!dir.join("never").exists(), "nothing runs after a failure");
    }

    #[tokio::test]
    async fn a_command_running_past_its_timeout_fails_the_step() {
        let tmp = tempfile::tempdir().unwrap();
        let err = run_commands(
            &["sleep 5".to_owned()],
            tmp.path(),
            &[],
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert_eq!(err, "`sleep 5` timed out and was killed");
    }
}
