//! The node agent: binds the endpoint, joins the site's gossip, and
//! publishes its health on every tick until shut down; keeps the files
//! Trellis manages on the node as they were applied.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::apply::{Applier, ApplyReport, DriftOutcome};
use crate::authz::Protocol;
use crate::config::{
    ApplyConfig, CheckConfig, GossipConfig, HealthConfig, MetricsConfig, NodeConfig,
};
use crate::desired::NodeFacts;
use crate::distribute::{self, ConfigResult, DriftAction, DriftNote, Offer, Outcome};
use crate::endpoint::MeshEndpoint;
use crate::foresight::Foresight;
use crate::gossip::Gossip;
use crate::health::{self, Checks, ResourceSampler};
use crate::managed::{ManagedState, short_hex};
use crate::metrics::{self, CheckMetrics, ConfigMetrics, MeshMetrics, PatchMetrics, Registry};
use crate::patching::PatchEngine;
use crate::site::{Health, SiteView, descriptor_kv};
use crate::tls::Credentials;

/// Why a member could not start. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    #[error("cannot serve metrics on {addr}: {source} (set [metrics] listen, or enabled = false)")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot join gossip: {0}")]
    Gossip(anyhow::Error),
    /// What the node applied before could not be read.
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    /// The node's last patch run could not be read.
    #[error(transparent)]
    Patch(#[from] crate::patching::PatchingError),
    /// The member's own certificate was decommissioned: starting again
    /// would only be refused by every peer.
    #[error(
        "this member was decommissioned ({reason}); its certificate is refused everywhere. \
         To bring the machine back, issue it a new certificate"
    )]
    Decommissioned { reason: String },
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// The exit status: 2 for what a restart cannot fix (a decommissioned
    /// certificate, like a bad configuration), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Decommissioned { .. } => crate::cli::EXIT_USAGE,
            _ => crate::cli::EXIT_FAILED,
        }
    }
}

/// Binds `/metrics` if enabled and serves `registry` until `shutdown`.
pub async fn serve_metrics(
    cfg: &MetricsConfig,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, StartError> {
    if !cfg.enabled {
        return Ok(None);
    }
    let want = cfg.listen_addr();
    let listener = tokio::net::TcpListener::bind(want)
        .await
        .map_err(|source| StartError::Metrics { addr: want, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartError::Metrics { addr: want, source })?;
    tokio::spawn(async move {
        if let Err(error) = metrics::serve(listener, registry, shutdown).await {
            warn!(%error, "metrics server stopped");
        }
    });
    Ok(Some(addr))
}

/// Checks other tasks publish with the member's health (a node's
/// `runbook:NAME`), by name.
pub type ExtraChecks = Arc<std::sync::Mutex<BTreeMap<String, crate::site::CheckResult>>>;

/// Samples health and publishes it in gossip every `cfg.interval` until
/// `shutdown`, with the findings of [`Foresight`] (`cert_not_after`: the
/// member's certificate's expiry, seconds since the epoch) and the
/// `extra` checks, and hands it to `published`; keeps the membership
/// gauges current.
#[allow(clippy::too_many_arguments)]
pub async fn publish_health_loop(
    gossip: Arc<Gossip>,
    role: crate::id::Role,
    cfg: HealthConfig,
    checks: Checks,
    metrics: MeshMetrics,
    cert_not_after: Option<i64>,
    extra: ExtraChecks,
    published_tx: watch::Sender<Health>,
    shutdown: CancellationToken,
) {
    let mut sampler = ResourceSampler::new();
    let mut tick = crate::clock::ticker(cfg.interval);
    let mut published: Option<crate::site::Status> = None;
    let mut steady = health::Steady::default();
    let mut foresight = Foresight::new(cfg.foresight.clone(), cert_not_after);
    let mut raised: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        // sysinfo reads /proc synchronously, and foresight sorts its
        // histories now and then; keep both off the async threads.
        let (s, f, resources) = tokio::task::spawn_blocking(move || {
            let (r, o) = sampler.observe();
            foresight.observe(crate::clock::unix_ms(), &o);
            (sampler, foresight, r)
        })
        .await
        .expect("sampler does not panic");
        (sampler, foresight) = (s, f);
        let resources = steady.damp(&resources, std::time::Instant::now(), &cfg);
        let mut results = checks.results();
        results.extend(
            foresight
                .checks()
                .iter()
                .map(|(n, r)| (n.clone(), r.clone())),
        );
        let now_raised: Vec<String> = foresight
            .checks()
            .iter()
            .filter(|(_, r)| r.status != crate::site::Status::Passing)
            .map(|(n, _)| n.clone())
            .collect();
        if now_raised != raised {
            for (name, r) in foresight.checks() {
                if raised.contains(name) != now_raised.contains(name) {
                    info!(finding = %name, status = %r.status, detail = %r.detail, "foresight");
                }
            }
            raised = now_raised;
        }
        results.extend(
            extra
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(n, r)| (n.clone(), r.clone())),
        );
        let health = health::assess(role, &resources, &results, &cfg);
        gossip.publish(&health).await;
        published_tx.send_replace(health.clone());
        if published != Some(health.status) {
            let checks: Vec<&str> = health
                .checks
                .iter()
                .filter(|(_, c)| c.status != crate::site::Status::Passing)
                .map(|(name, _)| name.as_str())
                .collect();
            info!(status = %health.status, ?checks, "published this member's health status");
            published = Some(health.status);
        }
        let view = gossip.view().await;
        let current = view.current_members();
        let alive = current.iter().filter(|m| m.alive).count();
        metrics.gossip_members_alive.set(alive as i64);
        metrics
            .gossip_members_dead
            .set((current.len() - alive) as i64);
    }
}

/// What every member of a site's gossip runs, nodes and relays alike: the
/// endpoint (serving gossip), the user checks, the gossip itself and the
/// task that publishes health.
pub struct SiteMember {
    pub endpoint: MeshEndpoint,
    pub gossip: Arc<Gossip>,
    /// Accepted connections of the protocols served besides gossip.
    pub routes: crate::endpoint::Routes,
    /// The health last published.
    pub health: watch::Receiver<Health>,
    /// Checks published with the member's own (see [`ExtraChecks`]).
    pub extra_checks: ExtraChecks,
    health_task: JoinHandle<()>,
}

impl SiteMember {
    /// Binds the endpoint (serving what [`crate::authz::served_by`] says
    /// the member's role serves), starts the checks, joins gossip and
    /// starts publishing health, with the member's `labels` and its
    /// machine's facts ([`machine_facts`]).
    /// Registers the mesh metrics into `registry`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        creds: Credentials,
        labels: &BTreeMap<String, String>,
        gossip: &GossipConfig,
        health_cfg: &HealthConfig,
        checks: &[CheckConfig],
        registry: &mut Registry,
        shutdown: &CancellationToken,
    ) -> Result<Self, StartError> {
        let role = creds.identity.role;
        let cert_not_after = crate::enrol::not_after(creds.cert_der()).ok();
        let mesh_metrics = MeshMetrics::register(registry);
        let (endpoint, mut routes) = MeshEndpoint::bind(
            creds,
            gossip.listen_addr(),
            crate::authz::served_by(role),
            mesh_metrics.clone(),
        )?;
        let checks = Checks::start(
            checks,
            CheckMetrics::register(registry),
            shutdown.child_token(),
        );
        let first = health::assess(role, &Default::default(), &checks.results(), health_cfg);
        let site_gossip = Gossip::start(
            endpoint.clone(),
            routes.take(Protocol::Gossip),
            &gossip.settings(),
            &first,
            shutdown.child_token(),
        )
        .await
        .map_err(StartError::Gossip)?;
        // Set once: they do not change while the process runs.
        site_gossip
            .set(descriptor_kv(labels, &machine_facts()), "")
            .await;
        let site_gossip = Arc::new(site_gossip);
        let extra_checks = ExtraChecks::default();
        let (health_tx, health) = watch::channel(first);
        let health_task = tokio::spawn(publish_health_loop(
            site_gossip.clone(),
            role,
            health_cfg.clone(),
            checks,
            mesh_metrics,
            cert_not_after,
            extra_checks.clone(),
            health_tx,
            shutdown.child_token(),
        ));
        Ok(SiteMember {
            endpoint,
            gossip: site_gossip,
            routes,
            health,
            extra_checks,
            health_task,
        })
    }

    /// Waits for the health task to end (after shutdown), then leaves
    /// gossip and closes the endpoint.
    pub async fn stopped(self) {
        let _ = self.health_task.await;
        if let Ok(gossip) = Arc::try_unwrap(self.gossip) {
            gossip.shutdown().await;
        }
        self.endpoint.shutdown().await;
    }
}

/// Facts about this machine that configuration templates and selectors
/// may use: `hostname`, `os` and `arch`.
pub fn machine_facts() -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    if let Some(h) = sysinfo::System::host_name().ok().filter(|h| !h.is_empty()) {
        facts.insert("hostname".to_owned(), h);
    }
    facts.insert("os".to_owned(), std::env::consts::OS.to_owned());
    facts.insert("arch".to_owned(), std::env::consts::ARCH.to_owned());
    facts.insert(
        VERSION_FACT.to_owned(),
        crate::upgrade::version().to_owned(),
    );
    facts
}

/// The fact naming the Trellis version a member runs.
pub const VERSION_FACT: &str = "trellis_version";

/// What the task owning the node's [`Applier`] is asked to do.
enum ApplyInput {
    Apply {
        state: ManagedState,
        reply: oneshot::Sender<ApplyReport>,
    },
}

/// Hands states to apply to the task that owns the node's [`Applier`], so
/// that applies and drift checks never run at the same time.
#[derive(Clone)]
pub struct ApplyHandle {
    tx: mpsc::Sender<ApplyInput>,
}

impl ApplyHandle {
    /// Makes the node hold `state` (after a drift check in progress ends);
    /// `None` once the agent has stopped.
    pub async fn apply(&self, state: ManagedState) -> Option<ApplyReport> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(ApplyInput::Apply { state, reply })
            .await
            .ok()?;
        rx.await.ok()
    }
}

/// Owns the node's [`Applier`]: applies what it is handed and, every
/// `cfg.drift_interval` once something was applied, checks the managed files
/// for drift. An apply or check in progress finishes before shutdown is
/// seen: a file half-healed or a reload killed half-way is worse than a
/// late stop. Publishes in gossip what the node holds
/// ([`distribute::keys::APPLIED`]) and each drifted file
/// ([`distribute::keys::DRIFT_PREFIX`]).
async fn config_loop(
    mut applier: Applier,
    cfg: ApplyConfig,
    mut inputs: mpsc::Receiver<ApplyInput>,
    gossip: Arc<Gossip>,
    metrics: ConfigMetrics,
    runbooks: watch::Sender<Vec<crate::runbook::Runbook>>,
    shutdown: CancellationToken,
) {
    let mut tick = crate::clock::ticker(cfg.drift_interval);
    let mut open = true;
    let mut drift = DriftNotes::default();
    publish_applied(&gossip, &applier, None).await;
    let runbooks_of = |a: &Applier| -> Vec<crate::runbook::Runbook> {
        a.applied()
            .map(|s| s.runbooks.values().cloned().collect())
            .unwrap_or_default()
    };
    runbooks.send_replace(runbooks_of(&applier));
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            input = inputs.recv(), if open => match input {
                Some(ApplyInput::Apply { state, reply }) => {
                    let report = applier.apply(&state, cfg.reload_timeout).await;
                    log_apply(&report);
                    let result = ConfigResult {
                        version: report.version,
                        outcome: if report.ok { Outcome::Ok } else { Outcome::Failed },
                        detail: result_detail(&report),
                    };
                    metrics.result(result.outcome);
                    publish_applied(&gossip, &applier, Some(result)).await;
                    let now = runbooks_of(&applier);
                    if *runbooks.borrow() != now {
                        runbooks.send_replace(now);
                    }
                    let _ = reply.send(report);
                }
                None => open = false,
            },
            _ = tick.tick() => {
                if applier.applied().is_none() {
                    continue;
                }
                match applier.check_drift(cfg.drift, cfg.reload_timeout).await {
                    Ok(outcomes) => {
                        outcomes.iter().for_each(|o| note_drift(o, &metrics));
                        if drift.update(&outcomes) {
                            gossip.set(drift.kv(), distribute::keys::DRIFT_PREFIX).await;
                        }
                    }
                    Err(error) => warn!(%error, "cannot check the managed files for drift"),
                }
            }
        }
    }
}

/// Publishes what the node holds and, after an apply, how it went: in one
/// change, so that nobody sees the new version held without its result.
async fn publish_applied(gossip: &Gossip, applier: &Applier, result: Option<ConfigResult>) {
    let mut kv = Vec::new();
    if let Some(s) = applier.applied() {
        let value = format!("{} {}", s.version, crate::managed::short_hex(&s.hash()));
        kv.push((distribute::keys::APPLIED.to_owned(), value));
    }
    if let Some(r) = result {
        kv.push((distribute::keys::RESULT.to_owned(), r.encode()));
    }
    if !kv.is_empty() {
        gossip.set(kv, "").await;
    }
}

/// The last drift of each managed file, as published in gossip.
#[derive(Default)]
struct DriftNotes {
    n: u64,
    notes: BTreeMap<String, DriftNote>,
}

impl DriftNotes {
    /// Folds one drift check in: a note per drifted file, and open notes of
    /// files found as applied again removed. Returns whether anything
    /// changed.
    fn update(&mut self, outcomes: &[DriftOutcome]) -> bool {
        let before = self.notes.clone();
        self.notes
            .retain(|path, d| !d.open() || outcomes.iter().any(|o| &o.report.path == path));
        for o in outcomes {
            let r = &o.report;
            let action = match (o.healed, o.error.is_some()) {
                (true, _) => DriftAction::Healed,
                (false, true) => DriftAction::Unhealed,
                (false, false) => DriftAction::Reported,
            };
            // A file that stays drifted in report mode is noted once, not
            // renumbered on every check.
            if let Some(d) = self.notes.get(&r.path)
                && d.action == action
                && action != DriftAction::Healed
                && d.found == r.found_sha256
            {
                continue;
            }
            self.n += 1;
            self.notes.insert(
                r.path.clone(),
                DriftNote {
                    n: self.n,
                    action,
                    path: r.path.clone(),
                    expected: r.expected_sha256.clone(),
                    found: r.found_sha256.clone(),
                    size: r.found_size,
                },
            );
        }
        self.notes != before
    }

    fn kv(&self) -> Vec<(String, String)> {
        self.notes
            .iter()
            .map(|(p, d)| (format!("{}{p}", distribute::keys::DRIFT_PREFIX), d.encode()))
            .collect()
    }
}

/// Where a node keeps the revocation list it last enforced.
pub fn revocations_path(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("revocations")
}

/// Keeps `set` for the next start; a failure is logged (the list comes
/// back from the relay within seconds of a start anyway).
fn keep_revocations(path: &std::path::Path, set: &crate::revocation::RevocationSet) {
    let bytes = postcard::to_stdvec(&set.signed()).expect("revocations serialise");
    let kept = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| crate::apply::write_atomic(path, &bytes, 0o600));
    if let Err(error) = kept {
        warn!(path = %path.display(), %error, "cannot keep the revocation list for the next start");
    }
}

/// The entry that decommissions this member's own certificate, if any.
fn own_decommission<'a>(
    set: &'a crate::revocation::RevocationSet,
    creds: &Credentials,
) -> Option<&'a crate::revocation::Revocation> {
    let own = crate::revocation::fingerprint(creds.cert_der());
    set.get(&own)
        .filter(|r| r.kind == crate::revocation::Kind::Decommissioned)
}

/// Takes back the revocation list kept at `path` (entries checked against
/// the CA again; a missing or unreadable file is an empty list, logged),
/// enforces it, and refuses to start a member whose own certificate it
/// decommissions.
pub fn restore_revocations(path: &std::path::Path, creds: &Credentials) -> Result<(), StartError> {
    use crate::revocation::{RevocationSet, SignedRevocation};
    let list: Vec<SignedRevocation> = match std::fs::read(path) {
        Ok(bytes) => match postcard::from_bytes(&bytes) {
            Ok(list) => list,
            Err(error) => {
                warn!(path = %path.display(), %error, "kept revocation list unreadable; starting without it until the relay sends it");
                return Ok(());
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read the kept revocation list; starting without it until the relay sends it");
            return Ok(());
        }
    };
    let now = (crate::clock::unix_ms() / 1000) as i64;
    let (set, _) = RevocationSet::verified(creds.ca_der(), &list, now);
    if let Some(r) = own_decommission(&set, creds) {
        return Err(StartError::Decommissioned {
            reason: r.reason.clone(),
        });
    }
    if !set.is_empty() {
        info!(
            entries = set.len(),
            "revocation list taken back from the last run"
        );
    }
    creds.revocations().replace(set);
    Ok(())
}

/// How often a node reads the revocation list its relay publishes.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);

/// Makes the revocations the site's relay publishes in gossip the set
/// this node enforces, until shutdown. Every entry's CA signature is
/// checked, so a member that publishes one cannot forge it. A node that
/// finds itself decommissioned stops (cancels `shutdown`).
async fn follow_revocations(
    gossip: Arc<Gossip>,
    creds: Credentials,
    kept: std::path::PathBuf,
    shutdown: CancellationToken,
) {
    use crate::revocation::{self, RevocationSet};
    let mut tick = tokio::time::interval(REVOCATION_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut values = gossip.values(revocation::GOSSIP_KEY).await;
        values.sort();
        if values == last {
            continue;
        }
        let mut all = Vec::new();
        for v in &values {
            match revocation::from_gossip(v) {
                Ok(list) => all.extend(list),
                Err(error) => warn!(%error, "revocation list in gossip ignored"),
            }
        }
        last = values;
        let now = (crate::clock::unix_ms() / 1000) as i64;
        let (set, errors) = RevocationSet::verified(creds.ca_der(), &all, now);
        for error in errors {
            warn!(%error, "revocation in gossip ignored");
        }
        keep_revocations(&kept, &set);
        if let Some(r) = own_decommission(&set, &creds) {
            error!(
                reason = %r.reason,
                "this node was decommissioned: leaving the site and stopping (its certificate is refused from now on)"
            );
            creds.revocations().replace(set);
            shutdown.cancel();
            return;
        }
        creds.revocations().replace(set);
    }
}

/// Where a member renews its certificate.
pub enum RenewFrom {
    /// A relay of the node's site that publishes its enrolment address in
    /// gossip.
    SiteRelays(Arc<Gossip>),
    /// A hub's enrolment endpoint (`[renewal] hub`, host:port), for relays.
    Hub(String),
}

/// Renews the node's certificate through a relay of its site that serves
/// enrolment (found in gossip, [`crate::enrol::GOSSIP_KEY`]) once it
/// expires within `renew_before`, then stops the agent (`shutdown`, its
/// root token) so that it starts again on the new certificate; looks every
/// `check_every` (first after 5 s at most).
pub async fn renew_certificate(
    from: RenewFrom,
    creds: Credentials,
    files: crate::enrol::IdentityFiles,
    cfg: crate::config::RenewalConfig,
    shutdown: CancellationToken,
) {
    let expires = match crate::enrol::not_after(creds.cert_der()) {
        Ok(t) => t,
        Err(error) => {
            warn!(%error, "cannot read this node's certificate expiry; it will not be renewed");
            return;
        }
    };
    let mut wait = cfg.check_every.min(Duration::from_secs(5));
    let mut told = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = cfg.check_every;
        let left = expires - (crate::clock::unix_ms() / 1000) as i64;
        if left > cfg.renew_before.as_secs() as i64 {
            continue;
        }
        let relays: Vec<SocketAddr> = match &from {
            RenewFrom::SiteRelays(gossip) => gossip
                .values(crate::enrol::GOSSIP_KEY)
                .await
                .iter()
                .filter_map(|v| v.parse().ok())
                .collect(),
            RenewFrom::Hub(addr) => std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .map(|a| a.take(1).collect())
                .unwrap_or_default(),
        };
        if relays.is_empty() && !told {
            warn!(
                expires_in_s = left,
                "this member's certificate expires soon and nothing serves its renewal (a relay's [enrol] listen, or [renewal] hub)"
            );
            told = true;
        }
        for relay in relays {
            match crate::enrol::renew(relay, &creds, &files).await {
                Ok(until) => {
                    if crate::upgrade::restart_allowed() {
                        info!(until, %relay, "certificate renewed; starting again on it");
                        crate::upgrade::request_reexec();
                        shutdown.cancel();
                    } else {
                        info!(until, %relay, "certificate renewed; it is used from the agent's next start");
                    }
                    return;
                }
                Err(error) => {
                    warn!(%relay, %error, expires_in_s = left, "certificate not renewed; will try again")
                }
            }
        }
    }
}

/// How often a node looks for a newer configuration offer in gossip.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(1);
/// Longest wait between fetches after failures.
const MAX_FETCH_BACKOFF: Duration = Duration::from_secs(30);

/// The offer a node should act on: the newest offered by an alive relay of
/// its site, if newer than what the node applied and not the one it last
/// tried (a version refused or failed is not tried again; a newer one is).
pub fn wanted_offer(
    view: &SiteView,
    applied: Option<u64>,
    tried: Option<&Offer>,
) -> Option<(Offer, SocketAddr)> {
    view.current_members()
        .into_iter()
        .filter(|m| m.alive && m.is_relay())
        .filter_map(|m| m.config.offer.map(|o| (o, m.gossip_addr)))
        .max_by_key(|(o, _)| *o)
        .filter(|(o, _)| applied.is_none_or(|a| o.version > a) && tried != Some(o))
}

/// What the task that follows the relay's offers needs.
struct Follower {
    gossip: Arc<Gossip>,
    endpoint: MeshEndpoint,
    /// Holds the mesh CA that operators' certificates must chain to.
    trust: Credentials,
    me: NodeFacts,
    /// `[config] root`.
    root: Option<std::path::PathBuf>,
    apply: ApplyHandle,
    metrics: ConfigMetrics,
}

impl Follower {
    /// Watches the site's gossip for a newer version, fetches it from the
    /// relay that offers it, verifies and applies it, and publishes how it
    /// went ([`distribute::keys::RESULT`]).
    async fn run(self, mut applied: Option<u64>, shutdown: CancellationToken) {
        let mut tried: Option<Offer> = None;
        let mut wait = FOLLOW_INTERVAL;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = FOLLOW_INTERVAL;
            let view = self.gossip.view().await;
            let Some((offer, relay)) = wanted_offer(&view, applied, tried.as_ref()) else {
                continue;
            };
            let signed = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                f = distribute::fetch(&self.endpoint, relay, offer) => f,
            };
            let signed = match signed {
                Ok(s) => s,
                Err(error) => {
                    self.metrics.fetch_errors.inc();
                    warn!(version = offer.version, %relay, %error, "cannot fetch the offered configuration; will retry");
                    wait = (wait * 2)
                        .max(Duration::from_secs(2))
                        .min(MAX_FETCH_BACKOFF);
                    continue;
                }
            };
            tried = Some(offer);
            let Some(result) = self.attempt(offer, &signed, &mut applied).await else {
                break; // the config task stopped: shutting down
            };
            // An apply's result is published by the config task, with the
            // version held; a refusal changes nothing held.
            if result.outcome == Outcome::Refused {
                self.metrics.result(result.outcome);
                self.gossip
                    .set(
                        vec![(distribute::keys::RESULT.to_owned(), result.encode())],
                        "",
                    )
                    .await;
            }
        }
    }

    /// Verifies, resolves and applies one bundle; `None` if the task that
    /// applies has stopped.
    async fn attempt(
        &self,
        offer: Offer,
        signed: &crate::bundle::SignedBundle,
        applied: &mut Option<u64>,
    ) -> Option<ConfigResult> {
        let refused = |detail: String| {
            warn!(version = offer.version, reason = %detail, "configuration refused; nothing applied");
            Some(ConfigResult {
                version: offer.version,
                outcome: Outcome::Refused,
                detail,
            })
        };
        let (bundle, signer) = match crate::bundle::verify(&self.trust, signed) {
            Ok(b) => b,
            Err(e) => return refused(e.to_string()),
        };
        if bundle.version != offer.version {
            return refused(format!(
                "the relay announced version {} but the bundle signed by {signer} is version {}",
                offer.version, bundle.version
            ));
        }
        let state = match bundle.fleet.resolve(&self.me, bundle.version) {
            Ok(s) => match &self.root {
                Some(root) => s.under(root),
                None => s,
            },
            Err(e) => return refused(format!("cannot resolve this node's files: {e}")),
        };
        info!(version = bundle.version, %signer, comment = %bundle.comment, files = state.files.len(), "applying configuration");
        let report = self.apply.apply(state).await?;
        if report.ok || !report.written.is_empty() || !report.reloads.is_empty() {
            *applied = Some(bundle.version);
        }
        Some(ConfigResult {
            version: bundle.version,
            outcome: if report.ok {
                Outcome::Ok
            } else {
                Outcome::Failed
            },
            detail: result_detail(&report),
        })
    }
}

/// What a node says about an apply that did not go well: the error, then
/// the end of the first failed reload command's output (what an operator
/// needs to see first), within [`distribute::MAX_RESULT_DETAIL`].
fn result_detail(report: &ApplyReport) -> String {
    let mut detail = report.error.clone().unwrap_or_default();
    if let Some(failed) = report.reloads.iter().find(|r| !r.succeeded()) {
        let output = failed.output.trim();
        if !output.is_empty() {
            let room = distribute::MAX_RESULT_DETAIL.saturating_sub(detail.len() + 10);
            let mut start = output.len().saturating_sub(room.max(80));
            while !output.is_char_boundary(start) {
                start += 1;
            }
            detail = format!("output: {}; {detail}", &output[start..]);
        }
    }
    detail
}

fn log_apply(r: &ApplyReport) {
    let hash = r.hash.get(..16).unwrap_or(&r.hash);
    if r.ok {
        info!(
            version = r.version,
            hash,
            written = r.written.len(),
            reloads = r.reloads.len(),
            unmanaged = ?r.unmanaged,
            "configuration applied"
        );
    } else {
        warn!(
            version = r.version,
            hash,
            written = r.written.len(),
            error = r.error.as_deref().unwrap_or_default(),
            "configuration not fully applied"
        );
    }
}

/// Logs a drifted file with what was expected and found, and counts it.
fn note_drift(o: &DriftOutcome, metrics: &ConfigMetrics) {
    metrics.drifted(o.healed);
    let r = &o.report;
    let mode = |m: u32| format!("{m:o}");
    warn!(
        path = %r.path,
        expected_sha256 = %r.expected_sha256,
        found_sha256 = r.found_sha256.as_deref().unwrap_or("missing"),
        expected_size = r.expected_size,
        found_size = ?r.found_size,
        expected_mode = %mode(r.expected_mode),
        found_mode = %r.found_mode.map_or("missing".to_owned(), mode),
        action = if o.healed { "healed" } else { "reported" },
        error = o.error.as_deref(),
        "managed file drifted"
    );
    for reload in o.reloads.iter().filter(|x| !x.succeeded()) {
        warn!(
            path = %r.path,
            command = %reload.command,
            exit_code = ?reload.exit_code,
            timed_out = reload.timed_out,
            output = %reload.output,
            "reload command after healing failed"
        );
    }
}

/// A running node agent.
pub struct NodeAgent {
    member: SiteMember,
    metrics_addr: Option<SocketAddr>,
    apply: ApplyHandle,
    config_task: JoinHandle<()>,
    follow_task: JoinHandle<()>,
    patch_task: JoinHandle<()>,
    runbook_task: JoinHandle<()>,
}

impl NodeAgent {
    /// Starts the agent: endpoint, gossip, checks, metrics, and the task
    /// that keeps the managed files as applied (reading what was applied
    /// before from `config.state_dir`), and the patch engine (reading the
    /// last patch run from `patch.dir`). Returns once everything is bound;
    /// runs until `shutdown` is cancelled.
    pub async fn start(
        creds: Credentials,
        mut cfg: NodeConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        // Labels its join token gave the node, under the configuration's.
        if let Some(cert) = cfg.identity.cert.clone() {
            let given = crate::enrol::enrolled_labels(&cert).map_err(StartError::Other)?;
            for (k, v) in given {
                cfg.node.labels.entry(k).or_insert(v);
            }
        }
        let applier = Applier::open(&cfg.config.state_dir)?;
        let patch_run = crate::patching::load_record(&cfg.patch.dir)?;
        // Before joining: a node restarted while its relay is away still
        // refuses what was revoked, and a decommissioned one stays out.
        let kept_revocations = revocations_path(&cfg.config.state_dir);
        restore_revocations(&kept_revocations, &creds)?;
        let mut registry = Registry::default();
        let trust = creds.clone();
        let me = NodeFacts {
            name: creds.identity.name.clone(),
            region: creds.identity.region.clone(),
            site: creds.identity.site.clone(),
            labels: cfg.node.labels.clone(),
            facts: machine_facts(),
        };
        let member = SiteMember::start(
            creds,
            &cfg.node.labels,
            &cfg.gossip,
            &cfg.health,
            &cfg.checks,
            &mut registry,
            &shutdown,
        )
        .await?;
        // A relay takes its list from the hubs; a node from its relay. With
        // the node's own token: a decommissioned node stops.
        tokio::spawn(follow_revocations(
            member.gossip.clone(),
            trust.clone(),
            kept_revocations,
            shutdown.clone(),
        ));
        tokio::spawn(renew_certificate(
            RenewFrom::SiteRelays(member.gossip.clone()),
            trust.clone(),
            cfg.identity.files(),
            cfg.renewal.clone(),
            shutdown.clone(),
        ));
        let config_metrics = ConfigMetrics::register(&mut registry);
        let runbook_metrics = crate::remediate::RunbookMetrics::register(&mut registry);
        let patches = PatchEngine::new(
            member.gossip.clone(),
            member.endpoint.clone(),
            trust.clone(),
            &cfg,
            PatchMetrics::register(&mut registry),
            patch_run,
        )
        .with_restart(shutdown.clone());
        let metrics_addr =
            serve_metrics(&cfg.metrics, Arc::new(registry), shutdown.child_token()).await?;
        let applied = applier.applied().map(|s| (s.version, short_hex(&s.hash())));
        let (tx, rx) = mpsc::channel(8);
        let (runbooks_tx, runbooks_rx) = watch::channel(Vec::new());
        let config_task = tokio::spawn(config_loop(
            applier,
            cfg.config.clone(),
            rx,
            member.gossip.clone(),
            config_metrics.clone(),
            runbooks_tx,
            shutdown.child_token(),
        ));
        let runbook_task = tokio::spawn(
            crate::remediate::RunbookTask {
                gossip: member.gossip.clone(),
                endpoint: member.endpoint.clone(),
                health: member.health.clone(),
                rules: runbooks_rx,
                extra: member.extra_checks.clone(),
                state_dir: cfg.config.state_dir.clone(),
                metrics: runbook_metrics,
            }
            .run(shutdown.child_token()),
        );
        let apply = ApplyHandle { tx };
        let follow_task = tokio::spawn(
            Follower {
                gossip: member.gossip.clone(),
                endpoint: member.endpoint.clone(),
                trust,
                me,
                root: cfg.config.root.clone(),
                apply: apply.clone(),
                metrics: config_metrics,
            }
            .run(applied.as_ref().map(|(v, _)| *v), shutdown.child_token()),
        );
        let patch_task = tokio::spawn(patches.run(shutdown.child_token()));
        info!(
            identity = %member.endpoint.identity(),
            gossip = %member.gossip.advertise_addr(),
            metrics = %metrics_addr.map_or("off".to_owned(), |a| a.to_string()),
            applied = %applied.map_or("nothing".to_owned(), |(v, h)| format!("version {v} ({h})")),
            "node ready"
        );
        Ok(NodeAgent {
            member,
            metrics_addr,
            apply,
            config_task,
            follow_task,
            patch_task,
            runbook_task,
        })
    }

    /// Where to hand the states this node must apply.
    pub fn apply_handle(&self) -> ApplyHandle {
        self.apply.clone()
    }

    /// The address the site reaches this node at.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.gossip.advertise_addr()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn gossip(&self) -> &Gossip {
        &self.member.gossip
    }

    /// Waits for the agent to stop (after `shutdown` was cancelled).
    pub async fn stopped(self) {
        let _ = self.follow_task.await;
        let _ = self.patch_task.await;
        let _ = self.runbook_task.await;
        let _ = self.config_task.await;
        self.member.stopped().await;
    }
}

impl crate::cli::Running for NodeAgent {
    async fn stopped(self) {
        NodeAgent::stopped(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::DriftReport;
    use crate::id::Role;
    use crate::site::{Health, MemberView};

    fn member(name: &str, relay: bool, alive: bool, offer: Option<(u64, u8)>) -> MemberView {
        let mut m = MemberView {
            name: name.into(),
            generation: 1,
            gossip_addr: format!("127.0.0.{}:1", name.len()).parse().unwrap(),
            alive,
            health: Health {
                role: Some(if relay { Role::Relay } else { Role::Node }),
                ..Health::default()
            },
            labels: BTreeMap::new(),
            facts: BTreeMap::new(),
            config: Default::default(),
            patch: Default::default(),
        };
        m.config.offer = offer.map(|(version, d)| Offer {
            version,
            digest: [d; 32],
        });
        m
    }

    fn view(members: Vec<MemberView>) -> SiteView {
        SiteView {
            region: "eu".into(),
            site: "par".into(),
            members,
        }
    }

    #[test]
    fn a_failed_reload_reports_the_end_of_its_output_first() {
        let report = ApplyReport {
            version: 2,
            hash: "h".into(),
            written: vec!["/etc/a".into()],
            unmanaged: Vec::new(),
            reloads: vec![crate::apply::ReloadOutcome {
                command: "nginx -t".into(),
                exit_code: Some(1),
                timed_out: false,
                output: format!("{}nginx: unknown directive \"lisen\"\n", "x".repeat(2000)),
                duration_ms: 5,
            }],
            ok: false,
            error: Some("reload command `nginx -t` exited with status 1".into()),
        };
        let d = result_detail(&report);
        assert!(d.starts_with("output: "), "{d}");
        assert!(
            d.contains("unknown directive \"lisen\"; reload command `nginx -t`"),
            "{d}"
        );
        assert!(d.len() <= distribute::MAX_RESULT_DETAIL, "{}", d.len());
    }

    #[test]
    fn a_node_wants_the_newest_offer_of_an_alive_relay_once_and_only_if_newer() {
        let v = view(vec![
            member("r", true, true, Some((3, 1))),
            member("dead-relay", true, false, Some((9, 1))),
            member("nodey", false, true, Some((8, 1))),
        ]);
        let (offer, addr) = wanted_offer(&v, Some(2), None).unwrap();
        assert_eq!(offer.version, 3);
        assert_eq!(addr, "127.0.0.1:1".parse().unwrap());
        assert!(
            wanted_offer(&v, Some(3), None).is_none(),
            "already holds it"
        );
        assert!(
            wanted_offer(&v, Some(2), Some(&offer)).is_none(),
            "tried it"
        );
        assert!(wanted_offer(&v, None, None).is_some(), "holds nothing yet");
    }

    fn drifted(path: &str, found: &str, healed: bool, error: Option<&str>) -> DriftOutcome {
        DriftOutcome {
            report: DriftReport {
                path: path.into(),
                expected_sha256: "aa".into(),
                found_sha256: Some(found.into()),
                expected_size: 3,
                found_size: Some(4),
                expected_mode: 0o644,
                found_mode: Some(0o644),
            },
            healed,
            reloads: Vec::new(),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn drift_notes_number_each_drift_keep_an_open_one_once_and_drop_it_when_fixed() {
        let mut d = DriftNotes::default();
        assert!(!d.update(&[]));
        assert!(d.update(&[drifted("/a", "bb", true, None)]));
        assert_eq!(d.notes["/a"].n, 1);
        assert_eq!(d.notes["/a"].action, DriftAction::Healed);
        // Reported and still the same on the next look: noted once.
        assert!(d.update(&[drifted("/b", "cc", false, None)]));
        assert!(!d.update(&[drifted("/b", "cc", false, None)]));
        assert_eq!(d.notes["/b"].n, 2);
        assert_eq!(d.notes["/b"].action, DriftAction::Reported);
        // Fixed by hand: its note goes; the healed one stays as history.
        assert!(d.update(&[]));
        assert!(!d.notes.contains_key("/b"));
        assert!(d.notes.contains_key("/a"));
        // Healing that failed stays open.
        d.update(&[drifted("/c", "dd", false, Some("read-only"))]);
        assert_eq!(d.notes["/c"].action, DriftAction::Unhealed);
        assert!(d.kv().iter().any(|(k, _)| k == "config:drift:/c"));
    }
}
