//! What one node must look like: the managed files and remediation
//! runbooks resolved for it from the fleet's desired configuration.
//!
//! This is the seam between the two halves of configuration management:
//! the fleet configuration (`desired`) turns a directory of manifests into a
//! [`ManagedState`] for a node (selectors, precedence, templating), and
//! the apply engine (`apply`) makes a machine match a [`ManagedState`] and keeps it
//! so (atomic writes, reload commands, drift). Both halves are tested
//! against this type alone.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::runbook::Runbook;

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
    /// Remediation runbooks by name (each filed under its own `name`).
    /// Absent from states saved before runbooks existed, and left out of
    /// the JSON when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runbooks: BTreeMap<String, Runbook>,
}

impl ManagedState {
    /// The same state with every path moved under `root` (`/etc/motd` →
    /// `ROOT/etc/motd`): `[config] root`. Runbooks are kept as they are
    /// (their commands are not rewritten).
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
            runbooks: self.runbooks,
        }
    }

    /// A hash of what this state manages (paths, contents, modes, reload
    /// commands, in path order; then, only if there are any, the runbooks
    /// in name order, each as its name and its JSON encoding; the version is
    /// left out, so two versions that manage the same things hash the
    /// same). Nodes publish it so that anyone can tell whether two nodes are
    /// configured alike. A state without runbooks hashes as it did before
    /// runbooks existed.
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
        if !self.runbooks.is_empty() {
            // Where a file's path length would be: no path is this long, so
            // the runbooks cannot be mistaken for files.
            ctx.update(&u64::MAX.to_le_bytes());
            ctx.update(&(self.runbooks.len() as u64).to_le_bytes());
            for (name, runbook) in &self.runbooks {
                // Plain structs, strings and durations always encode.
                let json = serde_json::to_vec(runbook).expect("a runbook encodes as JSON");
                for part in [name.as_bytes(), &json] {
                    ctx.update(&(part.len() as u64).to_le_bytes());
                    ctx.update(part);
                }
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

    fn runbook(name: &str, run: &str) -> Runbook {
        toml::from_str(&format!(
            "name = {name:?}\ncheck = \"disk\"\nrun = {run:?}\n"
        ))
        .unwrap()
    }

    #[test]
    fn without_runbooks_the_hash_is_what_it_was_and_with_them_it_covers_them() {
        // SHA-256 of the encoding before runbooks existed: no files at all,
        // and one file (/etc/a, "x", 0644, no reload commands).
        let hex = |h: [u8; 32]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(ManagedState::default().hash()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let mut a = ManagedState::default();
        a.files.insert("/etc/a".into(), file("/etc/a", "x"));
        assert_eq!(
            hex(a.hash()),
            "c3cfbe5efa611804812e649c96782437ae368eac0d1e23cf6c7f34877e58ca9b"
        );
        let base = a.hash();
        let mut r = a.clone();
        r.runbooks
            .insert("clean".into(), runbook("clean", "rm -rf /var/tmp/x"));
        let with = r.hash();
        assert_ne!(with, base);
        // Any detail of a runbook counts, and the version still does not.
        let mut d = r.clone();
        d.runbooks.get_mut("clean").unwrap().dry_run = true;
        assert_ne!(d.hash(), with);
        let mut v = r.clone();
        v.version = 7;
        assert_eq!(v.hash(), with);
        // Runbooks alone are not mistaken for no state at all.
        let mut only = ManagedState::default();
        only.runbooks
            .insert("clean".into(), runbook("clean", "true"));
        assert_ne!(only.hash(), ManagedState::default().hash());
    }

    #[test]
    fn a_state_saved_without_runbooks_loads_and_one_without_them_saves_as_before() {
        let old = r#"{"version":3,"files":{"/etc/a":{"path":"/etc/a","content":[120],"mode":420,"reload":[]}}}"#;
        let state: ManagedState = serde_json::from_str(old).unwrap();
        assert_eq!(state.version, 3);
        assert!(state.runbooks.is_empty());
        assert_eq!(serde_json::to_string(&state).unwrap(), old);
        let mut with = state.clone();
        with.runbooks
            .insert("clean".into(), runbook("clean", "true"));
        let json = serde_json::to_string(&with).unwrap();
        assert!(json.contains(r#""runbooks":{"clean":{"#), "{json}");
        let back: ManagedState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn moving_a_state_under_a_root_keeps_its_runbooks() {
        let mut s = ManagedState::default();
        s.files.insert("/etc/a".into(), file("/etc/a", "x"));
        s.runbooks.insert("clean".into(), runbook("clean", "true"));
        let moved = s.clone().under(std::path::Path::new("/srv/root"));
        assert!(moved.files.contains_key("/srv/root/etc/a"));
        assert_eq!(moved.runbooks, s.runbooks);
    }
}
