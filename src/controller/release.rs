//! Deletion always completes: the agent's finalizer on a VM is removed by the controller
//! when no agent can hold it any more (the VM is unbound, its Node object is gone, or its
//! node has been silent past the fencing bound, so its domains are destroyed). The
//! returning agent's sweep then finds the VM gone and removes its domain and files.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ResourceExt};
use kube::runtime::controller::Action;

use super::Context;
use crate::api::{DOMAIN_FINALIZER, VirtualMachine};

/// Who, if anyone, can still complete the agent's part of a VM's deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// A live agent on the VM's node will remove the finalizer itself.
    Agent,
    /// Not bound to any node: no agent watches it.
    Unbound,
    /// Bound to a Node object that no longer exists.
    NodeGone,
    /// Bound to a node silent for longer than lease + fencing + margin: its agent has
    /// destroyed its domains (or is gone).
    NodeLost,
}

/// Pure: who holds the finalizer. `silence` is the node's heartbeat age and Lease duration
/// (None when it has no Lease); `bound` is the fencing bound (fence delay + margin).
pub fn holder(
    node: Option<&str>,
    node_exists: bool,
    silence: Option<(Duration, Duration)>,
    bound: Duration,
) -> Holder {
    match (node, node_exists, silence) {
        (None, _, _) => Holder::Unbound,
        (Some(_), false, _) => Holder::NodeGone,
        (Some(_), true, Some((age, duration))) if age > duration + bound => Holder::NodeLost,
        // No Lease (yet) in the cache: assume the agent lives rather than act on a guess.
        _ => Holder::Agent,
    }
}

/// For a VM being deleted: removes the agent's finalizer when no agent can. Requeues while
/// an agent may still do it (its node may be lost later).
pub async fn reconcile_deleted(
    vm: &VirtualMachine,
    ctx: &Arc<Context>,
    bound: Duration,
) -> Result<Action, kube::Error> {
    if !vm.finalizers().iter().any(|f| f == DOMAIN_FINALIZER) {
        return Ok(Action::await_change());
    }
    let node = vm.status.as_ref().and_then(|s| s.node_name.clone());
    let mut exists = true;
    let mut lease = None;
    if let Some(n) = &node {
        // A fresh read: the cache may not have seen the Node yet.
        exists = Api::<Node>::all(ctx.client.clone())
            .get_opt(n)
            .await?
            .is_some();
        lease = super::nodeloss::heartbeat_silence(ctx, n);
    }
    let who = holder(node.as_deref(), exists, lease, bound);
    if who == Holder::Agent {
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    crate::patch::remove_finalizer(&api, vm, DOMAIN_FINALIZER).await?;
    tracing::warn!(vm = %format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()), node = ?node, holder = ?who, "released the agent's finalizer: no agent can complete the deletion");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_live_agent_keeps_the_finalizer() {
        let s = Duration::from_secs;
        let bound = s(70);
        // (node, node exists, (heartbeat age, lease duration)) -> holder
        let table = [
            (None, true, None, Holder::Unbound),
            (None, false, Some((s(1), s(15))), Holder::Unbound),
            (Some("n"), false, Some((s(1), s(15))), Holder::NodeGone),
            (Some("n"), true, Some((s(1), s(15))), Holder::Agent),
            (Some("n"), true, Some((s(85), s(15))), Holder::Agent),
            (Some("n"), true, Some((s(86), s(15))), Holder::NodeLost),
            (Some("n"), true, None, Holder::Agent),
        ];
        for (node, exists, silence, want) in table {
            assert_eq!(
                holder(node, exists, silence, bound),
                want,
                "{node:?} {exists} {silence:?}"
            );
        }
    }
}
