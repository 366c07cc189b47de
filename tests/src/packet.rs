//! Builds Ethernet frames for fixtures and benchmarks: IPv4 TCP/UDP/ICMP with correct checksums,
//! plus the unusual shapes the data path must handle (IP options, fragments, bad IHL, truncation,
//! VLAN tags, IPv6, ARP).

use std::net::{Ipv4Addr, SocketAddrV4};

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
        let mut seg = Vec::new();
        match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
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
                seg.extend_from_slice(&self.payload);
                let c = checksum(&seg, pseudo_header_sum(self.src, self.dst, 6, seg.len()));
                seg[16..18].copy_from_slice(&c.to_be_bytes());
            }
            L4::Udp { sport, dport } => {
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
                seg.extend_from_slice(&self.payload);
                let mut c = checksum(&seg, pseudo_header_sum(self.src, self.dst, 17, seg.len()));
                if c == 0 {
                    c = 0xffff;
                }
                seg[6..8].copy_from_slice(&c.to_be_bytes());
            }
            L4::IcmpEcho { id, seq } => {
                seg.extend_from_slice(&[8, 0, 0, 0]);
                seg.extend_from_slice(&id.to_be_bytes());
                seg.extend_from_slice(&seq.to_be_bytes());
                seg.extend_from_slice(&self.payload);
                let c = checksum(&seg, 0);
                seg[2..4].copy_from_slice(&c.to_be_bytes());
            }
            L4::Raw { .. } => seg.extend_from_slice(&self.payload),
        }
        seg
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
        let mut f = ethernet(self.dst_mac, self.src_mac, ETH_P_IP, &self.ip_bytes());
        f.resize(f.len() + self.padding, 0);
        f
    }
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

/// An IPv6 TCP SYN frame (the data path passes IPv6 for now).
pub fn ipv6_tcp_syn() -> Vec<u8> {
    let mut ip = Vec::new();
    ip.extend_from_slice(&[0x60, 0, 0, 0]);
    ip.extend_from_slice(&20u16.to_be_bytes());
    ip.push(6);
    ip.push(64);
    ip.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    ip.extend_from_slice(&"fd00::100".parse::<std::net::Ipv6Addr>().unwrap().octets());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_SYN;
    ip.extend_from_slice(&tcp);
    ethernet(LB_MAC, CLIENT_MAC, ETH_P_IPV6, &ip)
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
}
