//! Data the lab's workloads send and check: reproducible, cheap, and
//! unlike anything a protocol would write, so a stray match in a packet
//! capture means real leakage.

/// Fills `buffer` with deterministic pseudo-random bytes (xorshift): cheap
/// to produce, reproducible from `seed`, and nothing like text, so a stray
/// match in a packet capture means real leakage.
pub fn pattern(seed: u64, buffer: &mut [u8]) {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buffer.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}
