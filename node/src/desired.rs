//! The fleet's desired configuration as files: a directory of TOML
//! manifests, resolved into the [`ManagedState`] of one node (its files and
//! its remediation runbooks), and the plan of what a new version changes.
//!
//! Everything here is pure except [`Fleet::load`], which reads the
//! directory once; the loaded [`Fleet`] holds every file's bytes, so it can
//! be signed, shipped and resolved anywhere.
//!
//! # The fleet directory
//! Every `*.toml` file under the directory (recursively, hidden entries such
//! as `.git` skipped, symlinked directories not followed) is a manifest, in
//! order of relative path, except a `.toml` file that some manifest names as
//! a file's `source`: that one is content. A manifest holds `[[vars]]`
//! (`selector`, `values`), `[[file]]` (`path`, `content` or `source`,
//! `mode`, `reload`, `selector`, `template`) and `[[runbook]]`. An omitted
//! selector is `"all"`. Unknown keys are refused, naming the manifest, line
//! and column.
//!
//! A `[[runbook]]` is a remediation rule ([`Runbook`], see
//! [`crate::runbook`]) and the nodes it is for: `selector`, and the rule's
//! own fields with the rule's defaults: `name` and `check` and `run`
//! (required), `when` (`"critical"`), `after` (`"1m"`), `timeout`
//! (`"1m"`), `verify` (`"2m"`), `max_per_site` (1), `min_interval`
//! (`"10m"`), `breaker_failures` (3), `breaker_window` (`"1h"`) and
//! `dry_run` (false); durations are written like `"90s"` or `"5m"`. A
//! runbook with any of [`Runbook::problems`] is refused when loading,
//! naming the manifest and `runbook[N] NAME`.
//!
//! # Selectors and precedence
//! A selector is `"all"` or a table of `region`, `site` (needs `region`) and
//! `labels`; a node matches when each given field equals its own. For each
//! file path, each runbook name, and each var name on its own, the matching
//! definition of the highest [`Specificity`] wins:
//!
//! | specificity | selector |
//! |---|---|
//! | 0 `all` | `"all"` |
//! | 1 `region` | `{ region }` |
//! | 2 `site` | `{ region, site }` |
//! | 3 `labels` | `{ labels }` |
//! | 4 `region+labels` | `{ region, labels }` |
//! | 5 `site+labels` | `{ region, site, labels }` |
//!
//! The number of labels does not count. Two matching definitions of the same
//! path, runbook or var at the winning specificity are a conflict, an error
//! for that node; ties below the winner are shadowed and harmless. The
//! winning runbooks are the node's [`ManagedState::runbooks`], by name.
//!
//! # Templates
//! Unless `template = false`, a file's content is a template: `{{name}}` is
//! the node's var `name`, and `{{node.name}}`, `{{node.region}}`,
//! `{{node.site}}`, `{{label.KEY}}`, `{{fact.KEY}}` its own fields, labels
//! and reported facts; spaces inside the braces are allowed. `{{"text"}}`
//! writes `text` as is, so a literal `{{` is written `{{"{{"}}`. A name the
//! node does not have is an error. Var values are not templates themselves.
//!
//! Runbooks are not templates: every field is used as written (a `{{` in
//! `run` is two braces), the same for every node the rule applies to.
//!
//! # Limits
//! One file may hold at most [`MAX_FILE_BYTES`] (before and after
//! rendering), the whole fleet at most [`MAX_FLEET_BYTES`] of file content.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::managed::{ManagedFile, ManagedState};
use crate::runbook::Runbook;

/// Largest content of one managed file, in bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Largest total content of all the files a fleet defines, in bytes.
pub const MAX_FLEET_BYTES: u64 = 2 << 20;

/// The mode of a file that does not give one.
pub const DEFAULT_MODE: u32 = 0o644;

/// What a node is, as far as choosing and rendering its configuration goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFacts {
    pub name: String,
    pub region: String,
    pub site: String,
    /// Labels the node was given (for instance `role = "web"`).
    pub labels: BTreeMap<String, String>,
    /// Facts the node reports about itself (hostname, os, …).
    pub facts: BTreeMap<String, String>,
}

/// Which nodes a definition applies to. Empty fields do not constrain.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Selector {
    pub region: Option<String>,
    /// Only with `region`: site names are unique within a region.
    pub site: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// How specific a selector is; a more specific matching definition wins.
/// The order of the variants is the precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Specificity {
    All,
    Region,
    Site,
    Labels,
    RegionLabels,
    SiteLabels,
}

impl fmt::Display for Specificity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Specificity::All => "all",
            Specificity::Region => "region",
            Specificity::Site => "site",
            Specificity::Labels => "labels",
            Specificity::RegionLabels => "region+labels",
            Specificity::SiteLabels => "site+labels",
        })
    }
}

impl Selector {
    /// The selector every node matches.
    pub fn all() -> Self {
        Selector::default()
    }

    pub fn specificity(&self) -> Specificity {
        let labels = !self.labels.is_empty();
        match (self.region.is_some(), self.site.is_some(), labels) {
            (false, false, false) => Specificity::All,
            (true, false, false) => Specificity::Region,
            (_, true, false) => Specificity::Site,
            (false, false, true) => Specificity::Labels,
            (true, false, true) => Specificity::RegionLabels,
            (_, true, true) => Specificity::SiteLabels,
        }
    }

    pub fn matches(&self, node: &NodeFacts) -> bool {
        self.region.as_ref().is_none_or(|r| *r == node.region)
            && self.site.as_ref().is_none_or(|s| *s == node.site)
            && self
                .labels
                .iter()
                .all(|(k, v)| node.labels.get(k) == Some(v))
    }

    /// Checks what [`Fleet::load`] requires of every selector.
    pub(crate) fn check(&self) -> Result<(), Problem> {
        if self.site.is_some() && self.region.is_none() {
            return Err(Problem::SiteWithoutRegion);
        }
        for value in [&self.region, &self.site].into_iter().flatten() {
            if value.is_empty() {
                return Err(Problem::EmptySelectorValue);
            }
        }
        if self.labels.keys().any(|k| k.is_empty()) {
            return Err(Problem::EmptySelectorValue);
        }
        Ok(())
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(r) = &self.region {
            parts.push(format!("region={r}"));
        }
        if let Some(s) = &self.site {
            parts.push(format!("site={s}"));
        }
        for (k, v) in &self.labels {
            parts.push(format!("label:{k}={v}"));
        }
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// Vars for the nodes a selector matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VarSet {
    pub selector: Selector,
    pub values: BTreeMap<String, String>,
}

/// One managed file as a manifest defines it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute, normalised path on the node.
    pub path: String,
    /// The content (a template unless `template` is false); a `source` file
    /// is read into it when the fleet is loaded.
    pub content: Vec<u8>,
    /// Where the content came from, relative to the fleet directory, if
    /// not inline; kept for messages.
    pub source: Option<String>,
    pub mode: u32,
    pub reload: Vec<String>,
    pub selector: Selector,
    pub template: bool,
}

/// One manifest: its path relative to the fleet directory and what it
/// defines, in file order. Its runbooks are kept apart, in
/// [`Fleet::runbooks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub vars: Vec<VarSet>,
    pub files: Vec<FileSpec>,
}

/// One remediation rule as a manifest defines it: the rule and the nodes
/// it is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunbookSpec {
    pub selector: Selector,
    pub runbook: Runbook,
}

/// The `[[runbook]]`s of one manifest, in file order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRunbooks {
    /// The manifest's name, as in [`Manifest::name`].
    pub manifest: String,
    pub runbooks: Vec<RunbookSpec>,
}

/// The whole fleet's desired configuration, every file's bytes included.
///
/// It encodes as its manifests, then its runbooks only if there are any, so
/// a fleet without runbooks encodes exactly as fleets did before runbooks
/// existed (postcard: the manifests alone; JSON: no `runbooks` key).
/// Bundles signed before still decode, and members that predate runbooks
/// still read bundles that define none; a bundle that defines some, they
/// refuse (its bytes go on after the fleet they know). In postcard the
/// runbooks are read only when bytes follow the manifests, so a `Fleet`
/// must be the last thing in an encoding, as it is in a bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Fleet {
    manifests: Vec<Manifest>,
    /// Only manifests that define runbooks, in manifest order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    runbooks: Vec<ManifestRunbooks>,
}

impl<'de> Deserialize<'de> for Fleet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            #[derive(Deserialize)]
            struct Named {
                manifests: Vec<Manifest>,
                #[serde(default)]
                runbooks: Vec<ManifestRunbooks>,
            }
            let n = Named::deserialize(d)?;
            return Ok(Fleet {
                manifests: n.manifests,
                runbooks: n.runbooks,
            });
        }

        struct Compact;
        impl<'de> serde::de::Visitor<'de> for Compact {
            type Value = Fleet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a fleet: its manifests, then its runbooks if any")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Fleet, A::Error> {
                let manifests = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                let runbooks = seq.next_element_seed(Trailing)?.unwrap_or_default();
                Ok(Fleet {
                    manifests,
                    runbooks,
                })
            }
        }

        /// The runbooks after the manifests; none if the encoding ends
        /// before their count (a fleet encoded before runbooks existed).
        /// Once the count is read, anything wrong is an error, and so is a
        /// count of 0 (no runbooks are encoded as nothing, so that one
        /// fleet has one encoding and a byte after a bundle stays an error).
        struct Trailing;
        impl<'de> serde::de::DeserializeSeed<'de> for Trailing {
            type Value = Vec<ManifestRunbooks>;
            fn deserialize<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                let mut counted = false;
                match d.deserialize_seq(List {
                    counted: &mut counted,
                }) {
                    Ok(list) => Ok(list),
                    Err(_) if !counted => Ok(Vec::new()),
                    Err(e) => Err(e),
                }
            }
        }

        struct List<'a> {
            counted: &'a mut bool,
        }
        impl<'de> serde::de::Visitor<'de> for List<'_> {
            type Value = Vec<ManifestRunbooks>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the runbooks of each manifest")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                *self.counted = true;
                let mut out = Vec::new();
                while let Some(group) = seq.next_element()? {
                    out.push(group);
                }
                if out.is_empty() {
                    return Err(serde::de::Error::custom(
                        "a fleet without runbooks ends after its manifests",
                    ));
                }
                Ok(out)
            }
        }

        d.deserialize_struct("Fleet", &["manifests", "runbooks"], Compact)
    }
}

/// What is wrong with one definition in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The path is relative, not normalised, or the root.
    #[error(
        "path {0:?} must be absolute and normalised, like /etc/app/app.conf \
         (no `.`, `..`, `//` or trailing /)"
    )]
    BadPath(String),
    /// The mode is not an octal string up to `7777`.
    #[error("mode {0:?} is not an octal file mode like \"0644\"")]
    BadMode(String),
    /// Both `content` and `source` were given.
    #[error("give either content or source, not both")]
    ContentAndSource,
    /// Neither `content` nor `source` was given.
    #[error("give the file's content, or a source file in the fleet directory")]
    NoContent,
    /// The source is absolute, uses `..`, or resolves (through a symlink)
    /// outside the fleet directory.
    #[error("source {0} is outside the fleet directory; give a relative path inside it")]
    SourceOutside(String),
    /// The source file is not there.
    #[error("source {0} does not exist")]
    SourceMissing(String),
    /// The source is a directory or something else that is not a file.
    #[error("source {0} is not a regular file")]
    SourceNotFile(String),
    /// A template's content is not UTF-8.
    #[error("source {0} is not UTF-8 text; set template = false to copy it byte for byte")]
    NotText(String),
    /// A template does not parse.
    #[error("{0}")]
    Template(TemplateError),
    /// A selector names a site but no region.
    #[error("a selector with a site needs its region too: {{ region = \"…\", site = \"…\" }}")]
    SiteWithoutRegion,
    /// A selector field or label key is empty.
    #[error("a selector's region, site and label keys must not be empty")]
    EmptySelectorValue,
    /// A var name that templates could not refer to.
    #[error("var name {0:?}: use letters, digits, '_' and '-'")]
    BadVarName(String),
    /// A reload command is empty.
    #[error("reload command {0} is empty")]
    EmptyReload(usize),
    /// The file's content is over [`MAX_FILE_BYTES`].
    #[error("{0} bytes of content is over the limit of {MAX_FILE_BYTES} bytes for one file")]
    TooLarge(u64),
    /// A runbook's [`Runbook::problems`], without the runbook's name in
    /// front (the item names it).
    #[error("{}", .0.join("; "))]
    Runbook(Vec<String>),
}

/// Why a template does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without its `}}` (or a `"text"` without its closing quote).
    #[error(
        "template line {line}: `{{{{` is not closed by `}}}}` (write a literal {{{{ as {{{{\"{{{{\"}}}})"
    )]
    Unclosed { line: usize },
    /// The content is not UTF-8 text, so it cannot be a template.
    #[error("the content is not UTF-8 text; set template = false to copy it byte for byte")]
    NotText,
    /// What is between the braces is not a name.
    #[error(
        "template line {line}: {{{{{name}}}}} is not a name: use a var name, node.name, \
         node.region, node.site, label.KEY, fact.KEY, or \"text\" for literal text"
    )]
    BadName { line: usize, name: String },
}

/// Why a fleet directory could not be loaded. Nothing is loaded then.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A file or directory could not be read.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A manifest's name is not UTF-8, so it cannot be named in a bundle.
    #[error("{0}: manifest names must be UTF-8; rename it")]
    BadName(PathBuf),
    /// A manifest is not valid TOML or has unknown or mistyped fields.
    #[error("{manifest}: line {line}, column {column}: {message}")]
    Parse {
        manifest: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A definition in a manifest is wrong.
    #[error("{manifest}: {item}: {problem}")]
    Invalid {
        manifest: PathBuf,
        /// `file[N] PATH`, `runbook[N] NAME` or `vars[N]`, counting from 0
        /// in file order, each kind on its own.
        item: String,
        problem: Problem,
    },
    /// The files together are over [`MAX_FLEET_BYTES`].
    #[error(
        "the fleet's files hold more than {MAX_FLEET_BYTES} bytes together; \
         ship large artifacts another way"
    )]
    TooLarge,
}

/// Where a winning or conflicting definition comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub manifest: String,
    /// `file[N]`, `runbook[N]` or `vars[N]`.
    pub item: String,
    pub selector: Selector,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} ({})", self.manifest, self.item, self.selector)
    }
}

/// Why a fleet could not be resolved for one node. Nothing is resolved for
/// that node then; other nodes are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Two definitions of the same file path, runbook or var match the node
    /// with the same specificity, and none more specific does.
    #[error(
        "{what} {name} is defined twice for this node with the same precedence ({specificity}): \
         by {first} and by {second}; make one selector more specific or remove one"
    )]
    Conflict {
        /// `file`, `runbook` or `var`.
        what: &'static str,
        name: String,
        specificity: Specificity,
        first: Box<Origin>,
        second: Box<Origin>,
    },
    /// A template names something this node does not have.
    #[error(
        "{origin}: {path}: {{{{{name}}}}} is not defined for this node \
         (vars come from [[vars]] whose selector matches it; labels and facts from the node)"
    )]
    UnknownName {
        origin: Box<Origin>,
        path: String,
        name: String,
    },
    /// A template does not parse (only in a fleet that was not loaded or
    /// checked by [`Fleet::validate`]).
    #[error("{origin}: {path}: {error}")]
    Template {
        origin: Box<Origin>,
        path: String,
        error: TemplateError,
    },
    /// The rendered file is over [`MAX_FILE_BYTES`].
    #[error("{origin}: {path}: rendered for this node it exceeds {MAX_FILE_BYTES} bytes")]
    TooLarge { origin: Box<Origin>, path: String },
}

// ---------------------------------------------------------------------------
// Templates

#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
    NodeName,
    NodeRegion,
    NodeSite,
    Label(&'a str),
    Fact(&'a str),
}

fn is_var_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn is_key(key: &str) -> bool {
    !key.is_empty()
        && !key
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '{' | '}' | '"'))
}

fn parse_template(src: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let line_at = |offset: usize| src[..offset].matches('\n').count() + 1;
    let mut pieces = Vec::new();
    let mut pos = 0;
    while let Some(found) = src[pos..].find("{{") {
        let open = pos + found;
        if open > pos {
            pieces.push(Piece::Text(&src[pos..open]));
        }
        let unclosed = || TemplateError::Unclosed {
            line: line_at(open),
        };
        let inner_start = open + 2;
        let after = &src[inner_start..];
        let trimmed = after.trim_start_matches([' ', '\t']);
        if let Some(lit) = trimmed.strip_prefix('"') {
            let end = lit.find('"').ok_or_else(unclosed)?;
            pieces.push(Piece::Text(&lit[..end]));
            let rest = lit[end + 1..].trim_start_matches([' ', '\t']);
            let rest = rest.strip_prefix("}}").ok_or_else(unclosed)?;
            pos = src.len() - rest.len();
            continue;
        }
        let close = after.find("}}").ok_or_else(unclosed)?;
        let name = after[..close].trim_matches([' ', '\t']);
        let piece = match name {
            "node.name" => Piece::NodeName,
            "node.region" => Piece::NodeRegion,
            "node.site" => Piece::NodeSite,
            _ => match name.split_once('.') {
                Some(("label", key)) if is_key(key) => Piece::Label(key),
                Some(("fact", key)) if is_key(key) => Piece::Fact(key),
                None if is_var_name(name) => Piece::Var(name),
                _ => {
                    return Err(TemplateError::BadName {
                        line: line_at(open),
                        name: name.to_owned(),
                    });
                }
            },
        };
        pieces.push(piece);
        pos = inner_start + close + 2;
    }
    if pos < src.len() {
        pieces.push(Piece::Text(&src[pos..]));
    }
    Ok(pieces)
}

/// Why rendering stopped: a name the node lacks, or too much output.
enum RenderError {
    Unknown(String),
    TooLarge,
}

fn render(
    pieces: &[Piece<'_>],
    vars: &BTreeMap<&str, &str>,
    node: &NodeFacts,
) -> Result<Vec<u8>, RenderError> {
    let mut out = String::new();
    for piece in pieces {
        let unknown = |name: String| RenderError::Unknown(name);
        let text = match piece {
            Piece::Text(t) => t,
            Piece::Var(v) => vars.get(v).ok_or_else(|| unknown((*v).to_owned()))?,
            Piece::NodeName => node.name.as_str(),
            Piece::NodeRegion => node.region.as_str(),
            Piece::NodeSite => node.site.as_str(),
            Piece::Label(k) => node
                .labels
                .get(*k)
                .ok_or_else(|| unknown(format!("label.{k}")))?,
            Piece::Fact(k) => node
                .facts
                .get(*k)
                .ok_or_else(|| unknown(format!("fact.{k}")))?,
        };
        if (out.len() + text.len()) as u64 > MAX_FILE_BYTES {
            return Err(RenderError::TooLarge);
        }
        out.push_str(text);
    }
    Ok(out.into_bytes())
}

// ---------------------------------------------------------------------------
// Manifests as written

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestToml {
    #[serde(default)]
    vars: Vec<VarsToml>,
    #[serde(default)]
    file: Vec<FileToml>,
    #[serde(default)]
    runbook: Vec<RunbookToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VarsToml {
    #[serde(default)]
    selector: SelectorToml,
    values: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileToml {
    path: String,
    content: Option<String>,
    source: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    reload: Vec<String>,
    #[serde(default)]
    selector: SelectorToml,
    #[serde(default = "yes")]
    template: bool,
}

fn yes() -> bool {
    true
}

/// A `[[runbook]]` as written: `selector`, and the rest read as a
/// [`Runbook`] is, with its defaults and its refusal of unknown keys (so
/// the two cannot drift apart). TOML errors keep pointing at the key or
/// value at fault.
struct RunbookToml {
    selector: SelectorToml,
    runbook: Runbook,
}

impl<'de> Deserialize<'de> for RunbookToml {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RunbookToml;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a runbook table")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RunbookToml, A::Error> {
                let mut selector = None;
                let runbook = Runbook::deserialize(serde::de::value::MapAccessDeserializer::new(
                    WithoutSelector {
                        map,
                        selector: &mut selector,
                    },
                ))?;
                Ok(RunbookToml {
                    selector: selector.unwrap_or_default(),
                    runbook,
                })
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A runbook table's keys and values without `selector`, which it keeps.
struct WithoutSelector<'a, A> {
    map: A,
    selector: &'a mut Option<SelectorToml>,
}

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for WithoutSelector<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = seed;
        loop {
            match self.map.next_key_seed(KeyOrSelector(seed))? {
                None => return Ok(None),
                Some(Ok(key)) => return Ok(Some(key)),
                Some(Err(unused)) => {
                    if self.selector.is_some() {
                        return Err(serde::de::Error::duplicate_field("selector"));
                    }
                    *self.selector = Some(self.map.next_value()?);
                    seed = unused;
                }
            }
        }
    }

    fn next_value_seed<V: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A runbook table's key: `selector` (and the seed back, unused), or the
/// runbook's own.
struct KeyOrSelector<K>(K);

impl<'de, K: serde::de::DeserializeSeed<'de>> serde::de::DeserializeSeed<'de> for KeyOrSelector<K> {
    type Value = Result<K::Value, K>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let key = String::deserialize(d)?;
        if key == "selector" {
            return Ok(Err(self.0));
        }
        // A runbook's field name only fails to read when it is unknown.
        self.0
            .deserialize(serde::de::value::StringDeserializer::<D::Error>::new(key))
            .map(Ok)
            .map_err(|e| {
                serde::de::Error::custom(format!("{} or `selector`", e.to_string().trim_end()))
            })
    }
}

/// `"all"` or `{ region, site, labels }`, as written in any TOML file that
/// selects nodes.
#[derive(Default)]
pub(crate) struct SelectorToml(pub(crate) Selector);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectorTable {
    region: Option<String>,
    site: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for SelectorToml {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SelectorToml;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#""all" or a table like { region = "eu", labels = { role = "web" } }"#)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SelectorToml, E> {
                if v == "all" {
                    Ok(SelectorToml(Selector::all()))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SelectorToml, A::Error> {
                let t =
                    SelectorTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                if t.region.is_none() && t.site.is_none() && t.labels.is_empty() {
                    return Err(serde::de::Error::custom(
                        "an empty selector table; write selector = \"all\" for every node",
                    ));
                }
                Ok(SelectorToml(Selector {
                    region: t.region,
                    site: t.site,
                    labels: t.labels,
                }))
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn parse_mode(s: &str) -> Result<u32, Problem> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let ok = !digits.is_empty()
        && digits.len() <= 4
        && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
    if !ok {
        return Err(Problem::BadMode(s.to_owned()));
    }
    u32::from_str_radix(digits, 8).map_err(|_| Problem::BadMode(s.to_owned()))
}

fn check_path(path: &str) -> Result<(), Problem> {
    let bad = || Problem::BadPath(path.to_owned());
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    if rest.is_empty() || path.contains('\0') {
        return Err(bad());
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad());
    }
    Ok(())
}

/// A source's path relative to the fleet directory, `/`-separated, or
/// `None` if it is absolute or climbs out with `..`.
pub(crate) fn normalise_source(source: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in Path::new(source).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads at most `limit + 1` bytes, so that an oversized file is noticed
/// without reading all of it.
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, std::io::Error> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Every `*.toml` under `root`, as `/`-separated relative paths, sorted.
fn manifest_names(root: &Path) -> Result<Vec<String>, FleetError> {
    let mut names = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let abs = root.join(&rel);
        for entry in std::fs::read_dir(&abs).map_err(io_err(&abs))? {
            let entry = entry.map_err(io_err(&abs))?;
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let child = rel.join(&name);
            let kind = entry.file_type().map_err(io_err(&entry.path()))?;
            let is_file = if kind.is_symlink() {
                // A symlinked directory is not followed (no cycles); a
                // symlinked manifest is read.
                std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file())
            } else if kind.is_dir() {
                dirs.push(child);
                continue;
            } else {
                kind.is_file()
            };
            if is_file && Path::new(&name).extension().is_some_and(|e| e == "toml") {
                let parts: Option<Vec<&str>> =
                    child.components().map(|c| c.as_os_str().to_str()).collect();
                let parts = parts.ok_or_else(|| FleetError::BadName(root.join(&child)))?;
                names.push(parts.join("/"));
            }
        }
    }
    names.sort();
    Ok(names)
}

fn parse_manifest(text: &str, manifest: &Path) -> Result<ManifestToml, FleetError> {
    toml::from_str(text).map_err(|e| {
        let (line, column, message) = toml_error_at(text, &e);
        FleetError::Parse {
            manifest: manifest.to_owned(),
            line,
            column,
            message,
        }
    })
}

/// Where in `text` a TOML error is (line and column from 1) and its
/// message, for errors that point at the place to fix.
pub(crate) fn toml_error_at(text: &str, e: &toml::de::Error) -> (usize, usize, String) {
    let offset = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, column, e.message().trim_end().to_owned())
}

/// Checks one file definition on its own (shared by loading and
/// [`Fleet::validate`]).
fn check_file(f: &FileSpec) -> Result<(), Problem> {
    check_path(&f.path)?;
    if f.mode > 0o7777 {
        return Err(Problem::BadMode(format!("{:o}", f.mode)));
    }
    if let Some(i) = f.reload.iter().position(|r| r.trim().is_empty()) {
        return Err(Problem::EmptyReload(i));
    }
    f.selector.check()?;
    if f.content.len() as u64 > MAX_FILE_BYTES {
        return Err(Problem::TooLarge(f.content.len() as u64));
    }
    if f.template {
        let text = std::str::from_utf8(&f.content)
            .map_err(|_| Problem::NotText(f.source.clone().unwrap_or_else(|| "content".into())))?;
        parse_template(text).map_err(Problem::Template)?;
    }
    Ok(())
}

fn check_vars(v: &VarSet) -> Result<(), Problem> {
    v.selector.check()?;
    match v.values.keys().find(|k| !is_var_name(k)) {
        Some(bad) => Err(Problem::BadVarName(bad.clone())),
        None => Ok(()),
    }
}

/// Checks one runbook definition on its own (shared by loading and
/// [`Fleet::validate`]).
fn check_runbook(r: &RunbookSpec) -> Result<(), Problem> {
    r.selector.check()?;
    let problems = r.runbook.problems();
    if problems.is_empty() {
        return Ok(());
    }
    let named = format!("runbook {}: ", r.runbook.name);
    Err(Problem::Runbook(
        problems
            .into_iter()
            .map(|p| match p.strip_prefix(&named) {
                Some(rest) => rest.to_owned(),
                None => p,
            })
            .collect(),
    ))
}

fn file_item(i: usize, path: &str) -> String {
    format!("file[{i}] {path}")
}

fn runbook_item(i: usize, name: &str) -> String {
    if name.is_empty() {
        format!("runbook[{i}]")
    } else {
        format!("runbook[{i}] {name}")
    }
}

impl Fleet {
    /// Loads every manifest under `dir` and the sources they name.
    pub fn load(dir: &Path) -> Result<Fleet, FleetError> {
        let root = dir.canonicalize().map_err(io_err(dir))?;
        let names = manifest_names(&root)?;
        let mut parsed = Vec::with_capacity(names.len());
        for name in names {
            let shown = dir.join(&name);
            let bytes = read_limited(&root.join(&name), MAX_FLEET_BYTES).map_err(io_err(&shown))?;
            if bytes.len() as u64 > MAX_FLEET_BYTES {
                return Err(FleetError::TooLarge);
            }
            let text = String::from_utf8(bytes).map_err(|_| FleetError::Parse {
                manifest: shown.clone(),
                line: 1,
                column: 1,
                message: "not UTF-8 text".into(),
            });
            let manifest = text.and_then(|t| parse_manifest(&t, &shown));
            parsed.push((name, shown, manifest));
        }
        // A `.toml` file used as some file's content is not a manifest.
        let sources: BTreeSet<String> = parsed
            .iter()
            .filter_map(|(_, _, m)| m.as_ref().ok())
            .flat_map(|m| m.file.iter().filter_map(|f| f.source.as_deref()))
            .filter_map(normalise_source)
            .collect();
        let mut manifests = Vec::new();
        let mut runbooks = Vec::new();
        let mut total = 0u64;
        for (name, shown, manifest) in parsed {
            if sources.contains(&name) {
                continue;
            }
            let m = manifest?;
            let invalid = |item: String, problem: Problem| FleetError::Invalid {
                manifest: shown.clone(),
                item,
                problem,
            };
            let mut vars = Vec::with_capacity(m.vars.len());
            for (i, v) in m.vars.into_iter().enumerate() {
                let set = VarSet {
                    selector: v.selector.0,
                    values: v.values,
                };
                check_vars(&set).map_err(|p| invalid(format!("vars[{i}]"), p))?;
                vars.push(set);
            }
            let mut files = Vec::with_capacity(m.file.len());
            for (i, f) in m.file.into_iter().enumerate() {
                let item = file_item(i, &f.path);
                let spec = load_file(&root, f).map_err(|e| match e {
                    LoadFileError::Problem(p) => invalid(item.clone(), p),
                    LoadFileError::Io(path, source) => FleetError::Io { path, source },
                })?;
                check_file(&spec).map_err(|p| invalid(item, p))?;
                total += spec.content.len() as u64;
                if total > MAX_FLEET_BYTES {
                    return Err(FleetError::TooLarge);
                }
                files.push(spec);
            }
            let mut defined = Vec::with_capacity(m.runbook.len());
            for (i, r) in m.runbook.into_iter().enumerate() {
                let spec = RunbookSpec {
                    selector: r.selector.0,
                    runbook: r.runbook,
                };
                check_runbook(&spec)
                    .map_err(|p| invalid(runbook_item(i, &spec.runbook.name), p))?;
                defined.push(spec);
            }
            if !defined.is_empty() {
                runbooks.push(ManifestRunbooks {
                    manifest: name.clone(),
                    runbooks: defined,
                });
            }
            manifests.push(Manifest { name, vars, files });
        }
        Ok(Fleet {
            manifests,
            runbooks,
        })
    }

    /// A fleet from manifests built in memory (checked as
    /// [`Fleet::validate`] does, and put in name order).
    pub fn from_manifests(manifests: Vec<Manifest>) -> Result<Fleet, FleetError> {
        Fleet::from_parts(manifests, Vec::new())
    }

    /// A fleet from manifests and their runbooks built in memory (checked
    /// as [`Fleet::validate`] does, and put in name order; manifests
    /// without runbooks left out of `runbooks`).
    pub fn from_parts(
        mut manifests: Vec<Manifest>,
        mut runbooks: Vec<ManifestRunbooks>,
    ) -> Result<Fleet, FleetError> {
        manifests.sort_by(|a, b| a.name.cmp(&b.name));
        runbooks.retain(|r| !r.runbooks.is_empty());
        runbooks.sort_by(|a, b| a.manifest.cmp(&b.manifest));
        let fleet = Fleet {
            manifests,
            runbooks,
        };
        fleet.validate()?;
        Ok(fleet)
    }

    /// Checks everything [`Fleet::load`] checks that does not need the
    /// directory: paths, modes, selectors, var names, template syntax,
    /// sizes and runbooks. For a fleet decoded from bytes.
    pub fn validate(&self) -> Result<(), FleetError> {
        let mut total = 0u64;
        for m in &self.manifests {
            let invalid = |item: String, problem: Problem| FleetError::Invalid {
                manifest: PathBuf::from(&m.name),
                item,
                problem,
            };
            for (i, v) in m.vars.iter().enumerate() {
                check_vars(v).map_err(|p| invalid(format!("vars[{i}]"), p))?;
            }
            for (i, f) in m.files.iter().enumerate() {
                check_file(f).map_err(|p| invalid(file_item(i, &f.path), p))?;
                total += f.content.len() as u64;
                if total > MAX_FLEET_BYTES {
                    return Err(FleetError::TooLarge);
                }
            }
        }
        for group in &self.runbooks {
            for (i, r) in group.runbooks.iter().enumerate() {
                check_runbook(r).map_err(|problem| FleetError::Invalid {
                    manifest: PathBuf::from(&group.manifest),
                    item: runbook_item(i, &r.runbook.name),
                    problem,
                })?;
            }
        }
        Ok(())
    }

    pub fn manifests(&self) -> &[Manifest] {
        &self.manifests
    }

    /// The runbooks of the manifests that define any, in manifest order.
    pub fn runbooks(&self) -> &[ManifestRunbooks] {
        &self.runbooks
    }

    /// What `node` must hold, as configuration `version`.
    pub fn resolve(&self, node: &NodeFacts, version: u64) -> Result<ManagedState, ResolveError> {
        let resolved = self.resolve_with_origins(node)?;
        Ok(ManagedState {
            version,
            files: resolved
                .files
                .into_iter()
                .map(|(path, (file, _))| (path, file))
                .collect(),
            runbooks: resolved
                .runbooks
                .into_iter()
                .map(|(name, (runbook, _))| (name, runbook))
                .collect(),
        })
    }

    /// Like [`Fleet::resolve`], with the definition each file and runbook
    /// came from.
    fn resolve_with_origins(&self, node: &NodeFacts) -> Result<Resolved, ResolveError> {
        let var_origin = |(mi, vi): (usize, usize)| {
            Box::new(Origin {
                manifest: self.manifests[mi].name.clone(),
                item: format!("vars[{vi}]"),
                selector: self.manifests[mi].vars[vi].selector.clone(),
            })
        };
        let file_origin = |(mi, fi): (usize, usize)| {
            Box::new(Origin {
                manifest: self.manifests[mi].name.clone(),
                item: format!("file[{fi}]"),
                selector: self.manifests[mi].files[fi].selector.clone(),
            })
        };
        let runbook_origin = |(gi, ri): (usize, usize)| {
            Box::new(Origin {
                manifest: self.runbooks[gi].manifest.clone(),
                item: format!("runbook[{ri}]"),
                selector: self.runbooks[gi].runbooks[ri].selector.clone(),
            })
        };

        // Each var's value and where it is defined (manifest, vars block).
        type Defined<'a> = Winner<(&'a str, (usize, usize))>;
        let mut vars: BTreeMap<&str, Defined<'_>> = BTreeMap::new();
        for (mi, m) in self.manifests.iter().enumerate() {
            for (vi, set) in m.vars.iter().enumerate() {
                if !set.selector.matches(node) {
                    continue;
                }
                let spec = set.selector.specificity();
                for (name, value) in &set.values {
                    offer(&mut vars, name.as_str(), spec, (value.as_str(), (mi, vi)));
                }
            }
        }
        for (name, w) in &vars {
            if let Some((_, tie)) = w.tie {
                return Err(ResolveError::Conflict {
                    what: "var",
                    name: (*name).to_owned(),
                    specificity: w.specificity,
                    first: var_origin(w.value.1),
                    second: var_origin(tie),
                });
            }
        }
        let values: BTreeMap<&str, &str> = vars.iter().map(|(k, w)| (*k, w.value.0)).collect();

        let mut files: BTreeMap<&str, Winner<(usize, usize)>> = BTreeMap::new();
        for (mi, m) in self.manifests.iter().enumerate() {
            for (fi, f) in m.files.iter().enumerate() {
                if f.selector.matches(node) {
                    offer(
                        &mut files,
                        f.path.as_str(),
                        f.selector.specificity(),
                        (mi, fi),
                    );
                }
            }
        }
        for (path, w) in &files {
            if let Some(tie) = w.tie {
                return Err(ResolveError::Conflict {
                    what: "file",
                    name: (*path).to_owned(),
                    specificity: w.specificity,
                    first: file_origin(w.value),
                    second: file_origin(tie),
                });
            }
        }

        let mut runbooks: BTreeMap<&str, Winner<(usize, usize)>> = BTreeMap::new();
        for (gi, group) in self.runbooks.iter().enumerate() {
            for (ri, r) in group.runbooks.iter().enumerate() {
                if r.selector.matches(node) {
                    offer(
                        &mut runbooks,
                        r.runbook.name.as_str(),
                        r.selector.specificity(),
                        (gi, ri),
                    );
                }
            }
        }
        for (name, w) in &runbooks {
            if let Some(tie) = w.tie {
                return Err(ResolveError::Conflict {
                    what: "runbook",
                    name: (*name).to_owned(),
                    specificity: w.specificity,
                    first: runbook_origin(w.value),
                    second: runbook_origin(tie),
                });
            }
        }
        let runbooks = runbooks
            .into_iter()
            .map(|(name, w)| {
                let (gi, ri) = w.value;
                let runbook = self.runbooks[gi].runbooks[ri].runbook.clone();
                (name.to_owned(), (runbook, *runbook_origin(w.value)))
            })
            .collect();

        let mut out = BTreeMap::new();
        for (path, w) in files {
            let (mi, fi) = w.value;
            let spec = &self.manifests[mi].files[fi];
            let from = file_origin(w.value);
            let content = if spec.template {
                let template_err = |error| ResolveError::Template {
                    origin: from.clone(),
                    path: path.to_owned(),
                    error,
                };
                let text = std::str::from_utf8(&spec.content)
                    .map_err(|_| template_err(TemplateError::NotText))?;
                let pieces = parse_template(text).map_err(template_err)?;
                render(&pieces, &values, node).map_err(|e| match e {
                    RenderError::Unknown(name) => ResolveError::UnknownName {
                        origin: from.clone(),
                        path: path.to_owned(),
                        name,
                    },
                    RenderError::TooLarge => ResolveError::TooLarge {
                        origin: from.clone(),
                        path: path.to_owned(),
                    },
                })?
            } else {
                spec.content.clone()
            };
            let file = ManagedFile {
                path: path.to_owned(),
                content,
                mode: spec.mode,
                reload: spec.reload.clone(),
            };
            out.insert(path.to_owned(), (file, *from));
        }
        Ok(Resolved {
            files: out,
            runbooks,
        })
    }
}

/// A node's files and runbooks, each with the definition it came from.
#[derive(Default)]
struct Resolved {
    files: BTreeMap<String, (ManagedFile, Origin)>,
    runbooks: BTreeMap<String, (Runbook, Origin)>,
}

/// The best definition of one path or var so far, and the first equally
/// specific rival if there is one.
struct Winner<T> {
    specificity: Specificity,
    value: T,
    tie: Option<T>,
}

/// Definitions are offered in manifest order, so the winner and its rival
/// are the same on every run.
fn offer<'a, T>(
    best: &mut BTreeMap<&'a str, Winner<T>>,
    key: &'a str,
    specificity: Specificity,
    value: T,
) {
    let fresh = Winner {
        specificity,
        value,
        tie: None,
    };
    match best.get_mut(key) {
        None => {
            best.insert(key, fresh);
        }
        Some(w) if specificity > w.specificity => *w = fresh,
        Some(w) if specificity == w.specificity => {
            w.tie.get_or_insert(fresh.value);
        }
        Some(_) => {}
    }
}

enum LoadFileError {
    Problem(Problem),
    Io(PathBuf, std::io::Error),
}

impl From<Problem> for LoadFileError {
    fn from(p: Problem) -> Self {
        LoadFileError::Problem(p)
    }
}

/// Turns a `[[file]]` as written into a [`FileSpec`], reading its source.
fn load_file(root: &Path, f: FileToml) -> Result<FileSpec, LoadFileError> {
    let mode = match &f.mode {
        Some(m) => parse_mode(m)?,
        None => DEFAULT_MODE,
    };
    check_path(&f.path)?;
    let (content, source) = match (f.content, f.source) {
        (Some(_), Some(_)) => return Err(Problem::ContentAndSource.into()),
        (None, None) => return Err(Problem::NoContent.into()),
        (Some(c), None) => (c.into_bytes(), None),
        (None, Some(src)) => {
            let rel = normalise_source(&src).ok_or_else(|| Problem::SourceOutside(src.clone()))?;
            let full = root.join(&rel);
            let real = match full.canonicalize() {
                Ok(real) => real,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Problem::SourceMissing(src).into());
                }
                Err(e) => return Err(LoadFileError::Io(full, e)),
            };
            if !real.starts_with(root) {
                return Err(Problem::SourceOutside(src).into());
            }
            let meta = std::fs::metadata(&real).map_err(|e| LoadFileError::Io(full.clone(), e))?;
            if !meta.is_file() {
                return Err(Problem::SourceNotFile(src).into());
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(Problem::TooLarge(meta.len()).into());
            }
            let bytes =
                read_limited(&real, MAX_FILE_BYTES).map_err(|e| LoadFileError::Io(full, e))?;
            (bytes, Some(rel))
        }
    };
    Ok(FileSpec {
        path: f.path,
        content,
        source,
        mode,
        reload: f.reload,
        selector: f.selector.0,
        template: f.template,
    })
}

// ---------------------------------------------------------------------------
// Plans

/// What a new fleet version changes, node by node, grouped by site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Nodes considered.
    pub nodes: usize,
    /// Nodes whose files or runbooks change.
    pub changing: usize,
    /// Nodes the new version cannot be resolved for.
    pub failing: usize,
    /// Sites with at least one changing or failing node, by region and site.
    pub sites: Vec<SitePlan>,
    /// Per winning selector, the paths and runbooks that differ somewhere.
    pub scopes: Vec<ScopePlan>,
}

/// The changes in one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SitePlan {
    pub region: String,
    pub site: String,
    /// Nodes of this site considered.
    pub nodes: usize,
    /// Nodes of this site that change or fail.
    pub affected: usize,
    /// Nodes with the same change, together.
    pub groups: Vec<NodeGroup>,
}

/// Nodes of one site with exactly the same change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeGroup {
    pub nodes: Vec<String>,
    pub change: NodeChange,
}

/// What happens to one node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum NodeChange {
    /// Its files or runbooks change.
    Changes {
        added: Vec<String>,
        changed: Vec<PathChange>,
        /// Paths no longer managed (left on the node as they are).
        removed: Vec<String>,
        /// The old version could not be resolved for this node, so the
        /// changes are counted from nothing.
        previous_error: Option<String>,
        /// Names of runbooks the node gains (left out when none).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        runbooks_added: Vec<String>,
        /// Runbooks whose definition changes (left out when none).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        runbooks_changed: Vec<RunbookChange>,
        /// Names of runbooks the node no longer runs (left out when none).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        runbooks_removed: Vec<String>,
    },
    /// The new version cannot be resolved for it.
    Fails { error: String },
}

/// A managed path whose definition changes, and in what.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct PathChange {
    pub path: String,
    pub content: bool,
    pub mode: bool,
    pub reload: bool,
}

/// A runbook whose definition changes, and in which fields (named as in a
/// manifest, in the order of [`Runbook`]'s fields).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct RunbookChange {
    pub name: String,
    pub fields: Vec<String>,
}

/// The paths and runbooks that differ under one selector (of the definition
/// that wins in the new version, or won in the old one for removed ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScopePlan {
    pub selector: Selector,
    pub specificity: Specificity,
    pub paths: Vec<String>,
    /// Runbook names (left out when none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runbooks: Vec<String>,
    /// Nodes with at least one of these paths or runbooks differing.
    pub nodes: usize,
}

/// The fields in which two definitions of one runbook differ.
fn runbook_fields_changed(old: &Runbook, new: &Runbook) -> Vec<String> {
    // Every field by name, so that a new one cannot be forgotten here.
    let Runbook {
        name: _,
        check,
        when,
        after,
        run,
        timeout,
        verify,
        max_per_site,
        min_interval,
        breaker_failures,
        breaker_window,
        dry_run,
    } = new;
    [
        ("check", *check != old.check),
        ("when", *when != old.when),
        ("after", *after != old.after),
        ("run", *run != old.run),
        ("timeout", *timeout != old.timeout),
        ("verify", *verify != old.verify),
        ("max_per_site", *max_per_site != old.max_per_site),
        ("min_interval", *min_interval != old.min_interval),
        (
            "breaker_failures",
            *breaker_failures != old.breaker_failures,
        ),
        ("breaker_window", *breaker_window != old.breaker_window),
        ("dry_run", *dry_run != old.dry_run),
    ]
    .into_iter()
    .filter(|(_, differs)| *differs)
    .map(|(field, _)| field.to_owned())
    .collect()
}

impl Plan {
    /// Whether the new version changes nothing and resolves everywhere.
    pub fn is_empty(&self) -> bool {
        self.changing == 0 && self.failing == 0
    }
}

/// Compares what `old` (none: nothing managed yet) and `new` give each of
/// `nodes`.
pub fn plan(old: Option<&Fleet>, new: &Fleet, nodes: &[NodeFacts]) -> Plan {
    /// Per winning selector: paths, runbook names, nodes.
    type Scopes = BTreeMap<(Specificity, Selector), (BTreeSet<String>, BTreeSet<String>, usize)>;
    // Per (region, site): its node count and its nodes by change.
    type Sites<'a> = BTreeMap<(&'a str, &'a str), (usize, BTreeMap<NodeChange, Vec<String>>)>;
    let mut sites: Sites<'_> = BTreeMap::new();
    let mut scopes: Scopes = BTreeMap::new();
    let mut result = Plan {
        nodes: nodes.len(),
        ..Plan::default()
    };
    for node in nodes {
        let site = sites
            .entry((node.region.as_str(), node.site.as_str()))
            .or_default();
        site.0 += 1;
        let new_resolved = match new.resolve_with_origins(node) {
            Ok(resolved) => resolved,
            Err(e) => {
                result.failing += 1;
                let change = NodeChange::Fails {
                    error: e.to_string(),
                };
                site.1.entry(change).or_default().push(node.name.clone());
                continue;
            }
        };
        let (old_resolved, previous_error) = match old.map(|f| f.resolve_with_origins(node)) {
            None => (Resolved::default(), None),
            Some(Ok(resolved)) => (resolved, None),
            Some(Err(e)) => (Resolved::default(), Some(e.to_string())),
        };
        let (new_files, old_files) = (&new_resolved.files, &old_resolved.files);
        let mut added = Vec::new();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        // Per selector: the paths and the runbooks that differ.
        type Touched = BTreeMap<(Specificity, Selector), (Vec<String>, Vec<String>)>;
        let mut touched: Touched = BTreeMap::new();
        let mut touch = |origin: &Origin, path: Option<&str>, runbook: Option<&str>| {
            let entry = touched
                .entry((origin.selector.specificity(), origin.selector.clone()))
                .or_default();
            entry.0.extend(path.map(str::to_owned));
            entry.1.extend(runbook.map(str::to_owned));
        };
        for (path, (file, origin)) in new_files {
            match old_files.get(path) {
                None => {
                    added.push(path.clone());
                    touch(origin, Some(path), None);
                }
                Some((before, _)) if before != file => {
                    changed.push(PathChange {
                        path: path.clone(),
                        content: before.content != file.content,
                        mode: before.mode != file.mode,
                        reload: before.reload != file.reload,
                    });
                    touch(origin, Some(path), None);
                }
                Some(_) => {}
            }
        }
        for (path, (_, origin)) in old_files {
            if !new_files.contains_key(path) {
                removed.push(path.clone());
                touch(origin, Some(path), None);
            }
        }
        let (new_runbooks, old_runbooks) = (&new_resolved.runbooks, &old_resolved.runbooks);
        let mut runbooks_added = Vec::new();
        let mut runbooks_changed = Vec::new();
        let mut runbooks_removed = Vec::new();
        for (name, (runbook, origin)) in new_runbooks {
            match old_runbooks.get(name) {
                None => {
                    runbooks_added.push(name.clone());
                    touch(origin, None, Some(name));
                }
                Some((before, _)) if before != runbook => {
                    runbooks_changed.push(RunbookChange {
                        name: name.clone(),
                        fields: runbook_fields_changed(before, runbook),
                    });
                    touch(origin, None, Some(name));
                }
                Some(_) => {}
            }
        }
        for (name, (_, origin)) in old_runbooks {
            if !new_runbooks.contains_key(name) {
                runbooks_removed.push(name.clone());
                touch(origin, None, Some(name));
            }
        }
        let same_files = added.is_empty() && changed.is_empty() && removed.is_empty();
        let same_runbooks =
            runbooks_added.is_empty() && runbooks_changed.is_empty() && runbooks_removed.is_empty();
        if same_files && same_runbooks && previous_error.is_none() {
            continue;
        }
        result.changing += 1;
        for (key, (paths, runbooks)) in touched {
            let entry = scopes.entry(key).or_default();
            entry.0.extend(paths);
            entry.1.extend(runbooks);
            entry.2 += 1;
        }
        let change = NodeChange::Changes {
            added,
            changed,
            removed,
            previous_error,
            runbooks_added,
            runbooks_changed,
            runbooks_removed,
        };
        site.1.entry(change).or_default().push(node.name.clone());
    }
    result.sites = sites
        .into_iter()
        .filter(|(_, (_, groups))| !groups.is_empty())
        .map(|((region, site), (count, groups))| SitePlan {
            region: region.to_owned(),
            site: site.to_owned(),
            nodes: count,
            affected: groups.values().map(Vec::len).sum(),
            groups: groups
                .into_iter()
                .map(|(change, nodes)| NodeGroup { nodes, change })
                .collect(),
        })
        .collect();
    result.scopes = scopes
        .into_iter()
        .map(
            |((specificity, selector), (paths, runbooks, nodes))| ScopePlan {
                selector,
                specificity,
                paths: paths.into_iter().collect(),
                runbooks: runbooks.into_iter().collect(),
                nodes,
            },
        )
        .collect();
    result
}

/// At most this many node names are shown per group on a terminal.
const NAMES_SHOWN: usize = 8;

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no changes for any of {} nodes", self.nodes);
        }
        writeln!(
            f,
            "{} of {} nodes change, {} cannot be resolved",
            self.changing, self.nodes, self.failing
        )?;
        for site in &self.sites {
            writeln!(
                f,
                "\nsite {}/{}: {} of {} nodes",
                site.region, site.site, site.affected, site.nodes
            )?;
            for group in &site.groups {
                let mut names = group.nodes[..group.nodes.len().min(NAMES_SHOWN)].join(", ");
                if group.nodes.len() > NAMES_SHOWN {
                    names.push_str(&format!(" and {} more", group.nodes.len() - NAMES_SHOWN));
                }
                match &group.change {
                    NodeChange::Fails { error } => {
                        writeln!(f, "  {names}")?;
                        writeln!(f, "    ! cannot be resolved: {error}")?;
                    }
                    NodeChange::Changes {
                        added,
                        changed,
                        removed,
                        previous_error,
                        runbooks_added,
                        runbooks_changed,
                        runbooks_removed,
                    } => {
                        writeln!(f, "  {names}")?;
                        if let Some(e) = previous_error {
                            writeln!(f, "    (the previous version did not resolve: {e})")?;
                        }
                        for p in added {
                            writeln!(f, "    + {p}")?;
                        }
                        for c in changed {
                            let what: Vec<&str> = [
                                (c.content, "content"),
                                (c.mode, "mode"),
                                (c.reload, "reload"),
                            ]
                            .into_iter()
                            .filter_map(|(on, name)| on.then_some(name))
                            .collect();
                            writeln!(f, "    ~ {} ({})", c.path, what.join(", "))?;
                        }
                        for p in removed {
                            writeln!(f, "    - {p} (no longer managed)")?;
                        }
                        for r in runbooks_added {
                            writeln!(f, "    + runbook {r}")?;
                        }
                        for c in runbooks_changed {
                            writeln!(f, "    ~ runbook {} ({})", c.name, c.fields.join(", "))?;
                        }
                        for r in runbooks_removed {
                            writeln!(f, "    - runbook {r} (no longer runs here)")?;
                        }
                    }
                }
            }
        }
        if !self.scopes.is_empty() {
            writeln!(f, "\nby scope:")?;
            for s in &self.scopes {
                let items: Vec<String> = s
                    .paths
                    .iter()
                    .cloned()
                    .chain(s.runbooks.iter().map(|r| format!("runbook {r}")))
                    .collect();
                writeln!(
                    f,
                    "  {} [{}]: {} ({} nodes)",
                    s.selector,
                    s.specificity,
                    items.join(", "),
                    s.nodes
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fleet directory in a temp dir, written file by file.
    struct Dir(tempfile::TempDir);

    impl Dir {
        fn new() -> Self {
            Dir(tempfile::tempdir().unwrap())
        }
        fn write(&self, rel: &str, text: impl AsRef<[u8]>) -> &Self {
            let path = self.0.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
            self
        }
        fn load(&self) -> Result<Fleet, FleetError> {
            Fleet::load(self.0.path())
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
    }

    fn node(name: &str, region: &str, site: &str, labels: &[(&str, &str)]) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            region: region.into(),
            site: site.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            facts: BTreeMap::new(),
        }
    }

    fn content(fleet: &Fleet, node: &NodeFacts, path: &str) -> String {
        let state = fleet.resolve(node, 1).unwrap();
        String::from_utf8(state.files[path].content.clone()).unwrap()
    }

    fn file(path: &str, text: &str, selector: &str) -> String {
        format!("[[file]]\npath = {path:?}\ncontent = {text:?}\nselector = {selector}\n\n")
    }

    #[test]
    fn the_most_specific_matching_selector_wins_all_region_site_labels_then_combined() {
        let d = Dir::new();
        d.write(
            "levels.toml",
            [
                file("/etc/level", "all", r#""all""#),
                file("/etc/level", "region", r#"{ region = "eu" }"#),
                file("/etc/level", "site", r#"{ region = "eu", site = "s1" }"#),
                file("/etc/level", "labels", r#"{ labels = { role = "web" } }"#),
                file(
                    "/etc/level",
                    "region+labels",
                    r#"{ region = "eu", labels = { role = "web" } }"#,
                ),
                file(
                    "/etc/level",
                    "site+labels",
                    r#"{ region = "eu", site = "s1", labels = { role = "web" } }"#,
                ),
            ]
            .concat(),
        );
        let fleet = d.load().unwrap();
        let web = [("role", "web")];
        for (n, want) in [
            (node("a", "us", "x", &[]), "all"),
            (node("b", "eu", "s2", &[]), "region"),
            (node("c", "eu", "s1", &[]), "site"),
            (node("d", "us", "x", &web), "labels"),
            (node("e", "eu", "s2", &web), "region+labels"),
            (node("f", "eu", "s1", &web), "site+labels"),
            (node("g", "eu", "s1", &[("role", "db")]), "site"),
        ] {
            assert_eq!(content(&fleet, &n, "/etc/level"), want, "{}", n.name);
        }
    }

    #[test]
    fn for_a_node_every_selector_matches_each_level_beats_all_the_levels_below() {
        let levels = [
            ("all", r#""all""#),
            ("region", r#"{ region = "eu" }"#),
            ("site", r#"{ region = "eu", site = "s1" }"#),
            ("labels", r#"{ labels = { role = "web" } }"#),
            (
                "region+labels",
                r#"{ region = "eu", labels = { role = "web" } }"#,
            ),
            (
                "site+labels",
                r#"{ region = "eu", site = "s1", labels = { role = "web" } }"#,
            ),
        ];
        let n = node("f", "eu", "s1", &[("role", "web")]);
        // Written from the most specific down, so file order cannot decide.
        for top in 0..levels.len() {
            let d = Dir::new();
            let text: String = levels[..=top]
                .iter()
                .rev()
                .map(|(name, sel)| file("/etc/level", name, sel))
                .collect();
            d.write("levels.toml", text);
            let fleet = d.load().unwrap();
            assert_eq!(content(&fleet, &n, "/etc/level"), levels[top].0);
            let spec = fleet.manifests()[0].files[0].selector.specificity();
            assert_eq!(spec.to_string(), levels[top].0);
        }
    }

    #[test]
    fn a_label_scoped_file_overrides_the_site_scoped_one_for_matching_nodes_only() {
        let d = Dir::new();
        d.write(
            "site.toml",
            file("/etc/app.conf", "site", r#"{ region = "eu", site = "s1" }"#),
        )
        .write(
            "web.toml",
            file("/etc/app.conf", "web", r#"{ labels = { role = "web" } }"#),
        );
        let fleet = d.load().unwrap();
        let web = node("w1", "eu", "s1", &[("role", "web")]);
        let db = node("d1", "eu", "s1", &[("role", "db")]);
        assert_eq!(content(&fleet, &web, "/etc/app.conf"), "web");
        assert_eq!(content(&fleet, &db, "/etc/app.conf"), "site");
        // Outside the site only the label definition applies.
        let other = node("x", "us", "n1", &[]);
        assert!(fleet.resolve(&other, 1).unwrap().files.is_empty());
    }

    #[test]
    fn two_definitions_at_the_same_specificity_are_a_conflict_naming_both_manifests() {
        let d = Dir::new();
        d.write(
            "a.toml",
            file("/etc/x", "a", r#"{ labels = { role = "web" } }"#),
        )
        .write(
            "b.toml",
            file("/etc/x", "b", r#"{ labels = { tier = "1" } }"#),
        );
        let fleet = d.load().unwrap();
        let both = node("n1", "eu", "s1", &[("role", "web"), ("tier", "1")]);
        let err = fleet.resolve(&both, 1).unwrap_err();
        let ResolveError::Conflict {
            what,
            name,
            specificity,
            first,
            second,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((*what, name.as_str()), ("file", "/etc/x"));
        assert_eq!(*specificity, Specificity::Labels);
        assert_eq!(
            (first.manifest.as_str(), second.manifest.as_str()),
            ("a.toml", "b.toml")
        );
        let text = err.to_string();
        assert!(
            text.contains("a.toml file[0]") && text.contains("b.toml file[0]"),
            "{text}"
        );
        // A node only one of them matches is fine.
        let web = node("n2", "eu", "s1", &[("role", "web")]);
        assert_eq!(content(&fleet, &web, "/etc/x"), "a");

        // The conflict shows in the plan, not only when applying.
        let p = plan(None, &fleet, &[both, web]);
        assert_eq!((p.nodes, p.changing, p.failing), (2, 1, 1));
        let groups = &p.sites[0].groups;
        assert!(groups.iter().any(|g| g.nodes == ["n1"]
            && matches!(&g.change, NodeChange::Fails { error } if error.contains("b.toml"))));
        assert!(p.to_string().contains("cannot be resolved"), "{p}");

        // Fixing it lists the node again, with the files counted from nothing.
        let fixed = Dir::new();
        fixed.write("a.toml", file("/etc/x", "a", r#""all""#));
        let fixed = fixed.load().unwrap();
        let p = plan(
            Some(&fleet),
            &fixed,
            &[node("n1", "eu", "s1", &[("role", "web"), ("tier", "1")])],
        );
        assert_eq!((p.changing, p.failing), (1, 0));
        assert!(matches!(
            &p.sites[0].groups[0].change,
            NodeChange::Changes { added, previous_error: Some(e), .. }
                if added == &["/etc/x"] && e.contains("defined twice")
        ));
    }

    #[test]
    fn vars_conflict_like_files_and_a_more_specific_definition_settles_a_tie() {
        let d = Dir::new();
        d.write(
            "a.toml",
            "[[vars]]\nselector = { region = \"eu\" }\nvalues = { port = \"1\" }\n",
        )
        .write(
            "b.toml",
            "[[vars]]\nselector = { region = \"eu\" }\nvalues = { port = \"2\" }\n\
             [[file]]\npath = \"/etc/p\"\ncontent = \"{{port}}\"\n",
        );
        let fleet = d.load().unwrap();
        let err = fleet.resolve(&node("n", "eu", "s1", &[]), 1).unwrap_err();
        assert!(
            matches!(&err, ResolveError::Conflict { what: "var", name, first, second, .. }
                if name == "port" && first.manifest == "a.toml" && second.manifest == "b.toml"),
            "{err}"
        );
        d.write(
            "c.toml",
            "[[vars]]\nselector = { region = \"eu\", site = \"s1\" }\nvalues = { port = \"3\" }\n",
        );
        let fleet = d.load().unwrap();
        assert_eq!(content(&fleet, &node("n", "eu", "s1", &[]), "/etc/p"), "3");
        assert!(fleet.resolve(&node("m", "eu", "s2", &[]), 1).is_err());
    }

    #[test]
    fn templates_render_vars_by_precedence_node_fields_labels_and_facts() {
        let d = Dir::new();
        d.write(
            "vars.toml",
            r#"
[[vars]]
selector = "all"
values = { port = "80", greeting = "hello" }

[[vars]]
selector = { labels = { role = "web" } }
values = { port = "8080" }
"#,
        )
        .write(
            "app.toml",
            r#"
[[file]]
path = "/etc/app/app.conf"
content = "port = {{port}}\n{{ greeting }} from {{node.name}} in {{node.region}}/{{ node.site }}\nrole {{label.role}} on {{fact.os}}\n"
mode = "0640"
reload = ["systemctl reload app"]
"#,
        );
        let fleet = d.load().unwrap();
        let mut web = node("w1", "eu", "s1", &[("role", "web")]);
        web.facts.insert("os".into(), "linux".into());
        let state = fleet.resolve(&web, 42).unwrap();
        assert_eq!(state.version, 42);
        let f = &state.files["/etc/app/app.conf"];
        assert_eq!(
            String::from_utf8(f.content.clone()).unwrap(),
            "port = 8080\nhello from w1 in eu/s1\nrole web on linux\n"
        );
        assert_eq!(f.mode, 0o640);
        assert_eq!(f.reload, ["systemctl reload app"]);
        let mut db = node("d1", "eu", "s1", &[("role", "db")]);
        db.facts.insert("os".into(), "bsd".into());
        assert_eq!(
            content(&fleet, &db, "/etc/app/app.conf"),
            "port = 80\nhello from d1 in eu/s1\nrole db on bsd\n"
        );
    }

    #[test]
    fn an_unknown_template_name_is_an_error_naming_the_file_and_the_name() {
        let d = Dir::new();
        d.write(
            "app.toml",
            "[[file]]\npath = \"/etc/a\"\ncontent = \"{{ prot }}\"\n\
             [[file]]\npath = \"/etc/b\"\ncontent = \"{{label.role}}\"\nselector = { region = \"eu\" }\n",
        );
        let fleet = d.load().unwrap();
        let err = fleet.resolve(&node("n", "us", "s", &[]), 1).unwrap_err();
        assert!(
            matches!(&err, ResolveError::UnknownName { origin, path, name }
                if origin.manifest == "app.toml" && path == "/etc/a" && name == "prot"),
            "{err}"
        );
        assert!(err.to_string().contains("{{prot}}"), "{err}");
        let d2 = Dir::new();
        d2.write(
            "app.toml",
            "[[file]]\npath = \"/etc/b\"\ncontent = \"{{label.role}}\"\n",
        );
        let err = d2
            .load()
            .unwrap()
            .resolve(&node("n", "eu", "s", &[]), 1)
            .unwrap_err();
        assert!(
            matches!(&err, ResolveError::UnknownName { name, .. } if name == "label.role"),
            "{err}"
        );
        // A name that can never exist is refused when loading.
        d2.write(
            "bad.toml",
            "[[file]]\npath = \"/etc/c\"\ncontent = \"a\\n{{node.colour}}\"\n",
        );
        let err = d2.load().unwrap_err();
        assert!(
            matches!(&err, FleetError::Invalid { problem: Problem::Template(TemplateError::BadName { line: 2, name }), .. }
                if name == "node.colour"),
            "{err}"
        );
    }

    #[test]
    fn a_quoted_literal_writes_braces_as_they_are_and_an_unclosed_brace_is_refused() {
        let d = Dir::new();
        d.write(
            "t.toml",
            r#"
[[vars]]
values = { port = "80" }
[[file]]
path = "/etc/t"
content = '{{"{{"}}port}} is {{port}}; }} alone stays; {{ "a b" }}'
"#,
        );
        let fleet = d.load().unwrap();
        assert_eq!(
            content(&fleet, &node("n", "eu", "s", &[]), "/etc/t"),
            "{{port}} is 80; }} alone stays; a b"
        );
        d.write(
            "u.toml",
            "[[file]]\npath = \"/etc/u\"\ncontent = \"x\\ny {{port\"\n",
        );
        let err = d.load().unwrap_err();
        assert!(
            matches!(
                &err,
                FleetError::Invalid {
                    problem: Problem::Template(TemplateError::Unclosed { line: 2 }),
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_source_is_read_from_the_fleet_directory_and_binary_copied_as_is() {
        let d = Dir::new();
        d.write("files/app.conf", "node {{node.name}}\n")
            .write("files/logo.bin", [0xff_u8, 0x00, 0x7b, 0x7b])
            .write(
                "app.toml",
                "[[file]]\npath = \"/etc/app.conf\"\nsource = \"files/app.conf\"\n\
                 [[file]]\npath = \"/usr/share/logo\"\nsource = \"./files/logo.bin\"\ntemplate = false\nmode = \"0o600\"\n",
            );
        let fleet = d.load().unwrap();
        let state = fleet.resolve(&node("n1", "eu", "s", &[]), 1).unwrap();
        assert_eq!(state.files["/etc/app.conf"].content, b"node n1\n");
        assert_eq!(state.files["/etc/app.conf"].mode, DEFAULT_MODE);
        assert_eq!(
            state.files["/usr/share/logo"].content,
            [0xff, 0x00, 0x7b, 0x7b]
        );
        assert_eq!(state.files["/usr/share/logo"].mode, 0o600);
        let spec = &fleet.manifests()[0].files[1];
        assert_eq!(spec.source.as_deref(), Some("files/logo.bin"));
        // The same binary as a template is refused, naming the source.
        d.write(
            "app.toml",
            "[[file]]\npath = \"/usr/share/logo\"\nsource = \"files/logo.bin\"\n",
        );
        let err = d.load().unwrap_err();
        assert!(
            matches!(&err, FleetError::Invalid { problem: Problem::NotText(s), .. } if s == "files/logo.bin"),
            "{err}"
        );
    }

    #[test]
    fn a_toml_file_used_as_a_source_is_content_not_a_manifest() {
        let d = Dir::new();
        d.write("files/app.toml", "listen = {{ port }}\n")
            .write(
                "app.toml",
                "[[vars]]\nvalues = { port = \"1\" }\n[[file]]\npath = \"/etc/app.toml\"\nsource = \"files/app.toml\"\n",
            );
        let fleet = d.load().unwrap();
        assert_eq!(fleet.manifests().len(), 1);
        assert_eq!(
            content(&fleet, &node("n", "eu", "s", &[]), "/etc/app.toml"),
            "listen = 1\n"
        );
    }

    #[test]
    fn a_missing_source_is_an_error_naming_manifest_item_and_source() {
        let d = Dir::new();
        d.write(
            "web.toml",
            "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\n[[file]]\npath = \"/etc/x.conf\"\nsource = \"files/x.conf\"\n",
        );
        let err = d.load().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: file[1] /etc/x.conf: source files/x.conf does not exist",
                d.path().join("web.toml").display()
            )
        );
    }

    #[test]
    fn a_source_escaping_the_directory_is_refused() {
        let outer = Dir::new();
        outer.write("secret", "s");
        let d = Dir::new();
        for src in ["../x", "files/../../x", "/etc/passwd"] {
            d.write(
                "a.toml",
                format!("[[file]]\npath = \"/etc/a\"\nsource = {src:?}\n"),
            );
            let err = d.load().unwrap_err();
            assert!(
                matches!(&err, FleetError::Invalid { problem: Problem::SourceOutside(s), .. } if s == src),
                "{src}: {err}"
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outer.path().join("secret"), d.path().join("link")).unwrap();
            d.write("a.toml", "[[file]]\npath = \"/etc/a\"\nsource = \"link\"\n");
            let err = d.load().unwrap_err();
            assert!(
                matches!(
                    &err,
                    FleetError::Invalid {
                        problem: Problem::SourceOutside(_),
                        ..
                    }
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn bad_modes_paths_and_selectors_are_refused() {
        let d = Dir::new();
        for mode in ["rw-r--r--", "0888", "10644", "", "0o"] {
            d.write(
                "a.toml",
                format!("[[file]]\npath = \"/etc/a\"\ncontent = \"\"\nmode = {mode:?}\n"),
            );
            let err = d.load().unwrap_err();
            assert!(
                matches!(&err, FleetError::Invalid { problem: Problem::BadMode(m), .. } if m == mode),
                "{mode}: {err}"
            );
        }
        for path in [
            "etc/a",
            "/etc/../a",
            "/etc//a",
            "/etc/./a",
            "/etc/a/",
            "/",
            "",
        ] {
            d.write(
                "a.toml",
                format!("[[file]]\npath = {path:?}\ncontent = \"\"\n"),
            );
            let err = d.load().unwrap_err();
            assert!(
                matches!(&err, FleetError::Invalid { problem: Problem::BadPath(p), .. } if p == path),
                "{path}: {err}"
            );
        }
        d.write(
            "a.toml",
            "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\nselector = { site = \"s1\" }\n",
        );
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Invalid {
                problem: Problem::SiteWithoutRegion,
                ..
            }
        ));
        for (selector, expect) in [("\"everyone\"", "\"all\""), ("{}", "empty selector")] {
            d.write(
                "a.toml",
                format!("[[file]]\npath = \"/etc/a\"\ncontent = \"\"\nselector = {selector}\n"),
            );
            let err = d.load().unwrap_err();
            assert!(
                matches!(&err, FleetError::Parse { message, line: 4, .. } if message.contains(expect)),
                "{selector}: {err}"
            );
        }
        d.write(
            "a.toml",
            "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\nsource = \"x\"\n",
        );
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Invalid {
                problem: Problem::ContentAndSource,
                ..
            }
        ));
        d.write("a.toml", "[[file]]\npath = \"/etc/a\"\n");
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Invalid {
                problem: Problem::NoContent,
                ..
            }
        ));
        d.write("a.toml", "[[vars]]\nvalues = { \"a.b\" = \"1\" }\n");
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Invalid { problem: Problem::BadVarName(n), .. } if n == "a.b"
        ));
    }

    #[test]
    fn unknown_fields_are_refused_with_the_manifest_line_and_column() {
        let d = Dir::new();
        d.write(
            "sub/web.toml",
            "[[file]]\npath = \"/etc/a\"\n  contnet = \"x\"\n",
        );
        let err = d.load().unwrap_err();
        let FleetError::Parse {
            manifest,
            line,
            column,
            message,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(manifest, &d.path().join("sub/web.toml"));
        assert_eq!((*line, *column), (3, 3));
        assert!(message.contains("contnet"), "{message}");
        assert!(err.to_string().contains("line 3, column 3"), "{err}");
    }

    #[test]
    fn a_file_over_the_size_limit_and_a_fleet_over_the_total_are_refused() {
        let d = Dir::new();
        d.write("big.bin", vec![b'x'; MAX_FILE_BYTES as usize + 1])
            .write(
                "a.toml",
                "[[file]]\npath = \"/big\"\nsource = \"big.bin\"\ntemplate = false\n",
            );
        let err = d.load().unwrap_err();
        assert!(
            matches!(&err, FleetError::Invalid { problem: Problem::TooLarge(n), .. } if *n == MAX_FILE_BYTES + 1),
            "{err}"
        );
        let files = (0..9)
            .map(|i| FileSpec {
                path: format!("/f{i}"),
                content: vec![0; MAX_FILE_BYTES as usize],
                source: None,
                mode: 0o644,
                reload: vec![],
                selector: Selector::all(),
                template: false,
            })
            .collect();
        let err = Fleet::from_manifests(vec![Manifest {
            name: "m.toml".into(),
            vars: vec![],
            files,
        }])
        .unwrap_err();
        assert!(matches!(err, FleetError::TooLarge), "{err}");
    }

    #[test]
    fn a_rendered_file_over_the_size_limit_is_refused_for_that_node() {
        let big = "x".repeat(MAX_FILE_BYTES as usize / 2 + 1);
        let fleet = Fleet::from_manifests(vec![Manifest {
            name: "m.toml".into(),
            vars: vec![VarSet {
                selector: Selector::all(),
                values: [("big".to_string(), big)].into(),
            }],
            files: vec![FileSpec {
                path: "/f".into(),
                content: b"{{big}}{{big}}".to_vec(),
                source: None,
                mode: 0o644,
                reload: vec![],
                selector: Selector::all(),
                template: true,
            }],
        }])
        .unwrap();
        let err = fleet.resolve(&node("n", "eu", "s", &[]), 1).unwrap_err();
        assert!(
            matches!(&err, ResolveError::TooLarge { path, .. } if path == "/f"),
            "{err}"
        );
    }

    #[test]
    fn plan_lists_exactly_the_nodes_whose_files_differ_grouped_by_site() {
        let old = Dir::new();
        old.write(
            "base.toml",
            [
                file("/etc/motd", "hi", r#""all""#),
                file("/etc/old", "o", r#"{ region = "eu", site = "s1" }"#),
                file("/etc/app", "v1", r#"{ labels = { role = "web" } }"#),
            ]
            .concat(),
        );
        let new = Dir::new();
        new.write(
            "base.toml",
            [
                file("/etc/motd", "hi", r#""all""#),
                "[[file]]\npath = \"/etc/app\"\ncontent = \"v2\"\nmode = \"0600\"\nselector = { labels = { role = \"web\" } }\n\n".to_string(),
                file("/etc/new", "n", r#"{ region = "eu", site = "s2" }"#),
            ]
            .concat(),
        );
        let (old, new) = (old.load().unwrap(), new.load().unwrap());
        let nodes = [
            node("a1", "eu", "s1", &[]),                // loses /etc/old
            node("a2", "eu", "s1", &[("role", "web")]), // loses /etc/old, /etc/app changes
            node("b1", "eu", "s2", &[]),                // gains /etc/new
            node("b2", "eu", "s2", &[]),                // gains /etc/new
            node("c1", "us", "s9", &[]),                // unchanged
        ];
        let p = plan(Some(&old), &new, &nodes);
        assert_eq!((p.nodes, p.changing, p.failing), (5, 4, 0));
        let sites: Vec<_> = p
            .sites
            .iter()
            .map(|s| (s.region.as_str(), s.site.as_str(), s.nodes, s.affected))
            .collect();
        assert_eq!(sites, [("eu", "s1", 2, 2), ("eu", "s2", 2, 2)]);
        let changes = |nodes: &[&str]| {
            p.sites
                .iter()
                .flat_map(|s| &s.groups)
                .find(|g| g.nodes == nodes)
                .map(|g| g.change.clone())
                .unwrap_or_else(|| panic!("no group {nodes:?} in {p:#?}"))
        };
        let removed_old = NodeChange::Changes {
            added: vec![],
            changed: vec![],
            removed: vec!["/etc/old".into()],
            previous_error: None,
            runbooks_added: vec![],
            runbooks_changed: vec![],
            runbooks_removed: vec![],
        };
        assert_eq!(changes(&["a1"]), removed_old);
        assert_eq!(
            changes(&["a2"]),
            NodeChange::Changes {
                added: vec![],
                changed: vec![PathChange {
                    path: "/etc/app".into(),
                    content: true,
                    mode: true,
                    reload: false,
                }],
                removed: vec!["/etc/old".into()],
                previous_error: None,
                runbooks_added: vec![],
                runbooks_changed: vec![],
                runbooks_removed: vec![],
            }
        );
        assert_eq!(
            changes(&["b1", "b2"]),
            NodeChange::Changes {
                added: vec!["/etc/new".into()],
                changed: vec![],
                removed: vec![],
                previous_error: None,
                runbooks_added: vec![],
                runbooks_changed: vec![],
                runbooks_removed: vec![],
            }
        );
        let scopes: Vec<_> = p
            .scopes
            .iter()
            .map(|s| (s.selector.to_string(), s.paths.clone(), s.nodes))
            .collect();
        assert_eq!(
            scopes,
            [
                (
                    "region=eu site=s1".to_string(),
                    vec!["/etc/old".to_string()],
                    2
                ),
                (
                    "region=eu site=s2".to_string(),
                    vec!["/etc/new".to_string()],
                    2
                ),
                (
                    "label:role=web".to_string(),
                    vec!["/etc/app".to_string()],
                    1
                ),
            ]
        );
        let text = p.to_string();
        for line in [
            "4 of 5 nodes change, 0 cannot be resolved",
            "site eu/s1: 2 of 2 nodes",
            "  b1, b2",
            "    + /etc/new",
            "    ~ /etc/app (content, mode)",
            "    - /etc/old (no longer managed)",
            "  label:role=web [labels]: /etc/app (1 nodes)",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert!(!text.contains("c1"), "{text}");
        // The same fleet against itself changes nothing.
        let same = plan(Some(&new), &new, &nodes);
        assert!(same.is_empty() && same.sites.is_empty(), "{same}");
        serde_json::to_string(&p).unwrap();
    }

    #[test]
    fn loading_the_same_directory_twice_gives_equal_fleets_and_bytes() {
        let d = Dir::new();
        d.write("z.toml", file("/etc/z", "z", r#""all""#))
            .write("a/b.toml", file("/etc/b", "b", r#"{ region = "eu" }"#))
            .write("a.toml", "[[vars]]\nvalues = { x = \"1\", a = \"2\" }\n")
            .write(".git/config.toml", "not a manifest")
            .write("files/data", "d");
        let one = d.load().unwrap();
        let two = d.load().unwrap();
        assert_eq!(one, two);
        assert_eq!(
            postcard::to_stdvec(&one).unwrap(),
            postcard::to_stdvec(&two).unwrap()
        );
        let names: Vec<_> = one.manifests().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a.toml", "a/b.toml", "z.toml"]);
        let back: Fleet = postcard::from_bytes(&postcard::to_stdvec(&one).unwrap()).unwrap();
        assert_eq!(back, one);
        back.validate().unwrap();
    }

    fn runbook(name: &str, run: &str, selector: &str) -> String {
        format!(
            "[[runbook]]\nname = {name:?}\ncheck = \"disk\"\nrun = {run:?}\nselector = {selector}\n\n"
        )
    }

    #[test]
    fn a_site_runbook_overrides_the_one_for_all_of_the_same_name_on_that_site_only() {
        let d = Dir::new();
        d.write(
            "base.toml",
            [
                file("/etc/motd", "hi", r#""all""#),
                runbook("clean-tmp", "rm -rf /tmp/cache", r#""all""#),
            ]
            .concat(),
        )
        .write(
            "sites/s1.toml",
            r#"
[[runbook]]
name = "clean-tmp"
selector = { region = "eu", site = "s1" }
check = "disk"
when = "warning"
after = "5m"
run = "rm -rf /tmp/cache /var/tmp/cache"
timeout = "30s"
verify = "90s"
max_per_site = 2
min_interval = "1h"
breaker_failures = 2
breaker_window = "6h"
dry_run = true

[[runbook]]
name = "restart-app"
check = "app"
run = "systemctl restart app"

[runbook.selector]
region = "eu"
site = "s1"
labels = { role = "web" }
"#,
        );
        let fleet = d.load().unwrap();
        let groups: Vec<_> = fleet
            .runbooks()
            .iter()
            .map(|g| (g.manifest.as_str(), g.runbooks.len()))
            .collect();
        assert_eq!(groups, [("base.toml", 1), ("sites/s1.toml", 2)]);

        let s1 = fleet.resolve(&node("a", "eu", "s1", &[]), 3).unwrap();
        let names: Vec<_> = s1.runbooks.keys().map(String::as_str).collect();
        assert_eq!(names, ["clean-tmp"]);
        let r = &s1.runbooks["clean-tmp"];
        assert_eq!(r.run, "rm -rf /tmp/cache /var/tmp/cache");
        assert_eq!(r.when, crate::site::Status::Warning);
        assert_eq!(r.after, std::time::Duration::from_secs(300));
        assert_eq!(r.timeout, std::time::Duration::from_secs(30));
        assert_eq!(r.verify, std::time::Duration::from_secs(90));
        assert_eq!((r.max_per_site, r.breaker_failures), (2, 2));
        assert_eq!(r.min_interval, std::time::Duration::from_secs(3600));
        assert_eq!(r.breaker_window, std::time::Duration::from_secs(6 * 3600));
        assert!(r.dry_run);
        assert_eq!(s1.files.len(), 1);

        // Elsewhere the rule for all, with the runbook's defaults.
        let other = fleet.resolve(&node("b", "eu", "s2", &[]), 3).unwrap();
        let r = &other.runbooks["clean-tmp"];
        assert_eq!(r.run, "rm -rf /tmp/cache");
        assert_eq!(r.when, crate::site::Status::Critical);
        assert_eq!(r.after, std::time::Duration::from_secs(60));
        assert_eq!(
            (r.max_per_site, r.breaker_failures, r.dry_run),
            (1, 3, false)
        );
        assert_eq!(other.runbooks.len(), 1);

        // A web node of s1 gets both.
        let web = fleet
            .resolve(&node("w", "eu", "s1", &[("role", "web")]), 3)
            .unwrap();
        let names: Vec<_> = web.runbooks.keys().map(String::as_str).collect();
        assert_eq!(names, ["clean-tmp", "restart-app"]);
        assert_eq!(web.runbooks["clean-tmp"].max_per_site, 2);
        assert_ne!(web.hash(), s1.hash());
    }

    #[test]
    fn two_runbooks_of_one_name_at_the_same_specificity_are_a_conflict_naming_both() {
        let d = Dir::new();
        d.write(
            "a.toml",
            runbook("clean", "rm a", r#"{ labels = { role = "web" } }"#),
        )
        .write(
            "b.toml",
            runbook("clean", "rm b", r#"{ labels = { tier = "1" } }"#),
        );
        let fleet = d.load().unwrap();
        let both = node("n1", "eu", "s1", &[("role", "web"), ("tier", "1")]);
        let err = fleet.resolve(&both, 1).unwrap_err();
        assert!(
            matches!(&err, ResolveError::Conflict { what: "runbook", name, specificity: Specificity::Labels, first, second }
                if name == "clean" && first.manifest == "a.toml" && second.manifest == "b.toml"
                    && first.item == "runbook[0]"),
            "{err}"
        );
        let text = err.to_string();
        assert!(
            text.starts_with("runbook clean is defined twice")
                && text.contains("a.toml runbook[0]")
                && text.contains("b.toml runbook[0]"),
            "{text}"
        );
        // One of them alone is fine, and a more specific one settles it.
        let web = node("n2", "eu", "s1", &[("role", "web")]);
        assert_eq!(
            fleet.resolve(&web, 1).unwrap().runbooks["clean"].run,
            "rm a"
        );
        d.write(
            "c.toml",
            runbook(
                "clean",
                "rm c",
                r#"{ region = "eu", labels = { role = "web" } }"#,
            ),
        );
        let fleet = d.load().unwrap();
        assert_eq!(
            fleet.resolve(&both, 1).unwrap().runbooks["clean"].run,
            "rm c"
        );
        // The conflict shows in the plan.
        let d2 = Dir::new();
        d2.write("a.toml", runbook("clean", "rm a", r#""all""#))
            .write("b.toml", runbook("clean", "rm b", r#""all""#));
        let p = plan(None, &d2.load().unwrap(), &[web]);
        assert_eq!((p.changing, p.failing), (0, 1));
    }

    #[test]
    fn a_runbook_with_problems_is_refused_when_loading_naming_the_manifest_and_the_rule() {
        let d = Dir::new();
        for (body, expect) in [
            ("max_per_site = 0\n", "`max_per_site` must be at least 1"),
            (
                "when = \"passing\"\n",
                "`when` must be \"warning\" or \"critical\"",
            ),
            (
                "breaker_failures = 0\n",
                "`breaker_failures` must be at least 1",
            ),
            ("timeout = \"0s\"\n", "`timeout` must be more than 0"),
        ] {
            d.write(
                "ops/rb.toml",
                format!(
                    "[[file]]\npath = \"/etc/a\"\ncontent = \"\"\n\
                     [[runbook]]\nname = \"ok\"\ncheck = \"disk\"\nrun = \"true\"\n\
                     [[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\n{body}"
                ),
            );
            let err = d.load().unwrap_err();
            assert!(
                matches!(&err, FleetError::Invalid { manifest, item, problem: Problem::Runbook(_) }
                    if manifest == &d.path().join("ops/rb.toml") && item == "runbook[1] clean"),
                "{body}: {err}"
            );
            let text = err.to_string();
            let head = format!(
                "{}: runbook[1] clean: ",
                d.path().join("ops/rb.toml").display()
            );
            assert!(
                text.starts_with(&head) && text[head.len()..].starts_with(expect),
                "{body}: {text}"
            );
        }
        // Every problem is named, the runbook's name not repeated.
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"  \"\nmax_per_site = 0\n",
        );
        assert_eq!(
            d.load().unwrap_err().to_string(),
            format!(
                "{}: runbook[0] clean: `run` is empty; `max_per_site` must be at least 1",
                d.path().join("ops/rb.toml").display()
            )
        );
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"Bad Name\"\ncheck = \"runbook:x\"\nrun = \"true\"\n",
        );
        let err = d.load().unwrap_err().to_string();
        assert!(
            err.contains("runbook[0] Bad Name: runbook name \"Bad Name\" must be")
                && err.contains("`check` must name a check other than a runbook's"),
            "{err}"
        );
        // The selector is checked like any other.
        d.write(
            "ops/rb.toml",
            runbook("clean", "true", r#"{ site = "s1" }"#),
        );
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Invalid { problem: Problem::SiteWithoutRegion, item, .. } if item == "runbook[0] clean"
        ));
    }

    #[test]
    fn unknown_or_missing_runbook_keys_are_refused_with_the_manifest_line_and_column() {
        let d = Dir::new();
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\n  max_per_node = 2\n",
        );
        let err = d.load().unwrap_err();
        let FleetError::Parse {
            manifest,
            line,
            column,
            message,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(manifest, &d.path().join("ops/rb.toml"));
        assert_eq!((*line, *column), (5, 3), "{err}");
        assert!(
            message.contains("max_per_node")
                && message.contains("max_per_site")
                && message.contains("`selector`"),
            "{message}"
        );
        // A selector that is not one, and a missing field.
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\nselector = {}\n",
        );
        assert!(
            matches!(d.load().unwrap_err(), FleetError::Parse { line: 5, message, .. } if message.contains("empty selector")),
        );
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\n",
        );
        assert!(
            matches!(d.load().unwrap_err(), FleetError::Parse { message, .. } if message.contains("missing field `run`")),
        );
        d.write(
            "ops/rb.toml",
            "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\nafter = \"soon\"\n",
        );
        assert!(matches!(
            d.load().unwrap_err(),
            FleetError::Parse { line: 5, .. }
        ));
        d.write(
            "ops/rb.toml",
            "[[runbooks]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"true\"\n",
        );
        assert!(
            matches!(d.load().unwrap_err(), FleetError::Parse { line: 1, message, .. } if message.contains("runbooks")),
        );
    }

    #[test]
    fn runbooks_are_not_templates() {
        let d = Dir::new();
        d.write(
            "rb.toml",
            runbook("echo", "echo {{port}} {{node.name}} {{", r#""all""#),
        );
        let state = d
            .load()
            .unwrap()
            .resolve(&node("n", "eu", "s", &[]), 1)
            .unwrap();
        assert_eq!(state.runbooks["echo"].run, "echo {{port}} {{node.name}} {{");
    }

    #[test]
    fn a_fleet_without_runbooks_encodes_as_before_and_one_with_them_round_trips() {
        let d = Dir::new();
        d.write("a.toml", file("/etc/a", "a", r#""all""#));
        let plain = d.load().unwrap();
        let bytes = postcard::to_stdvec(&plain).unwrap();
        // The encoding before runbooks: the manifests alone.
        assert_eq!(bytes, postcard::to_stdvec(plain.manifests()).unwrap());
        assert_eq!(postcard::from_bytes::<Fleet>(&bytes).unwrap(), plain);
        let json = serde_json::to_string(&plain).unwrap();
        assert!(!json.contains("runbooks"), "{json}");
        assert_eq!(serde_json::from_str::<Fleet>(&json).unwrap(), plain);

        d.write(
            "rb.toml",
            runbook("clean", "rm -rf /tmp/x", r#"{ region = "eu" }"#),
        );
        let with = d.load().unwrap();
        let bytes = postcard::to_stdvec(&with).unwrap();
        let (back, rest) = postcard::take_from_bytes::<Fleet>(&bytes).unwrap();
        assert!(rest.is_empty());
        assert_eq!(back, with);
        back.validate().unwrap();
        let json = serde_json::to_string(&with).unwrap();
        assert_eq!(serde_json::from_str::<Fleet>(&json).unwrap(), with);

        // A member that predates runbooks reads the manifests and finds
        // bytes after them, so it refuses the bundle.
        #[derive(Deserialize)]
        struct Before {
            #[allow(dead_code)]
            manifests: Vec<Manifest>,
        }
        let (_, rest) = postcard::take_from_bytes::<Before>(&bytes).unwrap();
        assert!(!rest.is_empty());

        // Runbooks that do not decode are an error, not none; so is an
        // empty list after the manifests (one fleet, one encoding).
        let cut = &bytes[..bytes.len() - 3];
        assert!(postcard::from_bytes::<Fleet>(cut).is_err());
        let mut padded = postcard::to_stdvec(&plain).unwrap();
        padded.push(0);
        assert!(postcard::from_bytes::<Fleet>(&padded).is_err());

        // A decoded fleet's runbooks are checked.
        let mut bad = with.clone();
        bad.runbooks[0].runbooks[0].runbook.max_per_site = 0;
        let decoded: Fleet = postcard::from_bytes(&postcard::to_stdvec(&bad).unwrap()).unwrap();
        assert!(
            matches!(decoded.validate().unwrap_err(), FleetError::Invalid { item, problem: Problem::Runbook(_), .. } if item == "runbook[0] clean")
        );
        assert!(Fleet::from_parts(bad.manifests.clone(), bad.runbooks.clone()).is_err());
        assert_eq!(
            Fleet::from_parts(with.manifests.clone(), with.runbooks.clone()).unwrap(),
            with
        );
    }

    #[test]
    fn plan_lists_runbooks_added_changed_and_removed_per_node_and_scope() {
        let old = Dir::new();
        old.write(
            "base.toml",
            [
                file("/etc/motd", "hi", r#""all""#),
                runbook("clean", "rm -rf /tmp/x", r#""all""#),
                runbook("gone", "true", r#"{ region = "eu", site = "s1" }"#),
            ]
            .concat(),
        );
        let new = Dir::new();
        new.write(
            "base.toml",
            [
                file("/etc/motd", "hi", r#""all""#),
                runbook("clean", "rm -rf /tmp/x", r#""all""#),
                "[[runbook]]\nname = \"clean\"\ncheck = \"disk\"\nrun = \"rm -rf /tmp/y\"\nmax_per_site = 2\nselector = { region = \"eu\", site = \"s2\" }\n\n".to_string(),
                runbook("web", "systemctl restart web", r#"{ labels = { role = "web" } }"#),
            ]
            .concat(),
        );
        let (old, new) = (old.load().unwrap(), new.load().unwrap());
        let nodes = [
            node("a1", "eu", "s1", &[]),                // loses gone
            node("b1", "eu", "s2", &[]),                // clean changes
            node("c1", "us", "s9", &[]),                // unchanged
            node("c2", "us", "s9", &[("role", "web")]), // gains web
        ];
        let p = plan(Some(&old), &new, &nodes);
        assert_eq!((p.nodes, p.changing, p.failing), (4, 3, 0));
        let change = |name: &str| {
            p.sites
                .iter()
                .flat_map(|s| &s.groups)
                .find(|g| g.nodes == [name])
                .map(|g| g.change.clone())
                .unwrap_or_else(|| panic!("no group {name} in {p:#?}"))
        };
        let only =
            |added: &[&str], changed: Vec<RunbookChange>, removed: &[&str]| NodeChange::Changes {
                added: vec![],
                changed: vec![],
                removed: vec![],
                previous_error: None,
                runbooks_added: added.iter().map(|s| s.to_string()).collect(),
                runbooks_changed: changed,
                runbooks_removed: removed.iter().map(|s| s.to_string()).collect(),
            };
        assert_eq!(change("a1"), only(&[], vec![], &["gone"]));
        assert_eq!(
            change("b1"),
            only(
                &[],
                vec![RunbookChange {
                    name: "clean".into(),
                    fields: vec!["run".into(), "max_per_site".into()],
                }],
                &[]
            )
        );
        assert_eq!(change("c2"), only(&["web"], vec![], &[]));
        let scopes: Vec<_> = p
            .scopes
            .iter()
            .map(|s| {
                (
                    s.selector.to_string(),
                    s.paths.len(),
                    s.runbooks.clone(),
                    s.nodes,
                )
            })
            .collect();
        assert_eq!(
            scopes,
            [
                (
                    "region=eu site=s1".to_string(),
                    0,
                    vec!["gone".to_string()],
                    1
                ),
                (
                    "region=eu site=s2".to_string(),
                    0,
                    vec!["clean".to_string()],
                    1
                ),
                ("label:role=web".to_string(), 0, vec!["web".to_string()], 1),
            ]
        );
        let text = p.to_string();
        for line in [
            "3 of 4 nodes change, 0 cannot be resolved",
            "    - runbook gone (no longer runs here)",
            "    ~ runbook clean (run, max_per_site)",
            "    + runbook web",
            "  region=eu site=s2 [site]: runbook clean (1 nodes)",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        let json = serde_json::to_value(&p).unwrap();
        let groups = json["sites"].as_array().unwrap();
        assert!(
            groups
                .iter()
                .any(|s| s["groups"][0]["change"]["runbooks_removed"][0] == "gone")
        );
        assert!(plan(Some(&new), &new, &nodes).is_empty());

        // Without runbook changes the JSON has no runbook keys at all.
        let files_only = Dir::new();
        files_only.write("base.toml", file("/etc/motd", "hi", r#""all""#));
        let p = plan(None, &files_only.load().unwrap(), &nodes[..1]);
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("runbook"), "{json}");
    }

    #[test]
    fn template_parsing_never_panics_on_any_text() {
        for text in [
            "{{",
            "{{\"",
            "{{\"x\"",
            "{{\"x\" }",
            "}}{{}}",
            "{{ }}",
            "{{label.}}",
            "é{{é}}",
        ] {
            let _ = parse_template(text);
        }
        assert_eq!(
            parse_template("a{{\"}}\"}}b").unwrap(),
            [Piece::Text("a"), Piece::Text("}}"), Piece::Text("b")]
        );
    }
}
