//! Failover: the client-visible outage when the VRRP master dies, for xdplb's own VRRPv3 (`[ha]`)
//! and for keepalived driving the same VIP, at the default advert interval (1 s) and at 100 ms,
//! side by side in one run.
//!
//! Every repetition builds a fresh [`HaTopology`] (client, lb1, lb2, 3 backends on one bridge;
//! servers on every backend's 0.0.0.0:80 answering their name) and starts two nodes, lb1 at
//! priority 200 and lb2 at 100, VRID 51, VIP 10.0.0.100:
//! - xdplb: `xdplb run` with `[ha]` on both nodes (VRRP and the data path in one process);
//! - keepalived: `xdplb run` without `[ha]` on both nodes for the data path (it then leaves the
//!   VIP address alone) and keepalived (VRRPv3, multicast, `advert_int` as the setup says) on
//!   both nodes moving the address.
//!
//! Then: wait until lb1 is master, lb2 backup, lb1 alone holds the VIP and the client gets
//! answers through it; start the probe (below); wait for an advert of lb1 at the client and,
//! right after it, SIGKILL the master's VRRP process (the xdplb agent, or keepalived with its
//! VRRP child) and take lb1's eth0 down; wait until lb2 holds the VIP and the probe has an
//! answer again; then stop the probe and tear everything down.
//!
//! Killing right after an advert is the worst phase and the same for every setup: the backup
//! last heard the master then, so it waits its whole Master_Down_Interval (3 x interval + skew,
//! RFC 5798 6.1) before it takes over. Without the synchronisation each outage would also carry
//! a uniformly random 0..1 interval of phase, as much as the differences looked for.
//!
//! The probe is the method of the HA test's `ha::Probe`: new TCP connections from the client to
//! VIP:80 one after another, each with a 50 ms connect timeout and a 200 ms read timeout (a lost
//! SYN would otherwise wait for the kernel's 1 s retransmission), a 5 ms pause after each
//! attempt (so it does not take a CPU from the VRRP daemons it measures); an attempt succeeds
//! when a backend's answer arrives. The outage is the longest time from a success to the next
//! success (the "time from last success to first success"), resolved to about 55 ms.
//!
//! The bridge does not flood unknown unicast to the LBs' ports (`bridge link set flood off`), as
//! a physical NIC's unicast filter would not pass another host's frames. Taking lb1's link down
//! flushes its MAC from the bridge, which then floods the client's frames for the VIP (still
//! addressed to lb1's MAC until a gratuitous ARP moves it) to every port, and a veth has no
//! unicast filter. Before the data path checked destination MACs, lb2's program forwarded those
//! frames and carried the client within ~20 ms of the kill in every setup (measured); it now
//! passes them to the kernel (`pass_other_host`), which drops them, so flooding no longer changes
//! the outcome, and it stays off to keep the setup the same as a NIC's.
//!
//! The setups run round-robin (the order rotating from round to round), so noise hits all of
//! them alike. Every wait is bounded; every process, namespace and thread goes with its guard,
//! also on failure.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use super::{Check, Stats};
use crate::{
    ha::{
        HaAgent, HaTopology, Keepalived, KeepalivedConfig, NODES, Probe, VrrpSniffer, ask,
        keepalived_bin, lb_addr, outage,
    },
    topology::{CLIENT_ADDR, VIP, backend_addr},
};

#[derive(Clone, Debug)]
pub struct FailoverOptions {
    /// Repetitions of every setup.
    pub rounds: usize,
    /// The `xdplb` binary.
    pub xdplb: PathBuf,
}

/// One setup's failovers.
#[derive(Clone, Debug, Serialize)]
pub struct SetupResult {
    /// "xdplb [ha]" or "keepalived + xdplb".
    pub setup: String,
    /// Who runs VRRP: "xdplb" or "keepalived".
    pub vrrp: String,
    pub advert_interval_ms: u64,
    /// RFC 5798's Master_Down_Interval of the backup (priority 100): 3 x interval + skew, ms.
    pub rfc_ms: f64,
    /// Client-visible outage per repetition, ms.
    pub outage_ms: Stats,
    /// From the SIGKILL to lb2 holding the VIP (polled every ~10 ms), ms.
    pub takeover_ms: Stats,
    /// Failed probe attempts, over all repetitions.
    pub failed_probes: u64,
    /// Repetitions in which the client got no answer again within the bound; their outage
    /// sample is the time until the bench gave up (a lower bound).
    pub unrecovered: usize,
}

/// xdplb's outage over keepalived's at one advert interval.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverRatio {
    pub advert_interval_ms: u64,
    /// xdplb median / keepalived median.
    pub of_medians: f64,
    /// Per round: xdplb's outage / keepalived's outage in the same round.
    pub per_round: Stats,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct FailoverReport {
    pub rounds: usize,
    /// What every setup shares.
    pub setup: String,
    /// `keepalived --version`, first line.
    pub keepalived_version: String,
    pub results: Vec<SetupResult>,
    pub ratios: Vec<FailoverRatio>,
}

/// Margin of the test bound over 3 x interval + skew.
pub const BOUND_MARGIN: Duration = Duration::from_millis(200);
/// xdplb's median outage may be at most this times keepalived's at equal interval.
pub const VS_KEEPALIVED_TARGET: f64 = 1.1;

impl FailoverReport {
    fn result(&self, vrrp: Vrrp, interval_ms: u64) -> Option<&SetupResult> {
        self.results
            .iter()
            .find(|r| r.vrrp == vrrp.name() && r.advert_interval_ms == interval_ms)
    }

    /// The failover targets, checked against this run.
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for interval in INTERVALS {
            let ms = interval.as_millis() as u64;
            let rfc = master_down_interval(interval, BACKUP_PRIORITY);
            let bound = rfc + BOUND_MARGIN;
            let x = self.result(Vrrp::Xdplb, ms);
            checks.push(Check {
                name: format!(
                    "failover: client-visible outage, xdplb, advert {}",
                    show_interval(interval)
                ),
                target: format!(
                    "< {} ms (3 x {} + skew {} ms + {} ms), every repetition",
                    bound.as_millis(),
                    show_interval(interval),
                    (rfc - 3 * interval).as_millis(),
                    BOUND_MARGIN.as_millis()
                ),
                measured: match x {
                    Some(r) if !r.outage_ms.samples.is_empty() => format!(
                        "max {:.0} ms, median {:.0} ms of {} repetitions{}",
                        r.outage_ms.max,
                        r.outage_ms.median,
                        r.outage_ms.samples.len(),
                        unrecovered_note(r)
                    ),
                    _ => "not measured".into(),
                },
                holds: x.is_some_and(|r| {
                    !r.outage_ms.samples.is_empty()
                        && r.unrecovered == 0
                        && r.outage_ms.max < bound.as_secs_f64() * 1000.0
                }),
            });
        }
        for interval in INTERVALS {
            let ms = interval.as_millis() as u64;
            let x = self.result(Vrrp::Xdplb, ms);
            let k = self.result(Vrrp::Keepalived, ms);
            fn measured(r: Option<&SetupResult>) -> Option<&SetupResult> {
                r.filter(|r| !r.outage_ms.samples.is_empty())
            }
            checks.push(Check {
                name: format!(
                    "failover: outage, xdplb vs keepalived, advert {}",
                    show_interval(interval)
                ),
                target: format!("<= {VS_KEEPALIVED_TARGET}x keepalived's, medians, same run"),
                measured: match (measured(x), measured(k)) {
                    (Some(x), Some(k)) if k.outage_ms.median > 0.0 => format!(
                        "{:.2}x ({:.0} ms vs {:.0} ms, medians of {} repetitions){}{}",
                        x.outage_ms.median / k.outage_ms.median,
                        x.outage_ms.median,
                        k.outage_ms.median,
                        x.outage_ms.samples.len(),
                        unrecovered_note(x),
                        unrecovered_note(k)
                    ),
                    _ => "not measured".into(),
                },
                holds: match (measured(x), measured(k)) {
                    (Some(x), Some(k)) => {
                        x.unrecovered == 0
                            && x.outage_ms.median <= k.outage_ms.median * VS_KEEPALIVED_TARGET
                    }
                    _ => false,
                },
            });
        }
        checks
    }
}

fn unrecovered_note(r: &SetupResult) -> String {
    if r.unrecovered == 0 {
        String::new()
    } else {
        format!(
            "; {} of {} {} did not recover",
            r.unrecovered,
            r.outage_ms.samples.len(),
            r.setup
        )
    }
}

/// The section as text, in the style of the other sections of the report.
pub fn render_text(f: &FailoverReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nFAILOVER  master's VRRP process SIGKILLed right after an advert, its link taken down; \
         {} repetitions per setup, setups interleaved",
        f.rounds
    );
    if !f.setup.is_empty() {
        let _ = writeln!(out, "  setup: {}", f.setup);
    }
    if !f.keepalived_version.is_empty() {
        let _ = writeln!(out, "  keepalived: {}", f.keepalived_version);
    }
    let header = [
        "VRRP by",
        "advert",
        "3 x I + skew",
        "outage ms min / median / max",
        "takeover ms median",
        "failed probes",
        "unrecovered",
    ];
    let rows: Vec<[String; 7]> = f
        .results
        .iter()
        .map(|r| {
            [
                r.setup.clone(),
                show_interval(Duration::from_millis(r.advert_interval_ms)),
                format!("{:.0} ms", r.rfc_ms),
                r.outage_ms.show(0),
                format!("{:.0}", r.takeover_ms.median),
                r.failed_probes.to_string(),
                r.unrecovered.to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::from(" ");
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, " {c:<w$} ");
            } else {
                let _ = write!(s, " {c:>w$} ");
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    out.push_str(&line(&header.map(String::from)));
    out.push_str(&line(
        &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>(),
    ));
    for row in &rows {
        out.push_str(&line(row));
    }
    if !f.ratios.is_empty() {
        let _ = writeln!(out, "\n  xdplb outage / keepalived outage, same interval");
        for r in &f.ratios {
            let _ = writeln!(
                out,
                "  advert {:<6} {:.2}x of the medians; per round {}",
                show_interval(Duration::from_millis(r.advert_interval_ms)),
                r.of_medians,
                r.per_round.show(2)
            );
        }
    }
    out
}

/// VRID of both nodes in every setup.
const VRID: u8 = 51;
const MASTER_PRIORITY: u8 = 200;
const BACKUP_PRIORITY: u8 = 100;
const PORT: u16 = 80;
const BACKENDS: usize = 3;
const INTERVALS: [Duration; 2] = [Duration::from_secs(1), Duration::from_millis(100)];

/// Probing before the kill, so the last success before it is recent.
const PROBE_WARMUP: Duration = Duration::from_millis(300);
/// Probing after the first success after the kill.
const PROBE_TAIL: Duration = Duration::from_millis(200);
/// Beyond the setup's own Master_Down_Interval: how long to wait for an election at start, and
/// for recovery after the kill, before giving up.
const WAIT_SLACK: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vrrp {
    Xdplb,
    Keepalived,
}

impl Vrrp {
    fn name(self) -> &'static str {
        match self {
            Vrrp::Xdplb => "xdplb",
            Vrrp::Keepalived => "keepalived",
        }
    }

    fn setup_name(self) -> &'static str {
        match self {
            Vrrp::Xdplb => "xdplb [ha]",
            Vrrp::Keepalived => "keepalived + xdplb",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setup {
    vrrp: Vrrp,
    interval: Duration,
}

const SETUPS: [Setup; 4] = [
    Setup {
        vrrp: Vrrp::Xdplb,
        interval: INTERVALS[0],
    },
    Setup {
        vrrp: Vrrp::Keepalived,
        interval: INTERVALS[0],
    },
    Setup {
        vrrp: Vrrp::Xdplb,
        interval: INTERVALS[1],
    },
    Setup {
        vrrp: Vrrp::Keepalived,
        interval: INTERVALS[1],
    },
];

impl Setup {
    fn name(self) -> String {
        format!(
            "{}, advert {}",
            self.vrrp.setup_name(),
            show_interval(self.interval)
        )
    }
}

/// The setups of round `round` (0-based), rotated so each takes every position in turn.
fn round_order(round: usize) -> Vec<Setup> {
    let mut order = SETUPS.to_vec();
    order.rotate_left(round % SETUPS.len());
    order
}

/// "1 s", "100 ms".
fn show_interval(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// RFC 5798 6.1 for a backup of `priority` whose master advertises every `interval`:
/// Master_Down_Interval = 3 x Master_Adver_Interval + Skew_Time, Skew_Time = ((256 - Priority)
/// x Master_Adver_Interval) / 256, in whole centiseconds as the protocol counts them.
pub fn master_down_interval(interval: Duration, priority: u8) -> Duration {
    let cs = interval.as_millis() as u64 / 10;
    let skew_cs = (256 - u64::from(priority)) * cs / 256;
    Duration::from_millis((3 * cs + skew_cs) * 10)
}

/// One failover.
#[derive(Clone, Debug)]
struct Rep {
    outage: Duration,
    takeover: Option<Duration>,
    failed: usize,
    recovered: bool,
}

pub fn run(opts: &FailoverOptions) -> Result<FailoverReport> {
    ensure!(opts.rounds > 0, "rounds must be at least 1");
    let xdplb = std::fs::canonicalize(&opts.xdplb).with_context(|| {
        format!(
            "the xdplb binary {} (build it: cargo build --release --bins)",
            opts.xdplb.display()
        )
    })?;
    let keepalived_version = keepalived_version()?;

    let mut reps: Vec<Vec<Rep>> = vec![Vec::new(); SETUPS.len()];
    for round in 0..opts.rounds {
        for setup in round_order(round) {
            let rep = run_rep(setup, &xdplb).with_context(|| {
                format!("round {}/{}, {}", round + 1, opts.rounds, setup.name())
            })?;
            eprintln!(
                "failover: round {}/{}, {:<32} outage {:>5.0} ms, takeover {}, {} failed probes{}",
                round + 1,
                opts.rounds,
                setup.name(),
                ms(rep.outage),
                rep.takeover
                    .map_or("-".into(), |t| format!("{:.0} ms", ms(t))),
                rep.failed,
                if rep.recovered { "" } else { ", NOT RECOVERED" }
            );
            let i = SETUPS.iter().position(|s| *s == setup).expect("a setup");
            reps[i].push(rep);
        }
    }

    let results: Vec<SetupResult> = SETUPS
        .iter()
        .zip(&reps)
        .map(|(setup, reps)| SetupResult {
            setup: setup.vrrp.setup_name().to_string(),
            vrrp: setup.vrrp.name().to_string(),
            advert_interval_ms: setup.interval.as_millis() as u64,
            rfc_ms: ms(master_down_interval(setup.interval, BACKUP_PRIORITY)),
            outage_ms: Stats::of(reps.iter().map(|r| ms(r.outage)).collect()),
            takeover_ms: Stats::of(reps.iter().filter_map(|r| r.takeover.map(ms)).collect()),
            failed_probes: reps.iter().map(|r| r.failed as u64).sum(),
            unrecovered: reps.iter().filter(|r| !r.recovered).count(),
        })
        .collect();
    let ratios = INTERVALS
        .iter()
        .map(|&interval| {
            let outages = |vrrp: Vrrp| -> &SetupResult {
                results
                    .iter()
                    .find(|r| {
                        r.vrrp == vrrp.name() && r.advert_interval_ms == interval.as_millis() as u64
                    })
                    .expect("every setup has a result")
            };
            let (x, k) = (outages(Vrrp::Xdplb), outages(Vrrp::Keepalived));
            FailoverRatio {
                advert_interval_ms: interval.as_millis() as u64,
                of_medians: if k.outage_ms.median > 0.0 {
                    x.outage_ms.median / k.outage_ms.median
                } else {
                    0.0
                },
                per_round: Stats::of(
                    x.outage_ms
                        .samples
                        .iter()
                        .zip(&k.outage_ms.samples)
                        .filter(|(_, k)| **k > 0.0)
                        .map(|(x, k)| x / k)
                        .collect(),
                ),
            }
        })
        .collect();
    Ok(FailoverReport {
        rounds: opts.rounds,
        setup: format!(
            "a fresh topology per repetition: client {CLIENT_ADDR}, lb1 {} (priority \
             {MASTER_PRIORITY}), lb2 {} (priority {BACKUP_PRIORITY}), backends {}..{} on one \
             bridge (no unknown-unicast flooding to the LB ports, as a NIC's MAC filter), VRID \
             {VRID}, VIP {VIP} multicast VRRPv3, preempting; xdplb runs on both nodes in every setup (with [ha] in the xdplb setups, without it next to keepalived); \
             probe: a new TCP connection to VIP:{PORT} every ~5 ms (50 ms connect timeout), outage \
             = longest time between two successes",
            lb_addr(0),
            lb_addr(1),
            backend_addr(0),
            backend_addr(BACKENDS - 1),
        ),
        keepalived_version,
        results,
        ratios,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn keepalived_version() -> Result<String> {
    let bin = keepalived_bin();
    let out = Command::new(&bin)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "running {} --version (keepalived is the peer of the failover bench; cargo xtask \
             setup installs it)",
                bin.display()
            )
        })?;
    // keepalived prints its version on stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .to_string())
}

fn services() -> String {
    let mut s = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [vip.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\n\
         fall = 2\n"
    );
    for i in 0..BACKENDS {
        let _ = write!(s, "[[vip.backend]]\naddress = \"{}\"\n", backend_addr(i));
    }
    s
}

fn priority(node: usize) -> u8 {
    if node == 0 {
        MASTER_PRIORITY
    } else {
        BACKUP_PRIORITY
    }
}

/// The VRRP side of one node: xdplb's agent with `[ha]`, or keepalived next to an agent without.
/// The agents are `Option`s so the master's can be taken out and killed.
struct Nodes {
    agents: Vec<Option<HaAgent>>,
    keepalived: Vec<Keepalived>,
}

impl Nodes {
    fn logs(&self) -> String {
        let mut s = String::new();
        for a in self.agents.iter().flatten() {
            let _ = write!(
                s,
                "\n--- lb{} xdplb ---\n{}",
                a.node + 1,
                tail(&a.log_text(), 40)
            );
        }
        for (node, k) in self.keepalived.iter().enumerate() {
            let _ = write!(
                s,
                "\n--- lb{} keepalived ---\n{}",
                node + 1,
                tail(&k.log_text(), 40)
            );
        }
        s
    }

    /// Node `node`'s VRRP state in upper case (MASTER, BACKUP, ...), or why it is unknown.
    fn state(&self, vrrp: Vrrp, node: usize) -> String {
        match vrrp {
            Vrrp::Xdplb => match self.agents[node].as_ref().map(|a| a.status()) {
                Some(Ok(s)) => {
                    s.ha.map_or("(no ha section)".into(), |h| h.state.to_uppercase())
                }
                Some(Err(e)) => format!("(status: {e:#})"),
                None => "(not running)".into(),
            },
            Vrrp::Keepalived => self.keepalived[node]
                .state()
                .unwrap_or_else(|| "(none yet)".into()),
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_rep(setup: Setup, xdplb: &Path) -> Result<Rep> {
    let topo = HaTopology::new(BACKENDS).context("building the HA topology")?;
    // No unknown-unicast flooding towards the LBs, as a physical NIC's unicast filter would
    // have it (module docs).
    for lb in &topo.lbs {
        topo.lan
            .switch()
            .exec("bridge", &["link", "set", "dev", &lb.peer, "flood", "off"])
            .with_context(|| format!("turning unknown-unicast flooding off on {}", lb.peer))?;
    }
    // Everything below is declared after the topology, so it goes before the namespaces do.
    let servers = topo.identity_servers(PORT)?;
    let mut nodes = Nodes {
        agents: Vec::new(),
        keepalived: Vec::new(),
    };
    let interval_text = format!("{}ms", setup.interval.as_millis());
    for node in 0..NODES {
        let ha = match setup.vrrp {
            Vrrp::Xdplb => format!(
                "vrid = {VRID}\npriority = {}\nadvert_interval = \"{interval_text}\"\n",
                priority(node)
            ),
            Vrrp::Keepalived => String::new(),
        };
        let cfg = topo.dir.path().join(format!("lb{}.toml", node + 1));
        std::fs::write(&cfg, topo.config(node, &services(), &ha))
            .with_context(|| format!("writing {}", cfg.display()))?;
        let log = topo.dir.path().join(format!("lb{}.log", node + 1));
        nodes.agents.push(Some(
            HaAgent::start(
                &topo.lb(node).ns,
                node,
                xdplb,
                &cfg,
                &topo.socket(node),
                &log,
                &[],
            )
            .with_context(|| format!("starting xdplb on lb{}", node + 1))?,
        ));
    }
    if setup.vrrp == Vrrp::Keepalived {
        for node in 0..NODES {
            let mut cfg = KeepalivedConfig::new(VRID, priority(node), &[VIP]);
            cfg.advert_interval = setup.interval;
            nodes.keepalived.push(
                Keepalived::start(&topo.lb(node).ns, topo.dir.path(), &cfg)
                    .with_context(|| format!("starting keepalived on lb{}", node + 1))?,
            );
        }
    }

    // Election: lb1 master, lb2 backup, lb1 alone holds the VIP.
    let down = master_down_interval(setup.interval, BACKUP_PRIORITY);
    let deadline = Instant::now() + down + WAIT_SLACK;
    loop {
        let states = [nodes.state(setup.vrrp, 0), nodes.state(setup.vrrp, 1)];
        if states[0] == "MASTER" && states[1] == "BACKUP" && topo.vip_holder() == [0] {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "lb1 not master with lb2 backup and lb1 alone holding the VIP within {:?} \
                 (states {states:?}, holders {:?}){}",
                down + WAIT_SLACK,
                topo.vip_holder(),
                nodes.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // The data path: the client gets answers through lb1 (health checks must have passed).
    let dst = SocketAddrV4::new(VIP, PORT);
    let deadline = Instant::now() + WAIT_SLACK;
    loop {
        let r = topo.client.ns.run_in(move || ask(dst));
        if r.is_ok() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the client gets no answer from {dst} through lb1 within {WAIT_SLACK:?}: {:#}{}",
                r.unwrap_err(),
                nodes.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut sniffer = VrrpSniffer::open(&topo.client.ns, CLIENT_ADDR)?;
    let probe = Probe::start(&topo.client.ns, dst)?;
    std::thread::sleep(PROBE_WARMUP);
    ensure!(
        probe.successes() > 0,
        "no probe got an answer in {PROBE_WARMUP:?} before the kill{}",
        nodes.logs()
    );

    // Right after an advert of lb1: adverts queued since the sniffer opened are stale, so drain
    // them first; a read that had to wait returns a fresh one.
    while sniffer.next_from(None, Duration::from_millis(1))?.is_some() {}
    let advert_wait = 3 * setup.interval + Duration::from_secs(1);
    if sniffer.next_from(Some(lb_addr(0)), advert_wait)?.is_none() {
        bail!(
            "no advert from lb1 at the client within {advert_wait:?}{}",
            nodes.logs()
        );
    }
    let killed_at = Instant::now();
    match setup.vrrp {
        Vrrp::Xdplb => {
            let agent = nodes.agents[0].take().expect("lb1's agent");
            agent.kill9().context("SIGKILL to lb1's xdplb")?;
        }
        Vrrp::Keepalived => {
            nodes.keepalived[0]
                .kill9()
                .context("SIGKILL to lb1's keepalived")?;
        }
    }
    topo.set_link(0, false)?;

    // Until lb2 holds the VIP and the probe has an answer again.
    let give_up = killed_at + down + WAIT_SLACK;
    let mut takeover = None;
    let recovered = loop {
        if takeover.is_none() && topo.vip_holder().contains(&1) {
            takeover = Some(killed_at.elapsed());
        }
        if takeover.is_some() && probe.last_success().is_some_and(|t| t > killed_at) {
            break true;
        }
        if Instant::now() >= give_up {
            break false;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if recovered {
        std::thread::sleep(PROBE_TAIL);
    }
    let log = probe.finish();
    let (mut outage, failed) = outage(&log);
    if !recovered {
        // Censored: from the last success to now.
        let last = log
            .iter()
            .rev()
            .find(|(_, ok)| *ok)
            .map_or(killed_at, |(t, _)| *t);
        outage = outage.max(last.elapsed());
        eprintln!(
            "failover: {}: no recovery within {:?} of the kill (lb2 holds the VIP: {}){}",
            setup.name(),
            down + WAIT_SLACK,
            takeover.is_some(),
            nodes.logs()
        );
    }
    drop(servers);
    drop(nodes);
    Ok(Rep {
        outage,
        takeover,
        failed,
        recovered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_down_interval_follows_rfc_5798() {
        // Skew of priority 100: 156/256 of the interval, in whole centiseconds.
        assert_eq!(
            master_down_interval(Duration::from_secs(1), 100),
            Duration::from_millis(3600)
        );
        assert_eq!(
            master_down_interval(Duration::from_millis(100), 100),
            Duration::from_millis(360)
        );
        assert_eq!(
            master_down_interval(Duration::from_secs(1), 200),
            Duration::from_millis(3210)
        );
    }

    #[test]
    fn outage_is_the_longest_gap_between_successes() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let log = [
            (at(10), false),
            (at(20), true),
            (at(30), true),
            (at(80), false),
            (at(400), false),
            (at(450), true),
            (at(460), true),
        ];
        assert_eq!(outage(&log), (Duration::from_millis(420), 3));
        assert_eq!(outage(&[]), (Duration::ZERO, 0));
    }

    #[test]
    fn rounds_rotate_the_setups() {
        assert_eq!(round_order(0), SETUPS);
        assert_eq!(round_order(1)[0], SETUPS[1]);
        assert_eq!(round_order(SETUPS.len()), SETUPS);
    }

    fn result(vrrp: Vrrp, interval_ms: u64, outages: &[f64]) -> SetupResult {
        SetupResult {
            setup: vrrp.setup_name().into(),
            vrrp: vrrp.name().into(),
            advert_interval_ms: interval_ms,
            rfc_ms: ms(master_down_interval(
                Duration::from_millis(interval_ms),
                BACKUP_PRIORITY,
            )),
            outage_ms: Stats::of(outages.to_vec()),
            takeover_ms: Stats::of(outages.iter().map(|o| o - 50.0).collect()),
            failed_probes: 10,
            unrecovered: 0,
        }
    }

    #[test]
    fn checks_follow_the_targets() {
        let mut r = FailoverReport {
            rounds: 3,
            results: vec![
                result(Vrrp::Xdplb, 1000, &[3650.0, 3700.0, 3790.0]),
                result(Vrrp::Keepalived, 1000, &[3600.0, 3700.0, 3800.0]),
                result(Vrrp::Xdplb, 100, &[400.0, 420.0, 600.0]),
                result(Vrrp::Keepalived, 100, &[300.0, 380.0, 400.0]),
            ],
            ..Default::default()
        };
        let holds: Vec<bool> = r.checks().iter().map(|c| c.holds).collect();
        // 1 s within 3800 ms; 100 ms: 600 >= 560; ratios 1.0 and 420/380 = 1.105 > 1.1.
        assert_eq!(holds, [true, false, true, false]);
        assert!(r.checks()[1].target.starts_with("< 560 ms"));
        r.results[0].unrecovered = 1;
        assert!(!r.checks()[0].holds);
        assert!(r.checks()[0].measured.contains("did not recover"));
        assert!(
            FailoverReport::default()
                .checks()
                .iter()
                .all(|c| !c.holds && c.measured == "not measured")
        );
        let text = render_text(&r);
        assert!(text.contains("FAILOVER"));
        assert!(text.contains("keepalived + xdplb"));
        assert!(text.contains("3600 ms"));
    }
}
