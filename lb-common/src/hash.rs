//! The client hash: pure, seeded, loop-free (so the eBPF verifier accepts it) and identical in kernel
//! and user space.

/// Default Maglev table size: prime and larger than 100 × the backends of any realistic cluster.
pub const DEFAULT_RING_SIZE: u32 = 65537;

/// Final avalanche step of MurmurHash3 (fmix32): every input bit affects every output bit.
#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of an IPv4 client address given in host byte order (`u32::from(Ipv4Addr)`), mixed with `seed`.
#[inline(always)]
pub const fn client_hash(seed: u32, client_ipv4: u32) -> u32 {
    fmix32(fmix32(client_ipv4 ^ seed).wrapping_add(seed.rotate_left(16)))
}

/// The Maglev ring slot for a client: `client_hash(seed, ip) % ring_size`.
#[inline(always)]
pub const fn ring_slot(seed: u32, client_ipv4: u32, ring_size: u32) -> u32 {
    client_hash(seed, client_ipv4) % ring_size
}

/// A 64-bit hash of arbitrary bytes (FNV-1a then fmix), used in user space to place backends in the
/// Maglev permutation. Not used by the kernel.
pub fn bytes_hash(seed: u32, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(seed);
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let hi = u64::from(fmix32((h >> 32) as u32 ^ seed));
    let lo = u64::from(fmix32(h as u32 ^ seed.rotate_left(8)));
    (hi << 32) | lo
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_changes_hash() {
        let ip = 0x0a00_0001;
        assert_ne!(client_hash(1, ip), client_hash(2, ip));
        assert_eq!(client_hash(7, ip), client_hash(7, ip));
    }

    #[test]
    fn neighbouring_addresses_spread() {
        // 1000 consecutive addresses over 10 buckets: every bucket within 30% of the mean.
        let mut buckets = [0u32; 10];
        for i in 0..1000u32 {
            buckets[(client_hash(42, 0xc0a8_0000 + i) % 10) as usize] += 1;
        }
        for b in buckets {
            assert!((70..=130).contains(&b), "bucket count {b}");
        }
    }

    #[test]
    fn slot_is_within_ring() {
        for i in 0..1000u32 {
            assert!(ring_slot(3, i.wrapping_mul(2_654_435_761), DEFAULT_RING_SIZE) < DEFAULT_RING_SIZE);
        }
    }

    #[test]
    fn bytes_hash_depends_on_every_byte() {
        assert_ne!(bytes_hash(0, b"10.0.0.1:80"), bytes_hash(0, b"10.0.0.1:81"));
        assert_ne!(bytes_hash(0, b"a"), bytes_hash(1, b"a"));
    }
}
