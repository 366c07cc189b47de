//! The load-balancing topology of [`crate::topology`] over IPv6, dual-stack: the same client, load
//! balancer and N backends on one bridge, every host with its IPv4 address and an IPv6 address
//! in `2001:db8::/64`, and both VIPs set up for direct server return.
//!
//! ```text
//!   client 10.0.0.1  2001:db8::1  ──┐
//!   lb     10.0.0.2  2001:db8::2  ──┤ br0     VIPs 10.0.0.100 and 2001:db8::100: on the LB's
//!   b1     10.0.0.11 2001:db8::11 ──┤         eth0 (/32, /128: it answers ARP and neighbour
//!   b2     10.0.0.12 2001:db8::12 ──┤         solicitations for them) and on every backend's lo
//!   ...                             ┘         (/32, /128 nodad)
//! ```
//!
//! IPv6 on the hosts: static addresses without duplicate address detection (usable at once), no
//! router advertisements (see [`crate::netns::Lan::add_host_dual`]). A backend does not answer
//! neighbour solicitations on `eth0` for an address it only has on `lo` (the kernel matches the
//! target against the receiving interface's addresses), so IPv6 needs no `arp_ignore`
//! counterpart; the IPv4 VIP gets `arp_ignore`/`arp_announce` as in [`crate::topology`].
//!
//! The agent runs as [`topology::Agent`]; this module reads its status and `which-backend` as
//! JSON through the CLI ([`status_json`], [`which_backend`]), so tests do not depend on the
//! agent's Rust types.
//!
//! The veth measures of [`crate::topology`] hold here too: `xdp_pass` on the LB's bridge-side
//! peer, TX checksum offload off on the client (for IPv6 TCP as for IPv4).

use std::{
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{
    netns::{Host, Lan},
    topology::{self, Agent, HostRole, LbParts, PassProgram, TempDir, backend_addr, xdplb_bin},
};

pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Backend `i` (0-based) has IPv6 address `2001:db8::1{i+1}` (hex) and name `b{i+1}`.
pub fn backend6(i: usize) -> Ipv6Addr {
    assert!(i < 15, "at most 15 backends");
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// The name (`b1`, `b2`, ...) of the backend with address `addr`, IPv4 or IPv6.
pub fn backend_name(addr: IpAddr) -> Option<String> {
    let i = match addr {
        IpAddr::V4(a) => (0..15).find(|&i| backend_addr(i) == a)?,
        IpAddr::V6(a) => (0..15).find(|&i| backend6(i) == a)?,
    };
    Some(format!("b{}", i + 1))
}

/// Client, load balancer and backends on one LAN, dual-stack, ready for `xdplb run`.
pub struct LbTopology6 {
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    pub dir: TempDir,
    _pass: PassProgram,
    // Last, so the hosts' namespaces go before the switch's.
    pub lan: Lan,
}

impl LbTopology6 {
    pub fn new(n_backends: usize) -> Result<LbTopology6> {
        ensure!(n_backends <= 15, "at most 15 backends");
        let LbParts {
            client,
            lb,
            backends,
            dir,
            pass,
            lan,
        } = LbParts::build(
            n_backends,
            "topo6",
            &[topology::VIP.into(), VIP6.into()],
            |role| {
                Some(match role {
                    HostRole::Client => CLIENT6,
                    HostRole::Lb => LB6,
                    HostRole::Backend(i) => backend6(i),
                })
            },
        )?;
        Ok(LbTopology6 {
            client,
            lb,
            backends,
            dir,
            _pass: pass,
            lan,
        })
    }

    /// A config for this topology: `[dataplane]` on the LB's eth0 in driver mode, the API socket
    /// in the scratch directory, then `services` (TOML tables) verbatim.
    pub fn config(&self, services: &str) -> String {
        topology::agent_config(&self.socket(), services)
    }

    /// The config file [`start_agent`](Self::start_agent) writes and `xdplb reload` reads.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("xdplb.toml")
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("xdplb.sock")
    }

    /// Writes `config` and starts `xdplb run` inside the LB namespace; waits until it forwards.
    pub fn start_agent(&self, config: &str, extra_args: &[&str]) -> Result<Agent> {
        let cfg = self.config_path();
        std::fs::write(&cfg, config).with_context(|| format!("writing {}", cfg.display()))?;
        Agent::spawn(
            &self.lb.ns,
            &xdplb_bin(),
            &cfg,
            &self.socket(),
            &self.dir.path().join("agent.log"),
            extra_args,
        )
    }
}

/// A `[[vip]]` table with its backends (`[[vip.backend]]`, weight given when not 1); `extra` goes
/// right after the VIP's own keys (e.g. `table_size = 1009`).
pub fn vip_toml(
    name: &str,
    address: IpAddr,
    port: u16,
    protocol: &str,
    extra: &str,
    backends: &[(IpAddr, u32)],
) -> String {
    let mut s = format!(
        "[[vip]]\nname = \"{name}\"\naddress = \"{address}\"\nport = {port}\n\
         protocol = \"{protocol}\"\n{extra}\n"
    );
    for (addr, weight) in backends {
        s.push_str(&format!("[[vip.backend]]\naddress = \"{addr}\"\n"));
        if *weight != 1 {
            s.push_str(&format!("weight = {weight}\n"));
        }
        s.push('\n');
    }
    s
}

/// Runs the CLI against `agent`; its stdout, or an error with the command, stderr and the
/// agent's log.
pub fn cli(agent: &Agent, args: &[&str]) -> Result<String> {
    let out = agent
        .cli(args)
        .with_context(|| format!("running xdplb {args:?}"))?;
    if !out.status.success() {
        bail!(
            "`xdplb {}` failed ({}): {}{}\nagent log:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            agent.log_text()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `xdplb status --json`.
pub fn status_json(agent: &Agent) -> Result<Value> {
    let text = cli(agent, &["status", "--json"])?;
    serde_json::from_str(&text).with_context(|| format!("parsing `xdplb status --json`: {text}"))
}

/// VIP `vip` (by name) in a status.
pub fn vip_json<'a>(status: &'a Value, vip: &str) -> Result<&'a Value> {
    status["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["name"] == vip))
        .ok_or_else(|| anyhow!("no vip {vip} in the status: {status}"))
}

/// Backend `addr` of VIP `vip` in a status, or `None` if the VIP does not list it. Addresses are
/// compared as addresses, not as text.
pub fn backend_json<'a>(status: &'a Value, vip: &str, addr: IpAddr) -> Result<Option<&'a Value>> {
    let v = vip_json(status, vip)?;
    let backends = v["backends"]
        .as_array()
        .ok_or_else(|| anyhow!("vip {vip} without backends: {v}"))?;
    Ok(backends
        .iter()
        .find(|b| b["address"].as_str().and_then(|a| a.parse::<IpAddr>().ok()) == Some(addr)))
}

/// Whether backend `addr` of `vip` is up, in the table and has slots.
pub fn serving(status: &Value, vip: &str, addr: IpAddr) -> bool {
    matches!(backend_json(status, vip, addr), Ok(Some(b))
        if b["state"] == "up" && b["in_table"] == true && b["slots"].as_u64() > Some(0))
}

/// Polls `xdplb status --json` until `pred` holds; how long it took. The error shows the last
/// status and the agent's log.
pub fn wait_status(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let s = status_json(agent)?;
        if pred(&s) {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!(
                "{what}: not within {timeout:?}; status:\n{:#}\nagent log:\n{}",
                s,
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every backend of every VIP is up, in its table and, where it is health checked,
/// has passed its first check (a backend counts as healthy before it: a test that ran before the
/// first checks would miss checks that fail).
pub fn wait_all_serving(agent: &Agent, timeout: Duration) -> Result<Duration> {
    let what = "every backend up, in its table and past its first health check";
    wait_status(agent, what, timeout, |s| {
        s["vips"].as_array().is_some_and(|vips| {
            vips.iter().all(|v| {
                v["backends"].as_array().is_some_and(|bs| {
                    bs.iter().all(|b| {
                        let checked =
                            b["health"]["state"] == "none" || b["health"]["last_ok"] == true;
                        b["state"] == "up"
                            && b["in_table"] == true
                            && b["slots"].as_u64() > Some(0)
                            && checked
                    })
                })
            })
        })
    })
}

/// `xdplb which-backend SERVICE SOURCE --json`: the backend address the live table gives the
/// flow from `source` to `service` (`ADDR:PORT/PROTO`, IPv6 in brackets, or a VIP name), `None`
/// when the VIP has no usable backend.
pub fn which_backend(agent: &Agent, service: &str, source: &str) -> Result<Option<IpAddr>> {
    let text = cli(agent, &["which-backend", service, source, "--json"])?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing `xdplb which-backend --json`: {text}"))?;
    match &v["backend"] {
        Value::Null => Ok(None),
        Value::String(a) => Ok(Some(
            a.parse()
                .with_context(|| format!("backend address in {text}"))?,
        )),
        other => bail!("backend {other} in {text}"),
    }
}

/// Prints the agent's log when dropped before [`LogOnFailure::passed`], so a failing test (an
/// error returned or a panic) shows what the agent did. Declare it after the topology, so it
/// drops first, while the log still exists.
pub struct LogOnFailure {
    log: PathBuf,
    passed: bool,
}

impl LogOnFailure {
    pub fn new(agent: &Agent) -> LogOnFailure {
        LogOnFailure {
            log: agent.log.clone(),
            passed: false,
        }
    }

    pub fn passed(mut self) {
        self.passed = true;
    }
}

impl Drop for LogOnFailure {
    fn drop(&mut self) {
        if !self.passed {
            eprintln!(
                "---- agent log ({}) ----\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("unreadable: {e}"))
            );
        }
    }
}
