//! Kernel module loading without udev: read every device's `modalias` from
//! `/sys/bus/*/devices/*`, match it against the `modules.alias` carried in the
//! initramfs, and load each matching module (dependencies first, from
//! `modules.dep`) with `finit_module(2)`.
//!
//! Loading one driver can make new devices appear (virtio-pci makes the
//! virtio devices that `virtio_net` and `virtio_blk` drive), so the scan
//! repeats until a round loads nothing new, bounded in rounds and time.
//! Hardware with no module is logged, never fatal.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

/// The module index for one kernel: aliases, dependencies, built-ins.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    /// `(pattern, module)` in file order.
    aliases: Vec<(glob::Pattern, String)>,
    /// Module name → (path relative to `dir`, dependency names).
    deps: HashMap<String, (PathBuf, Vec<String>)>,
    builtin: BTreeSet<String>,
    /// `modules.softdep`: module → (load before, load after). Names may be aliases.
    softdeps: HashMap<String, (Vec<String>, Vec<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModError {
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}:{line}: cannot parse {text:?}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("module {0} is not in modules.dep")]
    Unknown(String),
    #[error("module {name}: dependency cycle")]
    Cycle { name: String },
    #[error("module {name}: cannot open {}", path.display())]
    Open {
        name: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("module {name}: finit_module failed")]
    Load { name: String, source: io::Error },
}

/// Module names treat `-` and `_` as the same, like modprobe.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    canonical(stem)
}

fn read(path: &Path) -> Result<String, ModError> {
    fs::read_to_string(path).map_err(|source| ModError::Read {
        path: path.to_owned(),
        source,
    })
}

impl ModuleIndex {
    /// Loads `modules.alias`, `modules.dep` and (if present) `modules.builtin`
    /// and `modules.softdep`
    /// from a `lib/modules/<version>` directory.
    pub fn load(dir: &Path) -> Result<ModuleIndex, ModError> {
        let alias_path = dir.join("modules.alias");
        let dep_path = dir.join("modules.dep");
        let mut index = ModuleIndex::parse(
            &read(&alias_path)?,
            &read(&dep_path)?,
            &alias_path,
            &dep_path,
        )?;
        index.dir = dir.to_owned();
        if let Ok(text) = fs::read_to_string(dir.join("modules.builtin")) {
            index.builtin = text
                .lines()
                .filter(|l| !l.is_empty())
                .map(module_name)
                .collect();
        }
        if let Ok(text) = fs::read_to_string(dir.join("modules.softdep")) {
            index.softdeps = parse_softdeps(&text);
        }
        Ok(index)
    }

    fn parse(
        alias: &str,
        dep: &str,
        alias_path: &Path,
        dep_path: &Path,
    ) -> Result<ModuleIndex, ModError> {
        let mut index = ModuleIndex::default();
        for (n, line) in alias.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || ModError::Parse {
                path: alias_path.to_owned(),
                line: n + 1,
                text: line.to_owned(),
            };
            let mut words = line.split_whitespace();
            let (Some("alias"), Some(pattern), Some(module), None) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                return Err(bad());
            };
            let pattern = glob::Pattern::new(pattern).map_err(|_| bad())?;
            index.aliases.push((pattern, canonical(module)));
        }
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line.split_once(':').ok_or_else(|| ModError::Parse {
                path: dep_path.to_owned(),
                line: n + 1,
                text: line.to_owned(),
            })?;
            let deps = deps.split_whitespace().map(module_name).collect();
            index
                .deps
                .insert(module_name(path), (PathBuf::from(path), deps));
        }
        Ok(index)
    }

    /// Modules whose alias pattern matches `modalias`, in file order, without repeats.
    pub fn lookup(&self, modalias: &str) -> Vec<&str> {
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: false,
            require_literal_leading_dot: false,
        };
        let mut out: Vec<&str> = Vec::new();
        for (pattern, module) in &self.aliases {
            if pattern.matches_with(modalias, opts) && !out.contains(&module.as_str()) {
                out.push(module);
            }
        }
        out
    }

    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical(name))
    }

    /// Soft dependencies resolve like modprobe's: a module name, else an
    /// alias; ones this initramfs does not carry are skipped.
    fn resolve_soft(&self, name: &str) -> Vec<String> {
        let name = canonical(name);
        if self.deps.contains_key(&name) {
            return vec![name];
        }
        self.lookup(&name)
            .into_iter()
            .filter(|m| self.deps.contains_key(*m))
            .map(str::to_owned)
            .collect()
    }

    /// The order to load `name` in: every dependency before the modules that
    /// need it, `name` last; `modules.softdep` "pre" modules before it and
    /// "post" modules after it. The order of names within a `modules.dep`
    /// line does not matter: each dependency's own line is followed.
    pub fn load_order(&self, name: &str) -> Result<Vec<String>, ModError> {
        fn visit(
            index: &ModuleIndex,
            name: &str,
            stack: &mut Vec<String>,
            out: &mut Vec<String>,
        ) -> Result<(), ModError> {
            if out.iter().any(|m| m == name) {
                return Ok(());
            }
            if stack.iter().any(|m| m == name) {
                return Err(ModError::Cycle {
                    name: name.to_owned(),
                });
            }
            let (_, deps) = index
                .deps
                .get(name)
                .ok_or_else(|| ModError::Unknown(name.to_owned()))?;
            let (pre, post) = index.softdeps.get(name).cloned().unwrap_or_default();
            stack.push(name.to_owned());
            // Soft dependencies are best effort: one that cycles or does not
            // resolve is left out, never fatal.
            for soft in pre.iter().flat_map(|p| index.resolve_soft(p)) {
                let mut trial = out.clone();
                if visit(index, &soft, stack, &mut trial).is_ok() {
                    *out = trial;
                }
            }
            for d in deps {
                visit(index, d, stack, out)?;
            }
            stack.pop();
            out.push(name.to_owned());
            for soft in post.iter().flat_map(|p| index.resolve_soft(p)) {
                let mut trial = out.clone();
                if visit(index, &soft, stack, &mut trial).is_ok() {
                    *out = trial;
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        visit(self, &canonical(name), &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.deps.get(name).map(|(p, _)| self.dir.join(p))
    }
}

/// Parses `softdep NAME pre: A B post: C` lines.
fn parse_softdeps(text: &str) -> HashMap<String, (Vec<String>, Vec<String>)> {
    let mut out: HashMap<String, (Vec<String>, Vec<String>)> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some("softdep"), Some(name)) = (words.next(), words.next()) else {
            continue;
        };
        let entry = out.entry(canonical(name)).or_default();
        let mut post = false;
        for w in words {
            match w {
                "pre:" => post = false,
                "post:" => post = true,
                m if post => entry.1.push(m.to_owned()),
                m => entry.0.push(m.to_owned()),
            }
        }
    }
    out
}

/// One device's modalias, with where it was found.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Device {
    /// `pci/0000:00:03.0`: bus and device name.
    pub id: String,
    pub modalias: String,
}

/// Every device under `sys/bus/*/devices/*` that has a modalias.
pub fn scan_devices(sys: &Path) -> Vec<Device> {
    let mut out = Vec::new();
    let Ok(buses) = fs::read_dir(sys.join("bus")) else {
        return out;
    };
    for bus in buses.flatten() {
        let Ok(devices) = fs::read_dir(bus.path().join("devices")) else {
            continue;
        };
        for dev in devices.flatten() {
            if let Ok(m) = fs::read_to_string(dev.path().join("modalias")) {
                let modalias = m.trim().to_owned();
                if !modalias.is_empty() {
                    let id = format!(
                        "{}/{}",
                        bus.file_name().to_string_lossy(),
                        dev.file_name().to_string_lossy()
                    );
                    out.push(Device { id, modalias });
                }
            }
        }
    }
    out.sort();
    out
}

/// Loads modules into the running kernel. A trait so the matching loop can
/// be tested without a kernel.
pub trait Loader {
    /// Whether the module is already present (`/sys/module/NAME`).
    fn is_loaded(&self, name: &str) -> bool;
    fn load(&mut self, name: &str, path: &Path) -> Result<(), ModError>;
}

/// The real loader: `finit_module(2)` on the running kernel.
#[derive(Debug)]
pub struct KernelLoader {
    pub sys: PathBuf,
}

impl Loader for KernelLoader {
    fn is_loaded(&self, name: &str) -> bool {
        self.sys.join("module").join(name).exists()
    }

    fn load(&mut self, name: &str, path: &Path) -> Result<(), ModError> {
        let file = fs::File::open(path).map_err(|source| ModError::Open {
            name: name.into(),
            path: path.into(),
            source,
        })?;
        match crate::sys::finit_module(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(17) => Ok(()), // EEXIST: loaded meanwhile
            Err(source) => Err(ModError::Load {
                name: name.into(),
                source,
            }),
        }
    }
}

/// What `load_for_hardware` did.
#[derive(Debug, Default)]
pub struct Report {
    /// Modules loaded, in load order.
    pub loaded: Vec<String>,
    /// Modules that failed, with the error.
    pub failed: Vec<(String, String)>,
    /// Devices with no module (neither loadable nor built in).
    pub unmatched: Vec<Device>,
    pub rounds: usize,
}

/// Scans `sys` for devices, loads the modules they need, and repeats while
/// new modules load (new buses appear), for at most `max_rounds` and `budget`.
pub fn load_for_hardware(
    index: &ModuleIndex,
    sys: &Path,
    loader: &mut dyn Loader,
    settle: Duration,
    max_rounds: usize,
    budget: Duration,
) -> Report {
    let start = Instant::now();
    let mut report = Report::default();
    let mut seen: BTreeSet<Device> = BTreeSet::new();
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    let mut unmatched: BTreeMap<String, Device> = BTreeMap::new();
    while report.rounds < max_rounds && start.elapsed() < budget {
        report.rounds += 1;
        let mut loaded_this_round = 0;
        for dev in scan_devices(sys) {
            if !seen.insert(dev.clone()) {
                continue;
            }
            let modules = index.lookup(&dev.modalias);
            if modules.is_empty() {
                debug!("no module for {} ({})", dev.id, dev.modalias);
                unmatched.insert(dev.id.clone(), dev);
                continue;
            }
            for module in modules {
                if index.is_builtin(module) || !attempted.insert(module.to_owned()) {
                    continue;
                }
                let order = match index.load_order(module) {
                    Ok(o) => o,
                    Err(e) => {
                        warn!("{}: {e}", dev.id);
                        report.failed.push((module.to_owned(), e.to_string()));
                        continue;
                    }
                };
                for name in order {
                    if loader.is_loaded(&name) || report.loaded.contains(&name) {
                        continue;
                    }
                    let Some(path) = index.path_of(&name) else {
                        continue;
                    };
                    let t = Instant::now();
                    match loader.load(&name, &path) {
                        Ok(()) => {
                            info!(
                                "loaded module {name} for {} ({} ms)",
                                dev.id,
                                t.elapsed().as_millis()
                            );
                            report.loaded.push(name);
                            loaded_this_round += 1;
                        }
                        Err(e) => {
                            warn!("{}: {}", dev.id, error_chain(&e));
                            report.failed.push((name, error_chain(&e)));
                            break; // the rest of the chain needs this one
                        }
                    }
                }
            }
        }
        if loaded_this_round == 0 {
            break;
        }
        std::thread::sleep(settle);
    }
    // Devices matched in a later round (after their bus driver loaded) are not unmatched.
    report.unmatched = unmatched
        .into_values()
        .filter(|d| index.lookup(&d.modalias).is_empty())
        .collect();
    report
}

/// `error: cause: cause`, for one log line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000001v* virtio_net
alias virtio:d00000002v* virtio_blk
alias pci:v00008086d0000100Esv*sd*bc*sc*i* e1000
alias usb:v0BDAp8179d[0-1]*dc*dsc*dp*ic*isc*ip*in* r8188eu
alias pci:v*d*sv*sd*bc01sc06i01* ahci
";
    const DEP: &str = "\
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/ethernet/intel/e1000/e1000.ko:
kernel/drivers/net/wireless/r8188eu.ko:
kernel/drivers/ata/ahci.ko: kernel/drivers/ata/libahci.ko
kernel/drivers/ata/libahci.ko:
";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(
            ALIAS,
            DEP,
            Path::new("modules.alias"),
            Path::new("modules.dep"),
        )
        .unwrap()
    }

    #[test]
    fn modalias_globs_match() {
        let i = index();
        assert_eq!(
            i.lookup("pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"),
            ["virtio_pci"]
        );
        assert_eq!(i.lookup("virtio:d00000001v00001AF4"), ["virtio_net"]);
        assert_eq!(
            i.lookup("pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"),
            ["e1000"]
        );
        assert_eq!(
            i.lookup("pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01"),
            ["ahci"]
        );
        assert_eq!(
            i.lookup("usb:v0BDAp8179d0100dc00dsc00dp00icFFiscFFipFFin00"),
            ["r8188eu"]
        );
        assert!(i
            .lookup("usb:v0BDAp8179d2200dc00dsc00dp00icFFiscFFipFFin00")
            .is_empty());
        assert!(i
            .lookup("pci:v00008086d00007000sv00000000sd00000000bc06sc01i00")
            .is_empty());
        // Case matters: hex digits in modaliases are upper case.
        assert!(i
            .lookup("pci:v00001af4d00001000sv00001AF4sd00000001bc02sc00i00")
            .is_empty());
    }

    #[test]
    fn dependencies_load_first() {
        let i = index();
        assert_eq!(
            i.load_order("virtio-net").unwrap(),
            [
                "failover",
                "net_failover",
                "virtio",
                "virtio_ring",
                "virtio_net"
            ]
        );
        assert_eq!(
            i.load_order("virtio_pci").unwrap(),
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci"
            ]
        );
        assert!(matches!(i.load_order("nope"), Err(ModError::Unknown(_))));
    }

    #[test]
    fn soft_dependencies_resolve_through_names_and_aliases() {
        let alias = "alias crct10dif crct10dif_generic\nalias crct10dif crct10dif_pclmul\n";
        let dep = "crc_t10dif.ko: crct10dif_common.ko\ncrct10dif_common.ko:\ncrct10dif_generic.ko: crct10dif_common.ko\n\
                   crct10dif_pclmul.ko: crct10dif_common.ko\nx.ko:\ny.ko:\n";
        let mut i = ModuleIndex::parse(alias, dep, Path::new("a"), Path::new("d")).unwrap();
        i.softdeps = parse_softdeps(
            "softdep crc_t10dif pre: crct10dif\nsoftdep x pre: missing post: y\nsoftdep y pre: x\n",
        );
        assert_eq!(
            i.load_order("crc_t10dif").unwrap(),
            [
                "crct10dif_common",
                "crct10dif_generic",
                "crct10dif_pclmul",
                "crc_t10dif"
            ]
        );
        // Missing and cyclic soft dependencies are skipped, not fatal.
        assert_eq!(i.load_order("x").unwrap(), ["x", "y"]);
    }

    #[test]
    fn cycles_are_errors_not_hangs() {
        let dep = "a.ko: b.ko\nb.ko: a.ko\n";
        let i = ModuleIndex::parse("", dep, Path::new("a"), Path::new("d")).unwrap();
        assert!(matches!(i.load_order("a"), Err(ModError::Cycle { .. })));
    }

    #[test]
    fn bad_alias_line_names_file_and_line() {
        let e = ModuleIndex::parse(
            "alias onlyone\n",
            "",
            Path::new("/x/modules.alias"),
            Path::new("d"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/x/modules.alias:1: cannot parse \"alias onlyone\""
        );
    }

    #[test]
    fn missing_alias_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("modules.dep"), DEP).unwrap();
        let e = ModuleIndex::load(dir.path()).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot read ") && e.to_string().ends_with("modules.alias"),
            "{e}"
        );
    }

    /// A fake kernel: loading virtio_pci makes the virtio devices appear,
    /// as the real one does.
    struct FakeKernel {
        sys: PathBuf,
        loaded: Vec<String>,
        fail: Option<&'static str>,
    }

    impl Loader for FakeKernel {
        fn is_loaded(&self, name: &str) -> bool {
            self.loaded.iter().any(|m| m == name)
        }
        fn load(&mut self, name: &str, path: &Path) -> Result<(), ModError> {
            assert!(path.ends_with(format!("{name}.ko")), "{}", path.display());
            if self.fail == Some(name) {
                return Err(ModError::Load {
                    name: name.into(),
                    source: io::Error::from_raw_os_error(8),
                });
            }
            if name == "virtio_pci" {
                add_device(&self.sys, "virtio", "virtio0", "virtio:d00000001v00001AF4");
                add_device(&self.sys, "virtio", "virtio1", "virtio:d00000002v00001AF4");
            }
            self.loaded.push(name.to_owned());
            Ok(())
        }
    }

    fn add_device(sys: &Path, bus: &str, name: &str, modalias: &str) {
        let dir = sys.join("bus").join(bus).join("devices").join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("modalias"), format!("{modalias}\n")).unwrap();
    }

    #[test]
    fn loads_to_a_fixed_point_and_reports_unknown_hardware() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        add_device(
            &sys,
            "pci",
            "0000:00:03.0",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
        );
        add_device(
            &sys,
            "pci",
            "0000:00:00.0",
            "pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00",
        );
        let mut index = index();
        index.dir = PathBuf::from("/lib/modules/x");
        let mut k = FakeKernel {
            sys: sys.clone(),
            loaded: vec![],
            fail: None,
        };
        let r = load_for_hardware(
            &index,
            &sys,
            &mut k,
            Duration::ZERO,
            10,
            Duration::from_secs(5),
        );
        assert_eq!(
            r.loaded,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net",
                "virtio_blk"
            ]
        );
        assert_eq!(r.unmatched.len(), 1);
        assert_eq!(r.unmatched[0].id, "pci/0000:00:00.0");
        assert!(r.failed.is_empty());
        assert_eq!(r.rounds, 3);
    }

    #[test]
    fn a_failing_module_is_reported_and_the_rest_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        add_device(
            &sys,
            "pci",
            "0000:00:03.0",
            "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00",
        );
        add_device(
            &sys,
            "pci",
            "0000:00:04.0",
            "pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00",
        );
        let mut k = FakeKernel {
            sys: sys.clone(),
            loaded: vec![],
            fail: Some("e1000"),
        };
        let r = load_for_hardware(
            &index(),
            &sys,
            &mut k,
            Duration::ZERO,
            10,
            Duration::from_secs(5),
        );
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "e1000");
        assert!(
            r.failed[0].1.contains("module e1000: finit_module failed"),
            "{:?}",
            r.failed
        );
        assert!(r.loaded.contains(&"virtio_net".to_string()));
    }
}
