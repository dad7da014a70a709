//! Which watches are failing, for `/health`.
//!
//! A watch reports each failure, and its backoff reports when the next attempt
//! starts. A quiet kind yields nothing once its watch is back, so recovery is
//! inferred: an attempt that has run [`RECOVERY_GRACE`] without a new failure is
//! healthy. Any data from the watch clears its failure at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How long an attempt must run without failing to count as recovered. Refused
/// connections and rejected requests fail well within it.
pub const RECOVERY_GRACE: Duration = Duration::from_secs(2);

/// The failing watches, by scope.
#[derive(Debug, Default)]
pub struct WatchHealth {
    watches: Mutex<HashMap<String, Attempt>>,
}

#[derive(Debug, Default)]
struct Attempt {
    error: Option<String>,
    retried_at: Option<Instant>,
}

impl WatchHealth {
    /// The watch of `scope` failed with `error`.
    pub fn failed(&self, scope: &str, error: String) {
        self.lock().entry(scope.to_owned()).or_default().error = Some(error);
    }

    /// The watch of `scope` tries again at `at`.
    pub fn retrying(&self, scope: &str, at: Instant) {
        self.lock().entry(scope.to_owned()).or_default().retried_at = Some(at);
    }

    /// The watch of `scope` delivered data, or was removed.
    pub fn recovered(&self, scope: &str) {
        self.lock().remove(scope);
    }

    /// A hook for [`changewire_schemas::backoff::Backoff::on_retry`] that records `scope`'s retries.
    pub fn retry_hook(self: &Arc<Self>, scope: &str) -> impl Fn(Instant) + Send + Sync + 'static {
        let (health, scope) = (self.clone(), scope.to_owned());
        move |at| health.retrying(&scope, at)
    }

    /// `scope: error` of each watch still failing at `now`, in scope order; watches
    /// whose last attempt outlived the grace are forgotten.
    pub fn failing(&self, now: Instant) -> Vec<String> {
        let mut watches = self.lock();
        // A retry is reported just before the failure it follows: keep it (no
        // error yet) through the grace too.
        watches.retain(|_, attempt| {
            attempt
                .retried_at
                .is_none_or(|at| now < at + RECOVERY_GRACE)
        });
        let mut failing: Vec<String> = watches
            .iter()
            .filter_map(|(scope, attempt)| Some(format!("{scope}: {}", attempt.error.as_ref()?)))
            .collect();
        failing.sort();
        failing
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Attempt>> {
        self.watches
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failure_lasts_until_an_attempt_survives_the_grace() {
        let health = WatchHealth::default();
        let retry = Instant::now() + Duration::from_secs(4);
        health.retrying("/ConfigMap/*", retry);
        health.failed("/ConfigMap/*", "connection refused".into());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            health.failing(Instant::now()),
            ["/ConfigMap/*: connection refused"],
            "1 s into the attempt"
        );
        tokio::time::advance(RECOVERY_GRACE).await;
        assert!(health.failing(Instant::now()).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_with_no_retry_scheduled_stays_until_data_arrives() {
        let health = WatchHealth::default();
        health.failed("b", "gone".into());
        health.failed("a", "refused".into());
        tokio::time::advance(Duration::from_secs(600)).await;
        assert_eq!(health.failing(Instant::now()), ["a: refused", "b: gone"]);
        health.recovered("a");
        assert_eq!(health.failing(Instant::now()), ["b: gone"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_scheduled_retry_alone_is_not_a_failure() {
        let health = Arc::new(WatchHealth::default());
        (health.retry_hook("crds"))(Instant::now());
        assert!(health.failing(Instant::now()).is_empty());
    }
}
