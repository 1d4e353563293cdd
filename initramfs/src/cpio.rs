//! The newc ("070701") cpio format the kernel unpacks into its rootfs: an
//! in-process, reproducible writer and a small reader for tests and checks.
//!
//! Follows the kernel's `Documentation/driver-api/early-userspace/buffer-format.rst`
//! and cpio(5) "New ASCII Format": a 110-byte ASCII header of 13 eight-digit
//! hex fields, the NUL-terminated name padded so the data starts on a 4-byte
//! boundary, the data padded to 4 bytes, and a final `TRAILER!!!` entry.
//!
//! Reproducibility lives here: entries sit in a [`BTreeMap`] keyed by path, so
//! every directory precedes its contents (a path sorts before its extensions);
//! mtime, uid and gid are zero; inode numbers count up from 1 in path order;
//! device numbers of the containing filesystem are zero.

use std::collections::BTreeMap;
use std::fmt;

/// The magic that opens every newc header (no checksum variant).
pub const MAGIC: &[u8; 6] = b"070701";
/// The name of the entry that ends an archive.
pub const TRAILER: &str = "TRAILER!!!";
/// Length of a newc header: magic plus 13 fields of 8 hex digits.
pub const HEADER_LEN: usize = 110;

/// File type bits of `st_mode`, as newc stores them.
mod mode {
    pub const TYPE_MASK: u32 = 0o170_000;
    pub const DIR: u32 = 0o040_000;
    pub const REG: u32 = 0o100_000;
    pub const LNK: u32 = 0o120_000;
    pub const CHR: u32 = 0o020_000;
}

/// One file in the archive. Permissions are the low 12 bits (`0o7777`); the
/// writer adds the file type bits.
#[derive(Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { perm: u32 },
    File { perm: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { perm: u32, major: u32, minor: u32 },
}

impl fmt::Debug for Entry {
    // File contents can be megabytes: show their length, not their bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Dir { perm } => write!(f, "Dir({perm:o})"),
            Entry::File { perm, data } => write!(f, "File({perm:o}, {} bytes)", data.len()),
            Entry::Symlink { target } => write!(f, "Symlink({target})"),
            Entry::CharDev { perm, major, minor } => {
                write!(f, "CharDev({perm:o}, {major}:{minor})")
            }
        }
    }
}

impl Entry {
    /// A directory with mode 0755.
    pub fn dir() -> Entry {
        Entry::Dir { perm: 0o755 }
    }

    /// A regular file.
    pub fn file(perm: u32, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            perm,
            data: data.into(),
        }
    }

    fn mode(&self) -> u32 {
        match self {
            Entry::Dir { perm } => mode::DIR | (perm & 0o7777),
            Entry::File { perm, .. } => mode::REG | (perm & 0o7777),
            Entry::Symlink { .. } => mode::LNK | 0o777,
            Entry::CharDev { perm, .. } => mode::CHR | (perm & 0o7777),
        }
    }

    fn data(&self) -> &[u8] {
        match self {
            Entry::File { data, .. } => data,
            Entry::Symlink { target } => target.as_bytes(),
            Entry::Dir { .. } | Entry::CharDev { .. } => &[],
        }
    }

    fn nlink(&self) -> u32 {
        // Regular files must say 1: the kernel treats nlink >= 2 as a hard
        // link candidate and matches it against earlier inodes.
        match self {
            Entry::Dir { .. } => 2,
            _ => 1,
        }
    }

    fn rdev(&self) -> (u32, u32) {
        match self {
            Entry::CharDev { major, minor, .. } => (*major, *minor),
            _ => (0, 0),
        }
    }
}

/// Why a path or an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid archive path {0:?}")]
    InvalidPath(String),
    #[error("{path:?} is not a directory but has entries under it")]
    NotADirectory { path: String },
    #[error("truncated or malformed newc header at byte {offset}")]
    BadHeader { offset: usize },
    #[error("entry {name:?} at byte {offset} runs past the end of the archive")]
    Truncated { name: String, offset: usize },
    #[error("entry {name:?} has an unsupported file type {mode:o}")]
    UnsupportedType { name: String, mode: u32 },
    #[error("archive has no {TRAILER} entry")]
    NoTrailer,
}

/// A set of entries keyed by path (relative, `/`-separated, no `.` or `..`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Normalises `/a//b/` to `a/b`, refusing `.`, `..` and the empty path.
fn normalise(path: &str) -> Result<String, Error> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty()
        || parts
            .iter()
            .any(|p| *p == "." || *p == ".." || p.contains('\0'))
    {
        return Err(Error::InvalidPath(path.to_owned()));
    }
    Ok(parts.join("/"))
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// Adds or replaces `path`, creating missing parent directories (0755).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<(), Error> {
        let path = normalise(path)?;
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            match self.entries.get(parent) {
                None => {
                    self.entries.insert(parent.to_owned(), Entry::dir());
                }
                Some(Entry::Dir { .. }) => {}
                Some(_) => {
                    return Err(Error::NotADirectory {
                        path: parent.to_owned(),
                    })
                }
            }
            end += i + 1;
        }
        if !matches!(entry, Entry::Dir { .. }) {
            let prefix = format!("{path}/");
            if self
                .entries
                .range(prefix.clone()..)
                .next()
                .is_some_and(|(k, _)| k.starts_with(&prefix))
            {
                return Err(Error::NotADirectory { path });
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds a directory (and its parents) unless it exists.
    pub fn mkdir(&mut self, path: &str, perm: u32) -> Result<(), Error> {
        let norm = normalise(path)?;
        match self.entries.get(&norm) {
            Some(Entry::Dir { .. }) => Ok(()),
            _ => self.insert(&norm, Entry::Dir { perm }),
        }
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(normalise(path).ok()?.as_str())
    }

    /// Entries in archive order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Serialises the archive, trailer included.
    pub fn to_bytes(&self) -> Vec<u8> {
        let size: usize = self
            .entries
            .iter()
            .map(|(k, v)| HEADER_LEN + k.len() + v.data().len() + 8)
            .sum();
        let mut out = Vec::with_capacity(size + 256);
        for (ino, (name, entry)) in (1u32..).zip(&self.entries) {
            write_entry(
                &mut out,
                ino,
                name,
                entry.mode(),
                entry.nlink(),
                entry.rdev(),
                entry.data(),
            );
        }
        write_entry(&mut out, 0, TRAILER, 0, 1, (0, 0), &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    name: &str,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    data: &[u8],
) {
    // The archive starts 4-byte aligned, so aligning on `out.len()` matches
    // the spec's "relative to the start of the archive".
    let namesize = u32::try_from(name.len() + 1).expect("name fits u32");
    let filesize = u32::try_from(data.len()).expect("newc files are under 4 GiB");
    let fields = [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// One parsed entry with the header fields a check may care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub entry: Entry,
}

/// Parses a newc archive up to its trailer (which is not returned).
pub fn parse(bytes: &[u8]) -> Result<Vec<Parsed>, Error> {
    let mut out = Vec::new();
    let mut off = 0;
    loop {
        let hdr = bytes
            .get(off..off + HEADER_LEN)
            .ok_or(Error::BadHeader { offset: off })?;
        if &hdr[..6] != MAGIC {
            return Err(Error::BadHeader { offset: off });
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let s = std::str::from_utf8(&hdr[6 + 8 * i..14 + 8 * i])
                .map_err(|_| Error::BadHeader { offset: off })?;
            *v = u32::from_str_radix(s, 16).map_err(|_| Error::BadHeader { offset: off })?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, _, _, rmaj, rmin, namesize, _] = f;
        let name_start = off + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let raw = bytes
            .get(name_start..name_end)
            .ok_or(Error::BadHeader { offset: off })?;
        let name = String::from_utf8_lossy(
            raw.strip_suffix(&[0])
                .ok_or(Error::BadHeader { offset: off })?,
        )
        .into_owned();
        let data_start = name_end.next_multiple_of(4);
        let data_end = data_start + filesize as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or_else(|| Error::Truncated {
                name: name.clone(),
                offset: off,
            })?;
        off = data_end.next_multiple_of(4);
        if name == TRAILER {
            return Ok(out);
        }
        let perm = mode & 0o7777;
        let entry = match mode & mode::TYPE_MASK {
            mode::DIR => Entry::Dir { perm },
            mode::REG => Entry::File {
                perm,
                data: data.to_vec(),
            },
            mode::LNK => Entry::Symlink {
                target: String::from_utf8_lossy(data).into_owned(),
            },
            mode::CHR => Entry::CharDev {
                perm,
                major: rmaj,
                minor: rmin,
            },
            _ => return Err(Error::UnsupportedType { name, mode }),
        };
        out.push(Parsed {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            entry,
        });
        if off >= bytes.len() {
            return Err(Error::NoTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fields: [u32; 13]) -> String {
        let mut s = String::from("070701");
        for f in fields {
            s += &format!("{f:08X}");
        }
        s
    }

    #[test]
    fn single_file_layout() {
        let mut a = Archive::new();
        a.insert("init", Entry::file(0o755, b"hello".to_vec()))
            .unwrap();
        let bytes = a.to_bytes();

        let mut want = Vec::new();
        // ino 1, mode 0100755, uid 0, gid 0, nlink 1, mtime 0, size 5,
        // dev 0:0, rdev 0:0, namesize 5 ("init\0"), check 0.
        want.extend_from_slice(header([1, 0o100755, 0, 0, 1, 0, 5, 0, 0, 0, 0, 5, 0]).as_bytes());
        want.extend_from_slice(b"init\0"); // 110 + 5 = 115 -> pad to 116
        want.extend_from_slice(&[0]);
        want.extend_from_slice(b"hello\0\0\0"); // 5 bytes of data padded to 8
        want.extend_from_slice(header([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 11, 0]).as_bytes());
        want.extend_from_slice(b"TRAILER!!!\0"); // 110 + 11 = 121 -> pad to 124
        want.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn device_node_and_parents() {
        let mut a = Archive::new();
        a.insert(
            "/dev/console",
            Entry::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        let bytes = a.to_bytes();
        // "dev" is created first, as a 0755 directory with nlink 2.
        let dev = header([1, 0o040755, 0, 0, 2, 0, 0, 0, 0, 0, 0, 4, 0]);
        assert_eq!(&bytes[..HEADER_LEN], dev.as_bytes());
        assert_eq!(&bytes[HEADER_LEN..HEADER_LEN + 4], b"dev\0"); // 110 + 4 = 114 -> pad to 116
        assert_eq!(&bytes[114..116], &[0, 0]);
        // Then the console: char device 5:1 in the rdev fields.
        let con = header([2, 0o020600, 0, 0, 1, 0, 0, 0, 0, 5, 1, 12, 0]);
        assert_eq!(&bytes[116..116 + HEADER_LEN], con.as_bytes());
        assert_eq!(&bytes[226..238], b"dev/console\0"); // 238 -> pad to 240
        assert_eq!(&bytes[238..240], &[0, 0]);
        assert_eq!(&bytes[240..246], MAGIC);
        assert_eq!(&bytes[240 + 6 + 8 * 11..240 + 6 + 8 * 12], b"0000000B"); // trailer namesize 11
    }

    #[test]
    fn symlink_and_directories_before_contents() {
        let mut a = Archive::new();
        a.insert(
            "sbin/init",
            Entry::Symlink {
                target: "/init".into(),
            },
        )
        .unwrap();
        a.insert("a-b", Entry::file(0o644, b"x".to_vec())).unwrap();
        a.insert("a/b/c", Entry::file(0o644, b"y".to_vec()))
            .unwrap();
        a.mkdir("tmp", 0o1777).unwrap();
        let parsed = parse(&a.to_bytes()).unwrap();
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["a", "a-b", "a/b", "a/b/c", "sbin", "sbin/init", "tmp"]
        );
        for (i, p) in parsed.iter().enumerate() {
            assert_eq!(p.ino as usize, i + 1);
            assert_eq!((p.uid, p.gid, p.mtime), (0, 0, 0));
        }
        assert_eq!(parsed[5].mode, 0o120777);
        assert_eq!(
            parsed[5].entry,
            Entry::Symlink {
                target: "/init".into()
            }
        );
        assert_eq!(parsed[6].mode, 0o041777);
        // Every parent directory appears before anything under it.
        for (i, p) in parsed.iter().enumerate() {
            if let Some((parent, _)) = p.name.rsplit_once('/') {
                assert!(
                    parsed[..i].iter().any(|q| q.name == parent),
                    "{} before its parent",
                    p.name
                );
            }
        }
    }

    #[test]
    fn round_trip() {
        let mut a = Archive::new();
        a.insert("init", Entry::file(0o755, vec![7u8; 1001]))
            .unwrap();
        a.insert(
            "dev/console",
            Entry::CharDev {
                perm: 0o600,
                major: 5,
                minor: 1,
            },
        )
        .unwrap();
        a.insert(
            "etc/shoal/agent.toml",
            Entry::file(0o644, b"a = 1\n".to_vec()),
        )
        .unwrap();
        a.insert(
            "bin/sh",
            Entry::Symlink {
                target: "../init".into(),
            },
        )
        .unwrap();
        let parsed = parse(&a.to_bytes()).unwrap();
        let mut b = Archive::new();
        for p in parsed {
            b.insert(&p.name, p.entry).unwrap();
        }
        assert_eq!(a, b);
    }

    #[test]
    fn refuses_bad_paths_and_file_parents() {
        let mut a = Archive::new();
        for bad in ["", "/", "a/../b", "./x"] {
            assert!(
                matches!(a.insert(bad, Entry::dir()), Err(Error::InvalidPath(_))),
                "{bad:?}"
            );
        }
        a.insert("f", Entry::file(0o644, Vec::new())).unwrap();
        assert!(matches!(
            a.insert("f/g", Entry::dir()),
            Err(Error::NotADirectory { .. })
        ));
        a.insert("d/x", Entry::file(0o644, Vec::new())).unwrap();
        assert!(matches!(
            a.insert("d", Entry::file(0o644, Vec::new())),
            Err(Error::NotADirectory { .. })
        ));
    }

    #[test]
    fn parse_rejects_garbage_and_missing_trailer() {
        assert!(matches!(
            parse(b"070707garbage"),
            Err(Error::BadHeader { .. })
        ));
        let mut a = Archive::new();
        a.insert("x", Entry::file(0o644, b"1".to_vec())).unwrap();
        let bytes = a.to_bytes();
        let cut = bytes.len() - 124; // drop the trailer
        assert!(matches!(parse(&bytes[..cut]), Err(Error::NoTrailer)));
    }
}
