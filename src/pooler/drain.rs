//! Databases a command needs to itself (DROP DATABASE, ALTER DATABASE ...
//! RENAME / SET TABLESPACE, CREATE DATABASE ... TEMPLATE): the backend running
//! it lists the database in shared memory and wakes the pooler, which closes
//! the database's parked and logging-in backends, asks backends holding an
//! idle client to give it back, and lets none park or log in until the
//! command ends. Clients stay connected to the pooler; after a DROP their
//! next transaction gets the server's "database does not exist".
use super::backend::BPhase;
use super::conn::Conn;
use super::worker::Pooler;

impl Pooler {
    /// On every latch wake and janitor tick: has the set of drained
    /// databases changed?
    pub fn check_drains(&mut self) {
        let mut now = self.tables.draining();
        now.sort();
        now.dedup();
        if now == self.draining {
            return;
        }
        self.draining = now;
        let changed: Vec<(usize, bool)> = self
            .pools
            .iter_mut()
            .filter_map(|(k, p)| {
                let d = self.draining.contains(&p.database);
                (d != p.draining).then(|| {
                    p.draining = d;
                    (k, d)
                })
            })
            .collect();
        for (pool, draining) in changed {
            if draining {
                self.pool_drain(pool);
            } else {
                self.pool_maybe_grow(pool);
            }
        }
    }

    fn pool_drain(&mut self, pool: usize) {
        self.recall_all_ahead(Some(pool));
        let p = &self.pools[pool];
        log::info!(
            "closing the pooled backends of role \"{}\" in database \"{}\": a command needs the database to itself",
            p.role,
            p.database
        );
        let mut idle = Vec::new();
        let mut attached = Vec::new();
        for (k, c) in self.conns.iter() {
            let Conn::Backend(b) = c else { continue };
            if b.pool != pool || b.pinned_to.is_some() {
                continue;
            }
            match b.phase {
                BPhase::Parked { .. } | BPhase::Login => idle.push(k),
                BPhase::Attached { .. } => attached.push(k),
            }
        }
        for k in idle {
            self.backend_close(k);
        }
        // In a transaction they finish it first; holding an idle client they
        // give it back now. Either way backend_available then closes them.
        for k in attached {
            self.backend_request_release(k, true);
        }
    }
}
