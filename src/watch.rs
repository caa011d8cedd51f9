//! What the agent's and the controller's watches share.

use kube::runtime::{WatchStreamExt, watcher};

/// Drops what the caches never read and that makes up much of each object: the
/// server-side apply bookkeeping (managedFields) and kubectl's last-applied annotation.
pub fn slim<K: kube::Resource + Send + 'static>(
    s: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send {
    s.modify(|o| {
        o.meta_mut().managed_fields = None;
        if let Some(a) = o.meta_mut().annotations.as_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
    })
}

/// One watch for several consumers: every object the stream yields (applied or deleted)
/// goes to each of `n` streams, in order, so the API server sends each change once
/// instead of once per consumer. Errors are the watch's own (the stream retries with
/// backoff): logged here, not passed on. Drive the returned future for anything to flow;
/// a full consumer holds the others back (bounded channels), a dropped one is skipped.
pub fn fan_out<K: Clone + Send + 'static>(
    stream: impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    n: usize,
) -> (
    impl std::future::Future<Output = ()> + Send,
    Vec<impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static>,
) {
    use futures::StreamExt;
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n)
        // Not smaller: at 64 a 35-VM burst filled a channel and held the watch (and the
        // reflector behind it) back until the scheduler's assumed placements expired
        // unseen, and a node was over-committed (controller::placement_and_leader_failover).
        .map(|_| tokio::sync::mpsc::channel::<K>(1024))
        .unzip();
    let drive = async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    for tx in &txs {
                        let _ = tx.send(obj.clone()).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "watch error (retrying)"),
            }
        }
    };
    let streams = rxs
        .into_iter()
        .map(|rx| tokio_stream_of(rx).map(Ok))
        .collect();
    (drive, streams)
}

fn tokio_stream_of<K: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<K>,
) -> impl futures::Stream<Item = K> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
