//! The control channel end to end with the real `shoal-controller`,
//! `shoal-agent` and `shoalctl` binaries:
//! - in network namespaces: three agents register and run a job;
//! - security: wrong enrolment secret, wrong pinned key, a replayed
//!   handshake and a tampered frame are refused, and nothing reaches the
//!   job engine;
//! - resilience: a Controller killed and restarted, an agent killed mid-job;
//! - bad input: truncated, oversized and random frames from a raw client.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use shoal_protocol::channel::to_hex;
use shoal_protocol::control::{AgentMsg, ControllerMsg, Hello, Identity};
use shoal_protocol::Inventory;
use shoal_tests::client::{self, Keys};
use shoal_tests::proxy::Proxy;
use shoal_tests::site::{free_port, job_id, Controller, FakeMachine, Lan};

const T: Duration = Duration::from_secs(30);

#[test]
fn three_agents_register_and_run_echo_and_inventory() {
    let mut lan = Lan::new();
    let state = tempfile::tempdir().unwrap();
    let listen = format!("{}:7000", lan.gateway());
    let mut ctl = Controller::start(state.path(), Some(&lan.ns), &listen, 7100, &[]);
    let cmdline = ctl.agent_cmdline();

    let machines: Vec<FakeMachine> = (1..=3)
        .map(|i| FakeMachine::new(i, 64 * i as u64))
        .collect();
    let mut agents = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        let h = lan.add_host(10 + i as u8);
        agents.push(m.agent(&format!("agent{}", i + 1), Some(&lan.hosts[h]), &cmdline));
    }
    for a in &mut agents {
        a.expect("registered with controller", T);
    }

    let list = ctl.ctl_ok(&["--json", "devices", "list"]);
    for m in &machines {
        assert!(
            list.contains(&m.uuid),
            "device {} missing from:\n{list}",
            m.uuid
        );
    }
    let show = ctl.ctl_ok(&["--json", "devices", "show", &machines[2].uuid]);
    assert!(
        show.contains("fake-disk-3") && show.contains("201326592"),
        "inventory of machine 3 (192 MiB disk):\n{show}"
    );

    let run = ctl.ctl_ok(&[
        "jobs",
        "run",
        "--device",
        "all",
        "--wait",
        "60",
        "echo:hello from shoal",
        "inventory",
    ]);
    let job = job_id(&run);
    let shown = ctl.ctl_ok(&["jobs", "show", &job]);
    assert_eq!(
        shown.matches("hello from shoal").count(),
        3,
        "echo output for each device:\n{shown}"
    );
    assert!(
        shown.matches("succeeded").count() >= 6,
        "2 steps x 3 devices succeeded:
{shown}"
    );
    for a in &agents {
        assert!(a.saw("running echo"), "{} log:\n{}", a.name(), a.log());
    }

    // The results are in the database: a restarted Controller still has them.
    ctl.restart();
    let again = ctl.ctl_ok(&["jobs", "show", &job]);
    assert_eq!(
        again.matches("hello from shoal").count(),
        3,
        "after restart:\n{again}"
    );
    let json = ctl.ctl_ok(&["--json", "jobs", "show", &job]);
    assert!(json.contains("succeeded"), "{json}");
    for a in &mut agents {
        a.expect("registered with controller", T);
    }
}

/// A Controller on loopback with its own state, on free ports.
fn loopback_controller(extra: &[&str]) -> (tempfile::TempDir, Controller) {
    let state = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let ctl = Controller::start(state.path(), None, &listen, free_port(), extra);
    (state, ctl)
}

fn device_count(ctl: &Controller) -> usize {
    let list = ctl.ctl_ok(&["--json", "devices", "list"]);
    list.matches("\"uuid\"").count()
}

fn replace_word(cmdline: &str, key: &str, value: &str) -> String {
    cmdline
        .split_whitespace()
        .map(|w| {
            if w.starts_with(key) {
                format!("{key}{value}")
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn wrong_enrolment_secret_is_refused_on_both_sides() {
    let (_state, mut ctl) = loopback_controller(&[]);
    let cmdline = replace_word(&ctl.agent_cmdline(), "shoal.enrol_key=", &"ab".repeat(32));
    let m = FakeMachine::new(21, 64);
    let mut agent = m.agent("agent", None, &cmdline);
    agent.expect("refused the handshake", T);
    ctl.proc.expect("refused", T);
    assert!(!agent.saw("registered with controller"));
    assert_eq!(device_count(&ctl), 0, "nothing reached the device records");
}

#[test]
fn agent_pinning_another_controller_key_is_refused() {
    let (_state, mut ctl) = loopback_controller(&[]);
    let impostor = shoal_protocol::channel::Keypair::generate().unwrap();
    let cmdline = replace_word(
        &ctl.agent_cmdline(),
        "shoal.controller_key=",
        &to_hex(&impostor.public),
    );
    let m = FakeMachine::new(22, 64);
    let mut agent = m.agent("agent", None, &cmdline);
    agent.expect("refused the handshake", T);
    ctl.proc.expect("refused", T);
    assert_eq!(device_count(&ctl), 0);
}

#[test]
fn replayed_handshake_is_refused() {
    let (_state, mut ctl) = loopback_controller(&[]);
    let keys = Keys::from_cmdline(&ctl.agent_cmdline());
    let first = client::connect(&ctl.listen, &keys).expect("a good handshake");
    // Replay the same message 1 on a new connection: refused by name, no message 2.
    let mut s = TcpStream::connect(&ctl.listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&shoal_protocol::frame::to_vec(&first.msg1).unwrap())
        .unwrap();
    assert_eq!(
        client::read_frame(&mut s),
        None,
        "the replayed handshake got an answer"
    );
    let line = ctl.proc.expect("replayed handshake", T);
    assert!(line.contains("refused"), "{line}");
    assert_eq!(device_count(&ctl), 0);
}

#[test]
fn tampered_frame_is_refused_and_never_reaches_the_job_engine() {
    let (_state, mut ctl) = loopback_controller(&[]);
    // Flip a bit in the agent's first encrypted frame (its hello) on every connection.
    let proxy = Proxy::start(&ctl.listen, Some(1));
    let cmdline = replace_word(&ctl.agent_cmdline(), "shoal.controller=", &proxy.addr);
    let m = FakeMachine::new(23, 64);
    let mut agent = m.agent("agent", None, &cmdline);
    ctl.proc.expect("failed authentication", T);
    agent.expect("reconnect", T);
    assert!(proxy.tampered.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(!agent.saw("registered with controller"));
    assert_eq!(
        device_count(&ctl),
        0,
        "a tampered hello must not create a device"
    );
}

#[test]
fn controller_restart_agents_reconnect_within_10s_and_devices_persist() {
    let (_state, mut ctl) = loopback_controller(&[]);
    let cmdline = ctl.agent_cmdline();
    let machines: Vec<FakeMachine> = (31..=32).map(|i| FakeMachine::new(i, 64)).collect();
    let mut agents: Vec<_> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| m.agent(&format!("agent{i}"), None, &cmdline))
        .collect();
    for a in &mut agents {
        a.expect("registered with controller", T);
    }
    ctl.proc.kill(); // SIGKILL: no clean shutdown
    std::thread::sleep(Duration::from_secs(1));
    let restarted = Instant::now();
    ctl.restart();
    for a in &mut agents {
        a.expect("registered with controller", Duration::from_secs(10));
    }
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "agents took {took:?} to come back"
    );
    eprintln!(
        "agents re-registered {:.1} s after the controller restarted",
        took.as_secs_f64()
    );
    let list = ctl.ctl_ok(&["--json", "devices", "list"]);
    for m in &machines {
        assert!(list.contains(&m.uuid), "{} lost:\n{list}", m.uuid);
    }
}

#[test]
fn agent_killed_mid_job_fails_the_step_with_a_reason() {
    let (_state, ctl) = loopback_controller(&["--heartbeat-ms", "500", "--timeout-ms", "2000"]);
    let cmdline = ctl.agent_cmdline();
    let m = FakeMachine::new(41, 64);
    let mut agent = m.agent("agent", None, &cmdline);
    agent.expect("registered with controller", T);
    let run = ctl.ctl_ok(&["jobs", "run", "--device", &m.uuid, "wait:60", "echo:never"]);
    let job = job_id(&run);
    agent.expect("running wait", T);
    let killed = Instant::now();
    agent.kill();
    let deadline = killed + Duration::from_secs(10);
    let shown = loop {
        let shown = ctl.ctl_ok(&["jobs", "show", &job]);
        if shown.contains("failed") || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = killed.elapsed();
    assert!(
        shown.contains("disconnected"),
        "the step failed with a reason:\n{shown}"
    );
    assert!(
        took <= Duration::from_secs(5),
        "marked failed {took:?} after the kill (heartbeat timeout 2 s)"
    );
    eprintln!(
        "step marked failed {:.2} s after the agent was killed",
        took.as_secs_f64()
    );
}

#[test]
fn truncated_oversized_and_random_frames_do_not_hurt_the_controller() {
    let (_state, mut ctl) = loopback_controller(&[]);
    let keys = Keys::from_cmdline(&ctl.agent_cmdline());
    let send = |bytes: &[u8]| {
        let mut s = TcpStream::connect(&ctl.listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        client::read_frame(&mut s)
    };
    // Truncated: a length promising more than is sent.
    assert_eq!(send(&[0, 0, 0, 200, 1, 2, 3]), None);
    // Oversized and empty lengths.
    assert_eq!(send(&[0xff, 0xff, 0xff, 0xff, 0]), None);
    assert_eq!(send(&[0, 0, 0, 0]), None);
    // Random bytes, many times (a fixed-seed xorshift: reproducible).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..50 {
        let len = 1 + (round * 37) % 400;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(send(&bytes), None, "round {round} got an answer");
    }
    // A well-formed handshake followed by garbage inside the channel.
    let mut s = client::connect(&ctl.listen, &keys).unwrap();
    s.stream
        .write_all(&shoal_protocol::frame::to_vec(&[0u8; 40]).unwrap())
        .unwrap();
    assert!(s.recv().is_none());
    // And the Controller still serves a good client.
    let mut good = client::connect(&ctl.listen, &keys).unwrap();
    let hello = Hello {
        agent_version: "test".into(),
        boot_id: 1,
        identity: Identity {
            uuid: Some("5a0b7c1e-0000-4000-8000-0000000000ff".into()),
            serial: None,
            macs: vec![],
        },
        inventory: Inventory::default(),
        running: None,
    };
    good.send(&AgentMsg::Hello(hello)).unwrap();
    match good.recv() {
        Some(ControllerMsg::Welcome { .. }) => {}
        other => panic!("expected a welcome, got {other:?}\n{}", ctl.proc.log()),
    }
    assert!(
        ctl.proc.wait_exit(Duration::ZERO).is_none(),
        "the controller died"
    );
    assert!(!ctl.proc.saw("panicked"), "{}", ctl.proc.log());
    let _ = ctl.proc.try_expect("oversized", Duration::from_secs(1));
}
