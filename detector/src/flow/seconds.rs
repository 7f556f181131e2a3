//! Record times as whole seconds since the UNIX epoch, for the hot path: a
//! [`SystemTime`] is turned into seconds only through `duration_since`, a call into the
//! standard library of about 56 instructions, and a record's times were converted three
//! times on the shard's thread (duplicate marking twice, the profile once). A
//! [`SecondClock`] remembers a few consecutive seconds and answers a time inside them
//! with a few comparisons: record times come in bursts of the same few seconds.

use std::time::{Duration, SystemTime};

/// Seconds a [`SecondClock`] remembers: from 2 before the time that made it remember
/// them to 5 after.
const SPAN: usize = 8;

/// Conversions between two rememberings at least (a time outside the seconds
/// remembered is converted directly until then): a run of scattered times costs at most
/// a sixteenth of a remembering more a time than converting each one.
const REMEMBER_EVERY: u32 = 16;

/// Converts times to whole seconds since the UNIX epoch, remembering [`SPAN`]
/// consecutive seconds around a recent time. Every answer is exactly what
/// `duration_since(UNIX_EPOCH)` gives (0 for a time before the epoch).
#[derive(Clone, Copy, Debug)]
pub struct SecondClock {
    /// `bounds[k]` is the start of second `first + k`, `millis[k]` a millisecond later.
    /// Empty (`bounds[0] == bounds[SPAN]`) until a time is converted.
    bounds: [SystemTime; SPAN + 1],
    millis: [SystemTime; SPAN],
    first: u64,
    /// Conversions since the seconds were last remembered.
    since: u32,
}

impl Default for SecondClock {
    fn default() -> Self {
        Self {
            bounds: [SystemTime::UNIX_EPOCH; SPAN + 1],
            millis: [SystemTime::UNIX_EPOCH; SPAN],
            first: 0,
            since: REMEMBER_EVERY,
        }
    }
}

/// A time's place in its second: whole seconds since the epoch, whether it is past the
/// second's start, whether it is at least a millisecond past it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    secs: u64,
    past: bool,
    past_ms: bool,
}

impl SecondClock {
    #[inline(always)]
    fn place(&mut self, t: SystemTime) -> Place {
        if self.bounds[0] <= t && t < self.bounds[SPAN] {
            // The last second whose start is at or before `t`.
            let mut k = 0;
            let mut step = SPAN / 2;
            while step > 0 {
                if t >= self.bounds[k + step] {
                    k += step;
                }
                step /= 2;
            }
            return Place {
                secs: self.first + k as u64,
                past: t > self.bounds[k],
                past_ms: t >= self.millis[k],
            };
        }
        self.place_slow(t)
    }

    #[cold]
    #[inline(never)]
    fn place_slow(&mut self, t: SystemTime) -> Place {
        let Ok(d) = t.duration_since(SystemTime::UNIX_EPOCH) else {
            return Place {
                secs: 0,
                past: false,
                past_ms: false,
            };
        };
        let secs = d.as_secs();
        self.since = self.since.saturating_add(1);
        if self.since >= REMEMBER_EVERY {
            self.remember(secs.saturating_sub(2));
        }
        Place {
            secs,
            past: d.subsec_nanos() > 0,
            past_ms: d.subsec_nanos() >= 1_000_000,
        }
    }

    /// Remembers the [`SPAN`] seconds from `first` on (unless they pass the largest time).
    fn remember(&mut self, first: u64) {
        let mut bounds = [SystemTime::UNIX_EPOCH; SPAN + 1];
        let mut millis = [SystemTime::UNIX_EPOCH; SPAN];
        let Some(mut at) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(first)) else {
            return;
        };
        for k in 0..SPAN {
            bounds[k] = at;
            let (Some(ms), Some(next)) = (
                at.checked_add(Duration::from_millis(1)),
                at.checked_add(Duration::from_secs(1)),
            ) else {
                return;
            };
            millis[k] = ms;
            at = next;
        }
        bounds[SPAN] = at;
        *self = Self {
            bounds,
            millis,
            first,
            since: 0,
        };
    }

    /// Whole seconds since the epoch, rounded down.
    #[inline]
    pub fn secs_down(&mut self, t: SystemTime) -> u64 {
        self.place(t).secs
    }

    /// Whole seconds since the epoch, rounded up.
    #[inline]
    pub fn secs_up(&mut self, t: SystemTime) -> u64 {
        let p = self.place(t);
        p.secs + u64::from(p.past)
    }

    /// Whole milliseconds since the epoch (rounded down) in seconds rounded up: a
    /// profile's peer stamp ([`crate::detect::profile::stamp_of`] of
    /// [`crate::detect::profile::unix_ms`]) before its clamp to 32 bits.
    #[inline]
    pub fn ms_secs_up(&mut self, t: SystemTime) -> u64 {
        let p = self.place(t);
        p.secs + u64::from(p.past_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn direct(t: SystemTime) -> (u64, u64, u64) {
        match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => (
                d.as_secs(),
                d.as_secs() + u64::from(d.subsec_nanos() > 0),
                (d.as_millis() as u64).div_ceil(1000),
            ),
            Err(_) => (0, 0, 0),
        }
    }

    fn time(ns: i128) -> SystemTime {
        if ns >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
        } else {
            SystemTime::UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs() as u64)
        }
    }

    proptest! {
        /// Any sequence of times (runs inside one second, jumps, times before the
        /// epoch, the edges of a second and of its first millisecond) converts as
        /// `duration_since` does, whatever the clock remembered.
        #[test]
        fn converts_as_duration_since(
            base in -5_000_000_000i128..4_000_000_000_000_000_000i128,
            steps in proptest::collection::vec(
                prop_oneof![
                    -2_000_000_000i128..2_000_000_000,
                    Just(0i128),
                    Just(1),
                    Just(-1),
                    Just(999_999),
                    Just(1_000_000),
                    Just(1_000_000_000),
                ],
                1..60,
            ),
        ) {
            let mut clock = SecondClock::default();
            let mut at = base;
            for s in steps {
                at += s;
                let t = time(at);
                let want = direct(t);
                prop_assert_eq!(clock.secs_down(t), want.0, "down at {} ns", at);
                prop_assert_eq!(clock.secs_up(t), want.1, "up at {} ns", at);
                prop_assert_eq!(clock.ms_secs_up(t), want.2, "ms up at {} ns", at);
            }
        }
    }

    #[test]
    fn edges_of_a_second() {
        let mut clock = SecondClock::default();
        let s = 1_800_000_000u64;
        let at =
            |ns: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s) + Duration::from_nanos(ns);
        // Remembered from the first, then answered from the memory.
        for ns in [500, 0, 1, 999_999, 1_000_000, 999_999_999, 1_000_000_000] {
            let want = direct(at(ns));
            assert_eq!(
                (
                    clock.secs_down(at(ns)),
                    clock.secs_up(at(ns)),
                    clock.ms_secs_up(at(ns))
                ),
                want,
                "{ns} ns into the second"
            );
        }
        assert_eq!(direct(at(0)), (s, s, s));
        assert_eq!(direct(at(1)), (s, s + 1, s));
        assert_eq!(direct(at(1_000_000)), (s, s + 1, s + 1));
    }
}
