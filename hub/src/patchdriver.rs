//! The hubs' side of patch rollouts, around the pure
//! [`crate::patchrollout`]: one task follows the newest rollout in the log
//! and, on the hub that drives it, advances it; one task per connected
//! relay tells that relay its site's part.
//!
//! The driver is the hub that accepted `trellis rollout start`. When the
//! federation says it is dead, the alive hub whose name sorts first takes
//! over: a rollout needs no particular hub, only the log and the sites'
//! summaries every hub has. (Two hubs deciding at once write the same
//! revision; the log keeps one, as it does for keys.)

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trellis_node::clock::{ticker, unix_ms};
use trellis_node::id::Identity;
use trellis_node::patch::SignedPatch;
use trellis_relay::rollout::SiteOrder;
use trellis_relay::uplink::{Request, Response};

use crate::driver::{Input, Shared, ask_relay};
use crate::log::{Entry, Op, PatchRecord};
use crate::patchrollout::{RolloutRecord, RunState, site_waves, step};
use crate::peering::Peering;

/// The newest rollout and its signed patch.
pub struct Head {
    pub record: RolloutRecord,
    pub patch: SignedPatch,
}

/// What relays are told: the newest rollout, if any.
pub type RolloutHead = Option<Arc<Head>>;

/// How often the driver looks at the sites, and relays not yet holding a
/// patch are asked again.
const LOOK_EVERY: Duration = Duration::from_secs(1);
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// The published patch `id` (hex) with its signed manifest, from the log.
pub(crate) async fn signed_patch(
    shared: &Shared,
    find: impl Fn(&PatchRecord) -> bool,
) -> Result<Option<(PatchRecord, SignedPatch)>, String> {
    let snapshot = shared
        .ask(|reply| Input::LogState { reply })
        .await
        .ok_or("the hub is shutting down")?;
    let Some(record) = snapshot.patches.into_iter().rev().find(|p| find(p)) else {
        return Ok(None);
    };
    let reader = shared.store.clone();
    let (origin, seq) = (record.origin.clone(), record.seq);
    let entry = tokio::task::spawn_blocking(move || reader.log_entry(&origin, seq))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    match entry {
        Some(Entry {
            op: Op::Patch { manifest, .. },
            ..
        }) => postcard::from_bytes::<SignedPatch>(&manifest)
            .map(|s| Some((record, s)))
            .map_err(|e| format!("the log entry holding the patch does not decode: {e}")),
        _ => Err(
            "the log entry holding the patch is unreadable; run `trellis audit verify`".to_owned(),
        ),
    }
}

/// Whether this hub advances `r`: it is the driver, or the driver is dead
/// and this is the alive hub whose name sorts first.
fn drives(r: &RolloutRecord, peering: &Peering) -> bool {
    if r.driver == peering.me {
        return true;
    }
    let peers = peering.peers();
    let driver_alive = peers.iter().any(|p| p.name == r.driver && p.alive);
    !driver_alive
        && peers
            .iter()
            .filter(|p| p.alive)
            .all(|p| p.name.as_str() > peering.me.as_str())
        && peers.iter().any(|p| p.name == r.driver)
}

/// Follows the newest rollout (publishing it to the relay tasks) and
/// advances it where this hub drives it, every second until `shutdown`.
pub(crate) async fn rollout_task(
    shared: Shared,
    peering: Peering,
    head: watch::Sender<RolloutHead>,
    shutdown: CancellationToken,
) {
    let mut tick = ticker(LOOK_EVERY);
    let mut patch: Option<(String, SignedPatch)> = None;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Some(entries) = shared.ask(|reply| Input::Rollouts { reply }).await else {
            break;
        };
        let Some(newest) = entries.last() else {
            continue;
        };
        let record: RolloutRecord = match serde_json::from_str(&newest.record) {
            Ok(r) => r,
            Err(error) => {
                warn!(run = newest.run, %error, "a rollout in the log does not decode; ignored");
                continue;
            }
        };
        if patch.as_ref().is_none_or(|(id, _)| *id != record.patch) {
            let id = record.patch.clone();
            match signed_patch(&shared, |p| p.id == id).await {
                Ok(Some((_, s))) => patch = Some((id, s)),
                Ok(None) => {
                    warn!(run = record.run, patch = %record.patch, "the rollout's patch is not in this hub's log yet");
                    continue;
                }
                Err(error) => {
                    warn!(run = record.run, %error, "cannot read the rollout's patch");
                    continue;
                }
            }
        }
        let changed = head
            .borrow()
            .as_ref()
            .is_none_or(|h| (h.record.run, h.record.revision) != (record.run, record.revision));
        if changed {
            let signed = patch.as_ref().expect("resolved above").1.clone();
            head.send_replace(Some(Arc::new(Head {
                record: record.clone(),
                patch: signed,
            })));
        }
        if !matches!(record.state, RunState::Running | RunState::RollingBack)
            || !drives(&record, &peering)
        {
            continue;
        }
        let Some(sites) = shared.ask(|reply| Input::Summaries { reply }).await else {
            break;
        };
        let Some(mut next) = step(&record, &sites, unix_ms()) else {
            continue;
        };
        next.driver = peering.me.clone();
        log_change(&record, &next);
        let op = Op::Rollout {
            run: next.run,
            revision: next.revision,
            record: serde_json::to_string(&next).expect("rollouts serialise"),
        };
        if let Err(error) = crate::peering::write(&shared, &peering, peering.me.clone(), op).await {
            warn!(run = next.run, %error, "cannot record the rollout's next step; trying again");
        }
    }
}

fn log_change(from: &RolloutRecord, to: &RolloutRecord) {
    if to.state != from.state {
        match to.state {
            RunState::Halted | RunState::RollingBack => warn!(
                run = to.run,
                patch = %to.name,
                state = to.state.as_str(),
                reason = to.reason.as_deref().unwrap_or(""),
                "rollout stopped"
            ),
            _ => info!(run = to.run, patch = %to.name, state = to.state.as_str(), "rollout"),
        }
    } else if to.started > from.started {
        info!(
            run = to.run,
            patch = %to.name,
            wave = to.started - 1,
            of = to.waves.len(),
            "wave passed its gate; next wave started"
        );
    }
}

/// Tells one relay its site's part of the newest rollout, again whenever
/// the rollout changes, and every few seconds while the relay is still
/// fetching the patch; until the connection ends.
pub(crate) async fn push_rollout(
    conn: quinn::Connection,
    relay: Identity,
    mut head: watch::Receiver<RolloutHead>,
) {
    let mut delay = RETRY_EVERY;
    loop {
        let current = head.borrow_and_update().clone();
        let order = current.as_ref().and_then(|h| {
            site_waves(&h.record, &relay.region, &relay.site).map(|waves| SiteOrder {
                run: h.record.run,
                patch: Box::new(h.patch.clone()),
                waves,
                started: h.record.started,
                action: h.record.action(),
                max_failure: h.record.max_failure,
                auto_rollback: h.record.auto_rollback,
            })
        });
        let mut settled = true;
        if let Some(order) = order {
            match send_order(&conn, &order).await {
                Ok(true) => delay = RETRY_EVERY,
                Ok(false) => settled = false,
                Err(error) => {
                    if conn.close_reason().is_some() {
                        return;
                    }
                    warn!(relay = %relay, run = order.run, %error, retry_in = ?delay, "cannot tell the relay its rollout");
                    settled = false;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
        if settled {
            if head.changed().await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                changed = head.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// One order on its own stream: `Ok(true)` once the relay holds the whole
/// patch and told its nodes, `Ok(false)` while it is still fetching.
async fn send_order(conn: &quinn::Connection, order: &SiteOrder) -> Result<bool, String> {
    match ask_relay(conn, &Request::RolloutOrder(Box::new(order.clone()))).await? {
        Response::RolloutTaken { run, ready } if run == order.run => Ok(ready),
        Response::Error(e) => Err(format!("the relay refused: {e}")),
        other => Err(format!("unexpected answer {other:?}")),
    }
}
