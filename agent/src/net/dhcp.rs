//! The DHCPv4 client: smoltcp's `dhcpv4::Socket` (the protocol state
//! machine, RFC 2131) driven over a [`PacketDevice`], with time taken from a
//! monotonic clock, and the loop that waits for the first lease on one or
//! more NICs at once.
//!
//! smoltcp never gets the leased address unless the device's packet filter
//! is attached: with it, smoltcp sees only ARP and DHCP replies and can hold
//! the address (which it needs to renew by unicast, RFC 2131 §4.4.5) without
//! ever answering the kernel's traffic; without it, smoltcp would see every
//! frame and answer the kernel's TCP and UDP with resets and ICMP errors, so
//! the address is dropped from smoltcp as soon as the kernel has it.

use std::os::fd::BorrowedFd;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use shoal_protocol::inventory::MacAddr;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::dhcpv4::{self, RetryConfig};
use smoltcp::wire::{DhcpPacket, EthernetAddress, IpCidr};

use super::device::PacketDevice;
use super::ifconfig::Ifconfig;
use super::{Lease, NetError};

/// Options asked of the server: subnet mask, router, DNS, interface MTU.
const PARAMETER_REQUEST_LIST: &[u8] = &[1, 3, 6, 26];
const OPT_INTERFACE_MTU: u8 = 26;
const OPT_LEASE_TIME: u8 = 51;
/// Largest DHCP message that fits a 1500-byte MTU (minus IP and UDP headers)
/// is 1472; the copy buffer is rounded up.
const PACKET_BUFFER: usize = 1500;
/// DISCOVER / first REQUEST retransmission while booting (smoltcp: 10 s / 5 s).
const FAST_RETRY: Duration = Duration::from_secs(1);
/// DISCOVER retransmission once booted (the renewer, after losing a lease).
const SLOW_DISCOVER: Duration = Duration::from_secs(10);
/// A wait this short repeated this often means the loop is spinning.
const SPIN_LIMIT: u32 = 100;
const SPIN_PAUSE: Duration = Duration::from_millis(10);

/// Knobs for tests and experiments; the defaults are what the agent uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// Cap on the lease time the client honours (renewal sooner).
    pub max_lease: Option<Duration>,
}

/// What a poll of the client produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DhcpEvent {
    /// A lease was acquired, renewed or changed.
    Configured(Lease),
    /// The lease expired or was refused; discovery starts over.
    Deconfigured,
}

/// One interface's DHCP client.
pub struct DhcpClient {
    name: String,
    mac: MacAddr,
    device: PacketDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    epoch: Instant,
}

impl std::fmt::Debug for DhcpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // smoltcp's `Interface` has no Debug.
        f.debug_struct("DhcpClient")
            .field("name", &self.name)
            .field("mac", &self.mac)
            .finish_non_exhaustive()
    }
}

impl DhcpClient {
    /// Opens the packet socket on `name` and starts in the DISCOVER state
    /// (the first DISCOVER leaves on the first [`Self::poll`]).
    pub fn open(ctl: &Ifconfig, name: &str, tuning: Tuning) -> Result<Self, NetError> {
        let mac = ctl.mac(name)?;
        let mtu = ctl.mtu(name);
        let open_err = |source: std::io::Error| NetError::OpenPacket {
            iface: name.to_owned(),
            source,
        };
        let ifindex = nix::net::if_::if_nametoindex(name).map_err(|e| open_err(e.into()))?;
        let mut device = PacketDevice::open(name, ifindex, mtu).map_err(open_err)?;

        let epoch = Instant::now();
        let mut config = Config::new(EthernetAddress(mac.0).into());
        config.random_seed = random_seed(mac);
        let iface = Interface::new(config, &mut device, smoltcp::time::Instant::from_micros(0));

        let mut socket = spare_socket();
        let mut retry = RetryConfig::default();
        retry.discover_timeout = FAST_RETRY.into();
        retry.initial_request_timeout = FAST_RETRY.into();
        socket.set_retry_config(retry);
        socket.set_parameter_request_list(PARAMETER_REQUEST_LIST);
        socket.set_max_lease_duration(tuning.max_lease.map(Into::into));
        let mut sockets = SocketSet::new(Vec::new());
        let handle = sockets.add(socket);
        debug!("{name}: DHCP client for {mac}");
        Ok(DhcpClient {
            name: name.to_owned(),
            mac,
            device,
            iface,
            sockets,
            handle,
            epoch,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.device.fd()
    }

    /// The last socket error since the previous call.
    pub fn take_error(&self) -> Option<Errno> {
        self.device.take_error()
    }

    /// Back to smoltcp's gentler DISCOVER rate (for a long-running client).
    pub fn slow_down_discovery(&mut self) {
        let socket = self.sockets.get_mut::<dhcpv4::Socket<'static>>(self.handle);
        let mut retry = socket.get_retry_config();
        retry.discover_timeout = SLOW_DISCOVER.into();
        socket.set_retry_config(retry);
    }

    fn now(&self) -> smoltcp::time::Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(micros)
    }

    /// Moves frames in both directions and reports a configuration change.
    pub fn poll(&mut self) -> Option<DhcpEvent> {
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        let (event, cidr, router) = match self
            .sockets
            .get_mut::<dhcpv4::Socket<'static>>(self.handle)
            .poll()?
        {
            dhcpv4::Event::Configured(config) => {
                let lease = lease_from_config(&self.name, self.mac, &config);
                (
                    DhcpEvent::Configured(lease),
                    Some(config.address),
                    config.router,
                )
            }
            dhcpv4::Event::Deconfigured => (DhcpEvent::Deconfigured, None, None),
        };
        let hold = self.device.filtered();
        self.iface.update_ip_addrs(|addrs| {
            addrs.clear();
            if let (true, Some(cidr)) = (hold, cidr) {
                let _ = addrs.push(IpCidr::Ipv4(cidr));
            }
        });
        let routes = self.iface.routes_mut();
        match (hold, cidr.and(router)) {
            (true, Some(router)) => {
                let _ = routes.add_default_ipv4_route(router);
            }
            _ => {
                routes.remove_default_ipv4_route();
            }
        }
        Some(event)
    }

    /// How long until smoltcp wants to be polled again, `None` for "only when
    /// a frame arrives".
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(Duration::from)
    }
}

/// DHCP sockets of dropped clients, for the next client to reuse.
///
/// smoltcp lends the last reply (for the lease time and MTU, which its
/// `Config` leaves out) only through a buffer the socket borrows for its
/// whole life, so with `SocketSet<'static>` the buffer is leaked. Reusing
/// sockets bounds that to one buffer per client alive at once (one per NIC),
/// however often the agent retries `bring_up`.
static SPARE_SOCKETS: Mutex<Vec<dhcpv4::Socket<'static>>> = Mutex::new(Vec::new());

/// A DHCP socket in the DISCOVER state with its reply buffer.
fn spare_socket() -> dhcpv4::Socket<'static> {
    let spare = SPARE_SOCKETS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop();
    match spare {
        Some(mut socket) => {
            socket.reset();
            // Swallow the `Deconfigured` a reset from the bound state raises.
            let _ = socket.poll();
            socket
        }
        None => {
            let mut socket = dhcpv4::Socket::new();
            socket
                .set_receive_packet_buffer(Box::leak(vec![0u8; PACKET_BUFFER].into_boxed_slice()));
            socket
        }
    }
}

impl Drop for DhcpClient {
    fn drop(&mut self) {
        if let smoltcp::socket::Socket::Dhcpv4(socket) = self.sockets.remove(self.handle) {
            SPARE_SOCKETS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(socket);
        }
    }
}

/// Seeds smoltcp's PRNG (DHCP transaction ids, ephemeral ports) from what
/// differs between machines booting at the same moment, without a
/// `getrandom` that may block this early in boot.
fn random_seed(mac: MacAddr) -> u64 {
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut mac_bits = [0u8; 8];
    mac_bits[..6].copy_from_slice(&mac.0);
    let mut x = clock
        ^ u64::from_le_bytes(mac_bits).rotate_left(17)
        ^ (u64::from(std::process::id()) << 40);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn lease_from_config(iface: &str, mac: MacAddr, config: &dhcpv4::Config<'_>) -> Lease {
    let (lease_time, mtu) = config.packet.as_ref().map_or((None, None), extras);
    Lease {
        iface: iface.to_owned(),
        mac,
        address: config.address.address(),
        prefix_len: config.address.prefix_len(),
        router: config.router,
        dns: config.dns_servers.iter().copied().collect(),
        server: Some(config.server.identifier),
        lease_time,
        mtu,
    }
}

/// Lease time (option 51) and interface MTU (option 26) from a DHCP reply.
fn extras(packet: &DhcpPacket<&[u8]>) -> (Option<Duration>, Option<u16>) {
    let (mut lease, mut mtu) = (None, None);
    for option in packet.options() {
        match (option.kind, option.data) {
            (OPT_LEASE_TIME, &[a, b, c, d]) => {
                lease = Some(Duration::from_secs(u64::from(u32::from_be_bytes([
                    a, b, c, d,
                ]))));
            }
            // RFC 2132 §5.1: 68 is the smallest legal MTU.
            (OPT_INTERFACE_MTU, &[a, b]) if u16::from_be_bytes([a, b]) >= 68 => {
                mtu = Some(u16::from_be_bytes([a, b]));
            }
            _ => {}
        }
    }
    (lease, mtu)
}

/// `d` rounded up to whole milliseconds, as poll(2) wants it.
pub fn poll_timeout(d: Duration) -> PollTimeout {
    let ms = d.as_micros().div_ceil(1000);
    PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
}

/// Errors after which a client is useless (the interface went away).
fn is_fatal(e: Errno) -> bool {
    matches!(e, Errno::ENODEV | Errno::ENXIO | Errno::EBADF)
}

/// Runs DHCP on every client at once until one gets a lease or `timeout`
/// passes. Returns the lease and its client (for the renewer).
pub fn acquire(
    mut clients: Vec<DhcpClient>,
    timeout: Duration,
) -> Result<(Lease, DhcpClient), NetError> {
    let names = clients
        .iter()
        .map(|c| c.name.clone())
        .collect::<Vec<_>>()
        .join(", ");
    let start = Instant::now();
    let deadline = start + timeout;
    let mut fatal: Option<NetError> = None;
    let mut warned: Vec<(String, Errno)> = Vec::new();
    let mut spins = 0u32;
    loop {
        let mut i = 0;
        while i < clients.len() {
            if let Some(DhcpEvent::Configured(lease)) = clients[i].poll() {
                debug!("{}: lease after {:?}", lease.iface, start.elapsed());
                return Ok((lease, clients.swap_remove(i)));
            }
            if let Some(e) = clients[i].take_error() {
                let name = clients[i].name.clone();
                if is_fatal(e) {
                    warn!("{name}: giving up on DHCP: {e}");
                    clients.remove(i);
                    fatal.get_or_insert(NetError::DhcpSocket {
                        iface: name,
                        source: e.into(),
                    });
                    continue;
                }
                if !warned.contains(&(name.clone(), e)) {
                    warn!("{name}: DHCP socket: {e}");
                    warned.push((name, e));
                }
            }
            i += 1;
        }
        if clients.is_empty() {
            return Err(fatal.unwrap_or(NetError::NoDhcpAnswer {
                iface: names,
                after: timeout,
            }));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(NetError::NoDhcpAnswer {
                iface: names,
                after: timeout,
            });
        }
        let mut wait = deadline - now;
        for c in &mut clients {
            if let Some(d) = c.poll_delay() {
                wait = wait.min(d);
            }
        }
        spins = if wait < Duration::from_millis(1) {
            spins + 1
        } else {
            0
        };
        if spins > SPIN_LIMIT {
            debug!("DHCP loop polled {spins} times without waiting; pausing");
            wait = SPIN_PAUSE.min(deadline - now);
            spins = 0;
        }
        let mut fds: Vec<PollFd<'_>> = clients
            .iter()
            .map(|c| PollFd::new(c.fd(), PollFlags::POLLIN))
            .collect();
        match nix::poll::poll(&mut fds, poll_timeout(wait)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                // Not expected for valid fds; do not spin on it either.
                warn!("poll on {names}: {e}");
                std::thread::sleep(Duration::from_millis(100).min(deadline - now));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DHCP reply with the given options (BOOTP header zeroed).
    fn reply(options: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 240];
        p[0] = 2;
        p[236..240].copy_from_slice(&[99, 130, 83, 99]);
        p.extend_from_slice(options);
        p
    }

    #[test]
    fn lease_time_and_mtu_from_options() {
        let bytes = reply(&[
            53, 1, 5, 51, 4, 0, 1, 0x51, 0x80, 0, 0, 26, 2, 0x05, 0xdc, 255,
        ]);
        let packet = DhcpPacket::new_unchecked(&bytes[..]);
        assert_eq!(
            extras(&packet),
            (Some(Duration::from_secs(86400)), Some(1500))
        );
    }

    #[test]
    fn missing_bad_or_truncated_options_are_ignored() {
        let none = reply(&[53, 1, 5, 255]);
        assert_eq!(extras(&DhcpPacket::new_unchecked(&none[..])), (None, None));
        let bad = reply(&[51, 2, 0, 1, 26, 2, 0, 10, 255]);
        assert_eq!(extras(&DhcpPacket::new_unchecked(&bad[..])), (None, None));
        let truncated = reply(&[51, 4, 0, 1]);
        assert_eq!(
            extras(&DhcpPacket::new_unchecked(&truncated[..])),
            (None, None)
        );
        // Options after END are not read; stale bytes follow in the buffer.
        let stale = reply(&[255, 51, 4, 0, 0, 0, 1]);
        assert_eq!(extras(&DhcpPacket::new_unchecked(&stale[..])), (None, None));
    }

    #[test]
    fn poll_timeouts_round_up() {
        assert_eq!(i32::from(poll_timeout(Duration::ZERO)), 0);
        assert_eq!(i32::from(poll_timeout(Duration::from_micros(1))), 1);
        assert_eq!(i32::from(poll_timeout(Duration::from_millis(1500))), 1500);
        assert_eq!(
            i32::from(poll_timeout(Duration::from_secs(u64::MAX))),
            i32::MAX
        );
    }

    #[test]
    fn seeds_differ_by_mac() {
        let a = random_seed(MacAddr([0x52, 0x54, 0, 0, 0, 1]));
        let b = random_seed(MacAddr([0x52, 0x54, 0, 0, 0, 2]));
        assert_ne!(a, b);
    }
}
