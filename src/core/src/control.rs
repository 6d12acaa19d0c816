//! The control channel between the pooler and a pooled backend: the backend's
//! original Unix-socket connection to the pooler, reused after login.
//!
//! Messages are framed like protocol messages (tag, int32 length including
//! itself) so the pooler's one reader also handles the ErrorResponse a parked
//! backend may send when it is terminated. Tags are bytes the server never sends.
//!
//! pooler -> backend  `ATTACH`, with the client socket attached (SCM_RIGHTS):
//!     u64 client id, u8 flags, u16 address length, address bytes
//!     (a `sockaddr_storage` prefix), u16 setting count, (name\0 value\0)*
//! backend -> pooler  `RELEASED`: u64 client id. Sent after the backend has
//!     flushed ReadyForQuery(I) to the client and put its control socket back
//!     in place of the client's.
#![allow(missing_docs)] // field-level docs would only repeat the module docs
use crate::proto::error::ProtoError;
use crate::proto::frame::read_cstr;

pub const ATTACH: u8 = b'!';
pub const RELEASED: u8 = b'~';

/// Discard the previous client's session before this client runs.
pub const FLAG_NEW_CLIENT: u8 = 1;

pub const MAX_ADDR: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub client_id: u64,
    pub flags: u8,
    pub addr: Vec<u8>,
    pub settings: Vec<(String, String)>,
}

fn frame(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

pub fn write_attach(out: &mut Vec<u8>, a: &Attach) {
    frame(out, ATTACH, |o| {
        o.extend_from_slice(&a.client_id.to_be_bytes());
        o.push(a.flags);
        let addr = &a.addr[..a.addr.len().min(MAX_ADDR)];
        o.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        o.extend_from_slice(addr);
        o.extend_from_slice(&(a.settings.len() as u16).to_be_bytes());
        for (n, v) in &a.settings {
            o.extend_from_slice(n.as_bytes());
            o.push(0);
            o.extend_from_slice(v.as_bytes());
            o.push(0);
        }
    });
}

pub fn write_released(out: &mut Vec<u8>, client_id: u64) {
    frame(out, RELEASED, |o| o.extend_from_slice(&client_id.to_be_bytes()));
}

fn bad(what: &str) -> ProtoError {
    ProtoError::violation(format!("malformed nextgres control message: {what}"))
}

fn take<'a>(body: &'a [u8], off: &mut usize, n: usize) -> Result<&'a [u8], ProtoError> {
    let end = off.checked_add(n).filter(|&e| e <= body.len()).ok_or_else(|| bad("truncated"))?;
    let s = &body[*off..end];
    *off = end;
    Ok(s)
}

/// Parses the body (after tag and length) of an ATTACH message.
pub fn parse_attach(body: &[u8]) -> Result<Attach, ProtoError> {
    let mut off = 0;
    let client_id = u64::from_be_bytes(take(body, &mut off, 8)?.try_into().unwrap_or_default());
    let flags = take(body, &mut off, 1)?[0];
    let alen = u16::from_be_bytes([take(body, &mut off, 1)?[0], take(body, &mut off, 1)?[0]]) as usize;
    if alen > MAX_ADDR {
        return Err(bad("address too long"));
    }
    let addr = take(body, &mut off, alen)?.to_vec();
    let n = u16::from_be_bytes([take(body, &mut off, 1)?[0], take(body, &mut off, 1)?[0]]) as usize;
    let mut settings = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let (name, next) = read_cstr(body, off)?;
        let (value, next) = read_cstr(body, next)?;
        settings.push((name.to_string(), value.to_string()));
        off = next;
    }
    if off != body.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(Attach { client_id, flags, addr, settings })
}

pub fn parse_released(body: &[u8]) -> Result<u64, ProtoError> {
    let b: [u8; 8] = body.try_into().map_err(|_| bad("RELEASED length"))?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::parse_message;

    #[test]
    fn attach_round_trip() {
        let a = Attach {
            client_id: 42,
            flags: FLAG_NEW_CLIENT,
            addr: vec![2, 0, 1, 2, 127, 0, 0, 1],
            settings: vec![("application_name".into(), "app".into()), ("TimeZone".into(), "UTC".into())],
        };
        let mut out = Vec::new();
        write_attach(&mut out, &a);
        let (m, used) = parse_message(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(used, out.len());
        assert_eq!(m.tag, ATTACH);
        assert_eq!(parse_attach(m.body).unwrap(), a);
    }

    #[test]
    fn released_round_trip() {
        let mut out = Vec::new();
        write_released(&mut out, u64::MAX - 1);
        let (m, _) = parse_message(&out, 64).unwrap().unwrap();
        assert_eq!(m.tag, RELEASED);
        assert_eq!(parse_released(m.body).unwrap(), u64::MAX - 1);
    }

    #[test]
    fn truncated_attach_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        write_attach(&mut out, &Attach { client_id: 1, flags: 0, addr: vec![1; 16], settings: vec![("a".into(), "b".into())] });
        let body = &out[5..];
        for cut in 0..body.len() {
            assert!(parse_attach(&body[..cut]).is_err(), "cut at {cut}");
        }
        assert!(parse_released(&[1, 2, 3]).is_err());
    }
}
