//! `trellis`: the operator's command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use trellis_hub::client::{ApiClient, ClientError};
use trellis_hub::inventory::inventory;
use trellis_hub::render;
use trellis_hub::rollout::Rollout;
use trellis_hub::up::{LocalMesh, UpOptions};
use trellis_node::cli::{self, EXIT_FAILED, EXIT_USAGE};
use trellis_node::desired::{Fleet, plan};
use trellis_node::id::{Identity, Role};
use trellis_node::tls::{
    CA_CERT_FILE, Credentials, DEFAULT_CERT_DAYS, IssuedRecord, MeshCa, TlsError,
};

/// Trellis: an edge-aware management mesh for large fleets.
///
/// Nodes gossip their health inside each site over QUIC; one relay per site
/// summarises the site and sends it up; hubs keep the fleet view and serve it
/// over an HTTP API. This command manages the mesh's certificates, reads a
/// hub's API, and can start a whole local mesh in one process.
///
/// Try it:
///   trellis up                 start 1 hub, 3 sites × 10 nodes on 127.0.0.1
///   trellis status             (in another shell) the fleet as a tree
///   trellis nodes site-1       one site's nodes, live from its relay
///
/// Exit codes: 0 ok, 1 the operation failed, 2 bad usage or input.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// How to write log lines to stderr: `human` or `json` (one object per
    /// line).
    #[arg(
        long,
        global = true,
        env = "TRELLIS_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: cli::LogFormat,
    /// API token for a hub that requires one (`trellis api token` makes
    /// them).
    #[arg(long, global = true, env = "TRELLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the mesh certificate authority and member certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Manage who may call the hubs' API.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Manage one node's place in the fleet.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Join tokens: how new machines enrol (`trellis-node enroll`).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the fleet: regions, sites, node counts, status.
    ///
    /// Sites are coloured by status: healthy, degraded (a node dead or
    /// failing), critical (half or more dead or critical), unreachable (the
    /// hub cannot reach the site's relay; the last known state is shown).
    #[command(
        after_help = "Examples:\n  trellis status\n  trellis status --json | jq '.sites[] | select(.status != \"healthy\")'\n  trellis status --relay http://127.0.0.1:7801   # a relay's own view, hub or not"
    )]
    Status {
        #[command(flatten)]
        hub: HubArg,
        /// Ask a relay's local API instead of a hub (its own site only; works
        /// while the site is cut off from its hubs).
        #[arg(long)]
        relay: Option<String>,
        /// Print the API's JSON instead of the tree.
        #[arg(long)]
        json: bool,
    },
    /// Show one site's nodes with their health, live from the site's relay.
    #[command(
        after_help = "Examples:\n  trellis nodes par-1\n  trellis nodes par-1 --region eu --json"
    )]
    Nodes {
        /// The site's name (as in `trellis status`); not needed with --relay.
        #[arg(required_unless_present = "relay")]
        site: Option<String>,
        /// Ask a relay's local API instead of a hub.
        #[arg(long)]
        relay: Option<String>,
        /// The site's region, when several regions have a site of that name.
        #[arg(long)]
        region: Option<String>,
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show recent events (nodes joined, died, recovered; checks changed)
    /// and gaps (records a relay had to drop), oldest first.
    #[command(
        after_help = "Examples:\n  trellis events --since 10m\n  trellis events --site par-1 --since 1d --limit 50"
    )]
    Events {
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// How far back, e.g. 10m, 2h, 1d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a site's recorded history: summaries, events and gaps.
    #[command(
        after_help = "Examples:\n  trellis history par-1 --since 2h\n  trellis history par-1 --region eu --json"
    )]
    History {
        site: String,
        #[arg(long)]
        region: Option<String>,
        /// How far back, e.g. 10m, 2h, 1d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which Trellis versions run where: the hub's, and per site each
    /// role's members by version, asked live from the relays (a site whose
    /// relay cannot be reached says so). Mixed versions are flagged.
    #[command(
        after_help = "Examples:\n  trellis versions\n  trellis versions --json | jq '.sites[].versions.node'"
    )]
    Versions {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Show the federation's hubs: which are alive, what they serve, and
    /// whether they hold the same records and log.
    #[command(after_help = "Example:\n  trellis hubs --hub http://hub-2:7800")]
    Hubs {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Show incidents: faults correlated from events and the fleet view
    /// (a site unreachable is one incident, a check failing on several
    /// nodes of a site is one, a flapping node is one), with the rollout
    /// that likely caused each if one was baking there. Open ones come
    /// first, most severe, then most unusual (highest score), then newest;
    /// resolved ones follow, newest first. `--json` prints the API's
    /// answer, newest first.
    #[command(
        after_help = "Examples:\n  trellis incidents            # the open ones\n  trellis incidents --all --json"
    )]
    Incidents {
        /// Show resolved incidents too (the hub keeps the newest ones).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON instead of the list.
        #[arg(long)]
        json: bool,
    },
    /// Read and write the desired state (kept in the hubs' replicated log).
    #[command(subcommand)]
    Desired(DesiredCommand),
    /// Configuration as code: the fleet's managed files, kept as a
    /// directory of TOML manifests.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Patches: sign and store them at the hubs.
    #[command(subcommand)]
    Patch(PatchCommand),
    /// Patch rollouts: waves, health gates, automatic rollback.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Read and check the audit trail: the hubs' management log.
    ///
    /// Every change to the desired state, and every note a hub records
    /// (a configuration applied, a drift found), is an entry of the
    /// management log that every hub holds: who, when, through which hub,
    /// what. Each entry is signed by the hub that accepted it and carries
    /// the hash of that hub's entry before it, so each hub's entries form a
    /// chain: altering, removing or reordering one breaks the chain at the
    /// next. Hubs refuse entries that break a chain when they replicate.
    #[command(subcommand, verbatim_doc_comment)]
    Audit(AuditCommand),
    /// Start a real local mesh in this process (Ctrl-C stops it).
    ///
    /// Every member gets its own QUIC endpoint on 127.0.0.1 and its own
    /// certificate from a fresh mesh CA (kept in a temporary directory, or in
    /// --dir). The hub's API serves on --api.
    #[command(
        after_help = "Examples:\n  trellis up                          # 1 hub, 3 sites × 10 nodes; Ctrl-C stops it\n  trellis up --hubs 3 --sites 5 --nodes 20 --dir /tmp/mesh"
    )]
    Up {
        /// Number of sites (one relay each).
        #[arg(long, default_value_t = 3)]
        sites: usize,
        /// Nodes per site.
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Number of hubs; several federate, and the sites are spread over
        /// them.
        #[arg(long, default_value_t = 1)]
        hubs: usize,
        /// Address of the hub's HTTP API.
        #[arg(long, default_value = trellis_hub::config::DEFAULT_API)]
        api: SocketAddr,
        /// Directory for the mesh CA (created, or reused if it holds one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Time between gossip rounds (the members' own default unless set).
        #[arg(long, default_value_t = trellis_node::config::DEFAULT_GOSSIP_INTERVAL.into())]
        gossip_interval: humantime::Duration,
    },
    /// Print a completion script for a shell.
    ///
    /// Install it, for example:
    ///   trellis completions bash > ~/.local/share/bash-completion/completions/trellis
    ///   trellis completions zsh > ~/.zfunc/_trellis   (with ~/.zfunc in fpath)
    ///   trellis completions fish > ~/.config/fish/completions/trellis.fish
    #[command(verbatim_doc_comment)]
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum DesiredCommand {
    /// Show every key, or one.
    #[command(
        after_help = "Examples:\n  trellis desired get\n  trellis desired get web.replicas --json"
    )]
    Get {
        key: Option<String>,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Set a key. Acknowledged once the write is durable on the
    /// federation's write quorum of hubs (exit 1 otherwise: the write then
    /// stays in the hub's log and replicates when the others are back).
    #[command(after_help = "Example:\n  trellis desired set web.replicas 3")]
    Set {
        key: String,
        value: String,
        /// Who writes (recorded in the log).
        #[arg(long = "as", env = "USER", default_value = "operator")]
        author: String,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Delete a key (acknowledged like `set`).
    #[command(after_help = "Example:\n  trellis desired delete web.replicas")]
    Delete {
        key: String,
        #[arg(long = "as", env = "USER", default_value = "operator")]
        author: String,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Show what a fleet directory would change, node by node.
    ///
    /// Reads every *.toml manifest under DIR (files, vars, runbooks,
    /// selectors; see docs/ARCHITECTURE.md, "Configuration as files"), asks
    /// the hub for every site's nodes (live from the sites' relays, with
    /// their labels and facts), and resolves the manifests for each node.
    /// Prints, per site, which nodes get which files added, changed or no
    /// longer managed and which runbooks added, changed (and in which
    /// fields) or removed, and per selector the paths and runbooks that
    /// differ. Sites whose relays do not answer are listed: their nodes are
    /// not in the plan.
    ///
    /// The plan compares with the newest version stored at the hubs (with
    /// nothing managed if there is none yet).
    ///
    /// Exit codes: 0 the plan resolves for every node; 1 some node's
    /// configuration does not resolve (a conflict between two manifests,
    /// an unknown template name: the plan says which) or the hub could not
    /// be asked; 2 the directory is not a valid fleet.
    ///
    /// Example: trellis config plan fleet/
    #[command(verbatim_doc_comment)]
    Plan {
        /// The fleet directory.
        dir: PathBuf,
        #[command(flatten)]
        hub: HubArg,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sign a fleet directory as the next version, store it, follow it out.
    ///
    /// Reads DIR like `plan`, signs it with the operator's Ed25519 key as
    /// version N+1 (N: the newest stored), and stores it at the hub, which
    /// replicates it to the other hubs and pushes it to every relay it
    /// serves. Each relay keeps it on disk and offers it to its site; each
    /// node fetches it, checks the signature against the mesh CA, applies
    /// its own files and reports back. This command then shows a progress
    /// bar until every alive node of every reachable site holds the new
    /// version (or refused it), and exits.
    ///
    /// Sites cut off from the hubs are listed and not waited for: their
    /// relays get the version when the link returns, and their nodes apply
    /// it then, without anyone doing anything.
    ///
    /// Operator credentials come from `trellis ca issue --role operator`.
    ///
    /// Exit codes: 0 every reachable node holds the version (or, with
    /// --no-wait, it is stored); 1 some node refused it or failed a reload
    /// command, the wait timed out, or the hub refused the bundle; 2 bad
    /// usage, an invalid fleet or unusable credentials.
    ///
    /// Example: trellis config apply fleet/ --cert alice.crt --key alice.key --ca ca/ca.crt -m "motd"
    #[command(verbatim_doc_comment)]
    Apply {
        /// The fleet directory.
        dir: PathBuf,
        #[command(flatten)]
        operator: OperatorArg,
        /// A note about the change, kept with the version.
        #[arg(short = 'm', long, default_value = "")]
        comment: String,
        #[command(flatten)]
        follow: FollowArg,
        #[command(flatten)]
        hub: HubArg,
    },
    /// List the stored configuration versions, newest first.
    #[command(after_help = "Example:\n  trellis config history --json")]
    History {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Show one version: who signed it, when, and what each manifest manages.
    #[command(after_help = "Examples:\n  trellis config show 3\n  trellis config show 3 --json")]
    Show {
        version: u64,
        #[command(flatten)]
        hub: HubArg,
        /// Print the whole version as JSON, file contents included.
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier version's configuration current again.
    ///
    /// Fetches VERSION's bundle, checks its signature, and signs its fleet
    /// again, with your key, as the next version N+1 ("rollback to
    /// vVERSION"): history only moves forward, so every node, including
    /// one that never saw the versions in between, ends up with exactly
    /// VERSION's files. Then follows the rollout like `apply`.
    ///
    /// Example: trellis config rollback 3 --cert alice.crt --key alice.key --ca ca/ca.crt
    #[command(verbatim_doc_comment)]
    Rollback {
        version: u64,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        follow: FollowArg,
        #[command(flatten)]
        hub: HubArg,
    },
    /// Per site: how many nodes hold the newest version, which nodes have
    /// drifted or failed, and the latest configuration events.
    #[command(after_help = "Example:\n  trellis config status")]
    Status {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

/// The operator's credentials, to sign configuration bundles.
#[derive(clap::Args)]
struct OperatorArg {
    /// The operator's certificate (from `trellis ca issue --role operator`).
    #[arg(long, env = "TRELLIS_CERT")]
    cert: PathBuf,
    /// The operator's private key.
    #[arg(long, env = "TRELLIS_KEY")]
    key: PathBuf,
    /// The mesh CA's certificate.
    #[arg(long, env = "TRELLIS_CA")]
    ca: PathBuf,
}

/// How `apply` and `rollback` follow the rollout.
#[derive(clap::Args)]
struct FollowArg {
    /// Return as soon as the version is stored.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting after this long (the rollout goes on).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print what was stored and where the rollout ended as one JSON
    /// object (`{"stored": …, "rollout": …}`); progress stays on stderr.
    #[arg(long)]
    json: bool,
}

/// The hubs' management log as an audit trail: every operator write and
/// every note, signed by the hub that accepted it and hash-chained per hub.
#[derive(Subcommand)]
enum AuditCommand {
    /// Show the log's entries, oldest first: time, hub/seq, author, what,
    /// and the start of the entry's hash.
    #[command(
        after_help = "Examples:\n  trellis audit log --since 1d\n  trellis audit log --json | jq '.entries[] | select(.op | startswith(\"note patch\"))'"
    )]
    Log {
        /// Only entries this recent, e.g. 10m, 2h, 7d (default: all).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// Only entries accepted by this hub.
        #[arg(long)]
        origin: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON (with full hashes and structured operations).
        #[arg(long)]
        json: bool,
    },
    /// Have a hub check the log in its own store file.
    ///
    /// The hub reads every row of its store's log table and checks, for
    /// each entry: that its signature is its origin hub's (by the mesh CA),
    /// so the entry was not altered; that it sits at the origin and seq it
    /// was signed for, so rows were not renumbered or swapped; that the
    /// readable columns (hlc_ms, author, op, prev, hash) say what the signed
    /// entry says; that no seq is missing, so no entry was removed; and that
    /// its prev is the hash of the entry before, so the chain is whole.
    ///
    /// It cannot notice the newest entries of a hub removed from the end
    /// (compare `trellis hubs`: the others hold more), nor a hub that
    /// rewrites and re-signs its own entries with its own key: the other
    /// hubs still hold the originals, so check them too with --hub.
    ///
    /// Exit codes: 0 the log is intact; 1 a problem was found (each is
    /// printed with the hub and seq it concerns), or the hub could not be
    /// asked; 2 bad usage.
    #[command(verbatim_doc_comment)]
    #[command(after_help = "Example:\n  trellis audit verify")]
    Verify {
        #[command(flatten)]
        hub: HubArg,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Patches: signed manifests whose artifacts are stored at the hubs as
/// content-addressed chunks (BLAKE3). `trellis rollout` rolls them out.
#[derive(Subcommand)]
enum PatchCommand {
    /// Sign a patch directory and store it at the hub.
    ///
    /// DIR holds patch.toml (name, version, selector, install and rollback
    /// commands, the checks that must stay passing, a bake time, the
    /// artifact files) and the artifacts. The artifacts are cut into 1 MiB
    /// chunks named by their BLAKE3; the chunks the hub lacks are uploaded
    /// (an interrupted publish resumes where it stopped: chunks already
    /// there are not sent again), then the manifest, signed with the
    /// operator's key, is stored in the hubs' replicated log.
    ///
    /// Exit codes: 0 published (or already published); 1 the hub refused or
    /// could not be reached; 2 bad usage, an invalid patch directory or
    /// unusable credentials.
    ///
    /// Example: trellis patch publish openssl-fix/ --cert alice.crt --key alice.key --ca ca/ca.crt
    #[command(verbatim_doc_comment)]
    Publish {
        dir: PathBuf,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        hub: HubArg,
        /// Print the hub's answer as JSON (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
    /// Have relays fetch a patch's artifacts now, ahead of a rollout.
    ///
    /// Each relay connected to this hub (or only the relay of --site)
    /// fetches the chunks of the newest version's artifacts it lacks, once
    /// for its whole site, checking each against its BLAKE3; staging again
    /// resumes a fetch that was cut short and replaces damaged chunks.
    /// Follow it in the relays' /metrics (trellis_relay_patch_*).
    #[command(verbatim_doc_comment)]
    #[command(
        after_help = "Examples:\n  trellis patch stage openssl-fix\n  trellis patch stage openssl-fix --site par-1"
    )]
    Stage {
        name: String,
        /// Only this site's relay.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// List published patches, newest first.
    #[command(after_help = "Example:\n  trellis patch list --json")]
    List {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Show a patch's versions: commands, checks, bake time, artifacts, and
    /// how many of their chunks this hub holds.
    #[command(after_help = "Example:\n  trellis patch show openssl-fix")]
    Show {
        name: String,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

/// Patch rollouts in waves, each judged by a health gate before the next
/// starts; a failed gate halts the rollout and rolls back every patched
/// node.
#[derive(Subcommand)]
enum RolloutCommand {
    /// Start rolling a published patch out, wave by wave.
    ///
    /// The nodes the patch's selector picks (among the nodes the relays
    /// list now) are put in waves. With the default `canary,1site,10%,100%`:
    /// one node, then every other node of one whole site, then nodes spread
    /// across sites until 10 % of them have the patch, then the rest. Who is
    /// in which wave is deterministic: nodes are ordered by BLAKE3 of the
    /// patch's id and their name, sites by their first node in that order.
    ///
    /// A wave's nodes install the patch and watch the checks it names for
    /// its bake time. The wave passes its gate when every patched node is
    /// healthy, or at least when the patched nodes' failure ratio is no more
    /// than that of the unpatched nodes plus --max-failure, and the wave has
    /// run for --bake; then the next wave starts. A gate fails at once when
    /// the patched failures already exceed that, and the rollout halts and
    /// (unless --no-auto-rollback) every patched node rolls back. Each
    /// site's relay applies the same gate to its own nodes, so a site cut
    /// off from the hubs rolls itself back too.
    ///
    /// Nodes of sites whose relays do not answer now are not in the plan;
    /// the command says which sites those are.
    ///
    /// Example: trellis rollout start openssl-fix --waves canary,1site,100% --bake 10m --max-failure 5% --cert alice.crt --key alice.key --ca ca/ca.crt
    #[command(verbatim_doc_comment)]
    Start {
        /// The patch's name (its newest version) or id.
        patch: String,
        /// Waves: `canary` (one node, first only), `Nsite` (the next N
        /// whole sites), `P%` (cumulative share of the nodes); ends at 100%.
        #[arg(long, default_value = "canary,1site,10%,100%")]
        waves: String,
        /// How long each wave runs before its gate may pass (default: the
        /// patch's bake time).
        #[arg(long, value_parser = humantime::parse_duration)]
        bake: Option<Duration>,
        /// How much worse than the unpatched nodes the patched nodes' failure
        /// ratio may be: `5%` or `0.05`.
        #[arg(long, default_value = "0%", value_parser = parse_ratio)]
        max_failure: f64,
        /// On a failed gate only halt; leave the patched nodes as they are.
        #[arg(long)]
        no_auto_rollback: bool,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Show a rollout: waves with progress bars, each site, the gate's
    /// numbers and, if it stopped, why.
    #[command(
        after_help = "Examples:\n  trellis rollout status        # the newest rollout\n  trellis rollout status 3 --json"
    )]
    Status {
        /// The rollout's number; the newest when absent.
        run: Option<u64>,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// List rollouts, newest first.
    #[command(after_help = "Example:\n  trellis rollout list")]
    List {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Let the current wave finish but start no new one.
    #[command(
        after_help = "Example:\n  trellis rollout pause --cert alice.crt --key alice.key --ca ca/ca.crt"
    )]
    Pause {
        run: Option<u64>,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Carry on after a pause, or after a halt without automatic rollback.
    #[command(
        after_help = "Example:\n  trellis rollout resume 3 --cert alice.crt --key alice.key --ca ca/ca.crt"
    )]
    Resume {
        run: Option<u64>,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Stop the rollout and roll back every patched node.
    #[command(
        after_help = "Example:\n  trellis rollout abort --cert alice.crt --key alice.key --ca ca/ca.crt   # rolls back"
    )]
    Abort {
        run: Option<u64>,
        #[command(flatten)]
        operator: OperatorArg,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

/// `5%` or `0.05` as a ratio from 0 to 1.
fn parse_ratio(s: &str) -> Result<f64, String> {
    let v = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => s.trim().parse::<f64>(),
    }
    .map_err(|_| format!("{s:?} is not a ratio: write 5% or 0.05"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{s:?} is not between 0% and 100%"))
    }
}

#[derive(clap::Args)]
struct HubArg {
    /// The hub's API URL.
    #[arg(long, env = "TRELLIS_HUB", default_value = "http://127.0.0.1:7800")]
    hub: String,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token for one site (admin). A machine enrols with it
    /// through that site's relay (`trellis-node enroll --relay ADDR --token
    /// T`) and gets a node certificate for the site; the token is shown
    /// once, only its hash is kept. Recorded in the audit log.
    #[command(
        after_help = "Examples:\n  trellis token create --region eu --site par-1\n  \
                      trellis token create --region eu --site par-1 --uses 50 --ttl 24h"
    )]
    Create {
        #[arg(long)]
        region: String,
        #[arg(long)]
        site: String,
        /// Who enrols with it: node (through the site's relay) or relay
        /// (with a hub's `[enrolment] listen`).
        #[arg(long, default_value = "node")]
        role: Role,
        /// Labels the machines enrolled with it get, like role=web,rack=r12
        /// (their own configuration's labels take precedence).
        #[arg(long, value_delimiter = ',', value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// How many machines may enrol with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it is valid (at most 30 days), like 1h or 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Who creates it, for the audit log (default: the API token's name).
        #[arg(long = "as")]
        author: Option<String>,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// List join tokens: site, uses, expiry (never their secrets).
    List {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Take a node out of the fleet for good: it leaves its site, its
    /// certificates are refused everywhere, and it disappears from the
    /// views without being reported dead; its history stays queryable.
    ///
    /// Signs a `decommissioned` revocation of every unexpired certificate
    /// issued to NAME (see issued.jsonl in the CA directory) and writes it
    /// through the hub, like `trellis ca revoke` (an admin action, in the
    /// management log). The site's relay then leaves the node out of the
    /// site's counts and lists with one `node_left` event, closes its
    /// connections, and the node, on hearing it, stops. To bring the
    /// machine back, issue it a new certificate.
    #[command(after_help = "Examples:
  trellis node decommission --dir ca par-n07 --reason 'hardware retired'
  trellis node decommission --dir ca n1 --region eu --site par")]
    Decommission {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The node's name.
        name: String,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// Why, recorded with the entry (at most 200 characters).
        #[arg(long, default_value = "decommissioned")]
        reason: String,
        /// Who decommissions (recorded in the log).
        #[arg(long = "as", env = "USER", default_value = "operator")]
        author: String,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Make an API token for one caller, with a role: `viewer` reads,
    /// `operator` also changes desired state (keys, configuration, patches,
    /// rollouts), `admin` also revokes certificates.
    ///
    /// Prints the token, for its holder only (pass it with --token or
    /// TRELLIS_TOKEN), and the [[api.tokens]] entry to add to every hub's
    /// configuration, which holds only the token's SHA-256. Changes made
    /// with the token are recorded under NAME in the management log. A hub
    /// bound beyond loopback requires a token on every request.
    #[command(
        after_help = "Example:\n  trellis api token --name ci-deploy --role operator >> hub.toml   # then give the token printed on stderr"
    )]
    Token {
        /// Who holds it (recorded as the author of what it changes).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: trellis_hub::apiauth::ApiRole,
        /// Print the token and the entry as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a new mesh CA (ca.crt, and ca.key readable only by you).
    #[command(after_help = "Example:\n  trellis ca init --dir ca")]
    Init {
        /// Directory to keep the CA in.
        #[arg(long)]
        dir: PathBuf,
        /// A name for the CA, shown in its certificate.
        #[arg(long, default_value = "trellis")]
        name: String,
        /// Print the files written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Issue a certificate and key for a member of the mesh.
    ///
    /// Writes NAME.crt and NAME.key (readable only by you). Nodes and relays
    /// need --region and --site; hubs need --region; operators neither.
    ///
    /// Example: trellis ca issue --dir ca --role node --region eu --site par-1 --name web-01
    Issue {
        /// Directory of the CA (from `trellis ca init`).
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long, default_value = "")]
        region: String,
        #[arg(long, default_value = "")]
        site: String,
        /// The member's name, unique in the mesh.
        #[arg(long)]
        name: String,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
        /// Where to write the certificate and key (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing certificate of that name.
        #[arg(long)]
        force: bool,
        /// Print the identity and the files written as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a member's certificates: every member refuses them within a
    /// minute, and closes connections already open with them.
    ///
    /// Finds the certificates issued to NAME in the CA directory's
    /// issued.jsonl (narrow with --role, --region, --site when the name is
    /// used twice), or takes one certificate file with --cert. Each is signed
    /// by the CA key and written into the replicated desired state through
    /// the hub; hubs send the list to their relays, relays to their nodes.
    /// A certificate issued to the same name afterwards works.
    ///
    /// --retire, for operators, only retires the key: hubs refuse new
    /// desired state signed with it, and what it signed stays valid
    /// (`trellis ca rotate` does this for you).
    #[command(
        after_help = "Examples:\n  trellis ca revoke --dir ca web-01 --reason 'disk sold'\n  trellis ca revoke --dir ca --cert old/web-01.crt"
    )]
    Revoke {
        /// Directory of the CA.
        #[arg(long)]
        dir: PathBuf,
        /// The member's name (see issued.jsonl in the CA directory).
        #[arg(required_unless_present = "cert")]
        name: Option<String>,
        #[arg(long, value_parser = parse_role)]
        role: Option<Role>,
        #[arg(long)]
        region: Option<String>,
        #[arg(long)]
        site: Option<String>,
        /// A certificate file to revoke, instead of looking NAME up.
        #[arg(long, conflicts_with = "name")]
        cert: Option<PathBuf>,
        /// Why, recorded with the revocation (at most 200 characters).
        #[arg(long, default_value = "revoked by an operator")]
        reason: String,
        /// Retire an operator's signing key instead of revoking it.
        #[arg(long)]
        retire: bool,
        /// Who revokes (recorded in the log).
        #[arg(long = "as", env = "USER", default_value = "operator")]
        author: String,
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
    /// Rotate an operator's signing key: issue a new certificate and key,
    /// and retire the old ones.
    ///
    /// Hubs refuse new configurations, patches and rollouts signed with a
    /// retired key; everything it signed before stays valid, so nothing is
    /// signed again. The retirements are written first: if the hub cannot
    /// be reached, nothing changes. (If the old key may be compromised,
    /// `trellis ca revoke` it instead.)
    #[command(after_help = "Example:\n  trellis ca rotate --dir ca --out ~/.trellis alice")]
    Rotate(RotateArgs),
    /// List the revocations a hub enforces (and sends to its relays).
    #[command(after_help = "Example:\n  trellis ca revocations")]
    Revocations {
        #[command(flatten)]
        hub: HubArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct RotateArgs {
    /// Directory of the CA.
    #[arg(long)]
    dir: PathBuf,
    /// The operator's name.
    name: String,
    /// Days the new certificate is valid.
    #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
    days: u32,
    /// Where the operator's certificate and key are (default: the CA
    /// directory); the new ones replace them.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long = "as", env = "USER", default_value = "operator")]
    author: String,
    #[command(flatten)]
    hub: HubArg,
    #[arg(long)]
    json: bool,
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse()
        .map_err(|e: trellis_node::id::IdError| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !matches!(args.command, Command::Up { .. }) {
        stop_quietly_on_closed_stdout();
    }
    cli::init_logging(args.log_format);
    if let Some(token) = args.token {
        trellis_hub::client::set_default_token(token);
    }
    match args.command {
        Command::Completions { shell } => {
            print!("{}", completions(shell));
            ExitCode::SUCCESS
        }
        Command::Ca(c) => ca(c),
        Command::Node(NodeCommand::Decommission {
            dir,
            name,
            region,
            site,
            reason,
            author,
            hub,
            json,
        }) => {
            let filter = CertFilter {
                name: Some(name),
                role: Some(Role::Node),
                region,
                site,
            };
            let targets = match filter.find(&dir) {
                Ok(t) => t,
                Err(e) => return cli::fail(EXIT_USAGE, &e),
            };
            runtime().block_on(post_revocations(
                &dir,
                &hub.hub,
                &author,
                targets,
                trellis_node::revocation::Kind::Decommissioned,
                &reason,
                json,
            ))
        }
        Command::Api(ApiCommand::Token { name, role, json }) => {
            if name.is_empty() || name.len() > 64 {
                return cli::fail(EXIT_USAGE, &"--name: 1 to 64 bytes");
            }
            let (token, entry) = trellis_hub::apiauth::new_token(&name, role);
            if json {
                let out = serde_json::json!({ "token": token, "entry": entry });
                println!("{out:#}");
            } else {
                eprintln!("token for {name} ({}), shown once: {token}", role.as_str());
                println!("[[api.tokens]]");
                println!("name = {:?}", entry.name);
                println!("role = {:?}", entry.role.as_str());
                println!("sha256 = {:?}", entry.sha256);
            }
            ExitCode::SUCCESS
        }
        Command::Status { hub, relay, json } => {
            runtime().block_on(status(&hub.hub, relay.as_deref(), json))
        }
        Command::Nodes {
            site,
            relay,
            region,
            hub,
            json,
        } => runtime().block_on(nodes(
            &hub.hub,
            relay.as_deref(),
            site.as_deref(),
            region.as_deref(),
            json,
        )),
        Command::Events {
            site,
            since,
            limit,
            hub,
            json,
        } => runtime().block_on(records(&hub.hub, json, |c| async move {
            c.events(site.as_deref(), Some(since_ms(since)), limit)
                .await
        })),
        Command::History {
            site,
            region,
            since,
            limit,
            hub,
            json,
        } => runtime().block_on(records(&hub.hub, json, |c| async move {
            c.history(&site, region.as_deref(), Some(since_ms(since)), None, limit)
                .await
        })),
        Command::Hubs { hub, json } => runtime().block_on(hubs(&hub.hub, json)),
        Command::Token(TokenCommand::Create {
            region,
            site,
            role,
            labels,
            uses,
            ttl,
            author,
            hub,
            json,
        }) => runtime().block_on(async {
            let client = match ApiClient::new(&hub.hub) {
                Ok(c) => c,
                Err(e) => return client_error(e),
            };
            let mut parsed = std::collections::BTreeMap::new();
            for l in &labels {
                let Some((k, v)) = l.split_once('=') else {
                    return cli::fail(
                        EXIT_USAGE,
                        &format!("--labels {l}: expected KEY=VALUE, like role=web"),
                    );
                };
                parsed.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            let request = trellis_hub::enrolapi::TokenRequest {
                region,
                site,
                role: Some(role),
                labels: parsed,
                uses: Some(uses),
                ttl: Some(ttl),
                author,
            };
            answer(client.token_create(&request).await, json, |t, _| {
                format!(
                    "{}\n\n{} join token {} for {}/{}: {} use(s), valid until {} (shown once; \
                     give it to `trellis-{} enroll --token`)\n",
                    t.token,
                    t.record.role,
                    t.record.id,
                    t.record.region,
                    t.record.site,
                    t.record.uses,
                    render::when_ms(t.record.expires_ms),
                    t.record.role
                )
            })
        }),
        Command::Token(TokenCommand::List { hub, json }) => runtime().block_on(async {
            let client = match ApiClient::new(&hub.hub) {
                Ok(c) => c,
                Err(e) => return client_error(e),
            };
            answer(client.tokens().await, json, |all, _| {
                if all.is_empty() {
                    return "no join tokens\n".to_owned();
                }
                let mut out = String::new();
                for t in all {
                    out.push_str(&format!(
                        "{}  {:<5}  {}/{}  used {}/{}  until {}  by {}\n",
                        t.id,
                        t.role.as_str(),
                        t.region,
                        t.site,
                        t.used,
                        t.uses,
                        render::when_ms(t.expires_ms),
                        t.created_by
                    ));
                }
                out
            })
        }),
        Command::Versions { hub, json } => runtime().block_on(async {
            let client = match ApiClient::new(&hub.hub) {
                Ok(c) => c,
                Err(e) => return client_error(e),
            };
            answer(client.versions().await, json, render::versions)
        }),
        Command::Incidents { all, hub, json } => runtime().block_on(incidents(&hub.hub, all, json)),
        Command::Desired(cmd) => runtime().block_on(desired(cmd)),
        Command::Config(ConfigCommand::Plan { dir, hub, json }) => {
            runtime().block_on(config_plan(&dir, &hub.hub, json))
        }
        Command::Config(ConfigCommand::Apply {
            dir,
            operator,
            comment,
            follow,
            hub,
        }) => runtime().block_on(config_apply(
            Source::Dir(dir),
            &operator,
            comment,
            &follow,
            &hub.hub,
        )),
        Command::Config(ConfigCommand::Rollback {
            version,
            operator,
            follow,
            hub,
        }) => runtime().block_on(config_apply(
            Source::Version(version),
            &operator,
            String::new(),
            &follow,
            &hub.hub,
        )),
        Command::Config(ConfigCommand::History { hub, json }) => runtime()
            .block_on(with_client(&hub.hub, |c| async move {
                answer(c.config_history().await, json, render::config_history)
            })),
        Command::Config(ConfigCommand::Show { version, hub, json }) => {
            runtime().block_on(with_client(&hub.hub, |c| async move {
                answer(c.config_show(version).await, json, render::config_show)
            }))
        }
        Command::Config(ConfigCommand::Status { hub, json }) => runtime()
            .block_on(with_client(&hub.hub, |c| async move {
                answer(c.config_status().await, json, render::config_status)
            })),
        Command::Audit(cmd) => runtime().block_on(audit(cmd)),
        Command::Patch(PatchCommand::Publish {
            dir,
            operator,
            hub,
            json,
        }) => runtime().block_on(patch_publish(&dir, &operator, &hub.hub, json)),
        Command::Patch(PatchCommand::Stage {
            name,
            site,
            hub,
            json,
        }) => runtime().block_on(with_client(&hub.hub, |c| async move {
            let report = c.patch_stage(&name, site.as_deref()).await;
            let failed = report
                .as_ref()
                .is_ok_and(|r| r.sites.iter().any(|s| s.error.is_some()));
            let code = answer(report, json, render::patch_staged);
            if failed {
                ExitCode::from(EXIT_FAILED)
            } else {
                code
            }
        })),
        Command::Rollout(cmd) => runtime().block_on(rollout(cmd)),
        Command::Patch(PatchCommand::List { hub, json }) => runtime()
            .block_on(with_client(&hub.hub, |c| async move {
                answer(c.patch_list().await, json, render::patch_list)
            })),
        Command::Patch(PatchCommand::Show { name, hub, json }) => runtime()
            .block_on(with_client(&hub.hub, |c| async move {
                answer(c.patch_show(&name).await, json, render::patch_show)
            })),
        Command::Up {
            sites,
            nodes,
            hubs,
            api,
            dir,
            gossip_interval,
        } => {
            let opts = UpOptions {
                sites,
                nodes,
                hubs,
                api,
                dir,
                gossip_interval: gossip_interval.into(),
            };
            runtime().block_on(up(opts))
        }
    }
}

/// The completion script of `trellis` for `shell`.
fn completions(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Args::command(), "trellis", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn ca(cmd: CaCommand) -> ExitCode {
    let code = |e: &TlsError| match e {
        TlsError::Identity(_) | TlsError::Exists { .. } | TlsError::NoCa { .. } => EXIT_USAGE,
        _ => EXIT_FAILED,
    };
    match cmd {
        CaCommand::Init { dir, name, json } => {
            let result = MeshCa::generate(&name).and_then(|ca| ca.save(&dir));
            match result {
                Ok(()) if json => {
                    let out = serde_json::json!({
                        "ca_cert": dir.join(CA_CERT_FILE),
                        "ca_key": dir.join(trellis_node::tls::CA_KEY_FILE),
                    });
                    println!("{out:#}");
                    ExitCode::SUCCESS
                }
                Ok(()) => {
                    println!("created mesh CA in {}", dir.display());
                    println!(
                        "  {}  the CA certificate: give it to every member",
                        dir.join(CA_CERT_FILE).display()
                    );
                    println!(
                        "  {}  the CA key: keep it secret",
                        dir.join(trellis_node::tls::CA_KEY_FILE).display()
                    );
                    println!(
                        "next: trellis ca issue --dir {} --role node --region R --site S --name N",
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => cli::fail(code(&e), &e),
            }
        }
        CaCommand::Issue {
            dir,
            role,
            region,
            site,
            name,
            days,
            out,
            force,
            json,
        } => {
            if days == 0 || days > 3650 {
                return cli::fail(EXIT_USAGE, &"--days must be between 1 and 3650");
            }
            let result = (|| {
                let identity = Identity::new(role, region, site, name)?;
                let ca = MeshCa::load(&dir)?;
                let issued = ca.issue(&identity, days)?;
                let paths = issued.save(out.as_deref().unwrap_or(&dir), force)?;
                IssuedRecord::of(&identity, &issued.cert_pem)?.append(&dir)?;
                Ok::<_, TlsError>((identity, paths))
            })();
            match result {
                Ok((identity, (cert, key))) if json => {
                    let out = serde_json::json!({
                        "identity": identity.to_string(),
                        "days": days,
                        "cert": cert,
                        "key": key,
                    });
                    println!("{out:#}");
                    ExitCode::SUCCESS
                }
                Ok((identity, (cert, key))) => {
                    println!("issued {identity}, valid {days} days");
                    println!("  {}", cert.display());
                    println!("  {}", key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => cli::fail(code(&e), &e),
            }
        }
        CaCommand::Revoke {
            dir,
            name,
            role,
            region,
            site,
            cert,
            reason,
            retire,
            author,
            hub,
            json,
        } => {
            let filter = CertFilter {
                name,
                role,
                region,
                site,
            };
            let kind = if retire {
                trellis_node::revocation::Kind::Retired
            } else {
                trellis_node::revocation::Kind::Revoked
            };
            let targets = match cert {
                Some(path) => cert_file_target(&path),
                None => filter.find(&dir),
            };
            let targets = match targets {
                Ok(t) => t,
                Err(e) => return cli::fail(EXIT_USAGE, &e),
            };
            if retire
                && targets
                    .iter()
                    .any(|t| !t.identity.starts_with("trellis://operator/"))
            {
                return cli::fail(
                    EXIT_USAGE,
                    &"--retire is for operator keys; revoke other members",
                );
            }
            runtime().block_on(post_revocations(
                &dir, &hub.hub, &author, targets, kind, &reason, json,
            ))
        }
        CaCommand::Revocations { hub, json } => {
            let client = match ApiClient::new(&hub.hub) {
                Ok(c) => c,
                Err(e) => return client_error(e),
            };
            answer(runtime().block_on(client.revocations()), json, |l, _| {
                let mut out = format!(
                    "{} revocation(s) in force, digest {}\n",
                    l.entries.len(),
                    l.digest
                );
                for r in &l.entries {
                    out.push_str(&format!(
                        "  {:<8} {}  {}  {}\n",
                        r.kind.as_str(),
                        &r.fingerprint[..16],
                        r.identity,
                        r.reason
                    ));
                }
                out
            })
        }
        CaCommand::Rotate(RotateArgs {
            dir,
            name,
            days,
            out,
            author,
            hub,
            json,
        }) => {
            if days == 0 || days > 3650 {
                return cli::fail(EXIT_USAGE, &"--days must be between 1 and 3650");
            }
            runtime().block_on(rotate(&dir, &name, days, out, &author, &hub.hub, json))
        }
    }
}

/// Which recorded certificates `trellis ca revoke NAME` means.
struct CertFilter {
    name: Option<String>,
    role: Option<Role>,
    region: Option<String>,
    site: Option<String>,
}

impl CertFilter {
    /// The certificates issued to one identity that have not expired;
    /// an error if none, or if the name fits several identities.
    fn find(&self, dir: &std::path::Path) -> Result<Vec<IssuedRecord>, String> {
        let name = self.name.as_deref().unwrap_or_default();
        let records = IssuedRecord::load_all(dir).map_err(|e| e.to_string())?;
        let now = unix_now();
        let fits: Vec<IssuedRecord> = records
            .into_iter()
            .filter(|r| {
                let Ok(id) = Identity::from_uri(&r.identity) else {
                    return false;
                };
                id.name == name
                    && self.role.is_none_or(|role| id.role == role)
                    && self.region.as_ref().is_none_or(|g| &id.region == g)
                    && self.site.as_ref().is_none_or(|s| &id.site == s)
                    && r.not_after > now
            })
            .collect();
        let mut identities: Vec<&str> = fits.iter().map(|r| r.identity.as_str()).collect();
        identities.sort();
        identities.dedup();
        match identities.len() {
            0 => Err(format!(
                "no unexpired certificate issued to {name:?} is recorded in {} (certificates issued \
                 before the CA kept that file: pass --cert FILE)",
                dir.join(trellis_node::tls::ISSUED_FILE).display()
            )),
            1 => Ok(fits),
            _ => Err(format!(
                "{name:?} names several members: {}; narrow with --role, --region or --site",
                identities.join(", ")
            )),
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The record of one certificate file.
fn cert_file_target(path: &std::path::Path) -> Result<Vec<IssuedRecord>, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let identity =
        trellis_node::tls::identity_of_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    IssuedRecord::of(&identity, &pem)
        .map_err(|e| format!("{}: {e}", path.display()))
        .map(|r| vec![r])
}

/// Signs one revocation per target with the CA key and writes each
/// through the hub.
async fn post_revocations(
    dir: &std::path::Path,
    hub: &str,
    author: &str,
    targets: Vec<IssuedRecord>,
    kind: trellis_node::revocation::Kind,
    reason: &str,
    json: bool,
) -> ExitCode {
    let signed = match sign_revocations(dir, &targets, kind, reason) {
        Ok(s) => s,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    let mut answers = Vec::new();
    for s in &signed {
        match client.revoke(s, author).await {
            Ok(a) => answers.push(a),
            Err(e) => return client_error(e),
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answers).expect("serialisable")
        );
    } else {
        for a in &answers {
            let r = &a.revocation;
            let note = if a.already { " (already)" } else { "" };
            println!(
                "{} {} certificate {}{note}",
                r.kind.as_str(),
                r.identity,
                &r.fingerprint[..16]
            );
        }
        println!(
            "members refuse it within a minute; `trellis ca revocations` lists what is in force"
        );
    }
    ExitCode::SUCCESS
}

fn sign_revocations(
    dir: &std::path::Path,
    targets: &[IssuedRecord],
    kind: trellis_node::revocation::Kind,
    reason: &str,
) -> Result<Vec<trellis_node::revocation::SignedRevocation>, String> {
    use trellis_node::revocation::{MAX_REASON_CHARS, Revocation};
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(format!("--reason: at most {MAX_REASON_CHARS} characters"));
    }
    let ca = MeshCa::load(dir).map_err(|e| e.to_string())?;
    targets
        .iter()
        .map(|t| {
            let fingerprint = trellis_node::distribute::parse_hex32(&t.fingerprint)
                .ok_or_else(|| format!("bad fingerprint {:?} in issued.jsonl", t.fingerprint))?;
            ca.sign_revocation(&Revocation {
                fingerprint,
                identity: t.identity.clone(),
                not_after: t.not_after,
                at: unix_now(),
                kind,
                reason: reason.to_owned(),
            })
            .map_err(|e| e.to_string())
        })
        .collect()
}

async fn rotate(
    dir: &std::path::Path,
    name: &str,
    days: u32,
    out: Option<PathBuf>,
    author: &str,
    hub: &str,
    json: bool,
) -> ExitCode {
    let filter = CertFilter {
        name: Some(name.to_owned()),
        role: Some(Role::Operator),
        region: None,
        site: None,
    };
    let old = match filter.find(dir) {
        Ok(old) => old,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let issued = match Identity::new(Role::Operator, "", "", name)
        .map_err(TlsError::from)
        .and_then(|id| MeshCa::load(dir)?.issue(&id, days))
    {
        Ok(i) => i,
        Err(e) => return cli::fail(EXIT_FAILED, &e),
    };
    let signed = match sign_revocations(
        dir,
        &old,
        trellis_node::revocation::Kind::Retired,
        "key rotated",
    ) {
        Ok(s) => s,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    for s in &signed {
        if let Err(e) = client.revoke(s, author).await {
            eprintln!("the old key is still current; nothing was written");
            return client_error(e);
        }
    }
    let out = out.unwrap_or_else(|| dir.to_owned());
    let written = issued.save(&out, true).and_then(|paths| {
        IssuedRecord::of(&issued.identity, &issued.cert_pem)?.append(dir)?;
        Ok(paths)
    });
    match written {
        Ok((cert, key)) if json => {
            let out = serde_json::json!({
                "identity": issued.identity.to_string(),
                "retired": old.iter().map(|r| r.fingerprint.clone()).collect::<Vec<_>>(),
                "cert": cert,
                "key": key,
            });
            println!("{out:#}");
            ExitCode::SUCCESS
        }
        Ok((cert, key)) => {
            println!(
                "rotated {}: {} old key(s) retired, new certificate valid {days} days",
                issued.identity,
                old.len()
            );
            println!("  {}", cert.display());
            println!("  {}", key.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "the old key is retired but the new one could not be written; issue one with \
                 `trellis ca issue --role operator --name {name} --force`"
            );
            cli::fail(EXIT_FAILED, &e)
        }
    }
}

fn client_error(e: ClientError) -> ExitCode {
    let code = match e {
        ClientError::BadUrl(_) => EXIT_USAGE,
        ClientError::Api { status: 404, .. } => EXIT_USAGE,
        _ => EXIT_FAILED,
    };
    cli::fail(code, &e)
}

async fn status(hub: &str, relay: Option<&str>, json: bool) -> ExitCode {
    let client = match ApiClient::new(relay.unwrap_or(hub)) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    let report = match relay {
        Some(_) => client.relay_site().await,
        None => client.fleet().await,
    };
    answer(report, json, render::fleet)
}

async fn nodes(
    hub: &str,
    relay: Option<&str>,
    site: Option<&str>,
    region: Option<&str>,
    json: bool,
) -> ExitCode {
    let client = match ApiClient::new(relay.unwrap_or(hub)) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    let report = match (relay, site) {
        (Some(_), _) => client.relay_nodes().await,
        (None, Some(site)) => client.nodes(site, region).await,
        (None, None) => return cli::fail(EXIT_USAGE, &"name a SITE, or use --relay URL"),
    };
    answer(report, json, render::nodes)
}

async fn config_plan(dir: &std::path::Path, hub: &str, json: bool) -> ExitCode {
    let fleet = match Fleet::load(dir) {
        Ok(f) => f,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    let inv = match inventory(&client).await {
        Ok(i) => i,
        Err(e) => return client_error(e),
    };
    let current = match client.config_history().await {
        Ok(h) => match h.versions.first() {
            Some(v) => match client.config_show(v.version).await {
                Ok(show) => Some(show),
                Err(e) => return client_error(e),
            },
            None => None,
        },
        Err(e) => return client_error(e),
    };
    let plan = plan(current.as_ref().map(|c| &c.fleet), &fleet, &inv.nodes);
    if json {
        let out = serde_json::json!({
            "compared_with": current.as_ref().map(|c| c.version.version),
            "plan": plan,
            "unlisted_sites": inv.unlisted,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serialisable")
        );
    } else {
        match &current {
            Some(c) => println!(
                "compared with: v{} (signed by {}), the newest stored version",
                c.version.version, c.version.author
            ),
            None => {
                println!("compared with: nothing managed yet (no version is stored at the hubs)")
            }
        }
        print!("{plan}");
        if !inv.unlisted.is_empty() {
            println!(
                "{} site(s) did not answer; their nodes are not in this plan:",
                inv.unlisted.len()
            );
            for u in &inv.unlisted {
                println!("  {}/{}: {}", u.region, u.site, u.reason);
            }
        }
    }
    if plan.failing > 0 {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}

async fn with_client<F, Fut>(hub: &str, run: F) -> ExitCode
where
    F: FnOnce(ApiClient) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    match ApiClient::new(hub) {
        Ok(c) => run(c).await,
        Err(e) => client_error(e),
    }
}

/// What `config apply` signs: a fleet directory, or (rollback) a stored
/// version's fleet.
enum Source {
    Dir(PathBuf),
    Version(u64),
}

async fn config_apply(
    source: Source,
    operator: &OperatorArg,
    comment: String,
    follow: &FollowArg,
    hub: &str,
) -> ExitCode {
    let creds = match Credentials::load(&operator.ca, &operator.cert, &operator.key) {
        Ok(c) => c,
        Err(e) => {
            return cli::fail(
                EXIT_USAGE,
                &format!("cannot use the operator credentials: {e}"),
            );
        }
    };
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    let (fleet, comment) = match source {
        Source::Dir(dir) => match Fleet::load(&dir) {
            Ok(f) => (f, comment),
            Err(e) => return cli::fail(EXIT_USAGE, &e),
        },
        Source::Version(v) => {
            let signed = match client.config_bundle(v).await {
                Ok(s) => s,
                Err(e) => return client_error(e),
            };
            match trellis_node::bundle::verify(&creds, &signed) {
                Ok((b, _)) if b.version == v => (b.fleet, format!("rollback to v{v}")),
                Ok((b, _)) => {
                    return cli::fail(
                        EXIT_FAILED,
                        &format!("the hub served version {} when asked for {v}", b.version),
                    );
                }
                Err(e) => {
                    return cli::fail(EXIT_FAILED, &format!("version {v} does not verify: {e}"));
                }
            }
        }
    };
    let latest = match client.config_history().await {
        Ok(h) => h.versions.first().map_or(0, |v| v.version),
        Err(e) => return client_error(e),
    };
    let bundle = trellis_node::bundle::Bundle {
        version: latest + 1,
        created_ms: trellis_node::clock::unix_ms(),
        comment,
        fleet,
    };
    let signed = match trellis_node::bundle::sign(&creds, &bundle) {
        Ok(s) => s,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let stored = match client.config_apply(&signed).await {
        Ok(s) => s,
        Err(e) => return client_error(e),
    };
    if follow.json {
        let rollout = if follow.no_wait {
            None
        } else {
            Some(follow_rollout(&client, stored.version, follow.timeout, true).await)
        };
        let code = rollout.as_ref().map_or(ExitCode::SUCCESS, |(c, _)| *c);
        let out = serde_json::json!({
            "stored": stored,
            "rollout": rollout.and_then(|(_, r)| r),
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&out).expect("serialisable")
        );
        return code;
    }
    println!(
        "stored v{} ({}) signed by {}: entry {}/{}, durable on {}",
        stored.version,
        &stored.digest[..16],
        stored.operator,
        stored.write.origin,
        stored.write.seq,
        stored.write.durable_on.join(", ")
    );
    if stored.write.durable_on.len() < stored.write.write_quorum {
        eprintln!(
            "warning: only {} of the {} hubs required hold it yet; it replicates to the others when they are reachable",
            stored.write.durable_on.len(),
            stored.write.write_quorum
        );
    }
    if follow.no_wait {
        println!("not waiting; follow it with `trellis config status`");
        return ExitCode::SUCCESS;
    }
    follow_rollout(&client, stored.version, follow.timeout, false)
        .await
        .0
}

/// Shows the rollout of `version` until it settles or `timeout` passes;
/// returns the exit code and where it ended. `quiet`: the progress line
/// only, no verdict on stdout.
async fn follow_rollout(
    client: &ApiClient,
    version: u64,
    timeout: Duration,
    quiet: bool,
) -> (ExitCode, Option<Rollout>) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_line = String::new();
    let mut last = None;
    loop {
        match client.config_status().await {
            Ok(status) => {
                let r = Rollout::of(&status, version);
                let line = r.line(30);
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else if line != last_line {
                    eprintln!("{line}");
                }
                last_line = line;
                let settled = r.settled();
                last = Some(r);
                if settled {
                    break;
                }
            }
            Err(e) => eprintln!("{}cannot ask the hub: {e}", if tty { "\n" } else { "" }),
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if tty {
        eprintln!();
    }
    let Some(r) = last else {
        return (
            cli::fail(
                EXIT_FAILED,
                &"the hub did not answer while the rollout was followed",
            ),
            None,
        );
    };
    let code = rollout_verdict(&r, version, timeout, quiet);
    (code, Some(r))
}

/// What a followed rollout came to, said on stdout unless `quiet`, and the
/// exit code it means.
fn rollout_verdict(r: &Rollout, version: u64, timeout: Duration, quiet: bool) -> ExitCode {
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    for site in &r.unreachable {
        say(format!(
            "{site}: unreachable now; its relay gets v{version} when the link returns and its nodes apply it then"
        ));
    }
    for node in &r.failing {
        say(format!(
            "{node}: failed or refused v{version}; `trellis config status` and `trellis events` say why"
        ));
    }
    if let Some(newer) = r.superseded_by {
        say(format!(
            "v{newer} was stored since; v{version} is no longer rolled out"
        ));
        return ExitCode::from(EXIT_FAILED);
    }
    if r.succeeded() {
        say(format!(
            "v{version}: every alive node of every reachable site holds it ({})",
            r.holding
        ));
        ExitCode::SUCCESS
    } else if r.settled() {
        ExitCode::from(EXIT_FAILED)
    } else {
        say(format!(
            "gave up waiting after {}: {}/{} nodes hold v{version}; the rollout goes on",
            humantime::format_duration(timeout),
            r.holding,
            r.nodes_alive
        ));
        ExitCode::from(EXIT_FAILED)
    }
}

fn load_operator(operator: &OperatorArg) -> Result<Credentials, ExitCode> {
    Credentials::load(&operator.ca, &operator.cert, &operator.key).map_err(|e| {
        cli::fail(
            EXIT_USAGE,
            &format!("cannot use the operator credentials: {e}"),
        )
    })
}

async fn rollout(cmd: RolloutCommand) -> ExitCode {
    use trellis_hub::patchrollout::Control;
    use trellis_hub::rolloutapi::{SignedRequest, StartRollout};
    match cmd {
        RolloutCommand::Start {
            patch,
            waves,
            bake,
            max_failure,
            no_auto_rollback,
            operator,
            hub,
            json,
        } => {
            if let Err(e) = trellis_node::waves::parse_waves(&waves) {
                return cli::fail(EXIT_USAGE, &format!("--waves {waves:?}: {e}"));
            }
            let creds = match load_operator(&operator) {
                Ok(c) => c,
                Err(code) => return code,
            };
            with_client(&hub.hub, |c| async move {
                let inv = match inventory(&c).await {
                    Ok(i) => i,
                    Err(e) => return client_error(e),
                };
                for u in &inv.unlisted {
                    eprintln!(
                        "warning: site {}/{} did not list its nodes ({}); they are not in this rollout",
                        u.region, u.site, u.reason
                    );
                }
                let req = StartRollout {
                    patch,
                    waves,
                    bake_ms: bake.map(|b| b.as_millis() as u64),
                    max_failure,
                    auto_rollback: !no_auto_rollback,
                    nodes: inv.nodes,
                    at_ms: trellis_node::clock::unix_ms(),
                };
                let signed = match SignedRequest::sign(&creds, &req) {
                    Ok(s) => s,
                    Err(e) => return cli::fail(EXIT_USAGE, &e),
                };
                answer(c.rollout_start(&signed).await, json, render::rollout_status)
            })
            .await
        }
        RolloutCommand::Status { run, hub, json } => {
            let run = run.map_or("latest".to_owned(), |r| r.to_string());
            with_client(&hub.hub, |c| async move {
                answer(c.rollout(&run).await, json, render::rollout_status)
            })
            .await
        }
        RolloutCommand::List { hub, json } => {
            with_client(&hub.hub, |c| async move {
                answer(c.rollouts().await, json, render::rollout_list)
            })
            .await
        }
        RolloutCommand::Pause {
            run,
            operator,
            hub,
            json,
        } => rollout_control(Control::Pause, run, &operator, &hub.hub, json).await,
        RolloutCommand::Resume {
            run,
            operator,
            hub,
            json,
        } => rollout_control(Control::Resume, run, &operator, &hub.hub, json).await,
        RolloutCommand::Abort {
            run,
            operator,
            hub,
            json,
        } => rollout_control(Control::Abort, run, &operator, &hub.hub, json).await,
    }
}

async fn rollout_control(
    control: trellis_hub::patchrollout::Control,
    run: Option<u64>,
    operator: &OperatorArg,
    hub: &str,
    json: bool,
) -> ExitCode {
    use trellis_hub::rolloutapi::{ControlRollout, SignedRequest};
    let creds = match load_operator(operator) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let req = ControlRollout {
        control,
        at_ms: trellis_node::clock::unix_ms(),
    };
    let signed = match SignedRequest::sign(&creds, &req) {
        Ok(s) => s,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let run = run.map_or("latest".to_owned(), |r| r.to_string());
    with_client(hub, |c| async move {
        answer(
            c.rollout_control(&run, &signed).await,
            json,
            render::rollout_status,
        )
    })
    .await
}

async fn patch_publish(
    dir: &std::path::Path,
    operator: &OperatorArg,
    hub: &str,
    json: bool,
) -> ExitCode {
    use std::io::{IsTerminal, Read, Seek, SeekFrom};
    use trellis_node::distribute::hex32;
    use trellis_node::patch::{CHUNK_SIZE, Patch, sign};
    let creds = match load_operator(operator) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let patch = match Patch::load(dir) {
        Ok(p) => p,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let signed = match sign(&creds, &patch.manifest) {
        Ok(s) => s,
        Err(e) => return cli::fail(EXIT_USAGE, &e),
    };
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    // Where each chunk is: (artifact file, offset, length), once per hash.
    let mut places: std::collections::BTreeMap<String, (PathBuf, u64, u64)> = Default::default();
    for a in &patch.manifest.artifacts {
        for (i, h) in (0u32..).zip(&a.chunks) {
            let len = a.chunk_len(i).unwrap_or(0);
            places.entry(hex32(h)).or_insert((
                patch.artifact_path(a),
                u64::from(i) * u64::from(CHUNK_SIZE),
                len,
            ));
        }
    }
    let missing = match client
        .chunks_missing(places.keys().cloned().collect())
        .await
    {
        Ok(m) => m,
        Err(e) => return client_error(e),
    };
    let tty = std::io::stderr().is_terminal();
    let total = missing.len();
    eprintln!(
        "{} chunks in {} artifacts; the hub lacks {total}",
        places.len(),
        patch.manifest.artifacts.len()
    );
    for (done, hash) in missing.iter().enumerate() {
        let Some((path, offset, len)) = places.get(hash) else {
            continue;
        };
        let mut bytes = vec![0; *len as usize];
        let read = std::fs::File::open(path).and_then(|mut f| {
            f.seek(SeekFrom::Start(*offset))?;
            f.read_exact(&mut bytes)
        });
        if let Err(e) = read {
            return cli::fail(EXIT_FAILED, &format!("cannot read {}: {e}", path.display()));
        }
        if let Err(e) = client.chunk_put(hash, bytes).await {
            eprintln!();
            eprintln!("uploaded {done} of {total} chunks; run the same command again to resume");
            return client_error(e);
        }
        if tty {
            let width = 30;
            let filled = (done + 1) * width / total.max(1);
            eprint!(
                "\r[{}{}] uploading: {}/{total} chunks\x1b[K",
                "#".repeat(filled),
                "-".repeat(width - filled),
                done + 1
            );
        } else if (done + 1) % 64 == 0 || done + 1 == total {
            eprintln!("uploading: {}/{total} chunks", done + 1);
        }
    }
    if tty && total > 0 {
        eprintln!();
    }
    match client.patch_publish(&signed).await {
        Ok(p) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&p).expect("serialisable")
            );
            ExitCode::SUCCESS
        }
        Ok(p) if p.already => {
            println!(
                "{} {} ({}) was already published",
                p.name,
                p.version,
                &p.id[..16]
            );
            ExitCode::SUCCESS
        }
        Ok(p) => {
            let w = p.write.as_ref();
            println!(
                "published {} {} ({}) signed by {}: entry {}, durable on {}",
                p.name,
                p.version,
                &p.id[..16],
                p.operator,
                w.map_or(String::new(), |w| format!("{}/{}", w.origin, w.seq)),
                w.map_or(String::new(), |w| w.durable_on.join(", "))
            );
            ExitCode::SUCCESS
        }
        Err(e) => client_error(e),
    }
}

async fn hubs(hub: &str, json: bool) -> ExitCode {
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    answer(client.hubs().await, json, render::hubs)
}

async fn incidents(hub: &str, all: bool, json: bool) -> ExitCode {
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    answer(client.incidents(all).await, json, render::incidents)
}

async fn desired(cmd: DesiredCommand) -> ExitCode {
    let hub = match &cmd {
        DesiredCommand::Get { hub, .. }
        | DesiredCommand::Set { hub, .. }
        | DesiredCommand::Delete { hub, .. } => hub.hub.clone(),
    };
    let client = match ApiClient::new(&hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    match cmd {
        DesiredCommand::Get { key, json, .. } => match client.desired().await {
            Ok(r) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("serialisable")
                );
                ExitCode::SUCCESS
            }
            Ok(r) => match key {
                Some(k) => match r.keys.get(&k) {
                    Some(w) => {
                        println!("{}", w.value.as_deref().unwrap_or(""));
                        ExitCode::SUCCESS
                    }
                    None => cli::fail(EXIT_FAILED, &format!("no desired state for {k:?}")),
                },
                None => {
                    for (k, w) in &r.keys {
                        println!(
                            "{k} = {}   ({} via {}, entry {}/{})",
                            w.value.as_deref().unwrap_or(""),
                            w.author,
                            w.origin,
                            w.origin,
                            w.seq
                        );
                    }
                    if r.keys.is_empty() {
                        println!("no desired state yet");
                    }
                    ExitCode::SUCCESS
                }
            },
            Err(e) => client_error(e),
        },
        DesiredCommand::Set {
            key,
            value,
            author,
            json,
            ..
        } => report_write(
            client.write_desired(&key, Some(&value), &author).await,
            json,
        ),
        DesiredCommand::Delete {
            key, author, json, ..
        } => report_write(client.write_desired(&key, None, &author).await, json),
    }
}

async fn audit(cmd: AuditCommand) -> ExitCode {
    let hub = match &cmd {
        AuditCommand::Log { hub, .. } | AuditCommand::Verify { hub, .. } => hub.hub.clone(),
    };
    let client = match ApiClient::new(&hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    match cmd {
        AuditCommand::Log {
            since,
            origin,
            limit,
            json,
            ..
        } => answer(
            client
                .audit(since.map(since_ms), origin.as_deref(), limit)
                .await,
            json,
            render::audit,
        ),
        AuditCommand::Verify { json, .. } => match client.audit_verify().await {
            Ok(r) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r).expect("serialisable")
                    );
                } else {
                    print!("{}", render::audit_verdict(&r, render::use_colour()));
                }
                if r.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_FAILED)
                }
            }
            Err(e) => client_error(e),
        },
    }
}

fn report_write(r: Result<trellis_hub::api::WriteReport, ClientError>, json: bool) -> ExitCode {
    match r {
        Ok(w) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&w).expect("serialisable")
            );
            ExitCode::SUCCESS
        }
        Ok(w) => {
            println!(
                "written: entry {}/{}, durable on {} ({} required)",
                w.origin,
                w.seq,
                w.durable_on.join(", "),
                w.write_quorum
            );
            ExitCode::SUCCESS
        }
        Err(e) => client_error(e),
    }
}

fn since_ms(ago: Duration) -> u64 {
    trellis_node::clock::unix_ms().saturating_sub(ago.as_millis() as u64)
}

async fn records<F, Fut>(hub: &str, json: bool, fetch: F) -> ExitCode
where
    F: FnOnce(ApiClient) -> Fut,
    Fut: std::future::Future<Output = Result<trellis_hub::api::RecordsReport, ClientError>>,
{
    let client = match ApiClient::new(hub) {
        Ok(c) => c,
        Err(e) => return client_error(e),
    };
    answer(fetch(client).await, json, render::records)
}

/// Prints an API answer: its JSON with `--json`, else rendered for a
/// person (in colour on a terminal).
/// Makes a closed stdout (`trellis events --json | head`) end the process
/// quietly, as it ends `cat` or `grep`, instead of panicking in `print!`.
/// Rust ignores SIGPIPE so that a write to a closed socket is an error; the
/// CLI's sockets are written with `MSG_NOSIGNAL` anyway, so restoring the
/// default only affects stdout and stderr. `trellis up`, which runs
/// servers, keeps the ignoring.
fn stop_quietly_on_closed_stdout() {
    // SAFETY: setting a signal's disposition to its default, at start,
    // before any thread is spawned.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn answer<T: serde::Serialize>(
    report: Result<T, ClientError>,
    json: bool,
    render: impl FnOnce(&T, bool) -> String,
) -> ExitCode {
    match report {
        Ok(r) if json => {
            println!(
                "{}",
                serde_json::to_string_pretty(&r).expect("serialisable")
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            print!("{}", render(&r, render::use_colour()));
            ExitCode::SUCCESS
        }
        Err(e) => client_error(e),
    }
}

async fn up(opts: UpOptions) -> ExitCode {
    let shutdown = cli::shutdown_on_signal();
    println!(
        "starting a local Trellis mesh: {} hub{}, {} sites × {} nodes on 127.0.0.1",
        opts.hubs,
        if opts.hubs == 1 { "" } else { "s" },
        opts.sites,
        opts.nodes
    );
    let mesh = match LocalMesh::start(&opts, shutdown.clone()).await {
        Ok(m) => m,
        Err(e) => {
            shutdown.cancel();
            return cli::fail(EXIT_FAILED, &format!("{e:#}"));
        }
    };
    let api = format!("http://{}", mesh.hubs[0].api_addr());
    println!("  mesh CA:      {}", mesh.dir().display());
    for (i, h) in mesh.hubs.iter().enumerate() {
        println!(
            "  hub-{}:        uplink {} (QUIC), API http://{}",
            i + 1,
            h.uplink_addr(),
            h.api_addr()
        );
    }
    println!("  API:          {api}");
    println!("  dashboard:    {api}/ (open it in a browser)");
    for r in &mesh.relays {
        if let Some(a) = r.api_addr() {
            println!("  relay API:    http://{a} (trellis status --relay http://{a})");
        }
    }
    let tty = render::use_colour();
    let mut last = None;
    let waited = tokio::select! {
        _ = shutdown.cancelled() => None,
        w = mesh.wait_all_alive(Duration::from_secs(60), |alive, total| {
            if last != Some(alive) {
                last = Some(alive);
                if tty {
                    print!("\r  waiting:      {alive}/{total} nodes alive at the hub");
                    let _ = std::io::stdout().flush();
                }
            }
        }) => w,
    };
    if tty {
        println!();
    }
    match waited {
        Some(t) => println!(
            "all {} nodes alive at the hub after {:.1} s",
            mesh.expected_nodes(),
            t.as_secs_f64()
        ),
        None if shutdown.is_cancelled() => {}
        None => println!("not every node is alive at the hub after 60 s; see `trellis status`"),
    }
    let hub_flag = if api == "http://127.0.0.1:7800" {
        String::new()
    } else {
        format!(" --hub {api}")
    };
    println!();
    println!("look at it from another shell:");
    println!("  cargo run --release --bin trellis -- status{hub_flag}");
    println!("  cargo run --release --bin trellis -- nodes site-1{hub_flag}");
    println!("  curl {api}/api/v1/fleet");
    println!("  curl {api}/metrics");
    let d = mesh.dir().display();
    println!("roll out configuration (each node writes under {d}/NODE/root):");
    println!(
        "  cargo run --release --bin trellis -- config apply examples/fleet --cert {d}/{op}.crt --key {d}/{op}.key --ca {d}/ca.crt{hub_flag}",
        op = trellis_hub::up::OPERATOR
    );
    println!("  cargo run --release --bin trellis -- config status{hub_flag}");
    println!("Ctrl-C stops the mesh.");
    let _ = std::io::stdout().flush();
    shutdown.cancelled().await;
    println!("stopping...");
    mesh.stopped().await;
    println!("stopped");
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_scripts_know_the_subcommands_for_each_shell() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completions(shell);
            assert!(!script.is_empty(), "{shell}: empty script");
            for word in ["rollout", "config", "completions"] {
                assert!(script.contains(word), "{shell}: no {word:?} in\n{script}");
            }
        }
    }

    #[test]
    fn the_log_format_is_an_option_of_every_subcommand() {
        let args = Args::try_parse_from(["trellis", "up", "--log-format", "json"]).unwrap();
        assert_eq!(args.log_format, cli::LogFormat::Json);
        let args = Args::try_parse_from(["trellis", "status"]).unwrap();
        assert_eq!(args.log_format, cli::LogFormat::Human);
        assert!(Args::try_parse_from(["trellis", "up", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Args::command().debug_assert();
    }
}
