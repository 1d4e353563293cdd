//! The Controller's state directory: created on first start (mode 0700),
//! reused after.
//!
//! - `controller.key`: the static X25519 private key, hex (0600). Agents pin
//!   its public half (`shoal.controller_key=`).
//! - `enrol.psk`: the site enrolment secret, 32 random bytes in hex (0600);
//!   agents carry it as `shoal.enrol_key=`.
//! - `admin.token`: the admin API's bearer token, hex (0600).
//! - `shoal.db`: the SQLite database (`db.rs`).
//!
//! Files are written to a temporary name and renamed, so a crash never
//! leaves half a key.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use log::{info, warn};
use shoal_protocol::channel::{self, ChannelError, Keypair, Psk, KEY_LEN};

pub const KEY_FILE: &str = "controller.key";
pub const PSK_FILE: &str = "enrol.psk";
pub const TOKEN_FILE: &str = "admin.token";
pub const DB_FILE: &str = "shoal.db";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create the state directory {0}")]
    CreateDir(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("{0} does not hold a key")]
    BadKey(PathBuf, #[source] ChannelError),
    #[error("cannot derive the public key from {0}")]
    Derive(PathBuf, #[source] ChannelError),
    #[error("{0} is empty")]
    EmptyToken(PathBuf),
    #[error("cannot read random bytes from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// The keys and secrets in a state directory.
#[derive(Debug, Clone)]
pub struct State {
    pub dir: PathBuf,
    pub keypair: Keypair,
    pub psk: Psk,
    pub admin_token: String,
}

impl State {
    /// Opens `dir`, creating it and any missing key file.
    pub fn open_or_create(dir: &Path) -> Result<State, StateError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| StateError::CreateDir(dir.into(), e))?;
            info!("created state directory {}", dir.display());
        }
        let key_path = dir.join(KEY_FILE);
        let private = load_or_create_key(&key_path)?;
        let keypair =
            Keypair::from_private(private).map_err(|e| StateError::Derive(key_path.clone(), e))?;
        let psk = load_or_create_key(&dir.join(PSK_FILE))?;
        let token_path = dir.join(TOKEN_FILE);
        if !token_path.exists() {
            write_secret(&token_path, &channel::to_hex(&random_bytes()?))?;
            info!("created {}", token_path.display());
        }
        let admin_token = read_secret(&token_path)?;
        if admin_token.is_empty() {
            return Err(StateError::EmptyToken(token_path));
        }
        Ok(State {
            dir: dir.into(),
            keypair,
            psk,
            admin_token,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    pub fn public_hex(&self) -> String {
        channel::to_hex(&self.keypair.public)
    }

    /// The agent's kernel command line for a Controller at `controller`
    /// (`HOST:PORT`).
    pub fn kernel_cmdline(&self, controller: &str) -> String {
        format!(
            "shoal.controller={controller} shoal.controller_key={} shoal.enrol_key={}",
            self.public_hex(),
            channel::to_hex(&self.psk)
        )
    }
}

/// Reads the admin token from a state directory without touching anything
/// else (what `shoalctl --state DIR` does).
pub fn read_admin_token(dir: &Path) -> Result<String, StateError> {
    let path = dir.join(TOKEN_FILE);
    let token = read_secret(&path)?;
    if token.is_empty() {
        return Err(StateError::EmptyToken(path));
    }
    Ok(token)
}

fn load_or_create_key(path: &Path) -> Result<[u8; KEY_LEN], StateError> {
    if !path.exists() {
        write_secret(path, &channel::to_hex(&random_bytes()?))?;
        info!("created {}", path.display());
    }
    let text = read_secret(path)?;
    channel::key_from_hex(&text).map_err(|e| StateError::BadKey(path.into(), e))
}

fn read_secret(path: &Path) -> Result<String, StateError> {
    let read = |e| StateError::Read(path.into(), e);
    let mut f = fs::File::open(path).map_err(read)?;
    let mode = f.metadata().map_err(read)?.permissions().mode();
    if mode & 0o077 != 0 {
        warn!(
            "{} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    Ok(text.trim().to_owned())
}

fn write_secret(path: &Path, text: &str) -> Result<(), StateError> {
    let write = |e| StateError::Write(path.into(), e);
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(write)?;
    f.write_all(format!("{text}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write)?;
    fs::rename(&tmp, path).map_err(write)
}

/// A fresh random token (64 hex digits), e.g. for a new admin API user.
pub fn new_token() -> Result<String, StateError> {
    Ok(channel::to_hex(&random_bytes()?))
}

/// 32 fresh random bytes from the OS (e.g. a deploy's distribution session).
pub fn random_id() -> Result<[u8; 32], StateError> {
    random_bytes()
}

fn random_bytes() -> Result<[u8; KEY_LEN], StateError> {
    let mut out = [0u8; KEY_LEN];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .map_err(StateError::Random)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let a = State::open_or_create(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        for f in [KEY_FILE, PSK_FILE, TOKEN_FILE] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let b = State::open_or_create(&dir).unwrap();
        assert_eq!(a.keypair.public, b.keypair.public);
        assert_eq!(a.psk, b.psk);
        assert_eq!(a.admin_token, b.admin_token);
        assert_ne!(a.psk, a.keypair.private);
        assert_eq!(read_admin_token(&dir).unwrap(), a.admin_token);
        let line = a.kernel_cmdline("10.0.0.1:7000");
        assert!(line.starts_with("shoal.controller=10.0.0.1:7000 shoal.controller_key="));
    }

    #[test]
    fn a_bad_key_file_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(KEY_FILE), "not hex").unwrap();
        let e = State::open_or_create(tmp.path()).unwrap_err();
        assert!(e.to_string().contains("controller.key"), "{e}");
    }
}
