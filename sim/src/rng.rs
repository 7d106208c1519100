//! Deterministic randomness: one root seed, and from it an independent
//! stream for every site, node, link and subsystem, derived by name, so that
//! adding a consumer does not shift the numbers another one draws.

/// SplitMix64: small, fast, and good enough for a simulation's choices.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a, to turn a label into a number.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl SimRng {
    pub fn new(seed: u64) -> Self {
        SimRng(seed)
    }

    /// The stream for `label` (and `index`) under the root `seed`.
    pub fn derive(seed: u64, label: &str, index: u64) -> Self {
        SimRng(mix(
            seed ^ mix(fnv1a(label.as_bytes()) ^ mix(index.wrapping_add(1)))
        ))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the bias is negligible at these sizes.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.f64() < p
    }

    /// An exponentially distributed value with this mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.f64()).ln()
    }

    /// `k` distinct indexes of `0..n`, in random order (k clipped to n).
    pub fn sample(&mut self, n: usize, k: usize, out: &mut Vec<usize>) {
        out.clear();
        let k = k.min(n);
        if k == 0 {
            return;
        }
        if k * 4 >= n {
            // Partial Fisher-Yates on a small index list.
            let mut all: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = i + self.below((n - i) as u64) as usize;
                all.swap(i, j);
            }
            out.extend_from_slice(&all[..k]);
        } else {
            while out.len() < k {
                let x = self.below(n as u64) as usize;
                if !out.contains(&x) {
                    out.push(x);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_label_give_the_same_stream_and_others_differ() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = SimRng::derive(7, "site", 3);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = SimRng::derive(7, "site", 3);
                move |_| r.next_u64()
            })
            .collect();
        let c = SimRng::derive(7, "site", 4).next_u64();
        let d = SimRng::derive(8, "site", 3).next_u64();
        assert_eq!(a, b);
        assert_ne!(a[0], c);
        assert_ne!(a[0], d);
    }

    #[test]
    fn draws_stay_in_their_ranges_and_samples_are_distinct() {
        let mut r = SimRng::new(1);
        let mut out = Vec::new();
        for n in 1..40 {
            for k in 0..6 {
                r.sample(n, k, &mut out);
                assert_eq!(out.len(), k.min(n));
                let mut sorted = out.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), out.len());
                assert!(out.iter().all(|x| *x < n));
            }
        }
        let mean: f64 = (0..10_000).map(|_| r.f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
