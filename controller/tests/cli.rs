//! The two binaries as an operator uses them: `shoal-controller keys`,
//! `shoal-controller serve` (ready once it logs `listening on ...`), and
//! `shoalctl` against it, with the test agent answering offers.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::TestAgent;
use shoal_protocol::channel::key_from_hex;
use shoal_protocol::control::{AgentMsg, ControllerMsg, Outcome, Step};

const CONTROLLER: &str = env!("CARGO_BIN_EXE_shoal-controller");
const SHOALCTL: &str = env!("CARGO_BIN_EXE_shoalctl");

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shoalctl(admin: &str, state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(SHOALCTL)
        .arg("--url")
        .arg(format!("http://{admin}"))
        .arg("--state")
        .arg(state)
        .args(args)
        .env_remove("SHOAL_TOKEN")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    let t = String::from_utf8_lossy(b).into_owned();
    eprint!("{t}");
    t
}

/// Answers offers like a real agent would (echo returns its text, wait
/// fails) and heartbeats between them, until the connection closes.
async fn answer(mut a: TestAgent) {
    let mut seq = 0;
    loop {
        match a.recv_within(Duration::from_millis(300)).await {
            Ok(None) => return,
            Err(()) => {
                seq += 1;
                a.send(&AgentMsg::Heartbeat { seq, running: None }).await;
            }
            Ok(Some(ControllerMsg::Offer { step, work, .. })) => {
                a.send(&AgentMsg::Started { step }).await;
                let outcome = match work {
                    Step::Echo { text } => Outcome::Succeeded {
                        output: text,
                        inventory: None,
                    },
                    Step::Wait { .. } => Outcome::Failed {
                        reason: "no waiting today".into(),
                    },
                    _ => Outcome::Succeeded {
                        output: String::new(),
                        inventory: None,
                    },
                };
                a.send(&AgentMsg::Finished { step, outcome }).await;
                a.send(&AgentMsg::Log {
                    level: shoal_protocol::control::Level::Info,
                    text: format!("did job {} step {}", step.job, step.step),
                })
                .await;
            }
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_serve_and_shoalctl() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");

    // keys: the public key and the agent command line.
    let out = Command::new(CONTROLLER)
        .args(["keys", "--listen", "10.1.2.3:7000", "--state"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let public = lines[0].strip_prefix("controller public key: ").unwrap();
    let args: Vec<&str> = lines[1].split(' ').collect();
    assert_eq!(args[0], "shoal.controller=10.1.2.3:7000");
    assert_eq!(args[1], format!("shoal.controller_key={public}"));
    let psk = key_from_hex(args[2].strip_prefix("shoal.enrol_key=").unwrap()).unwrap();
    let key = key_from_hex(public).unwrap();

    // serve: wait for the ready lines.
    let mut child = Command::new(CONTROLLER)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state",
        ])
        .arg(&state)
        .env("SHOAL_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let serve = Serve(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("serve: {line}");
            let _ = tx.send(line);
        }
    });
    let mut saw_key = false;
    let (agents, admin) = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("serve never said it was listening");
        saw_key |= line.ends_with(&format!("INFO controller public key: {public}"));
        if let Some(rest) = line.split("INFO listening on ").nth(1) {
            let mut parts = rest.split(' ');
            let agents: SocketAddr = parts.next().unwrap().parse().unwrap();
            let admin = rest
                .split(", ")
                .nth(1)
                .unwrap()
                .trim_end_matches(" (admin)")
                .to_owned();
            break (agents, admin);
        }
    };
    assert!(
        saw_key,
        "the public key line comes before the listening line"
    );

    let st = state.clone();
    let adm = admin.clone();
    let ctl = move |args: &'static [&'static str]| {
        let (st, adm) = (st.clone(), adm.clone());
        tokio::task::spawn_blocking(move || shoalctl(&adm, &st, args))
    };

    let out = ctl(&["devices", "list"]).await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "ID  STATE  ENROLMENT  UUID  MAC  LAST SEEN  PEER"
    );

    // An agent connects and answers offers.
    let mut a = TestAgent::connect(agents, &key, &psk).await.unwrap();
    a.send(&common::hello("cli-uuid", 0x21)).await;
    assert!(matches!(a.recv().await, ControllerMsg::Welcome { .. }));
    let agent = tokio::spawn(answer(a));

    let out = ctl(&["devices", "list"]).await.unwrap();
    let list = text(&out.stdout);
    assert!(
        list.contains("ready")
            && list.contains("approved")
            && list.contains("cli-uuid")
            && list.contains("52:54:00:12:34:21"),
        "{list}"
    );

    let out = ctl(&[
        "jobs",
        "run",
        "--device",
        "all",
        "echo:hello",
        "inventory",
        "--wait",
        "20",
    ])
    .await
    .unwrap();
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    let id = shown.lines().next().unwrap().trim().to_owned();
    assert!(id.parse::<u64>().is_ok(), "{shown}");
    assert!(shown.contains(&format!("job {id}: succeeded")), "{shown}");
    // The echo text shows once per device: as the step's output.
    assert_eq!(shown.matches("hello").count(), 1, "{shown}");
    assert!(
        shown.contains("echo") && shown.contains("inventory"),
        "{shown}"
    );

    let out = ctl(&["--json", "jobs", "list"]).await.unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(jobs[0]["state"], "succeeded");

    // A failing job: exit status 1, and the reason in the table.
    let out = ctl(&[
        "jobs",
        "run",
        "--device",
        "cli-uuid",
        "wait:1",
        "echo:after",
        "--wait",
        "20",
    ])
    .await
    .unwrap();
    assert!(!out.status.success());
    let shown = text(&out.stdout);
    assert!(
        shown.contains("no waiting today") && shown.contains("an earlier step failed"),
        "{shown}"
    );
    assert!(
        text(&out.stderr).contains("failed"),
        "{}",
        text(&out.stderr)
    );

    let out = ctl(&["logs", "--device", "cli-uuid"]).await.unwrap();
    assert!(
        text(&out.stdout).contains("did job"),
        "{}",
        text(&out.stdout)
    );

    let out = ctl(&["devices", "show", "52:54:00:12:34:21"])
        .await
        .unwrap();
    assert!(
        text(&out.stdout).contains("eth0 52:54:00:12:34:21"),
        "{}",
        text(&out.stdout)
    );

    // Errors say what went wrong.
    let out = ctl(&["jobs", "run", "--device", "all", "format:c"])
        .await
        .unwrap();
    assert!(
        text(&out.stderr).starts_with("shoalctl: unknown step \"format:c\""),
        "{}",
        text(&out.stderr)
    );
    let out = ctl(&["jobs", "show", "999"]).await.unwrap();
    assert_eq!(text(&out.stderr).trim(), "shoalctl: 404: no job \"999\"");
    let out = tokio::task::spawn_blocking({
        let adm = admin.clone();
        move || {
            Command::new(SHOALCTL)
                .args([
                    "--url",
                    &format!("http://{adm}"),
                    "--token",
                    "nope",
                    "devices",
                    "list",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(text(&out.stderr).trim(), "shoalctl: 401: bad admin token");

    drop(serve);
    let out = ctl(&["devices", "list"]).await.unwrap();
    assert_eq!(
        text(&out.stderr).trim(),
        format!("shoalctl: cannot reach the controller at http://{admin}: connection refused")
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
}
