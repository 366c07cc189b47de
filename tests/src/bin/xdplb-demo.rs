//! `cargo xtask demo`: xdplb on real traffic, in network namespaces this program creates and
//! removes again.
//!
//! It builds a client, the load balancer and three backends on one bridge (the addresses of
//! `configs/demo.toml`), runs the real `xdplb run` with that config, opens TCP connections and
//! sends UDP flows to the VIP, and shows which backend answered how often, `xdplb status` and
//! `xdplb which-backend` as an operator would see them. Everything is torn down at the end, also
//! on failure.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use lb_tests::{
    netns::require_privileges,
    topology::{
        CLIENT_ADDR, IdentityServers, LbTopology, backend_addr, tally, tcp_ask, udp_ask, udp_client,
    },
};

#[derive(Parser)]
#[command(about = "Demonstrates xdplb on real traffic in network namespaces")]
struct Args {
    /// The config to run (its addresses must match the demo topology).
    #[arg(long, default_value = "configs/demo.toml")]
    config: PathBuf,
    /// The xdplb binary.
    #[arg(long, default_value = "target/release/xdplb")]
    xdplb: PathBuf,
    /// TCP connections to open.
    #[arg(long, default_value_t = 300)]
    connections: u32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !require_privileges("xdplb-demo") {
        eprintln!("the demo needs root (network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    match demo(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn section(title: &str) {
    println!("\n== {title}");
}

fn xdplb(args: &Args, socket: &std::path::Path, cli: &[&str]) -> Result<String> {
    let out = Command::new(&args.xdplb)
        .arg("--socket")
        .arg(socket)
        .args(cli)
        .output()
        .with_context(|| format!("running {}", args.xdplb.display()))?;
    if !out.status.success() {
        bail!(
            "xdplb {} failed: {}",
            cli.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn demo(args: &Args) -> Result<()> {
    // The topology helper finds the binary through XDPLB_BIN.
    // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("XDPLB_BIN", std::fs::canonicalize(&args.xdplb)?) };
    let loaded = lb_userspace::config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = loaded.config;
    let web = cfg
        .vips
        .iter()
        .find(|v| v.protocol == lb_userspace::config::Protocol::Tcp && v.address.is_ipv4())
        .context("the demo config needs an IPv4 TCP service (the demo topology is IPv4)")?;
    let udp = cfg
        .vips
        .iter()
        .find(|v| v.protocol == lb_userspace::config::Protocol::Udp && v.address.is_ipv4());

    section("Topology (network namespaces on one bridge)");
    let topo = LbTopology::new(3)?;
    println!("  client  {CLIENT_ADDR}");
    println!(
        "  lb      {} on eth0, VIP {} (driver-mode XDP)",
        topo.lb.addr, web.address
    );
    for (i, b) in topo.backends.iter().enumerate() {
        println!(
            "  b{}      {} (VIP on lo, arp_ignore=1, arp_announce=2)",
            i + 1,
            b.addr
        );
    }

    let mut servers = IdentityServers::new();
    for (i, b) in topo.backends.iter().enumerate() {
        let name = format!("b{} {}", i + 1, backend_addr(i));
        servers.tcp(
            &b.ns,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, web.port),
            &name,
        )?;
        if let Some(u) = udp {
            servers.udp(&b.ns, ipv4_service(u), &name)?;
        }
    }

    section(&format!("xdplb run --config {}", args.config.display()));
    let t = Instant::now();
    let agent = topo.start_agent_file(&args.config, &cfg.api.socket, &[])?;
    println!("  forwarding after {:?}; agent log:", t.elapsed());
    for line in agent.log_text().lines() {
        println!("    {line}");
    }

    section(&format!(
        "{} TCP connections to {}:{} (each answered by the backend that served it)",
        args.connections, web.address, web.port
    ));
    let t = Instant::now();
    let mut answers = Vec::new();
    let mut failed = 0;
    for _ in 0..args.connections {
        match tcp_ask(&topo.client.ns, None, ipv4_service(web)) {
            Ok(a) => answers.push(a),
            Err(_) => failed += 1,
        }
    }
    let elapsed = t.elapsed();
    let total_weight: u32 = web.backends.iter().map(|b| b.weight).sum();
    let counts = tally(answers.iter().map(String::as_str));
    println!(
        "  {:<16} {:>6} {:>8} {:>13}",
        "backend", "conns", "share", "weight share"
    );
    for (i, b) in web.backends.iter().enumerate() {
        let name = format!("b{} {}", i + 1, b.address);
        let n = counts.get(&name).copied().unwrap_or(0);
        println!(
            "  {:<16} {:>6} {:>7.1}% {:>12.1}%",
            name,
            n,
            100.0 * n as f64 / args.connections as f64,
            100.0 * b.weight as f64 / total_weight.max(1) as f64
        );
    }
    println!(
        "  {} answered, {failed} failed, in {elapsed:.2?}",
        answers.len()
    );
    if failed > 0 {
        bail!(
            "{failed} connections failed; agent log:\n{}",
            agent.log_text()
        );
    }

    if let Some(u) = udp {
        section(&format!(
            "UDP flows to {}:{}: every datagram of a flow reaches the same backend",
            u.address, u.port
        ));
        for port in 40001u16..=40006 {
            let src = SocketAddrV4::new(CLIENT_ADDR, port);
            let sock = udp_client(&topo.client.ns, src)?;
            let got: Vec<String> = (0..50)
                .map(|i| udp_ask(&sock, ipv4_service(u), format!("q{i}").as_bytes()))
                .collect::<Result<_>>()?;
            let t = tally(got.iter().map(String::as_str));
            println!("  flow from {src}: 50 datagrams -> {t:?}");
            if t.len() != 1 {
                bail!("UDP flow from {src} was split across backends");
            }
        }
    }

    section("xdplb status");
    print!("{}", indent(&xdplb(args, &agent.socket, &["status"])?));

    section("xdplb which-backend (same hash and table as the kernel)");
    let svc = format!("{}:{}/tcp", web.address, web.port);
    print!(
        "{}",
        indent(&xdplb(
            args,
            &agent.socket,
            &["which-backend", &svc, "10.0.0.1:40000"]
        )?)
    );

    section("Stopping xdplb (SIGTERM): the program is detached");
    let st = agent.stop();
    println!("  xdplb exited: {st}");
    drop(servers);
    drop(topo);
    println!("  namespaces removed. Done.");
    if !st.success() {
        bail!("xdplb did not exit cleanly");
    }
    Ok(())
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// An IPv4 service's address and port (the demo only picks IPv4 services).
fn ipv4_service(v: &lb_userspace::config::Vip) -> SocketAddrV4 {
    match v.socket() {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(a) => unreachable!("the demo picks IPv4 services, not {a}"),
    }
}
