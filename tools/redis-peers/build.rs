//! Records the versions of the peer crates that Cargo.lock resolved, so the
//! report names exactly what was measured.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for (krate, var) in [
        ("redis", "PEER_REDIS_RS_VERSION"),
        ("fred", "PEER_FRED_VERSION"),
        ("tokio", "PEER_TOKIO_VERSION"),
    ] {
        println!("cargo:rustc-env={var}={}", locked_version(&lock, krate));
    }
}

/// The version of `name` in a Cargo.lock, or "unknown".
fn locked_version(lock: &str, name: &str) -> String {
    let want = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == want
            && let Some(v) = lines
                .next()
                .and_then(|l| l.trim().strip_prefix("version = "))
        {
            return v.trim_matches('"').to_owned();
        }
    }
    "unknown".to_owned()
}
