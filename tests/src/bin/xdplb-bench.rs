//! `cargo xtask bench`: measures the data path, the control plane and the whole system side by
//! side with the alternatives, in one run, and prints whether each of the project's targets holds.
//!
//! Output: tables on the terminal, `bench.json` and `bench.svg` in `--out` (by default
//! `target/bench/`). Needs root (BPF, network namespaces). Everything it creates (namespaces,
//! processes, pins) is removed again, also on failure.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use lb_tests::{
    bench::{
        Machine, Report,
        control::{self, ControlOptions},
        datapath::{self, DatapathOptions},
        e2e::{self, E2eOptions},
        failover::{self, FailoverOptions},
        report,
    },
    netns::require_privileges,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    Datapath,
    Control,
    E2e,
    Failover,
}

#[derive(Parser)]
#[command(
    about = "Benchmarks xdplb: data path, control plane, end to end against the alternatives"
)]
struct Args {
    /// A reduced run that takes a few minutes (fewer rounds, shorter workloads).
    #[arg(long)]
    quick: bool,
    /// Run only these sections (comma-separated); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Directory for bench.json and bench.svg.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// The xdplb binary (end-to-end and failover sections).
    #[arg(long, default_value = "target/release/xdplb")]
    xdplb: PathBuf,
    /// CPU the data-path measurements are pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Rounds per measurement (default: 5, or 3 with --quick for the end-to-end and failover
    /// sections).
    #[arg(long)]
    rounds: Option<usize>,
}

// Counts heap use, so the control-plane section can report the peak memory of a table build.
#[global_allocator]
static ALLOC: lb_tests::bench::control::CountingAlloc = lb_tests::bench::control::CountingAlloc;

fn main() -> ExitCode {
    let args = Args::parse();
    if !require_privileges("xdplb-bench") {
        eprintln!("the benchmarks need root (BPF_PROG_TEST_RUN, network namespaces, XDP)");
        return ExitCode::FAILURE;
    }
    match bench(&args) {
        Ok(all_hold) => {
            if all_hold {
                ExitCode::SUCCESS
            } else {
                // Missed targets are results, not failures of the tool: the exit status says so
                // for scripts, the table says which.
                ExitCode::from(2)
            }
        }
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(args: &Args) -> Result<bool> {
    let wanted = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let started = Instant::now();
    let mut report = Report {
        machine: machine(),
        quick: args.quick,
        ..Default::default()
    };
    if wanted(Section::Datapath) {
        eprintln!("== data path (BPF_PROG_TEST_RUN, CPU {})", args.cpu);
        let opts = DatapathOptions {
            cpu: args.cpu,
            rounds: args.rounds.unwrap_or(5),
            iterations: 1_000_000,
        };
        report.datapath = Some(datapath::run(&opts).context("data-path benchmark")?);
    }
    if wanted(Section::Control) {
        eprintln!("== control plane");
        let opts = ControlOptions {
            rounds: args.rounds.unwrap_or(5),
            quick: args.quick,
        };
        report.control = Some(control::run(&opts).context("control-plane benchmark")?);
    }
    if wanted(Section::E2e) {
        eprintln!("== end to end (namespaces)");
        let opts = E2eOptions {
            rounds: args.rounds.unwrap_or(if args.quick { 3 } else { 5 }),
            seconds: if args.quick { 2.0 } else { 5.0 },
            concurrency: 16,
            rtt_samples: if args.quick { 1000 } else { 5000 },
            xdplb: args.xdplb.clone(),
        };
        report.e2e = Some(e2e::run(&opts).context("end-to-end benchmark")?);
    }
    if wanted(Section::Failover) {
        eprintln!("== failover (VRRP: xdplb [ha] and keepalived, namespaces)");
        let opts = FailoverOptions {
            rounds: args.rounds.unwrap_or(if args.quick { 3 } else { 5 }),
            xdplb: args.xdplb.clone(),
        };
        report.failover = Some(failover::run(&opts).context("failover benchmark")?);
    }
    if let Some(d) = &report.datapath {
        report.checks.extend(d.checks());
    }
    if let Some(e) = &report.e2e {
        report.checks.extend(e.checks());
    }
    if let Some(c) = &report.control {
        report.checks.extend(c.checks());
    }
    if let Some(f) = &report.failover {
        report.checks.extend(f.checks());
    }
    print!("{}", report::render_text(&report));
    for path in report::write_files(&report, &args.out)? {
        println!("wrote {}", path.display());
    }
    println!("bench took {:.0} s", started.elapsed().as_secs_f64());
    Ok(report.checks.iter().all(|c| c.holds))
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let output = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let mut commit = output(Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    if !commit.is_empty() && !output(Command::new("git").args(["status", "--porcelain"])).is_empty()
    {
        commit.push_str("-dirty");
    }
    Machine {
        kernel: output(Command::new("uname").arg("-r")),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib,
        commit,
        date: output(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
    }
}
