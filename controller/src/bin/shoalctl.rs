//! `shoalctl`: the Controller's admin command line, over the admin API.
//!
//! ```text
//! shoalctl [--url URL] [--token T | --state DIR] [--json] COMMAND
//!   devices list | show ID | forget ID | approve ID
//!   jobs run --device ID|all [--device ..] [--wait SECS] STEP...
//!   jobs list | show ID | cancel ID
//!   logs [--device ID] [--limit N]
//!   health | whoami
//!   image group create GROUP | list | set GROUP --compression none|fast|max
//!   image add GROUP FILE [--name N] [--compression C] [--description D]
//!   image list [GROUP] | show G/N | verify G/N | export G/N FILE
//!   image replace G/N FILE [--description D] | remove G/N
//!   acl grant|revoke USER list|deploy|modify GROUP[/NAME]
//!   users create NAME [--role user|admin] | list | remove NAME
//! ```
//!
//! Image files (add, replace, export) are paths on this host, made
//! absolute and read or written by the Controller itself: `shoalctl` runs
//! on the Controller's host (the admin API is on loopback).
//!
//! STEP is `echo:TEXT`, `inventory`, `wait:SECS`, `reboot`, `poweroff` or
//! `deploy:GROUP/NAME@DISK` (DISK: `auto`, `serial=S`, `wwn=W`, `name=N`,
//! `path=P`, `file=F`).
//! Human tables by default, `--json` for scripts. Exit status 1 on any
//! error, and from `jobs run --wait` when the job did not succeed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;
use shoal_controller::api::{Device, Job, NewJob};
use shoal_controller::client::Client;
use shoal_controller::client::ClientError;
use shoal_controller::distribution::multicast::SessionSnapshot;
use shoal_controller::jobs::StepSpec;
use shoal_controller::model::JobState;
use shoal_controller::store::client::StoreClient;
use shoal_controller::store::{GroupInfo, ImageInfo, Permission, Role};
use shoal_controller::table::Table;
use shoal_controller::time::{ago, now_ms, parse_rfc3339};
use shoal_controller::{error_chain, state};
use shoal_protocol::image::Compression;

#[derive(Debug, Parser)]
#[command(
    name = "shoalctl",
    version,
    about = "Admin command line for the Shoal Controller"
)]
struct Cli {
    /// The admin API.
    #[arg(
        long,
        global = true,
        env = "SHOAL_URL",
        default_value = "http://127.0.0.1:7100"
    )]
    url: String,
    /// Admin token (else read from --state DIR/admin.token).
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The Controller's state directory, for its admin.token.
    #[arg(long, global = true, env = "SHOAL_STATE", value_name = "DIR")]
    state: Option<PathBuf>,
    /// JSON output for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Device records.
    #[command(subcommand)]
    Devices(DevicesCmd),
    /// Jobs: run steps on devices.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// Multicast sessions of the Image Distribution service.
    #[command(subcommand)]
    Sessions(SessionsCmd),
    /// Agents' log lines, oldest first.
    Logs {
        /// Only this device (id, UUID or MAC).
        #[arg(long)]
        device: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Is the Controller up? (needs no token)
    Health,
    /// Which user the token belongs to.
    Whoami,
    /// The image store: groups and images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Grant or revoke list/deploy/modify on a group or an image.
    #[command(subcommand)]
    Acl(AclCmd),
    /// Admin API users (admins only).
    #[command(subcommand)]
    Users(UsersCmd),
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Image groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Add a raw disk image, a qcow2 disk or a Shoal image (FILE on this host).
    Add {
        group: String,
        file: PathBuf,
        /// Default: FILE's name without its extension.
        #[arg(long)]
        name: Option<String>,
        /// Only for a group's first image (later ones take the group's).
        #[arg(long)]
        compression: Option<Compression>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Images you may list, in one group or all.
    List {
        group: Option<String>,
    },
    /// Metadata, chunks, stored size and ID of GROUP/NAME.
    Show {
        image: String,
    },
    /// Check every chunk's hashes.
    Verify {
        image: String,
    },
    /// Write GROUP/NAME to FILE (a new file) at the group's compression.
    Export {
        image: String,
        file: PathBuf,
    },
    /// Replace GROUP/NAME's content with FILE (atomic).
    Replace {
        image: String,
        file: PathBuf,
        #[arg(long)]
        description: Option<String>,
    },
    Remove {
        image: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCmd {
    /// A new, empty group (no compression until its first image).
    Create {
        group: String,
    },
    List,
    /// Set the group's compression; its images are re-encoded.
    Set {
        group: String,
        #[arg(long)]
        compression: Compression,
    },
}

#[derive(Debug, Subcommand)]
enum AclCmd {
    /// USER PERMISSION GROUP[/NAME]
    Grant {
        user: String,
        permission: Permission,
        target: String,
    },
    /// USER PERMISSION GROUP[/NAME]
    Revoke {
        user: String,
        permission: Permission,
        target: String,
    },
}

#[derive(Debug, Subcommand)]
enum UsersCmd {
    /// Prints the new user's token once.
    Create {
        name: String,
        #[arg(long, default_value = "user")]
        role: Role,
    },
    List,
    Remove {
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCmd {
    List,
    /// One device with its inventory (ID: id, UUID or MAC).
    Show {
        id: String,
    },
    /// Delete the record; its open steps end and its connection closes.
    Forget {
        id: String,
    },
    /// Let a pending device take jobs.
    Approve {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum SessionsCmd {
    /// Live and recently ended sessions.
    List,
    /// One session with per-receiver progress, rate, loss, repairs and ETA:
    /// its ID (or a unique prefix), or `job:N` for job N's newest.
    Show { id: String },
}

#[derive(Debug, Subcommand)]
enum JobsCmd {
    /// Queue steps on devices; prints the job id.
    Run {
        /// Device id, UUID, MAC, or `all` (every approved device); repeatable.
        #[arg(long = "device", value_name = "ID", required = true)]
        devices: Vec<String>,
        /// Wait up to SECS for the job to end; exit 1 unless it succeeded.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Whom the job is for (admin tokens only; default: the caller).
        /// A deploy step runs with this user's image rights.
        #[arg(long)]
        by: Option<String>,
        /// echo:TEXT, inventory, wait:SECS, reboot, poweroff, deploy:GROUP/NAME@DISK
        #[arg(value_name = "STEP", required = true)]
        steps: Vec<String>,
    },
    List {
        #[arg(long)]
        limit: Option<u32>,
    },
    /// One job, one row per device × step.
    Show { id: String },
    /// Cancel queued steps and ask agents to stop running ones.
    Cancel { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shoalctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(cli: &Cli) -> Result<String, String> {
    if let Some(t) = &cli.token {
        return Ok(t.clone());
    }
    match &cli.state {
        Some(dir) => state::read_admin_token(dir).map_err(|e| error_chain(&e)),
        None => Err("no admin token: pass --token (or set SHOAL_TOKEN) or --state DIR".into()),
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

fn run(cli: &Cli) -> Result<ExitCode, String> {
    let err = |e: shoal_controller::client::ClientError| e.to_string();
    if let Cmd::Health = cli.cmd {
        let c = Client::new(&cli.url, "");
        let h = c.health().map_err(err)?;
        if cli.json {
            print_json(&h)?;
        } else {
            println!(
                "{} {} (controller {}, public key {})",
                c.base(),
                h.status,
                h.version,
                h.public_key
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Cmd::Whoami | Cmd::Image(_) | Cmd::Acl(_) | Cmd::Users(_) = cli.cmd {
        let c = StoreClient::new(&cli.url, &token(cli)?);
        run_store(cli, &c).map_err(err)??;
        return Ok(ExitCode::SUCCESS);
    }
    let c = Client::new(&cli.url, &token(cli)?);
    match &cli.cmd {
        Cmd::Health | Cmd::Whoami | Cmd::Image(_) | Cmd::Acl(_) | Cmd::Users(_) => {
            unreachable!("handled above")
        }
        Cmd::Devices(DevicesCmd::List) => {
            let devices = c.devices().map_err(err)?;
            if cli.json {
                print_json(&devices)?;
            } else {
                print!("{}", devices_table(&devices));
            }
        }
        Cmd::Devices(DevicesCmd::Show { id }) => {
            let d = c.device(id).map_err(err)?;
            if cli.json {
                print_json(&d)?;
            } else {
                print!("{}", device_text(&d));
            }
        }
        Cmd::Devices(DevicesCmd::Forget { id }) => {
            let d = c.forget(id).map_err(err)?;
            if cli.json {
                print_json(&d)?;
            } else {
                println!("forgot device {} ({})", d.id, ident(&d));
            }
        }
        Cmd::Devices(DevicesCmd::Approve { id }) => {
            let d = c.approve(id).map_err(err)?;
            if cli.json {
                print_json(&d)?;
            } else {
                println!("device {} ({}) approved", d.id, ident(&d));
            }
        }
        Cmd::Jobs(JobsCmd::Run {
            devices,
            wait,
            by,
            steps,
        }) => {
            let steps = steps
                .iter()
                .map(|s| StepSpec::parse_cli(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            // Without --by the job is the caller's: a deploy is checked
            // against the rights of whoever the token belongs to.
            let new = NewJob {
                devices: devices.clone(),
                steps,
                created_by: by.clone(),
            };
            let job = c.create_job(&new).map_err(err)?;
            let Some(secs) = wait else {
                if cli.json {
                    print_json(&job)?;
                } else {
                    println!("{}", job.id);
                }
                return Ok(ExitCode::SUCCESS);
            };
            if !cli.json {
                println!("{}", job.id);
                let _ = std::io::stdout().flush();
            }
            return wait_for(&c, job.id, Duration::from_secs(*secs), cli.json);
        }
        Cmd::Jobs(JobsCmd::List { limit }) => {
            let jobs = c.jobs(*limit).map_err(err)?;
            if cli.json {
                print_json(&jobs)?;
            } else {
                print!("{}", jobs_table(&jobs));
            }
        }
        Cmd::Jobs(JobsCmd::Show { id }) => {
            let job = c.job(id).map_err(err)?;
            if cli.json {
                print_json(&job)?;
            } else {
                print!("{}", job_text(&job));
            }
        }
        Cmd::Sessions(SessionsCmd::List) => {
            let all = c.sessions().map_err(err)?;
            if cli.json {
                print_json(&all)?;
            } else {
                print!("{}", sessions_table(&all));
            }
        }
        Cmd::Sessions(SessionsCmd::Show { id }) => {
            let one = c.session(id).map_err(err)?;
            if cli.json {
                print_json(&one)?;
            } else {
                print!("{}", session_text(&one));
            }
        }
        Cmd::Jobs(JobsCmd::Cancel { id }) => {
            let out = c.cancel(id).map_err(err)?;
            if cli.json {
                print_json(&out)?;
            } else {
                println!(
                    "job {}: {} queued steps cancelled, {} running steps asked to stop",
                    out.job, out.cancelled, out.stopping
                );
            }
        }
        Cmd::Logs { device, limit } => {
            let logs = c.logs(device.as_deref(), *limit).map_err(err)?;
            if cli.json {
                print_json(&logs)?;
            } else {
                let mut t = Table::new(&["TIME", "DEVICE", "LEVEL", "TEXT"]);
                for l in &logs {
                    t.row(vec![
                        short_time(&l.time),
                        l.device.map(|d| d.to_string()).unwrap_or_default(),
                        l.level.clone(),
                        l.text.clone(),
                    ]);
                }
                print!("{}", t.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn wait_for(c: &Client, id: u64, limit: Duration, json: bool) -> Result<ExitCode, String> {
    let start = Instant::now();
    let job = loop {
        let job = c.job(&id.to_string()).map_err(|e| e.to_string())?;
        if job.state.is_final() {
            break job;
        }
        if start.elapsed() >= limit {
            if json {
                print_json(&job)?;
            } else {
                print!("{}", job_text(&job));
            }
            return Err(format!(
                "job {id} still {} after {} s",
                job.state,
                limit.as_secs()
            ));
        }
        // Quick at first (short jobs end within a second), then gentler.
        let poll = if start.elapsed() < Duration::from_secs(60) {
            50
        } else {
            500
        };
        std::thread::sleep(Duration::from_millis(poll));
    };
    if json {
        print_json(&job)?;
    } else {
        print!("{}", job_text(&job));
    }
    if job.state == JobState::Succeeded {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("shoalctl: job {id} {}", job.state);
        Ok(ExitCode::FAILURE)
    }
}

fn ident(d: &Device) -> String {
    d.uuid
        .clone()
        .or_else(|| d.macs.first().cloned())
        .unwrap_or_else(|| "no identity".into())
}

/// `2026-04-20 10:17:52` from an RFC 3339 time.
fn short_time(t: &str) -> String {
    t.get(..19).unwrap_or(t).replace('T', " ")
}

fn seen(t: &Option<String>) -> String {
    match t.as_deref().and_then(parse_rfc3339) {
        Some(ms) => ago(ms, now_ms()),
        None => "never".into(),
    }
}

fn devices_table(devices: &[Device]) -> String {
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "ENROLMENT",
        "UUID",
        "MAC",
        "LAST SEEN",
        "PEER",
    ]);
    for d in devices {
        t.row(vec![
            d.id.to_string(),
            d.state.to_string(),
            d.enrolment.to_string(),
            d.uuid.clone().unwrap_or_else(|| "-".into()),
            d.macs.first().cloned().unwrap_or_else(|| "-".into()),
            seen(&d.last_seen),
            d.last_peer.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

fn size(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn text(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn device_text(d: &Device) -> String {
    let mut t = Table::plain();
    let mut kv = |k: &str, v: String| t.row(vec![format!("  {k}"), v]);
    kv("state", d.state.to_string());
    kv("enrolment", d.enrolment.to_string());
    kv("uuid", d.uuid.clone().unwrap_or_else(|| "-".into()));
    kv("serial", d.serial.clone().unwrap_or_else(|| "-".into()));
    kv("macs", d.macs.join(", "));
    kv(
        "last seen",
        match &d.last_seen {
            Some(s) => format!("{} ({})", short_time(s), seen(&d.last_seen)),
            None => "never".into(),
        },
    );
    kv("peer", d.last_peer.clone().unwrap_or_else(|| "-".into()));
    kv(
        "agent",
        d.agent_version.clone().unwrap_or_else(|| "-".into()),
    );
    kv(
        "agent key",
        d.agent_key.clone().unwrap_or_else(|| "-".into()),
    );
    kv("created", short_time(&d.created_at));
    kv(
        "image",
        d.assigned_image.clone().unwrap_or_else(|| "-".into()),
    );
    if let Some(inv) = &d.inventory {
        if let Some(sys) = inv.get("system") {
            let parts: Vec<String> = ["vendor", "product"]
                .iter()
                .filter_map(|k| text(sys, k))
                .collect();
            kv(
                "system",
                if parts.is_empty() {
                    "-".into()
                } else {
                    parts.join(" ")
                },
            );
        }
        if let Some(cpus) = inv.get("cpus") {
            let count = text(cpus, "count").unwrap_or_else(|| "?".into());
            kv(
                "cpus",
                match text(cpus, "model") {
                    Some(m) => format!("{count} × {m}"),
                    None => count,
                },
            );
        }
        if let Some(mem) = inv.get("memory_bytes").and_then(Value::as_u64) {
            kv("memory", size(mem));
        }
        for nic in inv
            .get("nics")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut s = format!(
                "{} {}",
                text(nic, "name").unwrap_or_default(),
                text(nic, "mac").unwrap_or_default()
            );
            if let Some(drv) = text(nic, "driver") {
                s.push_str(&format!(" {drv}"));
            }
            match nic.get("carrier").and_then(Value::as_bool) {
                Some(true) => s.push_str(" link up"),
                Some(false) => s.push_str(" no link"),
                None => {}
            }
            if let Some(speed) = nic.get("speed_mbps").and_then(Value::as_u64) {
                s.push_str(&format!(" {speed} Mb/s"));
            }
            kv("nic", s);
        }
        for disk in inv
            .get("disks")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mut s = format!(
                "{} {}",
                text(disk, "name").unwrap_or_default(),
                size(disk.get("size_bytes").and_then(Value::as_u64).unwrap_or(0))
            );
            if let Some(model) = text(disk, "model") {
                s.push_str(&format!(" {model}"));
            }
            kv("disk", s);
        }
    }
    format!("device {}\n{}", d.id, t.render())
}

fn sessions_table(all: &[SessionSnapshot]) -> String {
    let mut out = format!(
        "{:<16}  {:>5}  {:<20}  {:<21}  {:<16}  {:<8}  {:>9}  {:>9}\n",
        "SESSION", "JOB", "IMAGE", "GROUP", "CIPHER", "STATE", "RECEIVERS", "SENT MB"
    );
    for s in all {
        let done = s.receivers.iter().filter(|r| r.confirmed).count();
        out.push_str(&format!(
            "{:<16}  {:>5}  {:<20}  {:<21}  {:<16}  {:<8}  {:>9}  {:>9.1}\n",
            s.id,
            s.job,
            s.image,
            s.group,
            s.cipher,
            s.state,
            format!("{done}/{}", s.receivers.len()),
            s.bytes_sent as f64 / 1e6
        ));
    }
    out
}

fn session_text(s: &SessionSnapshot) -> String {
    let mut out = format!(
        "session {} (job {} step {}): image {} to {} from {}, {}\nstate {}, {:.0} s old{}, starts at {} receivers or after {} s\nsent {} datagrams, {:.1} MB ({:.2} per image byte), {} repair blocks, rate {:.0} MB/s, {} bad reports\n",
        s.id,
        s.job,
        s.step,
        s.image,
        s.group,
        s.sender,
        s.cipher,
        s.state,
        s.age_secs,
        s.started_after_secs
            .map_or(String::new(), |t| format!(", started after {t:.1} s")),
        s.min_receivers,
        s.wait_secs,
        s.datagrams,
        s.bytes_sent as f64 / 1e6,
        s.bytes_sent as f64 / s.image_bytes.max(1) as f64,
        s.repair_blocks,
        s.rate_mbps,
        s.bad_reports
    );
    out.push_str(&format!(
        "{:>8}  {:>6}  {:>9}  {:>7}  {:>6}  {:>9}  {:>7}  {:>7}  {:>8}  {:>6}  {}\n",
        "RECEIVER",
        "DEVICE",
        "PROGRESS",
        "MB/S",
        "LOSS%",
        "REPAIRS",
        "FORGED",
        "SKIPPED",
        "BAD CHK",
        "ETA",
        "STATE"
    ));
    for r in &s.receivers {
        let pct = 100.0 * r.chunks_done as f64 / f64::from(s.data_chunks.max(1));
        let state = if r.confirmed {
            "complete (confirmed)"
        } else if r.wrong_digest {
            "WRONG DIGEST"
        } else if !r.member {
            "left"
        } else if r.busy {
            "busy (disk)"
        } else {
            "receiving"
        };
        out.push_str(&format!(
            "{:>8}  {:>6}  {:>8.1}%  {:>7.1}  {:>6.2}  {:>9}  {:>7}  {:>7}  {:>8}  {:>6}  {state}\n",
            r.receiver,
            r.device.map_or("-".into(), |d| d.to_string()),
            pct,
            r.mbps,
            r.loss_pct,
            r.repairs_requested,
            r.forged,
            r.skipped,
            r.bad_chunks,
            r.eta_secs.map_or("-".into(), |e| format!("{e:.0}s")),
        ));
    }
    out
}

fn jobs_table(jobs: &[Job]) -> String {
    let mut t = Table::new(&["ID", "STATE", "CREATED", "BY", "DEVICES", "DONE", "STEPS"]);
    for j in jobs {
        let c = &j.counts;
        let total = c.queued + c.running + c.succeeded + c.failed + c.cancelled;
        let steps: Vec<String> = j.steps.iter().map(StepSpec::describe).collect();
        t.row(vec![
            j.id.to_string(),
            j.state.to_string(),
            short_time(&j.created_at),
            j.created_by.clone(),
            j.devices.len().to_string(),
            format!("{}/{total}", c.succeeded + c.failed + c.cancelled),
            steps.join(", "),
        ]);
    }
    t.render()
}

fn job_text(j: &Job) -> String {
    let mut out = format!(
        "job {}: {}, created {} by {}\n",
        j.id,
        j.state,
        short_time(&j.created_at),
        j.created_by
    );
    let mut t = Table::new(&[
        "DEVICE",
        "STEP",
        "WORK",
        "STATE",
        "STARTED",
        "FINISHED",
        "OUTPUT / REASON",
    ]);
    let clock = |t: &Option<String>| {
        t.as_deref()
            .and_then(|s| s.get(11..19))
            .unwrap_or("-")
            .to_owned()
    };
    for r in &j.results {
        let detail = r
            .output
            .clone()
            .or_else(|| r.reason.clone())
            .or_else(|| r.progress.clone())
            .unwrap_or_default();
        t.row(vec![
            r.device.to_string(),
            r.step.to_string(),
            r.spec.work.name().to_owned(),
            r.state.to_string(),
            clock(&r.started_at),
            clock(&r.finished_at),
            detail,
        ]);
    }
    out.push_str(&t.render());
    out
}

/// `GROUP/NAME` split.
fn split(image: &str) -> Result<(&str, &str), String> {
    image
        .split_once('/')
        .filter(|(g, n)| !g.is_empty() && !n.is_empty())
        .ok_or_else(|| format!("{image:?}: expected GROUP/NAME"))
}

/// Prints `v` as JSON with `--json`, else `human(v)`.
fn show<T: Serialize>(json: bool, v: &T, human: impl FnOnce(&T) -> String) -> Result<(), String> {
    if json {
        print_json(v)
    } else {
        print!("{}", human(v));
        Ok(())
    }
}

/// The image store, ACL, user and whoami commands. The outer error is the
/// API's; the inner one a usage error.
fn run_store(cli: &Cli, c: &StoreClient) -> Result<Result<(), String>, ClientError> {
    let j = cli.json;
    let done = match &cli.cmd {
        Cmd::Whoami => {
            let w = c.whoami()?;
            show(j, &w, |w| format!("{} ({})\n", w.name, w.role))
        }
        Cmd::Image(ImageCmd::Group(GroupCmd::Create { group })) => {
            let g = c.create_group(group)?;
            show(j, &g, |g| format!("created image group {}\n", g.name))
        }
        Cmd::Image(ImageCmd::Group(GroupCmd::List)) => show(j, &c.groups()?, |g| groups_table(g)),
        Cmd::Image(ImageCmd::Group(GroupCmd::Set { group, compression })) => {
            let g = c.set_group(group, *compression)?;
            show(j, &g, |g| {
                format!(
                    "image group {} now stores {} images\n",
                    g.name,
                    g.compression.map_or("unset", |c| c.as_str())
                )
            })
        }
        Cmd::Image(ImageCmd::Add {
            group,
            file,
            name,
            compression,
            description,
        }) => {
            let pb = spinner(format!(
                "adding {} to {group} (encode, fsync, verify every chunk)",
                file.display()
            ));
            let i = c.add(
                group,
                file,
                name.as_deref(),
                *compression,
                description.as_deref(),
            );
            pb.finish_and_clear();
            let i = i?;
            show(j, &i, |i| {
                format!(
                    "added {}/{} ({}, {} stored, id {})\n",
                    i.group,
                    i.name,
                    i.compression,
                    size(i.stored_size),
                    i.id
                )
            })
        }
        Cmd::Image(ImageCmd::List { group }) => {
            show(j, &c.images(group.as_deref())?, |i| images_table(i))
        }
        Cmd::Image(ImageCmd::Show { image }) => match split(image) {
            Err(e) => Err(e),
            Ok((g, n)) => {
                let d = c.show(g, n)?;
                show(j, &d, |d| {
                    let i = &d.info;
                    let m = &d.metadata;
                    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
                    let mut t = Table::plain();
                    for (k, v) in [
                        ("image", format!("{}/{}", i.group, i.name)),
                        ("id", i.id.clone()),
                        ("description", i.description.clone()),
                        ("compression", i.compression.to_string()),
                        (
                            "volume size",
                            format!("{} ({} bytes)", size(i.source_size), i.source_size),
                        ),
                        (
                            "stored size",
                            format!("{} ({} bytes)", size(i.stored_size), i.stored_size),
                        ),
                        ("chunk size", size(u64::from(i.chunk_size))),
                        (
                            "chunks",
                            format!(
                                "{} ({} zero, {} raw, {} zstd)",
                                i.chunks, d.zero_chunks, d.raw_chunks, d.zstd_chunks
                            ),
                        ),
                        ("sector size", m.logical_sector_size.to_string()),
                        ("partition table", opt(&m.partition_table)),
                        (
                            "os",
                            format!(
                                "{} {} {} {}",
                                opt(&m.os_name),
                                opt(&m.os_version),
                                opt(&m.os_arch),
                                opt(&m.os_language)
                            ),
                        ),
                        ("created by", i.created_by.clone()),
                        (
                            "created at",
                            shoal_controller::time::rfc3339(i.created_at as i64 * 1000),
                        ),
                        ("group ACL", d.group_acl.summary()),
                        ("image ACL", d.acl.summary()),
                    ] {
                        t.row(vec![format!("{k}:"), v]);
                    }
                    t.render()
                })
            }
        },
        Cmd::Image(ImageCmd::Verify { image }) => match split(image) {
            Err(e) => Err(e),
            Ok((g, n)) => {
                let pb = spinner(format!("verifying {g}/{n}"));
                let v = c.verify(g, n);
                pb.finish_and_clear();
                let v = v?;
                show(j, &v, |v| {
                    format!(
                        "{}/{}: {} chunks verified, id {}\n",
                        v.group, v.name, v.chunks, v.id
                    )
                })
            }
        },
        Cmd::Image(ImageCmd::Export { image, file }) => match split(image) {
            Err(e) => Err(e),
            Ok((g, n)) => {
                let pb = spinner(format!("exporting {g}/{n} to {}", file.display()));
                let x = c.export(g, n, file);
                pb.finish_and_clear();
                let x = x?;
                show(j, &x, |x| {
                    format!(
                        "exported {}/{} to {} ({}, {}, verified)\n",
                        x.group,
                        x.name,
                        x.path.display(),
                        x.compression,
                        size(x.stored_size)
                    )
                })
            }
        },
        Cmd::Image(ImageCmd::Replace {
            image,
            file,
            description,
        }) => match split(image) {
            Err(e) => Err(e),
            Ok((g, n)) => {
                let pb = spinner(format!("replacing {g}/{n} (write, verify, then rename)"));
                let i = c.replace(g, n, file, description.as_deref());
                pb.finish_and_clear();
                let i = i?;
                show(j, &i, |i| {
                    format!("replaced {}/{} (id {})\n", i.group, i.name, i.id)
                })
            }
        },
        Cmd::Image(ImageCmd::Remove { image }) => match split(image) {
            Err(e) => Err(e),
            Ok((g, n)) => {
                let r = c.remove(g, n)?;
                show(j, &r, |r| format!("removed {}\n", r.removed))
            }
        },
        Cmd::Acl(AclCmd::Grant {
            user,
            permission,
            target,
        })
        | Cmd::Acl(AclCmd::Revoke {
            user,
            permission,
            target,
        }) => {
            let grant = matches!(cli.cmd, Cmd::Acl(AclCmd::Grant { .. }));
            let (g, n) = match target.split_once('/') {
                Some((g, n)) => (g, Some(n)),
                None => (target.as_str(), None),
            };
            let acl = c.acl(grant, user, *permission, g, n)?;
            show(j, &acl, |a| format!("{target}: {}\n", a.summary()))
        }
        Cmd::Users(UsersCmd::Create { name, role }) => {
            let u = c.create_user(name, *role)?;
            show(j, &u, |u| {
                format!(
                    "created user {} ({}); token (shown once):\n{}\n",
                    u.name, u.role, u.token
                )
            })
        }
        Cmd::Users(UsersCmd::List) => show(j, &c.users()?, |users| {
            let mut t = Table::new(&["NAME", "ROLE", "CREATED"]);
            for u in users {
                t.row(vec![
                    u.name.clone(),
                    u.role.to_string(),
                    u.created_at.as_deref().map(short_time).unwrap_or_default(),
                ]);
            }
            t.render()
        }),
        Cmd::Users(UsersCmd::Remove { name }) => {
            let r = c.remove_user(name)?;
            show(j, &r, |r| format!("removed user {}\n", r.removed))
        }
        _ => Err("not an image store command".into()),
    };
    Ok(done)
}

fn groups_table(groups: &[GroupInfo]) -> String {
    let mut t = Table::new(&["GROUP", "COMPRESSION", "IMAGES", "ACL"]);
    for g in groups {
        t.row(vec![
            g.name.clone(),
            g.compression.map_or("unset", |c| c.as_str()).into(),
            g.images.to_string(),
            g.acl.summary(),
        ]);
    }
    t.render()
}

fn images_table(images: &[ImageInfo]) -> String {
    let mut t = Table::new(&[
        "IMAGE",
        "COMPRESSION",
        "VOLUME",
        "STORED",
        "ID",
        "DESCRIPTION",
    ]);
    for i in images {
        t.row(vec![
            format!("{}/{}", i.group, i.name),
            i.compression.to_string(),
            size(i.source_size),
            size(i.stored_size),
            i.id.chars().take(16).collect(),
            i.description.clone(),
        ]);
    }
    t.render()
}

/// A spinner with the elapsed time on stderr while a long admin call runs
/// (hidden when stderr is not a terminal, so scripts see nothing extra).
fn spinner(message: String) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
        pb.set_style(style);
    }
    pb.set_message(message);
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}
