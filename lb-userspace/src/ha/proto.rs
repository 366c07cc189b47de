//! VRRPv3 advertisements for IPv4 (RFC 5798 section 5, as updated by RFC 9568): building them and
//! checking received ones in the order RFC 5798 section 7.1 gives, so that every discarded packet
//! is counted under the first rule it breaks.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! |(rsvd) |     Max Adver Int     |          Checksum             |
//! |                       IPvX Address(es)                        |
//! ```
//!
//! The checksum covers an IPv4 pseudo-header (source, destination, zero, protocol 112, VRRP
//! length) and the VRRP message (RFC 5798 5.2.8); keepalived and routers compute it that way, and
//! the interop fixture in the tests was captured from keepalived.

use std::net::Ipv4Addr;

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// The IPv4 multicast group adverts go to (RFC 5798 5.1.1.2).
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// Adverts are sent with this TTL and any other is discarded, so only on-link nodes take part.
pub const TTL: u8 = 255;
const VERSION: u8 = 3;
const TYPE_ADVERTISEMENT: u8 = 1;
const HEADER_LEN: usize = 8;
/// Largest advert interval the 12-bit field holds, in centiseconds (40.95 s).
pub const MAX_INTERVAL_CS: u16 = 0x0fff;

/// One advertisement's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    /// 0: the master is giving up; 255: the owner of the addresses.
    pub priority: u8,
    /// Max Adver Int, in centiseconds.
    pub interval_cs: u16,
    pub addresses: Vec<Ipv4Addr>,
}

/// A received advertisement with the IP header fields the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub advert: Advert,
}

/// Why a received packet was discarded; each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Discard {
    /// Shorter than its headers say, or not an IPv4 packet of protocol 112.
    Length,
    /// TTL other than 255: sent from off-link or forged (RFC 5798 7.1).
    Ttl,
    /// Version other than 3, or type other than advertisement.
    Version,
    Checksum,
    /// Another virtual router's advert (normal on a shared segment; counted, not logged).
    Vrid,
    /// Sent from this node's own address (our own advert looped back).
    Own,
    /// Unicast mode: from an address that is not a configured peer.
    NotPeer,
    /// Max Adver Int of 0, which would make the master-down interval zero.
    Interval,
}

impl Discard {
    pub const ALL: [Discard; 8] = [
        Discard::Length,
        Discard::Ttl,
        Discard::Version,
        Discard::Checksum,
        Discard::Vrid,
        Discard::Own,
        Discard::NotPeer,
        Discard::Interval,
    ];

    /// The counter and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Discard::Length => "length",
            Discard::Ttl => "ttl",
            Discard::Version => "version",
            Discard::Checksum => "checksum",
            Discard::Vrid => "vrid",
            Discard::Own => "own",
            Discard::NotPeer => "not_peer",
            Discard::Interval => "interval",
        }
    }
}

impl Advert {
    /// The VRRP message (no IP header) as sent from `src` to `dst`, checksum filled in.
    /// Addresses past 255 are not sent (the count field is one byte; config validation keeps
    /// a node far below it).
    pub fn encode(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let addrs = &self.addresses[..self.addresses.len().min(255)];
        let mut msg = Vec::with_capacity(HEADER_LEN + 4 * addrs.len());
        msg.push((VERSION << 4) | TYPE_ADVERTISEMENT);
        msg.push(self.vrid);
        msg.push(self.priority);
        msg.push(addrs.len() as u8);
        msg.extend_from_slice(&(self.interval_cs & MAX_INTERVAL_CS).to_be_bytes());
        msg.extend_from_slice(&[0, 0]);
        for a in addrs {
            msg.extend_from_slice(&a.octets());
        }
        let sum = checksum(src, dst, &msg);
        msg[6..8].copy_from_slice(&sum.to_be_bytes());
        msg
    }
}

/// Checks a packet as a raw IPv4 socket delivers it (IP header included) against RFC 5798 7.1
/// and returns the advert, or the first rule it breaks. `vrid` is ours: another VRID's packet is
/// still parsed fully first, so a forged one with a bad checksum counts as a bad checksum.
pub fn parse(packet: &[u8], vrid: u8) -> Result<Received, Discard> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Err(Discard::Length);
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < 20 || total < ihl || total > packet.len() || packet[9] != IPPROTO_VRRP {
        return Err(Discard::Length);
    }
    let ttl = packet[8];
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let msg = &packet[ihl..total];
    if ttl != TTL {
        return Err(Discard::Ttl);
    }
    if msg.len() < HEADER_LEN {
        return Err(Discard::Length);
    }
    if msg[0] >> 4 != VERSION || msg[0] & 0x0f != TYPE_ADVERTISEMENT {
        return Err(Discard::Version);
    }
    let count = usize::from(msg[3]);
    // Longer is allowed: RFC 5798 leaves room for trailing data, which the checksum still covers.
    if msg.len() < HEADER_LEN + 4 * count {
        return Err(Discard::Length);
    }
    if checksum(src, dst, msg) != 0 {
        return Err(Discard::Checksum);
    }
    if msg[1] != vrid {
        return Err(Discard::Vrid);
    }
    let interval_cs = u16::from_be_bytes([msg[4], msg[5]]) & MAX_INTERVAL_CS;
    if interval_cs == 0 {
        return Err(Discard::Interval);
    }
    let addresses = msg[HEADER_LEN..HEADER_LEN + 4 * count]
        .chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect();
    Ok(Received {
        src,
        dst,
        advert: Advert {
            vrid: msg[1],
            priority: msg[2],
            interval_cs,
            addresses,
        },
    })
}

/// The Internet checksum over the IPv4 pseudo-header and `msg`. Over a message whose checksum
/// field is filled in it is 0 exactly when the checksum is right.
fn checksum(src: Ipv4Addr, dst: Ipv4Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, IPPROTO_VRRP]);
    add(&(msg.len() as u16).to_be_bytes());
    add(msg);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A whole IPv4 packet around `msg` as the kernel would send it, for tests and spoofing fixtures.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, msg: &[u8]) -> Vec<u8> {
    let total = (20 + msg.len()) as u16;
    let mut p = vec![0x45, 0xc0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, ttl, IPPROTO_VRRP, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let mut sum: u32 = p
        .chunks(2)
        .map(|c| (u32::from(c[0]) << 8) | u32::from(c[1]))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    p[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    p.extend_from_slice(msg);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    fn advert() -> Advert {
        Advert {
            vrid: 51,
            priority: 200,
            interval_cs: 100,
            addresses: vec![VIP, Ipv4Addr::new(10, 0, 0, 101)],
        }
    }

    #[test]
    fn encodes_the_rfc_layout() {
        let msg = advert().encode(SRC, GROUP);
        assert_eq!(&msg[..6], &[0x31, 51, 200, 2, 0x00, 100]);
        assert_eq!(&msg[8..], &[10, 0, 0, 100, 10, 0, 0, 101]);
        assert_eq!(checksum(SRC, GROUP, &msg), 0);
    }

    #[test]
    fn round_trips() {
        let pkt = ipv4_packet(SRC, GROUP, 255, &advert().encode(SRC, GROUP));
        let got = parse(&pkt, 51).unwrap();
        assert_eq!(got.src, SRC);
        assert_eq!(got.dst, GROUP);
        assert_eq!(got.advert, advert());
    }

    #[test]
    fn the_checksum_covers_the_pseudo_header() {
        // The same message sent to a unicast peer does not verify as if sent to the group.
        let msg = advert().encode(SRC, GROUP);
        let pkt = ipv4_packet(SRC, Ipv4Addr::new(10, 0, 0, 3), 255, &msg);
        assert_eq!(parse(&pkt, 51), Err(Discard::Checksum));
    }

    #[test]
    fn discards_in_rfc_order() {
        let msg = advert().encode(SRC, GROUP);
        let ok = ipv4_packet(SRC, GROUP, 255, &msg);
        // TTL comes before everything else, even a wrong VRID.
        let mut p = ipv4_packet(SRC, GROUP, 254, &msg);
        assert_eq!(parse(&p, 51), Err(Discard::Ttl));
        assert_eq!(parse(&p, 52), Err(Discard::Ttl));
        // Version 2.
        p = ok.clone();
        p[20] = 0x21;
        assert_eq!(parse(&p, 51), Err(Discard::Version));
        // Type 2.
        p = ok.clone();
        p[20] = 0x32;
        assert_eq!(parse(&p, 51), Err(Discard::Version));
        // One flipped bit anywhere in the message.
        for byte in 20..ok.len() {
            p = ok.clone();
            p[byte] ^= 0x01;
            let got = parse(&p, 51);
            // The version/type and count bytes fail their own checks first.
            assert!(
                matches!(
                    got,
                    Err(Discard::Checksum | Discard::Version | Discard::Length)
                ),
                "byte {byte}: {got:?}"
            );
        }
        // A valid advert of another virtual router.
        assert_eq!(parse(&ok, 52), Err(Discard::Vrid));
        // Count says more addresses than are there.
        p = ok.clone();
        p[23] = 3;
        assert_eq!(parse(&p, 51), Err(Discard::Length));
        // Truncated IP or VRRP header.
        assert_eq!(parse(&ok[..19], 51), Err(Discard::Length));
        assert_eq!(
            parse(&ipv4_packet(SRC, GROUP, 255, &msg[..7]), 51),
            Err(Discard::Length)
        );
        // Not VRRP.
        p = ok.clone();
        p[9] = 17;
        assert_eq!(parse(&p, 51), Err(Discard::Length));
    }

    #[test]
    fn interval_zero_is_refused_and_reserved_bits_ignored() {
        let mut a = advert();
        a.interval_cs = 0;
        let p = ipv4_packet(SRC, GROUP, 255, &a.encode(SRC, GROUP));
        assert_eq!(parse(&p, 51), Err(Discard::Interval));
        // Reserved bits set by a sender: ignored, checksum still verified over them.
        let mut msg = advert().encode(SRC, GROUP);
        msg[4] |= 0xf0;
        msg[6..8].copy_from_slice(&[0, 0]);
        let sum = checksum(SRC, GROUP, &msg);
        msg[6..8].copy_from_slice(&sum.to_be_bytes());
        let got = parse(&ipv4_packet(SRC, GROUP, 255, &msg), 51).unwrap();
        assert_eq!(got.advert.interval_cs, 100);
    }

    #[test]
    fn odd_length_trailing_data_is_checksummed() {
        let mut msg = advert().encode(SRC, GROUP);
        msg.push(0xab);
        msg[6..8].copy_from_slice(&[0, 0]);
        let sum = checksum(SRC, GROUP, &msg);
        msg[6..8].copy_from_slice(&sum.to_be_bytes());
        assert!(parse(&ipv4_packet(SRC, GROUP, 255, &msg), 51).is_ok());
    }
}
