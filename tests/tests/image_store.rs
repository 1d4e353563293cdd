//! The image store through the real `shoalctl` and `shoal-controller`
//! binaries: groups, add (raw and qcow2), list/show/verify/export, users and
//! ACLs as an ordinary user sees them.

use std::process::Command;

use shoal_tests::site::{free_port, Controller};

fn controller() -> (tempfile::TempDir, Controller) {
    let state = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let ctl = Controller::start(state.path(), None, &listen, free_port(), &[]);
    (state, ctl)
}

/// A raw disk image: random bytes, a zero hole, more random bytes.
fn raw_image(path: &std::path::Path) -> Vec<u8> {
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut bytes: Vec<u8> = (0..(6 << 20))
        .map(|i| {
            if (2 << 20..5 << 20).contains(&i) {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8 // compressible, not trivially
            }
        })
        .collect();
    bytes.truncate(6 << 20);
    std::fs::write(path, &bytes).unwrap();
    bytes
}

#[test]
fn shoalctl_manages_images_users_and_acls() {
    shoal_tests::require_program("qemu-img", "qemu-utils");
    let (_state, ctl) = controller();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let bytes = raw_image(&raw);
    let qcow = dir.path().join("disk.qcow2");
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .unwrap();
    assert!(st.success());

    ctl.ctl_ok(&["image", "group", "create", "lab"]);
    let added = ctl.ctl_ok(&[
        "image",
        "add",
        "lab",
        raw.to_str().unwrap(),
        "--name",
        "raw",
        "--compression",
        "max",
    ]);
    assert!(added.contains("lab/raw"), "{added}");
    // Later images take the group's compression (the seed's table).
    let q = ctl.ctl_ok(&[
        "image",
        "add",
        "lab",
        qcow.to_str().unwrap(),
        "--name",
        "fromqcow",
    ]);
    assert!(q.contains("max"), "{q}");
    let list = ctl.ctl_ok(&["image", "list"]);
    assert!(
        list.contains("lab/raw") && list.contains("lab/fromqcow"),
        "{list}"
    );
    let show = ctl.ctl_ok(&["image", "show", "lab/fromqcow"]);
    assert!(show.contains("(6291456 bytes)"), "{show}");
    assert!(ctl
        .ctl_ok(&["image", "verify", "lab/raw"])
        .contains("verified"));

    // Export is verified and decodes to the same volume.
    let exported = dir.path().join("export.shoal");
    ctl.ctl_ok(&["image", "export", "lab/raw", exported.to_str().unwrap()]);
    let file = std::fs::read(&exported).unwrap();
    let image = shoal_protocol::image::Image::from_bytes(&file).unwrap();
    let mut volume = Vec::new();
    for e in &image.chunks {
        let stored = image.stored(&file, e).unwrap();
        volume.extend(shoal_protocol::image::decode_chunk(&image.header, e, stored).unwrap());
    }
    assert!(
        volume == bytes,
        "the exported image decodes to the source bytes"
    );

    // An ordinary user sees only what an ACL grants.
    let created = ctl.ctl_ok(&["users", "create", "alice"]);
    let token = created.lines().last().unwrap().trim().to_owned();
    let as_alice = |args: &[&str]| {
        let mut cmd = Command::new(shoal_tests::site::shoalctl_bin());
        cmd.args([
            "--url",
            &format!("http://127.0.0.1:{}", ctl.admin_port),
            "--token",
            &token,
        ])
        .args(args);
        cmd.output().unwrap()
    };
    let seen = String::from_utf8_lossy(&as_alice(&["image", "list"]).stdout).into_owned();
    assert!(!seen.contains("lab/raw"), "alice sees nothing yet:\n{seen}");
    ctl.ctl_ok(&["acl", "grant", "alice", "list", "lab/raw"]);
    let seen = String::from_utf8_lossy(&as_alice(&["image", "list"]).stdout).into_owned();
    assert!(
        seen.contains("lab/raw") && !seen.contains("lab/fromqcow"),
        "{seen}"
    );
    let denied = as_alice(&["devices", "list"]);
    assert!(!denied.status.success());
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
}
