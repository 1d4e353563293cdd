//! The job model: a job is an ordered list of steps run on one or many
//! devices. Per device the steps run one at a time, in order; a step that
//! fails (or is cancelled) cancels the rest of that device's steps in the
//! job. A job's state follows from its steps' states ([`job_state`]).
//!
//! Steps are written as JSON in the admin API
//! (`{"kind":"echo","text":"hi"}`, `{"kind":"wait","secs":5}`,
//! `{"kind":"inventory"}`, `{"kind":"reboot"}`, `{"kind":"poweroff"}`,
//! `{"kind":"deploy","image":"lab/disk","disk":"auto"}`, each with an
//! optional `"timeout_secs"`) and as `echo:TEXT`, `wait:SECS`, `inventory`,
//! `reboot`, `poweroff`, `deploy:GROUP/NAME@SELECTOR` on `shoalctl`'s
//! command line.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_protocol::control::{Step, MAX_TEXT};

use crate::distribution::multicast::StepOptions;
use crate::model::{JobState, StepState};
use shoal_protocol::multicast::Cipher;

/// Most steps in one job.
pub const MAX_STEPS: usize = 100;
/// Longest `wait` step: a week.
pub const MAX_WAIT_SECS: u32 = 7 * 24 * 3600;
/// Longest step timeout: 30 days (fits the protocol's `u32` milliseconds).
pub const MAX_TIMEOUT_SECS: u32 = 30 * 24 * 3600;
/// Timeout of a step other than `wait` unless the job says otherwise.
pub const DEFAULT_TIMEOUT_SECS: u32 = 60;
/// A `wait SECS` step times out after `SECS` plus this.
pub const WAIT_GRACE_SECS: u32 = 30;
/// Timeout of a `deploy` step unless the job says otherwise: an hour.
pub const DEPLOY_TIMEOUT_SECS: u32 = 3600;

/// The work of one step, as the admin API and the database spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StepKind {
    Inventory,
    Wait {
        secs: u32,
    },
    Reboot,
    Poweroff,
    Echo {
        text: String,
    },
    /// Write image `GROUP/NAME` to the disk `disk` selects (`auto`,
    /// `serial=…`, `file=…`, ...; the agent parses it).
    Deploy {
        image: String,
        disk: String,
        /// Unicast, multicast, or multicast when the job has several
        /// devices (`auto`).
        #[serde(default, skip_serializing_if = "DeployMode::is_auto")]
        mode: DeployMode,
        #[serde(default, skip_serializing_if = "is_default")]
        multicast: StepOptions,
    },
}

/// How a deploy step gets its image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeployMode {
    #[default]
    Auto,
    Multicast,
    Unicast,
}

impl DeployMode {
    pub fn is_auto(&self) -> bool {
        *self == DeployMode::Auto
    }

    /// Whether a job on `devices` devices deploys by multicast.
    pub fn multicast(self, devices: usize) -> bool {
        match self {
            DeployMode::Auto => devices >= 2,
            DeployMode::Multicast => true,
            DeployMode::Unicast => false,
        }
    }
}

fn is_default(o: &StepOptions) -> bool {
    *o == StepOptions::default()
}

/// A step of a job: the work and, optionally, its own timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    #[serde(flatten)]
    pub work: StepKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("unknown step {0:?}: expected echo:TEXT, inventory, wait:SECS, reboot, poweroff or deploy:GROUP/NAME@DISK")]
    UnknownStep(String),
    #[error("step {0:?}: not a whole number of seconds")]
    BadSecs(String),
    #[error("echo step: text of {0} bytes exceeds the limit of {MAX_TEXT}")]
    TextTooLong(usize),
    #[error("wait step: {0} s exceeds the limit of {MAX_WAIT_SECS} s")]
    WaitTooLong(u32),
    #[error("step timeout of {0} s is outside 1..={MAX_TIMEOUT_SECS} s")]
    BadTimeout(u32),
    #[error("deploy step {0:?}: expected deploy:GROUP/NAME@DISK (DISK: auto, serial=S, wwn=W, name=N, path=P or file=F)")]
    BadDeploy(String),
    #[error("deploy option {0:?}: expected mode=auto|multicast|unicast, cipher=auto|chacha20poly1305|aes256gcm|rc4, min=N, wait=SECS or rate=MBPS")]
    BadDeployOption(String),
    #[error("a job needs at least one step")]
    NoSteps,
    #[error("a job has at most {MAX_STEPS} steps, not {0}")]
    TooManySteps(usize),
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Inventory => "inventory",
            StepKind::Wait { .. } => "wait",
            StepKind::Reboot => "reboot",
            StepKind::Poweroff => "poweroff",
            StepKind::Echo { .. } => "echo",
            StepKind::Deploy { .. } => "deploy",
        }
    }
}

impl StepSpec {
    pub fn new(work: StepKind) -> StepSpec {
        StepSpec {
            work,
            timeout_secs: None,
        }
    }

    /// Parses `shoalctl`'s form: `echo:TEXT`, `wait:SECS`, `inventory`,
    /// `reboot`, `poweroff`.
    pub fn parse_cli(s: &str) -> Result<StepSpec, JobError> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let work = match (kind, arg) {
            ("echo", Some(text)) => StepKind::Echo { text: text.into() },
            ("echo", None) => StepKind::Echo {
                text: String::new(),
            },
            ("wait", Some(secs)) => StepKind::Wait {
                secs: secs
                    .trim()
                    .parse()
                    .map_err(|_| JobError::BadSecs(s.into()))?,
            },
            ("inventory", None) => StepKind::Inventory,
            ("reboot", None) => StepKind::Reboot,
            ("poweroff", None) => StepKind::Poweroff,
            ("deploy", Some(arg)) => {
                let (image, rest) = arg
                    .split_once('@')
                    .ok_or_else(|| JobError::BadDeploy(s.into()))?;
                let mut parts = rest.split(';');
                let disk = parts.next().unwrap_or_default();
                let mut mode = DeployMode::Auto;
                let mut multicast = StepOptions::default();
                for opt in parts.map(str::trim).filter(|p| !p.is_empty()) {
                    let bad = || JobError::BadDeployOption(opt.into());
                    let (k, v) = opt.split_once('=').ok_or_else(bad)?;
                    let num = || v.trim().parse::<u32>().map_err(|_| bad());
                    match k.trim() {
                        "mode" => {
                            mode = match v.trim() {
                                "auto" => DeployMode::Auto,
                                "multicast" => DeployMode::Multicast,
                                "unicast" => DeployMode::Unicast,
                                _ => return Err(bad()),
                            }
                        }
                        "cipher" => {
                            multicast.cipher = match v.trim() {
                                "auto" => None,
                                c => Some(Cipher::parse(c).ok_or_else(bad)?),
                            }
                        }
                        "min" => multicast.min = Some(num()?),
                        "wait" => multicast.wait_secs = Some(num()?),
                        "rate" => multicast.rate_mbps = Some(num()?),
                        _ => return Err(bad()),
                    }
                }
                StepKind::Deploy {
                    image: image.trim().into(),
                    disk: disk.trim().into(),
                    mode,
                    multicast,
                }
            }
            _ => return Err(JobError::UnknownStep(s.into())),
        };
        let spec = StepSpec::new(work);
        spec.validate()?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), JobError> {
        match &self.work {
            StepKind::Echo { text } if text.len() > MAX_TEXT => {
                return Err(JobError::TextTooLong(text.len()))
            }
            StepKind::Wait { secs } if *secs > MAX_WAIT_SECS => {
                return Err(JobError::WaitTooLong(*secs))
            }
            StepKind::Deploy { image, disk, .. }
                if deploy_image(image).is_none() || disk.is_empty() || disk.len() > MAX_TEXT =>
            {
                return Err(JobError::BadDeploy(format!("deploy:{image}@{disk}")))
            }
            _ => {}
        }
        match self.timeout_secs {
            Some(t) if t == 0 || t > MAX_TIMEOUT_SECS => Err(JobError::BadTimeout(t)),
            _ => Ok(()),
        }
    }

    /// How long the step may take from its offer: its own timeout, else
    /// `wait` seconds plus 30 s, else 60 s.
    pub fn timeout(&self) -> Duration {
        let secs = self.timeout_secs.unwrap_or(match self.work {
            StepKind::Wait { secs } => secs.saturating_add(WAIT_GRACE_SECS),
            StepKind::Deploy { .. } => DEPLOY_TIMEOUT_SECS,
            _ => DEFAULT_TIMEOUT_SECS,
        });
        Duration::from_secs(u64::from(secs))
    }

    /// The work as the agent is offered it; `None` for a deploy, whose
    /// offer needs a distribution session (`session.rs` makes it).
    pub fn to_protocol(&self) -> Option<Step> {
        Some(match &self.work {
            StepKind::Inventory => Step::Inventory,
            StepKind::Wait { secs } => Step::Wait { secs: *secs },
            StepKind::Reboot => Step::Reboot,
            StepKind::Poweroff => Step::Poweroff,
            StepKind::Echo { text } => Step::Echo { text: text.clone() },
            StepKind::Deploy { .. } => return None,
        })
    }

    /// A short description for tables: `echo hello`, `wait 5`.
    pub fn describe(&self) -> String {
        match &self.work {
            StepKind::Wait { secs } => format!("wait {secs}"),
            StepKind::Echo { text } => format!("echo {text}"),
            StepKind::Deploy {
                image, disk, mode, ..
            } => match mode {
                DeployMode::Auto => format!("deploy {image} to disk={disk}"),
                DeployMode::Multicast => format!("deploy {image} to disk={disk} (multicast)"),
                DeployMode::Unicast => format!("deploy {image} to disk={disk} (unicast)"),
            },
            other => other.name().to_owned(),
        }
    }
}

/// `GROUP/NAME` split in two, if it is that.
pub fn deploy_image(image: &str) -> Option<(&str, &str)> {
    let (group, name) = image.split_once('/')?;
    (!group.is_empty() && !name.is_empty() && !name.contains('/')).then_some((group, name))
}

/// Checks a job's steps before it is stored.
pub fn validate_steps(steps: &[StepSpec]) -> Result<(), JobError> {
    if steps.is_empty() {
        return Err(JobError::NoSteps);
    }
    if steps.len() > MAX_STEPS {
        return Err(JobError::TooManySteps(steps.len()));
    }
    steps.iter().try_for_each(StepSpec::validate)
}

/// A job's state from its steps': running while any step runs or some but
/// not all have finished; queued while none has started; when all are
/// final, failed if any failed, else cancelled if any was, else succeeded.
pub fn job_state(states: impl IntoIterator<Item = StepState>) -> JobState {
    let (mut queued, mut running, mut done, mut failed, mut cancelled) = (0, 0, 0, 0, 0);
    for s in states {
        match s {
            StepState::Queued => queued += 1,
            StepState::Running => running += 1,
            StepState::Succeeded => done += 1,
            StepState::Failed => failed += 1,
            StepState::Cancelled => cancelled += 1,
        }
    }
    let finished = done + failed + cancelled;
    if running > 0 || (queued > 0 && finished > 0) {
        JobState::Running
    } else if queued > 0 || finished == 0 {
        JobState::Queued
    } else if failed > 0 {
        JobState::Failed
    } else if cancelled > 0 {
        JobState::Cancelled
    } else {
        JobState::Succeeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepState::*;

    #[test]
    fn cli_steps_parse() {
        assert_eq!(
            StepSpec::parse_cli("echo:hello world").unwrap().work,
            StepKind::Echo {
                text: "hello world".into()
            }
        );
        assert_eq!(
            StepSpec::parse_cli("echo:a:b").unwrap().work,
            StepKind::Echo { text: "a:b".into() }
        );
        assert_eq!(
            StepSpec::parse_cli("wait:5").unwrap().work,
            StepKind::Wait { secs: 5 }
        );
        assert_eq!(
            StepSpec::parse_cli("inventory").unwrap().work,
            StepKind::Inventory
        );
        assert!(matches!(
            StepSpec::parse_cli("wait:soon"),
            Err(JobError::BadSecs(_))
        ));
        assert!(matches!(
            StepSpec::parse_cli("reboot:now"),
            Err(JobError::UnknownStep(_))
        ));
        assert!(matches!(
            StepSpec::parse_cli("format"),
            Err(JobError::UnknownStep(_))
        ));
        let d = StepSpec::parse_cli("deploy:lab/disk@file=/tmp/x.img").unwrap();
        assert_eq!(
            d.work,
            StepKind::Deploy {
                image: "lab/disk".into(),
                disk: "file=/tmp/x.img".into(),
                mode: DeployMode::Auto,
                multicast: StepOptions::default(),
            }
        );
        let m = StepSpec::parse_cli(
            "deploy:lab/disk@serial=A;mode=multicast;cipher=rc4;min=3;wait=9;rate=50",
        )
        .unwrap();
        assert_eq!(
            m.work,
            StepKind::Deploy {
                image: "lab/disk".into(),
                disk: "serial=A".into(),
                mode: DeployMode::Multicast,
                multicast: StepOptions {
                    cipher: Some(Cipher::Rc4),
                    min: Some(3),
                    wait_secs: Some(9),
                    rate_mbps: Some(50),
                },
            }
        );
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<StepSpec>(&json).unwrap(), m);
        // `cipher=auto` is the default: the session picks.
        for (step, want) in [
            ("deploy:a/b@auto;cipher=auto", None),
            ("deploy:a/b@auto", None),
            ("deploy:a/b@auto;cipher=aes256gcm", Some(Cipher::Aes256Gcm)),
            (
                "deploy:a/b@auto;cipher=chacha20poly1305",
                Some(Cipher::ChaCha20Poly1305),
            ),
        ] {
            let StepKind::Deploy { multicast, .. } = StepSpec::parse_cli(step).unwrap().work else {
                panic!("{step}");
            };
            assert_eq!(multicast.cipher, want, "{step}");
        }
        for bad in [
            "deploy:a/b@auto;cipher=des",
            "deploy:a/b@auto;mode=x",
            "deploy:a/b@auto;min=x",
            "deploy:a/b@auto;foo=1",
            "deploy:a/b@auto;cipher",
        ] {
            assert!(
                matches!(StepSpec::parse_cli(bad), Err(JobError::BadDeployOption(_))),
                "{bad}"
            );
        }
        assert_eq!(d.timeout(), Duration::from_secs(3600));
        assert!(d.to_protocol().is_none());
        for bad in [
            "deploy:lab/disk",
            "deploy:disk@auto",
            "deploy:lab/disk@",
            "deploy",
        ] {
            assert!(StepSpec::parse_cli(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            StepSpec::parse_cli(&format!("echo:{}", "x".repeat(MAX_TEXT + 1))),
            Err(JobError::TextTooLong(_))
        ));
    }

    #[test]
    fn json_steps_and_timeouts() {
        let s: StepSpec = serde_json::from_str(r#"{"kind":"echo","text":"hi"}"#).unwrap();
        assert_eq!(s.work, StepKind::Echo { text: "hi".into() });
        assert_eq!(s.timeout(), Duration::from_secs(60));
        let s: StepSpec = serde_json::from_str(r#"{"kind":"wait","secs":5}"#).unwrap();
        assert_eq!(s.timeout(), Duration::from_secs(35));
        let s: StepSpec =
            serde_json::from_str(r#"{"kind":"wait","secs":5,"timeout_secs":1}"#).unwrap();
        assert_eq!(s.timeout(), Duration::from_secs(1));
        assert_eq!(
            serde_json::to_string(&StepSpec::new(StepKind::Inventory)).unwrap(),
            r#"{"kind":"inventory"}"#
        );
        assert!(serde_json::from_str::<StepSpec>(r#"{"kind":"format"}"#).is_err());
        assert!(serde_json::from_str::<StepSpec>(r#"{"kind":"wait"}"#).is_err());
        let bad = StepSpec {
            work: StepKind::Reboot,
            timeout_secs: Some(0),
        };
        assert_eq!(validate_steps(&[bad]), Err(JobError::BadTimeout(0)));
        assert_eq!(validate_steps(&[]), Err(JobError::NoSteps));
    }

    #[test]
    fn job_state_follows_the_steps() {
        assert_eq!(job_state([Queued, Queued]), JobState::Queued);
        assert_eq!(job_state([Running, Queued]), JobState::Running);
        assert_eq!(job_state([Succeeded, Queued]), JobState::Running);
        assert_eq!(job_state([Succeeded, Succeeded]), JobState::Succeeded);
        assert_eq!(job_state([Succeeded, Failed, Cancelled]), JobState::Failed);
        assert_eq!(job_state([Succeeded, Cancelled]), JobState::Cancelled);
        assert_eq!(job_state([Failed, Queued]), JobState::Running);
        assert_eq!(job_state([]), JobState::Queued);
    }
}
