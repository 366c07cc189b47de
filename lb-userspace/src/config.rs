//! The config file: its TOML format, parser and validator.
//!
//! Contract:
//! - [`load`] and [`parse`] return either a [`Config`] in which every check below passed, together
//!   with the warnings, or [`ConfigError::Invalid`] listing every problem found. There is no
//!   partial result: the agent applies a config only as a whole.
//! - Every problem names the file, the line and column where known, the field path
//!   (`vip[1].backend[0].weight`, indexes counted from 0 in file order) and what is wrong, in
//!   words meant for the person who edits the file. Problems are sorted in file order.
//! - TOML syntax errors, unknown keys and values of the wrong type (a quoted port, say) are
//!   reported first and stop checking, since the rest of the file cannot be read reliably after
//!   them. All other checks run to the end, so one pass reports every semantic problem.
//! - A validated config guarantees: the interface name is a valid Linux interface name; the API
//!   socket is an absolute path that fits a Unix socket address; VIP and backend addresses are
//!   IPv4 or IPv6 unicast, not unspecified, broadcast, multicast, loopback or (IPv6) link-local
//!   or IPv4-mapped; ports are 1 to 65535; no two VIPs share address, port and protocol, or name;
//!   within a VIP, backend addresses are unique, of the VIP's family and differ from the VIP
//!   address; weights are at most [`MAX_WEIGHT`]; every `table_size` is a
//!   prime no larger than [`MAX_TABLE_SIZE`] and at least the number of backends with weight
//!   above 0. With `[ha]`, the HA settings are within their ranges (see [`Ha`]), every tracked
//!   VIP exists, and no VIP address is a node's own address (`source`, `peers`).
//! - Not checked here, because they depend on the machine and change at run time: that the
//!   interface exists, that backends answer ARP on it, that the socket's directory exists, and the
//!   capacity of the data path's maps.
//! - VIPs and backends keep file order. The Maglev builder sorts backends itself, so reordering
//!   backends in the file does not change any table.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

mod ha;
mod health;
pub use ha::{
    DEFAULT_ADVERT_INTERVAL, DEFAULT_GARP_COUNT, DEFAULT_GARP_INTERVAL, DEFAULT_GARP_REPEAT,
    DEFAULT_HA_PRIORITY, DEFAULT_SYNC_PORT, Ha, MAX_ADVERT_INTERVAL, MAX_GARP_COUNT,
    MAX_GARP_INTERVAL, MAX_GARP_REPEAT, MAX_PREEMPT_DELAY, MAX_TRACK_PENALTY, MIN_ADVERT_INTERVAL,
    OWNER_PRIORITY,
};
pub use health::{
    DEFAULT_FALL, DEFAULT_INTERVAL, DEFAULT_RISE, DEFAULT_TIMEOUT, HealthCheck, parse_duration,
};

/// Largest backend weight (the same limit as ipvsadm).
pub const MAX_WEIGHT: u32 = 65535;
/// Weight of a backend that does not set one.
pub const DEFAULT_WEIGHT: u32 = 1;
/// The Maglev table size of a VIP that does not set one, and the largest accepted.
pub use crate::maglev::{DEFAULT_TABLE_SIZE, MAX_TABLE_SIZE};
/// Most services one agent serves (the capacity of the data path's VIP maps).
pub const MAX_VIPS: u32 = lb_common::maps::MAX_VIPS;
/// Most (service, backend) pairs one agent serves (backend ids 1 to 65535).
pub const MAX_BACKEND_PAIRS: u32 = lb_common::maps::MAX_BACKENDS - 1;
/// Most table entries one agent holds: two copies of every service's table (for atomic swaps),
/// 4 bytes each; 2^28 entries is 1 GiB.
pub const MAX_RING_ENTRIES: u64 = 1 << 28;
/// Below this many table entries per backend, Maglev's spread of load degrades (the Maglev paper,
/// section 3.4, picks M > 100 N to keep backends within about 1% of each other).
pub const TABLE_ENTRIES_PER_BACKEND: u32 = 100;
/// Where the agent listens for the CLI when `[api]` does not say.
pub const DEFAULT_API_SOCKET: &str = "/run/xdplb/xdplb.sock";
/// Longest Linux interface name (`IFNAMSIZ` minus the terminating NUL).
pub const MAX_INTERFACE_NAME_LEN: usize = 15;
/// Longest Unix socket path (`sun_path` is 108 bytes including the terminating NUL).
const MAX_SOCKET_PATH_LEN: usize = 107;

/// A validated config. See the module documentation for what validation guarantees.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    pub dataplane: Dataplane,
    pub api: Api,
    pub flows: Flows,
    pub vips: Vec<Vip>,
    /// `[ha]`: `None` without the section (no VRRP; the VIP addresses are not managed).
    pub ha: Option<Ha>,
}

/// `[flows]`: the data path's connection table (see `lb_common::flows`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Flows {
    /// Entries, all CPUs together (each CPU's LRU list holds `entries / CPUs`). Fixed when the
    /// agent starts.
    pub entries: u32,
    /// Entries of the IPv6 connection table, a table of its own (an IPv6 key is 40 bytes, an
    /// IPv4 one 16). Fixed when the agent starts.
    pub entries_v6: u32,
    /// A UDP flow idle this long is decided again by its VIP's table (and counted as new).
    /// Zero: UDP entries never expire (only the LRU evicts them).
    #[serde(rename = "udp_idle_timeout_ms", serialize_with = "health::millis")]
    pub udp_idle_timeout: std::time::Duration,
    /// Most new entries per CPU per second (0: no bound). Flows past it are forwarded by the
    /// table, only not remembered, so a flood of new flows cannot evict every established one.
    pub insert_rate_limit: u32,
    /// How long established flows keep going to a backend removed from its VIP, before they are
    /// remapped.
    #[serde(rename = "remove_grace_ms", serialize_with = "health::millis")]
    pub remove_grace: std::time::Duration,
}

/// Default [`Flows::entries`]: about 100 MiB of kernel memory (see the README).
pub const DEFAULT_FLOW_ENTRIES: u32 = 1 << 20;
/// Default [`Flows::entries_v6`]: about 32 MiB of kernel memory (see the README). Smaller than
/// the IPv4 default: most edges still carry more IPv4 flows, and an unused table costs its
/// memory all the same (LRU tables are preallocated).
pub const DEFAULT_FLOW_ENTRIES_V6: u32 = 1 << 18;
/// Smallest and largest [`Flows::entries`] and [`Flows::entries_v6`].
pub const MIN_FLOW_ENTRIES: u32 = 1024;
pub const MAX_FLOW_ENTRIES: u32 = 1 << 27;
/// Default [`Flows::udp_idle_timeout`].
pub const DEFAULT_UDP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default [`Flows::insert_rate_limit`]: per CPU per second.
pub const DEFAULT_INSERT_RATE_LIMIT: u32 = 100_000;
/// Default [`Flows::remove_grace`].
pub const DEFAULT_REMOVE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest [`Flows::udp_idle_timeout`] and [`Flows::remove_grace`].
pub const MAX_FLOW_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl Default for Flows {
    fn default() -> Self {
        Flows {
            entries: DEFAULT_FLOW_ENTRIES,
            entries_v6: DEFAULT_FLOW_ENTRIES_V6,
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            insert_rate_limit: DEFAULT_INSERT_RATE_LIMIT,
            remove_grace: DEFAULT_REMOVE_GRACE,
        }
    }
}

/// `[dataplane]`: where and how the XDP program runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dataplane {
    pub interface: String,
    pub mode: ForwardingMode,
    pub xdp_mode: XdpModeSetting,
}

/// How packets reach backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub enum ForwardingMode {
    /// Direct server return on the same L2 network: only the destination MAC is rewritten, the
    /// backend holds the VIP on a non-ARPing interface and answers clients directly.
    #[default]
    #[serde(rename = "dsr-l2")]
    DsrL2,
}

/// How the XDP program is attached to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Native XDP in the driver; fails if the driver has no XDP support.
    Driver,
    /// Generic (SKB) XDP: works on every interface, slower.
    Generic,
    /// Driver mode, falling back to generic mode if the driver refuses.
    #[default]
    Auto,
}

/// `[api]`: where the management API listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Api {
    /// Unix socket, always served (root only).
    pub socket: PathBuf,
    /// Optional TCP address. A validated config has `token_file` set whenever this is not a
    /// loopback address.
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send; read when the agent starts.
    pub token_file: Option<PathBuf>,
}

impl Default for Api {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_API_SOCKET),
            listen: None,
            token_file: None,
        }
    }
}

/// `[[vip]]`: one virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vip {
    /// Unique; defaults to `address:port/protocol` (`[address]:port/protocol` for IPv6).
    pub name: String,
    /// IPv4 or IPv6; its backends are of the same family.
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// Maglev table size M, a prime.
    pub table_size: u32,
    /// What to do when no backend (primary or backup) is healthy.
    pub all_down: AllDown,
    /// The VIP's `[vip.health]` with defaults filled in; each backend's own check is in
    /// [`Backend::health`].
    pub health: HealthCheck,
    /// In file order.
    pub backends: Vec<Backend>,
}

/// `all_down`: a VIP's behaviour when every backend failed its health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub enum AllDown {
    /// Keep forwarding to the backends that were in the table when the last one went down: a
    /// broken check (or a network problem between the checker and the backends) then does not
    /// take the service down, and the backends that do answer keep serving.
    #[default]
    #[serde(rename = "keep-last")]
    KeepLast,
    /// Empty the table: packets are dropped and counted as `drop_no_backend`.
    #[serde(rename = "drop")]
    Drop,
}

impl AllDown {
    pub fn as_str(self) -> &'static str {
        match self {
            AllDown::KeepLast => "keep-last",
            AllDown::Drop => "drop",
        }
    }
}

impl Vip {
    /// What identifies the service on the wire (and in the data path's VIP table).
    pub fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.address, self.port, self.protocol)
    }

    /// The address's bytes, if it is IPv6 (tests).
    #[cfg(test)]
    fn address_octets_v6(&self) -> [u8; 16] {
        match self.address {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => [0; 16],
        }
    }

    /// The service's address and port (`[2001:db8::1]:80` when printed).
    pub fn socket(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }

    /// The service's key in the data path's VIP tables.
    pub fn map_key(&self) -> crate::dataplane::ServiceKey {
        crate::dataplane::ServiceKey::new(self.address, self.port, self.protocol.number())
    }
}

/// The transport protocol of a VIP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// The protocol with this IP protocol number, if it is one a VIP can have.
    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }

    /// The name used in the config file and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ForwardingMode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
        }
    }
}

impl fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl XdpModeSetting {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Generic => "generic",
            Self::Auto => "auto",
        }
    }
}

impl fmt::Display for XdpModeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[vip.backend]]`: a real server behind a VIP. There is no backend port: with direct server
/// return the backend receives the packet unchanged, on the VIP's port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backend {
    /// Of the VIP's family (direct server return forwards the client's packet unchanged).
    pub address: IpAddr,
    /// 0 takes no new connections; otherwise a share of the Maglev table proportional to it.
    pub weight: u32,
    /// Takes traffic only while no primary (non-backup) backend of its VIP can.
    pub backup: bool,
    /// This backend's check: the VIP's, with the backend's own `health` keys over it.
    pub health: HealthCheck,
}

/// A config that validated, and what looked suspicious in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Loaded {
    pub config: Config,
    /// Sorted in file order; log them, they do not stop the config from being applied.
    pub warnings: Vec<Problem>,
}

/// One thing wrong (or suspicious) in a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Field path such as `vip[1].backend[0].weight`; empty for TOML syntax errors.
    pub path: String,
    pub message: String,
    /// Where in the file, when the problem is tied to a place in it (a missing `[dataplane]`
    /// is not).
    pub location: Option<Location>,
}

/// A position in the config file, both counted from 1; the column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Problem {
    /// `FILE:LINE:COLUMN: PATH: MESSAGE`, the form compilers use, so editors can jump to it.
    /// Without a location: `FILE: PATH: MESSAGE`.
    pub fn in_file<'a>(&'a self, file: &'a Path) -> impl fmt::Display + 'a {
        InFile(self, file)
    }
}

impl fmt::Display for Problem {
    /// `PATH: MESSAGE (line L, column C)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)?;
        if let Some(l) = self.location {
            write!(f, " (line {}, column {})", l.line, l.column)?;
        }
        Ok(())
    }
}

struct InFile<'a>(&'a Problem, &'a Path);

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let InFile(p, file) = self;
        write!(f, "{}", file.display())?;
        if let Some(l) = p.location {
            write!(f, ":{}:{}", l.line, l.column)?;
        }
        if !p.path.is_empty() {
            write!(f, ": {}", p.path)?;
        }
        write!(f, ": {}", p.message)
    }
}

/// Why a config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The reason is in the message too, because callers commonly
    /// print only the message.
    #[error("{}: cannot read the config file: {source}", file.display())]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but is not a valid config. Displays one line per problem.
    #[error("{}", render_problems(file, problems))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(file: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|p| p.in_file(file).to_string())
        .collect();
    lines.join("\n")
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    parse(&text, path)
}

/// Validates config text; `file` is used only in messages.
pub fn parse(text: &str, file: &Path) -> Result<Loaded, ConfigError> {
    let invalid = |problems| ConfigError::Invalid {
        file: file.to_owned(),
        problems,
    };
    let raw = deserialize(text).map_err(invalid)?;
    let mut checker = Checker {
        text,
        line_starts: std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let config = checker.config(raw);
    let Checker {
        mut errors,
        mut warnings,
        ..
    } = checker;
    // Stable sorts: problems at the same place keep the order in which they were found.
    errors.sort_by_key(|p| p.location);
    warnings.sort_by_key(|p| p.location);
    match config {
        Some(config) if errors.is_empty() => Ok(Loaded { config, warnings }),
        _ => Err(invalid(errors)),
    }
}

// The file as written. Values whose problems deserve a better message than serde's (addresses,
// numbers out of range, enum words) are kept as plain strings and integers, and every required
// key is an Option, so that the checker can report all of them at once, with their place.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: Option<Spanned<RawDataplane>>,
    api: Option<Spanned<RawApi>>,
    flows: Option<Spanned<RawFlows>>,
    #[serde(default)]
    vip: Vec<Spanned<RawVip>>,
    ha: Option<Spanned<ha::RawHa>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    entries: Option<Spanned<i64>>,
    entries_v6: Option<Spanned<i64>>,
    udp_idle_timeout: Option<Spanned<String>>,
    insert_rate_limit: Option<Spanned<i64>>,
    remove_grace: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interface: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    socket: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    protocol: Option<Spanned<String>>,
    table_size: Option<Spanned<i64>>,
    all_down: Option<Spanned<String>>,
    health: Option<Spanned<health::RawHealth>>,
    #[serde(default)]
    backend: Vec<Spanned<RawBackend>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    backup: Option<Spanned<bool>>,
    health: Option<Spanned<health::RawHealth>>,
}

/// Parses the TOML and maps it onto the raw structs. Errors here stop checking.
fn deserialize(text: &str) -> Result<RawConfig, Vec<Problem>> {
    // The recoverable parser reports every syntax error, not just the first.
    let (document, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        let mut problems: Vec<Problem> = errors.iter().map(|e| syntax_problem(text, e)).collect();
        problems.sort_by_key(|p| p.location);
        problems.dedup();
        return Err(problems);
    }
    serde_path_to_error::deserialize(toml::Deserializer::from(document))
        .map_err(|e| vec![structure_problem(text, &e)])
}

fn syntax_problem(text: &str, error: &toml::de::Error) -> Problem {
    let span = error.span();
    let found = span.clone().and_then(|s| text.get(s)).unwrap_or_default();
    let message = match error.message() {
        "duplicate key" if found == "vip" => "`vip` is defined twice: write each VIP as `[[vip]]` \
             (double brackets), and put each `[[vip.backend]]` after the `[[vip]]` it belongs to"
            .to_owned(),
        "duplicate key" => format!("`{found}` is defined twice"),
        other => format!("invalid TOML: {}", one_line(other)),
    };
    Problem {
        path: String::new(),
        message,
        location: span.map(|s| location(text, s.start)),
    }
}

/// Unknown keys and wrong value types, reworded: serde speaks of fields, sequences and i64.
fn structure_problem(text: &str, error: &serde_path_to_error::Error<toml::de::Error>) -> Problem {
    use serde_path_to_error::Segment;

    let mut path = String::new();
    // The key whose value is wrong, and whether the value is an element of its array.
    let mut key = "";
    let mut element = false;
    for segment in error.path().iter() {
        match segment {
            // toml::Spanned's internal wrapper field; not in the file.
            Segment::Map { key: k } if k.starts_with("$__serde_spanned") => {}
            Segment::Map { key: k } | Segment::Enum { variant: k } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                key = k;
                element = false;
            }
            Segment::Seq { index } => {
                path.push_str(&format!("[{index}]"));
                element = true;
            }
            Segment::Unknown => path.push_str(".?"),
        }
    }
    let inner = error.inner();
    let raw = one_line(inner.message());
    let message = if let Some(rest) = raw.strip_prefix("unknown field ") {
        unknown_key(rest)
    } else if let Some(rest) = raw.strip_prefix("invalid type: ") {
        match rest.rsplit_once(", expected ") {
            Some((found, serde_expected)) => {
                let found = match found {
                    "map" => "a table",
                    "sequence" => "an array",
                    other => other,
                };
                let expected = expected_value(key, element).unwrap_or(serde_expected);
                format!("expected {expected}, found {found}")
            }
            None => raw,
        }
    } else {
        raw
    };
    Problem {
        path,
        message,
        location: inner.span().map(|s| location(text, s.start)),
    }
}

/// `rest` is serde's "`adress`, expected `address` or `weight`" (or "expected one of ...").
fn unknown_key(rest: &str) -> String {
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let Some(unknown) = quoted.next() else {
        return format!("unknown key {rest}");
    };
    let allowed: Vec<&str> = quoted.collect();
    let mut message = format!("unknown key `{unknown}`");
    let closest = allowed
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 2.max(k.len() / 3) && *d < k.len());
    if let Some((_, k)) = closest {
        message.push_str(&format!("; did you mean `{k}`?"));
    }
    if !allowed.is_empty() {
        let list: Vec<String> = allowed.iter().map(|k| format!("`{k}`")).collect();
        message.push_str(&format!(" (keys allowed here: {})", list.join(", ")));
    }
    message
}

/// What a key's value should look like, in the words of the reference config.
fn expected_value(key: &str, element: bool) -> Option<&'static str> {
    Some(match (key, element) {
        ("dataplane", _) => "a `[dataplane]` section",
        ("api", _) => "an `[api]` section",
        ("flows", _) => "a `[flows]` section",
        ("entries", _) => "a whole number without quotes, like 1048576",
        ("entries_v6", _) => "a whole number without quotes, like 262144",
        ("insert_rate_limit", _) => "a whole number without quotes, like 100000 (0: no bound)",
        ("udp_idle_timeout" | "remove_grace", _) => "a duration in quotes, like \"30s\" or \"2m\"",
        ("vip", false) => "`[[vip]]` sections (double brackets: there can be several)",
        ("vip", true) => "a `[[vip]]` table",
        ("backend", false) => "`[[vip.backend]]` sections (double brackets: there can be several)",
        ("backend", true) => "a `[[vip.backend]]` table",
        ("address", _) => "an IPv4 or IPv6 address in quotes, like \"10.0.0.1\" or \"2001:db8::1\"",
        ("port", _) => "a port number without quotes, like 80",
        ("weight", _) => "a whole number from 0 to 65535, without quotes",
        ("table_size", _) => "a prime number without quotes, like 65537",
        ("protocol", _) => "\"tcp\" or \"udp\", in quotes",
        ("interface", _) => "an interface name in quotes, like \"eth0\"",
        ("mode", _) => "\"dsr-l2\", in quotes",
        ("xdp_mode", _) => "\"driver\", \"generic\" or \"auto\", in quotes",
        ("name", _) => "a name in quotes",
        ("socket", _) => "a file path in quotes",
        ("health", _) => "a `[vip.health]` table, or `health = { ... }` on a backend",
        ("backup", _) => "true or false, without quotes",
        ("all_down", _) => "\"keep-last\" or \"drop\", in quotes",
        ("kind", _) => "\"tcp\", \"http\", \"udp\", \"exec\" or \"none\", in quotes",
        ("interval" | "timeout", _) => "a duration in quotes, like \"1s\" or \"500ms\"",
        ("rise" | "fall", _) => "a whole number from 1 to 100, without quotes",
        ("path" | "host" | "expect_body" | "payload" | "payload_hex", _) => "a string in quotes",
        ("expect_status", _) => "a status like 200, or a range in quotes like \"200-399\"",
        ("command", false) => "an array of strings, like [\"/usr/local/bin/check\", \"-q\"]",
        ("command", true) => "a string in quotes",
        ("listen", _) => "ADDRESS:PORT in quotes, like \"127.0.0.1:9180\"",
        ("token_file", _) => "a file path in quotes",
        ("ha", _) => "an `[ha]` section",
        ("vrid", _) => "a whole number from 1 to 255, without quotes",
        ("priority", _) => "a whole number from 1 to 255, without quotes",
        ("garp_count", _) => "a whole number from 1 to 100, without quotes",
        ("track_penalty", _) => "a whole number from 0 to 254, without quotes",
        ("sync_port", _) => "a port number without quotes, like 5599 (0: off)",
        ("advert_interval" | "preempt_delay" | "garp_interval" | "garp_repeat", _) => {
            "a duration in quotes, like \"1s\" or \"10ms\""
        }
        ("preempt" | "virtual_mac" | "track_interface", _) => "true or false, without quotes",
        ("peers", false) => "an array of IPv4 addresses, like [\"10.0.0.3\"]",
        ("peers", true) | ("source", _) => "an IPv4 address in quotes, like \"10.0.0.2\"",
        ("track_vips", false) => "an array of VIP names, like [\"web\"]",
        ("track_vips", true) => "a VIP name or ADDRESS:PORT/PROTO in quotes",
        _ => return None,
    })
}

fn one_line(message: &str) -> String {
    message.trim().lines().collect::<Vec<_>>().join("; ")
}

fn location(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// Levenshtein distance, for "did you mean" on misspelt keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Where a VIP or backend was first defined, for messages about duplicates.
struct FirstSeen {
    path: String,
    line: Option<usize>,
}

impl fmt::Display for FirstSeen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct SeenVips {
    keys: HashMap<(IpAddr, u16, Protocol), FirstSeen>,
    /// Name, and whether it was written in the file (not defaulted).
    names: HashMap<String, (FirstSeen, bool)>,
}

/// The semantic checks. Each method returns `None` when its part is invalid, after recording
/// why, and carries on so that one run finds every problem.
struct Checker<'a> {
    text: &'a str,
    /// Byte offset of the start of every line, so a location costs a binary search rather than a
    /// scan of the file (configs with tens of thousands of backends record one per backend).
    line_starts: Vec<usize>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Checker<'_> {
    fn location(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        Location {
            line,
            column: self.text[start..offset].chars().count() + 1,
        }
    }

    fn problem(&self, path: &str, span: Option<Range<usize>>, message: String) -> Problem {
        Problem {
            path: path.to_owned(),
            message,
            location: span.map(|s| self.location(s.start)),
        }
    }

    fn error(&mut self, path: &str, span: Option<Range<usize>>, message: impl Into<String>) {
        let p = self.problem(path, span, message.into());
        self.errors.push(p);
    }

    fn warning(&mut self, path: &str, span: Option<Range<usize>>, message: impl Into<String>) {
        let p = self.problem(path, span, message.into());
        self.warnings.push(p);
    }

    fn first_seen(&self, path: &str, span: Range<usize>) -> FirstSeen {
        FirstSeen {
            path: path.to_owned(),
            line: Some(self.location(span.start).line),
        }
    }

    /// Runs `check` on a present value; records its error at the value's place.
    fn value<R, T>(
        &mut self,
        raw: Spanned<R>,
        path: &str,
        check: impl FnOnce(&R) -> Result<T, String>,
    ) -> Option<T> {
        let span = raw.span();
        check(raw.get_ref())
            .map_err(|message| self.error(path, Some(span), message))
            .ok()
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let dataplane = match raw.dataplane {
            Some(d) => self.dataplane(d),
            None => {
                self.error(
                    "dataplane",
                    None,
                    "missing section `[dataplane]`, which names the interface to attach to",
                );
                None
            }
        };
        let api = self.api(raw.api);
        let flows = self.flows(raw.flows);
        let vips = self.vips(raw.vip);
        let interface = dataplane.as_ref().map(|d| d.interface.as_str());
        let ha = self.ha(raw.ha, interface, &vips);
        let vips: Option<Vec<Vip>> = vips.into_iter().collect();
        let vips = vips.filter(|vips| self.capacity(vips));
        Some(Config {
            dataplane: dataplane?,
            api: api?,
            flows: flows?,
            vips: vips?,
            ha: ha?,
        })
    }

    fn flows(&mut self, raw: Option<Spanned<RawFlows>>) -> Option<Flows> {
        let Some(raw) = raw else {
            return Some(Flows::default());
        };
        let raw = raw.into_inner();
        let d = Flows::default();
        let entries = match raw.entries {
            Some(v) => self.value(v, "flows.entries", |n| flow_entries(*n)),
            None => Some(d.entries),
        };
        let entries_v6 = match raw.entries_v6 {
            Some(v) => self.value(v, "flows.entries_v6", |n| flow_entries(*n)),
            None => Some(d.entries_v6),
        };
        let udp_idle_timeout = match raw.udp_idle_timeout {
            Some(v) => self.value(v, "flows.udp_idle_timeout", |s| flow_duration(s)),
            None => Some(d.udp_idle_timeout),
        };
        let insert_rate_limit = match raw.insert_rate_limit {
            Some(v) => self.value(v, "flows.insert_rate_limit", |n| {
                u32::try_from(*n).map_err(|_| {
                    format!(
                        "insert_rate_limit {n} is out of range; from 0 (no bound) to {}",
                        u32::MAX
                    )
                })
            }),
            None => Some(d.insert_rate_limit),
        };
        let remove_grace = match raw.remove_grace {
            Some(v) => self.value(v, "flows.remove_grace", |s| flow_duration(s)),
            None => Some(d.remove_grace),
        };
        Some(Flows {
            entries: entries?,
            entries_v6: entries_v6?,
            udp_idle_timeout: udp_idle_timeout?,
            insert_rate_limit: insert_rate_limit?,
            remove_grace: remove_grace?,
        })
    }

    fn dataplane(&mut self, raw: Spanned<RawDataplane>) -> Option<Dataplane> {
        let span = raw.span();
        let raw = raw.into_inner();
        let interface = match raw.interface {
            Some(v) => self.value(v, "dataplane.interface", |s| interface_name(s)),
            None => {
                self.error(
                    "dataplane",
                    Some(span),
                    "missing `interface`: the network interface to attach to, like \"eth0\"",
                );
                None
            }
        };
        let mode = match raw.mode {
            Some(v) => self.value(v, "dataplane.mode", |s| forwarding_mode(s)),
            None => Some(ForwardingMode::default()),
        };
        let xdp_mode = match raw.xdp_mode {
            Some(v) => self.value(v, "dataplane.xdp_mode", |s| xdp_mode(s)),
            None => Some(XdpModeSetting::default()),
        };
        Some(Dataplane {
            interface: interface?,
            mode: mode?,
            xdp_mode: xdp_mode?,
        })
    }

    fn api(&mut self, raw: Option<Spanned<RawApi>>) -> Option<Api> {
        let Some(raw) = raw else {
            return Some(Api::default());
        };
        let raw = raw.into_inner();
        let socket = match raw.socket {
            Some(v) => self.value(v, "api.socket", |s| socket_path(s)),
            None => Some(PathBuf::from(DEFAULT_API_SOCKET)),
        };
        let token_span = raw.token_file.as_ref().map(Spanned::span);
        let token_file = match raw.token_file {
            Some(v) => self
                .value(v, "api.token_file", |s| absolute_file(s, "token_file"))
                .map(Some),
            None => Some(None),
        };
        let listen = match raw.listen {
            Some(v) => {
                let at = v.span();
                let listen = self.value(v, "api.listen", |s| listen_address(s));
                if let Some(addr) = listen
                    && !addr.ip().is_loopback()
                    && token_span.is_none()
                {
                    self.error(
                        "api.listen",
                        Some(at),
                        format!(
                            "{addr} is not a loopback address, and anyone who reaches it could \
                             change the load balancer: set `token_file` to a file holding the \
                             bearer token clients must send, or listen on 127.0.0.1"
                        ),
                    );
                    return None;
                }
                listen.map(Some)
            }
            None => {
                if token_span.is_some() {
                    self.warning(
                        "api.token_file",
                        token_span,
                        "`token_file` is set but `listen` is not: the token only guards the TCP \
                         listener, the Unix socket is guarded by its file permissions",
                    );
                }
                Some(None)
            }
        };
        Some(Api {
            socket: socket?,
            listen: listen?,
            token_file: token_file?,
        })
    }

    /// Every `[[vip]]` in file order, `None` where one is invalid (reported). The checks
    /// across VIPs that need all of them valid ([`capacity`](Self::capacity)) are the caller's.
    fn vips(&mut self, raw: Vec<Spanned<RawVip>>) -> Vec<Option<Vip>> {
        if raw.is_empty() {
            self.warning(
                "vip",
                None,
                "no `[[vip]]` sections: the agent will run with no services",
            );
        }
        let mut seen = SeenVips::default();
        raw.into_iter()
            .enumerate()
            .map(|(i, raw)| self.vip(&format!("vip[{i}]"), raw, &mut seen))
            .collect()
    }

    /// The data path's fixed capacities, so that a config `check-config` accepts also loads.
    fn capacity(&mut self, vips: &[Vip]) -> bool {
        let mut ok = true;
        if vips.len() > MAX_VIPS as usize {
            self.error(
                "vip",
                None,
                format!(
                    "{} services; one agent serves at most {MAX_VIPS}",
                    vips.len()
                ),
            );
            ok = false;
        }
        let pairs: usize = vips.iter().map(|v| v.backends.len()).sum();
        if pairs > MAX_BACKEND_PAIRS as usize {
            self.error(
                "vip",
                None,
                format!(
                    "{pairs} backends over all services; one agent serves at most \
                     {MAX_BACKEND_PAIRS} (a backend in two services counts twice)"
                ),
            );
            ok = false;
        }
        let ring = ring_entries(vips);
        if ring > MAX_RING_ENTRIES {
            self.error(
                "vip",
                None,
                format!(
                    "the services' tables need {ring} entries (two copies of every table_size, \
                     for atomic updates), more than the {MAX_RING_ENTRIES} one agent holds; use \
                     smaller table_size values"
                ),
            );
            ok = false;
        }
        ok
    }

    fn vip(&mut self, path: &str, raw: Spanned<RawVip>, seen: &mut SeenVips) -> Option<Vip> {
        let span = raw.span();
        let raw = raw.into_inner();

        let mut missing = Vec::new();
        let address_span = raw.address.as_ref().map(Spanned::span);
        let address = match raw.address {
            Some(v) => self.value(v, &format!("{path}.address"), |s| ip(s, Role::Vip)),
            None => {
                missing.push("`address`");
                None
            }
        };
        let port = match raw.port {
            Some(v) => self.value(v, &format!("{path}.port"), |n| port(*n)),
            None => {
                missing.push("`port`");
                None
            }
        };
        let protocol = match raw.protocol {
            Some(v) => self.value(v, &format!("{path}.protocol"), |s| protocol(s)),
            None => {
                missing.push("`protocol` (\"tcp\" or \"udp\")");
                None
            }
        };
        if !missing.is_empty() {
            self.error(
                path,
                Some(span.clone()),
                format!("VIP without {}", missing.join(", ")),
            );
        }
        let table_size_span = raw.table_size.as_ref().map(Spanned::span);
        let table_size = match raw.table_size {
            Some(v) => self.value(v, &format!("{path}.table_size"), |n| table_size(*n)),
            None => Some(DEFAULT_TABLE_SIZE),
        };
        let name_span = raw.name.as_ref().map(Spanned::span);
        let explicit_name = match raw.name {
            Some(v) => self
                .value(v, &format!("{path}.name"), |s| vip_name(s))
                .map(Some),
            None => Some(None),
        };

        let key = address.zip(port).zip(protocol).map(|((a, p), q)| (a, p, q));
        if let Some(key) = key {
            match seen.keys.get(&key) {
                Some(first) => {
                    let (a, p, q) = key;
                    let message = format!(
                        "duplicate VIP {}/{q}: {first} has the same address, port and protocol",
                        SocketAddr::new(a, p)
                    );
                    self.error(path, Some(span.clone()), message);
                }
                None => {
                    let first = self.first_seen(path, span.clone());
                    seen.keys.insert(key, first);
                }
            }
        }
        let name = match (explicit_name, key) {
            (Some(Some(name)), _) => Some((name, true)),
            (Some(None), Some((a, p, q))) => {
                Some((format!("{}/{q}", SocketAddr::new(a, p)), false))
            }
            _ => None,
        };
        if let Some((name, explicit)) = &name {
            match seen.names.get(name) {
                // Two defaulted names collide only when the VIPs do, which is reported above.
                Some((_, false)) if !explicit => {}
                Some((first, _)) => {
                    let (name_path, at, message) = if *explicit {
                        let message = format!("VIP name `{name}` is already used by {first}");
                        (format!("{path}.name"), name_span.clone(), message)
                    } else {
                        let message = format!(
                            "this VIP's default name `{name}` is already the name of {first}; \
                             give one of them another `name`"
                        );
                        (path.to_owned(), Some(span.clone()), message)
                    };
                    self.error(&name_path, at, message);
                }
                None => {
                    let first = self.first_seen(path, span.clone());
                    seen.names.insert(name.clone(), (first, *explicit));
                }
            }
        }

        let all_down = match raw.all_down {
            Some(v) => self.value(v, &format!("{path}.all_down"), |s| all_down(s)),
            None => Some(AllDown::default()),
        };
        // The VIP's check, and the keys its backends inherit. Without a protocol there is
        // nothing to default the kind from; that is already reported.
        let vip_health = protocol.and_then(|proto| {
            let health_path = format!("{path}.health");
            let (keys, span) = match raw.health {
                Some(h) => {
                    let span = h.span();
                    (self.health_keys(&health_path, h.into_inner())?, Some(span))
                }
                None => (Default::default(), None),
            };
            let check = self.health_check(&health_path, span, &keys, proto)?;
            Some((keys, check))
        });
        let backends = self.backends(
            path,
            raw.backend,
            address.zip(address_span).map(|(address, span)| VipPlace {
                address,
                span,
                name: name.as_ref().map(|(n, _)| n.clone()),
            }),
            protocol.map(|p| (p, vip_health.as_ref())),
        );

        if let (Some(backends), Some(m)) = (&backends, table_size) {
            self.table_fits(path, span.clone(), table_size_span, m, backends);
        }
        if let Some(backends) = &backends {
            if backends.is_empty() {
                self.warning(
                    path,
                    Some(span.clone()),
                    "VIP has no backends: its packets will be dropped until a backend is added",
                );
            } else if backends.iter().all(|b| b.weight == 0) {
                self.warning(
                    path,
                    Some(span.clone()),
                    "all backends of this VIP have weight 0: it takes no new connections",
                );
            } else if backends.iter().all(|b| b.backup) {
                self.warning(
                    path,
                    Some(span.clone()),
                    "every backend of this VIP is a backup: backups stand in for primaries, so \
                     with none they simply all take traffic",
                );
            }
        }

        Some(Vip {
            name: name?.0,
            address: address?,
            port: port?,
            protocol: protocol?,
            table_size: table_size?,
            all_down: all_down?,
            health: vip_health?.1,
            backends: backends?,
        })
    }

    /// Checks the backends of the VIP at `vip_path`; `vip` is the VIP's address (when valid),
    /// its place and its name.
    fn backends(
        &mut self,
        vip_path: &str,
        raw: Vec<Spanned<RawBackend>>,
        vip: Option<VipPlace>,
        vip_health: Option<(Protocol, Option<&(health::Partial, HealthCheck)>)>,
    ) -> Option<Vec<Backend>> {
        let mut seen: HashMap<IpAddr, FirstSeen> = HashMap::new();
        let mut backends = Some(Vec::with_capacity(raw.len()));
        for (j, raw) in raw.into_iter().enumerate() {
            let path = format!("{vip_path}.backend[{j}]");
            let span = raw.span();
            let raw = raw.into_inner();
            let address = match raw.address {
                Some(v) => {
                    let address_path = format!("{path}.address");
                    let address_span = v.span();
                    let address = self.value(v, &address_path, |s| ip(s, Role::Backend));
                    match (address, &vip) {
                        (Some(a), Some(vip)) if a == vip.address => {
                            let vip_line = self.location(vip.span.start).line;
                            let message = format!(
                                "backend {a} is the VIP's own address (line {vip_line}); a \
                                 backend must be another host"
                            );
                            self.error(&address_path, Some(address_span), message);
                            None
                        }
                        (Some(a), Some(vip)) if a.is_ipv4() != vip.address.is_ipv4() => {
                            let vip_line = self.location(vip.span.start).line;
                            let vip_desc = format!(
                                "vip `{}` ({}, line {vip_line})",
                                vip.name.as_deref().unwrap_or(vip_path),
                                vip.address
                            );
                            let message = family_mismatch(&vip_desc, vip.address, a);
                            self.error(&address_path, Some(address_span), message);
                            None
                        }
                        (Some(a), _) => match seen.get(&a) {
                            Some(first) => {
                                let message = format!(
                                    "backend {a} is listed twice in this VIP: also at {first}"
                                );
                                self.error(&address_path, Some(address_span), message);
                                None
                            }
                            None => {
                                seen.insert(a, self.first_seen(&path, span.clone()));
                                Some(a)
                            }
                        },
                        (None, _) => None,
                    }
                }
                None => {
                    self.error(&path, Some(span), "backend without `address`");
                    None
                }
            };
            let weight = match raw.weight {
                Some(v) => self.value(v, &format!("{path}.weight"), |n| weight(*n)),
                None => Some(DEFAULT_WEIGHT),
            };
            let backup = raw.backup.map(Spanned::into_inner).unwrap_or(false);
            let health = match vip_health {
                Some((proto, vip)) => {
                    self.backend_health(&format!("{path}.health"), raw.health, vip, proto)
                }
                None => None,
            };
            let backend = address
                .zip(weight)
                .zip(health)
                .map(|((address, weight), health)| Backend {
                    address,
                    weight,
                    backup,
                    health,
                });
            backends = backends.zip(backend).map(|(mut backends, backend)| {
                backends.push(backend);
                backends
            });
        }
        backends
    }

    /// Checks table size `m` against the number of backends. Problems point at `table_size` when
    /// the file sets it, else at the VIP.
    fn table_fits(
        &mut self,
        vip_path: &str,
        vip_span: Range<usize>,
        table_size_span: Option<Range<usize>>,
        m: u32,
        backends: &[Backend],
    ) {
        let (path, span) = match table_size_span {
            Some(s) => (format!("{vip_path}.table_size"), s),
            None => (vip_path.to_owned(), vip_span),
        };
        let n = u32::try_from(backends.len()).unwrap_or(u32::MAX);
        let active = backends.iter().filter(|b| b.weight > 0).count();
        let advice = |n: u32| match next_prime(n.saturating_mul(TABLE_ENTRIES_PER_BACKEND)) {
            Some(p) => format!("use a prime of at least 100 x {n}, such as {p}"),
            None => format!("use {MAX_TABLE_SIZE}, the largest table size"),
        };
        if (m as usize) < active {
            let message = format!(
                "table_size {m} is smaller than the {active} backends with weight above 0: \
                 each needs at least one table entry; {}",
                advice(n)
            );
            self.error(&path, Some(span), message);
        } else if u64::from(m) < u64::from(n) * u64::from(TABLE_ENTRIES_PER_BACKEND)
            && m < MAX_TABLE_SIZE
        {
            // Counts all backends, not only those with weight above 0: weights can be raised at
            // run time without editing the file.
            let message = format!(
                "table_size {m} is less than 100 entries per backend ({n} backend{}), so Maglev \
                 spreads load unevenly; {}",
                if n == 1 { "" } else { "s" },
                advice(n)
            );
            self.warning(&path, Some(span), message);
        }
    }
}

/// A VIP's address as its backends are checked against it.
struct VipPlace {
    address: IpAddr,
    span: Range<usize>,
    /// Its name, when valid.
    name: Option<String>,
}

/// Refuses a backend (added at run time) of another family than its VIP's.
pub fn check_backend_family(vip: &Vip, backend: IpAddr) -> Result<(), String> {
    if vip.address.is_ipv4() == backend.is_ipv4() {
        return Ok(());
    }
    let vip_desc = format!("vip `{}` ({})", vip.name, vip.address);
    Err(family_mismatch(&vip_desc, vip.address, backend))
}

/// Why a backend of the other family than its VIP's is refused; `vip` describes the VIP.
fn family_mismatch(vip: &str, vip_address: IpAddr, backend: IpAddr) -> String {
    let family = |a: IpAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    format!(
        "backend {backend} is {} but {vip} is {}: with direct server return the backend \
         receives the client's packet unchanged, addressed to the VIP, so a VIP's backends \
         must be of its family; put {} backends under a VIP of their own",
        family(backend),
        family(vip_address),
        family(backend)
    )
}

#[derive(Clone, Copy)]
enum Role {
    Vip,
    Backend,
    /// An HA node's own address (`[ha]` `source` and `peers`).
    Node,
}

impl Role {
    fn noun(self) -> &'static str {
        match self {
            Role::Vip => "VIP",
            Role::Backend => "backend",
            Role::Node => "HA peer",
        }
    }
}

/// Checks a backend address given at run time (API, CLI) with the config's rules. An IPv6
/// address may be written in brackets, as in a service (`[2001:db8::11]`).
pub fn backend_address(text: &str) -> Result<IpAddr, String> {
    let bare = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    ip(bare.unwrap_or(text), Role::Backend)
}

/// [`backend_address`] for an address already parsed.
pub fn check_backend_address(address: IpAddr) -> Result<(), String> {
    ip(&address.to_string(), Role::Backend).map(drop)
}

/// Checks a VIP or backend address: IPv4 as [`ipv4`], or IPv6.
fn ip(text: &str, role: Role) -> Result<IpAddr, String> {
    match text.parse::<Ipv6Addr>() {
        Ok(address) => ipv6(address, role).map(IpAddr::V6),
        Err(_) => ipv4(text, role).map(IpAddr::V4),
    }
}

/// Checks an IPv6 VIP or backend address (HA nodes' own addresses are IPv4: [`ipv4`]).
fn ipv6(address: Ipv6Addr, role: Role) -> Result<Ipv6Addr, String> {
    let noun = role.noun();
    if let Some(v4) = address.to_ipv4_mapped() {
        return Err(format!(
            "{address} is an IPv4-mapped IPv6 address, which never appears on the wire; write \
             the IPv4 address \"{v4}\""
        ));
    }
    let class = if address.is_unspecified() {
        "is the unspecified address (::), which is never a destination"
    } else if address.is_loopback() {
        "is the loopback address (::1)"
    } else if address.is_multicast() {
        "is a multicast address (ff00::/8)"
    } else if address.is_unicast_link_local() {
        match role {
            // A link-local address is only meaningful on one link (fe80::1 exists on every
            // one of them), so clients beyond that link cannot address it, and a router never
            // forwards to it.
            Role::Vip => {
                "is link-local (fe80::/10): it is only valid on one link, so clients on other \
                 networks cannot reach it and routers do not forward to it"
            }
            // The backend must hold the VIP (a routable address) anyway; what a link-local
            // backend address breaks is the agent's own use of it: the health checks and the
            // neighbour entry would need the interface as a zone (fe80::1%eth0), which a
            // backend address does not carry.
            _ => {
                "is link-local (fe80::/10): health checks and neighbour resolution would need \
                 the interface as its zone (fe80::..%eth0); use the backend's global or \
                 unique-local (fc00::/7) address on the interface's network"
            }
        }
    } else {
        return Ok(address);
    };
    Err(match role {
        Role::Vip => format!(
            "{address} {class}; a VIP must be a unicast address that clients reach over the \
             network"
        ),
        _ => format!(
            "{address} {class}; a {noun} must be the unicast address of a host on the \
             interface's network"
        ),
    })
}

/// Validates one `[[vip]]` table (with its backends and health check) given at run time, with
/// the same checks and messages as a config file; `source` names it in messages. Whether it
/// clashes with the VIPs already running is for the caller to check.
pub fn parse_vip(text: &str, source: &Path) -> Result<Vip, ConfigError> {
    // The required [dataplane] goes after the fragment, so line numbers stay the fragment's.
    let whole = format!("{text}\n[dataplane]\ninterface = \"lo\"\n");
    let loaded = parse(&whole, source)?;
    let mut vips = loaded.config.vips;
    match vips.len() {
        1 => Ok(vips.remove(0)),
        n => Err(ConfigError::Invalid {
            file: source.to_owned(),
            problems: vec![Problem {
                path: "vip".to_owned(),
                message: format!("expected exactly one `[[vip]]` table, found {n}"),
                location: None,
            }],
        }),
    }
}

fn ipv4(text: &str, role: Role) -> Result<Ipv4Addr, String> {
    let noun = role.noun();
    let Ok(address) = text.parse::<Ipv4Addr>() else {
        return Err(not_ipv4(text, role));
    };
    let class = if address.octets()[0] == 0 {
        Some("is in 0.0.0.0/8 (\"this network\"), which is never a destination")
    } else if address.is_broadcast() {
        Some("is the broadcast address")
    } else if address.is_multicast() {
        Some("is a multicast address (224.0.0.0/4)")
    } else if address.is_loopback() {
        Some("is a loopback address (127.0.0.0/8)")
    } else {
        None
    };
    match (class, role) {
        (None, _) => Ok(address),
        (Some(class), Role::Vip) => Err(format!(
            "{address} {class}; a VIP must be a unicast address that clients reach over the \
             network"
        )),
        (Some(class), Role::Backend) => Err(format!(
            "{address} {class}; a {noun} must be the unicast address of a host on the \
             interface's network"
        )),
        (Some(class), Role::Node) => Err(format!(
            "{address} {class}; an HA node's address must be the unicast address of a load \
             balancer on the `[ha]` interface's network"
        )),
    }
}

/// Explains why `text` is not an IPv4 address, aiming at the likely mistake.
fn not_ipv4(text: &str, role: Role) -> String {
    let noun = role.noun();
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return "the address is empty".to_owned();
    }
    let node = matches!(role, Role::Node);
    if trimmed != text && trimmed.parse::<IpAddr>().is_ok() {
        return format!("remove the spaces around the address: \"{trimmed}\"");
    }
    let bracketed = text.strip_prefix('[').and_then(|t| t.strip_suffix(']'));
    if bracketed.is_some_and(|t| t.parse::<Ipv6Addr>().is_ok()) && !node {
        return format!(
            "write the IPv6 address without brackets: \"{}\"",
            bracketed.unwrap_or_default()
        );
    }
    if text.parse::<Ipv6Addr>().is_ok() || bracketed.is_some_and(|t| t.parse::<Ipv6Addr>().is_ok())
    {
        return format!(
            "an {noun}'s address must be IPv4: VRRP runs over IPv4 here (IPv6 VIPs are fine, \
             the master holds them too)"
        );
    }
    if let Some((address, _)) = text.split_once('/')
        && address.parse::<IpAddr>().is_ok()
    {
        return format!("write a single address without a prefix length: \"{address}\"");
    }
    if let Ok(with_port) = text.parse::<SocketAddr>() {
        let address = with_port.ip();
        return match role {
            Role::Vip => format!("write the port in `port`, and only \"{address}\" here"),
            Role::Backend => format!(
                "backends have no port (with direct server return a backend receives packets \
                 on the VIP's port): write only \"{address}\""
            ),
            Role::Node => format!("VRRP has no port: write only \"{address}\""),
        };
    }
    if text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        let parts: Vec<&str> = text.split('.').collect();
        let why = if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
            "it must be four numbers separated by dots, like 10.0.0.1"
        } else if parts
            .iter()
            .any(|p| p.len() > 3 || p.parse::<u16>().unwrap_or(0) > 255)
        {
            "each of the four numbers must be from 0 to 255"
        } else {
            "write the numbers without leading zeros (some tools read them as octal)"
        };
        return format!("`{text}` is not an IPv4 address: {why}");
    }
    if text.contains(':') && !node {
        return format!(
            "`{text}` is not an IPv6 address (groups of up to four hex digits separated by \
             colons, `::` once for a run of zeros, like 2001:db8::1)"
        );
    }
    if text.chars().any(|c| c.is_alphabetic()) {
        return format!(
            "`{text}` is not an IPv4 address; host names are not resolved, write the address"
        );
    }
    format!("`{text}` is not an IPv4 address (four numbers from 0 to 255 separated by dots)")
}

fn port(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err("port 0 is not a usable port; ports run from 1 to 65535".to_owned()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!(
            "port {n} is out of range; ports run from 1 to 65535"
        )),
    }
}

fn protocol(text: &str) -> Result<Protocol, String> {
    const ACCEPTED: &str = "accepted values: \"tcp\", \"udp\"";
    match text {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ if matches!(text.to_ascii_lowercase().as_str(), "tcp" | "udp") => Err(format!(
            "unknown protocol \"{text}\"; {ACCEPTED} (lower case)"
        )),
        _ => Err(format!("unknown protocol \"{text}\"; {ACCEPTED}")),
    }
}

fn forwarding_mode(text: &str) -> Result<ForwardingMode, String> {
    match text {
        "dsr-l2" => Ok(ForwardingMode::DsrL2),
        _ => Err(format!(
            "unknown forwarding mode \"{text}\"; the only mode today is \"dsr-l2\" (direct \
             server return, backends on the same L2 network)"
        )),
    }
}

fn xdp_mode(text: &str) -> Result<XdpModeSetting, String> {
    match text {
        "driver" => return Ok(XdpModeSetting::Driver),
        "generic" => return Ok(XdpModeSetting::Generic),
        "auto" => return Ok(XdpModeSetting::Auto),
        _ => {}
    }
    // The names other tools use for the same modes.
    let hint = match text.to_ascii_lowercase().as_str() {
        "driver" | "generic" | "auto" => " (lower case)",
        "native" | "drv" | "xdpdrv" => "; native XDP is called \"driver\" here",
        "skb" | "xdpgeneric" => "; SKB mode is called \"generic\" here",
        "offload" | "hw" | "xdpoffload" => "; hardware offload is not supported",
        _ => "",
    };
    Err(format!(
        "unknown xdp_mode \"{text}\"; accepted values: \"driver\", \"generic\", \"auto\"{hint}"
    ))
}

/// Checks a weight given at run time (API, CLI) with the config's rule and words.
pub fn check_weight(weight: u32) -> Result<u32, String> {
    self::weight(i64::from(weight))
}

fn weight(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ if n < 0 => Err(format!(
            "weight {n} is negative; weights run from 0 (no new connections) to {MAX_WEIGHT}"
        )),
        _ => Err(format!(
            "weight {n} is too large; weights run from 0 (no new connections) to {MAX_WEIGHT}"
        )),
    }
}

fn table_size(n: i64) -> Result<u32, String> {
    // Range first: primality of a huge number would take long to test.
    let m = match u32::try_from(n) {
        Ok(m) if m <= MAX_TABLE_SIZE => m,
        _ if n < 0 => return Err(format!("table_size {n} is negative; it must be a prime")),
        _ => {
            return Err(format!(
                "table_size {n} is too large; the largest is {MAX_TABLE_SIZE} (the largest \
                 prime below 2^24)"
            ));
        }
    };
    if is_prime(m) {
        return Ok(m);
    }
    let nearest = match (prev_prime(m), next_prime(m)) {
        (Some(below), Some(above)) => format!("the nearest primes are {below} and {above}"),
        (None, Some(above)) => format!("the nearest prime is {above}"),
        (Some(below), None) => format!("the nearest prime is {below}"),
        (None, None) => unreachable!("2 is prime and within range"),
    };
    Err(format!(
        "table_size {m} is not a prime number, which Maglev needs; {nearest}"
    ))
}

use crate::maglev::is_prime;

/// Largest prime below `n`.
fn prev_prime(n: u32) -> Option<u32> {
    (2..n).rev().find(|&k| is_prime(k))
}

/// Smallest prime at or above `n`, up to [`MAX_TABLE_SIZE`].
fn next_prime(n: u32) -> Option<u32> {
    (n..=MAX_TABLE_SIZE).find(|&k| is_prime(k))
}

fn flow_entries(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(v) if (MIN_FLOW_ENTRIES..=MAX_FLOW_ENTRIES).contains(&v) => Ok(v),
        _ => Err(format!(
            "entries {n} is out of range; from {MIN_FLOW_ENTRIES} to {MAX_FLOW_ENTRIES} (about \
             100 bytes of kernel memory each)"
        )),
    }
}

fn flow_duration(text: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_FLOW_DURATION {
        return Err(format!("{text} is too long; at most 1440m (24 hours)"));
    }
    Ok(d)
}

fn ring_entries(vips: &[Vip]) -> u64 {
    vips.iter().map(|v| 2 * u64::from(v.table_size)).sum()
}

impl Config {
    /// Ring entries the data path needs for these services: two copies of every table. At most
    /// [`MAX_RING_ENTRIES`] in a validated config.
    pub fn ring_entries_needed(&self) -> u32 {
        u32::try_from(ring_entries(&self.vips)).expect("validated against MAX_RING_ENTRIES")
    }
}

fn interface_name(name: &str) -> Result<String, String> {
    // The rules of the kernel's dev_valid_name().
    if name.is_empty() {
        return Err(
            "the interface name is empty; write the interface to attach to, like \"eth0\""
                .to_owned(),
        );
    }
    if name.len() > MAX_INTERFACE_NAME_LEN {
        return Err(format!(
            "interface name `{name}` is {} bytes long; Linux allows at most {MAX_INTERFACE_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    if let Some((base, _)) = name.split_once(':') {
        return Err(format!(
            "`{name}` is an address label, not an interface; XDP attaches to the interface \
             itself (\"{base}\")"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|&c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name `{}` contains {}, which Linux does not allow in interface names",
            name.escape_debug(),
            match c {
                '/' => "'/'".to_owned(),
                ' ' => "a space".to_owned(),
                c => format!("the character {:?}", c),
            }
        ));
    }
    Ok(name.to_owned())
}

fn socket_path(path: &str) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err(format!(
            "the socket path is empty; leave `socket` out to use {DEFAULT_API_SOCKET}"
        ));
    }
    if !path.starts_with('/') {
        return Err(format!(
            "`{path}` is a relative path; write an absolute one like \"{DEFAULT_API_SOCKET}\" \
             (the agent's working directory is not fixed)"
        ));
    }
    if path.ends_with('/') {
        return Err(format!(
            "`{path}` names a directory; add the socket's file name"
        ));
    }
    if path.len() > MAX_SOCKET_PATH_LEN {
        return Err(format!(
            "the socket path is {} bytes long; a Unix socket path can have at most \
             {MAX_SOCKET_PATH_LEN}",
            path.len()
        ));
    }
    Ok(PathBuf::from(path))
}

fn listen_address(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| {
        format!("`{text}` is not ADDRESS:PORT, like \"127.0.0.1:9180\" or \"[::1]:9180\"")
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "port 0 in `{text}` would listen on a random port; pick one, like 9180"
        ));
    }
    Ok(addr)
}

/// An absolute path to a file; `key` names the setting in messages.
fn absolute_file(path: &str, key: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') || path.ends_with('/') {
        return Err(format!(
            "`{path}` is not an absolute path to a file; write one like \"/etc/xdplb/{key}\" \
             (the agent's working directory is not fixed)"
        ));
    }
    Ok(PathBuf::from(path))
}

fn all_down(text: &str) -> Result<AllDown, String> {
    match text {
        "keep-last" => Ok(AllDown::KeepLast),
        "drop" => Ok(AllDown::Drop),
        _ => Err(format!(
            "unknown all_down \"{text}\"; accepted values: \"keep-last\" (keep forwarding to the \
             last healthy set), \"drop\" (drop and count)"
        )),
    }
}

fn vip_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err(
            "the VIP name is empty; leave `name` out to use the default \"address:port/protocol\""
                .to_owned(),
        );
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "VIP name \"{}\" contains whitespace; the CLI takes a VIP name as one word",
            name.escape_debug()
        ));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/xdplb/xdplb.toml";

    fn ok(text: &str) -> Loaded {
        match parse(text, Path::new(FILE)) {
            Ok(loaded) => loaded,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text, Path::new(FILE)) {
            Ok(loaded) => panic!("expected errors, got {loaded:#?}"),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(e) => panic!("expected Invalid, got {e:?}"),
        }
    }

    /// The problems as `PATH: MESSAGE`, for readable assertions.
    fn errors(text: &str) -> Vec<String> {
        problems(text)
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    fn warnings(text: &str) -> Vec<String> {
        ok(text)
            .warnings
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    /// Asserts that exactly one problem exists and that it starts with `path: ` and contains
    /// every piece of `wanted`.
    #[track_caller]
    fn assert_one(text: &str, path: &str, wanted: &[&str]) {
        let errors = errors(text);
        assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
        assert_contains(&errors[0], path, wanted);
    }

    #[track_caller]
    fn assert_contains(line: &str, path: &str, wanted: &[&str]) {
        assert!(
            line.starts_with(&format!("{path}: ")),
            "wrong path in {line:?}, wanted {path}"
        );
        for w in wanted {
            assert!(line.contains(w), "{line:?} does not contain {w:?}");
        }
    }

    const DATAPLANE: &str = "[dataplane]\ninterface = \"eth0\"\n";

    /// A config with one VIP whose text is `vip` (keys after `[[vip]]`), then `rest`.
    fn with_vip(vip: &str, rest: &str) -> String {
        format!("{DATAPLANE}[[vip]]\n{vip}\n{rest}")
    }

    fn with_backend(backend: &str) -> String {
        with_vip(
            "address = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"",
            &format!("[[vip.backend]]\n{backend}\n"),
        )
    }

    #[test]
    fn the_documented_example_parses_with_defaults() {
        let loaded = ok(r#"
[dataplane]
interface = "eth0"
mode = "dsr-l2"          # forwarding mode; only "dsr-l2" exists today
xdp_mode = "auto"        # driver | generic | auto

[api]                    # optional section
socket = "/run/xdplb/xdplb.sock"

[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
table_size = 65537

[[vip.backend]]
address = "10.0.0.11"
weight = 1

[[vip]]
address = "10.0.0.100"
port = 53
protocol = "udp"

[[vip.backend]]
address = "10.0.0.21"
"#);
        assert_eq!(loaded.warnings, []);
        let config = loaded.config;
        assert_eq!(
            config,
            Config {
                dataplane: Dataplane {
                    interface: "eth0".into(),
                    mode: ForwardingMode::DsrL2,
                    xdp_mode: XdpModeSetting::Auto,
                },
                api: Api::default(),
                flows: Flows::default(),
                vips: vec![
                    Vip {
                        name: "web".into(),
                        address: Ipv4Addr::new(10, 0, 0, 100).into(),
                        port: 80,
                        protocol: Protocol::Tcp,
                        table_size: 65537,
                        all_down: AllDown::KeepLast,
                        health: HealthCheck::default_for(Protocol::Tcp),
                        backends: vec![Backend {
                            address: Ipv4Addr::new(10, 0, 0, 11).into(),
                            weight: 1,
                            backup: false,
                            health: HealthCheck::default_for(Protocol::Tcp),
                        }],
                    },
                    Vip {
                        name: "10.0.0.100:53/udp".into(),
                        address: Ipv4Addr::new(10, 0, 0, 100).into(),
                        port: 53,
                        protocol: Protocol::Udp,
                        table_size: DEFAULT_TABLE_SIZE,
                        all_down: AllDown::KeepLast,
                        health: HealthCheck::default_for(Protocol::Udp),
                        backends: vec![Backend {
                            address: Ipv4Addr::new(10, 0, 0, 21).into(),
                            weight: DEFAULT_WEIGHT,
                            backup: false,
                            health: HealthCheck::default_for(Protocol::Udp),
                        }],
                    },
                ],
                ha: None,
            }
        );
        assert_eq!(
            config.vips[1].key(),
            (Ipv4Addr::new(10, 0, 0, 100).into(), 53, Protocol::Udp)
        );
    }

    #[test]
    fn minimal_config_takes_every_default() {
        let config = ok(DATAPLANE).config;
        assert_eq!(config.dataplane.mode, ForwardingMode::DsrL2);
        assert_eq!(config.dataplane.xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.api.socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(config.vips, []);
    }

    #[test]
    fn effective_config_serialises_with_file_spellings() {
        let config = ok(&with_backend("address = \"10.0.0.11\"")).config;
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["dataplane"]["mode"], "dsr-l2");
        assert_eq!(json["dataplane"]["xdp_mode"], "auto");
        assert_eq!(json["api"]["socket"], DEFAULT_API_SOCKET);
        assert_eq!(json["vips"][0]["protocol"], "tcp");
        assert_eq!(json["vips"][0]["address"], "10.0.0.100");
        assert_eq!(json["vips"][0]["backends"][0]["weight"], 1);
    }

    #[test]
    fn protocol_numbers_and_names() {
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(Protocol::Udp.number(), 17);
        assert_eq!(Protocol::Tcp.to_string(), "tcp");
        assert_eq!(Protocol::Udp.to_string(), "udp");
        assert_eq!(XdpModeSetting::Generic.to_string(), "generic");
        assert_eq!(ForwardingMode::DsrL2.to_string(), "dsr-l2");
    }

    #[test]
    fn unknown_key_is_named_with_a_suggestion_and_the_allowed_keys() {
        assert_one(
            &with_backend("adress = \"10.0.0.11\""),
            "vip[0].backend[0].adress",
            &[
                "unknown key `adress`",
                "did you mean `address`?",
                "`address`, `weight`",
            ],
        );
        assert_one(
            "[dataplane]\ninterface = \"eth0\"\nxdpmode = \"auto\"\n",
            "dataplane.xdpmode",
            &["unknown key `xdpmode`", "did you mean `xdp_mode`?"],
        );
    }

    #[test]
    fn unknown_section_is_named() {
        let text = format!("{DATAPLANE}[health]\ninterval = 5\n");
        assert_one(
            &text,
            "health",
            &["unknown key `health`", "`dataplane`, `api`, `flows`, `vip`"],
        );
        assert!(!errors(&text)[0].contains("did you mean"));
    }

    #[test]
    fn missing_required_keys_are_all_reported() {
        let text = "[dataplane]\nmode = \"dsr-l2\"\n\
                    [[vip]]\nname = \"x\"\n\
                    [[vip.backend]]\nweight = 2\n";
        let errors = errors(text);
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert_contains(&errors[0], "dataplane", &["missing `interface`"]);
        assert_contains(
            &errors[1],
            "vip[0]",
            &["VIP without `address`, `port`, `protocol`"],
        );
        assert_contains(
            &errors[2],
            "vip[0].backend[0]",
            &["backend without `address`"],
        );
    }

    #[test]
    fn missing_dataplane_section() {
        assert_one("", "dataplane", &["missing section `[dataplane]`"]);
    }

    #[test]
    fn vip_address_must_be_an_address() {
        let vip = |address: &str| {
            with_vip(
                &format!("address = \"{address}\"\nport = 80\nprotocol = \"tcp\""),
                "",
            )
        };
        let path = "vip[0].address";
        assert_one(
            &vip("10.0.0.300"),
            path,
            &["`10.0.0.300` is not an IPv4 address", "0 to 255"],
        );
        assert_one(&vip("10.0.0"), path, &["four numbers"]);
        assert_one(&vip("010.0.0.1"), path, &["leading zeros"]);
        assert_one(
            &vip("web.example.com"),
            path,
            &["not an IPv4 address", "host names"],
        );
        assert_one(
            &vip("[2001:db8::1]"),
            path,
            &["without brackets: \"2001:db8::1\""],
        );
        assert_one(
            &vip("[2001:db8::1]:80"),
            path,
            &["`port`", "\"2001:db8::1\""],
        );
        assert_one(
            &vip("2001:db8::1/128"),
            path,
            &["without a prefix length: \"2001:db8::1\""],
        );
        assert_one(&vip("2001:db8::g"), path, &["not an IPv6 address"]);
        assert_one(
            &vip("10.0.0.1/32"),
            path,
            &["without a prefix length: \"10.0.0.1\""],
        );
        assert_one(&vip("10.0.0.1:80"), path, &["`port`"]);
        assert_one(&vip(" 10.0.0.1"), path, &["spaces"]);
        assert_one(&vip(""), path, &["empty"]);
    }

    #[test]
    fn backend_address_must_be_an_address() {
        let path = "vip[0].backend[0].address";
        assert_one(
            &with_backend("address = \"10.0.0.256\""),
            path,
            &["not an IPv4 address"],
        );
        assert_one(
            &with_backend("address = \"2001:db8::11\""),
            path,
            &["2001:db8::11 is IPv6 but vip `10.0.0.100:80/tcp` (10.0.0.100, line 4) is IPv4"],
        );
        assert_one(
            &with_backend("address = \"10.0.0.11:8080\""),
            path,
            &["backends have no port"],
        );
        assert_one(
            &with_backend("address = \"db1\""),
            path,
            &["host names are not resolved"],
        );
    }

    #[test]
    fn special_addresses_are_rejected() {
        for (address, what) in [
            ("0.0.0.0", "0.0.0.0/8"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.5", "multicast"),
            ("127.0.0.1", "loopback"),
        ] {
            assert_one(
                &with_vip(
                    &format!("address = \"{address}\"\nport = 80\nprotocol = \"tcp\""),
                    "",
                ),
                "vip[0].address",
                &[what, "a VIP must be a unicast address"],
            );
            assert_one(
                &with_backend(&format!("address = \"{address}\"")),
                "vip[0].backend[0].address",
                &[what, "a backend must be the unicast address"],
            );
        }
    }

    #[test]
    fn ipv6_vips_take_ipv6_backends_and_are_named_in_brackets() {
        let loaded = ok(&with_vip(
            "address = \"2001:db8::100\"\nport = 80\nprotocol = \"tcp\"",
            "[[vip.backend]]\naddress = \"2001:db8::11\"\n[[vip.backend]]\naddress = \"fd00::12\"\n",
        ));
        let v = &loaded.config.vips[0];
        assert_eq!(v.name, "[2001:db8::100]:80/tcp");
        assert_eq!(v.socket().to_string(), "[2001:db8::100]:80");
        assert!(matches!(
            v.map_key(),
            crate::dataplane::ServiceKey::V6(k) if k.addr == v.address_octets_v6()
        ));
        let backends: Vec<String> = v.backends.iter().map(|b| b.address.to_string()).collect();
        assert_eq!(backends, ["2001:db8::11", "fd00::12"]);

        // An IPv4 backend under an IPv6 VIP, named by its VIP's name.
        assert_one(
            &with_vip(
                "name = \"web6\"\naddress = \"2001:db8::100\"\nport = 80\nprotocol = \"tcp\"",
                "[[vip.backend]]\naddress = \"10.0.0.11\"\n",
            ),
            "vip[0].backend[0].address",
            &[
                "backend 10.0.0.11 is IPv4 but vip `web6` (2001:db8::100, line 5) is IPv6",
                "direct server return",
            ],
        );
        // The same VIP address twice, and an IPv6 VIP's own address as a backend.
        let twice = format!(
            "{DATAPLANE}[[vip]]\naddress = \"2001:db8::100\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip]]\naddress = \"2001:db8:0::100\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert!(
            errors(&twice)
                .iter()
                .any(|e| e.contains("duplicate VIP [2001:db8::100]:80/tcp")),
            "{:?}",
            errors(&twice)
        );
        assert_one(
            &with_vip(
                "address = \"2001:db8::100\"\nport = 80\nprotocol = \"tcp\"",
                "[[vip.backend]]\naddress = \"2001:db8::100\"\n",
            ),
            "vip[0].backend[0].address",
            &["the VIP's own address"],
        );
    }

    #[test]
    fn special_ipv6_addresses_are_rejected_with_the_reason() {
        for (address, what) in [
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
        ] {
            assert_one(
                &with_vip(
                    &format!("address = \"{address}\"\nport = 80\nprotocol = \"tcp\""),
                    "",
                ),
                "vip[0].address",
                &[what],
            );
        }
        assert_one(
            &with_vip("address = \"fe80::1\"\nport = 80\nprotocol = \"tcp\"", ""),
            "vip[0].address",
            &["link-local", "clients on other networks cannot reach it"],
        );
        assert_one(
            &with_vip(
                "address = \"2001:db8::100\"\nport = 80\nprotocol = \"tcp\"",
                "[[vip.backend]]\naddress = \"fe80::11\"\n",
            ),
            "vip[0].backend[0].address",
            &["link-local", "zone", "global or unique-local"],
        );
        // The run-time checks say the same.
        assert!(
            backend_address("fe80::11")
                .unwrap_err()
                .contains("link-local")
        );
        assert_eq!(
            backend_address("[2001:db8::11]").unwrap(),
            "2001:db8::11".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn port_must_be_1_to_65535() {
        let vip = |port: &str| {
            with_vip(
                &format!("address = \"10.0.0.1\"\nport = {port}\nprotocol = \"udp\""),
                "",
            )
        };
        assert_one(
            &vip("0"),
            "vip[0].port",
            &["port 0 is not a usable port", "1 to 65535"],
        );
        assert_one(
            &vip("65536"),
            "vip[0].port",
            &["port 65536 is out of range"],
        );
        assert_one(&vip("-80"), "vip[0].port", &["port -80 is out of range"]);
        ok(&vip("65535"));
    }

    #[test]
    fn wrong_value_type_names_the_field_and_the_line() {
        let text = with_vip(
            "address = \"10.0.0.1\"\nport = \"80\"\nprotocol = \"udp\"",
            "",
        );
        let problems = problems(&text);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].path, "vip[0].port");
        assert_eq!(
            problems[0].message,
            "expected a port number without quotes, like 80, found string \"80\""
        );
        assert_eq!(problems[0].location, Some(Location { line: 5, column: 8 }));
    }

    #[test]
    fn single_brackets_for_vip_are_explained() {
        let text = format!("{DATAPLANE}[vip]\naddress = \"10.0.0.1\"\n");
        assert_one(
            &text,
            "vip",
            &[
                "expected `[[vip]]` sections (double brackets",
                "found a table",
            ],
        );
    }

    #[test]
    fn syntax_errors_give_line_and_column() {
        let text = "[dataplane]\ninterface = eth0\n";
        let problems = problems(text);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!(problems[0].path, "");
        assert!(
            problems[0].message.starts_with("invalid TOML: "),
            "{problems:?}"
        );
        assert_eq!(
            problems[0].location,
            Some(Location {
                line: 2,
                column: 13
            })
        );
    }

    /// `n` TCP services on ports 1..=n of one address, each with `backends` backends and the
    /// given table size.
    fn many(n: usize, backends: usize, table_size: u32) -> String {
        let mut t = DATAPLANE.to_string();
        for i in 0..n {
            t.push_str(&format!(
                "[[vip]]\naddress = \"10.0.0.100\"\nport = {}\nprotocol = \"tcp\"\n\
                 table_size = {table_size}\n",
                i + 1
            ));
            for b in 0..backends {
                t.push_str(&format!(
                    "[[vip.backend]]\naddress = \"10.1.{}.{}\"\n",
                    b / 250,
                    b % 250 + 1
                ));
            }
        }
        t
    }

    #[test]
    fn capacities_of_the_data_path_are_checked() {
        // 8 services at the largest table size fit; 9 do not (2 copies each, 2^28 entries).
        let loaded = ok(&many(8, 1, MAX_TABLE_SIZE));
        assert_eq!(
            u64::from(loaded.config.ring_entries_needed()),
            16 * u64::from(MAX_TABLE_SIZE)
        );
        assert_one(
            &many(9, 1, MAX_TABLE_SIZE),
            "vip",
            &["need 301989834 entries", "more than the 268435456"],
        );
        assert_one(
            &many(MAX_VIPS as usize + 1, 1, 13),
            "vip",
            &["4097 services; one agent serves at most 4096"],
        );
        assert_one(
            &many(2, 32768, 65537),
            "vip",
            &["65536 backends over all services", "at most 65535"],
        );
    }

    #[test]
    fn backend_before_its_vip_is_explained() {
        let text =
            format!("{DATAPLANE}[[vip.backend]]\naddress = \"10.0.0.1\"\n[[vip]]\nport = 1\n");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].contains("after the `[[vip]]` it belongs to"),
            "{errors:?}"
        );
    }

    #[test]
    fn protocol_lists_accepted_values() {
        let vip = |p: &str| {
            with_vip(
                &format!("address = \"10.0.0.1\"\nport = 80\nprotocol = \"{p}\""),
                "",
            )
        };
        assert_one(
            &vip("sctp"),
            "vip[0].protocol",
            &["unknown protocol \"sctp\"", "\"tcp\", \"udp\""],
        );
        assert_one(&vip("TCP"), "vip[0].protocol", &["lower case"]);
    }

    #[test]
    fn duplicate_vip_names_both_places() {
        let vip = "[[vip]]\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n";
        let text = format!(
            "{DATAPLANE}{vip}[[vip]]\nname = \"other\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n"
        );
        assert_one(
            &text,
            "vip[1]",
            &["duplicate VIP 10.0.0.1:80/tcp", "vip[0] (line 3)"],
        );
        // Same address and port, other protocol: a different service.
        ok(&format!("{DATAPLANE}{vip}{}", vip.replace("tcp", "udp")));
    }

    #[test]
    fn duplicate_vip_name() {
        let text = format!(
            "{DATAPLANE}[[vip]]\nname = \"web\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip]]\nname = \"web\"\naddress = \"10.0.0.1\"\nport = 443\nprotocol = \"tcp\"\n"
        );
        assert_one(
            &text,
            "vip[1].name",
            &["VIP name `web` is already used by vip[0] (line 3)"],
        );
        // An explicit name equal to another VIP's default name.
        let text = format!(
            "{DATAPLANE}[[vip]]\nname = \"10.0.0.1:443/tcp\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip]]\naddress = \"10.0.0.1\"\nport = 443\nprotocol = \"tcp\"\n"
        );
        assert_one(
            &text,
            "vip[1]",
            &["default name `10.0.0.1:443/tcp` is already the name of vip[0]"],
        );
    }

    #[test]
    fn vip_name_must_be_one_word() {
        let vip = |name: &str| {
            with_vip(
                &format!(
                    "name = \"{name}\"\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\""
                ),
                "",
            )
        };
        assert_one(&vip(""), "vip[0].name", &["empty"]);
        assert_one(&vip("web server"), "vip[0].name", &["whitespace"]);
    }

    #[test]
    fn duplicate_backend_and_backend_on_the_vip_address() {
        let text = with_vip(
            "address = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"",
            "[[vip.backend]]\naddress = \"10.0.0.11\"\n\
             [[vip.backend]]\naddress = \"10.0.0.100\"\n\
             [[vip.backend]]\naddress = \"10.0.0.11\"\nweight = 3\n",
        );
        let errors = errors(&text);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert_contains(
            &errors[0],
            "vip[0].backend[1].address",
            &["backend 10.0.0.100 is the VIP's own address (line 4)"],
        );
        assert_contains(
            &errors[1],
            "vip[0].backend[2].address",
            &[
                "backend 10.0.0.11 is listed twice",
                "vip[0].backend[0] (line 7)",
            ],
        );
        // The same backend behind two VIPs is normal.
        ok(&format!(
            "{DATAPLANE}[[vip]]\naddress = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.0.0.11\"\n\
             [[vip]]\naddress = \"10.0.0.1\"\nport = 443\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.0.0.11\"\n"
        ));
    }

    #[test]
    fn weight_range() {
        let path = "vip[0].backend[0].weight";
        let backend = |w: &str| with_backend(&format!("address = \"10.0.0.11\"\nweight = {w}"));
        assert_one(
            &backend("-1"),
            path,
            &["weight -1 is negative", "0 (no new connections) to 65535"],
        );
        assert_one(&backend("65536"), path, &["weight 65536 is too large"]);
        assert_one(
            &backend("1.5"),
            path,
            &["expected a whole number", "found floating point"],
        );
        assert_eq!(
            ok(&backend("65535")).config.vips[0].backends[0].weight,
            MAX_WEIGHT
        );
    }

    fn vip_with_table(table_size: &str, backends: usize) -> String {
        let backends: String = (0..backends)
            .map(|i| format!("[[vip.backend]]\naddress = \"10.0.1.{}\"\n", i + 1))
            .collect();
        with_vip(
            &format!(
                "address = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"\ntable_size = {table_size}"
            ),
            &backends,
        )
    }

    #[test]
    fn table_size_must_be_prime_and_in_range() {
        let path = "vip[0].table_size";
        assert_one(
            &vip_with_table("65536", 1),
            path,
            &[
                "table_size 65536 is not a prime number",
                "nearest primes are 65521 and 65537",
            ],
        );
        assert_one(&vip_with_table("1", 1), path, &["nearest prime is 2"]);
        assert_one(&vip_with_table("0", 1), path, &["not a prime"]);
        assert_one(&vip_with_table("-7", 1), path, &["negative"]);
        assert_one(
            &vip_with_table("16777259", 1),
            path,
            &["too large; the largest is 16777213"],
        );
        assert_one(&vip_with_table("99999999999", 1), path, &["too large"]);
        ok(&vip_with_table("16777213", 1));
    }

    #[test]
    fn table_size_must_fit_the_backends_with_weight() {
        assert_one(
            &vip_with_table("3", 5),
            "vip[0].table_size",
            &[
                "table_size 3 is smaller than the 5 backends with weight above 0",
                "such as 503",
            ],
        );
        // Backends at weight 0 take no table entries.
        let text = vip_with_table("3", 5)
            .replace("\"10.0.1.5\"\n", "\"10.0.1.5\"\nweight = 0\n")
            .replace("\"10.0.1.4\"\n", "\"10.0.1.4\"\nweight = 0\n");
        assert_eq!(ok(&text).config.vips[0].table_size, 3);
    }

    #[test]
    fn interface_name_rules() {
        let iface = |name: &str| format!("[dataplane]\ninterface = \"{name}\"\n");
        let path = "dataplane.interface";
        assert_one(&iface(""), path, &["empty"]);
        assert_one(
            &iface("a-very-long-name0"),
            path,
            &["17 bytes long", "at most 15"],
        );
        assert_one(&iface("eth/0"), path, &["'/'"]);
        assert_one(&iface("eth 0"), path, &["a space"]);
        assert_one(&iface("eth\\t0"), path, &["'\\t'"]);
        assert_one(&iface("."), path, &["not a valid interface name"]);
        assert_one(&iface(".."), path, &["not a valid interface name"]);
        assert_one(&iface("eth0:1"), path, &["address label", "(\"eth0\")"]);
        assert_eq!(
            ok(&iface("enp1s0f0np0.100")).config.dataplane.interface,
            "enp1s0f0np0.100"
        );
    }

    #[test]
    fn modes_list_accepted_values() {
        let dp = |key: &str, value: &str| format!("{DATAPLANE}{key} = \"{value}\"\n");
        assert_one(
            &dp("mode", "nat"),
            "dataplane.mode",
            &["\"nat\"", "only mode today is \"dsr-l2\""],
        );
        let path = "dataplane.xdp_mode";
        assert_one(
            &dp("xdp_mode", "fast"),
            path,
            &["\"driver\", \"generic\", \"auto\""],
        );
        assert_one(&dp("xdp_mode", "native"), path, &["called \"driver\" here"]);
        assert_one(&dp("xdp_mode", "skb"), path, &["called \"generic\" here"]);
        assert_one(&dp("xdp_mode", "offload"), path, &["not supported"]);
        assert_one(&dp("xdp_mode", "Driver"), path, &["lower case"]);
        assert_eq!(
            ok(&dp("xdp_mode", "generic")).config.dataplane.xdp_mode,
            XdpModeSetting::Generic
        );
        assert_eq!(
            ok(&dp("xdp_mode", "driver")).config.dataplane.xdp_mode,
            XdpModeSetting::Driver
        );
    }

    #[test]
    fn api_socket_must_be_an_absolute_socket_path() {
        let api = |s: &str| format!("{DATAPLANE}[api]\nsocket = \"{s}\"\n");
        assert_one(&api("xdplb.sock"), "api.socket", &["relative path"]);
        assert_one(&api("/run/xdplb/"), "api.socket", &["directory"]);
        assert_one(&api(""), "api.socket", &["empty"]);
        assert_one(
            &api(&format!("/{}", "x".repeat(107))),
            "api.socket",
            &["at most 107"],
        );
        assert_eq!(
            ok(&api("/tmp/x.sock")).config.api.socket,
            Path::new("/tmp/x.sock")
        );
        ok(&format!("{DATAPLANE}[api]\n"));
    }

    #[test]
    fn warnings_do_not_stop_the_config() {
        assert_eq!(
            warnings(DATAPLANE),
            ["vip: no `[[vip]]` sections: the agent will run with no services"]
        );
        let no_backends = warnings(&with_vip(
            "address = \"10.0.0.1\"\nport = 80\nprotocol = \"tcp\"",
            "",
        ));
        assert_eq!(no_backends.len(), 1);
        assert_contains(
            &no_backends[0],
            "vip[0]",
            &["dropped until a backend is added"],
        );
        let all_zero = warnings(&with_backend("address = \"10.0.0.11\"\nweight = 0"));
        assert_eq!(all_zero.len(), 1);
        assert_contains(&all_zero[0], "vip[0]", &["all backends", "weight 0"]);
        let small = warnings(&vip_with_table("1009", 11));
        assert_eq!(small.len(), 1, "{small:#?}");
        assert_contains(
            &small[0],
            "vip[0].table_size",
            &["less than 100 entries per backend", "such as 1103"],
        );
        assert_eq!(warnings(&vip_with_table("1103", 11)), Vec::<String>::new());
    }

    #[test]
    fn all_problems_are_reported_in_file_order() {
        // [dataplane] last, so file order differs from the order of the checks.
        let text = "[[vip]]\n\
                    address = \"10.0.0.300\"\n\
                    port = 0\n\
                    protocol = \"sctp\"\n\
                    table_size = 1000\n\
                    [[vip.backend]]\n\
                    address = \"10.0.0.1\"\n\
                    weight = 70000\n\
                    [dataplane]\n\
                    interface = \"eth0:1\"\n\
                    xdp_mode = \"native\"\n";
        let problems = problems(text);
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "vip[0].address",
                "vip[0].port",
                "vip[0].protocol",
                "vip[0].table_size",
                "vip[0].backend[0].weight",
                "dataplane.interface",
                "dataplane.xdp_mode",
            ]
        );
        let lines: Vec<usize> = problems.iter().map(|p| p.location.unwrap().line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 8, 10, 11]);
    }

    #[test]
    fn error_display_is_file_line_column_path_message() {
        let err = parse(
            "[dataplane]\ninterface = \"eth0\"\n[[vip]]\naddress = \"10.0.0.1\"\nport = 0\n",
            Path::new(FILE),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/xdplb/xdplb.toml:3:1: vip[0]: VIP without `protocol` (\"tcp\" or \"udp\")\n\
             /etc/xdplb/xdplb.toml:5:8: vip[0].port: port 0 is not a usable port; ports run from 1 to 65535"
        );
        let err = parse("", Path::new(FILE)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/xdplb/xdplb.toml: dataplane: missing section `[dataplane]`, which names the \
             interface to attach to"
        );
    }

    #[test]
    fn load_reports_unreadable_files() {
        let missing = Path::new("/nonexistent/xdplb.toml");
        let err = load(missing).unwrap_err();
        assert!(matches!(&err, ConfigError::Read { file, .. } if file == missing));
        assert_eq!(
            err.to_string(),
            "/nonexistent/xdplb.toml: cannot read the config file: No such file or directory \
             (os error 2)"
        );
    }

    #[test]
    fn primes() {
        let below_100: Vec<u32> = (0..100).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            below_100,
            [
                2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79,
                83, 89, 97
            ]
        );
        assert!(is_prime(DEFAULT_TABLE_SIZE));
        assert!(is_prime(MAX_TABLE_SIZE));
        assert_eq!(next_prime(MAX_TABLE_SIZE + 1), None);
        assert_eq!(next_prime(1 << 24), None);
        assert!(((MAX_TABLE_SIZE + 1)..(1 << 24)).all(|n| !is_prime(n)));
        assert_eq!(prev_prime(2), None);
        assert_eq!(next_prime(65536), Some(65537));
        assert_eq!(prev_prime(65536), Some(65521));
    }

    #[test]
    fn example_configs_validate() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs"));
        let mut checked = 0;
        for entry in std::fs::read_dir(dir).expect("configs/ directory") {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = load(&path) {
                    panic!("{} does not validate:\n{e}", path.display());
                }
                checked += 1;
            }
        }
        assert!(checked > 0, "no *.toml in {}", dir.display());
    }

    #[test]
    fn flows_defaults_and_every_key() {
        let c = parse(DATAPLANE, Path::new("t.toml")).unwrap().config;
        assert_eq!(c.flows, Flows::default());
        assert_eq!(c.flows.entries, 1 << 20);
        let text = format!(
            "{DATAPLANE}[flows]\nentries = 4096\nentries_v6 = 2048\nudp_idle_timeout = \"0s\"\n\
             insert_rate_limit = 0\nremove_grace = \"2m\"\n"
        );
        let c = parse(&text, Path::new("t.toml")).unwrap().config;
        assert_eq!(
            c.flows,
            Flows {
                entries: 4096,
                entries_v6: 2048,
                udp_idle_timeout: std::time::Duration::ZERO,
                insert_rate_limit: 0,
                remove_grace: std::time::Duration::from_secs(120),
            }
        );
    }

    #[test]
    fn flows_values_out_of_range_are_named() {
        let flows = |body: &str| format!("{DATAPLANE}[flows]\n{body}\n");
        assert_one(
            &flows("entries = 10"),
            "flows.entries",
            &["entries 10 is out of range", "1024", "134217728"],
        );
        assert_one(
            &flows("entries_v6 = 1000"),
            "flows.entries_v6",
            &["entries 1000 is out of range", "1024"],
        );
        assert_one(
            &flows("insert_rate_limit = -1"),
            "flows.insert_rate_limit",
            &["out of range"],
        );
        assert_one(
            &flows("udp_idle_timeout = \"30\""),
            "flows.udp_idle_timeout",
            &["no unit"],
        );
        assert_one(
            &flows("remove_grace = \"2000m\""),
            "flows.remove_grace",
            &["too long", "1440m"],
        );
        assert_one(
            &flows("entries = \"4096\""),
            "flows.entries",
            &["whole number without quotes"],
        );
        assert_one(
            &flows("size = 4096"),
            "flows.size",
            &["unknown key", "`entries`"],
        );
    }
}
