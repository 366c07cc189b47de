//! Builds Ethernet frames for fixtures and benchmarks: IPv4 TCP/UDP/ICMP and IPv6 TCP/UDP/ICMPv6
//! with correct checksums, plus the unusual shapes the data path must handle (IP options,
//! fragments, bad IHL, truncation, IPv6 extension headers, VLAN tags, ARP).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// Internet checksum (RFC 1071) over `data`, starting from `initial`.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        sum += (*b as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let s = src.octets();
    let d = dst.octets();
    u16::from_be_bytes([s[0], s[1]]) as u32
        + u16::from_be_bytes([s[2], s[3]]) as u32
        + u16::from_be_bytes([d[0], d[1]]) as u32
        + u16::from_be_bytes([d[2], d[3]]) as u32
        + proto as u32
        + len as u32
}

/// An Ethernet frame around `payload`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// What goes inside the IPv4 header.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    IcmpEcho {
        id: u16,
        seq: u16,
    },
    /// Any other protocol number with an opaque payload.
    Raw {
        proto: u8,
    },
}

/// An IPv4 packet in an Ethernet frame, with every field settable for malformed cases.
#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub ttl: u8,
    pub id: u16,
    /// Flags (DF 0x4000, MF 0x2000) and fragment offset (in 8-byte units), as on the wire.
    pub frags: u16,
    /// Must be a multiple of 4 bytes for a well-formed header.
    pub ip_options: Vec<u8>,
    /// Overrides the IHL nibble (header length in 32-bit words).
    pub ihl: Option<u8>,
    /// Overrides the version nibble.
    pub version: Option<u8>,
    /// Overrides the total length field.
    pub tot_len: Option<u16>,
    /// Bytes of Ethernet padding after the IP packet.
    pub padding: usize,
}

impl Packet {
    fn new(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Packet {
        Packet {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            src,
            dst,
            l4,
            payload: Vec::new(),
            ttl: 64,
            id: 0x1234,
            frags: 0x4000,
            ip_options: Vec::new(),
            ihl: None,
            version: None,
            tot_len: None,
            padding: 0,
        }
    }

    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Packet {
        Packet::new(
            *src.ip(),
            *dst.ip(),
            L4::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags,
            },
        )
    }

    pub fn udp(src: SocketAddrV4, dst: SocketAddrV4) -> Packet {
        Packet::new(
            *src.ip(),
            *dst.ip(),
            L4::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Packet {
        Packet::new(src, dst, L4::IcmpEcho { id: 7, seq: 1 })
    }

    pub fn raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Packet {
        Packet::new(src, dst, L4::Raw { proto })
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }
    pub fn frags(mut self, frags: u16) -> Self {
        self.frags = frags;
        self
    }
    pub fn ip_options(mut self, o: &[u8]) -> Self {
        self.ip_options = o.to_vec();
        self
    }
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }
    pub fn version(mut self, v: u8) -> Self {
        self.version = Some(v);
        self
    }
    pub fn tot_len(mut self, l: u16) -> Self {
        self.tot_len = Some(l);
        self
    }
    pub fn padding(mut self, n: usize) -> Self {
        self.padding = n;
        self
    }
    pub fn macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => 6,
            L4::Udp { .. } => 17,
            L4::IcmpEcho { .. } => 1,
            L4::Raw { proto } => proto,
        }
    }

    /// The L4 segment (header and payload) with its checksum.
    pub fn l4_bytes(&self) -> Vec<u8> {
        let pseudo = |proto, len| pseudo_header_sum(self.src, self.dst, proto, len);
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => tcp_segment(sport, dport, flags, &self.payload, pseudo),
            L4::Udp { sport, dport } => udp_datagram(sport, dport, &self.payload, pseudo),
            // ICMP's checksum covers no pseudo-header.
            L4::IcmpEcho { id, seq } => icmp_message(
                8,
                0,
                (u32::from(id) << 16) | u32::from(seq),
                &self.payload,
                |_| 0,
            ),
            L4::Raw { .. } => self.payload.clone(),
        }
    }

    /// The IPv4 packet (header and L4 bytes).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let l4 = self.l4_bytes();
        let hdr_len = 20 + self.ip_options.len();
        let mut ip = Vec::with_capacity(hdr_len + l4.len());
        let ihl = self.ihl.unwrap_or((hdr_len / 4) as u8);
        ip.push((self.version.unwrap_or(4) << 4) | (ihl & 0x0f));
        ip.push(0); // tos
        let tot = self.tot_len.unwrap_or((hdr_len + l4.len()) as u16);
        ip.extend_from_slice(&tot.to_be_bytes());
        ip.extend_from_slice(&self.id.to_be_bytes());
        ip.extend_from_slice(&self.frags.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = checksum(&ip[..hdr_len], 0);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&l4);
        ip
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        padded(
            ethernet(self.dst_mac, self.src_mac, ETH_P_IP, &self.ip_bytes()),
            self.padding,
        )
    }
}

/// A TCP segment with its checksum; `pseudo(proto, len)` is the pseudo-header sum of the IP
/// version carrying it.
fn tcp_segment(
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
    pseudo: impl Fn(u8, usize) -> u32,
) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
    let ack = if flags & TCP_ACK != 0 {
        0x0a0b_0c0du32
    } else {
        0
    };
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.push(5 << 4); // data offset 5 words
    seg.push(flags);
    seg.extend_from_slice(&64240u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    seg.extend_from_slice(payload);
    let c = checksum(&seg, pseudo(6, seg.len()));
    seg[16..18].copy_from_slice(&c.to_be_bytes());
    seg
}

/// A UDP datagram with its checksum (see [`tcp_segment`]).
fn udp_datagram(
    sport: u16,
    dport: u16,
    payload: &[u8],
    pseudo: impl Fn(u8, usize) -> u32,
) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(payload);
    let mut c = checksum(&seg, pseudo(17, seg.len()));
    if c == 0 {
        c = 0xffff;
    }
    seg[6..8].copy_from_slice(&c.to_be_bytes());
    seg
}

/// An ICMP or ICMPv6 message (the two share their layout): type, code, checksum, the 4 bytes
/// `rest`, payload. `pseudo(len)` starts the checksum: ICMPv6's covers the IPv6 pseudo-header.
fn icmp_message(
    kind: u8,
    code: u8,
    rest: u32,
    payload: &[u8],
    pseudo: impl Fn(usize) -> u32,
) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m, pseudo(m.len()));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// `frame` with `padding` zero bytes after the IP packet, as a short frame padded to the
/// Ethernet minimum arrives.
fn padded(mut frame: Vec<u8>, padding: usize) -> Vec<u8> {
    frame.resize(frame.len() + padding, 0);
    frame
}

/// MAC addresses used across fixtures (locally administered).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
/// The load balancer's second MAC (`Settings::alt_mac`: the VRRP virtual MAC for VRID 51).
pub const ALT_MAC: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];
/// Another host on the segment: frames to it reach us only by flooding.
pub const OTHER_HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x99];

/// An ARP request `who-has target tell sender`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    a.extend_from_slice(&CLIENT_MAC);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet([0xff; 6], CLIENT_MAC, ETH_P_ARP, &a)
}

pub const ICMPV6: u8 = 58;
/// ICMPv6 types (RFC 4443, RFC 4861).
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;

fn pseudo_header_sum6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u32 {
    let words = |a: Ipv6Addr| {
        a.octets()
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
            .sum::<u32>()
    };
    words(src) + words(dst) + (len as u32 >> 16) + (len as u32 & 0xffff) + proto as u32
}

/// What goes after an IPv6 header's extension headers.
#[derive(Clone, Debug)]
pub enum Upper6 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// An ICMPv6 message: type, code, the 4 bytes after the checksum (the MTU of a packet too
    /// big), then the payload.
    Icmp6 {
        kind: u8,
        code: u8,
        rest: u32,
    },
    /// Any other protocol number with an opaque payload.
    Raw {
        proto: u8,
    },
}

/// An IPv6 extension header (RFC 8200 section 4).
#[derive(Clone, Debug)]
pub enum Ext6 {
    /// Hop-by-hop options, `units` 8-byte units after the first 8 (padding options).
    HopByHop { units: u8 },
    /// Destination options, likewise.
    DestOpts { units: u8 },
    /// A routing header (type 4, segment routing) with `segments_left`.
    Routing { units: u8, segments_left: u8 },
    /// A fragment header: `offset` in 8-byte units, more fragments.
    Fragment { offset: u16, more: bool },
}

impl Ext6 {
    fn kind(&self) -> u8 {
        match self {
            Ext6::HopByHop { .. } => 0,
            Ext6::DestOpts { .. } => 60,
            Ext6::Routing { .. } => 43,
            Ext6::Fragment { .. } => 44,
        }
    }

    fn bytes(&self, next: u8) -> Vec<u8> {
        match *self {
            Ext6::HopByHop { units } | Ext6::DestOpts { units } => {
                let mut h = vec![0; (units as usize + 1) * 8];
                h[0] = next;
                h[1] = units;
                // PadN over the rest of the header.
                h[2] = 1;
                h[3] = h.len() as u8 - 4;
                h
            }
            Ext6::Routing {
                units,
                segments_left,
            } => {
                let mut h = vec![0; (units as usize + 1) * 8];
                h[0] = next;
                h[1] = units;
                h[2] = 4;
                h[3] = segments_left;
                h
            }
            Ext6::Fragment { offset, more } => {
                let mut h = vec![next, 0];
                h.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
                h.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                h
            }
        }
    }
}

/// An IPv6 packet in an Ethernet frame, with every field settable for malformed cases.
#[derive(Clone, Debug)]
pub struct Packet6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub exts: Vec<Ext6>,
    pub upper: Upper6,
    pub payload: Vec<u8>,
    pub hop_limit: u8,
    /// Overrides the version nibble.
    pub version: Option<u8>,
    /// Overrides the payload length field.
    pub payload_len: Option<u16>,
    /// Bytes of Ethernet padding after the IP packet.
    pub padding: usize,
}

impl Packet6 {
    fn new(src: Ipv6Addr, dst: Ipv6Addr, upper: Upper6) -> Packet6 {
        Packet6 {
            dst_mac: LB_MAC,
            src_mac: CLIENT_MAC,
            src,
            dst,
            exts: Vec::new(),
            upper,
            payload: Vec::new(),
            hop_limit: 64,
            version: None,
            payload_len: None,
            padding: 0,
        }
    }

    pub fn tcp(src: SocketAddrV6, dst: SocketAddrV6, flags: u8) -> Packet6 {
        Packet6::new(
            *src.ip(),
            *dst.ip(),
            Upper6::Tcp {
                sport: src.port(),
                dport: dst.port(),
                flags,
            },
        )
    }

    pub fn udp(src: SocketAddrV6, dst: SocketAddrV6) -> Packet6 {
        Packet6::new(
            *src.ip(),
            *dst.ip(),
            Upper6::Udp {
                sport: src.port(),
                dport: dst.port(),
            },
        )
    }

    pub fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, kind: u8, code: u8, rest: u32) -> Packet6 {
        Packet6::new(src, dst, Upper6::Icmp6 { kind, code, rest })
    }

    /// A packet-too-big error (MTU 1280) from `router` to `dst` quoting the first `quoted`
    /// bytes of `about`'s IPv6 packet.
    pub fn packet_too_big(router: Ipv6Addr, dst: Ipv6Addr, about: &Packet6, quoted: usize) -> Self {
        let q = about.ip_bytes();
        Packet6::icmp6(router, dst, ICMPV6_PACKET_TOO_BIG, 0, 1280).payload(&q[..quoted])
    }

    pub fn raw(src: Ipv6Addr, dst: Ipv6Addr, proto: u8) -> Packet6 {
        Packet6::new(src, dst, Upper6::Raw { proto })
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }
    /// Appends an extension header (after those already there).
    pub fn ext(mut self, e: Ext6) -> Self {
        self.exts.push(e);
        self
    }
    pub fn hop_limit(mut self, h: u8) -> Self {
        self.hop_limit = h;
        self
    }
    pub fn version(mut self, v: u8) -> Self {
        self.version = Some(v);
        self
    }
    pub fn payload_len(mut self, l: u16) -> Self {
        self.payload_len = Some(l);
        self
    }
    pub fn padding(mut self, n: usize) -> Self {
        self.padding = n;
        self
    }
    pub fn macs(mut self, dst: [u8; 6], src: [u8; 6]) -> Self {
        self.dst_mac = dst;
        self.src_mac = src;
        self
    }

    fn proto(&self) -> u8 {
        match self.upper {
            Upper6::Tcp { .. } => 6,
            Upper6::Udp { .. } => 17,
            Upper6::Icmp6 { .. } => ICMPV6,
            Upper6::Raw { proto } => proto,
        }
    }

    /// The upper-layer bytes with their checksum (over the IPv6 pseudo-header).
    pub fn upper_bytes(&self) -> Vec<u8> {
        let pseudo = |proto, len| pseudo_header_sum6(self.src, self.dst, proto, len);
        match self.upper {
            Upper6::Tcp {
                sport,
                dport,
                flags,
            } => tcp_segment(sport, dport, flags, &self.payload, pseudo),
            Upper6::Udp { sport, dport } => udp_datagram(sport, dport, &self.payload, pseudo),
            Upper6::Icmp6 { kind, code, rest } => {
                icmp_message(kind, code, rest, &self.payload, |len| pseudo(ICMPV6, len))
            }
            Upper6::Raw { .. } => self.payload.clone(),
        }
    }

    /// The IPv6 packet (header, extension headers, upper layer).
    pub fn ip_bytes(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, e) in self.exts.iter().enumerate() {
            let next = self.exts.get(i + 1).map_or(self.proto(), Ext6::kind);
            body.extend_from_slice(&e.bytes(next));
        }
        body.extend_from_slice(&self.upper_bytes());
        let first = self.exts.first().map_or(self.proto(), Ext6::kind);
        let mut ip = vec![self.version.unwrap_or(6) << 4, 0, 0, 0];
        ip.extend_from_slice(&self.payload_len.unwrap_or(body.len() as u16).to_be_bytes());
        ip.push(first);
        ip.push(self.hop_limit);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&body);
        ip
    }

    /// The whole Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        padded(
            ethernet(self.dst_mac, self.src_mac, ETH_P_IPV6, &self.ip_bytes()),
            self.padding,
        )
    }
}

/// `inner` (a frame built by this module) with an 802.1Q (or 802.1ad) tag inserted.
pub fn vlan_tagged(inner: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut f = inner[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&inner[12..]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = Packet::tcp(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
            TCP_SYN,
        )
        .payload(b"hello");
        let ip = p.ip_bytes();
        assert_eq!(checksum(&ip[..20], 0), 0, "IP header checksum");
        let l4 = &ip[20..];
        assert_eq!(
            checksum(l4, pseudo_header_sum(p.src, p.dst, 6, l4.len())),
            0,
            "TCP checksum over pseudo header"
        );
        let u = Packet::udp(
            "10.0.0.1:5000".parse().unwrap(),
            "10.0.0.100:53".parse().unwrap(),
        )
        .payload(b"q");
        let ip = u.ip_bytes();
        let l4 = &ip[20..];
        assert_eq!(
            checksum(l4, pseudo_header_sum(u.src, u.dst, 17, l4.len())),
            0
        );
    }

    #[test]
    fn options_and_tags_land_where_expected() {
        let p = Packet::tcp(
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.100:80".parse().unwrap(),
            TCP_SYN,
        )
        .ip_options(&[1, 1, 1, 0]);
        let f = p.frame();
        assert_eq!(f[14], 0x46, "version 4, IHL 6");
        assert_eq!(
            &f[14 + 24..14 + 26],
            &1u16.to_be_bytes(),
            "source port after options"
        );
        let t = vlan_tagged(&f, ETH_P_8021Q, 10);
        assert_eq!(&t[12..14], &ETH_P_8021Q.to_be_bytes());
        assert_eq!(&t[16..18], &ETH_P_IP.to_be_bytes());
        assert_eq!(t.len(), f.len() + 4);
    }

    #[test]
    fn ipv6_checksums_verify_and_headers_chain() {
        let client: SocketAddrV6 = "[fd00::1]:40000".parse().unwrap();
        let vip: SocketAddrV6 = "[fd00::100]:80".parse().unwrap();
        let p = Packet6::tcp(client, vip, TCP_SYN)
            .payload(b"hello")
            .ext(Ext6::HopByHop { units: 0 })
            .ext(Ext6::Routing {
                units: 2,
                segments_left: 0,
            })
            .ext(Ext6::DestOpts { units: 1 });
        let ip = p.ip_bytes();
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(ip[6], 0, "hop-by-hop first");
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]) as usize,
            ip.len() - 40,
            "payload length"
        );
        let (hbh, rest) = ip[40..].split_at(8);
        assert_eq!(hbh[0], 43);
        let (rh, rest) = rest.split_at(24);
        assert_eq!((rh[0], rh[3]), (60, 0));
        let (dst, tcp) = rest.split_at(16);
        assert_eq!(dst[0], 6);
        assert_eq!(&tcp[0..2], &40000u16.to_be_bytes());
        assert_eq!(
            checksum(tcp, pseudo_header_sum6(p.src, p.dst, 6, tcp.len())),
            0,
            "TCP checksum over the IPv6 pseudo header"
        );
        let ptb = Packet6::packet_too_big(
            "fd00::fe".parse().unwrap(),
            *vip.ip(),
            &Packet6::udp(vip, client),
            48,
        );
        let ip = ptb.ip_bytes();
        assert_eq!(
            (ip[6], ip[40], ip.len()),
            (ICMPV6, ICMPV6_PACKET_TOO_BIG, 40 + 8 + 48)
        );
        assert_eq!(
            checksum(
                &ip[40..],
                pseudo_header_sum6(ptb.src, ptb.dst, ICMPV6, ip.len() - 40)
            ),
            0
        );
        let f = Packet6::udp(client, vip).ext(Ext6::Fragment {
            offset: 185,
            more: true,
        });
        let ip = f.ip_bytes();
        assert_eq!((ip[6], ip[40]), (44, 17));
        assert_eq!(u16::from_be_bytes([ip[42], ip[43]]), 185 << 3 | 1);
    }
}
