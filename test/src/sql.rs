//! Small SQL helpers: quoting, roles, and what pg_stat_activity says.
//!
//! Pooling tests assert on how many server backends exist for whom, so the
//! activity view gets typed accessors instead of ad-hoc queries per test.

use postgres::Client;

/// Quotes an identifier (`quote_ident`), always.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal (`quote_literal`), `E''` form when it has a backslash.
pub fn quote_literal(s: &str) -> String {
    if s.contains('\\') {
        format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

/// How a role's password is stored (`password_encryption`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordEncryption {
    ScramSha256,
    Md5,
}

impl PasswordEncryption {
    /// The GUC value.
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordEncryption::ScramSha256 => "scram-sha-256",
            PasswordEncryption::Md5 => "md5",
        }
    }

    /// How `pg_authid.rolpassword` starts for this encryption.
    pub fn hash_prefix(self) -> &'static str {
        match self {
            PasswordEncryption::ScramSha256 => "SCRAM-SHA-256$",
            PasswordEncryption::Md5 => "md5",
        }
    }
}

/// Creates a LOGIN role whose password is stored with `enc`.
pub fn create_role(
    c: &mut Client,
    name: &str,
    password: &str,
    enc: PasswordEncryption,
) -> Result<(), postgres::Error> {
    // SET (not SET LOCAL) is fine: the admin connection is throwaway.
    c.batch_execute(&format!(
        "SET password_encryption = '{}'; CREATE ROLE {} LOGIN PASSWORD {};",
        enc.as_str(),
        quote_ident(name),
        quote_literal(password)
    ))
}

/// One row of pg_stat_activity.
#[derive(Clone, Debug)]
pub struct Activity {
    pub pid: i32,
    pub usename: Option<String>,
    pub datname: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub state: Option<String>,
    pub backend_type: Option<String>,
    pub query: Option<String>,
}

/// All of pg_stat_activity except the querying connection itself.
pub fn activity(c: &mut Client) -> Result<Vec<Activity>, postgres::Error> {
    let rows = c.query(
        "SELECT pid, usename::text, datname::text, application_name, client_addr::text,
                state, backend_type, query
           FROM pg_stat_activity
          WHERE pid <> pg_backend_pid()
          ORDER BY pid",
        &[],
    )?;
    Ok(rows
        .iter()
        .map(|r| Activity {
            pid: r.get(0),
            usename: r.get(1),
            datname: r.get(2),
            application_name: r.get(3),
            client_addr: r.get(4),
            state: r.get(5),
            backend_type: r.get(6),
            query: r.get(7),
        })
        .collect())
}

impl Activity {
    /// Matches a user and database filter (`None` matches anything).
    pub fn matches(&self, user: Option<&str>, db: Option<&str>) -> bool {
        user.is_none_or(|u| self.usename.as_deref() == Some(u))
            && db.is_none_or(|d| self.datname.as_deref() == Some(d))
    }
}
