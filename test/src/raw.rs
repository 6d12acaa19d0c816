//! A minimal protocol-3 client (trust authentication only) for what drivers
//! hide: reading the FATAL a server sends before it closes, closing a socket
//! without Terminate, sending Terminate and watching who closes.
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// An error the raw client got: server ErrorResponse, or the socket failed.
#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug, in failure messages
pub enum RawFail {
    Db {
        severity: String,
        code: String,
        message: String,
    },
    Io(io::Error),
}

/// Minimal protocol-3 client (trust auth only) for what drivers hide.
pub struct Raw {
    /// The socket, for tests that write bytes of their own.
    pub s: TcpStream,
    timeout: Duration,
    /// BackendKeyData's process id and secret key, once read (for a
    /// CancelRequest the test sends itself).
    pub key: Option<(i32, Vec<u8>)>,
    /// What the server told this client of its settings (ParameterStatus
    /// messages read by `until_ready`, the login's included), by name.
    pub params: std::collections::HashMap<String, String>,
}

impl Raw {
    /// Logs in (trust) to 127.0.0.1:`port`; reads wait at most `timeout`.
    #[track_caller]
    pub fn connect(port: u16, user: &str, db: &str, timeout: Duration) -> Raw {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("raw connect");
        Raw::login(s, user, db, timeout)
    }

    /// Logs in (trust) over a socket already connected (for a connection
    /// made at a chosen moment, e.g. while no pooler runs).
    #[track_caller]
    pub fn login(s: TcpStream, user: &str, db: &str, timeout: Duration) -> Raw {
        Raw::login_with(s, &[("user", user), ("database", db)], timeout)
    }

    /// Logs in (trust) with these startup parameters (`user`, `database`,
    /// `application_name`, ...).
    #[track_caller]
    pub fn login_with(s: TcpStream, params: &[(&str, &str)], timeout: Duration) -> Raw {
        let user = params.iter().find(|(k, _)| *k == "user").map_or("", |(_, v)| *v);
        s.set_read_timeout(Some(timeout)).expect("read timeout");
        s.set_nodelay(true).expect("nodelay");
        let pkt = startup_packet_with(params);
        let mut raw = Raw { s, timeout, key: None, params: Default::default() };
        raw.s.write_all(&pkt).expect("raw startup");
        raw.until_ready()
            .unwrap_or_else(|e| panic!("raw login as {user}: {e:?}"));
        raw
    }

    pub fn local_port(&self) -> i32 {
        self.s.local_addr().expect("local addr").port() as i32
    }

    pub fn read_msg(&mut self) -> io::Result<(u8, Vec<u8>)> {
        read_message(&mut self.s)
    }

    /// Reads until ReadyForQuery; rows of DataRow messages.
    pub fn until_ready(&mut self) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        let mut rows = Vec::new();
        let mut err = None;
        loop {
            let (tag, body) = match self.read_msg() {
                Ok(m) => m,
                // A FATAL is followed by EOF: report the FATAL.
                Err(e) => return Err(err.unwrap_or(RawFail::Io(e))),
            };
            match tag {
                b'R' if body.get(..4) != Some(&[0, 0, 0, 0]) => {
                    panic!("raw client: only trust authentication is supported")
                }
                b'D' => rows.push(parse_row(&body)),
                b'S' => {
                    let mut f = body.split(|&b| b == 0).map(|f| String::from_utf8_lossy(f).into_owned());
                    if let (Some(name), Some(value)) = (f.next(), f.next()) {
                        self.params.insert(name, value);
                    }
                }
                b'E' => err = Some(parse_error(&body)),
                b'K' if body.len() >= 8 => {
                    self.key = Some((i32::from_be_bytes(body[..4].try_into().unwrap()), body[4..].to_vec()))
                }
                b'Z' => return err.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    pub fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, RawFail> {
        self.send_query(sql);
        self.until_ready()
    }

    #[track_caller]
    pub fn value(&mut self, sql: &str) -> String {
        let rows = self.query(sql).unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_else(|| panic!("{sql}: no value"))
    }

    /// Sends Terminate and keeps the socket open.
    pub fn send_terminate(&mut self) {
        self.s
            .write_all(&[b'X', 0, 0, 0, 4])
            .expect("send Terminate");
    }

    /// True once the other side has closed the connection (EOF or reset).
    pub fn closed_by_peer(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            let _ = self.s.set_read_timeout(Some(Duration::from_millis(200)));
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// Without sending anything, reads what the server says until it closes
    /// the connection: the last ErrorResponse's (severity, code), and how the
    /// connection ended (`UnexpectedEof` for an orderly close,
    /// `ConnectionReset` for a reset). Panics if no error came.
    #[track_caller]
    pub fn expect_fatal(&mut self) -> (String, String, io::ErrorKind) {
        let mut last = None;
        loop {
            match self.read_msg() {
                Ok((b'E', body)) => last = Some(parse_error(&body)),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "the server neither sent an error nor closed within {:?}",
                        self.timeout
                    )
                }
                Err(e) => match last {
                    Some(RawFail::Db { severity, code, .. }) => return (severity, code, e.kind()),
                    _ => panic!("connection ended ({e}) without an ErrorResponse"),
                },
            }
        }
    }

    /// Sends a simple query without waiting for its result.
    pub fn send_query(&mut self, sql: &str) {
        let mut pkt = vec![b'Q'];
        pkt.extend_from_slice(&((sql.len() + 5) as i32).to_be_bytes());
        pkt.extend_from_slice(sql.as_bytes());
        pkt.push(0);
        self.s.write_all(&pkt).expect("sending a query");
    }

    /// Closes the socket without Terminate, as a crashed client's kernel does.
    pub fn vanish(self) {
        let _ = self.s.shutdown(Shutdown::Both);
    }
}

/// One backend message (type byte, body) from `r` (protocol 53.7).
pub fn read_message(r: &mut impl Read) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    let mut body = vec![0u8; (len as usize).saturating_sub(4)];
    r.read_exact(&mut body)?;
    Ok((head[0], body))
}

/// A protocol 3.0 StartupMessage for `user` and `db` (protocol 53.2.2).
pub fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    startup_packet_with(&[("user", user), ("database", db)])
}

/// A protocol 3.0 StartupMessage with these parameters, in order.
pub fn startup_packet_with(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for &(k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    pkt
}

pub fn parse_row(body: &[u8]) -> Vec<Option<String>> {
    let n = i16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        at += 4;
        if len < 0 {
            out.push(None);
        } else {
            let l = len as usize;
            out.push(Some(
                String::from_utf8_lossy(&body[at..at + l]).into_owned(),
            ));
            at += l;
        }
    }
    out
}

pub fn parse_error(body: &[u8]) -> RawFail {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    for field in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            _ => {}
        }
    }
    RawFail::Db {
        severity,
        code,
        message,
    }
}
