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

/// A client certificate's subject as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubjectNames {
    /// The first common name; None without one. The server refuses a
    /// certificate whose CN has an embedded NUL at the TLS level; here
    /// [`subject_names`] returns Err for it.
    pub cn: Option<String>,
    /// The subject DN in RFC 2253 form (last RDN first, `,` between them,
    /// `+` inside a multi-valued RDN), non-ASCII bytes left as they are.
    pub dn: String,
}

/// OpenSSL's short name for the attribute types RFC 2253 output uses, the
/// dotted OID otherwise.
fn attr_name(oid: &x509_parser::der_parser::oid::Oid) -> String {
    let known: &[(&x509_parser::der_parser::oid::Oid, &str)] = &[
        (&OID_X509_COMMON_NAME, "CN"),
        (&OID_X509_COUNTRY_NAME, "C"),
        (&OID_X509_LOCALITY_NAME, "L"),
        (&OID_X509_STATE_OR_PROVINCE_NAME, "ST"),
        (&OID_X509_ORGANIZATION_NAME, "O"),
        (&OID_X509_ORGANIZATIONAL_UNIT, "OU"),
        (&OID_X509_STREET_ADDRESS, "street"),
        (&OID_DOMAIN_COMPONENT, "DC"),
        (&OID_PKCS9_EMAIL_ADDRESS, "emailAddress"),
        (&OID_X509_SERIALNUMBER, "serialNumber"),
        (&OID_X509_TITLE, "title"),
        (&OID_X509_GIVEN_NAME, "GN"),
        (&OID_X509_SURNAME, "SN"),
    ];
    for (o, n) in known {
        if *o == oid {
            return (*n).to_string();
        }
    }
    oid.to_id_string()
}

/// RFC 2253 §2.4 escaping of one attribute value (OpenSSL's
/// `ASN1_STRFLGS_ESC_2253`): `,+"\<>;` anywhere, `#` or space first, space last.
fn escape_2253(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let n = v.chars().count();
    for (i, ch) in v.chars().enumerate() {
        let special = matches!(ch, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (ch == '#' || ch == ' '))
            || (i + 1 == n && ch == ' ');
        if special {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// The CN and RFC 2253 DN of a certificate's subject, from its DER.
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
            Some(String::from_utf8_lossy(bytes).into_owned())
        }
    };
    let rdns: Vec<String> = subject
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    format!("{}={}", attr_name(a.attr_type()), escape_2253(&String::from_utf8_lossy(a.as_slice())))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    let dn = rdns.into_iter().rev().collect::<Vec<_>>().join(",");
    Ok(SubjectNames { cn, dn })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape_2253("a,b"), "a\\,b");
        assert_eq!(escape_2253(" x "), "\\ x\\ ");
        assert_eq!(escape_2253("#1"), "\\#1");
        assert_eq!(escape_2253("plain"), "plain");
    }

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
        assert_eq!(n.cn.as_deref(), Some("alice"));
        assert_eq!(n.dn, "CN=alice,OU=a\\+b,O=Org\\, Inc,C=XX");
        let n = subject_names(RSA1).unwrap();
        assert_eq!((n.cn.as_deref(), n.dn.as_str()), (Some("carol"), "CN=carol,O=x"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(server_end_point(b"not a certificate").is_err());
        assert!(subject_names(&[0x30, 0x03, 0x02, 0x01]).is_err());
        assert!(server_end_point(&[]).is_err());
    }
}
