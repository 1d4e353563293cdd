//! [`DiskWriter`]: the one way deploy data reaches a disk. It opens the
//! target with `O_DIRECT` (so a multi-gigabyte image does not churn the page
//! cache of a machine that may have little memory), copies every write
//! through its own page-aligned buffer in pieces of at most 1 MiB (the size
//! the issue measured virtio-blk to like), zeroes holes with `BLKZEROOUT` or
//! `FALLOC_FL_ZERO_RANGE`, flushes, and asks the kernel to re-read the
//! partition table.
//!
//! Offsets must be multiples of the logical sector size. A length need not
//! be: a short final piece (the volume ends mid-sector, or a 512-byte-sector
//! image ends inside a 4 KiB sector) is written up to its last whole sector
//! directly and the remaining bytes with a buffered `pwrite` (O_DIRECT
//! switched off for that one call), so no byte outside the piece changes.
//! Nothing is ever written beyond the device's size.
//!
//! Where the filesystem refuses `O_DIRECT` (some tmpfs, 9p), a regular file
//! is written buffered instead, with a warning; `flush` makes it durable.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::{debug, warn};
use nix::libc;

use super::sys::{self, AlignedBuf};

/// The largest single write, and the size of the aligned buffer.
pub const PIECE: usize = 1 << 20;
/// The buffer's alignment (or the sector size, if larger).
const ALIGN: usize = 4096;

/// Why a disk could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot open disk {disk}")]
    Open { disk: PathBuf, source: io::Error },
    #[error("disk {disk} is neither a regular file nor a block device")]
    NotADisk { disk: PathBuf },
    #[error("cannot read the size of disk {disk}")]
    Size { disk: PathBuf, source: io::Error },
    #[error("disk {disk} reports an unusable logical sector size of {sector} bytes")]
    Sector { disk: PathBuf, sector: u32 },
    #[error("offset {offset} on disk {disk} is not a multiple of its {sector}-byte sectors")]
    Unaligned {
        disk: PathBuf,
        offset: u64,
        sector: u32,
    },
    #[error("{len} bytes at offset {offset} go beyond the end of disk {disk} ({size} bytes)")]
    BeyondEnd {
        disk: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("cannot write disk {disk} at offset {offset}")]
    Write {
        disk: PathBuf,
        offset: u64,
        source: io::Error,
    },
    #[error("cannot zero {len} bytes at offset {offset} on disk {disk}")]
    Zero {
        disk: PathBuf,
        offset: u64,
        len: u64,
        source: io::Error,
    },
    #[error("cannot flush disk {disk}")]
    Flush { disk: PathBuf, source: io::Error },
}

/// An open deploy target: a block device or a regular file.
#[derive(Debug)]
pub struct DiskWriter {
    file: File,
    path: PathBuf,
    block_device: bool,
    size: u64,
    sector: u32,
    /// Whether `O_DIRECT` is on (off after a fallback).
    direct: bool,
    /// Whether `BLKZEROOUT` / `FALLOC_FL_ZERO_RANGE` is still worth trying.
    fast_zero: bool,
    buf: AlignedBuf,
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

impl DiskWriter {
    /// Opens `path` for writing with `O_DIRECT`, falling back to buffered
    /// writes (with a warning) on a file whose filesystem refuses it.
    pub fn open(path: &Path) -> Result<Self, WriteError> {
        Self::open_with(path, true)
    }

    /// As [`open`](Self::open), or buffered from the start if `!direct`.
    pub fn open_with(path: &Path, direct: bool) -> Result<Self, WriteError> {
        let disk = || path.to_owned();
        let meta = std::fs::metadata(path).map_err(|source| WriteError::Open {
            disk: disk(),
            source,
        })?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(WriteError::NotADisk { disk: disk() });
        }
        let open = |flags| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match (direct, open(if direct { sys::O_DIRECT } else { 0 })) {
            (_, Ok(f)) => (Ok(f), direct),
            (true, Err(e)) if !block_device && errno(&e) == libc::EINVAL => {
                warn!(
                    "disk {}: O_DIRECT refused by its filesystem; writing buffered",
                    path.display()
                );
                (open(0), false)
            }
            (_, Err(e)) => (Err(e), false),
        };
        let file = file.map_err(|source| WriteError::Open {
            disk: disk(),
            source,
        })?;
        let size_err = |source| WriteError::Size {
            disk: disk(),
            source,
        };
        let (size, sector) = if block_device {
            (
                sys::block_size_bytes(file.as_fd()).map_err(size_err)?,
                sys::logical_sector_size(file.as_fd()).map_err(size_err)?,
            )
        } else {
            (meta.len(), 512)
        };
        if !sector.is_power_of_two() || sector < 512 || sector as usize > PIECE {
            return Err(WriteError::Sector {
                disk: disk(),
                sector,
            });
        }
        debug!(
            "disk {}: {size} bytes, {sector}-byte sectors, {}",
            path.display(),
            if direct { "O_DIRECT" } else { "buffered" }
        );
        Ok(Self {
            file,
            path: disk(),
            block_device,
            size,
            sector,
            direct,
            fast_zero: true,
            buf: AlignedBuf::new(PIECE, ALIGN.max(sector as usize)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Logical sector size in bytes.
    pub fn sector_size(&self) -> u32 {
        self.sector
    }

    /// Whether writes bypass the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Writes `data` at `offset` (a multiple of the sector size; see the
    /// module docs for lengths that are not).
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.check(offset, data.len() as u64)?;
        for (i, piece) in data.chunks(PIECE).enumerate() {
            self.buf[..piece.len()].copy_from_slice(piece);
            self.write_buf(offset + (i * PIECE) as u64, piece.len())?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros: `BLKZEROOUT` on a block
    /// device, `FALLOC_FL_ZERO_RANGE` on a file, or writes of zeros where
    /// those are unsupported.
    pub fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        self.check(offset, len)?;
        let sector = u64::from(self.sector);
        // BLKZEROOUT takes whole sectors; a short tail is written.
        let fast_len = if self.block_device {
            len - len % sector
        } else {
            len
        };
        let mut done = 0;
        if self.fast_zero && fast_len > 0 {
            let fd = self.file.as_fd();
            let r = if self.block_device {
                sys::zero_out(fd, offset, fast_len)
            } else {
                sys::zero_range(fd, offset, fast_len)
            };
            match r {
                Ok(()) => done = fast_len,
                Err(e)
                    if [libc::ENOTTY, libc::EOPNOTSUPP, libc::ENOSYS, libc::EINVAL]
                        .contains(&errno(&e)) =>
                {
                    debug!(
                        "disk {}: no fast zeroing ({e}); writing zeros",
                        self.path.display()
                    );
                    self.fast_zero = false;
                }
                Err(source) => {
                    return Err(WriteError::Zero {
                        disk: self.path.clone(),
                        offset,
                        len,
                        source,
                    })
                }
            }
        }
        let rest = len - done;
        if rest > 0 {
            let n = rest.min(PIECE as u64) as usize;
            self.buf[..n].fill(0);
            let mut at = offset + done;
            while at < offset + len {
                let n = (offset + len - at).min(PIECE as u64) as usize;
                self.write_buf(at, n)?;
                at += n as u64;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable (`fsync`).
    pub fn flush(&mut self) -> Result<(), WriteError> {
        self.file.sync_all().map_err(|source| WriteError::Flush {
            disk: self.path.clone(),
            source,
        })
    }

    /// Asks the kernel to re-read the partition table (`BLKRRPART`); call
    /// after [`flush`](Self::flush). A failure is logged, not returned: the
    /// image is on the disk either way. `true` if the kernel re-read it.
    pub fn reread_partitions(&self) -> bool {
        if !self.block_device {
            return false;
        }
        match sys::reread_partitions(self.file.as_fd()) {
            Ok(()) => true,
            Err(e) if [libc::ENOTTY, libc::EINVAL].contains(&errno(&e)) => {
                debug!(
                    "disk {}: no partition table re-read ({e})",
                    self.path.display()
                );
                false
            }
            Err(e) => {
                warn!(
                    "disk {}: re-reading the partition table failed: {e}",
                    self.path.display()
                );
                false
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), WriteError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(WriteError::BeyondEnd {
                disk: self.path.clone(),
                offset,
                len,
                size: self.size,
            });
        }
        if !offset.is_multiple_of(u64::from(self.sector)) {
            return Err(WriteError::Unaligned {
                disk: self.path.clone(),
                offset,
                sector: self.sector,
            });
        }
        Ok(())
    }

    /// Writes `self.buf[..n]` at the sector-aligned `offset`: whole sectors
    /// directly, a short tail buffered.
    fn write_buf(&mut self, offset: u64, n: usize) -> Result<(), WriteError> {
        let whole = n - n % self.sector as usize;
        if whole > 0 {
            self.pwrite(offset, 0, whole)?;
        }
        if whole < n {
            let at = offset + whole as u64;
            if self.direct {
                let fd = self.file.as_fd();
                let r = sys::set_direct(fd, false)
                    .and_then(|()| self.file.write_all_at(&self.buf[whole..n], at))
                    .and_then(|()| sys::set_direct(fd, true));
                r.map_err(|source| self.write_err(at, source))?;
            } else {
                self.pwrite(at, whole, n)?;
            }
        }
        Ok(())
    }

    /// `pwrite`s `self.buf[from..to]` at `offset`. A regular file whose
    /// filesystem accepted `O_DIRECT` at open but refuses the I/O switches
    /// to buffered writes once, with a warning.
    fn pwrite(&mut self, offset: u64, from: usize, to: usize) -> Result<(), WriteError> {
        match self.file.write_all_at(&self.buf[from..to], offset) {
            Err(e) if self.direct && !self.block_device && errno(&e) == libc::EINVAL => {
                warn!(
                    "disk {}: O_DIRECT write refused ({e}); writing buffered",
                    self.path.display()
                );
                sys::set_direct(self.file.as_fd(), false)
                    .map_err(|source| self.write_err(offset, source))?;
                self.direct = false;
                self.file
                    .write_all_at(&self.buf[from..to], offset)
                    .map_err(|source| self.write_err(offset, source))
            }
            r => r.map_err(|source| self.write_err(offset, source)),
        }
    }

    fn write_err(&self, offset: u64, source: io::Error) -> WriteError {
        WriteError::Write {
            disk: self.path.clone(),
            offset,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Bytes that differ from piece to piece and from zero.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8 | 1
            })
            .collect()
    }

    fn write(w: &mut DiskWriter, model: &mut [u8], offset: u64, data: &[u8]) {
        w.write_at(offset, data)
            .unwrap_or_else(|e| panic!("write {} at {offset}: {e}", data.len()));
        model[offset as usize..][..data.len()].copy_from_slice(data);
    }

    fn zero(w: &mut DiskWriter, model: &mut [u8], offset: u64, len: u64) {
        w.zero_range(offset, len)
            .unwrap_or_else(|e| panic!("zero {len} at {offset}: {e}"));
        model[offset as usize..][..len as usize].fill(0);
    }

    /// Aligned and short writes, zeroing, the volume's end and refusals,
    /// mirrored in `model` (the disk's expected bytes).
    fn exercise(w: &mut DiskWriter, model: &mut [u8]) {
        let (n, s) = (w.size(), u64::from(w.sector_size()));
        assert_eq!(model.len() as u64, n);
        // Several pieces in one call, then a short length mid-disk: the
        // bytes after it keep what was there.
        write(w, model, 0, &pattern(PIECE * 2 + s as usize, 1));
        write(w, model, 3 * s, &pattern(5000, 2));
        // Zero a region spanning pieces, then a short one.
        zero(w, model, PIECE as u64 - s, PIECE as u64 + 2 * s);
        zero(w, model, s, 100);
        // The last bytes of the volume, ending exactly at its end (mid-sector
        // for a file whose length is not a multiple of the sector).
        let last = (n / s - 1) * s;
        let tail = pattern((n - last) as usize, 3);
        write(w, model, last, &tail);
        zero(w, model, last, 10);
        // Refusals, leaving the disk as it was.
        let e = w.write_at(last, &vec![7; 2 * s as usize]).unwrap_err();
        assert!(matches!(e, WriteError::BeyondEnd { .. }), "{e}");
        let e = w.write_at(n, &[7]).unwrap_err();
        assert!(matches!(e, WriteError::BeyondEnd { .. }), "{e}");
        assert!(matches!(
            w.zero_range(0, n + 1),
            Err(WriteError::BeyondEnd { .. })
        ));
        assert!(matches!(
            w.zero_range(u64::MAX - s + 1, s),
            Err(WriteError::BeyondEnd { .. })
        ));
        let e = w.write_at(s / 2, &[7; 512]).unwrap_err();
        assert!(matches!(e, WriteError::Unaligned { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains(&w.path().display().to_string()) && e.contains("offset"),
            "{e}"
        );
        w.flush().unwrap();
    }

    fn temp_disk(len: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let model = pattern(len as usize, 9);
        std::fs::write(&path, &model).unwrap();
        (dir, path, model)
    }

    #[test]
    fn writes_a_file_directly() {
        let (_dir, path, mut model) = temp_disk(4 * PIECE as u64 + 1000);
        let mut w = DiskWriter::open(&path).unwrap();
        assert_eq!((w.size(), w.sector_size()), (4 * PIECE as u64 + 1000, 512));
        assert!(!w.is_block_device());
        eprintln!("O_DIRECT on the temp dir's filesystem: {}", w.is_direct());
        exercise(&mut w, &mut model);
        assert!(
            !w.reread_partitions(),
            "a file has no partition table to re-read"
        );
        assert!(
            std::fs::read(&path).unwrap() == model,
            "file differs from the model"
        );
    }

    #[test]
    fn writes_a_file_buffered() {
        let (_dir, path, mut model) = temp_disk(3 * PIECE as u64 + 512 + 77);
        let mut w = DiskWriter::open_with(&path, false).unwrap();
        assert!(!w.is_direct());
        exercise(&mut w, &mut model);
        assert!(
            std::fs::read(&path).unwrap() == model,
            "file differs from the model"
        );
    }

    #[test]
    fn zeroing_falls_back_to_writes() {
        let (_dir, path, mut model) = temp_disk(2 * PIECE as u64 + 512);
        let mut w = DiskWriter::open(&path).unwrap();
        w.fast_zero = false;
        zero(&mut w, &mut model, 512, PIECE as u64 + 1000);
        w.flush().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == model,
            "file differs from the model"
        );
    }

    #[test]
    fn refuses_what_is_not_a_disk() {
        let dir = tempfile::tempdir().unwrap();
        let e = DiskWriter::open(dir.path()).unwrap_err();
        assert!(matches!(e, WriteError::NotADisk { .. }), "{e}");
        let e = DiskWriter::open(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().starts_with("cannot open disk "), "{e}");
    }

    /// A loop device over a file, detached on drop (even when the test panics).
    struct Loop(PathBuf);

    impl Loop {
        fn attach(file: &Path, sector: u32) -> Self {
            // /proc/self belongs to the process's effective user.
            let euid =
                std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
            assert!(
                euid == 0,
                "the loop-device test needs root (losetup); run it as root"
            );
            let out = Command::new("losetup")
                .args(["--find", "--show", "--sector-size", &sector.to_string()])
                .arg(file)
                .output()
                .unwrap_or_else(|e| panic!("the loop-device test needs losetup (util-linux): {e}"));
            assert!(
                out.status.success(),
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            Self(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn writes_a_loop_device_directly() {
        let (_dir, path, mut model) = temp_disk(8 * PIECE as u64);
        let dev = Loop::attach(&path, 4096);
        let mut w = DiskWriter::open(&dev.0).unwrap();
        assert!(w.is_block_device());
        assert!(w.is_direct(), "block devices take O_DIRECT");
        assert_eq!((w.size(), w.sector_size()), (8 * PIECE as u64, 4096));
        exercise(&mut w, &mut model);
        assert!(w.fast_zero, "BLKZEROOUT worked, no fallback to writes");
        // The host kernel does not scan loop partitions: just no failure.
        let reread = w.reread_partitions();
        eprintln!("BLKRRPART on {}: {reread}", dev.0.display());
        drop(w);
        assert!(
            std::fs::read(&dev.0).unwrap() == model,
            "loop device differs from the model"
        );
        assert!(
            std::fs::read(&path).unwrap() == model,
            "backing file differs from the model"
        );
    }
}
