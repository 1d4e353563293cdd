//! `shoalctl`: the Controller's admin command line, over the admin API.
//!
//! ```text
//! shoalctl [--url URL] [--token T | --state DIR] [--json] COMMAND
//!   devices list | show ID | forget ID | approve ID
//!   jobs run --device ID|all [--device ..] [--wait SECS] STEP...
//!   jobs list | show ID | cancel ID
//!   logs [--device ID] [--limit N]
//!   health
//! ```
//!
//! STEP is `echo:TEXT`, `inventory`, `wait:SECS`, `reboot` or `poweroff`.
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
use shoal_controller::jobs::StepSpec;
use shoal_controller::model::JobState;
use shoal_controller::table::Table;
use shoal_controller::time::{ago, now_ms, parse_rfc3339};
use shoal_controller::{error_chain, state};

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
enum JobsCmd {
    /// Queue steps on devices; prints the job id.
    Run {
        /// Device id, UUID, MAC, or `all` (every approved device); repeatable.
        #[arg(long = "device", value_name = "ID", required = true)]
        devices: Vec<String>,
        /// Wait up to SECS for the job to end; exit 1 unless it succeeded.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Who is asking (default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// echo:TEXT, inventory, wait:SECS, reboot, poweroff
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
    let c = Client::new(&cli.url, &token(cli)?);
    match &cli.cmd {
        Cmd::Health => unreachable!("handled above"),
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
            let created_by = by
                .clone()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "shoalctl".into());
            let new = NewJob {
                devices: devices.clone(),
                steps,
                created_by: Some(created_by),
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
        std::thread::sleep(Duration::from_millis(250));
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
