//! `trellis-node`: the agent that runs on every managed machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis_node::agent::NodeAgent;
use trellis_node::cli::{self, MemberArgs};
use trellis_node::id::Role;
use trellis_node::upgrade;

/// The Trellis node agent.
///
/// Probes this machine's health (CPU, memory, disk, load and the checks in
/// the configuration) and gossips it with the other members of its site over
/// QUIC with mutual TLS. Its region, site and name come from its certificate
/// (`trellis ca issue --role node ...`). Keeps the files Trellis manages on
/// this machine as they were applied, healing or reporting drift.
///
/// Example configuration (every key is optional; these are the defaults
/// unless noted):
///
///   [identity]
///   ca = "tls/ca.crt"          # relative to this file
///   cert = "tls/node.crt"
///   key = "tls/node.key"
///
///   [node]
///   labels = { role = "web", rack = "r12" }  # none by default
///
///   [gossip]
///   listen = "127.0.0.1:7900"
///   seeds = ["127.0.0.1:7901"] # the site's relay (default: none)
///   interval = "1500ms"
///
///   [metrics]
///   listen = "127.0.0.1:7910"
///
///   [config]                   # the files Trellis manages here
///   state_dir = "/var/lib/trellis/config"  # what was applied
///   drift_interval = "60s"     # how often managed files are checked
///   drift = "heal"             # or "report": log and count, leave the file
///   reload_timeout = "30s"     # a reload command running longer is killed
///
///   [join]                     # enrol at the first start (no certificate yet)
///   relay = "10.1.0.2:7904"    # the relay's [enrol] listen
///   token = "trellis-join-..." # from `trellis token create`
///
///   [renewal]                  # the certificate, renewed through the relay
///   renew_before = "30d"       # once it expires within this long
///   check_every = "1h"
///
///   [patch]                    # patches the site's relay orders
///   dir = "/var/lib/trellis/patches"  # last run, artifacts; commands run here
///   command_timeout = "10m"    # an install/rollback command running longer fails
///
///   [[checks]]                 # none by default
///   name = "sshd"
///   command = ["systemctl", "is-active", "--quiet", "sshd"]
///   interval = "10s"
///   timeout = "5s"
#[derive(Parser)]
#[command(
    version = trellis_node::upgrade::version(),
    verbatim_doc_comment,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(flatten)]
    member: MemberArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Join the fleet with a join token: make this machine's key and a
    /// certificate request here (the key never leaves the machine), send it
    /// to the site's relay, and write the certificate and key where the
    /// configuration's [identity] says.
    ///
    /// The configuration's `[identity] ca` must hold the mesh CA's
    /// certificate (ca.crt, public; never ca.key). The relay must listen
    /// for enrolments (`[enrol] listen` in relay.toml). The token comes
    /// from `trellis token create --site SITE` and decides the site; the
    /// relay forwards the request to a hub, or keeps it while its WAN link
    /// is down, in which case this command waits (up to --wait) and can be
    /// run again to go on waiting.
    ///
    ///   trellis-node enroll --config /etc/trellis/node.toml \
    ///       --relay 10.1.0.2:7904 --token trellis-join-...
    #[command(verbatim_doc_comment)]
    Enroll {
        /// Configuration file (TOML): where the CA certificate is read and
        /// the certificate and key are written.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The relay's enrolment address (`[enrol] listen`), host:port.
        #[arg(long)]
        relay: String,
        /// The join token.
        #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// This machine's name in the fleet (default: its hostname).
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for the certificate, like 10m.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Switch this machine's agent to another build of trellis-node: what a
    /// self-upgrade patch's commands run.
    ///
    /// A release of trellis-node is published as a patch whose artifact is
    /// the new binary, with
    ///
    ///   install = ['"$TRELLIS_NODE" upgrade install trellis-node']
    ///   rollback = ['"$TRELLIS_NODE" upgrade revert trellis-node']
    ///
    /// and rolled out like any patch. Once the install commands have run, the
    /// agent restarts into the selected build (same process, same
    /// arguments), which bakes the run and reports its version; a rollback
    /// restarts it into the build that ran before. A selected build that dies
    /// before its run is healthy is given up at the next start (the packaged
    /// unit restarts the agent on failure) and the run fails, so the
    /// rollout's gate rolls it back.
    #[command(verbatim_doc_comment)]
    Upgrade {
        #[command(subcommand)]
        action: UpgradeAction,
    },
    /// Show what this machine's runbooks did: each rule's runs, its rate
    /// limit and breaker, and the latest runs with their output, from the
    /// agent's state directory (`[config] state_dir`). Works while the
    /// agent runs, and while the site is cut off.
    ///
    ///   trellis-node runbooks --config /etc/trellis/node.toml --last 5
    #[command(verbatim_doc_comment)]
    Runbooks {
        /// Configuration file (TOML): where the state directory is.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How many of the latest runs to show.
        #[arg(long, default_value_t = 10)]
        last: usize,
        /// Print the states and the runs as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum UpgradeAction {
    /// Check that FILE is a trellis-node that runs here (`FILE --version`),
    /// keep a copy in the patch directory and select it, on trial.
    Install {
        /// The new build (a path relative to the patch's artifacts).
        file: PathBuf,
        #[command(flatten)]
        dir: PatchDir,
    },
    /// Select the build that ran before FILE was installed, if FILE is still
    /// the one selected (otherwise change nothing).
    Revert {
        /// The build the patch installed.
        file: PathBuf,
        #[command(flatten)]
        dir: PatchDir,
    },
    /// Show which build runs and which would be reverted to.
    Status {
        #[command(flatten)]
        dir: PatchDir,
        /// Print the selection as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct PatchDir {
    /// The agent's `[patch] dir` (set for patch commands).
    #[arg(long, env = upgrade::ENV_PATCH_DIR, value_name = "DIR")]
    patch_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        None => cli::member_main(args.member, Role::Node, NodeAgent::start),
        Some(Command::Upgrade { action }) => upgrade_command(action),
        Some(Command::Runbooks { config, last, json }) => {
            runbooks_command(config.as_deref(), last, json)
        }
        Some(Command::Enroll {
            config,
            relay,
            token,
            name,
            wait,
        }) => cli::enroll_main::<trellis_node::config::NodeConfig>(
            Role::Node,
            config.as_deref(),
            &relay,
            &token,
            name,
            wait,
        ),
    }
}

fn upgrade_command(action: UpgradeAction) -> ExitCode {
    let failed = |e: &dyn std::fmt::Display| cli::fail(cli::EXIT_FAILED, e);
    match action {
        UpgradeAction::Install { file, dir } => {
            let running = match std::env::current_exe() {
                Ok(p) => p,
                Err(e) => return failed(&format!("cannot tell which binary runs: {e}")),
            };
            match upgrade::install(&dir.patch_dir, &file, &running) {
                Ok(b) => {
                    println!(
                        "selected trellis-node {} ({}); the agent restarts into it once the \
                         install commands have run",
                        b.version,
                        b.path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e),
            }
        }
        UpgradeAction::Revert { file, dir } => match upgrade::revert(&dir.patch_dir, &file) {
            Ok(upgrade::Reverted::To(b)) => {
                let to = b.map_or("the base build".to_owned(), |b| {
                    format!("trellis-node {}", b.version)
                });
                println!(
                    "selected {to}; the agent restarts into it once the rollback commands have run"
                );
                ExitCode::SUCCESS
            }
            Ok(upgrade::Reverted::NotSelected) => {
                println!(
                    "{} is not the selected build; nothing to revert",
                    file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        },
        UpgradeAction::Status { dir, json } => match upgrade::load(&dir.patch_dir) {
            Ok(sel) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&sel).expect("serialises")
                );
                ExitCode::SUCCESS
            }
            Ok(None) => {
                println!(
                    "trellis-node {} (no other build was ever installed)",
                    upgrade::version()
                );
                ExitCode::SUCCESS
            }
            Ok(Some(sel)) => {
                let show = |b: &Option<upgrade::Build>| {
                    b.as_ref()
                        .map_or(format!("base ({})", sel.base.display()), |b| {
                            format!("{} ({})", b.version, b.path.display())
                        })
                };
                println!("selected: {}", show(&sel.current));
                println!("previous: {}", show(&sel.previous));
                if sel.trial.is_some() {
                    println!("on trial: not yet healthy since it was installed");
                }
                if let Some(why) = &sel.failed_start {
                    println!("failed start: {why}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => failed(&e),
        },
    }
}

fn runbooks_command(config: Option<&std::path::Path>, last: usize, json: bool) -> ExitCode {
    use trellis_node::cli::MemberConfig;
    use trellis_node::remediate;
    let failed = |e: &dyn std::fmt::Display| cli::fail(cli::EXIT_FAILED, e);
    let loaded = match trellis_node::config::load::<trellis_node::config::NodeConfig>(config) {
        Ok(l) => l,
        Err(e) => return failed(&e),
    };
    let mut cfg = loaded.config;
    cfg.resolve_paths(&loaded.base_dir);
    let dir = &cfg.config.state_dir;
    let states = match remediate::load_states(&remediate::states_path(dir)) {
        Ok(s) => s,
        Err(e) => return failed(&e),
    };
    let runs = match remediate::read_records(&remediate::audit_path(dir)) {
        Ok(r) => r,
        Err(e) => return failed(&format!("{}: {e}", remediate::audit_path(dir).display())),
    };
    let latest = &runs[runs.len().saturating_sub(last)..];
    if json {
        let v = serde_json::json!({ "rules": states, "runs": latest });
        println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
        return ExitCode::SUCCESS;
    }
    if states.is_empty() && runs.is_empty() {
        println!(
            "no runbook has acted on this machine (state directory {})",
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    let when = |ms: u64| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
        )
        .to_string()
    };
    for (name, st) in &states {
        let breaker = st
            .breaker_open_ms
            .map_or("closed".to_owned(), |t| format!("OPEN since {}", when(t)));
        println!(
            "{name}: {} run(s), last {}, {} refusal(s) by the rails, breaker {breaker}",
            st.runs,
            st.last_run_ms.map_or("never".to_owned(), when),
            st.blocked
        );
        if let Some(c) = &st.check {
            println!("  runbook:{name} {}: {}", c.status, c.detail);
        }
    }
    if !latest.is_empty() {
        println!("\nlatest runs (of {}):", runs.len());
    }
    for r in latest {
        println!(
            "{}  {}  {:?}{}  {}",
            when(r.at_ms),
            r.rule,
            r.result,
            if r.dry_run { " (dry run)" } else { "" },
            r.note
        );
        if let Some(o) = &r.outcome {
            for line in o.output.lines() {
                println!("    | {line}");
            }
        }
    }
    ExitCode::SUCCESS
}
