//! The outer IPv4 header of a `forwarding = "dsr"` packet (IPIP, RFC 2003): the client's packet,
//! untouched, wrapped in a 20-byte header from the LB's address toward the backend to the backend.

/// IP protocol number of IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// Length of the outer header (no options).
pub const OUTER_LEN: u16 = 20;
/// Version 4, IHL 5.
pub const OUTER_VERSION_IHL: u8 = 0x45;
/// TTL of the outer header (the inner one is left as the client sent it).
pub const OUTER_TTL: u8 = 64;
/// The "don't fragment" bit (host order): set on the outer header when the inner one has it, so
/// path MTU discovery works as without the tunnel.
pub const IP_DF: u16 = 0x4000;

/// The outer header's checksum; `tot_len_be` and `frag_off_be` as in the header (network order),
/// addresses in network order, identification 0.
pub const fn outer_check(tos: u8, tot_len_be: u16, frag_off_be: u16, saddr_be: u32, daddr_be: u32) -> u16 {
    let s = word(OUTER_VERSION_IHL, tos)
        + tot_len_be as u32
        + frag_off_be as u32
        + word(OUTER_TTL, IPPROTO_IPIP)
        + halves(saddr_be)
        + halves(daddr_be);
    finish(s)
}

/// The 16-bit words of a 32-bit value as it sits in memory (read natively).
const fn halves(v: u32) -> u32 {
    (v >> 16) + (v & 0xffff)
}

/// A 16-bit word made of two bytes as they sit in memory.
const fn word(a: u8, b: u8) -> u32 {
    u16::from_ne_bytes([a, b]) as u32
}

const fn finish(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::checksum;

    #[test]
    fn outer_header_checksums_to_zero() {
        for (tos, len, df, src, dst) in [
            (0u8, 60u16, true, [10, 0, 0, 1], [10, 0, 0, 2]),
            (0x10, 1500, false, [192, 168, 255, 254], [172, 16, 3, 9]),
            (0xff, 65535, true, [255, 255, 255, 255], [0, 0, 0, 0]),
        ] {
            let frag: u16 = if df { IP_DF } else { 0 };
            let mut h = [0u8; 20];
            h[0] = OUTER_VERSION_IHL;
            h[1] = tos;
            h[2..4].copy_from_slice(&len.to_be_bytes());
            h[6..8].copy_from_slice(&frag.to_be_bytes());
            h[8] = OUTER_TTL;
            h[9] = IPPROTO_IPIP;
            h[12..16].copy_from_slice(&src);
            h[16..20].copy_from_slice(&dst);
            let c = outer_check(
                tos,
                len.to_be(),
                frag.to_be(),
                u32::from_ne_bytes(src),
                u32::from_ne_bytes(dst),
            );
            h[10..12].copy_from_slice(&c.to_ne_bytes());
            assert_eq!(checksum(&h, 0), 0, "{h:?}");
            // And it is the checksum a full computation gives.
            h[10..12].copy_from_slice(&[0, 0]);
            assert_eq!(checksum(&h, 0), c);
        }
    }
}
