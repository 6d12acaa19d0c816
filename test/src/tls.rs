//! TLS pieces shared by the suites that run over TLS (`tests/tls.rs`,
//! `tests/session_state.rs`): a test CA and server certificate made with the
//! `openssl` CLI, `ssl = on` the way a DBA turns it on, the skip on the one
//! build without OpenSSL, a rustls client configuration trusting the test
//! CA, and a rustls connector for rust-postgres (`sslmode=require` clients).

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Command;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::{Client, Socket};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{wait_until, Cluster};

/// True (after printing why) when `pg`'s build has no OpenSSL, so `ssl = on`
/// is impossible and a TLS test has nothing to run against. Only 16's build
/// (the pgserver wheel) lacks OpenSSL: a skip on any other version fails.
pub fn skip_without_openssl(pg: &Cluster) -> bool {
    if pg.install().has_openssl() {
        return false;
    }
    eprintln!(
        "SKIPPED: PostgreSQL {} here is built without OpenSSL (ssl = on impossible, so nothing to compare with); the OpenSSL builds (15, 17, 18) run it",
        pg.pg_major()
    );
    assert_eq!(pg.pg_major(), 16, "PostgreSQL {} here is built without OpenSSL; only 16 may skip", pg.pg_major());
    true
}

/// Runs the `openssl` CLI in `dir`; panics with its stderr on failure.
#[track_caller]
pub fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running openssl (the openssl CLI must be installed)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA `NAME-ca.crt` in the test directory and a server certificate it
/// signed (for 127.0.0.1 and localhost) installed in the data directory as
/// `CERT` and `CERT`'s `.key`, owned by the server's OS user with mode 0600
/// (the server refuses a key others can read). Returns the CA file.
pub fn make_certs(pg: &Cluster, name: &str, cert: &str) -> PathBuf {
    let dir = pg.dir().to_path_buf();
    let ca_key = format!("{name}-ca.key");
    let ca_crt = format!("{name}-ca.crt");
    openssl(
        &["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-days", "2", "-subj", &format!("/CN=nextgres test CA {name}"), "-keyout", &ca_key, "-out", &ca_crt],
        &dir,
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").expect("ext.cnf");
    let (key, csr, crt) = (format!("{name}-server.key"), format!("{name}-server.csr"), format!("{name}-server.crt"));
    openssl(&["req", "-new", "-nodes", "-newkey", "rsa:2048", "-subj", "/CN=localhost", "-keyout", &key, "-out", &csr], &dir);
    openssl(
        &["x509", "-req", "-in", &csr, "-CA", &ca_crt, "-CAkey", &ca_key, "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", &crt],
        &dir,
    );
    install_cert(pg, &dir.join(&crt), &dir.join(&key), cert);
    dir.join(ca_crt)
}

/// Copies a certificate and key into `pg`'s data directory as `cert` and
/// `cert` with `.key` for `.crt`.
pub fn install_cert(pg: &Cluster, crt: &Path, key: &Path, cert: &str) {
    let owner = crate::env::OsUser::for_server().expect("server OS user");
    let data = pg.data_dir();
    for (from, to) in [(crt, cert.to_string()), (key, cert.replace(".crt", ".key"))] {
        let p = data.join(to);
        std::fs::copy(from, &p).expect("copy certificate");
        if let Some(u) = &owner {
            std::os::unix::fs::chown(&p, Some(u.uid), Some(u.gid)).expect("chown");
        }
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
}

/// Certificate (CA "one", `server.crt`/`server.key`), `ssl = on`, restart:
/// the normal way a DBA turns TLS on. Returns the CA file.
pub fn ssl_on(pg: &Cluster) -> PathBuf {
    let ca = make_certs(pg, "one", "server.crt");
    pg.append_conf("ssl = on").expect("conf");
    pg.append_conf("ssl_cert_file = 'server.crt'").expect("conf");
    pg.append_conf("ssl_key_file = 'server.key'").expect("conf");
    pg.restart().expect("restart with ssl = on");
    ca
}

/// A rustls client configuration (ring provider, TLS 1.2 and 1.3) that
/// trusts the CA in the PEM file `ca` and sends no client certificate.
pub fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA pem")).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// How a test's rust-postgres clients reach the pooler, for suites that run
/// the same steps in plaintext and over TLS.
#[derive(Clone, Debug)]
pub enum Transport {
    Plain,
    /// `sslmode=require` over rustls, the server verified against this CA
    /// (any path before [`transport_ready`] makes the CA).
    Tls(PathBuf),
}

impl Transport {
    /// A TLS transport whose CA [`transport_ready`] has yet to make.
    pub fn tls() -> Transport {
        Transport::Tls(PathBuf::new())
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// Logs in with `cfg` over this transport (`sslmode=require` for TLS,
    /// so an 'N' to the SSLRequest fails instead of falling back).
    pub fn connect(&self, cfg: postgres::Config) -> Result<Client, postgres::Error> {
        match self {
            Transport::Plain => cfg.connect(postgres::NoTls),
            Transport::Tls(ca) => {
                let mut cfg = cfg;
                cfg.ssl_mode(postgres::config::SslMode::Require);
                cfg.connect(RustlsConnector::new(ca))
            }
        }
    }
}

/// `Plain` as is. For `Tls`: None after printing why on a build without
/// OpenSSL (16 only, see [`skip_without_openssl`]); otherwise [`ssl_on`]
/// (certificates, `ssl = on`, restart) and a wait, bounded by `settle`, until
/// a TLS login of `user` to `db` through the restarted pooler works; returns
/// `Tls` with the test CA.
pub fn transport_ready(pg: &Cluster, transport: Transport, user: &str, db: &str, settle: std::time::Duration) -> Option<Transport> {
    if !transport.is_tls() {
        return Some(transport);
    }
    if skip_without_openssl(pg) {
        return None;
    }
    let tls = Transport::Tls(ssl_on(pg));
    let ok = wait_until(settle, || tls.connect(pg.tcp(user, db).config()).is_ok());
    assert!(ok, "no TLS login through the pooler within {settle:?} after the restart with ssl = on");
    Some(tls)
}

/// rust-postgres TLS over rustls, verifying the server against the test CA
/// (libpq's `verify-full` for the host connected to). Use with
/// `Config::ssl_mode(SslMode::Require)` so a server answering 'N' fails the
/// login instead of falling back to plaintext. No channel binding is offered
/// (SCRAM-PLUS is tested with libpq in `tests/tls.rs`).
#[derive(Clone)]
pub struct RustlsConnector(Arc<rustls::ClientConfig>);

impl RustlsConnector {
    /// Trusts the CA in the PEM file `ca`.
    pub fn new(ca: &Path) -> RustlsConnector {
        RustlsConnector(client_config(ca))
    }
}

/// One connection's handshake: the server name rust-postgres connects to.
pub struct RustlsConnect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

/// The client side of an established TLS session.
pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl MakeTlsConnect<Socket> for RustlsConnector {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        let name = rustls::pki_types::ServerName::try_from(domain)?.to_owned();
        Ok(RustlsConnect { config: self.0.clone(), name })
    }
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move { connector.connect(self.name, stream).await.map(RustlsStream) })
    }
}

impl TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}
