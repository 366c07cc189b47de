//! `xdplb`: the command line. Thin: parsing arguments and printing; the work is in the library.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::{
    agent::{self, RunOptions},
    api::{self, Client},
    config::{self, ConfigError, XdpModeSetting},
    logging::{self, LogLevel},
    maglev,
    status::{self, WhichBackend},
};

const DEFAULT_SOCKET: &str = "/run/xdplb/xdplb.sock";

#[derive(Parser)]
#[command(
    name = "xdplb",
    version,
    about = "XDP layer-4 load balancer (Maglev, direct server return)",
    long_about = None
)]
struct Cli {
    /// The agent's API socket (status, which-backend, log-level talk to it).
    #[arg(long, global = true, env = "XDPLB_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Driver,
    Generic,
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the data path, fill it from the config, and keep it up to date until
    /// SIGINT/SIGTERM.
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// XDP attach mode; overrides [dataplane] xdp_mode. auto = driver, falling back to
        /// generic with a warning.
        #[arg(long, value_enum)]
        xdp_mode: Option<ModeArg>,
        /// On exit, leave the program attached and pinned under /sys/fs/bpf/xdplb/ so traffic
        /// keeps flowing; the next `xdplb run` takes it over.
        #[arg(long)]
        keep_forwarding: bool,
        /// off, error, warn, info, debug or trace (also changeable at run time with
        /// `xdplb log-level`).
        #[arg(long, default_value = "info")]
        log_level: LogLevel,
        /// Seconds to wait for backend MAC addresses before attaching.
        #[arg(long, default_value_t = 3.0)]
        mac_wait: f64,
    },
    /// Validate a config file without touching the system.
    CheckConfig {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show services, backends and counters of the running agent.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Which backend a flow goes to, computed with the kernel's hash and table.
    WhichBackend {
        /// The service, ADDRESS:PORT/PROTO, e.g. 10.0.0.100:80/tcp.
        service: String,
        /// The client, ADDRESS:PORT.
        source: String,
        /// Compute from this config instead of asking the running agent (assumes every
        /// backend is reachable).
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Change the log level of the running agent and its data path.
    LogLevel { level: LogLevel },
    /// Print the running agent's Prometheus metrics (what `GET /metrics` on the API serves).
    Metrics,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xdplb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            config,
            xdp_mode,
            keep_forwarding,
            log_level,
            mac_wait,
        } => {
            logging::init(log_level);
            let loaded = load_config(&config)?;
            for w in &loaded.warnings {
                tracing::warn!("{}", w.in_file(&config));
            }
            let opts = RunOptions {
                xdp_mode: xdp_mode.map(|m| match m {
                    ModeArg::Driver => XdpModeSetting::Driver,
                    ModeArg::Generic => XdpModeSetting::Generic,
                    ModeArg::Auto => XdpModeSetting::Auto,
                }),
                keep_forwarding,
                log_level,
                mac_wait: Duration::try_from_secs_f64(mac_wait)
                    .context("--mac-wait must be a non-negative number of seconds")?,
            };
            runtime()?.block_on(agent::run(
                loaded.config,
                opts,
                std::future::pending::<()>(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file, json } => check_config(&file, json),
        Command::Status { json } => {
            let s = runtime()?.block_on(Client::new(&cli.socket).status())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::WhichBackend {
            service,
            source,
            config,
            json,
        } => {
            let w = match config {
                Some(path) => which_offline(&path, &service, &source)?,
                None => runtime()?
                    .block_on(Client::new(&cli.socket).which_backend(&service, &source))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                print!("{}", status::render_which(&w));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::LogLevel { level } => {
            runtime()?.block_on(Client::new(&cli.socket).set_log_level(level))?;
            println!("log level set to {level}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics => {
            print!(
                "{}",
                runtime()?.block_on(Client::new(&cli.socket).metrics())?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load_config(path: &Path) -> anyhow::Result<config::Loaded> {
    config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn check_config(file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let result = config::load(file);
    if json {
        let value = match &result {
            Ok(l) => serde_json::json!({
                "file": file,
                "valid": true,
                "vips": l.config.vips.len(),
                "backends": l.config.vips.iter().map(|v| v.backends.len()).sum::<usize>(),
                "warnings": l.warnings.iter().map(problem_json).collect::<Vec<_>>(),
                "errors": [],
            }),
            Err(ConfigError::Invalid { problems, .. }) => serde_json::json!({
                "file": file,
                "valid": false,
                "errors": problems.iter().map(problem_json).collect::<Vec<_>>(),
            }),
            Err(e) => {
                serde_json::json!({"file": file, "valid": false, "errors": [{"path": "", "message": e.to_string()}]})
            }
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        match &result {
            Ok(l) => {
                for w in &l.warnings {
                    println!("warning: {}", w.in_file(file));
                }
                println!(
                    "{}: OK ({} vip(s), {} backend(s))",
                    file.display(),
                    l.config.vips.len(),
                    l.config
                        .vips
                        .iter()
                        .map(|v| v.backends.len())
                        .sum::<usize>()
                );
            }
            Err(e) => eprintln!("{e}"),
        }
    }
    Ok(if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn problem_json(p: &config::Problem) -> serde_json::Value {
    serde_json::json!({
        "path": p.path,
        "message": p.message,
        "line": p.location.map(|l| l.line),
        "column": p.location.map(|l| l.column),
    })
}

/// `which-backend --config`: the table as the config alone defines it (every backend assumed
/// reachable), with the data path's own flow hash.
fn which_offline(path: &Path, service: &str, source: &str) -> anyhow::Result<WhichBackend> {
    let loaded = load_config(path)?;
    let (vip_addr, proto) = api::parse_service(service).map_err(|e| anyhow::anyhow!(e))?;
    let src: SocketAddrV4 = source
        .parse()
        .with_context(|| format!("`{source}` is not ADDRESS:PORT (IPv4)"))?;
    let Some(vip) =
        loaded.config.vips.iter().find(|v| {
            v.address == *vip_addr.ip() && v.port == vip_addr.port() && v.protocol == proto
        })
    else {
        bail!("{} has no service {service}", path.display());
    };
    let inputs: Vec<maglev::MaglevBackend> = vip
        .backends
        .iter()
        .map(|b| maglev::MaglevBackend {
            address: b.address.into(),
            weight: b.weight,
        })
        .collect();
    let table = maglev::build_table(&inputs, vip.table_size)?;
    let hash = lb_common::hash::flow_hash_between(src, vip_addr, proto.number());
    let slot = lb_common::hash::flow_slot_between(src, vip_addr, proto.number(), vip.table_size);
    let entry = table[slot as usize];
    let backend =
        (entry != maglev::EMPTY).then(|| vip.backends[entry as usize].address.to_string());
    Ok(WhichBackend {
        vip: vip.name.clone(),
        service: format!("{vip_addr}/{proto}"),
        source: src.to_string(),
        hash,
        slot: backend.as_ref().map(|_| slot),
        backend_id: None,
        backend,
    })
}
