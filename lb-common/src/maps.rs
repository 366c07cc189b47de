//! Map names and the key/value layouts shared with the kernel.
//!
//! Rules (see DESIGN.md): `#[repr(C)]`, fixed-width integers and byte arrays only, explicit `_pad`,
//! a size assert beside each type. Addresses and ports stay in network byte order as byte arrays so
//! packet bytes become keys without conversion. The agent is the only writer of every map except
//! the statistics maps, which only the data path writes.
//!
//! The Maglev tables of all VIPs live in one big array, [`RING`]: a VIP's table is the
//! `ring_size` entries starting at `ring_base`. The agent writes a new table into a free region and
//! then points the VIP's slot in [`VIP_TABLE`] at it with one 8-byte store, so the data path sees
//! either the whole old table or the whole new one, never a half-written one.

/// `Array<VipSlot>` (created `BPF_F_MMAPABLE`), two halves of [`VIP_TABLE_SLOTS`] slots: the
/// virtual services, an open-addressing hash table the agent lays out and the data path probes
/// (see [`vip_table_find`]). An array read instead of a BPF hash-map lookup: the lookup was more
/// than half of the cost of forwarding a packet. [`VIP_TABLE_CTL`] says which half is live and
/// with which seed it was laid out.
pub const VIP_TABLE: &str = "VIP_TABLE";
/// `Array<u64>` (created `BPF_F_MMAPABLE`), one entry: `half | seed << 32` of [`VIP_TABLE`],
/// written by the agent with one atomic store.
pub const VIP_TABLE_CTL: &str = "VIP_TABLE_CTL";
/// `HashMap<VipAddrKey, u32>`: every address that has at least one VIP (value: number of VIPs on
/// it). Used to decide about fragments, which carry no ports.
pub const VIP_ADDRS: &str = "VIP_ADDRS";
/// `Array<VipFilter>`, one entry: a bitmap with the bit [`vip_filter_bit`] of every VIP address
/// set. The data path tests it before anything else, so a frame for an address that has no VIP
/// (most traffic of a host) costs one array read instead of a hash lookup. A set bit is only a
/// "maybe": the [`VIP_TABLE`] lookup decides.
pub const VIP_FILTER: &str = "VIP_FILTER";
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
/// `LruHashMap<FlowKey, FlowEntry>` (created `BPF_F_NO_COMMON_LRU`): the connection table,
/// which backend each flow was sent to (see [`crate::flows`]). One table shared by all CPUs, so a
/// flow whose packets arrive on different CPUs (veth, RSS or RPS changes) finds its entry
/// anywhere; each CPU evicts from its own LRU list, so CPUs do not contend for one list lock
/// and a flood on one CPU evicts only that CPU's share (`max_entries / CPUs`). Written by the
/// data path only; the agent reads it (`xdplb flows`). Sized by the agent at load time.
pub const FLOWS: &str = "FLOWS";
/// `PerCpuArray<FlowRate>`, one entry: each CPU's insert budget for the current second.
pub const FLOW_RATE: &str = "FLOW_RATE";
/// `PerCpuArray<u64>`: indexed by [`crate::flows::FlowStat`].
pub const FLOW_STATS: &str = "FLOW_STATS";

/// `HashMap<Vip6Key, VipInfo>`: the IPv6 virtual services. A BPF hash map rather than
/// [`VIP_TABLE`]'s open addressing (whose slots compare one 64-bit key word, too small for an
/// IPv6 key): IPv6 VIPs are few, and an update replaces the whole value at once (the kernel
/// swaps in a new element under RCU), so the data path sees a table's base and size from one
/// version, as with [`VipSlot::table`]. Ring regions, `vip_index` and backend ids are shared
/// with the IPv4 services.
pub const VIP6: &str = "VIP6";
/// `HashMap<VipAddr6Key, u32>`: every IPv6 address that has at least one VIP (value: number of
/// VIPs on it), the IPv6 twin of [`VIP_ADDRS`] (fragments carry no ports). IPv6 addresses share
/// [`VIP_FILTER`] through [`vip_filter_fold6`].
pub const VIP_ADDRS6: &str = "VIP_ADDRS6";
/// `LruHashMap<Flow6Key, FlowEntry>` (created `BPF_F_NO_COMMON_LRU`): the connection table of
/// IPv6 flows, with [`FLOWS`]' semantics. A table of its own so an IPv4 entry stays 16 + 16
/// bytes. Sized by the agent at load time.
pub const FLOWS6: &str = "FLOWS6";

/// Name of the load-balancing XDP program in the object.
pub const PROG_XDPLB: &str = "xdplb";
/// Name of a program that passes everything (used on veth peers so `XDP_TX` works, see tests).
pub const PROG_PASS: &str = "xdp_pass";

/// Names of the benchmark programs and maps in the object (see `lb-ebpf/src/bench.rs`). They
/// live in the same object as [`PROG_XDPLB`] so the floors are built by the same compiler with
/// the same flags; the agent never loads the programs, and the two maps cost a few hundred bytes.
pub const PROG_BENCH_RESTORE: &str = "xdp_bench_restore";
/// `return XDP_TX`: the floor of any XDP program.
pub const PROG_FLOOR_TX: &str = "xdp_floor_tx";
/// Parse Ethernet and IPv4, swap the MACs, `XDP_TX`: the floor of a forwarder.
pub const PROG_FLOOR_SWAP: &str = "xdp_floor_swap";
/// The floor of an inline L2 hop: frames to one address get fixed MACs and `XDP_TX`, everything
/// else is passed (end-to-end bench: what the hop itself costs, whatever the load balancer does).
pub const PROG_FLOOR_FWD: &str = "xdp_floor_fwd";
/// `Array<BenchFwd>` with one entry: what [`PROG_FLOOR_FWD`] forwards, and where.
pub const BENCH_FWD: &str = "BENCH_FWD";
/// `ProgramArray` with one entry: the program [`PROG_BENCH_RESTORE`] tail-calls.
pub const BENCH_PROGS: &str = "BENCH_PROGS";
/// `Array<BenchFrame>` with one entry: the frame [`PROG_BENCH_RESTORE`] restores.
pub const BENCH_FRAME: &str = "BENCH_FRAME";
/// Largest frame [`BenchFrame`] holds.
pub const BENCH_FRAME_MAX: usize = 256;

/// Value of [`BENCH_FWD`]. Written by the bench before attaching [`PROG_FLOOR_FWD`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BenchFwd {
    /// IPv4 destination to forward, network byte order.
    pub addr: [u8; 4],
    /// Destination MAC written into forwarded frames.
    pub dst_mac: [u8; 6],
    /// Source MAC written into forwarded frames.
    pub src_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<BenchFwd>() == 16);

/// Value of [`BENCH_FRAME`]. Written by the bench before each test run (with `data` = 0), then by
/// the restore program on its first iteration (`data`) and on every iteration (`scratch`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchFrame {
    /// Packet data pointer on the first iteration of the run; 0 until then.
    pub data: u64,
    /// Where the restore program turns the current data pointer into a plain number.
    pub scratch: u64,
    /// Length of the original frame, 1..=[`BENCH_FRAME_MAX`].
    pub len: u32,
    pub _pad: u32,
    /// The original frame.
    pub bytes: [u8; BENCH_FRAME_MAX],
}
const _: () = assert!(core::mem::size_of::<BenchFrame>() == 24 + BENCH_FRAME_MAX);

/// Most VIPs: capacity of [`VIP_ADDRS`] and [`VIP_STATS`], and a quarter of [`VIP_TABLE_SLOTS`].
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
/// Placeholder size of [`FLOWS`] in the object; the agent always sets the real size at load time.
pub const FLOWS_PLACEHOLDER: u32 = 1024;
/// `BPF_F_NO_COMMON_LRU`, from `include/uapi/linux/bpf.h`.
pub const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `BPF_F_NO_PREALLOC`, from `include/uapi/linux/bpf.h`.
pub const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`, from `include/uapi/linux/bpf.h`.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Value of [`RING`]: 16 consecutive entries of the flat ring.
pub type RingChunk = [u32; RING_CHUNK_ENTRIES as usize];
const _: () = assert!(core::mem::size_of::<RingChunk>() == 64);

/// Bits in [`VipFilter`]. With at most [`MAX_VIPS`] addresses, at most 1 in 16 other addresses
/// shares a bit with a VIP address (and then takes the hash lookup).
pub const VIP_FILTER_BITS: u32 = 1 << 16;
/// Value of [`VIP_FILTER`]. Written whole by the agent: bits of new addresses are set before
/// their VIPs are published; a reader sees each 64-bit word either before or after an update.
pub type VipFilter = [u64; (VIP_FILTER_BITS / 64) as usize];
const _: () = assert!(core::mem::size_of::<VipFilter>() == 8192);

/// The bit of [`VipFilter`] for an IPv4 address (network byte order): the top 16 bits of a
/// multiplicative (Fibonacci) hash, so addresses that differ only in a few bits spread out.
#[inline(always)]
pub fn vip_filter_bit(addr: [u8; 4]) -> u32 {
    u32::from_le_bytes(addr).wrapping_mul(0x9e37_79b1) >> 16
}

/// Whether the bit of `addr` is set in `filter`.
#[inline(always)]
pub fn vip_filter_test(filter: &VipFilter, addr: [u8; 4]) -> bool {
    let bit = vip_filter_bit(addr);
    // The mask is a no-op (bit < 2^16) that shows the verifier the index is in bounds.
    let word = filter[(bit >> 6) as usize & (filter.len() - 1)];
    word >> (bit & 63) & 1 != 0
}

/// Sets the bit of `addr` in `filter`.
pub fn vip_filter_set(filter: &mut VipFilter, addr: [u8; 4]) {
    let bit = vip_filter_bit(addr);
    filter[(bit >> 6) as usize] |= 1 << (bit & 63);
}

/// An IPv6 address folded to the 4 bytes [`vip_filter_bit`] takes: the xor of its four 32-bit
/// words, so every bit of the address can move the filter bit.
#[inline(always)]
pub fn vip_filter_fold6(addr: &[u8; 16]) -> [u8; 4] {
    let mut out = [0u8; 4];
    let mut i = 0;
    while i < 16 {
        out[i % 4] ^= addr[i];
        i += 1;
    }
    out
}

/// Key of a VIP. Zero-initialise in the kernel, padding included, or lookups miss. Never all
/// zero (the protocol is 6 or 17): an all-zero key marks an empty [`VipSlot`].
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

/// What the data path knows about a VIP, as [`vip_table_find`] returns it from a [`VipSlot`].
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

/// Slots per half of [`VIP_TABLE`]: a power of two, four times [`MAX_VIPS`], so the table is at
/// most a quarter full and probes are short.
pub const VIP_TABLE_SLOTS: u32 = 4 * MAX_VIPS;
const _: () = assert!(VIP_TABLE_SLOTS.is_power_of_two());
/// A key is always within this many slots of its home slot (the agent changes the seed until
/// every key is); the data path probes no further.
pub const VIP_TABLE_PROBES: u32 = 16;

/// Element of [`VIP_TABLE`]. The agent fills an empty slot's fields and then its key (each an
/// aligned atomic store through the mmap), and changes a live VIP's table with one 8-byte store
/// of `table`, which the data path reads with one load: a reader never sees a table's base from
/// one version and its size from another. Slots are never emptied in a live half: a VIP is
/// removed by laying out the other half without it and switching [`VIP_TABLE_CTL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    /// `ring_base | ring_size << 32` (see [`VipInfo`]).
    pub table: u64,
    pub vip_index: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<VipSlot>() == 24);

/// A key as one 64-bit word (how slots are compared; 0 = empty slot).
#[inline(always)]
pub fn vip_key_word(key: &VipKey) -> u64 {
    u64::from_le_bytes([
        key.addr[0],
        key.addr[1],
        key.addr[2],
        key.addr[3],
        key.port[0],
        key.port[1],
        key.proto,
        key._pad,
    ])
}

/// The first slot (within a half) probed for a key: MurmurHash3's 64-bit finalizer over the key
/// word with `seed` mixed in. Every key bit moves the result, and (unlike a plain multiplicative
/// hash, which is nearly linear) another seed gives another layout rather than a shifted one.
#[inline(always)]
pub fn vip_home(word: u64, seed: u32) -> u32 {
    let mut x = word ^ (seed as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x as u32 & (VIP_TABLE_SLOTS - 1)
}

/// `table` of a [`VipSlot`].
#[inline(always)]
pub fn vip_table_word(ring_base: u32, ring_size: u32) -> u64 {
    ring_base as u64 | (ring_size as u64) << 32
}

/// The value of [`VIP_TABLE_CTL`].
#[inline(always)]
pub fn vip_table_ctl(half: u32, seed: u32) -> u64 {
    (half & 1) as u64 | (seed as u64) << 32
}

/// Looks `key` up in the live half of the VIP table: `ctl` is [`VIP_TABLE_CTL`]'s value and
/// `slot` reads element `i` of [`VIP_TABLE`] (`table` with a single load). The one definition of
/// the probe, for the data path and the agent's tests.
#[inline(always)]
pub fn vip_table_find<F>(ctl: u64, key: &VipKey, slot: F) -> Option<VipInfo>
where
    F: Fn(u32) -> Option<(u64, u64, u32, u32)>,
{
    let word = vip_key_word(key);
    let base = (ctl as u32 & 1) * VIP_TABLE_SLOTS;
    let home = vip_home(word, (ctl >> 32) as u32);
    for i in 0..VIP_TABLE_PROBES {
        let (k, table, vip_index, flags) = slot(base + ((home + i) & (VIP_TABLE_SLOTS - 1)))?;
        if k == word {
            return Some(VipInfo {
                vip_index,
                ring_base: table as u32,
                ring_size: (table >> 32) as u32,
                flags,
            });
        }
        if k == 0 {
            return None;
        }
    }
    None
}

/// Key of [`VIP6`]. Zero-initialise in the kernel, padding included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Vip6Key {
    /// IPv6 address, network byte order.
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Vip6Key>() == 20);

/// Tag in the top byte of [`vip6_key_word`]. An IPv4 key word's top byte is its `_pad`, always
/// 0, so the words of an IPv4 and an IPv6 VIP never compare equal.
pub const VIP6_WORD_TAG: u64 = 0x06 << 56;

/// An IPv6 VIP's identity as one 64-bit word, for [`BackendInfo::vip`]: a 56-bit hash of the key
/// (MurmurHash3's 64-bit finalizer over its folded words) tagged with [`VIP6_WORD_TAG`]. Two
/// IPv6 VIPs share a word with probability 2^-56 per pair; the word only guards against a
/// connection-table entry outliving its backend id's reuse by another VIP, which the agent
/// already avoids by not reusing ids at once.
#[inline(always)]
pub fn vip6_key_word(key: &Vip6Key) -> u64 {
    let a = &key.addr;
    let hi = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let rest = u64::from_le_bytes([key.port[0], key.port[1], key.proto, 0, 0, 0, 0, 0]);
    let mut x = hi ^ mix64(lo ^ mix64(rest));
    x = mix64(x);
    (x & !(0xff << 56)) | VIP6_WORD_TAG
}

/// MurmurHash3's 64-bit finalizer.
#[inline(always)]
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Key of [`VIP_ADDRS6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddr6Key {
    /// IPv6 address, network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<VipAddr6Key>() == 16);

/// Key of [`VIP_ADDRS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddrKey {
    /// IPv4 address, network byte order.
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<VipAddrKey>() == 4);

/// Value of [`BACKENDS`]. Written by the agent only. A removed VIP's entries are cleared.
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
    /// Source MAC to write into forwarded frames: the MAC of the interface the program is
    /// attached to. Here rather than only in [`Settings`] so forwarding reads one map entry
    /// fewer per packet.
    pub src_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// IPv4 address, network byte order (for diagnostics; the data path does not route by it).
    /// All zero for an IPv6 backend.
    pub addr: [u8; 4],
    /// The VIP this backend id belongs to (ids are per (VIP, backend) pair).
    pub vip_index: u32,
    /// That VIP's key as [`vip_key_word`] (IPv4) or [`vip6_key_word`] (IPv6). A connection-table hit is checked against it instead
    /// of looking the VIP up: a flow is only sent to a backend of the service it was addressed
    /// to, whatever ids were reused since.
    pub vip: u64,
}
const _: () = assert!(core::mem::size_of::<BackendInfo>() == 32);

/// The entry is filled and its MAC is known: packets may be sent to it.
pub const BACKEND_F_READY: u16 = 1;
/// The backend failed its health checks and is not in its VIP's live table: flows the
/// connection table remembers on it are remapped through the table instead of blackholed.
/// (A backend that failed but is still in the table, as `all_down = "keep-last"` keeps it, is
/// not marked: remapping would only find it again.)
pub const BACKEND_F_DOWN: u16 = 2;

/// Key of [`FLOWS`]: a flow's 5-tuple as it is in the packet. Zero-initialise, padding included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Client address, network byte order.
    pub src: [u8; 4],
    /// VIP address, network byte order.
    pub dst: [u8; 4],
    /// Client port, network byte order.
    pub sport: [u8; 2],
    /// VIP port, network byte order.
    pub dport: [u8; 2],
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

/// Key of [`FLOWS6`]: an IPv6 flow's 5-tuple as it is in the packet. Zero-initialise, padding
/// included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow6Key {
    /// Client address, network byte order.
    pub src: [u8; 16],
    /// VIP address, network byte order.
    pub dst: [u8; 16],
    /// Client port, network byte order.
    pub sport: [u8; 2],
    /// VIP port, network byte order.
    pub dport: [u8; 2],
    /// IP protocol number (6 TCP, 17 UDP).
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<Flow6Key>() == 40);

/// Value of [`FLOWS`] and [`FLOWS6`]. Written by the data path only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// The backend id (index into [`BACKENDS`]) the flow goes to.
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the entry was written; for UDP, refreshed by
    /// every packet (the idle timeout counts from it). TCP entries are not refreshed: they live
    /// until the LRU evicts them or a new SYN on the same 5-tuple replaces them.
    pub atime: u64,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 16);

/// Value of [`FLOW_RATE`]: a CPU's inserts in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowRate {
    /// `bpf_ktime_get_ns` at the start of the window.
    pub window_start: u64,
    /// Inserts admitted in the window.
    pub count: u64,
}
const _: () = assert!(core::mem::size_of::<FlowRate>() == 16);

/// Value of [`SETTINGS`] (single entry). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// MAC of the interface the program is attached to (forwarded frames take theirs from
    /// [`BackendInfo::src_mac`]).
    pub iface_mac: [u8; 6],
    /// A second MAC VIP traffic may be addressed to (the VRRP virtual MAC when `[ha]
    /// virtual_mac` is on); all zero: none. Frames to VIPs addressed to neither are not ours
    /// (a switch flooding unknown unicast, a promiscuous interface) and go to the kernel, which
    /// drops them as it would without the program.
    pub alt_mac: [u8; 6],
    /// Highest diagnostic level the program emits: 0 off, 1 error, 2 warn, 3 info, 4 debug,
    /// 5 trace (the numbering of `aya_log_common::Level`). Changed at run time by the agent.
    pub log_level: u32,
    /// Most connection-table inserts per CPU per second; 0 means no bound. Flows past the
    /// bound are still forwarded (by the table), just not remembered.
    pub flow_insert_rate: u32,
    pub _pad: u32,
    /// UDP connection-table entries idle longer than this (nanoseconds) are not honoured; the
    /// flow is decided again by the table and counted as new. 0: they never expire.
    pub flow_udp_timeout_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 32);

/// Packet, byte and new-flow counter (per CPU in the maps; the agent sums over CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
    /// New flows: TCP SYNs, and UDP packets the connection table had no live entry for. Only
    /// the VIP and backend counters count them.
    pub flows: u64,
}
const _: () = assert!(core::mem::size_of::<Counter>() == 24);

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
        self.flows += rhs.flows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_has_no_false_negatives_and_few_false_positives() {
        let mut f: VipFilter = [0; 1024];
        let vips: [[u8; 4]; 3] = [[10, 0, 0, 100], [10, 0, 0, 101], [192, 0, 2, 1]];
        for v in vips {
            vip_filter_set(&mut f, v);
        }
        assert!(vips.iter().all(|v| vip_filter_test(&f, *v)));
        let hits = (0..=255u8)
            .flat_map(|c| (0..=255u8).map(move |d| [10, 0, c, d]))
            .filter(|a| !vips.contains(a) && vip_filter_test(&f, *a))
            .count();
        // 3 bits of 65536 set: about 3 of 65536 other addresses share one.
        assert!(hits <= 16, "{hits} false positives in 10.0/16");
        // Neighbours of a VIP (the host's own address, the next VIP) do not share its bit.
        assert!(!vip_filter_test(&f, [10, 0, 0, 2]));
        assert!(!vip_filter_test(&f, [10, 0, 0, 99]));
    }

    #[test]
    fn ipv6_key_words_never_meet_ipv4_ones_and_move_with_every_field() {
        let k = Vip6Key {
            addr: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64],
            port: 80u16.to_be_bytes(),
            proto: 6,
            _pad: 0,
        };
        let w = vip6_key_word(&k);
        assert_eq!(w >> 56, 0x06);
        let v4 = VipKey {
            addr: [255; 4],
            port: [255; 2],
            proto: 255,
            _pad: 0,
        };
        assert_eq!(
            vip_key_word(&v4) >> 56,
            0,
            "IPv4 words have a zero top byte"
        );
        let mut others = [k; 4];
        others[0].addr[15] = 0x65;
        others[1].addr[0] = 0x21;
        others[2].port = 443u16.to_be_bytes();
        others[3].proto = 17;
        for o in others {
            assert_ne!(vip6_key_word(&o), w, "{o:?}");
        }
    }

    #[test]
    fn ipv6_fold_uses_every_word() {
        let base = [0u8; 16];
        for i in 0..16 {
            let mut a = base;
            a[i] = 1;
            assert_ne!(vip_filter_fold6(&a), vip_filter_fold6(&base), "byte {i}");
        }
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
    unsafe impl aya::Pod for super::BenchFrame {}
    unsafe impl aya::Pod for super::BenchFwd {}
    unsafe impl aya::Pod for super::VipSlot {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::FlowRate {}
    unsafe impl aya::Pod for super::Vip6Key {}
    unsafe impl aya::Pod for super::VipAddr6Key {}
    unsafe impl aya::Pod for super::Flow6Key {}
}
