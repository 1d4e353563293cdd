//! QEMU fleet test: two guests boot the real kernel and initramfs on one L2
//! segment (tap devices on a bridge in a network namespace, dnsmasq serving
//! DHCP there), register with a Controller listening on the bridge, and run
//! an `echo` + `poweroff` job; both guests power off and the job succeeds.

use std::time::Duration;

use shoal_tests::netns::Dnsmasq;
use shoal_tests::site::{Controller, Lan};
use shoal_tests::vm::{NetBackend, VmBuilder};
use shoal_tests::{artefact, require_program};

const BOOT: Duration = Duration::from_secs(120);

#[test]
fn qemu_two_agents_register_and_run_echo_then_poweroff() {
    require_program("qemu-system-x86_64", "qemu-system-x86");
    let mut lan = Lan::new();
    let net = format!("10.88.{}", lan.subnet);
    let _dhcp = Dnsmasq::start(
        &lan.ns,
        "br0",
        &[
            format!("--dhcp-range={net}.50,{net}.99,255.255.255.0,1h"),
            format!("--dhcp-option=option:router,{net}.1"),
        ],
    );
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
    let job = out
        .lines()
        .find_map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .find(|w| !w.is_empty())
                .map(str::to_owned)
        })
        .unwrap();
    let shown = ctl.ctl_ok(&["jobs", "show", &job]);
    assert_eq!(shown.matches("hello from the fleet").count(), 2, "{shown}");
    assert!(!shown.contains("failed"), "{shown}");
}
