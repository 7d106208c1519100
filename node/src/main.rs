//! `trellis-node`: the agent that runs on every managed machine.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use trellis_node::agent::NodeAgent;
use trellis_node::cli::{self, EXIT_FAILED, EXIT_USAGE};
use trellis_node::config::{self, NodeConfig};

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
    /// Configuration file (TOML). Without it, every default applies.
    #[arg(long, short, env = "TRELLIS_NODE_CONFIG")]
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
    let loaded = match config::load::<NodeConfig>(args.config.as_deref()) {
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
    if creds.identity.role != trellis_node::id::Role::Node {
        return cli::fail(
            EXIT_USAGE,
            &format!(
                "{} is a {} certificate; trellis-node needs one issued with --role node",
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
        match NodeAgent::start(creds, loaded.config, shutdown.clone()).await {
            Ok(agent) => {
                shutdown.cancelled().await;
                agent.stopped().await;
                ExitCode::SUCCESS
            }
            Err(e) => cli::fail(EXIT_FAILED, &e),
        }
    })
}
