//! The reconciler: the only code that writes the data path's maps.
//!
//! It holds the desired state (the config, and the backend MACs the kernel reported), builds
//! each VIP's Maglev table over the backends that can take traffic (weight > 0 and MAC known),
//! and applies only what changed.
//!
//! Guarantees:
//! - A table change is atomic for the data path: every VIP owns a ring region of two halves; the
//!   new table is written into the half not in use, then the VIP's map entry is replaced (one
//!   update of a non-preallocated hash map) to point at it. A half that stopped being live is
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
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{
    Reason,
    hash::{flow_hash_between, flow_slot_between},
    maps::{
        BACKEND_F_READY, BackendInfo, Counter, MAX_BACKENDS, MAX_VIPS, Settings, VipAddrKey,
        VipInfo, VipKey,
    },
};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    config::{self, Config, Protocol},
    dataplane::{AttachMode, Dataplane, DataplaneError},
    logging::LogLevel,
    maglev::{self, MaglevBackend},
    net::{MacTable, fmt_mac},
    status::{BackendStatus, ReasonStatus, Status, VipStatus, WhichBackend},
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
}

/// How long a table half that stopped being live is left alone before it is rewritten. XDP runs
/// to completion within microseconds with preemption disabled; this is a wide margin.
pub const HALF_REUSE_GRACE: Duration = Duration::from_millis(10);

/// The map operations the reconciler performs. [`Dataplane`] is the real one; the unit tests use
/// a recording fake.
pub trait Maps {
    fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError>;
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError>;
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    fn set_vip_addr(&mut self, key: &VipAddrKey, count: u32) -> Result<(), DataplaneError>;
    fn ring_capacity(&self) -> u32;
    fn write_ring(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError>;
    fn ring_entry(&self, index: u32) -> Option<u32>;
    fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DataplaneError>;
    fn reset_vip_stats(&mut self, index: u32) -> Result<(), DataplaneError>;
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn vip_counter(&self, index: u32) -> Result<Counter, DataplaneError>;
    fn backend_counter(&self, id: u32) -> Result<Counter, DataplaneError>;
    fn reason_counters(&self) -> Result<[Counter; Reason::COUNT as usize], DataplaneError>;
    fn program_id(&self) -> Option<u32>;
}

impl Maps for Dataplane {
    fn set_settings(&mut self, s: &Settings) -> Result<(), DataplaneError> {
        Dataplane::set_settings(self, s)
    }
    fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        Dataplane::set_vip(self, key, info)
    }
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        Dataplane::vip(self, key)
    }
    fn set_vip_addr(&mut self, key: &VipAddrKey, count: u32) -> Result<(), DataplaneError> {
        Dataplane::set_vip_addr(self, key, count)
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
    fn program_id(&self) -> Option<u32> {
        Dataplane::program_id(self)
    }
}

/// Smallest-free-number allocator for VIP indices and backend ids.
#[derive(Debug)]
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

    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "used when VIPs are removed at run time")
    )]
    fn give_back(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// First-fit allocator of ring regions, merging neighbours on free.
#[derive(Debug)]
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

    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "used when VIPs are removed at run time")
    )]
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

#[derive(Debug)]
struct BackendSlot {
    cfg: config::Backend,
    id: u32,
    /// The MAC in this backend's map entry, or `None` while unresolved.
    mac: Option<[u8; 6]>,
    /// Whether the live table was built with this backend (it may still own no slot, if its
    /// share of the table rounds to zero).
    in_table: bool,
    /// Entries of the live table pointing at this backend.
    slots: u32,
}

impl BackendSlot {
    /// Can take new flows: the data path can reach it and its weight says so.
    fn usable(&self) -> bool {
        self.mac.is_some() && self.cfg.weight > 0
    }
}

#[derive(Debug)]
struct VipSlot {
    cfg: config::Vip,
    key: VipKey,
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
}

impl VipSlot {
    fn half_base(&self, half: u32) -> u32 {
        self.base + half * self.cfg.table_size
    }

    fn warn_no_backend(&self) {
        warn!(
            vip = %self.cfg.name,
            "vip {} has no usable backend ({} configured): its packets are dropped and counted \
             as drop_no_backend",
            self.cfg.name,
            self.backends.len()
        );
    }
}

/// Owns the data path's maps and is their only writer.
pub struct Reconciler<M: Maps = Dataplane> {
    dp: M,
    interface: String,
    ifindex: u32,
    iface_mac: [u8; 6],
    attach_mode: Option<AttachMode>,
    log_level: LogLevel,
    vips: Vec<VipSlot>,
    vip_ids: Ids,
    backend_ids: Ids,
    regions: Regions,
    vip_addrs: BTreeMap<Ipv4Addr, u32>,
    /// The MACs the kernel last reported (desired state).
    macs: MacTable,
    needs_retry: bool,
    rebuilds: u64,
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
            needs_retry: false,
            rebuilds: 0,
            started: Instant::now(),
        };
        r.dp.set_settings(&r.settings())?;
        for v in &config.vips {
            r.add_vip(v.clone())?;
        }
        Ok(r)
    }

    fn settings(&self) -> Settings {
        Settings {
            iface_mac: self.iface_mac,
            log_level: self.log_level.ebpf_level(),
            ..Default::default()
        }
    }

    fn add_vip(&mut self, cfg: config::Vip) -> Result<(), ReconcileError> {
        let index = self
            .vip_ids
            .take()
            .ok_or(ReconcileError::TooManyVips { max: MAX_VIPS })?;
        let needed = 2 * cfg.table_size;
        let base = self
            .regions
            .alloc(needed)
            .ok_or_else(|| ReconcileError::RingFull {
                vip: cfg.name.clone(),
                needed,
            })?;
        self.dp.reset_vip_stats(index)?;
        let mut backends = Vec::new();
        for b in &cfg.backends {
            let id = self
                .backend_ids
                .take()
                .ok_or(ReconcileError::TooManyBackends { max: MAX_BACKENDS })?;
            self.dp.reset_backend_stats(id)?;
            backends.push(BackendSlot {
                cfg: b.clone(),
                id,
                mac: None,
                in_table: false,
                slots: 0,
            });
        }
        let slot = VipSlot {
            key: cfg.map_key(),
            index,
            base,
            live: None,
            table: Vec::new(),
            backends,
            retired_at: None,
            cfg,
        };
        // The address first: the data path looks up VIPS only for addresses it knows.
        let count = self.vip_addrs.get(&slot.cfg.address).copied().unwrap_or(0) + 1;
        self.dp.set_vip_addr(
            &VipAddrKey {
                addr: slot.cfg.address.octets(),
            },
            count,
        )?;
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
    pub fn wanted_addrs(&self) -> BTreeSet<Ipv4Addr> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.cfg.address))
            .collect()
    }

    /// Backend addresses without a known MAC.
    pub fn unresolved(&self) -> BTreeSet<Ipv4Addr> {
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

    async fn sync_vip(&mut self, i: usize) -> Result<(), ReconcileError> {
        // 1. Entries of backends that (re)gained or changed their MAC are written first.
        let vip_index = self.vips[i].index;
        for b in &mut self.vips[i].backends {
            let mac = self.macs.get(&b.cfg.address).copied().flatten();
            if mac == b.mac {
                continue;
            }
            if let Some(m) = mac {
                self.dp.set_backend(
                    b.id,
                    &BackendInfo {
                        mac: m,
                        src_mac: self.iface_mac,
                        _pad: [0; 2],
                        flags: BACKEND_F_READY,
                        addr: b.cfg.address.octets(),
                        vip_index,
                    },
                )?;
            }
            // A lost MAC leaves the entry as it is: the table published below stops using it,
            // and packets still in flight with the previous table keep a valid destination.
            b.mac = mac;
        }
        let vip = &self.vips[i];
        if vip.live.is_some() && vip.backends.iter().all(|b| b.usable() == b.in_table) {
            return Ok(());
        }

        // 2. A new table over the usable backends, into the half not in use, then the flip.
        let inputs: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .map(|b| MaglevBackend {
                address: b.cfg.address.into(),
                weight: if b.usable() { b.cfg.weight } else { 0 },
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
        for (b, n) in vip.backends.iter_mut().zip(slots) {
            b.in_table = b.usable();
            b.slots = n;
        }
        vip.table = table;
        self.rebuilds += 1;
        if vip.table.is_empty() {
            if attached {
                vip.warn_no_backend();
            }
        } else {
            info!(
                vip = %vip.cfg.name,
                usable = vip.backends.iter().filter(|b| b.in_table).count(),
                configured = vip.backends.len(),
                "table published"
            );
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

    fn find_vip(&self, addr: Ipv4Addr, port: u16, proto: Protocol) -> Option<&VipSlot> {
        self.vips
            .iter()
            .find(|v| v.cfg.address == addr && v.cfg.port == port && v.cfg.protocol == proto)
    }

    /// Which backend the kernel sends a flow to, read from the live table in the kernel.
    pub fn which_backend(
        &self,
        vip: SocketAddrV4,
        proto: Protocol,
        src: SocketAddrV4,
    ) -> Result<WhichBackend, ReconcileError> {
        let v = self
            .find_vip(*vip.ip(), vip.port(), proto)
            .ok_or_else(|| ReconcileError::NoSuchVip(format!("{vip}/{proto}")))?;
        let hash = flow_hash_between(src, vip, proto.number());
        let (slot, backend_id) = match self.dp.vip(&v.key) {
            Some(info) if info.ring_size > 0 => {
                let slot = flow_slot_between(src, vip, proto.number(), info.ring_size);
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

    pub fn status(&self) -> Result<Status, ReconcileError> {
        let mut vips = Vec::new();
        let mut forwarded = Counter::default();
        for v in &self.vips {
            let c = self.dp.vip_counter(v.index)?;
            forwarded += c;
            let mut backends = Vec::new();
            for b in &v.backends {
                let bc = self.dp.backend_counter(b.id)?;
                backends.push(BackendStatus {
                    address: b.cfg.address.to_string(),
                    weight: b.cfg.weight,
                    state: if b.mac.is_some() { "up" } else { "unresolved" }.to_string(),
                    mac: b.mac.as_ref().map(fmt_mac),
                    slots: b.slots,
                    share: if v.table.is_empty() {
                        0.0
                    } else {
                        b.slots as f64 / v.table.len() as f64
                    },
                    packets: bc.packets,
                    bytes: bc.bytes,
                });
            }
            vips.push(VipStatus {
                name: v.cfg.name.clone(),
                address: v.cfg.address.to_string(),
                port: v.cfg.port,
                protocol: v.cfg.protocol.to_string(),
                table_size: v.cfg.table_size,
                usable_backends: v.backends.iter().filter(|b| b.in_table).count() as u32,
                packets: c.packets,
                bytes: c.bytes,
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
            vips,
            reasons,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{Backend, Dataplane as DataplaneCfg, Vip};

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
        vips: HashMap<VipKey, VipInfo>,
        backends: HashMap<u32, BackendInfo>,
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
        fn set_settings(&mut self, _: &Settings) -> Result<(), DataplaneError> {
            Ok(())
        }
        fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
            self.ops.push(Op::Vip {
                base: info.ring_base,
                size: info.ring_size,
            });
            self.vips.insert(*key, *info);
            Ok(())
        }
        fn vip(&self, key: &VipKey) -> Option<VipInfo> {
            self.vips.get(key).copied()
        }
        fn set_vip_addr(&mut self, _: &VipAddrKey, _: u32) -> Result<(), DataplaneError> {
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
            vips: vec![Vip {
                name: "web".into(),
                address: Ipv4Addr::new(10, 0, 0, 100),
                port: 80,
                protocol: Protocol::Tcp,
                table_size: M,
                backends: ADDRS
                    .iter()
                    .zip(weights)
                    .map(|(&address, weight)| Backend { address, weight })
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
            .map(|(&a, m)| (a, m.map(mac)))
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
        back.insert(ADDRS[1], Some(mac(99)));
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
        let vip: SocketAddrV4 = "10.0.0.100:80".parse().unwrap();
        let src: SocketAddrV4 = "10.0.0.1:40000".parse().unwrap();
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
}
