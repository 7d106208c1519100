//! The values members publish in gossip and every other member parses:
//! health, labels and facts, configuration offers and results, drift
//! notes, patch orders and states, which hub serves which site, and the
//! revocation list a relay publishes (decoded, then each entry's body).
//! Input:
//! lines of `key=value`; each value also goes through every parser alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_hub::federation::decode_served;
use trellis_node::distribute::{ConfigResult, DriftNote, Offer};
use trellis_node::patchstate::{NodePatch, PatchOrder, PatchState};
use trellis_node::site::{Health, descriptors_of};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let kv: Vec<(&str, &str)> = text
        .lines()
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .collect();
    let _ = Health::from_kv(kv.iter().copied());
    let _ = descriptors_of(kv.iter().copied());
    for (key, value) in kv {
        let _ = Offer::parse(value);
        let _ = ConfigResult::parse(value);
        let _ = DriftNote::parse(value);
        let _ = PatchOrder::parse(value);
        let _ = PatchState::parse(value);
        let _ = NodePatch::parse(value);
        let _ = decode_served("hub-1", key, value);
        if let Ok(list) = trellis_node::revocation::from_gossip(value) {
            for r in list {
                let _ = trellis_node::revocation::decode(&r.entry);
            }
        }
    }
});
