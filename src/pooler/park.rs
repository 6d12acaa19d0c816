//! Parking idle TLS clients (issue 12, acceptance 5): a TLS client idle in
//! the pooler costs one descriptor (its TCP socket) and no thread.
//!
//! A TLS client normally has a relay thread (`tls`) carrying plaintext
//! between its TCP socket and a socketpair. Once it has been idle in the
//! pooler (phase Idle, nothing buffered either way) at two janitor ticks in
//! a row with the same transaction count (1 to 2 s), the pooler asks the
//! relay to park ([`super::tls::RelayCtl`]): it shuts its pair end for
//! writing; the relay reads that EOF, hands back the rustls session, the
//! TCP socket and any plaintext it had not passed on, and ends (its pair
//! end closes). The pooler then polls the TCP socket itself and reads TLS
//! inline (an idle client sends next to nothing). The first plaintext
//! *unparks* the client: a new socketpair and relay thread, the plaintext
//! first through the pair, and the client goes on as any idle client.
//! FATALs for an idle client (shutdown, `kill_client`, timeouts) are
//! encrypted inline for a parked one, then close_notify.
use super::client::Phase;
use super::conn::{self, Conn};
use super::worker::Pooler;
use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Bytes written into the pooler's end of a TLS client's socketpair that the
/// relay has not read yet: the tail of a result a backend wrote through its
/// copy of that end before giving the client back, still on its way to a
/// client that reads slowly (SIOCOUTQ of an AF_UNIX stream socket, unix(7)).
/// A relay is quiet only between its reads; such a client is not idle yet.
/// An error counts as unread.
fn unread_by_relay(stream: &TcpStream) -> i32 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: ioctl(2) with an int out-parameter on a socket this process owns.
    if unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut n) } != 0 {
        return 1;
    }
    n
}

impl Pooler {
    /// Janitor tick: asks the relays of TLS clients idle since the last
    /// tick to park.
    pub fn park_idle_tls(&mut self) {
        let mut park = Vec::new();
        let mut stuck = Vec::new();
        for (k, conn) in self.conns.iter_mut() {
            let Conn::Client(c) = conn else { continue };
            let Some(t) = c.tls.as_mut() else { continue };
            if t.parking && t.park_asked.is_some_and(|t| t.elapsed() > super::tls::CLOSE_WITHIN) {
                stuck.push(k);
                continue;
            }
            let eligible = t.relay.as_ref().is_some_and(|r| r.quiet())
                && !t.parking
                && matches!(c.phase, Phase::Idle)
                && c.inbuf.is_empty()
                && c.outbuf.is_empty()
                && t.info.get().is_some()
                && unread_by_relay(&c.stream) == 0;
            let (mark, due) = nextgres_core::tls::park_due(t.idle_mark, eligible, c.xacts);
            t.idle_mark = mark;
            if due {
                park.push(k);
            }
        }
        for k in park {
            self.client_park(k);
        }
        for k in stuck {
            // Closing the pooler's end ends the relay (its close path, with
            // what the client has not read and close_notify, bounded too).
            let addr = self.client(k).map(|c| c.addr.to_string()).unwrap_or_default();
            log::info!("TLS client {addr} closed: its relay did not hand over within {:?} (the client reads nothing)", super::tls::CLOSE_WITHIN);
            self.client_close(k);
        }
    }

    /// Asks a client's relay to park (see the module comment).
    fn client_park(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        let Some(t) = c.tls.as_mut() else { return };
        let Some(ctl) = t.relay.as_ref() else { return };
        ctl.request_park();
        if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return self.client_close(key);
        }
        t.parking = true;
        t.park_asked = Some(Instant::now());
        t.idle_mark = None;
        t.park_in.clear();
        self.client_rearm(key);
    }

    /// A parking client's pair end is readable: plaintext the relay passed
    /// on before it saw the request (kept for after), or EOF: the relay
    /// parked (or ended: the client left, bad TLS).
    /// `hup`: the relay's end is closed (read all that is left); otherwise
    /// input that raced the request is read up to `tls::PAIR_BACKLOG`.
    pub fn client_park_input(&mut self, key: usize, hup: bool) {
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        let Some(t) = c.tls.as_mut() else { return };
        let mut buf = [0u8; 4096];
        let eof = loop {
            if !hup && t.park_in.len() >= super::tls::PAIR_BACKLOG {
                break false;
            }
            match c.stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => t.park_in.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        if !eof {
            return self.client_rearm(key);
        }
        let parked = t.relay.take().and_then(|r| r.take_parked());
        let Some(p) = parked else { return self.client_close(key) };
        t.parking = false;
        t.park_asked = None;
        let mut pending = std::mem::take(&mut t.park_in);
        pending.extend_from_slice(&p.plaintext);
        let mut conn = Box::new(p.conn);
        let (more, closed) = super::tls::parked_plaintext(&mut conn);
        pending.extend_from_slice(&more);
        t.parked = Some(conn);
        t.parked_read = 0;
        if c.registered.take().is_some() {
            conn::remove(&self.epoll, &c.stream);
        }
        c.armed = false;
        c.stream = p.tcp; // the pair end closes
        if closed && pending.is_empty() {
            return self.client_close(key); // close_notify
        }
        let row = c.row;
        self.client_row_update(row, |r| r.tls_parked = true);
        let Some(c) = self.client(key) else { return };
        match c.phase {
            Phase::Closing { .. } => {
                if !c.flush() || !c.out_pending() {
                    return self.client_close(key);
                }
            }
            _ if !pending.is_empty() => return self.client_unpark(key, pending),
            _ => {
                if !c.flush() {
                    return self.client_close(key);
                }
            }
        }
        self.client_rearm(key);
    }

    /// A parked client's socket is readable (or writable: rustls output).
    pub fn client_parked_input(&mut self, key: usize) {
        let Some(c) = self.client(key) else { return };
        let Some(conn) = c.tls.as_mut().and_then(|t| t.parked.as_mut()) else { return };
        use super::tls::ParkedInput;
        let (input, n) = super::tls::parked_read(conn, &mut c.stream);
        match input {
            ParkedInput::Nothing => {
                if !c.flush() {
                    return self.client_close(key);
                }
                // Housekeeping alone (KeyUpdate and empty records alternated
                // pass rustls' limits) is decrypted and re-keyed here, on the
                // pooler's one thread: beyond a bound, on the client's own.
                let Some(t) = c.tls.as_mut() else { return };
                t.parked_read += n;
                if t.parked_read > super::tls::PARKED_HOUSEKEEPING {
                    self.client_unpark(key, Vec::new());
                }
            }
            // Terminate while idle: closed here (close_notify), no relay.
            ParkedInput::Plaintext(p) if p == [b'X', 0, 0, 0, 4] => self.client_close(key),
            ParkedInput::Plaintext(p) => self.client_unpark(key, p),
            ParkedInput::Gone => self.client_close(key),
            ParkedInput::Bad => {
                // The alert is sent; no close_notify after it.
                if let Some(t) = c.tls.as_mut() {
                    t.parked = None;
                }
                c.outbuf.clear();
                self.client_close(key)
            }
        }
    }

    /// A parked client sent plaintext: a relay thread again, `plain` first.
    /// No descriptors or no thread: FATAL 53300 over TLS (inline), closed.
    fn client_unpark(&mut self, key: usize, plain: Vec<u8>) {
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        let Some(info) = c.tls.as_ref().map(|t| t.info.clone()) else { return };
        let (mine, relay_end) = match UnixStream::pair() {
            Ok(p) => p,
            Err(e) => return self.client_unpark_failed(key, &format!("could not create a socket pair for the TLS relay: {e}")),
        };
        if mine.set_nonblocking(true).is_err() {
            return self.client_unpark_failed(key, "could not set the TLS relay's socket pair non-blocking");
        }
        let Some(conn) = c.tls.as_mut().and_then(|t| t.parked.take()) else { return };
        if c.registered.take().is_some() {
            conn::remove(&self.epoll, &c.stream);
        }
        c.armed = false;
        let tcp = std::mem::replace(&mut c.stream, TcpStream::from(std::os::fd::OwnedFd::from(mine)));
        let parked = super::tls::Parked { conn: *conn, tcp, plaintext: Vec::new() };
        match super::tls::resume_relay(parked, relay_end, info, plain) {
            Ok(ctl) => {
                if let Some(t) = c.tls.as_mut() {
                    t.relay = Some(ctl);
                }
                let row = c.row;
                self.client_row_update(row, |r| r.tls_parked = false);
                // The plaintext arrives through the pair: read as any idle
                // client's next message.
                self.client_rearm(key);
            }
            Err((p, e)) => {
                c.stream = p.tcp;
                if let Some(t) = c.tls.as_mut() {
                    t.parked = Some(Box::new(p.conn));
                }
                self.client_unpark_failed(key, &format!("could not start a thread for the TLS relay: {e}"))
            }
        }
    }

    fn client_unpark_failed(&mut self, key: usize, why: &str) {
        let addr = self.client(key).map(|c| c.addr.to_string()).unwrap_or_default();
        log::info!("TLS client {addr} closed: {why}");
        self.client_fatal_fields(key, &super::client::no_relay_fields(why))
    }

    /// Shutdown: waits (up to `deadline`) for a parking client's relay to
    /// hand over, so that it is told over TLS as any idle client.
    pub fn client_park_wait(&mut self, key: usize, deadline: Instant) {
        while self.client(key).is_some_and(|c| c.parking()) {
            self.client_park_input(key, true);
            if !self.client(key).is_some_and(|c| c.parking()) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
