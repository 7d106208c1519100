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
/// (`trellis ca issue --role node ...`).
///
/// Example configuration (every key is optional; these are the defaults
/// unless noted):
///
///   [identity]
///   ca = "tls/ca.crt"          # relative to this file
///   cert = "tls/node.crt"
///   key = "tls/node.key"
///
///   [gossip]
///   listen = "127.0.0.1:7900"
///   seeds = ["127.0.0.1:7901"] # the site's relay (default: none)
///   interval = "1s"
///
///   [metrics]
///   listen = "127.0.0.1:7910"
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
