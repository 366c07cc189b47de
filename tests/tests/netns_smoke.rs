//! The namespace topology builder itself: traffic crosses a [`Lan`], everything it created is gone
//! after drop (also when the test panics, also when a previous test process died), and
//! [`ChildGuard`] leaves no process behind. Privileged: skipped outside CI without root.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::netns::{ChildGuard, Lan, Netns, require_privileges, sweep_stale};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn netns_list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(out.status.success(), "ip netns list: {out:?}");
    // Lines look like "NAME" or "NAME (id: 3)".
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_gone(names: &[String]) {
    let listed = netns_list();
    for name in names {
        assert!(
            !listed.contains(name),
            "netns {name} still listed: {listed:?}"
        );
    }
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

#[test]
fn lan_carries_icmp_tcp_and_udp() {
    if !require_privileges("lan_carries_icmp_tcp_and_udp") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let b = lan.add_host("b", "10.0.0.12/24").unwrap();
    let c = lan.add_host("c", "10.0.0.13/24").unwrap();
    let names: Vec<String> = [lan.switch(), &a.ns, &b.ns, &c.ns]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
    let listed = netns_list();
    for name in &names {
        assert!(listed.contains(name), "{name} missing from {listed:?}");
    }

    for host in [&a, &b, &c] {
        assert_eq!(host.ifname, "eth0");
        assert!(host.ifindex > 0 && host.peer_ifindex > 0);
        assert_eq!(host.mac[0] & 1, 0, "unicast MAC expected: {:?}", host.mac);
        let port = lan
            .switch()
            .ip(&["-d", "link", "show", "dev", &host.peer])
            .unwrap();
        assert!(
            port.contains("master br0"),
            "{} not on br0: {port}",
            host.peer
        );
    }
    assert_eq!(b.addr, std::net::Ipv4Addr::new(10, 0, 0, 12));

    for target in ["10.0.0.12", "10.0.0.13"] {
        let out =
            a.ns.exec("ping", &["-c", "3", "-W", "1", "-i", "0.2", target])
                .unwrap();
        assert!(out.contains("3 received"), "{out}");
    }
    // Resolution through the bridge learned B's real MAC.
    let neigh =
        a.ns.ip(&["neigh", "show", "10.0.0.12", "dev", "eth0"])
            .unwrap();
    assert!(neigh.contains(&mac_string(b.mac)), "{neigh} vs {:?}", b.mac);

    // TCP: listener created in B, client created in A, both driven from this process.
    let listener = b.ns.run_in(|| TcpListener::bind("10.0.0.12:0")).unwrap();
    let server_addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let server = std::thread::spawn(move || -> std::io::Result<(SocketAddr, Vec<u8>)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let (mut conn, peer) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf)?;
        conn.write_all(b"pong from b")?;
        Ok((peer, buf.to_vec()))
    });
    let mut client =
        a.ns.run_in(move || TcpStream::connect_timeout(&server_addr, IO_TIMEOUT))
            .unwrap();
    client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    client.write_all(b"ping!").unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"pong from b");
    let (peer, request) = server.join().unwrap().unwrap();
    assert_eq!(request, b"ping!");
    assert_eq!(peer.ip(), a.addr);

    // UDP, the same way.
    let udp_b = b.ns.run_in(|| UdpSocket::bind("10.0.0.12:0")).unwrap();
    let udp_a = a.ns.run_in(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    for sock in [&udp_a, &udp_b] {
        sock.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    udp_a
        .send_to(b"datagram", udp_b.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = udp_b.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"datagram");
    assert_eq!(from.ip(), a.addr);
    udp_b.send_to(b"reply", from).unwrap();
    let (n, from) = udp_a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"reply");
    assert_eq!(from, udp_b.local_addr().unwrap());

    // Host helpers reach the right namespace.
    c.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1").unwrap();
    let value =
        c.ns.exec("cat", &["/proc/sys/net/ipv4/conf/all/arp_ignore"])
            .unwrap();
    assert_eq!(value.trim(), "1");
    let value =
        a.ns.exec("cat", &["/proc/sys/net/ipv4/conf/all/arp_ignore"])
            .unwrap();
    assert_eq!(value.trim(), "0");
    a.ethtool(&["tx", "off"]).unwrap();
    let features = a.ns.exec("ethtool", &["-k", "eth0"]).unwrap();
    assert!(features.contains("tx-checksumming: off"), "{features}");

    drop((client, udp_a, udp_b));
    // Hosts before the switch, and the switch before a host: order must not matter.
    drop(a);
    drop(lan);
    drop((b, c));
    assert_gone(&names);
}

#[test]
fn namespaces_are_deleted_when_a_test_panics() {
    if !require_privileges("namespaces_are_deleted_when_a_test_panics") {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lan = Lan::new().unwrap();
        let a = lan.add_host("a", "10.0.0.11/24").unwrap();
        let b = lan.add_host("b", "10.0.0.12/24").unwrap();
        let bare = Netns::new("bare").unwrap();
        names.extend([lan.switch(), &a.ns, &b.ns, &bare].map(|ns| ns.name().to_owned()));
        let listed = netns_list();
        assert!(
            names.iter().all(|n| listed.contains(n)),
            "{names:?} vs {listed:?}"
        );
        panic!("deliberate panic with {} namespaces alive", names.len());
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 4);
    assert_gone(&names);
}

#[test]
fn sweep_deletes_namespaces_of_dead_processes() {
    if !require_privileges("sweep_deletes_namespaces_of_dead_processes") {
        return;
    }
    let live = Netns::new("live").unwrap();
    let dead_pid = (999_999..)
        .find(|&pid: &libc::pid_t| {
            // SAFETY: signal 0 only probes for existence.
            let probe = unsafe { libc::kill(pid, 0) };
            probe != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
        })
        .unwrap();
    let stale = format!("xlb-{dead_pid}-0-x");
    let status = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .unwrap();
    assert!(status.success());

    sweep_stale().unwrap();

    let listed = netns_list();
    assert!(
        !listed.contains(&stale),
        "{stale} survived the sweep: {listed:?}"
    );
    assert!(
        listed.contains(&live.name().to_owned()),
        "the sweep took a live namespace"
    );
}

#[test]
fn command_failures_name_the_command_and_time_out() {
    if !require_privileges("command_failures_name_the_command_and_time_out") {
        return;
    }
    let ns = Netns::new("err").unwrap();
    let err = ns
        .ip(&["link", "show", "dev", "nope0"])
        .unwrap_err()
        .to_string();
    let line = format!("ip -n {} link show dev nope0", ns.name());
    assert!(err.contains(&line), "{err}");
    assert!(err.contains("exit status"), "{err}");
    assert!(err.contains("nope0"), "stderr missing: {err}");

    let started = Instant::now();
    let err = ns
        .exec_timeout("sleep", &["30"], Duration::from_millis(300))
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[test]
fn child_guard_kills_its_child_on_drop() {
    if !require_privileges("child_guard_kills_its_child_on_drop") {
        return;
    }
    let ns = Netns::new("child").unwrap();
    let ns_inode = std::fs::metadata(format!("/run/netns/{}", ns.name()))
        .unwrap()
        .ino();

    let guard = ChildGuard::spawn(ns.command("sleep").arg("60")).unwrap();
    let pid = guard.pid();
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(link.to_string_lossy(), format!("net:[{ns_inode}]"));
    // setns in pre_exec, unlike `ip netns exec`, keeps the caller's mounts (/sys, bpffs).
    let mnt = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_eq!(mnt, std::fs::read_link("/proc/self/ns/mnt").unwrap());

    let started = Instant::now();
    drop(guard);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pid {pid} survived its guard"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut guard = ChildGuard::spawn(ns.command("sleep").arg("60")).unwrap();
    let status = guard.terminate(Duration::from_secs(2));
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    // Terminating again just reports how it ended.
    assert_eq!(
        guard.terminate(Duration::ZERO).signal(),
        Some(libc::SIGTERM)
    );

    // A child that ignores SIGTERM is killed after the grace period.
    let mut stubborn = ns.command("sleep");
    stubborn.arg("60");
    // SAFETY: signal() is async-signal-safe; an ignored disposition survives exec.
    unsafe {
        stubborn.pre_exec(|| {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut guard = ChildGuard::spawn(&mut stubborn).unwrap();
    let started = Instant::now();
    let status = guard.terminate(Duration::from_millis(300));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(started.elapsed() < Duration::from_secs(3));
}

const VICTIM_ENV: &str = "XLB_NETNS_SMOKE_VICTIM";

/// A no-op unless started by `a_sigkilled_test_process_leaves_nothing_running`: then it creates a
/// namespace and a guarded child, reports them on stdout and waits to be killed.
#[test]
fn victim_for_sigkill() {
    if std::env::var_os(VICTIM_ENV).is_none() {
        return;
    }
    let ns = Netns::new("victim").unwrap();
    let guard = ChildGuard::spawn(ns.command("sleep").arg("60")).unwrap();
    println!("NETNS {} CHILD {}", ns.name(), guard.pid());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

fn gone_or_zombie(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[test]
fn a_sigkilled_test_process_leaves_nothing_running() {
    if !require_privileges("a_sigkilled_test_process_leaves_nothing_running") {
        return;
    }
    let mut victim = ChildGuard::spawn(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "victim_for_sigkill",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(VICTIM_ENV, "1")
            .stdout(std::process::Stdio::piped()),
    )
    .unwrap();
    let stdout = victim.child_mut().stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // libtest prints "test NAME ... " on the same line first.
            if let Some(at) = line.find("NETNS ") {
                let _ = tx.send(line[at..].to_owned());
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("victim reported nothing");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (name, child_pid) = (fields[1].to_owned(), fields[3].parse::<u32>().unwrap());
    assert!(netns_list().contains(&name));

    let pid = libc::pid_t::try_from(victim.pid()).unwrap();
    // SAFETY: plain kill of our own child; SIGKILL means no Drop runs in it.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert_eq!(
        victim.terminate(Duration::from_secs(2)).signal(),
        Some(libc::SIGKILL)
    );

    let started = Instant::now();
    while !gone_or_zombie(child_pid) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{child_pid} outlived its test"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    sweep_stale().unwrap();
    assert_gone(&[name]);
}
