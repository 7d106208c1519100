//! Patch manifests: `patch.toml` as `trellis patch publish` reads it from
//! the operator's patch directory (through `Patch::load`, artifacts and
//! all), and a manifest's signed bytes as a relay or node decodes them once
//! the operator's signature holds.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use trellis_node::patch::{self, Patch};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("a temporary directory");
        // Artifacts a manifest may name.
        std::fs::write(d.path().join("install.sh"), "#!/bin/sh\necho ok\n").expect("writable");
        std::fs::write(d.path().join("app.bin"), [0u8; 64]).expect("writable");
        d
    })
    .path()
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(dir().join("patch.toml"), data).expect("writable");
    let _ = Patch::load(dir());
    let _ = patch::decode_manifest(data);
});
