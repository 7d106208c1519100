//! `POST /api/v1/revocations` takes a revocation the mesh CA signed
//! (`trellis ca revoke`, `trellis ca rotate`) into the replicated desired
//! state; `GET /api/v1/revocations` lists the set this hub enforces.
//!
//! The hub checks the CA's signature before writing: only the holder of
//! the CA key can revoke, whoever can reach the API.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use trellis_node::revocation::{self, Kind, SignedRevocation};

use crate::api::{WriteReport, error};
use crate::driver::Shared;
use crate::log::Op;

/// Largest `POST /api/v1/revocations` body: one signed entry.
pub const MAX_REVOCATION_BODY: usize = 4096;

/// One revocation as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevocationView {
    /// SHA-256 of the certificate, hex.
    pub fingerprint: String,
    pub identity: String,
    pub kind: Kind,
    /// Unix seconds.
    pub at: i64,
    /// When the certificate expires (the entry is dropped then).
    pub not_after: i64,
    pub reason: String,
}

impl From<&revocation::Revocation> for RevocationView {
    fn from(r: &revocation::Revocation) -> Self {
        RevocationView {
            fingerprint: trellis_node::apply::hex(&r.fingerprint),
            identity: r.identity.clone(),
            kind: r.kind,
            at: r.at,
            not_after: r.not_after,
            reason: r.reason.clone(),
        }
    }
}

/// `GET /api/v1/revocations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevocationList {
    /// [`revocation::RevocationSet::digest`]: equal on two members that
    /// enforce the same set.
    pub digest: String,
    pub entries: Vec<RevocationView>,
}

/// The answer to `POST /api/v1/revocations`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revoked {
    #[serde(flatten)]
    pub revocation: RevocationView,
    /// The hub already held this revocation (or a stronger one for the
    /// same certificate); nothing was written.
    pub already: bool,
    pub write: Option<WriteReport>,
}

pub(crate) async fn list(State(shared): State<Shared>) -> Response {
    let set = shared.revocations.current();
    axum::Json(RevocationList {
        digest: set.digest(),
        entries: set
            .entries()
            .into_iter()
            .map(RevocationView::from)
            .collect(),
    })
    .into_response()
}

#[derive(Deserialize)]
pub(crate) struct RevokeQuery {
    author: Option<String>,
}

pub(crate) async fn revoke(
    State(shared): State<Shared>,
    axum::Extension(caller): axum::Extension<crate::apiauth::Caller>,
    Query(q): Query<RevokeQuery>,
    body: axum::body::Bytes,
) -> Response {
    let Some(peering) = shared.peering.get() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the hub is starting");
    };
    let signed = match postcard::from_bytes::<SignedRevocation>(&body) {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not a signed revocation ({e}); use `trellis ca revoke`"),
            );
        }
    };
    let r = match revocation::verify(peering.creds.ca_der(), &signed) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::FORBIDDEN, format!("revocation refused: {e}")),
    };
    let view = RevocationView::from(&r);
    let held = shared
        .revocations
        .current()
        .get(&r.fingerprint)
        .is_some_and(|have| have.kind >= r.kind);
    if held {
        return axum::Json(Revoked {
            revocation: view,
            already: true,
            write: None,
        })
        .into_response();
    }
    let author = caller.author(q.author.or(Some("ca".into())));
    if author.is_empty() || author.len() > 64 {
        return error(StatusCode::BAD_REQUEST, "author: 1 to 64 bytes");
    }
    let op = Op::Revoke {
        revocation: postcard::to_stdvec(&signed).expect("revocations serialise"),
    };
    match crate::peering::write(&shared, peering, author, op).await {
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Ok(w) => {
            let status = w.http_status();
            let report = Revoked {
                revocation: view,
                already: false,
                write: Some(WriteReport::of(&w)),
            };
            (status, axum::Json(report)).into_response()
        }
    }
}
