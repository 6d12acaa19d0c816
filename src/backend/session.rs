//! Switching a pooled backend's session from one client to the next.
//!
//! The previous client's session must vanish (DISCARD ALL) and the new
//! client's must appear as it left it on its last backend: its startup
//! settings (source "client", so RESET returns to them), then what it changed
//! with SET or set_config() (source "session"), then its named prepared
//! statements under its own names. DISCARD ALL does not undo client-sourced
//! values, so every setting a previous client supplied at startup is first
//! put back to this backend's own value from its login, remembered the first
//! time any client touched it (right after a DISCARD, so it is the login's).
//!
//! Most switches need none of that: when the previous client left no setting
//! behind (the trackers in session.c saw no SET, and pinned state never gets
//! here), the next client has the same startup settings and no SET of its
//! own, and the backend's named prepared statements are exactly the ones the
//! next client has (same names, texts and parameter types: typically none,
//! or the same application's), the session already is what the next client
//! would get, so only the sequence caches are dropped (currval/lastval).
use crate::pg::glue;
use crate::pg::session as s;
use nextgres_core::control::{SessionImage, Statement};
use std::cell::RefCell;
use std::collections::HashMap;

/// What this backend's session holds beyond its login, as far as switching
/// is concerned.
#[derive(Default)]
struct Shape {
    /// A switch ran, so `startup` is meaningful.
    known: bool,
    /// Startup settings of the last client switched to.
    startup: Vec<(String, String)>,
    /// No SET/set_config value of a client is in effect.
    settings_clean: bool,
    /// The named prepared statements this backend has.
    statements: Vec<Statement>,
}

thread_local! {
    static SHAPE: RefCell<Shape> = RefCell::new(Shape::default());
    /// Setting name (lower case) -> (name, value this backend logged in with).
    static BASELINE: RefCell<HashMap<String, (String, String)>> = RefCell::new(HashMap::new());
}

pub fn switch_to(startup: &[(String, String)], image: &SessionImage) {
    let same = SHAPE.with(|sh| {
        let sh = sh.borrow();
        sh.known
            && sh.settings_clean
            && image.settings.is_empty()
            && sh.startup == startup
            && same_statements(&sh.statements, &image.statements)
    });
    if same {
        s::switch_light();
        return;
    }
    let statements = full_switch(startup, image);
    SHAPE.with(|sh| {
        let mut sh = sh.borrow_mut();
        sh.known = true;
        sh.startup = startup.to_vec();
        sh.settings_clean = image.settings.is_empty();
        sh.statements = statements;
    });
}

/// Same set of statements (names are unique, order does not matter).
fn same_statements(have: &[Statement], want: &[Statement]) -> bool {
    have.len() == want.len() && want.iter().all(|w| have.contains(w))
}

/// At release: what the client changed since it was attached (None: the
/// trackers saw no change of that kind).
pub fn note_release(settings: Option<&[(String, String)]>, statements: Option<&[Statement]>) {
    SHAPE.with(|sh| {
        let mut sh = sh.borrow_mut();
        if let Some(v) = settings {
            sh.settings_clean = v.is_empty();
        }
        if let Some(v) = statements {
            sh.statements = v.to_vec();
        }
    });
}

/// DISCARD ALL, then the client's settings and statements; returns the
/// statements that could be re-created.
fn full_switch(startup: &[(String, String)], image: &SessionImage) -> Vec<Statement> {
    if let Err(e) = s::switch_begin(true) {
        fatal(&e.message());
    }
    let restore = BASELINE.with(|b| {
        let mut b = b.borrow_mut();
        for (name, _) in startup {
            let key = name.to_ascii_lowercase();
            if !b.contains_key(&key) {
                if let Some(v) = current_value(name) {
                    b.insert(key, (name.clone(), v));
                }
            }
        }
        b.iter()
            .filter(|(k, _)| !startup.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)))
            .map(|(_, (n, v))| (n.clone(), v.clone()))
            .collect::<Vec<_>>()
    });
    for (n, v) in restore.iter().chain(startup) {
        s::switch_setting(n, v, true);
    }
    for (n, v) in &image.settings {
        s::switch_setting(n, v, false);
    }
    let mut created = Vec::with_capacity(image.statements.len());
    for st in &image.statements {
        match s::switch_statement(st) {
            Ok(()) => created.push(st.clone()),
            Err(e) => log::info!("prepared statement \"{}\" could not be re-created: {}", st.name, e.message()),
        }
    }
    if let Err(e) = s::switch_end() {
        fatal(&e.message());
    }
    created
}

/// DISCARD ALL between clients (a client left a pinned session).
pub fn discard() {
    if let Err(e) = s::switch_begin(true).and_then(|_| s::switch_end()) {
        fatal(&e.message());
    }
    SHAPE.with(|sh| {
        let mut sh = sh.borrow_mut();
        sh.settings_clean = true;
        sh.statements.clear();
    });
}

/// Never run a client on a half-switched session.
fn fatal(msg: &str) -> ! {
    pgrx::ereport!(
        pgrx::PgLogLevel::FATAL,
        pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("nextgres: could not prepare the session for a new client: {msg}")
    );
    unreachable!()
}

fn current_value(name: &str) -> Option<String> {
    let c = glue::cstring(name);
    let p = unsafe { pgrx::pg_sys::GetConfigOption(c.as_ptr(), true, false) };
    (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}
