//! Routes the `log` crate into the server log (ereport at LOG/WARNING/DEBUG).
use log::{Level, LevelFilter, Log, Metadata, Record};

struct ServerLog;

impl Log for ServerLog {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }
    fn log(&self, record: &Record) {
        let msg = format!("nextgres: {}", record.args());
        match record.level() {
            Level::Error | Level::Warn => pgrx::warning!("{msg}"),
            Level::Info => pgrx::log!("{msg}"),
            Level::Debug => pgrx::debug1!("{msg}"),
            Level::Trace => pgrx::debug2!("{msg}"),
        }
    }
    fn flush(&self) {}
}

static LOGGER: ServerLog = ServerLog;

/// Called once per process that logs (pooler, pooled backends).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Trace);
    }
}
