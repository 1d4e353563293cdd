//! The admin API's JSON bodies, shared by the server (`admin.rs`) and the
//! client (`client.rs`, `shoalctl`). Times are RFC 3339 strings in UTC.
//! Endpoints are listed in `admin.rs` and `docs/controller.md`.

use serde::{Deserialize, Serialize};

use crate::jobs::StepSpec;
use crate::model::{DeviceState, EnrolmentState, JobState, StepState};

/// A device record. `inventory` is only in `GET /v1/devices/{device}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: i64,
    pub uuid: Option<String>,
    pub serial: Option<String>,
    pub macs: Vec<String>,
    pub state: DeviceState,
    pub enrolment: EnrolmentState,
    pub last_seen: Option<String>,
    pub last_peer: Option<String>,
    /// The agent's static public key from its latest handshake (hex).
    pub agent_key: Option<String>,
    pub agent_version: Option<String>,
    pub assigned_image: Option<String>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory: Option<serde_json::Value>,
}

/// How many of a job's device×step entries are in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCounts {
    pub queued: u32,
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub cancelled: u32,
}

impl StepCounts {
    pub fn add(&mut self, state: StepState, n: u32) {
        let slot = match state {
            StepState::Queued => &mut self.queued,
            StepState::Running => &mut self.running,
            StepState::Succeeded => &mut self.succeeded,
            StepState::Failed => &mut self.failed,
            StepState::Cancelled => &mut self.cancelled,
        };
        *slot += n;
    }
}

/// A job. `results` (one entry per device × step) is only in
/// `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub created_at: String,
    pub created_by: String,
    pub state: JobState,
    pub steps: Vec<StepSpec>,
    pub devices: Vec<i64>,
    pub counts: StepCounts,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<StepResult>,
}

/// One step of a job on one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub device: i64,
    /// Index in the job's `steps`, from 0.
    pub step: u32,
    pub spec: StepSpec,
    pub state: StepState,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// The latest progress text the agent sent.
    pub progress: Option<String>,
    pub output: Option<String>,
    pub reason: Option<String>,
}

/// `POST /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// `"all"` (every approved device), device ids, SMBIOS UUIDs or MACs.
    pub devices: Vec<String>,
    pub steps: Vec<StepSpec>,
    #[serde(default)]
    pub created_by: Option<String>,
}

/// `POST /v1/jobs/{id}/cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancelled {
    pub job: u64,
    /// Queued steps now cancelled.
    pub cancelled: u32,
    /// Running steps whose agents were asked to stop; they end when the
    /// agent reports (or times out).
    pub stopping: u32,
}

/// An agent's log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub id: i64,
    pub device: Option<i64>,
    pub time: String,
    pub level: String,
    pub text: String,
}

/// `GET /v1/health` (no token needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub public_key: String,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
