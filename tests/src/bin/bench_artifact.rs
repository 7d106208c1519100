//! Benchmark of patch artifact distribution inside a site, against a plain
//! TCP copy of the same file measured in the same run.
//!
//! One relay serves a patch to `--nodes` nodes at once, all in this
//! process, over real QUIC on 127.0.0.1:
//!
//! - the relay side is published as a relay keeps a staged patch: a patch
//!   directory with a file of random (incompressible) bytes is loaded
//!   (`Patch::load`), signed by an operator (`patch::sign`), its manifest
//!   kept as `PatchFiles` holds it and every chunk put in a `ChunkStore`;
//!   `distribute::serve` answers on the relay's `MeshEndpoint`;
//! - each node has its own endpoint, certificate and directory, and does
//!   what a node does on a patch order: `fetch_patch`, `patch::verify`,
//!   then `fetch_artifact`, which keeps several chunk requests in flight
//!   on one connection, checks every chunk against its BLAKE3, writes it
//!   in place in the artifact's partial file, then flushes it and renames
//!   it into place (the whole file's hash was checked by the hub when the
//!   patch was published; here the relay's store is checked the same way).
//!
//! The baseline is a tokio TCP server on 127.0.0.1 that sends the same
//! file to as many concurrent clients; each client hashes the stream
//! (BLAKE3), writes it to a temporary file in the same kind of directory,
//! fsyncs it once and renames it into place: the least a safe download
//! does. A third row does the same copy through TLS 1.3 (rustls, with the
//! relay's and each node's mesh certificate, AES-GCM as the mesh
//! negotiates it): what an encrypted stream costs without QUIC.
//!
//! ```text
//! cargo run --release -p trellis-tests --bin bench-artifact -- [--quick] [--size-mib 100] [--nodes 10]
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_node::authz::Protocol;
use trellis_node::distribute::{fetch_artifact, fetch_patch, serve};
use trellis_node::endpoint::MeshEndpoint;
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::MeshMetrics;
use trellis_node::patch::{
    ArtifactRef, CHUNK_SIZE, ChunkStore, MAX_ARTIFACT_BYTES, Patch, PatchFiles, sign, verify,
};
use trellis_node::tls::{Credentials, MeshCa};
use trellis_tests::report::{thousands, utc_now};

const REGION: &str = "bench";
const SITE: &str = "site-1";
/// The artifact's name inside the patch directory.
const ARTIFACT: &str = "payload.bin";
/// What a node allows one chunk before it gives up (the node agent's own
/// figure).
const MAX_ATTEMPTS: u32 = trellis_node::patching::ARTIFACT_ATTEMPTS;
/// Read and write size of the TCP baseline.
const TCP_BUFFER: usize = 1 << 20;
const MIB: f64 = (1 << 20) as f64;
/// ALPN of the TLS over TCP row (it is no mesh protocol).
const TLS_ALPN: &[u8] = b"trellis-bench-tls";

/// Distribution of one patch artifact from a relay to the nodes of its
/// site, against a plain TCP copy of the same file.
///
/// Everything runs in this process on 127.0.0.1: a real relay fetch
/// server and real node downloads over QUIC with mutual TLS, then a tokio
/// TCP server and clients. Both write what they receive to disk under
/// `--dir` and fsync it; each round measures the wall time from the first
/// connection until every node holds the whole, checked file. The figures
/// are the median of the rounds; the ratio says how much of the TCP copy
/// rate Trellis reaches.
#[derive(Parser, Debug)]
#[command(name = "bench-artifact", version)]
struct Args {
    /// One round of a 20 MiB artifact (unless --size-mib is given):
    /// quicker, noisier figures.
    #[arg(long)]
    quick: bool,
    /// Size of the artifact in MiB (at most 256, the largest artifact a
    /// patch may hold); 100 by default.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Nodes fetching at once, each with its own endpoint, certificate and
    /// directory (and as many TCP clients).
    #[arg(long, default_value_t = 10)]
    nodes: usize,
    /// Rounds of each transfer, alternating (default 3, or 1 with
    /// --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Directory in which the temporary directory is made (its disk is
    /// the one written); the system's temp dir by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Run only one of the transfers (to profile it); no ratio is printed.
    #[arg(long, value_parser = ["trellis", "tcp", "tls"])]
    only: Option<String>,
    /// Log Trellis's messages to stderr (level from TRELLIS_LOG, info by
    /// default).
    #[arg(long)]
    log: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.log {
        trellis_node::cli::init_logging(trellis_node::cli::LogFormat::Human);
    }
    let size_mib = args.size_mib.unwrap_or(if args.quick { 20 } else { 100 });
    ensure!(
        (1..=MAX_ARTIFACT_BYTES >> 20).contains(&size_mib),
        "--size-mib must be between 1 and {}",
        MAX_ARTIFACT_BYTES >> 20
    );
    ensure!(
        (1..=200).contains(&args.nodes),
        "--nodes must be between 1 and 200"
    );
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(
        (1..=20).contains(&rounds),
        "--rounds must be between 1 and 20"
    );
    let mut tmp = tempfile::Builder::new();
    tmp.prefix("trellis-bench-artifact-");
    let tmp = match &args.dir {
        Some(d) => tmp.tempdir_in(d),
        None => tmp.tempdir(),
    }
    .context("cannot make the temporary directory")?;
    println!(
        "bench-artifact: {} UTC; {} CPUs; load average {}; files in {}{}",
        utc_now(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "n/a".into()),
        tmp.path().display(),
        if args.quick { "; --quick" } else { "" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(
        tmp.path(),
        size_mib << 20,
        args.nodes,
        rounds,
        args.only.as_deref(),
    ))
}

/// A relay, its site's nodes and the operator who signs, all of one CA.
struct Creds {
    operator: Credentials,
    relay: Credentials,
    nodes: Vec<Credentials>,
}

fn credentials(nodes: usize) -> anyhow::Result<Creds> {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("bench")?;
    let issue = |role, region: &str, site: &str, name: &str| {
        anyhow::Ok(Credentials::issue(
            &ca,
            &Identity::new(role, region, site, name)?,
        )?)
    };
    Ok(Creds {
        operator: issue(Role::Operator, "", "", "bench-operator")?,
        relay: issue(Role::Relay, REGION, SITE, "site-1-relay")?,
        nodes: (0..nodes)
            .map(|i| issue(Role::Node, REGION, SITE, &format!("n{i:03}")))
            .collect::<Result<_, _>>()?,
    })
}

fn loopback() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// One timed transfer to every node.
struct Run {
    wall: Duration,
    /// CPU time of this process (user + system) over the same span.
    cpu: Option<Duration>,
}

/// Chunks the Trellis nodes fetched, and of those the chunks written with
/// direct I/O, over every round.
static CHUNKS_FETCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CHUNKS_DIRECT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// UDP datagrams the kernel dropped for want of socket buffer during the
/// Trellis rounds (every socket of the machine, `RcvbufErrors`).
static UDP_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn run(
    dir: &Path,
    size: u64,
    nodes: usize,
    rounds: usize,
    only: Option<&str>,
) -> anyhow::Result<()> {
    let creds = credentials(nodes)?;

    // The patch, as an operator would write it.
    let patch_dir = dir.join("patch");
    std::fs::create_dir_all(&patch_dir)?;
    let source = patch_dir.join(ARTIFACT);
    write_random(&source, size)?;
    std::fs::write(
        patch_dir.join(trellis_node::patch::PATCH_FILE),
        format!(
            "name = \"bench-payload\"\nversion = \"1\"\ninstall = [\"true\"]\n\
             rollback = [\"true\"]\nbake = \"1m\"\nartifacts = [\"{ARTIFACT}\"]\n"
        ),
    )?;
    let patch = Patch::load(&patch_dir)?;
    let signed = sign(&creds.operator, &patch.manifest)?;
    let id = signed.id();
    let artifact = patch.manifest.artifacts[0].clone();

    // The relay keeps it as a staged patch: the manifest in its patches
    // directory, every chunk in its chunk store.
    let patches = dir.join("relay/patches");
    let files = PatchFiles {
        dir: patches.clone(),
        chunks: ChunkStore::open(&patches.join("chunks"))?,
    };
    trellis_node::apply::write_atomic(
        &PatchFiles::manifest_path(&patches, &id),
        &postcard::to_stdvec(&signed)?,
        0o600,
    )?;
    publish_chunks(&files.chunks, &artifact, &source)?;
    ensure!(
        files.manifest(&id).as_ref() == Some(&signed),
        "the relay does not serve the manifest it was given"
    );
    let relay_dir_bytes = dir_bytes(&patches.join("chunks"))?;

    let shutdown = CancellationToken::new();
    let (relay, mut routes) = MeshEndpoint::bind(
        creds.relay.clone(),
        loopback(),
        &[Protocol::Fetch],
        MeshMetrics::default(),
    )?;
    let (_served_tx, served_rx) = watch::channel(None);
    tokio::spawn(serve(
        routes.take(Protocol::Fetch),
        served_rx,
        Some(Arc::new(files)),
        None,
        relay.metrics().clone(),
        shutdown.child_token(),
    ));
    let relay_addr = relay.local_addr();

    let tcp = TcpSource::start(source.clone(), None).await?;
    let tls_acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        creds.relay.tls_server_config(&[TLS_ALPN.to_vec()])?,
    ));
    let tls = TcpSource::start(source.clone(), Some(tls_acceptor)).await?;
    let tls_clients = creds
        .nodes
        .iter()
        .map(|c| {
            let config = c.tls_client_config(&[TLS_ALPN.to_vec()])?;
            anyhow::Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
        })
        .collect::<Result<Vec<_>, _>>()?;

    let mut trellis_runs = Vec::new();
    let mut tcp_runs = Vec::new();
    let mut tls_runs = Vec::new();
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    for round in 0..rounds {
        if wanted("trellis") {
            let t = trellis_round(
                &creds,
                relay_addr,
                id,
                &artifact,
                &dir.join(format!("trellis-{round}")),
            )
            .await
            .with_context(|| format!("Trellis transfer, round {}", round + 1))?;
            trellis_runs.push(t);
        }
        if wanted("tcp") {
            let c = tcp_round(
                tcp.addr,
                &artifact,
                &vec![None; nodes],
                &dir.join(format!("tcp-{round}")),
            )
            .await
            .with_context(|| format!("TCP transfer, round {}", round + 1))?;
            tcp_runs.push(c);
        }
        if wanted("tls") {
            let clients: Vec<_> = tls_clients.iter().cloned().map(Some).collect();
            let c = tcp_round(
                tls.addr,
                &artifact,
                &clients,
                &dir.join(format!("tls-{round}")),
            )
            .await
            .with_context(|| format!("TLS over TCP transfer, round {}", round + 1))?;
            tls_runs.push(c);
        }
    }
    shutdown.cancel();
    relay.shutdown().await;
    let fetch = trellis_node::metrics::ProtocolLabels {
        protocol: Protocol::Fetch.as_str().to_owned(),
    };
    let relay_losses = (
        relay
            .metrics()
            .quic_lost_packets
            .get_or_create(&fetch)
            .get(),
        relay
            .metrics()
            .quic_congestion_events
            .get_or_create(&fetch)
            .get(),
    );
    tcp.stop.cancel();
    tls.stop.cancel();

    let total = size * nodes as u64;
    let rate = |r: &Run| total as f64 / MIB / r.wall.as_secs_f64();
    println!();
    println!(
        "one {} B artifact ({} chunks of {} B) to {nodes} nodes at once, 127.0.0.1; median of {rounds} \
         round(s)",
        thousands(size),
        artifact.chunks.len(),
        thousands(u64::from(CHUNK_SIZE)),
    );
    println!();
    println!(
        "{:<24} {:>15} {:>6} {:>9} {:>12} {:>9} {:>10}",
        "transfer", "bytes", "nodes", "wall", "MiB/s (all)", "CPU", "CPU cores"
    );
    for (name, runs) in [
        ("Trellis (QUIC, chunks)", &trellis_runs),
        ("TCP copy", &tcp_runs),
        ("TLS 1.3 over TCP copy", &tls_runs),
    ] {
        let Some(r) = median(runs) else { continue };
        let (cpu_s, cores) = r.cpu.map_or(("n/a".to_owned(), "n/a".to_owned()), |c| {
            (
                format!("{:.2} s", c.as_secs_f64()),
                format!("{:.2}", c.as_secs_f64() / r.wall.as_secs_f64()),
            )
        });
        println!(
            "{:<24} {:>15} {:>6} {:>9} {:>12} {:>9} {:>10}",
            name,
            thousands(total),
            nodes,
            format!("{:.2} s", r.wall.as_secs_f64()),
            format!("{:.1}", rate(r)),
            cpu_s,
            cores,
        );
    }
    println!();
    if let (Some(t), Some(c)) = (median(&trellis_runs), median(&tcp_runs)) {
        println!("Trellis / TCP rate: {:.2}", rate(t) / rate(c));
    }
    if let (Some(t), Some(c)) = (median(&tls_runs), median(&tcp_runs)) {
        println!("TLS over TCP / TCP rate: {:.2}", rate(t) / rate(c));
    }
    if !trellis_runs.is_empty() {
        println!(
            "UDP datagrams the kernel dropped for want of receive buffer during the Trellis \
             rounds: {} (RcvbufErrors, /proc/net/snmp); packets the relay's QUIC declared lost: \
             {}, congestion events: {} (trellis_quic_lost_packets, \
             trellis_quic_congestion_events)",
            thousands(UDP_DROPPED.load(std::sync::atomic::Ordering::Relaxed)),
            thousands(relay_losses.0),
            thousands(relay_losses.1)
        );
    }
    println!(
        "rounds, wall s (Trellis | TCP | TLS over TCP): {} | {} | {}",
        walls(&trellis_runs),
        walls(&tcp_runs),
        walls(&tls_runs)
    );
    println!();
    println!(
        "bytes: artifact size x nodes. wall: from the first connection until every node holds the \
         whole artifact, checked. CPU: this process (relay, nodes, or TCP server and clients) over \
         that span. Trellis: each node fetches and verifies the signed manifest, fetches the \
         chunks over one QUIC connection ({} requests in flight, each chunk checked against its \
         BLAKE3 and written in place in the artifact's partial file, with direct I/O where the \
         file system allows it: {} of {} chunks here), then fsynced and renamed (the whole \
         file is not hashed again: the hub checks it once when a patch is published); the \
         relay reads and checks a chunk once and serves it to every node from memory while it is among the {} last asked for ({} B in its \
         store). TCP: each client BLAKE3-hashes the stream, writes it to a temporary file \
         through the page cache, fsyncs it once and renames it. TLS over TCP: the same, through \
         TLS 1.3 with the relay's and each node's mesh certificate (rustls, {}). Every file was \
         read back after the run and matched the source's BLAKE3.",
        trellis_node::distribute::CHUNKS_IN_FLIGHT,
        thousands(CHUNKS_DIRECT.load(std::sync::atomic::Ordering::Relaxed)),
        thousands(CHUNKS_FETCHED.load(std::sync::atomic::Ordering::Relaxed)),
        trellis_node::distribute::CHUNKS_CACHED,
        thousands(relay_dir_bytes),
        TLS_SUITE
            .get()
            .map_or("no connection made".to_owned(), |s| format!("{s:?}"))
    );
    Ok(())
}

/// Writes `size` random bytes to `path`.
fn write_random(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        file.write_all(&buf[..n])?;
        left -= n as u64;
    }
    file.into_inner()?.sync_all()?;
    Ok(())
}

/// Puts every chunk of `artifact`, read from `source`, into `store`, as a
/// relay does with the chunks it fetches from its hub.
fn publish_chunks(store: &ChunkStore, artifact: &ArtifactRef, source: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(source)?;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for (i, hash) in (0u32..).zip(&artifact.chunks) {
        let len = artifact.chunk_len(i).context("a chunk past the artifact")? as usize;
        file.read_exact(&mut buf[..len])?;
        store.put(hash, &buf[..len])?;
    }
    // What a hub does before it publishes a patch: the chunks make the
    // file the manifest names.
    anyhow::ensure!(
        store.check(artifact)?.is_empty(),
        "chunks missing from the relay's store"
    );
    Ok(())
}

/// Every node downloads the patch from the relay at once.
async fn trellis_round(
    creds: &Creds,
    relay: SocketAddr,
    id: [u8; 32],
    artifact: &ArtifactRef,
    dir: &Path,
) -> anyhow::Result<Run> {
    let mut nodes = Vec::new();
    for (i, c) in creds.nodes.iter().enumerate() {
        let (endpoint, _) = MeshEndpoint::bind(c.clone(), loopback(), &[], MeshMetrics::default())?;
        let home = dir.join(format!("node-{i:03}"));
        nodes.push((endpoint, c.clone(), home.join("artifacts").join(ARTIFACT)));
    }
    let cpu0 = process_cpu();
    let dropped0 = udp_receive_buffer_errors();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (endpoint, trust, dest) in &nodes {
        let (endpoint, trust, dest) = (endpoint.clone(), trust.clone(), dest.clone());
        let artifact = artifact.clone();
        tasks.push(tokio::spawn(async move {
            let signed = fetch_patch(&endpoint, relay, id).await?;
            let (manifest, _) = verify(&trust, &signed)?;
            ensure!(
                manifest.artifacts.first() == Some(&artifact),
                "the relay's manifest names another artifact"
            );
            let got = fetch_artifact(&endpoint, relay, &artifact, &dest, MAX_ATTEMPTS)
                .await
                .map_err(anyhow::Error::msg)?;
            let relaxed = std::sync::atomic::Ordering::Relaxed;
            CHUNKS_FETCHED.fetch_add(got.stats.fetched, relaxed);
            CHUNKS_DIRECT.fetch_add(got.direct, relaxed);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let wall = start.elapsed();
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    if let (Some(a), Some(b)) = (dropped0, udp_receive_buffer_errors()) {
        UDP_DROPPED.fetch_add(b.saturating_sub(a), std::sync::atomic::Ordering::Relaxed);
    }
    for (endpoint, _, dest) in &nodes {
        check_file(dest, artifact)?;
        endpoint.shutdown().await;
    }
    std::fs::remove_dir_all(dir)?;
    Ok(Run { wall, cpu })
}

/// The cipher suite the TLS over TCP row's first connection settled on.
static TLS_SUITE: std::sync::OnceLock<tokio_rustls::rustls::CipherSuite> =
    std::sync::OnceLock::new();

/// A TCP server on 127.0.0.1 that sends the file to whoever connects,
/// through TLS if it is given an acceptor.
struct TcpSource {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl TcpSource {
    async fn start(
        file: PathBuf,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> anyhow::Result<TcpSource> {
        let listener = tokio::net::TcpListener::bind(loopback()).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                let (sock, _) = tokio::select! {
                    biased;
                    _ = token.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                };
                let file = file.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => send_file(sock, &file).await,
                        Some(tls) => {
                            if let Ok(sock) = tls.accept(sock).await {
                                send_file(sock, &file).await;
                            }
                        }
                    }
                });
            }
        });
        Ok(TcpSource { addr, stop })
    }
}

/// Sends `file` down `sock`, then shuts the stream down.
async fn send_file(mut sock: impl AsyncWrite + Unpin, file: &Path) {
    let Ok(mut f) = tokio::fs::File::open(file).await else {
        return;
    };
    let mut buf = vec![0u8; TCP_BUFFER];
    loop {
        match f.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if sock.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = sock.shutdown().await;
}

/// One TCP client per entry of `clients` fetches the file at once, through
/// TLS where the entry holds a connector.
async fn tcp_round(
    server: SocketAddr,
    artifact: &ArtifactRef,
    clients: &[Option<tokio_rustls::TlsConnector>],
    dir: &Path,
) -> anyhow::Result<Run> {
    let dests: Vec<PathBuf> = (0..clients.len())
        .map(|i| dir.join(format!("node-{i:03}/artifacts")))
        .collect();
    for d in &dests {
        std::fs::create_dir_all(d)?;
    }
    let cpu0 = process_cpu();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (d, tls) in dests.iter().zip(clients) {
        let d = d.clone();
        let want = artifact.blake3;
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            let sock = tokio::net::TcpStream::connect(server).await?;
            match tls {
                None => receive_file(sock, &d, want).await,
                Some(tls) => {
                    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(
                        trellis_node::tls::MESH_SERVER_NAME,
                    )?;
                    let sock = tls.connect(name, sock).await?;
                    if let Some(suite) = sock.get_ref().1.negotiated_cipher_suite() {
                        let _ = TLS_SUITE.set(suite.suite());
                    }
                    receive_file(sock, &d, want).await
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let wall = start.elapsed();
    let cpu = process_cpu().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
    for d in &dests {
        check_file(&d.join(ARTIFACT), artifact)?;
    }
    std::fs::remove_dir_all(dir)?;
    Ok(Run { wall, cpu })
}

/// Reads the whole stream into the artifact's file in `d`: hashed, written
/// through the page cache, fsynced, checked and renamed into place.
async fn receive_file(
    mut sock: impl AsyncRead + Unpin,
    d: &Path,
    want: [u8; 32],
) -> anyhow::Result<()> {
    let tmp = d.join(format!(".{ARTIFACT}.part"));
    let mut file = tokio::fs::File::create(&tmp).await?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; TCP_BUFFER];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).await?;
    }
    file.sync_all().await?;
    drop(file);
    if hasher.finalize().as_bytes() != &want {
        bail!("the TCP copy does not match the source");
    }
    tokio::fs::rename(&tmp, d.join(ARTIFACT)).await?;
    tokio::fs::File::open(&d).await?.sync_all().await?;
    Ok(())
}

/// Reads `path` back and checks it against the artifact's size and BLAKE3.
fn check_file(path: &Path, artifact: &ArtifactRef) -> anyhow::Result<()> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let size = std::io::copy(&mut file, &mut hasher)?;
    ensure!(
        size == artifact.size && hasher.finalize().as_bytes() == &artifact.blake3,
        "{} does not match the artifact",
        path.display()
    );
    Ok(())
}

/// Bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

/// The run with the median wall time.
fn median(runs: &[Run]) -> Option<&Run> {
    let mut sorted: Vec<&Run> = runs.iter().collect();
    sorted.sort_by_key(|r| r.wall);
    sorted.get(sorted.len() / 2).copied()
}

fn walls(runs: &[Run]) -> String {
    runs.iter()
        .map(|r| format!("{:.2}", r.wall.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// UDP datagrams the kernel has dropped so far because a socket's receive
/// buffer was full (`RcvbufErrors` in /proc/net/snmp), or `None` where
/// that is not to be read.
fn udp_receive_buffer_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// CPU time of this process so far (user + system), from /proc at the
/// kernel's usual 100 ticks a second.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}
