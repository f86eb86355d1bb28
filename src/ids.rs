//! Identifiers: snowflake ids for invoices and other rows, and the issuance-queue partition
//! of an order id (SPEC §4).
//!
//! A snowflake is 41 bits of milliseconds since [`EPOCH_MS`], 10 bits of worker id and 12
//! bits of sequence. Uniqueness rests on three things: the worker id is unique among live
//! processes (held with a Postgres advisory lock, see `storage::workers`), the time part
//! never goes backwards within a process, and a restarted process waits until the clock has
//! passed the last millisecond it had used (also kept in Postgres).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Custom epoch, 2025-01-01T00:00:00Z. Fixed forever: changing it would reuse ids.
pub const EPOCH_MS: u64 = 1_735_689_600_000;
/// Largest worker id (10 bits).
pub const MAX_WORKER_ID: u16 = 1023;
const WORKER_BITS: u32 = 10;
const SEQUENCE_BITS: u32 = 12;
const MAX_SEQUENCE: u64 = (1 << SEQUENCE_BITS) - 1;
const MAX_TIME: u64 = (1 << 41) - 1;
/// How far the clock may step back before the generator refuses to issue ids rather than
/// borrowing time from the future.
pub const MAX_BACKWARD_STEP: Duration = Duration::from_secs(1);

/// A source of wall-clock milliseconds since the Unix epoch; injected so tests can move it.
pub trait Clock: Send + Sync {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// Why no id could be issued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    /// The clock is further behind the last issued id than [`MAX_BACKWARD_STEP`].
    #[error("system clock moved backwards by {behind_ms} ms (more than {} ms); refusing to issue ids until it catches up", MAX_BACKWARD_STEP.as_millis())]
    ClockMovedBackwards {
        /// How far behind the last issued millisecond the clock is.
        behind_ms: u64,
    },
    /// The process no longer holds its worker id (the lease connection dropped); another
    /// process may hold it now, so issuing ids would risk duplicates.
    #[error("the snowflake worker-id lease is lost; ids are refused until it is re-acquired")]
    LeaseLost,
    /// The clock is before the custom epoch or beyond the 41-bit range.
    #[error("system clock is outside the snowflake range (before 2025-01-01 or after 2094)")]
    ClockOutOfRange,
}

/// A snowflake generator for one worker id. Cheap to clone; clones share state, so every
/// task of a process may hold one.
#[derive(Clone)]
pub struct Snowflake {
    worker_id: u16,
    /// `(ms since epoch) << 12 | sequence` of the last id; one atomic word so that
    /// generation is lock-free and never reorders time and sequence.
    state: Arc<AtomicU64>,
    clock: Arc<dyn Clock>,
    /// False while the worker-id lease is lost.
    leased: Arc<AtomicBool>,
}

impl std::fmt::Debug for Snowflake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snowflake").field("worker_id", &self.worker_id).finish()
    }
}

impl Snowflake {
    /// A generator for `worker_id` (0–1023) that will never issue an id in a millisecond at
    /// or before `last_used_ms` (Unix ms), the newest millisecond an earlier process with
    /// this worker id used.
    pub fn new(worker_id: u16, clock: Arc<dyn Clock>, last_used_ms: u64) -> Snowflake {
        assert!(worker_id <= MAX_WORKER_ID, "worker id checked by config");
        let last = last_used_ms.saturating_sub(EPOCH_MS);
        Snowflake {
            worker_id,
            state: Arc::new(AtomicU64::new((last << SEQUENCE_BITS) | MAX_SEQUENCE)),
            clock,
            leased: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Marks the worker-id lease as held or lost; while lost, [`Snowflake::next_id`] fails
    /// with [`IdError::LeaseLost`].
    pub fn set_leased(&self, leased: bool) {
        self.leased.store(leased, Ordering::Release);
    }

    /// The worker id embedded in every id.
    pub fn worker_id(&self) -> u16 {
        self.worker_id
    }

    /// The newest Unix millisecond this generator has put into an id.
    pub fn last_used_ms(&self) -> u64 {
        (self.state.load(Ordering::Acquire) >> SEQUENCE_BITS) + EPOCH_MS
    }

    /// The next id. Within a millisecond the sequence counts up; past 4096 ids the time part
    /// borrows the next millisecond. A clock that stepped back by at most
    /// [`MAX_BACKWARD_STEP`] is treated the same way (time is borrowed, ids stay increasing);
    /// further back is an error.
    pub fn next_id(&self) -> Result<i64, IdError> {
        if !self.leased.load(Ordering::Acquire) {
            return Err(IdError::LeaseLost);
        }
        let now = self.clock.now_ms();
        if now < EPOCH_MS {
            return Err(IdError::ClockOutOfRange);
        }
        let now = now - EPOCH_MS;
        let mut current = self.state.load(Ordering::Acquire);
        loop {
            let (last_ms, seq) = (current >> SEQUENCE_BITS, current & MAX_SEQUENCE);
            let (ms, seq) = if now > last_ms {
                (now, 0)
            } else {
                let behind = last_ms - now;
                if behind > MAX_BACKWARD_STEP.as_millis() as u64 {
                    return Err(IdError::ClockMovedBackwards { behind_ms: behind });
                }
                if seq < MAX_SEQUENCE {
                    (last_ms, seq + 1)
                } else {
                    (last_ms + 1, 0)
                }
            };
            if ms > MAX_TIME {
                return Err(IdError::ClockOutOfRange);
            }
            let next = (ms << SEQUENCE_BITS) | seq;
            match self.state.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let id = (ms << (WORKER_BITS + SEQUENCE_BITS))
                        | (u64::from(self.worker_id) << SEQUENCE_BITS)
                        | seq;
                    return Ok(id as i64);
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// The parts of a snowflake id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnowflakeParts {
    /// Unix milliseconds.
    pub unix_ms: u64,
    /// Worker id.
    pub worker_id: u16,
    /// Sequence within the millisecond.
    pub sequence: u16,
}

/// Splits an id into its parts (for `inspect` and tests).
pub fn decompose(id: i64) -> SnowflakeParts {
    let id = id as u64;
    SnowflakeParts {
        unix_ms: (id >> (WORKER_BITS + SEQUENCE_BITS)) + EPOCH_MS,
        worker_id: ((id >> SEQUENCE_BITS) & u64::from(MAX_WORKER_ID)) as u16,
        sequence: (id & MAX_SEQUENCE) as u16,
    }
}

/// Java's `String.hashCode` over UTF-16 code units: `h = 31*h + c`, wrapping in 32 bits.
pub fn java_string_hash(s: &str) -> i32 {
    s.encode_utf16().fold(0i32, |h, unit| h.wrapping_mul(31).wrapping_add(i32::from(unit)))
}

/// The issuance-queue partition of an order (SPEC §4): `|h| mod partitions`, with `|h|`
/// taken in 64 bits so that `i32::MIN` stays positive (as JavaScript's `Math.abs` gives).
pub fn partition_of(order_id: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "partition count checked by config");
    (i64::from(java_string_hash(order_id)).unsigned_abs() % u64::from(partitions)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;
    use std::sync::Mutex;

    /// A clock the test moves by hand.
    struct ManualClock(Mutex<u64>);
    impl ManualClock {
        fn at(ms: u64) -> Arc<ManualClock> {
            Arc::new(ManualClock(Mutex::new(ms)))
        }
        fn set(&self, ms: u64) {
            *self.0.lock().unwrap() = ms;
        }
    }
    impl Clock for ManualClock {
        fn now_ms(&self) -> u64 {
            *self.0.lock().unwrap()
        }
    }

    const T0: u64 = EPOCH_MS + 60_000_000;

    #[test]
    fn java_hash_matches_known_java_values() {
        // Values printed by java.lang.String#hashCode (OpenJDK 17).
        assert_eq!(java_string_hash(""), 0);
        assert_eq!(java_string_hash("a"), 97);
        assert_eq!(java_string_hash("hello"), 99_162_322);
        assert_eq!(java_string_hash("Hello World"), -862_545_276);
        assert_eq!(java_string_hash("polygenelubricants"), i32::MIN);
        assert_eq!(java_string_hash("ORD-2026-000123"), 724_660_257);
        // Non-ASCII: "é" is one UTF-16 unit (0xE9); "Cà phê" mixes; an astral character is a
        // surrogate pair (two units), as Java sees it.
        assert_eq!(java_string_hash("é"), 233);
        assert_eq!(java_string_hash("Cà phê"), 2_126_086_223);
        assert_eq!(java_string_hash("😀"), 1_772_899);
        assert_eq!(java_string_hash("ĐƠN-HÀNG-1"), -169_624_700);
    }

    #[test]
    fn partition_follows_the_runbook_rule() {
        // |i32::MIN| = 2^31, and 2^31 mod 3 = 2 (SPEC §4's own example).
        assert_eq!(partition_of("polygenelubricants", 3), 2);
        assert_eq!(partition_of("hello", 3), 1);
        assert_eq!(partition_of("Hello World", 3), 0);
        assert_eq!(partition_of("ORD-2026-000123", 3), 0);
        assert_eq!(partition_of("ĐƠN-HÀNG-1", 3), 2);
        assert_eq!(partition_of("ĐƠN-HÀNG-1", 7), 0);
        assert_eq!(partition_of("Hello World", 7), 5);
        assert_eq!(partition_of("anything", 1), 0);
    }

    #[test]
    fn ids_increase_and_decompose() {
        let clock = ManualClock::at(T0);
        let gen = Snowflake::new(42, clock.clone(), 0);
        let a = gen.next_id().unwrap();
        let b = gen.next_id().unwrap();
        assert!(b > a);
        let parts = decompose(b);
        assert_eq!(parts, SnowflakeParts { unix_ms: T0, worker_id: 42, sequence: 1 });
        clock.set(T0 + 5);
        let c = gen.next_id().unwrap();
        assert_eq!(decompose(c), SnowflakeParts { unix_ms: T0 + 5, worker_id: 42, sequence: 0 });
    }

    #[test]
    fn a_small_backward_step_keeps_ids_increasing() {
        let clock = ManualClock::at(T0);
        let gen = Snowflake::new(1, clock.clone(), 0);
        let before = gen.next_id().unwrap();
        clock.set(T0 - 5);
        let after = gen.next_id().unwrap();
        assert!(after > before);
        assert_eq!(decompose(after).unix_ms, T0);
    }

    #[test]
    fn a_large_backward_step_is_refused() {
        let clock = ManualClock::at(T0);
        let gen = Snowflake::new(1, clock.clone(), 0);
        gen.next_id().unwrap();
        clock.set(T0 - 2_000);
        assert_eq!(gen.next_id(), Err(IdError::ClockMovedBackwards { behind_ms: 2_000 }));
        clock.set(T0 + 1);
        assert!(gen.next_id().is_ok(), "recovers once the clock catches up");
    }

    #[test]
    fn a_full_millisecond_borrows_the_next() {
        let clock = ManualClock::at(T0);
        let gen = Snowflake::new(3, clock, 0);
        let ids: Vec<i64> = (0..4097).map(|_| gen.next_id().unwrap()).collect();
        assert_eq!(decompose(ids[4095]), SnowflakeParts { unix_ms: T0, worker_id: 3, sequence: 4095 });
        assert_eq!(decompose(ids[4096]), SnowflakeParts { unix_ms: T0 + 1, worker_id: 3, sequence: 0 });
    }

    #[test]
    fn a_lost_lease_refuses_ids() {
        let gen = Snowflake::new(2, ManualClock::at(T0), 0);
        gen.set_leased(false);
        assert_eq!(gen.next_id(), Err(IdError::LeaseLost));
        gen.set_leased(true);
        assert!(gen.next_id().is_ok());
    }

    #[test]
    fn a_restart_never_reuses_the_last_used_millisecond() {
        let clock = ManualClock::at(T0);
        // The previous process used T0 + 300 (its clock was ahead, or it borrowed time).
        let gen = Snowflake::new(5, clock.clone(), T0 + 300);
        let id = gen.next_id().unwrap();
        assert!(decompose(id).unix_ms > T0 + 300);
        // Further behind than the tolerated step: refuse rather than reuse.
        let gen = Snowflake::new(5, clock, T0 + 5_000);
        assert!(matches!(gen.next_id(), Err(IdError::ClockMovedBackwards { .. })));
    }

    #[test]
    fn ids_are_unique_and_increasing_across_threads() {
        let gen = Snowflake::new(1023, Arc::new(SystemClock), 0);
        let per_thread = 100_000;
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let gen = gen.clone();
                std::thread::spawn(move || {
                    let ids: Vec<i64> = (0..per_thread).map(|_| gen.next_id().unwrap()).collect();
                    assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing within a thread");
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 8 * per_thread);
    }

    proptest! {
        #[test]
        fn any_clock_path_yields_strictly_increasing_ids(steps in proptest::collection::vec(-900i64..900, 1..200)) {
            let clock = ManualClock::at(T0);
            let gen = Snowflake::new(9, clock.clone(), 0);
            let mut now = T0 as i64;
            let mut last = 0i64;
            for step in steps {
                now += step;
                clock.set(now as u64);
                match gen.next_id() {
                    Ok(id) => { prop_assert!(id > last); last = id; }
                    Err(IdError::ClockMovedBackwards { behind_ms }) => {
                        prop_assert!(behind_ms > MAX_BACKWARD_STEP.as_millis() as u64)
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }

        #[test]
        fn partition_is_always_in_range(order_id in ".{0,40}", partitions in 1u32..64) {
            prop_assert!(partition_of(&order_id, partitions) < partitions);
        }
    }
}
