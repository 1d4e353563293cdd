//! The image store against real files: first-level-only enumeration, the
//! seed's compression table row by row, ACL filtering on list and deploy,
//! atomic replace after injected failures, verification catching a flipped
//! bit on add, export and replace, qcow2 adds through `qemu-img`, and users
//! and roles through the admin API.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_controller::store::client::StoreClient;
use shoal_controller::store::{verify_file, AddRequest, ImageStore, Permission, Role, StoreError};
use shoal_protocol::image::{decode_chunk, Compression, Encoder, Image, Metadata};

const MIB: usize = 1024 * 1024;

/// A volume of `len` bytes: compressible text, a zero hole, then noise.
fn volume(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = u32::from(seed) + 1;
    for (i, b) in v.iter_mut().enumerate() {
        if i < len / 3 {
            *b = b"shoal image store "[i % 18] ^ seed;
        } else if i >= 2 * len / 3 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
    }
    v
}

fn write_raw(dir: &Path, name: &str, len: usize, seed: u8) -> (PathBuf, Vec<u8>) {
    let v = volume(len, seed);
    let p = dir.join(name);
    fs::write(&p, &v).unwrap();
    (p, v)
}

/// A Shoal image file of `vol` at `c`.
fn write_shoal(path: &Path, vol: &[u8], c: Compression) {
    let meta = Metadata {
        name: "src".into(),
        source_size: vol.len() as u64,
        logical_sector_size: 512,
        created_by: "test".into(),
        ..Metadata::default()
    };
    let chunk = 1 << 20;
    let mut enc = Encoder::new(meta, c, chunk).unwrap();
    let mut out = enc.prefix().to_vec();
    for piece in vol.chunks(chunk as usize) {
        if let Some(s) = enc.push(piece).unwrap() {
            out.extend_from_slice(&s);
        }
    }
    out.extend_from_slice(&enc.finish().unwrap().0);
    fs::write(path, out).unwrap();
}

/// The volume bytes an image file decodes to.
fn decode_file(path: &Path) -> Vec<u8> {
    let file = fs::read(path).unwrap();
    let image = Image::from_bytes(&file).unwrap();
    let mut out = Vec::new();
    for e in &image.chunks {
        let stored = image.stored(&file, e).unwrap();
        out.extend_from_slice(&decode_chunk(&image.header, e, stored).unwrap());
    }
    out
}

/// Flips one bit in the middle of the stored data of an image file.
fn flip_stored_bit(path: &Path) {
    let mut file = fs::read(path).unwrap();
    let image = Image::from_bytes(&file).unwrap();
    let e = image.chunks.iter().find(|e| !e.is_zero()).unwrap();
    let at = (e.stored_offset + u64::from(e.stored_len) / 2) as usize;
    file[at] ^= 0x10;
    fs::write(path, file).unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    store: ImageStore,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut roles = HashMap::new();
    roles.insert("alice".to_owned(), Role::User);
    roles.insert("bob".to_owned(), Role::User);
    roles.insert("root2".to_owned(), Role::Admin);
    let store = ImageStore::open(tmp.path().join("images"), Arc::new(roles)).unwrap();
    Fixture {
        _tmp: tmp,
        src,
        store,
    }
}

fn add(
    s: &ImageStore,
    group: &str,
    file: &Path,
    name: &str,
    c: Option<Compression>,
) -> Result<shoal_controller::store::ImageInfo, StoreError> {
    s.add(
        "admin",
        &AddRequest {
            group: group.into(),
            source: file.into(),
            name: Some(name.into()),
            compression: c,
            description: None,
        },
    )
}

/// Files in a group folder (to see that no temporary file is left).
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn only_the_first_level_of_a_group_is_enumerated() {
    let f = fixture();
    let s = &f.store;
    s.create_group("admin", "os").unwrap();
    let (raw, _) = write_raw(&f.src, "disk.raw", MIB + 1000, 1);
    add(s, "os", &raw, "top", None).unwrap();
    // A nested folder with a valid image in it, and stray files.
    let gdir = s.root().join("os");
    let nested = gdir.join("$OEM$");
    fs::create_dir(&nested).unwrap();
    fs::copy(gdir.join("top.shoal"), nested.join("deep.shoal")).unwrap();
    fs::create_dir(gdir.join("sub")).unwrap();
    fs::copy(gdir.join("top.shoal"), gdir.join("sub/deeper.shoal")).unwrap();
    fs::write(gdir.join("notes.txt"), "x").unwrap();
    fs::create_dir(s.root().join(".hidden")).unwrap();
    let names: Vec<String> = s
        .images("admin", None)
        .unwrap()
        .into_iter()
        .map(|i| format!("{}/{}", i.group, i.name))
        .collect();
    assert_eq!(names, ["os/top"]);
    let groups: Vec<String> = s
        .groups("admin")
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(groups, ["os"]);
    assert!(matches!(
        s.show("admin", "os", "deep"),
        Err(StoreError::NoImage(..))
    ));
}

#[test]
fn compression_follows_the_seed_table() {
    let f = fixture();
    let s = &f.store;
    let (raw, vol) = write_raw(&f.src, "a.raw", 2 * MIB + 123, 2);
    // Create a group: no compression type.
    assert_eq!(s.create_group("admin", "g").unwrap().compression, None);
    assert_eq!(s.group_settings("g").unwrap().compression, None);
    // First image: the group takes the image's compression (a Shoal
    // source at `max`).
    let shoal_max = f.src.join("max.shoal");
    write_shoal(&shoal_max, &vol, Compression::Max);
    let first = add(s, "g", &shoal_max, "first", None).unwrap();
    assert_eq!(first.compression, Compression::Max);
    assert_eq!(
        s.group_settings("g").unwrap().compression,
        Some(Compression::Max)
    );
    // Later images: the group's, whatever the source was.
    let shoal_none = f.src.join("none.shoal");
    write_shoal(&shoal_none, &vol, Compression::None);
    assert_eq!(
        add(s, "g", &shoal_none, "second", None)
            .unwrap()
            .compression,
        Compression::Max
    );
    assert_eq!(
        add(s, "g", &raw, "third", None).unwrap().compression,
        Compression::Max
    );
    // Asking for another compression than the group's is refused.
    assert!(matches!(
        add(s, "g", &raw, "fourth", Some(Compression::Fast)),
        Err(StoreError::CompressionMismatch { .. })
    ));
    // Export: the group's current compression (after a change, which
    // re-encodes the group's images).
    s.set_group("admin", "g", Compression::None).unwrap();
    for i in s.images("admin", Some("g")).unwrap() {
        assert_eq!(i.compression, Compression::None, "{}", i.name);
    }
    let out = f.src.join("exported.shoal");
    let x = s.export("admin", "g", "first", &out).unwrap();
    assert_eq!(x.compression, Compression::None);
    assert_eq!(
        verify_file(&out).unwrap().0.header.compression,
        Compression::None
    );
    assert_eq!(decode_file(&out), vol);
    // A volume made into an image (a capture) is `fast` by default...
    s.create_group("admin", "captures").unwrap();
    assert_eq!(
        add(s, "captures", &raw, "cap", None).unwrap().compression,
        Compression::Fast
    );
    assert_eq!(
        s.group_settings("captures").unwrap().compression,
        Some(Compression::Fast)
    );
    // ...or what was asked for the first image.
    s.create_group("admin", "asked").unwrap();
    assert_eq!(
        add(s, "asked", &raw, "a", Some(Compression::None))
            .unwrap()
            .compression,
        Compression::None
    );
    assert_eq!(decode_file(&s.root().join("captures/cap.shoal")), vol);
}

#[test]
fn acls_filter_listing_and_deploys() {
    let f = fixture();
    let s = &f.store;
    let (raw, _) = write_raw(&f.src, "a.raw", MIB, 3);
    for g in ["lab", "prod"] {
        s.create_group("admin", g).unwrap();
        add(s, g, &raw, "one", None).unwrap();
        add(s, g, &raw, "two", None).unwrap();
    }
    s.set_grant("admin", true, "alice", Permission::List, "lab", None)
        .unwrap();
    s.set_grant("admin", true, "bob", Permission::List, "prod", Some("two"))
        .unwrap();
    let names = |u: &str| -> Vec<String> {
        s.images(u, None)
            .unwrap()
            .into_iter()
            .map(|i| format!("{}/{}", i.group, i.name))
            .collect()
    };
    assert_eq!(names("alice"), ["lab/one", "lab/two"]);
    assert_eq!(names("bob"), ["prod/two"]);
    assert!(names("mallory").is_empty());
    assert_eq!(names("admin").len(), 4);
    assert_eq!(names("root2").len(), 4, "a user with role admin sees all");
    let groups: Vec<String> = s
        .groups("bob")
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(groups, ["prod"]);
    assert!(
        s.groups("bob").unwrap()[0].acl.is_empty(),
        "users do not see ACLs"
    );
    // Deploy: listing is not enough.
    match s.resolve_for_deploy("alice", "lab", "one") {
        Err(StoreError::Forbidden { user, perm, object }) => {
            assert_eq!(
                (user.as_str(), perm, object.as_str()),
                ("alice", Permission::Deploy, "image lab/one")
            );
        }
        other => panic!("expected Forbidden, got {other:?}"),
    }
    s.set_grant(
        "admin",
        true,
        "alice",
        Permission::Deploy,
        "lab",
        Some("one"),
    )
    .unwrap();
    let r = s.resolve_for_deploy("alice", "lab", "one").unwrap();
    assert_eq!(r.path, s.root().join("lab/one.shoal"));
    assert_eq!(
        r.image.id_hex(),
        s.show("admin", "lab", "one").unwrap().info.id
    );
    assert!(
        s.may_deploy("alice", "lab", "two").is_err(),
        "the image grant is for one only"
    );
    assert!(s.may_deploy("alice", "prod", "one").is_err());
    assert!(matches!(
        s.may_deploy("alice", "lab", "nope"),
        Err(StoreError::NoImage(..))
    ));
    // Group grants reach every image in the group.
    s.set_grant("admin", true, "bob", Permission::Deploy, "prod", None)
        .unwrap();
    s.may_deploy("bob", "prod", "one").unwrap();
    // Users cannot change ACLs or groups, nor modify without a grant.
    assert!(matches!(
        s.set_grant("alice", true, "alice", Permission::Modify, "lab", None),
        Err(StoreError::AdminOnly(..))
    ));
    assert!(matches!(
        s.create_group("alice", "mine"),
        Err(StoreError::AdminOnly(..))
    ));
    assert!(matches!(
        s.remove("alice", "lab", "one"),
        Err(StoreError::Forbidden { .. })
    ));
    s.set_grant("admin", true, "alice", Permission::Modify, "lab", None)
        .unwrap();
    s.remove("alice", "lab", "two").unwrap();
    // Revoking and forgetting users take grants away.
    s.set_grant("admin", false, "alice", Permission::List, "lab", None)
        .unwrap();
    assert!(names("alice").is_empty());
    s.forget_user("bob").unwrap();
    assert!(names("bob").is_empty());
    assert!(s.may_deploy("bob", "prod", "one").is_err());
}

#[test]
fn a_failed_replace_leaves_the_old_image_byte_identical() {
    let f = fixture();
    let s = &f.store;
    s.create_group("admin", "g").unwrap();
    let (raw, _) = write_raw(&f.src, "a.raw", 2 * MIB, 4);
    add(s, "g", &raw, "img", None).unwrap();
    let path = s.root().join("g/img.shoal");
    let before = fs::read(&path).unwrap();
    let listing = files(&s.root().join("g"));
    let (raw2, vol2) = write_raw(&f.src, "b.raw", 2 * MIB + 7, 5);

    // A hook that fails after the new image is written and fsynced.
    let fail = |_: &Path| Err(std::io::Error::other("injected failure"));
    let e = s
        .replace_with_hook("admin", "g", "img", &raw2, None, &fail)
        .unwrap_err();
    assert!(
        shoal_controller::error_chain(&e).contains("injected failure"),
        "{e}"
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(
        files(&s.root().join("g")),
        listing,
        "no temporary file left"
    );

    // A hook that flips a bit in the new image: verification catches it.
    let e = s.replace_with_hook("admin", "g", "img", &raw2, None, &|p: &Path| {
        flip_stored_bit(p);
        Ok(())
    });
    assert!(matches!(e, Err(StoreError::Corrupt(..))), "{e:?}");
    assert_eq!(fs::read(&path).unwrap(), before);

    // A corrupt Shoal source.
    let bad = f.src.join("bad.shoal");
    write_shoal(&bad, &vol2, Compression::Fast);
    flip_stored_bit(&bad);
    assert!(matches!(
        s.replace("admin", "g", "img", &bad, None),
        Err(StoreError::Corrupt(..))
    ));
    assert_eq!(fs::read(&path).unwrap(), before);
    assert_eq!(files(&s.root().join("g")), listing);

    // A good replace does change it.
    let info = s.replace("admin", "g", "img", &raw2, Some("v2")).unwrap();
    assert_eq!(info.description, "v2");
    assert_ne!(fs::read(&path).unwrap(), before);
    assert_eq!(decode_file(&path), vol2);
}

#[test]
fn a_flipped_bit_is_caught_on_add_export_and_verify() {
    let f = fixture();
    let s = &f.store;
    s.create_group("admin", "g").unwrap();
    let vol = volume(3 * MIB, 6);
    // Add: a corrupt source image in Shoal format is refused, nothing stored.
    let bad = f.src.join("bad.shoal");
    write_shoal(&bad, &vol, Compression::Fast);
    flip_stored_bit(&bad);
    let e = add(s, "g", &bad, "bad", None).unwrap_err();
    assert!(matches!(e, StoreError::Corrupt(..)), "{e:?}");
    assert!(
        shoal_controller::error_chain(&e).contains("SHA-1 mismatch"),
        "{}",
        shoal_controller::error_chain(&e)
    );
    assert_eq!(files(&s.root().join("g")), [".group.json"]);
    assert!(s.images("admin", None).unwrap().is_empty());

    // Export: the exported file is verified (a bit flipped after writing).
    let good = f.src.join("good.shoal");
    write_shoal(&good, &vol, Compression::Fast);
    add(s, "g", &good, "good", None).unwrap();
    let out = f.src.join("out.shoal");
    let e = s.export_with_hook("admin", "g", "good", &out, &|p: &Path| {
        flip_stored_bit(p);
        Ok(())
    });
    assert!(matches!(e, Err(StoreError::Corrupt(..))), "{e:?}");
    assert!(!out.exists());
    // A stored image that rotted: verify and export both refuse it.
    s.verify("admin", "g", "good").unwrap();
    flip_stored_bit(&s.root().join("g/good.shoal"));
    assert!(matches!(
        s.verify("admin", "g", "good"),
        Err(StoreError::Corrupt(..))
    ));
    assert!(matches!(
        s.export("admin", "g", "good", &out),
        Err(StoreError::Corrupt(..))
    ));
    assert!(!out.exists());
}

#[test]
fn qcow2_disks_are_converted_with_qemu_img() {
    let f = fixture();
    let s = &f.store;
    s.create_group("admin", "vms").unwrap();
    let (raw, vol) = write_raw(&f.src, "disk.raw", 3 * MIB, 7);
    let qcow = f.src.join("disk.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .status()
        .expect("qemu-img is needed for this test (apt-get install qemu-utils)");
    assert!(st.success());
    assert_eq!(&fs::read(&qcow).unwrap()[..4], b"QFI\xfb");
    let info = s
        .add(
            "admin",
            &AddRequest {
                group: "vms".into(),
                source: qcow.clone(),
                ..AddRequest::default()
            },
        )
        .unwrap();
    assert_eq!(info.name, "disk");
    assert_eq!(info.source_size, vol.len() as u64);
    assert_eq!(decode_file(&s.root().join("vms/disk.shoal")), vol);
    assert_eq!(files(&s.root().join("vms")), [".group.json", "disk.shoal"]);
    // The raw file of the same disk gives the same image ID but for the
    // header (name, time), so compare volumes instead.
    let out = f.src.join("x.shoal");
    s.export("admin", "vms", "disk", &out).unwrap();
    assert_eq!(decode_file(&out), vol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_and_roles_through_the_admin_api() {
    let ts = common::TestServer::start(|_| {}).await;
    let url = format!("http://{}", ts.server.admin_addr);
    let admin_token = ts.server.admin_token.clone();
    let src = ts.dir.path().join("src");
    fs::create_dir(&src).unwrap();
    let (raw, _) = write_raw(&src, "base.raw", MIB, 8);
    let out = tokio::task::spawn_blocking(move || {
        let admin = StoreClient::new(&url, &admin_token);
        assert_eq!(admin.whoami().unwrap().name, "admin");
        let alice = admin.create_user("alice", Role::User).unwrap();
        assert_eq!(alice.token.len(), 64);
        admin.create_user("ops", Role::Admin).unwrap();
        let dup = admin.create_user("alice", Role::User).unwrap_err();
        assert!(dup.to_string().starts_with("409"), "{dup}");
        for g in ["lab", "prod"] {
            admin.create_group(g).unwrap();
            admin
                .add(g, &raw, Some("base"), None, Some("base image"))
                .unwrap();
        }
        admin
            .acl(true, "alice", Permission::List, "lab", None)
            .unwrap();

        let a = StoreClient::new(&url, &alice.token);
        let me = a.whoami().unwrap();
        assert_eq!((me.name.as_str(), me.role), ("alice", Role::User));
        let seen: Vec<String> = a
            .images(None)
            .unwrap()
            .into_iter()
            .map(|i| format!("{}/{}", i.group, i.name))
            .collect();
        assert_eq!(seen, ["lab/base"]);
        assert_eq!(
            a.show("lab", "base").unwrap().info.description,
            "base image"
        );
        a.verify("lab", "base").unwrap();
        let e = a.show("prod", "base").unwrap_err();
        assert!(e.to_string().starts_with("403"), "{e}");
        // Admin-only endpoints answer 403 to a user.
        for e in [
            a.users().unwrap_err(),
            a.create_user("eve", Role::Admin).unwrap_err(),
            a.create_group("mine").unwrap_err(),
            a.acl(true, "alice", Permission::Deploy, "prod", None)
                .unwrap_err(),
            a.add("lab", &raw, Some("x"), None, None).unwrap_err(),
        ] {
            assert!(e.to_string().starts_with("403"), "{e}");
        }
        let c = shoal_controller::client::Client::new(&url, &alice.token);
        assert!(c.devices().unwrap_err().to_string().starts_with("403"));
        // A bad token is 401; a removed user's token stops working.
        let e = StoreClient::new(&url, "nope").images(None).unwrap_err();
        assert!(e.to_string().starts_with("401"), "{e}");
        let users: Vec<String> = admin.users().unwrap().into_iter().map(|u| u.name).collect();
        assert_eq!(users, ["alice", "ops"]);
        admin.remove_user("alice").unwrap();
        assert!(a.whoami().unwrap_err().to_string().starts_with("401"));
        assert!(
            admin.show("lab", "base").unwrap().group_acl.is_empty(),
            "grants forgotten"
        );
        admin.images(None).unwrap().len()
    })
    .await
    .unwrap();
    assert_eq!(out, 2);
}
