//! Wall-clock time as seg reads it for decisions: a certificate's validity (at the handshake
//! and again on every request) and a resumed session's age. One `Clock` is handed down from
//! `App`, so a test can move time for exactly one gateway without touching the process.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;

/// The system's wall clock, optionally moved by an offset its holder controls.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Seconds added to the system time; `None` for the plain system clock.
    offset: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// The system clock, plus an offset moved by `advance` (tests).
    pub fn adjustable() -> Clock {
        Clock {
            offset: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// Moves an adjustable clock forward; a system clock does not move.
    pub fn advance(&self, by: Duration) {
        if let Some(offset) = &self.offset {
            let secs = i64::try_from(by.as_secs()).unwrap_or(i64::MAX);
            offset.fetch_add(secs, Ordering::AcqRel);
        }
    }

    /// Seconds since the Unix epoch.
    pub fn now_unix(&self) -> i64 {
        let system = unix_now();
        let offset = self
            .offset
            .as_ref()
            .map_or(0, |o| o.load(Ordering::Acquire));
        system.saturating_add(offset)
    }
}

impl rustls::time_provider::TimeProvider for Clock {
    fn current_time(&self) -> Option<UnixTime> {
        let secs = u64::try_from(self.now_unix()).ok()?;
        Some(UnixTime::since_unix_epoch(Duration::from_secs(secs)))
    }
}

/// The system's wall clock in seconds since the Unix epoch (what records and shared entries
/// are stamped with; decisions about certificates read a `Clock`).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A uniformly random number in [0, 1]: to spread work (drained long polls, restored
/// identities' refreshes) over a window.
pub fn random_fraction() -> f64 {
    let mut bytes = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    u32::from_le_bytes(bytes) as f64 / u32::MAX as f64
}

/// Year, month (1–12) and day of the month of a count of days since 1970-01-01, in the
/// proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`, for days ≥ 0).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153; // March is 0
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS`, UTC.
pub fn utc(unix: i64) -> String {
    let unix = u64::try_from(unix).unwrap_or(0);
    let (year, month, day) = civil_from_days(unix / 86_400);
    let seconds = unix % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        seconds / 3_600,
        seconds % 3_600 / 60,
        seconds % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::time_provider::TimeProvider;

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_563_845), "2026-12-06 13:30:45");
    }

    #[test]
    fn an_adjustable_clock_moves_and_the_system_clock_does_not() {
        let system = Clock::system();
        let moved = Clock::adjustable();
        let before = system.now_unix();
        moved.advance(Duration::from_secs(7 * 3600));
        system.advance(Duration::from_secs(7 * 3600));
        assert!(moved.now_unix() >= before + 7 * 3600);
        assert!(system.now_unix() < before + 3600);
        let shared = moved.clone();
        shared.advance(Duration::from_secs(3600));
        assert!(
            moved.now_unix() >= before + 8 * 3600,
            "clones share the offset"
        );
        let time = moved.current_time().unwrap();
        assert!(time.as_secs() >= (before + 8 * 3600) as u64);
    }
}
