//! Configuration manifests: a manifest file as `trellis config publish`
//! reads it from the operator's directory (through `Fleet::load`, files and
//! all), and a bundle's signed bytes as a node decodes them once the
//! operator's signature holds.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use trellis_node::bundle;
use trellis_node::desired::Fleet;

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary directory");
        // A file a manifest may name as its source.
        std::fs::write(d.path().join("motd.txt"), "hello\n").expect("writable");
        d
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(dir().join("fleet.toml"), data).expect("writable");
    let _ = Fleet::load(dir());
    let _ = bundle::decode(data);
});
