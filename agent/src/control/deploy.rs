//! The `deploy` step on its worker thread: fetch and check the image's
//! chunk table, choose the disk, open it, and run `deploy::deploy`, sending
//! `Progress` to the Controller at most twice a second.
//!
//! The table comes from the distribution service but is accepted only if it
//! hashes to the image ID in the offer (which came over the authenticated
//! control channel), so the stream never has to be trusted. The record of
//! written chunks (`Written`) belongs to the worker, not to a connection:
//! the control channel may drop and come back while the deploy runs, and a
//! dropped distribution connection resumes from it (inside `deploy`, and
//! here once more if the service stayed unreachable).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use log::{info, warn};
use shoal_protocol::control::{AgentMsg, MulticastOffer, Outcome, StepRef};
use shoal_protocol::inventory::human_bytes;

use super::link::Shared;
use crate::deploy::multicast::{self, McastConfig, McastSummary};
use crate::deploy::{self, DeployConfig, DeployError, Progress};
use crate::disk::progress::Written;
use crate::disk::selector::{select, Selector};
use crate::disk::writer::DiskWriter;
use crate::modules::error_chain;

/// Shortest interval between `Progress` messages (the last always goes).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Rounds of `deploy::deploy` when the service stays unreachable (each
/// round already retries with back-off, resuming from what is written).
const ROUNDS: u32 = 3;

/// What the offer says.
pub(crate) struct Order<'a> {
    pub image: &'a str,
    pub disk: &'a str,
    pub service: &'a str,
    pub session: [u8; 32],
    pub image_id: [u8; 32],
    pub multicast: Option<Box<MulticastOffer>>,
}

/// Runs the deploy and says how it ended.
pub(crate) fn run(
    shared: &Shared,
    step: StepRef,
    root: &Path,
    order: Order<'_>,
    cancel: &AtomicBool,
) -> Outcome {
    match deploy_step(shared, step, root, &order, cancel) {
        Ok(summary) => Outcome::Succeeded {
            output: summary,
            inventory: None,
        },
        Err(reason) => Outcome::Failed {
            reason: format!("deploy {} to disk={}: {reason}", order.image, order.disk),
        },
    }
}

fn deploy_step(
    shared: &Shared,
    step: StepRef,
    root: &Path,
    order: &Order<'_>,
    cancel: &AtomicBool,
) -> Result<String, String> {
    let who = &shared.who;
    let selector: Selector = order.disk.parse().map_err(|e| error_chain(&e))?;
    let service = resolve(order.service)?;
    let cfg = DeployConfig::new(service, order.session);
    let image = deploy::fetch_image(&cfg, order.image_id).map_err(|e| error_chain(&e))?;
    let size = image.header.metadata.source_size;
    let disks = shared.hooks.inventory().disks;
    let target = select(root, &disks, &selector, size).map_err(|e| error_chain(&e))?;
    info!(
        "{who}deploying image {} ({}, {}) to disk {} ({})",
        order.image,
        image.id_hex(),
        human_bytes(size),
        target.name,
        target.path.display()
    );
    let mut writer = DiskWriter::open(&target.path).map_err(|e| error_chain(&e))?;
    let mut written = Written::new(image.chunks.len());
    let start = Instant::now();
    let mut last: Option<Instant> = None;
    let mut report_progress = |p: Progress| {
        let now = Instant::now();
        let due = last.is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY);
        if !due && p.done != p.total {
            return;
        }
        last = Some(now);
        let _ = shared.send(&AgentMsg::Progress {
            step,
            done: p.done,
            total: p.total,
            text: progress_text(&p),
        });
    };
    // Multicast first (if offered), then unicast for whatever is left.
    let mut mcast = match &order.multicast {
        Some(offer) => Some(join(offer, service, &image, &written)?),
        None => None,
    };
    let mut summary: Option<McastSummary> = None;
    if let Some((mcfg, socket, rx)) = &mut mcast {
        info!(
            "{who}multicast session {:016x}: group {}, sender {}, {}, receiver {}",
            mcfg.session,
            mcfg.group,
            mcfg.sender,
            mcfg.cipher.as_str(),
            mcfg.receiver
        );
        let mut meter = deploy::Meter::new(&image, &written, Instant::now(), &mut report_progress);
        let s = multicast::receive(
            mcfg,
            socket,
            rx,
            &image,
            &mut writer,
            &mut written,
            &mut meter,
            cancel,
        )
        .map_err(|e| error_chain(&e))?;
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        summary = Some(s);
    }
    let mut round = 0;
    let report = loop {
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        round += 1;
        match deploy::deploy(
            &cfg,
            &image,
            &mut writer,
            &mut written,
            &mut report_progress,
        ) {
            Ok(r) => break r,
            Err(e @ DeployError::Unreachable { .. }) if round < ROUNDS => warn!(
                "{who}{}; {} of {} chunks written, trying again",
                error_chain(&e),
                written.count(),
                written.chunks()
            ),
            Err(e) => return Err(error_chain(&e)),
        }
    };
    let mut mtext = String::new();
    if let (Some((mcfg, socket, rx)), Some(s)) = (&mut mcast, &summary) {
        for i in 0..image.chunks.len() {
            if written.contains(i) {
                rx.written_elsewhere(i as u32);
            }
        }
        let verdict = multicast::confirm(mcfg, socket, rx);
        mtext = multicast_text(s, report.chunks_fetched, verdict);
        info!("{who}{mtext}");
        if verdict == Some(false) {
            return Err(format!(
                "the distribution service rejected this receiver's completion digest ({mtext})"
            ));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = size as f64 / secs.max(1e-3) / (1 << 20) as f64;
    Ok(format!(
        "wrote {} to {} in {secs:.1} s ({rate:.0} MiB/s), {} chunks zeroed{}{mtext}; peak RSS {}",
        human_bytes(size),
        target.name,
        report.chunks_zeroed,
        if report.reconnects > 0 {
            format!(", {} reconnects", report.reconnects)
        } else {
            String::new()
        },
        peak_rss().map_or("unknown".into(), human_bytes)
    ))
}

/// Opens the multicast socket and the receiver for an offer.
fn join(
    offer: &MulticastOffer,
    service: SocketAddr,
    image: &shoal_protocol::image::Image,
    written: &Written,
) -> Result<
    (
        McastConfig,
        std::net::UdpSocket,
        shoal_protocol::multicast::Receiver,
    ),
    String,
> {
    let group: std::net::SocketAddrV4 = offer
        .group
        .parse()
        .map_err(|e| format!("multicast group {:?}: {e}", offer.group))?;
    let mut sender = resolve(&offer.sender)?;
    if sender.ip().is_unspecified() {
        sender.set_ip(service.ip());
    }
    let cfg = McastConfig {
        group,
        sender,
        session: offer.session,
        key: offer.key,
        cipher: offer.cipher,
        receiver: offer.receiver,
        payload: offer.payload as usize,
        first_data_within: Duration::from_secs(u64::from(offer.start_within_secs) + 5),
        max_partials: MAX_PARTIALS,
    };
    let local = multicast::local_address(sender)
        .map_err(|e| format!("no route to multicast sender {sender}: {e}"))?;
    let (socket, buffer) = multicast::open_socket(&cfg, local)
        .map_err(|e| format!("joining multicast group {group} on {local}: {e}"))?;
    log::debug!("multicast socket: {buffer} bytes of buffer");
    let rx = multicast::receiver(&cfg, image, written);
    Ok((cfg, socket, rx))
}

/// Chunk buffers a receiver may hold (4 MiB chunks: 48 MiB).
const MAX_PARTIALS: usize = 12;

/// `; multicast: 250 chunks, …`.
fn multicast_text(s: &McastSummary, unicast_chunks: u64, verdict: Option<bool>) -> String {
    let st = &s.stats;
    let seen = st.received + st.lost;
    let loss = if seen > 0 {
        100.0 * st.lost as f64 / seen as f64
    } else {
        0.0
    };
    format!(
        "; multicast: {} chunks in {:.1} s, {} datagrams received, {} lost ({loss:.1}%), {} forged dropped, {} skipped (busy), {} bad chunks, {} blocks re-requested; {} chunks by unicast{}; completion {}",
        s.chunks,
        s.elapsed.as_secs_f64(),
        st.received,
        st.lost,
        st.forged,
        st.skipped,
        st.bad_chunks,
        st.repairs_requested,
        unicast_chunks,
        s.fell_back
            .as_ref()
            .map_or(String::new(), |r| format!(" ({r})")),
        match verdict {
            Some(true) => "confirmed by the distribution service",
            Some(false) => "REJECTED by the distribution service",
            None => "not acknowledged by the distribution service",
        }
    )
}

/// The process's peak resident set (`VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `HOST:PORT` to an address.
fn resolve(service: &str) -> Result<SocketAddr, String> {
    service
        .to_socket_addrs()
        .map_err(|e| format!("distribution service {service}: {e}"))?
        .next()
        .ok_or_else(|| format!("distribution service {service}: no address"))
}

/// `12.0 MiB of 64.0 MiB, 53 MiB/s, ETA 1 s`.
fn progress_text(p: &Progress) -> String {
    let mut text = format!("{} of {}", human_bytes(p.done), human_bytes(p.total));
    if let Some(r) = p.bytes_per_sec {
        text.push_str(&format!(", {:.0} MiB/s", r / (1 << 20) as f64));
    }
    if let Some(eta) = p.eta.filter(|_| p.done < p.total) {
        text.push_str(&format!(", ETA {} s", eta.as_secs()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_well() {
        let p = Progress {
            done: 12 << 20,
            total: 64 << 20,
            bytes_per_sec: Some(53.0 * (1 << 20) as f64),
            eta: Some(Duration::from_secs(1)),
        };
        assert_eq!(progress_text(&p), "12.0 MiB of 64.0 MiB, 53 MiB/s, ETA 1 s");
        let done = Progress {
            done: 64 << 20,
            bytes_per_sec: None,
            ..p
        };
        assert_eq!(progress_text(&done), "64.0 MiB of 64.0 MiB");
    }
}
