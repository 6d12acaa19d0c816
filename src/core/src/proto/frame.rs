//! Framing of regular (post-startup) messages: one tag byte, then an i32
//! length that counts itself but not the tag.

use super::error::ProtoError;

/// One complete message borrowed from the input buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Message type byte, e.g. `b'Q'`.
    pub tag: u8,
    /// Body after the length word.
    pub body: &'a [u8],
}

/// Reads a big-endian i32 at `off`, if there are four bytes there.
pub(crate) fn be_i32(buf: &[u8], off: usize) -> Option<i32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses one message from the front of `buf`.
///
/// `Ok(None)` means more bytes are needed. The length is validated as soon as
/// it is readable so a hostile peer cannot make us buffer a huge message
/// before we notice. `max_len` bounds the length field (which includes the
/// four length bytes themselves). On success returns the message and the
/// number of bytes it occupies (`1 + length`).
pub fn parse_message(
    buf: &[u8],
    max_len: usize,
) -> Result<Option<(Message<'_>, usize)>, ProtoError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let Some(len) = be_i32(buf, 1) else {
        return Ok(None);
    };
    let len = usize::try_from(len).unwrap_or(0);
    if len < 4 || len > max_len {
        return Err(ProtoError::violation("invalid message length"));
    }
    let total = len.saturating_add(1);
    match buf.get(5..total) {
        Some(body) => Ok(Some((Message { tag, body }, total))),
        None => Ok(None),
    }
}

/// How many bytes at the front of `buf` make up a client's next query
/// cycle: messages up to and including the first simple Query (`Q`),
/// FunctionCall (`F`) or Sync (`S`), the points where the server answers
/// ReadyForQuery. `None` when they are not all in `buf` yet (a Flush, `H`,
/// with no Sync after it: the client waits for results first), or when a
/// Terminate (`X`), a COPY message or a bad length comes first: such input
/// is not a plain query cycle. A Flush before the Sync is part of the
/// cycle (the server, skipping to the Sync after the cancel's error,
/// skips it too). Also `None` for a cycle with a Close (`C`): the
/// server carries a Close out whatever the cancel (exec_close_message never
/// checks for one), so the cycle cannot be answered as cancelled at its
/// start without losing it (a Parse, Bind or Execute is cancelled there
/// before it takes effect, as here). Used to
/// answer a cancelled query that never reached a backend as the server
/// answers one cancelled at its start (protocol "Canceling Requests in
/// Progress").
pub fn query_cycle_len(buf: &[u8]) -> Option<usize> {
    let mut off = 0;
    loop {
        let (m, n) = parse_message(&buf[off..], usize::MAX >> 1).ok()??;
        off += n;
        match m.tag {
            b'Q' | b'F' | b'S' => return Some(off),
            b'P' | b'B' | b'D' | b'E' | b'H' => {}
            _ => return None,
        }
    }
}

/// Reads a NUL-terminated UTF-8 string from `body` at `off`.
/// Returns the string and the offset just past its terminator.
pub fn read_cstr(body: &[u8], off: usize) -> Result<(&str, usize), ProtoError> {
    let rest = body
        .get(off..)
        .ok_or_else(|| ProtoError::violation("invalid string in message"))?;
    let len = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| ProtoError::violation("invalid string in message"))?;
    let s = std::str::from_utf8(&rest[..len])
        .map_err(|_| ProtoError::violation("invalid string in message"))?;
    Ok((s, off + len + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn complete_message_and_leftover() {
        let mut buf = msg(b'Q', b"select 1\0");
        buf.extend_from_slice(b"Xtrailing");
        let (m, n) = parse_message(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'Q');
        assert_eq!(m.body, b"select 1\0");
        assert_eq!(n, 14);
    }

    #[test]
    fn empty_body() {
        let buf = msg(b'X', b"");
        let (m, n) = parse_message(&buf, 100).unwrap().unwrap();
        assert_eq!((m.tag, m.body, n), (b'X', &b""[..], 5));
    }

    #[test]
    fn incomplete() {
        let buf = msg(b'Q', b"select 1\0");
        for cut in 0..buf.len() {
            assert_eq!(
                parse_message(&buf[..cut], 1 << 20).unwrap(),
                None,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn bad_lengths() {
        for len in [-1i32, i32::MIN, 0, 3] {
            let mut b = vec![b'Q'];
            b.extend_from_slice(&len.to_be_bytes());
            let e = parse_message(&b, 1000).unwrap_err();
            assert_eq!(e.sqlstate, "08P01");
            assert_eq!(e.message, "invalid message length");
        }
        // oversize is rejected before the body arrives
        let mut b = vec![b'Q'];
        b.extend_from_slice(&1001i32.to_be_bytes());
        assert!(parse_message(&b, 1000).is_err());
        let mut b = vec![b'Q'];
        b.extend_from_slice(&1000i32.to_be_bytes());
        assert_eq!(parse_message(&b, 1000).unwrap(), None);
    }

    #[test]
    fn cstr() {
        let body = b"abc\0\0de\0";
        assert_eq!(read_cstr(body, 0).unwrap(), ("abc", 4));
        assert_eq!(read_cstr(body, 4).unwrap(), ("", 5));
        assert_eq!(read_cstr(body, 5).unwrap(), ("de", 8));
        assert!(read_cstr(body, 8).is_err());
        assert!(read_cstr(body, 100).is_err());
        assert!(read_cstr(b"abc", 0).is_err());
        assert!(read_cstr(b"\xff\0", 0).is_err());
    }

    #[test]
    fn be_i32_bounds() {
        assert_eq!(be_i32(&[0, 0, 0, 5], 0), Some(5));
        assert_eq!(be_i32(&[0, 0, 0], 0), None);
        assert_eq!(be_i32(&[0, 0, 0, 5], usize::MAX), None);
    }

    #[test]
    fn random_never_panics() {
        let mut x = 0xdead_beef_u32;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let n = (x % 16) as usize;
            let b: Vec<u8> = (0..n).map(|i| (x >> (i % 4 * 8)) as u8 & 0x0f).collect();
            if let Ok(Some((m, used))) = parse_message(&b, 12) {
                assert_eq!(used, m.body.len() + 5);
                assert!(used <= b.len());
            }
            let _ = read_cstr(&b, (x % 20) as usize);
        }
    }

    #[test]
    fn query_cycle_len_stops_at_the_first_ready_point() {
        let msg = |tag: u8, body: &[u8]| {
            let mut v = vec![tag];
            v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            v.extend_from_slice(body);
            v
        };
        let q = msg(b'Q', b"SELECT 1\0");
        assert_eq!(query_cycle_len(&q), Some(q.len()));
        let mut two = q.clone();
        two.extend_from_slice(&msg(b'Q', b"SELECT 2\0"));
        assert_eq!(query_cycle_len(&two), Some(q.len()), "only the first cycle");
        let ext = [msg(b'P', b"\0SELECT 1\0\0\0"), msg(b'B', b"\0\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        assert_eq!(query_cycle_len(&ext), Some(ext.len()));
        assert_eq!(query_cycle_len(&ext[..ext.len() - 1]), None, "Sync not all there");
        assert_eq!(query_cycle_len(&ext[..ext.len() - 5]), None, "no Sync yet");
        let flush = [msg(b'P', b"\0SELECT 1\0\0\0"), msg(b'H', b"")].concat();
        assert_eq!(query_cycle_len(&flush), None, "Flush, no Sync yet");
        let flushed = [flush.clone(), msg(b'S', b"")].concat();
        assert_eq!(query_cycle_len(&flushed), Some(flushed.len()), "a Flush before the Sync");
        assert_eq!(query_cycle_len(&msg(b'X', b"")), None);
        assert_eq!(query_cycle_len(&[b'Q', 0, 0, 0, 2]), None, "bad length");
        assert_eq!(query_cycle_len(&[]), None);
        // A Close is carried out by the server whatever the cancel: not a
        // cycle to answer as cancelled (pgjdbc's Close, Parse, ..., Sync).
        let close = [msg(b'C', b"Ss3\0"), msg(b'S', b"")].concat();
        assert_eq!(query_cycle_len(&close), None, "Close");
        let jdbc = [msg(b'C', b"SS_3\0"), msg(b'P', b"S_7\0SELECT 1\0\0\0"), msg(b'B', b"\0S_7\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        assert_eq!(query_cycle_len(&jdbc), None, "Close first");
        let named = [msg(b'P', b"S_7\0SELECT 1\0\0\0"), msg(b'B', b"\0S_7\0\0\0\0\0\0\0"), msg(b'E', b"\0\0\0\0\0"), msg(b'S', b"")].concat();
        assert_eq!(query_cycle_len(&named), Some(named.len()), "a named Parse is cancelled before it is stored, as directly");
    }
}
