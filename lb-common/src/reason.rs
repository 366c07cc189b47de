//! Why the data path did what it did with a packet.
//!
//! Every packet leaves the program under exactly one [`Reason`], and every reason is counted
//! (packets and bytes, per CPU) in the `REASON_STATS` map at the reason's index, except
//! [`Reason::Forwarded`], which is counted per VIP and per backend instead. The reason also fixes
//! the XDP action, so the two can never disagree.

/// The XDP action a [`Reason`] implies. Values are the kernel's `enum xdp_action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
}

/// The outcome of one packet. The discriminant is the index into `REASON_STATS`; it is part of the
/// map layout shared with the agent, so values are only ever appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    /// For a VIP: destination MAC rewritten to the backend's, sent back out with `XDP_TX`.
    Forwarded = 0,
    /// Not IP at all (ARP, LLDP, ...): the kernel's business.
    PassNotIp = 1,
    /// IPv6 the data path does not steer, left to the kernel's stack: a routing header with
    /// segments left (the VIP is not the packet's final destination), or more extension headers
    /// than the data path skips (`lb_common::packet::IPV6_MAX_EXT_HDRS`). (The name is older
    /// than IPv6 load balancing: before it, every IPv6 frame was counted here.)
    PassIpv6 = 2,
    /// 802.1Q / 802.1ad tagged frame: passed to the kernel untouched.
    PassVlan = 3,
    /// Neither TCP nor UDP (ICMP and ICMPv6 other than errors about VIP flows, neighbour
    /// discovery, GRE, AH, ESP, ...), or a fragment of such a packet: passed to the kernel.
    PassIpProto = 4,
    /// IPv4 or IPv6 to an address that has no VIP, TCP or UDP not addressed to a configured
    /// VIP:port, or a fragment not addressed to a VIP address: passed to the kernel.
    PassNotVip = 5,
    /// Frame shorter than an Ethernet header.
    DropMalformedEth = 6,
    /// IPv4 header truncated, version not 4, IHL < 5, or total length inconsistent with the
    /// header length or the frame. IPv6 header truncated, version not 6, payload length past
    /// the frame, or an extension header past the frame or the payload length. Only for VIP
    /// addresses: to other addresses such frames are `PassNotVip`.
    DropMalformedIp = 7,
    /// TCP or UDP header truncated (by the frame or by the IP total or payload length), or an
    /// ICMP/ICMPv6 error to a VIP address too short to quote the ports of a flow.
    DropMalformedL4 = 8,
    /// A TCP or UDP fragment (first or not; IPv4, or IPv6 with a fragment header) addressed to
    /// a VIP address. Non-first fragments carry no ports, so they cannot be steered to the
    /// backend of their flow; all fragments to a VIP address are dropped so a datagram is never
    /// half-delivered.
    DropFragment = 9,
    /// The VIP matched but its table is empty (no usable backend).
    DropNoBackend = 10,
    /// The table pointed at a backend slot the agent has not (or no longer) filled.
    DropBackendInvalid = 11,
    /// A map lookup that cannot fail did (ring index out of range, settings missing): a bug or a
    /// half-initialised data path.
    DropInternal = 12,
    /// For a VIP, but the frame is addressed to another host's MAC (a switch flooding unknown
    /// unicast, a promiscuous interface): the kernel drops it, as it would without the program.
    /// A backup of an HA pair must not forward what the master forwards.
    PassOtherHost = 13,
}

impl Reason {
    /// Number of reasons: the size of the `REASON_STATS` map.
    pub const COUNT: u32 = 14;

    /// Every reason in index order, for the agent's reports.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Forwarded,
        Reason::PassNotIp,
        Reason::PassIpv6,
        Reason::PassVlan,
        Reason::PassIpProto,
        Reason::PassNotVip,
        Reason::DropMalformedEth,
        Reason::DropMalformedIp,
        Reason::DropMalformedL4,
        Reason::DropFragment,
        Reason::DropNoBackend,
        Reason::DropBackendInvalid,
        Reason::DropInternal,
        Reason::PassOtherHost,
    ];

    #[inline(always)]
    pub const fn action(self) -> Action {
        match self {
            Reason::Forwarded => Action::Tx,
            Reason::PassNotIp
            | Reason::PassIpv6
            | Reason::PassVlan
            | Reason::PassIpProto
            | Reason::PassNotVip
            | Reason::PassOtherHost => Action::Pass,
            Reason::DropMalformedEth
            | Reason::DropMalformedIp
            | Reason::DropMalformedL4
            | Reason::DropFragment
            | Reason::DropNoBackend
            | Reason::DropBackendInvalid
            | Reason::DropInternal => Action::Drop,
        }
    }

    /// Stable snake_case name used in status output, JSON and Prometheus labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Forwarded => "forwarded",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassIpv6 => "pass_ipv6",
            Reason::PassVlan => "pass_vlan",
            Reason::PassIpProto => "pass_ip_proto",
            Reason::PassNotVip => "pass_not_vip",
            Reason::DropMalformedEth => "drop_malformed_eth",
            Reason::DropMalformedIp => "drop_malformed_ip",
            Reason::DropMalformedL4 => "drop_malformed_l4",
            Reason::DropFragment => "drop_fragment",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBackendInvalid => "drop_backend_invalid",
            Reason::DropInternal => "drop_internal",
            Reason::PassOtherHost => "pass_other_host",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{}", r.name());
        }
    }

    #[test]
    fn prefixes_match_actions() {
        for r in Reason::ALL {
            let expected = if r.name().starts_with("pass_") {
                Action::Pass
            } else if r.name().starts_with("drop_") {
                Action::Drop
            } else {
                Action::Tx
            };
            assert_eq!(r.action(), expected, "{}", r.name());
        }
    }
}
