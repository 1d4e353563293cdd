//! QEMU guests for tests and the lab: a `VmBuilder`, and a serial `Console`
//! with `expect(pattern, timeout)`.
//!
//! Always `-accel tcg`: `/dev/kvm` on our machines exists but hangs. The
//! console is QEMU's stdout (`-serial stdio`), read on a thread into a
//! transcript; the human monitor listens on a Unix socket for `set_link`,
//! `sendkey` and friends. Dropping a `Vm` kills QEMU.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A virtual disk backed by a file.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub serial: Option<String>,
}

/// How a NIC is connected.
#[derive(Debug, Clone)]
pub enum NetBackend {
    /// QEMU's user-mode network (slirp): DHCP gives 10.0.2.15.
    User,
    /// A tap device (created by the caller, e.g. on a bridge in a namespace).
    Tap(String),
    /// A hub with nothing else on it: link up, nobody answers.
    Silent,
}

#[derive(Debug, Clone)]
pub struct NicSpec {
    pub mac: String,
    pub model: String,
    pub backend: NetBackend,
}

#[derive(Debug, Clone)]
pub struct VmBuilder {
    kernel: PathBuf,
    initrd: PathBuf,
    append: Vec<String>,
    memory_mib: u32,
    cpus: u32,
    disks: Vec<DiskSpec>,
    nics: Vec<NicSpec>,
    echo: bool,
    paused: bool,
    netns: Option<String>,
    name: String,
    smbios: Option<(String, String)>,
}

impl VmBuilder {
    /// A guest booting `kernel` (a `vmlinux` boots faster under TCG through
    /// its PVH note; a bzImage works too) with `initrd`.
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>) -> Self {
        VmBuilder {
            kernel: kernel.into(),
            initrd: initrd.into(),
            append: vec!["console=ttyS0".into(), "panic=-1".into(), "quiet".into()],
            memory_mib: 512,
            cpus: 1,
            disks: Vec::new(),
            nics: Vec::new(),
            echo: std::env::var_os("SHOAL_VM_ECHO").is_some(),
            paused: false,
            netns: None,
            name: "vm".into(),
            smbios: None,
        }
    }

    /// Adds kernel command-line words.
    pub fn append(mut self, words: &str) -> Self {
        self.append
            .extend(words.split_whitespace().map(str::to_owned));
        self
    }

    /// Drops `quiet`, so the kernel's own messages show.
    pub fn verbose_kernel(mut self) -> Self {
        self.append.retain(|w| w != "quiet");
        self
    }

    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn disk(mut self, path: impl Into<PathBuf>, serial: Option<&str>) -> Self {
        self.disks.push(DiskSpec {
            path: path.into(),
            serial: serial.map(str::to_owned),
        });
        self
    }

    pub fn nic(mut self, mac: &str, backend: NetBackend) -> Self {
        self.nics.push(NicSpec {
            mac: mac.into(),
            model: "virtio-net-pci".into(),
            backend,
        });
        self
    }

    pub fn nic_model(mut self, mac: &str, model: &str, backend: NetBackend) -> Self {
        self.nics.push(NicSpec {
            mac: mac.into(),
            model: model.into(),
            backend,
        });
        self
    }

    /// Copies the console to stderr as it arrives (the lab; `SHOAL_VM_ECHO=1` in tests).
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }

    /// Starts with the CPU stopped (`-S`), so the monitor can change links
    /// first; `Vm::resume` starts it.
    pub fn paused(mut self) -> Self {
        self.paused = true;
        self
    }

    /// Runs QEMU inside a network namespace (for tap devices there).
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.into());
        self
    }

    /// SMBIOS system UUID and serial number (the device identity).
    pub fn smbios(mut self, uuid: &str, serial: &str) -> Self {
        self.smbios = Some((uuid.into(), serial.into()));
        self
    }

    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// The QEMU command line this builder makes (without the monitor socket).
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-accel".into(),
            "tcg".into(),
            // `max` has RDRAND, which seeds the guest kernel's RNG at once;
            // the default qemu64 CPU leaves getrandom(2) blocking for minutes.
            "-cpu".into(),
            "max".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-no-reboot".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.append.join(" "),
        ];
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "file={},format=raw,if=none,id=d{i},cache=unsafe",
                d.path.display()
            ));
            a.push("-device".into());
            let serial = d
                .serial
                .as_ref()
                .map(|s| format!(",serial={s}"))
                .unwrap_or_default();
            a.push(format!("virtio-blk-pci,drive=d{i}{serial}"));
        }
        for (i, n) in self.nics.iter().enumerate() {
            a.push("-netdev".into());
            a.push(match &n.backend {
                NetBackend::User => format!("user,id=n{i}"),
                NetBackend::Tap(ifname) => {
                    format!("tap,id=n{i},ifname={ifname},script=no,downscript=no")
                }
                NetBackend::Silent => format!("hubport,id=n{i},hubid={}", 100 + i),
            });
            a.push("-device".into());
            // romfile= skips the PXE option ROM: we boot the kernel directly.
            a.push(format!("{},netdev=n{i},mac={},romfile=", n.model, n.mac));
        }
        if let Some((uuid, serial)) = &self.smbios {
            a.extend([
                "-uuid".into(),
                uuid.clone(),
                "-smbios".into(),
                format!("type=1,serial={serial}"),
            ]);
        }
        if self.paused {
            a.push("-S".into());
        }
        a
    }

    pub fn start(self) -> anyhow::Result<Vm> {
        let qemu = find_qemu()?;
        for p in [&self.kernel, &self.initrd] {
            anyhow::ensure!(
                p.exists(),
                "{} does not exist (run `cargo xtask kernel` / `cargo xtask initramfs`)",
                p.display()
            );
        }
        let dir = tempfile::Builder::new().prefix("shoal-vm-").tempdir()?;
        let monitor = dir.path().join("monitor.sock");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&qemu);
                c
            }
            None => Command::new(&qemu),
        };
        cmd.args(self.args())
            .arg("-monitor")
            .arg(format!("unix:{},server=on,wait=off", monitor.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {qemu}"))?;
        let started = Instant::now();
        let (tx, rx) = mpsc::channel();
        let mut stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let name = self.name.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name} qemu] {line}");
            }
        });
        let console = Console {
            rx,
            text: String::new(),
            pos: 0,
            echo: self.echo,
            closed: false,
            name: self.name.clone(),
            pending: Vec::new(),
            line_start: true,
        };
        let mut vm = Vm {
            child,
            console,
            monitor,
            monitor_conn: std::sync::Mutex::new(None),
            started,
            _dir: dir,
        };
        vm.wait_for_monitor()?;
        Ok(vm)
    }
}

fn find_qemu() -> anyhow::Result<String> {
    let name = "qemu-system-x86_64";
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|d| d.join(name).is_file()) {
        Ok(name.into())
    } else {
        bail!("{name} is not installed: `apt-get install -y qemu-system-x86` (.ci/run does this)")
    }
}

/// Reads from the monitor until its `(qemu) ` prompt.
fn read_to_prompt(conn: &mut UnixStream, timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if out.ends_with(b"(qemu) ") {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        if Instant::now() >= deadline {
            bail!(
                "no monitor prompt within {timeout:?}; got {:?}",
                String::from_utf8_lossy(&out)
            );
        }
        match conn.read(&mut buf) {
            Ok(0) => bail!("the monitor closed the connection"),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A running guest. Dropping it kills QEMU.
#[derive(Debug)]
pub struct Vm {
    child: Child,
    console: Console,
    monitor: PathBuf,
    /// One connection for the guest's life: QEMU's monitor serves one client
    /// at a time, and a command sent on a connection it has not yet
    /// accepted can be lost.
    monitor_conn: std::sync::Mutex<Option<UnixStream>>,
    started: Instant,
    _dir: tempfile::TempDir,
}

impl Vm {
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn wait_for_monitor(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut conn) = UnixStream::connect(&self.monitor) {
                conn.set_read_timeout(Some(Duration::from_millis(100)))?;
                read_to_prompt(&mut conn, Duration::from_secs(10))?;
                *self.monitor_conn.lock().unwrap() = Some(conn);
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                self.console.drain(Duration::from_millis(200));
                bail!(
                    "QEMU exited at start ({status}); console:\n{}",
                    self.console.tail(2000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "QEMU's monitor socket {} did not appear within 10 s",
            self.monitor.display()
        )
    }

    /// Sends one human-monitor command (`set_link n0 off`, `cont`, ...) and
    /// returns what the monitor answered before its next prompt.
    pub fn monitor(&self, command: &str) -> anyhow::Result<String> {
        let mut guard = self.monitor_conn.lock().unwrap();
        let conn = guard.as_mut().context("QEMU's monitor is not connected")?;
        writeln!(conn, "{command}")?;
        read_to_prompt(conn, Duration::from_secs(10))
            .with_context(|| format!("monitor command {command:?}"))
    }

    /// Starts a guest made with `paused()`.
    pub fn resume(&self) -> anyhow::Result<()> {
        self.monitor("cont").map(drop)
    }

    /// Waits for QEMU to exit (the guest powered off or rebooted, with
    /// `-no-reboot`), reading the console meanwhile.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.console.drain(Duration::from_millis(100));
            if let Some(status) = self.child.try_wait()? {
                self.console.drain(Duration::from_millis(100));
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "QEMU still running after {timeout:?}; console tail:\n{}",
                    self.console.tail(3000)
                );
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The guest's serial console: everything it printed, and a read position.
#[derive(Debug)]
pub struct Console {
    rx: Receiver<Vec<u8>>,
    text: String,
    pos: usize,
    echo: bool,
    closed: bool,
    name: String,
    pending: Vec<u8>,
    /// Echo only: the next byte starts a line (gets the `[name] ` prefix).
    line_start: bool,
}

impl Console {
    /// Takes what arrived within `wait`.
    fn drain(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.push(&bytes),
                Err(RecvTimeoutError::Timeout) => return,
                Err(RecvTimeoutError::Disconnected) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        // Keep a partial UTF-8 sequence for the next read.
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let chunk: Vec<u8> = self.pending.drain(..valid).collect();
        let s = String::from_utf8_lossy(&chunk).replace('\r', "");
        if self.echo {
            let mut out = String::with_capacity(s.len() + 16);
            for c in s.chars() {
                if self.line_start {
                    out.push_str(&format!("[{}] ", self.name));
                }
                out.push(c);
                self.line_start = c == '\n';
            }
            let _ = std::io::stderr().lock().write_all(out.as_bytes());
        }
        self.text.push_str(&s);
    }

    /// Waits until `needle` appears after the read position; returns the
    /// whole line it is on and moves the read position past it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.text[self.pos..].find(needle) {
                let at = self.pos + i;
                let line_start = self.text[..at].rfind('\n').map_or(0, |n| n + 1);
                let rest = &self.text[at..];
                let end = rest.find('\n').map(|n| at + n);
                // Wait for the end of the line, briefly, so callers get all of it.
                if end.is_none() && Instant::now() < deadline && !self.closed {
                    self.drain(Duration::from_millis(50));
                    continue;
                }
                let end = end.unwrap_or(self.text.len());
                self.pos = end;
                return Ok(self.text[line_start..end].to_owned());
            }
            if self.closed {
                bail!(
                    "[{}] console closed (QEMU exited) before {needle:?}; tail:\n{}",
                    self.name,
                    self.tail(3000)
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "[{}] {needle:?} did not appear within {timeout:?}; console tail:\n{}",
                    self.name,
                    self.tail(3000)
                );
            }
            self.drain(left.min(Duration::from_millis(100)));
        }
    }

    /// Everything printed so far.
    pub fn transcript(&self) -> &str {
        &self.text
    }

    /// Whether `needle` was printed anywhere so far.
    pub fn saw(&self, needle: &str) -> bool {
        self.text.contains(needle)
    }

    pub fn tail(&self, max: usize) -> &str {
        let mut start = self.text.len().saturating_sub(max);
        while !self.text.is_char_boundary(start) {
            start += 1;
        }
        &self.text[start..]
    }

    /// Saves the transcript (for a failing test's artefacts).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, &self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_has_what_we_rely_on() {
        let a = VmBuilder::new("/k", "/i")
            .append("shoal.log=debug")
            .disk("/d1", Some("s1"))
            .nic("52:54:00:12:34:56", NetBackend::User)
            .args()
            .join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(
            a.contains("-append console=ttyS0 panic=-1 quiet shoal.log=debug"),
            "{a}"
        );
        assert!(a.contains("virtio-blk-pci,drive=d0,serial=s1"), "{a}");
        assert!(
            a.contains("virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile="),
            "{a}"
        );
    }

    #[test]
    fn expect_finds_lines_in_order() {
        let (tx, rx) = mpsc::channel();
        let mut c = Console {
            rx,
            text: String::new(),
            pos: 0,
            echo: false,
            closed: false,
            name: "t".into(),
            pending: vec![],
            line_start: true,
        };
        tx.send(b"boot\r\nlease acquired on eth0: 10.0.2.15/24\nnext ".to_vec())
            .unwrap();
        tx.send("line \u{e9}".as_bytes()[..6].to_vec()).unwrap();
        tx.send("\u{e9}\n".as_bytes()[1..].to_vec()).unwrap();
        let line = c.expect("lease acquired", Duration::from_secs(1)).unwrap();
        assert_eq!(line, "lease acquired on eth0: 10.0.2.15/24");
        assert!(
            c.expect("boot", Duration::from_millis(10)).is_err(),
            "read position moved past it"
        );
        assert_eq!(
            c.expect("next", Duration::from_secs(1)).unwrap(),
            "next line \u{e9}"
        );
        drop(tx);
        let e = c
            .expect("never", Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("console closed"), "{e}");
    }
}
