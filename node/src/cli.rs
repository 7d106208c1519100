//! Helpers shared by the Trellis binaries: logging, shutdown signals and
//! exit codes.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Exit code for a failed operation.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad usage or bad input (configuration, arguments).
pub const EXIT_USAGE: u8 = 2;

/// Logs to stderr; the level comes from `TRELLIS_LOG` (then `RUST_LOG`),
/// `info` by default, with quinn at `warn` and chitchat at `error` (its
/// warnings are about transport errors our transport never returns).
pub fn init_logging() {
    let filter = std::env::var("TRELLIS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,quinn=warn,quinn_proto=warn,chitchat=error".to_owned());
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// A token cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// Prints `error` (with its causes) and returns `code`.
pub fn fail(code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(code)
}
