//! Harness for Shoal's end-to-end tests: where the artefacts are, network
//! namespaces with real daemons (`netns`), and QEMU guests driven over the
//! serial console (`vm`).
//!
//! `cargo xtask test` builds the artefacts and passes their paths in the
//! environment; a test whose real part is missing (no QEMU, not root, an
//! artefact not built) fails with a message that says what is missing. It
//! never passes by skipping.

use std::path::PathBuf;

pub mod client;
pub mod labimage;
pub mod netns;
pub mod proc;
pub mod proxy;
pub mod site;
pub mod vm;

/// Reads an artefact path that `cargo xtask test` exports, or fails the test
/// saying how to get it.
pub fn artefact(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.exists(), "{var}={} does not exist; run `cargo xtask test`", p.display());
            p
        }
        None => panic!("{var} is not set: run the tests with `cargo xtask test`, which builds the artefacts and sets it"),
    }
}

/// The statically linked agent (`SHOAL_AGENT`).
pub fn agent_bin() -> PathBuf {
    artefact("SHOAL_AGENT")
}

/// Fails the test unless it runs as root (network namespaces, loop devices).
pub fn require_root(what: &str) {
    // `id -u` keeps this crate free of libc for one call.
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .expect("run `id -u`");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    assert_eq!(
        uid, "0",
        "{what} needs root (creates network namespaces / devices); run as root"
    );
}

/// Fails the test unless `prog` is on PATH, naming the package that has it.
pub fn require_program(prog: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
    {
        let candidate = dir.join(prog);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{prog}` is not installed: `apt-get install -y {package}` (.ci/run does this)");
}
