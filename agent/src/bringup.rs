//! PID 1's early bring-up as a table of steps: the pseudo filesystems the
//! rest of the agent reads (`/proc`, `/sys`, `/dev`, ...). Each step prints
//! as one console line. A filesystem that is already mounted (the kernel
//! mounts devtmpfs itself with `CONFIG_DEVTMPFS_MOUNT`) counts as done.

use std::fmt;
use std::io;

use nix::mount::MsFlags;

/// One bring-up step.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Mkdir {
        path: &'static str,
        mode: u32,
    },
    Mount {
        fstype: &'static str,
        target: &'static str,
        flags: MsFlags,
        data: Option<&'static str>,
        required: bool,
    },
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Mount `/proc` before anything reads `/proc/cmdline`; `/dev` before `/dev/pts`.
pub const EARLY: &[Step] = &[
    Step::Mkdir {
        path: "/proc",
        mode: 0o555,
    },
    Step::Mount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    Step::Mkdir {
        path: "/sys",
        mode: 0o555,
    },
    Step::Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
        required: true,
    },
    Step::Mkdir {
        path: "/dev",
        mode: 0o755,
    },
    Step::Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
        required: true,
    },
    Step::Mkdir {
        path: "/dev/pts",
        mode: 0o755,
    },
    Step::Mount {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
        required: false,
    },
    Step::Mkdir {
        path: "/run",
        mode: 0o755,
    },
    Step::Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
        required: false,
    },
    Step::Mkdir {
        path: "/tmp",
        mode: 0o1777,
    },
    Step::Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
        required: false,
    },
];

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Mkdir { path, mode } => write!(f, "mkdir {path} ({mode:o})"),
            Step::Mount {
                fstype,
                target,
                data,
                ..
            } => {
                write!(f, "mount {fstype} on {target}")?;
                if let Some(d) = data {
                    write!(f, " ({d})")?;
                }
                Ok(())
            }
        }
    }
}

/// What happened to one step.
#[derive(Debug)]
pub enum Outcome {
    Done,
    AlreadyThere,
    Failed(io::Error),
}

impl Step {
    pub fn required(&self) -> bool {
        matches!(self, Step::Mount { required: true, .. })
    }

    pub fn run(&self) -> Outcome {
        match *self {
            Step::Mkdir { path, mode } => {
                use std::os::unix::fs::DirBuilderExt;
                match std::fs::DirBuilder::new().mode(mode).create(path) {
                    Ok(()) => Outcome::Done,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Outcome::AlreadyThere,
                    Err(e) => Outcome::Failed(e),
                }
            }
            Step::Mount {
                fstype,
                target,
                flags,
                data,
                ..
            } => match crate::sys::mount(fstype, target, fstype, flags, data) {
                Ok(()) => Outcome::Done,
                Err(e) if e.raw_os_error() == Some(16) => Outcome::AlreadyThere, // EBUSY
                Err(e) => Outcome::Failed(e),
            },
        }
    }
}

/// Runs every step and returns the outcomes, for logging once the logger is up.
pub fn run(steps: &[Step]) -> Vec<(Step, Outcome)> {
    steps.iter().map(|s| (*s, s.run())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_comes_first_and_every_mount_has_its_directory() {
        assert!(matches!(
            EARLY[1],
            Step::Mount {
                target: "/proc",
                ..
            }
        ));
        let mut made = Vec::new();
        for step in EARLY {
            match step {
                Step::Mkdir { path, .. } => made.push(*path),
                Step::Mount { target, .. } => {
                    assert!(made.contains(target), "{target} mounted before mkdir")
                }
            }
        }
    }

    #[test]
    fn steps_print_as_console_lines() {
        let lines: Vec<String> = EARLY.iter().map(|s| s.to_string()).collect();
        assert!(
            lines.contains(&"mount devtmpfs on /dev (mode=0755)".to_string()),
            "{lines:?}"
        );
        assert!(
            lines.contains(&"mkdir /tmp (1777)".to_string()),
            "{lines:?}"
        );
    }
}
