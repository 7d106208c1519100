//! Two network namespaces joined by a veth pair, for tests that cut a link
//! the way a WAN fails: the interface goes down, packets vanish, and it
//! comes back up. Needs CAP_NET_ADMIN (root); [`NetPair::create`] says why
//! when it cannot, so a test can skip with that reason.
//!
//! The namespaces and the veth pair are the test's own and are deleted when
//! the `NetPair` is dropped.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Two namespaces, `a` and `b`, with `addr_a` and `addr_b` on either end of
/// a veth pair (a /30), and loopback up in both.
pub struct NetPair {
    pub a: String,
    pub b: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
    veth_b: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` ({e}); install iproute2"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetPair {
    /// The pair for a test, or `None` after printing why the test is
    /// skipped (this machine does not allow network namespaces).
    pub fn for_test() -> Option<NetPair> {
        NetPair::create()
            .map_err(|reason| eprintln!("skipped: network namespaces unavailable here: {reason}"))
            .ok()
    }

    /// Creates the pair, or says why it cannot (not root, no iproute2).
    pub fn create() -> Result<NetPair, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 10_000) * 16 + n % 16;
        let a = format!("trellis-{id}-a");
        let b = format!("trellis-{id}-b");
        // 10.213.x.y/30 per pair, from the id.
        let third = (id / 64 % 256) as u8;
        let fourth = ((id % 64) * 4) as u8;
        let addr_a = Ipv4Addr::new(10, 213, third, fourth + 1);
        let addr_b = Ipv4Addr::new(10, 213, third, fourth + 2);
        let veth_a = format!("tva{id}");
        let veth_b = format!("tvb{id}");
        ip(&["netns", "add", &a])?;
        let pair = NetPair {
            a,
            b: b.clone(),
            addr_a,
            addr_b,
            veth_b: veth_b.clone(),
        };
        ip(&["netns", "add", &b])?;
        ip(&[
            "link", "add", &veth_a, "netns", &pair.a, "type", "veth", "peer", "name", &veth_b,
            "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&pair.a, &veth_a, addr_a), (&pair.b, &veth_b, addr_b)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }

    /// Takes `b`'s end of the link down (or up again).
    pub fn link_b(&self, up: bool) {
        ip(&[
            "-n",
            &self.b,
            "link",
            "set",
            &self.veth_b,
            if up { "up" } else { "down" },
        ])
        .expect("set the veth link");
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth, and the pair.
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
