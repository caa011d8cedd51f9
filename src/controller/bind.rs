//! One VM's placement: bind it to the best hypervisor, or say why none fits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ResourceExt};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::binding::{self, Binding};
use super::scheduler::{self, Request};
use super::vmpod;
use super::{Context, FIELD_MANAGER};
use crate::api::vm::Phase;
use crate::api::{EVICT_ANNOTATION, VirtualMachine, conditions};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    /// Someone changed the VM between our read and our write.
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Kube(kube::Error::Api(s)) if s.code == 409)
    }

    /// The metric label of this error.
    pub fn kind(&self) -> &'static str {
        if self.is_conflict() {
            "conflict"
        } else {
            "kube"
        }
    }
}

/// Unschedulable VMs get another try at least this often, besides every hypervisor change.
const RETRY_UNSCHEDULABLE: Duration = Duration::from_secs(30);
/// A VM whose Pod the API server refused (quota, LimitRange) tries again this often:
/// quota freed elsewhere in the namespace sends no event the controller watches.
const RETRY_REFUSED: Duration = Duration::from_secs(10);

pub(super) fn request(
    vm: &VirtualMachine,
    class: Option<&crate::api::VirtualMachineClassSpec>,
    requests: (i64, u64),
) -> Request {
    Request {
        uefi: vm.spec.effective_firmware(class) == crate::api::vm::Firmware::Uefi,
        namespace: vm.namespace().unwrap_or_default(),
        labels: vm.labels().clone(),
        cpu: requests.0,
        memory: requests.1,
        node_selector: vm.spec.node_selector.clone(),
        tolerations: vm.spec.tolerations.clone(),
        anti_affinity: vm.spec.anti_affinity.clone(),
        ..Default::default()
    }
}

/// The Scheduled condition (and, binding, nodeName), written only when they differ from
/// what is there. `bind` binds the VM to that node.
async fn set_scheduled(
    vm: &VirtualMachine,
    ctx: &Context,
    ok: bool,
    reason: &str,
    message: String,
    bind: Option<&str>,
) -> Result<(), Error> {
    let old = Binding::of(vm.status.as_ref());
    // NodeHealthy goes back to True when the VM is bound to a new node, or when the node
    // it waited on (its data is there) renews its heartbeat again.
    let unhealthy = conditions::find(&old.conditions, conditions::Type::NodeHealthy)
        .is_some_and(|c| c.status == "False");
    // Evaluated only for an unhealthy VM: this runs on every bound VM's reconcile.
    let healthy_again = match (ok && unhealthy, bind, &old.node_name) {
        (false, _, _) => None,
        (true, Some(new), _) => Some(("Rescheduled", format!("moved to a healthy node ({new})"))),
        (true, None, Some(node)) if super::nodeloss::heartbeat_fresh(ctx, node) => {
            Some(("NodeReturned", format!("{node} renews its heartbeat again")))
        }
        _ => None,
    };
    let before = conditions::find(&old.conditions, conditions::Type::Scheduled)
        .map(|c| (c.status == "True", c.reason.as_str(), c.message.as_str()));
    let event = placement_event(
        before,
        (ok, reason, &message),
        healthy_again.as_ref().map(|(r, _)| *r),
    );
    let mut new = old.with(vm, conditions::Type::Scheduled, ok, reason, message.clone());
    if let Some(node) = bind {
        new = new.bound_to(Some(node));
    }
    if let Some((reason, message)) = &healthy_again {
        new = new.with(
            vm,
            conditions::Type::NodeHealthy,
            true,
            reason,
            message.clone(),
        );
    }
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    binding::apply(&api, vm, new).await?;
    if let Some((type_, reason)) = event {
        let note = match &healthy_again {
            Some((_, m)) if reason == "Rebound" => m.clone(),
            _ => message,
        };
        ctx.record(vm, type_, reason, note, "Schedule");
    }
    Ok(())
}

/// The Event a placement decision is worth: `FailedScheduling` (Warning) when a VM cannot
/// be placed and the reason or message is new, `Rebound` when a VM whose node was lost
/// is bound to another, `Scheduled` when a VM that could not be placed finally is. A VM
/// placed at its first try records none: its status says where (`Scheduled`, `nodeName`),
/// and an Event per VM would cost the API server a write per VM in a burst.
pub fn placement_event(
    before: Option<(bool, &str, &str)>,
    now: (bool, &str, &str),
    healthy_again: Option<&str>,
) -> Option<(EventType, &'static str)> {
    let (ok, reason, message) = now;
    if healthy_again == Some("Rescheduled") {
        return Some((EventType::Normal, "Rebound"));
    }
    match before {
        _ if !ok => (before != Some((false, reason, message)))
            .then_some((EventType::Warning, "FailedScheduling")),
        Some((false, _, _)) => Some((EventType::Normal, "Scheduled")),
        _ => None,
    }
}

/// Removes a drained VM's binding (with the version it was decided on as precondition),
/// so that it is scheduled again, away from the cordoned node.
async fn unbind(vm: &VirtualMachine, ctx: &Context, node: &str) -> Result<(), Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let new = super::nodeloss::note_disks_left(Binding::of(vm.status.as_ref()), ctx, vm, node)
        .with(
            vm,
            conditions::Type::Scheduled,
            false,
            "Evicted",
            format!("shut down to leave {node} (drain); waiting for a new node"),
        )
        .bound_to(None);
    binding::apply(&api, vm, new).await?;
    // Its work is done: left in place, it would stop the VM again should it be placed
    // on the same node (one that was not cordoned: its Pod was deleted by hand).
    forget_eviction(vm, ctx).await?;
    tracing::info!(vm = %vm.name_any(), %node, "evicted: unbound to start elsewhere");
    Ok(())
}

async fn forget_eviction(vm: &VirtualMachine, ctx: &Context) -> Result<(), Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    crate::patch::annotate(&api, vm, EVICT_ANNOTATION, None, FIELD_MANAGER).await?;
    Ok(())
}

/// A bound VM (by us, or by someone else): the condition says so, and a drained VM
/// that has shut down is unbound to start elsewhere.
async fn reconcile_bound(
    vm: &VirtualMachine,
    ctx: &Context,
    node: String,
) -> Result<Action, Error> {
    // The cache has caught up with any assumption.
    if let Some(uid) = vm.uid() {
        ctx.view.lock().await.assumed.remove(&uid);
    }
    match vm.annotations().get(EVICT_ANNOTATION) {
        // Drained by shutting down, and down: free it to start elsewhere.
        Some(from) if *from == node => {
            let phase = vm.status.as_ref().and_then(|s| s.phase);
            if !vm
                .spec
                .may_restart_elsewhere(&|v| ctx.caches.shared_volume(vm, v))
            {
                // Its data is only on this node: unbinding would start it on new disks.
                tracing::warn!(vm = %vm.name_any(), %node, "not unbinding an evicted VM with node-local data (failoverPolicy WaitForNode)");
            } else if matches!(phase, Some(Phase::Stopped | Phase::Failed) | None) {
                unbind(vm, ctx, &node).await?;
            }
            return Ok(Action::await_change());
        }
        // Moved: the annotation has done its work.
        Some(_) => forget_eviction(vm, ctx).await?,
        None => {}
    }
    if let Some(refusal) = keep_pods(vm, ctx, Some(&node)).await? {
        return Ok(refusal);
    }
    set_scheduled(vm, ctx, true, "Scheduled", format!("bound to {node}"), None).await?;
    Ok(Action::await_change())
}

/// How long a VM whose Pod a kubelet refused waits before it is placed again, so that a
/// disagreement between vmlet's count and a kubelet's is not a loop of writes.
const REFUSED_BACKOFF: Duration = Duration::from_secs(10);

/// Brings the VM's Pods in line with its binding (`node`; None: unbound): its node's
/// Pod is created when missing, Pods on other nodes are deleted, and a Pod that its
/// kubelet refused sends the VM back to scheduling with the kubelet's reason. Returns
/// the action to end the reconcile with when the VM was sent back or must wait.
async fn keep_pods(
    vm: &VirtualMachine,
    ctx: &Context,
    node: Option<&str>,
) -> Result<Option<Action>, Error> {
    let uid = vm.uid().unwrap_or_default();
    let ns = vm.namespace().unwrap_or_default();
    let pods = ctx.pods.of_vm(&uid);
    let refs: Vec<&k8s_openapi::api::core::v1::Pod> = pods
        .iter()
        .map(|p| p.as_ref())
        // Unbound, a young Pod may be another controller's placement in flight (its
        // binding not yet written): it is left alone until it is clearly a leftover.
        .filter(|p| node.is_some() || !young(p) || p.metadata.deletion_timestamp.is_some())
        .collect();
    for step in vmpod::plan(&uid, node, &refs) {
        match step {
            vmpod::Step::Delete { name, uid } => {
                vmpod::delete(&ctx.client, &ns, &name, &uid).await?;
                tracing::info!(vm = %vm.name_any(), pod = %name, "deleted the VM's Pod of a node it left");
            }
            vmpod::Step::Release { name, uid } => {
                vmpod::release(&ctx.client, &ns, &name, &uid).await?;
                tracing::info!(vm = %vm.name_any(), pod = %name, "released the deleted Pod of a node the VM left");
            }
            vmpod::Step::Evict { name } => {
                let Some(node) = node else { continue };
                return evict(vm, ctx, node, &name).await.map(Some);
            }
            vmpod::Step::Create => {
                let Some(node) = node else { continue };
                // A VM bound to a Node that is gone (waiting for it, or about to move)
                // gets no Pod there: the Pod garbage collector would delete it at once.
                if ctx
                    .caches
                    .nodes
                    .get(&kube::runtime::reflector::ObjectRef::new(node))
                    .is_none()
                {
                    continue;
                }
                let Some(pod) = pod_for(ctx, vm, node) else {
                    continue;
                };
                if let Err(r) = vmpod::create(&ctx.client, &pod).await? {
                    // The VM runs on: only its Pod is missing. Say so, and try again.
                    tracing::warn!(vm = %vm.name_any(), reason = r.reason, message = %r.message, "the VM's Pod was refused");
                    ctx.record(vm, EventType::Warning, r.reason, r.message, "Schedule");
                    return Ok(Some(Action::requeue(RETRY_UNSCHEDULABLE)));
                }
            }
            vmpod::Step::Refused {
                name,
                uid: pod_uid,
                reason,
                message,
            } => {
                let Some(node) = node else { continue };
                let why =
                    format!("the kubelet on {node} refused the VM's Pod: {reason}: {message}");
                if !vm
                    .spec
                    .may_restart_elsewhere(&|v| ctx.caches.shared_volume(vm, v))
                {
                    // Its data is only on this node: it stays, and says why.
                    ctx.record(vm, EventType::Warning, "PodRejected", why, "Schedule");
                    return Ok(Some(Action::requeue(RETRY_UNSCHEDULABLE)));
                }
                vmpod::delete(&ctx.client, &ns, &name, &pod_uid).await?;
                ctx.refused
                    .lock()
                    .expect("not poisoned")
                    .insert(uid.clone(), Instant::now());
                let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
                let new = Binding::of(vm.status.as_ref())
                    .with(
                        vm,
                        conditions::Type::Scheduled,
                        false,
                        "PodRejected",
                        why.clone(),
                    )
                    .bound_to(None);
                binding::apply(&api, vm, new).await?;
                ctx.record(vm, EventType::Warning, "PodRejected", why, "Schedule");
                return Ok(Some(Action::requeue(REFUSED_BACKOFF)));
            }
        }
    }
    Ok(None)
}

/// The VM's Pod on `node` was deleted (by hand, or evicted by `kubectl drain`): the VM
/// leaves the node as its evictionStrategy says, as `kubectl vm drain` would move it, and
/// the Pod (held by its finalizer) goes once it has.
async fn evict(vm: &VirtualMachine, ctx: &Context, node: &str, pod: &str) -> Result<Action, Error> {
    use crate::api::eviction::{Plan, plan, why_stays};
    let shared = |v: &str| ctx.caches.shared_volume(vm, v);
    let ns = vm.namespace().unwrap_or_default();
    match plan(vm, &shared) {
        Plan::ShutDown => {
            // The drain's path: the node's agent shuts the VM down, then it is unbound
            // (reconcile_bound) and scheduled again.
            let api: Api<VirtualMachine> = Api::namespaced(ctx.client.clone(), &ns);
            crate::patch::annotate(&api, vm, EVICT_ANNOTATION, Some(node), FIELD_MANAGER).await?;
            let note = format!("its Pod {pod} was deleted: shutting down to leave {node}");
            ctx.record(vm, EventType::Normal, "Evicting", note, "Evict");
            Ok(Action::await_change())
        }
        Plan::Migrate => {
            let under_way = ctx.caches.migrations.state().iter().any(|m| {
                m.metadata.namespace.as_deref() == Some(ns.as_str())
                    && m.spec.vm_name == vm.name_any()
                    && !m
                        .status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_some_and(crate::api::MigrationPhase::finished)
            });
            if !under_way {
                let api: Api<crate::api::VirtualMachineMigration> =
                    Api::namespaced(ctx.client.clone(), &ns);
                let mut m = crate::api::VirtualMachineMigration::new(
                    "",
                    crate::api::VirtualMachineMigrationSpec {
                        vm_name: vm.name_any(),
                        target_node: None,
                    },
                );
                m.metadata.name = None;
                m.metadata.generate_name = Some(format!("evict-{}-", vm.name_any()));
                api.create(&kube::api::PostParams::default(), &m).await?;
                let note = format!("its Pod {pod} was deleted: live-migrating it off {node}");
                ctx.record(vm, EventType::Normal, "Evicting", note, "Evict");
            }
            // The migration's end moves the binding, which brings the VM back here.
            Ok(Action::requeue(Duration::from_secs(60)))
        }
        Plan::Stay(why) => {
            let note = format!(
                "its Pod {pod} was deleted, but it stays on {node}: {}; the Pod waits (Terminating)",
                why_stays(vm, why, &shared)
            );
            ctx.record(vm, EventType::Warning, "EvictionBlocked", note, "Evict");
            Ok(Action::requeue(Duration::from_secs(300)))
        }
    }
}

/// Whether a Pod was created so recently that a placement may still be writing its VM's
/// binding.
fn young(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.metadata.creation_timestamp.as_ref().is_none_or(|t| {
        k8s_openapi::jiff::Timestamp::now()
            .duration_since(t.0)
            .unsigned_abs()
            < LEFTOVER_AGE
    })
}

/// How old an unbound VM's Pod must be to count as a leftover.
const LEFTOVER_AGE: Duration = Duration::from_secs(30);

/// The VM Pod of `vm` on `node`, sized by that node's overhead formula and ratios. None
/// when the VM's size is unknown (its class is gone).
fn pod_for(
    ctx: &Context,
    vm: &VirtualMachine,
    node: &str,
) -> Option<k8s_openapi::api::core::v1::Pod> {
    let class = ctx.caches.class_of(vm)?;
    let (vcpus, memory) = vm.spec.requests(class.as_ref())?;
    let (overhead, ratios) = ctx.caches.host_terms(node);
    let sizing = vmpod::sizing(vcpus, memory, &overhead, ratios);
    Some(vmpod::desired(vm, node, sizing, &ctx.vm_pod_image))
}

/// Decides where the VM goes, in a scheduling cycle with every VM waiting at that moment
/// (the reconciles of a burst queue up while one cycle decides), and assumes each placed
/// VM on its node at once, so that the next decision counts it while its binding is
/// written. Whoever takes the view next runs the cycle for everyone queued.
async fn place(ctx: &Context, req: Request, uid: &str) -> Result<String, scheduler::Unschedulable> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    ctx.cycle
        .lock()
        .expect("not poisoned")
        .push((uid.to_string(), req, tx));
    {
        let mut view = ctx.view.lock().await;
        // Decided by a cycle that ran while this waited for the view.
        if let Ok(d) = rx.try_recv() {
            return d;
        }
        let queued = std::mem::take(&mut *ctx.cycle.lock().expect("not poisoned"));
        let epoch = ctx.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let (reqs, replies): (Vec<_>, Vec<_>) =
            queued.into_iter().map(|(u, r, tx)| ((u, r), tx)).unzip();
        let decisions = view.decide(
            &ctx.caches,
            ctx.heartbeat_grace,
            epoch,
            &reqs,
            ctx.strategy,
            ctx.weights,
        );
        ctx.metrics.cycle(reqs.len());
        for (tx, d) in replies.into_iter().zip(decisions) {
            let _ = tx.send(d);
        }
    }
    rx.await
        .expect("every queued request is answered by the cycle that takes it")
}

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    if vm.metadata.deletion_timestamp.is_some() {
        return Ok(super::release::reconcile_deleted(&vm, &ctx, ctx.fencing_bound).await?);
    }
    if let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) {
        return reconcile_bound(&vm, &ctx, node).await;
    }
    let Some(class) = ctx.caches.class_of(&vm) else {
        let name = vm
            .spec
            .class_ref
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let msg = format!("VirtualMachineClass {name} does not exist");
        set_scheduled(&vm, &ctx, false, "ClassNotFound", msg, None).await?;
        return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
    };
    let Some(requests) = vm.spec.requests(class.as_ref()) else {
        let msg = "the VM's memory is unknown: set spec.memory or a class that sets it".to_string();
        set_scheduled(&vm, &ctx, false, "InvalidSpec", msg, None).await?;
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let uid = vm.uid().unwrap_or_default();
    if ctx.view.lock().await.assumed.contains_key(&uid) {
        // A binding of this VM is in flight (or done, and the cache has not caught up):
        // deciding again would count the VM twice.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // Pods of an earlier binding (drained, or a bind that failed half-way) go first.
    keep_pods(&vm, &ctx, None).await?;
    let backoff = {
        let mut refused = ctx.refused.lock().expect("not poisoned");
        refused.retain(|_, at| at.elapsed() < REFUSED_BACKOFF);
        refused
            .get(&uid)
            .map(|at| REFUSED_BACKOFF.saturating_sub(at.elapsed()))
    };
    if let Some(wait) = backoff {
        return Ok(Action::requeue(wait));
    }
    let mut req = request(&vm, class.as_ref(), requests);
    match super::volumes::needs_of(&ctx, &vm) {
        Ok(needs) => {
            req.node = needs.node;
            req.pools = needs.pools;
        }
        Err(b) => {
            set_scheduled(&vm, &ctx, false, b.reason, b.message, None).await?;
            return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
        }
    }
    let who = format!("{}/{}", req.namespace, vm.name_any());
    let decision = place(&ctx, req, &uid).await;
    match decision {
        Ok(node) => {
            // Its Pod first, bound to the node: quota and admission have their say
            // before anything is claimed or bound for the VM.
            if let Some(pod) = pod_for(&ctx, &vm, &node) {
                match vmpod::create(&ctx.client, &pod).await {
                    Ok(Ok(())) => {}
                    Ok(Err(r)) => {
                        ctx.view.lock().await.forget(&uid);
                        ctx.metrics.attempt("refused", started.elapsed());
                        set_scheduled(&vm, &ctx, false, r.reason, r.message, None).await?;
                        return Ok(Action::requeue(RETRY_REFUSED));
                    }
                    Err(e) => {
                        ctx.view.lock().await.forget(&uid);
                        return Err(e.into());
                    }
                }
            }
            // Then the volumes: a VM is bound only once it is their one writer. A claim
            // refused leaves the Pod to a later reconcile's clean-up of leftovers.
            let claimed = match super::volumes::claim(&ctx, &vm, &node).await {
                Ok(c) => c,
                Err(e) => {
                    ctx.view.lock().await.forget(&uid);
                    return Err(e.into());
                }
            };
            if let Err(b) = claimed {
                ctx.view.lock().await.forget(&uid);
                set_scheduled(&vm, &ctx, false, b.reason, b.message, None).await?;
                return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
            }
            match set_scheduled(
                &vm,
                &ctx,
                true,
                "Scheduled",
                format!("bound to {node}"),
                Some(&node),
            )
            .await
            {
                Ok(()) => {
                    ctx.metrics.attempt("scheduled", started.elapsed());
                    tracing::info!(vm = %who, %node, "bound");
                    Ok(Action::await_change())
                }
                Err(e) => {
                    ctx.view.lock().await.forget(&uid);
                    ctx.metrics.attempt("error", started.elapsed());
                    Err(e)
                }
            }
        }
        Err(why) => {
            ctx.metrics.attempt("unschedulable", started.elapsed());
            set_scheduled(&vm, &ctx, false, "Unschedulable", why.to_string(), None).await?;
            Ok(Action::requeue(RETRY_UNSCHEDULABLE))
        }
    }
}

pub fn error_policy(vm: Arc<VirtualMachine>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error("placement", err.kind());
    if err.is_conflict() {
        // Someone changed the VM between our read and our bind: try again with the news.
        return Action::requeue(Duration::from_millis(200));
    }
    tracing::warn!(vm = %vm.name_any(), error = %err, "placement failed");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::type_complexity)] // a table
    fn placement_events_say_why_and_skip_the_first_binding() {
        use EventType::{Normal, Warning};
        let full = "0/2 hypervisors available: 2 insufficient memory";
        // (Scheduled before, now, NodeHealthy back because) -> Event
        let table: [(
            Option<(bool, &str, &str)>,
            (bool, &str, &str),
            Option<&str>,
            Option<(EventType, &str)>,
        ); 7] = [
            (None, (true, "Scheduled", "bound to a"), None, None),
            (
                None,
                (false, "Unschedulable", full),
                None,
                Some((Warning, "FailedScheduling")),
            ),
            (
                Some((false, "Unschedulable", full)),
                (false, "Unschedulable", full),
                None,
                None,
            ),
            (
                Some((false, "Unschedulable", "0/2: 2 cordoned")),
                (false, "Unschedulable", full),
                None,
                Some((Warning, "FailedScheduling")),
            ),
            (
                Some((false, "Unschedulable", full)),
                (true, "Scheduled", "bound to a"),
                None,
                Some((Normal, "Scheduled")),
            ),
            (
                Some((true, "Scheduled", "bound to a")),
                (true, "Scheduled", "bound to b"),
                Some("Rescheduled"),
                Some((Normal, "Rebound")),
            ),
            (
                Some((true, "Scheduled", "bound to a")),
                (true, "Scheduled", "bound to a"),
                Some("NodeReturned"),
                None,
            ),
        ];
        for (before, now, back, want) in table {
            let got = placement_event(before, now, back);
            assert_eq!(
                got.map(|(t, r)| (format!("{t:?}"), r)),
                want.map(|(t, r)| (format!("{t:?}"), r)),
                "{before:?} -> {now:?} {back:?}"
            );
        }
    }
}
