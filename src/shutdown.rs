//! Shutdown on SIGINT or SIGTERM (what Kubernetes sends a Pod), shared by the
//! long-running subcommands.

/// Completes when the process is asked to stop.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
