//! The raw system calls the disk code needs, in one place: the block-device
//! ioctls (`BLKGETSIZE64`, `BLKSSZGET`, `BLKZEROOUT`, `BLKRRPART`),
//! `fallocate(FALLOC_FL_ZERO_RANGE)`, switching `O_DIRECT` on an open file,
//! and the page-aligned buffer that `O_DIRECT` transfers need.
//!
//! This is the only module of the disk code allowed `unsafe`. The ioctls are
//! declared with `nix`'s `ioctl_*!` macros (request numbers from
//! `<linux/fs.h>`); each call passes a borrowed, open descriptor and, where
//! the kernel reads or fills a value, a pointer to a local of exactly the
//! type the kernel expects.

#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, OFlag};
use nix::libc;

/// `O_DIRECT` for `OpenOptionsExt::custom_flags`.
pub const O_DIRECT: i32 = libc::O_DIRECT;

mod raw {
    use nix::libc::c_int;
    use nix::{
        ioctl_none, ioctl_read_bad, ioctl_write_ptr_bad, request_code_none, request_code_read,
    };

    // `_IOR(0x12, 114, size_t)`: the request number encodes `size_t`, but the
    // kernel always writes a `u64`.
    ioctl_read_bad!(
        blkgetsize64,
        request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
        u64
    );
    // `_IO(0x12, 104)`, yet it fills an `int`.
    ioctl_read_bad!(blksszget, request_code_none!(0x12, 104), c_int);
    // `_IO(0x12, 127)`, reading `uint64_t range[2]` = {start, length}.
    ioctl_write_ptr_bad!(blkzeroout, request_code_none!(0x12, 127), [u64; 2]);
    // `_IO(0x12, 95)`, no argument.
    ioctl_none!(blkrrpart, 0x12, 95);
}

fn io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// The size in bytes of the block device open on `fd` (`BLKGETSIZE64`).
pub fn block_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `fd` is an open descriptor for the duration of the call and
    // `size` is a live, writable `u64`, the type BLKGETSIZE64 stores.
    unsafe { raw::blkgetsize64(fd.as_raw_fd(), &mut size) }.map_err(io)?;
    Ok(size)
}

/// The logical sector size of the block device open on `fd` (`BLKSSZGET`).
pub fn logical_sector_size(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut sector: libc::c_int = 0;
    // SAFETY: `fd` is open for the call and `sector` is a live, writable
    // `int`, the type BLKSSZGET stores.
    unsafe { raw::blksszget(fd.as_raw_fd(), &mut sector) }.map_err(io)?;
    u32::try_from(sector).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Makes `len` bytes at `offset` of the block device read as zeros
/// (`BLKZEROOUT`: write-zeroes, or discard where that zeroes, or the kernel's
/// own writes). Both must be multiples of 512.
pub fn zero_out(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: `fd` is open for the call and `range` is a live `[u64; 2]`
    // that the kernel only reads.
    unsafe { raw::blkzeroout(fd.as_raw_fd(), &range) }.map_err(io)?;
    Ok(())
}

/// Asks the kernel to re-read the partition table (`BLKRRPART`).
pub fn reread_partitions(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `fd` is open for the call; BLKRRPART takes no argument.
    unsafe { raw::blkrrpart(fd.as_raw_fd()) }.map_err(io)?;
    Ok(())
}

/// Zeroes a range of a regular file in place (`FALLOC_FL_ZERO_RANGE`).
pub fn zero_range(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    fallocate(fd, FallocateFlags::FALLOC_FL_ZERO_RANGE, off, len).map_err(io)
}

/// Turns `O_DIRECT` on or off for the open file description behind `fd`.
pub fn set_direct(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL).map_err(io)?);
    let flags = if on {
        flags | OFlag::O_DIRECT
    } else {
        flags - OFlag::O_DIRECT
    };
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(io)?;
    Ok(())
}

/// A zero-filled heap buffer whose start is aligned to `align` bytes, as
/// `O_DIRECT` transfers require. Reads and writes go through `Deref` to an
/// ordinary byte slice.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    /// `len` zero bytes aligned to `align` (a power of two). Panics on a bad
    /// layout or `len == 0`; aborts (as `Vec` does) when out of memory.
    pub fn new(len: usize, align: usize) -> Self {
        assert!(len > 0, "an aligned buffer needs a length");
        let layout = Layout::from_size_align(len, align).expect("aligned buffer layout");
        // SAFETY: `layout` has a non-zero size (checked above).
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, layout }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed at
        // allocation) bytes that live until `drop`, and `&self` forbids
        // concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with this same `layout` and
        // is freed exactly once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the buffer owns its allocation outright (like a `Box<[u8]>`); no
// other handle to it exists, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AlignedBuf({} bytes, {}-aligned)",
            self.layout.size(),
            self.layout.align()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        let mut b = AlignedBuf::new(8192, 4096);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[8191] = 7;
        assert_eq!(b.len(), 8192);
        assert_eq!(b[8191], 7);
    }
}
