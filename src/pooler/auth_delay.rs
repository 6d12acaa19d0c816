//! auth_delay (contrib) on the pooler's port. With the module in
//! shared_preload_libraries the server sleeps `auth_delay.milliseconds`
//! before it answers a failed authentication (its ClientAuthentication_hook,
//! called with the exchange's status: auth.c ClientAuthentication()), which
//! slows password guessing. The pooler authenticates its clients itself and
//! never runs that hook, so it holds such a refusal back as long, without
//! holding up anyone else: the refusal waits in a list with its due time,
//! the client's input is not read meanwhile (the server reads none while it
//! sleeps), and the event loop's wait ends at the earliest due time.
//!
//! What the hook sees as a failure is what waits here: a password, md5 or
//! SCRAM exchange that did not prove the password (a wrong one, a role
//! without one or that does not exist). Refusals the server makes before
//! the hook (a `reject` line, no pg_hba.conf line) go out at once, as there.
//! Other modules' hooks (credcheck's lockout, login auditing) are not run.
use super::client::Phase;
use super::worker::Pooler;
use nextgres_core::proto::ErrorFields;
use std::time::{Duration, Instant};

/// A refusal waiting out auth_delay.
pub struct Delayed {
    due: Instant,
    key: usize,
    /// The client's id: the slab key may be another client's by then.
    id: u64,
    why: ErrorFields,
    detail: String,
}

/// `auth_delay.milliseconds` when auth_delay is in shared_preload_libraries
/// (the only place it can act from), else 0. A setting of that name
/// without the module is a placeholder the server ignores, as here.
fn auth_delay() -> Duration {
    let loaded = crate::pg::setting(c"shared_preload_libraries").is_some_and(|list| {
        list.split(',').any(|lib| {
            let lib = lib.trim().trim_matches('"');
            let base = lib.rsplit('/').next().unwrap_or(lib);
            base == "auth_delay" || base == "auth_delay.so"
        })
    });
    if !loaded {
        return Duration::ZERO;
    }
    let ms = crate::pg::setting(c"auth_delay.milliseconds").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis(ms)
}

impl Pooler {
    /// A failed authentication exchange (28P01): refused after auth_delay.
    pub(super) fn client_auth_failed(&mut self, key: usize, why: ErrorFields, detail: String) {
        let delay = auth_delay();
        let Some(c) = self.client(key) else { return };
        let Phase::Auth(session) = &mut c.phase else {
            return self.client_login_refused(key, &why, Some(&detail));
        };
        if delay.is_zero() {
            return self.client_login_refused(key, &why, Some(&detail));
        }
        session.delayed();
        let id = c.id;
        self.auth_delayed.push(Delayed { due: Instant::now() + delay, key, id, why, detail });
        self.client_rearm(key);
    }

    /// Sends the refusals whose delay is over (each loop turn).
    pub fn auth_delays_due(&mut self) {
        if self.auth_delayed.is_empty() {
            return;
        }
        let now = Instant::now();
        let (due, later): (Vec<Delayed>, Vec<Delayed>) = std::mem::take(&mut self.auth_delayed).into_iter().partition(|d| d.due <= now);
        self.auth_delayed = later;
        for d in due {
            // Gone meanwhile (it hung up): its key may be another client's.
            if self.client(d.key).is_some_and(|c| c.id == d.id) {
                self.client_login_refused(d.key, &d.why, Some(&d.detail));
            }
        }
    }

    /// Milliseconds until the next refusal is due (the loop's wait), if any.
    pub fn auth_delay_wait_ms(&self, now: Instant) -> Option<i64> {
        self.auth_delayed.iter().map(|d| d.due.saturating_duration_since(now).as_millis() as i64 + 1).min()
    }
}
