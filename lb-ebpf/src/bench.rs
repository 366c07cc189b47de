//! Programs for `cargo xtask bench` (never attached by the agent).
//!
//! `BPF_PROG_TEST_RUN` with `repeat = N` runs a program N times on the same buffer without
//! resetting it, so from the second iteration on a program that rewrites the frame would measure
//! its own output, possibly another path. [`xdp_bench_restore`] puts the original frame back
//! (head, tail and bytes) and tail-calls the program under test, so every iteration sees the
//! original. Its own cost is constant; the bench measures the floors through it too and reports
//! differences.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};
use lb_common::maps::{BENCH_FRAME_MAX, BenchFrame, BenchFwd};

#[map]
static BENCH_PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static BENCH_FRAME: Array<BenchFrame> = Array::with_max_entries(1, 0);
#[map]
static BENCH_FWD: Array<BenchFwd> = Array::with_max_entries(1, 0);

#[xdp]
pub fn xdp_bench_restore(ctx: XdpContext) -> u32 {
    if restore(&ctx).is_err() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: index 0 holds the program under test; on failure the call returns.
    unsafe { BENCH_PROGS.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

#[inline(always)]
fn restore(ctx: &XdpContext) -> Result<(), ()> {
    let f = BENCH_FRAME.get_ptr_mut(0).ok_or(())?;
    // SAFETY: f points at the map value; only this program writes it during a test run, which
    // runs on one CPU.
    unsafe {
        // A packet pointer cannot take part in arithmetic with a number from the map; storing it
        // and loading it back yields a plain number (needs CAP_PERFMON, as a pointer leak).
        core::ptr::write_volatile(&raw mut (*f).scratch, ctx.data() as u64);
        let data = core::ptr::read_volatile(&raw const (*f).scratch);
        let first = (*f).data;
        if first == 0 {
            (*f).data = data;
        } else if first != data {
            let delta = first.wrapping_sub(data) as i64 as i32;
            if bpf_xdp_adjust_head(ctx.ctx, delta) != 0 {
                return Err(());
            }
        }
        let len = (*f).len as usize;
        if len == 0 || len > BENCH_FRAME_MAX {
            return Err(());
        }
        let now = ctx.data_end() - ctx.data();
        if now != len && bpf_xdp_adjust_tail(ctx.ctx, len as i32 - now as i32) != 0 {
            return Err(());
        }
        if bpf_xdp_store_bytes(ctx.ctx, 0, (&raw mut (*f).bytes).cast(), len as u32) != 0 {
            return Err(());
        }
    }
    Ok(())
}

/// The floor of any XDP program.
#[xdp]
pub fn xdp_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// The floor of a forwarder: parse Ethernet and IPv4 (bounds, ethertype, version, IHL), swap
/// the MACs, send back.
#[xdp]
pub fn xdp_floor_swap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 14 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: 14 bytes are in bounds (checked above); byte arrays have alignment 1.
    let ethertype = unsafe { *((start + 12) as *const [u8; 2]) };
    if ethertype != [0x08, 0x00] {
        return xdp_action::XDP_PASS;
    }
    if start + 34 > end {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: 34 bytes are in bounds.
    let vihl = unsafe { *((start + 14) as *const u8) };
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return xdp_action::XDP_DROP;
    }
    let macs = start as *mut [[u8; 6]; 2];
    // SAFETY: in bounds; nothing else refers to the frame.
    unsafe {
        let [dst, src] = *macs;
        *macs = [src, dst];
    }
    xdp_action::XDP_TX
}

/// The floor of an inline L2 hop (end-to-end bench): IPv4 frames to `BENCH_FWD.addr` leave with
/// its MACs through `XDP_TX`; everything else (ARP included) is passed.
#[xdp]
pub fn xdp_floor_fwd(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 34 > end {
        return xdp_action::XDP_PASS;
    }
    let Some(fwd) = BENCH_FWD.get(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: 34 bytes are in bounds (checked above); byte arrays have alignment 1.
    let (ethertype, dst) = unsafe {
        (
            *((start + 12) as *const [u8; 2]),
            *((start + 30) as *const [u8; 4]),
        )
    };
    if ethertype != [0x08, 0x00] || dst != fwd.addr {
        return xdp_action::XDP_PASS;
    }
    let macs = start as *mut [[u8; 6]; 2];
    // SAFETY: in bounds; nothing else refers to the frame. Byte by byte, as in the real program
    // (an aggregate copy would be a call to memcpy).
    unsafe {
        let macs = &mut *macs;
        #[expect(clippy::needless_range_loop, reason = "see lb_common::packet::process")]
        for i in 0..6 {
            macs[0][i] = fwd.dst_mac[i];
            macs[1][i] = fwd.src_mac[i];
        }
    }
    xdp_action::XDP_TX
}
