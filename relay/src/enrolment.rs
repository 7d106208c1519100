//! The relay's enrolment endpoint (`[enrol] listen`) and its durable queue
//! ([`trellis_node::enrol`]).
//!
//! Machines without a certificate reach the relay on an endpoint of its
//! own, which serves only `trellis-enrol/1` (the relay's mesh endpoint
//! keeps refusing anyone without a certificate). Each request is written to
//! `enrol/ID.req` next to the outage buffer before anything else, then
//! forwarded to the hub the relay is connected to (`RelayRequest::Enrol`).
//! A final answer (a certificate, or a refusal) is kept as `enrol/ID.done`
//! and the request removed; with the WAN link down, or the hub unable to
//! answer, the machine is told to ask again (`Pending`) and a task forwards
//! every kept request whenever the link is up. So a request made during an
//! outage completes once the link returns, even across a relay restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trellis_node::enrol::{EnrolAsk, EnrolRequest, EnrolResponse};
use trellis_node::id::{Identity, Role};
use trellis_node::tls::Credentials;
use trellis_node::wire;

use crate::uplink::{MAX_UPLINK_FRAME, RelayRequest, RelayResponse, UPLINK_VERSION};

/// Requests kept at most; past it a machine is told to ask again later.
pub const MAX_KEPT: usize = 1000;
/// How often kept requests are forwarded while the link is up.
const DRAIN_EVERY: Duration = Duration::from_secs(2);
/// Answers handed out at once (each may wait on the hub).
const AT_ONCE: usize = 8;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a machine told `Pending` waits before asking again.
const RETRY_AFTER_S: u32 = 3;
/// Kept answers older than this are removed at start.
const KEEP_DONE: Duration = Duration::from_secs(7 * 86400);

/// Where requests and answers are kept, next to the outage buffer.
pub fn queue_dir(buffer: &Path) -> PathBuf {
    buffer.with_file_name("enrol")
}

pub struct EnrolQueue {
    dir: PathBuf,
    uplink: watch::Receiver<Option<quinn::Connection>>,
    /// One request handled at a time, so a request and the drain do not
    /// forward the same one twice at once.
    one: tokio::sync::Mutex<()>,
}

impl EnrolQueue {
    /// Opens (creates) the queue in `dir`, dropping answers kept longer
    /// than a week.
    pub fn open(
        dir: PathBuf,
        uplink: watch::Receiver<Option<quinn::Connection>>,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > KEEP_DONE);
                if old && e.path().extension().is_some_and(|x| x == "done") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(EnrolQueue {
            dir,
            uplink,
            one: Default::default(),
        })
    }

    fn path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{id}.{ext}"))
    }

    fn kept(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "req"))
            .collect();
        out.sort();
        out
    }

    /// The answer to a machine's request: kept from before, from the hub
    /// now, or `Pending` with the request kept on disk.
    pub async fn answer(&self, req: EnrolRequest) -> EnrolResponse {
        let _one = self.one.lock().await;
        let id = req.id();
        let done = self.path(&id, "done");
        if let Some(answer) = std::fs::read(&done)
            .ok()
            .and_then(|b| postcard::from_bytes::<EnrolResponse>(&b).ok())
        {
            return answer;
        }
        let kept = self.path(&id, "req");
        if !kept.exists() {
            if self.kept().len() >= MAX_KEPT {
                return EnrolResponse::Pending {
                    why: format!("the relay holds {MAX_KEPT} requests already"),
                    retry_after_s: 30,
                };
            }
            let bytes = postcard::to_stdvec(&req).expect("requests serialise");
            if let Err(e) = trellis_node::apply::write_atomic(&kept, &bytes, 0o600) {
                warn!(error = %e, "cannot keep an enrolment request");
                return EnrolResponse::Pending {
                    why: "the relay cannot keep the request".into(),
                    retry_after_s: 30,
                };
            }
            info!(request = %id, name = %req.name, "enrolment request kept");
        }
        match self.forward(&req).await {
            Ok(answer) => {
                self.finish(&id, &answer);
                answer
            }
            Err(why) => EnrolResponse::Pending {
                why,
                retry_after_s: RETRY_AFTER_S,
            },
        }
    }

    /// Keeps a final answer and forgets the request.
    fn finish(&self, id: &str, answer: &EnrolResponse) {
        let bytes = postcard::to_stdvec(answer).expect("answers serialise");
        match trellis_node::apply::write_atomic(&self.path(id, "done"), &bytes, 0o600) {
            Ok(()) => {
                let _ = std::fs::remove_file(self.path(id, "req"));
            }
            Err(e) => {
                warn!(error = %e, request = %id, "cannot keep an enrolment's answer; it will be asked for again")
            }
        }
        match answer {
            EnrolResponse::Issued { .. } => {
                info!(request = %id, "enrolment answered: certificate issued")
            }
            EnrolResponse::Refused { reason } => {
                info!(request = %id, %reason, "enrolment answered: refused")
            }
            EnrolResponse::Pending { .. } => {}
        }
    }

    /// A renewal for `member` (the certificate it presented was checked):
    /// asked of the hub now, not kept (the member asks again at its next
    /// look).
    pub async fn renew(&self, member: &Identity, csr: Vec<u8>) -> EnrolResponse {
        let ask = RelayRequest::Renew {
            name: member.name.clone(),
            csr,
        };
        match self.ask_hub(&ask).await {
            Ok(answer) => answer,
            Err(why) => EnrolResponse::Pending {
                why,
                retry_after_s: 60,
            },
        }
    }

    /// Asks the hub; `Err` says why there is no final answer yet.
    async fn forward(&self, req: &EnrolRequest) -> Result<EnrolResponse, String> {
        self.ask_hub(&RelayRequest::Enrol(req.clone())).await
    }

    async fn ask_hub(&self, request: &RelayRequest) -> Result<EnrolResponse, String> {
        let Some(conn) = self.uplink.borrow().clone() else {
            return Err(
                "the site's link to the hubs is down; the relay keeps the request and sends it \
                 when the link returns"
                    .into(),
            );
        };
        let ask = wire::ask::<_, RelayResponse>(&conn, UPLINK_VERSION, request, MAX_UPLINK_FRAME);
        match tokio::time::timeout(IO_TIMEOUT, ask).await {
            Err(_) => Err("the hub did not answer in time; the relay keeps the request".into()),
            Ok(Err(e)) => Err(format!(
                "the hub could not be asked ({e}); the relay keeps the request"
            )),
            Ok(Ok(Some(RelayResponse::Issued { cert_pem, labels }))) => {
                Ok(EnrolResponse::Issued { cert_pem, labels })
            }
            Ok(Ok(Some(RelayResponse::Refused(reason)))) => Ok(EnrolResponse::Refused { reason }),
            Ok(Ok(Some(RelayResponse::Error(e)))) => Err(format!("the hub: {e}")),
            Ok(Ok(other)) => Err(format!("unexpected answer from the hub: {other:?}")),
        }
    }

    /// Forwards every kept request (while the link is up).
    async fn drain(&self) {
        for path in self.kept() {
            if self.uplink.borrow().is_none() {
                return;
            }
            let _one = self.one.lock().await;
            let Some(req) = std::fs::read(&path)
                .ok()
                .and_then(|b| postcard::from_bytes::<EnrolRequest>(&b).ok())
            else {
                warn!(path = %path.display(), "an unreadable enrolment request is removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            if let Ok(answer) = self.forward(&req).await {
                self.finish(&req.id(), &answer);
            }
        }
    }
}

/// Serves enrolment on `listen` until `shutdown` (and forwards the kept
/// requests while the link is up); returns the bound address.
pub fn serve(
    listen: std::net::SocketAddr,
    creds: &Credentials,
    site: (String, String),
    queue: Arc<EnrolQueue>,
    shutdown: CancellationToken,
) -> Result<std::net::SocketAddr, String> {
    let drain_queue = queue.clone();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = sd.cancelled() => return,
                _ = tokio::time::sleep(DRAIN_EVERY) => {}
            }
            drain_queue.drain().await;
        }
    });
    let enforced = creds.clone();
    trellis_node::enrol::serve(listen, creds, AT_ONCE, shutdown, move |ask, conn| {
        let (queue, creds, site) = (queue.clone(), enforced.clone(), site.clone());
        async move {
            match ask {
                EnrolAsk::Enrol(req) => queue.answer(req).await,
                EnrolAsk::Renew { csr } => match renewing_member(&conn, &creds, &site) {
                    Ok(member) => queue.renew(&member, csr).await,
                    Err(reason) => EnrolResponse::Refused { reason },
                },
            }
        }
    })
}

/// The node of this relay's site that presented its certificate on `conn`,
/// if that certificate is one of the mesh CA (checked in the handshake) and
/// not revoked or decommissioned.
fn renewing_member(
    conn: &quinn::Connection,
    creds: &Credentials,
    site: &(String, String),
) -> Result<Identity, String> {
    let (member, fingerprint) = trellis_node::enrol::client_certificate(conn)
        .ok_or("a renewal needs the member's current certificate on the connection")?;
    if member.role != Role::Node || member.region != site.0 || member.site != site.1 {
        return Err(format!(
            "{member} is not a node of this relay's site {}/{}",
            site.0, site.1
        ));
    }
    if let Some(r) = creds.revocations().current().revoked(&fingerprint) {
        return Err(format!(
            "{member}'s certificate is {}: not renewed",
            r.kind.as_str()
        ));
    }
    Ok(member)
}
