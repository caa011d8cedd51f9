//! Node loss: a hypervisor whose heartbeat has been silent for longer than
//! lease duration + the agents' fence delay + a margin has, by then, destroyed its domains
//! (agents fence themselves when they cannot renew), so its VMs can run elsewhere without
//! ever running twice. docs/reliability.md has the timing argument.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ResourceExt};

use super::Context;
use super::binding::{self, Binding};
use super::inventory::silence;
use crate::api::vm::RunStrategy;
use crate::api::{VirtualMachine, conditions};

/// Hypervisor nodes whose heartbeat has been silent longer than the Lease's duration plus
/// `fence_after` plus `margin`. Only Leases of labelled Nodes that exist count: a Lease
/// outlives a deleted Node, and counting it would make the mass-silence guard below see
/// an outage that is not there.
pub fn lost_nodes(ctx: &Context, fence_after: Duration, margin: Duration) -> HashSet<String> {
    let now = Timestamp::now();
    let hypervisors = hypervisor_nodes(ctx);
    ctx.caches
        .leases
        .state()
        .iter()
        .filter_map(|l| {
            let node = crate::api::heartbeat_lease_node(l.metadata.name.as_deref()?)?.to_string();
            let (age, duration) = silence(l, now)?;
            (hypervisors.contains(&node) && age > duration + fence_after + margin).then_some(node)
        })
        .collect()
}

/// `node`'s heartbeat silence (age, Lease duration) from the cache, looked up by key.
pub fn heartbeat_silence(ctx: &Context, node: &str) -> Option<(Duration, Duration)> {
    let key = kube::runtime::reflector::ObjectRef::new(&crate::api::heartbeat_lease_name(node))
        .within(crate::api::HEARTBEAT_LEASE_NAMESPACE);
    silence(ctx.caches.leases.get(&key)?.as_ref(), Timestamp::now())
}

/// Whether `node`'s heartbeat Lease was renewed within its duration.
pub fn heartbeat_fresh(ctx: &Context, node: &str) -> bool {
    heartbeat_silence(ctx, node).is_some_and(|(age, duration)| age <= duration)
}

/// Names of the Nodes labelled as hypervisors.
fn hypervisor_nodes(ctx: &Context) -> HashSet<String> {
    ctx.caches
        .nodes
        .state()
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::api::HYPERVISOR_LABEL))
                .map(String::as_str)
                == Some("true")
        })
        .filter_map(|n| n.metadata.name.clone())
        .collect()
}

/// Says on the VM that its node is lost (NodeHealthy=False) and, when its run strategy
/// wants it running and it may restart elsewhere, unbinds it in the same write so that
/// the scheduler places it elsewhere. Whether it was unbound.
async fn evict(ctx: &Context, vm: &VirtualMachine, node: &str) -> Result<bool, kube::Error> {
    let wants_running = matches!(
        vm.spec.run_strategy.unwrap_or_default(),
        RunStrategy::Always | RunStrategy::RerunOnFailure
    );
    let shared = |v: &str| ctx.caches.shared_volume(vm, v);
    let moves = wants_running && vm.spec.may_restart_elsewhere(&shared);
    let mut message = format!("node {node} stopped renewing its heartbeat; its domains are fenced");
    if wants_running && !moves {
        // Restarting elsewhere would start it on empty disks: the data waits on the node.
        message += &format!(
            "; the VM stays bound to {node} because disk(s) {} hold data only that node has \
             (set spec.failoverPolicy: RestartWithNewDisks to restart it elsewhere on new disks)",
            vm.spec.node_local_data(&shared).join(", ")
        );
    }
    let mut new = Binding::of(vm.status.as_ref()).with(
        vm,
        conditions::Type::NodeHealthy,
        false,
        "NodeLost",
        message,
    );
    if moves {
        new = note_disks_left(new, ctx, vm, node).bound_to(None);
    }
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    binding::apply(&api, vm, new).await?;
    Ok(moves)
}

/// `b` with DisksLeftBehind, when the VM leaves `node` on new disks while its node-local
/// data stays there (failoverPolicy RestartWithNewDisks, or a drain): that node keeps
/// them until the VM is deleted (its agent's sweep confirms the deletion).
pub(super) fn note_disks_left(
    b: Binding,
    ctx: &Context,
    vm: &VirtualMachine,
    node: &str,
) -> Binding {
    let disks = vm
        .spec
        .node_local_data(&|v| ctx.caches.shared_volume(vm, v));
    if disks.is_empty() {
        return b;
    }
    b.with(
        vm,
        conditions::Type::DisksLeftBehind,
        true,
        "NodeLocalData",
        format!(
            "the previous copies of disk(s) {} stay on node {node} until the VM is deleted; \
             it runs on new disks",
            disks.join(", ")
        ),
    )
}

/// Pure: whether VMs may be moved off lost nodes. When more than half of the hypervisors
/// are silent the problem is more likely the control plane (or this controller's view of
/// it) than the nodes, as the Kubernetes node lifecycle controller reasons in "full
/// disruption". It is also the other half of the agents' rule (`agent::peers`): a group
/// of agents that skipped fencing because none of them reached the API server is more
/// than half of all hypervisors, so its VMs are never moved while their copies may run.
pub fn may_move(lost: usize, total: usize) -> bool {
    2 * lost <= total
}

pub async fn node_loss_loop(ctx: Arc<Context>, fence_after: Duration, margin: Duration) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let lost = lost_nodes(&ctx, fence_after, margin);
        if lost.is_empty() {
            continue;
        }
        // Hypervisors: labelled Nodes whose agent has a heartbeat Lease.
        let total = hypervisor_nodes(&ctx)
            .into_iter()
            .filter(|n| {
                ctx.caches.leases.state().iter().any(|l| {
                    l.metadata.name.as_deref() == Some(&crate::api::heartbeat_lease_name(n))
                })
            })
            .count();
        if !may_move(lost.len(), total) {
            tracing::error!(
                lost = lost.len(),
                total,
                "more than half of the hypervisors are silent: not moving VMs (control-plane trouble?)"
            );
            continue;
        }
        for vm in ctx.caches.vms.state() {
            let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            if !lost.contains(&node) || vm.metadata.deletion_timestamp.is_some() {
                continue;
            }
            match evict(&ctx, &vm, &node).await {
                Ok(moved) => {
                    ctx.metrics.evicted(moved);
                    tracing::warn!(vm = %format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()), %node, moved, "node lost");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.name_any(), error = %e, "node-loss eviction failed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_move_only_while_at_most_half_the_hypervisors_are_silent() {
        // (lost, total) -> may move
        let table = [
            (1, 1, false),
            (1, 2, true),
            (2, 2, false),
            (1, 3, true),
            (2, 3, false),
            (2, 4, true),
            (3, 5, false),
            (5, 10, true),
        ];
        for (lost, total, want) in table {
            assert_eq!(may_move(lost, total), want, "{lost}/{total}");
        }
    }
}
