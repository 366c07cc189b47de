//! The XDP program and its maps, as the agent drives them.
//!
//! [`Dataplane::load`] loads the embedded object and has the kernel verify the program; nothing
//! is attached yet, so tests can run it with `BPF_PROG_TEST_RUN` ([`Dataplane::program`]).
//! [`Dataplane::attach`] attaches it to an interface through a BPF link.
//!
//! Writers: only the reconciler calls the `set_*`/`write_ring` methods (DESIGN.md, "one owner
//! writes the maps"); anyone may read counters.
//!
//! Leaving and taking over: with `--keep-forwarding` the agent [`persist`](Dataplane::persist)s
//! the link and maps under [`pin_dir`] and exits while the program keeps
//! forwarding. The next agent finds that link and swaps its own freshly loaded program in with one
//! `bpf_link_update` ([`Dataplane::attach`]); because Maglev tables are a pure function of the
//! config, flows keep their backends across the swap.

use std::{
    fs,
    io::{self, BufRead as _},
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    Reason,
    flows::FlowStat,
    maps::{
        self, BackendInfo, Counter, Flow6Key, FlowEntry, FlowKey, RING_CHUNK_ENTRIES, RingChunk,
        Settings, VIP_TABLE_PROBES, VIP_TABLE_SLOTS, Vip6Key, VipAddr6Key, VipAddrKey, VipFilter,
        VipInfo, VipKey, VipSlot, vip_filter_fold6, vip_filter_set, vip_home, vip_key_word,
        vip_table_ctl, vip_table_find, vip_table_word,
    },
};
use thiserror::Error;
use tracing::{info, warn};

use crate::config::XdpModeSetting;

/// The XDP object built by `build.rs` from the `lb-ebpf` crate.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// Where a persisted data path lives.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
pub const PIN_ROOT: &str = "/sys/fs/bpf/xdplb";

#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error(
        "the connection table pinned at {path} does not fit this agent: it is {found}, this \
         agent needs {wanted}. Either start the xdplb version and [flows] entries that made it, \
         or remove it (`rm {path}`: established flows then follow the VIPs' tables, as after a \
         fresh start)"
    )]
    FlowsLayout {
        path: PathBuf,
        found: String,
        wanted: String,
    },
    #[error("the kernel rejected program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is missing from the object")]
    MissingMap { map: &'static str },
    #[error("mmap of map {map} failed: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot lay out {vips} VIPs in the VIP table (no seed places them all within reach)")]
    VipLayout { vips: usize },
    #[error("ring write of {len} entries at {base} is outside the ring ({capacity} entries)")]
    RingBounds {
        base: u32,
        len: usize,
        capacity: u32,
    },
    #[error(
        "attaching XDP to {interface} in {mode} mode failed: {source}{hint}",
        hint = attach_hint(source)
    )]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "taking over the data path pinned at {path} failed ({source}); the previous program is \
         still attached and forwarding"
    )]
    Adopt {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("bpffs: {0}")]
    Bpffs(io::Error),
}

fn attach_hint(e: &ProgramError) -> &'static str {
    let text = e.to_string();
    if text.contains("Device or resource busy") || text.contains("File exists") {
        " (another XDP program is attached to this interface; detach it first, e.g. \
         `ip link set dev IFACE xdp off`)"
    } else {
        ""
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// Sizes fixed at load time.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Total ring entries (all tables, including the spare copies used for atomic swaps).
    pub ring_entries: u32,
    /// Entries of the connection table (all CPUs together; each CPU's LRU list holds its share).
    pub flow_entries: u32,
    /// Entries of the IPv6 connection table, likewise.
    pub flow6_entries: u32,
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    Driver,
    Generic,
    /// Attached, but the kernel did not say how (only after taking over a link).
    Unknown,
}

impl AttachMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AttachMode::Driver => "driver",
            AttachMode::Generic => "generic",
            AttachMode::Unknown => "unknown",
        }
    }

    /// The mode as the kernel reports it for an interface (see `net::Interface::xdp_mode`).
    pub fn from_kernel(name: Option<&str>) -> AttachMode {
        match name {
            Some("driver") => AttachMode::Driver,
            Some("generic") => AttachMode::Generic,
            _ => AttachMode::Unknown,
        }
    }
}

/// What [`Dataplane::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link in this mode.
    New(AttachMode),
    /// Swapped this program into the link a previous agent left pinned; the link keeps the mode
    /// it was created with.
    TookOver,
}

/// A shared mapping of a whole `BPF_F_MMAPABLE` array; unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len_bytes: usize,
    // Keeps the map (and thus the mapping's backing) alive.
    _map: MapData,
}

// SAFETY: the mapping is owned by this struct and only accessed through &self / &mut self.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(map: MapData, len_bytes: usize, name: &'static str) -> Result<Mapping, DataplaneError> {
        // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE; length within the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Mmap {
                map: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Mapping {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            len_bytes,
            _map: map,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

/// The `RING` array, mapped.
struct Ring {
    map: Mapping,
    entries: u32,
}

impl Ring {
    fn new(map: MapData, chunks: u32) -> Result<Ring, DataplaneError> {
        Ok(Ring {
            map: Mapping::new(map, chunks as usize * size_of::<RingChunk>(), maps::RING)?,
            entries: chunks * RING_CHUNK_ENTRIES,
        })
    }

    fn ptr(&self) -> *mut u32 {
        self.map.ptr.as_ptr().cast()
    }

    fn write(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError> {
        let end = base as u64 + entries.len() as u64;
        if end > self.entries as u64 {
            return Err(DataplaneError::RingBounds {
                base,
                len: entries.len(),
                capacity: self.entries,
            });
        }
        // SAFETY: bounds checked above; the region is not referenced by any VIP while it is
        // written (the reconciler only writes free or spare regions).
        unsafe {
            std::ptr::copy_nonoverlapping(
                entries.as_ptr(),
                self.ptr().add(base as usize),
                entries.len(),
            );
        }
        // The VIP update that publishes this region comes after these stores; the fence
        // guarantees that ordering on any architecture.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn get(&self, index: u32) -> Option<u32> {
        if index >= self.entries {
            return None;
        }
        // SAFETY: in bounds; a u32 read of shared memory the kernel only reads.
        Some(unsafe { self.ptr().add(index as usize).read_volatile() })
    }
}

/// The `VIP_TABLE` and `VIP_TABLE_CTL` arrays, mapped, and the agent's copy of what is in them
/// (see [`lb_common::maps::VipSlot`] for the rules of writing them).
struct VipTable {
    slots: Mapping,
    ctl: Mapping,
    /// Every VIP, as last set: what a new layout is made of.
    vips: std::collections::BTreeMap<VipKey, VipInfo>,
    /// Slot (within the live half) of every VIP in it.
    placed: std::collections::HashMap<VipKey, u32>,
    half: u32,
    seed: u32,
    /// When the last switch of halves happened: the half that stopped being live is not
    /// rewritten before [`VIP_HALF_GRACE`] has passed.
    switched: Option<std::time::Instant>,
}

/// How long the VIP table half that stopped being live is left alone before it is rewritten:
/// XDP programs run to completion within microseconds; this is a wide margin.
const VIP_HALF_GRACE: std::time::Duration = std::time::Duration::from_millis(10);

impl VipTable {
    fn new(slots: MapData, ctl: MapData) -> Result<VipTable, DataplaneError> {
        let t = VipTable {
            slots: Mapping::new(
                slots,
                2 * VIP_TABLE_SLOTS as usize * size_of::<VipSlot>(),
                maps::VIP_TABLE,
            )?,
            ctl: Mapping::new(ctl, size_of::<u64>(), maps::VIP_TABLE_CTL)?,
            vips: Default::default(),
            placed: Default::default(),
            half: 0,
            seed: 0,
            switched: None,
        };
        t.store_ctl();
        Ok(t)
    }

    fn slot(&self, half: u32, index: u32) -> *mut VipSlot {
        let i = (half * VIP_TABLE_SLOTS + index) as usize;
        debug_assert!(i < 2 * VIP_TABLE_SLOTS as usize);
        // SAFETY: in bounds of the mapping (checked by the callers' arithmetic).
        unsafe { self.slots.ptr.as_ptr().cast::<VipSlot>().add(i) }
    }

    fn store_ctl(&self) {
        // SAFETY: the mapping holds one aligned u64 (page-aligned).
        let ctl = unsafe { AtomicU64::from_ptr(self.ctl.ptr.as_ptr().cast()) };
        ctl.store(vip_table_ctl(self.half, self.seed), Ordering::Release);
    }

    /// Fills an empty slot: fields first, the key last, each with an atomic store.
    fn fill(&self, half: u32, index: u32, key: &VipKey, info: &VipInfo) {
        let s = self.slot(half, index);
        // SAFETY: `s` is an aligned slot of the mapping (24-byte elements, 8-aligned fields).
        unsafe {
            AtomicU32::from_ptr(&raw mut (*s).vip_index).store(info.vip_index, Ordering::Relaxed);
            AtomicU32::from_ptr(&raw mut (*s).flags).store(info.flags, Ordering::Relaxed);
            AtomicU64::from_ptr(&raw mut (*s).table).store(
                vip_table_word(info.ring_base, info.ring_size),
                Ordering::Relaxed,
            );
            AtomicU64::from_ptr(s.cast::<u64>()).store(vip_key_word(key), Ordering::Release);
        }
    }

    fn set(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        if let Some(&index) = self.placed.get(key) {
            let s = self.slot(self.half, index);
            // SAFETY: as in fill(). vip_index and flags of a VIP do not change in practice;
            // the table word, which does, is one store.
            unsafe {
                AtomicU32::from_ptr(&raw mut (*s).vip_index)
                    .store(info.vip_index, Ordering::Relaxed);
                AtomicU32::from_ptr(&raw mut (*s).flags).store(info.flags, Ordering::Relaxed);
                AtomicU64::from_ptr(&raw mut (*s).table).store(
                    vip_table_word(info.ring_base, info.ring_size),
                    Ordering::Release,
                );
            }
            self.vips.insert(*key, *info);
            return Ok(());
        }
        // A new VIP: into a free slot of the live half if one is within reach of its home
        // (readers probing past it see an empty slot until the key lands last), else a new
        // layout of every VIP in the other half.
        let word = vip_key_word(key);
        let home = vip_home(word, self.seed);
        let free = (0..VIP_TABLE_PROBES)
            .map(|i| (home + i) & (VIP_TABLE_SLOTS - 1))
            // SAFETY: reading a slot key the agent alone writes.
            .find(|&i| unsafe { (*self.slot(self.half, i).cast::<u64>()) == 0 });
        match free {
            Some(index) => {
                self.fill(self.half, index, key, info);
                self.placed.insert(*key, index);
                self.vips.insert(*key, *info);
                Ok(())
            }
            None => {
                let mut vips = self.vips.clone();
                vips.insert(*key, *info);
                self.relayout(vips)
            }
        }
    }

    fn remove(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        if self.vips.contains_key(key) {
            let mut vips = self.vips.clone();
            vips.remove(key);
            self.relayout(vips)?;
        }
        Ok(())
    }

    fn get(&self, key: &VipKey) -> Option<VipInfo> {
        // SAFETY: reads of the mapping; see lb_common::maps::VipSlot.
        let ctl =
            unsafe { AtomicU64::from_ptr(self.ctl.ptr.as_ptr().cast()).load(Ordering::Acquire) };
        vip_table_find(ctl, key, |i| {
            let s = self.slot(i / VIP_TABLE_SLOTS, i % VIP_TABLE_SLOTS);
            // SAFETY: as above.
            unsafe {
                Some((
                    AtomicU64::from_ptr(s.cast::<u64>()).load(Ordering::Acquire),
                    AtomicU64::from_ptr(&raw mut (*s).table).load(Ordering::Acquire),
                    AtomicU32::from_ptr(&raw mut (*s).vip_index).load(Ordering::Acquire),
                    AtomicU32::from_ptr(&raw mut (*s).flags).load(Ordering::Acquire),
                ))
            }
        })
    }

    /// Lays `vips` out in the half that is not live, then makes it live and records `vips` as
    /// the VIPs; on failure nothing changes.
    fn relayout(
        &mut self,
        vips: std::collections::BTreeMap<VipKey, VipInfo>,
    ) -> Result<(), DataplaneError> {
        let keys: Vec<VipKey> = vips.keys().copied().collect();
        let (seed, placed) = (0..64u32)
            .find_map(|seed| place_vips(&keys, seed).map(|p| (seed, p)))
            .ok_or(DataplaneError::VipLayout { vips: keys.len() })?;
        if let Some(rest) = self
            .switched
            .and_then(|t| VIP_HALF_GRACE.checked_sub(t.elapsed()))
        {
            std::thread::sleep(rest);
        }
        let half = 1 - self.half;
        // SAFETY: the half is not live (and has not been for VIP_HALF_GRACE): no reader.
        unsafe {
            std::ptr::write_bytes(self.slot(half, 0), 0, VIP_TABLE_SLOTS as usize);
        }
        for (key, index) in &placed {
            self.fill(half, *index, key, &vips[key]);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        self.half = half;
        self.seed = seed;
        self.store_ctl();
        self.switched = Some(std::time::Instant::now());
        self.placed = placed.into_iter().collect();
        self.vips = vips;
        Ok(())
    }
}

/// Places `keys` in one half of the VIP table with `seed`, each within [`VIP_TABLE_PROBES`] of
/// its home slot (linear probing in key order); `None` if one does not fit.
fn place_vips(keys: &[VipKey], seed: u32) -> Option<Vec<(VipKey, u32)>> {
    let mut used = vec![false; VIP_TABLE_SLOTS as usize];
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        let home = vip_home(vip_key_word(key), seed);
        let index = (0..VIP_TABLE_PROBES)
            .map(|i| (home + i) & (VIP_TABLE_SLOTS - 1))
            .find(|&i| !used[i as usize])?;
        used[index as usize] = true;
        out.push((*key, index));
    }
    Some(out)
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    vips: VipTable,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    vip_filter: Array<MapData, VipFilter>,
    /// The addresses in `vip_addrs`, to rebuild the filter when one goes.
    vip_addr_set: std::collections::BTreeSet<[u8; 4]>,
    vip6: HashMap<MapData, Vip6Key, VipInfo>,
    vip_addrs6: HashMap<MapData, VipAddr6Key, u32>,
    /// The addresses in `vip_addrs6`; they share the filter (folded).
    vip_addr6_set: std::collections::BTreeSet<[u8; 16]>,
    ring: Ring,
    backends: Array<MapData, BackendInfo>,
    settings: Array<MapData, Settings>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    reason_stats: PerCpuArray<MapData, Counter>,
    flows: HashMap<MapData, FlowKey, FlowEntry>,
    flows6: HashMap<MapData, Flow6Key, FlowEntry>,
    flow_stats: PerCpuArray<MapData, u64>,
    flow_entries: u32,
    flow6_entries: u32,
    link: Option<(String, XdpLinkId)>,
    /// The link, pinned under [`pin_dir`] from the moment it is attached, so that it survives
    /// the agent: a crashed agent's data path keeps forwarding (with its last tables) instead
    /// of handing the VIPs' traffic to the kernel, which would reset every established
    /// connection; the next agent takes it over. `detach` unpins it.
    pinned: Option<(String, PathBuf, PinnedLink)>,
}

impl Dataplane {
    /// Loads the embedded object and has the kernel verify the load-balancing program and the
    /// pass program.
    pub fn load(opts: LoadOptions) -> Result<Dataplane, DataplaneError> {
        Self::load_with(opts, None)
    }

    /// [`load`](Self::load), with the connection tables pinned in `dir` (as `flows` and
    /// `flows6`): a table pinned there by an earlier agent (one that crashed, or left with
    /// `--keep-forwarding`) is adopted if its layout is exactly this agent's, so established
    /// flows keep their backends across the restart; otherwise a new one is created and pinned
    /// there. Both are checked before either is used. Returns the tables it adopted.
    pub fn load_adopting(
        opts: LoadOptions,
        dir: &Path,
    ) -> Result<(Dataplane, Adopted), DataplaneError> {
        let pins = FlowPins::in_dir(dir);
        let adopted = Adopted {
            flows: pins.flows.exists(),
            flows6: pins.flows6.exists(),
        };
        if adopted.flows {
            check_flows_layout(
                &pins.flows,
                core::mem::size_of::<FlowKey>(),
                opts.flow_entries,
            )?;
        }
        if adopted.flows6 {
            check_flows_layout(
                &pins.flows6,
                core::mem::size_of::<Flow6Key>(),
                opts.flow6_entries,
            )?;
        }
        ensure_bpffs()?;
        fs::create_dir_all(dir).map_err(|e| DataplaneError::Pin {
            path: dir.to_path_buf(),
            source: e.into(),
        })?;
        Ok((Self::load_with(opts, Some(&pins))?, adopted))
    }

    fn load_with(opts: LoadOptions, pins: Option<&FlowPins>) -> Result<Dataplane, DataplaneError> {
        raise_memlock_limit();
        let chunks = opts.ring_entries.div_ceil(RING_CHUNK_ENTRIES).max(1);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(maps::RING, chunks)
            .map_max_entries(maps::FLOWS, opts.flow_entries)
            .map_max_entries(maps::FLOWS6, opts.flow6_entries);
        if let Some(pins) = pins {
            loader
                .map_pin_path(maps::FLOWS, &pins.flows)
                .map_pin_path(maps::FLOWS6, &pins.flows6);
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in [maps::PROG_XDPLB, maps::PROG_PASS] {
            let program_err = |source| DataplaneError::Program {
                program: name,
                source,
            };
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(program_err(ProgramError::NotLoaded))?
                .try_into()
                .map_err(program_err)?;
            prog.load().map_err(program_err)?;
        }
        let mut take = |name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingMap { map: name })
        };
        let mut array = |name: &'static str| match take(name)? {
            aya::maps::Map::Array(data) => Ok(data),
            _ => Err(DataplaneError::MissingMap { map: name }),
        };
        let vips = VipTable::new(array(maps::VIP_TABLE)?, array(maps::VIP_TABLE_CTL)?)?;
        let vip_addrs =
            HashMap::try_from(take(maps::VIP_ADDRS)?).map_err(map_err(maps::VIP_ADDRS))?;
        let vip_filter =
            Array::try_from(take(maps::VIP_FILTER)?).map_err(map_err(maps::VIP_FILTER))?;
        let ring_map = match take(maps::RING)? {
            aya::maps::Map::Array(data) => data,
            _ => return Err(DataplaneError::MissingMap { map: maps::RING }),
        };
        let backends = Array::try_from(take(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?;
        let settings = Array::try_from(take(maps::SETTINGS)?).map_err(map_err(maps::SETTINGS))?;
        let vip_stats =
            PerCpuArray::try_from(take(maps::VIP_STATS)?).map_err(map_err(maps::VIP_STATS))?;
        let backend_stats = PerCpuArray::try_from(take(maps::BACKEND_STATS)?)
            .map_err(map_err(maps::BACKEND_STATS))?;
        let reason_stats = PerCpuArray::try_from(take(maps::REASON_STATS)?)
            .map_err(map_err(maps::REASON_STATS))?;
        let flows = HashMap::try_from(take(maps::FLOWS)?).map_err(map_err(maps::FLOWS))?;
        let flows6 = HashMap::try_from(take(maps::FLOWS6)?).map_err(map_err(maps::FLOWS6))?;
        let vip6 = HashMap::try_from(take(maps::VIP6)?).map_err(map_err(maps::VIP6))?;
        let vip_addrs6 =
            HashMap::try_from(take(maps::VIP_ADDRS6)?).map_err(map_err(maps::VIP_ADDRS6))?;
        let flow_stats =
            PerCpuArray::try_from(take(maps::FLOW_STATS)?).map_err(map_err(maps::FLOW_STATS))?;
        let ring = Ring::new(ring_map, chunks)?;
        Ok(Dataplane {
            flows,
            flows6,
            flow_stats,
            flow_entries: opts.flow_entries,
            flow6_entries: opts.flow6_entries,
            vip6,
            vip_addrs6,
            vip_addr6_set: Default::default(),
            ebpf,
            vips,
            vip_addrs,
            vip_filter,
            vip_addr_set: Default::default(),
            ring,
            backends,
            settings,
            vip_stats,
            backend_stats,
            reason_stats,
            link: None,
            pinned: None,
        })
    }

    /// The load-balancing program (loaded and verified), e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(maps::PROG_XDPLB)
            .and_then(|p| p.try_into().ok())
            .expect("program loaded in Dataplane::load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(maps::PROG_XDPLB)
            .and_then(|p| p.try_into().ok())
            .expect("program loaded in Dataplane::load")
    }

    /// The loaded object, for programs and maps the agent itself does not use (the benchmark
    /// programs); the agent's own maps have been taken out of it.
    pub fn object_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The pass-everything program from the same object (loaded and verified).
    pub fn pass_program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(maps::PROG_PASS)
            .and_then(|p| p.try_into().ok())
            .expect("program loaded in Dataplane::load")
    }

    /// Takes the aya-log ring buffer out of the object so the caller can drain it.
    pub fn take_logger<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
    }

    /// Attaches the program to `interface`: if a previous agent left a pinned link for this
    /// interface, swaps the program in atomically; otherwise creates a new link in `mode`.
    pub fn attach(
        &mut self,
        interface: &str,
        ifindex: u32,
        mode: XdpModeSetting,
    ) -> Result<Attached, DataplaneError> {
        let pin_dir = pin_dir(interface);
        let link_path = pin_dir.join("link");
        if link_path.exists() {
            let adopt_err = |source: io::Error| DataplaneError::Adopt {
                path: link_path.clone(),
                source,
            };
            // Swap through the pinned link first: if the kernel refuses (say, the new program's
            // attach flags differ), the pin stays and the old program keeps forwarding.
            let prog_fd = self
                .program()
                .fd()
                .map_err(|source| DataplaneError::Program {
                    program: maps::PROG_XDPLB,
                    source,
                })?;
            let link_fd = bpf_obj_get(&link_path).map_err(adopt_err)?;
            bpf_link_update(link_fd.as_fd(), prog_fd.as_fd()).map_err(adopt_err)?;
            // The link runs this program now; take it over from the pin. Re-pointing it at the
            // same program is how aya learns about the link, and changes nothing in the kernel.
            let fd_link = PinnedLink::from_pin(&link_path)
                .map_err(|e| adopt_err(io::Error::other(e)))?
                .unpin()
                .map_err(adopt_err)?;
            let link = XdpLink::try_from(fd_link).map_err(|e| adopt_err(io::Error::other(e)))?;
            let id = self.program_mut().attach_to_link(link).map_err(|source| {
                DataplaneError::Attach {
                    interface: interface.to_string(),
                    mode: "existing link",
                    source,
                }
            })?;
            drop(link_fd);
            self.link = Some((interface.to_string(), id));
            // Only the link's pin: the connection table's, next to it, is ours now.
            let _ = fs::remove_file(&link_path);
            info!(
                interface,
                "took over the data path a previous agent left running (atomic program swap)"
            );
            self.pin_link()?;
            return Ok(Attached::TookOver);
        }
        let attempt = |dp: &mut Dataplane, m: XdpMode, name: &'static str| {
            dp.program_mut()
                .attach_to_if_index(ifindex, m)
                .map_err(|source| DataplaneError::Attach {
                    interface: interface.to_string(),
                    mode: name,
                    source,
                })
        };
        let (id, attached) = match mode {
            XdpModeSetting::Driver => (
                attempt(self, XdpMode::Driver, "driver")?,
                AttachMode::Driver,
            ),
            XdpModeSetting::Generic => {
                (attempt(self, XdpMode::Skb, "generic")?, AttachMode::Generic)
            }
            XdpModeSetting::Auto => match attempt(self, XdpMode::Driver, "driver") {
                Ok(id) => (id, AttachMode::Driver),
                Err(e) => {
                    warn!(
                        interface,
                        "{e}; falling back to generic mode, which is slower (the driver may not \
                         support XDP)"
                    );
                    (attempt(self, XdpMode::Skb, "generic")?, AttachMode::Generic)
                }
            },
        };
        self.link = Some((interface.to_string(), id));
        if let Err(e) = self.pin_link() {
            // Unpinned, it would be detached when we exit; better not to forward at all than
            // to leave a data path that dies with the agent unnoticed.
            let _ = self.detach();
            return Err(e);
        }
        Ok(Attached::New(attached))
    }

    /// Moves the attached link from aya's keeping to a pin (see [`Dataplane::pinned`]).
    fn pin_link(&mut self) -> Result<(), DataplaneError> {
        let Some((interface, id)) = self.link.take() else {
            return Ok(());
        };
        ensure_bpffs()?;
        let dir = pin_dir(&interface);
        let link_path = dir.join("link");
        let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Pin {
            path: link_path.clone(),
            source: e,
        };
        // Whatever an earlier failed attempt left there would make the pin fail.
        if link_path.exists() {
            let _ = fs::remove_file(&link_path);
        }
        fs::create_dir_all(&dir).map_err(|e| pin_err(e.into()))?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|source| DataplaneError::Program {
                program: maps::PROG_XDPLB,
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|e| pin_err(e.into()))?;
        let pinned = fd_link.pin(&link_path).map_err(|e| pin_err(e.into()))?;
        self.pinned = Some((interface, dir, pinned));
        Ok(())
    }

    /// Detaches the program (if attached). Dropping the `Dataplane` does the same.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
        if let Some((interface, dir, pinned)) = self.pinned.take() {
            // Unpinned and closed, the link has no holder left: the kernel detaches it.
            let unpinned = pinned.unpin();
            remove_pins(&dir);
            match unpinned {
                Ok(fd_link) => drop(fd_link),
                Err(e) => {
                    return Err(DataplaneError::Pin {
                        path: dir,
                        source: e.into(),
                    });
                }
            }
            info!(interface, "XDP program detached");
        }
        if let Some((interface, id)) = self.link.take() {
            self.program_mut()
                .detach(id)
                .map_err(|source| DataplaneError::Program {
                    program: maps::PROG_XDPLB,
                    source,
                })?;
            info!(interface, "XDP program detached");
        }
        Ok(())
    }

    /// Leaves the program attached after this process exits: pins the link under [`pin_dir`] for
    /// the next agent to take over. The link keeps the program, and the program its maps.
    pub fn persist(mut self) -> Result<PathBuf, DataplaneError> {
        if self.pinned.is_none() {
            if self.link.is_none() {
                return Err(DataplaneError::Pin {
                    path: PathBuf::from(PIN_ROOT),
                    source: "the program is not attached".into(),
                });
            }
            self.pin_link()?;
        }
        let Some((_, dir, pinned)) = self.pinned.take() else {
            unreachable!("pinned just above");
        };
        // Closing our fd leaves the pin as the link's only holder.
        drop(pinned);
        Ok(dir)
    }

    pub fn set_settings(&mut self, settings: &Settings) -> Result<(), DataplaneError> {
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(maps::SETTINGS))
    }

    pub fn settings(&self) -> Result<Settings, DataplaneError> {
        self.settings.get(&0, 0).map_err(map_err(maps::SETTINGS))
    }

    /// Publishes or changes a VIP. A change of an existing VIP's table is one atomic store; a
    /// new VIP goes into a free slot or, if none is within reach, into a new layout of the
    /// other half of the table (which may wait out the previous switch's grace period).
    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vips.set(key, info)
    }

    /// Removes a VIP: a new layout without it, in the other half of the table.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.vips.remove(key)
    }

    /// A VIP as the data path sees it, read from the kernel's table.
    pub fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key)
    }

    /// [`set_vip`](Self::set_vip) or [`set_vip6`](Self::set_vip6), as the key's family says.
    pub fn set_service(&mut self, key: &ServiceKey, info: &VipInfo) -> Result<(), DataplaneError> {
        match key {
            ServiceKey::V4(k) => self.set_vip(k, info),
            ServiceKey::V6(k) => self.set_vip6(k, info),
        }
    }

    /// [`remove_vip`](Self::remove_vip) or [`remove_vip6`](Self::remove_vip6).
    pub fn remove_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        match key {
            ServiceKey::V4(k) => self.remove_vip(k),
            ServiceKey::V6(k) => self.remove_vip6(k),
        }
    }

    /// [`vip`](Self::vip) or [`vip6`](Self::vip6).
    pub fn service(&self, key: &ServiceKey) -> Option<VipInfo> {
        match key {
            ServiceKey::V4(k) => self.vip(k),
            ServiceKey::V6(k) => self.vip6(k),
        }
    }

    /// [`set_vip_addr`](Self::set_vip_addr) or [`set_vip_addr6`](Self::set_vip_addr6) for an
    /// address of either family.
    pub fn set_service_addr(&mut self, addr: IpAddr, count: u32) -> Result<(), DataplaneError> {
        match addr {
            IpAddr::V4(a) => self.set_vip_addr(&VipAddrKey { addr: a.octets() }, count),
            IpAddr::V6(a) => self.set_vip_addr6(&VipAddr6Key { addr: a.octets() }, count),
        }
    }

    /// Records how many VIPs `key` has (0: none), and keeps the VIP address filter in step. Call
    /// it before publishing the first VIP of an address and after removing the last one: the
    /// data path passes frames for addresses outside the filter without looking at [`VIP_TABLE`].
    ///
    /// [`VIP_TABLE`]: lb_common::maps::VIP_TABLE
    pub fn set_vip_addr(&mut self, key: &VipAddrKey, count: u32) -> Result<(), DataplaneError> {
        let changed = if count == 0 {
            self.vip_addr_set.remove(&key.addr)
        } else {
            self.vip_addr_set.insert(key.addr)
        };
        if changed {
            self.write_filter()?;
        }
        if count == 0 {
            match self.vip_addrs.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(maps::VIP_ADDRS)(e)),
            }
        } else {
            self.vip_addrs
                .insert(key, count, 0)
                .map_err(map_err(maps::VIP_ADDRS))
        }
    }

    /// [`set_vip_addr`](Self::set_vip_addr) for an IPv6 address. IPv6 addresses share the
    /// filter, folded by [`vip_filter_fold6`].
    pub fn set_vip_addr6(&mut self, key: &VipAddr6Key, count: u32) -> Result<(), DataplaneError> {
        let changed = if count == 0 {
            self.vip_addr6_set.remove(&key.addr)
        } else {
            self.vip_addr6_set.insert(key.addr)
        };
        if changed {
            self.write_filter()?;
        }
        if count == 0 {
            match self.vip_addrs6.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(maps::VIP_ADDRS6)(e)),
            }
        } else {
            self.vip_addrs6
                .insert(key, count, 0)
                .map_err(map_err(maps::VIP_ADDRS6))
        }
    }

    /// Writes the VIP address filter whole from both address sets.
    fn write_filter(&mut self) -> Result<(), DataplaneError> {
        let mut filter: VipFilter = [0; (maps::VIP_FILTER_BITS / 64) as usize];
        for a in &self.vip_addr_set {
            vip_filter_set(&mut filter, *a);
        }
        for a in &self.vip_addr6_set {
            vip_filter_set(&mut filter, vip_filter_fold6(a));
        }
        self.vip_filter
            .set(0, filter, 0)
            .map_err(map_err(maps::VIP_FILTER))
    }

    /// Publishes or changes an IPv6 VIP: one map update, which the kernel applies as a whole
    /// (a reader sees the old value or the new one).
    pub fn set_vip6(&mut self, key: &Vip6Key, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vip6.insert(key, info, 0).map_err(map_err(maps::VIP6))
    }

    pub fn remove_vip6(&mut self, key: &Vip6Key) -> Result<(), DataplaneError> {
        match self.vip6.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::VIP6)(e)),
        }
    }

    /// An IPv6 VIP as the data path sees it.
    pub fn vip6(&self, key: &Vip6Key) -> Option<VipInfo> {
        self.vip6.get(key, 0).ok()
    }

    /// Number of ring entries available.
    pub fn ring_capacity(&self) -> u32 {
        self.ring.entries
    }

    /// Writes `entries` at `base` in the ring. The region must not be referenced by any VIP.
    pub fn write_ring(&mut self, base: u32, entries: &[u32]) -> Result<(), DataplaneError> {
        self.ring.write(base, entries)
    }

    pub fn ring_entry(&self, index: u32) -> Option<u32> {
        self.ring.get(index)
    }

    pub fn set_backend(&mut self, id: u32, info: &BackendInfo) -> Result<(), DataplaneError> {
        self.backends
            .set(id, info, 0)
            .map_err(map_err(maps::BACKENDS))
    }

    pub fn backend(&self, id: u32) -> Option<BackendInfo> {
        self.backends.get(&id, 0).ok()
    }

    /// Clears a stats slot (when an id is given to a new VIP or backend).
    pub fn reset_vip_stats(&mut self, index: u32) -> Result<(), DataplaneError> {
        reset(&mut self.vip_stats, index).map_err(map_err(maps::VIP_STATS))
    }

    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        reset(&mut self.backend_stats, id).map_err(map_err(maps::BACKEND_STATS))
    }

    pub fn vip_counter(&self, index: u32) -> Result<Counter, DataplaneError> {
        sum(&self.vip_stats, index).map_err(map_err(maps::VIP_STATS))
    }

    pub fn backend_counter(&self, id: u32) -> Result<Counter, DataplaneError> {
        sum(&self.backend_stats, id).map_err(map_err(maps::BACKEND_STATS))
    }

    /// Per-reason counters, indexed by `Reason as usize`. `Forwarded` is the sum over VIPs and is
    /// filled by the caller.
    pub fn reason_counters(&self) -> Result<[Counter; Reason::COUNT as usize], DataplaneError> {
        let mut out = [Counter::default(); Reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = sum(&self.reason_stats, i as u32).map_err(map_err(maps::REASON_STATS))?;
        }
        Ok(out)
    }

    /// Connection-table events, indexed by `FlowStat as usize`, summed over CPUs.
    pub fn flow_counters(&self) -> Result<[u64; FlowStat::COUNT as usize], DataplaneError> {
        let mut out = [0; FlowStat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .flow_stats
                .get(&(i as u32), 0)
                .map_err(map_err(maps::FLOW_STATS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Capacity of the connection table.
    pub fn flow_capacity(&self) -> u32 {
        self.flow_entries
    }

    /// Capacity of the IPv6 connection table.
    pub fn flow6_capacity(&self) -> u32 {
        self.flow6_entries
    }

    /// Up to `limit` entries of the connection table that `keep` accepts, reading at most
    /// `max_read` entries, and how many entries were read. The kernel's iteration order is its
    /// hash order: the first entries are a fair sample. Entries evicted while reading are
    /// skipped.
    pub fn flows(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&FlowKey, &FlowEntry) -> bool,
    ) -> Result<(Vec<(FlowKey, FlowEntry)>, usize), DataplaneError> {
        sample(&self.flows, maps::FLOWS, limit, max_read, keep)
    }

    /// [`flows`](Self::flows) of the IPv6 connection table.
    pub fn flows6(
        &self,
        limit: usize,
        max_read: usize,
        keep: impl FnMut(&Flow6Key, &FlowEntry) -> bool,
    ) -> Result<(Vec<(Flow6Key, FlowEntry)>, usize), DataplaneError> {
        sample(&self.flows6, maps::FLOWS6, limit, max_read, keep)
    }

    /// Writes a connection-table entry (tests: a flow as an earlier packet would have left it).
    pub fn insert_flow(&mut self, key: &FlowKey, entry: &FlowEntry) -> Result<(), DataplaneError> {
        self.flows
            .insert(key, entry, 0)
            .map_err(map_err(maps::FLOWS))
    }

    /// [`insert_flow`](Self::insert_flow) into the IPv6 table.
    pub fn insert_flow6(
        &mut self,
        key: &Flow6Key,
        entry: &FlowEntry,
    ) -> Result<(), DataplaneError> {
        self.flows6
            .insert(key, entry, 0)
            .map_err(map_err(maps::FLOWS6))
    }

    /// Empties both connection tables (tests).
    pub fn clear_flows(&mut self) -> Result<(), DataplaneError> {
        clear(&mut self.flows, maps::FLOWS)?;
        clear(&mut self.flows6, maps::FLOWS6)
    }

    /// One connection-table entry.
    pub fn flow(&self, key: &FlowKey) -> Option<FlowEntry> {
        self.flows.get(key, 0).ok()
    }

    /// One IPv6 connection-table entry.
    pub fn flow6(&self, key: &Flow6Key) -> Option<FlowEntry> {
        self.flows6.get(key, 0).ok()
    }

    /// Kernel id of the load-balancing program.
    pub fn program_id(&self) -> Option<u32> {
        self.program().info().ok().map(|i| i.id())
    }
}

fn sample<K: aya::Pod>(
    map: &HashMap<MapData, K, FlowEntry>,
    name: &'static str,
    limit: usize,
    max_read: usize,
    mut keep: impl FnMut(&K, &FlowEntry) -> bool,
) -> Result<(Vec<(K, FlowEntry)>, usize), DataplaneError> {
    let mut out = Vec::new();
    let mut read = 0;
    for kv in map.iter().take(max_read) {
        let (k, v) = match kv {
            Ok(kv) => kv,
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name)(e)),
        };
        read += 1;
        if keep(&k, &v) {
            out.push((k, v));
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok((out, read))
}

fn clear<K: aya::Pod>(
    map: &mut HashMap<MapData, K, FlowEntry>,
    name: &'static str,
) -> Result<(), DataplaneError> {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        match map.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(name)(e)),
        }
    }
    Ok(())
}

fn sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Result<Counter, MapError> {
    let values = map.get(&index, 0)?;
    let mut total = Counter::default();
    for v in values.iter() {
        total += *v;
    }
    Ok(total)
}

fn reset(map: &mut PerCpuArray<MapData, Counter>, index: u32) -> Result<(), MapError> {
    let n = aya::util::nr_cpus().map_err(|(_, e)| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        })
    })?;
    let values = aya::maps::PerCpuValues::try_from(vec![Counter::default(); n])?;
    map.set(index, values, 0)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`, which
/// stamps the connection table's entries.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // The data path's clock is bpf_ktime_get_coarse_ns, which is CLOCK_MONOTONIC_COARSE.
    // SAFETY: clock_gettime writes the timespec it is given; the clock always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Dropped in-process (an error, a panic that unwinds), the data path is detached as it always
/// was; only a process that dies without unwinding (SIGKILL, abort) leaves its pinned link
/// forwarding for the next agent, and [`Dataplane::persist`] does so on purpose.
impl Drop for Dataplane {
    fn drop(&mut self) {
        if self.pinned.is_some()
            && let Err(e) = self.detach()
        {
            warn!("detaching the data path failed: {e}");
        }
    }
}

/// Refuses a pinned connection table whose layout differs from this build's (key and value
/// sizes, type, flags) or from the configured size: aya would adopt any map at that path.
fn check_flows_layout(path: &Path, key_size: usize, entries: u32) -> Result<(), DataplaneError> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| DataplaneError::Pin {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let describe = |ty: String, k: u32, v: u32, n: u32, f: u32| {
        format!("a {ty} with {k}-byte keys, {v}-byte values, {n} entries, flags {f:#x}")
    };
    let ty = info
        .map_type()
        .map_or_else(|_| "map of unknown type".to_string(), |t| format!("{t:?}"));
    let found = describe(
        ty.clone(),
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    );
    let wanted = describe(
        format!("{:?}", aya::maps::MapType::LruHash),
        key_size as u32,
        core::mem::size_of::<FlowEntry>() as u32,
        entries,
        maps::BPF_F_NO_COMMON_LRU,
    );
    if found != wanted {
        return Err(DataplaneError::FlowsLayout {
            path: path.to_path_buf(),
            found,
            wanted,
        });
    }
    Ok(())
}

/// A service's key in the data path, of either family: IPv4 services live in
/// [`VIP_TABLE`](lb_common::maps::VIP_TABLE), IPv6 ones in [`VIP6`](lb_common::maps::VIP6).
/// Both share ring regions, VIP indices and backend ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    V4(VipKey),
    V6(Vip6Key),
}

impl ServiceKey {
    /// The key of the service `addr`:`port` with IP protocol `proto`.
    pub fn new(addr: IpAddr, port: u16, proto: u8) -> ServiceKey {
        let port = port.to_be_bytes();
        match addr {
            IpAddr::V4(a) => ServiceKey::V4(VipKey {
                addr: a.octets(),
                port,
                proto,
                _pad: 0,
            }),
            IpAddr::V6(a) => ServiceKey::V6(Vip6Key {
                addr: a.octets(),
                port,
                proto,
                _pad: 0,
            }),
        }
    }

    /// The word a backend entry carries to name its service ([`BackendInfo::vip`]).
    pub fn word(&self) -> u64 {
        match self {
            ServiceKey::V4(k) => vip_key_word(k),
            ServiceKey::V6(k) => maps::vip6_key_word(k),
        }
    }

    /// Whether a flow to `dst`:`dport` over `proto` (as in a connection-table key) is for this
    /// service.
    pub fn matches(&self, dst: IpAddr, dport: [u8; 2], proto: u8) -> bool {
        *self == ServiceKey::new(dst, u16::from_be_bytes(dport), proto)
    }
}

/// Which of the connection tables [`Dataplane::load_adopting`] found pinned and adopted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub flows: bool,
    pub flows6: bool,
}

/// The pins of the two connection tables in a pin directory.
struct FlowPins {
    flows: PathBuf,
    flows6: PathBuf,
}

impl FlowPins {
    fn in_dir(dir: &Path) -> FlowPins {
        FlowPins {
            flows: dir.join("flows"),
            flows6: dir.join("flows6"),
        }
    }
}

/// Where the data path of `interface` is pinned: `/sys/fs/bpf/xdplb/<interface>` in the host's
/// network namespace, `/sys/fs/bpf/xdplb/netns-<inode>/<interface>` in any other, since bpffs
/// is shared by all network namespaces while interface names are not.
pub fn pin_dir(interface: &str) -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let ns = |p: &str| fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    match (ns("/proc/thread-self/ns/net"), ns("/proc/1/ns/net")) {
        (Some(me), Some(init)) if me == init => Path::new(PIN_ROOT).join(interface),
        (Some((_, ino)), _) => Path::new(PIN_ROOT)
            .join(format!("netns-{ino}"))
            .join(interface),
        (None, _) => Path::new(PIN_ROOT).join(interface),
    }
}

/// The ids of the link pinned for `interface` ([`pin_dir`]) and of the program it runs now:
/// `(link id, program id)`.
pub fn pinned_link_ids(interface: &str) -> io::Result<(u32, u32)> {
    let path = pin_dir(interface).join("link");
    let link = FdLink::from(PinnedLink::from_pin(&path).map_err(io::Error::other)?);
    let info = link.info().map_err(io::Error::other)?;
    Ok((info.id(), info.program_id()))
}

/// The id of the IPv4 connection table pinned for `interface`, if one is.
pub fn pinned_flows_id(interface: &str) -> Option<u32> {
    aya::maps::MapInfo::from_pin(pin_dir(interface).join("flows"))
        .ok()
        .map(|i| i.id())
}

/// `BPF_OBJ_GET`: opens a pinned BPF object.
fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // union bpf_attr, obj_get: pathname (u64), bpf_fd (u32), file_flags (u32), path_fd (s32).
    let mut attr = [0u64; 3];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr is a valid, zero-padded bpf_attr prefix; the path outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, 7 /* BPF_OBJ_GET */, attr.as_ptr(), 24)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: points a link at another program, atomically for the traffic.
fn bpf_link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    // union bpf_attr, link_update: link_fd, new_prog_fd, flags, old_prog_fd (all u32).
    let attr: [u32; 4] = [link.as_raw_fd() as u32, prog.as_raw_fd() as u32, 0, 0];
    // SAFETY: attr is a valid bpf_attr prefix; the fds are open for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            29, /* BPF_LINK_UPDATE */
            attr.as_ptr(),
            16,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes a pin directory and, if that leaves it empty, its per-namespace parent.
pub fn remove_pins(dir: &Path) {
    if let Err(e) = fs::remove_dir_all(dir) {
        warn!(path = %dir.display(), "could not remove pins: {e}");
    }
    if let Some(parent) = dir.parent()
        && parent != Path::new(PIN_ROOT)
    {
        // Fails, harmlessly, while another interface of that namespace is still pinned.
        let _ = fs::remove_dir(parent);
    }
}

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (fresh machines, or a process started
/// in a mount namespace without it).
pub fn ensure_bpffs() -> Result<(), DataplaneError> {
    let mounts = fs::File::open("/proc/self/mounts").map_err(DataplaneError::Bpffs)?;
    for line in io::BufReader::new(mounts).lines() {
        let line = line.map_err(DataplaneError::Bpffs)?;
        let mut fields = line.split_whitespace();
        let (_, Some(target), Some(fstype)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if target == BPFFS_ROOT && fstype == "bpf" {
            return Ok(());
        }
    }
    fs::create_dir_all(BPFFS_ROOT).map_err(DataplaneError::Bpffs)?;
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DataplaneError::Bpffs(io::Error::last_os_error()));
    }
    info!("mounted bpffs at {BPFFS_ROOT}");
    Ok(())
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32, port: u16, proto: u8) -> VipKey {
        VipKey {
            addr: (0x0a00_0000 + i).to_be_bytes(),
            port: port.to_be_bytes(),
            proto,
            _pad: 0,
        }
    }

    /// A half laid out by `place_vips`, probed by the data path's `vip_table_find`.
    fn lay_out(keys: &[VipKey], half: u32) -> Option<(u64, Vec<VipSlot>)> {
        let (seed, placed) = (0..64).find_map(|s| place_vips(keys, s).map(|p| (s, p)))?;
        let mut slots = vec![VipSlot::default(); 2 * VIP_TABLE_SLOTS as usize];
        for (n, (k, index)) in placed.iter().enumerate() {
            slots[(half * VIP_TABLE_SLOTS + index) as usize] = VipSlot {
                key: *k,
                table: vip_table_word(1000 + n as u32, 65537),
                vip_index: n as u32,
                flags: 0,
            };
        }
        Some((vip_table_ctl(half, seed), slots))
    }

    fn find(ctl: u64, slots: &[VipSlot], k: &VipKey) -> Option<VipInfo> {
        vip_table_find(ctl, k, |i| {
            let s = slots.get(i as usize)?;
            Some((vip_key_word(&s.key), s.table, s.vip_index, s.flags))
        })
    }

    #[test]
    fn every_placed_vip_is_found_and_others_are_not() {
        let keys: Vec<VipKey> = (0..300)
            .flat_map(|i| [key(i, 80, 6), key(i, 443, 6), key(i, 53, 17)])
            .collect();
        for half in [0, 1] {
            let (ctl, slots) = lay_out(&keys, half).expect("300 x 3 VIPs fit");
            for (n, k) in keys.iter().enumerate() {
                let info = find(ctl, &slots, k).unwrap_or_else(|| panic!("{k:?} not found"));
                assert_eq!(info.vip_index, n as u32);
                assert_eq!((info.ring_base, info.ring_size), (1000 + n as u32, 65537));
            }
            for k in [key(0, 80, 17), key(0, 81, 6), key(5000, 80, 6)] {
                assert_eq!(find(ctl, &slots, &k), None, "{k:?}");
            }
            // The other half is empty: a control word pointing at it finds nothing.
            assert_eq!(find(ctl ^ 1, &slots, &keys[0]), None);
        }
    }

    #[test]
    fn another_seed_is_another_layout_not_a_shifted_one() {
        let keys: Vec<VipKey> = (0..64).map(|i| key(i, 80, 6)).collect();
        let shifts: std::collections::BTreeSet<u32> = keys
            .iter()
            .map(|k| {
                let w = vip_key_word(k);
                vip_home(w, 1).wrapping_sub(vip_home(w, 0)) & (VIP_TABLE_SLOTS - 1)
            })
            .collect();
        assert!(
            shifts.len() > 32,
            "seed 1 only shifts seed 0's layout: {shifts:?}"
        );
        // Every part of the key moves the home: protocol, port bytes, address bytes.
        let base = vip_home(vip_key_word(&key(7, 80, 6)), 0);
        for other in [
            key(7, 80, 17),
            key(7, 80 + 64, 6),
            key(7, 80 + 256, 6),
            key(7 + (1 << 24), 80, 6),
        ] {
            assert_ne!(vip_home(vip_key_word(&other), 0), base, "{other:?}");
        }
    }

    #[test]
    fn the_most_vips_fit_within_the_probe_limit() {
        let keys: Vec<VipKey> = (0..maps::MAX_VIPS)
            .map(|i| key(i / 2, 80, 6 + 11 * (i % 2) as u8))
            .collect();
        let (ctl, slots) = lay_out(&keys, 0).expect("MAX_VIPS keys fit with some seed");
        assert!(keys.iter().all(|k| find(ctl, &slots, k).is_some()));
        // Adjacent addresses and ports, the usual shape of a config, fit with the first seed.
        assert!(place_vips(&keys, 0).is_some());
    }
}
