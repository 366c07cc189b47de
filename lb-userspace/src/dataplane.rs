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
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    ptr::NonNull,
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
    maps::{
        self, BackendInfo, Counter, RING_CHUNK_ENTRIES, RingChunk, Settings, VipAddrKey, VipFilter,
        VipInfo, VipKey, vip_filter_set,
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

/// The flat ring (all Maglev tables) mapped into our address space.
struct Ring {
    ptr: NonNull<u32>,
    entries: u32,
    len_bytes: usize,
    // Keeps the map (and thus the mapping's backing) alive.
    _map: MapData,
}

// SAFETY: the mapping is owned by this struct and only accessed through &self / &mut self.
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}

impl Ring {
    fn new(map: MapData, chunks: u32) -> Result<Ring, DataplaneError> {
        let len_bytes = chunks as usize * size_of::<RingChunk>();
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
                map: maps::RING,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Ring {
            ptr: NonNull::new(ptr.cast()).expect("mmap returned null"),
            entries: chunks * RING_CHUNK_ENTRIES,
            len_bytes,
            _map: map,
        })
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
                self.ptr.as_ptr().add(base as usize),
                entries.len(),
            );
        }
        // The VIP update that publishes this region is a syscall, which orders these stores
        // before it; the fence documents (and guarantees, on any architecture) that ordering.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    fn get(&self, index: u32) -> Option<u32> {
        if index >= self.entries {
            return None;
        }
        // SAFETY: in bounds; a u32 read of shared memory the kernel only reads.
        Some(unsafe { self.ptr.as_ptr().add(index as usize).read_volatile() })
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len_bytes) };
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    ebpf: Ebpf,
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, VipAddrKey, u32>,
    vip_filter: Array<MapData, VipFilter>,
    /// The addresses in `vip_addrs`, to rebuild the filter when one goes.
    vip_addr_set: std::collections::BTreeSet<[u8; 4]>,
    ring: Ring,
    backends: Array<MapData, BackendInfo>,
    settings: Array<MapData, Settings>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    reason_stats: PerCpuArray<MapData, Counter>,
    link: Option<(String, XdpLinkId)>,
}

impl Dataplane {
    /// Loads the embedded object and has the kernel verify the load-balancing program and the
    /// pass program.
    pub fn load(opts: LoadOptions) -> Result<Dataplane, DataplaneError> {
        raise_memlock_limit();
        let chunks = opts.ring_entries.div_ceil(RING_CHUNK_ENTRIES).max(1);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::RING, chunks)
            .load(EBPF_OBJECT)?;
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
        let vips = HashMap::try_from(take(maps::VIPS)?).map_err(map_err(maps::VIPS))?;
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
        let ring = Ring::new(ring_map, chunks)?;
        Ok(Dataplane {
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
            remove_pins(&pin_dir);
            info!(
                interface,
                "took over the data path a previous agent left running (atomic program swap)"
            );
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
        Ok(Attached::New(attached))
    }

    /// Detaches the program (if attached). Dropping the `Dataplane` does the same.
    pub fn detach(&mut self) -> Result<(), DataplaneError> {
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
        let Some((interface, id)) = self.link.take() else {
            return Err(DataplaneError::Pin {
                path: PathBuf::from(PIN_ROOT),
                source: "the program is not attached".into(),
            });
        };
        ensure_bpffs()?;
        let dir = pin_dir(&interface);
        let link_path = dir.join("link");
        let pin_err = |e: Box<dyn std::error::Error + Send + Sync>| DataplaneError::Pin {
            path: link_path.clone(),
            source: e,
        };
        // Whatever an earlier failed attempt left there would make the pin fail.
        if dir.exists() {
            remove_pins(&dir);
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
        fd_link.pin(&link_path).map_err(|e| pin_err(e.into()))?;
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

    pub fn set_vip(&mut self, key: &VipKey, info: &VipInfo) -> Result<(), DataplaneError> {
        self.vips.insert(key, info, 0).map_err(map_err(maps::VIPS))
    }

    pub fn remove_vip(&mut self, key: &VipKey) -> Result<(), DataplaneError> {
        self.vips.remove(key).map_err(map_err(maps::VIPS))
    }

    pub fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key, 0).ok()
    }

    /// Records how many VIPs `key` has (0: none), and keeps the VIP address filter in step. Call
    /// it before publishing the first VIP of an address and after removing the last one: the
    /// data path passes frames for addresses outside the filter without looking at [`VIPS`].
    ///
    /// [`VIPS`]: lb_common::maps::VIPS
    pub fn set_vip_addr(&mut self, key: &VipAddrKey, count: u32) -> Result<(), DataplaneError> {
        let changed = if count == 0 {
            self.vip_addr_set.remove(&key.addr)
        } else {
            self.vip_addr_set.insert(key.addr)
        };
        if changed {
            let mut filter: VipFilter = [0; (maps::VIP_FILTER_BITS / 64) as usize];
            for a in &self.vip_addr_set {
                vip_filter_set(&mut filter, *a);
            }
            self.vip_filter
                .set(0, filter, 0)
                .map_err(map_err(maps::VIP_FILTER))?;
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

    /// Kernel id of the load-balancing program.
    pub fn program_id(&self) -> Option<u32> {
        self.program().info().ok().map(|i| i.id())
    }
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
