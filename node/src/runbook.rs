//! Remediation runbooks: when a check stays bad, run an action on the node
//! itself, within rails. Pure: the node's runbook task feeds [`Engine`] the
//! checks, the relay's lease answers and the actions' outcomes, and does
//! the [`Step`]s it returns; the relay keeps the site's [`Leases`].
//!
//! # A rule
//! `[[runbook]]` in the fleet's configuration (a [`Runbook`], chosen per
//! node by selector like a file): when check `check` has been at least
//! `when` (critical) for `after`, run `run` (a shell command) once, then
//! wait up to `verify` for the check to recover.
//!
//! # Rails
//! - **At most `max_per_site` nodes of a site remediate a rule at once.**
//!   Before it runs, a node takes a lease from its site's relay, which
//!   grants at most that many per rule ([`Leases`]); the lease covers the
//!   run and its verification and is given back after, or expires. The
//!   relay is inside the site, so this holds while the WAN is cut; a node
//!   that cannot reach its relay does not run (blocked, and says so).
//! - **At most one run per `min_interval` on a node** (dry runs included).
//! - **A circuit breaker**: `breaker_failures` failed runs (the action
//!   failed, timed out, or the check did not recover within `verify`)
//!   within `breaker_window` open it, and the rule stops on that node. The
//!   rule's check turns critical, which opens an incident at the hub. It
//!   closes once the watched check has passed for `breaker_window`, or when
//!   the rule's definition changes.
//! - **Dry run**: everything but the action, which is recorded as "would
//!   run".
//!
//! The rate limit and the breaker survive a restart: the task saves
//! [`Engine::states`] and gives them back with [`Engine::restore`].
//!
//! # What it says
//! Every run (and every dry run, and the first refusal of each episode) is
//! a [`RunRecord`], kept in the node's audit file with the action's
//! output. The rule's state is published as the check `runbook:NAME`
//! (after its first run): passing after a run that fixed the check,
//! warning while remediating, after a failed run or when blocked, critical
//! while its breaker is open. Its detail starts with what happened
//! (`ran:`, `running:`, `failed:`, `blocked:`, `dry-run:`, `tripped:`,
//! `reset:`), which the hub notes in its audit log as `runbook.WORD`.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::site::{CheckResult, Status};

/// Prefix of the check a rule publishes.
pub const CHECK_PREFIX: &str = "runbook:";
/// Longest a lease is held, whatever a rule asks.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// After the relay said no, a node asks again after this long.
pub const LEASE_RETRY: Duration = Duration::from_secs(10);
/// A lease covers the run and its verification, and this much more.
pub const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// Output kept of an action, in a record.
pub const OUTPUT_LIMIT: usize = 4096;

fn critical() -> Status {
    Status::Critical
}
fn one_minute() -> Duration {
    Duration::from_secs(60)
}
fn two_minutes() -> Duration {
    Duration::from_secs(120)
}
fn ten_minutes() -> Duration {
    Duration::from_secs(600)
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// One remediation rule, as a node holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    /// A name (lowercase letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The check watched (a user check, `disk`, `memory`, or a finding
    /// such as `forecast:disk:/var`).
    pub check: String,
    /// The check's status that calls for the action: `critical`, or
    /// `warning` (warning or critical).
    #[serde(default = "critical")]
    pub when: Status,
    /// How long the check must hold that status first.
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub after: Duration,
    /// The action: a shell command (`sh -c`), run from `/`.
    pub run: String,
    /// The action is killed after this long (a failure).
    #[serde(default = "one_minute", with = "humantime_serde")]
    pub timeout: Duration,
    /// After the action, how long the check has to recover; it not
    /// recovering is a failure.
    #[serde(default = "two_minutes", with = "humantime_serde")]
    pub verify: Duration,
    /// Nodes of one site running this rule at once, at most.
    #[serde(default = "one")]
    pub max_per_site: u32,
    /// Runs of this rule on one node: at most one per this long.
    #[serde(default = "ten_minutes", with = "humantime_serde")]
    pub min_interval: Duration,
    /// Failed runs within `breaker_window` that stop the rule on a node.
    #[serde(default = "three")]
    pub breaker_failures: u32,
    #[serde(default = "one_hour", with = "humantime_serde")]
    pub breaker_window: Duration,
    /// Record what would run, run nothing.
    #[serde(default)]
    pub dry_run: bool,
}

impl Runbook {
    /// What is wrong with this rule, if anything.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if crate::id::validate_name("runbook name", &self.name).is_err() {
            out.push(format!(
                "runbook name {:?} must be lowercase letters, digits, '-', '_' or '.'",
                self.name
            ));
        }
        if self.check.is_empty() || self.check.starts_with(CHECK_PREFIX) {
            out.push(format!(
                "runbook {}: `check` must name a check other than a runbook's",
                self.name
            ));
        }
        if !matches!(self.when, Status::Warning | Status::Critical) {
            out.push(format!(
                "runbook {}: `when` must be \"warning\" or \"critical\"",
                self.name
            ));
        }
        if self.run.trim().is_empty() {
            out.push(format!("runbook {}: `run` is empty", self.name));
        }
        if self.max_per_site == 0 {
            out.push(format!(
                "runbook {}: `max_per_site` must be at least 1",
                self.name
            ));
        }
        if self.breaker_failures == 0 {
            out.push(format!(
                "runbook {}: `breaker_failures` must be at least 1",
                self.name
            ));
        }
        if self.timeout.is_zero() || self.timeout + self.verify > MAX_LEASE {
            out.push(format!(
                "runbook {}: `timeout` must be more than 0 and `timeout` + `verify` at most {}",
                self.name,
                humantime::format_duration(MAX_LEASE)
            ));
        }
        out
    }

    /// How long a lease for one run lasts.
    pub fn lease_ttl(&self) -> Duration {
        (self.timeout + self.verify + LEASE_MARGIN).min(MAX_LEASE)
    }

    fn triggered_by(&self, status: Status) -> bool {
        match self.when {
            Status::Warning => matches!(status, Status::Warning | Status::Critical),
            _ => status == Status::Critical,
        }
    }
}

/// What the runbook task is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Ask the site's relay for a lease on `rule` (at most `max` holders,
    /// for `ttl`); answer with [`Engine::leased`].
    AskLease {
        rule: String,
        max: u32,
        ttl: Duration,
    },
    /// Run the action (`check`: the check it is for); answer with
    /// [`Engine::ran`].
    Run {
        rule: String,
        check: String,
        command: String,
        timeout: Duration,
    },
    /// Give the lease back.
    Release { rule: String },
}

/// How a run ended, as [`Engine::ran`] is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub output: String,
    pub duration_ms: u64,
}

impl ActionOutcome {
    fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    fn summary(&self) -> String {
        let how = if self.timed_out {
            format!("timed out after {} ms", self.duration_ms)
        } else {
            match self.exit_code {
                Some(c) => format!("exit {c} in {} ms", self.duration_ms),
                None => format!("killed or not started after {} ms", self.duration_ms),
            }
        };
        match last_line(&self.output) {
            Some(l) => format!("{how}: {l}"),
            None => how,
        }
    }
}

fn last_line(output: &str) -> Option<&str> {
    output.lines().map(str::trim).rfind(|l| !l.is_empty())
}

/// What became of one run, or of a run that did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunResult {
    /// The action succeeded and the check recovered.
    Fixed,
    /// The action failed or timed out.
    Failed,
    /// The action succeeded but the check did not recover in time.
    NotRecovered,
    /// Dry run: it would have run.
    WouldRun,
    /// The rails stopped it (site limit, rate limit, no relay).
    Blocked,
    /// Its breaker opened.
    Tripped,
    /// Its breaker closed.
    Reset,
}

/// One line of the node's runbook audit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub rule: String,
    /// Wall clock, ms since the epoch.
    pub at_ms: u64,
    pub result: RunResult,
    /// The run's number on this node (0 for what did not run).
    pub run: u64,
    pub command: String,
    pub dry_run: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ActionOutcome>,
    /// Why, in words.
    pub note: String,
}

/// What a node keeps of a rule across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleState {
    /// Its definition, to reset the breaker when it changes.
    pub definition: Option<Runbook>,
    pub runs: u64,
    pub last_run_ms: Option<u64>,
    /// When recent runs failed.
    pub failures: VecDeque<u64>,
    /// Since when the breaker is open.
    pub breaker_open_ms: Option<u64>,
    /// Refusals by the rails, in all.
    pub blocked: u64,
    /// What it publishes (`runbook:NAME`), once it acted.
    pub check: Option<CheckResult>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Asked at, waiting for the answer.
    Leasing,
    Running {
        started_ms: u64,
    },
    Verifying {
        until_ms: u64,
        outcome: ActionOutcome,
    },
}

#[derive(Debug, Clone)]
struct Rule {
    def: Runbook,
    state: RuleState,
    phase: Phase,
    /// Since when the watched check has called for the action.
    bad_since: Option<u64>,
    /// Since when it has not (for the breaker to close).
    good_since: Option<u64>,
    /// No lease asked before this (after a refusal).
    retry_at: u64,
    /// The refusal of this episode was recorded.
    refusal_noted: bool,
}

/// A node's runbooks.
#[derive(Debug, Default)]
pub struct Engine {
    rules: BTreeMap<String, Rule>,
    records: Vec<RunRecord>,
    changed: bool,
}

impl Engine {
    pub fn new() -> Self {
        Engine::default()
    }

    /// Gives back the states saved before a restart.
    pub fn restore(&mut self, states: BTreeMap<String, RuleState>) {
        for (name, state) in states {
            match self.rules.get_mut(&name) {
                Some(r) => {
                    let same = state.definition.as_ref() == Some(&r.def);
                    r.state = state;
                    if !same {
                        r.state.definition = Some(r.def.clone());
                        r.state.breaker_open_ms = None;
                        r.state.failures.clear();
                    }
                }
                None => {
                    // Not (yet) a rule: kept, inert, so that the rule set
                    // later finds its history.
                    self.rules
                        .insert(name.clone(), Rule::new(placeholder(&name), state));
                }
            }
        }
    }

    /// The rules that apply to this node now. A rule whose definition
    /// changed starts with its breaker closed; one no longer defined is
    /// dropped (a lease it holds is given back).
    pub fn set_rules(&mut self, rules: Vec<Runbook>) -> Vec<Step> {
        let mut steps = Vec::new();
        let mut next = BTreeMap::new();
        for def in rules {
            let rule = match self.rules.remove(&def.name) {
                Some(mut r) => {
                    if r.state.definition.as_ref() != Some(&def) {
                        if r.state.breaker_open_ms.is_some() {
                            r.state.breaker_open_ms = None;
                            r.state.failures.clear();
                        }
                        r.state.definition = Some(def.clone());
                        self.changed = true;
                    }
                    r.def = def;
                    r
                }
                None => {
                    self.changed = true;
                    Rule::new(
                        def.clone(),
                        RuleState {
                            definition: Some(def),
                            ..RuleState::default()
                        },
                    )
                }
            };
            next.insert(rule.def.name.clone(), rule);
        }
        for (name, old) in std::mem::take(&mut self.rules) {
            if matches!(
                old.phase,
                Phase::Leasing | Phase::Running { .. } | Phase::Verifying { .. }
            ) {
                steps.push(Step::Release { rule: name });
            }
            self.changed = true;
        }
        self.rules = next;
        steps
    }

    /// The node's checks at `now_ms`: starts, verifies and closes what they
    /// call for.
    pub fn observe(&mut self, now_ms: u64, checks: &BTreeMap<String, CheckResult>) -> Vec<Step> {
        let mut steps = Vec::new();
        for r in self.rules.values_mut() {
            let status = checks.get(&r.def.check).map(|c| c.status);
            let bad = status.is_some_and(|s| r.def.triggered_by(s));
            if bad {
                r.bad_since.get_or_insert(now_ms);
                r.good_since = None;
            } else {
                r.bad_since = None;
                r.refusal_noted = false;
                if status.is_some() {
                    r.good_since.get_or_insert(now_ms);
                }
            }
            let mut changed = false;
            if r.def.check.is_empty() {
                // Restored, not configured (yet).
                continue;
            }
            match r.phase.clone() {
                Phase::Verifying { until_ms, outcome } => {
                    if !bad && status.is_some() {
                        let note = format!(
                            "ran: run {} fixed {} ({})",
                            r.state.runs,
                            r.def.check,
                            outcome.summary()
                        );
                        r.finish(
                            now_ms,
                            RunResult::Fixed,
                            Some(outcome),
                            note,
                            Status::Passing,
                            &mut self.records,
                        );
                        steps.push(Step::Release {
                            rule: r.def.name.clone(),
                        });
                        changed = true;
                    } else if now_ms >= until_ms {
                        let note = format!(
                            "failed: run {}: {} still {} {} after the action ({})",
                            r.state.runs,
                            r.def.check,
                            status.map_or("unknown".to_owned(), |s| s.to_string()),
                            humantime::format_duration(r.def.verify),
                            outcome.summary()
                        );
                        r.fail(
                            now_ms,
                            RunResult::NotRecovered,
                            Some(outcome),
                            note,
                            &mut self.records,
                        );
                        steps.push(Step::Release {
                            rule: r.def.name.clone(),
                        });
                        changed = true;
                    }
                }
                Phase::Idle => {
                    changed |= r.maybe_reset(now_ms, &mut self.records);
                    if let Some(step) = r.maybe_start(now_ms, &mut self.records) {
                        steps.push(step);
                        changed = true;
                    }
                }
                Phase::Leasing | Phase::Running { .. } => {}
            }
            self.changed |= changed;
        }
        self.changed |= !self.records.is_empty();
        steps
    }

    /// The relay's answer to [`Step::AskLease`]: `Ok` granted, `Err` why
    /// not (the site's limit, no relay).
    pub fn leased(&mut self, now_ms: u64, rule: &str, answer: Result<(), String>) -> Vec<Step> {
        let Some(r) = self.rules.get_mut(rule) else {
            return match answer {
                Ok(()) => vec![Step::Release {
                    rule: rule.to_owned(),
                }],
                Err(_) => Vec::new(),
            };
        };
        if r.phase != Phase::Leasing {
            return match answer {
                Ok(()) => vec![Step::Release {
                    rule: rule.to_owned(),
                }],
                Err(_) => Vec::new(),
            };
        }
        self.changed = true;
        match answer {
            Ok(()) if r.bad_since.is_some() => {
                r.state.runs += 1;
                r.state.last_run_ms = Some(now_ms);
                r.phase = Phase::Running { started_ms: now_ms };
                r.publish(
                    Status::Warning,
                    format!("running: run {}: {}", r.state.runs, r.def.run),
                );
                vec![Step::Run {
                    rule: rule.to_owned(),
                    check: r.def.check.clone(),
                    command: r.def.run.clone(),
                    timeout: r.def.timeout,
                }]
            }
            // Recovered by itself meanwhile.
            Ok(()) => {
                r.phase = Phase::Idle;
                vec![Step::Release {
                    rule: rule.to_owned(),
                }]
            }
            Err(why) => {
                r.phase = Phase::Idle;
                r.retry_at = now_ms + LEASE_RETRY.as_millis() as u64;
                r.refuse(now_ms, format!("blocked: {why}"), true, &mut self.records);
                Vec::new()
            }
        }
    }

    /// The action of `rule` ended.
    pub fn ran(&mut self, now_ms: u64, rule: &str, outcome: ActionOutcome) -> Vec<Step> {
        let Some(r) = self.rules.get_mut(rule) else {
            return vec![Step::Release {
                rule: rule.to_owned(),
            }];
        };
        if !matches!(r.phase, Phase::Running { .. }) {
            return Vec::new();
        }
        self.changed = true;
        let mut outcome = outcome;
        if outcome.output.len() > OUTPUT_LIMIT {
            let mut cut = outcome.output.len() - OUTPUT_LIMIT;
            while !outcome.output.is_char_boundary(cut) {
                cut += 1;
            }
            outcome.output = outcome.output[cut..].to_owned();
        }
        if outcome.succeeded() {
            r.phase = Phase::Verifying {
                until_ms: now_ms + r.def.verify.as_millis() as u64,
                outcome,
            };
            Vec::new()
        } else {
            let note = format!("failed: run {}: {}", r.state.runs, outcome.summary());
            r.fail(
                now_ms,
                RunResult::Failed,
                Some(outcome),
                note,
                &mut self.records,
            );
            vec![Step::Release {
                rule: rule.to_owned(),
            }]
        }
    }

    /// The checks to publish: `runbook:NAME` of each rule that acted.
    pub fn checks(&self) -> BTreeMap<String, CheckResult> {
        self.rules
            .values()
            .filter_map(|r| {
                r.state
                    .check
                    .clone()
                    .map(|c| (format!("{CHECK_PREFIX}{}", r.def.name), c))
            })
            .collect()
    }

    /// Records made since the last call, for the audit file.
    pub fn take_records(&mut self) -> Vec<RunRecord> {
        std::mem::take(&mut self.records)
    }

    /// Whether the states changed since the last call (to save them).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The states to save.
    pub fn states(&self) -> BTreeMap<String, RuleState> {
        self.rules
            .iter()
            .map(|(n, r)| (n.clone(), r.state.clone()))
            .collect()
    }

    /// Rules remediating now (leasing, running or verifying).
    pub fn active(&self) -> usize {
        self.rules
            .values()
            .filter(|r| r.phase != Phase::Idle)
            .count()
    }

    /// The rules, by name.
    pub fn rules(&self) -> impl Iterator<Item = &Runbook> {
        self.rules.values().map(|r| &r.def)
    }
}

/// A rule kept only for its saved state, until the configuration says
/// what it is: it never triggers.
fn placeholder(name: &str) -> Runbook {
    Runbook {
        name: name.to_owned(),
        check: String::new(),
        when: Status::Critical,
        after: Duration::MAX,
        run: String::new(),
        timeout: Duration::from_secs(1),
        verify: Duration::ZERO,
        max_per_site: 1,
        min_interval: Duration::MAX,
        breaker_failures: 1,
        breaker_window: Duration::ZERO,
        dry_run: true,
    }
}

impl Rule {
    fn new(def: Runbook, state: RuleState) -> Self {
        Rule {
            def,
            state,
            phase: Phase::Idle,
            bad_since: None,
            good_since: None,
            retry_at: 0,
            refusal_noted: false,
        }
    }

    fn publish(&mut self, status: Status, detail: String) {
        self.state.check = Some(CheckResult::new(status, detail));
    }

    fn record(
        &self,
        now_ms: u64,
        result: RunResult,
        outcome: Option<ActionOutcome>,
        note: String,
        records: &mut Vec<RunRecord>,
    ) {
        records.push(RunRecord {
            rule: self.def.name.clone(),
            at_ms: now_ms,
            result,
            run: match result {
                RunResult::Fixed | RunResult::Failed | RunResult::NotRecovered => self.state.runs,
                _ => 0,
            },
            command: self.def.run.clone(),
            dry_run: self.def.dry_run,
            outcome,
            note,
        });
    }

    fn finish(
        &mut self,
        now_ms: u64,
        result: RunResult,
        outcome: Option<ActionOutcome>,
        note: String,
        status: Status,
        records: &mut Vec<RunRecord>,
    ) {
        self.phase = Phase::Idle;
        // What follows in this episode (the rate limit) is not news.
        self.refusal_noted = self.bad_since.is_some();
        self.publish(status, note.clone());
        self.record(now_ms, result, outcome, note, records);
    }

    /// A failed run: counts towards the breaker, which may open.
    fn fail(
        &mut self,
        now_ms: u64,
        result: RunResult,
        outcome: Option<ActionOutcome>,
        note: String,
        records: &mut Vec<RunRecord>,
    ) {
        self.finish(
            now_ms,
            result,
            outcome,
            note.clone(),
            Status::Warning,
            records,
        );
        let window = self.def.breaker_window.as_millis() as u64;
        self.state.failures.push_back(now_ms);
        while self
            .state
            .failures
            .front()
            .is_some_and(|t| now_ms.saturating_sub(*t) > window)
        {
            self.state.failures.pop_front();
        }
        if self.state.failures.len() >= self.def.breaker_failures as usize {
            self.state.breaker_open_ms = Some(now_ms);
            let tripped = format!(
                "tripped: {} failed runs within {}, the last {}; stopped on this node until {} passes for {}",
                self.state.failures.len(),
                humantime::format_duration(self.def.breaker_window),
                note.trim_start_matches("failed: "),
                self.def.check,
                humantime::format_duration(self.def.breaker_window),
            );
            self.publish(Status::Critical, tripped.clone());
            self.record(now_ms, RunResult::Tripped, None, tripped, records);
        }
    }

    /// A refusal by the rails: recorded once per episode, and published
    /// when `publish` (the site's limit; not the node's own rate limit,
    /// whose refusal would hide what the last run said).
    fn refuse(&mut self, now_ms: u64, note: String, publish: bool, records: &mut Vec<RunRecord>) {
        self.state.blocked += 1;
        if !self.refusal_noted {
            self.refusal_noted = true;
            if publish && self.state.breaker_open_ms.is_none() {
                self.publish(Status::Warning, note.clone());
            }
            self.record(now_ms, RunResult::Blocked, None, note, records);
        }
    }

    /// Closes the breaker once the check passed for the breaker's window.
    fn maybe_reset(&mut self, now_ms: u64, records: &mut Vec<RunRecord>) -> bool {
        let (Some(_), Some(good)) = (self.state.breaker_open_ms, self.good_since) else {
            return false;
        };
        if now_ms.saturating_sub(good) < self.def.breaker_window.as_millis() as u64 {
            return false;
        }
        self.state.breaker_open_ms = None;
        self.state.failures.clear();
        let note = format!(
            "reset: {} passed for {}; the rule runs again",
            self.def.check,
            humantime::format_duration(self.def.breaker_window)
        );
        self.publish(Status::Passing, note.clone());
        self.record(now_ms, RunResult::Reset, None, note, records);
        true
    }

    /// Starts a run (or a dry run) if the check calls for it and the node's
    /// own rails allow; the site's limit is the lease's.
    fn maybe_start(&mut self, now_ms: u64, records: &mut Vec<RunRecord>) -> Option<Step> {
        let since = self.bad_since?;
        if now_ms.saturating_sub(since) < self.def.after.as_millis() as u64 {
            return None;
        }
        if self.state.breaker_open_ms.is_some() {
            self.state.blocked += u64::from(!self.refusal_noted);
            self.refusal_noted = true;
            return None;
        }
        if let Some(last) = self.state.last_run_ms {
            let next = last.saturating_add(self.def.min_interval.as_millis() as u64);
            if now_ms < next && self.def.dry_run {
                return None;
            }
            if now_ms < next {
                self.refuse(
                    now_ms,
                    format!(
                        "blocked: ran {} ago; at most one run per {}",
                        humantime::format_duration(Duration::from_secs(
                            now_ms.saturating_sub(last) / 1000
                        )),
                        humantime::format_duration(self.def.min_interval)
                    ),
                    false,
                    records,
                );
                return None;
            }
        }
        if now_ms < self.retry_at {
            return None;
        }
        if self.def.dry_run {
            self.state.last_run_ms = Some(now_ms);
            let note = format!(
                "dry-run: {} {} for {}; would run: {}",
                self.def.check,
                self.def.when,
                humantime::format_duration(self.def.after),
                self.def.run
            );
            self.publish(Status::Passing, note.clone());
            self.record(now_ms, RunResult::WouldRun, None, note, records);
            return None;
        }
        self.phase = Phase::Leasing;
        Some(Step::AskLease {
            rule: self.def.name.clone(),
            max: self.def.max_per_site,
            ttl: self.def.lease_ttl(),
        })
    }
}

/// The leases of one site, kept by its relay: per rule, which nodes hold
/// one and until when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    /// rule → node → expiry (wall clock ms).
    held: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The relay's answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseAnswer {
    Granted {
        until_ms: u64,
    },
    /// The rule's limit is reached: who holds it.
    Busy {
        holders: Vec<String>,
        max: u32,
    },
}

impl Leases {
    /// `node` asks for a lease on `rule`, at most `max` holders, for `ttl`.
    /// A node that holds one already gets it renewed.
    pub fn ask(
        &mut self,
        now_ms: u64,
        rule: &str,
        node: &str,
        max: u32,
        ttl: Duration,
    ) -> LeaseAnswer {
        self.expire(now_ms);
        let holders = self.held.entry(rule.to_owned()).or_default();
        let until_ms = now_ms + ttl.min(MAX_LEASE).as_millis() as u64;
        if holders.contains_key(node) || holders.len() < max.max(1) as usize {
            holders.insert(node.to_owned(), until_ms);
            LeaseAnswer::Granted { until_ms }
        } else {
            LeaseAnswer::Busy {
                holders: holders.keys().cloned().collect(),
                max,
            }
        }
    }

    /// `node` gives its lease on `rule` back; whether it held one.
    pub fn release(&mut self, rule: &str, node: &str) -> bool {
        let Some(h) = self.held.get_mut(rule) else {
            return false;
        };
        let had = h.remove(node).is_some();
        if h.is_empty() {
            self.held.remove(rule);
        }
        had
    }

    /// Drops the leases past their expiry.
    pub fn expire(&mut self, now_ms: u64) {
        for h in self.held.values_mut() {
            h.retain(|_, until| *until > now_ms);
        }
        self.held.retain(|_, h| !h.is_empty());
    }

    /// Leases held, in all.
    pub fn held(&self) -> usize {
        self.held.values().map(BTreeMap::len).sum()
    }

    /// Holders of `rule`.
    pub fn holders(&self, rule: &str) -> Vec<String> {
        self.held
            .get(rule)
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> Runbook {
        Runbook {
            name: name.into(),
            check: "web".into(),
            when: Status::Critical,
            after: Duration::from_secs(60),
            run: "systemctl restart web".into(),
            timeout: Duration::from_secs(30),
            verify: Duration::from_secs(60),
            max_per_site: 1,
            min_interval: Duration::from_secs(600),
            breaker_failures: 2,
            breaker_window: Duration::from_secs(3600),
            dry_run: false,
        }
    }

    fn checks(status: Status) -> BTreeMap<String, CheckResult> {
        [("web".to_owned(), CheckResult::new(status, "x"))].into()
    }

    const S: u64 = 1000;

    fn ok() -> ActionOutcome {
        ActionOutcome {
            exit_code: Some(0),
            timed_out: false,
            output: "restarted\n".into(),
            duration_ms: 1200,
        }
    }

    fn failed() -> ActionOutcome {
        ActionOutcome {
            exit_code: Some(1),
            timed_out: false,
            output: "unit web.service not found\n".into(),
            duration_ms: 40,
        }
    }

    /// Runs one lease-and-action cycle from `t`: asks, is granted, runs
    /// with `outcome`.
    fn cycle(e: &mut Engine, t: u64, outcome: ActionOutcome) -> Vec<Step> {
        let steps = e.observe(t, &checks(Status::Critical));
        assert!(
            matches!(steps.as_slice(), [Step::AskLease { .. }]),
            "{steps:?}"
        );
        let steps = e.leased(t, "restart-web", Ok(()));
        assert!(matches!(steps.as_slice(), [Step::Run { .. }]), "{steps:?}");
        e.ran(t + 2 * S, "restart-web", outcome)
    }

    #[test]
    fn a_check_bad_for_long_enough_runs_the_action_and_its_recovery_is_recorded() {
        let mut e = Engine::new();
        e.set_rules(vec![rule("restart-web")]);
        assert!(e.observe(0, &checks(Status::Critical)).is_empty());
        assert!(
            e.observe(30 * S, &checks(Status::Critical)).is_empty(),
            "not before `after`"
        );
        // A warning does not call for a rule `when = critical`.
        let mut w = Engine::new();
        w.set_rules(vec![rule("restart-web")]);
        assert!(w.observe(0, &checks(Status::Warning)).is_empty());
        assert!(w.observe(120 * S, &checks(Status::Warning)).is_empty());

        assert!(cycle(&mut e, 60 * S, ok()).is_empty());
        assert_eq!(e.checks()["runbook:restart-web"].status, Status::Warning);
        // The check recovers: fixed, lease given back.
        let steps = e.observe(70 * S, &checks(Status::Passing));
        assert_eq!(
            steps,
            vec![Step::Release {
                rule: "restart-web".into()
            }]
        );
        let c = &e.checks()["runbook:restart-web"];
        assert_eq!(c.status, Status::Passing);
        assert!(c.detail.starts_with("ran: run 1 fixed web"), "{}", c.detail);
        let records = e.take_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].result, RunResult::Fixed);
        assert_eq!(records[0].outcome.as_ref().unwrap().output, "restarted\n");
    }

    #[test]
    fn at_most_one_run_per_min_interval() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        e.set_rules(vec![r]);
        cycle(&mut e, 0, ok());
        e.observe(5 * S, &checks(Status::Passing));
        e.take_records();
        // Bad again a minute later: blocked by the rate limit, once.
        assert!(e.observe(60 * S, &checks(Status::Critical)).is_empty());
        assert!(e.observe(62 * S, &checks(Status::Critical)).is_empty());
        let records = e.take_records();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].result, RunResult::Blocked);
        // The published check still says what the last run did.
        assert!(e.checks()["runbook:restart-web"].detail.starts_with("ran:"));
        // Ten minutes after the run: it runs again.
        let steps = e.observe(600 * S, &checks(Status::Critical));
        assert!(matches!(steps.as_slice(), [Step::AskLease { .. }]));
    }

    #[test]
    fn failures_within_the_window_trip_the_breaker_which_closes_after_the_check_passed_a_window() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        r.min_interval = Duration::from_secs(60);
        e.set_rules(vec![r]);
        let steps = cycle(&mut e, 0, failed());
        assert_eq!(
            steps,
            vec![Step::Release {
                rule: "restart-web".into()
            }]
        );
        let c = &e.checks()["runbook:restart-web"];
        assert_eq!(c.status, Status::Warning);
        assert!(c.detail.contains("exit 1"), "{}", c.detail);
        // Second run: succeeds, but the check does not recover in `verify`.
        cycle(&mut e, 60 * S, ok());
        assert!(e.observe(100 * S, &checks(Status::Critical)).is_empty());
        let steps = e.observe(125 * S, &checks(Status::Critical));
        assert_eq!(
            steps,
            vec![Step::Release {
                rule: "restart-web".into()
            }]
        );
        let c = &e.checks()["runbook:restart-web"];
        assert_eq!(c.status, Status::Critical, "{c:?}");
        assert!(
            c.detail.starts_with("tripped: 2 failed runs"),
            "{}",
            c.detail
        );
        let results: Vec<RunResult> = e.take_records().iter().map(|r| r.result).collect();
        assert_eq!(
            results,
            vec![
                RunResult::Failed,
                RunResult::NotRecovered,
                RunResult::Tripped
            ]
        );
        // Open: nothing runs however long the check stays bad.
        assert!(e.observe(3600 * S, &checks(Status::Critical)).is_empty());
        // It passes for the window: the breaker closes.
        e.observe(4000 * S, &checks(Status::Passing));
        assert!(e.observe(7600 * S, &checks(Status::Passing)).is_empty());
        assert_eq!(e.checks()["runbook:restart-web"].status, Status::Passing);
        assert_eq!(e.take_records().last().unwrap().result, RunResult::Reset);
        let steps = e.observe(7700 * S, &checks(Status::Critical));
        assert!(matches!(steps.as_slice(), [Step::AskLease { .. }]));
    }

    #[test]
    fn a_refused_lease_blocks_and_is_asked_again_later() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        e.set_rules(vec![r]);
        assert!(matches!(
            e.observe(0, &checks(Status::Critical)).as_slice(),
            [Step::AskLease { max: 1, .. }]
        ));
        assert!(
            e.leased(0, "restart-web", Err("1 of 1 running: n2".into()))
                .is_empty()
        );
        let c = &e.checks()["runbook:restart-web"];
        assert_eq!(c.status, Status::Warning);
        assert_eq!(c.detail, "blocked: 1 of 1 running: n2");
        assert!(e.observe(5 * S, &checks(Status::Critical)).is_empty());
        assert!(matches!(
            e.observe(10 * S, &checks(Status::Critical)).as_slice(),
            [Step::AskLease { .. }]
        ));
        // Refused again: not recorded twice in one episode.
        e.leased(10 * S, "restart-web", Err("busy".into()));
        assert_eq!(e.take_records().len(), 1);
    }

    #[test]
    fn a_dry_run_records_what_would_run_and_runs_nothing() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        r.dry_run = true;
        e.set_rules(vec![r]);
        assert!(e.observe(0, &checks(Status::Critical)).is_empty());
        assert!(e.observe(5 * S, &checks(Status::Critical)).is_empty());
        let records = e.take_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].result, RunResult::WouldRun);
        assert!(records[0].dry_run);
        let c = &e.checks()["runbook:restart-web"];
        assert!(
            c.detail.starts_with("dry-run: web critical"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn the_rate_limit_and_breaker_survive_a_restart_and_a_changed_rule_starts_afresh() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        r.breaker_failures = 1;
        e.set_rules(vec![r.clone()]);
        cycle(&mut e, 0, failed());
        assert_eq!(e.checks()["runbook:restart-web"].status, Status::Critical);
        let saved = e.states();

        // Restored before the configuration is known: inert.
        let mut again = Engine::new();
        again.restore(saved.clone());
        assert!(
            again
                .observe(5000 * S, &checks(Status::Critical))
                .is_empty()
        );
        again.set_rules(vec![r.clone()]);
        assert!(
            again
                .observe(5000 * S, &checks(Status::Critical))
                .is_empty()
        );
        assert_eq!(
            again.checks()["runbook:restart-web"].status,
            Status::Critical
        );

        // The rule was changed: its breaker starts closed.
        let mut changed = Engine::new();
        changed.restore(saved);
        let mut r2 = r;
        r2.run = "systemctl restart web2".into();
        changed.set_rules(vec![r2]);
        let steps = changed.observe(5000 * S, &checks(Status::Critical));
        assert!(matches!(steps.as_slice(), [Step::AskLease { .. }]));
    }

    #[test]
    fn a_rule_removed_while_it_runs_gives_its_lease_back() {
        let mut e = Engine::new();
        let mut r = rule("restart-web");
        r.after = Duration::ZERO;
        e.set_rules(vec![r]);
        e.observe(0, &checks(Status::Critical));
        e.leased(0, "restart-web", Ok(()));
        assert_eq!(
            e.set_rules(Vec::new()),
            vec![Step::Release {
                rule: "restart-web".into()
            }]
        );
        assert!(e.checks().is_empty());
        // A late answer to a rule gone: the lease goes back.
        assert_eq!(
            e.leased(1, "gone", Ok(())),
            vec![Step::Release {
                rule: "gone".into()
            }]
        );
    }

    #[test]
    fn a_site_grants_at_most_max_leases_per_rule_and_expired_ones_free_a_place() {
        let mut l = Leases::default();
        let ttl = Duration::from_secs(60);
        assert!(matches!(
            l.ask(0, "r", "a", 2, ttl),
            LeaseAnswer::Granted { .. }
        ));
        assert!(matches!(
            l.ask(0, "r", "b", 2, ttl),
            LeaseAnswer::Granted { .. }
        ));
        assert_eq!(
            l.ask(0, "r", "c", 2, ttl),
            LeaseAnswer::Busy {
                holders: vec!["a".into(), "b".into()],
                max: 2
            }
        );
        // Another rule has its own limit; a holder asking again renews.
        assert!(matches!(
            l.ask(0, "other", "c", 1, ttl),
            LeaseAnswer::Granted { .. }
        ));
        assert!(matches!(
            l.ask(30_000, "r", "a", 2, ttl),
            LeaseAnswer::Granted { .. }
        ));
        assert!(l.release("r", "b"));
        assert!(!l.release("r", "b"));
        assert!(matches!(
            l.ask(40_000, "r", "c", 2, ttl),
            LeaseAnswer::Granted { .. }
        ));
        // Past their expiry, leases free their places.
        assert_eq!(l.held(), 3);
        l.expire(95_000);
        assert_eq!(l.holders("r"), vec!["c".to_owned()]);
        assert_eq!(l.held(), 1);
    }

    #[test]
    fn rules_that_make_no_sense_are_refused() {
        let mut r = rule("Bad Name");
        r.max_per_site = 0;
        r.when = Status::Passing;
        r.run = " ".into();
        r.check = "runbook:x".into();
        let p = r.problems();
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(rule("ok").problems().is_empty());
    }
}
