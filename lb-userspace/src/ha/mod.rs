//! High availability: two nodes share the VIPs with VRRPv3 (RFC 5798 / RFC 9568).
//!
//! The runner ([`Ha::start`]) is one task that owns everything VRRP touches: the raw socket for
//! protocol 112, the timers of the state machine ([`fsm`]), the VIP addresses on the interface
//! (netlink) and the gratuitous ARPs ([`arp`]), the link watcher and the table-digest side
//! channel ([`sync`]). The agent talks to it only through [`Ha`]: it tells it what tracking needs
//! (is the data path attached, which VIPs have no backend), which VIP addresses exist and the
//! digest of its tables, and reads [`HaStatus`] back.
//!
//! Both nodes run the same data path with the same tables at all times; only the VIP addresses
//! move. A master answers ARP and neighbour solicitations for them (the kernel does, because
//! they are on its interface) and announces them with gratuitous ARP (IPv4) or unsolicited
//! neighbour advertisements (IPv6) on taking over, so clients send to its MAC. Flows that
//! arrive at the new master without a connection-table entry are mapped by the Maglev table,
//! which is the same on both nodes (the digest exchange checks that), so they keep their backend.

pub mod arp;
pub mod fsm;
pub mod proto;
pub mod sync;

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    config,
    net::{self, LinkState, NetError, Netlink},
};
use fsm::{Effect, Event, Machine, Params, State};
use proto::Discard;

/// Prefix length the VIPs are held with: a host route each, never a subnet.
const VIP_PREFIX: u8 = 32;
/// Prefix length of an IPv6 VIP address on the interface.
const VIP6_PREFIX: u8 = 128;

/// The prefix length a VIP address is added with: its own host route, of its family.
fn vip_prefix(vip: IpAddr) -> u8 {
    match vip {
        IpAddr::V4(_) => VIP_PREFIX,
        IpAddr::V6(_) => VIP6_PREFIX,
    }
}

/// The IPv4 VIP addresses: the ones VRRP adverts list (a VRRPv3 advert for IPv4 carries IPv4
/// addresses only). IPv6 VIPs go with them as keepalived's `virtual_ipaddress_excluded` do:
/// taken and released together (added without duplicate address detection, which would hold
/// them unusable for a second) and announced with unsolicited neighbour advertisements.
fn ipv4_only<'a>(vips: impl IntoIterator<Item = &'a IpAddr>) -> BTreeSet<Ipv4Addr> {
    vips.into_iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect()
}
/// Network control (CS6), as keepalived and routers mark VRRP.
const TOS_NETWORK_CONTROL: u32 = 0xc0;
/// At most one warning per this long for each kind of discarded advert (a flood of forged
/// packets must not flood the log; the counters still count every one).
const DISCARD_WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum HaError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(
        "[ha] interface {interface} has no IPv4 address to send VRRP advertisements from \
         (the VIPs do not count); add one, or set [ha] source"
    )]
    NoSource { interface: String },
    #[error("[ha] source {source_addr} is not an address of interface {interface}")]
    SourceNotLocal {
        source_addr: Ipv4Addr,
        interface: String,
    },
    #[error("VRRP socket on {interface}: {what}: {source}")]
    Socket {
        interface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What tracking needs from the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inputs {
    /// The XDP program is attached: without it this node forwards nothing.
    pub attached: bool,
    /// Names of VIPs none of whose backends passes its health checks.
    pub vips_down: BTreeSet<String>,
}

/// One tracked condition in [`HaStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackStatus {
    /// "dataplane", "interface eth0" or "vip NAME".
    pub what: String,
    pub ok: bool,
}

/// A state change, for status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_unix_ms: u64,
    pub from: String,
    pub to: String,
    pub reason: String,
}

/// The master as this node knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MasterStatus {
    pub address: Ipv4Addr,
    pub priority: u8,
    pub advert_interval_ms: u64,
    /// This node itself.
    pub local: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaCounters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Discarded adverts by reason ([`Discard::as_str`]), every reason present.
    pub discarded: BTreeMap<String, u64>,
    /// Accepted adverts whose address list differs from ours (RFC 5798 7.1: logged, accepted).
    pub address_mismatch: u64,
    pub priority_zero_received: u64,
    pub became_master: u64,
    pub became_backup: u64,
    pub became_fault: u64,
    pub split_brain: u64,
    pub send_errors: u64,
}

/// The other node's tables as last heard on the side channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTables {
    pub peer: Ipv4Addr,
    /// Hex digests, ours and theirs.
    pub digest: String,
    pub own_digest: String,
    pub matches: bool,
    /// How long ago the peer's digest came.
    pub age_ms: u64,
    /// How long they have differed, when they do.
    pub differs_for_ms: Option<u64>,
}

/// What `xdplb status` and `xdplb ha` show.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaStatus {
    /// initialize | backup | master | fault
    pub state: String,
    pub interface: String,
    pub vrid: u8,
    pub priority: u8,
    /// After tracking; 0 while the node cannot forward.
    pub effective_priority: u8,
    pub advert_interval_ms: u64,
    pub preempt: bool,
    pub source: Ipv4Addr,
    /// Multicast to 224.0.0.18 when empty.
    pub peers: Vec<Ipv4Addr>,
    pub master: Option<MasterStatus>,
    /// An operator handover is in force: this node does not preempt until `xdplb ha resume`.
    pub held: bool,
    pub last_transition: Option<Transition>,
    pub tracking: Vec<TrackStatus>,
    pub counters: HaCounters,
    pub peer_tables: Option<PeerTables>,
    /// Addresses this node holds now (IPv4 and IPv6).
    pub vips: Vec<IpAddr>,
    /// Addresses it holds when master.
    pub vip_addresses: Vec<IpAddr>,
    pub virtual_mac: Option<String>,
}

enum Command {
    Handover(oneshot::Sender<Result<String, String>>),
    Resume(oneshot::Sender<Result<String, String>>),
    Stop(oneshot::Sender<()>),
    /// Stop without resigning, for a replacing agent; answered with the state it stopped in.
    Detach(oneshot::Sender<State>),
}

/// The agent's side of the runner.
pub struct Ha {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<HaStatus>,
    inputs: watch::Sender<Inputs>,
    vips: watch::Sender<BTreeSet<IpAddr>>,
    digest: watch::Sender<Option<u64>>,
    task: JoinHandle<()>,
}

/// Priority after tracking: the data path and the interface are hard conditions (a node that
/// cannot forward must never hold the VIPs); tracked VIPs cost `penalty` each, or everything
/// when `penalty` is 0.
pub fn effective_priority(base: u8, penalty: u8, hard_failures: usize, vip_failures: usize) -> u8 {
    if hard_failures > 0 || (vip_failures > 0 && penalty == 0) {
        return 0;
    }
    let drop = u32::from(penalty) * vip_failures as u32;
    u32::from(base).saturating_sub(drop).max(1) as u8
}

impl Ha {
    /// Opens the socket, resolves the source address and starts the runner; it starts as backup
    /// (or fault), removing any VIP address a previous agent left behind.
    pub async fn start(
        cfg: config::Ha,
        nl: Netlink,
        vips: BTreeSet<IpAddr>,
        inputs: Inputs,
    ) -> Result<Ha, HaError> {
        Self::start_as(cfg, nl, vips, inputs, false).await
    }

    /// [`start`](Self::start); with `as_master`, for an agent that replaces a master which
    /// stopped without resigning ([`Ha::detach`]), it starts as master and advertises at once
    /// (unless tracking says it cannot forward), so the backups see no gap.
    pub async fn start_as(
        cfg: config::Ha,
        nl: Netlink,
        vips: BTreeSet<IpAddr>,
        inputs: Inputs,
        as_master: bool,
    ) -> Result<Ha, HaError> {
        let iface = nl.interface(&cfg.interface).await?;
        let source = match cfg.source {
            Some(s) => {
                let local = nl.ipv4_addresses(iface.index).await?;
                if !local.iter().any(|(a, _)| *a == s) {
                    return Err(HaError::SourceNotLocal {
                        source_addr: s,
                        interface: cfg.interface.clone(),
                    });
                }
                s
            }
            None => nl
                .primary_ipv4(iface.index, &ipv4_only(&vips))
                .await?
                .ok_or_else(|| HaError::NoSource {
                    interface: cfg.interface.clone(),
                })?,
        };
        let (sock, send_sock) = open_sockets(&cfg, iface.index, source)?;
        let sync = if cfg.sync_port != 0 {
            Some(
                sync::Channel::open(&cfg.interface, source, cfg.sync_port).map_err(|e| {
                    HaError::Socket {
                        interface: cfg.interface.clone(),
                        what: "table-digest side channel",
                        source: e,
                    }
                })?,
            )
        } else {
            None
        };
        let (vip_ifindex, vip_mac, vmac_name) = if cfg.virtual_mac {
            let mac = arp::virtual_mac(cfg.vrid);
            let name = format!("vrrp.{}", cfg.vrid);
            let index = nl.create_macvlan(iface.index, &name, mac).await?;
            // Otherwise the parent answers ARP for the VIPs too, with its own MAC (Linux answers
            // for any local address on any interface by default).
            set_arp_ignore(&cfg.interface);
            info!(interface = %name, mac = %net::fmt_mac(&mac), "VRRP virtual MAC interface ready");
            (index, mac, Some(name))
        } else {
            (iface.index, iface.mac, None)
        };
        let garp = arp::GarpSender::new(vip_ifindex, vip_mac).map_err(|e| HaError::Socket {
            interface: cfg.interface.clone(),
            what: "gratuitous ARP socket",
            source: e,
        })?;
        let link = nl.link_state(iface.index).await?;
        let (link_tx, link_rx) = watch::channel(link);
        let link_task = tokio::spawn(net::watch_link(nl.clone(), iface.index, link_tx));

        let machine = Machine::new(Params {
            address: source,
            priority: cfg.priority,
            interval_cs: cfg.advert_interval_cs(),
            preempt: cfg.preempt,
            preempt_delay: cfg.preempt_delay,
        });
        let (commands_tx, commands) = mpsc::channel(8);
        let (inputs_tx, inputs_rx) = watch::channel(inputs);
        let (vips_tx, vips_rx) = watch::channel(vips.clone());
        let (digest_tx, digest_rx) = watch::channel(None);
        let mut runner = Runner {
            held_addrs: BTreeSet::new(),
            vips,
            counters: HaCounters {
                discarded: Discard::ALL
                    .iter()
                    .map(|d| (d.as_str().to_string(), 0))
                    .collect(),
                ..HaCounters::default()
            },
            cfg,
            nl,
            machine,
            sock,
            send_sock,
            sync,
            source,
            vip_ifindex,
            vmac_name,
            garp: std::sync::Arc::new(garp),
            garp_task: None,
            epoch: Instant::now(),
            last_transition: None,
            link: link_rx,
            link_task,
            inputs: inputs_rx,
            vips_rx,
            digest: digest_rx,
            commands,
            pending_handover: None,
            discard_warned: BTreeMap::new(),
            peer_tables: None,
            status_tx: None,
            start_as_master: as_master,
        };
        let (status_tx, status) = watch::channel(runner.snapshot());
        runner.status_tx = Some(status_tx);
        let task = tokio::spawn(runner.run());
        Ok(Ha {
            commands: commands_tx,
            status,
            inputs: inputs_tx,
            vips: vips_tx,
            digest: digest_tx,
            task,
        })
    }

    pub fn status(&self) -> HaStatus {
        self.status.borrow().clone()
    }

    pub fn set_inputs(&self, inputs: Inputs) {
        self.inputs.send_if_modified(|cur| {
            let changed = *cur != inputs;
            *cur = inputs;
            changed
        });
    }

    pub fn set_vips(&self, vips: BTreeSet<IpAddr>) {
        self.vips.send_if_modified(|cur| {
            let changed = *cur != vips;
            *cur = vips;
            changed
        });
    }

    pub fn set_digest(&self, digest: u64) {
        self.digest.send_if_modified(|cur| {
            let changed = *cur != Some(digest);
            *cur = Some(digest);
            changed
        });
    }

    /// Gives up mastership; answers once another node is master, or with an error if none
    /// takes over (then this node takes the VIPs back). The future does not borrow `self`, so
    /// the agent can wait for it without stopping its own loop.
    pub fn handover(&self) -> impl Future<Output = Result<String, String>> + Send + 'static {
        self.ask(Command::Handover)
    }

    pub fn resume(&self) -> impl Future<Output = Result<String, String>> + Send + 'static {
        self.ask(Command::Resume)
    }

    /// A live view of the status, for answering after a command completes.
    pub fn status_watch(&self) -> watch::Receiver<HaStatus> {
        self.status.clone()
    }

    fn ask(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<String, String>>) -> Command,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let commands = self.commands.clone();
        let cmd = make(tx);
        async move {
            let stopped = || "the HA task has stopped".to_string();
            commands.send(cmd).await.map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        }
    }

    /// Stops without resigning, for an agent that replaces this one at once: no priority-0
    /// advert, the VIP addresses (and the virtual-MAC interface) stay. Returns the state it
    /// stopped in (`None` if the runner did not answer). Until the next agent advertises, a
    /// backup sees only silence: it takes over after its master-down interval.
    pub async fn detach(self) -> Option<State> {
        let (tx, rx) = oneshot::channel();
        let state = if self.commands.send(Command::Detach(tx)).await.is_ok() {
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        self.task.abort();
        state
    }

    /// Resigns (priority 0 if master), removes the VIPs and stops.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Stop(tx)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
        }
        self.task.abort();
    }
}

/// The two VRRP sockets: one receives (on the interface, joined to the group), one sends.
/// They are separate because the sender must be bound to the source address (the checksum's
/// pseudo-header and the peers' view of who we are; unbound, the kernel could pick a VIP once
/// we hold one), and a raw socket bound to an address only receives packets sent to that
/// address, never the multicast group's.
fn open_sockets(
    cfg: &config::Ha,
    ifindex: u32,
    source: Ipv4Addr,
) -> Result<(AsyncFd<Socket>, Socket), HaError> {
    let err = |what: &'static str| {
        let interface = cfg.interface.clone();
        move |source: io::Error| HaError::Socket {
            interface,
            what,
            source,
        }
    };
    let raw = || {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(proto::IPPROTO_VRRP))),
        )
        .map_err(err("open raw socket for IP protocol 112"))?;
        s.bind_device(Some(cfg.interface.as_bytes()))
            .map_err(err("bind to the interface"))?;
        Ok::<_, HaError>(s)
    };
    let rx = raw()?;
    if cfg.multicast() {
        rx.join_multicast_v4_n(&proto::GROUP, &InterfaceIndexOrAddress::Index(ifindex))
            .map_err(err("join 224.0.0.18"))?;
    }
    rx.set_nonblocking(true).map_err(err("set non-blocking"))?;
    let tx = raw()?;
    tx.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))
        .map_err(err("bind to the source address"))?;
    tx.set_ttl_v4(u32::from(proto::TTL))
        .map_err(err("set TTL 255"))?;
    tx.set_multicast_ttl_v4(u32::from(proto::TTL))
        .map_err(err("set multicast TTL 255"))?;
    tx.set_tos_v4(TOS_NETWORK_CONTROL).map_err(err("set TOS"))?;
    tx.set_multicast_loop_v4(false)
        .map_err(err("turn off multicast loop"))?;
    tx.set_multicast_if_v4(&source)
        .map_err(err("set the multicast interface"))?;
    // Unicast adverts to us also queue here; only `rx` reads them.
    tx.set_recv_buffer_size(0)
        .map_err(err("shrink the send socket's receive buffer"))?;
    tx.set_nonblocking(true).map_err(err("set non-blocking"))?;
    // SAFETY: the Socket owns its descriptor for as long as the AsyncFd holds it.
    let rx = unsafe { AsyncFd::register(rx) }
        .map_err(|e| e.into_parts().1)
        .map_err(err("register with the runtime"))?;
    Ok((rx, tx))
}

fn set_arp_ignore(interface: &str) {
    let path = format!("/proc/sys/net/ipv4/conf/{interface}/arp_ignore");
    match std::fs::write(&path, "1") {
        Ok(()) => {
            info!("set {path} = 1 so only the virtual-MAC interface answers ARP for the VIPs")
        }
        Err(e) => warn!(
            "could not set {path} = 1 ({e}); {interface} may answer ARP for the VIPs with its own MAC"
        ),
    }
}

struct Runner {
    cfg: config::Ha,
    nl: Netlink,
    machine: Machine,
    sock: AsyncFd<Socket>,
    send_sock: Socket,
    sync: Option<sync::Channel>,
    source: Ipv4Addr,
    vip_ifindex: u32,
    vmac_name: Option<String>,
    garp: std::sync::Arc<arp::GarpSender>,
    garp_task: Option<JoinHandle<()>>,
    epoch: Instant,
    /// Addresses we put on the interface.
    held_addrs: BTreeSet<IpAddr>,
    vips: BTreeSet<IpAddr>,
    counters: HaCounters,
    last_transition: Option<Transition>,
    link: watch::Receiver<LinkState>,
    link_task: JoinHandle<()>,
    inputs: watch::Receiver<Inputs>,
    vips_rx: watch::Receiver<BTreeSet<IpAddr>>,
    digest: watch::Receiver<Option<u64>>,
    commands: mpsc::Receiver<Command>,
    pending_handover: Option<(Instant, oneshot::Sender<Result<String, String>>)>,
    discard_warned: BTreeMap<Discard, Instant>,
    peer_tables: Option<sync::PeerState>,
    status_tx: Option<watch::Sender<HaStatus>>,
    /// Start as master ([`Ha::start_as`]).
    start_as_master: bool,
}

impl Runner {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn tracking(&self) -> (Vec<TrackStatus>, u8) {
        let inputs = self.inputs.borrow();
        let mut list = vec![TrackStatus {
            what: "dataplane".to_string(),
            ok: inputs.attached,
        }];
        let mut hard = usize::from(!inputs.attached);
        if self.cfg.track_interface {
            let ok = self.link.borrow().usable();
            hard += usize::from(!ok);
            list.push(TrackStatus {
                what: format!("interface {}", self.cfg.interface),
                ok,
            });
        }
        let mut vip_failures = 0;
        for name in &self.cfg.track_vips {
            let ok = !inputs.vips_down.contains(name);
            vip_failures += usize::from(!ok);
            list.push(TrackStatus {
                what: format!("vip {name}"),
                ok,
            });
        }
        let p = effective_priority(
            self.cfg.priority,
            self.cfg.track_penalty,
            hard,
            vip_failures,
        );
        (list, p)
    }

    async fn run(mut self) {
        let (_, p) = self.tracking();
        self.step(Event::Priority(p)).await;
        info!(
            interface = %self.cfg.interface,
            vrid = self.cfg.vrid,
            priority = self.cfg.priority,
            source = %self.source,
            advert_interval = ?self.cfg.advert_interval,
            mode = if self.cfg.multicast() { "multicast 224.0.0.18" } else { "unicast" },
            "VRRP started"
        );
        self.step(if self.start_as_master {
            Event::StartupAsMaster
        } else {
            Event::Startup
        })
        .await;
        self.publish();
        let mut sync_tick = tokio::time::interval(sync::INTERVAL);
        sync_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 65536];
        let mut sync_buf = [0u8; 512];
        loop {
            let timer = self.machine.deadline();
            let sleep_to = timer.map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(3600),
                |(at, _)| (self.epoch + at).into(),
            );
            tokio::select! {
                biased;
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Stop(reply)) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(Command::Detach(reply)) => {
                        let state = self.detach();
                        let _ = reply.send(state);
                        return;
                    }
                    Some(Command::Handover(reply)) => self.handover(reply).await,
                    Some(Command::Resume(reply)) => {
                        let was = self.machine.held();
                        self.step(Event::Resume).await;
                        let _ = reply.send(Ok(if was {
                            info!("operator resumed: this node preempts again (preempt = {})", self.cfg.preempt);
                            "resumed: this node may take mastership again".to_string()
                        } else {
                            "no handover was in force".to_string()
                        }));
                    }
                    None => {
                        // The agent dropped its handle without stopping us: behave as stopped.
                        self.shutdown().await;
                        return;
                    }
                },
                _ = tokio::time::sleep_until(sleep_to), if timer.is_some() => {
                    if let Some((_, ev)) = timer {
                        self.step(ev).await;
                    }
                }
                ready = self.sock.readable() => {
                    let pkts = match ready {
                        Ok(mut guard) => drain(&mut guard, &mut buf),
                        Err(e) => {
                            error!("VRRP socket failed: {e}; HA stops, releasing the VIPs");
                            self.shutdown().await;
                            return;
                        }
                    };
                    for pkt in pkts {
                        self.received(&pkt).await;
                    }
                }
                Ok(()) = self.link.changed() => self.retrack().await,
                Ok(()) = self.inputs.changed() => self.retrack().await,
                Ok(()) = self.vips_rx.changed() => self.vips_changed().await,
                Ok(()) = self.digest.changed() => {}
                got = recv_sync(self.sync.as_ref(), &mut sync_buf) => {
                    if let Some((from, msg)) = got {
                        self.sync_received(from, msg);
                    }
                }
                _ = sync_tick.tick() => self.sync_tick(),
            }
            self.check_handover();
            self.publish();
        }
    }

    async fn received(&mut self, pkt: &[u8]) {
        let parsed = proto::parse(pkt, self.cfg.vrid).and_then(|r| {
            if r.src == self.source {
                Err(Discard::Own)
            } else if !self.cfg.multicast() && !self.cfg.peers.contains(&r.src) {
                Err(Discard::NotPeer)
            } else {
                Ok(r)
            }
        });
        let r = match parsed {
            Ok(r) => r,
            Err(d) => {
                *self
                    .counters
                    .discarded
                    .entry(d.as_str().to_string())
                    .or_default() += 1;
                self.warn_discard(d, pkt);
                return;
            }
        };
        self.counters.adverts_received += 1;
        if r.advert.priority == 0 {
            self.counters.priority_zero_received += 1;
        }
        let theirs: BTreeSet<Ipv4Addr> = r.advert.addresses.iter().copied().collect();
        let ours = ipv4_only(&self.vips);
        if theirs != ours {
            self.counters.address_mismatch += 1;
            if self.counters.address_mismatch == 1 {
                warn!(
                    peer = %r.src,
                    "VRRP advert from {} for vrid {} lists addresses {:?}, this node has {:?}; \
                     accepted (RFC 5798 7.1), but the two configs differ",
                    r.src, self.cfg.vrid, theirs, ours
                );
            }
        }
        debug!(src = %r.src, priority = r.advert.priority, interval_cs = r.advert.interval_cs, "VRRP advert");
        self.step(Event::Advert(fsm::Peer {
            address: r.src,
            priority: r.advert.priority,
            interval_cs: r.advert.interval_cs,
        }))
        .await;
    }

    fn warn_discard(&mut self, d: Discard, pkt: &[u8]) {
        // Other routers' VRIDs are normal on a shared segment.
        if d == Discard::Vrid || d == Discard::Own {
            return;
        }
        let now = Instant::now();
        let due = self
            .discard_warned
            .get(&d)
            .is_none_or(|t| now.duration_since(*t) >= DISCARD_WARN_EVERY);
        if due {
            self.discard_warned.insert(d, now);
            let src = if pkt.len() >= 20 {
                Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]).to_string()
            } else {
                "?".to_string()
            };
            warn!(
                src = %src,
                reason = d.as_str(),
                "discarded a VRRP packet from {src}: {} (counted in discarded.{}; at most one \
                 such warning per {DISCARD_WARN_EVERY:?})",
                match d {
                    Discard::Ttl => "TTL is not 255 (not from this link, or forged)",
                    Discard::Checksum => "bad checksum",
                    Discard::Version => "not a VRRPv3 advertisement",
                    Discard::Length => "truncated or malformed",
                    Discard::NotPeer => "not from a configured peer",
                    Discard::Interval => "advert interval 0",
                    Discard::Vrid | Discard::Own => unreachable!(),
                },
                d.as_str()
            );
        }
    }

    async fn retrack(&mut self) {
        let (list, p) = self.tracking();
        if p != self.machine.effective_priority() {
            let failing: Vec<&str> = list
                .iter()
                .filter(|t| !t.ok)
                .map(|t| t.what.as_str())
                .collect();
            if failing.is_empty() {
                info!(
                    "tracking: all conditions ok; priority {} -> {p}",
                    self.machine.effective_priority()
                );
            } else {
                warn!(
                    "tracking: failing: {}; priority {} -> {p}{}",
                    failing.join(", "),
                    self.machine.effective_priority(),
                    if p == 0 {
                        " (cannot forward: never master)"
                    } else {
                        ""
                    }
                );
            }
            self.step(Event::Priority(p)).await;
        }
    }

    async fn step(&mut self, ev: Event) {
        let now = self.now();
        let effects = self.machine.step(now, ev);
        for fx in effects {
            self.apply(fx).await;
        }
    }

    async fn apply(&mut self, fx: Effect) {
        match fx {
            Effect::SendAdvert { priority } => self.send_advert(priority),
            Effect::TakeVips => self.take_vips().await,
            Effect::ReleaseVips => self.release_vips().await,
            Effect::Transition { from, to, reason } => {
                match to {
                    State::Master => self.counters.became_master += 1,
                    State::Backup => self.counters.became_backup += 1,
                    State::Fault => self.counters.became_fault += 1,
                    State::Initialize => {}
                }
                let level_warn = matches!(to, State::Fault) || from == State::Master;
                if level_warn {
                    warn!(vrid = self.cfg.vrid, from = %from, to = %to, "VRRP {from} -> {to}: {reason}");
                } else {
                    info!(vrid = self.cfg.vrid, from = %from, to = %to, "VRRP {from} -> {to}: {reason}");
                }
                self.last_transition = Some(Transition {
                    at_unix_ms: unix_ms(),
                    from: from.to_string(),
                    to: to.to_string(),
                    reason,
                });
            }
            Effect::SplitBrain { peer } => {
                self.counters.split_brain += 1;
                if peer.priority == 0 {
                    warn!(
                        peer = %peer.address,
                        "split brain: {} was also master of vrid {} and has stepped down on hearing this node (priority {}); this node keeps the VIPs",
                        peer.address,
                        self.cfg.vrid,
                        self.machine.effective_priority()
                    );
                } else {
                    warn!(
                        peer = %peer.address,
                        "split brain: {} (priority {}) also claims master of vrid {}; this node has precedence (priority {}) and keeps the VIPs, the other steps down",
                        peer.address,
                        peer.priority,
                        self.cfg.vrid,
                        self.machine.effective_priority()
                    );
                }
            }
        }
    }

    fn send_advert(&mut self, priority: u8) {
        let advert = proto::Advert {
            vrid: self.cfg.vrid,
            priority,
            interval_cs: self.cfg.advert_interval_cs(),
            // IPv4 only: a VRRPv3 advert over IPv4 lists IPv4 addresses (RFC 5798 5.2.9).
            addresses: ipv4_only(&self.vips).into_iter().collect(),
        };
        let dsts: Vec<Ipv4Addr> = if self.cfg.multicast() {
            vec![proto::GROUP]
        } else {
            self.cfg.peers.clone()
        };
        for dst in dsts {
            let msg = advert.encode(self.source, dst);
            match self
                .send_sock
                .send_to(&msg, &SockAddr::from(SocketAddrV4::new(dst, 0)))
            {
                Ok(_) => self.counters.adverts_sent += 1,
                Err(e) => {
                    self.counters.send_errors += 1;
                    if self.counters.send_errors.is_power_of_two() {
                        warn!(
                            "sending a VRRP advert to {dst} failed: {e} ({} failures so far)",
                            self.counters.send_errors
                        );
                    }
                }
            }
        }
    }

    async fn add_vip(&mut self, vip: IpAddr) {
        match self
            .nl
            .add_address(self.vip_ifindex, vip, vip_prefix(vip))
            .await
        {
            Ok(()) => {
                self.held_addrs.insert(vip);
            }
            Err(e) => error!("taking VIP {vip} failed: {e}"),
        }
    }

    async fn take_vips(&mut self) {
        for vip in self.vips.clone() {
            self.add_vip(vip).await;
        }
        self.announce(self.vips.iter().copied().collect());
    }

    /// Gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6) for `addrs`: a burst
    /// now and, if configured, another later, so a switch or client that missed the first (or
    /// cached an older answer) learns the new owner.
    fn announce(&mut self, addrs: Vec<IpAddr>) {
        if addrs.is_empty() {
            return;
        }
        let garp = self.garp.clone();
        let (count, gap, repeat) = (
            self.cfg.garp_count,
            self.cfg.garp_interval,
            self.cfg.garp_repeat,
        );
        let task = tokio::spawn(async move {
            let burst = |round: &'static str| {
                let garp = garp.clone();
                let addrs = addrs.clone();
                async move {
                    for i in 0..count {
                        for a in &addrs {
                            if let Err(e) = garp.announce(*a) {
                                warn!("announcing {a} failed: {e}");
                            }
                        }
                        if i + 1 < count && !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                    }
                    debug!(
                        round,
                        count, "gratuitous ARPs / neighbour advertisements sent"
                    );
                }
            };
            burst("takeover").await;
            if !repeat.is_zero() {
                tokio::time::sleep(repeat).await;
                burst("repeat").await;
            }
        });
        if let Some(old) = self.garp_task.replace(task) {
            // A burst for other addresses may still be running; let it finish only if we are
            // still master (the new task covers the new set).
            old.abort();
        }
    }

    async fn release_vips(&mut self) {
        if let Some(t) = self.garp_task.take() {
            t.abort();
        }
        // Also addresses a killed agent left behind: a backup must not answer ARP for them.
        for vip in self.vips.clone().into_iter().chain(self.held_addrs.clone()) {
            match self
                .nl
                .del_address(self.vip_ifindex, vip, vip_prefix(vip))
                .await
            {
                Ok(()) => {
                    self.held_addrs.remove(&vip);
                }
                Err(e) => error!("releasing VIP {vip} failed: {e}"),
            }
        }
    }

    async fn vips_changed(&mut self) {
        let new = self.vips_rx.borrow_and_update().clone();
        let old = std::mem::replace(&mut self.vips, new.clone());
        if self.machine.state() != State::Master {
            return;
        }
        let added: Vec<IpAddr> = new.difference(&old).copied().collect();
        for vip in &added {
            self.add_vip(*vip).await;
        }
        for vip in old.difference(&new) {
            match self
                .nl
                .del_address(self.vip_ifindex, *vip, vip_prefix(*vip))
                .await
            {
                Ok(()) => {
                    self.held_addrs.remove(vip);
                }
                Err(e) => error!("releasing removed VIP {vip} failed: {e}"),
            }
        }
        if !added.is_empty() {
            info!(?added, "new VIP addresses taken and announced");
            self.announce(added);
        }
        // Backups learn the new address list now rather than at the next advert.
        self.send_advert(self.machine.effective_priority());
    }

    async fn handover(&mut self, reply: oneshot::Sender<Result<String, String>>) {
        match self.machine.state() {
            State::Master => {
                info!("operator handover: resigning mastership (priority 0 advert)");
                self.step(Event::Handover).await;
                self.pending_handover = Some((Instant::now(), reply));
            }
            state => {
                self.step(Event::Handover).await;
                let _ = reply.send(Ok(format!(
                    "this node is {state}, not master; it now stays backup (no preemption) \
                     until `xdplb ha resume`"
                )));
            }
        }
    }

    fn check_handover(&mut self) {
        let Some((since, _)) = &self.pending_handover else {
            return;
        };
        let since = *since;
        let outcome = match (self.machine.state(), self.machine.master()) {
            (State::Master, _) => Some(Err(format!(
                "no other node took over within {:.2} s (master down interval); this node is \
                 master again. Is the peer running and hearing this node?",
                since.elapsed().as_secs_f64()
            ))),
            (State::Backup, Some(m)) if m.address != self.source && m.priority > 0 => {
                Some(Ok(format!(
                    "mastership handed to {} (priority {}) in {:.3} s; this node stays backup \
                     until `xdplb ha resume`",
                    m.address,
                    m.priority,
                    since.elapsed().as_secs_f64()
                )))
            }
            _ => None,
        };
        if let Some(outcome) = outcome
            && let Some((_, reply)) = self.pending_handover.take()
        {
            match &outcome {
                Ok(m) => info!("operator handover done: {m}"),
                Err(m) => warn!("operator handover failed: {m}"),
            }
            let _ = reply.send(outcome);
        }
    }

    async fn shutdown(&mut self) {
        self.step(Event::Shutdown).await;
        // Removed VIPs left behind by a master that never was (no effects) are handled by the
        // next start; the macvlan goes with the agent.
        if self.vmac_name.is_some()
            && let Err(e) = self.nl.delete_link(self.vip_ifindex).await
        {
            warn!("removing the virtual-MAC interface failed: {e}");
        }
        self.link_task.abort();
        self.publish();
        info!(vrid = self.cfg.vrid, "VRRP stopped");
    }

    /// Stops without the shutdown step: see [`Ha::detach`].
    fn detach(&mut self) -> State {
        let state = self.machine.state();
        if let Some(t) = self.garp_task.take() {
            t.abort();
        }
        self.link_task.abort();
        self.publish();
        info!(
            vrid = self.cfg.vrid,
            state = %state,
            "VRRP stopped without resigning, for the agent replacing this one{}",
            if state == State::Master {
                ": the VIP addresses stay on the interface"
            } else {
                ""
            }
        );
        state
    }

    fn sync_tick(&mut self) {
        let Some(ch) = &self.sync else { return };
        let own = *self.digest.borrow();
        // A backup asks the master; in unicast mode every peer is asked (each answers with its
        // own digest), so both nodes learn the other's tables.
        let targets: Vec<Ipv4Addr> = if !self.cfg.multicast() {
            self.cfg.peers.clone()
        } else if self.machine.state() != State::Master {
            self.machine
                .master()
                .map(|m| m.address)
                .into_iter()
                .filter(|a| *a != self.source)
                .collect()
        } else {
            Vec::new()
        };
        for t in targets {
            ch.send(t, self.cfg.vrid, sync::Kind::Request, own);
        }
        if let Some(p) = &mut self.peer_tables {
            p.check(own, Instant::now());
        }
    }

    fn sync_received(&mut self, from: Ipv4Addr, msg: sync::Message) {
        if msg.vrid != self.cfg.vrid || from == self.source {
            return;
        }
        let own = *self.digest.borrow();
        if msg.kind == sync::Kind::Request
            && let Some(ch) = &self.sync
        {
            ch.send(from, self.cfg.vrid, sync::Kind::Reply, own);
        }
        let now = Instant::now();
        let state = self
            .peer_tables
            .get_or_insert_with(|| sync::PeerState::new(from, now));
        state.heard(from, msg.digest, now);
        state.check(own, now);
    }

    fn snapshot(&self) -> HaStatus {
        let (tracking, _) = self.tracking();
        let own = *self.digest.borrow();
        HaStatus {
            state: self.machine.state().to_string(),
            interface: self.cfg.interface.clone(),
            vrid: self.cfg.vrid,
            priority: self.cfg.priority,
            effective_priority: self.machine.effective_priority(),
            advert_interval_ms: self.cfg.advert_interval.as_millis() as u64,
            preempt: self.cfg.preempt,
            source: self.source,
            peers: self.cfg.peers.clone(),
            master: self.machine.master().map(|m| MasterStatus {
                address: m.address,
                priority: m.priority,
                advert_interval_ms: u64::from(m.interval_cs) * 10,
                local: m.address == self.source,
            }),
            held: self.machine.held(),
            last_transition: self.last_transition.clone(),
            tracking,
            counters: self.counters.clone(),
            peer_tables: self
                .peer_tables
                .as_ref()
                .and_then(|p| p.status(own, Instant::now())),
            vips: self.held_addrs.iter().copied().collect(),
            vip_addresses: self.vips.iter().copied().collect(),
            virtual_mac: self
                .cfg
                .virtual_mac
                .then(|| net::fmt_mac(&arp::virtual_mac(self.cfg.vrid))),
        }
    }

    fn publish(&self) {
        if let Some(tx) = &self.status_tx {
            let s = self.snapshot();
            tx.send_if_modified(|cur| {
                let changed = *cur != s;
                *cur = s;
                changed
            });
        }
    }
}

/// Every packet the socket holds now (a burst of forged adverts is read in one go).
fn drain(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, Socket>,
    buf: &mut [u8],
) -> Vec<Vec<u8>> {
    let mut pkts = Vec::new();
    loop {
        match (&mut guard.get_inner()).read(buf) {
            Ok(n) => pkts.push(buf[..n].to_vec()),
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("receiving VRRP advertisements failed: {e}");
                }
                guard.clear_ready();
                return pkts;
            }
        }
    }
}

async fn recv_sync(
    ch: Option<&sync::Channel>,
    buf: &mut [u8],
) -> Option<(Ipv4Addr, sync::Message)> {
    match ch {
        Some(ch) => ch.recv(buf).await,
        None => std::future::pending().await,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_failures_always_fault() {
        assert_eq!(effective_priority(200, 50, 1, 0), 0);
        assert_eq!(effective_priority(200, 0, 0, 1), 0);
        assert_eq!(effective_priority(200, 0, 0, 0), 200);
    }

    #[test]
    fn vip_penalty_lowers_priority_with_floor_one() {
        assert_eq!(effective_priority(200, 50, 0, 1), 150);
        assert_eq!(effective_priority(200, 50, 0, 2), 100);
        assert_eq!(effective_priority(200, 150, 0, 2), 1);
        assert_eq!(effective_priority(255, 10, 0, 1), 245);
    }
}
