//! QEMU fleet test: two guests boot the real kernel and initramfs on one L2
//! segment (tap devices on a bridge in a network namespace, dnsmasq serving
//! DHCP there), register with a Controller listening on the bridge, and run
//! an `echo` + `poweroff` job; both guests power off and the job succeeds.

use std::time::Duration;

use shoal_tests::site::{Controller, Lan};
use shoal_tests::vm::{NetBackend, VmBuilder};
use shoal_tests::{artefact, require_program};

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn qemu_two_agents_register_and_run_echo_then_poweroff() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let mut lan = Lan::new();
    let net = format!("10.88.{}", lan.subnet);
    let _dhcp = lan.start_dhcp();
    let state = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        state.path(),
        Some(&lan.ns),
        &format!("{net}.1:7000"),
        7100,
        &[],
    );
    let cmdline = ctl.agent_cmdline();

    let mut vms = Vec::new();
    for i in 1..=2u8 {
        let tap = lan.add_tap();
        let vm = VmBuilder::new(
            artefact("SHOAL_KERNEL_IMAGE"),
            artefact("SHOAL_INITRAMFS_LAB"),
        )
        .name(&format!("vm{i}"))
        .netns(lan.ns.name())
        .smbios(
            &format!("5a0b7c1e-0000-4000-8000-0000000000{i:02x}"),
            &format!("SHOAL-FLEET-{i}"),
        )
        .nic(&format!("52:54:00:00:00:{i:02x}"), NetBackend::Tap(tap))
        .append(&cmdline)
        .start()
        .unwrap();
        vms.push(vm);
    }
    for vm in &mut vms {
        let lease = vm.console().expect("lease acquired on eth0", BOOT).unwrap();
        assert!(lease.contains(&format!(": {net}.")), "{lease}");
        vm.console()
            .expect("registered with controller", BOOT)
            .unwrap();
    }
    let list = ctl.ctl_ok(&["devices", "list"]);
    assert!(
        list.contains("5a0b7c1e-0000-4000-8000-000000000001")
            && list.contains("5a0b7c1e-0000-4000-8000-000000000002"),
        "{list}"
    );

    let out = ctl.ctl_ok(&[
        "jobs",
        "run",
        "--device",
        "all",
        "--wait",
        "120",
        "echo:hello from the fleet",
        "poweroff",
    ]);
    eprintln!("{out}");
    for vm in &mut vms {
        vm.console().expect("powering off", BOOT).unwrap();
        let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(status.success(), "QEMU exited with {status}");
    }
    let job = shoal_tests::site::job_id(&out);
    let shown = ctl.ctl_ok(&["jobs", "show", &job]);
    assert_eq!(shown.matches("hello from the fleet").count(), 2, "{shown}");
    assert!(!shown.contains("failed"), "{shown}");
}

/// A LAN with DHCP and a Controller whose store holds the lab image as
/// `lab/ext4` (built under `work`; its path is returned).
fn lab_with_image(
    work: &std::path::Path,
) -> (
    Lan,
    shoal_tests::netns::Dnsmasq,
    tempfile::TempDir,
    Controller,
    std::path::PathBuf,
) {
    let source = shoal_tests::labimage::build(work, 48);
    let lan = Lan::new();
    let dhcp = lan.start_dhcp();
    let state = tempfile::tempdir().unwrap();
    let ctl = Controller::start(
        state.path(),
        Some(&lan.ns),
        &format!("{}:7000", lan.gateway()),
        7100,
        &[],
    );
    ctl.ctl_ok(&["image", "group", "create", "lab"]);
    let added = ctl.ctl_ok(&[
        "image",
        "add",
        "lab",
        source.to_str().unwrap(),
        "--name",
        "ext4",
        "--compression",
        "fast",
    ]);
    eprintln!("{added}");
    (lan, dhcp, state, ctl, source)
}

#[test]
fn qemu_deploys_the_lab_image_to_its_virtio_disk() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let work = tempfile::tempdir().unwrap();
    let (mut lan, _dhcp, _state, ctl, source) = lab_with_image(work.path());

    // Two blank disks: only the 64 MiB one can hold the 48 MiB image, so
    // `auto` has exactly one candidate.
    let big = work.path().join("big.img");
    let small = work.path().join("small.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::File::create(&small)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let tap = lan.add_tap();
    let mut vm = VmBuilder::new(
        artefact("SHOAL_KERNEL_IMAGE"),
        artefact("SHOAL_INITRAMFS_LAB"),
    )
    .name("deploy")
    .netns(lan.ns.name())
    .smbios("5a0b7c1e-0000-4000-8000-0000000000d1", "SHOAL-DEPLOY-1")
    .disk(&big, Some("target-disk"))
    .disk(&small, Some("small-disk"))
    .nic("52:54:00:00:00:d1", NetBackend::Tap(tap))
    .append(&ctl.agent_cmdline())
    .start()
    .unwrap();
    vm.console()
        .expect("registered with controller", BOOT)
        .unwrap();
    let out = ctl.ctl(&[
        "jobs",
        "run",
        "--device",
        "all",
        "--wait",
        "300",
        "deploy:lab/ext4@auto",
        "poweroff",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "deploy job failed:\n{text}\nconsole:\n{}",
        vm.console().tail(3000)
    );
    assert!(text.contains("wrote 48.0 MiB to"), "{text}");
    vm.console().expect("powering off", BOOT).unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "QEMU exited with {status}");

    // Byte for byte over the image's length, and nothing written past it.
    let want = std::fs::read(&source).unwrap();
    let got = std::fs::read(&big).unwrap();
    assert!(
        got[..want.len()] == want[..],
        "the deployed disk differs from the source image"
    );
    assert!(
        got[want.len()..].iter().all(|&b| b == 0),
        "bytes past the image were written"
    );
    assert!(
        std::fs::read(&small).unwrap().iter().all(|&b| b == 0),
        "the small disk was touched"
    );
    // And the ext4 partition mounts and holds the known files.
    for ((name, content), (want_name, want_text)) in shoal_tests::labimage::read_files(&big)
        .iter()
        .zip(shoal_tests::labimage::FILES)
    {
        assert_eq!((name.as_str(), content.as_str()), (*want_name, *want_text));
    }
}

#[test]
fn qemu_three_vms_deploy_one_image_in_one_multicast_session() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let work = tempfile::tempdir().unwrap();
    let (mut lan, _dhcp, _state, ctl, source) = lab_with_image(work.path());
    let mut vms = Vec::new();
    let mut disks = Vec::new();
    for i in 1..=3u8 {
        let disk = work.path().join(format!("disk{i}.img"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let tap = lan.add_tap();
        let vm = VmBuilder::new(
            artefact("SHOAL_KERNEL_IMAGE"),
            artefact("SHOAL_INITRAMFS_LAB"),
        )
        .name(&format!("mc{i}"))
        .netns(lan.ns.name())
        .smbios(
            &format!("5a0b7c1e-0000-4000-8000-0000000000e{i}"),
            &format!("SHOAL-MCAST-{i}"),
        )
        .disk(&disk, Some(&format!("mc-disk-{i}")))
        .nic(&format!("52:54:00:00:00:e{i}"), NetBackend::Tap(tap))
        .append(&ctl.agent_cmdline())
        .start()
        .unwrap();
        vms.push(vm);
        disks.push(disk);
    }
    for vm in &mut vms {
        vm.console()
            .expect("registered with controller", BOOT)
            .unwrap();
    }
    let out = ctl.ctl(&[
        "jobs",
        "run",
        "--device",
        "all",
        "--wait",
        "400",
        "deploy:lab/ext4@auto;min=3;wait=60",
        "poweroff",
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    let session = ctl.ctl_ok(&["--json", "sessions", "show", "job:1"]);
    eprintln!("{session}");
    assert!(
        out.status.success(),
        "deploy job failed:\n{text}\nconsoles:\n{}",
        vms.iter_mut()
            .map(|v| v.console().tail(2000).to_owned())
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
    assert_eq!(
        session.matches("\"confirmed\": true").count(),
        3,
        "{session}"
    );
    for vm in &mut vms {
        let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(status.success(), "QEMU exited with {status}");
    }
    let want = std::fs::read(&source).unwrap();
    for d in &disks {
        let got = std::fs::read(d).unwrap();
        assert!(
            got[..want.len()] == want[..],
            "{} differs from the source image",
            d.display()
        );
    }
}
