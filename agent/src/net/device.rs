//! A smoltcp [`Device`] over an `AF_PACKET` socket bound to one interface.
//!
//! smoltcp's own `phy::RawSocket` panics on any socket error (a NIC going
//! down is enough), which would take PID 1 with it. This device never
//! panics: a failed receive or send drops the frame and records the error,
//! which the polling loop reads with [`PacketDevice::take_error`].
//!
//! The socket carries a classic BPF filter that lets through only ARP and
//! DHCP replies (UDP 67 → 68), so the kernel never copies the rest of the
//! traffic (a multicast image stream, say) to us, and smoltcp never sees the
//! kernel's own connections and cannot answer them.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use log::{debug, warn};
use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::sys;

/// `ETH_P_ALL` from `<linux/if_ether.h>`.
const ETH_P_ALL: u16 = 0x0003;
/// `PACKET_OUTGOING` from `<linux/if_packet.h>`: a frame this host sent.
const PACKET_OUTGOING: u8 = 4;
/// Ethernet header length (no VLAN tag).
const ETH_HLEN: usize = 14;
/// Frames read in one `receive` call before giving up on skipping our own.
const MAX_SKIPPED: usize = 64;

/// Classic BPF, as `tcpdump -dd 'arp or (udp src port 67 and udp dst port 68)'`
/// would emit it for IPv4 (fragments other than the first are dropped).
const FILTER: [(u16, u8, u8, u32); 14] = [
    (0x28, 0, 0, 12),          // 0: ldh [12]              ethertype
    (0x15, 10, 0, 0x0806),     // 1: jeq ARP       -> 12 accept
    (0x15, 0, 10, 0x0800),     // 2: jeq IPv4, else -> 13 drop
    (0x30, 0, 0, 23),          // 3: ldb [23]              IP protocol
    (0x15, 0, 8, 17),          // 4: jeq UDP, else  -> 13 drop
    (0x28, 0, 0, 20),          // 5: ldh [20]              flags + fragment offset
    (0x45, 6, 0, 0x1fff),      // 6: jset offset   -> 13 drop
    (0xb1, 0, 0, 14),          // 7: ldxb 4*([14]&0xf)     IP header length
    (0x48, 0, 0, 14),          // 8: ldh [x+14]            UDP source port
    (0x15, 0, 3, 67),          // 9: jeq 67, else   -> 13 drop
    (0x48, 0, 0, 16),          // 10: ldh [x+16]           UDP destination port
    (0x15, 0, 1, 68),          // 11: jeq 68, else  -> 13 drop
    (0x06, 0, 0, 0x0004_0000), // 12: ret accept (whole frame)
    (0x06, 0, 0, 0),           // 13: ret drop
];

fn filter_program() -> Vec<libc::sock_filter> {
    FILTER
        .iter()
        .map(|&(code, jt, jf, k)| libc::sock_filter { code, jt, jf, k })
        .collect()
}

/// An `AF_PACKET` socket on one interface, seen by smoltcp as an Ethernet NIC.
#[derive(Debug)]
pub struct PacketDevice {
    fd: OwnedFd,
    /// Link MTU (IP payload), from the kernel.
    mtu: usize,
    /// Whether the BPF filter is attached (see the module docs).
    filtered: bool,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// Last receive/send error, until [`Self::take_error`].
    error: Cell<Option<Errno>>,
}

impl PacketDevice {
    /// Opens a non-blocking `AF_PACKET` socket on interface `ifindex`.
    ///
    /// The socket is created with protocol 0 (it receives nothing), gets its
    /// filter, and only then is bound to `ETH_P_ALL`, so no unfiltered frame
    /// is ever queued on it.
    pub fn open(name: &str, ifindex: u32, mtu: usize) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let filtered = match sys::attach_filter(fd.as_fd(), &filter_program()) {
            Ok(()) => true,
            Err(e) => {
                warn!("{name}: cannot attach the DHCP packet filter ({e}); receiving every frame");
                false
            }
        };
        sys::bind_packet(fd.as_fd(), ifindex, ETH_P_ALL)?;
        debug!("{name}: AF_PACKET socket on ifindex {ifindex}, MTU {mtu}, filtered {filtered}");
        Ok(PacketDevice {
            fd,
            mtu,
            filtered,
            // Large enough for anything the kernel hands a packet socket
            // (GRO can merge frames well past the MTU when unfiltered).
            rx: vec![0; 65536 + ETH_HLEN],
            tx: Vec::with_capacity(mtu + ETH_HLEN),
            error: Cell::new(None),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// True when only ARP and DHCP replies reach this socket.
    pub fn filtered(&self) -> bool {
        self.filtered
    }

    /// The last error seen since the previous call, if any.
    pub fn take_error(&self) -> Option<Errno> {
        self.error.take()
    }
}

/// Receive checksums are not verified: a veth or virtio peer with checksum
/// offload hands us frames whose UDP checksum is only partial. Transmit
/// checksums are computed as usual (`Checksum::None` there would put an
/// invalid IPv4 header checksum on the wire).
fn checksum_caps() -> ChecksumCapabilities {
    let mut caps = ChecksumCapabilities::default();
    caps.ipv4 = Checksum::Tx;
    caps.udp = Checksum::Tx;
    caps.tcp = Checksum::Tx;
    caps.icmpv4 = Checksum::Tx;
    caps
}

impl phy::Device for PacketDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let fd = self.fd.as_fd();
        let (rx, tx, error) = (&mut self.rx, &mut self.tx, &self.error);
        for _ in 0..MAX_SKIPPED {
            match socket::recvfrom::<LinkAddr>(fd.as_raw_fd(), rx) {
                Ok((_, Some(from))) if from.pkttype() == PACKET_OUTGOING => continue,
                Ok((len, _)) => {
                    let rx = RxToken {
                        frame: &rx[..len.min(rx.len())],
                    };
                    return Some((rx, TxToken { fd, buf: tx, error }));
                }
                Err(Errno::EAGAIN) => return None,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error.set(Some(e));
                    return None;
                }
            }
        }
        None
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxToken<'_>> {
        Some(TxToken {
            fd: self.fd.as_fd(),
            buf: &mut self.tx,
            error: &self.error,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + ETH_HLEN;
        caps.max_burst_size = None;
        caps.checksum = checksum_caps();
        caps
    }
}

#[derive(Debug)]
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

#[derive(Debug)]
pub struct TxToken<'a> {
    fd: BorrowedFd<'a>,
    buf: &'a mut Vec<u8>,
    error: &'a Cell<Option<Errno>>,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.clear();
        self.buf.resize(len, 0);
        let result = f(self.buf);
        // A failed send (link down, queue full) loses the frame; DHCP retries.
        if let Err(e) = socket::send(self.fd.as_raw_fd(), self.buf, MsgFlags::empty()) {
            self.error.set(Some(e));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Just enough of a classic BPF interpreter to run [`FILTER`].
    fn run_filter(frame: &[u8]) -> u32 {
        let ld16 = |off: usize| {
            frame
                .get(off..off + 2)
                .map(|b| u32::from(u16::from_be_bytes([b[0], b[1]])))
        };
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        for _ in 0..FILTER.len() {
            let (code, jt, jf, k) = FILTER[pc];
            let jump = |cond: bool| pc + 1 + usize::from(if cond { jt } else { jf });
            pc = match code {
                0x28 => match ld16(k as usize) {
                    Some(v) => (a = v, pc + 1).1,
                    None => return 0,
                },
                0x30 => match frame.get(k as usize) {
                    Some(&v) => (a = u32::from(v), pc + 1).1,
                    None => return 0,
                },
                0xb1 => match frame.get(k as usize) {
                    Some(&v) => (x = u32::from(v & 0xf) * 4, pc + 1).1,
                    None => return 0,
                },
                0x48 => match ld16((x + k) as usize) {
                    Some(v) => (a = v, pc + 1).1,
                    None => return 0,
                },
                0x15 => jump(a == k),
                0x45 => jump(a & k != 0),
                0x06 => return k,
                other => panic!("opcode {other:#x} not in the test interpreter"),
            };
        }
        panic!("filter did not return")
    }

    fn udp_frame(src_port: u16, dst_port: u16, frag: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        f[23] = 17;
        f[34..36].copy_from_slice(&src_port.to_be_bytes());
        f[36..38].copy_from_slice(&dst_port.to_be_bytes());
        f
    }

    #[test]
    fn filter_passes_arp_and_dhcp_replies_only() {
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_ne!(run_filter(&arp), 0);
        assert_ne!(run_filter(&udp_frame(67, 68, 0)), 0);
        // "Don't fragment" is not a fragment.
        assert_ne!(run_filter(&udp_frame(67, 68, 0x4000)), 0);
        assert_eq!(run_filter(&udp_frame(67, 68, 0x0010)), 0, "later fragment");
        assert_eq!(
            run_filter(&udp_frame(68, 67, 0)),
            0,
            "another client's request"
        );
        assert_eq!(run_filter(&udp_frame(5000, 68, 0)), 0);
        assert_eq!(run_filter(&udp_frame(67, 5000, 0)), 0);
        let mut tcp = udp_frame(67, 68, 0);
        tcp[23] = 6;
        assert_eq!(run_filter(&tcp), 0);
        let mut ipv6 = udp_frame(67, 68, 0);
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(run_filter(&ipv6), 0);
        assert_eq!(run_filter(&[0u8; 6]), 0, "runt frame");
    }

    #[test]
    fn transmit_checksums_stay_on() {
        let caps = checksum_caps();
        assert!(caps.udp.tx() && !caps.udp.rx());
        assert!(caps.ipv4.tx() && !caps.ipv4.rx());
    }
}
