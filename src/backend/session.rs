//! Switching a pooled backend's session from one client to the next.
//!
//! The previous client's session state must vanish (DISCARD ALL) and the new
//! client's startup settings must be in force. Startup settings are applied
//! with source "client", as a startup packet would, so RESET returns to them;
//! because DISCARD ALL does not undo client-sourced values, every setting a
//! previous client supplied is first put back to this backend's own value
//! from its login (remembered the first time any client touched it).
use crate::pg::glue;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// Setting name (lower case) -> value before any client changed it.
    static BASELINE: RefCell<HashMap<String, (String, String)>> = RefCell::new(HashMap::new());
}

pub fn switch_to(settings: &[(String, String)]) {
    let apply = BASELINE.with(|b| {
        let mut b = b.borrow_mut();
        for (name, _) in settings {
            let key = name.to_ascii_lowercase();
            if !b.contains_key(&key) {
                if let Some(v) = current_value(name) {
                    b.insert(key, (name.clone(), v));
                }
            }
        }
        let mut apply: Vec<(String, String)> = b
            .iter()
            .filter(|(k, _)| !settings.iter().any(|(n, _)| n.eq_ignore_ascii_case(k)))
            .map(|(_, (n, v))| (n.clone(), v.clone()))
            .collect();
        apply.extend(settings.iter().cloned());
        apply
    });
    if let Err(e) = glue::session_switch(true, &apply) {
        // Never run a client on a half-switched session.
        pgrx::ereport!(
            pgrx::PgLogLevel::FATAL,
            pgrx::PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("nextgres: could not prepare the session for a new client: {}", e.message())
        );
    }
}

fn current_value(name: &str) -> Option<String> {
    let c = glue::cstring(name);
    let p = unsafe { pgrx::pg_sys::GetConfigOption(c.as_ptr(), true, false) };
    (!p.is_null()).then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
}
