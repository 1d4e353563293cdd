//! Who may do what in the image store: the two roles of admin API users
//! (`admin` may do everything, `user` only what ACLs grant), the three
//! permissions (`list`, `deploy`, `modify`) and an ACL (user → permissions).
//! A group's ACL lives in its `.group.json`, an image's in the sidecar
//! `NAME.acl.json`; an image's effective grants are the union of both.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An admin API user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, ACLs or not.
    Admin,
    /// Only what ACLs grant.
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            other => Err(format!("unknown role {other:?} (expected admin or user)")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an ACL grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// See it in enumeration, `show` and `verify` it.
    List,
    /// Deploy it to a device (and export it).
    Deploy,
    /// Add images to a group; replace or remove an image.
    Modify,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::List => "list",
            Permission::Deploy => "deploy",
            Permission::Modify => "modify",
        }
    }
}

impl FromStr for Permission {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "list" => Ok(Permission::List),
            "deploy" => Ok(Permission::Deploy),
            "modify" => Ok(Permission::Modify),
            other => Err(format!(
                "unknown permission {other:?} (expected list, deploy or modify)"
            )),
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Grants by user name (JSON: `{"alice": ["list", "deploy"]}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Acl(pub BTreeMap<String, BTreeSet<Permission>>);

impl Acl {
    pub fn allows(&self, user: &str, perm: Permission) -> bool {
        self.0.get(user).is_some_and(|p| p.contains(&perm))
    }

    pub fn grant(&mut self, user: &str, perm: Permission) {
        self.0.entry(user.to_owned()).or_default().insert(perm);
    }

    /// Returns whether anything changed.
    pub fn revoke(&mut self, user: &str, perm: Permission) -> bool {
        let Some(set) = self.0.get_mut(user) else {
            return false;
        };
        let changed = set.remove(&perm);
        if set.is_empty() {
            self.0.remove(user);
        }
        changed
    }

    /// Drops every grant to `user`; returns whether there were any.
    pub fn forget(&mut self, user: &str) -> bool {
        self.0.remove(user).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `alice:list,deploy bob:list`, for tables.
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|(u, p)| {
                let p: Vec<&str> = p.iter().map(|p| p.as_str()).collect();
                format!("{u}:{}", p.join(","))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_revoke_and_json() {
        let mut acl = Acl::default();
        acl.grant("alice", Permission::List);
        acl.grant("alice", Permission::Deploy);
        assert!(acl.allows("alice", Permission::Deploy));
        assert!(!acl.allows("alice", Permission::Modify));
        assert!(!acl.allows("bob", Permission::List));
        let json = serde_json::to_string(&acl).unwrap();
        assert_eq!(json, r#"{"alice":["list","deploy"]}"#);
        assert_eq!(serde_json::from_str::<Acl>(&json).unwrap(), acl);
        assert!(acl.revoke("alice", Permission::Deploy));
        assert!(!acl.revoke("alice", Permission::Deploy));
        assert!(acl.revoke("alice", Permission::List));
        assert!(acl.is_empty());
        assert_eq!("modify".parse::<Permission>(), Ok(Permission::Modify));
        assert_eq!("user".parse::<Role>(), Ok(Role::User));
    }
}
