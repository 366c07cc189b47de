//! `xdplb run`: the agent's life cycle.
//!
//! Order of start-up, each step failing with a clear error before the next touches the system:
//! 1. bind the API socket (refuses if another agent answers on it);
//! 2. look up the interface (exists, has a MAC; refuses if a foreign XDP program is attached);
//! 3. load the program and have the kernel verify it; write settings and VIPs;
//! 4. learn the backends' MACs (waiting up to `mac_wait` so the first table is complete);
//! 5. attach (or take over a data path a previous agent left running), then serve.
//!
//! It runs until `shutdown` resolves or SIGINT/SIGTERM arrives, then detaches the program, unless
//! `keep_forwarding` is set, in which case the data path is pinned and keeps forwarding with the
//! last tables.

use std::{
    collections::BTreeSet,
    future::Future,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiError, Request},
    config::{Config, XdpModeSetting},
    dataplane::{AttachMode, Dataplane, DataplaneError, LoadOptions, pin_dir, remove_pins},
    logging::{self, EbpfLogBridge, LogLevel},
    net::{self, MacTable, NetError, Netlink},
    reconciler::{ReconcileError, Reconciler, ring_entries_needed},
};

/// Ring entries reserved even for a small config, so services added later fit without
/// reloading the program (4 MiB).
pub const MIN_RING_ENTRIES: u32 = 1 << 20;

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Overrides `[dataplane] xdp_mode`.
    pub xdp_mode: Option<XdpModeSetting>,
    /// Leave the program attached (pinned) on exit.
    pub keep_forwarding: bool,
    pub log_level: LogLevel,
    /// How long to wait for backend MACs before attaching with whatever is resolved.
    pub mac_wait: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            xdp_mode: None,
            keep_forwarding: false,
            log_level: LogLevel::Info,
            mac_wait: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error(
        "interface {interface} already has an XDP program attached (program id {prog_id}) that \
         xdplb did not leave behind; detach it first (`ip link set dev {interface} xdp off`)"
    )]
    ForeignProgram { interface: String, prog_id: u32 },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the agent until `shutdown` resolves or a termination signal arrives.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let iface_name = config.dataplane.interface.clone();
    let socket_path: PathBuf = config.api.socket.clone();

    // 1. API socket first: a second agent must fail before touching the interface.
    let listener = api::bind(&socket_path).await?;
    let _socket_file = RemoveOnDrop(socket_path.clone());

    // 2. The interface.
    let nl = Netlink::new()?;
    let iface = nl.interface(&iface_name).await?;
    if !iface.up {
        warn!(interface = %iface_name, "interface is down: nothing will be forwarded until it is up");
    }
    let pins = pin_dir(&iface_name);
    let pinned = pins.join("link").exists();
    match (iface.xdp_prog_id, pinned) {
        (Some(prog_id), false) => {
            return Err(AgentError::ForeignProgram {
                interface: iface_name,
                prog_id,
            });
        }
        (None, true) => {
            // Pins of a data path that no longer runs (the interface was recreated, or someone
            // detached the program): nothing to take over.
            warn!(path = %pins.display(), "removing stale pins of a data path that is no longer attached");
            remove_pins(&pins);
        }
        _ => {}
    }
    check_backends_on_link(&nl, &config, iface.index).await;

    // 3. Program and maps.
    let ring_entries = ring_entries_needed(&config)?.max(MIN_RING_ENTRIES);
    let mut dp = Dataplane::load(LoadOptions { ring_entries })?;
    info!(
        program_id = ?dp.program_id(),
        ring_entries = dp.ring_capacity(),
        "XDP program loaded and verified"
    );
    let logger_task = match dp.take_logger(EbpfLogBridge) {
        Ok(logger) => Some(tokio::spawn(drain_ebpf_log(logger))),
        Err(e) => {
            warn!("data path diagnostics unavailable: {e}");
            None
        }
    };
    let mut rec = Reconciler::new(
        dp,
        &config,
        &iface_name,
        iface.index,
        iface.mac,
        opts.log_level,
    )?;

    // 4. Backend MACs.
    let (addrs_tx, addrs_rx) = watch::channel::<BTreeSet<Ipv4Addr>>(rec.wanted_addrs());
    let (mac_tx, mut mac_rx) = mpsc::channel::<MacTable>(4);
    let (cleanup_tx, cleanup_rx) = watch::channel(false);
    let watcher = tokio::spawn(net::watch_macs(
        nl.clone(),
        iface.index,
        addrs_rx,
        mac_tx,
        cleanup_rx,
    ));
    let deadline = Instant::now() + opts.mac_wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, mac_rx.recv()).await {
            Ok(Some(table)) => {
                let complete = table.values().all(Option::is_some);
                rec.apply_macs(table)?;
                if complete {
                    break;
                }
            }
            Ok(None) | Err(_) => {
                let status = rec.status()?;
                let missing: Vec<String> = status
                    .vips
                    .iter()
                    .flat_map(|v| v.backends.iter())
                    .filter(|b| b.mac.is_none())
                    .map(|b| b.address.clone())
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                if !missing.is_empty() {
                    warn!(
                        "no MAC yet for backend(s) {} after {:?}; starting without them, they \
                         join as soon as they answer ARP",
                        missing.join(", "),
                        opts.mac_wait
                    );
                }
                break;
            }
        }
    }

    // 5. Attach and serve.
    let mode = opts.xdp_mode.unwrap_or(config.dataplane.xdp_mode);
    let mut attached = rec.dataplane_mut().attach(&iface_name, iface.index, mode)?;
    if attached == AttachMode::Adopted {
        // The adopted link kept the mode it was created with; report that one.
        match nl.interface(&iface_name).await {
            Ok(i) => {
                if let Some(m) = i.xdp_mode.and_then(AttachMode::from_kernel) {
                    attached = m;
                }
            }
            Err(e) => warn!("could not read the adopted link's XDP mode: {e}"),
        }
    }
    rec.set_attach_mode(attached);
    info!(
        interface = %iface_name,
        mode = attached.as_str(),
        vips = config.vips.len(),
        api = %socket_path.display(),
        "xdplb is forwarding"
    );

    let (req_tx, mut req_rx) = mpsc::channel::<Request>(16);
    let (api_stop_tx, api_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(api::serve(listener, req_tx, async move {
        let _ = api_stop_rx.await;
    }));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => { info!("shutdown requested"); break }
            _ = sigint.recv() => { info!("SIGINT received, stopping"); break }
            _ = sigterm.recv() => { info!("SIGTERM received, stopping"); break }
            _ = sighup.recv() => {
                warn!("SIGHUP received: configuration reload is not supported yet; restart the \
                       agent to apply a changed config (forwarding continues unchanged)");
            }
            Some(table) = mac_rx.recv() => {
                if let Err(e) = rec.apply_macs(table) {
                    error!("applying backend MAC changes failed: {e}");
                }
            }
            Some(req) = req_rx.recv() => handle(&mut rec, req),
        }
    }

    // Shutdown: stop the API, stop watching MACs (removing our neighbour entries unless the data
    // path stays), then detach or persist.
    let _ = api_stop_tx.send(());
    let _ = api_task.await;
    let _ = cleanup_tx.send(!opts.keep_forwarding);
    drop(addrs_tx);
    drop(mac_rx);
    let _ = watcher.await;
    if let Some(t) = logger_task {
        t.abort();
    }
    let dp = rec.into_dataplane();
    if opts.keep_forwarding {
        let dir = dp.persist()?;
        info!(
            path = %dir.display(),
            "left the data path attached and pinned; the next `xdplb run` on this interface \
             takes it over"
        );
    } else {
        let mut dp = dp;
        dp.detach()?;
    }
    Ok(())
}

/// Removes the API socket file however `run` ends, so no stale socket is left behind.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn handle(rec: &mut Reconciler, req: Request) {
    match req {
        Request::Status(reply) => {
            let _ = reply.send(rec.status().map_err(|e| e.to_string()));
        }
        Request::WhichBackend {
            vip,
            proto,
            src,
            reply,
        } => {
            let _ = reply.send(
                rec.which_backend(vip, proto, src)
                    .map_err(|e| e.to_string()),
            );
        }
        Request::SetLogLevel { level, reply } => {
            let r = rec.set_log_level(level).map_err(|e| e.to_string());
            if r.is_ok() {
                logging::set_level(level);
                info!(%level, "log level changed (agent and data path)");
            }
            let _ = reply.send(r);
        }
    }
}

/// dsr-l2 only works for backends on the interface's L2 segment; say so early for the others.
async fn check_backends_on_link(nl: &Netlink, config: &Config, ifindex: u32) {
    let addrs: BTreeSet<Ipv4Addr> = config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(|b| b.address))
        .collect();
    for addr in addrs {
        match nl.route_to(addr).await {
            Ok(r) if r.local => warn!(
                backend = %addr,
                "backend address is local to this host; dsr-l2 cannot forward to ourselves"
            ),
            Ok(r) if r.gateway.is_some() || r.oif != Some(ifindex) => warn!(
                backend = %addr,
                gateway = ?r.gateway,
                oif = ?r.oif,
                "backend is not directly on the load-balancing interface's segment; dsr-l2 \
                 needs backends on the same L2 segment, so it stays out of the table until its \
                 MAC resolves there"
            ),
            Ok(_) => {}
            Err(e) => warn!(backend = %addr, "route lookup failed: {e}"),
        }
    }
}

/// Forwards the data path's log records until the task is aborted.
async fn drain_ebpf_log(logger: aya_log::EbpfLogger<EbpfLogBridge>) {
    // SAFETY: the logger owns its ring buffer's fd for its whole life and always returns it.
    let registered =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("data path diagnostics unavailable: {e}");
            return;
        }
    };
    loop {
        match fd.readable_mut().await {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                warn!("reading data path diagnostics failed: {e}");
                return;
            }
        }
    }
}
