//! Project automation for xdplb, run as `cargo xtask <command>` (an alias in
//! `.cargo/config.toml`).
//!
//! xtask builds on a fresh machine with nothing but a stable Rust toolchain: it depends on no
//! workspace crate (the agent's build script needs `bpf-linker`, which `setup` installs) and does
//! its work by running commands. Every command it runs is printed first (`+ ...`), streams its
//! output to the terminal, runs in the workspace root with `$CARGO_HOME/bin` on `PATH`, and a
//! failure names the command and its exit status.
//!
//! Commands and what each guarantees:
//! - `setup`: the nightly toolchain with `rust-src` and `clippy`, `clippy` and `rustfmt` on the
//!   default toolchain, `bpf-linker` built against nightly's own libLLVM, the Debian packages the
//!   tests use, bpffs at `/sys/fs/bpf`. Idempotent and fast when nothing is missing; one line per
//!   item; needs root only when packages or bpffs are missing. See [`setup`].
//! - `build`: `setup`, then `cargo build --release`: `target/release/xdplb`, with the XDP object
//!   embedded.
//! - `test`: the project's test command: setup, rustfmt, clippy (host and eBPF), release build,
//!   host unit tests, kernel and namespace tests; a table of steps and times at the end; non-zero
//!   exit on the first failure or if it ran over 30 minutes. See [`testsuite`].
//! - `demo`: `setup`, `cargo build --release --bins`, then `xdplb-demo --config
//!   configs/demo.toml --xdplb <target>/release/xdplb` plus any arguments after `--`.
//! - `bench`: `setup`, `cargo build --release --bins`, then `xdplb-bench --xdplb
//!   <target>/release/xdplb --out <target>/bench` (with `--quick`, `--only`) plus any arguments
//!   after `--`. Exit status 2 means the bench ran and a target was missed.

mod cmd;
mod elf;
mod setup;
mod testsuite;

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

use crate::cmd::{Ctx, run, target_dir};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "xdplb project automation: setup, build, test, bench, demo",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the build and tests need (idempotent)
    ///
    /// The nightly toolchain with rust-src and clippy, bpf-linker built against nightly's own
    /// LLVM, the Debian packages the tests use, bpffs at /sys/fs/bpf. Each item is checked first
    /// and only changed when missing. Root is needed only when packages or bpffs are missing.
    Setup,
    /// Run setup, then `cargo build --release` (the agent `target/release/xdplb`)
    Build,
    /// The project's test command: setup, lints, release build, unit tests, kernel tests
    ///
    /// Steps stop at the first failure; a table of steps and durations ends the run, which must
    /// finish within 30 minutes. The kernel and namespace tests need root.
    Test(testsuite::TestArgs),
    /// Run setup, build the binaries, then the demo (`xdplb-demo --config configs/demo.toml`)
    Demo {
        /// Extra arguments for xdplb-demo, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run setup, build the binaries, then the benchmarks (needs root)
    ///
    /// Data path (BPF_PROG_TEST_RUN against two floor programs), control plane (Maglev, change
    /// latency), end to end in namespaces (xdplb, nftables DNAT, HAProxy, no load balancer) and
    /// failover (client-visible outage when the VRRP master dies, xdplb [ha] vs keepalived).
    /// Prints tables and whether each target holds; writes bench.json and bench.svg into
    /// <target>/bench/. Exits with 2 if a target was missed.
    Bench {
        /// A reduced run of a few minutes.
        #[arg(long)]
        quick: bool,
        /// Only these sections: datapath, control, e2e, failover (comma-separated).
        #[arg(long)]
        only: Option<String>,
        /// Extra arguments for xdplb-bench, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run_command(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Printed here rather than returned: with RUST_BACKTRACE set, returning the error
            // prints anyhow's backtrace of xtask itself, which buries the failing command.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> Result<()> {
    let ctx = Ctx::new()?;
    match command {
        Command::Setup => setup::setup(&ctx),
        Command::Build => {
            setup::setup(&ctx)?;
            run(ctx.cmd("cargo").args(["build", "--release"]))
        }
        Command::Test(args) => testsuite::test(&ctx, &args),
        Command::Demo { args } => {
            let release = build_bins(&ctx)?;
            run(ctx
                .cmd(tool(&release, "xdplb-demo")?)
                .args(["--config", "configs/demo.toml", "--xdplb"])
                .arg(release.join("xdplb"))
                .args(args))
        }
        Command::Bench { quick, only, args } => {
            let release = build_bins(&ctx)?;
            let mut cmd = ctx.cmd(tool(&release, "xdplb-bench")?);
            cmd.arg("--xdplb")
                .arg(release.join("xdplb"))
                .arg("--out")
                .arg(target_dir(&ctx)?.join("bench"));
            if quick {
                cmd.arg("--quick");
            }
            if let Some(only) = only {
                cmd.args(["--only", &only]);
            }
            cmd.args(args);
            println!("+ {}", cmd::describe(&cmd));
            let status = cmd
                .status()
                .with_context(|| format!("could not run `{}`", cmd::describe(&cmd)))?;
            match status.code() {
                Some(0) => Ok(()),
                // A result, not a failure of the tool: the table above says which target.
                Some(2) => {
                    eprintln!("bench: finished, and at least one target was missed (MISSED above)");
                    std::process::exit(2)
                }
                _ => anyhow::bail!("command `{}` failed: {status}", cmd::describe(&cmd)),
            }
        }
    }
}

/// `setup`, then `cargo build --release --bins`; returns the release directory.
fn build_bins(ctx: &Ctx) -> Result<std::path::PathBuf> {
    setup::setup(ctx)?;
    run(ctx.cmd("cargo").args(["build", "--release", "--bins"]))?;
    Ok(target_dir(ctx)?.join("release"))
}

/// A binary of the lb-tests package in the release directory.
fn tool(release: &std::path::Path, name: &str) -> Result<std::path::PathBuf> {
    let path = release.join(name);
    if !path.is_file() {
        anyhow::bail!(
            "{} was not built: the lb-tests package should provide it as `[[bin]] name = \"{name}\"`",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_takes_a_filter_and_options() {
        let cli =
            Cli::try_parse_from(["xtask", "test", "--quick", "--no-setup", "maglev"]).unwrap();
        let Command::Test(args) = cli.command else {
            panic!("not test: {cli:?}")
        };
        assert!(args.quick && args.no_setup);
        assert_eq!(args.filter.as_deref(), Some("maglev"));
    }

    #[test]
    fn bench_takes_quick_only_and_extra_arguments() {
        let cli = Cli::try_parse_from([
            "xtask", "bench", "--quick", "--only", "datapath", "--", "--cpu", "0",
        ])
        .unwrap();
        let Command::Bench { quick, only, args } = cli.command else {
            panic!("not bench: {cli:?}")
        };
        assert!(quick);
        assert_eq!(only.as_deref(), Some("datapath"));
        assert_eq!(args, ["--cpu", "0"]);
    }

    #[test]
    fn demo_passes_arguments_after_double_dash() {
        let cli = Cli::try_parse_from(["xtask", "demo", "--", "--duration", "5"]).unwrap();
        let Command::Demo { args } = cli.command else {
            panic!("not demo: {cli:?}")
        };
        assert_eq!(args, ["--duration", "5"]);
    }
}
