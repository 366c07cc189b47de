//! Long-lived TCP streams through a VIP, verified byte by byte, and the echo servers they talk
//! to: what the connection-table and HA tests use to prove that no established connection broke.
//!
//! An [`EchoServer`] on each backend sends `NAME\n` on every new connection, then echoes every
//! byte. A [`Stream`] writes chunks of a deterministic pattern and verifies each echoed byte; one
//! that is reset, stalls for [`STREAM_READ_TIMEOUT`] or reads a wrong byte is reported broken with
//! the reason and the moment it happened.
//!
//! Everything works over IPv4 and IPv6 alike (`SocketAddr`); the helpers without an address
//! family in their arguments ([`EchoServer::start`], [`echo_each`], [`connect_many`],
//! [`open_streams`]) are the IPv4 topology's and have `_on`/`_from` versions that take one.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    netns::{Host, Netns},
    topology::CLIENT_ADDR,
};

/// How long a stream waits for its echo before calling the stream broken (a blackhole).
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(3);

// ---- echo servers on the backends ----

/// A TCP server that sends `NAME\n` on every new connection, then echoes every byte back, a
/// thread per connection. Counts the bytes it echoed per client address. Closing its listener
/// ([`EchoServer::close_listener`]) leaves established connections running; dropping it closes
/// everything.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    /// A duplicate of the listener, to wake and close the accept loop.
    listener: Option<TcpListener>,
    accept: Option<JoinHandle<()>>,
    /// Duplicates of the open connections, by a sequence number, to shut them down on drop.
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    live: Arc<AtomicUsize>,
    echoed: Arc<Mutex<HashMap<SocketAddr, Arc<AtomicU64>>>>,
}

impl EchoServer {
    /// On `0.0.0.0:port`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> EchoServer {
        EchoServer::start_on(ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port), name)
    }

    /// On `addr`, e.g. `[::]:80` for IPv6 clients.
    pub fn start_on(ns: &Netns, addr: impl Into<SocketAddr>, name: &str) -> EchoServer {
        let addr = addr.into();
        let listener = ns
            .run_in(move || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("binding echo server {addr}: {e}"));
        let dup = listener.try_clone().expect("dup listener");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let live = Arc::new(AtomicUsize::new(0));
        let echoed: Arc<Mutex<HashMap<SocketAddr, Arc<AtomicU64>>>> = Arc::default();
        let banner = format!("{name}\n");
        let accept = {
            let (stop, conns, live, echoed) =
                (stop.clone(), conns.clone(), live.clone(), echoed.clone());
            std::thread::spawn(move || {
                let mut seq = 0u64;
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut c) = conn else { continue };
                    let Ok(peer) = c.peer_addr().map(unmap) else {
                        continue;
                    };
                    let Ok(dup) = c.try_clone() else { continue };
                    seq += 1;
                    let id = seq;
                    conns.lock().unwrap().insert(id, dup);
                    let counter = echoed
                        .lock()
                        .unwrap()
                        .entry(peer)
                        .or_insert_with(Arc::default)
                        .clone();
                    live.fetch_add(1, Ordering::SeqCst);
                    let (conns, live, banner) = (conns.clone(), live.clone(), banner.clone());
                    std::thread::spawn(move || {
                        if c.write_all(banner.as_bytes()).is_ok() {
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                match c.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                        counter.fetch_add(n as u64, Ordering::Relaxed);
                                    }
                                }
                            }
                        }
                        conns.lock().unwrap().remove(&id);
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        EchoServer {
            stop,
            listener: Some(dup),
            accept: Some(accept),
            conns,
            live,
            echoed,
        }
    }

    /// Stops accepting (new connections and health checks are refused); established
    /// connections keep being echoed.
    pub fn close_listener(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(l) = self.listener.take() {
            // SAFETY: our own duplicate of the listening socket, open until dropped below;
            // shutting it down wakes the blocked accept() and stops the socket listening.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }

    /// Bytes echoed so far to the client at `peer`.
    pub fn echoed_to(&self, peer: impl Into<SocketAddr>) -> u64 {
        self.echoed
            .lock()
            .unwrap()
            .get(&unmap(peer.into()))
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.close_listener();
        for (_, c) in self.conns.lock().unwrap().drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A peer address as a dual-stack socket reports an IPv4 client (`[::ffff:a.b.c.d]:p`) is that
/// IPv4 client.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => a,
        },
        v4 => v4,
    }
}

/// An echo server named `b1`, `b2`, ... on every backend host, on `0.0.0.0:port`.
pub fn echo_each(backends: &[Host], port: u16) -> Vec<EchoServer> {
    echo_each_on(backends, Ipv4Addr::UNSPECIFIED.into(), port)
}

/// An echo server named `b1`, `b2`, ... on every backend host, on `ip:port`.
pub fn echo_each_on(backends: &[Host], ip: IpAddr, port: u16) -> Vec<EchoServer> {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| EchoServer::start_on(&b.ns, (ip, port), &format!("b{}", i + 1)))
        .collect()
}

// ---- clients ----

/// Connects from the calling thread's namespace, from `src`, within 3 s. `src` and `dst` are of
/// one address family.
pub fn connect(src: impl Into<SocketAddr>, dst: impl Into<SocketAddr>) -> io::Result<TcpStream> {
    let (src, dst) = (src.into(), dst.into());
    let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.bind(&src.into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(3))?;
    Ok(s.into())
}

/// Reads the server's one-line banner (its name).
pub fn read_banner(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {line:?}"),
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "banner too long",
    ))
}

/// One short connection from the calling thread's namespace: banner, a request echoed, and if
/// `hold` is not zero, after `hold`, a second one; then close. Returns the backend's name.
pub fn ask_echo(
    src: impl Into<SocketAddr>,
    dst: impl Into<SocketAddr>,
    hold: Duration,
) -> io::Result<String> {
    let src = src.into();
    let mut s = connect(src, dst)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let name = read_banner(&mut s)?;
    for round in 0..if hold.is_zero() { 1 } else { 2 } {
        if round > 0 {
            std::thread::sleep(hold);
        }
        let req = format!("ping {round} from {src}\n");
        s.write_all(req.as_bytes())?;
        let mut back = vec![0u8; req.len()];
        s.read_exact(&mut back)?;
        if back != req.as_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("echo {back:?}"),
            ));
        }
    }
    Ok(name)
}

/// Runs `f` on a new thread inside `ns` (for clients that open sockets as they go).
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let fd = ns.as_fd().try_clone_to_owned().expect("dup netns fd");
    std::thread::spawn(move || {
        // SAFETY: entering the network namespace of an fd we own, on this thread only.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!("setns: {}", io::Error::last_os_error());
        }
        drop(fd);
        f()
    })
}

/// `n` short connections from the topology's client address, ports `first_port`,
/// `first_port + 1`, ...: answers and failures.
pub fn connect_many(
    client: &Netns,
    dst: SocketAddrV4,
    first_port: u16,
    n: u16,
) -> (Vec<String>, Vec<String>) {
    connect_many_from(client, CLIENT_ADDR.into(), dst.into(), first_port, n)
}

/// `n` short connections from `src_ip`, ports `first_port`, `first_port + 1`, ...: answers and
/// failures.
pub fn connect_many_from(
    client: &Netns,
    src_ip: IpAddr,
    dst: SocketAddr,
    first_port: u16,
    n: u16,
) -> (Vec<String>, Vec<String>) {
    spawn_in(client, move || {
        let mut answers = Vec::new();
        let mut failures = Vec::new();
        for i in 0..n {
            let src = SocketAddr::new(src_ip, first_port + i);
            match ask_echo(src, dst, Duration::ZERO) {
                Ok(a) => answers.push(a),
                Err(e) => failures.push(format!("{src}: {e}")),
            }
        }
        (answers, failures)
    })
    .join()
    .expect("client thread")
}

/// The `i`th byte of stream `seed`'s pattern.
pub fn pattern(seed: u64, i: u64) -> u8 {
    let x = (i ^ seed.rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i >> 11) as u8
}

/// How a stream broke.
#[derive(Debug, Clone)]
pub struct Broken {
    pub kind: io::ErrorKind,
    pub what: String,
    pub at: Instant,
}

#[derive(Debug)]
pub struct StreamReport {
    pub src: SocketAddr,
    pub backend: String,
    /// Bytes sent, echoed and verified.
    pub bytes: u64,
    pub chunks: u64,
    pub broken: Option<Broken>,
}

/// A long-lived TCP connection through the VIP, writing chunks of a deterministic pattern (1 to
/// 4096 bytes) and verifying each echoed byte, until stopped or broken.
pub struct Stream {
    pub src: SocketAddr,
    /// Its backend, from the server's banner.
    pub backend: String,
    pub stop: Arc<AtomicBool>,
    verified: Arc<AtomicU64>,
    thread: Option<JoinHandle<StreamReport>>,
}

impl Stream {
    /// Opens the stream from `src` in `ns` to `dst`; `pause` between chunks.
    pub fn open(
        ns: &Netns,
        src: impl Into<SocketAddr>,
        dst: impl Into<SocketAddr>,
        pause: Duration,
    ) -> Stream {
        let (src, dst) = (src.into(), dst.into());
        let mut s = ns
            .run_in(move || connect(src, dst))
            .unwrap_or_else(|e| panic!("stream from {src}: {e}"));
        s.set_read_timeout(Some(STREAM_READ_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let backend = read_banner(&mut s).unwrap_or_else(|e| panic!("banner for {src}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let verified = Arc::new(AtomicU64::new(0));
        let seed = u64::from(src.port());
        let thread = {
            let (stop, verified, backend) = (stop.clone(), verified.clone(), backend.clone());
            std::thread::spawn(move || {
                let mut report = StreamReport {
                    src,
                    backend,
                    bytes: 0,
                    chunks: 0,
                    broken: None,
                };
                let mut out = Vec::with_capacity(4096);
                let mut back = vec![0u8; 4096];
                let mut off = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let len = 1
                        + (u64::from(pattern(seed, report.chunks)) * 16 + report.chunks % 16)
                            as usize;
                    out.clear();
                    out.extend((off..off + len as u64).map(|i| pattern(seed, i)));
                    let res = s
                        .write_all(&out)
                        .map_err(|e| (e, "write"))
                        .and_then(|()| s.read_exact(&mut back[..len]).map_err(|e| (e, "read")));
                    if let Err((e, op)) = res {
                        report.broken = Some(Broken {
                            kind: e.kind(),
                            what: format!("{op} at byte {off}: {e}"),
                            at: Instant::now(),
                        });
                        break;
                    }
                    if let Some(k) = (0..len).find(|&k| back[k] != out[k]) {
                        report.broken = Some(Broken {
                            kind: io::ErrorKind::InvalidData,
                            what: format!(
                                "byte {} corrupted: {:#04x}, expected {:#04x}",
                                off + k as u64,
                                back[k],
                                out[k]
                            ),
                            at: Instant::now(),
                        });
                        break;
                    }
                    off += len as u64;
                    report.bytes = off;
                    report.chunks += 1;
                    verified.store(off, Ordering::Relaxed);
                    if !pause.is_zero() {
                        std::thread::sleep(pause);
                    }
                }
                report
            })
        };
        Stream {
            src,
            backend,
            stop,
            verified,
            thread: Some(thread),
        }
    }

    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::Relaxed)
    }

    pub fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the stream (if it still runs) and returns what it did.
    pub fn finish(mut self) -> StreamReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("stream thread panicked")
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens a stream from each port of the topology's client address; `pause` between chunks.
pub fn open_streams(
    client: &Netns,
    ports: &[u16],
    dst: SocketAddrV4,
    pause: Duration,
) -> Vec<Stream> {
    open_streams_from(client, CLIENT_ADDR.into(), ports, dst.into(), pause)
}

/// Opens a stream from each port of `src_ip`; `pause` between chunks.
pub fn open_streams_from(
    client: &Netns,
    src_ip: IpAddr,
    ports: &[u16],
    dst: SocketAddr,
    pause: Duration,
) -> Vec<Stream> {
    ports
        .iter()
        .map(|&p| Stream::open(client, SocketAddr::new(src_ip, p), dst, pause))
        .collect()
}

/// Stops every stream; returns the reports and prints them.
pub fn finish_all(streams: Vec<Stream>) -> Vec<StreamReport> {
    for s in &streams {
        s.stop.store(true, Ordering::Relaxed);
    }
    let reports: Vec<StreamReport> = streams.into_iter().map(Stream::finish).collect();
    let total: u64 = reports.iter().map(|r| r.bytes).sum();
    let broken = reports.iter().filter(|r| r.broken.is_some()).count();
    let mut per_backend: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for r in &reports {
        let e = per_backend.entry(r.backend.as_str()).or_default();
        e.0 += 1;
        e.1 += r.bytes;
    }
    eprintln!(
        "{} streams, {broken} broken, {total} bytes echoed and verified; per backend \
         (streams, bytes): {per_backend:?}; fewest bytes in a stream: {}",
        reports.len(),
        reports.iter().map(|r| r.bytes).min().unwrap_or(0)
    );
    reports
}

/// Panics with every broken stream's story if any broke.
/// Panics unless every stream carried more than `min_bytes`: a stream that never got going
/// would pass [`assert_unbroken`] without proving anything.
pub fn assert_streams_moved(reports: &[StreamReport], min_bytes: u64) {
    let bytes: Vec<u64> = reports.iter().map(|r| r.bytes).collect();
    assert!(
        bytes.iter().all(|&b| b > min_bytes),
        "a stream barely moved (not over {min_bytes} bytes): bytes per stream {bytes:?}"
    );
}

pub fn assert_unbroken(reports: &[StreamReport], start: Instant) {
    let broken: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            r.broken.as_ref().map(|b| {
                format!(
                    "{} on {} after {} bytes, at +{:?}: {:?} {}",
                    r.src,
                    r.backend,
                    r.bytes,
                    b.at - start,
                    b.kind,
                    b.what
                )
            })
        })
        .collect();
    assert!(broken.is_empty(), "broken streams:\n{}", broken.join("\n"));
}
