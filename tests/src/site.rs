//! A deployment site for end-to-end tests: a real `shoal-controller` with
//! its own state directory, real `shoal-agent` processes with fake machines
//! (`/sys` and `/proc` trees in temp dirs), `shoalctl` against the admin API,
//! and optionally a LAN: a bridge in a network namespace, with a namespace
//! per agent or tap devices for QEMU guests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::{artefact, require_program};

/// The Controller binary (`SHOAL_CONTROLLER`).
pub fn controller_bin() -> PathBuf {
    artefact("SHOAL_CONTROLLER")
}

/// The admin CLI (`SHOALCTL`).
pub fn shoalctl_bin() -> PathBuf {
    artefact("SHOALCTL")
}

/// A free TCP port on loopback (in this namespace).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

static SUBNET: AtomicU32 = AtomicU32::new(0);

/// A bridge `br0` in its own namespace, `10.88.<n>.1/24` on it.
#[derive(Debug)]
pub struct Lan {
    pub ns: Netns,
    pub subnet: u8,
    /// Agent namespaces joined to the bridge (kept alive with the LAN).
    pub hosts: Vec<Netns>,
    taps: u32,
}

impl Lan {
    pub fn new() -> Lan {
        crate::require_root("a network-namespace test");
        require_program("ip", "iproute2");
        let ns = Netns::new("lan");
        let n = SUBNET.fetch_add(1, Ordering::Relaxed);
        let subnet = (10 + (std::process::id() + n * 41) % 230) as u8;
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("10.88.{subnet}.1/24"), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Lan {
            ns,
            subnet,
            hosts: Vec::new(),
            taps: 0,
        }
    }

    /// `10.88.<subnet>.1`: the bridge, where the Controller listens.
    pub fn gateway(&self) -> String {
        format!("10.88.{}.1", self.subnet)
    }

    /// A namespace with a veth joined to the bridge, addressed `10.88.<subnet>.<host>`.
    /// Returns its index in `hosts`.
    pub fn add_host(&mut self, host: u8) -> usize {
        let ns = Netns::new(&format!("h{host}"));
        let outside = format!("v{host}");
        self.ns.ip(&[
            "link",
            "add",
            &outside,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]);
        self.ns
            .ip(&["link", "set", &outside, "master", "br0", "up"]);
        ns.ip(&[
            "addr",
            "add",
            &format!("10.88.{}.{host}/24", self.subnet),
            "dev",
            "eth0",
        ]);
        ns.ip(&["link", "set", "eth0", "up"]);
        self.hosts.push(ns);
        self.hosts.len() - 1
    }

    /// dnsmasq on the bridge, leasing `.50`–`.99` with the bridge as router.
    pub fn start_dhcp(&self) -> crate::netns::Dnsmasq {
        let net = format!("10.88.{}", self.subnet);
        crate::netns::Dnsmasq::start(
            &self.ns,
            "br0",
            &[
                format!("--dhcp-range={net}.50,{net}.99,255.255.255.0,1h"),
                format!("--dhcp-option=option:router,{net}.1"),
            ],
        )
    }

    /// A tap device on the bridge, for a QEMU guest started in `self.ns`.
    pub fn add_tap(&mut self) -> String {
        let name = format!("tap{}", self.taps);
        self.taps += 1;
        self.ns.ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        self.ns.ip(&["link", "set", &name, "master", "br0", "up"]);
        name
    }
}

impl Default for Lan {
    fn default() -> Self {
        Lan::new()
    }
}

/// A running Controller.
#[derive(Debug)]
pub struct Controller {
    pub proc: Proc,
    pub state: PathBuf,
    /// `HOST:PORT` agents connect to.
    pub listen: String,
    pub admin_port: u16,
    ns: Option<String>,
    extra: Vec<String>,
}

impl Controller {
    /// Starts `shoal-controller serve` (in `ns` if given) and waits until it
    /// listens. `extra` are more `serve` options (`--enrolment known-only`, ...).
    pub fn start(
        state: &Path,
        ns: Option<&Netns>,
        listen: &str,
        admin_port: u16,
        extra: &[&str],
    ) -> Controller {
        let mut c = Controller {
            proc: Proc::spawn("controller", Command::new("true")),
            state: state.to_owned(),
            listen: listen.to_owned(),
            admin_port,
            ns: ns.map(|n| n.name().to_owned()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        c.restart();
        c
    }

    fn command(&self, program: PathBuf) -> Command {
        match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    /// (Re)starts the process with the same state, addresses and options.
    pub fn restart(&mut self) {
        self.proc.kill();
        let mut cmd = self.command(controller_bin());
        cmd.arg("serve")
            .arg("--state")
            .arg(&self.state)
            .args([
                "--listen",
                &self.listen,
                "--admin",
                &format!("127.0.0.1:{}", self.admin_port),
            ])
            .args(&self.extra)
            .env(
                "SHOAL_LOG",
                std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into()),
            );
        self.proc = Proc::spawn("controller", cmd);
        self.proc.expect("listening on", Duration::from_secs(30));
    }

    /// The kernel command-line words an agent needs to reach this Controller.
    pub fn agent_cmdline(&self) -> String {
        let out = Command::new(controller_bin())
            .args(["keys", "--state"])
            .arg(&self.state)
            .args(["--listen", &self.listen])
            .output()
            .expect("run shoal-controller keys");
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.trim_start().starts_with("shoal.controller="))
            .unwrap_or_else(|| {
                panic!("`shoal-controller keys` printed no agent command line:\n{text}")
            })
            .trim()
            .to_owned()
    }

    /// Runs `shoalctl ARGS` against this Controller's admin API.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(shoalctl_bin());
        cmd.args([
            "--url",
            &format!("http://127.0.0.1:{}", self.admin_port),
            "--state",
        ])
        .arg(&self.state)
        .args(args);
        cmd.output().expect("run shoalctl")
    }

    /// `shoalctl ARGS`, which must succeed; returns stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "shoalctl {args:?} failed ({}):\n{}\n{}\ncontroller log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            crate::proc::tail(&self.proc.log(), 3000)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A fake machine for an agent running as an ordinary process.
#[derive(Debug)]
pub struct FakeMachine {
    pub dir: tempfile::TempDir,
    pub uuid: String,
    pub mac: String,
}

impl FakeMachine {
    /// A machine with SMBIOS identity `uuid`, one NIC with `mac`, and one disk of `disk_mib`.
    pub fn new(index: u32, disk_mib: u64) -> FakeMachine {
        let dir = tempfile::tempdir().expect("temp dir");
        let uuid = format!("5a0b7c1e-0000-4000-8000-{index:012x}");
        let mac = format!(
            "02:00:00:00:{:02x}:{:02x}",
            (index >> 8) & 0xff,
            index & 0xff
        );
        let put = |rel: &str, text: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        put("sys/class/dmi/id/sys_vendor", "Shoal Test\n");
        put("sys/class/dmi/id/product_name", "Fake Machine\n");
        put(
            "sys/class/dmi/id/product_serial",
            &format!("FAKE-{index:04}\n"),
        );
        put("sys/class/dmi/id/product_uuid", &format!("{uuid}\n"));
        put("proc/meminfo", "MemTotal: 1048576 kB\n");
        put("proc/cpuinfo", "processor\t: 0\nmodel name\t: Fake CPU\n");
        put("sys/class/net/eth0/address", &format!("{mac}\n"));
        std::fs::create_dir_all(dir.path().join("sys/devices/fake/net0")).unwrap();
        std::os::unix::fs::symlink(
            dir.path().join("sys/devices/fake/net0"),
            dir.path().join("sys/class/net/eth0/device"),
        )
        .unwrap();
        put("sys/block/vda/size", &format!("{}\n", disk_mib * 2048));
        put("sys/block/vda/serial", &format!("fake-disk-{index}\n"));
        FakeMachine { dir, uuid, mac }
    }

    /// `shoal-agent run` on this machine with `cmdline` (in `ns` if given).
    pub fn agent(&self, name: &str, ns: Option<&Netns>, cmdline: &str) -> Proc {
        let agent = crate::agent_bin();
        let mut cmd = match ns {
            Some(ns) => ns.command(agent),
            None => Command::new(agent),
        };
        cmd.args(["run", "--root"]).arg(self.dir.path()).args([
            "--cmdline",
            &format!("shoal.net=off shoal.modules=0 {cmdline}"),
        ]);
        Proc::spawn(name, cmd)
    }
}

/// The job id `shoalctl jobs run` printed: the first number in its output.
pub fn job_id(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.split(|c: char| !c.is_ascii_digit())
                .find(|w| !w.is_empty())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no job id in:\n{out}"))
}
