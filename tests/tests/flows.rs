//! The connection table, end to end: established TCP streams and UDP flows keep their backend
//! through drains, added backends, weight changes, reloads and removals (for the removal grace),
//! and are remapped when their backend fails or its grace ends (see `lb_common::flows`).
//!
//! Every test runs the real `xdplb run` process on the namespace topology of
//! `lb_tests::topology`, echo servers on the backends, and long-lived streams from the client
//! that write a deterministic byte pattern and verify every echoed byte. A stream that is reset,
//! stalls or reads a wrong byte is reported broken with the reason and the moment it happened.

use std::{
    collections::BTreeMap,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::{Netns, require_privileges},
    streams::{
        Stream, ask_echo, assert_streams_moved, assert_unbroken, connect_many, echo_each,
        finish_all, open_streams, spawn_in,
    },
    topology::{
        Agent, CLIENT_ADDR, IdentityServers, LbTopology, VIP, backend_addr, backend_status, tally,
        udp_ask, udp_client, wait_for_log, wait_until,
    },
};
use lb_userspace::status::Status;

// ---- the agent ----

fn web(backends: usize, extra: &str) -> String {
    let mut s = format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\
         table_size = 1009\n{extra}\n"
    );
    for i in 0..backends {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n\n",
            backend_addr(i)
        ));
    }
    s
}

fn flows_section(body: &str) -> String {
    format!("[flows]\n{body}\n")
}

fn event(s: &Status, name: &str) -> u64 {
    s.flows
        .events
        .iter()
        .find(|e| e.event == name)
        .unwrap_or_else(|| panic!("no flow event {name} in {:?}", s.flows.events))
        .count
}

fn events(s: &Status) -> String {
    s.flows
        .events
        .iter()
        .map(|e| format!("{}={}", e.event, e.count))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Waits until every backend of every VIP is up and in its table.
fn wait_all_up(agent: &Agent) {
    wait_until(agent, "every backend up", Duration::from_secs(5), |s| {
        s.vips.iter().all(|v| {
            v.backends
                .iter()
                .all(|b| b.state == "up" && b.in_table && b.slots > 0)
        })
    });
}

/// Runs the CLI and panics unless it succeeds; returns its stdout.
fn cli_ok(agent: &Agent, args: &[&str]) -> String {
    let out = agent.cli(args).unwrap();
    assert!(
        out.status.success(),
        "xdplb {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The backend name (`b1`, ...) the VIP's table picks for a client port now; `vip` is `web`
/// (port 80, TCP) or `dns` (port 5353, UDP).
fn predicted(agent: &Agent, vip: &str, port: u16) -> String {
    let service = match vip {
        "web" => format!("{VIP}:80/tcp"),
        "dns" => format!("{VIP}:5353/udp"),
        _ => panic!("unknown vip {vip}"),
    };
    let w = agent
        .which(&service, SocketAddrV4::new(CLIENT_ADDR, port))
        .unwrap();
    let addr: Ipv4Addr = w
        .backend
        .unwrap_or_else(|| panic!("no backend for port {port}"))
        .parse()
        .unwrap();
    format!("b{}", addr.octets()[3] - 10)
}

/// From `candidates`, `per` client ports for each backend in `names`, as the table puts them now.
fn ports_for(
    agent: &Agent,
    vip: &str,
    candidates: std::ops::Range<u16>,
    names: &[&str],
    per: usize,
) -> Vec<u16> {
    let mut picked: BTreeMap<&str, Vec<u16>> = names.iter().map(|n| (*n, Vec::new())).collect();
    for p in candidates.clone() {
        let b = predicted(agent, vip, p);
        if let Some(v) = picked.get_mut(b.as_str())
            && v.len() < per
        {
            v.push(p);
        }
        if picked.values().all(|v| v.len() == per) {
            return picked.into_values().flatten().collect();
        }
    }
    panic!("not {per} ports per backend in {candidates:?}: {picked:?}");
}

// ---- the tests ----

#[test]
fn drain_keeps_established_streams() {
    if !require_privileges("drain_keeps_established_streams") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let servers = echo_each(&topo.backends, 80);
    let agent = topo.start_agent(&topo.config(&web(3, "")), &[]).unwrap();
    wait_all_up(&agent);
    let dst = SocketAddrV4::new(VIP, 80);

    // 12 streams, 4 on each backend (where the table puts their ports).
    let ports = ports_for(&agent, "web", 41000..41300, &["b1", "b2", "b3"], 4);
    let start = Instant::now();
    let streams = open_streams(&topo.client.ns, &ports, dst, Duration::from_millis(2));
    for s in &streams {
        assert_eq!(
            s.backend,
            predicted(&agent, "web", s.src.port()),
            "stream from {} not where which-backend said",
            s.src
        );
    }
    std::thread::sleep(Duration::from_millis(700));

    // Drain b2, which holds 4 of them.
    let b2 = backend_addr(1);
    let on_b2: Vec<SocketAddr> = streams
        .iter()
        .filter(|s| s.backend == "b2")
        .map(|s| s.src)
        .collect();
    assert_eq!(on_b2.len(), 4);
    let before = agent.status().unwrap();
    let hits_before = event(&before, "hit");
    cli_ok(&agent, &["backend", "drain", "web", &b2.to_string()]);
    let drained_at = Instant::now();
    wait_until(&agent, "b2 drained", Duration::from_secs(2), |s| {
        let b = backend_status(s, "web", b2);
        b.state == "draining" && !b.in_table && b.slots == 0
    });
    let verified_at_drain: Vec<u64> = streams.iter().map(Stream::verified).collect();
    let echoed_at_drain: Vec<u64> = on_b2.iter().map(|&p| servers[1].echoed_to(p)).collect();
    let new_flows_b2 = backend_status(&agent.status().unwrap(), "web", b2).new_flows;

    // Streams keep going for 3 s; meanwhile 100 new connections, none of which may reach b2.
    std::thread::sleep(Duration::from_millis(1500));
    let (answers, failures) = connect_many(&topo.client.ns, dst, 41500, 100);
    std::thread::sleep(Duration::from_millis(
        3000u64.saturating_sub(drained_at.elapsed().as_millis() as u64),
    ));
    let after_drain = drained_at.elapsed();
    let verified_now: Vec<u64> = streams.iter().map(Stream::verified).collect();
    let echoed_now: Vec<u64> = on_b2.iter().map(|&p| servers[1].echoed_to(p)).collect();
    let reports = finish_all(streams);
    let status = agent.status().unwrap();

    let counts = tally(answers.iter().map(String::as_str));
    eprintln!(
        "new connections after the drain: {} answered {counts:?}, {} failed",
        answers.len(),
        failures.len()
    );
    for (i, r) in reports.iter().enumerate() {
        eprintln!(
            "  stream {} on {}: {} bytes total, {} after the drain",
            r.src,
            r.backend,
            r.bytes,
            verified_now[i] - verified_at_drain[i]
        );
    }
    eprintln!(
        "b2 echoed per stream after the drain ({after_drain:?}): {:?}; flow events: {}",
        echoed_now
            .iter()
            .zip(&echoed_at_drain)
            .map(|(a, b)| a - b)
            .collect::<Vec<_>>(),
        events(&status)
    );
    assert_unbroken(&reports, start);
    for (i, r) in reports.iter().enumerate() {
        assert!(
            verified_now[i] > verified_at_drain[i] + 10_000,
            "stream {} on {} barely moved after the drain: {} -> {}",
            r.src,
            r.backend,
            verified_at_drain[i],
            verified_now[i]
        );
    }
    // The drained backend itself kept echoing its streams.
    for (k, p) in on_b2.iter().enumerate() {
        assert!(
            echoed_now[k] > echoed_at_drain[k] + 10_000,
            "b2 stopped echoing {p} after the drain: {} -> {}",
            echoed_at_drain[k],
            echoed_now[k]
        );
    }
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("b2"), None, "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 100);
    assert_eq!(
        backend_status(&status, "web", b2).new_flows,
        new_flows_b2,
        "new flows reached the drained backend"
    );
    let hits = event(&status, "hit");
    assert!(
        hits > hits_before,
        "no flow-table hits: {}",
        events(&status)
    );
    assert!(agent.stop().success());
}

/// Loops of short connections through the VIP, several side by side, until stopped. Each
/// connection reads the banner, has a request echoed, waits `hold`, has a second one echoed and
/// closes: it is open for a while, so table changes happen while connections are in flight.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
}

#[derive(Debug, Default)]
struct LoadReport {
    /// When each connection ended, and the backend that answered it.
    answers: Vec<(Instant, String)>,
    failures: Vec<String>,
    /// Whether a loop ran out of ports before being stopped.
    exhausted: bool,
}

impl Load {
    /// `workers` loops, each with its share of the source ports `ports`.
    fn start(
        ns: &Netns,
        ports: std::ops::Range<u16>,
        workers: u16,
        hold: Duration,
        dst: SocketAddrV4,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let share = ports.len() as u16 / workers;
        let threads = (0..workers)
            .map(|w| {
                let flag = stop.clone();
                let first = ports.start + w * share;
                let mut mine = first..first + share;
                spawn_in(ns, move || {
                    let mut r = LoadReport::default();
                    while !flag.load(Ordering::Relaxed) {
                        let Some(p) = mine.next() else {
                            r.exhausted = true;
                            break;
                        };
                        let src = SocketAddrV4::new(CLIENT_ADDR, p);
                        match ask_echo(src, dst, hold) {
                            Ok(a) => r.answers.push((Instant::now(), a)),
                            Err(e) => r.failures.push(format!("{src}: {e}")),
                        }
                    }
                    r
                })
            })
            .collect();
        Load { stop, threads }
    }

    fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = LoadReport::default();
        for t in self.threads.drain(..) {
            let r = t.join().expect("load thread panicked");
            all.answers.extend(r.answers);
            all.failures.extend(r.failures);
            all.exhausted |= r.exhausted;
        }
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn add_backend_under_load_zero_failures() {
    if !require_privileges("add_backend_under_load_zero_failures") {
        return;
    }
    // Three backends serve; the config lists two, the third is added live.
    let topo = LbTopology::new(3).expect("topology");
    let _servers = echo_each(&topo.backends, 80);
    let agent = topo.start_agent(&topo.config(&web(2, "")), &[]).unwrap();
    wait_all_up(&agent);
    let dst = SocketAddrV4::new(VIP, 80);
    let ports = ports_for(&agent, "web", 42000..42100, &["b1", "b2"], 4);
    let start = Instant::now();
    let streams = open_streams(&topo.client.ns, &ports, dst, Duration::from_millis(2));
    // 4 loops of connections open for about 10 ms each: a few hundred per second, several in
    // flight at any moment.
    let load = Load::start(
        &topo.client.ns,
        43000..53000,
        4,
        Duration::from_millis(10),
        dst,
    );
    std::thread::sleep(Duration::from_millis(1000));
    let rebuilds_before = agent.status().unwrap().table_rebuilds;

    let b1 = backend_addr(0).to_string();
    let b2 = backend_addr(1).to_string();
    let b3 = backend_addr(2);
    cli_ok(&agent, &["backend", "add", "web", &b3.to_string()]);
    let joined = wait_until(&agent, "b3 in the table", Duration::from_secs(5), |s| {
        let b = backend_status(s, "web", b3);
        b.in_table && b.slots > 0
    });
    let b3_in = Instant::now();
    eprintln!("b3 in the table {joined:?} after `backend add`");
    std::thread::sleep(Duration::from_millis(1500));
    cli_ok(&agent, &["backend", "weight", "web", &b1, "3"]);
    std::thread::sleep(Duration::from_millis(700));
    cli_ok(&agent, &["backend", "weight", "web", &b3.to_string(), "2"]);
    std::thread::sleep(Duration::from_millis(700));
    // A reload with all three in the file and b2's weight changed: operator weights go back to
    // the file's, b2's becomes 3.
    let cfg = topo.config(&web(3, "")).replace(
        &format!("address = \"{b2}\"\n"),
        &format!("address = \"{b2}\"\nweight = 3\n"),
    );
    std::fs::write(topo.dir.path().join("xdplb.toml"), cfg).unwrap();
    let out = cli_ok(&agent, &["reload"]);
    eprintln!("reload: {}", out.trim());
    wait_until(&agent, "reload applied", Duration::from_secs(2), |s| {
        backend_status(s, "web", backend_addr(1)).weight == 3
            && backend_status(s, "web", backend_addr(0)).weight == 1
            && backend_status(s, "web", b3).in_table
    });
    std::thread::sleep(Duration::from_millis(1500));

    let report = load.finish();
    let reports = finish_all(streams);
    let status = agent.status().unwrap();
    let rebuilds = status.table_rebuilds - rebuilds_before;
    let counts = tally(report.answers.iter().map(|(_, a)| a.as_str()));
    let on_b3_after = report
        .answers
        .iter()
        .filter(|(t, a)| *t > b3_in && a == "b3")
        .count();
    let after_b3 = report.answers.iter().filter(|(t, _)| *t > b3_in).count();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "load: {} connections ({:.0}/s over {secs:.1} s), {} failed, {counts:?}; {on_b3_after} \
         of {after_b3} after b3 joined went to b3; {rebuilds} table rebuilds; flow events: {}",
        report.answers.len(),
        report.answers.len() as f64 / secs,
        report.failures.len(),
        events(&status)
    );
    assert!(
        report.failures.is_empty(),
        "{} failed connections: {:?}",
        report.failures.len(),
        report.failures
    );
    assert!(!report.exhausted, "the load ran out of ports");
    assert!(
        report.answers.len() >= 1000,
        "too little load to mean anything: {}",
        report.answers.len()
    );
    assert_unbroken(&reports, start);
    assert!(on_b3_after > 0, "no new connection reached b3: {counts:?}");
    assert!(rebuilds >= 4, "{rebuilds} table rebuilds");
    assert!(backend_status(&status, "web", b3).new_flows > 0);
    let (answers, failures) = connect_many(&topo.client.ns, dst, 53100, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(tally(answers.iter().map(String::as_str)).contains_key("b3"));
    assert!(agent.stop().success());
}

#[test]
fn removed_backend_keeps_flows_for_grace_then_remaps() {
    if !require_privileges("removed_backend_keeps_flows_for_grace_then_remaps") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let _servers = echo_each(&topo.backends, 80);
    let grace = Duration::from_secs(3);
    let services = format!("{}{}", flows_section("remove_grace = \"3s\""), web(3, ""));
    let agent = topo.start_agent(&topo.config(&services), &[]).unwrap();
    wait_all_up(&agent);
    let dst = SocketAddrV4::new(VIP, 80);
    // Two streams on b1 (removed), one on each of the others (controls).
    let mut ports = ports_for(&agent, "web", 44000..44100, &["b1"], 2);
    ports.extend(ports_for(&agent, "web", 44100..44200, &["b2", "b3"], 1));
    let start = Instant::now();
    let streams = open_streams(&topo.client.ns, &ports, dst, Duration::from_millis(5));
    assert_eq!(
        streams.iter().filter(|s| s.backend == "b1").count(),
        2,
        "{:?}",
        streams.iter().map(|s| &s.backend).collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_millis(500));

    let b1 = backend_addr(0);
    let remapped_before = event(&agent.status().unwrap(), "remapped");
    cli_ok(&agent, &["backend", "remove", "web", &b1.to_string()]);
    let removed_at = Instant::now();
    let s = agent.status().unwrap();
    let removing: Vec<_> = s
        .flows
        .removing
        .iter()
        .map(|r| (r.vip.as_str(), r.backend.as_str(), r.remaining_secs))
        .collect();
    eprintln!("removing after `backend remove`: {removing:?}");
    assert!(
        removing
            .iter()
            .any(|&(v, b, rest)| v == "web" && b == b1.to_string() && rest > 0.0 && rest <= 3.0),
        "{removing:?}"
    );
    assert!(
        s.vips[0]
            .backends
            .iter()
            .all(|b| b.address != b1.to_string())
    );

    // During the grace, b1's streams keep going.
    let at_remove: Vec<u64> = streams.iter().map(Stream::verified).collect();
    std::thread::sleep(grace - Duration::from_millis(500));
    let in_grace: Vec<u64> = streams.iter().map(Stream::verified).collect();
    let during = removed_at.elapsed();
    for (i, s) in streams.iter().enumerate() {
        eprintln!(
            "  stream {} on {}: {} bytes in the first {during:?} of the grace",
            s.src,
            s.backend,
            in_grace[i] - at_remove[i]
        );
        assert!(
            !s.has_ended() && in_grace[i] > at_remove[i] + 10_000,
            "stream {} on {} did not keep going during the grace: {} -> {} bytes",
            s.src,
            s.backend,
            at_remove[i],
            in_grace[i]
        );
    }
    // New connections no longer reach b1, even during the grace.
    let (answers, failures) = connect_many(&topo.client.ns, dst, 44500, 50);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        tally(answers.iter().map(String::as_str)).get("b1"),
        None,
        "{answers:?}"
    );

    // The grace ends: the agent says so, and b1's streams are remapped on their next packet,
    // to a backend that has no such connection and resets it.
    let line =
        format!("backend {b1} of vip web: removal grace over; flows still on it are remapped");
    assert!(
        wait_for_log(&agent, &line, Duration::from_secs(3)),
        "{}",
        agent.log_text()
    );
    let logged = removed_at.elapsed();
    let deadline = Instant::now() + Duration::from_secs(3);
    while streams.iter().any(|s| s.backend == "b1" && !s.has_ended()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = agent.status().unwrap();
    let remapped = event(&status, "remapped") - remapped_before;
    let reports = finish_all(streams);
    eprintln!(
        "grace over logged {logged:?} after the removal; remapped +{remapped}; removing now {:?}; \
         flow events: {}",
        status.flows.removing,
        events(&status)
    );
    let (b1_reports, others): (Vec<_>, Vec<_>) =
        reports.into_iter().partition(|r| r.backend == "b1");
    for r in &b1_reports {
        let b = r
            .broken
            .as_ref()
            .unwrap_or_else(|| panic!("stream {} on b1 still ran after the grace: {r:?}", r.src));
        let when = b.at - removed_at;
        eprintln!(
            "  stream {} on b1: {} bytes, then {:?} {:?} after the removal",
            r.src, r.bytes, b.kind, when
        );
        assert_eq!(b.kind, io::ErrorKind::ConnectionReset, "{r:?}");
        assert!(
            when >= grace - Duration::from_millis(100) && when <= grace + Duration::from_secs(2),
            "stream {} broke {when:?} after the removal, grace {grace:?}",
            r.src
        );
    }
    assert!(remapped >= 2, "remapped +{remapped}: {}", events(&status));
    assert!(
        status.flows.removing.is_empty(),
        "{:?}",
        status.flows.removing
    );
    assert_unbroken(&others, start);
    assert!(agent.stop().success());
}

#[test]
fn failed_backend_flows_are_remapped() {
    if !require_privileges("failed_backend_flows_are_remapped") {
        return;
    }
    // How the observation works: b1 fails its health checks because its service stops
    // listening, but its established connections and its UDP server stay alive. So if the load
    // balancer kept sending b1's flows to b1, the TCP stream would keep echoing and the UDP flow
    // would keep being answered by "b1". A remapped TCP flow reaches a backend without that
    // connection, which resets it at once (no timeout), and a remapped UDP flow is answered by
    // another backend's name.
    let topo = LbTopology::new(3).expect("topology");
    let mut servers = echo_each(&topo.backends, 80);
    let mut udp = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        udp.udp(&b.ns, SocketAddrV4::new(VIP, 5353), &format!("b{}", i + 1))
            .unwrap();
    }
    // Both VIPs checked on the TCP service port, fast: down after 2 failures 200 ms apart.
    let health = "[vip.health]\nkind = \"tcp\"\nport = 80\ninterval = \"200ms\"\n\
                  timeout = \"150ms\"\nfall = 2\nrise = 2\n";
    let mut services = web(3, health);
    services.push_str(&format!(
        "[[vip]]\nname = \"dns\"\naddress = \"{VIP}\"\nport = 5353\nprotocol = \"udp\"\n\
         table_size = 1009\n{health}\n"
    ));
    for i in 0..3 {
        services.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n\n",
            backend_addr(i)
        ));
    }
    let agent = topo.start_agent(&topo.config(&services), &[]).unwrap();
    wait_all_up(&agent);
    let dst = SocketAddrV4::new(VIP, 80);
    let udp_dst = SocketAddrV4::new(VIP, 5353);

    let mut ports = ports_for(&agent, "web", 45000..45100, &["b1"], 2);
    ports.extend(ports_for(&agent, "web", 45100..45200, &["b2", "b3"], 1));
    let start = Instant::now();
    let streams = open_streams(&topo.client.ns, &ports, dst, Duration::from_millis(5));
    let udp_port = ports_for(&agent, "dns", 45500..45600, &["b1"], 1)[0];
    let usock = udp_client(&topo.client.ns, SocketAddrV4::new(CLIENT_ADDR, udp_port)).unwrap();
    for k in 0..5 {
        let a = udp_ask(&usock, udp_dst, format!("q{k}").as_bytes()).unwrap();
        assert_eq!(a, "b1", "UDP flow from {udp_port} before the failure");
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = agent.status().unwrap();
    let remapped_before = event(&before, "remapped");

    // b1's service stops listening: its checks fail (connect refused).
    servers[0].close_listener();
    let killed = Instant::now();
    let b1 = backend_addr(0);
    let down = wait_until(&agent, "b1 down", Duration::from_secs(3), |s| {
        ["web", "dns"].iter().all(|v| {
            let b = backend_status(s, v, b1);
            b.state == "down" && !b.in_table
        })
    });
    eprintln!("b1 down in both VIPs {down:?} after its listener closed");

    // The UDP flow's next datagram: remapped, answered by the backend the table now picks.
    let now_on = predicted(&agent, "dns", udp_port);
    assert_ne!(now_on, "b1");
    // It stays there: six datagrams, all answered by the same backend.
    let udp_after: Vec<String> = (0..6)
        .map(|k| {
            udp_ask(&usock, udp_dst, format!("r{k}").as_bytes())
                .unwrap_or_else(|e| format!("no answer: {e}"))
        })
        .collect();
    eprintln!(
        "UDP flow from {udp_port}: b1 before, {udp_after:?} after b1 went down (table: {now_on})"
    );

    // b1's TCP streams: reset, not blackholed (they kept streaming all along).
    let deadline = Instant::now() + Duration::from_secs(3);
    while streams.iter().any(|s| s.backend == "b1" && !s.has_ended()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = agent.status().unwrap();
    let remapped = event(&status, "remapped") - remapped_before;
    let reports = finish_all(streams);
    eprintln!("remapped +{remapped}; flow events: {}", events(&status));
    let (b1_reports, others): (Vec<_>, Vec<_>) =
        reports.into_iter().partition(|r| r.backend == "b1");
    for r in &b1_reports {
        let b = r.broken.as_ref().unwrap_or_else(|| {
            panic!(
                "stream {} still ran on the failed b1 (flow not remapped): {r:?}",
                r.src
            )
        });
        eprintln!(
            "  stream {} on b1: {} bytes, then {:?} {:?} after the listener closed ({})",
            r.src,
            r.bytes,
            b.kind,
            b.at - killed,
            b.what
        );
        assert_eq!(b.kind, io::ErrorKind::ConnectionReset, "{r:?}");
        assert!(b.at - killed <= down + Duration::from_secs(1), "{r:?}");
    }
    assert!(
        udp_after.iter().all(|a| *a == now_on),
        "UDP flow not remapped to {now_on}: {udp_after:?}"
    );
    // Two TCP streams and one UDP flow.
    assert!(remapped >= 3, "remapped +{remapped}: {}", events(&status));
    assert_unbroken(&others, start);
    assert!(agent.stop().success());
}

#[test]
fn fifty_streams_survive_twenty_table_changes() {
    if !require_privileges("fifty_streams_survive_twenty_table_changes") {
        return;
    }
    let topo = LbTopology::new(6).expect("topology");
    let _servers = echo_each(&topo.backends, 80);
    let services = format!("{}{}", flows_section("remove_grace = \"120s\""), web(4, ""));
    let agent = topo.start_agent(&topo.config(&services), &[]).unwrap();
    wait_all_up(&agent);
    let dst = SocketAddrV4::new(VIP, 80);
    let ports: Vec<u16> = (46000..46050).collect();
    let start = Instant::now();
    let streams = open_streams(&topo.client.ns, &ports, dst, Duration::from_millis(10));
    let on = tally(streams.iter().map(|s| s.backend.as_str()));
    eprintln!("50 streams: {on:?}");
    assert_eq!(on.len(), 4, "{on:?}");
    std::thread::sleep(Duration::from_millis(500));
    let rebuilds_before = agent.status().unwrap().table_rebuilds;

    let addr = |i: usize| backend_addr(i).to_string();
    let mut changes = 0;
    for i in [4, 5] {
        cli_ok(&agent, &["backend", "add", "web", &addr(i)]);
        changes += 1;
        wait_until(&agent, "added backend in", Duration::from_secs(5), |s| {
            backend_status(s, "web", backend_addr(i)).in_table
        });
    }
    cli_ok(&agent, &["backend", "drain", "web", &addr(3)]);
    std::thread::sleep(Duration::from_millis(300));
    cli_ok(&agent, &["backend", "remove", "web", &addr(3)]);
    changes += 2;
    // Weight changes, each to a weight the backend does not have (so each one rebuilds).
    let live = [0, 1, 2, 4, 5];
    let mut weights = [1usize; 6];
    while changes < 22 {
        let i = live[changes % live.len()];
        weights[i] = weights[i] % 4 + 1;
        let w = weights[i];
        cli_ok(
            &agent,
            &["backend", "weight", "web", &addr(i), &w.to_string()],
        );
        changes += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (answers, failures) = connect_many(&topo.client.ns, dst, 46500, 100);
    let reports = finish_all(streams);
    let status = agent.status().unwrap();
    let rebuilds = status.table_rebuilds - rebuilds_before;
    let counts = tally(answers.iter().map(String::as_str));
    eprintln!(
        "{changes} changes, {rebuilds} table rebuilds in {:?}; new connections after: {counts:?}, \
         {} failed; flow events: {}",
        start.elapsed(),
        failures.len(),
        events(&status)
    );
    assert_unbroken(&reports, start);
    assert_streams_moved(&reports, 10_000);
    assert!(rebuilds >= 20, "only {rebuilds} table rebuilds");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("b4"), None, "{counts:?}");
    assert!(
        counts.contains_key("b5") && counts.contains_key("b6"),
        "{counts:?}"
    );
    assert!(agent.stop().success());
}
