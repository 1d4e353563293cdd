//! `cargo xtask kernel`: the kernel the lab and the tests boot, with its
//! modules.
//!
//! By default this is Debian's current `linux-image-amd64` kernel: resolved
//! with `apt-cache depends`, fetched with `apt-get download` and unpacked with
//! `dpkg -x` into `target/shoal/kernel/<version>/root`, then cached. Once
//! `target/shoal/kernel/current` names a version whose directory exists, no
//! apt command runs at all; delete that file to pick up a newer Debian
//! kernel. `--kernel-package` names another Debian kernel package, and
//! `--kernel`/`--modules` take a kernel the user built.
//!
//! Next to the bzImage we keep its uncompressed `vmlinux`: QEMU boots that
//! ELF directly through its PVH entry note (`-kernel vmlinux`), which skips
//! the bzImage's real-mode setup and self-decompression, seconds under TCG.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util;

/// The Debian metapackage that depends on the current kernel.
const DEFAULT_META: &str = "linux-image-amd64";

/// Xen's `XEN_ELFNOTE_PHYS32_ENTRY`, the PVH entry point QEMU looks for.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct KernelArgs {
    /// Debian kernel package to use (default: the one linux-image-amd64 depends on).
    #[arg(long, value_name = "NAME", conflicts_with = "kernel")]
    pub kernel_package: Option<String>,
    /// A bzImage to boot instead of a Debian kernel (needs --modules).
    #[arg(long, value_name = "PATH", requires = "modules")]
    pub kernel: Option<PathBuf>,
    /// The lib/modules/<version> directory that goes with --kernel.
    #[arg(long, value_name = "DIR", requires = "kernel")]
    pub modules: Option<PathBuf>,
}

/// A kernel ready to boot, with its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The kernel release, as `uname -r` prints it (`6.1.0-56-amd64`).
    pub version: String,
    /// Our directory for this kernel (`target/shoal/kernel/<version>`).
    pub dir: PathBuf,
    /// The compressed, bootable image.
    pub bzimage: PathBuf,
    /// The uncompressed ELF with a PVH note, if it could be extracted.
    pub vmlinux: Option<PathBuf>,
    /// `lib/modules/<version>`.
    pub modules_dir: PathBuf,
}

/// Returns the kernel `args` ask for, fetching and unpacking it if needed.
pub fn ensure(args: &KernelArgs) -> Result<Kernel> {
    if let Some(bzimage) = &args.kernel {
        let modules = args
            .modules
            .as_deref()
            .context("--kernel needs --modules <lib/modules/VERSION>")?;
        return given(bzimage, modules);
    }
    let base = util::out_dir().join("kernel");
    std::fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let mut apt = Apt::default();

    let (package, record_current) = match &args.kernel_package {
        Some(p) if concrete_version(p).is_some() => (p.clone(), false),
        Some(meta) => (apt.resolve(meta)?, false),
        None => {
            if let Some(version) = read_current(&base) {
                if is_unpacked(&base.join(&version), &version) {
                    return finish(base.join(&version), version);
                }
            }
            (apt.resolve(DEFAULT_META)?, true)
        }
    };
    let version = concrete_version(&package)
        .with_context(|| format!("cannot tell the kernel version from package {package}"))?;
    let dir = base.join(&version);
    if !is_unpacked(&dir, &version) {
        apt.download_and_unpack(&base, &package, &version)?;
    }
    if record_current {
        std::fs::write(base.join("current"), format!("{version}\n"))
            .context("cannot record target/shoal/kernel/current")?;
    }
    finish(dir, version)
}

/// `linux-image-6.1.0-56-amd64[-unsigned]` -> `6.1.0-56-amd64`; `None` for
/// metapackages such as `linux-image-amd64`.
fn concrete_version(package: &str) -> Option<String> {
    let rest = package.strip_prefix("linux-image-")?;
    let rest = rest.strip_suffix("-unsigned").unwrap_or(rest);
    rest.starts_with(|c: char| c.is_ascii_digit())
        .then(|| rest.to_owned())
}

fn read_current(base: &Path) -> Option<String> {
    let v = std::fs::read_to_string(base.join("current")).ok()?;
    let v = v.trim();
    (!v.is_empty() && !v.contains('/')).then(|| v.to_owned())
}

fn bzimage_path(dir: &Path, version: &str) -> PathBuf {
    dir.join("root/boot").join(format!("vmlinuz-{version}"))
}

fn modules_path(dir: &Path, version: &str) -> PathBuf {
    dir.join("root/lib/modules").join(version)
}

fn is_unpacked(dir: &Path, version: &str) -> bool {
    dir.join("VERSION").is_file()
        && bzimage_path(dir, version).is_file()
        && modules_path(dir, version).is_dir()
}

fn finish(dir: PathBuf, version: String) -> Result<Kernel> {
    let bzimage = bzimage_path(&dir, &version);
    let vmlinux = ensure_vmlinux(&dir, &bzimage);
    Ok(Kernel {
        modules_dir: modules_path(&dir, &version),
        bzimage,
        vmlinux,
        dir,
        version,
    })
}

/// A kernel the user built: `--kernel bzImage --modules lib/modules/<ver>`.
fn given(bzimage: &Path, modules: &Path) -> Result<Kernel> {
    anyhow::ensure!(
        bzimage.is_file(),
        "--kernel {} is not a file",
        bzimage.display()
    );
    anyhow::ensure!(
        modules.is_dir(),
        "--modules {} is not a directory",
        modules.display()
    );
    let modules = modules
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", modules.display()))?;
    let version = modules
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| {
            format!(
                "--modules {} does not end in a kernel version",
                modules.display()
            )
        })?
        .to_owned();
    let dir = util::out_dir()
        .join("kernel")
        .join(format!("given-{version}"));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("VERSION"), format!("{version}\n"))?;
    let vmlinux = ensure_vmlinux(&dir, bzimage);
    Ok(Kernel {
        version,
        dir,
        bzimage: bzimage.to_owned(),
        vmlinux,
        modules_dir: modules,
    })
}

/// Runs apt, refreshing the package lists at most once when a look-up or a
/// download fails (a fresh machine has none).
#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn update(&mut self, why: &str) -> Result<bool> {
        if self.updated {
            return Ok(false);
        }
        eprintln!("kernel: {why}; running `apt-get update` once and retrying");
        util::run(Command::new("apt-get").args(["update", "-qq"]))?;
        self.updated = true;
        Ok(true)
    }

    /// The concrete kernel package a metapackage depends on.
    fn resolve(&mut self, meta: &str) -> Result<String> {
        loop {
            let out = Command::new("apt-cache")
                .args(["depends", meta])
                .output()
                .context("cannot run apt-cache")?;
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(pkg) = parse_depends(&text) {
                eprintln!("kernel: {meta} -> {pkg}");
                return Ok(pkg);
            }
            if !self.update(&format!("apt-cache cannot resolve {meta}"))? {
                bail!(
                    "apt-cache depends {meta} names no linux-image package: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
    }

    /// `apt-get download` into `base`, `dpkg -x` into `base/<version>/root`.
    fn download_and_unpack(&mut self, base: &Path, package: &str, version: &str) -> Result<()> {
        eprintln!("kernel: downloading {package}");
        loop {
            // As root, apt warns that the download runs unsandboxed because
            // `_apt` cannot write here: harmless.
            match util::run(
                Command::new("apt-get")
                    .current_dir(base)
                    .args(["download", "-q", package]),
            ) {
                Ok(()) => break,
                Err(e) => {
                    if !self.update(&format!("apt-get download {package} failed"))? {
                        return Err(e);
                    }
                }
            }
        }
        let deb = newest_deb(base, package)?;
        let partial = base.join(format!("{version}.partial"));
        let dir = base.join(version);
        for d in [&partial, &dir] {
            if d.exists() {
                std::fs::remove_dir_all(d)
                    .with_context(|| format!("cannot remove {}", d.display()))?;
            }
        }
        eprintln!("kernel: unpacking {}", deb.display());
        std::fs::create_dir_all(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        util::run(
            Command::new("dpkg")
                .arg("-x")
                .arg(&deb)
                .arg(partial.join("root")),
        )?;
        anyhow::ensure!(
            is_unpacked_tree(&partial, version),
            "{} has no boot/vmlinuz-{version} or lib/modules/{version}",
            deb.display()
        );
        std::fs::write(partial.join("VERSION"), format!("{version}\n"))?;
        std::fs::rename(&partial, &dir)
            .with_context(|| format!("cannot move {} to {}", partial.display(), dir.display()))?;
        // The unpacked tree is the cache; the 70 MB package is not needed.
        std::fs::remove_file(&deb).with_context(|| format!("cannot remove {}", deb.display()))?;
        Ok(())
    }
}

fn is_unpacked_tree(dir: &Path, version: &str) -> bool {
    bzimage_path(dir, version).is_file() && modules_path(dir, version).is_dir()
}

/// The first `Depends: linux-image-<digit>...` of `apt-cache depends`.
fn parse_depends(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let dep = l.trim().strip_prefix("Depends:")?.trim();
        concrete_version(dep).map(|_| dep.to_owned())
    })
}

/// The most recently written `<package>_*.deb` in `dir`.
fn newest_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            let t = e.metadata()?.modified()?;
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, e.path()));
            }
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            dir.display()
        )
    })
}

/// `<dir>/vmlinux`, extracted from `bzimage` unless a stamp says it already
/// was. Failure is a warning: the bzImage still boots, only slower.
fn ensure_vmlinux(dir: &Path, bzimage: &Path) -> Option<PathBuf> {
    let out = dir.join("vmlinux");
    let stamp_path = dir.join("vmlinux.stamp");
    let stamp = match std::fs::metadata(bzimage) {
        Ok(m) => format!(
            "{} {} {:?}\n",
            bzimage.display(),
            m.len(),
            m.modified().ok()
        ),
        Err(e) => {
            eprintln!("warning: cannot stat {}: {e}", bzimage.display());
            return None;
        }
    };
    if out.is_file() && std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Some(out);
    }
    let result = std::fs::read(bzimage)
        .with_context(|| format!("cannot read {}", bzimage.display()))
        .and_then(|bz| extract_vmlinux(&bz))
        .and_then(|elf| {
            let tmp = dir.join("vmlinux.partial");
            std::fs::write(&tmp, &elf)?;
            std::fs::rename(&tmp, &out)?;
            std::fs::write(&stamp_path, &stamp)?;
            Ok(elf.len())
        });
    match result {
        Ok(len) => {
            eprintln!(
                "kernel: extracted {} ({:.1} MiB)",
                out.display(),
                len as f64 / (1 << 20) as f64
            );
            Some(out)
        }
        Err(e) => {
            eprintln!(
                "warning: no vmlinux from {} ({e:#}); QEMU will boot the bzImage",
                bzimage.display()
            );
            let _ = std::fs::remove_file(&stamp_path);
            None
        }
    }
}

const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];

/// The compressed kernel inside a bzImage, per the x86 boot protocol:
/// `payload_offset`/`payload_length` (protocol 2.08+) count from the start
/// of the protected-mode code, which follows `setup_sects + 1` sectors.
fn bzimage_payload(bz: &[u8]) -> Option<&[u8]> {
    if bz.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bz.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(bz.get(o..o + 4)?.try_into().ok()?) as usize);
    if u16_at(0x206)? < 0x208 {
        return None;
    }
    let setup_sects = match *bz.get(0x1f1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248)?;
    bz.get(start..start + u32_at(0x24c)?)
}

/// Decompresses the kernel in a bzImage to its ELF `vmlinux` and checks that
/// QEMU can boot it (an ELF with a PVH entry note).
fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    // Prefer the payload the header points at; else scan for an xz stream.
    let mut candidates: Vec<&[u8]> = bzimage_payload(bz).into_iter().collect();
    candidates.extend(
        bz.windows(XZ_MAGIC.len())
            .enumerate()
            .filter(|(_, w)| *w == XZ_MAGIC)
            .map(|(i, _)| &bz[i..]),
    );
    let mut last_err = anyhow::anyhow!("no xz or zstd stream in the bzImage");
    for payload in candidates {
        let decoded = if payload.starts_with(XZ_MAGIC) {
            liblzma::decode_all(payload).context("xz stream does not decompress")
        } else if payload.starts_with(ZSTD_MAGIC) {
            zstd::decode_all(payload).context("zstd stream does not decompress")
        } else {
            Err(anyhow::anyhow!(
                "payload is neither xz nor zstd (the kernel was built with another compressor)"
            ))
        };
        match decoded.and_then(|elf| check_pvh_elf(&elf).map(|()| elf)) {
            Ok(elf) => return Ok(elf),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

fn check_pvh_elf(elf: &[u8]) -> Result<()> {
    use object::read::elf::{FileHeader, ProgramHeader};
    anyhow::ensure!(
        elf.starts_with(b"\x7fELF"),
        "decompressed kernel is not an ELF file"
    );
    let header = object::elf::FileHeader64::<object::Endianness>::parse(elf)
        .context("decompressed kernel is not a 64-bit ELF")?;
    let endian = header.endian().context("bad ELF byte order")?;
    for ph in header
        .program_headers(endian, elf)
        .context("bad ELF program headers")?
    {
        if let Some(mut notes) = ph.notes(endian, elf).context("bad ELF note segment")? {
            while let Some(note) = notes.next().context("bad ELF note")? {
                if note.name() == b"Xen"
                    && note.n_type(endian) == object::elf::NoteType(XEN_ELFNOTE_PHYS32_ENTRY)
                {
                    return Ok(());
                }
            }
        }
    }
    bail!("vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): the kernel lacks CONFIG_PVH")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_to_versions() {
        assert_eq!(
            concrete_version("linux-image-6.1.0-56-amd64").as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(
            concrete_version("linux-image-6.1.0-56-amd64-unsigned").as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(
            concrete_version("linux-image-6.1.0-56-cloud-amd64").as_deref(),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(concrete_version("linux-image-amd64"), None);
        assert_eq!(concrete_version("linux-headers-6.1.0-56-amd64"), None);
    }

    #[test]
    fn apt_cache_depends_output() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends(""), None);
        assert_eq!(parse_depends("linux-image-amd64\n  Depends: foo\n"), None);
    }

    #[test]
    fn payload_of_a_synthetic_bzimage() {
        let mut bz = vec![0u8; 0x1000];
        bz[0x1f1] = 2; // setup sectors: protected-mode code at 3 * 512
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        bz[3 * 512 + 0x10..3 * 512 + 0x16].copy_from_slice(XZ_MAGIC);
        assert_eq!(bzimage_payload(&bz), Some(XZ_MAGIC));
        assert!(extract_vmlinux(&bz).is_err());
    }
}
