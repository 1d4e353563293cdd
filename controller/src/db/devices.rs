//! Device records and how a hello is matched to one: by SMBIOS UUID first,
//! else by any MAC address. A firmware UUID of all zeros or all `f`s is no
//! identity and is ignored. A device that reports a UUID is matched by MAC
//! only to a record without a UUID, so two machines sharing a (default,
//! virtual) MAC but with distinct UUIDs stay two devices.

use rusqlite::{params, OptionalExtension};
use shoal_protocol::inventory::MacAddr;

use super::{json_col, time_col, Ctx, Db, DbError};
use crate::api::Device;
use crate::model::{DeviceState, EnrolmentPolicy, EnrolmentState, StepState};

/// What a hello says about the device, ready to store.
#[derive(Debug, Clone, Default)]
pub struct HelloFacts {
    pub uuid: Option<String>,
    pub serial: Option<String>,
    /// Lower-case `aa:bb:cc:dd:ee:ff`, zero MACs left out.
    pub macs: Vec<String>,
    pub inventory_json: String,
    pub agent_version: String,
    pub agent_key: Option<String>,
    pub peer: String,
}

/// The device a hello was matched to (or created as).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recognised {
    pub id: i64,
    pub enrolment: EnrolmentState,
    /// Recorded by this hello.
    pub new: bool,
}

/// A UUID as stored: trimmed, lower case; `None` for the empty, all-zero and
/// all-`f` placeholders firmware uses when it has none.
pub fn normal_uuid(uuid: &str) -> Option<String> {
    let u = uuid.trim().to_ascii_lowercase();
    let hex = u.chars().filter(|c| *c != '-');
    let placeholder = hex.clone().all(|c| c == '0') || hex.clone().all(|c| c == 'f');
    (!placeholder).then_some(u)
}

/// MACs as stored: text, zero addresses left out, no duplicates.
pub fn normal_macs(macs: &[MacAddr]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in macs.iter().filter(|m| !m.is_zero()) {
        let s = m.to_string();
        if !out.contains(&s) {
            out.push(s);
        }
    }
    out
}

const COLS: &str = "id, uuid, serial, macs, state, enrolment, last_seen, last_peer, agent_key, \
                    agent_version, assigned_image, created_at, inventory";

fn device_row(row: &rusqlite::Row<'_>, with_inventory: bool) -> rusqlite::Result<Device> {
    let inventory = if with_inventory {
        match row.get::<_, Option<String>>(12)? {
            Some(_) => Some(json_col(row, 12)?),
            None => None,
        }
    } else {
        None
    };
    Ok(Device {
        id: row.get(0)?,
        uuid: row.get(1)?,
        serial: row.get(2)?,
        macs: json_col(row, 3)?,
        state: row.get(4)?,
        enrolment: row.get(5)?,
        last_seen: time_col(row, 6)?,
        last_peer: row.get(7)?,
        agent_key: row.get(8)?,
        agent_version: row.get(9)?,
        assigned_image: row.get(10)?,
        created_at: time_col(row, 11)?.unwrap_or_default(),
        inventory,
    })
}

impl Db {
    /// Matches a hello to a device record, updating it, or records a new
    /// device with the enrolment `policy` gives. The device is left
    /// `booting` until its session registers.
    pub fn record_hello(
        &mut self,
        facts: &HelloFacts,
        policy: EnrolmentPolicy,
        now: i64,
    ) -> Result<Recognised, DbError> {
        let tx = self.conn.transaction().ctx("begin recording a hello")?;
        let found = find_by_identity(&tx, facts.uuid.as_deref(), &facts.macs)?;
        let macs = serde_json::to_string(&facts.macs).unwrap_or_else(|_| "[]".into());
        let rec = match found {
            Some((id, enrolment)) => {
                tx.execute(
                    "UPDATE devices SET uuid = COALESCE(?2, uuid), serial = COALESCE(?3, serial),
                        macs = ?4, inventory = ?5, state = ?6, last_seen = ?7, last_peer = ?8,
                        agent_key = ?9, agent_version = ?10
                     WHERE id = ?1",
                    params![
                        id,
                        facts.uuid,
                        facts.serial,
                        macs,
                        facts.inventory_json,
                        DeviceState::Booting,
                        now,
                        facts.peer,
                        facts.agent_key,
                        facts.agent_version
                    ],
                )
                .ctx("update a device from its hello")?;
                Recognised {
                    id,
                    enrolment,
                    new: false,
                }
            }
            None => {
                let enrolment = match policy {
                    EnrolmentPolicy::Auto => EnrolmentState::Approved,
                    EnrolmentPolicy::KnownOnly => EnrolmentState::Pending,
                };
                tx.execute(
                    "INSERT INTO devices (uuid, serial, macs, inventory, state, enrolment,
                        last_seen, last_peer, agent_key, agent_version, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?7)",
                    params![
                        facts.uuid,
                        facts.serial,
                        macs,
                        facts.inventory_json,
                        DeviceState::Booting,
                        enrolment,
                        now,
                        facts.peer,
                        facts.agent_key,
                        facts.agent_version
                    ],
                )
                .ctx("record a new device")?;
                Recognised {
                    id: tx.last_insert_rowid(),
                    enrolment,
                    new: true,
                }
            }
        };
        tx.commit().ctx("commit a hello")?;
        Ok(rec)
    }

    /// The device `selector` names: an id, a MAC, or an SMBIOS UUID.
    pub fn find_device(&self, selector: &str) -> Result<Option<i64>, DbError> {
        let sel = selector.trim();
        if let Ok(id) = sel.parse::<i64>() {
            return self
                .conn
                .query_row("SELECT id FROM devices WHERE id = ?1", [id], |r| r.get(0))
                .optional()
                .ctx("find a device by id");
        }
        if let Ok(mac) = MacAddr::parse(sel) {
            return find_by_mac(&self.conn, &mac.to_string(), false);
        }
        self.conn
            .query_row(
                "SELECT id FROM devices WHERE uuid = ?1 ORDER BY id LIMIT 1",
                [sel.to_ascii_lowercase()],
                |r| r.get(0),
            )
            .optional()
            .ctx("find a device by uuid")
    }

    pub fn device(&self, id: i64) -> Result<Option<Device>, DbError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM devices WHERE id = ?1"),
                [id],
                |r| device_row(r, true),
            )
            .optional()
            .ctx("read a device")
    }

    pub fn devices(&self) -> Result<Vec<Device>, DbError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {COLS} FROM devices ORDER BY id"))
            .ctx("list devices")?;
        let rows = st
            .query_map([], |r| device_row(r, false))
            .ctx("list devices")?;
        rows.collect::<Result<_, _>>().ctx("list devices")
    }

    /// Ids of every approved device (a job's `"all"`).
    pub fn approved_devices(&self) -> Result<Vec<i64>, DbError> {
        let mut st = self
            .conn
            .prepare("SELECT id FROM devices WHERE enrolment = 'approved' ORDER BY id")
            .ctx("list approved devices")?;
        let rows = st
            .query_map([], |r| r.get(0))
            .ctx("list approved devices")?;
        rows.collect::<Result<_, _>>().ctx("list approved devices")
    }

    /// Approves a device; `false` if there is none with that id.
    pub fn approve(&mut self, id: i64) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute(
                "UPDATE devices SET enrolment = ?2 WHERE id = ?1",
                params![id, EnrolmentState::Approved],
            )
            .ctx("approve a device")?;
        Ok(n > 0)
    }

    /// Forgets a device: its queued steps are cancelled and a running one
    /// failed (reason "device forgotten"), then the record is deleted (its
    /// steps stay in their jobs' history). `false` if there was none.
    pub fn forget(&mut self, id: i64, now: i64) -> Result<bool, DbError> {
        let tx = self.conn.transaction().ctx("begin forgetting a device")?;
        let jobs: Vec<i64> = {
            let mut st = tx
                .prepare("SELECT DISTINCT job FROM job_steps WHERE device = ?1 AND state IN ('queued', 'running')")
                .ctx("find a device's open steps")?;
            let rows = st
                .query_map([id], |r| r.get(0))
                .ctx("find a device's open steps")?;
            rows.collect::<Result<_, _>>()
                .ctx("find a device's open steps")?
        };
        for (from, to) in [
            (StepState::Queued, StepState::Cancelled),
            (StepState::Running, StepState::Failed),
        ] {
            tx.execute(
                "UPDATE job_steps SET state = ?3, reason = 'device forgotten', finished_at = ?2
                 WHERE device = ?1 AND state = ?4",
                params![id, now, to, from],
            )
            .ctx("close a forgotten device's steps")?;
        }
        for job in jobs {
            super::jobs::refresh_job_state(&tx, job)?;
        }
        let n = tx
            .execute("DELETE FROM devices WHERE id = ?1", [id])
            .ctx("delete a device")?;
        tx.commit().ctx("commit forgetting a device")?;
        Ok(n > 0)
    }

    pub fn set_device_state(&mut self, id: i64, state: DeviceState) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE devices SET state = ?2 WHERE id = ?1",
                params![id, state],
            )
            .ctx("set a device's state")?;
        Ok(())
    }

    /// Records when devices were last heard from, in one transaction.
    pub fn touch(&mut self, seen: &[(i64, i64)]) -> Result<(), DbError> {
        let tx = self.conn.transaction().ctx("begin updating last_seen")?;
        {
            let mut st = tx
                .prepare_cached("UPDATE devices SET last_seen = ?2 WHERE id = ?1")
                .ctx("update last_seen")?;
            for &(id, at) in seen {
                st.execute(params![id, at]).ctx("update last_seen")?;
            }
        }
        tx.commit().ctx("commit last_seen")
    }

    pub fn set_inventory(&mut self, id: i64, inventory_json: &str) -> Result<(), DbError> {
        self.conn
            .execute(
                "UPDATE devices SET inventory = ?2 WHERE id = ?1",
                params![id, inventory_json],
            )
            .ctx("update a device's inventory")?;
        Ok(())
    }

    /// At startup nothing is connected: every device is offline.
    pub fn mark_all_offline(&mut self) -> Result<usize, DbError> {
        self.conn
            .execute(
                "UPDATE devices SET state = 'offline' WHERE state != 'offline'",
                [],
            )
            .ctx("mark devices offline")
    }
}

fn find_by_identity(
    conn: &rusqlite::Connection,
    uuid: Option<&str>,
    macs: &[String],
) -> Result<Option<(i64, EnrolmentState)>, DbError> {
    let get = |id: i64| -> Result<Option<(i64, EnrolmentState)>, DbError> {
        conn.query_row(
            "SELECT id, enrolment FROM devices WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .ctx("read a device's enrolment")
    };
    if let Some(uuid) = uuid {
        let id: Option<i64> = conn
            .query_row(
                "SELECT id FROM devices WHERE uuid = ?1 ORDER BY id LIMIT 1",
                [uuid],
                |r| r.get(0),
            )
            .optional()
            .ctx("find a device by uuid")?;
        if let Some(id) = id {
            return get(id);
        }
    }
    for mac in macs {
        if let Some(id) = find_by_mac(conn, mac, uuid.is_some())? {
            return get(id);
        }
    }
    Ok(None)
}

/// A device with this MAC; with `without_uuid`, only among records that
/// have no UUID.
fn find_by_mac(
    conn: &rusqlite::Connection,
    mac: &str,
    without_uuid: bool,
) -> Result<Option<i64>, DbError> {
    conn.query_row(
        "SELECT d.id FROM devices d, json_each(d.macs) m
         WHERE m.value = ?1 AND (?2 = 0 OR d.uuid IS NULL)
         ORDER BY d.id LIMIT 1",
        params![mac, without_uuid],
        |r| r.get(0),
    )
    .optional()
    .ctx("find a device by mac")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(uuid: Option<&str>, macs: &[&str]) -> HelloFacts {
        HelloFacts {
            uuid: uuid.and_then(normal_uuid),
            macs: macs.iter().map(|m| m.to_string()).collect(),
            inventory_json: "{}".into(),
            agent_version: "test".into(),
            peer: "127.0.0.1:1".into(),
            ..HelloFacts::default()
        }
    }

    #[test]
    fn uuids_and_macs_are_normalised() {
        assert_eq!(
            normal_uuid(" 4C4C4544-0042-3510-8052-B4C04F4B4E31 ").as_deref(),
            Some("4c4c4544-0042-3510-8052-b4c04f4b4e31")
        );
        assert_eq!(normal_uuid("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(normal_uuid("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"), None);
        assert_eq!(normal_uuid(""), None);
        let m = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(
            normal_macs(&[m, MacAddr::default(), m]),
            vec!["52:54:00:12:34:56"]
        );
    }

    #[test]
    fn devices_are_recognised_by_uuid_then_mac() {
        let mut db = Db::open_in_memory().unwrap();
        let auto = EnrolmentPolicy::Auto;
        let a = db
            .record_hello(&facts(Some("aaaa-1"), &["52:54:00:00:00:01"]), auto, 1)
            .unwrap();
        assert!(a.new);
        assert_eq!(a.enrolment, EnrolmentState::Approved);
        // Same UUID, new NIC: the same device.
        let again = db
            .record_hello(&facts(Some("AAAA-1"), &["52:54:00:00:00:09"]), auto, 2)
            .unwrap();
        assert_eq!((again.id, again.new), (a.id, false));
        // No UUID, known MAC: the same device.
        let by_mac = db
            .record_hello(&facts(None, &["52:54:00:00:00:09"]), auto, 3)
            .unwrap();
        assert_eq!(by_mac.id, a.id);
        // Another UUID with the same MAC: another machine.
        let b = db
            .record_hello(&facts(Some("bbbb-2"), &["52:54:00:00:00:09"]), auto, 4)
            .unwrap();
        assert!(b.new && b.id != a.id);
        // A record without UUID is matched by MAC and learns the UUID.
        let c = db
            .record_hello(&facts(None, &["52:54:00:00:00:0c"]), auto, 5)
            .unwrap();
        let c2 = db
            .record_hello(&facts(Some("cccc-3"), &["52:54:00:00:00:0c"]), auto, 6)
            .unwrap();
        assert_eq!(c2.id, c.id);
        assert_eq!(
            db.device(c.id).unwrap().unwrap().uuid.as_deref(),
            Some("cccc-3")
        );
        // Selectors.
        assert_eq!(db.find_device(&a.id.to_string()).unwrap(), Some(a.id));
        assert_eq!(db.find_device("52-54-00-00-00-0C").unwrap(), Some(c.id));
        assert_eq!(db.find_device("BBBB-2").unwrap(), Some(b.id));
        assert_eq!(db.find_device("nope").unwrap(), None);
        assert_eq!(db.find_device("999").unwrap(), None);
    }

    #[test]
    fn known_only_records_new_devices_as_pending_until_approved() {
        let mut db = Db::open_in_memory().unwrap();
        let known = db
            .record_hello(&facts(Some("k"), &[]), EnrolmentPolicy::Auto, 1)
            .unwrap();
        let ko = EnrolmentPolicy::KnownOnly;
        assert_eq!(
            db.record_hello(&facts(Some("k"), &[]), ko, 2)
                .unwrap()
                .enrolment,
            EnrolmentState::Approved
        );
        let new = db.record_hello(&facts(Some("n"), &[]), ko, 3).unwrap();
        assert_eq!(new.enrolment, EnrolmentState::Pending);
        assert_eq!(db.approved_devices().unwrap(), vec![known.id]);
        assert!(db.approve(new.id).unwrap());
        assert!(!db.approve(12345).unwrap());
        assert_eq!(
            db.record_hello(&facts(Some("n"), &[]), ko, 4)
                .unwrap()
                .enrolment,
            EnrolmentState::Approved
        );
        assert!(db.forget(new.id, 5).unwrap());
        assert!(db.device(new.id).unwrap().is_none());
        let back = db.record_hello(&facts(Some("n"), &[]), ko, 6).unwrap();
        assert!(
            back.new && back.id != new.id,
            "forgotten ids are not reused"
        );
    }
}
