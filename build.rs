//! Compiles src/pg/glue.c against the server headers of the PostgreSQL this
//! build targets (the one pgrx-pg-sys binds for the active `pgNN` feature), so
//! struct layouts in the glue always match the server that loads us.
use std::{env, path::PathBuf, process::Command};

fn pg_config_path() -> PathBuf {
    if let Ok(p) = env::var("PGRX_PG_CONFIG_PATH") {
        return PathBuf::from(p);
    }
    let major = ["15", "16", "17", "18"]
        .into_iter()
        .find(|v| env::var(format!("CARGO_FEATURE_PG{v}")).is_ok())
        .expect("one of the pg15..pg18 features must be enabled");
    let home = env::var("PGRX_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env::var("HOME").expect("HOME")).join(".pgrx")
    });
    let config = std::fs::read_to_string(home.join("config.toml"))
        .expect("~/.pgrx/config.toml (run tools/setup)");
    let key = format!("pg{major}");
    config
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| PathBuf::from(v.trim().trim_matches('"')))
        .unwrap_or_else(|| panic!("{key} is not configured in {}", home.display()))
}

fn main() {
    println!("cargo:rerun-if-changed=src/pg/glue.c");
    println!("cargo:rerun-if-changed=src/pg/session.c");
    println!("cargo:rerun-if-changed=src/pg/dbcmd.c");
    println!("cargo:rerun-if-changed=src/pg/slots.c");
    println!("cargo:rerun-if-changed=src/pg/loginmem.c");
    println!("cargo:rerun-if-changed=src/pg/poolconf.c");
    println!("cargo:rerun-if-changed=src/pg/glue.h");
    println!("cargo:rerun-if-env-changed=PGRX_PG_CONFIG_PATH");
    let pg_config = pg_config_path();
    let out = Command::new(&pg_config)
        .arg("--includedir-server")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", pg_config.display()));
    let include = String::from_utf8(out.stdout).expect("utf8").trim().to_string();
    cc::Build::new()
        .file("src/pg/glue.c")
        .file("src/pg/session.c")
        .file("src/pg/dbcmd.c")
        .file("src/pg/slots.c")
        .file("src/pg/loginmem.c")
        .file("src/pg/poolconf.c")
        .include(&include)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-missing-field-initializers")
        .flag_if_supported("-Wno-sign-compare")
        // An undeclared function is a missing #include, never something to link by luck.
        .flag_if_supported("-Werror=implicit-function-declaration")
        .flag_if_supported("-Werror=int-conversion")
        .warnings(true)
        .compile("nextgres_glue");
}
