//! What a pooled client was last told of each setting the server reports
//! (ParameterStatus; protocol.sgml "Asynchronous Operations",
//! guc.c `ReportGUCOption`), carried in its session image.
//!
//! A direct backend reports a value the client was not told yet at its next
//! ReadyForQuery, comparing with guc.c's `last_reported`. A pooled client
//! moves between backends, each with its own `last_reported`: a value a
//! reload or a role default changed under it would be reported to the first
//! client each backend serves afterwards and to no other. The image says
//! what this client was told, so the backend it moves to reports what it
//! runs under and this client has not heard (hunt11b 2 and 3).
//!
//! Values are kept as 32-bit hashes of their bytes in the server encoding
//! (as guc.c's `last_reported` and the pooler's login values have them; a
//! client's own encoding may change), 0 meaning "not known" (taken as told,
//! so a name the pooler's login did not report is never reported twice).

/// Reported settings (GUC_REPORT in guc_tables.c of 15..18) whose value can
/// change while the server runs, lower case: server_version,
/// server_encoding and integer_datetimes cannot, so they are not tracked.
pub const TRACKED: [&str; 12] = [
    "application_name",
    "client_encoding",
    "datestyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "intervalstyle",
    "is_superuser",
    "scram_iterations",
    "search_path",
    "session_authorization",
    "standard_conforming_strings",
    "timezone",
];

/// One hash per [`TRACKED`] name, in its order; 0: not known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Told(pub [u32; TRACKED.len()]);

/// Bytes a [`Told`] takes on the control channel.
pub const WIRE_LEN: usize = 4 * TRACKED.len();

/// The hash of "told something no value matches": owed at the next switch.
const UNTOLD: u32 = u32::MAX;

impl Told {
    /// The [`TRACKED`] index of a setting name (any case), None if untracked.
    pub fn index(name: &str) -> Option<usize> {
        TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
    }

    /// FNV-1a of a reported value's bytes, never 0 (0 is "not known") nor
    /// `UNTOLD`.
    pub fn hash(value: &[u8]) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        for &b in value {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h.clamp(1, UNTOLD - 1)
    }

    /// The client was told `name` in a form no value in force matches (a
    /// login's value sent unconverted to a client of another encoding): the
    /// backend it first runs on reports the value as the server would.
    pub fn mark_untold(&mut self, name: &str) {
        if let Some(i) = Told::index(name) {
            self.0[i] = UNTOLD;
        }
    }

    /// What a client was told by the ParameterStatus pairs of its login.
    pub fn from_pairs<N: AsRef<str>, V: AsRef<str>>(pairs: &[(N, V)]) -> Told {
        let mut t = Told::default();
        for (n, v) in pairs {
            t.note(n.as_ref(), v.as_ref().as_bytes());
        }
        t
    }

    /// The client was sent ParameterStatus `name` = `value`.
    pub fn note(&mut self, name: &str, value: &[u8]) {
        if let Some(i) = Told::index(name) {
            self.0[i] = Told::hash(value);
        }
    }

    /// Was the client told `value` for `name` (or is that not known, or the
    /// name untracked)? False means the value must be reported to it.
    pub fn has(&self, name: &str, value: &[u8]) -> bool {
        match Told::index(name) {
            Some(i) => self.0[i] == 0 || self.0[i] == Told::hash(value),
            None => true,
        }
    }

    /// Appends the wire form: the hashes, big-endian, in [`TRACKED`] order.
    pub fn write(&self, out: &mut Vec<u8>) {
        for h in self.0 {
            out.extend_from_slice(&h.to_be_bytes());
        }
    }

    /// Reads the wire form from exactly [`WIRE_LEN`] bytes.
    pub fn read(b: &[u8]) -> Option<Told> {
        if b.len() != WIRE_LEN {
            return None;
        }
        let mut t = Told::default();
        for (h, c) in t.0.iter_mut().zip(b.chunks_exact(4)) {
            *h = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_tells_its_pairs_and_nothing_else() {
        let t = Told::from_pairs(&[("DateStyle", "ISO, MDY"), ("server_version", "17.2"), ("TimeZone", "UTC")]);
        assert!(t.has("datestyle", b"ISO, MDY"));
        assert!(!t.has("DateStyle", b"SQL, DMY"));
        assert!(t.has("TIMEZONE", b"UTC"));
        assert!(!t.has("TimeZone", b"Asia/Tokyo"));
        // Not told at its login: not known, taken as told.
        assert!(t.has("IntervalStyle", b"sql_standard"));
        // Untracked.
        assert!(t.has("server_version", b"18.0"));
        assert!(t.has("no_such", b"x"));
    }

    #[test]
    fn a_later_report_replaces_the_login_value() {
        let mut t = Told::from_pairs(&[("DateStyle", "ISO, MDY")]);
        t.note("DateStyle", b"SQL, DMY");
        assert!(t.has("DateStyle", b"SQL, DMY"));
        assert!(!t.has("DateStyle", b"ISO, MDY"));
        // An empty value is a value, not "not known".
        t.note("search_path", b"");
        assert!(!t.has("search_path", b"public"));
        assert!(t.has("search_path", b""));
    }

    #[test]
    fn the_wire_form_round_trips_and_refuses_other_lengths() {
        let t = Told::from_pairs(&[("application_name", "psql"), ("is_superuser", "off")]);
        let mut b = Vec::new();
        t.write(&mut b);
        assert_eq!(b.len(), WIRE_LEN);
        assert_eq!(Told::read(&b), Some(t));
        assert_eq!(Told::read(&b[1..]), None);
        b.push(0);
        assert_eq!(Told::read(&b), None);
        assert!(Told::hash(b"") != 0);
    }

    #[test]
    fn an_untold_value_matches_nothing() {
        let mut t = Told::from_pairs(&[("session_authorization", "j\u{fc}rgen")]);
        assert!(t.has("session_authorization", "j\u{fc}rgen".as_bytes()));
        t.mark_untold("session_authorization");
        assert!(!t.has("session_authorization", "j\u{fc}rgen".as_bytes()));
        assert!(!t.has("session_authorization", b""));
        t.note("session_authorization", "j\u{fc}rgen".as_bytes());
        assert!(t.has("session_authorization", "j\u{fc}rgen".as_bytes()));
    }
}
