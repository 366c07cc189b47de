//! keepalived, the VRRP implementation xdplb must interoperate with, runs in the HA topology and
//! behaves as the HA tests assume: the higher priority takes the VIP, the client resolves the VIP
//! to the master, a crashed master's peer takes over within a bounded time. Also records
//! keepalived's VRRPv3 adverts as test vectors for xdplb's decoder (printed; run with
//! `--nocapture` to see them). Privileged: skipped outside CI without root.

use std::time::{Duration, Instant};

use lb_tests::{
    ha::{
        HaTopology, Keepalived, KeepalivedConfig, SniffedAdvert, VRRP_GROUP, VrrpSniffer, hex,
        lb_addr,
    },
    netns::require_privileges,
    topology::{CLIENT_ADDR, VIP},
};

const VRID: u8 = 51;
const ADVERT: Duration = Duration::from_millis(100);
/// A port nobody listens on: the holder's kernel answers with a reset, which proves the VIP
/// reached it without running a server.
const CLOSED_PORT: u16 = 22;

fn config(priority: u8) -> KeepalivedConfig {
    let mut cfg = KeepalivedConfig::new(VRID, priority, &[VIP]);
    cfg.advert_interval = ADVERT;
    cfg
}

fn logs(k: &[&Keepalived]) -> String {
    k.iter()
        .enumerate()
        .map(|(i, k)| format!("--- lb{} keepalived ---\n{}", i + 1, k.log_text()))
        .collect()
}

#[test]
fn keepalived_elects_fails_over_and_adverts_decode() {
    if !require_privileges("keepalived_elects_fails_over_and_adverts_decode") {
        return;
    }
    let topo = HaTopology::new(1).unwrap();
    // Open before keepalived starts, so lb1's first adverts are already queued.
    let mut sniff_lb2 = VrrpSniffer::open(&topo.lb(1).ns, lb_addr(1)).unwrap();
    let mut k1 = Keepalived::start(&topo.lb(0).ns, topo.dir.path(), &config(150)).unwrap();
    let mut k2 = Keepalived::start(&topo.lb(1).ns, topo.dir.path(), &config(100)).unwrap();

    // Election: the higher priority wins, and only it holds the VIP.
    let elected = topo
        .wait_vip_holder(&[0], Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "lb1 alone does not hold the VIP within 5 s (holders {:?})\n{}",
                topo.vip_holder(),
                logs(&[&k1, &k2])
            )
        });
    assert!(
        k1.wait_state("MASTER", Duration::from_secs(1)),
        "{}",
        logs(&[&k1, &k2])
    );
    assert!(
        k2.wait_state("BACKUP", Duration::from_secs(1)),
        "{}",
        logs(&[&k1, &k2])
    );
    // Steady, not a snapshot of a flap: 10 advert intervals with the same single holder.
    let steady = Instant::now();
    while steady.elapsed() < 10 * ADVERT {
        assert_eq!(topo.vip_holder(), vec![0], "{}", logs(&[&k1, &k2]));
        std::thread::sleep(Duration::from_millis(10));
    }
    topo.client_reaches_vip(CLOSED_PORT, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("client cannot reach the VIP on lb1: {e:#}"));
    assert_eq!(topo.client_arp(), Some(topo.node_mac(0)));
    println!("election: lb1 held the VIP {elected:?} after keepalived started");

    // lb1's advert as lb2 receives it.
    let pkt = sniff_lb2
        .next_from(Some(lb_addr(0)), Duration::from_secs(2))
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "no advert from lb1 at lb2 within 2 s\n{}",
                logs(&[&k1, &k2])
            )
        });
    println!(
        "keepalived VRRPv3 advert (IPv4 header included): {}",
        hex(&pkt)
    );
    let advert = SniffedAdvert::parse(&pkt).unwrap();
    assert_eq!(
        advert,
        SniffedAdvert {
            src: lb_addr(0),
            dst: VRRP_GROUP,
            ttl: 255,
            version: 3,
            kind: 1,
            vrid: VRID,
            priority: 150,
            interval_cs: 10,
            addresses: vec![VIP],
            checksum_ok: true,
        },
        "{}",
        hex(&pkt)
    );

    // Crash: no goodbye advert, lb1 keeps the address on its (now dead) link.
    let crash = Instant::now();
    k1.kill9().unwrap();
    topo.set_link(0, false).unwrap();
    let took_over = topo
        .wait_holds(1, Duration::from_secs(2))
        .map(|_| crash.elapsed())
        .unwrap_or_else(|| {
            panic!(
                "lb2 does not hold the VIP within 2 s of lb1's crash (holders {:?})\n{}",
                topo.vip_holder(),
                logs(&[&k1, &k2])
            )
        });
    assert!(
        k2.wait_state("MASTER", Duration::from_secs(1)),
        "{}",
        logs(&[&k1, &k2])
    );
    // The client still has lb1's MAC for the VIP: only lb2's gratuitous ARPs move it.
    topo.wait_client_arp(1, Duration::from_secs(2))
        .unwrap_or_else(|| {
            panic!(
                "the client's ARP entry for the VIP is {:?}, not lb2's {} within 2 s\n{}",
                topo.client_arp(),
                topo.node_mac(1),
                logs(&[&k1, &k2])
            )
        });
    topo.client_reaches_vip(CLOSED_PORT, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("client cannot reach the VIP on lb2: {e:#}"));
    let reachable = crash.elapsed();
    println!(
        "failover (advert {ADVERT:?}, priorities 150/100): lb2 held the VIP {took_over:?} after \
         SIGKILL, the client reached it {reachable:?} after"
    );

    // A clean stop sends priority 0 (RFC 5798 6.4.3), the advert a backup must act on at once.
    let mut sniff_client = VrrpSniffer::open(&topo.client.ns, CLIENT_ADDR).unwrap();
    let status = k2.stop();
    assert!(
        status.success(),
        "keepalived exited {status}\n{}",
        k2.log_text()
    );
    let bye = loop {
        let pkt = sniff_client
            .next_from(Some(lb_addr(1)), Duration::from_secs(2))
            .unwrap()
            .unwrap_or_else(|| panic!("no priority-0 advert from lb2\n{}", k2.log_text()));
        if SniffedAdvert::parse(&pkt).unwrap().priority == 0 {
            break pkt;
        }
    };
    println!("keepalived VRRPv3 priority-0 advert: {}", hex(&bye));
    let bye_advert = SniffedAdvert::parse(&bye).unwrap();
    assert_eq!(bye_advert.vrid, VRID);
    assert!(bye_advert.checksum_ok, "{}", hex(&bye));
    assert!(
        !topo.vip_holder().contains(&1),
        "lb2 kept the VIP after a clean stop\n{}",
        k2.log_text()
    );
}
