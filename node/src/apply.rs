//! The apply engine: makes this machine hold the files of a
//! [`ManagedState`] and keeps it so.
//!
//! The deciding part is pure: [`plan_apply`] compares what must be with what
//! is on disk (and with what was applied last) and says which files to write
//! and which reload commands to run; [`check_drift`] says which managed files
//! no longer match what was applied. The driver part does the I/O:
//! [`observe`] reads files, [`write_atomic`] replaces a file so that a crash
//! leaves either the old or the new content, [`run_reload`] runs a command
//! under a timeout, and [`Applier`] ties them together and remembers what it
//! applied across restarts.
//!
//! Choices an operator relies on:
//! - A file that is no longer in the desired state is left in place, as it
//!   is, and simply stops being managed: deleting what an operator might still
//!   need is worse than leaving a stale file, which anyone can remove.
//! - A file's reload commands run when the file was written, or when what is
//!   managed for it differs from what was last recorded as applied (so a file
//!   written by an apply that stopped before its reloads ran gets them on the
//!   next apply); when nothing was recorded, every file counts as new. Each
//!   command runs once per apply, however many changed files list it, and
//!   every command runs even if an earlier one failed, so that one broken
//!   service does not keep the others on stale configuration. Steps that must
//!   not run after a failure belong in one command (`nginx -t && nginx -s
//!   reload`).
//! - A failing reload does not undo anything: the files stay written and the
//!   state is recorded as applied, so drift checks keep the operator's files
//!   rather than fighting them; the apply reports the failure with the
//!   command's output.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::error;

use crate::managed::{ManagedFile, ManagedState};

/// Name prefix of the temporary files [`write_atomic`] renames into place.
/// Any file so named is Trellis's own and is removed by
/// [`remove_leftover_temp_files`]; a managed path may not use it.
pub const TEMP_PREFIX: &str = ".trellis-tmp-";

/// How much of a reload command's output is kept: the end, where the
/// error usually is.
pub const OUTPUT_LIMIT: usize = 4096;

/// The file in the state directory holding the last applied state.
pub const STATE_FILE: &str = "applied.json";

/// The bits of a mode Trellis manages (permissions, setuid, setgid, sticky).
const PERMISSION_BITS: u32 = 0o7777;

/// Version of the state file's layout; another one is not read.
const STATE_FORMAT: u32 = 1;

/// After a reload command ended, how long its output may still take to
/// arrive (a process it left behind may hold the pipes open forever).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Why applying or checking the managed files failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The desired state names a path Trellis refuses to write. Nothing was
    /// written.
    #[error(
        "the desired state names {path:?}, which cannot be managed: {problem}; fix the manifest that sets it"
    )]
    BadPath { path: String, problem: String },
    /// The desired state holds a runbook that makes no sense (a state file
    /// edited by hand, or made by a build that checked less).
    #[error("the desired state's runbook {name:?} cannot be used: {problem}")]
    BadRunbook { name: String, problem: String },
    /// The desired state asks for a mode that is not Unix permission bits.
    /// Nothing was written.
    #[error(
        "the desired state gives {path:?} mode {mode:o}, which is not a file mode (at most 7777 octal); fix the manifest that sets it"
    )]
    BadMode { path: String, mode: u32 },
    /// A managed file exists but could not be read, so whether it matches is
    /// unknown. Nothing was written.
    #[error("cannot read {path}: {source}; {}", hint(source))]
    Read { path: String, source: io::Error },
    /// A managed file could not be written. Files written before it stay
    /// written; the new state is not recorded as applied.
    #[error("cannot write {path}: {source}; {}", hint(source))]
    Write { path: String, source: io::Error },
    /// The file recording what was applied exists but could not be read.
    #[error(
        "cannot read the applied-state file {path}: {source}; {}",
        hint(source)
    )]
    StateRead { path: PathBuf, source: io::Error },
    /// The files were written but what was applied could not be recorded:
    /// after a restart the node will not know it manages them until the
    /// next apply.
    #[error(
        "cannot record the applied state in {path}: {source}; {}",
        hint(source)
    )]
    StateWrite { path: PathBuf, source: io::Error },
}

/// What to do about an I/O error, for messages.
fn hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "run trellis-node as a user allowed to do this (usually root), or stop managing the path"
        }
        io::ErrorKind::ReadOnlyFilesystem => "the file system is read-only; remount it read-write",
        io::ErrorKind::StorageFull => "the disk is full; free some space",
        io::ErrorKind::IsADirectory | io::ErrorKind::InvalidData => {
            "something other than a regular file is in the way; move it away"
        }
        io::ErrorKind::NotADirectory => {
            "a file is where a directory of the path must be; move it away"
        }
        _ => "check the path and the disk, then apply again",
    }
}

// ---------------------------------------------------------------------------
// Pure part
// ---------------------------------------------------------------------------

/// What is on disk at a managed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// Nothing is there.
    Missing,
    /// A regular file.
    Present {
        sha256: [u8; 32],
        size: u64,
        /// Permission bits only (`mode & 0o7777`).
        mode: u32,
    },
}

impl Observed {
    /// What a file with this content and mode looks like.
    pub fn of(content: &[u8], mode: u32) -> Self {
        Observed::Present {
            sha256: sha256(content),
            size: content.len() as u64,
            mode: mode & PERMISSION_BITS,
        }
    }

    /// Whether this is exactly `file` (content and mode).
    fn matches(&self, file: &ManagedFile) -> bool {
        match self {
            Observed::Missing => false,
            Observed::Present {
                sha256: h,
                size,
                mode,
            } => {
                *size == file.content.len() as u64
                    && *mode == file.mode & PERMISSION_BITS
                    && *h == sha256(&file.content)
            }
        }
    }
}

/// What an apply must do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyPlan {
    /// Paths to write, in path order: missing, or content or mode differ.
    pub write: Vec<String>,
    /// Reload commands to run, each once, in order of first appearance over
    /// the changed files in path order.
    pub reload: Vec<String>,
    /// Paths managed before and not any more. They are left as they are.
    pub unmanaged: Vec<String>,
}

/// Plans making the machine match `desired`, given what was applied last
/// (`previous`, if anything was) and what is on disk (`observed`; a path
/// absent from it counts as missing).
///
/// A file is written when it is missing or its content or mode differ. Its
/// reload commands run when it is written or when what is managed for it
/// differs from `previous` (see the module's documentation). Paths in
/// `previous` but not in `desired` are listed as no longer managed and left
/// in place.
pub fn plan_apply(
    desired: &ManagedState,
    previous: Option<&ManagedState>,
    observed: &BTreeMap<String, Observed>,
) -> ApplyPlan {
    let mut write = Vec::new();
    let mut changed = Vec::new();
    for (path, file) in &desired.files {
        let on_disk = observed.get(path).unwrap_or(&Observed::Missing);
        let differs_on_disk = !on_disk.matches(file);
        let differs_from_applied = previous.is_none_or(|p| p.files.get(path) != Some(file));
        if differs_on_disk {
            write.push(path.clone());
        }
        if differs_on_disk || differs_from_applied {
            changed.push(file);
        }
    }
    let unmanaged = previous
        .map(|p| {
            p.files
                .keys()
                .filter(|path| !desired.files.contains_key(*path))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    ApplyPlan {
        write,
        reload: reload_commands(changed),
        unmanaged,
    }
}

/// The reload commands of `files`, each once, in order of first appearance.
fn reload_commands<'a>(files: impl IntoIterator<Item = &'a ManagedFile>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    files
        .into_iter()
        .flat_map(|f| f.reload.iter())
        .filter(|cmd| seen.insert(cmd.as_str()))
        .cloned()
        .collect()
}

/// A managed file that no longer is what was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftReport {
    pub path: String,
    /// SHA-256 of the applied content, hex.
    pub expected_sha256: String,
    /// SHA-256 of what is there, hex; `None`: the file is missing.
    pub found_sha256: Option<String>,
    pub expected_size: u64,
    pub found_size: Option<u64>,
    /// Permission bits applied.
    pub expected_mode: u32,
    pub found_mode: Option<u32>,
}

/// The managed files whose content or mode differ from what was `applied`,
/// or which are missing, in path order (a path absent from `observed`
/// counts as missing).
pub fn check_drift(
    applied: &ManagedState,
    observed: &BTreeMap<String, Observed>,
) -> Vec<DriftReport> {
    applied
        .files
        .iter()
        .filter_map(|(path, file)| {
            let on_disk = observed.get(path).unwrap_or(&Observed::Missing);
            if on_disk.matches(file) {
                return None;
            }
            let (found_sha256, found_size, found_mode) = match on_disk {
                Observed::Missing => (None, None, None),
                Observed::Present { sha256, size, mode } => {
                    (Some(hex(sha256)), Some(*size), Some(*mode))
                }
            };
            Some(DriftReport {
                path: path.clone(),
                expected_sha256: hex(&sha256(&file.content)),
                found_sha256,
                expected_size: file.content.len() as u64,
                found_size,
                expected_mode: file.mode & PERMISSION_BITS,
                found_mode,
            })
        })
        .collect()
}

/// Refuses a state Trellis cannot apply safely: every path must be
/// absolute, in plain form (no empty, `.` or `..` segments, so that two
/// spellings cannot name one file), not a Trellis temporary name, and the
/// key it is filed under; every mode must be permission bits.
pub fn check_state(state: &ManagedState) -> Result<(), ApplyError> {
    for (name, r) in &state.runbooks {
        let problems = r.problems();
        if *name != r.name || !problems.is_empty() {
            return Err(ApplyError::BadRunbook {
                name: name.clone(),
                problem: if *name != r.name {
                    format!("it is filed under another name ({:?})", r.name)
                } else {
                    problems.join("; ")
                },
            });
        }
    }
    for (key, file) in &state.files {
        let bad = |problem: &str| ApplyError::BadPath {
            path: key.clone(),
            problem: problem.to_owned(),
        };
        if *key != file.path {
            return Err(bad(&format!(
                "it is filed under another path ({:?})",
                file.path
            )));
        }
        let Some(rest) = key.strip_prefix('/') else {
            return Err(bad("it is not an absolute path"));
        };
        if key.contains('\0') {
            return Err(bad("it contains a NUL byte"));
        }
        if rest
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        {
            return Err(bad(
                "it has an empty, `.` or `..` segment (write it as /dir/file)",
            ));
        }
        if rest
            .rsplit('/')
            .next()
            .unwrap_or("")
            .starts_with(TEMP_PREFIX)
        {
            return Err(bad(&format!(
                "names starting with {TEMP_PREFIX} are Trellis's temporary files"
            )));
        }
        if file.mode & !PERMISSION_BITS != 0 {
            return Err(ApplyError::BadMode {
                path: key.clone(),
                mode: file.mode,
            });
        }
    }
    Ok(())
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Driver part: the file system
// ---------------------------------------------------------------------------

/// What is at `path`. A file that exists but cannot be read, or that is not
/// a regular file (a directory, a FIFO), is an error, never "missing":
/// Trellis does not claim to know what it could not look at.
pub fn observe_file(path: &Path) -> io::Result<Observed> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        // A file where a directory of the path must be: nothing can be at
        // the path.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Observed::Missing);
        }
        Err(e) => return Err(e),
    };
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            io::ErrorKind::IsADirectory
        } else {
            io::ErrorKind::InvalidData
        };
        return Err(io::Error::new(kind, "not a regular file"));
    }
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Observed::Missing),
        Err(e) => return Err(e),
    };
    // Mode and content from the same open file, so a concurrent rename
    // cannot pair one file's mode with another's content.
    let mode = file.metadata()?.permissions().mode() & PERMISSION_BITS;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        ctx.update(&buf[..n]);
        size += n as u64;
    }
    let mut sha256 = [0; 32];
    sha256.copy_from_slice(ctx.finish().as_ref());
    Ok(Observed::Present { sha256, size, mode })
}

/// Observes every path; the first that cannot be read is the error.
pub fn observe<'a>(
    paths: impl IntoIterator<Item = &'a String>,
) -> Result<BTreeMap<String, Observed>, ApplyError> {
    paths
        .into_iter()
        .map(|path| {
            observe_file(Path::new(path))
                .map(|o| (path.clone(), o))
                .map_err(|source| ApplyError::Read {
                    path: path.clone(),
                    source,
                })
        })
        .collect()
}

/// Distinguishes temporary files of concurrent writes in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `content` and `mode` so that, whatever happens,
/// `path` holds either its old or its new content: missing parent
/// directories are created (mode 0755), the content goes to a temporary file
/// (named `.trellis-tmp-…`) in the same directory, which gets its mode, is
/// flushed to disk and renamed over `path`; then the directory is flushed so
/// the rename survives a power loss. A symlink at `path` is replaced, not
/// followed. A crash can leave the temporary file behind; see
/// [`remove_leftover_temp_files`].
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    write_atomic_with(path, mode, |file| file.write_all(content))
}

/// [`write_atomic`] for content produced while it is written: `fill`
/// writes into the temporary file, which replaces `path` only if `fill`
/// succeeds. On any error the temporary file is removed and `path` is left
/// as it was; `fill`'s own error is returned as is. For content too large to
/// hold in memory at once, or that must be checked as it is written.
pub fn write_atomic_with<E: From<io::Error>>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> Result<(), E>,
) -> Result<(), E> {
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(d), Some(n)) if !d.as_os_str().is_empty() => (d, n),
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a path to a file in a directory",
            )
            .into());
        }
    };
    create_dirs(dir)?;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Ok(f) => break (tmp, f),
            // A leftover of an earlier process with the same pid.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if let Err(e) = fill(&mut file) {
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let written = (|| {
        // fchmod: exact whatever the umask.
        file.set_permissions(fs::Permissions::from_mode(mode & PERMISSION_BITS))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates `dir` and its missing ancestors with mode 0755 (exactly, not
/// reduced by the umask), flushing each new entry to disk.
fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::NotADirectory,
                    format!("{} is not a directory", at.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                missing.push(at);
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
            Err(e) => return Err(e),
        }
    }
    for d in missing.into_iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {
                fs::set_permissions(d, fs::Permissions::from_mode(0o755))?;
                if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fs::File::open(parent)?.sync_all()?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes the temporary files [`write_atomic`] left in `dir` when the
/// process died between creating and renaming them; returns what it
/// removed. A missing `dir` (or a file in its place) has none. Call it before writing into `dir`
/// and only while nothing else writes there.
pub fn remove_leftover_temp_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if ours && entry.file_type()?.is_file() {
            match fs::remove_file(entry.path()) {
                Ok(()) => removed.push(entry.path()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

// ---------------------------------------------------------------------------
// Driver part: reload commands
// ---------------------------------------------------------------------------

/// How a reload command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadOutcome {
    pub command: String,
    /// `None`: it did not exit by itself (killed by a signal, timed out,
    /// or could not be started; the output says which).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Its stdout and stderr together, as they arrived: the last
    /// [`OUTPUT_LIMIT`] bytes, invalid UTF-8 replaced.
    pub output: String,
    pub duration_ms: u64,
}

impl ReloadOutcome {
    /// Exited 0 in time.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

/// Runs `cmd` with `sh -c`, stdin from /dev/null, in a process group of its
/// own; after `timeout` the whole group is killed (SIGKILL), so that
/// whatever the command started goes too.
pub async fn run_reload(cmd: &str, timeout: Duration) -> ReloadOutcome {
    run_command(cmd, None, &[], timeout).await
}

/// [`run_reload`] in the working directory `dir` (the process's own when
/// `None`): patch commands run next to their artifacts.
pub async fn run_command(
    cmd: &str,
    dir: Option<&Path>,
    env: &[(&str, &std::ffi::OsStr)],
    timeout: Duration,
) -> ReloadOutcome {
    let started = Instant::now();
    let mut outcome = ReloadOutcome {
        command: cmd.to_owned(),
        exit_code: None,
        timed_out: false,
        output: String::new(),
        duration_ms: 0,
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command.envs(env.iter().copied());
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let place = dir.map_or(String::new(), |d| format!(" in {}", d.display()));
            outcome.output = format!("cannot start sh{place}: {e}");
            outcome.duration_ms = started.elapsed().as_millis() as u64;
            return outcome;
        }
    };
    let pid = child.id();
    let tail = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(collect_tail(out, tail.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(collect_tail(err, tail.clone())));
    }
    let status = tokio::select! {
        s = child.wait() => Some(s),
        _ = tokio::time::sleep(timeout) => None,
    };
    let mut note = None;
    match status {
        Some(Ok(s)) => outcome.exit_code = s.code(),
        Some(Err(e)) => note = Some(format!("cannot wait for sh: {e}")),
        None => {
            outcome.timed_out = true;
            if let Some(pid) = pid {
                kill_group(pid);
            }
            let _ = child.wait().await;
        }
    }
    let aborts: Vec<_> = readers.iter().map(|r| r.abort_handle()).collect();
    if tokio::time::timeout(DRAIN_GRACE, futures::future::join_all(readers))
        .await
        .is_err()
    {
        aborts.iter().for_each(|a| a.abort());
    }
    let bytes = std::mem::take(&mut *tail.lock().unwrap_or_else(|p| p.into_inner()));
    outcome.output = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(note) = note {
        outcome.output.push_str(&note);
    }
    outcome.duration_ms = started.elapsed().as_millis() as u64;
    outcome
}

/// Appends what `from` yields to `tail`, keeping the last [`OUTPUT_LIMIT`]
/// bytes.
async fn collect_tail(mut from: impl AsyncRead + Unpin, tail: Arc<Mutex<Vec<u8>>>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        t.extend_from_slice(&buf[..n]);
        if t.len() > OUTPUT_LIMIT {
            let excess = t.len() - OUTPUT_LIMIT;
            t.drain(..excess);
        }
    }
}

/// SIGKILL to every process of the group `pgid`.
fn kill_group(pgid: u32) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid > 0 {
        // SAFETY: kill(2) takes plain integers and touches no memory of ours.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// Driver part: the applier
// ---------------------------------------------------------------------------

/// Whether drift is undone or only reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriftMode {
    /// Rewrite drifted files as applied and run their reload commands.
    #[default]
    Heal,
    /// Leave drifted files as they are; report them on every check.
    Report,
}

/// What one apply did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// The configuration version applied.
    pub version: u64,
    /// Hex of [`ManagedState::hash`].
    pub hash: String,
    /// Paths written, in path order.
    pub written: Vec<String>,
    /// Paths no longer managed; left in place.
    pub unmanaged: Vec<String>,
    /// Reload commands run, in order.
    pub reloads: Vec<ReloadOutcome>,
    /// Every file written, every reload succeeded, the state recorded.
    pub ok: bool,
    /// What went wrong first, and what to do.
    pub error: Option<String>,
}

/// One drifted file and what was done about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftOutcome {
    pub report: DriftReport,
    /// Rewritten as applied.
    pub healed: bool,
    /// Reload commands run because of this file (a command several healed
    /// files list runs once, with the first of them).
    pub reloads: Vec<ReloadOutcome>,
    /// Why healing failed.
    pub error: Option<String>,
}

/// On-disk form of the applied state.
#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    state: ManagedState,
}

/// Makes this machine match a [`ManagedState`] and keeps it so; remembers
/// what it applied in `state_dir` so that, after a restart, it still knows
/// which files it manages and can detect their drift.
///
/// File work runs on tokio's blocking threads, so a slow disk (fsync) never
/// stalls the tasks that gossip.
#[derive(Debug)]
pub struct Applier {
    state_dir: PathBuf,
    applied: Option<ManagedState>,
}

impl Applier {
    /// Reads what was applied last from `state_dir`. A missing directory or
    /// file means nothing was applied (the directory is created on the
    /// first apply). A file that cannot be decoded is moved aside as
    /// `applied.json.corrupt-<unix ms>`, logged as an error, and the applier
    /// starts with nothing applied: the next apply then rewrites every file
    /// that differs and runs every reload command.
    pub fn open(state_dir: impl Into<PathBuf>) -> Result<Applier, ApplyError> {
        let state_dir = state_dir.into();
        let path = state_dir.join(STATE_FILE);
        let applied = match fs::read(&path) {
            Ok(bytes) => match decode_state(&bytes) {
                Ok(state) => Some(state),
                Err(problem) => {
                    let aside =
                        state_dir.join(format!("{STATE_FILE}.corrupt-{}", crate::clock::unix_ms()));
                    match fs::rename(&path, &aside) {
                        Ok(()) => error!(
                            path = %path.display(),
                            moved_to = %aside.display(),
                            %problem,
                            "the applied-state file is unreadable; moved it aside and start with nothing applied (the next apply rewrites what differs and runs every reload command)"
                        ),
                        Err(e) => error!(
                            path = %path.display(),
                            %problem,
                            error = %e,
                            "the applied-state file is unreadable and cannot be moved aside; start with nothing applied (the next apply replaces it)"
                        ),
                    }
                    None
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(ApplyError::StateRead { path, source }),
        };
        Ok(Applier { state_dir, applied })
    }

    /// The state last applied (all its files written), if any.
    pub fn applied(&self) -> Option<&ManagedState> {
        self.applied.as_ref()
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Makes the machine match `desired`: removes temporary files a crash
    /// left in the directories of its files, plans against what is on disk,
    /// writes what differs, runs the reload commands, each with
    /// `reload_timeout`, and records `desired` as applied once every file
    /// was written. Recording comes last, so that a crash before the reloads
    /// ran makes the next apply run them.
    ///
    /// A file that cannot be read or written stops the apply: what was
    /// written stays, no reload runs and the previous state stays recorded.
    /// A failing reload does not: the report says `ok = false`, the state
    /// is recorded.
    pub async fn apply(&mut self, desired: &ManagedState, reload_timeout: Duration) -> ApplyReport {
        let mut report = ApplyReport {
            version: desired.version,
            hash: hex(&desired.hash()),
            written: Vec::new(),
            unmanaged: Vec::new(),
            reloads: Vec::new(),
            ok: false,
            error: None,
        };
        if let Err(e) = check_state(desired) {
            report.error = Some(e.to_string());
            return report;
        }
        let (plan, written, failure) = {
            let desired = desired.clone();
            let previous = self.applied.clone();
            off_thread(move || write_desired(&desired, previous.as_ref())).await
        };
        report.written = written;
        if let Some(e) = failure {
            report.error = Some(e.to_string());
            return report;
        }
        report.unmanaged = plan.unmanaged;
        for cmd in &plan.reload {
            report.reloads.push(run_reload(cmd, reload_timeout).await);
        }
        let recorded = {
            let dir = self.state_dir.clone();
            let state = desired.clone();
            off_thread(move || record_state(&dir, &state)).await
        };
        // The files are written either way; drift checks in this process
        // hold them to `desired`.
        self.applied = Some(desired.clone());
        report.error = match recorded {
            Err(e) => Some(e.to_string()),
            Ok(()) => report.reloads.iter().find(|r| !r.succeeded()).map(|r| {
                format!(
                    "reload command `{}` {}; the files stay written and are recorded as applied: fix the command or the configuration, then apply a new version",
                    r.command,
                    describe_failure(r)
                )
            }),
        };
        report.ok = report.error.is_none();
        report
    }

    /// Looks for drift from what was applied (nothing applied: nothing to
    /// do). In [`DriftMode::Heal`], rewrites each drifted file as applied
    /// and then runs their reload commands (each once, with
    /// `reload_timeout`); in [`DriftMode::Report`] only reports.
    ///
    /// A managed file that cannot be read is the error: whether it drifted
    /// is unknown.
    pub async fn check_drift(
        &mut self,
        mode: DriftMode,
        reload_timeout: Duration,
    ) -> Result<Vec<DriftOutcome>, ApplyError> {
        let Some(applied) = self.applied.clone() else {
            return Ok(Vec::new());
        };
        let applied = Arc::new(applied);
        let reports = {
            let applied = applied.clone();
            off_thread(move || {
                let observed = observe(applied.files.keys())?;
                Ok::<_, ApplyError>(check_drift(&applied, &observed))
            })
            .await?
        };
        let mut outcomes: Vec<DriftOutcome> = reports
            .into_iter()
            .map(|report| DriftOutcome {
                report,
                healed: false,
                reloads: Vec::new(),
                error: None,
            })
            .collect();
        if mode == DriftMode::Report || outcomes.is_empty() {
            return Ok(outcomes);
        }
        let results = {
            let applied = applied.clone();
            let paths: Vec<String> = outcomes.iter().map(|o| o.report.path.clone()).collect();
            off_thread(move || {
                paths
                    .iter()
                    .map(|p| {
                        clean_dirs([p])
                            .and_then(|()| write_managed(&applied.files[p]))
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Vec<_>>()
            })
            .await
        };
        for (o, result) in outcomes.iter_mut().zip(results) {
            match result {
                Ok(()) => o.healed = true,
                Err(e) => o.error = Some(e),
            }
        }
        let mut seen = BTreeSet::new();
        for o in outcomes.iter_mut().filter(|o| o.healed) {
            for cmd in &applied.files[&o.report.path].reload {
                if seen.insert(cmd.clone()) {
                    o.reloads.push(run_reload(cmd, reload_timeout).await);
                }
            }
        }
        Ok(outcomes)
    }
}

/// How a reload failed, for messages.
fn describe_failure(r: &ReloadOutcome) -> String {
    match (r.timed_out, r.exit_code) {
        (true, _) => format!("timed out after {} ms and was killed", r.duration_ms),
        (false, Some(code)) => format!("exited with status {code}"),
        (false, None) => "did not exit by itself (killed by a signal, or not started)".to_owned(),
    }
}

/// Runs blocking file work on tokio's blocking threads.
async fn off_thread<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Plans against the disk and writes what differs: the plan, the paths
/// written, and the error that stopped it.
fn write_desired(
    desired: &ManagedState,
    previous: Option<&ManagedState>,
) -> (ApplyPlan, Vec<String>, Option<ApplyError>) {
    let observed = clean_dirs(desired.files.keys()).and_then(|()| observe(desired.files.keys()));
    let observed = match observed {
        Ok(o) => o,
        Err(e) => return (ApplyPlan::default(), Vec::new(), Some(e)),
    };
    let plan = plan_apply(desired, previous, &observed);
    let mut written = Vec::new();
    for path in &plan.write {
        if let Err(e) = write_managed(&desired.files[path]) {
            return (plan, written, Some(e));
        }
        written.push(path.clone());
    }
    (plan, written, None)
}

/// Removes leftover temporary files from the directories of `paths`.
fn clean_dirs<'a>(paths: impl IntoIterator<Item = &'a String>) -> Result<(), ApplyError> {
    let dirs: BTreeSet<&Path> = paths
        .into_iter()
        .filter_map(|p| Path::new(p).parent())
        .collect();
    for dir in dirs {
        remove_leftover_temp_files(dir).map_err(|source| ApplyError::Write {
            path: dir.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Writes one managed file.
fn write_managed(file: &ManagedFile) -> Result<(), ApplyError> {
    write_atomic(Path::new(&file.path), &file.content, file.mode).map_err(|source| {
        ApplyError::Write {
            path: file.path.clone(),
            source,
        }
    })
}

/// Records `state` as applied in `dir`.
fn record_state(dir: &Path, state: &ManagedState) -> Result<(), ApplyError> {
    let path = dir.join(STATE_FILE);
    let err = |source| ApplyError::StateWrite {
        path: path.clone(),
        source,
    };
    remove_leftover_temp_files(dir).map_err(err)?;
    let bytes = serde_json::to_vec(&StateFile {
        format: STATE_FORMAT,
        state: state.clone(),
    })
    .map_err(|e| err(io::Error::other(e)))?;
    write_atomic(&path, &bytes, 0o600).map_err(err)
}

/// Decodes a state file, refusing one this version cannot trust.
fn decode_state(bytes: &[u8]) -> Result<ManagedState, String> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.format != STATE_FORMAT {
        return Err(format!(
            "format {} is not the one this version reads ({STATE_FORMAT})",
            file.format
        ));
    }
    check_state(&file.state).map_err(|e| e.to_string())?;
    Ok(file.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &str, mode: u32, reload: &[&str]) -> ManagedFile {
        ManagedFile {
            path: path.into(),
            content: content.into(),
            mode,
            reload: reload.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn state(version: u64, files: Vec<ManagedFile>) -> ManagedState {
        ManagedState {
            version,
            files: files.into_iter().map(|f| (f.path.clone(), f)).collect(),
            ..ManagedState::default()
        }
    }

    fn on_disk(files: &[(&str, &str, u32)]) -> BTreeMap<String, Observed> {
        files
            .iter()
            .map(|(p, c, m)| (p.to_string(), Observed::of(c.as_bytes(), *m)))
            .collect()
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Whether `pid` is a process still running (a zombie is not).
    fn running(pid: u32) -> bool {
        match fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            Ok(stat) => {
                // The state follows the parenthesised command name.
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z') && !state.starts_with('X')
            }
        }
    }

    fn pid_in(path: &Path) -> u32 {
        fs::read_to_string(path).unwrap().trim().parse().unwrap()
    }

    // --- plan_apply ---

    #[test]
    fn an_unchanged_file_is_neither_written_nor_reloaded() {
        let desired = state(2, vec![file("/etc/a", "x", 0o644, &["reload-a"])]);
        let previous = state(1, vec![file("/etc/a", "x", 0o644, &["reload-a"])]);
        let plan = plan_apply(
            &desired,
            Some(&previous),
            &on_disk(&[("/etc/a", "x", 0o644)]),
        );
        assert_eq!(plan, ApplyPlan::default());
    }

    #[test]
    fn changed_files_are_written_and_a_shared_reload_runs_once_in_first_appearance_order() {
        let previous = state(
            1,
            vec![
                file("/etc/a", "old", 0o644, &["r1", "shared"]),
                file("/etc/b", "old", 0o644, &["shared", "r2"]),
                file("/etc/c", "same", 0o644, &["r3"]),
            ],
        );
        let desired = state(
            2,
            vec![
                file("/etc/a", "new", 0o644, &["r1", "shared"]),
                file("/etc/b", "new", 0o644, &["shared", "r2"]),
                file("/etc/c", "same", 0o644, &["r3"]),
            ],
        );
        let plan = plan_apply(
            &desired,
            Some(&previous),
            &on_disk(&[
                ("/etc/a", "old", 0o644),
                ("/etc/b", "old", 0o644),
                ("/etc/c", "same", 0o644),
            ]),
        );
        assert_eq!(plan.write, vec!["/etc/a", "/etc/b"]);
        assert_eq!(plan.reload, vec!["r1", "shared", "r2"]);
        assert!(plan.unmanaged.is_empty());
    }

    #[test]
    fn a_mode_only_change_is_written() {
        let previous = state(1, vec![file("/etc/a", "x", 0o644, &["r"])]);
        let desired = state(2, vec![file("/etc/a", "x", 0o600, &["r"])]);
        let plan = plan_apply(
            &desired,
            Some(&previous),
            &on_disk(&[("/etc/a", "x", 0o644)]),
        );
        assert_eq!(plan.write, vec!["/etc/a"]);
        assert_eq!(plan.reload, vec!["r"]);
    }

    #[test]
    fn a_missing_file_is_written() {
        let desired = state(1, vec![file("/etc/a", "x", 0o644, &[])]);
        let plan = plan_apply(&desired, Some(&desired), &on_disk(&[]));
        assert_eq!(plan.write, vec!["/etc/a"]);
    }

    #[test]
    fn a_file_removed_from_the_desired_state_is_listed_as_unmanaged_and_not_touched() {
        let previous = state(
            1,
            vec![
                file("/etc/a", "x", 0o644, &["ra"]),
                file("/etc/gone", "y", 0o644, &["rgone"]),
            ],
        );
        let desired = state(2, vec![file("/etc/a", "x", 0o644, &["ra"])]);
        let plan = plan_apply(
            &desired,
            Some(&previous),
            &on_disk(&[("/etc/a", "x", 0o644), ("/etc/gone", "y", 0o644)]),
        );
        assert_eq!(
            plan,
            ApplyPlan {
                write: vec![],
                reload: vec![],
                unmanaged: vec!["/etc/gone".into()],
            }
        );
    }

    #[test]
    fn a_file_on_disk_but_not_yet_recorded_as_applied_gets_its_reload() {
        // An apply wrote /etc/a, then stopped before its reloads ran and
        // before recording: the next apply finds the file right but runs
        // the reload.
        let previous = state(1, vec![file("/etc/a", "old", 0o644, &["r"])]);
        let desired = state(2, vec![file("/etc/a", "new", 0o644, &["r"])]);
        let plan = plan_apply(
            &desired,
            Some(&previous),
            &on_disk(&[("/etc/a", "new", 0o644)]),
        );
        assert!(plan.write.is_empty());
        assert_eq!(plan.reload, vec!["r"]);
        let plan = plan_apply(&desired, None, &on_disk(&[("/etc/a", "new", 0o644)]));
        assert!(plan.write.is_empty());
        assert_eq!(plan.reload, vec!["r"]);
    }

    // --- check_drift (pure) ---

    #[test]
    fn drift_reports_content_mode_and_missing_files_with_hashes_and_sizes() {
        let applied = state(
            1,
            vec![
                file("/etc/a", "abc", 0o644, &[]),
                file("/etc/b", "same", 0o644, &[]),
                file("/etc/c", "c", 0o600, &[]),
                file("/etc/d", "d", 0o644, &[]),
            ],
        );
        let observed = on_disk(&[
            ("/etc/a", "abcd", 0o644),
            ("/etc/b", "same", 0o644),
            ("/etc/c", "c", 0o666),
        ]);
        let drift = check_drift(&applied, &observed);
        assert_eq!(
            drift,
            vec![
                DriftReport {
                    path: "/etc/a".into(),
                    expected_sha256: hex(&sha256(b"abc")),
                    found_sha256: Some(hex(&sha256(b"abcd"))),
                    expected_size: 3,
                    found_size: Some(4),
                    expected_mode: 0o644,
                    found_mode: Some(0o644),
                },
                DriftReport {
                    path: "/etc/c".into(),
                    expected_sha256: hex(&sha256(b"c")),
                    found_sha256: Some(hex(&sha256(b"c"))),
                    expected_size: 1,
                    found_size: Some(1),
                    expected_mode: 0o600,
                    found_mode: Some(0o666),
                },
                DriftReport {
                    path: "/etc/d".into(),
                    expected_sha256: hex(&sha256(b"d")),
                    found_sha256: None,
                    expected_size: 1,
                    found_size: None,
                    expected_mode: 0o644,
                    found_mode: None,
                },
            ]
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn states_with_paths_that_cannot_be_managed_safely_are_refused() {
        for (path, needle) in [
            ("etc/a", "absolute"),
            ("/etc/../a", "segment"),
            ("/etc/./a", "segment"),
            ("/etc//a", "segment"),
            ("/etc/a/", "segment"),
            ("/etc/.trellis-tmp-x", "temporary"),
        ] {
            let s = state(1, vec![file(path, "x", 0o644, &[])]);
            let err = check_state(&s).unwrap_err().to_string();
            assert!(err.contains(needle), "{path}: {err}");
        }
        let mut s = state(1, vec![file("/etc/a", "x", 0o644, &[])]);
        s.files.get_mut("/etc/a").unwrap().path = "/etc/b".into();
        assert!(
            check_state(&s)
                .unwrap_err()
                .to_string()
                .contains("filed under")
        );
        let s = state(1, vec![file("/etc/a", "x", 0o100644, &[])]);
        assert!(matches!(check_state(&s), Err(ApplyError::BadMode { .. })));
        assert!(check_state(&state(1, vec![file("/etc/a", "x", 0o4755, &[])])).is_ok());
    }

    #[test]
    fn states_with_runbooks_that_make_no_sense_are_refused() {
        let rule: crate::runbook::Runbook =
            toml::from_str("name = \"fix\"\ncheck = \"web\"\nrun = \"true\"\n").unwrap();
        let mut s = state(1, vec![]);
        s.runbooks.insert("fix".into(), rule.clone());
        assert!(check_state(&s).is_ok());
        s.runbooks.insert("other".into(), rule.clone());
        let err = check_state(&s).unwrap_err().to_string();
        assert!(err.contains("filed under another name"), "{err}");
        let mut s = state(1, vec![]);
        let mut bad = rule;
        bad.max_per_site = 0;
        s.runbooks.insert("fix".into(), bad);
        let err = check_state(&s).unwrap_err().to_string();
        assert!(err.contains("max_per_site"), "{err}");
    }

    // --- write_atomic and friends ---

    #[test]
    fn write_atomic_writes_exact_content_and_mode_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.conf");
        fs::write(&path, "old content that is longer").unwrap();
        write_atomic(&path, b"new", 0o640).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o640);
        write_atomic(&path, b"", 0o604).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");
        assert_eq!(mode_of(&path), 0o604);
        assert_eq!(names_in(dir.path()), vec!["a.conf"]);
    }

    #[test]
    fn write_atomic_creates_missing_parent_directories_0755() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x/y/z.conf");
        write_atomic(&path, b"hi", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hi");
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(mode_of(&dir.path().join("x")), 0o755);
        assert_eq!(mode_of(&dir.path().join("x/y")), 0o755);
    }

    #[test]
    fn write_atomic_refuses_a_parent_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("x"), "file").unwrap();
        let err = write_atomic(&dir.path().join("x/a"), b"hi", 0o644).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotADirectory);
    }

    #[test]
    fn a_leftover_temp_file_is_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".trellis-tmp-a.conf-1-0"), "half").unwrap();
        fs::write(dir.path().join("a.conf"), "keep").unwrap();
        fs::write(dir.path().join(".other"), "keep").unwrap();
        let removed = remove_leftover_temp_files(dir.path()).unwrap();
        assert_eq!(removed, vec![dir.path().join(".trellis-tmp-a.conf-1-0")]);
        assert_eq!(names_in(dir.path()), vec![".other", "a.conf"]);
        assert!(
            remove_leftover_temp_files(&dir.path().join("absent"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn observing_tells_missing_from_unreadable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a");
        assert_eq!(observe_file(&path).unwrap(), Observed::Missing);
        fs::write(&path, "abc").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(observe_file(&path).unwrap(), Observed::of(b"abc", 0o640));
        let err = observe([&dir.path().to_string_lossy().into_owned()]).unwrap_err();
        assert!(matches!(err, ApplyError::Read { .. }), "{err}");
        assert!(err.to_string().contains("move it away"), "{err}");
    }

    // --- run_reload ---

    #[tokio::test]
    async fn a_successful_reload_captures_stdout_and_stderr() {
        let r = run_reload("echo out; echo err >&2", Duration::from_secs(10)).await;
        assert_eq!(r.exit_code, Some(0));
        assert!(!r.timed_out);
        assert!(r.succeeded());
        let mut lines: Vec<&str> = r.output.lines().collect();
        lines.sort();
        assert_eq!(lines, vec!["err", "out"]);
        assert_eq!(r.command, "echo out; echo err >&2");
    }

    #[tokio::test]
    async fn a_failing_reload_reports_its_exit_code_and_output() {
        let r = run_reload("echo broken config >&2; exit 3", Duration::from_secs(10)).await;
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.timed_out);
        assert!(!r.succeeded());
        assert_eq!(r.output, "broken config\n");
    }

    #[tokio::test]
    async fn only_the_last_4_kib_of_output_is_kept() {
        let r = run_reload(
            "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done",
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(r.exit_code, Some(0));
        assert_eq!(r.output.len(), OUTPUT_LIMIT);
        assert!(r.output.ends_with("line1999\n"), "{}", &r.output[4000..]);
    }

    #[tokio::test]
    async fn a_reload_that_overruns_its_timeout_is_killed_with_its_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let shell = dir.path().join("shell.pid");
        let child = dir.path().join("child.pid");
        let cmd = format!(
            "echo $$ > {}; sleep 30 & echo $! > {}; echo started; wait",
            shell.display(),
            child.display()
        );
        let started = Instant::now();
        let r = run_reload(&cmd, Duration::from_millis(200)).await;
        let took = started.elapsed();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert!(!r.succeeded());
        assert_eq!(r.output, "started\n");
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert!(r.duration_ms >= 200, "{}", r.duration_ms);
        let (shell, child) = (pid_in(&shell), pid_in(&child));
        // The background sleep is reaped by whoever adopted it; give that
        // a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while running(child) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!running(shell), "the shell {shell} still runs");
        assert!(!running(child), "its child {child} still runs");
    }

    // --- Applier ---

    fn managed(dir: &Path, name: &str, content: &str, mode: u32, reload: &[&str]) -> ManagedFile {
        file(&dir.join(name).to_string_lossy(), content, mode, reload)
    }

    /// A reload command that appends `tag` to the log at `log`.
    fn log_cmd(log: &Path, tag: &str) -> String {
        format!("echo {tag} >> {}", log.display())
    }

    fn log_lines(log: &Path) -> Vec<String> {
        fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn apply_writes_files_runs_reloads_and_a_second_apply_does_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        let log = tmp.path().join("reload.log");
        let (ra, rshared) = (log_cmd(&log, "a"), log_cmd(&log, "shared"));
        let desired = state(
            7,
            vec![
                managed(&etc, "a.conf", "A", 0o644, &[&ra, &rshared]),
                managed(&etc, "sub/b.conf", "B", 0o600, &[&rshared]),
            ],
        );
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(applier.applied().is_none());
        let report = applier.apply(&desired, T).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(report.error, None);
        assert_eq!(report.version, 7);
        assert_eq!(report.hash, hex(&desired.hash()));
        assert_eq!(
            report.written,
            vec![
                etc.join("a.conf").to_string_lossy().into_owned(),
                etc.join("sub/b.conf").to_string_lossy().into_owned()
            ]
        );
        assert_eq!(report.reloads.len(), 2);
        assert!(report.reloads.iter().all(ReloadOutcome::succeeded));
        assert_eq!(log_lines(&log), vec!["a", "shared"]);
        assert_eq!(fs::read(etc.join("a.conf")).unwrap(), b"A");
        assert_eq!(mode_of(&etc.join("sub/b.conf")), 0o600);
        assert_eq!(applier.applied(), Some(&desired));

        let again = applier.apply(&desired, T).await;
        assert!(again.ok, "{again:?}");
        assert!(again.written.is_empty());
        assert!(again.reloads.is_empty());
        assert_eq!(log_lines(&log), vec!["a", "shared"]);
    }

    #[tokio::test]
    async fn the_applied_state_survives_reopening() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("reload.log");
        let desired = state(
            3,
            vec![managed(
                tmp.path(),
                "a.conf",
                "A",
                0o644,
                &[&log_cmd(&log, "a")],
            )],
        );
        let state_dir = tmp.path().join("state");
        Applier::open(&state_dir).unwrap().apply(&desired, T).await;
        let mut reopened = Applier::open(&state_dir).unwrap();
        assert_eq!(reopened.applied(), Some(&desired));
        assert_eq!(mode_of(&state_dir.join(STATE_FILE)), 0o600);
        let report = reopened.apply(&desired, T).await;
        assert!(
            report.written.is_empty() && report.reloads.is_empty(),
            "{report:?}"
        );
        assert_eq!(log_lines(&log), vec!["a"]);
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_moved_aside_and_nothing_counts_as_applied() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        fs::create_dir(&state_dir).unwrap();
        fs::write(state_dir.join(STATE_FILE), b"{\"format\":1,\"sta").unwrap();
        let applier = Applier::open(&state_dir).unwrap();
        assert!(applier.applied().is_none());
        let names = names_in(&state_dir);
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("applied.json.corrupt-"), "{names:?}");
        assert_eq!(
            fs::read(state_dir.join(&names[0])).unwrap(),
            b"{\"format\":1,\"sta"
        );
    }

    #[tokio::test]
    async fn an_unreadable_state_file_is_an_error_that_says_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let state_dir = tmp.path().join("state");
        fs::create_dir_all(state_dir.join(STATE_FILE)).unwrap();
        let err = Applier::open(&state_dir).unwrap_err();
        assert!(matches!(err, ApplyError::StateRead { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_state_with_a_bad_path_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let good = managed(tmp.path(), "a.conf", "A", 0o644, &[]);
        let desired = state(1, vec![good, file("relative/b", "B", 0o644, &[])]);
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        let report = applier.apply(&desired, T).await;
        assert!(!report.ok);
        assert!(report.error.unwrap().contains("not an absolute path"));
        assert!(report.written.is_empty());
        assert!(!tmp.path().join("a.conf").exists());
        assert!(applier.applied().is_none());
    }

    #[tokio::test]
    async fn a_failing_reload_fails_the_apply_but_the_files_stay_and_are_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        let desired = state(
            1,
            vec![managed(
                tmp.path(),
                "a.conf",
                "A",
                0o644,
                &["echo config rejected >&2; exit 1"],
            )],
        );
        let state_dir = tmp.path().join("state");
        let mut applier = Applier::open(&state_dir).unwrap();
        let report = applier.apply(&desired, T).await;
        assert!(!report.ok);
        assert_eq!(report.reloads.len(), 1);
        assert_eq!(report.reloads[0].exit_code, Some(1));
        assert_eq!(report.reloads[0].output, "config rejected\n");
        assert!(report.error.unwrap().contains("exited with status 1"));
        assert_eq!(fs::read(tmp.path().join("a.conf")).unwrap(), b"A");
        assert_eq!(Applier::open(&state_dir).unwrap().applied(), Some(&desired));
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_written_stops_the_apply_and_nothing_is_recorded() {
        let tmp = tempfile::tempdir().unwrap();
        // A regular file where a directory must be.
        fs::write(tmp.path().join("blocker"), "").unwrap();
        let log = tmp.path().join("reload.log");
        let desired = state(
            1,
            vec![
                managed(tmp.path(), "a.conf", "A", 0o644, &[&log_cmd(&log, "a")]),
                managed(tmp.path(), "blocker/b.conf", "B", 0o644, &[]),
            ],
        );
        let state_dir = tmp.path().join("state");
        let mut applier = Applier::open(&state_dir).unwrap();
        let report = applier.apply(&desired, T).await;
        assert!(!report.ok);
        assert_eq!(
            report.written,
            vec![tmp.path().join("a.conf").to_string_lossy().into_owned()]
        );
        assert!(report.reloads.is_empty());
        let err = report.error.unwrap();
        assert!(err.starts_with("cannot write"), "{err}");
        assert!(err.contains("blocker/b.conf"), "{err}");
        assert!(applier.applied().is_none());
        assert!(!state_dir.join(STATE_FILE).exists());
        assert!(log_lines(&log).is_empty());

        // Once the way is clear, the next apply writes the rest and runs
        // the reload of the file written before.
        fs::remove_file(tmp.path().join("blocker")).unwrap();
        let report = applier.apply(&desired, T).await;
        assert!(report.ok, "{report:?}");
        assert_eq!(
            report.written,
            vec![
                tmp.path()
                    .join("blocker/b.conf")
                    .to_string_lossy()
                    .into_owned()
            ]
        );
        assert_eq!(log_lines(&log), vec!["a"]);
    }

    #[tokio::test]
    async fn apply_removes_leftover_temp_files_from_the_directories_it_manages() {
        let tmp = tempfile::tempdir().unwrap();
        let etc = tmp.path().join("etc");
        fs::create_dir(&etc).unwrap();
        fs::write(etc.join(".trellis-tmp-a.conf-99-0"), "half").unwrap();
        let desired = state(1, vec![managed(&etc, "a.conf", "A", 0o644, &[])]);
        let state_dir = tmp.path().join("state");
        let mut applier = Applier::open(&state_dir).unwrap();
        assert!(applier.apply(&desired, T).await.ok);
        assert_eq!(names_in(&etc), vec!["a.conf"]);
        assert_eq!(names_in(&state_dir), vec![STATE_FILE]);

        // Also where nothing needs writing.
        fs::write(etc.join(".trellis-tmp-a.conf-99-1"), "half").unwrap();
        fs::write(state_dir.join(".trellis-tmp-applied.json-99-0"), "half").unwrap();
        let report = applier.apply(&desired, T).await;
        assert!(report.ok && report.written.is_empty(), "{report:?}");
        assert_eq!(names_in(&etc), vec!["a.conf"]);
        assert_eq!(names_in(&state_dir), vec![STATE_FILE]);
    }

    #[tokio::test]
    async fn healing_removes_a_leftover_temp_file_next_to_the_drifted_file() {
        let tmp = tempfile::tempdir().unwrap();
        let a = managed(tmp.path(), "a.conf", "A", 0o644, &[]);
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(applier.apply(&state(1, vec![a.clone()]), T).await.ok);
        fs::write(tmp.path().join(".trellis-tmp-a.conf-99-0"), "half").unwrap();
        fs::write(&a.path, "B").unwrap();
        let healed = applier.check_drift(DriftMode::Heal, T).await.unwrap();
        assert!(healed[0].healed);
        assert_eq!(names_in(tmp.path()), vec!["a.conf", "state"]);
    }

    #[tokio::test]
    async fn a_file_no_longer_managed_is_left_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        let a = managed(tmp.path(), "a.conf", "A", 0o644, &[]);
        let b = managed(tmp.path(), "b.conf", "B", 0o644, &[]);
        assert!(
            applier
                .apply(&state(1, vec![a.clone(), b.clone()]), T)
                .await
                .ok
        );
        let report = applier.apply(&state(2, vec![a]), T).await;
        assert!(report.ok);
        assert_eq!(report.unmanaged, vec![b.path.clone()]);
        assert_eq!(fs::read(&b.path).unwrap(), b"B");
        // And no longer checked for drift.
        fs::write(&b.path, "edited").unwrap();
        assert!(
            applier
                .check_drift(DriftMode::Heal, T)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(fs::read(&b.path).unwrap(), b"edited");
    }

    #[tokio::test]
    async fn healing_restores_a_hand_edited_file_and_runs_its_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("reload.log");
        let a = managed(tmp.path(), "a.conf", "A", 0o640, &[&log_cmd(&log, "a")]);
        let b = managed(tmp.path(), "b.conf", "B", 0o644, &[&log_cmd(&log, "b")]);
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(applier.apply(&state(1, vec![a.clone(), b]), T).await.ok);
        fs::remove_file(&log).unwrap();

        fs::write(&a.path, "hand edit").unwrap();
        fs::set_permissions(&a.path, fs::Permissions::from_mode(0o666)).unwrap();
        let outcomes = applier.check_drift(DriftMode::Heal, T).await.unwrap();
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        let o = &outcomes[0];
        assert!(o.healed);
        assert_eq!(o.error, None);
        assert_eq!(o.report.path, a.path);
        assert_eq!(o.report.found_sha256, Some(hex(&sha256(b"hand edit"))));
        assert_eq!(o.report.found_mode, Some(0o666));
        assert_eq!(o.reloads.len(), 1);
        assert!(o.reloads[0].succeeded());
        assert_eq!(fs::read(&a.path).unwrap(), b"A");
        assert_eq!(mode_of(Path::new(&a.path)), 0o640);
        assert_eq!(log_lines(&log), vec!["a"]);
        assert!(
            applier
                .check_drift(DriftMode::Heal, T)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn reporting_leaves_a_hand_edited_file_and_reports_hashes_and_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("reload.log");
        let a = managed(tmp.path(), "a.conf", "A", 0o644, &[&log_cmd(&log, "a")]);
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(applier.apply(&state(1, vec![a.clone()]), T).await.ok);
        fs::remove_file(&log).unwrap();

        fs::write(&a.path, "edited!").unwrap();
        for _ in 0..2 {
            let outcomes = applier.check_drift(DriftMode::Report, T).await.unwrap();
            assert_eq!(
                outcomes,
                vec![DriftOutcome {
                    report: DriftReport {
                        path: a.path.clone(),
                        expected_sha256: hex(&sha256(b"A")),
                        found_sha256: Some(hex(&sha256(b"edited!"))),
                        expected_size: 1,
                        found_size: Some(7),
                        expected_mode: 0o644,
                        found_mode: Some(0o644),
                    },
                    healed: false,
                    reloads: vec![],
                    error: None,
                }]
            );
        }
        assert_eq!(fs::read(&a.path).unwrap(), b"edited!");
        assert!(log_lines(&log).is_empty());
    }

    #[tokio::test]
    async fn a_deleted_managed_file_is_drift_and_is_restored_when_healing() {
        let tmp = tempfile::tempdir().unwrap();
        let a = managed(tmp.path(), "sub/a.conf", "A", 0o600, &[]);
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(applier.apply(&state(1, vec![a.clone()]), T).await.ok);
        fs::remove_dir_all(tmp.path().join("sub")).unwrap();

        let reported = applier.check_drift(DriftMode::Report, T).await.unwrap();
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].report.found_sha256, None);
        assert_eq!(reported[0].report.found_size, None);
        assert_eq!(reported[0].report.found_mode, None);
        assert!(!Path::new(&a.path).exists());

        let healed = applier.check_drift(DriftMode::Heal, T).await.unwrap();
        assert_eq!(healed.len(), 1);
        assert!(healed[0].healed);
        assert_eq!(fs::read(&a.path).unwrap(), b"A");
        assert_eq!(mode_of(Path::new(&a.path)), 0o600);
    }

    #[tokio::test]
    async fn drift_is_found_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let a = managed(tmp.path(), "a.conf", "A", 0o644, &[]);
        let state_dir = tmp.path().join("state");
        assert!(
            Applier::open(&state_dir)
                .unwrap()
                .apply(&state(1, vec![a.clone()]), T)
                .await
                .ok
        );
        fs::write(&a.path, "B").unwrap();
        let mut reopened = Applier::open(&state_dir).unwrap();
        let healed = reopened.check_drift(DriftMode::Heal, T).await.unwrap();
        assert_eq!(healed.len(), 1);
        assert!(healed[0].healed);
        assert_eq!(fs::read(&a.path).unwrap(), b"A");
    }

    #[tokio::test]
    async fn with_nothing_applied_a_drift_check_does_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let mut applier = Applier::open(tmp.path().join("state")).unwrap();
        assert!(
            applier
                .check_drift(DriftMode::Heal, T)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(!tmp.path().join("state").exists());
    }
}
