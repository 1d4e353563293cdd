//! Properties of the built artefacts, pinned so they cannot drift: the agent
//! is fully static, the initramfs rebuilds byte for byte, stays within its
//! size budgets, and carries what the kernel and the agent need.
//!
//! Reads the paths `cargo xtask test` exports (`SHOAL_AGENT`,
//! `SHOAL_KERNEL_MODULES`, `SHOAL_KERNEL_VERSION`, `SHOAL_INITRAMFS_LAB`,
//! `SHOAL_INITRAMFS_FULL`); without them each test fails saying so.

use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use shoal_initramfs::cpio::{Entry, Parsed};
use shoal_initramfs::{Flavour, Spec};
use shoal_tests::artefact;

const MIB: u64 = 1024 * 1024;
const LAB_BUDGET: u64 = 4 * MIB;
const FULL_BUDGET: u64 = 24 * MIB;

fn kernel_version() -> String {
    std::env::var("SHOAL_KERNEL_VERSION")
        .expect("SHOAL_KERNEL_VERSION is not set: run the tests with `cargo xtask test`")
}

fn unpack(var: &str) -> Vec<Parsed> {
    let path = artefact(var);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    shoal_initramfs::unpack(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn file<'a>(entries: &'a [Parsed], name: &str) -> &'a [u8] {
    match entries.iter().find(|e| e.name == name).map(|e| &e.entry) {
        Some(Entry::File { data, .. }) => data,
        other => panic!("{name}: expected a regular file in the initramfs, found {other:?}"),
    }
}

#[test]
fn agent_is_fully_static() {
    let path = artefact("SHOAL_AGENT");
    let data = std::fs::read(&path).unwrap();
    let header =
        elf::FileHeader64::<object::Endianness>::parse(&*data).expect("agent is a 64-bit ELF");
    let endian = header.endian().unwrap();
    let mut needed = Vec::new();
    for ph in header.program_headers(endian, &*data).unwrap() {
        if let Some(interp) = ph.interpreter(endian, &*data).unwrap() {
            panic!(
                "agent has a PT_INTERP ({}): it is dynamically linked",
                String::from_utf8_lossy(interp)
            );
        }
        if let Some(dynamic) = ph.dynamic(endian, &*data).unwrap() {
            needed.extend(
                dynamic
                    .iter()
                    .filter(|d| d.d_tag(endian) == elf::DT_NEEDED)
                    .map(|d| d.d_val(endian)),
            );
        }
    }
    assert!(
        needed.is_empty(),
        "agent has {} DT_NEEDED entries: it needs shared libraries",
        needed.len()
    );
}

#[test]
fn lab_initramfs_is_reproducible() {
    let written = std::fs::read(artefact("SHOAL_INITRAMFS_LAB")).unwrap();
    // Rebuild with whatever configuration xtask put in, so the comparison
    // holds with or without one.
    let entries = shoal_initramfs::unpack(&written).unwrap();
    let config = entries
        .iter()
        .find(|e| e.name == shoal_initramfs::CONFIG_PATH)
        .map(|_| file(&entries, shoal_initramfs::CONFIG_PATH).to_vec());
    let spec = Spec {
        init: artefact("SHOAL_AGENT"),
        modules_dir: artefact("SHOAL_KERNEL_MODULES"),
        kernel_version: kernel_version(),
        flavour: Flavour::Lab,
        extra_modules: Vec::new(),
        config,
    };
    let a = shoal_initramfs::build(&spec).unwrap();
    let b = shoal_initramfs::build(&spec).unwrap();
    assert!(a.bytes == b.bytes, "two builds from the same inputs differ");
    assert!(
        a.bytes == written,
        "a rebuild differs from the file xtask wrote ({} vs {} bytes)",
        a.bytes.len(),
        written.len()
    );
}

#[test]
fn initramfs_sizes_stay_within_budget() {
    let lab = std::fs::metadata(artefact("SHOAL_INITRAMFS_LAB"))
        .unwrap()
        .len();
    let full = std::fs::metadata(artefact("SHOAL_INITRAMFS_FULL"))
        .unwrap()
        .len();
    let mib = |b: u64| b as f64 / MIB as f64;
    println!(
        "initramfs sizes: lab {:.2} MiB (budget {} MiB), full {:.2} MiB (budget {} MiB)",
        mib(lab),
        LAB_BUDGET / MIB,
        mib(full),
        FULL_BUDGET / MIB
    );
    assert!(
        lab < LAB_BUDGET,
        "lab initramfs is {:.2} MiB, over its {} MiB budget",
        mib(lab),
        LAB_BUDGET / MIB
    );
    assert!(
        full < FULL_BUDGET,
        "full initramfs is {:.2} MiB, over its {} MiB budget",
        mib(full),
        FULL_BUDGET / MIB
    );
}

#[test]
fn lab_initramfs_has_init_console_and_virtio_modules() {
    let entries = unpack("SHOAL_INITRAMFS_LAB");
    let init = entries.iter().find(|e| e.name == "init").expect("no /init");
    assert_eq!(
        init.mode, 0o100755,
        "/init must be an executable regular file"
    );
    let console = entries
        .iter()
        .find(|e| e.name == "dev/console")
        .expect("no /dev/console");
    assert_eq!(
        console.entry,
        Entry::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1
        },
        "/dev/console must be char 5:1"
    );

    let base = format!("lib/modules/{}", kernel_version());
    let dep = String::from_utf8(file(&entries, &format!("{base}/modules.dep")).to_vec()).unwrap();
    let line = dep
        .lines()
        .find(|l| l.starts_with("kernel/drivers/net/virtio_net.ko:"))
        .expect("modules.dep has no virtio_net line");
    let deps: Vec<&str> = line.split_once(':').unwrap().1.split_whitespace().collect();
    assert!(
        deps.iter().any(|d| d.ends_with("/net_failover.ko")),
        "virtio_net without net_failover: {line}"
    );
    assert!(
        deps.iter().any(|d| d.ends_with("/failover.ko")),
        "virtio_net without failover: {line}"
    );
    for d in deps
        .iter()
        .copied()
        .chain([line.split_once(':').unwrap().0])
    {
        file(&entries, &format!("{base}/{d}"));
    }

    let alias =
        String::from_utf8(file(&entries, &format!("{base}/modules.alias")).to_vec()).unwrap();
    assert!(
        alias
            .lines()
            .any(|l| l == "alias virtio:d00000001v* virtio_net"),
        "modules.alias lacks virtio_net's virtio:d00000001v*"
    );
}
