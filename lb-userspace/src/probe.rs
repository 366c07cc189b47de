//! Health-check probes: one check of one backend, reduced to an [`Outcome`].
//!
//! Contract:
//! - [`run`] never panics and returns within `timeout` plus a small, bounded grace (at most about
//!   50 ms to collect an exec check's stderr, about 1 s to reap a killed check). Every failure,
//!   including a local one (no socket, no such program), is an `Outcome` with `ok == false`.
//! - `Outcome::detail` is one line under 120 characters, worded for an operator's log line.
//! - `Outcome::latency` runs from the start of the check to the result; a timed-out check reports
//!   (about) the timeout.
//! - An exec check runs in its own process group; at the timeout the whole group is killed and the
//!   child reaped, and if the caller drops the check mid-way the group is killed too. A check that
//!   exits on its own but leaves background processes behind is not cleaned up: once the leader is
//!   reaped, its group id may name someone else's group.
//! - Each check uses fresh sockets; no state is kept between checks. Up/down decisions (rise/fall
//!   counts, flap damping) belong to the caller.
//!
//! Not guaranteed: HTTP is a minimal HTTP/1.1 client (no TLS, no redirects, no keep-alive); only the
//! first 64 KiB of a body is searched. A UDP check trusts any datagram from the backend's address
//! and port as a reply.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt as _;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};
use tokio::process::Command;

/// What a health check does. Part of the config (`config` parses TOML into it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Probe {
    /// No check: the backend always counts as healthy.
    None,
    /// TCP connect to the backend's address and the check port; success once the handshake
    /// completes (then close).
    Tcp,
    /// HTTP/1.1 GET.
    Http {
        /// Request target; starts with '/' (the config validates it).
        path: String,
        /// Host header; `None` sends "ADDR:PORT" of the target.
        host: Option<String>,
        /// Inclusive range of acceptable status codes, e.g. (200, 399).
        expect_status: (u16, u16),
        /// Substring that must appear in the body (its first 64 KiB).
        expect_body: Option<String>,
    },
    /// Send `payload` in one datagram; any reply datagram within the timeout means healthy; an ICMP
    /// port unreachable (ECONNREFUSED on a connected UDP socket) or silence means failure.
    Udp { payload: Vec<u8> },
    /// Run `command[0]` with args `command[1..]` (no shell); exit status 0 means healthy. Killed
    /// (whole process group) at the timeout.
    Exec { command: Vec<String> },
}

impl Probe {
    /// Short name: "none" | "tcp" | "http" | "udp" | "exec".
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Tcp => "tcp",
            Self::Http { .. } => "http",
            Self::Udp { .. } => "udp",
            Self::Exec { .. } => "exec",
        }
    }
}

/// Where a check goes and what it is for (an exec check gets these in its environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// IPv4 or IPv6 (of the VIP's family).
    pub backend: IpAddr,
    /// The port to check (may differ from the service port).
    pub port: u16,
    pub vip: IpAddr,
    pub vip_port: u16,
    pub vip_name: String,
    /// "tcp" | "udp".
    pub protocol: &'static str,
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// Short single-line reason for an operator: "connected", "connect refused", "HTTP 500
    /// (expected 200-399)", "no reply within 500ms", "exit status 1: <stderr>", ...
    pub detail: String,
    /// Time from the start of the check until the result; JSON carries it as `latency_ms`.
    #[serde(rename = "latency_ms", serialize_with = "serialize_ms")]
    pub latency: Duration,
}

impl Outcome {
    /// The latency in (fractional) milliseconds, as the JSON carries it.
    pub fn latency_ms(&self) -> f64 {
        self.latency.as_secs_f64() * 1000.0
    }

    fn new(ok: bool, detail: &str, latency: Duration) -> Self {
        Self {
            ok,
            detail: one_line(detail, MAX_DETAIL_CHARS),
            latency,
        }
    }

    fn pass(detail: &str, start: Instant) -> Self {
        Self::new(true, detail, start.elapsed())
    }

    fn fail(detail: &str, start: Instant) -> Self {
        Self::new(false, detail, start.elapsed())
    }
}

fn serialize_ms<S: serde::Serializer>(latency: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(latency.as_secs_f64() * 1000.0)
}

/// Runs one check. Never takes much longer than `timeout` and never panics; every failure is an
/// `Outcome` with `ok == false`.
pub async fn run(probe: &Probe, target: &Target, timeout: Duration) -> Outcome {
    let start = Instant::now();
    match probe {
        Probe::None => Outcome::pass("no check", start),
        Probe::Tcp => tcp(target, timeout, start).await,
        Probe::Http {
            path,
            host,
            expect_status,
            expect_body,
        } => {
            // `[2001:db8::11]:80` for IPv6, as RFC 9110 writes an IP literal with a port.
            let host = host
                .clone()
                .unwrap_or_else(|| target_addr(target).to_string());
            let check = HttpCheck {
                path,
                host: &host,
                expect_status: *expect_status,
                expect_body: expect_body.as_deref(),
            };
            http(&check, target, timeout, start).await
        }
        Probe::Udp { payload } => udp(payload, target, timeout, start).await,
        Probe::Exec { command } => exec(command, target, timeout, start).await,
    }
}

/// Keeps log lines scannable; long reasons are cut, never wrapped.
const MAX_DETAIL_CHARS: usize = 119;

fn target_addr(target: &Target) -> SocketAddr {
    SocketAddr::new(target.backend, target.port)
}

// ---------------------------------------------------------------------------------------------
// TCP

async fn tcp(target: &Target, timeout: Duration, start: Instant) -> Outcome {
    match tokio::time::timeout(timeout, TcpStream::connect(target_addr(target))).await {
        // Dropping closes with a FIN. The TIME_WAIT this leaves on our side comes to about 60
        // sockets per backend at one check a second, which the kernel handles without help.
        Ok(Ok(_stream)) => Outcome::pass("connected", start),
        Ok(Err(e)) => Outcome::fail(&io_words(&e), start),
        Err(_) => Outcome::fail(&format!("timeout after {}", fmt_duration(timeout)), start),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Header blocks beyond this are not a health endpoint's answer.
const MAX_HEAD: usize = 16 * 1024;
/// Only this much of a body is read and searched.
const MAX_BODY: usize = 64 * 1024;

struct HttpCheck<'a> {
    path: &'a str,
    host: &'a str,
    expect_status: (u16, u16),
    expect_body: Option<&'a str>,
}

/// How far an exchange got, for a timeout's reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Sending,
    AwaitingResponse,
    ReadingBody,
}

impl Phase {
    fn words(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Sending => "sending request",
            Self::AwaitingResponse => "awaiting response",
            Self::ReadingBody => "reading body",
        }
    }
}

async fn http(
    check: &HttpCheck<'_>,
    target: &Target,
    timeout: Duration,
    start: Instant,
) -> Outcome {
    // A line break or control byte would end the request line or header early and let the rest
    // be read as headers: refuse rather than send something other than what is configured.
    if check
        .path
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ')
    {
        return Outcome::fail("invalid path: contains a space or control character", start);
    }
    if check.host.bytes().any(|b| b.is_ascii_control()) {
        return Outcome::fail("invalid Host: contains a control character", start);
    }
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xdplb-health\r\nConnection: close\r\n\
         Accept: */*\r\n\r\n",
        check.path, check.host
    );

    // Both live outside the timed future so a timeout can still tell how far the exchange got.
    let mut phase = Phase::Connecting;
    let mut response = Response::default();
    let exchanged = tokio::time::timeout(
        timeout,
        http_exchange(target, request.as_bytes(), &mut phase, &mut response),
    )
    .await;

    match exchanged {
        Ok(Ok(())) => {
            let (ok, detail) = response.verdict(check);
            Outcome::new(ok, &detail, start.elapsed())
        }
        Ok(Err(words)) => Outcome::fail(&words, start),
        Err(_) => match response.head {
            // The status already fails the check; that says more than the timeout does.
            Some(head) if !status_in(head.status, check.expect_status) => {
                Outcome::fail(&status_words(head.status, check.expect_status), start)
            }
            _ => Outcome::fail(
                &format!("timeout after {} {}", fmt_duration(timeout), phase.words()),
                start,
            ),
        },
    }
}

async fn http_exchange(
    target: &Target,
    request: &[u8],
    phase: &mut Phase,
    response: &mut Response,
) -> Result<(), String> {
    *phase = Phase::Connecting;
    let mut stream = TcpStream::connect(target_addr(target))
        .await
        .map_err(|e| io_words(&e))?;
    *phase = Phase::Sending;
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("sending request: {}", io_words(&e)))?;
    *phase = Phase::AwaitingResponse;
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(n) => n,
            // A server that answers without reading the whole request may reset the connection
            // after its response: judge what arrived.
            Err(_) if response.head.is_some() => 0,
            Err(e) => return Err(io_words(&e)),
        };
        if n == 0 {
            return Ok(());
        }
        response.push(chunk.get(..n).unwrap_or_default());
        if response.complete() {
            return Ok(());
        }
        if response.head.is_some() {
            *phase = Phase::ReadingBody;
        }
    }
}

#[derive(Debug, Default)]
struct Response {
    buf: Vec<u8>,
    head: Option<Head>,
    not_http: bool,
    head_too_large: bool,
}

#[derive(Debug, Clone, Copy)]
struct Head {
    status: u16,
    body_start: usize,
    framing: Framing,
}

/// How the end of the body is known (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// 1xx, 204 and 304 have no body.
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

impl Response {
    fn push(&mut self, bytes: &[u8]) {
        let cap = match self.head {
            Some(head) => head.body_start.saturating_add(MAX_BODY),
            None => MAX_HEAD.saturating_add(MAX_BODY),
        };
        let room = cap.saturating_sub(self.buf.len());
        self.buf
            .extend_from_slice(bytes.get(..bytes.len().min(room)).unwrap_or_default());
    }

    /// Parses what it can; true once nothing more needs reading.
    fn complete(&mut self) -> bool {
        if self.head.is_none() {
            // Judged on the first bytes, so a non-HTTP service (which may never close) fails
            // at once instead of at the timeout.
            const PREFIX: &[u8] = b"HTTP/1.";
            let seen = self.buf.len().min(PREFIX.len());
            if self.buf.get(..seen) != PREFIX.get(..seen) {
                self.not_http = true;
                return true;
            }
            if let Some(eol) = find(&self.buf, b"\n")
                && parse_status_line(self.buf.get(..eol).unwrap_or_default()).is_none()
            {
                self.not_http = true;
                return true;
            }
            match parse_head(&self.buf) {
                Some(head) => self.head = Some(head),
                None if self.buf.len() >= MAX_HEAD => {
                    self.head_too_large = true;
                    return true;
                }
                None => return false,
            }
        }
        let Some(head) = self.head else {
            return false;
        };
        let body = self.buf.get(head.body_start..).unwrap_or_default();
        body.len() >= MAX_BODY
            || match head.framing {
                Framing::Empty => true,
                Framing::Length(n) => body.len() >= n,
                Framing::Chunked => dechunk(body).1,
                Framing::UntilClose => false,
            }
    }

    /// (healthy, reason) for a response that ended (EOF or complete).
    fn verdict(&self, check: &HttpCheck<'_>) -> (bool, String) {
        if self.buf.is_empty() {
            return (false, "connection closed without a response".to_owned());
        }
        if self.not_http {
            return (false, "not an HTTP response".to_owned());
        }
        let Some(head) = self.head else {
            let words = if self.head_too_large {
                "response header too large"
            } else {
                "truncated response header"
            };
            return (false, words.to_owned());
        };
        if !status_in(head.status, check.expect_status) {
            return (false, status_words(head.status, check.expect_status));
        }
        if let Some(expect) = check.expect_body {
            let raw = self.buf.get(head.body_start..).unwrap_or_default();
            let body = match head.framing {
                Framing::Empty => &[][..],
                Framing::Length(n) => raw.get(..n.min(raw.len())).unwrap_or_default(),
                Framing::UntilClose => raw,
                Framing::Chunked => &dechunk(raw).0[..],
            };
            if !contains(body, expect.as_bytes()) {
                return (false, format!("body lacks {:?}", truncate(expect, 60)));
            }
        }
        (true, format!("HTTP {}", head.status))
    }
}

fn status_in(status: u16, (lo, hi): (u16, u16)) -> bool {
    (lo..=hi).contains(&status)
}

fn status_words(status: u16, (lo, hi): (u16, u16)) -> String {
    if lo == hi {
        format!("HTTP {status} (expected {lo})")
    } else {
        format!("HTTP {status} (expected {lo}-{hi})")
    }
}

/// "HTTP/1.x NNN[ reason]", with or without the CR; `None` for anything else.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let [minor, b' ', d1, d2, d3, tail @ ..] = rest else {
        return None;
    };
    let digits = [*minor, *d1, *d2, *d3];
    if !digits.iter().all(u8::is_ascii_digit) || !(tail.is_empty() || tail.first() == Some(&b' ')) {
        return None;
    }
    let status = u16::from(d1 - b'0') * 100 + u16::from(d2 - b'0') * 10 + u16::from(d3 - b'0');
    (status >= 100).then_some(status)
}

/// The header block, once it has fully arrived (bare LF line ends are accepted, as most clients
/// do).
fn parse_head(buf: &[u8]) -> Option<Head> {
    let crlf = find(buf, b"\r\n\r\n").map(|i| (i, i + 4));
    let lf = find(buf, b"\n\n").map(|i| (i, i + 2));
    let (head_end, body_start) = match (crlf, lf) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let block = buf.get(..head_end)?;
    let mut lines = block
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status = parse_status_line(lines.next()?)?;

    let mut length = None;
    let mut chunked = None;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon);
        let value = String::from_utf8_lossy(value.get(1..).unwrap_or_default());
        let value = value.trim();
        if name.eq_ignore_ascii_case(b"content-length") {
            length = length.or(value.parse::<usize>().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only a final "chunked" frames the body; any other coding runs until close.
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            chunked = Some(last.eq_ignore_ascii_case("chunked"));
        }
    }
    let framing = if status < 200 || status == 204 || status == 304 {
        Framing::Empty
    } else {
        match (chunked, length) {
            (Some(true), _) => Framing::Chunked,
            (Some(false), _) => Framing::UntilClose,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::UntilClose,
        }
    };
    Some(Head {
        status,
        body_start,
        framing,
    })
}

/// Decodes a chunked body as far as it has arrived: (data, whether the last chunk was seen).
/// A malformed chunk ends decoding as if complete, so the check judges what it has rather than
/// waiting for the timeout.
fn dechunk(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let Some(eol) = find(body, b"\r\n") else {
            return (data, false);
        };
        let line = body.get(..eol).unwrap_or_default();
        // Chunk extensions (";name=value") carry nothing a health check needs.
        let size = line.split(|&b| b == b';').next().unwrap_or_default();
        let Some(size) = std::str::from_utf8(size)
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        else {
            return (data, true);
        };
        body = body.get(eol + 2..).unwrap_or_default();
        if size == 0 {
            // The last chunk: done once the (usually empty) trailer section has ended.
            let done = body.starts_with(b"\r\n") || find(body, b"\r\n\r\n").is_some();
            return (data, done);
        }
        match body.get(..size) {
            Some(chunk) => data.extend_from_slice(chunk),
            None => {
                data.extend_from_slice(body);
                return (data, false);
            }
        }
        match body.get(size..) {
            Some(rest) if rest.len() >= 2 => body = rest.get(2..).unwrap_or_default(),
            _ => return (data, false),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

// ---------------------------------------------------------------------------------------------
// UDP

async fn udp(payload: &[u8], target: &Target, timeout: Duration, start: Instant) -> Outcome {
    let exchange = async {
        let any = match target.backend {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let socket = UdpSocket::bind((any, 0))
            .await
            .map_err(|e| format!("cannot open socket: {}", io_text(&e)))?;
        // Connected, so the kernel reports ICMP port unreachable as ECONNREFUSED and drops
        // datagrams from anyone but the backend.
        socket
            .connect(target_addr(target))
            .await
            .map_err(|e| udp_words(&e))?;
        socket.send(payload).await.map_err(|e| udp_words(&e))?;
        // Any reply counts; a larger datagram is truncated, which is fine.
        let mut reply = [0u8; 512];
        socket.recv(&mut reply).await.map_err(|e| udp_words(&e))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(n)) => Outcome::pass(&format!("reply of {n} bytes"), start),
        Ok(Err(words)) => Outcome::fail(&words, start),
        Err(_) => Outcome::fail(&format!("no reply within {}", fmt_duration(timeout)), start),
    }
}

fn udp_words(e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::ECONNREFUSED) {
        "port unreachable".to_owned()
    } else {
        io_words(e)
    }
}

// ---------------------------------------------------------------------------------------------
// Exec

/// Enough stderr for a reason; the rest is drained and dropped so the child never blocks on a
/// full pipe.
const STDERR_KEEP: usize = 4096;
/// After the child exits, how long to wait for stderr's end: a background process it left may
/// hold the pipe open indefinitely, but what the child wrote is already buffered.
const STDERR_GRACE: Duration = Duration::from_millis(50);
/// After SIGKILL, how long to wait for the child to be reaped here; past that (a process stuck in
/// the kernel) tokio's orphan queue reaps it later.
const REAP_GRACE: Duration = Duration::from_secs(1);

async fn exec(command: &[String], target: &Target, timeout: Duration, start: Instant) -> Outcome {
    let Some((program, args)) = command.split_first() else {
        return Outcome::fail("empty command", start);
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env("XDPLB_BACKEND", target.backend.to_string())
        .env("XDPLB_BACKEND_PORT", target.port.to_string())
        .env("XDPLB_VIP", target.vip.to_string())
        .env("XDPLB_VIP_PORT", target.vip_port.to_string())
        .env("XDPLB_VIP_NAME", &target.vip_name)
        .env("XDPLB_PROTOCOL", target.protocol);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let program = truncate(program, 60);
            return Outcome::fail(&format!("cannot run `{program}`: {}", io_text(&e)), start);
        }
    };
    // Declared after `child` so it drops first: a cancelled check kills the group while the
    // leader is still unreaped.
    let mut group = GroupKill(child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()));

    let stderr = child.stderr.take();
    let mut stderr_text = Vec::new();
    let ended = {
        let reader = drain(stderr, &mut stderr_text);
        tokio::pin!(reader);
        let mut reader_done = false;
        let waited = tokio::time::timeout(timeout, async {
            loop {
                tokio::select! {
                    status = child.wait() => break status,
                    () = &mut reader, if !reader_done => reader_done = true,
                }
            }
        })
        .await;
        match waited {
            Ok(status) => {
                // Reaped (or unknown): the group id may now belong to someone else.
                group.disarm();
                let latency = start.elapsed();
                if !reader_done {
                    let _ = tokio::time::timeout(STDERR_GRACE, &mut reader).await;
                }
                Some((status, latency))
            }
            Err(_) => None,
        }
    };

    match ended {
        Some((Ok(status), latency)) => {
            let (ok, detail) = exit_words(status, &stderr_text);
            Outcome::new(ok, &detail, latency)
        }
        Some((Err(e), latency)) => {
            Outcome::new(false, &format!("wait failed: {}", io_text(&e)), latency)
        }
        None => {
            group.kill();
            // Covers a pid that did not fit `pid_t`; the leader is unreaped, so its pid is ours.
            let _ = child.start_kill();
            let latency = start.elapsed();
            let _ = tokio::time::timeout(REAP_GRACE, child.wait()).await;
            Outcome::new(
                false,
                &format!("killed after {}", fmt_duration(timeout)),
                latency,
            )
        }
    }
}

/// SIGKILLs a check's process group when told or when dropped, unless disarmed. Armed only while
/// the group leader is unreaped, which keeps the id from naming another process's group.
struct GroupKill(Option<libc::pid_t>);

impl GroupKill {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads to EOF (or error), keeping the first `STDERR_KEEP` bytes.
async fn drain(reader: Option<impl AsyncRead + Unpin>, keep: &mut Vec<u8>) {
    let Some(mut reader) = reader else {
        return;
    };
    let mut chunk = [0u8; 1024];
    loop {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = STDERR_KEEP.saturating_sub(keep.len()).min(n);
                keep.extend_from_slice(chunk.get(..room).unwrap_or_default());
            }
        }
    }
}

fn exit_words(status: ExitStatus, stderr: &[u8]) -> (bool, String) {
    if status.success() {
        return (true, "exit status 0".to_owned());
    }
    let mut words = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match signal_name(signal) {
            Some(name) => format!("killed by signal {signal} ({name})"),
            None => format!("killed by signal {signal}"),
        },
        (None, None) => format!("{status}"),
    };
    let text = String::from_utf8_lossy(stderr);
    if let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
        words.push_str(": ");
        words.push_str(line);
    }
    (false, words)
}

fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Words

/// An io error as the short words an operator expects from ping/curl-like tools.
fn io_words(e: &io::Error) -> String {
    let words = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connect refused",
        Some(libc::EHOSTUNREACH) => "host unreachable",
        Some(libc::ENETUNREACH) => "network unreachable",
        Some(libc::ENETDOWN) => "network down",
        Some(libc::ECONNRESET) => "connection reset",
        Some(libc::ECONNABORTED) => "connection aborted",
        Some(libc::EPIPE) => "connection closed",
        Some(libc::ETIMEDOUT) => "timed out (kernel)",
        Some(libc::EADDRNOTAVAIL) => "no local address or port available",
        Some(libc::EPERM | libc::EACCES) => "not permitted (firewall?)",
        _ => return io_text(e),
    };
    words.to_owned()
}

/// The error's text without std's " (os error N)" suffix.
fn io_text(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(i) => text.get(..i).unwrap_or(&text).to_owned(),
        None => text,
    }
}

/// "500ms", "2s", "1.5s": what an operator configured, not float noise.
fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 && !d.is_zero() {
        format!("{}us", d.as_micros())
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        let frac = format!("{:03}", ms % 1000);
        format!("{}.{}s", ms / 1000, frac.trim_end_matches('0'))
    }
}

/// One line of at most `max` chars: control characters become spaces, the excess becomes "...".
fn one_line(text: &str, max: usize) -> String {
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    truncate(&clean, max)
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio::net::{TcpListener, TcpSocket};
    use tokio::sync::oneshot;

    use super::*;

    const T: Duration = Duration::from_millis(500);

    fn target(port: u16) -> Target {
        Target {
            backend: Ipv4Addr::LOCALHOST.into(),
            port,
            vip: Ipv4Addr::new(10, 0, 0, 1).into(),
            vip_port: 80,
            vip_name: "web".to_owned(),
            protocol: "tcp",
        }
    }

    fn http_probe(expect_body: Option<&str>) -> Probe {
        Probe::Http {
            path: "/healthz".to_owned(),
            host: None,
            expect_status: (200, 399),
            expect_body: expect_body.map(str::to_owned),
        }
    }

    fn exec_probe(args: &[&str]) -> Probe {
        Probe::Exec {
            command: args.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// A port nothing listens on: bound, then released.
    async fn closed_tcp_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    /// Serves one connection: reads the request head, sends `response`, then closes or (with
    /// `hold`) keeps the connection open. Yields the request it read.
    async fn serve_once(response: &'static [u8], hold: bool) -> (u16, oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&request, b"\r\n\r\n").is_none() {
                let n = stream.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            stream.write_all(response).await.unwrap();
            let _ = tx.send(request);
            if hold {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        (port, rx)
    }

    async fn check(probe: &Probe, port: u16, timeout: Duration) -> Outcome {
        let outcome = run(probe, &target(port), timeout).await;
        assert!(outcome.detail.len() < 120 && !outcome.detail.contains('\n'));
        outcome
    }

    #[test]
    fn run_is_send() {
        fn assert_send<F: Send>(_: &F) {}
        let probe = Probe::Tcp;
        let target = target(1);
        assert_send(&run(&probe, &target, T));
    }

    #[test]
    fn kinds() {
        assert_eq!(Probe::None.kind(), "none");
        assert_eq!(Probe::Tcp.kind(), "tcp");
        assert_eq!(http_probe(None).kind(), "http");
        assert_eq!(Probe::Udp { payload: vec![] }.kind(), "udp");
        assert_eq!(exec_probe(&["true"]).kind(), "exec");
    }

    #[test]
    fn json_shapes() {
        let outcome = Outcome {
            ok: true,
            detail: "connected".to_owned(),
            latency: Duration::from_micros(1500),
        };
        assert_eq!(
            serde_json::to_value(&outcome).unwrap(),
            serde_json::json!({"ok": true, "detail": "connected", "latency_ms": 1.5})
        );
        assert_eq!(outcome.latency_ms(), 1.5);
        assert_eq!(
            serde_json::to_value(http_probe(Some("ok"))).unwrap(),
            serde_json::json!({"kind": "http", "path": "/healthz", "host": null,
                "expect_status": [200, 399], "expect_body": "ok"})
        );
        assert_eq!(
            serde_json::to_value(Probe::None).unwrap(),
            serde_json::json!({"kind": "none"})
        );
    }

    #[test]
    fn durations_read_as_configured() {
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::from_millis(1250)), "1.25s");
        assert_eq!(fmt_duration(Duration::from_micros(300)), "300us");
        assert_eq!(fmt_duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn details_are_one_short_line() {
        let long = "x".repeat(300);
        let line = one_line(&format!("a\nb\r\t{long}"), MAX_DETAIL_CHARS);
        assert!(line.starts_with("a b  "));
        assert_eq!(line.chars().count(), MAX_DETAIL_CHARS);
        assert!(line.ends_with("..."));
    }

    #[test]
    fn status_line_is_parsed_strictly() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 404 Not Found"), Some(404));
        assert_eq!(parse_status_line(b"HTTP/2 200"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1  200 OK"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 099 OK"), None);
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH_9.6"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[test]
    fn chunked_bodies_decode_incrementally() {
        assert_eq!(
            dechunk(b"2\r\nok\r\n3;x=y\r\n!!!\r\n0\r\n\r\n"),
            (b"ok!!!".to_vec(), true)
        );
        assert_eq!(dechunk(b"2\r\nok\r\n0\r\n"), (b"ok".to_vec(), false));
        assert_eq!(dechunk(b"5\r\nok"), (b"ok".to_vec(), false));
        // Data that looks like the last chunk does not end the body.
        assert_eq!(
            dechunk(b"5\r\n0\r\n\r\n\r\n"),
            (b"0\r\n\r\n".to_vec(), false)
        );
        assert_eq!(dechunk(b"zz\r\nok"), (Vec::new(), true));
    }

    #[test]
    fn head_framing() {
        let head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!(
            (head.status, head.body_start, head.framing),
            (200, 38, Framing::Length(2))
        );
        let head = parse_head(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
        )
        .unwrap();
        assert_eq!(head.framing, Framing::Chunked);
        let head = parse_head(b"HTTP/1.0 204 No Content\n\n").unwrap();
        assert_eq!(head.framing, Framing::Empty);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n").is_none());
    }

    #[tokio::test]
    async fn none_is_always_healthy() {
        let outcome = check(&Probe::None, 1, T).await;
        assert!(outcome.ok);
        assert_eq!(outcome.detail, "no check");
    }

    #[tokio::test]
    async fn tcp_connects_to_a_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let outcome = check(&Probe::Tcp, port, T).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(outcome.detail, "connected");
        assert!(outcome.latency < T);
    }

    #[tokio::test]
    async fn tcp_refused_on_a_closed_port() {
        let outcome = check(&Probe::Tcp, closed_tcp_port().await, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "connect refused");
    }

    #[tokio::test]
    async fn tcp_times_out_when_the_accept_queue_is_full() {
        // Linux drops a SYN to a listener whose accept queue is full (the connect then waits for
        // a retransmit a second later), which stands in for an unreachable backend.
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        let mut full = false;
        for _ in 0..8 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(stream) => fillers.push(stream.unwrap()),
                Err(_) => {
                    full = true;
                    break;
                }
            }
        }
        assert!(full, "the accept queue never filled");
        let timeout = Duration::from_millis(300);
        let outcome = check(&Probe::Tcp, addr.port(), timeout).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "timeout after 300ms");
        assert!(outcome.latency >= timeout && outcome.latency < timeout + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn http_ok_with_body_and_the_request_is_well_formed() {
        // Held open: the Content-Length must end the read, not EOF.
        let (port, request) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
        let outcome = check(&http_probe(Some("ok")), port, T).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(outcome.detail, "HTTP 200");
        assert!(outcome.latency < T);
        let request = String::from_utf8(request.await.unwrap()).unwrap();
        assert!(
            request.starts_with("GET /healthz HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
            "{request}"
        );
        assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
        assert!(
            request.contains("\r\nUser-Agent: xdplb-health\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn http_sends_the_configured_host() {
        let (port, request) = serve_once(b"HTTP/1.0 204 No Content\r\n\r\n", true).await;
        let probe = Probe::Http {
            path: "/".to_owned(),
            host: Some("api.example".to_owned()),
            expect_status: (204, 204),
            expect_body: None,
        };
        let outcome = check(&probe, port, T).await;
        assert!(outcome.ok, "{outcome:?}");
        let request = String::from_utf8(request.await.unwrap()).unwrap();
        assert!(
            request.starts_with("GET / HTTP/1.1\r\nHost: api.example\r\n"),
            "{request}"
        );
    }

    #[tokio::test]
    async fn http_body_until_close_counts() {
        let (port, _request) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nall good", false).await;
        let outcome = check(&http_probe(Some("good")), port, T).await;
        assert!(outcome.ok, "{outcome:?}");
    }

    #[tokio::test]
    async fn http_chunked_body_is_decoded() {
        // "ok" split across chunks: found only in the decoded body.
        let (port, _request) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n",
            true,
        )
        .await;
        let outcome = check(&http_probe(Some("ok")), port, T).await;
        assert!(outcome.ok, "{outcome:?}");
        assert!(outcome.latency < T);
    }

    #[tokio::test]
    async fn http_status_out_of_range_fails() {
        let (port, _request) = serve_once(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\nerror",
            false,
        )
        .await;
        let outcome = check(&http_probe(None), port, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "HTTP 500 (expected 200-399)");
    }

    #[tokio::test]
    async fn http_status_fails_even_if_the_body_never_ends() {
        let (port, _request) =
            serve_once(b"HTTP/1.1 503 Busy\r\nContent-Length: 99\r\n\r\n", true).await;
        let outcome = check(&http_probe(None), port, Duration::from_millis(300)).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "HTTP 503 (expected 200-399)");
    }

    #[tokio::test]
    async fn http_body_mismatch_fails() {
        let (port, _request) = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nstarting",
            false,
        )
        .await;
        let outcome = check(&http_probe(Some("ok")), port, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "body lacks \"ok\"");
    }

    #[tokio::test]
    async fn http_garbage_is_not_http_and_fails_at_once() {
        // Held open, like a real SSH server waiting for its peer.
        let (port, _request) = serve_once(b"SSH-2.0-OpenSSH_9.6\r\n", true).await;
        let outcome = check(&http_probe(None), port, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "not an HTTP response");
        assert!(outcome.latency < T);
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let (port, _request) = serve_once(b"", true).await;
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let outcome = check(&http_probe(None), port, timeout).await;
        let elapsed = started.elapsed();
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "timeout after 300ms awaiting response");
        assert!(
            elapsed >= timeout && elapsed < timeout + Duration::from_secs(1),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn http_refused_and_closed_without_response() {
        let outcome = check(&http_probe(None), closed_tcp_port().await, T).await;
        assert_eq!(
            (outcome.ok, outcome.detail.as_str()),
            (false, "connect refused")
        );

        let (port, _request) = serve_once(b"", false).await;
        let outcome = check(&http_probe(None), port, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "connection closed without a response");
    }

    #[tokio::test]
    async fn http_refuses_to_send_a_broken_request() {
        let probe = Probe::Http {
            path: "/a\r\nX-Injected: 1".to_owned(),
            host: None,
            expect_status: (200, 200),
            expect_body: None,
        };
        let outcome = check(&probe, 1, T).await;
        assert!(!outcome.ok);
        assert!(outcome.detail.starts_with("invalid path"), "{outcome:?}");
    }

    #[tokio::test]
    async fn udp_echo_replies() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&buf[..n], peer).await.unwrap();
        });
        let probe = Probe::Udp {
            payload: b"ping".to_vec(),
        };
        let outcome = check(&probe, port, T).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(outcome.detail, "reply of 4 bytes");
    }

    /// An IPv6 backend is checked over IPv6 (the loopback stands in for it): TCP, HTTP with
    /// `Host: [ADDR]:PORT`, UDP, and an exec check that gets the address.
    #[tokio::test]
    async fn ipv6_backends_are_checked_over_ipv6() {
        let backend: IpAddr = Ipv6Addr::LOCALHOST.into();
        let t = |port| Target {
            backend,
            vip: "2001:db8::100".parse().unwrap(),
            ..target(port)
        };
        let listener = TcpListener::bind("[::1]:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            // The TCP check's connection, then the HTTP check's, which is answered with the
            // Host header it sent.
            drop(listener.accept().await.unwrap());
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            let host = String::from_utf8_lossy(&request[..n])
                .lines()
                .find(|l| l.starts_with("Host: "))
                .unwrap_or_default()
                .to_string();
            let body = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{host}",
                host.len()
            );
            stream.write_all(body.as_bytes()).await.unwrap();
        });
        let tcp = run(&Probe::Tcp, &t(port), T).await;
        assert!(tcp.ok, "{tcp:?}");
        let http = run(
            &http_probe(Some(&format!("Host: [::1]:{port}"))),
            &t(port),
            T,
        )
        .await;
        assert!(http.ok, "{http:?}");

        let server = UdpSocket::bind("[::1]:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            server.send_to(&buf[..n], peer).await.unwrap();
        });
        let udp = run(
            &Probe::Udp {
                payload: b"ping".to_vec(),
            },
            &t(port),
            T,
        )
        .await;
        assert!(udp.ok, "{udp:?}");

        let exec = exec_probe(&[
            "sh",
            "-c",
            "test \"$XDPLB_BACKEND $XDPLB_VIP\" = \"::1 2001:db8::100\"",
        ]);
        let outcome = run(&exec, &t(port), T).await;
        assert!(outcome.ok, "{outcome:?}");
    }

    #[tokio::test]
    async fn udp_closed_port_is_unreachable() {
        let port = {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            socket.local_addr().unwrap().port()
        };
        let probe = Probe::Udp {
            payload: b"ping".to_vec(),
        };
        let outcome = check(&probe, port, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "port unreachable");
        assert!(outcome.latency < T);
    }

    #[tokio::test]
    async fn udp_silence_fails() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let timeout = Duration::from_millis(300);
        let outcome = check(&Probe::Udp { payload: vec![] }, port, timeout).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "no reply within 300ms");
        assert!(outcome.latency >= timeout && outcome.latency < timeout + Duration::from_secs(1));
        drop(server);
    }

    #[tokio::test]
    async fn exec_exit_zero_is_healthy() {
        let outcome = check(&exec_probe(&["/bin/sh", "-c", "exit 0"]), 1, T).await;
        assert!(outcome.ok, "{outcome:?}");
        assert_eq!(outcome.detail, "exit status 0");
    }

    #[tokio::test]
    async fn exec_failure_reports_status_and_stderr() {
        let probe = exec_probe(&["/bin/sh", "-c", "echo >&2; echo broken >&2; exit 3"]);
        let outcome = check(&probe, 1, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "exit status 3: broken");
    }

    #[tokio::test]
    async fn exec_killed_by_a_signal() {
        let outcome = check(&exec_probe(&["/bin/sh", "-c", "kill -SEGV $$"]), 1, T).await;
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "killed by signal 11 (SIGSEGV)");
    }

    #[tokio::test]
    async fn exec_sees_the_target_in_its_environment() {
        let probe = exec_probe(&[
            "/bin/sh",
            "-c",
            r#"test "$XDPLB_BACKEND" = 127.0.0.1 && test "$XDPLB_BACKEND_PORT" = 8080 \
               && test "$XDPLB_VIP" = 10.0.0.1 && test "$XDPLB_VIP_PORT" = 80 \
               && test "$XDPLB_VIP_NAME" = web && test "$XDPLB_PROTOCOL" = tcp"#,
        ]);
        let outcome = check(&probe, 8080, T).await;
        assert!(outcome.ok, "{outcome:?}");
    }

    #[tokio::test]
    async fn exec_is_killed_at_the_timeout() {
        let timeout = Duration::from_millis(200);
        let started = Instant::now();
        let outcome = check(&exec_probe(&["sleep", "10"]), 1, timeout).await;
        let elapsed = started.elapsed();
        assert!(!outcome.ok);
        assert_eq!(outcome.detail, "killed after 200ms");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    /// Alive and not a zombie.
    fn running(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .unwrap()
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn exec_timeout_kills_the_whole_group() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let pid_file: PathBuf =
            std::env::temp_dir().join(format!("xdplb-probe-test-{}-{nanos}", std::process::id()));
        let pid_file_arg = pid_file.to_str().unwrap();
        let script = format!("sleep 30 & echo $! > {pid_file_arg}; wait");
        let outcome = check(&exec_probe(&["/bin/sh", "-c", &script]), 1, T).await;
        assert_eq!(outcome.detail, "killed after 500ms");
        let pid: u32 = std::fs::read_to_string(pid_file_arg)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::fs::remove_file(pid_file_arg);
        let deadline = Instant::now() + Duration::from_secs(2);
        while running(pid) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!running(pid), "grandchild {pid} survived the kill");
    }

    #[tokio::test]
    async fn exec_result_does_not_wait_for_a_background_process_holding_stderr() {
        let started = Instant::now();
        let outcome = check(
            &exec_probe(&["/bin/sh", "-c", "sleep 2 & exit 0"]),
            1,
            Duration::from_secs(3),
        )
        .await;
        let elapsed = started.elapsed();
        assert!(outcome.ok, "{outcome:?}");
        assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");
    }

    #[tokio::test]
    async fn exec_spawn_failure() {
        let outcome = check(&exec_probe(&["/nonexistent/xdplb-check"]), 1, T).await;
        assert!(!outcome.ok);
        assert_eq!(
            outcome.detail,
            "cannot run `/nonexistent/xdplb-check`: No such file or directory"
        );
        let outcome = check(&Probe::Exec { command: vec![] }, 1, T).await;
        assert_eq!(
            (outcome.ok, outcome.detail.as_str()),
            (false, "empty command")
        );
    }

    #[tokio::test]
    async fn exec_drains_a_flood_of_stderr() {
        // More than a pipe holds: the child would block if stderr were not drained.
        let probe = exec_probe(&[
            "/bin/sh",
            "-c",
            "head -c 300000 /dev/zero | tr '\\0' x >&2; exit 1",
        ]);
        let outcome = check(&probe, 1, Duration::from_secs(5)).await;
        assert!(!outcome.ok);
        assert!(
            outcome.detail.starts_with("exit status 1: xxx"),
            "{outcome:?}"
        );
        assert!(outcome.latency < Duration::from_secs(3), "{outcome:?}");
    }
}
