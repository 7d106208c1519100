//! The relay's copy of the newest configuration bundle, kept on disk so a
//! site cut off from every hub, or a relay that restarted during an outage,
//! still serves the last version it was given to its nodes (new nodes
//! joining meanwhile included).
//!
//! One file (`config.bundle` next to the outage buffer), replaced
//! atomically (temporary file, fsync, rename, directory fsync): after a
//! crash it holds the old bundle or the new one. The relay checks the
//! operator's signature before caching and again when it reads the file
//! back, so it never offers its site a bundle nodes would refuse; nodes
//! check it themselves anyway.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use trellis_node::bundle::{self, MAX_BUNDLE_BYTES, SignedBundle};
use trellis_node::distribute::Offer;
use trellis_node::tls::Credentials;

/// File format version.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    signed: SignedBundle,
}

/// Why the cache could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the configuration cache {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the configuration cache {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a cache this relay can read (damaged, or written by
    /// another version); it is ignored and replaced by the next push.
    #[error(
        "configuration cache {path} is unreadable ({reason}); waiting for the hub to push a version again"
    )]
    Unreadable { path: PathBuf, reason: String },
    /// The bundle's signature or content does not check out.
    #[error("configuration cache {path} holds a bundle that fails verification: {source}")]
    Refused {
        path: PathBuf,
        source: Box<bundle::BundleError>,
    },
}

/// Where the cache lives: next to the outage buffer.
pub fn cache_path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("config.bundle")
}

/// Checks a bundle and names it: the version it holds and its digest.
pub fn offer_of(trust: &Credentials, signed: &SignedBundle) -> Result<Offer, bundle::BundleError> {
    let (b, _) = bundle::verify(trust, signed)?;
    Ok(Offer::of(b.version, signed))
}

/// Reads the cached bundle, verified; `Ok(None)` if there is none.
pub fn load(path: &Path, trust: &Credentials) -> Result<Option<(Offer, SignedBundle)>, CacheError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CacheError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let unreadable = |reason: String| CacheError::Unreadable {
        path: path.to_owned(),
        reason,
    };
    if bytes.len() > MAX_BUNDLE_BYTES + (64 << 10) {
        return Err(unreadable(format!(
            "{} bytes, over the bundle limit",
            bytes.len()
        )));
    }
    let file: CacheFile = postcard::from_bytes(&bytes).map_err(|e| unreadable(e.to_string()))?;
    if file.format != FORMAT {
        return Err(unreadable(format!(
            "format {} (this relay reads {FORMAT})",
            file.format
        )));
    }
    let offer = offer_of(trust, &file.signed).map_err(|source| CacheError::Refused {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    Ok(Some((offer, file.signed)))
}

/// Replaces the cached bundle, durably, before the relay offers it.
pub fn store(path: &Path, signed: &SignedBundle) -> Result<(), CacheError> {
    let bytes = postcard::to_stdvec(&CacheFile {
        format: FORMAT,
        signed: signed.clone(),
    })
    .expect("bundles serialise");
    trellis_node::apply::write_atomic(path, &bytes, 0o600).map_err(|source| CacheError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Whether a relay holding `have` takes `offered`: a newer version, or the
/// same version with other bytes (two hubs accepted a version each during a
/// partition; the hubs settle on one and the relay follows). Never an older
/// version: a hub that has not caught up yet must not roll a site back.
pub fn takes(have: Option<&Offer>, offered: &Offer) -> bool {
    match have {
        None => true,
        Some(h) => {
            offered.version > h.version
                || (offered.version == h.version && offered.digest != h.digest)
        }
    }
}

#[cfg(test)]
mod tests {
    use trellis_node::bundle::Bundle;
    use trellis_node::desired::Fleet;
    use trellis_node::id::{Identity, Role};
    use trellis_node::tls::MeshCa;

    use super::*;

    fn signed(ca: &MeshCa, version: u64) -> SignedBundle {
        let op = Credentials::issue(ca, &Identity::new(Role::Operator, "", "", "alice").unwrap())
            .unwrap();
        bundle::sign(
            &op,
            &Bundle {
                version,
                created_ms: 1,
                comment: String::new(),
                fleet: Fleet::from_manifests(vec![]).unwrap(),
            },
        )
        .unwrap()
    }

    fn relay(ca: &MeshCa) -> Credentials {
        Credentials::issue(ca, &Identity::new(Role::Relay, "eu", "par", "r").unwrap()).unwrap()
    }

    #[test]
    fn a_cached_bundle_reads_back_verified_and_none_is_nothing() {
        let ca = MeshCa::generate("test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = cache_path(&dir.path().join("buffer/outage.db"));
        assert!(load(&path, &relay(&ca)).unwrap().is_none());
        let b = signed(&ca, 4);
        store(&path, &b).unwrap();
        let (offer, back) = load(&path, &relay(&ca)).unwrap().unwrap();
        assert_eq!(offer, Offer::of(4, &b));
        assert_eq!(back, b);
    }

    #[test]
    fn a_damaged_or_foreign_cache_is_refused_with_its_path() {
        let ca = MeshCa::generate("test").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.bundle");
        std::fs::write(&path, b"not a bundle").unwrap();
        let err = load(&path, &relay(&ca)).unwrap_err();
        assert!(matches!(err, CacheError::Unreadable { .. }), "{err}");
        assert!(err.to_string().contains("config.bundle"));
        // Signed under another mesh's CA.
        let other = MeshCa::generate("other").unwrap();
        store(&path, &signed(&other, 1)).unwrap();
        let err = load(&path, &relay(&ca)).unwrap_err();
        assert!(matches!(err, CacheError::Refused { .. }), "{err}");
    }

    #[test]
    fn a_relay_takes_newer_versions_and_a_settled_conflict_but_never_an_older_one() {
        let o = |version, d| Offer {
            version,
            digest: [d; 32],
        };
        assert!(takes(None, &o(1, 1)));
        assert!(takes(Some(&o(1, 1)), &o(2, 2)));
        assert!(takes(Some(&o(2, 1)), &o(2, 2)));
        assert!(!takes(Some(&o(2, 1)), &o(2, 1)));
        assert!(!takes(Some(&o(3, 1)), &o(2, 2)));
    }
}
