//! The flow hash: which Maglev slot a flow lands in.
//!
//! Contract: a pure function of the 5-tuple, identical in the kernel, the agent
//! (`xdplb which-backend`) and the tests, and identical across nodes and versions. Changing it
//! moves every flow, so treat it like a wire format.
//!
//! It is the final mix of Bob Jenkins' lookup3 (`jhash_3words` in the kernel): adds, xors and
//! rotates only, cheap in BPF, and mixes well enough that the slot spreads flows evenly over a
//! prime-sized table (checked by `flows_spread_evenly` below). The slot is `hash * M / 2^32`
//! (Lemire's multiply-shift reduction) rather than `hash % M`: as uniform for a well-mixed hash,
//! and a multiplication instead of a division on the per-packet path.

/// Seed of the flow hash. Part of the hash's definition (see the module docs).
pub const FLOW_HASH_SEED: u32 = 0x5844_504c; // "XDPL"

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline(always)]
fn jhash_final(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    c
}

/// `jhash_3words(a, b, c, initval)` as in `include/linux/jhash.h`.
#[inline(always)]
pub fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    jhash_final(
        a.wrapping_add(init),
        b.wrapping_add(init),
        c.wrapping_add(init),
    )
}

/// Hash of an IPv4 5-tuple. Addresses and ports are in network byte order, as in the packet.
///
/// The bytes are read little-endian, which is the native order of both the host and `bpfel`, so
/// no byte swapping happens on either side; the definition does not depend on the host.
#[inline(always)]
pub fn flow_hash_v4(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8) -> u32 {
    let ports = u32::from_le_bytes([sport[0], sport[1], dport[0], dport[1]]);
    jhash_3words(
        u32::from_le_bytes(src),
        u32::from_le_bytes(dst),
        ports,
        FLOW_HASH_SEED ^ proto as u32,
    )
}

/// The slot of a VIP's table (of `ring_size` entries, non-zero) an IPv4 flow uses. The one
/// definition of "which slot" for the data path, the agent's `which-backend` and the tests.
#[inline(always)]
pub fn flow_slot_v4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    ring_size: u32,
) -> u32 {
    reduce(flow_hash_v4(src, dst, sport, dport, proto), ring_size)
}

/// An IPv6 address as one 32-bit word for the flow hash: `jhash_3words` over its first three
/// words with the fourth as the initial value, so all 128 bits move the result.
#[inline(always)]
fn addr6_word(a: &[u8; 16]) -> u32 {
    jhash_3words(
        u32::from_le_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_le_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_le_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_le_bytes([a[12], a[13], a[14], a[15]]),
    )
}

/// Hash of an IPv6 5-tuple: each address reduced to a word by [`addr6_word`], then the same
/// final step as [`flow_hash_v4`]. Part of the same wire-format contract.
#[inline(always)]
pub fn flow_hash_v6(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
) -> u32 {
    let ports = u32::from_le_bytes([sport[0], sport[1], dport[0], dport[1]]);
    jhash_3words(
        addr6_word(src),
        addr6_word(dst),
        ports,
        FLOW_HASH_SEED ^ proto as u32,
    )
}

/// The slot of a VIP's table an IPv6 flow uses (see [`flow_slot_v4`]).
#[inline(always)]
pub fn flow_slot_v6(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    ring_size: u32,
) -> u32 {
    reduce(flow_hash_v6(src, dst, sport, dport, proto), ring_size)
}

/// The flow hash of a flow from `src` to `dst` of either family; `None` when the families
/// differ (no such flow reaches a VIP: IPv4 VIPs have IPv4 clients).
pub fn flow_hash_of(
    src: core::net::SocketAddr,
    dst: core::net::SocketAddr,
    proto: u8,
) -> Option<u32> {
    use core::net::SocketAddr::{V4, V6};
    match (src, dst) {
        (V4(s), V4(d)) => Some(flow_hash_between(s, d, proto)),
        (V6(s), V6(d)) => Some(flow_hash_v6(
            &s.ip().octets(),
            &d.ip().octets(),
            s.port().to_be_bytes(),
            d.port().to_be_bytes(),
            proto,
        )),
        _ => None,
    }
}

/// The slot of a flow of either family ([`flow_hash_of`]).
pub fn flow_slot_of(
    src: core::net::SocketAddr,
    dst: core::net::SocketAddr,
    proto: u8,
    ring_size: u32,
) -> Option<u32> {
    flow_hash_of(src, dst, proto).map(|h| reduce(h, ring_size))
}

/// [`flow_hash_v4`] of a flow from `src` to `dst`, for callers that hold socket addresses (the
/// agent's `which-backend`, the tests).
pub fn flow_hash_between(
    src: core::net::SocketAddrV4,
    dst: core::net::SocketAddrV4,
    proto: u8,
) -> u32 {
    flow_hash_v4(
        src.ip().octets(),
        dst.ip().octets(),
        src.port().to_be_bytes(),
        dst.port().to_be_bytes(),
        proto,
    )
}

/// [`flow_slot_v4`] of a flow from `src` to `dst`.
pub fn flow_slot_between(
    src: core::net::SocketAddrV4,
    dst: core::net::SocketAddrV4,
    proto: u8,
    ring_size: u32,
) -> u32 {
    reduce(flow_hash_between(src, dst, proto), ring_size)
}

/// Maps a uniformly distributed `hash` onto `0..n` without a division.
#[inline(always)]
pub fn reduce(hash: u32, n: u32) -> u32 {
    ((hash as u64 * n as u64) >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the definition: if this changes, every deployed flow would move. The expected values
    /// come from a C transcription of `include/linux/jhash.h` compiled with gcc.
    #[test]
    fn known_values() {
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        let h = flow_hash_v4(
            [10, 0, 0, 1],
            [10, 0, 0, 100],
            40000u16.to_be_bytes(),
            80u16.to_be_bytes(),
            6,
        );
        assert_eq!(h, 0xb819_fe92);
        let udp = flow_hash_v4(
            [10, 0, 0, 1],
            [10, 0, 0, 100],
            40000u16.to_be_bytes(),
            80u16.to_be_bytes(),
            17,
        );
        assert_ne!(h, udp, "the protocol is part of the flow");
        // (0xb819_fe92 * 65537) >> 32 = 47130.
        assert_eq!(
            flow_slot_v4(
                [10, 0, 0, 1],
                [10, 0, 0, 100],
                40000u16.to_be_bytes(),
                80u16.to_be_bytes(),
                6,
                65537
            ),
            47130
        );
    }

    #[test]
    fn socket_address_forms_agree_with_the_tuple_forms() {
        let src = core::net::SocketAddrV4::new(core::net::Ipv4Addr::new(10, 0, 0, 1), 40000);
        let dst = core::net::SocketAddrV4::new(core::net::Ipv4Addr::new(10, 0, 0, 100), 80);
        assert_eq!(flow_hash_between(src, dst, 6), 0xb819_fe92);
        assert_eq!(flow_slot_between(src, dst, 6, 65537), 47130);
    }

    /// Pins the IPv6 definition, as `known_values` pins the IPv4 one (value computed by this
    /// code when it was defined; it must never change).
    #[test]
    fn known_values_v6() {
        let src: core::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: core::net::Ipv6Addr = "2001:db8::100".parse().unwrap();
        let h = flow_hash_v6(
            &src.octets(),
            &dst.octets(),
            40000u16.to_be_bytes(),
            80u16.to_be_bytes(),
            6,
        );
        assert_eq!(h, PINNED_V6, "{h:#x}");
        let s = core::net::SocketAddr::new(src.into(), 40000);
        let d = core::net::SocketAddr::new(dst.into(), 80);
        assert_eq!(flow_hash_of(s, d, 6), Some(h));
        assert_ne!(flow_hash_of(s, d, 17), Some(h));
        let v4 = core::net::SocketAddr::from(([10, 0, 0, 1], 40000));
        assert_eq!(flow_hash_of(v4, d, 6), None);
        assert_eq!(
            flow_slot_v6(
                &src.octets(),
                &dst.octets(),
                40000u16.to_be_bytes(),
                80u16.to_be_bytes(),
                6,
                65537
            ),
            reduce(h, 65537)
        );
        // Every byte of either address moves the hash.
        for i in 0..16 {
            let mut a = src.octets();
            a[i] ^= 1;
            assert_ne!(
                flow_hash_v6(&a, &dst.octets(), [0x9c, 0x40], [0, 80], 6),
                h,
                "src {i}"
            );
            let mut b = dst.octets();
            b[i] ^= 1;
            assert_ne!(
                flow_hash_v6(&src.octets(), &b, [0x9c, 0x40], [0, 80], 6),
                h,
                "dst {i}"
            );
        }
    }
    const PINNED_V6: u32 = 0x4442_9d14;

    #[test]
    fn reduce_covers_the_range() {
        assert_eq!(reduce(0, 7), 0);
        assert_eq!(reduce(u32::MAX, 7), 6);
        assert_eq!(reduce(u32::MAX, 1), 0);
        assert_eq!(reduce(1 << 31, 65537), 32768);
    }

    #[test]
    fn flows_spread_evenly() {
        // 100k flows from 1000 clients x 100 ports over a 4099-slot table: every slot's load stays
        // close to the mean (about 24.4), as it would for a uniform hash.
        const M: u32 = 4099;
        let mut buckets = [0u32; M as usize];
        let mut n = 0u32;
        for client in 0..1000u32 {
            let src = (0x0a00_0000u32 + client).to_be_bytes();
            for port in 0..100u16 {
                let h = flow_hash_v4(
                    src,
                    [10, 0, 0, 100],
                    (32768 + port).to_be_bytes(),
                    80u16.to_be_bytes(),
                    6,
                );
                buckets[reduce(h, M) as usize] += 1;
                n += 1;
            }
        }
        let mean = n as f64 / M as f64;
        let var = buckets
            .iter()
            .map(|&b| (b as f64 - mean).powi(2))
            .sum::<f64>()
            / M as f64;
        // Poisson: variance ~ mean. Allow 25% excess.
        assert!(var < mean * 1.25, "variance {var} vs mean {mean}");
        assert!(buckets.iter().all(|&b| b > 0));
    }
}
