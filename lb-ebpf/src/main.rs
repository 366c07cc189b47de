//! The xdplb XDP program: glue between the kernel and `lb_common::packet::process`.
//!
//! This file only implements the two traits of the decision over `XdpContext` and the maps,
//! counts the verdict and turns it into an XDP action. The decision itself lives in `lb-common`,
//! where it is unit-tested on the host.
#![no_std]
#![no_main]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

mod bench;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::{debug, error, info, warn};
use lb_common::{
    Action, Reason,
    flows::{self, FlowStat},
    maps::{
        BPF_F_MMAPABLE, BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC, BackendInfo, Counter,
        FLOWS_PLACEHOLDER, Flow6Key, FlowEntry, FlowKey, FlowRate, MAX_BACKENDS, MAX_VIPS,
        RING_CHUNK_ENTRIES, RING_CHUNK_SHIFT, RING_PLACEHOLDER, RingChunk, Settings,
        VIP_TABLE_SLOTS, Vip6Key, VipAddr6Key, VipAddrKey, VipFilter, VipInfo, VipKey, VipSlot,
        vip_filter_test, vip_table_find,
    },
    packet::{self, Frame, Tables, Verdict},
};

#[map]
static VIP_TABLE: Array<VipSlot> = Array::with_max_entries(2 * VIP_TABLE_SLOTS, BPF_F_MMAPABLE);
#[map]
static VIP_TABLE_CTL: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);
#[map]
static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);
#[map]
static VIP_FILTER: Array<VipFilter> = Array::with_max_entries(1, 0);
#[map]
static RING: Array<RingChunk> = Array::with_max_entries(RING_PLACEHOLDER, BPF_F_MMAPABLE);
#[map]
static BACKENDS: Array<BackendInfo> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map]
static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
static REASON_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
static LOG_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
#[map]
static FLOWS: LruHashMap<FlowKey, FlowEntry> =
    LruHashMap::with_max_entries(FLOWS_PLACEHOLDER, BPF_F_NO_COMMON_LRU);
#[map]
static VIP6: HashMap<Vip6Key, VipInfo> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);
#[map]
static VIP_ADDRS6: HashMap<VipAddr6Key, u32> =
    HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);
#[map]
static FLOWS6: LruHashMap<Flow6Key, FlowEntry> =
    LruHashMap::with_max_entries(FLOWS_PLACEHOLDER, BPF_F_NO_COMMON_LRU);
#[map]
static FLOW_RATE: PerCpuArray<FlowRate> = PerCpuArray::with_max_entries(1, 0);
#[map]
static FLOW_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FlowStat::COUNT, 0);

/// Unusual events are logged at most this often per CPU and reason, so a flood of bad packets
/// cannot flood the log ring buffer.
const LOG_INTERVAL_NS: u64 = 1_000_000_000;

struct XdpFrame {
    start: usize,
    end: usize,
}

impl Frame for XdpFrame {
    #[inline(always)]
    fn len(&self) -> usize {
        self.end - self.start
    }

    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        // The verifier needs to see `start + offset + size <= end` on the packet pointer itself.
        if self.start + offset + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *mut T)
    }
}

struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool {
        VIP_FILTER.get(0).is_some_and(|f| vip_filter_test(f, addr))
    }

    #[inline(always)]
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        // SAFETY: reads of map values; the agent writes these words with aligned atomic stores
        // (see lb_common::maps::VipSlot), and each is read here with one load.
        unsafe {
            let ctl = core::ptr::read_volatile(VIP_TABLE_CTL.get_ptr(0)?);
            vip_table_find(ctl, key, |i| {
                let s = VIP_TABLE.get_ptr(i)?;
                // Volatile, in slot order, so the compiler keeps the key load first. The CPU
                // may still reorder on weakly ordered machines (arm64): a VIP added while the
                // program runs can then be seen with its table still 0 (dropped as no backend)
                // for an instant; x86 keeps loads in order.
                Some((
                    core::ptr::read_volatile(s.cast::<u64>()),
                    core::ptr::read_volatile(&raw const (*s).table),
                    core::ptr::read_volatile(&raw const (*s).vip_index),
                    core::ptr::read_volatile(&raw const (*s).flags),
                ))
            })
        }
    }

    #[inline(always)]
    fn vip6(&self, key: &Vip6Key) -> Option<VipInfo> {
        // SAFETY: a map value; the agent replaces it whole (see lb_common::maps::VIP6), so the
        // copy is of one version.
        unsafe { VIP6.get(key).copied() }
    }

    #[inline(always)]
    fn is_vip_addr(&self, key: &VipAddrKey) -> bool {
        VIP_ADDRS.get_ptr(key).is_some()
    }

    #[inline(always)]
    fn is_vip_addr6(&self, key: &VipAddr6Key) -> bool {
        VIP_ADDRS6.get_ptr(key).is_some()
    }

    #[inline(always)]
    fn ring(&self, index: u32) -> Option<u32> {
        let chunk = RING.get(index >> RING_CHUNK_SHIFT)?;
        Some(chunk[(index & (RING_CHUNK_ENTRIES - 1)) as usize])
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        BACKENDS.get(id)
    }

    #[inline(always)]
    fn settings(&self) -> Option<&Settings> {
        SETTINGS.get(0)
    }

    #[inline(always)]
    fn flow(&self, key: &FlowKey) -> Option<*mut FlowEntry> {
        FLOWS.get_ptr_mut(key)
    }

    #[inline(always)]
    fn insert_flow(&self, key: &FlowKey, entry: &FlowEntry) -> bool {
        FLOWS.insert(key, entry, 0).is_ok()
    }

    #[inline(always)]
    fn flow6(&self, key: &Flow6Key) -> Option<*mut FlowEntry> {
        FLOWS6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn insert_flow6(&self, key: &Flow6Key, entry: &FlowEntry) -> bool {
        FLOWS6.insert(key, entry, 0).is_ok()
    }

    #[inline(always)]
    fn admit_insert(&self, now: u64, limit: u32) -> bool {
        match FLOW_RATE.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
            Some(st) => flows::admit(unsafe { &mut *st }, now, limit),
            None => true,
        }
    }

    #[inline(always)]
    fn flow_event(&self, stat: FlowStat) {
        if let Some(c) = FLOW_STATS.get_ptr_mut(stat as u32) {
            // SAFETY: per-CPU slot.
            unsafe { *c += 1 };
        }
    }

    #[inline(always)]
    fn now_ns(&self) -> u64 {
        // The coarse clock (CLOCK_MONOTONIC_COARSE, a tick's resolution) is cheaper to read, and
        // idle timeouts and insert windows are seconds. The agent reads the same clock.
        // SAFETY: helper without arguments.
        unsafe { bpf_ktime_get_coarse_ns() }
    }
}

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let verdict = packet::process(&mut frame, &Maps);
    count(&verdict, frame.len() as u64);
    match verdict.reason.action() {
        Action::Tx => xdp_action::XDP_TX,
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => {
            // Checked here, the call only made when a line may be logged: a call costs on every
            // packet that makes it, and passing the verdict by reference would keep it on the
            // stack on every path.
            if SETTINGS
                .get(0)
                .is_some_and(|s| s.log_level >= log_level(verdict.reason))
            {
                diagnose(
                    &ctx,
                    verdict.reason as u64 | (u16::from_be_bytes(verdict.dport) as u64) << 32,
                    verdict.vip_index as u64 | (verdict.backend_id as u64) << 32,
                    u32::from_be_bytes(verdict.dst),
                );
            }
            xdp_action::XDP_DROP
        }
        Action::Aborted => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*c).add(bytes);
            (*c).flows += new_flow as u64;
        }
    }
}

#[inline(always)]
fn count(v: &Verdict, bytes: u64) {
    if v.reason == Reason::Forwarded {
        bump(&VIP_STATS, v.vip_index, bytes, v.new_flow);
        bump(&BACKEND_STATS, v.backend_id, bytes, v.new_flow);
    } else {
        bump(&REASON_STATS, v.reason as u32, bytes, false);
    }
}

/// The level at which a drop is logged, in aya_log_common::Level's numbering (1 error ..
/// 5 trace); above every level for reasons that are never logged.
#[inline(always)]
fn log_level(reason: Reason) -> u32 {
    match reason {
        Reason::DropBackendInvalid | Reason::DropInternal => 1,
        Reason::DropNoBackend => 2,
        Reason::DropFragment => 3,
        Reason::DropMalformedEth | Reason::DropMalformedIp | Reason::DropMalformedL4 => 4,
        _ => u32::MAX,
    }
}

/// Logs a dropped packet, rate-limited per CPU and reason. The verdict comes packed into three
/// scalars (BPF functions take at most five arguments): reason | dport << 32 (host order),
/// vip_index | backend_id << 32, and the IPv4 destination address (host order). An IPv6
/// destination is read back from the frame, which a drop leaves unchanged.
#[inline(never)]
fn diagnose(ctx: &XdpContext, reason_port: u64, ids: u64, dst: u32) {
    let reason = reason_port as u32;
    let Some(reason) = Reason::ALL.get(reason as usize).copied() else {
        return;
    };
    let (vip_index, backend_id) = (ids as u32, (ids >> 32) as u32);
    let Some(last) = LOG_RATE.get_ptr_mut(reason as u32) else {
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: per-CPU slot.
    unsafe {
        if now.wrapping_sub(*last) < LOG_INTERVAL_NS && *last != 0 {
            return;
        }
        *last = now;
    }
    let dst = match ipv6_dst(ctx) {
        Some(a) => IpAddr::V6(Ipv6Addr::from(a)),
        None => IpAddr::V4(Ipv4Addr::from(dst)),
    };
    let dport = (reason_port >> 32) as u16;
    match reason {
        Reason::DropNoBackend => warn!(
            ctx,
            "vip {:i}:{} (index {}) has no backend: dropping its packets", dst, dport, vip_index
        ),
        Reason::DropBackendInvalid => error!(
            ctx,
            "vip {:i}:{} table points at backend id {} which is not ready: dropping",
            dst,
            dport,
            backend_id
        ),
        Reason::DropInternal => error!(
            ctx,
            "internal error for vip {:i}:{} (index {}, backend id {}): dropping",
            dst,
            dport,
            vip_index,
            backend_id
        ),
        Reason::DropFragment => info!(
            ctx,
            "fragment to vip address {:i} dropped (fragments cannot be steered)", dst
        ),
        Reason::DropMalformedEth => debug!(ctx, "runt frame dropped"),
        Reason::DropMalformedIp => debug!(ctx, "malformed IP header dropped"),
        Reason::DropMalformedL4 => debug!(ctx, "truncated TCP/UDP header dropped"),
        _ => {}
    }
}

/// The destination of an IPv6 frame; `None` for any other.
#[inline(always)]
fn ipv6_dst(ctx: &XdpContext) -> Option<[u8; 16]> {
    let frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    // SAFETY: ptr_at checked the bounds; byte arrays have alignment 1.
    unsafe {
        if *frame.ptr_at::<[u8; 2]>(12)? != [0x86, 0xdd] {
            return None;
        }
        Some(*frame.ptr_at::<[u8; 16]>(packet::IPV6_DST_OFFSET)?)
    }
}

/// Passes every frame. Attached to the peer end of a veth pair so that frames the load balancer
/// sends with `XDP_TX` are accepted there (see ../shared/ENVIRONMENT.md, veth pitfall 1).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
