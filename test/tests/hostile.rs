//! Hostile-input tests of the pooler's front door: the pooler owns the
//! server's TCP port, reads startup packets and authenticates clients itself,
//! so every malformed or abusive byte stream a client can send lands in the
//! pooler first. Each case talks to the port over a raw `TcpStream` and
//! asserts that the client gets a PostgreSQL-style FATAL ErrorResponse with an
//! SQLSTATE, or a clean close, never a hang (every read has a deadline) and
//! never a login. After each case the pooler must still be the same process
//! (`nextgres.status().pooler_pid`) and a normal rust-postgres client must
//! log in with SCRAM and run `SELECT 1`; after each batch, no client slot may
//! be left behind in `nextgres.clients`.
//!
//! Most cases share one cluster and run in sequence inside a few tests, each
//! with its label in every assertion message.
//!
//! ```sh
//! NEXTGRES_PG=16 cargo test -p nextgres-test --test hostile -- --test-threads=2
//! ```

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nextgres_test::{refusal_log, wait_until, with_timeout, Cluster, PasswordEncryption, StopOnFailure};

/// Role with a SCRAM secret; TCP logins need its password.
const USER: &str = "hostile";
const PASSWORD: &str = "hostile-pw-1";
const DB: &str = "postgres";
/// Bound on anything that must happen "soon" (only decides what is a hang).
const SETTLE: Duration = Duration::from_secs(20);
/// Bound on a whole test body.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// nextgres.max_client_conn in these clusters.
const MAX_CLIENTS: usize = 20;

const HBA: &str = "# hostile.rs\n\
                   local all all trust\n\
                   host all slow,fast 127.0.0.1/32 password\n\
                   host all all 127.0.0.1/32 scram-sha-256\n";

const PROTO_3_0: i32 = 196608;
const SSL_REQUEST: i32 = 80877103;
const GSSENC_REQUEST: i32 = 80877104;
const CANCEL_REQUEST: i32 = 80877102;

// ---- running a test ---------------------------------------------------------

fn run(body: impl FnOnce(&Cluster, i32) + Send + 'static) {
    let pg = Arc::new(
        Cluster::builder()
            .hba(HBA)
            .conf("authentication_timeout = 2s")
            .conf(format!("nextgres.max_client_conn = {MAX_CLIENTS}"))
            .conf("nextgres.pool_size = 4")
            .start(),
    );
    pg.admin()
        .batch_execute("CREATE EXTENSION nextgres")
        .unwrap_or_else(|e| panic!("create extension: {e:?}\n{}", pg.log_tail(40)));
    pg.create_role(USER, PASSWORD, PasswordEncryption::ScramSha256);
    let pooler = pooler_pid(&pg).expect("pooler running");
    assert_serves(&pg, pooler, "before any hostile input");
    let guard = StopOnFailure(pg.clone());
    let pg2 = pg.clone();
    let name = std::thread::current().name().unwrap_or("test").to_string();
    with_timeout(TEST_LIMIT, &name, move || body(&pg2, pooler));
    // Nothing crashed along the way, not even a backend the pooler restarted.
    let log = pg.log();
    for bad in [
        "panicked",
        "PANIC:",
        "terminated by signal",
        "was terminated by",
        "nextgres agent\" (PID",
        "pooler process (PID",
    ] {
        assert!(
            !log.contains(bad),
            "server log mentions {bad:?}:\n{}",
            pg.log_tail(60)
        );
    }
    drop(guard);
}


fn pooler_pid(pg: &Cluster) -> Option<i32> {
    pg.admin()
        .query_one("SELECT pooler_pid FROM nextgres.status()", &[])
        .expect("nextgres.status()")
        .get(0)
}

fn client_count(pg: &Cluster) -> i64 {
    pg.admin()
        .query_one("SELECT count(*) FROM nextgres.clients", &[])
        .expect("nextgres.clients")
        .get(0)
}

/// The pooler is the same process and serves a normal SCRAM client.
///
/// authentication_timeout is 2 s here (for the slowloris cases), and a debug
/// build's SCRAM on a loaded 2-core machine can come near it: a login that
/// the pooler drops silently after more than a second is retried once (and
/// said so on stderr); any other failure fails at once.
#[track_caller]
fn assert_serves(pg: &Cluster, pooler: i32, label: &str) {
    for attempt in 1..=2 {
        let info = pg.tcp(USER, DB).password(PASSWORD);
        let t0 = Instant::now();
        let r = with_timeout(SETTLE, &format!("{label}: normal client"), move || {
            let mut c = info.connect()?;
            let v: i32 = c.query_one("SELECT 1", &[])?.get(0);
            Ok::<_, postgres::Error>(v)
        });
        let took = t0.elapsed();
        match r {
            Ok(1) => break,
            Err(e) if attempt == 1 && e.code().is_none() && took > Duration::from_secs(1) => {
                eprintln!("{label}: normal client dropped after {took:?} ({e:?}); retrying once");
            }
            other => panic!(
                "{label}: a normal client afterwards: {other:?} after {took:?}\n{}",
                pg.log_tail(30)
            ),
        }
    }
    assert!(pg.is_running(), "{label}: postmaster gone");
    assert_eq!(
        pooler_pid(pg),
        Some(pooler),
        "{label}: the pooler was replaced (crashed?)\n{}",
        pg.log_tail(30)
    );
}

/// The server's `authentication_timeout` (the pooler's bound for a login).
fn authentication_timeout(pg: &Cluster) -> Duration {
    let ms: i32 = pg
        .admin()
        .query_one(
            "SELECT setting::int * 1000 FROM pg_settings WHERE name = 'authentication_timeout'",
            &[],
        )
        .expect("authentication_timeout")
        .get(0);
    Duration::from_millis(ms as u64)
}

/// No client slot is left behind once every hostile socket is closed.
#[track_caller]
fn assert_no_leftover_clients(pg: &Cluster, label: &str) {
    assert!(
        wait_until(SETTLE, || client_count(pg) == 0),
        "{label}: client slots left in nextgres.clients: {}",
        client_count(pg)
    );
}

// ---- raw protocol ---------------------------------------------------------------

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum End {
    /// Orderly close (FIN).
    Eof,
    /// Connection reset (the server closed with our bytes unread).
    Reset,
    /// Nothing within the deadline: a hang.
    Timeout,
    /// The server sent bytes that are no protocol-3 message.
    Garbage,
}

type Msg = (u8, Vec<u8>);

struct Peer {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    #[track_caller]
    fn connect(pg: &Cluster) -> Peer {
        let addr = SocketAddr::from(([127, 0, 0, 1], pg.port()));
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("raw connect");
        s.set_nodelay(true).expect("nodelay");
        Peer { s, buf: Vec::new() }
    }

    /// Writes, ignoring errors (the server may already have hung up).
    fn send(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Reads more bytes into the buffer; Err at EOF, reset or deadline.
    fn fill(&mut self, deadline: Instant) -> Result<(), End> {
        let now = Instant::now();
        if now >= deadline {
            return Err(End::Timeout);
        }
        let _ = self
            .s
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))));
        let mut chunk = [0u8; 16384];
        match self.s.read(&mut chunk) {
            Ok(0) => Err(End::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(End::Timeout)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(_) => Err(End::Reset),
        }
    }

    /// One byte (the answer to SSLRequest / GSSENCRequest).
    fn byte(&mut self, within: Duration) -> Result<u8, End> {
        let deadline = Instant::now() + within;
        while self.buf.is_empty() {
            self.fill(deadline)?;
        }
        Ok(self.buf.remove(0))
    }

    /// One backend message.
    fn next(&mut self, within: Duration) -> Result<Msg, End> {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 5 {
                let len = i32::from_be_bytes(self.buf[1..5].try_into().unwrap());
                if !(4..=1 << 24).contains(&len) {
                    eprintln!(
                        "not a protocol-3 message (length {len}): {:?}",
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(80)])
                    );
                    return Err(End::Garbage);
                }
                let total = 1 + len as usize;
                if self.buf.len() >= total {
                    let msg: Vec<u8> = self.buf.drain(..total).collect();
                    return Ok((msg[0], msg[5..].to_vec()));
                }
            }
            self.fill(deadline)?;
        }
    }

    /// Everything the server says until it ends the connection.
    fn finish(&mut self, within: Duration) -> (Vec<Msg>, End) {
        let deadline = Instant::now() + within;
        let mut msgs = Vec::new();
        loop {
            match self.next(deadline.saturating_duration_since(Instant::now())) {
                Ok(m) => msgs.push(m),
                Err(e) => return (msgs, e),
            }
        }
    }

    /// Reads until an authentication request of `code` arrives.
    #[track_caller]
    fn expect_auth(&mut self, code: i32, label: &str) -> Vec<u8> {
        loop {
            match self.next(SETTLE) {
                Ok((b'R', body)) if be_i32(&body, 0) == code => return body[4..].to_vec(),
                Ok((b'v', _)) => {}
                Ok(m) => panic!(
                    "{label}: expected AuthenticationRequest {code}, got {}",
                    show(&m)
                ),
                Err(e) => panic!("{label}: expected AuthenticationRequest {code}, got {e:?}"),
            }
        }
    }

    /// Starts a SCRAM exchange: startup, AuthenticationSASL, client-first.
    /// Returns (client-first-bare, server-first).
    #[track_caller]
    fn scram_begin(pg: &Cluster, label: &str) -> (Peer, String, String) {
        let mut p = Peer::connect(pg);
        p.send(&startup(
            PROTO_3_0,
            &[(b"user", USER.as_bytes()), (b"database", DB.as_bytes())],
        ));
        let mechs = p.expect_auth(10, label);
        assert!(
            mechs.windows(13).any(|w| w == b"SCRAM-SHA-256"),
            "{label}: mechanisms {mechs:?}"
        );
        let nonce = b64_encode(&random_bytes(18));
        let bare = format!("n=,r={nonce}");
        p.send(&sasl_initial(
            "SCRAM-SHA-256",
            Some(format!("n,,{bare}").as_bytes()),
        ));
        let server_first = String::from_utf8(p.expect_auth(11, label)).expect("utf8 server-first");
        assert!(
            server_first.starts_with(&format!("r={nonce}")),
            "{label}: server-first {server_first}"
        );
        (p, bare, server_first)
    }
}

fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn show(m: &Msg) -> String {
    format!("'{}' {:?}", m.0 as char, String::from_utf8_lossy(&m.1))
}

/// (severity, code, message) of an ErrorResponse body.
fn error_fields(body: &[u8]) -> (String, String, String) {
    let (mut sev, mut code, mut msg) = (String::new(), String::new(), String::new());
    for f in body.split(|&b| b == 0).filter(|f| !f.is_empty()) {
        let v = String::from_utf8_lossy(&f[1..]).into_owned();
        match f[0] {
            b'V' => sev = v,
            b'C' => code = v,
            b'M' => msg = v,
            _ => {}
        }
    }
    (sev, code, msg)
}

fn is_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// A startup-phase packet: length word, then `code`, then `rest`.
fn packet(code: i32, rest: &[u8]) -> Vec<u8> {
    let mut p = ((rest.len() + 8) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(rest);
    p
}

/// StartupMessage with these parameters and the final terminator.
fn startup(version: i32, params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut rest = Vec::new();
    for (k, v) in params {
        rest.extend_from_slice(k);
        rest.push(0);
        rest.extend_from_slice(v);
        rest.push(0);
    }
    rest.push(0);
    packet(version, &rest)
}

fn user_db() -> Vec<u8> {
    startup(
        PROTO_3_0,
        &[(b"user", USER.as_bytes()), (b"database", DB.as_bytes())],
    )
}

/// A tagged message with a correct length word.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// SASLInitialResponse (`data` None: length -1).
fn sasl_initial(mech: &str, data: Option<&[u8]>) -> Vec<u8> {
    let mut b = mech.as_bytes().to_vec();
    b.push(0);
    match data {
        Some(d) => {
            b.extend_from_slice(&(d.len() as i32).to_be_bytes());
            b.extend_from_slice(d);
        }
        None => b.extend_from_slice(&(-1i32).to_be_bytes()),
    }
    msg(b'p', &b)
}

/// The client is refused: what it got is at most a FATAL ErrorResponse with
/// an SQLSTATE (and messages before it that are no login), then the
/// connection ends: never a hang and never AuthenticationOk/ReadyForQuery.
/// Returns the SQLSTATE, None for a silent close.
#[track_caller]
fn expect_refused(p: &mut Peer, label: &str) -> Option<String> {
    let (msgs, end) = p.finish(SETTLE);
    let shown: Vec<String> = msgs.iter().map(show).collect();
    assert_ne!(
        end,
        End::Timeout,
        "{label}: the pooler neither refused nor closed within {SETTLE:?}; got {shown:?}"
    );
    assert_ne!(
        end,
        End::Garbage,
        "{label}: the pooler sent garbage after {shown:?}"
    );
    for m in &msgs {
        let login = m.0 == b'Z' || (m.0 == b'R' && be_i32(&m.1, 0) == 0);
        assert!(!login, "{label}: hostile client got logged in: {shown:?}");
    }
    let Some(err) = msgs.iter().rev().find(|m| m.0 == b'E') else {
        eprintln!("[{label}] closed ({end:?}) without an error");
        return None;
    };
    let (sev, code, message) = error_fields(&err.1);
    eprintln!("[{label}] {sev} {code} {message} ({end:?})");
    assert_eq!(sev, "FATAL", "{label}: {shown:?}");
    assert!(
        is_sqlstate(&code),
        "{label}: bad SQLSTATE {code:?} ({message})"
    );
    Some(code)
}

/// Refused with a FATAL ErrorResponse; `code` checks its SQLSTATE.
#[track_caller]
fn expect_fatal(p: &mut Peer, label: &str, code: Option<&str>) -> String {
    let got = expect_refused(p, label)
        .unwrap_or_else(|| panic!("{label}: closed without an ErrorResponse"));
    if let Some(c) = code {
        assert_eq!(got, c, "{label}: SQLSTATE");
    }
    got
}

/// Closed (with or without an error), no login.
#[track_caller]
fn expect_closed(p: &mut Peer, label: &str) {
    let _ = expect_refused(p, label);
}

/// Answers a login: SCRAM with the right password, until ReadyForQuery (Ok:
/// the messages) or the end of the connection (Err: messages and how).
fn login(p: &mut Peer, password: &str) -> Result<Vec<Msg>, (Vec<Msg>, End)> {
    let mut msgs = Vec::new();
    let mut scram: Option<(String, String)> = None; // (bare, nonce)
    loop {
        let m = match p.next(SETTLE) {
            Ok(m) => m,
            Err(e) => return Err((msgs, e)),
        };
        match (m.0, m.1.get(..4).map(|b| be_i32(b, 0))) {
            (b'R', Some(10)) => {
                let nonce = b64_encode(&random_bytes(18));
                let bare = format!("n=,r={nonce}");
                p.send(&sasl_initial(
                    "SCRAM-SHA-256",
                    Some(format!("n,,{bare}").as_bytes()),
                ));
                scram = Some((bare, nonce));
            }
            (b'R', Some(11)) => {
                let (bare, _) = scram.clone().expect("SASLContinue before SASL");
                let sf = String::from_utf8_lossy(&m.1[4..]).into_owned();
                p.send(&msg(b'p', client_final(&bare, &sf, password).as_bytes()));
            }
            (b'Z', _) => {
                msgs.push(m);
                return Ok(msgs);
            }
            _ => {}
        }
        msgs.push(m);
    }
}

#[track_caller]
fn expect_login(p: &mut Peer, label: &str) -> Vec<Msg> {
    login(p, PASSWORD).unwrap_or_else(|(m, e)| {
        panic!(
            "{label}: login failed ({e:?}): {:?}",
            m.iter().map(show).collect::<Vec<_>>()
        )
    })
}

/// A simple query on a logged-in raw connection: the first value.
#[track_caller]
fn raw_value(p: &mut Peer, sql: &str, label: &str) -> Option<String> {
    let mut q = sql.as_bytes().to_vec();
    q.push(0);
    p.send(&msg(b'Q', &q));
    let mut value = None;
    loop {
        let m = p
            .next(SETTLE)
            .unwrap_or_else(|e| panic!("{label}: {sql}: {e:?}"));
        match m.0 {
            b'D' if value.is_none() => {
                let len = be_i32(&m.1, 2);
                value = (len >= 0)
                    .then(|| String::from_utf8_lossy(&m.1[6..6 + len as usize]).into_owned());
            }
            b'E' => panic!("{label}: {sql}: {}", show(&m)),
            b'Z' => return value,
            _ => {}
        }
    }
}

fn terminate(mut p: Peer) {
    p.send(&[b'X', 0, 0, 0, 4]);
    let _ = p.s.shutdown(Shutdown::Both);
}

// ---- SCRAM client math (SHA-256, HMAC, PBKDF2, base64) ---------------------------

fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut m = data.to_vec();
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in m.chunks(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(chunk[4 * i..4 * i + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha256(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(data);
    let mut outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

fn pbkdf2(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut s = salt.to_vec();
    s.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &s);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(data: &[u8]) -> String {
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(B64[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for ch in s.bytes().filter(|&b| b != b'=') {
        let v = B64.iter().position(|&x| x == ch).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// client-final-message for this exchange and password.
fn client_final(bare: &str, server_first: &str, password: &str) -> String {
    let attr = |k: &str| {
        server_first
            .split(',')
            .find_map(|a| a.strip_prefix(k))
            .unwrap_or_else(|| panic!("server-first {server_first} lacks {k}"))
            .to_string()
    };
    let nonce = attr("r=");
    let salt = b64_decode(&attr("s="));
    let iterations: u32 = attr("i=").parse().expect("iterations");
    let without_proof = format!("c=biws,r={nonce}");
    let auth_message = format!("{bare},{server_first},{without_proof}");
    let salted = pbkdf2(password.as_bytes(), &salt, iterations);
    let client_key = hmac(&salted, b"Client Key");
    let stored_key = sha256(&client_key);
    let signature = hmac(&stored_key, auth_message.as_bytes());
    let proof: Vec<u8> = client_key
        .iter()
        .zip(signature)
        .map(|(a, b)| a ^ b)
        .collect();
    format!("{without_proof},p={}", b64_encode(&proof))
}

/// Not cryptographic; just varied.
fn random_bytes(n: usize) -> Vec<u8> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0);
    let mut x = STATE.load(Ordering::Relaxed)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
        ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push((x >> 24) as u8);
    }
    STATE.store(x, Ordering::Relaxed);
    out
}

#[test]
fn scram_math_known_answers() {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // RFC 4231 test case 2.
    assert_eq!(
        hex(&hmac(b"Jefe", b"what do ya want for nothing?")),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
    // RFC 7677's SCRAM-SHA-256 example.
    let bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
    let sf =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    assert_eq!(
        client_final(bare, sf, "pencil"),
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    );
    assert_eq!(b64_decode(&b64_encode(b"hello!?")), b"hello!?");
}

// ---- tests ------------------------------------------------------------------------

/// Role `slow`, whose SCRAM secret has 2^31 - 1 iterations (any password is
/// checked for hours). Written into pg_authid directly: CREATE ROLE ...
/// PASSWORD runs the iterations in the backend that sets it (the cost its
/// author pays).
fn create_slow_role(pg: &Cluster) {
    let zeros = b64_encode(&[0u8; 32]);
    let secret = format!("SCRAM-SHA-256$2147483647:{}${zeros}:{zeros}", b64_encode(b"sixteen byte slt"));
    pg.admin()
        .batch_execute(&format!("CREATE ROLE slow LOGIN; UPDATE pg_authid SET rolpassword = '{secret}' WHERE rolname = 'slow'"))
        .expect("CREATE ROLE slow");
}

/// Checks of one role take at most two of the pooler's check threads: 16
/// clients of a role whose secret has 2^31 - 1 iterations (they need only
/// its name) leave room for another role's `password` login, which
/// succeeds while they wait. Before, they held all 16 threads and the other
/// login waited in line until `authentication_timeout` (2 s) dropped it.
#[test]
fn a_role_with_a_huge_iteration_count_takes_only_its_share_of_checks() {
    run(|pg, pooler| {
        create_slow_role(pg);
        pg.create_role("fast", "fast pw", PasswordEncryption::ScramSha256);
        let slow: Vec<_> = (0..16)
            .map(|_| {
                let info = pg.tcp("slow", DB).password("any password");
                std::thread::spawn(move || info.connect().map(drop))
            })
            .collect();
        // Every slow login has sent its password (its check runs or waits).
        let in_auth = || {
            pg.admin()
                .query_one("SELECT count(*) FROM nextgres.clients WHERE role = 'slow'", &[])
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0)
        };
        assert!(wait_until(SETTLE, || in_auth() == 16), "the 16 slow logins are not all there: {}", in_auth());
        std::thread::sleep(Duration::from_millis(300));
        let mut fast = pg.tcp("fast", DB).password("fast pw").connect().expect("fast's password login beside 16 slow ones");
        assert_eq!(fast.query_one("SELECT 1", &[]).expect("fast's query").get::<_, i32>(0), 1);
        drop(fast);
        for t in slow {
            assert!(t.join().expect("slow login").is_err());
        }
        assert_serves(pg, pooler, "after the slow logins");
    });
}

/// A client that sends its first query with its password, in one write
/// (no wait for AuthenticationOk), is answered as the server answers it:
/// logged in, then the query. Its `password` line makes the pooler check the
/// password against a SCRAM secret of 100,000 iterations on a thread, and
/// what the client sent meanwhile waits, as in the socket of a server
/// backend busy checking (it was read and refused as no password message,
/// 08P01, while the check ran).
#[test]
fn a_query_sent_with_the_password_is_answered_after_the_check() {
    run(|pg, pooler| {
        const PW: &str = "pipelined pw";
        let iterations = 100_000u32;
        let salt = b"pipelined salt..";
        let salted = pbkdf2(PW.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let secret = format!(
            "SCRAM-SHA-256${iterations}:{}${}:{}",
            b64_encode(salt),
            b64_encode(&sha256(&client_key)),
            b64_encode(&hmac(&salted, b"Server Key"))
        );
        pg.admin()
            .batch_execute(&format!("CREATE ROLE slow LOGIN; UPDATE pg_authid SET rolpassword = '{secret}' WHERE rolname = 'slow'"))
            .expect("CREATE ROLE slow");
        let mut p = Peer::connect(pg);
        p.send(&startup(PROTO_3_0, &[(b"user", b"slow"), (b"database", DB.as_bytes())]));
        p.expect_auth(3, "cleartext password request");
        let mut both = msg(b'p', format!("{PW}\0").as_bytes());
        both.extend_from_slice(&msg(b'Q', b"SELECT 'pipelined'\0"));
        p.send(&both);
        let mut seen = Vec::new();
        let mut ready = 0;
        while ready < 2 {
            let m = p.next(SETTLE).unwrap_or_else(|e| panic!("after {seen:?}: {e:?}"));
            assert_ne!(m.0, b'E', "refused: {} after {seen:?}", show(&m));
            if m.0 == b'Z' {
                ready += 1;
            }
            seen.push(show(&m));
        }
        assert!(seen.iter().any(|m| m.contains("pipelined")), "the query's row: {seen:?}");
        terminate(p);
        assert_serves(pg, pooler, "after the pipelined login");
    });
}

/// A role may set its own password to a SCRAM secret of its choosing, with
/// up to 2^31 - 1 iterations (hours of its own backend's time to set); under a `password` line the pooler checks a
/// cleartext password by running them (hours). In the server that login
/// costs only its own backend, ended at `authentication_timeout`; through
/// the pooler it must cost nobody else either: while it runs (the pooler's
/// CPU time climbs), a normal client logs in and runs a query, and once
/// `authentication_timeout` (2 s) has ended that login the check stops (no
/// password thread left running). Before, the pooler ran the iterations on
/// its event loop: nobody else was served, for hours.
#[test]
fn a_password_check_with_a_huge_iteration_count_stalls_nobody() {
    run(|pg, pooler| {
        create_slow_role(pg);
        let cpu = || nextgres_test::procs::process_cpu_ticks(pooler).expect("pooler's /proc stat");
        let before = cpu();
        let info = pg.tcp("slow", DB).password("any password");
        let slow = std::thread::spawn(move || info.connect().map(drop));
        // A quarter of a second of PBKDF2 (25 ticks): the check is under way.
        assert!(
            wait_until(SETTLE, || cpu() >= before + 25),
            "the slow login's check never ran ({} ticks)",
            cpu() - before
        );
        assert_serves(pg, pooler, "during a password check of 2^31 - 1 iterations");
        let r = slow.join().expect("slow login thread");
        assert!(r.is_err(), "the slow login succeeded: {r:?}");
        let running = || nextgres_test::procs::thread_states(pooler, "ng password").into_iter().filter(|&s| s == 'R').count();
        assert!(
            wait_until(SETTLE, || running() == 0),
            "a password check still runs after its client was dropped at authentication_timeout"
        );
        assert_no_leftover_clients(pg, "after the slow login");
    });
}

/// Malformed startup packets: bad lengths, protocol versions, parameters,
/// options, SSL/GSS requests, cancel requests, garbage.
#[test]
fn hostile_startup_packets() {
    run(|pg, pooler| {
        let check = |label: &str| assert_serves(pg, pooler, label);

        // 1. length < 8
        for len in [0i32, 4, 7] {
            let label = format!("startup length {len}");
            let mut p = Peer::connect(pg);
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(&PROTO_3_0.to_be_bytes());
            p.send(&b[..(len.max(4) as usize).min(8)]);
            expect_closed(&mut p, &label);
        }
        check("startup length < 8");

        // 2. length > 10000 (body over the limit), header only
        for len in [10_005i32, 1 << 20, i32::MAX] {
            let label = format!("startup length {len}");
            let mut p = Peer::connect(pg);
            let mut b = len.to_be_bytes().to_vec();
            b.extend_from_slice(&PROTO_3_0.to_be_bytes());
            p.send(&b);
            expect_closed(&mut p, &label);
        }
        check("startup length > 10000");

        // 3. negative length
        for len in [-1i32, -8, i32::MIN] {
            let label = format!("startup length {len}");
            let mut p = Peer::connect(pg);
            p.send(&len.to_be_bytes());
            expect_closed(&mut p, &label);
        }
        check("negative startup length");

        // 4. length says more than is sent, then the client closes its side
        {
            let label = "startup truncated then shutdown(Write)";
            let full = user_db();
            let mut p = Peer::connect(pg);
            p.send(&full[..full.len() - 5]);
            // a stimulus (the partial packet and the FIN in separate
            // segments), not a wait before an assertion
            std::thread::sleep(Duration::from_millis(100));
            let _ = p.s.shutdown(Shutdown::Write);
            expect_closed(&mut p, label);
            // and one that vanishes completely
            let mut p = Peer::connect(pg);
            p.send(&full[..9]);
            drop(p);
        }
        check("truncated startup");

        // 5. unknown protocol versions
        for (v, label) in [
            (2 << 16, "protocol 2.0"),
            (4 << 16, "protocol 4.0"),
            (1234 << 16 | 5681, "protocol 1234.5681"),
            (-1, "protocol -1"),
        ] {
            let mut p = Peer::connect(pg);
            p.send(&startup(v, &[(b"user", USER.as_bytes())]));
            expect_fatal(&mut p, label, Some("0A000"));
        }
        check("unsupported protocol versions");

        // 6. protocol 3.99 and unknown _pq_ options: NegotiateProtocolVersion, then a normal login
        {
            let label = "protocol 3.99";
            let mut p = Peer::connect(pg);
            p.send(&startup(
                3 << 16 | 99,
                &[
                    (b"user", USER.as_bytes()),
                    (b"database", DB.as_bytes()),
                    (b"_pq_.hostile", b"1"),
                ],
            ));
            let msgs = expect_login(&mut p, label);
            let v = msgs
                .iter()
                .find(|m| m.0 == b'v')
                .unwrap_or_else(|| panic!("{label}: no NegotiateProtocolVersion"));
            // The full version code the server offers: 3.0 up to 17, 3.2 on 18.
            let newest = if nextgres_test::pg_major() >= 18 { 196610 } else { 196608 };
            assert_eq!(be_i32(&v.1, 0), newest, "{label}: newest version");
            assert_eq!(be_i32(&v.1, 4), 1, "{label}: unrecognized options count");
            assert_eq!(&v.1[8..], b"_pq_.hostile\0", "{label}");
            assert_eq!(raw_value(&mut p, "SELECT 7", label).as_deref(), Some("7"));
            terminate(p);
        }
        check("protocol 3.99");

        // 7. missing user / empty user
        {
            let mut p = Peer::connect(pg);
            p.send(&startup(PROTO_3_0, &[(b"database", DB.as_bytes())]));
            expect_fatal(&mut p, "missing user", Some("28000"));
            let mut p = Peer::connect(pg);
            p.send(&startup(
                PROTO_3_0,
                &[(b"user", b""), (b"database", DB.as_bytes())],
            ));
            expect_fatal(&mut p, "empty user", Some("28000"));
            let mut p = Peer::connect(pg);
            p.send(&startup(PROTO_3_0, &[]));
            expect_fatal(&mut p, "no parameters at all", Some("28000"));
        }
        check("missing/empty user");

        // 8. unterminated strings
        {
            let cases: [(&str, &[u8]); 4] = [
                ("no final terminator", b"user\0hostile\0"),
                ("unterminated value", b"user\0hostile"),
                ("unterminated name", b"user"),
                ("name without value", b"user\0hostile\0database\0"),
            ];
            for (label, rest) in cases {
                let mut p = Peer::connect(pg);
                p.send(&packet(PROTO_3_0, rest));
                expect_fatal(&mut p, label, Some("08P01"));
            }
            // terminator not last: bytes after the list's end
            let mut p = Peer::connect(pg);
            p.send(&packet(PROTO_3_0, b"user\0hostile\0\0junk"));
            expect_fatal(&mut p, "data after the terminator", Some("08P01"));
        }
        check("unterminated strings");

        // 9. non-UTF-8 user / database / other parameter (application_name
        // is taken cleaned, as the server cleans it: README)
        for (label, k, v) in [
            ("non-UTF-8 user", &b"user"[..], &b"ho\xffstile"[..]),
            ("non-UTF-8 database", b"database", b"\xc3\x28db"),
            ("non-UTF-8 parameter name", b"appl\xfe", b"x"),
            ("non-UTF-8 options", b"options", b"-c work_mem=\xed\xa0\x80"),
        ] {
            let mut p = Peer::connect(pg);
            let mut params: Vec<(&[u8], &[u8])> = vec![(b"user", USER.as_bytes())];
            if k == b"user" {
                params.clear();
            }
            params.push((k, v));
            p.send(&startup(PROTO_3_0, &params));
            expect_fatal(&mut p, label, None);
        }
        {
            let label = "non-UTF-8 application_name";
            let mut p = Peer::connect(pg);
            p.send(&startup(PROTO_3_0, &[(b"user", USER.as_bytes()), (b"database", b"postgres"), (b"application_name", b"\xed\xa0\x80")]));
            expect_login(&mut p, label);
            let want = if pg.pg_major() >= 16 { "\\xed\\xa0\\x80" } else { "???" };
            assert_eq!(raw_value(&mut p, "SHOW application_name", label).as_deref(), Some(want), "{label}");
            terminate(p);
        }
        check("non-UTF-8 parameters");

        // 10. options string filling the packet to exactly the limit: accepted
        {
            let label = "options at the size limit";
            let base = |opts: &[u8]| {
                startup(
                    PROTO_3_0,
                    &[
                        (b"user", USER.as_bytes()),
                        (b"database", DB.as_bytes()),
                        (b"options", opts),
                    ],
                )
            };
            let mut opts = "-c work_mem=4242kB ".repeat(400).into_bytes();
            let len = base(&opts).len();
            assert!(len < 10_004, "{len}");
            opts.extend(std::iter::repeat(b' ').take(10_004 - len));
            let pkt = base(&opts);
            assert_eq!(pkt.len(), 10_004);
            let mut p = Peer::connect(pg);
            p.send(&pkt);
            expect_login(&mut p, label);
            assert_eq!(
                raw_value(&mut p, "SHOW work_mem", label).as_deref(),
                Some("4242kB")
            );
            terminate(p);
            // one byte more: refused without a login
            opts.push(b' ');
            let mut p = Peer::connect(pg);
            p.send(&base(&opts));
            expect_closed(&mut p, "options one byte over the limit");
        }
        check("huge options");

        // 10b. a top-level setting wins over the same one in options, in
        // either order in the packet (postinit.c applies options first)
        for options_first in [true, false] {
            let label = format!("options and a top-level setting, options first: {options_first}");
            let opts: (&[u8], &[u8]) = (b"options", b"-c application_name=from-options");
            let top: (&[u8], &[u8]) = (b"application_name", b"top-level");
            let mut params: Vec<(&[u8], &[u8])> = vec![(b"user", USER.as_bytes()), (b"database", DB.as_bytes())];
            if options_first {
                params.extend([opts, top]);
            } else {
                params.extend([top, opts]);
            }
            let mut p = Peer::connect(pg);
            p.send(&startup(PROTO_3_0, &params));
            expect_login(&mut p, &label);
            assert_eq!(raw_value(&mut p, "SHOW application_name", &label).as_deref(), Some("top-level"), "{label}");
            terminate(p);
        }
        check("options and a top-level setting");

        // 11. options with bad switches (refused before or after authentication)
        for opts in [
            "-Z foo",
            "-c",
            "-c work_mem",
            "--work_mem",
            "-- stray",
            "plain",
            "-c =1",
            "-c work_mem=bogus",
        ] {
            let label = format!("options {opts:?}");
            let mut p = Peer::connect(pg);
            p.send(&startup(
                PROTO_3_0,
                &[
                    (b"user", USER.as_bytes()),
                    (b"database", DB.as_bytes()),
                    (b"options", opts.as_bytes()),
                ],
            ));
            match login(&mut p, PASSWORD) {
                Ok(m) => panic!(
                    "{label}: logged in: {:?}",
                    m.iter().map(show).collect::<Vec<_>>()
                ),
                Err((msgs, end)) => {
                    assert_ne!(end, End::Timeout, "{label}: hang");
                    let e = msgs
                        .iter()
                        .rev()
                        .find(|m| m.0 == b'E')
                        .unwrap_or_else(|| panic!("{label}: no error"));
                    let (sev, code, _) = error_fields(&e.1);
                    assert_eq!(sev, "FATAL", "{label}");
                    assert!(is_sqlstate(&code), "{label}: {code}");
                }
            }
        }
        check("bad option switches");

        // 12. SSLRequest and GSSENCRequest alternating 50 times, each answered
        // 'N', then a login (as the server allows; the same one twice in a
        // row: repeated_encryption_requests_match_plain_server)
        {
            let label = "repeated SSLRequest";
            let mut p = Peer::connect(pg);
            for i in 0..50 {
                p.send(&packet(
                    if i % 2 == 1 {
                        GSSENC_REQUEST
                    } else {
                        SSL_REQUEST
                    },
                    &[],
                ));
                assert_eq!(p.byte(SETTLE), Ok(b'N'), "{label} #{i}");
            }
            p.send(&user_db());
            expect_login(&mut p, label);
            terminate(p);
        }
        check("repeated SSLRequest");

        // 13. data after SSLRequest before 'N' is read: the server refuses
        // ("received unencrypted data after SSL request") or, with no TLS at
        // all, may go on; either way no hang and no crash.
        {
            let label = "data pipelined after SSLRequest";
            let mut p = Peer::connect(pg);
            let mut b = packet(SSL_REQUEST, &[]);
            b.extend_from_slice(&user_db());
            p.send(&b);
            assert_eq!(p.byte(SETTLE), Ok(b'N'), "{label}");
            match login(&mut p, PASSWORD) {
                Ok(_) => {
                    eprintln!("NOTE {label}: the pooler accepted the pipelined startup (PostgreSQL answers FATAL 08P01)");
                    terminate(p);
                }
                Err((msgs, end)) => {
                    assert_ne!(end, End::Timeout, "{label}: hang");
                    let e = msgs
                        .iter()
                        .find(|m| m.0 == b'E')
                        .unwrap_or_else(|| panic!("{label}: closed silently"));
                    assert_eq!(error_fields(&e.1).1, "08P01", "{label}");
                }
            }
            // garbage pipelined after SSLRequest
            let mut p = Peer::connect(pg);
            let mut b = packet(SSL_REQUEST, &[]);
            b.extend_from_slice(&random_bytes(300));
            p.send(&b);
            // As PostgreSQL: 'N', then FATAL 08P01 for the unencrypted bytes.
            assert_eq!(p.byte(SETTLE), Ok(b'N'), "garbage after SSLRequest");
            expect_fatal(&mut p, "garbage after SSLRequest", Some("08P01"));
        }
        check("data after SSLRequest");

        // 14. CancelRequest with the wrong length, and with random keys
        {
            for (label, rest) in [
                ("CancelRequest short", &[0u8; 4][..]),
                ("CancelRequest long", &[0u8; 12][..]),
            ] {
                let mut p = Peer::connect(pg);
                p.send(&packet(CANCEL_REQUEST, rest));
                expect_closed(&mut p, label);
            }
            // a query in flight must not be cancelled by random keys
            let info = pg.tcp(USER, DB).password(PASSWORD);
            let q = std::thread::spawn(move || {
                let mut c = info.connect()?;
                c.simple_query("SELECT pg_sleep(1.5)")?;
                Ok::<_, postgres::Error>(())
            });
            // Wait until the query runs (its own SCRAM login can take a
            // while), so the cancels below land while it is in flight.
            let running = wait_until(SETTLE, || {
                let n: i64 = pg
                    .admin()
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                          WHERE state = 'active' AND query = 'SELECT pg_sleep(1.5)'",
                        &[],
                    )
                    .expect("pg_stat_activity")
                    .get(0);
                n == 1 || q.is_finished()
            });
            assert!(
                running && !q.is_finished(),
                "the query under test never showed as running: {:?}",
                q.is_finished()
            );
            let backends: Vec<i32> = pg
                .admin()
                .query("SELECT pid FROM nextgres.backends", &[])
                .expect("nextgres.backends")
                .iter()
                .map(|r| r.get(0))
                .collect();
            for i in 0..60 {
                let mut rest = random_bytes(8);
                if i % 2 == 0 && !backends.is_empty() {
                    // real pids, random keys
                    rest[..4].copy_from_slice(&backends[i % backends.len()].to_be_bytes());
                }
                let mut p = Peer::connect(pg);
                p.send(&packet(CANCEL_REQUEST, &rest));
                expect_closed(&mut p, &format!("CancelRequest random keys #{i}"));
            }
            let r = q.join().expect("query thread");
            assert!(
                r.is_ok(),
                "a random-key CancelRequest cancelled a query: {r:?}"
            );
        }
        check("CancelRequest");

        // 15. garbage instead of a startup packet
        for i in 0..5 {
            let mut p = Peer::connect(pg);
            let mut b = random_bytes(4096);
            b[0] = 0; // keep the length word plausible for some
            if i % 2 == 0 {
                b[..4].copy_from_slice(&200i32.to_be_bytes());
            }
            p.send(&b);
            expect_closed(&mut p, &format!("garbage startup #{i}"));
        }
        // an HTTP request
        let mut p = Peer::connect(pg);
        p.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        expect_closed(&mut p, "HTTP request");
        check("garbage");

        assert_no_leftover_clients(pg, "startup batch");
        check("end of startup batch");
    });
}

/// Abuse during authentication: SCRAM garbage, wrong nonces and proofs,
/// replays, wrong message types and lengths.
#[test]
fn hostile_authentication() {
    run(|pg, pooler| {
        let check = |label: &str| assert_serves(pg, pooler, label);

        // control: the raw SCRAM client logs in
        {
            let (mut p, bare, sf) = Peer::scram_begin(pg, "raw SCRAM control");
            p.send(&msg(b'p', client_final(&bare, &sf, PASSWORD).as_bytes()));
            let mut p2 = p;
            let msgs = expect_login(&mut p2, "raw SCRAM control");
            assert!(
                msgs.iter().any(|m| m.0 == b'R' && be_i32(&m.1, 0) == 12),
                "SASLFinal"
            );
            terminate(p2);
        }

        // 1. SASLInitialResponse with an unknown mechanism
        for mech in ["SCRAM-SHA-1", "", "SCRAM-SHA-256-PLUS", "PLAIN"] {
            let label = format!("unknown SASL mechanism {mech:?}");
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, &label);
            p.send(&sasl_initial(mech, Some(b"n,,n=,r=abcdefgh")));
            expect_fatal(&mut p, &label, None);
        }
        check("unknown mechanism");

        // 2. malformed client-first messages
        let bad_first: [&[u8]; 8] = [
            b"",
            b"garbage",
            b"n,,",
            b"p=tls-server-end-point,,n=,r=abc",
            // (An empty nonce is no refusal: the server accepts it.)
            b"n,,n=,r=\x01",
            b"n,,m=ext,n=,r=abc",
            b"n,,n=,r=abc\xff\xfe",
            b"n,,n=,r=a,b",
        ];
        for first in bad_first {
            let label = format!(
                "malformed client-first {:?}",
                String::from_utf8_lossy(first)
            );
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, &label);
            p.send(&sasl_initial("SCRAM-SHA-256", Some(first)));
            expect_fatal(&mut p, &label, None);
        }
        {
            // "y": the client could bind but thinks the server cannot; without
            // TLS that is accepted, as by the server
            let label = "client-first with gs2 flag y";
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            p.send(&sasl_initial("SCRAM-SHA-256", Some(b"y,,n=,r=abcdefgh")));
            p.expect_auth(11, label);
            terminate(p);
        }
        {
            // data length -1 (no initial response: an empty challenge, as
            // the server answers, then a garbage SASLResponse), and a data
            // length that disagrees with the message
            let label = "client-first with length -1";
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            p.send(&sasl_initial("SCRAM-SHA-256", None));
            p.expect_auth(11, label);
            p.send(&msg(b'p', b"garbage"));
            expect_fatal(&mut p, label, Some("08P01"));
            for claimed in [1000i32, -5, 3] {
                let label = format!("client-first data length {claimed} for 16 bytes");
                let mut p = Peer::connect(pg);
                p.send(&user_db());
                p.expect_auth(10, &label);
                let mut b = b"SCRAM-SHA-256\0".to_vec();
                b.extend_from_slice(&claimed.to_be_bytes());
                b.extend_from_slice(b"n,,n=,r=abcdefgh");
                p.send(&msg(b'p', &b));
                expect_fatal(&mut p, &label, None);
            }
            let label = "SASLInitialResponse without a mechanism terminator";
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            p.send(&msg(b'p', b"SCRAM-SHA-256"));
            expect_fatal(&mut p, label, None);
        }
        check("malformed client-first");

        // 3. client-final with a wrong nonce, wrong proof, garbage
        {
            let label = "client-final with a wrong nonce";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let good = client_final(&bare, &sf, PASSWORD);
            let nonce = sf
                .split(',')
                .next()
                .unwrap()
                .trim_start_matches("r=")
                .to_string();
            let mut wrong = nonce.clone().into_bytes();
            let last = wrong.len() - 1;
            wrong[last] = if wrong[last] == b'A' { b'B' } else { b'A' };
            let forged = good.replace(&nonce, std::str::from_utf8(&wrong).unwrap());
            p.send(&msg(b'p', forged.as_bytes()));
            expect_fatal(&mut p, label, None);

            let label = "client-final with a truncated nonce (client part only)";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let cnonce = bare.trim_start_matches("n=,r=").to_string();
            let good = client_final(&bare, &sf, PASSWORD);
            let nonce = sf
                .split(',')
                .next()
                .unwrap()
                .trim_start_matches("r=")
                .to_string();
            p.send(&msg(b'p', good.replace(&nonce, &cnonce).as_bytes()));
            expect_fatal(&mut p, label, None);

            let label = "client-final with a wrong proof";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            p.send(&msg(
                b'p',
                client_final(&bare, &sf, "not-the-password").as_bytes(),
            ));
            expect_fatal(&mut p, label, Some("28P01"));

            let label = "client-final with a short proof";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let good = client_final(&bare, &sf, PASSWORD);
            let cut = good.find(",p=").unwrap() + 3;
            p.send(&msg(b'p', format!("{}AAAA", &good[..cut]).as_bytes()));
            expect_fatal(&mut p, label, None);

            let label = "client-final with invalid base64 proof";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let good = client_final(&bare, &sf, PASSWORD);
            let cut = good.find(",p=").unwrap() + 3;
            p.send(&msg(b'p', format!("{}!!!!", &good[..cut]).as_bytes()));
            expect_fatal(&mut p, label, None);

            let label = "client-final with wrong channel binding";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let good = client_final(&bare, &sf, PASSWORD);
            p.send(&msg(b'p', good.replacen("c=biws", "c=eSws", 1).as_bytes()));
            expect_fatal(&mut p, label, None);

            for garbage in [
                &b""[..],
                b"garbage",
                b"c=biws",
                b"\0\0\0\0",
                &random_bytes(500),
            ] {
                let label = format!(
                    "client-final garbage {:?}",
                    String::from_utf8_lossy(&garbage[..garbage.len().min(16)])
                );
                let (mut p, _, _) = Peer::scram_begin(pg, &label);
                p.send(&msg(b'p', garbage));
                expect_fatal(&mut p, &label, None);
            }
        }
        check("bad client-final");

        // 4. replay of a previous session's (valid) client-final
        {
            let label = "replayed client-final";
            let (mut p, bare, sf) = Peer::scram_begin(pg, "session to be replayed");
            let recorded = client_final(&bare, &sf, PASSWORD);
            p.send(&msg(b'p', recorded.as_bytes()));
            expect_login(&mut p, "session to be replayed");
            terminate(p);
            // same client-first (same client nonce) too: a full replay
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            p.send(&sasl_initial(
                "SCRAM-SHA-256",
                Some(format!("n,,{bare}").as_bytes()),
            ));
            let sf2 = String::from_utf8(p.expect_auth(11, label)).unwrap();
            assert_ne!(sf2, sf, "{label}: the server reused its nonce");
            p.send(&msg(b'p', recorded.as_bytes()));
            expect_fatal(&mut p, label, None);
            // and pipelined with no wait at all
            let mut p = Peer::connect(pg);
            let mut b = user_db();
            b.extend_from_slice(&sasl_initial(
                "SCRAM-SHA-256",
                Some(format!("n,,{bare}").as_bytes()),
            ));
            b.extend_from_slice(&msg(b'p', recorded.as_bytes()));
            p.send(&b);
            expect_fatal(&mut p, "replayed client-final, pipelined", None);
        }
        check("replay");

        // 5. password message right after startup (before reading the request)
        {
            let label = "PasswordMessage pipelined after startup";
            let mut p = Peer::connect(pg);
            let mut b = user_db();
            b.extend_from_slice(&msg(b'p', format!("{PASSWORD}\0").as_bytes()));
            p.send(&b);
            expect_fatal(&mut p, label, None);
        }
        // wrong message types during authentication
        for tag in [b'Q', b'X', b'S', 0u8, 0xff] {
            let label = format!("message '{}' during authentication", tag as char);
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, &label);
            let body: &[u8] = if tag == b'Q' { b"SELECT 1\0" } else { b"" };
            p.send(&msg(tag, body));
            expect_closed(&mut p, &label);
        }
        check("unexpected messages during auth");

        // 6. oversized and negative message lengths during authentication
        for len in [65_536i32 + 4, 1 << 30, i32::MAX, -1, -100, 0, 3] {
            let label = format!("auth message length {len}");
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, &label);
            let mut b = vec![b'p'];
            b.extend_from_slice(&len.to_be_bytes());
            p.send(&b);
            expect_closed(&mut p, &label);
        }
        {
            // a really large one, actually sent
            let label = "auth message of 70000 bytes";
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            let mut body = b"SCRAM-SHA-256\0".to_vec();
            body.extend_from_slice(&(70_000i32 - 18).to_be_bytes());
            body.resize(70_000, b'n');
            p.send(&msg(b'p', &body));
            expect_closed(&mut p, label);
        }
        check("bad auth message lengths");

        // 7. SCRAM messages out of order
        {
            let label = "client-final as the first SASL message";
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, label);
            p.send(&msg(b'p', b"c=biws,r=abc,p=AAAA"));
            expect_fatal(&mut p, label, None);

            let label = "second client-first instead of client-final";
            let (mut p, bare, _) = Peer::scram_begin(pg, label);
            p.send(&sasl_initial(
                "SCRAM-SHA-256",
                Some(format!("n,,{bare}").as_bytes()),
            ));
            expect_fatal(&mut p, label, None);

            let label = "message after a failed proof";
            let (mut p, bare, sf) = Peer::scram_begin(pg, label);
            let mut b = msg(b'p', client_final(&bare, &sf, "wrong").as_bytes());
            b.extend_from_slice(&msg(b'Q', b"SELECT 1\0"));
            p.send(&b);
            expect_fatal(&mut p, label, Some("28P01"));
        }
        check("out-of-order SCRAM");

        // 8. half-open sockets: before startup, and mid-authentication
        {
            let mut p = Peer::connect(pg);
            let _ = p.s.shutdown(Shutdown::Write);
            expect_closed(&mut p, "half-open before startup");
            let mut p = Peer::connect(pg);
            p.send(&user_db());
            p.expect_auth(10, "half-open during auth");
            let _ = p.s.shutdown(Shutdown::Write);
            expect_closed(&mut p, "half-open during auth");
            let (mut p, _, _) = Peer::scram_begin(pg, "half-open after server-first");
            let _ = p.s.shutdown(Shutdown::Write);
            expect_closed(&mut p, "half-open after server-first");
        }
        check("half-open");

        assert_no_leftover_clients(pg, "authentication batch");
        check("end of authentication batch");
    });
}

/// Resource abuse: slowloris clients bounded by authentication_timeout, a
/// flood beyond nextgres.max_client_conn, rapid connect/close cycles.
#[test]
fn hostile_resource_abuse() {
    run(|pg, pooler| {
        let check = |label: &str| assert_serves(pg, pooler, label);

        // 1. slowloris: 3 bytes of a startup packet, then nothing. Bounds
        // from the server's own authentication_timeout (2 s here): closed no
        // sooner than it and within three times it.
        let auth_timeout = authentication_timeout(pg);
        let bound = auth_timeout * 3;
        {
            let label = "slowloris (3 bytes of startup)";
            let t0 = Instant::now();
            let mut slow = Peer::connect(pg);
            slow.send(&user_db()[..3]);
            // another slow one, stalled in authentication
            let mut slow_auth = Peer::connect(pg);
            slow_auth.send(&user_db());
            slow_auth.expect_auth(10, "slowloris in auth");
            // meanwhile others are served
            check(&format!("{label}: others served meanwhile"));
            let (msgs, end) = slow.finish(bound.saturating_sub(t0.elapsed()));
            let waited = t0.elapsed();
            assert_ne!(
                end,
                End::Timeout,
                "{label}: still open after {waited:?} (authentication_timeout = {auth_timeout:?})"
            );
            assert!(msgs.iter().all(|m| m.0 == b'E'), "{label}: {msgs:?}");
            assert!(
                waited >= auth_timeout,
                "{label}: closed after only {waited:?} (authentication_timeout = {auth_timeout:?})"
            );
            let (msgs, end) = slow_auth.finish(bound.saturating_sub(t0.elapsed()));
            assert_ne!(
                end,
                End::Timeout,
                "slowloris in auth: still open after {:?} (authentication_timeout = {auth_timeout:?})",
                t0.elapsed()
            );
            assert!(
                msgs.iter().all(|m| m.0 == b'E'),
                "slowloris in auth: {msgs:?}"
            );
            // a trickle: one byte at a time, slower than the timeout allows
            let label = "slowloris trickle";
            let mut p = Peer::connect(pg);
            let pkt = user_db();
            let t0 = Instant::now();
            let mut closed = false;
            for b in &pkt {
                if p.s.write_all(&[*b]).is_err() {
                    closed = true;
                    break;
                }
                // the trickle itself: one byte every 300 ms (a stimulus,
                // not a wait for a state)
                std::thread::sleep(Duration::from_millis(300));
                if t0.elapsed() > bound {
                    break;
                }
            }
            if !closed {
                let (msgs, end) = p.finish(bound.saturating_sub(t0.elapsed()));
                assert_ne!(end, End::Timeout, "{label}: still open");
                assert!(
                    !msgs.iter().any(|m| m.0 == b'R'),
                    "{label}: startup completed over {:?}: {msgs:?}",
                    t0.elapsed()
                );
            }
        }
        check("slowloris");
        assert_no_leftover_clients(pg, "slowloris");

        // 2. flood beyond nextgres.max_client_conn with sockets that never send
        {
            let label = "connection flood";
            assert_eq!(client_count(pg), 0, "{label}: clients before");
            let mut socks: Vec<Peer> = (0..30).map(|_| Peer::connect(pg)).collect();
            // Refusals are written at accept; held sockets stay silent until
            // authentication_timeout. Poll every socket not yet refused until
            // the pooler lists MAX_CLIENTS clients and the other sockets have
            // their refusal (no fixed sleep: a state with a bound).
            let mut is_refused = vec![false; socks.len()];
            let mut refused = 0;
            let settled = wait_until(auth_timeout, || {
                for (i, p) in socks.iter_mut().enumerate() {
                    if is_refused[i] {
                        continue;
                    }
                    match p.next(Duration::from_millis(1)) {
                        Ok((b'E', body)) => {
                            let (sev, code, message) = error_fields(&body);
                            assert_eq!(
                                (sev.as_str(), code.as_str()),
                                ("FATAL", "53300"),
                                "{label} #{i}: {message}"
                            );
                            assert_eq!(message, "sorry, too many clients already", "{label} #{i}");
                            is_refused[i] = true;
                            refused += 1;
                        }
                        Ok(m) => panic!("{label} #{i}: {}", show(&m)),
                        Err(End::Timeout) => {}
                        Err(e) => panic!("{label} #{i}: closed without an error ({e:?})"),
                    }
                }
                refused == 30 - MAX_CLIENTS && client_count(pg) == MAX_CLIENTS as i64
            });
            let silent = socks.len() - refused;
            assert!(
                settled,
                "{label}: {refused} refused, {} clients listed",
                client_count(pg)
            );
            assert_eq!(
                (silent, refused),
                (MAX_CLIENTS, 30 - MAX_CLIENTS),
                "{label}: admitted/refused"
            );
            // a normal client is refused too while the slots are held
            let info = pg.tcp(USER, DB).password(PASSWORD);
            let r = with_timeout(SETTLE, "client during flood", move || {
                info.connect().map(|_| ())
            });
            let e = r.expect_err("a client got in beyond max_client_conn");
            assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{label}: {e:?}");
            socks.clear();
            assert_no_leftover_clients(pg, label);
        }
        check("after the flood");

        // 3. 200 rapid connect/close cycles, some with partial bytes
        {
            let pkt = user_db();
            for i in 0..200 {
                let mut p = Peer::connect(pg);
                match i % 4 {
                    0 => {}
                    1 => p.send(&pkt[..(i % pkt.len()).max(1)]),
                    2 => p.send(&pkt),
                    _ => {
                        p.send(&pkt);
                        let _ = p.s.shutdown(Shutdown::Both);
                    }
                }
                drop(p);
            }
            assert_no_leftover_clients(pg, "rapid connect/close");
        }
        check("rapid connect/close");

        // 4. many half-open sockets at once
        {
            let mut socks: Vec<Peer> = (0..15).map(|_| Peer::connect(pg)).collect();
            for p in &socks {
                let _ = p.s.shutdown(Shutdown::Write);
            }
            for (i, p) in socks.iter_mut().enumerate() {
                expect_closed(p, &format!("half-open socket #{i}"));
            }
        }
        assert_no_leftover_clients(pg, "half-open sockets");
        check("end of resource batch");
    });
}

// ---- the same bytes against plain PostgreSQL -----------------------------------------

/// What a server answers to a startup-phase byte sequence, up to its first
/// decision: the single-byte SSL/GSS answers, message tags (with the code of
/// authentication requests and the SQLSTATE of errors), and how it ended
/// (`R10` stops the read: the server waits for a password).
fn startup_transcript(pg: &Cluster, bytes: &[u8], then_close_write: bool) -> String {
    let mut p = Peer::connect(pg);
    p.send(bytes);
    if then_close_write {
        let _ = p.s.shutdown(Shutdown::Write);
    }
    let mut out = Vec::new();
    let requests = bytes.len() >= 8
        && [SSL_REQUEST, GSSENC_REQUEST].contains(&be_i32(bytes, 4))
        && be_i32(bytes, 0) == 8;
    if requests {
        match p.byte(Duration::from_secs(5)) {
            Ok(b) => out.push(format!("{}", b as char)),
            Err(e) => return format!("{e:?}"),
        }
    }
    loop {
        match p.next(Duration::from_secs(5)) {
            Ok((b'R', body)) => {
                out.push(format!("R{}", be_i32(&body, 0)));
                break;
            }
            Ok((b'E', body)) => out.push(format!("E{}", error_fields(&body).1)),
            Ok((tag, _)) => out.push((tag as char).to_string()),
            Err(End::Eof) | Err(End::Reset) => {
                out.push("closed".into());
                break;
            }
            Err(End::Timeout) => {
                out.push("hang".into());
                break;
            }
            Err(End::Garbage) => {
                out.push("non-v3 bytes".into());
                break;
            }
        }
    }
    out.join(" ")
}

/// Malformed startup packets answered as PostgreSQL itself answers them (a
/// plain server on the same data: same SQLSTATE, or the same silent close),
/// and logged as it logs them (the same FATAL lines, with DETAIL and HINT),
/// apart from the deliberate divergences listed in `KNOWN`, where the
/// pooler's own answer is asserted exactly.
#[test]
fn hostile_startup_matches_plain_server() {
    let plain = plain_server("hostile_plain");
    run(move |pg, pooler| {
        let u = USER.as_bytes();
        let truncated = user_db()[..20].to_vec();
        let mut over = vec![0u8; 10_001];
        over[..4].copy_from_slice(&PROTO_3_0.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            ("length 0", 0i32.to_be_bytes().to_vec(), false),
            (
                "length 7",
                [&7i32.to_be_bytes()[..], &[0, 3, 0]].concat(),
                false,
            ),
            ("length -1", (-1i32).to_be_bytes().to_vec(), false),
            (
                "length 10005",
                [&10_005i32.to_be_bytes()[..], &PROTO_3_0.to_be_bytes()].concat(),
                false,
            ),
            ("body over the limit", packet(PROTO_3_0, &over[4..]), false),
            ("truncated, write side closed", truncated, true),
            ("protocol 2.0", startup(2 << 16, &[(b"user", u)]), false),
            ("protocol 4.0", startup(4 << 16, &[(b"user", u)]), false),
            (
                "protocol 3.99",
                startup(3 << 16 | 99, &[(b"user", u)]),
                false,
            ),
            (
                "_pq_ option",
                startup(PROTO_3_0, &[(b"user", u), (b"_pq_.x", b"1")]),
                false,
            ),
            (
                "missing user",
                startup(PROTO_3_0, &[(b"database", b"postgres")]),
                false,
            ),
            ("empty user", startup(PROTO_3_0, &[(b"user", b"")]), false),
            (
                "no final terminator",
                packet(PROTO_3_0, b"user\0hostile\0"),
                false,
            ),
            (
                "unterminated value",
                packet(PROTO_3_0, b"user\0hostile"),
                false,
            ),
            (
                "data after terminator",
                packet(PROTO_3_0, b"user\0hostile\0\0junk"),
                false,
            ),
            (
                "non-UTF-8 user",
                startup(PROTO_3_0, &[(b"user", b"ho\xffstile")]),
                false,
            ),
            ("SSLRequest alone", packet(SSL_REQUEST, &[]), false),
            (
                "CancelRequest short",
                packet(CANCEL_REQUEST, &[0; 4]),
                false,
            ),
            (
                "CancelRequest long",
                packet(CANCEL_REQUEST, &[0; 12]),
                false,
            ),
            (
                "CancelRequest unknown key",
                packet(CANCEL_REQUEST, &[0, 0, 0, 1, 0, 0, 0, 2]),
                false,
            ),
            (
                "options -Z",
                startup(PROTO_3_0, &[(b"user", u), (b"options", b"-Z foo")]),
                false,
            ),
            (
                "replication=true",
                startup(PROTO_3_0, &[(b"user", u), (b"replication", b"true")]),
                false,
            ),
            (
                "replication=database",
                startup(PROTO_3_0, &[(b"user", u), (b"replication", b"database")]),
                false,
            ),
            (
                "replication=bogus",
                startup(PROTO_3_0, &[(b"user", u), (b"replication", b"bogus")]),
                false,
            ),
        ];
        // Deliberate divergences (PostgreSQL 15/16): the pooler's own answer,
        // asserted exactly, whatever the server answers.
        const KNOWN: &[(&str, &str)] = &[
            // The server checks no encoding at startup; the pooler refuses.
            ("non-UTF-8 user", "E08P01 closed"),
            // The server applies options after authentication; the pooler checks first.
            ("options -Z", "E42601 closed"),
            // The server answers a 2.0 client in the 2.0 error format.
            ("protocol 2.0", "E0A000 closed"),
            // (A CancelRequest of the wrong length is closed silently, as by
            // the server: compared like every other case.)
        ];
        let mut diffs = Vec::new();
        let mut known_seen = 0;
        for (label, bytes, close) in &cases {
            let (plain_mark, mark) = (plain.log_mark(), pg.log_mark());
            let want = startup_transcript(&plain, bytes, *close);
            let got = startup_transcript(pg, bytes, *close);
            eprintln!("[{label}] server: {want:<24} pooler: {got}");
            // Both write a refusal to the log before the client reads it.
            let (want_log, got_log) = (refusal_log(&plain.log_since(plain_mark)), refusal_log(&pg.log_since(mark)));
            if want_log != got_log && !KNOWN.iter().any(|(l, _)| l == label) {
                diffs.push(format!("{label}: server logged {want_log:?}, pooler {got_log:?}"));
            }
            assert!(!got.contains("hang"), "{label}: the pooler hung: {got}");
            match KNOWN.iter().find(|(l, _)| l == label) {
                Some((_, pooler)) => {
                    known_seen += 1;
                    if got != *pooler {
                        diffs.push(format!("{label}: pooler {got:?}, documented {pooler:?}"));
                    }
                }
                None if want != got => {
                    diffs.push(format!("{label}: server {want:?}, pooler {got:?}"))
                }
                None => {}
            }
        }
        assert_eq!(known_seen, KNOWN.len(), "a KNOWN label matches no case");
        assert_serves(pg, pooler, "after the differential cases");
        assert_no_leftover_clients(pg, "differential cases");
        assert!(
            diffs.is_empty(),
            "the pooler answers unlike PostgreSQL:\n{}",
            diffs.join("\n")
        );
    });
}

/// Plain PostgreSQL (no pooler) with the same roles and hba: the reference.
fn plain_server(label: &str) -> Cluster {
    let plain = Cluster::builder()
        .preload(false)
        .hba(HBA)
        .conf("authentication_timeout = 2s")
        .label(label)
        .start();
    plain.create_role(USER, PASSWORD, PasswordEncryption::ScramSha256);
    plain
}

/// A StartupMessage sent in the same write as the SSLRequest, before the
/// client has read the server's one-byte answer, is refused as PostgreSQL
/// (since the fix for CVE-2021-23214) refuses it: 'N', then FATAL 08P01
/// "received unencrypted data after SSL request". Compared with a plain
/// server; a pooler that authenticated the pipelined packet fails here.
#[test]
fn data_pipelined_after_ssl_request_is_refused() {
    let plain = plain_server("hostile_plain_ssl");
    run(move |pg, pooler| {
        let mut bytes = packet(SSL_REQUEST, &[]);
        bytes.extend_from_slice(&user_db());
        let want = startup_transcript(&plain, &bytes, false);
        let got = startup_transcript(pg, &bytes, false);
        eprintln!("[SSLRequest + pipelined startup] server: {want} pooler: {got}");
        assert_serves(pg, pooler, "after SSLRequest + pipelined startup");
        assert_eq!(
            got, want,
            "data pipelined after SSLRequest: the pooler answers unlike PostgreSQL"
        );
    });
}

/// How a full login attempt with the right password ends: `ok` (ReadyForQuery)
/// or the last SQLSTATE before the close ("closed" if none, "hang").
fn login_transcript(pg: &Cluster, bytes: &[u8]) -> String {
    let mut p = Peer::connect(pg);
    p.send(bytes);
    match login(&mut p, PASSWORD) {
        Ok(_) => {
            terminate(p);
            "ok".into()
        }
        Err((msgs, end)) => match msgs.iter().rev().find(|m| m.0 == b'E') {
            Some(e) => format!("E{}", error_fields(&e.1).1),
            None if end == End::Timeout => "hang".into(),
            None => format!("closed ({end:?})"),
        },
    }
}

/// Runs each login against the plain server and the pooler; the
/// differences (label: server vs pooler).
fn login_differential(
    plain: &Cluster,
    pg: &Cluster,
    pooler: i32,
    cases: &[(String, Vec<u8>)],
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (label, bytes) in cases {
        let want = login_transcript(plain, bytes);
        let got = login_transcript(pg, bytes);
        eprintln!("[{label}] server: {want:<12} pooler: {got}");
        assert_ne!(got, "hang", "{label}: the pooler hung");
        if want != got {
            diffs.push(format!("{label}: server {want:?}, pooler {got:?}"));
        }
        assert_serves(pg, pooler, label);
    }
    assert_no_leftover_clients(pg, "names");
    diffs
}

fn login_packet(user: &str, db: Option<&str>) -> Vec<u8> {
    match db {
        Some(d) => startup(
            PROTO_3_0,
            &[(b"user", user.as_bytes()), (b"database", d.as_bytes())],
        ),
        None => startup(PROTO_3_0, &[(b"user", user.as_bytes())]),
    }
}

/// Names the server cannot find: logins end as they end on the server
/// (unknown roles fail SCRAM like a wrong password: no user enumeration).
#[test]
fn hostile_names_match_plain_server() {
    let plain = plain_server("hostile_plain_names");
    run(move |pg, pooler| {
        let a9000 = "a".repeat(9000);
        let e_acute = "\u{e9}".repeat(40);
        let db_long = format!("{DB}{}", "x".repeat(100));
        let cases: Vec<(String, Vec<u8>)> = vec![
            ("control".into(), login_packet(USER, Some(DB))),
            ("unknown role".into(), login_packet("ghost", Some(DB))),
            (
                "role name of 9000 bytes".into(),
                login_packet(&a9000, Some(DB)),
            ),
            (
                "role name of 40 two-byte characters".into(),
                login_packet(&e_acute, Some(DB)),
            ),
            (
                "database name of 9000 bytes".into(),
                login_packet(USER, Some(&a9000)),
            ),
            (
                "database name of 108 bytes".into(),
                login_packet(USER, Some(&db_long)),
            ),
            (
                "no database: defaults to the role name".into(),
                login_packet(USER, None),
            ),
        ];
        let diffs = login_differential(&plain, pg, pooler, &cases);
        assert!(
            diffs.is_empty(),
            "the pooler answers unlike PostgreSQL:\n{}",
            diffs.join("\n")
        );
    });
}

/// PostgreSQL truncates the user and database names of a StartupMessage to
/// NAMEDATALEN - 1 (63) bytes, at a character boundary, before looking them
/// up ("This avoids lookup failures when overlength names are given"), so a
/// 100-byte name whose first 63 bytes name a role or database logs in. The
/// pooler must answer each case as a plain server does (a pooler that looked
/// up the whole name would refuse those logins and fail here).
#[test]
fn overlong_names_are_truncated_like_server() {
    let role63 = "h".repeat(63);
    let db63 = "d".repeat(63);
    let plain = plain_server("hostile_plain_trunc");
    plain.create_role(&role63, PASSWORD, PasswordEncryption::ScramSha256);
    plain.create_database(&db63, USER);
    run(move |pg, pooler| {
        pg.create_role(&role63, PASSWORD, PasswordEncryption::ScramSha256);
        pg.create_database(&db63, USER);
        let role100 = "h".repeat(100);
        let db100 = "d".repeat(100);
        // 62 bytes of "h" and a two-byte character straddling byte 63
        let role_mb = format!("{}\u{e9}", "h".repeat(62));
        let cases: Vec<(String, Vec<u8>)> = vec![
            (
                "role name of 63 bytes".into(),
                login_packet(&role63, Some(DB)),
            ),
            (
                "database name of 63 bytes".into(),
                login_packet(USER, Some(&db63)),
            ),
            (
                "role name of 100 bytes, first 63 a role".into(),
                login_packet(&role100, Some(DB)),
            ),
            (
                "database name of 100 bytes, first 63 a database".into(),
                login_packet(USER, Some(&db100)),
            ),
            (
                "role name cut inside a character".into(),
                login_packet(&role_mb, Some(DB)),
            ),
        ];
        let diffs = login_differential(&plain, pg, pooler, &cases);
        assert!(
            diffs.is_empty(),
            "over-long names: the pooler answers unlike PostgreSQL:\n{}",
            diffs.join("\n")
        );
    });
}

/// Normal clients interleaved with hostile sockets the pooler closes: every
/// normal client must log in and run its query (a closed slot must never be
/// confused with the next client's).
#[test]
fn normal_clients_between_hostile_closes() {
    run(|pg, pooler| {
        let mut failures = Vec::new();
        for i in 0..150 {
            for len in [-1i32, 4, 10_005] {
                let mut p = Peer::connect(pg);
                p.send(&len.to_be_bytes());
                drop(p);
            }
            let info = pg.tcp(USER, DB).password(PASSWORD);
            let r = with_timeout(SETTLE, "normal client", move || {
                let mut c = info.connect().map_err(|e| format!("connect: {e:?}"))?;
                c.query_one("SELECT 1", &[])
                    .map_err(|e| format!("query: {e:?}"))?;
                Ok::<_, String>(())
            });
            if let Err(e) = r {
                failures.push(format!("#{i}: {e}"));
            }
        }
        assert_serves(pg, pooler, "after the interleaving");
        assert!(
            failures.is_empty(),
            "{} of 150 normal clients failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    });
}

/// A client that never reads its final error. The pooler's write of the
/// FATAL would block (the client's socket buffers full: here strace makes
/// every sendto(2) of the pooler answer EAGAIN, as a full socket does), so
/// the error stays in the pooler's buffer. The connection is still closed
/// within `CLOSING_WITHIN` (5 s) and a janitor tick, as the server's own
/// process would be gone by then: a client that reads nothing must not hold
/// one of the pooler's client slots (`max_client_conn`) for ever.
#[test]
fn final_error_never_read_does_not_hold_the_connection() {
    run(|pg, pooler| {
        let label = "FATAL never read";
        let mut p = Peer::connect(pg);
        assert!(wait_until(SETTLE, || client_count(pg) == 1), "{label}: the connection was not accepted");
        let full = nextgres_test::procs::Strace::attach(pooler, &["-e", "trace=sendto", "-e", "inject=sendto:error=EAGAIN"]);
        // Protocol 2.0: refused with FATAL 0A000 at once, before any login.
        p.send(&startup(2 << 16, &[(b"user", USER.as_bytes()), (b"database", DB.as_bytes())]));
        let t0 = Instant::now();
        let (msgs, end) = p.finish(Duration::from_secs(20));
        let waited = t0.elapsed();
        drop(full);
        assert_ne!(end, End::Timeout, "{label}: still open after {waited:?}, its FATAL unsent");
        assert!(msgs.is_empty(), "{label}: the pooler wrote through the injected EAGAIN? {msgs:?}");
        assert_no_leftover_clients(pg, label);
        assert_serves(pg, pooler, label);
    });
}

/// SSLRequest / GSSENCRequest sequences, each sent after the answer to the
/// one before, then a startup packet (ssl off here: every request refused
/// with 'N'). The server lets a refused SSLRequest be followed by a
/// GSSENCRequest and the other way round, any number of times, but the
/// same request twice in a row falls through to the version check: FATAL
/// 0A000 "unsupported frontend protocol 1234.5679" (backend_startup.c
/// ProcessStartupPacket's ssl_done / gss_done; before, the pooler answered
/// 'N' again and again). SSLRequest sequences are compared with a plain
/// server. A server built with GSSAPI answers 'G' to any TCP GSSENCRequest,
/// while the pooler, without GSS encryption, answers 'N' as a server built
/// without it does, so sequences with GSSENCRequest are asserted as such a
/// server's state machine answers them.
#[test]
fn repeated_encryption_requests_match_plain_server() {
    let plain = plain_server("hostile_negotiation");
    run(move |pg, pooler| {
        fn transcript(pg: &Cluster, seq: &[i32]) -> String {
            let mut p = Peer::connect(pg);
            let mut out = Vec::new();
            for &code in seq {
                p.send(&packet(code, &[]));
                match p.byte(Duration::from_secs(5)) {
                    Ok(b'N') => out.push("N".to_string()),
                    Ok(b'E') => {
                        p.buf.insert(0, b'E');
                        let (msgs, end) = p.finish(Duration::from_secs(5));
                        out.extend(msgs.iter().map(|(_, body)| format!("E{}", error_fields(body).1)));
                        out.push(format!("{end:?}"));
                        return out.join(" ");
                    }
                    Ok(b) => out.push(format!("{:?}", b as char)),
                    Err(e) => {
                        out.push(format!("{e:?}"));
                        return out.join(" ");
                    }
                }
            }
            p.send(&user_db());
            match p.next(Duration::from_secs(5)) {
                Ok((b'R', body)) => out.push(format!("R{}", be_i32(&body, 0))),
                Ok((b'E', body)) => out.push(format!("E{}", error_fields(&body).1)),
                Ok((tag, _)) => out.push((tag as char).to_string()),
                Err(e) => out.push(format!("{e:?}")),
            }
            out.join(" ")
        }
        let (ssl, gss) = (SSL_REQUEST, GSSENC_REQUEST);
        let name = |seq: &[i32]| seq.iter().map(|&c| if c == ssl { "SSL" } else { "GSS" }).collect::<Vec<_>>().join(",");
        let mut diffs = Vec::new();
        let same_as_server: &[&[i32]] = &[&[ssl], &[ssl, ssl], &[ssl, ssl, ssl]];
        for seq in same_as_server {
            let (want, got) = (transcript(&plain, seq), transcript(pg, seq));
            eprintln!("[{}] server: {want:<20} pooler: {got}", name(seq));
            if want != got {
                diffs.push(format!("{}: server {want:?}, pooler {got:?}", name(seq)));
            }
        }
        let refused = "E0A000 Eof";
        let as_without_gssapi: &[(&[i32], String)] = &[
            (&[gss], "N R10".into()),
            (&[gss, gss], format!("N {refused}")),
            (&[ssl, gss], "N N R10".into()),
            (&[gss, ssl], "N N R10".into()),
            (&[ssl, gss, ssl, gss, ssl], "N N N N N R10".into()),
            (&[gss, ssl, ssl], format!("N N {refused}")),
            (&[ssl, gss, gss], format!("N N {refused}")),
        ];
        for (seq, want) in as_without_gssapi {
            let got = transcript(pg, seq);
            eprintln!("[{}] expected: {want:<20} pooler: {got}", name(seq));
            if *want != got {
                diffs.push(format!("{}: expected {want:?}, pooler {got:?}", name(seq)));
            }
        }
        assert_serves(pg, pooler, "after the negotiation sequences");
        assert_no_leftover_clients(pg, "negotiation sequences");
        assert!(diffs.is_empty(), "the pooler answers unlike PostgreSQL:\n{}", diffs.join("\n"));
    });
}
