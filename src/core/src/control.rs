//! The control channel between the pooler and a pooled backend: the backend's
//! original Unix-socket connection to the pooler, reused after login.
//!
//! Messages are framed like protocol messages (tag, int32 length including
//! itself) so the pooler's one reader also handles the ErrorResponse a parked
//! backend may send when it is terminated. Tags are bytes the server never sends.
//!
//! pooler -> backend  `ATTACH`, with the client socket attached (SCM_RIGHTS):
//!     u64 client id, u8 flags, u16 address length, address bytes
//!     (a `sockaddr_storage` prefix), startup settings, then the client's
//!     session image (SET settings, prepared statements) when it is new here,
//!     then with `FLAG_TLS` the client's TLS session for `pg_stat_ssl`
//!     (i32 bits, then version, cipher, client DN, client serial, issuer DN
//!     as strings; see [`TlsStatus`]), then with `FLAG_AHEAD` the
//!     ticket (u64) and the backend's shared row (u32) of an ATTACH sent
//!     ahead (see [`Ahead`]).
//! backend -> pooler  `RELEASED`: u64 client id, u8 flags, u64 statements
//!     run since the client was attached here (`queries`), u64 microseconds
//!     of query time and u64 bytes sent to the client since then, then the parts of
//!     the session image that changed in this transaction. Sent after the
//!     backend has flushed ReadyForQuery(I) to the client and put its control
//!     socket back in place of the client's.
//! backend -> pooler  `PINNED`: u8 1 when the attached client has just pinned
//!     its session (state that cannot move: LISTEN, session advisory lock,
//!     temp table, WITH HOLD cursor), 0 when it has just unpinned it while
//!     keeping the backend. Sent at ReadyForQuery(I), after the pin was
//!     written to shared memory, so the pooler can count the backend as the
//!     client's dedicated session and log in another for the pool.
//! pooler -> backend  `KQ_LEND`, `KQ_RECALL`; backend -> pooler `KQ_PARKED`,
//!     `KQ_RETURNED`: the kernel queue (`kq`, see their constants).
//!
//! Lists are u32 counts followed by their items; strings are NUL-terminated.
#![allow(missing_docs)] // field-level docs would only repeat the module docs
use crate::proto::error::ProtoError;
use crate::proto::frame::read_cstr;
pub use crate::told::Told;

pub const ATTACH: u8 = b'!';
pub const RELEASED: u8 = b'~';
/// pooler -> backend: give your client back at the next moment it is idle
/// (another client is waiting). Empty body; the pooler also sets the
/// backend's latch (SIGUSR1) so a backend waiting on its idle client wakes.
pub const RELEASE_REQUEST: u8 = b'^';
/// backend -> pooler: the attached client pinned (1) or unpinned (0) its session.
pub const PINNED: u8 = b'*';
/// backend -> pooler, on a server-authentication login's own socket (pooler
/// `dedicated.rs`): send me my client's socket now. Body: the backend's pid
/// (i32) and its cancel key, so the pooler can forward the client's
/// CancelRequests. The pooler answers with an ATTACH (`FLAG_DEDICATED`)
/// carrying the client's fd.
pub const SOCKET_REQUEST: u8 = b'&';
/// backend -> pooler: take the RELEASEDs this backend left in its release
/// ring (`ring`) up to this tail (u32, the ring's wrapping entry count) before
/// the messages that follow on this socket. Sent before a socket message
/// while entries are pending, and alone to wake a pooler that sleeps.
pub const RING_MARK: u8 = b'@';

/// pooler -> backend (parked): wait on your pool's kernel queue and serve
/// its clients (`kq`) until recalled. Body: u32 the pool's shared row. The pooler hands such a
/// *lent* backend nothing else.
pub const KQ_LEND: u8 = b'+';
/// pooler -> backend (lent): stop taking clients from the kernel queue;
/// once you serve none of them, park on this socket and say `KQ_PARKED`.
/// Empty body.
pub const KQ_RECALL: u8 = b'-';
/// backend -> pooler: recalled, this backend is parked and serves no
/// queued client: the pooler's to hand clients to again. Empty body.
pub const KQ_PARKED: u8 = b'=';
/// backend -> pooler: a client taken from the kernel queue is the pooler's
/// again (its owner word says so): u32 client row, u64 client id, u8
/// `KQ_RETURNED_*` flags.
pub const KQ_RETURNED: u8 = b'%';
/// `KQ_RETURNED`: the client is leaving (Terminate or end of file): close it.
pub const KQ_RETURNED_LEAVING: u8 = 1;
/// `KQ_RETURNED`: this backend keeps serving the client as an attached one
/// (its session is pinned, or its image outgrew the queue's slot): in the
/// pooler's books the backend is no longer lent but attached to it, and a
/// RELEASED or PINNED about it follows as for any attached client.
pub const KQ_RETURNED_KEPT: u8 = 2;

/// Discard the previous client's session before this client runs.
pub const FLAG_NEW_CLIENT: u8 = 1;
/// Session mode: the backend is reserved for this client; give it back only
/// when the client leaves.
pub const FLAG_RESERVED: u8 = 2;
/// Keep the client between transactions while nobody waits (see
/// nextgres.hold_idle_clients).
pub const FLAG_HOLD_IDLE: u8 = 4;
/// The client's first attach: its session starts (pg_stat_database.sessions).
pub const FLAG_SESSION_START: u8 = 8;
/// A replication client's own walsender (pooler `dedicated.rs`): keep the
/// socket for good and stop being a pooled backend.
pub const FLAG_DEDICATED: u8 = 16;
/// The client is on TLS (terminated by the pooler): a [`TlsStatus`]
/// follows the session image. Set by `write_attach` from `Attach::tls`;
/// `parse_attach` moves it into `Attach::tls` (never left in `flags`).
pub const FLAG_TLS: u8 = 32;
/// Sent ahead to a backend still serving another client's transaction: an
/// [`Ahead`] follows. Set by `write_attach` from `Attach::ahead`; never
/// left in parsed `flags`.
pub const FLAG_AHEAD: u8 = 64;

/// The client came from its pool's kernel queue (`kq`): at its boundary the
/// backend puts it back there instead of giving it to the pooler.
pub const FLAG_QUEUED: u8 = 128;

/// An ATTACH sent *ahead*: to a backend inside another client's
/// transaction, which takes the client at that transaction's
/// ReadyForQuery(I) without parking. Whoever first swaps `ticket` out of the
/// backend's shared row (`BackendRow::ahead`, the backend taking the client
/// or the pooler taking it back) owns the client; the other side never
/// touches its socket (the backend closes its copy unread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ahead {
    /// Never 0 (0 means "no ticket" in the shared row).
    pub ticket: u64,
    /// The receiving backend's row in the shared backends table.
    pub backend_row: u32,
}

pub const MAX_ADDR: usize = 128;

/// Largest control message (ATTACH, RELEASED) a backend or the pooler
/// accepts, in bytes: a client's statements and settings travel in one
/// message, and 256 cached statements of a few kB each with wide results
/// pass 1 MiB. Bounded so a broken peer cannot make either side buffer
/// without limit.
pub const MAX_CONTROL_MESSAGE: usize = 64 << 20;

/// RELEASED carries the client's session-level settings.
pub const IMAGE_SETTINGS: u8 = 1;
/// RELEASED carries the client's prepared statements.
pub const IMAGE_STATEMENTS: u8 = 2;
/// RELEASED carries the role and database defaults of the client's login.
pub const IMAGE_DEFAULTS: u8 = 4;
/// RELEASED carries what the client was told of the reported settings.
pub const IMAGE_TOLD: u8 = 8;

/// A named prepared statement, as needed to create it again elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The name's bytes in the database encoding (opaque here: a LATIN1 or
    /// SQL_ASCII database may hold names and texts that are not UTF-8).
    pub name: Vec<u8>,
    /// Protocol-level: the Parse message's query. SQL-level: the PREPARE
    /// command. Bytes in the database encoding, without the NUL.
    pub text: Vec<u8>,
    /// Created by SQL PREPARE (else by a protocol Parse message).
    pub from_sql: bool,
    /// The text was lexed with `standard_conforming_strings = off`, so a
    /// backslash in a plain '...' literal is an escape: a backend creating
    /// the statement again lexes it so, whatever the client's setting is
    /// now (the server keeps a statement's raw parse tree, so its literals
    /// never change meaning after PREPARE).
    pub backslash_escapes: bool,
    /// SQL-level only: its text is the whole query string the client sent
    /// the PREPARE in (see [`RawStatement::whole_query`]).
    pub whole_query: bool,
    /// Parameter types as the server fixed them at the client's Parse or
    /// PREPARE (inferred ones included).
    pub param_types: Vec<u32>,
    /// The result columns the client was told about when it prepared the
    /// statement, in backend/session.c's encoding (opaque here): a backend that
    /// creates the statement again compares against it, so a changed result
    /// fails with 0A000 as it would on a direct connection.
    pub result: Vec<u8>,
    /// The settings its last parse analysis ran under where they differ
    /// from the session's reset values (name, value as bytes; only the
    /// settings a literal's type input or the analysis itself reads:
    /// backend/session.c `analysis_gucs`). A backend creating it again
    /// analyzes it under them, as a direct session keeps the constants its
    /// PREPARE or Parse made (flag 8; empty: none differed).
    pub analysis: Vec<(Vec<u8>, Vec<u8>)>,
    /// Invalidated since its last analysis (flag 16, never with analysis
    /// settings): as the server would, its next analysis runs under the
    /// settings of that moment.
    pub invalidated: bool,
}

/// A list of named prepared statements kept in its wire layout (one entry
/// per statement: name, text, from_sql, parameter types, result; see
/// `put_statements`), validated once when it is read. The pooler only
/// stores and forwards it, and a backend reads single entries in place, so
/// a client holding hundreds of statements costs a copy of their bytes per
/// switch rather than a decoded object (and its allocations) per statement.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatementList {
    count: u32,
    /// The entries, without the count.
    bytes: Vec<u8>,
}

/// One entry of a `StatementList`, in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStatement<'a> {
    /// The whole entry, as written (equal bytes: equal statements).
    pub raw: &'a [u8],
    /// Bytes in the database encoding (never decoded here).
    pub name: &'a [u8],
    pub text: &'a [u8],
    pub from_sql: bool,
    pub backslash_escapes: bool,
    /// An SQL-level PREPARE whose text is the whole query string the client
    /// sent it in (flag 4, set by the backend that wrote the entry): only
    /// such a statement's plan source holds nothing but its own text, so
    /// only it may be kept for another client (the light switch).
    pub whole_query: bool,
    /// Parameter type OIDs, 4 bytes each, big-endian.
    params: &'a [u8],
    pub result: &'a [u8],
    /// Number of analysis settings and their name\0value\0 pairs.
    pub analysis_count: u32,
    pub analysis: &'a [u8],
    pub invalidated: bool,
}

impl<'a> RawStatement<'a> {
    pub fn param_types(&self) -> impl Iterator<Item = u32> + 'a {
        self.params.chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn to_statement(&self) -> Statement {
        Statement {
            name: self.name.to_vec(),
            text: self.text.to_vec(),
            from_sql: self.from_sql,
            backslash_escapes: self.backslash_escapes,
            whole_query: self.whole_query,
            param_types: self.param_types().collect(),
            result: self.result.to_vec(),
            analysis: self.analysis_settings().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
            invalidated: self.invalidated,
        }
    }
    /// The analysis settings as (name, value) pairs.
    pub fn analysis_settings(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut parts = self.analysis.split(|&b| b == 0);
        (0..self.analysis_count).map_while(move |_| Some((parts.next()?, parts.next()?)))
    }
}

impl StatementList {
    pub fn len(&self) -> usize {
        self.count as usize
    }
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// Size of the entries in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }
    /// Appends an entry of another (validated) list.
    pub fn push_raw(&mut self, st: &RawStatement<'_>) {
        self.bytes.extend_from_slice(st.raw);
        self.count += 1;
    }
    pub fn push(&mut self, st: &Statement) {
        put_statement(&mut self.bytes, st);
        self.count += 1;
    }
    /// The entries in order. The bytes were validated when the list was
    /// read or written, so this never fails.
    pub fn iter(&self) -> impl Iterator<Item = RawStatement<'_>> {
        let mut r = Reader { body: &self.bytes, off: 0 };
        (0..self.count).map_while(move |_| r.raw_statement().ok())
    }
    /// The entries in order with their byte offsets (for `at`).
    pub fn iter_offsets(&self) -> impl Iterator<Item = (usize, RawStatement<'_>)> {
        let mut r = Reader { body: &self.bytes, off: 0 };
        (0..self.count).map_while(move |_| {
            let off = r.off;
            r.raw_statement().ok().map(|st| (off, st))
        })
    }
    /// Byte offset and name (as bytes) of each entry in order, found
    /// without checking the entries again (they were when the list was read
    /// or written): what a backend indexes at every switch.
    pub fn names(&self) -> impl Iterator<Item = (usize, &[u8])> {
        let b = &self.bytes[..];
        let mut off = 0;
        (0..self.count).map_while(move |_| {
            let (name_end, end) = entry_bounds(b, off)?;
            let item = (off, &b[off..name_end]);
            off = end;
            Some(item)
        })
    }
    /// Whether the entry at byte offset `off` is named `name`.
    pub fn name_is(&self, off: usize, name: &[u8]) -> bool {
        let n = name;
        self.bytes.get(off..off + n.len()) == Some(n) && self.bytes.get(off + n.len()) == Some(&0)
    }
    /// The entry at byte offset `off` (one `iter_offsets` gave).
    pub fn at(&self, off: usize) -> Option<RawStatement<'_>> {
        Reader { body: &self.bytes, off }.raw_statement().ok()
    }
    pub fn to_statements(&self) -> Vec<Statement> {
        self.iter().map(|r| r.to_statement()).collect()
    }
}

/// End of the name and end of the entry that starts at `off` in a list's
/// bytes (None past the end).
fn entry_bounds(b: &[u8], off: usize) -> Option<(usize, usize)> {
    let nul = |from: usize| b.get(from..)?.iter().position(|&x| x == 0).map(|n| from + n);
    let u32_at = |at: usize| b.get(at..at + 4).map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]) as usize);
    let name_end = nul(off)?;
    let text_end = nul(name_end + 1)?;
    let flags = *b.get(text_end + 1)?;
    let mut p = text_end + 2; // NUL, flags
    p = p.checked_add(4)?.checked_add(u32_at(p)?.checked_mul(4)?)?;
    p = p.checked_add(4)?.checked_add(u32_at(p)?)?;
    if flags & 8 != 0 {
        let n = u32_at(p)?;
        p += 4;
        for _ in 0..n * 2 {
            p = nul(p)? + 1;
        }
    }
    (p <= b.len()).then_some((name_end, p))
}

impl From<&[Statement]> for StatementList {
    fn from(stmts: &[Statement]) -> Self {
        let mut l = StatementList::default();
        for st in stmts {
            l.push(st);
        }
        l
    }
}

impl From<Vec<Statement>> for StatementList {
    fn from(stmts: Vec<Statement>) -> Self {
        StatementList::from(&stmts[..])
    }
}

/// What a client carries from backend to backend in transaction mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionImage {
    /// Settings changed with SET/set_config (source "session"), in order.
    pub settings: Vec<(String, String)>,
    pub statements: StatementList,
    /// The role and database defaults (pg_db_role_setting) in force at the
    /// client's login, in the order the server applies them, lowest
    /// precedence first: each name is prefixed with its level, `0` ALTER
    /// ROLE ALL, `1` database, `2` role, `3` role in database.
    pub defaults: Vec<(String, String)>,
    /// What the client was told of the reported settings (its login's
    /// ParameterStatus, then each one a backend sent it).
    pub told: Told,
}

/// A pooled TLS client's session as the backend shows it in `pg_stat_ssl`
/// (backend_status.h `PgBackendSSLStatus`), spelled as the server's
/// OpenSSL build spells it (be-secure-openssl.c `be_tls_get_*`); see
/// `crate::cert::ssl_status_names` and `crate::tls::openssl_cipher`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsStatus {
    /// Secret bits of the cipher (`SSL_get_cipher_bits`), e.g. 256.
    pub bits: i32,
    /// `TLSv1.2` or `TLSv1.3` (`SSL_get_version`).
    pub version: String,
    /// OpenSSL's name of the cipher suite (`SSL_get_cipher`), e.g.
    /// `TLS_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// Client certificate subject as `X509_NAME_to_cstring` prints it
    /// (`/CN=alice/O=Example`); empty without a certificate.
    pub client_dn: String,
    /// Client certificate serial number in decimal; empty without one.
    pub client_serial: String,
    /// Client certificate issuer DN, formatted as `client_dn`; empty without one.
    pub issuer_dn: String,
}

/// A client's authenticated identity as the server records it at login
/// (auth.c `set_authn_id()`, `ClientConnectionInfo`): what `SYSTEM_USER`
/// shows as `method:id` (16+). Only methods that authenticate someone set
/// one: `trust` and `reject` do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authn {
    /// The matched pg_hba.conf line's method, as the glue numbers the
    /// server's `UserAuth` (`AUTHN_PASSWORD` .. `AUTHN_CERT`); never 0.
    pub method: u8,
    /// The role name the client logged in as (password methods), or its
    /// certificate's subject DN in RFC 2253 form (cert). No NUL byte (a
    /// longer one is cut there, as the server's C string would be).
    pub id: Vec<u8>,
}

/// `Authn::method` values (glue.c `NG_AUTH_*`, the server's `uaPassword`,
/// `uaMD5`, `uaSCRAM`, `uaCert`).
pub const AUTHN_PASSWORD: u8 = 3;
pub const AUTHN_MD5: u8 = 4;
pub const AUTHN_SCRAM: u8 = 5;
pub const AUTHN_CERT: u8 = 7;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub client_id: u64,
    pub flags: u8,
    /// Row of the client's pool in the shared pools table (for its waiting count).
    pub pool_row: u32,
    /// The process id of the client's cancel key (the BackendKeyData the
    /// pooler sent it), which the backend puts in its own notifications'
    /// NotificationResponse, as the client's libpq/driver compares them with
    /// it to recognise its own; 0: the client has the backend's own key
    /// (a dedicated session).
    pub key_pid: i32,
    pub addr: Vec<u8>,
    /// The local address of the client's TCP connection (what it connected
    /// to), raw as `addr`: the backend's `port->laddr` (pqcomm.c fills it
    /// with getsockname(); here the pooler read it once, at accept, and
    /// the backend needs no system call per client; a TLS client's socket
    /// in the backend is the relay's socketpair, which has no such
    /// address). `inet_server_addr()`, `inet_server_port()`. Empty: not
    /// known (the backend asks its socket).
    pub local: Vec<u8>,
    /// Startup-packet settings (source "client").
    pub settings: Vec<(String, String)>,
    pub image: SessionImage,
    /// The client's authenticated identity (applied with a new client's
    /// session); None: none (trust), or the same client again.
    pub authn: Option<Authn>,
    /// The client's TLS session; None for a plaintext client.
    pub tls: Option<TlsStatus>,
    /// Sent ahead (see [`Ahead`]); None for a parked backend's ATTACH.
    pub ahead: Option<Ahead>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub client_id: u64,
    /// Statements the backend ran for the client since it was attached
    /// (CommandComplete and ErrorResponse messages sent): `nextgres.pools.queries`.
    pub queries: u64,
    /// Query time since it was attached, µs: per request cycle, from the
    /// start of the first message's processing to ReadyForQuery.
    pub query_us: u64,
    /// Protocol bytes sent to the client since it was attached.
    pub bytes_sent: u64,
    /// Present when they changed during the transaction.
    pub settings: Option<Vec<(String, String)>>,
    pub statements: Option<StatementList>,
    pub defaults: Option<Vec<(String, String)>>,
    pub told: Option<Told>,
}

fn frame(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

fn put_str(o: &mut Vec<u8>, s: &str) {
    o.extend_from_slice(s.as_bytes());
    o.push(0);
}

fn put_pairs(o: &mut Vec<u8>, pairs: &[(String, String)]) {
    o.extend_from_slice(&(pairs.len() as u32).to_be_bytes());
    for (n, v) in pairs {
        put_str(o, n);
        put_str(o, v);
    }
}

fn put_bytes(o: &mut Vec<u8>, s: &[u8]) {
    o.extend_from_slice(s);
    o.push(0);
}

fn put_statement(o: &mut Vec<u8>, st: &Statement) {
    put_bytes(o, &st.name);
    put_bytes(o, &st.text);
    // Flags: 1 from_sql, 2 backslash_escapes, 4 whole_query (SQL-level
    // only), 8 analysis settings follow the result, 16 invalidated (then no
    // settings).
    let analysis = !st.analysis.is_empty() && !st.invalidated;
    o.push(
        u8::from(st.from_sql)
            | u8::from(st.backslash_escapes) << 1
            | u8::from(st.from_sql && st.whole_query) << 2
            | u8::from(analysis) << 3
            | u8::from(st.invalidated) << 4,
    );
    o.extend_from_slice(&(st.param_types.len() as u32).to_be_bytes());
    for t in &st.param_types {
        o.extend_from_slice(&t.to_be_bytes());
    }
    o.extend_from_slice(&(st.result.len() as u32).to_be_bytes());
    o.extend_from_slice(&st.result);
    if analysis {
        o.extend_from_slice(&(st.analysis.len() as u32).to_be_bytes());
        for (n, v) in &st.analysis {
            put_bytes(o, n);
            put_bytes(o, v);
        }
    }
}

fn put_statements(o: &mut Vec<u8>, stmts: &StatementList) {
    o.extend_from_slice(&stmts.count.to_be_bytes());
    o.extend_from_slice(&stmts.bytes);
}

/// Bytes an ATTACH for `a` takes (to size its buffer once).
pub fn attach_size_hint(a: &Attach) -> usize {
    let pairs = |p: &[(String, String)]| 4 + p.iter().map(|(n, v)| n.len() + v.len() + 2).sum::<usize>();
    38 + a.addr.len()
        + a.local.len()
        + pairs(&a.settings)
        + pairs(&a.image.settings)
        + 4
        + a.image.statements.byte_len()
        + pairs(&a.image.defaults)
        + crate::told::WIRE_LEN
        + 1
        + a.authn.as_ref().map_or(0, |x| x.id.len() + 1)
        + a.tls.as_ref().map_or(0, |t| {
            9 + t.version.len() + t.cipher.len() + t.client_dn.len() + t.client_serial.len() + t.issuer_dn.len()
        })
        + if a.ahead.is_some() { 12 } else { 0 }
}

pub fn write_attach(out: &mut Vec<u8>, a: &Attach) {
    frame(out, ATTACH, |o| {
        o.extend_from_slice(&a.client_id.to_be_bytes());
        o.push(
            (a.flags & !(FLAG_TLS | FLAG_AHEAD))
                | if a.tls.is_some() { FLAG_TLS } else { 0 }
                | if a.ahead.is_some() { FLAG_AHEAD } else { 0 },
        );
        o.extend_from_slice(&a.pool_row.to_be_bytes());
        o.extend_from_slice(&a.key_pid.to_be_bytes());
        for addr in [&a.addr, &a.local] {
            let addr = &addr[..addr.len().min(MAX_ADDR)];
            o.extend_from_slice(&(addr.len() as u16).to_be_bytes());
            o.extend_from_slice(addr);
        }
        put_pairs(o, &a.settings);
        put_pairs(o, &a.image.settings);
        put_statements(o, &a.image.statements);
        put_pairs(o, &a.image.defaults);
        a.image.told.write(o);
        match a.authn.as_ref().filter(|x| x.method != 0) {
            Some(x) => {
                o.push(x.method);
                let id = x.id.split(|&b| b == 0).next().unwrap_or_default();
                put_bytes(o, id);
            }
            None => o.push(0),
        }
        if let Some(t) = &a.tls {
            o.extend_from_slice(&t.bits.to_be_bytes());
            for s in [&t.version, &t.cipher, &t.client_dn, &t.client_serial, &t.issuer_dn] {
                put_str(o, s);
            }
        }
        if let Some(x) = &a.ahead {
            o.extend_from_slice(&x.ticket.to_be_bytes());
            o.extend_from_slice(&x.backend_row.to_be_bytes());
        }
    });
}

pub fn write_release_request(out: &mut Vec<u8>) {
    frame(out, RELEASE_REQUEST, |_| {});
}

pub fn write_socket_request(out: &mut Vec<u8>, pid: i32, cancel_key: &[u8]) {
    frame(out, SOCKET_REQUEST, |o| {
        o.extend_from_slice(&pid.to_be_bytes());
        o.extend_from_slice(cancel_key);
    });
}

/// The pid and cancel key of a SOCKET_REQUEST.
pub fn parse_socket_request(body: &[u8]) -> Result<(i32, Vec<u8>), ProtoError> {
    if body.len() < 4 {
        return Err(ProtoError::violation("short nextgres socket request"));
    }
    Ok((i32::from_be_bytes([body[0], body[1], body[2], body[3]]), body[4..].to_vec()))
}

pub fn write_pinned(out: &mut Vec<u8>, pinned: bool) {
    frame(out, PINNED, |o| o.push(u8::from(pinned)));
}

pub fn parse_pinned(body: &[u8]) -> Result<bool, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let v = r.u8()?;
    r.end()?;
    Ok(v != 0)
}

/// `KQ_LEND` for the pool in shared row `pool_row`.
pub fn write_kq_lend(out: &mut Vec<u8>, pool_row: u32) {
    frame(out, KQ_LEND, |o| o.extend_from_slice(&pool_row.to_be_bytes()));
}

/// The pool row of a `KQ_LEND` body.
pub fn parse_kq_lend(body: &[u8]) -> Result<u32, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let v = r.u32()?;
    r.end()?;
    Ok(v)
}

/// A message with no body (`KQ_RECALL`, `KQ_PARKED`).
pub fn write_empty(out: &mut Vec<u8>, tag: u8) {
    frame(out, tag, |_| {});
}

/// `KQ_RETURNED` for client row `row`, id `client_id`.
pub fn write_kq_returned(out: &mut Vec<u8>, row: u32, client_id: u64, flags: u8) {
    frame(out, KQ_RETURNED, |o| {
        o.extend_from_slice(&row.to_be_bytes());
        o.extend_from_slice(&client_id.to_be_bytes());
        o.push(flags);
    });
}

/// (row, client id, flags) of a `KQ_RETURNED` body.
pub fn parse_kq_returned(body: &[u8]) -> Result<(u32, u64, u8), ProtoError> {
    let mut r = Reader { body, off: 0 };
    let row = r.u32()?;
    let id = r.u64()?;
    let flags = r.u8()?;
    r.end()?;
    Ok((row, id, flags))
}

pub fn write_ring_mark(out: &mut Vec<u8>, tail: u32) {
    frame(out, RING_MARK, |o| o.extend_from_slice(&tail.to_be_bytes()));
}

pub fn parse_ring_mark(body: &[u8]) -> Result<u32, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let v = r.u32()?;
    r.end()?;
    Ok(v)
}

pub fn write_released(out: &mut Vec<u8>, r: &Released) {
    frame(out, RELEASED, |o| {
        o.extend_from_slice(&r.client_id.to_be_bytes());
        let flags = if r.settings.is_some() { IMAGE_SETTINGS } else { 0 }
            | if r.statements.is_some() { IMAGE_STATEMENTS } else { 0 }
            | if r.defaults.is_some() { IMAGE_DEFAULTS } else { 0 }
            | if r.told.is_some() { IMAGE_TOLD } else { 0 };
        o.push(flags);
        o.extend_from_slice(&r.queries.to_be_bytes());
        o.extend_from_slice(&r.query_us.to_be_bytes());
        o.extend_from_slice(&r.bytes_sent.to_be_bytes());
        if let Some(s) = &r.settings {
            put_pairs(o, s);
        }
        if let Some(s) = &r.statements {
            put_statements(o, s);
        }
        if let Some(s) = &r.defaults {
            put_pairs(o, s);
        }
        if let Some(t) = &r.told {
            t.write(o);
        }
    });
}

fn bad(what: &str) -> ProtoError {
    ProtoError::violation(format!("malformed nextgres control message: {what}"))
}

/// A cursor over a message body; every read is bounds-checked.
struct Reader<'a> {
    body: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.body.len()).ok_or_else(|| bad("truncated"))?;
        let s = &self.body[self.off..end];
        self.off = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self) -> Result<String, ProtoError> {
        let (s, next) = read_cstr(self.body, self.off)?;
        self.off = next;
        Ok(s.to_string())
    }
    /// A count that cannot exceed what the remaining bytes could hold.
    fn count(&mut self, min_item: usize) -> Result<usize, ProtoError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.body.len() - self.off {
            return Err(bad("count exceeds message"));
        }
        Ok(n)
    }
    fn pairs(&mut self) -> Result<Vec<(String, String)>, ProtoError> {
        let n = self.count(2)?;
        (0..n).map(|_| Ok((self.str()?, self.str()?))).collect()
    }
    /// A NUL-terminated string as bytes, in whatever encoding it has.
    fn cbytes(&mut self) -> Result<&'a [u8], ProtoError> {
        let rest = self.body.get(self.off..).ok_or_else(|| bad("invalid string in message"))?;
        let len = rest.iter().position(|&b| b == 0).ok_or_else(|| bad("invalid string in message"))?;
        self.off += len + 1;
        Ok(&rest[..len])
    }
    /// One statement entry, in place.
    fn raw_statement(&mut self) -> Result<RawStatement<'a>, ProtoError> {
        let start = self.off;
        let name = self.cbytes()?;
        let text = self.cbytes()?;
        // Flags as written (1 from_sql, 2 backslash_escapes, 4 whole_query
        // with from_sql, 8 analysis settings, at least one, 16 invalidated,
        // never with 8), no other bit: equal statements must have equal
        // bytes (the light switch compares entries as bytes).
        let flags = self.u8()?;
        if flags > 31 || (flags & 4 != 0 && flags & 1 == 0) || flags & 24 == 24 {
            return Err(bad("invalid statement flag"));
        }
        let (from_sql, backslash_escapes, whole_query) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
        let np = self.count(4)?;
        let params = self.take(np * 4)?;
        let rl = self.count(1)?;
        let result = self.take(rl)?;
        let (mut analysis_count, mut analysis) = (0, &self.body[self.off..self.off]);
        if flags & 8 != 0 {
            let n = self.count(2)?;
            if n == 0 {
                return Err(bad("invalid statement flag"));
            }
            let at = self.off;
            for _ in 0..n * 2 {
                self.cbytes()?;
            }
            (analysis_count, analysis) = (n as u32, &self.body[at..self.off]);
        }
        let invalidated = flags & 16 != 0;
        Ok(RawStatement { raw: &self.body[start..self.off], name, text, from_sql, backslash_escapes, whole_query, params, result, analysis_count, analysis, invalidated })
    }
    /// A statement list: validated entry by entry, then copied as bytes.
    fn statements(&mut self) -> Result<StatementList, ProtoError> {
        let n = self.count(11)?;
        let start = self.off;
        for _ in 0..n {
            self.raw_statement()?;
        }
        Ok(StatementList { count: n as u32, bytes: self.body[start..self.off].to_vec() })
    }
    /// What a client was told of the reported settings ([`Told`]).
    fn told(&mut self) -> Result<Told, ProtoError> {
        Ok(Told::read(self.take(crate::told::WIRE_LEN)?).expect("length taken"))
    }
    /// A socket address: u16 length (at most `MAX_ADDR`), then its bytes.
    fn addr(&mut self) -> Result<Vec<u8>, ProtoError> {
        let n = self.u16()? as usize;
        if n > MAX_ADDR {
            return Err(bad("address too long"));
        }
        Ok(self.take(n)?.to_vec())
    }

    fn end(&self) -> Result<(), ProtoError> {
        if self.off != self.body.len() {
            return Err(bad("trailing bytes"));
        }
        Ok(())
    }
}

/// Parses the body (after tag and length) of an ATTACH message.
pub fn parse_attach(body: &[u8]) -> Result<Attach, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let client_id = r.u64()?;
    let flags = r.u8()?;
    let pool_row = r.u32()?;
    let key_pid = r.u32()? as i32;
    let addr = r.addr()?;
    let local = r.addr()?;
    let settings = r.pairs()?;
    let image = SessionImage { settings: r.pairs()?, statements: r.statements()?, defaults: r.pairs()?, told: r.told()? };
    let authn = match r.u8()? {
        0 => None,
        method => Some(Authn { method, id: r.cbytes()?.to_vec() }),
    };
    let tls = if flags & FLAG_TLS != 0 {
        Some(TlsStatus {
            bits: r.u32()? as i32,
            version: r.str()?,
            cipher: r.str()?,
            client_dn: r.str()?,
            client_serial: r.str()?,
            issuer_dn: r.str()?,
        })
    } else {
        None
    };
    let ahead = if flags & FLAG_AHEAD != 0 {
        let ticket = r.u64()?;
        if ticket == 0 {
            return Err(bad("ticket 0 in an ATTACH sent ahead"));
        }
        Some(Ahead { ticket, backend_row: r.u32()? })
    } else {
        None
    };
    r.end()?;
    Ok(Attach { client_id, flags: flags & !(FLAG_TLS | FLAG_AHEAD), pool_row, key_pid, addr, local, settings, image, authn, tls, ahead })
}

pub fn parse_released(body: &[u8]) -> Result<Released, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let client_id = r.u64()?;
    let flags = r.u8()?;
    let queries = r.u64()?;
    let query_us = r.u64()?;
    let bytes_sent = r.u64()?;
    let settings = if flags & IMAGE_SETTINGS != 0 { Some(r.pairs()?) } else { None };
    let statements = if flags & IMAGE_STATEMENTS != 0 { Some(r.statements()?) } else { None };
    let defaults = if flags & IMAGE_DEFAULTS != 0 { Some(r.pairs()?) } else { None };
    let told = if flags & IMAGE_TOLD != 0 { Some(r.told()?) } else { None };
    if flags & !(IMAGE_SETTINGS | IMAGE_STATEMENTS | IMAGE_DEFAULTS | IMAGE_TOLD) != 0 {
        return Err(bad("unknown image flag"));
    }
    r.end()?;
    Ok(Released { client_id, queries, query_us, bytes_sent, settings, statements, defaults, told })
}

/// A statement list alone, as inside ATTACH and RELEASED (the server side's
/// own list of a backend's statements is written in the same layout).
pub fn parse_statement_list(body: &[u8]) -> Result<StatementList, ProtoError> {
    let mut r = Reader { body, off: 0 };
    let list = r.statements()?;
    r.end()?;
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::parse_message;

    fn image() -> SessionImage {
        SessionImage {
            settings: vec![("search_path".into(), "a, b".into()), ("myapp.user".into(), "42".into())],
            statements: statements().into(),
            defaults: vec![("2timezone".into(), "UTC+3".into())],
            told: Told::from_pairs(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]),
        }
    }

    fn statements() -> Vec<Statement> {
        let dated = Statement {
            name: "d".into(),
            text: "SELECT '01/02/2020'::date".into(),
            from_sql: false,
            backslash_escapes: false,
            whole_query: false,
            param_types: vec![],
            result: vec![],
            analysis: vec![(b"DateStyle".to_vec(), b"ISO, DMY".to_vec()), (b"TimeZone".to_vec(), b"UTC".to_vec())],
            invalidated: false,
        };
        vec![
            Statement { name: "P_0".into(), text: "SELECT $1::int".into(), from_sql: false, backslash_escapes: false, whole_query: false, param_types: vec![23, 25], result: vec![0, 0, 0, 1, b'a', 0, 0, 0, 0, 23], analysis: vec![], invalidated: false },
            Statement { name: "q".into(), text: "PREPARE q AS SELECT 1".into(), from_sql: true, backslash_escapes: true, whole_query: true, param_types: vec![], result: vec![], analysis: vec![], invalidated: false },
            dated.clone(),
            Statement { name: "i".into(), analysis: vec![], invalidated: true, ..dated },
        ]
    }

    #[test]
    fn kernel_queue_messages_round_trip() {
        let mut out = Vec::new();
        write_kq_returned(&mut out, 77, 1 << 40, KQ_RETURNED_KEPT);
        write_empty(&mut out, KQ_PARKED);
        let (m, used) = parse_message(&out, MAX_CONTROL_MESSAGE).unwrap().unwrap();
        assert_eq!(m.tag, KQ_RETURNED);
        assert_eq!(parse_kq_returned(m.body).unwrap(), (77, 1 << 40, KQ_RETURNED_KEPT));
        assert!(parse_kq_returned(&m.body[..m.body.len() - 1]).is_err(), "short");
        let (m, _) = parse_message(&out[used..], MAX_CONTROL_MESSAGE).unwrap().unwrap();
        assert_eq!((m.tag, m.body.len()), (KQ_PARKED, 0));
        let mut out = Vec::new();
        write_kq_lend(&mut out, 9);
        let (m, _) = parse_message(&out, MAX_CONTROL_MESSAGE).unwrap().unwrap();
        assert_eq!((m.tag, parse_kq_lend(m.body).unwrap()), (KQ_LEND, 9));
    }

    #[test]
    fn statement_list_round_trip() {
        let mut out = Vec::new();
        put_statements(&mut out, &image().statements);
        let list = parse_statement_list(&out).unwrap();
        assert_eq!(list, image().statements);
        assert_eq!(list.to_statements(), statements());
        assert_eq!(list.len(), 4);
        let names: Vec<&[u8]> = list.iter().map(|r| r.name).collect();
        assert_eq!(names, [&b"P_0"[..], b"q", b"d", b"i"]);
        for (off, r) in list.iter_offsets() {
            assert_eq!(list.at(off), Some(r));
            assert!(list.name_is(off, r.name));
            assert!(!list.name_is(off, b"P_"));
            assert!(!list.name_is(off, b"P_00"));
        }
        let fast: Vec<(usize, &[u8])> = list.names().collect();
        let slow: Vec<(usize, &[u8])> = list.iter_offsets().map(|(o, r)| (o, r.name)).collect();
        assert_eq!(fast, slow);
        // Entries copied raw into another list are the same statements.
        let mut copy = StatementList::default();
        for r in list.iter().collect::<Vec<_>>().into_iter().rev() {
            copy.push_raw(&r);
        }
        let mut want = statements();
        want.reverse();
        assert_eq!(copy.to_statements(), want);
        assert_eq!(copy, StatementList::from(want));
        for cut in 0..out.len() {
            assert!(parse_statement_list(&out[..cut]).is_err(), "cut at {cut}");
        }
        out.push(0);
        assert!(parse_statement_list(&out).is_err(), "trailing byte");
    }

    #[test]
    fn statement_bytes_are_opaque() {
        // LATIN1 'é' (0xE9) and a SQL_ASCII byte: not UTF-8, kept as is.
        let st = Statement { name: b"s\xe9".to_vec(), text: b"SELECT '\xe9\xff'".to_vec(), from_sql: true, backslash_escapes: false, whole_query: false, param_types: vec![], result: vec![], analysis: vec![], invalidated: false };
        let list = StatementList::from(vec![st.clone()]);
        let mut out = Vec::new();
        put_statements(&mut out, &list);
        let back = parse_statement_list(&out).unwrap();
        assert_eq!(back.to_statements(), vec![st]);
        let (off, name) = back.names().next().unwrap();
        assert_eq!(name, b"s\xe9");
        assert!(back.name_is(off, b"s\xe9"));
        // The flags are bits 1, 2 and 4 (whole_query, only with from_sql),
        // nothing else (one list, one spelling).
        let flag = out.len() - 4 - 4 - 1;
        out[flag] = 3;
        assert!(parse_statement_list(&out).unwrap().iter().next().unwrap().backslash_escapes);
        out[flag] = 5;
        let whole = parse_statement_list(&out).unwrap();
        let st = whole.iter().next().unwrap();
        assert!(st.from_sql && st.whole_query && !st.backslash_escapes);
        // 8 (analysis settings) needs at least one after the result.
        // 16 (invalidated) stands alone; 8 and 16 never together.
        out[flag] = 17;
        assert!(parse_statement_list(&out).unwrap().iter().next().unwrap().invalidated);
        for bad in [4, 8, 9, 24, 25, 32] {
            out[flag] = bad;
            assert!(parse_statement_list(&out).is_err(), "flags {bad}");
        }
    }

    #[test]
    fn pinned_round_trip() {
        for v in [true, false] {
            let mut out = Vec::new();
            write_pinned(&mut out, v);
            let (m, used) = parse_message(&out, 1 << 20).unwrap().unwrap();
            assert_eq!((used, m.tag), (out.len(), PINNED));
            assert_eq!(parse_pinned(m.body).unwrap(), v);
        }
        assert!(parse_pinned(&[]).is_err());
        assert!(parse_pinned(&[1, 0]).is_err());
    }

    #[test]
    fn ring_mark_round_trip() {
        for v in [0, 7, u32::MAX] {
            let mut out = Vec::new();
            write_ring_mark(&mut out, v);
            let (m, used) = parse_message(&out, 1 << 20).unwrap().unwrap();
            assert_eq!((used, m.tag), (out.len(), RING_MARK));
            assert_eq!(parse_ring_mark(m.body).unwrap(), v);
        }
        assert!(parse_ring_mark(&[0, 0, 1]).is_err());
        assert!(parse_ring_mark(&[0, 0, 0, 1, 0]).is_err());
    }

    #[test]
    fn socket_request_round_trip() {
        let mut out = Vec::new();
        write_socket_request(&mut out, 4242, &[1, 2, 3, 4]);
        let (m, used) = parse_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!((used, m.tag), (out.len(), SOCKET_REQUEST));
        assert_eq!(parse_socket_request(m.body).unwrap(), (4242, vec![1, 2, 3, 4]));
        assert!(parse_socket_request(&[0, 1]).is_err());
    }

    #[test]
    fn attach_round_trip() {
        let a = Attach {
            client_id: 42,
            flags: FLAG_NEW_CLIENT,
            pool_row: 3,
            key_pid: 123_456_789,
            addr: vec![2, 0, 1, 2, 127, 0, 0, 1],
            local: vec![2, 0, 0x15, 0x38, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            settings: vec![("application_name".into(), "app".into()), ("TimeZone".into(), "UTC".into())],
            image: image(),
            authn: None,
            tls: None,
            ahead: None,
        };
        let mut out = Vec::new();
        write_attach(&mut out, &a);
        let (m, used) = parse_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(m.tag, ATTACH);
        assert_eq!(parse_attach(m.body).unwrap(), a);
        // With a TLS session: FLAG_TLS on the wire, never in the parsed flags.
        let t = Attach { tls: Some(tls()), flags: FLAG_NEW_CLIENT | FLAG_TLS, ..a.clone() };
        let mut out = Vec::new();
        write_attach(&mut out, &t);
        assert!(attach_size_hint(&t) >= out.len());
        let (m, _) = parse_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(m.body[8], FLAG_NEW_CLIENT | FLAG_TLS);
        assert_eq!(parse_attach(m.body).unwrap(), Attach { flags: FLAG_NEW_CLIENT, ..t.clone() });
        // FLAG_TLS set by a caller without a session is not written.
        let mut out = Vec::new();
        write_attach(&mut out, &Attach { flags: FLAG_TLS, ..a.clone() });
        let (m, _) = parse_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(parse_attach(m.body).unwrap(), Attach { flags: 0, ..a.clone() });
        // An identity comes back; one with a NUL is cut there, and method 0
        // is none.
        for (authn, back) in [
            (Authn { method: AUTHN_SCRAM, id: b"app".to_vec() }, Some(Authn { method: AUTHN_SCRAM, id: b"app".to_vec() })),
            (Authn { method: AUTHN_CERT, id: b"CN=a\0b".to_vec() }, Some(Authn { method: AUTHN_CERT, id: b"CN=a".to_vec() })),
            (Authn { method: 0, id: b"x".to_vec() }, None),
        ] {
            let x = Attach { authn: Some(authn), ..a.clone() };
            let mut out = Vec::new();
            write_attach(&mut out, &x);
            assert!(attach_size_hint(&x) >= out.len());
            let (m, _) = parse_message(&out, 1 << 20).unwrap().unwrap();
            assert_eq!(parse_attach(m.body).unwrap(), Attach { authn: back, ..a.clone() });
        }
        // Sent ahead, with and without TLS: the ticket and row come back,
        // FLAG_AHEAD never stays in the parsed flags.
        for tls in [None, Some(tls())] {
            let x = Attach { ahead: Some(Ahead { ticket: u64::MAX, backend_row: 7 }), flags: FLAG_AHEAD | FLAG_NEW_CLIENT, tls, ..a.clone() };
            let mut out = Vec::new();
            write_attach(&mut out, &x);
            assert!(attach_size_hint(&x) >= out.len());
            let (m, _) = parse_message(&out, 1 << 20).unwrap().unwrap();
            assert_ne!(m.body[8] & FLAG_AHEAD, 0);
            assert_eq!(parse_attach(m.body).unwrap(), Attach { flags: FLAG_NEW_CLIENT, ..x.clone() });
            // Cut short inside the ticket, or a zero ticket: an error.
            assert!(parse_attach(&m.body[..m.body.len() - 5]).is_err());
            let mut zero = m.body.to_vec();
            let n = zero.len();
            zero[n - 12..n - 4].fill(0);
            assert!(parse_attach(&zero).is_err());
        }
    }

    fn tls() -> TlsStatus {
        TlsStatus {
            bits: 256,
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            client_dn: "/CN=alice".into(),
            client_serial: "1234567890123456789012345".into(),
            issuer_dn: "/CN=test ca".into(),
        }
    }

    #[test]
    fn released_round_trip() {
        for r in [
            Released { client_id: u64::MAX - 1, queries: u64::MAX - 2, query_us: u64::MAX, bytes_sent: 1 << 40, settings: None, statements: None, defaults: None, told: None },
            Released { client_id: 7, queries: 3, query_us: 250, bytes_sent: 17, settings: Some(image().settings), statements: None, defaults: None, told: None },
            Released { client_id: 7, queries: 3, query_us: 250, bytes_sent: 17, settings: Some(vec![]), statements: Some(image().statements), defaults: Some(image().defaults), told: Some(image().told) },
        ] {
            let mut out = Vec::new();
            write_released(&mut out, &r);
            let (m, _) = parse_message(&out, 1 << 20).unwrap().unwrap();
            assert_eq!(m.tag, RELEASED);
            assert_eq!(parse_released(m.body).unwrap(), r);
        }
    }

    #[test]
    fn truncated_or_garbage_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        write_attach(
            &mut out,
            &Attach { client_id: 1, flags: 0, pool_row: 0, key_pid: -5, addr: vec![1; 16], local: vec![2; 16], settings: vec![("a".into(), "b".into())], image: image(), authn: Some(Authn { method: AUTHN_CERT, id: b"CN=alice".to_vec() }), tls: Some(tls()), ahead: None },
        );
        assert!(attach_size_hint(&Attach { client_id: 1, flags: 0, pool_row: 0, key_pid: -5, addr: vec![1; 16], local: vec![2; 16], settings: vec![("a".into(), "b".into())], image: image(), authn: Some(Authn { method: AUTHN_CERT, id: b"CN=alice".to_vec() }), tls: Some(tls()), ahead: None }) >= out.len());
        let body = &out[5..];
        for cut in 0..body.len() {
            assert!(parse_attach(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut rel = Vec::new();
        write_released(&mut rel, &Released { client_id: 1, queries: 0, query_us: 0, bytes_sent: 0, settings: Some(image().settings), statements: Some(image().statements), defaults: None, told: None });
        let body = &rel[5..];
        for cut in 0..body.len() {
            assert!(parse_released(&body[..cut]).is_err(), "cut at {cut}");
        }
        // A huge count must not allocate or loop: it is bounded by the bytes left.
        let mut evil = vec![0u8; 9];
        evil[8] = IMAGE_SETTINGS;
        evil.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_released(&evil).is_err());
    }
}
