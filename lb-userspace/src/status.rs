//! What `xdplb status`, `xdplb flows` and `xdplb which-backend` show: the JSON model the agent's
//! API returns, and its rendering for a terminal (in the spirit of `ipvsadm -Ln --stats`).

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::ha::HaStatus;

/// How often the agent samples counters for the per-second rates.
pub const RATE_PERIOD_SECS: u64 = 2;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub interface: String,
    pub ifindex: u32,
    pub interface_mac: String,
    /// driver | generic (or unknown, after taking over a link the kernel does not describe);
    /// absent while not attached.
    pub xdp_mode: Option<String>,
    pub program_id: Option<u32>,
    pub uptime_secs: u64,
    pub log_level: String,
    pub table_rebuilds: u64,
    /// Backend health changes (up to down and back) since the agent started.
    #[serde(default)]
    pub health_transitions: u64,
    pub vips: Vec<VipStatus>,
    /// Every reason, in index order, with its totals.
    pub reasons: Vec<ReasonStatus>,
    /// The connection table.
    #[serde(default)]
    pub flows: FlowTableStatus,
    /// VRRP, when `[ha]` is configured.
    #[serde(default)]
    pub ha: Option<HaStatus>,
}

/// The connection table: its size and what it did (see `lb_common::flows`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowTableStatus {
    /// Entries it holds at most (all CPUs).
    pub capacity: u32,
    /// Entries the IPv6 connection table, a table of its own, holds at most.
    #[serde(default)]
    pub capacity_v6: u32,
    pub udp_idle_timeout_secs: f64,
    /// Most inserts per CPU per second; 0: no bound.
    pub insert_rate_limit: u32,
    pub remove_grace_secs: f64,
    /// Every event (`lb_common::flows::FlowStat`), in index order, with its total.
    pub events: Vec<FlowEventStatus>,
    /// Backends removed from a VIP whose established flows still go to them.
    pub removing: Vec<RemovingStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowEventStatus {
    /// hit | miss | syn | insert | insert_rate_limited | remapped | expired | insert_failed
    pub event: String,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RemovingStatus {
    pub vip: String,
    pub backend: String,
    /// Seconds until its flows are remapped.
    pub remaining_secs: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub table_size: u32,
    /// Backends the live table was built with.
    pub usable_backends: u32,
    /// What the table is built from: ok (the healthy primaries) | backup (no primary can take
    /// traffic: the backups) | all-down: keep-last | no backend (packets dropped).
    pub serving: String,
    /// keep-last | drop: what happens when every backend is down.
    pub all_down: String,
    /// Forwarded packets and bytes.
    pub packets: u64,
    pub bytes: u64,
    /// Forwarded packets and bytes per second, over the agent's last sampling period
    /// ([`RATE_PERIOD_SECS`]); 0 until two samples exist.
    pub pps: f64,
    pub bps: f64,
    /// New flows (TCP SYNs, UDP flows without a live connection-table entry), in total and per
    /// second.
    #[serde(default)]
    pub new_flows: u64,
    #[serde(default)]
    pub fps: f64,
    pub backends: Vec<BackendStatus>,
}

impl VipStatus {
    /// `ADDRESS:PORT`, with an IPv6 address in brackets (`[2001:db8::1]:80`), as the CLI and
    /// the default VIP names write a service.
    pub fn socket(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    /// The weight in force (an operator's, or the config's).
    pub weight: u32,
    /// The weight the config gives.
    pub config_weight: u32,
    /// up | down (failed its health checks) | draining (by the operator: no new flows) |
    /// backup (healthy, standing by while primaries serve) | unresolved (no MAC yet).
    pub state: String,
    /// primary | backup
    pub role: String,
    pub drained: bool,
    /// Whether the live table was built with it.
    pub in_table: bool,
    pub health: HealthStatus,
    pub mac: Option<String>,
    /// Slots of the live table, and their fraction of it.
    pub slots: u32,
    pub share: f64,
    pub packets: u64,
    pub bytes: u64,
    pub pps: f64,
    pub bps: f64,
    /// New flows sent to it, in total and per second.
    #[serde(default)]
    pub new_flows: u64,
    #[serde(default)]
    pub fps: f64,
}

/// A backend's health check and what it last said.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HealthStatus {
    /// none | tcp | http | udp | exec
    pub check: String,
    /// The port checked.
    pub port: u16,
    /// unknown (no result yet) | up | down | none (not checked)
    pub state: String,
    pub last_ok: Option<bool>,
    /// The last result in words: "connected", "connect refused", "HTTP 500 (expected 200-399)".
    pub last_detail: Option<String>,
    pub last_latency_ms: Option<f64>,
    /// When the last check ended (Unix time, seconds).
    pub last_check_unix: Option<u64>,
    pub checks: u64,
    pub failures: u64,
    pub transitions: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReasonStatus {
    pub reason: String,
    /// tx | pass | drop
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

/// A sample of the connection table (`xdplb flows`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowsReport {
    /// Entries the table holds at most.
    pub capacity: u32,
    /// Entries the IPv6 table holds at most.
    #[serde(default)]
    pub capacity_v6: u32,
    /// Entries read to find these: the table is walked in the kernel's hash order (a fair
    /// sample) until `limit` flows matched, or the scan cap was reached.
    pub scanned: usize,
    /// The scan stopped at its cap (a listing must not hold up the agent) before the table's
    /// end or `limit` flows.
    #[serde(default)]
    pub scan_capped: bool,
    pub flows: Vec<FlowStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowStatus {
    /// Client address and port.
    pub client: String,
    /// The service, `ADDRESS:PORT/PROTO`, and its VIP's name (absent if no VIP has it now).
    pub service: String,
    pub vip: Option<String>,
    pub backend_id: u32,
    /// The remembered backend's address (absent if the id is no longer a backend of the VIP).
    pub backend: Option<String>,
    /// What its next packet does: "stays" (on the remembered backend, up or draining),
    /// "removing" (stays until the removed backend's grace ends), "remapped" (the backend
    /// failed or is gone: the VIP's table decides again) or "expired" (UDP idle past the
    /// timeout: decided again as a new flow).
    pub state: String,
    /// Seconds since the entry was written or, for UDP, since its last packet.
    pub idle_secs: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WhichBackend {
    pub vip: String,
    pub service: String,
    pub source: String,
    pub hash: u32,
    /// Slot of the VIP's table the flow hashes to (absent when the table is empty).
    pub slot: Option<u32>,
    pub backend_id: Option<u32>,
    /// Backend address, absent when the VIP has no usable backend.
    pub backend: Option<String>,
}

/// Renders the status for a terminal, in the spirit of `ipvsadm -Ln --stats --rate`: a line about
/// the agent; a table with a line per service and an indented `->` line per backend, on one grid
/// of columns (the two heading lines name the columns of each); then the totals per reason; then
/// the connection table (see `render_flow_table`); then, on a node with `[ha]`, the VRRP state
/// (see [`render_ha`]).
///
/// Units: `Conn/s` is new flows per second (TCP SYNs, and UDP packets the connection table had
/// no live entry for), `Pkt/s` packets per second and `bit/s` bits per second (the agent's bytes
/// per second times 8), all over the agent's last sampling period; `Packets` and `Bytes` are
/// totals since the counters were created. The five are shortened with decimal prefixes
/// (K = 10^3, M = 10^6, G, T, P, E); `xdplb status --json` has the exact figures.
///
/// A service's line ends with what its table is built from when that is not the healthy
/// primaries (`[BACKUP]`, `[ALL DOWN: keep-last]`, `[NO BACKEND]`); a backend's line ends with its
/// health check (`kind:port`, the last result in words, its latency), or `-` when unchecked.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "xdplb {}  {} (ifindex {}, {})  xdp {}  prog {}  up {}  log {}  rebuilds {}  \
         health changes {}",
        s.version,
        s.interface,
        s.ifindex,
        s.interface_mac,
        s.xdp_mode.as_deref().unwrap_or("detached"),
        s.program_id.map_or("-".to_string(), |i| i.to_string()),
        fmt_duration(s.uptime_secs),
        s.log_level,
        s.table_rebuilds,
        s.health_transitions,
    );
    let _ = writeln!(out);

    let mut rows = vec![
        Row {
            lead: "Prot Service".into(),
            mid: Mid::Span("Name".into()),
            cols: [
                "Table", "Usable", "Conn/s", "Pkt/s", "bit/s", "Packets", "Bytes",
            ]
            .map(String::from),
            tail: "Serving".into(),
        },
        Row {
            lead: "  -> Backend".into(),
            mid: Mid::Split("State".into(), "Weight".into()),
            cols: ["Slots", "Share", "", "", "", "", ""].map(String::from),
            tail: "Health".into(),
        },
    ];
    for v in &s.vips {
        rows.push(Row {
            lead: format!("{:<4} {}", v.protocol.to_uppercase(), v.socket()),
            mid: Mid::Span(v.name.clone()),
            cols: [
                v.table_size.to_string(),
                format!("{}/{}", v.usable_backends, v.backends.len()),
                human(v.fps),
                human(v.pps),
                human(v.bps * 8.0),
                human(v.packets as f64),
                human(v.bytes as f64),
            ],
            tail: serving_flag(&v.serving),
        });
        for b in &v.backends {
            rows.push(Row {
                lead: format!("  -> {}", b.address),
                mid: Mid::Split(backend_state(b), backend_weight(b)),
                cols: [
                    b.slots.to_string(),
                    format!("{:.1}%", b.share * 100.0),
                    human(b.fps),
                    human(b.pps),
                    human(b.bps * 8.0),
                    human(b.packets as f64),
                    human(b.bytes as f64),
                ],
                tail: health_words(&b.health),
            });
        }
    }
    render_rows(&mut out, &rows);
    if s.vips.is_empty() {
        let _ = writeln!(out, "(no virtual services configured)");
    }

    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:<6} {:>12} {:>14}",
        "Reason", "Action", "Packets", "Bytes"
    );
    for r in &s.reasons {
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:>12} {:>14}",
            r.reason, r.action, r.packets, r.bytes
        );
    }
    // An agent from before the connection table sends none of it.
    if !s.flows.events.is_empty() {
        let _ = writeln!(out);
        render_flow_table(&mut out, &s.flows);
    }
    if let Some(ha) = &s.ha {
        let _ = writeln!(out);
        out.push_str(&render_ha(ha));
    }
    out
}

/// The HA part of `xdplb status`, also what `xdplb ha` shows: the VRRP state and priority
/// ([`ha_state_line`]), the settings, the handover if one is in force, the master, the last transition (its
/// age against this machine's clock), the tracked conditions, the addresses held, whether the
/// peer's tables match ours, and the counters.
pub fn render_ha(h: &HaStatus) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    render_ha_at(h, now_ms)
}

/// The first line of [`render_ha`], also what `xdplb ha handover` and `resume` end with:
/// `HA  MASTER  vrid 51  priority 200`, or `HA  BACKUP  vrid 51  priority 200, effective 150
/// (tracking: vip web failing)` when tracking lowered it.
pub fn ha_state_line(h: &HaStatus) -> String {
    let failing: Vec<&str> = h
        .tracking
        .iter()
        .filter(|t| !t.ok)
        .map(|t| t.what.as_str())
        .collect();
    let mut line = format!(
        "HA  {}  vrid {}  priority {}",
        h.state.to_uppercase(),
        h.vrid,
        h.priority
    );
    if h.effective_priority != h.priority || !failing.is_empty() {
        let _ = write!(line, ", effective {}", h.effective_priority);
        if !failing.is_empty() {
            let _ = write!(line, " (tracking: {} failing)", failing.join(", "));
        }
    }
    line
}

/// [`render_ha`] with the wall clock given, in Unix milliseconds.
fn render_ha_at(h: &HaStatus, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", ha_state_line(h));
    let _ = writeln!(
        out,
        "interface {}  source {}  {}  advert {}  preempt {}{}",
        h.interface,
        h.source,
        if h.peers.is_empty() {
            "multicast".to_string()
        } else {
            format!("unicast to {}", join(&h.peers))
        },
        fmt_ms(h.advert_interval_ms),
        if h.preempt { "on" } else { "off" },
        if h.held { " (held)" } else { "" },
    );
    if h.held {
        let _ = writeln!(
            out,
            "handover in force: not preempting until `xdplb ha resume`"
        );
    }
    let master = match &h.master {
        Some(m) if m.local => format!("this node ({}, priority {})", m.address, m.priority),
        Some(m) => {
            let mut words = format!("{} (priority {}", m.address, m.priority);
            if m.advert_interval_ms != h.advert_interval_ms {
                let _ = write!(words, ", advert {}", fmt_ms(m.advert_interval_ms));
            }
            words.push(')');
            words
        }
        None => "unknown (none heard)".to_string(),
    };
    let _ = writeln!(out, "master: {master}");
    match &h.last_transition {
        Some(t) => {
            let age = now_ms.saturating_sub(t.at_unix_ms) as f64 / 1000.0;
            let _ = writeln!(
                out,
                "last transition: {} -> {} {}: {}",
                t.from,
                t.to,
                fmt_ago(age),
                t.reason
            );
        }
        None => {
            let _ = writeln!(out, "last transition: none yet");
        }
    }
    if !h.tracking.is_empty() {
        let words: Vec<String> = h
            .tracking
            .iter()
            .map(|t| format!("{} {}", t.what, if t.ok { "ok" } else { "FAILING" }))
            .collect();
        let _ = writeln!(out, "tracking: {}", words.join(", "));
    }
    let missing: Vec<_> = h
        .vip_addresses
        .iter()
        .filter(|a| !h.vips.contains(a))
        .copied()
        .collect();
    let held = if h.vips.is_empty() && h.vip_addresses.is_empty() {
        "none (no VIP addresses)".to_string()
    } else if h.vips.is_empty() {
        format!("none (as master: {})", join(&h.vip_addresses))
    } else if h.state == "master" && !missing.is_empty() {
        format!("{} (missing: {})", join(&h.vips), join(&missing))
    } else {
        join(&h.vips)
    };
    let _ = writeln!(out, "addresses held: {held}");
    if let Some(mac) = &h.virtual_mac {
        let _ = writeln!(out, "virtual MAC: {mac}");
    }
    match &h.peer_tables {
        None => {
            let _ = writeln!(out, "peer tables: not heard yet");
        }
        Some(p) if p.matches => {
            let _ = writeln!(
                out,
                "peer tables: match ({}, heard {})",
                p.peer,
                fmt_ago(p.age_ms as f64 / 1000.0)
            );
        }
        Some(p) => {
            let since = p.differs_for_ms.map_or(String::new(), |ms| {
                format!(" for {}", fmt_span(ms as f64 / 1000.0))
            });
            let _ = writeln!(
                out,
                "WARNING: peer tables DIFFER from {}{since} (digest {} here, {} there, heard {}): \
                 after a failover some flows would move",
                p.peer,
                p.own_digest,
                p.digest,
                fmt_ago(p.age_ms as f64 / 1000.0)
            );
        }
    }
    let c = &h.counters;
    let discarded: Vec<String> = c
        .discarded
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "adverts: sent {}, received {}, discarded: {}",
        c.adverts_sent,
        c.adverts_received,
        if discarded.is_empty() {
            "none".to_string()
        } else {
            discarded.join(", ")
        }
    );
    let mut line = format!(
        "transitions: to master {}, to backup {}, to fault {}; split brain {}",
        c.became_master, c.became_backup, c.became_fault, c.split_brain
    );
    for (what, n) in [
        ("address list mismatch", c.address_mismatch),
        ("priority 0 received", c.priority_zero_received),
        ("send errors", c.send_errors),
    ] {
        if n > 0 {
            let _ = write!(line, "; {what} {n}");
        }
    }
    let _ = writeln!(out, "{line}");
    out
}

/// `10.0.0.100, 10.0.0.101`.
fn join(addrs: &[impl std::fmt::Display]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An interval in milliseconds: `1s`, `100ms`, `1.50s`, `1m0s`.
fn fmt_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        fmt_duration(ms / 1000)
    } else if ms < 1000 {
        format!("{ms}ms")
    } else {
        fmt_latency(ms as f64)
    }
}

/// `  IPv6 N` after the IPv4 table's capacity; nothing where the IPv6 capacity is unknown (an
/// older agent's answer).
fn ipv6_capacity(capacity: u32) -> String {
    if capacity == 0 {
        String::new()
    } else {
        format!("  IPv6 {capacity}")
    }
}

/// The connection table's part of `xdplb status`: its capacity and hit ratio, its settings, the
/// total of every event (in the data path's order, on the grid of the reasons above), then a line
/// per backend removed from its VIP whose established flows still go to it.
///
/// The hit ratio is the share of lookups (every packet to a VIP but a TCP SYN) that went to the
/// remembered backend: hit / (hit + miss + remapped + expired). Remapped and expired lookups
/// found an entry that could not be honoured; leaving them out (hit / (hit + miss)) would hide a
/// table whose entries keep pointing at failed backends or outlive the UDP timeout. `-` before
/// the first lookup.
fn render_flow_table(out: &mut String, f: &FlowTableStatus) {
    let count = |name: &str| {
        f.events
            .iter()
            .find(|e| e.event == name)
            .map_or(0, |e| e.count)
    };
    let hit = count("hit");
    let lookups = hit + count("miss") + count("remapped") + count("expired");
    let ratio = if lookups == 0 {
        "- (no lookups yet)".to_string()
    } else if hit == lookups {
        format!("100% of {} lookups", human(lookups as f64))
    } else {
        // Never rounded up to 100%: that would claim no lookup went astray.
        format!(
            "{:.1}% of {} lookups",
            (100.0 * hit as f64 / lookups as f64).min(99.9),
            human(lookups as f64)
        )
    };
    let _ = writeln!(
        out,
        "Connection table  capacity {}{}  hit ratio {ratio}",
        f.capacity,
        ipv6_capacity(f.capacity_v6)
    );
    let _ = writeln!(
        out,
        "udp idle timeout {}  insert bound {}  remove grace {}",
        if f.udp_idle_timeout_secs == 0.0 {
            "never".to_string()
        } else {
            fmt_secs(f.udp_idle_timeout_secs)
        },
        if f.insert_rate_limit == 0 {
            "none".to_string()
        } else {
            format!("{}/s per CPU", f.insert_rate_limit)
        },
        fmt_secs(f.remove_grace_secs),
    );
    let _ = writeln!(out, "{:<24} {:>12}", "Flow event", "Count");
    for e in &f.events {
        let _ = writeln!(out, "{:<24} {:>12}", e.event, e.count);
    }
    for r in &f.removing {
        let left = if r.remaining_secs > 0.0 {
            // Rounded up: "0s more" would read as already over.
            format!(
                "flows stay for {} more",
                fmt_duration(r.remaining_secs.ceil() as u64)
            )
        } else {
            "its flows are being remapped".to_string()
        };
        let _ = writeln!(
            out,
            "backend {} of vip {}: removed, {left}",
            r.backend, r.vip
        );
    }
}

/// Figure columns of the services table.
const FIGURES: usize = 7;

/// One line of the services table.
struct Row {
    /// `PROT ADDR:PORT` or `  -> ADDR`, left-aligned.
    lead: String,
    mid: Mid,
    /// Right-aligned figures.
    cols: [String; FIGURES],
    /// Free text at the end of the line (not padded).
    tail: String,
}

/// The text columns after the lead: a service's name spans the two columns a backend has there.
enum Mid {
    Span(String),
    Split(String, String),
}

/// Lays the rows out on one grid: every column as wide as its widest cell.
fn render_rows(out: &mut String, rows: &[Row]) {
    let width = |s: &str| s.chars().count();
    let lead_w = rows.iter().map(|r| width(&r.lead)).max().unwrap_or(0);
    let (mut state_w, mut weight_w, mut span_w) = (0, 0, 0);
    let mut col_w = [0; FIGURES];
    for r in rows {
        match &r.mid {
            Mid::Span(name) => span_w = span_w.max(width(name)),
            Mid::Split(state, weight) => {
                state_w = state_w.max(width(state));
                weight_w = weight_w.max(width(weight));
            }
        }
        for (w, c) in col_w.iter_mut().zip(&r.cols) {
            *w = (*w).max(width(c));
        }
    }
    // A long service name widens the state column, so both kinds of line keep one grid.
    state_w = state_w.max(span_w.saturating_sub(weight_w + 2));
    let mid_w = state_w + 2 + weight_w;
    for r in rows {
        let mut line = format!("{:<lead_w$}  ", r.lead);
        match &r.mid {
            Mid::Span(name) => {
                let _ = write!(line, "{name:<mid_w$}");
            }
            Mid::Split(state, weight) => {
                let _ = write!(line, "{state:<state_w$}  {weight:<weight_w$}");
            }
        }
        for (w, c) in col_w.iter().zip(&r.cols) {
            let _ = write!(line, "  {c:>w$}");
        }
        let _ = write!(line, "  {}", r.tail);
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// `[BACKUP]`, `[ALL DOWN: keep-last]`, `[NO BACKEND]`; nothing when the primaries serve.
fn serving_flag(serving: &str) -> String {
    match serving {
        "ok" => String::new(),
        "backup" => "[BACKUP]".into(),
        "all-down: keep-last" => "[ALL DOWN: keep-last]".into(),
        "no backend" => "[NO BACKEND]".into(),
        other => format!("[{}]", other.to_uppercase()),
    }
}

/// UP | DOWN | DRAIN | BACKUP | UNRESOLVED, with `(bk)` after a backup's state when it is not
/// the standby itself (a backup serving, down, draining or unresolved).
fn backend_state(b: &BackendStatus) -> String {
    let word = match b.state.as_str() {
        "draining" => "DRAIN".to_string(),
        other => other.to_uppercase(),
    };
    if b.role == "backup" && b.state != "backup" {
        format!("{word} (bk)")
    } else {
        word
    }
}

/// The weight in force, and the config's when an operator changed it: `2 (cfg 1)`.
fn backend_weight(b: &BackendStatus) -> String {
    if b.weight == b.config_weight {
        b.weight.to_string()
    } else {
        format!("{} (cfg {})", b.weight, b.config_weight)
    }
}

/// `tcp:8080 connected 0.3ms`, `http:80 HTTP 500 (expected 200-399) 1.2ms`, `exec no result
/// yet`; `-` when the backend is not checked.
fn health_words(h: &HealthStatus) -> String {
    if h.check == "none" {
        return "-".into();
    }
    let mut words = if h.check == "exec" {
        h.check.clone()
    } else {
        format!("{}:{}", h.check, h.port)
    };
    match &h.last_detail {
        Some(detail) => {
            let _ = write!(words, " {detail}");
        }
        None => words.push_str(" no result yet"),
    }
    if let Some(ms) = h.last_latency_ms {
        let _ = write!(words, " {}", fmt_latency(ms));
    }
    words
}

/// `0.3ms`, `12.5ms`, `250ms`, `1.50s`.
fn fmt_latency(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else if ms >= 99.95 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

/// A figure shortened with decimal prefixes, at most 4 digits: `0`, `0.5`, `999`, `1.0K`, `12.3M`,
/// `123G`. Below 10 a fraction keeps one decimal (a rate of half a packet per second is `0.5`).
fn human(v: f64) -> String {
    const PREFIXES: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];
    if !v.is_finite() || v <= 0.0 {
        return if v.is_nan() { "-".into() } else { "0".into() };
    }
    let mut x = v;
    let mut i = 0;
    while x >= 999.5 && i + 1 < PREFIXES.len() {
        x /= 1000.0;
        i += 1;
    }
    if i == 0 {
        if x < 9.95 && x.fract() != 0.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.0}")
        }
    } else if x < 99.95 {
        format!("{x:.1}{}", PREFIXES[i])
    } else {
        format!("{x:.0}{}", PREFIXES[i])
    }
}

pub fn render_which(w: &WhichBackend) -> String {
    match (&w.backend, w.slot) {
        (Some(b), Some(slot)) => format!(
            "{} from {} -> backend {} (vip {}, hash {:#010x}, slot {})\n",
            w.service, w.source, b, w.vip, w.hash, slot
        ),
        _ => format!(
            "{} from {} -> no backend (vip {} has no usable backend; packets are dropped)\n",
            w.service, w.source, w.vip
        ),
    }
}

/// Renders a sample of the connection table (`xdplb flows`): a line per flow, then what the
/// sample covers. `limit` is the most flows asked for: fewer means the walk read the whole
/// table, so every matching flow is shown; as many means more may follow.
///
/// `Updated` is how long ago the entry was written: for UDP by the flow's last packet, for TCP
/// by its SYN (or the packet that remapped it), so it is a UDP flow's idle time but a TCP
/// flow's age; the data path does not track TCP idleness.
pub fn render_flows(r: &FlowsReport, limit: usize) -> String {
    let mut rows: Vec<[String; 6]> =
        vec![["Client", "Service", "VIP", "Backend", "State", "Updated"].map(String::from)];
    for f in &r.flows {
        rows.push([
            f.client.clone(),
            f.service.clone(),
            f.vip.clone().unwrap_or_else(|| "-".into()),
            // The id is all that is left of a backend no longer in its VIP; it tells two such
            // flows apart.
            f.backend
                .clone()
                .unwrap_or_else(|| format!("- (id {})", f.backend_id)),
            f.state.to_uppercase(),
            fmt_ago(f.idle_secs),
        ]);
    }
    let mut width = [0; 6];
    for row in &rows {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    if r.flows.is_empty() {
        let _ = writeln!(out, "(no flows)");
    } else {
        for row in &rows {
            let mut line = String::new();
            for (i, (w, c)) in width.iter().zip(row).enumerate() {
                // The time, the only figure, is right-aligned.
                if i == 5 {
                    let _ = write!(line, "{c:>w$}");
                } else {
                    let _ = write!(line, "{c:<w$}  ");
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    let n = r.flows.len();
    let flows = if n == 1 { "flow" } else { "flows" };
    if n < limit && r.scan_capped {
        let _ = writeln!(
            out,
            "showing {n} {flows} found in the first {} entries of the table (a listing reads at \
             most that many); capacity {}{}",
            r.scanned,
            r.capacity,
            ipv6_capacity(r.capacity_v6)
        );
    } else if n < limit {
        let _ = writeln!(
            out,
            "showing {n} {flows}, all found in the table's {} entries; capacity {}{}",
            r.scanned,
            r.capacity,
            ipv6_capacity(r.capacity_v6)
        );
    } else {
        let _ = writeln!(
            out,
            "showing {n} {flows}, the first found in {} entries scanned (there may be more: \
             --limit); capacity {}{}",
            r.scanned,
            r.capacity,
            ipv6_capacity(r.capacity_v6)
        );
    }
    out
}

/// How long ago a flow's entry was written: `0.3s ago`, `12s ago`, `5m3s ago`.
fn fmt_ago(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        "-".into()
    } else {
        format!("{} ago", fmt_span(secs))
    }
}

/// An elapsed time: `0.3s`, `12s`, `5m3s`.
fn fmt_span(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        "-".into()
    } else if secs < 9.95 {
        format!("{secs:.1}s")
    } else {
        fmt_duration(secs.round() as u64)
    }
}

/// A setting's duration: `30s`, `1m0s`, `500ms`, `1.50s`.
fn fmt_secs(secs: f64) -> String {
    if secs.fract() == 0.0 {
        fmt_duration(secs as u64)
    } else {
        fmt_latency(secs * 1000.0)
    }
}

fn fmt_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d{h}h{m}m")
    } else if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(check: &str, state: &str, detail: Option<&str>, ms: Option<f64>) -> HealthStatus {
        HealthStatus {
            check: check.into(),
            port: 8080,
            state: state.into(),
            last_ok: detail.map(|_| state == "up"),
            last_detail: detail.map(String::from),
            last_latency_ms: ms,
            last_check_unix: detail.map(|_| 1_700_000_000),
            checks: 10,
            failures: u64::from(state == "down") * 3,
            transitions: u64::from(state == "down"),
        }
    }

    fn backend(address: &str, state: &str, role: &str, h: HealthStatus) -> BackendStatus {
        let in_table = state == "up";
        BackendStatus {
            address: address.into(),
            weight: 1,
            config_weight: 1,
            state: state.into(),
            role: role.into(),
            drained: state == "draining",
            in_table,
            health: h,
            mac: (state != "unresolved").then(|| "02:00:00:00:00:0b".into()),
            slots: 0,
            share: 0.0,
            packets: 0,
            bytes: 0,
            pps: 0.0,
            bps: 0.0,
            new_flows: 0,
            fps: 0.0,
        }
    }

    fn sample() -> Status {
        let mut up = backend(
            "10.0.0.11",
            "up",
            "primary",
            health("tcp", "up", Some("connected"), Some(0.31)),
        );
        up.weight = 2;
        up.slots = 65537;
        up.share = 1.0;
        (up.packets, up.bytes, up.pps, up.bps) = (1_234_567, 987_654_321, 1520.0, 1_540_000.0);
        (up.new_flows, up.fps) = (81_234, 1234.0);
        Status {
            version: "0.1.0".into(),
            interface: "eth0".into(),
            ifindex: 2,
            interface_mac: "02:00:00:00:00:01".into(),
            xdp_mode: Some("driver".into()),
            program_id: Some(42),
            uptime_secs: 3725,
            log_level: "info".into(),
            table_rebuilds: 1,
            health_transitions: 2,
            vips: vec![
                VipStatus {
                    name: "web".into(),
                    address: "10.0.0.100".into(),
                    port: 80,
                    protocol: "tcp".into(),
                    table_size: 65537,
                    usable_backends: 1,
                    serving: "ok".into(),
                    all_down: "keep-last".into(),
                    packets: 1_234_567,
                    bytes: 987_654_321,
                    pps: 1520.0,
                    bps: 1_540_000.0,
                    new_flows: 81_234,
                    fps: 1234.0,
                    backends: vec![
                        up,
                        backend(
                            "10.0.0.12",
                            "down",
                            "primary",
                            health(
                                "http",
                                "down",
                                Some("HTTP 500 (expected 200-399)"),
                                Some(1.25),
                            ),
                        ),
                        backend(
                            "10.0.0.13",
                            "draining",
                            "primary",
                            health("none", "none", None, None),
                        ),
                        backend(
                            "10.0.0.21",
                            "backup",
                            "backup",
                            health("tcp", "unknown", None, None),
                        ),
                    ],
                },
                VipStatus {
                    name: "dns".into(),
                    address: "10.0.0.101".into(),
                    port: 53,
                    protocol: "udp".into(),
                    table_size: 251,
                    usable_backends: 1,
                    serving: "all-down: keep-last".into(),
                    all_down: "keep-last".into(),
                    packets: 42,
                    bytes: 4200,
                    pps: 0.5,
                    bps: 50.0,
                    new_flows: 40,
                    fps: 0.5,
                    backends: vec![BackendStatus {
                        in_table: true,
                        slots: 251,
                        share: 1.0,
                        packets: 42,
                        bytes: 4200,
                        pps: 0.5,
                        bps: 50.0,
                        new_flows: 40,
                        fps: 0.5,
                        ..backend(
                            "10.0.0.31",
                            "down",
                            "primary",
                            health("udp", "down", Some("timeout after 300ms"), Some(300.0)),
                        )
                    }],
                },
                VipStatus {
                    name: "mail".into(),
                    address: "10.0.0.102".into(),
                    port: 25,
                    protocol: "tcp".into(),
                    table_size: 251,
                    usable_backends: 0,
                    serving: "no backend".into(),
                    all_down: "drop".into(),
                    packets: 0,
                    bytes: 0,
                    pps: 0.0,
                    bps: 0.0,
                    new_flows: 0,
                    fps: 0.0,
                    backends: vec![backend(
                        "10.0.0.41",
                        "unresolved",
                        "backup",
                        health("exec", "unknown", None, None),
                    )],
                },
            ],
            reasons: vec![ReasonStatus {
                reason: "pass_not_vip".into(),
                action: "pass".into(),
                packets: 3,
                bytes: 180,
            }],
            flows: FlowTableStatus {
                capacity: 1_048_576,
                capacity_v6: 262_144,
                udp_idle_timeout_secs: 30.0,
                insert_rate_limit: 100_000,
                remove_grace_secs: 60.0,
                events: events(&[
                    ("hit", 990),
                    ("miss", 4),
                    ("syn", 81_274),
                    ("insert", 81_283),
                    ("insert_rate_limited", 1),
                    ("remapped", 5),
                    ("expired", 1),
                    ("insert_failed", 0),
                ]),
                removing: vec![RemovingStatus {
                    vip: "web".into(),
                    backend: "10.0.0.14".into(),
                    remaining_secs: 41.3,
                }],
            },
            ha: None,
        }
    }

    /// The wall clock of the HA tests, in Unix milliseconds.
    const NOW_MS: u64 = 1_700_000_000_000;

    fn ip<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap()
    }

    /// A master with every condition met, heard by a peer whose tables match.
    fn ha_master() -> HaStatus {
        use crate::ha::{HaCounters, MasterStatus, PeerTables, TrackStatus, Transition};
        let track = |what: &str| TrackStatus {
            what: what.into(),
            ok: true,
        };
        HaStatus {
            state: "master".into(),
            interface: "eth0".into(),
            vrid: 51,
            priority: 200,
            effective_priority: 200,
            advert_interval_ms: 1000,
            preempt: true,
            source: ip("10.0.0.2"),
            peers: Vec::new(),
            master: Some(MasterStatus {
                address: ip("10.0.0.2"),
                priority: 200,
                advert_interval_ms: 1000,
                local: true,
            }),
            held: false,
            last_transition: Some(Transition {
                at_unix_ms: NOW_MS - 125_000,
                from: "backup".into(),
                to: "master".into(),
                reason: "no advertisement from the master 10.0.0.3 for 3.22 s".into(),
            }),
            tracking: vec![
                track("dataplane"),
                track("interface eth0"),
                track("vip web"),
            ],
            counters: HaCounters {
                adverts_sent: 1234,
                adverts_received: 56,
                discarded: [
                    ("length", 0),
                    ("ttl", 3),
                    ("version", 0),
                    ("checksum", 1),
                    ("vrid", 2),
                    ("own", 0),
                    ("not_peer", 0),
                    ("interval", 0),
                ]
                .into_iter()
                .map(|(r, n)| (r.to_string(), n))
                .collect(),
                address_mismatch: 0,
                priority_zero_received: 0,
                became_master: 2,
                became_backup: 3,
                became_fault: 0,
                split_brain: 1,
                send_errors: 0,
            },
            peer_tables: Some(PeerTables {
                peer: ip("10.0.0.3"),
                digest: "9f86d081884c7d65".into(),
                own_digest: "9f86d081884c7d65".into(),
                matches: true,
                age_ms: 400,
                differs_for_ms: None,
            }),
            vips: vec![ip("10.0.0.100"), ip("10.0.0.101")],
            vip_addresses: vec![ip("10.0.0.100"), ip("10.0.0.101")],
            virtual_mac: None,
        }
    }

    #[test]
    fn renders_a_master() {
        let text = render_ha_at(&ha_master(), NOW_MS);
        println!("{text}");
        assert_eq!(
            text,
            "HA  MASTER  vrid 51  priority 200\n\
             interface eth0  source 10.0.0.2  multicast  advert 1s  preempt on\n\
             master: this node (10.0.0.2, priority 200)\n\
             last transition: backup -> master 2m5s ago: no advertisement from the master \
             10.0.0.3 for 3.22 s\n\
             tracking: dataplane ok, interface eth0 ok, vip web ok\n\
             addresses held: 10.0.0.100, 10.0.0.101\n\
             peer tables: match (10.0.0.3, heard 0.4s ago)\n\
             adverts: sent 1234, received 56, discarded: checksum 1, ttl 3, vrid 2\n\
             transitions: to master 2, to backup 3, to fault 0; split brain 1\n"
        );
        for l in text.lines() {
            assert!(
                l.chars().count() <= 120,
                "{} columns: {l}",
                l.chars().count()
            );
        }
        // A master missing one of its addresses says so.
        let mut h = ha_master();
        h.vips.pop();
        let text = render_ha_at(&h, NOW_MS);
        assert!(
            text.contains("addresses held: 10.0.0.100 (missing: 10.0.0.101)\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_held_backup_with_failing_tracking() {
        use crate::ha::MasterStatus;
        let mut h = ha_master();
        h.state = "backup".into();
        h.held = true;
        h.peers = vec![ip("10.0.0.3")];
        h.effective_priority = 150;
        h.tracking[2].ok = false;
        h.master = Some(MasterStatus {
            address: ip("10.0.0.3"),
            priority: 180,
            advert_interval_ms: 500,
            local: false,
        });
        h.vips.clear();
        h.virtual_mac = Some("00:00:5e:00:01:33".into());
        h.counters.discarded.values_mut().for_each(|n| *n = 0);
        h.counters.send_errors = 4;
        h.counters.address_mismatch = 7;
        h.peer_tables = None;
        let text = render_ha_at(&h, NOW_MS);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "HA  BACKUP  vrid 51  priority 200, effective 150 (tracking: vip web failing)"
        );
        assert_eq!(
            lines[1],
            "interface eth0  source 10.0.0.2  unicast to 10.0.0.3  advert 1s  preempt on (held)"
        );
        assert_eq!(
            lines[2],
            "handover in force: not preempting until `xdplb ha resume`"
        );
        assert_eq!(lines[3], "master: 10.0.0.3 (priority 180, advert 500ms)");
        assert_eq!(
            lines[5],
            "tracking: dataplane ok, interface eth0 ok, vip web FAILING"
        );
        assert_eq!(
            lines[6],
            "addresses held: none (as master: 10.0.0.100, 10.0.0.101)"
        );
        assert_eq!(lines[7], "virtual MAC: 00:00:5e:00:01:33");
        assert_eq!(lines[8], "peer tables: not heard yet");
        assert_eq!(lines[9], "adverts: sent 1234, received 56, discarded: none");
        assert_eq!(
            lines[10],
            "transitions: to master 2, to backup 3, to fault 0; split brain 1; address list \
             mismatch 7; send errors 4"
        );
        assert_eq!(lines.len(), 11, "{text}");
        assert_eq!(ha_state_line(&h), lines[0]);

        // The data path detached: a fault, priority 0; nothing known yet.
        h.state = "fault".into();
        h.held = false;
        h.effective_priority = 0;
        h.tracking[0].ok = false;
        h.master = None;
        h.last_transition = None;
        h.vip_addresses.clear();
        let text = render_ha_at(&h, NOW_MS);
        for want in [
            "HA  FAULT  vrid 51  priority 200, effective 0 (tracking: dataplane, vip web \
             failing)\n",
            "\ninterface eth0  source 10.0.0.2  unicast to 10.0.0.3  advert 1s  preempt on\n",
            "\nmaster: unknown (none heard)\n",
            "\nlast transition: none yet\n",
            "\naddresses held: none (no VIP addresses)\n",
        ] {
            assert!(text.contains(want), "{want:?}\n{text}");
        }
        assert!(!text.contains("handover"), "{text}");
    }

    #[test]
    fn warns_when_the_peer_tables_differ() {
        let mut h = ha_master();
        let p = h.peer_tables.as_mut().unwrap();
        p.matches = false;
        p.digest = "0a1b2c3d4e5f6071".into();
        p.differs_for_ms = Some(6200);
        p.age_ms = 1100;
        let text = render_ha_at(&h, NOW_MS);
        assert!(
            text.lines().any(|l| l
                == "WARNING: peer tables DIFFER from 10.0.0.3 for 6.2s (digest 9f86d081884c7d65 \
                    here, 0a1b2c3d4e5f6071 there, heard 1.1s ago): after a failover some flows \
                    would move"),
            "{text}"
        );
        assert!(!text.contains("peer tables: match"), "{text}");
        // A transition stamped ahead of this clock (the clocks of agent and CLI differ) is not
        // in the future.
        h.last_transition.as_mut().unwrap().at_unix_ms = NOW_MS + 5000;
        let text = render_ha_at(&h, NOW_MS);
        assert!(
            text.contains("last transition: backup -> master 0.0s ago: "),
            "{text}"
        );
    }

    #[test]
    fn status_shows_the_ha_section_last_only_when_configured() {
        let text = render(&sample());
        assert!(!text.contains("HA  "), "{text}");
        let mut s = sample();
        s.ha = Some(ha_master());
        let text = render(&s);
        let at = text
            .find("\n\nHA  MASTER  vrid 51  ")
            .expect("no HA section");
        assert!(text.find("Connection table").unwrap() < at, "{text}");
        assert!(text.ends_with("split brain 1\n"), "{text}");
        // JSON without the field (an agent from before HA) reads as no HA.
        let mut v = serde_json::to_value(&s).unwrap();
        let back: Status = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, s);
        v.as_object_mut().unwrap().remove("ha");
        let back: Status = serde_json::from_value(v).unwrap();
        assert_eq!(back.ha, None);
    }

    fn events(counts: &[(&str, u64)]) -> Vec<FlowEventStatus> {
        counts
            .iter()
            .map(|(event, count)| FlowEventStatus {
                event: event.to_string(),
                count: *count,
            })
            .collect()
    }

    /// The line of the table that starts with `lead`.
    fn line<'a>(text: &'a str, lead: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(lead))
            .unwrap_or_else(|| panic!("no line starting with {lead:?}\n{text}"))
    }

    #[test]
    fn renders_services_backends_and_reasons() {
        let text = render(&sample());
        println!("{text}");
        assert!(text.starts_with("xdplb 0.1.0  eth0 (ifindex 2, "), "{text}");
        assert!(text.contains("up 1h2m5s"), "{text}");
        assert!(text.contains("health changes 2"), "{text}");
        let web = line(&text, "TCP  10.0.0.100:80");
        for word in [
            " web ", " 65537 ", " 1/4 ", " 1.5K ", " 12.3M ", " 1.2M ", " 988M",
        ] {
            assert!(web.contains(word), "{word:?} in {web}");
        }
        // The primaries serve: no flag.
        assert!(!web.contains('['), "{web}");
        let up = line(&text, "  -> 10.0.0.11");
        for word in [
            " UP ",
            " 2 (cfg 1) ",
            " 100.0% ",
            "tcp:8080 connected 0.3ms",
        ] {
            assert!(up.contains(word), "{word:?} in {up}");
        }
        assert!(text.contains("pass_not_vip"), "{text}");
    }

    #[test]
    fn renders_down_draining_backup_and_degraded_services_in_words() {
        let text = render(&sample());
        let down = line(&text, "  -> 10.0.0.12");
        assert!(down.contains(" DOWN "), "{down}");
        assert!(
            down.ends_with("http:8080 HTTP 500 (expected 200-399) 1.2ms"),
            "{down}"
        );
        let drain = line(&text, "  -> 10.0.0.13");
        assert!(drain.contains(" DRAIN "), "{drain}");
        assert!(drain.ends_with(" -"), "{drain}");
        let backup = line(&text, "  -> 10.0.0.21");
        assert!(backup.contains(" BACKUP "), "{backup}");
        assert!(backup.ends_with("tcp:8080 no result yet"), "{backup}");
        let dns = line(&text, "UDP  10.0.0.101:53");
        assert!(dns.ends_with("[ALL DOWN: keep-last]"), "{dns}");
        assert!(
            line(&text, "  -> 10.0.0.31").ends_with("udp:8080 timeout after 300ms 300ms"),
            "{text}"
        );
        let mail = line(&text, "TCP  10.0.0.102:25");
        assert!(mail.ends_with("[NO BACKEND]"), "{mail}");
        let unresolved = line(&text, "  -> 10.0.0.41");
        assert!(unresolved.contains(" UNRESOLVED (bk) "), "{unresolved}");
        assert!(unresolved.ends_with("exec no result yet"), "{unresolved}");
        let mut s = sample();
        s.vips[0].serving = "backup".into();
        let text = render(&s);
        assert!(
            line(&text, "TCP  10.0.0.100:80").ends_with("[BACKUP]"),
            "{text}"
        );
    }

    #[test]
    fn columns_line_up_and_fit_a_terminal() {
        let text = render(&sample());
        let table: Vec<&str> = text.lines().skip(2).take_while(|l| !l.is_empty()).collect();
        assert_eq!(table.len(), 2 + 3 + 6, "{text}");
        // Every figure column ends at the same place on every line: find the end of the "Bytes"
        // heading, and check each service and backend line has a digit or prefix there, followed
        // by the gap before the last column.
        let end = table[0].find("Bytes").unwrap() + "Bytes".len();
        for l in &table[2..] {
            let b = l.as_bytes();
            assert!(b[end - 1].is_ascii_alphanumeric(), "{l:?}\n{text}");
            assert!(b.len() == end || b[end] == b' ', "{l:?}\n{text}");
        }
        let share = table[1].find("Share").unwrap() + "Share".len();
        for l in table[2..].iter().filter(|l| l.starts_with("  ->")) {
            assert_eq!(l.as_bytes()[share - 1], b'%', "{l:?}\n{text}");
        }
        // Even with the widest state and an operator's weight side by side, seven figure columns
        // leave room for a health check's usual words (`tcp:8080 connected 0.3ms`) within 125
        // columns; only a long detail (the last column) goes past it.
        let tail = table[0].find("Serving").unwrap();
        assert!(tail <= 101, "the last column starts at {tail}\n{text}");
        assert_eq!(table[1].find("Health"), Some(tail), "{text}");
        for l in text.lines().filter(|l| !table.contains(l)) {
            assert!(
                l.chars().count() <= 120,
                "{} columns: {l}",
                l.chars().count()
            );
        }
    }

    #[test]
    fn shortens_figures_with_decimal_prefixes() {
        for (v, want) in [
            (0.0, "0"),
            (0.5, "0.5"),
            (7.0, "7"),
            (999.0, "999"),
            (999.6, "1.0K"),
            (1234.0, "1.2K"),
            (12_345_678.0, "12.3M"),
            (123_456_789_000.0, "123G"),
            (99_960.0, "100K"),
        ] {
            assert_eq!(human(v), want, "{v}");
        }
        assert_eq!(fmt_latency(0.31), "0.3ms");
        assert_eq!(fmt_latency(250.4), "250ms");
        assert_eq!(fmt_latency(1500.0), "1.50s");
    }

    #[test]
    fn renders_which_backend() {
        let w = WhichBackend {
            vip: "web".into(),
            service: "10.0.0.100:80/tcp".into(),
            source: "192.0.2.1:40000".into(),
            hash: 0xdead_beef,
            slot: Some(7),
            backend_id: Some(1),
            backend: Some("10.0.0.11".into()),
        };
        assert_eq!(
            render_which(&w),
            "10.0.0.100:80/tcp from 192.0.2.1:40000 -> backend 10.0.0.11 (vip web, hash \
             0xdeadbeef, slot 7)\n"
        );
        let none = WhichBackend {
            slot: None,
            backend_id: None,
            backend: None,
            ..w
        };
        assert!(render_which(&none).contains("-> no backend"));
    }

    #[test]
    fn new_flows_per_second_sit_before_the_packet_rates() {
        let text = render(&sample());
        let head = line(&text, "Prot Service");
        let conn = head.find("Conn/s").unwrap();
        assert!(conn < head.find("Pkt/s").unwrap(), "{head}");
        let end = conn + "Conn/s".len();
        for (lead, want) in [
            ("TCP  10.0.0.100:80", "1.2K"),
            ("  -> 10.0.0.11", "1.2K"),
            ("UDP  10.0.0.101:53", "0.5"),
            ("  -> 10.0.0.31", "0.5"),
            ("  -> 10.0.0.12", "0"),
        ] {
            let l = line(&text, lead);
            assert_eq!(&l[end - want.len()..end], want, "{l}\n{text}");
            assert_eq!(l.as_bytes()[end - want.len() - 1], b' ', "{l}");
        }
    }

    #[test]
    fn renders_the_connection_table_after_the_reasons() {
        let text = render(&sample());
        let section = &text[text.find("Connection table").expect("no section")..];
        assert!(
            text.find("pass_not_vip").unwrap() < text.find("Connection table").unwrap(),
            "{text}"
        );
        let lines: Vec<&str> = section.lines().collect();
        assert_eq!(
            lines[0],
            "Connection table  capacity 1048576  IPv6 262144  hit ratio 99.0% of 1.0K lookups"
        );
        assert_eq!(
            lines[1],
            "udp idle timeout 30s  insert bound 100000/s per CPU  remove grace 1m0s"
        );
        assert_eq!(lines[2], format!("{:<24} {:>12}", "Flow event", "Count"));
        // Every event in the data path's order, on the grid of the reasons table.
        let rows: Vec<(&str, &str)> = lines[3..11]
            .iter()
            .map(|l| {
                assert_eq!(l.len(), 37, "{l:?}");
                (l[..24].trim_end(), l[25..].trim_start())
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("hit", "990"),
                ("miss", "4"),
                ("syn", "81274"),
                ("insert", "81283"),
                ("insert_rate_limited", "1"),
                ("remapped", "5"),
                ("expired", "1"),
                ("insert_failed", "0"),
            ]
        );
        assert_eq!(
            lines[11],
            "backend 10.0.0.14 of vip web: removed, flows stay for 42s more"
        );
        assert_eq!(lines.len(), 12, "{section}");
    }

    #[test]
    fn the_hit_ratio_counts_every_lookup_and_never_rounds_up_to_all() {
        let ratio = |counts: &[(&str, u64)]| {
            let mut s = sample();
            s.flows.events = events(counts);
            let text = render(&s);
            line(&text, "Connection table").to_string()
        };
        // SYNs are decided without a lookup; remapped and expired ones found an entry they
        // could not use.
        assert!(
            ratio(&[("hit", 0), ("syn", 50)]).ends_with("hit ratio - (no lookups yet)"),
            "{}",
            ratio(&[("syn", 50)])
        );
        assert!(ratio(&[("hit", 7), ("syn", 50)]).ends_with("hit ratio 100% of 7 lookups"));
        assert!(
            ratio(&[("hit", 1), ("miss", 1), ("remapped", 1), ("expired", 1)])
                .ends_with("hit ratio 25.0% of 4 lookups")
        );
        assert!(
            ratio(&[("hit", 99_999), ("remapped", 1)]).ends_with("hit ratio 99.9% of 100K lookups")
        );
    }

    #[test]
    fn connection_table_settings_and_grace_in_words() {
        let mut s = sample();
        s.flows.udp_idle_timeout_secs = 0.0;
        s.flows.insert_rate_limit = 0;
        s.flows.remove_grace_secs = 0.5;
        s.flows.removing.push(RemovingStatus {
            vip: "dns".into(),
            backend: "10.0.0.32".into(),
            remaining_secs: 0.0,
        });
        s.flows.removing[0].remaining_secs = 3599.2;
        let text = render(&s);
        assert!(
            text.lines()
                .any(|l| l == "udp idle timeout never  insert bound none  remove grace 500ms"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "backend 10.0.0.14 of vip web: removed, flows stay for 1h0m0s more"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "backend 10.0.0.32 of vip dns: removed, its flows are being remapped"),
            "{text}"
        );
        assert_eq!(fmt_secs(30.0), "30s");
        assert_eq!(fmt_secs(90.0), "1m30s");
        assert_eq!(fmt_secs(1.5), "1.50s");
    }

    #[test]
    fn an_agent_without_a_connection_table_gets_no_section() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("flows");
        let s: Status = serde_json::from_value(v).unwrap();
        let text = render(&s);
        assert!(!text.contains("Connection table"), "{text}");
        assert!(text.ends_with(&format!(
            "{:<24} {:<6} {:>12} {:>14}\n",
            "pass_not_vip", "pass", 3, 180
        )));
    }

    fn flows_report() -> FlowsReport {
        let flow = |client: &str, backend: Option<&str>, state: &str, idle_secs: f64| FlowStatus {
            client: client.into(),
            service: "10.0.0.100:80/tcp".into(),
            vip: Some("web".into()),
            backend_id: 3,
            backend: backend.map(String::from),
            state: state.into(),
            idle_secs,
        };
        FlowsReport {
            capacity: 1_048_576,
            capacity_v6: 0,
            scanned: 1200,
            scan_capped: false,
            flows: vec![
                flow("192.0.2.1:40000", Some("10.0.0.11"), "stays", 0.31),
                flow("192.0.2.200:61234", Some("10.0.0.14"), "removing", 125.4),
                FlowStatus {
                    service: "10.0.0.101:53/udp".into(),
                    vip: None,
                    backend: None,
                    ..flow("198.51.100.7:5353", None, "expired", 31.0)
                },
            ],
        }
    }

    #[test]
    fn renders_flows_as_a_table_with_what_the_sample_covers() {
        let text = render_flows(&flows_report(), 100);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let head = lines[0];
        for (l, cells) in lines[1..4].iter().zip([
            [
                "192.0.2.1:40000",
                "10.0.0.100:80/tcp",
                "web",
                "10.0.0.11",
                "STAYS",
                "0.3s ago",
            ],
            [
                "192.0.2.200:61234",
                "10.0.0.100:80/tcp",
                "web",
                "10.0.0.14",
                "REMOVING",
                "2m5s ago",
            ],
            [
                "198.51.100.7:5353",
                "10.0.0.101:53/udp",
                "-",
                "- (id 3)",
                "EXPIRED",
                "31s ago",
            ],
        ]) {
            // Each text cell starts under its heading; the time ends under its own.
            for (cell, heading) in cells[..5]
                .iter()
                .zip(["Client", "Service", "VIP", "Backend", "State"])
            {
                let at = head.find(heading).unwrap();
                assert!(
                    l[at..].starts_with(cell),
                    "{cell:?} under {heading}\n{text}"
                );
            }
            assert!(l.ends_with(cells[5]), "{l}");
            assert_eq!(l.len(), head.len(), "{text}");
        }
        assert_eq!(
            lines[4],
            "showing 3 flows, all found in the table's 1200 entries; capacity 1048576"
        );
    }

    #[test]
    fn a_full_sample_says_there_may_be_more() {
        let text = render_flows(&flows_report(), 3);
        assert!(
            text.ends_with(
                "showing 3 flows, the first found in 1200 entries scanned (there may be more: \
                 --limit); capacity 1048576\n"
            ),
            "{text}"
        );
        let empty = FlowsReport {
            scanned: 0,
            scan_capped: false,
            flows: Vec::new(),
            ..flows_report()
        };
        assert_eq!(
            render_flows(&empty, 100),
            "(no flows)\nshowing 0 flows, all found in the table's 0 entries; capacity 1048576\n"
        );
        let one = FlowsReport {
            flows: flows_report().flows[..1].to_vec(),
            ..flows_report()
        };
        assert!(render_flows(&one, 100).contains("showing 1 flow,"));
        let capped = FlowsReport {
            scanned: 100_000,
            scan_capped: true,
            ..flows_report()
        };
        assert!(
            render_flows(&capped, 100).ends_with(
                "showing 3 flows found in the first 100000 entries of the table (a listing \
                 reads at most that many); capacity 1048576\n"
            ),
            "{}",
            render_flows(&capped, 100)
        );
        assert_eq!(fmt_ago(9.96), "10s ago");
        assert_eq!(fmt_ago(f64::NAN), "-");
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
