//! A client's startup phase (protocol section 53.2.1, "Start-up"): the
//! first packet (SSLRequest, GSSENCRequest, CancelRequest, StartupMessage),
//! TLS set up on request, the startup parameters checked as the server's
//! ProcessStartupPacket checks them, and the refusals it sends.
use super::client::{fatal_fields, no_relay_fields, proto_fatal, ClientTls};
use super::conn::{self, Conn};
use super::worker::Pooler;
use nextgres_core::proto::{self, ErrorFields, StartupRequest};
use std::net::TcpStream;
use std::os::fd::AsRawFd;

impl Pooler {
    /// Reads a client's startup packets as they arrive (exact reads, the
    /// length first) and acts on each: TLS or GSS negotiation, a
    /// CancelRequest, or the StartupMessage that starts authentication.
    pub fn client_startup(&mut self, key: usize) {
        let server = self.server_proto;
        loop {
            let Some(c) = self.client(key) else { return };
            // Exact reads: the length first, then the rest of the packet.
            match c.fill(4) {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => return self.client_close(key),
            }
            if c.inbuf[0] == 0x16 && !c.negotiated && c.tls.is_none() && crate::pg::glue::server_has_direct_tls() {
                // Direct TLS (PostgreSQL 17+ clients, sslnegotiation=direct):
                // a TLS handshake record where a length would be; the server
                // starts the handshake with no SSLRequest (backend_startup.c
                // ProcessSSLStartup()), or closes without a reply when it
                // has no TLS. Before 17 it is an invalid length (below).
                let prefix = std::mem::take(&mut c.inbuf);
                let addr = c.addr;
                let Some(cfg) = self.tls.clone() else {
                    log::info!("direct SSL connection rejected from {addr}: SSL is not enabled");
                    return self.client_close(key);
                };
                let max = crate::settings::MAX_TLS_HANDSHAKES.get().max(1) as usize;
                if super::tls::handshaking() >= max {
                    // No protocol is spoken yet: close, as for an overload.
                    log::info!("direct SSL connection rejected: nextgres.max_tls_handshakes ({max}) handshakes in progress");
                    return self.client_close(key);
                }
                return self.client_start_tls(key, cfg, Some(prefix));
            }
            let len = i32::from_be_bytes([c.inbuf[0], c.inbuf[1], c.inbuf[2], c.inbuf[3]]);
            if !(8..=(proto::startup::MAX_STARTUP_PACKET as i32 + 4)).contains(&len) {
                // The server logs and closes without a reply for bad lengths.
                log::info!("invalid length of startup packet from {}", c.addr);
                return self.client_close(key);
            }
            match c.fill(len as usize) {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => return self.client_close(key),
            }
            let packet_head: [u8; 8] = c.inbuf[..8].try_into().unwrap_or_default();
            let parsed = proto::parse_startup_for(&c.inbuf, &server);
            // A refused packet's log line names what the server would have read of it.
            let names_read = parsed.is_err().then(|| proto::startup_names_read(&c.inbuf));
            c.inbuf = Vec::new();
            c.negotiated = true;
            match parsed {
                Ok(Some((req @ (StartupRequest::SslRequest | StartupRequest::GssEncRequest), _))) => {
                    // Bytes sent before our answer cannot be trusted (the
                    // server's CVE-2021-23214 rule): refuse them after 'N'.
                    let mut one = [0u8; 1];
                    let early = matches!(
                        nix::sys::socket::recv(
                            c.stream.as_raw_fd(),
                            &mut one,
                            nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT
                        ),
                        Ok(n) if n > 0
                    );
                    let already = c.tls.is_some();
                    // backend_startup.c ProcessStartupPacket(ssl_done,
                    // gss_done): each request only once in a row; repeated,
                    // it falls through to the protocol version check. Before
                    // TLS a refused SSLRequest allows a GSSENCRequest next
                    // and the other way round; inside TLS, SSLRequest is
                    // answered 'N' ("no SSL negotiation if we already have a
                    // direct SSL connection") and GSSENCRequest 'N' (no GSS
                    // encryption), each once.
                    let is_ssl = matches!(req, StartupRequest::SslRequest);
                    let (ssl_done, gss_done) = c.tls.as_ref().map_or(c.plain_negotiation, |t| t.negotiation);
                    if (is_ssl && ssl_done) || (!is_ssl && gss_done) {
                        let code = if is_ssl { proto::SSL_REQUEST_CODE } else { proto::GSSENC_REQUEST_CODE };
                        let e = proto::unsupported_protocol(code as u32, &server);
                        return self.client_startup_refused(key, &proto_fatal(&e));
                    }
                    match c.tls.as_mut() {
                        Some(t) => t.negotiation = (ssl_done || is_ssl, gss_done || !is_ssl),
                        // Refused ('N') below unless TLS starts, whose own
                        // state then takes over.
                        None => c.plain_negotiation = (is_ssl, !is_ssl),
                    }
                    let tls = match (&req, &self.tls) {
                        (StartupRequest::SslRequest, Some(cfg)) if !early && !already => Some(cfg.clone()),
                        _ => None,
                    };
                    if let Some(cfg) = tls {
                        let max = crate::settings::MAX_TLS_HANDSHAKES.get().max(1) as usize;
                        if super::tls::handshaking() >= max {
                            // A relay thread each: refused as at max_client_conn.
                            let hint = format!("nextgres.max_tls_handshakes is {max}.");
                            return self.client_startup_refused(key, &fatal_fields("53300", "sorry, too many clients already", Some(&hint)));
                        }
                        return self.client_start_tls(key, cfg, None);
                    }
                    let Some(c) = self.client(key) else { return };
                    // No GSS encryption (and no TLS with ssl = off): 'N' lets
                    // sslmode=prefer and gssencmode=prefer clients go on unencrypted.
                    c.send(b"N");
                    if early {
                        // backend_startup.c ProcessStartupPacket(), both requests.
                        let what = match req {
                            StartupRequest::SslRequest => "SSL request",
                            _ => "GSSAPI encryption request",
                        };
                        let mut f = fatal_fields("08P01", &format!("received unencrypted data after {what}"), None);
                        f.detail = Some(
                            "This could be either a client-software bug or evidence of an attempted man-in-the-middle attack.".into(),
                        );
                        return self.client_startup_refused(key, &f);
                    }
                    continue;
                }
                Ok(Some((StartupRequest::Cancel { pid, key: secret }, _))) => {
                    self.cancel_request(pid, &secret);
                    return self.client_close(key);
                }
                Ok(Some((StartupRequest::Startup { minor, params, .. }, _))) => {
                    return self.client_startup_message(key, minor, params);
                }
                Ok(None) => return,
                Err(_) if is_cancel_request(&packet_head) => {
                    // A CancelRequest of the wrong size: the server logs it
                    // (COMMERROR) and closes without a reply.
                    log::info!("invalid length of cancel request packet from {}", self.client(key).map(|c| c.addr.to_string()).unwrap_or_default());
                    return self.client_close(key);
                }
                Err(e) => {
                    let (user, database) = names_read.unwrap_or_default();
                    let f = proto_fatal(&e);
                    return self.client_startup_refused_as(key, &user, &database, &f);
                }
            }
        }
    }

    /// SSLRequest with TLS loaded: answer 'S', move the TCP socket to a relay
    /// thread and carry on with the pooler's end of a socketpair in its place.
    /// `direct`: the bytes of a direct TLS handshake already read (no 'S';
    /// the relay requires ALPN `postgresql`).
    ///
    /// The socketpair and the thread come before the 'S' (the relay thread
    /// sends it): a client the pooler has no descriptors (EMFILE) or thread
    /// for is still answered in plaintext, FATAL 53300, as the postmaster
    /// answers an SSLRequest when it cannot fork (postmaster.c
    /// report_fork_failure_to_client()); libpq reports an error response to
    /// its SSLRequest. A direct TLS client has sent its ClientHello and
    /// expects no plaintext: it is closed.
    pub(super) fn client_start_tls(&mut self, key: usize, cfg: std::sync::Arc<super::tls::Loaded>, direct: Option<Vec<u8>>) {
        let Some(Conn::Client(c)) = self.conns.get_mut(key) else { return };
        if direct.is_none() && !c.outbuf.is_empty() {
            // An earlier answer ('N' to a GSSENCRequest) is still unsent: only
            // a broken socket keeps a byte or two.
            return self.client_close(key);
        }
        let (mine, relay_end) = match std::os::unix::net::UnixStream::pair() {
            Ok(p) => p,
            Err(e) => return self.client_tls_refused(key, direct.is_some(), &format!("could not create a socket pair for the TLS relay: {e}")),
        };
        if mine.set_nonblocking(true).is_err() {
            return self.client_close(key);
        }
        // The TCP socket leaves the pooler's epoll set: from now on only the
        // relay thread touches it.
        let was_registered = c.registered.take().is_some();
        if was_registered {
            conn::remove(&self.epoll, &c.stream);
        }
        c.armed = false;
        let tcp = std::mem::replace(&mut c.stream, TcpStream::from(std::os::fd::OwnedFd::from(mine)));
        let info = super::tls::TlsInfo::default();
        let answer = direct.is_none().then_some(b'S');
        let is_direct = direct.is_some();
        match super::tls::spawn_relay(&cfg, tcp, relay_end, info.clone(), direct, answer) {
            Ok(ctl) => {
                c.tls = Some(Box::new(ClientTls {
                    info,
                    relay: Some(ctl),
                    parking: false,
                    park_asked: None,
                    park_in: Vec::new(),
                    parked: None,
                    idle_mark: None,
                    parked_read: 0,
                    negotiation: if is_direct { (false, false) } else { (true, true) },
                }))
            }
            Err((tcp, e)) => {
                // The TCP socket is back (the pair's ends are closed): the
                // client has had no 'S' and can still read a plaintext error.
                c.stream = tcp;
                return self.client_tls_refused(key, is_direct, &format!("could not start a thread for the TLS relay: {e}"));
            }
        }
        // The ClientHello and everything after it arrive through the pair.
        self.client_startup(key)
    }

    /// A TLS client the pooler cannot take (no descriptors, no thread):
    /// FATAL 53300 in plaintext in answer to its SSLRequest, as the server's
    /// "sorry, too many clients already"; a direct TLS client is closed.
    /// LOGged (`why`), as the postmaster logs a failed fork.
    pub(super) fn client_tls_refused(&mut self, key: usize, direct: bool, why: &str) {
        let addr = self.client(key).map(|c| c.addr.to_string()).unwrap_or_default();
        log::info!("TLS connection from {addr} refused: {why}");
        if direct {
            return self.client_close(key);
        }
        self.client_fatal_fields(key, &no_relay_fields(why))
    }

    pub(super) fn client_startup_message(&mut self, key: usize, minor: u16, params: Vec<(String, String)>) {
        if self.client(key).is_some_and(|c| c.over_limit) {
            // Refused now (inside TLS when it asked for TLS), as the server
            // refuses once it has read the startup packet (`refusing`).
            let why = if self.stopping {
                super::listener::shutting_down_refusal()
            } else {
                super::listener::max_client_conn_refusal()
            };
            return self.client_fatal_fields(key, &why);
        }
        let (mut user, mut database) = (String::new(), String::new());
        let mut unrecognized = Vec::new();
        let mut replication = proto::ReplicationFlags::default();
        // Top-level settings and those from `options`, apart: a walsender's
        // login carries them the way the client sent them.
        let (mut top, mut from_options) = (Vec::new(), Vec::new());
        for (k, v) in params {
            match k.as_str() {
                "user" => user = v,
                "database" => database = v,
                // As the server: each one sets only the flags it names.
                "replication" => match replication.fold(&v) {
                    Ok(r) => replication = r,
                    Err(e) => {
                        let f = proto_fatal(&e);
                        return self.client_startup_refused_as(key, &user, &database, &f);
                    }
                },
                "options" => match proto::parse_options(&v) {
                    Ok(opts) => from_options.extend(opts),
                    Err(e) => {
                        let f = proto_fatal(&e);
                        return self.client_startup_refused_as(key, &user, &database, &f);
                    }
                },
                k if k.starts_with("_pq_.") => unrecognized.push(k.to_string()),
                _ => top.push((k, v)),
            }
        }
        let replication = replication.kind();
        // As the server (postinit.c: the `options` switches first, then the
        // packet's other settings): a top-level setting wins over the same
        // one in `options`, wherever each stands in the packet.
        let mut settings = from_options.clone();
        settings.extend(top.iter().cloned());
        if !from_options.is_empty() {
            top.push(("options".to_string(), proto::format_options(&from_options)));
        }
        if user.is_empty() {
            let f = fatal_fields("28000", "no PostgreSQL user name specified in startup packet", None);
            return self.client_startup_refused_as(key, &user, &database, &f);
        }
        if database.is_empty() {
            database = user.clone();
        }
        // As the server: names are cut to NAMEDATALEN - 1 bytes before lookup.
        truncate_name(&mut user);
        truncate_name(&mut database);
        let server = self.server_proto;
        let Some(c) = self.client(key) else { return };
        if server.needs_negotiation(minor, unrecognized.len()) {
            let mut out = Vec::new();
            let names: Vec<&str> = unrecognized.iter().map(String::as_str).collect();
            proto::negotiate_protocol_version(&mut out, server.negotiate_version(minor), &names);
            c.send(&out);
        }
        c.proto_minor = server.session_minor(minor);
        c.user = user;
        c.database = database;
        c.settings = settings;
        c.replication = replication;
        // Kept until the client joins a pool: a dedicated login (walsender,
        // server authentication) sends them on as the client sent them.
        c.walsender_params = top;
        let row = c.row;
        let (u, d) = (c.user.clone(), c.database.clone());
        self.client_row_update(row, |r| {
            crate::shmem::set_name(&mut r.role, &u);
            crate::shmem::set_name(&mut r.database, &d);
        });
        self.client_begin_auth(key);
    }

    /// Sends a FATAL error and closes once it is written.
    /// A startup packet (or SSLRequest) refused where the server's
    /// ProcessStartupPacket() raises FATAL: logged as the server logs it
    /// (`client_login_refused`), then sent to the client.
    pub(super) fn client_startup_refused(&mut self, key: usize, f: &ErrorFields) {
        self.client_login_refused(key, f, None)
    }

    /// `client_startup_refused` with the user and database read so far,
    /// which the server's log line shows in %u and %d (ProcessStartupPacket
    /// sets them as it reads the packet's parameters, before it checks the
    /// rest). A packet refused before its parameters are read shows neither.
    pub(super) fn client_startup_refused_as(&mut self, key: usize, user: &str, database: &str, f: &ErrorFields) {
        if let Some(c) = self.client(key) {
            c.user = user.to_string();
            c.database = database.to_string();
        }
        self.client_startup_refused(key, f)
    }
}

/// Whether a startup-phase packet (its first 8 bytes) is a CancelRequest.
fn is_cancel_request(head: &[u8; 8]) -> bool {
    i32::from_be_bytes([head[4], head[5], head[6], head[7]]) == proto::CANCEL_REQUEST_CODE
}

/// Cuts a role or database name to 63 bytes (NAMEDATALEN - 1), at a
/// character boundary since names here are UTF-8.
fn truncate_name(name: &mut String) {
    const MAX: usize = 63;
    if name.len() > MAX {
        let mut end = MAX;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
}
