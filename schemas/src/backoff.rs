//! Retry delays, the one backoff of every changewire part (the producer's reconnect
//! loops and watches, the consumer's parked partitions and sink retries):
//! exponential with jitter, and reset once the last attempt has run healthy for a
//! while.
//!
//! A delay grown during an outage must not outlive it. kube-runtime's default resets
//! only when a watch yields an event (quiet kinds yield none) or 120 s after the last
//! failure, so one failure after a healthy period could wait 30 s. Here an attempt
//! counts as healthy once it has run for [`Backoff::healthy_after`] without failing,
//! measured from when it started (the end of the previous delay).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Exponential backoff with jitter that forgets past failures after a healthy period.
#[derive(Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    healthy_after: Duration,
    attempt: u32,
    /// When the attempt following the last delay started.
    retried_at: Option<Instant>,
    on_retry: Option<Arc<dyn Fn(Instant) + Send + Sync>>,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("attempt", &self.attempt)
            .field("retried_at", &self.retried_at)
            .finish_non_exhaustive()
    }
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`, reset once an attempt ran
    /// `healthy_after` without failing.
    pub fn new(initial: Duration, max: Duration, healthy_after: Duration) -> Self {
        Self {
            initial,
            max,
            healthy_after,
            attempt: 0,
            retried_at: None,
            on_retry: None,
        }
    }

    /// Calls `hook` with the time each next attempt starts (health reporting).
    pub fn on_retry(mut self, hook: impl Fn(Instant) + Send + Sync + 'static) -> Self {
        self.on_retry = Some(Arc::new(hook));
        self
    }

    /// The same delays with another ceiling (attempts so far kept).
    pub fn with_max(mut self, max: Duration) -> Self {
        self.max = max;
        self
    }

    /// Forgets past failures: the next delay is the first again.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.retried_at = None;
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, after a failure now.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_at(Instant::now())
    }

    /// The delay before the next attempt, after a failure at `now` (for pure code
    /// that is handed the time).
    pub fn next_delay_at(&mut self, now: Instant) -> Duration {
        if self
            .retried_at
            .is_some_and(|started| now.saturating_duration_since(started) >= self.healthy_after)
        {
            self.attempt = 0;
        }
        let ceiling = self
            .initial
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Half fixed, half random: spread retries of many watches without ever
        // retrying sooner than half the delay.
        let delay = ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0);
        self.retried_at = Some(now + delay);
        if let Some(hook) = &self.on_retry {
            hook(now + delay);
        }
        delay
    }

    /// Sleeps for the next delay; true if `shutdown` fired first.
    pub async fn wait(&mut self, shutdown: &mut watch::Receiver<bool>) -> bool {
        if *shutdown.borrow() {
            return true;
        }
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            _ = shutdown.changed() => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(5),
        )
    }

    /// Delays lie in [ceiling/2, ceiling]: checks the ceiling they came from.
    fn assert_ceiling(delay: Duration, ceiling_secs: u64) {
        let ceiling = Duration::from_secs(ceiling_secs);
        assert!(
            delay >= ceiling / 2 && delay <= ceiling,
            "{delay:?} not within the {ceiling:?} step"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn grows_while_attempts_fail_at_once_up_to_the_maximum() {
        let mut backoff = backoff();
        for ceiling in [1, 2, 4, 8, 16, 30, 30] {
            let delay = backoff.next_delay();
            assert_ceiling(delay, ceiling);
            // The retry fails right away (connection refused).
            tokio::time::advance(delay).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resets_once_an_attempt_ran_healthy() {
        let mut backoff = backoff();
        for _ in 0..5 {
            let delay = backoff.next_delay();
            tokio::time::advance(delay).await;
        }
        // Healthy for 4 s: not long enough.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_ceiling(backoff.next_delay(), 30);
        let delay = backoff.next_delay();
        tokio::time::advance(delay + Duration::from_secs(5)).await;
        assert_ceiling(backoff.next_delay(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_delay_is_not_mistaken_for_health() {
        let mut backoff = backoff();
        for _ in 0..6 {
            let delay = backoff.next_delay();
            tokio::time::advance(delay).await;
        }
        // 30 s of waiting then an immediate failure: still an outage.
        assert_ceiling(backoff.next_delay(), 30);
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_comes_from_a_random_source() {
        let mut delays = std::collections::HashSet::new();
        for _ in 0..20 {
            delays.insert(backoff().next_delay());
        }
        assert!(delays.len() > 10, "{delays:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_shutdown() {
        let (stop, mut shutdown) = watch::channel(false);
        let mut backoff = backoff();
        let waiting = tokio::spawn(async move { backoff.wait(&mut shutdown).await });
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        assert!(waiting.await.unwrap());
    }
}
