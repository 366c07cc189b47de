//! `cargo xtask test`: the project's one test command (the README and CI call it).
//!
//! Steps, in order, each announced with a header and timed; the first failure stops the run:
//! 1. `setup` (skipped with `--no-setup`);
//! 2. `cargo fmt --all --check` (skipped with `--quick`);
//! 3. `cargo clippy --release --all-targets -- -D warnings` on the default members, then the
//!    eBPF crate with nightly for `bpfel-unknown-none` (both skipped with `--quick`);
//! 4. `cargo build --release --bins`;
//! 5. host unit tests of `lb-common`, `lb-userspace` and `xtask`;
//! 6. kernel and namespace tests (`lb-tests`, one thread, root), with `XDPLB_BIN` set to the
//!    absolute path of the release agent in cargo's target directory.
//!
//! A filter is passed to steps 5 and 6 as cargo test's name filter. The run ends with a table of
//! every step (passed, FAILED, skipped or not run) and its duration, and the total. It exits
//! non-zero if a step failed or if the whole run took longer than [`BUDGET`].

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{Ctx, fmt_duration, is_root, run, target_dir};

/// The whole test run must finish within this.
pub const BUDGET: Duration = Duration::from_secs(30 * 60);

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    /// Skip the lint steps (rustfmt and clippy).
    #[arg(long)]
    pub quick: bool,
    /// Skip `setup` (toolchains, bpf-linker, packages, bpffs).
    #[arg(long)]
    pub no_setup: bool,
    /// Only run tests whose name contains this (host unit tests and kernel tests).
    pub filter: Option<String>,
}

#[derive(Clone, Copy)]
enum Step {
    Setup,
    Fmt,
    Clippy,
    ClippyEbpf,
    Build,
    UnitTests,
    KernelTests,
}

impl Step {
    const ALL: [Step; 7] = [
        Step::Setup,
        Step::Fmt,
        Step::Clippy,
        Step::ClippyEbpf,
        Step::Build,
        Step::UnitTests,
        Step::KernelTests,
    ];

    fn name(self) -> &'static str {
        match self {
            Step::Setup => "setup",
            Step::Fmt => "rustfmt",
            Step::Clippy => "clippy (host)",
            Step::ClippyEbpf => "clippy (lb-ebpf, nightly)",
            Step::Build => "build --release --bins",
            Step::UnitTests => "host unit tests",
            Step::KernelTests => "kernel and namespace tests",
        }
    }

    /// Why the options leave this step out, if they do.
    fn skipped_by(self, args: &TestArgs) -> Option<&'static str> {
        match self {
            Step::Setup if args.no_setup => Some("--no-setup"),
            Step::Fmt | Step::Clippy | Step::ClippyEbpf if args.quick => Some("--quick"),
            _ => None,
        }
    }

    fn run(self, ctx: &Ctx, args: &TestArgs) -> Result<()> {
        let filter = args.filter.as_deref();
        match self {
            Step::Setup => crate::setup::setup(ctx),
            Step::Fmt => run(ctx.cmd("cargo").args(["fmt", "--all", "--check"])),
            Step::Clippy => run(ctx.cmd("cargo").args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])),
            // The eBPF crate is outside the default members and only builds for the BPF target.
            Step::ClippyEbpf => run(ctx.cmd("cargo").args([
                "+nightly",
                "clippy",
                "--release",
                "-p",
                "lb-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])),
            Step::Build => run(ctx.cmd("cargo").args(["build", "--release", "--bins"])),
            Step::UnitTests => {
                let mut cmd = ctx.cmd("cargo");
                cmd.args(["test", "--release"])
                    .args(["-p", "lb-common", "-p", "lb-userspace", "-p", "xtask"])
                    .args(filter);
                run(&mut cmd)
            }
            Step::KernelTests => {
                if !is_root() {
                    bail!(
                        "the kernel and namespace tests need root (network namespaces, XDP); \
                         run `cargo xtask test` as root"
                    );
                }
                let agent = agent_binary(ctx)?;
                let mut cmd = ctx.cmd("cargo");
                cmd.env("XDPLB_BIN", &agent)
                    .args(["test", "--release", "-p", "lb-tests"])
                    .args(filter)
                    .args(["--", "--test-threads=1"]);
                run(&mut cmd)
            }
        }
    }
}

/// `<target dir>/release/xdplb`, which step 4 built.
fn agent_binary(ctx: &Ctx) -> Result<PathBuf> {
    let agent = target_dir(ctx)?.join("release").join("xdplb");
    if !agent.is_file() {
        bail!(
            "{} does not exist; the build step should have built it",
            agent.display()
        );
    }
    Ok(agent)
}

enum StepResult {
    Passed(Duration),
    Failed(Duration),
    Skipped(&'static str),
    NotRun,
}

/// Runs the steps; see the module docs.
pub fn test(ctx: &Ctx, args: &TestArgs) -> Result<()> {
    let start = Instant::now();
    let total_steps = Step::ALL.len();
    let mut results = Vec::with_capacity(total_steps);
    let mut failure = None;
    for (i, step) in Step::ALL.into_iter().enumerate() {
        if failure.is_some() {
            results.push((step, StepResult::NotRun));
            continue;
        }
        if let Some(option) = step.skipped_by(args) {
            println!(
                "==> [{}/{total_steps}] {}: skipped ({option})",
                i + 1,
                step.name()
            );
            results.push((step, StepResult::Skipped(option)));
            continue;
        }
        println!("\n==> [{}/{total_steps}] {}", i + 1, step.name());
        let step_start = Instant::now();
        let outcome = step.run(ctx, args);
        let took = step_start.elapsed();
        match outcome {
            Ok(()) => {
                println!("<== {}: passed in {}", step.name(), fmt_duration(took));
                results.push((step, StepResult::Passed(took)));
            }
            Err(e) => {
                println!("<== {}: FAILED after {}", step.name(), fmt_duration(took));
                results.push((step, StepResult::Failed(took)));
                failure = Some((step, e));
            }
        }
    }
    let total = start.elapsed();
    print_table(&results, total);

    if let Some((step, e)) = failure {
        return Err(e)
            .with_context(|| format!("`cargo xtask test` failed at step `{}`", step.name()));
    }
    if total > BUDGET {
        bail!(
            "`cargo xtask test` took {}, over its budget of {}",
            fmt_duration(total),
            fmt_duration(BUDGET)
        );
    }
    Ok(())
}

fn print_table(results: &[(Step, StepResult)], total: Duration) {
    println!("\n{:<28} {:<22} {:>8}", "step", "result", "time");
    for (step, result) in results {
        let (what, time) = match result {
            StepResult::Passed(d) => ("passed".to_owned(), fmt_duration(*d)),
            StepResult::Failed(d) => ("FAILED".to_owned(), fmt_duration(*d)),
            StepResult::Skipped(option) => (format!("skipped ({option})"), "-".to_owned()),
            StepResult::NotRun => ("not run".to_owned(), "-".to_owned()),
        };
        println!("{:<28} {what:<22} {time:>8}", step.name());
    }
    println!(
        "{:<28} {:<22} {:>8}  (budget {})",
        "total",
        "",
        fmt_duration(total),
        fmt_duration(BUDGET)
    );
}
