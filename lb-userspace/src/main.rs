//! `xdplb`: the command line. Thin: parsing arguments and printing; the work is in the library.

use std::{
    net::{IpAddr, SocketAddr},
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
    maglev, metrics,
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
    /// The agent's API socket (the commands that ask the running agent talk to it).
    #[arg(long, global = true, env = "XDPLB_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Talk to the agent's TCP API at ADDR:PORT ([api] listen) instead of its socket.
    #[arg(long, global = true, env = "XDPLB_API", value_name = "ADDR:PORT")]
    api: Option<SocketAddr>,
    /// File holding the API token, for --api (the XDPLB_TOKEN environment variable may hold the
    /// token itself; this file wins if both are given).
    #[arg(long, global = true, env = "XDPLB_TOKEN_FILE", value_name = "PATH")]
    token_file: Option<PathBuf>,
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
        /// Take the place of the agent serving on the config's [api] socket (an upgrade):
        /// validate the config, load and verify the program and fill its maps while that agent
        /// keeps serving, then ask it (over the Unix socket) to stop with its data path
        /// attached, wait for it to exit and swap the new program into the pinned link
        /// atomically. The connection table is kept; an HA master stays master. Any failure
        /// before the switch leaves the running agent untouched. Without a running agent, a
        /// normal start.
        #[arg(long)]
        replace: bool,
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
        /// The service, ADDRESS:PORT/PROTO, e.g. 10.0.0.100:80/tcp or [2001:db8::1]:80/tcp.
        service: String,
        /// The client, ADDRESS:PORT ([ADDRESS]:PORT for IPv6).
        source: String,
        /// Compute from this config instead of asking the running agent (assumes every
        /// backend is reachable).
        #[arg(short, long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show flows of the running agent's connection table: client, service, the backend the
    /// flow sticks to, and what its next packet does.
    Flows {
        /// Only this VIP's flows (its name or ADDRESS:PORT/PROTO); all VIPs' without it.
        vip: Option<String>,
        /// Show at most N flows (1 to 100000), the first the table yields.
        #[arg(long, value_name = "N", default_value_t = api::DEFAULT_FLOWS_LIMIT)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Change the log level of the running agent and its data path.
    LogLevel {
        level: LogLevel,
        #[arg(long)]
        json: bool,
    },
    /// Print the running agent's Prometheus metrics (what `GET /metrics` on the API serves).
    Metrics {
        /// The metrics as one JSON object per sample (name, labels, value).
        #[arg(long)]
        json: bool,
    },
    /// Change a backend of the running agent (VIP: its name or ADDRESS:PORT/PROTO).
    Backend {
        #[command(subcommand)]
        op: BackendOp,
    },
    /// Add or remove a VIP on the running agent.
    Vip {
        #[command(subcommand)]
        op: VipOp,
    },
    /// Make the running agent re-read its config file and apply what changed (same as SIGHUP).
    /// An invalid file is refused with check-config's errors and changes nothing.
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// High availability (VRRP, [ha]): show the state (the default), or hand mastership over to
    /// the other node and take it back.
    Ha {
        #[command(subcommand)]
        op: Option<HaCmd>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum HaCmd {
    /// The VRRP state, the master, the last transition, tracking and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Give up mastership (for maintenance): returns once the other node is master; fails, and
    /// this node stays master, if none takes over. This node then stays backup, without
    /// preempting, until `xdplb ha resume`.
    Handover {
        #[arg(long)]
        json: bool,
    },
    /// End a handover: the node may preempt again (it becomes master again if its priority is
    /// higher and [ha] preempt is on).
    Resume {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BackendOp {
    /// Weight 0 for new flows; established flows are left alone.
    Drain {
        vip: String,
        /// The backend's address (IPv6 bare or in brackets).
        #[arg(value_parser = backend_arg)]
        backend: IpAddr,
        #[arg(long)]
        json: bool,
    },
    /// Take new flows again, at the backend's weight.
    Undrain {
        vip: String,
        /// The backend's address (IPv6 bare or in brackets).
        #[arg(value_parser = backend_arg)]
        backend: IpAddr,
        #[arg(long)]
        json: bool,
    },
    /// Set the weight (0 to 65535) until the next reload.
    Weight {
        vip: String,
        /// The backend's address (IPv6 bare or in brackets).
        #[arg(value_parser = backend_arg)]
        backend: IpAddr,
        weight: u32,
        #[arg(long)]
        json: bool,
    },
    /// Add a backend, checked with the VIP's health check, until the next reload.
    Add {
        vip: String,
        /// The backend's address (IPv6 bare or in brackets).
        #[arg(value_parser = backend_arg)]
        backend: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Only takes traffic while no primary backend can.
        #[arg(long)]
        backup: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a backend until the next reload.
    Remove {
        vip: String,
        /// The backend's address (IPv6 bare or in brackets).
        #[arg(value_parser = backend_arg)]
        backend: IpAddr,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum VipOp {
    /// Add a VIP until the next reload: from flags, or from a file holding one [[vip]] table
    /// (with its backends and health check) as in the config file.
    Add {
        /// The VIP's name.
        #[arg(required_unless_present = "file")]
        name: Option<String>,
        /// ADDRESS:PORT/PROTO, e.g. 10.0.0.100:80/tcp.
        #[arg(required_unless_present = "file")]
        service: Option<String>,
        /// A backend, ADDRESS or ADDRESS*WEIGHT; repeat for several.
        #[arg(long = "backend", value_name = "ADDRESS[*WEIGHT]")]
        backends: Vec<String>,
        #[arg(long)]
        table_size: Option<u32>,
        /// keep-last or drop.
        #[arg(long)]
        all_down: Option<String>,
        /// Health check kind (tcp, http, udp, exec, none); further settings need --file.
        #[arg(long)]
        check: Option<String>,
        /// A file with one [[vip]] table instead of the flags.
        #[arg(long, conflicts_with_all = ["name", "service", "backends", "table_size", "all_down", "check"])]
        file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Remove a VIP until the next reload: its packets go to this host's stack from then on.
    Remove {
        vip: String,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xdplb: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, `: `-separated like `{:#}`, but without a cause whose text is already
/// in the message (the library's errors quote their source, and also return it as `source()`).
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !out.contains(&cause) {
            out.push_str(": ");
            out.push_str(&cause);
        }
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The client of the running agent: over TCP with `--api` (with the token from `--token-file`,
/// else `XDPLB_TOKEN`), else over the Unix socket.
fn client(cli: &Cli) -> anyhow::Result<Client> {
    let Some(addr) = cli.api else {
        return Ok(Client::new(&cli.socket));
    };
    let token = match &cli.token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the API token file {}", path.display()))?;
            let token = text.trim();
            if token.is_empty() {
                bail!("the API token file {} is empty", path.display());
            }
            Some(token.to_string())
        }
        None => std::env::var("XDPLB_TOKEN")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty()),
    };
    Ok(Client::tcp(addr, token))
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        &Command::Run {
            ref config,
            xdp_mode,
            keep_forwarding,
            log_level,
            mac_wait,
            replace,
        } => {
            logging::init(log_level);
            let loaded = load_config(config)?;
            for w in &loaded.warnings {
                tracing::warn!("{}", w.in_file(config));
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
                config_path: Some(config.clone()),
                replace,
            };
            runtime()?.block_on(agent::run(
                loaded.config,
                opts,
                std::future::pending::<()>(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file, json } => check_config(file, *json),
        Command::Status { json } => {
            let client = client(&cli)?;
            let s = runtime()?.block_on(client.status())?;
            if *json {
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
                Some(path) => which_offline(path, service, source)?,
                None => {
                    let client = client(&cli)?;
                    runtime()?.block_on(client.which_backend(service, source))?
                }
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&w)?);
            } else {
                print!("{}", status::render_which(&w));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Flows { vip, limit, json } => {
            let client = client(&cli)?;
            let r = runtime()?.block_on(client.flows(vip.as_deref(), *limit))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", status::render_flows(&r, *limit));
            }
            Ok(ExitCode::SUCCESS)
        }
        &Command::LogLevel { level, json } => {
            let client = client(&cli)?;
            runtime()?.block_on(client.set_log_level(level))?;
            if json {
                println!("{}", serde_json::json!({ "level": level.to_string() }));
            } else {
                println!("log level set to {level}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Metrics { json } => {
            let client = client(&cli)?;
            let text = runtime()?.block_on(client.metrics())?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&metrics_json(&text)?)?);
            } else {
                print!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backend { op } => {
            let client = client(&cli)?;
            let rt = runtime()?;
            let (message, json) = match op {
                BackendOp::Drain { vip, backend, json } => {
                    (rt.block_on(client.drain(vip, *backend, true))?, *json)
                }
                BackendOp::Undrain { vip, backend, json } => {
                    (rt.block_on(client.drain(vip, *backend, false))?, *json)
                }
                BackendOp::Weight {
                    vip,
                    backend,
                    weight,
                    json,
                } => (
                    rt.block_on(client.set_weight(vip, *backend, *weight))?,
                    *json,
                ),
                BackendOp::Add {
                    vip,
                    backend,
                    weight,
                    backup,
                    json,
                } => (
                    rt.block_on(client.add_backend(vip, *backend, *weight, *backup))?,
                    *json,
                ),
                BackendOp::Remove { vip, backend, json } => {
                    (rt.block_on(client.remove_backend(vip, *backend))?, *json)
                }
            };
            print_message(&message, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Vip { op } => {
            let client = client(&cli)?;
            let rt = runtime()?;
            let (message, json) = match op {
                VipOp::Add {
                    name,
                    service,
                    backends,
                    table_size,
                    all_down,
                    check,
                    file,
                    json,
                } => {
                    let toml = match file {
                        Some(f) => std::fs::read_to_string(f)
                            .with_context(|| format!("reading {}", f.display()))?,
                        None => vip_toml(
                            name.as_deref().unwrap_or_default(),
                            service.as_deref().unwrap_or_default(),
                            backends,
                            *table_size,
                            all_down.as_deref(),
                            check.as_deref(),
                        )?,
                    };
                    (rt.block_on(client.add_vip(&toml))?, *json)
                }
                VipOp::Remove { vip, json } => (rt.block_on(client.remove_vip(vip))?, *json),
            };
            print_message(&message, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { json } => {
            let client = client(&cli)?;
            let changes = runtime()?.block_on(client.reload())?;
            if *json {
                println!("{}", serde_json::json!({ "changes": changes }));
            } else if changes.is_empty() {
                println!("reloaded: no changes");
            } else {
                for c in &changes {
                    println!("{c}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ha { op, json } => {
            let client = client(&cli)?;
            let rt = runtime()?;
            let (reply, json) = match op {
                None => (rt.block_on(client.ha_status())?, *json),
                Some(HaCmd::Status { json: j }) => (rt.block_on(client.ha_status())?, *json || *j),
                Some(HaCmd::Handover { json: j }) => {
                    (rt.block_on(client.ha_handover())?, *json || *j)
                }
                Some(HaCmd::Resume { json: j }) => (rt.block_on(client.ha_resume())?, *json || *j),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else if matches!(op, None | Some(HaCmd::Status { .. })) {
                print!("{}", status::render_ha(&reply.status));
            } else {
                println!("{}", reply.message);
                println!("{}", status::ha_state_line(&reply.status));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_message(message: &str, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "message": message }));
    } else {
        println!("{message}");
    }
}

/// One `[[vip]]` table from `xdplb vip add`'s flags; the agent validates it like a config file.
fn vip_toml(
    name: &str,
    service: &str,
    backends: &[String],
    table_size: Option<u32>,
    all_down: Option<&str>,
    check: Option<&str>,
) -> anyhow::Result<String> {
    let (addr, proto) = api::parse_service(service).map_err(|e| anyhow::anyhow!(e))?;
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let mut t = format!(
        "[[vip]]\nname = {}\naddress = {}\nport = {}\nprotocol = {}\n",
        quote(name),
        quote(&addr.ip().to_string()),
        addr.port(),
        quote(proto.as_str())
    );
    if let Some(m) = table_size {
        t.push_str(&format!("table_size = {m}\n"));
    }
    if let Some(a) = all_down {
        t.push_str(&format!("all_down = {}\n", quote(a)));
    }
    if let Some(k) = check {
        t.push_str(&format!("[vip.health]\nkind = {}\n", quote(k)));
    }
    for b in backends {
        let (address, weight) = match b.split_once('*') {
            Some((a, w)) => (
                a,
                Some(
                    w.parse::<u32>()
                        .with_context(|| format!("--backend {b}: `{w}` is not a weight"))?,
                ),
            ),
            None => (b.as_str(), None),
        };
        // `[2001:db8::11]` as services write IPv6; the config wants the bare address.
        let address = address
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(address);
        t.push_str(&format!("[[vip.backend]]\naddress = {}\n", quote(address)));
        if let Some(w) = weight {
            t.push_str(&format!("weight = {w}\n"));
        }
    }
    Ok(t)
}

/// The Prometheus text as JSON samples, for `xdplb metrics --json`, read with the strict reader
/// the tests hold the exposition to.
fn metrics_json(text: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    let (samples, _) =
        metrics::parse(text).map_err(|e| anyhow::anyhow!("the agent's metrics: {e}"))?;
    Ok(samples
        .into_iter()
        .map(|s| {
            let labels: serde_json::Map<String, serde_json::Value> = s
                .labels
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            serde_json::json!({ "name": s.name, "labels": labels, "value": s.value })
        })
        .collect())
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

/// A backend address on the command line, checked with the config's rules.
fn backend_arg(text: &str) -> Result<IpAddr, String> {
    config::backend_address(text)
}

/// `which-backend --config`: the table as the config alone defines it (every backend assumed
/// reachable), with the data path's own flow hash.
fn which_offline(path: &Path, service: &str, source: &str) -> anyhow::Result<WhichBackend> {
    let loaded = load_config(path)?;
    let (vip_addr, proto) = api::parse_service(service).map_err(|e| anyhow::anyhow!(e))?;
    let src: SocketAddr = source
        .parse()
        .with_context(|| format!("`{source}` is not ADDRESS:PORT (or [ADDRESS]:PORT for IPv6)"))?;
    let Some(vip) = loaded
        .config
        .vips
        .iter()
        .find(|v| v.key() == (vip_addr.ip(), vip_addr.port(), proto))
    else {
        bail!("{} has no service {service}", path.display());
    };
    let inputs: Vec<maglev::MaglevBackend> = vip
        .backends
        .iter()
        .map(|b| maglev::MaglevBackend {
            address: b.address,
            weight: b.weight,
        })
        .collect();
    let table = maglev::build_table(&inputs, vip.table_size)?;
    let family = || anyhow::anyhow!("source {src} and service {service} are of different families");
    let hash = lb_common::hash::flow_hash_of(src, vip_addr, proto.number()).ok_or_else(family)?;
    let slot = lb_common::hash::flow_slot_of(src, vip_addr, proto.number(), vip.table_size)
        .ok_or_else(family)?;
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn ha(args: &[&str]) -> (Option<&'static str>, bool) {
        let cli = Cli::try_parse_from(["xdplb", "ha"].iter().chain(args)).unwrap();
        let Command::Ha { op, json } = cli.command else {
            panic!("not ha");
        };
        match op {
            None => (None, json),
            Some(HaCmd::Status { json: j }) => (Some("status"), json || j),
            Some(HaCmd::Handover { json: j }) => (Some("handover"), json || j),
            Some(HaCmd::Resume { json: j }) => (Some("resume"), json || j),
        }
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn ha_defaults_to_status_and_takes_json_either_side() {
        assert_eq!(ha(&[]), (None, false));
        assert_eq!(ha(&["--json"]), (None, true));
        assert_eq!(ha(&["status"]), (Some("status"), false));
        assert_eq!(ha(&["status", "--json"]), (Some("status"), true));
        assert_eq!(ha(&["--json", "handover"]), (Some("handover"), true));
        assert_eq!(ha(&["resume"]), (Some("resume"), false));
        assert!(Cli::try_parse_from(["xdplb", "ha", "takeover"]).is_err());
    }
}
