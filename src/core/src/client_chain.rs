//! Client certificate chains the server's OpenSSL accepts and webpki (the
//! pooler's rustls verifier) refuses for their end certificate alone:
//! X.509 **v1** (and v2) end certificates (webpki: UnsupportedCertVersion).
//! They are what `openssl x509 -req -CA ...` without `-extfile` makes up to
//! OpenSSL 3.1, the PostgreSQL documentation's own recipe (ssl-tcp
//! "Creating Certificates"), so many deployed client certificates are v1.
//! And end certificates with basicConstraints **CA:TRUE** (webpki:
//! CaUsedAsEndEntity), which OpenSSL takes as client certificates: what
//! `openssl req -x509` makes with Debian's default configuration (its
//! `v3_ca` extensions), a self-signed client certificate the server's CA
//! file trusts by itself.
//!
//! For these, [`verify`] builds and checks the chain as x509_vfy.c does,
//! with the signature algorithms rustls accepts elsewhere (passed in, so
//! this crate needs no crypto), and refuses what it does not implement:
//!
//! * issuers found by name and signature, trusted anchors first, then the
//!   intermediates offered (the client's, then the CA file's), searching
//!   on when a branch fails (a renewed intermediate next to its expired
//!   copy), within [`MAX_SIGNATURES`] signature checks and
//!   [`MAX_INTERMEDIATES`] distinct intermediates (a hostile chain costs
//!   bounded CPU, as webpki's own budget);
//! * every issuer, the anchor too unless the end certificate *is* the
//!   anchor, a CA as OpenSSL's X509_check_ca() (non-strict) says:
//!   basicConstraints CA:TRUE, else a self-signed v1 certificate, a
//!   keyUsage with keyCertSign or a Netscape CA type; keyCertSign whenever
//!   keyUsage is present; pathLenConstraint counted as check_chain() does
//!   (self-issued intermediates not counted);
//! * every certificate valid at `now`, parsed with no trailing bytes, the
//!   signature algorithm inside equal to the one outside, no critical
//!   extension OpenSSL would not handle, extendedKeyUsage (where present,
//!   anchor aside) allowing clientAuth (anyExtendedKeyUsage alone does
//!   not: xku_reject());
//! * no nameConstraints anywhere in the chain (not implemented here:
//!   refused rather than ignored);
//! * with CRLs (the server's `X509_V_FLAG_CRL_CHECK_ALL`), for each
//!   certificate below the anchor its issuer's complete CRLs (no delta,
//!   no issuingDistributionPoint, no unknown critical extension, signed by
//!   the issuer, which has cRLSign when keyUsage is present, thisUpdate
//!   not in the future): at least one current, none listing it.
//!
//! keyUsage and nsCertType of the end certificate are
//! [`crate::cert::client_key_usage_ok`]'s, checked by the caller for every
//! chain.
use rustls_pki_types::SignatureVerificationAlgorithm;
use x509_parser::asn1_rs::{Any, FromDer};
use x509_parser::prelude::*;

/// Why a chain fails, named as rustls' `CertificateError` (the caller maps
/// them one to one, so the TLS alert is the one webpki's failure of a v3
/// chain in the same state sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// The end certificate does not parse (or has trailing bytes, or a
    /// malformed or duplicated extension).
    BadEncoding,
    /// No usable issuer: none of that name among anchors and
    /// intermediates, none that may issue (not a CA, pathLenConstraint,
    /// nameConstraints), a chain longer than [`MAX_DEPTH`], or the search
    /// budget spent.
    UnknownIssuer,
    /// An issuer of that name whose key did not sign the certificate (or
    /// a signature algorithm rustls does not accept, e.g. SHA-1).
    BadSignature,
    /// A certificate of the chain expired.
    Expired,
    /// A certificate of the chain is not valid yet.
    NotValidYet,
    /// An extendedKeyUsage without clientAuth.
    InvalidPurpose,
    /// A critical extension OpenSSL does not handle.
    UnhandledCriticalExtension,
    /// Listed in its issuer's CRL.
    Revoked,
    /// CRLs are checked and an issuer has none usable (or one does not
    /// parse, as webpki's verifier then fails every chain).
    UnknownRevocationStatus,
    /// Every CRL of the issuer is past its nextUpdate.
    ExpiredRevocationList,
}

/// Longest chain followed, intermediates counted.
pub const MAX_DEPTH: usize = 10;
/// Distinct intermediates considered (the client's first).
pub const MAX_INTERMEDIATES: usize = 16;
/// Signature checks one chain may cost (webpki's budget is 100).
pub const MAX_SIGNATURES: usize = 64;

/// Parses one certificate that is exactly `der` (OpenSSL refuses trailing
/// bytes: "cert length mismatch").
fn parse_exact(der: &[u8]) -> Option<X509Certificate<'_>> {
    match parse_x509_certificate(der) {
        Ok((rest, c)) if rest.is_empty() => Some(c),
        _ => None,
    }
}

/// Whether webpki refuses `end` as an end certificate for what it is
/// (version 1 or 2, or a CA: basicConstraints CA:TRUE), so the caller
/// verifies its chain with [`verify`], which refuses nameConstraints
/// anywhere in it (webpki would check them). False when it does not parse
/// exactly (webpki reports that).
pub fn webpki_refuses(end: &[u8]) -> bool {
    parse_exact(end).is_some_and(|c| {
        c.version() != X509Version::V3 || matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca)
    })
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

/// The DER SubjectPublicKeyInfo of the certificate `der` (for a v1
/// certificate's TLS handshake signature, which webpki cannot read).
pub fn subject_public_key_info(der: &[u8]) -> Option<Vec<u8>> {
    Some(parse_exact(der)?.public_key().raw.to_vec())
}

/// Whether the key of certificate `der` made `signature` over `message`
/// with one of `candidates` (a TLS 1.2 signature scheme's algorithms,
/// tried as rustls tries them).
pub fn key_signed(der: &[u8], message: &[u8], signature: &[u8], candidates: &[&dyn SignatureVerificationAlgorithm]) -> bool {
    let Some(c) = parse_exact(der) else { return false };
    let Some((key_alg, key)) = spki_parts(c.public_key()) else { return false };
    candidates
        .iter()
        .filter(|a| a.public_key_alg_id().as_ref() == key_alg)
        .any(|a| a.verify_signature(key, message, signature).is_ok())
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

fn self_issued(c: &X509Certificate<'_>) -> bool {
    c.issuer().as_raw() == c.subject().as_raw()
}

/// Extensions OpenSSL handles when critical (v3_purp.c
/// X509_supported_extension(), the ones client PKIs use), nameConstraints
/// aside (refused by [`well_formed`]).
const HANDLED_CRITICAL: &[&str] = &[
    "2.5.29.15",               // keyUsage
    "2.5.29.17",               // subjectAltName
    "2.5.29.19",               // basicConstraints
    "2.5.29.31",               // cRLDistributionPoints
    "2.5.29.32",               // certificatePolicies
    "2.5.29.33",               // policyMappings
    "2.5.29.36",               // policyConstraints
    "2.5.29.37",               // extendedKeyUsage
    "2.5.29.54",               // inhibitAnyPolicy
    "2.16.840.1.113730.1.1",   // nsCertType
];

/// What every certificate of the chain must be: its two signature
/// algorithm fields equal, its extensions readable and not duplicated, no
/// critical one OpenSSL would not handle, no nameConstraints.
fn well_formed(c: &X509Certificate<'_>) -> Result<(), ChainError> {
    if c.signature_algorithm != c.tbs_certificate.signature || c.tbs_certificate.extensions_map().is_err() {
        return Err(ChainError::BadEncoding);
    }
    for e in c.extensions() {
        let oid = e.oid.to_id_string();
        if oid == "2.5.29.30" {
            return Err(ChainError::UnknownIssuer);
        }
        if matches!(e.parsed_extension(), ParsedExtension::ParseError { .. }) {
            return Err(ChainError::BadEncoding);
        }
        if e.critical && !HANDLED_CRITICAL.contains(&oid.as_str()) {
            return Err(ChainError::UnhandledCriticalExtension);
        }
    }
    Ok(())
}

/// An extendedKeyUsage, when present, must name clientAuth
/// (v3_purp.c xku_reject() for the `ssl_client` purpose).
fn client_purpose(c: &X509Certificate<'_>) -> Result<(), ChainError> {
    match c.extended_key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(eku)) if eku.value.client_auth => Ok(()),
        Ok(Some(_)) => Err(ChainError::InvalidPurpose),
        Err(_) => Err(ChainError::BadEncoding),
    }
}

/// May `c` issue certificates with `below` non-self-issued intermediates
/// under it (X509_check_ca() without X509_V_FLAG_X509_STRICT, and
/// check_chain()'s pathLenConstraint)?
fn may_issue(c: &X509Certificate<'_>, below: usize) -> bool {
    let ku = c.key_usage();
    let ku_signs = match &ku {
        Ok(None) => true,
        Ok(Some(k)) => k.value.key_cert_sign(),
        Err(_) => false,
    };
    let ns_ca = c.extensions().iter().any(|e| match e.parsed_extension() {
        ParsedExtension::NSCertType(t) => t.ssl_ca() || t.smime_ca() || t.object_signing_ca(),
        _ => false,
    });
    let ca = match c.basic_constraints() {
        Ok(Some(bc)) => bc.value.ca && bc.value.path_len_constraint.is_none_or(|n| below <= n as usize),
        Ok(None) => (c.version() == X509Version::V1 && self_issued(c)) || matches!(ku, Ok(Some(_))) || ns_ca,
        Err(_) => false,
    };
    ca && ku_signs
}

/// How an `ssl_ca_file` anchor may serve: as the issuer of chains (a CA by
/// X509_check_ca()), or only as a trusted certificate of its own (a
/// self-signed client certificate placed in the CA file: OpenSSL accepts
/// that very certificate and nothing its key signs). `path_limited`: its
/// pathLenConstraint limits the chains below it (webpki ignores an
/// anchor's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnchorUse {
    /// It may issue certificates.
    pub issues: bool,
    /// It has a pathLenConstraint.
    pub path_limited: bool,
}

/// [`AnchorUse`] of an anchor in DER; None when it does not parse.
pub fn anchor_use(der: &[u8]) -> Option<AnchorUse> {
    let c = parse_exact(der)?;
    let path_limited = matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.path_len_constraint.is_some());
    Some(AnchorUse { issues: may_issue(&c, 0), path_limited })
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
    let end_cert = parse_exact(end).ok_or(ChainError::BadEncoding)?;
    well_formed(&end_cert)?;
    let anchors: Vec<(&[u8], X509Certificate<'_>)> = anchors.iter().filter_map(|d| Some((*d, parse_exact(d)?))).collect();
    let mut inter: Vec<(&[u8], X509Certificate<'_>)> = Vec::new();
    for d in intermediates {
        if inter.len() == MAX_INTERMEDIATES {
            break;
        }
        if *d != end && !inter.iter().any(|(x, _)| x == d) {
            if let Some(c) = parse_exact(d) {
                inter.push((*d, c));
            }
        }
    }
    let chain = if anchors.iter().any(|(d, _)| *d == end) {
        // The end certificate is itself trusted (a self-signed client
        // certificate in ssl_ca_file): OpenSSL's chain of one.
        vec![(end, end_cert)]
    } else {
        let mut search = Search { anchors: &anchors, inter: &inter, now, algs, budget: MAX_SIGNATURES, err: None };
        let mut chain = vec![(end, end_cert)];
        if !search.extend(&mut chain) {
            return Err(search.err.unwrap_or(ChainError::UnknownIssuer));
        }
        chain
    };
    client_purpose(&chain[0].1)?;
    let anchor_at = chain.len() - 1;
    if let Some(crls) = crls {
        let parsed: Vec<(&[u8], CertificateRevocationList<'_>)> = crls
            .iter()
            .map(|d| match parse_x509_crl(d) {
                Ok((rest, c)) if rest.is_empty() => Ok((*d, c)),
                _ => Err(ChainError::UnknownRevocationStatus),
            })
            .collect::<Result<_, _>>()?;
        for i in 0..anchor_at {
            let (c, issuer) = (&chain[i].1, &chain[i + 1].1);
            let of_issuer: Vec<&CertificateRevocationList<'_>> =
                parsed.iter().filter(|(d, crl)| complete_crl_of(d, crl, issuer, now, algs)).map(|(_, c)| c).collect();
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
    // Dates last, as OpenSSL's internal_verify() runs after the chain and
    // revocation checks (an expired revoked certificate is "revoked").
    for (_, c) in &chain {
        valid_at(c, now)?;
    }
    Ok(())
}

/// A complete CRL `issuer` signed, usable at `now`.
fn complete_crl_of(
    der: &[u8],
    crl: &CertificateRevocationList<'_>,
    issuer: &X509Certificate<'_>,
    now: i64,
    algs: &[&dyn SignatureVerificationAlgorithm],
) -> bool {
    let usable_exts = crl.extensions().iter().all(|e| {
        let oid = e.oid.to_id_string();
        // deltaCRLIndicator, issuingDistributionPoint: a partial CRL.
        oid != "2.5.29.27" && oid != "2.5.29.28" && (!e.critical || oid == "2.5.29.20" || oid == "2.5.29.35")
    });
    let crl_signer = match issuer.key_usage() {
        Ok(None) => true,
        Ok(Some(k)) => k.value.crl_sign(),
        Err(_) => false,
    };
    usable_exts
        && crl_signer
        && crl.signature_algorithm == crl.tbs_cert_list.signature
        && crl.issuer().as_raw() == issuer.subject().as_raw()
        && crl.last_update().timestamp() <= now
        && outer_signature_alg(der)
            .is_some_and(|alg| signed_by(crl.tbs_cert_list.as_ref(), alg, &crl.signature_value.data, issuer, algs))
}

/// A depth-first search for an issuer chain, within a signature budget.
struct Search<'s, 'a> {
    anchors: &'s [(&'a [u8], X509Certificate<'a>)],
    inter: &'s [(&'a [u8], X509Certificate<'a>)],
    now: i64,
    algs: &'s [&'s dyn SignatureVerificationAlgorithm],
    budget: usize,
    /// The most telling failure met: any over "no issuer".
    err: Option<ChainError>,
}

impl<'a> Search<'_, 'a> {
    fn note(&mut self, e: ChainError) {
        if self.err.is_none() || self.err == Some(ChainError::UnknownIssuer) {
            self.err = Some(e);
        }
    }

    /// Whether `c` (DER `der`) carries `signer`'s signature, counting
    /// against the budget.
    fn signed(&mut self, der: &[u8], c: &X509Certificate<'_>, signer: &X509Certificate<'_>) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        let ok = outer_signature_alg(der).is_some_and(|alg| signed_by(c.tbs_certificate.as_ref(), alg, &c.signature_value.data, signer, self.algs));
        if !ok {
            self.note(ChainError::BadSignature);
        }
        ok
    }

    /// Extends `chain` (end certificate first) to an anchor; true when it
    /// ends at one.
    fn extend(&mut self, chain: &mut Vec<(&'a [u8], X509Certificate<'a>)>) -> bool {
        let below = chain[1..].iter().filter(|(_, c)| !self_issued(c)).count();
        let (der, cur) = chain.last().cloned().expect("never empty");
        let named = |c: &X509Certificate<'_>| c.subject().as_raw() == cur.issuer().as_raw();
        for (d, a) in self.anchors.iter().filter(|(_, a)| named(a)) {
            if !self.signed(der, &cur, a) {
                continue;
            }
            if !may_issue(a, below) {
                self.note(ChainError::UnknownIssuer);
                continue;
            }
            if let Err(e) = well_formed(a).and_then(|_| valid_at(a, self.now)) {
                self.note(e);
                continue;
            }
            chain.push((d, a.clone()));
            return true;
        }
        if chain.len() > MAX_DEPTH {
            return false;
        }
        // Currently valid issuers first, as OpenSSL's find_issuer().
        let mut candidates: Vec<&(&'a [u8], X509Certificate<'a>)> =
            self.inter.iter().filter(|(d, c)| named(c) && !chain.iter().any(|(x, _)| x == d)).collect();
        candidates.sort_by_key(|(_, c)| valid_at(c, self.now).is_err());
        for (d, c) in candidates {
            if !self.signed(der, &cur, c) {
                continue;
            }
            if let Err(e) = well_formed(c).and_then(|_| client_purpose(c)).and_then(|_| valid_at(c, self.now)) {
                self.note(e);
                continue;
            }
            if !may_issue(c, below) {
                self.note(ChainError::UnknownIssuer);
                continue;
            }
            chain.push((d, c.clone()));
            if self.extend(chain) {
                return true;
            }
            chain.pop();
        }
        false
    }
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
    // serverAuth (these two webpki verifies, but the rules apply to them as
    // well); the root's CRL (revokes v1revoked, nextUpdate in 2126)
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
    // "legacy renewed", an intermediate of ROOT issued twice for one key:
    // expired (2020) and current; V1REN is the v1 certificate it issued.
    const REN_OLD: &[u8] = include_bytes!("../testdata/legacy-ren-old.der");
    const REN_NEW: &[u8] = include_bytes!("../testdata/legacy-ren-new.der");
    const V1REN: &[u8] = include_bytes!("../testdata/legacy-v1ren.der");
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
        // v1, and CA:TRUE (webpki: CaUsedAsEndEntity) as end certificates.
        for c in [V1, V1INT, V1EXPIRED, review::OK, CATRUE, CATRUE_EKU, ROOT, INT, FAKE] {
            assert!(webpki_refuses(c));
        }
        // Other v3 ones and junk are webpki's to verify or refuse; so is a
        // v1 certificate with a byte after it.
        let trailing = [V1, b"\0"].concat();
        for c in [review::SELF, b"junk".as_slice(), &trailing] {
            assert!(!webpki_refuses(c));
        }
        assert_eq!(check(&trailing, &[], &[ROOT], None), Err(ChainError::BadEncoding));
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
        // A self-signed CA certificate the CA file holds, as the client's
        // own: OpenSSL's chain of one; another anchor does not vouch for it.
        assert_eq!(check(ROOT, &[], &[ROOT], None), Ok(()));
        assert_eq!(check(FAKE, &[], &[ROOT], None), Err(ChainError::BadSignature));
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
        assert_eq!(check(V1, &[], &[ROOT], Some(&[b"junk".as_slice()])), Err(ChainError::UnknownRevocationStatus));
    }

    // From a review, made with the openssl CLI (EC P-256): "Acme Root"
    // (CA, keyCertSign), "Root PL0" (CA, pathlen:0) and "mallory", a
    // CA:TRUE certificate it issued with no keyUsage, which signed the v1
    // "minted" (CN=postgres); "DeptA CA" (nameConstraints O=Acme,OU=DeptA)
    // and the v1 certificate it issued outside them; "Web Server CA"
    // (extendedKeyUsage serverAuth) and its v1 certificate; v3 CA:TRUE
    // certificates of the root with an unknown critical extension, with
    // anyExtendedKeyUsage only, with a malformed extendedKeyUsage; a v1
    // one of the root; "alice", self-signed with CA:FALSE, and the v1
    // "forge" (CN=postgres) her key signed.
    mod review {
        pub const ROOT: &[u8] = include_bytes!("../testdata/review-root.der");
        pub const R0: &[u8] = include_bytes!("../testdata/review-r0.der");
        pub const MALLORY: &[u8] = include_bytes!("../testdata/review-mallory.der");
        pub const MINTED: &[u8] = include_bytes!("../testdata/review-minted.der");
        pub const INT_NC: &[u8] = include_bytes!("../testdata/review-intnc.der");
        pub const LEAF_NC: &[u8] = include_bytes!("../testdata/review-leafnc.der");
        pub const INT_EKU: &[u8] = include_bytes!("../testdata/review-inteku.der");
        pub const LEAF_EKU: &[u8] = include_bytes!("../testdata/review-leafeku.der");
        pub const CRIT: &[u8] = include_bytes!("../testdata/review-leafcrit.der");
        pub const ANY_EKU: &[u8] = include_bytes!("../testdata/review-leafany.der");
        pub const BAD_EKU: &[u8] = include_bytes!("../testdata/review-leafmal.der");
        pub const OK: &[u8] = include_bytes!("../testdata/review-leafok.der");
        pub const SELF: &[u8] = include_bytes!("../testdata/review-selfee.der");
        pub const FORGE: &[u8] = include_bytes!("../testdata/review-forge.der");
    }

    /// What OpenSSL refuses (`openssl verify -purpose sslclient`) this
    /// refuses too.
    #[test]
    fn issuers_must_be_cas_within_their_constraints() {
        use review::*;
        assert_eq!(check(OK, &[], &[ROOT], None), Ok(()));
        // The anchor's pathlen:0 forbids mallory's issuing.
        assert_eq!(check(MINTED, &[MALLORY], &[R0], None), Err(ChainError::UnknownIssuer));
        // A trusted self-signed CA:FALSE certificate vouches for itself
        // only, not for what its key signs.
        assert_eq!(check(FORGE, &[], &[SELF], None), Err(ChainError::UnknownIssuer));
        // nameConstraints are not implemented: refused.
        assert_eq!(check(LEAF_NC, &[INT_NC], &[ROOT], None), Err(ChainError::UnknownIssuer));
        // An intermediate for servers only.
        assert_eq!(check(LEAF_EKU, &[INT_EKU], &[ROOT], None), Err(ChainError::InvalidPurpose));
        // End certificates (v3 here, to carry the extensions).
        assert_eq!(check(CRIT, &[], &[ROOT], None), Err(ChainError::UnhandledCriticalExtension));
        assert_eq!(check(ANY_EKU, &[], &[ROOT], None), Err(ChainError::InvalidPurpose));
        assert_eq!(check(BAD_EKU, &[], &[ROOT], None), Err(ChainError::BadEncoding));
    }

    #[test]
    fn a_trusted_end_certificate_is_its_own_chain() {
        use review::*;
        // SELF is v3; the rule is the same for a v1 one: V1 anchored at
        // itself.
        assert_eq!(check(SELF, &[], &[SELF], None), Ok(()));
        assert_eq!(check(V1, &[], &[V1], None), Ok(()));
    }

    #[test]
    fn an_expired_copy_of_an_intermediate_does_not_hide_the_renewed_one() {
        // The client still sends the expired intermediate; the CA file has
        // the renewed one (same name and key).
        assert_eq!(check(V1REN, &[REN_OLD, REN_NEW], &[ROOT], None), Ok(()));
        assert_eq!(check(V1REN, &[REN_NEW, REN_OLD], &[ROOT], None), Ok(()));
        assert_eq!(check(V1REN, &[REN_OLD], &[ROOT], None), Err(ChainError::Expired));
    }

    #[test]
    fn hostile_chains_cost_a_bounded_number_of_signatures() {
        // Many copies under other DER (a byte flipped in the signature) of
        // an issuer by the right name: each fails its signature check; the
        // search stops within its budget either way.
        let mut decoys: Vec<Vec<u8>> = Vec::new();
        for i in 0..200u8 {
            let mut d = REN_NEW.to_vec();
            let n = d.len();
            d[n - 1 - (i as usize % 64)] ^= i | 1;
            decoys.push(d);
        }
        let refs: Vec<&[u8]> = decoys.iter().map(|d| d.as_slice()).collect();
        assert!(check(V1REN, &refs, &[ROOT], None).is_err());
        let mut with_real = refs.clone();
        with_real.insert(0, REN_NEW);
        assert_eq!(check(V1REN, &with_real, &[ROOT], None), Ok(()));
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
