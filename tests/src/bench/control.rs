//! Control-plane benchmarks: Maglev table builds (time, memory, balance, disruption) and the time
//! from a change to the new table being live in the kernel.
//!
//! The Maglev figures come from `lb_userspace::maglev::build_table` alone, in process. The change
//! latency goes through the agent's own `Reconciler` on a real, loaded (not attached) `Dataplane`,
//! and every change is read back from the kernel's maps before it counts.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use lb_userspace::{
    agent::MIN_RING_ENTRIES,
    config::{self, Config},
    dataplane::{Dataplane, LoadOptions},
    logging::LogLevel,
    maglev::{self, MaglevBackend},
    net::MacTable,
    reconciler::{HALF_REUSE_GRACE, Reconciler},
};
use serde::Serialize;

use super::{Check, Stats};

#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// Rounds per measurement (>= 5 in a full run).
    pub rounds: usize,
    /// Reduced sizes for `--quick`.
    pub quick: bool,
}

/// One Maglev configuration: N backends (equal weights) at table size M.
#[derive(Clone, Debug, Serialize)]
pub struct MaglevRow {
    pub backends: usize,
    pub table_size: u32,
    /// Wall time of one `maglev::build_table`, ms, over the rounds.
    pub build_ms: Stats,
    /// Peak heap allocated during one build, bytes (measured with a counting allocator); 0 when
    /// the binary does not use [`CountingAlloc`] (see [`ControlReport::memory_measured`]).
    pub build_peak_bytes: u64,
    /// What the table costs in the kernel: two halves of M 4-byte entries.
    pub kernel_bytes: u64,
    /// Largest |share - weight share| / weight share over the backends, percent.
    pub balance_max_dev_pct: f64,
    /// Slots that changed owner when one backend is removed, percent of M (ideal: 100/N).
    pub remove_moved_pct: f64,
    /// The ideal for `remove_moved_pct`: the removed backend's own share, 100/N.
    pub remove_ideal_pct: f64,
    /// Slots that changed owner when one backend is added, percent of M (ideal: 100/(N+1)).
    pub add_moved_pct: f64,
    /// The ideal for `add_moved_pct`: the new backend's share, 100/(N+1).
    pub add_ideal_pct: f64,
}

/// Time from a change handed to the reconciler to the new table being live in the kernel.
#[derive(Clone, Debug, Serialize)]
pub struct ChangeRow {
    /// e.g. "1 VIP x 3 backends, M=65537".
    pub config: String,
    /// e.g. "one backend removed".
    pub change: String,
    pub latency_ms: Stats,
    /// VIPs whose table was rebuilt and republished by this change.
    pub vips_rebuilt: usize,
    /// What the figure includes and leaves out.
    pub note: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ControlReport {
    pub maglev: Vec<MaglevRow>,
    pub changes: Vec<ChangeRow>,
    pub rounds: usize,
    /// Whether `build_peak_bytes` was measured (the binary installs [`CountingAlloc`]).
    pub memory_measured: bool,
    /// Remarks on how the figures were taken.
    pub notes: Vec<String>,
}

/// Build-time target of the issue, for N = 1000 at M = 65537.
const BUILD_TARGET_MS: f64 = 10.0;
/// Balance target: relative deviation from the weight share, for rows with M >= 100 N.
const BALANCE_TARGET_PCT: f64 = 1.0;
/// Disruption slack over the 1/N ideal, fraction of M.
const DISRUPTION_SLACK: f64 = 0.01;

impl ControlReport {
    /// The control-plane targets, checked against this run.
    pub fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();

        let build = self
            .maglev
            .iter()
            .find(|r| r.backends == 1000 && r.table_size == 65537);
        checks.push(Check {
            name: "Maglev build, 1000 backends, M = 65537".into(),
            target: format!("< {BUILD_TARGET_MS} ms (median)"),
            measured: build.map_or("not measured".into(), |r| {
                format!(
                    "{:.2} ms (median of {} rounds, max {:.2})",
                    r.build_ms.median,
                    r.build_ms.samples.len(),
                    r.build_ms.max
                )
            }),
            holds: build.is_some_and(|r| r.build_ms.median < BUILD_TARGET_MS),
        });

        let balanced: Vec<&MaglevRow> = self
            .maglev
            .iter()
            .filter(|r| u64::from(r.table_size) >= 100 * r.backends as u64)
            .collect();
        let worst = balanced
            .iter()
            .max_by(|a, b| a.balance_max_dev_pct.total_cmp(&b.balance_max_dev_pct));
        checks.push(Check {
            name: "Maglev balance, every configuration with M >= 100 x N".into(),
            target: format!("every backend within {BALANCE_TARGET_PCT}% of its weight share"),
            measured: worst.map_or("not measured".into(), |r| {
                format!(
                    "worst {:.3}% (N={}, M={}; {} configurations)",
                    r.balance_max_dev_pct,
                    r.backends,
                    r.table_size,
                    balanced.len()
                )
            }),
            holds: !balanced.is_empty()
                && balanced
                    .iter()
                    .all(|r| r.balance_max_dev_pct <= BALANCE_TARGET_PCT),
        });

        // The margin against each row's own bound, so the row closest to missing is named.
        let margin =
            |r: &MaglevRow| r.remove_ideal_pct + DISRUPTION_SLACK * 100.0 - r.remove_moved_pct;
        let worst = self
            .maglev
            .iter()
            .min_by(|a, b| margin(a).total_cmp(&margin(b)));
        checks.push(Check {
            name: "Maglev disruption, one of N backends removed".into(),
            target: "moves <= 1/N + 1% of the slots".into(),
            measured: worst.map_or("not measured".into(), |r| {
                format!(
                    "closest: N={}, M={}: {:.3}% moved, bound {:.3}% ({} configurations)",
                    r.backends,
                    r.table_size,
                    r.remove_moved_pct,
                    r.remove_ideal_pct + DISRUPTION_SLACK * 100.0,
                    self.maglev.len()
                )
            }),
            holds: !self.maglev.is_empty() && self.maglev.iter().all(|r| margin(r) >= 0.0),
        });
        checks
    }
}

pub fn run(opts: &ControlOptions) -> Result<ControlReport> {
    let rounds = opts.rounds.max(1);
    let memory_measured = allocator_installed();
    let mut report = ControlReport {
        rounds,
        memory_measured,
        ..Default::default()
    };
    if !memory_measured {
        report.notes.push(
            "peak heap per build not measured: this binary does not use \
             lb_tests::bench::control::CountingAlloc as its global allocator"
                .into(),
        );
    }
    // `--quick` keeps every configuration: the largest one is the one worth knowing, and all six
    // take well under a second per round together.
    for &m in &[65537u32, 655373] {
        for &n in &[10usize, 100, 1000] {
            let row = maglev_row(n, m, rounds, memory_measured)
                .with_context(|| format!("Maglev N={n} M={m}"))?;
            eprintln!(
                "   maglev N={n:<4} M={m:<6}: build {} ms, balance {:.3}%, removal moves {:.3}% \
                 (ideal {:.3}%)",
                row.build_ms.show(2),
                row.balance_max_dev_pct,
                row.remove_moved_pct,
                row.remove_ideal_pct
            );
            report.maglev.push(row);
        }
    }

    report.changes = change_latencies(rounds).context("change latency")?;
    report.notes.push(format!(
        "change latency: one `Reconciler::apply_macs` call (Maglev build, ring write, VIP entry \
         update), read back from the kernel's maps after every call; changes are spaced {} ms \
         apart so the reconciler's {} ms wait before reusing a table half (HALF_REUSE_GRACE) is \
         not included",
        CHANGE_SPACING.as_millis(),
        HALF_REUSE_GRACE.as_millis()
    ));
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Maglev tables

/// `n` distinct backends of weight 1, from 10.0.0.1 on.
fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n).map(|i| equal_backend(i as u32)).collect()
}

fn equal_backend(i: u32) -> MaglevBackend {
    MaglevBackend {
        address: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + i)),
        weight: 1,
    }
}

fn maglev_row(n: usize, m: u32, rounds: usize, memory: bool) -> Result<MaglevRow> {
    let all = backends(n);
    // Warm-up: page faults of the first allocation of this size and a cold cache are not what a
    // running agent pays on a change.
    let table = maglev::build_table(&all, m)?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        let built = std::hint::black_box(maglev::build_table(std::hint::black_box(&all), m)?);
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(built == table, "two builds of the same input differ");
    }
    let build_peak_bytes = if memory {
        let (built, peak) = measure_peak(|| maglev::build_table(&all, m));
        built?;
        peak.unwrap_or(0)
    } else {
        0
    };

    let owners_all = owners(&table, &all)?;
    let balance_max_dev_pct = balance_max_dev(&table, &all)? * 100.0;

    // The middle backend by address: neither end of the turn order.
    let mut removed = all.clone();
    removed.remove(n / 2);
    let owners_removed = owners(&maglev::build_table(&removed, m)?, &removed)?;

    let mut added = all.clone();
    added.push(equal_backend(n as u32));
    let owners_added = owners(&maglev::build_table(&added, m)?, &added)?;

    Ok(MaglevRow {
        backends: n,
        table_size: m,
        build_ms: Stats::of(samples),
        build_peak_bytes,
        kernel_bytes: 2 * u64::from(m) * 4,
        balance_max_dev_pct,
        remove_moved_pct: moved_fraction(&owners_all, &owners_removed) * 100.0,
        remove_ideal_pct: 100.0 / n as f64,
        add_moved_pct: moved_fraction(&owners_all, &owners_added) * 100.0,
        add_ideal_pct: 100.0 / (n + 1) as f64,
    })
}

/// The owner of every slot as an address: indices are only meaningful against the slice they
/// were built from, and the slices compared differ.
fn owners(table: &[u32], backends: &[MaglevBackend]) -> Result<Vec<Option<IpAddr>>> {
    table
        .iter()
        .map(|&ix| {
            if ix == maglev::EMPTY {
                Ok(None)
            } else {
                backends
                    .get(ix as usize)
                    .map(|b| Some(b.address))
                    .with_context(|| format!("table entry {ix} is not a backend index"))
            }
        })
        .collect()
}

/// Fraction of slots whose owner differs between two tables of the same size.
fn moved_fraction(a: &[Option<IpAddr>], b: &[Option<IpAddr>]) -> f64 {
    assert_eq!(a.len(), b.len(), "tables of different sizes");
    if a.is_empty() {
        return 0.0;
    }
    let moved = a.iter().zip(b).filter(|(x, y)| x != y).count();
    moved as f64 / a.len() as f64
}

/// Largest |share - weight share| / weight share over the backends with a non-zero weight, as a
/// fraction.
fn balance_max_dev(table: &[u32], backends: &[MaglevBackend]) -> Result<f64> {
    let total_weight: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    ensure!(total_weight > 0, "no backend with a non-zero weight");
    ensure!(!table.is_empty(), "empty table");
    let mut counts = vec![0u64; backends.len()];
    for &ix in table {
        ensure!(ix != maglev::EMPTY, "empty slot with non-zero weights");
        *counts
            .get_mut(ix as usize)
            .with_context(|| format!("table entry {ix} is not a backend index"))? += 1;
    }
    let mut worst: f64 = 0.0;
    for (b, &c) in backends.iter().zip(&counts) {
        if b.weight == 0 {
            ensure!(c == 0, "backend {} has weight 0 but {c} slots", b.address);
            continue;
        }
        let want = f64::from(b.weight) / total_weight as f64;
        let got = c as f64 / table.len() as f64;
        worst = worst.max((got - want).abs() / want);
    }
    Ok(worst)
}

// ---------------------------------------------------------------------------------------------
// Heap measurement

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);
/// One measurement at a time: the peak counter is shared.
static MEASURING: Mutex<()> = Mutex::new(());

/// The system allocator, counting live heap bytes and their peak, for [`measure_peak`].
///
/// A binary opts in with
/// `#[global_allocator] static ALLOC: lb_tests::bench::control::CountingAlloc = CountingAlloc;`.
/// The counters are process-wide, so allocations of other threads during a measurement count
/// too; the control benchmark runs on one thread.
pub struct CountingAlloc;

impl CountingAlloc {
    fn grew(bytes: usize) {
        let now = CURRENT.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }

    fn shrank(bytes: usize) {
        CURRENT.fetch_sub(bytes as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are updated around it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's; `ptr` came from `System` through this type.
        unsafe { System.dealloc(ptr, layout) };
        Self::shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's; `ptr` came from `System` through this type.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // A moving realloc briefly holds both blocks inside `System`; only the net change is
            // counted, as that is what the program asked for.
            if new_size >= layout.size() {
                Self::grew(new_size - layout.size());
            } else {
                Self::shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Whether [`CountingAlloc`] is this process's global allocator: its counter moves when memory
/// is allocated, and nothing else moves it.
pub fn allocator_installed() -> bool {
    let before = CURRENT.load(Ordering::Relaxed);
    let probe = std::hint::black_box(Vec::<u8>::with_capacity(4096));
    let after = CURRENT.load(Ordering::Relaxed);
    drop(probe);
    after != before
}

/// Runs `f` and returns the most heap it held at once above what was live before, in bytes
/// (what it returns included); `None` if [`CountingAlloc`] is not the global allocator.
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, Option<u64>) {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    if !allocator_installed() {
        return (f(), None);
    }
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let r = f();
    let peak = PEAK.load(Ordering::Relaxed);
    (r, Some(peak.saturating_sub(base)))
}

// ---------------------------------------------------------------------------------------------
// Change latency

/// Pause before every timed change: longer than HALF_REUSE_GRACE, so the reconciler never waits
/// for a table half to age.
const CHANGE_SPACING: Duration = Duration::from_millis(20);
const _: () = assert!(CHANGE_SPACING.as_millis() > HALF_REUSE_GRACE.as_millis());

const BENCH_TABLE_SIZE: u32 = 65537;

/// A generated service set: `vips` services of `per_vip` distinct backends each.
struct Setup {
    name: String,
    config: Config,
}

fn setup(vips: usize, per_vip: usize) -> Result<Setup> {
    let text = config_toml(vips, per_vip, BENCH_TABLE_SIZE);
    // The agent's own parser and validator: the benchmark runs what an operator could write.
    let loaded = config::parse(&text, Path::new("<bench>"))
        .map_err(|e| anyhow::anyhow!("generated config rejected:\n{e}"))?;
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    Ok(Setup {
        name: format!(
            "{} x {}, M={BENCH_TABLE_SIZE}",
            plural(vips, "VIP", "VIPs"),
            plural(per_vip, "backend", "backends")
        ),
        config: loaded.config,
    })
}

/// VIP `v` is 10.255.0.1 port 1000+v/TCP; its backend `b` is 10.(1 + v/250).(v%250).(b+1), so
/// no backend is shared between services.
fn config_toml(vips: usize, per_vip: usize, table_size: u32) -> String {
    let mut t = String::from(
        "[dataplane]\ninterface = \"bench0\"\nmode = \"dsr-l2\"\nxdp_mode = \"auto\"\n",
    );
    for v in 0..vips {
        let _ = write!(
            t,
            "\n[[vip]]\nname = \"svc{v}\"\naddress = \"10.255.0.1\"\nport = {}\n\
             protocol = \"tcp\"\ntable_size = {table_size}\n",
            1000 + v
        );
        for b in 0..per_vip {
            let _ = write!(
                t,
                "[[vip.backend]]\naddress = \"{}\"\nweight = 1\n",
                backend_addr(v, b)
            );
        }
    }
    t
}

fn backend_addr(vip: usize, backend: usize) -> Ipv4Addr {
    assert!(
        vip < 250 * 254 && backend < 254,
        "outside the generated address plan"
    );
    Ipv4Addr::new(
        10,
        1 + (vip / 250) as u8,
        (vip % 250) as u8,
        backend as u8 + 1,
    )
}

/// A made-up, distinct, locally administered MAC per backend address (its low 32 bits).
fn mac_of(addr: IpAddr) -> [u8; 6] {
    let o = match addr {
        IpAddr::V4(a) => a.to_bits(),
        IpAddr::V6(a) => a.to_bits() as u32,
    }
    .to_be_bytes();
    [0x02, 0xb0, o[0], o[1], o[2], o[3]]
}

/// What the kernel's maps say a VIP forwards to: the live half's base and the backend addresses
/// its table names (the bench's services are IPv4: an IPv6 backend's entry has no address).
fn live_in_kernel(dp: &Dataplane, v: &config::Vip) -> Result<(u32, BTreeSet<IpAddr>)> {
    let info = dp
        .service(&v.map_key())
        .with_context(|| format!("{}: not found in the VIP table", v.name))?;
    ensure!(
        info.ring_size == v.table_size,
        "{}: the kernel's entry has ring_size {}, not {}",
        v.name,
        info.ring_size,
        v.table_size
    );
    let mut ids = BTreeSet::new();
    for i in info.ring_base..info.ring_base + info.ring_size {
        ids.insert(
            dp.ring_entry(i)
                .with_context(|| format!("ring entry {i} out of range"))?,
        );
    }
    let mut addrs = BTreeSet::new();
    for id in ids {
        let b = dp
            .backend(id)
            .with_context(|| format!("{}: table names backend id {id}, not in the map", v.name))?;
        addrs.insert(Ipv4Addr::from(b.addr).into());
    }
    Ok((info.ring_base, addrs))
}

/// Checks that every VIP's kernel table is a freshly flipped one over exactly `expected` backends.
fn verify_live(
    dp: &Dataplane,
    vips: &[&config::Vip],
    bases: &mut BTreeMap<String, u32>,
    macs: &MacTable,
) -> Result<()> {
    for v in vips {
        let (base, addrs) = live_in_kernel(dp, v)?;
        let expected: BTreeSet<IpAddr> = v
            .backends
            .iter()
            .map(|b| b.address)
            .filter(|a| macs.get(a).copied().flatten().is_some())
            .collect();
        ensure!(
            addrs == expected,
            "{}: the kernel's table names {} backends, {} expected (missing {:?}, extra {:?})",
            v.name,
            addrs.len(),
            expected.len(),
            expected.difference(&addrs).collect::<Vec<_>>(),
            addrs.difference(&expected).collect::<Vec<_>>()
        );
        if let Some(before) = bases.insert(v.name.clone(), base) {
            ensure!(
                before != base,
                "{}: the VIP entry still points at the previous table half",
                v.name
            );
        }
    }
    Ok(())
}

/// What happens to the chosen backends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The kernel forgets their MAC (a neighbour entry failed), and learns it back.
    MacLost,
    /// The operator drains them (`xdplb backend drain`), and undrains them.
    Drain,
    /// The operator sets their weight to 4 (`xdplb backend weight`), and back to 1.
    Weight,
}

/// One kind of change, applied and undone `rounds` times.
struct Change<'a> {
    what: &'a str,
    undo: &'a str,
    kind: Kind,
    /// For round `r`: the backends changed (one per affected VIP).
    victims: &'a dyn Fn(usize) -> Vec<(usize, usize)>,
}

impl<'a> Change<'a> {
    /// `kind` applied to one backend per round, and undone.
    fn one_backend(kind: Kind, victims: &'a dyn Fn(usize) -> Vec<(usize, usize)>) -> Self {
        let (what, undo) = match kind {
            Kind::MacLost => ("one backend's MAC lost", "that backend's MAC back"),
            Kind::Drain => ("operator drains one backend", "operator undrains it"),
            Kind::Weight => (
                "operator sets one backend's weight 1 -> 4",
                "operator sets it back to 1",
            ),
        };
        Change {
            what,
            undo,
            kind,
            victims,
        }
    }
}

fn change_latencies(rounds: usize) -> Result<Vec<ChangeRow>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("tokio runtime")?;
    let mut rows = Vec::new();

    let small = setup(1, 3)?;
    let one = |r: usize| vec![(0, r % 3)];
    rows.extend(rt.block_on(measure_changes(
        &small,
        rounds,
        &[
            Change::one_backend(Kind::MacLost, &one),
            Change::one_backend(Kind::Drain, &one),
            Change::one_backend(Kind::Weight, &one),
        ],
    ))?);

    let large = setup(100, 100)?;
    // Different VIPs and backends every round, so no round reuses the previous one's state.
    let one = |r: usize| vec![((r * 37) % 100, (r * 53) % 100)];
    let every = |r: usize| (0..100).map(|v| (v, (v + r * 53) % 100)).collect();
    rows.extend(rt.block_on(measure_changes(
        &large,
        rounds,
        &[
            Change::one_backend(Kind::MacLost, &one),
            Change {
                what: "one backend lost in every VIP",
                undo: "those backends back",
                kind: Kind::MacLost,
                victims: &every,
            },
            Change::one_backend(Kind::Drain, &one),
            Change::one_backend(Kind::Weight, &one),
        ],
    ))?);
    Ok(rows)
}

async fn measure_changes(
    s: &Setup,
    rounds: usize,
    changes: &[Change<'_>],
) -> Result<Vec<ChangeRow>> {
    let ring_entries = s.config.ring_entries_needed().max(MIN_RING_ENTRIES);
    let dp = Dataplane::load(LoadOptions {
        ring_entries,
        flow_entries: s.config.flows.entries,
        flow6_entries: s.config.flows.entries_v6,
    })
    .context("loading the data path (root, BPF)")?;
    let mut rec = Reconciler::new(
        dp,
        &s.config,
        "bench0",
        1,
        [0x02, 0, 0, 0, 0, 1],
        LogLevel::Warn,
    )
    .context("reconciler")?;
    let all: MacTable = s
        .config
        .vips
        .iter()
        .flat_map(|v| {
            v.backends
                .iter()
                .map(|b| (b.address, Some(mac_of(b.address))))
        })
        .collect();
    let every_vip: Vec<&config::Vip> = s.config.vips.iter().collect();
    let mut bases = BTreeMap::new();
    rec.apply_macs(all.clone())
        .await
        .context("first publication")?;
    verify_live(rec.dataplane(), &every_vip, &mut bases, &all)?;

    let mut rows = Vec::new();
    for c in changes {
        let (mut lost, mut back) = (Vec::new(), Vec::new());
        let mut touched = 0;
        // Round 0 warms up (first use of the spare halves' pages, code paths).
        for r in 0..=rounds {
            let victims = (c.victims)(r);
            let vips: Vec<&config::Vip> = victims.iter().map(|&(v, _)| &s.config.vips[v]).collect();
            touched = vips.len();
            let mut without = all.clone();
            for &(v, b) in &victims {
                without.insert(s.config.vips[v].backends[b].address, None);
            }
            // The backends the kernel's tables must name afterwards: a drained backend leaves
            // them like one whose MAC is lost; a weight change keeps every backend.
            let expect_changed = match c.kind {
                Kind::MacLost | Kind::Drain => without.clone(),
                Kind::Weight => all.clone(),
            };
            for (undo, macs, samples) in [
                (false, expect_changed, &mut lost),
                (true, all.clone(), &mut back),
            ] {
                tokio::time::sleep(CHANGE_SPACING).await;
                // The agent hands over a table it owns; copying 10k entries is not the change.
                let handed = macs.clone();
                let t = Instant::now();
                match c.kind {
                    Kind::MacLost => rec.apply_macs(handed).await?,
                    Kind::Drain | Kind::Weight => {
                        for &(v, b) in &victims {
                            let vip = &s.config.vips[v];
                            let addr = vip.backends[b].address;
                            if c.kind == Kind::Drain {
                                rec.set_drain(&vip.name, addr, !undo).await?;
                            } else {
                                rec.set_weight(&vip.name, addr, if undo { 1 } else { 4 })
                                    .await?;
                            }
                        }
                    }
                }
                let took = t.elapsed();
                verify_live(rec.dataplane(), &vips, &mut bases, &macs)
                    .with_context(|| format!("{} ({}), round {r}", c.what, s.name))?;
                if rec.needs_retry() {
                    bail!("{}: the reconciler reports a failed apply", c.what);
                }
                if r > 0 {
                    samples.push(took.as_secs_f64() * 1e3);
                }
            }
        }
        for (change, samples) in [(c.what, lost), (c.undo, back)] {
            let row = ChangeRow {
                config: s.name.clone(),
                change: change.to_string(),
                latency_ms: Stats::of(samples),
                vips_rebuilt: touched,
                note: format!(
                    "{} until the VIP entry points at the new table; excludes the {} ms \
                     HALF_REUSE_GRACE (changes {} ms apart)",
                    match c.kind {
                        Kind::MacLost => "apply_macs",
                        Kind::Drain => "Reconciler::set_drain (what the API calls)",
                        Kind::Weight => "Reconciler::set_weight (what the API calls)",
                    },
                    HALF_REUSE_GRACE.as_millis(),
                    CHANGE_SPACING.as_millis()
                ),
            };
            eprintln!(
                "   change {} / {}: {} ms",
                row.config,
                row.change,
                row.latency_ms.show(2)
            );
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The lib's test binary counts its allocations, so measure_peak is tested for real.
    #[global_allocator]
    static ALLOC: CountingAlloc = CountingAlloc;

    #[test]
    fn peak_heap_of_a_closure() {
        assert!(allocator_installed());
        let (v, peak) = measure_peak(|| {
            let scratch = vec![1u8; 3 << 20];
            let kept = vec![0u32; 1 << 18];
            std::hint::black_box(&scratch);
            kept
        });
        assert_eq!(v.len(), 1 << 18);
        let peak = peak.expect("installed");
        // Other tests allocate concurrently, so only a lower bound is exact.
        assert!(peak >= (3 << 20) + (1 << 20), "{peak}");
    }

    #[test]
    fn a_row_measures_the_heap_of_a_build() {
        for (n, m) in [(10, 65537), (1000, 65537), (1000, 655373)] {
            let r = maglev_row(n, m, 1, true).unwrap();
            eprintln!("N={n} M={m}: peak {} bytes", r.build_peak_bytes);
            // At least the returned table; other tests allocating meanwhile only add to it.
            assert!(r.build_peak_bytes >= 4 * u64::from(m), "{r:?}");
            assert_eq!(r.kernel_bytes, 8 * u64::from(m));
        }
    }

    fn addr(i: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
    }

    #[test]
    fn moved_slots_compare_owners_not_indices() {
        let before = backends(3);
        let after = vec![before[0], before[2]];
        // The same owners, with indices shifted by the removal: only slot 1 moved.
        let a = owners(&[0, 1, 2, 2], &before).unwrap();
        let b = owners(&[0, 0, 1, 1], &after).unwrap();
        assert_eq!(moved_fraction(&a, &b), 0.25);
        assert_eq!(moved_fraction(&[addr(1), None], &[addr(1), addr(2)]), 0.5);
        assert_eq!(moved_fraction(&[], &[]), 0.0);
        assert!(owners(&[3], &before).is_err());
    }

    #[test]
    fn balance_is_relative_to_the_weight_share() {
        let mut bs = backends(2);
        bs[1].weight = 3;
        // Shares 1/4 and 3/4 exactly.
        assert_eq!(balance_max_dev(&[0, 1, 1, 1], &bs).unwrap(), 0.0);
        // 2/4 against 1/4: 100% off; 2/4 against 3/4: 33% off.
        assert_eq!(balance_max_dev(&[0, 0, 1, 1], &bs).unwrap(), 1.0);
        bs.push(MaglevBackend {
            address: addr(200).unwrap(),
            weight: 0,
        });
        assert_eq!(balance_max_dev(&[0, 1, 1, 1], &bs).unwrap(), 0.0);
        assert!(
            balance_max_dev(&[0, 1, 2, 1], &bs).is_err(),
            "weight 0 with slots"
        );
        assert!(balance_max_dev(&[0, maglev::EMPTY], &bs).is_err());
    }

    #[test]
    fn a_real_table_is_balanced_and_removal_moves_about_one_share() {
        let all = backends(10);
        let m = 1009;
        let table = maglev::build_table(&all, m).unwrap();
        // floor/ceil of 100.9 entries: at most 0.1 / 100.9 off.
        assert!(balance_max_dev(&table, &all).unwrap() < 0.01);
        let mut less = all.clone();
        less.remove(5);
        let moved = moved_fraction(
            &owners(&table, &all).unwrap(),
            &owners(&maglev::build_table(&less, m).unwrap(), &less).unwrap(),
        );
        assert!((0.1..0.15).contains(&moved), "{moved}");
    }

    #[test]
    fn generated_configs_validate() {
        for (vips, per_vip) in [(1, 3), (100, 100)] {
            let s = setup(vips, per_vip).unwrap();
            assert_eq!(s.config.vips.len(), vips);
            let addrs: BTreeSet<IpAddr> = s
                .config
                .vips
                .iter()
                .flat_map(|v| v.backends.iter().map(|b| b.address))
                .collect();
            assert_eq!(addrs.len(), vips * per_vip, "backends are distinct");
        }
        assert_eq!(setup(1, 3).unwrap().name, "1 VIP x 3 backends, M=65537");
    }

    fn row(n: usize, m: u32, build: f64, dev: f64, moved: f64) -> MaglevRow {
        MaglevRow {
            backends: n,
            table_size: m,
            build_ms: Stats::of(vec![build]),
            build_peak_bytes: 0,
            kernel_bytes: 0,
            balance_max_dev_pct: dev,
            remove_moved_pct: moved,
            remove_ideal_pct: 100.0 / n as f64,
            add_moved_pct: 0.0,
            add_ideal_pct: 0.0,
        }
    }

    #[test]
    fn checks_follow_the_targets() {
        let mut r = ControlReport {
            maglev: vec![
                row(1000, 65537, 5.0, 2.0, 1.05),
                row(100, 65537, 1.0, 0.5, 1.9),
            ],
            ..Default::default()
        };
        let c = r.checks();
        assert_eq!(c.len(), 3);
        assert!(c[0].holds, "{:?}", c[0]);
        // 2% at N=1000, M=65537 does not count: M < 100 N there.
        assert!(c[1].holds, "{:?}", c[1]);
        assert!(c[2].holds, "{:?}", c[2]);
        r.maglev[1].remove_moved_pct = 2.1;
        r.maglev[0].build_ms = Stats::of(vec![12.0]);
        r.maglev[1].balance_max_dev_pct = 1.5;
        let c = r.checks();
        assert!(c.iter().all(|c| !c.holds), "{c:?}");
        assert!(ControlReport::default().checks().iter().all(|c| !c.holds));
    }
}
