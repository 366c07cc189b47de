//! The per-packet decision, shared by the kernel and the host tests.
//!
//! [`process`] parses one Ethernet frame, decides what happens to it and, when it is forwarded,
//! rewrites its MAC addresses in place. It reads the frame through [`Frame`] and the agent's maps
//! through [`Tables`]; `lb-ebpf` implements both over `XdpContext` and the BPF maps, the tests over
//! a byte slice and plain collections. Counting is the caller's job, from the returned [`Verdict`].
//!
//! Guarantees:
//! - every read is bounds-checked through [`Frame::ptr_at`]; there are no panics and no loops;
//! - only a forwarded frame is modified, and only its two MAC addresses;
//! - the outcome of every frame is one [`Reason`] (see its docs for the full list of cases);
//! - a packet for a VIP goes to the backend the connection table remembers for its flow while
//!   that backend may keep it, else to the one its VIP's table picks (see [`crate::flows`] for
//!   the rules); the table is consulted before the VIP's table, so established flows keep going
//!   even when that table is empty (every backend drained).
//!
//! Defined outcomes for unusual frames:
//! - shorter than 14 bytes: `DropMalformedEth`; ARP and other non-IP: `PassNotIp`; IPv6:
//!   `PassIpv6`; 802.1Q/802.1ad tagged: `PassVlan`.
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

use network_types::{
    eth::EthHdr,
    ip::{IpProto, Ipv4Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::{
    Reason,
    flows::FlowStat,
    hash::flow_slot_v4,
    maps::{
        BACKEND_F_DOWN, BACKEND_F_READY, BackendInfo, FlowEntry, FlowKey, Settings, VipAddrKey,
        VipInfo, VipKey, vip_key_word,
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
    /// The VIP address filter: `false` means `addr` has no VIP; `true` means it may have one.
    fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool;
    /// A copy of the VIP's entry: its fields must come from one version of it, so it is read
    /// once, right after the lookup.
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    fn is_vip_addr(&self, key: &VipAddrKey) -> bool;
    /// Entry `index` of the ring (a backend id, 0 = none); `None` if out of range.
    fn ring(&self, index: u32) -> Option<u32>;
    fn backend(&self, id: u32) -> Option<&BackendInfo>;
    fn settings(&self) -> Option<&Settings>;
    /// The connection table's entry for a flow. The pointer stays valid for the rest of the
    /// packet (the kernel frees LRU elements only after an RCU grace period).
    fn flow(&self, key: &FlowKey) -> Option<*mut FlowEntry>;
    /// Writes a connection-table entry; `false` if the table refused it.
    fn insert_flow(&self, key: &FlowKey, entry: &FlowEntry) -> bool;
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
/// ICMP header: type, code, checksum, 4 bytes (unused, or next-hop MTU).
const ICMP_HDR_LEN: usize = 8;

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
        ETH_P_IPV6 => return Verdict::of(Reason::PassIpv6),
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

    // Only the ports are needed, but a header shorter than the protocol's minimum is malformed.
    let l4 = ETH_HDR_LEN + ip_hdr_len;
    let l4_min = if proto == TCP {
        TcpHdr::LEN
    } else {
        UdpHdr::LEN
    };
    if ip_hdr_len + l4_min > tot_len {
        return Verdict::of(Reason::DropMalformedL4);
    }
    // TCP and UDP both start with source port, destination port. The length checks above
    // already guarantee these bytes are in the frame; the verifier needs to see the check.
    let Some(ports) = frame.ptr_at::<[[u8; 2]; 2]>(l4) else {
        return Verdict::of(Reason::DropMalformedL4);
    };
    // SAFETY: in bounds; alignment 1.
    let [sport, dport] = unsafe { *ports };

    let key = VipKey {
        addr: dst,
        port: dport,
        proto,
        _pad: 0,
    };

    // The connection table first, before the VIP is even looked up: an established flow costs
    // one hash lookup, and keeps its backend even when the VIP's table no longer has it
    // (drained) or is empty (every backend drained). See crate::flows. Events are counted only
    // once the packet is known to be for a VIP.
    let flow = FlowKey {
        src,
        dst,
        sport,
        dport,
        proto,
        _pad: [0; 3],
    };
    let syn = if proto == TCP {
        // Within the TCP header, which the length checks above put inside the frame.
        let Some(flags) = frame.ptr_at::<u8>(l4 + TCP_FLAGS_OFFSET) else {
            return Verdict::of(Reason::DropMalformedL4);
        };
        // SAFETY: in bounds.
        (unsafe { *flags }) & (TCP_SYN | TCP_ACK) == TCP_SYN
    } else {
        false
    };
    // The clock, read only on the paths that need it.
    let mut now = 0;
    let mut new_flow = syn;
    let lookup = if syn {
        FlowStat::Syn
    } else if let Some(entry) = tables.flow(&flow) {
        // SAFETY: a valid map value for the rest of the packet (see Tables::flow).
        let entry = unsafe { &mut *entry };
        let id = entry.backend_id;
        let mut expired = false;
        let mut refresh = false;
        if proto == UDP {
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
                && honours(backend, &key)
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
        new_flow = proto == UDP;
        FlowStat::Miss
    };

    let Some(vip) = tables.vip(&key) else {
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

    let Some(backend) = table_pick(tables, &vip, &flow, &mut v) else {
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
    } else if tables.insert_flow(
        &flow,
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

/// An ICMP message to a VIP address. A destination-unreachable error quotes the packet that
/// caused it: with direct server return that is a backend's reply, sent from the VIP to the
/// client, so the error comes to the VIP, and only the backend that owns the flow can act on it
/// (path MTU discovery needs "fragmentation needed" to reach it). The quoted header names the
/// flow (client = quoted destination); the frame goes to the backend the connection table
/// remembers for it, else to the one the VIP's table picks, without remembering anything.
/// Everything else (echo requests, other types) is the kernel's: the master's stack answers
/// pings to the VIP. A quoted header too short to name a flow is malformed.
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
    let client = q.dst_addr;
    let key = VipKey {
        addr: dst,
        port: vport,
        proto: q_proto,
        _pad: 0,
    };
    let flow = FlowKey {
        src: client,
        dst,
        sport: cport,
        dport: vport,
        proto: q_proto,
        _pad: [0; 3],
    };
    if let Some(entry) = tables.flow(&flow) {
        // SAFETY: a valid map value for the rest of the packet (see Tables::flow).
        let id = unsafe { (*entry).backend_id };
        if let Some(backend) = tables.backend(id)
            && honours(backend, &key)
        {
            if !for_us(frame, backend, tables) {
                return Verdict::of(Reason::PassOtherHost);
            }
            let v = Verdict {
                reason: Reason::Forwarded,
                vip_index: backend.vip_index,
                backend_id: id,
                dst,
                dport: vport,
                new_flow: false,
            };
            return forward(frame, backend, v);
        }
    }
    let Some(vip) = tables.vip(&key) else {
        return Verdict::of(Reason::PassNotVip);
    };
    let mut v = Verdict {
        reason: Reason::DropNoBackend,
        vip_index: vip.vip_index,
        backend_id: 0,
        dst,
        dport: vport,
        new_flow: false,
    };
    let Some(backend) = table_pick(tables, &vip, &flow, &mut v) else {
        return v;
    };
    if !for_us(frame, backend, tables) {
        return Verdict::of(Reason::PassOtherHost);
    }
    forward(frame, backend, v)
}

/// Whether a connection-table entry's backend may keep its flow: ready, not marked down, and
/// still a backend of the flow's VIP (see [`crate::flows`]).
#[inline(always)]
fn honours(backend: &BackendInfo, key: &VipKey) -> bool {
    backend.flags & (BACKEND_F_READY | BACKEND_F_DOWN) == BACKEND_F_READY
        && backend.vip == vip_key_word(key)
}

/// The backend `vip`'s table picks for `flow`. Without one, `v` (a `DropNoBackend` verdict for
/// the VIP) says why: an empty table or slot, or a slot naming a backend that cannot be used,
/// whose id it then carries.
#[inline(always)]
fn table_pick<'t, T: Tables>(
    tables: &'t T,
    vip: &VipInfo,
    flow: &FlowKey,
    v: &mut Verdict,
) -> Option<&'t BackendInfo> {
    if vip.ring_size == 0 {
        return None;
    }
    let slot = flow_slot_v4(
        flow.src,
        flow.dst,
        flow.sport,
        flow.dport,
        flow.proto,
        vip.ring_size,
    );
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
    // Byte by byte (an array comparison compiles to a call to memcmp in BPF), without a branch
    // per byte.
    let same = |mac: &[u8; 6]| {
        let mut diff = 0u8;
        for i in 0..6 {
            diff |= dst[i] ^ mac[i];
        }
        diff == 0
    };
    same(&backend.src_mac)
        || tables.settings().is_some_and(|s| {
            let a = &s.alt_mac;
            (a[0] | a[1] | a[2] | a[3] | a[4] | a[5]) != 0 && same(a)
        })
}

/// Rewrites the frame's MACs towards `backend` and returns `v` as forwarded.
#[inline(always)]
fn forward<F: Frame>(frame: &mut F, backend: &BackendInfo, mut v: Verdict) -> Verdict {
    let Some(macs) = frame.ptr_at::<[[u8; 6]; 2]>(0) else {
        // Unreachable (the IPv4 header was read past these bytes); the verifier needs the check.
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
