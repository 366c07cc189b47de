//! Logging: `tracing` for the agent, with the level changeable at run time, and the data path's
//! aya-log records forwarded into the same log under the target `xdplb::ebpf`.
//!
//! One level governs both: `LogLevel::ebpf_level` is written to the data path's settings so the
//! program does not even emit records the agent would filter out.

use std::{fmt, str::FromStr, sync::OnceLock};

use serde::{Deserialize, Serialize};
use tracing_subscriber::{
    EnvFilter, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The data path's numbering (aya_log_common::Level: 1 error .. 5 trace; 0 off).
    pub fn ebpf_level(self) -> u32 {
        match self {
            LogLevel::Off => 0,
            LogLevel::Error => 1,
            LogLevel::Warn => 2,
            LogLevel::Info => 3,
            LogLevel::Debug => 4,
            LogLevel::Trace => 5,
        }
    }

    fn directive(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.directive())
    }
}

impl FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "unknown log level `{s}` (expected off, error, warn, info, debug or trace)"
                ));
            }
        })
    }
}

type Handle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;
static RELOAD: OnceLock<Handle> = OnceLock::new();

/// Installs the global subscriber (stderr, with timestamps). Idempotent: later calls only change
/// the level. Crates other than ours log at `warn` and above unless `RUST_LOG` says otherwise.
pub fn init(level: LogLevel) {
    if RELOAD.get().is_some() {
        set_level(level);
        return;
    }
    let (filter, handle) = reload::Layer::new(filter_for(level));
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init();
    if installed.is_ok() {
        let _ = RELOAD.set(handle);
    }
}

/// Changes the level of the running agent's log.
pub fn set_level(level: LogLevel) {
    if let Some(h) = RELOAD.get() {
        let _ = h.reload(filter_for(level));
    }
}

fn filter_for(level: LogLevel) -> EnvFilter {
    if let Ok(env) = std::env::var("RUST_LOG")
        && !env.is_empty()
    {
        return EnvFilter::new(env);
    }
    let l = level.directive();
    EnvFilter::new(format!("warn,xdplb={l},lb_userspace={l},lb_tests={l}"))
}

/// Receives the data path's aya-log records (already formatted by aya-log) and logs them through
/// tracing under the target `xdplb::ebpf`, so they share the agent's format, filter and level.
/// Given to `Dataplane::take_logger`, not installed as the global `log` logger.
pub struct EbpfLogBridge;

impl log::Log for EbpfLogBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = record.args();
        match record.level() {
            log::Level::Error => tracing::error!(target: "xdplb::ebpf", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "xdplb::ebpf", "{msg}"),
            log::Level::Info => tracing::info!(target: "xdplb::ebpf", "{msg}"),
            log::Level::Debug => tracing::debug!(target: "xdplb::ebpf", "{msg}"),
            log::Level::Trace => tracing::trace!(target: "xdplb::ebpf", "{msg}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_map() {
        assert_eq!("DEBUG".parse::<LogLevel>().unwrap(), LogLevel::Debug);
        assert_eq!("warning".parse::<LogLevel>().unwrap(), LogLevel::Warn);
        assert!("loud".parse::<LogLevel>().unwrap_err().contains("loud"));
        assert_eq!(LogLevel::Off.ebpf_level(), 0);
        assert_eq!(LogLevel::Trace.ebpf_level(), 5);
        assert!(LogLevel::Debug > LogLevel::Info);
    }
}
