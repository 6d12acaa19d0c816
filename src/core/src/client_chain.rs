//! Client certificate chains the server's OpenSSL accepts and webpki (the
//! pooler's rustls verifier) refuses for their end certificate alone:
//!
//! * X.509 **v1** end certificates (webpki: UnsupportedCertVersion). They
//!   are what `openssl x509 -req -CA ...` without `-extfile` makes with
//!   OpenSSL 3.0 and older, the PostgreSQL documentation's own recipe
//!   (ssl-tcp "Creating Certificates"), so many deployed client certificates
//!   are v1.
//! * end certificates with `basicConstraints` CA:TRUE (webpki:
//!   CaUsedAsEndEntity; OpenSSL's `ssl_client` purpose does not mind).
//!
//! For these, [`verify`] builds and checks the chain as x509_vfy.c does for
//! what such chains use, with the same signature algorithms rustls accepts
//! elsewhere (passed in, so this crate needs no crypto): issuers found by
//! name (trusted anchors first, then the intermediates offered), each
//! signature verified, every certificate valid at `now`, intermediates CA
//! certificates (basicConstraints CA:TRUE, keyCertSign when keyUsage is
//! present, pathLenConstraint kept), an end certificate's
//! extendedKeyUsage, when present, allowing clientAuth, and with CRLs (the
//! server's `X509_V_FLAG_CRL_CHECK_ALL`) for each certificate below the
//! anchor its issuer's CRLs: at least one current, none listing it. Anchors
//! are trusted as they are (their own signature unchecked, as OpenSSL
//! without X509_V_FLAG_CHECK_SS_SIGNATURE). keyUsage and nsCertType of the
//! end certificate are [`crate::cert::client_key_usage_ok`]'s, checked by
//! the caller for every chain.
use rustls_pki_types::SignatureVerificationAlgorithm;
use x509_parser::asn1_rs::{Any, FromDer};
use x509_parser::prelude::*;

/// Why a chain fails, named as rustls' `CertificateError` (the caller maps
/// them one to one, so the TLS alert is the one webpki's failure of a v3
/// chain in the same state sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A certificate or CRL does not parse.
    BadEncoding,
    /// No issuer of that name among anchors and intermediates, a chain
    /// longer than [`MAX_DEPTH`], or an issuer that may not issue.
    UnknownIssuer,
    /// An issuer of that name whose key did not sign the certificate (or
    /// a signature algorithm rustls does not accept, e.g. SHA-1).
    BadSignature,
    /// A certificate of the chain expired.
    Expired,
    /// A certificate of the chain is not valid yet.
    NotValidYet,
    /// The end certificate's extendedKeyUsage has no clientAuth.
    InvalidPurpose,
    /// Listed in its issuer's CRL.
    Revoked,
    /// CRLs are checked and an issuer has none (signed by it).
    UnknownRevocationStatus,
    /// The issuer's CRL is past its nextUpdate.
    ExpiredRevocationList,
}

/// Longest chain followed, intermediates counted (OpenSSL's default depth
/// is 100; no client PKI comes near this).
pub const MAX_DEPTH: usize = 10;

/// Whether webpki refuses `end` for itself (v1 or v2, or CA:TRUE), so the
/// caller verifies its chain with [`verify`]. False when it does not parse
/// (webpki reports that).
pub fn webpki_refuses(end: &[u8]) -> bool {
    let Ok((_, c)) = parse_x509_certificate(end) else { return false };
    c.version() != X509Version::V3 || matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
}

/// The contents (no outer tag and length) of the AlgorithmIdentifier that
/// follows the signed part of a certificate or CRL: the form rustls'
/// `signature_alg_id()` has.
fn outer_signature_alg(der: &[u8]) -> Option<&[u8]> {
    let (_, outer) = Any::from_der(der).ok()?;
    let (rest, _tbs) = Any::from_der(outer.data).ok()?;
    let (_, alg) = Any::from_der(rest).ok()?;
    Some(alg.data)
}

/// The SubjectPublicKeyInfo's AlgorithmIdentifier contents and key bits.
fn spki_parts<'a>(spki: &'a SubjectPublicKeyInfo<'a>) -> Option<(&'a [u8], &'a [u8])> {
    let (_, outer) = Any::from_der(spki.raw).ok()?;
    let (_, alg) = Any::from_der(outer.data).ok()?;
    Some((alg.data, &spki.subject_public_key.data))
}

/// Whether `signer`'s key made `signature` over `signed` with the
/// algorithm `sig_alg` names, among `algs`.
fn signed_by(
    signed: &[u8],
    sig_alg: &[u8],
    signature: &[u8],
    signer: &X509Certificate<'_>,
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> bool {
    let Some((key_alg, key)) = spki_parts(signer.public_key()) else { return false };
    algs.iter()
        .filter(|a| a.signature_alg_id().as_ref() == sig_alg && a.public_key_alg_id().as_ref() == key_alg)
        .any(|a| a.verify_signature(key, signed, signature).is_ok())
}

fn cert_signed_by(der: &[u8], c: &X509Certificate<'_>, signer: &X509Certificate<'_>, algs: &[&dyn SignatureVerificationAlgorithm]) -> bool {
    match outer_signature_alg(der) {
        Some(alg) => signed_by(c.tbs_certificate.as_ref(), alg, &c.signature_value.data, signer, algs),
        None => false,
    }
}

fn valid_at(c: &X509Certificate<'_>, now: i64) -> Result<(), ChainError> {
    let v = c.validity();
    if now < v.not_before.timestamp() {
        return Err(ChainError::NotValidYet);
    }
    if now > v.not_after.timestamp() {
        return Err(ChainError::Expired);
    }
    Ok(())
}

/// May `c` issue certificates `below` intermediates under it (x509_vfy.c
/// check_chain(): a CA by basicConstraints, keyCertSign when keyUsage is
/// there, pathLenConstraint not exceeded)?
fn may_issue(c: &X509Certificate<'_>, below: usize) -> bool {
    let ca = match c.basic_constraints() {
        Ok(Some(bc)) => bc.value.ca && bc.value.path_len_constraint.is_none_or(|n| below <= n as usize),
        _ => false,
    };
    let ku = match c.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    ca && ku
}

/// The DER SubjectPublicKeyInfo of the certificate `der` (for a v1
/// certificate's TLS handshake signature, which webpki cannot read).
pub fn subject_public_key_info(der: &[u8]) -> Option<Vec<u8>> {
    let (_, c) = parse_x509_certificate(der).ok()?;
    Some(c.public_key().raw.to_vec())
}

/// Whether the key of certificate `der` made `signature` over `message`
/// with one of `candidates` (a TLS 1.2 signature scheme's algorithms,
/// tried as rustls tries them).
pub fn key_signed(der: &[u8], message: &[u8], signature: &[u8], candidates: &[&dyn SignatureVerificationAlgorithm]) -> bool {
    let Ok((_, c)) = parse_x509_certificate(der) else { return false };
    let Some((key_alg, key)) = spki_parts(c.public_key()) else { return false };
    candidates
        .iter()
        .filter(|a| a.public_key_alg_id().as_ref() == key_alg)
        .any(|a| a.verify_signature(key, message, signature).is_ok())
}

/// Verifies the chain of the client's end certificate `end` (DER) up to
/// one of `anchors`, through `intermediates` (the client's, then the CA
/// file's non-root certificates), at `now` (Unix seconds). `crls`: None
/// when the server checks no CRLs; else every CRL it loaded (DER), and
/// then each certificate below the anchor needs one from its issuer.
/// Signatures are checked with `algs` (rustls' supported algorithms, so
/// this accepts what the v3 path accepts).
pub fn verify(
    end: &[u8],
    intermediates: &[&[u8]],
    anchors: &[&[u8]],
    crls: Option<&[&[u8]]>,
    now: i64,
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> Result<(), ChainError> {
    fn parse(d: &[u8]) -> Result<X509Certificate<'_>, ChainError> {
        parse_x509_certificate(d).map(|(_, c)| c).map_err(|_| ChainError::BadEncoding)
    }
    let end_cert = parse(end)?;
    let anchors: Vec<(&[u8], X509Certificate<'_>)> = anchors.iter().filter_map(|d| Some((*d, parse(d).ok()?))).collect();
    let inter: Vec<(&[u8], X509Certificate<'_>)> = intermediates.iter().filter_map(|d| Some((*d, parse(d).ok()?))).collect();

    // The chain, end first, and whether it reached an anchor.
    let mut chain: Vec<(&[u8], X509Certificate<'_>)> = vec![(end, end_cert)];
    loop {
        let (der, cur) = chain.last().expect("never empty");
        let issuer = cur.issuer().as_raw();
        let named = |c: &X509Certificate<'_>| c.subject().as_raw() == issuer;
        let mut any_named = false;
        if let Some((d, a)) = anchors.iter().find(|(_, a)| named(a) && { any_named = true; cert_signed_by(der, cur, a, algs) }) {
            chain.push((*d, a.clone()));
            break;
        }
        if chain.len() > MAX_DEPTH {
            return Err(ChainError::UnknownIssuer);
        }
        let below = chain.len() - 1;
        let next = inter.iter().find(|(d, c)| {
            named(c) && !chain.iter().any(|(x, _)| x == d) && { any_named = true; cert_signed_by(der, cur, c, algs) }
        });
        match next {
            Some((d, c)) if may_issue(c, below) => chain.push((*d, c.clone())),
            Some(_) => return Err(ChainError::UnknownIssuer),
            None if any_named => return Err(ChainError::BadSignature),
            None => return Err(ChainError::UnknownIssuer),
        }
    }
    let anchor_at = chain.len() - 1;
    for (_, c) in &chain {
        valid_at(c, now)?;
    }
    if let Ok(Some(eku)) = chain[0].1.extended_key_usage() {
        if !eku.value.client_auth && !eku.value.any {
            return Err(ChainError::InvalidPurpose);
        }
    }
    if let Some(crls) = crls {
        let parsed: Vec<(&[u8], CertificateRevocationList<'_>)> = crls
            .iter()
            .map(|d| parse_x509_crl(d).map(|(_, c)| (*d, c)).map_err(|_| ChainError::BadEncoding))
            .collect::<Result<_, _>>()?;
        for i in 0..anchor_at {
            let (c, issuer) = (&chain[i].1, &chain[i + 1].1);
            let crl_ok = |(d, crl): &&(&[u8], CertificateRevocationList<'_>)| {
                crl.issuer().as_raw() == issuer.subject().as_raw()
                    && outer_signature_alg(d)
                        .is_some_and(|alg| signed_by(crl.tbs_cert_list.as_ref(), alg, &crl.signature_value.data, issuer, algs))
            };
            // Every CRL of the issuer counts: one that lists the
            // certificate revokes it, and at least one must be current.
            let of_issuer: Vec<&CertificateRevocationList<'_>> = parsed.iter().filter(crl_ok).map(|(_, c)| c).collect();
            if of_issuer.is_empty() {
                return Err(ChainError::UnknownRevocationStatus);
            }
            if of_issuer.iter().any(|crl| crl.iter_revoked_certificates().any(|r| r.raw_serial() == c.raw_serial())) {
                return Err(ChainError::Revoked);
            }
            if of_issuer.iter().all(|crl| crl.next_update().is_some_and(|t| now > t.timestamp())) {
                return Err(ChainError::ExpiredRevocationList);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with the openssl CLI (OpenSSL 3.0): an RSA root (v3, CA), an
    // impostor root of the same name and another key, an EC P-256
    // intermediate the root signed, v1 end certificates (`x509 -req`
    // without extensions) by the root, by the intermediate, by the
    // impostor, a revoked one and an expired one (2020-01-01/02, `openssl
    // ca`); CA:TRUE end certificates, one with extendedKeyUsage
    // serverAuth; the root's CRL (revokes v1revoked, nextUpdate in 2126)
    // and a CRL that expired a second after it was made.
    const ROOT: &[u8] = include_bytes!("../testdata/legacy-root.der");
    const FAKE: &[u8] = include_bytes!("../testdata/legacy-fake.der");
    const INT: &[u8] = include_bytes!("../testdata/legacy-int.der");
    const V1: &[u8] = include_bytes!("../testdata/legacy-v1.der");
    const V1INT: &[u8] = include_bytes!("../testdata/legacy-v1int.der");
    const V1FORGED: &[u8] = include_bytes!("../testdata/legacy-v1forged.der");
    const V1REVOKED: &[u8] = include_bytes!("../testdata/legacy-v1revoked.der");
    const V1EXPIRED: &[u8] = include_bytes!("../testdata/legacy-v1expired.der");
    const CATRUE: &[u8] = include_bytes!("../testdata/legacy-catrue.der");
    const CATRUE_EKU: &[u8] = include_bytes!("../testdata/legacy-catrueeku.der");
    const CRL: &[u8] = include_bytes!("../testdata/legacy-root-crl.der");
    const STALE_CRL: &[u8] = include_bytes!("../testdata/legacy-stale-crl.der");
    /// 2026-12-07: inside every validity above but the expired one's, after
    /// the stale CRL's nextUpdate.
    const NOW: i64 = 1_796_601_600;

    fn algs() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.all
    }

    fn check(end: &[u8], inter: &[&[u8]], anchors: &[&[u8]], crls: Option<&[&[u8]]>) -> Result<(), ChainError> {
        verify(end, inter, anchors, crls, NOW, algs())
    }

    #[test]
    fn which_end_certificates_take_this_path() {
        for c in [V1, V1INT, V1EXPIRED, CATRUE, CATRUE_EKU] {
            assert!(webpki_refuses(c));
        }
        for c in [ROOT, INT, FAKE, b"junk".as_slice()] {
            // ROOT and INT are CA:TRUE too, but they are never end
            // certificates here; junk is webpki's to refuse.
            assert_eq!(webpki_refuses(c), c != b"junk".as_slice());
        }
    }

    #[test]
    fn chains_to_the_anchor_directly_or_through_an_intermediate() {
        assert_eq!(check(V1, &[], &[ROOT], None), Ok(()));
        assert_eq!(check(CATRUE, &[], &[ROOT], None), Ok(()));
        // EC intermediate signing an RSA-keyed v1 certificate.
        assert_eq!(check(V1INT, &[INT], &[ROOT], None), Ok(()));
        assert_eq!(check(V1INT, &[], &[ROOT], None), Err(ChainError::UnknownIssuer));
        // The intermediate alone is no anchor the caller would pass, but
        // anchoring at it directly works as for any anchor.
        assert_eq!(check(V1INT, &[], &[INT], None), Ok(()));
        assert_eq!(check(V1, &[], &[INT], None), Err(ChainError::UnknownIssuer));
    }

    #[test]
    fn a_name_is_not_enough() {
        // Signed by the impostor's key under the root's name.
        assert_eq!(check(V1FORGED, &[], &[ROOT], None), Err(ChainError::BadSignature));
        // Anchored at the impostor it verifies; the real root's end
        // certificate does not verify against the impostor.
        assert_eq!(check(V1FORGED, &[], &[FAKE], None), Ok(()));
        assert_eq!(check(V1, &[], &[FAKE], None), Err(ChainError::BadSignature));
        // Both roots trusted: the one whose key signed is found.
        assert_eq!(check(V1, &[], &[FAKE, ROOT], None), Ok(()));
        // An end certificate offered as its own intermediate is no issuer.
        assert_eq!(check(V1INT, &[V1INT, V1], &[ROOT], None), Err(ChainError::UnknownIssuer));
    }

    #[test]
    fn dates_and_purpose() {
        assert_eq!(check(V1EXPIRED, &[], &[ROOT], None), Err(ChainError::Expired));
        assert_eq!(verify(V1, &[], &[ROOT], None, 0, algs()), Err(ChainError::NotValidYet));
        assert_eq!(check(CATRUE_EKU, &[], &[ROOT], None), Err(ChainError::InvalidPurpose));
    }

    #[test]
    fn crls_as_the_server_checks_them() {
        assert_eq!(check(V1, &[], &[ROOT], Some(&[CRL])), Ok(()));
        assert_eq!(check(V1REVOKED, &[], &[ROOT], Some(&[CRL])), Err(ChainError::Revoked));
        assert_eq!(check(V1REVOKED, &[], &[ROOT], None), Ok(()));
        // No CRL at all, or none from the intermediate.
        assert_eq!(check(V1, &[], &[ROOT], Some(&[])), Err(ChainError::UnknownRevocationStatus));
        assert_eq!(check(V1INT, &[INT], &[ROOT], Some(&[CRL])), Err(ChainError::UnknownRevocationStatus));
        // The root's CRL does not vouch for the impostor's certificate.
        assert_eq!(check(V1FORGED, &[], &[FAKE], Some(&[CRL])), Err(ChainError::UnknownRevocationStatus));
        assert_eq!(check(V1, &[], &[ROOT], Some(&[STALE_CRL])), Err(ChainError::ExpiredRevocationList));
        // The stale CRL (made after the revocation) and the current one:
        // current is enough, and either listing revokes.
        assert_eq!(check(V1, &[], &[ROOT], Some(&[STALE_CRL, CRL])), Ok(()));
        assert_eq!(check(V1REVOKED, &[], &[ROOT], Some(&[STALE_CRL])), Err(ChainError::Revoked));
        assert_eq!(check(V1, &[], &[ROOT], Some(&[b"junk".as_slice()])), Err(ChainError::BadEncoding));
    }

    #[test]
    fn junk_is_refused_not_a_panic() {
        assert_eq!(check(b"", &[], &[ROOT], None), Err(ChainError::BadEncoding));
        assert_eq!(check(V1, &[b"\x30\x03\x02\x01"], &[b"\x30"], None), Err(ChainError::UnknownIssuer));
        for n in 0..V1.len() {
            let _ = check(&V1[..n], &[&INT[..n.min(INT.len())]], &[ROOT], Some(&[&CRL[..n.min(CRL.len())]]));
        }
    }
}
