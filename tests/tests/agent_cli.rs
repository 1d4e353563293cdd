//! The agent as an ordinary process against a fake root: missing module
//! indexes and broken settings give clear messages and the agent carries on
//! to the inventory.

use std::fs;
use std::process::Command;

use shoal_tests::agent_bin;

fn put(root: &std::path::Path, rel: &str, text: &str) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

#[test]
fn missing_modules_alias_is_reported_and_bring_up_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    put(root, "proc/sys/kernel/osrelease", "6.1.0-test\n");
    put(root, "lib/modules/6.1.0-test/modules.dep", "kernel/a.ko:\n");
    put(root, "sys/block/vda/size", "2048\n");
    put(
        root,
        "etc/agent.toml",
        "log = \"info\"\nthen = \"sideways\"\n",
    );
    let out = Command::new(agent_bin())
        .args(["run", "--root"])
        .arg(root)
        .args(["--cmdline", "shoal.net=off shoal.frobnicate=1", "--config"])
        .arg(root.join("etc/agent.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {}: {err}", out.status);
    assert!(err.contains("modules.alias"), "{err}");
    assert!(err.contains("no drivers will be loaded"), "{err}");
    assert!(err.contains("frobnicate: unknown key; ignored"), "{err}");
    assert!(
        err.contains("then: \"sideways\" is not one of wait, reboot, poweroff; ignored"),
        "{err}"
    );
    assert!(err.contains("disk    vda 1.0 MiB (1048576 bytes)"), "{err}");
}

#[test]
fn inventory_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), "sys/block/vdb/size", "4096\n");
    put(dir.path(), "proc/meminfo", "MemTotal: 1024 kB\n");
    let out = Command::new(agent_bin())
        .args(["inventory", "--json", "--root"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"name\": \"vdb\"") && text.contains("\"size_bytes\": 2097152"),
        "{text}"
    );
    assert!(text.contains("\"memory_bytes\": 1048576"), "{text}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let out = Command::new(agent_bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command \"frobnicate\""));
}
