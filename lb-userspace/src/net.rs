//! The kernel's view of the network, through rtnetlink: the interface we attach to, whether a
//! backend is on-link, and backend MAC addresses from the neighbour table.
//!
//! MAC resolution contract ([`watch_macs`]): for every backend address the agent asks for, the
//! kernel is told to keep the neighbour entry resolved (a "managed" entry, `NTF_EXT_MANAGED`,
//! Linux >= 5.16; on older kernels a datagram to the discard port triggers ARP instead), and the
//! watcher reports the current MAC of each address (or `None` while unresolved) every time it
//! changes, driven by neighbour events for those addresses plus a periodic resync. It never
//! invents a MAC: an address is `Some` only while the kernel holds a valid link-layer address for
//! it.
//!
//! Entries xdplb creates or converts carry the protocol number [`NEIGH_PROTO_XDPLB`], so whichever
//! xdplb instance stops last on an interface (without `--keep-forwarding`) can remove them, and
//! entries an administrator made are never touched.
//!
//! Backends of both families are handled alike: IPv4 neighbours are resolved by ARP, IPv6 ones by
//! neighbour discovery, and both kinds of entry can be managed. The discard-port datagram goes to
//! `ADDR:9` or `[ADDR]:9`.
//!
//! For high availability: addresses are added and removed idempotently (a VIP already held,
//! or already gone, is not an error); IPv6 ones skip duplicate address detection
//! (`IFA_F_NODAD`), so a VIP taken over is usable at once instead of after DAD's second, and [`watch_link`] reports whether the interface is usable
//! (administratively up and with carrier), driven by link events plus a resync every
//! [`LINK_RESYNC_INTERVAL`], so a lost event leaves it wrong for at most that long.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::{
        InfoData, InfoKind, InfoMacVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage, LinkXdp,
        MacVlanMode, XdpAttached,
    },
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType},
};
use rtnetlink::{
    AddressMessageBuilder, Handle, LinkMacVlan, LinkUnspec, MulticastGroup, RouteMessageBuilder,
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

#[derive(Debug, Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink request `{what}` failed: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface `{name}` does not exist")]
    NoSuchInterface { name: String },
    #[error("interface `{name}` has no Ethernet MAC address (dsr-l2 needs an Ethernet device)")]
    NoMac { name: String },
    #[error("cannot {what}: no interface has index {index}")]
    NoSuchIfindex { index: u32, what: String },
    #[error(
        "interface `{name}` already exists but is not {wanted} (it is {found}); not touching it"
    )]
    LinkConflict {
        name: String,
        wanted: String,
        found: String,
    },
}

/// The positive errno of a kernel netlink error, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(-m.raw_code()),
        _ => None,
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// What the agent needs to know about its interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub up: bool,
    pub mtu: Option<u32>,
    /// Id of the XDP program attached to it, if any.
    pub xdp_prog_id: Option<u32>,
    /// How that program is attached: "driver", "generic", "offload" or "multiple".
    pub xdp_mode: Option<&'static str>,
}

/// How the kernel would route to a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub local: bool,
}

/// A neighbour table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub state: NeighbourState,
    pub managed: bool,
    /// Created or converted by xdplb (marked with [`NEIGH_PROTO_XDPLB`]).
    pub ours: bool,
}

/// Protocol number (`NDA_PROTOCOL`, `ip neigh ... proto 213`) marking neighbour entries xdplb
/// made; any unassigned value below 256 would do.
pub const NEIGH_PROTO_XDPLB: u8 = 213;

/// A handle on rtnetlink (the connection runs as a tokio task).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    pub fn new() -> Result<Netlink, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn interface(&self, name: &str) -> Result<Interface, NetError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        let msg = match links.try_next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => {
                return Err(NetError::NoSuchInterface {
                    name: name.to_string(),
                });
            }
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(NetError::NoSuchInterface {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(nl(format!("get link {name}"))(e)),
        };
        let mut mac = None;
        let mut mtu = None;
        let mut xdp_prog_id = None;
        let mut xdp_mode = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Address(a) if a.len() == 6 => {
                    mac = Some(<[u8; 6]>::try_from(a.as_slice()).expect("length checked"));
                }
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::Xdp(xdp) => {
                    for x in xdp {
                        match x {
                            LinkXdp::ProgId(id) if *id != 0 => xdp_prog_id = Some(*id),
                            LinkXdp::Attached(a) => {
                                xdp_mode = match a {
                                    XdpAttached::Driver => Some("driver"),
                                    XdpAttached::SocketBuffer => Some("generic"),
                                    XdpAttached::Hardware => Some("offload"),
                                    XdpAttached::Multiple => Some("multiple"),
                                    _ => None,
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Interface {
            name: name.to_string(),
            index: msg.header.index,
            mac: mac.ok_or_else(|| NetError::NoMac {
                name: name.to_string(),
            })?,
            up: msg.header.flags.contains(LinkFlags::Up),
            mtu,
            xdp_prog_id,
            xdp_mode,
        })
    }

    /// `ip route get ADDR`, for either family.
    pub async fn route_to(&self, addr: IpAddr) -> Result<RouteInfo, NetError> {
        let msg = match addr {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(msg).execute();
        let mut info = RouteInfo {
            oif: None,
            gateway: None,
            local: false,
        };
        if let Some(route) = routes
            .try_next()
            .await
            .map_err(nl(format!("route get {addr}")))?
        {
            info.local = route.header.kind == RouteType::Local;
            for attr in &route.attributes {
                match attr {
                    RouteAttribute::Oif(i) => info.oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => {
                        info.gateway = Some((*g).into())
                    }
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => {
                        info.gateway = Some((*g).into())
                    }
                    _ => {}
                }
            }
        }
        Ok(info)
    }

    /// IPv4 and IPv6 neighbours on `ifindex`.
    pub async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>, NetError> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = self.handle.neighbours().get();
            req = req.set_address_family(family);
            let mut stream = req.execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(nl(format!("neighbour dump ({family:?})")))?
            {
                if msg.header.ifindex != ifindex {
                    continue;
                }
                if let Some(n) = parse_neighbour(&msg) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Asks the kernel to resolve `addr` and keep it resolved (`ip neigh add ADDR dev IF
    /// managed`). An existing entry is converted in place, keeping its MAC and state, so a
    /// resolved backend never looks unresolved in between.
    pub async fn make_managed(
        &self,
        ifindex: u32,
        addr: IpAddr,
        existing: Option<&Neighbour>,
    ) -> Result<(), NetError> {
        let mut req = self.handle.neighbours().add(ifindex, addr);
        req = match existing {
            None => req.state(NeighbourState::None),
            Some(n) => match n.mac {
                Some(mac) => req.state(n.state).link_layer_address(&mac).replace(),
                None => req.state(NeighbourState::None).replace(),
            },
        };
        let attrs = &mut req.message_mut().attributes;
        attrs.push(NeighbourAttribute::ExtFlags(NeighbourExtFlags::Managed));
        attrs.push(NeighbourAttribute::Protocol(RouteProtocol::from(
            NEIGH_PROTO_XDPLB,
        )));
        req.execute()
            .await
            .map_err(nl(format!("make neighbour {addr} managed")))
    }

    pub async fn del_neighbour(&self, ifindex: u32, addr: IpAddr) -> Result<(), NetError> {
        let mut msg = NeighbourMessage::default();
        let (family, destination) = match addr {
            IpAddr::V4(a) => (AddressFamily::Inet, NeighbourAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, NeighbourAddress::Inet6(a)),
        };
        msg.header.family = family;
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(destination));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("delete neighbour {addr}")))
    }

    /// The IPv4 addresses on `ifindex` with their prefix lengths, in the kernel's order (the one
    /// `ip -4 addr show` prints: primaries first, each in the order it was added, then
    /// secondaries).
    pub async fn ipv4_addresses(&self, ifindex: u32) -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
        Ok(self
            .ipv4_entries(ifindex)
            .await?
            .into_iter()
            .map(|e| (e.addr, e.prefix))
            .collect())
    }

    /// The first address on `ifindex` that is neither a secondary (`IFA_F_SECONDARY`) nor in
    /// `exclude`: the address VRRP adverts are sent from. The VIPs must be excluded by the
    /// caller because a VIP added with its own prefix (typically /32) is a primary address too.
    pub async fn primary_ipv4(
        &self,
        ifindex: u32,
        exclude: &BTreeSet<Ipv4Addr>,
    ) -> Result<Option<Ipv4Addr>, NetError> {
        Ok(self
            .ipv4_entries(ifindex)
            .await?
            .into_iter()
            .find(|e| !e.secondary && !exclude.contains(&e.addr))
            .map(|e| e.addr))
    }

    async fn ipv4_entries(&self, ifindex: u32) -> Result<Vec<Ipv4Entry>, NetError> {
        let mut req = self.handle.address().get().set_link_index_filter(ifindex);
        req.message_mut().header.family = AddressFamily::Inet;
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream
            .try_next()
            .await
            .map_err(nl(format!("IPv4 address dump for ifindex {ifindex}")))?
        {
            out.extend(parse_ipv4_address(&msg));
        }
        // A dump cannot tell "no addresses" from "no such interface"; only the latter is an error.
        if out.is_empty() && self.link_name(ifindex).await.is_none() {
            return Err(NetError::NoSuchIfindex {
                index: ifindex,
                what: "list IPv4 addresses".to_string(),
            });
        }
        Ok(out)
    }

    /// `ip addr add ADDR/PREFIX dev IF` (with `nodad` for IPv6: no duplicate address
    /// detection, so the address is usable at once rather than after DAD's probes, as an HA
    /// VIP taken over must be); an address already there with that prefix is success, so taking
    /// over VIPs can be retried blindly.
    pub async fn add_address(
        &self,
        ifindex: u32,
        addr: impl Into<IpAddr>,
        prefix: u8,
    ) -> Result<(), NetError> {
        let addr = addr.into();
        let mut req = self.handle.address().add(ifindex, addr, prefix);
        if addr.is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let result = req.execute().await;
        match result {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self
                .failure(ifindex, format!("add address {addr}/{prefix}"), e)
                .await),
        }
    }

    /// `ip addr del ADDR/PREFIX dev IF`; an address that is not there (with that prefix) is
    /// success. A missing interface is still an error ([`NetError::NoSuchIfindex`]): it more
    /// likely means a wrong index than an address already released.
    ///
    /// Removing a primary address also removes the secondaries of its subnet unless the
    /// interface has `promote_secondaries` set; a VIP with its own prefix (/32) is unaffected.
    pub async fn del_address(
        &self,
        ifindex: u32,
        addr: impl Into<IpAddr>,
        prefix: u8,
    ) -> Result<(), NetError> {
        let addr = addr.into();
        let msg = match addr {
            IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
                .index(ifindex)
                .address(a, prefix)
                .build(),
            IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
                .index(ifindex)
                .address(a, prefix)
                .build(),
        };
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(e) => Err(self
                .failure(ifindex, format!("delete address {addr}/{prefix}"), e)
                .await),
        }
    }

    /// Whether `ifindex` is up and has carrier, read now.
    pub async fn link_state(&self, ifindex: u32) -> Result<LinkState, NetError> {
        let msg = self.link_by_index(ifindex, "read link state").await?;
        Ok(LinkState::from_flags(msg.header.flags))
    }

    /// Creates (or adopts) macvlan `name` on `parent` with `mac`, in private mode, and sets it
    /// up; returns its ifindex. Used for the VRRP virtual MAC ([`crate::ha::arp::virtual_mac`]).
    /// Private mode, as keepalived uses, keeps the macvlan from talking to sibling macvlans on
    /// the same parent. An existing interface called `name` is adopted only if it is exactly
    /// that (left by an earlier run); anything else is an error and left alone.
    pub async fn create_macvlan(
        &self,
        parent: u32,
        name: &str,
        mac: [u8; 6],
    ) -> Result<u32, NetError> {
        let wanted = format!(
            "a private-mode macvlan on ifindex {parent} with MAC {}",
            fmt_mac(&mac)
        );
        let existing = match self.link_by_name(name).await? {
            Some(msg) => Some(msg),
            None => {
                let msg = LinkMacVlan::new(name, parent, MacVlanMode::Private)
                    .address(mac.to_vec())
                    .up()
                    .build();
                match self.handle.link().add(msg).execute().await {
                    Ok(()) => None,
                    // Someone created it between the lookup and the add; judge theirs below.
                    Err(e) if errno(&e) == Some(libc::EEXIST) => None,
                    Err(e) if errno(&e) == Some(libc::ENODEV) => {
                        return Err(NetError::NoSuchIfindex {
                            index: parent,
                            what: format!("create macvlan `{name}` on it"),
                        });
                    }
                    Err(e) => {
                        return Err(self
                            .failure(parent, format!("create macvlan `{name}` ({wanted})"), e)
                            .await);
                    }
                }
            }
        };
        let msg = match existing {
            Some(msg) => msg,
            None => self
                .link_by_name(name)
                .await?
                .ok_or_else(|| NetError::NoSuchInterface {
                    name: name.to_string(),
                })?,
        };
        let found = MacvlanInfo::of(&msg);
        if !found.is(parent, mac, MacVlanMode::Private) {
            return Err(NetError::LinkConflict {
                name: name.to_string(),
                wanted,
                found: found.describe(),
            });
        }
        let index = msg.header.index;
        if !msg.header.flags.contains(LinkFlags::Up) {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl(format!("set macvlan `{name}` (ifindex {index}) up")))?;
        }
        Ok(index)
    }

    /// `ip link del`; an interface already gone is success.
    pub async fn delete_link(&self, ifindex: u32) -> Result<(), NetError> {
        match self.handle.link().del(ifindex).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(self.failure(ifindex, "delete link".to_string(), e).await),
        }
    }

    async fn link_by_index(&self, ifindex: u32, what: &str) -> Result<LinkMessage, NetError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(NetError::NoSuchIfindex {
                index: ifindex,
                what: what.to_string(),
            }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(NetError::NoSuchIfindex {
                index: ifindex,
                what: what.to_string(),
            }),
            Err(e) => Err(nl(format!("{what}: get link ifindex {ifindex}"))(e)),
        }
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(msg) => Ok(msg),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl(format!("get link {name}"))(e)),
        }
    }

    /// The interface's name, for error messages; `None` if it does not exist (or cannot be
    /// read, which does not matter there).
    async fn link_name(&self, ifindex: u32) -> Option<String> {
        let msg = self.link_by_index(ifindex, "").await.ok()?;
        msg.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
    }

    /// The error for a failed request about `ifindex`, naming the interface when it still exists.
    async fn failure(&self, ifindex: u32, what: String, source: rtnetlink::Error) -> NetError {
        match self.link_name(ifindex).await {
            None if errno(&source) == Some(libc::ENODEV) => NetError::NoSuchIfindex {
                index: ifindex,
                what,
            },
            None => NetError::Netlink {
                what: format!("{what} on ifindex {ifindex}"),
                source,
            },
            Some(name) => NetError::Netlink {
                what: format!("{what} on `{name}` (ifindex {ifindex})"),
                source,
            },
        }
    }
}

struct Ipv4Entry {
    addr: Ipv4Addr,
    prefix: u8,
    secondary: bool,
}

fn parse_ipv4_address(msg: &AddressMessage) -> Option<Ipv4Entry> {
    if msg.header.family != AddressFamily::Inet {
        return None;
    }
    let mut local = None;
    let mut address = None;
    let mut secondary = msg.header.flags.contains(AddressHeaderFlags::Secondary);
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(a)) => local = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => address = Some(*a),
            // The header holds only the low 8 flag bits; the attribute, when present, all 32.
            AddressAttribute::Flags(f) => secondary |= f.contains(AddressFlags::Secondary),
            _ => {}
        }
    }
    // On point-to-point links IFA_ADDRESS is the peer; IFA_LOCAL is always our own.
    Some(Ipv4Entry {
        addr: local.or(address)?,
        prefix: msg.header.prefix_len,
        secondary,
    })
}

/// What an existing link is, as far as [`Netlink::create_macvlan`] cares.
struct MacvlanInfo {
    kind: Option<String>,
    parent: Option<u32>,
    mac: Option<[u8; 6]>,
    mode: Option<MacVlanMode>,
}

impl MacvlanInfo {
    fn of(msg: &LinkMessage) -> MacvlanInfo {
        let mut info = MacvlanInfo {
            kind: None,
            parent: None,
            mac: None,
            mode: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::Link(p) => info.parent = Some(*p),
                LinkAttribute::Address(a) => info.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        match i {
                            LinkInfo::Kind(k) => info.kind = Some(k.to_string()),
                            LinkInfo::Data(InfoData::MacVlan(d)) => {
                                for x in d {
                                    if let InfoMacVlan::Mode(m) = x {
                                        info.mode = Some(*m);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }

    fn is(&self, parent: u32, mac: [u8; 6], mode: MacVlanMode) -> bool {
        self.kind.as_deref() == Some(&InfoKind::MacVlan.to_string())
            && self.parent == Some(parent)
            && self.mac == Some(mac)
            && self.mode == Some(mode)
    }

    fn describe(&self) -> String {
        let opt = |o: Option<String>| o.unwrap_or_else(|| "?".to_string());
        format!(
            "a {} on ifindex {} with MAC {} in mode {}",
            opt(self.kind.clone()),
            opt(self.parent.map(|p| p.to_string())),
            opt(self.mac.as_ref().map(fmt_mac)),
            opt(self.mode.map(|m| m.to_string())),
        )
    }
}

/// Whether an interface can carry traffic, as VRRP interface tracking sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up (`IFF_UP`, `ip link set IF up`).
    pub up: bool,
    /// Carrier present (`IFF_LOWER_UP`): the cable, or a veth's peer, is up.
    pub running: bool,
}

impl LinkState {
    /// Up and with carrier: the only state in which this node can be a useful master.
    pub fn usable(&self) -> bool {
        self.up && self.running
    }

    fn from_flags(flags: LinkFlags) -> LinkState {
        LinkState {
            up: flags.contains(LinkFlags::Up),
            running: flags.contains(LinkFlags::LowerUp),
        }
    }
}

type LinkEvents = futures::channel::mpsc::UnboundedReceiver<(
    netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// How often [`watch_link`] re-reads the link even without events.
pub const LINK_RESYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Keeps `tx` equal to the state of `ifindex` (a deleted interface is down), notifying receivers
/// only on change. Reads the link at once and then every [`LINK_RESYNC_INTERVAL`], and applies
/// link events as they come, so a change shows within milliseconds, or within the resync
/// interval if its event was lost (netlink multicast drops events when the socket's buffer
/// overflows). Runs until every receiver is dropped.
pub async fn watch_link(nl: Netlink, ifindex: u32, tx: watch::Sender<LinkState>) {
    let publish = |state: LinkState| {
        tx.send_if_modified(|cur| {
            if *cur == state {
                return false;
            }
            info!(
                ifindex,
                up = state.up,
                carrier = state.running,
                "interface {}",
                if state.usable() {
                    "usable"
                } else {
                    "not usable"
                }
            );
            *cur = state;
            true
        });
    };
    let mut events: Option<LinkEvents> = None;
    let mut tick = tokio::time::interval(LINK_RESYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tx.closed() => break,
            _ = tick.tick() => {
                // (Re)subscribe before reading, so no change falls between the read and the
                // subscription.
                if events.is_none() {
                    match rtnetlink::new_multicast_connection(&[MulticastGroup::Link]) {
                        Ok((conn, _handle, rx)) => {
                            tokio::spawn(conn);
                            events = Some(rx);
                        }
                        Err(e) => warn!(
                            ifindex,
                            "cannot subscribe to link events ({e}); polling every \
                             {LINK_RESYNC_INTERVAL:?}"
                        ),
                    }
                }
                match nl.link_state(ifindex).await {
                    Ok(state) => publish(state),
                    Err(NetError::NoSuchIfindex { .. }) => publish(LinkState::default()),
                    Err(e) => warn!(ifindex, "reading the link state failed: {e}"),
                }
            }
            ev = async {
                match events.as_mut() {
                    Some(rx) => rx.next().await,
                    None => std::future::pending().await,
                }
            } => match ev {
                None => {
                    debug!(ifindex, "link event subscription ended; resubscribing");
                    events = None;
                }
                Some((msg, _)) => match msg.payload {
                    netlink_packet_core::NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(m),
                    ) if m.header.index == ifindex => publish(LinkState::from_flags(m.header.flags)),
                    netlink_packet_core::NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::DelLink(m),
                    ) if m.header.index == ifindex => publish(LinkState::default()),
                    _ => {}
                },
            },
        }
    }
}

fn parse_neighbour(msg: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut mac = None;
    let mut managed = false;
    let mut ours = false;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                addr = Some(IpAddr::V4(*a))
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                addr = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                mac = <[u8; 6]>::try_from(l.as_slice()).ok();
            }
            NeighbourAttribute::ExtFlags(f) => managed = f.contains(NeighbourExtFlags::Managed),
            NeighbourAttribute::Protocol(p) => ours = u8::from(*p) == NEIGH_PROTO_XDPLB,
            _ => {}
        }
    }
    let state = msg.header.state;
    // The kernel may report the last lladdr of an entry that is not valid any more.
    let valid = matches!(
        state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    Some(Neighbour {
        addr: addr?,
        mac: if valid {
            mac.filter(|m| *m != [0; 6])
        } else {
            None
        },
        state,
        managed,
        ours,
    })
}

/// Backend MACs as last seen, by address of either family: `None` while unresolved.
pub type MacTable = BTreeMap<IpAddr, Option<[u8; 6]>>;

/// How often the watcher re-reads the neighbour table even without events, and re-pokes
/// resolution of addresses still unresolved.
const RESYNC_INTERVAL: Duration = Duration::from_secs(2);
/// Events come in bursts (one per state change); read the table once per burst.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Keeps the MACs of `addrs` resolved and sends the whole table on `tx` whenever any of them
/// changes (and once at start). Runs until `addrs`' sender is dropped or `tx` is closed; then,
/// if `cleanup` is true, removes the neighbour entries xdplb made for those addresses.
pub async fn watch_macs(
    nl: Netlink,
    ifindex: u32,
    mut addrs: watch::Receiver<BTreeSet<IpAddr>>,
    tx: mpsc::Sender<MacTable>,
    cleanup: watch::Receiver<bool>,
) {
    let mut events = match rtnetlink::new_multicast_connection(&[MulticastGroup::Neigh]) {
        Ok((conn, _handle, events)) => {
            tokio::spawn(conn);
            Some(events)
        }
        Err(e) => {
            warn!(
                "cannot subscribe to neighbour events ({e}); relying on polling every \
                 {RESYNC_INTERVAL:?}"
            );
            None
        }
    };
    let mut wanted = addrs.borrow_and_update().clone();
    let mut last: Option<MacTable> = None;
    let mut tick = tokio::time::interval(RESYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    loop {
        if dirty {
            dirty = false;
            match sync_once(&nl, ifindex, &wanted).await {
                Ok(table) => {
                    if last.as_ref() != Some(&table) {
                        if tx.send(table.clone()).await.is_err() {
                            break;
                        }
                        last = Some(table);
                    }
                }
                Err(e) => warn!("reading the neighbour table failed: {e}"),
            }
        }
        tokio::select! {
            _ = tick.tick() => dirty = true,
            r = addrs.changed() => {
                if r.is_err() {
                    break;
                }
                wanted = addrs.borrow_and_update().clone();
                dirty = true;
            }
            _ = tx.closed() => break,
            ev = async {
                match events.as_mut() {
                    Some(rx) => rx.next().await,
                    None => std::future::pending().await,
                }
            } => match ev {
                None => events = None,
                Some((msg, _)) if concerns(&msg, ifindex, &wanted) => {
                    // Events come in bursts (one per state change): read the table once for
                    // the whole burst, not once per event.
                    tokio::time::sleep(DEBOUNCE).await;
                    if let Some(rx) = events.as_mut() {
                        while let Some(Some(_)) = rx.next().now_or_never() {}
                    }
                    dirty = true;
                }
                Some(_) => {}
            },
        }
    }
    if *cleanup.borrow() {
        remove_ours(&nl, ifindex, &wanted).await;
    }
}

/// Whether a neighbour event is about one of `wanted` on `ifindex`.
fn concerns(
    msg: &netlink_packet_core::NetlinkMessage<RouteNetlinkMessage>,
    ifindex: u32,
    wanted: &BTreeSet<IpAddr>,
) -> bool {
    let n = match &msg.payload {
        netlink_packet_core::NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n),
        ) => n,
        _ => return false,
    };
    n.header.ifindex == ifindex && parse_neighbour(n).is_some_and(|n| wanted.contains(&n.addr))
}

/// Removes the neighbour entries for `addrs` that xdplb made (this instance or an earlier one).
async fn remove_ours(nl: &Netlink, ifindex: u32, addrs: &BTreeSet<IpAddr>) {
    let present = match nl.neighbours(ifindex).await {
        Ok(p) => p,
        Err(e) => {
            debug!("cannot list neighbours to clean up: {e}");
            return;
        }
    };
    for n in present.iter().filter(|n| n.ours && addrs.contains(&n.addr)) {
        match nl.del_neighbour(ifindex, n.addr).await {
            Ok(()) => debug!(addr = %n.addr, "removed the neighbour entry xdplb made"),
            Err(e) => debug!(addr = %n.addr, "could not remove neighbour entry: {e}"),
        }
    }
}

async fn sync_once(
    nl: &Netlink,
    ifindex: u32,
    wanted: &BTreeSet<IpAddr>,
) -> Result<MacTable, NetError> {
    let present: BTreeMap<IpAddr, Neighbour> = nl
        .neighbours(ifindex)
        .await?
        .into_iter()
        .map(|n| (n.addr, n))
        .collect();
    let mut table = MacTable::new();
    for &addr in wanted {
        let entry = present.get(&addr);
        let mac = entry.and_then(|n| n.mac);
        table.insert(addr, mac);
        // Managed entries are re-resolved by the kernel itself; static ones never change.
        let kept = entry.is_some_and(|n| {
            n.managed || matches!(n.state, NeighbourState::Permanent | NeighbourState::Noarp)
        });
        if kept {
            if mac.is_none() {
                // A managed entry that failed is retried by the kernel every few seconds; a
                // datagram makes it try now.
                poke(addr);
            }
            continue;
        }
        match nl.make_managed(ifindex, addr, entry).await {
            Ok(()) => debug!(%addr, "asked the kernel to keep this backend's MAC resolved"),
            Err(e) => {
                debug!(%addr, "managed neighbour entry not possible ({e}); probing instead");
                if mac.is_none() {
                    poke(addr);
                }
            }
        }
    }
    Ok(table)
}

/// Makes the kernel resolve `addr` (ARP or neighbour discovery) by sending it one datagram on
/// the discard port (9): the fallback for kernels without managed neighbour entries, and a nudge
/// for entries that failed.
fn poke(addr: IpAddr) {
    let any = match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sent = UdpSocket::bind(SocketAddr::new(any, 0))
        .and_then(|s| s.send_to(b"", SocketAddr::new(addr, 9)));
    if let Err(e) = sent {
        debug!(%addr, "probe datagram not sent: {e}");
    }
}

/// Logs the differences between two MAC tables (backend MAC learned, changed, lost).
pub fn log_mac_changes(old: &MacTable, new: &MacTable) {
    for (addr, mac) in new {
        let before = old.get(addr).copied().flatten();
        match (before, mac) {
            (None, Some(m)) => info!(backend = %addr, mac = %fmt_mac(m), "backend MAC resolved"),
            (Some(a), Some(b)) if a != *b => {
                info!(backend = %addr, old = %fmt_mac(&a), new = %fmt_mac(b), "backend MAC changed")
            }
            (Some(a), None) => {
                warn!(backend = %addr, old = %fmt_mac(&a), "backend MAC lost (neighbour unreachable)")
            }
            _ => {}
        }
    }
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}
