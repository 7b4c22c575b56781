//! Records the lapin version from Cargo.lock so `php --ri amqp_rs` can show it.

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut version = "unknown";
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"lapin\"" {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \"")) {
                version = v.trim_end_matches('"');
            }
            break;
        }
    }
    println!("cargo:rustc-env=AMQP_RS_LAPIN_VERSION={version}");
}
