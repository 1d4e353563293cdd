//! A time-bounded random and mutation fuzzer for the control channel's
//! parsers: the frame decoder (with random split points), the message
//! decoder for both directions, and Noise transport `open` on a live
//! session. Inputs are pure noise, valid frame streams with bytes flipped,
//! inserted or cut, and valid messages mutated the same way. Any panic
//! aborts the run; the report counts executions.
//!
//! `cargo xtask fuzz --seconds 300` runs it in release mode. (Stable Rust
//! only on our machines, so this is not `cargo fuzz`/libFuzzer: no coverage
//! feedback, but structure-aware seeds.)

use std::time::{Duration, Instant};

use shoal_protocol::channel::{respond, Initiator, Keypair};
use shoal_protocol::control::{
    self, AgentMsg, ControllerMsg, Hello, Identity, Outcome, Step, StepRef,
};
use shoal_protocol::frame;
use shoal_protocol::inventory::{Disk, Inventory, MacAddr, Nic};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let inv = Inventory {
        nics: vec![Nic {
            name: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 1]),
            ..Nic::default()
        }],
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: 1 << 30,
            logical_sector: 512,
            physical_sector: 512,
            ..Disk::default()
        }],
        ..Inventory::default()
    };
    let s = StepRef { job: 7, step: 1 };
    let agent = [
        AgentMsg::Hello(Hello {
            agent_version: "0.1.0".into(),
            boot_id: 3,
            identity: Identity {
                uuid: Some("u".into()),
                serial: Some("s".into()),
                macs: vec![MacAddr([2, 0, 0, 0, 0, 1])],
            },
            inventory: inv.clone(),
            running: Some(s),
        }),
        AgentMsg::Heartbeat {
            seq: 9,
            running: None,
        },
        AgentMsg::Finished {
            step: s,
            outcome: Outcome::Succeeded {
                output: "ok".into(),
                inventory: Some(inv),
            },
        },
        AgentMsg::Progress {
            step: s,
            done: 1,
            total: 2,
            text: "half".into(),
        },
    ];
    let ctl = [
        ControllerMsg::Offer {
            step: s,
            work: Step::Echo { text: "hi".into() },
            timeout_ms: 9,
        },
        ControllerMsg::Welcome {
            device: 1,
            enrolment: control::Enrolment::Pending,
            heartbeat_ms: 1,
            timeout_ms: 2,
        },
    ];
    agent
        .iter()
        .map(|m| control::encode(m).unwrap())
        .chain(ctl.iter().map(|m| control::encode(m).unwrap()))
        .collect()
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let n = 1 + rng.below(8);
                let extra = rng.bytes(n);
                v.splice(i..i, extra);
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                v.truncate(i);
            }
            _ => {
                let i = rng.below(v.len() + 1);
                v.splice(i..i, [0xff, 0xff, 0xff, 0xff]);
            }
        }
    }
    v
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut seconds = 10u64;
    let mut seed = 0x5ea1_5ea1_u64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--seed" => seed = args.next().and_then(|s| s.parse().ok()).expect("--seed N"),
            other => panic!("unknown argument {other}"),
        }
    }
    let mut rng = Rng(seed | 1);
    let seeds = seeds();
    let (agent, ctl, psk) = (
        Keypair::generate().unwrap(),
        Keypair::generate().unwrap(),
        [9u8; 32],
    );
    let (init, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
    let (mut server, m2) = respond(&ctl, &psk, &m1).unwrap();
    let mut client = init.finish(&m2).unwrap();

    let start = Instant::now();
    let limit = Duration::from_secs(seconds);
    let mut last_report = start;
    let (mut execs, mut frames, mut decoded, mut opened) = (0u64, 0u64, 0u64, 0u64);
    while start.elapsed() < limit {
        let input = match rng.below(4) {
            0 => {
                let n = rng.below(300);
                rng.bytes(n)
            }
            1 => {
                let seed = seeds[rng.below(seeds.len())].clone();
                mutate(&mut rng, seed)
            }
            2 => {
                let mut stream = Vec::new();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(seeds.len());
                    frame::encode(&seeds[i], &mut stream).unwrap();
                }
                mutate(&mut rng, stream)
            }
            _ => {
                // A valid sealed message, mutated: must fail authentication, not panic.
                let i = rng.below(seeds.len());
                let sealed = client.seal(&seeds[i]).unwrap();
                let m = mutate(&mut rng, sealed.clone());
                if server.open(&m).is_ok() && m != sealed {
                    opened += 1;
                }
                // Keep the pair in step after a failed open: a fresh session.
                let (init, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
                let (s2, m2) = respond(&ctl, &psk, &m1).unwrap();
                client = init.finish(&m2).unwrap();
                server = s2;
                m
            }
        };
        let mut dec = frame::Decoder::new();
        let cut = rng.below(input.len() + 1);
        for part in [&input[..cut], &input[cut..]] {
            dec.push(part);
            while let Ok(Some(body)) = dec.next_frame() {
                frames += 1;
                decoded += control::decode::<AgentMsg>(&body).is_ok() as u64;
                decoded += control::decode::<ControllerMsg>(&body).is_ok() as u64;
            }
        }
        decoded += control::decode::<AgentMsg>(&input).is_ok() as u64;
        decoded += control::decode::<ControllerMsg>(&input).is_ok() as u64;
        execs += 1;
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            eprintln!(
                "fuzz: {execs} executions after {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "fuzz: {execs} executions in {secs:.0} s ({:.0}/s), {frames} frames decoded, {decoded} messages accepted, {opened} tampered transport messages accepted, 0 panics",
        execs as f64 / secs
    );
    assert_eq!(
        opened, 0,
        "a mutated transport message passed authentication"
    );
}
