//! Networking for the agent: choose the boot NIC, run DHCPv4 with smoltcp
//! over an `AF_PACKET` socket, and hand the result to the kernel with ioctls.
//!
//! CONTRACT (filled in by the networking work; the rest of the agent calls
//! only what is declared here).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use shoal_protocol::inventory::MacAddr;

/// How the agent should configure its network, from the command line / config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetMode {
    /// DHCPv4 on the boot NIC (or every NIC with carrier).
    Dhcp,
    /// A static address from the kernel's `ip=` form.
    Static(StaticIp),
    /// Leave the network alone (`shoal.net=off`).
    Off,
}

/// The kernel's `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>`
/// form, reduced to what the agent uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticIp {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Option<Ipv4Addr>,
    /// Interface name; `None` means "the boot NIC".
    pub device: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NetConfig {
    /// `/sys` to read NICs from (a root parameter so tests can point elsewhere).
    pub sys: PathBuf,
    pub mode: NetMode,
    /// `BOOTIF=` MAC, when PXELINUX/iPXE passed one.
    pub boot_mac: Option<MacAddr>,
    /// Only this interface (ordinary-process mode, tests).
    pub iface: Option<String>,
    /// How long to wait for carrier on NICs that were just brought up.
    pub carrier_wait: Duration,
    /// How long one DHCP attempt may take before it is an error.
    pub dhcp_timeout: Duration,
}

/// What the network ended up as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub iface: String,
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    /// DHCP server that granted it (`None` for a static address).
    pub server: Option<Ipv4Addr>,
    pub lease_time: Option<Duration>,
    pub mtu: Option<u16>,
}
