//! The admin API: HTTP + JSON on a loopback address, every endpoint but
//! `GET /v1/health` behind `Authorization: Bearer TOKEN`. The token is
//! `STATE/admin.token` (user `admin`, role admin) or a user's token
//! (`POST /v1/users`); each request is attributed to that user. Role
//! `user` may use the rows marked *any* (the image store applies its
//! ACLs); everything else is admin-only (403).
//!
//! | method | path | does |
//! | --- | --- | --- |
//! | GET | `/v1/health` | `{"status":"ok","version":..,"public_key":..}`, no token |
//! | GET | `/v1/whoami` | *any*: `{"name":..,"role":..}` |
//! | GET | `/v1/users` | users (name, role, created_at) |
//! | POST | `/v1/users` | `{"name":..,"role":"user"\|"admin"}` → 201 with the token, shown once |
//! | DELETE | `/v1/users/{name}` | remove the user and its grants |
//! | GET | `/v1/image-groups` | *any*: the groups the caller may see |
//! | POST | `/v1/image-groups` | *any* (store: admins): `{"name":..}` → 201 |
//! | POST | `/v1/image-groups/{group}` | *any* (store: admins): `{"compression":..}`, re-encodes its images |
//! | GET | `/v1/images?group=G` | *any*: the images the caller may `list` |
//! | POST | `/v1/images` | admins: `{"group","path","name"?,"compression"?,"description"?}` → 201 |
//! | GET | `/v1/images/{group}/{name}` | *any* (`list`): metadata, chunks, ACLs |
//! | DELETE | `/v1/images/{group}/{name}` | *any* (`modify`) |
//! | POST | `/v1/images/{group}/{name}/verify` | *any* (`list`): every chunk's hashes |
//! | POST | `/v1/images/{group}/{name}/export` | admins: `{"path":..}`, verified |
//! | POST | `/v1/images/{group}/{name}/replace` | admins: `{"path":..,"description"?}`, atomic |
//! | POST | `/v1/acl/grant`, `/v1/acl/revoke` | *any* (store: admins): `{"user","permission","group","name"?}` |
//! | GET | `/v1/devices` | every device (no inventory) |
//! | GET | `/v1/devices/{device}` | one device with its inventory |
//! | DELETE | `/v1/devices/{device}` | forget it (open steps end, connection closes) |
//! | POST | `/v1/devices/{device}/approve` | approve a pending device |
//! | GET | `/v1/jobs?limit=N` | *any*: newest jobs first, with step counts |
//! | POST | `/v1/jobs` | *any*: create: `{"devices":[..],"steps":[..],"created_by":".."}` → 201; `created_by` is the caller unless an admin names someone |
//! | GET | `/v1/jobs/{id}` | *any*: a job with one result per device × step |
//! | POST | `/v1/jobs/{id}/cancel` | cancel its queued steps, stop its running ones |
//! | GET | `/v1/logs?device=D&limit=N` | agents' log lines, oldest first |
//!
//! `{device}` is an id, an SMBIOS UUID or a MAC. Errors are
//! `{"error": "..."}` with 400, 401, 403, 404, 409, 500 or 503. Paths in
//! image bodies are on the Controller's host (`shoalctl` runs there).

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use log::{debug, error, info};
use serde::Deserialize;

use crate::api::{Cancelled, Device, ErrorBody, Health, Job, LogEntry, NewJob};
use crate::db::DbError;
use crate::distribution::multicast::SessionSnapshot;
use crate::error_chain;
use crate::jobs::{validate_steps, JobError};
use crate::registry::Cmd;
use crate::server::Shared;
use crate::store::http::{Caller, Images};
use crate::store::{Role, StoreError};
use crate::time::now_ms;

/// Jobs listed unless `?limit=` says otherwise.
pub const DEFAULT_LIST: u32 = 100;
/// Longest `created_by`.
const MAX_NAME: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing admin token (send Authorization: Bearer TOKEN)")]
    NoToken,
    #[error("bad admin token")]
    BadToken,
    #[error("no device matches {0:?}")]
    NoDevice(String),
    #[error("no job {0:?}")]
    NoJob(String),
    #[error("no devices to run the job on (\"all\" means every approved device)")]
    NoTargets,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error("database error")]
    Db(#[from] DbError),
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("no user {0:?}")]
    NoUser(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    #[error("the image store is not available")]
    NoImageStore,
    #[error(transparent)]
    Store(StoreError),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::NoToken | ApiError::BadToken => StatusCode::UNAUTHORIZED,
            ApiError::NoDevice(_)
            | ApiError::NoJob(_)
            | ApiError::NotFound(_)
            | ApiError::NoUser(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NoImageStore => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(e) => {
                StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::NoTargets | ApiError::BadRequest(_) | ApiError::Job(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let text = error_chain(&self);
        let status = self.status();
        if status.is_server_error() {
            error!("admin API: {text}");
        }
        (status, Json(ErrorBody { error: text })).into_response()
    }
}

type Shd = State<Arc<Shared>>;

pub fn router(shared: Arc<Shared>) -> Router {
    // The image store next to the database (or `serve --images`); none
    // for an in-memory database. Opening it is quick (a directory).
    let images = match &shared.images {
        Some(s) => {
            info!("image store: {}", s.root().display());
            Images(Some(s.clone()))
        }
        None => Images(None),
    };
    let admin_only = Router::new()
        .route("/v1/devices", get(list_devices))
        .route(
            "/v1/devices/{device}",
            get(show_device).delete(forget_device),
        )
        .route("/v1/devices/{device}/approve", post(approve_device))
        .route("/v1/jobs/{job}/cancel", post(cancel_job))
        .route("/v1/logs", get(logs))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{id}", get(show_session))
        .merge(crate::store::http::admin_routes())
        .route_layer(middleware::from_fn(require_admin));
    let api = Router::new()
        .route("/v1/jobs", get(list_jobs).post(create_job))
        .route("/v1/jobs/{job}", get(show_job))
        .merge(crate::store::http::routes())
        .merge(admin_only)
        .route_layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/v1/health", get(health))
        .merge(api)
        .fallback(not_found)
        .layer(Extension(images))
        .with_state(shared)
}

/// Compares without an early exit, so the time taken says nothing about
/// how much of the token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Finds the caller: the bootstrap admin token, else a user whose token
/// hashes (SHA-256) to a row of `users`.
async fn auth(State(s): Shd, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_owned);
    let caller = match token {
        None => return ApiError::NoToken.into_response(),
        Some(t) if same(t.as_bytes(), s.admin_token.as_bytes()) => Caller::bootstrap(),
        Some(t) => {
            let hash = crate::db::token_sha256(&t);
            match s.store.call(move |db| db.user_by_token(&hash)).await {
                Ok(Some((name, role))) => Caller { name, role },
                Ok(None) => return ApiError::BadToken.into_response(),
                Err(e) => return ApiError::Db(e).into_response(),
            }
        }
    };
    debug!(
        "admin API: {} {} by {}",
        req.method(),
        req.uri().path(),
        caller.name
    );
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Refuses callers whose role is not admin (after [`auth`]).
async fn require_admin(req: Request, next: Next) -> Response {
    match req.extensions().get::<Caller>() {
        Some(c) if c.role == Role::Admin => next.run(req).await,
        Some(c) => ApiError::Forbidden(format!(
            "user {:?} is not an admin: {} {} is for admins only",
            c.name,
            req.method(),
            req.uri().path()
        ))
        .into_response(),
        None => ApiError::NoToken.into_response(),
    }
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_owned())
}

async fn health(State(s): Shd) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        public_key: shoal_protocol::channel::to_hex(&s.keypair.public),
    })
}

async fn list_devices(State(s): Shd) -> Result<Json<Vec<Device>>, ApiError> {
    Ok(Json(s.store.call(|db| db.devices()).await?))
}

/// The device `sel` names, with its record.
async fn resolve(s: &Shared, sel: String) -> Result<Device, ApiError> {
    let sel2 = sel.clone();
    let found = s
        .store
        .call(move |db| match db.find_device(&sel2)? {
            Some(id) => db.device(id),
            None => Ok(None),
        })
        .await?;
    found.ok_or(ApiError::NoDevice(sel))
}

async fn show_device(State(s): Shd, Path(sel): Path<String>) -> Result<Json<Device>, ApiError> {
    Ok(Json(resolve(&s, sel).await?))
}

async fn forget_device(State(s): Shd, Path(sel): Path<String>) -> Result<Json<Device>, ApiError> {
    let dev = resolve(&s, sel.clone()).await?;
    let id = dev.id;
    if !s.store.call(move |db| db.forget(id, now_ms())).await? {
        return Err(ApiError::NoDevice(sel));
    }
    info!("admin: device {id} forgotten");
    s.registry
        .send(id, Cmd::Close("device forgotten".into()))
        .await;
    Ok(Json(dev))
}

async fn approve_device(State(s): Shd, Path(sel): Path<String>) -> Result<Json<Device>, ApiError> {
    let id = resolve(&s, sel.clone()).await?.id;
    let dev = s
        .store
        .call(move |db| {
            db.approve(id)?;
            db.device(id)
        })
        .await?
        .ok_or(ApiError::NoDevice(sel))?;
    info!("admin: device {id} approved");
    s.registry.send(id, Cmd::Approved).await;
    Ok(Json(dev))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    device: Option<String>,
}

fn query(q: Result<Query<ListQuery>, QueryRejection>) -> Result<ListQuery, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

async fn list_jobs(
    State(s): Shd,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Job>>, ApiError> {
    let limit = query(q)?.limit.unwrap_or(DEFAULT_LIST);
    Ok(Json(s.store.call(move |db| db.jobs(limit)).await?))
}

async fn create_job(
    State(s): Shd,
    Extension(caller): Extension<Caller>,
    body: Result<Json<NewJob>, JsonRejection>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let Json(new) = body.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    validate_steps(&new.steps)?;
    if new.devices.is_empty() {
        return Err(ApiError::NoTargets);
    }
    // Users create jobs as themselves; an admin may name someone else
    // (scripts acting for a person).
    let named = match caller.role {
        Role::Admin => new
            .created_by
            .as_deref()
            .map(str::trim)
            .filter(|b| !b.is_empty()),
        Role::User => None,
    };
    let by: String = named
        .unwrap_or(&caller.name)
        .chars()
        .take(MAX_NAME)
        .collect();
    let steps = new.steps;
    let selectors = new.devices;
    let by2 = by.clone();
    let created = s
        .store
        .call(move |db| {
            let mut ids: Vec<i64> = Vec::new();
            for sel in &selectors {
                let found = if sel.trim() == "all" {
                    db.approved_devices()?
                } else {
                    match db.find_device(sel)? {
                        Some(id) => vec![id],
                        None => return Ok(Err(ApiError::NoDevice(sel.clone()))),
                    }
                };
                for id in found {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            if ids.is_empty() {
                return Ok(Err(ApiError::NoTargets));
            }
            let job = db.create_job(&by2, &steps, &ids, now_ms())?;
            Ok(Ok((job, db.job(job as i64)?)))
        })
        .await??;
    let (id, job) = created;
    let job = job.ok_or_else(|| ApiError::NoJob(id.to_string()))?;
    let on = match job.devices.len() {
        n if n > 10 => format!("{n} devices"),
        _ => format!("devices {:?}", job.devices),
    };
    info!(
        "admin: job {id} created by {by}: {} steps on {on}",
        job.steps.len()
    );
    for &d in &job.devices {
        s.registry.send(d, Cmd::Kick).await;
    }
    Ok((StatusCode::CREATED, Json(job)))
}

fn job_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::NoJob(text.to_owned()))
}

/// Multicast sessions, live and recently ended.
async fn list_sessions(State(s): Shd) -> Json<Vec<SessionSnapshot>> {
    Json(s.multicast.sessions())
}

/// One session by ID (or a unique prefix of it), or the newest of a job
/// (`job:N`).
async fn show_session(
    State(s): Shd,
    Path(id): Path<String>,
) -> Result<Json<SessionSnapshot>, ApiError> {
    let all = s.multicast.sessions();
    let found: Vec<&SessionSnapshot> = match id.strip_prefix("job:") {
        Some(j) => all
            .iter()
            .filter(|x| j.parse() == Ok(x.job))
            .take(1)
            .collect(),
        None => all.iter().filter(|x| x.id.starts_with(&id)).collect(),
    };
    match found[..] {
        [one] => Ok(Json(one.clone())),
        [] => Err(ApiError::NotFound(format!("multicast session {id:?}"))),
        _ => Err(ApiError::BadRequest(format!(
            "{id:?} matches {} sessions; give more of the ID",
            found.len()
        ))),
    }
}

async fn show_job(State(s): Shd, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let n = job_id(&id)?;
    s.store
        .call(move |db| db.job(n))
        .await?
        .map(Json)
        .ok_or(ApiError::NoJob(id))
}

async fn cancel_job(State(s): Shd, Path(id): Path<String>) -> Result<Json<Cancelled>, ApiError> {
    let n = job_id(&id)?;
    let out = s
        .store
        .call(move |db| {
            let Some(done) = db.cancel_job(n, "cancelled by admin", now_ms())? else {
                return Ok(None);
            };
            Ok(Some((done, db.job_devices(n)?)))
        })
        .await?;
    let Some((crate::db::JobCancel { cancelled, running }, devices)) = out else {
        return Err(ApiError::NoJob(id));
    };
    info!(
        "admin: job {n} cancelled: {cancelled} queued steps cancelled, {} running asked to stop",
        running.len()
    );
    for d in devices {
        s.registry.send(d, Cmd::CancelJob(n)).await;
    }
    Ok(Json(Cancelled {
        job: n as u64,
        cancelled,
        stopping: running.len() as u32,
    }))
}

async fn logs(
    State(s): Shd,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<LogEntry>>, ApiError> {
    let q = query(q)?;
    let limit = q.limit.unwrap_or(DEFAULT_LIST);
    let device = match q.device {
        Some(sel) => Some(resolve(&s, sel).await?.id),
        None => None,
    };
    Ok(Json(s.store.call(move |db| db.logs(device, limit)).await?))
}
