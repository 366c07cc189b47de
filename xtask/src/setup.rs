//! `cargo xtask setup`: everything the build and the tests need that cargo does not fetch.
//!
//! Items, in order, each checked first and changed only when missing or wrong:
//! 1. the `nightly` toolchain (`--profile minimal`);
//! 2. toolchain components: `rust-src` (for `-Z build-std=core`) and `clippy` on nightly (the
//!    eBPF lint step); `clippy` and `rustfmt` on the toolchain running xtask (the host lints);
//! 3. `bpf-linker`, built against the nightly toolchain's own libLLVM (see [`bpf_linker`]);
//! 4. the Debian packages in [`DEBIAN_PACKAGES`] (root);
//! 5. the system services of [`SERVICES_OFF`] stopped and disabled, when item 4 just installed
//!    their package (root);
//! 6. bpffs mounted at `/sys/fs/bpf` (root).
//!
//! Guarantees: one line per item saying what was done or why it was skipped; a second run right
//! after a successful one changes nothing and takes well under two seconds (it only runs cheap
//! queries: rustup, rustc, dpkg-query, `bpf-linker --version`, ldd). When not root and item 4 or 6
//! needs work (item 5 only follows item 4), it fails before changing anything and names those
//! items. The first failing command stops it, named with its exit status.
//!
//! Not guaranteed: anything outside Debian-like systems (packages are queried with dpkg and
//! installed with apt-get); removing what an older setup installed; switching off a service of
//! [`SERVICES_OFF`] whose package was installed some other way, or by a run that failed between
//! items 4 and 5 (`update-rc.d NAME disable` and `invoke-rc.d NAME stop` do it by hand).

use std::{
    fs,
    io::ErrorKind,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{Ctx, capture, fmt_duration, is_root, probe, run};

/// Debian packages the tests, the demo and the bench use; extend this list, not the code.
pub const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip, ip netns, ss: namespace topologies"),
    ("ethtool", "turning offloads off on veth"),
    ("iputils-ping", "ping: reachability checks"),
    ("procps", "sysctl, ps"),
    ("tcpdump", "packet captures when a test fails"),
    ("binutils", "readelf, objdump: inspecting the eBPF object"),
    ("nftables", "nft: the kernel DNAT peer of the bench"),
    ("haproxy", "the user-space peer of the bench"),
    (
        "bpftool",
        "inspecting loaded programs (run-time stats, instructions) when profiling",
    ),
    (
        "keepalived",
        "the VRRP peer of the HA interop tests and the failover bench",
    ),
];

/// Packages of [`DEBIAN_PACKAGES`] whose installation enables a system service that setup stops
/// and disables again right after installing them, and why.
///
/// Only after setup installed the package itself: a service the administrator had set up before
/// is theirs to keep.
pub const SERVICES_OFF: &[(&str, &str)] = &[(
    "keepalived",
    // Measured on bookworm: the postinst enables keepalived.service and the SysV rc links (it
    // starts nothing while /etc/keepalived/keepalived.conf is absent, but would at the next boot
    // once someone writes one). The tests and the bench only need the binary: they run their own
    // instances in namespaces with their own configs and pid files, and a host-wide keepalived
    // would run VRRP on the real LAN and take addresses there.
    "the tests and the bench run their own instances; a host-wide one would run VRRP on the LAN",
)];

/// The toolchain that builds the eBPF object.
const NIGHTLY: &str = "nightly";
/// Components each toolchain needs: (toolchain, or None for the one running xtask; components).
const COMPONENTS: &[(Option<&str>, &[&str])] = &[
    (Some(NIGHTLY), &["rust-src", "clippy"]),
    (None, &["clippy", "rustfmt"]),
];
/// Where bpffs must be mounted (aya pins maps under it).
const BPFFS: &str = "/sys/fs/bpf";

/// How one item ended.
enum Outcome {
    /// Nothing to do; the text says what is there.
    Present(String),
    /// The item was installed or fixed; the text says what was done.
    Changed(String),
}

struct Report {
    present: usize,
    changed: usize,
}

impl Report {
    fn record(&mut self, item: &str, outcome: Outcome) {
        match outcome {
            Outcome::Present(what) => {
                self.present += 1;
                println!("setup: {item:<28} skipped, already present: {what}");
            }
            Outcome::Changed(what) => {
                self.changed += 1;
                println!("setup: {item:<28} done: {what}");
            }
        }
    }
}

/// Runs every item; see the module docs.
pub fn setup(ctx: &Ctx) -> Result<()> {
    let start = Instant::now();

    // Items needing root are checked first, so a non-root run fails before any slow work.
    let missing = missing_packages(ctx)?;
    let mounted = bpffs_mounted()?;
    if !is_root() {
        let mut needs_root = Vec::new();
        if !missing.is_empty() {
            needs_root.push(format!(
                "4 (install Debian packages: {})",
                missing.join(" ")
            ));
        }
        if !mounted {
            needs_root.push(format!("6 (mount bpffs at {BPFFS})"));
        }
        if !needs_root.is_empty() {
            bail!(
                "setup needs root for step {}; run `cargo xtask setup` as root",
                needs_root.join(" and step ")
            );
        }
    }
    if !ctx.cargo_bin_on_user_path {
        println!(
            "setup: warning: {} is not on your PATH; xtask adds it for the commands it runs, \
             but a plain `cargo build` will not find bpf-linker: add it to PATH",
            ctx.cargo_home.join("bin").display()
        );
    }

    let mut report = Report {
        present: 0,
        changed: 0,
    };
    report.record("nightly toolchain", nightly_toolchain(ctx)?);
    for (toolchain, components) in COMPONENTS {
        let item = format!("{} components", toolchain.unwrap_or("default toolchain"));
        report.record(&item, toolchain_components(ctx, *toolchain, components)?);
    }
    report.record("bpf-linker", bpf_linker(ctx)?);
    report.record("Debian packages", debian_packages(ctx, &missing)?);
    report.record("system services", services_off(ctx, &missing)?);
    report.record("bpffs", bpffs(ctx, mounted)?);
    println!(
        "setup: finished in {}: {} changed, {} already present",
        fmt_duration(start.elapsed()),
        report.changed,
        report.present
    );
    Ok(())
}

fn nightly_toolchain(ctx: &Ctx) -> Result<Outcome> {
    let list = capture(ctx.cmd("rustup").args(["toolchain", "list"]))?;
    if let Some(name) = find_nightly(&list) {
        return Ok(Outcome::Present(name.to_owned()));
    }
    run(ctx
        .cmd("rustup")
        .args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    Ok(Outcome::Changed(format!(
        "installed {NIGHTLY} (profile minimal)"
    )))
}

/// The undated nightly in `rustup toolchain list` output (`nightly-<host>`, maybe `(default)`).
fn find_nightly(list: &str) -> Option<&str> {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .find(|name| {
            *name == NIGHTLY
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

fn toolchain_components(ctx: &Ctx, toolchain: Option<&str>, wanted: &[&str]) -> Result<Outcome> {
    let with_toolchain = |args: &[&str]| {
        let mut cmd = ctx.cmd("rustup");
        cmd.args(args);
        if let Some(t) = toolchain {
            cmd.args(["--toolchain", t]);
        }
        cmd
    };
    let installed = capture(&mut with_toolchain(&["component", "list", "--installed"]))?;
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| !component_installed(&installed, c))
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::Present(wanted.join(" ")));
    }
    let mut args = vec!["component", "add"];
    args.extend(&missing);
    run(&mut with_toolchain(&args))?;
    Ok(Outcome::Changed(format!("added {}", missing.join(" "))))
}

/// Whether `rustup component list --installed` lists `component` (`rust-src`, or with a target
/// suffix: `clippy-x86_64-unknown-linux-gnu`). Good for the names in [`COMPONENTS`], none of
/// which is followed by `-` in another component's name.
fn component_installed(list: &str, component: &str) -> bool {
    list.lines().map(str::trim).any(|l| {
        l.strip_prefix(component)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    })
}

/// `bpf-linker` must link with the same LLVM as the nightly rustc that emits the bitcode.
///
/// The nightly toolchain ships its LLVM as `$SYSROOT/lib/libLLVM.so.<version>-rust-<rustc>`.
/// A lasting prefix `P = $CARGO_HOME/xdplb-llvm/<SONAME>` gets `lib/libLLVM.so` and
/// `lib/<SONAME>` symlinks to it, and `LLVM_PREFIX=P cargo install bpf-linker --features
/// llvm-<major>` builds a binary that finds libLLVM through an rpath into `P/lib`. The binary is
/// right when it runs and `ldd` resolves its libLLVM under `P`; a nightly update changes the
/// SONAME, hence `P`, hence triggers a rebuild.
fn bpf_linker(ctx: &Ctx) -> Result<Outcome> {
    let llvm = NightlyLlvm::find(ctx)?;
    let reason = match check_bpf_linker(ctx, &llvm.prefix)? {
        Ok(found) => return Ok(Outcome::Present(found)),
        Err(reason) => reason,
    };
    println!(
        "setup: bpf-linker: building against LLVM {} ({}), because {reason}",
        llvm.major, llvm.soname
    );
    let lib_dir = llvm.prefix.join("lib");
    fs::create_dir_all(&lib_dir).with_context(|| format!("cannot create {}", lib_dir.display()))?;
    for name in ["libLLVM.so", llvm.soname.as_str()] {
        ensure_symlink(&lib_dir.join(name), &llvm.library)?;
    }
    let root = ctx.cargo_home.clone();
    run(ctx
        .cmd("cargo")
        .env("LLVM_PREFIX", &llvm.prefix)
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{}", llvm.major)])
        .arg("--root")
        .arg(&root))?;
    match check_bpf_linker(ctx, &llvm.prefix)? {
        Ok(found) => Ok(Outcome::Changed(format!("installed {found}"))),
        Err(reason) => bail!(
            "bpf-linker was installed into {} but is still not usable: {reason}",
            root.join("bin").display()
        ),
    }
}

/// The nightly toolchain's LLVM and the prefix bpf-linker is built against.
struct NightlyLlvm {
    major: String,
    /// The real library in the nightly sysroot.
    library: PathBuf,
    soname: String,
    /// `$CARGO_HOME/xdplb-llvm/<SONAME>`.
    prefix: PathBuf,
}

impl NightlyLlvm {
    fn find(ctx: &Ctx) -> Result<Self> {
        let plus = format!("+{NIGHTLY}");
        let version = capture(ctx.cmd("rustc").args([plus.as_str(), "-vV"]))?;
        let major = llvm_major(&version)
            .with_context(|| format!("no `LLVM version: N...` line in `rustc {plus} -vV`"))?
            .to_owned();
        let sysroot = capture(ctx.cmd("rustc").args([plus.as_str(), "--print", "sysroot"]))?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let library = find_libllvm(&lib_dir)?;
        let soname = crate::elf::soname(&library)?;
        let prefix = ctx.cargo_home.join("xdplb-llvm").join(&soname);
        Ok(Self {
            major,
            library,
            soname,
            prefix,
        })
    }
}

/// The major version in `rustc -vV`'s `LLVM version: 22.1.4` line.
fn llvm_major(rustc_vv: &str) -> Option<&str> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))?
        .trim();
    let major = version.split('.').next()?;
    (!major.is_empty() && major.chars().all(|c| c.is_ascii_digit())).then_some(major)
}

/// The real `libLLVM.so.*` ELF file in `lib_dir` (not the `libLLVM-N-rust-*.so` linker script).
fn find_libllvm(lib_dir: &Path) -> Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot list {}", lib_dir.display()))?;
    let mut found = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let is_llvm = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libLLVM.so."));
        if is_llvm && path.is_file() && crate::elf::is_elf(&path) {
            found.push(path);
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no libLLVM.so.* ELF library in {}: does this nightly ship its LLVM as a shared \
             library?",
            lib_dir.display()
        ),
        several => bail!(
            "several libLLVM.so.* libraries in {}: {several:?}",
            lib_dir.display()
        ),
    }
}

/// `Ok(description)` when the `bpf-linker` the builds will use is right for `prefix`, else
/// `Err(why not)`.
fn check_bpf_linker(ctx: &Ctx, prefix: &Path) -> Result<Result<String, String>> {
    let Some(path) = ctx.which("bpf-linker") else {
        return Ok(Err("it is not on PATH".to_owned()));
    };
    let version = probe(ctx.cmd(&path).arg("--version"))?;
    if !version.status.success() {
        return Ok(Err(format!(
            "`{} --version` failed: {}",
            path.display(),
            version.status
        )));
    }
    let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
    let ldd = probe(ctx.cmd("ldd").arg(&path))?;
    let ldd_out = String::from_utf8_lossy(&ldd.stdout);
    let resolved = match ldd_libllvm(&ldd_out) {
        None => {
            return Ok(Err(format!(
                "`ldd {}` shows no libLLVM (built against another LLVM)",
                path.display()
            )));
        }
        Some(None) => {
            return Ok(Err(format!(
                "`ldd {}` cannot find its libLLVM",
                path.display()
            )));
        }
        Some(Some(resolved)) => resolved,
    };
    if !same_dir(resolved.parent(), &prefix.join("lib")) {
        return Ok(Err(format!(
            "{} uses {}, not the nightly LLVM under {}",
            path.display(),
            resolved.display(),
            prefix.display()
        )));
    }
    Ok(Ok(format!(
        "{} ({version}) uses {}",
        path.display(),
        resolved.display()
    )))
}

/// The libLLVM line of `ldd` output: `None` if there is none, `Some(None)` if "not found",
/// `Some(Some(path))` where it resolved.
fn ldd_libllvm(ldd: &str) -> Option<Option<PathBuf>> {
    let line = ldd
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("libLLVM"))?;
    let target = line.split_once("=>").map(|(_, t)| t.trim())?;
    if target.starts_with("not found") {
        return Some(None);
    }
    let path = target.split(" (").next().unwrap_or(target).trim();
    Some(Some(PathBuf::from(path)))
}

fn same_dir(a: Option<&Path>, b: &Path) -> bool {
    let Some(a) = a else { return false };
    a == b
        || matches!(
            (fs::canonicalize(a), fs::canonicalize(b)),
            (Ok(x), Ok(y)) if x == y
        )
}

/// Makes `link` a symlink to `target`, replacing whatever is there if it points elsewhere.
fn ensure_symlink(link: &Path, target: &Path) -> Result<()> {
    match fs::read_link(link) {
        Ok(current) if current == target => return Ok(()),
        Ok(_) => fs::remove_file(link)?,
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(_) => {
            fs::remove_file(link).with_context(|| format!("cannot replace {}", link.display()))?
        }
    }
    symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

/// Packages of [`DEBIAN_PACKAGES`] that dpkg does not report as "install ok installed".
fn missing_packages(ctx: &Ctx) -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    for (package, _) in DEBIAN_PACKAGES {
        let out = probe(ctx.cmd("dpkg-query").args(["-W", "-f=${Status}", package]))
            .context("is this a Debian-like system? setup queries packages with dpkg")?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(*package);
        }
    }
    Ok(missing)
}

fn debian_packages(ctx: &Ctx, missing: &[&str]) -> Result<Outcome> {
    if missing.is_empty() {
        let all: Vec<&str> = DEBIAN_PACKAGES.iter().map(|(p, _)| *p).collect();
        return Ok(Outcome::Present(all.join(" ")));
    }
    run(ctx.cmd("apt-get").arg("update"))?;
    run(ctx
        .cmd("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(missing))?;
    Ok(Outcome::Changed(format!("installed {}", missing.join(" "))))
}

/// Stops and disables the services of [`SERVICES_OFF`] whose package is in `installed` (what
/// [`debian_packages`] just installed).
fn services_off(ctx: &Ctx, installed: &[&str]) -> Result<Outcome> {
    let services: Vec<(&str, &str)> = SERVICES_OFF
        .iter()
        .copied()
        .filter(|(name, _)| installed.contains(name))
        .collect();
    if services.is_empty() {
        return Ok(Outcome::Present(
            "nothing installed by this run enables a service".to_owned(),
        ));
    }
    let mut done = Vec::new();
    for (name, why) in services {
        // Debian's own tools, which the postinst used, so they cover systemd and SysV init alike:
        // invoke-rc.d stops through systemctl when systemd runs, and honours policy-rc.d where
        // starting was denied anyway (containers); update-rc.d removes the systemd unit's links
        // (through systemctl when present) and the rc links.
        run(ctx.cmd("invoke-rc.d").args([name, "stop"]))?;
        run(ctx.cmd("update-rc.d").args([name, "disable"]))?;
        done.push(format!("{name} ({why})"));
    }
    Ok(Outcome::Changed(format!(
        "stopped and disabled {}",
        done.join(", ")
    )))
}

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(has_bpffs(&mounts))
}

/// Whether a `bpf` filesystem is mounted at [`BPFFS`] in `/proc/mounts` text.
fn has_bpffs(mounts: &str) -> bool {
    mounts.lines().any(|l| {
        let mut fields = l.split_whitespace();
        let (_dev, point, kind) = (fields.next(), fields.next(), fields.next());
        point == Some(BPFFS) && kind == Some("bpf")
    })
}

fn bpffs(ctx: &Ctx, mounted: bool) -> Result<Outcome> {
    if mounted {
        return Ok(Outcome::Present(format!("bpf filesystem at {BPFFS}")));
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
    run(ctx.cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    if !bpffs_mounted()? {
        bail!("`mount -t bpf bpf {BPFFS}` succeeded but /proc/mounts shows no bpf at {BPFFS}");
    }
    Ok(Outcome::Changed(format!(
        "mounted bpf filesystem at {BPFFS}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_undated_nightly() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-2024-01-01-x86_64-unknown-linux-gnu\n\
                    nightly-x86_64-unknown-linux-gnu\n";
        assert_eq!(find_nightly(list), Some("nightly-x86_64-unknown-linux-gnu"));
        assert_eq!(
            find_nightly("nightly-2024-01-01-x86_64-unknown-linux-gnu\n"),
            None
        );
        assert_eq!(
            find_nightly("stable-x86_64-unknown-linux-gnu (default)\n"),
            None
        );
    }

    #[test]
    fn reads_installed_components() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n\
                    rust-std-x86_64-unknown-linux-gnu\n";
        assert!(component_installed(list, "rust-src"));
        assert!(component_installed(list, "clippy"));
        assert!(!component_installed(list, "rustfmt"));
        assert!(!component_installed(list, "rust-docs"));
    }

    #[test]
    fn parses_the_llvm_major() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv), Some("22"));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }

    #[test]
    fn parses_ldd() {
        let ok = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1-rust-1.97.0-nightly => \
                  /root/.cargo/xdplb-llvm/S/lib/libLLVM.so.22.1-rust-1.97.0-nightly \
                  (0x00007ff006c00000)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x1)\n";
        assert_eq!(
            ldd_libllvm(ok),
            Some(Some(PathBuf::from(
                "/root/.cargo/xdplb-llvm/S/lib/libLLVM.so.22.1-rust-1.97.0-nightly"
            )))
        );
        let missing = "\tlibLLVM.so.22.1-rust-1.96.0-nightly => not found\n";
        assert_eq!(ldd_libllvm(missing), Some(None));
        assert_eq!(ldd_libllvm("\tlibc.so.6 => /lib/libc.so.6 (0x1)\n"), None);
    }

    #[test]
    fn finds_bpffs_in_proc_mounts() {
        let mounts = "sysfs /sys sysfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(has_bpffs(mounts));
        assert!(!has_bpffs("sysfs /sys sysfs rw 0 0\n"));
        assert!(!has_bpffs("none /sys/fs/bpf tmpfs rw 0 0\n"));
    }
}
