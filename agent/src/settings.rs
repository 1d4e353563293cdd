//! The agent's settings: namespaced kernel command-line keys (`shoal.*`,
//! plus `BOOTIF=` and `ip=` as PXELINUX/iPXE and the kernel define them) over
//! an optional config file baked into the initramfs (`/etc/shoal/agent.toml`).
//!
//! The command line wins over the file. A key the agent does not know, or a
//! value it cannot read, is a warning naming the key and the value; the
//! default stays in force and the agent keeps going. Parsing returns the
//! warnings instead of logging them, because the logger is configured from
//! the settings themselves.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use shoal_protocol::inventory::MacAddr;

use crate::net::{NetMode, StaticIp};

/// What to do when the agent is done, or when it hits a fatal error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Reboot,
    Poweroff,
    /// Stay up doing nothing more (ordinary process: exit).
    Wait,
}

impl fmt::Display for PowerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PowerAction::Reboot => "reboot",
            PowerAction::Poweroff => "poweroff",
            PowerAction::Wait => "wait",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `env_logger`-style filter: `info`, `debug`, `info,shoal_agent::net=trace`.
    pub log: String,
    /// `shoal.controller=HOST:PORT`, kept as written (resolved later, after DHCP).
    pub controller: Option<String>,
    /// `shoal.controller_key=`: the Controller's static public key to pin (64 hex digits).
    pub controller_key: Option<[u8; 32]>,
    /// `shoal.enrol_key=`: the site enrolment secret (Noise PSK, 64 hex digits).
    pub enrol_key: Option<[u8; 32]>,
    /// `BOOTIF=` from PXELINUX/iPXE.
    pub boot_mac: Option<MacAddr>,
    /// `shoal.iface=`: use only this NIC.
    pub iface: Option<String>,
    pub net: NetMode,
    pub dhcp_timeout: Duration,
    pub carrier_wait: Duration,
    /// `shoal.modules=0` skips automatic module loading.
    pub load_modules: bool,
    /// `shoal.on_error=reboot|poweroff`.
    pub on_error: PowerAction,
    /// `shoal.error_delay=SECS`: back-off before rebooting after a fatal error.
    pub error_delay: Duration,
    /// `shoal.then=wait|poweroff|reboot`: what to do after bring-up.
    pub then: PowerAction,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            log: "info".into(),
            controller: None,
            controller_key: None,
            enrol_key: None,
            boot_mac: None,
            iface: None,
            net: NetMode::Dhcp,
            dhcp_timeout: Duration::from_secs(10),
            carrier_wait: Duration::from_secs(5),
            load_modules: true,
            on_error: PowerAction::Reboot,
            error_delay: Duration::from_secs(30),
            then: PowerAction::Wait,
        }
    }
}

/// A setting that was not applied, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// Where it came from: `kernel command line` or the config file's path.
    pub source: String,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}; ignored",
            self.source, self.key, self.message
        )
    }
}

pub const CMDLINE: &str = "kernel command line";

impl Settings {
    /// Applies a config file (TOML: the same keys without the `shoal.` prefix),
    /// then the kernel command line, and returns what was ignored.
    pub fn load(config: Option<(&str, &str)>, cmdline: &str) -> (Settings, Vec<Warning>) {
        let mut s = Settings::default();
        let mut warnings = Vec::new();
        if let Some((path, text)) = config {
            s.apply_config(path, text, &mut warnings);
        }
        s.apply_cmdline(cmdline, &mut warnings);
        (s, warnings)
    }

    fn apply_config(&mut self, path: &str, text: &str, warnings: &mut Vec<Warning>) {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => {
                let message = format!("not valid TOML: {}", e.message());
                warnings.push(Warning {
                    source: path.into(),
                    key: "(file)".into(),
                    message,
                });
                return;
            }
        };
        for (key, value) in table {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => if b { "1" } else { "0" }.to_string(),
                other => {
                    let message = format!(
                        "expected a string, number or boolean, found {}",
                        other.type_str()
                    );
                    warnings.push(Warning {
                        source: path.into(),
                        key,
                        message,
                    });
                    continue;
                }
            };
            if let Err(message) = self.apply_key(&key, &value) {
                warnings.push(Warning {
                    source: path.into(),
                    key,
                    message,
                });
            }
        }
    }

    fn apply_cmdline(&mut self, cmdline: &str, warnings: &mut Vec<Warning>) {
        for token in split_cmdline(cmdline) {
            let (key, value) = match token.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (token.as_str(), None),
            };
            let result = if let Some(key) = key.strip_prefix("shoal.") {
                match value {
                    Some(v) => self.apply_key(key, v),
                    None => Err("has no value (expected shoal.KEY=VALUE)".into()),
                }
            } else if key == "BOOTIF" {
                value
                    .ok_or_else(|| "has no value".to_string())
                    .and_then(parse_bootif)
                    .map(|m| self.boot_mac = Some(m))
            } else if key == "ip" {
                value
                    .ok_or_else(|| "has no value".to_string())
                    .and_then(parse_kernel_ip)
                    .map(|n| self.net = n)
            } else {
                Ok(()) // the kernel's or somebody else's
            };
            if let Err(message) = result {
                warnings.push(Warning {
                    source: CMDLINE.into(),
                    key: key.to_string(),
                    message,
                });
            }
        }
    }

    /// Applies one key (without the `shoal.` prefix).
    fn apply_key(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "log" => self.log = parse_log(value)?,
            "controller" => self.controller = Some(parse_host_port(value)?),
            "controller_key" => self.controller_key = Some(parse_key(value)?),
            "enrol_key" => self.enrol_key = Some(parse_key(value)?),
            "iface" => self.iface = Some(nonempty(value)?),
            "net" => {
                self.net = match value {
                    "dhcp" => NetMode::Dhcp,
                    "off" | "none" => NetMode::Off,
                    _ => {
                        return Err(format!(
                            "{value:?} is not one of dhcp, off (use ip=... for a static address)"
                        ))
                    }
                }
            }
            "dhcp_timeout" => self.dhcp_timeout = parse_secs(value, 1, 600)?,
            "carrier_wait" => self.carrier_wait = parse_secs(value, 0, 600)?,
            "modules" => self.load_modules = parse_bool(value)?,
            "on_error" => {
                self.on_error = match value {
                    "reboot" => PowerAction::Reboot,
                    "poweroff" => PowerAction::Poweroff,
                    _ => return Err(format!("{value:?} is not one of reboot, poweroff")),
                }
            }
            "error_delay" => self.error_delay = parse_secs(value, 0, 3600)?,
            "then" => {
                self.then = match value {
                    "wait" => PowerAction::Wait,
                    "reboot" => PowerAction::Reboot,
                    "poweroff" => PowerAction::Poweroff,
                    _ => return Err(format!("{value:?} is not one of wait, reboot, poweroff")),
                }
            }
            _ => return Err("unknown key".into()),
        }
        Ok(())
    }
}

/// Splits a kernel command line the way the kernel does: on white space,
/// with double quotes grouping (and removed).
pub fn split_cmdline(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn nonempty(v: &str) -> Result<String, String> {
    if v.is_empty() {
        Err("is empty".into())
    } else {
        Ok(v.to_string())
    }
}

fn parse_key(v: &str) -> Result<[u8; 32], String> {
    shoal_protocol::channel::key_from_hex(v)
        .map_err(|_| "is not a 32-byte key as 64 hex digits".to_string())
}

fn parse_log(v: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    // Accept `LEVEL` and `LEVEL,module=LEVEL,...`; check every level named.
    for part in v.split(',') {
        let level = part.rsplit('=').next().unwrap_or("");
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let what = if v.contains(',') {
                format!("{v:?}: {level:?}")
            } else {
                format!("{v:?}")
            };
            return Err(format!("{what} is not one of {}", LEVELS.join(", ")));
        }
    }
    Ok(v.to_string())
}

fn parse_host_port(v: &str) -> Result<String, String> {
    let (host, port) = v
        .rsplit_once(':')
        .ok_or_else(|| format!("{v:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{v:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(v.to_string()),
        _ => Err(format!(
            "{v:?}: port {port:?} is not a number from 1 to 65535"
        )),
    }
}

fn parse_secs(v: &str, min: u64, max: u64) -> Result<Duration, String> {
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "{v:?} is not a whole number of seconds from {min} to {max}"
        )),
    }
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v {
        "1" | "on" | "yes" | "true" => Ok(true),
        "0" | "off" | "no" | "false" => Ok(false),
        _ => Err(format!(
            "{v:?} is not one of 1, 0, on, off, yes, no, true, false"
        )),
    }
}

/// `BOOTIF=01-52-54-00-12-34-56` (ARP hardware type 1 first), or a bare MAC.
fn parse_bootif(v: &str) -> Result<MacAddr, String> {
    let bare = match v.split('-').count() {
        7 => v
            .strip_prefix("01-")
            .ok_or_else(|| format!("{v:?}: only Ethernet (type 01) is supported"))?,
        _ => v,
    };
    MacAddr::parse(bare).map_err(|e| e.to_string())
}

/// The kernel's `ip=` forms: `dhcp`, `off`/`none`, or
/// `<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>`.
fn parse_kernel_ip(v: &str) -> Result<NetMode, String> {
    match v {
        "dhcp" | "on" | "any" => return Ok(NetMode::Dhcp),
        "off" | "none" => return Ok(NetMode::Off),
        _ => {}
    }
    let f: Vec<&str> = v.split(':').collect();
    let field = |i: usize| f.get(i).copied().filter(|s| !s.is_empty());
    let ip = |i: usize, what: &str| -> Result<Option<Ipv4Addr>, String> {
        field(i)
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("{v:?}: {what} {s:?} is not an IPv4 address"))
            })
            .transpose()
    };
    let address = match ip(0, "client address")? {
        Some(a) => a,
        None if matches!(field(6), Some("dhcp")) => return Ok(NetMode::Dhcp),
        None => {
            return Err(format!(
                "{v:?}: no client address (and autoconf is not dhcp)"
            ))
        }
    };
    let gateway = ip(2, "gateway")?;
    let prefix_len = match ip(3, "netmask")? {
        Some(m) => {
            let bits = u32::from(m);
            if bits.leading_ones() + bits.trailing_zeros() != 32 {
                return Err(format!("{v:?}: netmask {m} is not contiguous"));
            }
            bits.leading_ones() as u8
        }
        None => 24,
    };
    Ok(NetMode::Static(StaticIp {
        address,
        prefix_len,
        gateway,
        device: field(5).map(str::to_string),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(cmdline: &str) -> (Settings, Vec<Warning>) {
        Settings::load(None, cmdline)
    }

    #[test]
    fn defaults_from_a_plain_kernel_line() {
        let (s, w) = load("console=ttyS0 quiet root=/dev/ram0");
        assert_eq!(s, Settings::default());
        assert!(w.is_empty());
    }

    #[test]
    fn reads_namespaced_keys() {
        let (s, w) = load(
            "console=ttyS0 shoal.log=debug shoal.controller=10.0.0.1:4000 BOOTIF=01-52-54-00-12-34-56 \
             shoal.on_error=poweroff shoal.then=poweroff shoal.dhcp_timeout=3 shoal.modules=off",
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.log, "debug");
        assert_eq!(s.controller.as_deref(), Some("10.0.0.1:4000"));
        assert_eq!(s.boot_mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(s.on_error, PowerAction::Poweroff);
        assert_eq!(s.then, PowerAction::Poweroff);
        assert_eq!(s.dhcp_timeout, Duration::from_secs(3));
        assert!(!s.load_modules);
    }

    #[test]
    fn malformed_keys_warn_and_keep_defaults() {
        let (s, w) = load(
            "shoal.log=loud shoal.controller=nohost shoal.controller=:80 shoal.controller=h:99999 shoal.bogus=1 \
             shoal.then BOOTIF=zz shoal.dhcp_timeout=-1 shoal.net=carrier-pigeon ip=10.0.0.5::10.0.0.1:255.0.255.0",
        );
        assert_eq!(s, Settings::default());
        let keys: Vec<&str> = w.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "shoal.log",
                "shoal.controller",
                "shoal.controller",
                "shoal.controller",
                "shoal.bogus",
                "shoal.then",
                "BOOTIF",
                "shoal.dhcp_timeout",
                "shoal.net",
                "ip"
            ]
        );
        let text = w
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            text.contains("kernel command line: shoal.bogus: unknown key; ignored"),
            "{text}"
        );
        assert!(text.contains("\"loud\" is not one of"), "{text}");
        assert!(
            text.contains("netmask 255.0.255.0 is not contiguous"),
            "{text}"
        );
    }

    #[test]
    fn kernel_ip_forms() {
        assert_eq!(load("ip=dhcp").0.net, NetMode::Dhcp);
        assert_eq!(load("ip=off").0.net, NetMode::Off);
        let want = NetMode::Static(StaticIp {
            address: Ipv4Addr::new(10, 1, 2, 3),
            prefix_len: 16,
            gateway: Some(Ipv4Addr::new(10, 1, 0, 1)),
            device: Some("eth1".into()),
        });
        assert_eq!(
            load("ip=10.1.2.3::10.1.0.1:255.255.0.0:host:eth1:off")
                .0
                .net,
            want
        );
    }

    #[test]
    fn quotes_group_words() {
        assert_eq!(split_cmdline(r#"a "b c"=d  e="" "#), ["a", "b c=d", "e="]);
    }

    #[test]
    fn command_line_wins_over_config_file() {
        let file = "log = \"debug\"\ncontroller = \"ctl:4000\"\nmodules = false\nthen = 3\n";
        let (s, w) = Settings::load(Some(("/etc/shoal/agent.toml", file)), "shoal.log=warn");
        assert_eq!(s.log, "warn");
        assert_eq!(s.controller.as_deref(), Some("ctl:4000"));
        assert!(!s.load_modules);
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].to_string(),
            "/etc/shoal/agent.toml: then: \"3\" is not one of wait, reboot, poweroff; ignored"
        );
    }

    #[test]
    fn broken_config_file_is_a_warning() {
        let (s, w) = Settings::load(Some(("/etc/shoal/agent.toml", "log = [")), "");
        assert_eq!(s, Settings::default());
        assert!(w[0]
            .to_string()
            .starts_with("/etc/shoal/agent.toml: (file): not valid TOML"));
    }
}
