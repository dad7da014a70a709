//! Stopping: a switch that SIGTERM or SIGINT turns, and waiting on it.

use tokio::sync::watch;

/// A shutdown switch that turns true on SIGTERM or SIGINT, for [`super::run`].
pub fn stop_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop, shutdown) = watch::channel(false);
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("shutting down: finishing the batch at hand");
        let _ = stop.send(true);
    });
    Ok(shutdown)
}

/// Resolves once shutdown was requested; holds no watch guard across awaits.
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
