//! Hostile-input tests: every truncation, mutation and random string fed to
//! both sides of the exchange must give a result, never a panic.

use super::*;
use crate::auth::{client_key_from_password, parse_stored_secret, StoredSecret};

const PW: &str = "pencil";

fn secret() -> crate::auth::ScramSecret {
    match parse_stored_secret(&build_scram_secret(PW, b"fixed-salt-16byt", 16)) {
        StoredSecret::Scram(s) => s,
        other => panic!("{other:?}"),
    }
}

/// Small deterministic xorshift so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, alphabet: &[u8], max: usize) -> Vec<u8> {
        let n = (self.next() % (max as u64 + 1)) as usize;
        (0..n)
            .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
            .collect()
    }
}

/// Valid transcript of one exchange: (client-first, server-first, client-final, server-final).
fn transcript() -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut server = ScramServer::new(secret(), &[1; 18]);
    let mut client = ScramClient::new(ClientCredential::Password(PW.into()), &[2; 18]);
    let cf = client.client_first();
    let sf = server.client_first(&cf).unwrap();
    let cfin = client.server_first(&sf).unwrap();
    let (sfin, _) = server.client_final(&cfin).unwrap();
    client.server_final(&sfin).unwrap();
    (cf, sf, cfin, sfin)
}

/// Truncations, single-byte mutations and random strings derived from `valid`.
fn variants(valid: &[u8], rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = (0..=valid.len()).map(|i| valid[..i].to_vec()).collect();
    let interesting = b",=nrcpvesiyma\0\xff \x7f+/";
    for i in 0..valid.len() {
        for &b in interesting {
            let mut m = valid.to_vec();
            m[i] = b;
            out.push(m);
        }
    }
    let alphabet: Vec<u8> = b"nrcpvesiyma,=biws0123456789+/ABCxyz\0\xff".to_vec();
    for _ in 0..300 {
        out.push(rng.bytes(&alphabet, 60));
        let all: Vec<u8> = (0..=255).collect();
        out.push(rng.bytes(&all, 40));
    }
    out
}

#[test]
fn server_never_panics() {
    let (cf, _, cfin, _) = transcript();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for v in variants(&cf, &mut rng) {
        let _ = ScramServer::new(secret(), &[1; 18]).client_first(&v);
        let _ = ScramServer::new_mock_keyed("u", b"k", 1, &[1; 18]).client_first(&v);
    }
    for v in variants(&cfin, &mut rng) {
        let mut s = ScramServer::new(secret(), &[1; 18]);
        s.client_first(&cf).unwrap();
        if let Ok((_, key)) = s.client_final(&v) {
            // Only the genuine proof may succeed (a trailing comma is tolerated, as by the server).
            assert_eq!(Some(key), client_key_from_password(&secret(), PW));
        }
    }
}

#[test]
fn client_never_panics() {
    let (_, sf, _, sfin) = transcript();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for v in variants(&sf, &mut rng) {
        let mut c = ScramClient::new(
            ClientCredential::ClientKey {
                client_key: [3; 32],
                server_key: [4; 32],
            },
            &[2; 18],
        );
        c.client_first();
        let _ = c.server_first(&v);
    }
    for v in variants(&sfin, &mut rng) {
        let mut c = ScramClient::new(ClientCredential::Password(PW.into()), &[2; 18]);
        c.client_first();
        c.server_first(&sf).unwrap();
        let _ = c.server_final(&v);
    }
}

#[test]
fn empty_nonces_do_not_panic() {
    let mut s = ScramServer::new(secret(), &[]);
    let mut c = ScramClient::new(ClientCredential::Password(PW.into()), &[]);
    let _ = s
        .client_first(&c.client_first())
        .and_then(|sf| c.server_first(&sf));
}
