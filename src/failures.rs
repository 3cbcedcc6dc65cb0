//! How many authentication failures reach the decision log: a budget per source (a
//! proven or claimed caller, or a client address) and one for all sources together.
//! Owns only counting; it writes nothing and may not touch the log or the transport.
//!
//! A flood of bad handshakes, tokens or unknown principals must neither fill the disk
//! nor starve the log writer, and one flooding source must not hide the failures of
//! others: each source may have [`PER_SOURCE_PER_SECOND`] failures written per second,
//! all sources together [`TOTAL_PER_SECOND`]. What is held back is counted, and the
//! count is written with the next failure that is logged, whichever its source (so a
//! burst that then goes quiet still shows in the log).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures of one source written to the decision log per second.
pub const PER_SOURCE_PER_SECOND: u32 = 20;
/// Failures of all sources together written to the decision log per second.
pub const TOTAL_PER_SECOND: u32 = 100;
/// Sources tracked at once; beyond this, sources quiet for a second are forgotten,
/// and if none is, new sources share one budget.
const MAX_SOURCES: usize = 4096;
/// The shared source of failures beyond [`MAX_SOURCES`].
const OVERFLOW: &str = "(too many sources)";
const WINDOW: Duration = Duration::from_secs(1);

/// Who failed, as far as it is known: the limiter's key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// A caller the transport proved (its certificate) or, in the development mode,
    /// claimed: service and employee.
    Caller {
        /// The service.
        service: String,
        /// The employee, if any.
        employee: Option<String>,
    },
    /// Only the client's address is known (a failed handshake, no certificate).
    Address(std::net::IpAddr),
    /// Nothing is known.
    Unknown,
}

impl Source {
    fn key(&self) -> String {
        match self {
            Source::Caller { service, employee } => match employee {
                Some(employee) => format!("service {service} employee {employee}"),
                None => format!("service {service}"),
            },
            Source::Address(address) => format!("address {address}"),
            Source::Unknown => "unknown".to_owned(),
        }
    }
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
}

impl Window {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            logged: 0,
        }
    }

    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.started) >= WINDOW {
            self.started = now;
            self.logged = 0;
        }
    }
}

#[derive(Debug)]
struct State {
    total: Window,
    sources: HashMap<String, Window>,
    /// Failures held back since the last one logged.
    held_back: u64,
}

/// Decides which authentication failures are written; see the module documentation.
#[derive(Debug)]
pub struct FailureLimiter {
    state: Mutex<State>,
}

impl Default for FailureLimiter {
    fn default() -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                total: Window::new(now),
                sources: HashMap::new(),
                held_back: 0,
            }),
        }
    }
}

impl FailureLimiter {
    /// Whether one more failure of `source` may be written now; if so, how many
    /// failures (of any source) were held back since the last one written, to be
    /// written with it.
    pub fn admit(&self, source: &Source) -> Option<u64> {
        self.admit_at(source, Instant::now())
    }

    fn admit_at(&self, source: &Source, now: Instant) -> Option<u64> {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let State {
            total,
            sources,
            held_back,
        } = &mut *state;
        total.roll(now);
        let mut key = source.key();
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            sources.retain(|_, window| now.duration_since(window.started) < WINDOW);
            if sources.len() >= MAX_SOURCES {
                key = OVERFLOW.to_owned();
            }
        }
        let window = sources.entry(key).or_insert_with(|| Window::new(now));
        window.roll(now);
        if window.logged >= PER_SOURCE_PER_SECOND || total.logged >= TOTAL_PER_SECOND {
            *held_back += 1;
            return None;
        }
        window.logged += 1;
        total.logged += 1;
        Some(std::mem::take(held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(service: &str, employee: Option<&str>) -> Source {
        Source::Caller {
            service: service.to_owned(),
            employee: employee.map(str::to_owned),
        }
    }

    #[test]
    fn one_flooding_source_does_not_hide_another() {
        let limiter = FailureLimiter::default();
        let start = Instant::now();
        let flood = caller("gone-service", None);
        let admitted = (0..1000)
            .filter(|_| limiter.admit_at(&flood, start).is_some())
            .count();
        assert_eq!(admitted, PER_SOURCE_PER_SECOND as usize);
        // Another source, and another employee of the same service, still get theirs;
        // the next one written counts what was held back.
        let other = caller("us-support-tool", Some("mallory"));
        assert_eq!(
            limiter.admit_at(&other, start),
            Some(1000 - u64::from(PER_SOURCE_PER_SECOND))
        );
        let address = Source::Address("192.0.2.7".parse().unwrap());
        assert_eq!(limiter.admit_at(&address, start), Some(0));
        // The next window: the flood is written again.
        let later = start + WINDOW;
        assert_eq!(limiter.admit_at(&flood, later), Some(0));
    }

    #[test]
    fn all_sources_together_are_bounded() {
        let limiter = FailureLimiter::default();
        let start = Instant::now();
        let admitted = (0..1000u32)
            .filter(|n| {
                let source = Source::Address(std::net::IpAddr::from(n.to_be_bytes()));
                limiter.admit_at(&source, start).is_some()
            })
            .count();
        assert_eq!(admitted, TOTAL_PER_SECOND as usize);
    }

    #[test]
    fn sources_beyond_the_table_share_one_budget_and_quiet_ones_are_forgotten() {
        let limiter = FailureLimiter::default();
        let start = Instant::now();
        for n in 0..MAX_SOURCES as u32 {
            let source = Source::Address(std::net::IpAddr::from(n.to_be_bytes()));
            // Spread over windows so the total budget does not interfere.
            let at = start + WINDOW * (n / TOTAL_PER_SECOND);
            assert!(limiter.admit_at(&source, at).is_some());
        }
        let end = start + WINDOW * (MAX_SOURCES as u32 / TOTAL_PER_SECOND);
        let newcomer = Source::Address("10.9.9.9".parse().unwrap());
        assert!(limiter.admit_at(&newcomer, end).is_some());
        let state = limiter.state.lock().unwrap();
        assert!(
            state.sources.len() < MAX_SOURCES,
            "quiet sources were forgotten"
        );
    }
}
