//! The pooler's side of the release rings (`nextgres_core::ring`): a
//! backend that went straight on to a client sent ahead left its previous
//! client's RELEASED in shared memory. They are read, in each backend's
//! order, at every wake-up that follows an entry (`rings_look`; an entry
//! written while the pooler sleeps wakes it, `Tables::pooler_sleeps`),
//! before a control message that follows them (RING_MARK), and before
//! anything acts on a backend's state from its socket or its end
//! (`backend_event`, `backend_gone`).
use super::conn::Conn;
use super::worker::Pooler;
use nextgres_core::control;
use nextgres_core::proto::frame::parse_message;
use nextgres_core::ring::RING_SLOT;

/// What the pooler remembers of the rings between wake-ups.
#[derive(Default)]
pub struct RingsSeen {
    /// `Header::ring_pushes` at the last look.
    pushes: u64,
}

impl Pooler {
    /// Takes the RELEASEDs backend `bk` left in its ring (up to `upto`, a
    /// RING_MARK's tail, when given) and handles them as if read from its
    /// socket. Call only while no message read from that socket waits to be
    /// handled (they came first). False when the backend was removed.
    pub fn backend_ring_take(&mut self, bk: usize, upto: Option<u32>) -> bool {
        let mut slot = [0u8; RING_SLOT];
        loop {
            let Some(Conn::Backend(b)) = self.conns.get(bk) else { return false };
            let taken = self.tables.ring(b.row).is_some_and(|ring| ring.take_one(upto, &mut slot));
            if !taken {
                return true;
            }
            // An entry is the writer's pid and a RELEASED (`backend::ring`).
            let (pid, msg) = slot.split_at(4);
            if i32::from_be_bytes([pid[0], pid[1], pid[2], pid[3]]) != b.pid {
                // Written by a backend this row served before, after the
                // pooler gave up on it (it ends without serving the client
                // it took): not this backend's.
                log::warn!("backend {}: dropped an entry another process left in its release ring", b.pid);
                continue;
            }
            let m = match parse_message(msg, RING_SLOT) {
                Ok(Some((m, _))) if m.tag == control::RELEASED => m,
                _ => {
                    log::warn!("backend {}: malformed entry in its release ring", b.pid);
                    self.backend_gone(bk, None);
                    return false;
                }
            };
            if !self.backend_message(bk, m.tag, m.body) || self.freed_in_batch.contains(&bk) {
                return false;
            }
        }
    }

    /// At each wake-up: when any backend wrote ring entries since the last
    /// look, takes those of every backend that may have (one with clients
    /// sent ahead: only such a backend writes one).
    pub fn rings_look(&mut self) {
        let pushes = self.tables.ring_pushes();
        if self.rings_quiet(pushes) {
            return;
        }
        self.rings_seen.pushes = pushes;
        let mut keys = std::mem::take(&mut self.ring_keys);
        keys.clear();
        for (_, p) in self.pools.iter().filter(|(_, p)| p.ahead > 0) {
            for &bk in &p.attached {
                if matches!(self.conns.get(bk), Some(Conn::Backend(b)) if !b.ahead.is_empty()) {
                    keys.push(bk);
                }
            }
        }
        for &bk in &keys {
            self.backend_ring_take(bk, None);
        }
        self.ring_keys = keys;
    }

    /// No ring entry written since the last look, given the count `pushes`?
    pub fn rings_quiet(&self, pushes: u64) -> bool {
        pushes == self.rings_seen.pushes
    }

    /// The pooler gives up on backend `bk` (`backend_gone`): takes what its
    /// ring holds, after closing it, so a backend that wrote an entry after
    /// this read does not serve the client it took (`Ring::closed`). False
    /// when the backend was removed meanwhile.
    pub fn backend_ring_close(&mut self, bk: usize) -> bool {
        let Some(Conn::Backend(b)) = self.conns.get(bk) else { return false };
        if let Some(ring) = self.tables.ring(b.row) {
            ring.close();
        }
        self.backend_ring_take(bk, None)
    }

    /// A new backend got shared row `row`: its ring starts empty.
    pub fn ring_reset(&self, row: usize) {
        if let Some(ring) = self.tables.ring(row) {
            ring.reset();
        }
    }
}
