//! Descriptor facts of the kernel queue that the pooler (`pooler::kq`) and
//! pooled backends (`backend::kq`) must agree on: both sides register and
//! re-arm the same epoll entries, so they use one set of flags.

use nix::sys::epoll::EpollFlags;
use std::os::fd::RawFd;

/// A queued client's registration: readable or hung up, reported once
/// (one-shot), so exactly one backend wakes for it until it is re-armed.
pub fn ready_flags() -> EpollFlags {
    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT
}

/// Is descriptor number `fd` free in this process (`F_GETFD` fails with
/// EBADF)? The fixed numbers must be free before `dup3` claims them.
pub fn fd_free(fd: RawFd) -> bool {
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF)
}
