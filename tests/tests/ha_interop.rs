//! xdplb's VRRPv3 against the world: keepalived (the reference implementation) as its peer in
//! both roles, and a client forging adverts.
//!
//! Topology: tests/src/ha.rs (lb1 10.0.0.2 and lb2 10.0.0.3 share VIP 10.0.0.100, three
//! backends b1..b3 run identity servers on port 80). A node whose VRRP speaker is keepalived
//! also runs `xdplb` without `[ha]`: keepalived moves the address, xdplb's data path forwards
//! whatever reaches the node for the VIP, so the client's connections reach the backends through
//! either node.
//!
//! Each phase prints what it measured (run with `--nocapture`). Privileged: skipped outside CI
//! without root, failing under `CI=true`.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use lb_tests::{
    ha::{HaAgent, HaTopology, Keepalived, KeepalivedConfig, Probe, VRRP_GROUP, lb_addr, outage},
    netns::require_privileges,
    topology::{CLIENT_ADDR, VIP, backend_addr},
};
use lb_userspace::ha::{
    HaStatus, MasterStatus,
    proto::{Advert, ipv4_packet},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const VRID: u8 = 51;
const PORT: u16 = 80;
const INTERVAL_MS: u64 = 100;
const HIGH: u8 = 200;
const LOW: u8 = 100;
const BACKENDS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Configuration and bounds

fn services() -> String {
    let mut s = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [vip.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n"
    );
    for i in 0..BACKENDS {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            backend_addr(i)
        ));
    }
    s
}

fn ha_keys(priority: u8) -> String {
    format!("vrid = {VRID}\npriority = {priority}\nadvert_interval = \"{INTERVAL_MS}ms\"\n")
}

fn keepalived_config(priority: u8) -> KeepalivedConfig {
    let mut cfg = KeepalivedConfig::new(VRID, priority, &[VIP]);
    cfg.advert_interval = Duration::from_millis(INTERVAL_MS);
    cfg
}

/// RFC 5798 Skew_Time for `priority` at our advert interval (keepalived computes it in
/// microseconds, xdplb in centiseconds; this is the larger).
fn skew(priority: u8) -> Duration {
    Duration::from_micros((256 - u64::from(priority)) * INTERVAL_MS * 1000 / 256)
}

/// RFC 5798 Master_Down_Interval of a backup with `priority`.
fn master_down(priority: u8) -> Duration {
    3 * Duration::from_millis(INTERVAL_MS) + skew(priority)
}

/// The bound on a crash failover: master down interval + 200 ms.
fn crash_bound(backup_priority: u8) -> Duration {
    master_down(backup_priority) + Duration::from_millis(200)
}

/// A graceful stop sends priority 0: the backup takes over after its skew time; 100 ms margin.
fn graceful_bound(backup_priority: u8) -> Duration {
    skew(backup_priority) + Duration::from_millis(100)
}

/// How finely [`Probe`] measures an outage: a lost SYN costs its 50 ms connect timeout plus a
/// 5 ms pause. The graceful bound is asserted on the takeover itself (the VIP's move), and on
/// the client's outage with this much slack, as one probe lost more or less is not a finding.
const PROBE_RESOLUTION: Duration = Duration::from_millis(60);

// ---------------------------------------------------------------------------------------------
// Helpers

/// Polls `agent`'s HA status until `pred` holds; how long that took and the status then.
fn wait_ha(
    agent: &HaAgent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&HaStatus) -> bool,
) -> Result<(Duration, HaStatus)> {
    let t0 = Instant::now();
    loop {
        let h = agent.ha()?;
        if pred(&h) {
            return Ok((t0.elapsed(), h));
        }
        if t0.elapsed() > timeout {
            bail!(
                "lb{}: not {what} within {timeout:?} (state {}, master {:?}, last transition \
                 {:?}); log:\n{}",
                agent.node + 1,
                h.state,
                h.master,
                h.last_transition,
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_state(agent: &HaAgent, state: &str, timeout: Duration) -> Result<(Duration, HaStatus)> {
    wait_ha(agent, state, timeout, |h| h.state == state)
}

fn reason(h: &HaStatus) -> String {
    h.last_transition
        .as_ref()
        .map(|t| format!("{} -> {}: {}", t.from, t.to, t.reason))
        .unwrap_or_default()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Milliseconds since midnight UTC of a tracing log line (`2026-11-25T02:26:37.196822Z ...`).
fn log_ms_of_day(line: &str) -> Option<u64> {
    let t = line.get(11..23)?;
    let (h, m, sec, ms) = (
        t.get(0..2)?.parse::<u64>().ok()?,
        t.get(3..5)?.parse::<u64>().ok()?,
        t.get(6..8)?.parse::<u64>().ok()?,
        t.get(9..12)?.parse::<u64>().ok()?,
    );
    Some(((h * 60 + m) * 60 + sec) * 1000 + ms)
}

/// How long after `unix_ms` the first log line containing `needle` was written.
fn logged_after(log: &str, needle: &str, unix_ms: u64) -> Option<i64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let day = 86_400_000;
    let d = log_ms_of_day(line)? as i64 - (unix_ms % day) as i64;
    // Midnight between the two.
    Some(if d < -(day as i64) / 2 {
        d + day as i64
    } else {
        d
    })
}

fn sigterm(pid: u32) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: kill has no memory-safety preconditions; the pid is a child we have not reaped.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGTERM) } == 0,
        "kill({pid}, SIGTERM): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

fn wait_vip_holder(topo: &HaTopology, expected: &[usize], timeout: Duration) -> Result<Duration> {
    topo.wait_vip_holder(expected, timeout).ok_or_else(|| {
        anyhow!(
            "VIP holders are {:?}, not {expected:?} within {timeout:?}",
            topo.vip_holder()
        )
    })
}

fn wait_keepalived(k: &Keepalived, state: &str, timeout: Duration) -> Result<()> {
    ensure!(
        k.wait_state(state, timeout),
        "keepalived is {:?}, not {state} within {timeout:?}; log:\n{}",
        k.state(),
        k.log_text()
    );
    Ok(())
}

/// keepalived rejected none of xdplb's adverts (its reasons for dropping a VRRP packet).
fn keepalived_accepted_all(k: &Keepalived) -> Result<()> {
    const REJECTS: [&str; 7] = [
        "invalid TTL",
        "wrong version",
        "advertisement interval mismatch",
        "Invalid packet type",
        "unexpected ip number count",
        "ip_tot_len mismatch",
        "Invalid VRRPv3 checksum",
    ];
    let log = k.log_text();
    let bad: Vec<&str> = log
        .lines()
        .filter(|l| REJECTS.iter().any(|r| l.contains(r)))
        .collect();
    ensure!(
        bad.is_empty(),
        "keepalived rejected adverts:\n{}",
        bad.join("\n")
    );
    Ok(())
}

/// `count` connections from the client to VIP:80 (each from a new port): which backend answered
/// each. The first may take a few tries while health checks rise.
fn backends_reached(topo: &HaTopology, count: usize) -> Result<BTreeMap<String, usize>> {
    let dst = SocketAddr::V4(SocketAddrV4::new(VIP, PORT));
    topo.client
        .ns
        .run_in(move || -> Result<BTreeMap<String, usize>> {
            let once = || -> Result<String> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(1))?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut name = String::new();
                s.read_to_string(&mut name)?;
                Ok(name.trim().to_owned())
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match once() {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        return Err(e).context(format!("no answer from {dst} within 10 s"));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
            let mut seen = BTreeMap::new();
            for i in 0..count {
                let name = once().with_context(|| format!("connection {i} to {dst}"))?;
                *seen.entry(name).or_default() += 1;
            }
            Ok(seen)
        })
}

/// Real connections through the VIP reach every backend (and nothing else answers).
fn assert_backends_serve(topo: &HaTopology, when: &str) -> Result<()> {
    let seen = backends_reached(topo, 30).with_context(|| when.to_owned())?;
    let want: BTreeSet<String> = (1..=BACKENDS).map(|i| format!("b{i}")).collect();
    let got: BTreeSet<String> = seen.keys().cloned().collect();
    ensure!(
        got == want,
        "{when}: answers {seen:?}, wanted all of {want:?}"
    );
    println!("{when}: 30 connections through the VIP reached {seen:?}");
    Ok(())
}

/// Stops `probe` and checks it saw the service both before `event` and after it; the outage
/// (last success to next success) and how many attempts failed.
fn finish_probe(probe: Probe, event: Instant) -> Result<(Duration, usize, usize)> {
    let log = probe.finish();
    let before = log.iter().filter(|(t, ok)| *ok && *t < event).count();
    let after = log.iter().filter(|(t, ok)| *ok && *t > event).count();
    ensure!(before > 0, "no successful probe before the event");
    ensure!(
        after > 0 && log.last().is_some_and(|(_, ok)| *ok),
        "the service did not come back: {after} successes after the event, last attempt {:?}",
        log.last().map(|(_, ok)| ok)
    );
    let (worst, failed) = outage(&log);
    Ok((worst, failed, log.len()))
}

fn start_probe(topo: &HaTopology) -> Result<Probe> {
    let probe = Probe::start(&topo.client.ns, SocketAddrV4::new(VIP, PORT))?;
    // Some successes first, so the outage is measured from the last one before the event.
    std::thread::sleep(Duration::from_millis(500));
    Ok(probe)
}

/// Holds steady for `d`: `check` passes every 20 ms.
fn steady(d: Duration, mut check: impl FnMut() -> Result<()>) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        check()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Test 1: keepalived interop, both roles, crash and graceful stop

#[test]
fn xdplb_and_keepalived_elect_one_master_and_fail_over_both_ways() -> Result<()> {
    if !require_privileges("xdplb_and_keepalived_elect_one_master_and_fail_over_both_ways") {
        return Ok(());
    }
    println!(
        "bounds: crash failover {:?} (backup priority {LOW}), graceful stop {:?}",
        crash_bound(LOW),
        graceful_bound(LOW)
    );
    xdplb_master_keepalived_backup().context("xdplb master (lb1), keepalived backup (lb2)")?;
    keepalived_master_xdplb_backup().context("keepalived master (lb1), xdplb backup (lb2)")?;
    Ok(())
}

/// xdplb with `[ha]` on lb1 (priority 200), keepalived on lb2 (priority 100).
fn xdplb_master_keepalived_backup() -> Result<()> {
    let topo = HaTopology::new(BACKENDS)?;
    let _servers = topo.identity_servers(PORT)?;
    let lb1_cfg = topo.config(0, &services(), &ha_keys(HIGH));
    // lb2: xdplb's data path, keepalived's VRRP.
    let _fwd2 = topo.start_agent(1, &topo.config(1, &services(), ""), &[])?;
    let mut k2 = Keepalived::start(&topo.lb(1).ns, topo.dir.path(), &keepalived_config(LOW))?;
    // keepalived alone takes the VIP first, so xdplb has to take it from keepalived.
    wait_vip_holder(&topo, &[1], Duration::from_secs(5))
        .with_context(|| format!("keepalived alone; log:\n{}", k2.log_text()))?;
    wait_keepalived(&k2, "MASTER", Duration::from_secs(1))?;

    let started = Instant::now();
    let a1 = topo.start_agent(0, &lb1_cfg, &[])?;
    let (_, h1) = wait_state(&a1, "master", Duration::from_secs(5))?;
    wait_vip_holder(&topo, &[0], Duration::from_secs(3))
        .with_context(|| format!("keepalived log:\n{}", k2.log_text()))?;
    wait_keepalived(&k2, "BACKUP", Duration::from_secs(2))?;
    println!(
        "(a) election: xdplb on lb1 preempted keepalived and lb1 alone held the VIP {:?} after \
         xdplb was started ({})",
        started.elapsed(),
        reason(&h1)
    );
    check_xdplb_took_over_from_keepalived(&a1, &k2)?;
    let received = a1.ha()?.counters.adverts_received;
    let timeouts = count(&k2.log_text(), "Receive advertisement timeout");
    steady(10 * Duration::from_millis(INTERVAL_MS), || {
        ensure!(
            topo.vip_holder() == vec![0],
            "holders {:?}",
            topo.vip_holder()
        );
        let h = a1.ha()?;
        ensure!(h.state == "master", "lb1 is {} ({})", h.state, reason(&h));
        // A backup is silent: nothing from keepalived while xdplb is master.
        ensure!(
            h.counters.adverts_received == received,
            "lb1 received {} adverts from a backup",
            h.counters.adverts_received - received
        );
        ensure!(
            k2.state().as_deref() == Some("BACKUP"),
            "keepalived {:?}",
            k2.state()
        );
        Ok(())
    })?;
    // keepalived accepts every xdplb advert: its master-down timer never fired again.
    ensure!(
        count(&k2.log_text(), "Receive advertisement timeout") == timeouts,
        "keepalived timed out on xdplb's adverts; log:\n{}",
        k2.log_text()
    );
    assert_backends_serve(&topo, "(a) xdplb master on lb1")?;

    // Graceful stop: SIGTERM -> priority-0 advert -> keepalived takes over after its skew time.
    let probe = start_probe(&topo)?;
    let signalled_ms = unix_ms();
    let stopped = Instant::now();
    sigterm(a1.guard.pid())?;
    let took = wait_vip_holder(&topo, &[1], Duration::from_secs(2))
        .with_context(|| format!("keepalived log:\n{}", k2.log_text()))?;
    let took_from_signal = stopped.elapsed();
    wait_keepalived(&k2, "MASTER", Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_secs(1));
    let (worst, failed, probes) = finish_probe(probe, stopped)?;
    let a1_log = a1.log_text();
    let exit = a1.stop();
    ensure!(
        exit.success(),
        "xdplb on lb1 exited with {exit}; log:\n{a1_log}"
    );
    let resigned = logged_after(&a1_log, "master -> initialize: shutting down", signalled_ms);
    ensure!(
        k2.log_text()
            .contains("(VI_51) Backup received priority 0 advertisement"),
        "keepalived did not log xdplb's priority-0 advert; log:\n{}",
        k2.log_text()
    );
    println!(
        "(a) graceful stop of xdplb: xdplb resigned (logged) {resigned:?} ms after SIGTERM; \
         keepalived on lb2 alone held the VIP {took_from_signal:?} after SIGTERM (poll \
         {took:?}); client outage {worst:?} ({failed} failed probes of {probes}); bound {:?}",
        graceful_bound(LOW)
    );
    ensure!(
        took_from_signal < graceful_bound(LOW),
        "graceful takeover took {took_from_signal:?} >= {:?}",
        graceful_bound(LOW)
    );
    ensure!(
        worst < graceful_bound(LOW) + PROBE_RESOLUTION,
        "graceful-stop outage {worst:?} >= {:?} + {PROBE_RESOLUTION:?}",
        graceful_bound(LOW)
    );
    assert_backends_serve(
        &topo,
        "(a) keepalived master on lb2 after xdplb's graceful stop",
    )?;

    // xdplb comes back and preempts again.
    let started = Instant::now();
    let a1 = topo.start_agent(0, &lb1_cfg, &[])?;
    wait_state(&a1, "master", Duration::from_secs(5))?;
    wait_vip_holder(&topo, &[0], Duration::from_secs(3))
        .with_context(|| format!("keepalived log:\n{}", k2.log_text()))?;
    wait_keepalived(&k2, "BACKUP", Duration::from_secs(2))?;
    check_xdplb_took_over_from_keepalived(&a1, &k2)?;
    println!(
        "(a) xdplb restarted on lb1 and took the VIP back from keepalived {:?} after start",
        started.elapsed()
    );
    assert_backends_serve(&topo, "(a) xdplb master on lb1 again")?;

    // Crash: kill -9 (no goodbye, the address stays on lb1) and lb1's link goes down.
    // The takeover is asserted on the VIP's move, which only VRRP decides. Once lb1's bridge
    // port is down the bridge floods frames for lb1's MAC to lb2 too; lb2's data path passes
    // them to its kernel (another host's MAC: pass_other_host), which drops them.
    let probe = start_probe(&topo)?;
    let crashed = Instant::now();
    let a1_log = a1.log_text();
    a1.kill9()?;
    topo.set_link(0, false)?;
    let took = topo
        .wait_holds(1, Duration::from_secs(3))
        .map(|_| crashed.elapsed())
        .ok_or_else(|| {
            anyhow!(
                "keepalived on lb2 did not take the VIP within 3 s of xdplb's crash (holders \
                 {:?}); keepalived log:\n{}\nxdplb log:\n{a1_log}",
                topo.vip_holder(),
                k2.log_text()
            )
        })?;
    wait_keepalived(&k2, "MASTER", Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_secs(1));
    let (worst, failed, probes) = finish_probe(probe, crashed)?;
    println!(
        "(a) crash of xdplb: keepalived on lb2 held the VIP {took:?} after SIGKILL; client \
         outage {worst:?} ({failed} failed probes of {probes}); bound {:?}",
        crash_bound(LOW)
    );
    ensure!(
        took < crash_bound(LOW),
        "keepalived took over {took:?} after the crash, bound {:?}",
        crash_bound(LOW)
    );
    ensure!(
        worst < crash_bound(LOW),
        "crash outage {worst:?} >= {:?}",
        crash_bound(LOW)
    );
    ensure!(
        topo.wait_client_arp(1, Duration::from_secs(1)).is_some(),
        "the client resolves the VIP to {:?}, not lb2's {}",
        topo.client_arp(),
        topo.node_mac(1)
    );
    assert_backends_serve(&topo, "(a) keepalived master on lb2 after xdplb's crash")?;
    keepalived_accepted_all(&k2)?;
    k2.stop();
    Ok(())
}

/// lb1 is xdplb master after preempting keepalived on lb2, and keepalived saw why.
fn check_xdplb_took_over_from_keepalived(a1: &HaAgent, k2: &Keepalived) -> Result<()> {
    let h = a1.ha()?;
    ensure!(
        h.master
            == Some(MasterStatus {
                address: lb_addr(0),
                priority: HIGH,
                advert_interval_ms: INTERVAL_MS,
                local: true,
            }),
        "lb1's master: {:?}",
        h.master
    );
    let why = reason(&h);
    ensure!(
        why.contains(&format!(
            "preempted lower-priority master {} (priority {LOW})",
            lb_addr(1)
        )),
        "lb1's last transition: {why}"
    );
    // It heard keepalived (as backup, before preempting) and discarded none of its adverts.
    ensure!(
        h.counters.adverts_received > 0,
        "lb1 never accepted a keepalived advert: {:?}",
        h.counters
    );
    ensure!(
        h.counters.discarded.values().all(|&n| n == 0),
        "lb1 discarded adverts: {:?}; log:\n{}",
        h.counters.discarded,
        a1.log_text()
    );
    ensure!(h.vips == vec![VIP], "lb1 holds {:?}", h.vips);
    let needle = format!(
        "Master received advert from {} with higher priority {HIGH}, ours {LOW}",
        lb_addr(0)
    );
    ensure!(
        k2.wait_log(&needle, Duration::from_secs(1)),
        "keepalived did not log `{needle}`; log:\n{}",
        k2.log_text()
    );
    Ok(())
}

/// keepalived on lb1 (priority 200, plus xdplb without `[ha]`), xdplb with `[ha]` on lb2
/// (priority 100).
fn keepalived_master_xdplb_backup() -> Result<()> {
    let topo = HaTopology::new(BACKENDS)?;
    let _servers = topo.identity_servers(PORT)?;
    let _fwd1 = topo.start_agent(0, &topo.config(0, &services(), ""), &[])?;
    let a2 = topo.start_agent(1, &topo.config(1, &services(), &ha_keys(LOW)), &[])?;
    // xdplb alone becomes master, so keepalived has to take the VIP from xdplb.
    wait_state(&a2, "master", Duration::from_secs(5))?;
    wait_vip_holder(&topo, &[1], Duration::from_secs(2))?;

    let started = Instant::now();
    let mut k1 = Keepalived::start(&topo.lb(0).ns, topo.dir.path(), &keepalived_config(HIGH))?;
    let (_, h2) = wait_state(&a2, "backup", Duration::from_secs(5))
        .with_context(|| format!("keepalived log:\n{}", k1.log_text()))?;
    wait_vip_holder(&topo, &[0], Duration::from_secs(3))
        .with_context(|| format!("keepalived log:\n{}", k1.log_text()))?;
    wait_keepalived(&k1, "MASTER", Duration::from_secs(1))?;
    println!(
        "(b) election: keepalived on lb1 preempted xdplb and lb1 alone held the VIP {:?} after \
         keepalived started ({})",
        started.elapsed(),
        reason(&h2)
    );
    check_keepalived_took_over_from_xdplb(&a2, &k1)?;
    let received = a2.ha()?.counters.adverts_received;
    let t0 = Instant::now();
    steady(10 * Duration::from_millis(INTERVAL_MS), || {
        ensure!(
            topo.vip_holder() == vec![0],
            "holders {:?}",
            topo.vip_holder()
        );
        let h = a2.ha()?;
        ensure!(h.state == "backup", "lb2 is {} ({})", h.state, reason(&h));
        ensure!(
            h.master.as_ref().map(|m| (m.address, m.priority)) == Some((lb_addr(0), HIGH)),
            "lb2's master: {:?}",
            h.master
        );
        ensure!(
            k1.state().as_deref() == Some("MASTER"),
            "keepalived {:?}",
            k1.state()
        );
        Ok(())
    })?;
    let h2 = a2.ha()?;
    let heard = h2.counters.adverts_received - received;
    // One advert per interval; allow for the edges of the window.
    let expected = (t0.elapsed().as_millis() as u64 / INTERVAL_MS).saturating_sub(2);
    ensure!(
        heard >= expected,
        "lb2 accepted {heard} keepalived adverts in {:?}, expected at least {expected}",
        t0.elapsed()
    );
    ensure!(
        h2.counters.discarded.values().all(|&n| n == 0),
        "lb2 discarded keepalived's adverts: {:?}",
        h2.counters.discarded
    );
    println!(
        "(b) lb2 (xdplb backup) accepted {heard} keepalived adverts in {:?}",
        t0.elapsed()
    );
    assert_backends_serve(&topo, "(b) keepalived master on lb1")?;

    // Graceful stop of keepalived: priority 0, xdplb takes over after its skew time.
    let probe = start_probe(&topo)?;
    let zero_before = a2.ha()?.counters.priority_zero_received;
    let signalled_ms = unix_ms();
    let stopped = Instant::now();
    sigterm(k1.pid())?;
    let (polled, h2) = wait_state(&a2, "master", Duration::from_secs(2))
        .with_context(|| format!("keepalived log:\n{}", k1.log_text()))?;
    wait_vip_holder(&topo, &[1], Duration::from_secs(1))?;
    let held = stopped.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let (worst, failed, probes) = finish_probe(probe, stopped)?;
    keepalived_accepted_all(&k1)?;
    let exit = k1.stop();
    let transition_ms = h2
        .last_transition
        .as_ref()
        .map(|t| t.at_unix_ms.saturating_sub(signalled_ms))
        .unwrap_or_default();
    println!(
        "(b) graceful stop of keepalived: xdplb on lb2 became master {transition_ms} ms after \
         SIGTERM (its transition timestamp; polled {polled:?}), held the VIP alone {held:?} \
         after; client outage {worst:?} ({failed} failed probes of {probes}); bound {:?}; \
         keepalived exited {exit}",
        graceful_bound(LOW)
    );
    let why = reason(&h2);
    ensure!(
        why.contains(&format!("master {} resigned (priority 0)", lb_addr(0))),
        "lb2's last transition: {why}"
    );
    ensure!(
        h2.counters.priority_zero_received > zero_before,
        "lb2 counted no priority-0 advert"
    );
    ensure!(
        Duration::from_millis(transition_ms) < graceful_bound(LOW),
        "xdplb took over {transition_ms} ms after keepalived's SIGTERM, bound {:?}",
        graceful_bound(LOW)
    );
    ensure!(
        held < graceful_bound(LOW) + Duration::from_millis(50),
        "lb2 alone held the VIP {held:?} after SIGTERM, bound {:?} (+50 ms polling)",
        graceful_bound(LOW)
    );
    ensure!(
        worst < graceful_bound(LOW) + PROBE_RESOLUTION,
        "graceful-stop outage {worst:?} >= {:?} + {PROBE_RESOLUTION:?}",
        graceful_bound(LOW)
    );
    assert_backends_serve(
        &topo,
        "(b) xdplb master on lb2 after keepalived's graceful stop",
    )?;

    // keepalived comes back and preempts again.
    let started = Instant::now();
    let mut k1 = Keepalived::start(&topo.lb(0).ns, topo.dir.path(), &keepalived_config(HIGH))?;
    wait_state(&a2, "backup", Duration::from_secs(5))
        .with_context(|| format!("keepalived log:\n{}", k1.log_text()))?;
    wait_vip_holder(&topo, &[0], Duration::from_secs(3))?;
    wait_keepalived(&k1, "MASTER", Duration::from_secs(1))?;
    check_keepalived_took_over_from_xdplb(&a2, &k1)?;
    println!(
        "(b) keepalived restarted on lb1 and took the VIP back from xdplb {:?} after start",
        started.elapsed()
    );
    assert_backends_serve(&topo, "(b) keepalived master on lb1 again")?;

    // Crash: keepalived killed (its VIP stays on lb1) and lb1's link goes down.
    keepalived_accepted_all(&k1)?;
    let probe = start_probe(&topo)?;
    let crashed_ms = unix_ms();
    let crashed = Instant::now();
    k1.kill9()?;
    topo.set_link(0, false)?;
    let (polled, h2) = wait_state(&a2, "master", Duration::from_secs(3))?;
    let took = topo
        .wait_holds(1, Duration::from_secs(1))
        .map(|_| crashed.elapsed())
        .ok_or_else(|| anyhow!("lb2 is master but does not hold the VIP"))?;
    std::thread::sleep(Duration::from_secs(1));
    let (worst, failed, probes) = finish_probe(probe, crashed)?;
    let transition_ms = h2
        .last_transition
        .as_ref()
        .map(|t| t.at_unix_ms.saturating_sub(crashed_ms))
        .unwrap_or_default();
    println!(
        "(b) crash of keepalived: xdplb on lb2 became master {transition_ms} ms after SIGKILL \
         (polled {polled:?}), held the VIP {took:?} after; client outage {worst:?} ({failed} \
         failed probes of {probes}); bound {:?}",
        crash_bound(LOW)
    );
    let why = reason(&h2);
    ensure!(
        why.contains(&format!("no advertisement from the master {}", lb_addr(0))),
        "lb2's last transition: {why}"
    );
    ensure!(
        took < crash_bound(LOW),
        "xdplb held the VIP {took:?} after the crash, bound {:?}",
        crash_bound(LOW)
    );
    ensure!(
        worst < crash_bound(LOW),
        "crash outage {worst:?} >= {:?}",
        crash_bound(LOW)
    );
    let h2 = a2.ha()?;
    ensure!(
        h2.master.as_ref().is_some_and(|m| m.local) && h2.vips == vec![VIP],
        "lb2 after the takeover: master {:?}, holds {:?}",
        h2.master,
        h2.vips
    );
    ensure!(
        topo.wait_client_arp(1, Duration::from_secs(1)).is_some(),
        "the client resolves the VIP to {:?}, not lb2's {}",
        topo.client_arp(),
        topo.node_mac(1)
    );
    assert_backends_serve(&topo, "(b) xdplb master on lb2 after keepalived's crash")?;
    Ok(())
}

/// lb2 (xdplb) is backup under keepalived on lb1, and keepalived saw xdplb's adverts.
fn check_keepalived_took_over_from_xdplb(a2: &HaAgent, k1: &Keepalived) -> Result<()> {
    let h = a2.ha()?;
    ensure!(
        h.master
            == Some(MasterStatus {
                address: lb_addr(0),
                priority: HIGH,
                advert_interval_ms: INTERVAL_MS,
                local: false,
            }),
        "lb2's master: {:?}",
        h.master
    );
    let why = reason(&h);
    ensure!(
        why.contains(&format!(
            "master {} (priority {HIGH}) has precedence",
            lb_addr(0)
        )),
        "lb2's last transition: {why}"
    );
    ensure!(h.vips.is_empty(), "lb2 (backup) holds {:?}", h.vips);
    // keepalived, preempting, discarded xdplb's lower-priority advert.
    let needle = format!(
        "received lower priority ({LOW}) advert from {} - discarding",
        lb_addr(1)
    );
    ensure!(
        k1.wait_log(&needle, Duration::from_secs(1)),
        "keepalived did not log `{needle}`; log:\n{}",
        k1.log_text()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Test 2: forged adverts

/// A raw socket in the client's namespace that sends whole IPv4 packets as given.
struct Forger {
    sock: Socket,
}

impl Forger {
    fn open(topo: &HaTopology) -> Result<Forger> {
        topo.client.ns.run_in(|| -> Result<Forger> {
            let sock = Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )
            .context("raw socket")?;
            sock.set_header_included_v4(true).context("IP_HDRINCL")?;
            sock.set_multicast_if_v4(&CLIENT_ADDR)
                .context("IP_MULTICAST_IF")?;
            Ok(Forger { sock })
        })
    }

    fn send(&self, pkt: &[u8]) -> Result<()> {
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let n = self
            .sock
            .send_to(pkt, &SockAddr::from(SocketAddrV4::new(dst, 0)))
            .with_context(|| format!("sending a forged advert to {dst}"))?;
        ensure!(n == pkt.len(), "sent {n} of {} bytes", pkt.len());
        Ok(())
    }
}

#[test]
fn spoofed_adverts_are_ignored_and_counted() -> Result<()> {
    if !require_privileges("spoofed_adverts_are_ignored_and_counted") {
        return Ok(());
    }
    const N: u64 = 50;
    let topo = HaTopology::new(BACKENDS)?;
    let _servers = topo.identity_servers(PORT)?;
    let a1 = topo.start_agent(0, &topo.config(0, &services(), &ha_keys(HIGH)), &[])?;
    let a2 = topo.start_agent(1, &topo.config(1, &services(), &ha_keys(LOW)), &[])?;
    wait_state(&a1, "master", Duration::from_secs(5))?;
    wait_state(&a2, "backup", Duration::from_secs(5))?;
    wait_vip_holder(&topo, &[0], Duration::from_secs(2))?;
    let agents = [&a1, &a2];
    let logs = || {
        agents
            .iter()
            .map(|a| format!("--- lb{} ---\n{}", a.node + 1, a.log_text()))
            .collect::<String>()
    };
    let before = [a1.ha()?, a2.ha()?];

    // What a client on the link would claim: the highest priority, for our VRID and VIP.
    let claim = Advert {
        vrid: VRID,
        priority: 255,
        interval_cs: (INTERVAL_MS / 10) as u16,
        addresses: vec![VIP],
    };
    let msg = claim.encode(CLIENT_ADDR, VRRP_GROUP);
    let valid = ipv4_packet(CLIENT_ADDR, VRRP_GROUP, 255, &msg);
    let ttl = ipv4_packet(CLIENT_ADDR, VRRP_GROUP, 254, &msg);
    let other_vrid = Advert {
        vrid: VRID + 1,
        ..claim.clone()
    };
    let vrid = ipv4_packet(
        CLIENT_ADDR,
        VRRP_GROUP,
        255,
        &other_vrid.encode(CLIENT_ADDR, VRRP_GROUP),
    );
    let mut bad = msg.clone();
    bad[6] ^= 0x5a;
    let checksum = ipv4_packet(CLIENT_ADDR, VRRP_GROUP, 255, &bad);

    let forger = Forger::open(&topo)?;
    let roles_hold = || -> Result<()> {
        ensure!(
            topo.vip_holder() == vec![0],
            "the VIP moved: holders {:?}\n{}",
            topo.vip_holder(),
            logs()
        );
        let (h1, h2) = (a1.ha()?, a2.ha()?);
        ensure!(
            h1.state == "master" && h2.state == "backup",
            "lb1 {} ({}), lb2 {} ({})\n{}",
            h1.state,
            reason(&h1),
            h2.state,
            reason(&h2),
            logs()
        );
        Ok(())
    };
    let t0 = Instant::now();
    let mut checks = 0;
    for (what, pkt) in [("ttl", &ttl), ("vrid", &vrid), ("checksum", &checksum)] {
        for i in 0..N {
            forger.send(pkt).with_context(|| format!("{what} #{i}"))?;
            if i % 5 == 0 {
                roles_hold()?;
                checks += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let sent_in = t0.elapsed();
    // Every one counted, on both nodes.
    let want = |h: &HaStatus, before: &HaStatus| -> bool {
        ["ttl", "vrid", "checksum"].iter().all(|k| {
            h.counters.discarded.get(*k).copied().unwrap_or(0)
                == before.counters.discarded.get(*k).copied().unwrap_or(0) + N
        })
    };
    for (a, b) in agents.iter().zip(&before) {
        wait_ha(
            a,
            &format!("{N} more discarded ttl/vrid/checksum"),
            Duration::from_secs(3),
            |h| want(h, b),
        )
        .with_context(|| format!("before {:?}", b.counters.discarded))?;
    }
    // ...and exactly N: nothing counted late, nothing else counted.
    steady(Duration::from_millis(300), &roles_hold)?;
    let after = [a1.ha()?, a2.ha()?];
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let delta: BTreeMap<&str, u64> = a
            .counters
            .discarded
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    v - b.counters.discarded.get(k).copied().unwrap_or(0),
                )
            })
            .filter(|(_, d)| *d > 0)
            .collect();
        ensure!(
            delta == BTreeMap::from([("checksum", N), ("ttl", N), ("vrid", N)]),
            "lb{}: discarded grew by {delta:?}, wanted {N} each of ttl, vrid, checksum",
            i + 1
        );
        ensure!(
            a.counters.became_master == b.counters.became_master
                && a.counters.became_backup == b.counters.became_backup
                && a.counters.split_brain == b.counters.split_brain,
            "lb{}: transitions during the forgery: {:?} -> {:?}",
            i + 1,
            b.counters,
            a.counters
        );
        println!("lb{}: discarded grew by {delta:?}", i + 1);
    }
    // lb1 is master: lb2 is silent, and no forged advert was accepted.
    ensure!(
        after[0].counters.adverts_received == before[0].counters.adverts_received,
        "lb1 accepted {} adverts",
        after[0].counters.adverts_received - before[0].counters.adverts_received
    );
    // One warning per kind, however many packets, within the 10 s rate limit.
    ensure!(
        t0.elapsed() < Duration::from_secs(10),
        "the forgery took {:?}",
        t0.elapsed()
    );
    for a in agents {
        let log = a.log_text();
        for (needle, n) in [
            ("TTL is not 255", 1),
            ("bad checksum", 1),
            ("discarded a VRRP packet", 2),
        ] {
            ensure!(
                count(&log, needle) == n,
                "lb{}: {} lines with `{needle}`, wanted {n}; log:\n{log}",
                a.node + 1,
                count(&log, needle)
            );
        }
        let line = log.lines().find(|l| l.contains("TTL is not 255")).unwrap();
        ensure!(
            line.contains(&CLIENT_ADDR.to_string()),
            "lb{}: the warning does not name the source: {line}",
            a.node + 1
        );
    }
    println!(
        "forgery: {} packets ({N} each: TTL 254, VRID {}, bad checksum) in {sent_in:?}: lb1 \
         master and lb2 backup at all {checks} checks, the VIP never moved, one warning per \
         kind in each log",
        3 * N,
        VRID + 1
    );

    // One valid forged advert: the agents do get the client's packets and would act on them.
    // lb1 steps down for the forger; lb2 follows the forger too (255 beats its 100); when the
    // forger falls silent, lb1 (shorter skew) takes over first and lb2 stays backup. The VIP is
    // on lb1 or on nobody, never on lb2.
    let sent = Instant::now();
    forger.send(&valid)?;
    let (stepped, h1) = wait_state(&a1, "backup", Duration::from_secs(1))?;
    let why = reason(&h1);
    ensure!(
        why.contains(&format!(
            "master {CLIENT_ADDR} (priority 255) has precedence"
        )),
        "lb1's last transition: {why}"
    );
    let transitions = || {
        agents
            .iter()
            .map(|a| {
                let log = a.log_text();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("VRRP ") && l.contains(" -> "))
                    .collect();
                format!(
                    "--- lb{} transitions ---\n{}\n",
                    a.node + 1,
                    lines.join("\n")
                )
            })
            .collect::<String>()
    };
    let back = loop {
        let (h1, h2) = (a1.ha()?, a2.ha()?);
        let holders = topo.vip_holder();
        ensure!(
            h2.state == "backup"
                && h2.counters.became_master == before[1].counters.became_master
                && !holders.contains(&1),
            "after one forged advert lb2 is {} and became master {} more times (holders \
             {holders:?}); lb2's last transition: {}\n{}",
            h2.state,
            h2.counters.became_master - before[1].counters.became_master,
            reason(&h2),
            transitions()
        );
        if h1.state == "master" {
            let why = reason(&h1);
            ensure!(
                why.contains(&format!("no advertisement from the master {CLIENT_ADDR}")),
                "lb1's last transition: {why}\n{}",
                transitions()
            );
            break sent.elapsed();
        }
        ensure!(
            sent.elapsed() < Duration::from_secs(3),
            "lb1 not master again within 3 s of the forged advert\n{}",
            transitions()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    wait_vip_holder(&topo, &[0], Duration::from_secs(1))?;
    let h2 = a2.ha()?;
    ensure!(
        h2.master.as_ref().map(|m| m.address) == Some(lb_addr(0)),
        "lb2's master: {:?}",
        h2.master
    );
    println!(
        "valid forged advert (priority 255 from {CLIENT_ADDR}): lb1 stepped down within \
         {stepped:?} and took over again {back:?} after it (master down {:?} at priority {HIGH})",
        master_down(HIGH)
    );
    ensure!(
        back < Duration::from_secs(2),
        "lb1 took {back:?} to take over again"
    );
    Ok(())
}
