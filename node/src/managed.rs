//! What one node must look like: the managed files resolved for it from the
//! fleet's desired configuration.
//!
//! This is the seam between the two halves of configuration management:
//! the fleet configuration (`desired`) turns a directory of manifests into a
//! [`ManagedState`] for a node (selectors, precedence, templating), and
//! the apply engine (`apply`) makes a machine match a [`ManagedState`] and keeps it
//! so (atomic writes, reload commands, drift). Both halves are tested
//! against this type alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A file Trellis manages on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedFile {
    /// Absolute path on the node.
    pub path: String,
    /// The exact bytes the file must hold (templates already rendered).
    pub content: Vec<u8>,
    /// Unix permission bits (e.g. `0o644`).
    pub mode: u32,
    /// Shell commands to run, in order, after this file changed.
    pub reload: Vec<String>,
}

/// Everything one node must look like, for one configuration version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedState {
    /// The configuration version this state was resolved from (0: none).
    pub version: u64,
    /// Managed files by absolute path.
    pub files: BTreeMap<String, ManagedFile>,
}

impl ManagedState {
    /// The same state with every path moved under `root` (`/etc/motd` →
    /// `ROOT/etc/motd`): `[config] root`.
    pub fn under(self, root: &std::path::Path) -> ManagedState {
        let files = self
            .files
            .into_values()
            .map(|mut f| {
                let moved = root.join(f.path.trim_start_matches('/'));
                f.path = moved.to_string_lossy().into_owned();
                (f.path.clone(), f)
            })
            .collect();
        ManagedState {
            version: self.version,
            files,
        }
    }

    /// A hash of what this state manages (paths, contents, modes, reload
    /// commands, in path order; the version is left out, so two versions
    /// that manage the same things hash the same). Nodes publish it so that
    /// anyone can tell whether two nodes are configured alike.
    pub fn hash(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for f in self.files.values() {
            for part in [f.path.as_bytes(), &f.content] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part);
            }
            ctx.update(&f.mode.to_le_bytes());
            ctx.update(&(f.reload.len() as u64).to_le_bytes());
            for r in &f.reload {
                ctx.update(&(r.len() as u64).to_le_bytes());
                ctx.update(r.as_bytes());
            }
        }
        let mut out = [0; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// A short hex form of a hash, for gossip and display.
pub fn short_hex(hash: &[u8]) -> String {
    hash.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            content: content.into(),
            mode: 0o644,
            reload: vec![],
        }
    }

    #[test]
    fn the_hash_changes_with_any_managed_detail_but_not_the_version() {
        let mut a = ManagedState::default();
        a.files.insert("/etc/a".into(), file("/etc/a", "x"));
        let base = a.hash();
        let mut v = a.clone();
        v.version = 9;
        assert_eq!(v.hash(), base);
        let mut c = a.clone();
        c.files.get_mut("/etc/a").unwrap().content = b"y".to_vec();
        assert_ne!(c.hash(), base);
        let mut m = a.clone();
        m.files.get_mut("/etc/a").unwrap().mode = 0o600;
        assert_ne!(m.hash(), base);
        let mut r = a.clone();
        r.files.get_mut("/etc/a").unwrap().reload = vec!["true".into()];
        assert_ne!(r.hash(), base);
        // Length prefixes: moving bytes between path and content changes it.
        let mut p = ManagedState::default();
        p.files.insert("/etc/ax".into(), file("/etc/ax", ""));
        let mut q = ManagedState::default();
        q.files.insert("/etc/a".into(), file("/etc/a", "x"));
        assert_ne!(p.hash(), q.hash());
    }
}
