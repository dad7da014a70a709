//! The fake Kubernetes API server as a standalone tool, for trying the Kubernetes
//! source (or any kube client) without a cluster:
//! `cargo run -p changewire-tests --bin fake-kube-apiserver -- [ADDR]` (default
//! 127.0.0.1:8001), then point `kubernetes.api_url` (or kubectl's `--server`) at it.

use changewire_tests::kube_api::{FakeApiServer, Options};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8001".into());
    let server = FakeApiServer::start_with(Options::default(), addr.parse()?).await?;
    eprintln!(
        "fake Kubernetes API server on {} (Ctrl-C stops it; state is in memory)",
        server.url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
