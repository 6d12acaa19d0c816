//! The server's pluggable FE/BE output layer (`PqCommMethods`, libpq/libpq.h),
//! which pgrx 0.18 does not bind. The struct has the same six members in
//! PostgreSQL 15, 16 and 18.
use std::ffi::{c_char, c_int};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PQcommMethods {
    pub comm_reset: Option<unsafe extern "C" fn()>,
    pub flush: Option<unsafe extern "C" fn() -> c_int>,
    pub flush_if_writable: Option<unsafe extern "C" fn() -> c_int>,
    pub is_send_pending: Option<unsafe extern "C" fn() -> bool>,
    pub putmessage: Option<unsafe extern "C" fn(msgtype: c_char, s: *const c_char, len: usize) -> c_int>,
    pub putmessage_noblock: Option<unsafe extern "C" fn(msgtype: c_char, s: *const c_char, len: usize)>,
}

extern "C" {
    pub static mut PqCommMethods: *const PQcommMethods;
    /// `void (*)(Port *, int)`; Port stays opaque on the Rust side.
    pub static mut ClientAuthentication_hook: Option<unsafe extern "C" fn(port: *mut std::ffi::c_void, status: c_int)>;
}
