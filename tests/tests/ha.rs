//! High availability end to end: two real `xdplb` agents share the VIP with VRRPv3 on one bridge,
//! with a client and three backends (tests/src/ha.rs). Each test asserts on what a user sees:
//! which node holds the VIP, the client's connections and their outage, the bytes of long
//! streams, and the agents' status, CLI and logs.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_tests::{
    ha::{HaAgent, HaTopology, Probe, lb_addr, outage},
    netns::{Netns, require_privileges},
    streams::{assert_unbroken, echo_each, finish_all, open_streams},
    topology::{VIP, backend_addr},
};

const PORT: u16 = 80;
const INTERVAL_MS: u64 = 100;

fn services(n: usize) -> String {
    let mut s = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [vip.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 2\n"
    );
    for i in 0..n {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n",
            backend_addr(i)
        ));
    }
    s
}

fn ha_keys(priority: u8, extra: &str) -> String {
    format!("vrid = 51\npriority = {priority}\nadvert_interval = \"{INTERVAL_MS}ms\"\n{extra}")
}

/// RFC 5798: 3 x Master_Adver_Interval + Skew_Time, for the backup's priority.
fn master_down(priority: u8) -> Duration {
    let skew_cs = (256 - u64::from(priority)) * (INTERVAL_MS / 10) / 256;
    Duration::from_millis(3 * INTERVAL_MS + skew_cs * 10)
}

/// The bound on the client-visible outage of a failover.
fn outage_bound(backup_priority: u8) -> Duration {
    master_down(backup_priority) + Duration::from_millis(200)
}

fn wait_state(agent: &HaAgent, state: &str, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        let h = agent.ha()?;
        if h.state == state {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > timeout {
            bail!(
                "lb{} not {state} within {timeout:?} (is {}, {:?}); log:\n{}",
                agent.node + 1,
                h.state,
                h.last_transition,
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts lb1 (priority 200) and lb2 (priority 100) with the same services and waits for the
/// election: lb1 master holding the VIP, lb2 backup.
fn pair(topo: &HaTopology, extra1: &str, extra2: &str) -> Result<(HaAgent, HaAgent)> {
    let a = topo.start_agent(0, &topo.config(0, &services(3), &ha_keys(200, extra1)), &[])?;
    let b = topo.start_agent(1, &topo.config(1, &services(3), &ha_keys(100, extra2)), &[])?;
    wait_state(&a, "master", Duration::from_secs(5))?;
    wait_state(&b, "backup", Duration::from_secs(5))?;
    // With the virtual MAC the addresses are on the macvlan, not eth0.
    if extra1.contains("virtual_mac") {
        ensure!(
            a.ha()?.vips == vec![VIP] && b.ha()?.vips.is_empty(),
            "{:?}",
            a.ha()?.vips
        );
    } else {
        ensure!(
            topo.wait_vip_holder(&[0], Duration::from_secs(2)).is_some(),
            "holders {:?}",
            topo.vip_holder()
        );
    }
    Ok((a, b))
}

/// Runs nft inside `ns`.
fn nft(ns: &Netns, rules: &str) -> Result<()> {
    let path =
        std::env::temp_dir().join(format!("xdplb-ha-{}-{}.nft", std::process::id(), ns.name()));
    std::fs::write(&path, rules)?;
    let out = ns.exec("nft", &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    out.map(drop).context("nft")
}

/// The CLI's JSON answer, checking its exit status.
fn cli_json(agent: &HaAgent, args: &[&str], ok: bool) -> Result<serde_json::Value> {
    let out = agent.cli(args)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(
        out.status.success() == ok,
        "xdplb {args:?}: exit {} (wanted success = {ok}); stdout {stdout}; stderr {stderr}",
        out.status
    );
    if !ok {
        return Ok(serde_json::Value::String(stderr));
    }
    serde_json::from_str(&stdout).with_context(|| format!("xdplb {args:?} printed {stdout}"))
}

fn lb2_holds_the_vip(topo: &HaTopology) -> Result<()> {
    ensure!(
        topo.wait_holds(1, Duration::from_secs(1)).is_some(),
        "lb2 does not hold the VIP"
    );
    Ok(())
}

/// A crash of lb1 (SIGKILL, and its link goes down too: no goodbye advert) under a loop of new
/// client connections that runs `warmup` before and `settle` after lb2 becomes master; `before`
/// runs just before the kill, `at_master` as soon as lb2 is master. Returns every connection
/// attempt and how long lb2 took.
fn crash_lb1_under_probe(
    topo: &HaTopology,
    a: HaAgent,
    b: &HaAgent,
    warmup: Duration,
    settle: Duration,
    before: impl FnOnce() -> Result<()>,
    at_master: impl FnOnce() -> Result<()>,
) -> Result<(Vec<(Instant, bool)>, Duration)> {
    let probe = Probe::start(&topo.client.ns, SocketAddrV4::new(VIP, PORT))?;
    std::thread::sleep(warmup);
    before()?;
    a.kill9()?;
    topo.set_link(0, false)?;
    let took = wait_state(b, "master", Duration::from_secs(2))?;
    at_master()?;
    std::thread::sleep(settle);
    Ok((probe.finish(), took))
}

#[test]
fn master_crash_backup_takes_over_within_bound() -> Result<()> {
    if !require_privileges("master_crash_backup_takes_over_within_bound") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "", "")?;
    let (log, took) = crash_lb1_under_probe(
        &topo,
        a,
        &b,
        Duration::from_millis(1000),
        Duration::from_millis(1500),
        || Ok(()),
        || lb2_holds_the_vip(&topo),
    )?;
    let (worst, failed) = outage(&log);
    let bound = outage_bound(100);
    eprintln!(
        "lb2 master {took:?} after the kill; client outage {worst:?} ({failed} failed of {} \
         connections); bound {bound:?}",
        log.len()
    );
    ensure!(worst < bound, "outage {worst:?} >= bound {bound:?}");
    // New connections after the failover are served (through lb2).
    let after: Vec<_> = log.iter().rev().take(20).collect();
    ensure!(after.iter().all(|(_, ok)| *ok), "late failures: {after:?}");
    let h = b.ha()?;
    let t = h.last_transition.context("no transition")?;
    ensure!(
        t.from == "backup"
            && t.to == "master"
            && t.reason
                .contains("no advertisement from the master 10.0.0.2"),
        "{t:?}"
    );
    ensure!(h.vips == vec![VIP], "{:?}", h.vips);
    ensure!(
        b.wait_log(
            "VRRP backup -> master: no advertisement from the master 10.0.0.2",
            Duration::from_secs(1)
        ),
        "log:\n{}",
        b.log_text()
    );
    Ok(())
}

#[test]
fn streams_survive_planned_handover_and_master_failure() -> Result<()> {
    if !require_privileges("streams_survive_planned_handover_and_master_failure") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = echo_each(&topo.backends, PORT);
    let (a, b) = pair(&topo, "", "")?;
    let start = Instant::now();
    let ports: Vec<u16> = (41000..41006).collect();
    let streams = open_streams(
        &topo.client.ns,
        &ports,
        SocketAddrV4::new(VIP, PORT),
        Duration::ZERO,
    );
    std::thread::sleep(Duration::from_millis(1000));
    let before: u64 = streams.iter().map(|s| s.verified()).sum();

    // Planned: the operator moves mastership to lb2.
    let t0 = Instant::now();
    let reply = cli_json(&a, &["ha", "handover", "--json"], true)?;
    let handover = t0.elapsed();
    let msg = reply["message"].as_str().unwrap_or_default().to_string();
    ensure!(msg.contains("mastership handed to 10.0.0.3"), "{reply}");
    ensure!(
        reply["status"]["state"] == "backup" && reply["status"]["held"] == true,
        "{reply}"
    );
    wait_state(&b, "master", Duration::from_secs(1))?;
    ensure!(
        topo.wait_vip_holder(&[1], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    // The resigning master's priority 0 lets lb2 take over after its skew time alone.
    ensure!(
        handover < Duration::from_millis(500),
        "handover took {handover:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let after_handover: u64 = streams.iter().map(|s| s.verified()).sum();
    ensure!(
        after_handover > before,
        "streams stalled after the handover"
    );
    // Held: lb1 does not preempt lb2 although its priority is higher.
    std::thread::sleep(master_down(200) * 2);
    ensure!(
        a.ha()?.state == "backup" && b.ha()?.state == "master",
        "lb1 preempted while held"
    );

    // Unplanned: lb2 crashes; lb1, held or not, takes over because nobody else is master.
    b.kill9()?;
    topo.set_link(1, false)?;
    let took = wait_state(&a, "master", Duration::from_secs(5))?;
    ensure!(took < outage_bound(200), "lb1 took over after {took:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let after_crash: u64 = streams.iter().map(|s| s.verified()).sum();
    ensure!(
        after_crash > after_handover,
        "streams stalled after the failover"
    );
    let reports = finish_all(streams);
    eprintln!(
        "handover answered in {handover:?}; lb1 master {took:?} after lb2's crash; {} bytes \
         verified ({before} before the handover, {after_handover} before the crash)",
        reports.iter().map(|r| r.bytes).sum::<u64>()
    );
    assert_unbroken(&reports, start);
    Ok(())
}

#[test]
fn interface_tracking_preemption_and_clean_shutdown() -> Result<()> {
    if !require_privileges("interface_tracking_preemption_and_clean_shutdown") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "", "")?;

    // lb1's link goes down with its agent running: it cannot forward, so it gives up.
    topo.set_link(0, false)?;
    wait_state(&a, "fault", Duration::from_secs(2))?;
    let took = wait_state(&b, "master", Duration::from_secs(2))?;
    let h = a.ha()?;
    ensure!(
        h.effective_priority == 0
            && h.vips.is_empty()
            && h.tracking
                .iter()
                .any(|t| t.what == "interface eth0" && !t.ok),
        "{h:?}"
    );
    ensure!(
        topo.wait_holds(1, Duration::from_secs(1)).is_some(),
        "lb2 does not hold the VIP"
    );
    eprintln!("lb2 master {took:?} after lb1's link went down");

    // Link back: lb1 is a backup first, then preempts lb2 (priority 200 > 100).
    topo.set_link(0, true)?;
    let back = wait_state(&a, "master", Duration::from_secs(3))?;
    wait_state(&b, "backup", Duration::from_secs(1))?;
    ensure!(
        topo.wait_vip_holder(&[0], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    let t = a.ha()?.last_transition.context("no transition")?;
    ensure!(
        t.reason
            .contains("preempted lower-priority master 10.0.0.3 (priority 100)"),
        "{t:?}"
    );
    eprintln!("lb1 master again {back:?} after its link came back");

    // A clean stop resigns with priority 0: lb2 takes over after its skew time, not the
    // master-down interval.
    let t0 = Instant::now();
    let st = a.stop();
    ensure!(st.success(), "lb1 exited {st}");
    let took = wait_state(&b, "master", Duration::from_secs(2))?;
    let stop_to_master = t0.elapsed();
    ensure!(
        b.ha()?
            .last_transition
            .context("none")?
            .reason
            .contains("master 10.0.0.2 resigned (priority 0)"),
        "{:?}",
        b.ha()?.last_transition
    );
    ensure!(
        topo.wait_vip_holder(&[1], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    eprintln!("lb2 master {stop_to_master:?} after lb1's SIGTERM ({took:?} after it exited)");

    // preempt = false: the returning lb1 stays backup.
    let a = topo.start_agent(
        0,
        &topo.config(0, &services(3), &ha_keys(200, "preempt = false")),
        &[],
    )?;
    wait_state(&a, "backup", Duration::from_secs(2))?;
    std::thread::sleep(master_down(200) * 3);
    ensure!(
        a.ha()?.state == "backup" && b.ha()?.state == "master",
        "lb1 preempted with preempt = false"
    );
    let m = a.ha()?.master.context("lb1 knows no master")?;
    ensure!(
        m.address == lb_addr(1) && m.priority == 100 && !m.local,
        "{m:?}"
    );
    ensure!(
        topo.vip_holder() == vec![1],
        "holders {:?}",
        topo.vip_holder()
    );
    Ok(())
}

#[test]
fn split_brain_is_resolved_within_an_interval_and_counted() -> Result<()> {
    if !require_privileges("split_brain_is_resolved_within_an_interval_and_counted") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "", "")?;
    // Cut VRRP between the nodes (both ways): each thinks the other is gone.
    let cut = "table inet ha_cut {\n chain in { type filter hook input priority 0; ip protocol 112 drop; }\n}\n";
    nft(&topo.lb(0).ns, cut)?;
    nft(&topo.lb(1).ns, cut)?;
    wait_state(&b, "master", Duration::from_secs(2))?;
    ensure!(a.ha()?.state == "master", "lb1 is not master any more");
    std::thread::sleep(Duration::from_millis(500));
    // Healed.
    let t0 = Instant::now();
    nft(&topo.lb(0).ns, "delete table inet ha_cut\n")?;
    nft(&topo.lb(1).ns, "delete table inet ha_cut\n")?;
    let resolved = wait_state(&b, "backup", Duration::from_secs(2))?;
    let healed = t0.elapsed();
    ensure!(a.ha()?.state == "master", "the wrong node stepped down");
    // The bound: one advertisement interval after they hear each other again (plus
    // scheduling slack for the status polls).
    ensure!(
        healed < Duration::from_millis(INTERVAL_MS + 50),
        "split brain lasted {healed:?} after healing"
    );
    let h = a.ha()?;
    ensure!(h.counters.split_brain == 1, "{:?}", h.counters);
    // Which of the two lines lb1 logs depends on which arrives first after healing: lb2's
    // advert (lb1 answers it at once) or lb2's priority-0 goodbye (lb2 heard lb1 first). Either
    // way it is one episode, counted once above.
    let lines = [
        "split brain: 10.0.0.3 was also master of vrid 51 and has stepped down",
        "split brain: 10.0.0.3 (priority 100) also claims master of vrid 51; this node has \
         precedence (priority 200) and keeps the VIPs, the other steps down",
    ];
    ensure!(
        a.wait_log("split brain: 10.0.0.3", Duration::from_secs(1))
            && lines.iter().any(|l| a.log_text().contains(l)),
        "log:\n{}",
        a.log_text()
    );
    let t = b.ha()?.last_transition.context("none")?;
    ensure!(
        t.reason
            .contains("master 10.0.0.2 (priority 200) has precedence"),
        "{t:?}"
    );
    ensure!(
        topo.wait_vip_holder(&[0], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    eprintln!("split brain resolved {healed:?} after healing ({resolved:?} by lb2's status)");
    Ok(())
}

#[test]
fn tracked_vip_without_backends_gives_up_mastership() -> Result<()> {
    if !require_privileges("tracked_vip_without_backends_gives_up_mastership") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "track_vips = [\"web\"]", "track_vips = [\"web\"]")?;
    // Only lb1 loses its backends: its health checks are dropped on the way out.
    nft(
        &topo.lb(0).ns,
        "table inet ha_track {\n chain out { type filter hook output priority 0; ip daddr 10.0.0.0/24 tcp dport 80 drop; }\n}\n",
    )?;
    let took = wait_state(&a, "fault", Duration::from_secs(3))?;
    wait_state(&b, "master", Duration::from_secs(1))?;
    let h = a.ha()?;
    ensure!(
        h.tracking.iter().any(|t| t.what == "vip web" && !t.ok),
        "{h:?}"
    );
    ensure!(
        a.wait_log(
            "tracking: failing: vip web; priority 200 -> 0",
            Duration::from_secs(1)
        ),
        "log:\n{}",
        a.log_text()
    );
    ensure!(
        topo.wait_vip_holder(&[1], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    eprintln!("lb1 gave up {took:?} after its health checks started failing");
    // Its backends answer again: it comes back and preempts.
    nft(&topo.lb(0).ns, "delete table inet ha_track\n")?;
    wait_state(&a, "master", Duration::from_secs(3))?;
    ensure!(
        topo.wait_vip_holder(&[0], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    Ok(())
}

#[test]
fn nodes_compare_table_digests() -> Result<()> {
    if !require_privileges("nodes_compare_table_digests") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "", "")?;
    let matches = |agent: &HaAgent| -> Result<Option<bool>> {
        Ok(agent.ha()?.peer_tables.map(|p| p.matches))
    };
    let wait_match = |want: bool, timeout: Duration| -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if matches(&a)? == Some(want) && matches(&b)? == Some(want) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "peer tables not matches={want} on both within {timeout:?}: {:?} / {:?}",
            a.ha()?.peer_tables,
            b.ha()?.peer_tables
        )
    };
    wait_match(true, Duration::from_secs(4))?;
    // One node's operator change makes the tables differ.
    cli_json(
        &b,
        &["backend", "weight", "web", "10.0.0.11", "5", "--json"],
        true,
    )?;
    wait_match(false, Duration::from_secs(4))?;
    ensure!(
        b.wait_log(
            "forwarding tables differ from peer 10.0.0.2",
            Duration::from_secs(8)
        ),
        "log:\n{}",
        b.log_text()
    );
    let text = String::from_utf8_lossy(&b.cli(&["status"])?.stdout).into_owned();
    ensure!(text.contains("peer tables DIFFER from 10.0.0.2"), "{text}");
    cli_json(
        &b,
        &["backend", "weight", "web", "10.0.0.11", "1", "--json"],
        true,
    )?;
    wait_match(true, Duration::from_secs(4))?;
    ensure!(
        b.wait_log(
            "forwarding tables match peer 10.0.0.2 again",
            Duration::from_secs(2)
        ),
        "log:\n{}",
        b.log_text()
    );
    Ok(())
}

#[test]
fn detached_data_path_gives_up_mastership() -> Result<()> {
    if !require_privileges("detached_data_path_gives_up_mastership") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "", "")?;
    // Someone detaches lb1's program behind the agent's back.
    let prog = a.status()?.program_id.context("no program id")?;
    let links: serde_json::Value =
        serde_json::from_str(&topo.lb(0).ns.exec("bpftool", &["-j", "link", "show"])?)?;
    let link = links
        .as_array()
        .and_then(|l| l.iter().find(|l| l["prog_id"] == prog))
        .and_then(|l| l["id"].as_u64())
        .with_context(|| format!("no link runs program {prog}: {links}"))?;
    topo.lb(0)
        .ns
        .exec("bpftool", &["link", "detach", "id", &link.to_string()])?;
    let took = wait_state(&a, "fault", Duration::from_secs(3))?;
    wait_state(&b, "master", Duration::from_secs(1))?;
    let h = a.ha()?;
    ensure!(
        h.tracking.iter().any(|t| t.what == "dataplane" && !t.ok) && h.vips.is_empty(),
        "{h:?}"
    );
    ensure!(
        a.wait_log(
            "the XDP program is no longer attached",
            Duration::from_secs(1)
        ),
        "log:\n{}",
        a.log_text()
    );
    ensure!(
        topo.wait_vip_holder(&[1], Duration::from_secs(1)).is_some(),
        "holders {:?}",
        topo.vip_holder()
    );
    eprintln!("lb1 gave up {took:?} after its program was detached");
    Ok(())
}

#[test]
fn virtual_mac_moves_with_mastership() -> Result<()> {
    if !require_privileges("virtual_mac_moves_with_mastership") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "virtual_mac = true", "virtual_mac = true")?;
    let vmac = "00:00:5e:00:01:33";
    ensure!(
        a.ha()?.virtual_mac.as_deref() == Some(vmac),
        "{:?}",
        a.ha()?.virtual_mac
    );
    let (log, _) = crash_lb1_under_probe(
        &topo,
        a,
        &b,
        Duration::from_millis(500),
        Duration::from_millis(1000),
        || {
            ensure!(
                topo.client_arp().as_deref() == Some(vmac),
                "client resolves the VIP to {:?}",
                topo.client_arp()
            );
            Ok(())
        },
        || Ok(()),
    )?;
    let (worst, failed) = outage(&log);
    // The client's ARP entry never changes: the switch learns the MAC's new port from lb2's
    // gratuitous ARP.
    ensure!(
        topo.client_arp().as_deref() == Some(vmac),
        "client resolves the VIP to {:?}",
        topo.client_arp()
    );
    ensure!(worst < outage_bound(100), "outage {worst:?}");
    ensure!(
        log.iter().rev().take(20).all(|(_, ok)| *ok),
        "failures after the failover"
    );
    eprintln!(
        "virtual MAC failover: outage {worst:?}, {failed} failed of {}",
        log.len()
    );
    Ok(())
}

#[test]
fn unicast_peers_elect_compare_tables_and_fail_over() -> Result<()> {
    if !require_privileges("unicast_peers_elect_compare_tables_and_fail_over") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (a, b) = pair(&topo, "peers = [\"10.0.0.3\"]", "peers = [\"10.0.0.2\"]")?;
    let m = b.ha()?.master.context("lb2 knows no master")?;
    ensure!(m.address == lb_addr(0) && m.priority == 200, "{m:?}");
    ensure!(a.ha()?.peers == vec![lb_addr(1)], "{:?}", a.ha()?.peers);
    // Unicast: both ask each other for table digests.
    let t0 = Instant::now();
    while !(a.ha()?.peer_tables.is_some_and(|p| p.matches)
        && b.ha()?.peer_tables.is_some_and(|p| p.matches))
    {
        ensure!(
            t0.elapsed() < Duration::from_secs(4),
            "peer tables: {:?} / {:?}",
            a.ha()?.peer_tables,
            b.ha()?.peer_tables
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (log, _) = crash_lb1_under_probe(
        &topo,
        a,
        &b,
        Duration::from_millis(500),
        Duration::from_millis(1000),
        || Ok(()),
        || lb2_holds_the_vip(&topo),
    )?;
    let (worst, failed) = outage(&log);
    ensure!(worst < outage_bound(100), "outage {worst:?}");
    eprintln!(
        "unicast failover: outage {worst:?}, {failed} failed of {}",
        log.len()
    );
    Ok(())
}

/// `xdplb run --replace` on the master: the old agent leaves without resigning and keeps the
/// VIP on the interface, the new one starts as master and advertises at once, so the backup
/// never takes over and the client sees no outage.
#[test]
fn replacing_the_master_causes_no_failover() -> Result<()> {
    if !require_privileges("replacing_the_master_causes_no_failover") {
        return Ok(());
    }
    let topo = HaTopology::new(3)?;
    let _servers = topo.identity_servers(PORT)?;
    let (mut a, b) = pair(&topo, "", "")?;
    let probe = Probe::start(&topo.client.ns, SocketAddrV4::new(VIP, PORT))?;
    std::thread::sleep(Duration::from_millis(300));

    let cfg = topo.config(0, &services(3), &ha_keys(200, ""));
    let new = topo.start_agent(0, &cfg, &["--replace"])?;
    ensure!(
        new.wait_log("replaced agent pid", Duration::from_secs(30)),
        "{}",
        new.log_text()
    );
    let st = a
        .agent
        .guard
        .wait_timeout(Duration::from_secs(10))?
        .context("the replaced agent is still running")?;
    ensure!(st.success(), "the replaced agent exited with {st}");
    ensure!(
        a.log_text().contains("VRRP stopped without resigning"),
        "{}",
        a.log_text()
    );
    wait_state(&new, "master", Duration::from_secs(1))?;
    ensure!(
        new.wait_log(
            "took over mastership from the agent this one replaced",
            Duration::from_secs(1)
        ),
        "{}",
        new.log_text()
    );
    // Well past the backup's master-down interval: it never took over.
    std::thread::sleep(master_down(100) * 3);
    let backup = b.ha()?;
    ensure!(
        backup.state == "backup" && backup.counters.became_master == 0,
        "lb2 took over: {backup:?}"
    );
    ensure!(
        backup.counters.priority_zero_received == 0,
        "the replaced master resigned: {backup:?}"
    );
    ensure!(
        topo.vip_holder() == vec![0],
        "holders {:?}",
        topo.vip_holder()
    );
    let log = probe.finish();
    let (gap, failed) = outage(&log);
    eprintln!(
        "{} connections through the master's replacement, {failed} failed, longest gap {gap:?}",
        log.len()
    );
    ensure!(failed == 0, "{failed} connections failed");
    ensure!(gap < master_down(100), "outage {gap:?}");
    ensure!(new.stop().success());
    drop(b);
    Ok(())
}

/// An IPv6 VIP moves with mastership: added to the new master's interface usable at once (no
/// duplicate address detection), removed from the old one, and announced with an unsolicited
/// neighbour advertisement, so a client that had resolved it to the old master sends to the new
/// one at once rather than when its neighbour entry ages out (tens of seconds). The master's
/// own health checks of the IPv6 backend keep passing while it holds the VIP: held as a
/// preferred address, the /128 would become their source and the backend (which holds the VIP
/// too) would answer them to itself.
#[test]
fn ipv6_vip_moves_with_mastership_and_is_announced() -> Result<()> {
    if !require_privileges("ipv6_vip_moves_with_mastership_and_is_announced") {
        return Ok(());
    }
    const VIP6: &str = "2001:db8::100";
    const CHECK_PORT: u16 = 8080;
    let topo = HaTopology::new(1)?;
    let hosts = [
        (&topo.client, "2001:db8::1"),
        (topo.lb(0), "2001:db8::2"),
        (topo.lb(1), "2001:db8::3"),
        (&topo.backends[0], "2001:db8::11"),
    ];
    // The LAN starts with IPv6 off; this test needs it on.
    for (h, addr) in &hosts {
        for key in ["all", "default", "eth0"] {
            h.ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "0")?;
            h.ns.sysctl(&format!("net.ipv6.conf.{key}.accept_dad"), "0")?;
        }
        h.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
    }
    topo.backends[0]
        .ns
        .ip(&["-6", "addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
    // The health-check port: the kernel completes handshakes into the backlog unaccepted.
    let _check = topo.backends[0].ns.run_in(|| {
        std::net::TcpListener::bind(("::", CHECK_PORT)).context("health-check listener")
    })?;
    // The IPv6 backend as `agent`'s status shows it: its state and its health checks.
    let backend6 = |agent: &HaAgent| -> Result<(String, u64)> {
        let out = agent.cli(&["status", "--json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).into_owned())?;
        let b = v["vips"]
            .as_array()
            .and_then(|vips| vips.iter().find(|x| x["name"] == "web6"))
            .and_then(|x| x["backends"].get(0))
            .with_context(|| format!("no web6 backend in {v}"))?;
        Ok((
            b["state"].as_str().unwrap_or_default().to_owned(),
            b["health"]["failures"].as_u64().unwrap_or_default(),
        ))
    };
    let services = format!(
        "{}[[vip]]\nname = \"web6\"\naddress = \"{VIP6}\"\nport = {PORT}\nprotocol = \"tcp\"\n\
         [vip.health]\nkind = \"tcp\"\nport = {CHECK_PORT}\ninterval = \"100ms\"\n\
         timeout = \"80ms\"\nrise = 1\nfall = 2\n[[vip.backend]]\naddress = \"2001:db8::11\"\n",
        services(1)
    );
    let a = topo.start_agent(0, &topo.config(0, &services, &ha_keys(200, "")), &[])?;
    let b = topo.start_agent(1, &topo.config(1, &services, &ha_keys(100, "")), &[])?;
    wait_state(&a, "master", Duration::from_secs(5))?;
    wait_state(&b, "backup", Duration::from_secs(5))?;

    let held = |node: usize| -> Result<Option<String>> {
        let out = topo
            .lb(node)
            .ns
            .ip(&["-6", "addr", "show", "dev", "eth0"])?;
        Ok(out
            .lines()
            .find(|l| l.contains(&format!("{VIP6}/128")))
            .map(str::to_owned))
    };
    let line = held(0)?.context("lb1 (master) does not hold the IPv6 VIP")?;
    ensure!(!line.contains("tentative"), "added with DAD: {line}");
    ensure!(held(1)?.is_none(), "the backup holds the IPv6 VIP");
    let h = a.ha()?;
    ensure!(
        h.vips.iter().any(|v| v.to_string() == VIP6),
        "status: {:?}",
        h.vips
    );
    // A dozen check intervals with the VIP held: no check failed.
    std::thread::sleep(Duration::from_millis(1200));
    let (state, failures) = backend6(&a)?;
    ensure!(
        state == "up" && failures == 0,
        "the master's checks of its IPv6 backend: {state}, {failures} failures; log:\n{}",
        a.log_text()
    );

    // The client resolves the VIP to lb1 (its kernel answers the solicitation and the ping).
    topo.client
        .ns
        .exec("ping", &["-6", "-c", "1", "-W", "2", VIP6])
        .context("ping the IPv6 VIP through lb1")?;
    ensure!(
        topo.client_neighbour(VIP6).as_deref() == Some(topo.node_mac(0).as_str()),
        "client entry {:?}, lb1 is {}",
        topo.client_neighbour(VIP6),
        topo.node_mac(0)
    );

    // A clean stop: lb1 resigns, lb2 takes over and announces.
    let t0 = Instant::now();
    ensure!(a.stop().success(), "lb1 did not stop cleanly");
    wait_state(&b, "master", Duration::from_secs(2))?;
    let moved = loop {
        if topo.client_neighbour(VIP6).as_deref() == Some(topo.node_mac(1).as_str()) {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(3),
            "the client still sends the IPv6 VIP to {:?} (lb2 is {}): no neighbour \
             advertisement moved it; lb2 log:\n{}",
            topo.client_neighbour(VIP6),
            topo.node_mac(1),
            b.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let line = held(1)?.context("lb2 (master) does not hold the IPv6 VIP")?;
    ensure!(!line.contains("tentative"), "added with DAD: {line}");
    ensure!(held(0)?.is_none(), "lb1 kept the IPv6 VIP after stopping");
    std::thread::sleep(Duration::from_millis(1200));
    let (state, failures) = backend6(&b)?;
    ensure!(
        state == "up" && failures == 0,
        "the new master's checks of its IPv6 backend: {state}, {failures} failures; log:\n{}",
        b.log_text()
    );
    topo.client
        .ns
        .exec("ping", &["-6", "-c", "1", "-W", "2", VIP6])
        .context("ping the IPv6 VIP through lb2")?;
    eprintln!("client's entry for {VIP6} moved to lb2 {moved:?} after lb1's stop");
    Ok(())
}
