//! The table-digest side channel: the two nodes tell each other a digest of their forwarding
//! tables over UDP, so that `xdplb status` can say whether a flow would reach the same backend
//! after a failover. It is deliberately outside VRRP (keepalived and routers would not
//! understand it) and advisory: nothing changes state because of it, a mismatch is shown and
//! logged.
//!
//! Wire format, 20 bytes: magic `XDPLBSY1`, VRID, kind (1 request, 2 reply), flags (bit 0: a
//! digest follows), one reserved byte, the digest (u64, big endian). A backup asks the master
//! it hears every [`INTERVAL`]; the master answers with its own digest, so both learn the other.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::{info, warn};

use super::PeerTables;

pub const INTERVAL: Duration = Duration::from_secs(1);
/// Tables may differ for a moment (a health check fails on one node a little before the other);
/// only a difference that lasts this long is warned about.
pub const MISMATCH_WARN_AFTER: Duration = Duration::from_secs(5);
const MAGIC: &[u8; 8] = b"XDPLBSY1";
const LEN: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request,
    Reply,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub vrid: u8,
    pub kind: Kind,
    pub digest: Option<u64>,
}

impl Message {
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = self.vrid;
        b[9] = match self.kind {
            Kind::Request => 1,
            Kind::Reply => 2,
        };
        b[10] = u8::from(self.digest.is_some());
        b[12..].copy_from_slice(&self.digest.unwrap_or(0).to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Message> {
        if b.len() != LEN || &b[..8] != MAGIC {
            return None;
        }
        let kind = match b[9] {
            1 => Kind::Request,
            2 => Kind::Reply,
            _ => return None,
        };
        let digest = (b[10] & 1 == 1).then(|| u64::from_be_bytes(b[12..20].try_into().unwrap()));
        Some(Message {
            vrid: b[8],
            kind,
            digest,
        })
    }
}

pub struct Channel {
    sock: UdpSocket,
    port: u16,
}

impl Channel {
    pub fn open(interface: &str, source: Ipv4Addr, port: u16) -> io::Result<Channel> {
        let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        s.bind_device(Some(interface.as_bytes()))?;
        // The VIPs may be on this interface too; bind the node's own address so replies come
        // from where the peer sent its request.
        s.bind(&SocketAddr::V4(SocketAddrV4::new(source, port)).into())?;
        s.set_nonblocking(true)?;
        Ok(Channel {
            sock: UdpSocket::from_std(s.into())?,
            port,
        })
    }

    /// Best effort: a lost message is replaced by the next one a second later.
    pub fn send(&self, to: Ipv4Addr, vrid: u8, kind: Kind, digest: Option<u64>) {
        let msg = Message { vrid, kind, digest }.encode();
        let _ = self
            .sock
            .try_send_to(&msg, SocketAddr::V4(SocketAddrV4::new(to, self.port)));
    }

    pub async fn recv(&self, buf: &mut [u8]) -> Option<(Ipv4Addr, Message)> {
        loop {
            match self.sock.recv_from(buf).await {
                Ok((n, SocketAddr::V4(from))) => {
                    if let Some(m) = Message::decode(&buf[..n]) {
                        return Some((*from.ip(), m));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!("table-digest side channel: {e}");
                    tokio::time::sleep(INTERVAL).await;
                }
            }
        }
    }
}

/// What we know of the peer's tables.
#[derive(Debug)]
pub struct PeerState {
    peer: Ipv4Addr,
    digest: Option<u64>,
    heard_at: Instant,
    differs_since: Option<Instant>,
    warned: bool,
}

impl PeerState {
    pub fn new(peer: Ipv4Addr, now: Instant) -> PeerState {
        PeerState {
            peer,
            digest: None,
            heard_at: now,
            differs_since: None,
            warned: false,
        }
    }

    pub fn heard(&mut self, peer: Ipv4Addr, digest: Option<u64>, now: Instant) {
        if peer != self.peer {
            *self = PeerState::new(peer, now);
        }
        self.digest = digest;
        self.heard_at = now;
    }

    fn differs(&self, own: Option<u64>) -> Option<bool> {
        Some(own? != self.digest?)
    }

    /// Tracks how long the digests have differed and logs the start and end of a lasting
    /// difference.
    pub fn check(&mut self, own: Option<u64>, now: Instant) {
        match self.differs(own) {
            Some(true) => {
                let since = *self.differs_since.get_or_insert(now);
                if !self.warned && now.duration_since(since) >= MISMATCH_WARN_AFTER {
                    self.warned = true;
                    warn!(
                        peer = %self.peer,
                        "forwarding tables differ from peer {} for {:?} (digest {:016x} here, \
                         {:016x} there): after a failover some flows would move to another \
                         backend. Compare `xdplb status` on both nodes (configs, backend health)",
                        self.peer,
                        now.duration_since(since),
                        own.unwrap_or(0),
                        self.digest.unwrap_or(0)
                    );
                }
            }
            Some(false) => {
                if self.warned {
                    info!(peer = %self.peer, "forwarding tables match peer {} again", self.peer);
                }
                self.differs_since = None;
                self.warned = false;
            }
            None => {}
        }
    }

    pub fn status(&self, own: Option<u64>, now: Instant) -> Option<PeerTables> {
        let digest = self.digest?;
        let own = own?;
        Some(PeerTables {
            peer: self.peer,
            digest: format!("{digest:016x}"),
            own_digest: format!("{own:016x}"),
            matches: digest == own,
            age_ms: now.duration_since(self.heard_at).as_millis() as u64,
            differs_for_ms: self
                .differs_since
                .filter(|_| digest != own)
                .map(|t| now.duration_since(t).as_millis() as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_junk_is_ignored() {
        for m in [
            Message {
                vrid: 51,
                kind: Kind::Request,
                digest: Some(0x0123_4567_89ab_cdef),
            },
            Message {
                vrid: 1,
                kind: Kind::Reply,
                digest: None,
            },
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        let mut b = Message {
            vrid: 1,
            kind: Kind::Reply,
            digest: None,
        }
        .encode();
        assert_eq!(Message::decode(&b[..19]), None);
        b[9] = 3;
        assert_eq!(Message::decode(&b), None);
        b[0] = b'Y';
        assert_eq!(Message::decode(&b), None);
    }

    #[test]
    fn a_difference_is_reported_with_its_age() {
        let t0 = Instant::now();
        let peer = Ipv4Addr::new(10, 0, 0, 3);
        let mut p = PeerState::new(peer, t0);
        assert_eq!(p.status(Some(1), t0), None);
        p.heard(peer, Some(2), t0);
        p.check(Some(1), t0);
        let s = p.status(Some(1), t0 + Duration::from_secs(6)).unwrap();
        assert!(!s.matches);
        assert_eq!(s.differs_for_ms, Some(6000));
        p.check(Some(1), t0 + Duration::from_secs(6));
        assert!(p.warned);
        p.heard(peer, Some(1), t0 + Duration::from_secs(7));
        p.check(Some(1), t0 + Duration::from_secs(7));
        let s = p.status(Some(1), t0 + Duration::from_secs(8)).unwrap();
        assert!(s.matches);
        assert_eq!(s.differs_for_ms, None);
        assert_eq!(s.age_ms, 1000);
    }
}
