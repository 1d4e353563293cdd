//! The image store's and users' admin API endpoints (mounted by
//! `admin.rs`; listed there and in `docs/controller.md`) and their JSON
//! bodies, shared with `client.rs`. The store's work runs on the blocking
//! pool. Every request carries the [`Caller`] its token names; the store
//! checks roles and ACLs. Endpoints that make the Controller read or write
//! a file on its host by path (add, replace, export) are for admins only:
//! a `user` could otherwise read any file the Controller can.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use log::info;
use serde::{Deserialize, Serialize};
use shoal_protocol::image::Compression;

use super::{
    check_name, Acl, AddRequest, Exported, GroupInfo, ImageDetail, ImageInfo, ImageStore,
    Permission, Role, StoreError, Verified, BOOTSTRAP_ADMIN,
};
use crate::admin::ApiError;
use crate::db::{token_sha256, DbError, User};
use crate::server::Shared;
use crate::time::now_ms;

/// Who sent a request (from its token), put in the request by `admin.rs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The holder of `STATE/admin.token`.
    pub fn bootstrap() -> Caller {
        Caller {
            name: BOOTSTRAP_ADMIN.into(),
            role: Role::Admin,
        }
    }

    fn admin_only(&self, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User => Err(ApiError::Forbidden(format!(
                "user {:?} is not an admin: only admins may {what}",
                self.name
            ))),
        }
    }
}

/// The image store the endpoints use (`None`: the database is in memory).
#[derive(Debug, Clone)]
pub struct Images(pub Option<Arc<ImageStore>>);

/// `POST /v1/image-groups`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewGroup {
    pub name: String,
}

/// `POST /v1/image-groups/{group}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetGroup {
    pub compression: Compression,
}

/// `POST /v1/images`: `path` is read by the Controller, on its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewImage {
    pub group: String,
    pub path: PathBuf,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub compression: Option<Compression>,
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST /v1/images/{group}/{name}/export`: written by the Controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportTo {
    pub path: PathBuf,
}

/// `POST /v1/images/{group}/{name}/replace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplaceFrom {
    pub path: PathBuf,
    #[serde(default)]
    pub description: Option<String>,
}

/// `POST /v1/acl/grant` and `/v1/acl/revoke`; no `name`: the group's ACL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub user: String,
    pub permission: Permission,
    pub group: String,
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/users`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewUser {
    pub name: String,
    #[serde(default = "default_role")]
    pub role: Role,
}

fn default_role() -> Role {
    Role::User
}

/// The answer to `POST /v1/users`: the token is shown once, never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedUser {
    pub name: String,
    pub role: Role,
    pub token: String,
}

/// The answer to deletions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
}

#[derive(Debug, Deserialize)]
struct GroupQuery {
    group: Option<String>,
}

type Shd = axum::extract::State<Arc<Shared>>;

/// Routes any authenticated caller may use (the store checks ACLs).
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/image-groups", get(groups).post(create_group))
        .route("/v1/image-groups/{group}", post(set_group))
        .route("/v1/images", get(images).post(add))
        .route("/v1/images/{group}/{name}", get(show).delete(remove))
        .route("/v1/images/{group}/{name}/verify", post(verify))
        .route("/v1/images/{group}/{name}/export", post(export))
        .route("/v1/images/{group}/{name}/replace", post(replace))
        .route("/v1/acl/grant", post(grant))
        .route("/v1/acl/revoke", post(revoke))
}

/// Routes for admins only (`admin.rs` puts them behind the role check).
pub fn admin_routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v1/users", get(users).post(create_user))
        .route("/v1/users/{name}", axum::routing::delete(remove_user))
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(v)| v)
        .map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// Runs store work on the blocking pool.
async fn run<T: Send + 'static>(
    images: &Images,
    f: impl FnOnce(&ImageStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = images.0.clone().ok_or(ApiError::NoImageStore)?;
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|_| ApiError::Db(DbError::Task))?
        .map_err(ApiError::Store)
}

async fn whoami(Extension(c): Extension<Caller>) -> Json<Caller> {
    Json(c)
}

async fn groups(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
) -> Result<Json<Vec<GroupInfo>>, ApiError> {
    Ok(Json(run(&i, move |s| s.groups(&c.name)).await?))
}

async fn create_group(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    b: Result<Json<NewGroup>, JsonRejection>,
) -> Result<(StatusCode, Json<GroupInfo>), ApiError> {
    let b = body(b)?;
    let g = run(&i, move |s| s.create_group(&c.name, &b.name)).await?;
    Ok((StatusCode::CREATED, Json(g)))
}

async fn set_group(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path(group): Path<String>,
    b: Result<Json<SetGroup>, JsonRejection>,
) -> Result<Json<GroupInfo>, ApiError> {
    let b = body(b)?;
    Ok(Json(
        run(&i, move |s| s.set_group(&c.name, &group, b.compression)).await?,
    ))
}

async fn images(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    q: Result<Query<GroupQuery>, QueryRejection>,
) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    Ok(Json(
        run(&i, move |s| s.images(&c.name, q.group.as_deref())).await?,
    ))
}

async fn add(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    b: Result<Json<NewImage>, JsonRejection>,
) -> Result<(StatusCode, Json<ImageInfo>), ApiError> {
    c.admin_only("add images from a path on the controller's host")?;
    let b = body(b)?;
    let req = AddRequest {
        group: b.group,
        source: b.path,
        name: b.name,
        compression: b.compression,
        description: b.description,
    };
    let info = run(&i, move |s| s.add(&c.name, &req)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn show(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Json<ImageDetail>, ApiError> {
    Ok(Json(
        run(&i, move |s| s.show(&c.name, &group, &name)).await?,
    ))
}

async fn remove(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Json<Removed>, ApiError> {
    let removed = format!("{group}/{name}");
    run(&i, move |s| s.remove(&c.name, &group, &name)).await?;
    Ok(Json(Removed { removed }))
}

async fn verify(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path((group, name)): Path<(String, String)>,
) -> Result<Json<Verified>, ApiError> {
    Ok(Json(
        run(&i, move |s| s.verify(&c.name, &group, &name)).await?,
    ))
}

async fn export(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path((group, name)): Path<(String, String)>,
    b: Result<Json<ExportTo>, JsonRejection>,
) -> Result<Json<Exported>, ApiError> {
    c.admin_only("export images to a path on the controller's host")?;
    let b = body(b)?;
    Ok(Json(
        run(&i, move |s| s.export(&c.name, &group, &name, &b.path)).await?,
    ))
}

async fn replace(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path((group, name)): Path<(String, String)>,
    b: Result<Json<ReplaceFrom>, JsonRejection>,
) -> Result<Json<ImageInfo>, ApiError> {
    c.admin_only("replace images from a path on the controller's host")?;
    let b = body(b)?;
    Ok(Json(
        run(&i, move |s| {
            s.replace(&c.name, &group, &name, &b.path, b.description.as_deref())
        })
        .await?,
    ))
}

async fn set_grant(c: Caller, i: Images, on: bool, g: Grant) -> Result<Json<Acl>, ApiError> {
    Ok(Json(
        run(&i, move |s| {
            s.set_grant(
                &c.name,
                on,
                &g.user,
                g.permission,
                &g.group,
                g.name.as_deref(),
            )
        })
        .await?,
    ))
}

async fn grant(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    b: Result<Json<Grant>, JsonRejection>,
) -> Result<Json<Acl>, ApiError> {
    set_grant(c, i, true, body(b)?).await
}

async fn revoke(
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    b: Result<Json<Grant>, JsonRejection>,
) -> Result<Json<Acl>, ApiError> {
    set_grant(c, i, false, body(b)?).await
}

async fn users(axum::extract::State(s): Shd) -> Result<Json<Vec<User>>, ApiError> {
    Ok(Json(s.store.call(|db| db.users()).await?))
}

async fn create_user(
    axum::extract::State(s): Shd,
    Extension(c): Extension<Caller>,
    b: Result<Json<NewUser>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedUser>), ApiError> {
    let b = body(b)?;
    check_name(&b.name).map_err(ApiError::Store)?;
    if b.name == BOOTSTRAP_ADMIN {
        return Err(ApiError::Conflict(format!(
            "user {BOOTSTRAP_ADMIN:?} is the bootstrap admin (STATE/admin.token)"
        )));
    }
    let token =
        crate::state::new_token().map_err(|e| ApiError::Internal(crate::error_chain(&e)))?;
    let hash = token_sha256(&token);
    let (name, role) = (b.name.clone(), b.role);
    let created = s
        .store
        .call(move |db| db.create_user(&name, role, &hash, now_ms()))
        .await?;
    if !created {
        return Err(ApiError::Conflict(format!("user {:?} exists", b.name)));
    }
    info!("{}: created user {} ({})", c.name, b.name, b.role);
    Ok((
        StatusCode::CREATED,
        Json(CreatedUser {
            name: b.name,
            role: b.role,
            token,
        }),
    ))
}

async fn remove_user(
    axum::extract::State(s): Shd,
    Extension(c): Extension<Caller>,
    Extension(i): Extension<Images>,
    Path(name): Path<String>,
) -> Result<Json<Removed>, ApiError> {
    let n = name.clone();
    if !s.store.call(move |db| db.remove_user(&n)).await? {
        return Err(ApiError::NoUser(name));
    }
    if i.0.is_some() {
        let n = name.clone();
        run(&i, move |st| st.forget_user(&n)).await?;
    }
    info!("{}: removed user {name}", c.name);
    Ok(Json(Removed { removed: name }))
}
