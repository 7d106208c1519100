//! Enrolment: a machine's request as a relay reads it from a client with
//! no certificate, the relay's answer as the machine reads it, and a join
//! token as typed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_node::enrol::{ENROL_VERSION, EnrolAsk, EnrolResponse, JoinToken, MAX_ENROL_FRAME};
use trellis_node::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok((EnrolAsk::Enrol(req), _)) =
        wire::decode::<EnrolAsk>(data, ENROL_VERSION, MAX_ENROL_FRAME)
    {
        let _ = req.id();
        let _ = JoinToken::parse(&req.token);
    }
    let _ = wire::decode::<EnrolResponse>(data, ENROL_VERSION, MAX_ENROL_FRAME);
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(t) = JoinToken::parse(text)
    {
        assert_eq!(JoinToken::parse(&t.to_string()), Ok(t));
    }
});
