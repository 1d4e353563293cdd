//! Jobs and their per-device steps: creation, the next step a device
//! should be offered, and the transitions the job engine makes
//! (queued → running → succeeded / failed / cancelled). A step that fails
//! or is cancelled cancels the later queued steps of that device in that
//! job. Every transition recomputes the job's stored state.

use rusqlite::{params, Connection, OptionalExtension};

use super::{json_col, time_col, Ctx, Db, DbError};
use crate::api::{Job, StepCounts, StepResult};
use crate::jobs::{job_state, StepSpec};
use crate::model::{JobState, StepState};

/// The step a device should be offered next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextStep {
    pub job: i64,
    pub step: u32,
    pub spec: StepSpec,
    pub timeout_ms: u32,
    /// The user who created the job (a deploy runs with their rights).
    pub created_by: String,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Succeeded { output: String },
    Failed { reason: String },
    Cancelled { reason: String },
}

/// What `cancel_job` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobCancel {
    /// Queued steps now cancelled.
    pub cancelled: u32,
    /// Running steps as (device, step), for the caller to stop.
    pub running: Vec<(i64, u32)>,
}

/// What `finish_step` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Recorded; the job is now in this state.
    Applied(JobState),
    /// No such step for this device.
    NotFound,
    /// The step had already ended in this state; nothing changed.
    AlreadyFinal(StepState),
}

impl Finish {
    fn state(&self) -> StepState {
        match self {
            Finish::Succeeded { .. } => StepState::Succeeded,
            Finish::Failed { .. } => StepState::Failed,
            Finish::Cancelled { .. } => StepState::Cancelled,
        }
    }
}

pub(super) fn refresh_job_state(conn: &Connection, job: i64) -> Result<JobState, DbError> {
    let mut st = conn
        .prepare_cached("SELECT state FROM job_steps WHERE job = ?1")
        .ctx("read a job's steps")?;
    let states = st
        .query_map([job], |r| r.get::<_, StepState>(0))
        .ctx("read a job's steps")?
        .collect::<Result<Vec<_>, _>>()
        .ctx("read a job's steps")?;
    let state = job_state(states);
    conn.execute(
        "UPDATE jobs SET state = ?2 WHERE id = ?1",
        params![job, state],
    )
    .ctx("update a job's state")?;
    Ok(state)
}

fn finish_in(
    conn: &Connection,
    device: i64,
    job: i64,
    step: u32,
    finish: &Finish,
    now: i64,
) -> Result<Finished, DbError> {
    let current: Option<StepState> = conn
        .query_row(
            "SELECT state FROM job_steps WHERE job = ?1 AND device = ?2 AND step = ?3",
            params![job, device, step],
            |r| r.get(0),
        )
        .optional()
        .ctx("read a step's state")?;
    match current {
        None => return Ok(Finished::NotFound),
        Some(s) if s.is_final() => return Ok(Finished::AlreadyFinal(s)),
        Some(_) => {}
    }
    let (output, reason) = match finish {
        Finish::Succeeded { output } => (Some(output.as_str()), None),
        Finish::Failed { reason } | Finish::Cancelled { reason } => (None, Some(reason.as_str())),
    };
    conn.execute(
        "UPDATE job_steps SET state = ?4, output = ?5, reason = ?6, finished_at = ?7,
            started_at = COALESCE(started_at, ?7)
         WHERE job = ?1 AND device = ?2 AND step = ?3",
        params![job, device, step, finish.state(), output, reason, now],
    )
    .ctx("finish a step")?;
    let rest = match finish {
        Finish::Succeeded { .. } => None,
        Finish::Failed { .. } => Some("an earlier step failed"),
        Finish::Cancelled { .. } => Some("an earlier step was cancelled"),
    };
    if let Some(reason) = rest {
        conn.execute(
            "UPDATE job_steps SET state = 'cancelled', reason = ?4, finished_at = ?5
             WHERE job = ?1 AND device = ?2 AND step > ?3 AND state = 'queued'",
            params![job, device, step, reason, now],
        )
        .ctx("cancel the steps after a failed one")?;
    }
    Ok(Finished::Applied(refresh_job_state(conn, job)?))
}

fn running_steps(conn: &Connection, device: Option<i64>) -> Result<Vec<(i64, i64, u32)>, DbError> {
    let mut st = conn
        .prepare(
            "SELECT device, job, step FROM job_steps
             WHERE state = 'running' AND (?1 IS NULL OR device = ?1) ORDER BY job, step",
        )
        .ctx("find running steps")?;
    let rows = st
        .query_map([device], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .ctx("find running steps")?;
    rows.collect::<Result<_, _>>().ctx("find running steps")
}

fn step_result(row: &rusqlite::Row<'_>) -> rusqlite::Result<StepResult> {
    Ok(StepResult {
        device: row.get(0)?,
        step: row.get(1)?,
        spec: json_col(row, 2)?,
        state: row.get(3)?,
        started_at: time_col(row, 4)?,
        finished_at: time_col(row, 5)?,
        progress: row.get(6)?,
        output: row.get(7)?,
        reason: row.get(8)?,
    })
}

impl Db {
    /// Stores a job: every step queued on every device. Steps and devices
    /// are checked by the caller.
    pub fn create_job(
        &mut self,
        created_by: &str,
        steps: &[StepSpec],
        devices: &[i64],
        now: i64,
    ) -> Result<u64, DbError> {
        let tx = self.conn.transaction().ctx("begin creating a job")?;
        let steps_json = serde_json::to_string(steps).map_err(|source| DbError::Json {
            what: "job steps",
            source,
        })?;
        tx.execute(
            "INSERT INTO jobs (created_at, created_by, steps, state) VALUES (?1, ?2, ?3, 'queued')",
            params![now, created_by, steps_json],
        )
        .ctx("create a job")?;
        let job = tx.last_insert_rowid();
        {
            let mut st = tx
                .prepare(
                    "INSERT INTO job_steps (job, device, step, kind, args, timeout_ms, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued')",
                )
                .ctx("queue a job's steps")?;
            for &device in devices {
                for (i, spec) in steps.iter().enumerate() {
                    let args = serde_json::to_string(spec).map_err(|source| DbError::Json {
                        what: "a step",
                        source,
                    })?;
                    let timeout_ms = u32::try_from(spec.timeout().as_millis()).unwrap_or(u32::MAX);
                    st.execute(params![
                        job,
                        device,
                        i as u32,
                        spec.work.name(),
                        args,
                        timeout_ms
                    ])
                    .ctx("queue a job's steps")?;
                }
            }
        }
        tx.commit().ctx("commit a job")?;
        Ok(job as u64)
    }

    /// The step to offer `device` next: its first queued step (oldest job
    /// first, in step order), unless one of its steps is running.
    pub fn next_step(&self, device: i64) -> Result<Option<NextStep>, DbError> {
        let running: bool = self
            .conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM job_steps WHERE device = ?1 AND state = 'running')",
                [device],
                |r| r.get(0),
            )
            .ctx("look for a running step")?;
        if running {
            return Ok(None);
        }
        self.conn
            .query_row(
                "SELECT s.job, s.step, s.args, s.timeout_ms, j.created_by
                 FROM job_steps s JOIN jobs j ON j.id = s.job
                 WHERE s.device = ?1 AND s.state = 'queued' ORDER BY s.job, s.step LIMIT 1",
                [device],
                |r| {
                    Ok(NextStep {
                        job: r.get(0)?,
                        step: r.get(1)?,
                        spec: json_col(r, 2)?,
                        timeout_ms: r.get(3)?,
                        created_by: r.get(4)?,
                    })
                },
            )
            .optional()
            .ctx("find the next step")
    }

    /// Marks a queued step running (the agent said `Started`); `false` if it
    /// was not queued (cancelled meanwhile, or not this device's).
    pub fn start_step(
        &mut self,
        device: i64,
        job: i64,
        step: u32,
        now: i64,
    ) -> Result<bool, DbError> {
        let tx = self.conn.transaction().ctx("begin starting a step")?;
        let n = tx
            .execute(
                "UPDATE job_steps SET state = 'running', started_at = ?4
                 WHERE job = ?1 AND device = ?2 AND step = ?3 AND state = 'queued'",
                params![job, device, step, now],
            )
            .ctx("start a step")?;
        if n > 0 {
            refresh_job_state(&tx, job)?;
        }
        tx.commit().ctx("commit starting a step")?;
        Ok(n > 0)
    }

    /// Stores the latest progress text of a running step.
    pub fn set_progress(
        &mut self,
        device: i64,
        job: i64,
        step: u32,
        text: &str,
    ) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute(
                "UPDATE job_steps SET progress = ?4
                 WHERE job = ?1 AND device = ?2 AND step = ?3 AND state IN ('queued', 'running')",
                params![job, device, step, text],
            )
            .ctx("store a step's progress")?;
        Ok(n > 0)
    }

    /// Ends a step of `device` (queued or running) as `finish` says.
    pub fn finish_step(
        &mut self,
        device: i64,
        job: i64,
        step: u32,
        finish: &Finish,
        now: i64,
    ) -> Result<Finished, DbError> {
        let tx = self.conn.transaction().ctx("begin finishing a step")?;
        let out = finish_in(&tx, device, job, step, finish, now)?;
        tx.commit().ctx("commit finishing a step")?;
        Ok(out)
    }

    /// Fails the running steps of `device` (it disconnected); returns them
    /// as (job, step).
    pub fn fail_running(
        &mut self,
        device: i64,
        reason: &str,
        now: i64,
    ) -> Result<Vec<(i64, u32)>, DbError> {
        let tx = self.conn.transaction().ctx("begin failing running steps")?;
        let running = running_steps(&tx, Some(device))?;
        let finish = Finish::Failed {
            reason: reason.into(),
        };
        for &(device, job, step) in &running {
            finish_in(&tx, device, job, step, &finish, now)?;
        }
        tx.commit().ctx("commit failing running steps")?;
        Ok(running.into_iter().map(|(_, j, s)| (j, s)).collect())
    }

    /// At startup: every step left running is failed with `reason`.
    pub fn fail_all_running(&mut self, reason: &str, now: i64) -> Result<usize, DbError> {
        let tx = self.conn.transaction().ctx("begin failing running steps")?;
        let running = running_steps(&tx, None)?;
        let finish = Finish::Failed {
            reason: reason.into(),
        };
        for &(device, job, step) in &running {
            finish_in(&tx, device, job, step, &finish, now)?;
        }
        tx.commit().ctx("commit failing running steps")?;
        Ok(running.len())
    }

    /// Cancels a job: its queued steps are cancelled with `reason`; running
    /// steps are returned as (device, step) for the caller to stop. `None`
    /// if there is no such job.
    pub fn cancel_job(
        &mut self,
        job: i64,
        reason: &str,
        now: i64,
    ) -> Result<Option<JobCancel>, DbError> {
        let tx = self.conn.transaction().ctx("begin cancelling a job")?;
        let exists: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE id = ?1)",
                [job],
                |r| r.get(0),
            )
            .ctx("find a job")?;
        if !exists {
            return Ok(None);
        }
        let cancelled = tx
            .execute(
                "UPDATE job_steps SET state = 'cancelled', reason = ?2, finished_at = ?3
                 WHERE job = ?1 AND state = 'queued'",
                params![job, reason, now],
            )
            .ctx("cancel a job's steps")?;
        let running = {
            let mut st = tx
                .prepare("SELECT device, step FROM job_steps WHERE job = ?1 AND state = 'running'")
                .ctx("find a job's running steps")?;
            let rows = st
                .query_map([job], |r| Ok((r.get(0)?, r.get(1)?)))
                .ctx("find a job's running steps")?;
            rows.collect::<Result<Vec<_>, _>>()
                .ctx("find a job's running steps")?
        };
        refresh_job_state(&tx, job)?;
        tx.commit().ctx("commit cancelling a job")?;
        Ok(Some(JobCancel {
            cancelled: cancelled as u32,
            running,
        }))
    }

    /// The device ids a job runs on.
    pub fn job_devices(&self, job: i64) -> Result<Vec<i64>, DbError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT DISTINCT device FROM job_steps WHERE job = ?1 ORDER BY device")
            .ctx("list a job's devices")?;
        let rows = st
            .query_map([job], |r| r.get(0))
            .ctx("list a job's devices")?;
        rows.collect::<Result<_, _>>().ctx("list a job's devices")
    }

    fn job_summary(&self, row: (i64, i64, String, String, JobState)) -> Result<Job, DbError> {
        let (id, created_at, created_by, steps, state) = row;
        let steps = serde_json::from_str(&steps).map_err(|source| DbError::Json {
            what: "job steps",
            source,
        })?;
        let mut counts = StepCounts::default();
        {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT state, COUNT(*) FROM job_steps WHERE job = ?1 GROUP BY state",
                )
                .ctx("count a job's steps")?;
            let rows = st
                .query_map([id], |r| {
                    Ok((r.get::<_, StepState>(0)?, r.get::<_, u32>(1)?))
                })
                .ctx("count a job's steps")?;
            for row in rows {
                let (s, n) = row.ctx("count a job's steps")?;
                counts.add(s, n);
            }
        }
        Ok(Job {
            id: id as u64,
            created_at: crate::time::rfc3339(created_at),
            created_by,
            state,
            steps,
            devices: self.job_devices(id)?,
            counts,
            results: Vec::new(),
        })
    }

    /// The newest `limit` jobs, newest first, without per-step results.
    pub fn jobs(&self, limit: u32) -> Result<Vec<Job>, DbError> {
        let rows = {
            let mut st = self
                .conn
                .prepare("SELECT id, created_at, created_by, steps, state FROM jobs ORDER BY id DESC LIMIT ?1")
                .ctx("list jobs")?;
            let rows = st
                .query_map([limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .ctx("list jobs")?;
            rows.collect::<Result<Vec<_>, _>>().ctx("list jobs")?
        };
        rows.into_iter().map(|r| self.job_summary(r)).collect()
    }

    /// A job with its results, one per device × step.
    pub fn job(&self, id: i64) -> Result<Option<Job>, DbError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, created_at, created_by, steps, state FROM jobs WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .ctx("read a job")?;
        let Some(row) = row else { return Ok(None) };
        let mut job = self.job_summary(row)?;
        let mut st = self
            .conn
            .prepare(
                "SELECT device, step, args, state, started_at, finished_at, progress, output, reason
                 FROM job_steps WHERE job = ?1 ORDER BY device, step",
            )
            .ctx("read a job's results")?;
        let rows = st
            .query_map([id], step_result)
            .ctx("read a job's results")?;
        job.results = rows.collect::<Result<_, _>>().ctx("read a job's results")?;
        Ok(Some(job))
    }

    /// One step's state (tests and logs).
    pub fn step_state(
        &self,
        device: i64,
        job: i64,
        step: u32,
    ) -> Result<Option<StepState>, DbError> {
        self.conn
            .query_row(
                "SELECT state FROM job_steps WHERE job = ?1 AND device = ?2 AND step = ?3",
                params![job, device, step],
                |r| r.get(0),
            )
            .optional()
            .ctx("read a step's state")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::HelloFacts;
    use crate::jobs::StepKind;
    use crate::model::EnrolmentPolicy;

    fn device(db: &mut Db, uuid: &str) -> i64 {
        let facts = HelloFacts {
            uuid: Some(uuid.into()),
            inventory_json: "{}".into(),
            ..HelloFacts::default()
        };
        db.record_hello(&facts, EnrolmentPolicy::Auto, 0)
            .unwrap()
            .id
    }

    fn steps() -> Vec<StepSpec> {
        vec![
            StepSpec::new(StepKind::Echo { text: "one".into() }),
            StepSpec::new(StepKind::Wait { secs: 1 }),
            StepSpec::new(StepKind::Inventory),
        ]
    }

    fn ok(out: &str) -> Finish {
        Finish::Succeeded { output: out.into() }
    }

    #[test]
    fn steps_run_in_order_and_the_job_state_follows() {
        let mut db = Db::open_in_memory().unwrap();
        let d = device(&mut db, "a");
        let job = db.create_job("admin", &steps(), &[d], 10).unwrap() as i64;
        assert_eq!(db.job(job).unwrap().unwrap().state, JobState::Queued);
        let next = db.next_step(d).unwrap().unwrap();
        assert_eq!((next.job, next.step, next.timeout_ms), (job, 0, 60_000));
        assert!(db.start_step(d, job, 0, 11).unwrap());
        assert!(!db.start_step(d, job, 0, 11).unwrap(), "already running");
        assert_eq!(db.next_step(d).unwrap(), None, "one step at a time");
        assert_eq!(db.job(job).unwrap().unwrap().state, JobState::Running);
        assert_eq!(
            db.finish_step(d, job, 0, &ok("one"), 12).unwrap(),
            Finished::Applied(JobState::Running)
        );
        assert_eq!(
            db.finish_step(d, job, 0, &ok("x"), 12).unwrap(),
            Finished::AlreadyFinal(StepState::Succeeded)
        );
        let next = db.next_step(d).unwrap().unwrap();
        assert_eq!((next.step, next.timeout_ms), (1, 31_000));
        db.start_step(d, job, 1, 13).unwrap();
        db.finish_step(d, job, 1, &ok(""), 14).unwrap();
        db.start_step(d, job, 2, 15).unwrap();
        assert_eq!(
            db.finish_step(d, job, 2, &ok("inv"), 16).unwrap(),
            Finished::Applied(JobState::Succeeded)
        );
        let shown = db.job(job).unwrap().unwrap();
        assert_eq!(shown.results.len(), 3);
        assert_eq!(shown.results[0].output.as_deref(), Some("one"));
        assert_eq!(shown.counts.succeeded, 3);
        assert_eq!(db.next_step(d).unwrap(), None);
    }

    #[test]
    fn a_failed_step_cancels_the_rest_of_that_device_only() {
        let mut db = Db::open_in_memory().unwrap();
        let (a, b) = (device(&mut db, "a"), device(&mut db, "b"));
        let job = db.create_job("admin", &steps(), &[a, b], 0).unwrap() as i64;
        db.start_step(a, job, 0, 1).unwrap();
        let failed = Finish::Failed {
            reason: "boom".into(),
        };
        assert_eq!(
            db.finish_step(a, job, 0, &failed, 2).unwrap(),
            Finished::Applied(JobState::Running)
        );
        assert_eq!(
            db.step_state(a, job, 1).unwrap(),
            Some(StepState::Cancelled)
        );
        assert_eq!(db.step_state(b, job, 0).unwrap(), Some(StepState::Queued));
        assert_eq!(db.next_step(a).unwrap(), None);
        // Another device's step cannot be finished from here.
        assert_eq!(
            db.finish_step(a, job + 1, 0, &ok(""), 3).unwrap(),
            Finished::NotFound
        );
        for s in 0..3 {
            db.start_step(b, job, s, 4).unwrap();
            db.finish_step(b, job, s, &ok(""), 5).unwrap();
        }
        let shown = db.job(job).unwrap().unwrap();
        assert_eq!(shown.state, JobState::Failed);
        assert_eq!(
            shown.results[1].reason.as_deref(),
            Some("an earlier step failed")
        );
    }

    #[test]
    fn disconnects_restarts_and_cancels() {
        let mut db = Db::open_in_memory().unwrap();
        let d = device(&mut db, "a");
        let j1 = db.create_job("admin", &steps(), &[d], 0).unwrap() as i64;
        let j2 = db.create_job("admin", &steps(), &[d], 0).unwrap() as i64;
        assert_eq!(
            db.next_step(d).unwrap().unwrap().job,
            j1,
            "oldest job first"
        );
        db.start_step(d, j1, 0, 1).unwrap();
        assert_eq!(
            db.fail_running(d, "device disconnected: connection closed", 2)
                .unwrap(),
            vec![(j1, 0)]
        );
        let shown = db.job(j1).unwrap().unwrap();
        assert_eq!(shown.state, JobState::Failed);
        assert_eq!(
            shown.results[0].reason.as_deref(),
            Some("device disconnected: connection closed")
        );
        // The next job goes on; a restart fails what was running.
        db.start_step(d, j2, 0, 3).unwrap();
        assert_eq!(
            db.fail_all_running("controller restarted while the step ran", 4)
                .unwrap(),
            1
        );
        assert_eq!(db.step_state(d, j2, 0).unwrap(), Some(StepState::Failed));
        // Cancelling: queued steps cancelled, running ones reported.
        let j3 = db.create_job("admin", &steps(), &[d], 5).unwrap() as i64;
        db.start_step(d, j3, 0, 6).unwrap();
        assert_eq!(
            db.cancel_job(j3, "cancelled by admin", 7).unwrap(),
            Some(JobCancel {
                cancelled: 2,
                running: vec![(d, 0)]
            })
        );
        assert_eq!(db.job(j3).unwrap().unwrap().state, JobState::Running);
        db.finish_step(
            d,
            j3,
            0,
            &Finish::Cancelled {
                reason: "cancelled".into(),
            },
            8,
        )
        .unwrap();
        assert_eq!(db.job(j3).unwrap().unwrap().state, JobState::Cancelled);
        assert_eq!(db.cancel_job(999, "x", 9).unwrap(), None);
        assert_eq!(
            db.jobs(10)
                .unwrap()
                .iter()
                .map(|j| j.id as i64)
                .collect::<Vec<_>>(),
            vec![j3, j2, j1]
        );
    }
}
