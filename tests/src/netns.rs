//! Network-namespace topologies for end-to-end tests.
//!
//! A test builds its own hosts as network namespaces on one L2 segment ([`Lan`]: a Linux bridge in
//! a "switch" namespace, one veth pair per [`Host`]) and runs real TCP/UDP traffic between them,
//! from one process: [`Netns::run_in`] creates sockets inside a namespace, [`Netns::command`]
//! starts programs inside one, [`ChildGuard`] owns those programs.
//!
//! Guaranteed:
//! - Names are unique per process and across processes: `xlb-<pid>-<seq>-<role>`.
//! - Dropping a [`Netns`] removes its name (`ip netns del`), also while a panic unwinds; dropping
//!   never panics (failures are printed to stderr). Dropping a [`ChildGuard`] sends SIGTERM, then
//!   SIGKILL after a grace period, and reaps the child.
//! - Namespaces left by a test process that died without unwinding (SIGKILL, abort) are deleted
//!   by [`sweep_stale`], which the first [`Netns::new`] of every process runs.
//! - Every helper that waits is bounded: commands time out ([`COMMAND_TIMEOUT`] unless given),
//!   the failure names the full command line, its exit status and its stderr.
//! - [`Lan`] and [`Host`] may be dropped in any order: deleting either end's namespace destroys the
//!   whole veth pair.
//!
//! Not guaranteed:
//! - A namespace outlives its name while something still references it: a socket created by
//!   [`Netns::run_in`], a process started inside it, an unspawned [`Netns::command`]. The name is
//!   gone from `ip netns list` at drop; the interfaces in it disappear when the last reference does.
//! - [`sweep_stale`] decides "dead" by the pid in the name; a dead test's pid reused by a live
//!   process keeps its namespaces until that process exits.
//! - Hosts added with [`Lan::add_host`] have IPv6 disabled (no router solicitations, MLD or DAD
//!   on the wire, so packet counts are deterministic). Hosts added with [`Lan::add_host_dual`] have
//!   IPv6 on, with a static address, duplicate address detection off (`accept_dad=0`, addresses
//!   added `nodad`, so they are usable at once) and no router advertisements or solicitations;
//!   they still send neighbour discovery and MLD, as IPv6 needs.
//! - Nothing here kills processes a test started without a [`ChildGuard`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once, OnceLock, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

/// How long [`Netns::ip`] and [`Netns::exec`] let a command run before killing it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The grace period between SIGTERM and SIGKILL when a [`ChildGuard`] is dropped.
pub const CHILD_GRACE: Duration = Duration::from_secs(2);

const PREFIX: &str = "xlb-";
const NETNS_DIR: &str = "/run/netns";

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// A network namespace, deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    // Shared with threads of `run_in` and with pending `command`s, so neither can see the fd
    // number closed and reused under it.
    fd: Arc<OwnedFd>,
}

impl Netns {
    /// Creates `xlb-<pid>-<seq>-<role>` with `lo` up. `role` is a short label for humans (letters,
    /// digits, `_`, `-`).
    pub fn new(role: &str) -> Result<Netns> {
        ensure!(
            !role.is_empty()
                && role.len() <= 32
                && role
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "netns role {role:?} must be 1 to 32 characters of [A-Za-z0-9_-]"
        );
        SWEEP.call_once(|| {
            if let Err(e) = sweep_stale() {
                eprintln!("xlb netns: sweeping stale namespaces failed: {e:#}");
            }
        });
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{seq}-{role}", std::process::id());
        let mut add = Command::new("ip");
        add.args(["netns", "add", &name]);
        run_bounded(add, COMMAND_TIMEOUT)?;
        let fd = match File::open(format!("{NETNS_DIR}/{name}")) {
            Ok(file) => Arc::new(OwnedFd::from(file)),
            Err(e) => {
                delete_netns(&name);
                return Err(e).with_context(|| format!("opening {NETNS_DIR}/{name}"));
            }
        };
        let ns = Netns { name, fd };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    /// Runs `ip netns exec NAME program args...` and returns its stdout, killing it after
    /// [`COMMAND_TIMEOUT`]. The program sees this namespace's `/sys`, not bpffs; use
    /// [`Netns::command`] for programs that need `/sys/fs/bpf`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        self.exec_timeout(program, args, COMMAND_TIMEOUT)
    }

    /// [`Netns::exec`] with its own time limit.
    pub fn exec_timeout(&self, program: &str, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        run_bounded(cmd, timeout)
    }

    /// Writes a sysctl inside this namespace. `key` is dotted (`net.ipv4.conf.all.arp_ignore`) or,
    /// when a component contains a dot (an interface name), slashed (`net/ipv4/conf/eth0.1/...`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = if key.contains('/') {
            format!("/proc/sys/{key}")
        } else {
            format!("/proc/sys/{}", key.replace('.', "/"))
        };
        let value = value.to_owned();
        let written = path.clone();
        // /proc/sys/net resolves against the opening thread's namespace, so a thread that entered
        // it is enough; no sysctl(8) binary is needed.
        self.run_in(move || std::fs::write(&written, value))
            .with_context(|| format!("writing {path} in netns {}", self.name))
    }

    /// Adds `addr` to `dev` as a host address (/32 or /128). On `lo` it is how a backend holds a
    /// VIP for direct server return (an IPv4 VIP also needs `arp_ignore`/`arp_announce`; IPv6
    /// never answers neighbour solicitations on `eth0` for an address that is only on `lo`); on
    /// `eth0` it is how the load balancer owns a VIP on the wire (it answers ARP or neighbour
    /// solicitations for it).
    ///
    /// An IPv6 address is added without duplicate address detection and deprecated
    /// (`preferred_lft 0`): it receives and answers as any address, but the host never picks it
    /// as the source of its own connections. Without that, Linux's source address selection
    /// (RFC 6724 rule 8, the match length capped at the address's prefix length) prefers a /128
    /// VIP on `eth0` over the /64 host address for every on-link destination: the load
    /// balancer's health checks would leave from the VIP, and a backend holding the VIP on `lo`
    /// answers them to itself.
    pub fn add_host_addr(&self, addr: IpAddr, dev: &str) -> Result<()> {
        let cidr = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        let mut args = vec!["addr", "add", cidr.as_str(), "dev", dev];
        if addr.is_ipv6() {
            args.extend(["nodad", "preferred_lft", "0"]);
        }
        self.ip(&args).map(drop)
    }

    /// Runs `f` on a fresh thread that has entered this namespace with setns(CLONE_NEWNET) and
    /// returns its result. Sockets created inside `f` stay in this namespace after it returns, so
    /// tests can create listeners/clients in any namespace from one process. A panic in `f` is
    /// resumed on the caller; failing to enter the namespace panics.
    pub fn run_in<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let fd = Arc::clone(&self.fd);
        let name = self.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                // SAFETY: setns only reads the fd, which `fd` keeps open; it changes this thread's
                // network namespace and nothing else.
                if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns into netns {name}: {}", io::Error::last_os_error());
                }
                f()
            })
            .expect("spawning a thread for Netns::run_in");
        match handle.join() {
            Ok(r) => r,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// A Command that runs `program` inside this namespace: setns in pre_exec, not `ip netns
    /// exec`, which also remounts /sys and so hides bpffs at /sys/fs/bpf from the child. The
    /// Command keeps the namespace alive until it is dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let fd = Arc::clone(&self.fd);
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs between fork and exec and only makes the setns syscall, which
        // is async-signal-safe; it neither allocates nor takes locks.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) {
    let mut del = Command::new("ip");
    del.args(["netns", "del", name]);
    if let Err(e) = run_bounded(del, COMMAND_TIMEOUT) {
        eprintln!("xlb netns: deleting {name} failed: {e:#}");
    }
}

/// Deletes namespaces named `xlb-<pid>-*` whose `<pid>` is no longer alive. [`Netns::new`] calls
/// it once per process; concurrent sweeps by several test processes are harmless.
pub fn sweep_stale() -> Result<()> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).context(format!("listing {NETNS_DIR}")),
    };
    let own = std::process::id();
    let mut failures = Vec::new();
    for entry in entries {
        let name = entry
            .with_context(|| format!("listing {NETNS_DIR}"))?
            .file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own || pid_alive(pid) {
            continue;
        }
        let mut del = Command::new("ip");
        del.args(["netns", "del", name]);
        if let Err(e) = run_bounded(del, COMMAND_TIMEOUT) {
            // Another process's sweep may have won the race; only a name still present is a failure.
            if std::path::Path::new(NETNS_DIR).join(name).exists() {
                failures.push(format!("{e:#}"));
            }
        }
    }
    ensure!(
        failures.is_empty(),
        "sweeping stale namespaces: {}",
        failures.join("; ")
    );
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// For privileged tests: `true` if they can run (root, and a namespace can be created). If not and
/// `CI=true`, panics, because privileged tests must fail rather than skip in CI; otherwise prints
/// a loud `SKIPPED: <why>` to stderr and returns `false`.
pub fn require_privileges(test: &str) -> bool {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    let Err(why) = PROBE.get_or_init(probe_privileges) else {
        return true;
    };
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
    if ci {
        panic!("{test}: privileged test cannot run and CI=true forbids skipping: {why}");
    }
    // Straight to fd 2: libtest captures `eprintln!`, and a skip must not pass silently.
    let _ = writeln!(io::stderr(), "\n*** SKIPPED: {test}: {why} ***\n");
    false
}

fn probe_privileges() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces, veth, bridges)".to_owned());
    }
    Netns::new("probe")
        .map(drop)
        .map_err(|e| format!("cannot create a network namespace: {e:#}"))
}

/// One L2 segment: a bridge `br0` inside its own "switch" namespace. Ports forward as soon as they
/// are up (no STP, no forward delay), multicast floods (no snooping), and frames are not passed
/// through netfilter (no br_netfilter), so malformed frames arrive as sent.
#[derive(Debug)]
pub struct Lan {
    switch: Netns,
    next_port: u32,
}

impl Lan {
    pub fn new() -> Result<Lan> {
        let switch = Netns::new("sw")?;
        disable_ipv6(&switch)?;
        switch.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        // A switch forwards frames, it does not firewall them. This kernel has br_netfilter
        // built in and on, which would run bridged IPv4 through netfilter and silently drop
        // frames with malformed IP headers, hiding them from the hosts' tests.
        for table in ["iptables", "ip6tables", "arptables"] {
            switch.sysctl(&format!("net.bridge.bridge-nf-call-{table}"), "0")?;
        }
        Ok(Lan {
            switch,
            next_port: 0,
        })
    }

    /// Creates host namespace `role` with `eth0` (address `addr`, CIDR such as `10.0.0.11/24`)
    /// cabled by a veth pair to port `p-<n>` of `br0`; both ends up. IPv6 is disabled in it.
    pub fn add_host(&mut self, role: &str, addr: &str) -> Result<Host> {
        self.add(role, addr, None)
    }

    /// [`Lan::add_host`] with IPv6 on as well: `eth0` also gets `addr6` (CIDR such as
    /// `2001:db8::11/64`), usable at once (no duplicate address detection, see the module docs).
    pub fn add_host_dual(&mut self, role: &str, addr: &str, addr6: &str) -> Result<Host> {
        self.add(role, addr, Some(addr6))
    }

    fn add(&mut self, role: &str, addr: &str, addr6: Option<&str>) -> Result<Host> {
        let (ip, prefix_len) = parse_cidr(addr)?;
        let ip6 = addr6.map(parse_cidr6).transpose()?;
        let ns = Netns::new(role)?;
        if ip6.is_some() {
            // Before eth0 arrives, so it starts with these (a device moved into a namespace
            // takes that namespace's `default` settings).
            quiet_ipv6(&ns)?;
        } else {
            disable_ipv6(&ns)?;
        }
        let peer = format!("p-{}", self.next_port);
        self.next_port += 1;
        let ifname = "eth0".to_owned();
        self.switch.ip(&[
            "link",
            "add",
            &peer,
            "type",
            "veth",
            "peer",
            "name",
            &ifname,
            "netns",
            ns.name(),
        ])?;
        self.switch
            .ip(&["link", "set", &peer, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", addr, "dev", &ifname])?;
        if let Some(addr6) = addr6 {
            ns.sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0")?;
            ns.ip(&["-6", "addr", "add", addr6, "dev", &ifname, "nodad"])?;
        }
        ns.ip(&["link", "set", &ifname, "up"])?;
        let (ifindex, mac) = link_info(&ns, &ifname)?;
        let (peer_ifindex, _) = link_info(&self.switch, &peer)?;
        Ok(Host {
            ns,
            ifname,
            peer,
            peer_ifindex,
            ifindex,
            mac,
            addr: ip,
            prefix_len,
            addr6: ip6.map(|(ip, _)| ip),
        })
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }
}

/// A host on a [`Lan`]. Its namespace is deleted on drop, which also removes its bridge port.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    /// `eth0`.
    pub ifname: String,
    /// The veth peer's name inside the switch namespace, a port of `br0`.
    pub peer: String,
    pub peer_ifindex: u32,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The IPv6 address of `eth0`, for hosts made with [`Lan::add_host_dual`].
    pub addr6: Option<Ipv6Addr>,
}

impl Host {
    /// Runs `ethtool -K eth0 args...` inside the host, e.g. `&["tx", "off"]`.
    pub fn ethtool(&self, args: &[&str]) -> Result<()> {
        let mut full = vec!["-K", self.ifname.as_str()];
        full.extend_from_slice(args);
        self.ns.exec("ethtool", &full).map(drop)
    }
}

/// IPv6 on, with nothing automatic: no duplicate address detection, router advertisements,
/// solicitations or temporary addresses, for `all` existing and `default` future interfaces.
fn quiet_ipv6(ns: &Netns) -> Result<()> {
    for scope in ["all", "default"] {
        for (key, value) in [
            ("disable_ipv6", "0"),
            ("accept_dad", "0"),
            ("accept_ra", "0"),
            ("router_solicitations", "0"),
            ("use_tempaddr", "0"),
        ] {
            ns.sysctl(&format!("net.ipv6.conf.{scope}.{key}"), value)?;
        }
    }
    Ok(())
}

fn disable_ipv6(ns: &Netns) -> Result<()> {
    // `default` covers interfaces created later (eth0, br0); `all` those that exist (lo).
    ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
    ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")
}

fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    parse_cidr_of(cidr, 32)
}

fn parse_cidr6(cidr: &str) -> Result<(Ipv6Addr, u8)> {
    parse_cidr_of(cidr, 128)
}

fn parse_cidr_of<A>(cidr: &str, max_len: u8) -> Result<(A, u8)>
where
    A: std::str::FromStr,
    A::Err: std::error::Error + Send + Sync + 'static,
{
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("{cidr:?} is not ADDR/LEN"))?;
    let ip = ip.parse().with_context(|| format!("address in {cidr:?}"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("prefix length in {cidr:?}"))?;
    ensure!(
        len <= max_len,
        "prefix length in {cidr:?} exceeds {max_len}"
    );
    Ok((ip, len))
}

fn link_info(ns: &Netns, dev: &str) -> Result<(u32, [u8; 6])> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let parse = || -> Result<(u32, [u8; 6])> {
        let v: serde_json::Value = serde_json::from_str(&json)?;
        let link = &v[0];
        let ifindex = link["ifindex"]
            .as_u64()
            .ok_or_else(|| anyhow!("no ifindex"))?;
        let address = link["address"]
            .as_str()
            .ok_or_else(|| anyhow!("no address"))?;
        let mut mac = [0u8; 6];
        let mut octets = address.split(':');
        for byte in &mut mac {
            let octet = octets
                .next()
                .ok_or_else(|| anyhow!("short MAC {address:?}"))?;
            *byte = u8::from_str_radix(octet, 16).with_context(|| format!("MAC {address:?}"))?;
        }
        ensure!(octets.next().is_none(), "long MAC {address:?}");
        Ok((u32::try_from(ifindex)?, mac))
    };
    parse().with_context(|| format!("parsing `ip -j link show dev {dev}` in {}: {json}", ns.name))
}

/// A child process killed (SIGTERM, then SIGKILL after [`CHILD_GRACE`]) and reaped on drop.
///
/// Children started with [`ChildGuard::spawn`] lead their own process group, which the signals
/// target (so `sh -c` wrappers take their children with them), and get SIGKILL if the thread that
/// spawned them dies, so a test process killed with SIGKILL leaves no agents behind. Spawn from a
/// thread that lives as long as the child (the test's own thread, not a [`Netns::run_in`] closure).
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    group: bool,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed, in its own process group, with a parent-death signal.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        cmd.stdin(Stdio::null()).process_group(0);
        // SAFETY: prctl, getppid and kill are async-signal-safe syscalls; nothing allocates.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
                Ok(())
            });
        }
        let line = command_line(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        Ok(ChildGuard { child, group: true })
    }

    /// Adopts a child spawned elsewhere; signals go to its pid only.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard {
            child,
            group: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn child(&self) -> &Child {
        &self.child
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        wait_until(&mut self.child, Instant::now() + timeout)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; returns how the child ended (immediately if it
    /// already has). Panics only if the child cannot be waited for (someone else reaped it).
    pub fn terminate(&mut self, grace: Duration) -> ExitStatus {
        let pid = self.pid();
        self.try_terminate(grace)
            .unwrap_or_else(|e| panic!("terminating child {pid}: {e}"))
    }

    fn try_terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        let status = match self.child.try_wait()? {
            Some(status) => status,
            None => {
                self.signal(libc::SIGTERM);
                match self.wait_timeout(grace)? {
                    Some(status) => status,
                    None => {
                        self.signal(libc::SIGKILL);
                        self.child.wait()?
                    }
                }
            }
        };
        if self.group {
            // Leftover members of the group (a wrapper's children) go too.
            self.signal(libc::SIGKILL);
        }
        Ok(status)
    }

    fn signal(&self, sig: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.pid()) else {
            return;
        };
        let target = if self.group { -pid } else { pid };
        // SAFETY: kill has no memory-safety preconditions; ESRCH (already gone) is fine.
        unsafe { libc::kill(target, sig) };
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.try_terminate(CHILD_GRACE) {
            eprintln!("xlb netns: terminating child {}: {e}", self.pid());
        }
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Runs `cmd` to completion within `timeout` and returns its stdout; any failure names the command
/// line, the exit status and stderr.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<String> {
    let line = command_line(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{line}`"))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status =
        wait_until(&mut child, deadline).with_context(|| format!("waiting for `{line}`"))?;
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        let err = collect(&stderr, Instant::now() + Duration::from_millis(200));
        bail!(
            "`{line}` timed out after {timeout:?} and was killed; stderr: {}",
            err.trim()
        );
    };
    // A descendant that inherited the pipes can hold them open after the child exits; never wait
    // for it beyond the deadline (plus a moment for the pipes' last bytes).
    let output_deadline = deadline.max(Instant::now()) + Duration::from_secs(1);
    let out = collect(&stdout, output_deadline);
    let err = collect(&stderr, output_deadline);
    if !status.success() {
        let mut msg = format!("`{line}` failed ({status})");
        if !err.trim().is_empty() {
            msg.push_str(&format!("; stderr: {}", err.trim()));
        }
        if !out.trim().is_empty() {
            msg.push_str(&format!("; stdout: {}", out.trim()));
        }
        bail!(msg);
    }
    Ok(out)
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

fn collect(rx: &mpsc::Receiver<Vec<u8>>, deadline: Instant) -> String {
    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(buf) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => "<not collected: the pipe is still held open>".to_owned(),
    }
}
