//! The fixture table (`lb_tests::fixtures`) run two ways with the same maps content:
//! - `host_decision`: `lb_common::packet::process` on the host;
//! - `kernel_program`: the real, verified XDP program through `BPF_PROG_TEST_RUN`, with the maps
//!   filled through the agent's own `Dataplane` API, checking the XDP action, the output frame
//!   (hex diff on mismatch) and that exactly the expected counters moved.
//!
//! Every fixture starts from the world's connection tables, IPv4 and IPv6 (the kernel's are
//! emptied and refilled before each), and both runs check the connection-table events it caused,
//! whether it counted as a new flow, and what the table remembers afterwards.

use std::net::{IpAddr, SocketAddr};

use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Action, Reason,
    flows::FlowStat,
    maps::{Flow6Key, FlowEntry, FlowKey, VipInfo},
    packet::{SliceFrame, process},
};
use lb_tests::{
    fixtures::{self, Fixture, HostTables, Output, World, hex_diff},
    netns::require_privileges,
};
use lb_userspace::dataplane::{Dataplane, LoadOptions, monotonic_ns};

/// Connection-table size of the test loads.
const FLOW_ENTRIES: u32 = 4096;

/// A flow of either family, as the data path keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    V4(FlowKey),
    V6(Flow6Key),
}

impl Flow {
    fn proto(&self) -> u8 {
        match self {
            Flow::V4(k) => k.proto,
            Flow::V6(k) => k.proto,
        }
    }

    /// The service the flow is addressed to.
    fn vip(&self, world: &World) -> Option<VipInfo> {
        let (addr, port) = match self {
            Flow::V4(k) => (IpAddr::from(k.dst), k.dport),
            Flow::V6(k) => (IpAddr::from(k.dst), k.dport),
        };
        world.vip_info(
            SocketAddr::new(addr, u16::from_be_bytes(port)),
            self.proto(),
        )
    }

    /// The backend id the world's connection table holds for the flow.
    fn world_entry(&self, world: &World) -> Option<u32> {
        match self {
            Flow::V4(key) => world.flows.iter().find(|(k, _, _)| k == key).map(|f| f.1),
            Flow::V6(key) => world.flows6.iter().find(|(k, _, _)| k == key).map(|f| f.1),
        }
    }

    fn host_entry(&self, tables: &HostTables) -> Option<FlowEntry> {
        match self {
            Flow::V4(k) => tables.flows.borrow().get(k).map(|e| **e),
            Flow::V6(k) => tables.flows6.borrow().get(k).map(|e| **e),
        }
    }

    fn kernel_entry(&self, dp: &Dataplane) -> Option<FlowEntry> {
        match self {
            Flow::V4(k) => dp.flow(k),
            Flow::V6(k) => dp.flow6(k),
        }
    }
}

/// The flow of a frame as the data path keys it: the 5-tuple of a TCP/UDP frame, or, for an
/// ICMP error, of the flow of the packet it quotes.
fn frame_flow(frame: &[u8]) -> Option<Flow> {
    match u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?) {
        0x0800 => frame_flow4(frame).map(Flow::V4),
        0x86dd => frame_flow6(frame).map(Flow::V6),
        _ => None,
    }
}

fn frame_flow4(frame: &[u8]) -> Option<FlowKey> {
    let ihl = (frame.get(14)? & 0x0f) as usize * 4;
    let l4 = 14 + ihl;
    if *frame.get(23)? == 1 && *frame.get(l4)? == 3 {
        // An ICMP error: the flow of the packet it quotes, seen from the client (the quoted
        // packet went from the VIP to the client).
        let q = l4 + 8;
        let q_l4 = q + (frame.get(q)? & 0x0f) as usize * 4;
        return Some(FlowKey {
            src: frame.get(q + 16..q + 20)?.try_into().ok()?,
            dst: frame.get(q + 12..q + 16)?.try_into().ok()?,
            sport: frame.get(q_l4 + 2..q_l4 + 4)?.try_into().ok()?,
            dport: frame.get(q_l4..q_l4 + 2)?.try_into().ok()?,
            proto: *frame.get(q + 9)?,
            _pad: [0; 3],
        });
    }
    Some(FlowKey {
        src: frame.get(26..30)?.try_into().ok()?,
        dst: frame.get(30..34)?.try_into().ok()?,
        sport: frame.get(l4..l4 + 2)?.try_into().ok()?,
        dport: frame.get(l4 + 2..l4 + 4)?.try_into().ok()?,
        proto: *frame.get(23)?,
        _pad: [0; 3],
    })
}

fn frame_flow6(frame: &[u8]) -> Option<Flow6Key> {
    // Past hop-by-hop, routing and destination options headers, as the data path skips them.
    let mut next = *frame.get(20)?;
    let mut l4 = 14 + 40;
    while matches!(next, 0 | 43 | 60) {
        next = *frame.get(l4)?;
        l4 += (*frame.get(l4 + 1)? as usize + 1) * 8;
    }
    if next == 58 && matches!(*frame.get(l4)?, 1 | 2) {
        // Destination unreachable, packet too big: the quoted packet's flow, from the client.
        let q = l4 + 8;
        return Some(Flow6Key {
            src: frame.get(q + 24..q + 40)?.try_into().ok()?,
            dst: frame.get(q + 8..q + 24)?.try_into().ok()?,
            sport: frame.get(q + 42..q + 44)?.try_into().ok()?,
            dport: frame.get(q + 40..q + 42)?.try_into().ok()?,
            proto: *frame.get(q + 6)?,
            _pad: [0; 3],
        });
    }
    Some(Flow6Key {
        src: frame.get(22..38)?.try_into().ok()?,
        dst: frame.get(38..54)?.try_into().ok()?,
        sport: frame.get(l4..l4 + 2)?.try_into().ok()?,
        dport: frame.get(l4 + 2..l4 + 4)?.try_into().ok()?,
        proto: next,
        _pad: [0; 3],
    })
}

/// What the connection table must hold for the fixture's flow afterwards, given the backend id
/// the frame went to (`None` if not forwarded): the id when an entry was written, else the
/// world's entry (or none).
fn expected_entry(f: &Fixture, world: &World, sent_to: Option<u32>) -> Option<u32> {
    let flow = frame_flow(&f.input)?;
    if f.flow_events.contains(&FlowStat::Insert) {
        return sent_to;
    }
    flow.world_entry(world)
}

/// Whether the fixture's packet refreshes a UDP entry's idle clock: written now, or a hit.
fn stamps_entry(f: &Fixture) -> bool {
    f.flow_events.contains(&FlowStat::Insert)
        || f.flow_events == [FlowStat::Hit] && frame_flow(&f.input).is_some_and(|k| k.proto() == 17)
}

/// The backend id a forwarded frame went to, from its output MAC and destination VIP.
fn sent_to(world: &World, f: &Fixture, out: &[u8]) -> Option<u32> {
    if f.reason != Reason::Forwarded {
        return None;
    }
    let vip_index = frame_flow(&f.input)?.vip(world)?.vip_index;
    world
        .backends
        .iter()
        .find(|(_, b)| b.mac[..] == out[0..6] && b.vip_index == vip_index)
        .map(|(id, _)| *id)
}

/// The flow events a fixture expects, as (event, count).
fn expected_events(f: &Fixture) -> Vec<(FlowStat, u64)> {
    let mut e: Vec<(FlowStat, u64)> = f.flow_events.iter().map(|&e| (e, 1)).collect();
    e.sort_by_key(|(e, _)| *e as u32);
    e
}

#[test]
fn host_decision() {
    let world = World::standard();
    let mut failures = Vec::new();
    for f in fixtures::all() {
        let tables = HostTables::new(&world);
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
        let events = tables.events();
        if events != expected_events(&f) {
            failures.push(format!(
                "{}: flow events {events:?}, expected {:?}",
                f.name,
                expected_events(&f)
            ));
        }
        let counted_new = verdict.reason == Reason::Forwarded && verdict.new_flow;
        if counted_new != f.new_flow {
            failures.push(format!(
                "{}: new flow {counted_new}, expected {}",
                f.name, f.new_flow
            ));
        }
        let sent = sent_to(&world, &f, &frame);
        if f.reason == Reason::Forwarded && sent != Some(verdict.backend_id) {
            failures.push(format!(
                "{}: verdict names backend {}, the frame went to {sent:?}",
                f.name, verdict.backend_id
            ));
        }
        let entry = frame_flow(&f.input).and_then(|k| k.host_entry(&tables));
        let want = expected_entry(&f, &world, sent);
        if entry.map(|e| e.backend_id) != want {
            failures.push(format!(
                "{}: connection table holds {entry:?} afterwards, expected backend {want:?}",
                f.name
            ));
        }
        if stamps_entry(&f) {
            // Written or refreshed now: the idle clock restarts.
            if entry.map(|e| e.atime) != Some(tables.now) {
                failures.push(format!("{}: entry {entry:?} not stamped with now", f.name));
            }
        }
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

/// Empties the kernel's connection table and fills it with the world's flows, stamped
/// relative to the kernel's clock now.
fn load_flows(dp: &mut Dataplane, world: &World) {
    dp.clear_flows().unwrap();
    let now = monotonic_ns();
    let entry = |id, idle| FlowEntry {
        backend_id: id,
        _pad: 0,
        atime: now - idle,
    };
    for &(k, id, idle) in &world.flows {
        dp.insert_flow(&k, &entry(id, idle)).unwrap();
    }
    for &(k, id, idle) in &world.flows6 {
        dp.insert_flow6(&k, &entry(id, idle)).unwrap();
    }
}

fn load_world(world: &World) -> Dataplane {
    let mut dp = Dataplane::load(LoadOptions {
        ring_entries: world.ring.len() as u32,
        flow_entries: FLOW_ENTRIES,
        flow6_entries: FLOW_ENTRIES,
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
    for (k, v) in &world.vips6 {
        dp.set_vip6(k, v).unwrap();
    }
    for (k, n) in &world.vip_addrs6 {
        dp.set_vip_addr6(k, *n).unwrap();
    }
    load_flows(&mut dp, world);
    dp
}

/// Packets, bytes and new flows per counter the program maintains: per reason, per VIP, per
/// backend; and the connection-table events (as packets).
fn snapshot(dp: &Dataplane, world: &World) -> Vec<(String, u64, u64, u64)> {
    let mut out = Vec::new();
    for (r, c) in Reason::ALL.iter().zip(dp.reason_counters().unwrap()) {
        out.push((format!("reason {}", r.name()), c.packets, c.bytes, c.flows));
    }
    for v in world.vips.values().chain(world.vips6.values()) {
        let c = dp.vip_counter(v.vip_index).unwrap();
        out.push((format!("vip {}", v.vip_index), c.packets, c.bytes, c.flows));
    }
    for id in world.backends.keys() {
        let c = dp.backend_counter(*id).unwrap();
        out.push((format!("backend {id}"), c.packets, c.bytes, c.flows));
    }
    for (e, n) in FlowStat::ALL.iter().zip(dp.flow_counters().unwrap()) {
        out.push((format!("flow {}", e.name()), n, 0, 0));
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
    let mut dp = load_world(&world);
    let mut failures = Vec::new();
    let mut ran = 0;
    for f in fixtures::all() {
        if let Some(why) = f.host_only {
            eprintln!("{}: host only ({why})", f.name);
            continue;
        }
        ran += 1;
        load_flows(&mut dp, &world);
        let before = snapshot(&dp, &world);
        let started = monotonic_ns();
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
            .map(|(b, a)| {
                if b.0.starts_with("flow ") {
                    format!("{} +{}", b.0, a.1 - b.1)
                } else {
                    format!(
                        "{} +{} pkts +{} bytes +{} flows",
                        b.0,
                        a.1 - b.1,
                        a.2 - b.2,
                        a.3 - b.3
                    )
                }
            })
            .collect();
        let len = f.input.len();
        let sent = sent_to(&world, &f, &frame);
        let mut expected_moves: Vec<String> = if f.reason == Reason::Forwarded {
            let info = frame_flow(&f.input)
                .expect("forwarded frames are TCP/UDP")
                .vip(&world)
                .expect("forwarded fixture targets a world VIP");
            let id = sent.expect("output MAC is a backend of the VIP");
            let new = u64::from(f.new_flow);
            vec![
                format!("vip {} +1 pkts +{len} bytes +{new} flows", info.vip_index),
                format!("backend {id} +1 pkts +{len} bytes +{new} flows"),
            ]
        } else {
            vec![format!(
                "reason {} +1 pkts +{len} bytes +0 flows",
                f.reason.name()
            )]
        };
        expected_moves.extend(
            expected_events(&f)
                .iter()
                .map(|(e, n)| format!("flow {} +{n}", e.name())),
        );
        let entry = frame_flow(&f.input).and_then(|k| k.kernel_entry(&dp));
        let want = expected_entry(&f, &world, sent);
        if entry.map(|e| e.backend_id) != want {
            failures.push(format!(
                "{}: connection table holds {entry:?} afterwards, expected backend {want:?}",
                f.name
            ));
        }
        if stamps_entry(&f) && entry.is_some_and(|e| e.atime < started) {
            failures.push(format!(
                "{}: entry {entry:?} not stamped with the run's time",
                f.name
            ));
        }
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

/// The per-CPU insert bound, with 3 inserts a second: of 10 SYNs in a burst, 3 are remembered,
/// 7 counted as rate-limited, and all 10 forwarded by the table.
#[test]
fn host_insert_rate_bound() {
    let mut world = World::standard();
    world.settings.flow_insert_rate = 3;
    let tables = HostTables::new(&world);
    let syn = syn_fixture();
    for _ in 0..10 {
        let mut frame = syn.input.clone();
        let v = process(&mut SliceFrame::new(&mut frame), &tables);
        assert_eq!(v.reason, Reason::Forwarded);
    }
    assert_eq!(
        tables.events(),
        [
            (FlowStat::Syn, 10),
            (FlowStat::Insert, 3),
            (FlowStat::RateLimited, 7)
        ]
    );
}

fn syn_fixture() -> Fixture {
    fixtures::all()
        .into_iter()
        .find(|f| f.name == "tcp_syn_to_vip")
        .unwrap()
}

#[test]
fn kernel_insert_rate_bound() {
    if !require_privileges("kernel_insert_rate_bound") {
        return;
    }
    let mut world = World::standard();
    world.settings.flow_insert_rate = 3;
    // Repetitions run on the frame the previous one rewrote, addressed to the backend by then:
    // let that MAC count as ours, or every repetition after the first is another host's.
    world.settings.alt_mac = fixtures::MAC_B1;
    // A fresh load: every CPU's budget is untouched.
    let dp = load_world(&world);
    let syn = syn_fixture();
    let mut out = vec![0u8; syn.input.len() + 256];
    // One run of 10 repetitions: the kernel keeps a test run on one CPU, so one budget.
    let r = dp
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&syn.input),
            data_out: Some(&mut out),
            repeat: 10,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(r.return_value, Action::Tx as u32);
    let c = dp.flow_counters().unwrap();
    let got: Vec<(&str, u64)> = FlowStat::ALL
        .iter()
        .zip(c)
        .filter(|(_, n)| *n > 0)
        .map(|(e, n)| (e.name(), n))
        .collect();
    assert_eq!(
        got,
        [("syn", 10), ("insert", 3), ("insert_rate_limited", 7)]
    );
    let vip = dp.vip_counter(0).unwrap();
    assert_eq!((vip.packets, vip.flows), (10, 10), "all forwarded, all new");
}

/// Collects the data path's diagnostics.
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// A drop is logged with the address it was sent to: an IPv4 one from the verdict, an IPv6 one
/// read back from the frame (which a drop leaves unchanged).
#[test]
fn kernel_logs_drops_with_their_destination() {
    if !require_privileges("kernel_logs_drops_with_their_destination") {
        return;
    }
    let mut world = World::standard();
    world.settings.log_level = 3; // info: fragments, and no-backend warnings
    let mut dp = load_world(&world);
    let lines = std::sync::Arc::default();
    let mut logger = dp
        .take_logger(Capture(std::sync::Arc::clone(&lines)))
        .expect("the program logs through aya-log");
    // Two reasons: each is logged at most once a second per CPU.
    for name in ["ipv6_first_fragment_to_vip", "vip_with_empty_table"] {
        let f = fixtures::all()
            .into_iter()
            .find(|f| f.name == name)
            .unwrap();
        let (action, _) = run_one(&dp, &f);
        assert_eq!(action, Action::Drop as u32, "{name}");
    }
    logger.flush();
    assert_eq!(
        *lines.lock().unwrap(),
        [
            "fragment to vip address fd00::100 dropped (fragments cannot be steered)",
            "vip 10.0.0.101:80 (index 2) has no backend: dropping its packets",
        ]
    );
}
