//! `[vip.health]` and `[vip.backend.health]`: how backends are checked.
//!
//! A VIP's `[vip.health]` applies to each of its backends; a backend's own `health` table
//! overrides it key by key. When a backend changes `kind`, the VIP's kind-specific keys (`path`,
//! `payload`, `command`...) no longer apply to it, while the timing keys (`interval`, `timeout`,
//! `rise`, `fall`, `port`) still do.
//!
//! Without `[vip.health]` a TCP VIP's backends get a TCP connect check on the VIP's port and a
//! UDP VIP's backends none: a UDP check needs a payload the service answers, which only the
//! operator knows.

use std::{ops::Range, time::Duration};

use serde::{Deserialize, Serialize, Serializer};
use toml::Spanned;

use super::{Checker, Protocol, port};
use crate::probe::Probe;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(500);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Below this, checks cost the backends more than they tell.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_RISE_FALL: u32 = 100;
/// Status range an HTTP check accepts unless told otherwise (HAProxy's default: 2xx and 3xx).
pub const DEFAULT_EXPECT_STATUS: (u16, u16) = (200, 399);

/// A backend's health check, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    #[serde(flatten)]
    pub probe: Probe,
    #[serde(rename = "interval_ms", serialize_with = "millis")]
    pub interval: Duration,
    #[serde(rename = "timeout_ms", serialize_with = "millis")]
    pub timeout: Duration,
    /// Consecutive successes that bring a down backend up.
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    pub fall: u32,
    /// Port to check; `None` checks the VIP's port.
    pub port: Option<u16>,
}

impl HealthCheck {
    /// The defaults for a VIP of `protocol` without `[vip.health]`.
    pub fn default_for(protocol: Protocol) -> HealthCheck {
        HealthCheck {
            probe: match protocol {
                Protocol::Tcp => Probe::Tcp,
                Protocol::Udp => Probe::None,
            },
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
            port: None,
        }
    }

    /// Longest time from a backend's death to its removal: `fall` failed checks, the first
    /// starting up to one interval after the death, the last one taking up to `timeout`.
    pub fn detection_bound(&self) -> Duration {
        self.interval * self.fall + self.timeout
    }
}

pub(super) fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawStatus {
    One(i64),
    Range(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    kind: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<RawStatus>>,
    expect_body: Option<Spanned<String>>,
    payload: Option<Spanned<String>>,
    payload_hex: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    None,
    Tcp,
    Http,
    Udp,
    Exec,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::None => "none",
            Kind::Tcp => "tcp",
            Kind::Http => "http",
            Kind::Udp => "udp",
            Kind::Exec => "exec",
        }
    }

    fn of(probe: &Probe) -> Kind {
        match probe {
            Probe::None => Kind::None,
            Probe::Tcp => Kind::Tcp,
            Probe::Http { .. } => Kind::Http,
            Probe::Udp { .. } => Kind::Udp,
            Probe::Exec { .. } => Kind::Exec,
        }
    }
}

/// The keys one `health` table set, each already valid on its own.
#[derive(Clone, Default)]
pub(super) struct Partial {
    kind: Option<Kind>,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    rise: Option<u32>,
    fall: Option<u32>,
    port: Option<u16>,
    path: Option<String>,
    host: Option<String>,
    expect_status: Option<(u16, u16)>,
    expect_body: Option<String>,
    payload: Option<Vec<u8>>,
    command: Option<Vec<String>>,
}

impl Partial {
    /// The keys that only mean something for one kind, by name, with that kind.
    fn specific(&self) -> Vec<(&'static str, Kind)> {
        let mut set = Vec::new();
        if self.path.is_some() {
            set.push(("path", Kind::Http));
        }
        if self.host.is_some() {
            set.push(("host", Kind::Http));
        }
        if self.expect_status.is_some() {
            set.push(("expect_status", Kind::Http));
        }
        if self.expect_body.is_some() {
            set.push(("expect_body", Kind::Http));
        }
        if self.payload.is_some() {
            set.push(("payload", Kind::Udp));
        }
        if self.command.is_some() {
            set.push(("command", Kind::Exec));
        }
        set
    }

    /// `self` (a backend's table) over `base` (the VIP's). See the module documentation.
    fn over(&self, base: &Partial) -> Partial {
        let timing = Partial {
            kind: self.kind.or(base.kind),
            interval: self.interval.or(base.interval),
            timeout: self.timeout.or(base.timeout),
            rise: self.rise.or(base.rise),
            fall: self.fall.or(base.fall),
            port: self.port.or(base.port),
            ..Partial::default()
        };
        if self.kind.is_some() && self.kind != base.kind {
            return Partial {
                path: self.path.clone(),
                host: self.host.clone(),
                expect_status: self.expect_status,
                expect_body: self.expect_body.clone(),
                payload: self.payload.clone(),
                command: self.command.clone(),
                ..timing
            };
        }
        Partial {
            path: self.path.clone().or_else(|| base.path.clone()),
            host: self.host.clone().or_else(|| base.host.clone()),
            expect_status: self.expect_status.or(base.expect_status),
            expect_body: self
                .expect_body
                .clone()
                .or_else(|| base.expect_body.clone()),
            payload: self.payload.clone().or_else(|| base.payload.clone()),
            command: self.command.clone().or_else(|| base.command.clone()),
            ..timing
        }
    }
}

/// Parses a duration such as `"1s"`, `"500ms"`, `"1.5s"` or `"2m"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "" => {
            return Err(format!(
                "`{text}` has no unit; write it like \"500ms\", \"1s\" or \"2m\""
            ));
        }
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use ms, s or m, like \"500ms\" or \"1s\""
            ));
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like \"500ms\", \"1s\" or \"2m\""))?;
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("`{text}` is out of range"))
}

fn interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < MIN_INTERVAL || d > MAX_INTERVAL {
        return Err(format!(
            "interval {text} is out of range; from {MIN_INTERVAL:?} to {} minutes",
            MAX_INTERVAL.as_secs() / 60
        ));
    }
    Ok(d)
}

fn timeout(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d < Duration::from_millis(1) {
        return Err(format!("timeout {text} is too short; at least 1ms"));
    }
    Ok(d)
}

fn count(n: i64, key: &str) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(v) if (1..=MAX_RISE_FALL).contains(&v) => Ok(v),
        _ => Err(format!(
            "{key} {n} is out of range; from 1 to {MAX_RISE_FALL} consecutive checks"
        )),
    }
}

fn kind(text: &str) -> Result<Kind, String> {
    Ok(match text {
        "none" => Kind::None,
        "tcp" => Kind::Tcp,
        "http" => Kind::Http,
        "udp" => Kind::Udp,
        "exec" => Kind::Exec,
        _ => {
            let hint = match text.to_ascii_lowercase().as_str() {
                "https" | "ssl" | "tls" => {
                    "; TLS checks are not supported, use \"tcp\" or \"exec\""
                }
                "connect" | "tcp_check" => "; a TCP connect check is \"tcp\"",
                "script" | "misc" | "misc_check" => "; a command is \"exec\"",
                _ => "",
            };
            return Err(format!(
                "unknown health check kind \"{text}\"; accepted values: \"tcp\", \"http\", \
                 \"udp\", \"exec\", \"none\"{hint}"
            ));
        }
    })
}

fn http_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!(
            "HTTP path `{text}` must start with '/', like \"/healthz\""
        ));
    }
    if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "HTTP path \"{}\" contains whitespace or control characters; percent-encode them",
            text.escape_debug()
        ));
    }
    Ok(text.to_owned())
}

fn host(text: &str) -> Result<String, String> {
    if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "Host header \"{}\" must be one word, like \"www.example.com\"",
            text.escape_debug()
        ));
    }
    Ok(text.to_owned())
}

fn status_code(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(c) if (100..=599).contains(&c) => Ok(c),
        _ => Err(format!("HTTP status {n} is out of range; from 100 to 599")),
    }
}

fn expect_status(raw: &RawStatus) -> Result<(u16, u16), String> {
    match raw {
        RawStatus::One(n) => status_code(*n).map(|c| (c, c)),
        RawStatus::Range(s) => {
            let bad =
                || format!("`{s}` is not a status or a range of statuses, like 200 or \"200-399\"");
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (s.trim(), s.trim()),
            };
            let lo = status_code(lo.parse().map_err(|_| bad())?)?;
            let hi = status_code(hi.parse().map_err(|_| bad())?)?;
            if lo > hi {
                return Err(format!("range `{s}` is empty: {lo} is above {hi}"));
            }
            Ok((lo, hi))
        }
    }
}

fn nonempty(text: &str, what: &str) -> Result<String, String> {
    if text.is_empty() {
        return Err(format!("{what} is empty; leave the key out instead"));
    }
    Ok(text.to_owned())
}

fn payload_hex(text: &str) -> Result<Vec<u8>, String> {
    let digits: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err(format!(
            "`{text}` is not an even number of hex digits, like \"0d0a\""
        ));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16)
                .map_err(|_| format!("`{text}` contains a non-hex digit"))
        })
        .collect()
}

fn command(argv: &[String]) -> Result<Vec<String>, String> {
    match argv.first() {
        None => Err(
            "the command is empty; write the program and its arguments, like \
             [\"/usr/local/bin/check\", \"--quick\"]"
                .to_owned(),
        ),
        Some(p) if p.is_empty() => Err("the program name is empty".to_owned()),
        Some(_) => Ok(argv.to_vec()),
    }
}

impl Checker<'_> {
    /// Checks each key of a `health` table on its own. `None` if any is invalid (reported).
    pub(super) fn health_keys(&mut self, path: &str, raw: RawHealth) -> Option<Partial> {
        let mut ok = true;
        let mut p = Partial::default();
        macro_rules! key {
            ($field:ident, $name:literal, $check:expr) => {
                if let Some(v) = raw.$field {
                    match self.value(v, &format!("{path}.{}", $name), $check) {
                        Some(x) => p.$field = Some(x),
                        None => ok = false,
                    }
                }
            };
        }
        key!(kind, "kind", |s: &String| kind(s));
        key!(interval, "interval", |s: &String| interval(s));
        key!(timeout, "timeout", |s: &String| timeout(s));
        key!(rise, "rise", |n: &i64| count(*n, "rise"));
        key!(fall, "fall", |n: &i64| count(*n, "fall"));
        key!(port, "port", |n: &i64| port(*n));
        key!(path, "path", |s: &String| http_path(s));
        key!(host, "host", |s: &String| host(s));
        key!(expect_status, "expect_status", |r: &RawStatus| {
            expect_status(r)
        });
        key!(expect_body, "expect_body", |s: &String| nonempty(
            s,
            "expect_body"
        ));
        key!(command, "command", |v: &Vec<String>| command(v));
        match (raw.payload, raw.payload_hex) {
            (Some(_), Some(h)) => {
                self.error(
                    &format!("{path}.payload_hex"),
                    Some(h.span()),
                    "`payload` and `payload_hex` both set; keep one",
                );
                ok = false;
            }
            (Some(v), None) => {
                match self.value(v, &format!("{path}.payload"), |s| {
                    nonempty(s, "payload").map(String::into_bytes)
                }) {
                    Some(x) => p.payload = Some(x),
                    None => ok = false,
                }
            }
            (None, Some(v)) => {
                match self.value(v, &format!("{path}.payload_hex"), |s| payload_hex(s)) {
                    Some(x) => p.payload = Some(x),
                    None => ok = false,
                }
            }
            (None, None) => {}
        }
        ok.then_some(p)
    }

    /// Turns the keys in force for one table into a check, reporting what does not fit
    /// together at `path` (the table that set them).
    pub(super) fn health_check(
        &mut self,
        path: &str,
        span: Option<Range<usize>>,
        p: &Partial,
        protocol: Protocol,
    ) -> Option<HealthCheck> {
        let default = HealthCheck::default_for(protocol);
        let kind = p.kind.unwrap_or(Kind::of(&default.probe));
        let mut ok = true;
        for (key, wants) in p.specific() {
            if wants != kind {
                self.error(
                    &format!("{path}.{key}"),
                    span.clone(),
                    format!(
                        "`{key}` only applies to kind = \"{}\", and this check is \"{}\"",
                        wants.name(),
                        kind.name()
                    ),
                );
                ok = false;
            }
        }
        let interval = p.interval.unwrap_or(DEFAULT_INTERVAL);
        let timeout = p.timeout.unwrap_or(DEFAULT_TIMEOUT.min(interval));
        if kind != Kind::None && timeout > interval {
            self.error(
                &format!("{path}.timeout"),
                span.clone(),
                format!(
                    "timeout {timeout:?} is longer than the interval {interval:?}: a check must \
                     end before the next one starts"
                ),
            );
            ok = false;
        }
        let probe = match kind {
            Kind::None => Probe::None,
            Kind::Tcp => Probe::Tcp,
            Kind::Http => Probe::Http {
                path: p.path.clone().unwrap_or_else(|| "/".to_owned()),
                host: p.host.clone(),
                expect_status: p.expect_status.unwrap_or(DEFAULT_EXPECT_STATUS),
                expect_body: p.expect_body.clone(),
            },
            Kind::Udp => match &p.payload {
                Some(payload) => Probe::Udp {
                    payload: payload.clone(),
                },
                None => {
                    self.error(
                        path,
                        span.clone(),
                        "a \"udp\" check needs `payload` (or `payload_hex`): the datagram the \
                         service answers",
                    );
                    return None;
                }
            },
            Kind::Exec => match &p.command {
                Some(argv) => Probe::Exec {
                    command: argv.clone(),
                },
                None => {
                    self.error(
                        path,
                        span.clone(),
                        "an \"exec\" check needs `command`, like [\"/usr/local/bin/check\"]",
                    );
                    return None;
                }
            },
        };
        if kind == Kind::Udp && protocol == Protocol::Tcp && p.port.is_none() {
            self.warning(
                path,
                span,
                "a \"udp\" check on a TCP service probes the service's port over UDP; set `port` \
                 if the check listens elsewhere",
            );
        }
        ok.then_some(HealthCheck {
            probe,
            interval,
            timeout,
            rise: p.rise.unwrap_or(DEFAULT_RISE),
            fall: p.fall.unwrap_or(DEFAULT_FALL),
            port: p.port,
        })
    }

    /// A backend's check: its own keys over the VIP's. `vip` is the VIP's keys and finished
    /// check (`None` when the VIP's was invalid, already reported).
    pub(super) fn backend_health(
        &mut self,
        path: &str,
        raw: Option<Spanned<RawHealth>>,
        vip: Option<&(Partial, HealthCheck)>,
        protocol: Protocol,
    ) -> Option<HealthCheck> {
        let Some(raw) = raw else {
            return vip.map(|(_, check)| check.clone());
        };
        let span = raw.span();
        let own = self.health_keys(path, raw.into_inner())?;
        let (base, _) = vip?;
        self.health_check(path, Some(span), &own.over(base), protocol)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("5h")
                .unwrap_err()
                .contains("unknown unit `h`")
        );
        assert!(parse_duration("x1s").is_err());
    }

    #[test]
    fn status_ranges() {
        assert_eq!(expect_status(&RawStatus::One(204)), Ok((204, 204)));
        assert_eq!(
            expect_status(&RawStatus::Range("200-299".into())),
            Ok((200, 299))
        );
        assert!(
            expect_status(&RawStatus::Range("300-200".into()))
                .unwrap_err()
                .contains("empty")
        );
        assert!(expect_status(&RawStatus::One(700)).is_err());
        assert!(expect_status(&RawStatus::Range("2xx".into())).is_err());
    }

    #[test]
    fn hex_payloads() {
        assert_eq!(payload_hex("0d 0A"), Ok(vec![13, 10]));
        assert!(payload_hex("abc").is_err());
        assert!(payload_hex("zz").is_err());
    }
}
