//! Lent backends: a parked backend lent to its pool's queue (`KQ_LEND`),
//! recalled from it (`KQ_RECALL`, answered by `KQ_PARKED` or a client's
//! `KQ_RETURNED`), closed through it, or gone while lent. A child of `kq`,
//! whose queue state it shares.
use super::*;

impl Pooler {
    /// A parked backend with nothing to serve: lent to its pool's queue
    /// when the pool is open and its clients use the queue (true).
    pub fn kq_lend(&mut self, bk: usize) -> bool {
        let Some(b) = self.backend(bk) else { return false };
        let pool = b.pool;
        if b.own || b.pinned_to.is_some() || b.terminating || b.lent || b.kq_refused || !self.kq_open(pool) {
            return false;
        }
        // Only where clients use the queue (queued ones, or one that could
        // have been lately): elsewhere each transaction would recall it.
        if self.pools.get(pool).is_none_or(|p| p.queued == 0)
            && !self.kq.demand.get(&pool).is_some_and(|t| t.elapsed() < DEMAND_FRESH)
        {
            return false;
        }
        if self.kq_pool_queue(pool).is_none() {
            return false;
        }
        let pool_row = self.pools.get(pool).map_or(0, |p| p.row as u32);
        let Some(b) = self.backend(bk) else { return false };
        let row = b.row;
        // Its counter row is the pool's before the backend can count in it
        // (it may take a client the moment KQ_LEND arrives). Whatever the
        // row's last backend left there is not this one's (moved out as it
        // went; a count written after that, or under a pooler before a
        // restart, is dropped). Listed even if the lend fails below: its
        // counts stay the pool's until it ends.
        if let Some(q) = self.kq.pools.get_mut(&pool) {
            if !q.counted.contains(&row) {
                if let Some(h) = self.tables.kq_backend(row) {
                    h.counters.clear();
                }
                q.counted.push(row);
            }
        }
        // A recall flag left from its last lending (it kept a client
        // instead of answering) would send it straight back; an idle mark
        // left by the row's last backend (gone while it waited on a queue)
        // would have the janitor close this one as idle before it reads
        // KQ_LEND.
        if let Some(h) = self.tables.kq_backend(row) {
            h.recall.store(0, std::sync::atomic::Ordering::SeqCst);
            h.idle_since.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        let Some(b) = self.backend(bk) else { return false };
        let mut msg = Vec::with_capacity(9);
        control::write_kq_lend(&mut msg, pool_row);
        use std::io::Write;
        if b.stream.write_all(&msg).is_err() {
            return false;
        }
        b.lent = true;
        // Serving queued clients, its session will be theirs: the next
        // client the pooler hands it is a new one for it.
        b.last_client = QUEUE_CLIENTS;
        let now = crate::pg::shmem::now();
        self.backend_row_update(row, |r| {
            r.state = crate::shmem::BackendState::Lent;
            r.since = now;
        });
        if let Some(q) = self.kq.pools.get_mut(&pool) {
            q.lent.push(bk);
        }
        true
    }

    /// Backend `bk` (shared row `brow`) is gone: what it counted for its
    /// pool's queue moves to the pool's `KqPool::gone`, so the next backend
    /// in its row starts from 0 and the pool's totals stay.
    pub fn kq_backend_counted(&mut self, pool: usize, brow: usize) {
        let Some(i) = self.kq.pools.get(&pool).and_then(|q| q.counted.iter().position(|&r| r == brow)) else { return };
        let prow = self.pools.get(pool).map(|p| p.row);
        if let (Some(h), Some(k)) = (self.tables.kq_backend(brow), prow.and_then(|r| self.tables.kq_pool(r))) {
            use std::sync::atomic::Ordering::Relaxed;
            for (from, to) in h.counters.all().into_iter().zip(k.gone.all()) {
                to.fetch_add(from.swap(0, Relaxed), Relaxed);
            }
        }
        if let Some(q) = self.kq.pools.get_mut(&pool) {
            q.counted.swap_remove(i);
        }
    }

    /// Asks a lent backend back (`KQ_RECALL`); it answers `KQ_PARKED`.
    pub(super) fn kq_recall(&mut self, bk: usize) {
        let Some(b) = self.backend(bk) else { return };
        if !b.lent || b.kq_recalled {
            return;
        }
        // The flag first: a backend serving queued clients checks it at
        // each boundary; the message wakes one waiting on the queue.
        let row = b.row;
        if let Some(h) = self.tables.kq_backend(row) {
            h.recall.store(1, std::sync::atomic::Ordering::SeqCst);
        }
        // Asked once the flag is up, whether or not the wake-up could be
        // written: the backend answers at its boundary either way, and a
        // control socket too full to take it has unread messages that wake
        // it anyway. Counted as not asked, it would answer an "unasked"
        // KQ_PARKED (never lent again), and meanwhile be chosen for every
        // waiting client while others stayed lent (a gone backend's
        // socket fails too: `backend_gone` follows).
        let _ = self.kq_wake(bk);
        if let Some(b) = self.backend(bk) {
            b.kq_recalled = true;
        }
    }

    /// Writes `KQ_RECALL` to backend `bk`: a wake-up only (what to do is in
    /// shared memory, written before). False when it could not be written.
    pub(super) fn kq_wake(&self, bk: usize) -> bool {
        let Some(Conn::Backend(b)) = self.conns.get(bk) else { return false };
        let mut msg = Vec::with_capacity(5);
        control::write_empty(&mut msg, control::KQ_RECALL);
        use std::io::Write;
        (&b.stream).write_all(&msg).is_ok()
    }

    /// The pool's clients came to outnumber its backends (its shared row
    /// says so now): lent backends keeping an idle client, which leave the
    /// queue to free backends while there are enough (`backend::park`,
    /// `kq_hold`), are woken to watch it again. `KQ_RECALL` without the
    /// recall flag: a wake-up only.
    pub fn kq_outnumbered_wake(&self, pool: usize) {
        let Some(q) = self.kq.pools.get(&pool) else { return };
        for &bk in &q.lent {
            self.kq_wake(bk);
        }
    }

    /// A client of the pool waits for a backend and none is parked: recall
    /// a lent one for it (one per waiting client not yet served).
    pub fn kq_recall_for_waiting(&mut self, pool: usize) {
        let Some(q) = self.kq.pools.get(&pool) else { return };
        let waiting = self.pools.get(pool).map_or(0, |p| p.waiting.len() + p.session_waiting.len());
        let lent = q.lent.clone();
        // One recalled to close serves nobody.
        let recalled = |p: &Pooler, bk: usize| matches!(p.conns.get(bk), Some(Conn::Backend(b)) if b.kq_recalled && !b.kq_close);
        let asked = lent.iter().filter(|&&bk| recalled(self, bk)).count();
        let mut free: Vec<usize> = lent
            .into_iter()
            .filter(|&bk| matches!(self.conns.get(bk), Some(Conn::Backend(b)) if !b.kq_recalled && !b.kq_close))
            .collect();
        // An idle backend a waiting client left first (a TLS client, served
        // on the handoff path, then comes back to its session with no
        // switch, as to a parked one: it moved at every transaction, its
        // unnamed statement lost), then other idle ones (a busy one serves
        // the waiter only after its own client's transaction).
        let last: Vec<usize> = self.pools.get(pool).map_or(Vec::new(), |p| {
            p.waiting.iter().filter_map(|&ck| match self.conns.get(ck) {
                Some(Conn::Client(c)) => c.last_backend,
                _ => None,
            }).collect()
        });
        free.sort_by_key(|&bk| {
            let idle = self.kq_waits_idle(bk);
            (!(idle && last.contains(&bk)), !idle)
        });
        for bk in free.into_iter().take(waiting.saturating_sub(asked)) {
            self.kq_recall(bk);
        }
    }

    /// Has the lent backend in shared row `row` waited on its queue with no
    /// client for longer than `limit` (`shmem::KqBackend::idle_since`)?
    pub fn kq_idle_longer(&self, row: usize, limit: std::time::Duration) -> bool {
        let Some(h) = self.tables.kq_backend(row) else { return false };
        let since = h.idle_since.load(std::sync::atomic::Ordering::Relaxed);
        since != 0 && crate::shmem::mono_now() - since > limit.as_micros() as i64
    }

    /// Is lent backend `bk` closing (recalled, closed at its `KQ_PARKED`)?
    fn kq_closing(&self, bk: usize) -> bool {
        matches!(self.conns.get(bk), Some(Conn::Backend(b)) if b.kq_close)
    }

    /// Lent backends of pool `pool` closing: still counted in the pool's
    /// backends until they answer.
    pub fn kq_closing_count(&self, pool: usize) -> usize {
        self.kq.pools.get(&pool).map_or(0, |q| q.lent.iter().filter(|&&bk| self.kq_closing(bk)).count())
    }

    /// Closes pool `pool`'s lent backends: once recalled
    /// (`kq_defer_close`), or with `now` at once, which only a pool being
    /// freed may ask (no client left, and its queue closes with it, so no
    /// client can be queued for them meanwhile).
    pub fn kq_close_lent(&mut self, pool: usize, now: bool) {
        let now = now && self.pools.get(pool).is_some_and(|p| p.clients == 0);
        for bk in self.kq_lent(pool) {
            if now {
                self.kq_unlend(bk);
            }
            self.backend_close(bk);
        }
    }

    /// A backend lent to pool `pool`'s queue that waits there with no
    /// client and is not closing yet: one the limits may close.
    pub fn kq_idle_lent(&self, pool: usize) -> Option<usize> {
        let q = self.kq.pools.get(&pool)?;
        q.lent.iter().copied().find(|&bk| !self.kq_closing(bk) && self.kq_waits_idle(bk))
    }

    /// Does lent backend `bk` wait on its queue with no client
    /// (`shmem::KqBackend::idle_since` set)?
    fn kq_waits_idle(&self, bk: usize) -> bool {
        match self.conns.get(bk) {
            Some(Conn::Backend(b)) => self.tables.kq_backend(b.row).is_some_and(|h| h.idle_since.load(std::sync::atomic::Ordering::Relaxed) != 0),
            _ => false,
        }
    }

    /// A backend lent to pool `pool`'s queue that is not closing yet, busy
    /// or not: closed at its next boundary for a pool that deserves it
    /// under a shared limit (as `backend_yield_to_starved` closes one the
    /// pooler sees at a boundary).
    pub fn kq_any_lent(&self, pool: usize) -> Option<usize> {
        let q = self.kq.pools.get(&pool)?;
        q.lent.iter().copied().find(|&bk| !self.kq_closing(bk))
    }

    /// The backends lent to pool `pool`'s queue.
    pub fn kq_lent(&self, pool: usize) -> Vec<usize> {
        self.kq.pools.get(&pool).map(|q| q.lent.clone()).unwrap_or_default()
    }

    /// Backends lent to pool `pool`'s queue.
    pub fn kq_lent_count(&self, pool: usize) -> usize {
        self.kq.pools.get(&pool).map_or(0, |q| q.lent.len())
    }

    /// A lent backend's message about the queue. False when it was removed.
    pub fn kq_backend_message(&mut self, bk: usize, tag: u8, body: &[u8]) -> bool {
        match tag {
            control::KQ_PARKED => {
                // Unasked: it could not take the queue (so each lend would
                // bounce back at once).
                if let Some(b) = self.backend(bk) {
                    if b.lent && !b.kq_recalled {
                        b.kq_refused = true;
                    }
                }
                let close = self.kq_closing(bk);
                self.kq_unlend(bk);
                if close {
                    self.backend_close(bk);
                    return false;
                }
                self.backend_available(bk);
                true
            }
            control::KQ_RETURNED => match control::parse_kq_returned(body) {
                Ok((row, id, flags)) => {
                    self.kq_returned(bk, row as usize, id, flags);
                    true
                }
                Err(e) => {
                    log::warn!("backend: {}", e.message);
                    self.backend_gone(bk, None);
                    false
                }
            },
            _ => true,
        }
    }

    /// A pool over its size (pool_size lowered), or its database or role
    /// over a lowered shared limit (`caps_shed`): lent backends close
    /// (recalled first) for up to `surplus` of it (`pool_surplus`, which
    /// already leaves out those closing). Returns the surplus left for
    /// attached backends.
    pub fn kq_trim(&mut self, pool: usize, surplus: usize) -> usize {
        let Some(q) = self.kq.pools.get(&pool) else { return surplus };
        let lent = q.lent.clone();
        let mut left = surplus;
        for bk in lent {
            if left == 0 {
                break;
            }
            if !self.kq_closing(bk) && self.kq_defer_close(bk) {
                left -= 1;
            }
        }
        left
    }

    /// `backend_close` of a lent backend: recalled first (it may be serving
    /// a queued client), closed at its `KQ_PARKED`. True when deferred.
    pub fn kq_defer_close(&mut self, bk: usize) -> bool {
        let Some(b) = self.backend(bk) else { return false };
        if !b.lent {
            return false;
        }
        b.kq_close = true;
        self.kq_recall(bk);
        true
    }

    /// The backend is no longer lent (recalled, or it kept a client): parked
    /// in its row until the caller says otherwise. A close asked while it
    /// was lent (`kq_defer_close`) is dropped with the lending: the caller
    /// answering the recall closes it, and one that kept a client is judged
    /// again when that client leaves it (`backend_available`: surplus,
    /// expiry, a starved pool, a drain). Kept, the mark would outlive the
    /// lending: lent again, the backend would count as closing for good,
    /// so no client would be queued for it and none recalled from it (the
    /// pool's clients waited out query_wait_timeout).
    fn kq_unlend(&mut self, bk: usize) {
        let Some(b) = self.backend(bk) else { return };
        let was = std::mem::replace(&mut b.lent, false);
        b.kq_recalled = false;
        b.kq_close = false;
        let (pool, row) = (b.pool, b.row);
        if was {
            let now = crate::pg::shmem::now();
            self.backend_row_update(row, |r| {
                r.state = crate::shmem::BackendState::Parked;
                r.since = now;
            });
        }
        if let Some(q) = self.kq.pools.get_mut(&pool) {
            q.lent.retain(|&k| k != bk);
        }
    }

    /// `KQ_RETURNED`: client `id` in row `row` is the pooler's again.
    fn kq_returned(&mut self, bk: usize, row: usize, id: u64, flags: u8) {
        let ck = self.kq.by_row.get(&row).copied();
        let Some(ck) = ck.filter(|&k| self.client(k).is_some_and(|c| c.id == id && matches!(c.phase, Phase::Queued { .. }))) else {
            return; // not queued any more (closed with its backend's end, or a pooler restarted since)
        };
        if let Some(k) = self.tables.kq_row(row) {
            kq::settle(&k.owner);
        }
        // Its session count as its slot says: a backend that served it
        // and requeued it rewrote the slot, one that gave it back unserved
        // (no bytes after all, a put-back after a recall, a hang-up) left
        // the pooler's ATTACH there, so a first session is counted where
        // it is first served.
        self.kq_settle(ck, row);
        if flags & control::KQ_RETURNED_KEPT != 0 {
            // Served and kept: counted there, though the slot (rewritten
            // only at a requeue) still says otherwise.
            if let Some(c) = self.client(ck) {
                c.session_counted = true;
            }
            // The backend serves it as an attached client from here on,
            // handled as one (a close asked meanwhile waits for its
            // session to end, as an attached client's does).
            self.kq_unlend(bk);
            if let Some(c) = self.client(ck) {
                c.kq_close = false;
            }
            self.attached(ck, bk, None);
            if self.client(ck).is_some_and(|c| c.killed) {
                // Killed while this message was on its way: as an
                // attached client is, by terminating its backend.
                self.backend_terminate(bk);
            }
            // The queue lost a backend, as when one is gone: it may have
            // been the last to serve it (its clients then wait the
            // pooler's way), or the one recalled for a waiting client
            // (another is recalled, or logged in), not left to the
            // janitor's next look.
            if let Some(pool) = self.backend(bk).map(|b| b.pool) {
                self.pool_maybe_grow(pool);
                self.kq_unserved_take_back(pool);
                self.kq_recall_for_waiting(pool);
                self.sync_pool(pool);
            }
            return;
        }
        let Some(c) = self.client(ck) else { return };
        if c.killed {
            return self.client_fatal(ck, "57P01", "terminating connection due to administrator command", None);
        }
        if flags & control::KQ_RETURNED_LEAVING != 0 || c.kq_close {
            return self.client_close(ck);
        }
        self.client_set_state(ck, ClientState::Idle, 0);
        self.client_rearm(ck);
    }

    /// A lent backend is gone: out of its queue's books; the queued clients
    /// it served lose their connection, as a direct client's does when its
    /// backend ends. It wrote its FATAL to the client it was serving; one it
    /// wrote on its control socket instead (`fatal`: terminated between two
    /// clients, having taken the next) goes to that client. A client it
    /// gave back whose `KQ_RETURNED` was never read (lost with the
    /// backend's connection) is closed too: it may have been kept.
    pub fn kq_backend_gone(&mut self, bk: usize, brow: usize, fatal: Option<ErrorFields>) {
        self.kq_unlend(bk);
        let served: Vec<(usize, usize)> = self
            .kq
            .queued
            .iter()
            .map(|(&k, &r)| (k, r))
            .filter(|&(_, r)| {
                self.tables.kq_row(r).is_some_and(|x| {
                    matches!(kq::load(&x.owner), kq::Owner::Taken { row, .. } | kq::Owner::Returned { row, .. } if row as usize == brow)
                })
            })
            .collect();
        for (ck, row) in served {
            if let Some(x) = self.tables.kq_row(row) {
                kq::settle(&x.owner);
            }
            self.kq_settle(ck, row);
            if let Some(f) = &fatal {
                self.client_fatal_fields(ck, f);
                continue;
            }
            if let Some(c) = self.client(ck) {
                c.phase = Phase::Closing { since: std::time::Instant::now() };
                c.outbuf.clear();
            }
            self.client_close(ck);
        }
    }
}
