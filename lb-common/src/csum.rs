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

/// Changes to 16-bit words of a segment, summed (RFC 1624: `~m + m'` per word) to be applied to
/// its checksum once: the XDP program's rewrites collect them, then [`Delta::apply`] fixes the
/// checksum field, or the TC program hands [`Delta::sum`] to `bpf_l4_csum_replace`, which also
/// knows a checksum the stack has left partial (offloaded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delta(u32);

impl Delta {
    /// A 32-bit field changed from `old` to `new`.
    #[inline(always)]
    #[must_use]
    pub const fn word4(self, old: u32, new: u32) -> Delta {
        Delta(fold32(
            self.0 + ((!old) >> 16) + ((!old) & 0xffff) + (new >> 16) + (new & 0xffff),
        ))
    }

    /// A 16-bit field changed from `old` to `new`.
    #[inline(always)]
    #[must_use]
    pub const fn word2(self, old: u16, new: u16) -> Delta {
        Delta(fold32(self.0 + (!old) as u32 + new as u32))
    }

    /// `check` (a complete checksum) after the changes.
    #[inline(always)]
    pub const fn apply(self, check: u16) -> u16 {
        !fold((!check) as u32 + self.0)
    }

    /// The changes as a 32-bit one's complement sum (`bpf_l4_csum_replace`'s diff).
    #[inline(always)]
    pub const fn sum(self) -> u32 {
        self.0
    }
}

/// `s` with its carries above 17 bits folded back (stays below 0x2_0000 once folded).
#[inline(always)]
const fn fold32(s: u32) -> u32 {
    (s & 0xffff) + (s >> 16)
}

/// Sum of an IPv4 TCP pseudo header (addresses as in memory, protocol 6, TCP length).
#[inline(always)]
pub const fn pseudo_v4(saddr_be: u32, daddr_be: u32, tcp_len: u16) -> u32 {
    (saddr_be >> 16)
        + (saddr_be & 0xffff)
        + (daddr_be >> 16)
        + (daddr_be & 0xffff)
        + u16::from_ne_bytes([0, 6]) as u32
        + tcp_len.to_be() as u32
}

/// A segment built from scratch with the complete checksum `check`, for a stack that may have
/// left the packet's checksum partial (offloaded: the field holds only the pseudo header's sum,
/// the rest is added on transmit): the two diffs which, applied by the kernel's
/// `bpf_l4_csum_replace` to a zeroed field (the first as a pseudo-header change, the second as
/// a change elsewhere), leave `check` in a complete packet and the pseudo header's sum in a
/// partial one (where only pseudo-header changes are applied).
#[inline(always)]
pub const fn segment_diffs(check: u16, pseudo: u32) -> (u32, u32) {
    (pseudo, (!check) as u32 + (!fold(pseudo)) as u32)
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

    /// A deterministic stream of test values (xorshift32) from `seed`.
    fn xorshift(mut seed: u32) -> impl FnMut() -> u32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        }
    }

    fn word(h: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]])
    }

    #[test]
    fn incremental_matches_full_recomputation() {
        let mut next = xorshift(0x1234_5678u32);
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

    /// The kernel's `inet_proto_csum_replace_by_diff` (net/core/utils.c), for the two states.
    fn kernel_by_diff(field: u16, diff: u32, pseudo: bool, partial: bool) -> u16 {
        if !partial {
            !fold(diff.wrapping_add(u32::from(!field)))
        } else if pseudo {
            fold(u32::from(field).wrapping_add(diff))
        } else {
            field
        }
    }

    #[test]
    fn delta_collected_then_applied_matches_a_recomputation() {
        let mut next = xorshift(0x9e37_79b9u32);
        for _ in 0..10_000 {
            // Pseudo header (addresses, proto, length) then a 20-byte TCP header, as summed.
            let mut seg = [0u8; 32];
            for b in &mut seg {
                *b = next() as u8;
            }
            seg[8] = 0;
            seg[9] = 6;
            seg[10..12].copy_from_slice(&20u16.to_be_bytes());
            seg[28..30].copy_from_slice(&[0, 0]);
            let c = checksum(&seg, 0);
            seg[28..30].copy_from_slice(&c.to_ne_bytes());
            let before = seg;
            let (src, dst, ports, seq) = (next(), next(), next(), next());
            let mut d = Delta::default();
            for (at, new) in [(0, src), (4, dst), (12, ports), (16, seq)] {
                d = d.word4(word(&seg, at), new);
                seg[at..at + 4].copy_from_slice(&new.to_ne_bytes());
            }
            let old_port = u16::from_ne_bytes([seg[12], seg[13]]);
            d = d.word2(old_port, 443u16.to_be());
            seg[12..14].copy_from_slice(&443u16.to_be_bytes());
            let check = d.apply(u16::from_ne_bytes([before[28], before[29]]));
            seg[28..30].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(checksum(&seg, 0), 0, "collected changes must verify");
            // The same through the kernel's diff rule for a complete checksum.
            let by_kernel = kernel_by_diff(
                u16::from_ne_bytes([before[28], before[29]]),
                d.sum(),
                false,
                false,
            );
            seg[28..30].copy_from_slice(&by_kernel.to_ne_bytes());
            assert_eq!(checksum(&seg, 0), 0, "the kernel's rule on the sum must verify");
        }
    }

    #[test]
    fn segment_diffs_leave_a_complete_or_a_partial_checksum() {
        let mut next = xorshift(0x1357_9bdfu32);
        for _ in 0..10_000 {
            let (saddr, daddr) = (next(), next());
            let mut tcp = [0u8; 20];
            for b in &mut tcp {
                *b = next() as u8;
            }
            tcp[16..18].copy_from_slice(&[0, 0]);
            let pseudo = pseudo_v4(saddr, daddr, 20);
            let check = checksum(&tcp, pseudo);
            let (first, second) = segment_diffs(check, pseudo);
            // Complete: the field ends as `check`, which verifies.
            let f = kernel_by_diff(kernel_by_diff(0, first, true, false), second, false, false);
            tcp[16..18].copy_from_slice(&f.to_ne_bytes());
            assert_eq!(checksum(&tcp, pseudo), 0, "complete checksum must verify");
            // Partial: the field ends as the pseudo header's sum, and the transmit path's sum
            // over the header (from that field) yields the same valid checksum.
            let p = kernel_by_diff(kernel_by_diff(0, first, true, true), second, false, true);
            tcp[16..18].copy_from_slice(&p.to_ne_bytes());
            let finished = checksum(&tcp, 0);
            tcp[16..18].copy_from_slice(&finished.to_ne_bytes());
            assert_eq!(checksum(&tcp, pseudo), 0, "finished partial checksum must verify");
        }
    }
}
