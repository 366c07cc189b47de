//! The reconciler: the only code that writes the data path's maps.
//!
//! It holds the desired state (the config, and what the kernel told us about backend MACs),
//! builds each VIP's Maglev table over the backends that can take traffic (weight > 0 and MAC
//! known), and applies only what changed.
//!
//! Guarantees:
//! - A table change is atomic for the data path: every VIP owns a ring region of two halves; the
//!   new table is written into the half not in use, then the VIP's map entry is replaced (one
//!   hash-map update) to point at it.
//! - A backend's map entry (with its MAC) is written before any table that references it is
//!   published, and cleared only after no published table references it.
//! - Tables are a pure function of (backend addresses, weights, eligibility, table size), so two
//!   nodes with the same config and the same reachable backends publish identical tables.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{
    Reason,
    hash::flow_hash_v4,
    maps::{
        BACKEND_F_READY, BackendInfo, MAX_BACKENDS, MAX_VIPS, Settings, VipAddrKey, VipInfo, VipKey,
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
    #[error(
        "the services' tables need {needed} ring entries (two copies of each table_size), more \
         than the maximum {max}; use smaller table_size values or fewer services per agent"
    )]
    RingTooLarge { needed: u64, max: u64 },
    #[error("the data path's ring is full: vip {vip} needs {needed} entries")]
    RingFull { vip: String, needed: u32 },
    #[error("too many VIPs (at most {max})")]
    TooManyVips { max: u32 },
    #[error("too many backends (at most {max} VIP/backend pairs)")]
    TooManyBackends { max: u32 },
    #[error("no VIP {0}")]
    NoSuchVip(String),
}

/// How long a table half that stopped being live is left alone before it is rewritten.
const HALF_REUSE_GRACE: Duration = Duration::from_millis(10);

/// Largest ring the agent creates: 2^28 entries (1 GiB of tables).
pub const MAX_RING_ENTRIES: u64 = 1 << 28;

/// Ring entries to reserve for a set of VIPs: two halves per table, for atomic swaps.
pub fn ring_entries_needed(config: &Config) -> Result<u32, ReconcileError> {
    let needed: u64 = config
        .vips
        .iter()
        .map(|v| 2 * u64::from(v.table_size))
        .sum();
    if needed > MAX_RING_ENTRIES {
        return Err(ReconcileError::RingTooLarge {
            needed,
            max: MAX_RING_ENTRIES,
        });
    }
    Ok(needed as u32)
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
    mac: Option<[u8; 6]>,
    /// Entries of the live table pointing at this backend.
    slots: u32,
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
    /// When the spare half stopped being live.
    retired_at: Option<Instant>,
}

impl VipSlot {
    fn half_base(&self, half: u32) -> u32 {
        self.base + half * self.cfg.table_size
    }
}

/// Owns the [`Dataplane`] and is its only writer.
pub struct Reconciler {
    dp: Dataplane,
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
    macs: MacTable,
    rebuilds: u64,
    started: Instant,
}

fn vip_key(v: &config::Vip) -> VipKey {
    VipKey {
        addr: v.address.octets(),
        port: v.port.to_be_bytes(),
        proto: v.protocol.number(),
        _pad: 0,
    }
}

impl Reconciler {
    /// Takes ownership of a loaded (not necessarily attached) data path, allocates ids and ring
    /// regions for the config and writes the settings. Tables are published by
    /// [`apply_macs`](Self::apply_macs), once MACs are known.
    pub fn new(
        mut dp: Dataplane,
        config: &Config,
        interface: &str,
        ifindex: u32,
        iface_mac: [u8; 6],
        log_level: LogLevel,
    ) -> Result<Reconciler, ReconcileError> {
        dp.set_settings(&Settings {
            iface_mac,
            log_level: log_level.ebpf_level(),
            ..Default::default()
        })?;
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
            rebuilds: 0,
            started: Instant::now(),
        };
        for v in &config.vips {
            r.add_vip(v.clone())?;
        }
        Ok(r)
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
                slots: 0,
            });
        }
        let key = vip_key(&cfg);
        let slot = VipSlot {
            key,
            index,
            base,
            live: None,
            table: Vec::new(),
            backends,
            retired_at: None,
            cfg,
        };
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
        let count = self.vip_addrs.entry(slot.cfg.address).or_insert(0);
        *count += 1;
        self.dp.set_vip_addr(
            &VipAddrKey {
                addr: slot.cfg.address.octets(),
            },
            *count,
        )?;
        self.vips.push(slot);
        Ok(())
    }

    /// Records that the program is attached, and says which services cannot forward yet (their
    /// warnings were held back while nothing was live).
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.attach_mode = Some(mode);
        for v in self.vips.iter().filter(|v| v.table.is_empty()) {
            warn!(
                vip = %v.cfg.name,
                "vip {} has no usable backend ({} configured): its packets are dropped and \
                 counted as drop_no_backend",
                v.cfg.name,
                v.backends.len()
            );
        }
    }

    pub fn dataplane(&self) -> &Dataplane {
        &self.dp
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    pub fn into_dataplane(self) -> Dataplane {
        self.dp
    }

    /// Backend addresses whose MACs the agent needs.
    pub fn wanted_addrs(&self) -> BTreeSet<Ipv4Addr> {
        self.vips
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.cfg.address))
            .collect()
    }

    /// Takes a new MAC table into account: updates backend entries and republishes the tables
    /// whose set of usable backends changed.
    pub fn apply_macs(&mut self, macs: MacTable) -> Result<(), ReconcileError> {
        crate::net::log_mac_changes(&self.macs, &macs);
        self.macs = macs;
        for i in 0..self.vips.len() {
            self.sync_vip(i)?;
        }
        Ok(())
    }

    /// Brings one VIP's backends and table in line with the desired state.
    fn sync_vip(&mut self, i: usize) -> Result<(), ReconcileError> {
        let macs = &self.macs;
        let vip = &mut self.vips[i];
        // 1. Backends that are (or stay) usable get their entry first, MAC included.
        let mut lost = Vec::new();
        let mut changed = false;
        for b in &mut vip.backends {
            let mac = macs.get(&b.cfg.address).copied().flatten();
            if mac == b.mac {
                continue;
            }
            changed = true;
            match mac {
                Some(m) => {
                    self.dp.set_backend(
                        b.id,
                        &BackendInfo {
                            mac: m,
                            flags: BACKEND_F_READY,
                            addr: b.cfg.address.octets(),
                            vip_index: vip.index,
                        },
                    )?;
                }
                None => lost.push(b.id),
            }
            b.mac = mac;
        }
        // A MAC change alone (same set of usable backends) needs no new table.
        let usable_changed = changed
            && vip.backends.iter().any(|b| {
                let in_table = b.slots > 0;
                let usable = b.mac.is_some() && b.cfg.weight > 0;
                in_table != usable
            });
        if vip.live.is_some() && !usable_changed {
            return Ok(());
        }
        // 2. The table over the usable backends, published only if it changed.
        let inputs: Vec<MaglevBackend> = vip
            .backends
            .iter()
            .map(|b| MaglevBackend {
                address: b.cfg.address.into(),
                weight: if b.mac.is_some() { b.cfg.weight } else { 0 },
            })
            .collect();
        let built = maglev::build_table(&inputs, vip.cfg.table_size).map_err(|source| {
            ReconcileError::Maglev {
                vip: vip.cfg.name.clone(),
                source,
            }
        })?;
        let table: Vec<u32> = if built.first() == Some(&maglev::EMPTY) {
            Vec::new()
        } else {
            built
                .iter()
                .map(|&ix| vip.backends[ix as usize].id)
                .collect()
        };
        if table != vip.table || vip.live.is_none() {
            let half = match vip.live {
                Some(h) => 1 - h,
                None => 0,
            };
            if !table.is_empty() {
                // A program run that read the VIP entry just before the last flip may still be
                // reading the half we are about to overwrite. XDP runs to completion within
                // microseconds with preemption disabled, so a short pause is a wide margin.
                if let Some(t) = vip.retired_at {
                    let since = t.elapsed();
                    if since < HALF_REUSE_GRACE {
                        std::thread::sleep(HALF_REUSE_GRACE - since);
                    }
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
            let usable = vip
                .backends
                .iter()
                .filter(|b| b.mac.is_some() && b.cfg.weight > 0)
                .count();
            if table.is_empty() && self.attach_mode.is_some() {
                warn!(
                    vip = %vip.cfg.name,
                    "vip {} has no usable backend ({} configured): its packets are dropped and counted as drop_no_backend",
                    vip.cfg.name,
                    vip.backends.len()
                );
            } else if !table.is_empty() {
                info!(
                    vip = %vip.cfg.name,
                    usable,
                    configured = vip.backends.len(),
                    "table published"
                );
            }
            if vip.live.is_some() {
                vip.retired_at = Some(Instant::now());
            }
            vip.live = Some(half);
            for b in &mut vip.backends {
                b.slots = table.iter().filter(|&&id| id == b.id).count() as u32;
            }
            vip.table = table;
            self.rebuilds += 1;
        }
        // 3. Backends no published table references any more lose their entry.
        for id in lost {
            self.dp.set_backend(id, &BackendInfo::default())?;
        }
        Ok(())
    }

    pub fn set_log_level(&mut self, level: LogLevel) -> Result<(), ReconcileError> {
        self.dp.set_settings(&Settings {
            iface_mac: self.iface_mac,
            log_level: level.ebpf_level(),
            ..Default::default()
        })?;
        self.log_level = level;
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
        let hash = flow_hash_v4(
            src.ip().octets(),
            vip.ip().octets(),
            src.port().to_be_bytes(),
            vip.port().to_be_bytes(),
            proto.number(),
        );
        let info = self.dp.vip(&v.key);
        let (slot, backend_id) = match info {
            Some(info) if info.ring_size > 0 => {
                let slot = hash % info.ring_size;
                (Some(slot), self.dp.ring_entry(info.ring_base + slot))
            }
            _ => (None, None),
        };
        let backend = backend_id
            .and_then(|id| v.backends.iter().find(|b| b.id == id))
            .map(|b| b.cfg.address);
        Ok(WhichBackend {
            vip: v.cfg.name.clone(),
            service: format!("{vip}/{proto}"),
            source: src.to_string(),
            hash,
            slot,
            backend_id: backend_id.filter(|&id| id != 0),
            backend: backend.map(|a| a.to_string()),
        })
    }

    pub fn status(&self) -> Result<Status, ReconcileError> {
        let mut vips = Vec::new();
        let mut forwarded = lb_common::maps::Counter::default();
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
                usable_backends: v.backends.iter().filter(|b| b.slots > 0).count() as u32,
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
    use super::*;

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
}
