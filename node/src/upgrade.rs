//! Upgrading the node agent with Trellis itself: a release of `trellis-node`
//! is an ordinary patch whose artifact is the new binary, rolled out in
//! waves with gates and automatic rollback like any other.
//!
//! The builds a node may run are kept in `[patch] dir/upgrade/`, and
//! `upgrade/selected.json` says which one runs:
//! - `base`: the binary first started (the packaged `/usr/bin/trellis-node`),
//!   run when nothing else is selected;
//! - `current`: the build selected by the last install, and `previous`, the
//!   one it replaced, for a revert;
//! - `trial`: set while `current` has not yet proved itself (its patch run
//!   is not yet healthy). A start of anything else while the trial build was
//!   started means the trial build died: the start reverts to `previous`
//!   and says so (`failed_start`), which fails the patch run and lets the
//!   rollout's gate roll it back.
//!
//! A patch's `install` command `"$TRELLIS_NODE" upgrade install FILE`
//! checks that FILE runs here and reports a version, keeps a copy and
//! selects it; once the install commands have run the agent stops as it
//! does on SIGTERM and replaces itself (`exec`, same process, same
//! arguments) with the selected build, which bakes the run again from its
//! start. The `rollback` command `"$TRELLIS_NODE" upgrade revert FILE`
//! selects the build that ran before FILE, and the agent restarts into it
//! the same way. A build that crashes at start needs a supervisor to start
//! the agent again (the packaged unit restarts it on failure); that start
//! finds the trial build dead and reverts.
//!
//! The version a build reports is stamped in its binary
//! ([`version`]: `TRELLIS_VERSION` at build time, else the crate's version).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::apply::{write_atomic, write_atomic_with};

/// The variable naming the agent's own binary in a patch command's
/// environment.
pub const ENV_NODE: &str = "TRELLIS_NODE";
/// The variable naming the agent's `[patch] dir` in a patch command's
/// environment.
pub const ENV_PATCH_DIR: &str = "TRELLIS_PATCH_DIR";

const STAMP_MARK_LEN: usize = 16;
/// The longest version a build stamp holds.
pub const MAX_STAMPED_VERSION: usize = 64;
const STAMP_LEN: usize = STAMP_MARK_LEN + MAX_STAMPED_VERSION;

/// `trellis-version:` then the version, padded with NUL bytes.
const fn stamp(version: &str) -> [u8; STAMP_LEN] {
    let mark = b"trellis-version:";
    let v = version.as_bytes();
    assert!(v.len() <= MAX_STAMPED_VERSION, "version too long to stamp");
    let mut out = [0u8; STAMP_LEN];
    let mut i = 0;
    while i < STAMP_MARK_LEN {
        out[i] = mark[i];
        i += 1;
    }
    let mut j = 0;
    while j < v.len() {
        out[STAMP_MARK_LEN + j] = v[j];
        j += 1;
    }
    out
}

/// The build's version stamp, kept in the binary where a release step (or a
/// test) can find and rewrite it ([`restamp`]).
#[used]
static BUILD_STAMP: [u8; STAMP_LEN] = stamp(match option_env!("TRELLIS_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
});

/// The Trellis version this binary is: its stamp, read at run time so that
/// a restamped binary reports what it was stamped with.
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        // SAFETY: a plain read of an initialised static; volatile so that
        // the value in the binary, not the one compiled in, is read.
        let bytes = unsafe { std::ptr::read_volatile(&raw const BUILD_STAMP) };
        let v = &bytes[STAMP_MARK_LEN..];
        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
        String::from_utf8_lossy(&v[..end]).into_owned()
    })
}

/// `binary` with its version stamp rewritten to `version`: the same build,
/// reporting another version. Refuses a binary with no stamp or more than
/// one.
pub fn restamp(binary: &[u8], version: &str) -> Result<Vec<u8>, String> {
    if version.is_empty()
        || version.len() > MAX_STAMPED_VERSION
        || version.bytes().any(|b| b.is_ascii_control() || b == b' ')
    {
        return Err(format!(
            "a stamped version is 1 to {MAX_STAMPED_VERSION} bytes without spaces or control characters"
        ));
    }
    // Built at run time, so this function's own search pattern is not a
    // second stamp in the binary it is linked into.
    let mark = [b"trellis-".as_slice(), b"version:"].concat();
    let found: Vec<usize> = binary
        .windows(STAMP_MARK_LEN)
        .enumerate()
        .filter(|(_, w)| *w == mark.as_slice())
        .map(|(i, _)| i)
        .filter(|i| binary.len() >= i + STAMP_LEN)
        .collect();
    let [at] = found[..] else {
        return Err(format!(
            "expected one trellis version stamp in the binary, found {}",
            found.len()
        ));
    };
    let mut out = binary.to_vec();
    let slot = &mut out[at + STAMP_MARK_LEN..at + STAMP_LEN];
    slot.fill(0);
    slot[..version.len()].copy_from_slice(version.as_bytes());
    Ok(out)
}

/// One build of the agent kept on this machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub path: PathBuf,
    pub version: String,
    /// BLAKE3 of the binary, hex.
    pub blake3: String,
}

/// Which build of the agent runs (`upgrade/selected.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// The binary first started, run when no other build is selected.
    pub base: PathBuf,
    /// BLAKE3 of `base` when it was recorded: a base found changed was
    /// replaced by a package upgrade, which then wins over the builds
    /// patches installed.
    #[serde(default)]
    pub base_blake3: Option<String>,
    pub current: Option<Build>,
    pub previous: Option<Build>,
    /// Set while `current` has not proved itself: `false` until it was
    /// started, `true` once it was.
    pub trial: Option<bool>,
    /// Why a selected build was given up at a start, until the patch engine
    /// has reported it.
    pub failed_start: Option<String>,
}

impl Selection {
    /// The binary that should be running.
    pub fn wanted(&self) -> &Path {
        self.current.as_ref().map_or(&self.base, |b| &b.path)
    }

    /// Gives up `current` for `previous`, saying why.
    fn give_up(&mut self, why: String) {
        let gone = self.current.take();
        self.current = self.previous.take();
        self.trial = None;
        let back = self
            .current
            .as_ref()
            .map_or("the base build".to_owned(), |b| {
                format!("trellis-node {}", b.version)
            });
        let what = gone.map_or("the selected build".to_owned(), |b| {
            format!("trellis-node {}", b.version)
        });
        self.failed_start = Some(format!("{what} {why}; back to {back}"));
    }
}

/// What went wrong with the upgrade state.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is damaged: {source}")]
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The directory the agent's builds are kept in.
pub fn upgrade_dir(patch_dir: &Path) -> PathBuf {
    patch_dir.join("upgrade")
}

fn selection_path(patch_dir: &Path) -> PathBuf {
    upgrade_dir(patch_dir).join("selected.json")
}

/// The selection, if any build was ever installed.
pub fn load(patch_dir: &Path) -> Result<Option<Selection>, UpgradeError> {
    let path = selection_path(patch_dir);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| UpgradeError::Damaged { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(UpgradeError::Read { path, source }),
    }
}

fn save(patch_dir: &Path, sel: &Selection) -> Result<(), UpgradeError> {
    let path = selection_path(patch_dir);
    let json = serde_json::to_vec_pretty(sel).expect("selection serialises");
    write_atomic(&path, &json, 0o600).map_err(|source| UpgradeError::Write { path, source })
}

/// Runs `binary --version` (10 s at most) and returns the version it
/// reports: proof that it is a `trellis-node` that runs on this machine.
pub fn probe(binary: &Path) -> Result<String, String> {
    let mut child = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{} does not run here: {e}", binary.display()))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not answer within 10 s",
                    binary.display()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", binary.display())),
        }
    };
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    let version = out
        .trim()
        .strip_prefix("trellis-node ")
        .filter(|v| !v.is_empty() && !v.contains(char::is_whitespace));
    match (status.success(), version) {
        (true, Some(v)) => Ok(v.to_owned()),
        _ => Err(format!(
            "{} is not a trellis-node build that runs here: --version exited {status} and printed {:?}",
            binary.display(),
            out.trim()
        )),
    }
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Checks `new` ([`probe`]), keeps a copy in the upgrade directory and
/// selects it, on trial. `running` is the binary of the agent (the base,
/// the first time).
pub fn install(patch_dir: &Path, new: &Path, running: &Path) -> Result<Build, String> {
    let blake3 = hash_file(new).map_err(|e| format!("cannot read {}: {e}", new.display()))?;
    let dir = upgrade_dir(patch_dir);
    // The copy, executable (a patch's artifacts arrive as plain files), is
    // what is probed and what runs.
    let kept = dir.join(format!("trellis-node-{}", &blake3[..16]));
    let mut source =
        std::fs::File::open(new).map_err(|e| format!("cannot read {}: {e}", new.display()))?;
    write_atomic_with(&kept, 0o755, |f| std::io::copy(&mut source, f).map(|_| ()))
        .map_err(|e| format!("cannot keep a copy at {}: {e}", kept.display()))?;
    let kept = kept
        .canonicalize()
        .map_err(|e| format!("{}: {e}", kept.display()))?;
    let version = probe(&kept).inspect_err(|_| {
        let _ = std::fs::remove_file(&kept);
    })?;
    let mut sel = match load(patch_dir).map_err(|e| e.to_string())? {
        Some(s) => s,
        None => Selection {
            base: running
                .canonicalize()
                .unwrap_or_else(|_| running.to_owned()),
            base_blake3: hash_file(running).ok(),
            current: None,
            previous: None,
            trial: None,
            failed_start: None,
        },
    };
    let build = Build {
        path: kept,
        version,
        blake3,
    };
    if sel.current.as_ref() != Some(&build) {
        sel.previous = sel.current.take();
        sel.current = Some(build.clone());
    }
    sel.trial = Some(false);
    sel.failed_start = None;
    save(patch_dir, &sel).map_err(|e| e.to_string())?;
    remove_unselected(&dir, &sel);
    Ok(build)
}

/// Removes the kept builds that are neither selected nor the one a revert
/// would select: at most two builds stay on the machine.
fn remove_unselected(dir: &Path, sel: &Selection) {
    let keep: Vec<&Path> = [&sel.current, &sel.previous]
        .into_iter()
        .flatten()
        .map(|b| b.path.as_path())
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let is_build = e.file_name().to_string_lossy().starts_with("trellis-node-");
        if is_build && !keep.iter().any(|k| same_file(k, &path)) {
            match std::fs::remove_file(&path) {
                Ok(()) => info!(build = %path.display(), "removed a build no longer selected"),
                Err(error) => {
                    warn!(build = %path.display(), %error, "cannot remove a build no longer selected")
                }
            }
        }
    }
}

/// What [`revert`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reverted {
    /// `current` was the build and `previous` (or the base) is selected.
    To(Option<Build>),
    /// The build is not the one selected (already reverted, or never
    /// selected): nothing changed.
    NotSelected,
}

/// Selects the build that ran before `build` (the artifact the install
/// selected), if `build` is still the one selected.
pub fn revert(patch_dir: &Path, build: &Path) -> Result<Reverted, String> {
    let blake3 = hash_file(build).map_err(|e| format!("cannot read {}: {e}", build.display()))?;
    let Some(mut sel) = load(patch_dir).map_err(|e| e.to_string())? else {
        return Ok(Reverted::NotSelected);
    };
    if sel.current.as_ref().is_none_or(|c| c.blake3 != blake3) {
        return Ok(Reverted::NotSelected);
    }
    sel.current = sel.previous.take();
    sel.trial = None;
    save(patch_dir, &sel).map_err(|e| e.to_string())?;
    Ok(Reverted::To(sel.current))
}

/// Ends the trial of the selected build: it runs healthy.
pub fn confirm(patch_dir: &Path) -> Result<(), UpgradeError> {
    match load(patch_dir)? {
        Some(mut sel) if sel.trial.is_some() => {
            sel.trial = None;
            save(patch_dir, &sel)
        }
        _ => Ok(()),
    }
}

/// Why a selected build was given up at a start, once: the patch engine
/// reports it as the run's failure.
pub fn take_failed_start(patch_dir: &Path) -> Result<Option<String>, UpgradeError> {
    match load(patch_dir)? {
        Some(mut sel) if sel.failed_start.is_some() => {
            let why = sel.failed_start.take();
            save(patch_dir, &sel)?;
            Ok(why)
        }
        _ => Ok(None),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => a == b,
    }
}

/// Whether the agent runs the build it should.
#[derive(Debug, PartialEq, Eq)]
pub enum Launch {
    Continue,
    /// Replace this process with this binary.
    Exec(PathBuf),
}

/// Decides, for an agent running `running`, which build should run, and
/// keeps the trial's count: the trial build started means `trial` true; a
/// start of another binary while it is true means the trial build died.
pub fn select(patch_dir: &Path, running: &Path) -> Result<Launch, UpgradeError> {
    let Some(mut sel) = load(patch_dir)? else {
        return Ok(Launch::Continue);
    };
    if same_file(&sel.base, running)
        && sel.current.is_some()
        && hash_file(running).ok() != sel.base_blake3
    {
        // A package upgrade replaced the base binary: it is newer than
        // what patches selected, which are forgotten.
        info!(base = %sel.base.display(), version = version(), "the installed trellis-node changed since a patch selected another build; running the installed one");
        sel.base_blake3 = hash_file(running).ok();
        sel.current = None;
        sel.previous = None;
        sel.trial = None;
        save(patch_dir, &sel)?;
        return Ok(Launch::Continue);
    }
    let is_current = sel
        .current
        .as_ref()
        .is_some_and(|c| same_file(&c.path, running));
    match sel.trial {
        Some(true) if !is_current => {
            sel.give_up("did not come up healthy (it stopped during its trial)".to_owned());
            warn!(
                why = sel.failed_start.as_deref().unwrap_or(""),
                "gave up a trial build"
            );
            save(patch_dir, &sel)?;
        }
        Some(false) if !is_current && sel.current.is_some() => {
            // About to start the trial build.
            sel.trial = Some(true);
            save(patch_dir, &sel)?;
        }
        Some(false) if is_current => {
            // Started by hand rather than by a restart: the trial runs now.
            sel.trial = Some(true);
            save(patch_dir, &sel)?;
        }
        _ => {}
    }
    let wanted = sel.wanted();
    if same_file(wanted, running) {
        Ok(Launch::Continue)
    } else {
        Ok(Launch::Exec(wanted.to_owned()))
    }
}

/// Replaces this process with `binary`, same arguments and environment.
/// Returns only if that fails.
pub fn exec(binary: &Path) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    info!(binary = %binary.display(), "restarting into another build of trellis-node");
    std::process::Command::new(binary)
        .args(std::env::args_os().skip(1))
        .exec()
}

/// At start, before anything is bound: replaces this process with the
/// selected build if it is another one. A build that cannot be started is
/// given up (reported by the patch engine) and this one goes on.
pub fn launch(patch_dir: &Path) {
    let Ok(running) = std::env::current_exe() else {
        return;
    };
    for _ in 0..2 {
        match select(patch_dir, &running) {
            Ok(Launch::Continue) => return,
            Ok(Launch::Exec(binary)) => {
                let e = exec(&binary);
                error!(binary = %binary.display(), error = %e, "cannot start the selected build");
                if let Err(e) = give_up(patch_dir, &format!("cannot be started ({e})")) {
                    error!(error = %e, "cannot record the failed start");
                    return;
                }
            }
            Err(e) => {
                error!(error = %e, "cannot read which build to run; running this one");
                return;
            }
        }
    }
}

fn give_up(patch_dir: &Path, why: &str) -> Result<(), UpgradeError> {
    if let Some(mut sel) = load(patch_dir)? {
        sel.give_up(why.to_owned());
        save(patch_dir, &sel)?;
    }
    Ok(())
}

static RESTART: Mutex<Option<PathBuf>> = Mutex::new(None);
static RESTART_ALLOWED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says the agent runs as its own process (a member binary), which may
/// replace itself. An agent inside another process (`trellis up`) may not.
pub fn allow_restart() {
    RESTART_ALLOWED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`allow_restart`] was called.
pub fn restart_allowed() -> bool {
    RESTART_ALLOWED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Asks the process to replace itself with the selected build once the
/// agent has stopped (the caller cancels the agent's shutdown token).
pub fn request_restart(patch_dir: &Path) {
    *RESTART.lock().unwrap_or_else(|p| p.into_inner()) = Some(patch_dir.to_owned());
}

static REEXEC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks the process to replace itself with its own binary once the agent
/// has stopped: to start again on renewed credentials.
pub fn request_reexec() {
    REEXEC.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// After the agent stopped: if a restart was asked for, replaces the
/// process with the selected build ([`launch`]), or with itself. Returns
/// whether a restart was asked for and did not happen (the build could not
/// be started and was given up), in which case the process should exit
/// with a failure so that its service manager starts it again.
pub fn restart_if_requested() -> bool {
    let asked = RESTART.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(patch_dir) = asked {
        launch(&patch_dir);
        return true;
    }
    if REEXEC.swap(false, std::sync::atomic::Ordering::SeqCst) {
        match std::env::current_exe() {
            Ok(exe) => {
                let e = exec(&exe);
                error!(error = %e, "cannot start again");
            }
            Err(e) => error!(error = %e, "cannot tell which binary runs"),
        }
        return true;
    }
    false
}

/// Whether the selected build is another binary than `running`.
pub fn restart_needed(patch_dir: &Path, running: &Path) -> bool {
    matches!(load(patch_dir), Ok(Some(sel)) if !same_file(sel.wanted(), running))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn the_stamp_holds_the_crate_version_and_a_restamped_copy_reports_another() {
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
        let mut fake = vec![7u8; 100];
        fake.extend_from_slice(&stamp("0.1.0"));
        fake.extend_from_slice(&[9u8; 10]);
        let out = restamp(&fake, "0.2.0-rc1").unwrap();
        assert_eq!(out.len(), fake.len());
        let at = 100 + STAMP_MARK_LEN;
        assert_eq!(&out[at..at + 9], b"0.2.0-rc1");
        assert!(
            out[at + 9..at + MAX_STAMPED_VERSION]
                .iter()
                .all(|b| *b == 0)
        );
        assert!(
            restamp(&out, "0.3").is_ok(),
            "a stamp can be rewritten again"
        );
        assert!(restamp(&[1, 2, 3], "1").unwrap_err().contains("found 0"));
        let mut two = fake.clone();
        two.extend_from_slice(&stamp("x"));
        assert!(restamp(&two, "1").unwrap_err().contains("found 2"));
        assert!(restamp(&fake, "has space").is_err());
        assert!(restamp(&fake, &"9".repeat(65)).is_err());
    }

    #[test]
    fn a_build_that_does_not_answer_its_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = script(dir.path(), "good", "echo 'trellis-node 9.1'");
        assert_eq!(probe(&good).unwrap(), "9.1");
        let wrong = script(dir.path(), "wrong", "echo 'something 9.1'");
        assert!(
            probe(&wrong)
                .unwrap_err()
                .contains("not a trellis-node build")
        );
        let failing = script(dir.path(), "failing", "echo 'trellis-node 9.1'; exit 3");
        assert!(probe(&failing).is_err());
        std::fs::write(dir.path().join("garbage"), [0x7f, b'E', b'L', b'F', 0, 0]).unwrap();
        assert!(probe(&dir.path().join("garbage")).is_err());
    }

    #[test]
    fn install_selects_on_trial_a_start_proves_it_and_a_revert_goes_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let patches = dir.path().join("patches");
        let base = script(dir.path(), "base", "echo 'trellis-node 1.0'");
        let next = script(dir.path(), "next", "echo 'trellis-node 1.1'");

        let b = install(&patches, &next, &base).unwrap();
        assert_eq!(b.version, "1.1");
        assert!(
            b.path
                .starts_with(upgrade_dir(&patches).canonicalize().unwrap())
        );
        // The old agent restarts into the kept copy: its trial begins.
        assert_eq!(
            select(&patches, &base).unwrap(),
            Launch::Exec(b.path.clone())
        );
        assert_eq!(load(&patches).unwrap().unwrap().trial, Some(true));
        // The new build starts and goes on; healthy, it is confirmed.
        assert_eq!(select(&patches, &b.path).unwrap(), Launch::Continue);
        confirm(&patches).unwrap();
        assert_eq!(load(&patches).unwrap().unwrap().trial, None);
        // A restart of the base (a reboot) runs the selected build.
        assert_eq!(
            select(&patches, &base).unwrap(),
            Launch::Exec(b.path.clone())
        );
        // The rollback reverts once; a second revert changes nothing.
        assert_eq!(revert(&patches, &next).unwrap(), Reverted::To(None));
        assert_eq!(
            select(&patches, &b.path).unwrap(),
            Launch::Exec(base.canonicalize().unwrap())
        );
        assert_eq!(revert(&patches, &next).unwrap(), Reverted::NotSelected);
        assert_eq!(take_failed_start(&patches).unwrap(), None);
    }

    #[test]
    fn a_trial_build_that_dies_is_given_up_at_the_next_start_and_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let patches = dir.path().join("patches");
        let base = script(dir.path(), "base", "echo 'trellis-node 1.0'");
        let good = script(dir.path(), "good", "echo 'trellis-node 1.1'");
        let bad = script(dir.path(), "bad", "echo 'trellis-node 1.2'");
        let g = install(&patches, &good, &base).unwrap();
        assert_eq!(
            select(&patches, &base).unwrap(),
            Launch::Exec(g.path.clone())
        );
        assert_eq!(select(&patches, &g.path).unwrap(), Launch::Continue);
        confirm(&patches).unwrap();
        // 1.1 installs 1.2 and restarts into it; 1.2 dies; the supervisor
        // starts the base again, which finds the trial build dead.
        let third = script(dir.path(), "third", "echo 'trellis-node 1.3'");
        let t = install(&patches, &third, &g.path).unwrap();
        assert_eq!(
            revert(&patches, &third).unwrap(),
            Reverted::To(Some(g.clone()))
        );
        let b = install(&patches, &bad, &g.path).unwrap();
        // Only the selected build and the one before it are kept.
        assert!(!t.path.exists());
        let kept = std::fs::read_dir(upgrade_dir(&patches)).unwrap().count();
        assert_eq!(kept, 3, "two builds and the selection");
        assert_eq!(
            select(&patches, &g.path).unwrap(),
            Launch::Exec(b.path.clone())
        );
        assert_eq!(
            select(&patches, &base).unwrap(),
            Launch::Exec(g.path.clone())
        );
        let why = take_failed_start(&patches).unwrap().unwrap();
        assert!(
            why.contains("trellis-node 1.2 did not come up healthy"),
            "{why}"
        );
        assert!(why.contains("back to trellis-node 1.1"), "{why}");
        assert_eq!(take_failed_start(&patches).unwrap(), None);
        // The patch's rollback then has nothing left to revert.
        assert_eq!(revert(&patches, &bad).unwrap(), Reverted::NotSelected);
        assert_eq!(select(&patches, &g.path).unwrap(), Launch::Continue);
    }

    #[test]
    fn a_package_upgrade_of_the_base_wins_over_the_builds_patches_selected() {
        let dir = tempfile::tempdir().unwrap();
        let patches = dir.path().join("patches");
        let base = script(dir.path(), "base", "echo 'trellis-node 1.0'");
        let next = script(dir.path(), "next", "echo 'trellis-node 1.1'");
        let b = install(&patches, &next, &base).unwrap();
        assert_eq!(
            select(&patches, &base).unwrap(),
            Launch::Exec(b.path.clone())
        );
        // The package manager installs 2.0 over the base, and restarts it.
        script(dir.path(), "base", "echo 'trellis-node 2.0'");
        assert_eq!(select(&patches, &base).unwrap(), Launch::Continue);
        let sel = load(&patches).unwrap().unwrap();
        assert_eq!((sel.current, sel.previous, sel.trial), (None, None, None));
        assert_eq!(select(&patches, &base).unwrap(), Launch::Continue);
    }

    #[test]
    fn a_damaged_selection_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(upgrade_dir(dir.path())).unwrap();
        std::fs::write(selection_path(dir.path()), b"{not json").unwrap();
        let e = select(dir.path(), Path::new("/bin/sh"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("selected.json is damaged"), "{e}");
    }
}
