//! The per-packet decision, shared by the kernel and the host tests.
//!
//! [`process`] parses one Ethernet frame, decides what happens to it and, when it is forwarded,
//! rewrites its MAC addresses in place. It reads the frame through [`Frame`] and the agent's maps
//! through [`Tables`]; `lb-ebpf` implements both over `XdpContext` and the BPF maps, the tests over
//! a byte slice and plain collections. Counting is the caller's job, from the returned [`Verdict`].
//!
//! Guarantees:
//! - every read is bounds-checked through [`Frame::ptr_at`]; there are no panics, and the one
//!   loop (over IPv6 extension headers) is bounded;
//! - only a forwarded frame is modified, and only its two MAC addresses;
//! - the outcome of every frame is one [`Reason`] (see its docs for the full list of cases);
//! - a packet for a VIP goes to the backend the connection table remembers for its flow while
//!   that backend may keep it, else to the one its VIP's table picks (see [`crate::flows`] for
//!   the rules); the table is consulted before the VIP's table, so established flows keep going
//!   even when that table is empty (every backend drained).
//!
//! Defined outcomes for unusual frames:
//! - shorter than 14 bytes: `DropMalformedEth`; ARP and other non-IP: `PassNotIp`; 802.1Q/802.1ad
//!   tagged: `PassVlan`.
//! - IPv4 shorter than 20 bytes: `DropMalformedIp`.
//! - IPv4 to an address that has no VIP: `PassNotVip`, whatever else is in it, decided by the
//!   VIP address filter before any other check (the kernel's stack validates what it receives;
//!   the load balancer only polices traffic for its VIPs, and most of a host's traffic is not).
//! - IPv4 to a VIP address with version != 4, IHL < 5, total length shorter than the header or
//!   longer than the frame: `DropMalformedIp`. Frames longer than the total length (Ethernet
//!   padding) are fine.
//! - IP options (IHL > 5) are skipped: the L4 header is found at `IHL * 4`, the frame forwarded
//!   unchanged.
//! - not TCP/UDP (GRE, ...) to a VIP address: `PassIpProto`; ICMP other than destination
//!   unreachable (echo: the master's stack answers) likewise.
//! - ICMP destination unreachable to a VIP address quoting a TCP/UDP packet from that VIP: sent
//!   to the backend of the quoted flow (`Forwarded`, nothing remembered, no new flow); quoting
//!   anything else: `PassIpProto`; too short to quote the ports: `DropMalformedL4`.
//! - fragments (MF set or offset != 0): `DropFragment` when the destination is a VIP address,
//!   otherwise `PassNotVip`.
//! - TCP header shorter than 20 bytes or UDP shorter than 8 (in the frame or within the IP total
//!   length): `DropMalformedL4`.
//! - TTL is neither checked nor decremented: in `dsr-l2` the load balancer is an L2 hop towards the
//!   backend, which is the IP destination (it holds the VIP), so TTL 0 and 1 are forwarded like
//!   any other value, as a switch would.
//!
//! IPv6 is load balanced like IPv4, with the same connection-table rules (its own table,
//! [`crate::maps::FLOWS6`]) and the same MAC checks; the cases:
//! - IPv6 header shorter than 40 bytes: `DropMalformedIp`.
//! - to an address that has no VIP: `PassNotVip`, decided by the VIP address filter (the address
//!   folded by [`crate::maps::vip_filter_fold6`]) before any other check, as for IPv4.
//! - to a VIP address with version != 6, or a payload length longer than the frame:
//!   `DropMalformedIp`. Frames longer than the packet (Ethernet padding) are fine.
//! - extension headers: hop-by-hop options, destination options and routing headers with no
//!   segments left are skipped, at most [`IPV6_MAX_EXT_HDRS`] of them; a routing header with
//!   segments left (the VIP is not the packet's final destination) or a longer chain:
//!   `PassIpv6`, the kernel's stack decides. An extension header that runs past the frame or
//!   the payload length: `DropMalformedIp`.
//! - a fragment header (first fragment or not) of a TCP or UDP packet (or of one whose next
//!   header is an extension header, which may precede either): `DropFragment` to a VIP address,
//!   otherwise `PassNotVip`; fragments of other protocols (a large ICMPv6 echo request) are
//!   `PassIpProto`, like IPv4 fragments of other protocols.
//! - AH, ESP, no next header and other protocols: `PassIpProto`.
//! - ICMPv6 destination unreachable and packet too big (path MTU discovery) to a VIP address
//!   quoting a TCP/UDP packet from that VIP (in its first header): sent to the backend of the
//!   quoted flow, as for IPv4; quoting anything else: `PassIpProto`; too short to quote the
//!   ports: `DropMalformedL4`. Every other ICMPv6 message, echo and neighbour discovery
//!   included (the kernel must answer neighbour solicitations for VIP addresses): `PassIpProto`.
//! - TCP header shorter than 20 bytes or UDP shorter than 8 (in the frame or within the payload
//!   length): `DropMalformedL4`.
//! - the hop limit is neither checked nor decremented (an L2 hop, as TTL above).

use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    Reason,
    flows::FlowStat,
    hash::{flow_slot_v4, flow_slot_v6},
    maps::{
        BACKEND_F_DOWN, BACKEND_F_READY, BackendInfo, Flow6Key, FlowEntry, FlowKey, Settings,
        Vip6Key, VipAddr6Key, VipAddrKey, VipInfo, VipKey, vip_filter_fold6, vip_key_word,
        vip6_key_word,
    },
};

/// A frame the decision can read and rewrite.
#[expect(
    clippy::len_without_is_empty,
    reason = "the decision only needs the length to check header bounds"
)]
pub trait Frame {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;

    /// A pointer to a `T` at `offset`, or `None` if `offset + size_of::<T>()` is past the end.
    /// Implementations must do the bounds check in a form the BPF verifier accepts.
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T>;
}

/// The agent's maps, as the decision sees them.
pub trait Tables {
    /// The VIP address filter: `false` means `addr` (an IPv4 address, or an IPv6 one folded by
    /// [`vip_filter_fold6`]) has no VIP; `true` means it may have one.
    fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool;
    /// A copy of the VIP's entry: its fields must come from one version of it, so it is read
    /// once, right after the lookup.
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    /// [`Tables::vip`] for an IPv6 VIP.
    fn vip6(&self, key: &Vip6Key) -> Option<VipInfo>;
    fn is_vip_addr(&self, key: &VipAddrKey) -> bool;
    fn is_vip_addr6(&self, key: &VipAddr6Key) -> bool;
    /// Entry `index` of the ring (a backend id, 0 = none); `None` if out of range.
    fn ring(&self, index: u32) -> Option<u32>;
    fn backend(&self, id: u32) -> Option<&BackendInfo>;
    fn settings(&self) -> Option<&Settings>;
    /// The connection table's entry for a flow. The pointer stays valid for the rest of the
    /// packet (the kernel frees LRU elements only after an RCU grace period).
    fn flow(&self, key: &FlowKey) -> Option<*mut FlowEntry>;
    /// Writes a connection-table entry; `false` if the table refused it.
    fn insert_flow(&self, key: &FlowKey, entry: &FlowEntry) -> bool;
    /// [`Tables::flow`] in the IPv6 connection table.
    fn flow6(&self, key: &Flow6Key) -> Option<*mut FlowEntry>;
    /// [`Tables::insert_flow`] into the IPv6 connection table.
    fn insert_flow6(&self, key: &Flow6Key, entry: &FlowEntry) -> bool;
    /// Whether this CPU may insert one more entry (see [`crate::flows::admit`]).
    fn admit_insert(&self, now: u64, limit: u32) -> bool;
    /// Counts a connection-table event.
    fn flow_event(&self, stat: FlowStat);
    /// The monotonic clock, in nanoseconds (`bpf_ktime_get_ns`).
    fn now_ns(&self) -> u64;
}

/// What [`process`] decided. `vip_index` and `backend_id` are meaningful when `reason` is
/// `Forwarded` (both) or `DropNoBackend` / `DropBackendInvalid` (`vip_index`, and the backend id
/// for the latter); `dst`/`dport` name the service for diagnostics once the L4 header is parsed.
/// `dst` is all zero for IPv6: a frame that is not forwarded is unchanged, so diagnostics read
/// its 16-byte address back from the frame instead of every verdict carrying it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub reason: Reason,
    pub vip_index: u32,
    pub backend_id: u32,
    pub dst: [u8; 4],
    pub dport: [u8; 2],
    /// A forwarded packet that starts a flow (a TCP SYN, or a UDP packet without a live entry),
    /// counted as a new flow of its VIP and backend.
    pub new_flow: bool,
}

impl Verdict {
    #[inline(always)]
    const fn of(reason: Reason) -> Self {
        Verdict {
            reason,
            vip_index: 0,
            backend_id: 0,
            dst: [0; 4],
            dport: [0; 2],
            new_flow: false,
        }
    }
}

pub const ETH_HDR_LEN: usize = EthHdr::LEN;
/// Where an IPv6 frame's destination address starts.
pub const IPV6_DST_OFFSET: usize = ETH_HDR_LEN + core::mem::offset_of!(Ipv6Hdr, dst_addr);
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// More-fragments flag and fragment offset bits of the IPv4 `frags` field.
const IP_MF_OFFSET_MASK: u16 = 0x3fff;
const TCP: u8 = IpProto::Tcp as u8;
/// Offset of the flags byte in the TCP header, and two of its bits.
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const UDP: u8 = IpProto::Udp as u8;
const ICMP: u8 = IpProto::Icmp as u8;
/// ICMP type "destination unreachable" (code 4: fragmentation needed, what path MTU discovery
/// listens for).
const ICMP_DEST_UNREACH: u8 = 3;
/// ICMP header: type, code, checksum, 4 bytes (unused, or next-hop MTU). ICMPv6's is the same.
const ICMP_HDR_LEN: usize = 8;
/// IPv6 extension headers the data path skips (RFC 8200 section 4).
const IPV6_HOP_OPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DEST_OPTS: u8 = 60;
const ICMPV6: u8 = 58;
/// ICMPv6 error types that quote a packet whose flow's backend must see them (RFC 4443):
/// destination unreachable, and packet too big (IPv6 path MTU discovery, RFC 8201).
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// Most IPv6 extension headers skipped before the upper-layer header. Real traffic carries one
/// or two; the bound keeps the walk unrolled and cheap to verify.
pub const IPV6_MAX_EXT_HDRS: usize = 4;

/// Decides the fate of one frame and, if it is forwarded, rewrites its MACs. See the module docs.
#[inline(always)]
pub fn process<F: Frame, T: Tables>(frame: &mut F, tables: &T) -> Verdict {
    let len = frame.len();

    // The ethertype is read as bytes: the frame may start at any alignment on the host.
    let Some(ethertype) = frame.ptr_at::<[u8; 2]>(12) else {
        return Verdict::of(Reason::DropMalformedEth);
    };
    // SAFETY: ptr_at checked the bounds; [u8; N] has alignment 1.
    match u16::from_be_bytes(unsafe { *ethertype }) {
        ETH_P_IP => {}
        ETH_P_IPV6 => {
            let mut v = Verdict::of(Reason::PassIpv6);
            process_v6_out_of_line(frame, tables, &mut v);
            return v;
        }
        ETH_P_8021Q | ETH_P_8021AD => return Verdict::of(Reason::PassVlan),
        _ => return Verdict::of(Reason::PassNotIp),
    }

    let Some(ip) = frame.ptr_at::<Ipv4Hdr>(ETH_HDR_LEN) else {
        return Verdict::of(Reason::DropMalformedIp);
    };
    // SAFETY: in bounds (checked above); Ipv4Hdr is made of bytes, alignment 1.
    let ip = unsafe { &*ip };
    let dst = ip.dst_addr;
    if !tables.maybe_vip_addr(dst) {
        return Verdict::of(Reason::PassNotVip);
    }
    if ip.vihl >> 4 != 4 {
        return Verdict::of(Reason::DropMalformedIp);
    }
    let ihl = (ip.vihl & 0x0f) as usize;
    if ihl < 5 {
        return Verdict::of(Reason::DropMalformedIp);
    }
    let ip_hdr_len = ihl * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len) as usize;
    if tot_len < ip_hdr_len || ETH_HDR_LEN + tot_len > len {
        return Verdict::of(Reason::DropMalformedIp);
    }

    let proto = ip.proto;
    if proto == ICMP && u16::from_be_bytes(ip.frags) & IP_MF_OFFSET_MASK == 0 {
        return icmp_error(
            frame,
            tables,
            ETH_HDR_LEN + ip_hdr_len,
            ip_hdr_len,
            tot_len,
            dst,
        );
    }
    if proto != TCP && proto != UDP {
        return Verdict::of(Reason::PassIpProto);
    }
    let src = ip.src_addr;

    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET_MASK != 0 {
        let mut v = Verdict::of(if tables.is_vip_addr(&VipAddrKey { addr: dst }) {
            Reason::DropFragment
        } else {
            Reason::PassNotVip
        });
        v.dst = dst;
        return v;
    }

    let Some((sport, dport, syn)) = l4_ports(
        frame,
        proto,
        ETH_HDR_LEN + ip_hdr_len,
        ETH_HDR_LEN + tot_len,
    ) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    let flow = FlowKey {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    steer(frame, tables, &flow, syn)
}

/// The ports of the TCP or UDP header at frame offset `l4`, and whether it is a TCP SYN
/// without ACK; `None` when the header is shorter than its protocol's minimum within the frame
/// or within the packet, which ends at frame offset `end` (only the ports and flags are read,
/// but a shorter header is malformed).
#[inline(always)]
fn l4_ports<F: Frame>(
    frame: &F,
    proto: u8,
    l4: usize,
    end: usize,
) -> Option<([u8; 2], [u8; 2], bool)> {
    // TCP and UDP both start with source port, destination port; the TCP flags follow. The
    // frame bounds first, then the packet's: checked after the length arithmetic, the frame
    // checks are implied by it, the compiler drops them, and the verifier needs to see them.
    let ports = frame.ptr_at::<[[u8; 2]; 2]>(l4)?;
    let syn = if proto == TCP {
        let flags = frame.ptr_at::<u8>(l4 + TCP_FLAGS_OFFSET)?;
        // SAFETY: in bounds.
        (unsafe { *flags }) & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        false
    };
    let l4_min = if proto == TCP {
        TcpHdr::LEN
    } else {
        UdpHdr::LEN
    };
    if l4 + l4_min > end {
        return None;
    }
    // SAFETY: in bounds; alignment 1.
    let [sport, dport] = unsafe { *ports };
    Some((sport, dport, syn))
}

/// [`process_v6`] in a function of its own. Inlined, the IPv6 path's code changed how the
/// compiler laid out the IPv4 path and cost every IPv4 TCP SYN about 4 ns (measured with the
/// data-path bench); the call costs the IPv6 path instead. The verdict goes through `out`: a BPF
/// function cannot return a struct.
#[inline(never)]
fn process_v6_out_of_line<F: Frame, T: Tables>(frame: &mut F, tables: &T, out: &mut Verdict) {
    *out = process_v6(frame, tables);
}

/// [`process`] for an IPv6 frame (see the module docs).
#[inline(always)]
fn process_v6<F: Frame, T: Tables>(frame: &mut F, tables: &T) -> Verdict {
    let len = frame.len();
    let Some(ip) = frame.ptr_at::<Ipv6Hdr>(ETH_HDR_LEN) else {
        return Verdict::of(Reason::DropMalformedIp);
    };
    // SAFETY: in bounds (checked above); Ipv6Hdr is made of bytes, alignment 1.
    let ip = unsafe { &*ip };
    if !tables.maybe_vip_addr(vip_filter_fold6(&ip.dst_addr)) {
        return Verdict::of(Reason::PassNotVip);
    }
    if ip.vcf[0] >> 4 != 6 {
        return Verdict::of(Reason::DropMalformedIp);
    }
    // Where the packet ends in the frame: every header must end before it.
    let end = ETH_HDR_LEN + Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    if end > len {
        return Verdict::of(Reason::DropMalformedIp);
    }

    let (proto, l4) = match ipv6_upper(frame, ip.next_hdr, end) {
        Ipv6Upper::Proto { proto, offset } => (proto, offset),
        Ipv6Upper::Fragment { next } => {
            // Which protocol the fragments carry is only known for sure from the first one;
            // an extension header after the fragment header may still lead to TCP or UDP.
            let steerable = matches!(
                next,
                TCP | UDP | IPV6_HOP_OPTS | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_DEST_OPTS
            );
            return Verdict::of(if !steerable {
                Reason::PassIpProto
            } else if tables.is_vip_addr6(&VipAddr6Key { addr: ip.dst_addr }) {
                Reason::DropFragment
            } else {
                Reason::PassNotVip
            });
        }
        Ipv6Upper::Kernel => return Verdict::of(Reason::PassIpv6),
        Ipv6Upper::Truncated => return Verdict::of(Reason::DropMalformedIp),
    };
    if proto == ICMPV6 {
        return icmp6_error(frame, tables, l4, end, &ip.dst_addr);
    }
    if proto != TCP && proto != UDP {
        return Verdict::of(Reason::PassIpProto);
    }

    let Some((sport, dport, syn)) = l4_ports(frame, proto, l4, end) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    let flow = Flow6Key {
        src: ip.src_addr,
        dst: ip.dst_addr,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    steer(frame, tables, &flow, syn)
}

/// What follows an IPv6 header once [`ipv6_upper`] has skipped its extension headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Upper {
    /// The upper-layer header: its protocol number and where it starts in the frame.
    Proto { proto: u8, offset: usize },
    /// A fragment header; `next` is its next-header field, the fragmented protocol.
    Fragment { next: u8 },
    /// Not for the data path to steer: a routing header with segments left (the packet goes
    /// on beyond the address it is sent to), or more than [`IPV6_MAX_EXT_HDRS`] extension
    /// headers to skip.
    Kernel,
    /// An extension header runs past the frame or past `end`.
    Truncated,
}

/// Skips the extension headers after an IPv6 header: hop-by-hop and destination options, and
/// routing headers with no segments left, at most [`IPV6_MAX_EXT_HDRS`]. `next` is the IPv6
/// header's next-header field; the chain starts right after the header and must end before
/// `end` (the end of the packet in the frame, at most the frame's length).
#[inline(always)]
pub fn ipv6_upper<F: Frame>(frame: &F, next: u8, end: usize) -> Ipv6Upper {
    let mut next = next;
    let mut off = ETH_HDR_LEN + Ipv6Hdr::LEN;
    // One position more than headers skipped: a fragment header there is still recognised
    // (it is read, not skipped), so a fragment is never mistaken for something to pass.
    for i in 0..=IPV6_MAX_EXT_HDRS {
        match next {
            IPV6_HOP_OPTS | IPV6_ROUTING | IPV6_DEST_OPTS if i < IPV6_MAX_EXT_HDRS => {
                // Next header, length in 8-byte units after the first 8, and for a routing
                // header its type and segments left. Every extension header has at least 8
                // bytes; the frame bounds first (see process_v6), then the packet's.
                let Some(h) = frame.ptr_at::<[u8; 4]>(off) else {
                    return Ipv6Upper::Truncated;
                };
                // SAFETY: in bounds; alignment 1.
                let h = unsafe { *h };
                let hdr_len = (h[1] as usize + 1) * 8;
                if off + hdr_len > end {
                    return Ipv6Upper::Truncated;
                }
                if next == IPV6_ROUTING && h[3] != 0 {
                    return Ipv6Upper::Kernel;
                }
                next = h[0];
                off += hdr_len;
            }
            IPV6_HOP_OPTS | IPV6_ROUTING | IPV6_DEST_OPTS => return Ipv6Upper::Kernel,
            IPV6_FRAGMENT => {
                // Fixed 8 bytes: next header, reserved, offset and flags, identification.
                let Some(h) = frame.ptr_at::<[u8; 8]>(off) else {
                    return Ipv6Upper::Truncated;
                };
                if off + 8 > end {
                    return Ipv6Upper::Truncated;
                }
                // SAFETY: in bounds; alignment 1.
                return Ipv6Upper::Fragment {
                    next: unsafe { (*h)[0] },
                };
            }
            proto => return Ipv6Upper::Proto { proto, offset: off },
        }
    }
    // Unreachable: the last position returns in every arm.
    Ipv6Upper::Kernel
}

/// An ICMP message to a VIP address. A destination-unreachable error quotes the packet that
/// caused it: with direct server return that is a backend's reply, sent from the VIP to the
/// client, so the error comes to the VIP, and only the backend that owns the flow can act on it
/// (path MTU discovery needs "fragmentation needed" to reach it). The quoted header names the
/// flow (client = quoted destination); the frame goes to the backend the connection table
/// remembers for it, else to the one the VIP's table picks, without remembering anything
/// ([`steer_quoted`]). Everything else (echo requests, other types) is the kernel's: the
/// master's stack answers pings to the VIP. A quoted header too short to name a flow is
/// malformed.
#[inline(always)]
fn icmp_error<F: Frame, T: Tables>(
    frame: &mut F,
    tables: &T,
    l4: usize,
    ip_hdr_len: usize,
    tot_len: usize,
    dst: [u8; 4],
) -> Verdict {
    let Some(icmp_type) = frame.ptr_at::<u8>(l4) else {
        return Verdict::of(Reason::PassIpProto);
    };
    // SAFETY: in bounds.
    if unsafe { *icmp_type } != ICMP_DEST_UNREACH {
        return Verdict::of(Reason::PassIpProto);
    }
    // The quoted IPv4 header and the first 8 bytes after it (RFC 792): the ports.
    // The frame bounds first: checked after the length arithmetic below, the compiler would
    // drop them as implied, and the verifier needs to see them.
    let quoted = l4 + ICMP_HDR_LEN;
    let Some(q) = frame.ptr_at::<Ipv4Hdr>(quoted) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    if ip_hdr_len + ICMP_HDR_LEN + Ipv4Hdr::LEN + 4 > tot_len {
        return Verdict::of(Reason::DropMalformedL4);
    }
    // SAFETY: in bounds; alignment 1.
    let q = unsafe { &*q };
    let q_ihl = (q.vihl & 0x0f) as usize;
    let q_proto = q.proto;
    if q.vihl >> 4 != 4 || q_ihl < 5 {
        return Verdict::of(Reason::DropMalformedL4);
    }
    // Not about a TCP/UDP packet the VIP sent (its source would be the address this error came
    // to): the kernel's, like the host's own traffic.
    if (q_proto != TCP && q_proto != UDP) || q.src_addr != dst {
        return Verdict::of(Reason::PassIpProto);
    }
    let q_l4 = quoted + q_ihl * 4;
    let Some(ports) = frame.ptr_at::<[[u8; 2]; 2]>(q_l4) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    if ip_hdr_len + ICMP_HDR_LEN + q_ihl * 4 + 4 > tot_len {
        return Verdict::of(Reason::DropMalformedL4);
    }
    // SAFETY: in bounds; alignment 1.
    let [vport, cport] = unsafe { *ports };
    let flow = FlowKey {
        src: q.dst_addr,
        dst,
        sport: cport,
        dport: vport,
        proto: q_proto,
        _pad: [0; 3],
    };
    steer_quoted(frame, tables, &flow)
}

/// [`icmp_error`] for ICMPv6: destination unreachable and packet too big (what IPv6 path MTU
/// discovery listens for) are the errors a backend must see. `l4` is the ICMPv6 header,
/// `end` the end of the packet in the frame, `dst` the VIP address it was sent to. The quoted
/// packet's flow is named by its first header: a quote with extension headers is passed.
#[inline(always)]
fn icmp6_error<F: Frame, T: Tables>(
    frame: &mut F,
    tables: &T,
    l4: usize,
    end: usize,
    dst: &[u8; 16],
) -> Verdict {
    // Type and code, though only the type is used: the bounds check of a single byte at a
    // variable offset compiles to `start + l4 >= end`, from which the verifier learns no range.
    let Some(icmp_type) = frame.ptr_at::<[u8; 2]>(l4) else {
        return Verdict::of(Reason::PassIpProto);
    };
    // SAFETY: in bounds; alignment 1.
    let icmp_type = unsafe { (*icmp_type)[0] };
    if icmp_type != ICMPV6_DEST_UNREACH && icmp_type != ICMPV6_PACKET_TOO_BIG {
        return Verdict::of(Reason::PassIpProto);
    }
    // The quoted IPv6 header and the ports after it. The frame bounds first (see icmp_error).
    let quoted = l4 + ICMP_HDR_LEN;
    let Some(q) = frame.ptr_at::<Ipv6Hdr>(quoted) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    let Some(ports) = frame.ptr_at::<[[u8; 2]; 2]>(quoted + Ipv6Hdr::LEN) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    if quoted + Ipv6Hdr::LEN + 4 > end {
        return Verdict::of(Reason::DropMalformedL4);
    }
    // SAFETY: in bounds; alignment 1.
    let q = unsafe { &*q };
    if q.vcf[0] >> 4 != 6 {
        return Verdict::of(Reason::DropMalformedL4);
    }
    let q_proto = q.next_hdr;
    if (q_proto != TCP && q_proto != UDP) || !same_bytes(&q.src_addr, dst) {
        return Verdict::of(Reason::PassIpProto);
    }
    // SAFETY: in bounds; alignment 1.
    let [vport, cport] = unsafe { *ports };
    let flow = Flow6Key {
        src: q.dst_addr,
        dst: *dst,
        sport: cport,
        dport: vport,
        proto: q_proto,
        _pad: [0; 3],
    };
    steer_quoted(frame, tables, &flow)
}

/// A connection-table key of either address family, as the steering shared by both sees it:
/// the VIP it is addressed to, its slot in that VIP's table, and its connection table.
pub trait FlowTuple {
    /// IP protocol number (TCP or UDP).
    fn proto(&self) -> u8;
    /// The VIP's port, network byte order.
    fn vip_port(&self) -> [u8; 2];
    /// [`Verdict::dst`] for this flow.
    fn verdict_dst(&self) -> [u8; 4];
    /// The entry of the VIP the flow is addressed to.
    fn vip<T: Tables>(&self, tables: &T) -> Option<VipInfo>;
    /// That VIP as [`BackendInfo::vip`] names it.
    fn vip_word(&self) -> u64;
    /// The flow's slot in a table of `ring_size` (non-zero) entries.
    fn slot(&self, ring_size: u32) -> u32;
    /// The flow's entry in its family's connection table (see [`Tables::flow`]).
    fn remembered<T: Tables>(&self, tables: &T) -> Option<*mut FlowEntry>;
    /// Writes the flow's entry; `false` if the table refused it.
    fn remember<T: Tables>(&self, tables: &T, entry: &FlowEntry) -> bool;
}

impl FlowKey {
    #[inline(always)]
    fn vip_key(&self) -> VipKey {
        VipKey {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        }
    }
}

impl FlowTuple for FlowKey {
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn vip_port(&self) -> [u8; 2] {
        self.dport
    }
    #[inline(always)]
    fn verdict_dst(&self) -> [u8; 4] {
        self.dst
    }
    #[inline(always)]
    fn vip<T: Tables>(&self, tables: &T) -> Option<VipInfo> {
        tables.vip(&self.vip_key())
    }
    #[inline(always)]
    fn vip_word(&self) -> u64 {
        vip_key_word(&self.vip_key())
    }
    #[inline(always)]
    fn slot(&self, ring_size: u32) -> u32 {
        flow_slot_v4(
            self.src, self.dst, self.sport, self.dport, self.proto, ring_size,
        )
    }
    #[inline(always)]
    fn remembered<T: Tables>(&self, tables: &T) -> Option<*mut FlowEntry> {
        tables.flow(self)
    }
    #[inline(always)]
    fn remember<T: Tables>(&self, tables: &T, entry: &FlowEntry) -> bool {
        tables.insert_flow(self, entry)
    }
}

impl Flow6Key {
    #[inline(always)]
    fn vip_key(&self) -> Vip6Key {
        Vip6Key {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            _pad: 0,
        }
    }
}

impl FlowTuple for Flow6Key {
    #[inline(always)]
    fn proto(&self) -> u8 {
        self.proto
    }
    #[inline(always)]
    fn vip_port(&self) -> [u8; 2] {
        self.dport
    }
    #[inline(always)]
    fn verdict_dst(&self) -> [u8; 4] {
        [0; 4]
    }
    #[inline(always)]
    fn vip<T: Tables>(&self, tables: &T) -> Option<VipInfo> {
        tables.vip6(&self.vip_key())
    }
    #[inline(always)]
    fn vip_word(&self) -> u64 {
        vip6_key_word(&self.vip_key())
    }
    #[inline(always)]
    fn slot(&self, ring_size: u32) -> u32 {
        flow_slot_v6(
            &self.src, &self.dst, self.sport, self.dport, self.proto, ring_size,
        )
    }
    #[inline(always)]
    fn remembered<T: Tables>(&self, tables: &T) -> Option<*mut FlowEntry> {
        tables.flow6(self)
    }
    #[inline(always)]
    fn remember<T: Tables>(&self, tables: &T, entry: &FlowEntry) -> bool {
        tables.insert_flow6(self, entry)
    }
}

/// A TCP/UDP packet of `flow` to a VIP address, `syn` if it opens a TCP connection: sent to
/// the backend the connection table remembers while it may keep the flow, else to the one the
/// VIP's table picks, remembered from then on (see [`crate::flows`]).
#[inline(always)]
fn steer<F: Frame, T: Tables, K: FlowTuple>(
    frame: &mut F,
    tables: &T,
    flow: &K,
    syn: bool,
) -> Verdict {
    let udp = flow.proto() == UDP;
    let dst = flow.verdict_dst();
    let dport = flow.vip_port();
    // The connection table first, before the VIP is even looked up: an established flow costs
    // one hash lookup, and keeps its backend even when the VIP's table no longer has it
    // (drained) or is empty (every backend drained). See crate::flows. Events are counted only
    // once the packet is known to be for a VIP.
    // The clock, read only on the paths that need it.
    let mut now = 0;
    let mut new_flow = syn;
    let lookup = if syn {
        FlowStat::Syn
    } else if let Some(entry) = flow.remembered(tables) {
        // SAFETY: a valid map value for the rest of the packet (see Tables::flow).
        let entry = unsafe { &mut *entry };
        let id = entry.backend_id;
        let mut expired = false;
        let mut refresh = false;
        if udp {
            now = tables.now_ns();
            let timeout = tables.settings().map_or(0, |s| s.flow_udp_timeout_ns);
            let idle = now.wrapping_sub(entry.atime);
            expired = timeout != 0 && idle > timeout;
            refresh = crate::flows::atime_refresh_due(idle, timeout);
        }
        if expired {
            new_flow = true;
            FlowStat::Expired
        } else {
            if let Some(backend) = tables.backend(id)
                && honours(backend, flow)
            {
                if !for_us(frame, backend, tables) {
                    return Verdict::of(Reason::PassOtherHost);
                }
                if refresh {
                    entry.atime = now;
                }
                tables.flow_event(FlowStat::Hit);
                let v = Verdict {
                    reason: Reason::Forwarded,
                    vip_index: backend.vip_index,
                    backend_id: id,
                    dst,
                    dport,
                    new_flow: false,
                };
                return forward(frame, backend, v);
            }
            FlowStat::Remapped
        }
    } else {
        new_flow = udp;
        FlowStat::Miss
    };

    let Some(vip) = flow.vip(tables) else {
        return Verdict::of(Reason::PassNotVip);
    };
    tables.flow_event(lookup);
    let mut v = Verdict {
        reason: Reason::DropNoBackend,
        vip_index: vip.vip_index,
        backend_id: 0,
        dst,
        dport,
        new_flow,
    };

    let Some(backend) = table_pick(tables, &vip, flow, &mut v) else {
        return v;
    };
    let backend_id = v.backend_id;
    if !for_us(frame, backend, tables) {
        return Verdict::of(Reason::PassOtherHost);
    }
    if now == 0 {
        now = tables.now_ns();
    }
    let limit = tables.settings().map_or(0, |s| s.flow_insert_rate);
    if !tables.admit_insert(now, limit) {
        tables.flow_event(FlowStat::RateLimited);
    } else if flow.remember(
        tables,
        &FlowEntry {
            backend_id,
            _pad: 0,
            atime: now,
        },
    ) {
        tables.flow_event(FlowStat::Insert);
    } else {
        tables.flow_event(FlowStat::InsertFailed);
    }
    forward(frame, backend, v)
}

/// An ICMP error about `flow` (see [`icmp_error`]): to the backend the connection table
/// remembers for it while it may keep the flow, else to the one the VIP's table picks. Nothing
/// is remembered or counted as a connection-table event: the error is not part of the flow.
#[inline(always)]
fn steer_quoted<F: Frame, T: Tables, K: FlowTuple>(frame: &mut F, tables: &T, flow: &K) -> Verdict {
    let dst = flow.verdict_dst();
    let dport = flow.vip_port();
    if let Some(entry) = flow.remembered(tables) {
        // SAFETY: a valid map value for the rest of the packet (see Tables::flow).
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = tables.backend(id)
            && honours(backend, flow)
        {
            if !for_us(frame, backend, tables) {
                return Verdict::of(Reason::PassOtherHost);
            }
            let v = Verdict {
                reason: Reason::Forwarded,
                vip_index: backend.vip_index,
                backend_id: id,
                dst,
                dport,
                new_flow: false,
            };
            return forward(frame, backend, v);
        }
    }
    let Some(vip) = flow.vip(tables) else {
        return Verdict::of(Reason::PassNotVip);
    };
    let mut v = Verdict {
        reason: Reason::DropNoBackend,
        vip_index: vip.vip_index,
        backend_id: 0,
        dst,
        dport,
        new_flow: false,
    };
    let Some(backend) = table_pick(tables, &vip, flow, &mut v) else {
        return v;
    };
    if !for_us(frame, backend, tables) {
        return Verdict::of(Reason::PassOtherHost);
    }
    forward(frame, backend, v)
}

/// Whether two byte strings are equal, byte by byte without a branch per byte (an array
/// comparison compiles to a call to memcmp in BPF).
#[inline(always)]
fn same_bytes<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let mut diff = 0u8;
    for i in 0..N {
        diff |= a[i] ^ b[i];
    }
    diff == 0
}

/// Whether a connection-table entry's backend may keep its flow: ready, not marked down, and
/// still a backend of the flow's VIP (see [`crate::flows`]).
#[inline(always)]
fn honours<K: FlowTuple>(backend: &BackendInfo, flow: &K) -> bool {
    backend.flags & (BACKEND_F_READY | BACKEND_F_DOWN) == BACKEND_F_READY
        && backend.vip == flow.vip_word()
}

/// The backend `vip`'s table picks for `flow`. Without one, `v` (a `DropNoBackend` verdict for
/// the VIP) says why: an empty table or slot, or a slot naming a backend that cannot be used,
/// whose id it then carries.
#[inline(always)]
fn table_pick<'t, T: Tables, K: FlowTuple>(
    tables: &'t T,
    vip: &VipInfo,
    flow: &K,
    v: &mut Verdict,
) -> Option<&'t BackendInfo> {
    if vip.ring_size == 0 {
        return None;
    }
    let slot = flow.slot(vip.ring_size);
    let Some(backend_id) = tables.ring(vip.ring_base.wrapping_add(slot)) else {
        v.reason = Reason::DropInternal;
        return None;
    };
    if backend_id == 0 {
        return None;
    }
    v.backend_id = backend_id;
    let Some(backend) = tables.backend(backend_id) else {
        v.reason = Reason::DropInternal;
        return None;
    };
    if backend.flags & BACKEND_F_READY == 0 {
        v.reason = Reason::DropBackendInvalid;
        return None;
    }
    Some(backend)
}

/// Whether the frame is addressed to this host: to the interface's MAC (every backend entry
/// carries it as its source MAC, so the common case needs no settings lookup) or to the
/// alternative MAC in the settings.
#[inline(always)]
fn for_us<F: Frame, T: Tables>(frame: &F, backend: &BackendInfo, tables: &T) -> bool {
    let Some(dst) = frame.ptr_at::<[u8; 6]>(0) else {
        return false;
    };
    // SAFETY: in bounds; alignment 1.
    let dst = unsafe { &*dst };
    same_bytes(dst, &backend.src_mac)
        || tables.settings().is_some_and(|s| {
            let a = &s.alt_mac;
            (a[0] | a[1] | a[2] | a[3] | a[4] | a[5]) != 0 && same_bytes(dst, a)
        })
}

/// Rewrites the frame's MACs towards `backend` and returns `v` as forwarded.
#[inline(always)]
fn forward<F: Frame>(frame: &mut F, backend: &BackendInfo, mut v: Verdict) -> Verdict {
    let Some(macs) = frame.ptr_at::<[[u8; 6]; 2]>(0) else {
        // Unreachable (the IP header was read past these bytes); the verifier needs the check.
        v.reason = Reason::DropMalformedEth;
        v.new_flow = false;
        return v;
    };
    // SAFETY: in bounds; alignment 1; nothing else refers to the frame's bytes.
    unsafe {
        let macs = &mut *macs;
        #[expect(
            clippy::needless_range_loop,
            reason = "byte by byte on purpose: an aggregate or iterator copy compiles to a call to \
                      memcpy in BPF, which costs a function call per packet"
        )]
        for i in 0..6 {
            macs[0][i] = backend.mac[i];
            macs[1][i] = backend.src_mac[i];
        }
    }
    v.reason = Reason::Forwarded;
    v
}

/// A [`Frame`] over a byte slice, for host tests and tools.
pub struct SliceFrame<'a> {
    // A raw pointer taken from the `&mut` slice, so writes through `ptr_at` are permitted.
    ptr: *mut u8,
    len: usize,
    _buf: core::marker::PhantomData<&'a mut [u8]>,
}

impl<'a> SliceFrame<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceFrame {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            _buf: core::marker::PhantomData,
        }
    }
}

impl Frame for SliceFrame<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        if end > self.len {
            return None;
        }
        // Callers only use byte-array and byte-struct types (alignment 1).
        Some(self.ptr.wrapping_add(offset).cast())
    }
}

#[cfg(test)]
mod tests {
    use core::cell::RefCell;
    use std::{boxed::Box, collections::BTreeMap, vec, vec::Vec};

    use super::*;
    use crate::maps::{FlowRate, vip6_key_word};

    const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const VIP6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64];
    const CLIENT6: [u8; 16] = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    /// Backend 1: every slot of the VIP's table. Backend 2: in no slot (drained).
    const MAC_B1: [u8; 6] = [2, 0, 0, 0, 0, 0x0b];
    const MAC_B2: [u8; 6] = [2, 0, 0, 0, 0, 0x0c];
    const RING: [u32; 7] = [1; 7];

    fn vip_key(port: u16) -> Vip6Key {
        Vip6Key {
            addr: VIP6,
            port: port.to_be_bytes(),
            proto: TCP,
            _pad: 0,
        }
    }

    fn flow(sport: u16) -> Flow6Key {
        Flow6Key {
            src: CLIENT6,
            dst: VIP6,
            sport: sport.to_be_bytes(),
            dport: 80u16.to_be_bytes(),
            proto: TCP,
            _pad: [0; 3],
        }
    }

    /// One IPv6 VIP, [VIP6]:80/tcp, whose table sends everything to backend 1.
    struct V6Tables {
        backends: [BackendInfo; 3],
        flows6: RefCell<BTreeMap<Flow6Key, Box<FlowEntry>>>,
        rate: RefCell<FlowRate>,
        events: RefCell<[u64; FlowStat::COUNT as usize]>,
    }

    impl V6Tables {
        fn new() -> Self {
            let backend = |mac| BackendInfo {
                mac,
                flags: BACKEND_F_READY,
                src_mac: LB_MAC,
                _pad: [0; 2],
                addr: [0; 4],
                vip_index: 7,
                vip: vip6_key_word(&vip_key(80)),
            };
            V6Tables {
                backends: [BackendInfo::default(), backend(MAC_B1), backend(MAC_B2)],
                flows6: RefCell::new(BTreeMap::new()),
                rate: RefCell::new(FlowRate::default()),
                events: RefCell::new([0; FlowStat::COUNT as usize]),
            }
        }

        fn remember(&self, flow: Flow6Key, backend_id: u32) {
            self.flows6.borrow_mut().insert(
                flow,
                Box::new(FlowEntry {
                    backend_id,
                    _pad: 0,
                    atime: 1,
                }),
            );
        }

        fn events(&self) -> Vec<FlowStat> {
            FlowStat::ALL
                .into_iter()
                .filter(|e| self.events.borrow()[*e as usize] > 0)
                .collect()
        }
    }

    impl Tables for V6Tables {
        fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool {
            addr == vip_filter_fold6(&VIP6)
        }
        fn vip(&self, _: &VipKey) -> Option<VipInfo> {
            None
        }
        fn vip6(&self, key: &Vip6Key) -> Option<VipInfo> {
            (*key == vip_key(80)).then_some(VipInfo {
                vip_index: 7,
                ring_base: 0,
                ring_size: RING.len() as u32,
                flags: 0,
            })
        }
        fn is_vip_addr(&self, _: &VipAddrKey) -> bool {
            false
        }
        fn is_vip_addr6(&self, key: &VipAddr6Key) -> bool {
            key.addr == VIP6
        }
        fn ring(&self, index: u32) -> Option<u32> {
            RING.get(index as usize).copied()
        }
        fn backend(&self, id: u32) -> Option<&BackendInfo> {
            self.backends.get(id as usize)
        }
        fn settings(&self) -> Option<&Settings> {
            None
        }
        fn flow(&self, _: &FlowKey) -> Option<*mut FlowEntry> {
            None
        }
        fn insert_flow(&self, _: &FlowKey, _: &FlowEntry) -> bool {
            panic!("an IPv6 flow written to the IPv4 table")
        }
        fn flow6(&self, key: &Flow6Key) -> Option<*mut FlowEntry> {
            let mut flows = self.flows6.borrow_mut();
            flows.get_mut(key).map(|b| &mut **b as *mut FlowEntry)
        }
        fn insert_flow6(&self, key: &Flow6Key, entry: &FlowEntry) -> bool {
            self.flows6.borrow_mut().insert(*key, Box::new(*entry));
            true
        }
        fn admit_insert(&self, now: u64, limit: u32) -> bool {
            crate::flows::admit(&mut self.rate.borrow_mut(), now, limit)
        }
        fn flow_event(&self, stat: FlowStat) {
            self.events.borrow_mut()[stat as usize] += 1;
        }
        fn now_ns(&self) -> u64 {
            1_000_000_000_000
        }
    }

    /// An extension header of `units` 8-byte units after the first 8; `segments_left` only
    /// means something in a routing header.
    fn ext(next: u8, units: u8, segments_left: u8) -> Vec<u8> {
        let mut h = vec![0; (units as usize + 1) * 8];
        h[0] = next;
        h[1] = units;
        h[3] = segments_left;
        h
    }

    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    /// An IPv6 frame from CLIENT6 to `dst` whose payload (extension headers and upper layer)
    /// starts with a header of type `next`.
    fn frame6(dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&LB_MAC);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        f.push(next);
        f.push(64);
        f.extend_from_slice(&CLIENT6);
        f.extend_from_slice(&dst);
        f.extend_from_slice(payload);
        f
    }

    fn upper(payload: &[u8], next: u8) -> Ipv6Upper {
        let mut f = frame6(VIP6, next, payload);
        let end = f.len();
        ipv6_upper(&SliceFrame::new(&mut f), next, end)
    }

    fn run(tables: &V6Tables, mut frame: Vec<u8>) -> (Verdict, Vec<u8>) {
        let v = process(&mut SliceFrame::new(&mut frame), tables);
        (v, frame)
    }

    const L4: usize = ETH_HDR_LEN + Ipv6Hdr::LEN;

    #[test]
    fn walker_finds_the_upper_layer_after_skippable_headers() {
        let t = tcp(1, 80, TCP_SYN);
        assert_eq!(
            upper(&t, TCP),
            Ipv6Upper::Proto {
                proto: TCP,
                offset: L4
            }
        );
        let chain = [
            ext(IPV6_DEST_OPTS, 0, 0),
            ext(IPV6_ROUTING, 1, 0),
            ext(TCP, 0, 0),
        ]
        .concat();
        assert_eq!(
            upper(&[chain, t.clone()].concat(), IPV6_HOP_OPTS),
            Ipv6Upper::Proto {
                proto: TCP,
                offset: L4 + 8 + 16 + 8
            }
        );
    }

    #[test]
    fn walker_bounds_the_chain() {
        let four: Vec<u8> = [
            ext(IPV6_DEST_OPTS, 0, 0),
            ext(IPV6_DEST_OPTS, 0, 0),
            ext(IPV6_DEST_OPTS, 0, 0),
        ]
        .concat();
        let t = tcp(1, 80, TCP_SYN);
        let ok = [four.clone(), ext(TCP, 0, 0), t.clone()].concat();
        assert_eq!(
            upper(&ok, IPV6_HOP_OPTS),
            Ipv6Upper::Proto {
                proto: TCP,
                offset: L4 + 4 * 8
            }
        );
        let five = [four.clone(), ext(IPV6_DEST_OPTS, 0, 0), ext(TCP, 0, 0), t].concat();
        assert_eq!(upper(&five, IPV6_HOP_OPTS), Ipv6Upper::Kernel);
        // A fragment header after the longest chain is still seen as a fragment.
        let frag = [four, ext(IPV6_FRAGMENT, 0, 0), ext(TCP, 0, 0)].concat();
        assert_eq!(
            upper(&frag, IPV6_HOP_OPTS),
            Ipv6Upper::Fragment { next: TCP }
        );
    }

    #[test]
    fn walker_passes_routing_with_segments_left_and_stops_at_truncation() {
        let t = tcp(1, 80, TCP_SYN);
        assert_eq!(
            upper(&[ext(TCP, 2, 1), t.clone()].concat(), IPV6_ROUTING),
            Ipv6Upper::Kernel
        );
        // A header that ends exactly at the packet's end is whole.
        assert_eq!(
            upper(&ext(TCP, 0, 0), 0),
            Ipv6Upper::Proto {
                proto: TCP,
                offset: L4 + 8
            }
        );
        // Claims 16 bytes, has 8.
        let mut short = ext(TCP, 1, 0);
        short.truncate(8);
        assert_eq!(upper(&short, IPV6_DEST_OPTS), Ipv6Upper::Truncated);
        assert_eq!(upper(&[0, 0], IPV6_DEST_OPTS), Ipv6Upper::Truncated);
        assert_eq!(upper(&[TCP, 0, 0, 0], IPV6_FRAGMENT), Ipv6Upper::Truncated);
        // Within the frame but past the packet's end.
        let mut f = frame6(VIP6, IPV6_DEST_OPTS, &[ext(TCP, 1, 0), t].concat());
        assert_eq!(
            ipv6_upper(&SliceFrame::new(&mut f), IPV6_DEST_OPTS, L4 + 8),
            Ipv6Upper::Truncated
        );
    }

    #[test]
    fn syn_is_decided_by_the_table_and_remembered_in_the_ipv6_table() {
        let tables = V6Tables::new();
        let (v, out) = run(&tables, frame6(VIP6, TCP, &tcp(40000, 80, TCP_SYN)));
        assert_eq!(
            (v.reason, v.vip_index, v.backend_id),
            (Reason::Forwarded, 7, 1)
        );
        assert!(v.new_flow);
        assert_eq!(out[0..6], MAC_B1);
        assert_eq!(out[6..12], LB_MAC);
        assert_eq!(tables.events(), [FlowStat::Syn, FlowStat::Insert]);
        assert_eq!(tables.flows6.borrow()[&flow(40000)].backend_id, 1);
    }

    #[test]
    fn established_flow_keeps_its_backend_unless_it_is_another_vips() {
        let tables = V6Tables::new();
        tables.remember(flow(40001), 2);
        let (v, out) = run(&tables, frame6(VIP6, TCP, &tcp(40001, 80, TCP_ACK)));
        assert_eq!(
            (v.reason, v.backend_id, v.new_flow),
            (Reason::Forwarded, 2, false)
        );
        assert_eq!(out[0..6], MAC_B2);
        assert_eq!(tables.events(), [FlowStat::Hit]);

        // The same backend id, now of an IPv4 VIP with the same address bytes folded: the
        // tagged word tells them apart, the table decides again.
        let mut tables = V6Tables::new();
        tables.backends[2].vip = vip_key_word(&VipKey {
            addr: vip_filter_fold6(&VIP6),
            port: 80u16.to_be_bytes(),
            proto: TCP,
            _pad: 0,
        });
        tables.remember(flow(40001), 2);
        let (v, _) = run(&tables, frame6(VIP6, TCP, &tcp(40001, 80, TCP_ACK)));
        assert_eq!((v.reason, v.backend_id), (Reason::Forwarded, 1));
        assert_eq!(tables.events(), [FlowStat::Insert, FlowStat::Remapped]);
    }

    #[test]
    fn unusual_ipv6_frames_have_their_outcomes() {
        let tables = V6Tables::new();
        let syn = tcp(40000, 80, TCP_SYN);
        let reason = |f: Vec<u8>| run(&tables, f).0.reason;
        let other = {
            let mut a = VIP6;
            a[15] = 0x65;
            a
        };
        assert_eq!(reason(frame6(other, TCP, &syn)), Reason::PassNotVip);
        assert_eq!(
            reason(frame6(VIP6, TCP, &tcp(40000, 22, TCP_SYN))),
            Reason::PassNotVip
        );
        let mut v4 = frame6(VIP6, TCP, &syn);
        v4[ETH_HDR_LEN] = 0x40;
        assert_eq!(reason(v4), Reason::DropMalformedIp);
        let mut long = frame6(VIP6, TCP, &syn);
        long[ETH_HDR_LEN + 5] += 1;
        assert_eq!(reason(long), Reason::DropMalformedIp);
        let mut padded = frame6(VIP6, TCP, &syn);
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(reason(padded), Reason::Forwarded);
        assert_eq!(
            reason(frame6(VIP6, TCP, &syn)[..ETH_HDR_LEN + 39].to_vec()),
            Reason::DropMalformedIp
        );
        assert_eq!(
            reason(frame6(VIP6, TCP, &syn[..19])),
            Reason::DropMalformedL4
        );
        assert_eq!(
            reason(frame6(
                VIP6,
                IPV6_FRAGMENT,
                &[ext(TCP, 0, 0), syn.clone()].concat()
            )),
            Reason::DropFragment
        );
        assert_eq!(
            reason(frame6(
                VIP6,
                IPV6_FRAGMENT,
                &[ext(ICMPV6, 0, 0), vec![128; 8]].concat()
            )),
            Reason::PassIpProto
        );
        assert_eq!(reason(frame6(VIP6, 50, &[0; 16])), Reason::PassIpProto);
        assert_eq!(reason(frame6(VIP6, 59, &[])), Reason::PassIpProto);
        // Echo request, neighbour solicitation: the kernel's.
        for t in [128u8, 135] {
            assert_eq!(
                reason(frame6(VIP6, ICMPV6, &[t, 0, 0, 0, 0, 0, 0, 0])),
                Reason::PassIpProto
            );
        }
    }

    /// A packet-too-big error from a router about a packet `from` sent to the client.
    fn packet_too_big(from: [u8; 16], quoted_next: u8, quoted_len: usize) -> Vec<u8> {
        let mut m = vec![ICMPV6_PACKET_TOO_BIG, 0, 0, 0, 0, 0, 0x05, 0x00];
        m.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, quoted_next, 64]);
        m.extend_from_slice(&from);
        m.extend_from_slice(&CLIENT6);
        m.extend_from_slice(&tcp(80, 40002, TCP_ACK));
        m.truncate(8 + quoted_len);
        frame6(VIP6, ICMPV6, &m)
    }

    #[test]
    fn packet_too_big_goes_to_the_quoted_flows_backend() {
        let tables = V6Tables::new();
        tables.remember(flow(40002), 2);
        let (v, out) = run(&tables, packet_too_big(VIP6, TCP, 60));
        assert_eq!(
            (v.reason, v.backend_id, v.new_flow),
            (Reason::Forwarded, 2, false)
        );
        assert_eq!(out[0..6], MAC_B2);
        assert!(tables.events().is_empty(), "not part of the flow");

        let tables = V6Tables::new();
        let (v, _) = run(&tables, packet_too_big(VIP6, TCP, 44));
        assert_eq!((v.reason, v.backend_id), (Reason::Forwarded, 1));
        assert!(tables.flows6.borrow().is_empty(), "nothing remembered");

        let reason = |f: Vec<u8>| run(&tables, f).0.reason;
        assert_eq!(
            reason(packet_too_big(VIP6, TCP, 43)),
            Reason::DropMalformedL4
        );
        assert_eq!(
            reason(packet_too_big(CLIENT6, TCP, 60)),
            Reason::PassIpProto
        );
        assert_eq!(
            reason(packet_too_big(VIP6, IPV6_DEST_OPTS, 60)),
            Reason::PassIpProto
        );
    }
}
