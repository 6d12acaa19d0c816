//! The Linux scheduling policy of pooled backends
//! (`nextgres.backend_batch_scheduling`, sched(7)).
//!
//! Under saturation every transaction wakes processes: the pooler's ATTACH
//! wakes a parked backend, a client's query wakes the backend serving it.
//! Under SCHED_OTHER the woken backend usually preempts the process that woke
//! it, so the pooler is switched out in the middle of its batch of events
//! (perf: a sixth of its CPU). SCHED_BATCH keeps the backend's share of CPU
//! (same weight, same nice) and only stops that wake-up preemption: the waker
//! runs on until its time slice or its own sleep. Measured (PostgreSQL 17,
//! pool 16, `pgbench -S -c 100`, BENCHMARKS.md "Issue 15, fifth step"):
//! +2-8% TPS, pooler CPU per transaction -5 to -8%, p99 no higher; no
//! change with 1 or 16 clients.
//!
//! Only a backend started under SCHED_OTHER is moved, and only between
//! SCHED_OTHER and SCHED_BATCH, which needs no privilege (sched_setscheduler(2)
//! lets an unprivileged process switch between the two at its nice value); a
//! server started under another policy (`chrt`) keeps it.
use std::cell::Cell;

thread_local! {
    /// The policy this backend found at its first park (None: not yet
    /// looked); this module changes it only when it was SCHED_OTHER.
    static STARTED_OTHER: Cell<Option<bool>> = const { Cell::new(None) };
    /// Batch applied (or tried: a refusal is not retried at every park).
    static BATCH: Cell<bool> = const { Cell::new(false) };
}

/// At a park and at each give-back: applies the setting if it changed
/// since (a reload reaches a backend when it next reads a client's
/// message). Costs a system call only when it changes.
pub fn follow_setting() {
    let want = crate::settings::BACKEND_BATCH_SCHEDULING.get();
    let started_other = STARTED_OTHER.get().unwrap_or_else(|| {
        // SAFETY: sched_getscheduler(0) reads this process's policy.
        let other = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_OTHER;
        STARTED_OTHER.set(Some(other));
        other
    });
    if started_other && BATCH.get() != want {
        BATCH.set(want);
        set_policy(if want { libc::SCHED_BATCH } else { libc::SCHED_OTHER });
    }
}

/// The backend leaves the pool (a replication client's own walsender): it
/// runs as a direct connection's would, under the policy it started with.
pub fn restore() {
    if BATCH.replace(false) {
        set_policy(libc::SCHED_OTHER);
    }
}

fn set_policy(policy: libc::c_int) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread (a backend has one); `param`
    // outlives the call.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        // A seccomp profile may refuse it (EPERM): the backend works as
        // before. (One that kills on the call instead needs
        // sched_setscheduler allowed, or this setting off: README.)
        let e = std::io::Error::last_os_error();
        pgrx::debug1!("nextgres: could not set the scheduling policy of this pooled backend: {e}");
    }
}
