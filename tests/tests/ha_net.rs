//! The kernel-facing pieces of HA against a real kernel, in namespaces on a [`Lan`]: VIP
//! addresses through rtnetlink, the link watcher, gratuitous ARP and the virtual-MAC macvlan.
//! Privileged: skipped outside CI without root, failing under CI=true.
//!
//! The `Netlink` calls run inside a host's namespace ([`Netns::run_in`] with a current-thread
//! runtime built there), because a netlink socket belongs to the namespace it was opened in.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use lb_tests::netns::{Lan, require_privileges};
use lb_userspace::ha::arp::{GarpSender, virtual_mac};
use lb_userspace::net::{LinkState, NetError, Netlink, watch_link};
use tokio::sync::watch;

/// The bound the HA design promises for noticing an interface change.
const LINK_DEADLINE: Duration = Duration::from_millis(1500);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

fn block_on<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// `ip ARGS` from inside the runtime, so a watcher on the same thread keeps running meanwhile.
async fn ip(args: &[&str]) -> String {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ip output is UTF-8")
}

/// Waits until the watched state satisfies `pred`; returns how long that took from `since`.
async fn wait_state(
    rx: &mut watch::Receiver<LinkState>,
    since: Instant,
    what: &str,
    pred: impl FnMut(&LinkState) -> bool,
) -> Duration {
    let left = LINK_DEADLINE.saturating_sub(since.elapsed());
    let seen = tokio::time::timeout(left, rx.wait_for(pred))
        .await
        .map(|r| r.is_ok());
    match seen {
        Ok(true) => since.elapsed(),
        Ok(false) => panic!("{what}: the link watcher stopped"),
        Err(_) => panic!(
            "{what}: not seen within {LINK_DEADLINE:?}; last state {:?}",
            *rx.borrow()
        ),
    }
}

#[test]
fn vip_addresses_are_added_listed_and_removed_idempotently() {
    if !require_privileges("vip_addresses_are_added_listed_and_removed_idempotently") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let ifindex = a.ifindex;
    let ns = a.ns.name().to_owned();
    a.ns.run_in(move || {
        block_on(async move {
            let nl = Netlink::new().unwrap();
            let own = Ipv4Addr::new(10, 0, 0, 11);
            let extra = Ipv4Addr::new(10, 0, 0, 50);
            assert_eq!(nl.ipv4_addresses(ifindex).await.unwrap(), [(own, 24)]);

            nl.add_address(ifindex, VIP, 32).await.unwrap();
            nl.add_address(ifindex, VIP, 32)
                .await
                .expect("adding an address already present succeeds");
            // Same subnet and prefix as the host's own address: the kernel makes it secondary.
            nl.add_address(ifindex, extra, 24).await.unwrap();
            let listed = nl.ipv4_addresses(ifindex).await.unwrap();
            assert_eq!(listed, [(own, 24), (VIP, 32), (extra, 24)]);
            let shown = ip(&["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"]).await;
            assert!(shown.contains("10.0.0.100/32"), "{shown}");
            assert!(
                shown
                    .lines()
                    .any(|l| l.contains("10.0.0.50/24") && l.contains("secondary")),
                "{shown}"
            );

            let none = BTreeSet::new();
            let vips = BTreeSet::from([VIP]);
            assert_eq!(nl.primary_ipv4(ifindex, &none).await.unwrap(), Some(own));
            assert_eq!(nl.primary_ipv4(ifindex, &vips).await.unwrap(), Some(own));
            // With the real primary excluded, the secondary does not qualify either.
            let both = BTreeSet::from([VIP, own]);
            assert_eq!(nl.primary_ipv4(ifindex, &both).await.unwrap(), None);

            nl.del_address(ifindex, VIP, 32).await.unwrap();
            nl.del_address(ifindex, VIP, 32)
                .await
                .expect("deleting an absent address succeeds");
            // Another prefix is another address: nothing to delete.
            nl.del_address(ifindex, extra, 32).await.unwrap();
            assert_eq!(
                nl.ipv4_addresses(ifindex).await.unwrap(),
                [(own, 24), (extra, 24)]
            );
            nl.del_address(ifindex, extra, 24).await.unwrap();
            assert_eq!(nl.ipv4_addresses(ifindex).await.unwrap(), [(own, 24)]);
            let shown = ip(&["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"]).await;
            assert!(!shown.contains("10.0.0.100"), "{shown}");
            assert!(!shown.contains("10.0.0.50"), "{shown}");

            // A VIP added before anything else is primary too; only `exclude` keeps it out.
            nl.del_address(ifindex, own, 24).await.unwrap();
            nl.add_address(ifindex, VIP, 32).await.unwrap();
            nl.add_address(ifindex, own, 24).await.unwrap();
            assert_eq!(
                nl.ipv4_addresses(ifindex).await.unwrap(),
                [(VIP, 32), (own, 24)]
            );
            assert_eq!(nl.primary_ipv4(ifindex, &none).await.unwrap(), Some(VIP));
            assert_eq!(nl.primary_ipv4(ifindex, &vips).await.unwrap(), Some(own));

            let missing = 9999;
            for (what, err) in [
                ("add", nl.add_address(missing, VIP, 32).await.unwrap_err()),
                ("del", nl.del_address(missing, VIP, 32).await.unwrap_err()),
                ("list", nl.ipv4_addresses(missing).await.unwrap_err()),
            ] {
                assert!(
                    matches!(err, NetError::NoSuchIfindex { index: 9999, .. }),
                    "{what}: {err:?}"
                );
                assert!(err.to_string().contains("9999"), "{what}: {err}");
            }
            let err = nl
                .add_address(missing, VIP, 32)
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("10.0.0.100/32"), "{err}");
            // An invalid request names the interface and the address.
            let err = nl
                .add_address(ifindex, Ipv4Addr::new(10, 0, 0, 7), 33)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("10.0.0.7/33") && err.contains("`eth0`"),
                "{err}"
            );
        })
    });
}

#[test]
fn link_watcher_reports_admin_down_and_carrier_loss() {
    if !require_privileges("link_watcher_reports_admin_down_and_carrier_loss") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let ifindex = a.ifindex;
    let ns = a.ns.name().to_owned();
    let sw = lan.switch().name().to_owned();
    let peer = a.peer.clone();
    let timings = a.ns.run_in(move || {
        block_on(async move {
            let nl = Netlink::new().unwrap();
            let usable = LinkState {
                up: true,
                running: true,
            };
            assert_eq!(nl.link_state(ifindex).await.unwrap(), usable);
            let (tx, mut rx) = watch::channel(LinkState::default());
            let watcher = tokio::spawn(watch_link(nl.clone(), ifindex, tx));
            let mut timings = Vec::new();

            let t = Instant::now();
            timings.push((
                "initial",
                wait_state(&mut rx, t, "initial state", LinkState::usable).await,
            ));

            let t = Instant::now();
            ip(&["-n", &ns, "link", "set", "eth0", "down"]).await;
            let took = wait_state(&mut rx, t, "admin down", |s| !s.up).await;
            assert!(!rx.borrow().usable());
            timings.push(("admin down", took));
            assert_eq!(
                nl.link_state(ifindex).await.unwrap(),
                LinkState {
                    up: false,
                    running: false
                }
            );

            let t = Instant::now();
            ip(&["-n", &ns, "link", "set", "eth0", "up"]).await;
            timings.push((
                "admin up",
                wait_state(&mut rx, t, "admin up", LinkState::usable).await,
            ));

            // The veth peer going down is this end losing carrier while still admin up.
            let t = Instant::now();
            ip(&["-n", &sw, "link", "set", &peer, "down"]).await;
            let took = wait_state(&mut rx, t, "carrier loss", |s| !s.running).await;
            assert!(rx.borrow().up, "{:?}", *rx.borrow());
            assert!(!rx.borrow().usable());
            timings.push(("carrier loss", took));

            let t = Instant::now();
            ip(&["-n", &sw, "link", "set", &peer, "up"]).await;
            timings.push((
                "carrier back",
                wait_state(&mut rx, t, "carrier back", LinkState::usable).await,
            ));

            // Dropping every receiver stops the watcher.
            drop(rx);
            tokio::time::timeout(Duration::from_secs(1), watcher)
                .await
                .expect("the watcher outlived its receivers")
                .unwrap();

            // An interface that disappears is down.
            // A veth pair: this kernel has no dummy module, and an empty bridge has no carrier.
            ip(&[
                "-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
            ])
            .await;
            ip(&["-n", &ns, "link", "set", "d1", "up"]).await;
            ip(&["-n", &ns, "link", "set", "d0", "up"]).await;
            let veth = nl_index(&ns, "d0").await;
            let (tx, mut rx) = watch::channel(LinkState::default());
            let watcher = tokio::spawn(watch_link(nl.clone(), veth, tx));
            let t = Instant::now();
            wait_state(&mut rx, t, "veth usable", LinkState::usable).await;
            let t = Instant::now();
            ip(&["-n", &ns, "link", "del", "d0"]).await;
            let took = wait_state(&mut rx, t, "deleted", |s| *s == LinkState::default()).await;
            timings.push(("deleted", took));
            drop(rx);
            watcher.await.unwrap();

            let err = nl.link_state(veth).await.unwrap_err();
            assert!(
                matches!(err, NetError::NoSuchIfindex { index, .. } if index == veth),
                "{err:?}"
            );
            timings
        })
    });
    for (what, took) in &timings {
        eprintln!("link watcher: {what} seen after {took:?}");
    }
}

async fn nl_index(ns: &str, dev: &str) -> u32 {
    let out = ip(&["-n", ns, "-o", "link", "show", "dev", dev]).await;
    // "7: d0: <...> ..."
    out.split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in {out:?}"))
}

/// `ip neigh show ADDR dev eth0` in `ns` until it mentions `mac`; how long that took.
fn wait_neigh(ns: &lb_tests::netns::Netns, addr: &str, mac: &str, since: Instant) -> Duration {
    loop {
        let shown = ns.ip(&["neigh", "show", addr, "dev", "eth0"]).unwrap();
        if shown.contains(mac) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "neighbour {addr} in {} never became {mac}: {shown}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn gratuitous_arp_moves_an_existing_neighbour_entry() {
    if !require_privileges("gratuitous_arp_moves_an_existing_neighbour_entry") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let b = lan.add_host("b", "10.0.0.12/24").unwrap();
    let other = "02:00:00:00:00:99";
    // Stale, not the default permanent: ARP never overrides a permanent entry.
    b.ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.100",
        "lladdr",
        other,
        "dev",
        "eth0",
        "nud",
        "stale",
    ])
    .unwrap();
    let before =
        b.ns.ip(&["neigh", "show", "10.0.0.100", "dev", "eth0"])
            .unwrap();
    assert!(before.contains(other), "{before}");

    let (ifindex, mac) = (a.ifindex, a.mac);
    let sender = a.ns.run_in(move || GarpSender::new(ifindex, mac)).unwrap();
    assert_eq!(sender.ifindex(), ifindex);
    let t = Instant::now();
    // At once, well inside the entry's locktime (1 s): only a gratuitous ARP may override then.
    sender.send(VIP).unwrap();
    let took = wait_neigh(&b.ns, "10.0.0.100", &mac_string(a.mac), t);
    eprintln!("gratuitous ARP: B's entry moved to A's MAC after {took:?}");
    let after =
        b.ns.ip(&["neigh", "show", "10.0.0.100", "dev", "eth0"])
            .unwrap();
    assert!(!after.contains(other), "{after}");

    let err =
        a.ns.run_in(|| GarpSender::new(9999, [2, 0, 0, 0, 0, 1]))
            .unwrap_err()
            .to_string();
    assert!(err.contains("ifindex 9999"), "{err}");

    // A down interface is an error, not a silent drop.
    a.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let err = sender.send(VIP).unwrap_err().to_string();
    assert!(
        err.contains("10.0.0.100") && err.contains(&format!("ifindex {ifindex}")),
        "{err}"
    );
}

/// The IPv6 twin of the gratuitous ARP test: an unsolicited neighbour advertisement (Override
/// set) moves a neighbour entry another host holds for an IPv6 VIP, as a new master needs.
#[test]
fn unsolicited_na_moves_an_existing_neighbour_entry() {
    if !require_privileges("unsolicited_na_moves_an_existing_neighbour_entry") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let b = lan.add_host("b", "10.0.0.12/24").unwrap();
    let vip6 = "2001:db8::100";
    let other = "02:00:00:00:00:99";
    // The LAN's hosts start with IPv6 off, to keep its chatter out of the other tests.
    for key in ["all", "eth0"] {
        b.ns.sysctl(&format!("net.ipv6.conf.{key}.disable_ipv6"), "0")
            .unwrap();
    }
    b.ns.ip(&[
        "-6", "neigh", "replace", vip6, "lladdr", other, "dev", "eth0", "nud", "stale",
    ])
    .unwrap();
    let before =
        b.ns.ip(&["-6", "neigh", "show", vip6, "dev", "eth0"])
            .unwrap();
    assert!(before.contains(other), "{before}");

    let (ifindex, mac) = (a.ifindex, a.mac);
    let sender = a.ns.run_in(move || GarpSender::new(ifindex, mac)).unwrap();
    let t = Instant::now();
    sender.announce(vip6.parse().unwrap()).unwrap();
    let took = wait_neigh(&b.ns, vip6, &mac_string(a.mac), t);
    eprintln!("unsolicited NA: B's entry moved to A's MAC after {took:?}");
    let after =
        b.ns.ip(&["-6", "neigh", "show", vip6, "dev", "eth0"])
            .unwrap();
    assert!(!after.contains(other), "{after}");

    // A down interface is an error naming the address.
    a.ns.ip(&["link", "set", "eth0", "down"]).unwrap();
    let err = sender
        .send_na(vip6.parse().unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(vip6) && err.contains("neighbour advertisement"),
        "{err}"
    );
}

#[test]
fn virtual_mac_macvlan_is_created_reused_and_deleted() {
    if !require_privileges("virtual_mac_macvlan_is_created_reused_and_deleted") {
        return;
    }
    let mut lan = Lan::new().unwrap();
    let a = lan.add_host("a", "10.0.0.11/24").unwrap();
    let b = lan.add_host("b", "10.0.0.12/24").unwrap();
    b.ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "eth0",
        "nud",
        "stale",
    ])
    .unwrap();
    let parent = a.ifindex;
    let ns = a.ns.name().to_owned();
    let vmac = virtual_mac(51);
    let vmac_s = mac_string(vmac);
    let (index, sender) = a.ns.run_in(move || {
        block_on(async move {
            let nl = Netlink::new().unwrap();
            let index = nl.create_macvlan(parent, "vrrp.51", vmac).await.unwrap();
            let shown = ip(&["-n", &ns, "-d", "-o", "link", "show", "dev", "vrrp.51"]).await;
            assert!(
                shown.starts_with(&format!("{index}: vrrp.51@eth0:")),
                "{shown}"
            );
            assert!(shown.contains("macvlan mode private"), "{shown}");
            assert!(shown.contains(&vmac_s), "{shown}");
            assert!(shown.contains(",UP"), "{shown}");

            assert_eq!(
                nl.create_macvlan(parent, "vrrp.51", vmac).await.unwrap(),
                index,
                "an existing matching macvlan is reused"
            );
            // Reuse also brings it back up.
            ip(&["-n", &ns, "link", "set", "vrrp.51", "down"]).await;
            assert_eq!(
                nl.create_macvlan(parent, "vrrp.51", vmac).await.unwrap(),
                index
            );
            assert!(nl.link_state(index).await.unwrap().up);

            let err = nl
                .create_macvlan(parent, "vrrp.51", virtual_mac(52))
                .await
                .unwrap_err();
            assert!(matches!(err, NetError::LinkConflict { .. }), "{err:?}");
            let err = err.to_string();
            assert!(
                err.contains("vrrp.51")
                    && err.contains(&vmac_s)
                    && err.contains("00:00:5e:00:01:34"),
                "{err}"
            );
            ip(&["-n", &ns, "link", "add", "vrrp.9", "type", "bridge"]).await;
            let err = nl
                .create_macvlan(parent, "vrrp.9", virtual_mac(9))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("vrrp.9") && err.contains("a bridge"), "{err}");
            let err = nl
                .create_macvlan(9999, "vrrp.7", virtual_mac(7))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains("9999") && err.contains("vrrp.7"), "{err}");

            let sender = GarpSender::new(index, vmac).unwrap();
            (index, sender)
        })
    });

    // What the macvlan is for: neighbours learn the virtual MAC for the VIP.
    let t = Instant::now();
    sender.send(VIP).unwrap();
    let took = wait_neigh(&b.ns, "10.0.0.100", &mac_string(vmac), t);
    eprintln!("gratuitous ARP from the macvlan: B learned the virtual MAC after {took:?}");
    drop(sender);

    let ns = a.ns.name().to_owned();
    a.ns.run_in(move || {
        block_on(async move {
            let nl = Netlink::new().unwrap();
            nl.delete_link(index).await.unwrap();
            nl.delete_link(index)
                .await
                .expect("deleting a link already gone succeeds");
            let out = tokio::process::Command::new("ip")
                .args(["-n", &ns, "link", "show", "dev", "vrrp.51"])
                .output()
                .await
                .unwrap();
            assert!(!out.status.success(), "vrrp.51 still exists");
        })
    });
}
