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

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, UdpSocket},
    time::Duration,
};

use futures::{FutureExt as _, StreamExt as _, TryStreamExt as _};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::{
    AddressFamily,
    link::{LinkAttribute, LinkFlags, LinkXdp, XdpAttached},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourExtFlags, NeighbourMessage, NeighbourState,
    },
    route::{RouteAddress, RouteAttribute, RouteProtocol, RouteType},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
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
    pub gateway: Option<Ipv4Addr>,
    pub local: bool,
}

/// A neighbour table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: Ipv4Addr,
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

    /// `ip route get ADDR`.
    pub async fn route_to(&self, addr: Ipv4Addr) -> Result<RouteInfo, NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(addr, 32)
            .build();
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
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => info.gateway = Some(*g),
                    _ => {}
                }
            }
        }
        Ok(info)
    }

    /// IPv4 neighbours on `ifindex`.
    pub async fn neighbours(&self, ifindex: u32) -> Result<Vec<Neighbour>, NetError> {
        let mut req = self.handle.neighbours().get();
        req = req.set_address_family(AddressFamily::Inet);
        let mut stream = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = stream.try_next().await.map_err(nl("neighbour dump"))? {
            if msg.header.ifindex != ifindex {
                continue;
            }
            if let Some(n) = parse_neighbour(&msg) {
                out.push(n);
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
        addr: Ipv4Addr,
        existing: Option<&Neighbour>,
    ) -> Result<(), NetError> {
        let mut req = self.handle.neighbours().add(ifindex, IpAddr::V4(addr));
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

    pub async fn del_neighbour(&self, ifindex: u32, addr: Ipv4Addr) -> Result<(), NetError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = ifindex;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                addr,
            )));
        self.handle
            .neighbours()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("delete neighbour {addr}")))
    }
}

fn parse_neighbour(msg: &NeighbourMessage) -> Option<Neighbour> {
    let mut addr = None;
    let mut mac = None;
    let mut managed = false;
    let mut ours = false;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(*a),
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

/// Backend MACs as last seen: `None` while unresolved.
pub type MacTable = BTreeMap<Ipv4Addr, Option<[u8; 6]>>;

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
    mut addrs: watch::Receiver<BTreeSet<Ipv4Addr>>,
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
    wanted: &BTreeSet<Ipv4Addr>,
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
async fn remove_ours(nl: &Netlink, ifindex: u32, addrs: &BTreeSet<Ipv4Addr>) {
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
    wanted: &BTreeSet<Ipv4Addr>,
) -> Result<MacTable, NetError> {
    let present: BTreeMap<Ipv4Addr, Neighbour> = nl
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

/// Makes the kernel resolve `addr` by sending it one datagram on the discard port (9): the
/// fallback for kernels without managed neighbour entries, and a nudge for entries that failed.
fn poke(addr: Ipv4Addr) {
    let sent =
        UdpSocket::bind("0.0.0.0:0").and_then(|s| s.send_to(b"", SocketAddrV4::new(addr, 9)));
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
