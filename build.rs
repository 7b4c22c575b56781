//! Records what `php --ri amqp_rs` shows about the build: the lapin version from Cargo.lock,
//! and the git commit the extension was built from ("unknown" from a tarball without .git;
//! AMQP_RS_GIT_COMMIT overrides both, for builds from an exported tree).
//!
//! Only release builds (what `make` and the Debian package ship) record the commit: watching
//! git makes Cargo rebuild the crate after every commit, which debug, test and clippy builds
//! need not pay for; they say "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=Cargo.lock");
    println!("cargo:rustc-env=AMQP_RS_LAPIN_VERSION={}", lapin_version());
    println!("cargo:rerun-if-env-changed=AMQP_RS_GIT_COMMIT");
    println!("cargo:rustc-env=AMQP_RS_GIT_COMMIT={}", git_commit());
}

fn lapin_version() -> String {
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"lapin\"" {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \"")) {
                return v.trim_end_matches('"').to_string();
            }
            break;
        }
    }
    "unknown".to_string()
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn git_commit() -> String {
    if let Ok(commit) = std::env::var("AMQP_RS_GIT_COMMIT") {
        return commit;
    }
    if std::env::var("PROFILE").as_deref() != Ok("release") {
        return "unknown".to_string();
    }
    // A tarball unpacked inside some other repository must not report that repository's commit.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let ours = git(&["rev-parse", "--show-toplevel"])
        .and_then(|top| Path::new(&top).canonicalize().ok())
        .is_some_and(|top| Path::new(&manifest_dir).canonicalize().ok() == Some(top));
    if !ours {
        return "unknown".to_string();
    }
    // Only watch git's files when they exist: a watched path that is missing makes Cargo rerun
    // this script, and rebuild the crate, on every build from a tarball.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let head = Path::new(&git_dir).join("HEAD");
        if head.exists() {
            println!("cargo:rerun-if-changed={}", head.display());
        }
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let file = Path::new(&git_dir).join(&reference);
            if file.exists() {
                println!("cargo:rerun-if-changed={}", file.display());
            }
            let packed = Path::new(&git_dir).join("packed-refs");
            if packed.exists() {
                println!("cargo:rerun-if-changed={}", packed.display());
            }
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_string())
}
