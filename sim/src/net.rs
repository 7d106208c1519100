//! The virtual network: links of three classes, each with a latency
//! distribution, loss, bandwidth and up/down state.
//!
//! Messages between relays and hubs, and between hubs, travel on QUIC
//! streams: in order, and retransmitted when a packet is lost. A [`Pipe`]
//! is one direction of one connection: a message waits for the ones before
//! it to be serialised at the link's bandwidth, then takes the link's
//! latency plus jitter, plus a retransmission timeout for every loss drawn.
//! Whether a link is up is the world's business: a message sent on, or
//! arriving over, a link that is down is lost, and the connection with it.

use crate::rng::SimRng;
use crate::scenario::LinkClass;

/// Bytes a message costs on the wire beyond its payload: UDP/IP and QUIC
/// headers, and the frame header.
pub const PACKET_OVERHEAD: u64 = 48;
/// A QUIC handshake, both ways (certificates included).
pub const HANDSHAKE_BYTES: u64 = 6_000;

/// One class of links, in seconds and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub latency: f64,
    pub jitter: f64,
    pub loss: f64,
    pub bandwidth: f64,
}

impl Params {
    pub fn of(c: &LinkClass) -> Self {
        Params {
            latency: c.latency.as_secs_f64(),
            jitter: c.jitter.as_secs_f64(),
            loss: c.loss,
            bandwidth: c.bandwidth as f64,
        }
    }

    /// A one-way trip for a small message, jitter drawn.
    pub fn one_way(&self, rng: &mut SimRng) -> f64 {
        self.latency + self.jitter * rng.f64()
    }

    /// QUIC's probe timeout, roughly: 1.5 round trips plus the peer's
    /// acknowledgement delay.
    pub fn retransmit_after(&self) -> f64 {
        3.0 * (self.latency + self.jitter) + 0.025
    }
}

/// One direction of one connection.
#[derive(Debug, Clone, Default)]
pub struct Pipe {
    /// Until when the sender's side of the link is busy serialising.
    busy_until: f64,
    /// When the last message sent will arrive (streams deliver in order).
    last_arrival: f64,
}

impl Pipe {
    /// When a message of `bytes` sent at `now` arrives, with `extra_loss`
    /// on top of the class's own.
    pub fn send(
        &mut self,
        now: f64,
        bytes: u64,
        p: &Params,
        extra_loss: f64,
        rng: &mut SimRng,
    ) -> f64 {
        let start = now.max(self.busy_until);
        let tx = bytes as f64 / p.bandwidth;
        self.busy_until = start + tx;
        let loss = (p.loss + extra_loss).min(0.95);
        let mut retransmits = 0.0;
        if loss > 0.0 {
            // Each lost attempt costs a probe timeout; a message is lost
            // if any of its packets is.
            let packets = bytes.div_ceil(1200).max(1) as f64;
            let p_msg = 1.0 - (1.0 - loss).powf(packets);
            let mut tries = 0;
            while tries < 30 && rng.chance(p_msg) {
                retransmits += p.retransmit_after();
                tries += 1;
            }
        }
        let arrival = start + tx + p.one_way(rng) + retransmits;
        let arrival = arrival.max(self.last_arrival);
        self.last_arrival = arrival;
        arrival
    }
}

/// Bytes and messages sent on a class of links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counter {
    pub bytes: u64,
    pub messages: u64,
}

impl Counter {
    pub fn add(&mut self, payload: u64) {
        self.bytes += payload + PACKET_OVERHEAD;
        self.messages += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wan() -> Params {
        Params {
            latency: 0.040,
            jitter: 0.0,
            loss: 0.0,
            bandwidth: 1_000_000.0,
        }
    }

    #[test]
    fn a_message_takes_its_serialisation_time_and_the_latency() {
        let mut rng = SimRng::new(1);
        let mut pipe = Pipe::default();
        let t = pipe.send(10.0, 100_000, &wan(), 0.0, &mut rng);
        assert!((t - 10.14).abs() < 1e-9, "{t}");
        // The next waits for the link.
        let t2 = pipe.send(10.0, 100_000, &wan(), 0.0, &mut rng);
        assert!((t2 - 10.24).abs() < 1e-9, "{t2}");
    }

    #[test]
    fn loss_delays_messages_but_keeps_their_order() {
        let mut rng = SimRng::new(2);
        let mut pipe = Pipe::default();
        let mut last = 0.0;
        let mut delayed = 0;
        for i in 0..200 {
            let t = pipe.send(i as f64 * 0.001, 100, &wan(), 0.3, &mut rng);
            assert!(t >= last);
            if t > i as f64 * 0.001 + 0.05 {
                delayed += 1;
            }
            last = t;
        }
        assert!(delayed > 20, "{delayed}");
    }
}
