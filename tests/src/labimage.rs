//! The lab's disk image: a real GPT disk with one ext4 partition holding
//! known files, built on the host with `sfdisk` and `mkfs.ext4 -d` (no
//! mounting needed to build it), and the check that a deployed disk holds
//! it: byte for byte, then mounting the partition through a loop device.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::require_program;

/// Where the ext4 partition starts (sector 2048).
pub const PARTITION_OFFSET: u64 = 1 << 20;

/// The files the lab image's ext4 partition holds.
pub const FILES: &[(&str, &str)] = &[
    ("hello.txt", "hello from the Shoal lab image\n"),
    ("etc/hostname", "shoal-lab\n"),
    ("srv/motd", "deployed by Shoal: verified chunk by chunk\n"),
];

fn run(cmd: &mut Command, stdin: Option<&str>) {
    crate::netns::run_with_input(cmd, stdin);
}

/// Builds `dir/lab.img`: `size_mib` MiB, GPT, one Linux partition from
/// 1 MiB to the end holding an ext4 file system with `FILES`.
pub fn build(dir: &Path, size_mib: u64) -> PathBuf {
    let sfdisk = require_program("sfdisk", "fdisk");
    let mkfs = require_program("mkfs.ext4", "e2fsprogs");
    let img = dir.join("lab.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    run(
        Command::new(sfdisk).arg("-q").arg(&img),
        Some("label: gpt\nstart=2048, type=L, name=shoal-root\n"),
    );
    let tree = dir.join("tree");
    for (name, text) in FILES {
        let p = tree.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    // The GPT's backup header takes the last 33 sectors: leave the last MiB.
    let fs_mib = size_mib - 2;
    run(
        Command::new(mkfs)
            .args([
                "-q",
                "-F",
                "-L",
                "shoal-root",
                "-E",
                &format!("offset={PARTITION_OFFSET}"),
                "-d",
            ])
            .arg(&tree)
            .arg(&img)
            .arg(format!("{fs_mib}M")),
        None,
    );
    img
}

/// Mounts the ext4 partition of `disk` read-only through a loop device at
/// `PARTITION_OFFSET` and returns the contents of each of `FILES`.
pub fn read_files(disk: &Path) -> Vec<(String, String)> {
    crate::require_root("mounting the deployed ext4 partition");
    let losetup = require_program("losetup", "mount");
    let out = Command::new(&losetup)
        .args([
            "--find",
            "--show",
            "--read-only",
            "--offset",
            &PARTITION_OFFSET.to_string(),
        ])
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    struct Loop(String, PathBuf);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.1).status();
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let mnt = tempfile::tempdir().unwrap();
    let guard = Loop(dev.clone(), mnt.path().to_owned());
    let st = Command::new("mount")
        .args(["-t", "ext4", "-o", "ro,noload"])
        .arg(&dev)
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(st.success(), "mount {dev} failed");
    let files = FILES
        .iter()
        .map(|(name, _)| {
            (
                name.to_string(),
                std::fs::read_to_string(mnt.path().join(name)).unwrap_or_else(|e| format!("<{e}>")),
            )
        })
        .collect();
    drop(guard);
    files
}
