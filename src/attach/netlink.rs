//! A minimal generic netlink client for the kernel's `nbd` family
//! (linux/nbd-netlink.h): CONNECT, RECONFIGURE, DISCONNECT.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const NETLINK_GENERIC: libc::c_int = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Netlink attributes, native-endian, each padded to 4 bytes.
#[derive(Default)]
struct Attrs(Vec<u8>);

impl Attrs {
    fn put(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&ty.to_ne_bytes());
        self.0.extend_from_slice(payload);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes())
    }
    fn nest(&mut self, ty: u16, inner: &Attrs) -> &mut Self {
        self.put(ty | NLA_F_NESTED, &inner.0)
    }
}

/// Iterate `(type, payload)` over a buffer of attributes.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & !NLA_F_NESTED;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

/// Why the nbd netlink family cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The generic netlink controller does not know the `nbd` family here.
    #[error("the kernel's nbd netlink family is not reachable")]
    FamilyMissing,
    #[error("generic netlink: {0}")]
    Io(io::Error),
}

pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Open a generic netlink socket and look up the `nbd` family. The
    /// family is missing when the nbd driver is not loaded, and, before
    /// Linux 6.4, from every network namespace but the host's.
    pub fn open() -> Result<Self, OpenError> {
        Self::open_socket().map_err(OpenError::Io)?.lookup_family()
    }

    fn open_socket() -> io::Result<Self> {
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_GENERIC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh, valid descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr lives across the call and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let tv = libc::timeval { tv_sec: 10, tv_usec: 0 };
        // SAFETY: tv lives across the call and its size is passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd, family: 0, seq: 0 })
    }

    fn lookup_family(mut self) -> Result<Self, OpenError> {
        let mut a = Attrs::default();
        a.put(CTRL_ATTR_FAMILY_NAME, b"nbd\0");
        let replies = match self.request(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, &a) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(OpenError::FamilyMissing),
            Err(e) => return Err(OpenError::Io(e)),
        };
        self.family = replies
            .iter()
            .flat_map(|r| attrs(r.get(4..).unwrap_or_default()))
            .find(|(t, p)| *t == CTRL_ATTR_FAMILY_ID && p.len() >= 2)
            .map(|(_, p)| u16::from_ne_bytes([p[0], p[1]]))
            .ok_or(OpenError::FamilyMissing)?;
        Ok(self)
    }

    /// Send one request and wait for its acknowledgement; returns the
    /// payloads (genl header onwards) of any data replies.
    fn request(&mut self, ty: u16, cmd: u8, version: u8, a: &Attrs) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let seq = self.seq;
        let len = 16 + 4 + a.0.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&[cmd, version, 0, 0]);
        msg.extend_from_slice(&a.0);
        // SAFETY: msg is a valid buffer of msg.len() bytes.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr() as *const libc::c_void, msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: buf is a valid writable buffer of buf.len() bytes.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut rest = &buf[..n as usize];
            while rest.len() >= 16 {
                let mlen = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if mlen < 16 || mlen > rest.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let mtype = u16::from_ne_bytes([rest[4], rest[5]]);
                let mseq = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
                let payload = &rest[16..mlen];
                rest = &rest[mlen.next_multiple_of(4).min(rest.len())..];
                if mseq != seq {
                    continue;
                }
                if mtype == NLMSG_ERROR {
                    let code = payload.get(..4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]])).unwrap_or(-1);
                    if code == 0 {
                        return Ok(out);
                    }
                    return Err(io::Error::from_raw_os_error(-code));
                }
                out.push(payload.to_vec());
            }
        }
    }

    /// Attach device `index` to a connected, handshaken socket.
    pub fn connect(
        &mut self,
        index: u32,
        sock: RawFd,
        size: u64,
        block_size: u64,
        server_flags: u64,
        dead_conn_timeout_secs: u64,
    ) -> io::Result<()> {
        let mut item = Attrs::default();
        item.u32(NBD_SOCK_FD, sock as u32);
        let mut socks = Attrs::default();
        socks.nest(NBD_SOCK_ITEM, &item);
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index)
            .u64(NBD_ATTR_SIZE_BYTES, size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
            .u64(NBD_ATTR_SERVER_FLAGS, server_flags)
            .u64(NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout_secs)
            .nest(NBD_ATTR_SOCKETS, &socks);
        self.request(self.family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &a).map(|_| ())
    }

    /// Replace a dead connection and/or change the size of device `index`.
    pub fn reconfigure(&mut self, index: u32, sock: Option<RawFd>, size: Option<u64>) -> io::Result<()> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index);
        if let Some(size) = size {
            a.u64(NBD_ATTR_SIZE_BYTES, size);
        }
        if let Some(sock) = sock {
            let mut item = Attrs::default();
            item.u32(NBD_SOCK_FD, sock as u32);
            let mut socks = Attrs::default();
            socks.nest(NBD_SOCK_ITEM, &item);
            a.nest(NBD_ATTR_SOCKETS, &socks);
        }
        self.request(self.family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &a).map(|_| ())
    }

    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, index);
        self.request(self.family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &a).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_parse_back() {
        let mut inner = Attrs::default();
        inner.u32(NBD_SOCK_FD, 7);
        let mut a = Attrs::default();
        a.u32(NBD_ATTR_INDEX, 3).put(99, b"abcde").nest(NBD_ATTR_SOCKETS, &inner);
        assert_eq!(a.0.len() % 4, 0);
        let parsed: Vec<(u16, Vec<u8>)> = attrs(&a.0).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(parsed[0], (NBD_ATTR_INDEX, 3u32.to_ne_bytes().to_vec()));
        assert_eq!(parsed[1], (99, b"abcde".to_vec()));
        assert_eq!(parsed[2].0, NBD_ATTR_SOCKETS);
        let nested: Vec<(u16, Vec<u8>)> = attrs(&parsed[2].1).map(|(t, p)| (t, p.to_vec())).collect();
        assert_eq!(nested, vec![(NBD_SOCK_FD, 7u32.to_ne_bytes().to_vec())]);
        // Truncated input ends the iteration instead of panicking.
        assert_eq!(attrs(&a.0[..6]).count(), 0);
    }
}
