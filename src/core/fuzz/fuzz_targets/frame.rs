//! Message framing and the backend/frontend message bodies the pooler
//! parses, on arbitrary bytes.
//!
//! Input: one byte choosing `max_len` for `parse_message`, one byte for the
//! `read_cstr` offset, then the stream. The stream is split into messages
//! the way the pooler reads a socket buffer, and every body parser runs on
//! every message body and on the raw stream. Properties:
//! * framing consumes exactly `1 + length` bytes, never more than given,
//!   never a length above `max_len`, and always makes progress;
//! * every strict prefix of a framed message asks for more bytes;
//! * whatever a body parser accepts, the matching `proto::build` builder
//!   writes back in a form that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nextgres_core::proto::{self, AuthRequest};

const MAX_LENS: [usize; 8] = [0, 4, 5, 8, 64, 16384, 1 << 30, usize::MAX];

/// Parses `buf` as exactly one message and returns its body.
fn single(buf: &[u8], tag: u8) -> &[u8] {
    let (m, used) = proto::parse_message(buf, usize::MAX)
        .expect("builder output frames")
        .expect("builder output is complete");
    assert_eq!(used, buf.len());
    assert_eq!(m.tag, tag);
    m.body
}

fn bodies(body: &[u8], off: usize) {
    if let Ok((s, next)) = proto::read_cstr(body, off) {
        assert!(next > off && next <= body.len());
        assert_eq!(body[next - 1], 0);
        assert_eq!(s.len(), next - off - 1);
    }

    match proto::parse_auth_request(body) {
        Ok(req) => {
            let mut out = Vec::new();
            match &req {
                AuthRequest::Ok => proto::auth_ok(&mut out),
                AuthRequest::Cleartext => proto::auth_cleartext(&mut out),
                AuthRequest::Md5 { salt } => proto::auth_md5(&mut out, *salt),
                AuthRequest::Sasl { mechanisms } => proto::auth_sasl(&mut out, mechanisms),
                AuthRequest::SaslContinue(d) => proto::auth_sasl_continue(&mut out, d),
                AuthRequest::SaslFinal(d) => proto::auth_sasl_final(&mut out, d),
                AuthRequest::Other(_) => {}
            }
            if !out.is_empty() {
                let again = single(&out, b'R');
                assert_eq!(again, body, "auth request rebuilt differently");
                assert_eq!(proto::parse_auth_request(again).as_ref(), Ok(&req));
            }
        }
        Err(e) => assert_eq!(e.sqlstate, "08P01"),
    }

    if let Ok((name, value)) = proto::parse_parameter_status(body) {
        let mut out = Vec::new();
        proto::parameter_status(&mut out, name, value);
        assert_eq!(single(&out, b'S'), body);
    }

    if let Ok((pid, key)) = proto::parse_backend_key_data(body) {
        let mut out = Vec::new();
        proto::backend_key_data(&mut out, pid, key);
        assert_eq!(single(&out, b'K'), body);
    }

    if let Ok(pid) = proto::backend_key_data_pid(body) {
        // Protocol 3.0 or 3.2: the same pid and key rebuild the body.
        let mut out = Vec::new();
        proto::backend_key_data_bytes(&mut out, pid, &body[4..]);
        assert_eq!(single(&out, b'K'), body);
    }

    if let Ok((mech, Some(data))) = proto::parse_sasl_initial_response(body) {
        let mut out = Vec::new();
        proto::sasl_initial_response(&mut out, mech, data);
        let again = single(&out, b'p');
        assert_eq!(proto::parse_sasl_initial_response(again), Ok((mech, Some(data))));
    }

    if let Ok(status) = proto::parse_ready_for_query(body) {
        let mut out = Vec::new();
        proto::ready_for_query(&mut out, status);
        assert_eq!(single(&out, b'Z'), body);
    }

    if let Ok((minor, opts)) = proto::parse_negotiate_protocol_version(body) {
        assert!(opts.len() <= body.len());
        let mut out = Vec::new();
        proto::negotiate_protocol_version(&mut out, minor, &opts);
        assert_eq!(single(&out, b'v'), body);
    }

    if let Ok(fields) = proto::parse_error_fields(body) {
        let mut out = Vec::new();
        proto::error_response(&mut out, &fields);
        let again = proto::parse_error_fields(single(&out, b'E'));
        assert_eq!(again.as_ref(), Ok(&fields), "error fields rebuilt differently");
    }
}

fuzz_target!(|data: &[u8]| {
    let [sel, off, stream @ ..] = data else {
        return;
    };
    let max_len = MAX_LENS[usize::from(sel & 7)];
    let off = usize::from(*off);

    // The raw stream as one body, so the body parsers see arbitrary bytes
    // and not only what framing let through.
    bodies(stream, off);

    // A query cycle (a cancelled waiting query's messages) ends on a whole
    // message within the stream, at a Query, FunctionCall or Sync, and is
    // stable under more input after it.
    if let Some(n) = proto::frame::query_cycle_len(stream) {
        assert!(n >= 5 && n <= stream.len());
        assert_eq!(proto::frame::query_cycle_len(&stream[..n]), Some(n));
    }

    let mut rest = stream;
    loop {
        match proto::parse_message(rest, max_len) {
            Ok(Some((m, used))) => {
                assert!(used >= 5 && used <= rest.len());
                assert_eq!(used, m.body.len() + 5);
                assert!(m.body.len() + 4 <= max_len);
                assert_eq!(m.tag, rest[0]);
                for cut in [0, 1, 4, used - 1] {
                    if cut < used {
                        assert_eq!(proto::parse_message(&rest[..cut], max_len), Ok(None));
                    }
                }
                bodies(m.body, off);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                assert_eq!(e.sqlstate, "08P01");
                break;
            }
        }
    }
});
