//! The Controller's messages after `Welcome`, and the steps they start.
//!
//! One step runs at a time, on its own worker thread, so the connection can
//! drop and come back while it runs. An `Offer` while idle is answered
//! `Started` and run; while busy, `Busy` (or `Started` again if it is the
//! step already running, as after a reconnect). `Cancel` stops a `Wait`
//! (a `Deploy`, `deploy.rs`, only before it starts writing).
//! The worker's `Finished` goes out on whatever connection is current when
//! it ends; if there is none, it waits in `State::unsent` for the next one.
//! A power step is reported first; the connection loop powers off after.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use shoal_protocol::control::{clip, AgentMsg, ControllerMsg, Level, Outcome, Step, StepRef};
use shoal_protocol::inventory::human_bytes;
use shoal_protocol::Inventory;

use super::link::{Running, Shared, State, Unsent};
use crate::settings::PowerAction;

/// Stack of a step worker: steps do little on their own stack (a deploy's
/// buffers are on the heap).
const STACK: usize = 512 * 1024;
/// How often a `Wait` looks at its cancel flag.
const SLICE: Duration = Duration::from_millis(50);

/// Acts on one message from the Controller (the state lock is held).
pub(crate) fn handle(shared: &Arc<Shared>, st: &mut State, msg: ControllerMsg) {
    let who = &shared.who;
    match msg {
        ControllerMsg::Welcome { .. } => {
            debug!("{who}a second Welcome from the controller; ignored")
        }
        ControllerMsg::Offer {
            step,
            work,
            timeout_ms,
        } => offer(shared, st, step, work, timeout_ms),
        ControllerMsg::Cancel { step } => match &st.running {
            Some(r) if r.step == step => {
                info!("{who}{}: cancel requested", name(step));
                r.cancel.store(true, Ordering::SeqCst);
            }
            _ => debug!(
                "{who}{}: cancel for a step that is not running; ignored",
                name(step)
            ),
        },
        ControllerMsg::Error { text } => warn!("{who}controller says: {}", clip(&text)),
    }
}

/// `job J step S`.
pub(crate) fn name(step: StepRef) -> String {
    format!("job {} step {}", step.job, step.step)
}

fn offer(shared: &Arc<Shared>, st: &mut State, step: StepRef, work: Step, timeout_ms: u32) {
    let who = &shared.who;
    if let Some((action, _)) = st.stop {
        info!(
            "{who}{} offered while about to {action}; ignored",
            name(step)
        );
        return;
    }
    if let Some(running) = st.running_step() {
        if running == step {
            debug!("{who}{} offered again while it runs: started", name(step));
            let _ = st.send(&AgentMsg::Started { step });
        } else {
            info!(
                "{who}{} offered while {} runs: busy",
                name(step),
                name(running)
            );
            let _ = st.send(&AgentMsg::Busy {
                offered: step,
                running,
            });
        }
        return;
    }
    let cancel = Arc::new(AtomicBool::new(false));
    st.running = Some(Running {
        step,
        cancel: cancel.clone(),
    });
    let _ = st.send(&AgentMsg::Started { step });
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms.into()));
    let worker = shared.clone();
    let spawned = thread::Builder::new()
        .name(format!("step-{}-{}", step.job, step.step))
        .stack_size(STACK)
        .spawn(move || work_step(&worker, step, work, timeout, &cancel));
    if let Err(e) = spawned {
        st.running = None;
        let reason = format!("cannot start a thread for the step: {e}");
        error!("{who}{}: {reason}", name(step));
        let outcome = Outcome::Failed { reason };
        let _ = st.send(&AgentMsg::Finished { step, outcome });
    }
}

/// Runs one step on its worker thread and reports how it ended.
fn work_step(
    shared: &Shared,
    step: StepRef,
    work: Step,
    timeout: Option<Duration>,
    cancel: &AtomicBool,
) {
    let who = &shared.who;
    let kind = work.kind();
    let line = format!("running {kind} for {}", name(step));
    info!("{who}{line}");
    let _ = shared.send(&AgentMsg::Log {
        level: Level::Info,
        text: line,
    });
    let (outcome, power) = match work {
        Step::Echo { text } => (succeeded(clip(&text), None), None),
        Step::Wait { secs } => (wait(shared, step, secs, timeout, cancel), None),
        Step::Inventory => {
            let inv = shared.hooks.inventory();
            shared.lock().inventory = inv.clone();
            (succeeded(summary(&inv), Some(inv)), None)
        }
        Step::Poweroff => (
            succeeded("powering off".into(), None),
            Some(PowerAction::Poweroff),
        ),
        Step::Reboot => (
            succeeded("rebooting".into(), None),
            Some(PowerAction::Reboot),
        ),
        Step::Deploy {
            image,
            disk,
            service,
            session,
            image_id,
            multicast,
        } => {
            let order = super::deploy::Order {
                image: &image,
                disk: &disk,
                service: &service,
                session,
                image_id,
                multicast,
            };
            let root = shared.hooks.root();
            (super::deploy::run(shared, step, &root, order, cancel), None)
        }
    };
    match &outcome {
        Outcome::Succeeded { output, .. } => {
            info!("{who}{} ({kind}) succeeded: {output}", name(step))
        }
        Outcome::Failed { reason } => warn!("{who}{} ({kind}) failed: {reason}", name(step)),
        Outcome::Cancelled => info!("{who}{} ({kind}) cancelled", name(step)),
    }
    finish(shared, step, outcome, power);
}

fn succeeded(output: String, inventory: Option<Inventory>) -> Outcome {
    Outcome::Succeeded { output, inventory }
}

/// Reports the end of a step, now or on the next connection; a power step
/// then asks the connection loop to power off.
fn finish(shared: &Shared, step: StepRef, outcome: Outcome, power: Option<PowerAction>) {
    let mut st = shared.lock();
    if st.running_step() == Some(step) {
        st.running = None;
    }
    let msg = AgentMsg::Finished { step, outcome };
    match st.send(&msg) {
        Ok(()) | Err(Unsent::Dropped) => {}
        Err(Unsent::NotConnected | Unsent::Lost) => {
            info!(
                "{}{} ended while the controller is unreachable; reporting it after reconnecting",
                shared.who,
                name(step)
            );
            st.unsent = Some(msg);
        }
    }
    if let Some(action) = power {
        st.stop = Some((action, Instant::now()));
    }
    drop(st);
    shared.notify();
}

/// Sleeps `secs` in slices, reporting progress each second; stops early on
/// cancel or at the offer's timeout.
fn wait(
    shared: &Shared,
    step: StepRef,
    secs: u32,
    timeout: Option<Duration>,
    cancel: &AtomicBool,
) -> Outcome {
    let total = Duration::from_secs(secs.into());
    let start = Instant::now();
    let mut reported = None;
    loop {
        let elapsed = start.elapsed();
        if cancel.load(Ordering::SeqCst) {
            let text = format!(
                "cancelled wait for {} after {} s",
                name(step),
                elapsed.as_secs()
            );
            let _ = shared.send(&AgentMsg::Log {
                level: Level::Info,
                text,
            });
            return Outcome::Cancelled;
        }
        if elapsed >= total {
            return succeeded(format!("waited {secs}s"), None);
        }
        if let Some(t) = timeout.filter(|t| elapsed >= *t) {
            return Outcome::Failed {
                reason: format!(
                    "timed out after {:.1} s (the offer's timeout)",
                    t.as_secs_f64()
                ),
            };
        }
        let done = elapsed.as_secs();
        if reported != Some(done) {
            reported = Some(done);
            let _ = shared.send(&AgentMsg::Progress {
                step,
                done,
                total: secs.into(),
                text: format!("waited {done}s of {secs}s"),
            });
        }
        thread::sleep(SLICE.min(total - elapsed));
    }
}

/// `4 CPUs, 2.0 GiB memory, 2 NICs, 1 disks`.
fn summary(inv: &Inventory) -> String {
    let mem = inv
        .memory_bytes
        .map(human_bytes)
        .unwrap_or_else(|| "unknown".into());
    format!(
        "{} CPUs, {mem} memory, {} NICs, {} disks",
        inv.cpus.count,
        inv.nics.len(),
        inv.disks.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::link::{Conn, Wire};
    use crate::control::{Hooks, Stats};
    use shoal_protocol::channel::{respond, Initiator, Keypair, Transport};
    use shoal_protocol::control::decode;
    use shoal_protocol::frame::Decoder;
    use std::io::{self, Write};
    use std::net::Shutdown;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// Frames written to a channel instead of a socket.
    struct ChanWire(Sender<Vec<u8>>);

    impl Write for ChanWire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .send(buf.to_vec())
                .map_err(|_| io::ErrorKind::BrokenPipe)?;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Wire for ChanWire {
        fn shutdown(&mut self, _: Shutdown) {}
    }

    struct FakeHooks;

    impl Hooks for FakeHooks {
        fn inventory(&self) -> Inventory {
            let mut inv = Inventory::default();
            inv.cpus.count = 3;
            inv.memory_bytes = Some(1 << 30);
            inv
        }
        fn power(&self, _: PowerAction) {}
    }

    /// The controller's end of a fake connection.
    struct Controller {
        rx: Receiver<Vec<u8>>,
        dec: Decoder,
        transport: Transport,
    }

    impl Controller {
        fn next(&mut self) -> AgentMsg {
            loop {
                if let Some(f) = self.dec.next_frame().unwrap() {
                    return decode(&self.transport.open(&f).unwrap()).unwrap();
                }
                let bytes = self
                    .rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("a message from the agent");
                self.dec.push(&bytes);
            }
        }

        /// The next message that is not a `Log` or `Progress`.
        fn next_main(&mut self) -> AgentMsg {
            loop {
                match self.next() {
                    AgentMsg::Log { .. } | AgentMsg::Progress { .. } => continue,
                    m => return m,
                }
            }
        }
    }

    fn connect(shared: &Shared) -> Controller {
        let (agent, ctl, psk) = (
            Keypair::generate().unwrap(),
            Keypair::generate().unwrap(),
            [5u8; 32],
        );
        let (init, m1) = Initiator::start(&agent, &ctl.public, &psk).unwrap();
        let (transport, m2) = respond(&ctl, &psk, &m1).unwrap();
        let (tx, rx) = channel();
        let conn = Conn {
            addr: "test".into(),
            out: Box::new(ChanWire(tx)),
            transport: init.finish(&m2).unwrap(),
        };
        shared.lock().publish(conn);
        Controller {
            rx,
            dec: Decoder::new(),
            transport,
        }
    }

    fn agent() -> (Arc<Shared>, Controller) {
        let shared = Arc::new(Shared::new(
            String::new(),
            Box::new(FakeHooks),
            Arc::new(Stats::default()),
            Inventory::default(),
        ));
        let ctl = connect(&shared);
        (shared, ctl)
    }

    fn deliver(shared: &Arc<Shared>, msg: ControllerMsg) {
        let mut st = shared.lock();
        handle(shared, &mut st, msg);
    }

    fn offer(shared: &Arc<Shared>, step: StepRef, work: Step, timeout_ms: u32) {
        deliver(
            shared,
            ControllerMsg::Offer {
                step,
                work,
                timeout_ms,
            },
        );
    }

    const S1: StepRef = StepRef { job: 1, step: 0 };
    const S2: StepRef = StepRef { job: 2, step: 3 };

    #[test]
    fn echo_runs_and_logs() {
        let (sh, mut ctl) = agent();
        offer(
            &sh,
            S1,
            Step::Echo {
                text: "hi there".into(),
            },
            0,
        );
        assert_eq!(ctl.next(), AgentMsg::Started { step: S1 });
        assert_eq!(
            ctl.next(),
            AgentMsg::Log {
                level: Level::Info,
                text: "running echo for job 1 step 0".into()
            }
        );
        assert_eq!(
            ctl.next(),
            AgentMsg::Finished {
                step: S1,
                outcome: succeeded("hi there".into(), None)
            }
        );
        assert!(sh.lock().running.is_none());
    }

    #[test]
    fn busy_while_waiting_then_cancel() {
        let (sh, mut ctl) = agent();
        offer(&sh, S1, Step::Wait { secs: 30 }, 0);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S1 });
        offer(&sh, S2, Step::Echo { text: "x".into() }, 0);
        assert_eq!(
            ctl.next_main(),
            AgentMsg::Busy {
                offered: S2,
                running: S1
            }
        );
        offer(&sh, S1, Step::Wait { secs: 30 }, 0);
        assert_eq!(
            ctl.next_main(),
            AgentMsg::Started { step: S1 },
            "a re-offer of the running step"
        );
        deliver(&sh, ControllerMsg::Cancel { step: S2 });
        deliver(&sh, ControllerMsg::Cancel { step: S1 });
        assert_eq!(
            ctl.next_main(),
            AgentMsg::Finished {
                step: S1,
                outcome: Outcome::Cancelled
            }
        );
        offer(&sh, S2, Step::Echo { text: "x".into() }, 0);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S2 });
        assert!(matches!(
            ctl.next_main(),
            AgentMsg::Finished { step: S2, .. }
        ));
    }

    #[test]
    fn wait_reports_progress_and_succeeds() {
        let (sh, mut ctl) = agent();
        offer(&sh, S1, Step::Wait { secs: 1 }, 0);
        assert_eq!(ctl.next(), AgentMsg::Started { step: S1 });
        assert!(matches!(ctl.next(), AgentMsg::Log { .. }));
        assert!(matches!(
            ctl.next(),
            AgentMsg::Progress {
                step: S1,
                done: 0,
                total: 1,
                ..
            }
        ));
        assert_eq!(
            ctl.next(),
            AgentMsg::Finished {
                step: S1,
                outcome: succeeded("waited 1s".into(), None)
            }
        );
    }

    #[test]
    fn wait_stops_at_the_offers_timeout() {
        let (sh, mut ctl) = agent();
        let t = Instant::now();
        offer(&sh, S1, Step::Wait { secs: 30 }, 150);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S1 });
        match ctl.next_main() {
            AgentMsg::Finished {
                outcome: Outcome::Failed { reason },
                ..
            } => assert!(reason.contains("timed out"), "{reason}"),
            m => panic!("{m:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn inventory_step_sends_and_keeps_the_new_inventory() {
        let (sh, mut ctl) = agent();
        offer(&sh, S1, Step::Inventory, 0);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S1 });
        match ctl.next_main() {
            AgentMsg::Finished {
                outcome:
                    Outcome::Succeeded {
                        output,
                        inventory: Some(inv),
                    },
                ..
            } => {
                assert_eq!(output, "3 CPUs, 1.0 GiB memory, 0 NICs, 0 disks");
                assert_eq!(inv.cpus.count, 3);
            }
            m => panic!("{m:?}"),
        }
        assert_eq!(
            sh.lock().inventory.cpus.count,
            3,
            "the next Hello carries it"
        );
    }

    #[test]
    fn finished_while_disconnected_goes_out_on_the_next_connection() {
        let (sh, mut ctl) = agent();
        offer(&sh, S1, Step::Wait { secs: 30 }, 0);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S1 });
        sh.lock().conn = None;
        deliver(&sh, ControllerMsg::Cancel { step: S1 });
        let t = Instant::now();
        while sh.lock().unsent.is_none() {
            assert!(t.elapsed() < Duration::from_secs(5));
            thread::sleep(Duration::from_millis(10));
        }
        assert!(sh.lock().running.is_none());
        let mut ctl = connect(&sh);
        assert_eq!(
            ctl.next(),
            AgentMsg::Finished {
                step: S1,
                outcome: Outcome::Cancelled
            }
        );
        assert!(sh.lock().unsent.is_none());
    }

    #[test]
    fn poweroff_reports_first_and_then_asks_to_stop() {
        let (sh, mut ctl) = agent();
        offer(&sh, S1, Step::Poweroff, 0);
        assert_eq!(ctl.next_main(), AgentMsg::Started { step: S1 });
        assert_eq!(
            ctl.next_main(),
            AgentMsg::Finished {
                step: S1,
                outcome: succeeded("powering off".into(), None)
            }
        );
        assert_eq!(sh.lock().stop.map(|s| s.0), Some(PowerAction::Poweroff));
        offer(&sh, S2, Step::Echo { text: "x".into() }, 0);
        assert!(
            ctl.rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "no more steps"
        );
    }
}
