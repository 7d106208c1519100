//! `trellis-hub`: the regional management server.

use std::process::ExitCode;

use clap::Parser;
use trellis_hub::driver::Hub;
use trellis_node::cli::{self, MemberArgs};
use trellis_node::id::Role;

/// The Trellis hub.
///
/// Accepts relay uplinks over QUIC with mutual TLS, stores their summaries
/// and events durably before acknowledging them, applies each at most once,
/// and serves the fleet and its history over an HTTP JSON API with
/// Prometheus metrics at /metrics. Its name comes from its certificate
/// (`trellis ca issue --role hub ...`).
///
/// Example configuration (every key is optional; these are the defaults):
///
///   [identity]
///   ca = "tls/ca.crt"            # relative to this file
///   cert = "tls/hub.crt"
///   key = "tls/hub.key"
///
///   [uplink]
///   listen = "127.0.0.1:7700"    # UDP; relays list this in uplink.hubs
///
///   [api]
///   listen = "127.0.0.1:7800"    # GET /api/v1/fleet, /metrics
///
///   [fleet]
///   stale_after = "30s"          # a silent site is shown as unreachable
///
///   [store]                      # every record relays sent: the history
///   path = "hub-data/hub.db"     # relative to this file
///   retention = "30d"
///
///   [federation]                 # other hubs (none by default)
///   peers = ["10.0.2.2:7700"]    # their uplink addresses
///
///   [replication]
///   write_quorum = 0             # 0: 2 when there are two hubs or more
///
///   [incidents]                  # GET /api/v1/incidents, `trellis incidents`
///   webhooks = []                # URLs POSTed {event, incident} on open/resolve
///   site_check_nodes = 2         # nodes failing one check: one site incident
///   flap_changes = 4             # more changes than this within flap_window:
///   flap_window = "5m"           #   the node is flapping (one incident)
///   flap_quiet = "5m"            # quiet this long: the flapping resolves
///   keep_resolved = 1000
///
///   [outliers]                   # sites far above the other sites of their region
///   metrics = ["cpu", "mem", "disk", "unhealthy"]
///   threshold = 6.0              # robust σ above the region's median, and
///   min_gap_pct = 20             #   at least this many points above it
///   min_peers = 3                # other sites of the region to compare with
///   hold_for = "10m"             # an outlier this long: one site-anomaly incident
///
///   [baselines]                  # regions far from their own usual figures
///   metrics = ["cpu", "mem", "disk", "unhealthy"]
///   threshold = 6.0              # robust σ from the usual level, for
///   persist = 3                  #   this many looks (10 s apart) in a row
///   warmup = "30m"               # history before anything is scored
///   half_life = "1h"             # how fast the usual level follows a new one
///
///   [enrolment]                  # sign certificates for join tokens
///   ca_dir = "ca"                # the mesh CA (ca.crt, ca.key); unset: refuse
///   cert_days = 365
///   listen = "10.0.0.5:7705"     # relays enrol here (relay tokens); off unless set
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    member: MemberArgs,
}

fn main() -> ExitCode {
    cli::member_main(Args::parse().member, Role::Hub, Hub::start)
}
