//! Accepting clients on the pooler's listen sockets.
use super::client::Client;
use super::conn::{self, Conn};
use super::worker::Pooler;
use nextgres_core::proto::{self, ErrorFields};
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd};

/// Accepts per readiness event; the rest wait for the next loop turn so one
/// flood cannot starve established clients.
const ACCEPT_BATCH: usize = 64;

impl Pooler {
    pub fn accept(&mut self, key: usize) {
        let Some(Conn::Listener(l)) = self.conns.get(key) else { return };
        let lfd = l.as_raw_fd();
        for _ in 0..ACCEPT_BATCH {
            let fd = match nix::sys::socket::accept4(
                lfd,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC | nix::sys::socket::SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(nix::errno::Errno::EAGAIN) => return,
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            };
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            self.new_client(stream);
        }
    }

    fn new_client(&mut self, mut stream: TcpStream) {
        let Ok(addr) = stream.peer_addr() else { return };
        let _ = stream.set_nodelay(true);
        let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::KeepAlive, &true);
        if self.stopping {
            let mut out = Vec::new();
            proto::error_response(
                &mut out,
                &ErrorFields {
                    severity: "FATAL".into(),
                    sqlstate: "57P03".into(),
                    message: "the database system is shutting down".into(),
                    detail: None,
                    hint: None,
                },
            );
            let _ = stream.write(&out);
            return;
        }
        let max = crate::settings::MAX_CLIENT_CONN.get() as usize;
        let row = if self.clients < max { self.client_row_alloc(&addr.ip().to_string(), addr.port() as i32) } else { None };
        let Some(row) = row else {
            // Same words as the server's max_connections refusal.
            let mut out = Vec::new();
            proto::error_response(
                &mut out,
                &ErrorFields {
                    severity: "FATAL".into(),
                    sqlstate: "53300".into(),
                    message: "sorry, too many clients already".into(),
                    detail: None,
                    hint: Some(format!("nextgres.max_client_conn is {max}.")),
                },
            );
            let _ = stream.write(&out);
            return;
        };
        self.clients += 1;
        let id = self.next_client_id;
        self.next_client_id += 1;
        let client = Client::new(stream, addr, row, id);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        conn::arm_add(&self.epoll, &client.stream, key, conn::READ);
        entry.insert(Conn::Client(Box::new(client)));
        if let Some(Conn::Client(c)) = self.conns.get_mut(key) {
            c.registered = Some(conn::READ);
            c.armed = true;
        }
    }
}
