//! Switching a pooled backend's session from one client to the next.
//!
//! The previous client's session must vanish (DISCARD ALL) and the new
//! client's must appear as it left it on its last backend: its startup
//! settings (source "client", so RESET returns to them), then what it changed
//! with SET or set_config() (source "session"), then its named prepared
//! statements under its own names, each created when the client first names
//! it here (see `Pending`). DISCARD ALL does not undo client-sourced
//! values, so every setting a previous client supplied at startup is first
//! put back to this backend's own value from its login, remembered the first
//! time any client touched it (right after a DISCARD, so it is the login's).
//!
//! Most switches need none of that: when the previous client left no setting
//! behind (the trackers in session.c saw no SET, and pinned state never gets
//! here), the next client has the same startup settings and no SET of its
//! own, and every named prepared statement the backend has is one the next
//! client has too (same name, text, parameter and result types: typically
//! none, or the same application's), the session already is what the next client
//! would get, so only the sequence caches are dropped (currval/lastval).
use crate::pg::session as s;
use nextgres_core::control::{RawStatement, SessionImage, Statement, StatementList};
use nextgres_core::told::Told;
use std::cell::{Cell, RefCell};

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
    /// A setting changed since the last switch (a SET, SET LOCAL or
    /// set_config, even one undone since): the statements created meanwhile
    /// may have been analyzed under it, so none is kept for another client.
    touched: bool,
    /// The named prepared statements this backend has created.
    statements: StatementList,
}

/// The attached client's prepared statements that exist for it (as on a
/// direct connection they exist from Parse/PREPARE until Close/DEALLOCATE/
/// DISCARD) but are not created on this backend yet: created when the
/// client first names one (session.c watches for that), in the image's order.
/// The image's list stays in its wire layout: an entry is decoded only when
/// its statement is created here.
#[derive(Default)]
struct Pending {
    list: StatementList,
    /// Byte offset of each entry in `list`, u32::MAX once taken.
    offsets: Vec<u32>,
    /// (hash of the name, entry number), sorted: built at every switch, so
    /// one allocation rather than a map of copied names.
    index: Vec<(u64, u32)>,
    left: usize,
}

/// FNV-1a: names are short and chosen by drivers, not adversaries of the
/// backend's own client (a collision only costs a comparison).
fn name_hash(name: &[u8]) -> u64 {
    name.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

const TAKEN: u32 = u32::MAX;

impl Pending {
    fn set(&mut self, statements: StatementList) {
        let mut offsets = Vec::with_capacity(statements.len());
        let mut index = Vec::with_capacity(statements.len());
        for (i, (off, name)) in statements.names().enumerate() {
            offsets.push(off as u32);
            index.push((name_hash(name), i as u32));
        }
        index.sort_unstable();
        self.index = index;
        self.left = offsets.len();
        self.offsets = offsets;
        self.list = statements;
    }
    /// Entry `i`, unless taken.
    fn get(&self, i: usize) -> Option<RawStatement<'_>> {
        match self.offsets.get(i) {
            Some(&off) if off != TAKEN => self.list.at(off as usize),
            _ => None,
        }
    }
    /// Entry number of the statement `name` not created yet.
    fn find(&self, name: &[u8]) -> Option<usize> {
        let h = name_hash(name);
        let start = self.index.partition_point(|&(x, _)| x < h);
        self.index[start..]
            .iter()
            .take_while(|&&(x, _)| x == h)
            .map(|&(_, i)| i as usize)
            .find(|&i| self.offsets[i] != TAKEN && self.list.name_is(self.offsets[i] as usize, name))
    }
    /// Marks entry `i` as taken; the statement, decoded, if it was not.
    fn take_at(&mut self, i: usize) -> Option<Statement> {
        let st = self.get(i)?.to_statement();
        self.offsets[i] = TAKEN;
        self.left -= 1;
        Some(st)
    }
    /// A statement taken whose creation failed (inside an aborted
    /// transaction, say): pending again, so its next use tries again and the
    /// client's image keeps it, where it was lost for good (26000 at every
    /// later use; hunt5-A F2).
    fn put_back(&mut self, st: &Statement) {
        let off = self.list.byte_len() as u32;
        self.list.push(st);
        let i = self.offsets.len() as u32;
        self.offsets.push(off);
        let key = (name_hash(&st.name), i);
        let at = self.index.partition_point(|&x| x < key);
        self.index.insert(at, key);
        self.left += 1;
    }
    fn take(&mut self, name: &[u8]) -> Option<Statement> {
        let i = self.find(name)?;
        self.take_at(i)
    }
    fn take_all(&mut self) -> Vec<Statement> {
        let all = self.remaining().map(|st| st.to_statement()).collect();
        *self = Pending::default();
        all
    }
    fn remaining(&self) -> impl Iterator<Item = RawStatement<'_>> {
        (0..self.offsets.len()).filter_map(|i| self.get(i))
    }
}

thread_local! {
    /// What the attached client was told of the reported settings: its
    /// image's, then what guc.c records as reported once a ParameterStatus
    /// went out (`note_told`, `take_told`).
    static TOLD: Cell<Told> = Cell::new(Told::default());
    /// A ParameterStatus went out since `TOLD` was last brought up to date.
    static TOLD_DIRTY: Cell<bool> = const { Cell::new(false) };
    /// What the pooler has of it (the ATTACH's, or the last RELEASED's).
    static TOLD_SENT: Cell<Told> = Cell::new(Told::default());

    static SHAPE: RefCell<Shape> = RefCell::new(Shape::default());
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
    /// Statements can be created when first used (session.c could install
    /// its watch on the client socket); else all are created at the switch.
    static LAZY: Cell<Option<bool>> = const { Cell::new(None) };
    /// The role and database defaults in effect on this backend (None: those
    /// of its own login, not read yet).
    static DEFAULTS: RefCell<Option<Vec<(String, String)>>> = const { RefCell::new(None) };
    /// A new client's login defaults, for the pooler at the next release.
    static REPORT_DEFAULTS: RefCell<Option<Vec<(String, String)>>> = const { RefCell::new(None) };
    /// Settings the client served last set from its startup packet (source
    /// "client"; lower-case name, value): the next full switch puts those its
    /// client does not send (or sends another value of, for [`MERGING`])
    /// back to what they are without them.
    static STARTUP_SET: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
}

/// A startup setting of the login's own transaction (transaction_isolation,
/// transaction_read_only, transaction_deferrable: every later transaction
/// starts from the default_transaction_* ones), which the pooler's login
/// has not: a direct session keeps nothing of it, so it is not applied.
/// Applied, it stayed for the next client, whose switch could not reset it
/// ("parameter ... cannot be reset", a WARNING sent to that client).
fn login_transaction_only(name: &str) -> bool {
    ["transaction_isolation", "transaction_read_only", "transaction_deferrable"].iter().any(|t| name.eq_ignore_ascii_case(t))
}

/// Settings whose new value is merged with the one in force (guc.c
/// check_datestyle keeps the style or the field order a value leaves out).
const MERGING: [&str; 1] = ["datestyle"];

fn lazy() -> bool {
    LAZY.with(|l| {
        if l.get().is_none() {
            l.set(Some(s::lazy_statements_init()));
        }
        l.get() == Some(true)
    })
}

/// A client's session starts here: the role and database defaults in force
/// now are the ones it keeps (reported to the pooler at the next release).
pub fn login_defaults() -> Vec<(String, String)> {
    let d = s::read_defaults().unwrap_or_else(current_defaults);
    REPORT_DEFAULTS.with(|r| *r.borrow_mut() = Some(d.clone()));
    d
}

/// A client is attached whose image says it was told `told`.
fn told_attached(told: Told) {
    TOLD.set(told);
    TOLD_SENT.set(told);
    TOLD_DIRTY.set(false);
}

/// A ParameterStatus is being sent to the attached client. Its value is in
/// the client's encoding, which may change; what it was told is read at the
/// release from guc.c, in the server encoding (`take_told`).
pub fn note_told() {
    TOLD_DIRTY.set(true);
}

/// What the client was told, for the pooler at a release, when it changed
/// since the attach or the last release.
pub fn take_told() -> Option<Told> {
    if TOLD_DIRTY.replace(false) {
        let mut t = TOLD.get();
        s::reported_into(&mut t);
        TOLD.set(t);
    }
    let t = TOLD.get();
    (t != TOLD_SENT.get()).then(|| {
        TOLD_SENT.set(t);
        t
    })
}

/// A new client's login defaults, once.
pub fn take_reported_defaults() -> Option<Vec<(String, String)>> {
    REPORT_DEFAULTS.with(|r| r.borrow_mut().take())
}

fn current_defaults() -> Vec<(String, String)> {
    DEFAULTS.with(|d| d.borrow_mut().get_or_insert_with(s::applied_defaults).clone())
}

fn same_defaults(a: &[(String, String)], b: &[(String, String)]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    b.sort();
    a == b
}

/// Gives this backend the client's role and database defaults (right after
/// DISCARD ALL): every setting either list names, and every startup setting
/// of the previous client in `stale` (DISCARD ALL keeps those: their source
/// "client" made them their own reset values), goes back to
/// postgresql.conf's value, then the client's defaults apply level by level
/// with the server's sources, so precedence and RESET are as at the
/// client's login.
fn apply_defaults(defaults: &[(String, String)], stale: &[String]) {
    let current = current_defaults();
    if stale.is_empty() && same_defaults(&current, defaults) {
        return;
    }
    let split = |(n, v): &(String, String)| -> Option<(i32, String, String)> {
        let level = n.chars().next()?.to_digit(10)? as i32;
        Some((level, n[1..].to_string(), v.clone()))
    };
    let mut names: Vec<String> = current.iter().chain(defaults).filter_map(split).map(|(_, n, _)| n).collect();
    names.extend(stale.iter().cloned());
    names.sort_by_key(|n| n.to_ascii_lowercase());
    names.dedup_by_key(|n| n.to_ascii_lowercase());
    for n in &names {
        s::defaults_clear(n);
    }
    s::defaults_reload();
    for (level, n, v) in defaults.iter().filter_map(split) {
        s::defaults_apply(level, &n, &v);
    }
    DEFAULTS.with(|d| *d.borrow_mut() = Some(defaults.to_vec()));
}

/// `session_start`: the client's first attach; a startup setting this
/// backend refuses then ends its session, as the server refuses the login.
pub fn switch_to(startup: &[(String, String)], image: SessionImage, session_start: bool) {
    let SessionImage { settings, statements, defaults, told } = image;
    told_attached(told);
    // A reload signalled while parked, first: the values in force are the
    // ones a client that logged in after it was told (see switch_reported).
    s::reload_if_pending();
    // The unnamed statement is not a named one and DISCARD ALL keeps it: a
    // previous client's (only one that sent Parse can have left one) is
    // dropped by the server itself before it reads this client's first
    // message, so a Bind/Describe "" without a Parse "" of its own fails
    // with 26000 as directly (session.c, "Dropping the unnamed prepared
    // statement"). The same client coming back (`attached_again`) keeps it,
    // as directly.
    if super::comm::take_parsed() && !s::close_unnamed_before_client() {
        // Once per backend process (the backend is single-threaded).
        static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::info!(
                "recv() could not be redirected, so the unnamed prepared statement survives session switches on this backend"
            );
        }
    }
    s::switch_reseed();
    let mut pending = Pending::default();
    pending.set(statements);
    let same = same_defaults(&current_defaults(), &defaults)
        && SHAPE.with(|sh| {
            let sh = sh.borrow();
            sh.known && sh.settings_clean && settings.is_empty() && sh.startup == startup
        });
    // Statements this backend already has that the client has too (same
    // name, text, parameter and result types) are kept, not created again;
    // any other is dropped, as DISCARD ALL would drop it, so the backend has
    // no named statement the client does not have. Never kept: an SQL-level
    // PREPARE sent with other statements (its plan source holds the whole
    // query string the previous client sent it in, literals and all, which
    // pg_prepared_statements shows), and any after a setting changed since
    // the last switch (a literal's value, a name's resolution may depend on
    // it: another client would get results computed under the previous
    // one's setting).
    if same && s::switch_light() {
        let drop = SHAPE.with(|sh| {
            let mut sh = sh.borrow_mut();
            let keep_any = !sh.touched;
            sh.touched = false;
            let mut keep = StatementList::default();
            let mut drop = Vec::new();
            for have in sh.statements.iter() {
                match pending.find(have.name) {
                    Some(i) if keep_any && (!have.from_sql || have.whole_query) && pending.get(i).is_some_and(|st| st.raw == have.raw) => {
                        pending.offsets[i] = TAKEN;
                        pending.left -= 1;
                        keep.push_raw(&have);
                    }
                    _ => drop.push(have.name.to_vec()),
                }
            }
            sh.statements = keep;
            drop
        });
        // Outside the borrow: fatal() unwinds through PostgreSQL's error
        // handling, which must not find SHAPE still borrowed.
        for name in drop {
            if let Err(e) = s::drop_statement(&name) {
                fatal(&e.message());
            }
        }
    } else {
        full_switch(startup, &settings, &defaults, session_start);
        SHAPE.with(|sh| {
            let mut sh = sh.borrow_mut();
            sh.known = true;
            sh.startup = startup.to_vec();
            sh.settings_clean = settings.is_empty();
            sh.touched = false;
            sh.statements = StatementList::default();
        });
    }
    PENDING.with(|p| *p.borrow_mut() = pending);
    s::analysis_new_client();
    if lazy() {
        attached_again();
    } else {
        statements_wanted_all();
    }
    if s::switch_reported(&TOLD.get()) {
        super::comm::owe_reports();
    }
}

/// The client this backend served last is attached again (no switch): its
/// statements not created yet are still watched for.
pub fn attached_again() {
    super::comm::attached();
    s::scan_attach();
    s::set_statements_pending(PENDING.with(|p| p.borrow().left > 0));
}

/// Creates a statement the client still has but this backend has not.
fn create(st: Statement) {
    match s::create_statement(&st) {
        Ok(()) => SHAPE.with(|sh| sh.borrow_mut().statements.push(&st)),
        Err(e) => {
            log::info!(
                "prepared statement \"{}\" could not be re-created: {}",
                String::from_utf8_lossy(&st.name),
                e.message()
            );
            PENDING.with(|p| p.borrow_mut().put_back(&st));
            s::set_statements_pending(true);
        }
    }
}

fn after_take() {
    if PENDING.with(|p| p.borrow().left == 0) {
        s::set_statements_pending(false);
    }
}

/// session.c: the client named statement `name` (protocol message or SQL).
#[no_mangle]
pub extern "C" fn ng_rs_statement_wanted(name: *const std::ffi::c_char) {
    if name.is_null() {
        return;
    }
    // Bytes in the database encoding, compared as bytes.
    let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_bytes();
    if let Some(st) = PENDING.with(|p| p.borrow_mut().take(name)) {
        create(st);
    }
    after_take();
}

/// session.c: all of them are needed (pg_prepared_statements, a message
/// whose name could not be read whole).
#[no_mangle]
pub extern "C" fn ng_rs_statements_wanted_all() {
    statements_wanted_all();
}

fn statements_wanted_all() {
    for st in PENDING.with(|p| p.borrow_mut().take_all()) {
        create(st);
    }
    // Those that could not be created are pending again (`create`).
    s::set_statements_pending(PENDING.with(|p| p.borrow().left > 0));
}

/// session.c: DEALLOCATE ALL or DISCARD ALL ran: the client has none left.
#[no_mangle]
pub extern "C" fn ng_rs_statements_forget() {
    PENDING.with(|p| *p.borrow_mut() = Pending::default());
    s::set_statements_pending(false);
}

/// At release: what the client changed since it was attached (None: the
/// trackers saw no change of that kind). `created` is what this backend
/// has; returns the client's statements: those plus the ones it still has
/// that were never needed here. When the backend's list could not be read
/// (`Taken::Unknown`) this backend is marked unknown, so the next client
/// gets a full switch (DISCARD ALL) and never a statement of this one; the
/// client keeps the statements it has not used here yet, and a WARNING in
/// the server log names it (its others are lost: it gets 26000 for them).
pub fn note_release(settings: Option<&[(String, String)]>, created: s::Taken) -> Option<StatementList> {
    s::set_statements_pending(false);
    SHAPE.with(|sh| {
        let mut sh = sh.borrow_mut();
        if let Some(v) = settings {
            sh.settings_clean = v.is_empty();
            // Read because something changed a setting (session.c
            // `settings_dirty`), even if nothing of it is left in force.
            sh.touched = true;
        }
        let created = match created {
            s::Taken::Unchanged => return None,
            s::Taken::List(l) => l,
            s::Taken::Unknown => {
                log::warn!("could not read this backend's prepared statements; the next client gets DISCARD ALL");
                sh.known = false;
                sh.statements = StatementList::default();
                StatementList::default()
            }
        };
        let mut all = created.clone();
        {
            let names: std::collections::HashSet<&[u8]> = created.iter().map(|c| c.name).collect();
            PENDING.with(|p| {
                for st in p.borrow().remaining().filter(|st| !names.contains(st.name)) {
                    // Hit by an invalidation here: analyzed under the
                    // settings of its first use, as the server would.
                    if !st.invalidated && s::analysis_hit(st.analysis, st.analysis_count) {
                        let mut owned = st.to_statement();
                        owned.analysis.clear();
                        owned.invalidated = true;
                        all.push(&owned);
                    } else {
                        all.push_raw(&st);
                    }
                }
            });
        }
        sh.statements = created;
        Some(all)
    })
}

/// DISCARD ALL, then the client's role and database defaults and settings.
fn full_switch(startup: &[(String, String)], settings: &[(String, String)], defaults: &[(String, String)], session_start: bool) {
    if let Err(e) = s::switch_begin(true) {
        fatal(&e.message());
    }
    // The previous client's startup settings this one does not send: a
    // custom one among them would otherwise keep its value for every later
    // client (RLS keyed on a tenant setting), and a restored value would
    // keep source "client", deaf to a reload.
    // So is one that both send with other values, where a value merges
    // with the one in force (DateStyle: the previous client's `SQL, DMY`
    // would leave DMY under this one's `ISO`, where its login gets the
    // default order).
    let stale: Vec<String> = STARTUP_SET.with(|set| {
        set.take()
            .into_iter()
            .filter(|(n, v)| match startup.iter().find(|(s, _)| s.eq_ignore_ascii_case(n)) {
                None => true,
                Some((_, now)) => MERGING.contains(&n.as_str()) && now != v,
            })
            .map(|(n, _)| n)
            .collect()
    });
    apply_defaults(defaults, &stale);
    let startup: Vec<&(String, String)> = startup.iter().filter(|(n, _)| !login_transaction_only(n)).collect();
    for (n, v) in startup.iter().copied() {
        // What the pooler's agent (in no database) could not check, e.g. a
        // default_text_search_config or default_tablespace that does not
        // exist, is refused here at the client's first query with the
        // server's FATAL (22023), where the server refuses the login; a
        // direct login would not have it otherwise. Not temp_buffers,
        // refused only because this backend used temporary tables for
        // another client (a WARNING in the server log, as later).
        let refuse = session_start && !n.eq_ignore_ascii_case("temp_buffers");
        s::switch_setting(n, v, true, refuse);
    }
    STARTUP_SET.with(|set| *set.borrow_mut() = startup.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect());
    for (n, v) in settings {
        // A role (or session authorization) that cannot be set again here
        // (revoked from the login, or dropped, since the client set it)
        // would leave the client running with its login's privileges: its
        // session ends instead (a direct session keeps the role; README).
        if !s::switch_setting(n, v, false, false) && (n == "role" || n == "session_authorization") {
            fatal(&format!("{n} \"{v}\" of this session could not be restored"));
        }
    }
    if let Err(e) = s::switch_end() {
        fatal(&e.message());
    }
}

/// DISCARD ALL between clients (a client left a pinned session).
pub fn discard() {
    if let Err(e) = s::switch_begin(true).and_then(|_| s::switch_end()) {
        fatal(&e.message());
    }
    SHAPE.with(|sh| {
        let mut sh = sh.borrow_mut();
        sh.settings_clean = true;
        sh.touched = false;
        sh.statements = StatementList::default();
    });
    ng_rs_statements_forget();
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

