//! Network namespaces for tests: a [`Lab`] is two fresh namespaces, a
//! "server" and a "client", joined by a veth pair (`vethA` in the server,
//! `vethB` in the client), optionally with a real dnsmasq serving DHCP in
//! the server. Traffic never leaves the namespaces.
//!
//! Every namespace, link and process is removed on `Drop`, also when the
//! test panics. Names carry the pid and a counter, and each lab gets its own
//! subnet, so tests can run in parallel threads and processes.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The server end of the lab's veth pair.
pub const SERVER_IF: &str = "vethA";
/// The client end of the lab's veth pair.
pub const CLIENT_IF: &str = "vethB";

/// Runs `cmd` to completion and returns its stdout; panics with its stderr.
fn run(cmd: &mut Command) -> String {
    run_with_input(cmd, None)
}

/// [`run`], with `stdin` written to the command's standard input.
pub fn run_with_input(cmd: &mut Command, stdin: Option<&str>) -> String {
    use std::io::Write;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `shoal-<pid>-<n>-<tag>`.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("shoal-{}-{n}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`; panics on failure, returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`,
    /// which also mounts the namespace's own `/sys`).
    pub fn command(&self, program: impl Into<PathBuf>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program.into());
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes the links in it.
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("ip netns del {}: {e}", self.name),
        }
    }
}

/// The output of [`run_bounded`].
#[derive(Debug)]
pub struct Bounded {
    /// `None` when the process was killed at the time limit.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Bounded {
    /// The exit code, or a panic saying the process hung or was killed.
    pub fn code(&self) -> i32 {
        let status = self
            .status
            .unwrap_or_else(|| panic!("killed after {:?}; stderr:\n{}", self.elapsed, self.stderr));
        status
            .code()
            .unwrap_or_else(|| panic!("ended by {status}; stderr:\n{}", self.stderr))
    }
}

/// Runs `cmd`, killing it after `limit`; collects stdout and stderr.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Bounded {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let read_all = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("piped stderr")));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break Some(status);
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    Bounded {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed,
    }
}

/// A dnsmasq serving DHCP only (`--port=0`) inside a namespace; killed on drop.
#[derive(Debug)]
pub struct Dnsmasq {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq on `iface` in `ns` with `extra` options (a
    /// `--dhcp-range`, options), and waits (at most 5 s) until it logs that
    /// its DHCP sockets are bound. (In `--no-daemon` mode dnsmasq writes no
    /// pid file, so the log is the readiness signal.)
    pub fn start(ns: &Netns, iface: &str, extra: &[String]) -> Dnsmasq {
        let dnsmasq = crate::require_program("dnsmasq", "dnsmasq");
        let dir = tempfile::tempdir().expect("temp dir for dnsmasq");
        let log = std::fs::File::create(dir.path().join("dnsmasq.log")).expect("dnsmasq log");
        let mut cmd = ns.command(dnsmasq);
        cmd.args([
            "--no-daemon",
            "--no-ping",
            "--port=0",
            "--bind-interfaces",
            "--leasefile-ro",
            "--conf-file=/dev/null",
            "--log-facility=-",
            "--log-dhcp",
        ])
        .arg(format!("--interface={iface}"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut d = Dnsmasq { child, dir };
        let start = Instant::now();
        loop {
            if d.log()
                .contains("DHCP, sockets bound exclusively to interface")
            {
                return d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("dnsmasq exited at start ({status}):\n{}", d.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "dnsmasq did not start in 5 s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What dnsmasq logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        // `ip netns exec` execs dnsmasq in place, so this is dnsmasq's pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two namespaces joined by a veth pair, the server end addressed
/// `10.77.<subnet>.1/24`.
#[derive(Debug)]
pub struct Lab {
    // Drop order is declaration order: dnsmasq before its namespace.
    dnsmasq: Option<Dnsmasq>,
    pub server: Netns,
    pub client: Netns,
    pub subnet: u8,
}

impl Lab {
    /// Creates the namespaces and the veth pair; the server end gets its
    /// address and is brought up only if `server_up` (a down peer leaves
    /// the client without carrier). The client end is left down.
    pub fn new(server_up: bool) -> Lab {
        crate::require_root("a network-namespace test");
        crate::require_program("ip", "iproute2");
        let server = Netns::new("srv");
        let client = Netns::new("cli");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Distinct for 230 labs in a process (37 is prime to 230).
        let subnet = (20 + (std::process::id() + n * 37) % 230) as u8;
        let lab = Lab {
            dnsmasq: None,
            server,
            client,
            subnet,
        };
        lab.server.ip(&[
            "link",
            "add",
            SERVER_IF,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            lab.client.name(),
        ]);
        lab.server.ip(&[
            "addr",
            "add",
            &format!("{}/24", lab.server_addr()),
            "dev",
            SERVER_IF,
        ]);
        if server_up {
            lab.server.ip(&["link", "set", SERVER_IF, "up"]);
        }
        lab
    }

    /// `10.77.<subnet>.1`.
    pub fn server_addr(&self) -> Ipv4Addr {
        self.addr(1)
    }

    /// `10.77.<subnet>.<host>`.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, host)
    }

    /// Starts dnsmasq on the server end, leasing `.50`–`.99` for an hour
    /// with the server as router, plus `extra` options.
    pub fn start_dhcp(&mut self, extra: &[&str]) -> &Dnsmasq {
        let mut args = vec![
            format!(
                "--dhcp-range={},{},255.255.255.0,1h",
                self.addr(50),
                self.addr(99)
            ),
            format!("--dhcp-option=option:router,{}", self.server_addr()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let d = Dnsmasq::start(&self.server, SERVER_IF, &args);
        self.dnsmasq.insert(d)
    }

    /// The running dnsmasq's log, or an empty string.
    pub fn dhcp_log(&self) -> String {
        self.dnsmasq.as_ref().map(Dnsmasq::log).unwrap_or_default()
    }
}
