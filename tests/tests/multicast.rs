//! Multicast deploys end to end with the real binaries: a Controller and
//! agents as ordinary processes in network namespaces on one bridge, real
//! multicast between them, one job on several devices (one session), and
//! every target compared with the source afterwards.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_tests::netns::{run_with_input, Netns};
use shoal_tests::proc::{tail, Proc};
use shoal_tests::require_program;
use shoal_tests::site::{job_id, Controller, FakeMachine, Lan};

const T: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

/// `mib` MiB: random, a zero chunk and some text, so there are raw,
/// compressed and zero chunks.
fn source(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let len = mib * MIB + 5 * 512;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    let bytes: Vec<u8> = (0..len)
        .map(|i| {
            if (4 * MIB..8 * MIB).contains(&i) {
                0
            } else if (8 * MIB..12 * MIB).contains(&i) {
                b"shoal multicast test line\n"[i % 26]
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

struct Fleet {
    lan: Lan,
    ctl: Controller,
    machines: Vec<FakeMachine>,
    agents: Vec<Option<Proc>>,
    hosts: Vec<usize>,
    targets: Vec<PathBuf>,
    bytes: Vec<u8>,
    _state: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn new(n: usize, mib: usize, ctl_args: &[&str]) -> Fleet {
        let mut lan = Lan::new();
        let state = tempfile::tempdir().unwrap();
        let listen = format!("{}:7000", lan.gateway());
        let ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, ctl_args);
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.raw");
        let bytes = source(&raw, mib, n as u64);
        ctl.ctl_ok(&["image", "group", "create", "lab"]);
        ctl.ctl_ok(&[
            "image",
            "add",
            "lab",
            raw.to_str().unwrap(),
            "--name",
            "disk",
            "--compression",
            "fast",
        ]);
        let machines: Vec<FakeMachine> = (1..=n as u32)
            .map(|i| FakeMachine::new(i, (mib as u64) * 2))
            .collect();
        let hosts = (0..n).map(|i| lan.add_host(10 + i as u8)).collect();
        let targets = machines
            .iter()
            .map(|m| {
                // `auto` picks the machine's `vda`: ROOT/dev/vda.
                let p = m.dir.path().join("dev/vda");
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, vec![0xaa; bytes.len() + MIB]).unwrap();
                p
            })
            .collect();
        let mut f = Fleet {
            lan,
            ctl,
            machines,
            agents: Vec::new(),
            hosts,
            targets,
            bytes,
            _state: state,
            _dir: dir,
        };
        for i in 0..n {
            f.agents.push(None);
            f.start_agent(i);
        }
        f
    }

    fn start_agent(&mut self, i: usize) {
        let cmdline = self.ctl.agent_cmdline();
        let mut a = self.machines[i].agent(
            &format!("agent{}", i + 1),
            Some(&self.lan.hosts[self.hosts[i]]),
            &cmdline,
        );
        a.expect("registered with controller", T);
        self.agents[i] = Some(a);
    }

    /// One job deploying the image to every machine's target.
    fn deploy(&self, options: &str) -> String {
        let mut args: Vec<String> = vec!["jobs".into(), "run".into()];
        for m in &self.machines {
            args.push("--device".into());
            args.push(m.uuid.clone());
        }
        args.push(format!("deploy:lab/disk@auto{options}"));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        job_id(&self.ctl.ctl_ok(&refs))
    }

    fn logs(&self) -> String {
        format!(
            "controller log:\n{}\nagents:\n{}",
            tail(&self.ctl.proc.log(), 6000),
            self.agents
                .iter()
                .flatten()
                .map(|a| tail(&a.log(), 3000).to_owned())
                .collect::<Vec<_>>()
                .join("\n---\n")
        )
    }

    /// Waits for `job` to succeed on every device; returns `jobs show`.
    fn wait(&self, job: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let shown = self.ctl.ctl_ok(&["jobs", "show", job]);
            let ok = shown.matches("succeeded").count() >= self.machines.len();
            if ok {
                return shown;
            }
            assert!(
                !shown.contains("failed") && Instant::now() < deadline,
                "job {job}:\n{shown}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn session(&self, job: &str) -> serde_json::Value {
        let out = self
            .ctl
            .ctl_ok(&["--json", "sessions", "show", &format!("job:{job}")]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    /// Waits for `job`, checks every disk, and returns its session after
    /// checking that all receivers are in it, with completion confirmed,
    /// under `cipher`.
    fn finished(&self, job: &str, limit: Duration, cipher: &str) -> serde_json::Value {
        let shown = self.wait(job, limit);
        println!("{shown}\n{}", self.logs());
        self.check_targets();
        let s = self.session(job);
        println!("{}", serde_json::to_string_pretty(&s).unwrap());
        assert_eq!(s["cipher"], cipher, "{s}");
        let rs = s["receivers"].as_array().unwrap();
        assert_eq!(rs.len(), self.machines.len(), "all in one session: {s}");
        assert!(rs.iter().all(|r| r["confirmed"] == true), "{s}");
        s
    }

    fn check_targets(&self) {
        for t in &self.targets {
            let got = std::fs::read(t).unwrap();
            assert!(
                got[..self.bytes.len()] == self.bytes[..],
                "{} holds the source bytes",
                t.display()
            );
            assert!(
                got[self.bytes.len()..].iter().all(|&b| b == 0xaa),
                "nothing written past the image in {}",
                t.display()
            );
        }
    }
}

#[test]
fn four_agents_one_session_and_a_rogue_sender_changes_nothing() {
    let f = Fleet::new(4, 24, &[]);
    let job = f.deploy(";min=4;wait=20");
    // The rogue: on the bridge, same group and session ID as soon as the
    // session exists, random blocks with random tags.
    let t0 = Instant::now();
    let (group, id) = loop {
        let out = f
            .ctl
            .ctl(&["--json", "sessions", "show", &format!("job:{job}")]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            break (
                v["group"].as_str().unwrap().to_owned(),
                u64::from_str_radix(v["id"].as_str().unwrap(), 16).unwrap(),
            );
        }
        assert!(t0.elapsed() < T, "no session for job {job}\n{}", f.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rogue = {
        let stop = stop.clone();
        let ns = f.lan.ns.name().to_owned();
        let src = f.lan.gateway();
        std::thread::spawn(move || rogue(&ns, &src, &group, id, &stop))
    };
    // No `cipher=`: auto, AES-256-GCM where the Controller and every
    // agent (all on this CPU) have AES instructions.
    let aes = shoal_protocol::multicast::hardware_aes();
    let auto = shoal_protocol::multicast::Cipher::auto(aes, aes);
    let s = f.finished(&job, Duration::from_secs(120), auto.as_str());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = rogue.join().unwrap();
    let rs = s["receivers"].as_array().unwrap();
    let forged: u64 = rs.iter().map(|r| r["forged"].as_u64().unwrap()).sum();
    assert!(
        sent > 0 && forged > 0,
        "rogue sent {sent}, receivers counted {forged}: {s}"
    );
}

/// Sends forged data datagrams from namespace `ns` until `stop`; returns
/// how many.
fn rogue(
    ns: &str,
    src: &str,
    group: &str,
    session: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> u64 {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let sock = std::net::UdpSocket::bind(format!("{src}:0")).unwrap();
    let mut x: u64 = 0x1234_5678;
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        let mut d = vec![0u8; 1472];
        d[0..2].copy_from_slice(b"SM");
        d[2] = 1;
        d[3] = 1;
        d[4..12].copy_from_slice(&session.to_be_bytes());
        for b in d[12..].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // Plausible indices: chunk 0..6, block 0..2900.
        d[20..24].copy_from_slice(&((x % 6) as u32).to_be_bytes());
        d[24..28].copy_from_slice(&(((x >> 8) % 2900) as u32).to_be_bytes());
        if sock.send_to(&d, group).is_ok() {
            n += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    n
}

#[test]
fn aes_session_with_lossy_links_to_two_receivers_is_repaired() {
    // This kernel has no sch_netem (and no tc classifiers), so the loss
    // comes from a token bucket: the bridge ports to receivers 1 and 2 pass
    // at most 19 MB/s with a 5 ms queue, the session is capped at 20 MB/s,
    // and what does not fit is dropped (about 5 %).
    let f = Fleet::new(4, 40, &[]);
    for port in ["v10", "v11"] {
        run_with_input(
            f.lan.ns.command("tc").args([
                "qdisc", "add", "dev", port, "root", "tbf", "rate", "152mbit", "burst", "16k",
                "latency", "5ms",
            ]),
            None,
        );
    }
    let job = f.deploy(";min=4;wait=20;rate=20;cipher=aes256gcm");
    let s = f.finished(&job, Duration::from_secs(180), "aes256gcm");
    let rs = s["receivers"].as_array().unwrap();
    let by_device = |d: u64| rs.iter().find(|r| r["device"] == d).unwrap();
    for d in [1, 2] {
        let r = by_device(d);
        assert!(r["lost"].as_u64().unwrap() > 0, "device {d} saw loss: {r}");
        assert!(r["repairs_requested"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(s["repair_blocks"].as_u64().unwrap() > 0, "{s}");
}

#[test]
fn chacha_session_with_5_percent_loss_on_two_receivers() {
    // What `tc qdisc add dev vN root netem loss 5%` would do, on a kernel
    // without sch_netem: every packet that reaches receivers 1 and 2 is
    // dropped with probability 5 % (nftables, the netdev ingress hook of
    // their interfaces). The bridge ports segment UDP, so a packet is one
    // datagram, as on a wire.
    require_program("nft", "nftables");
    require_program("ethtool", "ethtool");
    let f = Fleet::new(4, 40, &[]);
    let lossy: Vec<&Netns> = (0..2).map(|i| &f.lan.hosts[f.hosts[i]]).collect();
    // All four ports: a GSO packet flooded to ports that differ in this
    // reaches the others mangled (this kernel's bridge).
    for i in 0..4 {
        let port = format!("v{}", 10 + i);
        run_with_input(
            f.lan
                .ns
                .command("ethtool")
                .args(["-K", &port, "tx-udp-segmentation", "off"]),
            None,
        );
    }
    for ns in &lossy {
        let rules = "table netdev loss {\n  chain eth0 {\n    type filter hook ingress device \"eth0\" priority 0;\n    counter\n    numgen random mod 100 < 5 counter drop\n  }\n}\n";
        // (Needs nf_tables with the netdev family and numgen.)
        run_with_input(ns.command("nft").args(["-f", "-"]), Some(rules));
    }
    let job = f.deploy(";min=4;wait=20;cipher=chacha20poly1305");
    let s = f.finished(&job, Duration::from_secs(180), "chacha20poly1305");
    let rs = s["receivers"].as_array().unwrap();
    // The filters did drop about 5 % of the packets, one datagram each.
    for ns in &lossy {
        let listed = run_with_input(
            ns.command("nft").args(["list", "table", "netdev", "loss"]),
            None,
        );
        println!("{}: {listed}", ns.name());
        let counts: Vec<u64> = listed
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(counts.len(), 2, "{listed}");
        let share = counts[1] as f64 / counts[0] as f64;
        assert!(
            counts[0] > 20_000 && (0.04..0.06).contains(&share),
            "{} of {} packets dropped: {listed}",
            counts[1],
            counts[0]
        );
    }
    let by_device = |d: u64| rs.iter().find(|r| r["device"] == d).unwrap();
    for d in [1, 2] {
        let r = by_device(d);
        assert!(r["lost"].as_u64().unwrap() > 0, "device {d} saw loss: {r}");
        assert!(r["repairs_requested"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(s["repair_blocks"].as_u64().unwrap() > 0, "{s}");
}

/// Waits until job `job`'s session has started sending.
fn wait_started(f: &Fleet, job: &str) {
    let t0 = Instant::now();
    loop {
        let out = f
            .ctl
            .ctl(&["--json", "sessions", "show", &format!("job:{job}")]);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if !v["started_after_secs"].is_null() {
                return;
            }
        }
        assert!(
            t0.elapsed() < T,
            "session of job {job} never started\n{}",
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn rc4_session_with_a_late_joiner() {
    let mut f = Fleet::new(4, 48, &[]);
    // Receiver 4 is off when the job starts and comes 3 s into the stream.
    f.agents[3] = None;
    let job = f.deploy(";cipher=rc4;min=3;wait=30;rate=8");
    wait_started(&f, &job);
    std::thread::sleep(Duration::from_secs(3));
    f.start_agent(3);
    let s = f.finished(&job, Duration::from_secs(180), "rc4");
    let rs = s["receivers"].as_array().unwrap();
    let by_device = |d: u64| rs.iter().find(|r| r["device"] == d).unwrap();
    let late = by_device(4);
    assert!(
        late["repairs_requested"].as_u64().unwrap() > 0,
        "the late joiner asked for what it missed: {late}"
    );
    let early = by_device(1);
    assert!(
        late["received"].as_u64() <= early["received"].as_u64(),
        "the late joiner did not get more than the first: {late} vs {early}"
    );
    assert!(s["repair_blocks"].as_u64().unwrap() > 0, "{s}");
}

/// Seconds the agent's deploy took, from its `wrote … in X s` output.
fn wrote_secs(shown: &str, device: usize) -> f64 {
    let line = shown
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&device.to_string()) && l.contains("wrote"))
        .unwrap_or_else(|| panic!("no deploy output for device {device}:\n{shown}"));
    let after = line.split(" in ").nth(1).unwrap();
    after.split(' ').next().unwrap().parse().unwrap()
}

/// A cgroup (v1 blkio) throttling writes to one block device.
struct Throttle {
    dir: PathBuf,
}

impl Throttle {
    fn new(dev: &Path, bytes_per_sec: u64, pid: u32) -> Throttle {
        let root = Path::new("/sys/fs/cgroup/blkio");
        assert!(
            root.join("blkio.throttle.write_bps_device").exists(),
            "the straggler test needs the cgroup v1 blkio controller at {} to throttle a disk",
            root.display()
        );
        let dir = root.join(format!("shoal-straggler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let meta = std::fs::metadata(dev).unwrap();
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        std::fs::write(
            dir.join("blkio.throttle.write_bps_device"),
            format!("{major}:{minor} {bytes_per_sec}"),
        )
        .unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Throttle { dir }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for p in procs.split_whitespace() {
                let _ = std::fs::write("/sys/fs/cgroup/blkio/cgroup.procs", p);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A loop device over `file`, detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (package mount) is needed for the straggler test");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn a_straggler_does_not_hold_back_the_others() {
    let mut f = Fleet::new(3, 64, &[]);
    // Receiver 3's disk: a loop device (so the kernel can throttle it).
    let backing = f.machines[2].dir.path().join("loop.img");
    std::fs::rename(&f.targets[2], &backing).unwrap();
    let lo = Loop::new(&backing);
    std::os::unix::fs::symlink(&lo.0, &f.targets[2]).unwrap();

    let opts = ";min=3;wait=30;rate=20";
    let first = f.deploy(opts);
    let shown = f.wait(&first, Duration::from_secs(120));
    println!("{shown}");
    f.check_targets();
    let alone = wrote_secs(&shown, 1).max(wrote_secs(&shown, 2));
    let per_second = (f.bytes.len() as f64 / wrote_secs(&shown, 3)) as u64;

    // Again, with receiver 3's disk at a quarter of its speed.
    for t in &f.targets {
        std::fs::write(t, vec![0xaa; f.bytes.len() + MIB]).unwrap();
    }
    let pid = f.agents[2].as_ref().unwrap().pid();
    let _throttle = Throttle::new(Path::new(&lo.0), per_second / 4, pid);
    let second = f.deploy(opts);
    let shown = f.wait(&second, Duration::from_secs(300));
    println!("{shown}");
    f.check_targets();
    let with = wrote_secs(&shown, 1).max(wrote_secs(&shown, 2));
    let slow = wrote_secs(&shown, 3);
    println!(
        "others: {alone:.2} s alone, {with:.2} s with a straggler ({:.2}x); the straggler took {slow:.2} s at {} KB/s",
        with / alone,
        per_second / 4 / 1000
    );
    assert!(
        slow > 2.0 * alone,
        "the throttle took effect ({slow:.2} s vs {alone:.2} s)\n{shown}"
    );
    assert!(
        with <= 1.2 * alone + 0.3,
        "the others took {with:.2} s with a straggler, {alone:.2} s without\n{}",
        f.logs()
    );
    let _ = f.lan.ns.name();
    f.agents.clear();
}
