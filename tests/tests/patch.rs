//! Publishing a patch at a real hub: `trellis patch publish` cuts the
//! artifacts into BLAKE3-named chunks, uploads only those the hub lacks
//! (so an interrupted publish resumes), and stores the signed manifest in
//! the replicated log; the other hubs copy the chunks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_hub::client::{ApiClient, ClientError};
use trellis_node::distribute::hex32;
use trellis_node::patch::{CHUNK_SIZE, Patch, sign};
use trellis_tests::{Mesh, eventually, run, serial};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A patch directory under `root` whose package spans three chunks (1 MiB,
/// 1 MiB, 512 KiB), with two small scripts; returns it and the package.
fn write_patch(root: &Path) -> (PathBuf, Vec<u8>) {
    let dir = root.join("openssl-fix");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("patch.toml"),
        "name = \"openssl-fix\"\nversion = \"3.0.13-2\"\ninstall = [\"sh install.sh\"]\n\
         rollback = [\"sh rollback.sh\"]\nchecks = [\"web\"]\nbake = \"2m\"\n\
         artifacts = [\"install.sh\", \"rollback.sh\", \"pkg.bin\"]\n",
    )
    .unwrap();
    std::fs::write(dir.join("install.sh"), "echo 3.0.13-2 > version\n").unwrap();
    std::fs::write(dir.join("rollback.sh"), "rm -f version\n").unwrap();
    let pkg: Vec<u8> = (0..(5 * CHUNK_SIZE as usize / 2))
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(dir.join("pkg.bin"), &pkg).unwrap();
    (dir, pkg)
}

/// `trellis patch publish DIR` as alice, at `api`.
fn publish(root: &Path, dir: &Path, api: &str) -> std::process::Output {
    let cert = root.join("certs/alice.crt");
    let key = root.join("certs/alice.key");
    let ca = root.join("ca/ca.crt");
    run(
        "trellis",
        &[
            "patch",
            "publish",
            dir.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--ca",
            ca.to_str().unwrap(),
            "--hub",
            api,
        ],
    )
}

#[test]
fn a_patch_is_published_in_chunks_an_interrupted_publish_resumes_and_bad_input_is_refused() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("hub", "eu", "", "hub-2");
    mesh.issue("operator", "", "", "alice");
    let fast = "[replication]\nanti_entropy_every = \"1s\"\n";
    let (_hub, uplink, api) = mesh.start_hub("hub-1", fast);
    let (_hub2, _, api2) = mesh.start_hub(
        "hub-2",
        &format!("[federation]\npeers = [\"{uplink}\"]\n{fast}"),
    );
    let p = mesh.path().to_owned();

    let (dir, pkg) = write_patch(&p);
    let loaded = Patch::load(&dir).unwrap();
    let all_chunks: usize = loaded
        .manifest
        .artifacts
        .iter()
        .map(|a| a.chunks.len())
        .sum();
    assert_eq!(all_chunks, 5, "two scripts and three package chunks");

    let client = ApiClient::new(&api).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A chunk that is not what its name says is refused.
    let pkg_ref = loaded
        .manifest
        .artifacts
        .iter()
        .find(|a| a.name == "pkg.bin")
        .unwrap();
    let first = hex32(&pkg_ref.chunks[0]);
    match rt.block_on(client.chunk_put(&first, vec![0; 100])) {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(message.contains(&first), "{message}"),
        other => panic!("a wrong chunk was stored: {other:?}"),
    }
    // A publish interrupted after the first chunk: that chunk is there.
    rt.block_on(client.chunk_put(&first, pkg[..CHUNK_SIZE as usize].to_vec()))
        .unwrap();

    let publish = || publish(&p, &dir, &api);
    let out = publish();
    assert!(out.status.success(), "publish: {out:?}");
    let err = text(&out.stderr);
    // Only what the hub lacked was sent.
    assert!(
        err.contains("5 chunks in 3 artifacts; the hub lacks 4"),
        "{err}"
    );
    assert!(
        text(&out.stdout).contains("published openssl-fix 3.0.13-2"),
        "{out:?}"
    );

    // Again: nothing to send, nothing new to write.
    let out = publish();
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stderr).contains("the hub lacks 0"), "{out:?}");
    assert!(
        text(&out.stdout).contains("was already published"),
        "{out:?}"
    );

    let out = run("trellis", &["patch", "list", "--hub", &api]);
    assert!(
        text(&out.stdout).contains("openssl-fix  3.0.13-2"),
        "{out:?}"
    );
    let out = run("trellis", &["patch", "show", "openssl-fix", "--hub", &api]);
    let shown = text(&out.stdout);
    assert!(shown.contains("5/5 chunks at this hub"), "{shown}");
    assert!(
        shown.contains("pkg.bin (2621440 bytes, 3 chunks)"),
        "{shown}"
    );
    assert!(
        shown.contains("checks    web, for 2m after install"),
        "{shown}"
    );
    let out = run("trellis", &["patch", "show", "nope", "--hub", &api]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The hub serves the chunks back as uploaded.
    let p_chunk = rt
        .block_on(client.chunk_get(&hex32(&pkg_ref.chunks[2])))
        .unwrap();
    assert_eq!(p_chunk, pkg[2 * CHUNK_SIZE as usize..]);

    // A manifest altered after signing is refused.
    let alice = trellis_node::tls::Credentials::load(
        &p.join("ca/ca.crt"),
        &p.join("certs/alice.crt"),
        &p.join("certs/alice.key"),
    )
    .unwrap();
    let mut m = loaded.manifest.clone();
    m.version = "3.0.13-3".into();
    let mut altered = sign(&alice, &m).unwrap();
    let n = altered.manifest.len();
    altered.manifest[n - 1] ^= 1;
    match rt.block_on(client.patch_publish(&altered)) {
        Err(ClientError::Api {
            status: 403,
            message,
        }) => {
            assert!(message.contains("bad signature"), "{message}")
        }
        other => panic!("an altered manifest was published: {other:?}"),
    }
    // A signed one whose chunks are not all at the hub is refused too.
    m.artifacts[2].chunks[1] = [9; 32];
    let incomplete = sign(&alice, &m).unwrap();
    match rt.block_on(client.patch_publish(&incomplete)) {
        Err(ClientError::Api { status, message }) => {
            assert!(status == 409 || status == 403, "{status}: {message}")
        }
        other => panic!("a patch without its chunks was published: {other:?}"),
    }
    // So is one whose chunks are all here but whose whole-file hash is not
    // theirs: the hub is where the whole file is checked.
    let mut m = loaded.manifest.clone();
    m.version = "3.0.13-4".into();
    m.artifacts[2].blake3[0] ^= 1;
    let contradictory = sign(&alice, &m).unwrap();
    match rt.block_on(client.patch_publish(&contradictory)) {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(
            message.contains("pkg.bin") && message.contains("inconsistent"),
            "{message}"
        ),
        other => panic!("a manifest contradicting its chunks was published: {other:?}"),
    }

    // The other hub copies the chunks: either can serve the patch.
    let copied = eventually(Duration::from_secs(30), || {
        let out = run("trellis", &["patch", "show", "openssl-fix", "--hub", &api2]);
        text(&out.stdout).contains("5/5 chunks at this hub")
    });
    assert!(copied, "hub-2 never held the patch's chunks");
    let at_2 = ApiClient::new(&api2).unwrap();
    assert_eq!(
        rt.block_on(at_2.chunk_get(&hex32(&pkg_ref.chunks[1])))
            .unwrap(),
        pkg[CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize]
    );

    // The publish is in the audit trail, with the operator as author.
    let out = run("trellis", &["audit", "log", "--hub", &api]);
    let log = text(&out.stdout);
    assert!(
        log.lines()
            .any(|l| l.contains("alice") && l.contains("patch openssl-fix 3.0.13-2")),
        "{log}"
    );
}

#[test]
fn a_relay_fetches_a_staged_patch_once_for_its_site_and_refetches_only_missing_or_damaged_chunks() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    mesh.issue("relay", "eu", "par", "par-relay");
    mesh.issue("operator", "", "", "alice");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    mesh.issue("node", "eu", "par", "par-n0");
    let (mut relay, relay_addr) = mesh.start_relay("par-relay", &uplink, "");
    let metrics = relay.wait_field("relay ready", "metrics", Duration::from_secs(5));
    let p = mesh.path().to_owned();
    let (dir, pkg) = write_patch(&p);
    let out = publish(&p, &dir, &api);
    assert!(out.status.success(), "publish: {out:?}");
    let manifest = Patch::load(&dir).unwrap().manifest;
    let total_bytes: u64 = manifest.artifacts.iter().map(|a| a.size).sum();
    let connected = eventually(Duration::from_secs(20), || {
        trellis_tests::fleet_site(&api, "par").is_some_and(|(_, r)| r["connected"] == true)
    });
    assert!(connected, "the relay never connected");

    let stage = || run("trellis", &["patch", "stage", "openssl-fix", "--hub", &api]);
    let fetched = |n: f64, bytes: u64| {
        eventually(Duration::from_secs(30), || {
            trellis_tests::metric(&metrics, "trellis_relay_patch_chunks_fetched_total") == Some(n)
                && trellis_tests::metric(&metrics, "trellis_relay_patch_bytes_fetched_total")
                    == Some(bytes as f64)
        })
    };
    let out = stage();
    assert!(out.status.success(), "stage: {out:?}");
    assert!(
        text(&out.stdout).contains("eu/par: fetching 5 chunks"),
        "{out:?}"
    );
    // Every byte of the artifacts crossed the uplink once, and no more.
    assert!(
        fetched(5.0, total_bytes),
        "the relay did not fetch the artifacts once"
    );
    let store = p.join("par-relay/patches/chunks");
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 5);

    // Staged again: nothing to fetch.
    let out = stage();
    assert!(
        text(&out.stdout).contains("eu/par: holds every chunk already"),
        "{out:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(fetched(5.0, total_bytes));

    // A fetch cut short (a chunk missing) and a chunk damaged on disk:
    // staging again fetches exactly those two.
    let pkg_ref = manifest
        .artifacts
        .iter()
        .find(|a| a.name == "pkg.bin")
        .unwrap();
    std::fs::remove_file(store.join(hex32(&pkg_ref.chunks[0]))).unwrap();
    std::fs::write(store.join(hex32(&pkg_ref.chunks[2])), b"bit rot").unwrap();
    let out = stage();
    assert!(
        text(&out.stdout).contains("eu/par: fetching 2 chunks"),
        "{out:?}"
    );
    let again = CHUNK_SIZE as u64 + (pkg.len() as u64 - 2 * CHUNK_SIZE as u64);
    assert!(
        fetched(7.0, total_bytes + again),
        "not exactly the two missing chunks were fetched"
    );
    assert_eq!(
        std::fs::read(store.join(hex32(&pkg_ref.chunks[2]))).unwrap(),
        pkg[2 * CHUNK_SIZE as usize..]
    );

    // A node of the site fetches the package from its relay over QUIC.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let node = trellis_node::tls::Credentials::load(
        &p.join("ca/ca.crt"),
        &p.join("certs/par-n0.crt"),
        &p.join("certs/par-n0.key"),
    )
    .unwrap();
    let dest = p.join("par-n0/pkg.bin");
    let relay_addr: std::net::SocketAddr = relay_addr.parse().unwrap();
    let fetch = || {
        rt.block_on(async {
            let (endpoint, _) = trellis_node::endpoint::MeshEndpoint::bind(
                node.clone(),
                "127.0.0.1:0".parse().unwrap(),
                &[],
                Default::default(),
            )
            .unwrap();
            let got =
                trellis_node::distribute::fetch_artifact(&endpoint, relay_addr, pkg_ref, &dest, 4)
                    .await;
            endpoint.shutdown().await;
            got
        })
    };
    let first = fetch().expect("fetch from the relay");
    assert_eq!((first.held, first.stats.fetched), (0, 3), "{first:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), pkg);
    // Cut short: a partial file with one chunk damaged. Only it is
    // fetched again.
    let partial = trellis_node::patch::PartialArtifact::path_for(&dest);
    let mut bytes = std::fs::read(&dest).unwrap();
    bytes[CHUNK_SIZE as usize + 3] ^= 0xff;
    std::fs::write(&partial, &bytes).unwrap();
    std::fs::remove_file(&dest).unwrap();
    let again = fetch().expect("fetch again");
    assert_eq!((again.held, again.stats.fetched), (2, 1), "{again:?}");
    assert_eq!(std::fs::read(&dest).unwrap(), pkg);
}
