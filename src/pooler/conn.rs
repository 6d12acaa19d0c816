//! The connection table: one slab entry per socket in the epoll set; the slab
//! key is the epoll token.
use super::backend::Backend;
use super::client::Client;
use nextgres_core::proto::{self, ProtoError};
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsFd, OwnedFd};

pub enum Conn {
    Listener(OwnedFd),
    Client(Box<Client>),
    Backend(Box<Backend>),
    /// A replication client's walsender while it logs in (`dedicated.rs`).
    Dedicated(Box<super::dedicated::Dedicated>),
    /// A connection refused (max_client_conn, shutdown) whose first packet
    /// is read in case it is a CancelRequest (`refusing.rs`).
    Refusing(Box<super::refusing::Refusing>),
}

pub const READ: EpollFlags = EpollFlags::EPOLLIN;
/// Only hang-ups: for a client whose unread query must stay in the socket.
pub const HANGUP: EpollFlags = EpollFlags::EPOLLRDHUP;

pub fn add(epoll: &Epoll, fd: impl AsFd, key: usize, flags: EpollFlags) {
    if let Err(e) = epoll.add(fd, EpollEvent::new(flags, key as u64)) {
        log::warn!("epoll add: {e}");
    }
}

pub fn modify(epoll: &Epoll, fd: impl AsFd, key: usize, flags: EpollFlags) {
    let mut ev = EpollEvent::new(flags, key as u64);
    if let Err(e) = epoll.modify(fd, &mut ev) {
        log::warn!("epoll modify: {e}");
    }
}

/// Adds a client socket one-shot (see `Pooler::client_rearm`).
pub fn arm_add(epoll: &Epoll, fd: impl AsFd, key: usize, flags: EpollFlags) {
    add(epoll, fd, key, flags | EpollFlags::EPOLLONESHOT)
}

/// Re-arms a one-shot client registration with `flags`.
pub fn arm_modify(epoll: &Epoll, fd: impl AsFd, key: usize, flags: EpollFlags) {
    modify(epoll, fd, key, flags | EpollFlags::EPOLLONESHOT)
}

pub fn remove(epoll: &Epoll, fd: impl AsFd) {
    let _ = epoll.delete(fd);
}

/// Bytes the kernel has received on a client's TCP socket since it was
/// opened (`tcpi_bytes_received` of `getsockopt(TCP_INFO)`, Linux 4.1+).
/// None when unknown: not a TCP socket (a TLS client's relay socketpair) or
/// an older kernel.
pub fn tcp_bytes_received(fd: &impl std::os::fd::AsRawFd) -> Option<u64> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes; the kernel
    // writes at most `len` bytes and sets `len` to what it wrote.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + std::mem::size_of::<u64>();
    (rc == 0 && len as usize >= needed).then_some(info.tcpi_bytes_received)
}

/// `addr` as the kernel's `sockaddr_in` / `sockaddr_in6` bytes (what
/// getpeername()/getsockname() fill), for a backend's `MyProcPort`.
pub fn raw_sockaddr(addr: &std::net::SocketAddr) -> Vec<u8> {
    use nix::sys::socket::{SockaddrIn, SockaddrIn6, SockaddrLike};
    match *addr {
        std::net::SocketAddr::V4(a) => {
            let s = SockaddrIn::from(a);
            // SAFETY: `s` is a sockaddr_in of exactly that many bytes.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of::<libc::sockaddr_in>()) }.to_vec()
        }
        std::net::SocketAddr::V6(a) => {
            let s = SockaddrIn6::from(a);
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of::<libc::sockaddr_in6>()) }.to_vec()
        }
    }
}

/// Reads what a level-triggered socket (a backend's or a walsender login's
/// Unix socket) holds now onto `inbuf`. Returns true at EOF or a read error.
/// A short read ends it: the socket is empty, and whatever arrives later (or
/// the EOF) wakes the loop again, so reading on would only collect an EAGAIN
/// (one recvfrom per handoff).
pub fn fill_inbuf(stream: &mut impl Read, inbuf: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                inbuf.extend_from_slice(&buf[..n]);
                if n < buf.len() {
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Takes the next complete protocol message (tag, body) off the front of
/// `inbuf`; None until one is complete. A length below 4 or above `max_len`
/// bytes is a protocol violation (08P01).
pub fn next_message(inbuf: &mut Vec<u8>, max_len: usize) -> Result<Option<(u8, Vec<u8>)>, ProtoError> {
    let Some((m, used)) = proto::parse_message(inbuf, max_len)? else { return Ok(None) };
    let r = (m.tag, m.body.to_vec());
    inbuf.drain(..used);
    Ok(Some(r))
}
