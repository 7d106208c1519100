//! `trellis-relay`: the site's summariser and uplink to the hubs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use trellis_node::cli::{self, EXIT_FAILED, EXIT_USAGE};
use trellis_node::config;
use trellis_relay::config::RelayConfig;
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
    /// Configuration file (TOML). Without it, every default applies.
    #[arg(long, short, env = "TRELLIS_RELAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and credentials, then exit.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration as TOML, then exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    cli::init_logging();
    let loaded = match config::load::<RelayConfig>(args.config.as_deref()) {
        Ok(l) => l,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&loaded.config).expect("config serialises")
        );
        return ExitCode::SUCCESS;
    }
    let creds = match loaded.config.identity.load(&loaded) {
        Ok(c) => c,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    if creds.identity.role != trellis_node::id::Role::Relay {
        return cli::fail(
            EXIT_USAGE,
            &format!(
                "{} is a {} certificate; trellis-relay needs one issued with --role relay",
                loaded.resolve(loaded.config.identity.cert_path()).display(),
                creds.identity.role
            ),
        );
    }
    if args.check_config {
        println!("configuration ok: {}", creds.identity);
        return ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = cli::shutdown_on_signal();
        match Relay::start(creds, loaded.config, shutdown.clone()).await {
            Ok(relay) => {
                shutdown.cancelled().await;
                relay.stopped().await;
                ExitCode::SUCCESS
            }
            Err(e) => cli::fail(EXIT_FAILED, &e),
        }
    })
}
