//! The server's process globals and settings that nextgres reads, each
//! through a safe function here, so no other module touches `pg_sys`
//! variables. All are plain C variables of the calling process (globals.c,
//! guc_tables.c, postmaster.c), set before any nextgres code runs or by the
//! process's own configuration reload: reading them cannot race.
use pgrx::pg_sys;
use std::ffi::CStr;

/// This process's pid (`MyProcPid`, globals.c).
pub fn my_pid() -> i32 {
    // SAFETY: a plain int set at process start.
    unsafe { pg_sys::MyProcPid }
}

/// The postmaster's pid (`PostmasterPid`, globals.c).
pub fn postmaster_pid() -> i32 {
    // SAFETY: a plain int set at postmaster start, inherited by children.
    unsafe { pg_sys::PostmasterPid }
}

/// `max_connections` (a PGC_POSTMASTER setting).
pub fn max_connections() -> i32 {
    // SAFETY: a plain int GUC variable.
    unsafe { pg_sys::MaxConnections }
}

/// Is the server a standby still in recovery (xlog.c RecoveryInProgress():
/// a read of shared memory, once false always false)?
pub fn recovery_in_progress() -> bool {
    // SAFETY: reads XLogCtl's recovery state, set up in shared memory
    // before any nextgres process starts; no lock, no allocation.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// `authentication_timeout`, in seconds (0 or less: none).
pub fn authentication_timeout_s() -> i32 {
    // SAFETY: a plain int GUC variable.
    unsafe { pg_sys::AuthenticationTimeout }
}

/// `max_files_per_process` (a PGC_POSTMASTER setting).
pub fn max_files_per_process() -> i32 {
    // SAFETY: a plain int GUC variable.
    unsafe { pg_sys::max_files_per_process }
}

/// Is `password_encryption` md5 (libpq/crypt.c `Password_encryption`)?
pub fn password_encryption_is_md5() -> bool {
    // SAFETY: a plain enum (int) GUC variable.
    let v = unsafe { pg_sys::Password_encryption };
    v as u32 == pg_sys::PasswordType::PASSWORD_TYPE_MD5
}

/// The server's port (`port`, postmaster.c `PostPortNumber`).
pub fn port() -> i32 {
    // SAFETY: a plain int GUC variable.
    unsafe { pg_sys::PostPortNumber }
}

/// `listen_addresses` as the server read it ('' when unset).
pub fn listen_addresses() -> String {
    // SAFETY: a string GUC variable (NULL or NUL-terminated), copied at once.
    unsafe { super::owned_c_string(pg_sys::ListenAddresses) }.unwrap_or_default()
}

/// `unix_socket_directories` (None when unset).
pub fn unix_socket_directories() -> Option<String> {
    // SAFETY: a string GUC variable (NULL or NUL-terminated), copied at once.
    unsafe { super::owned_c_string(pg_sys::Unix_socket_directories) }
}

/// `hot_standby` (a PGC_POSTMASTER setting).
pub fn hot_standby() -> bool {
    // SAFETY: a plain bool GUC variable.
    unsafe { pg_sys::EnableHotStandby }
}

/// `ssl` (postmaster.c `EnableSSL`).
pub fn ssl_enabled() -> bool {
    // SAFETY: a plain bool GUC variable.
    unsafe { pg_sys::EnableSSL }
}

/// True while `shared_preload_libraries` is being loaded into the
/// postmaster (miscinit.c), the one time PGC_POSTMASTER settings and
/// shared memory may be requested.
pub fn preloading() -> bool {
    // SAFETY: a plain bool of miscinit.c.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// The cluster's mock authentication nonce (`GetMockAuthenticationNonce`,
/// 32 bytes from pg_control): the seed the server's SCRAM mock salts for
/// unknown roles come from. Zeros if the server has none.
pub fn mock_authentication_nonce() -> [u8; 32] {
    let mut out = [0u8; 32];
    // SAFETY: returns a pointer into the process's copy of pg_control
    // (MOCK_AUTH_NONCE_LEN = 32 bytes), or NULL before it is read.
    let p = unsafe { pg_sys::GetMockAuthenticationNonce() };
    if !p.is_null() {
        out.copy_from_slice(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), 32) });
    }
    out
}

/// Re-reads postgresql.conf as a SIGHUP does (guc-file.l
/// `ProcessConfigFile(PGC_SIGHUP)`); a value that does not parse is logged
/// and the old one kept, as in the server. `log_connections` and
/// `log_disconnections` follow the files too, as in a new backend (the
/// pooler writes those lines for its clients).
pub fn reload_config_file() {
    // SAFETY: the postmaster's own reload path; GUC state is process-local.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    // The connection log settings a reload leaves alone in this process.
    super::session::reload_connection_logging();
}

/// Sets a PGC_POSTMASTER setting in this process, overriding the file
/// (guc.c `SetConfigOption`, `PGC_S_OVERRIDE`); an invalid value raises an
/// ERROR, as SET would.
pub fn override_postmaster_setting(name: &CStr, value: &CStr) {
    // SAFETY: both strings outlive the call, which copies them.
    unsafe {
        pg_sys::SetConfigOption(name.as_ptr(), value.as_ptr(), pg_sys::GucContext::PGC_POSTMASTER, pg_sys::GucSource::PGC_S_OVERRIDE)
    };
}

/// Reserves a prefix for this extension's settings (guc.c
/// `MarkGUCPrefixReserved`): unknown `prefix.*` names in the file are then
/// warned about and removed.
pub fn reserve_setting_prefix(prefix: &CStr) {
    // SAFETY: the string outlives the call, which copies it.
    unsafe { pg_sys::MarkGUCPrefixReserved(prefix.as_ptr()) };
}
