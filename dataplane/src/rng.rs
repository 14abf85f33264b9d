//! A small seeded generator, the same on every platform: the simulated engine's requests and KV
//! bytes, the benches' blocks and the tests' random inputs come from it, so a run can be replayed
//! from its seed.

/// SplitMix64: small, seeded, and the same on every platform.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
