//! `trellis-relay`: the site's summariser and uplink to the hubs.

use std::process::ExitCode;

use clap::Parser;
use trellis_node::cli::{self, MemberArgs};
use trellis_node::id::Role;
use trellis_relay::driver::Relay;

/// The Trellis relay: one per site.
///
/// Joins its site's gossip, summarises the site (node counts by status, dead
/// nodes, failing checks, resource histograms, the worst nodes) and sends the
/// summaries and events to a hub over QUIC with mutual TLS, resending
/// whatever the hub has not acknowledged. Answers the hub's requests for the
/// site's node list. Its region, site and name come from its certificate
/// (`trellis ca issue --role relay ...`).
///
/// Example configuration (every key is optional; these are the defaults):
///
///   [identity]
///   ca = "tls/ca.crt"            # relative to this file
///   cert = "tls/relay.crt"
///   key = "tls/relay.key"
///
///   [gossip]
///   listen = "127.0.0.1:7901"    # nodes list this address as a seed
///   interval = "1s"
///
///   [uplink]
///   hubs = ["127.0.0.1:7700"]    # tried in order
///   summary_interval = "5s"      # sooner when the site changes
///
///   [metrics]
///   listen = "127.0.0.1:7911"
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    member: MemberArgs,
}

fn main() -> ExitCode {
    cli::member_main(Args::parse().member, Role::Relay, Relay::start)
}
