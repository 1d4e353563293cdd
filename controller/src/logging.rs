//! The Controller's log: `env_logger` on stderr, filtered by `SHOAL_LOG`
//! (`RUST_LOG` syntax, default `info`), one line per event:
//! `[2026-04-20T10:11:12.345Z] WARN handshake from 10.0.0.5:41000 refused: ...`.
//! Lines from other crates name their module after the level.

use std::io::Write;

/// Installs the logger; a second call does nothing.
pub fn init() {
    let filter = std::env::var("SHOAL_LOG").unwrap_or_else(|_| "info".into());
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format(|buf, rec| {
            let target = rec.target();
            if target.starts_with("shoal_controller") {
                writeln!(
                    buf,
                    "[{}] {} {}",
                    buf.timestamp_millis(),
                    rec.level(),
                    rec.args()
                )
            } else {
                writeln!(
                    buf,
                    "[{}] {} {target}: {}",
                    buf.timestamp_millis(),
                    rec.level(),
                    rec.args()
                )
            }
        })
        .target(env_logger::Target::Stderr)
        .try_init();
}
