//! Writes the seed corpora under `seeds/<target>/` from the crate's own
//! builders, so each target starts from valid messages:
//!
//!     cargo run --example gen_seeds      # in src/core/fuzz
//!
//! The files are committed; rerun this after a message format changes.
use nextgres_core::auth::{
    build_scram_secret, client_key_from_password, parse_stored_secret, ClientCredential,
    ScramClient, ScramServer, StoredSecret,
};
use nextgres_core::control::{self, Attach, Released, SessionImage, Statement, TlsStatus};
use nextgres_core::proto::{self, ErrorFields};
use std::fs;
use std::path::Path;

const SECRET: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(name), data).unwrap();
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn startup() {
    let mut b = Vec::new();
    proto::startup_message(&mut b, &[("user", "alice"), ("database", "db"), ("application_name", "psql")]);
    write("startup", "startup", &b);
    let mut b = Vec::new();
    proto::startup_message(
        &mut b,
        &[("user", "bob"), ("options", r"-c search_path=a\ b --work-mem=1MB -cgeqo=off"), ("client_encoding", "UTF8")],
    );
    write("startup", "startup_options", &b);
    // Protocol 3.2 with a _pq_ option.
    let mut b = Vec::new();
    proto::startup_message(&mut b, &[("user", "u"), ("_pq_.x", "1")]);
    b[6..8].copy_from_slice(&2u16.to_be_bytes());
    write("startup", "startup_3_2", &b);
    for (name, code) in [("ssl", proto::SSL_REQUEST_CODE), ("gssenc", proto::GSSENC_REQUEST_CODE)] {
        write("startup", name, &cat(&[&8i32.to_be_bytes(), &code.to_be_bytes()]));
    }
    write(
        "startup",
        "cancel",
        &cat(&[&16i32.to_be_bytes(), &proto::CANCEL_REQUEST_CODE.to_be_bytes(), &1234i32.to_be_bytes(), &(-5i32).to_be_bytes()]),
    );
    write("startup", "options_text", b"-c a=b --c-d=e -c x=\\ y -- z");
}

fn frame() {
    let mut auth = Vec::new();
    proto::auth_ok(&mut auth);
    proto::auth_cleartext(&mut auth);
    proto::auth_md5(&mut auth, [1, 2, 3, 4]);
    proto::auth_sasl(&mut auth, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]);
    proto::auth_sasl_continue(&mut auth, b"r=abc,s=c2FsdA==,i=4096");
    proto::auth_sasl_final(&mut auth, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    write("frame", "auth", &cat(&[&[5, 4], &auth]));

    let mut login = Vec::new();
    proto::parameter_status(&mut login, "server_version", "16.4");
    proto::parameter_status(&mut login, "TimeZone", "UTC");
    proto::backend_key_data(&mut login, 4242, -17);
    proto::negotiate_protocol_version(&mut login, 0, &["_pq_.x", "_pq_.y"]);
    proto::ready_for_query(&mut login, b'I');
    write("frame", "login", &cat(&[&[5, 0], &login]));

    let mut err = Vec::new();
    proto::error_response(
        &mut err,
        &ErrorFields {
            severity: "FATAL".into(),
            sqlstate: "28P01".into(),
            message: "password authentication failed".into(),
            detail: Some("d".into()),
            hint: Some("h".into()),
        },
    );
    proto::notice_response(&mut err, &ErrorFields { severity: "NOTICE".into(), ..Default::default() });
    write("frame", "error", &cat(&[&[6, 1], &err]));

    let mut front = Vec::new();
    proto::sasl_initial_response(&mut front, "SCRAM-SHA-256", b"n,,n=,r=abc");
    proto::password_message(&mut front, "secret");
    proto::query(&mut front, "select 1");
    proto::sasl_response(&mut front, b"c=biws,r=abc,p=xyz");
    proto::terminate(&mut front);
    write("frame", "frontend", &cat(&[&[4, 0], &front]));
    // A bare SASLInitialResponse body (mechanism, -1 length) for the raw pass.
    write("frame", "sasl_initial_raw", &cat(&[&[5, 0], b"SCRAM-SHA-256\0", &(-1i32).to_be_bytes()]));
}

fn scram() {
    let StoredSecret::Scram(secret) = parse_stored_secret(SECRET) else { unreachable!() };
    let key = client_key_from_password(&secret, "pencil").unwrap();
    let mut server = ScramServer::with_nonce_str(secret.clone(), "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").unwrap();
    let mut client = ScramClient::with_nonce_str(
        ClientCredential::ClientKey { client_key: key, server_key: secret.server_key },
        "rOprNGfwEbeRWgbNEkqO",
    )
        .unwrap()
        .with_username("user");
    let cfirst = client.client_first();
    let sfirst = server.client_first(&cfirst).unwrap();
    let cfinal = client.server_first(&sfirst).unwrap();
    let (sfinal, _) = server.client_final(&cfinal).unwrap();

    write("scram", "0_server_exchange", &cat(&[&[0], &cfirst, &[0], &cfinal]));
    write("scram", "0_server_y_flag", &cat(&[&[0], b"y,,n=,r=abc,x=ext", &[0], b"c=eSws,r=abc,x=1,p=AAAA"]));
    // Mode byte 0x30: the client on TLS (binding data [0x30; 32]) selecting
    // SCRAM-SHA-256-PLUS; 0x10: on TLS with plain SCRAM (flag y refused).
    write("scram", "0_server_plus", &cat(&[&[0x30], b"p=tls-server-end-point,,n=,r=abc", &[0], b"c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDA=,r=abc,p=AAAA"]));
    write("scram", "0_server_tls_y_flag", &cat(&[&[0x10], b"y,,n=,r=abc", &[0], b"c=eSws,r=abc,p=AAAA"]));
    write("scram", "1_server_final", &cat(&[&[1], &cfinal]));
    write("scram", "2_server_final_edits", &[2, 0, 60, b'X', 3, 80, 0]);
    write("scram", "3_client_exchange", &cat(&[&[3], &sfirst, &[0], &sfinal]));
    write("scram", "4_client_error", &cat(&[&[4], &sfirst, &[0], b"e=invalid-proof"]));
    write("scram", "5_client_edits", &[5, 1, 10, b'A', 0, 2, 3, 0]);
    write("scram", "6_secret_scram", &cat(&[&[6], SECRET.as_bytes()]));
    write("scram", "6_secret_scram_low", &cat(&[&[6], build_scram_secret("pw", b"salt", 1).as_bytes()]));
    write("scram", "6_secret_md5", b"\x06md5d41d8cd98f00b204e9800998ecf8427e");
    write("scram", "6_secret_plain", b"\x06hunter2");
    write("scram", "7_password", b"\x07postgres\0pencil");
    write("scram", "7_password_prep", "\x07u\0pen\u{ad}cil\u{a0}".as_bytes());
}

fn control() {
    let image = SessionImage {
        settings: vec![("search_path".into(), "a, b".into()), ("myapp.user".into(), "42".into())],
        statements: vec![
            Statement { name: "P_0".into(), text: "SELECT $1::int".into(), from_sql: false, backslash_escapes: false, whole_query: false, param_types: vec![23], result: vec![], analysis: vec![(b"TimeZone".to_vec(), b"UTC".to_vec())], invalidated: false },
            Statement { name: "q".into(), text: "PREPARE q AS SELECT 1".into(), from_sql: true, backslash_escapes: false, whole_query: true, param_types: vec![], result: vec![], analysis: vec![], invalidated: true },
        ]
        .into(),
        defaults: vec![],
        told: control::Told::from_pairs(&[("DateStyle", "ISO, MDY"), ("application_name", "app")]),
    };
    let a = Attach {
        client_id: 42,
        flags: control::FLAG_NEW_CLIENT,
        pool_row: 3,
        key_pid: 123_456_789,
        addr: vec![2, 0, 1, 2, 127, 0, 0, 1],
        local: vec![2, 0, 0x15, 0x38, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        settings: vec![("application_name".into(), "app".into()), ("TimeZone".into(), "UTC".into())],
        image: image.clone(),
        authn: Some(control::Authn { method: control::AUTHN_SCRAM, id: b"app".to_vec() }),
        tls: None,
        ahead: None,
    };
    let mut att = Vec::new();
    control::write_attach(&mut att, &a);
    write("control", "0_attach", &cat(&[&[0], &att[5..]]));
    let t = Attach {
        tls: Some(TlsStatus {
            bits: 256,
            version: "TLSv1.3".into(),
            cipher: "TLS_AES_256_GCM_SHA384".into(),
            client_dn: "/CN=alice".into(),
            client_serial: "4660".into(),
            issuer_dn: "/CN=nextgres test CA".into(),
        }),
        ..a.clone()
    };
    let mut att_tls = Vec::new();
    control::write_attach(&mut att_tls, &t);
    write("control", "0_attach_tls", &cat(&[&[0], &att_tls[5..]]));
    let r = Released { client_id: 7, queries: 1, query_us: 1500, bytes_sent: 120, settings: Some(image.settings.clone()), statements: Some(image.statements.clone()), defaults: None, told: Some(image.told) };
    let mut rel = Vec::new();
    control::write_released(&mut rel, &r);
    write("control", "1_released", &cat(&[&[1], &rel[5..]]));
    let mut stream = att.clone();
    control::write_release_request(&mut stream);
    control::write_released(&mut stream, &Released { client_id: 8, queries: 0, query_us: 0, bytes_sent: 0, settings: None, statements: None, defaults: None, told: None });
    stream.extend_from_slice(&rel);
    proto::error_response(&mut stream, &ErrorFields { severity: "FATAL".into(), ..Default::default() });
    write("control", "2_stream", &cat(&[&[2], &stream]));
    write("control", "3_generated", &cat(&[&[3], &(0..=255u8).collect::<Vec<_>>()]));
}

fn main() {
    startup();
    frame();
    scram();
    control();
}
