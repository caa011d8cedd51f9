//! Node loss: a hypervisor whose heartbeat has been silent for longer than
//! lease duration + the agents' fence delay + a margin has, by then, destroyed its domains
//! (agents fence themselves when they cannot renew), so its VMs can run elsewhere without
//! ever running twice. docs/reliability.md has the timing argument.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How a VM's node was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Its heartbeat went silent past the fencing bound; `held` when the mass-silence
    /// guard holds failover back (`lost` of `total` hypervisors silent).
    Silent {
        held: bool,
        lost: usize,
        total: usize,
    },
    /// Its Node object was deleted and its agent has not renewed since, past the bound.
    Deleted,
}

/// Says on the VM that its node is lost (NodeHealthy=False) and, when its run strategy
/// wants it running and it may restart elsewhere (and failover is not held back), unbinds
/// it in the same write so that the scheduler places it elsewhere. Whether it was
/// unbound.
async fn evict(
    ctx: &Context,
    vm: &VirtualMachine,
    node: &str,
    loss: Loss,
) -> Result<bool, kube::Error> {
    let wants_running = matches!(
        vm.spec.run_strategy.unwrap_or_default(),
        RunStrategy::Always | RunStrategy::RerunOnFailure
    );
    let shared = |v: &str| ctx.caches.shared_volume(vm, v);
    let (reason, mut message, held) = match loss {
        Loss::Silent {
            held: true,
            lost,
            total,
        } => (
            "FailoverHeldBack",
            format!(
                "node {node} stopped renewing its heartbeat, but {lost} of {total} hypervisors \
                 are silent: more likely the control plane than the nodes, so no VM is moved \
                 until most of them are heard from again"
            ),
            true,
        ),
        Loss::Silent { .. } => (
            "NodeLost",
            format!("node {node} stopped renewing its heartbeat; its domains are fenced"),
            false,
        ),
        Loss::Deleted => (
            "NodeDeleted",
            format!("node {node} was deleted and its agent has not renewed its heartbeat since"),
            false,
        ),
    };
    let moves = !held && wants_running && vm.spec.may_restart_elsewhere(&shared);
    if wants_running && !moves && !held {
        // Restarting elsewhere would start it on empty disks: the data waits on the node.
        message += &format!(
            "; the VM stays bound to {node} because disk(s) {} hold data only that node has \
             (set spec.failoverPolicy: RestartWithNewDisks to restart it elsewhere on new disks)",
            vm.spec.node_local_data(&shared).join(", ")
        );
    }
    // `kubectl describe vm` says it once, when the condition first says it.
    let said = vm
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::Type::NodeHealthy))
        .is_some_and(|c| c.status == "False" && c.reason == reason);
    let event_note = (!said).then(|| message.clone());
    let mut new = Binding::of(vm.status.as_ref()).with(
        vm,
        conditions::Type::NodeHealthy,
        false,
        reason,
        message,
    );
    if moves {
        new = note_disks_left(new, ctx, vm, node).bound_to(None);
    }
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    binding::apply(&api, vm, new).await?;
    if let Some(note) = event_note {
        ctx.record(
            vm,
            kube::runtime::events::EventType::Warning,
            reason,
            note,
            "NodeLoss",
        );
    }
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

/// Whether a deleted Node's VMs are lost: its agent's heartbeat (when its Lease is still
/// there) or, once the Lease is gone with the Node, the time since the controller saw
/// the Node missing, is past the Lease's duration plus the fencing bound. A deleted Node
/// whose agent still renews keeps its VMs: their domains may run.
pub fn deleted_node_lost(
    missing_for: Duration,
    lease: Option<(Duration, Duration)>,
    bound: Duration,
) -> bool {
    match lease {
        Some((age, duration)) => age > duration + bound,
        None => {
            missing_for > Duration::from_secs(crate::api::DEFAULT_LEASE_DURATION_SECONDS) + bound
        }
    }
}

/// Nodes that VMs are bound to and that no longer exist, lost by [`deleted_node_lost`];
/// `missing_since` remembers when each was first seen missing.
fn deleted_nodes(
    ctx: &Context,
    missing_since: &mut HashMap<String, Instant>,
    bound: Duration,
) -> HashSet<String> {
    let existing: HashSet<String> = ctx
        .caches
        .nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let bound_to: HashSet<String> = ctx
        .caches
        .vms
        .state()
        .iter()
        .filter_map(|vm| vm.status.as_ref()?.node_name.clone())
        .filter(|n| !existing.contains(n))
        .collect();
    missing_since.retain(|n, _| bound_to.contains(n));
    bound_to
        .into_iter()
        .filter(|n| {
            let since = *missing_since.entry(n.clone()).or_insert_with(Instant::now);
            deleted_node_lost(since.elapsed(), heartbeat_silence(ctx, n), bound)
        })
        .collect()
}

/// Hypervisors: labelled Nodes whose agent has a heartbeat Lease. The same population
/// as [`lost_nodes`] counts from.
fn hypervisor_total(ctx: &Context) -> usize {
    let leases: HashSet<String> = ctx
        .caches
        .leases
        .state()
        .iter()
        .filter_map(|l| l.metadata.name.clone())
        .collect();
    hypervisor_nodes(ctx)
        .into_iter()
        .filter(|n| leases.contains(&crate::api::heartbeat_lease_name(n)))
        .count()
}

/// Removes the Hypervisor and heartbeat Lease of a Node that no longer exists (they are
/// the Node's, which owns them, but an agent that never read its Node's uid wrote them
/// without owner), once its agent is silent past the bound and a fresh read confirms the
/// Node is gone.
async fn forget_deleted_nodes(
    ctx: &Context,
    missing_since: &mut HashMap<String, Instant>,
    bound: Duration,
) {
    let existing: HashSet<String> = ctx
        .caches
        .nodes
        .state()
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    let hypervisors = ctx.caches.hypervisors.state();
    let leases = ctx.caches.leases.state();
    let recorded = hypervisors
        .iter()
        .filter_map(|h| h.metadata.name.clone())
        .chain(leases.iter().filter_map(|l| {
            crate::api::heartbeat_lease_node(l.metadata.name.as_deref()?).map(str::to_string)
        }));
    let orphans: HashSet<String> = recorded.filter(|n| !existing.contains(n)).collect();
    missing_since.retain(|n, _| orphans.contains(n));
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    let hv_api: Api<crate::api::Hypervisor> = Api::all(ctx.client.clone());
    let lease_api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(ctx.client.clone(), crate::api::HEARTBEAT_LEASE_NAMESPACE);
    for node in orphans {
        let since = *missing_since
            .entry(node.clone())
            .or_insert_with(Instant::now);
        if !deleted_node_lost(since.elapsed(), heartbeat_silence(ctx, &node), bound) {
            continue;
        }
        // Nothing is deleted while the object it belongs to exists.
        if !matches!(nodes.get_opt(&node).await, Ok(None)) {
            continue;
        }
        let dp = kube::api::DeleteParams::default();
        let _ = hv_api.delete(&node, &dp).await;
        let _ = lease_api
            .delete(&crate::api::heartbeat_lease_name(&node), &dp)
            .await;
        tracing::info!(%node, "removed the Hypervisor and heartbeat Lease of a deleted Node");
    }
}

pub async fn node_loss_loop(ctx: Arc<Context>, fence_after: Duration, margin: Duration) {
    let mut held_before = false;
    let mut missing_since = HashMap::new();
    let mut orphaned_since = HashMap::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        silent_hypervisors_not_ready(&ctx).await;
        forget_deleted_nodes(&ctx, &mut orphaned_since, fence_after + margin).await;
        let lost = lost_nodes(&ctx, fence_after, margin);
        let total = hypervisor_total(&ctx);
        let held = !lost.is_empty() && !may_move(lost.len(), total);
        ctx.metrics.set_node_loss(lost.len(), total, held);
        if held && !held_before {
            tracing::error!(
                lost = lost.len(),
                total,
                "more than half of the hypervisors are silent: not moving VMs (control-plane trouble?)"
            );
            held_back_events(&ctx, &lost, total).await;
        }
        held_before = held;
        let gone = deleted_nodes(&ctx, &mut missing_since, fence_after + margin);
        let silent = Loss::Silent {
            held,
            lost: lost.len(),
            total,
        };
        for vm in ctx.caches.vms.state() {
            let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let loss = match () {
                _ if lost.contains(&node) => silent,
                _ if gone.contains(&node) => Loss::Deleted,
                _ => continue,
            };
            if vm.metadata.deletion_timestamp.is_some() || already_said(&vm, loss) {
                continue;
            }
            match evict(&ctx, &vm, &node, loss).await {
                Ok(moved) => {
                    ctx.metrics.evicted(moved);
                    tracing::warn!(vm = %format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()), %node, moved, ?loss, "node lost");
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.name_any(), error = %e, "node-loss eviction failed")
                }
            }
        }
    }
}

/// Whether the VM already says what `loss` would make it say while staying bound (a
/// held-back failover is said once, not every second).
fn already_said(vm: &VirtualMachine, loss: Loss) -> bool {
    let held = matches!(loss, Loss::Silent { held: true, .. });
    held && vm
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::Type::NodeHealthy))
        .is_some_and(|c| c.status == "False" && c.reason == "FailoverHeldBack")
}

/// A Warning Event on each silent Node when the guard starts holding failover back: what
/// `kubectl describe node` shows beside the VMs' own NodeHealthy condition.
async fn held_back_events(ctx: &Context, lost: &HashSet<String>, total: usize) {
    for node in lost {
        let Some(n) = ctx
            .caches
            .nodes
            .get(&kube::runtime::reflector::ObjectRef::new(node))
        else {
            continue;
        };
        ctx.record(
            n.as_ref(),
            kube::runtime::events::EventType::Warning,
            "FailoverHeldBack",
            format!(
                "{} of {total} hypervisors are silent: VMs of silent nodes are not moved \
                 (more likely the control plane than the nodes)",
                lost.len()
            ),
            "NodeLoss",
        );
    }
}

/// Hypervisors whose agent has been silent longer than its Lease's duration plus the
/// heartbeat grace say `Ready=Unknown` (reason AgentSilent), as the node lifecycle
/// controller says of a silent kubelet's Node: the agent's last `Ready=True` stands
/// otherwise. The agent's next report (it compares with what is stored) takes the
/// condition back.
async fn silent_hypervisors_not_ready(ctx: &Context) {
    let api: Api<crate::api::Hypervisor> = Api::all(ctx.client.clone());
    for hv in ctx.caches.hypervisors.state() {
        let name = hv.name_any();
        let conds = hv
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default();
        let Some(silence) = heartbeat_silence(ctx, &name) else {
            continue;
        };
        let Some(c) = agent_silent(conds, silence, ctx.heartbeat_grace) else {
            continue;
        };
        let patch = serde_json::json!({
            "apiVersion": "vmlet.dev/v1alpha1", "kind": "Hypervisor",
            "status": {"conditions": [c]},
        });
        let pp = kube::api::PatchParams::apply(super::FIELD_MANAGER).force();
        if let Err(e) = api
            .patch_status(&name, &pp, &kube::api::Patch::Apply(&patch))
            .await
        {
            tracing::warn!(hypervisor = %name, error = %e, "marking a silent hypervisor failed");
        }
    }
}

/// Pure: the `Ready=Unknown` condition to write when the Hypervisor says Ready=True and
/// its heartbeat (age, duration) is older than duration + grace; None otherwise.
pub fn agent_silent(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    (age, duration): (Duration, Duration),
    grace: Duration,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let ready = conditions::find(conds, conditions::Type::Ready)?;
    if ready.status != "True" || age <= duration + grace {
        return None;
    }
    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        type_: conditions::Type::Ready.as_str().into(),
        status: "Unknown".into(),
        reason: "AgentSilent".into(),
        message: format!(
            "the agent has not renewed its heartbeat for {} s (its Lease lasts {} s)",
            age.as_secs(),
            duration.as_secs()
        ),
        observed_generation: None,
        last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
    })
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

    #[test]
    fn a_deleted_nodes_vms_move_once_its_agent_is_silent_past_the_bound() {
        let s = Duration::from_secs;
        let bound = s(30);
        // (missing for, lease (age, duration)) -> lost
        for (missing, lease, want) in [
            // The agent still renews although its Node is gone: its domains may run.
            (s(600), Some((s(2), s(15))), false),
            (s(10), Some((s(46), s(15))), true),
            (s(10), Some((s(44), s(15))), false),
            // The Lease went with the Node: counted from when the Node went missing.
            (s(44), None, false),
            (s(46), None, true),
        ] {
            assert_eq!(
                deleted_node_lost(missing, lease, bound),
                want,
                "{missing:?} {lease:?}"
            );
        }
    }

    #[test]
    fn a_silent_agents_hypervisor_is_not_ready() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let s = Duration::from_secs;
        let ready = |status: &str| {
            vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                reason: "AgentReady".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(Timestamp::UNIX_EPOCH),
            }]
        };
        let grace = s(5);
        assert!(agent_silent(&ready("True"), (s(10), s(15)), grace).is_none());
        assert!(agent_silent(&ready("True"), (s(20), s(15)), grace).is_none());
        let c = agent_silent(&ready("True"), (s(21), s(15)), grace).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("Unknown", "AgentSilent")
        );
        // Already not Ready (libvirt down, or said so before): nothing to write.
        assert!(agent_silent(&ready("False"), (s(60), s(15)), grace).is_none());
        assert!(agent_silent(&ready("Unknown"), (s(60), s(15)), grace).is_none());
        assert!(agent_silent(&[], (s(60), s(15)), grace).is_none());
    }
}
