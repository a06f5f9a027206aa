//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Each backend walks its own permutation of the M slots (offset and skip from a seeded hash of its
//! address) and claims the next free slot on each of its turns. A backend gets turns in proportion to
//! its weight, so shares follow weights; removing one backend frees only its own slots, and most other
//! slots keep their owner.

use lb_common::hash::bytes_hash;

/// A backend as the table builder sees it: a stable id and the key its permutation derives from.
#[derive(Clone, Debug)]
pub struct Member<'a> {
    pub id: u32,
    pub key: &'a [u8],
    pub weight: u32,
}

/// Builds a table of `size` slots (`size` prime) holding member ids. Empty when no member has weight.
///
/// The members take their turns in the order of their keys, not in the order given: two nodes
/// whose services got the same backends in a different order (added at run time on one, read
/// from the file at a restart on the other) build the same table, so they send every client to
/// the same backend.
///
/// The table is the one of the paper's formula (see the `the_table_is_the_formulas` test); only the
/// way to it is quicker. Which slots are taken is kept in a bitmap (a few KiB, in the L1 cache,
/// where the table itself is not). The last slots to be filled cost the most probes, so once only
/// [`DIRECT_BELOW`] slots are free, a member's next slot is computed instead of walked to: of the
/// free slots, the one its permutation reaches first (the step count `j` with
/// `position + j × skip ≡ slot (mod M)` is `(slot − position) × skip⁻¹ mod M`).
pub fn build(members: &[Member<'_>], size: u32, seed: u32) -> Vec<u32> {
    let mut members: Vec<&Member<'_>> = members.iter().filter(|m| m.weight > 0).collect();
    members.sort_by(|a, b| a.key.cmp(b.key));
    if members.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let max_weight = u64::from(members.iter().map(|b| b.weight).max().unwrap_or(1));
    let mut walkers: Vec<Walker> = members
        .iter()
        .map(|b| {
            let h = bytes_hash(seed, b.key);
            let offset = (h >> 32) % m;
            let skip = if m > 1 { (h & 0xffff_ffff) % (m - 1) + 1 } else { 1 };
            Walker {
                next: offset,
                skip,
                inverse: 0,
                credit: 0,
                weight: u64::from(b.weight),
                id: b.id,
            }
        })
        .collect();
    let mut fill = Fill {
        table: vec![u32::MAX; size as usize],
        taken: vec![0; (size as usize).div_ceil(64)],
        m,
        filled: 0,
        walk_until: m.saturating_sub(DIRECT_BELOW),
    };
    // A member claims a slot on each turn that brings its credit to the largest weight (every
    // turn when all weights are equal).
    'turns: loop {
        for w in &mut walkers {
            w.credit += w.weight;
            while w.credit >= max_weight {
                w.credit -= max_weight;
                if fill.filled < fill.walk_until {
                    fill.walk(w);
                } else {
                    fill.compute(w);
                }
                if fill.filled == m {
                    break 'turns;
                }
            }
        }
    }
    fill.table
}

/// Free slots below which [`build`] computes each member's next slot instead of walking to it.
const DIRECT_BELOW: u64 = 64;

/// One member's walk along its permutation.
struct Walker {
    /// The slot its permutation names next: `(offset + j × skip) mod M` for its next `j`.
    next: u64,
    skip: u64,
    /// `skip⁻¹ mod M`, once needed (0 until then).
    inverse: u64,
    credit: u64,
    weight: u64,
    id: u32,
}

/// The table being filled.
struct Fill {
    table: Vec<u32>,
    /// Bit `s` set when slot `s` is taken.
    taken: Vec<u64>,
    m: u64,
    filled: u64,
    /// Slots filled by walking; the rest are computed.
    walk_until: u64,
}

impl Fill {
    /// Gives `w` the first free slot its permutation names from where it stands, by walking.
    fn walk(&mut self, w: &mut Walker) {
        loop {
            let slot = w.next;
            w.next += w.skip;
            if w.next >= self.m {
                w.next -= self.m;
            }
            let (word, bit) = ((slot >> 6) as usize, 1u64 << (slot & 63));
            if self.taken[word] & bit == 0 {
                self.take(slot, bit, w.id);
                return;
            }
        }
    }

    /// The same as [`Fill::walk`], by computing: of the free slots, the one the fewest steps
    /// ahead (distinct per slot: a permutation names every slot once).
    fn compute(&mut self, w: &mut Walker) {
        if w.inverse == 0 {
            w.inverse = inverse_mod(w.skip, self.m);
        }
        let (m, reciprocal) = (self.m, 1.0 / self.m as f64);
        let mut best = (u64::MAX, 0);
        for (i, &word) in self.taken.iter().enumerate() {
            let mut open = !word;
            while open != 0 {
                let slot = i as u64 * 64 + u64::from(open.trailing_zeros());
                open &= open - 1;
                if slot >= m {
                    break;
                }
                let ahead = if slot >= w.next {
                    slot - w.next
                } else {
                    slot + m - w.next
                };
                let steps = mul_mod(ahead, w.inverse, m, reciprocal);
                if steps < best.0 {
                    best = (steps, slot);
                }
            }
        }
        let slot = best.1;
        w.next = slot + w.skip;
        if w.next >= m {
            w.next -= m;
        }
        self.take(slot, 1u64 << (slot & 63), w.id);
    }

    fn take(&mut self, slot: u64, bit: u64, id: u32) {
        self.taken[(slot >> 6) as usize] |= bit;
        self.table[slot as usize] = id;
        self.filled += 1;
    }
}

/// `a × b mod m` for `a, b < m`, without a 64-bit division when the product is exact in an
/// `f64` (below 2⁵²: M up to 2²⁶): the quotient from `reciprocal = 1 / m` is off by at most one.
fn mul_mod(a: u64, b: u64, m: u64, reciprocal: f64) -> u64 {
    let product = a * b;
    if product >= 1 << 52 {
        return product % m;
    }
    let q = (product as f64 * reciprocal) as u64;
    let r = product as i64 - (q * m) as i64;
    if r < 0 {
        (r + m as i64) as u64
    } else if r as u64 >= m {
        r as u64 - m
    } else {
        r as u64
    }
}

/// `a⁻¹ mod m` for `m` prime and `0 < a < m` (extended Euclid; 0 when `m` is 1).
fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut old_r, mut r) = (a as i64, m as i64);
    let (mut old_s, mut s) = (1i64, 0i64);
    while r != 0 {
        let q = old_r / r;
        (old_r, r) = (r, old_r - q * r);
        (old_s, s) = (s, old_s - q * s);
    }
    old_s.rem_euclid(m as i64) as u64
}

/// Whether `n` is prime (for validating table sizes).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::hash::DEFAULT_RING_SIZE;
    use std::collections::HashMap;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.1.{}.{}:8080", i / 250, i % 250 + 2))
            .collect()
    }

    fn members<'a>(keys: &'a [String], weights: &[u32]) -> Vec<Member<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, w))| Member {
                id: i as u32,
                key: k.as_bytes(),
                weight: *w,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut s = HashMap::new();
        for id in table {
            *s.entry(*id).or_default() += 1;
        }
        s
    }

    #[test]
    fn balance_within_one_percent_of_ideal() {
        for n in [3usize, 10, 100, 500] {
            let k = keys(n);
            let table = build(&members(&k, &vec![1; n]), DEFAULT_RING_SIZE, 7);
            let ideal = f64::from(DEFAULT_RING_SIZE) / n as f64;
            for (_, count) in shares(&table) {
                let dev = (count as f64 - ideal).abs() / ideal;
                assert!(
                    dev <= 0.01,
                    "n={n}: share {count} deviates {dev:.4} from ideal {ideal:.1}"
                );
            }
            assert_eq!(shares(&table).len(), n);
        }
    }

    #[test]
    fn removing_one_backend_moves_about_one_nth() {
        let n = 10;
        let k = keys(n);
        let all = members(&k, &vec![1; n]);
        let before = build(&all, DEFAULT_RING_SIZE, 1);
        let after = build(&all[1..], DEFAULT_RING_SIZE, 1);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let owned_by_removed = before.iter().filter(|b| **b == 0).count();
        let fraction = moved as f64 / f64::from(DEFAULT_RING_SIZE);
        // Every slot of the removed backend must move; Maglev moves a few more (paper: small).
        assert!(moved >= owned_by_removed);
        assert!(
            fraction < 1.0 / n as f64 * 1.5,
            "moved {fraction:.4} of slots, ideal {:.4}",
            1.0 / n as f64
        );
        // Clients measured directly: hash 100k client addresses through both tables.
        let mut moved_clients = 0;
        for ip in 0..100_000u32 {
            let slot = lb_common::hash::ring_slot(1, 0x0b00_0000 + ip, DEFAULT_RING_SIZE) as usize;
            if before[slot] != after[slot] {
                moved_clients += 1;
            }
        }
        let f = f64::from(moved_clients) / 100_000.0;
        assert!(
            f > 0.08 && f < 0.15,
            "moved {f:.4} of clients for 1 of {n} backends removed"
        );
    }

    #[test]
    fn weights_skew_shares() {
        let k = keys(3);
        let table = build(&members(&k, &[1, 2, 4]), DEFAULT_RING_SIZE, 3);
        let s = shares(&table);
        let total = f64::from(DEFAULT_RING_SIZE);
        for (id, w) in [(0u32, 1.0), (1, 2.0), (2, 4.0)] {
            let share = s[&id] as f64 / total;
            let want = w / 7.0;
            assert!(
                (share - want).abs() < 0.01,
                "backend {id}: share {share:.4}, want {want:.4}"
            );
        }
    }

    #[test]
    fn zero_weight_backends_get_no_slots() {
        let k = keys(3);
        let table = build(&members(&k, &[1, 0, 1]), 101, 3);
        assert!(!table.contains(&1));
        assert!(build(&members(&k, &[0, 0, 0]), 101, 3).is_empty());
    }

    #[test]
    fn same_seed_same_table_different_seed_different_table() {
        let k = keys(5);
        let a = build(&members(&k, &[1; 5]), DEFAULT_RING_SIZE, 99);
        let b = build(&members(&k, &[1; 5]), DEFAULT_RING_SIZE, 99);
        let c = build(&members(&k, &[1; 5]), DEFAULT_RING_SIZE, 100);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    /// The table straight from the paper's formula: member i's j-th choice is
    /// `(offset + j × skip) mod M`, one division per probe, members taking turns in key order.
    fn by_the_formula(members: &[Member<'_>], size: u32, seed: u32) -> Vec<u32> {
        let mut members = members.to_vec();
        members.sort_by(|a, b| a.key.cmp(b.key));
        let members = &members[..];
        let m = u64::from(size);
        let max_weight = u64::from(members.iter().map(|b| b.weight).max().unwrap());
        let mut walkers: Vec<(u64, u64, u64, u64)> = members
            .iter()
            .map(|b| {
                let h = bytes_hash(seed, b.key);
                ((h >> 32) % m, (h & 0xffff_ffff) % (m - 1) + 1, 0, 0)
            })
            .collect();
        let mut table = vec![u32::MAX; size as usize];
        let mut filled = 0;
        while filled < m {
            for (i, w) in walkers.iter_mut().enumerate() {
                w.3 += u64::from(members[i].weight);
                while w.3 >= max_weight && filled < m {
                    w.3 -= max_weight;
                    loop {
                        let slot = ((w.0 + w.2 * w.1) % m) as usize;
                        w.2 += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = members[i].id;
                            filled += 1;
                            break;
                        }
                    }
                }
                if filled == m {
                    break;
                }
            }
        }
        table
    }

    #[test]
    fn the_order_of_the_members_does_not_matter() {
        let k = keys(12);
        let weights: Vec<u32> = (0..12).map(|i| i % 4 + 1).collect();
        let m = members(&k, &weights);
        let table = build(&m, 1009, 7);
        // The same backends with the same ids, given in other orders.
        let mut reversed = m.clone();
        reversed.reverse();
        let mut rotated = m.clone();
        rotated.rotate_left(5);
        assert_eq!(build(&reversed, 1009, 7), table);
        assert_eq!(build(&rotated, 1009, 7), table);
    }

    #[test]
    fn the_table_is_the_formulas() {
        // Nodes running different lb versions must agree, so the walk must not change the table.
        for (n, size) in [
            (1usize, 1009u32),
            (7, 1009),
            (100, DEFAULT_RING_SIZE),
            (1000, 100_003),
        ] {
            let k = keys(n);
            let weights: Vec<u32> = (0..n as u32).map(|i| i % 3 + 1).collect();
            let m = members(&k, &weights);
            assert_eq!(
                build(&m, size, 42),
                by_the_formula(&m, size, 42),
                "{n} backends, M = {size}"
            );
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(48))]

        /// The walk with the bitmap and the computed tail gives the formula's table, whatever
        /// the members, weights, seed and size (sizes around the point where the tail starts
        /// being computed included).
        #[test]
        fn any_table_is_the_formulas(
            n in 1usize..60,
            weights in proptest::collection::vec(1u32..6, 60),
            zeros in proptest::collection::vec(proptest::bool::weighted(0.1), 60),
            size in proptest::sample::select(vec![2u32, 3, 5, 101, 251, 257, 263, 509, 1009, 4099, 65537]),
            seed in proptest::prelude::any::<u32>(),
        ) {
            let k = keys(n);
            let weights: Vec<u32> = (0..n).map(|i| if zeros[i] { 0 } else { weights[i] }).collect();
            let m = members(&k, &weights);
            let live: Vec<Member<'_>> = m.iter().filter(|b| b.weight > 0).cloned().collect();
            let want = if live.is_empty() { Vec::new() } else { by_the_formula(&live, size, seed) };
            proptest::prop_assert_eq!(build(&m, size, seed), want);
        }
    }

    #[test]
    fn products_mod_m() {
        for m in [
            2u64,
            101,
            100_003,
            u64::from(crate::config::MAX_RING_SIZE),
            4_294_967_291,
        ] {
            let reciprocal = 1.0 / m as f64;
            for (a, b) in [
                (0, 5 % m),
                (1, m - 1),
                (m - 1, m - 1),
                (m / 2, m / 3),
                (m / 7, m - 2),
            ] {
                let want = (u128::from(a) * u128::from(b) % u128::from(m)) as u64;
                assert_eq!(mul_mod(a, b, m, reciprocal), want, "{a} × {b} mod {m}");
            }
        }
    }

    #[test]
    fn inverses() {
        for m in [
            2u64,
            3,
            101,
            65537,
            100_003,
            u64::from(crate::config::MAX_RING_SIZE),
        ] {
            for a in [1, 2, m / 2, m - 1].into_iter().filter(|a| (1..m).contains(a)) {
                assert_eq!(a * inverse_mod(a, m) % m, 1, "{a} mod {m}");
            }
        }
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(101) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(100));
    }
}
