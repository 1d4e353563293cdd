//! Kernel modules for the initramfs: index a kernel's `lib/modules/<ver>`,
//! take the closure of a wanted list over each module's dependencies, and
//! write the `modules.dep`, `modules.alias` and `modules.softdep` that depmod
//! would have written for that subset.
//!
//! Dependencies come from each module's ELF `.modinfo` section, a run of
//! NUL-separated `key=value` strings (`depends=a,b`, `alias=pci:v...`,
//! `softdep=pre: x post: y`), as `modinfo(8)` reads them. Module names are
//! compared the way modprobe compares them: `-` and `_` are the same.
//!
//! Order in `modules.dep` follows depmod: a module's line lists *all* its
//! transitive dependencies, every module before the modules it needs, so a
//! loader walks the list from the end back to the front, then loads the
//! module itself.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

/// How a module file is stored in the kernel's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

const SUFFIXES: &[(&str, Compression)] = &[
    (".ko", Compression::None),
    (".ko.xz", Compression::Xz),
    (".ko.zst", Compression::Zstd),
    (".ko.gz", Compression::Gzip),
];

/// Why a module tree could not be read or a module not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the module directory {}", path.display())]
    ReadDir { path: PathBuf, source: io::Error },
    #[error("cannot read {}", path.display())]
    ReadFile { path: PathBuf, source: io::Error },
    #[error("module file name {} is not UTF-8", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("cannot decompress module {}", path.display())]
    Decompress { path: PathBuf, source: io::Error },
    #[error("module {} is gzip-compressed, which this builder does not read", path.display())]
    Gzip { path: PathBuf },
    #[error("module {} is not a readable ELF object", path.display())]
    Elf {
        path: PathBuf,
        source: object::Error,
    },
    #[error("module {} has no .modinfo section", path.display())]
    NoModinfo { path: PathBuf },
    #[error("modules depend on each other in a cycle: {modules}")]
    DependencyCycle { modules: String },
}

/// A module's name as modprobe compares it: `-` becomes `_`.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// One `.ko` file of the kernel tree.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    /// Canonical name (`virtio_net`, `t10_pi`).
    pub name: String,
    /// Path in `lib/modules/<ver>/` once decompressed (`kernel/drivers/net/virtio_net.ko`).
    pub rel_path: String,
    /// Where the (possibly compressed) file is on disk.
    pub source: PathBuf,
    compression: Compression,
}

impl ModuleFile {
    /// Reads the module as a plain ELF object, decompressing it if needed.
    pub fn load(&self) -> Result<Vec<u8>, Error> {
        let raw = std::fs::read(&self.source).map_err(|source| Error::ReadFile {
            path: self.source.clone(),
            source,
        })?;
        let decompress_err = |source| Error::Decompress {
            path: self.source.clone(),
            source,
        };
        match self.compression {
            Compression::None => Ok(raw),
            Compression::Xz => liblzma::decode_all(&raw[..]).map_err(decompress_err),
            Compression::Zstd => zstd::decode_all(&raw[..]).map_err(decompress_err),
            Compression::Gzip => Err(Error::Gzip {
                path: self.source.clone(),
            }),
        }
    }

    /// Reads only the `.modinfo` section: for a plain `.ko` that is a few
    /// small reads, not the whole file.
    pub fn modinfo(&self) -> Result<ModInfo, Error> {
        if self.compression != Compression::None {
            return ModInfo::from_elf(&self.load()?, &self.source);
        }
        let file = std::fs::File::open(&self.source).map_err(|source| Error::ReadFile {
            path: self.source.clone(),
            source,
        })?;
        let cache = object::ReadCache::new(file);
        let elf_err = |source| Error::Elf {
            path: self.source.clone(),
            source,
        };
        let obj = object::File::parse(&cache).map_err(elf_err)?;
        let section = obj
            .section_by_name(".modinfo")
            .ok_or_else(|| Error::NoModinfo {
                path: self.source.clone(),
            })?;
        Ok(ModInfo::parse(section.data().map_err(elf_err)?))
    }
}

/// The `.modinfo` fields the builder uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `depends=`: hard dependencies, canonical names, in the module's order.
    pub depends: Vec<String>,
    /// `softdep=pre: ...`: modules to load before this one.
    pub softdep_pre: Vec<String>,
    /// `softdep=... post: ...`: modules to load after this one.
    pub softdep_post: Vec<String>,
    /// `alias=`: device patterns this module serves.
    pub aliases: Vec<String>,
}

impl ModInfo {
    /// Parses the raw `.modinfo` section.
    pub fn parse(section: &[u8]) -> ModInfo {
        let mut info = ModInfo::default();
        for field in section.split(|b| *b == 0).filter(|f| !f.is_empty()) {
            let field = String::from_utf8_lossy(field);
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            match key {
                "depends" => info.depends.extend(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|d| !d.is_empty())
                        .map(canonical),
                ),
                "alias" => info.aliases.push(value.to_owned()),
                "softdep" => {
                    // "pre: a b post: c", either part optional, like modprobe.d(5).
                    let mut list = None;
                    for token in value.split_whitespace() {
                        match token {
                            "pre:" => list = Some(&mut info.softdep_pre),
                            "post:" => list = Some(&mut info.softdep_post),
                            name => {
                                if let Some(l) = list.as_mut() {
                                    l.push(canonical(name));
                                }
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        info
    }

    /// Reads the `.modinfo` section of a module's ELF bytes; `path` names it in errors.
    pub fn from_elf(elf: &[u8], path: &Path) -> Result<ModInfo, Error> {
        let file = object::File::parse(elf).map_err(|source| Error::Elf {
            path: path.to_owned(),
            source,
        })?;
        let section = file
            .section_by_name(".modinfo")
            .ok_or_else(|| Error::NoModinfo {
                path: path.to_owned(),
            })?;
        let data = section.data().map_err(|source| Error::Elf {
            path: path.to_owned(),
            source,
        })?;
        Ok(ModInfo::parse(data))
    }
}

/// A kernel's module directory, indexed by canonical module name.
#[derive(Debug, Clone)]
pub struct ModuleTree {
    dir: PathBuf,
    modules: BTreeMap<String, ModuleFile>,
    builtin: BTreeSet<String>,
    builtin_file: Option<Vec<u8>>,
    duplicates: Vec<String>,
    /// `(pattern, module)` for every module of the tree, read on first need.
    aliases: OnceCell<Vec<(String, String)>>,
}

impl ModuleTree {
    /// Walks `<dir>/kernel/**` for `.ko`, `.ko.xz`, `.ko.zst` (and `.ko.gz`,
    /// refused only if selected) and reads `<dir>/modules.builtin` if present.
    pub fn scan(dir: &Path) -> Result<ModuleTree, Error> {
        let mut tree = ModuleTree {
            dir: dir.to_owned(),
            modules: BTreeMap::new(),
            builtin: BTreeSet::new(),
            builtin_file: None,
            duplicates: Vec::new(),
            aliases: OnceCell::new(),
        };
        tree.walk(&dir.join("kernel"), "kernel")?;
        let builtin = dir.join("modules.builtin");
        match std::fs::read(&builtin) {
            Ok(bytes) => {
                for line in String::from_utf8_lossy(&bytes).lines() {
                    let base = line.trim().rsplit('/').next().unwrap_or_default();
                    if let Some(name) = base.strip_suffix(".ko") {
                        tree.builtin.insert(canonical(name));
                    }
                }
                tree.builtin_file = Some(bytes);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(Error::ReadFile {
                    path: builtin,
                    source,
                })
            }
        }
        Ok(tree)
    }

    fn walk(&mut self, dir: &Path, rel: &str) -> Result<(), Error> {
        let read_err = |source| Error::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let mut entries = std::fs::read_dir(dir)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        // Sorted, so that which of two same-named files wins is stable.
        entries.sort();
        for path in entries {
            let file_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::NotUtf8 { path: path.clone() })?;
            let rel_child = format!("{rel}/{file_name}");
            let meta = std::fs::metadata(&path).map_err(|source| Error::ReadFile {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                self.walk(&path, &rel_child)?;
                continue;
            }
            let Some((stem, compression)) = SUFFIXES
                .iter()
                .find_map(|(suffix, c)| file_name.strip_suffix(suffix).map(|stem| (stem, *c)))
            else {
                continue;
            };
            let name = canonical(stem);
            let rel_path = format!("{rel}/{stem}.ko");
            if let Some(first) = self.modules.get(&name) {
                self.duplicates.push(format!(
                    "{name}: using {}, ignoring {rel_child}",
                    first.rel_path
                ));
                continue;
            }
            self.modules.insert(
                name.clone(),
                ModuleFile {
                    name,
                    rel_path,
                    source: path,
                    compression,
                },
            );
        }
        Ok(())
    }

    /// The directory this tree was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The module file called `name` (either spelling), if this kernel has one.
    pub fn get(&self, name: &str) -> Option<&ModuleFile> {
        self.modules.get(&canonical(name))
    }

    /// Whether `name` is compiled into the kernel (listed in `modules.builtin`).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical(name))
    }

    /// Number of module files indexed.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The raw `modules.builtin`, if the tree has one.
    pub fn builtin_file(&self) -> Option<&[u8]> {
        self.builtin_file.as_deref()
    }

    /// Modules of this tree with an alias matching `name`, sorted. The alias
    /// table comes from the tree's own `modules.alias` if depmod wrote one,
    /// else from every module's `.modinfo` (read once, on first need).
    pub fn alias_providers(&self, name: &str) -> Result<Vec<String>, Error> {
        let table = match self.aliases.get() {
            Some(t) => t,
            None => {
                let t = self.read_aliases()?;
                self.aliases.get_or_init(|| t)
            }
        };
        let mut out: Vec<String> = table
            .iter()
            .filter(|(pattern, module)| {
                self.modules.contains_key(module) && glob_match(pattern, name)
            })
            .map(|(_, module)| module.clone())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    fn read_aliases(&self) -> Result<Vec<(String, String)>, Error> {
        let path = self.dir.join("modules.alias");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                return Ok(text
                    .lines()
                    .filter_map(|l| {
                        let mut w = l.split_whitespace();
                        (w.next() == Some("alias")).then_some(())?;
                        Some((w.next()?.to_owned(), canonical(w.next()?)))
                    })
                    .collect())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::ReadFile { path, source }),
        }
        let mut table = Vec::new();
        for (name, file) in &self.modules {
            if file.compression == Compression::Gzip {
                continue;
            }
            for a in file.modinfo()?.aliases {
                table.push((a, name.clone()));
            }
        }
        Ok(table)
    }

    /// Takes the closure of `wanted` over hard dependencies and the softdeps
    /// this kernel has as modules.
    pub fn select<S: AsRef<str>>(&self, wanted: &[S]) -> Result<Selection, Error> {
        let mut sel = Selection::default();
        for d in &self.duplicates {
            sel.notes.push(format!("duplicate module {d}"));
        }
        let mut queue: Vec<(String, Option<String>)> = Vec::new();
        let mut seen_wanted = BTreeSet::new();
        for w in wanted {
            let name = canonical(w.as_ref());
            if seen_wanted.insert(name.clone()) {
                queue.push((name, None));
            }
        }
        // Depth-first over a stack; the result is a map, so visiting order
        // does not leak into the output.
        queue.reverse();
        while let Some((name, needed_by)) = queue.pop() {
            if sel.modules.contains_key(&name) {
                continue;
            }
            let Some(file) = self.modules.get(&name) else {
                match (&needed_by, self.builtin.contains(&name)) {
                    (None, true) => sel.builtin.push(name),
                    (None, false) => sel.warnings.push(format!(
                        "wanted module {name} is neither a module nor built into this kernel"
                    )),
                    (Some(_), true) => {}
                    (Some(user), false) => sel.warnings.push(format!(
                        "{user} needs {name}, which this kernel does not have"
                    )),
                }
                continue;
            };
            let data = file.load()?;
            let info = ModInfo::from_elf(&data, &file.source)?;
            for dep in info.depends.iter().rev() {
                queue.push((dep.clone(), Some(name.clone())));
            }
            for soft in info.softdep_pre.iter().chain(&info.softdep_post) {
                if self.modules.contains_key(soft) {
                    queue.push((soft.clone(), Some(name.clone())));
                } else if !self.builtin.contains(soft) {
                    // Like modprobe, a soft dependency may name an alias
                    // (`crct10dif` is an alias of crct10dif_generic).
                    let providers = self.alias_providers(soft)?;
                    if providers.is_empty() {
                        sel.notes.push(format!("{name}: soft dependency {soft} is no module or alias of this kernel, skipped"));
                    }
                    for p in providers {
                        queue.push((p, Some(name.clone())));
                    }
                }
            }
            sel.modules.insert(
                name,
                Selected {
                    rel_path: file.rel_path.clone(),
                    data,
                    info,
                },
            );
        }
        sel.builtin.sort();
        sel.builtin.dedup();
        sel.notes.sort();
        sel.notes.dedup();
        sel.warnings.sort();
        sel.warnings.dedup();
        Ok(sel)
    }
}

/// fnmatch(3) without flags, as kmod matches aliases: `*`, `?` and `[...]`
/// (with ranges and a leading `!` or `^`).
fn glob_match(pattern: &str, text: &str) -> bool {
    fn class(p: &[char], c: char) -> Option<(bool, usize)> {
        // Returns (matched, length of the class in p, brackets included).
        let mut i = 1;
        let negate = matches!(p.get(i), Some('!' | '^'));
        if negate {
            i += 1;
        }
        let mut matched = false;
        let mut first = true;
        while let Some(&pc) = p.get(i) {
            if pc == ']' && !first {
                return Some((matched != negate, i + 1));
            }
            first = false;
            if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|e| *e != ']') {
                matched |= (pc..=p[i + 2]).contains(&c);
                i += 3;
            } else {
                matched |= pc == c;
                i += 1;
            }
        }
        None // unterminated: `[` is literal
    }
    fn go(p: &[char], t: &[char]) -> bool {
        match p.first() {
            None => t.is_empty(),
            Some('*') => (0..=t.len()).any(|k| go(&p[1..], &t[k..])),
            Some('?') => !t.is_empty() && go(&p[1..], &t[1..]),
            Some('[') => match (t.first(), class(p, *t.first().unwrap_or(&'\0'))) {
                (Some(_), Some((true, len))) => go(&p[len..], &t[1..]),
                (Some(_), Some((false, _))) | (None, Some(_)) => false,
                (_, None) => t.first() == Some(&'[') && go(&p[1..], &t[1..]),
            },
            Some(c) => t.first() == Some(c) && go(&p[1..], &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

/// A module chosen for the initramfs.
#[derive(Clone)]
pub struct Selected {
    /// Path under `lib/modules/<ver>/`.
    pub rel_path: String,
    /// The plain (decompressed) ELF bytes.
    pub data: Vec<u8>,
    pub info: ModInfo,
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("rel_path", &self.rel_path)
            .field("bytes", &self.data.len())
            .field("info", &self.info)
            .finish()
    }
}

/// The outcome of [`ModuleTree::select`].
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Included modules by canonical name.
    pub modules: BTreeMap<String, Selected>,
    /// Wanted modules that this kernel has built in (nothing to include).
    pub builtin: Vec<String>,
    /// Wanted or needed modules this kernel has in no form.
    pub warnings: Vec<String>,
    /// Things worth knowing: skipped soft dependencies, duplicate files.
    pub notes: Vec<String>,
}

impl Selection {
    /// Orders the included modules so that every module comes before the
    /// modules it depends on ("users first", as depmod sorts), ties broken
    /// by name. Fails on a dependency cycle.
    fn users_first(&self) -> Result<BTreeMap<&str, usize>, Error> {
        let deps = |m: &str| {
            self.modules[m]
                .info
                .depends
                .iter()
                .filter(|d| self.modules.contains_key(*d))
        };
        let mut users: BTreeMap<&str, usize> =
            self.modules.keys().map(|k| (k.as_str(), 0)).collect();
        for m in self.modules.keys() {
            for d in deps(m) {
                *users.get_mut(d.as_str()).expect("dep is included") += 1;
            }
        }
        let mut ready: BTreeSet<&str> = users
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(m, _)| *m)
            .collect();
        let mut order = BTreeMap::new();
        while let Some(m) = ready.pop_first() {
            order.insert(m, order.len());
            for d in deps(m) {
                let n = users.get_mut(d.as_str()).expect("dep is included");
                *n -= 1;
                if *n == 0 {
                    ready.insert(d.as_str());
                }
            }
        }
        if order.len() != self.modules.len() {
            let stuck: Vec<&str> = self
                .modules
                .keys()
                .map(String::as_str)
                .filter(|m| !order.contains_key(m))
                .collect();
            return Err(Error::DependencyCycle {
                modules: stuck.join(", "),
            });
        }
        Ok(order)
    }

    /// All transitive hard dependencies of `name` that are included.
    fn closure(&self, name: &str) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        let mut stack = vec![name];
        while let Some(m) = stack.pop() {
            for d in &self.modules[m].info.depends {
                if let Some((k, _)) = self.modules.get_key_value(d) {
                    if out.insert(k.as_str()) {
                        stack.push(k.as_str());
                    }
                }
            }
        }
        out
    }

    /// `modules.dep` in depmod's format, one line per included module sorted
    /// by path: `kernel/a.ko: kernel/b.ko kernel/c.ko`, where each module
    /// precedes its own dependencies (load from the end of the list back).
    pub fn modules_dep(&self) -> Result<String, Error> {
        let order = self.users_first()?;
        let mut lines: Vec<String> = Vec::with_capacity(self.modules.len());
        for (name, m) in &self.modules {
            let mut deps: Vec<&str> = self.closure(name).into_iter().collect();
            deps.sort_by_key(|d| order[d]);
            let mut line = format!("{}:", m.rel_path);
            for d in deps {
                line.push(' ');
                line.push_str(&self.modules[d].rel_path);
            }
            lines.push(line);
        }
        lines.sort();
        Ok(lines.iter().fold(String::new(), |mut s, l| {
            let _ = writeln!(s, "{l}");
            s
        }))
    }

    /// `modules.alias` in depmod's format: `alias <pattern> <module>` for
    /// every alias of every included module, sorted.
    pub fn modules_alias(&self) -> String {
        let mut lines: Vec<String> = self
            .modules
            .iter()
            .flat_map(|(name, m)| {
                m.info
                    .aliases
                    .iter()
                    .map(move |a| format!("alias {a} {name}"))
            })
            .collect();
        lines.sort();
        lines.dedup();
        let mut out = String::from("# Aliases extracted from modules themselves.\n");
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
        out
    }

    /// `modules.softdep` in depmod's format, for included modules that
    /// declare soft dependencies: `softdep <module> pre: a post: b`.
    pub fn modules_softdep(&self) -> String {
        let mut out = String::from("# Soft dependencies extracted from modules themselves.\n");
        for (name, m) in &self.modules {
            let (pre, post) = (&m.info.softdep_pre, &m.info.softdep_post);
            if pre.is_empty() && post.is_empty() {
                continue;
            }
            let _ = write!(out, "softdep {name}");
            if !pre.is_empty() {
                let _ = write!(out, " pre: {}", pre.join(" "));
            }
            if !post.is_empty() {
                let _ = write!(out, " post: {}", post.join(" "));
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! A fake kernel module tree of tiny ELF objects with `.modinfo` sections.

    use std::path::Path;

    use object::write::Object;
    use object::{Architecture, BinaryFormat, Endianness, SectionKind};

    /// An ELF relocatable object with the given `.modinfo` fields.
    pub fn ko(fields: &[&str]) -> Vec<u8> {
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
        let id = obj.add_section(Vec::new(), b".modinfo".to_vec(), SectionKind::ReadOnlyData);
        let mut data = Vec::new();
        for f in fields {
            data.extend_from_slice(f.as_bytes());
            data.push(0);
        }
        obj.set_section_data(id, data, 1);
        obj.write().expect("write fake module")
    }

    /// Writes a module at `<dir>/<rel>` with the given `.modinfo` fields.
    pub fn put(dir: &Path, rel: &str, fields: &[&str]) {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, ko(fields)).unwrap();
    }

    /// A small tree shaped like the virtio part of a real kernel:
    ///
    /// ```text
    /// virtio_net -> net_failover -> failover; virtio_net -> virtio_ring, virtio
    /// virtio_pci -> virtio_pci_modern_dev, virtio_ring, virtio
    /// sd_mod -> scsi_mod, t10-pi (file name with a dash); t10-pi -> crc-t10dif
    /// virtio_blk (xz), virtio_scsi (zstd) -> scsi_mod, virtio_ring, virtio
    /// crc-t10dif softdep pre: crct10dif (an alias of crct10dif_generic)
    ///                         crc_absent (nowhere)
    /// ```
    /// and `modules.builtin` listing `ahci`.
    pub fn tree(dir: &Path) {
        put(
            dir,
            "kernel/drivers/net/virtio_net.ko",
            &[
                "alias=virtio:d00000001v*",
                "depends=virtio_ring,virtio,net_failover",
                "name=virtio_net",
            ],
        );
        put(
            dir,
            "kernel/drivers/net/net_failover.ko",
            &["depends=failover", "name=net_failover"],
        );
        put(
            dir,
            "kernel/net/core/failover.ko",
            &["depends=", "name=failover"],
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio.ko",
            &["depends=", "name=virtio"],
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio_ring.ko",
            &["depends=virtio", "name=virtio_ring"],
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
            &["depends=", "name=virtio_pci_modern_dev"],
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio_pci.ko",
            &[
                "alias=pci:v00001AF4d*sv*sd*bc*sc*i*",
                "depends=virtio_ring,virtio_pci_modern_dev,virtio",
            ],
        );
        put(dir, "kernel/drivers/scsi/scsi_mod.ko", &["depends="]);
        put(
            dir,
            "kernel/drivers/scsi/sd_mod.ko",
            &[
                "alias=scsi:t-0x00*",
                "alias=scsi:t-0x0e*",
                "depends=scsi_mod,t10-pi",
            ],
        );
        put(dir, "kernel/block/t10-pi.ko", &["depends=crc-t10dif"]);
        put(
            dir,
            "kernel/crypto/crc-t10dif.ko",
            &["softdep=pre: crct10dif crc_absent", "depends="],
        );
        put(
            dir,
            "kernel/crypto/crct10dif_generic.ko",
            &["depends=", "alias=crypto-crct10dif", "alias=crct10dif"],
        );
        let blk = ko(&["alias=virtio:d00000002v*", "depends=virtio,virtio_ring"]);
        let blk = liblzma::encode_all(&blk[..], 6).unwrap();
        std::fs::write(dir.join("kernel/drivers/virtio/virtio_blk.ko.xz"), blk).unwrap();
        let scsi = ko(&[
            "alias=virtio:d00000008v*",
            "depends=scsi_mod,virtio_ring,virtio",
        ]);
        let scsi = zstd::encode_all(&scsi[..], 3).unwrap();
        std::fs::write(dir.join("kernel/drivers/scsi/virtio_scsi.ko.zst"), scsi).unwrap();
        put(dir, "kernel/drivers/unrelated/big.ko", &["depends=virtio"]);
        std::fs::write(dir.join("kernel/drivers/unrelated/README"), "not a module").unwrap();
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/ata/ahci.ko\nkernel/drivers/nvme/host/nvme.ko\n",
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_modinfo_fields() {
        let raw = b"license=GPL\0depends=virtio_ring,t10-pi\0alias=virtio:d00000001v*\0\0\0softdep=pre: crc32c post: foo-bar baz\0";
        let info = ModInfo::parse(raw);
        assert_eq!(info.depends, ["virtio_ring", "t10_pi"]);
        assert_eq!(info.aliases, ["virtio:d00000001v*"]);
        assert_eq!(info.softdep_pre, ["crc32c"]);
        assert_eq!(info.softdep_post, ["foo_bar", "baz"]);
        assert_eq!(ModInfo::parse(b"depends=\0"), ModInfo::default());
    }

    #[test]
    fn reads_modinfo_from_elf() {
        let elf = fake::ko(&["depends=a,b", "alias=x"]);
        let info = ModInfo::from_elf(&elf, Path::new("m.ko")).unwrap();
        assert_eq!(info.depends, ["a", "b"]);
        assert!(matches!(
            ModInfo::from_elf(b"not elf", Path::new("bad.ko")),
            Err(Error::Elf { .. })
        ));
    }

    #[test]
    fn indexes_tree_with_both_spellings_and_compression() {
        let dir = tempfile::tempdir().unwrap();
        fake::tree(dir.path());
        let tree = ModuleTree::scan(dir.path()).unwrap();
        assert_eq!(tree.len(), 15);
        assert_eq!(
            tree.get("t10_pi").unwrap().rel_path,
            "kernel/block/t10-pi.ko"
        );
        assert_eq!(tree.get("crc_t10dif").unwrap().name, "crc_t10dif");
        assert_eq!(
            tree.get("virtio-blk").unwrap().rel_path,
            "kernel/drivers/virtio/virtio_blk.ko"
        );
        assert!(tree.is_builtin("ahci"));
        assert!(!tree.is_builtin("virtio_net"));
        let blk = tree.get("virtio_blk").unwrap().load().unwrap();
        assert_eq!(&blk[..4], b"\x7fELF");
    }

    #[test]
    fn closure_over_depends_and_softdeps() {
        let dir = tempfile::tempdir().unwrap();
        fake::tree(dir.path());
        let tree = ModuleTree::scan(dir.path()).unwrap();
        let sel = tree
            .select(&[
                "virtio-net",
                "sd_mod",
                "ahci",
                "nonexistent",
                "virtio_blk",
                "virtio_scsi",
            ])
            .unwrap();
        let names: Vec<&str> = sel.modules.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "crc_t10dif",
                "crct10dif_generic",
                "failover",
                "net_failover",
                "scsi_mod",
                "sd_mod",
                "t10_pi",
                "virtio",
                "virtio_blk",
                "virtio_net",
                "virtio_ring",
                "virtio_scsi",
            ]
        );
        assert_eq!(sel.builtin, ["ahci"]);
        assert_eq!(
            sel.warnings,
            ["wanted module nonexistent is neither a module nor built into this kernel"]
        );
        assert_eq!(sel.notes, ["crc_t10dif: soft dependency crc_absent is no module or alias of this kernel, skipped"]);
        assert_eq!(&sel.modules["virtio_blk"].data[..4], b"\x7fELF");
    }

    #[test]
    fn modules_dep_lists_users_before_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        fake::tree(dir.path());
        let tree = ModuleTree::scan(dir.path()).unwrap();
        let sel = tree
            .select(&["virtio_net", "virtio_pci", "sd_mod"])
            .unwrap();
        let dep = sel.modules_dep().unwrap();
        let want = "\
kernel/block/t10-pi.ko: kernel/crypto/crc-t10dif.ko
kernel/crypto/crc-t10dif.ko:
kernel/crypto/crct10dif_generic.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/scsi/scsi_mod.ko:
kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/block/t10-pi.ko kernel/crypto/crc-t10dif.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
";
        assert_eq!(dep, want);

        // The property that matters: loading each line's list from the end
        // back, then the module, never loads a module before its deps.
        let by_path: BTreeMap<&str, &str> = sel
            .modules
            .iter()
            .map(|(n, m)| (m.rel_path.as_str(), n.as_str()))
            .collect();
        for line in dep.lines() {
            let (module, deps) = line.split_once(':').unwrap();
            let mut loaded: Vec<&str> = Vec::new();
            for path in deps.split_whitespace().rev().chain([module]) {
                let name = by_path[path];
                for d in &sel.modules[name].info.depends {
                    assert!(loaded.contains(&d.as_str()), "{line}: {name} before {d}");
                }
                loaded.push(name);
            }
        }
    }

    #[test]
    fn modules_alias_and_softdep_are_sorted_depmod_lines() {
        let dir = tempfile::tempdir().unwrap();
        fake::tree(dir.path());
        let tree = ModuleTree::scan(dir.path()).unwrap();
        let sel = tree
            .select(&["virtio_pci", "virtio_net", "sd_mod", "virtio_blk"])
            .unwrap();
        assert_eq!(
            sel.modules_alias(),
            "\
# Aliases extracted from modules themselves.
alias crct10dif crct10dif_generic
alias crypto-crct10dif crct10dif_generic
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias scsi:t-0x00* sd_mod
alias scsi:t-0x0e* sd_mod
alias virtio:d00000001v* virtio_net
alias virtio:d00000002v* virtio_blk
"
        );
        assert_eq!(
            sel.modules_softdep(),
            "\
# Soft dependencies extracted from modules themselves.
softdep crc_t10dif pre: crct10dif crc_absent
"
        );
    }

    #[test]
    fn glob_matches_like_fnmatch() {
        assert!(glob_match(
            "virtio:d00000001v*",
            "virtio:d00000001v00001AF4"
        ));
        assert!(!glob_match(
            "virtio:d00000001v*",
            "virtio:d00000002v00001AF4"
        ));
        assert!(glob_match(
            "pci:v00008086d*sv*sd*bc02sc00i*",
            "pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00"
        ));
        assert!(glob_match("usb:v0BDAp8153d[0-2]*", "usb:v0BDAp8153d1000"));
        assert!(!glob_match("usb:v0BDAp8153d[0-2]*", "usb:v0BDAp8153d3000"));
        assert!(glob_match("a[!b]c", "axc") && !glob_match("a[!b]c", "abc"));
        assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac"));
        assert!(glob_match("crct10dif", "crct10dif") && !glob_match("crct10dif", "crct10dif2"));
        assert!(glob_match("x[y", "x[y"));
    }

    #[test]
    fn softdep_aliases_resolve_through_modules_alias_when_present() {
        let dir = tempfile::tempdir().unwrap();
        fake::put(dir.path(), "kernel/a.ko", &["softdep=post: thing"]);
        fake::put(
            dir.path(),
            "kernel/b.ko",
            &["alias=ignored-because-modules.alias-exists"],
        );
        std::fs::write(
            dir.path().join("modules.alias"),
            "# comment\nalias th?ng b\nalias thing gone\n",
        )
        .unwrap();
        let tree = ModuleTree::scan(dir.path()).unwrap();
        assert_eq!(tree.alias_providers("thing").unwrap(), ["b"]);
        let sel = tree.select(&["a"]).unwrap();
        assert_eq!(sel.modules.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn cycle_is_an_error_naming_the_modules() {
        let dir = tempfile::tempdir().unwrap();
        fake::put(dir.path(), "kernel/a.ko", &["depends=b"]);
        fake::put(dir.path(), "kernel/b.ko", &["depends=a"]);
        fake::put(dir.path(), "kernel/c.ko", &["depends=a"]);
        let tree = ModuleTree::scan(dir.path()).unwrap();
        let sel = tree.select(&["c"]).unwrap();
        match sel.modules_dep() {
            Err(Error::DependencyCycle { modules }) => assert_eq!(modules, "a, b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_tree_names_the_directory() {
        let err = ModuleTree::scan(Path::new("/nonexistent/lib/modules/x")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/lib/modules/x/kernel"),
            "{err}"
        );
    }
}
