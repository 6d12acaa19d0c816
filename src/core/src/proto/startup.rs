//! Startup-phase packets (no tag byte; i32 length then i32 code) and the
//! `options` startup parameter.
//!
//! The checks and messages follow what the PostgreSQL server reports for the
//! same input, so a client sees no difference between the pooler and the
//! server it fronts.

use super::error::{
    ProtoError, FEATURE_NOT_SUPPORTED, INVALID_AUTHORIZATION_SPECIFICATION, SYNTAX_ERROR,
};
use super::frame::be_i32;

/// Protocol version 3.0 as sent in a StartupMessage.
pub const PROTOCOL_3_0: i32 = 196608;
/// Code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80877103;
/// Code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
/// Code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// Largest startup packet body the server accepts (its length word excluded).
pub const MAX_STARTUP_PACKET: usize = 10_000;
/// Length in bytes of a protocol 3.0 cancel key.
pub const CANCEL_KEY_3_0: usize = 4;

/// What the server in front of which the pooler runs speaks, as its
/// `libpq/pqcomm.h` says: `PG_PROTOCOL_LATEST` and the longest cancel key.
/// PostgreSQL 15-17: 3.0 and 4-byte keys; 18: 3.2 and
/// `MAX_CANCEL_KEY_LENGTH` = 32 (storage/procsignal.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerProtocol {
    /// Minor version of `PG_PROTOCOL_LATEST` (the major is 3).
    pub newest_minor: u16,
    /// Longest cancel key the server issues and accepts, in bytes.
    pub max_cancel_key: usize,
    /// `pg_clean_ascii()` (common/string.c) writes a byte outside printable
    /// ASCII as `\xNN` (16+) rather than `?` (15): see [`clean_ascii`].
    pub clean_escapes: bool,
}

impl ServerProtocol {
    /// PostgreSQL 16 and 17 (15: `clean_escapes` false).
    pub const V3_0: ServerProtocol = ServerProtocol { newest_minor: 0, max_cancel_key: CANCEL_KEY_3_0, clean_escapes: true };
    /// PostgreSQL 18.
    pub const V3_2: ServerProtocol = ServerProtocol { newest_minor: 2, max_cancel_key: 32, clean_escapes: true };

    /// The minor version a session runs with, as the server sets
    /// `FrontendProtocol` (backend_startup.c): the client's request, capped
    /// at the newest the server speaks. 18 accepts 3.1 as asked (no
    /// NegotiateProtocolVersion), like any minor up to its newest.
    pub fn session_minor(&self, requested_minor: u16) -> u16 {
        requested_minor.min(self.newest_minor)
    }

    /// The full version code NegotiateProtocolVersion carries for a client
    /// that asked for 3.`requested_minor` (196608 = 3.0, 196610 = 3.2).
    /// PostgreSQL 15-17 send `PG_PROTOCOL_LATEST`, 18 `FrontendProtocol`;
    /// both equal 3.min(requested, newest) whenever the message is sent.
    pub fn negotiate_version(&self, requested_minor: u16) -> i32 {
        (3 << 16) | i32::from(self.session_minor(requested_minor))
    }

    /// Whether the server answers a StartupMessage with
    /// NegotiateProtocolVersion: a minor newer than its own, or `_pq_.`
    /// options it does not know (it knows none).
    pub fn needs_negotiation(&self, requested_minor: u16, unrecognized_options: usize) -> bool {
        requested_minor > self.newest_minor || unrecognized_options > 0
    }

    /// Length of the cancel key in BackendKeyData for a session of this
    /// minor version: protocol 3.2 carries the server's long key, older
    /// sessions 4 bytes.
    pub fn cancel_key_len(&self, session_minor: u16) -> usize {
        if session_minor >= 2 {
            self.max_cancel_key
        } else {
            CANCEL_KEY_3_0
        }
    }
}

/// One decoded startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    /// A StartupMessage for protocol 3.x.
    Startup {
        /// Always 3.
        major: u16,
        /// Requested minor version; > 0 must be answered with NegotiateProtocolVersion.
        minor: u16,
        /// Parameters in packet order (duplicates collapsed, last value wins),
        /// including `user`, `database`, `options` and any `_pq_.` ones.
        params: Vec<(String, String)>,
    },
    /// SSLRequest.
    SslRequest,
    /// GSSENCRequest.
    GssEncRequest,
    /// CancelRequest.
    Cancel {
        /// Backend process id the client was given.
        pid: i32,
        /// Cancel key the client was given (4 bytes, or up to the server's
        /// longest with protocol 3.2).
        key: Vec<u8>,
    },
}

impl StartupRequest {
    /// Value of a startup parameter, if this is a StartupMessage that has it.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupRequest::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

fn bad_length() -> ProtoError {
    ProtoError::violation("invalid length of startup packet")
}

fn bad_layout() -> ProtoError {
    ProtoError::violation("invalid startup packet layout: expected terminator as last byte")
}

/// Parses one startup-phase packet from the front of `buf` for a protocol
/// 3.0 server (PostgreSQL 15-17); see [`parse_startup_for`].
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupRequest, usize)>, ProtoError> {
    parse_startup_for(buf, &ServerProtocol::V3_0)
}

/// Parses one startup-phase packet from the front of `buf`, as a server
/// speaking `server` does.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((req, consumed)))` on
/// success. The length word is checked as soon as it is readable, as the
/// server does: a length below 8 or a body (length minus the length word)
/// above [`MAX_STARTUP_PACKET`] is rejected. A CancelRequest's key must be
/// 4 bytes on a 3.0 server and 1 to `max_cancel_key` bytes on 18.
pub fn parse_startup_for(
    buf: &[u8],
    server: &ServerProtocol,
) -> Result<Option<(StartupRequest, usize)>, ProtoError> {
    let Some(len) = be_i32(buf, 0) else {
        return Ok(None);
    };
    let len = usize::try_from(len).map_err(|_| bad_length())?;
    if len < 8 || len - 4 > MAX_STARTUP_PACKET {
        return Err(bad_length());
    }
    let Some(packet) = buf.get(..len) else {
        return Ok(None);
    };
    let body = &packet[4..];
    let code = be_i32(body, 0).ok_or_else(bad_length)?;
    let req = match code {
        CANCEL_REQUEST_CODE => {
            // The server insists on the exact size for 3.0 cancel requests;
            // 18 takes any key length from 1 to MAX_CANCEL_KEY_LENGTH.
            let key_len = body.len().saturating_sub(8);
            let ok = if server.max_cancel_key == CANCEL_KEY_3_0 {
                key_len == CANCEL_KEY_3_0 && body.len() == 12
            } else {
                body.len() > 8 && key_len <= server.max_cancel_key
            };
            if !ok {
                return Err(bad_length());
            }
            let pid = be_i32(body, 4).ok_or_else(bad_length)?;
            StartupRequest::Cancel { pid, key: body[8..].to_vec() }
        }
        // Extra bytes after these codes are read and ignored, as by the server.
        SSL_REQUEST_CODE => StartupRequest::SslRequest,
        GSSENC_REQUEST_CODE => StartupRequest::GssEncRequest,
        _ => parse_startup_message(code, body, server)?,
    };
    Ok(Some((req, len)))
}

/// 0A000 `unsupported frontend protocol M.m: server supports 3.0 to 3.N`
/// for a version word the server does not take as a protocol version; also
/// what the server answers an SSLRequest or GSSENCRequest once that
/// negotiation is done (backend_startup.c ProcessStartupPacket(): the code
/// falls through to the version check), e.g. `1234.5680` for a
/// GSSENCRequest inside a TLS session begun with SSLRequest.
pub fn unsupported_protocol(code: u32, server: &ServerProtocol) -> ProtoError {
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    ProtoError::new(
        FEATURE_NOT_SUPPORTED,
        format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{}", server.newest_minor),
    )
}

/// Decodes a StartupMessage body (starting at the version word).
fn parse_startup_message(
    code: i32,
    body: &[u8],
    server: &ServerProtocol,
) -> Result<StartupRequest, ProtoError> {
    // Reinterpret as unsigned so a negative code reports as a huge major.
    let code = code as u32;
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    if major != 3 {
        return Err(unsupported_protocol(code, server));
    }

    // name\0value\0 ... \0 ; the first empty name is the terminator, which
    // must be the packet's last byte.
    let mut params: Vec<(String, String)> = Vec::new();
    let mut off = 4;
    let mut terminated = false;
    while off < body.len() {
        if body[off] == 0 {
            terminated = off == body.len() - 1;
            break;
        }
        let (name, next) = cstr_bytes(body, off).ok_or_else(bad_layout)?;
        let (value, next) = cstr_bytes(body, next).ok_or_else(bad_layout)?;
        off = next;
        let name = utf8(name)?;
        // The server takes the values as bytes. application_name (the one
        // a client's locale decides, e.g. a LATIN1 program name) ends up as
        // the server cleans it (guc check hook and log lines alike), so a
        // value that is not UTF-8 is taken cleaned; others are refused.
        let value = match utf8(value) {
            Err(_) if name.eq_ignore_ascii_case("application_name") => clean_ascii(value, server.clean_escapes),
            v => v?,
        };
        // A repeated name: the last value wins, except `replication`, which
        // the server folds occurrence by occurrence (each kept, in order;
        // see [`ReplicationFlags`]).
        match params.iter_mut().find(|(k, _)| *k == name && name != "replication") {
            Some(slot) => slot.1 = value,
            None => params.push((name, value)),
        }
    }
    if !terminated {
        return Err(bad_layout());
    }
    if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
        return Err(ProtoError::new(
            INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        ));
    }
    Ok(StartupRequest::Startup {
        major,
        minor,
        params,
    })
}

/// The user and database names a StartupMessage's parameters gave before
/// anything in it was refused ("" where none): what the server has in
/// `port->user_name` and `port->database_name`, so in a refusal's log line
/// (%u, %d), when ProcessStartupPacket (backend_startup.c; postmaster.c
/// before 18) raises its FATAL for the packet's layout or a missing user.
/// It reads the parameters as the server does, each up to a NUL (or the
/// packet's end), until an empty name or a name with no room for a value,
/// and a version other than 3 reads none (refused first). Not UTF-8: lossy.
pub fn startup_names_read(packet: &[u8]) -> (String, String) {
    let (mut user, mut database) = (String::new(), String::new());
    let Some(len) = be_i32(packet, 0).and_then(|l| usize::try_from(l).ok()) else {
        return (user, database);
    };
    let Some(body) = packet.get(4..len.min(packet.len())) else {
        return (user, database);
    };
    if be_i32(body, 0).is_none_or(|code| (code as u32) >> 16 != 3) {
        return (user, database);
    }
    let cstr = |at: usize| {
        let rest = &body[at..];
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut off = 4;
    while off < body.len() {
        let name = cstr(off);
        if name.is_empty() {
            break;
        }
        let value_at = off + name.len() + 1;
        if value_at >= body.len() {
            break;
        }
        let value = cstr(value_at);
        match name {
            b"user" => user = String::from_utf8_lossy(value).into_owned(),
            b"database" => database = String::from_utf8_lossy(value).into_owned(),
            _ => {}
        }
        off = value_at + value.len() + 1;
    }
    (user, database)
}

/// A client's string as the server keeps it for `application_name` and its
/// log lines (`pg_clean_ascii()`, common/string.c): every byte outside
/// printable ASCII as `\xNN` (`escapes`, 16+) or as `?` (15), so newlines
/// and terminal escapes cannot forge or hide log lines.
pub fn clean_ascii(bytes: &[u8], escapes: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (32..=126).contains(&b) {
            out.push(b as char);
        } else if escapes {
            out.push_str(&format!("\\x{b:02x}"));
        } else {
            out.push('?');
        }
    }
    out
}

/// NUL-terminated byte string at `off` and the offset after it.
fn cstr_bytes(body: &[u8], off: usize) -> Option<(&[u8], usize)> {
    let rest = body.get(off..)?;
    let len = rest.iter().position(|&b| b == 0)?;
    Some((&rest[..len], off + len + 1))
}

fn utf8(b: &[u8]) -> Result<String, ProtoError> {
    String::from_utf8(b.to_vec())
        .map_err(|_| ProtoError::violation("invalid startup packet: parameter is not valid UTF-8"))
}

/// Splits `options` like the server: words separated by (C locale)
/// whitespace, a backslash makes the next character literal.
fn split_options(options: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.peek().is_some_and(|&c| is_c_space(c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut word = String::new();
        let mut escaped = false;
        while let Some(&c) = chars.peek() {
            if is_c_space(c) && !escaped {
                break;
            }
            chars.next();
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(c);
            }
        }
        out.push(word);
    }
}

/// `isspace()` in the C locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn invalid_argument(arg: &str) -> ProtoError {
    ProtoError::new(
        SYNTAX_ERROR,
        format!("invalid command-line argument for server process: {arg}"),
    )
    .with_hint("Try \"postgres --help\" for more information.")
}

/// Splits `name=value` like the server: dashes in the name become
/// underscores (so `--work-mem=1MB` sets `work_mem`).
fn split_long_option(arg: &str) -> Option<(String, String)> {
    let (name, value) = arg.split_once('=')?;
    Some((name.replace('-', "_"), value.to_string()))
}

/// Interprets the `options` startup parameter: `-c name=value`,
/// `-cname=value` and `--name=value` become (name, value) pairs, in order.
/// Any other switch or stray word is rejected with the server's message.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, ProtoError> {
    let args = split_options(options);
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (optarg, flag) = if arg == "--" {
            // End of switches: anything after it is a stray argument.
            return match args.get(i + 1) {
                Some(a) => Err(invalid_argument(a)),
                None => Ok(out),
            };
        } else if let Some(rest) = arg.strip_prefix("--") {
            (rest.to_string(), "--")
        } else if arg == "-c" {
            i += 1;
            match args.get(i) {
                Some(next) => (next.clone(), "-c "),
                None => return Err(invalid_argument(arg)),
            }
        } else if let Some(rest) = arg.strip_prefix("-c") {
            (rest.to_string(), "-c ")
        } else {
            return Err(invalid_argument(arg));
        };
        match split_long_option(&optarg) {
            Some(pair) => out.push(pair),
            None => {
                return Err(ProtoError::new(
                    SYNTAX_ERROR,
                    format!("{flag}{optarg} requires a value"),
                ))
            }
        }
        i += 1;
    }
    Ok(out)
}

/// Writes settings as an `options` startup value that the server splits
/// back into the same pairs (postmaster pg_split_opts(): words split at C
/// whitespace, a backslash makes the next character literal; then each
/// `-c name=value` as process_postgres_switches() reads it). Every
/// whitespace character and backslash is escaped, so values keep spaces and
/// backslashes: `parse_options(&format_options(x)) == x` for any pairs whose
/// names have no `=` or `-` (what [`parse_options`] returns).
pub fn format_options(settings: &[(String, String)]) -> String {
    let mut out = String::new();
    for (name, value) in settings {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        for c in name.chars().chain(std::iter::once('=')).chain(value.chars()) {
            if c == '\\' || is_c_space(c) {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// The server's two walsender flags (`am_walsender`, `am_db_walsender`)
/// while it reads a startup packet's `replication` parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplicationFlags {
    /// `am_walsender`: a walsender at all.
    pub walsender: bool,
    /// `am_db_walsender`: connected to a database (logical).
    pub database: bool,
}

impl ReplicationFlags {
    /// Folds one more `replication` parameter in, as the server does
    /// (ProcessStartupPacket(): `database` sets both flags, a boolean sets
    /// only the walsender flag, so a later parameter overrides only the
    /// flags it sets: `database` then `true` is logical, `database` then
    /// `false` is no walsender, `database`, `false`, `true` is logical).
    pub fn fold(self, value: &str) -> Result<Self, ProtoError> {
        Ok(match parse_replication(value)? {
            Replication::Logical => Self { walsender: true, database: true },
            Replication::Physical => Self { walsender: true, ..self },
            Replication::None => Self { walsender: false, ..self },
        })
    }

    /// What the flags make of the session.
    pub fn kind(self) -> Replication {
        match (self.walsender, self.database) {
            (false, _) => Replication::None,
            (true, false) => Replication::Physical,
            (true, true) => Replication::Logical,
        }
    }
}

/// What the `replication` startup parameter asks for, read as the server
/// reads it (postmaster ProcessStartupPacket(), backend_startup.c from 17):
/// exactly `database` (case-sensitive) is a logical walsender, a boolean
/// (`parse_bool`: true/false/yes/no/on/off/1/0, any case, unique prefixes)
/// is a physical walsender or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// No walsender: an ordinary session.
    None,
    /// `am_walsender` only: matches `replication` lines of pg_hba.conf.
    Physical,
    /// `am_walsender` and `am_db_walsender`: matches database lines.
    Logical,
}

/// Parses the `replication` value; anything else is the server's FATAL
/// 22023 with its hint.
pub fn parse_replication(value: &str) -> Result<Replication, ProtoError> {
    if value == "database" {
        return Ok(Replication::Logical);
    }
    match parse_bool(value) {
        Some(true) => Ok(Replication::Physical),
        Some(false) => Ok(Replication::None),
        None => Err(ProtoError::new(
            "22023",
            format!("invalid value for parameter \"replication\": \"{value}\""),
        )
        .with_hint("Valid values are: \"false\", 0, \"true\", 1, \"database\".")),
    }
}

/// The server's parse_bool() (utils/adt/bool.c parse_bool_with_len()):
/// case-insensitive, any non-empty prefix of true/false/yes/no, "on", "of"
/// or "off" ("o" alone is ambiguous), "1" and "0".
pub fn parse_bool(value: &str) -> Option<bool> {
    let v = value.to_ascii_lowercase();
    let len = v.len();
    let prefix_of = |word: &str| len > 0 && word.starts_with(v.as_str());
    match v.as_bytes().first()? {
        b't' if prefix_of("true") => Some(true),
        b'f' if prefix_of("false") => Some(false),
        b'y' if prefix_of("yes") => Some(true),
        b'n' if prefix_of("no") => Some(false),
        b'o' if v == "on" => Some(true),
        b'o' if len >= 2 && prefix_of("off") => Some(false),
        b'1' if len == 1 => Some(true),
        b'0' if len == 1 => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: i32, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((payload.len() + 8) as i32).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn names_read_before_a_refusal_as_the_server_reads_them() {
        let names = |payload: &[u8]| startup_names_read(&packet(PROTOCOL_3_0, payload));
        let own = |u: &str, d: &str| (u.to_string(), d.to_string());
        assert_eq!(names(b"database\0postgres\0\0"), own("", "postgres"));
        assert_eq!(names(b"user\0hostile\0"), own("hostile", ""), "no final terminator");
        assert_eq!(names(b"user\0hostile"), own("hostile", ""), "unterminated value");
        assert_eq!(names(b"user\0hostile\0\0junk"), own("hostile", ""), "data after the terminator");
        assert_eq!(names(b"user\0a\0user\0b\0database\0"), own("b", ""), "a name with no room for a value");
        assert_eq!(names(b"\0user\0x\0\0"), own("", ""), "an empty name ends them");
        assert_eq!(startup_names_read(&packet(4 << 16, b"user\0x\0\0")), own("", ""), "another version");
        assert_eq!(startup_names_read(&[0, 0]), own("", ""));
    }

    fn startup(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut p = Vec::new();
        for (k, v) in pairs {
            p.extend_from_slice(k.as_bytes());
            p.push(0);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        p.push(0);
        packet(PROTOCOL_3_0, &p)
    }

    #[test]
    fn normal_startup() {
        let buf = startup(&[
            ("user", "alice"),
            ("database", "db"),
            ("application_name", "psql"),
        ]);
        let (req, n) = parse_startup(&buf).unwrap().unwrap();
        assert_eq!(n, buf.len());
        assert_eq!(req.param("user"), Some("alice"));
        assert_eq!(req.param("nope"), None);
        assert_eq!(
            req,
            StartupRequest::Startup {
                major: 3,
                minor: 0,
                params: vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "db".into()),
                    ("application_name".into(), "psql".into()),
                ],
            }
        );
    }

    #[test]
    fn consumes_only_its_packet() {
        let mut buf = startup(&[("user", "a")]);
        let len = buf.len();
        buf.extend_from_slice(b"more");
        assert_eq!(parse_startup(&buf).unwrap().unwrap().1, len);
    }

    #[test]
    fn truncated_needs_more() {
        let buf = startup(&[("user", "alice")]);
        for cut in 0..buf.len() {
            assert_eq!(parse_startup(&buf[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn bad_lengths() {
        for len in [-1i32, i32::MIN, 0, 4, 7, 10_005, i32::MAX] {
            let e = parse_startup(&len.to_be_bytes()).unwrap_err();
            assert_eq!(e.sqlstate, "08P01");
            assert_eq!(e.message, "invalid length of startup packet");
        }
        // the largest allowed body is MAX_STARTUP_PACKET bytes
        assert_eq!(parse_startup(&10_004i32.to_be_bytes()).unwrap(), None);
    }

    #[test]
    fn oversized_full_packet() {
        let big = "x".repeat(MAX_STARTUP_PACKET);
        let buf = startup(&[("user", "a"), ("application_name", &big)]);
        assert_eq!(
            parse_startup(&buf).unwrap_err().message,
            "invalid length of startup packet"
        );
    }

    #[test]
    fn wrong_protocol() {
        for (code, text) in [
            (0x0002_0000, "2.0"),
            (0x0004_0000, "4.0"),
            (0x0001_0005, "1.5"),
            (-1, "65535.65535"),
        ] {
            let e = parse_startup(&packet(code, b"user\0a\0\0")).unwrap_err();
            assert_eq!(e.sqlstate, "0A000");
            assert_eq!(
                e.message,
                format!("unsupported frontend protocol {text}: server supports 3.0 to 3.0")
            );
        }
    }

    #[test]
    fn newer_minor_is_reported() {
        let buf = packet(0x0003_0002, b"user\0a\0_pq_.foo\0bar\0\0");
        let (req, _) = parse_startup(&buf).unwrap().unwrap();
        match req {
            StartupRequest::Startup {
                major,
                minor,
                params,
            } => {
                assert_eq!((major, minor), (3, 2));
                assert_eq!(params[1], ("_pq_.foo".to_string(), "bar".to_string()));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn layout_errors() {
        let layout = "invalid startup packet layout: expected terminator as last byte";
        for payload in [
            &b""[..],           // no terminator at all
            b"user\0a\0",       // missing final terminator
            b"user\0a",         // value unterminated
            b"user",            // name unterminated
            b"user\0",          // value missing
            b"user\0a\0\0junk", // bytes after terminator
            b"user\0a\0\0\0",   // double terminator
        ] {
            let e = parse_startup(&packet(PROTOCOL_3_0, payload)).unwrap_err();
            assert_eq!(e.sqlstate, "08P01", "{payload:?}");
            assert_eq!(e.message, layout, "{payload:?}");
        }
    }

    #[test]
    fn missing_or_empty_user() {
        for pairs in [&[("database", "x")][..], &[("user", "")], &[]] {
            let e = parse_startup(&startup(pairs)).unwrap_err();
            assert_eq!(e.sqlstate, "28000");
            assert_eq!(
                e.message,
                "no PostgreSQL user name specified in startup packet"
            );
        }
        // an empty user overridden by a later non-empty one is fine
        assert!(parse_startup(&startup(&[("user", ""), ("user", "b")])).is_ok());
    }

    #[test]
    fn duplicates_keep_last() {
        let buf = startup(&[("user", "a"), ("database", "x"), ("user", "b")]);
        let (req, _) = parse_startup(&buf).unwrap().unwrap();
        assert_eq!(req.param("user"), Some("b"));
        match req {
            StartupRequest::Startup { params, .. } => assert_eq!(params.len(), 2),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn non_utf8() {
        for payload in [&b"user\0\xff\0\0"[..], b"\xc3\0a\0user\0a\0\0", b"user\0a\0options\0-c x=\xfc\0\0"] {
            let e = parse_startup(&packet(PROTOCOL_3_0, payload)).unwrap_err();
            assert_eq!(e.sqlstate, "08P01");
            assert!(e.message.starts_with("invalid startup packet"));
        }
        // application_name, as the server cleans it (a LATIN1 program name).
        let payload = b"user\0a\0application_name\0B\xfccher\n\0\0";
        for (server, want) in [(ServerProtocol::V3_0, "B\\xfccher\\x0a"), (ServerProtocol { clean_escapes: false, ..ServerProtocol::V3_0 }, "B?cher?")] {
            let p = packet(PROTOCOL_3_0, payload);
            let Some((StartupRequest::Startup { params, .. }, _)) = parse_startup_for(&p, &server).unwrap() else { panic!("not a startup") };
            assert_eq!(params[1], ("application_name".to_string(), want.to_string()));
        }
        // Valid UTF-8 is kept as sent (cleaned where it is applied).
        assert_eq!(clean_ascii("héllo\t".as_bytes(), true), "h\\xc3\\xa9llo\\x09");
    }

    #[test]
    fn special_requests() {
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"")).unwrap(),
            Some((StartupRequest::SslRequest, 8))
        );
        assert_eq!(
            parse_startup(&packet(GSSENC_REQUEST_CODE, b"")).unwrap(),
            Some((StartupRequest::GssEncRequest, 8))
        );
        let mut p = Vec::new();
        p.extend_from_slice(&1234i32.to_be_bytes());
        p.extend_from_slice(&(-5i32).to_be_bytes());
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, &p)).unwrap(),
            Some((StartupRequest::Cancel { pid: 1234, key: (-5i32).to_be_bytes().to_vec() }, 16))
        );
        // cancel of the wrong size
        assert!(parse_startup(&packet(CANCEL_REQUEST_CODE, &p[..4])).is_err());
        p.push(0);
        assert!(parse_startup(&packet(CANCEL_REQUEST_CODE, &p)).is_err());
        // 18: keys of 1 to 32 bytes
        let v18 = ServerProtocol::V3_2;
        assert_eq!(
            parse_startup_for(&packet(CANCEL_REQUEST_CODE, &p), &v18).unwrap(),
            Some((StartupRequest::Cancel { pid: 1234, key: p[4..].to_vec() }, 17))
        );
        let mut long = 7i32.to_be_bytes().to_vec();
        long.extend_from_slice(&[9u8; 32]);
        assert!(matches!(
            parse_startup_for(&packet(CANCEL_REQUEST_CODE, &long), &v18).unwrap(),
            Some((StartupRequest::Cancel { pid: 7, ref key }, 44)) if key.len() == 32
        ));
        long.push(9);
        assert!(parse_startup_for(&packet(CANCEL_REQUEST_CODE, &long), &v18).is_err());
        assert!(parse_startup_for(&packet(CANCEL_REQUEST_CODE, &long[..4]), &v18).is_err());
    }

    #[test]
    fn negotiation_as_each_server() {
        let (v30, v32) = (ServerProtocol::V3_0, ServerProtocol::V3_2);
        // 15-17: NegotiateProtocolVersion carries 3.0 = 196608
        assert!(!v30.needs_negotiation(0, 0));
        assert!(v30.needs_negotiation(0, 1));
        assert!(v30.needs_negotiation(1, 0));
        assert_eq!(v30.negotiate_version(2), 196608);
        assert_eq!(v30.negotiate_version(0), 196608);
        assert_eq!(v30.cancel_key_len(v30.session_minor(2)), 4);
        // 18: 3.1 and 3.2 accepted; newer gets 3.2 = 196610
        assert!(!v32.needs_negotiation(1, 0));
        assert!(!v32.needs_negotiation(2, 0));
        assert!(v32.needs_negotiation(3, 0));
        assert!(v32.needs_negotiation(0, 1));
        assert_eq!(v32.negotiate_version(3), 196610);
        assert_eq!(v32.negotiate_version(9999), 196610);
        assert_eq!(v32.negotiate_version(0), 196608);
        assert_eq!(v32.cancel_key_len(v32.session_minor(1)), 4);
        assert_eq!(v32.cancel_key_len(v32.session_minor(2)), 32);
        assert_eq!(v32.cancel_key_len(v32.session_minor(3)), 32);
        let e = parse_startup_for(&packet(4 << 16, b"user\0u\0\0"), &v32).unwrap_err();
        assert_eq!(e.message, "unsupported frontend protocol 4.0: server supports 3.0 to 3.2");
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let n = (seed % 40) as usize;
            let mut b: Vec<u8> = (0..n)
                .map(|i| (seed.rotate_left(i as u32) & 0xff) as u8)
                .collect();
            if n >= 8 {
                b[..4].copy_from_slice(&(n as i32).to_be_bytes());
                if seed & 1 == 0 {
                    b[4..8].copy_from_slice(&PROTOCOL_3_0.to_be_bytes());
                }
            }
            let _ = parse_startup(&b);
        }
    }

    #[test]
    fn options_basic() {
        assert_eq!(
            parse_options("-c a=b --c=d -cfoo=bar").unwrap(),
            vec![
                ("a".to_string(), "b".to_string()),
                ("c".to_string(), "d".to_string()),
                ("foo".to_string(), "bar".to_string()),
            ]
        );
        assert_eq!(parse_options("").unwrap(), vec![]);
        assert_eq!(parse_options("  \t\n ").unwrap(), vec![]);
    }

    #[test]
    fn options_escapes_and_dashes() {
        assert_eq!(
            parse_options(r"-c search_path=a\ b").unwrap(),
            vec![("search_path".to_string(), "a b".to_string())]
        );
        assert_eq!(
            parse_options(r"--work-mem=1MB -c x=a\\b\").unwrap(),
            vec![
                ("work_mem".to_string(), "1MB".to_string()),
                ("x".to_string(), r"a\b".to_string())
            ]
        );
        // only the name has dashes mapped; value keeps '=' after the first
        assert_eq!(
            parse_options("-c a-b=c-d=e").unwrap(),
            vec![("a_b".to_string(), "c-d=e".to_string())]
        );
        assert_eq!(
            parse_options("-c a=").unwrap(),
            vec![("a".to_string(), String::new())]
        );
    }

    #[test]
    fn options_errors() {
        let e = parse_options("-B 100").unwrap_err();
        assert_eq!(e.sqlstate, "42601");
        assert_eq!(
            e.message,
            "invalid command-line argument for server process: -B"
        );
        assert_eq!(
            e.hint.as_deref(),
            Some("Try \"postgres --help\" for more information.")
        );
        assert!(parse_options("foo").is_err());
        assert!(parse_options("-c").is_err());
        assert!(parse_options("-c a=b stray").is_err());
        assert!(parse_options("-- x").is_err());
        assert_eq!(parse_options("-c a=b --").unwrap().len(), 1);
        assert_eq!(
            parse_options("-c novalue").unwrap_err().message,
            "-c novalue requires a value"
        );
        assert_eq!(
            parse_options("--novalue").unwrap_err().message,
            "--novalue requires a value"
        );
    }

    #[test]
    fn options_never_panic() {
        let pieces = [
            "-c", "--", "-", "a=b", "=", "\\", "\\ ", " ", "\t", "é", "x", "-cq=", "--a-b=c",
        ];
        let mut x = 88172645463325252u64;
        for _ in 0..5000 {
            let mut s = String::new();
            for _ in 0..(x % 8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                s.push_str(pieces[(x % pieces.len() as u64) as usize]);
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if let Ok(pairs) = parse_options(&s) {
                assert!(pairs.iter().all(|(k, _)| !k.contains('-')), "{s:?}");
            }
        }
    }

    #[test]
    fn replication_values_as_the_server() {
        for v in ["true", "TRUE", "t", "tr", "on", "ON", "yes", "y", "1"] {
            assert_eq!(parse_replication(v).unwrap(), Replication::Physical, "{v}");
        }
        for v in ["false", "f", "off", "of", "no", "n", "0", "FALSE"] {
            assert_eq!(parse_replication(v).unwrap(), Replication::None, "{v}");
        }
        assert_eq!(parse_replication("database").unwrap(), Replication::Logical);
        for v in ["Database", "", "o", "2", "truex", "onn", "11", " true"] {
            let e = parse_replication(v).unwrap_err();
            assert_eq!(e.sqlstate, "22023");
            assert_eq!(e.message, format!("invalid value for parameter \"replication\": \"{v}\""));
            assert_eq!(e.hint.as_deref(), Some("Valid values are: \"false\", 0, \"true\", 1, \"database\"."));
        }
    }

    #[test]
    fn format_options_round_trips() {
        let cases: Vec<Vec<(String, String)>> = vec![
            vec![],
            vec![("a".into(), "b".into())],
            vec![("search_path".into(), "a b".into()), ("x".into(), r"a\b\".into())],
            vec![("application_name".into(), " lead\ttab\nnl \\ ".into()), ("e".into(), String::new())],
            vec![("user".into(), "postgres".into()), ("k".into(), "v=w -c y=z".into())],
            vec![("x".into(), "é\\ \r\x0b\x0c".into())],
        ];
        for x in cases {
            let s = format_options(&x);
            assert_eq!(parse_options(&s).unwrap(), x, "{s:?}");
        }
        assert_eq!(format_options(&[("a".into(), "b c".into())]), r"-c a=b\ c");
    }

    #[test]
    fn replication_folds_as_the_server() {
        let fold = |vals: &[&str]| vals.iter().try_fold(ReplicationFlags::default(), |f, v| f.fold(v)).map(ReplicationFlags::kind);
        assert_eq!(fold(&["database", "true"]).unwrap(), Replication::Logical);
        assert_eq!(fold(&["true", "database"]).unwrap(), Replication::Logical);
        assert_eq!(fold(&["database", "false"]).unwrap(), Replication::None);
        assert_eq!(fold(&["database", "false", "on"]).unwrap(), Replication::Logical);
        assert_eq!(fold(&["false", "true"]).unwrap(), Replication::Physical);
        assert_eq!(fold(&["true", "off"]).unwrap(), Replication::None);
        assert_eq!(fold(&[]).unwrap(), Replication::None);
        assert_eq!(fold(&["database", "bogus"]).unwrap_err().sqlstate, "22023");
    }
}
