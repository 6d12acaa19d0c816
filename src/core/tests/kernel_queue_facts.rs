//! The kernel behaviour the kernel queue (`nextgres_core::kq`, BENCHMARKS.md
//! "Issue 15, thirteenth step") rests on, checked on the kernel that runs
//! the tests: if one of these stops holding, the queue would lose or
//! double-serve a client, so it fails here first.
#![cfg(target_os = "linux")]
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC).unwrap()
}

fn oneshot(data: u64) -> EpollEvent {
    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT, data)
}

fn ready(ep: &Epoll) -> Vec<u64> {
    let mut evs = [EpollEvent::empty(); 8];
    let n = ep.wait(&mut evs, EpollTimeout::ZERO).unwrap();
    evs[..n].iter().map(|e| e.data()).collect()
}

fn send(fd: &OwnedFd, b: &[u8]) {
    assert_eq!(nix::unistd::write(fd, b).unwrap(), b.len());
}

fn drain(fd: RawFd) {
    let mut buf = [0u8; 64];
    while nix::unistd::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
}

/// epoll keys a registration by (open file, descriptor number): another
/// number for the same socket cannot re-arm it, the same number can, even
/// after the original descriptor was closed and the number reused by a
/// duplicate (a backend holds a client's socket at the pooler's number).
#[test]
fn registrations_are_keyed_by_descriptor_number() {
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    let (a, b) = pair();
    ep.add(&a, oneshot(7)).unwrap();
    let other = nix::unistd::dup(a.as_raw_fd()).unwrap();
    // SAFETY: `other` is a new descriptor this test owns.
    let other = unsafe { OwnedFd::from_raw_fd(other) };
    assert_eq!(ep.modify(&other, &mut oneshot(7)), Err(nix::errno::Errno::ENOENT));
    let number = a.as_raw_fd();
    drop(a);
    nix::unistd::dup3(other.as_raw_fd(), number, nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    // SAFETY: dup3 just made `number` a descriptor of this test's.
    let again = unsafe { OwnedFd::from_raw_fd(number) };
    ep.modify(&again, &mut oneshot(7)).unwrap();
    send(&b, b"x");
    assert_eq!(ready(&ep), vec![7]);
}

/// One-shot: a readiness is reported once, then not until re-armed; bytes
/// that arrived while disarmed are reported as soon as it is re-armed (a
/// query sent between ReadyForQuery and the re-arm is not lost).
#[test]
fn rearming_reports_bytes_that_came_while_disarmed() {
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    let (a, b) = pair();
    ep.add(&a, oneshot(1)).unwrap();
    assert!(ready(&ep).is_empty());
    send(&b, b"q1");
    assert_eq!(ready(&ep), vec![1]);
    assert!(ready(&ep).is_empty(), "one-shot: disarmed after one report");
    drain(a.as_raw_fd());
    send(&b, b"q2");
    assert!(ready(&ep).is_empty(), "still disarmed");
    ep.modify(&a, &mut oneshot(1)).unwrap();
    assert_eq!(ready(&ep), vec![1], "re-armed with bytes waiting");
    // A hang-up is a readiness too (a queued client that leaves wakes a backend).
    drain(a.as_raw_fd());
    ep.modify(&a, &mut oneshot(1)).unwrap();
    drop(b);
    assert_eq!(ready(&ep), vec![1]);
}

/// One readiness of a one-shot registration reaches one of several
/// processes (here threads) waiting on the same instance, never two.
#[test]
fn one_readiness_reaches_one_waiter() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for _ in 0..10 {
        let ep = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap());
        let (a, b) = pair();
        ep.add(&a, oneshot(3)).unwrap();
        let got = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let (ep, got) = (ep.clone(), got.clone());
                std::thread::spawn(move || {
                    let mut evs = [EpollEvent::empty(); 4];
                    let n = ep.wait(&mut evs, EpollTimeout::from(300u16)).unwrap();
                    got.fetch_add(n, Ordering::SeqCst);
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(20));
        send(&b, b"x");
        for w in waiters {
            w.join().unwrap();
        }
        assert_eq!(got.load(Ordering::SeqCst), 1);
    }
}
