//! The states the Controller keeps for devices, enrolments, steps and jobs,
//! with the names the database and the admin API use for them.
//!
//! A device is `booting` (said hello, not yet registered), `ready` (connected
//! and idle), `busy` (running a step), `offline`, or `failed` (reserved).
//! A step is `queued`, `running`, then `succeeded`, `failed` or `cancelled`.
//! A job's state is derived from its steps' (`jobs::job_state`).

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s),+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($s => Some($name::$v),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named_enum! {
    /// Where a device is, as far as the Controller knows.
    DeviceState {
        /// Said hello; being recorded.
        Booting = "booting",
        /// Connected and idle.
        Ready = "ready",
        /// Connected and running a step.
        Busy = "busy",
        /// Not connected.
        Offline = "offline",
        /// Reserved for a device the Controller gave up on.
        Failed = "failed",
    }
}

named_enum! {
    /// Whether a device may be given jobs.
    EnrolmentState {
        Approved = "approved",
        /// Recorded, waiting for `shoalctl devices approve`.
        Pending = "pending",
    }
}

named_enum! {
    /// What happens to a device the Controller has not seen before.
    EnrolmentPolicy {
        /// Approved at once.
        Auto = "auto",
        /// Recorded as pending until an admin approves it.
        KnownOnly = "known-only",
    }
}

named_enum! {
    /// One step of a job on one device.
    StepState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

named_enum! {
    /// A job's state, derived from its steps'.
    JobState {
        Queued = "queued",
        Running = "running",
        Succeeded = "succeeded",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl StepState {
    /// Succeeded, failed or cancelled: nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepState::Succeeded | StepState::Failed | StepState::Cancelled
        )
    }
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl EnrolmentState {
    pub fn to_protocol(self) -> shoal_protocol::control::Enrolment {
        match self {
            EnrolmentState::Approved => shoal_protocol::control::Enrolment::Approved,
            EnrolmentState::Pending => shoal_protocol::control::Enrolment::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in StepState::ALL {
            assert_eq!(StepState::parse(s.as_str()), Some(*s));
            assert_eq!(
                serde_json::to_string(s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(
            EnrolmentPolicy::parse("known-only"),
            Some(EnrolmentPolicy::KnownOnly)
        );
        assert_eq!(DeviceState::parse("asleep"), None);
    }
}
