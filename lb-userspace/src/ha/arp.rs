//! Gratuitous ARP and the VRRP virtual MAC.
//!
//! A new master announces each VIP with gratuitous ARP so that hosts and switches on the segment
//! move the address (and the MAC's switch port) to it at once instead of when their neighbour
//! entries expire. [`GarpSender`] writes the frames straight to the interface with an
//! `AF_PACKET` socket: the kernel's own ARP code only answers, it never announces on demand.
//!
//! Guaranteed: every [`GarpSender::send`] hands exactly one [`garp_frame`] to the interface's
//! queue or returns the error. Not guaranteed: that it reaches anyone (that is why VRRP sends a
//! burst and repeats it), nor that receivers accept it (Linux updates an existing entry for the
//! address; whether it creates one depends on `arp_accept`).

use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// Length of a gratuitous ARP frame: Ethernet header (14) + ARP for IPv4 over Ethernet (28).
/// Shorter than Ethernet's 60-byte minimum; the NIC pads it.
pub const GARP_LEN: usize = 42;

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const ARPHRD_ETHER: u16 = 1;
const ARPOP_REQUEST: u16 = 1;
const BROADCAST: [u8; 6] = [0xff; 6];

/// The VRRP virtual router MAC for `vrid`, `00:00:5e:00:01:{vrid}` (RFC 5798 section 7.3).
pub fn virtual_mac(vrid: u8) -> [u8; 6] {
    [0x00, 0x00, 0x5e, 0x00, 0x01, vrid]
}

/// A gratuitous ARP announcing that `addr` is at `src_mac`.
///
/// It is the form keepalived sends: a broadcast ARP *request* whose sender and target protocol
/// addresses are both `addr` and whose target hardware address is zero. A request rather than a
/// reply because some hosts ignore unsolicited replies, and Linux treats a request with sender
/// equal to target as gratuitous (`arp_is_garp`) and overrides its existing entry even inside
/// `locktime`.
pub fn garp_frame(src_mac: [u8; 6], addr: Ipv4Addr) -> [u8; GARP_LEN] {
    let ip = addr.octets();
    let mut f = [0u8; GARP_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&ARPHRD_ETHER.to_be_bytes());
    f[16..18].copy_from_slice(&ETH_P_IP.to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&ARPOP_REQUEST.to_be_bytes());
    f[22..28].copy_from_slice(&src_mac);
    f[28..32].copy_from_slice(&ip);
    // f[32..38], the target hardware address, stays zero: unknown, as in any request.
    f[38..42].copy_from_slice(&ip);
    f
}

/// Sends gratuitous ARPs out of one interface.
#[derive(Debug)]
pub struct GarpSender {
    fd: OwnedFd,
    ifindex: u32,
    src_mac: [u8; 6],
}

impl GarpSender {
    /// Opens an `AF_PACKET` socket bound to `ifindex` (needs `CAP_NET_RAW`). The socket lives in
    /// the caller's network namespace. `src_mac` is the interface's MAC, or the VRRP virtual MAC
    /// when one is in use.
    pub fn new(ifindex: u32, src_mac: [u8; 6]) -> io::Result<GarpSender> {
        let context = |e: io::Error, what: &str| {
            io::Error::new(
                e.kind(),
                format!("gratuitous ARP socket for ifindex {ifindex}: {what}: {e}"),
            )
        };
        let ifindex_c = i32::try_from(ifindex).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ifindex {ifindex} out of range"),
            )
        })?;
        // Protocol 0: the socket only sends. With ETH_P_ARP the kernel would also queue every ARP
        // frame seen on the interface to it, and nobody reads them.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if raw < 0 {
            return Err(context(io::Error::last_os_error(), "socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut sll = sockaddr_ll(ifindex_c, 0);
        sll.sll_halen = 0;
        // SAFETY: `sll` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast::<libc::sockaddr>(),
                sockaddr_ll_len(),
            )
        };
        if rc != 0 {
            return Err(context(io::Error::last_os_error(), "bind"));
        }
        Ok(GarpSender {
            fd,
            ifindex,
            src_mac,
        })
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn src_mac(&self) -> [u8; 6] {
        self.src_mac
    }

    /// Sends one gratuitous ARP for `addr`. Never blocks: a full device queue is
    /// `ErrorKind::WouldBlock`, an interface that is down is `ENETDOWN`.
    pub fn send(&self, addr: Ipv4Addr) -> io::Result<()> {
        let frame = garp_frame(self.src_mac, addr);
        // The destination gives the frame its protocol (skb->protocol); a socket bound with
        // protocol 0 has none of its own.
        let sll = sockaddr_ll(self.ifindex as i32, ETH_P_ARP);
        // SAFETY: `frame` and `sll` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const sll).cast::<libc::sockaddr>(),
                sockaddr_ll_len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("gratuitous ARP for {addr} on ifindex {}: {e}", self.ifindex),
            ));
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!(
                "gratuitous ARP for {addr} on ifindex {}: sent {n} of {} bytes",
                self.ifindex,
                frame.len()
            )));
        }
        Ok(())
    }
}

fn sockaddr_ll(ifindex: i32, protocol: u16) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&BROADCAST);
    sll
}

fn sockaddr_ll_len() -> libc::socklen_t {
    size_of::<libc::sockaddr_ll>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_mac_is_the_iana_vrrp_block() {
        assert_eq!(virtual_mac(1), [0x00, 0x00, 0x5e, 0x00, 0x01, 0x01]);
        assert_eq!(virtual_mac(51), [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33]);
        assert_eq!(virtual_mac(255), [0x00, 0x00, 0x5e, 0x00, 0x01, 0xff]);
    }

    #[test]
    fn garp_frame_fields() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = garp_frame(mac, Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(f.len(), 42);
        assert_eq!(f[0..6], [0xff; 6], "Ethernet destination: broadcast");
        assert_eq!(f[6..12], mac, "Ethernet source");
        assert_eq!(f[12..14], [0x08, 0x06], "EtherType ARP");
        assert_eq!(f[14..16], [0x00, 0x01], "hardware type Ethernet");
        assert_eq!(f[16..18], [0x08, 0x00], "protocol type IPv4");
        assert_eq!(f[18], 6, "hardware address length");
        assert_eq!(f[19], 4, "protocol address length");
        assert_eq!(f[20..22], [0x00, 0x01], "operation: request");
        assert_eq!(f[22..28], mac, "sender hardware address");
        assert_eq!(f[28..32], [10, 0, 0, 100], "sender protocol address");
        assert_eq!(f[32..38], [0; 6], "target hardware address");
        assert_eq!(f[38..42], [10, 0, 0, 100], "target protocol address");
    }

    #[test]
    fn garp_frame_with_the_virtual_mac() {
        let f = garp_frame(virtual_mac(7), Ipv4Addr::new(192, 168, 1, 1));
        assert_eq!(
            f,
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // broadcast
                0x00, 0x00, 0x5e, 0x00, 0x01, 0x07, // virtual MAC
                0x08, 0x06, // ARP
                0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, // Ethernet/IPv4 request
                0x00, 0x00, 0x5e, 0x00, 0x01, 0x07, 192, 168, 1, 1, // sender
                0, 0, 0, 0, 0, 0, 192, 168, 1, 1, // target
            ]
        );
    }
}
