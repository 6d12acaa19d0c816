//! Connections the pooler will not take (at `nextgres.max_client_conn`, or
//! while the server shuts down) still have their first packet read: a
//! CancelRequest among them is carried out, as the postmaster carries one
//! out before it reports that it cannot accept connections (backend_startup.c:
//! ProcessStartupPacket() runs before the canAcceptConnections() result is
//! acted on). Without this, Ctrl-C on a query that keeps a smart shutdown
//! waiting, or on any query while the pooler is full, did nothing. Anything
//! else gets the refusal (FATAL 53300 / 57P03) as soon as its first bytes
//! show it is no CancelRequest.

use super::conn::{self, Conn};
use super::worker::Pooler;
use nextgres_core::proto::{self, ErrorFields, StartupRequest};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// At most this many refused connections wait for their first packet at
/// once; beyond it a connection is refused on accept, as before.
pub const MAX_REFUSING: usize = 64;

/// A refused connection that has not shown its first packet within this
/// long gets its refusal (a CancelRequest is sent right after connecting).
pub const REFUSING_WITHIN: Duration = Duration::from_secs(1);

/// Longest CancelRequest: length, code, pid and a 3.2 key of up to 256
/// bytes.
const MAX_CANCEL_PACKET: usize = 12 + 256;

pub struct Refusing {
    stream: TcpStream,
    buf: Vec<u8>,
    pub since: Instant,
    why: ErrorFields,
}

impl Pooler {
    /// Refuses `stream` with `why` once its first packet shows it is no
    /// CancelRequest (at once when too many wait already).
    pub fn refuse(&mut self, mut stream: TcpStream, why: ErrorFields) {
        if self.refusing >= MAX_REFUSING {
            return tell(&mut stream, &why);
        }
        self.refusing += 1;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        conn::arm_add(&self.epoll, &stream, key, conn::READ);
        entry.insert(Conn::Refusing(Box::new(Refusing { stream, buf: Vec::new(), since: Instant::now(), why })));
    }

    /// A refused connection is readable.
    pub fn refusing_event(&mut self, key: usize) {
        let server = self.server_proto;
        let Some(Conn::Refusing(r)) = self.conns.get_mut(key) else { return };
        let mut chunk = [0u8; MAX_CANCEL_PACKET];
        // A cancel client may shut its side down right after the packet
        // (EOF behind it): what came before the EOF still counts.
        let mut eof = false;
        loop {
            let want = MAX_CANCEL_PACKET - r.buf.len();
            if want == 0 {
                break;
            }
            match r.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => r.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.refusing_end(key, false),
            }
        }
        let code = r.buf.get(4..8).map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        match code {
            None if eof => self.refusing_end(key, false),
            // Not all of the length and code yet.
            None => conn::arm_modify(&self.epoll, &r.stream, key, conn::READ),
            Some(proto::CANCEL_REQUEST_CODE) => match proto::parse_startup_for(&r.buf, &server) {
                Ok(Some((StartupRequest::Cancel { pid, key: secret }, _))) => {
                    self.refusing_end(key, false);
                    self.cancel_request(pid, &secret);
                }
                Ok(None) if r.buf.len() < MAX_CANCEL_PACKET && !eof => conn::arm_modify(&self.epoll, &r.stream, key, conn::READ),
                // A bad CancelRequest: closed without a word, as the server does.
                _ => self.refusing_end(key, false),
            },
            Some(_) => self.refusing_end(key, true),
        }
    }

    /// Closes a refused connection, with its refusal when `tell`.
    pub fn refusing_end(&mut self, key: usize, tell: bool) {
        let Some(Conn::Refusing(mut r)) = self.conn_take(key) else { return };
        self.refusing = self.refusing.saturating_sub(1);
        if tell {
            self::tell(&mut r.stream, &r.why);
        }
    }
}

/// Writes the refusal (best effort: the connection closes after it).
fn tell(stream: &mut TcpStream, why: &ErrorFields) {
    let mut out = Vec::new();
    proto::error_response(&mut out, why);
    let _ = stream.write(&out);
}
