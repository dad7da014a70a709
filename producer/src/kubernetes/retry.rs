//! The Kubernetes source's retry delays: the shared backoff, tuned for watches and
//! API calls, and its adapter to kube-runtime's watcher.

use std::time::Duration;

use changewire_schemas::backoff::Backoff;

/// For watches and API calls: 0.5 s to 30 s, healthy after 5 s.
pub(super) fn watch_backoff() -> Backoff {
    Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
}

/// The backoff in the shape kube-runtime's watcher takes it.
pub(super) struct WatcherBackoff(pub(super) Backoff);

impl Iterator for WatcherBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl kube::runtime::utils::Backoff for WatcherBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}
