//! The blocking client for the image store's and users' endpoints (what
//! `shoalctl image|acl|users|whoami` use). It shares `client.rs`'s request
//! path, built without a global timeout: adds and exports run as long as
//! encoding and verifying take.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use shoal_protocol::image::Compression;

use super::http::{
    Caller, CreatedUser, ExportTo, Grant, NewGroup, NewImage, NewUser, Removed, ReplaceFrom,
    SetGroup,
};
use super::{Acl, Exported, GroupInfo, ImageDetail, ImageInfo, Permission, Role, Verified};
use crate::client::{enc, Client, ClientError, Method};
use crate::db::User;

#[derive(Debug)]
pub struct StoreClient {
    client: Client,
}

/// A path made absolute (the Controller resolves nothing relative).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.into())
}

impl StoreClient {
    pub fn new(base: &str, token: &str) -> StoreClient {
        StoreClient {
            client: Client::with_timeout(base, token, None),
        }
    }

    fn call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let method = match method {
            "GET" => Method::Get,
            "DELETE" => Method::Delete,
            _ => Method::Post(body),
        };
        self.client.call(method, path)
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
