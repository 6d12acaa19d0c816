//! Connection parameters shared by every client the tests use.
//!
//! One [`ConnInfo`] feeds rust-postgres, psql and pgbench alike, so a test
//! can say "this user, this database, over TCP" once and try it with each
//! client. The password never goes into the libpq string: psql and pgbench
//! get it through `PGPASSWORD`, as a user would.

use std::time::Duration;

use postgres::config::SslMode;
use postgres::{Client, Config, NoTls};

/// Seconds a client waits for a connection before giving up (libpq's
/// `connect_timeout`, rust-postgres' `connect_timeout`).
pub const CONNECT_TIMEOUT_SECS: u64 = 10;

/// Where and as whom to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// `127.0.0.1` for TCP, or the socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<String>,
    pub application_name: Option<String>,
    pub connect_timeout_secs: u64,
}

impl ConnInfo {
    pub fn new(host: impl Into<String>, port: u16, user: &str, dbname: &str) -> ConnInfo {
        ConnInfo {
            host: host.into(),
            port,
            user: user.into(),
            dbname: dbname.into(),
            password: None,
            application_name: None,
            connect_timeout_secs: CONNECT_TIMEOUT_SECS,
        }
    }

    /// Same, with a password.
    pub fn password(mut self, password: impl Into<String>) -> ConnInfo {
        self.password = Some(password.into());
        self
    }

    /// Same, with an optional password (keeps call sites short).
    pub fn maybe_password(mut self, password: Option<&str>) -> ConnInfo {
        self.password = password.map(str::to_string);
        self
    }

    /// Same, with `application_name` set (visible in pg_stat_activity).
    pub fn application_name(mut self, name: impl Into<String>) -> ConnInfo {
        self.application_name = Some(name.into());
        self
    }

    /// Unix-domain socket rather than TCP.
    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// libpq keyword/value string, without the password
    /// (`host=127.0.0.1 port=.. user=.. dbname=.. sslmode=disable`).
    pub fn conninfo(&self) -> String {
        let mut parts = vec![
            kv("host", &self.host),
            kv("port", &self.port.to_string()),
            kv("user", &self.user),
            kv("dbname", &self.dbname),
            kv("connect_timeout", &self.connect_timeout_secs.to_string()),
        ];
        if !self.is_unix() {
            parts.push(kv("sslmode", "disable"));
        }
        if let Some(a) = &self.application_name {
            parts.push(kv("application_name", a));
        }
        parts.join(" ")
    }

    /// libpq string including `password=` (for tools that only take a string).
    pub fn conninfo_with_password(&self) -> String {
        match &self.password {
            Some(p) => format!("{} {}", self.conninfo(), kv("password", p)),
            None => self.conninfo(),
        }
    }

    /// `postgresql://` URL, password included when set.
    pub fn url(&self) -> String {
        let auth = match &self.password {
            Some(p) => format!("{}:{}", pct(&self.user), pct(p)),
            None => pct(&self.user),
        };
        if self.is_unix() {
            format!(
                "postgresql://{auth}@/{}?host={}&port={}",
                pct(&self.dbname),
                pct(&self.host),
                self.port
            )
        } else {
            format!(
                "postgresql://{auth}@{}:{}/{}?sslmode=disable",
                self.host,
                self.port,
                pct(&self.dbname)
            )
        }
    }

    /// rust-postgres configuration for these parameters.
    pub fn config(&self) -> Config {
        let mut c = Config::new();
        if self.is_unix() {
            c.host_path(&self.host);
        } else {
            c.host(&self.host);
        }
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .ssl_mode(SslMode::Disable)
            .connect_timeout(Duration::from_secs(self.connect_timeout_secs));
        if let Some(p) = &self.password {
            c.password(p);
        }
        if let Some(a) = &self.application_name {
            c.application_name(a);
        }
        c
    }

    /// Connects with rust-postgres (the sync "Rust driver"), no TLS.
    pub fn connect(&self) -> Result<Client, postgres::Error> {
        self.config().connect(NoTls)
    }
}

/// `key='value'` with libpq quoting.
fn kv(key: &str, value: &str) -> String {
    format!(
        "{key}='{}'",
        value.replace('\\', "\\\\").replace('\'', "\\'")
    )
}

/// Percent-encodes everything but unreserved URL characters.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_quotes_and_omits_password() {
        let c = ConnInfo::new("127.0.0.1", 5555, "o'brien", "db").password("s3cret");
        let s = c.conninfo();
        assert!(s.contains("user='o\\'brien'"), "{s}");
        assert!(s.contains("sslmode='disable'"), "{s}");
        assert!(!s.contains("s3cret"), "{s}");
        assert!(c.conninfo_with_password().contains("password='s3cret'"));
    }

    #[test]
    fn urls() {
        let tcp = ConnInfo::new("127.0.0.1", 5555, "u", "d b").password("p@ss");
        assert_eq!(
            tcp.url(),
            "postgresql://u:p%40ss@127.0.0.1:5555/d%20b?sslmode=disable"
        );
        let unix = ConnInfo::new("/tmp/x", 5555, "u", "d");
        assert!(unix.is_unix());
        assert_eq!(unix.url(), "postgresql://u@/d?host=%2Ftmp%2Fx&port=5555");
    }
}
