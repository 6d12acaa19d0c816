//! SCRAM message syntax: comma-separated `a=value` attributes.
//!
//! Works on bytes, not `str`: the username attribute may be in any encoding
//! and is ignored anyway, so only the parts we use are validated.

use super::ScramError;

/// Reads attributes left to right, remembering where each started.
pub(super) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

/// A byte as auth-scram.c's sanitize_char() prints it in an error detail:
/// a visible ASCII character quoted (`'n'`), anything else as `0x0a`; the
/// end of the message is the C string's NUL, `0x00`.
pub(super) fn sanitize_char(c: Option<u8>) -> String {
    match c {
        Some(c) if (0x21..=0x7e).contains(&c) => format!("'{}'", c as char),
        Some(c) => format!("0x{c:02x}"),
        None => "0x00".to_string(),
    }
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8], pos: usize) -> Self {
        Cursor { buf, pos }
    }

    pub(super) fn pos(&self) -> usize {
        self.pos
    }

    pub(super) fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Reads `=value` after an attribute letter, and the comma after it.
    fn value(&mut self, attr: u8) -> Result<&'a [u8], ScramError> {
        if self.peek() != Some(b'=') {
            return Err(ScramError::malformed(format!(
                "Expected character \"=\" for attribute \"{}\".",
                attr as char
            )));
        }
        self.pos += 1;
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let len = rest.iter().position(|&b| b == b',').unwrap_or(rest.len());
        self.pos += len;
        if self.peek() == Some(b',') {
            self.pos += 1;
        }
        Ok(&rest[..len])
    }

    /// Reads attribute `attr`, failing if a different one comes next.
    pub(super) fn expect(&mut self, attr: u8) -> Result<&'a [u8], ScramError> {
        if self.peek() != Some(attr) {
            return Err(ScramError::malformed(format!(
                "Expected attribute \"{}\" but found \"{}\".",
                attr as char,
                sanitize_char(self.peek())
            )));
        }
        self.pos += 1;
        self.value(attr)
    }

    /// Reads whatever attribute comes next.
    pub(super) fn any(&mut self) -> Result<(u8, &'a [u8]), ScramError> {
        match self.peek() {
            Some(c) if c.is_ascii_alphabetic() => {
                self.pos += 1;
                Ok((c, self.value(c)?))
            }
            None => Err(ScramError::malformed(
                "Attribute expected, but found end of string.",
            )),
            c => Err(ScramError::malformed(format!(
                "Attribute expected, but found invalid character \"{}\".",
                sanitize_char(c)
            ))),
        }
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E (visible ASCII except comma).
/// True for an empty string, as auth-scram.c's is_scram_printable(): the
/// server accepts an empty client nonce.
pub(super) fn is_printable(s: &[u8]) -> bool {
    s.iter().all(|&c| (0x21..=0x7e).contains(&c) && c != b',')
}

/// Rejects input the server would: empty, or containing a NUL.
pub(super) fn check_whole(data: &[u8]) -> Result<(), ScramError> {
    if data.is_empty() {
        return Err(ScramError::malformed("The message is empty."));
    }
    if data.contains(&0) {
        return Err(ScramError::malformed(
            "Message length does not match input length.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_attributes() {
        let mut c = Cursor::new(b"n=user,r=abc,x=,p=zz", 0);
        assert_eq!(c.expect(b'n').unwrap(), b"user");
        assert_eq!(c.expect(b'r').unwrap(), b"abc");
        assert_eq!(c.pos(), 13);
        assert_eq!(c.any().unwrap(), (b'x', &b""[..]));
        assert_eq!(c.any().unwrap(), (b'p', &b"zz"[..]));
        assert!(c.at_end());
        assert!(c.any().is_err());
        assert!(c.expect(b'q').is_err());
    }

    #[test]
    fn errors() {
        assert!(Cursor::new(b"r=x", 0).expect(b'n').is_err());
        assert!(Cursor::new(b"n", 0).expect(b'n').is_err());
        assert!(Cursor::new(b"nx", 0).expect(b'n').is_err());
        assert!(Cursor::new(b"1=x", 0).any().is_err());
        assert!(Cursor::new(b",", 0).any().is_err());
        assert!(Cursor::new(b"", 5).any().is_err());
    }

    #[test]
    fn printable_and_whole() {
        assert!(is_printable(
            b"rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
        ));
        assert!(!is_printable(b"a,b"));
        assert!(!is_printable(b"a b"));
        assert!(!is_printable(b"\x7f"));
        assert!(check_whole(b"").is_err());
        assert!(check_whole(b"a\0b").is_err());
        assert!(check_whole(b"ab").is_ok());
    }
}
