//! QEMU tests: the real Debian kernel boots our initramfs under TCG, the
//! agent runs as `/init`, loads the virtio drivers, reports its inventory
//! and gets a DHCP lease; and bad input on the real machine (malformed
//! command-line keys, a NIC without carrier, a network that never answers)
//! gives a clear console message while the agent keeps running.

use std::time::Duration;

use shoal_tests::vm::{NetBackend, Vm, VmBuilder};
use shoal_tests::{artefact, require_program};

const MAC: &str = "52:54:00:12:34:56";
const UUID: &str = "5a0b7c1e-0000-4000-8000-00000000abcd";
/// Boot to `/init` takes ~3 s under TCG when the machine is quiet; leave
/// room for a loaded CI machine.
const BOOT: Duration = Duration::from_secs(90);

fn disks(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let d1 = dir.join("disk1.img");
    let d2 = dir.join("disk2.img");
    std::fs::File::create(&d1)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    std::fs::File::create(&d2)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    (d1, d2)
}

fn lab_vm(name: &str) -> VmBuilder {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    VmBuilder::new(
        artefact("SHOAL_KERNEL_IMAGE"),
        artefact("SHOAL_INITRAMFS_LAB"),
    )
    .name(name)
}

fn finish(vm: &mut Vm, name: &str) {
    let path = std::env::temp_dir().join(format!("shoal-{name}-console.log"));
    let _ = vm.console().save(&path);
    eprintln!("console transcript: {}", path.display());
}

#[test]
fn qemu_agent_boots_reports_inventory_and_lease() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, d2) = disks(dir.path());
    let mut vm = lab_vm("boot")
        .append("shoal.then=poweroff")
        .smbios(UUID, "SHOAL-TEST-0001")
        .disk(&d1, Some("shoal-disk-1"))
        .disk(&d2, Some("shoal-disk-2"))
        .nic(MAC, NetBackend::User)
        .start()
        .unwrap();
    let c = vm.console();
    c.expect("starting as PID 1", BOOT).unwrap();
    c.expect("loaded module virtio_pci for", BOOT).unwrap();
    c.expect("devices without a module", BOOT).unwrap();
    for m in ["virtio_net", "virtio_blk"] {
        assert!(
            c.saw(&format!("loaded module {m} for")),
            "{m} not loaded:\n{}",
            c.tail(4000)
        );
    }
    let system = c.expect("system  QEMU", BOOT).unwrap();
    assert!(
        system.ends_with(&format!("serial SHOAL-TEST-0001 uuid {UUID}")),
        "{system}"
    );
    c.expect(&format!("nic     eth0 {MAC} driver virtio_net"), BOOT)
        .unwrap();
    let vda = c
        .expect("disk    vda 64.0 MiB (67108864 bytes)", BOOT)
        .unwrap();
    assert!(vda.contains("serial shoal-disk-1"), "{vda}");
    let vdb = c
        .expect("disk    vdb 32.0 MiB (33554432 bytes)", BOOT)
        .unwrap();
    assert!(vdb.contains("serial shoal-disk-2"), "{vdb}");
    let lease = c
        .expect(
            &format!("lease acquired on eth0 ({MAC}): 10.0.2.15/24"),
            BOOT,
        )
        .unwrap();
    assert!(lease.contains("router 10.0.2.2"), "{lease}");
    c.expect("powering off", BOOT).unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    finish(&mut vm, "boot");
    assert!(status.success(), "QEMU exited with {status}");
}

#[test]
fn qemu_bad_input_is_reported_and_the_agent_keeps_going() {
    // Malformed keys, and a NIC whose link is down at boot: the agent must
    // say so, keep retrying, and get its lease once the cable is "plugged in".
    let mut vm = lab_vm("bad-input")
        .append("shoal.log=loud shoal.bogus=1 shoal.dhcp_timeout=x shoal.carrier_wait=2 shoal.then=poweroff")
        .nic(MAC, NetBackend::User)
        .paused()
        .start()
        .unwrap();
    vm.monitor("set_link n0 off").unwrap();
    vm.resume().unwrap();
    let c = vm.console();
    c.expect(
        "kernel command line: shoal.log: \"loud\" is not one of",
        BOOT,
    )
    .unwrap();
    c.expect(
        "kernel command line: shoal.bogus: unknown key; ignored",
        BOOT,
    )
    .unwrap();
    c.expect(
        "kernel command line: shoal.dhcp_timeout: \"x\" is not a whole number",
        BOOT,
    )
    .unwrap();
    c.expect("disk    none found", BOOT).unwrap();
    let err = c.expect("no carrier", BOOT).unwrap();
    assert!(err.contains("eth0"), "the error names the NIC: {err}");
    c.expect("retrying in", BOOT).unwrap();
    vm.monitor("set_link n0 on").unwrap();
    let c = vm.console();
    c.expect(
        &format!("lease acquired on eth0 ({MAC}): 10.0.2.15/24"),
        BOOT,
    )
    .unwrap();
    c.expect("powering off", BOOT).unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    finish(&mut vm, "bad-input");
    assert!(status.success(), "QEMU exited with {status}");
}

#[test]
fn qemu_silent_network_retries_and_sigint_powers_off() {
    // A NIC with carrier on a hub where nobody answers DHCP: a clear error
    // and back-off, not a hang. Then Ctrl-Alt-Del (SIGINT to PID 1) is an
    // orderly power-off.
    let mut vm = lab_vm("silent")
        .append("shoal.dhcp_timeout=2")
        .nic(MAC, NetBackend::Silent)
        .start()
        .unwrap();
    let c = vm.console();
    c.expect("no DHCP answer on eth0 after 2s", BOOT).unwrap();
    c.expect("retrying in", BOOT).unwrap();
    c.expect("no DHCP answer on eth0 after 2s", BOOT).unwrap();
    vm.monitor("sendkey ctrl-alt-delete").unwrap();
    let c = vm.console();
    c.expect("SIGINT received: powering off", BOOT).unwrap();
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    finish(&mut vm, "silent");
    assert!(status.success(), "QEMU exited with {status}");
}
