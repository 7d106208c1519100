//! The fetch protocol: a request as a relay reads it from a node, and an
//! answer as a node reads it from its relay (a chunk taken from its frame
//! in place, anything else decoded), and the signed bundle and patch
//! manifest an answer carries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_node::bundle::SignedBundle;
use trellis_node::distribute::{
    FETCH_VERSION, FetchRequest, FetchResponse, MAX_FETCH_FRAME, MAX_FETCH_REQUEST, chunk_answer,
};
use trellis_node::patch::SignedPatch;
use trellis_node::wire;

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode::<FetchRequest>(data, FETCH_VERSION, MAX_FETCH_REQUEST);
    let _ = wire::decode::<FetchResponse>(data, FETCH_VERSION, MAX_FETCH_FRAME);
    if let Ok(Ok(chunk)) = chunk_answer(data.to_vec()) {
        assert!(chunk.len() <= data.len());
    }
    let _ = postcard::from_bytes::<SignedBundle>(data);
    let _ = postcard::from_bytes::<SignedPatch>(data);
});
