//! `trellis-hub`: the regional management server.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use trellis_hub::config::HubConfig;
use trellis_hub::driver::Hub;
use trellis_node::cli::{self, EXIT_FAILED, EXIT_USAGE};
use trellis_node::config;

/// The Trellis hub.
///
/// Accepts relay uplinks over QUIC with mutual TLS, applies their summaries
/// and events at most once, and serves the fleet over an HTTP JSON API with
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
///   stale_after = "30s"          # a silent site is shown as stale
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Configuration file (TOML). Without it, every default applies.
    #[arg(long, short, env = "TRELLIS_HUB_CONFIG")]
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
    let loaded = match config::load::<HubConfig>(args.config.as_deref()) {
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
    if creds.identity.role != trellis_node::id::Role::Hub {
        return cli::fail(
            EXIT_USAGE,
            &format!(
                "{} is a {} certificate; trellis-hub needs one issued with --role hub",
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
        match Hub::start(creds, loaded.config, shutdown.clone()).await {
            Ok(hub) => {
                shutdown.cancelled().await;
                hub.stopped().await;
                ExitCode::SUCCESS
            }
            Err(e) => cli::fail(EXIT_FAILED, &e),
        }
    })
}
