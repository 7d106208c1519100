//! Federation sync between hubs: a replication request as a hub reads it
//! from a peer hub, and the answer as the asking hub reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_hub::replication::{MAX_REPL_FRAME, REPL_VERSION, ReplRequest, ReplResponse};
use trellis_node::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode::<ReplRequest>(data, REPL_VERSION, MAX_REPL_FRAME);
    let _ = wire::decode::<ReplResponse>(data, REPL_VERSION, MAX_REPL_FRAME);
});
