//! The raw system calls the network code needs and `nix` does not wrap:
//! interface ioctls (`SIOC[GS]IF*`, `SIOCADDRT`), binding an `AF_PACKET`
//! socket to one interface, and attaching a classic BPF filter to it.
//!
//! This is the only module of the network code allowed `unsafe`. Every block
//! passes a pointer to a local, fully initialised `#[repr(C)]` value that the
//! kernel reads (or fills) within the call. The structures are defined here
//! from the kernel's UAPI headers rather than taken from `libc`, whose
//! definitions differ between glibc and musl (the agent is built static).

#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::libc;

/// `IFNAMSIZ` from `<linux/if.h>`, including the terminating NUL.
const IFNAMSIZ: usize = 16;

// Request numbers from <linux/sockios.h>; the same on every architecture.
const SIOCADDRT: u32 = 0x890B;
const SIOCGIFFLAGS: u32 = 0x8913;
const SIOCSIFFLAGS: u32 = 0x8914;
const SIOCSIFADDR: u32 = 0x8916;
const SIOCSIFNETMASK: u32 = 0x891C;
const SIOCGIFMTU: u32 = 0x8921;
const SIOCSIFMTU: u32 = 0x8922;
const SIOCGIFHWADDR: u32 = 0x8927;

// <linux/if.h>, <linux/route.h>, <linux/if_arp.h>
pub const IFF_UP: i16 = 0x1;
const RTF_UP: u16 = 0x0001;
const RTF_GATEWAY: u16 = 0x0002;
const ARPHRD_ETHER: u16 = 1;

/// `struct ifreq` from `<linux/if.h>`: a name and a union whose largest
/// member is `struct ifmap` (24 bytes on 64-bit, 16 on 32-bit).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
#[derive(Clone, Copy)]
union IfReqData {
    addr: libc::sockaddr,
    flags: libc::c_short,
    mtu: libc::c_int,
    _map: [libc::c_ulong; 3],
}

/// `struct rtentry` from `<linux/route.h>`.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    let mut req = IfReq {
        name: [0; IFNAMSIZ],
        data: IfReqData { _map: [0; 3] },
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    Ok(req)
}

/// `struct sockaddr_in` for `addr`, seen as the generic `struct sockaddr`
/// (both are 16 bytes).
fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sockaddr_in` and `sockaddr` are both 16-byte plain-old-data
    // C structures; every bit pattern is a valid `sockaddr`.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// One `ioctl(fd, request, &mut req)` call, mapping -1 to `errno`.
fn ioctl<T>(fd: BorrowedFd<'_>, request: u32, req: &mut T) -> io::Result<()> {
    // SAFETY: `req` points to a live, initialised `#[repr(C)]` value of the
    // type the request expects (`IfReq` or `RtEntry`), valid for reads and
    // writes for the duration of the call; `fd` is an open socket.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, req as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SIOCGIFFLAGS`.
pub fn get_flags(sock: BorrowedFd<'_>, name: &str) -> io::Result<i16> {
    let mut req = ifreq(name)?;
    ioctl(sock, SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the `flags` member of the union.
    Ok(unsafe { req.data.flags })
}

/// `SIOCSIFFLAGS`.
pub fn set_flags(sock: BorrowedFd<'_>, name: &str, flags: i16) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.data.flags = flags;
    ioctl(sock, SIOCSIFFLAGS, &mut req)
}

/// Sets `IFF_UP` (keeping the other flags) unless it is already set.
pub fn set_up(sock: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let flags = get_flags(sock, name)?;
    if flags & IFF_UP == 0 {
        set_flags(sock, name, flags | IFF_UP)?;
    }
    Ok(())
}

/// `SIOCGIFHWADDR`; fails for interfaces that are not Ethernet.
pub fn get_hwaddr(sock: BorrowedFd<'_>, name: &str) -> io::Result<[u8; 6]> {
    let mut req = ifreq(name)?;
    ioctl(sock, SIOCGIFHWADDR, &mut req)?;
    // SAFETY: SIOCGIFHWADDR filled the `addr` member of the union.
    let addr = unsafe { req.data.addr };
    if addr.sa_family != ARPHRD_ETHER {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("not an Ethernet interface (ARPHRD {})", addr.sa_family),
        ));
    }
    let mut mac = [0u8; 6];
    for (out, b) in mac.iter_mut().zip(addr.sa_data.iter()) {
        *out = *b as u8;
    }
    Ok(mac)
}

/// `SIOCGIFMTU`.
pub fn get_mtu(sock: BorrowedFd<'_>, name: &str) -> io::Result<u32> {
    let mut req = ifreq(name)?;
    ioctl(sock, SIOCGIFMTU, &mut req)?;
    // SAFETY: SIOCGIFMTU filled the `mtu` member of the union.
    let mtu = unsafe { req.data.mtu };
    u32::try_from(mtu).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("MTU {mtu}")))
}

/// `SIOCSIFMTU`.
pub fn set_mtu(sock: BorrowedFd<'_>, name: &str, mtu: u16) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.data.mtu = libc::c_int::from(mtu);
    ioctl(sock, SIOCSIFMTU, &mut req)
}

/// `SIOCSIFADDR`: replaces the interface's primary IPv4 address.
pub fn set_addr(sock: BorrowedFd<'_>, name: &str, addr: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.data.addr = sockaddr_in(addr);
    ioctl(sock, SIOCSIFADDR, &mut req)
}

/// `SIOCSIFNETMASK` (the kernel derives the broadcast address too).
pub fn set_netmask(sock: BorrowedFd<'_>, name: &str, mask: Ipv4Addr) -> io::Result<()> {
    let mut req = ifreq(name)?;
    req.data.addr = sockaddr_in(mask);
    ioctl(sock, SIOCSIFNETMASK, &mut req)
}

/// `SIOCADDRT` for `default via gateway dev name`.
pub fn add_default_route(sock: BorrowedFd<'_>, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
    // ifreq() validates the name; the route wants it NUL-terminated.
    let mut dev = ifreq(name)?.name;
    let mut rt = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr_in(gateway),
        rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
        rt_flags: RTF_UP | RTF_GATEWAY,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr().cast(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // `dev` outlives the call below, so `rt_dev` stays valid.
    ioctl(sock, SIOCADDRT, &mut rt)
}

/// Binds an `AF_PACKET` socket to one interface and an Ethernet protocol
/// (host byte order, e.g. `ETH_P_ALL`).
pub fn bind_packet(fd: BorrowedFd<'_>, ifindex: u32, protocol: u16) -> io::Result<()> {
    // SAFETY: `sockaddr_ll` is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("ifindex {ifindex}")))?;
    let len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `sll` is a live, initialised `sockaddr_ll` and `len` its size;
    // the kernel only reads it during the call.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `SO_ATTACH_FILTER` with a classic BPF program.
pub fn attach_filter(fd: BorrowedFd<'_>, program: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let prog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel
    // copies the instructions and never writes through the pointer.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_match_the_kernel_abi() {
        let word = mem::size_of::<libc::c_ulong>();
        assert_eq!(
            mem::size_of::<IfReq>(),
            16 + if word == 8 { 24 } else { 16 }
        );
        assert_eq!(mem::size_of::<RtEntry>(), if word == 8 { 120 } else { 84 });
    }

    #[test]
    fn interface_names_are_checked() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-name-that-is-too-long").is_err());
        assert!(ifreq("nul\0").is_err());
    }

    #[test]
    fn sockaddr_in_is_network_order() {
        let sa = sockaddr_in(Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data[2..6].iter().map(|b| *b as u8).collect();
        assert_eq!(bytes, [10, 0, 2, 15]);
    }
}
