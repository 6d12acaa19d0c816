//! Per-pool settings from `pg_db_role_setting`: what `ALTER DATABASE ... SET
//! nextgres.x`, `ALTER ROLE ... SET nextgres.x`, `ALTER ROLE ... IN DATABASE
//! ... SET nextgres.x` and `ALTER ROLE ALL ... SET` stored, resolved for one
//! (database, role) pool with the server's own precedence (`process_settings`
//! in utils/init/postinit.c applies, from lowest to highest: all roles in all
//! databases, the database, the role, the role in the database). A value not
//! set at any of these levels falls back to postgresql.conf (the caller's
//! global), so `RESET` returns a pool to the global setting.
//!
//! Values were validated by the server when they were stored (the GUC's own
//! parser runs for `ALTER ... SET`), so a value this module cannot parse is
//! simply ignored (`Entry::parse` returns None).

/// One `name=value` item of a `pg_db_role_setting.setconfig` array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// `setdatabase`: None for 0 (every database).
    pub database: Option<String>,
    /// `setrole`: None for 0 (every role).
    pub role: Option<String>,
    /// Setting name without the `nextgres.` prefix, lower case.
    pub name: String,
    /// The stored value text.
    pub value: String,
}

/// Settings the server reports in ParameterStatus (GUC_REPORT, guc_tables.c
/// of 15..18) that `ALTER ROLE / DATABASE ... SET` can give a login, lower
/// case: a login's report is computed from these items as they are now,
/// not from the pool's first backend's login. The others a login reports
/// are fixed (server_version, server_encoding, integer_datetimes) or not
/// settings a role or database can carry (is_superuser,
/// session_authorization, in_hot_standby).
pub const REPORTED: [&str; 9] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "default_transaction_read_only",
    "intervalstyle",
    "scram_iterations",
    "search_path",
    "standard_conforming_strings",
    "timezone",
];

/// The items of `entries` that apply to a login of `role` to `database`,
/// with their level (4: that database and role, 3: the role, 2: the
/// database, 1: every database and role), highest first, as postinit.c
/// process_settings() applies them (the server lets none override a value
/// set at a higher level).
pub fn applicable<'a>(entries: &'a [Entry], database: &str, role: &str) -> Vec<(u8, &'a Entry)> {
    let mut out: Vec<(u8, &Entry)> = entries.iter().filter_map(|e| Some((e.rank(database, role)?, e))).collect();
    out.sort_by(|a, b| b.0.cmp(&a.0));
    out
}

/// `nextgres.pool_mode` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A backend serves a client for one transaction.
    Transaction,
    /// A backend serves a client for its whole connection.
    Session,
    /// No pooling: each client gets a backend logged in for it alone, outside
    /// pool_size, that exits when the client leaves (a direct session).
    Dedicated,
}

/// The settings one pool overrides; None: the global (postgresql.conf) value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolConf {
    /// `nextgres.pool_size`: backends.
    pub pool_size: Option<i32>,
    /// `nextgres.pool_mode`.
    pub pool_mode: Option<Mode>,
    /// `nextgres.query_wait_timeout`: seconds (0: forever).
    pub query_wait_timeout: Option<i32>,
    /// `nextgres.idle_backend_timeout`: seconds (0: never).
    pub idle_backend_timeout: Option<i32>,
    /// `nextgres.min_pool_size`: backends kept logged in.
    pub min_pool_size: Option<i32>,
    /// `nextgres.backend_lifetime`: seconds (0: forever).
    pub backend_lifetime: Option<i32>,
    /// `nextgres.reserve_pool_size`: extra backends.
    pub reserve_pool_size: Option<i32>,
    /// `nextgres.reserve_pool_timeout`: seconds a client waits before they may log in.
    pub reserve_pool_timeout: Option<i32>,
    /// `nextgres.pool_priority`: higher wins a shared limit.
    pub pool_priority: Option<i32>,
    /// `nextgres.max_pinned_backends`: backends (-1: no cap of its own).
    pub max_pinned_backends: Option<i32>,
}

/// Names (without prefix) this module resolves per pool.
pub const PER_POOL: &[&str] =
    &["pool_size", "pool_mode", "query_wait_timeout", "idle_backend_timeout", "min_pool_size", "backend_lifetime", "reserve_pool_size", "reserve_pool_timeout", "pool_priority", "max_pinned_backends"];

impl Entry {
    /// Splits a setconfig item `nextgres.name=value`; None for other prefixes.
    pub fn from_item(database: Option<&str>, role: Option<&str>, item: &str) -> Option<Entry> {
        let (name, value) = item.split_once('=')?;
        let name = name.trim().to_ascii_lowercase();
        let name = name.strip_prefix("nextgres.")?;
        Some(Entry {
            database: database.map(str::to_string),
            role: role.map(str::to_string),
            name: name.to_string(),
            value: value.to_string(),
        })
    }

    /// An item of a setting a login reports ([`REPORTED`]), kept whole
    /// (lower-case name, value as stored); None for any other item.
    pub fn reported_item(database: Option<&str>, role: Option<&str>, item: &str) -> Option<Entry> {
        let (name, value) = item.split_once('=')?;
        let name = name.trim().to_ascii_lowercase();
        REPORTED.contains(&name.as_str()).then(|| Entry {
            database: database.map(str::to_string),
            role: role.map(str::to_string),
            name,
            value: value.to_string(),
        })
    }

    /// Precedence of this entry for a pool of `database` and `role`: None when
    /// it does not apply, else higher wins (as `process_settings` applies them
    /// in order, the last one applied winning).
    fn rank(&self, database: &str, role: &str) -> Option<u8> {
        match (&self.database, &self.role) {
            (Some(d), Some(r)) if d == database && r == role => Some(4),
            (None, Some(r)) if r == role => Some(3),
            (Some(d), None) if d == database => Some(2),
            (None, None) => Some(1),
            _ => None,
        }
    }
}

/// Resolves the entries that apply to the pool of (`database`, `role`).
pub fn resolve(entries: &[Entry], database: &str, role: &str) -> PoolConf {
    let mut best: Vec<(&str, u8, &str)> = Vec::new();
    for e in entries {
        let Some(rank) = e.rank(database, role) else { continue };
        match best.iter_mut().find(|(n, _, _)| *n == e.name) {
            Some(b) if b.1 < rank => *b = (&e.name, rank, &e.value),
            Some(_) => {}
            None => best.push((&e.name, rank, &e.value)),
        }
    }
    let mut conf = PoolConf::default();
    for (name, _, value) in best {
        match name {
            "pool_size" => conf.pool_size = parse_int(value).filter(|v| *v >= 1),
            "pool_mode" => conf.pool_mode = parse_mode(value),
            "query_wait_timeout" => conf.query_wait_timeout = parse_secs(value).filter(|v| *v >= 0),
            "idle_backend_timeout" => conf.idle_backend_timeout = parse_secs(value).filter(|v| *v >= 0),
            "min_pool_size" => conf.min_pool_size = parse_int(value).filter(|v| *v >= 0),
            "backend_lifetime" => conf.backend_lifetime = parse_secs(value).filter(|v| *v >= 0),
            "reserve_pool_size" => conf.reserve_pool_size = parse_int(value).filter(|v| *v >= 0),
            "reserve_pool_timeout" => conf.reserve_pool_timeout = parse_secs(value).filter(|v| *v >= 0),
            "pool_priority" => conf.pool_priority = parse_int(value),
            "max_pinned_backends" => conf.max_pinned_backends = parse_int(value).filter(|v| *v >= -1),
            _ => {}
        }
    }
    conf
}

/// A limit over all pools of one database (`max_db_connections`): set with
/// `ALTER DATABASE db SET` (or `ALTER ROLE ALL SET` for every database);
/// role-specific items do not apply. None: the global value.
pub fn resolve_database_limit(entries: &[Entry], name: &str, database: &str) -> Option<i32> {
    resolve_limit(entries, name, |e| e.role.is_none() && e.database.as_deref().is_none_or(|d| d == database))
}

/// A limit over all pools of one role (`max_user_connections`): set with
/// `ALTER ROLE r SET` (or `ALTER ROLE ALL SET`); database-specific items do
/// not apply. None: the global value.
pub fn resolve_role_limit(entries: &[Entry], name: &str, role: &str) -> Option<i32> {
    resolve_limit(entries, name, |e| e.database.is_none() && e.role.as_deref().is_none_or(|r| r == role))
}

fn resolve_limit(entries: &[Entry], name: &str, applies: impl Fn(&Entry) -> bool) -> Option<i32> {
    // The specific item (database or role named) beats the one for all.
    entries
        .iter()
        .filter(|e| e.name == name && applies(e))
        .max_by_key(|e| e.database.is_some() || e.role.is_some())
        .and_then(|e| parse_int(&e.value))
        .filter(|v| *v >= 0)
}

/// The pooler's shared copy of the reader's rows (database or "", role or
/// "", `name=value` item; the nextgres.* items first), as NUL-ended fields,
/// at most `limit` bytes when it can be. Reported items are taken shortest
/// first, and each (database, role) whose items did not all fit gets a
/// marker row with an empty item ([`Cut`]): one role's outsized value
/// (`ALTER ROLE itself SET search_path = '<260 kB>'`, which any role may
/// run) then leaves only that role's logins without computed values, never
/// another's. Where even the nextgres.* items and the markers do not fit,
/// all rows, for the copy's writer to cut short (then no login's values
/// are known whole).
pub fn copy_bytes(rows: &[(String, String, String)], limit: usize) -> Vec<u8> {
    let size = |r: &(String, String, String)| r.0.len() + r.1.len() + r.2.len() + 3;
    let put = |out: &mut Vec<u8>, r: &(String, String, String)| {
        for f in [&r.0, &r.1, &r.2] {
            out.extend_from_slice(f.as_bytes());
            out.push(0);
        }
    };
    let mut out = Vec::new();
    if rows.iter().map(size).sum::<usize>() <= limit {
        rows.iter().for_each(|r| put(&mut out, r));
        return out;
    }
    let is_ours = |r: &(String, String, String)| r.2.to_ascii_lowercase().starts_with("nextgres.");
    let (ours, mut reported): (Vec<_>, Vec<_>) = rows.iter().partition(|r| is_ours(r));
    let mut pairs: Vec<(&str, &str)> = reported.iter().map(|r| (r.0.as_str(), r.1.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    // Room for a marker of every pair, whichever turn out cut.
    let reserve: usize = pairs.iter().map(|(d, r)| d.len() + r.len() + 3).sum();
    let mut used = ours.iter().map(|r| size(r)).sum::<usize>() + reserve;
    if used > limit {
        rows.iter().for_each(|r| put(&mut out, r));
        return out;
    }
    ours.iter().for_each(|r| put(&mut out, r));
    reported.sort_by_key(|r| size(r));
    let mut cut: Vec<(&str, &str)> = Vec::new();
    for r in reported {
        if used + size(r) <= limit {
            used += size(r);
            put(&mut out, r);
        } else {
            cut.push((&r.0, &r.1));
        }
    }
    cut.sort_unstable();
    cut.dedup();
    for (d, r) in cut {
        put(&mut out, &(d.to_string(), r.to_string(), String::new()));
    }
    out
}

/// A (database, role) level of pg_db_role_setting whose reported items the
/// copy lacks ([`copy_bytes`]'s marker): a login it applies to reports its
/// backend's values for the settings a role or database can set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// None: every database.
    pub database: Option<String>,
    /// None: every role.
    pub role: Option<String>,
}

impl Cut {
    /// Whether the level applies to a login of `role` to `database`.
    pub fn applies(&self, database: &str, role: &str) -> bool {
        self.database.as_deref().is_none_or(|d| d == database) && self.role.as_deref().is_none_or(|r| r == role)
    }
}

/// A plain integer (optionally quoted, surrounding blanks allowed).
pub fn parse_int(v: &str) -> Option<i32> {
    unquote(v).parse().ok()
}

/// `transaction` or `session`, case-insensitive (as the GUC enum parser).
pub fn parse_mode(v: &str) -> Option<Mode> {
    match unquote(v).to_ascii_lowercase().as_str() {
        "transaction" => Some(Mode::Transaction),
        "session" => Some(Mode::Session),
        "dedicated" => Some(Mode::Dedicated),
        _ => None,
    }
}

/// A time in seconds: a bare number is seconds (the GUC's unit), or a number
/// with one of the server's time units (`us`, `ms`, `s`, `min`, `h`, `d`,
/// rounded to the nearest second as `parse_int` in guc.c rounds).
pub fn parse_secs(v: &str) -> Option<i32> {
    let v = unquote(v);
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '-' || c == '.')).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let num: f64 = num.trim().parse().ok()?;
    let mult = match unit.trim() {
        "" | "s" => 1.0,
        "us" => 1e-6,
        "ms" => 1e-3,
        "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return None,
    };
    let secs = (num * mult).round();
    (secs >= i32::MIN as f64 && secs <= i32::MAX as f64).then_some(secs as i32)
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')).unwrap_or(v).trim()
}

#[cfg(test)]
mod tests {
    fn row(d: &str, r: &str, c: &str) -> (String, String, String) {
        (d.to_string(), r.to_string(), c.to_string())
    }

    fn fields(b: &[u8]) -> Vec<String> {
        let mut f: Vec<String> = b.split(|&c| c == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect();
        assert_eq!(f.pop().as_deref(), Some(""), "ends with a NUL");
        f
    }

    /// A copy that fits is every row in order; one that does not drops the
    /// longest reported items first and marks only their (database, role).
    #[test]
    fn one_roles_outsized_item_cuts_only_that_role() {
        let rows = vec![
            row("", "app", "nextgres.pool_size=4"),
            row("", "bob", "standard_conforming_strings=off"),
            row("", "alice", &format!("search_path={}", "x".repeat(300))),
            row("db", "", "DateStyle=SQL, DMY"),
            row("", "alice", "DateStyle=German"),
        ];
        let all: usize = rows.iter().map(|r| r.0.len() + r.1.len() + r.2.len() + 3).sum();
        assert_eq!(fields(&copy_bytes(&rows, all)).len(), 15, "all fit");
        let got = fields(&copy_bytes(&rows, 200));
        let items: Vec<&[String]> = got.chunks(3).collect();
        assert_eq!(items[0], ["", "app", "nextgres.pool_size=4"], "nextgres.* first");
        assert!(items.iter().any(|i| i[2] == "standard_conforming_strings=off"));
        assert!(items.iter().any(|i| i[2] == "DateStyle=SQL, DMY"));
        assert!(items.iter().any(|i| i[2] == "DateStyle=German"), "alice's short item kept");
        assert!(!items.iter().any(|i| i[2].starts_with("search_path")));
        let cut: Vec<&[String]> = items.iter().copied().filter(|i| i[2].is_empty()).collect();
        assert_eq!(cut, vec![&["".to_string(), "alice".to_string(), String::new()][..]]);
        assert!(got.iter().map(|f| f.len() + 1).sum::<usize>() <= 200);
        // Not even the nextgres.* items and markers fit: every row, for the
        // writer to cut (the whole copy then counts as incomplete).
        assert_eq!(fields(&copy_bytes(&rows, 30)).len(), 15);
    }

    #[test]
    fn a_cut_level_applies_as_its_items_would() {
        let c = |d: Option<&str>, r: Option<&str>| Cut { database: d.map(str::to_string), role: r.map(str::to_string) };
        assert!(c(None, Some("alice")).applies("db", "alice"));
        assert!(!c(None, Some("alice")).applies("db", "bob"));
        assert!(c(Some("db"), None).applies("db", "bob"));
        assert!(!c(Some("db"), Some("alice")).applies("other", "alice"));
        assert!(c(None, None).applies("x", "y"));
    }

    /// Reported items are kept whole, others not; a login gets those of its
    /// database and role, highest level first.
    #[test]
    fn reported_items_apply_by_level() {
        assert!(Entry::reported_item(None, Some("app"), "nextgres.pool_size=1").is_none());
        assert!(Entry::reported_item(None, Some("app"), "work_mem=1MB").is_none());
        let items = [
            Entry::reported_item(None, None, "TimeZone=UTC").unwrap(),
            Entry::reported_item(Some("db"), None, "DateStyle=SQL, DMY").unwrap(),
            Entry::reported_item(None, Some("app"), "client_encoding=LATIN1").unwrap(),
            Entry::reported_item(Some("db"), Some("app"), "TimeZone=Asia/Tokyo").unwrap(),
            Entry::reported_item(Some("other"), Some("app"), "TimeZone=Europe/Paris").unwrap(),
        ];
        assert_eq!(items[1].name, "datestyle");
        assert_eq!(items[1].value, "SQL, DMY");
        let got: Vec<(u8, &str, &str)> =
            super::applicable(&items, "db", "app").into_iter().map(|(l, e)| (l, e.name.as_str(), e.value.as_str())).collect();
        assert_eq!(
            got,
            [(4, "timezone", "Asia/Tokyo"), (3, "client_encoding", "LATIN1"), (2, "datestyle", "SQL, DMY"), (1, "timezone", "UTC")]
        );
    }

    use super::*;

    fn e(db: Option<&str>, role: Option<&str>, item: &str) -> Entry {
        Entry::from_item(db, role, item).unwrap()
    }

    #[test]
    fn server_precedence() {
        let all = vec![
            e(None, None, "nextgres.pool_size=1"),
            e(Some("db"), None, "nextgres.pool_size=2"),
            e(None, Some("r"), "nextgres.pool_size=3"),
            e(Some("db"), Some("r"), "nextgres.pool_size=4"),
        ];
        assert_eq!(resolve(&all, "db", "r").pool_size, Some(4));
        assert_eq!(resolve(&all[..3], "db", "r").pool_size, Some(3));
        assert_eq!(resolve(&all[..2], "db", "r").pool_size, Some(2));
        assert_eq!(resolve(&all[..1], "db", "r").pool_size, Some(1));
        // Order in the catalog does not matter.
        let mut rev = all.clone();
        rev.reverse();
        assert_eq!(resolve(&rev, "db", "r").pool_size, Some(4));
        // Other databases and roles do not apply.
        assert_eq!(resolve(&all, "other", "x").pool_size, Some(1));
        assert_eq!(resolve(&all, "other", "r").pool_size, Some(3));
        assert_eq!(resolve(&all, "db", "x").pool_size, Some(2));
        assert_eq!(resolve(&all[1..], "other", "x"), PoolConf::default());
    }

    #[test]
    fn names_resolve_independently() {
        let all = vec![
            e(Some("db"), None, "nextgres.pool_mode=session"),
            e(None, Some("r"), "nextgres.pool_size=3"),
            e(None, Some("r"), "nextgres.query_wait_timeout=10s"),
            e(Some("db"), Some("r"), "nextgres.idle_backend_timeout=2min"),
        ];
        let c = resolve(&all, "db", "r");
        assert_eq!(c.pool_mode, Some(Mode::Session));
        assert_eq!(c.pool_size, Some(3));
        assert_eq!(c.query_wait_timeout, Some(10));
        assert_eq!(c.idle_backend_timeout, Some(120));
        let c = resolve(&[e(None, Some("r"), "nextgres.min_pool_size=2"), e(None, None, "nextgres.backend_lifetime=1h")], "db", "r");
        assert_eq!((c.min_pool_size, c.backend_lifetime), (Some(2), Some(3600)));
        // max_pinned_backends: -1 (no cap) and 0 are values; below -1 is not.
        let c = resolve(&[e(None, Some("r"), "nextgres.max_pinned_backends=0"), e(None, None, "nextgres.max_pinned_backends=-1")], "db", "r");
        assert_eq!(c.max_pinned_backends, Some(0));
        assert_eq!(resolve(&[e(None, None, "nextgres.max_pinned_backends=-1")], "db", "r").max_pinned_backends, Some(-1));
        assert_eq!(resolve(&[e(None, None, "nextgres.max_pinned_backends=-2")], "db", "r").max_pinned_backends, None);
    }

    #[test]
    fn other_prefixes_and_bad_values_are_ignored() {
        assert!(Entry::from_item(None, None, "work_mem=4MB").is_none());
        assert!(Entry::from_item(None, None, "garbage").is_none());
        let all = vec![e(None, None, "nextgres.pool_size=abc"), e(None, None, "NEXTGRES.POOL_MODE='Session'")];
        let c = resolve(&all, "d", "r");
        assert_eq!(c.pool_size, None);
        assert_eq!(c.pool_mode, Some(Mode::Session));
        assert_eq!(resolve(&[e(None, Some("r"), "nextgres.pool_mode=dedicated")], "d", "r").pool_mode, Some(Mode::Dedicated));
        assert_eq!(resolve(&[e(None, Some("r"), "nextgres.pool_mode=none")], "d", "r").pool_mode, None);
    }

    #[test]
    fn database_and_role_limits() {
        let all = vec![
            e(None, None, "nextgres.max_db_connections=50"),
            e(Some("db"), None, "nextgres.max_db_connections=10"),
            e(Some("db"), Some("r"), "nextgres.max_db_connections=1"),
            e(None, Some("r"), "nextgres.max_user_connections=5"),
            e(Some("db"), Some("r"), "nextgres.max_user_connections=1"),
        ];
        assert_eq!(resolve_database_limit(&all, "max_db_connections", "db"), Some(10));
        assert_eq!(resolve_database_limit(&all, "max_db_connections", "other"), Some(50));
        assert_eq!(resolve_role_limit(&all, "max_user_connections", "r"), Some(5));
        assert_eq!(resolve_role_limit(&all, "max_user_connections", "x"), None);
        assert_eq!(resolve_database_limit(&all[3..], "max_db_connections", "db"), None);
    }

    #[test]
    fn time_units() {
        assert_eq!(parse_secs("30"), Some(30));
        assert_eq!(parse_secs("1500ms"), Some(2));
        assert_eq!(parse_secs("1 h"), Some(3600));
        assert_eq!(parse_secs("1d"), Some(86400));
        assert_eq!(parse_secs("3 weeks"), None);
    }
}
