//! Health checks and live changes, end to end: the real `xdplb run` process, real servers in
//! backend namespaces, real connections from a client namespace (see `lb_tests::topology`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU16, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use lb_tests::{
    netns::{Netns, require_privileges},
    topology::{
        CLIENT_ADDR, IdentityServers, LbTopology, VIP, backend_addr, backend_status, tally,
        tcp_ask, wait_for_log, wait_until,
    },
};
use lb_userspace::status::Status;

/// Connections from fixed source ports to `dst`; returns answers and failures.
fn connect_many(
    topo: &LbTopology,
    dst: SocketAddrV4,
    first_port: u16,
    n: u16,
) -> (Vec<String>, Vec<String>) {
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for i in 0..n {
        let src = SocketAddrV4::new(CLIENT_ADDR, first_port + i);
        match tcp_ask(&topo.client.ns, Some(src), dst) {
            Ok(a) => answers.push(a),
            Err(e) => failures.push(format!("{src}: {e:#}")),
        }
    }
    (answers, failures)
}

/// One identity server per backend, so each can be stopped on its own.
fn serve_each(topo: &LbTopology, port: u16) -> Vec<Option<IdentityServers>> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, b)| Some(identity(&b.ns, port, i)))
        .collect()
}

fn identity(ns: &Netns, port: u16, i: usize) -> IdentityServers {
    let mut s = IdentityServers::new();
    s.tcp(
        ns,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        &format!("b{}", i + 1),
    )
    .unwrap();
    s
}

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

#[test]
fn a_dead_backend_leaves_within_the_bound_and_rejoins_by_itself() {
    if !require_privileges("a_dead_backend_leaves_within_the_bound_and_rejoins_by_itself") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let mut servers = serve_each(&topo, 80);
    // The default check: TCP connect every 1s, timeout 500ms, rise 2, fall 3.
    let agent = topo.start_agent(&topo.config(&web(3, "")), &[]).unwrap();
    let dst = SocketAddrV4::new(VIP, 80);
    wait_until(&agent, "first checks", Duration::from_secs(3), |s| {
        s.vips[0].backends.iter().all(|b| b.health.state == "up")
    });
    let (answers, failures) = connect_many(&topo, dst, 20000, 150);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tally(answers.iter().map(String::as_str)).len(), 3);

    // Kill b2's server: its check fails with "connect refused".
    servers[1] = None;
    let b2 = backend_addr(1);
    let out = wait_until(&agent, "b2 down", Duration::from_secs(10), |s| {
        let b = backend_status(s, "web", b2);
        b.state == "down" && !b.in_table
    });
    eprintln!("b2 out of the table {out:?} after its server died");
    // fall x interval + timeout = 3.5 s, plus polling and scheduling slack.
    assert!(out <= Duration::from_millis(3500 + 300), "{out:?}");
    assert!(wait_for_log(
        &agent,
        "backend 10.0.0.12:80 of vip web DOWN: connect refused 3/3",
        Duration::from_secs(1)
    ));
    // Every new connection succeeds, on the others.
    let (answers, failures) = connect_many(&topo, dst, 21000, 150);
    assert!(failures.is_empty(), "after removal: {failures:?}");
    let counts = tally(answers.iter().map(String::as_str));
    assert_eq!(counts.get("b2"), None, "{counts:?}");
    let s = agent.status().unwrap();
    let b = backend_status(&s, "web", b2);
    assert_eq!(b.health.last_detail.as_deref(), Some("connect refused"));
    assert!(s.health_transitions >= 1);

    // Restart it: back within rise x interval = 2 s, no operator action.
    servers[1] = Some(identity(&topo.backends[1].ns, 80, 1));
    let back = wait_until(&agent, "b2 back", Duration::from_secs(10), |s| {
        let b = backend_status(s, "web", b2);
        b.state == "up" && b.in_table && b.slots > 0
    });
    eprintln!("b2 back in the table {back:?} after its server restarted");
    assert!(back <= Duration::from_millis(2000 + 300), "{back:?}");
    let (answers, failures) = connect_many(&topo, dst, 22000, 150);
    assert!(failures.is_empty(), "{failures:?}");
    assert!(tally(answers.iter().map(String::as_str)).contains_key("b2"));
    assert!(agent.stop().success());
}

/// An HTTP server answering every request with the status in `status` and body "ok".
struct HttpServer {
    stop: Arc<AtomicBool>,
    fd: i32,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn start(ns: &Netns, port: u16, status: Arc<AtomicU16>) -> HttpServer {
        let listener = ns
            .run_in(move || TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .unwrap();
        let fd = listener.as_raw_fd();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut c) = conn else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let code = status.load(Ordering::Relaxed);
                let _ = write!(
                    c,
                    "HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                );
            }
        });
        HttpServer {
            stop,
            fd,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // SAFETY: the listener's fd, open until its thread ends; wakes the blocked accept().
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn an_http_check_answering_500_takes_the_backend_out() {
    if !require_privileges("an_http_check_answering_500_takes_the_backend_out") {
        return;
    }
    let topo = LbTopology::new(2).expect("topology");
    let _servers = serve_each(&topo, 80);
    let codes: Vec<Arc<AtomicU16>> = (0..2).map(|_| Arc::new(AtomicU16::new(200))).collect();
    let _http: Vec<HttpServer> = topo
        .backends
        .iter()
        .zip(&codes)
        .map(|(b, c)| HttpServer::start(&b.ns, 8081, c.clone()))
        .collect();
    let health = "[vip.health]\nkind = \"http\"\nport = 8081\npath = \"/health\"\n\
                  expect_body = \"ok\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let agent = topo
        .start_agent(&topo.config(&web(2, health)), &[])
        .unwrap();
    wait_until(&agent, "first checks", Duration::from_secs(3), |s| {
        s.vips[0].backends.iter().all(|b| b.health.state == "up")
    });

    codes[0].store(500, Ordering::Relaxed);
    let b1 = backend_addr(0);
    let out = wait_until(&agent, "b1 down", Duration::from_secs(5), |s| {
        backend_status(s, "web", b1).state == "down"
    });
    // fall x interval + timeout = 1.1 s.
    assert!(out <= Duration::from_millis(1100 + 300), "{out:?}");
    let s = agent.status().unwrap();
    let b = backend_status(&s, "web", b1);
    let detail = b.health.last_detail.clone().unwrap_or_default();
    assert!(detail.contains("HTTP 500"), "{detail}");
    assert_eq!((b.in_table, b.slots), (false, 0));
    let (answers, failures) = connect_many(&topo, SocketAddrV4::new(VIP, 80), 23000, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        tally(answers.iter().map(String::as_str))
            .keys()
            .collect::<Vec<_>>(),
        ["b2"]
    );
    let metrics = agent.metrics().unwrap();
    assert!(
        metrics.contains(&format!(
            "xdplb_backend_health_up{{vip=\"web\",service=\"{VIP}:80/tcp\",backend=\"{b1}\"}} 0"
        )),
        "{metrics}"
    );

    codes[0].store(200, Ordering::Relaxed);
    wait_until(&agent, "b1 back", Duration::from_secs(5), |s| {
        backend_status(s, "web", b1).state == "up"
    });
    assert!(agent.stop().success());
}

#[test]
fn a_bad_reload_changes_nothing_and_a_good_one_applies_the_difference() {
    if !require_privileges("a_bad_reload_changes_nothing_and_a_good_one_applies_the_difference") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let _servers = serve_each(&topo, 80);
    let agent = topo.start_agent(&topo.config(&web(2, "")), &[]).unwrap();
    let cfg_path = topo.dir.path().join("xdplb.toml");
    let dst = SocketAddrV4::new(VIP, 80);
    let before = agent.status().unwrap();
    let (answers_before, _) = connect_many(&topo, dst, 24000, 100);

    // Invalid: a weight out of range and a duplicate backend. Refused with check-config's
    // words, nothing applied, traffic unchanged.
    let bad = topo.config(&web(2, "")).replace(
        "address = \"10.0.0.12\"\n",
        "address = \"10.0.0.12\"\nweight = 70000\n\n[[vip.backend]]\naddress = \"10.0.0.11\"\n",
    );
    std::fs::write(&cfg_path, &bad).unwrap();
    let out = agent.cli(&["reload"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("weight 70000"), "{err}");
    assert!(err.contains("listed twice"), "{err}");
    assert!(err.contains("unchanged"), "{err}");
    let after = agent.status().unwrap();
    assert_eq!(before.vips[0].backends.len(), after.vips[0].backends.len());
    assert_eq!(before.table_rebuilds, after.table_rebuilds);
    let (answers_after, failures) = connect_many(&topo, dst, 24000, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(answers_before, answers_after, "same flows, same backends");

    // Valid: b3 added. `xdplb reload --json` lists the change; SIGHUP does the same.
    std::fs::write(&cfg_path, topo.config(&web(3, ""))).unwrap();
    let out = agent.cli(&["reload", "--json"]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        json["changes"],
        serde_json::json!(["vip web: backend 10.0.0.13 added"]),
        "{json}"
    );
    wait_until(&agent, "b3 in the table", Duration::from_secs(5), |s| {
        backend_status(s, "web", backend_addr(2)).in_table
    });
    std::fs::write(&cfg_path, topo.config(&web(2, ""))).unwrap();
    // SAFETY: signalling the agent process this test started.
    unsafe { libc::kill(agent.guard.pid() as i32, libc::SIGHUP) };
    assert!(wait_for_log(
        &agent,
        "reloaded: vip web: backend 10.0.0.13 removed",
        Duration::from_secs(3)
    ));
    assert!(agent.stop().success());
}

#[test]
fn the_write_read_split_example_fails_over_to_the_backup_and_back() {
    if !require_privileges("the_write_read_split_example_fails_over_to_the_backup_and_back") {
        return;
    }
    // configs/mysql-rw-split.toml on this topology: its addresses and interface swapped for the
    // test's, the exec check kept (a script that checks the server answers).
    let topo = LbTopology::new(3).expect("topology");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/mysql-rw-split.toml"),
    )
    .unwrap();
    let script = topo.dir.path().join("check_writable.sh");
    // Stands in for "is this server writable": the port answers.
    std::fs::write(
        &script,
        "#!/bin/bash\nexec 3<>\"/dev/tcp/$XDPLB_BACKEND/$XDPLB_BACKEND_PORT\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let vip_w = Ipv4Addr::new(10, 0, 0, 110);
    let vip_r = Ipv4Addr::new(10, 0, 0, 111);
    let services = example
        .split_once("[[vip]]")
        .map(|(_, rest)| format!("[[vip]]{rest}"))
        .unwrap()
        .replace("10.0.0.31", &backend_addr(0).to_string())
        .replace("10.0.0.32", &backend_addr(1).to_string())
        .replace("10.0.0.33", &backend_addr(2).to_string())
        .replace(
            "/usr/local/bin/check_writable.sh",
            &script.display().to_string(),
        );
    for ns in [&topo.lb.ns] {
        for v in [vip_w, vip_r] {
            ns.ip(&["addr", "add", &format!("{v}/32"), "dev", "eth0"])
                .unwrap();
        }
    }
    for b in &topo.backends {
        for v in [vip_w, vip_r] {
            b.ns.ip(&["addr", "add", &format!("{v}/32"), "dev", "lo"])
                .unwrap();
        }
    }
    let mut servers = serve_each(&topo, 3306);
    let agent = topo.start_agent(&topo.config(&services), &[]).unwrap();
    let write = SocketAddrV4::new(vip_w, 3306);
    let read = SocketAddrV4::new(vip_r, 3306);
    wait_until(&agent, "first checks", Duration::from_secs(5), |s| {
        s.vips
            .iter()
            .all(|v| v.backends.iter().all(|b| b.health.state == "up"))
    });
    let (w, f) = connect_many(&topo, write, 25000, 50);
    assert!(f.is_empty(), "{f:?}");
    assert_eq!(
        tally(w.iter().map(String::as_str))
            .keys()
            .collect::<Vec<_>>(),
        ["b1"]
    );
    let (r, f) = connect_many(&topo, read, 25100, 100);
    assert!(f.is_empty(), "{f:?}");
    let reads = tally(r.iter().map(String::as_str));
    assert_eq!(reads.keys().collect::<Vec<_>>(), ["b2", "b3"], "{reads:?}");

    // The primary dies: the backup takes the writes within fall x interval + timeout.
    servers[0] = None;
    let t = wait_until(
        &agent,
        "backup serves writes",
        Duration::from_secs(10),
        |s| s.vips[0].serving == "backup",
    );
    eprintln!("backup took the writes {t:?} after the primary died");
    assert!(t <= Duration::from_millis(3500 + 300), "{t:?}");
    let (w, f) = connect_many(&topo, write, 26000, 50);
    assert!(f.is_empty(), "{f:?}");
    assert_eq!(
        tally(w.iter().map(String::as_str))
            .keys()
            .collect::<Vec<_>>(),
        ["b2"]
    );

    // It recovers: writes go back to it.
    servers[0] = Some(identity(&topo.backends[0].ns, 3306, 0));
    wait_until(&agent, "primary back", Duration::from_secs(10), |s| {
        s.vips[0].serving == "ok"
    });
    let (w, f) = connect_many(&topo, write, 27000, 50);
    assert!(f.is_empty(), "{f:?}");
    assert_eq!(
        tally(w.iter().map(String::as_str))
            .keys()
            .collect::<Vec<_>>(),
        ["b1"]
    );
    assert!(agent.stop().success());
}

#[test]
fn operators_change_a_running_agent_with_the_cli_over_the_tcp_api() {
    if !require_privileges("operators_change_a_running_agent_with_the_cli_over_the_tcp_api") {
        return;
    }
    let topo = LbTopology::new(3).expect("topology");
    let _web = serve_each(&topo, 80);
    let _alt = serve_each(&topo, 8080);
    let token = "s3cret-token-for-the-test-0123456789";
    let token_file = topo.dir.path().join("api.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let config = topo.config(&web(3, "")).replace(
        "[api]\n",
        &format!(
            "[api]\nlisten = \"{}:9180\"\ntoken_file = \"{}\"\n",
            lb_tests::topology::LB_ADDR,
            token_file.display()
        ),
    );
    let agent = topo.start_agent(&config, &[]).unwrap();
    // The CLI runs on the client host and reaches the agent over the network.
    let cli = |token: Option<&str>, args: &[&str]| {
        let mut cmd = topo.client.ns.command(lb_tests::topology::xdplb_bin());
        cmd.arg("--api")
            .arg(format!("{}:9180", lb_tests::topology::LB_ADDR))
            .args(args)
            .env_remove("XDPLB_TOKEN")
            .env_remove("XDPLB_TOKEN_FILE");
        if let Some(t) = token {
            cmd.env("XDPLB_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |out: &str| -> serde_json::Value {
        serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let web_dst = SocketAddrV4::new(VIP, 80);
    let b2 = backend_addr(1).to_string();
    let b3 = backend_addr(2).to_string();

    // No token, a wrong one: refused, nothing changes.
    let (ok, _, err) = cli(None, &["status"]);
    assert!(!ok && err.contains("401") && err.contains("token"), "{err}");
    let (ok, _, err) = cli(
        Some("wrong-token-wrong-token"),
        &["backend", "drain", "web", &b2],
    );
    assert!(!ok && err.contains("401"), "{err}");
    assert_eq!(
        backend_status(&agent.status().unwrap(), "web", backend_addr(1)).state,
        "up"
    );

    // The metrics as JSON samples, read by the same strict reader the unit tests use.
    let (ok, out, err) = cli(Some(token), &["metrics", "--json"]);
    assert!(ok, "{err}");
    let samples = json(&out);
    let weight_b2 = samples
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "xdplb_backend_weight" && s["labels"]["backend"] == b2.as_str())
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(weight_b2["value"], 1.0);

    // Drain: no new flow reaches b2; undrain: it does again.
    let (ok, out, err) = cli(Some(token), &["backend", "drain", "web", &b2, "--json"]);
    assert!(ok, "{err}");
    assert!(
        json(&out)["message"].as_str().unwrap().contains("draining"),
        "{out}"
    );
    let (ok, out, _) = cli(Some(token), &["status", "--json"]);
    assert!(ok);
    let s: Status = serde_json::from_str(&out).unwrap();
    assert_eq!(backend_status(&s, "web", backend_addr(1)).state, "draining");
    let (answers, failures) = connect_many(&topo, web_dst, 30000, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tally(answers.iter().map(String::as_str)).get("b2"), None);
    let (ok, _, err) = cli(Some(token), &["backend", "undrain", "web", &b2]);
    assert!(ok, "{err}");
    let (answers, _) = connect_many(&topo, web_dst, 30000, 100);
    assert!(tally(answers.iter().map(String::as_str)).contains_key("b2"));

    // Weight, remove, add back.
    let (ok, _, err) = cli(Some(token), &["backend", "weight", "web", &b3, "3"]);
    assert!(ok, "{err}");
    assert_eq!(
        backend_status(&agent.status().unwrap(), "web", backend_addr(2)).weight,
        3
    );
    let (ok, _, err) = cli(Some(token), &["backend", "remove", "web", &b3]);
    assert!(ok, "{err}");
    let (answers, failures) = connect_many(&topo, web_dst, 31000, 100);
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(tally(answers.iter().map(String::as_str)).get("b3"), None);
    let (ok, _, err) = cli(
        Some(token),
        &["backend", "add", "web", &b3, "--weight", "2"],
    );
    assert!(ok, "{err}");
    wait_until(&agent, "b3 back", Duration::from_secs(5), |s| {
        backend_status(s, "web", backend_addr(2)).in_table
    });

    // A new VIP from flags; a bad one refused with the config's words.
    let (ok, _, err) = cli(
        Some(token),
        &[
            "vip",
            "add",
            "alt",
            &format!("{VIP}:0/tcp"),
            "--backend",
            &b2,
        ],
    );
    assert!(!ok && err.contains("vip[0].port"), "{err}");
    let (ok, out, err) = cli(
        Some(token),
        &[
            "vip",
            "add",
            "alt",
            &format!("{VIP}:8080/tcp"),
            "--backend",
            &b2,
            "--backend",
            &format!("{b3}*2"),
            "--table-size",
            "1009",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    assert!(
        json(&out)["message"].as_str().unwrap().contains("alt"),
        "{out}"
    );
    let alt_dst = SocketAddrV4::new(VIP, 8080);
    wait_until(&agent, "alt forwarding", Duration::from_secs(5), |s| {
        s.vips
            .iter()
            .any(|v| v.name == "alt" && v.usable_backends == 2)
    });
    let (answers, failures) = connect_many(&topo, alt_dst, 32000, 100);
    assert!(failures.is_empty(), "{failures:?}");
    let counts = tally(answers.iter().map(String::as_str));
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["b2", "b3"],
        "{counts:?}"
    );
    let (ok, _, err) = cli(Some(token), &["vip", "remove", "alt"]);
    assert!(ok, "{err}");
    assert!(agent.status().unwrap().vips.iter().all(|v| v.name != "alt"));
    // Removed, the VIP's port reaches the load balancer's own stack, where nothing listens.
    assert!(
        tcp_ask(
            &topo.client.ns,
            Some(SocketAddrV4::new(CLIENT_ADDR, 33000)),
            alt_dst
        )
        .is_err()
    );
    assert!(agent.stop().success());
}
