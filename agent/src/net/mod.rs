//! Networking for the agent: choose the boot NIC, run DHCPv4 with smoltcp
//! over an `AF_PACKET` socket, and hand the result to the kernel with ioctls.
//!
//! The rest of the agent calls [`bring_up`] (or [`bring_up_and_renew`] to
//! keep a DHCP lease alive with a [`Renewer`]), and [`dhcp_command`] for the
//! ordinary-process `shoal-agent dhcp` command. Inside:
//!
//! - `nic`: which NICs, from `<sys>/class/net` (testable on a fake tree);
//! - `device`: a smoltcp `Device` on an `AF_PACKET` socket that reports
//!   errors instead of panicking;
//! - `dhcp`: smoltcp's DHCP client on that device, and the acquire loop;
//! - `ifconfig`: address, netmask, MTU and default route by ioctl;
//! - `renew`: the background renewal thread;
//! - `sys`: the raw ioctls and socket options (the only `unsafe`).

mod device;
mod dhcp;
mod ifconfig;
mod nic;
mod renew;
mod sys;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use log::{debug, info, warn};
use shoal_protocol::inventory::MacAddr;

pub use renew::Renewer;

use dhcp::DhcpClient;
pub(crate) use dhcp::Tuning;
use ifconfig::Ifconfig;
use nic::Selection;

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

impl fmt::Display for Lease {
    /// `lease acquired on eth0 (52:54:00:12:34:56): 10.0.2.15/24 router
    /// 10.0.2.2 dns 10.0.2.3 server 10.0.2.2 lease 86400s mtu -` (one line;
    /// the QEMU tests look for it on the console).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt<T: fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "-".to_owned(), |v| v.to_string())
        }
        let dns = if self.dns.is_empty() {
            "-".to_owned()
        } else {
            self.dns
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "lease acquired on {} ({}): {}/{} router {} dns {} server {} lease {} mtu {}",
            self.iface,
            self.mac,
            self.address,
            self.prefix_len,
            opt(self.router),
            dns,
            opt(self.server),
            opt(self.lease_time.map(fmt_secs)),
            opt(self.mtu),
        )
    }
}

/// Why the network could not be brought up; each names the interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("networking is off (shoal.net=off); only lo is up")]
    Disabled,
    #[error("cannot open an AF_INET socket for interface ioctls")]
    InetSocket { source: io::Error },
    #[error("cannot list NICs in {}", .path.display())]
    ListNics { path: PathBuf, source: io::Error },
    #[error("no NICs in {} (only lo and virtual interfaces)", .path.display())]
    NoNics { path: PathBuf },
    #[error("no network interface named {iface}")]
    NoSuchInterface { iface: String },
    #[error("no NIC with MAC {mac} (BOOTIF)")]
    NoNicWithMac { mac: MacAddr },
    #[error("{iface}: cannot set the link up")]
    LinkUp { iface: String, source: io::Error },
    #[error("{iface}: no carrier after {}", fmt_secs(*.after))]
    NoCarrier { iface: String, after: Duration },
    /// `nics` lists each NIC tried and why it was not used.
    #[error("no NIC has carrier after {}: {nics}", fmt_secs(*.after))]
    NoCarrierAny { after: Duration, nics: String },
    #[error("{iface}: cannot read the MAC address")]
    Mac { iface: String, source: io::Error },
    #[error("{iface}: cannot open AF_PACKET socket")]
    OpenPacket { iface: String, source: io::Error },
    #[error("{iface}: DHCP socket failed")]
    DhcpSocket { iface: String, source: io::Error },
    /// `iface` may list several interfaces, comma-separated.
    #[error("no DHCP answer on {iface} after {}", fmt_secs(*.after))]
    NoDhcpAnswer { iface: String, after: Duration },
    #[error("{iface}: SIOCSIFADDR {address}")]
    SetAddress {
        iface: String,
        address: Ipv4Addr,
        source: io::Error,
    },
    #[error("{iface}: SIOCSIFNETMASK {netmask}")]
    SetNetmask {
        iface: String,
        netmask: Ipv4Addr,
        source: io::Error,
    },
    #[error("{iface}: SIOCADDRT default via {router}")]
    AddRoute {
        iface: String,
        router: Ipv4Addr,
        source: io::Error,
    },
    #[error("static address {address}/{prefix_len}: prefix length over 32")]
    BadPrefix { address: Ipv4Addr, prefix_len: u8 },
    #[error("{iface}: cannot start the DHCP renewal thread")]
    Spawn { iface: String, source: io::Error },
}

/// `3s`, `1.5s`.
fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// `e` and its sources, `: `-separated.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Brings up `lo` and the network that `cfg` asks for, and returns what was
/// configured. A DHCP client is not kept running: see [`bring_up_and_renew`].
pub fn bring_up(cfg: &NetConfig) -> Result<Lease, NetError> {
    bring_up_with(cfg, Tuning::default()).map(|(lease, _client)| lease)
}

/// [`bring_up`], and for a DHCP lease a [`Renewer`] that keeps it (`None`
/// for a static address).
pub fn bring_up_and_renew(cfg: &NetConfig) -> Result<(Lease, Option<Renewer>), NetError> {
    let (lease, client) = bring_up_with(cfg, Tuning::default())?;
    let renewer = client
        .map(|c| Renewer::spawn(c, lease.clone()))
        .transpose()?;
    Ok((lease, renewer))
}

/// `shoal-agent dhcp --iface NAME [--timeout SECS]`: DHCP on one interface
/// (carrier within 3 s), the lease's one-line summary on stdout and exit
/// code 0, or the error on stderr and 1.
pub fn dhcp_command(iface: &str, timeout: Duration) -> i32 {
    let cfg = NetConfig {
        sys: PathBuf::from("/sys"),
        mode: NetMode::Dhcp,
        boot_mac: None,
        iface: Some(iface.to_owned()),
        carrier_wait: Duration::from_secs(3),
        dhcp_timeout: timeout,
    };
    match bring_up(&cfg) {
        Ok(lease) => {
            println!("{lease}");
            0
        }
        Err(e) => {
            eprintln!("shoal-agent: {}", error_chain(&e));
            1
        }
    }
}

pub(crate) fn bring_up_with(
    cfg: &NetConfig,
    tuning: Tuning,
) -> Result<(Lease, Option<DhcpClient>), NetError> {
    if let NetMode::Static(s) = &cfg.mode {
        if s.prefix_len > 32 {
            return Err(NetError::BadPrefix {
                address: s.address,
                prefix_len: s.prefix_len,
            });
        }
    }
    let ctl = Ifconfig::open()?;
    if let Err(e) = ctl.up("lo") {
        // Not fatal: the agent talks to the controller over the NIC.
        warn!("{}", error_chain(&e));
    }
    match &cfg.mode {
        NetMode::Off => Err(NetError::Disabled),
        NetMode::Static(s) => {
            let wanted = s.device.as_deref().or(cfg.iface.as_deref());
            let iface = candidates(cfg, &ctl, wanted, false)?.swap_remove(0);
            let lease = Lease {
                mac: ctl.mac(&iface)?,
                iface,
                address: s.address,
                prefix_len: s.prefix_len,
                router: s.gateway,
                dns: Vec::new(),
                server: None,
                lease_time: None,
                mtu: None,
            };
            ctl.configure(&lease)?;
            debug!("{lease}");
            Ok((lease, None))
        }
        NetMode::Dhcp => {
            let names = candidates(cfg, &ctl, cfg.iface.as_deref(), true)?;
            info!("DHCP on {}", names.join(", "));
            let mut clients = Vec::new();
            let mut first_error = None;
            for name in &names {
                match DhcpClient::open(&ctl, name, tuning) {
                    Ok(client) => clients.push(client),
                    Err(e) => {
                        warn!("{}", error_chain(&e));
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error.filter(|_| clients.is_empty()) {
                return Err(e);
            }
            let (lease, client) = dhcp::acquire(clients, cfg.dhcp_timeout)?;
            ctl.configure(&lease)?;
            debug!("{lease}");
            Ok((lease, Some(client)))
        }
    }
}

/// The interfaces to configure, already up, never empty. One chosen by name
/// or MAC must get carrier within `cfg.carrier_wait` (unless
/// `carrier_required` is false: a static address is set anyway); otherwise
/// those of all physical NICs that get carrier.
fn candidates(
    cfg: &NetConfig,
    ctl: &Ifconfig,
    iface: Option<&str>,
    carrier_required: bool,
) -> Result<Vec<String>, NetError> {
    match nic::select(&cfg.sys, iface, cfg.boot_mac)? {
        Selection::One(name) => {
            ctl.up(&name)?;
            if nic::wait_for_carrier(&cfg.sys, std::slice::from_ref(&name), cfg.carrier_wait)
                .is_empty()
            {
                let e = NetError::NoCarrier {
                    iface: name.clone(),
                    after: cfg.carrier_wait,
                };
                if carrier_required {
                    return Err(e);
                }
                warn!("{e}; configuring it anyway");
            }
            Ok(vec![name])
        }
        Selection::Any(names) => {
            let mut up = Vec::new();
            let mut problems = Vec::new();
            for name in names {
                match ctl.up(&name) {
                    Ok(()) => up.push(name),
                    Err(e) => {
                        warn!("{}", error_chain(&e));
                        problems.push(format!("{name} (cannot set the link up)"));
                    }
                }
            }
            let with_carrier = nic::wait_for_carrier(&cfg.sys, &up, cfg.carrier_wait);
            if with_carrier.is_empty() {
                problems.extend(up.iter().map(|n| format!("{n} (no carrier)")));
                return Err(NetError::NoCarrierAny {
                    after: cfg.carrier_wait,
                    nics: problems.join(", "),
                });
            }
            Ok(with_carrier)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease() -> Lease {
        Lease {
            iface: "eth0".into(),
            mac: MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            router: Some(Ipv4Addr::new(10, 0, 2, 2)),
            dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            server: Some(Ipv4Addr::new(10, 0, 2, 2)),
            lease_time: Some(Duration::from_secs(86400)),
            mtu: None,
        }
    }

    #[test]
    fn lease_display() {
        assert_eq!(
            lease().to_string(),
            "lease acquired on eth0 (52:54:00:12:34:56): 10.0.2.15/24 router 10.0.2.2 dns 10.0.2.3 \
             server 10.0.2.2 lease 86400s mtu -"
        );
        let bare = Lease {
            router: None,
            dns: vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)],
            server: None,
            lease_time: None,
            mtu: Some(9000),
            ..lease()
        };
        assert_eq!(
            bare.to_string(),
            "lease acquired on eth0 (52:54:00:12:34:56): 10.0.2.15/24 router - dns 1.1.1.1,8.8.8.8 \
             server - lease - mtu 9000"
        );
    }

    #[test]
    fn error_messages_name_the_interface() {
        let e = NetError::NoDhcpAnswer {
            iface: "eth0".into(),
            after: Duration::from_secs(10),
        };
        assert_eq!(e.to_string(), "no DHCP answer on eth0 after 10s");
        let e = NetError::NoCarrier {
            iface: "vethB".into(),
            after: Duration::from_millis(2500),
        };
        assert_eq!(e.to_string(), "vethB: no carrier after 2.5s");
        let e = NetError::NoCarrierAny {
            after: Duration::from_secs(3),
            nics: "eth0 (no carrier), eth1 (no carrier)".into(),
        };
        assert_eq!(
            e.to_string(),
            "no NIC has carrier after 3s: eth0 (no carrier), eth1 (no carrier)"
        );
        let e = NetError::AddRoute {
            iface: "eth0".into(),
            router: Ipv4Addr::new(10, 0, 2, 2),
            source: io::Error::from_raw_os_error(101),
        };
        assert_eq!(e.to_string(), "eth0: SIOCADDRT default via 10.0.2.2");
        assert_eq!(
            error_chain(&e),
            format!(
                "eth0: SIOCADDRT default via 10.0.2.2: {}",
                io::Error::from_raw_os_error(101)
            )
        );
    }

    #[test]
    fn static_prefix_is_checked_before_touching_anything() {
        let cfg = NetConfig {
            sys: PathBuf::from("/nonexistent"),
            mode: NetMode::Static(StaticIp {
                address: Ipv4Addr::new(10, 0, 0, 5),
                prefix_len: 33,
                gateway: None,
                device: Some("eth0".into()),
            }),
            boot_mac: None,
            iface: None,
            carrier_wait: Duration::ZERO,
            dhcp_timeout: Duration::ZERO,
        };
        let e = bring_up(&cfg).unwrap_err();
        assert!(
            matches!(e, NetError::BadPrefix { prefix_len: 33, .. }),
            "{e}"
        );
    }
}
