//! `xdplb run`: the agent's life cycle.
//!
//! Order of start-up, each step failing with a clear error before the next touches the system:
//! 1. install the SIGINT/SIGTERM handlers (a signal during start-up stops it cleanly);
//! 2. bind the API socket (refuses if another agent answers on it);
//! 3. look up the interface (exists, has a MAC; refuses if an XDP program xdplb did not leave
//!    behind is attached);
//! 4. load the program and have the kernel verify it; write settings and VIPs;
//! 5. learn the backends' MACs (waiting up to `mac_wait` so the first table is complete);
//! 6. attach (or take over a data path a previous agent left running), then serve.
//!
//! With `replace` ([`RunOptions::replace`], `xdplb run --replace`) and an agent answering on the
//! API socket, step 2 waits: steps 3 to 5 run while that agent keeps serving, then it is asked
//! to stop with its data path attached and, once it has exited, this one binds the API and
//! attaches, swapping its program into the pinned link (see [`crate::replace`]).
//!
//! It runs until `shutdown` resolves or SIGINT/SIGTERM arrives, then detaches the program, unless
//! `keep_forwarding` is set, in which case the data path stays attached (pinned) and keeps
//! forwarding with the last tables. However it ends, the API socket file goes, and the neighbour
//! entries it made are removed unless the data path stays.

use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    pin::Pin,
    time::{Duration, Instant},
};

use futures::FutureExt as _;
use thiserror::Error;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiError, Failure, Request},
    config::{self, Config, XdpModeSetting},
    dataplane::{
        AttachMode, Attached, Dataplane, DataplaneError, LoadOptions, pin_dir, remove_pins,
    },
    ha::{self, Ha},
    health::{self, Scheduler},
    logging::{self, EbpfLogBridge, LogLevel},
    net::{self, MacTable, NetError, Netlink},
    reconciler::{ReconcileError, Reconciler},
    status,
};

/// Ring entries reserved even for a small config, so services added later fit without
/// reloading the program (4 MiB).
pub const MIN_RING_ENTRIES: u32 = 1 << 20;
/// How long a failed apply waits before it is tried again.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Upper bound on each shutdown step, so a stuck peer cannot keep the agent from exiting.
const SHUTDOWN_STEP: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Overrides `[dataplane] xdp_mode`.
    pub xdp_mode: Option<XdpModeSetting>,
    /// Leave the program attached (pinned) on exit.
    pub keep_forwarding: bool,
    pub log_level: LogLevel,
    /// How long to wait for backend MACs before attaching with whatever is resolved.
    pub mac_wait: Duration,
    /// The file the config came from: `xdplb reload` and SIGHUP read it again. Without it
    /// (an agent run in-process with a config built in memory) reloading is refused.
    pub config_path: Option<PathBuf>,
    /// Take the place of the agent answering on the API socket (`xdplb run --replace`), once
    /// this one's data path is ready; without one, start normally.
    pub replace: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            xdp_mode: None,
            keep_forwarding: false,
            log_level: LogLevel::Info,
            mac_wait: Duration::from_secs(3),
            config_path: None,
            replace: false,
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
        "interface {interface} already has an XDP program attached (program id {prog_id}, name \
         `{name}`) that xdplb did not leave behind; xdplb never replaces it. Detach it first \
         (`ip link set dev {interface} xdp off`){hint}"
    )]
    ForeignProgram {
        interface: String,
        prog_id: u32,
        name: String,
        hint: &'static str,
    },
    #[error(transparent)]
    Ha(#[from] ha::HaError),
    #[error(transparent)]
    Replace(#[from] crate::replace::ReplaceError),
    #[error(
        "{source}\nThe replaced agent (pid {pid}) has exited; the data path stays attached and \
         forwarding with {which} program and tables (pinned under {pins}), but no agent manages \
         it now{ha}. Fix the cause and start `xdplb run` again: it takes the data path over and \
         adopts the connection table"
    )]
    AfterReplace {
        pid: u32,
        /// "its" (the swap had not happened) or "this agent's".
        which: &'static str,
        pins: PathBuf,
        /// A word about the VIP addresses a replaced VRRP master left.
        ha: &'static str,
        #[source]
        source: Box<AgentError>,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What ends the agent: the injected future, SIGINT or SIGTERM.
struct Stop {
    sigint: Signal,
    sigterm: Signal,
    shutdown: Pin<Box<dyn Future<Output = ()>>>,
}

impl Stop {
    async fn wait(&mut self) -> &'static str {
        tokio::select! {
            _ = &mut self.shutdown => "shutdown requested",
            _ = self.sigint.recv() => "SIGINT received",
            _ = self.sigterm.recv() => "SIGTERM received",
        }
    }
}

/// The MAC watcher task and its channels; [`MacWatcher::stop`] ends it.
struct MacWatcher {
    addrs: watch::Sender<BTreeSet<IpAddr>>,
    tables: mpsc::Receiver<MacTable>,
    cleanup: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MacWatcher {
    fn start(nl: Netlink, ifindex: u32, addrs: BTreeSet<IpAddr>) -> MacWatcher {
        let (addrs_tx, addrs_rx) = watch::channel(addrs);
        let (tables_tx, tables) = mpsc::channel(4);
        let (cleanup, cleanup_rx) = watch::channel(true);
        let task = tokio::spawn(net::watch_macs(
            nl, ifindex, addrs_rx, tables_tx, cleanup_rx,
        ));
        MacWatcher {
            addrs: addrs_tx,
            tables,
            cleanup,
            task,
        }
    }

    /// Stops the watcher; it removes the neighbour entries xdplb made if `cleanup`.
    async fn stop(self, cleanup: bool) {
        let MacWatcher {
            addrs,
            tables,
            cleanup: cleanup_tx,
            task,
        } = self;
        let _ = cleanup_tx.send(cleanup);
        drop(addrs);
        drop(tables);
        if tokio::time::timeout(SHUTDOWN_STEP, task).await.is_err() {
            warn!("the MAC watcher did not stop in time; neighbour entries may remain");
        }
    }
}

/// Removes the API socket file however `run` ends, so no stale socket is left behind.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the agent until `shutdown` resolves or a termination signal arrives.
pub async fn run(
    config: Config,
    opts: RunOptions,
    shutdown: impl Future<Output = ()> + 'static,
) -> Result<(), AgentError> {
    // 1. Signals first: until they are handled, SIGTERM would kill the process mid-way.
    let mut stop = Stop {
        sigint: signal(SignalKind::interrupt())?,
        sigterm: signal(SignalKind::terminate())?,
        shutdown: Box::pin(shutdown.fuse()),
    };

    // 2. API socket: a second agent must fail before touching the interface, unless it is to
    // replace the running one, which keeps its socket until this one is ready.
    let replacing = opts.replace && crate::replace::running(&config.api.socket).await;
    if opts.replace && !replacing {
        info!(
            socket = %config.api.socket.display(),
            "--replace: no agent answers on the API socket; starting normally"
        );
    }
    let (api_start, _socket_file) = if replacing {
        info!(
            socket = %config.api.socket.display(),
            "--replace: an agent is running; it keeps serving until this one's data path is ready"
        );
        (ApiStart::Replace, None)
    } else {
        let listeners = api::bind_all(&config.api).await?;
        (
            ApiStart::Bound(listeners),
            Some(RemoveOnDrop(config.api.socket.clone())),
        )
    };

    // 3. The interface.
    let iface_name = config.dataplane.interface.clone();
    let nl = Netlink::new()?;
    let iface = nl.interface(&iface_name).await?;
    if !iface.up {
        warn!(interface = %iface_name, "interface is down: nothing will be forwarded until it is up");
    }
    let pins = pin_dir(&iface_name);
    match (iface.xdp_prog_id, pins.join("link").exists()) {
        (Some(prog_id), false) => {
            let name = program_name(prog_id).unwrap_or_else(|| "?".to_string());
            let hint = if name == lb_common::maps::PROG_XDPLB {
                "; it looks like another xdplb agent, running with another API socket"
            } else {
                ""
            };
            return Err(AgentError::ForeignProgram {
                interface: iface_name,
                prog_id,
                name,
                hint,
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

    // 4. Program and maps.
    let ring_entries = config.ring_entries_needed().max(MIN_RING_ENTRIES);
    // The connection table lives in a pin next to the link's, so that a restarted agent (after
    // a crash, or `--keep-forwarding`) keeps established flows on their backends.
    let (mut dp, adopted) = Dataplane::load_adopting(
        LoadOptions {
            ring_entries,
            flow_entries: config.flows.entries,
            flow6_entries: config.flows.entries_v6,
        },
        &pins,
    )?;
    info!(
        program_id = ?dp.program_id(),
        ring_entries = dp.ring_capacity(),
        "XDP program loaded and verified"
    );
    if adopted.flows || adopted.flows6 {
        info!(
            path = %pins.display(),
            ipv4 = adopted.flows,
            ipv6 = adopted.flows6,
            "adopted the connection table a previous agent left: established flows keep their \
             backends"
        );
    }
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

    // 5 and 6. From here on neighbour entries may exist: whatever happens, the watcher is stopped
    // and cleans up, unless the data path stays.
    let mut watcher = MacWatcher::start(nl.clone(), iface.index, rec.wanted_addrs());
    let mut keep_requested = opts.keep_forwarding;
    let mut replaced = None;
    let outcome = serve(
        &mut rec,
        &mut watcher,
        &nl,
        iface.index,
        api_start,
        &config,
        &opts,
        &mut stop,
        Served {
            keep: &mut keep_requested,
            replaced: &mut replaced,
            adopted_flows: adopted.flows,
        },
    )
    .await;
    let keep = keep_requested && matches!(outcome, Ok(true));
    // While replacing, the neighbour entries are also the running (or replaced) agent's: an
    // agent that did not get to serve leaves them.
    let leave_neighbours = keep || (replacing && !matches!(outcome, Ok(true)));
    watcher.stop(!leave_neighbours).await;
    if let Some(t) = logger_task {
        t.abort();
    }
    if outcome.is_err()
        && let Some(old) = &replaced
    {
        // The old agent is gone: whatever runs in the link must stay there.
        let swapped = rec.attach_mode().is_some();
        let dp = rec.into_dataplane();
        if swapped && let Err(p) = dp.persist() {
            error!("keeping the data path attached failed: {p}");
        }
        return Err(AgentError::AfterReplace {
            pid: old.pid,
            which: if swapped { "this agent's" } else { "its" },
            pins: pins.clone(),
            ha: if old.was_master() {
                "; the VIP addresses it held as VRRP master stay on the interface, without \
                 adverts, so the backup takes over after its master-down interval"
            } else {
                ""
            },
            source: Box::new(outcome.expect_err("matched above")),
        });
    }
    let attached = outcome?;
    let dp = rec.into_dataplane();
    if keep {
        let dir = dp.persist()?;
        info!(
            path = %dir.display(),
            "left the data path attached and pinned; the next `xdplb run` on this interface \
             takes it over"
        );
    } else if attached {
        let mut dp = dp;
        dp.detach()?;
    }
    Ok(())
}

/// How the API comes up: bound at start-up, or once the running agent has been replaced.
enum ApiStart {
    Bound(api::Listeners),
    /// `--replace` while another agent serves on the socket.
    Replace,
}

/// What [`serve`] tells [`run`] besides whether it attached.
struct Served<'a> {
    /// Leave the data path attached on exit: `--keep-forwarding`, or asked for over the API.
    keep: &'a mut bool,
    /// The agent this one replaced, as soon as it has exited.
    replaced: &'a mut Option<crate::replace::Replaced>,
    /// Whether the connection table was adopted from a pin (for the replacement's log line).
    adopted_flows: bool,
}

/// Waits for MACs, (with `--replace`, replaces the running agent,) attaches, serves until told
/// to stop. Returns whether the program got attached.
#[expect(
    clippy::too_many_arguments,
    reason = "the pieces run() owns; one call site"
)]
async fn serve(
    rec: &mut Reconciler,
    watcher: &mut MacWatcher,
    nl: &Netlink,
    ifindex: u32,
    api_start: ApiStart,
    config: &Config,
    opts: &RunOptions,
    stop: &mut Stop,
    out: Served<'_>,
) -> Result<bool, AgentError> {
    let iface_name = &config.dataplane.interface;
    let deadline = Instant::now() + opts.mac_wait;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            why = stop.wait() => {
                info!("{why} during start-up; stopping before attaching");
                return Ok(false);
            }
            got = tokio::time::timeout(remaining, watcher.tables.recv()) => match got {
                Ok(Some(table)) => {
                    let complete = table.values().all(Option::is_some);
                    rec.apply_macs(table).await?;
                    if complete {
                        break;
                    }
                }
                Ok(None) | Err(_) => {
                    let missing = rec.unresolved();
                    if !missing.is_empty() {
                        let list: Vec<String> = missing.iter().map(|a| a.to_string()).collect();
                        warn!(
                            "no MAC yet for backend(s) {} after {:?}; starting without them, \
                             they join as soon as they answer ARP",
                            list.join(", "),
                            opts.mac_wait
                        );
                    }
                    break;
                }
            },
        }
    }

    // Everything that can fail before the swap has been done: only now is a running agent
    // asked to go, and its API socket (and TCP address) taken once it has exited.
    let mut _socket_file = None;
    let mut switch_start = None;
    let listeners = match api_start {
        ApiStart::Bound(listeners) => listeners,
        ApiStart::Replace => {
            let started = Instant::now();
            let old =
                crate::replace::stop_running(&config.api.socket, crate::replace::EXIT_TIMEOUT)
                    .await?;
            info!(
                pid = old.pid,
                program_id = ?old.reply.program_id,
                ha_state = ?old.reply.ha_state,
                took = ?old.stop_took,
                "the running agent stopped, leaving its data path attached"
            );
            *out.replaced = Some(old);
            switch_start = Some(started);
            let listeners = api::bind_all(&config.api).await?;
            _socket_file = Some(RemoveOnDrop(config.api.socket.clone()));
            listeners
        }
    };

    let mode = opts.xdp_mode.unwrap_or(config.dataplane.xdp_mode);
    let attached = match rec.dataplane_mut().attach(iface_name, ifindex, mode)? {
        Attached::New(m) => m,
        Attached::TookOver => {
            // The link kept the mode it was created with; the kernel knows which.
            let kernel = nl.interface(iface_name).await.ok().and_then(|i| i.xdp_mode);
            AttachMode::from_kernel(kernel)
        }
    };
    rec.set_attach_mode(attached);
    if let (Some(old), Some(started)) = (out.replaced.as_ref(), switch_start) {
        log_replaced(rec, iface_name, old, started, out.adopted_flows);
    }
    info!(
        interface = %iface_name,
        mode = attached.as_str(),
        vips = config.vips.len(),
        api = %config.api.socket.display(),
        "xdplb is forwarding"
    );

    // HA starts once the data path forwards: a node must never hold the VIPs before it can
    // serve them. It starts as backup and only becomes master after the master-down interval.
    let mut attached_now = true;
    // A master replaced with `--replace` kept the VIPs and did not resign: this agent carries
    // on as master at once, so the backups never see a gap longer than the switch.
    let as_master = out
        .replaced
        .as_ref()
        .is_some_and(crate::replace::Replaced::was_master);
    let mut ha = match &config.ha {
        Some(cfg) => Some(
            Ha::start_as(
                cfg.clone(),
                nl.clone(),
                rec.vip_addresses(),
                ha_inputs(rec, attached_now),
                as_master,
            )
            .await?,
        ),
        None => None,
    };
    let mut ha_digest_rebuilds = None;
    sync_ha(rec, ha.as_ref(), &mut ha_digest_rebuilds, attached_now);
    // Someone may detach the program behind our back (`bpftool link detach`); a node that no
    // longer forwards must not hold the VIPs.
    let mut attach_check = tokio::time::interval(Duration::from_secs(1));
    attach_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (report_tx, mut reports) = mpsc::channel::<health::Report>(256);
    let mut checks = Scheduler::new(report_tx);
    checks.sync(rec.check_specs());
    info!(checks = checks.len(), "health checks started");
    let mut rates = tokio::time::interval(Duration::from_secs(status::RATE_PERIOD_SECS));
    rates.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (req_tx, mut req_rx) = mpsc::channel::<Request>(16);
    let (api_stop_tx, api_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api_task = tokio::spawn(api::serve_all(listeners, req_tx, async move {
        let _ = api_stop_rx.await;
    }));
    let mut sighup = signal(SignalKind::hangup())?;
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `POST /v1/shutdown`: answered once HA and the checks have stopped.
    let mut shutdown_request = None;
    loop {
        // Far enough to never fire when no removed backend is in its grace.
        let grace_end = rec
            .next_removal_deadline()
            .unwrap_or_else(|| std::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            why = stop.wait() => { info!("{why}, stopping"); break }
            _ = tokio::time::sleep_until(grace_end.into()) => {
                if let Err(e) = rec.expire_removed() {
                    warn!("ending a removed backend's grace failed (retrying): {e}");
                }
            }
            _ = sighup.recv() => {
                info!("SIGHUP received: reloading the configuration");
                // The outcome is logged by reload() itself.
                let _ = reload(rec, opts.config_path.as_deref()).await;
                after_change(rec, watcher, &mut checks);
            }
            Some(report) = reports.recv() => {
                if checks.is_current(&report) {
                    // A failed apply is logged by the reconciler and retried with the others.
                    let _ = rec.health_report(report.key, report.outcome).await;
                }
            }
            _ = attach_check.tick(), if ha.is_some() => {
                let ours = rec.dataplane().program_id();
                let now = match nl.interface(iface_name).await {
                    Ok(i) => i.xdp_prog_id.is_some() && i.xdp_prog_id == ours,
                    Err(e) => {
                        warn!("checking that the program is still attached failed: {e}");
                        attached_now
                    }
                };
                if now != attached_now {
                    if now {
                        info!(interface = %iface_name, "the XDP program is attached again");
                    } else {
                        error!(
                            interface = %iface_name,
                            "the XDP program is no longer attached (detached by someone else?); \
                             nothing is forwarded. Restart the agent to attach it again"
                        );
                    }
                    attached_now = now;
                }
            }
            _ = rates.tick() => {
                if let Err(e) = rec.sample_rates() {
                    warn!("reading counters for rates failed: {e}");
                }
            }
            Some(table) = watcher.tables.recv() => {
                if let Err(e) = rec.apply_macs(table).await {
                    error!("applying backend MAC changes failed (retrying every {RETRY_INTERVAL:?}): {e}");
                }
            }
            _ = retry.tick(), if rec.needs_retry() => {
                if rec.resync().await.is_ok() {
                    info!("changes applied after retrying");
                }
            }
            Some(req) = req_rx.recv() => {
                if let Request::Shutdown { keep_forwarding, reply } = req {
                    info!(
                        keep_forwarding,
                        "stop requested over the API{}",
                        if keep_forwarding {
                            ": the data path stays attached for the agent replacing this one"
                        } else {
                            ""
                        }
                    );
                    shutdown_request = Some((keep_forwarding, reply));
                    break;
                }
                // Only these change which backends exist (status polls must not re-derive the
                // check list every time).
                let backends_change = matches!(
                    req,
                    Request::AddBackend { .. }
                        | Request::RemoveBackend { .. }
                        | Request::AddVip { .. }
                        | Request::RemoveVip { .. }
                        | Request::Reload { .. }
                );
                handle(rec, req, opts.config_path.as_deref(), ha.as_ref()).await;
                if backends_change {
                    after_change(rec, watcher, &mut checks);
                }
            }
        }
        sync_ha(rec, ha.as_ref(), &mut ha_digest_rebuilds, attached_now);
    }
    let handing_over = shutdown_request.as_ref().is_some_and(|(keep, _)| *keep);
    let mut ha_state = ha.as_ref().map(|h| h.status().state);
    if let Some(ha) = ha.take() {
        if handing_over {
            // The next agent carries on with the VIPs: no resignation, no failover.
            ha_state = ha.detach().await.map(|s| s.to_string());
        } else {
            // Before the data path goes: the peer takes over at once on our priority-0 advert.
            ha.stop().await;
        }
    }
    checks.stop_all();
    // Requests still queued or arriving now are answered "shutting down" rather than left
    // waiting, which would keep the server's graceful shutdown from finishing.
    drop(req_rx);
    if let Some((keep, reply)) = shutdown_request {
        *out.keep |= keep;
        let _ = reply.send(Ok(api::ShutdownReply {
            pid: std::process::id(),
            keep_forwarding: *out.keep,
            program_id: rec.dataplane().program_id(),
            ha_state,
        }));
    }
    let _ = api_stop_tx.send(());
    if tokio::time::timeout(SHUTDOWN_STEP, api_task).await.is_err() {
        warn!("the API did not stop in time");
    }
    Ok(true)
}

/// The info line of a replacement: who went, which program runs the link now, and what the
/// connection table holds.
fn log_replaced(
    rec: &Reconciler,
    iface_name: &str,
    old: &crate::replace::Replaced,
    started: Instant,
    adopted_flows: bool,
) {
    let fmt = |id: Option<u32>| id.map_or_else(|| "?".to_string(), |i| i.to_string());
    let link = crate::dataplane::pinned_link_ids(iface_name).ok();
    let entries = rec
        .dataplane()
        .flows(1, usize::MAX, |_, _| false)
        .map(|(_, read)| read.to_string())
        .unwrap_or_else(|e| format!("? ({e})"));
    let table = if adopted_flows {
        format!("connection table adopted ({entries} entries)")
    } else {
        format!("a new connection table ({entries} entries)")
    };
    info!(
        pid = old.pid,
        old_program_id = ?old.reply.program_id,
        program_id = ?rec.dataplane().program_id(),
        link_id = ?link.map(|l| l.0),
        flows_map_id = ?crate::dataplane::pinned_flows_id(iface_name),
        switch_ms = started.elapsed().as_secs_f64() * 1e3,
        "replaced agent pid {}; program id {} -> {}, link id {}, {table}; switched in {:.1} ms \
         (the old agent took {:.1} ms to stop)",
        old.pid,
        fmt(old.reply.program_id),
        fmt(rec.dataplane().program_id()),
        fmt(link.map(|l| l.0)),
        started.elapsed().as_secs_f64() * 1e3,
        old.stop_took.as_secs_f64() * 1e3,
    );
}

/// Keeps the MAC watcher and the health checks in step with the backends the reconciler has
/// after an operator change or a reload.
fn after_change(rec: &Reconciler, watcher: &MacWatcher, checks: &mut Scheduler) {
    let wanted = rec.wanted_addrs();
    watcher.addrs.send_if_modified(|addrs| {
        let changed = *addrs != wanted;
        if changed {
            *addrs = wanted;
        }
        changed
    });
    checks.sync(rec.check_specs());
}

/// What HA tracking needs: whether the program is still attached (checked every second) and
/// which VIPs have no healthy backend.
fn ha_inputs(rec: &Reconciler, attached: bool) -> ha::Inputs {
    ha::Inputs {
        attached: attached && rec.attach_mode().is_some(),
        vips_down: rec.vips_down(),
    }
}

/// Tells HA what changed: tracking inputs, the VIP addresses, and the table digest (only
/// recomputed when tables were rebuilt, as it reads every table).
fn sync_ha(rec: &Reconciler, ha: Option<&Ha>, digest_at: &mut Option<u64>, attached: bool) {
    let Some(ha) = ha else { return };
    ha.set_inputs(ha_inputs(rec, attached));
    ha.set_vips(rec.vip_addresses());
    let rebuilds = rec.table_rebuilds();
    if *digest_at != Some(rebuilds) {
        *digest_at = Some(rebuilds);
        ha.set_digest(rec.table_digest());
    }
}

/// Maps a reconciler error to the API's answer.
fn failure(e: ReconcileError) -> Failure {
    let status = match &e {
        ReconcileError::NoSuchVip(_) | ReconcileError::NoSuchBackend { .. } => 404,
        ReconcileError::Invalid(_) => 400,
        ReconcileError::Conflict(_)
        | ReconcileError::NeedsRestart(_)
        | ReconcileError::TooManyVips { .. }
        | ReconcileError::TooManyBackends { .. }
        | ReconcileError::RingFull { .. } => 409,
        _ => 500,
    };
    Failure {
        status,
        message: e.to_string(),
    }
}

/// Reads the config file again and applies what changed. Logs the outcome either way.
async fn reload(rec: &mut Reconciler, path: Option<&Path>) -> Result<Vec<String>, Failure> {
    let Some(path) = path else {
        let f = Failure {
            status: 409,
            message: "this agent was not started from a config file; nothing to reload".to_string(),
        };
        warn!("reload refused: {}", f.message);
        return Err(f);
    };
    let loaded = match config::load(path) {
        Ok(l) => l,
        Err(e) => {
            error!(
                "reload refused, the running state is unchanged: {} is not valid:\n{e}",
                path.display()
            );
            return Err(Failure {
                status: 400,
                message: format!("{e}\nreload refused: the running state is unchanged"),
            });
        }
    };
    for w in &loaded.warnings {
        warn!("{}", w.in_file(path));
    }
    match rec.apply_config(loaded.config).await {
        Ok(changes) => {
            if changes.is_empty() {
                info!(file = %path.display(), "reloaded: no changes");
            }
            for c in &changes {
                info!(file = %path.display(), "reloaded: {c}");
            }
            Ok(changes)
        }
        Err(e) => {
            error!("reload of {} failed: {e}", path.display());
            Err(failure(e))
        }
    }
}

async fn handle(rec: &mut Reconciler, req: Request, config_path: Option<&Path>, ha: Option<&Ha>) {
    match req {
        Request::Status(reply) => {
            let status = rec.status().map(|mut s| {
                s.ha = ha.map(Ha::status);
                s
            });
            let _ = reply.send(status.map_err(failure));
        }
        Request::Ha { op, reply } => {
            let Some(ha) = ha else {
                let _ = reply.send(Err(Failure {
                    status: 409,
                    message: "HA is not configured on this node (no [ha] section)".to_string(),
                }));
                return;
            };
            let outcome = match op {
                api::HaOp::Status => None,
                api::HaOp::Handover => Some(futures::future::Either::Left(ha.handover())),
                api::HaOp::Resume => Some(futures::future::Either::Right(ha.resume())),
            };
            let status = ha.status_watch();
            // A handover takes up to the master-down interval; the agent keeps serving meanwhile.
            tokio::spawn(async move {
                let outcome = match outcome {
                    Some(f) => f.await,
                    None => Ok(String::new()),
                };
                let _ = reply.send(match outcome {
                    Ok(message) => Ok(api::HaReply {
                        message,
                        status: status.borrow().clone(),
                    }),
                    Err(message) => Err(Failure {
                        status: 409,
                        message,
                    }),
                });
            });
        }
        Request::WhichBackend {
            vip,
            proto,
            src,
            reply,
        } => {
            let _ = reply.send(rec.which_backend(vip, proto, src).map_err(failure));
        }
        Request::Flows { vip, limit, reply } => {
            let _ = reply.send(rec.flows(vip.as_deref(), limit).map_err(failure));
        }
        Request::SetLogLevel { level, reply } => {
            let r = rec.set_log_level(level).map_err(failure);
            if r.is_ok() {
                logging::set_level(level);
                info!(%level, "log level changed (agent and data path)");
            }
            let _ = reply.send(r);
        }
        Request::Drain {
            vip,
            backend,
            drain,
            reply,
        } => {
            let _ = reply.send(rec.set_drain(&vip, backend, drain).await.map_err(failure));
        }
        Request::SetWeight {
            vip,
            backend,
            weight,
            reply,
        } => {
            let _ = reply.send(rec.set_weight(&vip, backend, weight).await.map_err(failure));
        }
        Request::AddBackend {
            vip,
            backend,
            weight,
            backup,
            reply,
        } => {
            let r = rec.add_backend(&vip, backend, weight, backup).await;
            let _ = reply.send(r.map_err(failure));
        }
        Request::RemoveBackend {
            vip,
            backend,
            reply,
        } => {
            let _ = reply.send(rec.remove_backend(&vip, backend).await.map_err(failure));
        }
        Request::AddVip { vip, reply } => {
            let _ = reply.send(rec.add_vip_live(*vip).await.map_err(failure));
        }
        Request::RemoveVip { vip, reply } => {
            let _ = reply.send(rec.remove_vip(&vip).await.map_err(failure));
        }
        Request::Reload { reply } => {
            let _ = reply.send(reload(rec, config_path).await);
        }
        Request::Shutdown { reply, .. } => {
            // serve() takes these before they get here.
            let _ = reply.send(Err(Failure::internal(
                "shutdown is handled by the agent loop",
            )));
        }
    }
}

/// The name of a loaded BPF program, for messages.
fn program_name(id: u32) -> Option<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_string))
}

/// dsr-l2 only works for backends on the interface's L2 segment; say so early for the others.
async fn check_backends_on_link(nl: &Netlink, config: &Config, ifindex: u32) {
    let addrs: BTreeSet<IpAddr> = config
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
