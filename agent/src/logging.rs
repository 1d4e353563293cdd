//! Console logging: `log` + `env_logger` with the filter from `shoal.log=`,
//! each line stamped with the time since boot so it lines up with the
//! kernel's own messages on the serial console.

use std::io::Write;

pub fn init(filter: &str) {
    let mut builder = env_logger::Builder::new();
    builder
        .parse_filters(filter)
        .target(env_logger::Target::Stderr)
        .format(|buf, record| {
            let t = crate::sys::uptime();
            let target = record.target();
            let target = target.strip_prefix("shoal_agent::").unwrap_or(target);
            writeln!(
                buf,
                "[{:>5}.{:03}] {:<5} {target}: {}",
                t.as_secs(),
                t.subsec_millis(),
                record.level(),
                record.args()
            )
        });
    // A second init (tests) keeps the first logger.
    let _ = builder.try_init();
}
