//! Agent life cycle on real traffic: restart without stopping forwarding, backends whose MAC
//! changes or never resolves.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_tests::{
    netns::require_privileges,
    streams::{EchoServer, Stream, assert_unbroken, echo_each},
    topology::{
        Agent, CLIENT_ADDR, IdentityServers, LbTopology, RemoveDir, Traffic, TrafficReport, VIP,
        backend_addr, tally, tcp_ask, wait_for_log,
    },
};
use lb_userspace::dataplane::pin_dir;

fn web(backends: &[Ipv4Addr]) -> String {
    let mut s =
        format!("[[vip]]\nname = \"web\"\naddress = \"{VIP}\"\nport = 80\nprotocol = \"tcp\"\n\n");
    for b in backends {
        s.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n\n"));
    }
    s
}

fn serve(topo: &LbTopology) -> IdentityServers {
    let mut servers = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        servers
            .tcp(
                &b.ns,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
                &format!("b{}", i + 1),
            )
            .unwrap();
    }
    // The LB's own stack also listens on 80: if the program were not forwarding, it would answer.
    servers
        .tcp(
            &topo.lb.ns,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 80),
            "lb",
        )
        .unwrap();
    servers
}

/// New connections to the web service, one after another, until finished.
fn web_traffic(topo: &LbTopology) -> Traffic {
    Traffic::start(
        &topo.client.ns,
        CLIENT_ADDR,
        40000,
        SocketAddrV4::new(VIP, 80),
    )
    .unwrap()
}

/// `n` connections from fixed source ports; returns the answers or panics on any failure.
fn connect_many(topo: &LbTopology, first_port: u16, n: u16) -> Vec<String> {
    (0..n)
        .map(|i| {
            let src = SocketAddrV4::new(CLIENT_ADDR, first_port + i);
            tcp_ask(&topo.client.ns, Some(src), SocketAddrV4::new(VIP, 80))
                .unwrap_or_else(|e| panic!("connection from {src} failed: {e:#}"))
        })
        .collect()
}

#[test]
fn keep_forwarding_then_take_over() {
    if !require_privileges("keep_forwarding_then_take_over") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let _servers = serve(&topo);
    let pins = topo.lb.ns.run_in(|| pin_dir("eth0"));
    // The namespace's whole pin directory, whatever happens to the test.
    let _cleanup = RemoveDir(pins.parent().unwrap().to_path_buf());
    let cfg = topo.config(&web(&[backend_addr(0), backend_addr(1), backend_addr(2)]));

    let first = topo.start_agent(&cfg, &["--keep-forwarding"]).unwrap();
    let before = connect_many(&topo, 21000, 150);
    // New connections keep flowing through the stop, the time without agent and the takeover.
    let traffic = web_traffic(&topo);
    std::thread::sleep(Duration::from_millis(300));
    let st = first.stop();
    assert!(st.success(), "first agent exited with {st}");
    assert!(
        pins.join("link").exists(),
        "link not pinned at {}",
        pins.display()
    );
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(
        link.contains("prog/xdp"),
        "program detached although kept:\n{link}"
    );

    // No agent: the data path keeps forwarding, flows keep their backends.
    let alone = connect_many(&topo, 21000, 150);
    assert_eq!(alone, before, "flows moved while no agent ran");
    assert!(
        !alone.iter().any(|a| a == "lb"),
        "traffic fell through to the LB's stack"
    );

    // A new agent takes the data path over with an atomic program swap; flows stay put.
    let second = topo.start_agent(&cfg, &[]).unwrap();
    assert!(
        wait_for_log(&second, "took over the data path", Duration::from_secs(5)),
        "{}",
        second.log_text()
    );
    assert_eq!(second.status().unwrap().xdp_mode.as_deref(), Some("driver"));
    // The running agent keeps its link pinned, so that even its crash would not stop
    // forwarding.
    assert!(
        pins.join("link").exists(),
        "the new agent's link is not pinned at {}",
        pins.display()
    );
    let after = connect_many(&topo, 21000, 150);
    assert_eq!(after, before, "flows moved across the takeover");
    let during = traffic.finish();
    eprintln!(
        "{} connections during stop, no-agent time and takeover, {} failed",
        during.answers.len(),
        during.failures.len()
    );
    assert!(during.failures.is_empty(), "{:?}", during.failures);
    assert!(
        during.answers.len() > 50,
        "too little traffic to mean anything"
    );
    assert!(
        !during.answers.iter().any(|a| a == "lb"),
        "fell through to the LB's stack"
    );
    let st = second.stop();
    assert!(st.success());
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(
        !link.contains("prog/xdp"),
        "still attached after a normal stop:\n{link}"
    );
    assert!(!pins.exists(), "pins left behind by a normal stop");
    assert!(
        !pins.parent().unwrap().exists(),
        "empty namespace pin directory left behind"
    );
}

#[test]
fn backend_mac_change_and_unresolvable_backend() {
    if !require_privileges("backend_mac_change_and_unresolvable_backend") {
        return;
    }
    let topo = LbTopology::new(2).expect("topology");
    let _servers = serve(&topo);
    let ghost = Ipv4Addr::new(10, 0, 0, 99);
    let started = Instant::now();
    let agent = topo
        .start_agent(
            &topo.config(&web(&[backend_addr(0), backend_addr(1), ghost])),
            &["--mac-wait", "1"],
        )
        .unwrap();
    eprintln!("agent forwarding after {:?}", started.elapsed());
    assert!(
        wait_for_log(
            &agent,
            "no MAC yet for backend(s) 10.0.0.99",
            Duration::from_secs(2)
        ),
        "{}",
        agent.log_text()
    );

    // The unresolvable backend is listed but holds no slot; nobody's traffic goes there.
    let status = agent.status().unwrap();
    let vip = &status.vips[0];
    let g = vip
        .backends
        .iter()
        .find(|b| b.address == "10.0.0.99")
        .unwrap();
    assert_eq!((g.state.as_str(), g.slots), ("unresolved", 0));
    assert_eq!(vip.usable_backends, 2);
    let answers = connect_many(&topo, 22000, 100);
    let counts = tally(answers.iter().map(String::as_str));
    assert_eq!(counts.len(), 2, "{counts:?}");

    // b2 gets a new MAC and announces itself (its ARP request for the LB updates the LB's
    // neighbour entry). The agent follows; no connection fails (one sent to the old MAC in
    // between is retransmitted).
    let traffic = web_traffic(&topo);
    std::thread::sleep(Duration::from_millis(200));
    let b2 = &topo.backends[1];
    let new_mac = "02:00:00:00:aa:02";
    b2.ns
        .ip(&["link", "set", "eth0", "address", new_mac])
        .unwrap();
    b2.ns.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    b2.ns
        .exec("ping", &["-c", "1", "-W", "1", "10.0.0.2"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = agent.status().unwrap();
        let mac = s.vips[0].backends[1].mac.clone();
        if mac.as_deref() == Some(new_mac) {
            break;
        }
        assert!(Instant::now() < deadline, "agent still has {mac:?} for b2");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(wait_for_log(
        &agent,
        "backend MAC changed",
        Duration::from_secs(1)
    ));
    let during = traffic.finish();
    assert!(during.failures.is_empty(), "{:?}", during.failures);
    assert!(
        during.answers.iter().any(|a| a == "b2"),
        "no connection reached b2 around its MAC change"
    );
    let answers = connect_many(&topo, 23000, 100);
    let counts = tally(answers.iter().map(String::as_str));
    assert!(
        counts.get("b2").copied().unwrap_or(0) > 20,
        "b2 after its MAC change: {counts:?}"
    );
    assert!(agent.stop().success());
}

/// Starts `xdplb run` with `config` in `ns`; its output goes to `<dir>/<name>.log`.
fn spawn_agent(
    ns: &lb_tests::netns::Netns,
    dir: &std::path::Path,
    name: &str,
    config: &str,
) -> (lb_tests::netns::ChildGuard, std::path::PathBuf) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = ns.command(lb_tests::topology::xdplb_bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    (lb_tests::netns::ChildGuard::spawn(&mut cmd).unwrap(), log)
}

/// Runs an agent expected to stop on its own; returns its exit status and output.
fn run_to_exit(
    ns: &lb_tests::netns::Netns,
    dir: &std::path::Path,
    config: &str,
) -> (std::process::ExitStatus, String) {
    let (mut guard, log) = spawn_agent(ns, dir, "once", config);
    let st = guard
        .wait_timeout(Duration::from_secs(20))
        .unwrap()
        .expect("xdplb should have exited");
    (st, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn refuses_a_foreign_xdp_program_and_a_second_agent() {
    if !require_privileges("refuses_a_foreign_xdp_program_and_a_second_agent") {
        return;
    }
    let topo = LbTopology::new(1).expect("topology");
    let _servers = serve(&topo);
    let cfg = topo.config(&web(&[backend_addr(0)]));

    // Someone else's XDP program on the interface: the agent refuses and leaves it alone.
    let foreign = lb_tests::topology::attach_pass(&topo.lb.ns, topo.lb.ifindex).unwrap();
    let (st, log) = run_to_exit(&topo.lb.ns, topo.dir.path(), &cfg);
    assert!(!st.success());
    assert!(
        log.contains("already has an XDP program attached (program id"),
        "{log}"
    );
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(
        link.contains("name xdp_pass"),
        "foreign program was touched:\n{link}"
    );
    drop(foreign);

    // A second agent with the same API socket refuses before touching anything; the first one
    // keeps forwarding.
    let agent = topo.start_agent(&cfg, &[]).unwrap();
    let (st, log) = run_to_exit(&topo.lb.ns, topo.dir.path(), &cfg);
    assert!(!st.success());
    assert!(
        log.contains("another xdplb agent is already running"),
        "{log}"
    );
    assert_eq!(connect_many(&topo, 24000, 20), vec!["b1".to_string(); 20]);
    assert!(agent.status().is_ok(), "first agent's API gone");
    assert!(agent.stop().success());
}

#[test]
fn auto_mode_falls_back_to_generic() {
    if !require_privileges("auto_mode_falls_back_to_generic") {
        return;
    }
    // A bridge has no native XDP support: driver mode fails, auto falls back to generic.
    let ns = lb_tests::netns::Netns::new("auto").unwrap();
    ns.ip(&["link", "add", "br-x", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "br-x", "up"]).unwrap();
    let dir = lb_tests::topology::TempDir::new("auto").unwrap();
    let sock = dir.path().join("x.sock");
    let (mut guard, log) = spawn_agent(
        &ns,
        dir.path(),
        "auto",
        &format!(
            "[dataplane]\ninterface = \"br-x\"\nxdp_mode = \"auto\"\n[api]\nsocket = \"{}\"\n",
            sock.display()
        ),
    );
    let client = lb_userspace::api::Client::new(&sock);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(s) = rt.block_on(client.status()) {
            break s;
        }
        assert!(
            guard.wait_timeout(Duration::ZERO).unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(Instant::now() < deadline, "agent never answered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.xdp_mode.as_deref(), Some("generic"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("falling back to generic mode"), "{text}");
    assert!(guard.terminate(Duration::from_secs(10)).success());
}

/// Polls the agent's status until `pred` holds for the service's backends.
fn wait_backends(
    agent: &Agent,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[lb_userspace::status::BackendStatus]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = agent.status().unwrap();
        if pred(&s.vips[0].backends) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {timeout:?}: {:#?}\n{}",
            s.vips[0].backends,
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn backend_lost_and_back_rebuilds_the_table() {
    if !require_privileges("backend_lost_and_back_rebuilds_the_table") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let _servers = serve(&topo);
    let agent = topo
        .start_agent(
            &topo.config(&web(&[backend_addr(0), backend_addr(1), backend_addr(2)])),
            &[],
        )
        .unwrap();
    let all = tally(connect_many(&topo, 25000, 150).iter().map(String::as_str));
    assert_eq!(all.len(), 3, "{all:?}");

    // b2 disappears from the network; once its neighbour entry fails, the table is rebuilt
    // without it and every new connection goes to b1 or b3.
    let b2 = &topo.backends[1];
    b2.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    topo.lb
        .ns
        .ip(&["neigh", "del", &backend_addr(1).to_string(), "dev", "eth0"])
        .unwrap();
    let t = Instant::now();
    wait_backends(
        &agent,
        "b2 out of the table",
        Duration::from_secs(15),
        |b| b[1].state == "unresolved" && b[1].slots == 0,
    );
    eprintln!("b2 out of the table after {:?}", t.elapsed());
    assert!(wait_for_log(
        &agent,
        "backend MAC lost",
        Duration::from_secs(1)
    ));
    let without = tally(connect_many(&topo, 26000, 150).iter().map(String::as_str));
    assert_eq!(without.get("b2"), None, "{without:?}");
    assert_eq!(without.len(), 2, "{without:?}");

    // Back on the network: it rejoins without operator action.
    b2.ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    let t = Instant::now();
    wait_backends(
        &agent,
        "b2 back in the table",
        Duration::from_secs(20),
        |b| b[1].state == "up" && b[1].slots > 0,
    );
    eprintln!("b2 back in the table after {:?}", t.elapsed());
    let again = tally(connect_many(&topo, 25000, 150).iter().map(String::as_str));
    assert_eq!(
        again, all,
        "same flows, same backends once the same backends are up"
    );
    assert!(agent.status().unwrap().table_rebuilds >= 3);
    assert!(agent.stop().success());
}

/// The web service plus an echo service on port 7000, both over `backends`.
fn web_and_echo(backends: &[Ipv4Addr]) -> String {
    let mut services = web(backends);
    services.push_str(&format!(
        "[[vip]]\nname = \"echo\"\naddress = \"{VIP}\"\nport = 7000\nprotocol = \"tcp\"\n\n"
    ));
    for b in backends {
        services.push_str(&format!("[[vip.backend]]\naddress = \"{b}\"\n\n"));
    }
    services
}

/// What the kill and the replacement tests share: three backends behind a web and an echo service,
/// and the pin directory the agent leaves behind, removed at the end whatever happens.
// Field order is drop order: the pins go before the topology, as they would in a test's locals.
struct Scene {
    cfg: String,
    _cleanup: RemoveDir,
    pins: std::path::PathBuf,
    _echo: Vec<EchoServer>,
    _servers: IdentityServers,
    topo: LbTopology,
}

/// Load under way while one agent hands over to another: the web flows made before it, a long
/// stream through the echo service and a loop of new web connections.
struct Load {
    before: Vec<String>,
    start: Instant,
    stream: Stream,
    traffic: Traffic,
}

impl Scene {
    fn new() -> Scene {
        let topo = LbTopology::new(3).expect("topology");
        let servers = serve(&topo);
        let echo = echo_each(&topo.backends, 7000);
        let pins = topo.lb.ns.run_in(|| pin_dir("eth0"));
        let cleanup = RemoveDir(pins.parent().unwrap().to_path_buf());
        Scene {
            cfg: topo.config(&web_and_echo(&[
                backend_addr(0),
                backend_addr(1),
                backend_addr(2),
            ])),
            _cleanup: cleanup,
            pins,
            _echo: echo,
            _servers: servers,
            topo,
        }
    }

    /// Starts the [`Load`] against the running agent: 100 web flows from source ports 23000..,
    /// then the stream and the loop, given time to get going.
    fn load(&self) -> Load {
        let before = connect_many(&self.topo, 23000, 100);
        let start = Instant::now();
        let stream = Stream::open(
            &self.topo.client.ns,
            SocketAddrV4::new(CLIENT_ADDR, 45000),
            SocketAddrV4::new(VIP, 7000),
            Duration::from_millis(1),
        );
        let traffic = web_traffic(&self.topo);
        std::thread::sleep(Duration::from_millis(300));
        Load {
            before,
            start,
            stream,
            traffic,
        }
    }

    /// Ends the test once `agent` has taken over from the one before it through `what`. Changing
    /// a weight shows the data path is `agent`'s to manage now, not just still running; the load
    /// must have come through whole, and a normal stop must leave no pins. Returns the traffic
    /// loop's report for the test's own checks.
    fn finish_and_check(&self, agent: Agent, load: Load, what: &str) -> TrafficReport {
        let out = agent
            .cli(&[
                "backend",
                "weight",
                "web",
                &backend_addr(0).to_string(),
                "3",
            ])
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_millis(500));
        let during = load.traffic.finish();
        let report = load.stream.finish();
        eprintln!(
            "{} connections through {what}, {} failed; stream {} bytes verified",
            during.answers.len(),
            during.failures.len(),
            report.bytes
        );
        assert!(during.failures.is_empty(), "{:?}", during.failures);
        assert!(
            !during.answers.iter().any(|a| a == "lb"),
            "fell through to the LB's stack"
        );
        assert_unbroken(&[report], load.start);
        let after = tally(
            connect_many(&self.topo, 24000, 150)
                .iter()
                .map(String::as_str),
        );
        assert!(
            after.get("b1").copied().unwrap_or(0) > 50,
            "weight 3 not applied: {after:?}"
        );
        let st = agent.stop();
        assert!(st.success());
        assert!(!self.pins.exists(), "pins left behind by a normal stop");
        during
    }
}

/// Asserts that `agent`'s connection table holds the 100 flows of [`Scene::load`]. No connection
/// has used their source ports since, so only the table kept from before `what` can hold them.
fn assert_flows_kept(agent: &Agent, what: &str) {
    let out = agent
        .cli(&["flows", "web", "--limit", "100000", "--json"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let old = report["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| {
            f["client"]
                .as_str()
                .and_then(|c| c.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_some_and(|p| (23000..23100).contains(&p))
        })
        .count();
    assert_eq!(old, 100, "flows from before {what}: {report}");
}

#[test]
fn sigkill_keeps_forwarding_and_a_restart_takes_over() {
    if !require_privileges("sigkill_keeps_forwarding_and_a_restart_takes_over") {
        return;
    }
    let scene = Scene::new();
    let (topo, pins, cfg) = (&scene.topo, &scene.pins, &scene.cfg);
    let mut first = topo.start_agent(cfg, &[]).unwrap();
    let load = scene.load();

    // A crash: no clean-up at all. The pinned link keeps the program forwarding.
    let pid = first.guard.pid() as libc::pid_t;
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let st = first.guard.wait_timeout(Duration::from_secs(5)).unwrap();
    assert!(st.is_some(), "agent still running after SIGKILL");
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(
        link.contains("prog/xdp"),
        "program gone with the agent:\n{link}"
    );
    let verified = load.stream.verified();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        load.stream.verified() > verified,
        "the stream stalled without the agent"
    );
    let alone = connect_many(topo, 23000, 100);
    assert_eq!(alone, load.before, "flows moved while no agent ran");
    assert!(
        pins.join("flows").exists(),
        "connection table not pinned at {}",
        pins.display()
    );

    // An agent whose connection table would not fit refuses to adopt it, and says what to do.
    let wrong = cfg.replacen("[api]", "[flows]\nentries = 4096\n\n[api]", 1);
    let refused = topo.start_agent(&wrong, &[]);
    let err = format!(
        "{:#}",
        refused
            .err()
            .expect("an agent with another table size started")
    );
    assert!(
        err.contains("does not fit this agent")
            && err.contains("4096 entries")
            && err.contains("rm "),
        "{err}"
    );

    // The restarted agent takes the data path over, adopts the connection table, and can
    // change it.
    let second = topo.start_agent(cfg, &[]).unwrap();
    assert!(
        wait_for_log(&second, "took over the data path", Duration::from_secs(5)),
        "{}",
        second.log_text()
    );
    assert!(
        wait_for_log(
            &second,
            "adopted the connection table",
            Duration::from_secs(1)
        ),
        "{}",
        second.log_text()
    );
    assert_flows_kept(&second, "the restart");
    scene.finish_and_check(
        second,
        load,
        "the kill, the agent-less time and the restart",
    );
}

/// `bpftool -j ... show pinned PATH` -> the object's JSON.
fn bpftool_pinned(kind: &str, path: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new("bpftool")
        .args(["-j", kind, "show", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {kind} {}: {out:?}",
        path.display()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (link id, program id of the link, id of the FLOWS map), as the kernel says.
fn kernel_ids(pins: &std::path::Path) -> (u64, u64, u64) {
    let link = bpftool_pinned("link", &pins.join("link"));
    let flows = bpftool_pinned("map", &pins.join("flows"));
    (
        link["id"].as_u64().unwrap(),
        link["prog_id"].as_u64().unwrap(),
        flows["id"].as_u64().unwrap(),
    )
}

/// `xdplb run --config CONFIG ARGS...` in `ns`, expected to exit on its own: status and output.
fn run_once_with(
    ns: &lb_tests::netns::Netns,
    dir: &std::path::Path,
    name: &str,
    config: &str,
    args: &[&str],
) -> (std::process::ExitStatus, String) {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = ns.command(lb_tests::topology::xdplb_bin());
    cmd.args(["run", "--config"])
        .arg(&cfg)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    let mut guard = lb_tests::netns::ChildGuard::spawn(&mut cmd).unwrap();
    let st = guard
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("xdplb should have exited");
    (st, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn replace_swaps_the_program_under_traffic_and_keeps_the_connection_table() {
    if !require_privileges("replace_swaps_the_program_under_traffic_and_keeps_the_connection_table")
    {
        return;
    }
    let scene = Scene::new();
    let (topo, pins) = (&scene.topo, &scene.pins);
    // A plain `xdplb run`, as an operator would have it running before an upgrade.
    let mut first = topo.start_agent(&scene.cfg, &[]).unwrap();
    let (link_before, prog_before, flows_before) = kernel_ids(pins);
    assert_eq!(
        first.status().unwrap().program_id,
        Some(prog_before as u32),
        "status and kernel disagree on the program"
    );
    let load = scene.load();

    // The upgrade: a second `xdplb run --replace` with the same config and socket.
    let second = topo
        .start_agent_bin(
            &lb_tests::topology::xdplb_bin(),
            &topo.dir.path().join("xdplb.toml"),
            &topo.dir.path().join("xdplb.sock"),
            &["--replace"],
            "replacer.log",
        )
        .unwrap();
    assert!(
        wait_for_log(&second, "replaced agent pid", Duration::from_secs(30)),
        "{}",
        second.log_text()
    );
    let st = first
        .guard
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the replaced agent is still running");
    assert!(st.success(), "the replaced agent exited with {st}");
    let old_log = first.log_text();
    assert!(
        old_log.contains("stop requested over the API")
            && old_log.contains("left the data path attached"),
        "{old_log}"
    );
    let log = second.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("replaced agent pid"))
        .unwrap()
        .to_string();
    eprintln!("{line}");
    assert!(
        line.contains(&format!("pid {}", first.guard.pid())),
        "{line}"
    );

    // One link, one connection table, a new program in the link.
    let (link_after, prog_after, flows_after) = kernel_ids(pins);
    assert_eq!(
        link_after, link_before,
        "the link was replaced, not updated"
    );
    assert_eq!(
        flows_after, flows_before,
        "the connection table was not adopted"
    );
    assert_ne!(prog_after, prog_before, "the program was not swapped");
    assert_eq!(second.status().unwrap().program_id, Some(prog_after as u32));
    assert!(
        line.contains(&format!(
            "program id {prog_before} -> {prog_after}, link id {link_before}, connection table \
             adopted"
        )),
        "{line}"
    );
    let link = topo.lb.ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
    assert!(link.contains("prog/xdp"), "{link}");

    // The flows made before are still in the (same) table and still on their backends.
    assert_flows_kept(&second, "the replacement");
    assert_eq!(connect_many(topo, 23000, 100), load.before, "flows moved");

    let during = scene.finish_and_check(second, load, "the replacement");
    assert!(
        during.answers.len() > 50,
        "too little traffic to mean anything"
    );
}

#[test]
fn replace_refuses_a_bad_config_and_starts_normally_alone() {
    if !require_privileges("replace_refuses_a_bad_config_and_starts_normally_alone") {
        return;
    }
    let topo = LbTopology::new(1).expect("topology");
    let _servers = serve(&topo);
    let pins = topo.lb.ns.run_in(|| pin_dir("eth0"));
    let _cleanup = RemoveDir(pins.parent().unwrap().to_path_buf());
    let cfg = topo.config(&web(&[backend_addr(0)]));

    // Nothing running: --replace is a normal start.
    let mut agent = topo.start_agent(&cfg, &["--replace"]).unwrap();
    assert!(
        wait_for_log(
            &agent,
            "no agent answers on the API socket; starting normally",
            Duration::from_secs(1)
        ),
        "{}",
        agent.log_text()
    );
    let prog = agent.status().unwrap().program_id;

    // An invalid config: refused before anything is asked of the running agent.
    let bad = cfg.replacen("port = 80", "port = 80\ntable_size = 100", 1);
    let (st, log) = run_once_with(&topo.lb.ns, topo.dir.path(), "bad", &bad, &["--replace"]);
    assert!(!st.success());
    assert!(
        log.contains("bad.toml") && log.contains("table_size"),
        "{log}"
    );
    // A valid config whose data path cannot be made (the pinned connection table has another
    // size): refused after loading, still before the running agent is asked anything.
    let misfit = cfg.replacen("[api]", "[flows]\nentries = 4096\n\n[api]", 1);
    let (st, log) = run_once_with(
        &topo.lb.ns,
        topo.dir.path(),
        "misfit",
        &misfit,
        &["--replace"],
    );
    assert!(!st.success());
    assert!(
        log.contains("an agent is running") && log.contains("does not fit this agent"),
        "{log}"
    );

    // The running agent never noticed.
    assert!(
        agent.guard.wait_timeout(Duration::ZERO).unwrap().is_none(),
        "the running agent exited"
    );
    assert!(
        !agent.log_text().contains("stop requested"),
        "{}",
        agent.log_text()
    );
    assert_eq!(agent.status().unwrap().program_id, prog);
    assert_eq!(connect_many(&topo, 25000, 20), vec!["b1".to_string(); 20]);
    assert!(agent.stop().success());
}
