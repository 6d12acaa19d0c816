//! Best-effort wiping of key material without `unsafe` or extra crates.
//!
//! Overwriting then passing the buffer through `black_box` keeps the
//! compiler from dropping the stores as dead; it cannot reach copies the
//! program made earlier (moves, reallocation), so this narrows, not closes,
//! the window in which a memory dump reveals keys.

use std::hint::black_box;
use std::sync::atomic::{compiler_fence, Ordering};

/// Overwrites `buf` with zeros.
pub fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    black_box(&mut *buf);
    compiler_fence(Ordering::SeqCst);
}

/// Wipes and frees a string's buffer ([`wipe_string_in_place`], then the
/// drop).
pub fn wipe_string(mut s: String) {
    wipe_string_in_place(&mut s);
}

/// Overwrites a string's bytes with zeros in its own buffer (same
/// allocation, same length: NUL bytes are valid UTF-8), so a caller or a
/// test can see the wipe before the buffer is freed.
pub fn wipe_string_in_place(s: &mut String) {
    let mut bytes = std::mem::take(s).into_bytes();
    wipe(&mut bytes);
    // from_utf8 reuses the Vec's allocation; all-zero bytes are UTF-8.
    *s = String::from_utf8(bytes).unwrap_or_default();
}

/// A 32-byte key that is wiped when dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Key32(pub [u8; 32]);

impl Drop for Key32 {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipes() {
        let mut b = [7u8; 9];
        wipe(&mut b);
        assert_eq!(b, [0; 9]);
        let mut k = Key32([1; 32]);
        wipe(&mut k.0);
        assert_eq!(k.0, [0; 32]);
        // The string's own buffer is zeroed (same allocation, same length).
        let mut s = "secret".to_string();
        let at = s.as_ptr();
        wipe_string_in_place(&mut s);
        assert_eq!(s.as_bytes(), &[0u8; 6]);
        assert_eq!(s.as_ptr(), at, "the wipe must reach the original buffer");
        wipe_string(s);
        assert_eq!(format!("{:?}", Key32([5; 32])), "Key32(..)");
    }
}
