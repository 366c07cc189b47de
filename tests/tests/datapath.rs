//! The fixture table (`lb_tests::fixtures`) run two ways with the same maps content:
//! - `host_decision`: `lb_common::packet::process` on the host;
//! - `kernel_program`: the real, verified XDP program through `BPF_PROG_TEST_RUN`, with the maps
//!   filled through the agent's own `Dataplane` API, checking the XDP action, the output frame
//!   (hex diff on mismatch) and that exactly the expected counter moved.

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Action, Reason,
    packet::{SliceFrame, process},
};
use lb_tests::{
    fixtures::{self, Fixture, HostTables, Output, World, hex_diff},
    netns::require_privileges,
};
use lb_userspace::dataplane::{Dataplane, LoadOptions};

#[test]
fn host_decision() {
    let world = World::standard();
    let tables = HostTables(&world);
    let mut failures = Vec::new();
    for f in fixtures::all() {
        let mut frame = f.input.clone();
        let verdict = process(&mut SliceFrame::new(&mut frame), &tables);
        if verdict.reason != f.reason {
            failures.push(format!(
                "{}: reason {:?}, expected {:?}",
                f.name, verdict.reason, f.reason
            ));
            continue;
        }
        failures.extend(output_mismatch(&f, &frame));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The frame differs from what the fixture expects: its name and a hex diff.
fn output_mismatch(f: &Fixture, frame: &[u8]) -> Option<String> {
    let expected = match &f.output {
        Output::Unchanged => &f.input,
        Output::Frame(out) => out,
    };
    (frame != expected.as_slice()).then(|| {
        format!(
            "{}: output frame differs\n{}",
            f.name,
            hex_diff(expected, frame)
        )
    })
}

#[test]
fn fixture_table_covers_every_reason() {
    let seen: std::collections::BTreeSet<u32> =
        fixtures::all().iter().map(|f| f.reason as u32).collect();
    for r in Reason::ALL {
        if r == Reason::DropInternal {
            continue; // unreachable with consistent maps; checked by the kernel test below
        }
        assert!(seen.contains(&(r as u32)), "no fixture for {}", r.name());
    }
}

fn load_world(world: &World) -> Dataplane {
    let mut dp = Dataplane::load(LoadOptions {
        ring_entries: world.ring.len() as u32,
    })
    .expect("load and verify the XDP program");
    dp.set_settings(&world.settings).unwrap();
    dp.write_ring(0, &world.ring).unwrap();
    for (id, b) in &world.backends {
        dp.set_backend(*id, b).unwrap();
    }
    for (k, v) in &world.vips {
        dp.set_vip(k, v).unwrap();
    }
    for (k, n) in &world.vip_addrs {
        dp.set_vip_addr(k, *n).unwrap();
    }
    dp
}

/// Packets and bytes per counter the program maintains: per reason, per VIP, per backend.
fn snapshot(dp: &Dataplane, world: &World) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for (r, c) in Reason::ALL.iter().zip(dp.reason_counters().unwrap()) {
        out.push((format!("reason {}", r.name()), c.packets, c.bytes));
    }
    for v in world.vips.values() {
        let c = dp.vip_counter(v.vip_index).unwrap();
        out.push((format!("vip {}", v.vip_index), c.packets, c.bytes));
    }
    for id in world.backends.keys() {
        let c = dp.backend_counter(*id).unwrap();
        out.push((format!("backend {id}"), c.packets, c.bytes));
    }
    out
}

fn run_one(dp: &Dataplane, f: &Fixture) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; f.input.len() + 256];
    let r = dp
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&f.input),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN failed: {e}", f.name));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

#[test]
fn kernel_program() {
    if !require_privileges("kernel_program") {
        return;
    }
    let world = World::standard();
    let dp = load_world(&world);
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in fixtures::all() {
        if let Some(why) = f.host_only {
            eprintln!("{}: host only ({why})", f.name);
            continue;
        }
        ran += 1;
        let before = snapshot(&dp, &world);
        let (action, frame) = run_one(&dp, &f);
        let after = snapshot(&dp, &world);
        if action != f.reason.action() as u32 {
            failures.push(format!(
                "{}: XDP action {action}, expected {:?} ({}) for reason {}",
                f.name,
                f.reason.action(),
                f.reason.action() as u32,
                f.reason.name()
            ));
            continue;
        }
        failures.extend(output_mismatch(&f, &frame));
        // Exactly the expected counters moved, by one packet of the frame's length.
        let moved: Vec<String> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a)
            .map(|(b, a)| format!("{} +{} pkts +{} bytes", b.0, a.1 - b.1, a.2 - b.2))
            .collect();
        let len = f.input.len();
        let expected_moves: Vec<String> = if f.reason == Reason::Forwarded {
            // Which VIP and backend: found from the frame's destination and the output MAC.
            let info = world
                .vips
                .iter()
                .find(|(k, _)| {
                    let ihl = (f.input[14] & 0x0f) as usize * 4;
                    k.addr[..] == f.input[30..34]
                        && k.proto == f.input[23]
                        && k.port[..] == f.input[14 + ihl + 2..14 + ihl + 4]
                })
                .map(|(_, v)| *v)
                .expect("forwarded fixture targets a world VIP");
            let id = world
                .backends
                .iter()
                .find(|(_, b)| b.mac[..] == frame[0..6])
                .map(|(id, _)| *id)
                .expect("output MAC is a world backend");
            vec![
                format!("vip {} +1 pkts +{len} bytes", info.vip_index),
                format!("backend {id} +1 pkts +{len} bytes"),
            ]
        } else {
            vec![format!("reason {} +1 pkts +{len} bytes", f.reason.name())]
        };
        if moved != expected_moves {
            failures.push(format!(
                "{}: counters moved {moved:?}, expected {expected_moves:?}",
                f.name
            ));
        }
    }
    assert!(ran > 30, "only {ran} fixtures ran in the kernel");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A ring index beyond the ring (a VIP entry the agent would never write) is counted as an
/// internal error, not a crash or a wild read.
#[test]
fn kernel_ring_out_of_range_is_internal_error() {
    if !require_privileges("kernel_ring_out_of_range_is_internal_error") {
        return;
    }
    let mut world = World::standard();
    let k = fixtures::key(fixtures::VIP, 80, 6);
    world.vips.get_mut(&k).unwrap().ring_base = 1 << 30;
    let dp = load_world(&world);
    let f = fixtures::all()
        .into_iter()
        .find(|f| f.name == "tcp_syn_to_vip")
        .unwrap();
    let (action, frame) = run_one(&dp, &f);
    assert_eq!(action, Action::Drop as u32);
    assert_eq!(frame, f.input);
    let c = dp.reason_counters().unwrap()[Reason::DropInternal as usize];
    assert_eq!(c.packets, 1);
}

/// The VIP table as the kernel program sees it: a VIP removed (a new layout in the other half)
/// is no longer found and its traffic goes to the kernel; the others still forward; added back,
/// it is found again.
#[test]
fn vip_table_remove_and_add_back() {
    if !require_privileges("vip_table_remove_and_add_back") {
        return;
    }
    let world = World::standard();
    let mut dp = load_world(&world);
    let find = |name: &str| {
        fixtures::all()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no fixture {name}"))
    };
    let syn = find("tcp_syn_to_vip");
    let udp_key = fixtures::key(fixtures::VIP, 53, 17);
    let udp_info = world.vips[&udp_key];

    dp.remove_vip(&udp_key).unwrap();
    assert_eq!(dp.vip(&udp_key), None);
    for (k, v) in world.vips.iter().filter(|(k, _)| **k != udp_key) {
        assert_eq!(dp.vip(k), Some(*v), "{k:?} after the removal");
    }
    let (action, _) = run_one(&dp, &find("udp_to_vip_flow_a"));
    assert_eq!(action, 2, "a removed VIP's traffic is passed");
    let (action, out) = run_one(&dp, &syn);
    assert_eq!(
        (action, output_mismatch(&syn, &out)),
        (3, None),
        "others still forward"
    );

    dp.set_vip(&udp_key, &udp_info).unwrap();
    assert_eq!(dp.vip(&udp_key), Some(udp_info));
    let (action, _) = run_one(&dp, &find("udp_to_vip_flow_a"));
    assert_eq!(action, 3, "added back, forwarded again");
}
