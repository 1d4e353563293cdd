//! The hardware inventory a Deployment Agent reports: SMBIOS identity, CPUs,
//! memory, NICs and block devices, as read from Linux's `/sys`.
//!
//! The agent fills it in (`agent/src/inventory.rs`); the Controller stores it
//! with the device record and matches devices by `system.uuid` or a NIC's MAC.
//! Sizes are in bytes; absent facts are `None`, never a made-up default.

use core::fmt;

use serde::{Deserialize, Serialize};

/// Everything the agent found on this machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub system: System,
    pub cpus: Cpus,
    /// Total usable memory, from `/proc/meminfo` `MemTotal`.
    pub memory_bytes: Option<u64>,
    pub nics: Vec<Nic>,
    pub disks: Vec<Disk>,
}

/// SMBIOS identity, from `/sys/class/dmi/id`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct System {
    pub vendor: Option<String>,
    pub product: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cpus {
    /// Logical CPUs online.
    pub count: u32,
    /// `model name` of the first CPU, where `/proc/cpuinfo` says it.
    pub model: Option<String>,
    /// AES and carry-less multiply instructions, as the agent found them
    /// on the CPU it runs on: a multicast session's cipher is chosen on
    /// this (`docs/multicast.md`).
    #[serde(default)]
    pub aes: bool,
}

/// A network interface with a hardware address (loopback and virtual
/// interfaces without a device are left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    pub name: String,
    pub mac: MacAddr,
    /// Kernel driver bound to the device, e.g. `virtio_net`.
    pub driver: Option<String>,
    /// `Some(true)` when the link has carrier; `None` when the interface is
    /// down and the kernel cannot tell.
    pub carrier: Option<bool>,
    /// Link speed in Mbit/s, where the driver reports one.
    pub speed_mbps: Option<u32>,
}

/// A whole block device (partitions, loop devices with no backing file,
/// RAM disks and device-mapper targets are left out).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub rotational: bool,
    pub removable: bool,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub wwn: Option<String>,
}

/// An IEEE 802 MAC address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMac(pub String);

impl fmt::Display for BadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a MAC address: {:?}", self.0)
    }
}

impl std::error::Error for BadMac {}

impl MacAddr {
    /// Parses `52:54:00:12:34:56` or `52-54-00-12-34-56` (either case).
    /// PXELINUX's `BOOTIF=01-52-54-...` form (with the ARP type prefix) is
    /// handled by the caller, which knows the context.
    pub fn parse(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_owned());
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Self, BadMac> {
        MacAddr::parse(s)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            MacAddr::parse(&s).map_err(serde::de::Error::custom)
        } else {
            Ok(MacAddr(<[u8; 6]>::deserialize(d)?))
        }
    }
}

/// Formats a byte count for people: `8.0 GiB`, `512 MiB`, `4096 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trips() {
        let m = MacAddr::parse("52:54:00:AB:cd:0f").unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!(MacAddr::parse("52-54-00-ab-cd-0f").unwrap(), m);
    }

    #[test]
    fn mac_rejects_garbage() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(MacAddr::parse(s).is_err(), "{s}");
        }
    }

    #[test]
    fn inventory_serialises_both_ways() {
        let inv = Inventory {
            nics: vec![Nic {
                name: "eth0".into(),
                mac: MacAddr([2, 0, 0, 0, 0, 1]),
                ..Nic::default()
            }],
            disks: vec![Disk {
                name: "vda".into(),
                size_bytes: 1 << 30,
                logical_sector: 512,
                physical_sector: 512,
                ..Disk::default()
            }],
            ..Inventory::default()
        };
        let json = serde_json::to_string(&inv).unwrap();
        assert!(json.contains("\"02:00:00:00:00:01\""));
        assert_eq!(serde_json::from_str::<Inventory>(&json).unwrap(), inv);
        let bin = postcard::to_allocvec(&inv).unwrap();
        assert_eq!(postcard::from_bytes::<Inventory>(&bin).unwrap(), inv);
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(8 << 30), "8.0 GiB");
    }
}
