//! Configures kernel interfaces the way `ifconfig` and `route` did: plain
//! ioctls on an `AF_INET` datagram socket (no netlink, no external tools in
//! the initramfs).

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use log::{debug, warn};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use shoal_protocol::inventory::MacAddr;

use super::{sys, Lease, NetError};

/// `255.255.255.0` for 24. Prefixes over 32 saturate to `/32`.
pub fn prefix_to_netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(prefix_len.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - bits).unwrap_or(0))
}

/// An `AF_INET` socket to issue interface ioctls on.
#[derive(Debug)]
pub struct Ifconfig {
    sock: OwnedFd,
}

impl Ifconfig {
    pub fn open() -> Result<Self, NetError> {
        let sock = socket::socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| NetError::InetSocket { source: e.into() })?;
        Ok(Ifconfig { sock })
    }

    /// Sets `IFF_UP`.
    pub fn up(&self, iface: &str) -> Result<(), NetError> {
        sys::set_up(self.sock.as_fd(), iface).map_err(|source| NetError::LinkUp {
            iface: iface.to_owned(),
            source,
        })
    }

    pub fn mac(&self, iface: &str) -> Result<MacAddr, NetError> {
        sys::get_hwaddr(self.sock.as_fd(), iface)
            .map(MacAddr)
            .map_err(|source| NetError::Mac {
                iface: iface.to_owned(),
                source,
            })
    }

    /// The link MTU, 1500 when the kernel will not say.
    pub fn mtu(&self, iface: &str) -> usize {
        match sys::get_mtu(self.sock.as_fd(), iface) {
            Ok(mtu) if mtu >= 576 => mtu as usize,
            Ok(mtu) => {
                warn!("{iface}: MTU {mtu} is below 576; assuming 1500");
                1500
            }
            Err(e) => {
                warn!("{iface}: cannot read the MTU ({e}); assuming 1500");
                1500
            }
        }
    }

    /// Gives the lease to the kernel: address, netmask, MTU, default route.
    /// A refused MTU is only a warning; the rest must succeed. Idempotent:
    /// the kernel ignores an address or netmask it already has, and an
    /// existing default route is fine.
    pub fn configure(&self, lease: &Lease) -> Result<(), NetError> {
        let fd = self.sock.as_fd();
        let iface = lease.iface.as_str();
        let netmask = prefix_to_netmask(lease.prefix_len);
        self.up(iface)?;
        sys::set_addr(fd, iface, lease.address).map_err(|source| NetError::SetAddress {
            iface: iface.to_owned(),
            address: lease.address,
            source,
        })?;
        sys::set_netmask(fd, iface, netmask).map_err(|source| NetError::SetNetmask {
            iface: iface.to_owned(),
            netmask,
            source,
        })?;
        if let Some(mtu) = lease.mtu {
            // A NIC that cannot take the server's MTU still works with its own.
            if let Err(e) = sys::set_mtu(fd, iface, mtu) {
                warn!("{iface}: SIOCSIFMTU {mtu}: {e}; keeping the current MTU");
            }
        }
        if let Some(router) = lease.router {
            match sys::add_default_route(fd, iface, router) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(Errno::EEXIST as i32) => {
                    debug!("{iface}: default route via {router} already there");
                }
                Err(source) => {
                    return Err(NetError::AddRoute {
                        iface: iface.to_owned(),
                        router,
                        source,
                    })
                }
            }
        }
        debug!(
            "{iface}: configured {}/{}{}",
            lease.address,
            lease.prefix_len,
            lease
                .router
                .map_or(String::new(), |r| format!(", default via {r}"))
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_to_netmask_covers_every_length() {
        for (prefix, mask) in [
            (0, "0.0.0.0"),
            (1, "128.0.0.0"),
            (8, "255.0.0.0"),
            (20, "255.255.240.0"),
            (24, "255.255.255.0"),
            (31, "255.255.255.254"),
            (32, "255.255.255.255"),
        ] {
            let mask: Ipv4Addr = mask.parse().unwrap();
            assert_eq!(prefix_to_netmask(prefix), mask, "/{prefix}");
        }
        assert_eq!(prefix_to_netmask(40), Ipv4Addr::BROADCAST);
    }
}
