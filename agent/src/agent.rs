//! The agent's work after bring-up, the same in PID 1 and as an ordinary
//! process: load drivers for the hardware, take the inventory, bring up the
//! network. The control channel (`control/`) takes over after this when a
//! Controller is configured.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use shoal_protocol::Inventory;

use crate::modules::{self, error_chain, KernelLoader, ModuleIndex};
use crate::net::{self, NetConfig, NetMode};
use crate::settings::Settings;
use crate::{inventory, sys};

/// Where the agent looks for things: `/` in PID 1, a fake tree in tests.
#[derive(Debug, Clone)]
pub struct Context {
    pub root: PathBuf,
    /// `lib/modules/<release>` to load modules from; `None`: from the root.
    pub modules_dir: Option<PathBuf>,
    /// Actually call `finit_module` (PID 1, or `--load-modules`).
    pub load_modules: bool,
    /// Try the network once instead of retrying forever (ordinary process).
    pub once: bool,
}

/// What bring-up found, kept for the Controller.
#[derive(Debug)]
pub struct State {
    pub inventory: Inventory,
    pub lease: Option<net::Lease>,
    /// Keeps the lease renewed while it lives.
    pub renewer: Option<net::Renewer>,
}

impl State {
    /// One console line saying the agent is up and what it has.
    pub fn ready_line(&self) -> String {
        let net = match (&self.lease, &self.renewer) {
            (Some(l), Some(r)) => format!("{} on {} (renewing)", l.address, r.iface()),
            (Some(l), None) => format!("{} on {}", l.address, l.iface),
            (None, _) => "no network".into(),
        };
        format!(
            "agent ready: {} NICs, {} disks, {net}",
            self.inventory.nics.len(),
            self.inventory.disks.len()
        )
    }
}

impl Context {
    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }

    fn modules_dir(&self) -> PathBuf {
        self.modules_dir.clone().unwrap_or_else(|| {
            let release =
                fs::read_to_string(self.root.join("proc/sys/kernel/osrelease")).unwrap_or_default();
            self.root.join("lib/modules").join(release.trim())
        })
    }
}

/// Loads the modules this machine's hardware needs. Never fatal.
pub fn load_modules(ctx: &Context) {
    let dir = ctx.modules_dir();
    let index = match ModuleIndex::load(&dir) {
        Ok(i) => i,
        Err(e) => {
            error!("{}; no drivers will be loaded, so NICs and disks that need modules will be missing", error_chain(&e));
            return;
        }
    };
    let t = Instant::now();
    let sys = ctx.sys();
    let report = if ctx.load_modules {
        let mut loader = KernelLoader { sys: sys.clone() };
        modules::load_for_hardware(
            &index,
            &sys,
            &mut loader,
            Duration::from_millis(50),
            20,
            Duration::from_secs(30),
        )
    } else {
        let mut dry = DryRun;
        modules::load_for_hardware(
            &index,
            &sys,
            &mut dry,
            Duration::ZERO,
            1,
            Duration::from_secs(5),
        )
    };
    info!(
        "modules: {} loaded in {} ms ({} rounds), {} failed, {} devices without a module{}",
        report.loaded.len(),
        t.elapsed().as_millis(),
        report.rounds,
        report.failed.len(),
        report.unmatched.len(),
        if report.unmatched.is_empty() {
            ""
        } else {
            " (shoal.log=debug lists them)"
        }
    );
    // A NIC or disk controller without a driver is what an operator needs
    // to hear about; bridges and other chipset parts are only debug noise.
    for d in &report.unmatched {
        if let Some(kind) = pci_class(&d.modalias) {
            warn!(
                "no driver in the initramfs for {kind} {} ({})",
                d.id, d.modalias
            );
        }
    }
}

/// `network controller` / `storage controller` for PCI modaliases of those
/// classes (`...bc02...` / `...bc01...`), else `None`.
fn pci_class(modalias: &str) -> Option<&'static str> {
    let rest = modalias.strip_prefix("pci:")?;
    let class = &rest[rest.find("bc")? + 2..];
    match class.get(..2)? {
        "01" => Some("storage controller"),
        "02" => Some("network controller"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pci_classes_that_matter() {
        assert_eq!(
            super::pci_class("pci:v00008086d0000100Esv00001AF4sd00001100bc02sc00i00"),
            Some("network controller")
        );
        assert_eq!(
            super::pci_class("pci:v00008086d00007010sv00001AF4sd00001100bc01sc01i80"),
            Some("storage controller")
        );
        assert_eq!(
            super::pci_class("pci:v00008086d00001237sv00001AF4sd00001100bc06sc00i00"),
            None
        );
        assert_eq!(super::pci_class("virtio:d00000001v00001AF4"), None);
    }
}

/// Lists what would be loaded, without loading.
#[derive(Debug, Default)]
struct DryRun;

impl modules::Loader for DryRun {
    fn is_loaded(&self, _: &str) -> bool {
        false
    }
    fn load(&mut self, name: &str, path: &Path) -> Result<(), modules::ModError> {
        info!("would load {name} from {}", path.display());
        Ok(())
    }
}

pub fn net_config(ctx: &Context, settings: &Settings) -> NetConfig {
    NetConfig {
        sys: ctx.sys(),
        mode: settings.net.clone(),
        boot_mac: settings.boot_mac,
        iface: settings.iface.clone(),
        carrier_wait: settings.carrier_wait,
        dhcp_timeout: settings.dhcp_timeout,
    }
}

/// Brings up the network, retrying with back-off (1 s doubling to 30 s, with
/// jitter) until it works; `ctx.once` makes one attempt.
pub fn network(ctx: &Context, settings: &Settings) -> Option<(net::Lease, Option<net::Renewer>)> {
    if settings.net == NetMode::Off {
        info!("network: off (shoal.net=off)");
        return None;
    }
    let cfg = net_config(ctx, settings);
    let mut delay = Duration::from_secs(1);
    for attempt in 1u32.. {
        match net::bring_up_and_renew(&cfg) {
            Ok((lease, renewer)) => {
                info!("{lease}");
                return Some((lease, renewer));
            }
            Err(e) => {
                error!("network: {} (attempt {attempt})", error_chain(&e));
                if ctx.once {
                    return None;
                }
            }
        }
        let wait = jitter(delay);
        warn!("network: retrying in {} ms", wait.as_millis());
        std::thread::sleep(wait);
        delay = (delay * 2).min(Duration::from_secs(30));
    }
    None
}

/// 75–125 % of `d`, so a rack of machines that lost DHCP together do not
/// retry in step. Seeded from the clock: no randomness crate needed for this.
pub fn jitter(d: Duration) -> Duration {
    let nanos = sys::uptime().subsec_nanos() ^ std::process::id().wrapping_mul(2_654_435_761);
    let pct = 75 + (nanos % 51);
    d * pct / 100
}

/// The whole bring-up after the early mounts.
pub fn run(ctx: &Context, settings: &Settings) -> State {
    if settings.load_modules {
        load_modules(ctx);
    } else {
        info!("modules: not loading (shoal.modules=0)");
    }
    let inventory = inventory::collect(&ctx.root);
    for line in inventory::summary(&inventory).lines() {
        info!("{line}");
    }
    let (lease, renewer) = network(ctx, settings).unzip();
    match &settings.controller {
        Some(c) => info!("controller: {c}"),
        None => info!("controller: none configured (shoal.controller=HOST:PORT)"),
    }
    State {
        inventory,
        lease,
        renewer: renewer.flatten(),
    }
}
