//! Which TLS versions the pooler offers, from the server's
//! `ssl_min_protocol_version` / `ssl_max_protocol_version` (values as
//! `SHOW` prints them: `TLSv1`, `TLSv1.1`, `TLSv1.2`, `TLSv1.3`; an empty
//! maximum means no limit, guc_tables.c `ssl_protocol_versions_info`).
//! The pooler's TLS library (rustls) has TLS 1.2 and 1.3 only.

/// The versions the pooler offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsVersions {
    /// TLS 1.2 allowed.
    pub tls12: bool,
    /// TLS 1.3 allowed.
    pub tls13: bool,
}

/// `TLSv1` .. `TLSv1.3` as 10..13; anything else (the empty maximum) None.
fn number(v: &str) -> Option<u8> {
    match v {
        "TLSv1" => Some(10),
        "TLSv1.1" => Some(11),
        "TLSv1.2" => Some(12),
        "TLSv1.3" => Some(13),
        _ => None,
    }
}

/// TLS 1.2 and 1.3 as far as `[min, max]` allows them; Err(reason) when it
/// allows neither (the pooler cannot honour the setting).
pub fn allowed_versions(min: &str, max: &str) -> Result<TlsVersions, String> {
    let lo = number(min).unwrap_or(10);
    let hi = number(max).unwrap_or(u8::MAX);
    let v = TlsVersions { tls12: (lo..=hi).contains(&12), tls13: (lo..=hi).contains(&13) };
    if !v.tls12 && !v.tls13 {
        return Err(format!(
            "ssl_min_protocol_version = '{min}' and ssl_max_protocol_version = '{max}' leave no TLS version the pooler supports (TLSv1.2, TLSv1.3)"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(min: &str, max: &str) -> (bool, bool) {
        let v = allowed_versions(min, max).unwrap();
        (v.tls12, v.tls13)
    }

    #[test]
    fn defaults_allow_both() {
        // The server's defaults: TLSv1.2 and no maximum.
        assert_eq!(ok("TLSv1.2", ""), (true, true));
        assert_eq!(ok("TLSv1", ""), (true, true));
    }

    #[test]
    fn bounds_narrow() {
        assert_eq!(ok("TLSv1.3", ""), (false, true));
        assert_eq!(ok("TLSv1.2", "TLSv1.2"), (true, false));
        assert_eq!(ok("TLSv1", "TLSv1.2"), (true, false));
        assert_eq!(ok("TLSv1.3", "TLSv1.3"), (false, true));
    }

    #[test]
    fn nothing_left_is_an_error() {
        assert!(allowed_versions("TLSv1", "TLSv1.1").is_err());
        assert!(allowed_versions("TLSv1", "TLSv1").is_err());
        // min above max: the server refuses to start; nothing here either.
        assert!(allowed_versions("TLSv1.3", "TLSv1.2").is_err());
    }
}

/// OpenSSL's name (`SSL_CIPHER_get_name`, what `pg_stat_ssl.cipher` shows)
/// and secret bits (`SSL_CIPHER_get_bits`, `pg_stat_ssl.bits`) of a cipher
/// suite the pooler's TLS library can negotiate, from its IANA name as
/// rustls spells it (`TLS13_AES_256_GCM_SHA384`,
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`). None for a suite not listed
/// (rustls negotiates only these with its default providers).
pub fn openssl_cipher(rustls_name: &str) -> Option<(&'static str, i32)> {
    Some(match rustls_name {
        "TLS13_AES_256_GCM_SHA384" => ("TLS_AES_256_GCM_SHA384", 256),
        "TLS13_AES_128_GCM_SHA256" => ("TLS_AES_128_GCM_SHA256", 128),
        "TLS13_CHACHA20_POLY1305_SHA256" => ("TLS_CHACHA20_POLY1305_SHA256", 256),
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => ("ECDHE-ECDSA-AES256-GCM-SHA384", 256),
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => ("ECDHE-ECDSA-AES128-GCM-SHA256", 128),
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => ("ECDHE-ECDSA-CHACHA20-POLY1305", 256),
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => ("ECDHE-RSA-AES256-GCM-SHA384", 256),
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => ("ECDHE-RSA-AES128-GCM-SHA256", 128),
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => ("ECDHE-RSA-CHACHA20-POLY1305", 256),
        _ => return None,
    })
}

#[cfg(test)]
mod cipher_tests {
    use super::openssl_cipher;

    // Names and bits as `openssl ciphers -v` (OpenSSL 3.0) lists them.
    #[test]
    fn openssl_names_and_bits() {
        assert_eq!(openssl_cipher("TLS13_AES_256_GCM_SHA384"), Some(("TLS_AES_256_GCM_SHA384", 256)));
        assert_eq!(openssl_cipher("TLS13_AES_128_GCM_SHA256"), Some(("TLS_AES_128_GCM_SHA256", 128)));
        assert_eq!(openssl_cipher("TLS13_CHACHA20_POLY1305_SHA256"), Some(("TLS_CHACHA20_POLY1305_SHA256", 256)));
        assert_eq!(openssl_cipher("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"), Some(("ECDHE-RSA-AES256-GCM-SHA384", 256)));
        assert_eq!(openssl_cipher("TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"), Some(("ECDHE-ECDSA-CHACHA20-POLY1305", 256)));
        assert_eq!(openssl_cipher("TLS_RSA_WITH_NULL_SHA"), None);
    }
}

/// Parking an idle TLS client (the pooler's `park`): called at each janitor
/// tick with the mark left by the previous tick (`mark`: the client's
/// transaction count when it was last seen idle, None when it was not),
/// whether the client may be parked now (`idle`: idle in the pooler,
/// nothing buffered, on a relay thread, handshake done) and its transaction
/// count now. Returns the new mark and whether to park it now: only a
/// client seen idle at two ticks in a row with no transaction between (so
/// idle for at least one tick, 1 s) is parked.
pub fn park_due(mark: Option<i64>, idle: bool, xacts: i64) -> (Option<i64>, bool) {
    if !idle {
        (None, false)
    } else if mark == Some(xacts) {
        (None, true)
    } else {
        (Some(xacts), false)
    }
}

#[cfg(test)]
mod park_tests {
    use super::park_due;

    #[test]
    fn parked_after_two_idle_ticks_without_a_transaction() {
        // First idle tick marks, the second parks.
        let (m, park) = park_due(None, true, 3);
        assert_eq!((m, park), (Some(3), false));
        assert_eq!(park_due(m, true, 3), (None, true));
        // A transaction between the ticks starts over.
        assert_eq!(park_due(Some(3), true, 4), (Some(4), false));
        // Not idle at a tick (attached, waiting, output pending): no mark.
        assert_eq!(park_due(Some(3), false, 3), (None, false));
        assert_eq!(park_due(None, false, 0), (None, false));
    }
}
