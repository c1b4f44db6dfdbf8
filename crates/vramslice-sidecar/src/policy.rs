//! Pure sizing rules: how much a job reserves, where the high-water mark sits, how long to back
//! off after an out-of-memory error, how far a peak is raised after one, and how byte counts read
//! in error messages. No I/O, no clock.

use std::time::Duration;

use crate::config::PeakScope;

/// Tunables of the sizing rules. [`Default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Fraction of the limit above which no new job is admitted (default 0.85).
    pub high_water: f64,
    /// Fraction of the limit a job with no known peak and no declared need reserves (default 0.8).
    pub first_run_fraction: f64,
    /// Multiplier applied to a learned peak to get the reservation (default 1.2).
    pub peak_margin: f64,
    /// Multiplier applied to a peak after an out-of-memory error (default 1.25).
    pub oom_raise: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            high_water: 0.85,
            first_run_fraction: 0.8,
            peak_margin: 1.2,
            oom_raise: 1.25,
        }
    }
}

/// Where a reservation came from; reported in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveSource {
    /// The caller declared the need and no larger peak is known.
    Declared,
    /// A recorded peak times the margin (a profile hit).
    Profile,
    /// Nothing known: the conservative first-run fraction of the limit (a profile miss).
    FirstRun,
}

/// How much to reserve for a job, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Bytes to hold while the job runs.
    pub bytes: u64,
    /// Which rule chose the amount.
    pub source: ReserveSource,
}

/// `bytes × factor`, rounded up, saturating at `u64::MAX`. Negative or NaN factors count as 0.
pub fn scale(bytes: u64, factor: f64) -> u64 {
    if factor.is_nan() || factor <= 0.0 {
        return 0;
    }
    let scaled = (bytes as f64 * factor).ceil();
    if scaled >= u64::MAX as f64 {
        u64::MAX
    } else {
        scaled as u64
    }
}

/// The most a runtime admits at once: `limit × high_water`.
pub fn admission_capacity(limit: u64, policy: &Policy) -> u64 {
    scale(limit, policy.high_water.min(1.0)).min(limit)
}

/// What a job asks for before the room it may take is known: what the caller declared and
/// what the profile (or the first-run rule) estimates. [`Ask::reservation`] turns it into bytes
/// once the room is known, which is at admission: a job that waits is sized again when it is
/// admitted, so the room it was cut to when it joined the line is not kept after that room grew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Only a declared need: reserved as is.
    Declared(u64),
    /// An estimate (a learned peak × margin, or the first-run fraction of the limit), cut to
    /// the room; a declared need, when there is one, is its floor.
    Estimate {
        /// The estimate before it is cut.
        bytes: u64,
        /// Which rule made it ([`ReserveSource::Profile`] or [`ReserveSource::FirstRun`]).
        source: ReserveSource,
        /// The declared need, if any.
        declared: Option<u64>,
    },
}

impl From<u64> for Ask {
    /// A declared need of `bytes`.
    fn from(bytes: u64) -> Self {
        Ask::Declared(bytes)
    }
}

impl Ask {
    /// The reservation when `room` bytes can be taken while this runtime is idle (the capacity
    /// less the usage that stays then, `AdmissionQueue::room`). An estimate is cut to the room (at least 1 byte), so it
    /// never asks for memory that cannot free while this runtime is idle (such a job then runs
    /// alone). A declared need is kept as is: the admission queue refuses it as never fitting
    /// when it exceeds the capacity, which is the clear error the caller needs.
    pub fn reservation(self, room: u64) -> Reservation {
        match self {
            Ask::Declared(bytes) => Reservation {
                bytes,
                source: ReserveSource::Declared,
            },
            Ask::Estimate {
                bytes,
                source,
                declared,
            } => {
                let cut = bytes.min(room.max(1));
                match declared {
                    Some(d) if d >= cut => Reservation {
                        bytes: d,
                        source: ReserveSource::Declared,
                    },
                    _ => Reservation { bytes: cut, source },
                }
            }
        }
    }
}

/// What a job asks for given what the caller declared and what the profile knows:
///
/// - declared and learned: the larger of the declared need and `peak × margin` (cut to the room);
/// - declared only: the declared need;
/// - learned only: `peak × margin` (cut to the room);
/// - neither: `limit × first_run_fraction` (cut to the room).
pub fn ask(declared: Option<u64>, learned_peak: Option<u64>, limit: u64, policy: &Policy) -> Ask {
    match (declared, learned_peak) {
        (Some(d), None) => Ask::Declared(d),
        (declared, Some(peak)) => Ask::Estimate {
            bytes: scale(peak, policy.peak_margin),
            source: ReserveSource::Profile,
            declared,
        },
        (None, None) => Ask::Estimate {
            bytes: scale(limit, policy.first_run_fraction),
            source: ReserveSource::FirstRun,
            declared: None,
        },
    }
}

/// A job's measured peak from usage at its start and its highest since, the container's
/// (`live`) and, when the source tells it, this process's (`own`): with
/// [`PeakScope::Container`] the container's growth; else this process's growth (0 when the job
/// reused memory the process already held, as a caching allocator does), unless the source
/// does not tell it or the process held nothing at all during the job (its jobs run in another
/// process of the container, an engine behind a front end): then the container's growth, which
/// counts what the container's other processes allocated meanwhile.
pub fn measured_peak(live: (u64, u64), own: Option<(u64, u64)>, scope: PeakScope) -> u64 {
    let container = live.1.saturating_sub(live.0);
    match (scope, own) {
        (PeakScope::Process, Some((start, highest))) if highest.max(start) > 0 => {
            highest.saturating_sub(start)
        }
        _ => container,
    }
}

/// The peak to record after a job failed with out-of-memory: the larger of what was recorded
/// and what was observed (or, with neither known, what was reserved), times `oom_raise`.
/// Always strictly above the recorded peak, so the next attempt reserves more; based on the
/// observation rather than the reservation so that an error caused by a neighbour's spike does
/// not inflate the profile by the whole reservation.
pub fn raise_after_oom(
    recorded: Option<u64>,
    observed: u64,
    reserved: u64,
    policy: &Policy,
) -> u64 {
    let mut base = recorded.unwrap_or(0).max(observed);
    if base == 0 {
        base = reserved;
    }
    let base = base.max(1);
    scale(base, policy.oom_raise.max(1.0)).max(base.saturating_add(1))
}

/// Exponential backoff: attempt 0 waits `base`, attempt 1 `base × factor`, …, capped at `max`.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// The first wait (default 0.5 s).
    pub base: Duration,
    /// Growth per attempt (default 2).
    pub factor: f64,
    /// The longest wait (default 2 s).
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// Waits starting at `base`, doubling, at most 4 × `base` (the documented schedule).
    pub fn from_base(base: Duration) -> Backoff {
        Backoff {
            base,
            factor: 2.0,
            max: base.saturating_mul(4),
        }
    }

    /// The wait before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        };
        let secs = self.base.as_secs_f64() * factor.powi(attempt.min(64) as i32);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The first `retries` waits.
    pub fn schedule(&self, retries: u32) -> Vec<Duration> {
        (0..retries).map(|a| self.delay(a)).collect()
    }
}

/// Bytes for error messages, always with one decimal: `6.0 GiB`, `1.5 GiB`, `512.0 MiB` (the
/// wording the sidecar's refusals promise).
pub fn human(bytes: u64) -> String {
    format!("{:.1}", vramslice_core::ByteSize(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    /// The reservation beside `floor` bytes that stay while the runtime is idle, as the
    /// admission queue sizes it.
    fn reserve(
        declared: Option<u64>,
        learned_peak: Option<u64>,
        limit: u64,
        floor: u64,
        policy: &Policy,
    ) -> Reservation {
        let room = admission_capacity(limit, policy).saturating_sub(floor);
        ask(declared, learned_peak, limit, policy).reservation(room)
    }

    #[test]
    fn a_jobs_peak_is_its_processs_growth_unless_that_process_held_nothing() {
        let g = GIB;
        // This process grew 1 GiB while the container grew 5: its own.
        assert_eq!(
            measured_peak((0, 5 * g), Some((g, 2 * g)), PeakScope::Process),
            g
        );
        // It reused what it held: nothing learned, not the container's 5.
        assert_eq!(
            measured_peak((0, 5 * g), Some((g, g)), PeakScope::Process),
            0
        );
        // It held nothing (an engine process did the work), or the source cannot tell.
        assert_eq!(
            measured_peak((g, 4 * g), Some((0, 0)), PeakScope::Process),
            3 * g
        );
        assert_eq!(measured_peak((g, 4 * g), None, PeakScope::Process), 3 * g);
        // Asked for the container's.
        assert_eq!(
            measured_peak((g, 4 * g), Some((g, 2 * g)), PeakScope::Container),
            3 * g
        );
    }

    #[test]
    fn capacity_is_the_high_water_mark() {
        let p = Policy::default();
        assert_eq!(admission_capacity(10 * GIB, &p), scale(10 * GIB, 0.85));
        let full = Policy {
            high_water: 1.5,
            ..Policy::default()
        };
        assert_eq!(admission_capacity(10 * GIB, &full), 10 * GIB);
    }

    #[test]
    fn first_run_reserves_the_conservative_fraction() {
        let r = reserve(None, None, 10 * GIB, 0, &Policy::default());
        assert_eq!(r.source, ReserveSource::FirstRun);
        assert_eq!(r.bytes, 8 * GIB);
        let greedy = Policy {
            first_run_fraction: 0.95,
            ..Policy::default()
        };
        let r = reserve(None, None, 10 * GIB, 0, &greedy);
        assert_eq!(r.bytes, admission_capacity(10 * GIB, &greedy));
    }

    #[test]
    fn learned_peak_times_margin() {
        let r = reserve(None, Some(GIB), 10 * GIB, 0, &Policy::default());
        assert_eq!(r.source, ReserveSource::Profile);
        assert_eq!(r.bytes, scale(GIB, 1.2));
        let huge = reserve(None, Some(20 * GIB), 10 * GIB, 0, &Policy::default());
        assert_eq!(huge.bytes, admission_capacity(10 * GIB, &Policy::default()));
    }

    #[test]
    fn declared_need_is_a_floor_and_may_exceed_capacity() {
        let p = Policy::default();
        assert_eq!(
            reserve(Some(3 * GIB), Some(GIB), 10 * GIB, 0, &p),
            Reservation {
                bytes: 3 * GIB,
                source: ReserveSource::Declared
            }
        );
        assert_eq!(
            reserve(Some(GIB), Some(2 * GIB), 10 * GIB, 0, &p).bytes,
            scale(2 * GIB, 1.2)
        );
        assert_eq!(reserve(Some(6 * GIB), None, 4 * GIB, 0, &p).bytes, 6 * GIB);
    }

    #[test]
    fn learned_and_first_run_leave_room_for_the_floor() {
        let p = Policy::default();
        let cap = admission_capacity(10 * GIB, &p);
        // 2 GiB stay loaded when idle: a first run asks for at most what can free.
        assert_eq!(
            reserve(None, None, 10 * GIB, 2 * GIB, &p).bytes,
            cap - 2 * GIB
        );
        assert_eq!(
            reserve(None, Some(8 * GIB), 10 * GIB, 2 * GIB, &p).bytes,
            cap - 2 * GIB
        );
        // a floor at or over the capacity still reserves something, so the job waits
        assert_eq!(reserve(None, None, 10 * GIB, 20 * GIB, &p).bytes, 1);
        // declared needs are not capped
        assert_eq!(
            reserve(Some(8 * GIB), None, 10 * GIB, 2 * GIB, &p).bytes,
            8 * GIB
        );
    }

    #[test]
    fn oom_raises_strictly() {
        let p = Policy::default();
        assert_eq!(
            raise_after_oom(Some(2 * GIB), GIB, GIB, &p),
            scale(2 * GIB, 1.25)
        );
        assert_eq!(
            raise_after_oom(None, 3 * GIB, 4 * GIB, &p),
            scale(3 * GIB, 1.25)
        );
        assert_eq!(raise_after_oom(None, 0, 0, &p), 2);
        let flat = Policy {
            oom_raise: 1.0,
            ..Policy::default()
        };
        assert_eq!(raise_after_oom(Some(100), 0, 0, &flat), 101);
    }

    #[test]
    fn default_backoff_is_half_one_two_seconds() {
        let b = Backoff::default();
        assert_eq!(
            b.schedule(4),
            vec![
                Duration::from_millis(500),
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(2)
            ]
        );
        let odd = Backoff {
            base: Duration::from_millis(10),
            factor: f64::NAN,
            max: Duration::from_secs(1),
        };
        assert_eq!(odd.delay(30), Duration::from_millis(10));
    }

    #[test]
    fn human_bytes_have_one_decimal() {
        assert_eq!(human(6 * GIB), "6.0 GiB");
        assert_eq!(human(3 * GIB / 2), "1.5 GiB");
        assert_eq!(human(512 << 20), "512.0 MiB");
        assert_eq!(human(12), "12 B");
    }

    proptest! {
        #[test]
        fn reservation_never_exceeds_capacity_unless_declared(
            limit in 1u64..(1 << 45), peak in proptest::option::of(0u64..(1 << 46)),
            hw in 0.1f64..1.0, frac in 0.0f64..1.5, margin in 1.0f64..3.0,
        ) {
            let p = Policy { high_water: hw, first_run_fraction: frac, peak_margin: margin, oom_raise: 1.25 };
            let r = reserve(None, peak, limit, 0, &p);
            prop_assert!(r.bytes <= admission_capacity(limit, &p));
        }

        #[test]
        fn backoff_is_monotone_and_capped(base in 0u64..5000, factor in 1.0f64..4.0, attempt in 0u32..100) {
            let b = Backoff { base: Duration::from_millis(base), factor, max: Duration::from_secs(3) };
            prop_assert!(b.delay(attempt) <= b.delay(attempt + 1).max(b.max));
            prop_assert!(b.delay(attempt) <= b.max.max(b.base));
        }

        #[test]
        fn oom_raise_never_lowers(rec in proptest::option::of(0u64..(1<<50)), obs in 0u64..(1<<50), res in 0u64..(1<<50)) {
            let raised = raise_after_oom(rec, obs, res, &Policy::default());
            prop_assert!(raised > rec.unwrap_or(0));
            prop_assert!(raised > obs);
            if rec.unwrap_or(0) == 0 && obs == 0 { prop_assert!(raised > res); }
        }
    }
}
