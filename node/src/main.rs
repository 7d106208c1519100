//! `trellis-node`: the agent that runs on every managed machine.

use std::process::ExitCode;

use clap::Parser;
use trellis_node::agent::NodeAgent;
use trellis_node::cli::{self, MemberArgs};
use trellis_node::id::Role;

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
///   interval = "1s"
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
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    member: MemberArgs,
}

fn main() -> ExitCode {
    cli::member_main(Args::parse().member, Role::Node, NodeAgent::start)
}
