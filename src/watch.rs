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
