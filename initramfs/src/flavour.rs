//! Which kernel modules an initramfs carries: `lab` (QEMU's virtio devices
//! only, small and quick to build) or `full` (lab plus the common server
//! NICs and storage controllers of real hardware).

use std::fmt;
use std::str::FromStr;

/// The module set of an initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flavour {
    /// virtio network, block and SCSI for QEMU/KVM guests.
    Lab,
    /// Lab plus Intel, Mellanox, Broadcom, Realtek and VMware NICs, NVMe,
    /// AHCI and the LSI/Broadcom SAS/RAID controllers.
    Full,
}

const LAB: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    // Seeds the kernel's RNG in guests whose CPU has no RDRAND.
    "virtio_rng",
];

const FULL: &[&str] = &[
    // Lab.
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_rng",
    // NICs.
    "e1000",
    "e1000e",
    "igb",
    "ixgbe",
    "i40e",
    "ice",
    "mlx4_en",
    "mlx4_core",
    "mlx5_core",
    "bnxt_en",
    "tg3",
    "r8169",
    "vmxnet3",
    // Storage.
    "nvme",
    "ahci",
    "megaraid_sas",
    "mpt3sas",
];

impl Flavour {
    /// Every flavour, smallest first.
    pub const ALL: [Flavour; 2] = [Flavour::Lab, Flavour::Full];

    /// The modules this flavour asks for; their dependencies come along.
    pub fn modules(self) -> &'static [&'static str] {
        match self {
            Flavour::Lab => LAB,
            Flavour::Full => FULL,
        }
    }

    /// `lab` or `full`, as in file names and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Flavour::Lab => "lab",
            Flavour::Full => "full",
        }
    }
}

impl fmt::Display for Flavour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A flavour name that is neither `lab` nor `full`.
#[derive(Debug, thiserror::Error)]
#[error("unknown initramfs flavour {0:?} (expected lab or full)")]
pub struct UnknownFlavour(pub String);

impl FromStr for Flavour {
    type Err = UnknownFlavour;

    fn from_str(s: &str) -> Result<Flavour, UnknownFlavour> {
        Flavour::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFlavour(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_contains_lab_and_names_round_trip() {
        for m in Flavour::Lab.modules() {
            assert!(Flavour::Full.modules().contains(m), "{m}");
        }
        for f in Flavour::ALL {
            assert_eq!(f.name().parse::<Flavour>().unwrap(), f);
        }
        assert!("huge".parse::<Flavour>().is_err());
    }
}
