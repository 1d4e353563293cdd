//! The Controller's agent channel end to end, in process: the real server on
//! 127.0.0.1 with ephemeral ports, a tiny agent from the protocol crate,
//! and the admin API through the library's client. Covers the happy path
//! (hello → welcome → job → offer → started/finished → succeeded), the
//! refusals (wrong secret, wrong pinned key, replayed message 1, tampered
//! frame), hostile raw TCP input, and the job engine's edge cases.

mod common;

use std::time::Duration;

use common::*;
use shoal_controller::api::{Job, NewJob};
use shoal_controller::jobs::{StepKind, StepSpec};
use shoal_controller::model::{DeviceState, EnrolmentPolicy, EnrolmentState, JobState, StepState};
use shoal_protocol::channel::Keypair;
use shoal_protocol::control::{
    self, AgentMsg, ControllerMsg, Enrolment, Level, Outcome, Step, StepRef,
};
use shoal_protocol::inventory::{Inventory, System};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn echo(t: &str) -> StepSpec {
    StepSpec::new(StepKind::Echo { text: t.into() })
}

async fn run_job(ts: &TestServer, devices: &[&str], steps: Vec<StepSpec>) -> u64 {
    let new = NewJob {
        devices: devices.iter().map(|d| d.to_string()).collect(),
        steps,
        created_by: Some("test".into()),
    };
    ts.api(move |c| c.create_job(&new)).await.unwrap().id
}

async fn job(ts: &TestServer, id: u64) -> Job {
    ts.api(move |c| c.job(&id.to_string())).await.unwrap()
}

/// Polls the job until `done` holds (10 s at most).
async fn wait_job(ts: &TestServer, id: u64, done: impl Fn(&Job) -> bool) -> Job {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let j = job(ts, id).await;
        if done(&j) {
            return j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job never got there: {j:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the device until it is in `state` (10 s at most). Log lines like
/// "device 1 offline" are not unique across the tests running in parallel
/// (each has its own database), so state is checked through the API.
async fn wait_state(ts: &TestServer, sel: &str, state: DeviceState) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let sel = sel.to_owned();
        let d = ts.api(move |c| c.device(&sel)).await.unwrap();
        if d.state == state {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "device never got {state}: {d:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn succeeded(out: &str) -> Outcome {
    Outcome::Succeeded {
        output: out.into(),
        inventory: None,
    }
}

#[tokio::test]
async fn hello_welcome_then_a_job_runs_to_success() {
    let ts = TestServer::start(|_| {}).await;
    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    a.send(&hello("uuid-happy", 1)).await;
    let device = match a.recv().await {
        ControllerMsg::Welcome {
            device,
            enrolment,
            heartbeat_ms,
            timeout_ms,
        } => {
            assert_eq!(enrolment, Enrolment::Approved);
            assert_eq!((heartbeat_ms, timeout_ms), (500, 5000));
            device
        }
        other => panic!("expected Welcome, got {other:?}"),
    };
    wait_log(&[&format!("INFO device {device} online ({})", a.local)]).await;
    let d = ts.api(|c| c.device("uuid-happy")).await.unwrap();
    assert_eq!(
        (d.id as u64, d.state, d.enrolment),
        (device, DeviceState::Ready, EnrolmentState::Approved)
    );
    assert_eq!(d.macs, vec!["52:54:00:12:34:01"]);
    assert_eq!(d.agent_version.as_deref(), Some("test-agent"));
    assert_eq!(d.agent_key.as_ref().map(String::len), Some(64));

    let id = run_job(
        &ts,
        &["uuid-happy"],
        vec![echo("hi"), StepSpec::new(StepKind::Inventory)],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    match a.recv().await {
        ControllerMsg::Offer {
            step,
            work,
            timeout_ms,
        } => {
            assert_eq!(
                (step, work, timeout_ms),
                (s0, Step::Echo { text: "hi".into() }, 60_000)
            );
        }
        other => panic!("expected Offer, got {other:?}"),
    }
    a.send(&AgentMsg::Started { step: s0 }).await;
    a.send(&AgentMsg::Progress {
        step: s0,
        done: 1,
        total: 2,
        text: "echoing".into(),
    })
    .await;
    let j = wait_job(&ts, id, |j| j.results[0].state == StepState::Running).await;
    assert_eq!(j.state, JobState::Running);
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: succeeded("hi"),
    })
    .await;
    let s1 = StepRef { job: id, step: 1 };
    match a.recv().await {
        ControllerMsg::Offer { step, work, .. } => assert_eq!((step, work), (s1, Step::Inventory)),
        other => panic!("expected Offer, got {other:?}"),
    }
    a.send(&AgentMsg::Heartbeat {
        seq: 1,
        running: None,
    })
    .await;
    a.send(&AgentMsg::Started { step: s1 }).await;
    let inv = Inventory {
        system: System {
            vendor: Some("QEMU".into()),
            ..System::default()
        },
        memory_bytes: Some(1 << 30),
        ..Inventory::default()
    };
    a.send(&AgentMsg::Finished {
        step: s1,
        outcome: Outcome::Succeeded {
            output: "inventory taken".into(),
            inventory: Some(inv),
        },
    })
    .await;
    a.send(&AgentMsg::Log {
        level: Level::Info,
        text: "hello from the agent".into(),
    })
    .await;
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    assert_eq!(j.state, JobState::Succeeded);
    assert_eq!(j.results[0].output.as_deref(), Some("hi"));
    assert_eq!(j.results[0].progress.as_deref(), Some("echoing (1/2)"));
    assert!(j.results[0].started_at.is_some() && j.results[0].finished_at.is_some());
    assert_eq!(j.results[1].output.as_deref(), Some("inventory taken"));
    wait_log(&[&format!("INFO job {id} succeeded")]).await;
    let d = ts.api(|c| c.device("uuid-happy")).await.unwrap();
    let inv = d.inventory.unwrap();
    assert_eq!(inv["system"]["vendor"], "QEMU");
    assert_eq!(inv["memory_bytes"], 1u64 << 30);
    let logs = ts
        .api(move |c| c.logs(Some(&device.to_string()), 10))
        .await
        .unwrap();
    assert!(
        logs.iter()
            .any(|l| l.text == "hello from the agent" && l.level == "info"),
        "{logs:?}"
    );

    // Closing the connection: offline.
    drop(a);
    wait_state(&ts, "uuid-happy", DeviceState::Offline).await;
    wait_log(&[&format!("INFO device {device} offline: connection closed")]).await;
}

#[tokio::test]
async fn a_wrong_enrolment_secret_is_refused_and_logged() {
    let ts = TestServer::start(|_| {}).await;
    let mut wrong = ts.psk();
    wrong[0] ^= 1;
    let kp = Keypair::generate().unwrap();
    let (_, msg1) = shoal_protocol::channel::Initiator::start(&kp, &ts.key(), &wrong).unwrap();
    let mut s = TcpStream::connect(ts.addr()).await.unwrap();
    let local = s.local_addr().unwrap();
    write_frame(&mut s, &msg1).await;
    assert!(
        closed(&mut s).await,
        "the controller closes without message 2"
    );
    wait_log(&[&format!("WARN handshake from {local} refused: handshake failed: the peer has another enrolment secret or pins another controller key")]).await;
    assert!(ts.api(|c| c.devices()).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_wrong_pinned_key_is_refused() {
    let ts = TestServer::start(|_| {}).await;
    let impostor = Keypair::generate().unwrap();
    let e = TestAgent::connect(ts.addr(), &impostor.public, &ts.psk())
        .await
        .err()
        .unwrap();
    let local = e.split(':').take(2).collect::<Vec<_>>().join(":");
    wait_log(&[&format!(
        "WARN handshake from {local} refused: handshake failed"
    )])
    .await;
}

#[tokio::test]
async fn a_replayed_message_one_is_refused_as_a_replay() {
    let ts = TestServer::start(|_| {}).await;
    let (a, _) = ts.agent("uuid-replay", 2).await;
    let mut s = TcpStream::connect(ts.addr()).await.unwrap();
    let local = s.local_addr().unwrap();
    write_frame(&mut s, &a.msg1).await;
    assert!(closed(&mut s).await);
    wait_log(&[&format!(
        "WARN handshake from {local} refused: replayed handshake"
    )])
    .await;
}

#[tokio::test]
async fn a_tampered_frame_closes_the_connection_and_stores_nothing() {
    let ts = TestServer::start(|_| {}).await;
    // Before the hello: no device is recorded.
    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    a.send_tampered(&hello("uuid-tamper", 3)).await;
    assert!(a.closed().await);
    wait_log(&[&format!(
        "WARN agent at {}: frame failed authentication (tampered, replayed, or out of order); closing",
        a.local
    )])
    .await;
    assert!(ts.api(|c| c.devices()).await.unwrap().is_empty());

    // After it: the tampered log line is not stored and the device goes offline.
    let (mut a, device) = ts.agent("uuid-tamper", 3).await;
    a.send_tampered(&AgentMsg::Log {
        level: Level::Warn,
        text: "forged".into(),
    })
    .await;
    assert!(a.closed().await);
    wait_log(&[&format!(
        "WARN device {device} (uuid-tamper) at {}: frame failed authentication (tampered, replayed, or out of order); closing",
        a.local
    )])
    .await;
    wait_log(&[&format!(
        "device {device} offline: frame failed authentication"
    )])
    .await;
    assert!(ts.api(|c| c.logs(None, 100)).await.unwrap().is_empty());
}

#[tokio::test]
async fn hostile_bytes_never_panic_and_the_server_keeps_serving() {
    let ts = TestServer::start(|_| {}).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("empty frame", vec![0, 0, 0, 0]),
        ("oversized", vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]),
        ("truncated", vec![0, 0, 0, 40, 1, 2, 3]),
        ("short msg1", vec![0, 0, 0, 3, 1, 2, 3]),
        ("garbage msg1", [vec![0, 0, 0, 96], vec![0xab; 96]].concat()),
        ("nothing", vec![]),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(ts.addr()).await.unwrap();
        let local = s.local_addr().unwrap().to_string();
        s.write_all(&bytes).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(closed(&mut s).await, "{what}: connection should close");
        wait_log(&[&local]).await;
    }
    assert!(has_log(&[
        "oversized frame: 1195725856 bytes, the limit is 65535"
    ]));
    assert!(has_log(&["empty frame"]));
    assert!(has_log(&["in the middle of a frame"]));
    assert!(has_log(&["malformed handshake message (3 bytes)"]));

    // After a good handshake: garbage frames, a non-Hello first message,
    // an undecodable message.
    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    a.send(&AgentMsg::Heartbeat {
        seq: 0,
        running: None,
    })
    .await;
    assert!(a.closed().await);
    wait_log(&[&format!(
        "agent at {}: first message is Heartbeat instead of Hello; closing",
        a.local
    )])
    .await;

    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    let mut bad = control::encode(&AgentMsg::Error { text: "x".into() }).unwrap();
    bad[0] = 99; // wrong protocol version
    let sealed = a.transport.seal(&bad).unwrap();
    write_frame(&mut a.stream, &sealed).await;
    assert!(a.closed().await);
    wait_log(&[&format!(
        "agent at {}: bad message: protocol version",
        a.local
    )])
    .await;

    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    a.stream.write_all(&[0, 0x10, 0, 0]).await.unwrap();
    assert!(a.closed().await);
    wait_log(&[&format!(
        "agent at {}: oversized frame: 1048576 bytes",
        a.local
    )])
    .await;

    // A device's connection with a truncated frame at the end.
    let (mut a, device) = ts.agent("uuid-hostile", 4).await;
    a.stream.write_all(&[0, 0, 0, 50, 1]).await.unwrap();
    a.stream.shutdown().await.unwrap();
    assert!(a.closed().await);
    wait_log(&[&format!(
        "device {device} offline: connection closed in the middle of a frame"
    )])
    .await;

    // Still serving.
    let (_a, _) = ts.agent("uuid-good", 5).await;
    let health = ts.api(|c| c.health()).await.unwrap();
    assert_eq!(health.status, "ok");
}

#[tokio::test]
async fn a_pending_device_gets_no_work_until_approved() {
    let ts = TestServer::start(|c| c.enrolment = EnrolmentPolicy::KnownOnly).await;
    let mut a = TestAgent::connect(ts.addr(), &ts.key(), &ts.psk())
        .await
        .unwrap();
    a.send(&hello("uuid-pending", 6)).await;
    let device = match a.recv().await {
        ControllerMsg::Welcome {
            device, enrolment, ..
        } => {
            assert_eq!(enrolment, Enrolment::Pending);
            device
        }
        other => panic!("expected Welcome, got {other:?}"),
    };
    // "all" means approved devices: none.
    let new = NewJob {
        devices: vec!["all".into()],
        steps: vec![echo("x")],
        created_by: None,
    };
    let e = ts.api(move |c| c.create_job(&new)).await.unwrap_err();
    assert!(e.to_string().starts_with("400: no devices"), "{e}");
    let id = run_job(&ts, &[&device.to_string()], vec![echo("x")]).await;
    assert_eq!(
        a.recv_within(Duration::from_millis(800)).await,
        Err(()),
        "no offer while pending"
    );
    let d = ts
        .api(move |c| c.approve(&device.to_string()))
        .await
        .unwrap();
    assert_eq!(d.enrolment, EnrolmentState::Approved);
    match a.recv().await {
        ControllerMsg::Offer { step, .. } => assert_eq!(step, StepRef { job: id, step: 0 }),
        other => panic!("expected Offer, got {other:?}"),
    }
}

#[tokio::test]
async fn busy_leaves_the_step_queued_and_it_is_offered_again() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, _) = ts.agent("uuid-busy", 7).await;
    let id = run_job(&ts, &["uuid-busy"], vec![echo("later")]).await;
    let s0 = StepRef { job: id, step: 0 };
    let other = StepRef { job: 999, step: 0 };
    assert!(matches!(a.recv().await, ControllerMsg::Offer { step, .. } if step == s0));
    a.send(&AgentMsg::Busy {
        offered: s0,
        running: other,
    })
    .await;
    a.send(&AgentMsg::Heartbeat {
        seq: 1,
        running: None,
    })
    .await;
    assert_eq!(job(&ts, id).await.results[0].state, StepState::Queued);
    assert!(matches!(a.recv().await, ControllerMsg::Offer { step, .. } if step == s0));
    a.send(&AgentMsg::Started { step: s0 }).await;
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: succeeded("later"),
    })
    .await;
    assert_eq!(
        wait_job(&ts, id, |j| j.state.is_final()).await.state,
        JobState::Succeeded
    );
}

#[tokio::test]
async fn a_failed_step_cancels_the_rest_and_a_finish_for_another_device_is_ignored() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, _) = ts.agent("uuid-fail-a", 8).await;
    let (mut b, _) = ts.agent("uuid-fail-b", 9).await;
    let id = run_job(
        &ts,
        &["uuid-fail-a", "uuid-fail-b"],
        vec![echo("1"), echo("2")],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(a.recv().await, ControllerMsg::Offer { .. }));
    assert!(matches!(b.recv().await, ControllerMsg::Offer { .. }));
    a.send(&AgentMsg::Started { step: s0 }).await;
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: Outcome::Failed {
            reason: "disk on fire".into(),
        },
    })
    .await;
    let j = wait_job(&ts, id, |j| j.counts.failed == 1).await;
    let a_rows: Vec<_> = j
        .results
        .iter()
        .filter(|r| r.device == j.devices[0])
        .collect();
    assert_eq!(a_rows[0].reason.as_deref(), Some("disk on fire"));
    assert_eq!(a_rows[1].state, StepState::Cancelled);
    assert_eq!(a_rows[1].reason.as_deref(), Some("an earlier step failed"));
    // b finishes its steps; the job ends failed.
    for s in 0..2 {
        let step = StepRef { job: id, step: s };
        if s == 1 {
            assert!(
                matches!(b.recv().await, ControllerMsg::Offer { step: got, .. } if got == step)
            );
        }
        b.send(&AgentMsg::Started { step }).await;
        b.send(&AgentMsg::Finished {
            step,
            outcome: succeeded("ok"),
        })
        .await;
    }
    assert_eq!(
        wait_job(&ts, id, |j| j.state.is_final()).await.state,
        JobState::Failed
    );
}

#[tokio::test]
async fn a_disconnect_fails_the_running_step() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, device) = ts.agent("uuid-drop", 10).await;
    let id = run_job(
        &ts,
        &["uuid-drop"],
        vec![StepSpec::new(StepKind::Wait { secs: 30 }), echo("never")],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    match a.recv().await {
        ControllerMsg::Offer {
            step, timeout_ms, ..
        } => assert_eq!((step, timeout_ms), (s0, 60_000)),
        other => panic!("expected Offer, got {other:?}"),
    }
    a.send(&AgentMsg::Started { step: s0 }).await;
    wait_job(&ts, id, |j| j.results[0].state == StepState::Running).await;
    assert_eq!(
        ts.api(move |c| c.device(&device.to_string()))
            .await
            .unwrap()
            .state,
        DeviceState::Busy
    );
    drop(a);
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(
        j.results[0].reason.as_deref(),
        Some("device disconnected: connection closed")
    );
    assert_eq!(
        j.results[1].reason.as_deref(),
        Some("an earlier step failed")
    );
}

#[tokio::test]
async fn silence_past_the_timeout_fails_the_running_step() {
    let ts = TestServer::start(|c| {
        c.heartbeat = Duration::from_millis(200);
        c.timeout = Duration::from_millis(700);
    })
    .await;
    let (mut a, device) = ts.agent("uuid-silent", 11).await;
    let id = run_job(
        &ts,
        &["uuid-silent"],
        vec![StepSpec::new(StepKind::Wait { secs: 30 })],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(a.recv().await, ControllerMsg::Offer { .. }));
    a.send(&AgentMsg::Started { step: s0 }).await;
    // Heartbeats keep it alive...
    for seq in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.send(&AgentMsg::Heartbeat {
            seq,
            running: Some(s0),
        })
        .await;
    }
    assert_eq!(job(&ts, id).await.results[0].state, StepState::Running);
    // ...silence does not.
    assert!(a.closed().await);
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    assert_eq!(
        j.results[0].reason.as_deref(),
        Some("device disconnected: no heartbeat for 0.7 s")
    );
    wait_log(&[&format!("device {device} offline: no heartbeat for 0.7 s")]).await;
}

#[tokio::test]
async fn a_step_that_overruns_its_timeout_fails_and_is_cancelled() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, _) = ts.agent("uuid-slow", 12).await;
    let slow = StepSpec {
        work: StepKind::Wait { secs: 5 },
        timeout_secs: Some(1),
    };
    let id = run_job(&ts, &["uuid-slow"], vec![slow]).await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(
        a.recv().await,
        ControllerMsg::Offer {
            timeout_ms: 1000,
            ..
        }
    ));
    a.send(&AgentMsg::Started { step: s0 }).await;
    a.send(&AgentMsg::Heartbeat {
        seq: 0,
        running: Some(s0),
    })
    .await;
    assert_eq!(a.recv().await, ControllerMsg::Cancel { step: s0 });
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    assert_eq!(j.results[0].reason.as_deref(), Some("timed out after 1s"));
    // The late report is ignored.
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: Outcome::Cancelled,
    })
    .await;
    wait_log(&[&format!(
        "job {id} step 0 finished after it had failed; ignored"
    )])
    .await;
}

#[tokio::test]
async fn cancelling_a_job_stops_the_running_step_and_the_rest() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, _) = ts.agent("uuid-cancel", 13).await;
    let id = run_job(
        &ts,
        &["uuid-cancel"],
        vec![StepSpec::new(StepKind::Wait { secs: 60 }), echo("no")],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(a.recv().await, ControllerMsg::Offer { .. }));
    a.send(&AgentMsg::Started { step: s0 }).await;
    wait_job(&ts, id, |j| j.results[0].state == StepState::Running).await;
    let out = ts.api(move |c| c.cancel(&id.to_string())).await.unwrap();
    assert_eq!((out.cancelled, out.stopping), (1, 1));
    assert_eq!(a.recv().await, ControllerMsg::Cancel { step: s0 });
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: Outcome::Cancelled,
    })
    .await;
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    assert_eq!(j.state, JobState::Cancelled);
    assert_eq!(j.results[0].reason.as_deref(), Some("cancelled on request"));
    assert_eq!(j.results[1].reason.as_deref(), Some("cancelled by admin"));
}

#[tokio::test]
async fn poweroff_succeeds_when_reported_even_though_the_device_then_goes() {
    let ts = TestServer::start(|_| {}).await;
    let (mut a, device) = ts.agent("uuid-off", 14).await;
    let id = run_job(&ts, &["uuid-off"], vec![StepSpec::new(StepKind::Poweroff)]).await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(
        a.recv().await,
        ControllerMsg::Offer {
            work: Step::Poweroff,
            ..
        }
    ));
    a.send(&AgentMsg::Started { step: s0 }).await;
    a.send(&AgentMsg::Finished {
        step: s0,
        outcome: succeeded("powering off"),
    })
    .await;
    drop(a);
    wait_state(&ts, &device.to_string(), DeviceState::Offline).await;
    assert_eq!(job(&ts, id).await.state, JobState::Succeeded);
}

#[tokio::test]
async fn a_restart_marks_devices_offline_and_fails_running_steps() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let mut a = TestAgent::connect(server.agents_addr, &server.public_key, &server.shared.psk)
        .await
        .unwrap();
    a.send(&hello("uuid-restart", 15)).await;
    assert!(matches!(a.recv().await, ControllerMsg::Welcome { .. }));
    let new = NewJob {
        devices: vec!["uuid-restart".into()],
        steps: vec![StepSpec::new(StepKind::Wait { secs: 60 })],
        created_by: None,
    };
    let id = api(&server, move |c| c.create_job(&new)).await.unwrap().id;
    assert!(matches!(a.recv().await, ControllerMsg::Offer { .. }));
    a.send(&AgentMsg::Started {
        step: StepRef { job: id, step: 0 },
    })
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while api(&server, move |c| c.job(&id.to_string()))
        .await
        .unwrap()
        .state
        != JobState::Running
    {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = server.public_key;
    drop(server);
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    assert_eq!(server.public_key, key, "keys are reused");
    let j = api(&server, move |c| c.job(&id.to_string())).await.unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(
        j.results[0].reason.as_deref(),
        Some("controller restarted while the step ran")
    );
    let d = api(&server, |c| c.device("uuid-restart")).await.unwrap();
    assert_eq!(d.state, DeviceState::Offline);
}

#[tokio::test]
async fn a_reconnect_replaces_the_old_connection() {
    let ts = TestServer::start(|_| {}).await;
    let (mut old, device) = ts.agent("uuid-twice", 16).await;
    let id = run_job(
        &ts,
        &["uuid-twice"],
        vec![StepSpec::new(StepKind::Wait { secs: 60 })],
    )
    .await;
    let s0 = StepRef { job: id, step: 0 };
    assert!(matches!(old.recv().await, ControllerMsg::Offer { .. }));
    old.send(&AgentMsg::Started { step: s0 }).await;
    wait_job(&ts, id, |j| j.results[0].state == StepState::Running).await;

    let (mut new, again) = ts.agent("uuid-twice", 16).await;
    assert_eq!(device, again, "recognised by UUID");
    assert!(old.closed().await);
    wait_log(&[&format!(
        "device {device}: connection from {} closed: replaced by a new connection from {}",
        old.local, new.local
    )])
    .await;
    let j = wait_job(&ts, id, |j| j.state.is_final()).await;
    let reason = j.results[0].reason.clone().unwrap();
    assert!(
        reason.starts_with("device disconnected: replaced by a new connection from"),
        "{reason}"
    );
    assert_eq!(
        ts.api(|c| c.device("uuid-twice")).await.unwrap().state,
        DeviceState::Ready
    );

    // The new connection gets the next work.
    let id2 = run_job(&ts, &["uuid-twice"], vec![echo("again")]).await;
    assert!(matches!(new.recv().await, ControllerMsg::Offer { step, .. } if step.job == id2));

    // Recognised by MAC when the UUID is missing.
    let (_c, by_mac) = ts.agent("", 16).await;
    assert_eq!(by_mac, device);
}

#[tokio::test]
async fn the_admin_api_wants_the_token() {
    let ts = TestServer::start(|_| {}).await;
    let url = format!("http://{}", ts.server.admin_addr);
    let e = tokio::task::spawn_blocking(move || {
        shoal_controller::client::Client::new(&url, "wrong")
            .devices()
            .unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(e.to_string(), "401: bad admin token");
    let e = ts.api(|c| c.job("12345")).await.unwrap_err();
    assert_eq!(e.to_string(), "404: no job \"12345\"");
    let forgotten = {
        let (_a, device) = ts.agent("uuid-forget", 17).await;
        ts.api(move |c| c.forget(&device.to_string()))
            .await
            .unwrap()
    };
    wait_log(&[&format!(
        "device {} offline: device forgotten",
        forgotten.id
    )])
    .await;
    assert!(ts
        .api(|c| c.devices())
        .await
        .unwrap()
        .iter()
        .all(|d| d.id != forgotten.id));
}
