//! IPv6 end to end: the topology of `flows.rs` and `e2e.rs` over IPv6 (dual-stack hosts, see
//! `lb_tests::topology6`), the real `xdplb run` process, real TCP connections and UDP datagrams.
//!
//! - `harness_v6_hosts_reach_each_other_directly`: the harness alone, no agent: client and
//!   backends talk TCP and UDP over IPv6, backends accept and answer VIP traffic (direct server
//!   return), and the VIP belongs to the load balancer on the wire.
//! - `fifty_v6_streams_survive_twenty_table_changes`: 50 long-lived TCP streams, verified byte by
//!   byte, through two added backends, a drained and removed one, weight changes and reloads.
//! - `v6_connections_and_udp_follow_weights_and_which_backend`: short TCP connections and UDP
//!   request/response spread by weight, each landing where `xdplb which-backend` says.
//! - `v4_and_v6_vips_on_one_agent`: both families on one agent at once, changed independently.
//!
//! The load balancer's own stack listens on the VIPs' ports too (as "lb"): a connection or
//! datagram the data path did not forward is answered by "lb", and the tests say so.
//! Every test fails, not skips, without privileges under `CI=true`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use lb_tests::{
    netns::{Netns, require_privileges},
    streams::{
        EchoServer, Stream, StreamReport, ask_echo, assert_streams_moved, assert_unbroken,
        connect_many_from, echo_each_on, finish_all, open_streams_from, spawn_in,
    },
    topology::{self, Agent, CLIENT_ADDR, IdentityServers, tally, udp_ask, udp_client},
    topology6::{
        self, CLIENT6, LbTopology6, LogOnFailure, VIP6, backend_json, backend_name, backend6, cli,
        serving, status_json, vip_json, vip_toml, wait_all_serving, wait_status, which_backend,
    },
};

const ANY6: IpAddr = IpAddr::V6(Ipv6Addr::UNSPECIFIED);

/// `[VIP6]:port/proto`, as `which-backend` takes a service.
fn service6(port: u16, proto: &str) -> String {
    format!("[{VIP6}]:{port}/{proto}")
}

fn v6(i: usize) -> IpAddr {
    backend6(i).into()
}

/// Echo servers (`b1`, ...) on every backend and one named `lb` on the load balancer, all on
/// `[::]:port` (dual-stack: IPv4 clients too).
fn echo_servers(topo: &LbTopology6, port: u16) -> (Vec<EchoServer>, EchoServer) {
    let servers = echo_each_on(&topo.backends, ANY6, port);
    let lb = EchoServer::start_on(&topo.lb.ns, (ANY6, port), "lb");
    (servers, lb)
}

/// UDP identity servers bound to `vip:port` on every backend (`b1`, ...) and on the load
/// balancer (`lb`).
fn udp_servers(topo: &LbTopology6, vip: IpAddr, port: u16) -> Result<IdentityServers> {
    let mut s = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        s.udp(&b.ns, (vip, port), &format!("b{}", i + 1))?;
    }
    s.udp(&topo.lb.ns, (vip, port), "lb")?;
    Ok(s)
}

/// Fails with what it means when the load balancer's own stack answered.
fn ensure_forwarded(counts: &BTreeMap<String, usize>, what: &str) -> Result<()> {
    if let Some(n) = counts.get("lb") {
        bail!(
            "{n} {what} answered by the load balancer's own stack instead of a backend: the data \
             path did not forward them (passed to the kernel); answers {counts:?}"
        );
    }
    Ok(())
}

/// One connection to `dst` from `src`: it must reach a backend through the load balancer.
fn probe(client: &Netns, src: SocketAddr, dst: SocketAddr) -> Result<String> {
    let answer = spawn_in(client, move || ask_echo(src, dst, Duration::ZERO))
        .join()
        .map_err(|_| anyhow!("probe thread panicked"))?
        .with_context(|| format!("a first TCP connection {src} -> {dst}"))?;
    ensure_forwarded(
        &tally([answer.as_str()]),
        &format!("connection {src} -> {dst}"),
    )?;
    Ok(answer)
}

fn start_agent(topo: &LbTopology6, services: &str) -> Result<Agent> {
    let agent = topo
        .start_agent(&topo.config(services), &[])
        .context("starting xdplb with IPv6 VIPs (needs the agent's IPv6 services)")?;
    wait_all_serving(&agent, Duration::from_secs(10))?;
    Ok(agent)
}

fn stop_agent(agent: Agent) -> Result<()> {
    let log = agent.log.clone();
    let st = agent.stop();
    ensure!(
        st.success(),
        "xdplb exited with {st}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
    Ok(())
}

fn events(status: &serde_json::Value) -> String {
    status["flows"]["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .map(|e| format!("{}={}", e["event"].as_str().unwrap_or("?"), e["count"]))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

fn rebuilds(agent: &Agent) -> Result<u64> {
    let s = status_json(agent)?;
    s["table_rebuilds"]
        .as_u64()
        .ok_or_else(|| anyhow!("no table_rebuilds in the status: {s}"))
}

// ---- the harness alone ----

#[test]
fn harness_v6_hosts_reach_each_other_directly() -> Result<()> {
    if !require_privileges("harness_v6_hosts_reach_each_other_directly") {
        return Ok(());
    }
    let topo = LbTopology6::new(2)?;
    let (_servers, _lb) = echo_servers(&topo, 80);
    let _udp = udp_servers(&topo, VIP6.into(), 5353)?;
    let mut direct_udp = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        direct_udp.udp(&b.ns, (v6(i), 5353), &format!("b{}", i + 1))?;
    }
    let client = &topo.client.ns;

    // Client -> each backend's own IPv6 address: TCP (banner and echo) and UDP.
    for i in 0..2 {
        let src = SocketAddr::new(CLIENT6.into(), 20000 + i as u16);
        let dst = SocketAddr::new(v6(i), 80);
        let name = spawn_in(client, move || {
            ask_echo(src, dst, Duration::from_millis(50))
        })
        .join()
        .unwrap()
        .with_context(|| format!("TCP {src} -> {dst}"))?;
        ensure!(name == format!("b{}", i + 1), "{dst} answered {name}");
        let sock = udp_client(client, SocketAddr::new(CLIENT6.into(), 20100 + i as u16))?;
        let name =
            udp_ask(&sock, (v6(i), 5353), b"hello").with_context(|| format!("UDP to {}", v6(i)))?;
        ensure!(
            name == format!("b{}", i + 1),
            "UDP {} answered {name}",
            v6(i)
        );
    }
    // IPv4 still works on the same hosts.
    let v4 = spawn_in(client, || {
        ask_echo(
            SocketAddr::new(CLIENT_ADDR.into(), 20200),
            SocketAddr::new(topology::backend_addr(0).into(), 80),
            Duration::ZERO,
        )
    })
    .join()
    .unwrap()?;
    ensure!(v4 == "b1", "IPv4 to b1 answered {v4}");

    // Long-lived streams, verified byte by byte, straight to b1 and b2.
    let start = Instant::now();
    let streams: Vec<Stream> = (0..4)
        .map(|k| {
            Stream::open(
                client,
                SocketAddr::new(CLIENT6.into(), 20300 + k),
                SocketAddr::new(v6(usize::from(k % 2)), 80),
                Duration::from_millis(1),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let reports = finish_all(streams);
    assert_unbroken(&reports, start);
    assert_streams_moved(&reports, 10_000);

    // Without an agent, the VIP belongs to the load balancer on the wire: its own stack answers,
    // and the client resolved the VIP to the load balancer's MAC (backends hold it on lo only and
    // do not answer neighbour solicitations for it).
    let src = SocketAddr::new(CLIENT6.into(), 20400);
    let vip = SocketAddr::new(VIP6.into(), 80);
    let name = spawn_in(client, move || ask_echo(src, vip, Duration::ZERO))
        .join()
        .unwrap()?;
    ensure!(
        name == "lb",
        "the VIP without an agent answered {name}, not lb"
    );
    let neigh = client.ip(&["-6", "neigh", "show", &VIP6.to_string(), "dev", "eth0"])?;
    // The load balancer's own connections to backends (health checks) leave from its address,
    // not from the VIP it holds (see `Netns::add_host_addr`).
    for i in 0..2 {
        let route = topo
            .lb
            .ns
            .ip(&["-6", "route", "get", &backend6(i).to_string()])?;
        ensure!(
            route.contains(&format!("src {} ", topology6::LB6)),
            "the LB would reach {} from another source than {}: {route}",
            backend6(i),
            topology6::LB6
        );
    }
    let lb_mac = mac_text(topo.lb.mac);
    ensure!(
        neigh.contains(&lb_mac),
        "client's neighbour entry for {VIP6} is not the LB's {lb_mac}: {neigh:?}"
    );

    // Direct server return on the backends, without the load balancer: with a host route to the
    // VIP through b2, the client reaches b2's VIP on lo, and b2 answers from the VIP (TCP and UDP).
    client.ip(&[
        "-6",
        "route",
        "add",
        &format!("{VIP6}/128"),
        "via",
        &backend6(1).to_string(),
    ])?;
    let src = SocketAddr::new(CLIENT6.into(), 20500);
    let dsr = spawn_in(client, move || {
        ask_echo(src, vip, Duration::from_millis(20))
    })
    .join()
    .unwrap();
    let sock = udp_client(client, SocketAddr::new(CLIENT6.into(), 20501))?;
    let dsr_udp = udp_ask(&sock, (VIP6, 5353), b"hello");
    client.ip(&["-6", "route", "del", &format!("{VIP6}/128")])?;
    let dsr = dsr.context("TCP to the VIP routed through b2")?;
    ensure!(dsr == "b2", "VIP routed through b2 answered {dsr}");
    let dsr_udp = dsr_udp.context("UDP to the VIP routed through b2 (answer from the VIP)")?;
    ensure!(
        dsr_udp == "b2",
        "UDP to the VIP through b2 answered {dsr_udp}"
    );
    eprintln!(
        "harness: TCP and UDP client -> b1/b2 over IPv6, 4 direct streams {} bytes verified, \
         VIP on the LB ({neigh}), DSR through b2 answered {dsr}/{dsr_udp}",
        reports.iter().map(|r| r.bytes).sum::<u64>(),
        neigh = neigh.trim()
    );
    Ok(())
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---- through the load balancer ----

/// `web6`: TCP port 80 on the IPv6 VIP, table size 1009, with `backends` (index, weight).
fn web6(extra: &str, backends: &[(usize, u32)]) -> String {
    let b: Vec<(IpAddr, u32)> = backends.iter().map(|&(i, w)| (v6(i), w)).collect();
    vip_toml(
        "web6",
        VIP6.into(),
        80,
        "tcp",
        &format!("table_size = 1009\n{extra}"),
        &b,
    )
}

#[test]
fn fifty_v6_streams_survive_twenty_table_changes() -> Result<()> {
    if !require_privileges("fifty_v6_streams_survive_twenty_table_changes") {
        return Ok(());
    }
    let topo = LbTopology6::new(6)?;
    let (_servers, _lb) = echo_servers(&topo, 80);
    // The services; the config file is `topo.config(services)`.
    let services = |backends: &[(usize, u32)]| {
        format!("[flows]\nremove_grace = \"120s\"\n\n{}", web6("", backends))
    };
    let agent = start_agent(&topo, &services(&[(0, 1), (1, 1), (2, 1), (3, 1)]))?;
    let log = LogOnFailure::new(&agent);
    let dst = SocketAddr::new(VIP6.into(), 80);
    probe(&topo.client.ns, SocketAddr::new(CLIENT6.into(), 45999), dst)?;

    let ports: Vec<u16> = (46000..46050).collect();
    let start = Instant::now();
    let streams = open_streams_from(
        &topo.client.ns,
        CLIENT6.into(),
        &ports,
        dst,
        Duration::from_millis(10),
    );
    let on = tally(streams.iter().map(|s| s.backend.as_str()));
    eprintln!("50 IPv6 streams: {on:?}");
    ensure_forwarded(&on, "streams")?;
    ensure!(on.len() == 4, "50 streams not on all 4 backends: {on:?}");
    // Each stream is where the live table says.
    for s in &streams {
        let w = which_backend(&agent, &service6(80, "tcp"), &s.src.to_string())?;
        let want = w.and_then(backend_name);
        ensure!(
            want.as_deref() == Some(s.backend.as_str()),
            "stream {} on {}, which-backend says {w:?}",
            s.src,
            s.backend
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let rebuilds_before = rebuilds(&agent)?;

    let addr = |i: usize| backend6(i).to_string();
    let mut changes = 0;
    for i in [4, 5] {
        cli(&agent, &["backend", "add", "web6", &addr(i)])?;
        changes += 1;
        wait_status(
            &agent,
            "added backend in the table",
            Duration::from_secs(5),
            |s| serving(s, "web6", v6(i)),
        )?;
    }
    cli(&agent, &["backend", "drain", "web6", &addr(3)])?;
    std::thread::sleep(Duration::from_millis(300));
    cli(&agent, &["backend", "remove", "web6", &addr(3)])?;
    changes += 2;
    // Weight changes, each to a weight the backend does not have (so each one rebuilds).
    let live = [0, 1, 2, 4, 5];
    let mut weights = [1u32; 6];
    while changes < 19 {
        let i = live[changes % live.len()];
        weights[i] = weights[i] % 4 + 1;
        cli(
            &agent,
            &[
                "backend",
                "weight",
                "web6",
                &addr(i),
                &weights[i].to_string(),
            ],
        )?;
        changes += 1;
        std::thread::sleep(Duration::from_millis(150));
    }
    // Three reloads of a file with the live backends (b4 gone), each with other weights.
    for r in 0..3u32 {
        let ws: Vec<(usize, u32)> = live.iter().map(|&i| (i, (i as u32 + r) % 3 + 1)).collect();
        std::fs::write(topo.config_path(), topo.config(&services(&ws)))?;
        let out = cli(&agent, &["reload"])?;
        eprintln!("reload {r}: {}", out.trim());
        changes += 1;
        wait_status(&agent, "reload applied", Duration::from_secs(5), |s| {
            ws.iter().all(
                |&(i, w)| matches!(backend_json(s, "web6", v6(i)), Ok(Some(b)) if b["weight"] == w),
            )
        })?;
        std::thread::sleep(Duration::from_millis(150));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (answers, failures) = connect_many_from(&topo.client.ns, CLIENT6.into(), dst, 46500, 100);
    let reports = finish_all(streams);
    let status = status_json(&agent)?;
    let rebuilds = status["table_rebuilds"].as_u64().unwrap_or(0) - rebuilds_before;
    let counts = tally(answers.iter().map(String::as_str));
    eprintln!(
        "{changes} changes, {rebuilds} table rebuilds in {:?}; new connections after: {counts:?}, \
         {} failed; flow events: {}",
        start.elapsed(),
        failures.len(),
        events(&status)
    );
    report_streams(&reports);
    assert_unbroken(&reports, start);
    assert_streams_moved(&reports, 10_000);
    ensure!(rebuilds >= 20, "only {rebuilds} table rebuilds");
    ensure!(failures.is_empty(), "failed new connections: {failures:?}");
    ensure_forwarded(&counts, "new connections")?;
    ensure!(
        !counts.contains_key("b4"),
        "new connections reached the removed b4: {counts:?}"
    );
    ensure!(
        counts.contains_key("b5") && counts.contains_key("b6"),
        "no new connection on the added b5/b6: {counts:?}"
    );
    stop_agent(agent)?;
    log.passed();
    Ok(())
}

fn report_streams(reports: &[StreamReport]) {
    let mut per: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for r in reports {
        let e = per.entry(r.backend.as_str()).or_default();
        e.0 += 1;
        e.1 += r.bytes;
    }
    eprintln!("streams per backend (count, bytes verified): {per:?}");
}

/// Observed shares against weight shares; fails if one is off by more than `tolerance`.
fn check_spread(
    what: &str,
    counts: &BTreeMap<String, usize>,
    weights: &[(&str, u32)],
    tolerance: f64,
) -> Result<String> {
    let n: usize = counts.values().sum();
    let total_w: u32 = weights.iter().map(|w| w.1).sum();
    let mut line = Vec::new();
    let mut bad = Vec::new();
    for &(name, w) in weights {
        let got = *counts.get(name).unwrap_or(&0) as f64 / n as f64;
        let want = f64::from(w) / f64::from(total_w);
        line.push(format!("{name} {got:.3} (weight share {want:.3})"));
        if (got - want).abs() > tolerance {
            bad.push(name);
        }
    }
    let line = format!("{what}: {n} answers: {}", line.join(", "));
    ensure!(
        bad.is_empty(),
        "{line}: {bad:?} off by more than {tolerance}"
    );
    Ok(line)
}

#[test]
fn v6_connections_and_udp_follow_weights_and_which_backend() -> Result<()> {
    if !require_privileges("v6_connections_and_udp_follow_weights_and_which_backend") {
        return Ok(());
    }
    const N: u16 = 300;
    let topo = LbTopology6::new(3)?;
    let (_servers, _lb) = echo_servers(&topo, 80);
    let _udp = udp_servers(&topo, VIP6.into(), 5353)?;
    let weighted = [(0, 1), (1, 2), (2, 3)];
    let mut services = web6("", &weighted);
    let b: Vec<(IpAddr, u32)> = weighted.iter().map(|&(i, w)| (v6(i), w)).collect();
    services.push_str(&vip_toml(
        "dns6",
        VIP6.into(),
        5353,
        "udp",
        "table_size = 1009\n",
        &b,
    ));
    let agent = start_agent(&topo, &services)?;
    let log = LogOnFailure::new(&agent);
    let tcp_dst = SocketAddr::new(VIP6.into(), 80);
    let udp_dst = SocketAddr::new(VIP6.into(), 5353);
    probe(
        &topo.client.ns,
        SocketAddr::new(CLIENT6.into(), 29999),
        tcp_dst,
    )?;

    // N short TCP connections and N one-datagram UDP flows, each from its own source port.
    let started = Instant::now();
    let (tcp, udp) = spawn_in(&topo.client.ns, move || {
        let tcp: Vec<(u16, std::io::Result<String>)> = (30000..30000 + N)
            .map(|p| (p, ask_echo((CLIENT6, p), tcp_dst, Duration::ZERO)))
            .collect();
        let udp: Vec<(u16, Result<String>)> = (31000..31000 + N)
            .map(|p| {
                let answer = UdpSocket::bind((CLIENT6, p))
                    .map_err(anyhow::Error::from)
                    .and_then(|s| {
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        udp_ask(&s, udp_dst, format!("q{p}").as_bytes())
                    });
                (p, answer)
            })
            .collect();
        (tcp, udp)
    })
    .join()
    .map_err(|_| anyhow!("client thread panicked"))?;
    let traffic_time = started.elapsed();

    let mut failures = Vec::new();
    let mut mismatches = Vec::new();
    let mut counts = [BTreeMap::new(), BTreeMap::new()];
    let checked = Instant::now();
    for (k, (proto, results)) in [
        (
            "tcp",
            tcp.into_iter()
                .map(|(p, r)| (p, r.map_err(anyhow::Error::from)))
                .collect::<Vec<_>>(),
        ),
        ("udp", udp),
    ]
    .into_iter()
    .enumerate()
    {
        let port = if proto == "tcp" { 80 } else { 5353 };
        for (p, r) in results {
            let landed = match r {
                Ok(name) => name,
                Err(e) => {
                    failures.push(format!("{proto} from port {p}: {e:#}"));
                    continue;
                }
            };
            *counts[k].entry(landed.clone()).or_insert(0usize) += 1;
            let src = SocketAddr::new(CLIENT6.into(), p).to_string();
            let w = which_backend(&agent, &service6(port, proto), &src)?;
            let said = w.and_then(backend_name);
            if said.as_deref() != Some(landed.as_str()) {
                mismatches.push(format!(
                    "{proto} {src}: landed on {landed}, which-backend {w:?}"
                ));
            }
        }
    }
    let status = status_json(&agent)?;
    eprintln!(
        "{N} TCP connections and {N} UDP flows in {traffic_time:?}, {} which-backend checks in \
         {:?}; {} failed, {} not where which-backend said; TCP {:?}, UDP {:?}",
        2 * N as usize - failures.len(),
        checked.elapsed(),
        failures.len(),
        mismatches.len(),
        counts[0],
        counts[1]
    );
    for v in ["web6", "dns6"] {
        let vip = vip_json(&status, v)?;
        eprintln!(
            "status {v}: new_flows {} packets {}; per backend (address, slots, new_flows): {:?}",
            vip["new_flows"],
            vip["packets"],
            vip["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| format!("{} {} {}", b["address"], b["slots"], b["new_flows"]))
                .collect::<Vec<_>>()
        );
    }
    ensure_forwarded(&counts[0], "TCP connections")?;
    ensure_forwarded(&counts[1], "UDP flows")?;
    ensure!(
        failures.is_empty(),
        "{} failed: {failures:#?}",
        failures.len()
    );
    ensure!(
        mismatches.is_empty(),
        "{} of {} flows not where which-backend said: {mismatches:#?}",
        mismatches.len(),
        2 * N
    );
    let weights = [("b1", 1), ("b2", 2), ("b3", 3)];
    eprintln!("{}", check_spread("TCP", &counts[0], &weights, 0.1)?);
    eprintln!("{}", check_spread("UDP", &counts[1], &weights, 0.1)?);
    stop_agent(agent)?;
    log.passed();
    Ok(())
}

#[test]
fn v4_and_v6_vips_on_one_agent() -> Result<()> {
    if !require_privileges("v4_and_v6_vips_on_one_agent") {
        return Ok(());
    }
    let topo = LbTopology6::new(3)?;
    let (_servers, _lb) = echo_servers(&topo, 80);
    let _udp4 = udp_servers(&topo, topology::VIP.into(), 5353)?;
    let _udp6 = udp_servers(&topo, VIP6.into(), 5353)?;
    let all = [(0, 1), (1, 1), (2, 1)];
    let v4: Vec<(IpAddr, u32)> = (0..3)
        .map(|i| (topology::backend_addr(i).into(), 1))
        .collect();
    let v6s: Vec<(IpAddr, u32)> = (0..3).map(|i| (v6(i), 1)).collect();
    let services = [
        vip_toml(
            "web",
            topology::VIP.into(),
            80,
            "tcp",
            "table_size = 1009\n",
            &v4,
        ),
        web6("", &all),
        vip_toml(
            "dns",
            topology::VIP.into(),
            5353,
            "udp",
            "table_size = 1009\n",
            &v4,
        ),
        vip_toml(
            "dns6",
            VIP6.into(),
            5353,
            "udp",
            "table_size = 1009\n",
            &v6s,
        ),
    ]
    .concat();
    let agent = start_agent(&topo, &services)?;
    let log = LogOnFailure::new(&agent);
    let status = status_json(&agent)?;
    let names: Vec<&str> = status["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(names.len() == 4, "VIPs in the status: {names:?}");
    let dst4 = SocketAddr::new(topology::VIP.into(), 80);
    let dst6 = SocketAddr::new(VIP6.into(), 80);
    let c4: IpAddr = CLIENT_ADDR.into();
    let c6: IpAddr = CLIENT6.into();
    probe(&topo.client.ns, SocketAddr::new(c4, 47999), dst4)?;
    probe(&topo.client.ns, SocketAddr::new(c6, 47999), dst6)?;

    // Streams of both families at once, verified byte by byte.
    let ports: Vec<u16> = (47000..47012).collect();
    let start = Instant::now();
    let mut streams =
        open_streams_from(&topo.client.ns, c4, &ports, dst4, Duration::from_millis(5));
    streams.extend(open_streams_from(
        &topo.client.ns,
        c6,
        &ports,
        dst6,
        Duration::from_millis(5),
    ));
    let per_family = |streams: &[Stream], ipv6: bool| {
        tally(
            streams
                .iter()
                .filter(|s| s.src.is_ipv6() == ipv6)
                .map(|s| s.backend.as_str()),
        )
    };
    eprintln!(
        "streams: IPv4 {:?}, IPv6 {:?}",
        per_family(&streams, false),
        per_family(&streams, true)
    );

    // New connections and UDP flows of both families, each where which-backend says.
    let mut lines = Vec::new();
    for (family, src_ip, dst, udp_vip) in [
        ("IPv4", c4, dst4, IpAddr::from(topology::VIP)),
        ("IPv6", c6, dst6, IpAddr::from(VIP6)),
    ] {
        let (answers, failures) = connect_many_from(&topo.client.ns, src_ip, dst, 48000, 100);
        let tcp = tally(answers.iter().map(String::as_str));
        ensure!(failures.is_empty(), "{family}: {failures:?}");
        ensure_forwarded(&tcp, &format!("{family} connections"))?;
        ensure!(
            tcp.len() == 3,
            "{family} connections not on all 3 backends: {tcp:?}"
        );
        let mut udp = Vec::new();
        for p in 48200..48230u16 {
            let sock = udp_client(&topo.client.ns, SocketAddr::new(src_ip, p))?;
            let a = udp_ask(&sock, SocketAddr::new(udp_vip, 5353), b"q")
                .with_context(|| format!("{family} UDP from port {p}"))?;
            let svc = SocketAddr::new(udp_vip, 5353).to_string() + "/udp";
            let w = which_backend(&agent, &svc, &SocketAddr::new(src_ip, p).to_string())?;
            ensure!(
                w.and_then(backend_name).as_deref() == Some(a.as_str()),
                "{family} UDP from port {p} answered by {a}, which-backend says {w:?}"
            );
            udp.push(a);
        }
        let udp = tally(udp.iter().map(String::as_str));
        ensure_forwarded(&udp, &format!("{family} UDP flows"))?;
        lines.push(format!("{family}: TCP {tcp:?}, UDP {udp:?}"));
    }
    eprintln!("before the drain: {}", lines.join("; "));

    // Drain b1 in the IPv6 service only: new IPv6 connections avoid it, IPv4 ones still reach it,
    // and the streams of both families (b1's included) go on.
    let b1_6 = backend6(0).to_string();
    cli(&agent, &["backend", "drain", "web6", &b1_6])?;
    wait_status(
        &agent,
        "b1 drained in web6 only",
        Duration::from_secs(3),
        |s| {
            let drained = matches!(backend_json(s, "web6", v6(0)), Ok(Some(b))
            if b["state"] == "draining" && b["in_table"] == false);
            drained && serving(s, "web", topology::backend_addr(0).into())
        },
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let (a4, f4) = connect_many_from(&topo.client.ns, c4, dst4, 49000, 100);
    let (a6, f6) = connect_many_from(&topo.client.ns, c6, dst6, 49000, 100);
    std::thread::sleep(Duration::from_millis(500));
    let reports = finish_all(streams);
    let status = status_json(&agent)?;
    let (t4, t6) = (
        tally(a4.iter().map(String::as_str)),
        tally(a6.iter().map(String::as_str)),
    );
    eprintln!(
        "after draining b1 in web6: IPv4 connections {t4:?}, IPv6 connections {t6:?}; flow \
         events: {}",
        events(&status)
    );
    report_streams(&reports);
    assert_unbroken(&reports, start);
    assert_streams_moved(&reports, 10_000);
    ensure!(f4.is_empty() && f6.is_empty(), "failed: {f4:?} {f6:?}");
    ensure!(
        !t6.contains_key("b1"),
        "new IPv6 connections reached the drained b1: {t6:?}"
    );
    ensure!(
        t4.contains_key("b1"),
        "the IPv4 VIP lost b1 with the IPv6 drain: {t4:?}"
    );
    stop_agent(agent)?;
    log.passed();
    Ok(())
}
