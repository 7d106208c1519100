//! Members that left the site's views: decommissioned ones (named by the
//! revocation list) and reaped ones (dead past `retention.dead_node`, kept
//! in a file next to the outage buffer so that a restart neither counts
//! them again nor reports them twice).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use trellis_node::id::Identity;
use trellis_node::revocation::RevocationSet;

/// Where the reaped nodes are kept, next to the outage buffer.
pub fn reaped_path(buffer: &Path) -> PathBuf {
    buffer.with_file_name("reaped.json")
}

/// The reaped nodes kept at `path` (name → generation reaped); none when
/// there is no file.
pub fn load_reaped(path: &Path) -> Result<BTreeMap<String, u64>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not a list of reaped nodes ({e}); move it away to start without it \
                 (nodes dead past retention are then reaped, and reported, again)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

pub fn save_reaped(path: &Path, reaped: &BTreeMap<String, u64>) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(reaped).expect("names serialise");
    trellis_node::apply::write_atomic(path, &bytes, 0o600)
        .map_err(|e| format!("cannot keep the reaped nodes in {}: {e}", path.display()))
}

/// The names of this site's decommissioned members.
pub fn decommissioned_in(set: &RevocationSet, region: &str, site: &str) -> BTreeSet<String> {
    set.decommissioned()
        .filter_map(|uri| Identity::from_uri(uri).ok())
        .filter(|id| id.region == region && id.site == site)
        .map(|id| id.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use trellis_node::id::Role;
    use trellis_node::revocation::{Kind, Revocation};
    use trellis_node::tls::{Credentials, MeshCa};

    use super::*;

    #[test]
    fn only_this_sites_decommissioned_members_are_named() {
        let ca = MeshCa::generate("t").unwrap();
        let relay = Identity::new(Role::Relay, "eu", "par", "relay").unwrap();
        let creds = Credentials::issue(&ca, &relay).unwrap();
        let entry = |fp: u8, site: &str, name: &str, kind: Kind| {
            let id = Identity::new(Role::Node, "eu", site, name).unwrap();
            ca.sign_revocation(&Revocation {
                fingerprint: [fp; 32],
                identity: id.to_uri(),
                not_after: i64::MAX,
                at: 1,
                kind,
                reason: String::new(),
            })
            .unwrap()
        };
        let signed = [
            entry(1, "par", "n1", Kind::Decommissioned),
            entry(2, "par", "n2", Kind::Revoked),
            entry(3, "ber", "n3", Kind::Decommissioned),
        ];
        let (set, errors) = RevocationSet::verified(creds.ca_der(), &signed, 0);
        assert!(errors.is_empty());
        assert_eq!(
            decommissioned_in(&set, "eu", "par"),
            BTreeSet::from(["n1".to_owned()])
        );
    }

    #[test]
    fn reaped_nodes_survive_a_restart_and_a_bad_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = reaped_path(&dir.path().join("outage.db"));
        assert!(load_reaped(&path).unwrap().is_empty());
        let reaped = BTreeMap::from([("n1".to_owned(), 7)]);
        save_reaped(&path, &reaped).unwrap();
        assert_eq!(load_reaped(&path).unwrap(), reaped);
        std::fs::write(&path, b"nope").unwrap();
        let err = load_reaped(&path).unwrap_err();
        assert!(
            err.contains("reaped.json") && err.contains("move it away"),
            "{err}"
        );
    }
}
