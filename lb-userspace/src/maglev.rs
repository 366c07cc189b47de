//! Maglev consistent-hash table builder (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016), with integer weights.
//!
//! The agent builds one table of `M` entries per vip; the datapath only indexes it with
//! `table[flow_slot_v4(..)]` (see `lb_common::hash`). [`build_table`] returns, for every entry, an index into the caller's
//! backend slice (or [`EMPTY`]).
//!
//! # Algorithm
//! Every backend with a non-zero weight walks its own permutation of the table: preference `j` is
//! `(offset + j * skip) % M` with `offset = h1(address) % M` and `skip = h2(address) % (M - 1) + 1`.
//! `M` is prime, so every `skip` is coprime to it and each permutation visits every slot. Backends
//! take turns; on its turn a backend claims its next preferred slot that is still free. The walk is
//! incremental (`pos += skip`, minus `M` on wrap), which equals the formula above without any
//! multiplication that could overflow; a test checks the two against each other.
//!
//! # Weighting scheme: exact quotas, paced turns
//! 1. **Quotas.** Each backend's number of entries is fixed up front by the largest-remainder
//!    (Hamilton) method: `floor(M * w_i / W)` each, then the entries left over go one each to the
//!    backends with the largest remainders, ties to the lower address. Counts are therefore exact
//!    (floor or ceiling of the fair share) whatever the weights, which the classic "claim while
//!    `claimed < pass * w / max_w`" scheme only approximates.
//! 2. **Pacing.** Turns are ordered by virtual time `claimed_i / w_i`, ties to the lower address
//!    (weighted fair queueing). A backend leaves the rotation once it reaches its quota; the table is
//!    full exactly when the last one does. A binary heap keyed on that time (compared by
//!    cross-multiplication, no floating point) picks the next turn in `O(log N)`, so the build costs
//!    `O(M log N)` turns no matter how skewed the weights are; there are no idle passes in which
//!    light backends wait for their next claim.
//!
//! Pacing by `claimed / w` rather than `pass * w / max_w` keeps the relative order of two
//! backends' turns independent of every other backend's weight, so changing one weight reshuffles
//! little besides that backend's own entries. With equal weights the time order is plain
//! round-robin by address and the quotas give the extra `M mod N` entries to the first backends in
//! that order, so the result is exactly classic Maglev (a test compares against a textbook
//! implementation). Only the ratios of the weights matter: scaling all weights by the same factor
//! yields the same table.
//!
//! # Contract
//! Guaranteed:
//! - **Determinism.** The table, read as addresses, depends only on `M` and the set of
//!   `(address, weight)` pairs with a non-zero weight: not on input order, process, platform or
//!   build. The turn order is the backends sorted by address (`IpAddr`'s `Ord`: every IPv4 address
//!   before every IPv6 one), which is what makes two nodes with the same config agree. The returned
//!   *indices* refer to the caller's slice, so two callers that list the same backends in different
//!   orders get different index vectors naming the same backends in every slot.
//! - **Balance.** A backend with weight `w` gets `floor(M * w / W)` or `ceil(M * w / W)` entries,
//!   `W` being the sum of all weights. A backend whose fair share is below one entry may get none.
//!   A backend with weight 0 gets none, and its presence changes nothing else (a drained backend
//!   and a removed one produce the same table).
//! - **Completeness.** If any weight is non-zero, no entry is [`EMPTY`]. If none is (or the slice
//!   is empty), every entry is [`EMPTY`]; that is not an error.
//! - **Cost.** `O(N log N + M log N)` plus the free-slot probing, `O(M log M)` expected; memory
//!   `O(M + N)`. About 60 ms for `N = 1000`, `M = 655373` in release mode
//!   (one AMD EPYC core), mostly cache misses while probing for free slots.
//!
//! Not guaranteed:
//! - **Minimal disruption is statistical, not exact.** Removing or adding a backend moves that
//!   backend's entries and, as a side effect of Maglev's fill order, a small number of others
//!   (the paper's trade-off of balance for disruption). The tests measure 0.2-0.6% of the table
//!   for `M >= 100 * N` and assert at most 1%; with fewer entries per backend it grows. Size the
//!   table at `M >= 100 * N`.
//! - Tables of different sizes are unrelated; changing `M` remaps nearly everything.
//! - Connection affinity across a change: entries that move take their flows with them. Keeping
//!   established connections on their old backend is the job of a connection table, not of this
//!   module.
//!
//! # Wire format
//! [`h1`]/[`h2`] (64-bit FNV-1a over an 8-byte seed and the address octets, then the murmur3
//! `fmix64` finaliser), the seeds, the sort order and the tie-breaks are a wire format: nodes
//! running different versions must build the same table for the same config. Changing any of them
//! remaps every deployed table on upgrade. The `golden_*` tests pin them; if they fail, the change
//! is a breaking one.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::net::IpAddr;

/// Marks a table entry that has no backend (all weights zero or no backends).
pub const EMPTY: u32 = u32::MAX;

/// Table size used unless the config asks for another; 65537 is prime and leaves over 100 entries
/// per backend up to 650 backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Largest accepted table size: the largest prime below 2^24. Keeps a whole table addressable in
/// the kernel's ring map and keeps every slot arithmetic in `u32`.
pub const MAX_TABLE_SIZE: u32 = 16_777_213;

/// One backend of a vip as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    pub address: IpAddr,
    /// Relative share of the table; 0 means no entries (drained).
    pub weight: u32,
}

/// Why a table could not be built. All of them are configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The permutation walk only covers every slot when the size is prime.
    #[error("Maglev table size {size} is not prime")]
    SizeNotPrime { size: u32 },
    /// Above [`MAX_TABLE_SIZE`].
    #[error("Maglev table size {size} is larger than the maximum {max}")]
    SizeTooLarge { size: u32, max: u32 },
    /// Fewer entries than backends with a non-zero weight.
    #[error(
        "Maglev table size {size} is smaller than the number of backends with a non-zero weight \
         ({backends})"
    )]
    SizeTooSmall { size: u32, backends: usize },
    /// The same address appears twice; entries are keyed by address, so it would be ambiguous.
    #[error("backend {address} is listed more than once")]
    DuplicateBackend { address: IpAddr },
    /// More backends than a `u32` index below [`EMPTY`] can name.
    #[error("{count} backends is more than a Maglev table can index")]
    TooManyBackends { count: usize },
}

/// Deterministic primality test by trial division over `6k ± 1`; at most ~22k divisions for any
/// `u32`, microseconds.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    let n = u64::from(n);
    let mut d: u64 = 5;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
// Part of the wire format (see the module docs).
const SEED_OFFSET: u64 = u64::from_le_bytes(*b"xdplb-h1");
const SEED_SKIP: u64 = u64::from_le_bytes(*b"xdplb-h2");

/// murmur3's 64-bit finaliser; FNV-1a alone mixes the last bytes poorly into the high bits, and
/// consecutive addresses differ only in their last byte.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// `fmix64(FNV-1a-64(seed as 8 little-endian bytes ++ key))`.
fn seeded_hash(seed: u64, key: &[u8]) -> u64 {
    let mut h = FNV_OFFSET_BASIS;
    for &byte in seed.to_le_bytes().iter().chain(key) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

fn address_hash(seed: u64, address: IpAddr) -> u64 {
    match address {
        IpAddr::V4(a) => seeded_hash(seed, &a.octets()),
        IpAddr::V6(a) => seeded_hash(seed, &a.octets()),
    }
}

/// Hash that picks a backend's first preferred slot (`offset = h1 % M`). Wire format.
pub fn h1(address: IpAddr) -> u64 {
    address_hash(SEED_OFFSET, address)
}

/// Hash that picks a backend's stride through the table (`skip = h2 % (M - 1) + 1`). Wire format.
pub fn h2(address: IpAddr) -> u64 {
    address_hash(SEED_SKIP, address)
}

/// Builds the table: `size` entries, each an index into `backends` (the caller's slice and order)
/// or [`EMPTY`]. See the module docs for the contract.
pub fn build_table(backends: &[MaglevBackend], size: u32) -> Result<Vec<u32>, MaglevError> {
    if size > MAX_TABLE_SIZE {
        return Err(MaglevError::SizeTooLarge {
            size,
            max: MAX_TABLE_SIZE,
        });
    }
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    // Indices must stay below EMPTY.
    let count = u32::try_from(backends.len()).map_err(|_| MaglevError::TooManyBackends {
        count: backends.len(),
    })?;

    // The turn order: sorted by address, never by input position.
    let mut order: Vec<u32> = (0..count).collect();
    order.sort_unstable_by_key(|&i| backends[i as usize].address);
    if let Some(pair) = order
        .windows(2)
        .find(|pair| backends[pair[0] as usize].address == backends[pair[1] as usize].address)
    {
        return Err(MaglevError::DuplicateBackend {
            address: backends[pair[0] as usize].address,
        });
    }
    order.retain(|&i| backends[i as usize].weight > 0);
    if order.len() > size as usize {
        return Err(MaglevError::SizeTooSmall {
            size,
            backends: order.len(),
        });
    }

    let mut table = vec![EMPTY; size as usize];
    if order.is_empty() {
        return Ok(table);
    }
    let weights: Vec<u32> = order.iter().map(|&i| backends[i as usize].weight).collect();
    let quotas = quotas(&weights, size);
    let mut cursors: Vec<Cursor> = order
        .iter()
        .zip(&quotas)
        .map(|(&index, &quota)| {
            let backend = &backends[index as usize];
            let (offset, skip) = offset_and_skip(backend.address, size);
            Cursor {
                next: offset,
                skip,
                claimed: 0,
                quota,
                weight: backend.weight,
                index,
            }
        })
        .collect();

    let mut turns: BinaryHeap<Turn> = cursors
        .iter()
        .enumerate()
        .filter(|(_, c)| c.quota > 0)
        .map(|(rank, c)| Turn {
            claimed: 0,
            weight: c.weight,
            rank: rank as u32,
        })
        .collect();
    // Quotas sum to `size`, so while anyone still has quota left a slot is free, and every walk
    // visits every slot: the probe loop below always ends.
    while let Some(turn) = turns.pop() {
        let cursor = &mut cursors[turn.rank as usize];
        let mut slot = cursor.next;
        while table[slot as usize] != EMPTY {
            slot = step(slot, cursor.skip, size);
        }
        table[slot as usize] = cursor.index;
        cursor.next = step(slot, cursor.skip, size);
        cursor.claimed += 1;
        if cursor.claimed < cursor.quota {
            turns.push(Turn {
                claimed: cursor.claimed,
                weight: cursor.weight,
                rank: turn.rank,
            });
        }
    }
    debug_assert!(table.iter().all(|&e| e != EMPTY));
    Ok(table)
}

/// First preferred slot and stride of a backend's permutation of a table of `size` (prime) slots.
fn offset_and_skip(address: IpAddr, size: u32) -> (u32, u32) {
    let m = u64::from(size);
    // `size` is prime, so at least 2 and `m - 1` is never 0. Both results are below `size`.
    let offset = (h1(address) % m) as u32;
    let skip = (h2(address) % (m - 1) + 1) as u32;
    (offset, skip)
}

/// Next preference of a walk. `slot, skip < size <= 2^24`, so the sum cannot overflow.
fn step(slot: u32, skip: u32, size: u32) -> u32 {
    let next = slot + skip;
    if next >= size { next - size } else { next }
}

/// Largest-remainder apportionment of `size` entries in proportion to `weights` (all non-zero,
/// in turn order). Ties in the remainder go to the earlier backend in turn order, which for equal
/// weights reproduces classic Maglev's partial last round.
fn quotas(weights: &[u32], size: u32) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let m = u64::from(size);
    // m * w < 2^24 * 2^32: no overflow.
    let mut quotas: Vec<u32> = weights
        .iter()
        .map(|&w| (m * u64::from(w) / total) as u32)
        .collect();
    let assigned: u64 = quotas.iter().map(|&q| u64::from(q)).sum();
    // The remainders' fractions sum to an integer below `weights.len()`.
    let leftover = (m - assigned) as usize;
    if leftover > 0 {
        let remainder = |i: usize| m * u64::from(weights[i]) % total;
        let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
        by_remainder.sort_unstable_by(|&a, &b| remainder(b).cmp(&remainder(a)).then(a.cmp(&b)));
        for &i in &by_remainder[..leftover] {
            quotas[i] += 1;
        }
    }
    quotas
}

/// A backend's walk state during a build.
struct Cursor {
    next: u32,
    skip: u32,
    claimed: u32,
    quota: u32,
    weight: u32,
    /// Index into the caller's slice, written into the table.
    index: u32,
}

/// A pending turn: due at virtual time `claimed / weight`; `rank` is the position in address order.
struct Turn {
    claimed: u32,
    weight: u32,
    rank: u32,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/b < c/d  <=>  a*d < c*b for positive b, d; claimed < 2^24 and weight < 2^32, so the
        // products fit in u64. Reversed because BinaryHeap pops the greatest and the earliest
        // turn (then the lowest rank) must go first.
        let this = u64::from(self.claimed) * u64::from(other.weight);
        let that = u64::from(other.claimed) * u64::from(self.weight);
        that.cmp(&this).then_with(|| other.rank.cmp(&self.rank))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Turn {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn v6(i: u32) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
            (i >> 16) as u16,
            i as u16,
        ))
    }

    fn equal(n: u32, weight: u32) -> Vec<MaglevBackend> {
        (1..=n)
            .map(|i| MaglevBackend {
                address: v4(i),
                weight,
            })
            .collect()
    }

    fn weighted(weights: &[u32]) -> Vec<MaglevBackend> {
        weights
            .iter()
            .zip(1..)
            .map(|(&weight, i)| MaglevBackend {
                address: v4(i),
                weight,
            })
            .collect()
    }

    /// The table read as addresses, which is what must agree between nodes.
    fn owners(backends: &[MaglevBackend], size: u32) -> Vec<Option<IpAddr>> {
        build_table(backends, size)
            .unwrap()
            .into_iter()
            .map(|e| (e != EMPTY).then(|| backends[e as usize].address))
            .collect()
    }

    fn counts(backends: &[MaglevBackend], table: &[u32]) -> Vec<usize> {
        let mut counts = vec![0; backends.len()];
        for &e in table {
            counts[e as usize] += 1;
        }
        counts
    }

    /// Largest `|share_i - fair_i| / fair_i` over backends with a non-zero weight.
    fn max_relative_deviation(backends: &[MaglevBackend], size: u32) -> f64 {
        let table = build_table(backends, size).unwrap();
        let total: f64 = backends.iter().map(|b| f64::from(b.weight)).sum();
        counts(backends, &table)
            .iter()
            .zip(backends)
            .filter(|(_, b)| b.weight > 0)
            .map(|(&c, b)| {
                let fair = f64::from(b.weight) / total;
                (c as f64 / f64::from(size) - fair).abs() / fair
            })
            .fold(0.0, f64::max)
    }

    /// Slots whose owner changed, not counting those that belonged to (or went to) `except`.
    fn collateral(
        before: &[Option<IpAddr>],
        after: &[Option<IpAddr>],
        except: Option<IpAddr>,
    ) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a && **b != except && **a != except)
            .count()
    }

    /// splitmix64, for reproducible pseudo-random test inputs.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            fmix64(self.0)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    /// Classic Maglev straight from the paper (permutation by formula, strict round-robin), for
    /// comparison with the weighted builder at equal weights.
    fn textbook(addresses: &[IpAddr], size: u32) -> Vec<u32> {
        let m = u64::from(size);
        let mut sorted: Vec<usize> = (0..addresses.len()).collect();
        sorted.sort_by_key(|&i| addresses[i]);
        let perms: Vec<(u64, u64)> = sorted
            .iter()
            .map(|&i| (h1(addresses[i]) % m, h2(addresses[i]) % (m - 1) + 1))
            .collect();
        let mut next = vec![0u64; sorted.len()];
        let mut table = vec![EMPTY; size as usize];
        let mut filled = 0;
        loop {
            for (rank, &(offset, skip)) in perms.iter().enumerate() {
                let mut c = (offset + next[rank] * skip) % m;
                while table[c as usize] != EMPTY {
                    next[rank] += 1;
                    c = (offset + next[rank] * skip) % m;
                }
                table[c as usize] = sorted[rank] as u32;
                next[rank] += 1;
                filled += 1;
                if filled == size {
                    return table;
                }
            }
        }
    }

    #[test]
    fn primes() {
        let small: Vec<u32> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            small,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59
            ]
        );
        // Against a sieve.
        let limit = 20_000usize;
        let mut composite = vec![false; limit];
        for i in 2..limit {
            if !composite[i] {
                for j in (i * i..limit).step_by(i) {
                    composite[j] = true;
                }
            }
            assert_eq!(is_prime(i as u32), !composite[i], "{i}");
        }
        for p in [DEFAULT_TABLE_SIZE, 655_373, MAX_TABLE_SIZE, 4_294_967_291] {
            assert!(is_prime(p), "{p}");
        }
        // 65521^2 (largest prime square in u32) and a product of two large primes.
        for c in [4_293_001_441, 65_537 * 65_521, u32::MAX, 16_777_215] {
            assert!(!is_prime(c), "{c}");
        }
        assert!(((MAX_TABLE_SIZE + 1)..(1 << 24)).all(|n| !is_prime(n)));
    }

    #[test]
    fn balance_equal_weights() {
        for (n, size) in [(10, 1009), (100, DEFAULT_TABLE_SIZE), (1000, 655_373)] {
            let backends = equal(n, 1);
            let dev = max_relative_deviation(&backends, size);
            eprintln!("balance: N={n} M={size} equal weights: max relative deviation {dev:.5}");
            assert!(dev <= 0.01, "N={n} M={size}: {dev}");
            // Classic Maglev: counts differ by at most one.
            let c = counts(&backends, &build_table(&backends, size).unwrap());
            assert!(c.iter().max().unwrap() - c.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn balance_weighted() {
        for weights in [&[1, 2, 3, 4][..], &[1, 1, 1, 100], &[7, 500, 3, 3, 50, 2]] {
            let backends = weighted(weights);
            let dev = max_relative_deviation(&backends, DEFAULT_TABLE_SIZE);
            eprintln!("balance: weights {weights:?} M=65537: max relative deviation {dev:.6}");
            assert!(dev <= 0.01, "{weights:?}: {dev}");
        }
    }

    /// Every count is the floor or the ceiling of the exact share, whatever the weights.
    #[test]
    fn counts_are_exact_apportionment() {
        let mut rng = Rng(1);
        for round in 0..200 {
            let n = 1 + rng.below(40) as u32;
            let size = [7, 61, 1009, 4099][round % 4].max(n);
            let size = (size..).find(|&s| is_prime(s)).unwrap();
            let backends: Vec<MaglevBackend> = (0..n)
                .map(|i| MaglevBackend {
                    address: if i % 3 == 0 { v6(i) } else { v4(i) },
                    weight: match rng.below(4) {
                        0 => 0,
                        1 => rng.below(5) as u32,
                        2 => rng.below(1000) as u32,
                        _ => rng.next() as u32,
                    },
                })
                .collect();
            let table = build_table(&backends, size).unwrap();
            let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
            if total == 0 {
                assert!(table.iter().all(|&e| e == EMPTY));
                continue;
            }
            assert!(table.iter().all(|&e| e != EMPTY));
            for (c, b) in counts(&backends, &table).iter().zip(&backends) {
                let exact = u64::from(size) * u64::from(b.weight);
                let floor = exact / total;
                let ceil = floor + u64::from(exact % total != 0);
                assert!(
                    (floor..=ceil).contains(&(*c as u64)),
                    "{b:?}: {c} not in [{floor}, {ceil}] (M={size}, W={total})"
                );
            }
        }
    }

    #[test]
    fn equal_weights_are_classic_maglev() {
        let mut rng = Rng(2);
        for (n, size) in [(1, 7), (3, 7), (7, 7), (10, 1009), (37, 4099), (100, 65537)] {
            let mut backends = equal(n, 5);
            for (i, b) in backends.iter_mut().enumerate() {
                if i % 2 == 0 {
                    b.address = v6(i as u32);
                }
            }
            rng.shuffle(&mut backends);
            let addresses: Vec<IpAddr> = backends.iter().map(|b| b.address).collect();
            assert_eq!(
                build_table(&backends, size).unwrap(),
                textbook(&addresses, size),
                "N={n} M={size}"
            );
        }
    }

    #[test]
    fn incremental_walk_matches_formula() {
        for size in [2, 3, 1009, MAX_TABLE_SIZE] {
            for i in 0..20 {
                let (offset, skip) = offset_and_skip(v4(i), size);
                assert!(offset < size && (1..size.max(2)).contains(&skip));
                let mut slot = offset;
                for j in 0..50u64 {
                    let expected = (u64::from(offset) + j * u64::from(skip)) % u64::from(size);
                    assert_eq!(u64::from(slot), expected);
                    slot = step(slot, skip, size);
                }
            }
        }
    }

    fn check_removal_and_addition(backends: &[MaglevBackend], size: u32, label: &str) {
        let n = backends.len();
        let full = owners(backends, size);
        let mut worst_remove = 0;
        let mut worst_add = 0;
        // A sample of positions keeps the debug-mode run fast.
        for r in (0..n).step_by((n / 10).max(1)) {
            let mut fewer = backends.to_vec();
            let removed = fewer.remove(r).address;
            let without = owners(&fewer, size);
            let moved = collateral(&full, &without, Some(removed));
            worst_remove = worst_remove.max(moved);
            assert!(
                moved as f64 <= 0.01 * f64::from(size),
                "{label}: removing {removed} moved {moved} other slots"
            );
            // Adding it back is the reverse comparison.
            let added_back = collateral(&without, &full, Some(removed));
            assert_eq!(added_back, moved);
        }
        for k in 0..5 {
            let mut more = backends.to_vec();
            let added = v6(1_000_000 + k);
            more.push(MaglevBackend {
                address: added,
                weight: backends[0].weight.max(1),
            });
            let with = owners(&more, size);
            let moved = collateral(&full, &with, Some(added));
            worst_add = worst_add.max(moved);
            assert!(
                moved as f64 <= 0.01 * f64::from(size),
                "{label}: adding {added} moved {moved} other slots"
            );
        }
        eprintln!(
            "disruption: {label} M={size}: worst collateral moves: remove one {worst_remove} \
             ({:.3}%), add one {worst_add} ({:.3}%)",
            100.0 * worst_remove as f64 / f64::from(size),
            100.0 * worst_add as f64 / f64::from(size),
        );
    }

    #[test]
    fn disruption() {
        check_removal_and_addition(&equal(10, 1), DEFAULT_TABLE_SIZE, "N=10 equal");
        check_removal_and_addition(&equal(100, 1), DEFAULT_TABLE_SIZE, "N=100 equal");
        check_removal_and_addition(
            &weighted(&[1, 2, 3, 4, 1, 2, 3, 4, 10, 5]),
            DEFAULT_TABLE_SIZE,
            "N=10 weighted",
        );
    }

    #[test]
    fn zero_weight_is_the_same_as_absent() {
        let mut backends = weighted(&[3, 1, 4, 1, 5, 9, 2, 6]);
        let without = owners(&backends, 1009);
        backends.insert(
            3,
            MaglevBackend {
                address: v4(500),
                weight: 0,
            },
        );
        let table = build_table(&backends, 1009).unwrap();
        assert!(!table.contains(&3));
        assert_eq!(owners(&backends, 1009), without);
        // Draining one that was present equals removing it.
        backends[0].weight = 0;
        let drained = owners(&backends, 1009);
        backends.remove(0);
        assert_eq!(drained, owners(&backends, 1009));
    }

    #[test]
    fn changing_one_weight_mostly_moves_that_backend() {
        let size = DEFAULT_TABLE_SIZE;
        for (base, changed, to) in [
            (equal(10, 1), 4, 2),
            (equal(10, 2), 4, 1),
            (weighted(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]), 9, 20),
            (equal(100, 10), 50, 13),
        ] {
            let before = owners(&base, size);
            let mut modified = base.clone();
            modified[changed].weight = to;
            let after = owners(&modified, size);
            let moved = collateral(&before, &after, Some(base[changed].address));
            let own: usize = before.iter().zip(&after).filter(|(b, a)| b != a).count() - moved;
            eprintln!(
                "weight change: N={} backend {changed} {} -> {to}: {own} slots to/from it, \
                 {moved} ({:.3}%) between others",
                base.len(),
                base[changed].weight,
                100.0 * moved as f64 / f64::from(size)
            );
            assert!(moved as f64 <= 0.01 * f64::from(size), "{moved}");
            assert!(own > 0);
        }
    }

    #[test]
    fn only_weight_ratios_matter() {
        let a = weighted(&[1, 2, 3, 4]);
        let b = weighted(&[1000, 2000, 3000, 4000]);
        assert_eq!(owners(&a, 1009), owners(&b, 1009));
    }

    #[test]
    fn input_order_does_not_matter() {
        let mut rng = Rng(3);
        let mut backends: Vec<MaglevBackend> = (0..50)
            .map(|i| MaglevBackend {
                address: if i % 2 == 0 { v4(i) } else { v6(i) },
                weight: 1 + rng.below(10) as u32,
            })
            .collect();
        let reference = owners(&backends, 4099);
        for _ in 0..10 {
            rng.shuffle(&mut backends);
            assert_eq!(owners(&backends, 4099), reference);
        }
        // Indices follow the caller's order.
        let table = build_table(&backends, 4099).unwrap();
        let as_addresses: Vec<Option<IpAddr>> = table
            .iter()
            .map(|&e| Some(backends[e as usize].address))
            .collect();
        assert_eq!(as_addresses, reference);
    }

    #[test]
    fn ipv4_and_ipv6_alone() {
        for backends in [
            (0..20).map(v6).collect::<Vec<_>>(),
            (0..20).map(v4).collect::<Vec<_>>(),
        ] {
            let backends: Vec<MaglevBackend> = backends
                .into_iter()
                .map(|address| MaglevBackend { address, weight: 1 })
                .collect();
            assert!(max_relative_deviation(&backends, 4099) <= 0.01);
        }
    }

    #[test]
    fn empty_and_all_zero() {
        assert_eq!(build_table(&[], 7).unwrap(), vec![EMPTY; 7]);
        assert_eq!(build_table(&equal(10, 0), 7).unwrap(), vec![EMPTY; 7]);
    }

    #[test]
    fn errors() {
        assert_eq!(
            build_table(&equal(2, 1), 65536),
            Err(MaglevError::SizeNotPrime { size: 65536 })
        );
        for size in [0, 1] {
            assert_eq!(
                build_table(&[], size),
                Err(MaglevError::SizeNotPrime { size })
            );
        }
        assert_eq!(
            build_table(&equal(8, 1), 7),
            Err(MaglevError::SizeTooSmall {
                size: 7,
                backends: 8
            })
        );
        // Zero-weight backends do not count towards the minimum size.
        let mut some_drained = equal(8, 1);
        some_drained[5].weight = 0;
        assert!(build_table(&some_drained, 7).is_ok());
        assert_eq!(
            build_table(&[], MAX_TABLE_SIZE + 4),
            Err(MaglevError::SizeTooLarge {
                size: MAX_TABLE_SIZE + 4,
                max: MAX_TABLE_SIZE
            })
        );
        let mut duplicated = equal(5, 1);
        duplicated[4].address = duplicated[1].address;
        duplicated[4].weight = 0;
        assert_eq!(
            build_table(&duplicated, 7),
            Err(MaglevError::DuplicateBackend {
                address: duplicated[1].address
            })
        );
        let message = MaglevError::SizeTooSmall {
            size: 7,
            backends: 8,
        }
        .to_string();
        assert!(message.contains('7') && message.contains('8'), "{message}");
    }

    /// Pins the hash functions: a failure here means every deployed table would change.
    #[test]
    fn golden_hashes() {
        let cases: [(IpAddr, u64, u64); 3] = [
            (
                "10.0.0.1".parse().unwrap(),
                0x16b3_9e89_d32d_d2b1,
                0x2366_51d7_d48e_6c85,
            ),
            (
                "192.168.1.20".parse().unwrap(),
                0x9488_84fe_b417_a9c5,
                0xb352_c13a_bf8d_7919,
            ),
            (
                "2001:db8::1".parse().unwrap(),
                0x351f_6b7d_57fd_3393,
                0x5e7a_e713_cee4_35d4,
            ),
        ];
        for (address, one, two) in cases {
            assert_eq!((h1(address), h2(address)), (one, two), "{address}");
        }
    }

    /// Pins the whole builder (hashes, sort order, quotas, pacing). The values were cross-checked
    /// against an independent Python implementation of the module docs.
    #[test]
    fn golden_table() {
        let backends = [
            MaglevBackend {
                address: "10.0.0.3".parse().unwrap(),
                weight: 1,
            },
            MaglevBackend {
                address: "2001:db8::1".parse().unwrap(),
                weight: 2,
            },
            MaglevBackend {
                address: "10.0.0.1".parse().unwrap(),
                weight: 1,
            },
            MaglevBackend {
                address: "10.0.0.2".parse().unwrap(),
                weight: 3,
            },
        ];
        let table = build_table(&backends, 31).unwrap();
        assert_eq!(
            table,
            [
                1, 0, 2, 2, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3, 1, 3, 1, 3, 1, 2, 0, 0, 3, 3, 0, 1, 2,
                1, 3, 2
            ]
        );

        // A realistic size: the first and last entries.
        let table = build_table(&equal(10, 1), DEFAULT_TABLE_SIZE).unwrap();
        assert_eq!(
            table[..16],
            [0, 9, 4, 2, 2, 9, 6, 6, 3, 4, 4, 1, 6, 3, 9, 2]
        );
        assert_eq!(table[table.len() - 4..], [4, 6, 3, 1]);
        let table = build_table(&weighted(&[1, 2, 3, 4]), 1009).unwrap();
        assert_eq!(
            table[..16],
            [3, 1, 3, 1, 3, 1, 3, 2, 3, 0, 3, 3, 3, 3, 3, 0]
        );
    }

    /// Not a benchmark: prints one measurement for the record, asserts nothing about time.
    #[test]
    fn build_time_large() {
        let size = 655_373;
        let backends = equal(1000, 1);
        let start = Instant::now();
        let table = build_table(&backends, size).unwrap();
        let elapsed = start.elapsed();
        eprintln!("timing: N=1000 M={size} equal weights: {elapsed:?}");
        assert!(table.iter().all(|&e| e != EMPTY));

        // Skewed weights: one heavy backend, the rest at the minimum.
        let mut skewed = equal(1000, 1);
        skewed[0].weight = u32::MAX;
        skewed[1].weight = 1_000_000;
        let start = Instant::now();
        let table = build_table(&skewed, size).unwrap();
        let elapsed = start.elapsed();
        let c = counts(&skewed, &table);
        eprintln!(
            "timing: N=1000 M={size} skewed weights: {elapsed:?} (heavy backend {} entries)",
            c[0]
        );
        assert_eq!(c.iter().sum::<usize>(), size as usize);
        assert!(table.iter().all(|&e| e != EMPTY));
    }
}
