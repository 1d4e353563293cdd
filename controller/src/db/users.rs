//! Admin API users (migration 2): a name, a role (`admin` or `user`) and
//! the SHA-256 of the user's token, never the token itself. The bootstrap
//! admin is `STATE/admin.token` (user `admin`) and is not in this table.
//! Also the `settings` table (key/value text), e.g. where the image store is.

use rusqlite::{params, OptionalExtension};
use sha2::{Digest, Sha256};

use super::{time_col, Ctx, Db, DbError};
use crate::store::Role;

/// The `settings` key holding the image store directory (`serve --images`).
pub const IMAGES_DIR_SETTING: &str = "images_dir";

/// A user as listed by the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub created_at: Option<String>,
}

/// The SHA-256 of a token, in hex (what the table keeps).
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn role_col(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Role> {
    let text: String = row.get(idx)?;
    text.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, e.into())
    })
}

impl Db {
    /// Adds a user; `false` if the name is taken.
    pub fn create_user(
        &mut self,
        name: &str,
        role: Role,
        token_sha256: &str,
        now: i64,
    ) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO users (name, role, token_sha256, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![name, role.as_str(), token_sha256, now],
            )
            .ctx("add a user")?;
        Ok(n == 1)
    }

    pub fn users(&self) -> Result<Vec<User>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT name, role, created_at FROM users ORDER BY name")
            .ctx("list users")?;
        let rows = st
            .query_map([], |r| {
                Ok(User {
                    name: r.get(0)?,
                    role: role_col(r, 1)?,
                    created_at: time_col(r, 2)?,
                })
            })
            .ctx("list users")?;
        rows.collect::<Result<_, _>>().ctx("list users")
    }

    /// Removes a user; `false` if there was none.
    pub fn remove_user(&mut self, name: &str) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute("DELETE FROM users WHERE name = ?1", [name])
            .ctx("remove a user")?;
        Ok(n == 1)
    }

    /// The user whose token hashes to `token_sha256`.
    pub fn user_by_token(&self, token_sha256: &str) -> Result<Option<(String, Role)>, DbError> {
        self.conn
            .query_row(
                "SELECT name, role FROM users WHERE token_sha256 = ?1",
                [token_sha256],
                |r| Ok((r.get(0)?, role_col(r, 1)?)),
            )
            .optional()
            .ctx("look up a token")
    }

    pub fn user_role(&self, name: &str) -> Result<Option<Role>, DbError> {
        self.conn
            .query_row("SELECT role FROM users WHERE name = ?1", [name], |r| {
                role_col(r, 0)
            })
            .optional()
            .ctx("look up a user's role")
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .ctx("read a setting")
    }

    pub fn set_setting(&mut self, key: &str, value: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .ctx("write a setting")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_by_token_hash_and_settings() {
        let mut db = Db::open_in_memory().unwrap();
        let h = token_sha256("secret");
        assert_eq!(h.len(), 64);
        assert!(db.create_user("alice", Role::User, &h, 1000).unwrap());
        assert!(!db.create_user("alice", Role::Admin, "x", 1000).unwrap());
        assert_eq!(
            db.user_by_token(&h).unwrap(),
            Some(("alice".into(), Role::User))
        );
        assert_eq!(db.user_by_token(&token_sha256("other")).unwrap(), None);
        assert_eq!(db.user_role("alice").unwrap(), Some(Role::User));
        assert_eq!(db.users().unwrap().len(), 1);
        assert!(db.remove_user("alice").unwrap());
        assert!(!db.remove_user("alice").unwrap());
        assert_eq!(db.setting("k").unwrap(), None);
        db.set_setting("k", "a").unwrap();
        db.set_setting("k", "b").unwrap();
        assert_eq!(db.setting("k").unwrap().as_deref(), Some("b"));
    }
}
