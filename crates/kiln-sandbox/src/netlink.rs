//! A minimal rtnetlink client (links, addresses, routes) so that per-sandbox network setup is a
//! handful of syscalls instead of several `ip` processes on the create path.
//!
//! Each [`Netlink`] socket works in the network namespace that was current for the calling
//! thread when it was opened.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_PROTINFO: u16 = 12;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const IFLA_BRPORT_ISOLATED: u16 = 33;
const NLA_F_NESTED: u16 = 0x8000;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;

const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const IFF_UP: u32 = 0x1;
const AF_UNSPEC: u8 = 0;
const AF_BRIDGE: u8 = 7;
const AF_INET: u8 = 2;

/// A netlink message under construction.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(typ: u16, flags: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // len, patched in finish()
        buf.extend_from_slice(&typ.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // seq, set by the socket
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
        Msg { buf }
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self
    }

    fn ifinfo(&mut self, family: u8, index: i32, flags: u32, change: u32) -> &mut Self {
        self.raw(&ifinfo_bytes(family, index, flags, change))
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, typ: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&typ.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn attr_str(&mut self, typ: u16, s: &str) -> &mut Self {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(typ, &d)
    }

    fn attr_u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_ne_bytes())
    }

    /// Starts a nested attribute (`NLA_F_NESTED` is set by the caller where the kernel wants it).
    fn begin(&mut self, typ: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&typ.to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

fn ifinfo_bytes(family: u8, index: i32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = family;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// An rtnetlink socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's current network namespace.
    pub fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: sa is a valid sockaddr_nl of the given length.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Netlink { fd, seq: 0 })
    }

    fn send(&mut self, msg: Msg) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: sockaddr_nl is plain data; zeroed = the kernel (port id 0).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: bytes is a valid buffer for its length; `to` a valid sockaddr_nl.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                &to as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(seq)
    }

    /// Receives until the answer to `seq`: an ack (`Ok(None)`), an error, or a data message
    /// (`Ok(Some(payload))`, payload without the netlink header).
    fn recv(&mut self, seq: u32) -> io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buf is a valid writable buffer for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let data = &buf[..n as usize];
            let mut off = 0;
            while off + NLMSG_HDRLEN <= data.len() {
                let len =
                    u32::from_ne_bytes(data[off..off + 4].try_into().unwrap_or_default()) as usize;
                let typ = u16::from_ne_bytes(data[off + 4..off + 6].try_into().unwrap_or_default());
                let mseq =
                    u32::from_ne_bytes(data[off + 8..off + 12].try_into().unwrap_or_default());
                if len < NLMSG_HDRLEN || off + len > data.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "truncated netlink message",
                    ));
                }
                let payload = &data[off + NLMSG_HDRLEN..off + len];
                off += (len + 3) & !3;
                if mseq != seq {
                    continue;
                }
                match typ {
                    NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or_default()))
                            .unwrap_or(0);
                        return if code == 0 {
                            Ok(None)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    NLMSG_DONE => return Ok(None),
                    _ => return Ok(Some(payload.to_vec())),
                }
            }
        }
    }

    fn request(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.send(msg)?;
        self.recv(seq).map(|_| ())
    }

    /// Index of link `name`.
    pub fn link_index(&mut self, name: &str) -> io::Result<i32> {
        let mut m = Msg::new(RTM_GETLINK, 0);
        m.ifinfo(AF_UNSPEC, 0, 0, 0).attr_str(IFLA_IFNAME, name);
        let seq = self.send(m)?;
        match self.recv(seq)? {
            Some(p) if p.len() >= 16 => {
                Ok(i32::from_ne_bytes(p[4..8].try_into().unwrap_or_default()))
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no link in RTM_GETLINK answer",
            )),
        }
    }

    /// Sets link `index` up.
    pub fn link_up(&mut self, index: i32) -> io::Result<()> {
        let mut m = Msg::new(RTM_SETLINK, NLM_F_ACK);
        m.ifinfo(AF_UNSPEC, index, IFF_UP, IFF_UP);
        self.request(m)
    }

    /// Creates a veth pair: `host_name` here (up, enslaved to `master`), `peer_name` (down, with
    /// MAC `peer_mac`) inside the namespace `peer_netns_fd`.
    pub fn create_veth(
        &mut self,
        host_name: &str,
        master: i32,
        peer_name: &str,
        peer_mac: [u8; 6],
        peer_netns_fd: RawFd,
    ) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        m.ifinfo(AF_UNSPEC, 0, IFF_UP, IFF_UP)
            .attr_str(IFLA_IFNAME, host_name)
            .attr_u32(IFLA_MASTER, master as u32);
        let li = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.begin(IFLA_INFO_DATA);
        let peer = m.begin(VETH_INFO_PEER);
        m.raw(&ifinfo_bytes(AF_UNSPEC, 0, 0, 0));
        m.attr_str(IFLA_IFNAME, peer_name)
            .attr(IFLA_ADDRESS, &peer_mac)
            .attr_u32(IFLA_NET_NS_FD, peer_netns_fd as u32);
        m.end(peer);
        m.end(data);
        m.end(li);
        self.request(m)
    }

    /// Marks bridge port `index` isolated: isolated ports cannot talk to each other, only to
    /// the bridge (the host) and non-isolated ports.
    pub fn set_port_isolated(&mut self, index: i32) -> io::Result<()> {
        let mut m = Msg::new(RTM_SETLINK, NLM_F_ACK);
        m.ifinfo(AF_BRIDGE, index, 0, 0);
        // br_setlink only parses IFLA_PROTINFO as nested when NLA_F_NESTED is set.
        let p = m.begin(IFLA_PROTINFO | NLA_F_NESTED);
        m.attr(IFLA_BRPORT_ISOLATED, &[1]);
        m.end(p);
        self.request(m)
    }

    /// Deletes link `name`.
    pub fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut m = Msg::new(RTM_DELLINK, NLM_F_ACK);
        m.ifinfo(AF_UNSPEC, 0, 0, 0).attr_str(IFLA_IFNAME, name);
        self.request(m)
    }

    /// Adds `addr/prefix` to link `index`.
    pub fn add_address(&mut self, index: i32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let mut ifa = [0u8; 8];
        ifa[0] = AF_INET;
        ifa[1] = prefix;
        ifa[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
        let bcast = Ipv4Addr::from(u32::from(addr) | (u32::MAX >> prefix));
        m.raw(&ifa)
            .attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets())
            .attr(IFA_BROADCAST, &bcast.octets());
        self.request(m)
    }

    /// Adds a default route via `gateway` on link `index`.
    pub fn add_default_route(&mut self, index: i32, gateway: Ipv4Addr) -> io::Result<()> {
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        let rt = [
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
            0,
            0,
            0,
            0,
        ];
        m.raw(&rt)
            .attr(RTA_GATEWAY, &gateway.octets())
            .attr_u32(RTA_OIF, index as u32);
        self.request(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_layout() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_ACK);
        m.ifinfo(AF_UNSPEC, 7, IFF_UP, IFF_UP)
            .attr_str(IFLA_IFNAME, "eth0");
        let at = m.begin(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        m.end(at);
        let b = m.finish(9);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap_or_default()) as usize,
            b.len()
        );
        assert_eq!(
            u16::from_ne_bytes(b[4..6].try_into().unwrap_or_default()),
            RTM_NEWLINK
        );
        assert_eq!(
            u16::from_ne_bytes(b[6..8].try_into().unwrap_or_default()),
            NLM_F_ACK | NLM_F_REQUEST
        );
        assert_eq!(
            u32::from_ne_bytes(b[8..12].try_into().unwrap_or_default()),
            9
        );
        // ifinfomsg index
        assert_eq!(
            i32::from_ne_bytes(b[20..24].try_into().unwrap_or_default()),
            7
        );
        // IFLA_IFNAME "eth0\0" -> len 9, padded to 12
        assert_eq!(
            u16::from_ne_bytes(b[32..34].try_into().unwrap_or_default()),
            9
        );
        assert_eq!(&b[36..41], b"eth0\0");
        // nested linkinfo starts at 44: len = 4 + (4 + 5 -> 12) = 16
        assert_eq!(
            u16::from_ne_bytes(b[44..46].try_into().unwrap_or_default()),
            16
        );
        assert_eq!(
            u16::from_ne_bytes(b[46..48].try_into().unwrap_or_default()),
            IFLA_LINKINFO
        );
    }
}
