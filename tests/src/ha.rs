//! The high-availability topology of the HA tests and the failover bench: two load balancers
//! that share the VIP through VRRPv3, a client and N backends on one bridge; a launcher for
//! keepalived (the reference VRRP implementation xdplb must interoperate with); a sniffer for
//! VRRP adverts.
//!
//! ```text
//!   client 10.0.0.1  ──┐
//!   lb1    10.0.0.2  ──┤ br0 (switch netns)   VIP 10.0.0.100: on the eth0 of whichever LB is
//!   lb2    10.0.0.3  ──┤                      VRRP master (added by xdplb's HA code or by
//!   b1     10.0.0.11 ──┤                      keepalived, never by this module), and on every
//!   b2     10.0.0.12 ──┘                      backend's lo as in `LbTopology`
//! ```
//!
//! Nodes are numbered from 0: node 0 is `lb1` (10.0.0.2), node 1 is `lb2` (10.0.0.3).
//!
//! The veth measures of [`crate::topology`] apply to both LBs, since either may forward: both
//! bridge-side peers get `xdp_pass`, and the client's TX checksum offload is off.
//!
//! Guaranteed: every wait is bounded; every process started here is owned by a [`ChildGuard`]
//! (killed and reaped on drop, also when a test panics); the namespaces go with the topology.
//!
//! Not guaranteed: [`Keepalived::wait_state`] reads keepalived's log, whose timestamps have
//! one-second resolution: time transitions by polling [`HaTopology::vip_holder`] instead.

use std::{
    io::Read as _,
    net::TcpStream,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    netns::{ChildGuard, Host, Lan, Netns},
    topology::{
        Agent, CLIENT_ADDR, IdentityServers, PassProgram, TempDir, VIP, attach_pass, backend_addr,
        xdplb_bin,
    },
};

/// How many load balancers the topology has.
pub const NODES: usize = 2;

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;

/// The multicast group VRRP adverts go to (RFC 5798 5.1.1.2).
pub const VRRP_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);

/// Node `node` (0-based) has address 10.0.0.(2 + node) and name `lb{node+1}`.
pub fn lb_addr(node: usize) -> Ipv4Addr {
    assert!(node < NODES, "node {node}: the topology has {NODES} LBs");
    Ipv4Addr::new(10, 0, 0, 2 + node as u8)
}

/// Two LBs, a client and backends on one LAN, ready for `xdplb run` with `[ha]` or keepalived.
pub struct HaTopology {
    pub client: Host,
    /// Node 0 is lb1, node 1 is lb2.
    pub lbs: Vec<Host>,
    pub backends: Vec<Host>,
    pub dir: TempDir,
    _pass: Vec<PassProgram>,
    /// Each node's pin directory: an agent killed with SIGKILL leaves its link pinned (and
    /// forwarding) there, holding the program and its maps until someone removes the pin.
    pins: Vec<PathBuf>,
    // Last, so the hosts' namespaces go before the switch's.
    pub lan: Lan,
}

impl Drop for HaTopology {
    fn drop(&mut self) {
        for dir in &self.pins {
            if dir.exists() {
                lb_userspace::dataplane::remove_pins(dir);
            }
        }
    }
}

impl HaTopology {
    pub fn new(n_backends: usize) -> Result<HaTopology> {
        let mut lan = Lan::new()?;
        let client = lan.add_host("client", &format!("{CLIENT_ADDR}/24"))?;
        let mut lbs = Vec::new();
        for node in 0..NODES {
            lbs.push(lan.add_host(&format!("lb{}", node + 1), &format!("{}/24", lb_addr(node)))?);
        }
        let mut backends = Vec::new();
        for i in 0..n_backends {
            backends
                .push(lan.add_host(&format!("b{}", i + 1), &format!("{}/24", backend_addr(i)))?);
        }
        // No VIP on the LBs: which one answers ARP for it is exactly what VRRP decides.
        for b in &backends {
            b.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            b.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
            b.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        }
        // See crate::topology's module docs for why these two.
        client.ethtool(&["tx", "off"])?;
        let mut pass = Vec::new();
        for lb in &lbs {
            pass.push(attach_pass(lan.switch(), lb.peer_ifindex)?);
        }
        let dir = TempDir::new("ha")?;
        let pins = lbs
            .iter()
            .map(|lb| lb.ns.run_in(|| lb_userspace::dataplane::pin_dir("eth0")))
            .collect();
        Ok(HaTopology {
            pins,
            client,
            lbs,
            backends,
            dir,
            _pass: pass,
            lan,
        })
    }

    /// The host of node `node` (0-based).
    pub fn lb(&self, node: usize) -> &Host {
        &self.lbs[node]
    }

    /// An identity server (answering its name, `b1`, `b2`, ...) on `port` of every backend, on
    /// every address: the VIP for the client's connections, the backend's own address for the
    /// agents' health checks.
    pub fn identity_servers(&self, port: u16) -> Result<IdentityServers> {
        let mut s = IdentityServers::new();
        for (i, b) in self.backends.iter().enumerate() {
            s.tcp(
                &b.ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
                &format!("b{}", i + 1),
            )?;
        }
        Ok(s)
    }

    /// Node `node`'s eth0 MAC as `ip` prints it (`aa:bb:cc:dd:ee:ff`), comparable with
    /// [`client_arp`](Self::client_arp).
    pub fn node_mac(&self, node: usize) -> String {
        fmt_mac(&self.lbs[node].mac)
    }

    /// The API socket of node `node`'s agent.
    pub fn socket(&self, node: usize) -> PathBuf {
        self.dir.path().join(format!("lb{}.sock", node + 1))
    }

    /// A config for node `node`: `[dataplane]` on its eth0 in driver mode, its API socket in the
    /// scratch directory, then `ha` as the body of an `[ha]` table (its keys, without the
    /// `[ha]` header; empty: no `[ha]` table at all), then `services` (TOML `[[vip]]` tables)
    /// verbatim.
    pub fn config(&self, node: usize, services: &str, ha: &str) -> String {
        let ha = if ha.trim().is_empty() {
            String::new()
        } else {
            format!("[ha]\n{}\n\n", ha.trim_end())
        };
        format!(
            "[dataplane]\ninterface = \"eth0\"\nmode = \"dsr-l2\"\nxdp_mode = \"driver\"\n\n\
             [api]\nsocket = \"{}\"\n\n{ha}{services}",
            self.socket(node).display()
        )
    }

    /// Starts `xdplb run` inside node `node`'s namespace with `config` (written to
    /// `lb<N>.toml` in the scratch directory) and waits until its data path is attached.
    /// Each start logs to a file of its own (`lb<N>-<seq>.log`), so a restarted agent's log
    /// holds only its own lines.
    pub fn start_agent(&self, node: usize, config: &str, extra_args: &[&str]) -> Result<HaAgent> {
        let cfg_path = self.dir.path().join(format!("lb{}.toml", node + 1));
        std::fs::write(&cfg_path, config)
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        let log = self
            .dir
            .path()
            .join(format!("lb{}-{}.log", node + 1, next_seq()));
        HaAgent::start(
            &self.lbs[node].ns,
            node,
            &xdplb_bin(),
            &cfg_path,
            &self.socket(node),
            &log,
            extra_args,
        )
    }

    /// The LB nodes that currently have the VIP on eth0, in node order. Panics if `ip` fails
    /// (the topology is broken then, not the code under test).
    pub fn vip_holder(&self) -> Vec<usize> {
        (0..NODES)
            .filter(|&node| {
                let json = self.lbs[node]
                    .ns
                    .ip(&["-j", "-4", "addr", "show", "dev", "eth0"])
                    .unwrap_or_else(|e| panic!("reading lb{}'s addresses: {e:#}", node + 1));
                has_address(&json, VIP)
                    .unwrap_or_else(|e| panic!("parsing lb{}'s addresses: {e:#}\n{json}", node + 1))
            })
            .collect()
    }

    /// Polls [`vip_holder`](Self::vip_holder) until it is exactly `expected`; how long that
    /// took, or `None` after `timeout`.
    pub fn wait_vip_holder(&self, expected: &[usize], timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if self.vip_holder() == expected {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Polls [`vip_holder`](Self::vip_holder) until it includes `node` (others may hold the VIP
    /// too, e.g. a crashed keepalived's node, which keeps its addresses); how long that took, or
    /// `None` after `timeout`.
    pub fn wait_holds(&self, node: usize, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        loop {
            if self.vip_holder().contains(&node) {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The client's neighbour entry for the VIP: the MAC it sends VIP traffic to (`ip` format),
    /// or `None` when it has none (never resolved, or failed). Panics if `ip` fails.
    pub fn client_arp(&self) -> Option<String> {
        self.client_neighbour(&VIP.to_string())
    }

    /// The client's neighbour entry for `addr` (IPv4 or IPv6), as [`client_arp`](Self::client_arp).
    pub fn client_neighbour(&self, addr: &str) -> Option<String> {
        let family = if addr.contains(':') { "-6" } else { "-4" };
        let json = self
            .client
            .ns
            .ip(&["-j", family, "neigh", "show", "to", addr, "dev", "eth0"])
            .unwrap_or_else(|e| panic!("reading the client's neighbours: {e:#}"));
        let v: serde_json::Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("parsing the client's neighbours: {e}\n{json}"));
        v.as_array()?
            .iter()
            .find(|n| n["dst"].as_str() == Some(addr))?["lladdr"]
            .as_str()
            .map(str::to_owned)
    }

    /// Polls [`client_arp`](Self::client_arp) until it is node `node`'s MAC; how long that took,
    /// or `None` after `timeout`.
    pub fn wait_client_arp(&self, node: usize, timeout: Duration) -> Option<Duration> {
        let want = self.node_mac(node);
        let start = Instant::now();
        loop {
            if self.client_arp().as_deref() == Some(want.as_str()) {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Opens a TCP connection from the client to VIP:`port` within `timeout`. `Ok` when a host
    /// answered, with a SYN-ACK or with a reset: a reset is how the holder's kernel answers a
    /// port nobody listens on, so a closed port proves reachability without a server. `Err` on
    /// timeout or when the VIP does not resolve.
    pub fn client_reaches_vip(&self, port: u16, timeout: Duration) -> Result<()> {
        let dst = SocketAddr::V4(SocketAddrV4::new(VIP, port));
        self.client.ns.run_in(move || -> Result<()> {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            match s.connect_timeout(&dst.into(), timeout) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                Err(e) => Err(e).with_context(|| format!("connecting to {dst}")),
            }
        })
    }

    /// `ip link set eth0 up|down` on node `node`.
    pub fn set_link(&self, node: usize, up: bool) -> Result<()> {
        self.lbs[node]
            .ns
            .ip(&["link", "set", "eth0", if up { "up" } else { "down" }])
            .map(drop)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `ip -j addr show` output lists `addr` (in any prefix length).
fn has_address(ip_json: &str, addr: Ipv4Addr) -> Result<bool> {
    let v: serde_json::Value = serde_json::from_str(ip_json)?;
    let want = addr.to_string();
    Ok(v.as_array()
        .ok_or_else(|| anyhow!("not a JSON array"))?
        .iter()
        .filter_map(|link| link["addr_info"].as_array())
        .flatten()
        .any(|a| a["local"].as_str() == Some(want.as_str())))
}

fn next_seq() -> u32 {
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A running `xdplb run` on one node of an [`HaTopology`]: a [`topology::Agent`](Agent) that
/// knows its node.
pub struct HaAgent {
    pub node: usize,
    pub agent: Agent,
}

impl std::ops::Deref for HaAgent {
    type Target = Agent;

    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl HaAgent {
    /// Starts `bin run --config cfg_path extra_args...` inside `ns`, output to `log`, and waits
    /// (30 s at most) until its data path is attached, whatever its VRRP state: a backup keeps
    /// its data path ready, so that taking over only moves the address.
    pub fn start(
        ns: &Netns,
        node: usize,
        bin: &Path,
        cfg_path: &Path,
        socket: &Path,
        log: &Path,
        extra_args: &[&str],
    ) -> Result<HaAgent> {
        let agent = Agent::spawn(ns, bin, cfg_path, socket, log, extra_args)
            .with_context(|| format!("lb{}", node + 1))?;
        Ok(HaAgent { node, agent })
    }

    /// Polls the log until it contains `needle`; `false` after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        poll_log(&self.log, needle, timeout)
    }

    /// The VRRP part of its status.
    pub fn ha(&self) -> Result<lb_userspace::ha::HaStatus> {
        self.status()?
            .ha
            .ok_or_else(|| anyhow!("lb{}: status has no ha section", self.node + 1))
    }

    /// SIGTERM (a graceful exit: a master hands over) and wait, 10 s at most before SIGKILL.
    pub fn stop(self) -> ExitStatus {
        self.agent.stop()
    }

    /// SIGKILL, as a crash: no goodbye advert, addresses left in place.
    pub fn kill9(mut self) -> Result<ExitStatus> {
        kill_group(&mut self.agent.guard)
    }
}

/// SIGKILL to the guard's whole process group (keepalived's VRRP child, too, must die with its
/// parent for a crash to be a crash), then reap.
fn kill_group(guard: &mut ChildGuard) -> Result<ExitStatus> {
    let pid = libc::pid_t::try_from(guard.pid())?;
    // SAFETY: kill has no memory-safety preconditions. ChildGuard::spawn made the child lead its
    // own group, so -pid names only it and its descendants.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    guard
        .wait_timeout(Duration::from_secs(5))?
        .ok_or_else(|| anyhow!("process {pid} still running 5 s after SIGKILL"))
}

fn poll_log(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One keepalived VRRP instance, as [`Keepalived::start`] configures it.
#[derive(Clone, Debug)]
pub struct KeepalivedConfig {
    pub interface: String,
    pub vrid: u8,
    pub priority: u8,
    /// 10 ms to 40.95 s, a multiple of 10 ms (VRRPv3 carries centiseconds).
    pub advert_interval: Duration,
    pub preempt: bool,
    /// Added as /32 on `interface` while master.
    pub vips: Vec<Ipv4Addr>,
    /// `unicast_src_ip`; keepalived's default is the interface's primary address.
    pub unicast_src: Option<Ipv4Addr>,
    /// Empty: multicast to 224.0.0.18.
    pub unicast_peers: Vec<Ipv4Addr>,
}

impl KeepalivedConfig {
    /// On eth0, advert every second (the RFC default), preempting, multicast.
    pub fn new(vrid: u8, priority: u8, vips: &[Ipv4Addr]) -> KeepalivedConfig {
        KeepalivedConfig {
            interface: "eth0".to_owned(),
            vrid,
            priority,
            advert_interval: Duration::from_secs(1),
            preempt: true,
            vips: vips.to_vec(),
            unicast_src: None,
            unicast_peers: Vec::new(),
        }
    }

    /// The keepalived.conf text.
    pub fn render(&self) -> Result<String> {
        ensure!(self.vrid >= 1, "keepalived: vrid must be 1..=255");
        ensure!(self.priority >= 1, "keepalived: priority must be 1..=255");
        ensure!(!self.vips.is_empty(), "keepalived: no VIPs");
        const CS_NANOS: u128 = 10_000_000;
        let nanos = self.advert_interval.as_nanos();
        // keepalived rounds other values silently; a test must get the interval it asked for.
        ensure!(
            (CS_NANOS..=4095 * CS_NANOS).contains(&nanos) && nanos.is_multiple_of(CS_NANOS),
            "keepalived: advert_interval {:?} is not a multiple of 10 ms within 10 ms..=40.95 s",
            self.advert_interval
        );
        let cs = nanos / CS_NANOS;
        let mut s = String::new();
        // vrrp_strict stays off: it forbids unicast peers and implies no_accept, whose firewall
        // rules make the master drop traffic to the VIPs (the reachability checks need it to
        // answer, and an xdplb peer serves them).
        s.push_str("global_defs {\n    vrrp_version 3\n}\n\n");
        s.push_str(&format!("vrrp_instance VI_{} {{\n", self.vrid));
        // BACKUP even on the preferred node: nopreempt requires it, and starting as backup is
        // how RFC 5798 lets priorities, not start order, pick the master.
        s.push_str("    state BACKUP\n");
        s.push_str(&format!("    interface {}\n", self.interface));
        s.push_str(&format!("    virtual_router_id {}\n", self.vrid));
        s.push_str(&format!("    priority {}\n", self.priority));
        s.push_str(&format!("    advert_int {}.{:02}\n", cs / 100, cs % 100));
        if !self.preempt {
            s.push_str("    nopreempt\n");
        }
        if let Some(src) = self.unicast_src {
            s.push_str(&format!("    unicast_src_ip {src}\n"));
        }
        if !self.unicast_peers.is_empty() {
            s.push_str("    unicast_peer {\n");
            for p in &self.unicast_peers {
                s.push_str(&format!("        {p}\n"));
            }
            s.push_str("    }\n");
        }
        s.push_str("    virtual_ipaddress {\n");
        for v in &self.vips {
            s.push_str(&format!("        {v}/32 dev {}\n", self.interface));
        }
        s.push_str("    }\n}\n");
        Ok(s)
    }
}

/// Path of the keepalived binary: `$KEEPALIVED_BIN`, else `/usr/sbin/keepalived` (Debian's,
/// installed by `cargo xtask setup`; /usr/sbin is not on every PATH), else `keepalived`.
pub fn keepalived_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEPALIVED_BIN") {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/keepalived");
    if debian.is_file() {
        return debian.to_path_buf();
    }
    PathBuf::from("keepalived")
}

/// A keepalived (VRRP only) running in a namespace, in the foreground, killed on drop.
pub struct Keepalived {
    guard: ChildGuard,
    /// Its generated keepalived.conf.
    pub conf: PathBuf,
    /// Its console output (everything it logs).
    pub log: PathBuf,
}

impl Keepalived {
    /// Writes `cfg` to a file in `dir`, checks it with `keepalived -t`, starts keepalived inside
    /// `ns` and waits (10 s at most) for its "Startup complete". Its files in `dir` (config, log,
    /// pid files) are named `keepalived-<netns>-<seq>.*`, so any number of instances may share
    /// `dir`, and none touches the host's /run/keepalived.pid.
    pub fn start(ns: &Netns, dir: &Path, cfg: &KeepalivedConfig) -> Result<Keepalived> {
        let stem = dir.join(format!("keepalived-{}-{}", ns.name(), next_seq()));
        let file = |ext: &str| PathBuf::from(format!("{}.{ext}", stem.display()));
        let conf = file("conf");
        let log = file("log");
        std::fs::write(&conf, cfg.render()?)
            .with_context(|| format!("writing {}", conf.display()))?;
        let bin = keepalived_bin();
        let bin_str = bin.to_string_lossy().into_owned();
        let conf_str = conf.to_string_lossy().into_owned();
        // A template error would otherwise show only as a keepalived that never elects anyone.
        ns.exec(&bin_str, &["--config-test", "-f", &conf_str])
            .with_context(|| {
                format!(
                    "keepalived rejects {} (is keepalived installed? `cargo xtask setup`):\n{}",
                    conf.display(),
                    std::fs::read_to_string(&conf).unwrap_or_default()
                )
            })?;
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = ns.command(&bin);
        cmd.args([
            // Foreground, so the ChildGuard owns the real parent process.
            "--dont-fork",
            // To stdout, which goes to the log file; no syslog, which may be absent and would
            // mix instances.
            "--log-console",
            "--no-syslog",
            "--log-detail",
            "--vrrp",
        ])
        .arg("--use-file")
        .arg(&conf)
        // Every pid file of its own: keepalived refuses to start while its pid file names a live
        // keepalived, and the defaults are host-wide (/run/keepalived.pid, /run/vrrp.pid).
        .arg("--pid")
        .arg(file("pid"))
        .arg("--vrrp_pid")
        .arg(file("vrrp.pid"))
        .arg("--checkers_pid")
        .arg(file("checkers.pid"))
        .arg("--bfd_pid")
        .arg(file("bfd.pid"))
        .stdout(out.try_clone()?)
        .stderr(out);
        let guard = ChildGuard::spawn(&mut cmd)?;
        let mut k = Keepalived { guard, conf, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = k.guard.wait_timeout(Duration::ZERO)? {
                bail!(
                    "keepalived exited during start-up ({st}); log:\n{}",
                    k.log_text()
                );
            }
            if k.log_text().contains("Startup complete") {
                return Ok(k);
            }
            if Instant::now() >= deadline {
                bail!(
                    "keepalived did not complete start-up within 10 s; log:\n{}",
                    k.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The parent process's pid (its process group: the VRRP child is in it).
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The state keepalived last entered, from its log ("(VI_51) Entering MASTER STATE",
    /// "... Entering BACKUP STATE (init)"): `MASTER`, `BACKUP` or `FAULT`; `None` before the
    /// first.
    pub fn state(&self) -> Option<String> {
        last_state(&self.log_text())
    }

    /// Polls [`state`](Self::state) until it is `state` (`"MASTER"`, `"BACKUP"`, `"FAULT"`);
    /// `false` after `timeout`.
    pub fn wait_state(&self, state: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.state().as_deref() == Some(state) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls the log until it contains `needle`; `false` after `timeout`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        poll_log(&self.log, needle, timeout)
    }

    /// SIGKILL to keepalived and its VRRP child, as a crash: no priority-0 advert, and the VIPs
    /// stay on the interface (measured: keepalived removes them only on a clean exit).
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        kill_group(&mut self.guard)
    }

    /// SIGTERM, as `systemctl stop`: a master sends a priority-0 advert and removes its VIPs.
    /// SIGKILL after 5 s.
    pub fn stop(&mut self) -> ExitStatus {
        self.guard.terminate(Duration::from_secs(5))
    }
}

/// The state of the last "Entering <STATE> STATE" line of a keepalived log.
pub fn last_state(log: &str) -> Option<String> {
    log.lines().rev().find_map(|line| {
        let rest = &line[line.find("Entering ")? + "Entering ".len()..];
        let (state, _) = rest.split_once(" STATE")?;
        Some(state.to_owned())
    })
}

/// A raw IPv4 socket for protocol 112 in a namespace: receives every VRRP packet the namespace's
/// IP layer accepts, IP header included. Open it before the event whose adverts it should see.
pub struct VrrpSniffer {
    sock: Socket,
}

impl VrrpSniffer {
    /// Opens it in `ns` and joins 224.0.0.18 on the interface with address `local`, so
    /// multicast adverts arrive whether or not a VRRP daemon there joined the group.
    pub fn open(ns: &Netns, local: Ipv4Addr) -> Result<VrrpSniffer> {
        let sock = ns.run_in(move || -> Result<Socket> {
            let s = Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(i32::from(IPPROTO_VRRP))),
            )
            .context("raw socket for IP protocol 112")?;
            s.join_multicast_v4(&VRRP_GROUP, &local)
                .with_context(|| format!("joining {VRRP_GROUP} on {local}"))?;
            Ok(s)
        })?;
        Ok(VrrpSniffer { sock })
    }

    /// The next packet (IP header included) whose source is `from` (any if `None`) within
    /// `timeout`; `None` when none came.
    pub fn next_from(
        &mut self,
        from: Option<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left))?;
            let n = match (&self.sock).read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e).context("reading the raw VRRP socket"),
            };
            let pkt = &buf[..n];
            if n >= 20 && from.is_none_or(|f| pkt[12..16] == f.octets()) {
                return Ok(Some(pkt.to_vec()));
            }
        }
    }
}

/// A VRRPv3 advert as the sniffer saw it, decoded independently of xdplb's own decoder so the
/// two can be checked against each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniffedAdvert {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// High nibble of the first VRRP byte (3).
    pub version: u8,
    /// Low nibble (1: advertisement).
    pub kind: u8,
    pub vrid: u8,
    pub priority: u8,
    /// Max advert interval, centiseconds.
    pub interval_cs: u16,
    pub addresses: Vec<Ipv4Addr>,
    /// The VRRPv3 checksum (pseudo-header included, RFC 5798 5.2.8) verifies.
    pub checksum_ok: bool,
}

impl SniffedAdvert {
    /// Decodes an IPv4 packet carrying a VRRPv3 IPv4 advert.
    pub fn parse(pkt: &[u8]) -> Result<SniffedAdvert> {
        ensure!(pkt.len() >= 20 && pkt[0] >> 4 == 4, "not IPv4");
        let ihl = usize::from(pkt[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([pkt[2], pkt[3]]));
        ensure!(
            ihl >= 20 && total >= ihl + 8 && total <= pkt.len(),
            "bad IPv4 lengths: ihl {ihl}, total {total}, captured {}",
            pkt.len()
        );
        ensure!(pkt[9] == IPPROTO_VRRP, "IP protocol {} is not VRRP", pkt[9]);
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let v = &pkt[ihl..total];
        let count = usize::from(v[3]);
        ensure!(
            v.len() >= 8 + 4 * count,
            "{count} addresses do not fit {} bytes",
            v.len()
        );
        let addresses = v[8..8 + 4 * count]
            .chunks_exact(4)
            .map(|a| Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            .collect();
        let mut pseudo = Vec::with_capacity(12 + v.len());
        pseudo.extend_from_slice(&pkt[12..20]);
        pseudo.extend_from_slice(&[0, IPPROTO_VRRP]);
        pseudo.extend_from_slice(&(v.len() as u16).to_be_bytes());
        pseudo.extend_from_slice(v);
        Ok(SniffedAdvert {
            src,
            dst,
            ttl: pkt[8],
            version: v[0] >> 4,
            kind: v[0] & 0x0f,
            vrid: v[1],
            priority: v[2],
            interval_cs: u16::from_be_bytes([v[4], v[5]]) & 0x0fff,
            addresses,
            // Summing a message over its own checksum gives 0xffff (RFC 1071).
            checksum_ok: ones_complement_sum(&pseudo) == 0xffff,
        })
    }
}

fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Lowercase hex without separators, for test vectors.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long one probe waits for its connection: a lost SYN would otherwise wait for the
/// kernel's 1 s retransmission, and the outage would be measured in seconds.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(50);
const PROBE_READ_TIMEOUT: Duration = Duration::from_millis(200);
/// Between attempts, so the probe does not starve the VRRP daemons of CPU on a small machine.
const PROBE_PAUSE: Duration = Duration::from_millis(5);

/// The client-visible outage: the longest time from a success to the next success (the issue's
/// "time from last success to first success"), and how many attempts failed.
pub fn outage(log: &[(Instant, bool)]) -> (Duration, usize) {
    let mut last_ok: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    for (t, ok) in log {
        if *ok {
            if let Some(l) = last_ok {
                worst = worst.max(t.duration_since(l));
            }
            last_ok = Some(*t);
        }
    }
    (worst, log.iter().filter(|(_, ok)| !ok).count())
}

/// One connection to `dst` from the calling thread's namespace, with the probe's timeouts; the
/// answer.
pub fn ask(dst: SocketAddrV4) -> Result<String> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.connect_timeout(&SocketAddr::V4(dst).into(), PROBE_CONNECT_TIMEOUT)?;
    let mut s: TcpStream = s.into();
    s.set_read_timeout(Some(PROBE_READ_TIMEOUT))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    ensure!(!buf.is_empty(), "empty answer");
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// New connections to `dst`, one after another, on a thread of its own in a namespace, each
/// with a short timeout so that an outage is measured to within tens of milliseconds; what it
/// has seen so far is readable while it runs.
pub struct Probe {
    stop: Arc<AtomicBool>,
    successes: Arc<AtomicU64>,
    /// When the last success ended, ns after `epoch`; 0: none yet.
    last_ok_ns: Arc<AtomicU64>,
    epoch: Instant,
    thread: Option<JoinHandle<Vec<(Instant, bool)>>>,
}

impl Probe {
    /// Starts probing `dst` from `ns`.
    pub fn start(ns: &Netns, dst: SocketAddrV4) -> Result<Probe> {
        let fd = ns.run_in(|| std::fs::File::open("/proc/thread-self/ns/net"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let successes = Arc::new(AtomicU64::new(0));
        let last_ok_ns = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let (flag, count, last) = (stop.clone(), successes.clone(), last_ok_ns.clone());
        let thread = std::thread::spawn(move || {
            // SAFETY: entering the network namespace of an fd we own, on this thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Vec::new();
            }
            let mut log = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let ok = ask(dst).is_ok();
                let now = Instant::now();
                log.push((now, ok));
                if ok {
                    count.fetch_add(1, Ordering::Relaxed);
                    let ns =
                        u64::try_from(now.duration_since(epoch).as_nanos()).unwrap_or(u64::MAX);
                    last.store(ns.max(1), Ordering::Relaxed);
                }
                std::thread::sleep(PROBE_PAUSE);
            }
            log
        });
        Ok(Probe {
            stop,
            successes,
            last_ok_ns,
            epoch,
            thread: Some(thread),
        })
    }

    /// Successes so far.
    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    /// When the last success so far ended.
    pub fn last_success(&self) -> Option<Instant> {
        match self.last_ok_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.epoch + Duration::from_nanos(ns)),
        }
    }

    /// Stops and returns every attempt: when it ended and whether it succeeded.
    pub fn finish(mut self) -> Vec<(Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_multicast_instance() {
        let mut cfg = KeepalivedConfig::new(51, 150, &[VIP]);
        cfg.advert_interval = Duration::from_millis(100);
        let text = cfg.render().unwrap();
        assert!(text.contains("vrrp_version 3"));
        assert!(!text.contains("vrrp_strict"));
        assert!(text.contains("advert_int 0.10\n"));
        assert!(text.contains("10.0.0.100/32 dev eth0"));
        assert!(!text.contains("nopreempt"));
        assert!(!text.contains("unicast"));
    }

    #[test]
    fn renders_unicast_and_nopreempt() {
        let mut cfg = KeepalivedConfig::new(7, 100, &[VIP]);
        cfg.preempt = false;
        cfg.advert_interval = Duration::from_millis(2_500);
        cfg.unicast_src = Some(lb_addr(1));
        cfg.unicast_peers = vec![lb_addr(0)];
        let text = cfg.render().unwrap();
        assert!(text.contains("    nopreempt\n"));
        assert!(text.contains("advert_int 2.50\n"));
        assert!(text.contains("unicast_src_ip 10.0.0.3\n"));
        assert!(text.contains("unicast_peer {\n        10.0.0.2\n    }"));
    }

    #[test]
    fn rejects_intervals_vrrpv3_cannot_carry() {
        for ms in [0, 5, 15, 40_960] {
            let mut cfg = KeepalivedConfig::new(1, 100, &[VIP]);
            cfg.advert_interval = Duration::from_millis(ms);
            assert!(cfg.render().is_err(), "{ms} ms");
        }
    }

    #[test]
    fn reads_the_last_state() {
        let log = "Wed Nov 25 01:28:19 2026: (VI_51) Entering BACKUP STATE (init)\n\
                   Wed Nov 25 01:28:20 2026: (VI_51) Receive advertisement timeout\n\
                   Wed Nov 25 01:28:20 2026: (VI_51) Entering MASTER STATE\n\
                   Wed Nov 25 01:28:20 2026: (VI_51) setting VIPs.\n";
        assert_eq!(last_state(log).as_deref(), Some("MASTER"));
        assert_eq!(
            last_state("x: (VI_1) Entering BACKUP STATE (init)\n").as_deref(),
            Some("BACKUP")
        );
        assert_eq!(last_state("Startup complete\n"), None);
    }

    #[test]
    fn decodes_a_tcpdump_advert() {
        // keepalived 2.2.7, vrid 51, priority 100, 10 cs, VIP 10.0.0.100, from 10.0.0.3.
        let pkt = unhex("45c00020012d0000ff70cf6b0a000003e000001231336401000a75cb0a000064");
        let a = SniffedAdvert::parse(&pkt).unwrap();
        assert_eq!(
            a,
            SniffedAdvert {
                src: lb_addr(1),
                dst: VRRP_GROUP,
                ttl: 255,
                version: 3,
                kind: 1,
                vrid: 51,
                priority: 100,
                interval_cs: 10,
                addresses: vec![VIP],
                checksum_ok: true,
            }
        );
        let mut bad = pkt.clone();
        bad[26] ^= 1;
        assert!(!SniffedAdvert::parse(&bad).unwrap().checksum_ok);
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn finds_an_address_in_ip_json() {
        let json = r#"[{"ifindex":2,"ifname":"eth0","addr_info":[{"family":"inet","local":"10.0.0.2","prefixlen":24},{"family":"inet","local":"10.0.0.100","prefixlen":32}]}]"#;
        assert!(has_address(json, VIP).unwrap());
        assert!(!has_address(json, Ipv4Addr::new(10, 0, 0, 3)).unwrap());
        assert!(!has_address("[]", VIP).unwrap());
    }
}
