//! One VM's placement: bind it to the best hypervisor, or say why none fits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, ResourceExt};
use kube::runtime::controller::Action;
use serde_json::json;

use super::inventory::Assumed;
use super::scheduler::{self, Placed, Request};
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
    }
}

/// The Scheduled condition and phase, written only when they differ from what is there.
async fn set_scheduled(
    vm: &VirtualMachine,
    ctx: &Context,
    ok: bool,
    reason: &str,
    message: String,
    extra: serde_json::Value,
) -> Result<(), Error> {
    let old = vm.status.clone().unwrap_or_default();
    let same = conditions::find(&old.conditions, conditions::Type::Scheduled).is_some_and(|c| {
        c.status == if ok { "True" } else { "False" } && c.reason == reason && c.message == message
    });
    // NodeHealthy goes back to True when the VM is bound to a new node, or when the node
    // it waited on (its data is there) renews its heartbeat again.
    let unhealthy = conditions::find(&old.conditions, conditions::Type::NodeHealthy)
        .is_some_and(|c| c.status == "False");
    // Evaluated only for an unhealthy VM: this runs on every bound VM's reconcile.
    let healthy_again = match (ok && unhealthy, extra["nodeName"].as_str(), &old.node_name) {
        (false, _, _) => None,
        (true, Some(new), _) => Some(("Rescheduled", format!("moved to a healthy node ({new})"))),
        (true, None, Some(node)) if super::nodeloss::heartbeat_fresh(ctx, node) => {
            Some(("NodeReturned", format!("{node} renews its heartbeat again")))
        }
        _ => None,
    };
    if same && extra.is_null() && healthy_again.is_none() {
        return Ok(());
    }
    let cond = conditions::new(
        &old.conditions,
        conditions::Type::Scheduled,
        ok,
        reason,
        message,
        vm.metadata.generation,
        Time(Timestamp::now()),
    );
    let mut conds = vec![cond];
    if let Some((reason, message)) = healthy_again {
        conds.push(conditions::new(
            &old.conditions,
            conditions::Type::NodeHealthy,
            true,
            reason,
            message,
            vm.metadata.generation,
            Time(Timestamp::now()),
        ));
    }
    let mut status = json!({"conditions": conds});
    // Server-side apply drops fields a manager stops sending: a binding this controller
    // made must be sent again, or the write would unbind the VM.
    if let Some(node) = &old.node_name {
        status["nodeName"] = json!(node);
    }
    if let serde_json::Value::Object(m) = extra {
        status.as_object_mut().expect("object").extend(m);
    }
    // Optimistic concurrency on every write: one decided on a stale view fails with 409
    // and is retried on fresh data.
    let patch = json!({
        "apiVersion": "vmlet.dev/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"resourceVersion": vm.resource_version()},
        "status": status,
    });
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    api.patch_status(
        &vm.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Removes a drained VM's binding (with the version it was decided on as precondition),
/// so that it is scheduled again, away from the cordoned node.
async fn unbind(vm: &VirtualMachine, ctx: &Context, node: &str) -> Result<(), Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    let noted = super::nodeloss::note_disks_left(&api, vm, node).await?;
    let vm = noted.as_ref().unwrap_or(vm);
    let cond = conditions::new(
        &vm.status.clone().unwrap_or_default().conditions,
        conditions::Type::Scheduled,
        false,
        "Evicted",
        format!("shut down to leave {node} (drain); waiting for a new node"),
        vm.metadata.generation,
        Time(Timestamp::now()),
    );
    // A merge patch replaces the whole list: send every condition, Scheduled replaced.
    let mut conds: Vec<_> = vm
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_ != conditions::Type::Scheduled.as_str())
        .collect();
    conds.push(cond);
    let patch = json!({
        "metadata": {"resourceVersion": vm.resource_version()},
        "status": {"nodeName": null, "phase": Phase::Pending, "conditions": conds},
    });
    api.patch_status(
        &vm.name_any(),
        &crate::patch::by(FIELD_MANAGER),
        &Patch::Merge(&patch),
    )
    .await?;
    tracing::info!(vm = %vm.name_any(), %node, "evicted: unbound to start elsewhere");
    Ok(())
}

async fn forget_eviction(vm: &VirtualMachine, ctx: &Context) -> Result<(), Error> {
    let api: Api<VirtualMachine> =
        Api::namespaced(ctx.client.clone(), &vm.namespace().unwrap_or_default());
    crate::patch::annotate(&api, vm, EVICT_ANNOTATION, None, FIELD_MANAGER).await?;
    Ok(())
}

pub async fn reconcile(vm: Arc<VirtualMachine>, ctx: Arc<Context>) -> Result<Action, Error> {
    if vm.metadata.deletion_timestamp.is_some() {
        return Ok(super::release::reconcile_deleted(&vm, &ctx, ctx.fencing_bound).await?);
    }
    if let Some(node) = vm.status.as_ref().and_then(|s| s.node_name.clone()) {
        // Bound (by us, or by someone else): the cache has caught up with any assumption,
        // and the condition should say so.
        if let Some(uid) = vm.uid() {
            ctx.view.lock().await.assumed.remove(&uid);
        }
        match vm.annotations().get(EVICT_ANNOTATION) {
            // Drained by shutting down, and down: free it to start elsewhere.
            Some(from) if *from == node => {
                let phase = vm.status.as_ref().and_then(|s| s.phase);
                if !vm.spec.may_restart_elsewhere() {
                    // Its data is only on this node: unbinding would start it on new disks.
                    tracing::warn!(vm = %vm.name_any(), %node, "not unbinding an evicted VM with node-local data (failoverPolicy WaitForNode)");
                } else if matches!(phase, Some(Phase::Stopped | Phase::Failed) | None) {
                    unbind(&vm, &ctx, &node).await?;
                }
                return Ok(Action::await_change());
            }
            // Moved: the annotation has done its work.
            Some(_) => forget_eviction(&vm, &ctx).await?,
            None => {}
        }
        set_scheduled(
            &vm,
            &ctx,
            true,
            "Scheduled",
            format!("bound to {node}"),
            serde_json::Value::Null,
        )
        .await?;
        return Ok(Action::await_change());
    }
    let Some(class) = ctx.caches.class_of(&vm) else {
        let name = vm
            .spec
            .class_ref
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let msg = format!("VirtualMachineClass {name} does not exist");
        set_scheduled(
            &vm,
            &ctx,
            false,
            "ClassNotFound",
            msg,
            json!({"phase": Phase::Pending}),
        )
        .await?;
        return Ok(Action::requeue(RETRY_UNSCHEDULABLE));
    };
    let Some(requests) = vm.spec.requests(class.as_ref()) else {
        let msg = "the VM's memory is unknown: set spec.memory or a class that sets it".to_string();
        set_scheduled(
            &vm,
            &ctx,
            false,
            "InvalidSpec",
            msg,
            json!({"phase": Phase::Pending}),
        )
        .await?;
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    let uid = vm.uid().unwrap_or_default();
    if ctx.view.lock().await.assumed.contains_key(&uid) {
        // A binding of this VM is in flight (or done, and the cache has not caught up):
        // deciding again would count the VM twice.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let req = request(&vm, class.as_ref(), requests);
    let decision = {
        let mut view = ctx.view.lock().await;
        let epoch = ctx.epoch.load(std::sync::atomic::Ordering::SeqCst);
        let (candidates, placed) = view.current(&ctx.caches, ctx.heartbeat_grace, epoch);
        let decision = scheduler::schedule(&req, candidates, placed, ctx.strategy, ctx.weights);
        if let Ok(node) = &decision {
            let a = Assumed {
                node: node.clone(),
                cpu: req.cpu,
                memory: req.memory,
                at: Instant::now(),
            };
            let p = Placed {
                namespace: req.namespace.clone(),
                labels: req.labels.clone(),
                node: node.clone(),
                anti_affinity: req.anti_affinity.clone(),
            };
            view.assume(uid.clone(), a, p);
        }
        decision
    };
    match decision {
        Ok(node) => {
            let extra = json!({"nodeName": node, "phase": Phase::Scheduled});
            match set_scheduled(
                &vm,
                &ctx,
                true,
                "Scheduled",
                format!("bound to {node}"),
                extra,
            )
            .await
            {
                Ok(()) => {
                    ctx.metrics.attempt("scheduled", started.elapsed());
                    tracing::info!(vm = %format!("{}/{}", req.namespace, vm.name_any()), %node, "bound");
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
            set_scheduled(
                &vm,
                &ctx,
                false,
                "Unschedulable",
                why.to_string(),
                json!({"phase": Phase::Pending}),
            )
            .await?;
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
