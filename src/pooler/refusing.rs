//! Connections the pooler will not take (at `nextgres.max_client_conn`, or
//! while the server shuts down) still have their first packet read: a
//! CancelRequest among them is carried out, as the postmaster carries one
//! out before it reports that it cannot accept connections (backend_startup.c:
//! ProcessStartupPacket() runs before the canAcceptConnections() result is
//! acted on). Without this, Ctrl-C on a query that keeps a smart shutdown
//! waiting, or on any query while the pooler is full, did nothing.
//!
//! A connection whose first packet is an SSLRequest or a GSSENCRequest
//! (libpq's first packet with the default `sslmode=prefer`, and libpq 17's
//! cancel connections) is taken as a client *over the limit*: its request
//! is answered as any client's ('S' and TLS, or 'N'), a CancelRequest
//! after it is carried out, and its startup packet gets the refusal (inside
//! TLS where it asked for TLS), as the server negotiates before it reports
//! that it is full or shutting down (backend_startup.c
//! ProcessStartupPacket(): SSL/GSS negotiation, then the startup packet,
//! then canAcceptConnections()). Answered with the refusal instead, libpq
//! says only "server sent an error response during SSL exchange" and
//! `pg_isready` "no response" where the server's gives "rejecting
//! connections". At most `MAX_REFUSING` such clients at once (beyond it
//! the refusal is plaintext, as before); they are not counted against
//! max_client_conn and take the shared rows kept beyond it. A direct TLS
//! handshake first is still refused in plaintext. Anything else gets the
//! refusal (FATAL 53300 / 57P03) as soon as its first bytes show it is no
//! CancelRequest.

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
            // An SSLRequest or GSSENCRequest and nothing after it (bytes
            // sent before the answer are refused, the CVE-2021-23214 rule).
            Some(proto::SSL_REQUEST_CODE | proto::GSSENC_REQUEST_CODE) if r.buf.len() == 8
                && !eof
                && self.over_limit_clients < MAX_REFUSING =>
            {
                self.refusing_over_limit(key)
            }
            Some(_) => self.refusing_end(key, true),
        }
    }

    /// A refused connection that sent an SSLRequest or GSSENCRequest
    /// becomes a client over the limit (the module's doc): its request is
    /// answered as any client's. Refused as before when no shared row is
    /// left.
    fn refusing_over_limit(&mut self, key: usize) {
        let Some(r) = self.refusing_take(key) else { return };
        let Refusing { mut stream, buf, why, .. } = *r;
        // Registered under its old key until now.
        conn::remove(&self.epoll, &stream);
        let Ok(addr) = stream.peer_addr() else { return };
        let Some(row) = self.client_row_alloc(&addr.ip().to_string(), addr.port() as i32) else {
            return tell(&mut stream, &why);
        };
        let key = self.client_accepted(stream, addr, row, buf, true);
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        let id = c.id;
        self.client_startup(key);
        // As after a client's event (`client_event`): its socket, the relay's
        // end once TLS started, is watched again. (Its key may be the one
        // just freed in this batch: the id tells it is still this client.)
        if self.client(key).is_some_and(|c| c.id == id) {
            self.client_rearm(key);
        }
    }

    /// Closes a refused connection, with its refusal when `tell`.
    pub fn refusing_end(&mut self, key: usize, tell: bool) {
        let Some(mut r) = self.refusing_take(key) else { return };
        if tell {
            self::tell(&mut r.stream, &r.why);
        }
    }

    /// Takes refused connection `key` out of the table and the count.
    fn refusing_take(&mut self, key: usize) -> Option<Box<Refusing>> {
        let Some(Conn::Refusing(r)) = self.conn_take(key) else { return None };
        self.refusing = self.refusing.saturating_sub(1);
        Some(r)
    }
}

/// Writes the refusal (best effort: the connection closes after it).
fn tell(stream: &mut TcpStream, why: &ErrorFields) {
    let mut out = Vec::new();
    proto::error_response(&mut out, why);
    let _ = stream.write(&out);
}
