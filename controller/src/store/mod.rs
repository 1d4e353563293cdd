//! The image store (`docs/image-store.md`): a directory the Controller
//! owns (default `STATE/images`, `serve --images DIR`), following the WDS
//! image store of the seeds. Its first-level folders are image groups;
//! `NAME.shoal` files at the first level of a group are images, and nothing
//! deeper is enumerated. A group's settings (compression, ACL) are in
//! `GROUP/.group.json`; an image's own ACL in the sidecar
//! `GROUP/NAME.acl.json`, so the directory carries its security with it
//! when it is copied or restored, as the seed's ACLs on `.wim` files do.
//!
//! Every image is verified (structure and every chunk's hashes) when it is
//! added, replaced or exported; writes go to a temporary file in the group
//! folder, are fsynced and verified, then renamed over, so a failure leaves
//! the old image byte-identical. Compression follows the seed's table
//! ([`expected_compression`]). Access: admins may do everything; users only
//! what group and image ACLs grant ([`Permission`]).
//!
//! Methods are synchronous (file I/O, encoding): call them from the
//! blocking pool. Submodules: `acl` (roles, permissions, ACLs), `codec`
//! (encoding, qcow2, verification), `http` (admin API endpoints),
//! `client` (what `shoalctl` uses).

mod acl;
pub mod client;
mod codec;
pub mod http;

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use shoal_protocol::image::{ChunkError, ChunkKind, Compression, Image, ImageError, Metadata};

pub use acl::{Acl, Permission, Role};
pub use codec::{detect, read_image, verify_file, SourceKind};

use crate::db::{DbError, IMAGES_DIR_SETTING};

/// The group settings file inside a group folder.
pub const GROUP_FILE: &str = ".group.json";
/// Image files are `NAME.shoal`.
pub const IMAGE_EXT: &str = "shoal";
/// Image ACL sidecars are `NAME.acl.json`.
pub const ACL_SUFFIX: &str = ".acl.json";
/// The bootstrap admin (`STATE/admin.token`).
pub const BOOTSTRAP_ADMIN: &str = "admin";
/// Longest group, image or user name.
pub const MAX_NAME: usize = 100;
/// The store under the state directory unless `serve --images` says.
pub const DEFAULT_DIR: &str = "images";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("bad name {0:?}: use 1 to 100 of A-Z a-z 0-9 . _ - and do not start with '.'")]
    BadName(String),
    #[error("no image group {0:?}")]
    NoGroup(String),
    #[error("image group {0:?} exists")]
    GroupExists(String),
    #[error("no image {0}/{1}")]
    NoImage(String, String),
    #[error("image {0}/{1} exists")]
    ImageExists(String, String),
    #[error("user {user:?} may not {perm} {object}")]
    Forbidden {
        user: String,
        perm: Permission,
        object: String,
    },
    #[error("user {0:?} is not an admin: only admins may {1}")]
    AdminOnly(String, &'static str),
    #[error("image group {group:?} stores {have} images, not {asked} (change it with `image group set`)")]
    CompressionMismatch {
        group: String,
        have: Compression,
        asked: Compression,
    },
    #[error("{0} exists")]
    Exists(PathBuf),
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    #[error("{0} is empty")]
    Empty(PathBuf),
    #[error("{0} is truncated ({1} bytes)")]
    Truncated(PathBuf, u64),
    #[error("{0} changed size while it was read")]
    Shrank(PathBuf),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] io::Error),
    #[error("{0} is not a valid image")]
    Invalid(PathBuf, #[source] ImageError),
    #[error("{0} is corrupt")]
    Corrupt(PathBuf, #[source] ChunkError),
    #[error("cannot encode {0}")]
    Encode(PathBuf, #[source] ImageError),
    #[error("{0} does not verify as the image just written")]
    Changed(PathBuf),
    #[error("cannot convert {0} from qcow2: {1}")]
    Qemu(PathBuf, String),
    #[error("bad settings file {0}")]
    Settings(PathBuf, #[source] serde_json::Error),
    #[error("cannot look up users")]
    Users(#[source] DbError),
    #[error("no image store: the database has no directory to put it next to")]
    NoStore,
}

impl StoreError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        use StoreError::*;
        match self {
            NoGroup(_) | NoImage(..) => 404,
            Forbidden { .. } | AdminOnly(..) => 403,
            GroupExists(_) | ImageExists(..) | Exists(_) => 409,
            BadName(_)
            | CompressionMismatch { .. }
            | NotAFile(_)
            | Empty(_)
            | Truncated(..)
            | Shrank(_)
            | Invalid(..)
            | Corrupt(..)
            | Encode(..)
            | Qemu(..) => 400,
            Read(..) => 400,
            Write(..) | Changed(_) | Settings(..) | Users(_) | NoStore => 500,
        }
    }
}

/// Where the store learns a user's role (the `users` table; a map in tests).
pub trait Roles: Send + Sync {
    fn role(&self, user: &str) -> Result<Option<Role>, StoreError>;
}

impl Roles for crate::db::Store {
    fn role(&self, user: &str) -> Result<Option<Role>, StoreError> {
        self.blocking(|db| db.user_role(user))
            .map_err(StoreError::Users)
    }
}

impl Roles for HashMap<String, Role> {
    fn role(&self, user: &str) -> Result<Option<Role>, StoreError> {
        Ok(self.get(user).copied())
    }
}

/// A group's shared settings (`GROUP/.group.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupSettings {
    /// Unset until the first image is added.
    #[serde(default)]
    pub compression: Option<Compression>,
    #[serde(default)]
    pub acl: Acl,
}

/// A group as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub compression: Option<Compression>,
    /// Images the caller may list.
    pub images: usize,
    /// The group's ACL (admins only; empty for users).
    pub acl: Acl,
}

/// An image as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub group: String,
    pub name: String,
    /// The image ID (SHA-256 of its chunk table), hex.
    pub id: String,
    pub compression: Compression,
    /// Volume bytes.
    pub source_size: u64,
    /// Bytes of the `.shoal` file.
    pub stored_size: u64,
    pub chunk_size: u32,
    pub chunks: u64,
    pub description: String,
    pub created_by: String,
    /// Unix seconds.
    pub created_at: u64,
}

/// `image show`: the listing plus metadata, chunk kinds and ACLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageDetail {
    #[serde(flatten)]
    pub info: ImageInfo,
    pub metadata: Metadata,
    pub zero_chunks: u64,
    pub raw_chunks: u64,
    pub zstd_chunks: u64,
    /// The image's own ACL (admins only; empty for users).
    pub acl: Acl,
    /// The group's ACL (admins only; empty for users).
    pub group_acl: Acl,
}

/// `image verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    pub group: String,
    pub name: String,
    pub id: String,
    pub chunks: u64,
    pub stored_size: u64,
}

/// `image export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exported {
    pub group: String,
    pub name: String,
    pub path: PathBuf,
    pub id: String,
    pub compression: Compression,
    pub stored_size: u64,
}

/// What the deploy path gets: a verified-at-add image, re-parsed now.
#[derive(Debug, Clone)]
pub struct ImageRef {
    pub group: String,
    pub name: String,
    pub path: PathBuf,
    pub image: Image,
}

/// `image add`.
#[derive(Debug, Clone, Default)]
pub struct AddRequest {
    pub group: String,
    /// A raw volume, a qcow2 disk or a Shoal image, on this host.
    pub source: PathBuf,
    /// Default: the source's file name without its extension.
    pub name: Option<String>,
    pub compression: Option<Compression>,
    pub description: Option<String>,
}

/// The actions of the seed's compression table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create an image group.
    CreateGroup,
    /// Add the first image; `image` is the image's compression.
    AddFirst { image: Compression },
    /// Add a later image to a group of compression `group`.
    AddLater { group: Compression },
    /// Export an image from a group of compression `group`.
    Export { group: Compression },
    /// Capture an image (from a volume), optionally asking for one.
    Capture { asked: Option<Compression> },
}

/// The seed's table: the compression an action yields (`None`: unset).
pub fn expected_compression(action: Action) -> Option<Compression> {
    match action {
        Action::CreateGroup => None,
        Action::AddFirst { image } => Some(image),
        Action::AddLater { group } | Action::Export { group } => Some(group),
        Action::Capture { asked } => Some(asked.unwrap_or(Compression::Fast)),
    }
}

/// Group, image and user names: `[A-Za-z0-9._-]{1,100}`, no leading dot.
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn info_of(group: &str, name: &str, image: &Image, len: u64) -> ImageInfo {
    let m = &image.header.metadata;
    ImageInfo {
        group: group.to_owned(),
        name: name.to_owned(),
        id: image.id_hex(),
        compression: image.header.compression,
        source_size: m.source_size,
        stored_size: len,
        chunk_size: image.header.chunk_size,
        chunks: image.chunks.len() as u64,
        description: m.description.clone(),
        created_by: m.created_by.clone(),
        created_at: m.created_at,
    }
}

/// Writes `text` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, text: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let write = |e| StoreError::Write(path.into(), e);
    let mut tmp = tempfile::Builder::new()
        .prefix(".settings-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(write)?;
    io::Write::write_all(tmp.as_file_mut(), text).map_err(write)?;
    tmp.as_file().sync_all().map_err(write)?;
    tmp.persist(path).map_err(|e| write(e.error))?;
    sync_dir(dir);
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        warn!("cannot fsync {}: {e}", dir.display());
    }
}

/// A failure hook run after a new image is written and fsynced, before it
/// is verified and renamed (tests inject failures with it).
pub type Hook<'a> = &'a dyn Fn(&Path) -> io::Result<()>;

fn no_hook(_: &Path) -> io::Result<()> {
    Ok(())
}

/// The image store.
pub struct ImageStore {
    root: PathBuf,
    roles: Arc<dyn Roles>,
    /// Serialises changes (adds, replaces, removals, settings).
    writes: Mutex<()>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens the store at `root`, creating the directory if missing.
    pub fn open(root: impl Into<PathBuf>, roles: Arc<dyn Roles>) -> Result<ImageStore, StoreError> {
        let root = root.into();
        if !root.is_dir() {
            std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
                .create(&root)
                .map_err(|e| StoreError::Write(root.clone(), e))?;
            info!("created image store {}", root.display());
        }
        Ok(ImageStore {
            root,
            roles,
            writes: Mutex::new(()),
        })
    }

    /// The store the Controller with database `db` uses: the directory in
    /// the `images_dir` setting (`serve --images`), else `images/` next to
    /// the database; roles from the `users` table. Blocking.
    pub fn from_db(db: &crate::db::Store) -> Result<ImageStore, StoreError> {
        let (setting, path) = db
            .blocking(|d| Ok((d.setting(IMAGES_DIR_SETTING)?, d.path())))
            .map_err(StoreError::Users)?;
        let root = match (setting, path) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, Some(p)) => p
                .parent()
                .map(|d| d.join(DEFAULT_DIR))
                .ok_or(StoreError::NoStore)?,
            (None, None) => return Err(StoreError::NoStore),
        };
        ImageStore::open(root, Arc::new(db.clone()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_admin(&self, user: &str) -> Result<bool, StoreError> {
        Ok(user == BOOTSTRAP_ADMIN || self.roles.role(user)? == Some(Role::Admin))
    }

    fn require_admin(&self, user: &str, what: &'static str) -> Result<(), StoreError> {
        if self.is_admin(user)? {
            Ok(())
        } else {
            Err(StoreError::AdminOnly(user.to_owned(), what))
        }
    }

    fn group_dir(&self, group: &str) -> Result<PathBuf, StoreError> {
        check_name(group)?;
        let dir = self.root.join(group);
        if dir.is_dir() {
            Ok(dir)
        } else {
            Err(StoreError::NoGroup(group.to_owned()))
        }
    }

    fn image_path(&self, group: &str, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        let path = self.group_dir(group)?.join(format!("{name}.{IMAGE_EXT}"));
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Ok(path),
            _ => Err(StoreError::NoImage(group.to_owned(), name.to_owned())),
        }
    }

    fn acl_path(&self, group: &str, name: &str) -> PathBuf {
        self.root.join(group).join(format!("{name}{ACL_SUFFIX}"))
    }

    /// A group's settings (defaults if it has no settings file).
    pub fn group_settings(&self, group: &str) -> Result<GroupSettings, StoreError> {
        let path = self.group_dir(group)?.join(GROUP_FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Settings(path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(GroupSettings::default()),
            Err(e) => Err(StoreError::Read(path, e)),
        }
    }

    fn save_group(&self, group: &str, s: &GroupSettings) -> Result<(), StoreError> {
        let path = self.group_dir(group)?.join(GROUP_FILE);
        let text =
            serde_json::to_vec_pretty(s).map_err(|e| StoreError::Settings(path.clone(), e))?;
        write_atomic(&path, &text)
    }

    fn image_acl(&self, group: &str, name: &str) -> Result<Acl, StoreError> {
        let path = self.acl_path(group, name);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Settings(path, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Acl::default()),
            Err(e) => Err(StoreError::Read(path, e)),
        }
    }

    fn save_image_acl(&self, group: &str, name: &str, acl: &Acl) -> Result<(), StoreError> {
        let path = self.acl_path(group, name);
        if acl.is_empty() {
            return match fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Write(path, e)),
                _ => Ok(()),
            };
        }
        let text =
            serde_json::to_vec_pretty(acl).map_err(|e| StoreError::Settings(path.clone(), e))?;
        write_atomic(&path, &text)
    }

    /// Whether `user` holds `perm` on the group, or on the image (whose
    /// grants add to the group's).
    fn allowed(
        &self,
        user: &str,
        perm: Permission,
        group: &str,
        name: Option<&str>,
    ) -> Result<bool, StoreError> {
        if self.is_admin(user)? {
            return Ok(true);
        }
        if self.group_settings(group)?.acl.allows(user, perm) {
            return Ok(true);
        }
        match name {
            Some(n) => Ok(self.image_acl(group, n)?.allows(user, perm)),
            None => Ok(false),
        }
    }

    fn check(
        &self,
        user: &str,
        perm: Permission,
        group: &str,
        name: Option<&str>,
    ) -> Result<(), StoreError> {
        let object = match name {
            Some(n) => {
                self.image_path(group, n)?;
                format!("image {group}/{n}")
            }
            None => {
                self.group_dir(group)?;
                format!("image group {group}")
            }
        };
        if self.allowed(user, perm, group, name)? {
            Ok(())
        } else {
            Err(StoreError::Forbidden {
                user: user.to_owned(),
                perm,
                object,
            })
        }
    }

    /// Group names, sorted: first-level folders with a valid name.
    fn group_names(&self) -> Result<Vec<String>, StoreError> {
        let read = |e| StoreError::Read(self.root.clone(), e);
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(read)? {
            let entry = entry.map_err(read)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map_err(read)?.is_dir() && check_name(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Image names in a group, sorted: `NAME.shoal` regular files at the
    /// group's first level only (folders inside a group are not looked in).
    fn image_names(&self, group: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.group_dir(group)?;
        let read = |e| StoreError::Read(dir.clone(), e);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read)? {
            let entry = entry.map_err(read)?;
            if !entry.file_type().map_err(read)?.is_file() {
                continue;
            }
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(&format!(".{IMAGE_EXT}")) {
                if check_name(name).is_ok() {
                    out.push(name.to_owned());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    // ---- groups ----

    /// Creates an empty group (no compression type yet). Admins only.
    pub fn create_group(&self, user: &str, group: &str) -> Result<GroupInfo, StoreError> {
        self.require_admin(user, "create image groups")?;
        check_name(group)?;
        let _w = self.lock();
        let dir = self.root.join(group);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::GroupExists(group.to_owned()))
            }
            Err(e) => return Err(StoreError::Write(dir, e)),
        }
        let settings = GroupSettings {
            compression: expected_compression(Action::CreateGroup),
            acl: Acl::default(),
        };
        self.save_group(group, &settings)?;
        sync_dir(&self.root);
        info!("{user}: created image group {group}");
        Ok(GroupInfo {
            name: group.to_owned(),
            compression: settings.compression,
            images: 0,
            acl: settings.acl,
        })
    }

    /// The groups `user` may see: admins all; users those whose ACL, or
    /// the ACL of an image in them, grants `list`.
    pub fn groups(&self, user: &str) -> Result<Vec<GroupInfo>, StoreError> {
        let admin = self.is_admin(user)?;
        let mut out = Vec::new();
        for g in self.group_names()? {
            let settings = self.group_settings(&g)?;
            let images = self.images(user, Some(&g))?.len();
            if admin || settings.acl.allows(user, Permission::List) || images > 0 {
                out.push(GroupInfo {
                    name: g,
                    compression: settings.compression,
                    images,
                    acl: if admin { settings.acl } else { Acl::default() },
                });
            }
        }
        Ok(out)
    }

    /// Sets a group's compression and re-encodes its images to it (each
    /// verified and renamed over, as a replace). Admins only.
    pub fn set_group(
        &self,
        user: &str,
        group: &str,
        compression: Compression,
    ) -> Result<GroupInfo, StoreError> {
        self.require_admin(user, "change image groups")?;
        let _w = self.lock();
        let mut settings = self.group_settings(group)?;
        let dir = self.group_dir(group)?;
        for name in self.image_names(group)? {
            let path = dir.join(format!("{name}.{IMAGE_EXT}"));
            let (image, _) = read_image(&path)?;
            if image.header.compression != compression {
                self.commit(&dir, &path, false, &no_hook, |out, out_path| {
                    codec::transcode(&path, out, out_path, compression, |_| {})
                })?;
                info!("{user}: re-encoded {group}/{name} as {compression}");
            }
        }
        settings.compression = Some(compression);
        self.save_group(group, &settings)?;
        info!("{user}: image group {group} now stores {compression} images");
        Ok(GroupInfo {
            name: group.to_owned(),
            compression: settings.compression,
            images: self.image_names(group)?.len(),
            acl: settings.acl,
        })
    }

    // ---- images ----

    /// Writes an image to a temporary file in `dir` with `produce`,
    /// fsyncs it, runs `hook`, verifies it, and renames it to `dest`
    /// (refusing to overwrite if `noclobber`). On any error the temporary
    /// file is removed and `dest` is untouched.
    fn commit(
        &self,
        dir: &Path,
        dest: &Path,
        noclobber: bool,
        hook: Hook<'_>,
        produce: impl FnOnce(&mut File, &Path) -> Result<Image, StoreError>,
    ) -> Result<(Image, u64), StoreError> {
        let mut tmp = tempfile::Builder::new()
            .prefix(".incoming-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| StoreError::Write(dir.into(), e))?;
        let tmp_path = tmp.path().to_owned();
        let made = produce(tmp.as_file_mut(), &tmp_path)?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| StoreError::Write(tmp_path.clone(), e))?;
        hook(&tmp_path).map_err(|e| StoreError::Write(tmp_path.clone(), e))?;
        let (checked, len) = verify_file(&tmp_path)?;
        if checked.id != made.id {
            return Err(StoreError::Changed(tmp_path));
        }
        let persisted = if noclobber {
            tmp.persist_noclobber(dest)
        } else {
            tmp.persist(dest)
        };
        persisted.map_err(|e| match e.error.kind() {
            io::ErrorKind::AlreadyExists => StoreError::Exists(dest.into()),
            _ => StoreError::Write(dest.into(), e.error),
        })?;
        sync_dir(dir);
        Ok((checked, len))
    }

    /// Encodes `source` (raw, qcow2 or Shoal) at `compression` into `dest`
    /// through [`ImageStore::commit`].
    #[allow(clippy::too_many_arguments)]
    fn encode_into(
        &self,
        dir: &Path,
        dest: &Path,
        noclobber: bool,
        hook: Hook<'_>,
        source: &Path,
        kind: SourceKind,
        compression: Compression,
        meta: Metadata,
    ) -> Result<(Image, u64), StoreError> {
        match kind {
            SourceKind::Shoal => self.commit(dir, dest, noclobber, hook, |out, p| {
                codec::transcode(source, out, p, compression, |m| {
                    m.name = meta.name.clone();
                    if !meta.description.is_empty() {
                        m.description = meta.description.clone();
                    }
                })
            }),
            SourceKind::Raw => self.commit(dir, dest, noclobber, hook, |out, p| {
                codec::encode_raw(source, out, p, meta, compression)
            }),
            SourceKind::Qcow2 => {
                let raw = tempfile::Builder::new()
                    .prefix(".qcow2-raw-")
                    .suffix(".tmp")
                    .tempfile_in(dir)
                    .map_err(|e| StoreError::Write(dir.into(), e))?;
                codec::qcow2_to_raw(source, raw.path())?;
                self.commit(dir, dest, noclobber, hook, |out, p| {
                    codec::encode_raw(raw.path(), out, p, meta, compression)
                })
            }
        }
    }

    /// The compression an incoming image of `kind` gets in a group whose
    /// compression is `group_c`, applying the seed's table.
    fn incoming_compression(
        group: &str,
        group_c: Option<Compression>,
        kind: SourceKind,
        source: &Path,
        asked: Option<Compression>,
    ) -> Result<Compression, StoreError> {
        match group_c {
            Some(have) => match asked {
                Some(a) if a != have => Err(StoreError::CompressionMismatch {
                    group: group.to_owned(),
                    have,
                    asked: a,
                }),
                _ => Ok(expected_compression(Action::AddLater { group: have }).unwrap_or(have)),
            },
            None => {
                let image = match (asked, kind) {
                    (Some(a), _) => a,
                    (None, SourceKind::Shoal) => read_image(source)?.0.header.compression,
                    // A volume made into an image is a capture: fast.
                    (None, _) => {
                        expected_compression(Action::Capture { asked: None }).unwrap_or_default()
                    }
                };
                Ok(expected_compression(Action::AddFirst { image }).unwrap_or(image))
            }
        }
    }

    /// Adds an image: needs `modify` on the group. The first image sets
    /// the group's compression; later ones are converted to it.
    pub fn add(&self, user: &str, req: &AddRequest) -> Result<ImageInfo, StoreError> {
        let group = req.group.as_str();
        let name = match &req.name {
            Some(n) => n.clone(),
            None => req
                .source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        check_name(&name)?;
        self.check(user, Permission::Modify, group, None)?;
        let kind = detect(&req.source)?;
        let _w = self.lock();
        let dir = self.group_dir(group)?;
        let dest = dir.join(format!("{name}.{IMAGE_EXT}"));
        if dest.exists() {
            return Err(StoreError::ImageExists(group.to_owned(), name));
        }
        let mut settings = self.group_settings(group)?;
        let compression = Self::incoming_compression(
            group,
            settings.compression,
            kind,
            &req.source,
            req.compression,
        )?;
        let meta = Metadata {
            name: name.clone(),
            description: req.description.clone().unwrap_or_default(),
            created_by: user.to_owned(),
            created_at: unix_now(),
            ..Metadata::default()
        };
        let (image, len) = self
            .encode_into(
                &dir,
                &dest,
                true,
                &no_hook,
                &req.source,
                kind,
                compression,
                meta,
            )
            .map_err(|e| match e {
                StoreError::Exists(_) => StoreError::ImageExists(group.to_owned(), name.clone()),
                other => other,
            })?;
        if settings.compression.is_none() {
            settings.compression = Some(compression);
            self.save_group(group, &settings)?;
        }
        info!(
            "{user}: added {group}/{name} from {} ({kind:?}, {compression}, id {})",
            req.source.display(),
            image.id_hex()
        );
        Ok(info_of(group, &name, &image, len))
    }

    /// The images `user` may list, in one group or all.
    pub fn images(&self, user: &str, group: Option<&str>) -> Result<Vec<ImageInfo>, StoreError> {
        let groups = match group {
            Some(g) => {
                self.group_dir(g)?;
                vec![g.to_owned()]
            }
            None => self.group_names()?,
        };
        let mut out = Vec::new();
        for g in groups {
            for name in self.image_names(&g)? {
                if !self.allowed(user, Permission::List, &g, Some(&name))? {
                    continue;
                }
                let path = self.root.join(&g).join(format!("{name}.{IMAGE_EXT}"));
                match read_image(&path) {
                    Ok((image, len)) => out.push(info_of(&g, &name, &image, len)),
                    Err(e) => warn!(
                        "image store: skipping {g}/{name}: {}",
                        crate::error_chain(&e)
                    ),
                }
            }
        }
        Ok(out)
    }

    /// One image in detail (`list` permission).
    pub fn show(&self, user: &str, group: &str, name: &str) -> Result<ImageDetail, StoreError> {
        self.check(user, Permission::List, group, Some(name))?;
        let (image, len) = read_image(&self.image_path(group, name)?)?;
        let count = |k: ChunkKind| image.chunks.iter().filter(|c| c.kind == k).count() as u64;
        let admin = self.is_admin(user)?;
        Ok(ImageDetail {
            info: info_of(group, name, &image, len),
            metadata: image.header.metadata.clone(),
            zero_chunks: count(ChunkKind::Zero),
            raw_chunks: count(ChunkKind::Raw),
            zstd_chunks: count(ChunkKind::Zstd),
            acl: if admin {
                self.image_acl(group, name)?
            } else {
                Acl::default()
            },
            group_acl: if admin {
                self.group_settings(group)?.acl
            } else {
                Acl::default()
            },
        })
    }

    /// Verifies every chunk of a stored image (`list` permission).
    pub fn verify(&self, user: &str, group: &str, name: &str) -> Result<Verified, StoreError> {
        self.check(user, Permission::List, group, Some(name))?;
        let (image, len) = verify_file(&self.image_path(group, name)?)?;
        Ok(Verified {
            group: group.to_owned(),
            name: name.to_owned(),
            id: image.id_hex(),
            chunks: image.chunks.len() as u64,
            stored_size: len,
        })
    }

    /// Exports an image to `dest` (which must not exist) at the group's
    /// compression; the exported file is verified before it is renamed
    /// into place (`deploy` permission: it hands out the image's bytes).
    pub fn export(
        &self,
        user: &str,
        group: &str,
        name: &str,
        dest: &Path,
    ) -> Result<Exported, StoreError> {
        self.export_with_hook(user, group, name, dest, &no_hook)
    }

    /// [`ImageStore::export`] with a failure hook (tests).
    pub fn export_with_hook(
        &self,
        user: &str,
        group: &str,
        name: &str,
        dest: &Path,
        hook: Hook<'_>,
    ) -> Result<Exported, StoreError> {
        self.check(user, Permission::Deploy, group, Some(name))?;
        let src = self.image_path(group, name)?;
        if dest.exists() {
            return Err(StoreError::Exists(dest.into()));
        }
        let (current, _) = read_image(&src)?;
        let group_c = self.group_settings(group)?.compression;
        let compression = group_c
            .and_then(|g| expected_compression(Action::Export { group: g }))
            .unwrap_or(current.header.compression);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let (image, len) = self.commit(&dir, dest, true, hook, |out, p| {
            codec::transcode(&src, out, p, compression, |_| {})
        })?;
        info!(
            "{user}: exported {group}/{name} to {} ({compression})",
            dest.display()
        );
        Ok(Exported {
            group: group.to_owned(),
            name: name.to_owned(),
            path: dest.into(),
            id: image.id_hex(),
            compression,
            stored_size: len,
        })
    }

    /// Replaces an image's content with `source` (raw, qcow2 or Shoal) at
    /// the group's compression (`modify` permission). Atomic.
    pub fn replace(
        &self,
        user: &str,
        group: &str,
        name: &str,
        source: &Path,
        description: Option<&str>,
    ) -> Result<ImageInfo, StoreError> {
        self.replace_with_hook(user, group, name, source, description, &no_hook)
    }

    /// [`ImageStore::replace`] with a failure hook run after the new image
    /// is written and fsynced (tests).
    pub fn replace_with_hook(
        &self,
        user: &str,
        group: &str,
        name: &str,
        source: &Path,
        description: Option<&str>,
        hook: Hook<'_>,
    ) -> Result<ImageInfo, StoreError> {
        self.check(user, Permission::Modify, group, Some(name))?;
        let kind = detect(source)?;
        let _w = self.lock();
        let dest = self.image_path(group, name)?;
        let dir = self.group_dir(group)?;
        let (old, _) = read_image(&dest)
            .inspect_err(|e| {
                warn!(
                    "replacing {group}/{name}, which does not parse: {}",
                    crate::error_chain(e)
                );
            })
            .ok()
            .unzip();
        let mut settings = self.group_settings(group)?;
        let compression =
            Self::incoming_compression(group, settings.compression, kind, source, None)?;
        let meta = Metadata {
            name: name.to_owned(),
            description: description
                .map(str::to_owned)
                .or_else(|| old.map(|o| o.header.metadata.description))
                .unwrap_or_default(),
            created_by: user.to_owned(),
            created_at: unix_now(),
            ..Metadata::default()
        };
        let (image, len) =
            self.encode_into(&dir, &dest, false, hook, source, kind, compression, meta)?;
        if settings.compression.is_none() {
            settings.compression = Some(compression);
            self.save_group(group, &settings)?;
        }
        info!(
            "{user}: replaced {group}/{name} from {} (id {})",
            source.display(),
            image.id_hex()
        );
        Ok(info_of(group, name, &image, len))
    }

    /// Removes an image and its ACL (`modify` permission).
    pub fn remove(&self, user: &str, group: &str, name: &str) -> Result<(), StoreError> {
        self.check(user, Permission::Modify, group, Some(name))?;
        let _w = self.lock();
        let path = self.image_path(group, name)?;
        fs::remove_file(&path).map_err(|e| StoreError::Write(path.clone(), e))?;
        self.save_image_acl(group, name, &Acl::default())?;
        sync_dir(&self.root.join(group));
        info!("{user}: removed {group}/{name}");
        Ok(())
    }

    // ---- ACLs ----

    /// Grants (`on = true`) or revokes `perm` to `target` on a group or an
    /// image. Admins only. Returns the ACL after the change.
    pub fn set_grant(
        &self,
        user: &str,
        on: bool,
        target: &str,
        perm: Permission,
        group: &str,
        name: Option<&str>,
    ) -> Result<Acl, StoreError> {
        self.require_admin(user, "change ACLs")?;
        check_name(target)?;
        let _w = self.lock();
        let apply = |acl: &mut Acl| {
            if on {
                acl.grant(target, perm)
            } else {
                acl.revoke(target, perm);
            }
        };
        let verb = if on { "granted" } else { "revoked" };
        match name {
            Some(n) => {
                self.image_path(group, n)?;
                let mut acl = self.image_acl(group, n)?;
                apply(&mut acl);
                self.save_image_acl(group, n, &acl)?;
                info!("{user}: {verb} {perm} on {group}/{n} to {target}");
                Ok(acl)
            }
            None => {
                let mut s = self.group_settings(group)?;
                apply(&mut s.acl);
                self.save_group(group, &s)?;
                info!("{user}: {verb} {perm} on group {group} to {target}");
                Ok(s.acl)
            }
        }
    }

    /// Drops every grant to `target` (when the user is removed), so a
    /// later user of the same name does not inherit them.
    pub fn forget_user(&self, target: &str) -> Result<(), StoreError> {
        let _w = self.lock();
        for g in self.group_names()? {
            let mut s = self.group_settings(&g)?;
            if s.acl.forget(target) {
                self.save_group(&g, &s)?;
            }
            for n in self.image_names(&g)? {
                let mut acl = self.image_acl(&g, &n)?;
                if acl.forget(target) {
                    self.save_image_acl(&g, &n, &acl)?;
                }
            }
        }
        Ok(())
    }

    // ---- deploy ----

    /// Ok if `user` may deploy `group/name` (admin, or `deploy` granted on
    /// the group or the image); `NoImage`, `NoGroup` or `Forbidden` if not.
    pub fn may_deploy(&self, user: &str, group: &str, name: &str) -> Result<(), StoreError> {
        self.check(user, Permission::Deploy, group, Some(name))
    }

    /// The image a deploy created by `user` may use, with its table
    /// re-parsed and validated (the chunks were verified when it was
    /// stored; the deploy verifies each chunk again as it sends/writes).
    pub fn resolve_for_deploy(
        &self,
        user: &str,
        group: &str,
        name: &str,
    ) -> Result<ImageRef, StoreError> {
        self.may_deploy(user, group, name)?;
        let path = self.image_path(group, name)?;
        let (image, _) = read_image(&path)?;
        Ok(ImageRef {
            group: group.to_owned(),
            name: name.to_owned(),
            path,
            image,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_compression_table() {
        use Compression::{Fast, Max};
        assert_eq!(expected_compression(Action::CreateGroup), None);
        for c in [Compression::None, Fast, Max] {
            assert_eq!(expected_compression(Action::AddFirst { image: c }), Some(c));
            assert_eq!(expected_compression(Action::AddLater { group: c }), Some(c));
            assert_eq!(expected_compression(Action::Export { group: c }), Some(c));
        }
        assert_eq!(
            expected_compression(Action::Capture { asked: None }),
            Some(Fast)
        );
        assert_eq!(
            expected_compression(Action::Capture { asked: Some(Max) }),
            Some(Max)
        );
    }

    #[test]
    fn names() {
        for ok in ["win11", "a.b-c_d", "X"] {
            check_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(101)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
