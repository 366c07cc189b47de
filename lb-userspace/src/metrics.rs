//! Prometheus text exposition (format 0.0.4) of the agent's status, served at `GET /metrics`.
//!
//! Names follow Prometheus conventions: `xdplb_` prefix, `_total` for counters, base units
//! (bytes, seconds). Every series of a VIP carries `vip` (its name) and `service`
//! (`address:port/protocol`, `[address]:port/protocol` for IPv6); backend series add `backend` (its address). The connection table's
//! series (`xdplb_flow_table_*`) belong to the whole data path and carry no VIP. The figures are
//! the same ones `xdplb status` shows, read from the kernel's maps at scrape time. The VRRP series
//! (`xdplb_ha_*`) exist only on a node with `[ha]`.
//!
//! States are exposed as enums-as-labels: one gauge per possible value, 1 for the current one
//! and 0 for the others (`xdplb_backend_state{state="down"} 1`), so a series exists before its
//! first change and `sum by (state)` counts backends. Per-second rates are not exported: the
//! agent's rates are the ones of its own sampling period, and Prometheus computes better ones
//! from the `_total` counters (`rate(xdplb_backend_packets_total[1m])`).

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
};

use crate::{
    ha::HaStatus,
    status::{BackendStatus, FlowTableStatus, ReasonStatus, Status, VipStatus},
};

/// Every value of `HaStatus::state`.
const HA_STATES: [&str; 4] = ["initialize", "backup", "master", "fault"];

/// Every value of `BackendStatus::state`.
const BACKEND_STATES: [&str; 5] = ["up", "down", "draining", "backup", "unresolved"];

/// `VipStatus::serving` and the label value it is exported as.
const VIP_SERVING: [(&str, &str); 4] = [
    ("ok", "ok"),
    ("backup", "backup"),
    ("all-down: keep-last", "keep_last"),
    ("no backend", "none"),
];

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

/// A sample value: Rust's `Display` for finite floats (never an exponent), and the spellings
/// Prometheus expects for the others.
fn num(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// 1 or 0.
fn flag(b: bool) -> String {
    u8::from(b).to_string()
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

/// The labels of a service's series.
fn vip_labels(v: &VipStatus) -> String {
    format!(
        "vip=\"{}\",service=\"{}/{}\"",
        esc(&v.name),
        esc(&v.socket()),
        esc(&v.protocol)
    )
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
    family(
        &mut out,
        "xdplb_health_transitions_total",
        "counter",
        "Backend health changes (up to down and back) since the agent started, all services.",
        &[(String::new(), s.health_transitions.to_string())],
    );

    // One sample per service and per (extra labels, value) the closure gives for it; the extra
    // labels start with a comma.
    let per_vip_with = |f: &dyn Fn(&VipStatus) -> Vec<(String, String)>| {
        s.vips
            .iter()
            .flat_map(|v| {
                let labels = vip_labels(v);
                f(v).into_iter()
                    .map(move |(extra, value)| (format!("{labels}{extra}"), value))
            })
            .collect::<Vec<_>>()
    };
    let per_vip = |f: &dyn Fn(&VipStatus) -> String| per_vip_with(&|v| vec![(String::new(), f(v))]);
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
        "xdplb_vip_new_flows_total",
        "counter",
        "New flows of the service: TCP SYNs, and UDP packets the connection table had no live \
         entry for.",
        &per_vip(&|v| v.new_flows.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_usable_backends",
        "gauge",
        "Backends the service's live table was built with.",
        &per_vip(&|v| v.usable_backends.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_table_size",
        "gauge",
        "Entries of the service's Maglev table (M).",
        &per_vip(&|v| v.table_size.to_string()),
    );
    family(
        &mut out,
        "xdplb_vip_serving",
        "gauge",
        "What the service's table is built from, 1 for the current value and 0 for the others: \
         ok (the healthy primaries), backup (no primary can take traffic: the backups), \
         keep_last (every backend failed its health checks and all_down = keep-last keeps the \
         last table), none (no backend: packets are dropped).",
        &per_vip_with(&|v| {
            VIP_SERVING
                .iter()
                .map(|(status, label)| {
                    (format!(",serving=\"{label}\""), flag(v.serving == *status))
                })
                .collect()
        }),
    );

    let per_backend_with = |f: &dyn Fn(&BackendStatus) -> Vec<(String, String)>| {
        s.vips
            .iter()
            .flat_map(|v| {
                let labels = vip_labels(v);
                v.backends.iter().flat_map(move |b| {
                    let labels = format!("{labels},backend=\"{}\"", esc(&b.address));
                    f(b).into_iter()
                        .map(move |(extra, value)| (format!("{labels}{extra}"), value))
                })
            })
            .collect::<Vec<_>>()
    };
    let per_backend =
        |f: &dyn Fn(&BackendStatus) -> String| per_backend_with(&|b| vec![(String::new(), f(b))]);
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
        "xdplb_backend_new_flows_total",
        "counter",
        "New flows of the service sent to the backend: TCP SYNs, and UDP packets the connection \
         table had no live entry for.",
        &per_backend(&|b| b.new_flows.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_up",
        "gauge",
        "1 if the backend's state is up (MAC known, healthy, not draining, and serving if it is \
         a backup), else 0; see xdplb_backend_state for why not, and xdplb_backend_in_table for \
         whether the live table points at it.",
        &per_backend(&|b| flag(b.state == "up")),
    );
    family(
        &mut out,
        "xdplb_backend_state",
        "gauge",
        "The backend's state, 1 for the current one and 0 for the others: up, down (failed its \
         health checks), draining (by the operator: no new flows), backup (healthy, standing by \
         while the primaries serve), unresolved (no MAC yet).",
        &per_backend_with(&|b| {
            BACKEND_STATES
                .iter()
                .map(|st| (format!(",state=\"{st}\""), flag(b.state == *st)))
                .collect()
        }),
    );
    family(
        &mut out,
        "xdplb_backend_in_table",
        "gauge",
        "1 if the service's live table was built with the backend, else 0.",
        &per_backend(&|b| flag(b.in_table)),
    );
    family(
        &mut out,
        "xdplb_backend_drained",
        "gauge",
        "1 if an operator drains the backend (it takes no new flows), else 0.",
        &per_backend(&|b| flag(b.drained)),
    );
    family(
        &mut out,
        "xdplb_backend_weight",
        "gauge",
        "The backend's weight in force (an operator's, or the config's).",
        &per_backend(&|b| b.weight.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_config_weight",
        "gauge",
        "The backend's weight in the config.",
        &per_backend(&|b| b.config_weight.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_table_share",
        "gauge",
        "Fraction of the service's live table that points at the backend.",
        &per_backend(&|b| num(b.share)),
    );
    family(
        &mut out,
        "xdplb_backend_health_up",
        "gauge",
        "0 if the backend failed its health checks, else 1 (passing, not checked yet, or not \
         checked at all).",
        &per_backend(&|b| flag(b.health.state != "down")),
    );
    family(
        &mut out,
        "xdplb_backend_health_checks_total",
        "counter",
        "Health checks of the backend run since the agent started.",
        &per_backend(&|b| b.health.checks.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_health_failures_total",
        "counter",
        "Health checks of the backend that failed since the agent started.",
        &per_backend(&|b| b.health.failures.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_health_transitions_total",
        "counter",
        "Health changes of the backend (up to down and back) since the agent started.",
        &per_backend(&|b| b.health.transitions.to_string()),
    );
    family(
        &mut out,
        "xdplb_backend_health_latency_seconds",
        "gauge",
        "How long the backend's last health check took; absent before its first result.",
        &per_backend_with(&|b| {
            b.health
                .last_latency_ms
                .map(|ms| (String::new(), num(ms / 1e3)))
                .into_iter()
                .collect()
        }),
    );

    let per_reason = |f: &dyn Fn(&ReasonStatus) -> String| {
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
        "Packets the data path decided on, by reason and action (tx, pass, drop, aborted); \
         forwarded ones are also counted per service and backend.",
        &per_reason(&|r| r.packets.to_string()),
    );
    family(
        &mut out,
        "xdplb_reason_bytes_total",
        "counter",
        "Bytes the data path decided on, by reason and action.",
        &per_reason(&|r| r.bytes.to_string()),
    );
    flow_table(&mut out, &s.flows);
    if let Some(ha) = &s.ha {
        high_availability(&mut out, ha);
    }
    out
}

/// The VRRP families (`xdplb_ha_*`), present only when `[ha]` is configured.
fn high_availability(out: &mut String, h: &HaStatus) {
    let one = |v: String| [(String::new(), v)];
    family(
        out,
        "xdplb_ha_state",
        "gauge",
        "The node's VRRP state, 1 for the current one and 0 for the others: initialize, backup, \
         master (holds the VIP addresses), fault (a tracked condition failed: it cannot take \
         them).",
        &HA_STATES
            .iter()
            .map(|st| (format!("state=\"{st}\""), flag(h.state == *st)))
            .collect::<Vec<_>>(),
    );
    family(
        out,
        "xdplb_ha_priority",
        "gauge",
        "The node's VRRP priority in the config ([ha] priority).",
        &one(h.priority.to_string()),
    );
    family(
        out,
        "xdplb_ha_effective_priority",
        "gauge",
        "The VRRP priority the node advertises after tracking; 0 while it cannot forward.",
        &one(h.effective_priority.to_string()),
    );
    family(
        out,
        "xdplb_ha_held",
        "gauge",
        "1 while an operator handover is in force (the node does not preempt until `xdplb ha \
         resume`), else 0.",
        &one(flag(h.held)),
    );
    family(
        out,
        "xdplb_ha_master_info",
        "gauge",
        "The current master as this node knows it (itself when master), by address (1); absent \
         while none is known.",
        &h.master
            .iter()
            .map(|m| (format!("address=\"{}\"", m.address), "1".to_string()))
            .collect::<Vec<_>>(),
    );
    family(
        out,
        "xdplb_ha_tracking_ok",
        "gauge",
        "1 if the tracked condition holds, else 0: dataplane (the XDP program is attached), \
         interface NAME (the link is up), vip NAME (a backend of the VIP passes its health \
         checks).",
        &h.tracking
            .iter()
            .map(|t| (format!("what=\"{}\"", esc(&t.what)), flag(t.ok)))
            .collect::<Vec<_>>(),
    );
    let c = &h.counters;
    family(
        out,
        "xdplb_ha_adverts_sent_total",
        "counter",
        "VRRP advertisements this node sent.",
        &one(c.adverts_sent.to_string()),
    );
    family(
        out,
        "xdplb_ha_adverts_received_total",
        "counter",
        "VRRP advertisements for the node's VRID accepted from other nodes.",
        &one(c.adverts_received.to_string()),
    );
    family(
        out,
        "xdplb_ha_adverts_discarded_total",
        "counter",
        "VRRP packets discarded, by reason (the checks of RFC 5798 7.1): length, ttl (not 255: \
         not from this link), version, checksum, vrid (another VRID), own (this node's own), \
         not_peer (not from a configured unicast peer), interval (an advert interval of 0).",
        &c.discarded
            .iter()
            .map(|(r, n)| (format!("reason=\"{}\"", esc(r)), n.to_string()))
            .collect::<Vec<_>>(),
    );
    family(
        out,
        "xdplb_ha_advert_send_errors_total",
        "counter",
        "VRRP advertisements the kernel refused to send.",
        &one(c.send_errors.to_string()),
    );
    family(
        out,
        "xdplb_ha_priority_zero_received_total",
        "counter",
        "Advertisements with priority 0 received: the master resigned.",
        &one(c.priority_zero_received.to_string()),
    );
    family(
        out,
        "xdplb_ha_transitions_total",
        "counter",
        "VRRP state changes, by the state entered: master, backup, fault.",
        &[
            ("master", c.became_master),
            ("backup", c.became_backup),
            ("fault", c.became_fault),
        ]
        .map(|(to, n)| (format!("to=\"{to}\""), n.to_string())),
    );
    family(
        out,
        "xdplb_ha_split_brain_total",
        "counter",
        "Times another master was heard while this node had been master for an advert \
         interval or longer (the node with precedence stays master, the other steps down).",
        &one(c.split_brain.to_string()),
    );
    family(
        out,
        "xdplb_ha_address_mismatch_total",
        "counter",
        "Accepted advertisements whose address list differs from this node's (the two nodes' \
         VIP addresses differ).",
        &one(c.address_mismatch.to_string()),
    );
    family(
        out,
        "xdplb_ha_peer_tables_match",
        "gauge",
        "1 if the peer's last table digest equals this node's (a failover keeps every flow on \
         its backend), 0 if they differ; absent before the first digest from the peer.",
        &h.peer_tables
            .iter()
            .map(|p| (String::new(), flag(p.matches)))
            .collect::<Vec<_>>(),
    );
}

/// The connection table's families.
fn flow_table(out: &mut String, f: &FlowTableStatus) {
    family(
        out,
        "xdplb_flow_table_capacity",
        "gauge",
        "Entries the connection table holds at most, all CPUs together ([flows] entries).",
        &[(String::new(), f.capacity.to_string())],
    );
    family(
        out,
        "xdplb_flow_table_ipv6_capacity",
        "gauge",
        "Entries the IPv6 connection table, a table of its own, holds at most, all CPUs \
         together ([flows] entries_v6).",
        &[(String::new(), f.capacity_v6.to_string())],
    );
    family(
        out,
        "xdplb_flow_table_events_total",
        "counter",
        "What the connection table did, by event: hit (a packet went to its flow's remembered \
         backend), miss (no entry: the service's table decided), syn (a TCP SYN, decided by the \
         table without a lookup), insert (an entry written), insert_rate_limited (not written: \
         the CPU's insert bound for the second was spent), remapped (the remembered backend \
         failed, is gone or left the service: the table decided again), expired (a UDP entry \
         idle past the timeout: decided again), insert_failed (the kernel refused the write).",
        &f.events
            .iter()
            .map(|e| (format!("event=\"{}\"", esc(&e.event)), e.count.to_string()))
            .collect::<Vec<_>>(),
    );
    family(
        out,
        "xdplb_flow_table_removing_backends",
        "gauge",
        "Backends removed from a service whose established flows still go to them, until \
         [flows] remove_grace ends.",
        &[(String::new(), f.removing.len().to_string())],
    );
}

/// One sample of the exposition, as a strict reader sees it.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    /// In the order written.
    pub labels: Labels,
    pub value: f64,
}

fn is_name(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut cs = s.chars();
    cs.next().is_some_and(|c| ok(c, true)) && cs.all(|c| ok(c, false))
}

/// Go's `strconv.ParseFloat` as Prometheus uses it, without hex: decimal or exponent
/// notation, `NaN`, `+Inf`, `-Inf`.
fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "NaN" => return Ok(f64::NAN),
        "+Inf" | "Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    if v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) {
        return Err(format!("bad value {v:?}"));
    }
    v.parse().map_err(|e| format!("bad value {v:?}: {e}"))
}

pub type Labels = Vec<(String, String)>;

/// `{k="v",...}` from the start of `s`; returns the labels and the rest of `s`.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels: Labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let name = &rest[..eq];
        if !is_name(name, false) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} twice"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value without \"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling backslash")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("newline in label value".into()),
                (_, c) => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} at {rest:?}"));
        }
    }
}

/// Reads a whole exposition strictly: every line is a HELP, a TYPE or a sample; each family has
/// one HELP and one TYPE before its samples, which are contiguous; counters end in `_total`; no
/// series twice. Returns the samples and each family's type. The tests hold [`render`] to it, and
/// `xdplb metrics --json` reads the agent's answer with it.
pub fn parse(text: &str) -> Result<(Vec<Sample>, HashMap<String, String>), String> {
    let body = text.strip_suffix('\n').ok_or("no final newline")?;
    let mut types = HashMap::new();
    let mut helps = HashSet::new();
    let mut finished = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashSet::new();
    let mut samples = Vec::new();
    for (n, line) in body.split('\n').enumerate() {
        let err = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let (kw, rest) = rest
                .split_once(' ')
                .ok_or_else(|| err("bare comment".into()))?;
            let (name, arg) = rest.split_once(' ').ok_or_else(|| err("no text".into()))?;
            if !is_name(name, true) {
                return Err(err(format!("bad metric name {name:?}")));
            }
            if finished.contains(name)
                || current.as_deref() == Some(name) && kw == "TYPE" && types.contains_key(name)
            {
                return Err(err(format!("{name} declared again")));
            }
            if current.as_deref() != Some(name)
                && let Some(c) = current.replace(name.to_string())
            {
                finished.insert(c);
            }
            match kw {
                "HELP" => {
                    if !helps.insert(name.to_string()) || types.contains_key(name) {
                        return Err(err("HELP twice or after TYPE".into()));
                    }
                    if arg.trim().is_empty() {
                        return Err(err("empty HELP".into()));
                    }
                }
                "TYPE" => {
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg) {
                        return Err(err(format!("bad type {arg:?}")));
                    }
                    if arg == "counter" && !name.ends_with("_total") {
                        return Err(err("counter without _total".into()));
                    }
                    types.insert(name.to_string(), arg.to_string());
                }
                _ => return Err(err(format!("unknown comment {kw}"))),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| err("no value".into()))?;
        let name = &line[..name_end];
        if !is_name(name, true) {
            return Err(err(format!("bad metric name {name:?}")));
        }
        if current.as_deref() != Some(name) || !types.contains_key(name) || !helps.contains(name) {
            return Err(err(format!("{name} outside its declared family")));
        }
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(err)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let rest = rest
            .strip_prefix(' ')
            .ok_or_else(|| err("no space before value".into()))?;
        let mut fields = rest.split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .map_err(|e| err(format!("bad timestamp: {e}")))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        let mut key = labels.clone();
        key.sort();
        if !series.insert((name.to_string(), key)) {
            return Err(err("series twice".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    if helps.len() != types.len() {
        return Err("a family lacks HELP or TYPE".into());
    }
    Ok((samples, types))
}

#[cfg(test)]
mod tests {
    use lb_common::flows::FlowStat;

    use super::*;
    use crate::status::{FlowEventStatus, HealthStatus, RemovingStatus};

    fn health(check: &str, state: &str, latency_ms: Option<f64>) -> HealthStatus {
        HealthStatus {
            check: check.into(),
            port: 80,
            state: state.into(),
            last_ok: latency_ms.map(|_| state == "up"),
            last_detail: latency_ms.map(|_| "connected".into()),
            last_latency_ms: latency_ms,
            last_check_unix: latency_ms.map(|_| 1_700_000_000),
            checks: 12,
            failures: 4,
            transitions: 2,
        }
    }

    fn backend(address: &str, state: &str, h: HealthStatus) -> BackendStatus {
        BackendStatus {
            address: address.into(),
            weight: 1,
            config_weight: 1,
            state: state.into(),
            role: "primary".into(),
            drained: false,
            in_table: false,
            health: h,
            mac: Some("02:00:00:00:00:11".into()),
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
            health_transitions: 5,
            vips: vec![
                VipStatus {
                    name: "web \"main\"".into(),
                    address: "10.0.0.100".into(),
                    port: 80,
                    protocol: "tcp".into(),
                    table_size: 65537,
                    usable_backends: 1,
                    serving: "ok".into(),
                    all_down: "keep-last".into(),
                    packets: 1000,
                    bytes: 64000,
                    pps: 10.0,
                    bps: 640.0,
                    new_flows: 250,
                    fps: 2.5,
                    backends: vec![
                        BackendStatus {
                            weight: 3,
                            in_table: true,
                            slots: 65537,
                            share: 1.0,
                            packets: 1000,
                            bytes: 64000,
                            pps: 10.0,
                            bps: 640.0,
                            new_flows: 240,
                            fps: 2.4,
                            ..backend("10.0.0.11", "up", health("tcp", "up", Some(0.25)))
                        },
                        BackendStatus {
                            weight: 2,
                            config_weight: 2,
                            mac: None,
                            ..backend("10.0.0.12", "unresolved", health("none", "none", None))
                        },
                        backend("10.0.0.13", "down", health("http", "down", Some(1500.0))),
                        BackendStatus {
                            drained: true,
                            ..backend("10.0.0.14", "draining", health("tcp", "unknown", None))
                        },
                        BackendStatus {
                            role: "backup".into(),
                            ..backend("10.0.0.21", "backup", health("tcp", "up", Some(0.5)))
                        },
                    ],
                },
                VipStatus {
                    name: "dns\\a\nb".into(),
                    address: "10.0.0.101".into(),
                    port: 53,
                    protocol: "udp".into(),
                    table_size: 251,
                    usable_backends: 1,
                    serving: "all-down: keep-last".into(),
                    all_down: "keep-last".into(),
                    packets: 0,
                    bytes: 0,
                    pps: 0.0,
                    bps: 0.0,
                    new_flows: 0,
                    fps: 0.0,
                    backends: vec![BackendStatus {
                        in_table: true,
                        ..backend("10.0.0.31", "down", health("udp", "down", Some(300.0)))
                    }],
                },
            ],
            reasons: vec![ReasonStatus {
                reason: "pass_not_vip".into(),
                action: "pass".into(),
                packets: 5,
                bytes: 300,
            }],
            flows: FlowTableStatus {
                capacity: 1_048_576,
                capacity_v6: 262_144,
                udp_idle_timeout_secs: 30.0,
                insert_rate_limit: 100_000,
                remove_grace_secs: 60.0,
                events: FlowStat::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, e)| FlowEventStatus {
                        event: e.name().to_string(),
                        count: 1000 + i as u64,
                    })
                    .collect(),
                removing: vec![RemovingStatus {
                    vip: "web \"main\"".into(),
                    backend: "10.0.0.15".into(),
                    remaining_secs: 12.5,
                }],
            },
            ha: None,
        }
    }

    fn ip<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().unwrap()
    }

    /// A backup whose tracked VIP has no backend, following a master whose tables match.
    fn ha() -> HaStatus {
        use crate::ha::{HaCounters, MasterStatus, PeerTables, TrackStatus};
        HaStatus {
            state: "backup".into(),
            interface: "eth0".into(),
            vrid: 51,
            priority: 200,
            effective_priority: 150,
            advert_interval_ms: 1000,
            preempt: true,
            source: ip("10.0.0.2"),
            peers: Vec::new(),
            master: Some(MasterStatus {
                address: ip("10.0.0.3"),
                priority: 180,
                advert_interval_ms: 1000,
                local: false,
            }),
            held: true,
            last_transition: None,
            tracking: vec![
                TrackStatus {
                    what: "dataplane".into(),
                    ok: true,
                },
                TrackStatus {
                    what: "vip web \"main\"".into(),
                    ok: false,
                },
            ],
            counters: HaCounters {
                adverts_sent: 10,
                adverts_received: 900,
                discarded: [("ttl", 3), ("checksum", 0), ("vrid", 2)]
                    .into_iter()
                    .map(|(r, n)| (r.to_string(), n))
                    .collect(),
                address_mismatch: 4,
                priority_zero_received: 1,
                became_master: 2,
                became_backup: 3,
                became_fault: 1,
                split_brain: 5,
                send_errors: 6,
            },
            peer_tables: Some(PeerTables {
                peer: ip("10.0.0.3"),
                digest: "9f86d081884c7d65".into(),
                own_digest: "9f86d081884c7d65".into(),
                matches: true,
                age_ms: 400,
                differs_for_ms: None,
            }),
            vips: Vec::new(),
            vip_addresses: vec![ip("10.0.0.100")],
            virtual_mac: None,
        }
    }

    #[test]
    fn ha_families_only_when_configured() {
        let text = render(&status());
        assert!(!text.contains("xdplb_ha_"), "{text}");

        let mut s = status();
        s.ha = Some(ha());
        let text = render(&s);
        let (samples, types) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for line in [
            r#"xdplb_ha_state{state="initialize"} 0"#,
            r#"xdplb_ha_state{state="backup"} 1"#,
            r#"xdplb_ha_state{state="master"} 0"#,
            r#"xdplb_ha_state{state="fault"} 0"#,
            "xdplb_ha_priority 200",
            "xdplb_ha_effective_priority 150",
            "xdplb_ha_held 1",
            r#"xdplb_ha_master_info{address="10.0.0.3"} 1"#,
            r#"xdplb_ha_tracking_ok{what="dataplane"} 1"#,
            r#"xdplb_ha_tracking_ok{what="vip web \"main\""} 0"#,
            "xdplb_ha_adverts_sent_total 10",
            "xdplb_ha_adverts_received_total 900",
            r#"xdplb_ha_adverts_discarded_total{reason="ttl"} 3"#,
            r#"xdplb_ha_adverts_discarded_total{reason="checksum"} 0"#,
            r#"xdplb_ha_adverts_discarded_total{reason="vrid"} 2"#,
            "xdplb_ha_advert_send_errors_total 6",
            "xdplb_ha_priority_zero_received_total 1",
            r#"xdplb_ha_transitions_total{to="master"} 2"#,
            r#"xdplb_ha_transitions_total{to="backup"} 3"#,
            r#"xdplb_ha_transitions_total{to="fault"} 1"#,
            "xdplb_ha_split_brain_total 5",
            "xdplb_ha_address_mismatch_total 4",
            "xdplb_ha_peer_tables_match 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        for (name, kind) in [
            ("xdplb_ha_state", "gauge"),
            ("xdplb_ha_priority", "gauge"),
            ("xdplb_ha_effective_priority", "gauge"),
            ("xdplb_ha_held", "gauge"),
            ("xdplb_ha_master_info", "gauge"),
            ("xdplb_ha_tracking_ok", "gauge"),
            ("xdplb_ha_peer_tables_match", "gauge"),
            ("xdplb_ha_adverts_sent_total", "counter"),
            ("xdplb_ha_adverts_received_total", "counter"),
            ("xdplb_ha_adverts_discarded_total", "counter"),
            ("xdplb_ha_advert_send_errors_total", "counter"),
            ("xdplb_ha_priority_zero_received_total", "counter"),
            ("xdplb_ha_transitions_total", "counter"),
            ("xdplb_ha_split_brain_total", "counter"),
            ("xdplb_ha_address_mismatch_total", "counter"),
        ] {
            assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
        }
        // Every discard reason the agent counts, and exactly one state.
        let reasons: Vec<&str> = samples
            .iter()
            .filter(|x| x.name == "xdplb_ha_adverts_discarded_total")
            .map(|x| x.labels[0].1.as_str())
            .collect();
        assert_eq!(reasons, ["checksum", "ttl", "vrid"]);
        let states: f64 = samples
            .iter()
            .filter(|x| x.name == "xdplb_ha_state")
            .map(|x| x.value)
            .sum();
        assert_eq!(states, 1.0);

        // Unknown master and no digest from the peer yet: those series are absent, not 0 (a
        // digest that matches nothing is not a mismatch), and the exposition still parses.
        let mut h = ha();
        h.state = "fault".into();
        h.master = None;
        h.peer_tables = None;
        h.held = false;
        s.ha = Some(h.clone());
        let text = render(&s);
        let (samples, _) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(text.contains("# TYPE xdplb_ha_master_info gauge"), "{text}");
        assert!(
            !samples
                .iter()
                .any(|x| x.name == "xdplb_ha_master_info" || x.name == "xdplb_ha_peer_tables_match")
        );
        assert_eq!(
            value(&samples, "xdplb_ha_state", &[("state", "fault")]),
            Some(1.0)
        );
        assert_eq!(value(&samples, "xdplb_ha_held", &[]), Some(0.0));
        // Tables that differ read 0.
        h.peer_tables = ha().peer_tables.map(|mut p| {
            p.matches = false;
            p
        });
        s.ha = Some(h);
        let (samples, _) = parse(&render(&s)).unwrap();
        assert_eq!(
            value(&samples, "xdplb_ha_peer_tables_match", &[]),
            Some(0.0)
        );
    }

    /// The value of `name` with these labels (in any order), if there is such a sample.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(n, w)| n == k && w == v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn renders_every_family_with_escaped_labels() {
        let text = render(&status());
        let vip = r#"vip="web \"main\"",service="10.0.0.100:80/tcp""#;
        for line in [
            r#"xdplb_info{version="0.1.0",interface="eth0",xdp_mode="driver"} 1"#.to_string(),
            "xdplb_uptime_seconds 42".into(),
            "xdplb_table_rebuilds_total 3".into(),
            "xdplb_health_transitions_total 5".into(),
            format!("xdplb_vip_packets_total{{{vip}}} 1000"),
            format!("xdplb_vip_bytes_total{{{vip}}} 64000"),
            format!("xdplb_vip_new_flows_total{{{vip}}} 250"),
            format!(r#"xdplb_backend_new_flows_total{{{vip},backend="10.0.0.11"}} 240"#),
            format!(r#"xdplb_backend_new_flows_total{{{vip},backend="10.0.0.12"}} 0"#),
            format!("xdplb_vip_usable_backends{{{vip}}} 1"),
            format!(r#"xdplb_vip_serving{{{vip},serving="ok"}} 1"#),
            format!(r#"xdplb_vip_serving{{{vip},serving="keep_last"}} 0"#),
            format!(r#"xdplb_backend_packets_total{{{vip},backend="10.0.0.11"}} 1000"#),
            format!(r#"xdplb_backend_up{{{vip},backend="10.0.0.11"}} 1"#),
            format!(r#"xdplb_backend_up{{{vip},backend="10.0.0.12"}} 0"#),
            format!(r#"xdplb_backend_state{{{vip},backend="10.0.0.13",state="down"}} 1"#),
            format!(r#"xdplb_backend_state{{{vip},backend="10.0.0.13",state="up"}} 0"#),
            format!(r#"xdplb_backend_weight{{{vip},backend="10.0.0.11"}} 3"#),
            format!(r#"xdplb_backend_config_weight{{{vip},backend="10.0.0.11"}} 1"#),
            format!(r#"xdplb_backend_table_share{{{vip},backend="10.0.0.11"}} 1"#),
            format!(r#"xdplb_backend_in_table{{{vip},backend="10.0.0.11"}} 1"#),
            format!(r#"xdplb_backend_drained{{{vip},backend="10.0.0.14"}} 1"#),
            format!(r#"xdplb_backend_health_up{{{vip},backend="10.0.0.13"}} 0"#),
            format!(r#"xdplb_backend_health_checks_total{{{vip},backend="10.0.0.13"}} 12"#),
            format!(r#"xdplb_backend_health_failures_total{{{vip},backend="10.0.0.13"}} 4"#),
            format!(r#"xdplb_backend_health_transitions_total{{{vip},backend="10.0.0.13"}} 2"#),
            format!(r#"xdplb_backend_health_latency_seconds{{{vip},backend="10.0.0.11"}} 0.00025"#),
            format!(r#"xdplb_backend_health_latency_seconds{{{vip},backend="10.0.0.13"}} 1.5"#),
            r#"xdplb_vip_serving{vip="dns\\a\nb",service="10.0.0.101:53/udp",serving="keep_last"} 1"#.into(),
            r#"xdplb_reason_packets_total{reason="pass_not_vip",action="pass"} 5"#.into(),
            r#"xdplb_reason_bytes_total{reason="pass_not_vip",action="pass"} 300"#.into(),
            "xdplb_flow_table_capacity 1048576".into(),
            "xdplb_flow_table_ipv6_capacity 262144".into(),
            r#"xdplb_flow_table_events_total{event="hit"} 1000"#.into(),
            r#"xdplb_flow_table_events_total{event="insert_failed"} 1007"#.into(),
            "xdplb_flow_table_removing_backends 1".into(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // No latency before a first result (unresolved, not checked; draining, no result yet).
        for b in ["10.0.0.12", "10.0.0.14"] {
            assert!(
                !text.contains(&format!(
                    "xdplb_backend_health_latency_seconds{{{vip},backend=\"{b}\"}}"
                )),
                "{text}"
            );
        }
        // Every family has HELP and TYPE, and every sample line belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let helped: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(declared, helped);
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(declared.contains(&name), "undeclared {name}");
        }
        for name in [
            "xdplb_backend_state",
            "xdplb_backend_health_up",
            "xdplb_backend_health_checks_total",
            "xdplb_backend_health_failures_total",
            "xdplb_backend_health_transitions_total",
            "xdplb_backend_health_latency_seconds",
            "xdplb_backend_drained",
            "xdplb_backend_in_table",
            "xdplb_backend_config_weight",
            "xdplb_vip_serving",
            "xdplb_health_transitions_total",
            "xdplb_vip_new_flows_total",
            "xdplb_backend_new_flows_total",
            "xdplb_flow_table_capacity",
            "xdplb_flow_table_events_total",
            "xdplb_flow_table_removing_backends",
        ] {
            assert!(declared.contains(&name), "no family {name}");
        }
    }

    #[test]
    fn parses_as_prometheus_text_format() {
        let s = status();
        let text = render(&s);
        let (samples, types) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(types["xdplb_backend_state"], "gauge");
        assert_eq!(types["xdplb_backend_health_checks_total"], "counter");
        // Label values come back as they went in, escapes undone.
        assert_eq!(
            value(
                &samples,
                "xdplb_vip_serving",
                &[
                    ("vip", "dns\\a\nb"),
                    ("service", "10.0.0.101:53/udp"),
                    ("serving", "keep_last")
                ]
            ),
            Some(1.0)
        );
        // Enums as labels: every value present, exactly one of them 1.
        for v in &s.vips {
            let svc = format!("{}:{}/{}", v.address, v.port, v.protocol);
            let serving: Vec<f64> = VIP_SERVING
                .iter()
                .map(|(_, l)| {
                    value(
                        &samples,
                        "xdplb_vip_serving",
                        &[("vip", &v.name), ("service", &svc), ("serving", l)],
                    )
                    .unwrap()
                })
                .collect();
            assert_eq!(serving.iter().sum::<f64>(), 1.0, "{}", v.name);
            for b in &v.backends {
                let base = [
                    ("vip", v.name.as_str()),
                    ("service", &svc),
                    ("backend", &b.address),
                ];
                let states: Vec<(&str, f64)> = BACKEND_STATES
                    .iter()
                    .map(|st| {
                        let mut l = base.to_vec();
                        l.push(("state", st));
                        (*st, value(&samples, "xdplb_backend_state", &l).unwrap())
                    })
                    .collect();
                assert_eq!(
                    states
                        .iter()
                        .filter(|(_, v)| *v == 1.0)
                        .map(|(s, _)| *s)
                        .collect::<Vec<_>>(),
                    [b.state.as_str()]
                );
                assert_eq!(states.iter().map(|(_, v)| v).sum::<f64>(), 1.0);
                assert_eq!(
                    value(&samples, "xdplb_backend_health_up", &base),
                    Some(if b.health.state == "down" { 0.0 } else { 1.0 })
                );
                assert_eq!(
                    value(&samples, "xdplb_backend_health_latency_seconds", &base),
                    b.health.last_latency_ms.map(|ms| ms / 1e3)
                );
            }
        }
        // No rates: Prometheus derives them from the counters.
        assert!(!samples.iter().any(|s| s.name.contains("per_second")));
    }

    #[test]
    fn the_connection_table_parses_with_every_event_once() {
        let s = status();
        let text = render(&s);
        let (samples, types) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(types["xdplb_flow_table_events_total"], "counter");
        assert_eq!(types["xdplb_flow_table_capacity"], "gauge");
        assert_eq!(types["xdplb_flow_table_removing_backends"], "gauge");
        assert_eq!(types["xdplb_vip_new_flows_total"], "counter");
        assert_eq!(types["xdplb_backend_new_flows_total"], "counter");
        // Every event of the data path, in its order, and nothing else.
        let events: Vec<(&str, f64)> = samples
            .iter()
            .filter(|x| x.name == "xdplb_flow_table_events_total")
            .map(|x| {
                assert_eq!(x.labels.len(), 1, "{:?}", x.labels);
                assert_eq!(x.labels[0].0, "event");
                (x.labels[0].1.as_str(), x.value)
            })
            .collect();
        let want: Vec<(&str, f64)> = FlowStat::ALL
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name(), 1000.0 + i as f64))
            .collect();
        assert_eq!(events, want);
        assert_eq!(
            value(&samples, "xdplb_flow_table_capacity", &[]),
            Some(1_048_576.0)
        );
        assert_eq!(
            value(&samples, "xdplb_flow_table_removing_backends", &[]),
            Some(1.0)
        );
        // New flows on every service and backend, with the labels of their packets.
        for v in &s.vips {
            let svc = format!("{}:{}/{}", v.address, v.port, v.protocol);
            let vl = [("vip", v.name.as_str()), ("service", &svc)];
            assert_eq!(
                value(&samples, "xdplb_vip_new_flows_total", &vl),
                Some(v.new_flows as f64)
            );
            for b in &v.backends {
                let mut bl = vl.to_vec();
                bl.push(("backend", &b.address));
                assert_eq!(
                    value(&samples, "xdplb_backend_new_flows_total", &bl),
                    Some(b.new_flows as f64),
                    "{}",
                    b.address
                );
            }
        }
        // Nothing removed reads 0 rather than an absent series (alerts compare it), and a
        // family without samples still parses.
        let mut quiet = status();
        quiet.flows = FlowTableStatus::default();
        let text = render(&quiet);
        let (samples, _) = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            value(&samples, "xdplb_flow_table_removing_backends", &[]),
            Some(0.0)
        );
    }

    #[test]
    fn the_parser_rejects_malformed_text() {
        for bad in [
            "x 1\n",                                                         // no HELP/TYPE
            "# HELP x h\n# TYPE x gauge\nx{a=\"b} 1\n",                      // unterminated value
            "# HELP x h\n# TYPE x gauge\nx{a=\"\\t\"} 1\n",                  // bad escape
            "# HELP x h\n# TYPE x gauge\nx{a=\"b\"} one\n",                  // bad value
            "# HELP x h\n# TYPE x gauge\nx 1\nx 2\n",                        // series twice
            "# HELP x h\n# TYPE x counter\nx 1\n", // counter without _total
            "# HELP x h\n# TYPE x gauge\nx{1a=\"b\"} 1\n", // bad label name
            "# HELP x h\n# TYPE x gauge\nx 1",     // no final newline
            "# HELP x h\n# TYPE x gauge\n# HELP y h\n# TYPE y gauge\nx 1\n", // not contiguous
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(parse("# HELP x h\n# TYPE x gauge\nx{a=\"\\\\\\\"\\n\",} +Inf 123\n").is_ok());
    }

    #[test]
    fn escapes_backslash_quote_and_newline() {
        assert_eq!(esc("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
    }

    #[test]
    fn spells_special_floats_as_prometheus_does() {
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(1e-7), "0.0000001");
        assert_eq!(num(f64::INFINITY), "+Inf");
        assert_eq!(num(f64::NEG_INFINITY), "-Inf");
        assert_eq!(num(f64::NAN), "NaN");
    }
}
