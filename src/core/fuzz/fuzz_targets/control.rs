//! The pooler <-> backend control channel (`control::parse_attach`,
//! `control::parse_released`, and the other messages' parsers).
//!
//! The first input byte picks a mode, the rest is its input:
//! * 0: ATTACH body, 1: RELEASED body, 2: a framed stream dispatched by tag,
//!   all on arbitrary bytes; whatever parses is written back with
//!   `write_*`, must frame as one message and parse to an equal value, and
//!   writing that again gives the same bytes;
//! * 3: a value generated from the input (`arbitrary`), written and parsed
//!   back equal: the writer and the parser agree on every value the pooler
//!   can produce (strings without NUL, addresses up to MAX_ADDR bytes).
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use nextgres_core::control::{self, Attach, Released, SessionImage, Statement, StatementList, TlsStatus, MAX_ADDR};
use nextgres_core::proto;

fn framed(out: &[u8], tag: u8) -> &[u8] {
    let (m, used) = proto::parse_message(out, usize::MAX)
        .expect("control message frames")
        .expect("control message is complete");
    assert_eq!(used, out.len());
    assert_eq!(m.tag, tag);
    m.body
}

fn attach_round_trip(a: &Attach) {
    let mut out = Vec::new();
    control::write_attach(&mut out, a);
    let again = control::parse_attach(framed(&out, control::ATTACH)).expect("written ATTACH parses");
    assert_eq!(&again, a);
    let mut out2 = Vec::new();
    control::write_attach(&mut out2, &again);
    assert_eq!(out, out2);
}

fn released_round_trip(r: &Released) {
    let mut out = Vec::new();
    control::write_released(&mut out, r);
    let again =
        control::parse_released(framed(&out, control::RELEASED)).expect("written RELEASED parses");
    assert_eq!(&again, r);
    let mut out2 = Vec::new();
    control::write_released(&mut out2, &again);
    assert_eq!(out, out2);
}

/// The in-place accessors agree with `iter()` on every parsed list, and
/// decoding every entry and writing it again gives the same list.
fn list_agrees(list: &StatementList) {
    let all: Vec<_> = list.iter_offsets().collect();
    assert_eq!(all.len(), list.len());
    assert!(list.iter().eq(all.iter().map(|(_, r)| *r)));
    let names: Vec<(usize, &[u8])> = list.names().collect();
    let want: Vec<(usize, &[u8])> = all.iter().map(|(o, r)| (*o, r.name)).collect();
    assert_eq!(names, want);
    for (off, r) in &all {
        assert_eq!(list.at(*off), Some(*r));
        assert!(list.name_is(*off, r.name));
    }
    assert_eq!(&StatementList::from(list.to_statements()), list);
}

fn attach(body: &[u8]) {
    if let Ok(a) = control::parse_attach(body) {
        assert!(a.addr.len() <= MAX_ADDR);
        list_agrees(&a.image.statements);
        attach_round_trip(&a);
    }
}

fn released(body: &[u8]) {
    if let Ok(r) = control::parse_released(body) {
        if let Some(l) = &r.statements {
            list_agrees(l);
        }
        released_round_trip(&r);
    }
}

/// A string as the pooler has them: from C strings or NUL-split packets.
fn text(u: &mut Unstructured) -> arbitrary::Result<String> {
    let s = String::arbitrary(u)?;
    Ok(s.replace('\0', ""))
}

fn pairs(u: &mut Unstructured) -> arbitrary::Result<Vec<(String, String)>> {
    let n = u.int_in_range(0..=8)?;
    (0..n).map(|_| Ok((text(u)?, text(u)?))).collect()
}

fn told(u: &mut Unstructured) -> arbitrary::Result<control::Told> {
    let mut t = control::Told::default();
    for h in t.0.iter_mut() {
        *h = u32::arbitrary(u)?;
    }
    Ok(t)
}

fn statements(u: &mut Unstructured) -> arbitrary::Result<Vec<Statement>> {
    let n = u.int_in_range(0..=6)?;
    (0..n)
        .map(|_| {
            let from_sql = bool::arbitrary(u)?;
            let invalidated = bool::arbitrary(u)?;
            Ok(Statement {
                // Names and texts are bytes in the database encoding.
                name: Vec::<u8>::arbitrary(u)?.into_iter().filter(|&b| b != 0).collect(),
                text: Vec::<u8>::arbitrary(u)?.into_iter().filter(|&b| b != 0).collect(),
                from_sql,
                backslash_escapes: bool::arbitrary(u)?,
                // Written only with from_sql (flag 4).
                whole_query: from_sql && bool::arbitrary(u)?,
                param_types: Vec::<u32>::arbitrary(u)?,
                result: Vec::<u8>::arbitrary(u)?,
                // Written only without flag 16 (invalidated).
                analysis: (0..if invalidated { 0 } else { u.int_in_range(0..=3)? })
                    .map(|_| {
                        let nul_free = |u: &mut Unstructured| -> arbitrary::Result<Vec<u8>> { Ok(Vec::<u8>::arbitrary(u)?.into_iter().filter(|&b| b != 0).collect()) };
                        Ok((nul_free(u)?, nul_free(u)?))
                    })
                    .collect::<arbitrary::Result<_>>()?,
                invalidated,
            })
        })
        .collect()
}

fn generated(data: &[u8]) -> arbitrary::Result<()> {
    let mut u = Unstructured::new(data);
    if bool::arbitrary(&mut u)? {
        let alen = u.int_in_range(0..=MAX_ADDR)?;
        let a = Attach {
            client_id: u64::arbitrary(&mut u)?,
            // FLAG_TLS and FLAG_AHEAD are written from `tls` and `ahead`,
            // never kept in `flags`.
            flags: u8::arbitrary(&mut u)? & !(control::FLAG_TLS | control::FLAG_AHEAD),
            pool_row: u32::arbitrary(&mut u)?,
            key_pid: i32::arbitrary(&mut u)?,
            addr: u.bytes(alen)?.to_vec(),
            local: {
                let n = u.int_in_range(0..=MAX_ADDR)?;
                u.bytes(n)?.to_vec()
            },
            settings: pairs(&mut u)?,
            image: SessionImage { settings: pairs(&mut u)?, statements: statements(&mut u)?.into(), defaults: pairs(&mut u)?, told: told(&mut u)? },
            // Method 0 is written as none, and an id is cut at a NUL: only
            // what comes back unchanged.
            authn: if bool::arbitrary(&mut u)? {
                let method = u.int_in_range(1..=u8::MAX)?;
                let n = u.int_in_range(0..=64)?;
                Some(control::Authn { method, id: u.bytes(n)?.iter().copied().filter(|&b| b != 0).collect() })
            } else {
                None
            },
            tls: if bool::arbitrary(&mut u)? {
                Some(TlsStatus {
                    bits: i32::arbitrary(&mut u)?,
                    version: text(&mut u)?,
                    cipher: text(&mut u)?,
                    client_dn: text(&mut u)?,
                    client_serial: text(&mut u)?,
                    issuer_dn: text(&mut u)?,
                })
            } else {
                None
            },
            ahead: if bool::arbitrary(&mut u)? {
                Some(control::Ahead { ticket: u64::arbitrary(&mut u)?.max(1), backend_row: u32::arbitrary(&mut u)? })
            } else {
                None
            },
        };
        attach_round_trip(&a);
    } else {
        let client_id = u64::arbitrary(&mut u)?;
        let settings = if bool::arbitrary(&mut u)? { Some(pairs(&mut u)?) } else { None };
        let statements = if bool::arbitrary(&mut u)? { Some(statements(&mut u)?.into()) } else { None };
        let defaults = if bool::arbitrary(&mut u)? { Some(pairs(&mut u)?) } else { None };
        let told = if bool::arbitrary(&mut u)? { Some(told(&mut u)?) } else { None };
        let (queries, query_us, bytes_sent) = (u64::arbitrary(&mut u)?, u64::arbitrary(&mut u)?, u64::arbitrary(&mut u)?);
        released_round_trip(&Released { client_id, queries, query_us, bytes_sent, settings, statements, defaults, told });
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => attach(rest),
        1 => released(rest),
        2 => {
            let mut buf = rest;
            while let Ok(Some((m, used))) = proto::parse_message(buf, 1 << 20) {
                match m.tag {
                    control::ATTACH => attach(m.body),
                    control::RELEASED => released(m.body),
                    control::PINNED => {
                        if let Ok(v) = control::parse_pinned(m.body) {
                            let mut out = Vec::new();
                            control::write_pinned(&mut out, v);
                            assert_eq!(control::parse_pinned(framed(&out, control::PINNED)).ok(), Some(v));
                        }
                    }
                    control::RING_MARK => {
                        if let Ok(v) = control::parse_ring_mark(m.body) {
                            let mut out = Vec::new();
                            control::write_ring_mark(&mut out, v);
                            assert_eq!(control::parse_ring_mark(framed(&out, control::RING_MARK)).ok(), Some(v));
                        }
                    }
                    // The kernel queue's messages.
                    control::KQ_RETURNED => {
                        if let Ok((row, id, flags)) = control::parse_kq_returned(m.body) {
                            let mut out = Vec::new();
                            control::write_kq_returned(&mut out, row, id, flags);
                            assert_eq!(control::parse_kq_returned(framed(&out, control::KQ_RETURNED)).ok(), Some((row, id, flags)));
                        }
                    }
                    control::KQ_LEND => {
                        if let Ok(v) = control::parse_kq_lend(m.body) {
                            let mut out = Vec::new();
                            control::write_kq_lend(&mut out, v);
                            assert_eq!(control::parse_kq_lend(framed(&out, control::KQ_LEND)).ok(), Some(v));
                        }
                    }
                    control::RELEASE_REQUEST => {
                        let mut out = Vec::new();
                        control::write_release_request(&mut out);
                        assert!(framed(&out, control::RELEASE_REQUEST).is_empty());
                    }
                    _ => {
                        let _ = proto::parse_error_fields(m.body);
                    }
                }
                buf = &buf[used..];
            }
        }
        _ => {
            let _ = generated(rest);
        }
    }
});
