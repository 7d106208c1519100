//! The relay's copy of the revocation list: sent by the hub on every
//! uplink connection and change, kept on disk so that the site still
//! enforces it after a restart during a WAN outage, enforced by the
//! relay's own endpoint, and published to the site's nodes in gossip
//! ([`trellis_node::revocation::GOSSIP_KEY`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::{error, info, warn};
use trellis_node::gossip::Gossip;
use trellis_node::revocation::{self, Kind, RevocationSet, Revocations, SignedRevocation};
use trellis_node::tls::Credentials;

/// Where the list is kept, next to the outage buffer.
pub fn path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("revocations")
}

/// How long a list that only adds decommissions is published to the site
/// before the relay's endpoint enforces it: a node reads the list from
/// gossip every 2 s (`agent::REVOCATION_POLL`) and stops by itself when it
/// finds its own decommission, which it could not hear once the relay
/// refused it. A revocation (`trellis ca revoke`) is enforced at once.
pub const DECOMMISSION_GRACE: Duration = Duration::from_secs(5);

/// Whether `new` differs from `old` only by added decommissions.
pub fn only_adds_decommissions(old: &RevocationSet, new: &RevocationSet) -> bool {
    let before: std::collections::HashMap<[u8; 32], Kind> = old
        .entries()
        .into_iter()
        .map(|r| (r.fingerprint, r.kind))
        .collect();
    let mut added = 0;
    for r in new.entries() {
        match before.get(&r.fingerprint) {
            Some(kind) if *kind == r.kind => {}
            None if r.kind == Kind::Decommissioned => added += 1,
            _ => return false,
        }
    }
    added > 0 && added + before.len() == new.len()
}

pub struct RevocationStore {
    path: PathBuf,
    creds: Credentials,
    gossip: Arc<Gossip>,
    /// One list taken at a time, so the file and the gossip value follow
    /// the newest.
    taking: tokio::sync::Mutex<()>,
    /// Counts lists taken, so that a list enforced after
    /// [`DECOMMISSION_GRACE`] is not enforced over a newer one.
    taken: Arc<AtomicU64>,
    /// The digest of the newest list taken (in force, or in its grace).
    latest: std::sync::Mutex<Option<String>>,
    /// The newest list taken, published at once (the endpoint's may wait
    /// out a grace).
    published: Revocations,
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
            taken: Default::default(),
            latest: Default::default(),
            published: Default::default(),
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
            store.enforce(set, false).await;
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

    /// Publishes `set` to the site and enforces it: at once, or with
    /// `grace_allowed` after [`DECOMMISSION_GRACE`] if it only adds
    /// decommissions.
    async fn enforce(&self, set: RevocationSet, grace_allowed: bool) {
        let this = self.taken.fetch_add(1, Ordering::SeqCst) + 1;
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(set.digest());
        self.published.replace(set.clone());
        let grace =
            grace_allowed && only_adds_decommissions(&self.creds.revocations().current(), &set);
        let (value, left_out) = revocation::gossip_value(&set.signed());
        if left_out > 0 {
            error!(
                left_out,
                limit_bytes = revocation::MAX_GOSSIP_BYTES,
                "revocation list too long for gossip: the oldest entries are not published to the site's nodes (the relay still enforces them)"
            );
        }
        let later = if grace {
            Some(set)
        } else {
            self.creds.revocations().replace(set);
            None
        };
        self.gossip
            .set(
                vec![(revocation::GOSSIP_KEY.to_owned(), value)],
                revocation::GOSSIP_KEY,
            )
            .await;
        if let Some(set) = later {
            // Told first, refused a little later: the node stops by itself.
            info!(
                grace_s = DECOMMISSION_GRACE.as_secs(),
                "decommission published to the site; enforcing it after a grace"
            );
            let (creds, taken) = (self.creds.clone(), self.taken.clone());
            tokio::spawn(async move {
                tokio::time::sleep(DECOMMISSION_GRACE).await;
                if taken.load(Ordering::SeqCst) == this {
                    creds.revocations().replace(set);
                }
            });
        }
    }

    /// The newest list taken, as the site was told it: what the relay's
    /// views leave out (decommissioned members) follows this one.
    pub fn published(&self) -> Revocations {
        self.published.clone()
    }

    /// Takes the hub's list: keeps it durably, then enforces and
    /// publishes it. Returns the number of entries and the set's digest,
    /// which the hub compares with its own.
    pub async fn take(&self, list: Vec<SignedRevocation>) -> Result<(u64, String), String> {
        let _one = self.taking.lock().await;
        let (set, _) = self.verified(&list);
        let digest = set.digest();
        let entries = set.len() as u64;
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // The same list sent again (a reconnect) changes nothing, and does
        // not restart a grace.
        if latest.as_ref() != Some(&digest) && digest != self.creds.revocations().current().digest()
        {
            let bytes = postcard::to_stdvec(&set.signed()).expect("revocations serialise");
            trellis_node::apply::write_atomic(&self.path, &bytes, 0o600).map_err(|e| {
                format!(
                    "cannot keep the revocation list in {}: {e}",
                    self.path.display()
                )
            })?;
            info!(entries, %digest, "revocation list from the hub kept; enforcing it and telling the site");
            self.enforce(set, true).await;
        }
        Ok((entries, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_node::revocation::Revocation;
    use trellis_node::tls::MeshCa;

    fn set(ca: &MeshCa, entries: &[(u8, Kind)]) -> RevocationSet {
        let mut set = RevocationSet::default();
        for (fp, kind) in entries {
            let r = Revocation {
                fingerprint: [*fp; 32],
                identity: format!("trellis://node/eu/par/n{fp}"),
                not_after: i64::MAX,
                at: 100,
                kind: *kind,
                reason: "test".into(),
            };
            let signed = ca.sign_revocation(&r).unwrap();
            set.insert(r, signed, 200);
        }
        set
    }

    #[test]
    fn only_a_list_that_adds_nothing_but_decommissions_waits_out_the_grace() {
        let ca = MeshCa::generate("mesh").unwrap();
        let (d, r) = (Kind::Decommissioned, Kind::Revoked);
        let none = set(&ca, &[]);
        let one_revoked = set(&ca, &[(1, r)]);
        assert!(only_adds_decommissions(&none, &set(&ca, &[(2, d)])));
        assert!(only_adds_decommissions(
            &one_revoked,
            &set(&ca, &[(1, r), (2, d), (3, d)])
        ));
        // A revocation among the additions is enforced at once.
        assert!(!only_adds_decommissions(
            &none,
            &set(&ca, &[(1, r), (2, d)])
        ));
        // So is a change of kind, a removal, or no change at all.
        assert!(!only_adds_decommissions(
            &set(&ca, &[(1, d)]),
            &set(&ca, &[(1, r)])
        ));
        assert!(!only_adds_decommissions(
            &set(&ca, &[(1, r), (2, d)]),
            &set(&ca, &[(2, d), (3, d)])
        ));
        assert!(!only_adds_decommissions(&one_revoked, &one_revoked));
    }
}
