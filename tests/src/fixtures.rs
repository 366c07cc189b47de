//! The packet fixture table, run twice with the same maps content: through
//! `lb_common::packet::process` on the host ([`HostTables`]) and through the verified XDP program
//! with `BPF_PROG_TEST_RUN` (see `tests/tests/datapath.rs`).
//!
//! Every fixture runs against one [`World`]: the maps content both runs start from. Each fixture
//! names its input frame, the reason (and so the XDP action) expected, and the expected output
//! frame.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::{
    Reason,
    hash::flow_slot_between,
    maps::{
        BACKEND_F_READY, BackendInfo, Settings, VIP_FILTER_BITS, VipAddrKey, VipFilter, VipInfo,
        VipKey, vip_filter_bit, vip_filter_set, vip_filter_test,
    },
    packet::Tables,
};

use crate::packet::{self, ETH_P_8021AD, ETH_P_8021Q, LB_MAC, Packet, TCP_ACK, TCP_PSH, TCP_SYN};

/// Table size used by the fixture VIPs (small, prime).
pub const M: u32 = 13;

pub const MAC_B1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
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

/// The maps content every fixture starts from.
#[derive(Clone, Debug)]
pub struct World {
    pub settings: Settings,
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub vip_addrs: BTreeMap<VipAddrKey, u32>,
    /// The flat ring, from entry 0.
    pub ring: Vec<u32>,
    /// Backend entries by id.
    pub backends: BTreeMap<u32, BackendInfo>,
}

pub fn key(addr: Ipv4Addr, port: u16, proto: u8) -> VipKey {
    VipKey {
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
        let ready = |mac, addr: [u8; 4], vip_index| BackendInfo {
            mac,
            src_mac: LB_MAC,
            _pad: [0; 2],
            flags: BACKEND_F_READY,
            addr,
            vip_index,
        };
        let mut backends = BTreeMap::from([
            (1, ready(MAC_B1, [10, 0, 0, 11], 0)),
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
        }
        let vip_addrs = [VIP, VIP_EMPTY, VIP_BROKEN, VIP_ZEROS]
            .into_iter()
            .map(|a| (VipAddrKey { addr: a.octets() }, 1))
            .collect();
        World {
            settings: Settings {
                iface_mac: LB_MAC,
                log_level: 0,
                ..Default::default()
            },
            vips,
            vip_addrs,
            ring,
            backends,
        }
    }

    /// The backend MAC the world sends a flow to, computed from the ring as the data path does.
    pub fn expected_mac(&self, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8) -> [u8; 6] {
        let info = self.vips[&key(dst.0, dst.1, proto)];
        let slot = flow_slot_between(
            std::net::SocketAddrV4::new(src.0, src.1),
            std::net::SocketAddrV4::new(dst.0, dst.1),
            proto,
            info.ring_size,
        );
        let id = self.ring[(info.ring_base + slot) as usize];
        self.backends[&id].mac
    }
}

/// [`Tables`] over a [`World`], for host runs.
pub struct HostTables<'a>(pub &'a World);

impl Tables for HostTables<'_> {
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.0.vips.get(key).copied()
    }
    fn maybe_vip_addr(&self, addr: [u8; 4]) -> bool {
        // The kernel's filter, built the way the agent builds it (false positives included).
        let mut filter: VipFilter = [0; (VIP_FILTER_BITS / 64) as usize];
        for k in self.0.vip_addrs.keys() {
            vip_filter_set(&mut filter, k.addr);
        }
        vip_filter_test(&filter, addr)
    }

    fn is_vip_addr(&self, key: &VipAddrKey) -> bool {
        self.0.vip_addrs.contains_key(key)
    }
    fn ring(&self, index: u32) -> Option<u32> {
        self.0.ring.get(index as usize).copied()
    }
    fn backend(&self, id: u32) -> Option<&BackendInfo> {
        self.0.backends.get(&id)
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
}

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
    }
}

fn same(name: &'static str, input: Vec<u8>, reason: Reason) -> Fixture {
    Fixture {
        name,
        input,
        reason,
        output: Output::Unchanged,
        host_only: None,
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> std::net::SocketAddrV4 {
    std::net::SocketAddrV4::new(ip, port)
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
    })
    .collect();
    let mut v = vec![
        fwd("tcp_syn_to_vip", syn.frame(), MAC_B1),
        fwd(
            "tcp_data_to_vip",
            Packet::tcp(client, web, TCP_ACK | TCP_PSH)
                .payload(b"GET / HTTP/1.1\r\n\r\n")
                .frame(),
            MAC_B1,
        ),
        fwd(
            "tcp_to_vip_with_ip_options",
            syn.clone().ip_options(&[0x01, 0x01, 0x01, 0x00]).frame(),
            MAC_B1,
        ),
        fwd(
            "tcp_to_vip_with_max_ip_options",
            syn.clone().ip_options(&[0x01; 40]).frame(),
            MAC_B1,
        ),
        fwd("tcp_to_vip_ttl_0", syn.clone().ttl(0).frame(), MAC_B1),
        fwd("tcp_to_vip_ttl_1", syn.clone().ttl(1).frame(), MAC_B1),
        fwd(
            "tcp_to_vip_with_ethernet_padding",
            syn.clone().padding(6).frame(),
            MAC_B1,
        ),
        fwd(
            "tcp_to_vip_dont_fragment_is_not_a_fragment",
            syn.clone().frags(0x4000).frame(),
            MAC_B1,
        ),
        fwd(
            "tcp_to_vip_from_any_source_mac",
            syn.clone().macs(LB_MAC, [0x0e, 1, 2, 3, 4, 5]).frame(),
            MAC_B1,
        ),
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
        same("ipv6_tcp_syn", packet::ipv6_tcp_syn(), Reason::PassIpv6),
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
        ),
        same(
            "vip_with_zero_slots",
            Packet::tcp(client, sa(VIP_ZEROS, 80), TCP_SYN).frame(),
            Reason::DropNoBackend,
        ),
        same(
            "vip_backend_not_ready",
            Packet::tcp(client, sa(VIP_BROKEN, 80), TCP_SYN).frame(),
            Reason::DropBackendInvalid,
        ),
    ];
    v.extend(udp_flows);
    v
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
