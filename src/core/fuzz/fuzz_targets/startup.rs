//! Startup-phase packets (`parse_startup`) and the `options` parameter
//! (`parse_options`) on arbitrary bytes, with the invariants the pooler
//! relies on:
//! * a parsed packet consumed between 8 and 4 + MAX_STARTUP_PACKET bytes,
//!   all of them present in the input;
//! * every strict prefix of a parsed packet asks for more bytes (`Ok(None)`);
//! * re-parsing exactly the consumed bytes gives the same packet;
//! * a StartupMessage has non-empty-named parameters, unique but for
//!   `replication` (kept occurrence by occurrence, as the server folds it),
//!   and a user, and rebuilding it with `build::startup_message` re-parses
//!   to the same list;
//! * `parse_options` maps `-` to `_` in every name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nextgres_core::proto::{self, StartupRequest, MAX_STARTUP_PACKET};

fn check_options(s: &str) {
    if let Ok(pairs) = proto::parse_options(s) {
        for (name, _) in &pairs {
            assert!(!name.contains('-'), "dash left in option name {name:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The options parser on the input taken as text.
    check_options(&String::from_utf8_lossy(data));

    let Ok(Some((req, used))) = proto::parse_startup(data) else {
        return;
    };
    assert!(used >= 8 && used <= 4 + MAX_STARTUP_PACKET && used <= data.len());
    assert_eq!(
        i32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize,
        used
    );
    for cut in [0, 3, 4, 7, used / 2, used - 1] {
        if cut < used {
            assert_eq!(proto::parse_startup(&data[..cut]), Ok(None), "prefix {cut}");
        }
    }
    assert_eq!(
        proto::parse_startup(&data[..used]),
        Ok(Some((req.clone(), used)))
    );

    if let StartupRequest::Startup { major, params, .. } = &req {
        assert_eq!(*major, 3);
        assert!(params.iter().any(|(k, v)| k == "user" && !v.is_empty()));
        for (i, (k, v)) in params.iter().enumerate() {
            assert!(!k.is_empty() && !k.contains('\0') && !v.contains('\0'));
            assert!(k == "replication" || params[..i].iter().all(|(k2, _)| k2 != k), "duplicate {k:?}");
        }
        if let Some(options) = req.param("options") {
            check_options(options);
        }
        // Rebuilt with the pooler's own builder, it parses back the same
        // (unless a cleaned application_name, up to 4 bytes per byte that
        // was not UTF-8, made it longer than a packet may be).
        let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut out = Vec::new();
        proto::startup_message(&mut out, &pairs);
        if out.len() > 4 + MAX_STARTUP_PACKET {
            return;
        }
        match proto::parse_startup(&out) {
            Ok(Some((StartupRequest::Startup { params: again, minor: 0, .. }, n))) => {
                assert_eq!(n, out.len());
                assert_eq!(&again, params);
            }
            other => panic!("rebuilt startup packet did not parse back: {other:?}"),
        }
    }
});
