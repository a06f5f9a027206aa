//! TCP resets answered by the XDP program (RFC 793, "Reset Generation"): the sequence numbers of
//! an RST for a segment that has no connection, and the checksums of the fixed 20 + 20 byte
//! IPv4/TCP headers it is sent with. Pure and `const`, so the kernel and the tests compute them
//! the same way; values ending in `_be` are network order exactly as in packet memory.

/// TCP flag bits of the low byte of the flags field.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The IPv4 header of a reset: no options, total length 40, id 0, DF, TTL [`RST_TTL`], TCP.
pub const RST_TOT_LEN: u16 = 40;
pub const RST_FRAG_DF: u16 = 0x4000;
pub const RST_TTL: u8 = 64;
/// Version 4, IHL 5.
pub const RST_VERSION_IHL: u8 = 0x45;

/// Resets sent per CPU and second at most, and how many may go out at once above that rate.
pub const RST_PER_SEC: u64 = 1000;
pub const RST_BURST: u64 = 200;
/// Nanoseconds between two resets at [`RST_PER_SEC`].
pub const RST_INTERVAL_NS: u64 = 1_000_000_000 / RST_PER_SEC;

/// Sequence number, acknowledgment number and flags of a reset (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

/// The reset answering a segment with `seq`, `ack`, `flags` and `payload_len` data bytes, or
/// `None` for a segment that is itself a reset (never answered). RFC 793: if the segment has
/// ACK, the reset takes its sequence number from the segment's acknowledgment and carries no ACK;
/// otherwise its sequence number is 0 and it acknowledges everything the segment occupied (data,
/// plus one for SYN and one for FIN).
pub const fn answer(seq: u32, ack: u32, flags: u8, payload_len: u32) -> Option<Reset> {
    if flags & TCP_RST != 0 {
        return None;
    }
    if flags & TCP_ACK != 0 {
        return Some(Reset {
            seq: ack,
            ack: 0,
            flags: TCP_RST,
        });
    }
    let mut len = payload_len;
    if flags & TCP_SYN != 0 {
        len = len.wrapping_add(1);
    }
    if flags & TCP_FIN != 0 {
        len = len.wrapping_add(1);
    }
    Some(Reset {
        seq: 0,
        ack: seq.wrapping_add(len),
        flags: TCP_RST | TCP_ACK,
    })
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

/// Header checksum of a reset's IPv4 header (see [`RST_TOT_LEN`] and the constants beside it).
pub const fn ipv4_check(saddr_be: u32, daddr_be: u32) -> u16 {
    let s = word(RST_VERSION_IHL, 0)
        + RST_TOT_LEN.to_be() as u32
        + RST_FRAG_DF.to_be() as u32
        + word(RST_TTL, 6)
        + halves(saddr_be)
        + halves(daddr_be);
    finish(s)
}

/// Checksum of a reset's 20-byte TCP header (data offset 5, window 0, urgent pointer 0) with its
/// pseudo header; `reset` in host order, addresses and ports in network order.
pub const fn tcp_check(saddr_be: u32, daddr_be: u32, sport_be: u16, dport_be: u16, reset: &Reset) -> u16 {
    let pseudo = halves(saddr_be) + halves(daddr_be) + word(0, 6) + 20u16.to_be() as u32;
    let header = sport_be as u32
        + dport_be as u32
        + halves(reset.seq.to_be())
        + halves(reset.ack.to_be())
        + doff_flags(reset).to_be() as u32;
    finish(pseudo + header)
}

/// Data offset (5 words) and flags of a reset, host order.
pub const fn doff_flags(reset: &Reset) -> u16 {
    (5 << 12) | reset.flags as u16
}

/// The GCRA form of a token bucket: with `tat` the theoretical arrival time of the next reset,
/// whether one may go out at `now`, and the new `tat`. At most [`RST_BURST`] at once, then one
/// every [`RST_INTERVAL_NS`].
pub const fn admit(tat: u64, now: u64) -> (bool, u64) {
    let start = if tat > now { tat } else { now };
    if start - now > (RST_BURST - 1) * RST_INTERVAL_NS {
        return (false, tat);
    }
    (true, start + RST_INTERVAL_NS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum::checksum;

    #[test]
    fn sequence_numbers_follow_rfc_793() {
        // An ACK (the usual case: an established connection the LB forgot).
        let r = answer(1000, 777_777, TCP_ACK, 50).unwrap();
        assert_eq!((r.seq, r.ack, r.flags), (777_777, 0, TCP_RST));
        // No ACK: sequence 0, acknowledging data, SYN and FIN.
        let r = answer(u32::MAX - 1, 5, TCP_FIN, 10).unwrap();
        assert_eq!((r.seq, r.ack, r.flags), (0, 9, TCP_RST | TCP_ACK));
        let r = answer(41, 0, TCP_SYN, 0).unwrap();
        assert_eq!(r.ack, 42);
        assert_eq!(
            answer(1, 2, TCP_RST | TCP_ACK, 0),
            None,
            "a reset is never answered"
        );
    }

    #[test]
    fn checksums_verify_over_the_built_headers() {
        let (src, dst) = ([10u8, 0, 0, 100], [10u8, 0, 0, 11]);
        let (saddr_be, daddr_be) = (u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
        let (sport, dport) = (80u16, 40_000u16);
        for reset in [
            answer(1, 0xdead_beef, TCP_ACK, 0).unwrap(),
            answer(7, 0, 0, 3).unwrap(),
        ] {
            let mut ip = [0u8; 20];
            ip[0] = RST_VERSION_IHL;
            ip[2..4].copy_from_slice(&RST_TOT_LEN.to_be_bytes());
            ip[6..8].copy_from_slice(&RST_FRAG_DF.to_be_bytes());
            ip[8] = RST_TTL;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
            ip[10..12].copy_from_slice(&ipv4_check(saddr_be, daddr_be).to_ne_bytes());
            assert_eq!(checksum(&ip, 0), 0);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[4..8].copy_from_slice(&reset.seq.to_be_bytes());
            tcp[8..12].copy_from_slice(&reset.ack.to_be_bytes());
            tcp[12..14].copy_from_slice(&doff_flags(&reset).to_be_bytes());
            let check = tcp_check(saddr_be, daddr_be, sport.to_be(), dport.to_be(), &reset);
            tcp[16..18].copy_from_slice(&check.to_ne_bytes());
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&src);
            pseudo[4..8].copy_from_slice(&dst);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
            let initial: u32 = pseudo
                .chunks(2)
                .map(|c| u32::from(u16::from_ne_bytes([c[0], c[1]])))
                .sum();
            assert_eq!(checksum(&tcp, initial), 0, "{reset:?}");
        }
    }

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut tat = 0;
        let now = 5_000_000_000;
        let mut sent = 0;
        for _ in 0..1000 {
            let (ok, next) = admit(tat, now);
            if ok {
                sent += 1;
                tat = next;
            }
        }
        assert_eq!(sent, RST_BURST);
        // One interval later exactly one more goes out.
        let (ok, next) = admit(tat, now + RST_INTERVAL_NS);
        assert!(ok);
        assert!(!admit(next, now + RST_INTERVAL_NS).0);
        // After a quiet second the full burst is back.
        assert!(admit(next, now + 2_000_000_000 + RST_BURST * RST_INTERVAL_NS).0);
    }
}
