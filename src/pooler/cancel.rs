//! CancelRequest (protocol section 53.2.7, "Canceling Requests in
//! Progress"): each pooled client has a cancel key of the pooler's, routed
//! to the backend serving the client at that moment, answered by the
//! pooler for a query still waiting for a backend, or passed on to the
//! server for a key the pooler did not issue (a replication client's
//! walsender).
use super::client::Phase;
use super::worker::Pooler;
use crate::shmem::ClientState;
use nextgres_core::proto::{self, ErrorFields};
use nix::sys::epoll::EpollFlags;
use std::os::fd::AsRawFd;

/// The most a cancelled waiting client's queued bytes are read to find its
/// query cycle (the largest control message a client's state may take).
const MAX_CANCEL_PEEK: usize = 64 << 20;

impl Pooler {
    /// CancelRequest: a pooled client's key (the pooler's own pid and key)
    /// cancels the query of the backend it is attached to right now (SIGINT,
    /// as the postmaster sends, and the client's id in that backend's row
    /// for a query it has not started yet: `shmem::cancel`). Any other key may be a replication client's
    /// walsender (it got the walsender's own BackendKeyData): the request
    /// goes on as it came to the server's Unix socket, where the postmaster
    /// checks pid and key against its live backends itself (so a pid reused
    /// since is never signalled with a stale key).
    pub fn cancel_request(&mut self, pid: i32, secret: &[u8]) {
        if let Some(&ck) = self.cancel_keys.get(&pid) {
            if let Some(c) = self.client(ck) {
                // Constant time, as the server compares keys (timingsafe_bcmp in 18).
                if c.cancel.as_ref().is_some_and(|(p, k)| *p == pid && nextgres_core::auth::ct::ct_eq(k, secret)) {
                    if let Phase::Attached { backend } = c.phase {
                        let id = c.id;
                        // Posted first (`shmem::cancel`): a backend that has
                        // not started the client's query yet (switching to
                        // it, reading it) would drop the signal; it takes
                        // the cancel at the query's first statement.
                        let row = self.backend(backend).map(|b| b.row);
                        if let Some(row) = row {
                            crate::shmem::cancel_post(row, id);
                        }
                        // As kill_client: read what the backend already
                        // sent (a RELEASED in flight: the client's
                        // transaction is over and the backend may serve the
                        // next client), then take back what was sent ahead
                        // to it. One it claimed or refused means it is past
                        // this client's transaction (it claims at its
                        // ReadyForQuery): the SIGINT would cancel another
                        // client's query, so the cancel is dropped, as one
                        // arriving after the query ended is on a direct
                        // connection. Taken back, nothing can be claimed
                        // while the signal is on its way.
                        self.backend_event(backend, EpollFlags::empty());
                        let still = self.client(ck).is_some_and(|c| c.id == id && matches!(c.phase, Phase::Attached { backend: b } if b == backend));
                        if still && self.backend_recall_ahead(backend).is_empty() {
                            if let Some(b) = self.backend(backend) {
                                super::backend::signal_backend(b.pid, nix::sys::signal::Signal::SIGINT);
                            }
                        } else if let Some(row) = row {
                            // Past the client's transaction: the cancel is void.
                            crate::shmem::cancel_withdraw(row, id);
                        }
                    } else if matches!(c.phase, Phase::Waiting { .. } | Phase::Ahead { .. } | Phase::Idle) {
                        // Idle: the pooler's, with a query it has not read
                        // yet (just given back by a queue's backend, say),
                        // or truly idle (then the cancel does nothing).
                        self.cancel_queued(ck);
                    } else if matches!(c.phase, Phase::Queued { .. }) {
                        self.kq_cancel(ck);
                    }
                    return;
                }
            }
        }
        self.forward_cancel(pid, secret);
    }

    /// A cancelled query that waits for a backend: on a direct connection
    /// it would be running and fail with 57014, so it is answered so here
    /// (ErrorResponse, ReadyForQuery 'I': a waiting client is between
    /// transactions) and its messages, up to the Sync or Query that ends
    /// them, are read off the socket so no backend runs them. A client
    /// sent ahead is taken back first; one its backend claimed is that
    /// backend's (its RELEASED unread, the backend may still be at the
    /// previous client's boundary): the cancel goes to it
    /// (`cancel_claimed`). The cancel is dropped for one whose
    /// messages are not all there yet (or exceed MAX_CANCEL_PEEK) or are no
    /// plain query cycle (`proto::frame::query_cycle_len`), with a LOG line.
    pub(super) fn cancel_queued(&mut self, ck: usize) {
        let ahead_of = self.client(ck).and_then(|c| match c.phase {
            Phase::Ahead { backend, .. } => Some(backend),
            _ => None,
        });
        if !self.client_recall(ck) {
            return match ahead_of {
                Some(bk) => self.cancel_claimed(ck, bk),
                None => log::info!("cancel request for a client its backend has just taken: dropped"),
            };
        }
        let Some(c) = self.client(ck) else { return };
        let idle = matches!(c.phase, Phase::Idle);
        if !idle && !matches!(c.phase, Phase::Waiting { .. }) {
            return;
        }
        // An idle client's bytes are looked at only while the pooler has
        // read none of them and they are the client's own (a parked TLS
        // client's socket carries TLS records).
        if idle && (!c.inbuf.is_empty() || c.tls.is_some()) {
            return;
        }
        // A dedicated-mode client waiting for its own login: that login
        // goes on for it; its query runs there (the cancel is dropped).
        if c.pool.and_then(|p| self.pools.get(p)).is_some_and(|p| p.session_waiting.contains(&ck)) {
            return log::info!("cancel request for a client waiting for its own backend's login: dropped");
        }
        let Some(c) = self.client(ck) else { return };
        use nix::sys::socket::{recv, MsgFlags};
        let fd = c.stream.as_raw_fd();
        // As much as the socket holds (a query or a Bind parameter of
        // megabytes is all there once sent), at least 64 KiB, at most
        // MAX_CANCEL_PEEK.
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD writes the receive queue's byte count to an int.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } != 0 {
            queued = 0;
        }
        let mut buf = vec![0u8; (queued.max(0) as usize).clamp(64 * 1024, MAX_CANCEL_PEEK)];
        let peeked = recv(fd, &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).unwrap_or(0);
        if idle && peeked == 0 {
            return; // between queries: nothing to cancel, as directly
        }
        let Some(len) = nextgres_core::proto::frame::query_cycle_len(&buf[..peeked]) else {
            return log::info!("cancel request for a waiting client whose query is not all received, or is no plain query cycle (a Close, a Flush, COPY data): dropped");
        };
        // Read exactly that cycle (it is all buffered: a non-blocking read
        // of it returns it whole; a short one ends the client).
        let mut got = 0;
        while got < len {
            match recv(fd, &mut buf[got..len], MsgFlags::MSG_DONTWAIT) {
                Ok(0) | Err(_) => return self.client_close(ck),
                Ok(n) => got += n,
            }
        }
        let mut out = Vec::new();
        proto::error_response(
            &mut out,
            &ErrorFields {
                severity: "ERROR".into(),
                sqlstate: "57014".into(),
                message: "canceling statement due to user request".into(),
                detail: None,
                hint: None,
            },
        );
        proto::ready_for_query(&mut out, b'I');
        c.send(&out);
        if c.out_pending() {
            // Its socket is full (it reads nothing): the answer could not
            // precede what a backend would write next, so the connection
            // ends instead of mixing the two.
            log::info!("cancel request for a waiting client that reads nothing: its connection is closed");
            return self.client_close(ck);
        }
        // Queries pipelined after it still wait, in their place; EOF after
        // it: the client has gone (a half-close would send no further edge).
        let mut one = [0u8; 1];
        match recv(fd, &mut one, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
            Ok(n) if n > 0 => return self.client_rearm(ck),
            Ok(_) => return self.client_close(ck),
            Err(_) => {}
        }
        let pool = c.pool;
        c.phase = Phase::Idle;
        if let Some(p) = pool.and_then(|p| self.pools.get_mut(p)) {
            p.waiting.retain(|&k| k != ck);
        }
        self.client_set_state(ck, ClientState::Idle, 0);
        self.client_rearm(ck);
        if let Some(p) = pool {
            self.sync_pool(p);
        }
    }

    /// A cancelled client sent ahead that backend `bk` has claimed: it is at
    /// the previous client's boundary, or on this client's query already.
    /// The cancel is posted for the client's first statement there
    /// (`shmem::cancel`) and signalled, unless reading the backend's
    /// messages shows the client's transaction over (then it is void, as a
    /// cancel after the query ended is on a direct connection).
    fn cancel_claimed(&mut self, ck: usize, bk: usize) {
        let Some(id) = self.client(ck).map(|c| c.id) else { return };
        let Some((row, ticket)) = self.backend(bk).and_then(|b| b.ahead.iter().find(|a| a.client == ck).map(|a| (b.row, a.ticket))) else {
            return;
        };
        crate::shmem::cancel_post(row, id);
        // Refused there (it could not take the socket): it goes back in
        // line and never runs on that backend.
        let refused = crate::shmem::ahead_refused(row, ticket);
        self.backend_event(bk, EpollFlags::empty());
        let still = !refused
            && self.client(ck).is_some_and(|c| {
                c.id == id && matches!(c.phase, Phase::Ahead { backend: b, .. } | Phase::Attached { backend: b } if b == bk)
            });
        // As for an attached client: whatever else was sent ahead is taken
        // back, so the backend cannot be on to another client's query by the
        // time the signal lands; one it claimed after this one means it is
        // past this client's transaction.
        let past = still && self.backend_recall_ahead(bk).iter().any(|&k| k != ck);
        match self.backend(bk).map(|b| b.pid) {
            Some(pid) if still && !past && pid > 0 => super::backend::signal_backend(pid, nix::sys::signal::Signal::SIGINT),
            _ => crate::shmem::cancel_withdraw(row, id),
        }
    }

    /// Sends a CancelRequest (pid and key as the client sent them, 4 or up
    /// to 256 bytes of key) to the server's Unix socket; the postmaster
    /// answers nothing and closes. Never blocks the event loop: a
    /// non-blocking socket; a full listen queue or socket buffer drops the
    /// request (as a lost cancel packet would be), with a LOG line.
    fn forward_cancel(&self, pid: i32, secret: &[u8]) {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let mut pkt = Vec::with_capacity(12 + secret.len());
        pkt.extend_from_slice(&((12 + secret.len()) as i32).to_be_bytes());
        pkt.extend_from_slice(&proto::CANCEL_REQUEST_CODE.to_be_bytes());
        pkt.extend_from_slice(&pid.to_be_bytes());
        pkt.extend_from_slice(secret);
        let sent = (|| -> nix::Result<usize> {
            let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
            connect(fd.as_raw_fd(), &UnixAddr::new(&self.server_socket)?)?;
            nix::unistd::write(&fd, &pkt)
        })();
        if !matches!(sent, Ok(n) if n == pkt.len()) {
            log::info!("could not pass a cancel request to {}: {sent:?}", self.server_socket.display());
        }
    }

    /// Hands out a cancel pid unique among connected clients and a random
    /// key of `key_len` bytes (4, or the server's long key for protocol 3.2).
    pub fn new_cancel_key(&mut self, key: usize, key_len: usize) -> (i32, Vec<u8>) {
        let mut pid = self.next_cancel_pid;
        while self.cancel_keys.contains_key(&pid) {
            pid = if pid >= i32::MAX - 1 { 1 } else { pid + 1 };
        }
        self.next_cancel_pid = if pid >= i32::MAX - 1 { 1 } else { pid + 1 };
        let mut k = vec![0u8; key_len];
        crate::pg::shmem::strong_random(&mut k);
        self.cancel_keys.insert(pid, key);
        (pid, k)
    }
}
