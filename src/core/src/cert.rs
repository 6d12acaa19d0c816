//! X.509 facts the pooler needs, parsed with the maintained `x509-parser`
//! crate (no hand-written DER):
//!
//! * [`server_end_point`]: SCRAM channel binding data of type
//!   `tls-server-end-point` (RFC 5929 §4.1) for the server's certificate,
//!   as be-secure-openssl.c `be_tls_get_certificate_hash()` computes it:
//!   the certificate's DER hashed with its signature's hash algorithm,
//!   SHA-256 when that is MD5 or SHA-1.
//! * [`subject_names`]: a client certificate's subject common name and its
//!   DN as the server prints them for `clientname=CN` / `clientname=DN`
//!   (be-secure-openssl.c `be_tls_open_server()`: `X509_NAME_get_text_by_NID`
//!   for the CN, `X509_NAME_print_ex(..., XN_FLAG_RFC2253 & ~ASN1_STRFLGS_ESC_MSB)`
//!   for the DN).
use sha2::{Digest, Sha224, Sha256, Sha384, Sha512};
use x509_parser::oid_registry::*;
use x509_parser::prelude::*;
use x509_parser::asn1_rs::{Any, Class};
use x509_parser::signature_algorithm::SignatureAlgorithm;

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    match parse_x509_certificate(der) {
        Ok((_, c)) => Ok(c),
        Err(e) => Err(format!("could not parse certificate: {e}")),
    }
}

/// The hash for `tls-server-end-point` of a certificate in DER. Err when
/// the certificate cannot be parsed or its signature has no hash the
/// server would use (Ed25519/Ed448: OpenSSL reports no digest, and the
/// server's own hash lookup fails too).
pub fn server_end_point(der: &[u8]) -> Result<Vec<u8>, String> {
    let cert = parse(der)?;
    let alg = &cert.signature_algorithm;
    let oid = alg.algorithm.clone();
    // The hash OID of the signature (RSASSA-PSS carries it in parameters).
    let hash_oid = if oid == OID_PKCS1_RSASSAPSS {
        match SignatureAlgorithm::try_from(alg) {
            Ok(SignatureAlgorithm::RSASSA_PSS(p)) => p.hash_algorithm_oid().to_id_string(),
            _ => return Err("could not read the RSASSA-PSS parameters of the certificate signature".into()),
        }
    } else {
        oid.to_id_string()
    };
    // Signature and hash OIDs (RFC 4055, RFC 5758, RFC 3279, NIST) by
    // their hash; MD5 and SHA-1 are replaced by SHA-256 (RFC 5929 §4.1).
    let bits = match hash_oid.as_str() {
        "1.2.840.113549.1.1.14" | "1.2.840.10045.4.3.1" | "2.16.840.1.101.3.4.2.4" => Some(224),
        "1.2.840.113549.1.1.11" | "1.2.840.10045.4.3.2" | "2.16.840.1.101.3.4.2.1" => Some(256),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" | "2.16.840.1.101.3.4.2.2" => Some(384),
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" | "2.16.840.1.101.3.4.2.3" => Some(512),
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1, dsa-with-sha1, SHA-1, MD5
        "1.2.840.113549.1.1.4" | "1.2.840.113549.1.1.5" | "1.2.840.10045.4.1" | "1.2.840.10040.4.3"
        | "1.3.14.3.2.26" | "1.2.840.113549.2.5" => Some(256),
        _ => None,
    };
    match bits {
        Some(224) => Ok(Sha224::digest(der).to_vec()),
        Some(384) => Ok(Sha384::digest(der).to_vec()),
        Some(512) => Ok(Sha512::digest(der).to_vec()),
        Some(_) => Ok(Sha256::digest(der).to_vec()),
        None => Err(format!("could not find digest for the certificate signature algorithm {oid}")),
    }
}

/// OpenSSL's `ssl_client` purpose check on a client's end certificate
/// (v3_purp.c check_purpose_ssl_client(), the purpose the server's TLS
/// library verifies with): a keyUsage extension, when present, must allow
/// digitalSignature or keyAgreement, and a Netscape certificate type
/// (nsCertType), when present, must allow SSL client use (ns_reject()). Err
/// when the certificate cannot be parsed or its keyUsage is malformed.
pub fn client_key_usage_ok(der: &[u8]) -> Result<bool, String> {
    let cert = parse(der)?;
    let ns_client = cert.extensions().iter().all(|e| match e.parsed_extension() {
        ParsedExtension::NSCertType(t) => t.ssl_client(),
        _ => true,
    });
    match cert.key_usage() {
        Ok(None) => Ok(ns_client),
        Ok(Some(ku)) => Ok((ku.value.digital_signature() || ku.value.key_agreement()) && ns_client),
        Err(e) => Err(format!("could not read the keyUsage of the certificate: {e}")),
    }
}

/// The certificates OpenSSL's automatic chain adds after a lone server
/// certificate (ssl_cert_file with no chain certificates in it): the
/// issuers it finds in the verify store, which the server loads from
/// ssl_ca_file (ssl_lib.c ssl_add_cert_chain() without
/// SSL_MODE_NO_AUTO_CHAIN), up to and including a self-signed root, matched
/// by name as X509_verify_cert() builds the chain. Indices into `cas`, in
/// chain order; empty when the leaf is self-signed, names no issuer there,
/// or cannot be parsed.
pub fn auto_chain(leaf: &[u8], cas: &[&[u8]]) -> Vec<usize> {
    let parsed: Vec<Option<X509Certificate<'_>>> = cas.iter().map(|c| parse(c).ok()).collect();
    let Ok(mut last) = parse(leaf) else { return Vec::new() };
    let mut out: Vec<usize> = Vec::new();
    while last.issuer().as_raw() != last.subject().as_raw() {
        let next = parsed.iter().enumerate().find(|(i, c)| {
            !out.contains(i) && c.as_ref().is_some_and(|c| c.subject().as_raw() == last.issuer().as_raw())
        });
        let Some((i, Some(c))) = next else { break };
        out.push(i);
        last = c.clone();
    }
    out
}

/// Why an `ssl_ca_file` certificate cannot anchor a chain as OpenSSL
/// would end one (x509_vfy.c: a chain must reach a self-signed root, and
/// every certificate, the root included, must be valid at `now`, Unix
/// seconds); None when it can. Self-signed as OpenSSL's quick check:
/// issuer equal to subject (its signature is not verified, as OpenSSL
/// without X509_V_FLAG_CHECK_SS_SIGNATURE).
pub fn anchor_problem(der: &[u8], now: i64) -> Option<String> {
    let cert = match parse(der) {
        Ok(c) => c,
        Err(e) => return Some(e),
    };
    let v = cert.validity();
    if now < v.not_before.timestamp() {
        return Some("not yet valid".into());
    }
    if now > v.not_after.timestamp() {
        return Some("expired".into());
    }
    if cert.issuer().as_raw() != cert.subject().as_raw() {
        return Some("not self-signed (an intermediate certificate only serves to build chains)".into());
    }
    None
}

/// A client certificate's subject as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubjectNames {
    /// The raw content bytes of the first common name (in encoding
    /// order), as `X509_NAME_get_text_by_NID` copies them: no charset
    /// conversion, so a BMPString CN keeps its UCS-2 bytes. None without a
    /// CN. Never contains a NUL: [`subject_names`] returns Err then, as
    /// the server refuses such a certificate before authentication.
    pub cn: Option<Vec<u8>>,
    /// The subject DN exactly as `X509_NAME_print_ex(..., XN_FLAG_RFC2253)`
    /// prints it; None when it holds an attribute type whose OpenSSL short
    /// name this table does not know (the server would print a name we
    /// cannot reproduce, so a `clientname=DN` login is refused).
    pub dn: Option<String>,
}

/// OpenSSL's short name (`OBJ_nid2sn`) for the attribute types this
/// table knows; None for others.
fn attr_name(oid: &x509_parser::der_parser::oid::Oid) -> Option<&'static str> {
    let id = oid.to_id_string();
    let known: &[(&str, &str)] = &[
        ("2.5.4.3", "CN"),
        ("2.5.4.4", "SN"),
        ("2.5.4.5", "serialNumber"),
        ("2.5.4.6", "C"),
        ("2.5.4.7", "L"),
        ("2.5.4.8", "ST"),
        ("2.5.4.9", "street"),
        ("2.5.4.10", "O"),
        ("2.5.4.11", "OU"),
        ("2.5.4.12", "title"),
        ("2.5.4.13", "description"),
        ("2.5.4.17", "postalCode"),
        ("2.5.4.41", "name"),
        ("2.5.4.42", "GN"),
        ("2.5.4.43", "initials"),
        ("2.5.4.44", "generationQualifier"),
        ("2.5.4.46", "dnQualifier"),
        ("2.5.4.65", "pseudonym"),
        ("2.5.4.97", "organizationIdentifier"),
        ("0.9.2342.19200300.100.1.1", "UID"),
        ("0.9.2342.19200300.100.1.25", "DC"),
        ("1.2.840.113549.1.9.1", "emailAddress"),
    ];
    known.iter().find(|(o, _)| *o == id).map(|(_, n)| *n)
}

/// One byte as OpenSSL's `do_esc_char()` writes it under the RFC 2253
/// flags (`ESC_2253 | ESC_CTRL`, with `ESC_MSB` when `esc_msb`): `\XX`
/// for control characters (and bytes above 0x7f with `esc_msb`; without
/// it they are written as they are), `\` before `,+"\<>;` anywhere,
/// before `#` or space at the start of the value and before a space at
/// its end.
fn push_escaped(out: &mut Vec<u8>, b: u8, first: bool, last: bool, esc_msb: bool) {
    if b > 0x7f {
        if esc_msb {
            out.extend_from_slice(format!("\\{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
        return;
    }
    let bs = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
        || (first && (b == b'#' || b == b' '))
        || (last && b == b' ');
    if !bs && (b < 0x20 || b == 0x7f) {
        out.extend_from_slice(format!("\\{b:02X}").as_bytes());
    } else {
        if bs {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Upper-case hex of the value's DER (tag, length, contents) after `#`,
/// as `do_dump()` with `ASN1_STRFLGS_DUMP_DER` writes it.
fn dump_der(tag: u8, data: &[u8]) -> String {
    let mut der = vec![tag];
    let n = data.len();
    if n < 0x80 {
        der.push(n as u8);
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        der.push(0x80 | bytes.len() as u8);
        der.extend(bytes);
    }
    der.extend_from_slice(data);
    let mut s = String::from("#");
    for b in der {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// One attribute value as `do_print_ex()` prints it under XN_FLAG_RFC2253
/// (OpenSSL 3 a_strex.c). Err for a value OpenSSL cannot decode as a name
/// entry (`ASN1_PRINTABLE` admits only the universal tags below; a
/// BMPString of odd length, a UniversalString not a multiple of 4 bytes or
/// a character outside Unicode): the server then refuses the connection.
fn print_value(v: &Any, dump_all: bool, esc_msb: bool) -> Result<Vec<u8>, String> {
    let bad = || Err("could not print the subject of the client certificate".to_string());
    if v.header.class() != Class::Universal {
        return bad();
    }
    let tag = v.header.tag().0;
    // ASN1_tag2bit() & B_ASN1_PRINTABLE: NumericString, PrintableString,
    // T61String, IA5String, BIT STRING, UniversalString, BMPString,
    // UTF8String, SEQUENCE and the "unknown" tags.
    if !matches!(tag, 3 | 7 | 8 | 9 | 11 | 12 | 13 | 14 | 15 | 16 | 18 | 19 | 20 | 22 | 28 | 29 | 30) {
        return bad();
    }
    let data = v.data;
    if (tag == 30 && !data.len().is_multiple_of(2)) || (tag == 28 && !data.len().is_multiple_of(4)) {
        return bad();
    }
    // tag2nbyte: bytes per character; the rest is dumped as DER.
    let width = match tag {
        12 => 0,
        18 | 19 | 20 | 22 => 1,
        28 => 4,
        30 => 2,
        _ => return Ok(dump_der(if v.header.is_constructed() { 0x20 | tag as u8 } else { tag as u8 }, data).into_bytes()),
    };
    if dump_all {
        return Ok(dump_der(tag as u8, data).into_bytes());
    }
    let mut out = Vec::new();
    if width == 0 {
        // UTF8String: printed byte by byte (no double conversion).
        for (i, b) in data.iter().enumerate() {
            push_escaped(&mut out, *b, i == 0, i + 1 == data.len(), esc_msb);
        }
        return Ok(out);
    }
    let chars: Vec<u32> = data
        .chunks(width)
        .map(|c| c.iter().fold(0u32, |a, b| (a << 8) | *b as u32))
        .collect();
    for (i, c) in chars.iter().enumerate() {
        // Converted to UTF-8 (ASN1_STRFLGS_UTF8_CONVERT), each byte escaped.
        let Some(ch) = char::from_u32(*c) else { return bad() };
        let mut buf = [0u8; 4];
        for b in ch.encode_utf8(&mut buf).as_bytes() {
            push_escaped(&mut out, *b, i == 0, i + 1 == chars.len(), esc_msb);
        }
    }
    Ok(out)
}

/// The CN and RFC 2253 DN of a certificate's subject, from its DER.
/// Err where the server refuses the connection before authentication:
/// a CN with an embedded NUL (be-secure-openssl.c `be_tls_open_server`),
/// or a subject OpenSSL cannot print.
pub fn subject_names(der: &[u8]) -> Result<SubjectNames, String> {
    let cert = parse(der)?;
    let subject = cert.subject();
    let cn = match subject.iter_common_name().next() {
        None => None,
        Some(a) => {
            let bytes = a.as_slice();
            if bytes.contains(&0) {
                return Err("SSL certificate's common name contains embedded null".into());
            }
            Some(bytes.to_vec())
        }
    };
    // OpenSSL keeps the entries in encoding order and, with XN_FLAG_DN_REV,
    // prints them all in reverse (inside a multi-valued RDN too): `+`
    // between entries of one RDN, `,` between RDNs.
    let mut entries = Vec::new();
    for (set, rdn) in subject.iter_rdn().enumerate() {
        for a in rdn.iter() {
            entries.push((set, a));
        }
    }
    let mut dn = String::new();
    let mut known = true;
    let mut prev = None;
    for (set, a) in entries.iter().rev() {
        if let Some(p) = prev {
            dn.push(if p == *set { '+' } else { ',' });
        }
        prev = Some(*set);
        let name = attr_name(a.attr_type());
        known &= name.is_some();
        // An unknown type: its OID and the value dumped
        // (XN_FLAG_DUMP_UNKNOWN_FIELDS).
        dn.push_str(&name.map(str::to_string).unwrap_or_else(|| a.attr_type().to_id_string()));
        dn.push('=');
        // With ESC_MSB every byte written is ASCII.
        dn.push_str(&String::from_utf8_lossy(&print_value(a.attr_value(), name.is_none(), true)?));
    }
    Ok(SubjectNames { cn, dn: if known { Some(dn) } else { None } })
}

/// A client certificate as `pg_stat_ssl` shows it: subject and issuer as
/// be-secure-openssl.c `X509_NAME_to_cstring()` prints them (every entry
/// in encoding order as `/SN=value`, the value under `ASN1_STRFLGS_RFC2253`
/// without `ASN1_STRFLGS_ESC_MSB`, so UTF-8 stays as it is), and the serial
/// number in decimal (`be_tls_get_peer_serial()`: `BN_bn2dec`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SslStatusNames {
    /// Subject, e.g. `/O=Example\\, Inc/CN=alice`.
    pub client_dn: String,
    /// Serial number in decimal.
    pub client_serial: String,
    /// Issuer, in the subject's form.
    pub issuer_dn: String,
}

/// `X509_NAME_to_cstring()`'s form of one name. An attribute type outside
/// [`attr_name`]'s table is written as its dotted OID (the server's
/// OpenSSL knows more short names). Bytes that are not UTF-8 (a
/// UTF8String holding other bytes) are replaced with U+FFFD.
fn slash_name(name: &X509Name<'_>) -> Result<String, String> {
    let mut out = Vec::new();
    for rdn in name.iter_rdn() {
        for a in rdn.iter() {
            out.push(b'/');
            match attr_name(a.attr_type()) {
                Some(n) => out.extend_from_slice(n.as_bytes()),
                None => out.extend_from_slice(a.attr_type().to_id_string().as_bytes()),
            }
            out.push(b'=');
            out.extend(print_value(a.attr_value(), false, false)?);
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// `pg_stat_ssl`'s client_dn, client_serial and issuer_dn for a client
/// certificate (DER). Err only when the certificate cannot be parsed;
/// each field is computed on its own, so a name OpenSSL cannot print
/// (an odd-length BMPString, ...) leaves only that field empty.
pub fn ssl_status_names(der: &[u8]) -> Result<SslStatusNames, String> {
    let cert = parse(der)?;
    Ok(SslStatusNames {
        client_dn: slash_name(cert.subject()).unwrap_or_default(),
        client_serial: signed_decimal(cert.tbs_certificate.raw_serial()),
        issuer_dn: slash_name(cert.issuer()).unwrap_or_default(),
    })
}

/// A DER INTEGER's content bytes (big-endian two's complement) in
/// decimal, as `BN_bn2dec(ASN1_INTEGER_to_BN(...))` prints a serial in
/// be-secure-openssl.c `be_tls_get_peer_serial()`: a negative serial
/// (high bit set, e.g. `80`) prints with a minus (`-128`); no bytes is 0.
pub fn signed_decimal(raw: &[u8]) -> String {
    let negative = raw.first().is_some_and(|b| b & 0x80 != 0);
    // The magnitude: for a negative value, invert and add one.
    let mut mag: Vec<u8> = if negative { raw.iter().map(|b| !b).collect() } else { raw.to_vec() };
    if negative {
        for b in mag.iter_mut().rev() {
            let (v, carry) = b.overflowing_add(1);
            *b = v;
            if !carry {
                break;
            }
        }
    }
    // Repeated division by 10 of the big-endian magnitude.
    let mut digits = Vec::new();
    while mag.iter().any(|b| *b != 0) {
        let mut rem = 0u32;
        for b in mag.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 10) as u8;
            rem = cur % 10;
        }
        digits.push(b'0' + rem as u8);
    }
    if digits.is_empty() {
        digits.push(b'0');
    }
    if negative {
        digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

/// `s` cut to at most `max` bytes at a character boundary (the server
/// keeps NAMEDATALEN - 1 = 63 bytes of the names in `pg_stat_ssl`).
pub fn cut_at_char(s: &str, max: usize) -> &str {
    let mut n = s.len().min(max);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    &s[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::asn1_rs::Tag;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    // Certificates made with the openssl CLI; expected values from
    // `sha256sum`/`sha384sum`/`sha512sum` of the DER files and
    // `openssl x509 -noout -subject -nameopt RFC2253`.
    const P384: &[u8] = include_bytes!("../testdata/p384-sha384.der");
    const RSA256: &[u8] = include_bytes!("../testdata/rsa-sha256.der");
    const RSA1: &[u8] = include_bytes!("../testdata/rsa-sha1.der");
    const PSS512: &[u8] = include_bytes!("../testdata/rsa-pss-sha512.der");
    // A root, an intermediate it signed, and leaves the intermediate signed
    // (plain; nsCertType=server; nsCertType=client,server), openssl CLI.
    const ROOT: &[u8] = include_bytes!("../testdata/chain-root.der");
    const INT: &[u8] = include_bytes!("../testdata/chain-int.der");
    const LEAF: &[u8] = include_bytes!("../testdata/chain-leaf.der");
    const NS_SERVER: &[u8] = include_bytes!("../testdata/chain-nsserver.der");
    const NS_CLIENT: &[u8] = include_bytes!("../testdata/chain-nsclient.der");

    /// The automatic chain: the intermediate, then the root, whatever their
    /// order in the CA file; nothing for a root alone or unknown issuers.
    #[test]
    fn auto_chain_follows_issuers_to_the_root() {
        assert_eq!(auto_chain(LEAF, &[ROOT, INT]), vec![1, 0]);
        assert_eq!(auto_chain(LEAF, &[INT, ROOT]), vec![0, 1]);
        assert_eq!(auto_chain(LEAF, &[INT]), vec![0]);
        assert_eq!(auto_chain(LEAF, &[ROOT]), Vec::<usize>::new());
        assert_eq!(auto_chain(ROOT, &[ROOT, INT]), Vec::<usize>::new());
        assert_eq!(auto_chain(b"junk", &[ROOT]), Vec::<usize>::new());
    }

    /// nsCertType without the SSL client bit fails OpenSSL's ssl_client
    /// purpose; with it, or without the extension, it passes.
    #[test]
    fn ns_cert_type_must_allow_ssl_client() {
        assert_eq!(client_key_usage_ok(LEAF), Ok(true));
        assert_eq!(client_key_usage_ok(NS_CLIENT), Ok(true));
        assert_eq!(client_key_usage_ok(NS_SERVER), Ok(false));
    }

    #[test]
    fn end_point_hash_follows_the_signature() {
        assert_eq!(
            hex(&server_end_point(P384).unwrap()),
            "c383e1fd9fce50c638b996d277bc061c00a12e41197e758a323c6d57bb38d0a0a791762581214172afddc2e63a594bbe"
        );
        assert_eq!(
            hex(&server_end_point(RSA256).unwrap()),
            "2e656716c7fb917cc1bde0929a39f13b394514989d6026f4e95c239bf7da6b60"
        );
        // SHA-1 signature: SHA-256 (RFC 5929 §4.1).
        assert_eq!(
            hex(&server_end_point(RSA1).unwrap()),
            "7d51edaf2dac82dfb314a939bef6fd4b0d0d1a0b7c7a400a984a066c8047b9d9"
        );
        // RSASSA-PSS: the hash in its parameters.
        assert_eq!(
            hex(&server_end_point(PSS512).unwrap()),
            "938d20dd7f563c935be51abb71922d94ac4879ffbe0edd4eedae0243576fda8bbaa28665d78143d1bc84a98bdca464fd8ab9de3d2c10731fd3ee17de27a19bb9"
        );
    }

    #[test]
    fn subject_as_openssl_prints_it() {
        let n = subject_names(P384).unwrap();
        assert_eq!(n.cn.as_deref(), Some(&b"alice"[..]));
        assert_eq!(n.dn.as_deref(), Some("CN=alice,OU=a\\+b,O=Org\\, Inc,C=XX"));
        let n = subject_names(RSA1).unwrap();
        assert_eq!((n.cn.as_deref(), n.dn.as_deref()), (Some(&b"carol"[..]), Some("CN=carol,O=x")));
    }

    fn dn(der: &[u8]) -> String {
        subject_names(der).unwrap().dn.unwrap()
    }

    // Made with Python `cryptography`; expected DNs from OpenSSL 3.0's
    // `openssl x509 -noout -subject -nameopt RFC2253` (XN_FLAG_RFC2253,
    // the flags be-secure-openssl.c uses in PostgreSQL 14 to 18).
    #[test]
    fn dn_escapes_as_openssl() {
        // UTF8String: each byte above 0x7f as \XX (ASN1_STRFLGS_ESC_MSB).
        let d = include_bytes!("../testdata/dn-utf8.der");
        assert_eq!(dn(d), "CN=Jos\\C3\\A9 \\C3\\9C,O=\\E6\\97\\A5\\E6\\9C\\AC,C=XX");
        assert_eq!(subject_names(d).unwrap().cn.unwrap(), "José Ü".as_bytes());
        // RFC 2253 specials, leading/trailing space and #, control chars; `=` as is.
        assert_eq!(
            dn(include_bytes!("../testdata/dn-escapes.der")),
            "CN=\\ a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h=i\\ ,O=a\\01b\\7F,L=trail\\ ,OU=\\#x"
        );
        // BMPString and UniversalString converted to UTF-8, then escaped.
        assert_eq!(
            dn(include_bytes!("../testdata/dn-bmp.der")),
            "CN=u,L=\\CE\\A9\\F0\\9D\\84\\9E,O=Z\\C3\\BCrich \\CE\\A9"
        );
        // T61String: one byte per character (Latin-1), converted to UTF-8.
        let d = include_bytes!("../testdata/cn-latin1.der");
        assert_eq!(dn(d), "CN=caf\\C3\\83\\C2\\A9");
        assert_eq!(subject_names(d).unwrap().cn.unwrap(), b"caf\xc3\xa9");
        // A multi-valued RDN: its entries reversed too.
        assert_eq!(dn(include_bytes!("../testdata/dn-multi.der")), "UID=b+CN=a,O=o");
        // A type without a known short name: not reproduced, so no DN.
        assert_eq!(subject_names(include_bytes!("../testdata/dn-unknown.der")).unwrap().dn, None);
        assert_eq!(print_value(&Any::from_tag_and_data(Tag::Utf8String, b"v"), true, true).unwrap(), b"#0C0176");
    }

    #[test]
    fn anchors_and_key_usage() {
        // Self-signed, valid 2025-01-01 .. 2035-01-01.
        let d = include_bytes!("../testdata/dn-multi.der");
        assert_eq!(anchor_problem(d, 1_800_000_000), None);
        assert_eq!(anchor_problem(d, 1_700_000_000).as_deref(), Some("not yet valid"));
        assert_eq!(anchor_problem(d, 2_100_000_000).as_deref(), Some("expired"));
        assert!(client_key_usage_ok(d).unwrap());
        // Issued by another CA, keyUsage keyEncipherment only.
        let d = include_bytes!("../testdata/issued-ku-encipher.der");
        assert!(anchor_problem(d, 1_800_000_000).unwrap().starts_with("not self-signed"));
        assert!(!client_key_usage_ok(d).unwrap());
    }

    #[test]
    fn names_the_server_refuses() {
        // A NUL in the CN: the server refuses the connection; the DN
        // itself would escape it (`\00`).
        assert!(subject_names(include_bytes!("../testdata/cn-nul.der")).is_err());
        // A BMPString CN: its raw UCS-2 bytes hold NULs.
        assert!(subject_names(include_bytes!("../testdata/cn-bmp.der")).is_err());
        // An OCTET STRING CN: OpenSSL cannot decode the name at all.
        assert!(subject_names(include_bytes!("../testdata/cn-octet.der")).is_err());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(server_end_point(b"not a certificate").is_err());
        assert!(subject_names(&[0x30, 0x03, 0x02, 0x01]).is_err());
        assert!(server_end_point(&[]).is_err());
    }

    // pg_stat_ssl's form (X509_NAME_to_cstring): entries in encoding
    // order as /SN=value, RFC 2253 escapes but UTF-8 as it is; serial in
    // decimal (`openssl x509 -serial` gives 639C6B77...437F in hex).
    #[test]
    fn ssl_status_names_as_the_server_shows_them() {
        let n = ssl_status_names(P384).unwrap();
        assert_eq!(n.client_dn, "/C=XX/O=Org\\, Inc/OU=a\\+b/CN=alice");
        assert_eq!(n.issuer_dn, n.client_dn);
        assert_eq!(n.client_serial, "568678364405080310654653675623698981298077320063");
        let n = ssl_status_names(include_bytes!("../testdata/dn-utf8.der")).unwrap();
        assert_eq!(n.client_dn, "/C=XX/O=日本/CN=José Ü");
        assert_eq!(n.client_serial, "1");
        assert_eq!(
            ssl_status_names(include_bytes!("../testdata/dn-escapes.der")).unwrap().client_dn.split('/').filter(|p| p.starts_with("CN=")).next(),
            Some("CN=\\ a\\,b\\+c\\\"d\\\\e\\<f\\>g\\;h=i\\ ")
        );
        assert_eq!(ssl_status_names(include_bytes!("../testdata/dn-multi.der")).unwrap().client_dn, "/O=o/CN=a/UID=b");
        assert!(ssl_status_names(b"garbage").is_err());
    }

    // BN_bn2dec of a two's complement serial; `openssl req -x509
    // -set_serial -128` made serial-neg.der (`openssl x509 -serial`: -80).
    #[test]
    fn serials_are_signed() {
        assert_eq!(ssl_status_names(include_bytes!("../testdata/serial-neg.der")).unwrap().client_serial, "-128");
        for (raw, dec) in [
            (&[][..], "0"),
            (&[0x00][..], "0"),
            (&[0x7f][..], "127"),
            (&[0x00, 0x80][..], "128"),
            (&[0x80][..], "-128"),
            (&[0xff][..], "-1"),
            (&[0xff, 0x7f][..], "-129"),
            (&[0x80, 0x00][..], "-32768"),
            (&[0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00][..], "18446744073709551616"),
            (&[0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00][..], "-18446744073709551616"),
        ] {
            assert_eq!(signed_decimal(raw), dec, "{raw:02x?}");
        }
    }

    // A name OpenSSL cannot print blanks only its own field: the issuer's
    // first odd-length string retagged as a BMPString (the signature is
    // not checked here) leaves the subject and serial as they were.
    #[test]
    fn status_fields_stand_alone() {
        let mut der = P384.to_vec();
        let good = ssl_status_names(&der).unwrap();
        let cert = parse(P384).unwrap();
        // The tag byte of the issuer's first value of odd length: its
        // first occurrence in the DER (the issuer comes before the subject).
        let d = cert.issuer().iter_attributes().map(|a| a.attr_value().data).find(|d| d.len() % 2 == 1 && d.len() < 0x80);
        let d = d.expect("an odd-length value in the issuer");
        let at = der.windows(d.len() + 1).position(|w| w[0] as usize == d.len() && &w[1..] == d).expect("the value in the DER") - 1;
        assert!(matches!(der[at], 0x0c | 0x13), "{:02x}", der[at]);
        der[at] = 0x1e;
        let n = ssl_status_names(&der).unwrap();
        assert_eq!(n.issuer_dn, "");
        assert_eq!(n.client_dn, good.client_dn);
        assert_eq!(n.client_serial, good.client_serial);
    }

    #[test]
    fn names_are_cut_at_a_character_boundary() {
        assert_eq!(cut_at_char("abc", 63), "abc");
        let long = format!("/CN={}", "x".repeat(70));
        assert_eq!(cut_at_char(&long, 63).len(), 63);
        // A 2-byte character across byte 63: cut before it.
        let s = format!("/O={}é/CN=a", "x".repeat(59));
        assert_eq!(cut_at_char(&s, 63), &s[..62]);
    }

}
