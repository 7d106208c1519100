//! The relay's copy of the revocation list: sent by the hub on every
//! uplink connection and change, kept on disk so that the site still
//! enforces it after a restart during a WAN outage, enforced by the
//! relay's own endpoint, and published to the site's nodes in gossip
//! ([`trellis_node::revocation::GOSSIP_KEY`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info, warn};
use trellis_node::gossip::Gossip;
use trellis_node::revocation::{self, RevocationSet, SignedRevocation};
use trellis_node::tls::Credentials;

/// Where the list is kept, next to the outage buffer.
pub fn path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("revocations")
}

pub struct RevocationStore {
    path: PathBuf,
    creds: Credentials,
    gossip: Arc<Gossip>,
    /// One list taken at a time, so the file and the gossip value follow
    /// the newest.
    taking: tokio::sync::Mutex<()>,
}

impl RevocationStore {
    /// Loads the list kept at `path` (none yet is an empty list), enforces
    /// it and publishes it. A file that does not decode is an error: the
    /// relay would otherwise start without the revocations it held.
    pub async fn open(
        path: PathBuf,
        creds: Credentials,
        gossip: Arc<Gossip>,
    ) -> Result<Self, String> {
        let store = RevocationStore {
            path,
            creds,
            gossip,
            taking: Default::default(),
        };
        let list: Vec<SignedRevocation> = match std::fs::read(&store.path) {
            Ok(bytes) => postcard::from_bytes(&bytes).map_err(|e| {
                format!(
                    "{}: not a revocation list ({e}); move it away to start with none, \
                     and the hub sends the list again when the relay connects",
                    store.path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", store.path.display())),
        };
        if !list.is_empty() {
            let (set, _) = store.verified(&list);
            info!(entries = set.len(), digest = %set.digest(), "revocation list taken back from disk");
            store.enforce(set).await;
        }
        Ok(store)
    }

    fn verified(&self, list: &[SignedRevocation]) -> (RevocationSet, usize) {
        let now = (trellis_node::clock::unix_ms() / 1000) as i64;
        let (set, errors) = RevocationSet::verified(self.creds.ca_der(), list, now);
        for error in &errors {
            warn!(%error, "revocation from the hub ignored");
        }
        (set, errors.len())
    }

    async fn enforce(&self, set: RevocationSet) {
        let (value, left_out) = revocation::gossip_value(&set.signed());
        if left_out > 0 {
            error!(
                left_out,
                limit_bytes = revocation::MAX_GOSSIP_BYTES,
                "revocation list too long for gossip: the oldest entries are not published to the site's nodes (the relay still enforces them)"
            );
        }
        self.creds.revocations().replace(set);
        self.gossip
            .set(
                vec![(revocation::GOSSIP_KEY.to_owned(), value)],
                revocation::GOSSIP_KEY,
            )
            .await;
    }

    /// Takes the hub's list: keeps it durably, then enforces and
    /// publishes it. Returns the number of entries and the set's digest,
    /// which the hub compares with its own.
    pub async fn take(&self, list: Vec<SignedRevocation>) -> Result<(u64, String), String> {
        let _one = self.taking.lock().await;
        let (set, _) = self.verified(&list);
        let digest = set.digest();
        let entries = set.len() as u64;
        if digest != self.creds.revocations().current().digest() {
            let bytes = postcard::to_stdvec(&set.signed()).expect("revocations serialise");
            trellis_node::apply::write_atomic(&self.path, &bytes, 0o600).map_err(|e| {
                format!(
                    "cannot keep the revocation list in {}: {e}",
                    self.path.display()
                )
            })?;
            info!(entries, %digest, "revocation list from the hub kept; enforcing it and telling the site");
            self.enforce(set).await;
        }
        Ok((entries, digest))
    }
}
