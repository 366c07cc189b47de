//! The xdplb XDP program: glue between the kernel and `lb_common::packet::process`.
//!
//! This file only implements the two traits of the decision over `XdpContext` and the maps,
//! counts the verdict and turns it into an XDP action. The decision itself lives in `lb-common`,
//! where it is unit-tested on the host.
#![no_std]
#![no_main]

use core::net::Ipv4Addr;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::{debug, error, info, warn};
use lb_common::{
    Action, Reason,
    maps::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BackendInfo, Counter, MAX_BACKENDS, MAX_VIPS,
        RING_CHUNK_ENTRIES, RING_CHUNK_SHIFT, RING_PLACEHOLDER, RingChunk, Settings, VipAddrKey,
        VipInfo, VipKey,
    },
    packet::{self, Frame, Tables, Verdict},
};

#[map]
static VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);
#[map]
static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);
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
    fn settings(&self) -> Option<&Settings> {
        SETTINGS.get(0)
    }

    #[inline(always)]
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        // SAFETY: the agent replaces values whole, and the map is not preallocated, so the element
        // stays intact until every reader is done with it (see lb_common::maps::VipInfo).
        unsafe { VIPS.get(key).copied() }
    }

    #[inline(always)]
    fn is_vip_addr(&self, key: &VipAddrKey) -> bool {
        VIP_ADDRS.get_ptr(key).is_some()
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
}

#[xdp]
pub fn xdplb(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame {
        start: ctx.data(),
        end: ctx.data_end(),
    };
    let verdict = packet::process(&mut frame, &Maps);
    count(&verdict, frame.len() as u64);
    if verdict.reason != Reason::Forwarded {
        diagnose(&ctx, &verdict);
    }
    match verdict.reason.action() {
        Action::Tx => xdp_action::XDP_TX,
        Action::Pass => xdp_action::XDP_PASS,
        Action::Drop => xdp_action::XDP_DROP,
        Action::Aborted => xdp_action::XDP_ABORTED,
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { (*c).add(bytes) };
    }
}

#[inline(always)]
fn count(v: &Verdict, bytes: u64) {
    if v.reason == Reason::Forwarded {
        bump(&VIP_STATS, v.vip_index, bytes);
        bump(&BACKEND_STATS, v.backend_id, bytes);
    } else {
        bump(&REASON_STATS, v.reason as u32, bytes);
    }
}

/// Logs unusual outcomes (never forwarded or passed packets), if the agent's level allows it,
/// rate-limited per CPU and reason.
#[inline(never)]
fn diagnose(ctx: &XdpContext, v: &Verdict) {
    // Levels are aya_log_common::Level's numbering (1 error .. 5 trace).
    let level: u32 = match v.reason {
        Reason::DropBackendInvalid | Reason::DropInternal => 1,
        Reason::DropNoBackend => 2,
        Reason::DropFragment => 3,
        Reason::DropMalformedEth | Reason::DropMalformedIp | Reason::DropMalformedL4 => 4,
        _ => return,
    };
    match SETTINGS.get(0) {
        Some(s) if s.log_level >= level => {}
        _ => return,
    }
    let Some(last) = LOG_RATE.get_ptr_mut(v.reason as u32) else {
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
    let dst = Ipv4Addr::from(v.dst);
    let dport = u16::from_be_bytes(v.dport);
    match v.reason {
        Reason::DropNoBackend => warn!(
            ctx,
            "vip {:i}:{} (index {}) has no backend: dropping its packets", dst, dport, v.vip_index
        ),
        Reason::DropBackendInvalid => error!(
            ctx,
            "vip {:i}:{} table points at backend id {} which is not ready: dropping",
            dst,
            dport,
            v.backend_id
        ),
        Reason::DropInternal => error!(
            ctx,
            "internal error for vip {:i}:{} (index {}, backend id {}): dropping",
            dst,
            dport,
            v.vip_index,
            v.backend_id
        ),
        Reason::DropFragment => info!(
            ctx,
            "IPv4 fragment to vip address {:i} dropped (fragments cannot be steered)", dst
        ),
        Reason::DropMalformedEth => debug!(ctx, "runt frame dropped"),
        Reason::DropMalformedIp => debug!(ctx, "malformed IPv4 header dropped"),
        Reason::DropMalformedL4 => debug!(ctx, "truncated TCP/UDP header dropped"),
        _ => {}
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
