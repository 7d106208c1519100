//! The uplink protocol: every message a relay or a hub reads from the
//! other, one frame as it arrives on the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_node::wire;
use trellis_relay::uplink::{
    HubMsg, MAX_UPLINK_FRAME, RelayMsg, RelayRequest, RelayResponse, Request, Response,
    UPLINK_VERSION,
};

fuzz_target!(|data: &[u8]| {
    let _ = wire::decode::<RelayMsg>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
    let _ = wire::decode::<HubMsg>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
    let _ = wire::decode::<Request>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
    let _ = wire::decode::<Response>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
    let _ = wire::decode::<RelayRequest>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
    let _ = wire::decode::<RelayResponse>(data, UPLINK_VERSION, MAX_UPLINK_FRAME);
});
