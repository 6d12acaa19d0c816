//! Connection slots, as the server counts them for a login (`slots.c`).

extern "C" {
    fn ng_reserved_slots(superuser: *mut i32, reserved: *mut i32);
    fn ng_max_connections() -> i32;
    fn ng_unreserved_slots_free(n: i32) -> bool;
}

/// `(superuser_reserved_connections, reserved_connections)`; the second is 0
/// before PostgreSQL 16, which has no such setting.
pub fn reserved() -> (i32, i32) {
    let (mut su, mut res) = (0, 0);
    // SAFETY: writes two ints we own; reads two GUC variables.
    unsafe { ng_reserved_slots(&mut su, &mut res) };
    (su, res)
}

/// `max_connections`.
pub fn max_connections() -> i32 {
    // SAFETY: reads a GUC variable.
    unsafe { ng_max_connections() }
}

/// Are at least `n` connection slots free beyond the reserved ones? (A
/// non-superuser login needs one; see `slots.c`.)
pub fn unreserved_free(n: usize) -> bool {
    // SAFETY: takes the ProcStructLock spinlock briefly; shared memory is
    // attached in every process that runs this (pooler).
    unsafe { ng_unreserved_slots_free(n.min(i32::MAX as usize) as i32) }
}
