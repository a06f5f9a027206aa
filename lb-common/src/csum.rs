//! Incremental Internet checksum updates (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
//!
//! Values are taken exactly as they sit in packet memory (read as native integers). The one's
//! complement sum does not depend on byte order as long as every word is read the same way, so
//! no byte swapping is needed.

#[inline(always)]
const fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// The checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// The checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let s = (!check) as u32 + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff);
    !fold(s)
}

/// Full checksum of `data` read as native 16-bit words (user space: fixtures and tests).
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut s = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        s += u32::from(u16::from_ne_bytes([c[0], c[1]]));
        s = (s & 0xffff) + (s >> 16);
    }
    if let [last] = chunks.remainder() {
        s += u32::from(u16::from_ne_bytes([*last, 0]));
    }
    !fold(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 20-byte IPv4 header with a valid checksum.
    fn header(src: [u8; 4], dst: [u8; 4]) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        let c = checksum(&h, 0);
        h[10..12].copy_from_slice(&c.to_ne_bytes());
        h
    }

    fn word(h: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    }

    #[test]
    fn incremental_matches_full_recomputation() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..10_000 {
            let h = header(next().to_ne_bytes(), next().to_ne_bytes());
            assert_eq!(checksum(&h, 0), 0, "valid header sums to zero");
            let mut g = h;
            let (new_src, new_dst) = (next().to_ne_bytes(), next().to_ne_bytes());
            g[12..16].copy_from_slice(&new_src);
            g[16..20].copy_from_slice(&new_dst);
            let check = u16::from_ne_bytes([h[10], h[11]]);
            let check = replace4(check, word(&h, 12), word(&g, 12));
            let check = replace4(check, word(&h, 16), word(&g, 16));
            g[10..12].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(checksum(&g, 0), 0, "incrementally updated header must verify");
        }
    }

    #[test]
    fn replace2_updates_a_port() {
        let mut data = [0x12u8, 0x34, 0xab, 0xcd, 0, 0];
        let c = checksum(&data, 0);
        data[4..6].copy_from_slice(&c.to_ne_bytes());
        let old = u16::from_ne_bytes([data[0], data[1]]);
        data[0..2].copy_from_slice(&8080u16.to_be_bytes());
        let new = u16::from_ne_bytes([data[0], data[1]]);
        let c = replace2(u16::from_ne_bytes([data[4], data[5]]), old, new);
        data[4..6].copy_from_slice(&c.to_ne_bytes());
        assert_eq!(checksum(&data, 0), 0);
    }
}
