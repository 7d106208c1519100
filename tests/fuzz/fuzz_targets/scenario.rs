//! Simulator scenario files, as `trellis-sim run FILE` parses and checks
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_sim::scenario::Scenario;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Scenario::parse(text, "fuzz.toml");
    }
});
