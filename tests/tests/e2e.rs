//! End to end: the real `xdplb run` process in a network namespace, the program in driver mode on
//! veth, real TCP and UDP traffic from a client namespace to three backends on one bridge (see
//! `lb_tests::topology` for the topology and why it is built that way).

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use lb_tests::{
    netns::require_privileges,
    packet::Packet,
    topology::{
        CLIENT_ADDR, IdentityServers, LB_ADDR, LbTopology, VIP, backend_addr, send_frames, tally,
        tcp_ask, udp_ask, udp_client, wait_for_log,
    },
};

/// Weights of the web service: b1 1, b2 2, b3 3.
const WEB_WEIGHTS: [u32; 3] = [1, 2, 3];
/// Connections to the web service. Each uses a distinct, fixed client port, so the outcome is
/// deterministic and every answer can be checked against `which-backend`.
const WEB_CONNECTIONS: u16 = 600;
/// Allowed distance between a backend's share of the connections and its weight share. With 600
/// flows hashed uniformly, one standard deviation of a share is at most 0.021 (at p = 0.5); 0.07
/// is more than 3 standard deviations. The flows are fixed, so the result does not vary between
/// runs; the bound only has to hold for the hash.
const SHARE_TOLERANCE: f64 = 0.07;

fn services() -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n"
    ));
    for (i, w) in WEB_WEIGHTS.iter().enumerate() {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n\n",
            backend_addr(i)
        ));
    }
    // b3 at weight 0: it must get no connection on this service.
    s.push_str(&format!(
        "[[vip]]\nname = \"alt\"\naddress = \"{VIP}\"\nport = 8080\nprotocol = \"tcp\"\n\n\
         [[vip.backend]]\naddress = \"{}\"\n\n[[vip.backend]]\naddress = \"{}\"\n\n\
         [[vip.backend]]\naddress = \"{}\"\nweight = 0\n\n",
        backend_addr(0),
        backend_addr(1),
        backend_addr(2)
    ));
    s.push_str(&format!(
        "[[vip]]\nname = \"dns\"\naddress = \"{VIP}\"\nport = 5353\nprotocol = \"udp\"\n\n"
    ));
    for i in 0..3 {
        s.push_str(&format!(
            "[[vip.backend]]\naddress = \"{}\"\n\n",
            backend_addr(i)
        ));
    }
    s
}

#[test]
fn load_balances_real_traffic() {
    if !require_privileges("load_balances_real_traffic") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let mut servers = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let name = format!("b{}", i + 1);
        for port in [80, 8080] {
            servers
                .tcp(&b.ns, SocketAddrV4::new([0, 0, 0, 0].into(), port), &name)
                .unwrap();
        }
        servers
            .udp(&b.ns, SocketAddrV4::new(VIP, 5353), &name)
            .unwrap();
    }
    // The LB's own stack: its address, and the VIP on a port that is not a service.
    for port in [80, 2222] {
        servers
            .tcp(
                &topo.lb.ns,
                SocketAddrV4::new([0, 0, 0, 0].into(), port),
                "lb",
            )
            .unwrap();
    }
    let agent = topo
        .start_agent(&topo.config(&services()), &[])
        .expect("agent starts");
    let status = agent.status().unwrap();
    assert_eq!(status.xdp_mode.as_deref(), Some("driver"), "{status:?}");

    // 1. Web: every connection answered, by the backend which-backend names.
    let started = Instant::now();
    let mut answers = Vec::new();
    let mut errors = Vec::new();
    let mut mismatches = Vec::new();
    for i in 0..WEB_CONNECTIONS {
        let src = SocketAddrV4::new(CLIENT_ADDR, 20000 + i);
        match tcp_ask(&topo.client.ns, Some(src), SocketAddrV4::new(VIP, 80)) {
            Ok(name) => {
                let predicted = agent.which(&format!("{VIP}:80/tcp"), src).unwrap();
                let expected_name = predicted.backend.as_deref().map(|a| {
                    let idx = (0..3).find(|&j| backend_addr(j).to_string() == a).unwrap();
                    format!("b{}", idx + 1)
                });
                if expected_name.as_deref() != Some(name.as_str()) {
                    mismatches.push(format!(
                        "{src}: answered by {name}, predicted {predicted:?}"
                    ));
                }
                answers.push(name);
            }
            Err(e) => errors.push(format!("{src}: {e:#}")),
        }
    }
    eprintln!(
        "{WEB_CONNECTIONS} web connections in {:?}",
        started.elapsed()
    );
    assert!(
        errors.is_empty(),
        "{} of {WEB_CONNECTIONS} connections failed: {:?}\nagent log:\n{}",
        errors.len(),
        &errors[..errors.len().min(10)],
        agent.log_text()
    );
    assert!(
        mismatches.is_empty(),
        "kernel and which-backend disagree: {mismatches:?}"
    );
    let counts = tally(answers.iter().map(String::as_str));
    eprintln!("web split (weights 1:2:3): {counts:?}");
    let total_weight: u32 = WEB_WEIGHTS.iter().sum();
    for (i, w) in WEB_WEIGHTS.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let share = counts.get(&name).copied().unwrap_or(0) as f64 / WEB_CONNECTIONS as f64;
        let expected = *w as f64 / total_weight as f64;
        assert!(
            (share - expected).abs() <= SHARE_TOLERANCE,
            "{name}: share {share:.3}, weight share {expected:.3} (tolerance {SHARE_TOLERANCE}); \
             split {counts:?}"
        );
    }

    // 2. Weight 0 gets no new connections.
    let alt: Vec<String> = (0..200u16)
        .map(|i| {
            tcp_ask(
                &topo.client.ns,
                Some(SocketAddrV4::new(CLIENT_ADDR, 30000 + i)),
                SocketAddrV4::new(VIP, 8080),
            )
            .expect("alt connection")
        })
        .collect();
    let alt_counts = tally(alt.iter().map(String::as_str));
    eprintln!("alt split (weights 1:1:0): {alt_counts:?}");
    assert_eq!(
        alt_counts.get("b3"),
        None,
        "weight-0 backend got connections"
    );
    assert!(alt_counts.get("b1").copied().unwrap_or(0) > 50);
    assert!(alt_counts.get("b2").copied().unwrap_or(0) > 50);

    // 3. A long UDP flow stays on one backend, the one which-backend names.
    let src = SocketAddrV4::new(CLIENT_ADDR, 40053);
    let sock = udp_client(&topo.client.ns, src).unwrap();
    let udp: Vec<String> = (0..300)
        .map(|i| {
            udp_ask(
                &sock,
                SocketAddrV4::new(VIP, 5353),
                format!("q{i}").as_bytes(),
            )
            .expect("UDP answer")
        })
        .collect();
    let udp_counts = tally(udp.iter().map(String::as_str));
    assert_eq!(
        udp_counts.len(),
        1,
        "UDP flow moved between backends: {udp_counts:?}"
    );
    let predicted = agent.which(&format!("{VIP}:5353/udp"), src).unwrap();
    let b = predicted.backend.expect("a backend");
    let idx = (0..3).find(|&j| backend_addr(j).to_string() == b).unwrap();
    assert_eq!(udp[0], format!("b{}", idx + 1));

    // 4. Not for a VIP: the LB's own stack answers.
    assert_eq!(
        tcp_ask(&topo.client.ns, None, SocketAddrV4::new(LB_ADDR, 80)).unwrap(),
        "lb",
        "traffic to the load balancer's own address"
    );
    assert_eq!(
        tcp_ask(&topo.client.ns, None, SocketAddrV4::new(VIP, 2222)).unwrap(),
        "lb",
        "traffic to the VIP on a port that is not a service"
    );
    // Pings to the VIP reach the load balancer's stack as "not TCP/UDP"; pings to its own
    // address never get past the VIP address filter ("not for a VIP").
    for (target, what) in [(VIP, "ping the VIP"), (LB_ADDR, "ping the load balancer")] {
        topo.client
            .ns
            .exec(
                "ping",
                &["-c", "3", "-i", "0.2", "-W", "1", &target.to_string()],
            )
            .expect(what);
    }

    // 5. Counters read back from the data path.
    let status = agent.status().unwrap();
    let by_name: BTreeMap<&str, _> = status.vips.iter().map(|v| (v.name.as_str(), v)).collect();
    let web = by_name["web"];
    // At least SYN, ACK, FIN/ACK per connection went through the load balancer.
    assert!(
        web.packets >= 3 * WEB_CONNECTIONS as u64,
        "web forwarded only {} packets",
        web.packets
    );
    let per_backend: u64 = web.backends.iter().map(|b| b.packets).sum();
    assert_eq!(
        per_backend, web.packets,
        "backend counters add up to the VIP's"
    );
    assert!(by_name["dns"].packets >= 300);
    // The same counters, as Prometheus scrapes them (nothing is sent to a VIP in between).
    let metrics = agent.metrics().unwrap();
    let service = format!("{}:{}/{}", web.address, web.port, web.protocol);
    for line in [
        format!(
            "xdplb_vip_packets_total{{vip=\"web\",service=\"{service}\"}} {}",
            web.packets
        ),
        format!(
            "xdplb_backend_packets_total{{vip=\"web\",service=\"{service}\",backend=\"{}\"}} {}",
            web.backends[0].address, web.backends[0].packets
        ),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "metrics lack {line}:\n{metrics}"
        );
    }
    assert_eq!(by_name["alt"].backends[2].packets, 0);
    let reason = |n: &str| {
        status
            .reasons
            .iter()
            .find(|r| r.reason == n)
            .unwrap()
            .packets
    };
    assert!(
        reason("pass_not_vip") > 0,
        "LB's own traffic counted as passed"
    );
    assert!(
        reason("pass_ip_proto") >= 3,
        "pings to the VIP counted as passed"
    );
    assert!(reason("pass_not_ip") > 0, "ARP counted as passed");
    for r in [
        "drop_malformed_ip",
        "drop_malformed_l4",
        "drop_no_backend",
        "drop_internal",
    ] {
        assert_eq!(reason(r), 0, "{r}");
    }

    // 6. A clean stop detaches the program.
    let st = agent.stop();
    assert!(st.success(), "xdplb exited with {st}");
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(
        !link.contains("prog/xdp"),
        "program still attached:\n{link}"
    );
    // With the program gone, the VIP's port 80 is the LB's own stack again.
    assert_eq!(
        tcp_ask(&topo.client.ns, None, SocketAddrV4::new(VIP, 80)).unwrap(),
        "lb",
        "after detach, traffic to the VIP reaches the load balancer's own stack"
    );
}

/// Malformed and unusual frames sent on the wire are counted under their reason, and the data
/// path's diagnostics reach the agent's log at the level the operator sets at run time.
#[test]
fn wire_drops_and_diagnostics() {
    if !require_privileges("wire_drops_and_diagnostics") {
        return;
    }
    let topo = LbTopology::new(1).expect("topology");
    let agent = topo
        .start_agent(
            &topo.config(&format!(
                "[[vip]]\naddress = \"{VIP}\"\nport = 5353\nprotocol = \"udp\"\n\n\
                 [[vip.backend]]\naddress = \"{}\"\n",
                backend_addr(0)
            )),
            &[],
        )
        .expect("agent starts");
    let (lb_mac, client_mac) = (topo.lb.mac, topo.client.mac);
    let udp = Packet::udp(
        SocketAddrV4::new(CLIENT_ADDR, 5000),
        SocketAddrV4::new(VIP, 5353),
    )
    .payload(&[7; 32])
    .macs(lb_mac, client_mac);
    let fragments = vec![
        udp.clone().frags(0x2000).frame(),
        udp.clone().frags(4).frame(),
    ];
    let truncated_ip = udp.frame()[..14 + 10].to_vec();
    let reason = |n: &str| {
        agent
            .status()
            .unwrap()
            .reasons
            .iter()
            .find(|r| r.reason == n)
            .unwrap()
            .packets
    };

    // Fragments to a VIP address: dropped, counted, logged at info (the default level).
    send_frames(&topo.client.ns, topo.client.ifindex, fragments).unwrap();
    assert!(
        wait_for_log(
            &agent,
            "fragment to vip address 10.0.0.100 dropped",
            Duration::from_secs(5)
        ),
        "fragment diagnostic missing from the agent log:\n{}",
        agent.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while reason("drop_fragment") < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reason("drop_fragment"), 2);

    // Malformed IP: counted, but logged only at debug, which is off until the operator asks.
    send_frames(
        &topo.client.ns,
        topo.client.ifindex,
        vec![truncated_ip.clone()],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reason("drop_malformed_ip") < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(reason("drop_malformed_ip"), 1);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !agent.log_text().contains("malformed IP header dropped"),
        "debug diagnostic logged at info level"
    );
    let out = std::process::Command::new(lb_tests::topology::xdplb_bin())
        .args([
            "--socket",
            agent.socket.to_str().unwrap(),
            "log-level",
            "debug",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent.status().unwrap().log_level, "debug");
    send_frames(&topo.client.ns, topo.client.ifindex, vec![truncated_ip]).unwrap();
    assert!(
        wait_for_log(
            &agent,
            "malformed IP header dropped",
            Duration::from_secs(5)
        ),
        "debug diagnostic missing after raising the level:\n{}",
        agent.log_text()
    );
    assert_eq!(reason("drop_malformed_ip"), 2);
    assert!(agent.stop().success());
}
