//! `xdplb run --replace`: a new agent takes the place of the one serving, without a gap in
//! forwarding and keeping the connection table.
//!
//! The new agent does everything that can fail first, while the old one keeps serving: it
//! validates the config, loads and verifies its program, adopts the pinned connection table
//! (the same map the old program writes) and fills its own maps, MACs included. Only then does it
//! ask the old agent, over the Unix API socket ([`stop_running`], `POST /v1/shutdown` with
//! `keep_forwarding`), to stop and leave its data path attached, and wait until that process
//! has exited (it then no longer holds the API socket or any TCP listen address). The new agent
//! binds the API and attaches, which swaps its program into the pinned link with one
//! `bpf_link_update`: the old program forwards (with its own maps) up to the swap, the new one
//! from the next packet.
//!
//! Guaranteed: nothing is asked of the old agent before the new data path is ready; a failure
//! up to then leaves it serving untouched. Not guaranteed: if the new agent fails after the old
//! one has exited, nobody manages the data path, which keeps forwarding with the old (or, if the
//! swap was done, the new) program and tables; the error says so, and the next `xdplb run`
//! takes it over.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use thiserror::Error;
use tokio::net::UnixStream;

use crate::api::{Client, ClientError, ShutdownReply};

/// How long the old agent may take to exit once it has answered. Its shutdown steps are bounded
/// by 5 s each (API, MAC watcher); this is for a stuck one.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum ReplaceError {
    #[error(
        "asking the running agent on {socket} to stop failed: {source}. Nothing was changed; if \
         the request did arrive, that agent may be stopping now, leaving its data path attached"
    )]
    Ask {
        socket: PathBuf,
        #[source]
        source: ClientError,
    },
    #[error(
        "the running agent (pid {pid}) agreed to stop but had not exited {after:?} later; this \
         agent gives up without touching anything. When it exits it leaves its data path \
         attached and forwarding; then start `xdplb run` again to take it over"
    )]
    NoExit { pid: u32, after: Duration },
}

/// What the replaced agent reported, and how long it took to go.
#[derive(Clone, Debug)]
pub struct Replaced {
    pub reply: ShutdownReply,
    /// Its process id as this process sees it (from the socket's peer credentials, else its
    /// own word).
    pub pid: u32,
    /// From asking it to stop until it had exited.
    pub stop_took: Duration,
}

impl Replaced {
    /// It was VRRP master and left the VIPs without resigning: the new agent starts as master.
    pub fn was_master(&self) -> bool {
        self.reply.keep_forwarding && self.reply.ha_state.as_deref() == Some("master")
    }
}

/// Whether an agent answers on the API socket.
pub async fn running(socket: &Path) -> bool {
    UnixStream::connect(socket).await.is_ok()
}

/// Asks the agent on `socket` to stop with its data path left attached, and waits (at most
/// `exit_timeout`) until its process has exited and the socket no longer answers.
pub async fn stop_running(socket: &Path, exit_timeout: Duration) -> Result<Replaced, ReplaceError> {
    let ask = |source| ReplaceError::Ask {
        socket: socket.to_path_buf(),
        source,
    };
    // The peer's pid in our pid namespace, which the agent's own word need not be.
    let peer_pid = UnixStream::connect(socket)
        .await
        .ok()
        .and_then(|s| s.peer_cred().ok())
        .and_then(|c| c.pid())
        .and_then(|p| u32::try_from(p).ok());
    let start = Instant::now();
    let reply = Client::new(socket).shutdown(true).await.map_err(ask)?;
    let pid = peer_pid.unwrap_or(reply.pid);
    let deadline = start + exit_timeout;
    loop {
        if !alive(pid) && !running(socket).await {
            return Ok(Replaced {
                reply,
                pid,
                stop_took: start.elapsed(),
            });
        }
        if Instant::now() >= deadline {
            return Err(ReplaceError::NoExit {
                pid,
                after: start.elapsed(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether process `pid` still runs. A zombie (exited, not yet reaped by its parent) has let go
/// of everything and counts as exited.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X' | 'x')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited but not reaped: a zombie, which counts as gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!alive(pid), "a zombie counts as exited");
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
