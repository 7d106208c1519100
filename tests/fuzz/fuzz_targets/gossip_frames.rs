//! Gossip transport framing: the bytes a site member reads from one of a
//! peer's gossip streams, split into frames (a 4-byte length, then the
//! body) and decoded in order with the stream's one digest decoder, as
//! `QuicTransport` does; the first bad frame ends the stream. Then the
//! digest codec's promise: whatever a member encodes, its peer decodes to
//! exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_node::gossip::{MAX_GOSSIP_FRAME, decode_frame};
use trellis_node::gossip_codec::{StreamDecoder, StreamEncoder};
use trellis_node::wire;

fuzz_target!(|data: &[u8]| {
    let mut decoder = StreamDecoder::default();
    let mut rest = data;
    while let Some(prefix) = rest.get(..4) {
        let Ok(len) = wire::frame_len(prefix.try_into().expect("4 bytes"), MAX_GOSSIP_FRAME) else {
            break;
        };
        let Some(body) = rest.get(4..4 + len) else {
            break;
        };
        if decode_frame(&mut decoder, body).is_err() {
            break;
        }
        rest = &rest[4 + len..];
    }

    // The same bytes as up to three messages on one stream, coded for a
    // peer of mesh protocol version 1 or 2.
    let version = 1 + (data.len() % 2) as u16;
    let (mut encoder, mut decoder) = (StreamEncoder::speaking(version), StreamDecoder::default());
    let cut = |at: u8| (at as usize).min(data.len());
    let (a, b) = match data.first() {
        Some(&x) => (cut(x), cut(x.wrapping_mul(3))),
        None => (0, 0),
    };
    let (a, b) = (a.min(b), a.max(b));
    for plain in [&data[..a], &data[a..b], &data[b..]] {
        let coded = encoder.encode(plain);
        let back = decoder
            .decode(&coded, usize::MAX)
            .expect("a coded message decodes");
        assert_eq!(back, plain, "a coded message decodes to what was coded");
    }
});
