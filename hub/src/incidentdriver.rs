//! The hub's side of incidents, around the pure [`crate::incidents`]: one
//! task owns the [`IncidentEngine`], fed with the events the core task
//! stores and, every two seconds, with the fleet view and the newest
//! rollout, and every ten with the sites raised as outliers of their region
//! ([`crate::outliers`]) and the regions raised as far from their usual
//! figures ([`crate::baselines`]); it publishes the incidents for the API, notes each opening and
//! resolution in the audit log, and hands them to one webhook task per
//! configured URL, which posts them with retries without ever holding the
//! engine up.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_node::clock::{ticker, unix_ms};
use trellis_relay::summary::{SiteKey, SiteStatus};
use trellis_relay::uplink::Event;

use crate::baselines::{RegionBaselines, RegionBaselinesConfig};
use crate::config::IncidentsConfig;
use crate::driver::{Input, Shared};
use crate::incidents::{Change, Incident, IncidentEngine};
use crate::log::Op;
use crate::outliers::{RegionOutliers, RegionOutliersConfig};

/// How often the task looks at the fleet view and the newest rollout.
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How often sites are compared with the rest of their region.
const REGIONS_EVERY: Duration = Duration::from_secs(10);
/// Events waiting for the incidents task, at most (past it they are
/// dropped and counted: the store still has them).
pub(crate) const EVENTS_QUEUE: usize = 8192;
/// Changes waiting for one webhook, at most.
const WEBHOOK_QUEUE: usize = 1024;
/// Attempts to deliver one change to one webhook, the first delay between
/// them (doubling), and how long one attempt may take.
const WEBHOOK_ATTEMPTS: u32 = 5;
const WEBHOOK_FIRST_DELAY: Duration = Duration::from_secs(1);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

/// An event of a site, as the core task stored it.
pub(crate) struct SiteEvent {
    pub region: String,
    pub site: String,
    pub event: Event,
}

/// Every incident kept, newest first: what the API serves.
pub(crate) type IncidentList = Arc<Vec<Incident>>;

/// The incident metrics.
#[derive(Clone, Default)]
pub(crate) struct IncidentMetrics {
    pub open: Gauge,
    pub events_dropped: Counter,
    pub webhooks_dropped: Counter,
    pub webhooks_failed: Counter,
    pub region_outliers: Gauge,
    pub region_anomalies: Gauge,
}

impl IncidentMetrics {
    pub fn register(registry: &mut trellis_node::metrics::Registry) -> Self {
        let m = IncidentMetrics::default();
        let r = registry.sub_registry_with_prefix("trellis_hub");
        r.register("incidents_open", "Incidents open now", m.open.clone());
        r.register(
            "incident_events_dropped",
            "Events not correlated into incidents for lack of room (they are stored)",
            m.events_dropped.clone(),
        );
        r.register(
            "incident_webhooks_dropped",
            "Incident changes not sent to a webhook because its queue was full",
            m.webhooks_dropped.clone(),
        );
        r.register(
            "incident_webhooks_failed",
            "Incident changes a webhook never took, after every attempt",
            m.webhooks_failed.clone(),
        );
        r.register(
            "region_outliers",
            "Sites raised now as far from the other sites of their region",
            m.region_outliers.clone(),
        );
        r.register(
            "region_anomalies",
            "Regions raised now as far from their own usual figures",
            m.region_anomalies.clone(),
        );
        m
    }
}

/// What a webhook receives.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookBody {
    /// `opened` or `resolved`.
    pub event: &'static str,
    pub incident: Incident,
}

impl WebhookBody {
    fn of(c: &Change) -> Self {
        match c {
            Change::Opened(i) => WebhookBody {
                event: "opened",
                incident: i.clone(),
            },
            Change::Resolved(i) => WebhookBody {
                event: "resolved",
                incident: i.clone(),
            },
        }
    }
}

/// Owns the engine until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn incidents_task(
    shared: Shared,
    cfg: IncidentsConfig,
    outliers: RegionOutliersConfig,
    baselines: RegionBaselinesConfig,
    hub: String,
    stale_after: std::time::Duration,
    mut events: mpsc::Receiver<SiteEvent>,
    notes: mpsc::Sender<(String, Op)>,
    published: watch::Sender<IncidentList>,
    metrics: IncidentMetrics,
    shutdown: CancellationToken,
) {
    let mut engine = IncidentEngine::new(cfg.settings());
    let mut regions = RegionOutliers::new(outliers);
    let mut baselines = RegionBaselines::new(baselines);
    let mut regions_looked: Option<std::time::Instant> = None;
    let hooks: Vec<(String, mpsc::Sender<Arc<WebhookBody>>)> = cfg
        .webhooks
        .iter()
        .map(|url| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tokio::spawn(webhook_task(
                url.clone(),
                rx,
                metrics.webhooks_failed.clone(),
                shutdown.child_token(),
            ));
            (url.clone(), tx)
        })
        .collect();
    let mut tick = ticker(LOOK_EVERY);
    // A hub just started has not had time to hear from the sites it
    // restored from its store: for `fleet.stale_after` it does not take
    // the fleet view's "unreachable" for news (each restart would open an
    // incident per site otherwise).
    let started = std::time::Instant::now();
    // The rollout (run, revision) the engine knows.
    let mut rollout_seen = None;
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            e = events.recv() => match e { Some(e) => Some(e), None => break },
            _ = tick.tick() => None,
        };
        // The newest rollout before anything else: a relay hears of a wave
        // from this same head, so an event the wave causes never arrives
        // before the engine knows of it.
        {
            let head = shared.rollout_head.borrow();
            let now = head.as_ref().map(|h| (h.record.run, h.record.revision));
            if now != rollout_seen {
                rollout_seen = now;
                engine.handle_rollout(head.as_ref().map(|h| h.record.clone()));
            }
        }
        let changes = match first {
            Some(first) => {
                let now_ms = unix_ms();
                let mut changes =
                    engine.handle_event(now_ms, &first.region, &first.site, &first.event);
                while let Ok(e) = events.try_recv() {
                    changes.extend(engine.handle_event(now_ms, &e.region, &e.site, &e.event));
                }
                changes
            }
            None => {
                let Some(fleet) = shared.ask(|reply| Input::Fleet { reply }).await else {
                    break;
                };
                let now_ms = unix_ms();
                let settled = started.elapsed() >= stale_after;
                let mut changes = if settled {
                    engine.handle_fleet(now_ms, &fleet.sites)
                } else {
                    Vec::new()
                };
                // Sites unusual in their region, and regions unusual for
                // themselves: from the summaries, every REGIONS_EVERY (their
                // figures move slower than that).
                if (regions.enabled() || baselines.enabled())
                    && settled
                    && regions_looked.is_none_or(|t| t.elapsed() >= REGIONS_EVERY)
                {
                    regions_looked = Some(std::time::Instant::now());
                    let Some(summaries) = shared.ask(|reply| Input::Summaries { reply }).await
                    else {
                        break;
                    };
                    let unreachable: BTreeSet<SiteKey> = fleet
                        .sites
                        .iter()
                        .filter(|s| s.status == SiteStatus::Unreachable)
                        .map(|s| (s.region.clone(), s.site.clone()))
                        .collect();
                    let raised = regions.assess(now_ms, &summaries, &unreachable);
                    metrics.region_outliers.set(raised.len() as i64);
                    changes.extend(engine.handle_regions(now_ms, &raised));
                    let raised = baselines.observe(now_ms, &summaries, &unreachable);
                    metrics.region_anomalies.set(raised.len() as i64);
                    changes.extend(engine.handle_region_baselines(now_ms, &raised));
                }
                changes.extend(engine.tick(now_ms));
                changes
            }
        };
        for c in &changes {
            let (kind, i) = match c {
                Change::Opened(i) => ("incident.opened", i),
                Change::Resolved(i) => ("incident.resolved", i),
            };
            info!(
                id = i.id,
                kind = i.kind.as_str(),
                scope = %i.scope,
                title = %i.title,
                cause_run = i.cause.as_ref().map(|c| c.run),
                "{kind}"
            );
            let op = Op::Note {
                kind: kind.to_owned(),
                subject: i.scope.to_string(),
                detail: format!("#{} {}", i.id, i.title),
            };
            if notes.try_send((hub.clone(), op)).is_err() {
                warn!(
                    id = i.id,
                    "audit notes queue full; an incident change is not in the audit log"
                );
            }
            let body = Arc::new(WebhookBody::of(c));
            for (url, tx) in &hooks {
                if tx.try_send(body.clone()).is_err() {
                    metrics.webhooks_dropped.inc();
                    warn!(%url, id = i.id, "webhook queue full (the endpoint is slow or down); an incident change is not sent to it");
                }
            }
        }
        // Updates (nodes joining an incident) change the list too.
        metrics.open.set(engine.open_count() as i64);
        let all = engine.all();
        if published.borrow().as_slice() != all.as_slice() {
            published.send_replace(Arc::new(all));
        }
    }
}

/// Posts each change queued for `url`, in order; an attempt that fails (no
/// answer, or not 2xx) is retried with a doubling delay, up to
/// [`WEBHOOK_ATTEMPTS`] attempts, then the change is given up.
async fn webhook_task(
    url: String,
    mut queue: mpsc::Receiver<Arc<WebhookBody>>,
    failed: Counter,
    shutdown: CancellationToken,
) {
    // reqwest's TLS takes the process's default provider (for https URLs).
    trellis_node::tls::install_crypto_provider();
    let client = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
        Ok(c) => c,
        Err(error) => {
            warn!(%url, %error, "cannot make an HTTP client; incidents are not sent to this webhook");
            return;
        }
    };
    loop {
        let body = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            b = queue.recv() => match b { Some(b) => b, None => return },
        };
        let mut delay = WEBHOOK_FIRST_DELAY;
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            let error = match client.post(&url).json(&*body).send().await {
                Ok(r) if r.status().is_success() => {
                    debug!(%url, id = body.incident.id, event = body.event, "webhook took the incident");
                    break;
                }
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => e.to_string(),
            };
            if attempt == WEBHOOK_ATTEMPTS {
                failed.inc();
                warn!(%url, id = body.incident.id, event = body.event, %error, attempts = attempt, "webhook never took the incident; given up");
                break;
            }
            debug!(%url, id = body.incident.id, %error, retry_in = ?delay, "webhook failed; retrying");
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay *= 2;
        }
    }
}

/// `GET /api/v1/incidents[?state=open|all]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct IncidentsReport {
    /// Incidents open now (all of them, whatever was asked).
    pub open: usize,
    /// Newest first: open ones only, or with the resolved ones kept.
    pub incidents: Vec<Incident>,
}

#[derive(serde::Deserialize)]
pub(crate) struct IncidentsQuery {
    state: Option<String>,
}

pub(crate) async fn incidents_route(
    axum::extract::State(shared): axum::extract::State<Shared>,
    axum::extract::Query(q): axum::extract::Query<IncidentsQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let all = match q.state.as_deref() {
        None | Some("open") => false,
        Some("all") => true,
        Some(other) => {
            return crate::api::error(
                axum::http::StatusCode::BAD_REQUEST,
                format!("state={other:?} is not known; use state=open (the default) or state=all"),
            );
        }
    };
    let list = shared.incidents.borrow().clone();
    let open = list.iter().filter(|i| i.resolved_ms.is_none()).count();
    let incidents = list
        .iter()
        .filter(|i| all || i.resolved_ms.is_none())
        .cloned()
        .collect();
    axum::Json(IncidentsReport { open, incidents }).into_response()
}
