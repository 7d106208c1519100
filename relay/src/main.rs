//! `trellis-relay`: the site's summariser and uplink to the hubs.

use std::process::ExitCode;

use clap::Parser;
use trellis_node::cli::{self, MemberArgs};
use trellis_node::id::Role;
use trellis_relay::driver::Relay;

/// The Trellis relay: one per site.
///
/// Joins its site's gossip, summarises the site (node counts by status, dead
/// nodes, failing checks, resource histograms, the worst nodes) and records
/// summaries and events in a durable outage buffer, from which they go to a
/// hub over QUIC with mutual TLS; only what a hub acknowledged is deleted.
/// Through a WAN outage the site keeps running and stays visible on the
/// relay's local API. Answers the hub's requests for the site's node list. Its region, site and name come from its certificate
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
///   interval = "1500ms"
///
///   [uplink]
///   hubs = ["127.0.0.1:7700"]    # tried in order
///   summary_interval = "5s"      # sooner when the site changes
///   replay_bytes_per_s = 262144  # pace of the backlog after an outage
///   max_backoff = "30s"          # between connection attempts (randomised)
///   failover_after = "15s"       # then the next hub in `hubs`
///   failback_every = "60s"       # look whether an earlier hub is back
///
///   [buffer]                     # everything waits here until a hub has it
///   path = "buffer/outage.db"    # relative to this file
///   max_bytes = 1073741824       # then older summaries thin out, then the
///                                # oldest records go (and the hub is told)
///
///   [api]                        # the site, served locally (trellis status --relay)
///   listen = "127.0.0.1:7801"
///
///   [enrol]                      # machines enrol here with a join token
///   listen = "10.1.0.2:7904"     # (trellis-node enroll); off unless set
///
///   [renewal]                    # this relay's certificate, renewed at a hub
///   hub = "10.0.0.5:7705"        # its [enrolment] listen; off unless set
///   renew_before = "30d"
///
///   [metrics]
///   listen = "127.0.0.1:7911"
#[derive(Parser)]
#[command(version, verbatim_doc_comment, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(flatten)]
    member: MemberArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Join the fleet with a relay join token (`trellis token create --role
    /// relay --site SITE`): make this relay's key and a certificate request
    /// here, send it to a hub's enrolment endpoint (`[enrolment] listen` in
    /// hub.toml), and write the certificate and key where the
    /// configuration's [identity] says. `[identity] ca` must hold the mesh
    /// CA's certificate.
    ///
    ///   trellis-relay enroll --config /etc/trellis/relay.toml \
    ///       --hub 10.0.0.5:7705 --token trellis-join-...
    #[command(verbatim_doc_comment)]
    Enroll {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<std::path::PathBuf>,
        /// The hub's enrolment address (`[enrolment] listen`), host:port.
        #[arg(long)]
        hub: String,
        /// The join token.
        #[arg(long, env = "TRELLIS_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// This relay's name (default: the machine's hostname).
        #[arg(long)]
        name: Option<String>,
        /// How long to wait for the certificate, like 10m.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match args.command {
        None => cli::member_main(args.member, Role::Relay, Relay::start),
        Some(Command::Enroll {
            config,
            hub,
            token,
            name,
            wait,
        }) => cli::enroll_main::<trellis_relay::config::RelayConfig>(
            Role::Relay,
            config.as_deref(),
            &hub,
            &token,
            name,
            wait,
        ),
    }
}
