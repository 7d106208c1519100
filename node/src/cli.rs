//! Helpers shared by the Trellis binaries: logging, shutdown signals and
//! exit codes.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::agent::StartError;
use crate::config::{self, IdentityConfig, Validate};
use crate::id::Role;
use crate::tls::Credentials;

/// Exit code for a failed operation.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad usage or bad input (configuration, arguments).
pub const EXIT_USAGE: u8 = 2;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, `key=value` fields; for people.
    #[default]
    Human,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message`
    /// and the event's fields at the top level); for log collectors, which
    /// then need no parser for the human format.
    Json,
}

/// Logs to stderr in `format`; the level comes from `TRELLIS_LOG` (then
/// `RUST_LOG`), `info` by default, with quinn at `warn` and chitchat at
/// `error` (its warnings are about transport errors our transport never
/// returns).
pub fn init_logging(format: LogFormat) {
    let filter = std::env::var("TRELLIS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info,quinn=warn,quinn_proto=warn,chitchat=error".to_owned());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
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

/// Like [`fail`], but with JSON logs the error is a log record, so that
/// every line on stderr parses for the collector reading it.
pub fn fail_logged(format: LogFormat, code: u8, error: &dyn std::fmt::Display) -> ExitCode {
    match format {
        LogFormat::Human => fail(code, error),
        LogFormat::Json => {
            tracing::error!(%error, exit_code = code, "stopped");
            ExitCode::from(code)
        }
    }
}

/// The options every member binary (`trellis-node`, `-relay`, `-hub`) takes.
#[derive(clap::Args, Debug)]
pub struct MemberArgs {
    /// Configuration file (TOML). Without it, every default applies.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Validate the configuration and credentials, then exit.
    #[arg(long)]
    pub check_config: bool,
    /// Print the effective configuration as TOML, then exit.
    #[arg(long)]
    pub print_config: bool,
    /// How to write log lines to stderr: `human` or `json` (one object per
    /// line).
    #[arg(long, env = "TRELLIS_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// A member's configuration file.
pub trait MemberConfig: DeserializeOwned + Serialize + Default + Validate {
    fn identity(&self) -> &IdentityConfig;

    /// Makes relative paths (other than the identity's) relative to `base`,
    /// the configuration file's directory.
    fn resolve_paths(&mut self, base: &std::path::Path) {
        let _ = base;
    }

    /// Before the credentials are loaded: a member that has none yet and
    /// a join token in its configuration enrols here.
    fn enrol_first(&self) -> Result<(), String> {
        Ok(())
    }

    /// Runs once the configuration and credentials are known good, before
    /// the member starts; a node agent replaces itself here with the build
    /// of itself it should run ([`crate::upgrade`]).
    fn before_start(&self) {}
}

/// A started member that can be waited on after shutdown.
pub trait Running {
    fn stopped(self) -> impl Future<Output = ()>;
}

/// The runtime a member runs on. A node agent's work is a few messages
/// and timers a second: one thread runs it all (disk and commands go to
/// tokio's blocking threads as everywhere), which saves the wake-ups of a
/// second worker stealing tasks, and that thread's memory. A relay or hub
/// serves a whole site or many sites and gets a worker per core.
fn runtime(role: Role) -> std::io::Result<tokio::runtime::Runtime> {
    match role {
        Role::Node => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
}

/// The whole life of a member binary: load and validate the configuration
/// and credentials (exit 2 on any problem), then run `start` until Ctrl-C or
/// SIGTERM (exit 1 if it cannot start).
pub fn member_main<C, R, Fut>(
    args: MemberArgs,
    role: Role,
    start: impl FnOnce(Credentials, C, CancellationToken) -> Fut,
) -> ExitCode
where
    C: MemberConfig,
    R: Running,
    Fut: Future<Output = Result<R, StartError>>,
{
    let log_format = args.log_format;
    init_logging(log_format);
    let mut loaded = match config::load::<C>(args.config.as_deref()) {
        Ok(l) => l,
        Err(e) => return fail_logged(log_format, EXIT_USAGE, &e),
    };
    let base = loaded.base_dir.clone();
    loaded.config.resolve_paths(&base);
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&loaded.config).expect("config serialises")
        );
        return ExitCode::SUCCESS;
    }
    if !args.check_config
        && let Err(e) = loaded.config.enrol_first()
    {
        return fail_logged(log_format, EXIT_FAILED, &e);
    }
    let creds = match loaded.config.identity().load(&loaded) {
        Ok(c) => c,
        Err(e) => return fail_logged(log_format, EXIT_USAGE, &e),
    };
    if creds.identity.role != role {
        return fail_logged(
            log_format,
            EXIT_USAGE,
            &format!(
                "{} is a {} certificate; trellis-{role} needs one issued with --role {role}",
                loaded
                    .resolve(loaded.config.identity().cert_path())
                    .display(),
                creds.identity.role
            ),
        );
    }
    if args.check_config {
        println!("configuration ok: {}", creds.identity);
        return ExitCode::SUCCESS;
    }
    loaded.config.before_start();
    crate::upgrade::allow_restart();
    let rt = runtime(role).expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = shutdown_on_signal();
        match start(creds, loaded.config, shutdown.clone()).await {
            Ok(running) => {
                shutdown.cancelled().await;
                running.stopped().await;
                // A node agent that installed another build of itself.
                if crate::upgrade::restart_if_requested() {
                    return fail_logged(
                        log_format,
                        EXIT_FAILED,
                        &"could not restart into the selected build of trellis-node; \
                          exiting so that the service manager starts the agent again",
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                shutdown.cancel();
                fail_logged(log_format, e.exit_code(), &e)
            }
        }
    })
}

/// `trellis-node enroll` and `trellis-relay enroll`: enrols this machine
/// as a member of `role` through the enrolment endpoint at `server` (a
/// relay for a node, a hub for a relay), writing the certificate and key
/// where the configuration's `[identity]` says.
pub fn enroll_main<C: MemberConfig>(
    role: Role,
    config: Option<&std::path::Path>,
    server: &str,
    token: &str,
    name: Option<String>,
    wait: std::time::Duration,
) -> ExitCode {
    let usage = |e: &dyn std::fmt::Display| fail(EXIT_USAGE, e);
    let loaded = match config::load::<C>(config) {
        Ok(l) => l,
        Err(e) => return usage(&e),
    };
    let id = loaded.config.identity();
    let (Some(ca), Some(cert), Some(key)) = (&id.ca, &id.cert, &id.key) else {
        return usage(&"[identity] needs ca, cert and key paths");
    };
    let files = crate::enrol::IdentityFiles {
        ca: loaded.resolve(ca),
        cert: loaded.resolve(cert),
        key: loaded.resolve(key),
    };
    eprintln!("enrolling as a {role} through {server}");
    let result = enrol_now(role, &files, server, token, name, wait, |what| {
        eprintln!("waiting: {what}")
    });
    match result {
        Ok(done) => {
            println!(
                "enrolled: {}; certificate {}, key {}",
                done.identity,
                files.cert.display(),
                files.key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILED, &e),
    }
}

/// Enrols this machine as a member of `role` through the enrolment
/// endpoint at `server` (host:port), on a runtime of its own; `progress`
/// hears every pending answer.
pub fn enrol_now(
    role: Role,
    files: &crate::enrol::IdentityFiles,
    server: &str,
    token: &str,
    name: Option<String>,
    wait: std::time::Duration,
    progress: impl FnMut(&str),
) -> Result<crate::enrol::Enrolled, String> {
    let through = crate::enrol::enrols_through(role);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(server)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            format!("the {through} {server}: not a host:port this machine can resolve")
        })?;
    let name = name
        .or_else(|| sysinfo::System::host_name().ok())
        .filter(|n| !n.is_empty())
        .ok_or("this machine has no hostname: give it a name")?;
    crate::tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime: {e}"))?;
    tracing::info!(%role, %name, %through, %addr, "enrolling");
    rt.block_on(crate::enrol::enrol(
        addr, role, token, &name, files, wait, progress,
    ))
}
