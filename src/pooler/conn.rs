//! The connection table: one slab entry per socket in the epoll set; the slab
//! key is the epoll token.
use super::backend::Backend;
use super::client::Client;
use nix::sys::epoll::{Epoll, EpollEvent, EpollFlags};
use std::os::fd::{AsFd, OwnedFd};

pub enum Conn {
    Listener(OwnedFd),
    Client(Box<Client>),
    Backend(Box<Backend>),
    /// A replication client's walsender while it logs in (`dedicated.rs`).
    Dedicated(Box<super::dedicated::Dedicated>),
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

pub fn remove(epoll: &Epoll, fd: impl AsFd) {
    let _ = epoll.delete(fd);
}
