//! The blocking client for the image store's and users' endpoints (what
//! `shoalctl image|acl|users|whoami` use). Separate from `client.rs`
//! because adds and exports run as long as encoding takes: no global
//! timeout here.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_protocol::image::Compression;

use super::http::{
    Caller, CreatedUser, ExportTo, Grant, NewGroup, NewImage, NewUser, Removed, ReplaceFrom,
    SetGroup,
};
use super::{Acl, Exported, GroupInfo, ImageDetail, ImageInfo, Permission, Role, Verified};
use crate::api::ErrorBody;
use crate::client::ClientError;
use crate::db::User;

#[derive(Debug)]
pub struct StoreClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// Percent-encodes a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A path made absolute (the Controller resolves nothing relative).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.into())
}

impl StoreClient {
    pub fn new(base: &str, token: &str) -> StoreClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build();
        StoreClient {
            base: base.trim_end_matches('/').to_owned(),
            token: token.trim().to_owned(),
            agent: ureq::Agent::new_with_config(config),
        }
    }

    fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let auth = format!("Bearer {}", self.token);
        let sent = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
            ("DELETE", _) => self
                .agent
                .delete(&url)
                .header("Authorization", &auth)
                .call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(b),
            (_, None) => self
                .agent
                .post(&url)
                .header("Authorization", &auth)
                .send_empty(),
        };
        let mut resp = sent.map_err(|e| ClientError::Unreachable {
            url: self.base.clone(),
            why: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| ClientError::BadAnswer {
                url: url.clone(),
                why: e.to_string(),
            })?;
        if !(200..300).contains(&status) {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|b| b.error)
                .unwrap_or_else(|_| text.trim().chars().take(200).collect());
            return Err(ClientError::Api { status, message });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::BadAnswer {
            url,
            why: e.to_string(),
        })
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<T, ()>("GET", path, None)
    }

    pub fn whoami(&self) -> Result<Caller, ClientError> {
        self.get("/v1/whoami")
    }

    pub fn groups(&self) -> Result<Vec<GroupInfo>, ClientError> {
        self.get("/v1/image-groups")
    }

    pub fn create_group(&self, name: &str) -> Result<GroupInfo, ClientError> {
        let b = NewGroup { name: name.into() };
        self.call("POST", "/v1/image-groups", Some(&b))
    }

    pub fn set_group(&self, name: &str, c: Compression) -> Result<GroupInfo, ClientError> {
        let b = SetGroup { compression: c };
        self.call("POST", &format!("/v1/image-groups/{}", enc(name)), Some(&b))
    }

    pub fn images(&self, group: Option<&str>) -> Result<Vec<ImageInfo>, ClientError> {
        match group {
            Some(g) => self.get(&format!("/v1/images?group={}", enc(g))),
            None => self.get("/v1/images"),
        }
    }

    pub fn add(
        &self,
        group: &str,
        file: &Path,
        name: Option<&str>,
        compression: Option<Compression>,
        description: Option<&str>,
    ) -> Result<ImageInfo, ClientError> {
        let b = NewImage {
            group: group.into(),
            path: absolute(file),
            name: name.map(str::to_owned),
            compression,
            description: description.map(str::to_owned),
        };
        self.call("POST", "/v1/images", Some(&b))
    }

    fn image_path(group: &str, name: &str) -> String {
        format!("/v1/images/{}/{}", enc(group), enc(name))
    }

    pub fn show(&self, group: &str, name: &str) -> Result<ImageDetail, ClientError> {
        self.get(&Self::image_path(group, name))
    }

    pub fn verify(&self, group: &str, name: &str) -> Result<Verified, ClientError> {
        let p = format!("{}/verify", Self::image_path(group, name));
        self.call::<_, ()>("POST", &p, None)
    }

    pub fn export(&self, group: &str, name: &str, file: &Path) -> Result<Exported, ClientError> {
        let p = format!("{}/export", Self::image_path(group, name));
        let b = ExportTo {
            path: absolute(file),
        };
        self.call("POST", &p, Some(&b))
    }

    pub fn replace(
        &self,
        group: &str,
        name: &str,
        file: &Path,
        description: Option<&str>,
    ) -> Result<ImageInfo, ClientError> {
        let p = format!("{}/replace", Self::image_path(group, name));
        let b = ReplaceFrom {
            path: absolute(file),
            description: description.map(str::to_owned),
        };
        self.call("POST", &p, Some(&b))
    }

    pub fn remove(&self, group: &str, name: &str) -> Result<Removed, ClientError> {
        self.call::<_, ()>("DELETE", &Self::image_path(group, name), None)
    }

    pub fn acl(
        &self,
        grant: bool,
        user: &str,
        permission: Permission,
        group: &str,
        name: Option<&str>,
    ) -> Result<Acl, ClientError> {
        let b = Grant {
            user: user.into(),
            permission,
            group: group.into(),
            name: name.map(str::to_owned),
        };
        let p = if grant {
            "/v1/acl/grant"
        } else {
            "/v1/acl/revoke"
        };
        self.call("POST", p, Some(&b))
    }

    pub fn users(&self) -> Result<Vec<User>, ClientError> {
        self.get("/v1/users")
    }

    pub fn create_user(&self, name: &str, role: Role) -> Result<CreatedUser, ClientError> {
        let b = NewUser {
            name: name.into(),
            role,
        };
        self.call("POST", "/v1/users", Some(&b))
    }

    pub fn remove_user(&self, name: &str) -> Result<Removed, ClientError> {
        self.call::<_, ()>("DELETE", &format!("/v1/users/{}", enc(name)), None)
    }
}
