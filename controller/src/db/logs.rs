//! Agents' log lines (`AgentMsg::Log` and `AgentMsg::Error`), kept for
//! `shoalctl logs`.

use rusqlite::params;

use super::{time_col, Ctx, Db, DbError};
use crate::api::LogEntry;

impl Db {
    pub fn add_log(
        &mut self,
        device: Option<i64>,
        level: &str,
        text: &str,
        now: i64,
    ) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO logs (device, time, level, text) VALUES (?1, ?2, ?3, ?4)",
                params![device, now, level, text],
            )
            .ctx("store a log line")?;
        Ok(())
    }

    /// The latest `limit` lines, oldest first, of one device or all.
    pub fn logs(&self, device: Option<i64>, limit: u32) -> Result<Vec<LogEntry>, DbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, device, time, level, text FROM (
                    SELECT * FROM logs WHERE ?1 IS NULL OR device = ?1 ORDER BY id DESC LIMIT ?2
                 ) ORDER BY id",
            )
            .ctx("read logs")?;
        let rows = st
            .query_map(params![device, limit], |r| {
                Ok(LogEntry {
                    id: r.get(0)?,
                    device: r.get(1)?,
                    time: time_col(r, 2)?.unwrap_or_default(),
                    level: r.get(3)?,
                    text: r.get(4)?,
                })
            })
            .ctx("read logs")?;
        rows.collect::<Result<_, _>>().ctx("read logs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_lines_per_device() {
        let mut db = Db::open_in_memory().unwrap();
        for i in 0..5 {
            db.add_log(Some(i % 2), "info", &format!("line {i}"), i)
                .unwrap();
        }
        let all = db.logs(None, 3).unwrap();
        assert_eq!(
            all.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["line 2", "line 3", "line 4"]
        );
        let one = db.logs(Some(1), 10).unwrap();
        assert_eq!(
            one.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["line 1", "line 3"]
        );
    }
}
