//! Human-readable output of the CLI: the fleet as a tree, a site's nodes as
//! a table. Colour is optional so output to pipes and files stays plain.

use std::collections::BTreeMap;
use std::fmt::Write;

use trellis_node::site::Status;
use trellis_relay::summary::SiteStatus;

use crate::api::NodesReport;
use trellis_relay::report::{FleetReport, SiteRow};

/// A Unix time in milliseconds as RFC 3339, to the second (UTC).
pub fn when_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// Whether to colour output written to stdout: only on a terminal, and
/// never when `NO_COLOR` is set.
pub fn use_colour() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

struct Paint(bool);

impl Paint {
    fn code(&self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn site(&self, status: SiteStatus, text: &str) -> String {
        let code = match status {
            SiteStatus::Healthy => "32",
            SiteStatus::Degraded => "33",
            SiteStatus::Critical => "31;1",
            SiteStatus::Unreachable => "35",
            SiteStatus::Empty => "2",
        };
        self.code(code, text)
    }

    fn status(&self, status: Status, text: &str) -> String {
        let code = match status {
            Status::Passing => "32",
            Status::Unknown => "2",
            Status::Warning => "33",
            Status::Critical => "31;1",
        };
        self.code(code, text)
    }

    fn dim(&self, text: &str) -> String {
        self.code("2", text)
    }

    fn bold(&self, text: &str) -> String {
        self.code("1", text)
    }
}

fn plural(n: impl Into<u64>, word: &str) -> String {
    let n = n.into();
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn marker(status: SiteStatus) -> &'static str {
    match status {
        SiteStatus::Healthy => "●",
        SiteStatus::Degraded => "◐",
        SiteStatus::Critical => "✖",
        SiteStatus::Unreachable => "○",
        SiteStatus::Empty => "·",
    }
}

fn ago(secs: u64) -> String {
    if secs == u64::MAX || secs > 10 * 365 * 86400 {
        "never".into()
    } else if secs < 120 {
        format!("{secs}s ago")
    } else if secs < 7200 {
        format!("{}m ago", secs / 60)
    } else {
        format!("{}h ago", secs / 3600)
    }
}

fn site_line(p: &Paint, s: &SiteRow, name_width: usize, answering: &str) -> String {
    let mut line = format!(
        "  {} {:<name_width$}  {}  {:>11} alive  relay {}  heard {}",
        p.site(s.status, marker(s.status)),
        s.site,
        p.site(s.status, &format!("{:<8}", s.status.as_str())),
        format!("{}/{}", s.nodes_alive, s.nodes_total),
        s.relay,
        ago(s.last_seen_s),
    );
    if let Some(hub) = s.hub.as_deref().filter(|h| *h != answering) {
        let _ = write!(line, "  via {hub}");
    }
    if s.status == SiteStatus::Unreachable {
        let _ = write!(
            line,
            "  {}",
            p.site(s.status, "UNREACHABLE: last known state shown")
        );
    } else if !s.connected {
        let _ = write!(line, "  {}", p.dim("(relay disconnected)"));
    }
    if !s.dead.is_empty() {
        let more = s.nodes_dead as usize - s.dead.len().min(s.nodes_dead as usize);
        let mut dead = s.dead.join(", ");
        if more > 0 {
            let _ = write!(dead, " and {more} more");
        }
        let _ = write!(
            line,
            "\n      {} {dead}",
            p.site(SiteStatus::Critical, "dead:")
        );
    }
    if !s.failing_checks.is_empty() {
        let checks: Vec<String> = s
            .failing_checks
            .iter()
            .map(|(name, c)| format!("{name} ×{}", c.total()))
            .collect();
        let _ = write!(
            line,
            "\n      {} {}",
            p.site(SiteStatus::Degraded, "failing:"),
            checks.join(", ")
        );
    }
    if s.config.drifted_count > 0 {
        let more = s.config.drifted_count as usize - s.config.drifted.len();
        let mut names = s.config.drifted.join(", ");
        if more > 0 {
            let _ = write!(names, " and {more} more");
        }
        let _ = write!(
            line,
            "\n      {} {names}",
            p.site(SiteStatus::Degraded, "drifted:")
        );
    }
    line
}

/// The fleet as a tree: regions, then sites.
pub fn fleet(report: &FleetReport, colour: bool) -> String {
    let p = Paint(colour);
    let t = &report.totals;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} hub {}: {}, {}/{} nodes alive, {} dead",
        p.bold("Trellis fleet"),
        report.hub,
        plural(t.sites, "site"),
        t.nodes_alive,
        t.nodes_total,
        t.nodes_dead,
    );
    if let Some(r) = &report.relay {
        let uplink = match (&r.hub, r.uplink_connected) {
            (Some(hub), true) => p.site(SiteStatus::Healthy, &format!("uplink to {hub} connected")),
            _ => p.site(
                SiteStatus::Unreachable,
                "uplink DOWN: the site runs on its own",
            ),
        };
        let _ = writeln!(
            out,
            "  {uplink}; {} buffered ({} of {} bytes), acknowledged through seq {} of {}",
            plural(r.buffered_records, "record"),
            r.buffered_bytes,
            r.buffer_max_bytes,
            r.acked_through,
            r.persisted_through,
        );
    }
    if report.sites.is_empty() {
        let _ = writeln!(
            out,
            "  {}",
            p.dim("no site has reported yet (relays connect to the hub's uplink address)")
        );
        return out;
    }
    let width = report.sites.iter().map(|s| s.site.len()).max().unwrap_or(0);
    let mut regions: BTreeMap<&str, Vec<&SiteRow>> = BTreeMap::new();
    for s in &report.sites {
        regions.entry(&s.region).or_default().push(s);
    }
    for (region, sites) in regions {
        let alive: u32 = sites.iter().map(|s| s.nodes_alive).sum();
        let total: u32 = sites.iter().map(|s| s.nodes_total).sum();
        let _ = writeln!(
            out,
            "{} {}  {}",
            p.bold("region"),
            p.bold(region),
            p.dim(&format!(
                "{} sites, {alive}/{total} nodes alive",
                sites.len()
            ))
        );
        for s in sites {
            let _ = writeln!(out, "{}", site_line(&p, s, width, &report.hub));
        }
    }
    out
}

/// The federation's hubs as a table.
/// `trellis versions`: per site, each role's members by Trellis version.
pub fn versions(report: &crate::api::VersionsReport, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let _ = writeln!(out, "hub {} runs {}", report.hub, report.hub_version);
    let versions: std::collections::BTreeSet<&str> = report
        .sites
        .iter()
        .flat_map(|s| s.versions.values())
        .flat_map(|by| by.keys().map(String::as_str))
        .collect();
    if versions.len() > 1 {
        let list: Vec<&str> = versions.into_iter().collect();
        let _ = writeln!(
            out,
            "{}",
            p.site(
                SiteStatus::Degraded,
                &format!("mixed versions in the fleet: {}", list.join(", "))
            )
        );
    }
    for s in &report.sites {
        let name = format!("{}/{}", s.region, s.site);
        if !s.reachable {
            let why = s.error.as_deref().unwrap_or("no answer");
            let _ = writeln!(
                out,
                "{name}  {}",
                p.site(SiteStatus::Unreachable, &format!("unknown ({why})"))
            );
            continue;
        }
        let roles: Vec<String> = s
            .versions
            .iter()
            .map(|(role, by)| {
                let each: Vec<String> = by.iter().map(|(v, n)| format!("{n}× {v}")).collect();
                format!("{role} {}", each.join(", "))
            })
            .collect();
        let _ = writeln!(out, "{name}  {}", roles.join("; "));
    }
    out
}

pub fn hubs(report: &crate::federation::HubsReport, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let width = report
        .hubs
        .iter()
        .map(|h| h.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{}",
        p.dim(&format!(
            "{:<width$}  {:<7}  {:<6}  {:>5}  {:>7}  {:<8}  API",
            "HUB", "REGION", "STATE", "SITES", "LOG", "IN SYNC"
        ))
    );
    for h in &report.hubs {
        let state = if h.alive {
            p.site(SiteStatus::Healthy, "alive ")
        } else {
            p.site(SiteStatus::Critical, "DOWN  ")
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<7}  {}  {:>5}  {:>7}  {:<8}  {}{}",
            h.name,
            h.region,
            state,
            h.sites_served,
            h.log_entries,
            if h.in_sync { "yes" } else { "catching up" },
            h.api,
            if h.this { "  (this hub)" } else { "" }
        );
    }
    out
}

/// One line per record: when, where, what.
pub fn records(report: &crate::api::RecordsReport, colour: bool) -> String {
    use trellis_relay::uplink::{Event, RecordBody};
    let p = Paint(colour);
    let mut out = String::new();
    for r in &report.records {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.at_ms),
        );
        let what = match &r.body {
            RecordBody::Summary(s) => format!(
                "summary: {}/{} alive, {} dead, {}",
                s.nodes_alive,
                s.nodes_total,
                s.nodes_dead,
                s.status()
            ),
            RecordBody::Event(Event::NodeJoined { node }) => format!("{node} joined"),
            RecordBody::Event(Event::NodeDied { node }) => {
                p.site(SiteStatus::Critical, &format!("{node} died"))
            }
            RecordBody::Event(Event::NodeRecovered { node }) => {
                p.site(SiteStatus::Healthy, &format!("{node} recovered"))
            }
            RecordBody::Event(Event::NodeLeft { node }) => format!("{node} decommissioned, left"),
            RecordBody::Event(Event::NodeReaped { node, dead_for_s }) => format!(
                "{node} reaped: dead for {}",
                humantime::format_duration(std::time::Duration::from_secs(*dead_for_s))
            ),
            RecordBody::Event(Event::CheckChanged {
                node,
                check,
                from,
                to,
                detail,
            }) => {
                let text = if detail.is_empty() {
                    format!("{node}: check {check} {from} → {to}")
                } else {
                    format!("{node}: check {check} {from} → {to} ({detail})")
                };
                p.status(*to, &text)
            }
            RecordBody::Event(e @ Event::ConfigResult { result, .. }) => {
                let text = e.config_text().unwrap_or_default();
                match result.outcome {
                    trellis_node::distribute::Outcome::Ok => text,
                    _ => p.site(SiteStatus::Critical, &text),
                }
            }
            RecordBody::Event(e @ Event::ConfigDrift { .. }) => {
                p.site(SiteStatus::Degraded, &e.config_text().unwrap_or_default())
            }
            RecordBody::Event(e @ Event::PatchState { state, .. }) => {
                let text = e.patch_text().unwrap_or_default();
                if state.failed {
                    p.site(SiteStatus::Critical, &text)
                } else {
                    text
                }
            }
            RecordBody::Event(e @ Event::PatchSiteRolledBack { .. }) => {
                p.site(SiteStatus::Critical, &e.patch_text().unwrap_or_default())
            }
            RecordBody::Gap(g) => p.site(
                SiteStatus::Degraded,
                &format!(
                    "GAP: the relay dropped {} records (seq {}–{}): {} summaries downsampled, {} summaries and {} events dropped for lack of space{}",
                    g.dropped(),
                    r.seq,
                    r.until,
                    g.summaries_downsampled,
                    g.summaries_dropped,
                    g.events_dropped,
                    if g.acknowledged_before > 0 {
                        format!(", {} acknowledged earlier but lost by this hub", g.acknowledged_before)
                    } else {
                        String::new()
                    }
                ),
            ),
        };
        let _ = writeln!(out, "{when}  {}/{}  {}", r.region, r.site, what);
    }
    range_footer(
        &mut out,
        p,
        report.records.is_empty(),
        "nothing recorded in that range",
        report.truncated,
    );
    out
}

/// The end of a listing over a range: what an empty one means, and that
/// there is more than `--limit` showed.
fn range_footer(out: &mut String, p: Paint, empty: bool, nothing: &str, truncated: bool) {
    if empty {
        let _ = writeln!(out, "{}", p.dim(nothing));
    }
    if truncated {
        let _ = writeln!(
            out,
            "{}",
            p.dim("… more; narrow the range or raise --limit")
        );
    }
}

/// One line per log entry: when (the entry's clock), origin/seq, author,
/// what, and the start of its hash.
pub fn audit(report: &crate::api::AuditReport, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let origin_width = report
        .entries
        .iter()
        .map(|e| e.origin.len() + 1 + e.seq.to_string().len())
        .max()
        .unwrap_or(0);
    let author_width = report
        .entries
        .iter()
        .map(|e| e.author.len())
        .max()
        .unwrap_or(0);
    for e in &report.entries {
        let when = humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.hlc_ms),
        );
        let _ = writeln!(
            out,
            "{when}  {:<origin_width$}  {:<author_width$}  {}  {}",
            format!("{}/{}", e.origin, e.seq),
            e.author,
            e.op_text,
            p.dim(&format!("#{}", &e.hash[..e.hash.len().min(12)])),
        );
    }
    range_footer(
        &mut out,
        p,
        report.entries.is_empty(),
        "no log entries in that range",
        report.truncated,
    );
    out
}

/// `trellis config history`: a line per version, newest first.
pub fn config_history(report: &crate::api::ConfigHistory, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    if report.versions.is_empty() {
        out.push_str(
            "no configuration version stored yet: `trellis config apply DIR` stores the first\n",
        );
        return out;
    }
    let author_width = report
        .versions
        .iter()
        .map(|v| v.author.len())
        .max()
        .unwrap_or(0);
    for (i, v) in report.versions.iter().enumerate() {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(v.hlc.ms),
        );
        let _ = writeln!(
            out,
            "{}  {when}  {:<author_width$}  {}  {}{}",
            p.bold(&format!("v{:<4}", v.version)),
            v.author,
            p.dim(&format!(
                "{}/{} {}",
                v.origin,
                v.seq,
                &v.digest[..v.digest.len().min(12)]
            )),
            v.comment,
            if i == 0 {
                p.dim("  (newest)")
            } else {
                String::new()
            },
        );
    }
    out
}

/// `trellis config show VERSION`: who signed it and what each manifest
/// manages, for whom.
pub fn config_show(report: &crate::api::ConfigShow, colour: bool) -> String {
    let p = Paint(colour);
    let v = &report.version;
    let mut out = String::new();
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(report.created_ms),
    );
    let _ = writeln!(out, "{}", p.bold(&format!("configuration v{}", v.version)));
    let _ = writeln!(
        out,
        "  signed by {} at {when}, stored by {} as entry {}",
        v.author, v.origin, v.seq
    );
    let _ = writeln!(out, "  digest    {}", v.digest);
    if !v.comment.is_empty() {
        let _ = writeln!(out, "  comment   {}", v.comment);
    }
    for m in report.fleet.manifests() {
        let _ = writeln!(out, "{}", p.bold(&m.name));
        for vs in &m.vars {
            let names: Vec<&str> = vs.values.keys().map(String::as_str).collect();
            let _ = writeln!(out, "  vars for {}: {}", vs.selector, names.join(", "));
        }
        for f in &m.files {
            let reload = if f.reload.is_empty() {
                String::new()
            } else {
                format!(", reload: {}", f.reload.join(" && "))
            };
            let _ = writeln!(
                out,
                "  {} {:o} {} bytes{}{}  {}",
                f.path,
                f.mode,
                f.content.len(),
                if f.template { ", template" } else { "" },
                reload,
                p.dim(&format!("for {}", f.selector)),
            );
        }
    }
    out
}

/// `trellis config status`: per site, how many nodes hold the newest
/// version, which drifted, which failed; then the latest events.
pub fn config_status(report: &crate::api::ConfigStatus, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let Some(latest) = &report.latest else {
        out.push_str(
            "no configuration version stored yet: `trellis config apply DIR` stores the first\n",
        );
        return out;
    };
    let _ = writeln!(
        out,
        "newest: v{} by {}  ·  {}/{} nodes of reachable sites hold it  ·  {} drifted  ·  {} failing",
        latest.version,
        latest.author,
        report.at_latest,
        report.nodes_alive,
        report.drifted,
        report.failing
    );
    let width = report
        .sites
        .iter()
        .map(|s| s.region.len() + s.site.len() + 1)
        .max()
        .unwrap_or(0);
    for s in &report.sites {
        let name = format!("{}/{}", s.region, s.site);
        let offered = s
            .config
            .offered
            .map_or("relay holds nothing".to_owned(), |v| {
                format!("relay holds v{v}")
            });
        let mut line = format!(
            "{:<width$}  {}/{} at v{}  {}",
            name, s.at_latest, s.nodes_alive, latest.version, offered
        );
        if !s.reachable {
            line = p.site(
                SiteStatus::Unreachable,
                &format!("{line}  UNREACHABLE (as last heard)"),
            );
        } else if s.at_latest < s.nodes_alive {
            line = p.site(SiteStatus::Degraded, &line);
        }
        let _ = writeln!(out, "{line}");
        if s.config.drifted_count > 0 {
            let _ = writeln!(
                out,
                "{:width$}  {}",
                "",
                p.site(
                    SiteStatus::Degraded,
                    &format!(
                        "drifted ({}): {}",
                        s.config.drifted_count,
                        s.config.drifted.join(", ")
                    )
                )
            );
        }
        if s.config.failing_count > 0 {
            let names: Vec<String> = s
                .config
                .failing
                .iter()
                .map(|(n, v)| format!("{n} (v{v})"))
                .collect();
            let _ = writeln!(
                out,
                "{:width$}  {}",
                "",
                p.site(
                    SiteStatus::Critical,
                    &format!("failing ({}): {}", s.config.failing_count, names.join(", "))
                )
            );
        }
    }
    if !report.recent.is_empty() {
        let _ = writeln!(out, "{}", p.bold("recent configuration events"));
        out.push_str(&records(
            &crate::api::RecordsReport {
                records: report.recent.clone(),
                truncated: false,
            },
            colour,
        ));
    }
    out
}

/// `trellis patch list`.
pub fn patch_list(report: &crate::api::PatchList, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    if report.patches.is_empty() {
        out.push_str("no patch published yet: `trellis patch publish DIR` publishes one\n");
        return out;
    }
    for r in &report.patches {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.hlc.ms),
        );
        let _ = writeln!(
            out,
            "{}  {}  {when}  {}  {}",
            p.bold(&r.name),
            r.version,
            r.author,
            p.dim(&format!(
                "{}/{} {}",
                r.origin,
                r.seq,
                &r.id[..r.id.len().min(16)]
            )),
        );
    }
    out
}

/// `trellis patch stage NAME`: what each relay does.
pub fn patch_staged(report: &crate::api::StageReport, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "staging {} ({})",
        report.version,
        &report.id[..report.id.len().min(16)]
    );
    for s in &report.sites {
        let what = match (&s.fetching, &s.error) {
            (_, Some(e)) => p.site(SiteStatus::Critical, &format!("not staged: {e}")),
            (Some(0), None) => "holds every chunk already".to_owned(),
            (Some(n), None) => format!("fetching {n} chunks"),
            (None, None) => String::new(),
        };
        let _ = writeln!(out, "  {}/{}: {what}", s.region, s.site);
    }
    out
}

/// `trellis patch show NAME`.
pub fn patch_show(report: &crate::api::PatchVersions, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    for v in &report.versions {
        let m = &v.manifest;
        let _ = writeln!(out, "{}", p.bold(&format!("{} {}", m.name, m.version)));
        let _ = writeln!(out, "  id        {}", v.record.id);
        let _ = writeln!(
            out,
            "  signed by {}, stored by {} as entry {}",
            v.record.author, v.record.origin, v.record.seq
        );
        let _ = writeln!(out, "  for       {}", m.selector);
        let _ = writeln!(out, "  install   {}", m.install.join(" && "));
        let _ = writeln!(out, "  rollback  {}", m.rollback.join(" && "));
        let checks = if m.checks.is_empty() {
            "(none)".to_owned()
        } else {
            m.checks.join(", ")
        };
        let _ = writeln!(
            out,
            "  checks    {checks}, for {} after install",
            humantime::format_duration(m.bake)
        );
        for a in &m.artifacts {
            let _ = writeln!(
                out,
                "  artifact  {} ({} bytes, {} chunks)",
                a.name,
                a.size,
                a.chunks.len()
            );
        }
        let held = format!("{}/{} chunks at this hub", v.chunks_here, v.chunks_total);
        let _ = writeln!(
            out,
            "  {}",
            if v.chunks_here == v.chunks_total {
                held
            } else {
                p.site(SiteStatus::Degraded, &held)
            }
        );
    }
    out
}

/// The outcome of `trellis audit verify`: a line per problem, or that the
/// log is intact, with what was checked.
pub fn audit_verdict(report: &crate::api::AuditVerifyReport, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    let total: u64 = report.checked.values().sum();
    let origins: Vec<String> = report
        .checked
        .iter()
        .map(|(o, n)| format!("{o} {n}"))
        .collect();
    let checked = if origins.is_empty() {
        "no entries".to_owned()
    } else {
        let entries = if total == 1 { "entry" } else { "entries" };
        format!("{total} {entries} ({})", origins.join(", "))
    };
    if report.ok {
        let _ = writeln!(
            out,
            "{}: the management log is intact: {checked}, every signature and chain link checked",
            p.site(SiteStatus::Healthy, &report.hub)
        );
        return out;
    }
    for problem in &report.problems {
        let _ = writeln!(
            out,
            "{}",
            p.site(SiteStatus::Critical, &problem.to_string())
        );
    }
    let _ = writeln!(
        out,
        "{}: {} in the stored management log ({checked} checked). The other hubs hold their own \
         copies: compare with `trellis audit verify --hub OTHER`; to repair this hub, stop it, \
         move its store aside and start it again to pull the log from the others.",
        report.hub,
        plural(report.problems.len() as u64, "problem")
    );
    out
}

fn pct(v: Option<u8>) -> String {
    v.map_or("-".into(), |v| format!("{v}%"))
}

/// A site's members as a table.
pub fn nodes(report: &NodesReport, colour: bool) -> String {
    let p = Paint(colour);
    let alive = report.nodes.iter().filter(|n| n.alive).count();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}/{} (relay {}): {} members, {} alive",
        p.bold("site"),
        report.region,
        report.site,
        report.relay,
        report.nodes.len(),
        alive
    );
    let width = report
        .nodes
        .iter()
        .map(|n| n.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        out,
        "{}",
        p.dim(&format!(
            "{:<width$}  {:<5}  {:<5}  {:<8}  {:>4}  {:>4}  {:>4}  {:>5}  FAILING CHECKS",
            "NAME", "ROLE", "ALIVE", "STATUS", "CPU", "MEM", "DISK", "LOAD"
        ))
    );
    for n in &report.nodes {
        let (status, status_text) = if n.alive {
            (n.status, n.status.as_str())
        } else {
            (Status::Critical, "dead")
        };
        let failing: Vec<String> = n
            .checks
            .iter()
            .filter(|c| c.status != Status::Passing)
            .map(|c| {
                if c.detail.is_empty() {
                    format!("{} ({})", c.name, c.status)
                } else {
                    format!("{} ({}: {})", c.name, c.status, c.detail)
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<width$}  {:<5}  {:<5}  {}  {:>4}  {:>4}  {:>4}  {:>5}  {}",
            n.name,
            n.role.map_or("?", |r| r.as_str()),
            if n.alive { "yes" } else { "no" },
            p.status(status, &format!("{status_text:<8}")),
            pct(n.cpu_pct),
            pct(n.mem_pct),
            pct(n.disk_pct),
            n.load1.map_or("-".into(), |l| format!("{l:.2}")),
            if failing.is_empty() {
                "-".to_owned()
            } else {
                failing.join(", ")
            },
        );
    }
    out
}

/// A bar `width` wide: `done` of `total` as `#`, `bad` as `x`.
fn bar(done: u32, bad: u32, total: u32, width: usize) -> String {
    let total = total.max(1) as usize;
    let d = (done as usize * width / total).min(width);
    let b = (bad as usize * width / total).min(width - d);
    format!(
        "[{}{}{}]",
        "#".repeat(d),
        "x".repeat(b),
        "-".repeat(width - d - b)
    )
}

/// `trellis rollout status`: the rollout, each wave with a bar, each site,
/// and the gate's numbers.
pub fn rollout_status(v: &crate::rolloutapi::RolloutView, colour: bool) -> String {
    use crate::patchrollout::RunState;
    let p = Paint(colour);
    let r = &v.record;
    let mut out = String::new();
    let state = match r.state {
        RunState::Done => p.site(SiteStatus::Healthy, r.state.as_str()),
        RunState::Running => p.bold(r.state.as_str()),
        RunState::Paused => p.site(SiteStatus::Degraded, r.state.as_str()),
        _ => p.site(SiteStatus::Critical, r.state.as_str()),
    };
    let _ = writeln!(
        out,
        "rollout {}: {} {}  {state}",
        r.run,
        p.bold(&r.name),
        r.version
    );
    let _ = writeln!(
        out,
        "  started by {} through {}, waves {}, bake {}, max failure {:.1} %, {}",
        r.started_by,
        r.driver,
        r.spec,
        humantime::format_duration(std::time::Duration::from_millis(r.bake_ms)),
        r.max_failure * 100.0,
        if r.auto_rollback {
            "automatic rollback"
        } else {
            "no automatic rollback"
        }
    );
    if let Some(why) = &r.reason {
        let _ = writeln!(out, "  {}: {why}", p.site(SiteStatus::Critical, "why"));
    }
    let _ = writeln!(out, "waves:");
    for w in &v.waves {
        let c = w.counts;
        let mut line = format!(
            "  {:>2} {:<7} {} {}/{} healthy",
            w.index,
            w.spec,
            bar(c.healthy, c.failed, w.nodes, 20),
            c.healthy,
            w.nodes
        );
        if c.failed > 0 {
            line.push_str(&format!(", {} failed", c.failed));
        }
        if w.rolled_back > 0 {
            line.push_str(&format!(", {} rolled back", w.rolled_back));
        }
        line.push_str(&format!(
            " · {} node{} in {} site{} · {}",
            w.nodes,
            if w.nodes == 1 { "" } else { "s" },
            w.sites,
            if w.sites == 1 { "" } else { "s" },
            w.phase
        ));
        let line = if c.failed > 0 {
            p.site(SiteStatus::Critical, &line)
        } else {
            line
        };
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "sites:");
    for s in &v.sites {
        let states: Vec<String> = s.states.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let mut line = format!(
            "  {}/{} {} {}/{} patched{}",
            s.region,
            s.site,
            bar(s.patched, 0, s.planned, 10),
            s.patched,
            s.planned,
            if states.is_empty() {
                String::new()
            } else {
                format!(": {}", states.join(", "))
            }
        );
        if let Some(a) = s.action {
            line.push_str(&format!(" · relay: {}", a.as_str()));
        }
        if let Some(l) = &s.local {
            line.push_str(&format!(" · rolled back by its relay: {l}"));
        }
        let _ = writeln!(out, "{line}");
    }
    let gate = r.failed_gate.unwrap_or(v.gate);
    let _ = writeln!(
        out,
        "gate (wave {}): {}{}",
        gate.wave,
        gate.describe(),
        match gate.verdict.pass {
            Some(true) => " · passes".to_owned(),
            Some(false) => format!(" · {}", p.site(SiteStatus::Critical, "FAILED")),
            None => " · waiting for pending nodes".to_owned(),
        }
    );
    out
}

/// `trellis rollout list`.
pub fn rollout_list(l: &crate::rolloutapi::RolloutList, colour: bool) -> String {
    let p = Paint(colour);
    let mut out = String::new();
    if l.rollouts.is_empty() {
        out.push_str("no rollout yet: `trellis rollout start PATCH` starts one\n");
        return out;
    }
    for r in &l.rollouts {
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.started_ms),
        );
        let _ = writeln!(
            out,
            "{:>3}  {} {}  {}  wave {}/{} ({})  {when}  {}{}",
            r.run,
            p.bold(&r.name),
            r.version,
            r.state,
            r.started,
            r.waves,
            r.spec,
            r.started_by,
            r.reason
                .as_ref()
                .map_or(String::new(), |w| format!("\n     {w}"))
        );
    }
    out
}

/// `trellis incidents`: one line per incident, aligned, coloured by
/// severity (resolved ones dimmed), with what it is about under it. Open
/// ones come first, ranked (most severe, then most unusual, then newest:
/// [`crate::incidents::rank`]), with a score column when one has a score;
/// resolved ones follow, newest first.
pub fn incidents(r: &crate::incidentdriver::IncidentsReport, colour: bool) -> String {
    use crate::incidents::Severity;
    let p = Paint(colour);
    let mut out = String::new();
    if r.incidents.is_empty() {
        out.push_str(if r.open == 0 {
            "no incident open\n"
        } else {
            "no incident to show\n"
        });
        return out;
    }
    let mut list = r.incidents.clone();
    crate::incidents::rank(&mut list);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let id_w = list
        .iter()
        .map(|i| i.id.to_string().len())
        .max()
        .unwrap_or(1);
    let kind_w = list
        .iter()
        .map(|i| i.kind.as_str().len())
        .max()
        .unwrap_or(0);
    let scope_w = list
        .iter()
        .map(|i| i.scope.to_string().chars().count())
        .max()
        .unwrap_or(0);
    let score = |i: &crate::incidents::Incident| i.score.map(|s| format!("score {s}"));
    let score_w = list
        .iter()
        .filter_map(score)
        .map(|s| s.len())
        .max()
        .unwrap_or(0);
    for i in &list {
        let state = match i.resolved_ms {
            None => format!("open {}", ago(now_ms.saturating_sub(i.opened_ms) / 1000)),
            Some(at) => format!("resolved {}", ago(now_ms.saturating_sub(at) / 1000)),
        };
        let severity = format!("{:<8}", i.severity.as_str());
        let severity = match (i.resolved_ms, i.severity) {
            (Some(_), _) => p.dim(&severity),
            (None, Severity::Critical) => p.code("31;1", &severity),
            (None, Severity::Warning) => p.code("33", &severity),
        };
        let score = if score_w == 0 {
            String::new()
        } else {
            format!("{:<score_w$}  ", score(i).unwrap_or_default())
        };
        let line = format!(
            "#{:<id_w$}  {severity}  {score}{:<kind_w$}  {:<scope_w$}  {}",
            i.id,
            i.kind.as_str(),
            i.scope.to_string(),
            i.title,
        );
        let _ = writeln!(out, "{line}  {}", p.dim(&state));
        if !i.nodes.is_empty() && i.scope.node.is_none() {
            let _ = writeln!(out, "      nodes: {}", i.nodes.join(", "));
        }
        if let Some(c) = &i.cause {
            let _ = writeln!(
                out,
                "      likely cause: rollout {} of {} {} (wave {}, {})",
                c.run,
                p.bold(&c.name),
                c.version,
                c.wave,
                c.phase
            );
        }
        let _ = writeln!(out, "      {}", p.dim(&i.detail));
    }
    let _ = writeln!(out, "{} open", plural(r.open as u64, "incident"));
    out
}

#[cfg(test)]
mod tests {
    use trellis_relay::summary::{CheckCounts, StatusCounts};

    use super::*;
    use trellis_relay::report::FleetTotals;

    #[test]
    fn a_site_with_drifted_nodes_names_them_under_it() {
        let mut r = row("par", SiteStatus::Healthy, vec![], 1);
        r.config.drifted = vec!["web-1".into(), "web-2".into()];
        r.config.drifted_count = 5;
        let line = site_line(&Paint(false), &r, 3, "h");
        assert!(
            line.ends_with("\n      drifted: web-1, web-2 and 3 more"),
            "{line}"
        );
    }

    fn row(site: &str, status: SiteStatus, dead: Vec<String>, last: u64) -> SiteRow {
        SiteRow {
            site: site.into(),
            region: "eu".into(),
            relay: format!("{site}-relay"),
            nodes_total: 10,
            nodes_alive: 10 - dead.len() as u32,
            nodes_dead: dead.len() as u32,
            status,
            last_seen_s: last,
            connected: true,
            hub: Some("h".into()),
            by_status: StatusCounts::default(),
            dead,
            failing_checks: [(
                "ntp".to_owned(),
                CheckCounts {
                    critical: 2,
                    ..Default::default()
                },
            )]
            .into_iter()
            .collect(),
            config: Default::default(),
        }
    }

    #[test]
    fn the_fleet_tree_names_regions_sites_dead_nodes_and_staleness() {
        let report = FleetReport {
            hub: "h".into(),
            sites: vec![
                row("par", SiteStatus::Degraded, vec!["n3".into()], 1),
                row("ber", SiteStatus::Unreachable, vec![], 45),
            ],
            totals: FleetTotals {
                sites: 2,
                nodes_total: 20,
                nodes_alive: 19,
                nodes_dead: 1,
                ..Default::default()
            },
            relay: None,
        };
        let text = fleet(&report, false);
        assert!(
            text.contains("2 sites, 19/20 nodes alive, 1 dead"),
            "{text}"
        );
        assert!(text.contains("region eu"), "{text}");
        assert!(text.contains("dead: n3"), "{text}");
        assert!(text.contains("UNREACHABLE"), "{text}");
        assert!(text.contains("heard 45s ago"), "{text}");
        assert!(text.contains("ntp ×2"), "{text}");
        assert!(!text.contains('\x1b'), "no colour codes when colour is off");
        assert!(fleet(&report, true).contains('\x1b'));
    }

    #[test]
    fn the_audit_trail_shows_each_entry_with_its_time_hub_seq_author_and_what() {
        use crate::audit::AuditEntry;
        use crate::log::{Entry, Hlc, NO_PREV, Op};
        let entry = |seq, author: &str, op| {
            AuditEntry::new(
                Entry {
                    origin: "hub-a".into(),
                    seq,
                    hlc: Hlc {
                        ms: 1_700_000_000_000 + seq,
                        counter: 0,
                    },
                    author: author.into(),
                    op,
                    prev: NO_PREV,
                },
                b"sig",
            )
        };
        let report = crate::api::AuditReport {
            entries: vec![
                entry(
                    1,
                    "alice",
                    Op::Put {
                        key: "motd".into(),
                        value: "hello".into(),
                    },
                ),
                entry(
                    2,
                    "hub-a",
                    Op::Note {
                        kind: "config.applied".into(),
                        subject: "web-01".into(),
                        detail: String::new(),
                    },
                ),
            ],
            truncated: true,
        };
        let text = audit(&report, false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            format!(
                "2023-11-14T22:13:20.001Z  hub-a/1  alice  put motd=hello  #{}",
                &report.entries[0].hash[..12]
            )
        );
        assert!(
            lines[1].contains("hub-a/2  hub-a  note config.applied web-01  #"),
            "{text}"
        );
        assert!(lines[2].contains("raise --limit"), "{text}");
    }

    #[test]
    fn a_verdict_says_intact_or_names_each_problem_and_what_to_do() {
        use crate::audit::{AuditFault, AuditProblem};
        let mut report = crate::api::AuditVerifyReport {
            hub: "hub-a".into(),
            ok: true,
            checked: BTreeMap::from([("hub-a".to_owned(), 17), ("hub-b".to_owned(), 1)]),
            problems: vec![],
        };
        assert_eq!(
            audit_verdict(&report, false),
            "hub-a: the management log is intact: 18 entries (hub-a 17, hub-b 1), \
             every signature and chain link checked\n"
        );
        report.ok = false;
        report.problems = vec![AuditProblem {
            origin: "hub-b".into(),
            seq: 1,
            what: AuditFault::Signature,
        }];
        let text = audit_verdict(&report, false);
        assert!(
            text.starts_with("hub-b seq 1: signature does not match — the entry was altered\n"),
            "{text}"
        );
        assert!(
            text.contains("hub-a: 1 problem in the stored management log"),
            "{text}"
        );
        assert!(text.contains("move its store aside"), "{text}");
    }

    #[test]
    fn incidents_are_aligned_with_their_nodes_and_cause_under_them() {
        use crate::incidentdriver::IncidentsReport;
        use crate::incidents::{Incident, IncidentKind, RolloutCause, Scope, Severity};
        let incident = |id: u64, node: Option<&str>, kind: IncidentKind| Incident {
            id,
            kind,
            severity: Severity::Critical,
            scope: Scope {
                region: "eu".into(),
                site: "par".into(),
                node: node.map(str::to_owned),
            },
            check: None,
            title: format!("title {id}"),
            detail: "why".into(),
            opened_ms: 0,
            updated_ms: 0,
            resolved_ms: (id == 9).then_some(1),
            nodes: vec!["par-n0".into(), "par-n1".into()],
            cause: (id == 10).then(|| RolloutCause {
                run: 1,
                patch: "ab".into(),
                name: "web-fix".into(),
                version: "2.0".into(),
                wave: 0,
                phase: "bake".into(),
            }),
            score: None,
        };
        let r = IncidentsReport {
            open: 1,
            incidents: vec![
                incident(10, None, IncidentKind::SiteCheckFailing),
                incident(9, Some("par-n0"), IncidentKind::NodeDown),
            ],
        };
        let text = incidents(&r, false);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0]
                .starts_with("#10  critical  site-check-failing  eu/par         title 10  open "),
            "{text}"
        );
        assert_eq!(lines[1], "      nodes: par-n0, par-n1");
        assert_eq!(
            lines[2],
            "      likely cause: rollout 1 of web-fix 2.0 (wave 0, bake)"
        );
        assert!(
            lines[4].starts_with(
                "#9   critical  node-down           eu/par/par-n0  title 9  resolved "
            ),
            "{text}"
        );
        assert_eq!(*lines.last().unwrap(), "1 incident open");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn open_incidents_are_ranked_with_a_score_for_findings() {
        use crate::incidentdriver::IncidentsReport;
        use crate::incidents::{Incident, IncidentKind, Scope, Score, Severity};
        let incident =
            |id: u64, kind: IncidentKind, severity: Severity, score: Option<u32>| Incident {
                id,
                kind,
                severity,
                scope: Scope {
                    region: "eu".into(),
                    site: "par".into(),
                    node: Some(format!("par-n{id}")),
                },
                check: None,
                title: format!("title {id}"),
                detail: "why".into(),
                opened_ms: id,
                updated_ms: id,
                resolved_ms: None,
                nodes: vec![format!("par-n{id}")],
                cause: None,
                score: score.map(Score::from_tenths),
            };
        // Newest first, as the API answers.
        let r = IncidentsReport {
            open: 3,
            incidents: vec![
                incident(3, IncidentKind::NodeDown, Severity::Warning, None),
                incident(
                    2,
                    IncidentKind::ResourceForecast,
                    Severity::Critical,
                    Some(45),
                ),
                incident(1, IncidentKind::NodeAnomaly, Severity::Warning, Some(270)),
            ],
        };
        let text = incidents(&r, false);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with('#')).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with(
                "#2  critical  score 4.5  resource-forecast  eu/par/par-n2  title 2  open "
            ),
            "{text}"
        );
        assert!(
            lines[1].starts_with(
                "#1  warning   score 27   node-anomaly       eu/par/par-n1  title 1  open "
            ),
            "{text}"
        );
        assert!(
            lines[2].starts_with(
                "#3  warning              node-down          eu/par/par-n3  title 3  open "
            ),
            "{text}"
        );
    }
}
