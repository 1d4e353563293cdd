//! Which NIC(s) to configure, read from `<sys>/class/net`: the one named on
//! the command line, the one whose MAC the boot loader passed (`BOOTIF=`),
//! or every physical NIC, narrowed to those that get carrier.
//!
//! Only sysfs is read here, so a fake tree in a temp dir tests all of it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shoal_protocol::inventory::MacAddr;

use super::NetError;

/// How often carrier is re-read while waiting for it.
const CARRIER_POLL: Duration = Duration::from_millis(100);
/// Once one NIC has carrier, how much longer to wait for the others.
const CARRIER_SETTLE: Duration = Duration::from_secs(2);

/// A network interface as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub name: String,
    pub mac: Option<MacAddr>,
    /// Backed by a device (has a `device` link): not `lo`, veth, bridge, ...
    pub physical: bool,
}

/// The result of [`select`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Exactly this interface (named, or found by MAC); it must get carrier.
    One(String),
    /// Every physical NIC; those with carrier are used.
    Any(Vec<String>),
}

fn class_net(sys: &Path) -> PathBuf {
    sys.join("class/net")
}

/// Every interface but `lo`, in natural order (`eth2` before `eth10`).
pub fn list(sys: &Path) -> Result<Vec<Nic>, NetError> {
    let dir = class_net(sys);
    let entries = std::fs::read_dir(&dir).map_err(|source| NetError::ListNics {
        path: dir.clone(),
        source,
    })?;
    let mut nics = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| NetError::ListNics {
            path: dir.clone(),
            source,
        })?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name == "lo" {
            continue;
        }
        let path = entry.path();
        let mac = std::fs::read_to_string(path.join("address"))
            .ok()
            .and_then(|s| MacAddr::parse(s.trim()).ok());
        let physical = std::fs::symlink_metadata(path.join("device")).is_ok();
        nics.push(Nic {
            name,
            mac,
            physical,
        });
    }
    nics.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
    Ok(nics)
}

/// `eth10` → (`eth`, 10, `eth10`), so numbered names sort by number.
fn natural_key(name: &str) -> (&str, u64, &str) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = name[stem.len()..].parse().unwrap_or(0);
    (stem, number, name)
}

/// Chooses the interface(s) to configure; see the module docs.
pub fn select(
    sys: &Path,
    iface: Option<&str>,
    boot_mac: Option<MacAddr>,
) -> Result<Selection, NetError> {
    if let Some(name) = iface {
        if name.is_empty() || name.contains('/') || !class_net(sys).join(name).exists() {
            return Err(NetError::NoSuchInterface {
                iface: name.to_owned(),
            });
        }
        return Ok(Selection::One(name.to_owned()));
    }
    let nics = list(sys)?;
    if let Some(mac) = boot_mac {
        return match nics.iter().find(|n| n.mac == Some(mac)) {
            Some(nic) => Ok(Selection::One(nic.name.clone())),
            None => Err(NetError::NoNicWithMac { mac }),
        };
    }
    let physical: Vec<String> = nics
        .into_iter()
        .filter(|n| n.physical)
        .map(|n| n.name)
        .collect();
    if physical.is_empty() {
        return Err(NetError::NoNics {
            path: class_net(sys),
        });
    }
    Ok(Selection::Any(physical))
}

/// `Some(true)` with carrier, `Some(false)` without, `None` when the kernel
/// cannot tell (the interface is down, or gone).
pub fn carrier(sys: &Path, name: &str) -> Option<bool> {
    let s = std::fs::read_to_string(class_net(sys).join(name).join("carrier")).ok()?;
    match s.trim() {
        "1" => Some(true),
        "0" => Some(false),
        _ => None,
    }
}

/// Waits up to `wait` for carrier on `names` (which are already up) and
/// returns those that have it, in the given order. Returns early once all
/// have carrier, or [`CARRIER_SETTLE`] after the first one got it.
pub fn wait_for_carrier(sys: &Path, names: &[String], wait: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut first_seen: Option<Instant> = None;
    loop {
        let up: Vec<String> = names
            .iter()
            .filter(|n| carrier(sys, n) == Some(true))
            .cloned()
            .collect();
        let now = Instant::now();
        if !up.is_empty() && first_seen.is_none() {
            first_seen = Some(now);
        }
        let settled = first_seen.is_some_and(|t| now.duration_since(t) >= CARRIER_SETTLE);
        if up.len() == names.len() || settled || now.duration_since(start) >= wait {
            return up;
        }
        let left = wait.saturating_sub(now.duration_since(start));
        std::thread::sleep(left.min(CARRIER_POLL));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeSys(tempfile::TempDir);

    impl FakeSys {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("class/net")).unwrap();
            FakeSys(dir)
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
        fn nic(&self, name: &str, mac: &str, physical: bool, carrier: Option<&str>) {
            let d = self.0.path().join("class/net").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
            if physical {
                std::os::unix::fs::symlink(
                    "../../../devices/pci0000:00/0000:00:03.0",
                    d.join("device"),
                )
                .unwrap();
            }
            if let Some(c) = carrier {
                std::fs::write(d.join("carrier"), format!("{c}\n")).unwrap();
            }
        }
    }

    fn mac(s: &str) -> MacAddr {
        MacAddr::parse(s).unwrap()
    }

    fn standard() -> FakeSys {
        let sys = FakeSys::new();
        sys.nic("lo", "00:00:00:00:00:00", false, Some("1"));
        sys.nic("eth10", "52:54:00:00:00:10", true, Some("0"));
        sys.nic("eth2", "52:54:00:00:00:02", true, Some("1"));
        sys.nic("veth0", "52:54:00:00:00:99", false, Some("1"));
        sys
    }

    #[test]
    fn lists_all_but_lo_in_natural_order() {
        let sys = standard();
        let nics = list(sys.path()).unwrap();
        let names: Vec<&str> = nics.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["eth2", "eth10", "veth0"]);
        assert_eq!(nics[0].mac, Some(mac("52:54:00:00:00:02")));
        assert!(nics[0].physical && !nics[2].physical);
    }

    #[test]
    fn explicit_interface_may_be_virtual() {
        let sys = standard();
        assert_eq!(
            select(sys.path(), Some("veth0"), None).unwrap(),
            Selection::One("veth0".into())
        );
        let e = select(sys.path(), Some("eth9"), None).unwrap_err();
        assert_eq!(e.to_string(), "no network interface named eth9");
        assert!(select(sys.path(), Some("../eth2"), None).is_err());
    }

    #[test]
    fn boot_mac_picks_its_nic() {
        let sys = standard();
        let chosen = select(sys.path(), None, Some(mac("52-54-00-00-00-10"))).unwrap();
        assert_eq!(chosen, Selection::One("eth10".into()));
        let e = select(sys.path(), None, Some(mac("52:54:00:aa:bb:cc"))).unwrap_err();
        assert_eq!(e.to_string(), "no NIC with MAC 52:54:00:aa:bb:cc (BOOTIF)");
    }

    #[test]
    fn otherwise_every_physical_nic() {
        let sys = standard();
        assert_eq!(
            select(sys.path(), None, None).unwrap(),
            Selection::Any(vec!["eth2".into(), "eth10".into()])
        );
        let empty = FakeSys::new();
        empty.nic("lo", "00:00:00:00:00:00", false, Some("1"));
        empty.nic("veth0", "52:54:00:00:00:99", false, Some("1"));
        let e = select(empty.path(), None, None).unwrap_err();
        assert!(e.to_string().starts_with("no NICs in "), "{e}");
        let missing = tempfile::tempdir().unwrap();
        assert!(matches!(
            select(missing.path(), None, None),
            Err(NetError::ListNics { .. })
        ));
    }

    #[test]
    fn carrier_states() {
        let sys = standard();
        sys.nic("eth3", "52:54:00:00:00:03", true, None);
        sys.nic("eth4", "52:54:00:00:00:04", true, Some("garbage"));
        assert_eq!(carrier(sys.path(), "eth2"), Some(true));
        assert_eq!(carrier(sys.path(), "eth10"), Some(false));
        assert_eq!(carrier(sys.path(), "eth3"), None);
        assert_eq!(carrier(sys.path(), "eth4"), None);
        assert_eq!(carrier(sys.path(), "nope"), None);
    }

    #[test]
    fn carrier_wait_returns_early_when_all_are_up() {
        let sys = standard();
        let t = Instant::now();
        let up = wait_for_carrier(sys.path(), &["eth2".into()], Duration::from_secs(5));
        assert_eq!(up, ["eth2"]);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn carrier_wait_is_bounded() {
        let sys = standard();
        let t = Instant::now();
        let up = wait_for_carrier(sys.path(), &["eth10".into()], Duration::from_millis(300));
        assert!(up.is_empty());
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }

    #[test]
    fn carrier_wait_sees_a_late_link() {
        let sys = standard();
        let path = sys.path().join("class/net/eth10/carrier");
        let flip = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            std::fs::write(path, "1\n").unwrap();
        });
        let up = wait_for_carrier(sys.path(), &["eth10".into()], Duration::from_secs(5));
        flip.join().unwrap();
        assert_eq!(up, ["eth10"]);
    }
}
