//! Builds Shoal's netboot initramfs in process: the static agent as `/init`,
//! the kernel modules a [`Flavour`] needs with depmod-style indexes, and an
//! optional `/etc/shoal/agent.toml`, as a reproducible newc cpio compressed
//! with zstd.
//!
//! Two builds from the same inputs are byte-identical: entries are sorted by
//! path with zeroed times and owners ([`cpio`]), module indexes are sorted
//! ([`modules`]), and zstd runs single-threaded at a fixed level. See
//! `docs/initramfs.md` for the layout and the size budgets.

#![forbid(unsafe_code)]

pub mod cpio;
mod flavour;
pub mod modules;

use std::fmt;
use std::path::PathBuf;

pub use flavour::{Flavour, UnknownFlavour};

use cpio::{Archive, Entry};

/// zstd level of the output. 19 is the highest level that needs no
/// `--ultra` window (8 MiB), which the kernel's decompressor handles.
pub const ZSTD_LEVEL: i32 = 19;

/// Where the agent configuration lands in the initramfs.
pub const CONFIG_PATH: &str = "etc/shoal/agent.toml";

/// Empty directories every initramfs has (mode), besides `lib/modules/<ver>`.
const DIRS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("dev/pts", 0o755),
    ("etc", 0o755),
    ("etc/shoal", 0o755),
    ("proc", 0o555),
    ("run", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
];

/// What goes into an initramfs.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The static agent, installed as `/init`.
    pub init: PathBuf,
    /// The kernel's `lib/modules/<version>` directory.
    pub modules_dir: PathBuf,
    /// The kernel release (`uname -r`), naming `lib/modules/<version>`.
    pub kernel_version: String,
    pub flavour: Flavour,
    /// Modules wanted on top of the flavour's.
    pub extra_modules: Vec<String>,
    /// Contents of `/etc/shoal/agent.toml`, if any.
    pub config: Option<Vec<u8>>,
}

/// A finished initramfs.
#[derive(Debug, Clone)]
pub struct Built {
    /// The zstd-compressed newc archive, ready for the bootloader.
    pub bytes: Vec<u8>,
    pub report: Report,
}

/// What a build put in, and what it left out and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kernel_version: String,
    pub flavour: Flavour,
    /// Included modules (canonical names), sorted.
    pub modules: Vec<String>,
    /// Wanted modules that are built into this kernel, so not included.
    pub builtin: Vec<String>,
    /// Wanted (or needed) modules this kernel does not have at all.
    pub warnings: Vec<String>,
    /// Skipped soft dependencies and the like.
    pub notes: Vec<String>,
    /// Number of archive entries, trailer excluded.
    pub entries: usize,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "initramfs {} for kernel {}: {} entries, {} modules, {:.2} MiB uncompressed, {:.2} MiB zstd",
            self.flavour,
            self.kernel_version,
            self.entries,
            self.modules.len(),
            mib(self.uncompressed_bytes),
            mib(self.compressed_bytes)
        )?;
        writeln!(f, "  modules: {}", self.modules.join(" "))?;
        if !self.builtin.is_empty() {
            writeln!(
                f,
                "  built into the kernel (skipped): {}",
                self.builtin.join(" ")
            )?;
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        for w in &self.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        Ok(())
    }
}

/// Why an initramfs could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the agent {}", path.display())]
    ReadInit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot collect kernel modules from {}", dir.display())]
    Modules {
        dir: PathBuf,
        source: modules::Error,
    },
    #[error("cannot lay out the archive")]
    Archive(#[from] cpio::Error),
    #[error("cannot compress the archive")]
    Compress(#[source] std::io::Error),
}

/// Lays out the uncompressed archive for `spec`, with its report (sizes
/// still zero).
pub fn archive(spec: &Spec) -> Result<(Archive, Report), Error> {
    let mut a = Archive::new();
    for (dir, perm) in DIRS {
        a.mkdir(dir, *perm)?;
    }
    a.insert(
        "dev/console",
        Entry::CharDev {
            perm: 0o600,
            major: 5,
            minor: 1,
        },
    )?;

    let init = std::fs::read(&spec.init).map_err(|source| Error::ReadInit {
        path: spec.init.clone(),
        source,
    })?;
    a.insert("init", Entry::file(0o755, init))?;
    if let Some(config) = &spec.config {
        // It may hold the join token: root only.
        a.insert(CONFIG_PATH, Entry::file(0o600, config.clone()))?;
    }

    let mods_err = |source| Error::Modules {
        dir: spec.modules_dir.clone(),
        source,
    };
    let tree = modules::ModuleTree::scan(&spec.modules_dir).map_err(mods_err)?;
    let wanted: Vec<&str> = spec
        .flavour
        .modules()
        .iter()
        .copied()
        .chain(spec.extra_modules.iter().map(String::as_str))
        .collect();
    let sel = tree.select(&wanted).map_err(mods_err)?;
    let base = format!("lib/modules/{}", spec.kernel_version);
    a.mkdir(&base, 0o755)?;
    a.insert(
        &format!("{base}/modules.dep"),
        Entry::file(0o644, sel.modules_dep().map_err(mods_err)?),
    )?;
    a.insert(
        &format!("{base}/modules.alias"),
        Entry::file(0o644, sel.modules_alias()),
    )?;
    a.insert(
        &format!("{base}/modules.softdep"),
        Entry::file(0o644, sel.modules_softdep()),
    )?;
    let mut notes = sel.notes.clone();
    match tree.builtin_file() {
        Some(b) => a.insert(
            &format!("{base}/modules.builtin"),
            Entry::file(0o644, b.to_vec()),
        )?,
        None => notes.push("the kernel has no modules.builtin; none copied".to_owned()),
    }
    for m in sel.modules.values() {
        a.insert(
            &format!("{base}/{}", m.rel_path),
            Entry::file(0o644, m.data.clone()),
        )?;
    }

    let report = Report {
        kernel_version: spec.kernel_version.clone(),
        flavour: spec.flavour,
        modules: sel.modules.keys().cloned().collect(),
        builtin: sel.builtin,
        warnings: sel.warnings,
        notes,
        entries: a.len(),
        uncompressed_bytes: 0,
        compressed_bytes: 0,
    };
    Ok((a, report))
}

/// Builds the compressed initramfs for `spec`.
pub fn build(spec: &Spec) -> Result<Built, Error> {
    let (archive, mut report) = archive(spec)?;
    let raw = archive.to_bytes();
    // Single-shot and single-threaded: the output depends on the input only.
    let bytes = zstd::bulk::compress(&raw, ZSTD_LEVEL).map_err(Error::Compress)?;
    report.uncompressed_bytes = raw.len() as u64;
    report.compressed_bytes = bytes.len() as u64;
    Ok(Built { bytes, report })
}

/// Decompresses an initramfs and parses its entries (for checks and tests).
pub fn unpack(bytes: &[u8]) -> Result<Vec<cpio::Parsed>, UnpackError> {
    let raw = zstd::decode_all(bytes).map_err(UnpackError::Decompress)?;
    Ok(cpio::parse(&raw)?)
}

/// Why [`unpack`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("initramfs is not a zstd stream")]
    Decompress(#[source] std::io::Error),
    #[error("initramfs is not a newc archive")]
    Cpio(#[from] cpio::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &std::path::Path, flavour: Flavour) -> Spec {
        let modules_dir = dir.join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(&modules_dir).unwrap();
        modules::fake::tree(&modules_dir);
        let init = dir.join("agent");
        std::fs::write(&init, b"\x7fELF fake agent").unwrap();
        Spec {
            init,
            modules_dir,
            kernel_version: "6.1.0-test".into(),
            flavour,
            extra_modules: vec!["crct10dif-generic".into()],
            config: Some(b"controller = \"10.0.2.2:7000\"\n".to_vec()),
        }
    }

    #[test]
    fn two_builds_are_identical() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path(), Flavour::Lab);
        let a = build(&s).unwrap();
        let b = build(&s).unwrap();
        assert_eq!(a.bytes, b.bytes);
        assert_eq!(a.report, b.report);
        // Same inputs in another place (other paths, other mtimes): same bytes.
        let dir2 = tempfile::tempdir().unwrap();
        let c = build(&spec(dir2.path(), Flavour::Lab)).unwrap();
        assert_eq!(a.bytes, c.bytes);
    }

    #[test]
    fn layout_of_a_lab_build() {
        let dir = tempfile::tempdir().unwrap();
        let built = build(&spec(dir.path(), Flavour::Lab)).unwrap();
        assert_eq!(&built.bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "zstd magic");
        let entries = unpack(&built.bytes).unwrap();
        let get = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
        };
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(
            get("dev/console").entry,
            Entry::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1
            }
        );
        assert_eq!(get("dev/console").mode, 0o020600);
        for d in [
            "dev",
            "dev/pts",
            "proc",
            "sys",
            "run",
            "tmp",
            "etc/shoal",
            "lib/modules/6.1.0-test",
        ] {
            assert!(matches!(get(d).entry, Entry::Dir { .. }), "{d}");
        }
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get(CONFIG_PATH).mode, 0o100600);
        let text = |name: &str| match &get(name).entry {
            Entry::File { data, .. } => String::from_utf8(data.clone()).unwrap(),
            e => panic!("{name}: {e:?}"),
        };
        let dep = text("lib/modules/6.1.0-test/modules.dep");
        assert!(dep.contains("kernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n"), "{dep}");
        assert!(text("lib/modules/6.1.0-test/modules.alias")
            .contains("alias virtio:d00000001v* virtio_net\n"));
        assert!(text("lib/modules/6.1.0-test/modules.builtin").contains("ahci.ko"));
        // Compressed modules were stored plain, under their .ko name.
        let blk = text_bytes(
            &entries,
            "lib/modules/6.1.0-test/kernel/drivers/virtio/virtio_blk.ko",
        );
        assert_eq!(&blk[..4], b"\x7fELF");
        // The unrelated module stayed out.
        assert!(!entries.iter().any(|e| e.name.ends_with("big.ko")));
        for e in &entries {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.name);
        }
        let r = &built.report;
        assert_eq!(r.builtin, Vec::<String>::new());
        assert!(r.modules.contains(&"crct10dif_generic".to_owned()));
        assert_eq!(r.entries, entries.len());
        assert!(r.uncompressed_bytes > r.compressed_bytes);
    }

    fn text_bytes(entries: &[cpio::Parsed], name: &str) -> Vec<u8> {
        match &entries.iter().find(|e| e.name == name).unwrap().entry {
            Entry::File { data, .. } => data.clone(),
            e => panic!("{name}: {e:?}"),
        }
    }

    #[test]
    fn full_reports_builtin_and_missing_modules() {
        let dir = tempfile::tempdir().unwrap();
        let built = build(&spec(dir.path(), Flavour::Full)).unwrap();
        let r = &built.report;
        assert_eq!(r.builtin, ["ahci", "nvme"]);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.contains("wanted module mlx5_core is neither")),
            "{r}"
        );
        let shown = r.to_string();
        assert!(
            shown.contains("built into the kernel (skipped): ahci nvme"),
            "{shown}"
        );
    }

    #[test]
    fn missing_agent_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path(), Flavour::Lab);
        s.init = dir.path().join("no-agent");
        let err = build(&s).unwrap_err();
        assert!(matches!(err, Error::ReadInit { .. }));
        assert!(err.to_string().contains("no-agent"));
    }
}
