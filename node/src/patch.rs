//! Patches: a directory of artifacts and the commands that install and roll
//! them back, signed by an operator, moved in content-addressed chunks.
//!
//! This module is the part every tier shares and none drives: it reads a
//! patch directory ([`Patch::load`]), signs and verifies its manifest
//! ([`sign`], [`verify`]), keeps chunks on disk by their hash
//! ([`ChunkStore`]) and decides which chunks to ask a source for and when
//! ([`Download`], which does no I/O and is given the time).
//!
//! # The patch directory
//! A directory holds `patch.toml` and the artifact files it names:
//!
//! ```toml
//! name = "openssl-fix"                      # like every Trellis name
//! version = "3.0.13-2"                      # free text, 1 to 64 characters
//! selector = { labels = { role = "web" } }  # default "all"
//! install = ["sh install.sh"]               # run in order in the artifact directory
//! rollback = ["sh rollback.sh"]
//! checks = ["web"]                          # health checks that must stay passing
//! bake = "5m"                               # for this long after install (at most 24h)
//! artifacts = ["install.sh", "rollback.sh", "pkg.deb"]
//! ```
//!
//! Artifacts are relative paths inside the directory (no `..`, no symlink
//! out of it), each at most [`MAX_ARTIFACT_BYTES`], all together at most
//! [`MAX_PATCH_BYTES`].
//!
//! # What is signed
//! The operator signs a [`PatchManifest`]: everything in `patch.toml` plus,
//! for each artifact, an [`ArtifactRef`] with its size, its BLAKE3 and the
//! BLAKE3 of each [`CHUNK_SIZE`] chunk. The artifact bytes are not signed
//! themselves: each chunk is checked against the signed hash as it
//! arrives, so a relay or hub that alters a byte is caught at the chunk
//! it altered, and a file made of checked chunks is the file the operator
//! signed. The whole file's BLAKE3 is checked once, by the hub a patch is
//! published to ([`ChunkStore::check`]), which refuses a manifest whose
//! chunks and whole hash disagree; nodes do not hash it again. The
//! manifest's postcard encoding is what is signed and what travels, and
//! [`SignedPatch::id`] (BLAKE3 of those bytes) names the patch.
//!
//! # Chunks
//! Chunks are stored by the hex of their BLAKE3, so artifacts (or
//! versions of one) that share a chunk store it once, and what a node
//! already holds is never fetched again.

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::apply::{remove_leftover_temp_files, write_atomic};
use crate::desired::{
    Problem, Selector, SelectorToml, normalise_source, read_limited, toml_error_at,
};
use crate::distribute::hex32;
use crate::id::{IdError, Identity, validate_name};
use crate::signature::{SignatureError, check_operator_credentials, verify_operator_signature};
use crate::tls::{Credentials, KeyAlgorithm, TlsError};

/// The manifest's file name inside a patch directory.
pub const PATCH_FILE: &str = "patch.toml";

/// Largest `patch.toml`, in bytes; it holds names and commands only.
pub const MAX_PATCH_FILE_BYTES: u64 = 64 << 10;

/// Size of every chunk but an artifact's last, in bytes.
pub const CHUNK_SIZE: u32 = 1 << 20;

/// Largest artifact, in bytes.
pub const MAX_ARTIFACT_BYTES: u64 = 256 << 20;

/// Largest total of a patch's artifacts, in bytes.
pub const MAX_PATCH_BYTES: u64 = 1 << 30;

/// Most artifacts in one patch.
pub const MAX_ARTIFACTS: usize = 256;

/// Longest version text, in characters.
pub const MAX_VERSION_CHARS: usize = 64;

/// Longest bake time: a rollout waits this long for every wave.
pub const MAX_BAKE: Duration = Duration::from_secs(24 * 60 * 60);

/// Largest encoded manifest accepted, in bytes. What [`Patch::load`]
/// accepts encodes to well under half of this (a 64 KiB `patch.toml`,
/// 32 bytes per chunk of at most 1 GiB, a few bytes per artifact); the limit
/// is checked before anything else is done with a signed patch.
pub const MAX_MANIFEST_BYTES: usize = 256 << 10;

/// A patch's first delay before a failed chunk is asked for again; it
/// doubles with each failure of that chunk up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);

/// A patch's longest delay before a failed chunk is asked for again.
pub const RETRY_MAX: Duration = Duration::from_secs(30);

/// One artifact as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// Relative path inside the patch directory, `/`-separated.
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the whole file, checked against the chunks when the patch
    /// is published ([`ChunkStore::check`]).
    pub blake3: [u8; 32],
    /// [`CHUNK_SIZE`]; carried so that another size is recognised, not
    /// misread.
    pub chunk_size: u32,
    /// BLAKE3 of each chunk in order; the last one may be shorter. An empty
    /// file has none.
    pub chunks: Vec<[u8; 32]>,
}

impl ArtifactRef {
    /// Describes what `reader` yields as the artifact `name`, reading it
    /// once, a chunk at a time. The caller limits how much it may read.
    pub fn read(name: impl Into<String>, mut reader: impl Read) -> io::Result<ArtifactRef> {
        let mut whole = blake3::Hasher::new();
        let mut chunks = Vec::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        loop {
            let n = fill(&mut reader, &mut buf)?;
            if n == 0 {
                break;
            }
            whole.update(&buf[..n]);
            chunks.push(*blake3::hash(&buf[..n]).as_bytes());
            size += n as u64;
            if n < buf.len() {
                break;
            }
        }
        Ok(ArtifactRef {
            name: name.into(),
            size,
            blake3: *whole.finalize().as_bytes(),
            chunk_size: CHUNK_SIZE,
            chunks,
        })
    }

    /// How many chunks an artifact of this size has.
    pub fn expected_chunks(&self) -> u64 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.size.div_ceil(u64::from(self.chunk_size))
    }

    /// The length of chunk `index`, if there is one.
    pub fn chunk_len(&self, index: u32) -> Option<u64> {
        let start = u64::from(index).checked_mul(u64::from(self.chunk_size))?;
        (usize::try_from(index).ok()? < self.chunks.len() && start < self.size)
            .then(|| (self.size - start).min(u64::from(self.chunk_size)))
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What an operator signs: everything in `patch.toml` and a description
/// of every artifact. Its postcard encoding ([`PatchManifest::encode`]) is
/// stable: the same manifest always gives the same bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchManifest {
    pub name: String,
    pub version: String,
    /// Which nodes the patch is for.
    pub selector: Selector,
    /// Commands run in order, in the directory the artifacts are in.
    pub install: Vec<String>,
    /// Commands that undo `install`, run the same way.
    pub rollback: Vec<String>,
    /// Names of the node's health checks that must stay passing.
    pub checks: Vec<String>,
    /// How long the checks must stay passing after install.
    pub bake: Duration,
    pub artifacts: Vec<ArtifactRef>,
}

/// What is wrong with one field of a patch manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestProblem {
    /// The patch's name or a check's name breaks the naming rules.
    #[error("{0}")]
    BadName(IdError),
    /// The version is empty, too long or holds control characters.
    #[error(
        "the version must be 1 to {MAX_VERSION_CHARS} characters of text without control \
         characters, like \"3.0.13-2\""
    )]
    BadVersion,
    /// The selector breaks the rules of fleet selectors.
    #[error("{0}")]
    Selector(Problem),
    /// `install` or `rollback` has no command.
    #[error("give at least one command, like [\"sh install.sh\"]")]
    NoCommands,
    /// A command is empty or only spaces.
    #[error("the command is empty; remove it or write the command")]
    EmptyCommand,
    /// A check is named twice.
    #[error("check {0:?} is named twice; name each check once")]
    DuplicateCheck(String),
    /// The bake time is over [`MAX_BAKE`].
    #[error(
        "{} is longer than the limit of 24h; a rollout waits this long for every wave",
        humantime::format_duration(*.0)
    )]
    BakeTooLong(Duration),
    /// More than [`MAX_ARTIFACTS`] artifacts.
    #[error("{0} artifacts is more than {MAX_ARTIFACTS}; pack small files into an archive")]
    TooManyArtifacts(usize),
    /// An artifact path is absolute, climbs out with `..`, or is not a
    /// plain relative path.
    #[error(
        "{0:?} must be a relative path inside the patch directory, like \"pkg.deb\" or \
         \"bin/tool\", without `..`"
    )]
    ArtifactPath(String),
    /// An artifact resolves, through a symlink, outside the directory.
    #[error("{0} leads outside the patch directory; copy the file into it")]
    ArtifactOutside(String),
    /// An artifact is not in the directory.
    #[error("{0} does not exist in the patch directory; add it or remove it from artifacts")]
    ArtifactMissing(String),
    /// An artifact is a directory or something else that is not a file.
    #[error("{0} is not a regular file; list files only (pack a directory into an archive)")]
    ArtifactNotFile(String),
    /// An artifact is listed twice.
    #[error("{0} is listed twice; list each artifact once")]
    DuplicateArtifact(String),
    /// An artifact is over [`MAX_ARTIFACT_BYTES`].
    #[error(
        "{name} is {size} bytes, over the limit of {MAX_ARTIFACT_BYTES} bytes for one artifact; \
         split it or ship it another way"
    )]
    ArtifactTooLarge { name: String, size: u64 },
    /// The artifacts together are over [`MAX_PATCH_BYTES`].
    #[error(
        "the artifacts hold {0} bytes together, over the limit of {MAX_PATCH_BYTES}; \
         split the patch in two"
    )]
    PatchTooLarge(u64),
    /// A decoded artifact's chunk size is not [`CHUNK_SIZE`].
    #[error("chunk size {0} is not {CHUNK_SIZE}; this node cannot use the patch")]
    ChunkSize(u32),
    /// A decoded artifact lists another number of chunks than its size
    /// needs.
    #[error("{found} chunk hashes for {expected} chunks")]
    ChunkCount { expected: u64, found: usize },
}

/// Why a patch could not be loaded, signed, verified, stored, assembled or
/// downloaded.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// A file or directory could not be read or written; nothing else was
    /// changed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `patch.toml` is not valid TOML, or has an unknown, missing or
    /// mistyped field. Nothing is loaded.
    #[error("{file}: line {line}, column {column}: {message}")]
    Parse {
        file: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// The directory has no `patch.toml`. Nothing is loaded.
    #[error("{0} not found: a patch directory holds patch.toml and the artifacts it names")]
    NoPatchFile(PathBuf),
    /// `patch.toml` is over [`MAX_PATCH_FILE_BYTES`]. Nothing is loaded.
    #[error(
        "{0}: over {MAX_PATCH_FILE_BYTES} bytes; patch.toml names files and commands, \
         put anything large in an artifact"
    )]
    PatchFileTooLarge(PathBuf),
    /// A field of `patch.toml` is wrong. Nothing is loaded.
    #[error("{file}: {field}: {problem}")]
    Invalid {
        file: PathBuf,
        /// `name`, `install[1]`, `artifacts[2] pkg.deb`, …
        field: String,
        problem: ManifestProblem,
    },
    /// Signing was asked of credentials that are not an operator's.
    #[error("{0} is not an operator: only operator credentials sign patches")]
    NotOperatorCredentials(Identity),
    /// The operator's certificate holds a key of another kind.
    #[error(
        "operator {identity} has an {algorithm} key; patches need an Ed25519 operator key: \
         issue a new certificate with `trellis ca issue --role operator`"
    )]
    NotEd25519 {
        identity: Identity,
        algorithm: KeyAlgorithm,
    },
    /// Our own key could not sign.
    #[error("signing the patch failed: {0}")]
    Sign(TlsError),
    /// The encoded manifest is over [`MAX_MANIFEST_BYTES`]; not decoded.
    #[error("the patch manifest is {0} bytes, over the limit of {MAX_MANIFEST_BYTES}")]
    TooLarge(usize),
    /// The signer's certificate was not issued by this mesh's CA, has
    /// expired, or is not a Trellis certificate. The patch is not used.
    #[error("patch signed by an unknown key: {0}")]
    UnknownKey(TlsError),
    /// The certificate is the mesh's, but not an operator's. The patch is
    /// not used.
    #[error("patch signed by {0}, which is not an operator")]
    NotOperator(Identity),
    /// The signature does not match the manifest bytes. The patch is not
    /// used.
    #[error("bad signature on the patch from {0}: it was altered or not signed by this operator")]
    BadSignature(Identity),
    /// The signer's certificate is revoked, or (for new desired state at
    /// a hub) its key was retired by a rotation.
    #[error(transparent)]
    SignerRevoked(SignatureError),
    /// Correctly signed, but the bytes are not a manifest or break its
    /// rules. The patch is not used.
    #[error("patch from {signer} is malformed: {reason}")]
    Malformed { signer: Identity, reason: String },
    /// A chunk's bytes do not hash to the hash they were offered as; it was
    /// not stored and must be fetched again.
    #[error("chunk refused: its bytes hash to {actual}, not {expected}; fetch it again")]
    ChunkMismatch { expected: String, actual: String },
    /// A chunk is over [`CHUNK_SIZE`]; it was not stored.
    #[error("chunk refused: {0} bytes is over the chunk size of {CHUNK_SIZE}")]
    ChunkTooLarge(usize),
    /// A chunk file on disk does not match its name (damaged on disk); it
    /// was removed so that it is fetched again.
    #[error("{0}: the chunk was damaged on disk and has been removed; fetch it again")]
    CorruptChunk(PathBuf),
    /// Assembling needs a chunk the store does not hold; nothing was
    /// written.
    #[error(
        "artifact {artifact}: chunk {chunk} is not in the chunk store; fetch the missing \
         chunks first"
    )]
    ChunkMissing { artifact: String, chunk: u32 },
    /// The artifact's chunks, each matching its hash, do not put together
    /// a file of the size and BLAKE3 its manifest gives: the manifest
    /// contradicts itself ([`ChunkStore::check`]).
    #[error(
        "artifact {artifact}: its chunks put together do not match the manifest's size and \
         BLAKE3; the manifest is inconsistent: sign the patch again from its directory"
    )]
    ArtifactMismatch { artifact: String },
    /// One chunk failed too often; the download stopped.
    #[error(
        "artifact {artifact}: chunk {chunk} failed {attempts} times (last: {last_reason}); \
         the download stopped: check the source, then start it again"
    )]
    TransferFailed {
        artifact: String,
        chunk: u32,
        attempts: u32,
        last_reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PatchError + '_ {
    move |source| PatchError::Io {
        path: path.to_owned(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Loading and checking

/// `patch.toml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchToml {
    name: String,
    version: String,
    #[serde(default)]
    selector: SelectorToml,
    #[serde(default)]
    install: Vec<String>,
    #[serde(default)]
    rollback: Vec<String>,
    #[serde(default)]
    checks: Vec<String>,
    /// Required: how long to wait is a decision, not a default.
    #[serde(with = "humantime_serde")]
    bake: Duration,
    #[serde(default)]
    artifacts: Vec<String>,
}

/// A field and what is wrong with it.
type Bad = (String, ManifestProblem);

fn check_commands(field: &str, commands: &[String]) -> Result<(), Bad> {
    if commands.is_empty() {
        return Err((field.to_owned(), ManifestProblem::NoCommands));
    }
    match commands.iter().position(|c| c.trim().is_empty()) {
        Some(i) => Err((format!("{field}[{i}]"), ManifestProblem::EmptyCommand)),
        None => Ok(()),
    }
}

/// An artifact name in its one accepted spelling: relative, `/`-separated,
/// no `.`, `..` or empty parts.
fn check_artifact_name(name: &str) -> Result<(), ManifestProblem> {
    let canonical = normalise_source(name).is_some_and(|n| n == name) && !name.contains('\0');
    if canonical {
        Ok(())
    } else {
        Err(ManifestProblem::ArtifactPath(name.to_owned()))
    }
}

fn artifact_field(i: usize, name: &str) -> String {
    format!("artifacts[{i}] {name}")
}

impl PatchManifest {
    /// The stable encoding that is signed and travels.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain structs into a Vec fails only without memory.
        postcard::to_stdvec(self).expect("encoding a manifest into memory")
    }

    /// Checks everything [`Patch::load`] checks that does not need the
    /// directory; for a manifest decoded from bytes.
    fn check(&self) -> Result<(), Bad> {
        validate_name("patch name", &self.name)
            .map_err(|e| ("name".to_owned(), ManifestProblem::BadName(e)))?;
        let chars = self.version.chars().count();
        if self.version.trim().is_empty()
            || chars > MAX_VERSION_CHARS
            || self.version.chars().any(char::is_control)
        {
            return Err(("version".into(), ManifestProblem::BadVersion));
        }
        self.selector
            .check()
            .map_err(|p| ("selector".to_owned(), ManifestProblem::Selector(p)))?;
        check_commands("install", &self.install)?;
        check_commands("rollback", &self.rollback)?;
        let mut checks = BTreeSet::new();
        for (i, c) in self.checks.iter().enumerate() {
            let field = || format!("checks[{i}]");
            validate_name("check name", c).map_err(|e| (field(), ManifestProblem::BadName(e)))?;
            if !checks.insert(c) {
                return Err((field(), ManifestProblem::DuplicateCheck(c.clone())));
            }
        }
        if self.bake > MAX_BAKE {
            return Err(("bake".into(), ManifestProblem::BakeTooLong(self.bake)));
        }
        if self.artifacts.len() > MAX_ARTIFACTS {
            return Err((
                "artifacts".into(),
                ManifestProblem::TooManyArtifacts(self.artifacts.len()),
            ));
        }
        let mut names = BTreeSet::new();
        let mut total = 0u64;
        for (i, a) in self.artifacts.iter().enumerate() {
            let field = || artifact_field(i, &a.name);
            check_artifact_name(&a.name).map_err(|p| (field(), p))?;
            if !names.insert(&a.name) {
                return Err((field(), ManifestProblem::DuplicateArtifact(a.name.clone())));
            }
            if a.size > MAX_ARTIFACT_BYTES {
                return Err((
                    field(),
                    ManifestProblem::ArtifactTooLarge {
                        name: a.name.clone(),
                        size: a.size,
                    },
                ));
            }
            total += a.size;
            if total > MAX_PATCH_BYTES {
                return Err(("artifacts".into(), ManifestProblem::PatchTooLarge(total)));
            }
            if a.chunk_size != CHUNK_SIZE {
                return Err((field(), ManifestProblem::ChunkSize(a.chunk_size)));
            }
            if a.chunks.len() as u64 != a.expected_chunks() {
                return Err((
                    field(),
                    ManifestProblem::ChunkCount {
                        expected: a.expected_chunks(),
                        found: a.chunks.len(),
                    },
                ));
            }
        }
        Ok(())
    }
}

/// A patch directory, loaded and described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    /// The directory, canonical; artifacts are relative to it.
    pub dir: PathBuf,
    pub manifest: PatchManifest,
}

impl Patch {
    /// Reads `dir/patch.toml`, checks it, and describes every artifact
    /// (reading each once to hash it).
    pub fn load(dir: &Path) -> Result<Patch, PatchError> {
        let file = dir.join(PATCH_FILE);
        let root = dir.canonicalize().map_err(io_err(dir))?;
        let bytes = match read_limited(&root.join(PATCH_FILE), MAX_PATCH_FILE_BYTES) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PatchError::NoPatchFile(file));
            }
            Err(e) => return Err(io_err(&file)(e)),
        };
        if bytes.len() as u64 > MAX_PATCH_FILE_BYTES {
            return Err(PatchError::PatchFileTooLarge(file));
        }
        let parse_err = |line, column, message| PatchError::Parse {
            file: file.clone(),
            line,
            column,
            message,
        };
        let text =
            String::from_utf8(bytes).map_err(|_| parse_err(1, 1, "not UTF-8 text".into()))?;
        let toml: PatchToml = toml::from_str(&text).map_err(|e| {
            let (line, column, message) = toml_error_at(&text, &e);
            parse_err(line, column, message)
        })?;
        let invalid = |(field, problem): Bad| PatchError::Invalid {
            file: file.clone(),
            field,
            problem,
        };
        let mut manifest = PatchManifest {
            name: toml.name,
            version: toml.version,
            selector: toml.selector.0,
            install: toml.install,
            rollback: toml.rollback,
            checks: toml.checks,
            bake: toml.bake,
            artifacts: Vec::new(),
        };
        // Everything but the artifacts, before any of them is read.
        manifest.check().map_err(invalid)?;
        if toml.artifacts.len() > MAX_ARTIFACTS {
            return Err(invalid((
                "artifacts".into(),
                ManifestProblem::TooManyArtifacts(toml.artifacts.len()),
            )));
        }
        // Every artifact is found and sized before any is hashed, so a
        // mistake is reported at once, not after reading a gigabyte.
        let mut found = Vec::with_capacity(toml.artifacts.len());
        let mut names = BTreeSet::new();
        let mut total = 0u64;
        for (i, written) in toml.artifacts.iter().enumerate() {
            let field = || artifact_field(i, written);
            let (name, path, size) = match locate_artifact(&root, written)? {
                Located::Found(name, path, size) => (name, path, size),
                Located::Bad(problem) => return Err(invalid((field(), problem))),
            };
            if !names.insert(name.clone()) {
                return Err(invalid((field(), ManifestProblem::DuplicateArtifact(name))));
            }
            total += size;
            if total > MAX_PATCH_BYTES {
                return Err(invalid((
                    "artifacts".into(),
                    ManifestProblem::PatchTooLarge(total),
                )));
            }
            found.push((i, name, path));
        }
        for (i, name, path) in found {
            let shown = dir.join(&name);
            let reader = fs::File::open(&path)
                .map_err(io_err(&shown))?
                .take(MAX_ARTIFACT_BYTES + 1);
            let artifact = ArtifactRef::read(name, reader).map_err(io_err(&shown))?;
            // Grown since it was sized.
            if artifact.size > MAX_ARTIFACT_BYTES {
                return Err(invalid((
                    artifact_field(i, &artifact.name),
                    ManifestProblem::ArtifactTooLarge {
                        name: artifact.name,
                        size: artifact.size,
                    },
                )));
            }
            manifest.artifacts.push(artifact);
        }
        manifest.check().map_err(invalid)?;
        Ok(Patch {
            dir: root,
            manifest,
        })
    }

    /// Where an artifact of this patch is on disk.
    pub fn artifact_path(&self, artifact: &ArtifactRef) -> PathBuf {
        self.dir.join(&artifact.name)
    }
}

/// One artifact of `patch.toml` looked up in the directory.
enum Located {
    /// Its canonical name, real path and size.
    Found(String, PathBuf, u64),
    /// What is wrong with the entry.
    Bad(ManifestProblem),
}

/// Finds one artifact inside `root`; the error is I/O only.
fn locate_artifact(root: &Path, written: &str) -> Result<Located, PatchError> {
    let Some(name) = normalise_source(written).filter(|_| !written.contains('\0')) else {
        return Ok(Located::Bad(ManifestProblem::ArtifactPath(
            written.to_owned(),
        )));
    };
    let full = root.join(&name);
    let real = match full.canonicalize() {
        Ok(real) => real,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Located::Bad(ManifestProblem::ArtifactMissing(name)));
        }
        Err(e) => return Err(io_err(&full)(e)),
    };
    if !real.starts_with(root) {
        return Ok(Located::Bad(ManifestProblem::ArtifactOutside(name)));
    }
    let meta = fs::metadata(&real).map_err(io_err(&full))?;
    if !meta.is_file() {
        return Ok(Located::Bad(ManifestProblem::ArtifactNotFile(name)));
    }
    if meta.len() > MAX_ARTIFACT_BYTES {
        return Ok(Located::Bad(ManifestProblem::ArtifactTooLarge {
            name,
            size: meta.len(),
        }));
    }
    Ok(Located::Found(name, real, meta.len()))
}

// ---------------------------------------------------------------------------
// Signing

/// A [`PatchManifest`] as signed bytes, with the certificate of who signed
/// it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedPatch {
    /// The postcard encoding of the manifest; exactly what was signed.
    pub manifest: Vec<u8>,
    /// The operator's Ed25519 signature of `manifest`.
    pub signature: Vec<u8>,
    /// The operator's certificate (DER).
    pub operator_cert: Vec<u8>,
}

impl SignedPatch {
    /// BLAKE3 of the manifest bytes: names the patch independently of who
    /// signed it, and salts the order its rollout waves take.
    pub fn id(&self) -> [u8; 32] {
        *blake3::hash(&self.manifest).as_bytes()
    }
}

/// The shared operator checks, worded for patches.
fn from_signature(e: SignatureError) -> PatchError {
    match e {
        SignatureError::NotOperatorCredentials(id) => PatchError::NotOperatorCredentials(id),
        SignatureError::NotEd25519 {
            identity,
            algorithm,
        } => PatchError::NotEd25519 {
            identity,
            algorithm,
        },
        SignatureError::UnknownKey(e) => PatchError::UnknownKey(e),
        SignatureError::NotOperator(id) => PatchError::NotOperator(id),
        SignatureError::BadSignature(id) => PatchError::BadSignature(id),
        e @ (SignatureError::Revoked(_) | SignatureError::Retired(_)) => {
            PatchError::SignerRevoked(e)
        }
    }
}

/// Signs `manifest` with an operator's Ed25519 key.
pub fn sign(operator: &Credentials, manifest: &PatchManifest) -> Result<SignedPatch, PatchError> {
    check_operator_credentials(operator).map_err(from_signature)?;
    let bytes = manifest.encode();
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(PatchError::TooLarge(bytes.len()));
    }
    let signature = operator.sign(&bytes).map_err(PatchError::Sign)?;
    Ok(SignedPatch {
        manifest: bytes,
        signature,
        operator_cert: operator.cert_der().to_vec(),
    })
}

/// Checks a signed patch against the mesh CA in `trust` and decodes it, by
/// the same rules as configuration bundles: the size limit first, then the
/// certificate (the mesh's, an operator's, Ed25519), the signature over
/// exactly the manifest bytes, and a manifest that decodes with nothing
/// left over and keeps the manifest rules. Returns the manifest and who
/// signed it.
pub fn verify(
    trust: &Credentials,
    signed: &SignedPatch,
) -> Result<(PatchManifest, Identity), PatchError> {
    if signed.manifest.len() > MAX_MANIFEST_BYTES {
        return Err(PatchError::TooLarge(signed.manifest.len()));
    }
    let identity = verify_operator_signature(
        trust,
        &signed.operator_cert,
        &signed.manifest,
        &signed.signature,
    )
    .map_err(from_signature)?;
    let manifest = decode_manifest(&signed.manifest).map_err(|reason| PatchError::Malformed {
        signer: identity.clone(),
        reason,
    })?;
    Ok((manifest, identity))
}

/// Decodes a manifest's signed bytes, as [`verify`] does once the signature
/// holds: exactly one manifest, nothing after it, and the manifest rules.
pub fn decode_manifest(bytes: &[u8]) -> Result<PatchManifest, String> {
    let (manifest, rest) = postcard::take_from_bytes::<PatchManifest>(bytes)
        .map_err(|e| format!("not a patch manifest: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes after the manifest", rest.len()));
    }
    manifest
        .check()
        .map_err(|(field, problem)| format!("{field}: {problem}"))?;
    Ok(manifest)
}

// ---------------------------------------------------------------------------
// Chunk store

/// A directory of chunks, each in a file named by the hex of its BLAKE3.
///
/// Every chunk is checked against its hash before it is written and again
/// when it is read, so what the store hands out is what the manifest
/// signed even if the disk damaged it in between.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

impl ChunkStore {
    /// Opens (creating it if needed) the store in `dir`, and removes the
    /// temporary files of writes a crash interrupted. One process owns a
    /// store: another one writing there while this opens could lose a
    /// write in progress.
    pub fn open(dir: &Path) -> Result<ChunkStore, PatchError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        remove_leftover_temp_files(dir).map_err(io_err(dir))?;
        Ok(ChunkStore {
            dir: dir.to_owned(),
        })
    }

    /// Where the chunk with this hash is kept.
    pub fn path_of(&self, hash: &[u8; 32]) -> PathBuf {
        self.dir.join(hex32(hash))
    }

    /// Stores `bytes` as the chunk `hash`, after checking that they hash to
    /// it. The write is atomic: a crash leaves the chunk whole or absent.
    pub fn put(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<(), PatchError> {
        if bytes.len() > CHUNK_SIZE as usize {
            return Err(PatchError::ChunkTooLarge(bytes.len()));
        }
        let actual = blake3::hash(bytes);
        if actual.as_bytes() != hash {
            return Err(PatchError::ChunkMismatch {
                expected: hex32(hash),
                actual: hex32(actual.as_bytes()),
            });
        }
        self.write(hash, bytes)
    }

    fn write(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<(), PatchError> {
        let path = self.path_of(hash);
        write_atomic(&path, bytes, 0o600).map_err(io_err(&path))
    }

    /// Whether a file for the chunk is in the store (not read, so not
    /// checked: [`ChunkStore::get`] and [`ChunkStore::missing`] check).
    pub fn has(&self, hash: &[u8; 32]) -> bool {
        self.path_of(hash).is_file()
    }

    /// The chunk's bytes, checked against its hash; `None` if the store
    /// does not hold it. A file that no longer matches is removed, so the
    /// chunk counts as missing and is fetched again, and reported as
    /// [`PatchError::CorruptChunk`].
    pub fn get(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, PatchError> {
        let path = self.path_of(hash);
        let bytes = match read_chunk(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if bytes.len() <= CHUNK_SIZE as usize && blake3::hash(&bytes).as_bytes() == hash {
            return Ok(Some(bytes));
        }
        self.discard(&path)
    }

    /// Removes a chunk file found damaged; reports it.
    fn discard<T>(&self, path: &Path) -> Result<T, PatchError> {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path)(e)),
        }
        Err(PatchError::CorruptChunk(path.to_owned()))
    }

    /// The indexes of the artifact's chunks the store does not hold intact,
    /// lowest first. Each held chunk is read and checked; damaged ones are
    /// removed (see [`ChunkStore::get`]) and listed as missing.
    pub fn missing(&self, artifact: &ArtifactRef) -> Vec<u32> {
        (0u32..)
            .zip(&artifact.chunks)
            .filter(|(_, hash)| !matches!(self.get(hash), Ok(Some(_))))
            .map(|(i, _)| i)
            .collect()
    }

    /// [`ChunkStore::missing`], and, when no chunk is missing, whether the
    /// chunks in order make a file of the manifest's size and whole-file
    /// BLAKE3 ([`PatchError::ArtifactMismatch`] if not). This is where
    /// the whole hash is checked: a hub checks it once before it
    /// publishes a patch, and the nodes, which check each chunk against
    /// the signed list, do not hash the file a second time. One read of
    /// each chunk.
    pub fn check(&self, artifact: &ArtifactRef) -> Result<Vec<u32>, PatchError> {
        let mut whole = blake3::Hasher::new();
        // As many chunks as the size makes, each as long as it makes it:
        // then together they are that size.
        let mut sizes_agree = artifact.chunks.len() as u64 == artifact.expected_chunks();
        let mut missing = Vec::new();
        for (i, hash) in (0u32..).zip(&artifact.chunks) {
            match self.get(hash) {
                Ok(Some(bytes)) if missing.is_empty() => {
                    whole.update(&bytes);
                    sizes_agree &= artifact.chunk_len(i) == Some(bytes.len() as u64);
                }
                Ok(Some(_)) => {}
                _ => missing.push(i),
            }
        }
        if missing.is_empty() && (!sizes_agree || whole.finalize().as_bytes() != &artifact.blake3) {
            return Err(PatchError::ArtifactMismatch {
                artifact: artifact.name.clone(),
            });
        }
        Ok(missing)
    }
}

/// A chunk file's bytes, at most one more than [`CHUNK_SIZE`] (so that a
/// longer file is seen to be too long), read into one allocation.
fn read_chunk(path: &Path) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len().min(u64::from(CHUNK_SIZE) + 1);
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(u64::from(CHUNK_SIZE) + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A chunk's bytes with the BLAKE3 they hash to. Made only by hashing
/// them, so whoever holds one may compare its hash with the manifest's
/// ([`Download::on_hashed`]) and write it ([`PartialArtifact::write`])
/// without hashing a megabyte twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashedChunk {
    hash: [u8; 32],
    bytes: bytes::Bytes,
}

impl HashedChunk {
    /// Hashes `bytes`.
    pub fn new(bytes: impl Into<bytes::Bytes>) -> HashedChunk {
        let bytes = bytes.into();
        HashedChunk {
            hash: *blake3::hash(&bytes).as_bytes(),
            bytes,
        }
    }

    /// The BLAKE3 of [`HashedChunk::bytes`].
    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// What a relay serves its site of patches: the signed manifests it was
/// staged (`ID.patch` in `dir`, postcard) and their chunks.
#[derive(Debug, Clone)]
pub struct PatchFiles {
    pub dir: PathBuf,
    pub chunks: ChunkStore,
}

impl PatchFiles {
    /// Where the manifest of patch `id` is kept.
    pub fn manifest_path(dir: &Path, id: &[u8; 32]) -> PathBuf {
        dir.join(format!("{}.patch", crate::distribute::hex32(id)))
    }

    /// The manifest of patch `id`, if kept and readable (and still naming
    /// that id: a damaged file is not served).
    pub fn manifest(&self, id: &[u8; 32]) -> Option<SignedPatch> {
        let bytes = std::fs::read(Self::manifest_path(&self.dir, id)).ok()?;
        let signed: SignedPatch = postcard::from_bytes(&bytes).ok()?;
        (signed.id() == *id).then_some(signed)
    }
}

// ---------------------------------------------------------------------------
// Partial artifact

/// An artifact being fetched: the file that becomes `dest`, written in
/// place chunk by chunk at each chunk's offset, whatever order the chunks
/// come in. Each chunk is checked against the signed list before it is
/// written, and that is the whole check: the file is not hashed again as
/// one (the hub checked, when the patch was published, that the signed
/// whole-file hash agrees with the chunks: [`ChunkStore::check`]).
///
/// The file (`.NAME.partial` next to `dest`) is kept between attempts:
/// [`PartialArtifact::open`] hashes what it holds, so a download that was
/// cut short, or a process that crashed, resumes with the chunks it had,
/// and a chunk damaged on disk in between is fetched again. Chunks are
/// not flushed as they are written: what a power loss damages is found
/// the same way. [`PartialArtifact::finish`] flushes the file once and
/// renames it to `dest`, once every chunk is in.
///
/// A node writes what it fetches here rather than into a [`ChunkStore`]:
/// it serves no one, so a file per chunk would cost it a file creation, a
/// second write and a read of every byte, for nothing.
#[derive(Debug)]
pub struct PartialArtifact {
    artifact: ArtifactRef,
    path: PathBuf,
    dest: PathBuf,
    file: fs::File,
    /// The same file opened for direct I/O, where the system and the file
    /// system allow it (see [`PartialArtifact::write`]).
    direct: Option<fs::File>,
    /// Chunks written through `direct`.
    direct_writes: std::sync::atomic::AtomicU32,
    /// Which chunks the file holds, checked.
    written: std::sync::Mutex<Vec<bool>>,
}

/// The alignment direct I/O asks of a buffer's address, a write's length
/// and its offset: the page size, which covers the logical block size of
/// the disks a node writes to. A chunk answer is read into memory so that
/// its chunk starts at such a boundary; chunks are a multiple of it.
pub const DIRECT_ALIGN: usize = 4096;

/// The partial file at `path` opened to write with `O_DIRECT`, or `None`
/// where that is not possible (a file system without direct I/O, such as
/// some tmpfs, refuses the open).
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<fs::File> {
    match fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no direct I/O for the artifact; it is written through the page cache");
            None
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<fs::File> {
    None
}

/// Whether a partial artifact in `dir` is written with direct I/O.
#[cfg(test)]
pub(crate) fn direct_io_in(dir: &Path) -> bool {
    let probe = dir.join(".direct-probe");
    fs::write(&probe, b"").unwrap();
    let direct = open_direct(&probe).is_some();
    fs::remove_file(&probe).unwrap();
    direct
}

impl PartialArtifact {
    /// Where the partial file of `dest` is kept.
    pub fn path_for(dest: &Path) -> PathBuf {
        let name = dest
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        dest.with_file_name(format!(".{name}.partial"))
    }

    /// Opens (creating it and its directory if needed) the partial file of
    /// `dest` and returns the indexes of the chunks it already holds
    /// intact, each hashed, lowest first.
    pub fn open(
        artifact: &ArtifactRef,
        dest: &Path,
    ) -> Result<(PartialArtifact, Vec<u32>), PatchError> {
        let path = Self::path_for(dest);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        let found = file.metadata().map_err(io_err(&path))?.len();
        if found != artifact.size {
            file.set_len(artifact.size).map_err(io_err(&path))?;
        }
        let partial = PartialArtifact {
            artifact: artifact.clone(),
            direct: open_direct(&path),
            direct_writes: std::sync::atomic::AtomicU32::new(0),
            path,
            dest: dest.to_owned(),
            file,
            written: std::sync::Mutex::new(vec![false; artifact.chunks.len()]),
        };
        let mut held = Vec::new();
        // A new file holds nothing: not worth reading.
        if found > 0 {
            let mut buf = Vec::new();
            for (i, hash) in (0u32..).zip(&artifact.chunks) {
                if partial.read_chunk(i, &mut buf)? && blake3::hash(&buf).as_bytes() == hash {
                    held.push(i);
                }
            }
        }
        {
            let mut written = partial.lock();
            for &i in &held {
                written[i as usize] = true;
            }
        }
        Ok((partial, held))
    }

    /// Writes chunk `index` in place, with direct I/O when the chunk's
    /// bytes allow it ([`DIRECT_ALIGN`]). Its hash and length must be the
    /// manifest's: the caller has checked them ([`Download::on_hashed`]);
    /// this checks again, cheaply (the hash computed, against the
    /// manifest's), because nothing after it would find a wrong chunk.
    pub fn write(&self, index: u32, chunk: &HashedChunk) -> Result<(), PatchError> {
        let expected = self.artifact.chunks.get(index as usize);
        if expected != Some(&chunk.hash)
            || self.artifact.chunk_len(index) != Some(chunk.bytes.len() as u64)
        {
            return Err(PatchError::ChunkMismatch {
                expected: expected.map_or_else(|| "no chunk".to_owned(), hex32),
                actual: hex32(&chunk.hash),
            });
        }
        let offset = u64::from(index) * u64::from(self.artifact.chunk_size);
        if !self.write_direct(&chunk.bytes, offset) {
            self.file
                .write_all_at(&chunk.bytes, offset)
                .map_err(io_err(&self.path))?;
        }
        self.lock()[index as usize] = true;
        Ok(())
    }

    /// Writes `bytes` at `offset` with direct I/O if it can: the file is
    /// open for it, and the address, the length and the offset are
    /// multiples of [`DIRECT_ALIGN`]. The bytes go from the buffer to the
    /// disk without a copy into the page cache, so an artifact of
    /// hundreds of megabytes neither costs the node a pass over memory nor
    /// pushes the host's own files out of the cache; [`finish`] still
    /// flushes the disk's cache before the rename. `false` if the caller
    /// writes the bytes the usual way: a chunk that is not aligned (the
    /// last, shorter one; one read into memory as it came), or a write the
    /// file system refused.
    ///
    /// [`finish`]: PartialArtifact::finish
    fn write_direct(&self, bytes: &[u8], offset: u64) -> bool {
        let Some(direct) = &self.direct else {
            return false;
        };
        let align = DIRECT_ALIGN as u64;
        if !(bytes.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            || !bytes.len().is_multiple_of(DIRECT_ALIGN)
            || !offset.is_multiple_of(align)
        {
            return false;
        }
        match direct.write_all_at(bytes, offset) {
            Ok(()) => {
                self.direct_writes
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            // Whatever part of it was written is written again, whole.
            Err(e) => {
                tracing::debug!(path = %self.path.display(), error = %e, "a direct write failed; writing through the page cache");
                false
            }
        }
    }

    /// Chunks written with direct I/O so far (see [`PartialArtifact::write`]).
    pub fn direct_writes(&self) -> u32 {
        self.direct_writes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Flushes the file and renames it to `dest` if every chunk is in it;
    /// otherwise leaves it for the next attempt
    /// ([`PatchError::ChunkMissing`]).
    pub fn finish(self) -> Result<(), PatchError> {
        if let Some(missing) = self.lock().iter().position(|&w| !w) {
            return Err(PatchError::ChunkMissing {
                artifact: self.artifact.name.clone(),
                chunk: missing as u32,
            });
        }
        let path = &self.path;
        (|| {
            self.file
                .set_permissions(fs::Permissions::from_mode(0o644))?;
            self.file.sync_all()?;
            fs::rename(path, &self.dest)?;
            match self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) => fs::File::open(dir)?.sync_all(),
                None => Ok(()),
            }
        })()
        .map_err(io_err(path))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.written.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads chunk `index` from the file into `buf`; `false` if the
    /// manifest has no such chunk.
    fn read_chunk(&self, index: u32, buf: &mut Vec<u8>) -> Result<bool, PatchError> {
        let Some(len) = self.artifact.chunk_len(index) else {
            return Ok(false);
        };
        buf.resize(len as usize, 0);
        let offset = u64::from(index) * u64::from(self.artifact.chunk_size);
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path))?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------
// Download

/// The delay before a chunk that failed `failures` times (at least once)
/// is asked for again: [`RETRY_FIRST`], doubling, at most [`RETRY_MAX`].
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RETRY_FIRST * (1u32 << doublings)).min(RETRY_MAX)
}

/// What became of a chunk handed to [`Download::on_chunk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The bytes match the manifest; the caller stores them
    /// ([`ChunkStore::put`]).
    Verified,
    /// The bytes do not match; the chunk will be asked for again at once
    /// (it counts as a failed attempt, so a source that keeps sending
    /// damaged bytes ends the download).
    Corrupt,
    /// Not a chunk this download is waiting for (already verified, an index
    /// the artifact does not have, or the download has ended); dropped.
    Ignored,
}

/// What a download has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownloadStats {
    /// Chunk requests handed out by [`Download::next_requests`].
    pub requested: u64,
    /// Chunks received intact.
    pub fetched: u64,
    /// Chunks asked for again because they arrived damaged.
    pub refetched: u64,
    /// Bytes received, damaged ones included.
    pub bytes: u64,
    /// Requests that failed (timeouts, dropped connections).
    pub failures: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Held,
    /// To be asked for, not before the given time if there is one.
    Wanted(Option<Instant>),
    InFlight,
}

#[derive(Debug, Clone)]
struct Chunk {
    slot: Slot,
    /// Failed attempts so far (failures and damaged arrivals).
    attempts: u32,
    last_reason: String,
}

/// Fetching one artifact's chunks from one source, as a state machine
/// without I/O: the driver asks [`Download::next_requests`] what to
/// request, sends the requests, and reports each answer
/// ([`Download::on_chunk`]) or failure ([`Download::on_failure`]) with the
/// time it happened; [`Download::poll_timeout`] says when to ask again.
///
/// A chunk that fails is asked for again after [`retry_delay`] (1 s
/// doubling to 30 s); one that arrives damaged at once. After
/// `max_attempts` failed attempts at one chunk (failures and damaged
/// arrivals alike) the download stops for good with
/// [`PatchError::TransferFailed`]: a source that keeps failing is then the
/// driver's to replace, not this machine's to retry forever.
#[derive(Debug, Clone)]
pub struct Download {
    artifact: String,
    hashes: Vec<[u8; 32]>,
    chunks: Vec<Chunk>,
    max_attempts: u32,
    in_flight: usize,
    missing: usize,
    stats: DownloadStats,
    /// The chunk that failed `max_attempts` times, once one has.
    gave_up: Option<u32>,
}

impl Download {
    /// A download of `artifact` when the chunks at the indexes in `held`
    /// are already stored (indexes it does not have are ignored);
    /// `max_attempts` (at least 1) failed attempts at one chunk end it.
    pub fn new(artifact: &ArtifactRef, held: &[u32], max_attempts: u32) -> Download {
        let mut chunks: Vec<Chunk> = artifact
            .chunks
            .iter()
            .map(|_| Chunk {
                slot: Slot::Wanted(None),
                attempts: 0,
                last_reason: String::new(),
            })
            .collect();
        for &i in held {
            if let Some(c) = chunks.get_mut(i as usize) {
                c.slot = Slot::Held;
            }
        }
        let missing = chunks.iter().filter(|c| c.slot != Slot::Held).count();
        Download {
            artifact: artifact.name.clone(),
            hashes: artifact.chunks.clone(),
            chunks,
            max_attempts: max_attempts.max(1),
            in_flight: 0,
            missing,
            stats: DownloadStats::default(),
            gave_up: None,
        }
    }

    /// Chunks to request now, lowest index first: those not held, not
    /// already requested and not waiting out a retry delay, so that at
    /// most `max_in_flight` requests are outstanding. Each returned index
    /// is counted as in flight until its answer or failure is reported.
    pub fn next_requests(&mut self, now: Instant, max_in_flight: usize) -> Vec<u32> {
        let mut out = Vec::new();
        if self.gave_up.is_some() {
            return out;
        }
        let mut budget = max_in_flight.saturating_sub(self.in_flight);
        for (i, c) in (0u32..).zip(self.chunks.iter_mut()) {
            if budget == 0 {
                break;
            }
            if let Slot::Wanted(at) = c.slot
                && at.is_none_or(|at| at <= now)
            {
                c.slot = Slot::InFlight;
                out.push(i);
                budget -= 1;
            }
        }
        self.in_flight += out.len();
        self.stats.requested += out.len() as u64;
        out
    }

    /// A chunk arrived. Bytes that match the manifest are
    /// [`ChunkOutcome::Verified`] (also when they come after the request
    /// was given up as failed); others are [`ChunkOutcome::Corrupt`].
    pub fn on_chunk(&mut self, now: Instant, index: u32, bytes: &[u8]) -> ChunkOutcome {
        self.on_digest(now, index, bytes.len(), blake3::hash(bytes).as_bytes())
    }

    /// [`Download::on_chunk`] for a chunk hashed already (off the task
    /// that drives the download).
    pub fn on_hashed(&mut self, now: Instant, index: u32, chunk: &HashedChunk) -> ChunkOutcome {
        self.on_digest(now, index, chunk.bytes.len(), &chunk.hash)
    }

    fn on_digest(
        &mut self,
        _now: Instant,
        index: u32,
        len: usize,
        digest: &[u8; 32],
    ) -> ChunkOutcome {
        self.stats.bytes += len as u64;
        if self.gave_up.is_some() {
            return ChunkOutcome::Ignored;
        }
        let Some(c) = self.chunks.get_mut(index as usize) else {
            return ChunkOutcome::Ignored;
        };
        if c.slot == Slot::Held {
            return ChunkOutcome::Ignored;
        }
        if c.slot == Slot::InFlight {
            self.in_flight -= 1;
        }
        if digest == &self.hashes[index as usize] {
            c.slot = Slot::Held;
            self.missing -= 1;
            self.stats.fetched += 1;
            return ChunkOutcome::Verified;
        }
        self.stats.refetched += 1;
        c.attempts += 1;
        c.last_reason = format!("{len} bytes that do not match the chunk's BLAKE3");
        c.slot = Slot::Wanted(None);
        if c.attempts >= self.max_attempts {
            self.gave_up = Some(index);
        }
        ChunkOutcome::Corrupt
    }

    /// A request for chunk `index` failed (timed out, the connection
    /// dropped, the source refused). The chunk is asked for again after
    /// [`retry_delay`] of its failures. A failure of a chunk that is not in
    /// flight is ignored.
    pub fn on_failure(&mut self, now: Instant, index: u32, reason: &str) {
        if self.gave_up.is_some() {
            return;
        }
        let Some(c) = self.chunks.get_mut(index as usize) else {
            return;
        };
        if c.slot != Slot::InFlight {
            return;
        }
        self.in_flight -= 1;
        self.stats.failures += 1;
        c.attempts += 1;
        c.last_reason = reason.to_owned();
        c.slot = Slot::Wanted(Some(now + retry_delay(c.attempts)));
        if c.attempts >= self.max_attempts {
            self.gave_up = Some(index);
        }
    }

    /// The earliest time a chunk waiting out its retry delay may be asked
    /// for again; `None` when none is waiting (or the download is over).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.gave_up.is_some() {
            return None;
        }
        self.chunks
            .iter()
            .filter_map(|c| match c.slot {
                Slot::Wanted(at) => at,
                _ => None,
            })
            .min()
    }

    /// Whether every chunk is held.
    pub fn done(&self) -> bool {
        self.missing == 0
    }

    /// Why the download stopped for good, if it did.
    pub fn error(&self) -> Option<PatchError> {
        let chunk = self.gave_up?;
        let c = &self.chunks[chunk as usize];
        Some(PatchError::TransferFailed {
            artifact: self.artifact.clone(),
            chunk,
            attempts: c.attempts,
            last_reason: c.last_reason.clone(),
        })
    }

    /// Chunks not yet held.
    pub fn missing(&self) -> usize {
        self.missing
    }

    pub fn stats(&self) -> DownloadStats {
        self.stats
    }
}

impl fmt::Display for ArtifactRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} bytes, {} chunks, blake3 {})",
            self.name,
            self.size,
            self.chunks.len(),
            hex32(&self.blake3)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Role;
    use crate::tls::MeshCa;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const MIB: usize = 1 << 20;

    const GOOD: &str = r#"
name = "openssl-fix"
version = "3.0.13-2"
selector = { labels = { role = "web" } }
install = ["sh install.sh"]
rollback = ["sh rollback.sh"]
checks = ["web"]
bake = "5m"
artifacts = ["install.sh", "rollback.sh", "pkg.deb"]
"#;

    /// A patch directory in a temp dir, written file by file.
    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            Dir(tempfile::tempdir().unwrap())
        }
        fn write(&self, rel: &str, bytes: impl AsRef<[u8]>) -> &Self {
            let path = self.0.path().join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, bytes).unwrap();
            self
        }
        /// The good patch with its artifacts.
        fn good() -> Self {
            let d = Dir::new();
            d.write(PATCH_FILE, GOOD)
                .write("install.sh", "dpkg -i pkg.deb\n")
                .write("rollback.sh", "dpkg -r openssl\n")
                .write("pkg.deb", vec![7u8; 3000]);
            d
        }
        fn load(&self) -> Result<Patch, PatchError> {
            Patch::load(self.0.path())
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    /// `GOOD` with one line replaced (by its key) or removed (`None`).
    fn good_with(key: &str, line: Option<&str>) -> String {
        let mut found = false;
        let text: Vec<&str> = GOOD
            .lines()
            .filter_map(|l| {
                if l.starts_with(&format!("{key} =")) {
                    found = true;
                    line
                } else {
                    Some(l)
                }
            })
            .collect();
        assert!(found, "{key} is not in GOOD");
        text.join("\n") + "\n"
    }

    fn hash(bytes: &[u8]) -> [u8; 32] {
        *blake3::hash(bytes).as_bytes()
    }

    #[test]
    fn a_patch_directory_loads_with_every_field_and_artifact_described() {
        let d = Dir::good();
        let p = d.load().unwrap();
        assert_eq!(p.dir, d.path().canonicalize().unwrap());
        let m = &p.manifest;
        assert_eq!(m.name, "openssl-fix");
        assert_eq!(m.version, "3.0.13-2");
        assert_eq!(
            m.selector.labels,
            BTreeMap::from([("role".to_string(), "web".to_string())])
        );
        assert_eq!(m.install, ["sh install.sh"]);
        assert_eq!(m.rollback, ["sh rollback.sh"]);
        assert_eq!(m.checks, ["web"]);
        assert_eq!(m.bake, Duration::from_secs(300));
        let names: Vec<&str> = m.artifacts.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["install.sh", "rollback.sh", "pkg.deb"]);
        let deb = &m.artifacts[2];
        assert_eq!(deb.size, 3000);
        assert_eq!(deb.blake3, hash(&[7u8; 3000]));
        assert_eq!(deb.chunk_size, CHUNK_SIZE);
        assert_eq!(deb.chunks, vec![hash(&[7u8; 3000])]);
        assert_eq!(
            p.artifact_path(deb),
            d.path().canonicalize().unwrap().join("pkg.deb")
        );
    }

    #[test]
    fn artifacts_in_subdirectories_and_spelled_with_dot_slash_are_named_canonically() {
        let d = Dir::good();
        d.write(
            PATCH_FILE,
            good_with(
                "artifacts",
                Some(r#"artifacts = ["./bin//tool", "pkg.deb"]"#),
            ),
        )
        .write("bin/tool", "x");
        let p = d.load().unwrap();
        assert_eq!(p.manifest.artifacts[0].name, "bin/tool");
    }

    /// Loads `GOOD` with `key`'s line replaced and returns the error.
    fn load_err(d: &Dir, key: &str, line: Option<&str>) -> PatchError {
        d.write(PATCH_FILE, good_with(key, line));
        d.load().unwrap_err()
    }

    fn field_problem(err: &PatchError) -> (&str, &ManifestProblem) {
        match err {
            PatchError::Invalid { field, problem, .. } => (field.as_str(), problem),
            other => panic!("not an invalid field: {other}"),
        }
    }

    #[test]
    fn each_field_rule_is_refused_with_the_file_and_field_named() {
        let d = Dir::good();
        d.write("dir/inner", "x");
        let long = format!("version = \"{}\"", "v".repeat(MAX_VERSION_CHARS + 1));
        // (key, its new line, the field named, the problem expected)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            &'a str,
            fn(&ManifestProblem) -> bool,
        );
        let cases: Vec<Case<'_>> = vec![
            ("name", Some(r#"name = "OpenSSL fix""#), "name", |p| {
                matches!(p, ManifestProblem::BadName(_))
            }),
            ("version", Some(r#"version = " ""#), "version", |p| {
                *p == ManifestProblem::BadVersion
            }),
            ("version", Some(&long), "version", |p| {
                *p == ManifestProblem::BadVersion
            }),
            ("version", Some(r#"version = "1\n2""#), "version", |p| {
                *p == ManifestProblem::BadVersion
            }),
            (
                "selector",
                Some(r#"selector = { site = "par" }"#),
                "selector",
                |p| *p == ManifestProblem::Selector(Problem::SiteWithoutRegion),
            ),
            ("install", Some("install = []"), "install", |p| {
                *p == ManifestProblem::NoCommands
            }),
            ("install", None, "install", |p| {
                *p == ManifestProblem::NoCommands
            }),
            (
                "rollback",
                Some(r#"rollback = ["sh a", "  "]"#),
                "rollback[1]",
                |p| *p == ManifestProblem::EmptyCommand,
            ),
            ("rollback", None, "rollback", |p| {
                *p == ManifestProblem::NoCommands
            }),
            (
                "checks",
                Some(r#"checks = ["web", "Web!"]"#),
                "checks[1]",
                |p| matches!(p, ManifestProblem::BadName(_)),
            ),
            (
                "checks",
                Some(r#"checks = ["web", "web"]"#),
                "checks[1]",
                |p| *p == ManifestProblem::DuplicateCheck("web".into()),
            ),
            ("bake", Some(r#"bake = "24h 1s""#), "bake", |p| {
                *p == ManifestProblem::BakeTooLong(Duration::from_secs(24 * 3600 + 1))
            }),
            (
                "artifacts",
                Some(r#"artifacts = ["pkg.deb", "../etc/passwd"]"#),
                "artifacts[1] ../etc/passwd",
                |p| *p == ManifestProblem::ArtifactPath("../etc/passwd".into()),
            ),
            (
                "artifacts",
                Some(r#"artifacts = ["/etc/passwd"]"#),
                "artifacts[0] /etc/passwd",
                |p| *p == ManifestProblem::ArtifactPath("/etc/passwd".into()),
            ),
            (
                "artifacts",
                Some(r#"artifacts = ["nope.bin"]"#),
                "artifacts[0] nope.bin",
                |p| *p == ManifestProblem::ArtifactMissing("nope.bin".into()),
            ),
            (
                "artifacts",
                Some(r#"artifacts = ["dir"]"#),
                "artifacts[0] dir",
                |p| *p == ManifestProblem::ArtifactNotFile("dir".into()),
            ),
            (
                "artifacts",
                Some(r#"artifacts = ["pkg.deb", "./pkg.deb"]"#),
                "artifacts[1] ./pkg.deb",
                |p| *p == ManifestProblem::DuplicateArtifact("pkg.deb".into()),
            ),
        ];
        for (key, line, want_field, want) in cases {
            let err = load_err(&d, key, line);
            let (field, problem) = field_problem(&err);
            assert_eq!(field, want_field, "{line:?}: {err}");
            assert!(want(problem), "{line:?}: {err}");
            let text = err.to_string();
            assert!(
                text.starts_with(&format!(
                    "{}: {want_field}: ",
                    d.path().join(PATCH_FILE).display()
                )),
                "{text}"
            );
        }
    }

    #[test]
    fn a_bake_of_exactly_24h_and_of_zero_are_accepted() {
        let d = Dir::good();
        for (line, want) in [
            (r#"bake = "24h""#, MAX_BAKE),
            (r#"bake = "0s""#, Duration::ZERO),
        ] {
            d.write(PATCH_FILE, good_with("bake", Some(line)));
            assert_eq!(d.load().unwrap().manifest.bake, want);
        }
    }

    #[test]
    fn unknown_missing_and_mistyped_fields_are_parse_errors_with_their_line() {
        let d = Dir::good();
        d.write(PATCH_FILE, format!("{GOOD}colour = \"red\"\n"));
        let err = d.load().unwrap_err();
        assert!(
            matches!(&err, PatchError::Parse { line: 10, message, .. } if message.contains("colour")),
            "{err}"
        );
        let err = load_err(&d, "bake", None);
        assert!(
            matches!(&err, PatchError::Parse { message, .. } if message.contains("bake")),
            "{err}"
        );
        let err = load_err(&d, "bake", Some(r#"bake = "five minutes""#));
        assert!(matches!(&err, PatchError::Parse { line: 8, .. }), "{err}");
        assert!(err.to_string().contains("patch.toml: line 8"), "{err}");
    }

    #[test]
    fn a_directory_without_patch_toml_or_with_a_huge_one_is_refused() {
        let d = Dir::new();
        let err = d.load().unwrap_err();
        assert!(
            matches!(&err, PatchError::NoPatchFile(p) if p.ends_with(PATCH_FILE)),
            "{err}"
        );
        d.write(
            PATCH_FILE,
            format!("{GOOD}# {}\n", "x".repeat(MAX_PATCH_FILE_BYTES as usize)),
        );
        assert!(matches!(
            d.load().unwrap_err(),
            PatchError::PatchFileTooLarge(_)
        ));
    }

    #[test]
    fn an_artifact_symlinked_out_of_the_directory_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "x").unwrap();
        let d = Dir::good();
        std::os::unix::fs::symlink(outside.path().join("secret"), d.path().join("link")).unwrap();
        let err = load_err(&d, "artifacts", Some(r#"artifacts = ["link"]"#));
        assert_eq!(
            field_problem(&err),
            (
                "artifacts[0] link",
                &ManifestProblem::ArtifactOutside("link".into())
            )
        );
    }

    #[test]
    fn an_artifact_over_256_mib_or_artifacts_over_1_gib_are_refused_before_hashing() {
        let d = Dir::good();
        // Sparse files: sized without being written or read.
        let sparse = |name: &str, len: u64| {
            fs::File::create(d.path().join(name))
                .unwrap()
                .set_len(len)
                .unwrap();
        };
        sparse("big", MAX_ARTIFACT_BYTES + 1);
        let err = load_err(&d, "artifacts", Some(r#"artifacts = ["pkg.deb", "big"]"#));
        assert_eq!(
            field_problem(&err),
            (
                "artifacts[1] big",
                &ManifestProblem::ArtifactTooLarge {
                    name: "big".into(),
                    size: MAX_ARTIFACT_BYTES + 1
                }
            )
        );
        assert!(err.to_string().contains("split it"), "{err}");
        for i in 0..5 {
            sparse(&format!("part{i}"), MAX_ARTIFACT_BYTES);
        }
        let started = std::time::Instant::now();
        let err = load_err(
            &d,
            "artifacts",
            Some(r#"artifacts = ["part0", "part1", "part2", "part3", "part4"]"#),
        );
        assert_eq!(
            field_problem(&err),
            (
                "artifacts",
                &ManifestProblem::PatchTooLarge(5 * MAX_ARTIFACT_BYTES)
            )
        );
        // Four full artifacts were not read to find this out.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_file_of_exactly_k_mib_has_k_full_chunks() {
        let bytes: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
        let a = ArtifactRef::read("a", &bytes[..]).unwrap();
        assert_eq!(a.size, 2 * MIB as u64);
        assert_eq!(a.chunks, vec![hash(&bytes[..MIB]), hash(&bytes[MIB..])]);
        assert_eq!(a.blake3, hash(&bytes));
        assert_eq!(a.chunk_len(1), Some(MIB as u64));
        assert_eq!(a.chunk_len(2), None);
    }

    #[test]
    fn a_file_of_k_mib_and_one_byte_has_a_last_chunk_of_one_byte() {
        let mut bytes: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();
        bytes.push(42);
        let d = Dir::good();
        d.write("pkg.deb", &bytes);
        let p = d.load().unwrap();
        let a = &p.manifest.artifacts[2];
        assert_eq!(a.size, 2 * MIB as u64 + 1);
        assert_eq!(
            a.chunks,
            vec![hash(&bytes[..MIB]), hash(&bytes[MIB..2 * MIB]), hash(&[42])]
        );
        assert_eq!(a.chunk_len(2), Some(1));
        assert_eq!(a.blake3, hash(&bytes));
    }

    #[test]
    fn an_empty_file_has_no_chunks() {
        let d = Dir::good();
        d.write("pkg.deb", b"");
        let a = d.load().unwrap().manifest.artifacts[2].clone();
        assert_eq!(a.size, 0);
        assert!(a.chunks.is_empty());
        assert_eq!(a.blake3, hash(b""));
        assert_eq!(a.chunk_len(0), None);
    }

    // -- signing -------------------------------------------------------------

    struct Mesh {
        alice: Credentials,
        node: Credentials,
    }

    fn mesh(ca: &MeshCa) -> Mesh {
        let issue = |role, region: &str, site: &str, name: &str| {
            Credentials::issue(ca, &Identity::new(role, region, site, name).unwrap()).unwrap()
        };
        Mesh {
            alice: issue(Role::Operator, "", "", "alice"),
            node: issue(Role::Node, "eu", "par", "n1"),
        }
    }

    fn manifest() -> PatchManifest {
        Dir::good().load().unwrap().manifest
    }

    #[test]
    fn a_signed_patch_verifies_and_round_trips_as_it_travels() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = sign(&m.alice, &manifest()).unwrap();
        assert_eq!(signed.manifest, manifest().encode());
        assert_eq!(signed.signature.len(), 64);
        let wire = postcard::to_stdvec(&signed).unwrap();
        let received: SignedPatch = postcard::from_bytes(&wire).unwrap();
        let (back, who) = verify(&m.node, &received).unwrap();
        assert_eq!(back, manifest());
        assert_eq!(who, m.alice.identity);
        assert_eq!(received.id(), hash(&signed.manifest));
    }

    #[test]
    fn the_manifest_encoding_is_stable() {
        let m = PatchManifest {
            name: "p".into(),
            version: "1".into(),
            selector: Selector {
                region: Some("eu".into()),
                site: None,
                labels: BTreeMap::from([("role".into(), "web".into())]),
            },
            install: vec!["a".into()],
            rollback: vec!["b".into()],
            checks: vec!["c".into()],
            bake: Duration::from_millis(1500),
            artifacts: vec![ArtifactRef {
                name: "f".into(),
                size: 1,
                blake3: [0xaa; 32],
                chunk_size: CHUNK_SIZE,
                chunks: vec![[0xbb; 32]],
            }],
        };
        let encoded = m.encode();
        assert_eq!(encoded, m.clone().encode());
        let mut want = b"\x01p\x011\x01\x02eu\x00\x01\x04role\x03web\x01\x01a\x01\x01b\x01\x01c\x01\x80\xca\xb5\xee\x01\x01\x01f\x01"
            .to_vec();
        want.extend([0xaa; 32]);
        want.extend([0x80, 0x80, 0x40, 0x01]);
        want.extend([0xbb; 32]);
        assert_eq!(hex(&encoded), hex(&want));
        assert_eq!(postcard::from_bytes::<PatchManifest>(&encoded).unwrap(), m);
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn an_altered_manifest_or_signature_is_a_bad_signature() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = sign(&m.alice, &manifest()).unwrap();
        let mut altered = signed.clone();
        altered.manifest[3] ^= 1;
        assert!(matches!(
            verify(&m.node, &altered),
            Err(PatchError::BadSignature(id)) if id.name == "alice"
        ));
        let mut longer = signed.clone();
        longer.manifest.push(0);
        assert!(matches!(
            verify(&m.node, &longer),
            Err(PatchError::BadSignature(_))
        ));
        let mut resigned = signed;
        resigned.signature[0] ^= 1;
        assert!(matches!(
            verify(&m.node, &resigned),
            Err(PatchError::BadSignature(_))
        ));
    }

    #[test]
    fn a_patch_from_an_operator_of_another_ca_is_an_unknown_key() {
        let ours = MeshCa::generate("ours").unwrap();
        let theirs = MeshCa::generate("theirs").unwrap();
        let signed = sign(&mesh(&theirs).alice, &manifest()).unwrap();
        let err = verify(&mesh(&ours).node, &signed).unwrap_err();
        assert!(matches!(err, PatchError::UnknownKey(_)), "{err}");
        assert!(err.to_string().contains("mesh CA"), "{err}");
    }

    #[test]
    fn a_node_neither_signs_nor_passes_as_an_operator() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        assert!(matches!(
            sign(&m.node, &manifest()),
            Err(PatchError::NotOperatorCredentials(id)) if id.name == "n1"
        ));
        let bytes = manifest().encode();
        let forged = SignedPatch {
            signature: m.node.sign(&bytes).unwrap(),
            manifest: bytes,
            operator_cert: m.node.cert_der().to_vec(),
        };
        assert!(matches!(
            verify(&m.alice, &forged),
            Err(PatchError::NotOperator(id)) if id.role == Role::Node
        ));
        // The node's signature under the operator's certificate.
        let stolen = SignedPatch {
            operator_cert: m.alice.cert_der().to_vec(),
            ..forged
        };
        assert!(matches!(
            verify(&m.node, &stolen),
            Err(PatchError::BadSignature(_))
        ));
    }

    #[test]
    fn correctly_signed_bytes_that_are_no_valid_manifest_are_malformed() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed_bytes = |bytes: Vec<u8>| SignedPatch {
            signature: m.alice.sign(&bytes).unwrap(),
            manifest: bytes,
            operator_cert: m.alice.cert_der().to_vec(),
        };
        let err = verify(&m.node, &signed_bytes(vec![0xff; 40])).unwrap_err();
        assert!(matches!(err, PatchError::Malformed { .. }), "{err}");
        let mut trailing = manifest().encode();
        trailing.push(0);
        let err = verify(&m.node, &signed_bytes(trailing)).unwrap_err();
        assert!(err.to_string().contains("1 bytes after"), "{err}");
        // A manifest that skipped the loader's rules.
        let mut bad = manifest();
        bad.artifacts[2].chunks.push([0; 32]);
        let err = verify(&m.node, &sign(&m.alice, &bad).unwrap()).unwrap_err();
        assert!(
            matches!(&err, PatchError::Malformed { reason, .. }
                if reason.starts_with("artifacts[2] pkg.deb: 2 chunk hashes for 1 chunks")),
            "{err}"
        );
        let mut bad = manifest();
        bad.artifacts[0].name = "../x".into();
        let err = verify(&m.node, &sign(&m.alice, &bad).unwrap()).unwrap_err();
        assert!(
            matches!(&err, PatchError::Malformed { reason, .. } if reason.starts_with("artifacts[0] ../x")),
            "{err}"
        );
    }

    #[test]
    fn an_oversized_manifest_is_refused_before_anything_else() {
        let ca = MeshCa::generate("test").unwrap();
        let m = mesh(&ca);
        let signed = SignedPatch {
            manifest: vec![0; MAX_MANIFEST_BYTES + 1],
            signature: vec![],
            operator_cert: vec![],
        };
        assert!(matches!(
            verify(&m.node, &signed),
            Err(PatchError::TooLarge(n)) if n == MAX_MANIFEST_BYTES + 1
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn garbage_manifests_and_signatures_are_refused_without_panicking(
            manifest in proptest::collection::vec(any::<u8>(), 0..512),
            signature in proptest::collection::vec(any::<u8>(), 0..128),
            use_real_cert in any::<bool>(),
        ) {
            let alice = shared_operator();
            let cert = if use_real_cert { alice.cert_der().to_vec() } else { manifest.clone() };
            let signed = SignedPatch { manifest, signature, operator_cert: cert };
            prop_assert!(verify(alice, &signed).is_err());
        }

        #[test]
        fn correctly_signed_garbage_is_refused_without_panicking(
            manifest in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let alice = shared_operator();
            let signed = SignedPatch {
                signature: alice.sign(&manifest).unwrap(),
                manifest,
                operator_cert: alice.cert_der().to_vec(),
            };
            let refused = matches!(verify(alice, &signed), Err(PatchError::Malformed { .. }));
            prop_assert!(refused);
        }
    }

    /// One operator for all proptest cases (issuing is slow).
    fn shared_operator() -> &'static Credentials {
        static ALICE: std::sync::OnceLock<Credentials> = std::sync::OnceLock::new();
        ALICE.get_or_init(|| mesh(&MeshCa::generate("test").unwrap()).alice)
    }

    // -- chunk store ---------------------------------------------------------

    fn store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(&dir.path().join("chunks")).unwrap();
        (dir, store)
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// An artifact of `len` bytes and the store holding all its chunks.
    fn stored(store: &ChunkStore, len: usize, seed: u8) -> (Vec<u8>, ArtifactRef) {
        // Period 251, so no two chunks of one artifact are alike.
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        let a = ArtifactRef::read("pkg.deb", &bytes[..]).unwrap();
        for (i, h) in a.chunks.iter().enumerate() {
            let end = ((i + 1) * MIB).min(len);
            store.put(h, &bytes[i * MIB..end]).unwrap();
        }
        (bytes, a)
    }

    #[test]
    fn the_store_refuses_a_chunk_that_does_not_match_its_hash() {
        let (_d, store) = store();
        let want = hash(b"right");
        let err = store.put(&want, b"wrong").unwrap_err();
        assert!(
            matches!(&err, PatchError::ChunkMismatch { expected, actual }
                if *expected == hex32(&want) && *actual == hex32(&hash(b"wrong"))),
            "{err}"
        );
        assert!(!store.has(&want));
        assert_eq!(store.get(&want).unwrap(), None);
        let big = vec![0; CHUNK_SIZE as usize + 1];
        assert!(matches!(
            store.put(&hash(&big), &big),
            Err(PatchError::ChunkTooLarge(n)) if n == CHUNK_SIZE as usize + 1
        ));
        assert!(files_in(&store.dir).is_empty());
    }

    #[test]
    fn a_chunk_is_stored_once_under_its_hash_and_read_back() {
        let (_d, store) = store();
        let h = hash(b"shared");
        store.put(&h, b"shared").unwrap();
        store.put(&h, b"shared").unwrap();
        assert!(store.has(&h));
        assert_eq!(store.get(&h).unwrap().as_deref(), Some(&b"shared"[..]));
        assert_eq!(files_in(&store.dir), [hex32(&h)]);
    }

    #[test]
    fn two_artifacts_sharing_chunks_store_them_once() {
        let (_d, store) = store();
        let common = vec![5u8; MIB];
        let mut a = common.clone();
        a.extend(b"tail a");
        let mut b = common;
        b.extend(b"tail b");
        for bytes in [&a, &b] {
            let r = ArtifactRef::read("x", &bytes[..]).unwrap();
            store.put(&r.chunks[0], &bytes[..MIB]).unwrap();
            store.put(&r.chunks[1], &bytes[MIB..]).unwrap();
        }
        assert_eq!(files_in(&store.dir).len(), 3);
    }

    #[test]
    fn a_chunk_damaged_on_disk_is_reported_removed_and_missing() {
        let (_d, store) = store();
        let (_, a) = stored(&store, 2 * MIB + 10, 3);
        assert!(store.missing(&a).is_empty());
        let path = store.path_of(&a.chunks[1]);
        let mut bytes = fs::read(&path).unwrap();
        bytes[100] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let err = store.get(&a.chunks[1]).unwrap_err();
        assert!(
            matches!(&err, PatchError::CorruptChunk(p) if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("fetch it again"), "{err}");
        assert!(!path.exists());
        assert_eq!(store.get(&a.chunks[1]).unwrap(), None);
        assert_eq!(store.missing(&a), [1]);
        // Damage found by `missing` itself.
        fs::write(store.path_of(&a.chunks[2]), b"garbage").unwrap();
        assert_eq!(store.missing(&a), [1, 2]);
        assert!(!store.has(&a.chunks[2]));
        assert_eq!(store.check(&a).unwrap(), [1, 2]);
    }

    #[test]
    fn a_manifest_whose_whole_hash_or_size_contradicts_its_chunks_fails_the_check() {
        let (_d, store) = store();
        let (_, a) = stored(&store, 2 * MIB + 10, 5);
        assert_eq!(store.check(&a).unwrap(), Vec::<u32>::new());
        let mut wrong_hash = a.clone();
        wrong_hash.blake3[0] ^= 1;
        let mut wrong_size = a.clone();
        wrong_size.size -= 1;
        // The chunks of another artifact, in the same order and sizes.
        let (_, other) = stored(&store, 2 * MIB + 10, 6);
        let mut swapped = a.clone();
        swapped.chunks = other.chunks.clone();
        for bad in [&wrong_hash, &wrong_size, &swapped] {
            let err = store.check(bad).unwrap_err();
            assert!(
                matches!(&err, PatchError::ArtifactMismatch { artifact } if artifact == "pkg.deb"),
                "{err}"
            );
            assert!(err.to_string().contains("sign the patch again"), "{err}");
        }
        // Missing chunks are reported before anything is hashed as a whole.
        fs::remove_file(store.path_of(&a.chunks[0])).unwrap();
        assert_eq!(store.check(&wrong_hash).unwrap(), [0]);
    }

    // -- partial artifact ----------------------------------------------------

    /// An artifact of `len` bytes, no two chunks alike, and its chunks.
    fn chunked(len: usize, seed: u8) -> (Vec<u8>, ArtifactRef, Vec<HashedChunk>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ seed).collect();
        let a = ArtifactRef::read("pkg.deb", &bytes[..]).unwrap();
        let chunks = bytes
            .chunks(CHUNK_SIZE as usize)
            .map(|c| HashedChunk::new(c.to_vec()))
            .collect();
        (bytes, a, chunks)
    }

    #[test]
    fn chunks_written_in_any_order_become_the_artifact_once_all_are_in() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, a, chunks) = chunked(3 * MIB + 5, 7);
        let dest = d.path().join("out/pkg.deb");
        fs::create_dir_all(d.path().join("out")).unwrap();
        fs::write(&dest, b"old").unwrap();
        let (p, held) = PartialArtifact::open(&a, &dest).unwrap();
        assert!(held.is_empty());
        for i in [2, 0, 3] {
            p.write(i, &chunks[i as usize]).unwrap();
        }
        assert_eq!(*p.lock(), [true, false, true, true]);
        p.write(1, &chunks[1]).unwrap();
        p.finish().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), bytes);
        assert_eq!(files_in(&d.path().join("out")), ["pkg.deb"]);
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // An empty artifact has no chunks and becomes an empty file.
        let empty = ArtifactRef::read("empty", &b""[..]).unwrap();
        let dest = d.path().join("out/empty");
        let (p, held) = PartialArtifact::open(&empty, &dest).unwrap();
        assert!(held.is_empty());
        p.finish().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"");
    }

    #[test]
    fn a_partial_file_resumes_with_its_intact_chunks_and_refetches_damaged_ones() {
        let d = tempfile::tempdir().unwrap();
        let (bytes, a, chunks) = chunked(3 * MIB + 5, 9);
        let dest = d.path().join("pkg.deb");
        let (p, _) = PartialArtifact::open(&a, &dest).unwrap();
        for i in [0, 1, 3] {
            p.write(i, &chunks[i as usize]).unwrap();
        }
        drop(p);
        // Damage chunk 1 on disk, as a power loss might.
        let path = PartialArtifact::path_for(&dest);
        let mut on_disk = fs::read(&path).unwrap();
        on_disk[MIB + 7] ^= 1;
        fs::write(&path, &on_disk).unwrap();
        let (p, held) = PartialArtifact::open(&a, &dest).unwrap();
        assert_eq!(held, [0, 3]);
        let err = PartialArtifact::open(&a, &dest)
            .unwrap()
            .0
            .finish()
            .unwrap_err();
        assert!(
            matches!(&err, PatchError::ChunkMissing { artifact, chunk: 1 } if artifact == "pkg.deb"),
            "{err}"
        );
        assert!(!dest.exists());
        p.write(1, &chunks[1]).unwrap();
        p.write(2, &chunks[2]).unwrap();
        p.finish().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), bytes);
        assert!(!path.exists());
    }

    /// `chunk` copied into memory that starts `past` bytes after a
    /// [`DIRECT_ALIGN`] boundary: at 0 as a download reads it, anywhere
    /// else to keep it from going direct (a chunk's own allocation is
    /// aligned by chance now and then).
    fn placed(chunk: &HashedChunk, past: usize) -> HashedChunk {
        let len = chunk.bytes().len();
        let mut buf = vec![0u8; len + DIRECT_ALIGN + past];
        let pad = (DIRECT_ALIGN - buf.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN + past;
        buf[pad..pad + len].copy_from_slice(chunk.bytes());
        let c = HashedChunk::new(bytes::Bytes::from(buf).slice(pad..pad + len));
        assert_eq!(c.bytes().as_ptr() as usize % DIRECT_ALIGN, past);
        c
    }

    #[test]
    fn chunks_in_aligned_memory_go_to_the_disk_directly_and_resume_the_same() {
        let d = tempfile::tempdir().unwrap();
        let direct = direct_io_in(d.path());
        let (bytes, a, chunks) = chunked(3 * MIB + 5, 13);
        let dest = d.path().join("pkg.deb");
        let (p, _) = PartialArtifact::open(&a, &dest).unwrap();
        // Chunk 0 aligned; chunk 1 not (it goes through the page cache);
        // the last one aligned in memory but shorter than a block.
        p.write(0, &placed(&chunks[0], 0)).unwrap();
        p.write(1, &placed(&chunks[1], 1)).unwrap();
        p.write(3, &placed(&chunks[3], 0)).unwrap();
        assert_eq!(p.direct_writes(), u32::from(direct));
        drop(p);
        // What went around the page cache reads back intact.
        let (p, held) = PartialArtifact::open(&a, &dest).unwrap();
        assert_eq!(held, [0, 1, 3]);
        p.write(2, &placed(&chunks[2], 0)).unwrap();
        assert_eq!(p.direct_writes(), u32::from(direct));
        p.finish().unwrap();
        assert_eq!(fs::read(&dest).unwrap(), bytes);
    }

    #[test]
    fn a_chunk_that_is_not_the_manifests_is_not_written() {
        let d = tempfile::tempdir().unwrap();
        let (_, a, chunks) = chunked(2 * MIB + 1, 11);
        let (p, _) = PartialArtifact::open(&a, &d.path().join("pkg.deb")).unwrap();
        for (i, c) in [(0, &chunks[1]), (2, &chunks[0]), (5, &chunks[0])] {
            let err = p.write(i, c).unwrap_err();
            assert!(
                matches!(err, PatchError::ChunkMismatch { .. }),
                "{i}: {err}"
            );
        }
        assert!(p.lock().iter().all(|&w| !w));
    }

    // -- download ------------------------------------------------------------

    /// An artifact of `n` small chunks (sizes do not matter to a download).
    fn artifact(n: u8) -> (ArtifactRef, Vec<Vec<u8>>) {
        let data: Vec<Vec<u8>> = (0..n).map(|i| vec![i; 10]).collect();
        let a = ArtifactRef {
            name: "pkg.deb".into(),
            size: 10 * u64::from(n),
            blake3: [0; 32],
            chunk_size: CHUNK_SIZE,
            chunks: data.iter().map(|d| hash(d)).collect(),
        };
        (a, data)
    }

    #[test]
    fn a_download_resumes_without_asking_for_held_chunks() {
        let (a, data) = artifact(5);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[0, 2, 99], 3);
        assert_eq!(dl.missing(), 3);
        assert_eq!(dl.next_requests(t0, 16), [1, 3, 4]);
        assert_eq!(dl.next_requests(t0, 16), Vec::<u32>::new());
        for i in [1, 3, 4] {
            assert_eq!(
                dl.on_chunk(t0, i, &data[i as usize]),
                ChunkOutcome::Verified
            );
        }
        assert!(dl.done());
        assert_eq!(
            dl.stats(),
            DownloadStats {
                requested: 3,
                fetched: 3,
                refetched: 0,
                bytes: 30,
                failures: 0
            }
        );
        assert!(dl.next_requests(t0, 16).is_empty());
        assert_eq!(dl.poll_timeout(), None);
    }

    #[test]
    fn requests_go_lowest_first_and_never_exceed_the_in_flight_limit() {
        let (a, data) = artifact(5);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[], 3);
        assert_eq!(dl.next_requests(t0, 2), [0, 1]);
        assert!(dl.next_requests(t0, 2).is_empty());
        assert_eq!(dl.on_chunk(t0, 1, &data[1]), ChunkOutcome::Verified);
        assert_eq!(dl.next_requests(t0, 2), [2]);
        // Already verified, or not a chunk of this artifact.
        assert_eq!(dl.on_chunk(t0, 1, &data[1]), ChunkOutcome::Ignored);
        assert_eq!(dl.on_chunk(t0, 9, &data[1]), ChunkOutcome::Ignored);
        assert_eq!(dl.next_requests(t0, 2), Vec::<u32>::new());
    }

    #[test]
    fn a_corrupt_chunk_is_asked_for_again_exactly_once_then_verified() {
        let (a, data) = artifact(3);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[0, 2], 3);
        assert_eq!(dl.next_requests(t0, 4), [1]);
        assert_eq!(dl.on_chunk(t0, 1, b"damaged!!!"), ChunkOutcome::Corrupt);
        assert_eq!(dl.next_requests(t0, 4), [1]);
        assert!(dl.next_requests(t0, 4).is_empty());
        assert_eq!(dl.on_chunk(t0, 1, &data[1]), ChunkOutcome::Verified);
        assert!(dl.done());
        let stats = dl.stats();
        assert_eq!(
            (stats.requested, stats.fetched, stats.refetched, stats.bytes),
            (2, 1, 1, 20)
        );
        assert!(dl.error().is_none());
    }

    #[test]
    fn a_chunk_hashed_off_the_download_is_judged_by_its_hash_alone() {
        let (a, data) = artifact(2);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[], 3);
        assert_eq!(dl.next_requests(t0, 2), [0, 1]);
        let good = HashedChunk::new(data[0].clone());
        assert_eq!(dl.on_hashed(t0, 0, &good), ChunkOutcome::Verified);
        let bad = HashedChunk::new(b"not chunk 1".to_vec());
        assert_eq!(dl.on_hashed(t0, 1, &bad), ChunkOutcome::Corrupt);
        assert_eq!(dl.next_requests(t0, 2), [1]);
        assert_eq!(
            dl.on_hashed(t0, 1, &HashedChunk::new(data[1].clone())),
            ChunkOutcome::Verified
        );
        assert!(dl.done());
        let stats = dl.stats();
        assert_eq!(
            (stats.fetched, stats.refetched, stats.bytes),
            (2, 1, 20 + 11)
        );
    }

    #[test]
    fn the_retry_delay_doubles_from_one_second_and_stops_at_thirty() {
        let secs: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn a_failed_chunk_waits_out_its_backoff_before_it_is_asked_for_again() {
        let (a, _) = artifact(2);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[1], 10);
        let mut now = t0;
        for want in [1, 2, 4, 8, 16, 30, 30] {
            assert_eq!(dl.next_requests(now, 1), [0]);
            dl.on_failure(now, 0, "timed out");
            let retry = now + Duration::from_secs(want);
            assert_eq!(dl.poll_timeout(), Some(retry));
            assert!(
                dl.next_requests(retry - Duration::from_millis(1), 1)
                    .is_empty()
            );
            now = retry;
        }
        assert_eq!(dl.stats().failures, 7);
    }

    #[test]
    fn a_chunk_failing_max_attempts_times_ends_the_download_naming_it() {
        let (a, data) = artifact(3);
        let mut now = Instant::now();
        let mut dl = Download::new(&a, &[], 3);
        assert_eq!(dl.next_requests(now, 3), [0, 1, 2]);
        assert_eq!(dl.on_chunk(now, 0, &data[0]), ChunkOutcome::Verified);
        assert_eq!(dl.on_chunk(now, 1, &data[1]), ChunkOutcome::Verified);
        dl.on_failure(now, 2, "connection lost");
        now += retry_delay(1);
        assert_eq!(dl.next_requests(now, 3), [2]);
        assert_eq!(dl.on_chunk(now, 2, b"bad"), ChunkOutcome::Corrupt);
        assert!(dl.error().is_none());
        assert_eq!(dl.next_requests(now, 3), [2]);
        dl.on_failure(now, 2, "timed out after 10s");
        let err = dl.error().unwrap();
        assert!(
            matches!(&err, PatchError::TransferFailed { artifact, chunk: 2, attempts: 3, last_reason }
                if artifact == "pkg.deb" && last_reason == "timed out after 10s"),
            "{err}"
        );
        assert!(err.to_string().contains("chunk 2 failed 3 times"), "{err}");
        assert!(!dl.done());
        assert!(dl.next_requests(now + RETRY_MAX, 3).is_empty());
        assert_eq!(dl.poll_timeout(), None);
        assert_eq!(dl.on_chunk(now, 2, &data[2]), ChunkOutcome::Ignored);
    }

    #[test]
    fn a_failure_of_a_chunk_not_in_flight_changes_nothing() {
        let (a, _) = artifact(2);
        let t0 = Instant::now();
        let mut dl = Download::new(&a, &[1], 1);
        dl.on_failure(t0, 0, "stale");
        dl.on_failure(t0, 1, "stale");
        dl.on_failure(t0, 7, "stale");
        assert!(dl.error().is_none());
        assert_eq!(dl.stats().failures, 0);
        assert_eq!(dl.next_requests(t0, 1), [0]);
    }
}
