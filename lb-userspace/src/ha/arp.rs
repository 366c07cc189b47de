//! Gratuitous ARP, unsolicited neighbour advertisements and the VRRP virtual MAC.
//!
//! A new master announces each VIP so that hosts and switches on the segment move the address
//! (and the MAC's switch port) to it at once instead of when their neighbour entries expire: an
//! IPv4 VIP with gratuitous ARP, an IPv6 VIP with an unsolicited neighbour advertisement (RFC
//! 4861 7.2.6, what keepalived sends for IPv6 addresses). [`GarpSender`] writes the frames
//! straight to the interface with an `AF_PACKET` socket: the kernel's ARP and NDP code only
//! answer, they never announce on demand, and a frame built here carries the virtual MAC when
//! one is in use, whatever the interface's own.
//!
//! Guaranteed: every [`GarpSender::send`] hands exactly one [`garp_frame`] or [`na_frame`] to
//! the interface's queue or returns the error. Not guaranteed: that it reaches anyone (that is
//! why VRRP sends a burst and repeats it), nor that receivers accept it (Linux updates an
//! existing entry for the address; whether it creates one depends on `arp_accept` and, for IPv6,
//! `accept_untracked_na`).

use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Length of a gratuitous ARP frame: Ethernet header (14) + ARP for IPv4 over Ethernet (28).
/// Shorter than Ethernet's 60-byte minimum; the NIC pads it.
pub const GARP_LEN: usize = 42;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The VRRP virtual router MAC for `vrid`, `00:00:5e:00:01:{vrid}` (RFC 5798 section 7.3).
pub fn virtual_mac(vrid: u8) -> [u8; 6] {
    [0x00, 0x00, 0x5e, 0x00, 0x01, vrid]
}

/// A gratuitous ARP announcing that `addr` is at `src_mac`.
///
/// It is the form keepalived sends: a broadcast ARP *request* whose sender and target protocol
/// addresses are both `addr` and whose target hardware address is zero. A request rather than a
/// reply because some hosts ignore unsolicited replies, and Linux treats a request with sender
/// equal to target as gratuitous (`arp_is_garp`) and overrides its existing entry even inside
/// `locktime`.
pub fn garp_frame(src_mac: [u8; 6], addr: Ipv4Addr) -> [u8; GARP_LEN] {
    let ip = addr.octets();
    let mut f = [0u8; GARP_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&src_mac);
    f[28..32].copy_from_slice(&ip);
    // f[32..38], the target hardware address, stays zero: unknown, as in any request.
    f[38..42].copy_from_slice(&ip);
    f
}

/// Length of an unsolicited neighbour advertisement frame: Ethernet (14) + IPv6 (40) + the
/// advertisement (24) + its target link-layer address option (8).
pub const NA_LEN: usize = 86;
/// ICMPv6 type of a neighbour advertisement.
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Override flag of a neighbour advertisement (the first byte of its flags word).
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// Neighbour discovery option "target link-layer address".
const ND_OPT_TARGET_LL_ADDR: u8 = 2;
const IPPROTO_ICMPV6: u8 = 58;
/// All-nodes multicast, ff02::1, and its Ethernet group address (RFC 2464: 33:33 + low 32 bits).
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// An unsolicited neighbour advertisement announcing that `addr` is at `src_mac`: to all nodes,
/// from `addr` itself, hop limit 255 (receivers drop neighbour discovery with any other, RFC
/// 4861 7.1.2), Solicited clear and Override set so that receivers replace the MAC they hold
/// (7.2.6), and the MAC in a target link-layer address option.
pub fn na_frame(src_mac: [u8; 6], addr: Ipv6Addr) -> [u8; NA_LEN] {
    let mut f = [0u8; NA_LEN];
    f[0..6].copy_from_slice(&ALL_NODES_MAC);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let ip = &mut f[14..54];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&32u16.to_be_bytes());
    ip[6] = IPPROTO_ICMPV6;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&addr.octets());
    ip[24..40].copy_from_slice(&ALL_NODES.octets());
    let na = &mut f[54..86];
    na[0] = ND_NEIGHBOR_ADVERT;
    na[4] = NA_FLAG_OVERRIDE;
    na[8..24].copy_from_slice(&addr.octets());
    na[24] = ND_OPT_TARGET_LL_ADDR;
    na[25] = 1; // in units of 8 bytes
    na[26..32].copy_from_slice(&src_mac);
    let sum = icmpv6_checksum(&addr, &ALL_NODES, &f[54..86]);
    f[56..58].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The ICMPv6 checksum of `msg` (its checksum field zero) from `src` to `dst` (RFC 4443 2.3:
/// the one's complement sum over the IPv6 pseudo-header and the message).
fn icmpv6_checksum(src: &Ipv6Addr, dst: &Ipv6Addr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            sum += hi | pair.get(1).copied().map_or(0, u32::from);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(msg.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends gratuitous ARPs and unsolicited neighbour advertisements out of one interface.
#[derive(Debug)]
pub struct GarpSender {
    fd: OwnedFd,
    ifindex: u32,
    src_mac: [u8; 6],
}

impl GarpSender {
    /// Opens an `AF_PACKET` socket bound to `ifindex` (needs `CAP_NET_RAW`). The socket lives in
    /// the caller's network namespace. `src_mac` is the interface's MAC, or the VRRP virtual MAC
    /// when one is in use.
    pub fn new(ifindex: u32, src_mac: [u8; 6]) -> io::Result<GarpSender> {
        let context = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("gratuitous ARP socket for ifindex {ifindex}: {what}: {e}"),
            )
        };
        let ifindex_c = i32::try_from(ifindex).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ifindex {ifindex} out of range"),
            )
        })?;
        // Protocol 0: the socket only sends. With ETH_P_ARP the kernel would also queue every ARP
        // frame seen on the interface to it, and nobody reads them.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(context(io::Error::last_os_error(), "socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut sll = sockaddr_ll(ifindex_c, 0);
        sll.sll_halen = 0;
        // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast::<libc::sockaddr>(),
                sockaddr_ll_len(),
            )
        };
        if rc != 0 {
            return Err(context(io::Error::last_os_error(), "bind"));
        }
        Ok(GarpSender {
            fd,
            ifindex,
            src_mac,
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn src_mac(&self) -> [u8; 6] {
        self.src_mac
    }

    /// Sends one gratuitous ARP for `addr`. Never blocks: a full device queue is
    /// `ErrorKind::WouldBlock`, an interface that is down is `ENETDOWN`.
    pub fn send(&self, addr: Ipv4Addr) -> io::Result<()> {
        self.send_frame(IpAddr::V4(addr), &garp_frame(self.src_mac, addr), ETH_P_ARP)
    }

    /// Sends one unsolicited neighbour advertisement for `addr`; errors as [`send`](Self::send).
    pub fn send_na(&self, addr: Ipv6Addr) -> io::Result<()> {
        self.send_frame(IpAddr::V6(addr), &na_frame(self.src_mac, addr), ETH_P_IPV6)
    }

    /// Announces `addr` with the frame of its family.
    pub fn announce(&self, addr: IpAddr) -> io::Result<()> {
        match addr {
            IpAddr::V4(a) => self.send(a),
            IpAddr::V6(a) => self.send_na(a),
        }
    }

    fn send_frame(&self, addr: IpAddr, frame: &[u8], protocol: u16) -> io::Result<()> {
        let what = if addr.is_ipv4() {
            "gratuitous ARP"
        } else {
            "neighbour advertisement"
        };
        // The destination gives the frame its protocol (skb->protocol); a socket bound with
        // protocol 0 has none of its own.
        let mut sll = sockaddr_ll(self.ifindex as i32, protocol);
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `sll` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast::<libc::sockaddr>(),
                sockaddr_ll_len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{what} for {addr} on ifindex {}: {e}", self.ifindex),
            ));
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!(
                "{what} for {addr} on ifindex {}: sent {n} of {} bytes",
                self.ifindex,
                frame.len()
            )));
        }
        Ok(())
    }
}

fn sockaddr_ll(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&BROADCAST);
    sll
}

fn sockaddr_ll_len() -> libc::socklen_t {
    size_of::<libc::sockaddr_ll>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_mac_is_the_iana_vrrp_block() {
        assert_eq!(virtual_mac(1), [0x00, 0x00, 0x5e, 0x00, 0x01, 0x01]);
        assert_eq!(virtual_mac(51), [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33]);
        assert_eq!(virtual_mac(255), [0x00, 0x00, 0x5e, 0x00, 0x01, 0xff]);
    }

    #[test]
    fn garp_frame_fields() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = garp_frame(mac, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(f.len(), 42);
        assert_eq!(f[0..6], [0xff; 6], "Ethernet destination: broadcast");
        assert_eq!(f[6..12], mac, "Ethernet source");
        assert_eq!(f[12..14], [0x08, 0x06], "EtherType ARP");
        assert_eq!(f[14..16], [0x00, 0x01], "hardware type Ethernet");
        assert_eq!(f[16..18], [0x08, 0x00], "protocol type IPv4");
        assert_eq!(f[18], 6, "hardware address length");
        assert_eq!(f[19], 4, "protocol address length");
        assert_eq!(f[20..22], [0x00, 0x01], "operation: request");
        assert_eq!(f[22..28], mac, "sender hardware address");
        assert_eq!(f[28..32], [10, 0, 0, 100], "sender protocol address");
        assert_eq!(f[32..38], [0; 6], "target hardware address");
        assert_eq!(f[38..42], [10, 0, 0, 100], "target protocol address");
    }

    #[test]
    fn na_frame_fields_and_checksum() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = na_frame(mac, vip);
        assert_eq!(f[0..6], [0x33, 0x33, 0, 0, 0, 1], "all-nodes group MAC");
        assert_eq!(f[6..12], mac);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6, "IPv6");
        assert_eq!(f[18..20], [0, 32], "payload length");
        assert_eq!(f[20], 58, "next header ICMPv6");
        assert_eq!(f[21], 255, "hop limit 255, or receivers drop it");
        assert_eq!(f[22..38], vip.octets(), "from the VIP");
        assert_eq!(f[38..54], ALL_NODES.octets(), "to ff02::1");
        assert_eq!(f[54], 136, "neighbour advertisement");
        assert_eq!(f[55], 0, "code");
        assert_eq!(f[58], 0x20, "Override set, Router and Solicited clear");
        assert_eq!(f[62..78], vip.octets(), "target");
        assert_eq!(
            f[78..80],
            [2, 1],
            "target link-layer address option, 8 bytes"
        );
        assert_eq!(f[80..86], mac);
        // Summed with its checksum in place, a correct message sums to zero.
        let mut zeroed = f;
        zeroed[56] = 0;
        zeroed[57] = 0;
        let sum = icmpv6_checksum(&vip, &ALL_NODES, &zeroed[54..]);
        assert_eq!(sum.to_be_bytes(), [f[56], f[57]]);
        assert_eq!(icmpv6_checksum(&vip, &ALL_NODES, &f[54..]), 0);
    }

    /// The checksum routine against a known value: the sum computed by hand for a message of
    /// all zeros except its type, between two small addresses.
    #[test]
    fn icmpv6_checksum_known_value() {
        let a: Ipv6Addr = "::1".parse().unwrap();
        let b: Ipv6Addr = "::2".parse().unwrap();
        // Words: 0x0001 + 0x0002 + length 0x0004 + next header 0x003a + 0x8800 (type 136)
        // = 0x8841; complemented 0x77be.
        assert_eq!(icmpv6_checksum(&a, &b, &[136, 0, 0, 0]), 0x77be);
    }

    #[test]
    fn garp_frame_with_the_virtual_mac() {
        let f = garp_frame(virtual_mac(7), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(
            f,
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
                0x00, 0x00, 0x5e, 0x00, 0x01, 0x07, // virtual MAC
                0x08, 0x06, // ARP
                0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, // Ethernet/IPv4 request
                0x00, 0x00, 0x5e, 0x00, 0x01, 0x07, 192, 168, 1, 1, // sender
                0, 0, 0, 0, 0, 0, 192, 168, 1, 1, // target
            ]
        );
    }
}
