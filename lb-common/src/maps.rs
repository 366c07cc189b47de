//! Map names and the key/value layouts shared with the kernel.
//!
//! Rules (see DESIGN.md): `#[repr(C)]`, fixed-width integers and byte arrays only, explicit `_pad`,
//! a size assert beside each type. Addresses and ports stay in network byte order as byte arrays so
//! packet bytes become keys without conversion. The agent is the only writer of every map except
//! the statistics maps, which only the data path writes.
//!
//! The Maglev tables of all VIPs live in one big array, [`RING`]: a VIP's table is the
//! `ring_size` entries starting at `ring_base`. The agent writes a new table into a free region and
//! then replaces the VIP's [`VipInfo`] in one hash-map update, so the data path sees either the
//! whole old table or the whole new one, never a half-written one.

/// `HashMap<VipKey, VipInfo>`: the virtual services.
pub const VIPS: &str = "VIPS";
/// `HashMap<VipAddrKey, u32>`: every address that has at least one VIP (value: number of VIPs on
/// it). Used to decide about fragments, which carry no ports.
pub const VIP_ADDRS: &str = "VIP_ADDRS";
/// `Array<RingChunk>` (created `BPF_F_MMAPABLE`): all Maglev tables, as one flat array of
/// backend ids (0 = no backend) cut into chunks of [`RING_CHUNK_ENTRIES`]. Entry `i` is
/// `RING[i / 16][i % 16]`. Chunks rather than one id per element because the kernel pads array
/// elements to 8 bytes; this way an entry costs 4 bytes and the agent writes whole tables through
/// an mmap of the array instead of one syscall per entry.
pub const RING: &str = "RING";
/// `Array<BackendInfo>`: indexed by backend id. Id 0 is never used.
pub const BACKENDS: &str = "BACKENDS";
/// `Array<Settings>`: one entry, index 0.
pub const SETTINGS: &str = "SETTINGS";
/// `PerCpuArray<Counter>`: indexed by `VipInfo::vip_index`.
pub const VIP_STATS: &str = "VIP_STATS";
/// `PerCpuArray<Counter>`: indexed by backend id.
pub const BACKEND_STATS: &str = "BACKEND_STATS";
/// `PerCpuArray<Counter>`: indexed by [`crate::Reason`].
pub const REASON_STATS: &str = "REASON_STATS";
/// `PerCpuArray<u64>`: per reason, the `bpf_ktime_get_ns` of the last diagnostic logged, so
/// unusual events are logged at most once a second per CPU and reason.
pub const LOG_RATE: &str = "LOG_RATE";

/// Name of the load-balancing XDP program in the object.
pub const PROG_XDPLB: &str = "xdplb";
/// Name of a program that passes everything (used on veth peers so `XDP_TX` works, see tests).
pub const PROG_PASS: &str = "xdp_pass";

/// Capacity of [`VIPS`], [`VIP_ADDRS`] and [`VIP_STATS`] (the object's default; the agent may
/// override it at load time).
pub const MAX_VIPS: u32 = 4096;
/// Capacity of [`BACKENDS`] and [`BACKEND_STATS`]: one id per (VIP, backend) pair.
pub const MAX_BACKENDS: u32 = 65536;
/// Placeholder number of chunks of [`RING`] in the object; the agent always sets the real size at
/// load time.
pub const RING_PLACEHOLDER: u32 = 1;
/// Backend ids per element of [`RING`]. A power of two so the kernel splits an index with a shift
/// and a mask.
pub const RING_CHUNK_ENTRIES: u32 = 16;
/// log2 of [`RING_CHUNK_ENTRIES`].
pub const RING_CHUNK_SHIFT: u32 = 4;
const _: () = assert!(1 << RING_CHUNK_SHIFT == RING_CHUNK_ENTRIES);
/// `BPF_F_NO_PREALLOC`, from `include/uapi/linux/bpf.h`.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`, from `include/uapi/linux/bpf.h`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Value of [`RING`]: 16 consecutive entries of the flat ring.
pub type RingChunk = [u32; RING_CHUNK_ENTRIES as usize];
const _: () = assert!(core::mem::size_of::<RingChunk>() == 64);

/// Key of [`VIPS`]. Zero-initialise in the kernel, padding included, or lookups miss.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 8);

/// Value of [`VIPS`]. Written by the agent only, always as a whole. [`VIPS`] is created with
/// [`BPF_F_NO_PREALLOC`]: an update links a new element and frees the old one only after an RCU
/// grace period, so a program that looked up the old element keeps reading consistent values
/// (a preallocated map recycles the old element at once, and a reader could see fields of two
/// updates).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Index into [`VIP_STATS`], stable for the life of the VIP.
    pub vip_index: u32,
    /// First entry of this VIP's table in [`RING`].
    pub ring_base: u32,
    /// Number of entries (the Maglev table size M, a prime). 0 means "no table": dropped as
    /// `DropNoBackend`.
    pub ring_size: u32,
    /// Reserved for per-VIP flags; 0 today.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// Key of [`VIP_ADDRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddrKey {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<VipAddrKey>() == 4);

/// Value of [`BACKENDS`]. Written by the agent only.
///
/// An entry is written before any table that references it is published. On a MAC change the
/// agent overwrites the entry in place (the kernel copies array values with `memcpy`), so a
/// packet forwarded at the very moment of the change may leave with a mix of the old and new MAC
/// and be lost; MAC changes are rare and TCP retransmits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendInfo {
    /// Destination MAC to write into forwarded frames.
    pub mac: [u8; 6],
    /// `BACKEND_F_*` bits, native byte order.
    pub flags: u16,
    /// IPv4 address, network byte order (for diagnostics; the data path does not route by it).
    pub addr: [u8; 4],
    /// The VIP this backend id belongs to (ids are per (VIP, backend) pair).
    pub vip_index: u32,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 16);

/// The entry is filled and its MAC is known: packets may be sent to it.
pub const BACKEND_F_READY: u16 = 1;

/// Value of [`SETTINGS`] (single entry). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// MAC of the interface the program is attached to; source MAC of forwarded frames.
    pub iface_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// Highest diagnostic level the program emits: 0 off, 1 error, 2 warn, 3 info, 4 debug,
    /// 5 trace (the numbering of `aya_log_common::Level`). Changed at run time by the agent.
    pub log_level: u32,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Packet and byte counter (per CPU in the maps; the agent sums over CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 16);

impl Counter {
    #[inline(always)]
    pub fn add(&mut self, bytes: u64) {
        self.packets += 1;
        self.bytes += bytes;
    }
}

impl core::ops::AddAssign for Counter {
    fn add_assign(&mut self, rhs: Self) {
        self.packets += rhs.packets;
        self.bytes += rhs.bytes;
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made of integers and byte arrays only, with explicit
    // padding, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::VipAddrKey {}
    unsafe impl aya::Pod for super::BackendInfo {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::Counter {}
}
