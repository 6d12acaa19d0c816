//! TLS for clients on the pooler's port (issue 12, first step).
//!
//! * [`load`]: the server's own settings (`ssl`, `ssl_cert_file`,
//!   `ssl_key_file`, `ssl_ca_file`, `ssl_crl_file`, `ssl_crl_dir`,
//!   `ssl_min_protocol_version`,
//!   `ssl_max_protocol_version`) as a rustls `ServerConfig` (crypto provider
//!   ring), relative paths resolved against the data directory as the server
//!   does (be-secure-openssl.c `be_tls_init()` opens them from the data
//!   directory, its working directory).
//! * [`spawn_relay`]: there is no kernel TLS on these machines, so a TLS
//!   client gets a relay (`super::relay`): its handshake on a thread of its
//!   own, then a place on one of a few relay worker threads, which carry
//!   plaintext between the client's TCP socket and one end of a Unix
//!   `socketpair`; the other end takes the client socket's place in the
//!   pooler (startup, authentication, idle peeks) and is what is handed to a
//!   pooled backend at each transaction, so backends serve it as they serve
//!   any socket. The relay lives while the client is active: once it is
//!   idle in the pooler it is parked ([`RelayCtl`], `super::park`) and the
//!   pooler reads its few TLS bytes inline until the next message starts a
//!   relay again; relays never call into PostgreSQL (no logging, no palloc).
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::UnixTime;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use nextgres_core::control::TlsStatus;
use super::relay::{self, Relay};

/// Relays whose TLS handshake has not finished (capped by
/// `nextgres.max_tls_handshakes`).
static HANDSHAKING: AtomicUsize = AtomicUsize::new(0);

/// How many TLS handshakes are in progress (a relay thread each).
pub fn handshaking() -> usize {
    HANDSHAKING.load(Ordering::Acquire)
}

/// Counts a relay in [`HANDSHAKING`] from before its thread starts until
/// its handshake is done or it ends.
pub(super) struct Handshake;

impl Handshake {
    pub(super) fn new() -> Handshake {
        HANDSHAKING.fetch_add(1, Ordering::AcqRel);
        Handshake
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        HANDSHAKING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the relay learns from a client's finished handshake; set before
/// any plaintext reaches the pooler.
#[derive(Debug, Clone, Default)]
pub struct Session {
    /// Version, cipher, bits and client certificate names as the server's
    /// OpenSSL build spells them: what `nextgres.clients` and, through
    /// ATTACH, the backend's `pg_stat_ssl` row show.
    pub status: TlsStatus,
    /// `tls-server-end-point` channel binding data for the certificate
    /// this client was shown; None when it has none (see [`Loaded`]).
    pub end_point: Option<Arc<[u8]>>,
    /// The client's certificate (DER), verified against `ssl_ca_file` by
    /// rustls during the handshake; None when the client sent none.
    pub peer_cert: Option<Vec<u8>>,
    /// `ssl_ca_file` was loaded for this client's handshake (client
    /// certificates asked for and verified).
    pub ca_loaded: bool,
}

/// A client's TLS session once its handshake is done.
pub type TlsInfo = Arc<OnceLock<Session>>;

/// The server's TLS settings as the pooler serves them.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// With `ssl_ca_file`: the same configuration refusing every client
    /// certificate, served by a restarted pooler that falls back to the
    /// startup configuration ([`load_or_startup`]), whose CA file and CRLs
    /// may be stale.
    pub refusing_certs: Option<Arc<ServerConfig>>,
    /// The `tls-server-end-point` hash of the server certificate
    /// (`nextgres_core::cert::server_end_point`); None when its signature
    /// algorithm has no hash (Ed25519): SCRAM-SHA-256-PLUS is then not offered.
    pub end_point: Option<Arc<[u8]>>,
    /// `ssl_ca_file` is set and loaded: client certificates are asked for.
    pub ca_loaded: bool,
}

/// `ssl` is on in the current configuration.
pub fn enabled() -> bool {
    crate::pg::setting(c"ssl").is_some_and(|v| v == "on")
}

/// A path setting as the server opens it: relative to the data directory.
fn path_setting(name: &std::ffi::CStr) -> Option<PathBuf> {
    let v = crate::pg::setting(name).unwrap_or_default();
    if v.is_empty() {
        return None;
    }
    let p = PathBuf::from(v);
    Some(if p.is_absolute() { p } else { crate::pg::data_dir().join(p) })
}

/// The rustls protocol versions the server's `ssl_min_protocol_version` /
/// `ssl_max_protocol_version` allow (`nextgres_core::tls`); an error when
/// they allow neither TLS 1.2 nor 1.3.
pub fn protocol_versions(min: &str, max: &str) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
    let v = nextgres_core::tls::allowed_versions(min, max)?;
    let mut out = Vec::new();
    if v.tls12 {
        out.push(&rustls::version::TLS12);
    }
    if v.tls13 {
        out.push(&rustls::version::TLS13);
    }
    Ok(out)
}

/// The configuration the postmaster loaded in `_PG_init` when it decided
/// to take the port with TLS; the pooler inherits it at fork.
static STARTUP: OnceLock<Arc<Loaded>> = OnceLock::new();

/// Postmaster: [`load`], keeping a loaded configuration for [`load_or_startup`].
pub fn load_at_startup() -> Result<Option<Arc<Loaded>>, String> {
    let r = load();
    if let Ok(Some(c)) = &r {
        let _ = STARTUP.set(c.clone());
    }
    r
}

/// Pooler (re)start: [`load`]; when that fails, the configuration the
/// postmaster loaded at startup (the port was taken on the strength of it,
/// so a pooler restarted with a key it cannot read still serves TLS), with
/// the reason in Err for a WARNING. That fallback refuses every client
/// certificate (its `ssl_ca_file` and CRLs may be long out of date; the
/// handshake of a client sending one fails with `unknown_ca`; clients
/// without one are served) until a reload loads the current settings.
/// Ok(None) only with `ssl = off`, or when the postmaster had none either.
pub fn load_or_startup() -> (Option<Arc<Loaded>>, Option<String>) {
    match load() {
        Ok(c) => (c, None),
        Err(e) => {
            let fallback = STARTUP.get().map(|c| {
                Arc::new(Loaded {
                    config: c.refusing_certs.clone().unwrap_or_else(|| c.config.clone()),
                    refusing_certs: c.refusing_certs.clone(),
                    end_point: c.end_point.clone(),
                    ca_loaded: c.ca_loaded,
                })
            });
            (fallback, Some(e))
        }
    }
}

/// Loads the server's TLS settings. Ok(None) when `ssl = off`; Err(reason)
/// when `ssl = on` but the certificate, key or CA cannot be used.
pub fn load() -> Result<Option<Arc<Loaded>>, String> {
    if !enabled() {
        return Ok(None);
    }
    let cert_file = path_setting(c"ssl_cert_file").ok_or("ssl_cert_file is empty")?;
    let key_file = path_setting(c"ssl_key_file").ok_or("ssl_key_file is empty")?;
    let ca_file = path_setting(c"ssl_ca_file");
    let min = crate::pg::setting(c"ssl_min_protocol_version").unwrap_or_default();
    let max = crate::pg::setting(c"ssl_max_protocol_version").unwrap_or_default();
    let crl_file = path_setting(c"ssl_crl_file");
    let crl_dir = path_setting(c"ssl_crl_dir");
    let crls = load_crls(crl_file.as_deref(), None)?;
    if crl_file.is_some() && crls.is_empty() {
        // OpenSSL's X509_load_cert_crl_file(): "no certificate or crl found".
        return Err(format!("could not load SSL certificate revocation list file \"{}\": no CRL in it", crl_file.unwrap_or_default().display()));
    }
    let revocation = (crl_file.is_some() || crl_dir.is_some()).then_some(Revocation { file_crls: crls, dir: crl_dir });
    build(&cert_file, &key_file, ca_file.as_deref(), revocation, &min, &max).map(Some)
}

/// The CRLs of `ssl_crl_file` (PEM, any number) and `ssl_crl_dir` (the
/// server's OpenSSL looks up `HASH.rN` files there; the pooler reads every
/// file named so, PEM: see [`ClientVerifier`] for when).
fn load_crls(
    file: Option<&std::path::Path>,
    dir: Option<&std::path::Path>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut out = Vec::new();
    let mut read = |p: &std::path::Path| -> Result<(), String> {
        let crls = CertificateRevocationListDer::pem_file_iter(p)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("could not load SSL certificate revocation list file \"{}\": {e}", p.display()))?;
        out.extend(crls);
        Ok(())
    };
    if let Some(f) = file {
        read(f)?;
    }
    if let Some(d) = dir {
        let entries = std::fs::read_dir(d)
            .map_err(|e| format!("could not load SSL certificate revocation list directory \"{}\": {e}", d.display()))?;
        let mut names: Vec<PathBuf> = crl_dir_files(entries)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        names.sort();
        for p in names {
            read(&p)?;
        }
    }
    Ok(out)
}

/// A CRL directory listing: paths with modification time and size.
type CrlListing = Vec<(PathBuf, Option<(std::time::SystemTime, u64)>)>;

/// The `HASH.rN` files of a CRL directory listing with their modification
/// time and size, sorted by name.
fn crl_dir_files(entries: std::fs::ReadDir) -> CrlListing {
    let mut names: CrlListing = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                matches!(n.split_once(".r"), Some((h, k)) if h.len() == 8
                    && h.bytes().all(|b| b.is_ascii_hexdigit())
                    && !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|p| {
                let m = std::fs::metadata(&p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
                (p, m)
            })
            .collect();
    names.sort();
    names
}

/// Revocation settings: `ssl_crl_file`'s CRLs (read at load) and
/// `ssl_crl_dir` (read by [`ClientVerifier`] whenever its contents change).
#[derive(Debug)]
pub struct Revocation {
    pub file_crls: Vec<CertificateRevocationListDer<'static>>,
    pub dir: Option<PathBuf>,
}

/// Client certificate verification as close to the server's OpenSSL as
/// rustls allows.
///
/// * Anchors: only `ssl_ca_file` certificates that are self-signed and
///   valid at load (OpenSSL needs a chain to end at a self-signed root and
///   checks the root's dates too); the others are refused with a WARNING
///   at load, and the non-self-signed ones still serve as intermediates
///   (OpenSSL finds issuers in the CA file). Root hints name every
///   certificate of the file, as SSL_CTX_set_client_CA_list() does.
/// * The end certificate's keyUsage, when present, must allow
///   digitalSignature or keyAgreement (OpenSSL's `ssl_client` purpose).
/// * CRLs as the server sets them (be-secure-openssl.c sets
///   X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL whenever
///   ssl_crl_file or ssl_crl_dir is set): every certificate of the chain
///   below the trust anchor is checked, a certificate whose issuer has no
///   CRL fails ("unable to get certificate CRL"), as does an expired CRL;
///   with no CRL at all every client certificate fails. The server's
///   OpenSSL looks CRLs up in ssl_crl_dir per verification, so this lists
///   the directory at each client certificate (names, mtimes, sizes) and
///   rebuilds the rustls verifier when that listing changed.
#[derive(Debug)]
struct ClientVerifier {
    /// Over every CA file certificate, no CRLs: root hints and handshake
    /// signatures.
    base: Arc<dyn ClientCertVerifier>,
    /// The accepted anchors; None when none is left (every chain fails).
    roots: Option<Arc<RootCertStore>>,
    /// Non-self-signed CA file certificates, offered as intermediates.
    extra: Vec<CertificateDer<'static>>,
    /// The anchors' DER, for end certificates webpki refuses
    /// ([`nextgres_core::client_chain`]).
    anchors: Vec<CertificateDer<'static>>,
    /// Self-signed CA file certificates that are no CA: each trusts
    /// itself only, as in OpenSSL (webpki would trust what its key signs).
    trusted_leaves: Vec<CertificateDer<'static>>,
    /// Some anchor has a pathLenConstraint, which webpki does not apply to
    /// anchors: a chain webpki accepts is checked again here.
    path_limited: bool,
    /// The CRLs both verifiers use and the ssl_crl_dir listing they were
    /// read at ([`ClientVerifier::crls_now`]).
    crls: std::sync::Mutex<Option<(CrlListing, Arc<Vec<CertificateRevocationListDer<'static>>>)>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    revocation: Option<Revocation>,
    /// The directory listing the cached verifier was built from.
    cache: std::sync::Mutex<Option<(CrlListing, Arc<dyn ClientCertVerifier>)>>,
}

impl ClientVerifier {
    /// The chain of `end` as [`nextgres_core::client_chain::verify`]
    /// checks it (v1 end certificates, which webpki refuses; a trusted
    /// self-signed one, with `anchors` itself; a chain webpki accepted below
    /// a path-limited anchor), with the CRLs the rustls verifier would use.
    fn verify_legacy(
        &self,
        end: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        anchors: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        use nextgres_core::client_chain::ChainError as C;
        use rustls::CertificateError as E;
        let crls = match &self.revocation {
            Some(r) => Some(self.crls_now(r).map_err(|_| rustls::Error::InvalidCertificate(E::UnknownRevocationStatus))?.1),
            None => None,
        };
        let crl_refs: Option<Vec<&[u8]>> = crls.as_ref().map(|v| v.iter().map(|c| c.as_ref()).collect());
        let inter: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        let anchors: Vec<&[u8]> = anchors.iter().map(|c| c.as_ref()).collect();
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let algs = self.provider.signature_verification_algorithms.all;
        nextgres_core::client_chain::verify(end, &inter, &anchors, crl_refs.as_deref(), now, algs).map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                C::BadEncoding => E::BadEncoding,
                C::UnknownIssuer => E::UnknownIssuer,
                C::BadSignature => E::BadSignature,
                C::Expired => E::Expired,
                C::NotValidYet => E::NotValidYet,
                C::InvalidPurpose => E::InvalidPurpose,
                C::UnhandledCriticalExtension => E::UnhandledCriticalExtension,
                C::Revoked => E::Revoked,
                C::UnknownRevocationStatus => E::UnknownRevocationStatus,
                C::ExpiredRevocationList => E::ExpiredRevocationList,
            })
        })?;
        Ok(ClientCertVerified::assertion())
    }

    /// ssl_crl_file's CRLs and ssl_crl_dir's as they are now, read again
    /// only when the directory listing changed, with that listing (both
    /// verifiers' CRLs come from here).
    fn crls_now(&self, r: &Revocation) -> Result<(CrlListing, Arc<Vec<CertificateRevocationListDer<'static>>>), String> {
        let listing = match r.dir.as_ref() {
            Some(d) => crl_dir_files(std::fs::read_dir(d).map_err(|e| e.to_string())?),
            None => Vec::new(),
        };
        let mut cache = self.crls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, v)) = cache.as_ref() {
            if *l == listing {
                return Ok((listing, v.clone()));
            }
        }
        let mut crls = r.file_crls.clone();
        crls.extend(load_crls(None, r.dir.as_deref())?);
        let v = Arc::new(crls);
        *cache = Some((listing.clone(), v.clone()));
        Ok((listing, v))
    }

    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        };
        // A directory or CRL file that cannot be read leaves the status
        // unknown, as OpenSSL's lookup that finds no CRL (unknown_ca alert).
        let unknown = || rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownRevocationStatus);
        let (listing, crls) = match &self.revocation {
            Some(r) => {
                let (listing, crls) = self.crls_now(r).map_err(|_| unknown())?;
                (listing, Some(crls))
            }
            None => (Vec::new(), None),
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((l, v)) = cache.as_ref() {
            if *l == listing {
                return Ok(v.clone());
            }
        }
        let mut builder = WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone()).allow_unauthenticated();
        if let Some(crls) = crls {
            if crls.is_empty() {
                // No CRL for any issuer: OpenSSL fails every chain.
                return Err(unknown());
            }
            builder = builder.with_crls(crls.iter().cloned()).enforce_revocation_expiration();
        }
        let v = builder.build().map_err(|_| unknown())?;
        *cache = Some((listing, v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.base.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.base.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.base.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain: Vec<CertificateDer<'_>> = intermediates.to_vec();
        chain.extend(self.extra.iter().cloned());
        let verified = if let Some(me) = self.trusted_leaves.iter().find(|c| c.as_ref() == end_entity.as_ref()) {
            self.verify_legacy(end_entity, &[], std::slice::from_ref(me), now)
        } else if self.roots.is_none() {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))
        } else if nextgres_core::client_chain::webpki_refuses(end_entity) {
            self.verify_legacy(end_entity, &chain, &self.anchors, now)
        } else {
            let v = self.current().and_then(|v| v.verify_client_cert(end_entity, &chain, now));
            match v {
                Ok(_) if self.path_limited => self.verify_legacy(end_entity, &chain, &self.anchors, now),
                other => other,
            }
        };
        // OpenSSL reports a chain it cannot build (unknown_ca) before the
        // purpose (unsupported_certificate), and that before the rest.
        if let Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)) = verified {
            return verified;
        }
        match nextgres_core::cert::client_key_usage_ok(end_entity) {
            Ok(true) => verified,
            Ok(false) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose)),
            Err(_) => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.base.verify_tls12_signature(message, cert, dss) {
            // A v1 certificate webpki cannot read: its key, by the scheme's
            // algorithms (any that fits the key, as rustls tries them).
            Err(e) if nextgres_core::client_chain::webpki_refuses(cert) => {
                let algs = &self.provider.signature_verification_algorithms;
                let candidates = algs.mapping.iter().find(|(s, _)| *s == dss.scheme).map(|(_, a)| *a).ok_or(e)?;
                if nextgres_core::client_chain::key_signed(cert, message, dss.signature(), candidates) {
                    Ok(HandshakeSignatureValid::assertion())
                } else {
                    Err(rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature))
                }
            }
            other => other,
        }
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        match self.base.verify_tls13_signature(message, cert, dss) {
            Err(e) if nextgres_core::client_chain::webpki_refuses(cert) => {
                let spki = nextgres_core::client_chain::subject_public_key_info(cert).ok_or(e)?;
                rustls::crypto::verify_tls13_signature_with_raw_key(
                    message,
                    &rustls_pki_types::SubjectPublicKeyInfoDer::from(spki),
                    dss,
                    &self.provider.signature_verification_algorithms,
                )
            }
            other => other,
        }
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.base.supported_verify_schemes()
    }
}

/// The rustls configuration from files and version bounds.
pub fn build(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
    ca_file: Option<&std::path::Path>,
    revocation: Option<Revocation>,
    min: &str,
    max: &str,
) -> Result<Arc<Loaded>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("could not load server certificate file \"{}\": {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("could not load server certificate file \"{}\": no certificate in it", cert_file.display()));
    }
    // A lone certificate goes out with the issuers the server's OpenSSL
    // adds from ssl_ca_file (its automatic chain), so a client that trusts
    // only the root verifies the pooler as it verifies the server.
    // ssl_ca_file is read once, for that chain and for the client
    // verifier below (where a file that does not load is the error).
    let cas: Option<Result<Vec<CertificateDer<'static>>, String>> = ca_file.map(|ca| {
        CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("could not load root certificate file \"{}\": {e}", ca.display()))
    });
    let mut certs = certs;
    if let (1, Some(Ok(cas))) = (certs.len(), &cas) {
        let refs: Vec<&[u8]> = cas.iter().map(|c| c.as_ref()).collect();
        for i in nextgres_core::cert::auto_chain(&certs[0], &refs) {
            certs.push(cas[i].clone());
        }
    }
    let end_point = nextgres_core::cert::server_end_point(&certs[0]).ok().map(Arc::from);
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("could not load private key file \"{}\": {e}", key_file.display()))?;
    let versions = protocol_versions(min, max)?;
    let verifier: Option<(Arc<dyn ClientCertVerifier>, Arc<dyn ClientCertVerifier>)> = match (ca_file, cas) {
        // As the server with ssl_ca_file: ask for a client certificate,
        // verify one if sent, accept a client without one.
        (Some(ca), Some(cas)) => {
            let mut all = RootCertStore::empty();
            let mut roots = RootCertStore::empty();
            let mut extra = Vec::new();
            let mut anchors = Vec::new();
            let mut trusted_leaves = Vec::new();
            let mut path_limited = false;
            let cas = cas?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
            for c in cas {
                all.add(c.clone()).map_err(|e| format!("could not load root certificate file \"{}\": {e}", ca.display()))?;
                match nextgres_core::cert::anchor_problem(&c, now) {
                    None => match nextgres_core::client_chain::anchor_use(&c) {
                        Some(u) if u.issues => {
                            roots.add(c.clone()).map_err(|e| format!("could not load root certificate file \"{}\": {e}", ca.display()))?;
                            path_limited |= u.path_limited;
                            anchors.push(c);
                        }
                        _ => trusted_leaves.push(c),
                    },
                    Some(why) => {
                        let subject = nextgres_core::cert::subject_names(&c).ok().and_then(|n| n.dn).unwrap_or_default();
                        log::warn!("certificate \"{subject}\" in \"{}\" is not used as a trust anchor: {why}", ca.display());
                        if why.starts_with("not self-signed") {
                            extra.push(c);
                        }
                    }
                }
            }
            let base = WebPkiClientVerifier::builder_with_provider(Arc::new(all), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("could not load root certificate file \"{}\": {e}", ca.display()))?;
            let roots = (!roots.is_empty()).then(|| Arc::new(roots));
            // For the restart fallback: every client certificate refused.
            let refuse_all = Arc::new(ClientVerifier {
                base: base.clone(),
                roots: None,
                extra: Vec::new(),
                anchors: Vec::new(),
                trusted_leaves: Vec::new(),
                path_limited: false,
                crls: std::sync::Mutex::new(None),
                provider: provider.clone(),
                revocation: None,
                cache: std::sync::Mutex::new(None),
            });
            Some((
                Arc::new(ClientVerifier {
                    base,
                    roots,
                    extra,
                    anchors,
                    trusted_leaves,
                    path_limited,
                    crls: std::sync::Mutex::new(None),
                    provider: provider.clone(),
                    revocation,
                    cache: std::sync::Mutex::new(None),
                }),
                refuse_all,
            ))
        }
        _ => None,
    };
    let finish = |verifier: Option<Arc<dyn ClientCertVerifier>>| -> Result<ServerConfig, String> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("TLS versions: {e}"))?;
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| format!("server certificate and key in \"{}\" and \"{}\": {e}", cert_file.display(), key_file.display()))?;
        // The server turns off session caching and tickets
        // (be-secure-openssl.c: SSL_SESS_CACHE_OFF, SSL_OP_NO_TICKET).
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        // PostgreSQL 17+ clients offer ALPN "postgresql"; answer it as the server
        // does (a client offering only other protocols fails the handshake with
        // no_application_protocol). 15 and 16 have no ALPN at all.
        if crate::pg::glue::server_has_direct_tls() {
            config.alpn_protocols = vec![b"postgresql".to_vec()];
        }
        Ok(config)
    };
    let config = finish(verifier.as_ref().map(|v| v.0.clone()))?;
    let refusing_certs = match verifier {
        Some((_, refuse_all)) => Some(Arc::new(finish(Some(refuse_all))?)),
        None => None,
    };
    Ok(Arc::new(Loaded { config: Arc::new(config), refusing_certs, end_point, ca_loaded: ca_file.is_some() }))
}

/// Starts the relay for a client that sent SSLRequest (or direct TLS):
/// `tcp` is the client's socket, `pair` the relay's end of the socketpair
/// whose other end the pooler keeps (`super::relay`). `answer`: the byte the
/// relay sends first ('S' to an SSLRequest; None for direct TLS). When no
/// thread can be started (EAGAIN: thread or memory limits) nothing was sent
/// and `tcp` comes back with the error, so the client can still be refused
/// in plaintext.
/// `direct`: the first bytes of a direct TLS handshake, already read from
/// `tcp`; such a client must negotiate ALPN `postgresql` or is closed
/// after the handshake, as the server closes it (backend_startup.c
/// ProcessSSLStartup(): "received direct SSL connection request without
/// ALPN protocol negotiation extension", logged only).
pub fn spawn_relay(
    loaded: &Loaded,
    tcp: TcpStream,
    pair: UnixStream,
    info: TlsInfo,
    direct: Option<Vec<u8>>,
    answer: Option<u8>,
) -> Result<Arc<RelayCtl>, (TcpStream, std::io::Error)> {
    let conn = match ServerConnection::new(loaded.config.clone()) {
        Ok(c) => c,
        Err(e) => return Err((tcp, std::io::Error::other(e.to_string()))),
    };
    let handshake = Some(Handshake::new());
    let r = Relay::new(conn, tcp, pair, info, handshake, loaded.end_point.clone(), loaded.ca_loaded, direct, Vec::new());
    relay::start(r, answer).map_err(|(r, e)| (r.into_tcp(), e))
}

/// Starts a relay again for a parked client ([`Parked`]) whose plaintext
/// `initial` (decrypted by the pooler) is to reach the pooler through the
/// new `pair` first. When it cannot be started the connection comes back
/// with the error (the pooler then sends its FATAL over TLS itself).
pub fn resume_relay(
    parked: Parked,
    pair: UnixStream,
    info: TlsInfo,
    initial: Vec<u8>,
) -> Result<Arc<RelayCtl>, (Parked, std::io::Error)> {
    let r = Relay::new(parked.conn, parked.tcp, pair, info, None, None, false, None, initial);
    relay::start(r, None).map_err(|(r, e)| (r.into_parked(), e))
}

/// Control shared by the pooler and one relay: how a relay parks.
///
/// Parking (issue 12, acceptance 5): an idle TLS client needs no relay and
/// no socketpair. The pooler sets `park` and then shuts its own end of the
/// pair for writing; the relay, reading EOF from the pair with `park` set,
/// puts its connection in `parked` instead of closing, and ends (its pair
/// end closes: the pooler reads EOF and takes it).
#[derive(Default)]
pub struct RelayCtl {
    pub(super) park: AtomicBool,
    /// Set by the relay before it waits with nothing unsent either way
    /// (no TLS for the client, no plaintext for the pair): only such a
    /// relay is asked to park, so it reads the pooler's EOF at once. One
    /// with unsent TLS (a client that does not read its result) would only
    /// read it once the client reads.
    pub(super) quiet: AtomicBool,
    pub(super) parked: Mutex<Option<Parked>>,
}

impl RelayCtl {
    /// Asks the relay to park; the caller then shuts its pair end for writing.
    pub fn request_park(&self) {
        self.park.store(true, Ordering::SeqCst);
    }

    /// The relay was asleep with nothing unsent when it last looked.
    pub fn quiet(&self) -> bool {
        self.quiet.load(Ordering::SeqCst)
    }

    /// What a parked relay left; None when it ended otherwise (the client
    /// left, bad TLS).
    pub fn take_parked(&self) -> Option<Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A TLS client without a relay: the rustls session (handshake done, all
/// TLS output handed to the socket or still in `conn`) and the client's
/// TCP socket (non-blocking).
pub struct Parked {
    pub conn: ServerConnection,
    pub tcp: TcpStream,
    /// Plaintext the relay had decrypted but not yet written to the pair.
    pub plaintext: Vec<u8>,
}

pub use super::relay::{CLOSE_WITHIN, PAIR_BACKLOG};

/// The session as `pg_stat_ssl` shows a direct OpenSSL one
/// (be-secure-openssl.c `be_tls_get_version`, `_cipher`, `_cipher_bits`,
/// `_peer_subject_name`, `_peer_serial`, `_peer_issuer_name`).
pub(super) fn describe(conn: &ServerConnection, peer_cert: Option<&[u8]>) -> TlsStatus {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(v) => format!("{v:?}"),
        None => "?".to_string(),
    };
    let suite = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
    // rustls' name and no bits for a suite the table lacks (none today).
    let (cipher, bits) = match nextgres_core::tls::openssl_cipher(&suite) {
        Some((name, bits)) => (name.to_string(), bits),
        None => (suite, 0),
    };
    let names = peer_cert.and_then(|d| nextgres_core::cert::ssl_status_names(d).ok()).unwrap_or_default();
    // The server keeps NAMEDATALEN - 1 bytes of each DN (backend_status.c
    // pgstat_bestart()); every ATTACH carries these, so no more.
    let cut = |s: &str| nextgres_core::cert::cut_at_char(s, 63).to_string();
    TlsStatus {
        bits,
        version,
        cipher,
        client_dn: cut(&names.client_dn),
        client_serial: names.client_serial,
        issuer_dn: cut(&names.issuer_dn),
    }
}

/// Pooler side of a parked client: moves `outbuf` (plaintext) into rustls
/// and writes TLS to the non-blocking socket until it would block. Err when
/// the socket is broken. What is left stays in `outbuf` / rustls
/// ([`parked_pending`]) for the next EPOLLOUT.
pub fn parked_flush(conn: &mut ServerConnection, tcp: &mut TcpStream, outbuf: &mut Vec<u8>) -> std::io::Result<()> {
    loop {
        if !outbuf.is_empty() {
            // rustls takes up to its buffer limit (64 KiB unsent).
            let n = conn.writer().write(outbuf)?;
            outbuf.drain(..n);
        }
        if !conn.wants_write() {
            return Ok(());
        }
        match conn.write_tls(tcp) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Output a parked client still has to take.
pub fn parked_pending(conn: &ServerConnection, outbuf: &[u8]) -> bool {
    !outbuf.is_empty() || conn.wants_write()
}

/// What a parked client's readable socket brought: the pooler reads TLS
/// inline (a few bytes: the client is idle) and answers what rustls wants
/// answered (KeyUpdate), non-blocking.
pub enum ParkedInput {
    /// Nothing complete yet (or only TLS housekeeping).
    Nothing,
    /// Plaintext: the client's next message; it needs its relay again.
    Plaintext(Vec<u8>),
    /// EOF, close_notify or a broken socket: the client left.
    Gone,
    /// Bad TLS input; the alert rustls queued was sent (best effort).
    Bad,
}

/// TLS bytes (4 KiB reads) a parked client may send that bring no
/// plaintext before it is given a relay thread again: an idle client's
/// housekeeping (a KeyUpdate now and then) stays far below it.
pub const PARKED_HOUSEKEEPING: usize = 16 * 1024;

/// Reads one batch of TLS from a parked client's socket; with the number
/// of TLS bytes read.
pub fn parked_read(conn: &mut ServerConnection, tcp: &mut TcpStream) -> (ParkedInput, usize) {
    let n = match conn.read_tls(tcp) {
        Ok(0) => return (ParkedInput::Gone, 0),
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => return (ParkedInput::Nothing, 0),
        Err(_) => return (ParkedInput::Gone, 0),
    };
    if conn.process_new_packets().is_err() {
        let _ = conn.write_tls(tcp);
        return (ParkedInput::Bad, n);
    }
    let input = match parked_plaintext(conn) {
        (p, _) if !p.is_empty() => ParkedInput::Plaintext(p),
        (_, false) => ParkedInput::Nothing,
        (_, true) => ParkedInput::Gone,
    };
    (input, n)
}

/// The plaintext rustls holds, and whether the client's close_notify (or
/// a broken session) came after it: a last message sent with the close is
/// still the client's and is passed on.
pub fn parked_plaintext(conn: &mut ServerConnection) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let closed = plaintext_into(conn, &mut [0u8; 4096], &mut out);
    (out, closed)
}

/// Appends the plaintext rustls holds to `out` (through `buf`); true when
/// the client's close_notify (or a broken session) came after it. Shared by
/// the pooler's parked clients and the relays.
pub fn plaintext_into(conn: &mut ServerConnection, buf: &mut [u8], out: &mut Vec<u8>) -> bool {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// A parked client closed by the pooler: what is unsent, close_notify,
/// all non-blocking and best effort (an idle client's socket buffer is
/// empty; the caller then sends FIN).
pub fn parked_close(conn: &mut ServerConnection, tcp: &mut TcpStream, outbuf: &mut Vec<u8>) {
    if parked_flush(conn, tcp, outbuf).is_err() {
        return;
    }
    conn.send_close_notify();
    let _ = parked_flush(conn, tcp, outbuf);
}
