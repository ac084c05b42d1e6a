//! The autoscaler's decision, modelled on Knative's KPA, as a pure state machine: it is fed
//! concurrency samples and the clock, and answers how many instances a function should have.
//!
//! - Stable mode: `ceil(average concurrency over the stable window / target)`.
//! - Panic mode: when the short panic window asks for at least twice the ready instances, the
//!   panic window's answer is used and the count never drops until a whole stable window has
//!   passed without another burst.
//! - Scale-down delay: the answer is the largest one of the last `scale_down_delay`, so a dip
//!   does not shed instances that the next second needs.
//! - Scale to zero only after `scale_to_zero_after` without a single request; demand at zero
//!   instances asks for one at once (the activator's poke).
//! - Everything is clamped to `min..=max`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::manifest::Scaling;

/// Knative's default panic threshold: 200 % of the ready capacity.
const PANIC_THRESHOLD: f64 = 2.0;

/// One function's autoscaler state.
#[derive(Debug)]
pub struct Kpa {
    policy: Scaling,
    samples: VecDeque<(Instant, f64)>,
    /// Recent answers, for the scale-down delay.
    recent: VecDeque<(Instant, u32)>,
    panic_since: Option<Instant>,
    panic_floor: u32,
}

impl Kpa {
    pub fn new(policy: Scaling) -> Kpa {
        Kpa { policy, samples: VecDeque::new(), recent: VecDeque::new(), panic_since: None, panic_floor: 0 }
    }

    /// Records the average concurrency (running + waiting requests) observed up to `now`.
    pub fn record(&mut self, now: Instant, concurrency: f64) {
        self.samples.push_back((now, concurrency.max(0.0)));
        let keep = self.policy.stable_window;
        while self.samples.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep) {
            self.samples.pop_front();
        }
    }

    fn average(&self, now: Instant, window: Duration) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_duration_since(*t) < window)
            .fold((0.0, 0u32), |(s, n), (_, c)| (s + c, n + 1));
        if n == 0 { 0.0 } else { sum / f64::from(n) }
    }

    fn instances_for(&self, concurrency: f64) -> u32 {
        let n = (concurrency / self.policy.target_concurrency).ceil();
        if n >= f64::from(u32::MAX) { u32::MAX } else { n as u32 }
    }

    /// How many instances the function should have now. `ready` is how many it has;
    /// `last_active` when it last had a running or waiting request; `waiting` whether a request
    /// waits right now.
    pub fn desired(&mut self, now: Instant, ready: u32, last_active: Instant, waiting: bool) -> u32 {
        let p = &self.policy;
        let stable = self.instances_for(self.average(now, p.stable_window));
        let panic = self.instances_for(self.average(now, p.panic_window));

        // As in Knative, zero ready instances count as one when judging a burst.
        let bursting = f64::from(panic) / f64::from(ready.max(1)) >= PANIC_THRESHOLD;
        if bursting {
            self.panic_since = Some(now);
        } else if self.panic_since.is_some_and(|t| now.saturating_duration_since(t) >= p.stable_window) {
            self.panic_since = None;
            self.panic_floor = 0;
        }
        let mut want = if self.panic_since.is_some() {
            self.panic_floor = self.panic_floor.max(panic).max(ready);
            self.panic_floor
        } else {
            stable
        };

        // Hold the largest recent answer for the scale-down delay.
        self.recent.push_back((now, want));
        let delay = p.scale_down_delay;
        while self.recent.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > delay) {
            self.recent.pop_front();
        }
        want = self.recent.iter().map(|(_, n)| *n).max().unwrap_or(want);

        // Scale to zero only after a whole idle period; demand at zero asks for one now.
        if want == 0 && ready > 0 && now.saturating_duration_since(last_active) < p.scale_to_zero_after {
            want = 1;
        }
        if waiting {
            want = want.max(1);
        }
        want.clamp(p.min, p.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Scaling {
        Scaling {
            min: 0,
            max: 10,
            target_concurrency: 2.0,
            initial: 1,
            scale_down_delay: Duration::from_secs(10),
            scale_to_zero_after: Duration::from_secs(30),
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
        }
    }

    /// Feeds one sample per second of `concurrency` for `secs` seconds, returning the last answer.
    fn run(kpa: &mut Kpa, t: &mut Instant, ready: &mut u32, concurrency: f64, secs: u64) -> u32 {
        let mut last_active = *t;
        for _ in 0..secs {
            *t += Duration::from_secs(1);
            if concurrency > 0.0 {
                last_active = *t;
            }
            kpa.record(*t, concurrency);
            *ready = kpa.desired(*t, *ready, last_active, false);
        }
        *ready
    }

    #[test]
    fn steady_load_settles_on_concurrency_over_target() {
        let (mut kpa, mut t, mut ready) = (Kpa::new(policy()), Instant::now(), 1);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 7.0, 120), 4);
    }

    #[test]
    fn a_burst_panics_up_at_once_and_holds() {
        let (mut kpa, mut t, mut ready) = (Kpa::new(policy()), Instant::now(), 1);
        run(&mut kpa, &mut t, &mut ready, 2.0, 60);
        assert_eq!(ready, 1);
        // 16 concurrent requests want 8 instances: panic mode gets there within the panic
        // window (the stable average would still ask for 2).
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 16.0, 6), 8);
        // The burst ends; panic mode holds the count for a stable window...
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 2.0, 30), 8);
        // ...then stable mode and the scale-down delay bring it back down.
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 2.0, 120), 1);
    }

    #[test]
    fn scales_to_zero_only_after_the_idle_period() {
        let (mut kpa, mut t, mut ready) = (Kpa::new(policy()), Instant::now(), 1);
        run(&mut kpa, &mut t, &mut ready, 1.0, 10);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 0.0, 25), 1);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 0.0, 90), 0);
        // A waiting request at zero asks for an instance right away.
        let now = t + Duration::from_secs(1);
        assert_eq!(kpa.desired(now, 0, t, true), 1);
    }

    #[test]
    fn min_and_max_bound_every_answer() {
        let mut p = policy();
        p.min = 2;
        p.max = 3;
        let (mut kpa, mut t, mut ready) = (Kpa::new(p), Instant::now(), 2);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 0.0, 200), 2);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 100.0, 10), 3);
    }

    #[test]
    fn a_dip_shorter_than_the_scale_down_delay_sheds_nothing() {
        let (mut kpa, mut t, mut ready) = (Kpa::new(policy()), Instant::now(), 1);
        let mut p = policy();
        p.stable_window = Duration::from_secs(6);
        kpa.policy = p;
        run(&mut kpa, &mut t, &mut ready, 8.0, 30);
        assert_eq!(ready, 4);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 0.5, 8), 4);
        assert_eq!(run(&mut kpa, &mut t, &mut ready, 0.5, 30), 1);
    }
}
