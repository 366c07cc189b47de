//! Prometheus text exposition (format 0.0.4) of the agent's status, served at `GET /metrics`.
//!
//! Names follow Prometheus conventions: `xdplb_` prefix, `_total` for counters, base units
//! (bytes, seconds). Every series of a VIP carries `vip` (its name) and `service`
//! (`address:port/protocol`); backend series add `backend` (its address). The figures are the
//! same ones `xdplb status` shows, read from the kernel's maps at scrape time.

use std::fmt::Write as _;

use crate::status::Status;

/// Escapes a label value: backslash, double quote and newline.
fn esc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// `# HELP` and `# TYPE` lines, then one sample per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The whole exposition for one status snapshot.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "xdplb_info",
        "gauge",
        "The running agent: version, interface, XDP attach mode (1).",
        &[(
            format!(
                "version=\"{}\",interface=\"{}\",xdp_mode=\"{}\"",
                esc(&s.version),
                esc(&s.interface),
                esc(s.xdp_mode.as_deref().unwrap_or("detached"))
            ),
            "1".into(),
        )],
    );
    family(
        &mut out,
        "xdplb_uptime_seconds",
        "gauge",
        "Seconds since the agent started.",
        &[(String::new(), s.uptime_secs.to_string())],
    );
    family(
        &mut out,
        "xdplb_table_rebuilds_total",
        "counter",
        "Maglev tables built and published since the agent started.",
        &[(String::new(), s.table_rebuilds.to_string())],
    );

    let vip_label = |v: &crate::status::VipStatus| {
        format!(
            "vip=\"{}\",service=\"{}:{}/{}\"",
            esc(&v.name),
            esc(&v.address),
            v.port,
            esc(&v.protocol)
        )
    };
    let per_vip = |f: &dyn Fn(&crate::status::VipStatus) -> String| {
        s.vips
            .iter()
            .map(|v| (vip_label(v), f(v)))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "xdplb_vip_packets_total",
        "counter",
        "Packets forwarded for the service.",
        &per_vip(&|v| v.packets.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_bytes_total",
        "counter",
        "Bytes forwarded for the service.",
        &per_vip(&|v| v.bytes.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_usable_backends",
        "gauge",
        "Backends that own slots of the service's live table.",
        &per_vip(&|v| v.usable_backends.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_table_size",
        "gauge",
        "Entries of the service's Maglev table (M).",
        &per_vip(&|v| v.table_size.to_string()),
    );

    let per_backend = |f: &dyn Fn(&crate::status::BackendStatus) -> String| {
        s.vips
            .iter()
            .flat_map(|v| {
                v.backends.iter().map(move |b| {
                    (
                        format!("{},backend=\"{}\"", vip_label(v), esc(&b.address)),
                        f(b),
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "xdplb_backend_packets_total",
        "counter",
        "Packets forwarded to the backend for the service.",
        &per_backend(&|b| b.packets.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_bytes_total",
        "counter",
        "Bytes forwarded to the backend for the service.",
        &per_backend(&|b| b.bytes.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_up",
        "gauge",
        "1 if the backend can take packets (its MAC is known), else 0.",
        &per_backend(&|b| u8::from(b.state == "up").to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_weight",
        "gauge",
        "The backend's configured weight.",
        &per_backend(&|b| b.weight.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_table_share",
        "gauge",
        "Fraction of the service's live table that points at the backend.",
        &per_backend(&|b| b.share.to_string()),
    );

    let per_reason = |f: &dyn Fn(&crate::status::ReasonStatus) -> String| {
        s.reasons
            .iter()
            .map(|r| {
                (
                    format!(
                        "reason=\"{}\",action=\"{}\"",
                        esc(&r.reason),
                        esc(&r.action)
                    ),
                    f(r),
                )
            })
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "xdplb_reason_packets_total",
        "counter",
        "Packets the data path did not forward, by reason (forwarded ones are per service).",
        &per_reason(&|r| r.packets.to_string()),
    );
    family(
        &mut out,
        "xdplb_reason_bytes_total",
        "counter",
        "Bytes the data path did not forward, by reason.",
        &per_reason(&|r| r.bytes.to_string()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, ReasonStatus, VipStatus};

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            interface: "eth0".into(),
            ifindex: 2,
            interface_mac: "02:00:00:00:00:02".into(),
            xdp_mode: Some("driver".into()),
            program_id: Some(7),
            uptime_secs: 42,
            log_level: "info".into(),
            table_rebuilds: 3,
            vips: vec![VipStatus {
                name: "web \"main\"".into(),
                address: "10.0.0.100".into(),
                port: 80,
                protocol: "tcp".into(),
                table_size: 65537,
                usable_backends: 1,
                packets: 1000,
                bytes: 64000,
                backends: vec![
                    BackendStatus {
                        address: "10.0.0.11".into(),
                        weight: 1,
                        state: "up".into(),
                        mac: Some("02:00:00:00:00:11".into()),
                        slots: 65537,
                        share: 1.0,
                        packets: 1000,
                        bytes: 64000,
                    },
                    BackendStatus {
                        address: "10.0.0.12".into(),
                        weight: 2,
                        state: "unresolved".into(),
                        mac: None,
                        slots: 0,
                        share: 0.0,
                        packets: 0,
                        bytes: 0,
                    },
                ],
            }],
            reasons: vec![ReasonStatus {
                reason: "pass_not_vip".into(),
                action: "pass".into(),
                packets: 5,
                bytes: 300,
            }],
        }
    }

    #[test]
    fn renders_every_family_with_escaped_labels() {
        let text = render(&status());
        let vip = r#"vip="web \"main\"",service="10.0.0.100:80/tcp""#;
        for line in [
            r#"xdplb_info{version="0.1.0",interface="eth0",xdp_mode="driver"} 1"#.to_string(),
            "xdplb_uptime_seconds 42".into(),
            "xdplb_table_rebuilds_total 3".into(),
            format!("xdplb_vip_packets_total{{{vip}}} 1000"),
            format!("xdplb_vip_bytes_total{{{vip}}} 64000"),
            format!("xdplb_vip_usable_backends{{{vip}}} 1"),
            format!(r#"xdplb_backend_packets_total{{{vip},backend="10.0.0.11"}} 1000"#),
            format!(r#"xdplb_backend_up{{{vip},backend="10.0.0.11"}} 1"#),
            format!(r#"xdplb_backend_up{{{vip},backend="10.0.0.12"}} 0"#),
            format!(r#"xdplb_backend_weight{{{vip},backend="10.0.0.12"}} 2"#),
            format!(r#"xdplb_backend_table_share{{{vip},backend="10.0.0.11"}} 1"#),
            r#"xdplb_reason_packets_total{reason="pass_not_vip",action="pass"} 5"#.into(),
            r#"xdplb_reason_bytes_total{reason="pass_not_vip",action="pass"} 300"#.into(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // Every family has HELP and TYPE, and every sample line belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            declared.len(),
            text.lines().filter(|l| l.starts_with("# HELP ")).count()
        );
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(&name), "undeclared {name}");
        }
    }

    #[test]
    fn escapes_backslash_quote_and_newline() {
        assert_eq!(esc("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }
}
