//! One connected device, from its `Hello` to the end of the connection:
//! recognition and enrolment, `Welcome`, heartbeats, and the job engine's
//! per-device half (offer the next step, follow it to its end).
//!
//! Rules kept here:
//! - A pending device gets `Welcome{enrolment: Pending}` and no offers until
//!   an admin approves it.
//! - One step at a time: a step is offered when the device is approved,
//!   nothing is current, and the agent does not report another step
//!   running. It stays `queued` until the agent says `Started`. `Busy`
//!   leaves it queued and the offer is retried after a heartbeat period.
//! - A step that has not finished `timeout` after its offer fails ("timed
//!   out after Ns") and the agent is told to cancel it.
//! - Any message counts as a sign of life; silence for the heartbeat
//!   timeout ends the session ("no heartbeat for 5.0 s"). When the session
//!   ends for any reason, the step it started fails with
//!   "device disconnected: <why>" and the device goes offline (unless a
//!   newer connection of the same device replaced this one).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error, info, warn};
use shoal_protocol::control::{
    clip, AgentMsg, ControllerMsg, Hello, Level, Outcome, Step, StepRef,
};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::agents::log_conn_error;
use crate::channel::{Channel, ConnError};
use crate::db::{
    normal_macs, normal_uuid, DbError, Finish, Finished, HelloFacts, NextStep, Recognised,
};
use crate::distribution::multicast::{Join, Member};
use crate::error_chain;
use crate::jobs::{deploy_image, StepKind};
use crate::model::{DeviceState, EnrolmentState};
use crate::registry::Cmd;
use crate::server::Shared;
use crate::time::now_ms;

/// The step offered to the device and not yet finished.
#[derive(Debug)]
struct Current {
    step: StepRef,
    kind: &'static str,
    started: bool,
    cancel_requested: bool,
    deadline: Instant,
    timeout: Duration,
    /// A deploy's distribution session, revoked when the step ends here.
    grant: Option<[u8; 32]>,
    /// A multicast deploy's place in its session (leaves it when dropped).
    mcast: Option<crate::distribution::multicast::Member>,
}

enum Event {
    Msg(Box<Result<Option<AgentMsg>, ConnError>>),
    Cmd(Option<Cmd>),
    Silent,
    StepTimeout,
    Retry,
    Poll,
}

/// Why a session ends: for the "offline" log line and the running step's
/// failure reason. The line explaining it in detail is logged where it
/// happens.
type End = String;

struct Session {
    shared: Arc<Shared>,
    ch: Channel,
    device: i64,
    peer: SocketAddr,
    /// The Controller's address this agent connected to.
    local: SocketAddr,
    /// `device 3 (uuid) at 10.0.0.5:41000`, for log lines.
    who: String,
    approved: bool,
    current: Option<Current>,
    /// A step the agent reports running that is not `current` (one from
    /// before a reconnect, or one we gave up on): no offers meanwhile.
    agent_running: Option<StepRef>,
    last_msg: Instant,
    retry_at: Option<Instant>,
    /// Something changed that may let a step be offered: look (the
    /// database is not queried on every heartbeat).
    check_work: bool,
    /// When to look anyway, in case a nudge was missed.
    next_poll: Instant,
}

/// Sessions look for queued work at least this often.
pub const POLL: Duration = Duration::from_secs(10);

fn step_name(s: StepRef) -> String {
    format!("job {} step {}", s.job, s.step)
}

fn facts(hello: &Hello, agent_key: Option<String>, peer: SocketAddr) -> HelloFacts {
    HelloFacts {
        uuid: hello
            .identity
            .uuid
            .as_deref()
            .map(clip)
            .and_then(|u| normal_uuid(&u)),
        serial: hello
            .identity
            .serial
            .as_deref()
            .map(|s| clip(s.trim()))
            .filter(|s| !s.is_empty()),
        macs: normal_macs(&hello.identity.macs),
        inventory_json: serde_json::to_string(&hello.inventory).unwrap_or_else(|_| "{}".into()),
        agent_version: clip(&hello.agent_version),
        agent_key,
        peer: peer.to_string(),
    }
}

/// Runs a device's session after its `Hello`, until the connection ends.
pub async fn run(
    shared: Arc<Shared>,
    mut ch: Channel,
    peer: SocketAddr,
    local: SocketAddr,
    hello: Hello,
    agent_key: Option<String>,
) {
    let facts = facts(&hello, agent_key, peer);
    let ident = match (&facts.uuid, facts.macs.first()) {
        (Some(u), _) => u.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => {
            warn!("agent at {peer}: Hello has no SMBIOS UUID and no MAC address, so the device cannot be recognised; closing");
            let _ = ch
                .send(&ControllerMsg::Error {
                    text: "no SMBIOS UUID and no MAC address: cannot recognise this device".into(),
                })
                .await;
            return;
        }
    };
    let policy = shared.policy;
    let rec: Recognised = match shared
        .store
        .call(move |db| db.record_hello(&facts, policy, now_ms()))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            error!(
                "agent at {peer}: cannot record its Hello: {}",
                error_chain(&e)
            );
            return;
        }
    };
    let device = rec.id;
    if rec.new {
        info!(
            "new device {device} ({ident}) recorded, enrolment {}",
            rec.enrolment
        );
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sid = match shared
        .registry
        .register(device, peer, tx, &shared.store)
        .await
    {
        Ok(s) => s,
        Err(e) => {
            error!(
                "device {device} at {peer}: cannot register: {}",
                error_chain(&e)
            );
            return;
        }
    };
    let mut s = Session {
        shared: shared.clone(),
        ch,
        device,
        peer,
        local,
        who: format!("device {device} ({ident}) at {peer}"),
        approved: rec.enrolment == EnrolmentState::Approved,
        current: None,
        agent_running: hello.running,
        last_msg: Instant::now(),
        retry_at: None,
        check_work: true,
        next_poll: Instant::now() + POLL,
    };
    let end = s.serve(&mut rx, rec.enrolment).await;
    if let Some(cur) = &s.current {
        s.revoke(cur);
    }

    // Fail the step this session started, and only that one: a newer
    // session of the same device may already run the next.
    if let Some(cur) = s.current.take().filter(|c| c.started) {
        let finish = Finish::Failed {
            reason: format!("device disconnected: {end}"),
        };
        let (job, step) = (cur.step.job as i64, cur.step.step);
        match shared
            .store
            .call(move |db| db.finish_step(device, job, step, &finish, now_ms()))
            .await
        {
            Ok(Finished::Applied(state)) => {
                warn!("device {device}: job {job} step {step} failed: device disconnected: {end}");
                if state.is_final() {
                    info!("job {job} {state}");
                }
            }
            Ok(_) => {}
            Err(e) => error!(
                "device {device}: cannot fail job {job} step {step}: {}",
                error_chain(&e)
            ),
        }
    }
    match shared.registry.unregister(device, sid, &shared.store).await {
        Ok(true) => info!("device {device} offline: {end}"),
        Ok(false) => {
            info!("device {device}: connection from {peer} closed: {end}");
            shared.registry.send(device, Cmd::Kick).await;
        }
        Err(e) => error!(
            "device {device}: cannot mark it offline: {}",
            error_chain(&e)
        ),
    }
}

impl Session {
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        enrolment: EnrolmentState,
    ) -> End {
        let welcome = ControllerMsg::Welcome {
            device: self.device as u64,
            enrolment: enrolment.to_protocol(),
            heartbeat_ms: self.shared.heartbeat.as_millis() as u32,
            timeout_ms: self.shared.timeout.as_millis() as u32,
        };
        if let Err(e) = self.send(&welcome).await {
            return e;
        }
        info!("device {} online ({})", self.device, self.peer);
        if !self.approved {
            info!(
                "device {} is pending approval (shoalctl devices approve {})",
                self.device, self.device
            );
        }
        loop {
            if std::mem::take(&mut self.check_work) {
                if let Err(end) = self.offer_next().await {
                    return end;
                }
            }
            let silent_at = self.last_msg + self.shared.timeout;
            let step_deadline = self.current.as_ref().map(|c| c.deadline);
            let retry_at = self.retry_at;
            let far = Instant::now() + Duration::from_secs(86_400);
            let ev = tokio::select! {
                m = self.ch.recv() => Event::Msg(Box::new(m)),
                c = rx.recv() => Event::Cmd(c),
                _ = sleep_until(silent_at) => Event::Silent,
                _ = sleep_until(step_deadline.unwrap_or(far)), if step_deadline.is_some() => Event::StepTimeout,
                _ = sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => Event::Retry,
                _ = sleep_until(self.next_poll) => Event::Poll,
            };
            let r = match ev {
                Event::Msg(m) => match *m {
                    Ok(Some(m)) => self.on_message(m).await,
                    Ok(None) => Err("connection closed".into()),
                    Err(e) => {
                        log_conn_error(&self.who, &e);
                        Err(match e {
                            ConnError::Authentication => "frame failed authentication".into(),
                            other => error_chain(&other),
                        })
                    }
                },
                Event::Cmd(Some(c)) => self.on_command(c).await,
                Event::Cmd(None) => Err("dropped by the registry".into()),
                Event::Silent => {
                    let secs = self.shared.timeout.as_secs_f64();
                    warn!("{}: no heartbeat for {secs:.1} s; closing", self.who);
                    Err(format!("no heartbeat for {secs:.1} s"))
                }
                Event::StepTimeout => self.on_step_timeout().await,
                Event::Retry => {
                    self.retry_at = None;
                    self.check_work = true;
                    Ok(())
                }
                Event::Poll => {
                    self.next_poll = Instant::now() + POLL;
                    self.check_work = true;
                    Ok(())
                }
            };
            if let Err(end) = r {
                return end;
            }
        }
    }

    async fn send(&mut self, msg: &ControllerMsg) -> Result<(), End> {
        match self.ch.send(msg).await {
            Ok(()) => Ok(()),
            Err(e) => {
                log_conn_error(&self.who, &e);
                Err(error_chain(&e))
            }
        }
    }

    /// Runs a database call; a failure is logged and ends the session (the
    /// device reconnects and the Controller tries again).
    async fn db<T, F>(&self, f: F) -> Result<T, End>
    where
        T: Send + 'static,
        F: FnOnce(&mut crate::db::Db) -> Result<T, DbError> + Send + 'static,
    {
        self.shared.store.call(f).await.map_err(|e| {
            error!("{}: {}; closing", self.who, error_chain(&e));
            "controller database error".to_owned()
        })
    }

    async fn set_state(&self, state: DeviceState) -> Result<(), End> {
        let device = self.device;
        self.db(move |db| db.set_device_state(device, state)).await
    }

    async fn on_command(&mut self, c: Cmd) -> Result<(), End> {
        self.check_work = true;
        match c {
            Cmd::Kick => Ok(()),
            Cmd::Approved => {
                self.approved = true;
                info!("device {} approved", self.device);
                Ok(())
            }
            Cmd::Close(reason) => {
                info!("{}: closing: {reason}", self.who);
                Err(reason)
            }
            Cmd::CancelJob(job) => {
                let Some(cur) = self.current.as_mut().filter(|c| c.step.job as i64 == job) else {
                    return Ok(());
                };
                cur.cancel_requested = true;
                let step = cur.step;
                if !cur.started {
                    // It was only offered and is cancelled in the database;
                    // if the agent took it, Started is answered with Cancel.
                    if let Some(c) = self.current.take() {
                        self.revoke(&c);
                    }
                }
                info!(
                    "device {}: asking the agent to cancel {}",
                    self.device,
                    step_name(step)
                );
                self.send(&ControllerMsg::Cancel { step }).await
            }
        }
    }

    async fn on_message(&mut self, m: AgentMsg) -> Result<(), End> {
        self.last_msg = Instant::now();
        let device = self.device;
        self.shared.registry.seen(device, now_ms());
        match m {
            AgentMsg::Hello(_) => {
                warn!(
                    "{}: a second Hello on the same connection; closing",
                    self.who
                );
                Err("protocol error: a second Hello".into())
            }
            AgentMsg::Heartbeat { running, .. } => {
                let current = self.current.as_ref().map(|c| c.step);
                let was = self.agent_running;
                self.agent_running = running.filter(|r| Some(*r) != current);
                self.check_work |= was.is_some() && self.agent_running.is_none();
                Ok(())
            }
            AgentMsg::Started { step } => self.on_started(step).await,
            AgentMsg::Progress {
                step,
                done,
                total,
                text,
            } => {
                let mut text = clip(&text);
                if total > 0 {
                    text = format!("{text} ({done}/{total})");
                }
                debug!("device {device}: {}: {text}", step_name(step));
                let Ok(job) = i64::try_from(step.job) else {
                    return Ok(());
                };
                self.db(move |db| db.set_progress(device, job, step.step, &text))
                    .await
                    .map(|_| ())
            }
            AgentMsg::Finished { step, outcome } => self.on_finished(step, outcome).await,
            AgentMsg::Busy { offered, running } => {
                if self
                    .current
                    .as_ref()
                    .is_some_and(|c| c.step == offered && !c.started)
                {
                    if let Some(c) = self.current.take() {
                        self.revoke(&c);
                    }
                }
                self.agent_running = Some(running);
                let wait = self.shared.heartbeat.max(Duration::from_secs(1));
                self.retry_at = Some(Instant::now() + wait);
                info!(
                    "device {device} is busy with {}; {} stays queued, retrying in {:.1} s",
                    step_name(running),
                    step_name(offered),
                    wait.as_secs_f64()
                );
                Ok(())
            }
            AgentMsg::Log { level, text } => {
                let level = match level {
                    Level::Error => "error",
                    Level::Warn => "warn",
                    Level::Info => "info",
                    Level::Debug => "debug",
                };
                let text = clip(&text);
                debug!("device {device} says ({level}): {text}");
                self.db(move |db| db.add_log(Some(device), level, &text, now_ms()))
                    .await
            }
            AgentMsg::Error { text } => {
                let text = clip(&text);
                warn!("device {device} reports an error: {text}");
                self.db(move |db| db.add_log(Some(device), "error", &text, now_ms()))
                    .await
            }
        }
    }

    async fn on_started(&mut self, step: StepRef) -> Result<(), End> {
        let device = self.device;
        let offered = self
            .current
            .as_ref()
            .is_some_and(|c| c.step == step && !c.started);
        let job = i64::try_from(step.job).unwrap_or(-1);
        let started = offered
            && self
                .db(move |db| db.start_step(device, job, step.step, now_ms()))
                .await?;
        if started {
            if let Some(c) = self.current.as_mut() {
                c.started = true;
                info!("device {device}: {} ({}) started", step_name(step), c.kind);
            }
            return self.set_state(DeviceState::Busy).await;
        }
        info!(
            "device {device}: {} started, but it is not offered (cancelled or unknown); asking the agent to cancel it",
            step_name(step)
        );
        if offered {
            if let Some(c) = self.current.take() {
                self.revoke(&c);
            }
        }
        self.agent_running = Some(step);
        self.send(&ControllerMsg::Cancel { step }).await
    }

    async fn on_finished(&mut self, step: StepRef, outcome: Outcome) -> Result<(), End> {
        let device = self.device;
        let is_current = self.current.as_ref().is_some_and(|c| c.step == step);
        let kind = self
            .current
            .as_ref()
            .filter(|_| is_current)
            .map_or("", |c| c.kind);
        let requested = self
            .current
            .as_ref()
            .is_some_and(|c| is_current && c.cancel_requested);
        let mut inventory = None;
        let unconfirmed = self
            .current
            .as_ref()
            .filter(|_| is_current)
            .and_then(|c| c.mcast.as_ref())
            .filter(|m| !m.session.confirmed(m.receiver))
            .map(|m| (m.session.id, m.receiver));
        let finish = match outcome {
            Outcome::Succeeded { output, .. } if unconfirmed.is_some() => {
                let (id, r) = unconfirmed.unwrap_or_default();
                Finish::Failed {
                    reason: clip(&format!(
                        "the agent reported success, but multicast session {id:016x} never saw receiver {r} report the image complete: not trusted ({output})"
                    )),
                }
            }
            Outcome::Succeeded {
                output,
                inventory: inv,
            } => {
                inventory = inv.and_then(|i| serde_json::to_string(&i).ok());
                Finish::Succeeded {
                    output: clip(&output),
                }
            }
            Outcome::Failed { reason } => Finish::Failed {
                reason: clip(&reason),
            },
            Outcome::Cancelled => Finish::Cancelled {
                reason: if requested {
                    "cancelled on request".into()
                } else {
                    "cancelled by the agent".into()
                },
            },
        };
        if is_current {
            if let Some(c) = self.current.take() {
                self.revoke(&c);
            }
        }
        if self.agent_running == Some(step) {
            self.agent_running = None;
        }
        let Ok(job) = i64::try_from(step.job) else {
            info!(
                "{}: finished {}, which is not one of its steps; ignored",
                self.who,
                step_name(step)
            );
            return Ok(());
        };
        let f2 = finish.clone();
        let result = self
            .db(move |db| {
                let r = db.finish_step(device, job, step.step, &f2, now_ms())?;
                if let (Finished::Applied(_), Some(inv)) = (&r, inventory) {
                    db.set_inventory(device, &inv)?;
                }
                Ok(r)
            })
            .await?;
        let kind = if kind.is_empty() {
            String::new()
        } else {
            format!(" ({kind})")
        };
        match result {
            Finished::Applied(job_state) => {
                match &finish {
                    Finish::Succeeded { .. } => {
                        info!("device {device}: {}{kind} succeeded", step_name(step))
                    }
                    Finish::Failed { reason } => warn!(
                        "device {device}: {}{kind} failed: {reason}",
                        step_name(step)
                    ),
                    Finish::Cancelled { reason } => {
                        info!("device {device}: {}{kind} {reason}", step_name(step))
                    }
                }
                if job_state.is_final() {
                    info!("job {job} {job_state}");
                }
            }
            Finished::NotFound => info!(
                "{}: finished {}, which is not one of its steps; ignored",
                self.who,
                step_name(step)
            ),
            Finished::AlreadyFinal(s) => info!(
                "device {device}: {} finished after it had {s}; ignored",
                step_name(step)
            ),
        }
        if is_current {
            self.set_state(DeviceState::Ready).await?;
        }
        self.check_work = true;
        Ok(())
    }

    async fn on_step_timeout(&mut self) -> Result<(), End> {
        let Some(cur) = self.current.take() else {
            return Ok(());
        };
        self.revoke(&cur);
        let device = self.device;
        let secs = cur.timeout.as_secs();
        let reason = format!("timed out after {secs}s");
        warn!(
            "device {device}: {} ({}) timed out after {secs}s",
            step_name(cur.step),
            cur.kind
        );
        let job = cur.step.job as i64;
        let step = cur.step.step;
        let finish = Finish::Failed { reason };
        let r = self
            .db(move |db| db.finish_step(device, job, step, &finish, now_ms()))
            .await?;
        if let Finished::Applied(s) = r {
            if s.is_final() {
                info!("job {job} {s}");
            }
        }
        self.agent_running = Some(cur.step);
        self.set_state(DeviceState::Ready).await?;
        self.send(&ControllerMsg::Cancel { step: cur.step }).await
    }

    /// Offers the next queued step if the device can take one now.
    async fn offer_next(&mut self) -> Result<(), End> {
        if !self.approved
            || self.current.is_some()
            || self.agent_running.is_some()
            || self.retry_at.is_some_and(|t| t > Instant::now())
        {
            return Ok(());
        }
        self.retry_at = None;
        let device = self.device;
        let Some(next) = self.db(move |db| db.next_step(device)).await? else {
            return Ok(());
        };
        let step = StepRef {
            job: next.job as u64,
            step: next.step,
        };
        let timeout = Duration::from_millis(u64::from(next.timeout_ms));
        let (work, grant, mcast) = match next.spec.to_protocol() {
            Some(work) => (work, None, None),
            None => match self.grant_deploy(&next, timeout).await {
                Ok((work, session, member)) => (work, Some(session), member),
                Err(reason) => {
                    warn!(
                        "device {device}: {} ({}) failed: {reason}",
                        step_name(step),
                        next.spec.describe()
                    );
                    let (job, n) = (next.job, next.step);
                    let finish = Finish::Failed { reason };
                    if let Finished::Applied(s) = self
                        .db(move |db| db.finish_step(device, job, n, &finish, now_ms()))
                        .await?
                    {
                        if s.is_final() {
                            info!("job {job} {s}");
                        }
                    }
                    self.check_work = true;
                    return Ok(());
                }
            },
        };
        let offer = ControllerMsg::Offer {
            step,
            work,
            timeout_ms: next.timeout_ms,
        };
        if let Err(end) = self.send(&offer).await {
            if let Some(g) = grant {
                self.shared.distribution.revoke(&g);
            }
            return Err(end);
        }
        info!(
            "device {device}: offered {} ({})",
            step_name(step),
            next.spec.describe()
        );
        self.current = Some(Current {
            step,
            kind: next.spec.work.name(),
            started: false,
            cancel_requested: false,
            deadline: Instant::now() + timeout,
            timeout,
            grant,
            mcast,
        });
        Ok(())
    }

    /// Ends the distribution session of `cur`, if it is a deploy.
    fn revoke(&self, cur: &Current) {
        if let Some(g) = &cur.grant {
            if self.shared.distribution.revoke(g) {
                debug!(
                    "device {}: distribution session of {} revoked",
                    self.device,
                    step_name(cur.step)
                );
            }
        }
    }

    /// The offer for a deploy step: checks the job's creator may deploy the
    /// image, registers a fresh distribution session for it (expiring with
    /// the step's timeout) and names the service. `Err` is the step's
    /// failure reason.
    async fn grant_deploy(
        &self,
        next: &NextStep,
        timeout: Duration,
    ) -> Result<(Step, [u8; 32], Option<Member>), String> {
        let StepKind::Deploy {
            image,
            disk,
            mode,
            multicast,
        } = &next.spec.work
        else {
            return Err(format!("{} is not a deploy step", next.spec.describe()));
        };
        let Some((group, name)) = deploy_image(image) else {
            return Err(format!("image {image:?} is not GROUP/NAME"));
        };
        let store = self
            .shared
            .images
            .clone()
            .ok_or_else(|| "the Controller has no image store".to_owned())?;
        let (user, group, name) = (next.created_by.clone(), group.to_owned(), name.to_owned());
        let resolved =
            tokio::task::spawn_blocking(move || store.resolve_for_deploy(&user, &group, &name))
                .await
                .map_err(|e| format!("resolving image {image}: {e}"))?
                .map_err(|e| error_chain(&e))?;
        let session = crate::state::random_id().map_err(|e| error_chain(&e))?;
        let image_id = resolved.image.id;
        info!(
            "device {}: job {} step {}: serving image {image} ({}) to it",
            self.device,
            next.job,
            next.step,
            resolved.image.id_hex()
        );
        let expires = std::time::Instant::now() + timeout;
        let (job, step) = (next.job as u64, next.step);
        let ids = self
            .db(move |db| db.job_devices(job as i64))
            .await
            .map_err(|e| format!("reading job {job}'s devices: {e}"))?;
        let devices = ids.len();
        // Only the device that sets the session up needs the others' CPUs
        // (for `cipher=auto`).
        let devices_aes = mode.multicast(devices)
            && multicast.cipher.is_none()
            && !self.shared.multicast.has_session(job, step)
            && self
                .db(move |db| {
                    let mut aes = true;
                    for &id in &ids {
                        aes &= db
                            .device(id)?
                            .and_then(|d| d.inventory)
                            .and_then(|i| {
                                serde_json::from_value::<shoal_protocol::inventory::Inventory>(i)
                                    .ok()
                            })
                            .is_some_and(|i| i.cpus.aes);
                    }
                    Ok(aes)
                })
                .await
                .map_err(|e| format!("reading job {job}'s device inventories: {e}"))?;
        let (member, offer) = if mode.multicast(devices) {
            let image_arc = std::sync::Arc::new(resolved.image.clone());
            let (m, o) = self.shared.multicast.join(Join {
                job,
                step,
                device: self.device,
                devices: devices as u32,
                devices_aes,
                image_name: image,
                path: resolved.path.clone(),
                image: image_arc,
                options: multicast,
                local: self.local.ip(),
                expires,
            })?;
            (Some(m), Some(Box::new(o)))
        } else {
            (None, None)
        };
        self.shared
            .distribution
            .register(session, resolved.path, resolved.image, expires);
        let mut service = self.shared.distribution_addr;
        if service.ip().is_unspecified() {
            service.set_ip(self.local.ip());
        }
        Ok((
            Step::Deploy {
                image: image.clone(),
                disk: disk.clone(),
                service: service.to_string(),
                session,
                image_id,
                multicast: offer,
            },
            session,
            member,
        ))
    }
}
