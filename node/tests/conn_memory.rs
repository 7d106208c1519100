//! What one gossip connection costs in memory. A member of a site keeps a
//! connection to each of its peers (about 99 in a site of 100), so every
//! kilobyte here is about 100 KB of every node agent's heap.
//!
//! The test counts the bytes the process holds from its allocator before
//! and after 50 pairs of members connect and exchange a message each way,
//! as gossip does, and requires each end of a connection to hold under
//! [`LIMIT`] bytes. With quinn's default stream limits (100 of each kind,
//! a slot set aside for each at once) and TLS session tickets (two per
//! connection, each with the peer's certificate chain) it held 42 KB;
//! with gossip's own limits and resumption off, 32 KB.
//!
//! `cargo test -p trellis-node --test conn_memory -- --nocapture` prints
//! the figure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use trellis_node::authz::Protocol;
use trellis_node::endpoint::{MeshEndpoint, Routes};
use trellis_node::id::{Identity, Role};
use trellis_node::metrics::MeshMetrics;
use trellis_node::tls::{Credentials, MeshCa};

/// Bytes per connection end the test allows.
const LIMIT: isize = 33_000;
/// Connections made.
const PAIRS: usize = 50;

/// The system allocator, counting the bytes held.
struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; the
// counter is only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A member serving gossip on a loopback port of its own.
fn member(ca: &MeshCa, name: &str) -> (MeshEndpoint, Routes) {
    let creds =
        Credentials::issue(ca, &Identity::new(Role::Node, "eu", "par", name).unwrap()).unwrap();
    MeshEndpoint::bind(
        creds,
        "127.0.0.1:0".parse().unwrap(),
        &[Protocol::Gossip],
        MeshMetrics::default(),
    )
    .unwrap()
}

#[tokio::test(flavor = "current_thread")]
async fn a_gossip_connection_holds_little_memory_at_either_end() {
    trellis_node::tls::install_crypto_provider();
    let ca = MeshCa::generate("t").unwrap();
    let (server, mut routes) = member(&ca, "s");
    let mut accepted = routes.take(Protocol::Gossip);
    // One client endpoint per connection: the server holds at most a few
    // connections per certificate, as a member holds one per peer.
    let clients: Vec<_> = (0..PAIRS)
        .map(|i| member(&ca, &format!("c{i}")).0)
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let before = HELD.load(Ordering::Relaxed);
    let mut held = Vec::new();
    for client in &clients {
        let (ours, _) = client
            .connect(server.local_addr(), Protocol::Gossip)
            .await
            .unwrap();
        let theirs = accepted.recv().await.unwrap().conn;
        let mut buf = [0u8; 200];
        let mut out = ours.open_uni().await.unwrap();
        out.write_all(&[1; 200]).await.unwrap();
        let mut inbound = theirs.accept_uni().await.unwrap();
        inbound.read_exact(&mut buf).await.unwrap();
        let mut back = theirs.open_uni().await.unwrap();
        back.write_all(&[2; 200]).await.unwrap();
        let mut returned = ours.accept_uni().await.unwrap();
        returned.read_exact(&mut buf).await.unwrap();
        held.push((ours, theirs, out, inbound, back, returned));
    }
    // Let acknowledgements and any tickets arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let per_end = (HELD.load(Ordering::Relaxed) - before) / (2 * PAIRS as isize);
    eprintln!("{PAIRS} gossip connections: {per_end} B held per connection end");
    assert!(
        per_end < LIMIT,
        "a gossip connection end holds {per_end} B, over {LIMIT}"
    );
    // The connections and streams were held open until measured.
    drop(held);
}
