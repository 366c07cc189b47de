//! The load-balancing topology of the end-to-end tests and the demo: a client, the load balancer
//! and N backends on one bridge, backends set up for direct server return, identity servers on
//! the backends, and the real `xdplb` agent process.
//!
//! ```text
//!   client 10.0.0.1 ──┐
//!   lb     10.0.0.2 ──┤ br0 (switch netns)     VIP 10.0.0.100: on the LB's eth0 (so the LB
//!   b1     10.0.0.11 ─┤                        answers ARP for it) and on every backend's lo
//!   b2     10.0.0.12 ─┤                        (arp_ignore=1, arp_announce=2: they never
//!   b3     10.0.0.13 ─┘                        answer ARP for it, but accept and answer with it)
//! ```
//!
//! Measured veth behaviour this topology respects (../shared/ENVIRONMENT.md):
//! - A frame sent with `XDP_TX` by a natively attached program on a veth end is dropped unless the
//!   other end of the pair also has an XDP program: the LB's bridge-side peer gets `xdp_pass`
//!   (from the same object as the load balancer).
//! - With TX checksum offload on (the veth default), TCP frames bounced by `XDP_TX` arrive with
//!   bad checksums, because the offload metadata does not survive XDP: the client's TX checksum
//!   offload is turned off, so it sends complete checksums.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream,
        UdpSocket,
    },
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};
use lb_userspace::{
    api::Client,
    dataplane::EBPF_OBJECT,
    status::{BackendStatus, Status, WhichBackend},
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{ChildGuard, Host, Lan, Netns};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Backend `i` (0-based) has address 10.0.0.(11 + i) and name `b{i+1}`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 11 + i as u8)
}

/// Path of the `xdplb` binary under test: `$XDPLB_BIN`, else next to the test executable's
/// directory (`target/<profile>/xdplb`, built by `cargo xtask test`).
pub fn xdplb_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("XDPLB_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("xdplb");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "xdplb binary not found next to {}; build it (`cargo build --release --bins`) or set \
         XDPLB_BIN",
        exe.display()
    );
}

/// The `xdp_pass` program attached to an interface; detached on drop.
pub struct PassProgram {
    _ebpf: Ebpf,
}

/// Attaches `xdp_pass` in driver mode to `ifindex` inside `ns`.
pub fn attach_pass(ns: &Netns, ifindex: u32) -> Result<PassProgram> {
    let ebpf = attach_from_object(ns, ifindex, lb_common::maps::PROG_PASS, |_| Ok(()))?;
    Ok(PassProgram { _ebpf: ebpf })
}

/// Loads xdplb's object inside `ns`, lets `prepare` fill its maps, and attaches its program
/// `program` in driver mode to `ifindex`; detached when the returned object is dropped.
pub fn attach_from_object(
    ns: &Netns,
    ifindex: u32,
    program: &'static str,
    prepare: impl FnOnce(&mut Ebpf) -> Result<()> + Send + 'static,
) -> Result<Ebpf> {
    ns.run_in(move || -> Result<Ebpf> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).context("loading the XDP object")?;
        prepare(&mut ebpf)?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .with_context(|| format!("{program} missing from the object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {program}"))?;
        prog.attach_to_if_index(ifindex, XdpMode::Driver)
            .with_context(|| format!("attaching {program} in driver mode"))?;
        Ok(ebpf)
    })
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "xlb-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A host of an LB topology, as [`LbParts::build`] names it to ask for its IPv6 address.
pub(crate) enum HostRole {
    Client,
    Lb,
    /// Backend `i`, 0-based.
    Backend(usize),
}

/// What an LB topology is made of, IPv4 ([`LbTopology`]) or dual-stack
/// ([`crate::topology6::LbTopology6`]).
pub(crate) struct LbParts {
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    pub dir: TempDir,
    pub pass: PassProgram,
    pub lan: Lan,
}

impl LbParts {
    /// The client, the LB and `n_backends` backends at their IPv4 addresses, each also at
    /// `addr6(role)` when that is given; every VIP in `vips` set up for direct server return;
    /// a scratch directory tagged `tag`.
    pub(crate) fn build(
        n_backends: usize,
        tag: &str,
        vips: &[IpAddr],
        addr6: impl Fn(HostRole) -> Option<Ipv6Addr>,
    ) -> Result<LbParts> {
        let mut lan = Lan::new()?;
        let mut add = |name: &str, addr: Ipv4Addr, role| match addr6(role) {
            Some(a6) => lan.add_host_dual(name, &format!("{addr}/24"), &format!("{a6}/64")),
            None => lan.add_host(name, &format!("{addr}/24")),
        };
        let client = add("client", CLIENT_ADDR, HostRole::Client)?;
        let lb = add("lb", LB_ADDR, HostRole::Lb)?;
        let mut backends = Vec::new();
        for i in 0..n_backends {
            backends.push(add(
                &format!("b{}", i + 1),
                backend_addr(i),
                HostRole::Backend(i),
            )?);
        }
        // The LB owns the VIPs on the wire: it answers ARP (and neighbour solicitations) for them.
        for &vip in vips {
            lb.ns.add_host_addr(vip, "eth0")?;
        }
        for b in &backends {
            for &vip in vips {
                b.ns.add_host_addr(vip, "lo")?;
            }
            b.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            b.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        // See the module docs for why these two.
        client.ethtool(&["tx", "off"])?;
        let pass = attach_pass(lan.switch(), lb.peer_ifindex)?;
        let dir = TempDir::new(tag)?;
        Ok(LbParts {
            client,
            lb,
            backends,
            dir,
            pass,
            lan,
        })
    }
}

/// Client, load balancer and backends on one LAN, ready for `xdplb run`.
pub struct LbTopology {
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    pub dir: TempDir,
    _pass: PassProgram,
    // Last, so the hosts' namespaces go before the switch's.
    pub lan: Lan,
}

impl LbTopology {
    pub fn new(n_backends: usize) -> Result<LbTopology> {
        let LbParts {
            client,
            lb,
            backends,
            dir,
            pass,
            lan,
        } = LbParts::build(n_backends, "topo", &[VIP.into()], |_| None)?;
        Ok(LbTopology {
            client,
            lb,
            backends,
            dir,
            _pass: pass,
            lan,
        })
    }

    /// A config for this topology: `[dataplane]` on the LB's eth0 in driver mode, the API socket
    /// in the scratch directory, then `services` (TOML `[[vip]]` tables) verbatim.
    pub fn config(&self, services: &str) -> String {
        agent_config(&self.dir.path().join("xdplb.sock"), services)
    }

    /// Starts `xdplb run` inside the LB namespace with `config` and waits until it forwards.
    pub fn start_agent(&self, config: &str, extra_args: &[&str]) -> Result<Agent> {
        let cfg_path = self.dir.path().join("xdplb.toml");
        std::fs::write(&cfg_path, config)?;
        self.start_agent_file(&cfg_path, &self.dir.path().join("xdplb.sock"), extra_args)
    }

    /// Starts `xdplb run --config cfg_path` (whose API socket is `socket`) inside the LB
    /// namespace and waits until it forwards.
    pub fn start_agent_file(
        &self,
        cfg_path: &Path,
        socket: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        self.start_agent_bin(&xdplb_bin(), cfg_path, socket, extra_args, "agent.log")
    }

    /// [`start_agent_file`](Self::start_agent_file) with the agent binary `bin`, its output
    /// going to `log_name` in the scratch directory.
    pub fn start_agent_bin(
        &self,
        bin: &Path,
        cfg_path: &Path,
        socket: &Path,
        extra_args: &[&str],
        log_name: &str,
    ) -> Result<Agent> {
        let log_path = self.dir.path().join(log_name);
        Agent::spawn(&self.lb.ns, bin, cfg_path, socket, &log_path, extra_args)
    }
}

/// The config both LB topologies give the agent: `[dataplane]` on the LB's eth0 in driver mode,
/// the API socket at `socket`, then `services` verbatim.
pub(crate) fn agent_config(socket: &Path, services: &str) -> String {
    format!(
        "[dataplane]\ninterface = \"eth0\"\nmode = \"dsr-l2\"\nxdp_mode = \"driver\"\n\n\
         [api]\nsocket = \"{}\"\n\n{services}",
        socket.display()
    )
}

/// A running `xdplb run` process.
pub struct Agent {
    pub guard: ChildGuard,
    pub socket: PathBuf,
    pub log: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Agent {
    /// Starts `bin run --config cfg_path extra_args...` inside `ns` (its API socket is `socket`,
    /// its output goes to `log_path`) and waits, 30 s at most, until its data path is attached.
    pub fn spawn(
        ns: &Netns,
        bin: &Path,
        cfg_path: &Path,
        socket: &Path,
        log_path: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let log = std::fs::File::create(log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = ns.command(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(cfg_path)
            .args(extra_args)
            .env("NO_COLOR", "1")
            .stdout(log.try_clone()?)
            .stderr(log);
        let guard = ChildGuard::spawn(&mut cmd)?;
        let mut agent = Agent {
            guard,
            socket: socket.to_path_buf(),
            log: log_path.to_path_buf(),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
        };
        agent.wait_ready(Duration::from_secs(30))?;
        Ok(agent)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.guard.wait_timeout(Duration::ZERO)? {
                bail!(
                    "xdplb exited during start-up ({st}); log:\n{}",
                    self.log_text()
                );
            }
            // The agent attaches once every backend MAC is known or its --mac-wait ran out, so
            // an attached agent has resolved every backend that answers ARP.
            if let Ok(s) = self.status()
                && s.xdp_mode.is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "xdplb not ready within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn status(&self) -> Result<Status> {
        Ok(self.rt.block_on(Client::new(&self.socket).status())?)
    }

    /// The Prometheus exposition the agent serves at `GET /metrics`.
    pub fn metrics(&self) -> Result<String> {
        Ok(self.rt.block_on(Client::new(&self.socket).metrics())?)
    }

    pub fn which(&self, service: &str, src: SocketAddrV4) -> Result<WhichBackend> {
        Ok(self
            .rt
            .block_on(Client::new(&self.socket).which_backend(service, &src.to_string()))?)
    }

    /// Runs the `xdplb` CLI against this agent's socket (`xdplb --socket SOCKET ARGS...`).
    pub fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Ok(std::process::Command::new(xdplb_bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?)
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.guard.terminate(Duration::from_secs(10))
    }
}

/// Servers that answer every TCP connection and UDP datagram with their name, until dropped.
pub struct IdentityServers {
    stop: Arc<AtomicBool>,
    tcp: Vec<(i32, JoinHandle<()>)>,
    udp: Vec<JoinHandle<()>>,
}

impl IdentityServers {
    pub fn new() -> IdentityServers {
        IdentityServers {
            stop: Arc::new(AtomicBool::new(false)),
            tcp: Vec::new(),
            udp: Vec::new(),
        }
    }

    /// A TCP server in `ns` on `addr` that writes `name\n` and closes each connection.
    pub fn tcp(&mut self, ns: &Netns, addr: impl Into<SocketAddr>, name: &str) -> Result<()> {
        let addr = addr.into();
        let listener = ns.run_in(move || TcpListener::bind(addr))?;
        let fd = listener.as_raw_fd();
        let stop = self.stop.clone();
        let reply = format!("{name}\n");
        let t = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(mut c) = conn {
                    let _ = c.write_all(reply.as_bytes());
                    let _ = c.shutdown(Shutdown::Write);
                }
            }
        });
        self.tcp.push((fd, t));
        Ok(())
    }

    /// A UDP server in `ns` on `addr` that answers each datagram with `name`. For direct server
    /// return it must be bound to the VIP itself, so replies leave with the VIP as source.
    pub fn udp(&mut self, ns: &Netns, addr: impl Into<SocketAddr>, name: &str) -> Result<()> {
        let addr = addr.into();
        let sock = ns.run_in(move || UdpSocket::bind(addr))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = self.stop.clone();
        let reply = name.as_bytes().to_vec();
        self.udp.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        }));
        Ok(())
    }
}

impl Default for IdentityServers {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for IdentityServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for (fd, t) in self.tcp.drain(..) {
            // Wakes the blocked accept(); the listener itself is closed by its thread.
            // SAFETY: fd is the listener's, still open until its thread ends.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            let _ = t.join();
        }
        for t in self.udp.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects from `ns` (from `src` if given) to `dst`, reads the peer's one-line answer.
pub fn tcp_ask(ns: &Netns, src: Option<SocketAddrV4>, dst: SocketAddrV4) -> Result<String> {
    let stream = ns.run_in(move || connect(src, dst))?;
    read_line(stream)
}

/// Connects from the calling thread's namespace, within 3 s.
fn connect(src: Option<SocketAddrV4>, dst: SocketAddrV4) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if let Some(src) = src {
        s.bind(&SocketAddr::V4(src).into())?;
    }
    s.connect_timeout(&SocketAddr::V4(dst).into(), Duration::from_secs(3))?;
    Ok(s.into())
}

fn connect_and_read(src: Option<SocketAddrV4>, dst: SocketAddrV4) -> Result<String> {
    read_line(connect(src, dst)?)
}

fn read_line(mut s: TcpStream) -> Result<String> {
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

/// A UDP socket in `ns` bound to `src`, for sending many datagrams of one flow.
pub fn udp_client(ns: &Netns, src: impl Into<SocketAddr>) -> Result<UdpSocket> {
    let src = src.into();
    let s = ns.run_in(move || UdpSocket::bind(src))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// Sends `payload` to `dst` and returns the answer's text.
pub fn udp_ask(sock: &UdpSocket, dst: impl Into<SocketAddr>, payload: &[u8]) -> Result<String> {
    let dst = dst.into();
    sock.send_to(payload, dst)?;
    let mut buf = [0u8; 512];
    let (n, from) = sock.recv_from(&mut buf)?;
    if from != dst {
        return Err(anyhow!("answer came from {from}, not {dst}"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).to_string())
}

/// Counts answers per backend name.
pub fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.to_string()).or_default() += 1;
    }
    m
}

/// Sends raw Ethernet frames out of `ifindex` in `ns` (AF_PACKET), for malformed packets the
/// kernel's sockets would never produce.
pub fn send_frames(ns: &Netns, ifindex: u32, frames: Vec<Vec<u8>>) -> Result<()> {
    ns.run_in(move || -> Result<()> {
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
        }
        // SAFETY: fd was just created and is owned here.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        for f in &frames {
            // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            // SAFETY: valid buffer and address of the stated lengths.
            let n = unsafe {
                libc::sendto(
                    sock.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error()).context("sendto on AF_PACKET");
            }
        }
        Ok(())
    })
}

/// Waits until the agent's log contains `needle` (bounded).
pub fn wait_for_log(agent: &Agent, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if agent.log_text().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Removes a directory (e.g. bpffs pins a test may leave) on drop.
pub struct RemoveDir(pub PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Connections opened one after another from `ns` to `dst` on a thread, until stopped; for
/// checking that an event in the middle does not break any.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<TrafficReport>>,
}

#[derive(Debug, Default)]
pub struct TrafficReport {
    /// Answers, in order.
    pub answers: Vec<String>,
    /// Failed connections: source and error.
    pub failures: Vec<String>,
}

impl Traffic {
    /// Starts connecting from source ports `first_port`, `first_port + 1`, ... (wrapping within
    /// 10000 ports), each connection a new flow.
    pub fn start(ns: &Netns, src: Ipv4Addr, first_port: u16, dst: SocketAddrV4) -> Result<Traffic> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // The thread only creates sockets inside `ns` through a namespace handle of its own.
        let fd = ns.run_in(|| std::fs::File::open("/proc/thread-self/ns/net"))?;
        let thread = std::thread::spawn(move || {
            // SAFETY: entering the network namespace of an fd we own, on this thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return TrafficReport {
                    failures: vec![format!("setns: {}", std::io::Error::last_os_error())],
                    ..Default::default()
                };
            }
            let mut report = TrafficReport::default();
            let mut i = 0u16;
            while !flag.load(Ordering::Relaxed) {
                let port = first_port + i % 10000;
                i = i.wrapping_add(1);
                let s = SocketAddrV4::new(src, port);
                match connect_and_read(Some(s), dst) {
                    Ok(a) => report.answers.push(a),
                    Err(e) => report.failures.push(format!("{s}: {e:#}")),
                }
            }
            report
        });
        Ok(Traffic {
            stop,
            thread: Some(thread),
        })
    }

    pub fn finish(mut self) -> TrafficReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("traffic thread panicked")
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Backend `addr` of VIP `vip` in a status; panics naming what is missing.
pub fn backend_status<'a>(s: &'a Status, vip: &str, addr: Ipv4Addr) -> &'a BackendStatus {
    let v = s
        .vips
        .iter()
        .find(|v| v.name == vip)
        .unwrap_or_else(|| panic!("no vip {vip}"));
    v.backends
        .iter()
        .find(|b| b.address == addr.to_string())
        .unwrap_or_else(|| panic!("backend {addr} not in vip {vip}"))
}

/// Polls the agent's status until `pred` holds; returns how long it took. Panics with the status
/// and the log after `timeout`.
pub fn wait_until(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Status) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let s = agent.status().unwrap();
        if pred(&s) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what} not within {timeout:?}: {s:#?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
