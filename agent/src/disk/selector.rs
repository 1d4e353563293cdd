//! Which disk a deploy step writes: the `disk=` text of the job step parsed
//! into a [`Selector`], and [`select`], which applies it to the inventory's
//! disks and refuses unless exactly one disk matches and it is big enough.
//! It never guesses.
//!
//! `path=` ids are computed here, because the initramfs has no udev and so
//! no `/dev/disk/by-path`. `/sys/block/<name>` is a symlink into the device
//! tree, e.g. `../devices/pci0000:00/0000:00:04.0/virtio1/block/vda`; the id
//! is `pci-` and the *last* PCI address on that path (the controller the disk
//! hangs off: `pci-0000:00:04.0`), followed, when the path continues through
//! them, by `-ata-N` (an `ataN` port), else `-scsi-H:C:T:L` (the SCSI address
//! component), and `-nvme-N` for an NVMe namespace (`/sys/block/<name>/nsid`).
//! These look like udev's by-path names but are not guaranteed identical to
//! them (the SCSI host number is the kernel's own, USB hops are left out);
//! a failed selection lists every disk with its id, so an operator can copy
//! it. Disks not under a PCI device (loop, virtual) have no id.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use shoal_protocol::inventory::{human_bytes, Disk};

use super::sys;

/// How a deploy step names its disk (`disk=` in `deploy image=G/N disk=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// `serial=S`: the disk's serial number, exactly.
    Serial(String),
    /// `wwn=W`: the disk's WWN/WWID, ignoring case and a `naa.`/`eui.`/`0x` prefix.
    Wwn(String),
    /// `name=vda` (or `name=/dev/vda`): the kernel's name.
    Name(String),
    /// `path=pci-0000:00:04.0`: the by-path-like id described in the module docs.
    Path(String),
    /// `auto`: the only non-removable disk at least as big as the image.
    Auto,
    /// `file=/some/path`: a regular file or a block device (a loop device)
    /// used as the disk, for the agent run as an ordinary process.
    File(PathBuf),
}

/// What [`select`] chose: where to open it and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `ROOT/dev/<name>`, or the `file=` path as given.
    pub path: PathBuf,
    /// The disk's kernel name, or the file's path as text.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical sector size in bytes.
    pub logical_sector: u32,
}

/// Why no disk was selected.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("disk selector {0:?} is not serial=, wwn=, name=, path=, file= or auto")]
    Parse(String),
    #[error("no disk matches disk={selector} (disks seen: {candidates})")]
    NoMatch {
        selector: Selector,
        candidates: String,
    },
    #[error("{} disks match disk={selector}: {}; refusing to guess (disks seen: {candidates})", matched.len(), matched.join(", "))]
    Ambiguous {
        selector: Selector,
        matched: Vec<String>,
        candidates: String,
    },
    #[error("disk {name} ({}) is smaller than the image ({})", human_bytes(*size), human_bytes(*image))]
    TooSmall { name: String, size: u64, image: u64 },
    #[error("disk file {path}")]
    File { path: PathBuf, source: io::Error },
    #[error("disk file {path} is neither a regular file nor a block device")]
    NotADisk { path: PathBuf },
}

impl FromStr for Selector {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, SelectError> {
        let s = s.trim();
        if s == "auto" {
            return Ok(Self::Auto);
        }
        let bad = || SelectError::Parse(s.to_owned());
        let (key, value) = s.split_once('=').ok_or_else(bad)?;
        if value.is_empty() {
            return Err(bad());
        }
        let v = value.to_owned();
        Ok(match key {
            "serial" => Self::Serial(v),
            "wwn" => Self::Wwn(v),
            "name" => Self::Name(value.strip_prefix("/dev/").unwrap_or(value).to_owned()),
            "path" => Self::Path(v),
            "file" => Self::File(PathBuf::from(value)),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serial(v) => write!(f, "serial={v}"),
            Self::Wwn(v) => write!(f, "wwn={v}"),
            Self::Name(v) => write!(f, "name={v}"),
            Self::Path(v) => write!(f, "path={v}"),
            Self::Auto => f.write_str("auto"),
            Self::File(p) => write!(f, "file={}", p.display()),
        }
    }
}

/// Picks the disk `sel` names among `disks` (the inventory read from
/// `root/sys`), checking it can hold `image_size` bytes. `root` is the
/// machine's root (`/` as PID 1): `path=` ids are read from `root/sys/block`
/// and the target is `root/dev/<name>`. `file=` ignores `disks` and looks at
/// the file itself.
pub fn select(
    root: &Path,
    disks: &[Disk],
    sel: &Selector,
    image_size: u64,
) -> Result<Target, SelectError> {
    if let Selector::File(path) = sel {
        return select_file(path, image_size);
    }
    let sysfs = root.join("sys");
    let ids: Vec<Option<String>> = disks.iter().map(|d| path_id(&sysfs, &d.name)).collect();
    let matched: Vec<usize> = (0..disks.len())
        .filter(|&i| matches(sel, &disks[i], ids[i].as_deref(), image_size))
        .collect();
    let candidates = || describe(disks, &ids);
    let disk = match matched[..] {
        [i] => &disks[i],
        [] => {
            return Err(SelectError::NoMatch {
                selector: sel.clone(),
                candidates: candidates(),
            })
        }
        _ => {
            return Err(SelectError::Ambiguous {
                selector: sel.clone(),
                matched: matched.iter().map(|&i| disks[i].name.clone()).collect(),
                candidates: candidates(),
            })
        }
    };
    if disk.size_bytes < image_size {
        return Err(SelectError::TooSmall {
            name: disk.name.clone(),
            size: disk.size_bytes,
            image: image_size,
        });
    }
    Ok(Target {
        path: root.join("dev").join(&disk.name),
        name: disk.name.clone(),
        size: disk.size_bytes,
        logical_sector: disk.logical_sector,
    })
}

fn matches(sel: &Selector, d: &Disk, id: Option<&str>, image_size: u64) -> bool {
    match sel {
        Selector::Serial(s) => d.serial.as_deref() == Some(s.as_str()),
        Selector::Wwn(w) => d.wwn.as_deref().is_some_and(|x| norm_wwn(x) == norm_wwn(w)),
        Selector::Name(n) => d.name == *n,
        Selector::Path(p) => id == Some(p.as_str()),
        Selector::Auto => !d.removable && d.size_bytes >= image_size,
        Selector::File(_) => false,
    }
}

fn norm_wwn(w: &str) -> String {
    let w = w.trim().to_ascii_lowercase();
    ["naa.", "eui.", "0x"]
        .iter()
        .find_map(|p| w.strip_prefix(p))
        .unwrap_or(&w)
        .to_owned()
}

/// One line per disk for error messages: name, size and every key a
/// selector can use.
fn describe(disks: &[Disk], ids: &[Option<String>]) -> String {
    if disks.is_empty() {
        return "none".into();
    }
    let or = |o: Option<&str>| o.unwrap_or("-").to_owned();
    disks
        .iter()
        .zip(ids)
        .map(|(d, id)| {
            format!(
                "{} {}{} serial {} wwn {} path {}",
                d.name,
                human_bytes(d.size_bytes),
                if d.removable { " removable" } else { "" },
                or(d.serial.as_deref()),
                or(d.wwn.as_deref()),
                or(id.as_deref()),
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn select_file(path: &Path, image_size: u64) -> Result<Target, SelectError> {
    let err = |source| SelectError::File {
        path: path.to_owned(),
        source,
    };
    let meta = fs::metadata(path).map_err(err)?;
    let (size, logical_sector) = if meta.is_file() {
        (meta.len(), 512)
    } else if meta.file_type().is_block_device() {
        let f = fs::File::open(path).map_err(err)?;
        (
            sys::block_size_bytes(f.as_fd()).map_err(err)?,
            sys::logical_sector_size(f.as_fd()).map_err(err)?,
        )
    } else {
        return Err(SelectError::NotADisk {
            path: path.to_owned(),
        });
    };
    let name = path.display().to_string();
    if size < image_size {
        return Err(SelectError::TooSmall {
            name,
            size,
            image: image_size,
        });
    }
    Ok(Target {
        path: path.to_owned(),
        name,
        size,
        logical_sector,
    })
}

/// The by-path-like id of block device `name` (see the module docs), from
/// the `sysfs/block/<name>` symlink; `None` when it is not under PCI.
pub fn path_id(sysfs: &Path, name: &str) -> Option<String> {
    let link = fs::read_link(sysfs.join("block").join(name)).ok()?;
    let (mut pci, mut ata, mut scsi) = (None, None, None);
    for c in link.iter().filter_map(|c| c.to_str()) {
        if is_pci_addr(c) {
            (pci, ata, scsi) = (Some(c), None, None);
        } else if pci.is_some() {
            if let Some(n) = c.strip_prefix("ata").filter(|n| is_num(n)) {
                ata = Some(n);
            } else if c.split(':').count() == 4 && c.split(':').all(is_num) {
                scsi = Some(c);
            }
        }
    }
    let mut id = format!("pci-{}", pci?);
    if let Some(n) = ata {
        id += &format!("-ata-{n}");
    } else if let Some(a) = scsi {
        id += &format!("-scsi-{a}");
    }
    if name.starts_with("nvme") {
        if let Ok(ns) = fs::read_to_string(sysfs.join("block").join(name).join("nsid")) {
            id += &format!("-nvme-{}", ns.trim());
        }
    }
    Some(id)
}

fn is_num(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// `DDDD:BB:SS.F` in hex, e.g. `0000:00:04.0`.
fn is_pci_addr(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b':',
            10 => c == b'.',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory;
    use std::os::unix::fs::symlink;

    const MIB: u64 = 1 << 20;

    fn put(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    /// A disk in the fake tree: its attributes under `sys/<devpath>/block/<name>`
    /// and `sys/block/<name>` a relative symlink there, as the kernel makes it.
    fn disk(root: &Path, devpath: &str, name: &str, mib: u64, keys: &[(&str, &str)]) {
        let dir = format!("sys/{devpath}/block/{name}");
        put(
            root,
            &format!("{dir}/size"),
            &format!("{}\n", mib * MIB / 512),
        );
        put(root, &format!("{dir}/queue/logical_block_size"), "512\n");
        put(root, &format!("{dir}/removable"), "0\n");
        for (k, v) in keys {
            put(root, &format!("{dir}/{k}"), &format!("{v}\n"));
        }
        fs::create_dir_all(root.join("sys/block")).unwrap();
        symlink(
            format!("../{devpath}/block/{name}"),
            root.join("sys/block").join(name),
        )
        .unwrap();
    }

    /// vda (64 MiB, serial, virtio at 00:04.0), vdb (32 MiB, at 00:05.0),
    /// sda (128 MiB SCSI with a WWN behind virtio-scsi at 00:06.0), and a
    /// removable 256 MiB USB stick sdb.
    fn machine() -> (tempfile::TempDir, Vec<Disk>) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        disk(
            r,
            "devices/pci0000:00/0000:00:04.0/virtio1",
            "vda",
            64,
            &[("serial", "shoal-disk-1")],
        );
        disk(r, "devices/pci0000:00/0000:00:05.0/virtio2", "vdb", 32, &[]);
        disk(
            r,
            "devices/pci0000:00/0000:00:06.0/virtio3/host0/target0:0:1/0:0:1:0",
            "sda",
            128,
            &[
                ("device/wwid", "naa.5000C500A1B2C3D4"),
                ("device/model", "QEMU HARDDISK"),
            ],
        );
        disk(
            r,
            "devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/host6/target6:0:0/6:0:0:0",
            "sdb",
            256,
            &[("removable", "1")],
        );
        let disks = inventory::collect(r).disks;
        assert_eq!(disks.len(), 4);
        (dir, disks)
    }

    fn pick(root: &Path, disks: &[Disk], sel: &str, image: u64) -> Result<Target, SelectError> {
        select(root, disks, &sel.parse().unwrap(), image)
    }

    #[test]
    fn parses_and_prints_selectors() {
        for text in [
            "serial=S1",
            "wwn=naa.5",
            "name=vda",
            "path=pci-0000:00:04.0",
            "auto",
            "file=/tmp/d.img",
        ] {
            assert_eq!(text.parse::<Selector>().unwrap().to_string(), text);
        }
        assert_eq!(
            "name=/dev/vda".parse::<Selector>().unwrap(),
            Selector::Name("vda".into())
        );
        for bad in ["", "vda", "serial=", "size=5", "automatic"] {
            let e = bad.parse::<Selector>().unwrap_err();
            assert!(matches!(e, SelectError::Parse(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn path_ids_come_from_the_sysfs_link() {
        let (dir, _) = machine();
        let sysfs = dir.path().join("sys");
        assert_eq!(path_id(&sysfs, "vda").as_deref(), Some("pci-0000:00:04.0"));
        assert_eq!(
            path_id(&sysfs, "sda").as_deref(),
            Some("pci-0000:00:06.0-scsi-0:0:1:0")
        );
        assert_eq!(
            path_id(&sysfs, "sdb").as_deref(),
            Some("pci-0000:00:14.0-scsi-6:0:0:0")
        );
        assert_eq!(path_id(&sysfs, "nope"), None);
        // AHCI, NVMe and a virtual (loop) device.
        let r = dir.path();
        disk(
            r,
            "devices/pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0",
            "sdc",
            8,
            &[],
        );
        disk(
            r,
            "devices/pci0000:00/0000:00:1d.0/0000:3c:00.0/nvme/nvme0",
            "nvme0n1",
            8,
            &[("nsid", "1")],
        );
        disk(r, "devices/virtual", "loop0", 8, &[]);
        assert_eq!(
            path_id(&sysfs, "sdc").as_deref(),
            Some("pci-0000:00:1f.2-ata-3")
        );
        assert_eq!(
            path_id(&sysfs, "nvme0n1").as_deref(),
            Some("pci-0000:3c:00.0-nvme-1")
        );
        assert_eq!(path_id(&sysfs, "loop0"), None);
    }

    #[test]
    fn selects_by_each_key() {
        let (dir, disks) = machine();
        let r = dir.path();
        for (sel, name) in [
            ("serial=shoal-disk-1", "vda"),
            ("wwn=naa.5000c500a1b2c3d4", "sda"),
            ("wwn=0x5000C500A1B2C3D4", "sda"),
            ("name=vdb", "vdb"),
            ("name=/dev/sdb", "sdb"),
            ("path=pci-0000:00:04.0", "vda"),
            ("path=pci-0000:00:06.0-scsi-0:0:1:0", "sda"),
        ] {
            let t = pick(r, &disks, sel, MIB).unwrap_or_else(|e| panic!("{sel}: {e}"));
            assert_eq!(t.name, name, "{sel}");
            assert_eq!(t.path, r.join("dev").join(name));
            assert_eq!(t.logical_sector, 512);
        }
        let t = pick(r, &disks, "name=vda", MIB).unwrap();
        assert_eq!(t.size, 64 * MIB);
    }

    #[test]
    fn auto_wants_exactly_one_big_enough_fixed_disk() {
        let (dir, disks) = machine();
        let r = dir.path();
        // 100 MiB: only sda (sdb is bigger but removable).
        assert_eq!(pick(r, &disks, "auto", 100 * MIB).unwrap().name, "sda");
        // 48 MiB: vda and sda both fit: refuse.
        let e = pick(r, &disks, "auto", 48 * MIB).unwrap_err().to_string();
        assert!(
            e.starts_with("2 disks match disk=auto: sda, vda; refusing to guess"),
            "{e}"
        );
        assert!(e.contains("sdb 256.0 MiB removable"), "{e}");
        // 200 MiB: only the removable stick is that big: no match.
        let e = pick(r, &disks, "auto", 200 * MIB).unwrap_err();
        assert!(matches!(e, SelectError::NoMatch { .. }), "{e}");
    }

    #[test]
    fn no_match_names_the_selector_and_lists_the_disks() {
        let (dir, disks) = machine();
        let e = pick(dir.path(), &disks, "serial=nope", MIB)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("no disk matches disk=serial=nope (disks seen: "),
            "{e}"
        );
        assert!(
            e.contains(
                "vda 64.0 MiB serial shoal-disk-1 wwn - path pci-0000:00:04.0; vdb 32.0 MiB"
            ),
            "{e}"
        );
        assert!(e.contains("sda 128.0 MiB serial - wwn naa.5000C500A1B2C3D4 path pci-0000:00:06.0-scsi-0:0:1:0"), "{e}");
        let e = select(dir.path(), &[], &Selector::Auto, MIB)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "no disk matches disk=auto (disks seen: none)");
    }

    #[test]
    fn two_disks_with_one_serial_are_refused() {
        let (dir, mut disks) = machine();
        disks[3].serial = Some("shoal-disk-1".into());
        let e = pick(dir.path(), &disks, "serial=shoal-disk-1", MIB).unwrap_err();
        assert!(
            matches!(&e, SelectError::Ambiguous { matched, .. } if matched.len() == 2),
            "{e}"
        );
    }

    #[test]
    fn a_disk_smaller_than_the_image_is_refused() {
        let (dir, disks) = machine();
        let e = pick(dir.path(), &disks, "name=vdb", 64 * MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "disk vdb (32.0 MiB) is smaller than the image (64.0 MiB)"
        );
    }

    #[test]
    fn file_targets() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.img");
        fs::File::create(&f).unwrap().set_len(8 * MIB).unwrap();
        let sel = Selector::File(f.clone());
        let t = select(Path::new("/nonexistent"), &[], &sel, 4 * MIB).unwrap();
        assert_eq!(
            (t.path.as_path(), t.size, t.logical_sector),
            (f.as_path(), 8 * MIB, 512)
        );
        let e = select(Path::new("/"), &[], &sel, 16 * MIB)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "disk {} (8.0 MiB) is smaller than the image (16.0 MiB)",
                f.display()
            )
        );
        let missing = Selector::File(dir.path().join("missing"));
        assert!(matches!(
            select(Path::new("/"), &[], &missing, 1),
            Err(SelectError::File { .. })
        ));
        let not_disk = Selector::File(dir.path().to_owned());
        assert!(matches!(
            select(Path::new("/"), &[], &not_disk, 1),
            Err(SelectError::NotADisk { .. })
        ));
    }
}
