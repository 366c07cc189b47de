//! The packet fixture table, run twice with the same maps content: through
//! `lb_common::packet::process` on the host ([`HostTables`]) and through the verified XDP program
//! with `BPF_PROG_TEST_RUN` (see `tests/tests/datapath.rs`).
//!
//! Every fixture runs against one [`World`]: the maps content both runs start from. Each fixture
//! names its input frame, the reason (and so the XDP action) expected, and the expected output
//! frame.

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
};

use lb_common::{
    Reason,
    flows::{self, FlowStat},
    hash::{flow_slot_between, flow_slot_of},
    maps::{
        BACKEND_F_DOWN, BACKEND_F_READY, BackendInfo, Flow6Key, FlowEntry, FlowKey, FlowRate,
        Settings, VIP_FILTER_BITS, Vip6Key, VipAddr6Key, VipAddrKey, VipFilter, VipInfo, VipKey,
        vip_filter_bit, vip_filter_fold6, vip_filter_set, vip_filter_test, vip_key_word,
        vip6_key_word,
    },
    packet::Tables,
};

use crate::packet::{
    self, ALT_MAC, CLIENT_MAC, ETH_P_8021AD, ETH_P_8021Q, Ext6, ICMPV6_DEST_UNREACH,
    ICMPV6_ECHO_REQUEST, ICMPV6_NEIGHBOUR_SOLICITATION, LB_MAC, OTHER_HOST_MAC, Packet, Packet6,
    TCP_ACK, TCP_PSH, TCP_SYN,
};

/// Table size used by the fixture VIPs (small, prime).
pub const M: u32 = 13;

pub const MAC_B1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
/// Backend 2 of the TCP VIP: ready but in no slot (drained), holding established flows.
pub const MAC_B2: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0c];
/// Backend 6 of the VIP whose table is empty: ready, holding an established flow.
pub const MAC_B6: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
/// UDP idle timeout of the standard world.
pub const UDP_TIMEOUT_NS: u64 = 30_000_000_000;
/// The UDP VIP's table has a different backend in every slot (ids from this one on), so a flow
/// that the kernel and the host hash to different slots cannot end at the same MAC.
pub const UDP_FIRST_ID: u32 = 10;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// A VIP whose table is empty (ring_size 0).
pub const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// A VIP whose table points at a backend entry that is not ready.
pub const VIP_BROKEN: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
/// A VIP whose table is all zeros (no backend in any slot).
pub const VIP_ZEROS: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 103);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// The IPv6 VIP address: [`VIP6`]:80/tcp and [`VIP6`]:53/udp.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// The load balancer's own IPv6 address.
pub const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// Backend 30: every slot of the IPv6 TCP VIP's table.
pub const B6_TABLE: u32 = 30;
pub const MAC_B30: [u8; 6] = [0x02, 0, 0, 0, 0x06, 0x1e];
/// Backend 31 of the IPv6 TCP VIP: ready but in no slot (drained), holding an established flow.
pub const B6_DRAINED: u32 = 31;
pub const MAC_B31: [u8; 6] = [0x02, 0, 0, 0, 0x06, 0x1f];
/// Backend 32 of the IPv6 TCP VIP: marked down.
pub const B6_DOWN: u32 = 32;
/// The IPv6 UDP VIP's table has a different backend in every slot, ids from this one on (see
/// [`UDP_FIRST_ID`]).
pub const UDP6_FIRST_ID: u32 = 40;

/// The maps content every fixture starts from.
#[derive(Clone, Debug)]
pub struct World {
    pub settings: Settings,
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub vip_addrs: BTreeMap<VipAddrKey, u32>,
    pub vips6: BTreeMap<Vip6Key, VipInfo>,
    pub vip_addrs6: BTreeMap<VipAddr6Key, u32>,
    /// The flat ring, from entry 0.
    pub ring: Vec<u32>,
    /// Backend entries by id.
    pub backends: BTreeMap<u32, BackendInfo>,
    /// Connection-table entries: the flow, its backend id, and how long ago (ns) it was
    /// written or last refreshed.
    pub flows: Vec<(FlowKey, u32, u64)>,
    /// The IPv6 connection table, likewise.
    pub flows6: Vec<(Flow6Key, u32, u64)>,
}

/// A connection-table key for a flow from `src` to `dst`.
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: src.ip().octets(),
        dst: dst.ip().octets(),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// An IPv6 connection-table key for a flow from `src` to `dst`.
pub fn flow6_key(src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> Flow6Key {
    Flow6Key {
        src: src.ip().octets(),
        dst: dst.ip().octets(),
        sport: src.port().to_be_bytes(),
        dport: dst.port().to_be_bytes(),
        proto,
        _pad: [0; 3],
    }
}

/// Clients whose flows the standard world's connection table holds (see [`World::standard`]).
pub const FLOW_ON_DRAINED: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41000);
pub const FLOW_ON_DOWN: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41001);
pub const FLOW_ON_CLEARED: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41002);
pub const FLOW_ON_OTHER_VIP: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41003);
pub const FLOW_ON_EMPTY_VIP: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41004);
pub const FLOW_ON_BAD_ID: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41005);
/// A flow to VIP:22, a port with no VIP (as after the VIP was removed), remembered on backend 1.
pub const FLOW_OF_NO_VIP: SocketAddrV4 = SocketAddrV4::new(CLIENT, 41006);
pub const UDP_FLOW_IDLE: SocketAddrV4 = SocketAddrV4::new(CLIENT, 5100);
pub const UDP_FLOW_FRESH: SocketAddrV4 = SocketAddrV4::new(CLIENT, 5101);
/// A backend id beyond the BACKENDS array.
pub const BAD_BACKEND_ID: u32 = 70_000;
/// IPv6 clients whose flows the standard world's IPv6 connection table holds.
pub const FLOW6_ON_DRAINED: SocketAddrV6 = SocketAddrV6::new(CLIENT6, 41000, 0, 0);
pub const FLOW6_ON_DOWN: SocketAddrV6 = SocketAddrV6::new(CLIENT6, 41001, 0, 0);
/// Remembered on backend 1, a backend of the IPv4 VIP 10.0.0.100:80.
pub const FLOW6_ON_IPV4_BACKEND: SocketAddrV6 = SocketAddrV6::new(CLIENT6, 41003, 0, 0);
pub const UDP6_FLOW_FRESH: SocketAddrV6 = SocketAddrV6::new(CLIENT6, 5101, 0, 0);

pub fn key(addr: Ipv4Addr, port: u16, proto: u8) -> VipKey {
    VipKey {
        addr: addr.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

pub fn key6(addr: Ipv6Addr, port: u16, proto: u8) -> Vip6Key {
    Vip6Key {
        addr: addr.octets(),
        port: port.to_be_bytes(),
        proto,
        _pad: 0,
    }
}

impl World {
    /// - 10.0.0.100:80/tcp (vip 0): every slot -> backend 1 (MAC_B1).
    /// - 10.0.0.100:53/udp (vip 1): slot i -> backend UDP_FIRST_ID + i (M distinct backends).
    /// - 10.0.0.101:80/tcp (vip 2): ring_size 0.
    /// - 10.0.0.102:80/tcp (vip 3): every slot -> backend 4, which is not ready.
    /// - 10.0.0.103:80/tcp (vip 4): all slots 0.
    ///
    /// Backends beyond the tables: 2 (vip 0, ready, in no slot: drained), 3 (vip 0, marked
    /// down), 5 (vip 0, cleared: a removed backend past its grace), 6 (vip 2, ready).
    ///
    /// The connection table holds one flow on each of them, one on a UDP backend of vip 1 but
    /// keyed to vip 0 (an id of another VIP), one on an id beyond the array, and two UDP flows of
    /// vip 1 on a backend other than the table's: one idle past the timeout, one fresh.
    ///
    /// IPv6, sharing the ring, the vip indexes and the backend ids:
    /// - [fd00::100]:80/tcp (vip 5): every slot -> backend 30 (MAC_B30); 31 ready in no slot
    ///   (drained), 32 marked down.
    /// - [fd00::100]:53/udp (vip 6): slot i -> backend UDP6_FIRST_ID + i.
    ///
    /// The IPv6 connection table holds a flow on 31, one on 32, one on backend 1 (of the IPv4
    /// VIP 0) and a fresh UDP flow of vip 6 on a backend other than the table's.
    pub fn standard() -> World {
        let mut ring = Vec::new();
        let mut vips = BTreeMap::new();
        let mut add = |k: VipKey, index: u32, slots: Option<Vec<u32>>| {
            let base = ring.len() as u32;
            let size = match slots {
                Some(s) => {
                    ring.extend_from_slice(&s);
                    s.len() as u32
                }
                None => 0,
            };
            vips.insert(
                k,
                VipInfo {
                    vip_index: index,
                    ring_base: base,
                    ring_size: size,
                    flags: 0,
                },
            );
        };
        add(key(VIP, 80, 6), 0, Some(vec![1; M as usize]));
        add(
            key(VIP, 53, 17),
            1,
            Some((0..M).map(|i| UDP_FIRST_ID + i).collect()),
        );
        add(key(VIP_EMPTY, 80, 6), 2, None);
        add(key(VIP_BROKEN, 80, 6), 3, Some(vec![4; M as usize]));
        add(key(VIP_ZEROS, 80, 6), 4, Some(vec![0; M as usize]));
        let mut vips6 = BTreeMap::new();
        for (k, index, slots) in [
            (key6(VIP6, 80, 6), 5, vec![B6_TABLE; M as usize]),
            (
                key6(VIP6, 53, 17),
                6,
                (0..M).map(|i| UDP6_FIRST_ID + i).collect(),
            ),
        ] {
            vips6.insert(
                k,
                VipInfo {
                    vip_index: index,
                    ring_base: ring.len() as u32,
                    ring_size: slots.len() as u32,
                    flags: 0,
                },
            );
            ring.extend_from_slice(&slots);
        }
        let vip_word = |index: u32| {
            vips.iter()
                .find(|(_, v)| v.vip_index == index)
                .map(|(k, _)| vip_key_word(k))
                .or_else(|| {
                    vips6
                        .iter()
                        .find(|(_, v)| v.vip_index == index)
                        .map(|(k, _)| vip6_key_word(k))
                })
                .unwrap_or(0)
        };
        let ready = |mac, addr: [u8; 4], vip_index| BackendInfo {
            mac,
            src_mac: LB_MAC,
            _pad: [0; 2],
            flags: BACKEND_F_READY,
            addr,
            vip_index,
            vip: vip_word(vip_index),
        };
        let mut backends = BTreeMap::from([
            (1, ready(MAC_B1, [10, 0, 0, 11], 0)),
            (2, ready(MAC_B2, [10, 0, 0, 12], 0)),
            (
                3,
                BackendInfo {
                    flags: BACKEND_F_READY | BACKEND_F_DOWN,
                    ..ready([0x02, 0, 0, 0, 0, 0x0d], [10, 0, 0, 13], 0)
                },
            ),
            (5, BackendInfo::default()),
            (6, ready(MAC_B6, [10, 0, 0, 16], 2)),
            (
                4,
                BackendInfo {
                    flags: 0,
                    ..ready([0; 6], [10, 0, 0, 14], 3)
                },
            ),
        ]);
        for i in 0..M {
            let n = i as u8;
            backends.insert(
                UDP_FIRST_ID + i,
                ready([0x02, 0, 0, 0, 0x01, n], [10, 0, 1, n], 1),
            );
            backends.insert(
                UDP6_FIRST_ID + i,
                ready([0x02, 0, 0, 0, 0x07, n], [0; 4], 6),
            );
        }
        // IPv6 backends carry no IPv4 address.
        backends.insert(B6_TABLE, ready(MAC_B30, [0; 4], 5));
        backends.insert(B6_DRAINED, ready(MAC_B31, [0; 4], 5));
        backends.insert(
            B6_DOWN,
            BackendInfo {
                flags: BACKEND_F_READY | BACKEND_F_DOWN,
                ..ready([0x02, 0, 0, 0, 0x06, 0x20], [0; 4], 5)
            },
        );
        let vip_addrs = [VIP, VIP_EMPTY, VIP_BROKEN, VIP_ZEROS]
            .into_iter()
            .map(|a| (VipAddrKey { addr: a.octets() }, 1))
            .collect();
        let web = SocketAddrV4::new(VIP, 80);
        let dns = SocketAddrV4::new(VIP, 53);
        let web6 = SocketAddrV6::new(VIP6, 80, 0, 0);
        let dns6 = SocketAddrV6::new(VIP6, 53, 0, 0);
        let mut w = World {
            settings: Settings {
                iface_mac: LB_MAC,
                alt_mac: ALT_MAC,
                log_level: 0,
                flow_insert_rate: 0,
                flow_udp_timeout_ns: UDP_TIMEOUT_NS,
                ..Default::default()
            },
            vips,
            vip_addrs,
            vips6,
            vip_addrs6: BTreeMap::from([(
                VipAddr6Key {
                    addr: VIP6.octets(),
                },
                2,
            )]),
            ring,
            backends,
            flows: vec![
                (flow_key(FLOW_ON_DRAINED, web, 6), 2, 0),
                (flow_key(FLOW_ON_DOWN, web, 6), 3, 0),
                (flow_key(FLOW_ON_CLEARED, web, 6), 5, 0),
                (flow_key(FLOW_ON_OTHER_VIP, web, 6), UDP_FIRST_ID, 0),
                (
                    flow_key(FLOW_ON_EMPTY_VIP, SocketAddrV4::new(VIP_EMPTY, 80), 6),
                    6,
                    0,
                ),
                (flow_key(FLOW_ON_BAD_ID, web, 6), BAD_BACKEND_ID, 0),
                (
                    flow_key(FLOW_OF_NO_VIP, SocketAddrV4::new(VIP, 22), 6),
                    1,
                    0,
                ),
            ],
            flows6: vec![
                (flow6_key(FLOW6_ON_DRAINED, web6, 6), B6_DRAINED, 0),
                (flow6_key(FLOW6_ON_DOWN, web6, 6), B6_DOWN, 0),
                (flow6_key(FLOW6_ON_IPV4_BACKEND, web6, 6), 1, 0),
            ],
        };
        // The UDP flows sit on the backend after the one the table picks, so a packet that
        // follows the table cannot end at the same MAC as one that follows the entry.
        for (client, idle) in [
            (UDP_FLOW_IDLE, UDP_TIMEOUT_NS + 1_000_000_000),
            (UDP_FLOW_FRESH, 1_000_000_000),
        ] {
            let other = UDP_FIRST_ID + (w.expected_id(client, dns, 17) - UDP_FIRST_ID + 1) % M;
            w.flows.push((flow_key(client, dns, 17), other, idle));
        }
        let table = w.expected_id6(UDP6_FLOW_FRESH, dns6, 17);
        let other = UDP6_FIRST_ID + (table - UDP6_FIRST_ID + 1) % M;
        w.flows6
            .push((flow6_key(UDP6_FLOW_FRESH, dns6, 17), other, 1_000_000_000));
        w
    }

    /// The VIP entry of the service a socket address names, of either family.
    pub fn vip_info(&self, vip: SocketAddr, proto: u8) -> Option<VipInfo> {
        match vip {
            SocketAddr::V4(a) => self.vips.get(&key(*a.ip(), a.port(), proto)).copied(),
            SocketAddr::V6(a) => self.vips6.get(&key6(*a.ip(), a.port(), proto)).copied(),
        }
    }

    /// The backend id the IPv6 VIP's table gives a flow.
    pub fn expected_id6(&self, src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> u32 {
        let info = self.vips6[&key6(*dst.ip(), dst.port(), proto)];
        let slot = flow_slot_of(src.into(), dst.into(), proto, info.ring_size).expect("one family");
        self.ring[(info.ring_base + slot) as usize]
    }

    /// The backend MAC the world sends an IPv6 flow to, computed from the ring.
    pub fn expected_mac6(&self, src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> [u8; 6] {
        self.backends[&self.expected_id6(src, dst, proto)].mac
    }

    /// The backend id the world's IPv6 connection table holds for a flow.
    pub fn flow6_backend(&self, src: SocketAddrV6, dst: SocketAddrV6, proto: u8) -> u32 {
        let k = flow6_key(src, dst, proto);
        self.flows6
            .iter()
            .find(|(f, _, _)| *f == k)
            .map(|&(_, id, _)| id)
            .expect("a flow of the world")
    }

    /// The backend id the world's connection table holds for a flow.
    pub fn flow_backend(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> u32 {
        let k = flow_key(src, dst, proto);
        self.flows
            .iter()
            .find(|(f, _, _)| *f == k)
            .map(|&(_, id, _)| id)
            .expect("a flow of the world")
    }

    /// The backend id the VIP's table gives a flow.
    pub fn expected_id(&self, src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> u32 {
        let info = self.vips[&key(*dst.ip(), dst.port(), proto)];
        let slot = flow_slot_between(src, dst, proto, info.ring_size);
        self.ring[(info.ring_base + slot) as usize]
    }

    /// The backend MAC the world sends a flow to, computed from the ring as the data path does.
    pub fn expected_mac(&self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> [u8; 6] {
        let id = self.expected_id(
            SocketAddrV4::new(src.0, src.1),
            SocketAddrV4::new(dst.0, dst.1),
            proto,
        );
        self.backends[&id].mac
    }
}

/// The host's clock in [`HostTables`]: far from 0, like the kernel's time since boot.
pub const HOST_NOW_NS: u64 = 1_000_000_000_000;

/// [`Tables`] over a [`World`], for host runs: the world's maps, plus the state the program
/// writes (connection table, insert budget, event counters), starting from the world's.
pub struct HostTables<'a> {
    pub world: &'a World,
    pub flows: RefCell<BTreeMap<FlowKey, Box<FlowEntry>>>,
    pub flows6: RefCell<BTreeMap<Flow6Key, Box<FlowEntry>>>,
    pub rate: RefCell<FlowRate>,
    pub events: RefCell<[u64; FlowStat::COUNT as usize]>,
    pub now: u64,
}

impl<'a> HostTables<'a> {
    pub fn new(world: &'a World) -> Self {
        let now = HOST_NOW_NS;
        fn table<K: Ord + Copy>(flows: &[(K, u32, u64)], now: u64) -> BTreeMap<K, Box<FlowEntry>> {
            flows
                .iter()
                .map(|&(k, id, idle)| {
                    (
                        k,
                        Box::new(FlowEntry {
                            backend_id: id,
                            _pad: 0,
                            atime: now - idle,
                        }),
                    )
                })
                .collect()
        }
        HostTables {
            world,
            flows: RefCell::new(table(&world.flows, now)),
            flows6: RefCell::new(table(&world.flows6, now)),
            rate: RefCell::new(FlowRate::default()),
            events: RefCell::new([0; FlowStat::COUNT as usize]),
            now,
        }
    }

    /// The events counted, as (event, count) for those above 0, in index order.
    pub fn events(&self) -> Vec<(FlowStat, u64)> {
        FlowStat::ALL
            .iter()
            .zip(*self.events.borrow())
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| (*e, n))
            .collect()
    }
}

impl Tables for HostTables<'_> {
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.world.vips.get(key).copied()
    }
    fn vip6(&self, key: &Vip6Key) -> Option<VipInfo> {
        self.world.vips6.get(key).copied()
    }
    fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool {
        // The kernel's filter, built the way the agent builds it (false positives included).
        let mut filter: VipFilter = [0; (VIP_FILTER_BITS / 64) as usize];
        for k in self.world.vip_addrs.keys() {
            vip_filter_set(&mut filter, k.addr);
        }
        for k in self.world.vip_addrs6.keys() {
            vip_filter_set(&mut filter, vip_filter_fold6(&k.addr));
        }
        vip_filter_test(&filter, addr)
    }

    fn is_vip_addr(&self, key: &VipAddrKey) -> bool {
        self.world.vip_addrs.contains_key(key)
    }
    fn is_vip_addr6(&self, key: &VipAddr6Key) -> bool {
        self.world.vip_addrs6.contains_key(key)
    }
    fn ring(&self, index: u32) -> Option<u32> {
        self.world.ring.get(index as usize).copied()
    }
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        // The kernel's BACKENDS array has every id below its size, zeroed until written.
        static EMPTY: BackendInfo = BackendInfo {
            mac: [0; 6],
            flags: 0,
            src_mac: [0; 6],
            _pad: [0; 2],
            addr: [0; 4],
            vip_index: 0,
            vip: 0,
        };
        match self.world.backends.get(&id) {
            Some(b) => Some(b),
            None if id < lb_common::maps::MAX_BACKENDS => Some(&EMPTY),
            None => None,
        }
    }
    fn settings(&self) -> Option<&Settings> {
        Some(&self.world.settings)
    }
    fn flow(&self, key: &FlowKey) -> Option<*mut FlowEntry> {
        let mut flows = self.flows.borrow_mut();
        // The box keeps the entry where it is until it is replaced or removed.
        flows.get_mut(key).map(|b| &mut **b as *mut FlowEntry)
    }
    fn insert_flow(&self, key: &FlowKey, entry: &FlowEntry) -> bool {
        self.flows.borrow_mut().insert(*key, Box::new(*entry));
        true
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
        flows::admit(&mut self.rate.borrow_mut(), now, limit)
    }
    fn flow_event(&self, stat: FlowStat) {
        self.events.borrow_mut()[stat as usize] += 1;
    }
    fn now_ns(&self) -> u64 {
        self.now
    }
}

/// What the frame should look like after the program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Passed or dropped: not modified.
    Unchanged,
    /// Forwarded: this exact frame.
    Frame(Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct Fixture {
    pub name: &'static str,
    pub input: Vec<u8>,
    pub reason: Reason,
    pub output: Output,
    /// Why this fixture cannot run through `BPF_PROG_TEST_RUN`, if it cannot.
    pub host_only: Option<&'static str>,
    /// The connection-table events the packet causes, each counted once.
    pub flow_events: &'static [FlowStat],
    /// Whether it counts as a new flow of its VIP and backend.
    pub new_flow: bool,
}

/// A TCP SYN decided by the table and remembered.
pub const SYN_INSERT: &[FlowStat] = &[FlowStat::Syn, FlowStat::Insert];
/// A packet of a flow the connection table does not know, decided by the table and remembered.
pub const MISS_INSERT: &[FlowStat] = &[FlowStat::Miss, FlowStat::Insert];

impl Fixture {
    fn flows(mut self, events: &'static [FlowStat], new_flow: bool) -> Self {
        self.flow_events = events;
        self.new_flow = new_flow;
        self
    }
}

/// A router on the client's path says "fragmentation needed, MTU 1500" about `quoted`, a packet
/// a backend sent from the VIP, addressed to the VIP: its IP header and first 8 bytes after it.
fn icmp_error(quoted: Packet) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    m.extend_from_slice(&quoted.ip_bytes()[..28]);
    Packet::raw(ROUTER, VIP, 1).payload(&m).frame()
}

/// A router between the backends and the clients.
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);

fn fwd(name: &'static str, input: Vec<u8>, mac: [u8; 6]) -> Fixture {
    let mut out = input.clone();
    out[0..6].copy_from_slice(&mac);
    out[6..12].copy_from_slice(&LB_MAC);
    Fixture {
        name,
        input,
        reason: Reason::Forwarded,
        output: Output::Frame(out),
        host_only: None,
        flow_events: &[],
        new_flow: false,
    }
}

fn same(name: &'static str, input: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        name,
        input,
        reason,
        output: Output::Unchanged,
        host_only: None,
        flow_events: &[],
        new_flow: false,
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// An address that is not a VIP address but has the same bit in the VIP address filter as
/// `vip`: the filter lets its frames through to the exact lookups, which must pass them.
fn filter_twin(vip: Ipv4Addr) -> Ipv4Addr {
    let bit = vip_filter_bit(vip.octets());
    (1..=u32::MAX)
        .map(|n| Ipv4Addr::from(0xc0a8_0000 + n))
        .find(|a| *a != vip && vip_filter_bit(a.octets()) == bit)
        .expect("a 16-bit filter has twins")
}

/// The fixture table.
pub fn all() -> Vec<Fixture> {
    let w = World::standard();
    let client = sa(CLIENT, 40000);
    let web = sa(VIP, 80);
    let syn = Packet::tcp(client, web, TCP_SYN);
    let udp_flows: Vec<Fixture> = [
        (5000u16, "udp_to_vip_flow_a"),
        (5001, "udp_to_vip_flow_b"),
        (5002, "udp_to_vip_flow_c"),
        (5003, "udp_to_vip_flow_d"),
        (5004, "udp_to_vip_flow_e"),
        (5005, "udp_to_vip_flow_f"),
        (61000, "udp_to_vip_flow_g"),
        (65535, "udp_to_vip_flow_h"),
    ]
    .into_iter()
    .map(|(port, name)| {
        let p = Packet::udp(sa(CLIENT, port), sa(VIP, 53)).payload(b"query");
        fwd(
            name,
            p.frame(),
            w.expected_mac((CLIENT, port), (VIP, 53), 17),
        )
        .flows(MISS_INSERT, true)
    })
    .collect();
    let mut v = vec![
        fwd("tcp_syn_to_vip", syn.frame(), MAC_B1).flows(SYN_INSERT, true),
        fwd(
            "tcp_data_to_vip",
            Packet::tcp(client, web, TCP_ACK | TCP_PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .frame(),
            MAC_B1,
        )
        .flows(MISS_INSERT, false),
        fwd(
            "tcp_to_vip_with_ip_options",
            syn.clone().ip_options(&[0x01, 0x01, 0x01, 0x00]).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "tcp_to_vip_with_max_ip_options",
            syn.clone().ip_options(&[0x01; 40]).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd("tcp_to_vip_ttl_0", syn.clone().ttl(0).frame(), MAC_B1).flows(SYN_INSERT, true),
        fwd("tcp_to_vip_ttl_1", syn.clone().ttl(1).frame(), MAC_B1).flows(SYN_INSERT, true),
        fwd(
            "tcp_to_vip_with_ethernet_padding",
            syn.clone().padding(6).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "tcp_to_vip_dont_fragment_is_not_a_fragment",
            syn.clone().frags(0x4000).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "tcp_to_vip_from_any_source_mac",
            syn.clone().macs(LB_MAC, [0x0e, 1, 2, 3, 4, 5]).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        same(
            "tcp_to_vip_address_unconfigured_port",
            Packet::tcp(client, sa(VIP, 22), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "udp_to_tcp_only_port",
            Packet::udp(client, web).frame(),
            Reason::PassNotVip,
        ),
        same(
            "tcp_to_udp_only_port",
            Packet::tcp(client, sa(VIP, 53), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "tcp_to_lb_own_address",
            Packet::tcp(client, sa(OTHER, 80), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "ssh_to_lb_host",
            Packet::tcp(client, sa(OTHER, 22), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "malformed_ipv4_to_lb_host_is_left_to_the_kernel",
            Packet::tcp(client, sa(OTHER, 80), TCP_SYN).ihl(4).frame(),
            Reason::PassNotVip,
        ),
        same(
            "icmp_echo_to_lb_host",
            Packet::icmp_echo(CLIENT, OTHER).frame(),
            Reason::PassNotVip,
        ),
        same(
            "tcp_to_address_sharing_the_vip_filter_bit",
            Packet::tcp(client, sa(filter_twin(VIP), 80), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "fragment_to_address_sharing_the_vip_filter_bit",
            Packet::tcp(client, sa(filter_twin(VIP), 80), TCP_SYN)
                .frags(0x2000)
                .frame(),
            Reason::PassNotVip,
        ),
        same(
            "icmp_echo_to_vip",
            Packet::icmp_echo(CLIENT, VIP).payload(b"ping").frame(),
            Reason::PassIpProto,
        ),
        same(
            "gre_to_vip",
            Packet::raw(CLIENT, VIP, 47).payload(&[0; 8]).frame(),
            Reason::PassIpProto,
        ),
        same(
            "unknown_ip_protocol_253",
            Packet::raw(CLIENT, VIP, 253).payload(&[1, 2, 3]).frame(),
            Reason::PassIpProto,
        ),
        same(
            "arp_request_for_vip",
            packet::arp_request(CLIENT, VIP),
            Reason::PassNotIp,
        ),
        same(
            "vlan_8021q_tagged_to_vip",
            packet::vlan_tagged(&syn.frame(), ETH_P_8021Q, 10),
            Reason::PassVlan,
        ),
        same(
            "vlan_8021ad_tagged_to_vip",
            packet::vlan_tagged(&syn.frame(), ETH_P_8021AD, 10),
            Reason::PassVlan,
        ),
        Fixture {
            host_only: Some("BPF_PROG_TEST_RUN rejects frames shorter than an Ethernet header"),
            ..same(
                "runt_frame_10_bytes",
                vec![0xff; 10],
                Reason::DropMalformedEth,
            )
        },
        same(
            "ipv4_header_truncated",
            syn.frame()[..14 + 12].to_vec(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_ihl_4",
            syn.clone().ihl(4).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_ihl_0",
            syn.clone().ihl(0).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_version_6_in_ipv4_ethertype",
            syn.clone().version(6).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_total_length_beyond_frame",
            syn.clone().tot_len(1000).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_total_length_below_header",
            syn.clone().tot_len(16).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv4_ihl_15_beyond_total_length",
            // IHL 15 claims 60 header bytes; the packet is 40 bytes long.
            syn.clone().ihl(15).tot_len(40).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "tcp_header_truncated",
            {
                let f = syn.clone().tot_len(20 + 10).frame();
                f[..14 + 20 + 10].to_vec()
            },
            Reason::DropMalformedL4,
        ),
        same(
            "tcp_header_truncated_by_total_length",
            syn.clone().tot_len(20 + 12).frame(),
            Reason::DropMalformedL4,
        ),
        same(
            "udp_header_truncated",
            {
                let f = Packet::udp(client, sa(VIP, 53)).tot_len(20 + 4).frame();
                f[..14 + 20 + 4].to_vec()
            },
            Reason::DropMalformedL4,
        ),
        same(
            "first_fragment_to_vip",
            syn.clone().frags(0x2000).frame(),
            Reason::DropFragment,
        ),
        same(
            "middle_fragment_to_vip",
            syn.clone().frags(0x2000 | 185).frame(),
            Reason::DropFragment,
        ),
        same(
            "last_fragment_to_vip",
            Packet::udp(client, sa(VIP, 53))
                .payload(&[7; 16])
                .frags(370)
                .frame(),
            Reason::DropFragment,
        ),
        same(
            "fragment_to_other_address",
            Packet::udp(client, sa(OTHER, 53)).frags(0x2000).frame(),
            Reason::PassNotVip,
        ),
        same(
            "vip_with_empty_table",
            Packet::tcp(client, sa(VIP_EMPTY, 80), TCP_SYN).frame(),
            Reason::DropNoBackend,
        )
        .flows(&[FlowStat::Syn], false),
        same(
            "vip_with_zero_slots",
            Packet::tcp(client, sa(VIP_ZEROS, 80), TCP_SYN).frame(),
            Reason::DropNoBackend,
        )
        .flows(&[FlowStat::Syn], false),
        same(
            "vip_backend_not_ready",
            Packet::tcp(client, sa(VIP_BROKEN, 80), TCP_SYN).frame(),
            Reason::DropBackendInvalid,
        )
        .flows(&[FlowStat::Syn], false),
    ];
    v.extend(udp_flows);
    v.extend(flow_fixtures(&w));
    v.extend(ipv6_fixtures(&w));
    v
}

/// The connection table: packets of flows the standard world remembers.
fn flow_fixtures(w: &World) -> Vec<Fixture> {
    let web = sa(VIP, 80);
    let dns = sa(VIP, 53);
    let ack = |client| {
        Packet::tcp(client, web, TCP_ACK)
            .payload(b"more data")
            .frame()
    };
    let udp = |client| Packet::udp(client, dns).payload(b"query").frame();
    let mac_of = |id: u32| w.backends[&id].mac;
    vec![
        fwd(
            "established_flow_stays_on_drained_backend",
            ack(FLOW_ON_DRAINED),
            MAC_B2,
        )
        .flows(&[FlowStat::Hit], false),
        // Flooded to us (unknown unicast, a promiscuous port): the master's business, not ours,
        // whether the flow is remembered here or not.
        // ICMP errors about VIP flows (path MTU discovery): to the flow's backend.
        fwd(
            "icmp_frag_needed_for_a_vip_flow_goes_to_its_backend",
            icmp_error(Packet::tcp(sa(VIP, 80), sa(CLIENT, 41234), TCP_ACK)),
            w.expected_mac((CLIENT, 41234), (VIP, 80), 6),
        ),
        fwd(
            "icmp_frag_needed_for_a_remembered_flow_goes_to_its_backend",
            icmp_error(Packet::tcp(web, FLOW_ON_DRAINED, TCP_ACK)),
            MAC_B2,
        ),
        same(
            "icmp_error_about_a_non_vip_packet_passes",
            icmp_error(Packet::icmp_echo(VIP, CLIENT)),
            Reason::PassIpProto,
        ),
        same(
            "icmp_error_quoting_too_little_is_malformed",
            Packet::raw(ROUTER, VIP, 1)
                .payload(&{
                    let mut m = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
                    m.extend_from_slice(
                        &Packet::tcp(web, FLOW_ON_DRAINED, TCP_ACK).ip_bytes()[..22],
                    );
                    m
                })
                .frame(),
            Reason::DropMalformedL4,
        ),
        same(
            "established_flow_addressed_to_another_host_passes",
            Packet::tcp(FLOW_ON_DRAINED, web, TCP_ACK)
                .macs(OTHER_HOST_MAC, CLIENT_MAC)
                .frame(),
            Reason::PassOtherHost,
        ),
        same(
            "syn_addressed_to_another_host_passes",
            Packet::tcp(FLOW_ON_DRAINED, web, TCP_SYN)
                .macs(OTHER_HOST_MAC, CLIENT_MAC)
                .frame(),
            Reason::PassOtherHost,
        )
        .flows(&[FlowStat::Syn], false),
        fwd(
            "syn_addressed_to_the_alternative_mac_is_forwarded",
            Packet::tcp(FLOW_ON_DRAINED, web, TCP_SYN)
                .macs(ALT_MAC, CLIENT_MAC)
                .frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "syn_on_remembered_tuple_is_decided_by_the_table",
            Packet::tcp(FLOW_ON_DRAINED, web, TCP_SYN).frame(),
            MAC_B1,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "syn_ack_is_not_a_new_connection",
            Packet::tcp(FLOW_ON_DRAINED, web, TCP_SYN | TCP_ACK).frame(),
            MAC_B2,
        )
        .flows(&[FlowStat::Hit], false),
        fwd(
            "flow_on_backend_marked_down_is_remapped",
            ack(FLOW_ON_DOWN),
            MAC_B1,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "flow_on_cleared_backend_is_remapped",
            ack(FLOW_ON_CLEARED),
            MAC_B1,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "flow_on_backend_of_another_vip_is_remapped",
            ack(FLOW_ON_OTHER_VIP),
            MAC_B1,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "flow_on_backend_id_beyond_the_array_is_remapped",
            ack(FLOW_ON_BAD_ID),
            MAC_B1,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "established_flow_survives_an_empty_table",
            Packet::tcp(FLOW_ON_EMPTY_VIP, sa(VIP_EMPTY, 80), TCP_ACK).frame(),
            MAC_B6,
        )
        .flows(&[FlowStat::Hit], false),
        same(
            "remembered_flow_of_a_port_without_vip_is_passed",
            Packet::tcp(FLOW_OF_NO_VIP, sa(VIP, 22), TCP_ACK).frame(),
            Reason::PassNotVip,
        ),
        same(
            "unknown_flow_to_empty_table_is_dropped",
            Packet::tcp(sa(CLIENT, 41999), sa(VIP_EMPTY, 80), TCP_ACK).frame(),
            Reason::DropNoBackend,
        )
        .flows(&[FlowStat::Miss], false),
        fwd(
            "udp_flow_within_idle_timeout_sticks",
            udp(UDP_FLOW_FRESH),
            mac_of(w.flow_backend(UDP_FLOW_FRESH, dns, 17)),
        )
        .flows(&[FlowStat::Hit], false),
        fwd(
            "udp_flow_idle_past_timeout_is_a_new_flow",
            udp(UDP_FLOW_IDLE),
            mac_of(w.expected_id(UDP_FLOW_IDLE, dns, 17)),
        )
        .flows(&[FlowStat::Expired, FlowStat::Insert], true),
    ]
}

/// An IPv6 address that is not a VIP address but has the same bit in the VIP address filter as
/// `vip` (see [`filter_twin`]).
fn filter_twin6(vip: Ipv6Addr) -> Ipv6Addr {
    let bit = vip_filter_bit(vip_filter_fold6(&vip.octets()));
    (1..=u32::MAX)
        .map(|n| Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0001_0000_0000u128 + n as u128))
        .find(|a| *a != vip && vip_filter_bit(vip_filter_fold6(&a.octets())) == bit)
        .expect("a 16-bit filter has twins")
}

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddrV6 {
    SocketAddrV6::new(ip, port, 0, 0)
}

/// A router between the backends and the IPv6 clients.
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);

/// IPv6: the same decisions as IPv4, over the IPv6 world (see [`World::standard`]).
fn ipv6_fixtures(w: &World) -> Vec<Fixture> {
    let client = sa6(CLIENT6, 40000);
    let web = sa6(VIP6, 80);
    let dns = sa6(VIP6, 53);
    let syn = Packet6::tcp(client, web, TCP_SYN);
    let ack = |client| {
        Packet6::tcp(client, web, TCP_ACK)
            .payload(b"more data")
            .frame()
    };
    let udp = |client| Packet6::udp(client, dns).payload(b"query").frame();
    let hbh = Ext6::HopByHop { units: 0 };
    let dest = Ext6::DestOpts { units: 1 };
    let routing = |segments_left| Ext6::Routing {
        units: 2,
        segments_left,
    };
    let first_fragment = Ext6::Fragment {
        offset: 0,
        more: true,
    };
    let udp_table = sa6(CLIENT6, 5000);
    vec![
        fwd("ipv6_tcp_syn_to_vip", syn.frame(), MAC_B30).flows(SYN_INSERT, true),
        fwd(
            "ipv6_established_flow_stays_on_drained_backend",
            ack(FLOW6_ON_DRAINED),
            MAC_B31,
        )
        .flows(&[FlowStat::Hit], false),
        fwd("ipv6_unknown_flow_is_remembered", ack(client), MAC_B30).flows(MISS_INSERT, false),
        fwd(
            "ipv6_flow_on_backend_marked_down_is_remapped",
            ack(FLOW6_ON_DOWN),
            MAC_B30,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "ipv6_flow_on_backend_of_an_ipv4_vip_is_remapped",
            ack(FLOW6_ON_IPV4_BACKEND),
            MAC_B30,
        )
        .flows(&[FlowStat::Remapped, FlowStat::Insert], false),
        fwd(
            "ipv6_syn_on_remembered_tuple_is_decided_by_the_table",
            Packet6::tcp(FLOW6_ON_DRAINED, web, TCP_SYN).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        same(
            "ipv6_established_flow_addressed_to_another_host_passes",
            Packet6::tcp(FLOW6_ON_DRAINED, web, TCP_ACK)
                .macs(OTHER_HOST_MAC, CLIENT_MAC)
                .frame(),
            Reason::PassOtherHost,
        ),
        fwd(
            "ipv6_udp_new_flow",
            udp(udp_table),
            w.expected_mac6(udp_table, dns, 17),
        )
        .flows(MISS_INSERT, true),
        fwd(
            "ipv6_udp_flow_within_idle_timeout_sticks",
            udp(UDP6_FLOW_FRESH),
            w.backends[&w.flow6_backend(UDP6_FLOW_FRESH, dns, 17)].mac,
        )
        .flows(&[FlowStat::Hit], false),
        fwd(
            "ipv6_tcp_to_vip_with_ethernet_padding",
            syn.clone().padding(6).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "ipv6_tcp_to_vip_hop_limit_0",
            syn.clone().hop_limit(0).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        // Extension headers before the TCP header are skipped, the frame forwarded unchanged.
        fwd(
            "ipv6_syn_after_hop_by_hop_options",
            syn.clone().ext(hbh.clone()).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "ipv6_syn_after_destination_options",
            syn.clone().ext(dest.clone()).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "ipv6_syn_after_routing_header_without_segments_left",
            syn.clone().ext(routing(0)).frame(),
            MAC_B30,
        )
        .flows(SYN_INSERT, true),
        fwd(
            "ipv6_udp_after_four_extension_headers",
            Packet6::udp(udp_table, dns)
                .payload(b"query")
                .ext(hbh.clone())
                .ext(dest.clone())
                .ext(routing(0))
                .ext(dest.clone())
                .frame(),
            w.expected_mac6(udp_table, dns, 17),
        )
        .flows(MISS_INSERT, true),
        same(
            "ipv6_five_extension_headers_are_the_kernels",
            syn.clone()
                .ext(hbh.clone())
                .ext(dest.clone())
                .ext(routing(0))
                .ext(dest.clone())
                .ext(dest.clone())
                .frame(),
            Reason::PassIpv6,
        ),
        same(
            "ipv6_routing_header_with_segments_left_is_the_kernels",
            syn.clone().ext(routing(1)).frame(),
            Reason::PassIpv6,
        ),
        same(
            "ipv6_extension_header_truncated_by_the_frame",
            {
                // The frame (and the payload length) end 2 bytes into the destination options.
                let f = syn.clone().ext(dest.clone()).payload_len(2).frame();
                f[..14 + 40 + 2].to_vec()
            },
            Reason::DropMalformedIp,
        ),
        same(
            "ipv6_extension_header_truncated_by_payload_length",
            // The destination options claim 16 bytes, the payload length leaves 12.
            syn.clone().ext(dest.clone()).payload_len(12).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv6_first_fragment_to_vip",
            syn.clone().ext(first_fragment.clone()).frame(),
            Reason::DropFragment,
        ),
        same(
            "ipv6_last_fragment_to_vip",
            Packet6::udp(client, dns)
                .payload(&[7; 16])
                .ext(Ext6::Fragment {
                    offset: 185,
                    more: false,
                })
                .frame(),
            Reason::DropFragment,
        ),
        same(
            "ipv6_fragment_to_other_address",
            Packet6::udp(client, sa6(OTHER6, 53))
                .ext(first_fragment.clone())
                .frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_fragment_to_address_sharing_the_vip_filter_bit",
            Packet6::tcp(client, sa6(filter_twin6(VIP6), 80), TCP_SYN)
                .ext(first_fragment.clone())
                .frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_icmp_echo_fragment_to_vip_is_the_kernels",
            Packet6::icmp6(CLIENT6, VIP6, ICMPV6_ECHO_REQUEST, 0, 7 << 16 | 1)
                .payload(&[0; 16])
                .ext(first_fragment)
                .frame(),
            Reason::PassIpProto,
        ),
        same(
            "ipv6_tcp_header_truncated",
            {
                let f = syn.clone().payload_len(10).frame();
                f[..14 + 40 + 10].to_vec()
            },
            Reason::DropMalformedL4,
        ),
        same(
            "ipv6_tcp_header_truncated_by_payload_length",
            syn.clone().payload_len(19).frame(),
            Reason::DropMalformedL4,
        ),
        same(
            "ipv6_udp_header_truncated",
            {
                let f = Packet6::udp(client, dns).payload_len(6).frame();
                f[..14 + 40 + 6].to_vec()
            },
            Reason::DropMalformedL4,
        ),
        same(
            "ipv6_header_truncated",
            syn.frame()[..14 + 39].to_vec(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv6_version_4_in_ipv6_ethertype",
            syn.clone().version(4).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv6_payload_length_beyond_frame",
            syn.clone().payload_len(1000).frame(),
            Reason::DropMalformedIp,
        ),
        same(
            "ipv6_tcp_to_lb_own_address",
            Packet6::tcp(client, sa6(OTHER6, 22), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_malformed_to_lb_own_address_is_left_to_the_kernel",
            Packet6::tcp(client, sa6(OTHER6, 22), TCP_SYN)
                .version(4)
                .frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_tcp_to_vip_address_unconfigured_port",
            Packet6::tcp(client, sa6(VIP6, 22), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_tcp_to_address_sharing_the_vip_filter_bit",
            Packet6::tcp(client, sa6(filter_twin6(VIP6), 80), TCP_SYN).frame(),
            Reason::PassNotVip,
        ),
        same(
            "ipv6_esp_to_vip",
            Packet6::raw(CLIENT6, VIP6, 50).payload(&[0; 16]).frame(),
            Reason::PassIpProto,
        ),
        same(
            "ipv6_no_next_header_to_vip",
            Packet6::raw(CLIENT6, VIP6, 59).frame(),
            Reason::PassIpProto,
        ),
        same(
            "ipv6_icmp_echo_to_vip",
            Packet6::icmp6(CLIENT6, VIP6, ICMPV6_ECHO_REQUEST, 0, 7 << 16 | 1)
                .payload(b"ping")
                .frame(),
            Reason::PassIpProto,
        ),
        same(
            "ipv6_neighbour_solicitation_for_vip",
            {
                // Unicast (neighbour unreachability detection): target address, then a source
                // link-layer address option.
                let mut ns = VIP6.octets().to_vec();
                ns.extend_from_slice(&[1, 1]);
                ns.extend_from_slice(&CLIENT_MAC);
                Packet6::icmp6(CLIENT6, VIP6, ICMPV6_NEIGHBOUR_SOLICITATION, 0, 0)
                    .hop_limit(255)
                    .payload(&ns)
                    .frame()
            },
            Reason::PassIpProto,
        ),
        // ICMPv6 errors about VIP flows (path MTU discovery): to the flow's backend.
        fwd(
            "ipv6_packet_too_big_for_a_vip_flow_goes_to_its_backend",
            Packet6::packet_too_big(
                ROUTER6,
                VIP6,
                &Packet6::udp(dns, udp_table).payload(&[0; 1400]),
                1232,
            )
            .frame(),
            w.expected_mac6(udp_table, dns, 17),
        ),
        fwd(
            "ipv6_packet_too_big_for_a_remembered_flow_goes_to_its_backend",
            Packet6::packet_too_big(
                ROUTER6,
                VIP6,
                &Packet6::tcp(web, FLOW6_ON_DRAINED, TCP_ACK).payload(&[0; 1400]),
                1232,
            )
            .frame(),
            MAC_B31,
        ),
        fwd(
            "ipv6_destination_unreachable_for_a_vip_flow_goes_to_its_backend",
            {
                let about = Packet6::tcp(web, FLOW6_ON_DRAINED, TCP_ACK).ip_bytes();
                Packet6::icmp6(ROUTER6, VIP6, ICMPV6_DEST_UNREACH, 3, 0)
                    .payload(&about)
                    .frame()
            },
            MAC_B31,
        ),
        same(
            "ipv6_icmp_error_about_a_non_vip_packet_passes",
            Packet6::packet_too_big(
                ROUTER6,
                VIP6,
                &Packet6::tcp(sa6(OTHER6, 22), client, TCP_ACK),
                60,
            )
            .frame(),
            Reason::PassIpProto,
        ),
        same(
            "ipv6_icmp_error_quoting_too_little_is_malformed",
            Packet6::packet_too_big(
                ROUTER6,
                VIP6,
                &Packet6::tcp(web, FLOW6_ON_DRAINED, TCP_ACK),
                42,
            )
            .frame(),
            Reason::DropMalformedL4,
        ),
    ]
}

/// Hex dump diff of two frames, for assertion messages.
pub fn hex_diff(expected: &[u8], actual: &[u8]) -> String {
    let mut out = String::new();
    let n = expected.len().max(actual.len());
    for row in (0..n).step_by(16) {
        let e: Vec<String> = (row..(row + 16).min(n))
            .map(|i| expected.get(i).map_or("  ".into(), |b| format!("{b:02x}")))
            .collect();
        let a: Vec<String> = (row..(row + 16).min(n))
            .map(|i| actual.get(i).map_or("  ".into(), |b| format!("{b:02x}")))
            .collect();
        let mark = if e == a { " " } else { "!" };
        out.push_str(&format!(
            "{mark} {row:04x}  expected {}  actual {}\n",
            e.join(" "),
            a.join(" ")
        ));
    }
    out
}
