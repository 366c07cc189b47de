//! What `xdplb status` and `xdplb which-backend` show: the JSON model the agent's API returns, and
//! its rendering for a terminal (in the spirit of `ipvsadm -Ln --stats`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

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
    pub vips: Vec<VipStatus>,
    /// Every reason, in index order, with its totals.
    pub reasons: Vec<ReasonStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VipStatus {
    pub name: String,
    pub address: String,
    pub port: u16,
    pub protocol: String,
    pub table_size: u32,
    /// Backends that own at least one slot of the live table.
    pub usable_backends: u32,
    /// Forwarded packets and bytes.
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// up: MAC known, in the table if weight > 0; unresolved: no MAC yet (not in the table).
    pub state: String,
    pub mac: Option<String>,
    /// Slots of the live table, and their fraction of it.
    pub slots: u32,
    pub share: f64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReasonStatus {
    pub reason: String,
    /// tx | pass | drop
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
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

/// Renders the status for a terminal, one line per service and per backend, like
/// `ipvsadm -Ln --stats`.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "xdplb {}  interface {} (ifindex {}, {})  xdp {}  prog {}  up {}  log {}  rebuilds {}",
        s.version,
        s.interface,
        s.ifindex,
        s.interface_mac,
        s.xdp_mode.as_deref().unwrap_or("detached"),
        s.program_id.map_or("-".to_string(), |i| i.to_string()),
        fmt_duration(s.uptime_secs),
        s.log_level,
        s.table_rebuilds,
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<4} {:<22} {:<10} {:>7} {:>7} {:>8} {:>12} {:>14}",
        "Prot", "Service", "Name", "Table", "Usable", "", "Packets", "Bytes"
    );
    let _ = writeln!(
        out,
        "  -> {:<22} {:<10} {:>7} {:>7} {:>8} {:>12} {:>14}",
        "Backend", "State", "Weight", "Slots", "Share", "Packets", "Bytes"
    );
    for v in &s.vips {
        let _ = writeln!(
            out,
            "{:<4} {:<22} {:<10} {:>7} {:>7} {:>8} {:>12} {:>14}",
            v.protocol.to_uppercase(),
            format!("{}:{}", v.address, v.port),
            v.name,
            v.table_size,
            format!("{}/{}", v.usable_backends, v.backends.len()),
            "",
            v.packets,
            v.bytes
        );
        for b in &v.backends {
            let _ = writeln!(
                out,
                "  -> {:<22} {:<10} {:>7} {:>7} {:>7.1}% {:>12} {:>14}",
                b.address,
                b.state,
                b.weight,
                b.slots,
                b.share * 100.0,
                b.packets,
                b.bytes
            );
        }
    }
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
    out
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

    fn sample() -> Status {
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
            vips: vec![VipStatus {
                name: "web".into(),
                address: "10.0.0.100".into(),
                port: 80,
                protocol: "tcp".into(),
                table_size: 65537,
                usable_backends: 1,
                packets: 10,
                bytes: 1000,
                backends: vec![BackendStatus {
                    address: "10.0.0.11".into(),
                    weight: 1,
                    state: "up".into(),
                    mac: Some("02:00:00:00:00:0b".into()),
                    slots: 65537,
                    share: 1.0,
                    packets: 10,
                    bytes: 1000,
                }],
            }],
            reasons: vec![ReasonStatus {
                reason: "pass_not_vip".into(),
                action: "pass".into(),
                packets: 3,
                bytes: 180,
            }],
        }
    }

    #[test]
    fn renders_services_backends_and_reasons() {
        let text = render(&sample());
        assert!(text.contains("TCP  10.0.0.100:80"), "{text}");
        assert!(text.contains(" web "), "{text}");
        assert!(text.contains("-> 10.0.0.11"), "{text}");
        assert!(text.contains("100.0%"), "{text}");
        assert!(text.contains("pass_not_vip"), "{text}");
        assert!(text.contains("up 1h2m5s"), "{text}");
    }

    #[test]
    fn json_round_trips() {
        let s = sample();
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
