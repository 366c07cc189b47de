//! `[ha]`: two load balancers share the VIP addresses with VRRPv3 (RFC 5798).
//!
//! Optional: without the section the agent runs no VRRP and leaves the VIP addresses alone. Only
//! the settings live here; what the agent does with them is `crate::ha`'s business.
//!
//! Checks beyond each key's own range:
//! - `interface` defaults to `[dataplane] interface`, and follows the same naming rules.
//! - `peers` and `source` are a node's own addresses: unicast IPv4, no peer twice, and none of
//!   them the address of a `[[vip]]` (the VIP addresses move to whichever node is master, a node's
//!   own address stays put).
//! - Each `track_vips` entry names a `[[vip]]` by its name or as `ADDRESS:PORT/PROTO` (resolved
//!   like the CLI does) and is stored as the VIP's name; an entry that names no VIP is an error.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Checker, Role, Vip, health::millis, interface_name, ipv4, parse_duration};

/// [`Ha::priority`] of a node that does not set one (RFC 5798's default for a backup).
pub const DEFAULT_HA_PRIORITY: u8 = 100;
/// The priority of the router that owns the virtual addresses (RFC 5798 section 5.2.4).
pub const OWNER_PRIORITY: u8 = 255;
/// Default [`Ha::advert_interval`] (RFC 5798's default).
pub const DEFAULT_ADVERT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest and longest [`Ha::advert_interval`]: VRRPv3 carries it as 12 bits of centiseconds.
pub const MIN_ADVERT_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_ADVERT_INTERVAL: Duration = Duration::from_millis(4095 * 10);
/// Longest [`Ha::preempt_delay`] (keepalived's limit too).
pub const MAX_PREEMPT_DELAY: Duration = Duration::from_secs(1000);
/// Default and largest [`Ha::garp_count`].
pub const DEFAULT_GARP_COUNT: u32 = 5;
pub const MAX_GARP_COUNT: u32 = 100;
/// Default and longest [`Ha::garp_interval`].
pub const DEFAULT_GARP_INTERVAL: Duration = Duration::from_millis(10);
pub const MAX_GARP_INTERVAL: Duration = Duration::from_secs(1);
/// Default and longest [`Ha::garp_repeat`].
pub const DEFAULT_GARP_REPEAT: Duration = Duration::from_secs(2);
pub const MAX_GARP_REPEAT: Duration = Duration::from_secs(60);
/// Largest [`Ha::track_penalty`]: a configured priority minus a penalty must stay a priority a
/// backup can have.
pub const MAX_TRACK_PENALTY: u8 = 254;
/// Default [`Ha::sync_port`].
pub const DEFAULT_SYNC_PORT: u16 = 5599;

/// A centisecond, the unit of the advertisement interval on the wire.
const CENTISECOND: Duration = Duration::from_millis(10);
/// How many VIP names an "unknown VIP" message lists.
const NAMES_SHOWN: usize = 8;

/// `[ha]`, validated, with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ha {
    /// Where VRRP adverts are sent and received and the VIP addresses are held. A valid Linux
    /// interface name; `[dataplane] interface` unless set.
    pub interface: String,
    /// Virtual router id, 1 to 255: the same on both nodes, unique among the VRRP routers on the
    /// interface's network.
    pub vrid: u8,
    /// 1 to 255; the higher wins mastership. 255 claims to own the addresses.
    pub priority: u8,
    /// From [`MIN_ADVERT_INTERVAL`] to [`MAX_ADVERT_INTERVAL`], a whole number of centiseconds.
    #[serde(rename = "advert_interval_ms", serialize_with = "millis")]
    pub advert_interval: Duration,
    /// Whether a higher-priority backup takes mastership from a lower-priority master.
    pub preempt: bool,
    /// After start-up, how long a higher-priority backup waits before preempting; at most
    /// [`MAX_PREEMPT_DELAY`].
    #[serde(rename = "preempt_delay_ms", serialize_with = "millis")]
    pub preempt_delay: Duration,
    /// Unicast peers, in file order, none twice; empty: adverts go to the VRRP multicast group
    /// 224.0.0.18.
    pub peers: Vec<Ipv4Addr>,
    /// The address adverts are sent from; `None`: the interface's primary IPv4 address.
    pub source: Option<Ipv4Addr>,
    /// Gratuitous ARPs per VIP address on becoming master, 1 to [`MAX_GARP_COUNT`].
    pub garp_count: u32,
    /// Gap between them, at most [`MAX_GARP_INTERVAL`].
    #[serde(rename = "garp_interval_ms", serialize_with = "millis")]
    pub garp_interval: Duration,
    /// The burst is sent again this long after becoming master; zero: no repeat. At most
    /// [`MAX_GARP_REPEAT`].
    #[serde(rename = "garp_repeat_ms", serialize_with = "millis")]
    pub garp_repeat: Duration,
    /// Answer for the VIPs with the VRRP virtual MAC 00:00:5e:00:01:VRID (on a macvlan) instead
    /// of the interface's MAC.
    pub virtual_mac: bool,
    /// The interface going down is a tracked failure.
    pub track_interface: bool,
    /// Names of the VIPs whose all-backends-down is a tracked failure; each is the `name` of a
    /// VIP of the same config, none twice, in file order.
    pub track_vips: Vec<String>,
    /// 0: a tracked failure makes the node give up mastership (fault). 1 to
    /// [`MAX_TRACK_PENALTY`]: the priority drops by this much per failing condition (floor 1).
    pub track_penalty: u8,
    /// UDP port of the table-digest side channel between the nodes; 0: off.
    pub sync_port: u16,
}

impl Ha {
    /// The settings of an `[ha]` section that sets only `interface` and `vrid`.
    pub fn with_defaults(interface: impl Into<String>, vrid: u8) -> Ha {
        Ha {
            interface: interface.into(),
            vrid,
            priority: DEFAULT_HA_PRIORITY,
            advert_interval: DEFAULT_ADVERT_INTERVAL,
            preempt: true,
            preempt_delay: Duration::ZERO,
            peers: Vec::new(),
            source: None,
            garp_count: DEFAULT_GARP_COUNT,
            garp_interval: DEFAULT_GARP_INTERVAL,
            garp_repeat: DEFAULT_GARP_REPEAT,
            virtual_mac: false,
            track_interface: true,
            track_vips: Vec::new(),
            track_penalty: 0,
            sync_port: DEFAULT_SYNC_PORT,
        }
    }

    /// The advertisement interval in centiseconds, as VRRPv3 carries it (12 bits; exact in a
    /// validated config).
    pub fn advert_interval_cs(&self) -> u16 {
        u16::try_from(self.advert_interval.as_millis() / 10).unwrap_or(u16::MAX)
    }

    /// Whether adverts go to the multicast group (no `peers`).
    pub fn multicast(&self) -> bool {
        self.peers.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHa {
    interface: Option<Spanned<String>>,
    vrid: Option<Spanned<i64>>,
    priority: Option<Spanned<i64>>,
    advert_interval: Option<Spanned<String>>,
    preempt: Option<Spanned<bool>>,
    preempt_delay: Option<Spanned<String>>,
    peers: Option<Spanned<Vec<Spanned<String>>>>,
    source: Option<Spanned<String>>,
    garp_count: Option<Spanned<i64>>,
    garp_interval: Option<Spanned<String>>,
    garp_repeat: Option<Spanned<String>>,
    virtual_mac: Option<Spanned<bool>>,
    track_interface: Option<Spanned<bool>>,
    track_vips: Option<Spanned<Vec<Spanned<String>>>>,
    track_penalty: Option<Spanned<i64>>,
    sync_port: Option<Spanned<i64>>,
}

fn vrid(n: i64) -> Result<u8, String> {
    match u8::try_from(n) {
        Ok(v) if v >= 1 => Ok(v),
        _ => Err(format!(
            "vrid {n} is out of range; from 1 to 255 (the virtual router id, the same on both \
             nodes)"
        )),
    }
}

fn priority(n: i64) -> Result<u8, String> {
    match u8::try_from(n) {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(format!(
            "priority {n} is out of range; from 1 to 255 (0 is reserved: a master sends it when \
             it gives up mastership)"
        )),
    }
}

fn advert_interval(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if !(MIN_ADVERT_INTERVAL..=MAX_ADVERT_INTERVAL).contains(&d) {
        return Err(format!(
            "advert_interval {text} is out of range; from 10ms to 40.95s (VRRPv3 carries it as \
             12 bits of centiseconds)"
        ));
    }
    if !d.as_nanos().is_multiple_of(CENTISECOND.as_nanos()) {
        let below = CENTISECOND * u32::try_from(d.as_nanos() / CENTISECOND.as_nanos()).unwrap_or(0);
        let above = below + CENTISECOND;
        return Err(format!(
            "advert_interval {text} is not a whole number of centiseconds (VRRPv3 carries it in \
             units of 10ms); use {below:?} or {above:?}"
        ));
    }
    Ok(d)
}

/// A duration of at most `max`, written `max_text` in messages; zero is allowed.
fn at_most(text: &str, key: &str, max: Duration, max_text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > max {
        return Err(format!("{key} {text} is too long; at most \"{max_text}\""));
    }
    Ok(d)
}

fn garp_count(n: i64) -> Result<u32, String> {
    match u32::try_from(n) {
        Ok(c) if (1..=MAX_GARP_COUNT).contains(&c) => Ok(c),
        _ => Err(format!(
            "garp_count {n} is out of range; from 1 to {MAX_GARP_COUNT} gratuitous ARPs per VIP \
             address"
        )),
    }
}

fn track_penalty(n: i64) -> Result<u8, String> {
    match u8::try_from(n) {
        Ok(p) if p <= MAX_TRACK_PENALTY => Ok(p),
        _ => Err(format!(
            "track_penalty {n} is out of range; from 0 (a tracked failure gives up mastership) to \
             {MAX_TRACK_PENALTY} (priority lowered by this much per failure)"
        )),
    }
}

fn sync_port(n: i64) -> Result<u16, String> {
    u16::try_from(n).map_err(|_| {
        format!("sync_port {n} is out of range; from 1 to 65535, or 0 for no table-digest channel")
    })
}

/// The VIP `text` names: by name first, then as `ADDRESS:PORT/PROTO` (the CLI's rule).
fn find_vip<'v>(vips: &'v [Option<Vip>], text: &str) -> Option<&'v Vip> {
    let valid = || vips.iter().flatten();
    if let Some(vip) = valid().find(|v| v.name == text) {
        return Some(vip);
    }
    let (address, protocol) = crate::api::parse_service(text).ok()?;
    valid().find(|v| v.key() == (address.ip(), address.port(), protocol))
}

/// The first valid VIP at `address`, with its index in the file.
fn vip_at(vips: &[Option<Vip>], address: Ipv4Addr) -> Option<(usize, &Vip)> {
    vips.iter().enumerate().find_map(|(i, v)| {
        v.as_ref()
            .filter(|v| v.address == IpAddr::V4(address))
            .map(|v| (i, v))
    })
}

impl Checker<'_> {
    /// `[ha]`: `Some(None)` without the section, `None` when it is invalid (reported).
    /// `dataplane_interface` is `[dataplane] interface` when valid; `vips` are the `[[vip]]`
    /// sections in file order, `None` where invalid.
    pub(super) fn ha(
        &mut self,
        raw: Option<Spanned<RawHa>>,
        dataplane_interface: Option<&str>,
        vips: &[Option<Vip>],
    ) -> Option<Option<Ha>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let span = raw.span();
        let raw = raw.into_inner();

        let interface = match raw.interface {
            Some(v) => self.value(v, "ha.interface", |s| interface_name(s)),
            // None: `[dataplane]` is invalid, which is reported there.
            None => dataplane_interface.map(str::to_owned),
        };
        let vrid = match raw.vrid {
            Some(v) => self.value(v, "ha.vrid", |n| vrid(*n)),
            None => {
                self.error(
                    "ha",
                    Some(span),
                    "missing `vrid`: the virtual router id, 1 to 255, the same on both nodes and \
                     used by no other VRRP router on the network",
                );
                None
            }
        };
        let priority_span = raw.priority.as_ref().map(Spanned::span);
        let priority = self.or_default(raw.priority, "ha.priority", DEFAULT_HA_PRIORITY, |n| {
            priority(*n)
        });
        if priority == Some(OWNER_PRIORITY) {
            self.warning(
                "ha.priority",
                priority_span,
                "priority 255 claims to own the addresses (RFC 5798): such a node takes them at \
                 once on start-up and always wins; only the node that owns the addresses should \
                 use 255, use 1 to 254 for a load balancer pair",
            );
        }
        let advert_interval = self.or_default(
            raw.advert_interval,
            "ha.advert_interval",
            DEFAULT_ADVERT_INTERVAL,
            |s| advert_interval(s),
        );
        let preempt = raw.preempt.map(Spanned::into_inner).unwrap_or(true);
        let preempt_delay_span = raw.preempt_delay.as_ref().map(Spanned::span);
        let preempt_delay =
            self.or_default(raw.preempt_delay, "ha.preempt_delay", Duration::ZERO, |s| {
                at_most(s, "preempt_delay", MAX_PREEMPT_DELAY, "1000s")
            });
        if !preempt && preempt_delay.is_some_and(|d| !d.is_zero()) {
            self.warning(
                "ha.preempt_delay",
                preempt_delay_span,
                "`preempt_delay` has no effect with `preempt = false`",
            );
        }
        let peers = self.peers(raw.peers, vips);
        let source = match raw.source {
            Some(v) => {
                let at = v.span();
                self.value(v, "ha.source", |s| ipv4(s, Role::Node))
                    .and_then(|a| self.own_address("ha.source", at.clone(), a, vips))
                    .map(|a| Some((a, at)))
            }
            None => Some(None),
        };
        if let (Some(Some((a, at))), Some(peers)) = (&source, &peers)
            && let Some(i) = peers.iter().position(|p| p == a)
        {
            self.warning(
                "ha.source",
                Some(at.clone()),
                format!(
                    "`source` {a} is also in `peers` (ha.peers[{i}]): list only the other nodes \
                     there, or this node sends its adverts to itself"
                ),
            );
        }
        let garp_count =
            self.or_default(raw.garp_count, "ha.garp_count", DEFAULT_GARP_COUNT, |n| {
                garp_count(*n)
            });
        let garp_interval = self.or_default(
            raw.garp_interval,
            "ha.garp_interval",
            DEFAULT_GARP_INTERVAL,
            |s| at_most(s, "garp_interval", MAX_GARP_INTERVAL, "1s"),
        );
        let garp_repeat = self.or_default(
            raw.garp_repeat,
            "ha.garp_repeat",
            DEFAULT_GARP_REPEAT,
            |s| at_most(s, "garp_repeat", MAX_GARP_REPEAT, "60s"),
        );
        let virtual_mac = raw.virtual_mac.map(Spanned::into_inner).unwrap_or(false);
        let track_interface = raw.track_interface.map(Spanned::into_inner).unwrap_or(true);
        let track_vips = self.track_vips(raw.track_vips, vips);
        let track_penalty = self.or_default(raw.track_penalty, "ha.track_penalty", 0, |n| {
            track_penalty(*n)
        });
        let sync_port = self.or_default(raw.sync_port, "ha.sync_port", DEFAULT_SYNC_PORT, |n| {
            sync_port(*n)
        });

        Some(Some(Ha {
            interface: interface?,
            vrid: vrid?,
            priority: priority?,
            advert_interval: advert_interval?,
            preempt,
            preempt_delay: preempt_delay?,
            peers: peers?,
            source: source?.map(|(a, _)| a),
            garp_count: garp_count?,
            garp_interval: garp_interval?,
            garp_repeat: garp_repeat?,
            virtual_mac,
            track_interface,
            track_vips: track_vips?,
            track_penalty: track_penalty?,
            sync_port: sync_port?,
        }))
    }

    /// A key's checked value, or `default` when the file leaves it out.
    fn or_default<R, T>(
        &mut self,
        raw: Option<Spanned<R>>,
        path: &str,
        default: T,
        check: impl FnOnce(&R) -> Result<T, String>,
    ) -> Option<T> {
        match raw {
            Some(v) => self.value(v, path, check),
            None => Some(default),
        }
    }

    /// Reports `address` (a node's own, at `path`) if it is a VIP's.
    fn own_address(
        &mut self,
        path: &str,
        at: Range<usize>,
        address: Ipv4Addr,
        vips: &[Option<Vip>],
    ) -> Option<Ipv4Addr> {
        let Some((i, vip)) = vip_at(vips, address) else {
            return Some(address);
        };
        self.error(
            path,
            Some(at),
            format!(
                "{address} is the address of vip[{i}] (`{}`): the VIP addresses move to whichever \
                 node is master, while a node's own address (`source`, `peers`) must stay where \
                 it is",
                vip.name
            ),
        );
        None
    }

    fn peers(
        &mut self,
        raw: Option<Spanned<Vec<Spanned<String>>>>,
        vips: &[Option<Vip>],
    ) -> Option<Vec<Ipv4Addr>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        let mut peers = Vec::new();
        let mut ok = true;
        for (i, v) in raw.into_inner().into_iter().enumerate() {
            let path = format!("ha.peers[{i}]");
            let at = v.span();
            let Some(a) = self
                .value(v, &path, |s| ipv4(s, Role::Node))
                .and_then(|a| self.own_address(&path, at.clone(), a, vips))
            else {
                ok = false;
                continue;
            };
            if let Some(first) = peers.iter().position(|p| *p == a) {
                self.error(
                    &path,
                    Some(at),
                    format!("peer {a} is listed twice: also at ha.peers[{first}]"),
                );
                ok = false;
                continue;
            }
            peers.push(a);
        }
        ok.then_some(peers)
    }

    fn track_vips(
        &mut self,
        raw: Option<Spanned<Vec<Spanned<String>>>>,
        vips: &[Option<Vip>],
    ) -> Option<Vec<String>> {
        let Some(raw) = raw else {
            return Some(Vec::new());
        };
        // With an invalid [[vip]], an entry that matches no valid one may name the invalid one:
        // that is not reported, the VIP's own problem is.
        let all_valid = vips.iter().all(Option::is_some);
        let mut names: Vec<String> = Vec::new();
        let mut first_at: HashMap<String, usize> = HashMap::new();
        let mut ok = true;
        for (i, v) in raw.into_inner().into_iter().enumerate() {
            let path = format!("ha.track_vips[{i}]");
            let at = v.span();
            let text = v.into_inner();
            match find_vip(vips, &text) {
                Some(vip) => match first_at.get(&vip.name) {
                    Some(first) => {
                        let also = if vip.name == text {
                            String::new()
                        } else {
                            format!(" (`{text}` is `{}`)", vip.name)
                        };
                        self.error(
                            &path,
                            Some(at),
                            format!(
                                "VIP `{}` is tracked twice{also}: also at ha.track_vips[{first}]",
                                vip.name
                            ),
                        );
                        ok = false;
                    }
                    None => {
                        first_at.insert(vip.name.clone(), i);
                        names.push(vip.name.clone());
                    }
                },
                None => {
                    ok = false;
                    if all_valid {
                        let message = unknown_vip(&text, vips);
                        self.error(&path, Some(at), message);
                    }
                }
            }
        }
        ok.then_some(names)
    }
}

fn unknown_vip(text: &str, vips: &[Option<Vip>]) -> String {
    let names: Vec<String> = vips
        .iter()
        .flatten()
        .take(NAMES_SHOWN)
        .map(|v| format!("`{}`", v.name))
        .collect();
    let known = match names.len() {
        0 => "this file has no `[[vip]]`".to_owned(),
        n if n < vips.len() => format!("the VIPs are {}, ...", names.join(", ")),
        _ => format!("the VIPs are {}", names.join(", ")),
    };
    format!(
        "no VIP is named `{text}` or is at that ADDRESS:PORT/PROTO; track_vips takes the `name` of \
         a `[[vip]]` or its ADDRESS:PORT/PROTO ({known})"
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::{ConfigError, Loaded, parse};
    use super::*;

    /// Two VIPs: `web` (10.0.0.100:80/tcp) and the unnamed 10.0.0.53:53/udp.
    const BASE: &str = "[dataplane]\ninterface = \"eth0\"\n\
                        [[vip]]\nname = \"web\"\naddress = \"10.0.0.100\"\nport = 80\n\
                        protocol = \"tcp\"\n[[vip.backend]]\naddress = \"10.0.0.11\"\n\
                        [[vip]]\naddress = \"10.0.0.53\"\nport = 53\nprotocol = \"udp\"\n\
                        [[vip.backend]]\naddress = \"10.0.0.21\"\n";

    fn with_ha(body: &str) -> String {
        format!("{BASE}[ha]\n{body}\n")
    }

    fn loaded(text: &str) -> Loaded {
        match parse(text, Path::new("ha.toml")) {
            Ok(l) => l,
            Err(e) => panic!("expected a valid config, got:\n{e}"),
        }
    }

    /// The `[ha]` of a config that must validate without warnings.
    #[track_caller]
    fn ha(body: &str) -> Ha {
        let l = loaded(&with_ha(body));
        assert_eq!(l.warnings, [], "unexpected warnings");
        l.config.ha.expect("[ha] is set")
    }

    fn lines(problems: &[super::super::Problem]) -> Vec<String> {
        problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    fn errors(text: &str) -> Vec<String> {
        match parse(text, Path::new("ha.toml")) {
            Ok(l) => panic!("expected errors, got {:#?}", l.config.ha),
            Err(ConfigError::Invalid { problems, .. }) => lines(&problems),
            Err(e) => panic!("expected Invalid, got {e:?}"),
        }
    }

    fn warnings(body: &str) -> Vec<String> {
        lines(&loaded(&with_ha(body)).warnings)
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

    /// Exactly one error for `[ha]` with `body`, at `path`, containing every piece of `wanted`.
    #[track_caller]
    fn assert_one(body: &str, path: &str, wanted: &[&str]) {
        let errors = errors(&with_ha(body));
        assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
        assert_contains(&errors[0], path, wanted);
    }

    #[test]
    fn no_section_no_ha() {
        assert_eq!(loaded(BASE).config.ha, None);
    }

    #[test]
    fn defaults() {
        let ha = ha("vrid = 51");
        assert_eq!(ha, Ha::with_defaults("eth0", 51));
        assert_eq!(ha.priority, 100);
        assert_eq!(ha.advert_interval, Duration::from_secs(1));
        assert_eq!(ha.advert_interval_cs(), 100);
        assert!(ha.preempt);
        assert_eq!(ha.preempt_delay, Duration::ZERO);
        assert!(ha.multicast());
        assert_eq!(ha.source, None);
        assert_eq!(ha.garp_count, 5);
        assert_eq!(ha.garp_interval, Duration::from_millis(10));
        assert_eq!(ha.garp_repeat, Duration::from_secs(2));
        assert!(!ha.virtual_mac);
        assert!(ha.track_interface);
        assert!(ha.track_vips.is_empty());
        assert_eq!(ha.track_penalty, 0);
        assert_eq!(ha.sync_port, 5599);
    }

    #[test]
    fn every_key() {
        let ha = ha(r#"
interface = "eth1"
vrid = 1
priority = 254
advert_interval = "40.95s"
preempt = true
preempt_delay = "1000s"
peers = ["10.0.0.3", "10.0.0.4"]
source = "10.0.0.2"
garp_count = 100
garp_interval = "1s"
garp_repeat = "0s"
virtual_mac = true
track_interface = false
track_vips = ["10.0.0.53:53/udp", "web"]
track_penalty = 254
sync_port = 0
"#);
        assert_eq!(
            ha,
            Ha {
                interface: "eth1".into(),
                vrid: 1,
                priority: 254,
                advert_interval: MAX_ADVERT_INTERVAL,
                preempt: true,
                preempt_delay: MAX_PREEMPT_DELAY,
                peers: vec![Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)],
                source: Some(Ipv4Addr::new(10, 0, 0, 2)),
                garp_count: MAX_GARP_COUNT,
                garp_interval: MAX_GARP_INTERVAL,
                garp_repeat: Duration::ZERO,
                virtual_mac: true,
                track_interface: false,
                track_vips: vec!["10.0.0.53:53/udp".into(), "web".into()],
                track_penalty: MAX_TRACK_PENALTY,
                sync_port: 0,
            }
        );
        assert_eq!(ha.advert_interval_cs(), 4095);
        assert!(!ha.multicast());
    }

    #[test]
    fn serialises_durations_as_millis() {
        let config = loaded(&with_ha(
            "vrid = 51\npriority = 200\nadvert_interval = \"250ms\"\npeers = [\"10.0.0.3\"]\n\
             source = \"10.0.0.2\"\ntrack_vips = [\"10.0.0.100:80/tcp\"]",
        ))
        .config;
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(
            json["ha"],
            serde_json::json!({
                "interface": "eth0",
                "vrid": 51,
                "priority": 200,
                "advert_interval_ms": 250,
                "preempt": true,
                "preempt_delay_ms": 0,
                "peers": ["10.0.0.3"],
                "source": "10.0.0.2",
                "garp_count": 5,
                "garp_interval_ms": 10,
                "garp_repeat_ms": 2000,
                "virtual_mac": false,
                "track_interface": true,
                "track_vips": ["web"],
                "track_penalty": 0,
                "sync_port": 5599,
            })
        );
        let none = serde_json::to_value(loaded(BASE).config).unwrap();
        assert_eq!(none["ha"], serde_json::Value::Null);
    }

    #[test]
    fn interface_defaults_to_the_dataplane_one_and_follows_its_rules() {
        assert_eq!(ha("vrid = 1").interface, "eth0");
        assert_eq!(ha("vrid = 1\ninterface = \"bond0.7\"").interface, "bond0.7");
        assert_one(
            "vrid = 1\ninterface = \"eth0:1\"",
            "ha.interface",
            &["address label"],
        );
        assert_one("vrid = 1\ninterface = \"\"", "ha.interface", &["empty"]);
        assert_one(
            "vrid = 1\ninterface = \"a-very-long-name0\"",
            "ha.interface",
            &["at most 15"],
        );
        // An invalid [dataplane] interface is reported once, there.
        let text = with_ha("vrid = 1").replace("\"eth0\"", "\"eth 0\"");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_contains(&errors[0], "dataplane.interface", &["a space"]);
    }

    #[test]
    fn vrid_is_required_and_1_to_255() {
        assert_one("priority = 200", "ha", &["missing `vrid`", "1 to 255"]);
        for bad in ["0", "256", "-1"] {
            assert_one(
                &format!("vrid = {bad}"),
                "ha.vrid",
                &[&format!("vrid {bad} is out of range"), "from 1 to 255"],
            );
        }
        assert_eq!(ha("vrid = 255").vrid, 255);
        assert_one(
            "vrid = \"51\"",
            "ha.vrid",
            &["expected a whole number from 1 to 255"],
        );
    }

    #[test]
    fn priority_1_to_255_and_255_is_for_the_owner() {
        for bad in ["0", "256"] {
            assert_one(
                &format!("vrid = 1\npriority = {bad}"),
                "ha.priority",
                &[&format!("priority {bad} is out of range"), "from 1 to 255"],
            );
        }
        assert_eq!(ha("vrid = 1\npriority = 1").priority, 1);
        let w = warnings("vrid = 1\npriority = 255");
        assert_eq!(w.len(), 1, "{w:#?}");
        assert_contains(
            &w[0],
            "ha.priority",
            &["only the node that owns the addresses should use 255"],
        );
    }

    #[test]
    fn advert_interval_range_and_centiseconds() {
        let iv = |s: &str| format!("vrid = 1\nadvert_interval = \"{s}\"");
        assert_eq!(ha(&iv("10ms")).advert_interval, MIN_ADVERT_INTERVAL);
        assert_eq!(ha(&iv("0.01s")).advert_interval_cs(), 1);
        assert_eq!(ha(&iv("1.23s")).advert_interval_cs(), 123);
        assert_eq!(ha(&iv("40.95s")).advert_interval_cs(), 4095);
        for bad in ["5ms", "0s", "41s", "40.96s", "1m"] {
            assert_one(
                &iv(bad),
                "ha.advert_interval",
                &[
                    &format!("advert_interval {bad} is out of range"),
                    "from 10ms to 40.95s",
                ],
            );
        }
        assert_one(
            &iv("15ms"),
            "ha.advert_interval",
            &[
                "advert_interval 15ms is not a whole number of centiseconds",
                "use 10ms or 20ms",
            ],
        );
        assert_one(
            &iv("1.005s"),
            "ha.advert_interval",
            &[
                "1.005s is not a whole number of centiseconds",
                "1s or 1.01s",
            ],
        );
        assert_one(&iv("1"), "ha.advert_interval", &["no unit"]);
    }

    #[test]
    fn preempt_and_its_delay() {
        let ha_ = ha("vrid = 1\npreempt = false");
        assert!(!ha_.preempt);
        assert_eq!(
            ha("vrid = 1\npreempt_delay = \"30s\"").preempt_delay,
            Duration::from_secs(30)
        );
        assert_one(
            "vrid = 1\npreempt_delay = \"1001s\"",
            "ha.preempt_delay",
            &["preempt_delay 1001s is too long", "at most \"1000s\""],
        );
        let w = warnings("vrid = 1\npreempt = false\npreempt_delay = \"5s\"");
        assert_eq!(w.len(), 1, "{w:#?}");
        assert_contains(&w[0], "ha.preempt_delay", &["no effect"]);
        assert_one(
            "vrid = 1\npreempt = \"yes\"",
            "ha.preempt",
            &["expected true or false"],
        );
    }

    #[test]
    fn peers_are_unicast_unique_and_not_vips() {
        let peers = |list: &str| format!("vrid = 1\npeers = [{list}]");
        assert_eq!(
            ha(&peers("\"10.0.0.3\"")).peers,
            [Ipv4Addr::new(10, 0, 0, 3)]
        );
        for (address, what) in [
            ("0.0.0.0", "0.0.0.0/8"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.18", "multicast"),
            ("127.0.0.1", "loopback"),
        ] {
            assert_one(
                &peers(&format!("\"10.0.0.3\", \"{address}\"")),
                "ha.peers[1]",
                &[what, "an HA node's address must be the unicast address"],
            );
        }
        assert_one(
            &peers("\"10.0.0.3:112\""),
            "ha.peers[0]",
            &["VRRP has no port: write only \"10.0.0.3\""],
        );
        assert_one(
            &peers("\"lb2\""),
            "ha.peers[0]",
            &["host names are not resolved"],
        );
        assert_one(
            &peers("\"10.0.0.3\", \"10.0.0.4\", \"10.0.0.3\""),
            "ha.peers[2]",
            &["peer 10.0.0.3 is listed twice: also at ha.peers[0]"],
        );
        assert_one(
            &peers("\"10.0.0.53\""),
            "ha.peers[0]",
            &[
                "10.0.0.53 is the address of vip[1] (`10.0.0.53:53/udp`)",
                "must stay where it is",
            ],
        );
        assert_one(
            "vrid = 1\npeers = \"10.0.0.3\"",
            "ha.peers",
            &["expected an array of IPv4 addresses"],
        );
    }

    #[test]
    fn source_is_unicast_and_not_a_vip() {
        assert_eq!(
            ha("vrid = 1\nsource = \"10.0.0.2\"").source,
            Some(Ipv4Addr::new(10, 0, 0, 2))
        );
        assert_one(
            "vrid = 1\nsource = \"224.0.0.18\"",
            "ha.source",
            &["multicast"],
        );
        assert_one(
            "vrid = 1\nsource = \"10.0.0.2/24\"",
            "ha.source",
            &["without a prefix length"],
        );
        assert_one(
            "vrid = 1\nsource = \"10.0.0.100\"",
            "ha.source",
            &["10.0.0.100 is the address of vip[0] (`web`)"],
        );
        let w = warnings("vrid = 1\nsource = \"10.0.0.2\"\npeers = [\"10.0.0.3\", \"10.0.0.2\"]");
        assert_eq!(w.len(), 1, "{w:#?}");
        assert_contains(
            &w[0],
            "ha.source",
            &["`source` 10.0.0.2 is also in `peers` (ha.peers[1])"],
        );
    }

    #[test]
    fn gratuitous_arp_settings() {
        let ha_ = ha("vrid = 1\ngarp_count = 1\ngarp_interval = \"0s\"\ngarp_repeat = \"60s\"");
        assert_eq!(
            (ha_.garp_count, ha_.garp_interval, ha_.garp_repeat),
            (1, Duration::ZERO, MAX_GARP_REPEAT)
        );
        for bad in ["0", "101", "-5"] {
            assert_one(
                &format!("vrid = 1\ngarp_count = {bad}"),
                "ha.garp_count",
                &[
                    &format!("garp_count {bad} is out of range"),
                    "from 1 to 100",
                ],
            );
        }
        assert_one(
            "vrid = 1\ngarp_interval = \"1.5s\"",
            "ha.garp_interval",
            &["garp_interval 1.5s is too long", "at most \"1s\""],
        );
        assert_one(
            "vrid = 1\ngarp_repeat = \"2m\"",
            "ha.garp_repeat",
            &["garp_repeat 2m is too long", "at most \"60s\""],
        );
        assert_one(
            "vrid = 1\ngarp_repeat = 2",
            "ha.garp_repeat",
            &["expected a duration in quotes"],
        );
        assert!(ha("vrid = 1\nvirtual_mac = true").virtual_mac);
        assert!(!ha("vrid = 1\ntrack_interface = false").track_interface);
    }

    #[test]
    fn track_vips_resolve_to_names() {
        let track = |list: &str| format!("vrid = 1\ntrack_vips = [{list}]");
        assert_eq!(ha(&track("\"web\"")).track_vips, ["web"]);
        // ADDRESS:PORT/PROTO, like the CLI: the protocol defaults to tcp, and is case-blind.
        assert_eq!(ha(&track("\"10.0.0.100:80\"")).track_vips, ["web"]);
        assert_eq!(ha(&track("\"10.0.0.100:80/TCP\"")).track_vips, ["web"]);
        assert_eq!(
            ha(&track("\"10.0.0.53:53/udp\", \"web\"")).track_vips,
            ["10.0.0.53:53/udp", "web"]
        );
        assert_one(
            &track("\"web\", \"db\""),
            "ha.track_vips[1]",
            &[
                "no VIP is named `db`",
                "the VIPs are `web`, `10.0.0.53:53/udp`",
            ],
        );
        assert_one(
            &track("\"10.0.0.100:443/tcp\""),
            "ha.track_vips[0]",
            &["`10.0.0.100:443/tcp`"],
        );
        assert_one(
            &track("\"web\", \"10.0.0.100:80/tcp\""),
            "ha.track_vips[1]",
            &[
                "VIP `web` is tracked twice (`10.0.0.100:80/tcp` is `web`)",
                "also at ha.track_vips[0]",
            ],
        );
        assert_one(
            "vrid = 1\ntrack_vips = \"web\"",
            "ha.track_vips",
            &["expected an array of VIP names"],
        );
        // Without any [[vip]].
        let errors =
            errors("[dataplane]\ninterface = \"eth0\"\n[ha]\nvrid = 1\ntrack_vips = [\"web\"]\n");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_contains(
            &errors[0],
            "ha.track_vips[0]",
            &["this file has no `[[vip]]`"],
        );
    }

    #[test]
    fn track_vips_naming_an_invalid_vip_report_only_the_vip() {
        let text = with_ha("vrid = 1\ntrack_vips = [\"web\", \"db\"]")
            .replace("\"10.0.0.11\"", "\"10.0.0.100\"");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_contains(
            &errors[0],
            "vip[0].backend[0].address",
            &["the VIP's own address"],
        );
    }

    #[test]
    fn track_penalty_0_to_254() {
        assert_eq!(ha("vrid = 1\ntrack_penalty = 50").track_penalty, 50);
        for bad in ["255", "-1"] {
            assert_one(
                &format!("vrid = 1\ntrack_penalty = {bad}"),
                "ha.track_penalty",
                &[&format!("track_penalty {bad} is out of range"), "to 254"],
            );
        }
    }

    #[test]
    fn sync_port_0_is_off() {
        assert_eq!(ha("vrid = 1\nsync_port = 0").sync_port, 0);
        assert_eq!(ha("vrid = 1\nsync_port = 65535").sync_port, 65535);
        for bad in ["65536", "-1"] {
            assert_one(
                &format!("vrid = 1\nsync_port = {bad}"),
                "ha.sync_port",
                &[&format!("sync_port {bad} is out of range"), "0 for no"],
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_one(
            "vrid = 1\nprio = 100",
            "ha.prio",
            &["unknown key `prio`", "`priority`"],
        );
        assert_one(
            "vrid = 1\nunicast_peer = [\"10.0.0.3\"]",
            "ha.unicast_peer",
            &["unknown key `unicast_peer`", "`peers`"],
        );
    }

    #[test]
    fn every_problem_at_once_in_file_order() {
        let text = with_ha(
            "priority = 0\nadvert_interval = \"15ms\"\npeers = [\"10.0.0.100\"]\n\
             garp_count = 0\ntrack_vips = [\"nope\"]\nsync_port = 70000",
        );
        let problems = match parse(&text, Path::new("ha.toml")) {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("{other:?}"),
        };
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "ha",
                "ha.priority",
                "ha.advert_interval",
                "ha.peers[0]",
                "ha.garp_count",
                "ha.track_vips[0]",
                "ha.sync_port",
            ]
        );
        let base_lines = BASE.lines().count();
        let lines: Vec<usize> = problems.iter().map(|p| p.location.unwrap().line).collect();
        assert_eq!(lines, (1..=7).map(|l| base_lines + l).collect::<Vec<_>>());
    }
}
