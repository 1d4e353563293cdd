//! Reads the hardware inventory straight from `/sys` and `/proc` (no udev,
//! no `lsblk`): SMBIOS identity, CPUs, memory, NICs and block devices.
//!
//! Every path is under a root parameter, so a fake tree in a temp dir tests
//! this without a VM. A file that is missing or unreadable leaves its field
//! `None`; only the shape of the tree decides what is listed.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use shoal_protocol::inventory::{human_bytes, Cpus, Disk, Inventory, MacAddr, Nic, System};

/// Collects the inventory of the machine whose `/sys` and `/proc` are under `root`.
pub fn collect(root: &Path) -> Inventory {
    let sys = root.join("sys");
    let proc = root.join("proc");
    Inventory {
        system: system(&sys.join("class/dmi/id")),
        cpus: cpus(&sys, &proc),
        memory_bytes: memory(&proc),
        nics: nics(&sys),
        disks: disks(&sys),
    }
}

/// A trimmed, non-empty attribute; `None` for missing files and the
/// placeholders firmware puts in empty fields.
fn attr(path: &Path) -> Option<String> {
    let s = fs::read_to_string(path).ok()?;
    let s = s.trim();
    let placeholder = [
        "",
        "None",
        "Not Specified",
        "To Be Filled By O.E.M.",
        "Default string",
        "0",
    ];
    (!placeholder.contains(&s)).then(|| s.to_owned())
}

fn num<T: std::str::FromStr>(path: &Path) -> Option<T> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn system(dmi: &Path) -> System {
    System {
        vendor: attr(&dmi.join("sys_vendor")),
        product: attr(&dmi.join("product_name")),
        serial: attr(&dmi.join("product_serial")),
        uuid: attr(&dmi.join("product_uuid")).map(|u| u.to_ascii_lowercase()),
    }
}

/// Counts a CPU list such as `0-3,6,8-9`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(n)
}

fn cpus(sys: &Path, proc: &Path) -> Cpus {
    let cpuinfo = fs::read_to_string(proc.join("cpuinfo")).unwrap_or_default();
    let model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .and_then(|r| r.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
    });
    let count = fs::read_to_string(sys.join("devices/system/cpu/online"))
        .ok()
        .and_then(|s| count_cpu_list(&s))
        .unwrap_or_else(|| {
            cpuinfo
                .lines()
                .filter(|l| l.starts_with("processor"))
                .count() as u32
        });
    Cpus {
        count,
        model,
        // What the CPU this binary runs on can do (not a file: the agent
        // itself will run the cipher).
        aes: shoal_protocol::multicast::hardware_aes(),
    }
}

fn memory(proc: &Path) -> Option<u64> {
    let meminfo = fs::read_to_string(proc.join("meminfo")).ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn link_name(path: &Path) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

fn nics(sys: &Path) -> Vec<Nic> {
    let class = sys.join("class/net");
    let mut out = Vec::new();
    for name in sorted_entries(&class) {
        let dir = class.join(&name);
        // Physical (and virtio) NICs have a device; lo, bridges, veth do not.
        if !dir.join("device").exists() {
            continue;
        }
        let Some(mac) = attr(&dir.join("address")).and_then(|m| MacAddr::parse(&m).ok()) else {
            continue;
        };
        let carrier = num::<u8>(&dir.join("carrier")).map(|c| c == 1);
        let speed_mbps = num::<i64>(&dir.join("speed"))
            .filter(|&s| s > 0)
            .map(|s| s as u32);
        let driver = link_name(&dir.join("device/driver"));
        out.push(Nic {
            name,
            mac,
            driver,
            carrier,
            speed_mbps,
        });
    }
    out
}

/// Block devices that are not disks we would ever deploy to.
fn skip_block(name: &str, dir: &Path) -> bool {
    const VIRTUAL: [&str; 5] = ["ram", "zram", "dm-", "sr", "fd"];
    if VIRTUAL.iter().any(|p| name.starts_with(p)) {
        return true;
    }
    // A loop device counts only while it has a backing file (tests use one as a disk).
    name.starts_with("loop") && !dir.join("loop/backing_file").exists()
}

/// The serial number a SCSI disk reports in VPD page 0x80.
fn vpd_serial(path: &Path) -> Option<String> {
    let page = fs::read(path).ok()?;
    let len = usize::from(*page.get(3)?);
    let s = String::from_utf8_lossy(page.get(4..4 + len)?)
        .trim()
        .to_owned();
    (!s.is_empty()).then_some(s)
}

fn disks(sys: &Path) -> Vec<Disk> {
    let block = sys.join("block");
    let mut out = Vec::new();
    for name in sorted_entries(&block) {
        let dir = block.join(&name);
        if skip_block(&name, &dir) {
            continue;
        }
        let Some(sectors) = num::<u64>(&dir.join("size")) else {
            continue;
        };
        let dev = dir.join("device");
        let serial = attr(&dir.join("serial"))
            .or_else(|| attr(&dev.join("serial")))
            .or_else(|| vpd_serial(&dev.join("vpd_pg80")));
        let wwn = attr(&dir.join("wwid"))
            .or_else(|| attr(&dev.join("wwid")))
            .or_else(|| attr(&dev.join("wwn")));
        out.push(Disk {
            size_bytes: sectors * 512, // `size` is always in 512-byte units
            logical_sector: num(&dir.join("queue/logical_block_size")).unwrap_or(512),
            physical_sector: num(&dir.join("queue/physical_block_size")).unwrap_or(512),
            rotational: num::<u8>(&dir.join("queue/rotational")) == Some(1),
            removable: num::<u8>(&dir.join("removable")) == Some(1),
            model: attr(&dev.join("model")),
            serial,
            wwn,
            name,
        });
    }
    out
}

/// The console summary, one line per item, easy to read and to grep.
pub fn summary(inv: &Inventory) -> String {
    let or = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
    let s = &inv.system;
    let mut out = String::from("inventory:\n");
    let _ = writeln!(
        out,
        "  system  {} {} serial {} uuid {}",
        or(&s.vendor),
        or(&s.product),
        or(&s.serial),
        or(&s.uuid)
    );
    let _ = writeln!(
        out,
        "  cpus    {} x {}{}",
        inv.cpus.count,
        or(&inv.cpus.model),
        if inv.cpus.aes {
            ", AES instructions"
        } else {
            ""
        }
    );
    let mem = inv
        .memory_bytes
        .map(human_bytes)
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(out, "  memory  {mem}");
    if inv.nics.is_empty() {
        let _ = writeln!(out, "  nic     none found");
    }
    for n in &inv.nics {
        let link = match n.carrier {
            Some(true) => "link up",
            Some(false) => "no carrier",
            None => "link unknown",
        };
        let speed = n
            .speed_mbps
            .map(|s| format!(" {s} Mb/s"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  nic     {} {} driver {} {link}{speed}",
            n.name,
            n.mac,
            or(&n.driver)
        );
    }
    if inv.disks.is_empty() {
        let _ = writeln!(out, "  disk    none found");
    }
    for d in &inv.disks {
        let kind = if d.rotational { "hdd" } else { "ssd" };
        let removable = if d.removable { " removable" } else { "" };
        let _ = writeln!(
            out,
            "  disk    {} {} ({} bytes) sectors {}/{} {kind}{removable} model {} serial {} wwn {}",
            d.name,
            human_bytes(d.size_bytes),
            d.size_bytes,
            d.logical_sector,
            d.physical_sector,
            or(&d.model),
            or(&d.serial),
            or(&d.wwn)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn fake_machine(root: &Path) {
        put(root, "sys/class/dmi/id/sys_vendor", "QEMU\n");
        put(
            root,
            "sys/class/dmi/id/product_name",
            "Standard PC (i440FX + PIIX, 1996)\n",
        );
        put(root, "sys/class/dmi/id/product_serial", "Not Specified\n");
        put(
            root,
            "sys/class/dmi/id/product_uuid",
            "5A0B7C1E-0000-4000-8000-00000000ABCD\n",
        );
        put(root, "sys/devices/system/cpu/online", "0-1,3\n");
        put(
            root,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+\n\nprocessor\t: 1\n",
        );
        put(
            root,
            "proc/meminfo",
            "MemTotal:         501234 kB\nMemFree: 1 kB\n",
        );
        // A virtio NIC with a driver link, and lo (no device: left out).
        let pci = root.join("sys/devices/pci0000:00/0000:00:03.0/virtio0");
        fs::create_dir_all(&pci).unwrap();
        fs::create_dir_all(root.join("sys/bus/virtio/drivers/virtio_net")).unwrap();
        symlink(
            root.join("sys/bus/virtio/drivers/virtio_net"),
            pci.join("driver"),
        )
        .unwrap();
        put(root, "sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        put(root, "sys/class/net/eth0/carrier", "1\n");
        put(root, "sys/class/net/eth0/speed", "-1\n");
        symlink(&pci, root.join("sys/class/net/eth0/device")).unwrap();
        put(root, "sys/class/net/lo/address", "00:00:00:00:00:00\n");
        // Two virtio disks, a RAM disk and an unbacked loop device (left out).
        for (name, sectors, serial) in [("vda", "131072", "shoal-disk-1"), ("vdb", "65536", "")] {
            put(
                root,
                &format!("sys/block/{name}/size"),
                &format!("{sectors}\n"),
            );
            put(
                root,
                &format!("sys/block/{name}/serial"),
                &format!("{serial}\n"),
            );
            put(
                root,
                &format!("sys/block/{name}/queue/logical_block_size"),
                "512\n",
            );
            put(
                root,
                &format!("sys/block/{name}/queue/physical_block_size"),
                "4096\n",
            );
            put(root, &format!("sys/block/{name}/queue/rotational"), "0\n");
            put(root, &format!("sys/block/{name}/removable"), "0\n");
        }
        put(root, "sys/block/ram0/size", "8192\n");
        put(root, "sys/block/loop0/size", "0\n");
        // A SCSI disk with its serial in VPD page 0x80 and a WWID.
        put(root, "sys/block/sda/size", "2097152\n");
        put(root, "sys/block/sda/queue/rotational", "1\n");
        put(root, "sys/block/sda/device/model", "QEMU HARDDISK   \n");
        put(root, "sys/block/sda/device/wwid", "naa.5000c500a1b2c3d4\n");
        let mut vpd = vec![0u8, 0x80, 0, 6];
        vpd.extend_from_slice(b"SN1234");
        fs::write(root.join("sys/block/sda/device/vpd_pg80"), vpd).unwrap();
    }

    #[test]
    fn reads_a_fake_machine() {
        let dir = tempfile::tempdir().unwrap();
        fake_machine(dir.path());
        let inv = collect(dir.path());
        assert_eq!(inv.system.vendor.as_deref(), Some("QEMU"));
        assert_eq!(
            inv.system.serial, None,
            "placeholder serials are not serials"
        );
        assert_eq!(
            inv.system.uuid.as_deref(),
            Some("5a0b7c1e-0000-4000-8000-00000000abcd")
        );
        assert_eq!(inv.cpus.count, 3);
        assert_eq!(
            inv.cpus.model.as_deref(),
            Some("QEMU Virtual CPU version 2.5+")
        );
        assert_eq!(inv.memory_bytes, Some(501234 * 1024));

        assert_eq!(inv.nics.len(), 1);
        let nic = &inv.nics[0];
        assert_eq!(
            (nic.name.as_str(), nic.mac.to_string().as_str()),
            ("eth0", "52:54:00:12:34:56")
        );
        assert_eq!(nic.driver.as_deref(), Some("virtio_net"));
        assert_eq!((nic.carrier, nic.speed_mbps), (Some(true), None));

        let names: Vec<&str> = inv.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["sda", "vda", "vdb"]);
        let vda = &inv.disks[1];
        assert_eq!(
            (vda.size_bytes, vda.logical_sector, vda.physical_sector),
            (64 << 20, 512, 4096)
        );
        assert_eq!(vda.serial.as_deref(), Some("shoal-disk-1"));
        assert_eq!(inv.disks[2].serial, None);
        let sda = &inv.disks[0];
        assert!(sda.rotational);
        assert_eq!(sda.model.as_deref(), Some("QEMU HARDDISK"));
        assert_eq!(sda.serial.as_deref(), Some("SN1234"));
        assert_eq!(sda.wwn.as_deref(), Some("naa.5000c500a1b2c3d4"));

        let text = summary(&inv);
        assert!(text.contains("  disk    vda 64.0 MiB (67108864 bytes) sectors 512/4096 ssd model - serial shoal-disk-1"), "{text}");
        assert!(
            text.contains("  nic     eth0 52:54:00:12:34:56 driver virtio_net link up\n"),
            "{text}"
        );
    }

    #[test]
    fn an_empty_tree_is_an_empty_inventory_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let inv = collect(dir.path());
        // Only what the CPU itself says is there.
        let mut empty = Inventory::default();
        empty.cpus.aes = shoal_protocol::multicast::hardware_aes();
        assert_eq!(inv, empty);
        assert!(summary(&inv).contains("disk    none found"));
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-7\n"), Some(8));
        assert_eq!(count_cpu_list("0-1,4-5,9"), Some(5));
        assert_eq!(count_cpu_list("3-1"), None);
    }
}
