//! The `deploy` step end to end with the real binaries: a Controller and
//! three agents as ordinary processes in network namespaces, an image added
//! with `shoalctl image add`, and a `deploy:lab/disk@file=…` job on all
//! three; each target file then starts with exactly the source bytes (the
//! zero chunk zeroed over what was there). A job created by a user without
//! `deploy` permission fails naming it. (Resuming over a cut distribution
//! connection is tested in `agent/src/deploy/tests.rs`.)

use std::time::Duration;

use shoal_tests::site::{job_id, shoalctl_bin, Controller, FakeMachine, Lan};

const T: Duration = Duration::from_secs(30);
const MIB: usize = 1 << 20;

/// 9 MiB + 3 sectors: random, a whole zero chunk (4..8 MiB at the default
/// 4 MiB chunk size), random again; not a multiple of the chunk size.
fn source(path: &std::path::Path) -> Vec<u8> {
    let len = 9 * MIB + 3 * 512;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..len)
        .map(|i| {
            if (4 * MIB..8 * MIB).contains(&i) {
                0
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

#[test]
fn three_agents_deploy_an_image_and_a_user_without_permission_is_refused() {
    let mut lan = Lan::new();
    let state = tempfile::tempdir().unwrap();
    let listen = format!("{}:7000", lan.gateway());
    let ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, &[]);
    assert!(
        ctl.proc
            .saw(&format!("{}:7001 (image distribution)", lan.gateway())),
        "distribution on the listen port + 1:\n{}",
        ctl.proc.log()
    );
    let cmdline = ctl.agent_cmdline();

    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let bytes = source(&raw);
    ctl.ctl_ok(&["image", "group", "create", "lab"]);
    let added = ctl.ctl_ok(&[
        "image",
        "add",
        "lab",
        raw.to_str().unwrap(),
        "--name",
        "disk",
        "--compression",
        "fast",
    ]);
    assert!(added.contains("lab/disk"), "{added}");

    let machines: Vec<FakeMachine> = (1..=3).map(|i| FakeMachine::new(i, 64)).collect();
    let mut agents = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        let h = lan.add_host(10 + i as u8);
        agents.push(m.agent(&format!("agent{}", i + 1), Some(&lan.hosts[h]), &cmdline));
    }
    for a in &mut agents {
        a.expect("registered with controller", T);
    }

    // Each agent's "disk": a file larger than the image, full of 0xaa, so
    // the zero chunk must really be zeroed.
    let targets: Vec<_> = machines
        .iter()
        .map(|m| {
            let p = m.dir.path().join("target.img");
            std::fs::write(&p, vec![0xaa; bytes.len() + MIB]).unwrap();
            p
        })
        .collect();
    let mut jobs = Vec::new();
    for (m, t) in machines.iter().zip(&targets) {
        let step = format!("deploy:lab/disk@file={}", t.display());
        let run = ctl.ctl_ok(&["jobs", "run", "--device", &m.uuid, &step]);
        jobs.push(job_id(&run));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for job in &jobs {
        loop {
            let shown = ctl.ctl_ok(&["jobs", "show", job]);
            if shown.contains("succeeded") && shown.contains("wrote") {
                assert!(shown.contains("9.0 MiB"), "{shown}");
                println!("{shown}");
                break;
            }
            assert!(
                !shown.contains("failed") && std::time::Instant::now() < deadline,
                "job {job}:\n{shown}\ncontroller log:\n{}\nagents:\n{}",
                shoal_tests::proc::tail(&ctl.proc.log(), 4000),
                agents
                    .iter()
                    .map(|a| shoal_tests::proc::tail(&a.log(), 2000).to_owned())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for t in &targets {
        let got = std::fs::read(t).unwrap();
        assert!(
            got[..bytes.len()] == bytes[..],
            "{} holds the source bytes",
            t.display()
        );
        assert!(
            got[bytes.len()..].iter().all(|&b| b == 0xaa),
            "nothing written past the image in {}",
            t.display()
        );
    }

    // A user who may list the image but not deploy it.
    let created = ctl.ctl_ok(&["users", "create", "alice"]);
    let token = created.lines().last().unwrap().trim().to_owned();
    ctl.ctl_ok(&["acl", "grant", "alice", "list", "lab/disk"]);
    let fresh = machines[0].dir.path().join("alice.img");
    std::fs::write(&fresh, vec![0xaa; bytes.len() + MIB]).unwrap();
    let out = lan
        .ns
        .command(shoalctl_bin())
        .args([
            "--url",
            &format!("http://127.0.0.1:{}", ctl.admin_port),
            "--token",
            &token,
            "jobs",
            "run",
            "--device",
            &machines[0].uuid,
            &format!("deploy:lab/disk@file={}", fresh.display()),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "alice may create the job:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = job_id(&stdout);
    loop {
        let shown = ctl.ctl_ok(&["jobs", "show", &job]);
        if shown.contains("failed") {
            assert!(
                shown.contains("\"alice\" may not deploy image lab/disk"),
                "the reason names the permission:\n{shown}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(30),
            "{shown}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        std::fs::read(&fresh).unwrap().iter().all(|&b| b == 0xaa),
        "nothing written for a refused deploy"
    );
}

/// The agent's distribution connection is cut (`ss -K` in its namespace)
/// in the middle of a deploy: it reconnects, asks only for the chunks it
/// still lacks, and finishes with the exact bytes.
#[test]
fn a_deploy_whose_connection_is_cut_resumes_and_finishes() {
    shoal_tests::require_program("ss", "iproute2");
    let mut lan = Lan::new();
    let state = tempfile::tempdir().unwrap();
    let listen = format!("{}:7000", lan.gateway());
    let ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, &[]);
    let cmdline = ctl.agent_cmdline();
    // 96 MiB of incompressible bytes: long enough to cut in the middle.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let bytes: Vec<u8> = (0..96 * MIB / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(&raw, &bytes).unwrap();
    ctl.ctl_ok(&["image", "group", "create", "big"]);
    ctl.ctl_ok(&[
        "image",
        "add",
        "big",
        raw.to_str().unwrap(),
        "--name",
        "disk",
        "--compression",
        "none",
    ]);

    let m = FakeMachine::new(7, 128);
    let h = lan.add_host(20);
    let mut agent = m.agent("agent", Some(&lan.hosts[h]), &cmdline);
    agent.expect("registered with controller", T);
    let target = m.dir.path().join("target.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(bytes.len() as u64)
        .unwrap();
    let step = format!("deploy:big/disk@file={}", target.display());
    // Pace the link to the agent (~200 Mbit/s, so the deploy takes seconds),
    // let it get part-way, then kill its connections to the distribution
    // service (port 7001) until it says it lost one.
    let tc = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            lan.ns.name(),
            "tc",
            "qdisc",
            "add",
            "dev",
            "v20",
            "root",
            "tbf",
            "rate",
            "200mbit",
            "burst",
            "256kb",
            "latency",
            "100ms",
        ])
        .output()
        .unwrap();
    assert!(
        tc.status.success(),
        "tc: {}",
        String::from_utf8_lossy(&tc.stderr)
    );
    let ns = lan.hosts[h].name().to_owned();
    let job = job_id(&ctl.ctl_ok(&["jobs", "run", "--device", &m.uuid, &step]));
    std::thread::sleep(Duration::from_millis(1500));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut cut = false;
    while std::time::Instant::now() < deadline {
        let _ = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "ss", "-K", "dport", "=", ":7001"])
            .output();
        if agent.log().contains("chunks written, retrying") {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        cut,
        "could not cut the deploy part-way (it finished first?):\n{}",
        agent.log()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let shown = loop {
        let shown = ctl.ctl_ok(&["jobs", "show", &job]);
        if shown.contains("wrote")
            || shown.contains("failed")
            || std::time::Instant::now() > deadline
        {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        shown.contains("succeeded") && shown.contains("wrote 96.0 MiB"),
        "{shown}\nagent:\n{}",
        agent.log()
    );
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains("chunks written, retrying"))
        .unwrap()
        .to_owned();
    eprintln!("cut: {line}");
    assert!(
        !line.contains(" 0 of "),
        "cut part-way, not before the first chunk: {line}"
    );
    assert!(
        std::fs::read(&target).unwrap() == bytes,
        "the resumed deploy wrote the exact bytes"
    );
}
