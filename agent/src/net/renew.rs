//! Keeps a DHCP lease alive: a background thread that goes on running the
//! client that acquired the lease, logs renewals, gives a changed lease to
//! the kernel, and warns when the lease is lost.
//!
//! A lost lease leaves the kernel's address in place (a deployment in
//! progress outlives a DHCP server restart) while the client looks for a
//! new one. The thread never panics and never spins: it sleeps in poll(2)
//! until smoltcp's next timer, a DHCP frame, or [`Renewer::stop`].

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags};

use super::dhcp::{poll_timeout, DhcpClient, DhcpEvent};
use super::ifconfig::Ifconfig;
use super::{fmt_secs, Lease, NetError};

/// Longest sleep between two looks at the client, whatever its timers say.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Pause after a socket error before reading the socket again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// More wake-ups than this in one second means something is spinning.
const MAX_WAKEUPS_PER_SEC: u32 = 200;

/// The running renewal of one lease. Dropping it stops the renewal (keep it
/// for as long as the network is needed).
#[derive(Debug)]
pub struct Renewer {
    iface: String,
    stop: Option<UnixStream>,
    thread: Option<JoinHandle<()>>,
}

impl Renewer {
    /// Hands `client`, which holds `lease`, to a new thread.
    pub(crate) fn spawn(mut client: DhcpClient, lease: Lease) -> Result<Self, NetError> {
        let iface = client.name().to_owned();
        let spawn_err = |source| NetError::Spawn {
            iface: iface.clone(),
            source,
        };
        let (stop, stopped) = UnixStream::pair().map_err(spawn_err)?;
        client.slow_down_discovery();
        let thread = std::thread::Builder::new()
            .name(format!("dhcp-{iface}"))
            .spawn(move || run(client, lease, stopped))
            .map_err(spawn_err)?;
        Ok(Renewer {
            iface,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The interface whose lease this renews.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Stops renewing and waits for the thread (it wakes at once). The
    /// kernel keeps the address.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Closing our end wakes the thread's poll with POLLHUP.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("{}: the DHCP renewal thread panicked", self.iface);
            }
        }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What woke the thread.
enum Wake {
    Stop,
    Other,
}

fn run(mut client: DhcpClient, mut lease: Lease, stop: UnixStream) {
    let iface = client.name().to_owned();
    debug!(
        "{iface}: renewing {}/{} in the background",
        lease.address, lease.prefix_len
    );
    let mut last_error: Option<Errno> = None;
    let mut second = (Instant::now(), 0u32);
    loop {
        match client.poll() {
            Some(DhcpEvent::Configured(new)) => {
                on_lease(&lease, &new);
                lease = new;
            }
            Some(DhcpEvent::Deconfigured) => warn!(
                "{iface}: DHCP lease lost; keeping {}/{} while looking for a new one",
                lease.address, lease.prefix_len
            ),
            None => {}
        }

        let error = client.take_error();
        if error != last_error {
            match error {
                Some(e) => warn!("{iface}: DHCP socket: {e}"),
                None => info!("{iface}: DHCP socket works again"),
            }
        }
        last_error = error;

        let mut wait = client.poll_delay().unwrap_or(MAX_WAIT).min(MAX_WAIT);
        let watch_socket = error.is_none();
        if !watch_socket {
            wait = wait.max(ERROR_BACKOFF);
        }
        if second.0.elapsed() >= Duration::from_secs(1) {
            second = (Instant::now(), 0);
        }
        second.1 += 1;
        if second.1 > MAX_WAKEUPS_PER_SEC {
            debug!(
                "{iface}: DHCP renewal loop woke {} times in a second; pausing",
                second.1
            );
            wait = wait.max(Duration::from_secs(1).saturating_sub(second.0.elapsed()));
        }
        if let Wake::Stop = sleep(&client, &stop, wait, watch_socket) {
            debug!("{iface}: DHCP renewal stopped");
            return;
        }
    }
}

/// Sleeps until `wait` passes, the stop end closes, or (if `watch_socket`)
/// a frame arrives.
fn sleep(client: &DhcpClient, stop: &UnixStream, wait: Duration, watch_socket: bool) -> Wake {
    let mut fds = vec![PollFd::new(stop.as_fd(), PollFlags::POLLIN)];
    if watch_socket {
        fds.push(PollFd::new(client.fd(), PollFlags::POLLIN));
    }
    match nix::poll::poll(&mut fds, poll_timeout(wait)) {
        Ok(_) if fds[0].any().unwrap_or(true) => Wake::Stop,
        Ok(_) | Err(Errno::EINTR) => Wake::Other,
        Err(e) => {
            warn!("{}: poll: {e}", client.name());
            std::thread::sleep(ERROR_BACKOFF);
            Wake::Other
        }
    }
}

/// Logs a renewal or a change, and (re)applies the lease: the kernel ignores
/// what it already has, and a default route lost to a link going down and
/// up comes back.
fn on_lease(old: &Lease, new: &Lease) {
    let iface = &new.iface;
    let same = (old.address, old.prefix_len, old.router, old.mtu)
        == (new.address, new.prefix_len, new.router, new.mtu);
    if same {
        let for_how_long = new
            .lease_time
            .map_or_else(|| "an unknown time".to_owned(), fmt_secs);
        info!(
            "lease renewed on {iface}: {}/{} for {for_how_long}",
            new.address, new.prefix_len
        );
    } else {
        info!(
            "lease changed on {iface}: was {}/{}, now {new}",
            old.address, old.prefix_len
        );
    }
    if let Err(e) = Ifconfig::open().and_then(|ctl| ctl.configure(new)) {
        warn!(
            "{iface}: cannot apply the lease: {}",
            super::error_chain(&e)
        );
    }
}
