//! The agent's system calls, in one place: module loading, mounts, power,
//! signals, the boot clock. Everything goes through `nix`'s safe wrappers,
//! so this module needs no `unsafe` of its own (raw ioctls for networking
//! live in `net/sys.rs`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use nix::errno::Errno;
use nix::kmod::{finit_module as nix_finit, ModuleInitFlags};
use nix::mount::{mount as nix_mount, MsFlags};
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

fn io(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Loads a kernel module from an open `.ko` file with no parameters.
pub fn finit_module(file: &File) -> io::Result<()> {
    nix_finit(file.as_fd(), &CString::default(), ModuleInitFlags::empty()).map_err(io)
}

pub fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    nix_mount(Some(source), target, Some(fstype), flags, data).map_err(io)
}

/// Time since boot (counts suspend), for log lines that line up with the kernel's.
pub fn uptime() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

pub fn sync() {
    nix::unistd::sync();
}

/// Powers the machine off or reboots it. Returns only on failure.
pub fn power(poweroff: bool) -> io::Error {
    let mode = if poweroff {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    };
    match reboot(mode) {
        Ok(never) => match never {},
        Err(e) => io(e),
    }
}

/// Makes Ctrl-Alt-Del send SIGINT to PID 1 instead of rebooting at once.
pub fn cad_to_signal() -> io::Result<()> {
    set_cad_enabled(false).map_err(io)
}

/// The signals PID 1 handles on its signal thread.
pub fn init_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGPWR,
        Signal::SIGCHLD,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

/// Blocks `set` in this thread (and in the threads it starts afterwards).
pub fn block(set: &SigSet) -> io::Result<()> {
    set.thread_block().map_err(io)
}

pub fn wait_signal(set: &SigSet) -> io::Result<Signal> {
    set.wait().map_err(io)
}

/// Reaps every exited child; returns what was reaped, for the log.
pub fn reap_children() -> Vec<(Pid, String)> {
    let mut out = Vec::new();
    for _ in 0..1024 {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    out.push((pid, format!("{status:?}")));
                }
            }
        }
    }
    out
}

/// Whether the kernel's random number generator is seeded, so that
/// `getrandom(2)` will not block (asked without blocking).
pub fn random_ready() -> bool {
    let mut b = [0u8; 1];
    !matches!(
        rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::NONBLOCK),
        Err(rustix::io::Errno::AGAIN)
    )
}
