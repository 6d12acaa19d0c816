//! Reads pgbench's summary so tests assert on numbers, not on text.

/// The end-of-run summary of `pgbench` (PostgreSQL 15 and 16 format).
#[derive(Clone, Debug, PartialEq)]
pub struct PgbenchSummary {
    /// "number of transactions actually processed: N/M": N.
    pub processed: u64,
    /// M, when pgbench ran a fixed number of transactions (`-t`).
    pub expected: Option<u64>,
    /// "number of failed transactions: N" (absent in older pgbench).
    pub failed: Option<u64>,
    /// "tps = X (without initial connection time)".
    pub tps: Option<f64>,
}

/// Parses pgbench's stdout; `None` if it has no summary (it failed early).
pub fn parse_summary(stdout: &str) -> Option<PgbenchSummary> {
    let mut processed = None;
    let mut expected = None;
    let mut failed = None;
    let mut tps = None;
    for line in stdout.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("number of transactions actually processed:") {
            let mut it = rest.trim().split('/');
            processed = it.next().and_then(|v| v.trim().parse().ok());
            expected = it.next().and_then(|v| v.trim().parse().ok());
        } else if let Some(rest) = line.strip_prefix("number of failed transactions:") {
            failed = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        } else if let Some(rest) = line.strip_prefix("tps =") {
            if line.contains("without initial connection time") || tps.is_none() {
                tps = rest.split_whitespace().next().and_then(|v| v.parse().ok());
            }
        }
    }
    Some(PgbenchSummary {
        processed: processed?,
        expected,
        failed,
        tps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pg16_summary() {
        let out = "transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 4
number of threads: 1
maximum number of tries: 1
number of transactions per client: 50
number of transactions actually processed: 200/200
number of failed transactions: 0 (0.000%)
latency average = 0.512 ms
initial connection time = 9.123 ms
tps = 7812.345678 (without initial connection time)
";
        let s = parse_summary(out).expect("summary");
        assert_eq!(s.processed, 200);
        assert_eq!(s.expected, Some(200));
        assert_eq!(s.failed, Some(0));
        assert!((s.tps.expect("tps") - 7812.345678).abs() < 1e-6);
        assert_eq!(parse_summary("pgbench: error: connection failed"), None);
    }
}
