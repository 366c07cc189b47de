//! The reconciler: the only code that writes the data path's maps.
//!
//! It holds the desired state (the config, the backend MACs the kernel reported, the health
//! checks' verdicts and the operator's drains, weights and additions), builds each VIP's Maglev
//! table over the backends that can take traffic (see [`Serving`]: the ready primaries, else the
//! ready backups, else what `all_down` says), and applies only what changed. Health reports,
//! operator commands and reloads are inputs to it; none of them touches a map.
//!
//! Guarantees:
//! - A table change is atomic for the data path: every VIP owns a ring region of two halves; the
//!   new table is written into the half not in use, then the VIP's entry in the data path's VIP
//!   table is switched to it (one atomic store). A half that stopped being live is
//!   not rewritten within [`HALF_REUSE_GRACE`], so a program run that read the old entry still
//!   reads the old table.
//! - A backend's map entry (with its MAC) is written before any table that references it is
//!   published. Entries are not cleared when a backend leaves the table: a packet in flight with
//!   the previous table still finds its backend.
//! - What the reconciler believes is applied only changes when the map write succeeded; a failed
//!   apply leaves [`needs_retry`](Reconciler::needs_retry) set, and [`resync`](Reconciler::resync)
//!   tries again.
//! - Tables are a pure function of (backend addresses, weights, eligibility, table size), so two
//!   nodes with the same config and the same reachable backends publish identical tables.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant, SystemTime},
};

use lb_common::{
    Reason,
    flows::FlowStat,
    hash::{flow_hash_of, flow_slot_of},
    maps::{
        BACKEND_F_DOWN, BACKEND_F_READY, BackendInfo, Counter, Flow6Key, FlowEntry, FlowKey,
        MAX_BACKENDS, MAX_VIPS, Settings, VipInfo,
    },
};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::{
    config::{self, AllDown, Config, Protocol},
    dataplane::{AttachMode, Dataplane, DataplaneError, ServiceKey, monotonic_ns},
    health::{CheckKey, CheckSpec, Health, Tracker},
    logging::LogLevel,
    maglev::{self, MaglevBackend},
    net::{MacTable, fmt_mac},
    probe::{Outcome, Probe, Target},
    status::{
        BackendStatus, FlowEventStatus, FlowStatus, FlowTableStatus, FlowsReport, HealthStatus,
        ReasonStatus, RemovingStatus, Status, VipStatus, WhichBackend,
    },
};

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("vip {vip}: building its Maglev table failed: {source}")]
    Maglev {
        vip: String,
        #[source]
        source: maglev::MaglevError,
    },
    #[error("the data path's ring is full: vip {vip} needs {needed} entries")]
    RingFull { vip: String, needed: u32 },
    #[error("too many VIPs (at most {max})")]
    TooManyVips { max: u32 },
    #[error("too many backends (at most {max} VIP/backend pairs)")]
    TooManyBackends { max: u32 },
    #[error("no service {0}")]
    NoSuchVip(String),
    #[error("vip {vip} has no backend {backend}")]
    NoSuchBackend { vip: String, backend: IpAddr },
    /// The request itself is wrong (an HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The request clashes with what runs (an HTTP 409).
    #[error("{0}")]
    Conflict(String),
    #[error(
        "this change needs a restart of the agent ({0}); nothing was applied, the running state \
         is unchanged"
    )]
    NeedsRestart(String),
}

/// How long a table half that stopped being live is left alone before it is rewritten. XDP runs
/// to completion within microseconds with preemption disabled; this is a wide margin.
pub const HALF_REUSE_GRACE: Duration = Duration::from_millis(10);

/// The map operations the reconciler performs. [`Dataplane`] is the real one; the unit tests use
/// a recording fake.
pub trait Maps {
    fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError>;
    /// Publishes or changes a service of either family ([`Dataplane::set_service`]).
    fn set_vip(&mut self, key: &ServiceKey, info: &VipInfo) -> Result<(), DataplaneError>;
    fn vip(&self, key: &ServiceKey) -> Option<VipInfo>;
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
    /// How many services `addr` has ([`Dataplane::set_service_addr`]).
    fn set_vip_addr(&mut self, addr: IpAddr, count: u32) -> Result<(), DataplaneError>;
    fn ring_capacity(&self) -> u32;
    fn write_ring(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError>;
    fn ring_entry(&self, index: u32) -> Option<u32>;
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DataplaneError>;
    fn reset_vip_stats(&mut self, index: u32) -> Result<(), DataplaneError>;
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn vip_counter(&self, index: u32) -> Result<Counter, DataplaneError>;
    fn backend_counter(&self, id: u32) -> Result<Counter, DataplaneError>;
    fn reason_counters(&self) -> Result<[Counter; Reason::COUNT as usize], DataplaneError>;
    fn flow_counters(&self) -> Result<[u64; FlowStat::COUNT as usize], DataplaneError>;
    fn flow_capacity(&self) -> u32;
    fn flow6_capacity(&self) -> u32;
    /// See [`Dataplane::flows`].
    fn flows(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<(Vec<(FlowKey, FlowEntry)>, usize), DataplaneError>;
    /// See [`Dataplane::flows6`].
    fn flows6(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&Flow6Key, &FlowEntry) -> bool,
    ) -> Result<(Vec<(Flow6Key, FlowEntry)>, usize), DataplaneError>;
    fn program_id(&self) -> Option<u32>;
}

impl Maps for Dataplane {
    fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        Dataplane::set_settings(self, s)
    }
    fn set_vip(&mut self, key: &ServiceKey, info: &VipInfo) -> Result<(), DataplaneError> {
        Dataplane::set_service(self, key, info)
    }
    fn vip(&self, key: &ServiceKey) -> Option<VipInfo> {
        Dataplane::service(self, key)
    }
    fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        Dataplane::remove_service(self, key)
    }
    fn set_vip_addr(&mut self, addr: IpAddr, count: u32) -> Result<(), DataplaneError> {
        Dataplane::set_service_addr(self, addr, count)
    }
    fn ring_capacity(&self) -> u32 {
        Dataplane::ring_capacity(self)
    }
    fn write_ring(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError> {
        Dataplane::write_ring(self, base, entries)
    }
    fn ring_entry(&self, index: u32) -> Option<u32> {
        Dataplane::ring_entry(self, index)
    }
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DataplaneError> {
        Dataplane::set_backend(self, id, info)
    }
    fn reset_vip_stats(&mut self, index: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_vip_stats(self, index)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        Dataplane::reset_backend_stats(self, id)
    }
    fn vip_counter(&self, index: u32) -> Result<Counter, DataplaneError> {
        Dataplane::vip_counter(self, index)
    }
    fn backend_counter(&self, id: u32) -> Result<Counter, DataplaneError> {
        Dataplane::backend_counter(self, id)
    }
    fn reason_counters(&self) -> Result<[Counter; Reason::COUNT as usize], DataplaneError> {
        Dataplane::reason_counters(self)
    }
    fn flow_counters(&self) -> Result<[u64; FlowStat::COUNT as usize], DataplaneError> {
        Dataplane::flow_counters(self)
    }
    fn flow_capacity(&self) -> u32 {
        Dataplane::flow_capacity(self)
    }
    fn flow6_capacity(&self) -> u32 {
        Dataplane::flow6_capacity(self)
    }
    fn flows(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<(Vec<(FlowKey, FlowEntry)>, usize), DataplaneError> {
        Dataplane::flows(self, limit, max_read, keep)
    }
    fn flows6(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&Flow6Key, &FlowEntry) -> bool,
    ) -> Result<(Vec<(Flow6Key, FlowEntry)>, usize), DataplaneError> {
        Dataplane::flows6(self, limit, max_read, keep)
    }
    fn program_id(&self) -> Option<u32> {
        Dataplane::program_id(self)
    }
}

/// Smallest-free-number allocator for VIP indices and backend ids.
#[derive(Clone, Debug)]
struct Ids {
    used: BTreeSet<u32>,
    first: u32,
    max: u32,
}

impl Ids {
    fn new(first: u32, max: u32) -> Ids {
        Ids {
            used: BTreeSet::new(),
            first,
            max,
        }
    }

    /// Ids left to take.
    fn free(&self) -> u32 {
        (self.max - self.first).saturating_sub(self.used.len() as u32)
    }

    fn take(&mut self) -> Option<u32> {
        let mut candidate = self.first;
        for &u in self.used.range(self.first..) {
            if u != candidate {
                break;
            }
            candidate += 1;
        }
        if candidate >= self.max {
            return None;
        }
        self.used.insert(candidate);
        Some(candidate)
    }

    fn give_back(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// First-fit allocator of ring regions, merging neighbours on free.
#[derive(Clone, Debug)]
struct Regions {
    /// base -> length of free regions.
    free: BTreeMap<u32, u32>,
}

impl Regions {
    fn new(capacity: u32) -> Regions {
        let mut free = BTreeMap::new();
        if capacity > 0 {
            free.insert(0, capacity);
        }
        Regions { free }
    }

    fn alloc(&mut self, len: u32) -> Option<u32> {
        let (&base, &flen) = self.free.iter().find(|&(_, &l)| l >= len)?;
        self.free.remove(&base);
        if flen > len {
            self.free.insert(base + len, flen - len);
        }
        Some(base)
    }

    fn release(&mut self, base: u32, len: u32) {
        let (mut base, mut len) = (base, len);
        if let Some((&pb, &pl)) = self.free.range(..base).next_back()
            && pb + pl == base
        {
            self.free.remove(&pb);
            base = pb;
            len += pl;
        }
        if let Some(&nl) = self.free.get(&(base + len)) {
            self.free.remove(&(base + len));
            len += nl;
        }
        self.free.insert(base, len);
    }
}

/// Per-second rates of a counter, from the last two samples.
#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    prev: Option<(Counter, Instant)>,
    pps: f64,
    bps: f64,
    /// New flows per second.
    fps: f64,
}

impl Rate {
    fn sample(&mut self, now: Counter, at: Instant) {
        if let Some((before, then)) = self.prev {
            let dt = at.duration_since(then).as_secs_f64();
            if dt > 0.0 {
                // A counter that went backwards was reset (its id reused): no rate this time.
                self.pps = now.packets.saturating_sub(before.packets) as f64 / dt;
                self.bps = now.bytes.saturating_sub(before.bytes) as f64 / dt;
                self.fps = now.flows.saturating_sub(before.flows) as f64 / dt;
            }
        }
        self.prev = Some((now, at));
    }
}

/// What the health checks said about a backend, for status and metrics.
#[derive(Debug, Default)]
struct HealthRecord {
    tracker: Tracker,
    last: Option<Outcome>,
    last_at: Option<SystemTime>,
    checks: u64,
    failures: u64,
    transitions: u64,
}

#[derive(Debug)]
struct BackendSlot {
    cfg: config::Backend,
    id: u32,
    /// The MAC in this backend's map entry, or `None` while unresolved.
    mac: Option<[u8; 6]>,
    /// The `BACKEND_F_*` flags in its map entry (0 until the entry is written).
    flags: u16,
    /// Whether the live table was built with this backend (it may still own no slot, if its
    /// share of the table rounds to zero).
    in_table: bool,
    /// The weight the live table was built with.
    table_weight: u32,
    /// Entries of the live table pointing at this backend.
    slots: u32,
    /// Drained by the operator: no new flows. Survives reloads (maintenance outlives edits).
    drained: bool,
    /// Weight set by the operator; the config's weight again after a reload.
    weight_override: Option<u32>,
    health: HealthRecord,
    rate: Rate,
}

impl BackendSlot {
    fn new(cfg: config::Backend, id: u32) -> BackendSlot {
        BackendSlot {
            cfg,
            id,
            mac: None,
            flags: 0,
            in_table: false,
            table_weight: 0,
            slots: 0,
            drained: false,
            weight_override: None,
            health: HealthRecord::default(),
            rate: Rate::default(),
        }
    }

    /// The weight set for it: the operator's, else the config's (drain aside).
    fn assigned_weight(&self) -> u32 {
        self.weight_override.unwrap_or(self.cfg.weight)
    }

    /// The weight new flows see.
    fn weight(&self) -> u32 {
        if self.drained {
            0
        } else {
            self.assigned_weight()
        }
    }

    fn healthy(&self) -> bool {
        self.cfg.health.probe == Probe::None || self.health.tracker.state().healthy()
    }

    /// Can take new flows as far as this backend alone is concerned: reachable, healthy, and
    /// its weight says so. Whether it does also depends on its VIP (backups, all-down).
    fn ready(&self) -> bool {
        self.mac.is_some() && self.weight() > 0 && self.healthy()
    }

    /// Reachable and weighted, whatever the checks say: what `all_down = "keep-last"` keeps.
    fn reachable(&self) -> bool {
        self.mac.is_some() && self.weight() > 0
    }
}

/// Which backends a VIP's table is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serving {
    /// The ready primaries (the normal case).
    Primaries,
    /// No primary is ready: the ready backups.
    Backups,
    /// Nothing is healthy and `all_down = "keep-last"`: the backends of the last table.
    KeptLast,
    /// Nothing to forward to: packets are dropped and counted.
    Nothing,
}

impl Serving {
    pub fn as_str(self) -> &'static str {
        match self {
            Serving::Primaries => "ok",
            Serving::Backups => "backup",
            Serving::KeptLast => "all-down: keep-last",
            Serving::Nothing => "no backend",
        }
    }
}

#[derive(Debug)]
struct VipSlot {
    cfg: config::Vip,
    key: ServiceKey,
    index: u32,
    /// Ring region: `2 * table_size` entries; half `h` starts at `base + h * table_size`.
    base: u32,
    /// Which half is live, if any table has been published.
    live: Option<u32>,
    /// The live table as backend ids (empty when no backend is usable).
    table: Vec<u32>,
    backends: Vec<BackendSlot>,
    /// When the other half stopped being live.
    retired_at: Option<Instant>,
    serving: Serving,
    /// The table must be rebuilt even if eligibility and weights look unchanged (a backend was
    /// removed, the table size changed).
    dirty: bool,
    /// Removed backends (id, address) the live table may still reference; their grace starts
    /// once a table without them is published.
    removed_ids: Vec<(u32, IpAddr)>,
    /// The region the live table is in, when a new table size moved the VIP to another one;
    /// retired once a table is published in the new region.
    old_region: Option<(u32, u32)>,
    rate: Rate,
}

impl VipSlot {
    fn half_base(&self, half: u32) -> u32 {
        self.base + half * self.cfg.table_size
    }

    /// Which backends the table should hold, and why (see [`Serving`]).
    fn eligible(&self) -> (Vec<bool>, Serving) {
        let pick = |f: &dyn Fn(&BackendSlot) -> bool| -> Vec<bool> {
            self.backends.iter().map(f).collect()
        };
        let primaries = pick(&|b| !b.cfg.backup && b.ready());
        if primaries.contains(&true) {
            return (primaries, Serving::Primaries);
        }
        let backups = pick(&|b| b.cfg.backup && b.ready());
        if backups.contains(&true) {
            return (backups, Serving::Backups);
        }
        // Nothing is ready, so whatever was in the table and is still reachable and weighted
        // left it for health alone: that is the set keep-last keeps.
        if self.cfg.all_down == AllDown::KeepLast {
            let kept = pick(&|b| b.in_table && b.reachable());
            if kept.contains(&true) {
                return (kept, Serving::KeptLast);
            }
        }
        (vec![false; self.backends.len()], Serving::Nothing)
    }

    fn warn_no_backend(&self) {
        warn!(
            vip = %self.cfg.name,
            "vip {}: no backend can take traffic ({} configured, all_down = {}); its packets \
             are dropped and counted as drop_no_backend",
            self.cfg.name,
            self.backends.len(),
            self.cfg.all_down.as_str()
        );
    }

    fn backend(&self, addr: IpAddr) -> Option<&BackendSlot> {
        self.backends.iter().find(|b| b.cfg.address == addr)
    }
}

/// Says why a VIP's table is now built from other backends.
fn log_serving(vip: &VipSlot, before: Serving) {
    let name = &vip.cfg.name;
    match vip.serving {
        Serving::Primaries => info!(
            vip = %name,
            "vip {name}: primary backends serve again (was: {})",
            before.as_str()
        ),
        Serving::Backups => warn!(
            vip = %name,
            "vip {name}: no primary backend can take traffic; the backup backends serve it"
        ),
        Serving::KeptLast => warn!(
            vip = %name,
            "vip {name}: every backend failed its health checks; all_down = keep-last keeps \
             forwarding to the {} backends of the last table",
            vip.backends.iter().filter(|b| b.in_table).count()
        ),
        Serving::Nothing => vip.warn_no_backend(),
    }
}

/// Something that waits out [`HALF_REUSE_GRACE`] before it can be reused: a removed VIP's index
/// and ring region, a removed backend's id. Packets that read the previous table may still use
/// them for that long.
#[derive(Debug)]
enum Retired {
    VipIndex(u32),
    Region { base: u32, len: u32 },
    BackendId(u32),
}

/// Most connection-table entries one `xdplb flows` reads: two syscalls each, on the task that
/// also applies health reports and operator changes, so a listing takes at most a few hundred
/// milliseconds of it.
pub const MAX_FLOW_SCAN: usize = 100_000;

/// A backend removed from a VIP, in its grace: its map entry stays ready so the connection
/// table keeps its established flows on it until `until` (`flows.remove_grace`).
#[derive(Debug)]
struct Removing {
    id: u32,
    address: IpAddr,
    vip: String,
    key: ServiceKey,
    until: Instant,
}

/// Owns the data path's maps and is their only writer.
pub struct Reconciler<M: Maps = Dataplane> {
    dp: M,
    /// The config the running state came from (operator changes since are not in it).
    config: Config,
    interface: String,
    ifindex: u32,
    iface_mac: [u8; 6],
    attach_mode: Option<AttachMode>,
    log_level: LogLevel,
    vips: Vec<VipSlot>,
    vip_ids: Ids,
    backend_ids: Ids,
    regions: Regions,
    vip_addrs: BTreeMap<IpAddr, u32>,
    /// The MACs the kernel last reported (desired state).
    macs: MacTable,
    /// Released resources, with the time of release; reusable after [`HALF_REUSE_GRACE`].
    retired: Vec<(Instant, Retired)>,
    /// Removed backends whose established flows still go to them.
    removing: Vec<Removing>,
    needs_retry: bool,
    rebuilds: u64,
    health_transitions: u64,
    started: Instant,
}

impl<M: Maps> Reconciler<M> {
    /// Takes ownership of a loaded (not necessarily attached) data path, allocates ids and ring
    /// regions for the config and writes the settings and the VIPs (with empty tables). Tables
    /// are published by [`apply_macs`](Self::apply_macs), once MACs are known.
    pub fn new(
        dp: M,
        config: &Config,
        interface: &str,
        ifindex: u32,
        iface_mac: [u8; 6],
        log_level: LogLevel,
    ) -> Result<Reconciler<M>, ReconcileError> {
        let mut r = Reconciler {
            regions: Regions::new(dp.ring_capacity()),
            dp,
            config: config.clone(),
            interface: interface.to_string(),
            ifindex,
            iface_mac,
            attach_mode: None,
            log_level,
            vips: Vec::new(),
            vip_ids: Ids::new(0, MAX_VIPS),
            backend_ids: Ids::new(1, MAX_BACKENDS),
            vip_addrs: BTreeMap::new(),
            macs: MacTable::new(),
            retired: Vec::new(),
            removing: Vec::new(),
            needs_retry: false,
            rebuilds: 0,
            health_transitions: 0,
            started: Instant::now(),
        };
        r.dp.set_settings(&r.settings())?;
        for v in &config.vips {
            r.add_vip(v.clone())?;
        }
        Ok(r)
    }

    fn settings(&self) -> Settings {
        let flows = &self.config.flows;
        Settings {
            iface_mac: self.iface_mac,
            alt_mac: self
                .config
                .ha
                .as_ref()
                .filter(|h| h.virtual_mac)
                .map(|h| crate::ha::arp::virtual_mac(h.vrid))
                .unwrap_or_default(),
            log_level: self.log_level.ebpf_level(),
            flow_insert_rate: flows.insert_rate_limit,
            flow_udp_timeout_ns: u64::try_from(flows.udp_idle_timeout.as_nanos())
                .unwrap_or(u64::MAX),
            ..Default::default()
        }
    }

    /// Makes what was retired long enough ago reusable; with `wait`, first waits until all of
    /// it is (at most [`HALF_REUSE_GRACE`]).
    async fn reclaim(&mut self, wait: bool) {
        if wait
            && let Some(rest) = self
                .retired
                .iter()
                .map(|(t, _)| *t)
                .max()
                .and_then(|t| HALF_REUSE_GRACE.checked_sub(t.elapsed()))
        {
            tokio::time::sleep(rest).await;
        }
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(t, _)| t.elapsed() >= HALF_REUSE_GRACE);
        self.retired = waiting;
        for (_, r) in done {
            match r {
                Retired::VipIndex(i) => self.vip_ids.give_back(i),
                Retired::Region { base, len } => self.regions.release(base, len),
                Retired::BackendId(id) => self.backend_ids.give_back(id),
            }
        }
    }

    fn retire(&mut self, what: Retired) {
        self.retired.push((Instant::now(), what));
    }

    /// Allocates a VIP's index, ring region and backend ids, and writes its entry with an empty
    /// table. Checks every capacity first, so a failure allocates nothing.
    fn add_vip(&mut self, cfg: config::Vip) -> Result<(), ReconcileError> {
        if self.vip_ids.free() == 0 {
            return Err(ReconcileError::TooManyVips { max: MAX_VIPS });
        }
        if self.backend_ids.free() < cfg.backends.len() as u32 {
            return Err(ReconcileError::TooManyBackends { max: MAX_BACKENDS });
        }
        let needed = 2 * cfg.table_size;
        let base = self
            .regions
            .alloc(needed)
            .ok_or_else(|| ReconcileError::RingFull {
                vip: cfg.name.clone(),
                needed,
            })?;
        let index = self.vip_ids.take().expect("checked free above");
        self.dp.reset_vip_stats(index)?;
        let mut backends = Vec::new();
        for b in &cfg.backends {
            let id = self.backend_ids.take().expect("checked free above");
            self.dp.reset_backend_stats(id)?;
            backends.push(BackendSlot::new(b.clone(), id));
        }
        let slot = VipSlot {
            key: cfg.map_key(),
            index,
            base,
            live: None,
            table: Vec::new(),
            backends,
            retired_at: None,
            serving: Serving::Nothing,
            dirty: true,
            removed_ids: Vec::new(),
            old_region: None,
            rate: Rate::default(),
            cfg,
        };
        // The address first: the data path looks a VIP up only for addresses in its filter.
        let count = self.vip_addrs.get(&slot.cfg.address).copied().unwrap_or(0) + 1;
        self.dp.set_vip_addr(slot.cfg.address, count)?;
        self.vip_addrs.insert(slot.cfg.address, count);
        // Published with an empty table (dropped, counted as no_backend) until MACs are known,
        // rather than passed to the kernel stack, which has no listener for the service.
        self.dp.set_vip(
            &slot.key,
            &VipInfo {
                vip_index: index,
                ring_base: slot.half_base(0),
                ring_size: 0,
                flags: 0,
            },
        )?;
        self.vips.push(slot);
        Ok(())
    }

    /// Takes a VIP out of the data path (its packets are then passed to the kernel, like any
    /// address that is not a VIP) and retires its index, region and backend ids.
    fn drop_vip(&mut self, i: usize) -> Result<(), ReconcileError> {
        let key = self.vips[i].key;
        self.dp.remove_vip(&key)?;
        let v = self.vips.remove(i);
        let count = self.vip_addrs.get(&v.cfg.address).copied().unwrap_or(1) - 1;
        if count == 0 {
            self.vip_addrs.remove(&v.cfg.address);
        } else {
            self.vip_addrs.insert(v.cfg.address, count);
        }
        // Only a failure of the filter update is left; the VIP is gone from the table either way.
        let filter = self.dp.set_vip_addr(v.cfg.address, count);
        self.retire(Retired::VipIndex(v.index));
        self.retire(Retired::Region {
            base: v.base,
            len: 2 * v.cfg.table_size,
        });
        // The VIP's packets go to the kernel from now on: no flow grace to wait for. Its
        // backends' entries are cleared, or the connection table, which is read before the VIP
        // table, would keep forwarding its established flows.
        let (removing, others): (Vec<Removing>, Vec<Removing>) = std::mem::take(&mut self.removing)
            .into_iter()
            .partition(|r| r.key == v.key);
        self.removing = others;
        let ids: Vec<u32> = v
            .backends
            .iter()
            .map(|b| b.id)
            .chain(v.removed_ids.iter().map(|&(id, _)| id))
            .chain(removing.iter().map(|r| r.id))
            .collect();
        let mut cleared = Ok(());
        for id in ids {
            if let Err(e) = self.dp.set_backend(id, &BackendInfo::default()) {
                // Its id is not reused: a VIP laid out again later could find the stale entry.
                warn!(vip = %v.cfg.name, "clearing backend id {id} of removed vip {} failed: {e}", v.cfg.name);
                cleared = Err(e);
                continue;
            }
            self.retire(Retired::BackendId(id));
        }
        if let Some((base, len)) = v.old_region {
            self.retire(Retired::Region { base, len });
        }
        filter?;
        cleared?;
        Ok(())
    }

    /// Records that the program is attached, and says which services cannot forward yet (their
    /// warnings were held back while nothing was live).
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.attach_mode = Some(mode);
        for v in self.vips.iter().filter(|v| v.table.is_empty()) {
            v.warn_no_backend();
        }
    }

    pub fn dataplane(&self) -> &M {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut M {
        &mut self.dp
    }

    pub fn into_dataplane(self) -> M {
        self.dp
    }

    /// Backend addresses whose MACs the agent needs.
    pub fn wanted_addrs(&self) -> BTreeSet<IpAddr> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.cfg.address))
            .collect()
    }

    /// The distinct VIP addresses, of both families: what HA puts on the interface of the
    /// master.
    pub fn vip_addresses(&self) -> BTreeSet<IpAddr> {
        self.vips.iter().map(|v| v.cfg.address).collect()
    }

    /// Names of the VIPs none of whose backends passes its health checks (kept-last tables
    /// included: they forward to backends known to fail). What HA's `track_vips` watches.
    pub fn vips_down(&self) -> BTreeSet<String> {
        self.vips
            .iter()
            .filter(|v| matches!(v.serving, Serving::Nothing | Serving::KeptLast))
            .map(|v| v.cfg.name.clone())
            .collect()
    }

    pub fn attach_mode(&self) -> Option<AttachMode> {
        self.attach_mode
    }

    /// How many times tables were published; changes whenever [`table_digest`] may.
    pub fn table_rebuilds(&self) -> u64 {
        self.rebuilds
    }

    /// A digest of what every service's table maps flows to, read as backend addresses (ids are
    /// per node), in service order: two nodes with equal digests send every flow to the same
    /// backend. 64-bit FNV-1a: it only has to be the same on both nodes, not secret.
    pub fn table_digest(&self) -> u64 {
        let mut h = Fnv64::new();
        let mut vips: Vec<&VipSlot> = self.vips.iter().collect();
        vips.sort_by_key(|v| (v.cfg.address, v.cfg.port, v.cfg.protocol.number()));
        // An address is written as its 4 or 16 bytes: IPv4 services sort first and hash as
        // they always did, so nodes of an older version still agree about them.
        let octets = |a: IpAddr| match a {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        for v in vips {
            h.write(&octets(v.cfg.address));
            h.write(&v.cfg.port.to_be_bytes());
            h.write(&[v.cfg.protocol.number()]);
            h.write(&(v.table.len() as u32).to_be_bytes());
            let addr: BTreeMap<u32, IpAddr> =
                v.backends.iter().map(|b| (b.id, b.cfg.address)).collect();
            let none = match v.cfg.address {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            for id in &v.table {
                h.write(&octets(addr.get(id).copied().unwrap_or(none)));
            }
        }
        h.0
    }

    /// Backend addresses without a known MAC.
    pub fn unresolved(&self) -> BTreeSet<IpAddr> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter())
            .filter(|b| b.mac.is_none())
            .map(|b| b.cfg.address)
            .collect()
    }

    /// Whether the last apply failed part-way and [`resync`](Self::resync) should run again.
    pub fn needs_retry(&self) -> bool {
        self.needs_retry
    }

    /// Takes a new MAC table into account (see [`resync`](Self::resync)).
    pub async fn apply_macs(&mut self, macs: MacTable) -> Result<(), ReconcileError> {
        crate::net::log_mac_changes(&self.macs, &macs);
        self.macs = macs;
        self.resync().await
    }

    /// Brings every VIP in line with the desired state. Every VIP is tried even if one fails; the
    /// first error is returned and a retry is due.
    pub async fn resync(&mut self) -> Result<(), ReconcileError> {
        let mut first_err = None;
        for i in 0..self.vips.len() {
            if let Err(e) = self.sync_vip(i).await {
                warn!(vip = %self.vips[i].cfg.name, "applying changes failed, will retry: {e}");
                first_err.get_or_insert(e);
            }
        }
        self.needs_retry = first_err.is_some();
        first_err.map_or(Ok(()), Err)
    }

    /// Writes backend `j` of VIP `i`'s map entry with `flags` (its MAC known).
    fn write_backend(&mut self, i: usize, j: usize, flags: u16) -> Result<(), ReconcileError> {
        let (v, iface_mac) = (&self.vips[i], self.iface_mac);
        let b = &v.backends[j];
        let Some(mac) = b.mac else {
            return Ok(());
        };
        let info = BackendInfo {
            mac,
            src_mac: iface_mac,
            _pad: [0; 2],
            flags,
            // Diagnostics only; an IPv6 backend's stays all zero (see `BackendInfo::addr`).
            addr: match b.cfg.address {
                IpAddr::V4(a) => a.octets(),
                IpAddr::V6(_) => [0; 4],
            },
            vip_index: v.index,
            vip: v.key.word(),
        };
        self.dp.set_backend(b.id, &info)?;
        self.vips[i].backends[j].flags = flags;
        Ok(())
    }

    /// Marks backends of VIP `i` down (`BACKEND_F_DOWN`: the connection table remaps their
    /// flows) or not, as `eligible` and their health say; only the marks `setting` asks for:
    /// clearing ones go before a table is published, setting ones after, so a flow is never
    /// remapped onto a table that still holds its backend.
    fn mark_down(
        &mut self,
        i: usize,
        eligible: &[bool],
        setting: bool,
    ) -> Result<(), ReconcileError> {
        for (j, &e) in eligible.iter().enumerate() {
            let b = &self.vips[i].backends[j];
            if b.mac.is_none() {
                continue;
            }
            let down = !b.healthy() && !e;
            let want = BACKEND_F_READY | if down { BACKEND_F_DOWN } else { 0 };
            if want != b.flags && down == setting {
                self.write_backend(i, j, want)?;
            }
        }
        Ok(())
    }

    async fn sync_vip(&mut self, i: usize) -> Result<(), ReconcileError> {
        // 1. Entries of backends that (re)gained or changed their MAC are written first.
        for j in 0..self.vips[i].backends.len() {
            let b = &mut self.vips[i].backends[j];
            let mac = self.macs.get(&b.cfg.address).copied().flatten();
            if mac == b.mac {
                continue;
            }
            // A lost MAC leaves the entry as it is: the table published below stops using it,
            // and packets still in flight with the previous table keep a valid destination.
            let before = std::mem::replace(&mut b.mac, mac);
            if mac.is_some() {
                let flags = BACKEND_F_READY | (b.flags & BACKEND_F_DOWN);
                if let Err(e) = self.write_backend(i, j, flags) {
                    self.vips[i].backends[j].mac = before;
                    return Err(e);
                }
            }
        }
        let vip = &self.vips[i];
        let (eligible, serving) = vip.eligible();
        self.mark_down(i, &eligible, false)?;
        let vip = &self.vips[i];
        let unchanged = vip
            .backends
            .iter()
            .zip(&eligible)
            .all(|(b, &e)| e == b.in_table && (!e || b.weight() == b.table_weight));
        if !vip.dirty && vip.live.is_some() && unchanged {
            self.mark_down(i, &eligible, true)?;
            // The same backends for another reason (keep-last holding what backups served):
            // nothing to publish, but say why.
            if self.vips[i].serving != serving {
                let before = std::mem::replace(&mut self.vips[i].serving, serving);
                if self.attach_mode.is_some() {
                    log_serving(&self.vips[i], before);
                }
            }
            return Ok(());
        }

        // 2. A new table over the eligible backends, into the half not in use, then the flip.
        let inputs: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .zip(&eligible)
            .map(|(b, &e)| MaglevBackend {
                address: b.cfg.address,
                weight: if e { b.weight() } else { 0 },
            })
            .collect();
        let built = maglev::build_table(&inputs, vip.cfg.table_size).map_err(|source| {
            ReconcileError::Maglev {
                vip: vip.cfg.name.clone(),
                source,
            }
        })?;
        // One pass: counting per backend over the table would cost N x M.
        let mut slots = vec![0u32; vip.backends.len()];
        for &ix in built.iter().filter(|&&ix| ix != maglev::EMPTY) {
            slots[ix as usize] += 1;
        }
        let table: Vec<u32> = if built.first() == Some(&maglev::EMPTY) {
            Vec::new()
        } else {
            built
                .iter()
                .map(|&ix| vip.backends[ix as usize].id)
                .collect()
        };
        let half = vip.live.map_or(0, |h| 1 - h);
        if !table.is_empty() {
            // checked_sub: elapsed() may pass the grace between a check and the subtraction.
            if let Some(rest) = vip
                .retired_at
                .and_then(|t| HALF_REUSE_GRACE.checked_sub(t.elapsed()))
            {
                tokio::time::sleep(rest).await;
            }
            self.dp.write_ring(vip.half_base(half), &table)?;
        }
        self.dp.set_vip(
            &vip.key,
            &VipInfo {
                vip_index: vip.index,
                ring_base: vip.half_base(half),
                ring_size: if table.is_empty() {
                    0
                } else {
                    vip.cfg.table_size
                },
                flags: 0,
            },
        )?;

        // 3. Published: record it.
        let attached = self.attach_mode.is_some();
        let vip = &mut self.vips[i];
        if vip.live.is_some() {
            vip.retired_at = Some(Instant::now());
        }
        vip.live = Some(half);
        for ((b, n), &e) in vip.backends.iter_mut().zip(slots).zip(&eligible) {
            b.in_table = e;
            b.table_weight = if e { b.weight() } else { 0 };
            b.slots = n;
        }
        vip.table = table;
        vip.dirty = false;
        let before = std::mem::replace(&mut vip.serving, serving);
        let removed = std::mem::take(&mut vip.removed_ids);
        let old_region = vip.old_region.take();
        self.rebuilds += 1;
        let vip = &self.vips[i];
        if before != serving && attached {
            log_serving(vip, before);
        }
        if vip.table.is_empty() {
            if attached && before == serving {
                vip.warn_no_backend();
            }
        } else {
            info!(
                vip = %vip.cfg.name,
                usable = vip.backends.iter().filter(|b| b.in_table).count(),
                configured = vip.backends.len(),
                serving = serving.as_str(),
                "table published"
            );
        }
        let until = Instant::now() + self.config.flows.remove_grace;
        for (id, address) in removed {
            self.removing.push(Removing {
                id,
                address,
                vip: vip.cfg.name.clone(),
                key: vip.key,
                until,
            });
        }
        if let Some((base, len)) = old_region {
            self.retire(Retired::Region { base, len });
        }
        self.mark_down(i, &eligible, true)
    }

    /// When the next removed backend's grace ends, if any is running.
    pub fn next_removal_deadline(&self) -> Option<Instant> {
        self.removing.iter().map(|r| r.until).min()
    }

    /// Ends the grace of removed backends whose time is up: their map entries are cleared (the
    /// connection table remaps their flows from now on) and their ids retired.
    pub fn expire_removed(&mut self) -> Result<(), ReconcileError> {
        let now = Instant::now();
        let mut first_err = None;
        for r in std::mem::take(&mut self.removing) {
            if r.until > now {
                self.removing.push(r);
                continue;
            }
            if let Err(e) = self.dp.set_backend(r.id, &BackendInfo::default()) {
                warn!(
                    "clearing removed backend {} of vip {} failed, will retry: {e}",
                    r.address, r.vip
                );
                first_err.get_or_insert(e);
                self.removing.push(r);
                continue;
            }
            info!(vip = %r.vip, backend = %r.address, "backend {} of vip {}: removal grace over; flows still on it are remapped", r.address, r.vip);
            self.retire(Retired::BackendId(r.id));
        }
        first_err.map_or(Ok(()), |e| Err(e.into()))
    }

    /// The backends to health-check, with their settings.
    pub fn check_specs(&self) -> Vec<CheckSpec> {
        self.vips
            .iter()
            .flat_map(|v| {
                v.backends.iter().map(move |b| CheckSpec {
                    key: (v.cfg.key(), b.cfg.address),
                    target: Target {
                        backend: b.cfg.address,
                        port: b.cfg.health.port.unwrap_or(v.cfg.port),
                        vip: v.cfg.address,
                        vip_port: v.cfg.port,
                        vip_name: v.cfg.name.clone(),
                        protocol: v.cfg.protocol.as_str(),
                    },
                    check: b.cfg.health.clone(),
                })
            })
            .collect()
    }

    /// Takes one health-check result into account: logs a state change with its reason and
    /// rebuilds the VIP's table if the change matters to it.
    pub async fn health_report(
        &mut self,
        key: CheckKey,
        outcome: Outcome,
    ) -> Result<(), ReconcileError> {
        let Some(i) = self.vips.iter().position(|v| v.cfg.key() == key.0) else {
            return Ok(());
        };
        let vip = &mut self.vips[i];
        let Some(b) = vip.backends.iter_mut().find(|b| b.cfg.address == key.1) else {
            return Ok(());
        };
        let h = &mut b.health;
        h.checks += 1;
        if !outcome.ok {
            h.failures += 1;
        }
        let transition = h
            .tracker
            .record(outcome.ok, b.cfg.health.rise, b.cfg.health.fall);
        h.last_at = Some(SystemTime::now());
        let outcome = &*h.last.insert(outcome);
        let port = b.cfg.health.port.unwrap_or(vip.cfg.port);
        let what = format!("backend {}:{port} of vip {}", b.cfg.address, vip.cfg.name);
        let Some(t) = transition else {
            if !outcome.ok {
                debug!(
                    "{what}: check failed: {} ({}/{} towards down)",
                    outcome.detail,
                    h.tracker.streak(),
                    b.cfg.health.fall
                );
            }
            return Ok(());
        };
        h.transitions += 1;
        let tail = if t.from == Health::Unknown {
            " (first check)".to_string()
        } else {
            format!(" {}/{}", t.streak, t.needed)
        };
        let (backend, name) = (b.cfg.address, &vip.cfg.name);
        match (t.to, t.from) {
            (Health::Down, _) => {
                warn!(%backend, vip = %name, "{what} DOWN: {}{tail}", outcome.detail)
            }
            (_, Health::Unknown) => debug!("{what} up: {}{tail}", outcome.detail),
            _ => info!(%backend, vip = %name, "{what} UP: {}{tail}", outcome.detail),
        }
        self.health_transitions += 1;
        self.apply_vip(i).await
    }

    /// Finds a VIP by name or as `ADDRESS:PORT/PROTO`.
    fn vip_position(&self, vip: &str) -> Result<usize, ReconcileError> {
        if let Some(i) = self.vips.iter().position(|v| v.cfg.name == vip) {
            return Ok(i);
        }
        if let Ok((addr, proto)) = crate::api::parse_service(vip)
            && let Some(i) = self
                .vips
                .iter()
                .position(|v| v.cfg.key() == (addr.ip(), addr.port(), proto))
        {
            return Ok(i);
        }
        Err(ReconcileError::NoSuchVip(vip.to_string()))
    }

    fn backend_position(&self, i: usize, backend: IpAddr) -> Result<usize, ReconcileError> {
        self.vips[i]
            .backends
            .iter()
            .position(|b| b.cfg.address == backend)
            .ok_or_else(|| ReconcileError::NoSuchBackend {
                vip: self.vips[i].cfg.name.clone(),
                backend,
            })
    }

    /// Publishes VIP `i`'s table after an operator change; a failure is retried like any other.
    async fn apply_vip(&mut self, i: usize) -> Result<(), ReconcileError> {
        let r = self.sync_vip(i).await;
        if let Err(e) = &r {
            warn!(vip = %self.vips[i].cfg.name, "applying the change failed, will retry: {e}");
            self.needs_retry = true;
        }
        r
    }

    /// Drains (or undrains) a backend: weight 0 for new flows, which leaves established flows
    /// where they are only as far as the table allows; see the README on connection tracking.
    pub async fn set_drain(
        &mut self,
        vip: &str,
        backend: IpAddr,
        drain: bool,
    ) -> Result<String, ReconcileError> {
        let i = self.vip_position(vip)?;
        let j = self.backend_position(i, backend)?;
        let b = &mut self.vips[i].backends[j];
        if b.drained == drain {
            return Ok(format!(
                "backend {backend} of vip {} is already {}",
                self.vips[i].cfg.name,
                if drain { "draining" } else { "not draining" }
            ));
        }
        b.drained = drain;
        let name = self.vips[i].cfg.name.clone();
        info!(vip = %name, backend = %backend, "backend {backend} of vip {name} {} by the operator", if drain { "drained" } else { "undrained" });
        self.apply_vip(i).await?;
        Ok(if drain {
            format!("backend {backend} of vip {name} is draining: it takes no new flows")
        } else {
            format!(
                "backend {backend} of vip {name} takes new flows again (weight {})",
                self.vips[i].backends[j].weight()
            )
        })
    }

    /// Sets a backend's weight until the next reload (which goes back to the config's).
    pub async fn set_weight(
        &mut self,
        vip: &str,
        backend: IpAddr,
        weight: u32,
    ) -> Result<String, ReconcileError> {
        config::check_weight(weight).map_err(ReconcileError::Invalid)?;
        let i = self.vip_position(vip)?;
        let j = self.backend_position(i, backend)?;
        self.check_table_fits(i, Some((j, weight)), 0)?;
        let b = &mut self.vips[i].backends[j];
        let before = b.assigned_weight();
        b.weight_override = Some(weight);
        let name = self.vips[i].cfg.name.clone();
        info!(vip = %name, backend = %backend, "weight of backend {backend} of vip {name} set to {weight} (was {before}) by the operator");
        self.apply_vip(i).await?;
        let drained = self.vips[i].backends[j].drained;
        Ok(format!(
            "backend {backend} of vip {name}: weight {before} -> {weight}{}",
            if drained {
                " (draining: takes effect once undrained)"
            } else {
                ""
            }
        ))
    }

    /// Refuses a change that would leave VIP `i` with more weighted backends than table
    /// entries: `changed` is a backend's new weight, `added` backends with a weight above 0.
    fn check_table_fits(
        &self,
        i: usize,
        changed: Option<(usize, u32)>,
        added: u32,
    ) -> Result<(), ReconcileError> {
        let v = &self.vips[i];
        let weighted = v
            .backends
            .iter()
            .enumerate()
            .filter(|&(j, b)| match changed {
                Some((k, w)) if k == j => w > 0,
                _ => b.assigned_weight() > 0,
            })
            .count() as u32
            + added;
        if weighted > v.cfg.table_size {
            return Err(ReconcileError::Invalid(format!(
                "vip {} would have {weighted} backends with weight above 0 for a table of {} \
                 entries; raise its table_size in the config (and reload) first",
                v.cfg.name, v.cfg.table_size
            )));
        }
        Ok(())
    }

    /// Adds a backend to a running VIP, checked with the VIP's health check. It takes traffic
    /// once its MAC is known (the agent asks the kernel at once).
    pub async fn add_backend(
        &mut self,
        vip: &str,
        address: IpAddr,
        weight: u32,
        backup: bool,
    ) -> Result<String, ReconcileError> {
        let i = self.vip_position(vip)?;
        config::check_backend_address(address).map_err(ReconcileError::Invalid)?;
        config::check_weight(weight).map_err(ReconcileError::Invalid)?;
        let v = &self.vips[i];
        config::check_backend_family(&v.cfg, address).map_err(ReconcileError::Invalid)?;
        if address == v.cfg.address {
            return Err(ReconcileError::Invalid(format!(
                "{address} is the VIP's own address; a backend must be another host"
            )));
        }
        if v.backend(address).is_some() {
            return Err(ReconcileError::Conflict(format!(
                "vip {} already has backend {address}",
                v.cfg.name
            )));
        }
        self.check_table_fits(i, None, u32::from(weight > 0))?;
        self.reclaim(false).await;
        let id = self
            .backend_ids
            .take()
            .ok_or(ReconcileError::TooManyBackends { max: MAX_BACKENDS })?;
        if let Err(e) = self.dp.reset_backend_stats(id) {
            self.backend_ids.give_back(id);
            return Err(e.into());
        }
        let v = &mut self.vips[i];
        let cfg = config::Backend {
            address,
            weight,
            backup,
            health: v.cfg.health.clone(),
        };
        v.backends.push(BackendSlot::new(cfg, id));
        let name = v.cfg.name.clone();
        info!(vip = %name, backend = %address, "backend {address} added to vip {name} by the operator (weight {weight}{})", if backup { ", backup" } else { "" });
        self.apply_vip(i).await?;
        let b = &self.vips[i].backends.last().expect("just pushed");
        Ok(format!(
            "backend {address} added to vip {name}{}",
            if b.mac.is_none() {
                "; it joins the table once it answers ARP"
            } else {
                ""
            }
        ))
    }

    /// Removes a backend from a running VIP. Its entry stays valid for packets that read the
    /// previous table; its id is reused only after that table is gone.
    pub async fn remove_backend(
        &mut self,
        vip: &str,
        backend: IpAddr,
    ) -> Result<String, ReconcileError> {
        let i = self.vip_position(vip)?;
        let j = self.backend_position(i, backend)?;
        let v = &mut self.vips[i];
        let b = v.backends.remove(j);
        v.removed_ids.push((b.id, b.cfg.address));
        v.dirty = true;
        let name = v.cfg.name.clone();
        let grace = self.config.flows.remove_grace;
        info!(vip = %name, backend = %backend, "backend {backend} removed from vip {name} by the operator; its established flows keep going to it for {grace:?}");
        self.apply_vip(i).await?;
        Ok(format!(
            "backend {backend} removed from vip {name}; its established flows keep going to it \
             for {grace:?} (flows.remove_grace)"
        ))
    }

    /// Adds a VIP (validated by the config parser) to the running agent.
    pub async fn add_vip_live(&mut self, cfg: config::Vip) -> Result<String, ReconcileError> {
        if let Some(v) = self.vips.iter().find(|v| v.cfg.key() == cfg.key()) {
            return Err(ReconcileError::Conflict(format!(
                "{}/{} is already vip {}",
                cfg.socket(),
                cfg.protocol,
                v.cfg.name
            )));
        }
        if self.vips.iter().any(|v| v.cfg.name == cfg.name) {
            return Err(ReconcileError::Conflict(format!(
                "a vip named {} already exists",
                cfg.name
            )));
        }
        self.reclaim(true).await;
        let name = cfg.name.clone();
        let n = cfg.backends.len();
        self.add_vip(cfg)?;
        info!(vip = %name, "vip {name} added by the operator ({n} backends)");
        self.apply_vip(self.vips.len() - 1).await?;
        Ok(format!("vip {name} added with {n} backend(s)"))
    }

    /// Removes a VIP: its packets go to the kernel stack from now on, like any address that is
    /// not a VIP.
    pub async fn remove_vip(&mut self, vip: &str) -> Result<String, ReconcileError> {
        let i = self.vip_position(vip)?;
        let name = self.vips[i].cfg.name.clone();
        self.drop_vip(i)?;
        info!(vip = %name, "vip {name} removed by the operator");
        Ok(format!("vip {name} removed"))
    }

    /// Makes the running state equal to `new` (a validated config), changing only what
    /// differs. VIPs are matched by address, port and protocol; backends by address. Operator
    /// drains survive; operator weights go back to the config's. Returns what changed, in
    /// words. Changes that need a restart, or that do not fit the data path's capacity, are
    /// refused before anything is applied.
    pub async fn apply_config(&mut self, new: Config) -> Result<Vec<String>, ReconcileError> {
        let mut restart = Vec::new();
        if new.dataplane != self.config.dataplane {
            restart.push("[dataplane] changed".to_string());
        }
        if new.api != self.config.api {
            restart.push("[api] changed".to_string());
        }
        if new.ha != self.config.ha {
            restart.push("[ha] changed".to_string());
        }
        if new.flows.entries != self.config.flows.entries {
            restart.push(format!(
                "flows.entries {} -> {} (the connection table is sized when the agent starts)",
                self.config.flows.entries, new.flows.entries
            ));
        }
        if new.flows.entries_v6 != self.config.flows.entries_v6 {
            restart.push(format!(
                "flows.entries_v6 {} -> {} (the connection table is sized when the agent starts)",
                self.config.flows.entries_v6, new.flows.entries_v6
            ));
        }
        if !restart.is_empty() {
            return Err(ReconcileError::NeedsRestart(restart.join(", ")));
        }
        self.reclaim(true).await;
        self.dry_run(&new)?;

        let mut changes = Vec::new();
        if new.flows != self.config.flows {
            // Backends already in their grace keep the deadline they were given.
            let old = std::mem::replace(&mut self.config.flows, new.flows.clone());
            if let Err(e) = self.dp.set_settings(&self.settings()) {
                self.config.flows = old;
                return Err(e.into());
            }
            let f = &new.flows;
            for (what, a, b) in [
                (
                    "udp_idle_timeout",
                    format!("{:?}", old.udp_idle_timeout),
                    format!("{:?}", f.udp_idle_timeout),
                ),
                (
                    "insert_rate_limit",
                    old.insert_rate_limit.to_string(),
                    f.insert_rate_limit.to_string(),
                ),
                (
                    "remove_grace",
                    format!("{:?}", old.remove_grace),
                    format!("{:?}", f.remove_grace),
                ),
            ] {
                if a != b {
                    changes.push(format!("flows.{what} {a} -> {b}"));
                }
            }
        }
        // 1. VIPs that are gone.
        let mut i = 0;
        while i < self.vips.len() {
            if new.vips.iter().any(|n| n.key() == self.vips[i].cfg.key()) {
                i += 1;
                continue;
            }
            changes.push(format!("vip {}: removed", self.vips[i].cfg.name));
            self.drop_vip(i)?;
        }
        // 2. VIPs that stay: settings and backends.
        for n in &new.vips {
            let Some(i) = self.vips.iter().position(|v| v.cfg.key() == n.key()) else {
                continue;
            };
            changes.extend(self.update_vip(i, n)?);
        }
        // 3. New VIPs, once what the removed ones held is reusable.
        self.reclaim(true).await;
        for n in &new.vips {
            if self.vips.iter().all(|v| v.cfg.key() != n.key()) {
                changes.push(format!(
                    "vip {}: added with {} backend(s)",
                    n.name,
                    n.backends.len()
                ));
                self.add_vip(n.clone())?;
            }
        }
        // Keep the file's order, so status lists VIPs as the file does.
        self.vips.sort_by_key(|v| {
            new.vips
                .iter()
                .position(|n| n.key() == v.cfg.key())
                .unwrap_or(usize::MAX)
        });
        self.config = new;
        self.resync().await?;
        Ok(changes)
    }

    /// Checks that `new` fits the data path's capacity, allocating on copies of the allocators.
    fn dry_run(&self, new: &Config) -> Result<(), ReconcileError> {
        let mut vip_ids = self.vip_ids.clone();
        let mut backend_ids = self.backend_ids.clone();
        let mut regions = self.regions.clone();
        for v in &self.vips {
            if new.vips.iter().all(|n| n.key() != v.cfg.key()) {
                vip_ids.give_back(v.index);
                regions.release(v.base, 2 * v.cfg.table_size);
                for b in &v.backends {
                    backend_ids.give_back(b.id);
                }
            }
        }
        let full = |vip: &str, needed: u32| ReconcileError::RingFull {
            vip: vip.to_string(),
            needed,
        };
        for n in &new.vips {
            match self.vips.iter().find(|v| v.cfg.key() == n.key()) {
                Some(v) => {
                    if v.cfg.table_size != n.table_size {
                        regions
                            .alloc(2 * n.table_size)
                            .ok_or_else(|| full(&n.name, 2 * n.table_size))?;
                    }
                    for b in &n.backends {
                        if v.backend(b.address).is_none() {
                            backend_ids
                                .take()
                                .ok_or(ReconcileError::TooManyBackends { max: MAX_BACKENDS })?;
                        }
                    }
                }
                None => {
                    vip_ids
                        .take()
                        .ok_or(ReconcileError::TooManyVips { max: MAX_VIPS })?;
                    regions
                        .alloc(2 * n.table_size)
                        .ok_or_else(|| full(&n.name, 2 * n.table_size))?;
                    for _ in &n.backends {
                        backend_ids
                            .take()
                            .ok_or(ReconcileError::TooManyBackends { max: MAX_BACKENDS })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Brings VIP `i` in line with `n` (same key). Returns what changed.
    fn update_vip(&mut self, i: usize, n: &config::Vip) -> Result<Vec<String>, ReconcileError> {
        let mut changes = Vec::new();
        let v = &mut self.vips[i];
        let name = n.name.clone();
        if v.cfg.name != n.name {
            changes.push(format!("vip {}: renamed to {name}", v.cfg.name));
        }
        if v.cfg.all_down != n.all_down {
            changes.push(format!(
                "vip {name}: all_down {} -> {}",
                v.cfg.all_down.as_str(),
                n.all_down.as_str()
            ));
            v.dirty = true;
        }
        // Backends that are gone.
        let mut j = 0;
        while j < v.backends.len() {
            if n.backends
                .iter()
                .any(|b| b.address == v.backends[j].cfg.address)
            {
                j += 1;
                continue;
            }
            let b = v.backends.remove(j);
            changes.push(format!("vip {name}: backend {} removed", b.cfg.address));
            v.removed_ids.push((b.id, b.cfg.address));
            v.dirty = true;
        }
        // Backends that stay, and new ones.
        for nb in &n.backends {
            match v.backends.iter_mut().find(|b| b.cfg.address == nb.address) {
                Some(b) => {
                    let a = nb.address;
                    let w = b.assigned_weight();
                    if w != nb.weight {
                        changes.push(format!(
                            "vip {name}: backend {a} weight {w} -> {}",
                            nb.weight
                        ));
                    }
                    if b.cfg.backup != nb.backup {
                        changes.push(format!(
                            "vip {name}: backend {a} is {} a backup",
                            if nb.backup { "now" } else { "no longer" }
                        ));
                    }
                    if b.cfg.health != nb.health {
                        changes.push(format!("vip {name}: backend {a} health check changed"));
                    }
                    b.weight_override = None;
                    b.cfg = nb.clone();
                }
                None => {
                    let id = self
                        .backend_ids
                        .take()
                        .ok_or(ReconcileError::TooManyBackends { max: MAX_BACKENDS })?;
                    self.dp.reset_backend_stats(id)?;
                    v.backends.push(BackendSlot::new(nb.clone(), id));
                    changes.push(format!("vip {name}: backend {} added", nb.address));
                }
            }
        }
        // Keep the file's order of backends (tables do not depend on it).
        v.backends.sort_by_key(|b| {
            n.backends
                .iter()
                .position(|nb| nb.address == b.cfg.address)
                .unwrap_or(usize::MAX)
        });
        if v.cfg.table_size != n.table_size {
            changes.push(format!(
                "vip {name}: table_size {} -> {}",
                v.cfg.table_size, n.table_size
            ));
            let base =
                self.regions
                    .alloc(2 * n.table_size)
                    .ok_or_else(|| ReconcileError::RingFull {
                        vip: name.clone(),
                        needed: 2 * n.table_size,
                    })?;
            // The VIP's entry still points into the old region until the new table is
            // published in the new one; the old region is retired then.
            v.old_region = Some((v.base, 2 * v.cfg.table_size));
            v.base = base;
            v.live = None;
            v.retired_at = None;
            v.dirty = true;
        }
        if v.cfg.health != n.health && changes.iter().all(|c| !c.contains("health")) {
            changes.push(format!("vip {name}: health check changed"));
        }
        let backends = std::mem::take(&mut v.cfg.backends);
        v.cfg = config::Vip {
            backends,
            ..n.clone()
        };
        Ok(changes)
    }

    /// Samples the counters for the per-second rates in [`status`](Self::status); call it
    /// every [`RATE_PERIOD_SECS`](crate::status::RATE_PERIOD_SECS).
    pub fn sample_rates(&mut self) -> Result<(), ReconcileError> {
        let now = Instant::now();
        for v in &mut self.vips {
            v.rate.sample(self.dp.vip_counter(v.index)?, now);
            for b in &mut v.backends {
                b.rate.sample(self.dp.backend_counter(b.id)?, now);
            }
        }
        Ok(())
    }

    pub fn set_log_level(&mut self, level: LogLevel) -> Result<(), ReconcileError> {
        let before = self.log_level;
        self.log_level = level;
        if let Err(e) = self.dp.set_settings(&self.settings()) {
            self.log_level = before;
            return Err(e.into());
        }
        Ok(())
    }

    fn find_vip(&self, addr: IpAddr, port: u16, proto: Protocol) -> Option<&VipSlot> {
        self.vips
            .iter()
            .find(|v| v.cfg.key() == (addr, port, proto))
    }

    /// Which backend the kernel sends a flow to, read from the live table in the kernel.
    pub fn which_backend(
        &self,
        vip: SocketAddr,
        proto: Protocol,
        src: SocketAddr,
    ) -> Result<WhichBackend, ReconcileError> {
        let v = self
            .find_vip(vip.ip(), vip.port(), proto)
            .ok_or_else(|| ReconcileError::NoSuchVip(format!("{vip}/{proto}")))?;
        let family_error = || {
            ReconcileError::Invalid(format!(
                "source {src} and vip {vip} are of different families: no such flow reaches a \
                 VIP"
            ))
        };
        let hash = flow_hash_of(src, vip, proto.number()).ok_or_else(family_error)?;
        let (slot, backend_id) = match self.dp.vip(&v.key) {
            Some(info) if info.ring_size > 0 => {
                let slot = flow_slot_of(src, vip, proto.number(), info.ring_size)
                    .ok_or_else(family_error)?;
                (Some(slot), self.dp.ring_entry(info.ring_base + slot))
            }
            _ => (None, None),
        };
        let backend_id = backend_id.filter(|&id| id != 0);
        let backend = backend_id
            .and_then(|id| v.backends.iter().find(|b| b.id == id))
            .map(|b| b.cfg.address.to_string());
        Ok(WhichBackend {
            vip: v.cfg.name.clone(),
            service: format!("{vip}/{proto}"),
            source: src.to_string(),
            hash,
            slot,
            backend_id,
            backend,
        })
    }

    /// Up to `limit` flows of the connection tables (IPv4 first, then IPv6), of one VIP (name
    /// or `ADDRESS:PORT/PROTO`) or of all, with what the data path does with their next packet.
    pub fn flows(&self, vip: Option<&str>, limit: usize) -> Result<FlowsReport, ReconcileError> {
        let only = vip.map(|v| self.vip_position(v)).transpose()?;
        let only_key = only.map(|i| self.vips[i].key);
        let wanted = |dst: IpAddr, dport: [u8; 2], proto: u8| {
            only_key.is_none_or(|k| k.matches(dst, dport, proto))
        };
        let mut flows: Vec<(Flow, FlowEntry)> = Vec::new();
        let mut scanned = 0;
        // Only the tables that can hold the VIP's flows are read.
        if only_key.is_none_or(|k| matches!(k, ServiceKey::V4(_))) {
            let (entries, n) = self.dp.flows(limit, MAX_FLOW_SCAN, |k, _| {
                wanted(IpAddr::from(k.dst), k.dport, k.proto)
            })?;
            scanned += n;
            flows.extend(entries.into_iter().map(|(k, e)| (Flow::from(&k), e)));
        }
        let left = limit - flows.len().min(limit);
        if left > 0 && only_key.is_none_or(|k| matches!(k, ServiceKey::V6(_))) {
            let (entries, n) = self.dp.flows6(left, MAX_FLOW_SCAN - scanned, |k, _| {
                wanted(IpAddr::from(k.dst), k.dport, k.proto)
            })?;
            scanned += n;
            flows.extend(entries.into_iter().map(|(k, e)| (Flow::from(&k), e)));
        }
        let now = monotonic_ns();
        let flows: Vec<FlowStatus> = flows
            .into_iter()
            .map(|(f, e)| self.flow_status_of(&f, &e, now))
            .collect();
        Ok(FlowsReport {
            capacity: self.dp.flow_capacity(),
            capacity_v6: self.dp.flow6_capacity(),
            scan_capped: scanned >= MAX_FLOW_SCAN && flows.len() < limit,
            scanned,
            flows,
        })
    }

    /// What the data path does with the next packet of flow `f`, whose connection-table entry
    /// is `e`; `now` is [`monotonic_ns`].
    fn flow_status_of(&self, f: &Flow, e: &FlowEntry, now: u64) -> FlowStatus {
        let proto = Protocol::from_number(f.proto);
        let key = ServiceKey::new(f.dst.ip(), f.dst.port(), f.proto);
        let v = self.vips.iter().find(|v| v.key == key);
        let backend = v.and_then(|v| v.backends.iter().find(|b| b.id == e.backend_id));
        let removing = self
            .removing
            .iter()
            .find(|r| r.id == e.backend_id && v.is_some_and(|v| v.cfg.name == r.vip));
        let idle = Duration::from_nanos(now.saturating_sub(e.atime));
        let udp_timeout = self.config.flows.udp_idle_timeout;
        let state = if proto == Some(Protocol::Udp) && !udp_timeout.is_zero() && idle > udp_timeout
        {
            "expired"
        } else if let Some(b) = backend {
            if b.flags & BACKEND_F_READY != 0 && b.flags & BACKEND_F_DOWN == 0 {
                "stays"
            } else {
                "remapped"
            }
        } else if removing.is_some() {
            "removing"
        } else {
            "remapped"
        };
        FlowStatus {
            client: f.src.to_string(),
            service: match proto {
                Some(p) => format!("{}/{p}", f.dst),
                None => format!("{}/{}", f.dst, f.proto),
            },
            vip: v.map(|v| v.cfg.name.clone()),
            backend_id: e.backend_id,
            backend: backend
                .map(|b| b.cfg.address.to_string())
                .or_else(|| removing.map(|r| r.address.to_string())),
            state: state.to_string(),
            idle_secs: idle.as_secs_f64(),
        }
    }

    pub fn status(&self) -> Result<Status, ReconcileError> {
        let mut vips = Vec::new();
        let mut forwarded = Counter::default();
        for v in &self.vips {
            let c = self.dp.vip_counter(v.index)?;
            forwarded += c;
            let mut backends = Vec::new();
            for b in &v.backends {
                let bc = self.dp.backend_counter(b.id)?;
                let state = if b.mac.is_none() {
                    "unresolved"
                } else if !b.healthy() {
                    "down"
                } else if b.drained {
                    "draining"
                } else if b.cfg.backup && !b.in_table {
                    "backup"
                } else {
                    "up"
                };
                let h = &b.health;
                backends.push(BackendStatus {
                    address: b.cfg.address.to_string(),
                    weight: b.assigned_weight(),
                    config_weight: b.cfg.weight,
                    state: state.to_string(),
                    role: if b.cfg.backup { "backup" } else { "primary" }.to_string(),
                    drained: b.drained,
                    in_table: b.in_table,
                    health: HealthStatus {
                        check: b.cfg.health.probe.kind().to_string(),
                        port: b.cfg.health.port.unwrap_or(v.cfg.port),
                        state: if b.cfg.health.probe == Probe::None {
                            "none".to_string()
                        } else {
                            h.tracker.state().as_str().to_string()
                        },
                        last_ok: h.last.as_ref().map(|o| o.ok),
                        last_detail: h.last.as_ref().map(|o| o.detail.clone()),
                        last_latency_ms: h.last.as_ref().map(Outcome::latency_ms),
                        last_check_unix: h.last_at.and_then(|t| {
                            t.duration_since(SystemTime::UNIX_EPOCH)
                                .ok()
                                .map(|d| d.as_secs())
                        }),
                        checks: h.checks,
                        failures: h.failures,
                        transitions: h.transitions,
                    },
                    mac: b.mac.as_ref().map(fmt_mac),
                    slots: b.slots,
                    share: if v.table.is_empty() {
                        0.0
                    } else {
                        b.slots as f64 / v.table.len() as f64
                    },
                    packets: bc.packets,
                    bytes: bc.bytes,
                    pps: b.rate.pps,
                    bps: b.rate.bps,
                    new_flows: bc.flows,
                    fps: b.rate.fps,
                });
            }
            vips.push(VipStatus {
                name: v.cfg.name.clone(),
                address: v.cfg.address.to_string(),
                port: v.cfg.port,
                protocol: v.cfg.protocol.to_string(),
                table_size: v.cfg.table_size,
                usable_backends: v.backends.iter().filter(|b| b.in_table).count() as u32,
                serving: v.serving.as_str().to_string(),
                all_down: v.cfg.all_down.as_str().to_string(),
                packets: c.packets,
                bytes: c.bytes,
                pps: v.rate.pps,
                bps: v.rate.bps,
                new_flows: c.flows,
                fps: v.rate.fps,
                backends,
            });
        }
        let counters = self.dp.reason_counters()?;
        let reasons = Reason::ALL
            .iter()
            .map(|&r| {
                let c = if r == Reason::Forwarded {
                    forwarded
                } else {
                    counters[r as usize]
                };
                ReasonStatus {
                    reason: r.name().to_string(),
                    action: match r.action() {
                        lb_common::Action::Tx => "tx",
                        lb_common::Action::Pass => "pass",
                        lb_common::Action::Drop => "drop",
                        lb_common::Action::Aborted => "aborted",
                    }
                    .to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            interface: self.interface.clone(),
            ifindex: self.ifindex,
            interface_mac: fmt_mac(&self.iface_mac),
            xdp_mode: self.attach_mode.map(|m| m.as_str().to_string()),
            program_id: self.dp.program_id(),
            uptime_secs: self.started.elapsed().as_secs(),
            log_level: self.log_level.to_string(),
            table_rebuilds: self.rebuilds,
            health_transitions: self.health_transitions,
            vips,
            reasons,
            flows: self.flow_status()?,
            // The agent fills it in from its HA task.
            ha: None,
        })
    }

    fn flow_status(&self) -> Result<FlowTableStatus, ReconcileError> {
        let counts = self.dp.flow_counters()?;
        let now = Instant::now();
        let f = &self.config.flows;
        Ok(FlowTableStatus {
            capacity: self.dp.flow_capacity(),
            capacity_v6: self.dp.flow6_capacity(),
            udp_idle_timeout_secs: f.udp_idle_timeout.as_secs_f64(),
            insert_rate_limit: f.insert_rate_limit,
            remove_grace_secs: f.remove_grace.as_secs_f64(),
            events: FlowStat::ALL
                .iter()
                .zip(counts)
                .map(|(e, count)| FlowEventStatus {
                    event: e.name().to_string(),
                    count,
                })
                .collect(),
            removing: self
                .removing
                .iter()
                .map(|r| RemovingStatus {
                    vip: r.vip.clone(),
                    backend: r.address.to_string(),
                    remaining_secs: r.until.saturating_duration_since(now).as_secs_f64(),
                })
                .collect(),
        })
    }
}

/// A connection-table key of either family, as socket addresses.
struct Flow {
    src: SocketAddr,
    dst: SocketAddr,
    proto: u8,
}

impl From<&FlowKey> for Flow {
    fn from(k: &FlowKey) -> Flow {
        Flow {
            src: SocketAddr::new(IpAddr::from(k.src), u16::from_be_bytes(k.sport)),
            dst: SocketAddr::new(IpAddr::from(k.dst), u16::from_be_bytes(k.dport)),
            proto: k.proto,
        }
    }
}

impl From<&Flow6Key> for Flow {
    fn from(k: &Flow6Key) -> Flow {
        Flow {
            src: SocketAddr::new(IpAddr::from(k.src), u16::from_be_bytes(k.sport)),
            dst: SocketAddr::new(IpAddr::from(k.dst), u16::from_be_bytes(k.dport)),
            proto: k.proto,
        }
    }
}

/// 64-bit FNV-1a, for [`Reconciler::table_digest`].
struct Fnv64(u64);

impl Fnv64 {
    fn new() -> Fnv64 {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{Backend, Dataplane as DataplaneCfg, HealthCheck, Vip};

    #[test]
    fn ids_reuse_smallest_free() {
        let mut ids = Ids::new(1, 4);
        assert_eq!(ids.take(), Some(1));
        assert_eq!(ids.take(), Some(2));
        assert_eq!(ids.take(), Some(3));
        assert_eq!(ids.take(), None, "4 is the exclusive maximum");
        ids.give_back(2);
        assert_eq!(ids.take(), Some(2));
    }

    #[test]
    fn regions_first_fit_and_merge() {
        let mut r = Regions::new(100);
        let a = r.alloc(30).unwrap();
        let b = r.alloc(30).unwrap();
        let c = r.alloc(30).unwrap();
        assert_eq!((a, b, c), (0, 30, 60));
        assert_eq!(r.alloc(20), None, "only 10 left");
        r.release(b, 30);
        assert_eq!(
            r.alloc(31),
            None,
            "hole of 30 plus tail of 10 are not adjacent"
        );
        r.release(a, 30);
        // 0..60 merged: a 60-entry request fits at 0.
        assert_eq!(r.alloc(60), Some(0));
        r.release(0, 60);
        r.release(c, 30);
        assert_eq!(r.free.len(), 1, "everything merged back: {:?}", r.free);
        assert_eq!(r.alloc(100), Some(0));
    }

    /// One recorded map write.
    #[derive(Clone, Debug, PartialEq)]
    enum Op {
        Backend { id: u32, mac: [u8; 6], ready: bool },
        Ring { base: u32, len: usize },
        Vip { base: u32, size: u32 },
    }

    /// Maps in memory, recording every write, optionally failing the n-th ring write.
    #[derive(Default)]
    struct FakeMaps {
        ops: Vec<Op>,
        ring: Vec<u32>,
        vips: HashMap<ServiceKey, VipInfo>,
        /// What `set_vip_addr` was last told, per address.
        vip_addrs: BTreeMap<IpAddr, u32>,
        /// What `flows` and `flows6` return.
        flows: Vec<(FlowKey, FlowEntry)>,
        flows6: Vec<(Flow6Key, FlowEntry)>,
        backends: HashMap<u32, BackendInfo>,
        settings: Settings,
        fail_ring_writes: u32,
    }

    fn fake_err() -> DataplaneError {
        DataplaneError::RingBounds {
            base: 0,
            len: 0,
            capacity: 0,
        }
    }

    impl Maps for FakeMaps {
        fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
            self.settings = *s;
            Ok(())
        }
        fn set_vip(&mut self, key: &ServiceKey, info: &VipInfo) -> Result<(), DataplaneError> {
            self.ops.push(Op::Vip {
                base: info.ring_base,
                size: info.ring_size,
            });
            self.vips.insert(*key, *info);
            Ok(())
        }
        fn vip(&self, key: &ServiceKey) -> Option<VipInfo> {
            self.vips.get(key).copied()
        }
        fn remove_vip(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
            self.vips.remove(key);
            Ok(())
        }
        fn set_vip_addr(&mut self, addr: IpAddr, count: u32) -> Result<(), DataplaneError> {
            self.vip_addrs.insert(addr, count);
            Ok(())
        }
        fn ring_capacity(&self) -> u32 {
            self.ring.len() as u32
        }
        fn write_ring(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError> {
            if self.fail_ring_writes > 0 {
                self.fail_ring_writes -= 1;
                return Err(fake_err());
            }
            self.ops.push(Op::Ring {
                base,
                len: entries.len(),
            });
            self.ring[base as usize..base as usize + entries.len()].copy_from_slice(entries);
            Ok(())
        }
        fn ring_entry(&self, index: u32) -> Option<u32> {
            self.ring.get(index as usize).copied()
        }
        fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DataplaneError> {
            self.ops.push(Op::Backend {
                id,
                mac: info.mac,
                ready: info.flags & BACKEND_F_READY != 0,
            });
            self.backends.insert(id, *info);
            Ok(())
        }
        fn reset_vip_stats(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn reset_backend_stats(&mut self, _: u32) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn vip_counter(&self, _: u32) -> Result<Counter, DataplaneError> {
            Ok(Counter::default())
        }
        fn backend_counter(&self, _: u32) -> Result<Counter, DataplaneError> {
            Ok(Counter::default())
        }
        fn reason_counters(&self) -> Result<[Counter; Reason::COUNT as usize], DataplaneError> {
            Ok([Counter::default(); Reason::COUNT as usize])
        }
        fn flow_counters(&self) -> Result<[u64; FlowStat::COUNT as usize], DataplaneError> {
            Ok([0; FlowStat::COUNT as usize])
        }
        fn flow_capacity(&self) -> u32 {
            0
        }
        fn flow6_capacity(&self) -> u32 {
            0
        }
        fn flows(
            &self,
            limit: usize,
            _: usize,
            mut keep: impl FnMut(&FlowKey, &FlowEntry) -> bool,
        ) -> Result<(Vec<(FlowKey, FlowEntry)>, usize), DataplaneError> {
            let found = self.flows.iter().filter(|(k, e)| keep(k, e)).copied();
            Ok((found.take(limit).collect(), self.flows.len()))
        }
        fn flows6(
            &self,
            limit: usize,
            _: usize,
            mut keep: impl FnMut(&Flow6Key, &FlowEntry) -> bool,
        ) -> Result<(Vec<(Flow6Key, FlowEntry)>, usize), DataplaneError> {
            let found = self.flows6.iter().filter(|(k, e)| keep(k, e)).copied();
            Ok((found.take(limit).collect(), self.flows6.len()))
        }
        fn program_id(&self) -> Option<u32> {
            None
        }
    }

    const M: u32 = 1009;
    const ADDRS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(10, 0, 0, 11),
        Ipv4Addr::new(10, 0, 0, 12),
        Ipv4Addr::new(10, 0, 0, 13),
    ];

    fn config(weights: [u32; 3]) -> Config {
        Config {
            dataplane: DataplaneCfg {
                interface: "eth0".into(),
                mode: Default::default(),
                xdp_mode: Default::default(),
            },
            api: Default::default(),
            flows: Default::default(),
            ha: None,
            vips: vec![Vip {
                name: "web".into(),
                address: Ipv4Addr::new(10, 0, 0, 100).into(),
                port: 80,
                protocol: Protocol::Tcp,
                table_size: M,
                all_down: AllDown::Drop,
                health: HealthCheck::default_for(Protocol::Tcp),
                backends: ADDRS
                    .iter()
                    .zip(weights)
                    .map(|(&address, weight)| Backend {
                        address: address.into(),
                        weight,
                        backup: false,
                        health: HealthCheck::default_for(Protocol::Tcp),
                    })
                    .collect(),
            }],
        }
    }

    fn mac(i: u8) -> [u8; 6] {
        [2, 0, 0, 0, 0, i]
    }

    fn macs(present: [Option<u8>; 3]) -> MacTable {
        ADDRS
            .iter()
            .zip(present)
            .map(|(&a, m)| (a.into(), m.map(mac)))
            .collect()
    }

    fn reconciler(weights: [u32; 3]) -> Reconciler<FakeMaps> {
        let maps = FakeMaps {
            ring: vec![0; 4 * M as usize],
            ..Default::default()
        };
        Reconciler::new(maps, &config(weights), "eth0", 2, mac(1), LogLevel::Info).unwrap()
    }

    /// Backend ids of the live table, read through the VIP entry as the data path does.
    fn live_table(r: &Reconciler<FakeMaps>) -> Vec<u32> {
        let info = r.dp.vips.values().next().copied().unwrap();
        r.dp.ring[info.ring_base as usize..(info.ring_base + info.ring_size) as usize].to_vec()
    }

    #[tokio::test]
    async fn backend_entries_are_written_before_the_table_that_uses_them() {
        let mut r = reconciler([1, 1, 1]);
        r.dp.ops.clear();
        r.apply_macs(macs([Some(11), Some(12), Some(13)]))
            .await
            .unwrap();
        let ops = &r.dp.ops;
        let first_ring = ops
            .iter()
            .position(|o| matches!(o, Op::Ring { .. }))
            .unwrap();
        let flip = ops
            .iter()
            .position(|o| matches!(o, Op::Vip { .. }))
            .unwrap();
        let backends = ops
            .iter()
            .filter(|o| matches!(o, Op::Backend { ready: true, .. }))
            .count();
        assert_eq!(backends, 3);
        assert!(
            ops[..first_ring]
                .iter()
                .filter(|o| matches!(o, Op::Backend { .. }))
                .count()
                == 3,
            "all backend entries precede the table: {ops:?}"
        );
        assert!(
            first_ring < flip,
            "table written before the VIP points at it: {ops:?}"
        );
        let table = live_table(&r);
        assert_eq!(table.len(), M as usize);
        assert!(table.iter().all(|&id| (1..=3).contains(&id)));
    }

    #[tokio::test]
    async fn a_new_table_goes_to_the_other_half_and_the_old_half_is_left_intact() {
        let mut r = reconciler([1, 1, 1]);
        r.apply_macs(macs([Some(11), Some(12), Some(13)]))
            .await
            .unwrap();
        let first = live_table(&r);
        let first_base = r.dp.vips.values().next().unwrap().ring_base;
        r.dp.ops.clear();

        // b2 loses its MAC: a table without it is published in the other half.
        r.apply_macs(macs([Some(11), None, Some(13)]))
            .await
            .unwrap();
        let second_base = r.dp.vips.values().next().unwrap().ring_base;
        assert_eq!(second_base, first_base + M, "the other half");
        let second = live_table(&r);
        assert!(!second.contains(&2), "lost backend still in the table");
        assert_eq!(
            r.dp.ring[first_base as usize..(first_base + M) as usize],
            first[..],
            "the previous table is untouched while it may still be read"
        );
        // Slots of the remaining backends mostly stay where they were. Disruption bounds are
        // tested in maglev.rs at realistic sizes; this only checks that the swap did not
        // reshuffle the table (3 backends in 1009 slots move a little more than 1%).
        let kept = first
            .iter()
            .zip(&second)
            .filter(|(a, b)| a == b && **a != 2)
            .count();
        let others = first.iter().filter(|&&id| id != 2).count();
        assert!(
            kept as f64 >= 0.97 * others as f64,
            "{kept} of {others} kept"
        );
        // The lost backend's entry is left as it was, for packets still using the old table.
        assert!(
            r.dp.ops.iter().all(|o| !matches!(o, Op::Backend { .. })),
            "{:?}",
            r.dp.ops
        );
        assert_eq!(r.dp.backends[&2].flags & BACKEND_F_READY, BACKEND_F_READY);

        // Back again: its entry is rewritten (new MAC) before the table flips back.
        r.dp.ops.clear();
        let mut back = macs([Some(11), Some(12), Some(13)]);
        back.insert(ADDRS[1].into(), Some(mac(99)));
        let started = Instant::now();
        r.apply_macs(back).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(
            r.dp.ops[0],
            Op::Backend {
                id: 2,
                mac: mac(99),
                ready: true
            }
        );
        assert_eq!(r.dp.vips.values().next().unwrap().ring_base, first_base);
        assert_eq!(live_table(&r), first, "same inputs, same table");
    }

    #[tokio::test]
    async fn a_mac_change_alone_does_not_rebuild_the_table() {
        let mut r = reconciler([1, 1, 1]);
        r.apply_macs(macs([Some(11), Some(12), Some(13)]))
            .await
            .unwrap();
        let rebuilds = r.rebuilds;
        r.dp.ops.clear();
        r.apply_macs(macs([Some(11), Some(42), Some(13)]))
            .await
            .unwrap();
        assert_eq!(
            r.dp.ops,
            vec![Op::Backend {
                id: 2,
                mac: mac(42),
                ready: true
            }]
        );
        assert_eq!(r.rebuilds, rebuilds);
    }

    #[tokio::test]
    async fn weight_zero_and_unresolved_backends_get_no_slots() {
        let mut r = reconciler([1, 0, 1]);
        r.apply_macs(macs([Some(11), Some(12), None]))
            .await
            .unwrap();
        let table = live_table(&r);
        assert!(table.iter().all(|&id| id == 1), "only b1 is usable");
        let s = r.status().unwrap();
        let b = &s.vips[0].backends;
        assert_eq!((b[1].state.as_str(), b[1].slots), ("up", 0));
        assert_eq!((b[2].state.as_str(), b[2].slots), ("unresolved", 0));
        assert_eq!(s.vips[0].usable_backends, 1);

        // Nobody usable: the VIP's table is emptied (drop, counted), not left pointing anywhere.
        r.apply_macs(macs([None, Some(12), None])).await.unwrap();
        assert_eq!(r.dp.vips.values().next().unwrap().ring_size, 0);
    }

    #[tokio::test]
    async fn a_failed_write_is_retried_and_nothing_is_recorded_as_applied() {
        let mut r = reconciler([1, 1, 1]);
        r.dp.fail_ring_writes = 1;
        assert!(
            r.apply_macs(macs([Some(11), Some(12), Some(13)]))
                .await
                .is_err()
        );
        assert!(r.needs_retry());
        assert_eq!(
            r.dp.vips.values().next().unwrap().ring_size,
            0,
            "nothing published"
        );
        assert_eq!(r.status().unwrap().vips[0].usable_backends, 0);
        r.resync().await.unwrap();
        assert!(!r.needs_retry());
        assert_eq!(live_table(&r).len(), M as usize);
    }

    #[tokio::test]
    async fn which_backend_reads_the_live_table() {
        let mut r = reconciler([1, 1, 1]);
        r.apply_macs(macs([Some(11), Some(12), Some(13)]))
            .await
            .unwrap();
        let vip: SocketAddr = "10.0.0.100:80".parse().unwrap();
        let src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let w = r.which_backend(vip, Protocol::Tcp, src).unwrap();
        let slot = w.slot.unwrap();
        let id = live_table(&r)[slot as usize];
        assert_eq!(w.backend_id, Some(id));
        assert_eq!(
            w.backend.as_deref(),
            Some(ADDRS[id as usize - 1].to_string().as_str())
        );
        assert!(matches!(
            r.which_backend(vip, Protocol::Udp, src),
            Err(ReconcileError::NoSuchVip(_))
        ));
    }

    // ---- health, backups, operator changes, reloads ----

    const TOML: &str = r#"
[dataplane]
interface = "eth0"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
table_size = 1009
all_down = "keep-last"

[[vip.backend]]
address = "10.0.0.11"

[[vip.backend]]
address = "10.0.0.12"

[[vip.backend]]
address = "10.0.0.13"
backup = true
"#;

    fn parse(text: &str) -> Config {
        config::parse(text, std::path::Path::new("test.toml"))
            .unwrap()
            .config
    }

    /// A reconciler over `text`'s config with every backend resolved (and 14 of both
    /// families, for backends added later), tables published.
    async fn running(text: &str) -> Reconciler<FakeMaps> {
        let maps = FakeMaps {
            ring: vec![0; 64 * M as usize],
            ..Default::default()
        };
        let mut r = Reconciler::new(maps, &parse(text), "eth0", 2, mac(1), LogLevel::Info).unwrap();
        let mut all: MacTable = r.wanted_addrs().into_iter().map(|a| (a, None)).collect();
        for fam in Fam::BOTH {
            all.insert(fam.addr(14), None);
        }
        for (a, m) in all.iter_mut() {
            let last = match a {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(a) => a.octets()[15],
            };
            *m = Some(mac(last));
        }
        r.apply_macs(all).await.unwrap();
        r
    }

    /// The address family a test runs in: its helpers give `10.0.0.N` or `2001:db8::N`.
    #[derive(Clone, Copy, Debug)]
    enum Fam {
        V4,
        V6,
    }

    impl Fam {
        const BOTH: [Fam; 2] = [Fam::V4, Fam::V6];

        /// `10.0.0.N`, or `2001:db8::N` (N's decimal digits read as hex: 2001:db8::11).
        fn addr(self, n: u8) -> IpAddr {
            match self {
                Fam::V4 => format!("10.0.0.{n}"),
                Fam::V6 => format!("2001:db8::{n}"),
            }
            .parse()
            .unwrap()
        }

        /// `text` with its `"10.0.0.N"` addresses moved to this family.
        fn toml(self, text: &str) -> String {
            match self {
                Fam::V4 => text.to_string(),
                Fam::V6 => text.replace("\"10.0.0.", "\"2001:db8::"),
            }
        }

        /// The service `ADDRESS:PORT/tcp` of the VIP at N.
        fn service(self, n: u8, port: u16) -> String {
            format!("{}/tcp", SocketAddr::new(self.addr(n), port))
        }
    }

    fn vip_table(r: &Reconciler<FakeMaps>, name: &str) -> Vec<u32> {
        let v = r.vips.iter().find(|v| v.cfg.name == name).unwrap();
        let info = r.dp.vips[&v.key];
        r.dp.ring[info.ring_base as usize..(info.ring_base + info.ring_size) as usize].to_vec()
    }

    /// The backend addresses in `name`'s live table.
    fn in_table(r: &Reconciler<FakeMaps>, name: &str) -> BTreeSet<IpAddr> {
        let v = r.vips.iter().find(|v| v.cfg.name == name).unwrap();
        vip_table(r, name)
            .iter()
            .map(|id| v.backends.iter().find(|b| b.id == *id).unwrap().cfg.address)
            .collect()
    }

    fn addr(last: u8) -> IpAddr {
        Fam::V4.addr(last)
    }

    /// Health results (`+` up, `-` down) of `backend` of the first VIP.
    async fn report(r: &mut Reconciler<FakeMaps>, backend: IpAddr, results: &str) {
        let key = (r.vips[0].cfg.key(), backend);
        for c in results.chars() {
            let outcome = Outcome {
                ok: c == '+',
                detail: if c == '+' {
                    "connected"
                } else {
                    "connect refused"
                }
                .into(),
                latency: Duration::from_millis(1),
            };
            r.health_report(key, outcome).await.unwrap();
        }
    }

    #[tokio::test]
    async fn fall_failures_take_a_backend_out_and_rise_successes_bring_it_back() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            report(&mut r, a(11), "+").await;
            report(&mut r, a(12), "+").await;
            let both = BTreeSet::from([a(11), a(12)]);
            assert_eq!(in_table(&r, "web"), both, "the backup stands by");
            let full = vip_table(&r, "web");

            report(&mut r, a(12), "--").await;
            assert_eq!(in_table(&r, "web"), both, "2 of 3 failures: still in");
            report(&mut r, a(12), "-").await;
            assert_eq!(in_table(&r, "web"), BTreeSet::from([a(11)]));
            let s = r.status().unwrap();
            let b = &s.vips[0].backends[1];
            assert_eq!(
                (b.state.as_str(), b.health.state.as_str()),
                ("down", "down")
            );
            assert_eq!(b.health.last_detail.as_deref(), Some("connect refused"));
            assert_eq!(
                (b.health.checks, b.health.failures, b.health.transitions),
                (4, 3, 2)
            );

            report(&mut r, a(12), "+").await;
            assert_eq!(in_table(&r, "web").len(), 1, "1 of 2 successes: still out");
            report(&mut r, a(12), "+").await;
            assert_eq!(
                vip_table(&r, "web"),
                full,
                "back, with the same table as before"
            );
        }
    }

    #[tokio::test]
    async fn backups_serve_only_while_no_primary_can_and_keep_last_holds_the_last_set() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            report(&mut r, a(11), "-").await; // first result: down at once
            assert_eq!(in_table(&r, "web"), BTreeSet::from([a(12)]));
            report(&mut r, a(12), "-").await;
            assert_eq!(
                in_table(&r, "web"),
                BTreeSet::from([a(13)]),
                "backup took over"
            );
            assert_eq!(r.status().unwrap().vips[0].serving, "backup");

            // The backup dies too: keep-last keeps it rather than emptying the table.
            report(&mut r, a(13), "-").await;
            assert_eq!(in_table(&r, "web"), BTreeSet::from([a(13)]));
            assert_eq!(r.status().unwrap().vips[0].serving, "all-down: keep-last");

            // A primary returns: only it serves.
            report(&mut r, a(11), "++").await;
            assert_eq!(in_table(&r, "web"), BTreeSet::from([a(11)]));
            assert_eq!(r.status().unwrap().vips[0].serving, "ok");
        }
    }

    #[tokio::test]
    async fn all_down_drop_empties_the_table() {
        let mut r = running(&TOML.replace("keep-last", "drop")).await;
        for a in [11, 12, 13] {
            report(&mut r, addr(a), "-").await;
        }
        let info = r.dp.vips.values().next().copied().unwrap();
        assert_eq!(info.ring_size, 0, "dropped and counted, not forwarded");
        assert_eq!(r.status().unwrap().vips[0].serving, "no backend");
    }

    #[tokio::test]
    async fn drain_undrain_and_weight_take_effect_at_once() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            let full = vip_table(&r, "web");
            r.set_drain("web", a(11), true).await.unwrap();
            assert_eq!(in_table(&r, "web"), BTreeSet::from([a(12)]));
            assert_eq!(r.status().unwrap().vips[0].backends[0].state, "draining");
            r.set_drain(&fam.service(100, 80), a(11), false)
                .await
                .unwrap();
            assert_eq!(vip_table(&r, "web"), full);

            r.set_weight("web", a(11), 3).await.unwrap();
            let t = vip_table(&r, "web");
            let share = t.iter().filter(|&&id| id == 1).count() as f64 / t.len() as f64;
            assert!((share - 0.75).abs() < 0.02, "weight 3 of 4: {share}");
            assert!(matches!(
                r.set_weight("web", a(11), 70000).await,
                Err(ReconcileError::Invalid(_))
            ));
            assert!(matches!(
                r.set_drain("web", a(99), true).await,
                Err(ReconcileError::NoSuchBackend { .. })
            ));
            assert!(matches!(
                r.set_drain("nope", a(11), true).await,
                Err(ReconcileError::NoSuchVip(_))
            ));
        }
    }

    #[tokio::test]
    async fn added_backends_join_and_removed_ones_leave_without_reusing_their_id_at_once() {
        let mut r = running(TOML).await;
        r.add_backend("web", addr(14), 1, false).await.unwrap();
        assert_eq!(
            in_table(&r, "web"),
            BTreeSet::from([addr(11), addr(12), addr(14)])
        );
        assert!(matches!(
            r.add_backend("web", addr(14), 1, false).await,
            Err(ReconcileError::Conflict(_))
        ));
        assert!(matches!(
            r.add_backend("web", Ipv4Addr::new(224, 0, 0, 1).into(), 1, false)
                .await,
            Err(ReconcileError::Invalid(_))
        ));
        let id12 = r.vips[0].backend(addr(12)).unwrap().id;
        r.remove_backend("web", addr(12)).await.unwrap();
        assert_eq!(in_table(&r, "web"), BTreeSet::from([addr(11), addr(14)]));
        // Added right away, another backend does not get the id the old table may still use.
        r.add_backend("web", addr(12), 1, false).await.unwrap();
        assert_ne!(r.vips[0].backend(addr(12)).unwrap().id, id12);
    }

    #[tokio::test]
    async fn vips_are_removed_and_added_at_run_time() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            let key = r.vips[0].key;
            let ids: Vec<u32> = r.vips[0].backends.iter().map(|b| b.id).collect();
            assert!(ids.iter().all(|id| r.dp.backends[id].vip == key.word()));
            // One backend in its removal grace when the VIP goes: cleared too.
            r.remove_backend("web", a(12)).await.unwrap();
            r.remove_vip("web").await.unwrap();
            assert!(!r.dp.vips.contains_key(&key));
            assert!(r.status().unwrap().vips.is_empty());
            assert!(
                ids.iter()
                    .all(|id| r.dp.backends[id] == BackendInfo::default()),
                "the connection table, read before the VIP table, must not keep forwarding"
            );
            assert_eq!(r.next_removal_deadline(), None);
            let vip = config::parse_vip(
                &fam.toml("[[vip]]\nname = \"web2\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
                 table_size = 1009\n[[vip.backend]]\naddress = \"10.0.0.11\"\n"),
                std::path::Path::new("api"),
            )
            .unwrap();
            r.add_vip_live(vip.clone()).await.unwrap();
            assert_eq!(in_table(&r, "web2"), BTreeSet::from([a(11)]));
            assert!(matches!(
                r.add_vip_live(vip).await,
                Err(ReconcileError::Conflict(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_reload_applies_only_the_difference() {
        let mut r = running(TOML).await;
        let rebuilds = r.rebuilds;
        assert_eq!(
            r.apply_config(parse(TOML)).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(r.rebuilds, rebuilds, "same config, nothing rebuilt");

        // Drained by the operator, weighted by the operator: a reload keeps the drain and goes
        // back to the file's weights.
        r.set_drain("web", addr(12), true).await.unwrap();
        r.set_weight("web", addr(11), 5).await.unwrap();
        let new = TOML.replace(
            "[[vip.backend]]\naddress = \"10.0.0.13\"\nbackup = true\n",
            "[[vip.backend]]\naddress = \"10.0.0.14\"\nweight = 2\n",
        ) + "\n[[vip]]\nname = \"dns\"\naddress = \"10.0.0.53\"\nport = 53\nprotocol = \"udp\"\n\
             table_size = 1009\n[[vip.backend]]\naddress = \"10.0.0.11\"\n";
        let changes = r.apply_config(parse(&new)).await.unwrap();
        assert_eq!(
            changes,
            [
                "vip web: backend 10.0.0.13 removed",
                "vip web: backend 10.0.0.11 weight 5 -> 1",
                "vip web: backend 10.0.0.14 added",
                "vip dns: added with 1 backend(s)",
            ]
        );
        assert_eq!(in_table(&r, "web"), BTreeSet::from([addr(11), addr(14)]));
        assert_eq!(in_table(&r, "dns"), BTreeSet::from([addr(11)]));
        let s = r.status().unwrap();
        assert_eq!(s.vips[0].backends[1].state, "draining");
        assert_eq!(s.vips[0].backends[0].weight, 1);

        // Table size change: the VIP moves to a new region, atomically.
        let resized = new.replacen("table_size = 1009", "table_size = 1013", 1);
        let changes = r.apply_config(parse(&resized)).await.unwrap();
        assert_eq!(changes, ["vip web: table_size 1009 -> 1013"]);
        assert_eq!(vip_table(&r, "web").len(), 1013);

        // Removing a VIP.
        let changes = r.apply_config(parse(&resized.replace("name = \"dns\"\naddress = \"10.0.0.53\"\nport = 53\nprotocol = \"udp\"\ntable_size = 1009\n[[vip.backend]]\naddress = \"10.0.0.11\"\n", "name = \"dns\"\naddress = \"10.0.0.53\"\nport = 53\nprotocol = \"udp\"\ntable_size = 1009\n"))).await.unwrap();
        assert_eq!(changes, ["vip dns: backend 10.0.0.11 removed"]);
    }

    #[tokio::test]
    async fn a_reload_that_needs_a_restart_or_does_not_fit_changes_nothing() {
        let mut r = running(TOML).await;
        let before = r.status().unwrap();
        let other_if = TOML.replace("interface = \"eth0\"", "interface = \"eth1\"");
        assert!(matches!(
            r.apply_config(parse(&other_if)).await,
            Err(ReconcileError::NeedsRestart(_))
        ));
        // 64 M entries of ring: a VIP of 2 x 40009 does not fit.
        let big = format!(
            "{TOML}\n[[vip]]\naddress = \"10.0.0.101\"\nport = 80\nprotocol = \"tcp\"\n\
             table_size = 40009\n"
        );
        assert!(matches!(
            r.apply_config(parse(&big)).await,
            Err(ReconcileError::RingFull { .. })
        ));
        let after = r.status().unwrap();
        assert_eq!(before.vips, after.vips);
    }

    /// The flags of `backend`'s map entry in VIP web.
    fn flags(r: &Reconciler<FakeMaps>, backend: IpAddr) -> u16 {
        let id = r.vips[0].backend(backend).unwrap().id;
        r.dp.backends[&id].flags
    }

    #[tokio::test]
    async fn a_failed_backend_is_marked_down_after_the_table_without_it_and_cleared_before_it_returns()
     {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            report(&mut r, a(11), "+").await;
            report(&mut r, a(12), "+").await;
            assert_eq!(flags(&r, a(12)), BACKEND_F_READY);
            r.dp.ops.clear();
            report(&mut r, a(12), "---").await;
            let id = r.vips[0].backend(a(12)).unwrap().id;
            assert_eq!(flags(&r, a(12)), BACKEND_F_READY | BACKEND_F_DOWN);
            let flip = r.dp.ops.iter().position(|o| matches!(o, Op::Vip { .. }));
            let mark =
                r.dp.ops
                    .iter()
                    .position(|o| matches!(o, Op::Backend { id: i, .. } if *i == id));
            assert!(
                flip.is_some() && mark > flip,
                "marked down only once its table is gone: {:?}",
                r.dp.ops
            );

            r.dp.ops.clear();
            report(&mut r, a(12), "++").await;
            assert_eq!(flags(&r, a(12)), BACKEND_F_READY);
            let flip = r.dp.ops.iter().position(|o| matches!(o, Op::Vip { .. }));
            let clear =
                r.dp.ops
                    .iter()
                    .position(|o| matches!(o, Op::Backend { id: i, .. } if *i == id));
            assert!(
                clear.is_some() && clear < flip,
                "the mark goes before the table that holds it again: {:?}",
                r.dp.ops
            );
        }
    }

    #[tokio::test]
    async fn keep_last_and_drained_backends_are_not_marked_down() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(&fam.toml(TOML)).await;
            // A drained backend keeps its established flows.
            r.set_drain("web", a(11), true).await.unwrap();
            assert_eq!(flags(&r, a(11)), BACKEND_F_READY);
            // Every backend fails: keep-last keeps the last table (the backup's), so its flows are
            // not remapped; the others are out of the table and marked.
            for n in [11, 12, 13] {
                report(&mut r, a(n), "-").await;
            }
            assert_eq!(r.status().unwrap().vips[0].serving, "all-down: keep-last");
            assert_eq!(flags(&r, a(13)), BACKEND_F_READY, "kept in the table");
            assert_eq!(flags(&r, a(11)), BACKEND_F_READY | BACKEND_F_DOWN);
            assert_eq!(flags(&r, a(12)), BACKEND_F_READY | BACKEND_F_DOWN);
        }
    }

    #[tokio::test]
    async fn a_removed_backend_stays_ready_for_its_grace_then_is_cleared_and_its_id_reused() {
        for fam in Fam::BOTH {
            let a = |n| fam.addr(n);
            let mut r = running(
                &fam.toml(&TOML.replace("[[vip]]", "[flows]\nremove_grace = \"100ms\"\n\n[[vip]]")),
            )
            .await;
            let id = r.vips[0].backend(a(12)).unwrap().id;
            let msg = r.remove_backend("web", a(12)).await.unwrap();
            assert!(msg.contains("100ms"), "{msg}");
            assert!(!vip_table(&r, "web").contains(&id));
            assert_eq!(
                r.dp.backends[&id].flags, BACKEND_F_READY,
                "its flows keep going to it"
            );
            let s = r.status().unwrap();
            assert_eq!(s.flows.removing.len(), 1);
            assert_eq!(s.flows.removing[0].backend, a(12).to_string());
            let deadline = r.next_removal_deadline().expect("a grace runs");

            // Before the deadline nothing happens; the id is not free.
            r.expire_removed().unwrap();
            assert_eq!(r.dp.backends[&id].flags, BACKEND_F_READY);
            r.reclaim(false).await;
            assert!(r.backend_ids.used.contains(&id));

            tokio::time::sleep_until(deadline.into()).await;
            r.expire_removed().unwrap();
            assert_eq!(
                r.dp.backends[&id].flags, 0,
                "cleared: its flows are remapped"
            );
            assert_eq!(r.next_removal_deadline(), None);
            assert!(r.status().unwrap().flows.removing.is_empty());
            // Reused once packets that read the entry are gone.
            r.reclaim(true).await;
            r.add_backend("web", a(14), 1, false).await.unwrap();
            assert_eq!(r.vips[0].backend(a(14)).unwrap().id, id);
        }
    }

    /// TOML's service, plus the same service over IPv6.
    fn dual_stack() -> String {
        let web6 = TOML
            .split_once("[[vip]]")
            .unwrap()
            .1
            .replace("name = \"web\"", "name = \"web6\"");
        format!("{TOML}\n[[vip]]{}", Fam::V6.toml(&web6))
    }

    #[tokio::test]
    async fn ipv6_services_go_to_the_ipv6_tables_and_share_ids_and_ring() {
        let mut r = running(&dual_stack()).await;
        let (v4, v6) = (&r.vips[0], &r.vips[1]);
        assert!(matches!(v4.key, ServiceKey::V4(_)));
        let ServiceKey::V6(k6) = v6.key else {
            panic!("{:?}", v6.key)
        };
        assert_eq!(
            k6.addr,
            Fam::V6
                .addr(100)
                .to_string()
                .parse::<Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_ne!(v4.index, v6.index, "one index space");
        assert!(v6.base >= v4.base + 2 * M, "one ring, separate regions");
        assert_eq!(
            r.dp.vip_addrs,
            BTreeMap::from([(addr(100), 1), (Fam::V6.addr(100), 1)])
        );
        // The same table over the same weights, whatever the family: Maglev sorts by address
        // and the ids line up.
        assert_eq!(
            in_table(&r, "web6"),
            BTreeSet::from([Fam::V6.addr(11), Fam::V6.addr(12)])
        );
        for b in &r.vips[1].backends {
            let e = r.dp.backends[&b.id];
            assert_eq!(
                e.addr, [0; 4],
                "an IPv6 backend's entry has no IPv4 address"
            );
            assert_eq!(e.vip, lb_common::maps::vip6_key_word(&k6));
            assert_eq!(e.vip_index, r.vips[1].index);
        }
        let s = r.status().unwrap();
        assert_eq!(s.vips[1].address, "2001:db8::100");
        assert_eq!(s.vips[1].socket(), "[2001:db8::100]:80");
        assert_eq!(s.vips[1].backends[0].address, "2001:db8::11");

        // Named as services are written, and removed from the IPv6 tables.
        r.set_drain("[2001:db8::100]:80/tcp", Fam::V6.addr(11), true)
            .await
            .unwrap();
        assert_eq!(in_table(&r, "web6"), BTreeSet::from([Fam::V6.addr(12)]));
        r.remove_vip("web6").await.unwrap();
        assert!(!r.dp.vips.contains_key(&ServiceKey::V6(k6)));
        assert_eq!(r.dp.vip_addrs[&Fam::V6.addr(100)], 0);
        assert_eq!(r.vip_addresses(), BTreeSet::from([addr(100)]));
    }

    #[tokio::test]
    async fn a_backend_of_the_other_family_is_refused_naming_both() {
        let mut r = running(&dual_stack()).await;
        let e = r.add_backend("web6", addr(14), 1, false).await.unwrap_err();
        let ReconcileError::Invalid(m) = &e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("backend 10.0.0.14 is IPv4 but vip `web6` (2001:db8::100) is IPv6"),
            "{m}"
        );
        assert!(matches!(
            r.add_backend("web", Fam::V6.addr(14), 1, false).await,
            Err(ReconcileError::Invalid(_))
        ));
        r.add_backend("web6", Fam::V6.addr(14), 1, false)
            .await
            .unwrap();
        assert!(in_table(&r, "web6").contains(&Fam::V6.addr(14)));
    }

    #[tokio::test]
    async fn which_backend_hashes_ipv6_flows_with_the_data_paths_hash() {
        let r = running(&dual_stack()).await;
        let vip: SocketAddr = "[2001:db8::100]:80".parse().unwrap();
        let src: SocketAddr = "[2001:db8::1]:40000".parse().unwrap();
        let w = r.which_backend(vip, Protocol::Tcp, src).unwrap();
        assert_eq!(
            w.hash,
            lb_common::hash::flow_hash_v6(
                &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                &[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                40000u16.to_be_bytes(),
                80u16.to_be_bytes(),
                6
            )
        );
        let slot = w.slot.unwrap();
        assert_eq!(Some(vip_table(&r, "web6")[slot as usize]), w.backend_id);
        assert_eq!(w.service, "[2001:db8::100]:80/tcp");
        assert_eq!(w.source, "[2001:db8::1]:40000");
        let v4src: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        assert!(matches!(
            r.which_backend(vip, Protocol::Tcp, v4src),
            Err(ReconcileError::Invalid(m)) if m.contains("different families")
        ));
    }

    #[tokio::test]
    async fn flows_lists_both_tables_and_a_vips_own_family_only() {
        let mut r = running(&dual_stack()).await;
        let id4 = r.vips[0].backends[0].id;
        let id6 = r.vips[1].backends[1].id;
        let now = monotonic_ns();
        let entry = |backend_id| FlowEntry {
            backend_id,
            _pad: 0,
            atime: now,
        };
        r.dp.flows = vec![(
            FlowKey {
                src: [192, 0, 2, 1],
                dst: [10, 0, 0, 100],
                sport: 40000u16.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: 6,
                _pad: [0; 3],
            },
            entry(id4),
        )];
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[0x20, 1, 0xd, 0xb8]);
        dst[15] = 0;
        dst[14] = 1; // 2001:db8::100
        r.dp.flows6 = vec![(
            Flow6Key {
                src: [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                dst,
                sport: 40001u16.to_be_bytes(),
                dport: 80u16.to_be_bytes(),
                proto: 6,
                _pad: [0; 3],
            },
            entry(id6),
        )];
        let all = r.flows(None, 10).unwrap();
        let rows: Vec<String> = all
            .flows
            .iter()
            .map(|f| {
                format!(
                    "{} {} {:?} {:?} {}",
                    f.client, f.service, f.vip, f.backend, f.state
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                r#"192.0.2.1:40000 10.0.0.100:80/tcp Some("web") Some("10.0.0.11") stays"#,
                r#"[fd00::1]:40001 [2001:db8::100]:80/tcp Some("web6") Some("2001:db8::12") stays"#,
            ]
        );
        let only6 = r.flows(Some("web6"), 10).unwrap();
        assert_eq!(only6.flows.len(), 1);
        assert_eq!(
            only6.scanned, 1,
            "the IPv4 table is not read for an IPv6 VIP"
        );
        assert_eq!(r.flows(Some("[2001:db8::100]:80/tcp"), 10).unwrap(), only6);
        assert_eq!(
            r.flows(None, 1).unwrap().flows.len(),
            1,
            "the limit spans both"
        );
    }

    #[tokio::test]
    async fn the_table_digest_of_ipv4_services_is_unchanged_and_ipv6_ones_count() {
        let r4 = running(TOML).await;
        // Pinned: the digest of an IPv4-only config is what agents before IPv6 computed, so a
        // node upgraded first still agrees with its peer.
        assert_eq!(
            r4.table_digest(),
            0x4a3e_e11e_a9d6_2e0c,
            "{:#x}",
            r4.table_digest()
        );
        let dual = running(&dual_stack()).await;
        assert_ne!(dual.table_digest(), r4.table_digest());
        assert_eq!(
            dual.table_digest(),
            running(&dual_stack()).await.table_digest()
        );
    }

    #[tokio::test]
    async fn a_reload_applies_flow_settings_live_but_refuses_a_new_table_size() {
        let mut r = running(TOML).await;
        assert_eq!(r.dp.settings.flow_insert_rate, 100_000);
        assert_eq!(r.dp.settings.flow_udp_timeout_ns, 30_000_000_000);
        let changed = TOML.replace(
            "[[vip]]",
            "[flows]\nudp_idle_timeout = \"2m\"\ninsert_rate_limit = 500\nremove_grace = \"5s\"\n\n[[vip]]",
        );
        let changes = r.apply_config(parse(&changed)).await.unwrap();
        assert_eq!(
            changes,
            [
                "flows.udp_idle_timeout 30s -> 120s",
                "flows.insert_rate_limit 100000 -> 500",
                "flows.remove_grace 60s -> 5s"
            ]
        );
        assert_eq!(r.dp.settings.flow_insert_rate, 500);
        assert_eq!(r.dp.settings.flow_udp_timeout_ns, 120_000_000_000);
        assert_eq!(
            r.dp.settings.iface_mac,
            mac(1),
            "the rest of the settings kept"
        );

        let resized = changed.replace("[flows]", "[flows]\nentries = 2048");
        let e = r.apply_config(parse(&resized)).await.unwrap_err();
        assert!(
            matches!(&e, ReconcileError::NeedsRestart(m) if m.contains("flows.entries")),
            "{e}"
        );
        assert_eq!(r.dp.settings.flow_insert_rate, 500, "nothing applied");
    }
}
